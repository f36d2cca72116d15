"""The student map: student parameters as a linear, differentiable function of the teacher's.

Each student parameter has one :class:`ParamSource` recorded by the rule that widened it. The
map is the inverse of the weight rule: take output copy 0 (the first teacher
channel holding each student channel) and sum over the input copies. At initialisation this
returns the student's weights exactly because the zero-sum noise cancels in the sum.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["ParamSource", "map_tensor", "mapped_tensor", "teacher_tensor", "evaluate_map", "share_map", "out_part",
           "inp_part"]


@dataclass
class ParamSource:
    """Where one student parameter comes from in the teacher.

    Attributes:
        student_name: qualified name in the user's model.
        module: qualified name of the teacher submodule holding the tensor ("" = root).
        attr: attribute name on that module. For ``weight`` of a module with
            ``effective_weight()`` (multi-branch layers) the folded kernel is used.
        out: ``(dim, first_copy_index)`` to select output copy 0, or ``None``.
        inp: ``(dim, teacher_to_student_index, student_width)`` to sum input copies, or ``None``.
        scale: a constant factor (attention projections whose scale was folded in).
        node: the student node whose rule recorded it (for error messages).
    """

    student_name: str
    module: str
    attr: str
    out: tuple[int, Tensor] | None = None
    inp: tuple[int, Tensor, int] | None = None
    scale: float = 1.0
    node: str = ""

    @property
    def teacher_name(self) -> str:
        return f"{self.module}.{self.attr}" if self.module else self.attr


def teacher_tensor(teacher: nn.Module, src: ParamSource) -> Tensor:
    """The teacher tensor a source reads (the folded kernel for multi-branch layers)."""
    mod = teacher.get_submodule(src.module) if src.module else teacher
    eff = getattr(mod, "effective_" + src.attr, None)
    if callable(eff):
        return eff()
    return getattr(mod, src.attr)


def _stride_of(src: ParamSource) -> tuple[int | None, int | None]:
    """(r of an interleaved output map, r of an interleaved input map), ``None`` where not
    interleaved; computed once per source. Interleaved maps become strided views and a
    reshaped sum instead of gathers and scatters (the map runs every training step)."""
    cached = src.__dict__.get("_strides")
    if cached is None:
        out_r = in_r = None
        if src.out is not None:
            first = src.out[1]
            if first.numel() > 1:
                step = int(first[1] - first[0])
                if step > 0 and torch.equal(first, torch.arange(first.numel()) * step):
                    out_r = step
            elif first.numel() == 1 and int(first[0]) == 0:
                out_r = 0
        if src.inp is not None:
            _, idx, width = src.inp
            r = idx.numel() // width
            if torch.equal(idx, torch.arange(idx.numel()) // r):
                in_r = r
        cached = src.__dict__["_strides"] = (out_r, in_r)
    return cached


def _fast(t: Tensor, src: ParamSource) -> bool:
    """Both halves of the map are interleaved (or absent) and match ``t``'s shape."""
    out_r, in_r = _stride_of(src)
    if src.out is not None:
        dim, first = src.out
        if out_r is None or (out_r > 0 and t.shape[dim] != first.numel() * out_r):
            return False
    if src.inp is not None:
        dim, idx, _ = src.inp
        if in_r is None or t.shape[dim] != idx.numel():
            return False
    return True


def _select_out(t: Tensor, src: ParamSource) -> Tensor:
    out_r, _ = _stride_of(src)
    if src.out is None:
        return t
    dim, first = src.out
    if out_r == 0:
        return t.narrow(dim, 0, 1)
    return t.unflatten(dim, (first.numel(), out_r)).select(dim + 1, 0)


def _tap_gemm(t: Tensor, src: ParamSource) -> tuple[int, int, int, int] | None:
    """``(rows, width, r, taps)`` when the input half of ``src``'s map over ``t`` (a kernel with
    ``taps > 1`` elements per channel pair) should run as a batched GEMM against a fixed 0/1
    matrix; ``None`` otherwise.

    Summing (forward) or repeating (backward) the ``r`` input copies of a kxk kernel moves
    ``taps``-element chunks (9 for 3x3) with a stride between them; the elementwise copy and
    add kernels run one inner loop per chunk, which costs more than the memory traffic (a
    512x512x3x3 student kernel at r=3: 15.7 ms for the r copies of the backward, 9.6 ms for
    the adds of the forward, against 5.9 and 6.0 ms as one ``bmm``, with caches cold). The GEMM
    multiplies by exact ones and zeros: the backward's copies are exact, and the forward's sums
    equal the adds' up to the order of r terms. Only on the CPU, for float64 and for float32
    when matmuls compute in full precision (never under a bf16/tf32 matmul setting), with the
    channel dims first (output 0, input 1) and ``t`` contiguous. Non-finite values stay
    non-finite, but an inf may spread to the NaN of its chunk; a ``-0.0`` becomes ``+0.0``.
    """
    if src.inp is None or src.inp[0] != 1 or (src.out is not None and src.out[0] != 0) or t.dim() < 3:
        return None
    _, in_r = _stride_of(src)
    if not in_r or in_r < 2 or t.device.type != "cpu" or not t.is_contiguous():
        return None
    if t.dtype == torch.float32:
        if torch.backends.mkldnn.matmul.fp32_precision not in ("none", "ieee"):
            return None
    elif t.dtype != torch.float64:
        return None
    taps = math.prod(t.shape[2:])
    if taps < 2:
        return None
    out_r = _stride_of(src)[0]
    rows = t.shape[0] if src.out is None else 1 if out_r == 0 else t.shape[0] // out_r
    return rows, src.inp[2], in_r, taps


# The backward's GEMM writes into a strided output, which torch's ``bmm`` does one batch item
# (output row) at a time; below about this student-tensor size that per-row overhead outweighs
# the gain (caches cold: 64x64x3x3 r2 0.71 ms GEMM against 0.47 ms copies, 256x256x3x3 2.4 ms
# against 2.6 ms, 512x512x3x3 6.7 against 9.1 ms; r3 at 512: 11.0 against 21.2 ms).
_GEMM_MIN_BYTES = 1 << 21


@functools.lru_cache(maxsize=64)
def _copies_matrix(r: int, taps: int, dtype: torch.dtype) -> Tensor:
    """``[I I ... I]^T`` (``r * taps`` x ``taps``): a row of ``r`` input copies times it is their sum."""
    return torch.eye(taps, dtype=dtype).repeat(r, 1)


def _map_fast(t: Tensor, src: ParamSource, pool: "_GradPool | None" = None) -> Tensor:
    """The interleaved map without autograd: a strided view of output copy 0 and ``r - 1``
    elementwise adds of the input copies (a reduction over a size-r middle axis is several
    times slower on the CPU); for kernels at r >= 3 on the CPU one batched GEMM (:func:`_tap_gemm`).

    With ``pool`` the result is written into the student-sized storage the pool handed out for
    this map the step before, when nothing else holds it any more (see :class:`_GradPool`): a
    fresh large output costs a page fault per page on its first write (the layer-4 kernel of
    ResNet-18, 9.4 MB: 3.2 ms fresh against 1.4 ms into reused memory)."""
    _, in_r = _stride_of(src)

    def new(shape, like: Tensor) -> Tensor:   # the output: pooled where a pool is given
        if pool is None:
            return torch.empty(shape, dtype=like.dtype, device=like.device)
        return pool.take(shape, like.dtype, like.device, "value")

    # at r = 2 the single add is as fast (measured 3.7 against 4.1 ms at 512x512x3x3)
    gemm = _tap_gemm(t, src) if in_r and in_r > 2 else None
    t = _select_out(t, src)
    if gemm is not None:
        rows, width, r, taps = gemm
        out = new((rows, width) + tuple(t.shape[2:]), t)
        torch.bmm(t.reshape(rows, width, r * taps), _copies_matrix(r, taps, t.dtype).expand(rows, r * taps, taps),
                  out=out.view(rows, width, taps))
        return out * src.scale if src.scale != 1.0 else out
    if src.inp is not None:
        dim, _, width = src.inp
        v = t.unflatten(dim, (width, in_r))
        t = v.select(dim + 1, 0)
        if in_r > 1:
            t = torch.add(t, v.select(dim + 1, 1), out=new(t.shape, t))
            for j in range(2, in_r):
                t.add_(v.select(dim + 1, j))
    if not t.is_contiguous():
        t = new(t.shape, t).copy_(t)
    if src.scale != 1.0:
        t = t * src.scale
    return t


class _GradPool:
    """The storage of the teacher-sized gradient a map handed out last step, per shape.

    A fresh teacher-sized tensor per step is expensive on the CPU: allocations above the
    allocator's mmap threshold (32 MB in glibc) come back as new pages, and the first write of
    each page faults (a 38 MB fill measured 13.7 ms fresh against 2.3 ms into touched memory).
    The gradient the map returns becomes ``p.grad``; after ``zero_grad(set_to_none=True)``
    only this pool still holds its storage, so the next backward writes into it again.

    Only the storage is kept (not the tensor), so autograd still steals the returned tensor as
    ``p.grad`` without a copy. A buffer is reused only when nothing else holds it (storage use
    count 1): a gradient still alive as ``p.grad`` (accumulation, ``set_to_none=False``) or
    kept by the user is never overwritten; then a fresh tensor is returned and not pooled.
    Values are exactly those of a fresh tensor: the rows a map writes are rewritten, and the
    rows it leaves zero are read and re-zeroed only if anything changed them since (a byte
    check, which also catches writes through ``.data`` or numpy that no version counter sees).
    The pool also keeps the map's student-sized outputs (role ``"value"``), so it holds up to
    one student's worth of memory for the teacher's lifetime beyond the gradients handed out.
    One pool serves one tensor per shape (two tensors of one shape sharing a pool would take
    turns allocating). Copies and pickles start with an empty pool. Multi-branch layers keep
    one more for the full-size gradients of kernels cut to their live taps (``_BoxSlice``), so
    a CBR teacher holds up to about its parameter size in pooled storage between steps (220 MB
    for a ResNet-18 at ratio 2): ``DynamicTeacher.release_buffers()`` gives it back, and a
    move to another dtype or device drops it.
    """

    __slots__ = ("by_key",)

    def __init__(self):
        self.by_key = {}

    def __deepcopy__(self, memo):
        return _GradPool()

    def __reduce__(self):
        return (_GradPool, ())

    def take(self, shape, dtype: torch.dtype, device: torch.device, tag: str = "grad") -> Tensor:
        """A contiguous ``shape`` tensor with undefined values, on the pooled storage if free.

        ``tag`` keeps apart buffers of one shape with different uses (a map's gradient and its
        value)."""
        return self.take_reused(shape, dtype, device, tag)[0]

    def take_reused(self, shape, dtype: torch.dtype, device: torch.device,
                    tag: str = "grad") -> tuple[Tensor, bool]:
        """:meth:`take`, and whether the tensor is on pooled storage handed out before (the
        caller wrote it then and may rely on what it wrote, after checking it)."""
        key = (tag, tuple(shape), dtype, device)
        st = self.by_key.get(key)
        if st is not None and torch._C._storage_Use_Count(st._cdata) == 1:
            return torch.empty(0, dtype=dtype, device=device).set_(st, 0, key[1]), True
        g = torch.empty(key[1], dtype=dtype, device=device)
        if st is None:
            # a buffer of another dtype or device for the same use is stale (the teacher moved)
            for other in [k for k in self.by_key if k[:2] == key[:2]]:
                del self.by_key[other]
            self.by_key[key] = g.untyped_storage()
        return g, False


# Regions smaller than this are zero-filled without first checking them (the check is one
# more op call; below this size the fill costs about as much).
_CHECK_ZERO_MIN_BYTES = 1 << 18


def _zero_unless_zero(region: Tensor, reused: bool) -> None:
    """Make every byte of ``region`` zero, skipping the write when it already is.

    ``reused``: ``region`` lies in pooled storage that this map handed out zero-filled the step
    before. Nothing else holds that storage now, but anyone may have written to it meanwhile
    (``p.grad.mul_``, ``p.grad.data.add_``, numpy), so the bytes are read, not trusted: reading
    is about 2.5x cheaper than writing on this CPU (a 57 MB region: 4.5 ms ``amax`` of the
    bytes against 11.5 ms ``zero_``, from DRAM). Bytes, not values, so a ``-0.0`` or NaN left
    there is caught and the result is bit-identical to a fresh ``zero_()``.
    """
    if (reused and region.numel() * region.element_size() >= _CHECK_ZERO_MIN_BYTES and region.dim() > 0
            and region.stride(-1) == 1 and not bool(region.view(torch.uint8).amax())):
        return
    region.zero_()


def _grad_pool(src: ParamSource) -> _GradPool:
    pool = src.__dict__.get("_grad_pool")
    if pool is None:
        pool = src.__dict__["_grad_pool"] = _GradPool()
    return pool


def _adjoint_fast(gs: Tensor, src: ParamSource, shape, pool: _GradPool | None = None) -> Tensor:
    """``map^T(gs)`` as a teacher-sized tensor, written once (copy 0 rows get ``gs`` repeated
    over the input copies, the other rows zero), on the source's pooled storage when free.

    On pooled storage the zero rows are only checked, not rewritten (:func:`_zero_unless_zero`).
    The input copies are written as ``r`` plain copies of ``gs`` rather than one copy of a
    broadcast view: with a broadcast (stride-0) axis between the copies, the copy kernel's
    inner loop runs over one kernel row (9 elements of a 3x3), 2.8x slower at 512x512x3x3, r=2.
    """
    out_r, in_r = _stride_of(src)
    if src.scale != 1.0:
        gs = gs * src.scale
    g, reused = (pool or _grad_pool(src)).take_reused(shape, gs.dtype, gs.device)
    target = g
    if src.out is not None:
        dim, first = src.out
        if out_r == 0:
            _zero_unless_zero(g.narrow(dim, 1, g.shape[dim] - 1), reused)
            target = g.narrow(dim, 0, 1)
        elif out_r > 1:
            v = g.unflatten(dim, (first.numel(), out_r))
            _zero_unless_zero(v.narrow(dim + 1, 1, out_r - 1), reused)
            target = v.select(dim + 1, 0)
    gemm = _tap_gemm(g, src) if gs.numel() * gs.element_size() >= _GEMM_MIN_BYTES else None
    if gemm is not None:
        rows, width, r, taps = gemm
        torch.bmm(gs.reshape(rows, width, taps), _copies_matrix(r, taps, gs.dtype).t().expand(rows, taps, r * taps),
                  out=target.view(rows, width, r * taps))
    elif src.inp is not None:
        dim, _, width = src.inp
        copies = target.unflatten(dim, (width, in_r))
        for j in range(in_r):
            copies.select(dim + 1, j).copy_(gs)
    else:
        target.copy_(gs)
    return g


class _MapFn(torch.autograd.Function):
    """:func:`map_tensor` for interleaved maps with a hand-written backward (one write of the
    teacher-sized gradient instead of a zero fill, a slice copy and a copy of an expanded view)."""

    @staticmethod
    def forward(ctx, t, src, pool):
        ctx.src, ctx.shape, ctx.pool = src, t.shape, pool
        return _map_fast(t, src, pool or _grad_pool(src))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gs):
        return _adjoint_fast(gs, ctx.src, ctx.shape, ctx.pool), None, None


def map_tensor(t: Tensor, src: ParamSource, pool: _GradPool | None = None) -> Tensor:
    """Apply one source's map to the teacher tensor ``t`` (differentiable).

    ``pool``: where the backward keeps ``t``'s gradient buffer between steps (see
    :class:`_GradPool`); by default the source's own, which suits one tensor per source and
    shape. Callers that map several same-shaped tensors through one source pass one each.
    """
    if _fast(t, src) and not torch.compiler.is_compiling() and not isinstance(t, torch.fx.Proxy):
        if t.requires_grad and torch.is_grad_enabled():
            return _MapFn.apply(t, src, pool)
        return _map_fast(t, src, pool)
    out_r, in_r = _stride_of(src)
    if src.out is not None:
        dim, first = src.out
        if out_r == 0:
            t = t.narrow(dim, 0, 1)
        elif out_r is not None and t.shape[dim] == first.numel() * out_r:
            t = t.unflatten(dim, (first.numel(), out_r)).select(dim + 1, 0)
        else:
            t = t.index_select(dim, first.to(t.device))
    if src.inp is not None:
        dim, idx, width = src.inp
        if in_r is not None and t.shape[dim] == idx.numel():
            t = t.unflatten(dim, (width, in_r)).sum(dim + 1)
        else:
            shape = list(t.shape)
            shape[dim] = width
            t = t.new_zeros(shape).index_add(dim, idx.to(t.device), t)
    if src.scale != 1.0:
        t = t * src.scale
    return t


def mapped_tensor(teacher: nn.Module, src: ParamSource) -> Tensor:
    """``map_tensor(teacher_tensor(teacher, src), src)``, computed the cheapest way.

    A multi-branch layer maps each branch factor at student size instead of folding the
    teacher-sized kernel first (``mapped_weight``); the result is the same linear function.
    """
    mod = teacher.get_submodule(src.module) if src.module else teacher
    fn = getattr(mod, "mapped_" + src.attr, None)
    if callable(fn):
        return fn(src)
    return map_tensor(teacher_tensor(teacher, src), src)


def evaluate_map(teacher: nn.Module, sources: list[ParamSource]) -> dict[str, Tensor]:
    """Student parameters computed from the teacher's, keyed by the student's names."""
    return {s.student_name: mapped_tensor(teacher, s) for s in sources}


def _partial(src: ParamSource, keep_out: bool, keep_inp: bool) -> ParamSource:
    """``src`` with only its output selection and/or input sum (no scale): maps of branch factors."""
    key = f"_partial_{int(keep_out)}{int(keep_inp)}"
    cached = src.__dict__.get(key)
    if cached is None:
        cached = ParamSource(src.student_name, src.module, src.attr,
                             out=src.out if keep_out else None, inp=src.inp if keep_inp else None,
                             scale=1.0, node=src.node)
        src.__dict__[key] = cached
    return cached


def out_part(src: ParamSource) -> ParamSource:
    """The output half of ``src``'s map (select output copy 0), unscaled."""
    return _partial(src, True, False)


def inp_part(src: ParamSource) -> ParamSource:
    """The input half of ``src``'s map (sum over input copies), unscaled."""
    return _partial(src, False, True)


def _add_adjoint_(g: Tensor, gs: Tensor, src: ParamSource) -> None:
    """``g += map^T(gs)`` in place: the student gradient ``gs`` goes to output copy 0 and to
    every input copy it was summed from. Touches only the selected rows of ``g``."""
    if src.scale != 1.0:
        gs = gs * src.scale
    if _fast(g, src):
        target = _select_out(g, src)
        if src.inp is not None:
            dim, _, width = src.inp
            target.unflatten(dim, (width, _stride_of(src)[1])).add_(gs.unsqueeze(dim + 1))
        else:
            target.add_(gs)
        return
    if src.inp is not None:
        dim, idx, _ = src.inp
        gs = gs.index_select(dim, idx.to(gs.device))
    if src.out is not None:
        dim, first = src.out
        g.index_add_(dim, first.to(g.device), gs)
    else:
        g.add_(gs)


class _SharedMap(torch.autograd.Function):
    """``(t_1..t_n) -> (alias_1..alias_n, map(t_1)..map(t_n))`` with one fused backward.

    When a teacher tensor feeds both the teacher forward (through its alias) and the student
    map, plain autograd builds a zero tensor of the teacher's size for the map's gradient and
    adds it to the teacher's gradient: two extra passes over every teacher weight per step.
    Here the student's gradient is added in place into the rows of the teacher's gradient it
    belongs to (1/r of the tensor); a full-size tensor is only built where the teacher forward
    did not use the alias. With a ``box`` (a tuple of slices) for a tensor, its map is of
    ``t[box]`` only, and the student's gradient goes into that box of the rows.
    """

    @staticmethod
    def forward(ctx, srcs, boxes, *tensors):
        ctx.srcs, ctx.boxes = srcs, boxes
        ctx.meta = [(t.shape, t.dtype, t.device) for t in tensors]
        ctx.set_materialize_grads(False)
        aliases = [t.view_as(t) for t in tensors]
        with torch.no_grad():
            # on the source's pooled value storage: a fresh student-sized tensor per step would
            # fault every page of it
            mapped = [map_tensor(t if box is None else t[box], s, _grad_pool(s)) for t, s, box in zip(tensors, srcs, boxes)]
        return (*aliases, *mapped)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        n = len(ctx.srcs)
        out = []
        for i, src in enumerate(ctx.srcs):
            g, gs, box = grads[i], grads[n + i], ctx.boxes[i]
            if gs is not None:
                if g is None:
                    shape, dtype, device = ctx.meta[i]
                    g = _grad_pool(src).take(shape, dtype, device).zero_()
                elif torch._debug_has_internal_overlap(g) != 0 or g.requires_grad:
                    # an expanded (stride 0) gradient cannot be written in place
                    g = g.clone()
                _add_adjoint_(g if box is None else g[box], gs, src)
            out.append(g)
        return (None, None, *out)


def share_map(tensors: list[Tensor], sources: list[ParamSource],
              boxes: list | None = None) -> tuple[list[Tensor], list[Tensor]]:
    """Aliases of ``tensors`` for the teacher forward and their student maps, sharing one backward.

    ``boxes``: per tensor ``None`` or a tuple of slices over dims the map does not touch (kernel
    taps): that tensor's student map is of ``t[box]`` only (the live taps of a student conv on a
    small map), and so is the gradient added back.

    Differentiable in both outputs; the teacher forward must read the aliases, not the
    originals, for the gradient to be fused (see :class:`_SharedMap`). The alias's gradient is
    updated in place, so each alias must feed ops whose backward returns a gradient tensor of
    its own (conv, matmul, norm, embedding, elementwise products), not one shared with another
    operand (``alias + x`` of equal shapes). Under ``torch.compile`` the plain map is used (the
    compiler fuses the gradient sum itself).

    Returns:
        ``(aliases, mapped)``, both in the order of ``tensors``.
    """
    if not tensors:
        return [], []
    boxes = [None] * len(tensors) if boxes is None else list(boxes)
    if torch.compiler.is_compiling() or not torch.is_grad_enabled() or not any(t.requires_grad for t in tensors):
        return list(tensors), [map_tensor(t if b is None else t[b], s) for t, s, b in zip(tensors, sources, boxes)]
    outs = _SharedMap.apply(sources, boxes, *tensors)
    n = len(tensors)
    return list(outs[:n]), list(outs[n:])
