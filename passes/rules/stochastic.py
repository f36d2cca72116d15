"""Per-sample stochastic depth (drop-path) modules and functions from torchvision and timm.

Their mask has shape ``(N, 1, ...)`` and never looks at channels, so they act the same on any
layout (and draw the same random numbers for the student and the teacher).
"""

from __future__ import annotations

from ..registry import register, register_when_imported


def drop_path(ctx, node):
    x = node.args[0]
    return ctx.emit_same(), ctx.layout(x)


def _install_torchvision() -> None:
    from torchvision.ops import StochasticDepth, stochastic_depth

    register(StochasticDepth, stochastic_depth, transparent=True)(drop_path)


def _install_timm() -> None:
    from timm.layers import DropPath, drop_path as timm_drop_path

    register(DropPath, timm_drop_path, transparent=True)(drop_path)


register_when_imported("torchvision", _install_torchvision)
register_when_imported("timm", _install_timm)
