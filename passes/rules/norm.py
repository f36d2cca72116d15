"""Normalisation layers: per-channel ones (BN, IN) take any layout; group/layer norms stay exact
because the mean and variance of r identical copies equal those of one copy (eps included)."""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..layout import Layout
from ..registry import CannotExpand, register
from ..weights import widen_per_channel
from ._common import arg, clone_module, need_dim


def _widen_affine(ctx, node, m, lay: Layout, pdim: int, params=("weight", "bias"),
                  buffers=("running_mean", "running_var"), **attrs):
    newp, newb = {}, {}
    for name in tuple(params) + tuple(buffers):
        t = m._parameters.get(name)
        if t is not None:
            newp[name] = widen_per_channel(t.detach(), pdim, lay.index)
            continue
        t = m._buffers.get(name)
        if isinstance(t, torch.Tensor) and t.dim() > 0:   # frozen BN keeps weight/bias as buffers
            newb[name] = widen_per_channel(t.detach(), pdim, lay.index)
    new = clone_module(m, newp, newb, **attrs)
    target = ctx.add_module(node.target, new)
    for p in newp:
        ctx.add_source(f"{node.target}.{p}", node.target, p, out=(pdim, lay.first_copy()))
    return target


@register(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.InstanceNorm1d,
          nn.InstanceNorm2d, nn.InstanceNorm3d, transparent=True)
def batch_norm(ctx, node, check=None):
    """Per-channel statistics on dim 1: any layout works, parameters and buffers are gathered.

    ``check(module)`` lets a fused variant (norm + activation) refuse before anything is built.
    """
    x = node.args[0]
    lay = ctx.layout(x)
    if lay is None:
        return ctx.emit_same(), None
    need_dim(lay, 1, "batch/instance norm")
    m = ctx.module()
    if check is not None:
        check(m)
    target = _widen_affine(ctx, node, m, lay, 0, num_features=lay.index.numel())
    return ctx.emit("call_module", target, (ctx.dt(x),), {}), lay


@register(nn.GroupNorm, transparent=True)
def group_norm(ctx, node):
    """GroupNorm keeps its number of groups; each group holds the copies of its channels."""
    x = node.args[0]
    lay = ctx.layout(x)
    if lay is None:
        return ctx.emit_same(), None
    need_dim(lay, 1, "group norm")
    xd, lay = ctx.interleave(x)
    m = ctx.module()
    target = _widen_affine(ctx, node, m, lay, 0, buffers=(), num_channels=lay.index.numel())
    return ctx.emit("call_module", target, (xd,), {}), lay


@register(nn.LayerNorm, nn.RMSNorm, transparent=True)
def layer_norm(ctx, node):
    """LayerNorm/RMSNorm over the trailing dims: scale the normalised shape at the channel dim."""
    x = node.args[0]
    lay = ctx.layout(x)
    if lay is None:
        return ctx.emit_same(), None
    m = ctx.module()
    nd = ctx.sval(x).dim()
    k = len(m.normalized_shape)
    if lay.dim < nd - k:
        return ctx.emit_same(), lay   # normalises over kept dims only, per channel
    pdim = lay.dim - (nd - k)
    shape = list(m.normalized_shape)
    shape[pdim] *= ctx.r
    target = _widen_affine(ctx, node, m, lay.at(pdim), pdim, buffers=(), normalized_shape=tuple(shape))
    return ctx.emit("call_module", target, (ctx.dt(x),), {}), lay


def _functional_norm(ctx, node, shape_pos, param_names, channel_dim_of):
    x = node.args[0]
    lay = ctx.layout(x)
    if lay is None:
        return ctx.emit_same(), None
    nd = ctx.sval(x).dim()
    cdim, pdim, new_shape = channel_dim_of(ctx, node, lay, nd)
    replaced = {}
    if shape_pos is not None:
        # the student's normalised shape with the channel factor widened (it may have been a
        # traced torch.Size; the normalised dims are static, so a constant is exact)
        replaced[shape_pos] = new_shape if new_shape is not None else tuple(ctx.sval(arg(node, *shape_pos)))
    for pos, name in param_names:
        p = arg(node, pos, name)
        if isinstance(p, fx.Node) and pdim is not None:
            # parameters and running statistics are widened in place (not copied at run time),
            # so F.batch_norm's in-place statistics update reaches the teacher's own buffers
            replaced[(pos, name)] = ctx.to_layout(p, lay.at(pdim))
    xd = ctx.interleave(x)[0] if node.target is F.group_norm else ctx.dt(x)
    args = [xd]
    for i, a in enumerate(node.args[1:], start=1):
        key = next((k for k in replaced if isinstance(k, tuple) and k[0] == i), None)
        args.append(replaced[key] if key is not None else ctx.dt(a))
    kwargs = {}
    for k, v in node.kwargs.items():
        key = next((kk for kk in replaced if isinstance(kk, tuple) and kk[1] == k), None)
        kwargs[k] = replaced[key] if key is not None else ctx.dt(v)
    return ctx.emit(node.op, node.target, tuple(args), kwargs), lay


def _ln_dims(ctx, node, lay, nd):
    # the student's value: the shape may be a traced torch.Size (``self.weight.shape``)
    shape = list(ctx.sval(arg(node, 1, "normalized_shape")))
    k = len(shape)
    if lay.dim < nd - k:
        return lay.dim, None, None
    pdim = lay.dim - (nd - k)
    shape[pdim] = shape[pdim] * ctx.r
    return lay.dim, pdim, tuple(shape)


@register(F.layer_norm, torch.layer_norm, transparent=True)
def layer_norm_fn(ctx, node):
    return _functional_norm(ctx, node, (1, "normalized_shape"), [(2, "weight"), (3, "bias")], _ln_dims)


@register(F.rms_norm, transparent=True)
def rms_norm_fn(ctx, node):
    return _functional_norm(ctx, node, (1, "normalized_shape"), [(2, "weight")], _ln_dims)


def _dim1(ctx, node, lay, nd):
    if lay.dim != 1:
        raise CannotExpand("functional norm expects channels on dim 1")
    return 1, 0, None


@register(F.batch_norm, F.instance_norm, transparent=True)
def batch_norm_fn(ctx, node):
    names = ([(1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias")]
             if node.target is F.batch_norm else
             [(1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias")])
    return _functional_norm(ctx, node, None, names, _dim1)


@register(F.group_norm, transparent=True)
def group_norm_fn(ctx, node):
    x = node.args[0]
    lay = ctx.layout(x)
    if lay is not None and not lay.is_interleaved:
        raise CannotExpand("group norm needs the interleaved layout")
    return _functional_norm(ctx, node, None, [(2, "weight"), (3, "bias")], _dim1)
