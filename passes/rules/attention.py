"""Contractions and attention: ``matmul``/``@``/``bmm``/``einsum``, SDPA, ``nn.MultiheadAttention``.

A contraction over a dim expanded in both operands sums r copies of every product, so its
result gets ``* (1/r)``; SDPA gets an explicit ``scale = student_scale / r`` because its default
scale would see the wider head dim. Contractions over kept dims leave the layout where it is.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from ..layout import Layout, gpd_sum_correction, interleaved
from ..registry import CannotExpand, register, register_when_imported
from ..weights import widen_per_channel
from ._common import arg, clone_module
from .linear_ops import _expand_output


def _matmul_param(ctx, node, a, b, la, lb):
    """``x @ P`` with ``P`` a parameter used as a weight (in, out): apply the weight rule."""
    from .linear_ops import weight_arg

    pv = ctx.sval(b)
    out_lay = interleaved(pv.shape[-1], ctx.r, ctx.out.dim() - 1) if _expand_output(ctx, pv.shape[-1]) else None
    wd = weight_arg(ctx, b, pv.dim() - 1, pv.dim() - 2, None if out_lay is None else out_lay.at(pv.dim() - 1),
                    la.index, pv.shape[-2])
    return ctx.call_function(operator.matmul, ctx.dt(a), wd), out_lay


@register(operator.matmul, torch.matmul, "matmul", torch.bmm, "bmm", "__matmul__")
def matmul(ctx, node):
    a, b = node.args[0], node.args[1]
    la, lb = ctx.layout(a), ctx.layout(b)
    if la is None and lb is None:
        return ctx.emit_same(), None
    sa, sb, out = ctx.sval(a), ctx.sval(b), ctx.out
    if sa.dim() < 2 or sb.dim() < 2:
        raise CannotExpand("matmul with a vector operand")
    na, nb, no = sa.dim(), sb.dim(), out.dim()
    # operand a: (..., n, k); operand b: (..., k, m); out: (..., n, m)
    a_k, b_k = na - 1, nb - 2
    if isinstance(la, Layout) and la.dim == a_k and lb is None and b.op == "get_attr" and nb == 2:
        return _matmul_param(ctx, node, a, b, la, lb)
    contracted = (isinstance(la, Layout) and la.dim == a_k) or (isinstance(lb, Layout) and lb.dim == b_k)
    if contracted:
        ref = la if isinstance(la, Layout) and la.dim == a_k else lb
        ad = ctx.to_layout(a, ref.at(a_k))
        bd = ctx.to_layout(b, ref.at(b_k))
        for other, lay, k in ((a, la, a_k), (b, lb, b_k)):
            if isinstance(lay, Layout) and lay.dim != k:
                raise CannotExpand("both a contracted and a free dim are expanded")
        y = ctx.call_function(operator.matmul, ad, bd)
        return ctx.call_function(gpd_sum_correction, y, ctx.r), None
    # free dims only: row dim of a -> out dim no-2, column dim of b -> out dim no-1,
    # batch dims broadcast (aligned from the right)
    cands = []
    for x, lay, nx, free, out_free in ((a, la, na, na - 2, no - 2), (b, lb, nb, nb - 1, no - 1)):
        if isinstance(lay, Layout):
            d = out_free if lay.dim == free else lay.dim + no - nx
            cands.append((x, lay.at(d), lay.dim < nx - 2))
    narrowed = set()
    if len(cands) == 2 and (cands[0][1].dim != cands[1][1].dim or not cands[0][1].same_map(cands[1][1])):
        # The product can stay expanded along one dim only. Talking-heads attention: the logits
        # are widened along the heads (a batch dim of the matmul) while v is widened along
        # channels; narrow the batch-dim operand and keep v's channels. Otherwise keep the
        # wider of the two expansions (EfficientViM's ``x @ (a*b)^T``: x's C channels rather
        # than the state dim), b's on a tie.
        batch = [c for c in cands if c[2]]
        if batch:
            drop = batch[0]
        else:
            drop = cands[0] if cands[0][1].width <= cands[1][1].width else cands[1]
        narrowed.add(drop[0])
        cands = [c for c in cands if c is not drop]
    out_lay = cands[0][1] if cands else None
    args = []
    for x, lay, nx in ((a, la, na), (b, lb, nb)):
        if x in narrowed:
            args.append(ctx.narrow(x))
            continue
        if lay is None and out_lay is not None and out_lay.dim < no - 2:
            d = out_lay.dim - (no - nx)
            if d >= 0 and ctx.sval(x).shape[d] != 1:
                args.append(ctx.to_layout(x, out_lay.at(d)))
                continue
        args.append(ctx.dt(x))
    return ctx.call_function(operator.matmul, *args), out_lay


@register(torch.einsum)
def einsum(ctx, node):
    eq = node.args[0]
    ops = list(node.args[1:])
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops = list(ops[0])
    lays = [ctx.layout(o) for o in ops]
    if not any(isinstance(l, Layout) for l in lays):
        return ctx.emit_same(), None
    eq = eq.replace(" ", "")
    if "..." in eq:
        raise CannotExpand("einsum with ellipsis")
    lhs, _, rhs = eq.partition("->")
    specs = lhs.split(",")
    letter, ref = None, None
    for spec, lay in zip(specs, lays):
        if isinstance(lay, Layout):
            if letter is not None and spec[lay.dim] != letter:
                raise CannotExpand("einsum with two different expanded letters")
            letter, ref = spec[lay.dim], lay
    if not rhs and "->" not in eq:
        raise CannotExpand("implicit einsum output")
    new_ops = []
    for o, spec, lay in zip(ops, specs, lays):
        if letter in spec:
            new_ops.append(ctx.to_layout(o, ref.at(spec.index(letter))))
        else:
            new_ops.append(ctx.dt(o))
    y = ctx.call_function(torch.einsum, node.args[0], *new_ops)
    if letter in rhs:
        return y, ref.at(rhs.index(letter))
    n_with = sum(1 for spec in specs if letter in spec)
    if n_with == 1:
        # summed over the expanded letter in a single operand: plain sum over copies
        return ctx.call_function(gpd_sum_correction, y, ctx.r), None
    # contraction of several operands over the copies: each product appears r times
    return ctx.call_function(gpd_sum_correction, y, ctx.r), None


@register(F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)
def sdpa(ctx, node):
    q, k, v = node.args[0], arg(node, 1, "key"), arg(node, 2, "value")
    lq, lk, lv = ctx.layout(q), ctx.layout(k), ctx.layout(v)
    if lq is None and lk is None and lv is None:
        return ctx.emit_same(), None
    nd = ctx.sval(q).dim()
    for name, lay in (("query", lq), ("key", lk), ("value", lv)):
        if isinstance(lay, Layout) and lay.dim != nd - 1:
            raise CannotExpand(f"{name} expanded on a dim other than the head dim")
    mask = arg(node, 3, "attn_mask")
    kwargs = dict(ctx.dt(node.kwargs))
    args = list(ctx.dt(node.args))
    if isinstance(mask, fx.Node) and ctx.layout(mask) is not None:
        # The rule keeps the head count and widens the head dim, so the mask (per head, query,
        # key: never per channel) is the student's. It can arrive widened when it comes from a
        # weight layer (T5's relative position bias is an Embedding with one column per head).
        if len(node.args) > 3:
            args[3] = ctx.narrow(mask)
        else:
            kwargs["attn_mask"] = ctx.narrow(mask)
    if lq is not None or lk is not None:
        ref = lq if lq is not None else lk
        qd = ctx.to_layout(q, ref)
        kd = ctx.to_layout(k, ref.at(ctx.sval(k).dim() - 1))
        args[0] = qd
        if len(args) > 1:
            args[1] = kd
        else:
            kwargs["key"] = kd
        scale = arg(node, 7, "scale")
        if isinstance(scale, fx.Node):
            raise CannotExpand("dynamic attention scale")
        if scale is None:
            scale = 1.0 / math.sqrt(ctx.sval(q).shape[-1])
        if len(node.args) > 7:
            args[7] = scale / ctx.r
        else:
            kwargs["scale"] = scale / ctx.r
    return ctx.call_function(F.scaled_dot_product_attention, *args, **kwargs), lv


# ---- attention with r times more heads ------------------------------------------------------
# Multi-head modules whose head count is an argument (nn.MultiheadAttention, Swin's window
# attention) are widened with *more heads* instead of wider ones: the teacher has r*H heads of
# the same head dim, head h*r+k a copy of student head h. The per-head softmax scale is then
# unchanged (no compensation needed), and the channel map of the projections is simply the
# "head-major" layout below.
def head_major(width: int, heads: int, r: int, dim: int) -> Layout:
    """Teacher channel ``(h*r + k)*D + d`` holds student channel ``h*D + d`` (D = width/heads)."""
    d = width // heads
    i = torch.arange(width * r)
    return Layout(dim, (i // (r * d)) * d + i % d, r)


def _stacked(lay: Layout, parts: int, dim: int) -> Layout:
    """The layout of ``parts`` stacked projections (q, k, v) each in layout ``lay``."""
    c = lay.width
    return Layout(dim, torch.cat([lay.index + j * c for j in range(parts)]), lay.ratio)


def _install_torchvision_rules() -> None:
    # torchvision wraps these with ``torch.fx.wrap`` (the 2-D Swin and the 3-D video Swin each
    # have their own copies), so each is one ``call_function`` node the rule replaces whole
    from torchvision.models import swin_transformer as swin2d
    from torchvision.models.video import swin_transformer as swin3d

    register(swin2d.shifted_window_attention, swin3d.shifted_window_attention_3d)(swin_window_attention)
    register(swin2d._get_relative_position_bias, swin3d._get_relative_position_bias)(relative_position_bias)


register_when_imported("torchvision", _install_torchvision_rules)


def relative_position_bias(ctx, node):
    """torchvision Swin's ``_get_relative_position_bias(table, index, window_size)`` (2-D and 3-D):
    gathers the ``(L, H)`` table by ``index`` into the ``(1, H, N, N)`` bias added per head.

    The bias is read by an attention with r*H heads (:func:`swin_window_attention`), head
    ``h*r + k`` a copy of head ``h``: a parameter table is widened in place along its head
    column, interleaved, so each teacher head has its own bias (equal at initialisation, free to
    differ in training) and nothing is repeated at run time. A computed table (Swin V2's MLP of
    the coordinates) keeps the layout it arrives in; the gather only moves positions."""
    table = node.args[0]
    lay = ctx.layout(table)
    heads = ctx.sval(table).shape[1]
    if lay is None:
        # widened even for one head (unlike an output of width 1): the attention it feeds runs
        # r*H heads, so a kept table would only be repeated at run time
        if table.op != "get_attr" or ctx.kept_demand():
            return ctx.emit_same(), None
        wide = ctx.to_layout(table, interleaved(heads, ctx.r, 1))
        lay = interleaved(heads, ctx.r, 1)
    elif lay.dim != 1:
        raise CannotExpand("relative position table widened along its positions, not its heads")
    else:
        wide = ctx.dt(table)
    return ctx.call_function(node.target, wide, *ctx.dt(node.args[1:]), **ctx.dt(node.kwargs)), lay


def swin_window_attention(ctx, node):
    """torchvision's shifted-window attention, 2-D ``shifted_window_attention`` and 3-D
    ``shifted_window_attention_3d`` (fx-wrapped functions with the same parameter names; only the
    2-D one has V2's ``logit_scale``), run with r*H heads of the student's head dim.

    The input ``(B, *spatial, C)`` is widened on its channels; q/k/v and the projection weights
    are widened in place by the weight rule into the head-major layout, the relative position
    bias (and V2's per-head logit scale) gets one copy per head copy, and the function itself
    partitions windows and computes ``head_dim = C / heads`` from the widened sizes: the same
    head dim, so the softmax scale needs no correction."""
    import inspect

    from .linear_ops import weight_arg

    sig = inspect.signature(node.target)
    bound = sig.bind(*node.args, **node.kwargs)
    a = bound.arguments
    x = a["input"]
    lay = ctx.layout(x)
    nd = ctx.sval(x).dim()
    if lay is None or lay.dim != nd - 1:
        raise CannotExpand("window attention expects expanded channels-last input")
    heads = a["num_heads"]
    if isinstance(heads, fx.Node):
        raise CannotExpand("dynamic head count")
    c = lay.width
    hm = head_major(c, heads, ctx.r, 0)
    qkv_lay = _stacked(hm, 3, 0)
    out_lay = interleaved(c, ctx.r, 0) if _expand_output(ctx, c) else None
    replaced = {"qkv_weight", "proj_weight", "qkv_bias", "proj_bias", "relative_position_bias", "logit_scale",
                "num_heads"}
    # map only what is passed through: mapping a parameter would pin it at student width
    new = {k: ctx.dt(v) for k, v in a.items() if k not in replaced}
    for k in replaced & a.keys():
        if a[k] is None:
            new[k] = None
    new["qkv_weight"] = weight_arg(ctx, a["qkv_weight"], 0, 1, qkv_lay, lay.index, c)
    new["proj_weight"] = weight_arg(ctx, a["proj_weight"], 0, 1, out_lay, hm.index, c)
    if a.get("qkv_bias") is not None:
        new["qkv_bias"] = ctx.to_layout(a["qkv_bias"], qkv_lay)
    if a.get("proj_bias") is not None:
        new["proj_bias"] = ctx.to_layout(a["proj_bias"], out_lay) if out_lay is not None else ctx.dt(a["proj_bias"])
    rpb = a["relative_position_bias"]
    head_dim = ctx.sval(rpb).dim() - 3
    new["relative_position_bias"] = ctx.to_layout(rpb, interleaved(heads, ctx.r, head_dim))
    if a.get("logit_scale") is not None:
        new["logit_scale"] = ctx.to_layout(a["logit_scale"], interleaved(heads, ctx.r, 0))
    new["num_heads"] = heads * ctx.r
    y = ctx.call_function(node.target, **new)
    return y, None if out_lay is None else out_lay.at(nd - 1)


@register(nn.MultiheadAttention)
def multihead_attention(ctx, node):
    """``nn.MultiheadAttention`` with packed in-projection, widened to r*H heads."""
    m = ctx.module()
    if not m._qkv_same_embed_dim or m.bias_k is not None or m.add_zero_attn:
        raise CannotExpand("only packed q/k/v projections without bias_k/add_zero_attn are widened")
    q, k, v = node.args[0], arg(node, 1, "key"), arg(node, 2, "value")
    lays = [ctx.layout(t) for t in (q, k, v)]
    e = m.embed_dim
    nd = ctx.sval(q).dim()
    ref = next((l for l in lays if l is not None), None)
    if ref is None:
        return ctx.emit_same(), None
    if ref.dim != nd - 1:
        raise CannotExpand("attention input expanded on a dim other than the embedding")
    ins = [ctx.to_layout(t, ref) for t in (q, k, v)]
    r = ctx.r
    hm = head_major(e, m.num_heads, r, 0)
    qkv_lay = _stacked(hm, 3, 0)
    from .linear_ops import widen_linear_weight
    from ..weights import widen_per_channel

    out_lay = interleaved(e, r, 0) if _expand_output(ctx, e) else None
    w_in, src_in = widen_linear_weight(ctx, m.in_proj_weight, 0, 1, qkv_lay, ref.index, e)
    w_out, src_out = widen_linear_weight(ctx, m.out_proj.weight, 0, 1, out_lay, hm.index, e)
    new = nn.MultiheadAttention(e * r, m.num_heads * r, dropout=m.dropout, bias=m.in_proj_bias is not None,
                                batch_first=m.batch_first, dtype=w_in.dtype)
    new.train(m.training)
    with torch.no_grad():
        new.in_proj_weight.copy_(w_in)
        if m.in_proj_bias is not None:
            new.in_proj_bias.copy_(widen_per_channel(m.in_proj_bias.detach(), 0, qkv_lay.index))
        if out_lay is None:
            new.out_proj = nn.Linear(e * r, e, bias=m.out_proj.bias is not None, dtype=w_out.dtype)
        new.out_proj.weight.copy_(w_out)
        if m.out_proj.bias is not None:
            b = m.out_proj.bias.detach()
            new.out_proj.bias.copy_(b if out_lay is None else widen_per_channel(b, 0, out_lay.index))
    target = ctx.add_module(node.target, new)
    t = node.target
    ctx.add_source(f"{t}.in_proj_weight", t, "in_proj_weight", **src_in)
    if m.in_proj_bias is not None:
        ctx.add_source(f"{t}.in_proj_bias", t, "in_proj_bias", out=(0, qkv_lay.first_copy()))
    ctx.add_source(f"{t}.out_proj.weight", f"{t}.out_proj", "weight", **src_out)
    if m.out_proj.bias is not None:
        ctx.add_source(f"{t}.out_proj.bias", f"{t}.out_proj", "bias",
                       **({"out": (0, out_lay.first_copy())} if out_lay is not None else {}))
    kwargs = dict(ctx.dt(node.kwargs))
    for name in ("key", "value"):
        kwargs.pop(name, None)
    y = ctx.emit("call_module", target, tuple(ins) + tuple(ctx.dt(node.args[3:])), kwargs)
    lay_out = None if out_lay is None else out_lay.at(nd - 1)
    return y, (lay_out, None)
