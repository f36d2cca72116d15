"""The building blocks of the generated test networks: CNN blocks and heads, ViT parts.

``tests/strategies.py`` draws programs (plain dicts) and builds models from these modules; the
modules themselves hold no randomness in ``forward``, so train mode is deterministic.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

DTYPE = torch.float64


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


def randomize_branch_scales(dt, seed: int = 1) -> None:
    """Move every multi-branch layer's scale vectors ``v_<kind>`` away from their init (zero for
    the extra branches), so that every branch carries value and gradient in a test."""
    from gpd_fx.passes.branches import _Branched

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in dt.teacher.modules():
            if isinstance(m, _Branched):
                for v in m._scales().values():
                    v.normal_(generator=g)


def seeded_runs(model: nn.Module, dt, x, seed: int = 0):
    """``(model(x), dt(x), dt.student(x))`` without grad, each after ``torch.manual_seed(seed)``:
    in train mode random ops (dropout, stochastic depth) then draw the same stream in all three."""
    outs = []
    with torch.no_grad():
        for fn in (model, dt, dt.student):
            torch.manual_seed(seed)
            outs.append(fn(x))
    return tuple(outs)
