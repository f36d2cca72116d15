"""FX capture of the student: ``torch.fx`` plus timm's no-trace registry and a live training flag.

``torch.fx`` evaluates Python at trace time, so ``F.dropout(x, p, self.training)`` would bake the
flag into the graph and the teacher would stop following ``.train()``/``.eval()``
(``DESIGN.md §1``).
During tracing every traced module's ``training`` attribute is replaced by a :class:`_LiveFlag`:
passed as an argument, it becomes a graph node that reads the mode at run time; used in Python
control flow (``if self.training``), it marks its module, which is then kept as a leaf.
"""

from __future__ import annotations

import contextlib
import inspect
import re
import math
import weakref
from typing import Any, Callable, Iterable

import torch
import torch.fx as fx
from torch import nn

from gpd_fx.errors import TraceError

from .module_paths import get_path

__all__ = ["trace", "trace_function", "shape_guard", "GPDTracer", "MODE_ATTR", "AutogradApply", "autograd_apply"]

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
    """``fx.Tracer`` that keeps given module types/instances and timm's no-trace modules as leaves.

    With ``through`` (a predicate on modules), timm no-trace modules for which it returns True
    are traced into instead: their shape-dependent Python is what :class:`_ValueTracer` can
    decide on the example inputs.
    """

    def __init__(self, leaf_types: Iterable[type] = (), leaf_instances: Iterable[nn.Module] = (),
                 autowrap_functions: Iterable[Any] = (), through: Callable[[nn.Module], bool] | None = None):
        timm_mods, timm_fns = _timm_notrace()
        super().__init__(autowrap_functions=tuple(autowrap_functions) + timm_fns)
        self.leaf_types = tuple(leaf_types)
        self.timm_types = timm_mods
        self.leaf_ids = {id(m) for m in leaf_instances}
        self.through = through

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if id(m) in self.leaf_ids:
            return True
        if self.leaf_types and isinstance(m, self.leaf_types):
            return True
        if self.timm_types and isinstance(m, self.timm_types):
            return not self.traces_through(m)
        return super().is_leaf_module(m, module_qualified_name)

    def traces_through(self, m: nn.Module) -> bool:
        """True for a timm no-trace module that this tracer opens (see ``through``)."""
        return (self.through is not None and bool(self.timm_types) and isinstance(m, self.timm_types)
                and id(m) not in self.leaf_ids and self.through(m))

    def trace(self, root, concrete_args=None):
        with _autograd_functions_as_calls():
            return super().trace(root, concrete_args)


class AutogradApply:
    """The target of a graph node that calls a custom ``torch.autograd.Function``: ``Fn.apply``.

    fx would trace into ``Fn.forward`` and record its ops, so the graph would run the forward
    with ordinary autograd and the Function's own backward would be lost (a straight-through
    estimator would become ``round``, with zero gradient). The tracer records one call of this
    object instead, which runs ``Fn.apply`` itself. ``Fn.apply`` is a built-in method that fx
    cannot name in generated code, hence this wrapper; it compares and hashes equal to
    ``Fn.apply``, so a rule registered with ``gpd_fx.register_rule(Fn.apply)`` finds the node.
    Get instances from :func:`autograd_apply` (one per Function class).
    """

    def __init__(self, function: type):
        self.function = function
        # ``Fn.apply`` as the user sees it, looked up past the tracer's patch: hashes of graph
        # targets must not change when the patch is undone (fx indexes nodes by target)
        self._apply = _unpatched_apply(function)
        self._overridden = any("apply" in k.__dict__ for k in function.__mro__[:function.__mro__.index(
            torch.autograd.Function)])
        # torch.fx names the callable in generated code from __module__ and __name__; pickling a
        # GraphModule imports it back by __qualname__ from __module__ (see ``__getattr__`` below)
        self.__module__ = __name__
        self.__name__ = f"{function.__name__}_apply"
        self.__qualname__ = _APPLY_PREFIX + f"{function.__module__}:{function.__qualname__}".encode().hex()

    def __call__(self, *args, **kwargs):
        proxy = _first_proxy((args, kwargs))
        if proxy is not None:
            # traced again by any fx tracer (an unpickled GraphModule is rebuilt by tracing its
            # code with a plain one): stay one node
            return proxy.tracer.create_proxy("call_function", self, args, kwargs)
        if self._overridden:
            # what ``Function.apply`` does: the override of ``apply`` in ``Fn`` ran while tracing
            # and its ops are in the graph already
            return _ORIGINAL_APPLY.__get__(None, self.function)(*args, **kwargs)
        return self.function.apply(*args, **kwargs)   # the spelling torch.compile understands

    def __eq__(self, other):
        if isinstance(other, AutogradApply):
            return other.function is self.function
        return other == self._apply

    def __hash__(self):
        return hash(self._apply)

    def __repr__(self):
        return f"{self.function.__qualname__}.apply"

    def __reduce__(self):
        return autograd_apply, (self.function,)


_ORIGINAL_APPLY = torch.autograd.Function.__dict__["apply"]


def _first_proxy(value) -> fx.Proxy | None:
    found = []
    fx.node.map_aggregate(value, lambda a: found.append(a) if isinstance(a, fx.Proxy) else None)
    return found[0] if found else None


def _unpatched_apply(function: type):
    """``function.apply`` with the tracer's patch of ``Function.apply`` (if active) skipped."""
    for klass in function.__mro__:
        if "apply" in klass.__dict__:
            found = klass.__dict__["apply"]
            if getattr(found, "_gpd_patched", False):
                found = _ORIGINAL_APPLY
            return found.__get__(None, function)
    return _ORIGINAL_APPLY.__get__(None, function)


_APPLY_PREFIX = "_gpd_apply_"
_APPLY_CACHE: "weakref.WeakKeyDictionary[type, AutogradApply]" = weakref.WeakKeyDictionary()


def autograd_apply(function: type) -> AutogradApply:
    """The one :class:`AutogradApply` of ``function`` (a ``torch.autograd.Function`` subclass)."""
    obj = _APPLY_CACHE.get(function)
    if obj is None:
        obj = _APPLY_CACHE[function] = AutogradApply(function)
    return obj


def __getattr__(name: str):
    """``from gpd_fx.passes.trace import _gpd_apply_<hex>``: how a pickled GraphModule's code
    imports an :class:`AutogradApply` (the hex encodes ``module:qualname`` of the Function)."""
    if name.startswith(_APPLY_PREFIX):
        import importlib

        try:
            module, _, qualname = bytes.fromhex(name[len(_APPLY_PREFIX):]).decode().partition(":")
            obj = importlib.import_module(module)
            for part in qualname.split("."):
                obj = getattr(obj, part)
        except (ValueError, ImportError, AttributeError) as e:
            raise AttributeError(f"{name}: cannot import the autograd.Function it names ({e})") from e
        if isinstance(obj, type) and issubclass(obj, torch.autograd.Function):
            return autograd_apply(obj)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _inlined_functions() -> tuple[type, ...]:
    """Functions whose backward is the derivative of their forward: traced into, their ops recorded.

    Reentrant activation checkpointing recomputes the forward in its backward: the inlined ops
    give the same gradients, and as one call node its arguments (the checkpointed callable)
    could not even be recorded.
    """
    from torch.utils.checkpoint import CheckpointFunction

    return (CheckpointFunction,)


@contextlib.contextmanager
def _autograd_functions_as_calls():
    """While tracing, ``Fn.apply`` on graph values records one :class:`AutogradApply` node."""
    Function = torch.autograd.Function
    original = Function.__dict__["apply"]
    if getattr(original, "_gpd_patched", False):   # a trace inside a trace
        yield
        return
    inlined = _inlined_functions()

    def apply(cls, *args, **kwargs):
        if _first_proxy((args, kwargs)) is None or issubclass(cls, inlined):
            return original.__get__(None, cls)(*args, **kwargs)
        return autograd_apply(cls)(*args, **kwargs)

    patched = classmethod(apply)
    apply._gpd_patched = True
    patched._gpd_patched = True
    Function.apply = patched
    try:
        yield
    finally:
        Function.apply = original


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
        self.before = {m: dict(m.__dict__) for m in root.modules()}
        self.buffers = {m: set(m._buffers) for m in root.modules()}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for m, before in self.before.items():
            for k, v in list(m.__dict__.items()):
                if k not in before:
                    # fx's tensor constants, and caches a traced forward stored (they hold proxies)
                    if k.startswith("_tensor_constant") or _holds_proxy(v):
                        delattr(m, k)
                elif v is not before[k] and _holds_proxy(v):
                    setattr(m, k, before[k])
            for k in [k for k in m._buffers if k not in self.buffers[m] and k.startswith("_tensor_constant")]:
                del m._buffers[k]


def _holds_proxy(v) -> bool:
    found = []
    fx.node.map_aggregate(v, lambda a: found.append(a) if isinstance(a, fx.Proxy) else None)
    return bool(found)


def _mode_invariant(m: nn.Module, factory) -> bool:
    """True when ``m`` traces to the same graph in train and eval mode.

    Python that branches on ``self.training`` only to pick between equal values (timm's
    ``dropout_p = self.attn_drop.p if self.training else 0.`` with p = 0) bakes nothing that
    matters; such modules are traced through instead of being kept as leaves.
    """
    flags = [(sub, sub.training) for sub in m.modules()]
    # a tracer that runs the ops (``_ValueTracer``) would update BatchNorm statistics in train mode
    buffers = [(b, b.detach().clone()) for b in m.buffers()]
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
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)


class _FlagTracer(GPDTracer):
    """Records a :class:`_LiveFlag` argument as a node reading the root's mode at run time."""

    def create_arg(self, a: Any):
        if isinstance(a, _LiveFlag):
            mode = self.create_node("get_attr", MODE_ATTR, (), {})
            return self.create_node("call_function", getattr, (mode, "training"), {})
        return super().create_arg(a)


_UNKNOWN = object()


# dead-code elimination must keep the guards although nothing uses their (None) result: fx's
# public registration of a function with a side effect (an assert-like check)
@fx.node.has_side_effect
def shape_guard(value: Any, expected: bool, where: str) -> None:
    """Run-time check of a Python branch that tracing decided on the example inputs.

    ``if pad_r > 0:`` inside a traced module becomes the path the example inputs took plus
    this check of its condition: a teacher run on inputs that would take the other path stops
    with this error instead of computing something else.
    """
    if bool(value) != expected:
        raise RuntimeError(
            f"gpd_fx: the graph was traced with the condition at {where} being {expected} on the "
            f"example inputs; for these inputs it is {not expected} (another input shape?). "
            "Expand with example inputs of the shape you run the model on.")



class _ValueProxy(fx.Proxy):
    """A proxy whose tracer knows its value; ``math.ceil``/``math.floor`` of it become nodes."""

    def __ceil__(self):
        return self.tracer.create_proxy("call_function", math.ceil, (self,), {})

    def __floor__(self):
        return self.tracer.create_proxy("call_function", math.floor, (self,), {})

    def __trunc__(self):
        return self.tracer.create_proxy("call_function", math.trunc, (self,), {})

    # A tuple's or a shape's length is fixed by the program (not by the data): unpack it.
    def _sequence(self):
        v = self.tracer.values.get(self.node, _UNKNOWN)
        return v if isinstance(v, (tuple, list, torch.Size)) else None

    def _length(self, seq) -> int:
        if not isinstance(seq, torch.Size):   # a shape's length is the rank, fixed by the graph
            n = self.tracer.create_proxy("call_function", len, (self,), {})
            self.tracer.create_proxy("call_function", shape_guard, (n == len(seq), True, _caller()), {})
        return len(seq)

    def __iter__(self):
        seq = self._sequence()
        if seq is None:
            return super().__iter__()
        return iter([self[i] for i in range(self._length(seq))])

    def __len__(self):
        seq = self._sequence()
        if seq is None:
            return super().__len__()
        return self._length(seq)


# What a branch may be decided on: sizes, and Python arithmetic on them and on constants.
_SIZE_METHODS = {"size", "dim", "ndimension", "numel", "nelement", "__len__"}
_SIZE_ATTRS = {"shape", "ndim"}
_PURE_MODULES = {"_operator", "operator", "math", "builtins"}

_SEQUENCE_FUNCTIONS = (torch.cat, torch.concat, torch.concatenate, torch.stack, torch.hstack,
                       torch.vstack, torch.dstack)


def _plain_lists(value):
    """``value`` with fx's immutable argument lists as plain lists, as the traced code gets them
    at run time (the generated code builds a fresh list per call): a wrapped function that
    updates a list argument in place (torchvision's Swin3D ``_get_window_and_shift_size``) can
    then be evaluated on the example values."""
    if isinstance(value, list):
        return [_plain_lists(v) for v in value]
    if type(value) is tuple:
        return tuple(_plain_lists(v) for v in value)
    if isinstance(value, dict):
        return {k: _plain_lists(v) for k, v in value.items()}
    return value


class _ValueTracer(_FlagTracer):
    """Traces while running every op on the example inputs, so Python may branch on shapes.

    ``torch.fx`` cannot trace ``if H % ws:`` (the reason timm keeps such modules out of fx).
    This tracer knows each node's value on the example inputs: a branch on a Python number
    (a size, a padding) takes the path those inputs take, and a :func:`shape_guard` node
    checks the condition at run time. Branches on tensor *data* still fail, as in fx.
    """

    def __init__(self, *args, example_inputs: tuple = (), **kwargs):
        super().__init__(*args, **kwargs)
        self.example_inputs = tuple(example_inputs)
        self.values: dict[fx.Node, Any] = {}
        self.module_inputs: dict[int, tuple] = {}   # id(module) -> argument nodes of its first call
        self._placeholders = 0
        self._opened: list[nn.Module] = []
        self._sizes_memo: dict[fx.Node, bool] = {}

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ValueProxy(node, self)

    def create_proxy(self, kind, target, args, kwargs, *rest, **kw):
        # ``torch.cat(torch.split(x, 1, dim))``: the sequence as a list of its items, so the
        # rules see one node per tensor (its length is guarded like any decided size)
        if (kind == "call_function" and target in _SEQUENCE_FUNCTIONS and args
                and isinstance(args[0], _ValueProxy) and args[0]._sequence() is not None):
            args = (list(args[0]), *args[1:])
        return super().create_proxy(kind, target, args, kwargs, *rest, **kw)

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        self.values[node] = self._evaluate(node)
        return node

    def create_arg(self, a: Any):
        out = super().create_arg(a)
        if isinstance(a, _LiveFlag):
            self.values[out] = a.value
        return out

    def _value_of(self, arg):
        unknown = []

        def one(a):
            v = self.values.get(a, _UNKNOWN)
            if v is _UNKNOWN:
                unknown.append(a)
            return v

        out = fx.node.map_aggregate(arg, lambda a: one(a) if isinstance(a, fx.Node) else a)
        return _UNKNOWN if unknown else _plain_lists(out)

    def _evaluate(self, node: fx.Node):
        if node.op == "placeholder":
            i, self._placeholders = self._placeholders, self._placeholders + 1
            if i < len(self.example_inputs):
                return self.example_inputs[i]
            return node.args[0] if node.args else _UNKNOWN
        if node.op == "output" or (node.op == "get_attr" and node.target == MODE_ATTR):
            return _UNKNOWN
        if node.op == "get_attr":
            with _unpatched():  # fx patches nn.Module.__getattr__ too
                return get_path(self.root, node.target)
        args, kwargs = self._value_of(node.args), self._value_of(node.kwargs)
        if args is _UNKNOWN or kwargs is _UNKNOWN:
            return _UNKNOWN
        try:
            # fx patches nn.Module.__call__ while tracing: run the real modules unpatched
            with torch.no_grad(), _unpatched():
                if node.op == "call_module":
                    return self.root.get_submodule(node.target)(*args, **kwargs)
                if node.op == "call_method":
                    return getattr(args[0], node.target)(*args[1:], **kwargs)
                return node.target(*args, **kwargs)
        except Exception:  # a value we cannot compute only matters if Python branches on it
            return _UNKNOWN

    def to_bool(self, obj: fx.Proxy) -> bool:
        value = self.values.get(obj.node, _UNKNOWN)
        if value is _UNKNOWN or not isinstance(value, (bool, int, float)) or not self._from_sizes(obj.node):
            return super().to_bool(obj)   # data-dependent or unknown: fx's TraceError
        decided = bool(value)
        self.create_proxy("call_function", shape_guard, (obj, decided, _caller()), {})
        return decided

    def _from_sizes(self, node: fx.Node) -> bool:
        """True when ``node`` is computed from sizes and Python numbers only, never from tensor
        data (``x.sum().item()``): only such branches may be decided on the example inputs."""
        memo = self._sizes_memo
        if node not in memo:
            memo[node] = False   # cycles cannot occur in a graph; this only guards recursion
            if node.op == "placeholder":
                ok = not isinstance(self.values.get(node), torch.Tensor)
            elif node.op == "get_attr":
                ok = False
            elif node.op == "call_method" and node.target in _SIZE_METHODS \
                    or node.op == "call_function" and node.target is len \
                    or node.op == "call_function" and node.target is getattr and node.args[1] in _SIZE_ATTRS:
                ok = True
            elif node.op == "call_function" and getattr(node.target, "__module__", None) in _PURE_MODULES:
                ok = all(self._from_sizes(a) for a in node.all_input_nodes)
            else:
                ok = False
            memo[node] = ok
        return memo[node]

    def call_module(self, m: nn.Module, forward, args, kwargs):
        if id(m) not in self.module_inputs and not kwargs:
            self.module_inputs[id(m)] = fx.node.map_aggregate(
                tuple(args), lambda a: a.node if isinstance(a, fx.Proxy) else a)
        if not self.traces_through(m):
            return super().call_module(m, forward, args, kwargs)
        self._opened.append(m)
        try:
            with _tensor_attrs_as_buffers(m):
                return super().call_module(m, forward, args, kwargs)
        except Exception as e:  # remember the innermost opened module: it becomes a leaf
            if not hasattr(e, "gpd_through"):
                e.gpd_through = m
            raise
        finally:
            self._opened.pop()

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict):
        # inside an opened module, buffers (and the tensor attributes made buffers for the
        # duration, see ``_tensor_attrs_as_buffers``) are graph nodes, not Python tensors
        self.proxy_buffer_attributes = bool(self._opened)
        return super().getattr(attr, attr_val, parameter_proxy_cache)


@contextlib.contextmanager
def _tensor_attrs_as_buffers(m: nn.Module):
    """Plain tensor attributes of ``m`` (ConViT's cached ``rel_indices``) as buffers while it is
    traced: a Python tensor next to proxies (``t.expand(B, -1)``) breaks fx, a buffer does not."""
    moved = []
    for sub in m.modules():
        for k, v in list(sub.__dict__.items()):
            if isinstance(v, torch.Tensor) and not isinstance(v, nn.Parameter) and not k.startswith("_"):
                del sub.__dict__[k]
                sub._buffers[k] = v
                sub._non_persistent_buffers_set.add(k)
                moved.append((sub, k, v))
    try:
        yield
    finally:
        for sub, k, v in moved:   # the value before tracing: a traced forward may have replaced it
            sub._buffers.pop(k, None)
            sub._non_persistent_buffers_set.discard(k)
            sub.__dict__[k] = v


def _unpatched():
    try:
        from torch.fx._symbolic_trace import _maybe_revert_all_patches
    except ImportError:  # pragma: no cover - private API; without it values stay unknown
        raise RuntimeError("no torch.fx patch reverter")
    return _maybe_revert_all_patches()


def _is_library_file(filename: str) -> bool:
    """torch's or gpd_fx's own source: frames to skip when naming the user's line."""
    return "/torch/" in filename or "/gpd_fx/" in filename or "/passes/" in filename


def _caller() -> str:
    """``file:line`` of the innermost frame outside torch and gpd_fx (the branch being decided)."""
    frame = inspect.currentframe()
    while frame is not None:
        if not _is_library_file(frame.f_code.co_filename):
            return f"{frame.f_code.co_filename}:{frame.f_lineno}"
        frame = frame.f_back
    return "?"


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


@contextlib.contextmanager
def _jit_tracing():
    """``torch.jit.is_tracing()`` is True while gpd_fx traces.

    Code that keeps Python-side caches in eager mode takes its graph-capture path then (timm's
    LeViT/EfficientFormer attention biases: ``if torch.jit.is_tracing() or self.training``),
    which computes the same values without a mode-dependent cache. The patch is process-wide but
    lives only inside :func:`trace` (restored on exit, also when tracing fails).
    """
    saved = torch.jit.is_tracing
    torch.jit.is_tracing = lambda: True
    try:
        yield
    finally:
        torch.jit.is_tracing = saved


def trace_function(fn: Callable, example_inputs: tuple) -> fx.Graph:
    """Trace the plain function ``fn`` (one positional parameter per example input) into a graph.

    Python branches on sizes are decided on ``example_inputs`` and guarded at run time (as in
    :func:`trace` with example inputs). Used to expand a wrapped function (``fx.wrap``, timm's
    no-trace functions) op by op. Raises whatever torch.fx raises when ``fn`` cannot be traced.
    """
    tracer = _ValueTracer(example_inputs=example_inputs)
    try:
        return tracer.trace(fn)
    finally:
        # proxies and tracer form reference cycles that would keep the values alive
        tracer.values.clear()
        tracer.module_inputs.clear()


def trace(model: nn.Module, *, leaf_modules: Iterable[type | nn.Module] | None = None,
          concrete_args: dict[str, Any] | None = None,
          autowrap_functions: Iterable[Any] = (), example_inputs: tuple | None = None,
          has_rule: Callable[[nn.Module], bool] | None = None) -> fx.GraphModule:
    """Symbolically trace ``model`` for expansion.

    Args:
        model: the student.
        leaf_modules: module classes or instances to keep as single nodes (not traced into).
        concrete_args: passed to ``Tracer.trace`` (fix Python-level arguments of ``forward``).
        autowrap_functions: extra functions to record as single ``call_function`` nodes.
        example_inputs: inputs ``model`` accepts. With them, Python branches on sizes are
            decided on these inputs and guarded at run time (:func:`shape_guard`), and timm's
            no-trace modules are traced into (those ``has_rule`` accepts stay single nodes; so
            does any whose forward still cannot be traced).
        has_rule: True for a module that has an expansion rule of its own.

    Returns:
        A ``GraphModule`` sharing submodules with ``model``.

    Raises:
        TraceError: naming the failing line and suggesting ``leaf_modules``.
    """
    leaf_types = [x for x in (leaf_modules or ()) if isinstance(x, type)]
    leaf_insts = [x for x in (leaf_modules or ()) if isinstance(x, nn.Module)]
    through = None
    if example_inputs is not None:
        def through(m: nn.Module) -> bool:
            return has_rule is None or not has_rule(m)

    def tracer_for(inputs):
        if inputs is None:
            return _FlagTracer(leaf_types, leaf_insts, autowrap_functions)
        return _ValueTracer(leaf_types, leaf_insts, autowrap_functions, through=through, example_inputs=inputs)

    with _RestoreAttrs(model), _jit_tracing():
        graph = None
        invariant: set[int] = set()
        for _ in range(64):  # each round settles modules that branched on `training` or failed
            tracer = tracer_for(example_inputs)
            try:
                graph, branched = _trace_with_flags(model, tracer, concrete_args, invariant)
                if not branched:
                    break
                for m in branched:
                    inputs = None
                    if isinstance(tracer, _ValueTracer) and id(m) in tracer.module_inputs:
                        inputs = tracer._value_of(tracer.module_inputs[id(m)])
                        inputs = None if inputs is _UNKNOWN else inputs
                    if _mode_invariant(m, lambda: tracer_for(inputs)):
                        invariant.add(id(m))
                    else:
                        leaf_insts = leaf_insts + [m]
            except Exception as e:  # fx raises many types; re-raise one with a fix in the message
                opened = getattr(e, "gpd_through", None)
                if opened is not None:  # a timm no-trace module we opened: keep it closed
                    leaf_insts = leaf_insts + [opened]
                    continue
                where = _innermost_user_frame(e)
                raise TraceError(
                    f"torch.fx could not trace {type(model).__name__}: {type(e).__name__}: {e}{where}\n"
                    "Fix: pass the submodule class that contains this code as a leaf, e.g. "
                    "expand(model, ..., leaf_modules=[ThatModule]); it then becomes one node (a boundary "
                    "unless a rule for it is registered), or fix Python-level arguments with concrete_args."
                ) from e
            finally:
                # the example value of every node: proxies and tracer form reference cycles that
                # would keep them alive until the garbage collector runs (doubling peak memory)
                if isinstance(tracer, _ValueTracer):
                    tracer.values.clear()
                    tracer.module_inputs.clear()
        # Root built from a dict of the graph's targets: the user's model is never touched, and the
        # mode-flag submodule exists only in the graph module.
        targets: dict[str, Any] = {}
        for node in graph.nodes:
            if node.op in ("call_module", "get_attr") and node.target != MODE_ATTR:
                targets[node.target] = get_path(model, node.target)
        mode = nn.Module()
        mode.training = model.training
        targets[MODE_ATTR] = mode
        # The root itself cannot be a leaf: when its forward branches on `self.training` and the
        # two modes trace differently (GoogLeNet's aux logits), expand builds one graph per mode.
        root_dependent = bool(getattr(tracer, "root_branched", False)) and not _mode_invariant(
            model, lambda: tracer_for(example_inputs))
    gm = fx.GraphModule(targets, graph, model.__class__.__name__)
    gm.training = model.training
    gm.meta["gpd_leaf_instances"] = [id(m) for m in leaf_insts]
    gm.meta["gpd_root_mode_dependent"] = root_dependent
    return gm


def _innermost_user_frame(e: BaseException) -> str:
    import traceback

    frames = [f for f in traceback.extract_tb(e.__traceback__) if not _is_library_file(f.filename)]
    if not frames:
        return ""
    f = frames[-1]
    return f"\n  at {f.filename}:{f.lineno} in {f.name}: {f.line}"
