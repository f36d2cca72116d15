"""Boundaries: ops the teacher runs at student width, and how they are named and explained.

An op without a rule, a rule that declines (``CannotExpand``) or a rule whose result does not
verify becomes a boundary (``DESIGN.md §1``): its expanded inputs are narrowed to student width,
it runs unchanged, and its output stays at student width. With ``strict=True`` a boundary is
an :class:`~gpd_fx.errors.UnsupportedOpError` that names the node and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from gpd_fx.errors import UnsupportedOpError

from .trace import AutogradApply

__all__ = ["Boundary", "describe", "explain", "strict_error"]


@dataclass
class Boundary:
    """One node the teacher runs at student width (or a rule that fell back), and why."""
    node: str
    op: str
    reason: str


def describe(node: fx.Node) -> str:
    """The op of ``node`` in words (``module layer1.0.conv1``, ``method .view()``, ...)."""
    if isinstance(node.target, AutogradApply):
        fn = node.target.function
        return f"autograd.Function {fn.__module__}.{fn.__qualname__}"
    if node.op == "call_module":
        return f"module {node.target}"
    if node.op == "call_method":
        return f"method .{node.target}()"
    if node.op == "call_function":
        return f"function {getattr(node.target, '__module__', '')}.{getattr(node.target, '__name__', node.target)}"
    return f"{node.op} {node.target}"


def explain(node: fx.Node, reason: str) -> tuple[str, str, str]:
    """``(reason, key, hint)`` for a boundary at ``node``: the key to register a rule under, as
    the message spells it, and a hint for custom autograd Functions."""
    key, hint = "<key>", ""
    if isinstance(node.target, AutogradApply):
        # Its forward and backward are the user's code: what they do to the channels is not
        # known, and the verification sees the forward values on one input only, never the
        # backward. So it runs at student width, the backward intact, unless a rule says more.
        key = repr(node.target)
        hint = (" (for a Function that acts on each element alone, in its forward and its backward, "
                "the element-wise rule gpd_fx.passes.rules.elementwise.broadcast is exact)")
        if reason == "no rule for this op":
            reason = (f"no rule for the custom autograd.Function {node.target.function.__qualname__}: it "
                      f"runs at student width with its own backward (gpd_fx.register_rule({key}) widens it)")
    return reason, key, hint


def strict_error(node: fx.Node, reason: str, key: str, hint: str) -> UnsupportedOpError:
    """The error ``strict=True`` raises instead of cutting a boundary at ``node``."""
    return UnsupportedOpError(
        f"While expanding {node.format_node()} ({describe(node)}): {reason}, and strict=True "
        f"forbids a boundary. Fix: register a rule with @gpd_fx.register_rule({key}) or "
        f"expand(..., extra_rules={{{key}: rule}}){hint}, or pass strict=False to narrow "
        "its inputs to student width around it.")
