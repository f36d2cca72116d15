"""Ops that mix channels linearly: conv (any dim, any groups), conv-transpose, linear, embedding.

All of them go through :func:`~gpd_fx.passes.weights.widen_weight` (the weight rule); this file
only says which dims of each weight are the output and input channels, and records the
student-map source of each parameter.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from ..layout import Layout, interleaved
from ..registry import CannotExpand, register
from ..weights import widen_per_channel, widen_weight
from ..widen_params import WidenedWeight
from ._common import arg, clone_module, need_dim


def _expand_output(ctx, width: int) -> bool:
    # Width-1 outputs (a spatial-attention map, a single logit) are broadcast by their
    # consumers; widening them would break that, and there is nothing to gain.
    return width > 1 and not ctx.kept_demand()


def _group_in_index(lay: Layout | None, cin: int, groups: int, r: int) -> torch.Tensor | None:
    """Teacher->student map of input channels *within one group* (weights are per group)."""
    if lay is None:
        return None
    if groups == 1:
        return lay.index
    return torch.arange(r * cin // groups) // r


def widen_linear_weight(ctx, w: Tensor, out_dim: int, in_dim: int, out_lay: Layout | None,
                        in_index: torch.Tensor | None, in_width: int):
    """Weight rule for one weight tensor; returns (teacher weight, source kwargs)."""
    wide = widen_weight(w.detach(), out_dim=out_dim, out_index=None if out_lay is None else out_lay.index,
                        in_dim=in_dim, in_index=in_index, noise=ctx.noise, generator=ctx.generator)
    src = {}
    if out_lay is not None:
        src["out"] = (out_dim, out_lay.first_copy())
    if in_index is not None:
        src["inp"] = (in_dim, in_index, in_width)
    return wide, src


def install_widened(ctx, node, m: nn.Module, w, wsrc: dict, out_lay: Layout | None, **attrs) -> str:
    """Put the widened copy of module ``m`` (new weight ``w``, bias gathered by ``out_lay``) at
    the node's target and record the student-map sources of its weight and bias."""
    params = {"weight": w}
    if m.bias is not None:
        params["bias"] = m.bias.detach() if out_lay is None else widen_per_channel(m.bias.detach(), 0, out_lay.index)
    target = ctx.add_module(node.target, clone_module(m, params, **attrs))
    ctx.add_source(f"{node.target}.weight", node.target, "weight", **wsrc)
    if m.bias is not None:
        ctx.add_source(f"{node.target}.bias", node.target, "bias",
                       **({"out": (0, out_lay.first_copy())} if out_lay is not None else {}))
    return target


def _conv_like(ctx, node, transposed: bool):
    """Conv and conv-transpose of any dim: keep ``groups``, every group becomes r times wider.

    A conv weight is ``(out, in/groups, k...)``; a transposed one ``(in, out/groups, k...)``,
    so the output and input roles of dims 0 and 1 swap (and the per-group map moves with them).
    """
    m = ctx.module()
    x = node.args[0]
    lay = ctx.layout(x)
    need_dim(lay, 1, "conv")
    xd = ctx.dt(x)
    if lay is not None and m.groups > 1 and not lay.is_interleaved:
        xd, lay = ctx.interleave(x)   # groups must be contiguous blocks of copies
    out_lay = interleaved(m.out_channels, ctx.r, 1) if _expand_output(ctx, m.out_channels) else None
    if lay is None and out_lay is None:
        return ctx.emit_same(), None
    if transposed:
        out_local = None if out_lay is None else interleaved(m.out_channels // m.groups, ctx.r, 1)
        w, wsrc = widen_linear_weight(ctx, m.weight, 1, 0, out_local, None if lay is None else lay.index,
                                      m.in_channels)
    else:
        in_idx = _group_in_index(lay, m.in_channels, m.groups, ctx.r)
        w, wsrc = widen_linear_weight(ctx, m.weight, 0, 1, out_lay, in_idx, m.in_channels // m.groups)
    target = install_widened(ctx, node, m, w, wsrc, out_lay,
                             in_channels=m.in_channels * (ctx.r if lay is not None else 1),
                             out_channels=m.out_channels * (ctx.r if out_lay is not None else 1))
    args = (xd,) + tuple(ctx.dt(a) for a in node.args[1:])
    return ctx.emit("call_module", target, args, ctx.dt(node.kwargs)), out_lay


@register(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def conv(ctx, node):
    """Conv of any dim and groups (the weight rule with per-group input maps)."""
    return _conv_like(ctx, node, transposed=False)


@register(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
def conv_transpose(ctx, node):
    """Conv-transpose of any dim and groups."""
    return _conv_like(ctx, node, transposed=True)


@register(nn.Linear)
def linear(ctx, node):
    """Linear over the last dim; over a kept last dim it is channel-wise and runs unchanged."""
    m = ctx.module()
    x = node.args[0]
    lay = ctx.layout(x)
    nd = ctx.sval(x).dim()
    if lay is not None and lay.dim != nd - 1:
        return ctx.emit_same(), lay   # token-mixing linear: acts on a kept dim
    out_lay = interleaved(m.out_features, ctx.r, nd - 1) if _expand_output(ctx, m.out_features) else None
    if lay is None and out_lay is None:
        return ctx.emit_same(), None
    in_idx = None if lay is None else lay.index
    w, wsrc = widen_linear_weight(ctx, m.weight, 0, 1, out_lay, in_idx, m.in_features)
    target = install_widened(ctx, node, m, w, wsrc, out_lay, in_features=w.shape[1], out_features=w.shape[0])
    return ctx.emit("call_module", target, (ctx.dt(x),), {}), out_lay


def weight_arg(ctx, w: fx.Node, out_dim: int, in_dim: int, out_lay: Layout | None,
               in_index: torch.Tensor | None, in_width: int) -> fx.Node:
    """Teacher node for a weight passed to a functional op.

    A parameter read directly (``F.linear(x, self.weight)``) is widened in place by the weight
    rule, with noise, and gets a student-map source. A computed weight (weight standardisation,
    a hypernetwork) is widened at run time by the same rule without noise: exact, and still
    trained through its student-width inputs.
    """
    want = WidenedWeight(None if out_lay is None else out_lay.at(out_dim),
                         None if in_index is None else Layout(in_dim, in_index, ctx.r))
    state = ctx.param_state(w.target) if w.op == "get_attr" else None
    if isinstance(state, WidenedWeight) and state.same(want):
        return ctx.emit("get_attr", w.target)   # a second use with the same maps: one weight
    if w.op == "get_attr" and state is None:
        val = ctx.student_param(w.target)
        wide, src = widen_linear_weight(ctx, val, out_dim, in_dim, out_lay, in_index, in_width)
        ctx.install_param(w.target, wide, want, **src)
        return ctx.emit("get_attr", w.target)
    wd = ctx.dt(w)   # a parameter widened for another use comes back at student width
    if ctx.layout(w) is not None:
        raise CannotExpand("computed weight is itself expanded")
    if out_lay is not None:
        wd = ctx.call_function(torch.index_select, wd, out_dim, ctx.index_buffer(out_lay.index))
    if in_index is not None:
        counts = torch.bincount(in_index).to(ctx.sval(w).dtype)
        scale = (1.0 / counts).index_select(0, in_index)
        shape = [1] * ctx.sval(w).dim()
        shape[in_dim] = -1
        wd = ctx.call_function(torch.index_select, wd, in_dim, ctx.index_buffer(in_index))
        wd = ctx.call_function(torch.mul, wd, ctx.index_buffer(scale.view(shape)))
    return wd


def _bias_arg(ctx, bnode, out_lay: Layout | None):
    if bnode is None or out_lay is None:
        return ctx.dt(bnode)
    return ctx.to_layout(bnode, out_lay.at(0))


@register(F.linear, torch._C._nn.linear)
def linear_fn(ctx, node):
    """``F.linear(x, w, b)`` with ``w`` a parameter or a computed tensor."""
    x, w, bnode = node.args[0], arg(node, 1, "weight"), arg(node, 2, "bias")
    lay = ctx.layout(x)
    nd = ctx.sval(x).dim()
    wv = ctx.sval(w)
    if lay is not None and lay.dim != nd - 1:
        if ctx.layout(w) is not None or (bnode is not None and ctx.layout(bnode) is not None):
            raise CannotExpand("expanded weight on a token-mixing linear")
        return ctx.emit_same(), lay
    out_lay = interleaved(wv.shape[0], ctx.r, nd - 1) if _expand_output(ctx, wv.shape[0]) else None
    if lay is None and out_lay is None:
        return ctx.emit_same(), None
    wd = weight_arg(ctx, w, 0, 1, out_lay, None if lay is None else lay.index, wv.shape[1])
    bd = _bias_arg(ctx, bnode, out_lay)
    return ctx.call_function(F.linear, ctx.dt(x), wd, bd), out_lay


def _conv_fn(ndim):
    def rule(ctx, node):
        x, w, bnode = node.args[0], arg(node, 1, "weight"), arg(node, 2, "bias")
        stride, padding, dilation = arg(node, 3, "stride", 1), arg(node, 4, "padding", 0), arg(node, 5, "dilation", 1)
        groups = arg(node, 6, "groups", 1)
        if isinstance(groups, fx.Node):
            raise CannotExpand("dynamic groups")
        lay = ctx.layout(x)
        need_dim(lay, 1, "conv")
        xd = ctx.dt(x)
        if lay is not None and groups > 1 and not lay.is_interleaved:
            xd, lay = ctx.interleave(x)
        wv = ctx.sval(w)
        cout, cin_g = wv.shape[0], wv.shape[1]
        out_lay = interleaved(cout, ctx.r, 1) if _expand_output(ctx, cout) else None
        if lay is None and out_lay is None:
            return ctx.emit_same(), None
        in_idx = _group_in_index(lay, cin_g * groups, groups, ctx.r)
        wd = weight_arg(ctx, w, 0, 1, out_lay, in_idx, cin_g)
        bd = _bias_arg(ctx, bnode, out_lay)
        fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[ndim]
        return ctx.call_function(fn, xd, wd, bd, stride, padding, dilation, groups), out_lay
    return rule


register(F.conv1d, torch.conv1d)(_conv_fn(1))
register(F.conv2d, torch.conv2d)(_conv_fn(2))
register(F.conv3d, torch.conv3d)(_conv_fn(3))


@register(nn.Embedding)
def embedding(ctx, node):
    """Embedding table: widened along its output dim like any per-channel parameter."""
    m = ctx.module()
    if m.max_norm is not None:
        raise CannotExpand("max_norm renormalises rows by their norm, which widening changes")
    nd = ctx.out.dim()
    if ctx.kept_demand() or m.embedding_dim < 2:
        return ctx.emit_same(), None
    out_lay = interleaved(m.embedding_dim, ctx.r, nd - 1)
    new = clone_module(m, {"weight": widen_per_channel(m.weight.detach(), 1, out_lay.index)},
                       embedding_dim=m.embedding_dim * ctx.r)
    target = ctx.add_module(node.target, new)
    ctx.add_source(f"{node.target}.weight", node.target, "weight", out=(1, out_lay.first_copy()))
    return ctx.emit("call_module", target, ctx.dt(node.args), ctx.dt(node.kwargs)), out_lay
