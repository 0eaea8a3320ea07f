"""Model zoo and factory: every model is a backbone plus a linear head."""

from graceful_ray.models.base import EmbeddingClassifier, ModelOutput
from graceful_ray.models.cost import ModelCost, model_cost
from graceful_ray.models.factory import ZOO, ModelSpec, build_model, resolve_factory

__all__ = ["EmbeddingClassifier", "ModelOutput", "ModelCost", "model_cost", "ZOO", "ModelSpec",
           "build_model", "resolve_factory"]
