"""The peers' methods: new-error losses (BackwardCompatibilityML), ELODI with an
ensemble reference, warm start and weight interpolation (BCWI).

Hand-computed values for the pure functions, then behaviour on real (tiny)
training runs: each must lower the negative flip rate against the old model on
the noisy 10-class problem of the focal-distillation test in test_methods.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from graceful_ray.errors import ConfigError
from graceful_ray.interpolate import GridPoint, choose_alpha, interpolate, interpolate_state
from graceful_ray.methods import (MethodBatch, UpgradeContext, build_method, ensemble_logits, new_error_loss,
                                  strict_imitation_loss)
from graceful_ray.methods.lqf import load_pretrained
from graceful_ray.models import ModelSpec, build_model
from tests.helpers import feature_tables

MLP = {"width": 64, "depth": 1, "embedding_dim": 32}
SPEC = ModelSpec("mlp", (64,), 10, MLP)
EPOCHS = 15


# --------------------------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------------------------

def test_new_error_is_cross_entropy_on_the_old_models_correct_samples():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    y = torch.tensor([0, 0, 1])
    right = torch.tensor([True, False, True])
    ce = F.cross_entropy(logits, y, reduction="none")
    assert new_error_loss(logits, y, right).item() == pytest.approx((ce[0] + ce[2]).item() / 2)
    assert new_error_loss(logits, y, torch.zeros(3, dtype=torch.bool)).item() == 0.0  # no support: no term

    # the method: CE + lambda * D, part "ne"
    m = build_method("new-error", ne_lambda=0.5)
    m.setup(UpgradeContext(num_classes=2, old_classes=[0, 1], new_embedding_dim=4))
    out = m.loss(MethodBatch(y, torch.zeros(3, 4), logits, old_logits=torch.zeros(3, 2), old_correct=right))
    assert set(out.parts) == {"ce", "ne"}
    assert out.parts["ne"].item() == pytest.approx(0.5 * (ce[0] + ce[2]).item() / 2)
    assert out.total.item() == pytest.approx(ce.mean().item() + 0.5 * (ce[0] + ce[2]).item() / 2)


def test_strict_imitation_matches_the_old_distribution_on_its_correct_samples():
    new = torch.tensor([[0.0, 0.0], [3.0, -1.0]])
    old = torch.tensor([[math.log(3.0), 0.0], [0.0, 5.0]])  # p_old(row 0) = [3/4, 1/4]
    right = torch.tensor([True, False])
    # row 0: -(3/4 log 1/2 + 1/4 log 1/2) = log 2; row 1 is not in the support
    assert strict_imitation_loss(new, old, right).item() == pytest.approx(math.log(2.0), rel=1e-6)
    # it differs from hard-label new error: it also matches the old model's doubt
    assert new_error_loss(new, torch.tensor([0, 1]), right).item() == pytest.approx(math.log(2.0))
    sharp = torch.tensor([[4.0, -4.0], [0.0, 0.0]])
    assert strict_imitation_loss(sharp, old, right).item() > new_error_loss(sharp, torch.tensor([0, 1]), right).item()
    with pytest.raises(ConfigError, match="aligned"):
        strict_imitation_loss(new, old[:, :1], right)


def test_new_error_hyperparameters_and_errors():
    assert build_method("new-error").hyperparameters() == {"ne_lambda": 1.0, "ne_kind": "weighted"}
    with pytest.raises(ConfigError, match="ne_kind must be one of"):
        build_method("new-error", ne_kind="soft")
    with pytest.raises(ConfigError, match="ne_lambda must be >= 0"):
        build_method("new-error", ne_lambda=-1)
    with pytest.raises(ConfigError, match="needs an old model"):
        build_method("new-error").setup(UpgradeContext(num_classes=3, new_embedding_dim=4))
    m = build_method("new-error", ne_kind="strict")
    m.setup(UpgradeContext(num_classes=3, old_classes=[2, 0], new_embedding_dim=4))  # class 1 was added
    b = MethodBatch(torch.tensor([0, 2]), torch.zeros(2, 4), torch.randn(2, 3), old_logits=torch.randn(2, 2),
                    old_correct=torch.tensor([True, True]))
    expected = strict_imitation_loss(b.new_logits[:, [2, 0]], b.old_logits, b.old_correct)
    assert m.loss(b).parts["ne"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_ensemble_reference_is_the_mean_of_the_references_logits_on_shared_classes():
    torch.manual_seed(0)
    refs = [build_model(ModelSpec("mlp", (8,), 3, {"width": 8, "depth": 1, "embedding_dim": 4})) for _ in range(2)]
    x = torch.randn(5, 8)
    # ref 0 knows global classes [0, 1, 2], ref 1 knows [2, 0, 1]; the new head has [0, 1, 2]
    m = build_method("elodi", elodi_xi=0.0, elodi_p=2.0, elodi_lambda=1.0)
    m.setup(UpgradeContext(num_classes=3, old_classes=[0, 1, 2], new_embedding_dim=4))
    m.methods[0].set_references(refs, [[0, 1, 2], [2, 0, 1]], [0, 1, 2], [0, 1, 2])
    with torch.no_grad():
        expected_ref = (refs[0](x) + refs[1](x)[:, [1, 2, 0]]) / 2
    got = ensemble_logits(refs, m.methods[0]._ref_positions, x)
    assert torch.allclose(got, expected_ref, atol=1e-6)
    new_logits = torch.randn(5, 3, requires_grad=True)
    out = m.loss(MethodBatch(torch.tensor([0, 1, 2, 0, 1]), torch.zeros(5, 4), new_logits,
                             old_logits=torch.full((5, 3), 99.0), old_correct=torch.ones(5, dtype=torch.bool), x=x))
    # xi = 0, p = 2: the mean squared difference to the ensemble (the old logits play no part)
    assert out.parts["elodi"].item() == pytest.approx((new_logits - expected_ref).pow(2).mean().item(), rel=1e-5)
    out.total.backward()
    assert all(p.grad is None for r in refs for p in r.parameters())
    with pytest.raises(ConfigError, match="needs x"):
        m.loss(MethodBatch(torch.tensor([0]), torch.zeros(1, 4), torch.zeros(1, 3), old_logits=torch.zeros(1, 3),
                           old_correct=torch.ones(1, dtype=torch.bool)))
    assert build_method("elodi", elodi_refs=["m@v1", " m@v5"]).hyperparameters()["elodi_refs"] == "m@v1,m@v5"
    with pytest.raises(ConfigError, match="twice"):
        build_method("elodi", elodi_refs="m@v1,m@v1")


def test_interpolate_state_by_hand_and_head_rows_by_class():
    old = {"backbone.w": torch.tensor([0.0, 2.0]), "head.weight": torch.tensor([[1.0], [3.0]]),
           "head.bias": torch.tensor([1.0, 3.0])}
    # v2 has classes [1, 0, 5]: class 5 is new, its row stays v2's
    new = {"backbone.w": torch.tensor([4.0, 2.0]), "head.weight": torch.tensor([[5.0], [7.0], [9.0]]),
           "head.bias": torch.tensor([5.0, 7.0, 9.0])}
    mid = interpolate_state(old, new, 0.25, [0, 1], [1, 0, 5])
    assert mid["backbone.w"].tolist() == [1.0, 2.0]
    assert mid["head.weight"].flatten().tolist() == [0.75 * 3 + 0.25 * 5, 0.75 * 1 + 0.25 * 7, 9.0]
    assert mid["head.bias"].tolist() == [0.75 * 3 + 0.25 * 5, 0.75 * 1 + 0.25 * 7, 9.0]
    assert interpolate_state(old, new, 1.0, [0, 1], [1, 0, 5])["backbone.w"].tolist() == [4.0, 2.0]
    with pytest.raises(ConfigError, match="share an architecture"):
        interpolate_state({"backbone.w": torch.zeros(3)}, new, 0.5, [0, 1], [1, 0, 5])
    with pytest.raises(ConfigError, match=r"in \[0, 1\]"):
        interpolate_state(old, new, 1.5, [0, 1], [1, 0, 5])


def test_choose_alpha_never_trades_accuracy_below_v2s():
    grid = [GridPoint(0.0, 0.70, 0.0, 0), GridPoint(0.5, 0.80, 0.010, 20), GridPoint(0.7, 0.82, 0.012, 24),
            GridPoint(0.9, 0.81, 0.020, 40), GridPoint(1.0, 0.81, 0.030, 60)]
    assert choose_alpha(grid).alpha == 0.7  # lowest NFR among accuracy >= 0.81
    assert choose_alpha(grid, max_accuracy_drop=0.01).alpha == 0.5
    worse = [GridPoint(0.5, 0.6, 0.01, 1), GridPoint(1.0, 0.8, 0.03, 6)]
    assert choose_alpha(worse).alpha == 1.0  # nothing qualifies but v2 itself
    tie = [GridPoint(0.8, 0.8, 0.03, 6), GridPoint(1.0, 0.8, 0.03, 6)]
    assert choose_alpha(tie).alpha == 1.0  # ties go to the model closer to v2
    with pytest.raises(ConfigError, match="contain 1.0"):
        choose_alpha(grid[:2])


def test_load_pretrained_refuses_another_architecture():
    small = build_model(ModelSpec("mlp", (64,), 10, {"width": 32, "depth": 1, "embedding_dim": 32}))
    with pytest.raises(ConfigError, match="init_from_old: the pretrained weights do not fit"):
        load_pretrained(small, build_model(SPEC).state_dict(), who="init_from_old")


# --------------------------------------------------------------------------------------------
# Behaviour on real (tiny) training runs
# --------------------------------------------------------------------------------------------

def _train(model, x, y, method, seed: int, epochs: int, old=None, lr: float = 3e-3):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(64):
            emb, logits = model.forward_features(x[idx])
            batch = MethodBatch(y[idx], emb, logits, *((o[idx] for o in old) if old else ()), x=x[idx])
            loss = method.loss(batch).total
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    return model


@pytest.fixture(scope="module")
def problem():
    """The FD test's problem: old MLP on 1500 of 2000 pool rows, 4000 held-out test rows."""
    from sklearn.datasets import make_classification

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    x, y = make_classification(n_samples=6000, n_features=64, n_informative=16, n_redundant=0,
                               n_classes=10, n_clusters_per_class=1, class_sep=1.5, flip_y=0.05,
                               random_state=0)
    x, y = torch.tensor(x, dtype=torch.float32), torch.tensor(y)
    x_test, y_test, x_pool, y_pool = x[:4000], y[:4000], x[4000:], y[4000:]
    torch.manual_seed(0)
    old = _train(build_model(SPEC), x_pool[:1500], y_pool[:1500], build_method("plain"), 0, EPOCHS)
    with torch.no_grad():
        old_emb, old_logits = old.forward_features(x_pool)
        old_right_test = old(x_test).argmax(1) == y_test
    ctx = UpgradeContext(num_classes=10, old_classes=list(range(10)), old_head_weight=old.head.weight.detach(),
                         old_head_bias=old.head.bias.detach(), old_embedding_dim=32, new_embedding_dim=32)
    yield dict(x_test=x_test, y_test=y_test, x_pool=x_pool, y_pool=y_pool, old=old, ctx=ctx,
               old_cache=(old_emb, old_logits, old_logits.argmax(1) == y_pool), old_right_test=old_right_test)
    torch.set_num_threads(n)


def _score(p, model, rows: slice = slice(None)) -> tuple[float, float]:
    """(NFR, accuracy) on the test rows ``rows``."""
    with torch.no_grad():
        right = model(p["x_test"][rows]).argmax(1) == p["y_test"][rows]
    return (p["old_right_test"][rows] & ~right).float().mean().item(), right.float().mean().item()


def _new_model(p, spec_name: str, hp: dict, seed: int, setup=None, init=None):
    method = build_method(spec_name, **hp)
    method.setup(p["ctx"])
    if setup is not None:
        setup(method)
    torch.manual_seed(seed)
    model = build_model(SPEC)
    if init is not None:
        model.load_state_dict(init.state_dict())
    return _train(model, p["x_pool"], p["y_pool"], method, seed, EPOCHS, p["old_cache"])


def _plain(p, seeds=(1, 2), rows: slice = slice(None)) -> tuple[float, float]:
    scores = [_score(p, _new_model(p, "plain", {}, s), rows) for s in seeds]
    return float(np.mean([s[0] for s in scores])), float(np.mean([s[1] for s in scores]))


@pytest.fixture(scope="module")
def plain_scores(problem):
    return _plain(problem)


@pytest.mark.parametrize("hp", [{"ne_kind": "weighted", "ne_lambda": 2.0}, {"ne_kind": "strict", "ne_lambda": 2.0}],
                         ids=["weighted", "strict"])
def test_new_error_lowers_negative_flips(problem, plain_scores, hp):
    scores = [_score(problem, _new_model(problem, "new-error", hp, s)) for s in (1, 2)]
    nfr, acc = float(np.mean([s[0] for s in scores])), float(np.mean([s[1] for s in scores]))
    msg = f"plain NFR {plain_scores[0]:.4f} acc {plain_scores[1]:.4f}; new-error {hp} NFR {nfr:.4f} acc {acc:.4f}"
    print(msg)
    assert plain_scores[0] > 0.03, msg
    assert nfr < 0.9 * plain_scores[0], msg
    assert acc > plain_scores[1] - 0.04, msg


def test_elodi_with_an_ensemble_reference_lowers_negative_flips(problem, plain_scores):
    """References: the old model and two models trained like it (same rows, other seeds)."""
    p = problem
    refs = [p["old"]]
    for seed in (10, 11):
        torch.manual_seed(seed)
        refs.append(_train(build_model(SPEC), p["x_pool"][:1500], p["y_pool"][:1500], build_method("plain"),
                           seed, EPOCHS))
    classes = list(range(10))

    def with_refs(method):
        method.methods[0].set_references(refs, [classes] * 3, classes, classes)

    scores = [_score(p, _new_model(p, "elodi", {"elodi_lambda": 1.0}, s, setup=with_refs)) for s in (1, 2)]
    nfr, acc = float(np.mean([s[0] for s in scores])), float(np.mean([s[1] for s in scores]))
    msg = f"plain NFR {plain_scores[0]:.4f} acc {plain_scores[1]:.4f}; ELODI x3 NFR {nfr:.4f} acc {acc:.4f}"
    print(msg)
    assert nfr < 0.75 * plain_scores[0], msg
    assert acc > plain_scores[1] - 0.04, msg


def test_warm_start_and_interpolation_lower_negative_flips(problem, tmp_path):
    """v2 warm-started from v1 flips less than v2 from scratch; interpolating it with v1
    (a chosen on a validation set, never the test rows) flips less again."""
    p = problem
    held_out = slice(1000, None)  # the first 1000 test rows are the validation set a is chosen on
    warm = [_new_model(p, "plain", {}, s, init=p["old"]) for s in (1, 2)]
    warm_scores = [_score(p, m, held_out) for m in warm]
    scratch = _plain(p, rows=held_out)
    nfr_w, acc_w = float(np.mean([s[0] for s in warm_scores])), float(np.mean([s[1] for s in warm_scores]))

    # interpolation through the registry and the CLI's function, on a dataset written in the contract
    from graceful_ray.data import write_dataset
    from graceful_ray.registry import Registry

    x_val, y_val = p["x_test"][:1000].numpy(), p["y_test"][:1000].numpy()
    data = str(tmp_path / "data")
    write_dataset(data, feature_tables(x_val, y_val, {"val": np.arange(len(y_val))}), name="peers",
                  num_classes=10, class_names=[str(i) for i in range(10)], feature_shape=(64,))
    reg = Registry(str(tmp_path / "registry"))
    reg.publish("m", p["old"], spec=SPEC, classes=list(range(10)))
    interp = []
    for model in warm:
        new_ref = reg.publish("m", model, spec=SPEC, classes=list(range(10)), parent="m@v1").ref
        result = interpolate(data, "m@v1", new_ref, registry_root=reg.root.uri, split="val")
        assert result.published.parent == "m@v1"
        assert result.published.extra["interpolated_from"] == {"old": "m@v1", "new": new_ref, "alpha": result.alpha}
        blend = build_model(SPEC)
        blend.load_state_dict(reg.load_state_dict(result.published.ref)[1])
        interp.append((_score(p, blend, held_out), result.alpha))
    nfr_i = float(np.mean([s[0][0] for s in interp]))
    acc_i = float(np.mean([s[0][1] for s in interp]))
    msg = (f"held-out rows: plain NFR {scratch[0]:.4f} acc {scratch[1]:.4f}; warm start NFR {nfr_w:.4f} "
           f"acc {acc_w:.4f}; interpolated (a = {[a for _, a in interp]}) NFR {nfr_i:.4f} acc {acc_i:.4f}")
    print(msg)
    assert nfr_w < 0.75 * scratch[0], msg
    assert acc_w > scratch[1] - 0.04, msg
    assert nfr_i <= nfr_w, msg
    assert acc_i > scratch[1] - 0.04, msg


def test_interpolation_refuses_other_architectures_and_the_test_split(problem, tmp_path):
    from graceful_ray.registry import Registry

    reg = Registry(str(tmp_path / "registry"))
    reg.publish("m", problem["old"], spec=SPEC, classes=list(range(10)))
    other = ModelSpec("mlp", (64,), 10, {"width": 32, "depth": 1, "embedding_dim": 32})
    reg.publish("m", build_model(other), spec=other, classes=list(range(10)))
    with pytest.raises(ConfigError, match="not 'test'"):
        interpolate("unused", "m@v1", "m@v2", registry_root=reg.root.uri, split="test")
    with pytest.raises(ConfigError, match="different architectures"):
        interpolate("unused", "m@v1", "m@v2", registry_root=reg.root.uri)


def test_interpolate_cli(problem, tmp_path, capsys):
    from graceful_ray.cli import main
    from graceful_ray.data import write_dataset
    from graceful_ray.registry import Registry

    data = str(tmp_path / "data")
    x_val, y_val = problem["x_test"][:500].numpy(), problem["y_test"][:500].numpy()
    write_dataset(data, feature_tables(x_val, y_val, {"val": np.arange(len(y_val))}), name="peers",
                  num_classes=10, class_names=[str(i) for i in range(10)], feature_shape=(64,))
    registry = str(tmp_path / "registry")
    reg = Registry(registry)
    reg.publish("m", problem["old"], spec=SPEC, classes=list(range(10)))
    reg.publish("m", _new_model(problem, "plain", {}, 1, init=problem["old"]), spec=SPEC, classes=list(range(10)))
    args = ["interpolate", "--old", "m@v1", "--new", "m@v2", "--data", data, "--registry", registry]
    assert main(args + ["--split", "test"]) == 2
    assert "not 'test'" in capsys.readouterr().err
    assert main(args + ["--grid", "0.5,0.8"]) == 0
    out = capsys.readouterr().out
    assert "| 0.8" in out and "chosen a = " in out and "published m@v3 (parent m@v1)" in out
    assert reg.get("m@v3").parent == "m@v1"
