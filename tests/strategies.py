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

The modules the programs are built from live in ``tests/nets.py``. Nothing there uses dropout or
other randomness in ``forward``, so train mode is deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from hypothesis import strategies as st
from torch import Tensor, nn

from nets import (
    DTYPE, ACTS, NORMS, make_act, LayerNorm2dManual, make_norm, ConvNormAct, Residual, Concat,
    SplitCat, SqueezeExcite, ChannelShuffle, Scale, PermMix, PERM_OPS, SpatialAttention,
    ConvNeXtBlock, TokenMix, Conv1dBlock, Arith, ARITH, SharedConv, Resample, POOLS, make_pool,
    PoolLinearHead, FlattenLinearHead, ConvHead, InputInject, GenNet, FnNorm, T_NORMS, GenViT,
)

__all__ = ["Case", "cnn_cases", "cnn_programs", "vit_cases", "vit_programs", "build_cnn", "build_vit",
           "conv_spec", "cnn_program", "vit_program"]


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
