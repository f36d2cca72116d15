"""Tensors created from sizes: ``x.new_zeros(size)`` and friends read only ``x``'s dtype and
device, so their result is the student's whatever ``x``'s layout (Swin's attention-mask image)."""

from __future__ import annotations

from ..registry import register


@register("new_zeros", "new_ones", "new_empty", "new_full")
def new_tensor(ctx, node):
    """The teacher's ``x`` serves as well as the student's: same dtype and device, explicit size."""
    return ctx.emit_same(), None
