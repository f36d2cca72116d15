"""``RuleContext``: everything a rule may see and do; the whole rule-author API.

A rule is ``rule(ctx, node) -> (teacher_node, layout)``: it reads the student node's values and
its arguments' layouts from ``ctx``, emits the teacher version with ``ctx.emit``/``ctx.call_*``
(each emitted node runs at once on the probe values), and returns the teacher node with its
output :class:`~gpd_fx.passes.layout.Layout` (``None``: student width). ``ctx.cut(reason)``
(or raising :class:`~gpd_fx.passes.registry.CannotExpand`) declines; the walk then cuts a
boundary (``DESIGN.md §1``). Rules never touch the builder itself.

Worked example, a channel-wise scale ``y = x * s`` with ``s`` a ``(C,)`` parameter and the
channels of ``x`` on its last dim (``tests/test_rules.py`` runs this code)::

    class ChannelScale(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.scale = nn.Parameter(torch.randn(c))

        def forward(self, x):
            return x * self.scale

    @gpd_fx.register_rule(ChannelScale)
    def channel_scale(ctx, node):
        x = node.args[0]
        lay = ctx.layout(x)                      # Layout of x's expanded dim, or None (kept)
        if lay is None:                          # input at student width: run the op as is
            return ctx.emit_same(), None
        if lay.dim != ctx.sval(x).dim() - 1:
            ctx.cut("channels are not on the last dim")   # a boundary, with this reason
        student = ctx.module()
        wide = ChannelScale(lay.index.numel()).to(student.scale.dtype)
        with torch.no_grad():                    # teacher channel i holds student channel index[i]
            wide.scale.copy_(student.scale[lay.index])
        ctx.add_module(node.target, wide)
        # fold reads the student's scale back from the first copy of each channel
        ctx.add_source(f"{node.target}.scale", node.target, "scale", out=(0, lay.first_copy()))
        return ctx.emit("call_module", node.target, (ctx.dt(x),)), lay

fx traces into a module's ``forward`` unless it is a leaf; a module whose type has a user
rule is kept as one node, so the rule sees the whole ``ChannelScale`` call. The walk checks the
returned node against the student in ``lay``; a mismatch is a fallback (``strict=True``: an
error naming the node).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.fx.node import map_aggregate

from .layout import Layout, interleaved
from .registry import CannotExpand
from .student_map import ParamSource
from .widen_params import WidenedWeight

__all__ = ["RuleContext", "Layout", "WidenedWeight"]


class RuleContext:
    """What a rule sees: the student node's values and layouts, and how to emit teacher nodes.

    Attributes:
        node: the student node being expanded.
        r: the expansion ratio (also ``ratio``).
    """

    def __init__(self, builder: "widen.Builder", node: fx.Node):
        self._b = builder
        self.node = node
        self.r = builder.ratio

    @property
    def ratio(self) -> int:
        return self.r

    # --- reading the student side ------------------------------------------------------
    def module(self, node: fx.Node | None = None) -> nn.Module:
        """The student module a ``call_module`` node (default: this node) calls."""
        return self._b.smods[(node or self.node).target]

    def sval(self, arg):
        """The student value(s) of a (nested) argument on the probe input."""
        return map_aggregate(arg, lambda a: self._b.svals[a] if isinstance(a, fx.Node) else a)

    @property
    def out(self):
        """The student value of this node."""
        return self._b.svals[self.node]

    def is_tensor(self, arg) -> bool:
        """True when ``arg`` is a graph value holding a tensor in the student."""
        return isinstance(arg, fx.Node) and isinstance(self._b.svals.get(arg), Tensor)

    def tensor_inputs(self, node: fx.Node | None = None) -> list[fx.Node]:
        """Argument nodes (flattened) of ``node`` (default: this node) whose value is a tensor."""
        return [a for a in (node or self.node).all_input_nodes if self.is_tensor(a)]

    def layout(self, arg):
        """The layout of a (nested) argument: a :class:`Layout`, or ``None`` at student width."""
        if isinstance(arg, fx.Node):
            return self._b.env[arg].layout
        if isinstance(arg, (list, tuple)):
            return type(arg)(self.layout(a) for a in arg) if not hasattr(arg, "_fields") else tuple(self.layout(a) for a in arg)
        return None

    def tval(self, dt_arg):
        """The teacher value(s) of a (nested) teacher node on the probe input."""
        return self._b.teacher.value(dt_arg)

    def kept_demand(self) -> bool:
        """True when every use of this node reaches the output through transparent ops only:
        a weight layer may then keep its output at student width."""
        return self._b.kept_demand.get(self.node, False)

    @property
    def noise(self) -> float:
        return self._b.noise

    @property
    def generator(self) -> np.random.Generator:
        """The seeded generator of the symmetry-breaking noise (pass it to the weight rule)."""
        return self._b.generator

    # --- teacher side ------------------------------------------------------------------
    def dt(self, arg):
        """The teacher counterpart of a student argument, in whatever layout it has."""
        return self._b.convert.dt_of(arg)

    def emit(self, op: str, target, args=(), kwargs=None) -> fx.Node:
        """Emit a teacher node (it runs at once on the probe values)."""
        return self._b.teacher.emit(op, target, tuple(args), dict(kwargs or {}))

    def student_scalar(self, arg):
        """Teacher counterpart of a graph value used as a *value* (not a size).

        Python numbers computed from a widened shape (``(C // heads) ** -0.5``) differ in the
        teacher; where such a number meets a tensor it must keep the student's value.
        """
        return self._b.convert.student_scalar(arg)

    def call_function(self, fn, *args, **kwargs) -> fx.Node:
        return self.emit("call_function", fn, args, kwargs)

    def call_method(self, name: str, *args, **kwargs) -> fx.Node:
        return self.emit("call_method", name, args, kwargs)

    def emit_same(self, args=None, kwargs=None) -> fx.Node:
        """Emit this node's op with teacher arguments (default: all arguments mapped)."""
        n = self.node
        args = self.dt(n.args) if args is None else args
        kwargs = self.dt(n.kwargs) if kwargs is None else kwargs
        target = n.target
        if n.op == "call_module":
            target = self._b.ensure_module(n.target, self.module())
        return self.emit(n.op, target, args, kwargs)

    def add_module(self, target: str, module: nn.Module) -> str:
        """Install a (widened) module in the teacher at ``target``; returns ``target``."""
        return self._b.teacher.add_module(target, module)

    def add_source(self, student_name: str, module: str, attr: str, **kw) -> None:
        """Record where the student parameter ``student_name`` lives in the teacher
        (``kw``: ``out``/``inp``/``scale`` of :class:`ParamSource`)."""
        self._b.params.add_source(ParamSource(student_name, module, attr, node=self.node.name, **kw))

    def param_state(self, target: str):
        """How the teacher holds the student tensor at ``get_attr`` target ``target``: ``None``
        (not yet), ``"kept"``, a :class:`Layout` or a :class:`WidenedWeight`."""
        return self._b.params.state.get(target)

    def student_param(self, target: str):
        """The student's tensor at ``get_attr`` target ``target``."""
        return self._b.params.student_value(target)

    def install_param(self, target: str, teacher_value: Tensor, state: Any, **source) -> None:
        """Put the widened ``teacher_value`` at ``target`` in the teacher, remember ``state``
        (see :meth:`param_state`) and, for a parameter, record its source (``source``: the
        ``out``/``inp``/``scale`` of :class:`ParamSource`)."""
        self._b.params.install(target, teacher_value, state=state, node=self.node.name, **source)

    def narrow(self, arg) -> Any:
        """Teacher counterpart of ``arg`` at student width (mean over copies)."""
        return self._b.convert.narrow(arg)

    def to_layout(self, arg, layout: Layout) -> fx.Node:
        """Teacher counterpart of ``arg`` converted to ``layout`` (permute or widen)."""
        return self._b.convert.to_layout(arg, layout)

    def interleave(self, arg) -> tuple[fx.Node, Layout]:
        """Teacher counterpart of an expanded ``arg`` in the interleaved layout."""
        lay = self.layout(arg)
        if lay.is_interleaved:
            return self.dt(arg), lay
        target = interleaved(lay.width, self.r, lay.dim)
        return self.to_layout(arg, target), target

    def index_buffer(self, index: Tensor) -> fx.Node:
        """A teacher node holding the constant ``index`` (for ``index_select`` and friends)."""
        return self._b.teacher.index_node(index)

    def cut(self, reason: str):
        """Decline this node: the walk cuts a boundary here, ``reason`` in the report."""
        raise CannotExpand(reason)
