"""Rules for the fx-wrapped helper functions of torchvision's video transformers (MViT v2, Swin3D).

torchvision records these functions as single ``call_function`` nodes (``torch.fx.wrap``), so
their bodies are never traced and each needs one rule, keyed by the function object (registered
when torchvision is imported, as the Swin patch-merging rule is).
"""

from __future__ import annotations

from ..registry import CannotExpand, register, register_when_imported
from .linear_ops import weight_arg


def _install() -> None:
    from torchvision.models.video import mvit

    register(mvit._add_shortcut)(add_shortcut_inplace)
    register(mvit._add_rel_pos)(add_rel_pos)

    from torchvision.models.video import swin_transformer

    register(swin_transformer._compute_attention_mask_3d)(attention_mask_from_sizes)


register_when_imported("torchvision", _install)


def add_shortcut_inplace(ctx, node):
    """``_add_shortcut(x, shortcut, with_cls)``: ``x += shortcut`` in place (all tokens, or all
    but the class token). MViT ignores the return value and keeps using ``x``, so the teacher's
    ``x`` itself must be updated: ``shortcut`` is brought to ``x``'s layout, never ``x`` to
    another (a converted copy would take the update and ``x`` would miss it; a boundary, which
    runs the op on a narrowed copy, loses it the same way)."""
    x, shortcut = node.args[0], node.args[1]
    lay, s_lay = ctx.layout(x), ctx.layout(shortcut)
    if lay is None and s_lay is None:
        return ctx.emit_same(), None
    if lay is None:
        s = ctx.narrow(shortcut)
    else:
        if lay.dim != ctx.sval(x).dim() - 1:
            # the class token is sliced off dim 2: channels anywhere but the last dim would be cut
            raise CannotExpand("in-place shortcut with the channels off the last dim")
        s = ctx.to_layout(shortcut, lay)
    return ctx.call_function(node.target, ctx.dt(x), s, *ctx.dt(node.args[2:])), lay


def add_rel_pos(ctx, node):
    """``_add_rel_pos(attn, q, q_thw, k_thw, rel_pos_h, rel_pos_w, rel_pos_t)``: MViT v2's
    decomposed relative position bias, ``attn += einsum(q, R)`` contracted over the head dim.

    The logits ``attn`` keep the student's heads; ``q`` is widened on its head dim (last), and
    each table ``(L, head_dim)`` is a weight contracted with it: the weight rule widens its input
    dim by ``q``'s layout and divides by the copy count (plus zero-sum noise), so every
    contraction equals the student's at initialisation. Interpolation and gathers of the
    tables act on the position dim only."""
    attn, q = node.args[0], node.args[1]
    tables = node.args[4:7]
    if ctx.layout(attn) is not None:
        raise CannotExpand("attention logits widened (heads widened) with a relative position bias")
    lay = ctx.layout(q)
    if lay is None:
        if any(ctx.layout(t) is not None for t in tables):
            raise CannotExpand("relative position table widened but q at student width")
        return ctx.emit_same(), None
    if lay.dim != ctx.sval(q).dim() - 1:
        raise CannotExpand("q widened off its head dim")
    wide = [weight_arg(ctx, t, 0, 1, None, lay.index, ctx.sval(t).shape[1]) for t in tables]
    return ctx.call_function(node.target, ctx.dt(attn), ctx.dt(q), ctx.dt(node.args[2]), ctx.dt(node.args[3]),
                             *wide), None


def attention_mask_from_sizes(ctx, node):
    """``_compute_attention_mask_3d(x, padded_size, window_size, shift_size)``: the shifted-window
    mask, built from sizes alone (``x`` gives only its dtype and device: ``x.new_zeros``), so the
    teacher's call with its own ``x`` returns the student's mask."""
    if ctx.out is None or ctx.sval(node.args[0]).dtype != ctx.out.dtype:
        raise CannotExpand("mask not built from sizes in x's dtype")
    return ctx.emit_same(), None
