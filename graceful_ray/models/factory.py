"""Build a model from a name or an import path, and describe it for the registry.

A :class:`ModelSpec` is everything needed to rebuild a network before loading its
weights: the factory (a zoo name such as ``cnn1d`` or ``package.module:callable``
for a user's own model) and its keyword arguments. It is stored in the registry
manifest, so it must stay JSON-serialisable.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from graceful_ray.errors import ModelError
from graceful_ray.models import zoo
from graceful_ray.models.base import EmbeddingClassifier
from graceful_ray.models.locate import locate
from graceful_ray.models.wrapped import wrapped

ZOO: dict[str, Callable[..., EmbeddingClassifier]] = {
    "mlp": zoo.mlp,
    "cnn1d": zoo.cnn1d,
    "resnet": zoo.resnet,
    "resnet18": zoo.resnet18,
    "resnet50": zoo.resnet50,
    # any nn.Module split at a named head (models/wrapped.py): how imported models rebuild
    "wrapped": wrapped,
}


@dataclass(frozen=True)
class ModelSpec:
    """How to build a model: factory, input shape, class count, factory kwargs."""

    factory: str
    input_shape: tuple[int, ...]
    num_classes: int
    kwargs: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_shape"] = list(self.input_shape)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelSpec":
        try:
            return cls(factory=d["factory"], input_shape=tuple(d["input_shape"]),
                       num_classes=int(d["num_classes"]), kwargs=dict(d.get("kwargs", {})))
        except (KeyError, TypeError, ValueError) as e:
            raise ModelError(f"invalid model spec {d!r}: {e}") from None


def resolve_factory(name: str) -> Callable[..., EmbeddingClassifier]:
    """A zoo name, or ``package.module:callable`` for a user-supplied model."""
    if name in ZOO:
        return ZOO[name]
    if ":" not in name:
        raise ModelError(
            f"unknown model {name!r}: use one of {sorted(ZOO)} or an import path "
            "'package.module:factory'"
        )
    return locate(name)


def build_model(spec: ModelSpec) -> EmbeddingClassifier:
    """Instantiate ``spec``; the result must be an :class:`EmbeddingClassifier`."""
    factory = resolve_factory(spec.factory)
    try:
        model = factory(tuple(spec.input_shape), spec.num_classes, **spec.kwargs)
    except TypeError as e:
        raise ModelError(f"model {spec.factory!r} does not accept arguments {spec.kwargs}: {e}") from e
    if not isinstance(model, EmbeddingClassifier):
        raise ModelError(
            f"factory {spec.factory!r} returned {type(model).__name__}; it must return an "
            "EmbeddingClassifier (a backbone producing embeddings plus a linear head), or use "
            "--model wrapped --model-arg factory=pkg.module:build --model-arg head_module=fc "
            "to split your own network at its last linear layer"
        )
    return model
