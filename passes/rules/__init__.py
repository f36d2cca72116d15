"""Op rules, one module per op family; importing this package registers them all."""

from . import attention, elementwise, guards, linear_ops, norm, recurrent, reduce, shape, stochastic, timm_layers  # noqa: F401
