"""Channel-branch reparameterization: multi-branch conv and linear layers, each branch folded
into one online kernel or run on the activations, whichever this step's shapes make cheaper.

Every branch is linear in the input, so the sum of branches is one kernel
``K = sum_b v_b[:, None, ...] * K_b``. Each branch is computed in one of two ways, chosen per
layer and per input shape (``branch_mode='auto'``, cached per shape; ``'fold'``, ``'run'`` or a
per-kind dict force it):

- *folded* (OREPA-style): added into ``K`` in every forward, and ``K`` applied by one conv /
  linear. Per-step cost independent of the batch: about ``out*in*k^2`` element operations per
  branch, plus ``out*mid*in*k^2`` multiply-adds for the composed 1x1->kxk kernel. The 1x1 and
  identity branches are added to the centre tap in place and the average branch is broadcast
  over the window: no padded or expanded branch kernel is built.
- *run* (DBB-style): the branch as its own small conv(s) on the activations, scaled per output
  channel and added (cost proportional to batch x spatial size). Wins on small feature maps,
  where a kernel-sized pass costs more than the convolution.

Both give the same values and gradients up to rounding. The scale vectors ``v_b`` (one entry per
output channel) start at 1 for the original branch and 0 for every other, so the layer equals
the given one at init, while each extra branch owns randomly initialised parameters so that
``d loss / d v_b`` is non-zero from the first step.

The student map of a layer (select output copy 0, sum input copies) commutes with per-output
scales and factorises over a composition, so :meth:`_Branched.mapped_weight` maps each branch
factor first and folds at student width; inside a joint teacher/student forward the teacher
reads aliases of the branch tensors from one fused map (``share_map``).

Which conv branches apply (see :meth:`BranchConvNd.applicable_branches`):

=========== ==================================================================================
``kxk``      always: the original kernel (must be in every branch set).
``1x1``      kernel > 1 somewhere and odd in every spatial dim (a 1x1 needs a centre tap).
``1x1_kxk``  kernel > 1 somewhere: grouped 1x1 (in -> mid) then k×k (mid -> out), composed.
``1x1_avg``  kernel > 1 somewhere: 1x1 (in -> out) then a k×k average (uniform kernel).
``identity`` out == in, stride 1 everywhere, kernel odd everywhere (Dirac at the centre).
=========== ==================================================================================

Every branch uses the layer's stride, padding, dilation and groups, so all land on the k×k
output grid. The fold equals running the branches as separate ops (1x1 conv, then a k×k conv or
average padded like the layer) at the borders too, for every ``padding_mode``: the inner 1x1s
have no bias and act per pixel, so they commute with zero, reflect, replicate and circular
padding. The 1x1 and identity branches read the centre tap of each k×k window.

For 1x1 convs only ``kxk`` and ``identity`` apply: a 1x1 or 1x1-average branch would be the
original kernel again, and 1x1->1x1 only re-factors the same linear map, so they add
parameters without adding a new direction of the kernel.
"""
from __future__ import annotations

import abc
import contextlib
import functools
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gpd_fx.errors import GPDError

from .student_map import _GradPool, _stride_of, inp_part, map_tensor, out_part, share_map

__all__ = [
    "BRANCH_KINDS_CONV",
    "BRANCH_MODES",
    "BRANCH_KINDS_LINEAR",
    "BranchConfigError",
    "BranchConvNd",
    "BranchLinear",
]

BRANCH_KINDS_CONV = ("kxk", "1x1", "1x1_kxk", "1x1_avg", "identity")
BRANCH_KINDS_LINEAR = ("linear", "identity", "lowrank")


class BranchConfigError(GPDError, ValueError):
    """A branch set or layer configuration that the multi-branch layers cannot build."""


def _tuple(value: int | Sequence[int], dim: int, name: str) -> tuple[int, ...]:
    out = (value,) * dim if isinstance(value, int) else tuple(int(v) for v in value)
    if len(out) != dim:
        raise BranchConfigError(f"{name}={value!r} must be an int or a {dim}-tuple")
    return out


def _uniform(shape: Sequence[int], fan_in: int, like: Tensor, generator: torch.Generator | None) -> Tensor:
    # nn.Conv/nn.Linear's default (kaiming_uniform with a=sqrt(5)) bound, drawn from the
    # caller's generator on its own device so that a seed reproduces the layer anywhere.
    bound = 1.0 / math.sqrt(max(1, fan_in))
    device = generator.device if generator is not None else like.device
    t = torch.empty(tuple(shape), dtype=like.dtype, device=device)
    return t.uniform_(-bound, bound, generator=generator).to(like.device)


def _resolve(requested: Sequence[str] | None, reasons: dict[str, str | None], original: str,
             where: str = "this layer") -> tuple[str, ...]:
    """Validate a requested branch set against ``reasons`` (kind -> why it does not apply);
    ``where`` names the layer in error messages."""
    if requested is None:
        return tuple(k for k, why in reasons.items() if why is None)
    if isinstance(requested, str):
        requested = (requested,)
    kinds = tuple(requested)
    for kind in kinds:
        if kind not in reasons:
            raise BranchConfigError(f"{where}: unknown branch kind {kind!r}; valid kinds are {tuple(reasons)}")
        if reasons[kind] is not None:
            raise BranchConfigError(f"{where}: branch {kind!r} does not apply: {reasons[kind]}")
    if len(set(kinds)) != len(kinds):
        raise BranchConfigError(f"{where}: branch kinds listed twice in {kinds}")
    if original not in kinds:
        raise BranchConfigError(
            f"{where}: branches={kinds} lacks {original!r}, the branch that holds the given weight; add it"
        )
    # The original branch first: at init the sum is then 1*W + 0 + ... + 0, which is W exactly.
    return (original,) + tuple(k for k in kinds if k != original)


# ------------------------------------------------------------------------------ convolution


# Output maps up to this many pixels run a 1x1 convolution as a matmul (oneDNN's 1x1
# convolution on 1x1 and 2x2 maps measured 2-25x slower than F.linear; at 8x8 they are even).
_MATMUL_MAX_PIXELS = 4


@functools.lru_cache(maxsize=4096)
def _live_taps(sizes: tuple[int, ...], kernel: tuple[int, ...], stride: tuple[int, ...],
               pads: tuple[tuple[int, int], ...], dilation: tuple[int, ...]):
    """The box of kernel taps that ever read the input (not only zero padding), and the padding
    that keeps the output grid when the kernel is cut to that box; ``None`` when every tap is
    live or the cut would change the grid. On small feature maps (a 3x3 conv on 1x1 or 2x2
    maps, the last stage of a CNN at 32x32) most taps read only padding."""
    cut, new_pads, changed = [], [], False
    for n, k, s, (pl, pr), d in zip(sizes, kernel, stride, pads, dilation):
        out = (n + pl + pr - d * (k - 1) - 1) // s + 1
        if out < 1:
            return None
        live = [t for t in range(k) if any(0 <= j * s - pl + t * d < n for j in range(out))]
        if not live:
            return None
        t0, t1 = live[0], live[-1]
        left, right = pl - t0 * d, pr - (k - 1 - t1) * d
        if left < 0 or right < 0 or (n + left + right - d * (t1 - t0) - 1) // s + 1 != out:
            return None
        # right padding past the last window's end is never read: trimming it to the left
        # padding keeps the grid (the last window still fits) and makes the cut symmetric, so
        # a strided 3x3 on a 2x2 map (live box 2x2, pads (0, 1)) becomes a 2x2 conv without padding
        if (out - 1) * s + d * (t1 - t0) + 1 - n - left <= left < right:
            right = left
        cut.append((t0, t1 + 1))
        new_pads.append((left, right))
        changed = changed or t0 > 0 or t1 < k - 1
    return (tuple(cut), tuple(new_pads)) if changed else None


def _taps(*key):
    # Dynamo traces the plain function (pure integer arithmetic) instead of warning about the cache
    return _live_taps.__wrapped__(*key) if torch.compiler.is_compiling() else _live_taps(*key)


def conv_nd(x: Tensor, w: Tensor, bias: Tensor | None, stride: tuple[int, ...], pads: tuple[tuple[int, int], ...],
            dilation: tuple[int, ...], groups: int, pool=None) -> Tensor:
    """``F.conv{1,2,3}d`` with explicit (left, right) zero padding per dim, computed cheaply.

    Exact rewrites of the same sum: taps that only ever read padding are cut from the kernel
    (their products are zero; where the cut leaves one tap, or a GEMM follows), a 2-D
    ungrouped conv with at most ``_MATMUL_MAX_PIXELS`` output pixels and symmetric padding runs
    as im2col + one GEMM, and a 1x1 kernel without padding on such a map as one (batched)
    matmul (oneDNN's convolution on tiny maps is 2-25x slower than the matmul on this CPU,
    backward included).
    Under ``torch.fx`` tracing it is the plain conv. ``pool``: where a cut kernel's full-size
    gradient is written (:class:`_BoxSlice`).
    """
    dim = len(stride)
    conv = (F.conv1d, F.conv2d, F.conv3d)[dim - 1]
    if isinstance(x, torch.fx.Proxy) or isinstance(w, torch.fx.Proxy):
        if all(l == r for l, r in pads):
            return conv(x, w, bias, stride, [l for l, _ in pads], dilation, groups)
        return conv(F.pad(x, [p for lr in reversed(pads) for p in lr]), w, bias, stride, 0, dilation, groups)
    out_pixels = 1
    for n, k, st, (pl, pr), d in zip(x.shape[2:], w.shape[2:], stride, pads, dilation):
        out_pixels *= (n + pl + pr - d * (k - 1) - 1) // st + 1
    gemm = dim == 2 and groups == 1 and out_pixels <= _MATMUL_MAX_PIXELS
    plan = _taps(tuple(x.shape[2:]), tuple(w.shape[2:]), tuple(stride), tuple(pads), tuple(dilation))
    if plan is not None and all(left == right for left, right in plan[1]) and (
            gemm or all(b - a == 1 for a, b in plan[0])):
        # cut the dead taps: on a 1x1 map a 3x3 kernel keeps its centre (9x less GEMM work, and
        # no im2col/col2im of padding). Only where the following product is a GEMM, or the cut
        # leaves one tap: a box-shaped k'>1 kernel would send oneDNN down a slow path.
        w = box_slice(w, (slice(None), slice(None), *(slice(a, b) for a, b in plan[0])), pool)
        pads = plan[1]
    if gemm and any(k > 1 for k in w.shape[2:]) and all(pl == pr for pl, pr in pads):
        # im2col + one GEMM with the whole (contiguous) kernel: any taps left that read padding
        # multiply zeros, and the kernel's gradient is one GEMM output
        n, out = x.shape[0], w.shape[0]
        cols = F.unfold(x, tuple(w.shape[2:]), dilation=tuple(dilation), padding=tuple(pl for pl, _ in pads),
                        stride=tuple(stride))                                     # (n, c*K, L)
        length = cols.shape[2]
        y = F.linear(cols.transpose(1, 2).reshape(n * length, -1), w.reshape(out, -1), bias)
        oh = (x.shape[2] + 2 * pads[0][0] - dilation[0] * (w.shape[2] - 1) - 1) // stride[0] + 1
        return y.reshape(n, length, out).transpose(1, 2).reshape(n, out, oh, length // oh)
    cin_g = w.shape[1]
    pixels = 1
    for n, st in zip(x.shape[2:], stride):
        pixels *= -(-n // st)
    if all(k == 1 for k in w.shape[2:]) and all(lr == (0, 0) for lr in pads) and pixels <= _MATMUL_MAX_PIXELS:
        if any(st != 1 for st in stride):
            x = x[(slice(None), slice(None), *(slice(None, None, st) for st in stride))]
        n, c, spatial = x.shape[0], x.shape[1], tuple(x.shape[2:])
        hw, out = math.prod(spatial), w.shape[0]
        if groups == 1:
            # (n, hw, c) @ (c, out): one GEMM over all pixels; F.linear's backward is two GEMMs
            y = F.linear(x.reshape(n, c, hw).transpose(1, 2), w.reshape(out, c))
            y = y.transpose(1, 2).reshape(n, out, *spatial)
        else:
            xs = x.reshape(n, groups, cin_g, hw).permute(1, 2, 0, 3).reshape(groups, cin_g, n * hw)
            y = torch.bmm(w.reshape(groups, out // groups, cin_g), xs)
            y = y.reshape(groups, out // groups, n, hw).permute(2, 0, 1, 3).reshape(n, out, *spatial)
        return y if bias is None else y + bias.view(-1, *(1,) * dim)
    if all(l == r for l, r in pads):
        return conv(x, w, bias, stride, [l for l, _ in pads], dilation, groups)
    return conv(F.pad(x, [p for lr in reversed(pads) for p in lr]), w, bias, stride, 0, dilation, groups)


# ---------------------------------------------------------------------------------- planning
#
# Each branch is computed either *folded* (its kernel added into one kernel that a single conv
# applies: a per-step cost independent of the batch, about out*in*k^2 element operations, and
# out*mid*in*k^2 multiply-adds for 1x1->kxk) or *run* (its own small conv on the activations,
# scaled per output channel and added: cost proportional to batch x spatial size). Both are
# the same linear function. The choice is made from this step's shapes by a cost model in
# multiply-adds, once per input shape, and cached on the layer.

BRANCH_MODES = ("auto", "fold", "run")
"""``branch_mode`` values: choose by cost, fold every branch (one conv), run every branch."""

# One element read or written costs about this many multiply-adds (single-thread CPU: ~30-60
# GFLOP/s in GEMM/conv vs ~1 G elements/s of memory traffic). Calibrated on ResNet layer
# shapes, fold vs run, forward + backward.
_MEM = 20.0
# forward + backward of a GEMM/conv: the forward and two gradient products
_FB = 3.0


class _ScaleRows(torch.autograd.Function):
    """``w * v[:, None, ...]`` whose backward takes ``v``'s gradient as one row-wise dot product
    (``vecdot``) instead of materialising ``g * w`` and summing it: one pass over ``w`` and no
    kernel-sized temporary (measured 2.2 ms against 5.9 ms for a 512x512x3x3 kernel)."""

    @staticmethod
    def forward(ctx, w, v):
        ctx.save_for_backward(w, v)
        return w * v.view((-1,) + (1,) * (w.dim() - 1))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        w, v = ctx.saved_tensors
        gw = gv = None
        if ctx.needs_input_grad[0]:
            gw = g * v.view((-1,) + (1,) * (w.dim() - 1))
        if ctx.needs_input_grad[1]:
            gv = torch.linalg.vecdot(g.reshape(g.shape[0], -1), w.reshape(w.shape[0], -1))
        return gw, gv


def cut_padding(cut) -> tuple[int, ...] | None:
    """The conv ``padding`` under which the box-shaped kernel of a live-tap cut (``(box, pads)``
    from :meth:`BranchConvNd.student_cut`) gives the same output grid: its per-dim padding where
    left equals right on every dim; ``None`` for no cut or an asymmetric one (then the box is
    zero-padded back to the full kernel and the conv keeps its padding)."""
    if cut is None or any(left != right for left, right in cut[1]):
        return None
    return tuple(left for left, _ in cut[1])


@functools.lru_cache(maxsize=256)
def _tap_index(kshape: tuple[int, ...], box: tuple[tuple[int, int], ...]) -> Tensor:
    """Flat indices (row-major over ``kshape``) of the kernel taps inside ``box`` (start, stop per dim)."""
    grid = torch.arange(math.prod(kshape)).view(kshape)
    return grid[tuple(slice(a, b) for a, b in box)].flatten()


class _BoxSlice(torch.autograd.Function):
    """``w[box]`` as a contiguous tensor (``box``: full slices over the two channel dims, then one
    slice per kernel dim), whose backward writes the full-size gradient once.

    A contiguous ``w`` is read as ``(out * in, taps)`` rows and its box taps gathered with one
    ``index_select`` (and scattered back with ``index_copy``): the strided copy of a box runs
    one inner loop per 2-element row, 10x slower (a 2x2 box of a 1024x512x3x3 kernel: 13.6 ms
    sliced against 1.2 ms gathered; the scatter 7.8 against 4.0 ms). The plain slice otherwise.

    With a ``pool`` (a :class:`~gpd_fx.passes.student_map._GradPool`) the full-size gradient is
    written into that pool's storage when nothing holds it any more: a teacher kernel's gradient
    is a fresh 38 MB tensor per step otherwise (1024x1024x3x3), whose first write faults every
    page (measured 17.6 ms per pad in a ResNet-18 r2 step). Values are those of a fresh tensor,
    bit for bit: the reused buffer is zeroed whole, not checked (the box's own cache lines span
    the whole kernel, so checking the rest costs more than writing it).
    """

    @staticmethod
    def forward(ctx, w, box, pool=None):
        ctx.shape, ctx.box, ctx.pool = w.shape, box, pool
        taps = tuple(box[2:])
        ctx.index = None
        if (w.is_contiguous() and w.dim() > 2 and len(box) == w.dim()
                and all(sl == slice(None) for sl in box[:2]) and all(sl.step in (None, 1) for sl in taps)):
            kshape = tuple(w.shape[2:])
            ctx.index = _tap_index(kshape, tuple(sl.indices(k)[:2] for sl, k in zip(taps, kshape))).to(w.device)
            out_shape = tuple(w.shape[:2]) + tuple(len(range(*sl.indices(k))) for sl, k in zip(taps, kshape))
            rows = w.shape[0] * w.shape[1]
            return w.reshape(rows, -1).index_select(1, ctx.index).view(out_shape)
        return w[box].contiguous()

    @staticmethod
    def backward(ctx, g):
        shape, index = ctx.shape, ctx.index
        rows = shape[0] * shape[1]
        if not torch.is_grad_enabled():
            # no double backward: zeros, then the box written in place (pooled storage if given)
            full = (g.new_empty(shape) if ctx.pool is None else ctx.pool.take(shape, g.dtype, g.device)).zero_()
            if index is not None:
                full.view(rows, -1).index_copy_(1, index, g.reshape(rows, -1))
            else:
                full[ctx.box].copy_(g)
            return full, None, None
        # differentiable forms (double backward)
        if index is not None:
            full = g.new_zeros(rows, math.prod(shape[2:])).index_copy(1, index, g.reshape(rows, -1))
            return full.view(shape), None, None
        pads = []
        for d in reversed(range(len(shape))):
            start, stop, step = (ctx.box[d] if d < len(ctx.box) else slice(None)).indices(shape[d])
            assert step == 1, "box slices are contiguous"
            pads += [start, shape[d] - stop]
        return F.pad(g, pads), None, None


def box_slice(w: Tensor, box, pool=None) -> Tensor:
    """``w[box]`` as a contiguous tensor: :class:`_BoxSlice` (one full-size gradient write, on
    ``pool``'s storage if given) where ``w`` needs a gradient in eager mode, else the plain slice
    (``torch.compile`` and ``torch.fx`` see ordinary indexing)."""
    if (isinstance(w, torch.fx.Proxy) or torch.compiler.is_compiling() or not torch.is_grad_enabled()
            or not w.requires_grad):
        return w[box]
    return _BoxSlice.apply(w, box, pool)


def scale_rows(w: Tensor, v: Tensor) -> Tensor:
    """``w * v`` broadcast over each output row of ``w`` (``v`` is 1-D, one entry per row).

    The fused-backward form is used for a contiguous ``w`` in eager mode with gradients on;
    under ``torch.compile`` or ``torch.fx`` tracing, or for a strided ``w`` (whose rows would
    be copied to be flattened), the plain broadcast product.
    """
    plain = (isinstance(w, torch.fx.Proxy) or isinstance(v, torch.fx.Proxy) or torch.compiler.is_compiling()
             or not torch.is_grad_enabled() or not (w.requires_grad or v.requires_grad) or not w.is_contiguous())
    if plain:
        return w * v.reshape((-1,) + (1,) * (w.dim() - 1))
    return _ScaleRows.apply(w, v)


def _check_mode(mode, kinds: tuple[str, ...], where: str):
    if isinstance(mode, str):
        if mode not in BRANCH_MODES:
            raise BranchConfigError(f"{where}: branch_mode={mode!r}; allowed: {BRANCH_MODES} or a dict "
                                    f"{{kind: 'fold' | 'run'}} over {kinds}")
        return mode
    mode = dict(mode)
    for k, m in mode.items():
        if k not in kinds or m not in ("fold", "run"):
            raise BranchConfigError(f"{where}: branch_mode entry {k!r}: {m!r}; keys must be among {kinds} "
                                    f"and values 'fold' or 'run'")
    return mode


def _best_plan(kinds: tuple[str, ...], fold_cost: dict[str, float], run_cost: dict[str, float],
               base: float) -> tuple[str, ...]:
    """The set of branches to run (the rest fold) of least modelled cost; ``base`` is the cost of
    the one conv that applies a folded kernel (paid when at least one branch folds)."""
    best, best_cost = (), math.inf
    n = len(kinds)
    for mask in range(1 << n):
        run = tuple(k for i, k in enumerate(kinds) if mask >> i & 1)
        cost = sum(run_cost[k] for k in run) + sum(fold_cost[k] for k in kinds if k not in run)
        if len(run) < n:
            cost += base
        # ties go to fewer run branches (one conv, the exact-at-init kernel path)
        if best_cost == math.inf or cost < best_cost * (1 - 1e-9):
            best, best_cost = run, cost
    return best


@contextlib.contextmanager
def shared_folds(root: nn.Module, sources=None):
    """Within this block every multi-branch layer under ``root`` folds its kernel at most once.

    With ``sources`` (the student-map sources), each layer whose weight the student reads also
    computes, during the teacher forward, the student's kernel from the same branch tensors at
    student size, sharing one fused backward with the teacher (``share_map``); the student map
    then picks it up. Under ``torch.compile`` nothing is cached: the compiler sees both uses and
    deduplicates them.
    """
    if torch.compiler.is_compiling():
        yield
        return
    by_module = {}
    if sources is not None:
        by_module = {s.module: s for s in sources if s.attr == "weight"}
    layers = [(n, m) for n, m in root.named_modules() if isinstance(m, _Branched)]
    for n, m in layers:
        m.__dict__["_fold_memo"] = {"src": by_module.get(n)}
    try:
        yield
    finally:
        for _, m in layers:
            m.__dict__["_fold_memo"] = None


class _Branched(nn.Module, metaclass=abc.ABCMeta):
    """Shared plumbing: scale vectors ``v_<kind>``, the online fold, the run/fold plan and the
    student-side map. :class:`BranchConvNd` and :class:`BranchLinear` supply the four abstract
    methods (which tensors a fold reads, how they fold, one branch's kernel, the plan's costs)."""

    branches: tuple[str, ...]
    branch_mode: str | dict[str, str] = "auto"

    def _init_scales(self, out_features: int, like: Tensor, original: str) -> None:
        self._v_shape = (-1,) + (1,) * (like.dim() - 1)
        self._w_shape = tuple(like.shape)
        for kind in self.branches:
            fill = 1.0 if kind == original else 0.0
            v = torch.full((out_features,), fill, dtype=like.dtype, device=like.device)
            self.register_parameter(f"v_{kind}", nn.Parameter(v))

    # -- the tensors a fold reads, by role ------------------------------------------------
    @abc.abstractmethod
    def _roles(self) -> dict[str, tuple[str, str]]:
        """``{role: (attribute, part of the weight's map)}``; part is 'full', 'out' or 'inp'."""

    def _scales(self) -> dict[str, Tensor]:
        return {k: getattr(self, f"v_{k}") for k in self.branches}

    def _own(self) -> dict[str, Tensor]:
        return {role: getattr(self, attr) for role, (attr, _) in self._roles().items()}

    @abc.abstractmethod
    def _fold_kernel(self, kinds, t: dict[str, Tensor], v: dict[str, Tensor], ident, box=None) -> Tensor:
        """``sum_b v_b * K_b`` over ``kinds`` from the role tensors ``t`` and scales ``v`` (only the
        taps in ``box``, a live-tap cut of :meth:`student_cut`)."""

    @abc.abstractmethod
    def branch_kernel(self, kind: str) -> Tensor:
        """The unscaled kernel ``K_b`` of one branch, shaped like the effective weight."""

    def effective_weight(self) -> Tensor:
        """``sum_b v_b[:, None, ...] * K_b``: the one kernel the layer applies (differentiable).

        Inside :func:`shared_folds` the kernel is folded once and reused, so a joint teacher and
        student forward (the student map reads the same kernel) pays for one fold, not two.

        Returns:
            A tensor shaped like the weight given at construction.
        """
        memo = self.__dict__.get("_fold_memo")
        if memo is not None:
            if "w" not in memo:
                memo["w"] = self._fold()
            return memo["w"]
        return self._fold()

    def _fold(self) -> Tensor:
        return self._fold_kernel(self.branches, self._own(), self._scales(), self._ident())

    @property
    def weight(self) -> Tensor:
        """Read-only view of :meth:`effective_weight`, so code that reads ``.weight`` sees the fold."""
        return self.effective_weight()

    # -- the student side ----------------------------------------------------------------
    def _ident(self, src=None):
        """Where the identity branch's ones sit: ``(rows, cols)`` (teacher) or, for the student
        map of ``src``, those of the mapped identity kernel; a dense kernel if it is not a
        0/1 selection of one entry per row."""
        if "identity" not in self.branches:
            return None
        if src is None:
            return self._ident_teacher()
        # cached on the source (one source per layer weight), so that copies keep it
        cached = src.__dict__.get("_ident_cache")
        if cached is None:
            with torch.no_grad():
                dense = map_tensor(self.branch_kernel("identity"), src)
            cached = src.__dict__["_ident_cache"] = self._ident_from_dense(dense)
        return cached

    def _mappable(self, src) -> bool:
        # the branch factors are mapped separately: output map on dim 0, input map on dim 1
        return ((src.out is None or src.out[0] == 0) and (src.inp is None or src.inp[0] == 1))

    def mapped_weight(self, src, box=None, unbox: bool = True) -> Tensor:
        """The student map of :meth:`effective_weight`, computed at student size.

        ``map(sum_b v_b * K_b) = sum_b map(v_b) * map(K_b)``: the map selects output copy 0 (so
        it commutes with per-output-channel scales) and sums input copies (so a composition
        ``B o A`` maps to ``out(B) o inp(A)``). Each branch factor is mapped first, then folded
        at student width: about 1/r (1/r^2 for 1x1->kxk) of folding the teacher's kernel.
        Inside a joint forward (:func:`shared_folds` with sources) the kernel computed during
        the teacher forward is returned as it is: box-shaped where the fold memo's
        ``"student_pads"`` is set (the joint then runs the student conv with that padding), so a
        caller there must read the padding from the same memo. With ``box`` (of
        :meth:`student_cut`) only those taps are folded and the rest of the kernel is zero; with
        ``unbox=False`` too, the box-shaped kernel itself (for a conv whose padding is cut to
        match, see :meth:`BranchConvNd.student_cut`).
        """
        memo = self.__dict__.get("_fold_memo")
        if memo is not None and memo.get("src") is src and "student_w" in memo:
            return memo["student_w"]
        if not self._mappable(src):
            return map_tensor(self.effective_weight(), src)
        return self._student_kernel(src, self._mapped_roles(src), box, unbox)

    def _mapped_roles(self, src) -> dict[str, Tensor]:
        """Each branch tensor mapped at student size (by role)."""
        roles = self._roles()
        own = self._own()
        parts = [self._part(src, part) for _, part in roles.values()]
        return {role: map_tensor(t, p, self._grad_pool(role)) for role, t, p in zip(roles, own.values(), parts)}

    def student_split(self, src, x: Tensor, run: tuple[str, ...], cut):
        """For the student's conv at ``x`` with branches ``run`` run on its activations
        (:meth:`student_plan`): ``(kernel of the other branches, their scales' map, mapped branch
        tensors)``; the kernel is box-shaped where ``cut`` (from :meth:`student_cut`) has
        symmetric padding, else full size (zero outside the box)."""
        mapped = self._mapped_roles(src)
        kern, v = self._split_kernel(src, mapped, run, None if cut is None else cut[0], cut_padding(cut) is None)
        return kern, v, mapped

    def _split_kernel(self, src, mapped: dict[str, Tensor], run: tuple[str, ...], box, unbox: bool):
        """``(student kernel folding every branch but those of run, the student's scales)`` from
        the mapped branch tensors, over ``box`` (box-shaped unless ``unbox``)."""
        v = self._student_scales(src)
        kinds = [k for k in self.branches if k not in run]
        return self._student_kernel(src, mapped, box, unbox, kinds=kinds, v=v), v

    def _grad_pool(self, role: str):
        """The gradient-buffer pool of one role's map: roles share sources (1x1 and 1x1_avg
        read the same map at the same shape), so each gets its own."""
        pools = self.__dict__.setdefault("_grad_pools", {})
        if role not in pools:
            pools[role] = _GradPool()
        return pools[role]

    def prepare_map(self, src) -> None:
        """Fill the per-source caches :meth:`mapped_weight` reads (strided forms of the partial
        maps, the mapped identity), eagerly and without folding anything."""
        for part in ("full", "out", "inp"):
            _stride_of(self._part(src, part))
        self._ident(src)

    def _part(self, src, part: str):
        return src if part == "full" else out_part(src) if part == "out" else inp_part(src)

    def _student_scales(self, src) -> dict[str, Tensor]:
        vpart = out_part(src)
        return {k: map_tensor(t, vpart) for k, t in self._scales().items()}

    def _student_kernel(self, src, mapped: dict[str, Tensor], box=None, unbox: bool = True, kinds=None,
                        v=None) -> Tensor:
        v = self._student_scales(src) if v is None else v
        kinds = self.branches if kinds is None else kinds
        w = self._fold_kernel(kinds, mapped, v, self._ident(src), box=box)
        if box is not None and unbox:
            w = self._unbox(w, box)
        return w * src.scale if src.scale != 1.0 else w

    def _inputs(self, x: Tensor | None = None) -> dict[str, Tensor]:
        """The branch tensors the teacher forward reads. In a joint forward they are aliases from
        :func:`share_map`, and the student kernel is computed from their maps on the way; for an
        input ``x`` on which some kernel taps read only zero padding, only the live taps are
        folded and mapped (see :meth:`student_cut`)."""
        memo = self.__dict__.get("_fold_memo")
        src = memo.get("src") if memo is not None else None
        if src is None or not self._mappable(src):
            return self._own()
        roles = self._roles()
        own = self._own()
        parts = [self._part(src, part) for _, part in roles.values()]
        # a layer called twice in one forward may see two input sizes: full kernel then
        twice = "student_w" in memo
        cut = None if twice else self.student_cut(x)
        box = None if cut is None else cut[0]
        run = () if twice else self.student_plan(x)
        # the student kernel reads only the box of the k x k tensors it folds: map just that
        # box (the map acts on channels, so it commutes with slicing taps)
        boxed_roles = self._box_roles([k for k in self.branches if k not in run]) if box is not None else ()
        aliases, mapped = share_map(list(own.values()), parts,
                                    [(slice(None), slice(None), *box) if r in boxed_roles else None for r in roles])
        mapped = dict(zip(roles, mapped))
        # a box-shaped kernel with the padding cut to match (teacher.joint sets the student
        # conv's padding from "student_pads") where the cut is symmetric and the student conv is
        # one joint runs itself (``_student_lazy``); else zero-padded back to the full kernel
        pads = cut_padding(cut) if self.__dict__.get("_student_lazy", False) else None
        memo["student_pads"] = pads
        # where the student's conv runs branches on its activations (teacher.joint installs the
        # term), its kernel folds the others only
        memo["student_w"], v = self._split_kernel(src, mapped, run, box, pads is None)
        if run:
            memo["student_run"] = (run, v, mapped)
        else:
            memo.pop("student_run", None)
        return dict(zip(roles, aliases))

    def _box_roles(self, kinds) -> tuple[str, ...]:
        """Roles whose tensors a box-cut fold of ``kinds`` reads only over the box (k x k ones)."""
        return ()

    def student_cut(self, x: Tensor | None):
        """``(box, pads)`` of a live-tap cut at ``x``'s size, or ``None``; only convolutions cut."""
        return None

    def student_plan(self, x: Tensor | None) -> tuple[str, ...]:
        """Branches the student's own layer runs on its activations at ``x``'s batch and spatial
        size instead of folding them into its kernel; ``()`` (fold all) unless overridden."""
        return ()

    def _unbox(self, kern: Tensor, box) -> Tensor:
        return kern

    # -- planning ------------------------------------------------------------------------
    @abc.abstractmethod
    def _costs(self, x: Tensor) -> tuple[dict[str, float], dict[str, float], float]:
        """Modelled cost per branch of folding it and of running it for an input like ``x``,
        and the cost of the one conv/linear call."""

    def plan(self, x: Tensor) -> tuple[str, ...]:
        """The branches run on the activations for an input like ``x`` (the others are folded).

        Decided from ``branch_mode`` and, for ``'auto'``, the modelled cost of this input's
        shape; cached per shape. Under ``torch.fx`` symbolic tracing every branch folds.
        """
        mode = self.branch_mode
        if mode == "fold" or isinstance(x, torch.fx.Proxy):
            return ()
        if mode == "run":
            return self.branches
        if isinstance(mode, dict):
            return tuple(k for k in self.branches if mode.get(k, "fold") == "run")
        key = (tuple(x.shape), x.dtype)
        compiling = torch.compiler.is_compiling()
        cache = self.__dict__.setdefault("_plans", {})
        if not compiling and key in cache:
            return cache[key]
        fold_cost, run_cost, base = self._costs(x)
        run = _best_plan(self.branches, fold_cost, run_cost, base)
        if not compiling:
            cache[key] = run
        return run

    def plan_costs(self, x: Tensor) -> dict[str, Any]:
        """The cost model behind :meth:`plan` for an input like ``x`` (multiply-add units)."""
        fold_cost, run_cost, base = self._costs(x)
        return {"fold": fold_cost, "run": run_cost, "base": base, "run_branches": self.plan(x)}

    def _add_run(self, y: Tensor | None, out: Tensor, v: Tensor, vshape) -> Tensor:
        v = v.view(vshape)
        if y is None:
            return out * v if self.bias is None else torch.addcmul(self.bias.view(vshape), out, v)
        return torch.addcmul(y, out, v)


class BranchConvNd(_Branched):
    """Multi-branch convolution: each branch folded into one online kernel or run on its own.

    Args:
        weight: the original kernel, ``(out, in // groups, *kernel_size)``; copied into ``weight_kxk``.
        bias: the original bias or ``None``; copied, shared by all branches.
        dim: spatial dimensions (1, 2 or 3).
        stride, padding, dilation, groups, padding_mode: as for ``nn.Conv{dim}d`` (``padding``
            may be ``'same'`` or ``'valid'``); every branch uses them, so all share one output grid.
        branches: kinds from :data:`BRANCH_KINDS_CONV`; ``None`` means all that apply.
        generator: source of the extra branches' random initial parameters.
        mid_channels: middle width of the ``1x1_kxk`` branch (a multiple of ``groups``);
            defaults to the input channels.
        branch_mode: ``'auto'`` (fold or run each branch by the cost of the input's shape),
            ``'fold'``, ``'run'``, or ``{kind: 'fold' | 'run'}``.
        name: the layer's name, for error messages.
        share_weight: use ``weight``'s storage for ``weight_kxk`` instead of a copy (for a
            caller that drops the layer the weight came from).

    Returns:
        A module computing ``F.conv{dim}d(x, effective_weight(), bias, ...)`` (up to rounding
        when some branches run on the activations).

    Example:
        >>> conv = nn.Conv2d(8, 8, 3, padding=1)
        >>> b = BranchConvNd(conv.weight, conv.bias, dim=2, stride=1, padding=1, dilation=1, groups=1)
        >>> torch.equal(b.weight, conv.weight)
        True
    """

    def __init__(
        self,
        weight: Tensor,
        bias: Tensor | None,
        *,
        dim: int,
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] | str = 0,
        dilation: int | Sequence[int] = 1,
        groups: int = 1,
        padding_mode: str = "zeros",
        branches: Sequence[str] | None = None,
        generator: torch.Generator | None = None,
        mid_channels: int | None = None,
        branch_mode: str | dict[str, str] = "auto",
        name: str = "",
        share_weight: bool = False,
    ) -> None:
        super().__init__()
        where = f"layer {name!r}" if name else "BranchConvNd"
        if dim not in (1, 2, 3) or weight.dim() != dim + 2:
            raise BranchConfigError(f"{where}: dim={dim} with a weight of shape {tuple(weight.shape)}; "
                                    "expected dim+2 axes")
        if padding_mode not in ("zeros", "reflect", "replicate", "circular"):
            raise BranchConfigError(f"{where}: padding_mode={padding_mode!r} is not one nn.Conv accepts")
        self.dim, self.groups, self.padding_mode = dim, groups, padding_mode
        self.out_channels, self.in_channels = weight.shape[0], weight.shape[1] * groups
        self.kernel_size = tuple(weight.shape[2:])
        self.stride = _tuple(stride, dim, "stride")
        self.dilation = _tuple(dilation, dim, "dilation")
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise BranchConfigError(f"{where}: padding={padding!r}; string padding must be 'same' or 'valid'")
            if padding == "same" and any(s != 1 for s in self.stride):
                raise BranchConfigError(f"{where}: padding='same' needs stride 1 (as in nn.Conv)")
            self.padding: tuple[int, ...] | str = padding
        else:
            self.padding = _tuple(padding, dim, "padding")
        if self.out_channels % groups:
            raise BranchConfigError(f"{where}: out_channels={self.out_channels} is not divisible by groups={groups}")
        self._pad = self._explicit_padding()

        reasons = self._reasons(self.in_channels, self.out_channels, self.kernel_size, self.stride)
        self.branches = _resolve(branches, reasons, "kxk", where)
        mid = self.in_channels if mid_channels is None else mid_channels
        if "1x1_kxk" in self.branches and (isinstance(mid, bool) or not isinstance(mid, int) or mid < groups
                                           or mid % groups):
            raise BranchConfigError(
                f"{where}: mid_channels={mid!r} for the 1x1_kxk branch must be a positive multiple of "
                f"groups={groups} (allowed: {groups}, {2 * groups}, ..., e.g. the input width {self.in_channels})")
        self.mid_channels = mid
        self.branch_mode = _check_mode(branch_mode, self.branches, where)

        # share_weight: the caller hands its weight over (it drops the plain layer), so a
        # teacher-sized copy is saved; otherwise the layer owns a copy.
        self.weight_kxk = nn.Parameter(weight.detach() if share_weight else weight.detach().clone())
        self.register_parameter("bias", None if bias is None else nn.Parameter(bias.detach().clone()))
        cin_g, ones, ksize = self.in_channels // groups, (1,) * dim, math.prod(self.kernel_size)
        if "1x1" in self.branches:
            self.weight_1x1 = nn.Parameter(_uniform((self.out_channels, cin_g, *ones), cin_g, weight, generator))
        if "1x1_kxk" in self.branches:
            self.weight_1x1_kxk_a = nn.Parameter(_uniform((mid, cin_g, *ones), cin_g, weight, generator))
            self.weight_1x1_kxk_b = nn.Parameter(
                _uniform((self.out_channels, mid // groups, *self.kernel_size), mid // groups * ksize, weight, generator)
            )
        if "1x1_avg" in self.branches:
            self.weight_1x1_avg = nn.Parameter(_uniform((self.out_channels, cin_g, *ones), cin_g, weight, generator))
        # identity: a fixed Dirac kernel (only v_identity learns), never materialised in a step:
        # the fold adds v_identity at its entries (see _ident_teacher, branch_kernel).
        self._init_scales(self.out_channels, weight, "kxk")

    @classmethod
    def _reasons(cls, cin: int, cout: int, kernel: Sequence[int], stride: Sequence[int]) -> dict[str, str | None]:
        big = any(k > 1 for k in kernel)
        odd = all(k % 2 for k in kernel)
        no_big = f"kernel {tuple(kernel)} is 1 everywhere, so this branch would repeat the original"
        return {
            "kxk": None,
            "1x1": None if big and odd else (no_big if not big else f"kernel {tuple(kernel)} has no centre tap (even size)"),
            "1x1_kxk": None if big else no_big,
            "1x1_avg": None if big else no_big,
            "identity": (
                f"needs out_channels == in_channels (got {cout} != {cin})" if cin != cout
                else f"needs stride 1 (got {tuple(stride)})" if any(s != 1 for s in stride)
                else f"kernel {tuple(kernel)} has no centre tap (even size)" if not odd
                else None
            ),
        }

    @classmethod
    def applicable_branches(
        cls, in_channels: int, out_channels: int, kernel_size: int | Sequence[int], *, dim: int = 2,
        stride: int | Sequence[int] = 1,
    ) -> tuple[str, ...]:
        """Which kinds of :data:`BRANCH_KINDS_CONV` apply to a conv of this shape.

        Args:
            in_channels, out_channels, kernel_size, dim, stride: as for ``nn.Conv{dim}d``.

        Returns:
            The applicable kinds, in :data:`BRANCH_KINDS_CONV` order.
        """
        reasons = cls._reasons(in_channels, out_channels, _tuple(kernel_size, dim, "kernel_size"),
                               _tuple(stride, dim, "stride"))
        return tuple(k for k, why in reasons.items() if why is None)

    def _explicit_padding(self) -> list[int]:
        # F.pad order (last dim first), built exactly like nn.Conv's _reversed_padding_repeated_twice.
        if self.padding == "valid":
            return [0, 0] * self.dim
        if self.padding == "same":
            pad = []
            for d, k in zip(reversed(self.dilation), reversed(self.kernel_size)):
                total = d * (k - 1)
                pad += [total // 2, total - total // 2]
            return pad
        return [p for p in reversed(self.padding) for _ in range(2)]

    # -- fold --------------------------------------------------------------------------------
    def _roles(self) -> dict[str, tuple[str, str]]:
        roles = {"kxk": ("weight_kxk", "full")}
        if "1x1" in self.branches:
            roles["1x1"] = ("weight_1x1", "full")
        if "1x1_avg" in self.branches:
            roles["1x1_avg"] = ("weight_1x1_avg", "full")
        if "1x1_kxk" in self.branches:
            roles["a"] = ("weight_1x1_kxk_a", "inp")
            roles["b"] = ("weight_1x1_kxk_b", "out")
        return roles

    def _ident_teacher(self):
        # output channel o reads channel o of its own group: index o % (in/groups) of the weight
        # (the parameter from the dict: under torch.fx, attribute access gives a proxy)
        device = self._parameters["weight_kxk"].device
        cached = self.__dict__.get("_ident_t")
        if cached is None or cached[0].device != device:
            o = torch.arange(self.out_channels, device=device)
            cached = self.__dict__["_ident_t"] = (o, o % (self.in_channels // self.groups))
        return cached

    @property
    def dirac(self) -> Tensor:
        """The identity branch's kernel (a Dirac at the centre tap), built on demand."""
        rows, cols = self._ident_teacher()
        w = self._parameters["weight_kxk"]
        dirac = torch.zeros(self._w_shape, dtype=w.dtype, device=w.device)
        dirac[(rows, cols, *(k // 2 for k in self.kernel_size))] = 1
        return dirac

    def _ident_from_dense(self, dense: Tensor):
        centre = tuple(k // 2 for k in self.kernel_size)
        tap = dense[(slice(None), slice(None), *centre)]
        rest = dense.clone()
        rest[(slice(None), slice(None), *centre)] = 0
        nz = tap != 0
        if bool((rest == 0).all()) and bool((nz.sum(1) == 1).all()) and bool((tap[nz] == 1).all()):
            return (torch.arange(tap.shape[0], device=dense.device), nz.float().argmax(1))
        return dense

    def _compose(self, b: Tensor, a: Tensor) -> Tensor:
        """``(B o A)[o, i, k] = sum_m B[o, m, k] A[m, i]`` per group: the 1x1 -> kxk kernel (over
        ``b``'s taps: the whole kernel, or a box of it)."""
        taps = tuple(self.kernel_size) if isinstance(b, torch.fx.Proxy) else tuple(b.shape[2:])
        g, out, ksize = self.groups, b.shape[0], math.prod(taps)
        a3 = a.reshape(g, a.shape[0] // g, a.shape[1])             # (g, mid/g, in/g)
        b4 = b.reshape(g, out // g, b.shape[1], ksize)            # (g, out/g, mid/g, k)
        return torch.einsum("gomk,gmi->goik", b4, a3).reshape(out, a.shape[1], *taps)

    def _box_roles(self, kinds) -> tuple[str, ...]:
        # the kxk tensor is read by every fold (the kernel's shape); b only if 1x1->kxk folds
        return ("kxk",) + (("b",) if "1x1_kxk" in kinds else ())

    def student_cut(self, x: Tensor | None):
        """``(box, pads)``: the taps of the student's conv that read real input for an input
        like ``x`` (one ``slice`` per spatial dim, a strict sub-box of the kernel) and the
        (left, right) zero padding per spatial dim under which a conv with only the box's taps
        gives the same output grid and sums; ``None`` where there is no cut.

        The student's own layer (the user's conv, same geometry at student width) multiplies
        every other tap by zero padding only, so those taps add exact zeros to its output and
        receive exact zero gradient: folding them is wasted work (on 1x1 maps 8 of 9 taps of
        a 3x3, where the student-width 1x1->kxk composition costs out*mid*in*9 per step). The
        student conv then runs the box-shaped kernel with the cut padding where that padding is
        symmetric (:func:`cut_padding`), else the box zero-padded back to the full kernel.
        Only where the student's layer provably applies this kernel to inputs of this size and
        nothing else reads it (``_student_cut``, set by the dynamic teacher from its graph),
        with zero padding."""
        if (x is None or not self.__dict__.get("_student_cut", False) or self.padding_mode != "zeros"
                or isinstance(x, torch.fx.Proxy) or torch.compiler.is_compiling()):
            return None
        plan = _taps(tuple(x.shape[2:]), tuple(self.kernel_size), tuple(self.stride), self._pads_lr(),
                     tuple(self.dilation))
        if plan is None:
            return None
        return tuple(slice(a, b) for a, b in plan[0]), plan[1]

    def student_plan(self, x: Tensor | None) -> tuple[str, ...]:
        """``('1x1_kxk',)`` where the student's own conv should run the 1x1->kxk branch on its
        activations at ``x``'s batch and spatial size (the other branches stay folded), else ``()``.

        Its student-width fold composes ``out * mid * in`` per live tap every call, whatever the
        batch, while running it costs two small convs proportional to batch x map size: on the
        small maps of a network's last stages running is several times cheaper. Only for layers
        the dynamic teacher marked (``_student_run``: the student's ``(out, in)`` widths, set for
        untied, cut-eligible student convs), following ``branch_mode`` ('auto': the cost model of
        :meth:`plan` at student width); never under tracing or ``torch.compile``. Cached per
        shape. The result is the same sum up to rounding order.
        """
        widths = self.__dict__.get("_student_run")
        if (widths is None or "1x1_kxk" not in self.branches or x is None or isinstance(x, torch.fx.Proxy)
                or torch.compiler.is_compiling() or self.padding_mode != "zeros"):
            return ()
        mode = self.branch_mode
        if not isinstance(mode, dict) and mode != "auto":
            return ("1x1_kxk",) if mode == "run" else ()
        if isinstance(mode, dict):
            return ("1x1_kxk",) if mode.get("1x1_kxk", "fold") == "run" else ()
        # a cache apart from the teacher's (its keys are full input shapes; reports read them)
        key = (x.shape[0], tuple(x.shape[2:]), x.dtype)
        cache = self.__dict__.setdefault("_student_plans", {})
        if key not in cache:
            # the fold composes the live taps only (student_cut), a 1x1->kxk run reads them all
            cut = self.student_cut(x)
            taps = None if cut is None else math.prod(sl.stop - sl.start for sl in cut[0])
            fold, run, _ = self._costs(x, widths=widths, fold_taps=taps)
            cache[key] = ("1x1_kxk",) if run["1x1_kxk"] < fold["1x1_kxk"] else ()
        return cache[key]

    def student_run_term(self, y: Tensor, x: Tensor, run: tuple[str, ...], v: dict[str, Tensor],
                         mapped: dict[str, Tensor], scale: float = 1.0) -> Tensor:
        """``y`` plus each branch of ``run`` run on ``x`` with the student-size branch tensors
        ``mapped`` and scales ``v`` (times the map's ``scale``): the student conv's output
        completed (:meth:`student_plan`)."""
        vshape = (-1,) + (1,) * self.dim
        for kind in run:
            vk = v[kind] * scale if scale != 1.0 else v[kind]
            y = torch.addcmul(y, self._run_branch(kind, x, None, mapped), vk.view(vshape))
        return y

    def _unbox(self, kern: Tensor, box) -> Tensor:
        """The box-shaped kernel ``kern`` zero-padded back to the full kernel."""
        pad = []
        for sl, k in zip(reversed(box), reversed(self.kernel_size)):
            pad += [sl.start, k - sl.stop]
        return F.pad(kern, pad)

    def _fold_kernel(self, kinds, t: dict[str, Tensor], v: dict[str, Tensor], ident, box=None) -> Tensor:
        """``sum_b v_b * K_b`` over ``kinds`` from branch tensors ``t`` (teacher or mapped).

        The 1x1 and identity branches are added to the centre tap and the average branch is
        broadcast over the window, in place on the kernel being built: no padded or expanded
        branch kernel is materialised. The 1x1->kxk scale goes on whichever factor is smaller.
        With ``box`` (one slice per spatial dim) only those taps are built, box-shaped.
        """
        vs = self._v_shape
        w = t["kxk"]
        out, cin_g = w.shape[0], w.shape[1]
        ksize = math.prod(self.kernel_size)
        taps = tuple(self.kernel_size)
        centre = tuple(k // 2 for k in self.kernel_size)
        if box is not None:
            cut = (slice(None), slice(None), *box)
            taps = tuple(sl.stop - sl.start for sl in box)
            centre = tuple(c - sl.start if sl.start <= c < sl.stop else None for c, sl in zip(centre, box))
            # tensors already mapped box-shaped (share_map's boxes) are not sliced again
            t = dict(t, **{r: box_slice(t[r], cut) for r in self._box_roles(kinds)
                           if tuple(t[r].shape[2:]) != taps})
            if isinstance(ident, Tensor):
                ident = ident[cut]
            w = t["kxk"]
        kern = None
        if "kxk" in kinds:
            kern = scale_rows(w, v["kxk"])
        if "1x1_kxk" in kinds:
            b, a, vb = t["b"], t["a"], v["1x1_kxk"]
            # static sizes under torch.fx (shapes are proxies there)
            mid_g, in_g = ((self.mid_channels // self.groups, self.in_channels // self.groups)
                           if isinstance(b, torch.fx.Proxy) else (b.shape[1], a.shape[1]))
            if mid_g <= in_g:
                comp = self._compose(scale_rows(b, vb), a)
            else:
                comp = self._compose(b, a) * vb.view(vs)
            kern = comp if kern is None else kern + comp
        if "1x1_avg" in kinds:
            avg = t["1x1_avg"] * (v["1x1_avg"] / ksize).view(vs)
            kern = avg.expand(out, cin_g, *taps).clone() if kern is None else kern + avg
        tap = None
        if "1x1" in kinds:
            tap = t["1x1"].reshape(out, cin_g) * v["1x1"].view(-1, 1)
        if "identity" in kinds:
            vid = v["identity"]
            if isinstance(ident, Tensor):   # a mapped identity that is not a selection
                dense = ident * vid.view(vs)
                kern = dense if kern is None else kern + dense
            else:
                rows, cols = ident
                if tap is None:
                    tap = vid.new_zeros(out, cin_g)
                tap = tap.index_put((rows, cols), vid[rows], accumulate=True)
        if tap is not None:
            if kern is None:
                kern = tap.new_zeros(out, cin_g, *taps)
            if None not in centre:   # (a centre outside the box reads only padding)
                kern[(slice(None), slice(None), *centre)].add_(tap)   # in place via a view (CopySlices)
        return kern

    def branch_kernel(self, kind: str) -> Tensor:
        """The unscaled k×k kernel of branch ``kind`` (composed and zero-padded as needed)."""
        if kind == "kxk":
            return self.weight_kxk
        if kind == "1x1":
            # Zero-pad to the centre: the 1x1 then reads the same input pixel as the k×k centre tap.
            return F.pad(self.weight_1x1, [k // 2 for k in reversed(self.kernel_size) for _ in range(2)])
        if kind == "1x1_kxk":
            return self._compose(self.weight_1x1_kxk_b, self.weight_1x1_kxk_a)
        if kind == "1x1_avg":
            # An average over the k×k window after a 1x1 is the 1x1 spread uniformly over the window.
            return (self.weight_1x1_avg / math.prod(self.kernel_size)).expand(self._w_shape)
        if kind == "identity":
            return self.dirac
        raise BranchConfigError(f"branch {kind!r} is not part of this layer (it has {self.branches})")

    # -- run ---------------------------------------------------------------------------------
    def _conv(self, x: Tensor, w: Tensor, bias: Tensor | None, *, padded: bool, full: bool = True,
              groups: int | None = None) -> Tensor:
        """Conv with the layer's geometry (``full``) or a plain stride-1 1x1 (``full=False``);
        ``padded``: ``x`` already carries the layer's non-zero padding."""
        g = self.groups if groups is None else groups
        if not full:
            return conv_nd(x, w, bias, (1,) * self.dim, ((0, 0),) * self.dim, (1,) * self.dim, g)
        pads = ((0, 0),) * self.dim if padded else self._pads_lr()
        # a cut kernel's gradient (dead taps on small maps) goes to this layer's pooled storage
        return conv_nd(x, w, bias, self.stride, pads, self.dilation, g, pool=self._grad_pool("cut"))

    def _pads_lr(self) -> tuple[tuple[int, int], ...]:
        # (left, right) zero padding per spatial dim, first dim first (self._pad is in F.pad order)
        p = self._pad
        return tuple((p[2 * (self.dim - 1 - i)], p[2 * (self.dim - 1 - i) + 1]) for i in range(self.dim))

    def _padded(self, x: Tensor) -> Tensor:
        mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
        return F.pad(x, self._pad, mode=mode)

    def _centre(self, xp: Tensor) -> Tensor:
        """The input pixel under each window's centre tap, on the output grid (from padded ``xp``)."""
        idx = [slice(None), slice(None)]
        for n, k, d, s in zip(xp.shape[2:], self.kernel_size, self.dilation, self.stride):
            out = (n - d * (k - 1) - 1) // s + 1
            start = d * (k // 2)
            idx.append(slice(start, start + (out - 1) * s + 1, s))
        return xp[tuple(idx)]

    def _run_branch(self, kind: str, x: Tensor, xp: Tensor | None, t: dict[str, Tensor]) -> Tensor:
        """One branch on the activations (unscaled, no bias); ``xp``: ``x`` padded as the layer pads
        (``None`` for zero padding, which the convs do themselves)."""
        padded = xp is not None
        src = xp if padded else x
        if kind == "kxk":
            return self._conv(src, t["kxk"], None, padded=padded)
        if kind == "1x1_kxk":
            # the inner 1x1 has no bias and acts per pixel, so it commutes with any padding
            return self._conv(self._conv(src, t["a"], None, padded=padded, full=False), t["b"], None, padded=padded)
        if kind == "1x1_avg":
            h = self._conv(src, t["1x1_avg"], None, padded=padded, full=False)
            ones = h.new_full((self.out_channels, 1, *self.kernel_size), 1.0 / math.prod(self.kernel_size))
            return self._conv(h, ones, None, padded=padded, groups=self.out_channels)
        centre = self._centre(xp if padded else self._padded(x))
        if kind == "1x1":
            return self._conv(centre, t["1x1"], None, padded=True, full=False)
        if kind == "identity":
            return centre
        raise BranchConfigError(f"branch {kind!r} is not part of this layer (it has {self.branches})")

    def _costs(self, x: Tensor, widths: tuple[int, int] | None = None, fold_taps: int | None = None):
        # widths: (out, in) channels of a layer of this geometry at another width (the student's,
        # whose 1x1->kxk middle width stays the teacher's: its factors are mapped on out and in
        # only); fold_taps: kernel taps a fold builds (the live box), default all
        n = x.shape[0]
        spatial_in = math.prod(x.shape[2:])
        spatial_out = 1
        for size, p, k, d, s in zip(x.shape[2:], self._pad_per_dim(), self.kernel_size, self.dilation, self.stride):
            spatial_out *= (size + p - d * (k - 1) - 1) // s + 1
        out, cin = (self.out_channels, self.in_channels) if widths is None else widths
        g = self.groups
        cin_g, mid, ksize = cin // g, self.mid_channels, math.prod(self.kernel_size)
        ktaps = ksize if fold_taps is None else fold_taps
        kernel = out * cin_g * ksize
        y = n * spatial_out * out
        xin = n * spatial_in * cin
        # a conv whose only live tap is one (3x3 on a 1x1 map) runs as a matmul in conv_nd
        live = _taps(tuple(x.shape[2:]), self.kernel_size, self.stride, self._pads_lr(), self.dilation)
        ksize_live = 1 if live is not None and all(b - a == 1 for a, b in live[0]) else ksize
        conv = _FB * n * spatial_out * out * cin_g * ksize_live
        # applying a folded kernel: the conv, plus the kernel's gradient written and read
        base = conv + _MEM * 3 * kernel
        fold = {"kxk": _MEM * 6 * kernel,
                "1x1": _MEM * 8 * out * cin_g,
                "1x1_avg": _MEM * (3 * kernel + 6 * out * cin_g),
                "identity": _MEM * 4 * out,
                "1x1_kxk": _FB * out * (mid // g) * cin_g * ktaps
                + _MEM * (4 * kernel + 4 * out * (mid // g) * ksize + 4 * mid * cin_g)}
        # running a branch: its convs, its kernel's gradient, and scaling + adding its output
        out_add = _MEM * 5 * y
        run = {"kxk": conv + _MEM * 3 * kernel + out_add,
               "1x1": _FB * n * spatial_out * out * cin_g + _MEM * (3 * out * cin_g + 3 * xin) + out_add,
               "1x1_avg": _FB * n * spatial_in * out * cin_g + _FB * 4 * n * spatial_out * out * ksize_live
               + _MEM * (3 * out * cin_g + 4 * n * spatial_in * out) + out_add,
               "identity": _MEM * 3 * xin + out_add,
               "1x1_kxk": _FB * n * spatial_in * mid * cin_g + _FB * n * spatial_out * out * (mid // g) * ksize_live
               + _MEM * (3 * mid * cin_g + 3 * out * (mid // g) * ksize + 4 * n * spatial_in * mid) + out_add}
        return {k: fold[k] for k in self.branches}, {k: run[k] for k in self.branches}, base

    def _pad_per_dim(self) -> list[int]:
        # total padding per spatial dim, first dim first (self._pad is in F.pad order)
        return [self._pad[2 * i] + self._pad[2 * i + 1] for i in range(self.dim)][::-1]

    def forward(self, x: Tensor) -> Tensor:
        """The folded branches as one convolution, plus any branch run on the activations."""
        t = self._inputs(x)
        v = self._scales()
        run = self.plan(x)
        xp = self._padded(x) if self.padding_mode != "zeros" else None
        y = None
        if len(run) < len(self.branches):
            memo = self.__dict__.get("_fold_memo")
            if not run and memo is not None and memo.get("src") is None:
                kern = self.effective_weight()          # shared with the student map in this block
            else:
                kern = self._fold_kernel([k for k in self.branches if k not in run], t, v, self._ident())
            y = self._conv(xp if xp is not None else x, kern, self.bias, padded=xp is not None)
        vshape = (-1,) + (1,) * self.dim
        for kind in run:
            y = self._add_run(y, self._run_branch(kind, x, xp, t), v[kind], vshape)
        return y

    @torch.no_grad()
    def fold(self) -> nn.Module:
        """A plain ``nn.Conv{dim}d`` holding the current effective kernel and bias.

        Returns:
            A new conv module with the same configuration; its forward equals this module's.
        """
        cls = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[self.dim - 1]
        w = self.weight_kxk
        conv = cls(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                   self.dilation, self.groups, self.bias is not None, self.padding_mode,
                   device=w.device, dtype=w.dtype)
        conv.weight.copy_(self.effective_weight())
        if self.bias is not None:
            conv.bias.copy_(self.bias)
        return conv

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
                f"padding_mode={self.padding_mode!r}, branches={self.branches}, mid_channels={self.mid_channels}, "
                f"branch_mode={self.branch_mode!r}")


class BranchLinear(_Branched):
    """Multi-branch linear layer: original, identity (square only) and low-rank ``A @ B``.

    Args:
        weight: the original ``(out, in)`` weight; copied into ``weight_linear``.
        bias: the original bias or ``None``; copied, shared by all branches.
        branches: kinds from :data:`BRANCH_KINDS_LINEAR`; ``None`` means all that apply.
        rank: rank of the ``lowrank`` branch; default ``max(1, min(in, out) // 4)``.
        generator: source of the low-rank factors' random initial values.
        branch_mode: ``'auto'``, ``'fold'``, ``'run'`` or ``{kind: 'fold' | 'run'}`` (see
            :class:`BranchConvNd`).
        name: the layer's name, for error messages.

    Returns:
        A module computing ``F.linear(x, effective_weight(), bias)``.
    """

    def __init__(
        self,
        weight: Tensor,
        bias: Tensor | None,
        *,
        branches: Sequence[str] | None = None,
        rank: int | None = None,
        generator: torch.Generator | None = None,
        branch_mode: str | dict[str, str] = "auto",
        name: str = "",
    ) -> None:
        super().__init__()
        where = f"layer {name!r}" if name else "BranchLinear"
        if weight.dim() != 2:
            raise BranchConfigError(f"{where}: a linear weight must be 2-D, got shape {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self.rank = max(1, min(self.in_features, self.out_features) // 4) if rank is None else rank
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise BranchConfigError(f"{where}: rank={rank!r} must be a positive int")
        reasons = self._reasons(self.in_features, self.out_features)
        self.branches = _resolve(branches, reasons, "linear", where)
        self.branch_mode = _check_mode(branch_mode, self.branches, where)
        self.weight_linear = nn.Parameter(weight.detach().clone())
        self.register_parameter("bias", None if bias is None else nn.Parameter(bias.detach().clone()))
        if "lowrank" in self.branches:
            self.lowrank_a = nn.Parameter(_uniform((self.out_features, self.rank), self.rank, weight, generator))
            self.lowrank_b = nn.Parameter(_uniform((self.rank, self.in_features), self.in_features, weight, generator))
        self._init_scales(self.out_features, weight, "linear")

    @classmethod
    def _reasons(cls, in_features: int, out_features: int) -> dict[str, str | None]:
        square = in_features == out_features
        why = None if square else f"needs in_features == out_features (got {in_features} != {out_features})"
        return {"linear": None, "identity": why, "lowrank": None}

    @classmethod
    def applicable_branches(cls, in_features: int, out_features: int) -> tuple[str, ...]:
        """Which kinds of :data:`BRANCH_KINDS_LINEAR` apply to an ``in -> out`` linear layer.

        Returns:
            The applicable kinds, in :data:`BRANCH_KINDS_LINEAR` order.
        """
        return tuple(k for k, why in cls._reasons(in_features, out_features).items() if why is None)

    def _roles(self) -> dict[str, tuple[str, str]]:
        roles = {"linear": ("weight_linear", "full")}
        if "lowrank" in self.branches:
            roles["a"] = ("lowrank_a", "out")
            roles["b"] = ("lowrank_b", "inp")
        return roles

    def _ident_teacher(self):
        device = self._parameters["weight_linear"].device
        cached = self.__dict__.get("_ident_t")
        if cached is None or cached[0].device != device:
            o = torch.arange(self.out_features, device=device)
            cached = self.__dict__["_ident_t"] = (o, o)
        return cached

    @property
    def eye(self) -> Tensor:
        """The identity branch's matrix, built on demand."""
        w = self._parameters["weight_linear"]
        return torch.eye(self.out_features, dtype=w.dtype, device=w.device)

    def _ident_from_dense(self, dense: Tensor):
        nz = dense != 0
        if bool((nz.sum(1) == 1).all()) and bool((dense[nz] == 1).all()):
            return (torch.arange(dense.shape[0], device=dense.device), nz.float().argmax(1))
        return dense

    def _fold_kernel(self, kinds, t: dict[str, Tensor], v: dict[str, Tensor], ident, box=None) -> Tensor:
        """``sum_b v_b * K_b`` over ``kinds``; identity entries added in place, the low-rank
        scale applied to the ``(out, rank)`` factor."""
        w = t["linear"]
        kern = None
        if "linear" in kinds:
            kern = scale_rows(w, v["linear"])
        if "lowrank" in kinds:
            a = t["a"] * v["lowrank"].view(-1, 1)
            # the low-rank product added by the GEMM itself (beta=1): no product-sized temporary
            # and no separate pass over the kernel for the sum
            kern = a @ t["b"] if kern is None else torch.addmm(kern, a, t["b"])
        if "identity" in kinds:
            vid = v["identity"]
            if isinstance(ident, Tensor):
                dense = ident * vid.view(-1, 1)
                kern = dense if kern is None else kern + dense
            else:
                rows, cols = ident
                if kern is None:
                    kern = w.new_zeros(w.shape)
                # in place on the kernel built here (no backward reads it): one pass fewer
                kern = kern.index_put_((rows, cols), vid[rows], accumulate=True)
        return kern

    def branch_kernel(self, kind: str) -> Tensor:
        """The unscaled ``(out, in)`` matrix of branch ``kind``."""
        if kind == "linear":
            return self.weight_linear
        if kind == "identity":
            return self.eye
        if kind == "lowrank":
            return self.lowrank_a @ self.lowrank_b
        raise BranchConfigError(f"branch {kind!r} is not part of this layer (it has {self.branches})")

    def _costs(self, x: Tensor):
        rows = x.numel() // max(1, x.shape[-1]) if x.dim() else 1
        out, inp, rank = self.out_features, self.in_features, self.rank
        kernel, y = out * inp, rows * out
        mm = _FB * rows * out * inp
        base = mm + _MEM * 3 * kernel
        fold = {"linear": _MEM * 6 * kernel, "identity": _MEM * 4 * out,
                "lowrank": _FB * out * rank * inp + _MEM * (4 * kernel + 4 * rank * (out + inp))}
        out_add = _MEM * 5 * y
        run = {"linear": mm + _MEM * 3 * kernel + out_add, "identity": _MEM * 2 * y + out_add,
               "lowrank": _FB * rows * rank * (out + inp) + _MEM * (4 * rows * rank + 3 * rank * (out + inp))
               + out_add}
        return {k: fold[k] for k in self.branches}, {k: run[k] for k in self.branches}, base

    def forward(self, x: Tensor) -> Tensor:
        """The folded branches as one ``F.linear``, plus any branch run on the activations."""
        t = self._inputs()
        v = self._scales()
        run = self.plan(x)
        y = None
        if len(run) < len(self.branches):
            memo = self.__dict__.get("_fold_memo")
            if not run and memo is not None and memo.get("src") is None:
                kern = self.effective_weight()
            else:
                kern = self._fold_kernel([k for k in self.branches if k not in run], t, v, self._ident())
            y = F.linear(x, kern, self.bias)
        for kind in run:
            if kind == "linear":
                out = F.linear(x, t["linear"])
            elif kind == "lowrank":
                out = F.linear(F.linear(x, t["b"]), t["a"])
            else:
                out = x
            y = self._add_run(y, out, v[kind], (-1,))
        return y

    @torch.no_grad()
    def fold(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding the current effective weight and bias.

        Returns:
            A new linear module whose forward equals this module's.
        """
        w = self.weight_linear
        lin = nn.Linear(self.in_features, self.out_features, self.bias is not None, device=w.device, dtype=w.dtype)
        lin.weight.copy_(self.effective_weight())
        if self.bias is not None:
            lin.bias.copy_(self.bias)
        return lin

    def extra_repr(self) -> str:
        return (f"{self.in_features}, {self.out_features}, rank={self.rank}, branches={self.branches}, "
                f"branch_mode={self.branch_mode!r}")
