"""Op rules, one module per op family; importing this package registers them all.

They register inside ``builtin_rules()``, so a key that two rules (or two lists of one rule)
claim is an error at import rather than a silent override.
"""

from ..registry import builtin_rules

with builtin_rules():
    from . import attention, creation, elementwise, guards, linear_ops, norm, recurrent, reduce, shape, stochastic, timm_layers, video  # noqa: F401
