"""Element-wise ops (activations, arithmetic, dropout, type casts) and ops over spatial dims.

One broadcasting rule covers unary and n-ary ops alike: the output takes the layout of the
first expanded operand; other expanded operands are permuted to it, and kept operands whose
size on that dim is the student width are widened (parameters in place, others at run time).
"""

from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layout import Layout
from ..registry import CannotExpand, register, register_when_imported
from ._common import arg, norm_dim

_ACTIVATION_MODULES = [
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid,
    nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Softsign, nn.Tanhshrink,
    nn.Threshold, nn.Hardtanh, nn.Hardshrink, nn.Softshrink, nn.LogSigmoid, nn.RReLU,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
    nn.Identity,
]
_ACTIVATION_FUNCTIONS = [
    F.relu, F.relu_, F.relu6, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid, F.leaky_relu,
    F.elu, F.selu, F.celu, F.softplus, F.softsign, F.tanhshrink, F.threshold, F.hardtanh,
    F.hardshrink, F.softshrink, F.logsigmoid, F.sigmoid, F.tanh, F.dropout, F.dropout1d,
    F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout, F.rrelu,
    torch.relu, torch.relu_, torch.sigmoid, torch.tanh, torch.exp, torch.log, torch.sqrt,
    torch.rsqrt, torch.abs, torch.neg, torch.sign, torch.sin, torch.cos, torch.erf, torch.square,
    torch.reciprocal, torch.clamp, torch.clip, torch.nan_to_num, torch.floor, torch.ceil,
    torch.round, torch.trunc, torch.log1p, torch.expm1, torch.exp2, torch.sigmoid_,
    torch.dropout, torch.nn.functional.hardtanh_, torch.nn.functional.elu_,
    torch.nn.functional.leaky_relu_, operator.neg, operator.pos, operator.invert, torch.detach,
    torch.clone,
]
_ACTIVATION_METHODS = [
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "exp", "exp_", "log", "sqrt",
    "rsqrt", "abs", "neg", "sign", "sin", "cos", "erf", "square", "reciprocal", "clamp",
    "clamp_", "clip", "clamp_min", "clamp_min_", "clamp_max", "clamp_max_", "floor", "ceil",
    "round", "trunc", "log1p", "expm1", "nan_to_num", "contiguous", "clone", "detach", "float",
    "double", "half", "bfloat16", "to", "type", "type_as", "requires_grad_", "hardtanh_",
    "neg_", "zero_", "fill_", "masked_fill_",
]
_BINARY_FUNCTIONS = [
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.pow,
    operator.mod, operator.iadd, operator.isub, operator.imul, operator.itruediv,
    torch.add, torch.sub, torch.subtract, torch.mul, torch.multiply, torch.div, torch.divide,
    torch.true_divide, torch.pow, torch.maximum, torch.minimum, torch.where, torch.lerp,
    torch.addcmul, torch.addcdiv, torch.fmod, torch.remainder, torch.eq, torch.ne, torch.lt,
    torch.le, torch.gt, torch.ge, operator.eq, operator.ne, operator.lt, operator.le, operator.gt,
    operator.ge, operator.and_, operator.or_, torch.logical_and, torch.logical_or, torch.atan2,
    torch.hypot, torch.rsub,
]
_BINARY_METHODS = [
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "pow", "pow_", "maximum",
    "minimum", "lerp", "lerp_", "addcmul", "addcmul_", "addcdiv", "where", "fmod", "remainder",
    "__add__", "__radd__", "__mul__", "__rmul__", "__sub__", "__rsub__", "__truediv__",
    "eq", "ne", "lt", "le", "gt", "ge", "masked_fill", "copy_",
]


def broadcast(ctx, node):
    """Any broadcasting element-wise op: align every tensor operand to one output layout."""
    out = ctx.out
    tensors = ctx.tensor_inputs(node)
    ref: Layout | None = None
    converted = {}
    for a in tensors:
        lay = ctx.layout(a)
        if not isinstance(lay, Layout):
            continue
        d = lay.dim + out.dim() - ctx.sval(a).dim() if isinstance(out, Tensor) else lay.dim
        if lay.width == 1 and isinstance(out, Tensor) and out.shape[d] != 1:
            # one student channel in r copies (FocalNet's gate `gates[:, l:l+1]`) that the
            # student broadcasts over the channels: at student width it broadcasts the same way
            converted[a] = ctx.narrow(a)
        elif ref is None:
            ref = lay.at(d)
    if ref is None:
        if tensors:
            return ctx.emit_same(_replace(ctx, node.args, converted), _replace(ctx, node.kwargs, converted)), None
        return ctx.emit_same(), None
    if not isinstance(out, Tensor):
        raise CannotExpand("element-wise op returned a non-tensor")
    for a in tensors:
        if a in converted:
            continue
        sv = ctx.sval(a)
        d = ref.dim - (out.dim() - sv.dim())
        if d < 0:
            continue
        lay = ctx.layout(a)
        if lay is None and sv.shape[d] == 1:
            continue
        if lay is None and sv.shape[d] != ref.width:
            raise CannotExpand(f"operand {a.name} has size {sv.shape[d]} on the channel dim")
        converted[a] = ctx.to_layout(a, ref.at(d))
    args = _replace(ctx, node.args, converted)
    kwargs = _replace(ctx, node.kwargs, converted)
    return ctx.emit_same(args, kwargs), ref


def _replace(ctx, value, converted):
    from torch.fx.node import map_aggregate
    import torch.fx as fx

    def one(a):
        if isinstance(a, fx.Node) and a in converted:
            return converted[a]
        return ctx.student_scalar(a) if isinstance(a, fx.Node) else a

    return map_aggregate(value, one)


register(*_ACTIVATION_MODULES, *_ACTIVATION_FUNCTIONS, *_ACTIVATION_METHODS, transparent=True)(broadcast)
register(*_BINARY_FUNCTIONS, *_BINARY_METHODS)(broadcast)


@register(nn.PReLU, F.prelu, torch.prelu, "prelu", transparent=True)
def prelu(ctx, node):
    """PReLU: a per-channel slope on dim 1 (or one shared slope)."""
    x = node.args[0]
    lay = ctx.layout(x)
    if lay is None:
        return ctx.emit_same(), None
    if node.op == "call_module":
        m = ctx.module()
        if m.weight.numel() == 1:
            return ctx.emit_same(), lay
        if lay.dim != 1:
            raise CannotExpand("PReLU slopes are per channel on dim 1")
        from ._common import clone_module
        from ..weights import widen_per_channel

        new = clone_module(m, {"weight": widen_per_channel(m.weight.detach(), 0, lay.index)},
                           num_parameters=lay.index.numel())
        ctx.add_module(node.target, new)
        ctx.add_source(f"{node.target}.weight", node.target, "weight", out=(0, lay.first_copy()))
        return ctx.emit("call_module", node.target, (ctx.dt(x),), {}), lay
    w = arg(node, 1, "weight")
    if ctx.sval(w).numel() == 1:
        return ctx.emit_same(), lay
    if lay.dim != 1:
        raise CannotExpand("prelu slopes are per channel on dim 1")
    wd = ctx.to_layout(w, lay.at(0))
    return ctx.emit_same((ctx.dt(x), wd)), lay


# ---- ops over a fixed set of trailing (spatial) dims ------------------------------------------
def _trailing_dims_rule(count):
    """Rule for ops that act on the last ``count(node, ctx)`` dims and leave the others alone."""

    def rule(ctx, node):
        x = node.args[0] if node.args else node.kwargs.get("input")
        lay = ctx.layout(x)
        if lay is None:
            return ctx.emit_same(), None
        nd = ctx.sval(x).dim()
        k = count(ctx, node, nd)
        if lay.dim >= nd - k:
            raise CannotExpand("op acts on the expanded channel dim")
        out = ctx.out
        if isinstance(out, tuple):  # max-pool with return_indices: both share the layout
            return ctx.emit_same(), tuple(lay for _ in out)
        return ctx.emit_same(), lay

    return rule


# Spatial rank of each pooling / resampling op: the op acts on that many trailing dims, and the
# dim before them is the channel dim (batched or not). Ops whose rank follows the input
# (nn.Upsample, F.interpolate) are not listed: they act on every dim after (N, C).
_POOL_RANK: dict = {}
for _rank, _ops in {
    1: [nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d, nn.LPPool1d,
        F.max_pool1d, F.avg_pool1d, F.adaptive_avg_pool1d, F.adaptive_max_pool1d, F.lp_pool1d,
        torch.avg_pool1d, torch.adaptive_avg_pool1d],
    2: [nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.LPPool2d,
        nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d,
        F.adaptive_max_pool2d, F.lp_pool2d, F.upsample_bilinear, torch.max_pool2d, F.max_pool2d_with_indices],
    3: [nn.MaxPool3d, nn.AvgPool3d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool3d, nn.LPPool3d,
        F.max_pool3d, F.avg_pool3d, F.adaptive_avg_pool3d, F.adaptive_max_pool3d, F.lp_pool3d],
}.items():
    _POOL_RANK.update(dict.fromkeys(_ops, _rank))
# the ATen resampling ops behind F.interpolate, by their Python bindings: what the torch.export
# front end sees where torch.fx sees F.interpolate
_UPSAMPLE_BINDINGS = []
for _kind, _rank in (("nearest1d", 1), ("nearest2d", 2), ("nearest3d", 3), ("linear1d", 1), ("bilinear2d", 2),
                     ("bicubic2d", 2), ("trilinear3d", 3)):
    if hasattr(torch._C._nn, f"upsample_{_kind}"):
        _UPSAMPLE_BINDINGS.append(getattr(torch._C._nn, f"upsample_{_kind}"))
        _POOL_RANK[_UPSAMPLE_BINDINGS[-1]] = _rank
_RANK_OF_INPUT = [nn.Upsample, F.interpolate, F.upsample, F.upsample_nearest]


def _pool_dims(ctx, node, nd):
    """Number of trailing dims the pooling / resampling op of ``node`` acts on (from its type or
    function, never its name); ``nd - 2`` for ops whose rank follows the (N, C, ...) input."""
    keys = type(ctx.module()).__mro__ if node.op == "call_module" else (node.target,)
    return next((_POOL_RANK[k] for k in keys if k in _POOL_RANK), nd - 2)


_POOL_MODULES = [k for k in _POOL_RANK if isinstance(k, type)] + [nn.Upsample]
_POOL_FUNCTIONS = [k for k in _POOL_RANK if not isinstance(k, type) and k not in _UPSAMPLE_BINDINGS] + \
    [f for f in _RANK_OF_INPUT if not isinstance(f, type)]
register(*_POOL_MODULES, *_POOL_FUNCTIONS, *_UPSAMPLE_BINDINGS, transparent=True)(_trailing_dims_rule(_pool_dims))


@register(F.grid_sample, torch.grid_sampler)
def grid_sample(ctx, node):
    """Sampling each channel at the same grid points: exact per channel when the input is
    widened on a non-spatial dim. The grid (sample coordinates, last dim 2 or 3) is used at
    the student's width: it arrives widened when a conv predicts it (RAFT's flow head), and
    its student copy holds the exact coordinates."""
    x = node.args[0] if node.args else node.kwargs["input"]
    by_keyword = len(node.args) < 2
    grid = node.kwargs["grid"] if by_keyword else node.args[1]
    lay = ctx.layout(x)
    if lay is None and ctx.layout(grid) is None:
        return ctx.emit_same(), None
    if lay is not None and lay.dim >= 2:
        raise CannotExpand("grid_sample input widened on a spatial dim")
    args, kwargs = list(ctx.dt(node.args)), dict(ctx.dt(node.kwargs))
    if by_keyword:
        kwargs["grid"] = ctx.narrow(grid)
    else:
        args[1] = ctx.narrow(grid)
    return ctx.emit_same(tuple(args), kwargs), lay


@register(nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d,
          nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d, nn.ReplicationPad1d,
          nn.ReplicationPad2d, nn.ReplicationPad3d, nn.CircularPad1d, nn.CircularPad2d,
          nn.CircularPad3d, F.pad)
def pad(ctx, node):
    """Padding: exact when the channel dim itself gets no padding (channels-last pads give it 0)."""
    x = node.args[0]
    lay = ctx.layout(x)
    if lay is None:
        return ctx.emit_same(), None
    nd = ctx.sval(x).dim()
    amounts = ctx.module().padding if node.op == "call_module" else ctx.sval(arg(node, 1, "pad"))
    amounts = list(amounts)
    k = nd - 1 - lay.dim   # pads are listed from the last dim backwards, two per dim
    if 2 * k + 1 < len(amounts) and (amounts[2 * k] != 0 or amounts[2 * k + 1] != 0):
        raise CannotExpand("pads the expanded channel dim")
    return ctx.emit_same(), lay


# ---- ops along one given dim ---------------------------------------------------------------
def along_dim_rule(dim_index: int, dim_name: str, default=None, module_attr: str = "dim"):
    """Ops that act along one dim (softmax, cumsum): exact when that dim is not the expanded one."""

    def rule(ctx, node):
        x = node.args[0] if node.args else node.kwargs.get("input")
        lay = ctx.layout(x)
        if lay is None:
            return ctx.emit_same(), None
        nd = ctx.sval(x).dim()
        d = getattr(ctx.module(), module_attr) if node.op == "call_module" else arg(node, dim_index, dim_name, default)
        if d is None:
            raise CannotExpand("implicit dim")
        if norm_dim(d, nd) == lay.dim:
            raise CannotExpand("acts along the expanded channel dim (not channel-wise)")
        return ctx.emit_same(), lay

    return rule


register(nn.Softmax, nn.LogSoftmax, nn.Softmin, F.softmax, F.log_softmax, F.softmin, torch.softmax,
         torch.log_softmax, "softmax", "log_softmax", torch.cumsum, "cumsum", torch.cumprod,
         "cumprod", torch.logcumsumexp, F.normalize,
         transparent=True)(along_dim_rule(1, "dim"))
register(torch.flip, "flip")(along_dim_rule(1, "dims"))


@register(torch.roll, "roll")
def roll(ctx, node):
    """``roll`` over dims other than the channel dim (Swin's shifted windows)."""
    x = node.args[0]
    lay = ctx.layout(x)
    if lay is None:
        return ctx.emit_same(), None
    dims = arg(node, 2, "dims")
    nd = ctx.sval(x).dim()
    dims = [dims] if isinstance(dims, int) else list(dims or [])
    if not dims or lay.dim in [norm_dim(d, nd) for d in dims]:
        raise CannotExpand("roll over the channel dim")
    return ctx.emit_same(), lay


@register(getattr, len, "size", "dim", "numel", "__len__", "ndimension", "nelement", "get_device")
def meta(ctx, node):
    """Shape/metadata queries: teacher values (e.g. the wider size) are used as they come."""
    if node.op == "call_function" and node.target is getattr:
        name = node.args[1]
        x = node.args[0]
        lay = ctx.layout(x)
        if name in ("T", "mT") and isinstance(lay, Layout):
            nd = ctx.sval(x).dim()
            if name == "T":
                return ctx.emit_same(), lay.at(nd - 1 - lay.dim)
            d = {nd - 1: nd - 2, nd - 2: nd - 1}.get(lay.dim, lay.dim)
            return ctx.emit_same(), lay.at(d)
        if isinstance(ctx.out, Tensor) and isinstance(lay, Layout):
            raise CannotExpand(f"tensor attribute {name}")
    return ctx.emit_same(), None


def _install_torchvision_rules() -> None:
    from torchvision.models.swin_transformer import _patch_merging_pad

    register(_patch_merging_pad)(swin_patch_merging)


register_when_imported("torchvision", _install_torchvision_rules)


def swin_patch_merging(ctx, node):
    """torchvision Swin's patch merging (an fx-wrapped function): pad H/W of a channels-last
    tensor, take the four 2x2 phases and concatenate them along channels."""
    x = node.args[0]
    lay = ctx.layout(x)
    if lay is None:
        return ctx.emit_same(), None
    if lay.dim != ctx.sval(x).dim() - 1:
        raise CannotExpand("channels-last patch merging with the channels elsewhere")
    c = lay.width
    index = torch.cat([lay.index + k * c for k in range(4)])
    return ctx.emit_same(), Layout(lay.dim, index, ctx.r)
