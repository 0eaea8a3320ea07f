"""LQF, linear quadratic fine-tuning, in one place: the method and what it trains.

* :mod:`.method` - the upgrade method ``lqf`` (squared loss, trainer hooks, its
  storage format ``linearized``).
* :class:`LinearizedModel` - ``f(x; w0) + J(x; w0)(w - w0)`` via ``torch.func.jvp``.
* :class:`KFACOptimizer` - SGD with momentum on K-FAC-preconditioned gradients.
"""

from graceful_ray.methods.lqf.kfac import KFACLayer, KFACOptimizer, conv_factors, kfac_layers, linear_factors
from graceful_ray.methods.lqf.linearize import LinearizedModel, parameter_blocks, select_parameters
from graceful_ray.methods.lqf.method import LQF, load_pretrained, squared_loss

__all__ = ["LQF", "squared_loss", "load_pretrained", "LinearizedModel", "select_parameters",
           "parameter_blocks", "KFACOptimizer", "KFACLayer", "kfac_layers", "linear_factors", "conv_factors"]
