"""`registry import`: a model trained elsewhere becomes a registry version.

The team brings three things: the factory that builds their network
(``pkg.module:build`` and its keyword arguments), the weights their own
training loop saved (a ``.safetensors`` file, or a ``state_dict`` saved with
``torch.save``, read with ``weights_only=True`` so no pickled code runs), and
which class each head output means. Everything is checked before anything is
published: the weights must fit the factory key for key and shape for shape
(the error lists the missing keys, the unexpected keys and the shape
mismatches, one line each), one forward pass must run on a zero input of the
declared shape, and, for a network split at ``--head-module``, the split
network must compute exactly what the team's network computes. The version
opens its own embedding space (no graceful-ray model shares it yet) and its
manifest records where it came from (the weights file's sha256 among them).
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import pickle
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import safetensors.torch
import torch
from safetensors import SafetensorError
from torch import nn

from graceful_ray.data import load_split, read_info
from graceful_ray.errors import ConfigError, ModelError
from graceful_ray.models.factory import ZOO, ModelSpec, build_model
from graceful_ray.models.wrapped import WrappedClassifier, build_user_model, to_registry_keys
from graceful_ray.registry.manifest import valid_name
from graceful_ray.registry.store import Registry
from graceful_ray.storage import resolve

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
# Wrappers common training loops save a state dict under.
_NESTED_KEYS = ("state_dict", "model_state_dict", "model")


@dataclass(frozen=True)
class ImportResult:
    ref: str
    embedding_space: str
    embedding_dim: int
    classes: list[int]
    test_accuracy: float | None
    alias: str | None


# ----------------------------------------------------------------- arguments
def parse_input_shape(text: str | list[int] | tuple[int, ...]) -> tuple[int, ...]:
    """``"40"``, ``"3,32,32"``, ``"3x32x32"`` (or a sequence) -> a shape of positive ints."""
    parts = text if isinstance(text, (list, tuple)) else re.split(r"[,x\s]+", str(text).strip())
    try:
        shape = tuple(int(p) for p in parts if str(p) != "")
    except ValueError:
        shape = ()
    if not shape or any(s < 1 for s in shape):
        raise ConfigError(f"--input-shape {text!r}: give positive integers, e.g. 40 or 3,32,32")
    return shape


def parse_classes(items: list[str] | str | None, class_names: list[str] | None = None) -> list[int]:
    """Global class id of each head output, in order.

    Integers and ranges (``0-19``, ``0,1,2``), or the dataset's class names
    (``boots,sandals``: the ids ``dataset.json`` gives them), separated by
    commas or spaces.
    """
    if items is None:
        if class_names is None:
            raise ConfigError("--classes is required without --evaluate DATA: give the class id of "
                              "each head output in order, e.g. --classes 0-19")
        return list(range(len(class_names)))
    tokens = [t for item in ([items] if isinstance(items, str) else items)
              for t in re.split(r"[,\s]+", str(item).strip()) if t]
    out: list[int] = []
    for tok in tokens:
        m = re.fullmatch(r"(\d+)-(\d+)", tok)
        if m:
            lo, hi = int(m.group(1)), int(m.group(2))
            if hi < lo:
                raise ConfigError(f"--classes: range {tok!r} is empty")
            out.extend(range(lo, hi + 1))
        elif tok.isdigit():
            out.append(int(tok))
        elif class_names is not None and tok in class_names:
            out.append(class_names.index(tok))
        elif class_names is None:
            raise ConfigError(f"--classes: {tok!r} is not a class id; class names need --evaluate "
                              "DATA (the dataset whose dataset.json names them)")
        else:
            raise ConfigError(f"--classes: {tok!r} is not a class of the dataset; its classes "
                              f"are {class_names}")
    if not out:
        raise ConfigError("--classes is empty")
    dup = sorted({c for c in out if out.count(c) > 1})
    if dup:
        raise ConfigError(f"--classes names class(es) {dup} more than once")
    return out


# ------------------------------------------------------------------- weights
def load_weights(path: str) -> dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors`` file or a ``torch.save``d state dict."""
    if not path.lower().endswith(WEIGHT_SUFFIXES):
        raise ConfigError(f"--weights {path}: expected a .safetensors file or a state dict saved "
                          "with torch.save (.pt, .pth, .bin)")
    loc = resolve(path)
    if not loc.exists():
        raise ConfigError(f"--weights {path}: no such file")
    data = loc.read_bytes()
    if path.lower().endswith(".safetensors"):
        try:
            return dict(safetensors.torch.load(data))
        except (SafetensorError, ValueError) as e:
            raise ModelError(f"--weights {path}: not a valid safetensors file ({e})") from None

    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(
            f"--weights {path}: cannot be read with torch.load(weights_only=True) ({first}); save "
            "the state dict, torch.save(model.state_dict(), path), not the whole model") from None
    except (RuntimeError, EOFError, ValueError) as e:
        raise ModelError(f"--weights {path}: not a torch.save file ({str(e).splitlines()[0]})") from None
    return _state_dict_in(obj, path)


def _state_dict_in(obj: Any, path: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and obj and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in _NESTED_KEYS:  # {"epoch": 3, "state_dict": {...}, "optimizer": ...}
            inner = obj.get(key)
            if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return dict(inner)
        raise ModelError(f"--weights {path}: a dict whose entries are not all tensors (keys "
                         f"{sorted(map(str, obj))[:8]}); save model.state_dict()")
    if not isinstance(obj, dict) or not obj:
        raise ModelError(f"--weights {path}: holds a {type(obj).__name__}, not a state dict; save "
                         "model.state_dict()")
    return dict(obj)


def check_weights_fit(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    """``state`` if it loads into ``model`` with ``strict=True``; else a ModelError with one
    line per kind of problem. A DDP ``module.`` prefix on every key is dropped."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if state and all(k.startswith("module.") for k in state) and not any(k.startswith("module.") for k in expected):
        state = {k[len("module."):]: v for k, v in state.items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    wrong = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
    if missing or unexpected or wrong:
        lines = [f"the weights do not fit {what}:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {_clip(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {_clip(unexpected)}")
        if wrong:
            lines.append(f"  shape mismatches ({len(wrong)}): " + _clip(
                [f"{k} {list(got[k])} in the file, {list(expected[k])} in the model" for k in wrong]))
        lines.append("  pass the --factory and --model-arg values the weights were trained with")
        raise ModelError("\n".join(lines))
    return state


def _clip(items: list[str], n: int = 8) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")


# -------------------------------------------------------------------- import
def prepare_import(factory: str, weights: str, *, input_shape: tuple[int, ...], classes: list[int],
                   model_args: dict[str, Any] | None = None,
                   head_module: str | None = None) -> tuple[ModelSpec, nn.Module]:
    """The spec and the loaded, checked graceful-ray model (nothing is published).

    Without ``head_module`` the factory follows graceful-ray's convention
    (``factory(input_shape, num_classes, **kwargs)`` returning an
    :class:`EmbeddingClassifier`, or a zoo name); with it, any network built by
    ``factory(**model_args)`` is split at that module.
    """
    model_args = dict(model_args or {})
    state = load_weights(weights)
    what = f"{factory}({', '.join(f'{k}={v!r}' for k, v in model_args.items())})"
    with torch.random.fork_rng(devices=[]):  # building must not move the caller's RNG
        if head_module is None:
            spec = ModelSpec(factory, tuple(input_shape), len(classes), model_args)
            try:
                user = build_model(spec)
            except ModelError as e:
                if factory in ZOO:
                    raise
                raise ModelError(f"{e}; if {factory} builds your own network, name its last linear "
                                 "layer with --head-module (e.g. --head-module fc)") from None
        else:
            if factory in ZOO:
                raise ConfigError(f"--head-module splits your own network; {factory!r} is a zoo model "
                                  "(drop --head-module)")
            clash = sorted(set(model_args) & {"factory", "head_module"})
            if clash:
                raise ConfigError(f"--model-arg {clash[0]} is reserved by the wrapper; rename that "
                                  "argument of your factory")
            user = build_user_model(factory, model_args)
            spec = ModelSpec("wrapped", tuple(input_shape), len(classes),
                             {"factory": factory, "head_module": head_module, **model_args})
    state = check_weights_fit(user, state, what)
    user.load_state_dict(state, strict=True)
    user.eval()
    x0 = torch.zeros(1, *input_shape)
    try:
        with torch.no_grad():
            out = user(x0)
    except Exception as e:  # noqa: BLE001 - the user's forward can raise anything
        raise ModelError(f"{what} fails on a zero input of shape {[1, *input_shape]} "
                         f"(--input-shape): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (1, len(classes)):
        shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelError(f"{what} returns {shape} on one input; expected [1, {len(classes)}] "
                         f"(one score per --classes entry)")
    if head_module is None:
        return spec, user
    # Split a second copy (the split replaces the head in place) and check it is faithful.
    with torch.random.fork_rng(devices=[]):
        model = WrappedClassifier(build_user_model(factory, model_args), head_module, tuple(input_shape))
    model.load_state_dict(to_registry_keys(state, head_module), strict=True)
    model.eval()
    probe = torch.randn(4, *input_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        try:
            split_out = model(probe)
        except Exception:  # noqa: BLE001 - e.g. a middle layer removed: the next one's shapes break
            split_out = None
        same = (split_out is not None and split_out.shape == (4, len(classes))
                and torch.allclose(split_out, user(probe), rtol=1e-4, atol=1e-5))
    if not same:
        raise ModelError(f"splitting {what} at {head_module!r} changes its output: the head is not "
                         "the last operation of forward() (something runs after it); name the "
                         "module whose output is the logits")
    return spec, model


def split_accuracy(model: nn.Module, data: str, classes: list[int], input_shape: tuple[int, ...],
                  split: str = "test") -> float:
    """Accuracy of ``model`` on a split of a graceful-ray dataset (labels are global ids)."""

    x, y, info = load_split(data, split)
    if math.prod(info.feature_shape) != math.prod(input_shape):
        raise ConfigError(f"--evaluate {data}: its samples have shape {list(info.feature_shape)}, the "
                          f"model's --input-shape is {list(input_shape)}")
    cls = np.asarray(classes)
    preds = []
    with torch.no_grad():
        for start in range(0, len(x), 1024):
            xb = torch.as_tensor(np.ascontiguousarray(x[start:start + 1024])).reshape(-1, *input_shape)
            preds.append(cls[model(xb).argmax(1).numpy()])
    return float((np.concatenate(preds) == y).mean()) if len(y) else float("nan")


def import_model(name: str, *, factory: str, weights: str, registry: str,
                 classes: list[str] | str | list[int] | None = None,
                 input_shape: str | tuple[int, ...] | None = None,
                 model_args: dict[str, Any] | None = None, head_module: str | None = None,
                 alias: str | None = None, evaluate: str | None = None) -> ImportResult:
    """Check and publish an externally trained model as the next version of ``name``."""

    if not valid_name(name):
        raise ConfigError(f"invalid model name {name!r}: use letters, digits, '.', '_', '-'")
    info = None
    if evaluate is not None:
        info = read_info(evaluate)
        if "test" not in info.splits:
            raise ConfigError(f"--evaluate {evaluate}: the dataset has no test split "
                              f"(splits: {sorted(info.splits)})")
    if input_shape is None:
        if info is None:
            raise ConfigError("--input-shape is required without --evaluate DATA (e.g. --input-shape 40)")
        shape = tuple(info.feature_shape)
    else:
        shape = parse_input_shape(input_shape)
    if isinstance(classes, list) and classes and all(isinstance(c, int) for c in classes):
        class_ids = list(classes)
    else:
        class_ids = parse_classes(classes, info.class_names if info is not None else None)
    if info is not None and max(class_ids) >= info.num_classes:
        raise ConfigError(f"--classes: class id {max(class_ids)} is not among the dataset's "
                          f"{info.num_classes} classes")
    spec, model = prepare_import(factory, weights, input_shape=shape, classes=class_ids,
                                 model_args=model_args, head_module=head_module)
    acc = split_accuracy(model, evaluate, class_ids, shape) if evaluate is not None else None
    digest = hashlib.sha256(resolve(weights).read_bytes()).hexdigest()
    reg = Registry(registry)
    manifest = reg.publish(
        name, model, spec=spec, classes=class_ids, method="imported",
        dataset_checksum=info.checksum if info is not None else None,
        metrics={"test_accuracy": acc} if acc is not None else {},
        extra={"imported": {"factory": factory, "model_args": dict(model_args or {}),
                            "head_module": head_module, "weights": os.path.basename(weights),
                            "weights_sha256": digest}})
    if alias:
        reg.set_alias(name, alias, manifest.version)
    return ImportResult(manifest.ref, manifest.embedding_space, manifest.embedding_dim,
                        class_ids, acc, alias)

