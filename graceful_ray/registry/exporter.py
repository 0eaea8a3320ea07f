"""`registry export`: a version as the team's own stack loads it.

Writes, into ``--out``:

* ``model.safetensors``: the state dict in the team's own key names. For a
  model imported or trained as ``wrapped`` the head is put back where it came
  from (``head.weight`` -> ``fc.weight``, ``backbone.k`` -> ``k``), so
  ``build(**model_args).load_state_dict(..., strict=True)`` takes it; for a zoo
  or ``EmbeddingClassifier`` model the keys are graceful-ray's own, which its
  factory loads the same way.
* ``model.torchscript.pt``: the same network as TorchScript, from
  ``torch.jit.script`` when the network scripts, else ``torch.jit.trace`` on a
  zero input (a trace records one path through the code; a network with
  data-dependent control flow is then only right for inputs like the example),
  and none when neither works (the reason is recorded).
* ``export.json``: where it came from, how to rebuild it (factory, arguments,
  input shape), the class id of each output, the sha256 of each file, and
  which TorchScript mode was used.

Both files are checked before anything is written: the rebuilt network and the
TorchScript module must give the registry model's outputs on a probe batch.
"""

from __future__ import annotations

import hashlib
import io
import json
import warnings
from dataclasses import dataclass
from typing import Any

import safetensors.torch
import torch
from torch import nn

from graceful_ray.errors import ModelError, RegistryError
from graceful_ray.models.factory import ModelSpec, build_model
from graceful_ray.models.wrapped import build_user_model, to_user_keys
from graceful_ray.registry import Registry, load_model
from graceful_ray.storage import resolve

WEIGHTS = "model.safetensors"
TORCHSCRIPT = "model.torchscript.pt"
EXPORT_JSON = "export.json"


@dataclass(frozen=True)
class ExportResult:
    ref: str
    out: str
    files: dict[str, str]  # name -> sha256
    torchscript: str | None  # "scripted", "traced" or None
    torchscript_note: str | None
    factory: str
    model_args: dict[str, Any]


def rebuild_user_model(manifest) -> tuple[nn.Module, dict[str, torch.Tensor], str, dict[str, Any]]:
    """(empty network of the team's factory, how its keys are mapped, factory, its kwargs)."""
    spec: ModelSpec = manifest.spec
    if spec.factory == "wrapped":
        kwargs = dict(spec.kwargs)
        factory, head = kwargs.pop("factory"), kwargs.pop("head_module", "fc")
        return build_user_model(factory, kwargs), {"head_module": head}, factory, kwargs
    return build_model(spec), {}, spec.factory, dict(spec.kwargs)


def _script_or_trace(net: nn.Module, example: torch.Tensor) -> tuple[Any, str | None, str | None]:
    try:
        return torch.jit.script(net), "scripted", None
    except Exception as e:  # noqa: BLE001 - TorchScript raises many kinds of errors
        script_error = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings about shape checks
            return (torch.jit.trace(net, example, check_trace=False), "traced",
                    f"torch.jit.script failed ({script_error}); traced on a zero input of shape "
                    f"{list(example.shape)}")
    except Exception as e:  # noqa: BLE001
        return None, None, f"neither scripts ({script_error}) nor traces ({str(e).splitlines()[0]})"


def export_model(ref: str, out: str, *, registry: str) -> ExportResult:
    """Write ``ref`` to ``out`` in the team's own format (see the module docstring)."""

    target = resolve(out)
    if target.join(EXPORT_JSON).exists():
        raise RegistryError(f"--out {out} already holds an export ({EXPORT_JSON}); choose an empty "
                            "directory")
    reg = Registry(registry)
    manifest, model = load_model(reg, ref)
    if manifest.format != "network":
        raise RegistryError(f"{manifest.ref} is stored in format {manifest.format!r} (a linearized "
                            "LQF model), which is not a plain network of its factory; export a "
                            "network-format version")
    net, mapping, factory, kwargs = rebuild_user_model(manifest)
    state = model.state_dict()
    if mapping:
        state = to_user_keys(state, mapping["head_module"])
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ModelError(f"{manifest.ref}: its weights do not load back into {factory}: {e}") from e
    net.eval()
    input_shape = tuple(manifest.spec.input_shape)
    probe = torch.randn(4, *input_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(probe)
        if not torch.allclose(net(probe), expected, rtol=1e-4, atol=1e-5):
            raise ModelError(f"{manifest.ref}: {factory} with the exported weights does not reproduce "
                             "the registry model's outputs")
    scripted, mode, note = _script_or_trace(net, torch.zeros(1, *input_shape))
    blobs = {WEIGHTS: safetensors.torch.save({k: v.detach().cpu().contiguous().clone()
                                              for k, v in state.items()}, metadata={"format": "pt"})}
    if scripted is not None:
        with torch.no_grad():
            if not torch.allclose(scripted(probe), expected, rtol=1e-4, atol=1e-5):
                scripted, mode, note = None, None, f"the {mode} module's outputs differ from the model's"
    if scripted is not None:
        buf = io.BytesIO()
        torch.jit.save(scripted, buf)
        blobs[TORCHSCRIPT] = buf.getvalue()
    files = {name: hashlib.sha256(data).hexdigest() for name, data in blobs.items()}
    info = {"source": manifest.ref, "registry": reg.uri, "embedding_space": manifest.embedding_space,
            "factory": factory, "model_args": kwargs, "head_module": mapping.get("head_module"),
            "input_shape": list(input_shape), "classes": list(manifest.classes),
            "weights": WEIGHTS,
            "load": (f"{factory}(**model_args).load_state_dict(safetensors.torch.load_file("
                     f"'{WEIGHTS}'), strict=True)" if mapping else
                     "graceful_ray.models.build_model(ModelSpec(factory, input_shape, len(classes), "
                     f"model_args)).load_state_dict(safetensors.torch.load_file('{WEIGHTS}'), strict=True)"),
            "torchscript": {"file": TORCHSCRIPT if scripted is not None else None, "mode": mode,
                            "note": note},
            "files": files}
    for name, data in blobs.items():
        target.join(name).write_bytes(data)
    target.join(EXPORT_JSON).write_bytes(json.dumps(info, indent=2).encode())  # last: the export is whole
    return ExportResult(manifest.ref, target.uri, files, mode, note, factory, kwargs)
