"""Layout conversion: a student value's teacher counterpart in the layout an op needs.

An expanded value can be permuted to another layout of the same width, a kept (student-width)
value widened into a layout, and an expanded value narrowed back to student width by the mean
over its copies (``DESIGN.md §1``). Parameters read by ``get_attr`` are widened in place once
(with a student-map source) instead of at every run.
"""

from __future__ import annotations

import operator
from typing import Any

import torch.fx as fx
from torch import Tensor
from torch.fx.node import map_aggregate

from .layout import Layout, gpd_narrow, gpd_repeat, gpd_widen, interleaved, permutation_between
from .registry import CannotExpand
from .widen_emit import TeacherGraph
from .widen_params import ParamStore, WidenedWeight
from .widen_values import Entry, annotate
from .weights import widen_per_channel

__all__ = ["LayoutConverter"]


class LayoutConverter:
    """Teacher counterparts of student arguments: as they are, in a layout, or at student width.

    Attributes:
        permutations: permutes emitted between two layouts of one width.
        runtime_widenings: kept values widened at run time (not parameters widened in place).
    """

    def __init__(self, teacher: TeacherGraph, params: ParamStore, env: dict[fx.Node, Entry],
                 svals: dict[fx.Node, Any], ratio: int):
        self.teacher = teacher
        self.params = params
        self.env = env
        self.svals = svals
        self.ratio = ratio
        self.permutations = 0
        self.runtime_widenings = 0

    def _emit(self, op, target, args, layout=None) -> fx.Node:
        node = self.teacher.emit(op, target, args, {})
        annotate(node, layout)
        return node

    def dt_of(self, arg):
        """The teacher counterpart of a (nested) student argument, in whatever layout it has."""
        def one(a):
            if not isinstance(a, fx.Node):
                return a
            e = self.env[a]
            if e.dt is None and a.op == "get_attr":
                return self._param_kept(a)
            return e.dt
        return map_aggregate(arg, one)

    def _param_kept(self, node: fx.Node) -> fx.Node:
        state = self.params.state.get(node.target)
        if isinstance(state, Layout):
            # Already widened for another consumer: this one needs student width.
            return self._narrow_node(self.param_widened(node, state), state)
        if isinstance(state, WidenedWeight):
            # Widened by the weight rule for another consumer (csatv2 applies one DCT matrix
            # twice): the student weight is exact from the teacher's, since the copies of an
            # input channel sum to it (the noise is zero-sum) and the copies of an output
            # channel are then equal. Read this way, the one parameter stays shared.
            x = self._emit("get_attr", node.target, (), state)
            if state.inp is not None:
                x = self._emit("call_function", operator.mul, (self._narrow_node(x, state.inp), float(self.ratio)),
                               state.out)
            if state.out is not None:
                x = self._narrow_node(x, state.out)
            return x
        if state is None:
            self.params.copy_kept(node.target)
        return self._emit("get_attr", node.target, ())

    def param_widened(self, node: fx.Node, layout: Layout) -> fx.Node:
        """``get_attr`` of the parameter/buffer ``node`` widened per channel into ``layout``
        (installed with its source on first use)."""
        if self.params.state.get(node.target) is None:
            val = self.params.student_value(node.target)
            self.params.install(node.target, widen_per_channel(val.detach(), layout.dim, layout.index),
                                state=layout, node=node.name, out=(layout.dim, layout.first_copy()))
        return self._emit("get_attr", node.target, (), self.params.state.get(node.target))

    def to_layout(self, arg: fx.Node, layout: Layout) -> fx.Node:
        """Teacher node for ``arg`` in ``layout`` (whose ``dim`` counts in ``arg``'s own dims)."""
        cur = self.env[arg].layout if isinstance(arg, fx.Node) else None
        if cur is None:
            if isinstance(arg, fx.Node) and arg.op == "get_attr" and self.env[arg].dt is None:
                st = self.params.state.get(arg.target)
                if st is None or (isinstance(st, Layout) and st.dim == layout.dim and st.same_map(layout)):
                    return self.param_widened(arg, layout)
            x = self.dt_of(arg)
            self.runtime_widenings += 1
            if layout.is_interleaved:
                return self._emit("call_function", gpd_repeat, (x, layout.dim, self.ratio), layout)
            return self._emit("call_function", gpd_widen, (x, layout.dim, self.teacher.index_node(layout.index)),
                              layout)
        if cur.dim != layout.dim:
            raise CannotExpand(f"operand expanded on dim {cur.dim}, needed on dim {layout.dim}")
        if cur.index.numel() != layout.index.numel():
            raise CannotExpand(f"operand has {cur.width} channels, the layout needs {layout.width}")
        if cur.same_map(layout):
            return self.dt_of(arg)
        self.permutations += 1
        perm = permutation_between(cur, layout)
        return self._emit("call_function", gpd_widen, (self.dt_of(arg), cur.dim, self.teacher.index_node(perm)),
                          layout)

    def student_scalar(self, a):
        """Teacher counterpart of a graph value used as a *value* (not a size): a Python number
        computed from a widened shape (``(C // heads) ** -0.5``) keeps the student's value."""
        if isinstance(a, fx.Node):
            sv = self.svals.get(a)
            if not isinstance(sv, Tensor) and isinstance(sv, (int, float, bool)):
                d = self.dt_of(a)
                tv = self.teacher.values[d] if isinstance(d, fx.Node) else d
                if tv != sv:
                    return sv
        return self.dt_of(a)

    def narrow(self, arg):
        """Teacher counterpart of a (nested) student argument at student width."""
        def one(a):
            if not isinstance(a, fx.Node):
                return a
            lay = self.env[a].layout
            if lay is None:
                return self.student_scalar(a)
            if isinstance(lay, Layout):
                return self._narrow_node(self.dt_of(a), lay)
            # a tuple/list-valued node with expanded members: unpack, narrow, repack
            items = []
            for i, sub in enumerate(lay):
                g = self._emit("call_function", operator.getitem, (self.dt_of(a), i), sub)
                items.append(self._narrow_node(g, sub) if isinstance(sub, Layout) else g)
            sval = self.svals[a]
            return type(sval)(items) if isinstance(sval, (tuple, list)) and not hasattr(sval, "_fields") \
                else tuple(items)
        return map_aggregate(arg, one)

    def _narrow_node(self, x: fx.Node, lay: Layout) -> fx.Node:
        if not lay.is_interleaved:
            self.permutations += 1
            perm = permutation_between(lay, interleaved(lay.width, self.ratio, lay.dim))
            x = self._emit("call_function", gpd_widen, (x, lay.dim, self.teacher.index_node(perm)),
                           interleaved(lay.width, self.ratio, lay.dim))
        return self._emit("call_function", gpd_narrow, (x, lay.dim, self.ratio))

    def checkpoint(self) -> tuple[int, int]:
        return self.permutations, self.runtime_widenings

    def rollback(self, checkpoint: tuple[int, int]) -> None:
        self.permutations, self.runtime_widenings = checkpoint
