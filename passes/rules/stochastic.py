"""Per-sample stochastic depth (drop-path) modules from torchvision and timm.

They read ``self.training`` and so are kept as leaves by the tracer; the mask they draw has
shape ``(N, 1, ...)`` and never looks at channels, so they act the same on any layout (and draw
the same random numbers for the student and the teacher).
"""

from __future__ import annotations

from ..registry import register

_KEYS: list = []
try:
    from torchvision.ops import StochasticDepth, stochastic_depth

    _KEYS += [StochasticDepth, stochastic_depth]
except ImportError:  # torchvision is a dependency, but keep the rule set importable without it
    pass
try:
    from timm.layers import DropPath, drop_path as timm_drop_path

    _KEYS += [DropPath, timm_drop_path]
except ImportError:
    pass


@register(*_KEYS, transparent=True)
def drop_path(ctx, node):
    x = node.args[0]
    return ctx.emit_same(), ctx.layout(x)
