"""The package's public classes and functions (torch), loaded by ``graceful_ray.methods``
on first use: ``from graceful_ray.methods import BCT`` works as it always did.

Every built-in method is imported here for its public names; a method need not
be (the registry imports every declaring module itself, see registry.load_methods).
"""

from graceful_ray.methods.base import (Composite, LossOutput, MethodBatch, UpgradeContext, UpgradeMethod,
                                       cross_entropy, shared_class_index)
from graceful_ray.methods.registry import (METHODS, build_method, load_methods, parse_spec, register_method,
                                           valid_hyperparameters)
from graceful_ray.methods.plain import Plain
from graceful_ray.methods.bct import BCT, bct_influence_loss, extend_old_head
from graceful_ray.methods.l2 import L2, l2_embedding_loss
from graceful_ray.methods.focal_distillation import (FocalDistillation, FocalDistillationKL,
                                                     FocalDistillationLM, KnowledgeDistillation,
                                                     distillation_distance, focal_distillation_loss,
                                                     focal_weights, kl_divergence_loss, logit_matching_loss,
                                                     standardized_logit_matching_loss)
from graceful_ray.methods.elodi import ELODI, ensemble_logits, logit_difference_inhibition_loss
from graceful_ray.methods.new_error import NewError, new_error_loss, strict_imitation_loss
from graceful_ray.methods.lqf import LQF, squared_loss

__all__ = [
    "UpgradeContext", "MethodBatch", "LossOutput", "UpgradeMethod", "Composite", "cross_entropy",
    "shared_class_index", "METHODS", "register_method", "build_method", "load_methods", "parse_spec",
    "valid_hyperparameters", "Plain", "BCT", "bct_influence_loss", "extend_old_head", "L2",
    "l2_embedding_loss", "FocalDistillation", "FocalDistillationKL", "FocalDistillationLM",
    "KnowledgeDistillation", "focal_weights", "kl_divergence_loss", "logit_matching_loss",
    "distillation_distance", "standardized_logit_matching_loss", "focal_distillation_loss", "ELODI", "logit_difference_inhibition_loss",
    "LQF", "squared_loss", "ensemble_logits", "NewError", "new_error_loss", "strict_imitation_loss",
]
