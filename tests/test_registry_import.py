"""`registry import` / `registry export`: a model trained outside graceful-ray comes in,
is split at its head, and goes back out in the team's own format.

The team's model is ``tests/userpkg/shopnet`` (an MLP whose head is ``fc``),
imported through its factory path exactly as a user would; no Ray is needed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from torch import nn

from graceful_ray.cli import main
from graceful_ray.data import write_dataset
from graceful_ray.errors import ConfigError, ModelError
from graceful_ray.models import ModelSpec, build_model
from graceful_ray.models.wrapped import WrappedClassifier, to_registry_keys, to_user_keys
from graceful_ray.registry import Registry, load_model
from graceful_ray.registry.exporter import export_model
from graceful_ray.registry.importer import import_model, parse_classes, parse_input_shape
from tests.helpers import feature_tables

USERPKG = Path(__file__).parent / "userpkg"
FACTORY = "shopnet.model:build"


@pytest.fixture(autouse=True)
def userpkg(monkeypatch):
    monkeypatch.syspath_prepend(str(USERPKG))


def _team_model(seed: int = 0, **kwargs) -> nn.Module:
    from shopnet.model import build

    torch.manual_seed(seed)
    return build(**kwargs).eval()


def _probe(n: int = 8, d: int = 12) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(1))


def test_pt_state_dict_imports_split_at_fc(tmp_path):
    team = _team_model()
    weights = tmp_path / "v1.pt"
    torch.save(team.state_dict(), weights)
    reg_root = str(tmp_path / "reg")

    r = import_model("shop", factory=FACTORY, weights=str(weights), registry=reg_root,
                     classes="0-4", input_shape="12", head_module="fc", alias="production")

    assert r.ref == "shop@v1" and r.embedding_space == "shop@v1" and r.embedding_dim == 16
    reg = Registry(reg_root)
    manifest, model = load_model(reg, "shop@production")
    assert isinstance(model, WrappedClassifier) and isinstance(model.head, nn.Linear)
    assert manifest.method == "imported" and manifest.classes == [0, 1, 2, 3, 4]
    assert manifest.architecture["factory"] == "wrapped"
    assert manifest.architecture["kwargs"] == {"factory": FACTORY, "head_module": "fc"}
    assert set(model.state_dict()) == {"head.weight", "head.bias"} | {
        "backbone." + k for k in team.state_dict() if not k.startswith("fc.")}
    assert manifest.extra["imported"]["weights_sha256"] == __import__("hashlib").sha256(
        weights.read_bytes()).hexdigest()
    assert "model.safetensors" in manifest.files  # checksummed by the store
    x = _probe()
    with torch.no_grad():
        emb, logits = model.forward_features(x)
        # the embedding is what the team's fc consumes; the logits are the team's
        assert torch.allclose(emb, team.body(x), atol=1e-6)
        assert torch.allclose(logits, team(x), atol=1e-6)


def test_safetensors_nested_checkpoint_and_ddp_prefix_import_the_same(tmp_path):
    team = _team_model(seed=3)
    st = tmp_path / "v1.safetensors"
    safetensors.torch.save_file(team.state_dict(), str(st))
    ckpt = tmp_path / "ckpt.pth"
    torch.save({"epoch": 7, "state_dict": {f"module.{k}": v for k, v in team.state_dict().items()}}, ckpt)
    reg_root = str(tmp_path / "reg")
    a = import_model("shop", factory=FACTORY, weights=str(st), registry=reg_root,
                     classes=["0-4"], input_shape="12", head_module="fc")
    b = import_model("shop", factory=FACTORY, weights=str(ckpt), registry=reg_root,
                     classes=["0-4"], input_shape="12", head_module="fc")
    assert (a.ref, b.ref) == ("shop@v1", "shop@v2")
    assert a.embedding_space != b.embedding_space  # each import opens its own space
    reg, x = Registry(reg_root), _probe()
    with torch.no_grad():
        for ref in (a.ref, b.ref):
            assert torch.allclose(load_model(reg, ref)[1](x), team(x), atol=1e-6)


def test_weights_that_do_not_fit_are_listed_by_kind_and_nothing_is_published(tmp_path):
    state = _team_model().state_dict()
    state.pop("body.2.bias")  # missing
    state["extra.weight"] = torch.zeros(2)  # unexpected
    state["fc.weight"] = torch.zeros(5, 8)  # shape mismatch
    weights = tmp_path / "bad.pt"
    torch.save(state, weights)
    reg_root = str(tmp_path / "reg")
    with pytest.raises(ModelError) as e:
        import_model("shop", factory=FACTORY, weights=str(weights), registry=reg_root,
                     classes="0-4", input_shape="12", head_module="fc")
    lines = str(e.value).splitlines()
    assert lines[0] == "the weights do not fit shopnet.model:build():"
    assert lines[1] == "  missing keys (1): body.2.bias"
    assert lines[2] == "  unexpected keys (1): extra.weight"
    assert lines[3] == "  shape mismatches (1): fc.weight [5, 8] in the file, [5, 16] in the model"
    assert Registry(reg_root).list_models() == []


def test_a_pickled_whole_module_is_refused_without_running_its_code(tmp_path):
    weights = tmp_path / "whole.pt"
    torch.save(_team_model(), weights)  # the whole nn.Module, not its state dict
    with pytest.raises(ModelError, match=r"weights_only=True.*save the state dict"):
        import_model("shop", factory=FACTORY, weights=str(weights), registry=str(tmp_path / "reg"),
                     classes="0-4", input_shape="12", head_module="fc")


class SoftmaxAfterHead(nn.Module):
    """fc is not the last operation: splitting there would not be faithful."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(12, 6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x)).softmax(-1)


def softmax_after_head() -> nn.Module:
    return SoftmaxAfterHead()


class Unscriptable(nn.Module):
    """forward takes **kwargs, which TorchScript cannot compile: the export traces it."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(12, 8), nn.Tanh())
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor, **unused) -> torch.Tensor:
        return self.fc(self.body(x))


def unscriptable() -> nn.Module:
    return Unscriptable()


@pytest.mark.parametrize("factory, head, match", [
    (FACTORY, "body", r"'body' is a Sequential, not a torch.nn.Linear; name the linear layer inside "
                      r"it \(body.0, body.2\)"),
    (FACTORY, "classifier", r"has no module 'classifier'; its linear layers are \['body.0', 'body.2', 'fc'\]"),
    (FACTORY, "body.2", r"splitting .* at 'body.2' changes its output"),
    (f"{__name__}:softmax_after_head", "fc", r"the head is not the last operation"),
])
def test_a_head_that_cannot_be_split_there_is_refused(tmp_path, factory, head, match):
    from graceful_ray.models.wrapped import build_user_model

    torch.manual_seed(0)
    net = build_user_model(factory)
    weights = tmp_path / "w.pt"
    torch.save(net.state_dict(), weights)
    n_out = net.fc.out_features
    with pytest.raises(ModelError, match=match):
        import_model("m", factory=factory, weights=str(weights), registry=str(tmp_path / "reg"),
                     classes=f"0-{n_out - 1}", input_shape="12", head_module=head)


def test_wrong_input_shape_or_class_count_fails_on_the_forward_pass(tmp_path):
    weights = tmp_path / "v1.pt"
    torch.save(_team_model().state_dict(), weights)
    kw = dict(factory=FACTORY, weights=str(weights), registry=str(tmp_path / "reg"), head_module="fc")
    with pytest.raises(ModelError, match=r"fails on a zero input of shape \[1, 13\]"):
        import_model("shop", classes="0-4", input_shape="13", **kw)
    with pytest.raises(ModelError, match=r"returns \[1, 5\] on one input; expected \[1, 4\]"):
        import_model("shop", classes="0-3", input_shape="12", **kw)


def test_argument_parsing():
    assert parse_input_shape("3x32x32") == parse_input_shape("3,32,32") == (3, 32, 32)
    assert parse_classes(["0-2", "5,7"]) == [0, 1, 2, 5, 7]
    assert parse_classes(["sandals", "boots"], ["boots", "sandals"]) == [1, 0]
    with pytest.raises(ConfigError, match="need --evaluate"):
        parse_classes(["boots"])
    with pytest.raises(ConfigError, match="more than once"):
        parse_classes("0-3,2")
    with pytest.raises(ConfigError, match="positive integers"):
        parse_input_shape("12,a")


def test_evaluate_prints_test_accuracy_and_maps_class_names(tmp_path, capsys):
    """--evaluate DATA: accuracy on the test split, with --classes given as the
    dataset's names in the order of the team's head (not the dataset's order)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 12)).astype(np.float32)
    team = _team_model()
    with torch.no_grad():
        head_pred = team(torch.from_numpy(x)).argmax(1).numpy()
    # The dataset names its classes in another order than the team's head: head
    # output i is dataset class perm[i]. Labels = the team's predictions, except 15 rows.
    perm = np.array([2, 0, 4, 1, 3])
    names = ["c0", "c1", "c2", "c3", "c4"]
    y = perm[head_pred].copy()
    y[:15] = (y[:15] + 1) % 5
    idx = np.arange(60)
    tables = feature_tables(x, y, {"train": idx[:20], "val": idx[20:30], "test": idx[30:]})
    data = str(tmp_path / "data")
    write_dataset(data, tables, name="shop", num_classes=5, class_names=names)
    weights = tmp_path / "v1.pt"
    torch.save(team.state_dict(), weights)
    reg_root = str(tmp_path / "reg")
    rc = main(["registry", "import", "shop", "--factory", FACTORY, "--weights", str(weights),
               "--head-module", "fc", "--classes", *[names[i] for i in perm], "--evaluate", data,
               "--registry", reg_root])
    assert rc == 0
    out = capsys.readouterr().out
    expected = float((perm[head_pred[30:]] == y[30:]).mean())  # rows 30..59 are all unmodified
    assert expected == 1.0
    assert f"test accuracy on {data}: {expected:.4f}" in out
    manifest = Registry(reg_root).get("shop@v1")
    assert manifest.classes == perm.tolist()
    assert manifest.metrics["test_accuracy"] == expected
    assert manifest.architecture["input_shape"] == [12]  # taken from the dataset


def test_cli_errors_are_one_line_per_kind_without_a_traceback(tmp_path, capsys):
    weights = tmp_path / "v1.pt"
    torch.save(_team_model(hidden=64).state_dict(), weights)
    rc = main(["registry", "import", "shop", "--factory", FACTORY, "--weights", str(weights),
               "--head-module", "fc", "--classes", "0-4", "--input-shape", "12",
               "--registry", str(tmp_path / "reg")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert err.startswith("graceful-ray: error: the weights do not fit shopnet.model:build():\n"
                          "  shape mismatches (3): body.0.bias [64] in the file, [32] in the model")
    rc = main(["registry", "import", "shop", "--factory", FACTORY, "--weights", str(tmp_path / "nope.pt"),
               "--head-module", "fc", "--classes", "0-4", "--input-shape", "12",
               "--registry", str(tmp_path / "reg")])
    assert rc == 2 and capsys.readouterr().err == f"graceful-ray: error: --weights {tmp_path / 'nope.pt'}: no such file\n"


def test_export_round_trip_loads_into_the_team_factory_strictly(tmp_path, capsys):
    """The export is what plain PyTorch loads: the team's factory with strict=True, and
    torch.jit.load; both give the registry model's outputs."""
    from shopnet.model import build

    team = _team_model(seed=5, hidden=24)
    weights = tmp_path / "v1.pt"
    torch.save(team.state_dict(), weights)
    reg_root = str(tmp_path / "reg")
    import_model("shop", factory=FACTORY, weights=str(weights), registry=reg_root, classes="0-4",
                 input_shape="12", head_module="fc", model_args={"hidden": 24})
    # A version trained in graceful-ray: new weights in the registry's key names.
    _, model = load_model(reg_root, "shop@v1")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    v2 = Registry(reg_root).publish("shop", model, spec=Registry(reg_root).get("shop@v1").spec,
                                    classes=[0, 1, 2, 3, 4], parent="shop@v1",
                                    compatible_with_parent=True)
    out = tmp_path / "export"
    assert main(["registry", "export", v2.ref, "--out", str(out), "--registry", reg_root]) == 0
    printed = capsys.readouterr().out
    assert "model.torchscript.pt: scripted" in printed

    info = json.loads((out / "export.json").read_text())
    assert info["factory"] == FACTORY and info["model_args"] == {"hidden": 24}
    assert info["head_module"] == "fc" and info["torchscript"]["mode"] == "scripted"
    net = build(**info["model_args"])
    net.load_state_dict(safetensors.torch.load_file(str(out / "model.safetensors")), strict=True)
    net.eval()
    scripted = torch.jit.load(str(out / "model.torchscript.pt"))
    _, reg_model = load_model(reg_root, v2.ref)
    x = _probe(16)
    with torch.no_grad():
        expected = reg_model(x)
        assert torch.equal(net(x), expected)
        assert torch.allclose(scripted(x), expected, atol=1e-6)
        assert not torch.allclose(team(x), expected)  # it is v2, not v1 handed back
    with pytest.raises(Exception, match="already holds an export"):
        export_model(v2.ref, str(out), registry=reg_root)


def test_export_traces_a_network_that_does_not_script(tmp_path):
    factory = f"{__name__}:unscriptable"
    torch.manual_seed(0)
    net = Unscriptable().eval()
    weights = tmp_path / "w.safetensors"
    safetensors.torch.save_file(net.state_dict(), str(weights))
    reg_root = str(tmp_path / "reg")
    import_model("u", factory=factory, weights=str(weights), registry=reg_root, classes="0-4",
                 input_shape="12", head_module="fc")
    r = export_model("u@v1", str(tmp_path / "out"), registry=reg_root)
    assert r.torchscript == "traced" and "torch.jit.script failed" in r.torchscript_note
    traced = torch.jit.load(str(tmp_path / "out" / "model.torchscript.pt"))
    x = _probe()
    with torch.no_grad():
        assert torch.allclose(traced(x), net(x), atol=1e-6)


def test_zoo_model_imports_and_exports_with_its_own_keys(tmp_path):
    spec = ModelSpec("mlp", (12,), 5, {"width": 16, "depth": 1, "embedding_dim": 8})
    torch.manual_seed(0)
    model = build_model(spec).eval()
    weights = tmp_path / "m.safetensors"
    safetensors.torch.save_file(model.state_dict(), str(weights))
    reg_root = str(tmp_path / "reg")
    r = import_model("z", factory="mlp", weights=str(weights), registry=reg_root, classes="0-4",
                     input_shape="12", model_args=dict(spec.kwargs))
    assert r.embedding_dim == 8
    e = export_model(r.ref, str(tmp_path / "out"), registry=reg_root)
    assert e.torchscript in ("scripted", "traced")
    rebuilt = build_model(spec)
    rebuilt.load_state_dict(safetensors.torch.load_file(str(tmp_path / "out" / "model.safetensors")),
                            strict=True)
    x = _probe()
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), model(x))


def test_key_mapping_round_trips():
    state = _team_model().state_dict()
    mapped = to_registry_keys(state, "fc")
    assert set(mapped) == {"backbone.body.0.weight", "backbone.body.0.bias", "backbone.body.2.weight",
                           "backbone.body.2.bias", "head.weight", "head.bias"}
    assert to_user_keys(mapped, "fc").keys() == state.keys()
    assert set(to_user_keys(to_registry_keys({"classifier.1.weight": 0, "x": 1}, "classifier.1"),
                            "classifier.1")) == {"classifier.1.weight", "x"}
