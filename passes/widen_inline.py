"""Inlining: a wrapped Python function (``fx.wrap``, timm's no-trace functions) expanded op by op.

The function is traced on its own (:func:`gpd_fx.passes.trace.trace_function`), with every
argument that is not a graph value fixed as a constant, and the walk visits its nodes exactly
like the model's. A function that cannot be traced stays one node (a boundary).
"""

from __future__ import annotations

import copy
import inspect
import torch.fx as fx
from torch.fx.node import map_aggregate

from .trace import trace_function
from .widen_values import layouts_of

__all__ = ["inlinable", "inline_call", "MAX_DEPTH"]

# Wrapped functions calling wrapped functions are opened this deep, no deeper.
MAX_DEPTH = 4


def inlinable(node: fx.Node) -> bool:
    """A call of a plain Python function outside torch, builtins and operator."""
    fn = node.target
    return (node.op == "call_function" and inspect.isfunction(fn)
            and not getattr(fn, "__module__", "").startswith(("torch.", "builtins", "operator")))


def inline_call(walk: "widen.Builder", node: fx.Node) -> bool:
    """Visit the body of the function ``node`` calls in place of ``node``.

    Returns False (the caller then cuts a boundary) when no input is expanded, the nesting is
    too deep, or the function cannot be traced.
    """
    if not walk.inputs_expanded(node) or walk.inline_depth > MAX_DEPTH:
        return False
    fn = node.target
    try:
        sig = inspect.signature(fn)
        bound = sig.bind(*node.args, **node.kwargs)
        bound.apply_defaults()
    except (TypeError, ValueError):
        return False
    names = []
    for name, value in list(bound.arguments.items()):
        param = sig.parameters[name]
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            return False
        # A graph value that is None in this run (timm's mvitv2 passes `cls_tok = None` out of
        # one wrapped function into the next) is a constant of the call: as a proxy it would
        # make `if cls_tok is not None` trace the branch this run does not take.
        value = map_aggregate(value, lambda a: None if isinstance(a, fx.Node) and walk.is_none(a) else a)
        bound.arguments[name] = value
        found = []
        map_aggregate(value, lambda a: found.append(a) if isinstance(a, fx.Node) else None)
        if found:
            names.append(name)
    # A wrapper whose only parameters are the graph-valued arguments; everything else is a
    # constant of the call (fx's own concrete_args would add asserts for each of them).
    dynamic = {f"_a{i}": bound.arguments[n] for i, n in enumerate(names)}
    src = (f"def _inlined({', '.join(dynamic)}):\n"
           + "".join(f"    _bound.arguments[{n!r}] = _a{i}\n" for i, n in enumerate(names))
           + "    return _fn(*_bound.args, **_bound.kwargs)\n")
    scope = {"_fn": fn, "_bound": copy.copy(bound)}
    scope["_bound"].arguments = dict(bound.arguments)
    exec(src, scope)  # noqa: S102 - generated from parameter names only
    svals = walk.svals
    try:
        # traced on this run's values: branches on sizes (``max(H, W)``, ``if pad:``) take
        # this run's path, and guards in the graph re-check them at run time
        values = tuple(map_aggregate(v, lambda a: svals[a] if isinstance(a, fx.Node) else a)
                       for v in dynamic.values())
        sub = trace_function(scope["_inlined"], values)
    except Exception:
        return False
    walk.flops.forget(node)   # the body's ops are counted one by one below
    walk.inline_depth += 1
    try:
        for sn in sub.nodes:
            if sn.op == "placeholder":
                value = dynamic[sn.target]
                svals[sn] = map_aggregate(value, lambda a: svals[a] if isinstance(a, fx.Node) else a)
                walk.set_entry(sn, walk.convert.dt_of(value), layouts_of(walk.env, value))
            elif sn.op == "output":
                out = sn.args[0]
                svals[node] = map_aggregate(out, lambda a: svals[a] if isinstance(a, fx.Node) else a)
                walk.set_entry(node, walk.convert.dt_of(out), layouts_of(walk.env, out))
            elif sn.op == "get_attr":
                return False
            else:
                walk.step(sn)
    finally:
        walk.inline_depth -= 1
    return True
