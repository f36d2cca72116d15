"""The teacher's parameters and buffers read by ``get_attr``, and the student-map source of each.

Every teacher tensor that comes from a student tensor is installed through
:meth:`ParamStore.install`: the one place that puts a (widened or copied) tensor into the
teacher and records its :class:`~gpd_fx.passes.student_map.ParamSource` (``DESIGN.md §3``: the
student map reads the student back from these sources). A failed rule is undone with
:meth:`ParamStore.checkpoint` / :meth:`ParamStore.rollback`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from .layout import Layout
from .module_paths import get_path, set_path
from .student_map import ParamSource

__all__ = ["ParamStore", "WidenedWeight", "KEPT"]

# ``ParamStore.state`` of a tensor copied at student width
KEPT = "kept"


@dataclass(eq=False)
class WidenedWeight:
    """State of a parameter that the weight rule widened in place (``F.linear(x, w)``):
    the layouts of its output and input channel dims (``None``: that dim kept)."""
    out: Layout | None
    inp: Layout | None

    def same(self, other: "WidenedWeight") -> bool:
        def eq(a, b):
            return a is None and b is None or (a is not None and b is not None and a.dim == b.dim
                                               and a.same_map(b))
        return eq(self.out, other.out) and eq(self.inp, other.inp)


class ParamStore:
    """Teacher tensors installed from the student's ``get_attr`` targets, and their sources.

    Attributes:
        state: ``get_attr`` target -> :data:`KEPT` (copied at student width), a
            :class:`~gpd_fx.passes.layout.Layout` (widened per channel) or a
            :class:`WidenedWeight` (widened by the weight rule).
        sources: one :class:`ParamSource` per teacher parameter that stands for a student one.
    """

    def __init__(self, student: nn.Module, root: nn.Module):
        self.student = student
        self.root = root
        self.state: dict[str, Any] = {}
        self.sources: list[ParamSource] = []

    def student_value(self, target: str):
        """The student's tensor (or attribute) at ``target``."""
        return get_path(self.student, target)

    def install(self, target: str, teacher_value: Tensor, *, state: Any, node: str, **source) -> None:
        """Put ``teacher_value`` into the teacher at ``target`` and remember ``state``.

        When the student's tensor there is a parameter, the teacher's becomes a parameter too
        (same ``requires_grad``) and gets a :class:`ParamSource` (``source``: its ``out``/``inp``
        maps; ``node``: the node that widened it). A buffer is installed as a buffer, sourceless:
        the student keeps its own buffers.
        """
        student = self.student_value(target)
        if isinstance(student, nn.Parameter):
            set_path(self.root, target, nn.Parameter(teacher_value, student.requires_grad))
            mod, _, attr = target.rpartition(".")
            self.sources.append(ParamSource(target, mod, attr, node=node, **source))
        else:
            set_path(self.root, target, teacher_value)
        self.state[target] = state

    def copy_kept(self, target: str) -> None:
        """Install a student-width copy of the student's tensor (or attribute) at ``target``."""
        val = self.student_value(target)
        if isinstance(val, Tensor):
            self.install(target, val.detach().clone(), state=KEPT, node="(copied)")
        else:
            set_path(self.root, target, copy.deepcopy(val))
            self.state[target] = KEPT

    def record_copied_module(self, target: str, module: nn.Module, student_target: str | None = None) -> None:
        """Sources for the parameters of a student-size copy of ``module`` installed at ``target``
        (``student_target``: the student module it copies, when installed under another name)."""
        have = {s.student_name for s in self.sources}
        for pname, _ in module.named_parameters():
            name = f"{student_target or target}.{pname}"
            if name in have:   # a student-width copy of a module that is also widened elsewhere
                continue
            mod, _, attr = f"{target}.{pname}".rpartition(".")
            self.sources.append(ParamSource(name, mod, attr, node="(copied)"))

    def add_source(self, source: ParamSource) -> None:
        """Record the source of a tensor a rule installed itself (a widened module's weights)."""
        self.sources.append(source)

    def checkpoint(self) -> tuple[int, dict]:
        return len(self.sources), dict(self.state)

    def rollback(self, checkpoint: tuple[int, dict]) -> None:
        """Forget the sources and states recorded since ``checkpoint`` (a rule that failed)."""
        n, state = checkpoint
        del self.sources[n:]
        self.state = state
