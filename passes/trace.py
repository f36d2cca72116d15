"""FX capture of the student: ``torch.fx`` plus timm's no-trace registry and mode-dependent leaves.

``torch.fx`` evaluates Python control flow at trace time, so a submodule that passes
``self.training`` to a function (``F.dropout(x, p, self.training)``, drop-path) would have the
flag baked into the graph and the teacher would stop following ``.train()``/``.eval()``. Such
submodules are detected by tracing them in both modes and comparing the code; those whose graph
changes with the mode become leaves (design.md §4).
"""

from __future__ import annotations

import inspect
from typing import Any, Iterable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from gpd_fx.errors import TraceError

__all__ = ["trace", "GPDTracer", "mode_dependent_modules"]


def _timm_notrace() -> tuple[tuple[type, ...], tuple[Any, ...]]:
    import sys

    if "timm" not in sys.modules:  # a model built without timm cannot contain timm layers
        return (), ()
    try:
        from timm.layers import get_notrace_functions, get_notrace_modules
    except Exception:  # timm missing or too old: nothing registered
        return (), ()
    return tuple(get_notrace_modules()), tuple(get_notrace_functions())


class GPDTracer(fx.Tracer):
    """``fx.Tracer`` that keeps given module types/instances and timm's no-trace modules as leaves."""

    def __init__(self, leaf_types: Iterable[type] = (), leaf_instances: Iterable[nn.Module] = (),
                 autowrap_functions: Iterable[Any] = ()):
        timm_mods, timm_fns = _timm_notrace()
        super().__init__(autowrap_functions=tuple(autowrap_functions) + timm_fns)
        self.leaf_types = tuple(leaf_types) + timm_mods
        self.leaf_ids = {id(m) for m in leaf_instances}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if id(m) in self.leaf_ids:
            return True
        if self.leaf_types and isinstance(m, self.leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _mentions_training(module: nn.Module) -> bool:
    try:
        src = inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        return False
    return "training" in src


_DROPOUT_FNS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
                F.feature_alpha_dropout, torch.dropout}


def _signature(graph: fx.Graph) -> list[tuple]:
    """Node-by-node description of a graph; a dropout with p == 0 is the same in both modes."""
    sig = []
    for n in graph.nodes:
        if n.op == "call_function" and n.target in _DROPOUT_FNS:
            p = n.args[1] if len(n.args) > 1 else n.kwargs.get("p", 0.5)
            if isinstance(p, (int, float)) and p == 0:
                sig.append((n.op, "dropout(p=0)", repr(n.args[:1])))
                continue
        sig.append((n.op, str(n.target), repr(n.args), repr(n.kwargs)))
    return sig


def mode_dependent_modules(model: nn.Module, tracer_factory) -> list[nn.Module]:
    """Submodules whose traced graph depends on ``self.training`` (or that cannot be traced alone).

    Only modules outside ``torch.nn`` whose ``forward`` mentions ``training`` are candidates;
    each is traced standalone in train and eval mode, and kept as a leaf when the graphs differ
    (ignoring dropouts with p == 0, which do nothing in either mode).
    """
    found: list[nn.Module] = []
    probe = tracer_factory()
    for name, m in model.named_modules():
        if not name or probe.is_leaf_module(m, name) or not _mentions_training(m):
            continue
        if any(_is_submodule_of(m, f) for f in found):
            continue
        flags = [(sub, sub.training) for sub in m.modules()]
        try:
            sigs = []
            for mode in (True, False):
                m.train(mode)
                sigs.append(_signature(tracer_factory().trace(m)))
            if sigs[0] != sigs[1]:
                found.append(m)
        except Exception:
            # It cannot be traced on its own: conservatively a leaf.
            found.append(m)
        finally:
            for sub, f in flags:
                sub.training = f
    return found


def _is_submodule_of(m: nn.Module, parent: nn.Module) -> bool:
    return any(sub is m for sub in parent.modules())


def trace(model: nn.Module, *, leaf_modules: Iterable[type | nn.Module] | None = None,
          concrete_args: dict[str, Any] | None = None,
          autowrap_functions: Iterable[Any] = ()) -> fx.GraphModule:
    """Symbolically trace ``model`` for expansion.

    Args:
        model: the student.
        leaf_modules: module classes or instances to keep as single nodes (not traced into).
        concrete_args: passed to ``Tracer.trace`` (fix Python-level arguments of ``forward``).
        autowrap_functions: extra functions to record as single ``call_function`` nodes.

    Returns:
        A ``GraphModule`` sharing submodules with ``model``.

    Raises:
        TraceError: naming the failing line and suggesting ``leaf_modules``.
    """
    leaf_types = [x for x in (leaf_modules or ()) if isinstance(x, type)]
    leaf_insts = [x for x in (leaf_modules or ()) if isinstance(x, nn.Module)]

    def factory():
        return GPDTracer(leaf_types, leaf_insts, autowrap_functions)

    leaf_insts = leaf_insts + mode_dependent_modules(model, factory)
    tracer = factory()
    try:
        graph = tracer.trace(model, concrete_args=concrete_args)
    except Exception as e:  # fx raises many types; re-raise one with a fix in the message
        where = _innermost_user_frame(e)
        raise TraceError(
            f"torch.fx could not trace {type(model).__name__}: {type(e).__name__}: {e}{where}\n"
            "Fix: pass the submodule class that contains this code as a leaf, e.g. "
            "expand(model, ..., leaf_modules=[ThatModule]); it then becomes one node (a boundary "
            "unless a rule for it is registered), or fix Python-level arguments with concrete_args."
        ) from e
    name = model.__class__.__name__
    gm = fx.GraphModule(tracer.root, graph, name)
    gm.meta["gpd_leaf_instances"] = [id(m) for m in leaf_insts]
    return gm


def _innermost_user_frame(e: BaseException) -> str:
    import traceback

    frames = [f for f in traceback.extract_tb(e.__traceback__)
              if "/torch/" not in f.filename and "/gpd_fx/" not in f.filename
              and "/passes/" not in f.filename]
    if not frames:
        return ""
    f = frames[-1]
    return f"\n  at {f.filename}:{f.lineno} in {f.name}: {f.line}"
