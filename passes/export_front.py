"""The ``torch.export`` front end: capture a student that ``torch.fx`` cannot trace.

``torch.export`` (non-strict, batch dimension dynamic where the model allows) gives an ATen
graph: one ``call_function`` per ATen op overload, parameters read by ``get_attr`` at the user's
fully qualified names, and the module each op came from in ``node.meta["nn_module_stack"]``.
This pass rewrites that graph into the vocabulary the rule registry already speaks, so that one
rule per op kind serves both front ends (``DESIGN.md §6``):

1. **In-place ops become out-of-place** (``add_`` -> ``add``): export already makes every later
   reader read the op's result, so no node's value changes. A mutation seen through another
   name (a view written in place) is refused.
2. **Module calls are lifted back.** The ops of one call of a leaf module that has a module rule
   (``Conv2d``, ``Linear``, ``BatchNorm2d``, ``LayerNorm``, ``Embedding``, activations ...) and
   that read one outside tensor and give one result become one ``call_module`` node of the
   user's own module. The teacher then holds the same module kinds as with ``torch.fx`` (CBR
   branches, fold and the parameter names follow), and the module's ``training`` flag is live.
3. **The remaining ATen ops are called through their Python bindings.** ``aten.view.default``
   becomes the method ``view``, ``aten.transpose.int`` becomes ``torch.transpose``: the bindings
   are generated from the same schemas, so the arguments carry over unchanged. Ops whose
   binding differs (``slice``, ``addmm``, ``sym_size``) have a rewrite of their own in
   :data:`_REWRITES`. An op with neither stays an ATen call: it runs at student width
   (a boundary when its input is widened, reported as such).
4. **Mode flags stay live.** ``dropout``'s ``train`` argument and a functional ``batch_norm``'s
   ``training`` argument, baked to ``False`` by exporting in eval mode, read the graph's mode
   flag again (as ``torch.fx`` capture does).

The graph keeps flat positional placeholders and a flat output; :func:`call_convention` returns
the pytree information that :func:`restore_call_convention` puts back on the built teacher, so
``dt(**kwargs)`` and ``ModelOutput`` results behave like the user's model.
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from gpd_fx.errors import TraceError

from .module_paths import get_path
from .registry import RULES
from .trace import MODE_ATTR
from .widen_emit import execute
from .widen_verify import TOL, close

__all__ = ["export_graph", "graph_signature", "restore_call_convention", "ExportInfo"]

_aten = torch.ops.aten


@dataclass
class ExportInfo:
    """What the export front end keeps beside the graph: the pytree calling convention and the
    ATen ops it left as they were (for the report)."""

    pytree_info: Any
    kept_aten: dict[str, int]
    # floating dtypes the graph computes in: a float64 model whose code casts to float32
    # (Llama's RMSNorm and rotary embedding) is only as exact as float32
    float_dtypes: set = field(default_factory=set)


def _dynamic_batch(inputs: tuple):
    from torch.export import Dim

    return tuple({0: Dim.AUTO} if isinstance(x, torch.Tensor) and x.dim() > 0 else None for x in inputs)


def _export(model: nn.Module, inputs: tuple):
    """``torch.export.export`` non-strict with a dynamic batch dimension; static shapes when the
    model specialises the batch (then the teacher runs at the example's batch size only)."""
    try:
        return torch.export.export(model, inputs, strict=False, dynamic_shapes=_dynamic_batch(inputs))
    except Exception:   # a constraint on the batch size: export it static (the error below if not)
        return torch.export.export(model, inputs, strict=False)


def export_graph(model: nn.Module, inputs: tuple, *, has_rule: Callable[[nn.Module], bool]
                 ) -> tuple[fx.GraphModule, ExportInfo]:
    """Capture ``model`` with ``torch.export`` and rewrite the graph for the rule registry.

    Args:
        model: the (working copy of the) student, in eval mode.
        inputs: positional example inputs.
        has_rule: True for a module instance that a module rule expands whole (it is lifted).

    Returns:
        The graph module (rooted on ``model``'s own submodules and tensors) and its
        :class:`ExportInfo`.

    Raises:
        TraceError: ``torch.export`` cannot capture the model (its reason is in the message).
    """
    try:
        ep = _export(model, inputs)
    except Exception as e:
        raise TraceError(f"torch.export could not capture {type(model).__name__}: "
                         f"{type(e).__name__}: {_first_lines(e)}") from e
    src = ep.module()
    graph = copy.deepcopy(src.graph)
    training = model.training
    info_tree = graph._codegen.pytree_info if isinstance(graph._codegen, fx.graph._PyTreeCodeGen) else None
    graph._codegen = fx.graph.CodeGen()
    _drop_checks(graph)
    _functionalize(graph)
    _lift_modules(graph, model, has_rule)
    rebound = _rebind(graph, training)
    _flatten_output(graph, info_tree)
    targets: dict[str, Any] = {}
    for node in graph.nodes:
        if node.op in ("call_module", "get_attr") and node.target != MODE_ATTR:
            targets[node.target] = _resolve(model, src, node.target)
    mode = nn.Module()
    mode.training = model.training
    targets[MODE_ATTR] = mode
    gm = fx.GraphModule(targets, graph, type(model).__name__)
    with torch.no_grad(), torch.random.fork_rng():
        kept, dtypes = _check_rebinding(gm, inputs, rebound)
    gm.graph.eliminate_dead_code()    # the ops of lifted calls and reverted rewrites nobody reads
    gm.recompile()
    gm.meta["gpd_leaf_instances"] = []
    gm.meta["gpd_root_mode_dependent"] = False
    return gm, ExportInfo(info_tree, kept, dtypes)


def _first_lines(e: BaseException, n: int = 6) -> str:
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    return "\n".join(lines[:n])


def _resolve(model: nn.Module, exported: nn.Module | None, target: str):
    """The user's own object at ``target`` (constants that export lifted live in the export)."""
    try:
        return get_path(model, target)
    except AttributeError:
        if exported is None:
            return None
        return get_path(exported, target)


# -- 1. checks and in-place ops -------------------------------------------------------------

_CHECKS = {_aten._assert_tensor_metadata.default, _aten._assert_scalar.default,
           _aten.sym_constrain_range_for_size.default}


def _drop_checks(graph: fx.Graph) -> None:
    """Replace export's own checks (``_guards_fn``, metadata asserts) by one
    :func:`input_shape_guard` per tensor input: the shapes the capture fixed, which the teacher
    graph keeps (a reshape to a captured sequence length would otherwise silently mix samples)."""
    for node in list(graph.nodes):
        if (node.op == "call_module" and node.target == "_guards_fn") or \
                (node.op == "call_function" and node.target in _CHECKS):
            graph.erase_node(node)     # their results are never read
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if not placeholders:
        return
    with graph.inserting_after(placeholders[-1]):
        for p in reversed(placeholders):
            val = p.meta.get("val")
            if not isinstance(val, torch.Tensor):
                continue
            shape = tuple(d if isinstance(d, int) else None for d in val.shape)
            graph.call_function(input_shape_guard, (p, shape, p.name))


@fx.node.has_side_effect
def input_shape_guard(x, shape: tuple, name: str) -> None:
    """The teacher's check that an input has the shape the ``torch.export`` capture fixed
    (``None``: a dimension the capture kept dynamic, the batch)."""
    if not isinstance(x, torch.Tensor):
        return
    if x.dim() != len(shape) or any(s is not None and x.shape[i] != s for i, s in enumerate(shape)):
        fixed = tuple("N" if s is None else s for s in shape)
        raise RuntimeError(
            f"gpd_fx: the teacher was captured by torch.export with input {name!r} of shape {fixed} "
            f"(only N may change), got {tuple(x.shape)}. Expand with example inputs of the shape you "
            "run the model on.")


def _functionalize(graph: fx.Graph) -> None:
    """``aten.X_.overload(a, ...)`` -> ``aten.X.overload(a, ...)``. Exact when nothing reads ``a``
    after the op (export's graphs read the result). An in-place op seen through another alias
    (a write into a slice whose base is read later) stays in place when that base is a tensor
    the graph creates from sizes alone (Swin's attention-mask image): it is never widened, the
    teacher runs the same ops on it, and the lockstep verification checks every later reader.
    Any other such write cannot be expressed and is refused."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in list(graph.nodes):
        if not _mutates(node):
            continue
        target = node.args[0]
        # export already points later readers of the mutated tensor at the in-place op's result;
        # what the rewrite cannot express is a mutation seen through another name: a later
        # reader of any tensor that shares memory with the mutated one (its view base, other
        # views of that base, or the old node itself)
        if isinstance(target, fx.Node) and _read_after(_aliases(target), node, order):
            if _created(_base(target)):
                continue
            raise TraceError(f"the exported graph mutates a view in place at {node.format_node()}; "
                             "the export front end cannot express it. Fix: use the out-of-place op in the "
                             "model (e.g. x = x + y instead of x += y on a slice), or frontend='fx'")
        name = node.target.__name__.split(".")[0]
        if not name.endswith("_"):
            continue     # out= variants and copy_-like ops: kept as ATen calls
        packet = getattr(_aten, name[:-1], None)
        pure = getattr(packet, node.target._overloadname, None) if packet is not None else None
        if pure is not None:
            node.target = pure


def _mutates(node: fx.Node) -> bool:
    """An ATen call that writes its first argument."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return False
    args = node.target._schema.arguments
    return bool(args) and args[0].alias_info is not None and args[0].alias_info.is_write


# ops that create a tensor from sizes and constants only (no input values, no input shapes)
_CREATED = {"zeros", "ones", "empty", "full", "new_zeros", "new_ones", "new_empty", "new_full", "arange",
            "scalar_tensor", "lift_fresh_copy"}


def _created(node: fx.Node) -> bool:
    return node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload) \
        and node.target.__name__.split(".")[0] in _CREATED


_VIEW_OPS = {"view", "reshape", "transpose", "permute", "select", "slice", "expand", "unsqueeze",
             "squeeze", "t", "as_strided", "unflatten", "flatten", "narrow", "split", "chunk", "unbind",
             "diagonal", "alias", "detach"}


def _base(node: fx.Node) -> fx.Node:
    """The tensor ``node`` is a (chain of) view(s) of."""
    while _is_view(node) and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def _aliases(node: fx.Node) -> set[fx.Node]:
    """``node``, the base it is a view of, and every view derived from that base."""
    base = _base(node)
    found, todo = {base}, [base]
    while todo:
        for user in todo.pop().users:
            if _is_view(user) and user not in found and user.args and user.args[0] in found:
                found.add(user)
                todo.append(user)
    return found


def _read_after(aliases: set[fx.Node], node: fx.Node, order: dict[fx.Node, int]) -> bool:
    return any(u is not node and order[u] > order[node] and u not in aliases
               for a in aliases for u in a.users)


def _is_view(node: fx.Node) -> bool:
    t = node.target
    if node.op == "call_function" and isinstance(t, torch._ops.OpOverload):
        return t.__name__.split(".")[0] in _VIEW_OPS
    return node.op == "call_function" and t is operator.getitem


# -- 2. module calls ------------------------------------------------------------------------

def _innermost(node: fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    return list(stack.keys())[-1]


def _lift_modules(graph: fx.Graph, model: nn.Module, has_rule: Callable[[nn.Module], bool]) -> None:
    """Replace each call of a leaf module with a module rule by one ``call_module`` node."""
    groups: dict[str, list[fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "call_function":
            key = _innermost(node)
            if key is not None:
                groups.setdefault(key, []).append(node)
    for key, nodes in groups.items():
        path = nodes[0].meta["nn_module_stack"][key][0]
        try:
            module = model.get_submodule(path) if path else model
        except AttributeError:
            continue
        if not path or any(True for _ in module.children()) or not has_rule(module):
            continue
        own = {id(t) for t in module.parameters(recurse=False)} | {id(t) for t in module.buffers(recurse=False)}
        call = _single_call(nodes, lambda target: id(_resolve(model, None, target)) in own)
        if call is None:
            continue
        x, out = call
        with graph.inserting_before(nodes[0]):
            new = graph.call_module(path, (x,))
        new.meta = dict(out.meta)
        out.replace_all_uses_with(new)
        for n in reversed(nodes):
            if not n.users:
                graph.erase_node(n)


def _single_call(nodes: list[fx.Node], owned: Callable[[str], bool]) -> tuple[fx.Node, fx.Node] | None:
    """``(input, output)`` when ``nodes`` read exactly one tensor from outside besides the
    module's own tensors (``get_attr`` targets for which ``owned`` holds: compared by identity,
    since export names a tied parameter once, after any of its owners) and exactly one of them
    is read outside."""
    inside = set(nodes)
    outside_inputs = []
    for n in nodes:
        for a in n.all_input_nodes:
            if a in inside:
                continue
            if a.op == "get_attr" and owned(a.target):
                continue
            if a not in outside_inputs:
                outside_inputs.append(a)
    outs = [n for n in nodes if any(u not in inside for u in n.users)]
    if len(outside_inputs) != 1 or len(outs) != 1:
        return None
    # the ops must be consecutive: a module call is one contiguous stretch of the graph
    order = list(nodes[0].graph.nodes)
    first, last = order.index(nodes[0]), order.index(nodes[-1])
    if last - first + 1 != len(nodes):
        return None
    return outside_inputs[0], outs[0]


# -- 3. ATen ops through their Python bindings ------------------------------------------------

def _dim(node: fx.Node, dim) -> int:
    """``dim`` made non-negative from the rank export recorded for the op's input."""
    if not isinstance(dim, int):
        raise _Keep
    if dim >= 0:
        return dim
    val = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
    if val is None or not hasattr(val, "dim"):
        raise _Keep
    return dim + val.dim()


def _slice(graph: fx.Graph, node: fx.Node) -> None:
    """``aten.slice.Tensor(x, dim, start, end, step)`` -> ``x[:, ..., start:end:step]``."""
    x, dim, start, end, step = (list(node.args) + [0, None, None, 1][len(node.args) - 1:])[:5]
    idx = (slice(None),) * _dim(node, dim) + (slice(start, end, step),)
    node.target, node.args, node.kwargs = operator.getitem, (x, idx), {}


def _select(graph: fx.Graph, node: fx.Node) -> None:
    """``aten.select.int(x, dim, i)`` -> ``x[:, ..., i]``."""
    x, dim, i = node.args
    node.target, node.args, node.kwargs = operator.getitem, (x, (slice(None),) * _dim(node, dim) + (i,)), {}


def _addmm(graph: fx.Graph, node: fx.Node) -> None:
    """``addmm(b, x, W)`` -> ``x @ W + b`` (a linear layer with a stored (in, out) weight)."""
    b, x, w = node.args[:3]
    if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
        raise _Keep
    with graph.inserting_before(node):
        mm = graph.call_function(torch.matmul, (x, w))
        mm.meta = dict(node.meta)
    node.target, node.args, node.kwargs = torch.add, (mm, b), {}


def _to(graph: fx.Graph, node: fx.Node) -> None:
    """``aten.to.dtype_layout(x, dtype=, layout=, device=, ...)`` -> ``x.to(device, dtype, ...)``
    (the method has no ``layout`` argument: only the strided layout is rewritten)."""
    k = dict(node.kwargs)
    if k.pop("layout", torch.strided) not in (None, torch.strided) or k.pop("pin_memory", None):
        raise _Keep
    node.op, node.target, node.kwargs = "call_method", "to", k


def _batch_norm(graph: fx.Graph, node: fx.Node) -> None:
    """``aten.batch_norm(x, w, b, mean, var, training, momentum, eps, cudnn)`` ->
    ``F.batch_norm(x, mean, var, w, b, training, momentum, eps)`` (timm's BatchNormAct2d calls
    the functional form; its module has children, so it is not lifted)."""
    x, w, b, mean, var, training, momentum, eps = node.args[:8]
    node.target, node.args, node.kwargs = F.batch_norm, (x, mean, var, w, b, training, momentum, eps), {}


def _method(name: str):
    def rewrite(graph: fx.Graph, node: fx.Node) -> None:
        node.op, node.target = "call_method", name
    return rewrite


def _function(fn):
    def rewrite(graph: fx.Graph, node: fx.Node) -> None:
        node.target = fn
    return rewrite


class _Keep(Exception):
    """The op stays an ATen call."""


_REWRITES: dict[Any, Callable[[fx.Graph, fx.Node], None]] = {
    _aten.slice.Tensor: _slice,
    _aten.select.int: _select,
    _aten.to.dtype_layout: _to,
    _aten.batch_norm.default: _batch_norm,
    _aten.addmm.default: _addmm,
    _aten.sym_size.int: _method("size"),
    _aten.mm.default: _function(torch.matmul),
    _aten.contiguous.default: _method("contiguous"),
}


def _binding(op: torch._ops.OpOverload) -> tuple[str, Any] | None:
    """``("call_method", name)`` or ``("call_function", fn)`` with a registered rule for ``op``."""
    name = op.__name__.split(".")[0]
    for ns in (torch, torch._C._nn, F):
        fn = getattr(ns, name, None)
        if fn is not None and fn in RULES.functions:
            return "call_function", fn
    if name in RULES.methods:
        return "call_method", name
    return None


@dataclass
class _Original:
    op: str
    target: Any
    args: tuple
    kwargs: dict


def _rebind(graph: fx.Graph, training: bool) -> dict[fx.Node, _Original]:
    """Route every ATen op to the registered binding of the same op; returns the rebound nodes
    with what they were (:func:`_check_rebinding` reverts any that does not compute the same)."""
    rebound: dict[fx.Node, _Original] = {}
    mode = None
    for node in list(graph.nodes):
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        op = node.target
        if _mutates(node):
            continue     # left in place on purpose (_functionalize): run as the ATen op itself
        if op in (_aten.dropout.default, _aten.batch_norm.default):
            mode = _live_mode(graph, node, mode, training)
        original = _Original(node.op, op, node.args, dict(node.kwargs))
        try:
            if op in _REWRITES:
                _REWRITES[op](graph, node)
                rebound[node] = original
                continue
        except _Keep:
            node.op, node.target, node.args, node.kwargs = original.op, op, original.args, original.kwargs
            continue
        found = _binding(op)
        if found is not None:
            node.op, node.target = found
            rebound[node] = original
    return rebound


def _check_rebinding(gm: fx.GraphModule, inputs: tuple, rebound: dict[fx.Node, _Original]
                     ) -> tuple[dict[str, int], set]:
    """Run the graph once on the example inputs; each rebound node must give what its ATen op
    gives on the same values (an overload whose binding differs, such as ``to.dtype_layout``,
    goes back to the ATen call). Returns the ATen ops left as ATen calls, counted, and the
    floating dtypes of the values computed."""
    env: dict[fx.Node, Any] = {}
    dtypes: set = set()
    pending = list(inputs)
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            env[node] = pending.pop(0) if pending else (node.args[0] if node.args else None)
            continue
        if node.op == "output":
            break
        if node.op == "get_attr":
            env[node] = get_path(gm, node.target)
            continue
        was = rebound.get(node)
        if was is None:
            value = _run(node.op, node.target, node.args, node.kwargs, env, modules)
        else:
            # both on the same random stream: a train-mode capture has random ops (dropout)
            torch.manual_seed(len(env))
            ref = _run(was.op, was.target, was.args, was.kwargs, env, modules)
            try:
                torch.manual_seed(len(env))
                value = _run(node.op, node.target, node.args, node.kwargs, env, modules)
                same = _same(value, ref)
            except Exception:   # the binding does not take this overload's arguments
                same = False
            if not same:
                node.op, node.target, node.args, node.kwargs = was.op, was.target, was.args, was.kwargs
                del rebound[node]
                value = ref
        env[node] = value
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            dtypes.add(value.dtype)
    kept: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload) and node.users:
            kept[str(node.target)] = kept.get(str(node.target), 0) + 1
    return kept, dtypes


def _run(op, target, args, kwargs, env, modules):
    """One node on the values in ``env`` (the builder's own executor)."""
    return execute(op, target, fx.node.map_arg(args, env.__getitem__), fx.node.map_arg(kwargs, env.__getitem__),
                   modules.__getitem__)


def _same(value, ref) -> bool:
    """Equal structure; tensors of equal shape and dtype that agree to the dtype's rounding (a
    rewrite into two ops, ``addmm`` -> ``matmul`` + ``add``, rounds differently)."""
    if isinstance(ref, torch.Tensor):
        if not isinstance(value, torch.Tensor) or value.shape != ref.shape or value.dtype != ref.dtype:
            return False
        if not ref.is_floating_point():
            return bool(torch.equal(value, ref))
        return close(value, ref, TOL.get(ref.dtype, 1e-3))[0]
    if isinstance(ref, (tuple, list)):
        return isinstance(value, (tuple, list)) and len(value) == len(ref) and \
            all(_same(v, r) for v, r in zip(value, ref))
    return value == ref


def _live_mode(graph: fx.Graph, node: fx.Node, mode: fx.Node | None, training: bool) -> fx.Node:
    """Make the baked mode flag (``training`` at capture) of a functional dropout / batch norm
    read the graph's mode at run time."""
    pos = 2 if node.target is _aten.dropout.default else 5
    if len(node.args) <= pos or node.args[pos] is not training:
        return mode
    if node.target is _aten.batch_norm.default and (node.args[3] is None or node.args[4] is None):
        return mode      # no running statistics: batch statistics in both modes
    if mode is None:
        first = next(n for n in graph.nodes if n.op != "placeholder")
        with graph.inserting_before(first):
            root = graph.get_attr(MODE_ATTR)
            mode = graph.call_function(getattr, (root, "training"))
    args = list(node.args)
    args[pos] = mode
    node.args = tuple(args)
    return mode


# -- 4. the calling convention ----------------------------------------------------------------

def graph_signature(gm: fx.GraphModule) -> list[tuple[str, str]]:
    """The ops of a captured graph in order: two captures compute the same thing when their
    signatures agree (the mode flags they differ in are live)."""
    return [(n.op, str(n.target)) for n in gm.graph.nodes
            if n.op in ("call_function", "call_method", "call_module")]


def _flatten_output(graph: fx.Graph, info) -> None:
    """A single-tensor output is returned as itself (not as a 1-tuple)."""
    out = next(n for n in graph.nodes if n.op == "output")
    leaves = out.args[0]
    if info is not None and info.out_spec is not None and info.out_spec.is_leaf() \
            and isinstance(leaves, (tuple, list)) and len(leaves) == 1:
        out.args = (leaves[0],)


def restore_call_convention(gm: fx.GraphModule, info: ExportInfo) -> fx.GraphModule:
    """Give the built teacher the student's calling convention (keyword arguments, nested or
    ``ModelOutput`` results) from the exported program's pytree specs."""
    tree = info.pytree_info
    if tree is None or (tree.out_spec is not None and tree.out_spec.is_leaf()
                        and _only_positional(tree)):
        return gm
    out = next(n for n in gm.graph.nodes if n.op == "output")
    if tree.out_spec is not None and tree.out_spec.is_leaf():
        out.args = ((out.args[0],),)
    gm.graph._codegen = fx.graph._PyTreeCodeGen(tree)
    gm.recompile()
    return gm


def _only_positional(tree) -> bool:
    try:
        args_spec, kwargs_spec = tree.in_spec.children()
    except (AttributeError, ValueError):
        return False
    return kwargs_spec.num_leaves == 0 and all(c.is_leaf() for c in args_spec.children())
