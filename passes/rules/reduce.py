"""Reductions. Over kept dims they are channel-wise; over the channel dim ``mean``/``amax``/
``amin`` of r identical copies are exact, ``sum`` is r times too large (compensated by ``/r``),
and the rest (``std`` with a correction, ``norm``, ``prod``, arg-reductions) are not exact."""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch import Tensor

from ..layout import Layout, gpd_sum_correction
from ..registry import CannotExpand, register
from ._common import arg, norm_dim

_EXACT_OVER_COPIES = {"mean", "amax", "amin", "nanmean", "max", "min"}
_SCALED_BY_R = {"sum", "nansum"}


def _reduced_dims(node, ctx, x):
    nd = ctx.sval(x).dim()
    d = arg(node, 1, "dim")
    if d is None and len(node.args) <= 1 and "dim" not in node.kwargs:
        return list(range(nd)), True
    if d is None:
        return list(range(nd)), True
    if isinstance(d, int):
        return [norm_dim(d, nd)], False
    if isinstance(d, (list, tuple)):
        return [norm_dim(k, nd) for k in d], False
    raise CannotExpand("reduction dim is not a constant")


def reduction(ctx, node):
    x = node.args[0] if node.args else node.kwargs["input"]
    lay = ctx.layout(x)
    if lay is None:
        return ctx.emit_same(), None
    name = node.target if isinstance(node.target, str) else node.target.__name__
    if name in ("max", "min") and len(node.args) > 1 and hasattr(node.args[1], "op"):
        raise CannotExpand("binary max/min is handled element-wise")
    dims, all_dims = _reduced_dims(node, ctx, x)
    keepdim = bool(arg(node, 2, "keepdim", False))
    out = ctx.out
    if lay.dim not in dims:
        new_dim = lay.dim if keepdim else lay.dim - sum(1 for k in dims if k < lay.dim)
        if isinstance(out, tuple):  # (values, indices) of max/min with a dim
            return ctx.emit_same(), tuple(lay.at(new_dim) for _ in out)
        return ctx.emit_same(), lay.at(new_dim)
    if isinstance(out, tuple):
        # (values, indices) of max/min over the channels: the values are exact; the teacher's
        # index points at a copy, whose student channel is index // r in the interleaved layout
        if name not in ("max", "min") or len(dims) != 1:
            raise CannotExpand("arg-reduction (indices) over the channel dim")
        xd, _ = ctx.interleave(x)
        args = (xd,) + tuple(ctx.dt(a) for a in node.args[1:])
        y = ctx.emit(node.op, node.target, args, ctx.dt(node.kwargs))
        values = ctx.call_function(operator.getitem, y, 0)
        indices = ctx.call_function(operator.floordiv, ctx.call_function(operator.getitem, y, 1), ctx.r)
        return ctx.call_function(_values_indices, values, indices), (None, None)
    if name in _EXACT_OVER_COPIES:
        return ctx.emit_same(), None
    if name in _SCALED_BY_R:
        y = ctx.emit_same()
        return ctx.call_function(gpd_sum_correction, y, ctx.r), None
    if name in ("var", "std"):
        return _variance(ctx, node, x, dims, name), None
    raise CannotExpand(f"{name} over the channel dim is not exact for repeated channels")


def _values_indices(values, indices):
    """A ``(values, indices)`` pair like the one ``torch.max(x, dim)`` returns."""
    return torch.return_types.max((values, indices))


def _variance(ctx, node, x, dims, name):
    """Variance over r copies: S/(N-c) in the student, rS/(rN-c) in the teacher (c = correction),
    so one constant factor (its square root for std) makes it exact; c = 0 needs none."""
    correction = node.kwargs.get("correction")
    if correction is None:
        unbiased = node.kwargs.get("unbiased", node.args[2] if len(node.args) > 2 and
                                   isinstance(node.args[2], bool) else True)
        correction = 1 if unbiased else 0
    if isinstance(correction, fx.Node) or "keepdim" not in node.kwargs and len(node.args) > 2 \
            and not isinstance(node.args[2], bool):
        raise CannotExpand("unsupported var/std signature")
    shape = ctx.sval(x).shape
    n = 1
    for k in dims:
        n *= shape[k]
    r = ctx.r
    y = ctx.emit_same()
    if correction == 0:
        return y
    if n - correction <= 0:
        raise CannotExpand("variance of too few elements")
    factor = (r * n - correction) / (r * (n - correction))
    return ctx.call_function(operator.mul, y, factor if name == "var" else factor ** 0.5)


register(torch.mean, "mean", torch.sum, "sum", torch.amax, "amax", torch.amin, "amin",
         torch.max, "max", torch.min, "min", torch.nansum, "nansum", torch.nanmean, "nanmean",
         torch.std, "std", torch.var, "var", torch.norm, "norm", torch.prod, "prod",
         torch.logsumexp, "logsumexp", torch.argmax, "argmax", torch.argmin, "argmin",
         torch.all, "all", torch.any, "any", transparent=True)(reduction)
