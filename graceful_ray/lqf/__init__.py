"""Linear quadratic fine-tuning: the linearized network and its K-FAC optimizer.

* :class:`LinearizedModel` - ``f(x; w0) + J(x; w0)(w - w0)`` via ``torch.func.jvp``.
* :class:`KFACOptimizer` - SGD with momentum on K-FAC-preconditioned gradients.

The upgrade method that uses them is :mod:`graceful_ray.methods.lqf` (``lqf``).
"""

from graceful_ray.lqf.kfac import KFACLayer, KFACOptimizer, conv_factors, kfac_layers, linear_factors
from graceful_ray.lqf.linearize import LinearizedModel, parameter_blocks, select_parameters

__all__ = ["LinearizedModel", "select_parameters", "parameter_blocks", "KFACOptimizer", "KFACLayer",
           "kfac_layers", "linear_factors", "conv_factors"]
