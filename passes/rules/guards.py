"""Rules for the nodes tracing adds around Python control flow (see ``passes/trace.py``)."""

from __future__ import annotations

import math

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
