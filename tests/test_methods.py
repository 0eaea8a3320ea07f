"""Training objectives: hand-computed values, gradients, composition, errors, and behaviour.

The behaviour tests train tiny MLPs for real and check the claims the methods
exist for: focal distillation lowers the negative flip rate against the old
model, and BCT puts new embeddings where the old gallery can find them.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from graceful_ray.errors import ConfigError
from graceful_ray.methods import (BCT, METHODS, Composite, FocalDistillation, MethodBatch, UpgradeContext,
                                  UpgradeMethod, bct_influence_loss, build_method, distillation_distance,
                                  extend_old_head,
                                  focal_distillation_loss, focal_weights, kl_divergence_loss,
                                  l2_embedding_loss, logit_difference_inhibition_loss, logit_matching_loss,
                                  register_method, valid_hyperparameters)
from graceful_ray.models import ModelSpec, build_model

MLP = {"width": 64, "depth": 1, "embedding_dim": 32}


def _ctx(k: int = 3, d: int = 4, old_classes: list[int] | None = None, d_new: int | None = None,
         seed: int = 0) -> UpgradeContext:
    g = torch.Generator().manual_seed(seed)
    old_classes = list(range(k)) if old_classes is None else old_classes
    ko = len(old_classes)
    return UpgradeContext(
        num_classes=k, old_classes=old_classes, old_head_weight=torch.randn(ko, d, generator=g),
        old_head_bias=torch.randn(ko, generator=g), old_embedding_dim=d,
        new_embedding_dim=d if d_new is None else d_new,
        old_class_means={c: torch.randn(d, generator=g) for c in range(k)})


def _batch(b: int = 5, k: int = 3, d: int = 4, ko: int | None = None, seed: int = 1,
           grad: bool = False) -> MethodBatch:
    g = torch.Generator().manual_seed(seed)
    ko = k if ko is None else ko
    return MethodBatch(
        y=torch.randint(0, k, (b,), generator=g),
        new_embedding=torch.randn(b, d, generator=g).requires_grad_(grad),
        new_logits=torch.randn(b, k, generator=g).requires_grad_(grad),
        old_embedding=torch.randn(b, d, generator=g), old_logits=torch.randn(b, ko, generator=g),
        old_correct=torch.rand(b, generator=g) > 0.5)


# --------------------------------------------------------------------------------------------
# Pure functions against hand-computed values
# --------------------------------------------------------------------------------------------

def test_focal_weights_are_alpha_plus_beta_on_old_correct():
    w = focal_weights(torch.tensor([True, False, True]), alpha=1.0, beta=5.0)
    assert w.tolist() == [6.0, 1.0, 6.0]
    assert w.dtype == torch.float32


def test_kl_divergence_with_temperature_by_hand():
    t = 2.0
    new = torch.tensor([[0.0, 0.0]])
    old = torch.tensor([[2.0, 0.0]])  # old / T = [1, 0]
    p = [math.e / (math.e + 1), 1 / (math.e + 1)]
    expected = t * t * sum(pi * math.log(pi / 0.5) for pi in p)
    got = kl_divergence_loss(new, old, t)
    assert got.shape == (1,)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # identical distributions -> 0; the KL is not symmetric in its arguments
    assert kl_divergence_loss(old, old, t).item() == pytest.approx(0.0, abs=1e-6)
    assert kl_divergence_loss(old, new, t).item() != pytest.approx(expected, rel=1e-3)


def test_high_temperature_kl_approaches_centered_logit_matching_over_k():
    # T^2 KL -> (1 / 2K) * ||(d - mean d)||^2 for large T: why the paper needs T = 100.
    new = torch.tensor([[1.0, -2.0, 0.5, 3.0]], dtype=torch.float64)  # float64: KL ~ 1e-6 at T = 1000
    old = torch.tensor([[0.0, 1.0, 2.0, -1.0]], dtype=torch.float64)
    d = new - old
    approx = 0.5 * ((d - d.mean()) ** 2).sum().item() / 4
    assert kl_divergence_loss(new, old, 1000.0).item() == pytest.approx(approx, rel=1e-2)


def test_logit_matching_by_hand():
    got = logit_matching_loss(torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]),
                              torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]]))
    assert got.tolist() == [6.5, 1.0]


def test_standardized_logit_matching_by_hand_and_scale_free():
    new = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
    old = torch.tensor([[3.0, 2.0, 1.0]], dtype=torch.float64)
    z = (new - 2.0) / math.sqrt(2.0 / 3.0)  # population std of (1, 2, 3)
    expected = 0.5 * ((z - (-z)) ** 2).sum().item()
    got = distillation_distance(new, old, kind="lm-std")
    assert got.item() == pytest.approx(expected, rel=1e-5)  # eps in the denominator
    # shift and positive scale of either side change nothing; raw logit matching does change
    assert distillation_distance(5 * new + 7, 0.1 * old - 3, kind="lm-std").item() == pytest.approx(expected, rel=1e-4)
    assert distillation_distance(new, 3 * new - 1, kind="lm-std").item() == pytest.approx(0.0, abs=1e-9)
    assert logit_matching_loss(new, 3 * new - 1).item() > 1.0
    # bounded by 2K, so one lambda fits any old model's logit scale
    assert distillation_distance(1e4 * new, -1e4 * new, kind="lm-std").item() == pytest.approx(2 * 3, rel=1e-5)


def test_standardized_logit_matching_needs_two_shared_classes():
    m = build_method("fd", fd_kind="lm-std")
    with pytest.raises(ConfigError, match="share only 1"):
        m.setup(UpgradeContext(num_classes=3, old_classes=[0, 7], new_embedding_dim=4))


def test_focal_distillation_loss_by_hand():
    new = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    old = torch.tensor([[1.0, 0.0, 0.0], [2.0, 0.0, 0.0]])
    correct = torch.tensor([True, False])
    # D = [6.5, 2.0]; weights = [6, 1] -> (39 + 2) / 2
    assert focal_distillation_loss(new, old, correct, alpha=1, beta=5, kind="lm").item() == 20.5
    # beta = 0 is plain distillation: the plain mean of D
    assert focal_distillation_loss(new, old, correct, alpha=1, beta=0, kind="lm").item() == 4.25
    kl = focal_distillation_loss(new, old, correct, alpha=1, beta=5, kind="kl", temperature=3.0)
    per = kl_divergence_loss(new, old, 3.0)
    assert kl.item() == pytest.approx((6 * per[0] + per[1]).item() / 2, rel=1e-6)
    with pytest.raises(ConfigError, match="kind"):
        focal_distillation_loss(new, old, correct, kind="l1")
    with pytest.raises(ConfigError, match="aligned"):
        focal_distillation_loss(new, old[:, :2], correct)


def test_extend_old_head_reorders_and_synthesizes_unseen_rows():
    # old head output 0 is global class 2, output 1 is class 0; class 1 was never seen.
    w_old = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b_old = torch.tensor([0.5, -0.5])
    means = {1: torch.tensor([1.0, 1.0]), 0: torch.tensor([9.0, 9.0])}  # class 0's mean is unused
    w, b = extend_old_head(w_old, b_old, [2, 0], 3, means)
    assert w.tolist() == [[0.0, 1.0], [1.0, 1.0], [1.0, 0.0]]
    assert b.tolist() == [-0.5, 0.0, 0.5]
    # logits for embedding [1, 0]: [-0.5, 1, 1.5]; label 1 (the synthesized class)
    loss = bct_influence_loss(torch.tensor([[1.0, 0.0]]), w, b, torch.tensor([1]))
    expected = -1.0 + math.log(math.exp(-0.5) + math.exp(1.0) + math.exp(1.5))
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_extend_old_head_drops_removed_classes_and_requires_means():
    w_old, b_old = torch.eye(3), torch.zeros(3)
    w, _ = extend_old_head(w_old, b_old, [0, 1, 5], 2, None)  # class 5 no longer exists
    assert w.tolist() == [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    w, _ = extend_old_head(w_old, b_old, [1, -1, 0], 2, None)  # -1: dropped, as the trainer marks it
    assert w.tolist() == [[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]
    with pytest.raises(ConfigError, match=r"mean old embedding.*classes \[3\]"):
        extend_old_head(w_old, b_old, [0, 1, 2], 4, None)
    with pytest.raises(ConfigError, match="has 2 values"):
        extend_old_head(w_old, b_old, [0, 1, 2], 4, {3: torch.zeros(2)})


def test_logit_difference_inhibition_by_hand():
    got = logit_difference_inhibition_loss(torch.tensor([[0.0, 1.0, 3.0], [0.0, -1.5, 0.2]]),
                                           torch.zeros(2, 3), xi=0.5, p=2)
    # max(|diff| - xi, 0): [0, .5, 2.5] -> squares [0, .25, 6.25], mean 6.5 / 3; [0, 1, 0] -> 1 / 3
    assert got.tolist() == pytest.approx([6.5 / 3, 1 / 3])
    assert logit_difference_inhibition_loss(torch.tensor([[2.0]]), torch.zeros(1, 1), 0.5, 1).item() == 1.5


def test_l2_embedding_loss_by_hand():
    assert l2_embedding_loss(torch.tensor([[1.0, 2.0]]), torch.zeros(1, 2)).tolist() == [5.0]


# --------------------------------------------------------------------------------------------
# Adapters: shared classes, composition, gradients
# --------------------------------------------------------------------------------------------

def test_plain_is_cross_entropy_only():
    batch = _batch()
    out = build_method("plain").loss(batch)
    assert set(out.parts) == {"ce"}
    assert out.total.item() == pytest.approx(F.cross_entropy(batch.new_logits, batch.y).item())
    # plain needs no old model at all
    m = build_method("plain")
    m.setup(UpgradeContext(num_classes=3, new_embedding_dim=4))
    assert not m.needs_old_outputs and not m.needs_old_model and not m.compatible


def test_fd_distills_only_shared_classes():
    # old head knows global classes [3, 1, 7]; the new model has classes 0..4 (class 7 was dropped)
    ctx = _ctx(k=5, old_classes=[3, 1, 7])
    batch = _batch(k=5, ko=3)
    m = build_method("fd", fd_kind="lm")
    m.setup(ctx)
    out = m.loss(batch)
    new_shared = batch.new_logits[:, [3, 1]]
    old_shared = batch.old_logits[:, [0, 1]]
    expected = focal_distillation_loss(new_shared, old_shared, batch.old_correct, alpha=1, beta=5)
    assert out.parts["fd"].item() == pytest.approx(expected.item(), rel=1e-6)
    # -1 marks a dropped class the same way
    m2 = build_method("fd", fd_kind="lm")
    m2.setup(_ctx(k=5, old_classes=[3, 1, -1]))
    assert m2.loss(batch).parts["fd"].item() == pytest.approx(expected.item(), rel=1e-6)
    # no shared class at all -> nothing to distill, said clearly
    with pytest.raises(ConfigError, match="share no class"):
        build_method("fd").setup(_ctx(k=3, old_classes=[7, 8]))


def test_old_logits_width_must_match_old_classes():
    m = build_method("fd")
    m.setup(_ctx(k=3))
    with pytest.raises(ConfigError, match="old logits have 2 columns"):
        m.loss(_batch(k=3, ko=2))
    with pytest.raises(ConfigError, match="new logits have 4 columns"):
        m.loss(_batch(k=4, ko=3))


def test_variants_agree_with_the_general_method():
    ctx, batch = _ctx(), _batch()

    def fd_term(spec, **hp):
        m = build_method(spec, **hp)
        m.setup(ctx)
        return m.extra_loss(batch)

    assert fd_term("fd-kl", fd_temperature=4.0)["fd"].item() == pytest.approx(
        fd_term("fd", fd_kind="kl", fd_temperature=4.0)["fd"].item())
    assert fd_term("fd-lm")["fd"].item() == pytest.approx(fd_term("fd", fd_kind="lm")["fd"].item())
    assert fd_term("kd")["kd"].item() == pytest.approx(fd_term("fd", fd_beta=0.0)["fd"].item())
    # kd needs no old_correct, fd does
    no_correct = MethodBatch(batch.y, batch.new_embedding, batch.new_logits, batch.old_embedding,
                             batch.old_logits, None)
    kd = build_method("kd")
    kd.setup(ctx)
    kd.loss(no_correct)
    fd = build_method("fd")
    fd.setup(ctx)
    with pytest.raises(ConfigError, match="old_correct"):
        fd.loss(no_correct)


def test_bct_plus_fd_counts_cross_entropy_once():
    ctx, batch = _ctx(), _batch()
    method = build_method("bct+fd", bct_lambda=0.5, fd_lambda=2.0, fd_beta=3.0)
    method.setup(ctx)
    out = method.loss(batch)
    assert set(out.parts) == {"ce", "bct", "fd"}

    ce = F.cross_entropy(batch.new_logits, batch.y)
    w, b = extend_old_head(ctx.old_head_weight, ctx.old_head_bias, ctx.old_classes, 3, ctx.old_class_means)
    bct_term = 0.5 * bct_influence_loss(batch.new_embedding, w, b, batch.y)
    fd_term = 2.0 * focal_distillation_loss(batch.new_logits, batch.old_logits, batch.old_correct,
                                            alpha=1.0, beta=3.0, kind="lm")
    assert out.parts["ce"].item() == pytest.approx(ce.item(), rel=1e-6)
    assert out.parts["bct"].item() == pytest.approx(bct_term.item(), rel=1e-6)
    assert out.parts["fd"].item() == pytest.approx(fd_term.item(), rel=1e-6)
    assert out.total.item() == pytest.approx((ce + bct_term + fd_term).item(), rel=1e-6)
    assert out.total.item() == pytest.approx(sum(p.item() for p in out.parts.values()), rel=1e-6)

    # the two methods' own losses each include CE; the composite must not add it twice
    singles = []
    for spec, hp in (("bct", {"bct_lambda": 0.5}), ("fd", {"fd_lambda": 2.0, "fd_beta": 3.0})):
        m = build_method(spec, **hp)
        m.setup(ctx)
        singles.append(m.loss(batch).total)
    assert out.total.item() == pytest.approx((singles[0] + singles[1] - ce).item(), rel=1e-6)

    assert method.name == "bct+fd" and isinstance(method, Composite)
    assert method.compatible and method.needs_old_outputs and method.needs_old_model


def test_gradients_reach_only_the_new_model():
    torch.manual_seed(0)
    old = build_model(ModelSpec("mlp", (8,), 3, {"width": 16, "depth": 1, "embedding_dim": 6}))
    new = build_model(ModelSpec("mlp", (8,), 4, {"width": 16, "depth": 1, "embedding_dim": 6}))
    x, y = torch.randn(10, 8), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 0, 1])
    old_emb, old_logits = old.forward_features(x)  # online old model, graph attached on purpose
    with torch.no_grad():
        means = {3: old.embed(x[y == 3]).mean(0)}
    ctx = UpgradeContext(num_classes=4, old_classes=[0, 1, 2], old_head_weight=old.head.weight,
                         old_head_bias=old.head.bias, old_embedding_dim=6, new_embedding_dim=6,
                         old_class_means=means)
    method = build_method("bct+fd+l2+elodi+kd")
    method.setup(ctx)
    new_emb, new_logits = new.forward_features(x)
    out = method.loss(MethodBatch(y, new_emb, new_logits, old_emb, old_logits,
                                  old_logits.argmax(1) == y))
    assert set(out.parts) == {"ce", "bct", "fd", "l2", "elodi", "kd"}
    assert all(p.item() > 0 for p in out.parts.values())
    out.total.backward()
    assert all(p.grad is None for p in old.parameters()), "the old model must stay frozen"
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in new.parameters())
    bct = method.methods[0]
    assert not bct.weight_ext.requires_grad and not bct.bias_ext.requires_grad
    # each term on its own also sends gradient into the new backbone (not only the head)
    for name in ("bct", "fd", "l2", "elodi"):
        new.zero_grad()
        emb, logits = new.forward_features(x)
        part = method.loss(MethodBatch(y, emb, logits, old_emb, old_logits,
                                       old_logits.argmax(1) == y)).parts[name]
        part.backward()
        assert new.backbone[-1].weight.grad.abs().sum() > 0, name


def test_loss_under_bf16_autocast_is_float32_and_finite():
    ctx, batch = _ctx(), _batch()
    method = build_method("bct+fd-kl+elodi")
    method.setup(ctx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        batch16 = MethodBatch(batch.y, batch.new_embedding.bfloat16(), batch.new_logits.bfloat16(),
                              batch.old_embedding.bfloat16(), batch.old_logits.bfloat16(), batch.old_correct)
        out = method.loss(batch16)
    assert torch.isfinite(out.total) and out.total.dtype == torch.float32


def test_a_set_up_method_survives_pickling():
    # Ray ships objects to workers by pickling; a set-up method must arrive intact.
    import pickle

    ctx, batch = _ctx(k=5, old_classes=[3, 1, 7]), _batch(k=5, ko=3)
    method = build_method("bct+fd+elodi")
    method.setup(ctx)
    clone = pickle.loads(pickle.dumps(method))
    assert clone.loss(batch).total.item() == pytest.approx(method.loss(batch).total.item())
    assert clone.hyperparameters() == method.hyperparameters()


def test_to_moves_precomputed_tensors():
    method = build_method("bct+fd")
    method.setup(_ctx())
    assert method.to("meta") is method
    assert method.methods[0].weight_ext.device.type == "meta"
    assert method.methods[1]._new_col.device.type == "meta"


# --------------------------------------------------------------------------------------------
# Registry, hyperparameters and errors
# --------------------------------------------------------------------------------------------

def test_registry_names_flags_and_hyperparameters():
    assert {"plain", "bct", "l2", "fd", "fd-kl", "fd-lm", "kd", "elodi"} <= set(METHODS)
    flags = {n: build_method(n).compatible for n in ("plain", "bct", "l2", "fd", "kd", "elodi")}
    assert flags == {"plain": False, "bct": True, "l2": True, "fd": False, "kd": False, "elodi": False}
    assert not build_method("bct").needs_old_outputs and build_method("bct").needs_old_model
    assert build_method("fd").needs_old_outputs

    m = build_method("fd", fd_beta=3)
    assert m.hyperparameters() == {"fd_kind": "lm", "fd_alpha": 1.0, "fd_beta": 3.0, "fd_lambda": 1.0,
                                   "fd_temperature": 100.0}
    assert build_method("elodi").hyperparameters() == {"elodi_lambda": 1.0, "elodi_xi": 0.5, "elodi_p": 2.0,
                                                 "elodi_refs": ""}
    hp = build_method(" BCT + fd-kl ", bct_lambda=np.float64(0.3), fd_temperature=50).hyperparameters()
    assert hp == {"bct_lambda": 0.3, "bct_kind": "auto", "bct_scale": 16.0, "fd_alpha": 1.0, "fd_beta": 5.0, "fd_lambda": 1.0, "fd_temperature": 50.0}
    json.dumps(hp)  # recorded in the registry manifest
    assert build_method("bct+fd-kl", **hp).hyperparameters() == hp  # round trip
    assert valid_hyperparameters("fd-lm") == ["fd_alpha", "fd_beta", "fd_lambda"]


def test_unknown_names_and_hyperparameters_list_the_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown method 'bcd'.*'bct'.*'fd'"):
        build_method("bcd")
    with pytest.raises(ConfigError, match="empty method spec"):
        build_method("")
    with pytest.raises(ConfigError, match=r"unknown hyperparameter\(s\) \['fd_lambda'\].*\['bct_kind', 'bct_lambda', 'bct_scale'\]"):
        build_method("bct", fd_lambda=1.0)
    with pytest.raises(ConfigError, match=r"\['lambda'\].*'fd_alpha'"):
        build_method("fd", **{"lambda": 1.0})
    with pytest.raises(ConfigError, match="unknown hyperparameter"):
        build_method("fd-lm", fd_temperature=2.0)  # logit matching has no temperature
    with pytest.raises(ConfigError, match="twice"):
        build_method("bct+bct")
    with pytest.raises(ConfigError, match="same method"):
        build_method("fd-kl+fd-lm")


def test_bad_hyperparameter_values_are_refused():
    with pytest.raises(ConfigError, match="bct_lambda must be >= 0"):
        build_method("bct", bct_lambda=-1)
    with pytest.raises(ConfigError, match="fd_kind must be one of"):
        build_method("fd", fd_kind="l1")
    with pytest.raises(ConfigError, match="fd_temperature must be > 0"):
        build_method("fd-kl", fd_temperature=0)
    with pytest.raises(ConfigError, match="elodi_p must be > 0"):
        build_method("elodi", elodi_p=0)
    with pytest.raises(ConfigError, match="invalid hyperparameters for method 'bct'"):
        build_method("bct", bct_lambda="a lot")


def test_bct_with_mismatched_embedding_dims_says_what_to_do():
    with pytest.raises(ConfigError) as e:
        build_method("bct").setup(_ctx(d=4, d_new=8))
    msg = str(e.value)
    assert "embedding_dim=8" in msg and "set the new model's embedding_dim to 4" in msg.lower()
    assert "'fd'" in msg
    with pytest.raises(ConfigError, match="embedding_dim=4"):
        build_method("l2").setup(_ctx(d=8, d_new=4))
    build_method("fd").setup(_ctx(d=4, d_new=8))  # logit distillation does not care about dims


def test_methods_that_need_an_old_model_say_so():
    first = UpgradeContext(num_classes=3, new_embedding_dim=4)
    for spec in ("bct", "l2", "fd", "kd", "elodi", "plain+fd"):
        with pytest.raises(ConfigError, match="needs an old model.*'plain'"):
            build_method(spec).setup(first)
    with pytest.raises(ConfigError, match="call setup"):
        build_method("fd").loss(_batch())
    m = build_method("l2")
    m.setup(_ctx())
    b = _batch()
    with pytest.raises(ConfigError, match="old_embedding"):
        m.loss(MethodBatch(b.y, b.new_embedding, b.new_logits))
    with pytest.raises(ConfigError, match="labels"):
        m.loss(MethodBatch(b.y[:2], b.new_embedding, b.new_logits, b.old_embedding))


def test_a_new_method_is_one_registered_class():
    @register_method("test-logit-norm")
    class LogitNorm(UpgradeMethod):
        name = "test-logit-norm"
        prefix = "lognorm"

        def __init__(self, *, lam: float = 0.1) -> None:
            super().__init__()
            self.lam = float(lam)

        def extra_loss(self, batch):
            return {"lognorm": self.lam * batch.new_logits.pow(2).mean()}

    try:
        ctx, batch = _ctx(), _batch()
        m = build_method("test-logit-norm+fd", lognorm_lambda=0.5)
        m.setup(ctx)
        out = m.loss(batch)
        assert set(out.parts) == {"ce", "lognorm", "fd"}
        assert out.parts["lognorm"].item() == pytest.approx(0.5 * batch.new_logits.pow(2).mean().item())
        with pytest.raises(ConfigError, match="already registered"):
            register_method("bct")(LogitNorm)
    finally:
        METHODS.pop("test-logit-norm", None)


# --------------------------------------------------------------------------------------------
# Behaviour: the methods do what the papers say, on real (tiny) training runs
# --------------------------------------------------------------------------------------------

def _train(model, x, y, method, seed: int, epochs: int, old=None, lr: float = 3e-3):
    """Minibatch Adam with ``method`` as the objective; ``old`` = (emb, logits, correct) per sample."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(64):
            emb, logits = model.forward_features(x[idx])
            batch = MethodBatch(y[idx], emb, logits, *((o[idx] for o in old) if old else ()))
            loss = method.loss(batch).total
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    return model


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("hp", [{"fd_kind": "lm", "fd_alpha": 1, "fd_beta": 5, "fd_lambda": 1},
                                {"fd_kind": "lm-std", "fd_alpha": 1, "fd_beta": 5, "fd_lambda": 0.3}],
                         ids=["lm", "lm-std"])
def test_focal_distillation_lowers_negative_flips(one_thread, hp):
    """Old MLP on 1500 samples; new MLPs (other seeds) on 2000: plain vs FD-LM (1, 5, 1).

    A noisy 10-class problem (5% label noise, overlapping clusters) so both
    models make hundreds of errors on 4000 held-out samples and NFR is measured
    on large counts. Numbers seen (torch 2.13 CPU, mean of 2 seeds): old accuracy
    0.770; plain NFR 5.67% at accuracy 0.795; FD-LM NFR 2.64% at accuracy 0.780;
    FD on standardized logits (lm-std, lambda 0.3) NFR 2.29% at accuracy 0.795.
    """
    from sklearn.datasets import make_classification

    x, y = make_classification(n_samples=6000, n_features=64, n_informative=16, n_redundant=0,
                               n_classes=10, n_clusters_per_class=1, class_sep=1.5, flip_y=0.05,
                               random_state=0)
    x, y = torch.tensor(x, dtype=torch.float32), torch.tensor(y)
    x_test, y_test, x_pool, y_pool = x[:4000], y[:4000], x[4000:], y[4000:]
    spec = ModelSpec("mlp", (64,), 10, MLP)
    epochs = 15

    torch.manual_seed(0)
    old = _train(build_model(spec), x_pool[:1500], y_pool[:1500], build_method("plain"), 0, epochs)
    with torch.no_grad():
        old_emb, old_logits = old.forward_features(x_pool)
        old_right_test = old(x_test).argmax(1) == y_test
    old_cache = (old_emb, old_logits, old_logits.argmax(1) == y_pool)
    ctx = UpgradeContext(num_classes=10, old_classes=list(range(10)), old_head_weight=old.head.weight.detach(),
                         old_head_bias=old.head.bias.detach(), old_embedding_dim=32, new_embedding_dim=32)

    results: dict[str, tuple[float, float]] = {}
    for spec_name, hp in (("plain", {}), ("fd", hp)):
        nfr, acc = [], []
        for seed in (1, 2):
            method = build_method(spec_name, **hp)
            method.setup(ctx)
            torch.manual_seed(seed)
            new = _train(build_model(spec), x_pool, y_pool, method, seed, epochs, old_cache)
            with torch.no_grad():
                new_right = new(x_test).argmax(1) == y_test
            nfr.append((old_right_test & ~new_right).float().mean().item())
            acc.append(new_right.float().mean().item())
        results[spec_name] = (float(np.mean(nfr)), float(np.mean(acc)))

    old_acc = old_right_test.float().mean().item()
    (nfr_plain, acc_plain), (nfr_fd, acc_fd) = results["plain"], results["fd"]
    msg = f"old acc {old_acc:.4f}; plain NFR {nfr_plain:.4f} acc {acc_plain:.4f}; fd NFR {nfr_fd:.4f} acc {acc_fd:.4f}"
    print(msg)  # visible with -s
    assert nfr_plain > 0.03, msg  # the untreated upgrade really regresses
    assert nfr_fd < 0.75 * nfr_plain, msg  # at least 25% fewer negative flips
    assert acc_fd > acc_plain - 0.04, msg  # at a cost of a few points at most
    assert acc_fd > old_acc - 0.01, msg  # and still no worse than the model it replaces


def _digits_split():
    """scikit-learn's digits, shuffled once: 500 test rows and the rest to train on."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return x[:500], y[:500], x[500:], y[500:]


def _old_model_on_first_classes(x_pool, y_pool, x_test, n_old: int, seed: int, epochs: int):
    """An old MLP trained on the classes below ``n_old``: its gallery (the test rows'
    embeddings) and the context BCT needs (class means for every class)."""
    seen = y_pool < n_old
    torch.manual_seed(seed)
    old = _train(build_model(ModelSpec("mlp", (64,), n_old, MLP)), x_pool[seen], y_pool[seen],
                 build_method("plain"), seed, epochs)
    with torch.no_grad():
        old_emb = old.embed(x_pool)
        gallery = old.embed(x_test).numpy()
    ctx = UpgradeContext(num_classes=10, old_classes=list(range(n_old)), old_head_weight=old.head.weight.detach(),
                         old_head_bias=old.head.bias.detach(), old_embedding_dim=32, new_embedding_dim=32,
                         old_class_means={c: old_emb[y_pool == c].mean(0) for c in range(10)})
    return gallery, ctx


def test_bct_makes_new_queries_searchable_against_the_old_gallery(one_thread):
    """Old MLP sees digits 0-7 only; new MLPs see 0-9. Search: new queries vs old gallery.

    Plain training lands in an unrelated space (near-chance cross-model top-1);
    BCT, with synthesized old-head rows for 8 and 9, lands in the old space.
    Numbers seen: old/old top-1 0.92; new/old plain 0.05, BCT 0.82.
    """
    x_test, y_test, x_pool, y_pool = _digits_split()
    epochs = 20
    gallery, ctx = _old_model_on_first_classes(x_pool, y_pool, x_test, 8, 0, epochs)

    def top1(queries: np.ndarray, gallery: np.ndarray, labels: np.ndarray) -> float:
        """Cosine nearest neighbour, leave-one-out: hit when the neighbour shares the label."""
        q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
        g = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
        sim = q @ g.T
        np.fill_diagonal(sim, -np.inf)
        return float((labels[sim.argmax(1)] == labels).mean())

    labels = y_test.numpy()
    old_old = top1(gallery, gallery, labels)
    scores = {}
    for name in ("plain", "bct"):
        method = build_method(name)
        method.setup(ctx)
        torch.manual_seed(1)
        new = _train(build_model(ModelSpec("mlp", (64,), 10, MLP)), x_pool, y_pool, method, 1, epochs)
        with torch.no_grad():
            queries = new.embed(x_test).numpy()
            acc = (new(x_test).argmax(1) == y_test).float().mean().item()
        scores[name] = (top1(queries, gallery, labels), top1(queries, queries, labels), acc)

    msg = f"old/old {old_old:.3f}; (new/old, new/new, acc): {scores}"
    print(msg)  # visible with -s
    assert scores["plain"][0] < 0.3, msg  # unaligned spaces: close to chance (0.1)
    assert scores["bct"][0] > 0.7, msg
    assert scores["bct"][0] > scores["plain"][0] + 0.4, msg
    assert scores["bct"][2] > scores["plain"][2] - 0.03, msg  # compatibility costs little accuracy
    assert scores["bct"][1] > 0.9, msg  # and the new space is still good on its own


def test_cosine_bct_meets_the_compatibility_criterion_when_classes_are_added(one_thread):
    """Old MLP sees digits 0-4; new MLPs see 0-9. Criterion: M(new, old) > M(old, old).

    The old model files digits 5-9 inside the cones of 0-4, so a class-mean row
    with bias 0 only wins the *linear* old head far from those samples: linear BCT
    pushes new-class queries away from their old gallery neighbours and misses the
    criterion. The cosine influence loss (``bct_kind="cosine"``) constrains the
    geometry retrieval uses and meets it. Numbers seen (seeds 0, 1), top-1 overall
    and on digits 5-9: old/old 0.732, 0.756 (new classes 0.502, 0.573); linear new/old
    0.524, 0.626 (0.154, 0.361); cosine new/old 0.838, 0.776 (0.793, 0.714).
    """
    x_test, y_test, x_pool, y_pool = _digits_split()
    labels = y_test.numpy()
    added = labels >= 5

    def top1(queries: np.ndarray, gallery: np.ndarray) -> np.ndarray:
        """Per-query hit of the cosine nearest neighbour, leave-one-out."""
        q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
        g = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
        sim = q @ g.T
        np.fill_diagonal(sim, -np.inf)
        return labels[sim.argmax(1)] == labels

    hits: dict[str, list[np.ndarray]] = {"old/old": [], "linear": [], "cosine": []}
    for seed in (0, 1):
        gallery, ctx = _old_model_on_first_classes(x_pool, y_pool, x_test, 5, seed, 20)
        hits["old/old"].append(top1(gallery, gallery))
        for kind in ("linear", "cosine"):
            method = build_method("bct", bct_kind=kind)
            method.setup(ctx)
            torch.manual_seed(100 + seed)
            new = _train(build_model(ModelSpec("mlp", (64,), 10, MLP)), x_pool, y_pool, method, 100 + seed, 20)
            with torch.no_grad():
                hits[kind].append(top1(new.embed(x_test).numpy(), gallery))

    overall = {k: float(np.mean([h.mean() for h in v])) for k, v in hits.items()}
    on_added = {k: float(np.mean([h[added].mean() for h in v])) for k, v in hits.items()}
    msg = f"top-1 overall {overall}; on the added classes {on_added}"
    print(msg)  # visible with -s
    assert overall["cosine"] > overall["old/old"] + 0.02, msg  # the criterion, with a margin
    assert on_added["cosine"] > on_added["linear"] + 0.2, msg  # because of the added classes


def test_cosine_influence_loss_by_hand_and_blind_to_the_embedding_norm():
    g = torch.Generator().manual_seed(0)
    z, w, b = torch.randn(6, 4, generator=g), torch.randn(3, 4, generator=g), torch.randn(3, generator=g)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    cos = (z / z.norm(dim=1, keepdim=True)) @ (w / w.norm(dim=1, keepdim=True)).T
    expected = torch.nn.functional.cross_entropy(8.0 * cos, y)  # the bias plays no part
    got = bct_influence_loss(z, w, b, y, kind="cosine", scale=8.0)
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.allclose(bct_influence_loss(5 * z, w, b, y, kind="cosine", scale=8.0), got, atol=1e-6)
    assert not torch.allclose(bct_influence_loss(5 * z, w, b, y), bct_influence_loss(z, w, b, y))
    with pytest.raises(ConfigError, match="bct_kind must be one of"):
        build_method("bct", bct_kind="cos")
    with pytest.raises(ConfigError, match="bct_scale must be > 0"):
        build_method("bct", bct_kind="cosine", bct_scale=0)


def test_bct_kind_auto_picks_cosine_when_classes_are_added():
    same = build_method("bct")
    same.setup(_ctx(k=3))
    assert same.hyperparameters()["bct_kind"] == "linear"  # the paper's form when no class is new
    added = build_method("bct")
    added.setup(_ctx(k=4, old_classes=[0, 1, 2]))
    assert added.hyperparameters()["bct_kind"] == "cosine"  # what meets the criterion when classes are added
    dropped_only = build_method("bct")
    dropped_only.setup(_ctx(k=2, old_classes=[0, 1, -1]))
    assert dropped_only.hyperparameters()["bct_kind"] == "linear"
    forced = build_method("bct", bct_kind="linear")
    forced.setup(_ctx(k=4, old_classes=[0, 1, 2]))
    assert forced.hyperparameters()["bct_kind"] == "linear"  # an explicit kind is kept
    batch = _batch(k=4)
    w, b = extend_old_head(*(lambda c: (c.old_head_weight, c.old_head_bias, c.old_classes, 4, c.old_class_means))(
        _ctx(k=4, old_classes=[0, 1, 2])))
    expected = bct_influence_loss(batch.new_embedding, w, b, batch.y, kind="cosine")
    assert added.loss(batch).parts["bct"].item() == pytest.approx(expected.item(), rel=1e-6)
