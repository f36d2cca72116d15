"""FX capture of the student: ``torch.fx`` plus timm's no-trace registry and a live training flag.

``torch.fx`` evaluates Python at trace time, so ``F.dropout(x, p, self.training)`` would bake the
flag into the graph and the teacher would stop following ``.train()``/``.eval()`` (design.md §4).
During tracing every traced module's ``training`` attribute is replaced by a :class:`_LiveFlag`:
passed as an argument, it becomes a graph node that reads the mode at run time; used in Python
control flow (``if self.training``), it marks its module, which is then kept as a leaf.
"""

from __future__ import annotations

import inspect
import re
from typing import Any, Iterable

import torch
import torch.fx as fx
from torch import nn

from gpd_fx.errors import TraceError

__all__ = ["trace", "GPDTracer", "MODE_ATTR"]

# Name of the empty submodule whose ``training`` flag the graph reads (it follows ``.train()``).
MODE_ATTR = "_gpd_mode"


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


class _LiveFlag:
    """Stands in for ``module.training`` while tracing; remembers if Python branched on it."""

    def __init__(self, value: bool):
        self.value = bool(value)
        self.branched = False

    def __bool__(self) -> bool:
        self.branched = True
        return self.value


def _signature(graph: fx.Graph) -> list[tuple]:
    # tensor constants are numbered per trace; their names carry no meaning
    norm = re.compile(r"_tensor_constant\d+")
    return [norm.sub("_tensor_constant", str((n.op, str(n.target), repr(n.args), repr(n.kwargs))))
            for n in graph.nodes]


class _RestoreAttrs:
    """fx stores tensor constants as new attributes on the traced modules; take them off again."""

    def __init__(self, root: nn.Module):
        self.before = {m: set(m.__dict__) | set(m._buffers) for m in root.modules()}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for m, names in self.before.items():
            for k in [k for k in m.__dict__ if k not in names and k.startswith("_tensor_constant")]:
                delattr(m, k)
            for k in [k for k in m._buffers if k not in names and k.startswith("_tensor_constant")]:
                del m._buffers[k]


def _mode_invariant(m: nn.Module, factory) -> bool:
    """True when ``m`` traces to the same graph in train and eval mode.

    Python that branches on ``self.training`` only to pick between equal values (timm's
    ``dropout_p = self.attn_drop.p if self.training else 0.`` with p = 0) bakes nothing that
    matters; such modules are traced through instead of being kept as leaves.
    """
    flags = [(sub, sub.training) for sub in m.modules()]
    try:
        sigs = []
        with _RestoreAttrs(m):
            for mode in (True, False):
                m.train(mode)
                sigs.append(_signature(factory().trace(m)))
        return sigs[0] == sigs[1]
    except Exception:
        return False
    finally:
        for sub, f in flags:
            sub.training = f


class _FlagTracer(GPDTracer):
    """Records a :class:`_LiveFlag` argument as a node reading the root's mode at run time."""

    def create_arg(self, a: Any):
        if isinstance(a, _LiveFlag):
            mode = self.create_node("get_attr", MODE_ATTR, (), {})
            return self.create_node("call_function", getattr, (mode, "training"), {})
        return super().create_arg(a)


def _trace_with_flags(model: nn.Module, tracer: _FlagTracer, concrete_args, invariant: set[int]):
    """Trace with live flags; returns the graph and the modules that branched on their flag."""
    flags: dict[nn.Module, tuple[bool, _LiveFlag]] = {}
    for name, m in model.named_modules():
        if (name and tracer.is_leaf_module(m, name)) or id(m) in invariant:
            continue
        flag = _LiveFlag(m.training)
        flags[m] = (m.training, flag)
        m.training = flag
    try:
        graph = tracer.trace(model, concrete_args=concrete_args)
    finally:
        for m, (value, _) in flags.items():
            m.training = value
    branched = [m for m, (_, f) in flags.items() if f.branched and m is not model]
    root_flag = flags.get(model)
    tracer.root_branched = bool(root_flag and root_flag[1].branched)
    return graph, branched


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

    with _RestoreAttrs(model):
        graph = None
        invariant: set[int] = set()
        for _ in range(16):  # each round settles the modules that branched on `training`
            tracer = _FlagTracer(leaf_types, leaf_insts, autowrap_functions)
            try:
                graph, branched = _trace_with_flags(model, tracer, concrete_args, invariant)
            except Exception as e:  # fx raises many types; re-raise one with a fix in the message
                where = _innermost_user_frame(e)
                raise TraceError(
                    f"torch.fx could not trace {type(model).__name__}: {type(e).__name__}: {e}{where}\n"
                    "Fix: pass the submodule class that contains this code as a leaf, e.g. "
                    "expand(model, ..., leaf_modules=[ThatModule]); it then becomes one node (a boundary "
                    "unless a rule for it is registered), or fix Python-level arguments with concrete_args."
                ) from e
            if not branched:
                break
            for m in branched:
                if _mode_invariant(m, lambda: GPDTracer(leaf_types, leaf_insts, autowrap_functions)):
                    invariant.add(id(m))
                else:
                    leaf_insts = leaf_insts + [m]
        # Root built from a dict of the graph's targets: the user's model is never touched, and the
        # mode-flag submodule exists only in the graph module.
        targets: dict[str, Any] = {}
        for node in graph.nodes:
            if node.op in ("call_module", "get_attr") and node.target != MODE_ATTR:
                targets[node.target] = model.get_submodule(node.target) if node.op == "call_module" \
                    else _attr(model, node.target)
        mode = nn.Module()
        mode.training = model.training
        targets[MODE_ATTR] = mode
    gm = fx.GraphModule(targets, graph, model.__class__.__name__)
    gm.training = model.training
    gm.meta["gpd_leaf_instances"] = [id(m) for m in leaf_insts]
    # The root itself cannot be a leaf: when its forward branches on `self.training` and the
    # two modes trace differently (GoogLeNet's aux logits), expand builds one graph per mode.
    gm.meta["gpd_root_mode_dependent"] = bool(getattr(tracer, "root_branched", False)) and not _mode_invariant(
        model, lambda: GPDTracer(leaf_types, leaf_insts, autowrap_functions))
    return gm


def _attr(root: nn.Module, target: str):
    mod, _, name = target.rpartition(".")
    return getattr(root.get_submodule(mod) if mod else root, name)


def _innermost_user_frame(e: BaseException) -> str:
    import traceback

    frames = [f for f in traceback.extract_tb(e.__traceback__)
              if "/torch/" not in f.filename and "/gpd_fx/" not in f.filename
              and "/passes/" not in f.filename]
    if not frames:
        return ""
    f = frames[-1]
    return f"\n  at {f.filename}:{f.lineno} in {f.name}: {f.line}"
