"""Rules for the nodes tracing adds around Python control flow (see ``passes/trace.py``)."""

from __future__ import annotations

import math

from ..export_front import input_shape_guard
from ..layout import Layout
from ..registry import register
from ..trace import shape_guard
from .elementwise import broadcast

# ``math.ceil(H / p)`` on sizes: plain arithmetic on Python numbers, like ``operator.floordiv``.
register(math.ceil, math.floor, math.trunc)(broadcast)


@register(shape_guard)
def guard(ctx, node):
    """A branch decided at trace time: the teacher checks the *student's* condition.

    A condition computed from a widened size (``C // heads > 1``) has another value in the
    teacher; the student's value is the one the branch was decided on.
    """
    value, expected, where = node.args
    return ctx.call_function(shape_guard, ctx.student_scalar(value), expected, where), None


def _input_shape_guard_rule(ctx, node):
    """The export front end's check of an input's captured shape. An input the teacher takes
    widened (a port between connected scopes, ``passes/ports.py``) is checked at teacher width:
    its expanded dim holds ``r`` times the captured size."""
    x, shape, name = node.args
    lay = ctx.layout(x)
    if isinstance(lay, Layout) and shape[lay.dim] is not None:
        shape = tuple(s * ctx.r if i == lay.dim else s for i, s in enumerate(shape))
    return ctx.call_function(node.target, ctx.dt(x), shape, name), None


register(input_shape_guard)(_input_shape_guard_rule)
