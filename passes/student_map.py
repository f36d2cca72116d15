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

__all__ = ["ParamSource", "map_tensor", "teacher_tensor", "evaluate_map"]


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
    return t


def evaluate_map(teacher: nn.Module, sources: list[ParamSource]) -> dict[str, Tensor]:
    """Student parameters computed from the teacher's, keyed by the student's names."""
    return {s.student_name: map_tensor(teacher_tensor(teacher, s), s) for s in sources}
