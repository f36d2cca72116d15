"""Hypothesis strategies that build random float64 networks step by step for the property tests.

Each strategy draws a small *program* (a dict of plain data, which is what hypothesis prints and
shrinks), then builds an ``nn.Module`` from it with weights seeded by a drawn integer. Shapes are
tracked while drawing so that every drawn op is valid for the tensor it receives.

:func:`cnn_cases` -- a stem conv, 1-5 blocks and a head. Blocks:

* conv-norm-act: kernel 1/3/5, non-square (1x3, 5x1 ...), k4/s2/p1, ``padding="same"`` (also even
  kernels), stride 1/2, dilation 2, padding modes, grouped and depthwise (x1/x2), ``nn.Conv2d``
  or ``F.conv2d`` with a raw parameter; norms: BN (affine or not, cumulative average, no running
  stats, functional ``F.batch_norm(..., self.training)``), GroupNorm, InstanceNorm (with and
  without affine / running stats), LayerNorm over channels (NHWC module, ``F.layer_norm``,
  channels-first written out with mean/var), none; activations incl. PReLU (1 or C) and
  function / method spellings;
* residual add (identity or projection shortcut, ``x + gamma * f(x)``), channel concat of 2-3
  branches (conv, depthwise, pool, identity), split/chunk along channels -> per-piece conv -> cat
  (maybe reversed), squeeze-excitation (conv or linear, mean/adaptive pool, sigmoid or
  hardsigmoid), channel shuffle (shapes read from the tensor or literal), a shuffle followed by an
  op that meets the permuted layout (add/sub/mul/cat with ``x``, split, GN/LN/BN, layer scale, SE,
  conv), CBAM spatial attention (channel mean/max/sum), ConvNeXt block (NHWC Linear MLP, or
  ``y @ self.w`` / ``F.linear`` with raw parameters), token-mixing Linear over the flattened
  spatial dim, Conv1d over the flattened spatial dim, arithmetic with constants and channel
  means, weight sharing (a module called twice, two modules holding one parameter), pools,
  upsampling and padding, layer scale / bias parameters, conv-transpose (k2s2, k3s2 with
  output_padding, k3s1, grouped), and the network input (a kept tensor) concatenated or added back;
* heads: global pool (mean / adaptive / amax / flatten+mean) -> [Linear -> BN1d? -> act] ->
  Linear; flatten -> Linear (``nn.Flatten``, ``reshape``, ``view``, ``flatten``); 1x1 conv + mean.

:func:`vit_cases` -- optional conv-BN stem, patch-embed conv + flatten/transpose (or
permute/reshape), 0-2 prefix tokens (class, distillation; ``expand`` or ``repeat``), pos embed,
1-2 pre- or post-norm blocks (LayerNorm, RMSNorm, or their functional forms), attention with any
head count and head dim (inner width may differ from the model width), fused or separate q/k/v,
``unbind`` or indexing, qk-norm, SDPA / ``q @ k^T`` / pre-scaled ``torch.matmul`` / ``einsum``,
an optional learned logit bias, heads merged by ``reshape`` or ``flatten``; or
``nn.MultiheadAttention``; or an MLP-Mixer token MLP. MLP with GELU (exact/tanh) or SiLU, plain or
gated (``chunk`` + multiply), optional layer scale; class-token / class+dist / mean / patch-mean
pooling, optional fc-norm, linear head.

Nothing here uses dropout or other randomness in ``forward``, so train mode is deterministic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import Tensor, nn

__all__ = ["Case", "cnn_cases", "cnn_programs", "vit_cases", "vit_programs", "build_cnn", "build_vit",
           "conv_spec", "cnn_program", "vit_program"]

DTYPE = torch.float64


class Case:
    """A generated model, an input batch it accepts and the program it was built from.

    A plain class, not a dataclass: hypothesis pretty-prints dataclasses field by field, and a
    falsifying example should show the program, not every weight.
    """

    def __init__(self, program: dict, model: nn.Module, x: Tensor, num_classes: int):
        self.program, self.model, self.x, self.num_classes = program, model, x, num_classes

    @property
    def dynamic_batch(self) -> bool:
        """Whether the model accepts another batch size (no shape written as literals)."""
        return not any(b.get("kind") == "shuffle" and b.get("static") for b in self.program.get("blocks", ())
                       if isinstance(b, dict))

    def other_inputs(self) -> list[Tensor]:
        """Inputs the teacher was not verified on: fresh values, and another batch size if allowed."""
        g = torch.Generator().manual_seed(self.program["seed"] + 1)
        xs = [torch.randn(self.x.shape, generator=g, dtype=self.x.dtype)]
        if self.dynamic_batch:
            xs.append(torch.randn((self.x.shape[0] + 1, *self.x.shape[1:]), generator=g, dtype=self.x.dtype))
        return xs

    def __repr__(self) -> str:  # what hypothesis prints for a falsifying example
        lines = [f"{k}={v!r}" for k, v in self.program.items() if k != "blocks"]
        lines += [f"  block {i}: {b!r}" for i, b in enumerate(self.program.get("blocks", ()))]
        return "Case(\n  " + "\n  ".join(lines) + f"\n  input {tuple(self.x.shape)})"


# --------------------------------------------------------------------------------------------
# building blocks (CNN)
# --------------------------------------------------------------------------------------------

ACTS = ("relu", "gelu", "silu", "hardswish", "leaky_relu", "tanh", "relu6", "prelu", "prelu_c",
        "identity", "f_relu", "method_sigmoid")
NORMS = ("bn", "bn", "bn_noaffine", "bn_cma", "bn_nostats", "bn_fn", "gn", "in", "in_affine", "in_stats",
         "ln_perm", "ln_fn", "ln_cf", "none")


class _FnAct(nn.Module):
    """Activations spelled as functions / tensor methods (so those rule keys are exercised)."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def forward(self, x):
        if self.kind == "f_relu":
            return F.relu(x)
        return x.sigmoid()


def make_act(kind: str, c: int) -> nn.Module:
    if kind == "prelu":
        return nn.PReLU()
    if kind == "prelu_c":
        return nn.PReLU(c, init=0.1)
    if kind in ("f_relu", "method_sigmoid"):
        return _FnAct(kind)
    return {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "hardswish": nn.Hardswish,
            "leaky_relu": lambda: nn.LeakyReLU(0.1), "tanh": nn.Tanh, "relu6": nn.ReLU6,
            "identity": nn.Identity}[kind]()


class LayerNormPermute(nn.Module):
    """LayerNorm over channels via NHWC (ConvNeXt's block spelling)."""

    def __init__(self, c: int, functional: bool):
        super().__init__()
        self.functional = functional
        self.ln = nn.LayerNorm(c, eps=1e-6)

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        if self.functional:
            x = F.layer_norm(x, self.ln.normalized_shape, self.ln.weight, self.ln.bias, 1e-6)
        else:
            x = self.ln(x)
        return x.permute(0, 3, 1, 2)


class LayerNorm2dManual(nn.Module):
    """Channels-first LayerNorm written out with mean/var (timm's ``LayerNorm2d`` of old)."""

    def __init__(self, c: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(c))
        self.bias = nn.Parameter(torch.zeros(c))
        self.eps = 1e-6

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class FunctionalBatchNorm(nn.BatchNorm2d):
    """BatchNorm written with ``F.batch_norm(..., self.training, ...)``: torch.fx would bake the
    flag into the graph at trace time unless the pass keeps it live (DESIGN.md §1)."""

    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            self.training, 0.1, self.eps)


def make_norm(kind: str, c: int, gn_groups: int) -> nn.Module:
    if kind == "bn":
        return nn.BatchNorm2d(c)
    if kind == "bn_fn":
        return FunctionalBatchNorm(c)
    if kind == "bn_noaffine":
        return nn.BatchNorm2d(c, affine=False)
    if kind == "bn_cma":  # cumulative moving average of the statistics
        return nn.BatchNorm2d(c, momentum=None)
    if kind == "bn_nostats":  # batch statistics in eval mode too
        return nn.BatchNorm2d(c, track_running_stats=False)
    if kind == "in_stats":
        return nn.InstanceNorm2d(c, affine=True, track_running_stats=True)
    if kind == "gn":
        return nn.GroupNorm(gn_groups, c)
    if kind == "in":
        return nn.InstanceNorm2d(c)
    if kind == "in_affine":
        return nn.InstanceNorm2d(c, affine=True)
    if kind in ("ln_perm", "ln_fn"):
        return LayerNormPermute(c, functional=kind == "ln_fn")
    if kind == "ln_cf":
        return LayerNorm2dManual(c)
    return nn.Identity()


class RawConv(nn.Module):
    """``F.conv2d(x, self.weight, ...)`` with a raw parameter used directly in ``forward``."""

    def __init__(self, cin, cout, k, stride, padding, dilation, groups, bias):
        super().__init__()
        kh, kw = (k, k) if isinstance(k, int) else k
        self.weight = nn.Parameter(torch.randn(cout, cin // groups, kh, kw) / math.sqrt(cin // groups * kh * kw))
        self.bias = nn.Parameter(torch.randn(cout) * 0.1) if bias else None
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class ConvNormAct(nn.Module):
    def __init__(self, cin, cout, k=3, stride=1, dilation=1, groups=1, bias=False, norm="bn",
                 act="relu", gn_groups=1, raw=False, padding_mode="zeros", same=False, pad=None):
        super().__init__()
        if same:
            pad = "same"
        elif pad is None:  # centred: the output grid is ceil(s / stride) for odd kernels
            pad = dilation * (k // 2) if isinstance(k, int) else tuple(dilation * (kk // 2) for kk in k)
        if raw:
            self.conv = RawConv(cin, cout, k, stride, pad, dilation, groups, bias)
        else:
            self.conv = nn.Conv2d(cin, cout, k, stride, pad, dilation, groups, bias, padding_mode)
        self.norm = make_norm(norm, cout, gn_groups)
        self.act = make_act(act, cout)

    def forward(self, x):
        return self.act(self.norm(self.conv(x)))


class Residual(nn.Module):
    def __init__(self, body: nn.Module, shortcut: nn.Module | None, combine: str, c_out: int, post_act: str):
        super().__init__()
        self.body = body
        self.shortcut = shortcut if shortcut is not None else nn.Identity()
        self.combine = combine
        if combine == "gamma":
            self.gamma = nn.Parameter(torch.randn(c_out, 1, 1) * 0.5)
        self.post = make_act(post_act, c_out)

    def forward(self, x):
        y = self.body(x)
        s = self.shortcut(x)
        if self.combine == "gamma":
            out = s + self.gamma * y
        elif self.combine == "torch_add":
            out = torch.add(s, y)
        else:
            out = s + y
        return self.post(out)


class Concat(nn.Module):
    def __init__(self, branches: list[nn.Module], fn: str):
        super().__init__()
        self.branches = nn.ModuleList(branches)
        self.fn = fn

    def forward(self, x):
        ys = [b(x) for b in self.branches]
        if self.fn == "cat_neg":
            return torch.cat(ys, dim=-3)
        return torch.cat(ys, dim=1)


class SplitCat(nn.Module):
    def __init__(self, how: str, arg, pieces: list[nn.Module], reverse: bool):
        super().__init__()
        self.how, self.arg, self.reverse = how, arg, reverse
        self.pieces = nn.ModuleList(pieces)

    def forward(self, x):
        if self.how == "split_sizes":
            parts = torch.split(x, list(self.arg), dim=1)
        elif self.how == "split_int":
            parts = x.split(self.arg, dim=1)
        else:
            parts = x.chunk(self.arg, dim=1)
        # index the pieces: torch.fx cannot iterate over the proxy that split/chunk return
        ys = [p(parts[i]) for i, p in enumerate(self.pieces)]
        if self.reverse:
            ys = ys[::-1]
        return torch.cat(ys, dim=1)


class SqueezeExcite(nn.Module):
    def __init__(self, c: int, cr: int, variant: str, pool: str, act: str, gate: str):
        super().__init__()
        self.variant, self.pool_kind, self.gate = variant, pool, gate
        if variant == "conv":
            self.fc1 = nn.Conv2d(c, cr, 1)
            self.fc2 = nn.Conv2d(cr, c, 1)
        else:
            self.fc1 = nn.Linear(c, cr)
            self.fc2 = nn.Linear(cr, c)
        self.act = make_act(act, cr)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        if self.variant == "conv":
            s = self.pool(x) if self.pool_kind == "adaptive" else x.mean((2, 3), keepdim=True)
            s = self.fc2(self.act(self.fc1(s)))
        else:
            s = x.mean((2, 3)) if self.pool_kind != "adaptive" else self.pool(x).flatten(1)
            s = self.fc2(self.act(self.fc1(s)))
            s = s[:, :, None, None] if self.pool_kind == "index" else s.view(s.shape[0], s.shape[1], 1, 1)
        s = torch.sigmoid(s) if self.gate == "sigmoid" else F.hardsigmoid(s)
        return x * s


class ChannelShuffle(nn.Module):
    def __init__(self, groups: int, static_shape: tuple | None):
        super().__init__()
        self.groups = groups
        self.static_shape = static_shape

    def forward(self, x):
        if self.static_shape is not None:
            b, c, h, w = self.static_shape
        else:
            b, c, h, w = x.shape
        x = x.reshape(b, self.groups, c // self.groups, h, w).transpose(1, 2)
        return x.contiguous().view(b, c, h, w)


class Scale(nn.Module):
    """Layer scale (and optionally a bias) used directly in forward: ``x * self.gamma``."""

    def __init__(self, c: int, shape4: bool, with_bias: bool):
        super().__init__()
        shape = (1, c, 1, 1) if shape4 else (c, 1, 1)
        self.gamma = nn.Parameter(1.0 + 0.5 * torch.randn(shape))
        self.beta = nn.Parameter(0.5 * torch.randn(shape)) if with_bias else None

    def forward(self, x):
        x = x * self.gamma
        if self.beta is not None:
            x = x + self.beta
        return x


class PermMix(nn.Module):
    """A channel shuffle, then an op that consumes the permuted layout or mixes it with ``x``."""

    def __init__(self, c: int, groups: int, op: str, arg: int):
        super().__init__()
        self.shuffle = ChannelShuffle(groups, None)
        self.op, self.arg, self.c = op, arg, c
        if op == "gn":
            self.norm = nn.GroupNorm(arg, c)
        elif op == "ln":
            self.norm = LayerNorm2dManual(c)
        elif op == "bn":
            self.norm = nn.BatchNorm2d(c)
        elif op == "scale":
            self.scale = Scale(c, True, True)
        elif op == "se":
            self.se = SqueezeExcite(c, max(1, c // 2), "conv", "mean", "relu", "sigmoid")
        elif op == "conv":
            self.conv = nn.Conv2d(c, c, 3, padding=1)
        elif op == "dwconv":
            self.conv = nn.Conv2d(c, c, 3, padding=1, groups=c)

    def forward(self, x):
        y = self.shuffle(x)
        op = self.op
        if op == "add":
            return x + y
        if op == "sub":
            return y - x
        if op == "mul":
            return x * y
        if op == "cat":
            return torch.cat([y, x], 1)
        if op == "split":
            a, b = torch.split(y, [self.arg, self.c - self.arg], dim=1)
            return torch.cat([b, a], 1)
        if op in ("gn", "ln", "bn"):
            return self.norm(y)
        if op == "scale":
            return self.scale(y)
        if op == "se":
            return self.se(y)
        if op in ("conv", "dwconv"):
            return self.conv(y)
        if op == "shuffle2":
            return self.shuffle(y) + x
        if op == "center":
            return y - y.mean(1, keepdim=True)
        raise AssertionError(op)


PERM_OPS = ("add", "sub", "mul", "cat", "split", "gn", "ln", "bn", "scale", "se", "conv", "dwconv",
            "shuffle2", "center")


class SpatialAttention(nn.Module):
    """CBAM's spatial attention: channel mean/max -> conv(2 -> 1) -> sigmoid gate."""

    def __init__(self, k: int, kind: str):
        super().__init__()
        self.kind = kind
        self.conv = nn.Conv2d(2, 1, k, padding=k // 2)

    def forward(self, x):
        if self.kind == "mean_amax":
            s = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], dim=1)
        elif self.kind == "mean_max":  # CBAM's own spelling: max values, indices unused
            s = torch.cat([torch.mean(x, dim=1, keepdim=True), torch.max(x, dim=1, keepdim=True)[0]], dim=1)
        else:  # sum divided by the channel count read from the shape
            s = torch.cat([x.sum(1, keepdim=True) / x.shape[1], x.amin(1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.conv(s))


class ConvNeXtBlock(nn.Module):
    """dwconv -> NHWC LayerNorm -> Linear/GELU/Linear over channels -> gamma -> residual."""

    def __init__(self, c: int, k: int, hidden: int, raw: bool = False):
        super().__init__()
        self.dw = nn.Conv2d(c, c, k, padding=k // 2, groups=c)
        self.norm = nn.LayerNorm(c, eps=1e-6)
        self.raw = raw
        if raw:  # parameters used as weights directly: ``y @ self.w1``, ``F.linear(y, self.w2)``
            self.w1 = nn.Parameter(torch.randn(c, hidden) / math.sqrt(c))
            self.b1 = nn.Parameter(0.1 * torch.randn(hidden))
            self.w2 = nn.Parameter(torch.randn(c, hidden) / math.sqrt(hidden))
        else:
            self.fc1 = nn.Linear(c, hidden)
            self.fc2 = nn.Linear(hidden, c)
        self.act = nn.GELU()
        self.gamma = nn.Parameter(0.5 + torch.rand(c))

    def forward(self, x):
        y = self.norm(self.dw(x).permute(0, 2, 3, 1))
        if self.raw:
            y = F.linear(self.act(y @ self.w1 + self.b1), self.w2)
        else:
            y = self.fc2(self.act(self.fc1(y)))
        return x + (self.gamma * y).permute(0, 3, 1, 2)


class TokenMix(nn.Module):
    """A Linear over the flattened spatial dim (MLP-Mixer's token MLP): channels untouched."""

    def __init__(self, s: int, how: str):
        super().__init__()
        self.fc = nn.Linear(s * s, s * s)
        self.how = how

    def forward(self, x):
        if self.how == "shape":
            return x + self.fc(x.flatten(2)).reshape(x.shape)
        B, C, H, W = x.shape
        return x + self.fc(x.flatten(2)).view(B, C, H, W)


class Conv1dBlock(nn.Module):
    """flatten(2) -> Conv1d over the flattened spatial dim -> back to NCHW."""

    def __init__(self, c: int, cout: int, k: int):
        super().__init__()
        self.conv = nn.Conv1d(c, cout, k, padding=k // 2)
        self.bn = nn.BatchNorm1d(cout)

    def forward(self, x):
        B, C, H, W = x.shape
        y = self.bn(self.conv(x.flatten(2)))
        return y.reshape(B, -1, H, W)


class Arith(nn.Module):
    """Element-wise arithmetic with constants and reductions, as written in user code."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def forward(self, x):
        k = self.kind
        if k == "affine_const":
            return x * 0.5 + 1.0
        if k == "center":
            return x - x.mean(1, keepdim=True)
        if k == "hswish":
            return x * F.relu6(x + 3.0) / 6.0
        if k == "div_norm":
            return x / (x.abs().mean((2, 3), keepdim=True) + 1.0)
        if k == "rsub":
            return x * (1.0 - torch.sigmoid(x))
        if k == "swish":
            return x * x.sigmoid()
        if k == "square":
            return x.pow(2) - x
        raise AssertionError(k)


ARITH = ("affine_const", "center", "hswish", "div_norm", "rsub", "swish", "square")


class SharedConv(nn.Module):
    """Weight sharing: one conv module applied twice (to ``x`` and again to its output, or to a
    shuffled ``x``), or two conv modules holding the same weight parameter (``tied``)."""

    def __init__(self, c: int, k: int, mode: str, groups: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, k, padding=k // 2)
        self.act = nn.ReLU()
        self.mode = mode
        self.shuffle = ChannelShuffle(groups, None) if mode == "shuffled" else None
        if mode == "tied":
            self.conv2 = nn.Conv2d(c, c, k, padding=k // 2)
            self.conv2.weight = self.conv.weight

    def forward(self, x):
        if self.mode == "twice":
            return self.conv(self.act(self.conv(x)))
        if self.mode == "tied":
            return self.conv2(self.act(self.conv(x)))
        return self.conv(x) + self.conv(self.shuffle(x))


class Resample(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)

    def forward(self, x):
        if self.kind == "nearest":
            return F.interpolate(x, scale_factor=2, mode="nearest")
        if self.kind == "bilinear":
            return self.up(x)
        if self.kind == "pad":
            return F.pad(x, (1, 1, 1, 1))
        return F.pad(x, (1, 0, 1, 0), mode="reflect")


class FnPool(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def forward(self, x):
        if self.kind == "f_max":
            return F.max_pool2d(x, 2, 2)
        return F.avg_pool2d(x, 3, 1, 1)


POOLS = ("max2", "avg2", "max3s2", "avg3s1", "f_max", "f_avg3s1", "adaptive_max")


def make_pool(kind: str, s: int) -> nn.Module:
    if kind == "max2":
        return nn.MaxPool2d(2, 2)
    if kind == "avg2":
        return nn.AvgPool2d(2, 2)
    if kind == "max3s2":
        return nn.MaxPool2d(3, 2, 1)
    if kind == "avg3s1":
        return nn.AvgPool2d(3, 1, 1, count_include_pad=False)
    if kind == "adaptive_max":
        return nn.AdaptiveMaxPool2d(max(1, s // 2))
    return FnPool("f_max" if kind == "f_max" else "f_avg3s1")


class PoolLinearHead(nn.Module):
    def __init__(self, c, hidden, classes, pool, act, hidden_bn):
        super().__init__()
        self.pool_kind = pool
        self.pool = nn.AdaptiveAvgPool2d(1)
        layers = []
        if hidden:
            layers += [nn.Linear(c, hidden)]
            if hidden_bn:
                layers += [nn.BatchNorm1d(hidden)]
            layers += [make_act(act, hidden)]
            c = hidden
        layers += [nn.Linear(c, classes)]
        self.mlp = nn.Sequential(*layers)

    def forward(self, x):
        if self.pool_kind == "adaptive":
            x = torch.flatten(self.pool(x), 1)
        elif self.pool_kind == "amax":
            x = x.amax(dim=(2, 3))
        elif self.pool_kind == "flatten_mean":
            x = x.flatten(2).mean(-1)
        else:
            x = x.mean((2, 3))
        return self.mlp(x)


class FlattenLinearHead(nn.Module):
    def __init__(self, c, s, classes, how, pre_pool):
        super().__init__()
        self.how = how
        self.pre = nn.AdaptiveAvgPool2d(pre_pool) if pre_pool else nn.Identity()
        s = pre_pool or s
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(c * s * s, classes)

    def forward(self, x):
        x = self.pre(x)
        if self.how == "module":
            x = self.flatten(x)
        elif self.how == "reshape":
            x = x.reshape(x.shape[0], -1)
        elif self.how == "view":
            x = x.contiguous().view(x.size(0), -1)
        else:
            x = x.flatten(1)
        return self.fc(x)


class ConvHead(nn.Module):
    def __init__(self, c, classes):
        super().__init__()
        self.conv = nn.Conv2d(c, classes, 1)

    def forward(self, x):
        return self.conv(x).mean((2, 3))


class InputInject(nn.Module):
    """Mixes the network input (a tensor that is *kept* at student width in the teacher) back into
    the features: concat with the resized image, or add its 1x1 projection."""

    def __init__(self, in_ch: int, c: int, how: str):
        super().__init__()
        self.how = how
        self.proj = nn.Conv2d(in_ch, c, 1) if how == "add_proj" else None

    def forward(self, x, image):
        img = F.adaptive_avg_pool2d(image, x.shape[-2:])
        if self.how == "cat":
            return torch.cat([x, img], dim=1)
        if self.how == "add_mean":  # broadcast over the channel dim (size 1)
            return x + img.mean(1, keepdim=True)
        return x + self.proj(img)


class GenNet(nn.Module):
    """A generated network: ``head(blocks(stem(x)))``; :class:`InputInject` blocks also get ``x``."""

    def __init__(self, stem: nn.Module, blocks: list[nn.Module], head: nn.Module):
        super().__init__()
        self.stem = stem
        self.blocks = nn.ModuleList(blocks)
        self.head = head

    def forward(self, x):
        y = self.stem(x)
        for blk in self.blocks:
            y = blk(y, x) if isinstance(blk, InputInject) else blk(y)
        return self.head(y)


# --------------------------------------------------------------------------------------------
# drawing (CNN)
# --------------------------------------------------------------------------------------------

WIDTHS = (3, 4, 5, 6, 7, 8, 9, 12)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _conv_out(s: int, k, stride: int, dilation: int, pad=None) -> int:
    k = k if isinstance(k, int) else k[0]  # non-square kernels are odd: both dims agree
    pad = dilation * (k // 2) if pad is None else pad
    return (s + 2 * pad - dilation * (k - 1) - 1) // stride + 1


def _draw_cna(draw, cin: int, s: int, *, cout=None, stride=None, groups=None, allow_raw=True,
              centred=False) -> dict:
    """A conv-norm-act spec valid for a (cin, s, s) input (``centred``: output grid ceil(s/stride))."""
    k = draw(st.sampled_from((1, 3, 5)))
    shape = draw(st.sampled_from(("square",) * 6 + ("rect", "k4s2p1")))
    pad = None
    if shape == "rect":  # Inception-style factorised kernels, padding (0, 1) etc.
        k = draw(st.sampled_from(((1, 3), (3, 1), (1, 5), (5, 1))))
    elif shape == "k4s2p1" and not centred and stride in (None, 2) and s >= 4:
        k, stride, pad = 4, 2, 1  # the usual even-kernel downsampling conv
    if stride is None:
        stride = draw(st.sampled_from((1, 2))) if s >= 4 else 1
    same = False
    if stride == 1 and pad is None and draw(st.integers(0, 5)) == 0:
        # padding="same", also with even kernels (asymmetric padding)
        same = True
        k = draw(st.sampled_from((2, 3, 4, (1, 3))))
    dilation = draw(st.sampled_from((1, 1, 2))) if k in (2, 3) and s >= 5 and pad is None else 1
    if cout is None:
        cout = draw(st.sampled_from(WIDTHS))
    if groups is None:
        groups = 1
    norm = draw(st.sampled_from(NORMS))
    gn_groups = draw(st.sampled_from(_divisors(cout))) if norm == "gn" else 1
    act = draw(st.sampled_from(ACTS))
    raw = allow_raw and draw(st.integers(0, 4)) == 0
    padding_mode = "zeros"
    p = pad if pad is not None else dilation * ((k if isinstance(k, int) else max(k)) // 2)
    if not raw and 0 < p < s and draw(st.integers(0, 5)) == 0:
        padding_mode = draw(st.sampled_from(("reflect", "replicate", "circular")))
    if same:
        raw, padding_mode = False, "zeros"
    return dict(cin=cin, cout=cout, k=k, stride=stride, dilation=dilation, groups=groups,
                bias=draw(st.booleans()), norm=norm, act=act, gn_groups=gn_groups, raw=raw,
                padding_mode=padding_mode, same=same, pad=pad)


def _cna_out(spec: dict, s: int) -> tuple[int, int]:
    if spec.get("same"):
        return spec["cout"], s
    return spec["cout"], _conv_out(s, spec["k"], spec["stride"], spec["dilation"], spec.get("pad"))


BLOCKS = ("cna", "grouped", "depthwise", "residual", "concat", "split", "se", "shuffle", "pool",
          "scale", "convT", "perm_mix", "spatial_att", "convnext", "token_mix", "conv1d", "arith",
          "shared", "resample", "inject")


# --- block kinds: a draw and a build function per kind, paired in BLOCK_KINDS -----------------

def _draw_cna_block(draw, c: int, s: int, in_ch: int) -> tuple[dict, int, int]:
    kind = "cna"
    spec = _draw_cna(draw, c, s)
    return dict(kind=kind, conv=spec), *_cna_out(spec, s)


def _draw_grouped_block(draw, c: int, s: int, in_ch: int) -> tuple[dict, int, int]:
    kind = "grouped"
    gs = [g for g in _divisors(c) if g > 1]
    if not gs:
        return _draw_block(draw, c, s, in_ch)
    g = draw(st.sampled_from(gs))
    cout = g * draw(st.integers(1, max(1, 12 // g)))
    spec = _draw_cna(draw, c, s, cout=cout, groups=g)
    return dict(kind=kind, conv=spec), *_cna_out(spec, s)


def _draw_depthwise_block(draw, c: int, s: int, in_ch: int) -> tuple[dict, int, int]:
    kind = "depthwise"
    spec = _draw_cna(draw, c, s, cout=c * draw(st.sampled_from((1, 1, 2))), groups=c)
    return dict(kind=kind, conv=spec), *_cna_out(spec, s)


def _draw_residual_block(draw, c: int, s: int, in_ch: int) -> tuple[dict, int, int]:
    kind = "residual"
    stride = draw(st.sampled_from((1, 2))) if s >= 4 else 1
    cout = draw(st.sampled_from((c, c, *WIDTHS)))
    two = draw(st.booleans())
    first = _draw_cna(draw, c, s, stride=stride, cout=None if two else cout, centred=True)
    body = [first]
    if two:
        body.append(_draw_cna(draw, first["cout"], _cna_out(first, s)[1], cout=cout, stride=1, centred=True))
    # odd kernels with padding d*(k//2) give the same grid as a 1x1 stride-s shortcut
    s1 = _cna_out(first, s)[1]
    shortcut = None
    if stride != 1 or cout != c or draw(st.integers(0, 3)) == 0:
        shortcut = dict(cin=c, cout=cout, k=1, stride=stride, dilation=1, groups=1, bias=False,
                        norm=draw(st.sampled_from(("bn", "none"))), act="identity", gn_groups=1,
                        raw=False, padding_mode="zeros")
    return dict(kind=kind, body=body, shortcut=shortcut,
                combine=draw(st.sampled_from(("add", "gamma", "torch_add"))),
                post_act=draw(st.sampled_from(("relu", "identity", "silu")))), cout, s1


def _draw_concat_block(draw, c: int, s: int, in_ch: int) -> tuple[dict, int, int]:
    kind = "concat"
    n = draw(st.integers(2, 3))
    branches, width = [], 0
    for _ in range(n):
        b = draw(st.sampled_from(("identity", "conv", "conv", "pool", "depthwise")))
        if b == "conv":
            spec = _draw_cna(draw, c, s, stride=1)
            branches.append(dict(kind="cna", conv=spec))
            width += spec["cout"]
        elif b == "depthwise":
            spec = _draw_cna(draw, c, s, stride=1, cout=c, groups=c)
            branches.append(dict(kind="cna", conv=spec))
            width += c
        else:
            branches.append(dict(kind=b))
            width += c
    return dict(kind=kind, branches=branches, fn=draw(st.sampled_from(("cat", "cat_neg")))), width, s


def _draw_split_block(draw, c: int, s: int, in_ch: int) -> tuple[dict, int, int]:
    kind = "split"
    if c < 2:
        return _draw_block(draw, c, s, in_ch)
    how = draw(st.sampled_from(("split_sizes", "split_int", "chunk")))
    if how == "split_sizes":
        c1 = draw(st.integers(1, c - 1))
        arg, sizes = (c1, c - c1), [c1, c - c1]
    elif how == "split_int":
        arg = draw(st.integers(1, c - 1))
        sizes = [arg] * (c // arg) + ([c % arg] if c % arg else [])
    else:
        arg = draw(st.integers(2, min(3, c)))
        sizes = [t.shape[1] for t in torch.zeros(1, c).chunk(arg, dim=1)]
    pieces, width = [], 0
    for w in sizes:
        if draw(st.booleans()):
            spec = _draw_cna(draw, w, s, stride=1)
            pieces.append(dict(kind="cna", conv=spec))
            width += spec["cout"]
        else:
            pieces.append(dict(kind="identity"))
            width += w
    return dict(kind=kind, how=how, arg=arg, pieces=pieces, reverse=draw(st.booleans())), width, s


def _draw_se_block(draw, c: int, s: int, in_ch: int) -> tuple[dict, int, int]:
    kind = "se"
    return dict(kind=kind, cr=draw(st.integers(1, max(1, c // 2))),
                variant=draw(st.sampled_from(("conv", "linear"))),
                pool=draw(st.sampled_from(("adaptive", "mean", "index"))),
                act=draw(st.sampled_from(("relu", "silu", "gelu"))),
                gate=draw(st.sampled_from(("sigmoid", "hardsigmoid")))), c, s


def _draw_shuffle_block(draw, c: int, s: int, in_ch: int) -> tuple[dict, int, int]:
    kind = "shuffle"
    gs = [g for g in _divisors(c) if 1 < g < c]
    if not gs:
        return _draw_block(draw, c, s, in_ch)
    return dict(kind=kind, groups=draw(st.sampled_from(gs)), static=draw(st.booleans())), c, s


def _draw_pool_block(draw, c: int, s: int, in_ch: int) -> tuple[dict, int, int]:
    kind = "pool"
    pools = [p for p in POOLS if s >= 4 or p in ("avg3s1", "f_avg3s1")]
    p = draw(st.sampled_from(pools))
    s2 = {"max2": s // 2, "avg2": s // 2, "f_max": s // 2, "max3s2": (s - 1) // 2 + 1,
          "adaptive_max": max(1, s // 2)}.get(p, s)
    return dict(kind=kind, pool=p), c, s2


def _draw_scale_block(draw, c: int, s: int, in_ch: int) -> tuple[dict, int, int]:
    kind = "scale"
    return dict(kind=kind, shape4=draw(st.booleans()), bias=draw(st.booleans())), c, s


def _draw_convT_block(draw, c: int, s: int, in_ch: int) -> tuple[dict, int, int]:
    kind = "convT"
    cout = draw(st.sampled_from(WIDTHS))
    g = draw(st.sampled_from([d for d in _divisors(c) if cout % d == 0]))
    up = draw(st.sampled_from((False, "k2s2", "k3s2p1op1"))) if s <= 8 else False
    return dict(kind=kind, cout=cout, up=up, groups=g, bias=draw(st.booleans()),
                norm=draw(st.sampled_from(("bn", "none"))), act=draw(st.sampled_from(ACTS))), \
        cout, (2 * s if up else s)


def _draw_perm_mix_block(draw, c: int, s: int, in_ch: int) -> tuple[dict, int, int]:
    kind = "perm_mix"
    gs = [g for g in _divisors(c) if 1 < g < c]
    if not gs:
        return _draw_block(draw, c, s, in_ch)
    op = draw(st.sampled_from(PERM_OPS))
    arg = 0
    if op == "gn":
        arg = draw(st.sampled_from(_divisors(c)))
    elif op == "split":
        arg = draw(st.integers(1, c - 1))
    return dict(kind=kind, groups=draw(st.sampled_from(gs)), op=op, arg=arg), (2 * c if op == "cat" else c), s


def _draw_spatial_att_block(draw, c: int, s: int, in_ch: int) -> tuple[dict, int, int]:
    kind = "spatial_att"
    return dict(kind=kind, k=draw(st.sampled_from((3, 5, 7))),
                how=draw(st.sampled_from(("mean_amax", "mean_max", "sum_amin")))), c, s


def _draw_convnext_block(draw, c: int, s: int, in_ch: int) -> tuple[dict, int, int]:
    kind = "convnext"
    return dict(kind=kind, k=draw(st.sampled_from((3, 7))), hidden=draw(st.sampled_from((c, 2 * c, 7))),
                raw=draw(st.booleans())), c, s


def _draw_token_mix_block(draw, c: int, s: int, in_ch: int) -> tuple[dict, int, int]:
    kind = "token_mix"
    return dict(kind=kind, how=draw(st.sampled_from(("shape", "unpack")))), c, s


def _draw_conv1d_block(draw, c: int, s: int, in_ch: int) -> tuple[dict, int, int]:
    kind = "conv1d"
    cout = draw(st.sampled_from(WIDTHS))
    return dict(kind=kind, cout=cout, k=draw(st.sampled_from((1, 3)))), cout, s


def _draw_arith_block(draw, c: int, s: int, in_ch: int) -> tuple[dict, int, int]:
    kind = "arith"
    return dict(kind=kind, how=draw(st.sampled_from(ARITH))), c, s


def _draw_shared_block(draw, c: int, s: int, in_ch: int) -> tuple[dict, int, int]:
    kind = "shared"
    gs = [g for g in _divisors(c) if 1 < g < c]
    mode = draw(st.sampled_from(("twice", "tied", "shuffled") if gs else ("twice", "tied")))
    return dict(kind=kind, k=draw(st.sampled_from((1, 3))), mode=mode,
                groups=draw(st.sampled_from(gs)) if mode == "shuffled" else 1), c, s


def _draw_inject_block(draw, c: int, s: int, in_ch: int) -> tuple[dict, int, int]:
    kind = "inject"
    how = draw(st.sampled_from(("cat", "add_mean", "add_proj")))
    return dict(kind=kind, how=how), (c + in_ch if how == "cat" else c), s


def _draw_resample_block(draw, c: int, s: int, in_ch: int) -> tuple[dict, int, int]:
    kind = "resample"
    hows = ("pad",) + (("pad_reflect",) if s >= 2 else ()) + (("nearest", "bilinear") if s <= 8 else ())
    how = draw(st.sampled_from(hows))
    return dict(kind=kind, how=how), c, {"pad": s + 2, "pad_reflect": s + 1}.get(how, 2 * s)


def _build_conv(spec: dict, c: int, s: int, in_ch: int) -> nn.Module:
    return ConvNormAct(**spec["conv"])


def _build_identity(spec: dict, c: int, s: int, in_ch: int) -> nn.Module:
    return nn.Identity()


def _build_residual(spec: dict, c: int, s: int, in_ch: int) -> nn.Module:
    body = nn.Sequential(*[ConvNormAct(**b) for b in spec["body"]])
    short = ConvNormAct(**spec["shortcut"]) if spec["shortcut"] else None
    return Residual(body, short, spec["combine"], spec["body"][-1]["cout"], spec["post_act"])


def _build_concat(spec: dict, c: int, s: int, in_ch: int) -> nn.Module:
    return Concat([_build_block(b, c, s) for b in spec["branches"]], spec["fn"])


def _build_split(spec: dict, c: int, s: int, in_ch: int) -> nn.Module:
    return SplitCat(spec["how"], spec["arg"], [_build_block(p, c, s) for p in spec["pieces"]],
                    spec["reverse"])


def _build_se(spec: dict, c: int, s: int, in_ch: int) -> nn.Module:
    return SqueezeExcite(c, spec["cr"], spec["variant"], spec["pool"], spec["act"], spec["gate"])


def _build_shuffle(spec: dict, c: int, s: int, in_ch: int) -> nn.Module:
    return ChannelShuffle(spec["groups"], spec.get("static_shape"))


def _build_pool(spec: dict, c: int, s: int, in_ch: int) -> nn.Module:
    if "pool" not in spec:  # a concat branch
        return nn.MaxPool2d(3, 1, 1)
    return make_pool(spec["pool"], s)


def _build_scale(spec: dict, c: int, s: int, in_ch: int) -> nn.Module:
    return Scale(c, spec["shape4"], spec["bias"])


def _build_convT(spec: dict, c: int, s: int, in_ch: int) -> nn.Module:
    g, b = spec["groups"], spec["bias"]
    if spec["up"] == "k2s2":
        conv = nn.ConvTranspose2d(c, spec["cout"], 2, 2, groups=g, bias=b)
    elif spec["up"]:  # k3, stride 2, padding 1, output_padding 1: exactly 2x
        conv = nn.ConvTranspose2d(c, spec["cout"], 3, 2, 1, output_padding=1, groups=g, bias=b)
    else:
        conv = nn.ConvTranspose2d(c, spec["cout"], 3, 1, 1, groups=g, bias=b)
    return nn.Sequential(conv, make_norm(spec["norm"], spec["cout"], 1), make_act(spec["act"], spec["cout"]))


def _build_perm_mix(spec: dict, c: int, s: int, in_ch: int) -> nn.Module:
    return PermMix(c, spec["groups"], spec["op"], spec["arg"])


def _build_spatial_att(spec: dict, c: int, s: int, in_ch: int) -> nn.Module:
    return SpatialAttention(spec["k"], spec["how"])


def _build_convnext(spec: dict, c: int, s: int, in_ch: int) -> nn.Module:
    return ConvNeXtBlock(c, spec["k"], spec["hidden"], spec["raw"])


def _build_token_mix(spec: dict, c: int, s: int, in_ch: int) -> nn.Module:
    return TokenMix(s, spec["how"])


def _build_conv1d(spec: dict, c: int, s: int, in_ch: int) -> nn.Module:
    return Conv1dBlock(c, spec["cout"], spec["k"])


def _build_arith(spec: dict, c: int, s: int, in_ch: int) -> nn.Module:
    return Arith(spec["how"])


def _build_shared(spec: dict, c: int, s: int, in_ch: int) -> nn.Module:
    return SharedConv(c, spec["k"], spec["mode"], spec["groups"])


def _build_resample(spec: dict, c: int, s: int, in_ch: int) -> nn.Module:
    return Resample(spec["how"])


def _build_inject(spec: dict, c: int, s: int, in_ch: int) -> nn.Module:
    return InputInject(in_ch, c, spec["how"])


@dataclass(frozen=True)
class BlockKind:
    """One kind of CNN block: how to draw its spec (``draw(draw, c, s, in_ch) -> (spec, c_out,
    s_out)``; ``None`` for kinds that only occur inside another block) and how to build it from
    the spec (``build(spec, c, s, in_ch) -> nn.Module``). One table entry per kind replaces the
    two ``if kind == ...`` chains that had to be kept in sync."""
    draw: Callable | None
    build: Callable


BLOCK_KINDS: dict[str, BlockKind] = {
    "cna": BlockKind(_draw_cna_block, _build_conv),
    "grouped": BlockKind(_draw_grouped_block, _build_conv),
    "depthwise": BlockKind(_draw_depthwise_block, _build_conv),
    "residual": BlockKind(_draw_residual_block, _build_residual),
    "concat": BlockKind(_draw_concat_block, _build_concat),
    "split": BlockKind(_draw_split_block, _build_split),
    "se": BlockKind(_draw_se_block, _build_se),
    "shuffle": BlockKind(_draw_shuffle_block, _build_shuffle),
    "pool": BlockKind(_draw_pool_block, _build_pool),
    "scale": BlockKind(_draw_scale_block, _build_scale),
    "convT": BlockKind(_draw_convT_block, _build_convT),
    "perm_mix": BlockKind(_draw_perm_mix_block, _build_perm_mix),
    "spatial_att": BlockKind(_draw_spatial_att_block, _build_spatial_att),
    "convnext": BlockKind(_draw_convnext_block, _build_convnext),
    "token_mix": BlockKind(_draw_token_mix_block, _build_token_mix),
    "conv1d": BlockKind(_draw_conv1d_block, _build_conv1d),
    "arith": BlockKind(_draw_arith_block, _build_arith),
    "shared": BlockKind(_draw_shared_block, _build_shared),
    "inject": BlockKind(_draw_inject_block, _build_inject),
    "resample": BlockKind(_draw_resample_block, _build_resample),
    "identity": BlockKind(None, _build_identity),   # a concat/split branch
}
assert all(BLOCK_KINDS[k].draw is not None for k in BLOCKS), "every drawn kind has a draw function"


def _draw_block(draw, c: int, s: int, in_ch: int = 3) -> tuple[dict, int, int]:
    """One block spec for a (c, s, s) input, and its output channels and size."""
    kind = draw(st.sampled_from(BLOCKS))
    return BLOCK_KINDS[kind].draw(draw, c, s, in_ch)


def _build_block(spec: dict, c: int, s: int, in_ch: int = 3) -> nn.Module:
    return BLOCK_KINDS[spec["kind"]].build(spec, c, s, in_ch)


def _randomize(model: nn.Module) -> None:
    """Non-trivial norm affines and running statistics, so eval-mode BN is not an identity."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm, nn.InstanceNorm2d,
                              nn.LayerNorm, nn.RMSNorm, LayerNorm2dManual, FnNorm)):
                if getattr(m, "weight", None) is not None:
                    m.weight.copy_(1.0 + 0.3 * torch.randn_like(m.weight))
                if getattr(m, "bias", None) is not None:
                    m.bias.copy_(0.3 * torch.randn_like(m.bias))
                if getattr(m, "running_mean", None) is not None:
                    m.running_mean.copy_(0.2 * torch.randn_like(m.running_mean))
                    m.running_var.copy_(0.5 + torch.rand_like(m.running_var))


def build_cnn(program: dict) -> Case:
    """Build the model and input described by a CNN program (deterministic in ``program['seed']``)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(program["seed"])
        c, s = program["in_ch"], program["size"]
        stem = ConvNormAct(**program["stem"])
        c, s = _cna_out(program["stem"], s)
        blocks = []
        for spec in program["blocks"]:
            if spec["kind"] == "shuffle" and spec["static"]:
                spec = dict(spec, static_shape=(program["batch"], c, s, s))
            blk = _build_block(spec, c, s, program["in_ch"])
            probe = torch.zeros(program["batch"], c, s, s)
            with torch.no_grad():
                if isinstance(blk, InputInject):
                    y = blk.eval()(probe, torch.zeros(program["batch"], program["in_ch"], 2, 2))
                else:
                    y = blk.eval()(probe)
            c, s = y.shape[1], y.shape[2]
            blocks.append(blk)
        h = program["head"]
        if h["kind"] == "pool_linear":
            head = PoolLinearHead(c, h["hidden"], program["classes"], h["pool"], h["act"], h["hidden_bn"])
        elif h["kind"] == "flatten_linear":
            pre = 2 if c * s * s > 400 else 0
            head = FlattenLinearHead(c, s, program["classes"], h["how"], pre)
        else:
            head = ConvHead(c, program["classes"])
        model = GenNet(stem, blocks, head)
        _randomize(model)
        model = model.to(DTYPE).train()
        x = torch.randn(program["batch"], program["in_ch"], program["size"], program["size"], dtype=DTYPE)
    return Case(program, model, x, program["classes"])


@st.composite
def cnn_programs(draw, max_blocks: int = 5) -> dict:
    """A random CNN program (plain data; :func:`build_cnn` turns it into a module)."""
    size = draw(st.sampled_from((8, 9, 12, 16)))
    in_ch = draw(st.sampled_from((1, 3)))
    stem = _draw_cna(draw, in_ch, size)
    c, s = _cna_out(stem, size)
    blocks = []
    for _ in range(draw(st.integers(1, max_blocks))):
        spec, c, s = _draw_block(draw, c, s, in_ch)
        blocks.append(spec)
    head_kind = draw(st.sampled_from(("pool_linear", "pool_linear", "flatten_linear", "conv")))
    head = dict(kind=head_kind)
    if head_kind == "pool_linear":
        head.update(hidden=draw(st.sampled_from((0, 0, 5, 8))),
                    pool=draw(st.sampled_from(("mean", "adaptive", "amax", "flatten_mean"))),
                    act=draw(st.sampled_from(("relu", "gelu"))), hidden_bn=draw(st.booleans()))
    elif head_kind == "flatten_linear":
        head.update(how=draw(st.sampled_from(("module", "reshape", "view", "method"))))
    return dict(seed=draw(st.integers(0, 2**16)), batch=draw(st.integers(2, 4)), in_ch=in_ch,
                size=size, classes=draw(st.integers(2, 6)), stem=stem, blocks=tuple(blocks), head=head)


@st.composite
def cnn_cases(draw, max_blocks: int = 5) -> Case:
    """A random float64 CNN with its input batch (see the module docstring)."""
    return build_cnn(draw(cnn_programs(max_blocks)))


# --------------------------------------------------------------------------------------------
# transformers
# --------------------------------------------------------------------------------------------

class ConvStem(nn.Module):
    """A conv-BN-act stem before the patch embedding (hybrid models): train mode matters."""

    def __init__(self, in_ch, out_ch):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(out_ch)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class PatchEmbed(nn.Module):
    def __init__(self, in_ch, dim, patch, how, norm):
        super().__init__()
        self.proj = nn.Conv2d(in_ch, dim, patch, patch)
        self.how = how
        self.norm = nn.LayerNorm(dim) if norm else nn.Identity()

    def forward(self, x):
        x = self.proj(x)
        if self.how == "permute":
            x = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, x.shape[1])
        else:
            x = x.flatten(2).transpose(1, 2)
        return self.norm(x)


class Attention(nn.Module):
    def __init__(self, dim, heads, head_dim, fused, qkv_bias, kind, unbind, qk_norm=False, rel_bias_tokens=0,
                 merge="reshape"):
        super().__init__()
        self.merge = merge
        self.h, self.d = heads, head_dim
        inner = heads * head_dim
        self.fused, self.kind, self.unbind = fused, kind, unbind
        self.scale = head_dim ** -0.5
        if fused:
            self.qkv = nn.Linear(dim, 3 * inner, bias=qkv_bias)
        else:
            self.q = nn.Linear(dim, inner, bias=qkv_bias)
            self.k = nn.Linear(dim, inner, bias=qkv_bias)
            self.v = nn.Linear(dim, inner, bias=qkv_bias)
        # timm's qk_norm: LayerNorm over the head dim of q and k
        self.q_norm = nn.LayerNorm(head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(head_dim) if qk_norm else nn.Identity()
        # a learned bias added to the attention logits (Swin/BEiT-style relative position bias)
        self.rel_bias = nn.Parameter(0.5 * torch.randn(heads, rel_bias_tokens, rel_bias_tokens)) if rel_bias_tokens else None
        self.proj = nn.Linear(inner, dim)

    def forward(self, x):
        B, N, _ = x.shape
        if self.fused:
            qkv = self.qkv(x).reshape(B, N, 3, self.h, self.d).permute(2, 0, 3, 1, 4)
            if self.unbind:
                q, k, v = qkv.unbind(0)
            else:
                q, k, v = qkv[0], qkv[1], qkv[2]
        else:
            q = self.q(x).reshape(B, N, self.h, self.d).transpose(1, 2)
            k = self.k(x).reshape(B, N, self.h, self.d).transpose(1, 2)
            v = self.v(x).view(B, N, self.h, self.d).permute(0, 2, 1, 3)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.kind == "sdpa":
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=self.rel_bias)
        else:
            if self.kind == "explicit":
                a = (q @ k.transpose(-2, -1)) * self.scale
            elif self.kind == "einsum":
                a = torch.einsum("bhnd,bhmd->bhnm", q, k) * self.scale
            else:  # timm's "q = q * scale" spelling, torch.matmul
                q = q * self.scale
                a = torch.matmul(q, k.transpose(-2, -1))
            if self.rel_bias is not None:
                a = a + self.rel_bias
            a = a.softmax(dim=-1) if self.kind == "explicit" else F.softmax(a, dim=-1)
            o = torch.einsum("bhnm,bhmd->bhnd", a, v) if self.kind == "einsum" else a @ v
        o = o.transpose(1, 2)
        o = o.flatten(2) if self.merge == "flatten" else o.reshape(B, N, self.h * self.d)
        return self.proj(o)


class MHA(nn.Module):
    def __init__(self, dim, heads, bias):
        super().__init__()
        self.mha = nn.MultiheadAttention(dim, heads, bias=bias, batch_first=True)

    def forward(self, x):
        return self.mha(x, x, x, need_weights=False)[0]


class Mlp(nn.Module):
    def __init__(self, dim, hidden, act, glu=False):
        super().__init__()
        self.glu = glu
        self.fc1 = nn.Linear(dim, 2 * hidden if glu else hidden)
        self.act = {"gelu": nn.GELU(), "gelu_tanh": nn.GELU(approximate="tanh"), "silu": nn.SiLU()}[act]
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        x = self.fc1(x)
        if self.glu:  # SwiGLU-style: split the hidden features in two along the channel dim
            x1, x2 = x.chunk(2, dim=-1)
            return self.fc2(self.act(x1) * x2)
        return self.fc2(self.act(x))


class TokenMixer(nn.Module):
    """MLP-Mixer's token MLP: a Linear over the sequence dim, channels untouched."""

    def __init__(self, n):
        super().__init__()
        self.fc = nn.Linear(n, n)

    def forward(self, x):
        return self.fc(x.transpose(1, 2)).transpose(1, 2)


class FnNorm(nn.Module):
    """LayerNorm / RMSNorm over the last dim spelled with ``F.layer_norm`` / ``F.rms_norm``."""

    def __init__(self, dim: int, rms: bool):
        super().__init__()
        self.rms = rms
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = None if rms else nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        if self.rms:
            return F.rms_norm(x, (x.shape[-1],), self.weight, 1e-6)
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


def _tnorm(kind, dim):
    if kind in ("ln_fn", "rms_fn"):
        return FnNorm(dim, kind == "rms_fn")
    return nn.LayerNorm(dim) if kind == "ln" else nn.RMSNorm(dim, eps=1e-6)


T_NORMS = ("ln", "ln", "rms", "ln_fn", "rms_fn")


class Block(nn.Module):
    def __init__(self, dim, spec, n_tokens):
        super().__init__()
        self.pre = spec["pre_norm"]
        self.norm1 = _tnorm(spec["norm"], dim)
        self.norm2 = _tnorm(spec["norm"], dim)
        a = spec["attn"]
        if a["kind"] == "mha":
            self.attn = MHA(dim, a["heads"], a["bias"])
        elif a["kind"] == "mixer":
            self.attn = TokenMixer(n_tokens)
        else:
            self.attn = Attention(dim, a["heads"], a["head_dim"], a["fused"], a["bias"], a["kind"], a["unbind"],
                                  a["qk_norm"], n_tokens if a["rel_bias"] else 0, a["merge"])
        self.mlp = Mlp(dim, spec["mlp_hidden"], spec["act"], spec["glu"])
        self.ls = spec["layer_scale"]
        if self.ls:
            self.gamma1 = nn.Parameter(0.5 + torch.rand(dim))
            self.gamma2 = nn.Parameter(0.5 + torch.rand(dim))

    def forward(self, x):
        if self.pre:
            y = self.attn(self.norm1(x))
            x = x + (self.gamma1 * y if self.ls else y)
            y = self.mlp(self.norm2(x))
            return x + (self.gamma2 * y if self.ls else y)
        y = self.attn(x)
        x = self.norm1(x + (self.gamma1 * y if self.ls else y))
        y = self.mlp(x)
        return self.norm2(x + (self.gamma2 * y if self.ls else y))


class GenViT(nn.Module):
    def __init__(self, p: dict):
        super().__init__()
        dim = p["dim"]
        n = (p["size"] // p["patch"]) ** 2
        in_ch = p["in_ch"]
        self.stem = ConvStem(in_ch, p["stem"]) if p["stem"] else nn.Identity()
        self.patch_embed = PatchEmbed(p["stem"] or in_ch, dim, p["patch"], p["embed_how"], p["embed_norm"])
        self.prefix = p["prefix_tokens"]  # 0, 1 (class token) or 2 (class + distillation token)
        self.cls_how = p["cls_how"]
        if self.prefix >= 1:
            self.cls_token = nn.Parameter(0.5 * torch.randn(1, 1, dim))
        if self.prefix == 2:
            self.dist_token = nn.Parameter(0.5 * torch.randn(1, 1, dim))
        n += self.prefix
        self.pos_embed = nn.Parameter(0.5 * torch.randn(1, n, dim)) if p["pos_embed"] else None
        self.blocks = nn.Sequential(*[Block(dim, b, n) for b in p["blocks"]])
        self.norm = _tnorm(p["final_norm"], dim) if p["final_norm"] else nn.Identity()
        self.pool = p["pool"]
        self.fc_norm = nn.LayerNorm(dim) if p["fc_norm"] else nn.Identity()
        self.head = nn.Linear(dim, p["classes"])

    def forward(self, x):
        x = self.patch_embed(self.stem(x))
        if self.prefix == 1 and self.cls_how == "repeat":
            x = torch.cat([self.cls_token.repeat(x.shape[0], 1, 1), x], dim=1)
        elif self.prefix == 1:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        elif self.prefix == 2:
            B = x.shape[0]
            x = torch.cat((self.cls_token.expand(B, -1, -1), self.dist_token.expand(B, -1, -1), x), dim=1)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        x = self.norm(self.blocks(x))
        if self.pool == "cls":
            x = x[:, 0]
        elif self.pool == "cls_dist":
            x = (x[:, 0] + x[:, 1]) / 2
        elif self.pool == "mean_patch":
            x = x[:, self.prefix:].mean(dim=1)
        else:
            x = x.mean(dim=1)
        return self.head(self.fc_norm(x))


@st.composite
def vit_programs(draw) -> dict:
    """A random ViT-style program."""
    patch = draw(st.sampled_from((2, 4)))
    size = draw(st.sampled_from((8, 12))) if patch == 4 else draw(st.sampled_from((6, 8)))
    blocks = []
    dim = draw(st.sampled_from((4, 6, 8, 9, 12)))
    for _ in range(draw(st.integers(1, 2))):
        kind = draw(st.sampled_from(("sdpa", "explicit", "explicit_prescale", "einsum", "mha", "mixer")))
        if kind == "mha":
            attn = dict(kind=kind, heads=draw(st.sampled_from(_divisors(dim))), bias=draw(st.booleans()))
        elif kind == "mixer":
            attn = dict(kind=kind)
        else:
            heads = draw(st.integers(1, 4))
            # inner width = heads * head_dim; equal to dim (timm) or not
            if dim % heads == 0 and draw(st.booleans()):
                head_dim = dim // heads
            else:
                # Head dim 1 is drawn only where a reshape shows it: (B, N, H) -> (B, N, H, 1)
                # reads the same as an SE-style (B, C) -> (B, C, 1, 1), where the channels must
                # stay put, so an unfused head-dim-1 projection is exact through a boundary
                # rather than widened (fused (B, N, 3*H) -> (B, N, 3, H, 1) is a visible split).
                head_dim = draw(st.integers(1 if heads > 1 else 2, 5))
            attn = dict(kind=kind, heads=heads, head_dim=head_dim,
                        fused=True if head_dim == 1 else draw(st.booleans()),
                        bias=draw(st.booleans()), unbind=draw(st.booleans()), qk_norm=draw(st.booleans()),
                        rel_bias=draw(st.integers(0, 3)) == 0, merge=draw(st.sampled_from(("reshape", "flatten"))))
        blocks.append(dict(pre_norm=draw(st.booleans()), norm=draw(st.sampled_from(T_NORMS)),
                           attn=attn, mlp_hidden=draw(st.sampled_from((dim, 2 * dim, 7))),
                           act=draw(st.sampled_from(("gelu", "gelu_tanh", "silu"))), glu=draw(st.booleans()),
                           layer_scale=draw(st.booleans())))
    prefix = draw(st.sampled_from((0, 1, 1, 2)))
    pools = ("mean",) + (("cls", "mean_patch") if prefix else ()) + (("cls_dist",) if prefix == 2 else ())
    return dict(seed=draw(st.integers(0, 2**16)), batch=draw(st.integers(2, 4)), in_ch=3, size=size,
                stem=draw(st.sampled_from((0, 0, 0, 5))), patch=patch, dim=dim,
                embed_how=draw(st.sampled_from(("flatten", "permute"))),
                embed_norm=draw(st.booleans()), prefix_tokens=prefix, pos_embed=draw(st.integers(0, 3)) > 0,
                final_norm=draw(st.sampled_from(T_NORMS + (None,))), pool=draw(st.sampled_from(pools)),
                cls_how=draw(st.sampled_from(("expand", "repeat"))),
                fc_norm=draw(st.booleans()), classes=draw(st.integers(2, 6)), blocks=tuple(blocks))


def build_vit(program: dict) -> Case:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(program["seed"])
        model = GenViT(program)
        _randomize(model)
        model = model.to(DTYPE).train()
        x = torch.randn(program["batch"], program["in_ch"], program["size"], program["size"], dtype=DTYPE)
    return Case(program, model, x, program["classes"])


@st.composite
def vit_cases(draw) -> Case:
    """A random float64 ViT-style model with its input batch."""
    return build_vit(draw(vit_programs()))


# --------------------------------------------------------------------------------------------
# hand-written programs (minimal failing examples kept as regression @examples)
# --------------------------------------------------------------------------------------------

def conv_spec(cin: int, cout: int, k=1, **kw) -> dict:
    """A conv-norm-act spec with plain defaults (1x1, no norm, no activation)."""
    spec = dict(cin=cin, cout=cout, k=k, stride=1, dilation=1, groups=1, bias=False, norm="none",
                act="identity", gn_groups=1, raw=False, padding_mode="zeros", same=False, pad=None)
    spec.update(kw)
    return spec


def cnn_program(*blocks: dict, width: int = 4, head: dict | None = None, seed: int = 0, batch: int = 2,
                size: int = 6) -> Case:
    """A CNN case: 1x1 stem 3 -> ``width``, then ``blocks``, then a 1x1-conv head (2 classes)."""
    return build_cnn(dict(seed=seed, batch=batch, in_ch=3, size=size, classes=2, stem=conv_spec(3, width),
                          blocks=tuple(blocks), head=head or dict(kind="conv")))


def vit_program(attn: dict, norm: str = "ln", seed: int = 0) -> Case:
    """A one-block ViT case (8x8 input, patch 4, width 6, no class token) with the given attention."""
    a = dict(kind="sdpa", heads=2, head_dim=3, fused=True, bias=False, unbind=True, qk_norm=False,
             rel_bias=False, merge="reshape")
    a.update(attn)
    block = dict(pre_norm=True, norm=norm, attn=a, mlp_hidden=6, act="gelu", glu=False, layer_scale=False)
    return build_vit(dict(seed=seed, batch=2, in_ch=3, size=8, stem=0, patch=4, dim=6, embed_how="flatten",
                          embed_norm=False, prefix_tokens=0, pos_embed=False, final_norm=None, pool="mean",
                          cls_how="expand", fc_norm=False, classes=2, blocks=(block,)))
