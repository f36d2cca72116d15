"""The student map: student parameters as a linear, differentiable function of the teacher's.

Each student parameter has one :class:`ParamSource` recorded by the rule that widened it. The
map is the inverse of the weight rule (design.md §2): take output copy 0 (the first teacher
channel holding each student channel) and sum over the input copies. At initialisation this
returns the student's weights exactly because the zero-sum noise cancels in the sum.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["ParamSource", "map_tensor", "teacher_tensor", "evaluate_map", "share_map", "out_part", "inp_part"]


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


def map_tensor(t: Tensor, src: ParamSource) -> Tensor:
    """Apply one source's map to the teacher tensor ``t`` (differentiable)."""
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
    # A strided view is not safe to hand to every kernel: torch 2.14's CPU batch_norm backward
    # returns a wrong input gradient for a non-contiguous weight when the per-channel spatial
    # size is 1 ((N, C) or (N, C, 1) inputs: off by O(1), forward correct). The copy costs one
    # small tensor per parameter per step.
    return t.contiguous()


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
    key = ("_partial", keep_out, keep_inp)
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
    out_r, in_r = _stride_of(src)
    target = g
    if src.out is not None:
        dim, first = src.out
        if out_r == 0:
            target = target.narrow(dim, 0, 1)
        elif out_r is not None and target.shape[dim] == first.numel() * out_r:
            target = target.unflatten(dim, (first.numel(), out_r)).select(dim + 1, 0)
        else:
            target = None   # general index: scattered below
    if src.inp is not None:
        dim, idx, width = src.inp
        if in_r is not None and g.shape[dim] == idx.numel():
            gs = gs.unsqueeze(dim + 1).expand(*gs.shape[:dim + 1], in_r, *gs.shape[dim + 1:]).flatten(dim, dim + 1)
        else:
            gs = gs.index_select(dim, idx.to(gs.device))
    if target is not None:
        target.add_(gs)
    else:
        dim, first = src.out
        g.index_add_(dim, first.to(g.device), gs)


class _SharedMap(torch.autograd.Function):
    """``(t_1..t_n) -> (alias_1..alias_n, map(t_1)..map(t_n))`` with one fused backward.

    When a teacher tensor feeds both the teacher forward (through its alias) and the student
    map, plain autograd builds a zero tensor of the teacher's size for the map's gradient and
    adds it to the teacher's gradient: two extra passes over every teacher weight per step.
    Here the student's gradient is added in place into the rows of the teacher's gradient it
    belongs to (1/r of the tensor); a full-size tensor is only built where the teacher forward
    did not use the alias.
    """

    @staticmethod
    def forward(ctx, srcs, *tensors):
        ctx.srcs = srcs
        ctx.meta = [(t.shape, t.dtype, t.device) for t in tensors]
        ctx.set_materialize_grads(False)
        aliases = [t.view_as(t) for t in tensors]
        mapped = [map_tensor(t, s) for t, s in zip(tensors, srcs)]
        return (*aliases, *mapped)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        n = len(ctx.srcs)
        out = []
        for i, src in enumerate(ctx.srcs):
            g, gs = grads[i], grads[n + i]
            if gs is not None:
                if g is None:
                    shape, dtype, device = ctx.meta[i]
                    g = torch.zeros(shape, dtype=dtype, device=device)
                elif torch._debug_has_internal_overlap(g) != 0 or g.requires_grad:
                    # an expanded (stride 0) gradient cannot be written in place
                    g = g.clone()
                _add_adjoint_(g, gs, src)
            out.append(g)
        return (None, *out)


def share_map(tensors: list[Tensor], sources: list[ParamSource]) -> tuple[list[Tensor], list[Tensor]]:
    """Aliases of ``tensors`` for the teacher forward and their student maps, sharing one backward.

    Differentiable in both outputs; the teacher forward must read the aliases, not the
    originals, for the gradient to be fused (see :class:`_SharedMap`). Under ``torch.compile``
    the plain map is used (the compiler fuses the gradient sum itself).

    Returns:
        ``(aliases, mapped)``, both in the order of ``tensors``.
    """
    if not tensors:
        return [], []
    if torch.compiler.is_compiling() or not torch.is_grad_enabled() or not any(t.requires_grad for t in tensors):
        return list(tensors), [map_tensor(t, s) for t, s in zip(tensors, sources)]
    outs = _SharedMap.apply(sources, *tensors)
    n = len(tensors)
    return list(outs[:n]), list(outs[n:])
