"""Any ``torch.nn.Module`` as an :class:`EmbeddingClassifier`, split at its head.

A team's own network (``features`` then ``fc``, a torchvision ResNet, a
``classifier`` of a VGG-style model) has no backbone/head attributes, but it
has a last linear layer whose *input* is an embedding. Naming that module
(``head_module="fc"``, or a dotted path such as ``classifier.1``) is enough:
the module is lifted out as ``head`` and replaced by ``nn.Identity`` inside the
network, so the network itself now returns the embedding and becomes the
``backbone``. BCT, the L2 baseline and the retrieval gallery then see the same
embedding the team's head consumes.

The split is reversible: a state-dict key ``fc.weight`` is ``head.weight`` here
and every other key ``k`` is ``backbone.k`` (:func:`to_registry_keys`,
:func:`to_user_keys`), which is how ``registry export`` gives the team back a
state dict that loads into their own factory with ``strict=True``.

It is the zoo entry ``wrapped``: a manifest's architecture
``{"factory": "wrapped", "kwargs": {"factory": "pkg.module:build",
"head_module": "fc", ...the factory's own arguments}}`` is enough to rebuild the
model on load, in training and in serving.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from graceful_ray.errors import ModelError
from graceful_ray.models.base import EmbeddingClassifier
from graceful_ray.models.locate import locate

#: Keyword arguments of :func:`wrapped` that are its own, not the user factory's.
OWN_KWARGS = ("factory", "head_module")


def user_factory(path: str) -> Callable[..., nn.Module]:
    """``package.module:callable`` -> the callable (one-line error otherwise)."""
    # zoo names have no ':'; a zoo model needs no wrapping
    if not isinstance(path, str) or ":" not in path:
        raise ModelError(f"factory {path!r}: give the import path of your model's factory, "
                         "'package.module:callable'")
    return locate(path)


def build_user_model(factory: str, model_args: dict[str, Any] | None = None) -> nn.Module:
    """Call the team's factory with its keyword arguments; it must return an nn.Module."""
    fn = user_factory(factory)
    try:
        module = fn(**(model_args or {}))
    except TypeError as e:
        raise ModelError(f"factory {factory!r} does not accept arguments {model_args or {}}: {e}") from e
    if not isinstance(module, nn.Module):
        raise ModelError(f"factory {factory!r} returned {type(module).__name__}, not a torch.nn.Module")
    return module


def split_head(module: nn.Module, head_module: str) -> tuple[nn.Module, nn.Linear]:
    """Lift ``module.<head_module>`` out (replaced by ``nn.Identity``); returns (backbone, head)."""
    if not isinstance(head_module, str) or not head_module or head_module.startswith("."):
        raise ModelError(f"head module {head_module!r}: give the attribute name of the last "
                         "linear layer, e.g. 'fc' or 'classifier.1'")
    try:
        head = module.get_submodule(head_module)
    except AttributeError:
        names = [n for n, m in module.named_modules() if isinstance(m, nn.Linear)]
        raise ModelError(f"{type(module).__name__} has no module {head_module!r}; its linear "
                         f"layers are {names or 'none'}") from None
    if not isinstance(head, nn.Linear):
        inner = [f"{head_module}.{n}" for n, m in head.named_modules() if n and isinstance(m, nn.Linear)]
        hint = f"; name the linear layer inside it ({', '.join(inner)})" if inner else ""
        raise ModelError(f"head module {head_module!r} is a {type(head).__name__}, not a "
                         f"torch.nn.Linear{hint}")
    parent_name, _, attr = head_module.rpartition(".")
    parent = module.get_submodule(parent_name) if parent_name else module
    setattr(parent, attr, nn.Identity())
    return module, head


class WrappedClassifier(EmbeddingClassifier):
    """A user's network split at ``head_module``: ``backbone`` is the network with
    that module replaced by ``nn.Identity``, ``head`` the module itself."""

    def __init__(self, module: nn.Module, head_module: str, input_shape: tuple[int, ...]) -> None:
        backbone, head = split_head(module, head_module)
        super().__init__(backbone, head.in_features, head.out_features, input_shape, head=head)
        self.head_module = head_module


def wrapped(input_shape: tuple[int, ...], num_classes: int, *, factory: str,
            head_module: str = "fc", **model_args: Any) -> WrappedClassifier:
    """The zoo entry: ``factory(**model_args)`` split at ``head_module``.

    ``num_classes`` (from the dataset or the manifest) must equal the head's
    outputs: a factory that takes the class count gets it as one of its own
    arguments (``--model-arg num_classes=20``).
    """
    model = WrappedClassifier(build_user_model(factory, model_args), head_module, input_shape)
    if model.num_classes != int(num_classes):
        raise ModelError(f"{factory}({_fmt(model_args)}) has a head {head_module!r} of "
                         f"{model.num_classes} outputs but {num_classes} classes are needed; "
                         "pass the class count to your factory (e.g. --model-arg num_classes=...)")
    return model


def to_registry_keys(state: dict[str, torch.Tensor], head_module: str) -> dict[str, torch.Tensor]:
    """The team's state dict -> the wrapped model's (``fc.w`` -> ``head.w``, ``k`` -> ``backbone.k``)."""
    prefix = head_module + "."
    return {("head." + k[len(prefix):]) if k.startswith(prefix) else "backbone." + k: v
            for k, v in state.items()}


def to_user_keys(state: dict[str, torch.Tensor], head_module: str) -> dict[str, torch.Tensor]:
    """The inverse of :func:`to_registry_keys`: what the team's own factory loads."""
    out = {}
    for k, v in state.items():
        if k.startswith("head."):
            out[f"{head_module}.{k[len('head.'):]}"] = v
        elif k.startswith("backbone."):
            out[k[len("backbone."):]] = v
        else:
            raise ModelError(f"state dict key {k!r} is neither in the backbone nor the head")
    return out


def _fmt(kwargs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
