"""Inverse Reparameterization: build the wider teacher graph node by node, verifying as it goes.

The driver walks the traced student graph once. For every node it looks up the rule for the op,
lets the rule emit the teacher version into a new graph, runs that teacher node on the probe
input (the student node runs beside it) and checks that the teacher value equals the student
value in the node's layout. A rule that cannot handle an instance raises ``CannotExpand``; an
op without a rule, or a rule whose result does not verify, becomes a *boundary*: its expanded
inputs are narrowed back to student width, it runs unchanged, and its output is kept.

Running both graphs in lockstep is what makes the whole pass self-verifying: the first node
whose values diverge is known by name, and shape arguments computed inside the model
(``x.shape[0]``, ``C // heads``) are checked against their real teacher values.
"""

from __future__ import annotations

import copy
import inspect
import math
import operator
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.fx.node import map_aggregate
from torch.utils.flop_counter import FlopCounterMode

from gpd_fx.errors import GPDError, UnsupportedOpError, VerificationError

from .layout import Layout, gpd_narrow, gpd_repeat, gpd_widen, interleaved, permutation_between
from .registry import CannotExpand, RuleEntry, lookup
from .student_map import ParamSource
from .weights import widen_per_channel

__all__ = ["WidenResult", "build_teacher", "RuleContext", "Boundary"]


@dataclass
class Boundary:
    node: str
    op: str
    reason: str


@dataclass
class WidenResult:
    graph_module: fx.GraphModule
    sources: list[ParamSource]
    boundaries: list[Boundary]
    fallbacks: list[Boundary]
    expanded_flops: float
    total_flops: float
    max_rel_error: float
    permutations: int
    runtime_widenings: int
    coupling: Any = None


@dataclass(eq=False)
class WidenedWeight:
    """``param_state`` of a parameter that the weight rule widened in place (``F.linear(x, w)``):
    the layouts of its output and input channel dims (``None``: that dim kept)."""
    out: Layout | None
    inp: Layout | None

    def same(self, other: "WidenedWeight") -> bool:
        def eq(a, b):
            return a is None and b is None or (a is not None and b is not None and a.dim == b.dim
                                               and a.same_map(b))
        return eq(self.out, other.out) and eq(self.inp, other.inp)


@dataclass
class _Entry:
    dt: Any            # teacher node (or constant / nested structure of them)
    layout: Any        # Layout | None | nested tuple/list of those


def describe(node: fx.Node) -> str:
    from .trace import AutogradApply

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


def _exec(op: str, target: Any, args, kwargs, modules: Callable[[str], Any]):
    if op == "call_function":
        return target(*args, **kwargs)
    if op == "call_method":
        self_obj, *rest = args
        return getattr(self_obj, target)(*rest, **kwargs)
    if op == "call_module":
        return modules(target)(*args, **kwargs)
    raise ValueError(op)


def _get_path(root: nn.Module, target: str):
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _set_path(root: nn.Module, target: str, value) -> None:
    *parents, name = target.split(".")
    obj = root
    for p in parents:
        if not hasattr(obj, p):
            obj.add_module(p, nn.Module())
        obj = getattr(obj, p)
    if isinstance(value, nn.Module):
        if name in obj._parameters:
            del obj._parameters[name]
        if name in obj._buffers:
            del obj._buffers[name]
        obj.add_module(name, value)
    elif isinstance(value, nn.Parameter):
        if name in obj._modules:
            del obj._modules[name]
        obj.register_parameter(name, value)
    elif isinstance(value, Tensor):
        obj.register_buffer(name, value)
    else:
        setattr(obj, name, value)


def _close(t: Tensor, ref: Tensor, tol: float, floor: float = 0.0) -> tuple[bool, float]:
    """``max|t - ref| <= tol * max(max|ref|, floor)``; non-finite values must sit at the same places.

    ``floor`` is the magnitude of the op's inputs: an output that is exactly 0 in exact
    arithmetic (the mean of centred data) carries rounding of the inputs' size, not its own.
    """
    if t.shape != ref.shape or t.dtype != ref.dtype:
        return False, float("inf")
    if not t.is_floating_point() and not t.is_complex():
        return bool(torch.equal(t, ref)), 0.0
    if t.numel() == 0:
        return True, 0.0
    err = float((t - ref).abs().max())
    scale = max(float(ref.abs().max()), floor)
    if math.isfinite(err) and math.isfinite(scale):
        rel = err / scale if scale > 0 else err
        return rel <= tol, rel
    # NaN/inf in the student itself (masked attention, log of 0) must appear in the same places
    fin = torch.isfinite(ref)
    if not torch.equal(fin, torch.isfinite(t)) or not torch.equal(torch.isnan(ref), torch.isnan(t)):
        return False, float("inf")
    if not fin.any():
        return True, 0.0
    err = float((t[fin] - ref[fin]).abs().max())
    scale = max(float(ref[fin].abs().max()), floor)
    rel = err / scale if scale > 0 else err
    return rel <= tol, rel


class RuleContext:
    """What a rule sees: the student node's values and layouts, and how to emit teacher nodes."""

    def __init__(self, builder: "Builder", node: fx.Node):
        self.b = builder
        self.node = node
        self.r = builder.ratio

    # --- reading the student side ------------------------------------------------------
    def module(self, node: fx.Node | None = None) -> nn.Module:
        return self.b.smods[(node or self.node).target]

    def sval(self, arg):
        return map_aggregate(arg, lambda a: self.b.svals[a] if isinstance(a, fx.Node) else a)

    @property
    def out(self):
        return self.b.svals[self.node]

    def layout(self, arg):
        if isinstance(arg, fx.Node):
            return self.b.env[arg].layout
        if isinstance(arg, (list, tuple)):
            return type(arg)(self.layout(a) for a in arg) if not hasattr(arg, "_fields") else tuple(self.layout(a) for a in arg)
        return None

    def tval(self, dt_arg):
        return map_aggregate(dt_arg, lambda a: self.b.tvals[a] if isinstance(a, fx.Node) else a)

    def kept_demand(self) -> bool:
        return self.b.kept_demand.get(self.node, False)

    @property
    def noise(self) -> float:
        return self.b.noise

    @property
    def generator(self) -> torch.Generator:
        return self.b.generator

    # --- teacher side ------------------------------------------------------------------
    def dt(self, arg):
        """The teacher counterpart of a student argument, in whatever layout it has."""
        return self.b.dt_of(arg)

    def emit(self, op: str, target, args=(), kwargs=None) -> fx.Node:
        return self.b.emit(op, target, tuple(args), dict(kwargs or {}))

    def student_scalar(self, arg):
        """Teacher counterpart of a graph value used as a *value* (not a size).

        Python numbers computed from a widened shape (``(C // heads) ** -0.5``) differ in the
        teacher; where such a number meets a tensor it must keep the student's value.
        """
        return self.b.student_scalar(arg)

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
            target = self.b.ensure_module(n.target, self.module())
        return self.emit(n.op, target, args, kwargs)

    def add_module(self, target: str, module: nn.Module) -> str:
        _set_path(self.b.root, target, module)
        self.b.added_modules[target] = module
        return target

    def add_source(self, student_name: str, module: str, attr: str, **kw) -> None:
        self.b.sources.append(ParamSource(student_name, module, attr, node=self.node.name, **kw))

    def narrow(self, arg) -> Any:
        """Teacher counterpart of ``arg`` at student width (mean over copies)."""
        return self.b.narrow(arg)

    def to_layout(self, arg, layout: Layout) -> fx.Node:
        """Teacher counterpart of ``arg`` converted to ``layout`` (permute or widen)."""
        return self.b.to_layout(arg, layout)

    def interleave(self, arg) -> tuple[fx.Node, Layout]:
        """Teacher counterpart of an expanded ``arg`` in the interleaved layout."""
        lay = self.layout(arg)
        if lay.is_interleaved:
            return self.dt(arg), lay
        target = interleaved(lay.width, self.r, lay.dim)
        return self.to_layout(arg, target), target

    def index_buffer(self, index: Tensor) -> fx.Node:
        return self.b.index_node(index)

    def cut(self, reason: str):
        raise CannotExpand(reason)


class Builder:
    def __init__(self, gm: fx.GraphModule, ratio: int, *, noise: float, seed: int, strict: bool,
                 tol: float, extra_rules=None, progress: bool = False):
        self.sgm = gm
        self.ratio = ratio
        self.noise = noise
        self.strict = strict
        self.tol = tol
        self.extra = extra_rules
        self.generator = np.random.default_rng(seed)
        self.smods = dict(gm.named_modules())
        self.graph = fx.Graph()
        self.root = nn.Module()
        self.env: dict[fx.Node, _Entry] = {}
        self.svals: dict[fx.Node, Any] = {}
        self.tvals: dict[fx.Node, Any] = {}
        self.sources: list[ParamSource] = []
        self.boundaries: list[Boundary] = []
        self.fallbacks: list[Boundary] = []
        self.added_modules: dict[str, nn.Module] = {}
        self.param_state: dict[str, Any] = {}   # get_attr target -> "kept" | Layout | WidenedWeight
        self.index_nodes: dict[int, fx.Node] = {}
        self.index_count = 0
        self.permutations = 0
        self.runtime_widenings = 0
        self.expanded_flops = 0.0
        self.total_flops = 0.0
        self.kept_demand: dict[fx.Node, bool] = {}
        # node -> largest |value| on any path into it (see _check)
        self.magnitude: dict[fx.Node, float] = {}
        # module target -> (layouts of its arguments, output layout) from the call that widened it
        self.module_io: dict[str, tuple[list, Any]] = {}
        self._emitted: list[fx.Node] | None = None
        # student nodes visited whose values are still held (see _release)
        self._held: dict[fx.Node, None] = {}
        self._fresh: list[fx.Node] = []   # teacher nodes emitted since the last _release

    # --- emission ------------------------------------------------------------------------
    def emit(self, op, target, args, kwargs) -> fx.Node:
        node = self.graph.create_node(op, target, args, kwargs)
        self._fresh.append(node)
        if self._emitted is not None:
            self._emitted.append(node)
        if op == "get_attr":
            self.tvals[node] = _get_path(self.root, target)
        else:
            a = map_aggregate(args, lambda x: self.tvals[x] if isinstance(x, fx.Node) else x)
            k = map_aggregate(kwargs, lambda x: self.tvals[x] if isinstance(x, fx.Node) else x)
            self.tvals[node] = _exec(op, target, a, k, lambda t: _get_path(self.root, t))
        return node

    def ensure_module(self, target: str, module: nn.Module, student_target: str | None = None) -> str:
        """Make sure the teacher has (a student-size copy of) ``module`` at ``target``."""
        if target not in self.added_modules:
            _set_path(self.root, target, copy.deepcopy(module))
            self.added_modules[target] = _get_path(self.root, target)
            self._identity_sources(target, module, student_target)
        return target

    def _identity_sources(self, target: str, module: nn.Module, student_target: str | None = None) -> None:
        have = {s.student_name for s in self.sources}
        for pname, _ in module.named_parameters():
            name = f"{student_target or target}.{pname}"
            if name in have:   # a student-width copy of a module that is also widened elsewhere
                continue
            mod, _, attr = f"{target}.{pname}".rpartition(".")
            self.sources.append(ParamSource(name, mod, attr, node="(copied)"))

    def index_node(self, index: Tensor) -> fx.Node:
        key = id(index)
        if key not in self.index_nodes:
            name = f"_gpd_index.i{self.index_count}"
            self.index_count += 1
            holder = self.root._modules.get("_gpd_index")
            if holder is None:
                holder = nn.Module()
                self.root.add_module("_gpd_index", holder)
            holder.register_buffer(name.split(".")[1], index, persistent=False)
            self.index_nodes[key] = self.graph.create_node("get_attr", name)
            self.tvals[self.index_nodes[key]] = index
        return self.index_nodes[key]

    # --- mapping student args -------------------------------------------------------------
    def dt_of(self, arg):
        def one(a):
            if not isinstance(a, fx.Node):
                return a
            e = self.env[a]
            if e.dt is None and a.op == "get_attr":
                return self._param_kept(a)
            return e.dt
        return map_aggregate(arg, one)

    def _param_kept(self, node: fx.Node) -> fx.Node:
        state = self.param_state.get(node.target)
        if isinstance(state, Layout):
            # Already widened for another consumer: this one needs student width.
            return self._narrow_node(self._param_widened(node, state), state)
        if isinstance(state, WidenedWeight):
            # Widened by the weight rule for another consumer (csatv2 applies one DCT matrix
            # twice): the student weight is exact from the teacher's, since the copies of an
            # input channel sum to it (the noise is zero-sum) and the copies of an output
            # channel are then equal. Read this way, the one parameter stays shared.
            x = self.emit("get_attr", node.target, (), {})
            if state.inp is not None:
                x = self.emit("call_function", operator.mul,
                              (self._narrow_node(x, state.inp), float(self.ratio)), {})
            if state.out is not None:
                x = self._narrow_node(x, state.out)
            return x
        if state is None:
            self._copy_attr(node.target)
            self.param_state[node.target] = "kept"
        return self.emit("get_attr", node.target, (), {})

    def _copy_attr(self, target: str) -> None:
        val = _get_path(self.sgm, target)
        if isinstance(val, nn.Parameter):
            _set_path(self.root, target, nn.Parameter(val.detach().clone(), val.requires_grad))
            mod, _, attr = target.rpartition(".")
            self.sources.append(ParamSource(target, mod, attr, node="(copied)"))
        elif isinstance(val, Tensor):
            _set_path(self.root, target, val.detach().clone())
        else:
            _set_path(self.root, target, copy.deepcopy(val))

    def _param_widened(self, node: fx.Node, layout: Layout) -> fx.Node:
        val = _get_path(self.sgm, node.target)
        state = self.param_state.get(node.target)
        if state is None:
            wide = widen_per_channel(val.detach(), layout.dim, layout.index)
            if isinstance(val, nn.Parameter):
                _set_path(self.root, node.target, nn.Parameter(wide, val.requires_grad))
                mod, _, attr = node.target.rpartition(".")
                self.sources.append(ParamSource(node.target, mod, attr, out=(layout.dim, layout.first_copy()),
                                                node=node.name))
            else:
                _set_path(self.root, node.target, wide)
            self.param_state[node.target] = layout
        return self.emit("get_attr", node.target, (), {})

    def to_layout(self, arg: fx.Node, layout: Layout) -> fx.Node:
        """Teacher node for ``arg`` in ``layout`` (whose ``dim`` counts in ``arg``'s own dims)."""
        cur = self.env[arg].layout if isinstance(arg, fx.Node) else None
        if cur is None:
            if isinstance(arg, fx.Node) and arg.op == "get_attr" and self.env[arg].dt is None:
                st = self.param_state.get(arg.target)
                if st is None or (isinstance(st, Layout) and st.dim == layout.dim and st.same_map(layout)):
                    return self._param_widened(arg, layout)
            x = self.dt_of(arg)
            self.runtime_widenings += 1
            if layout.is_interleaved:
                return self.emit("call_function", gpd_repeat, (x, layout.dim, self.ratio), {})
            return self.emit("call_function", gpd_widen, (x, layout.dim, self.index_node(layout.index)), {})
        if cur.dim != layout.dim:
            raise CannotExpand(f"operand expanded on dim {cur.dim}, needed on dim {layout.dim}")
        if cur.index.numel() != layout.index.numel():
            raise CannotExpand(f"operand has {cur.width} channels, the layout needs {layout.width}")
        if cur.same_map(layout):
            return self.dt_of(arg)
        self.permutations += 1
        perm = permutation_between(cur, layout)
        return self.emit("call_function", gpd_widen, (self.dt_of(arg), cur.dim, self.index_node(perm)), {})

    def student_scalar(self, a):
        if isinstance(a, fx.Node):
            sv = self.svals.get(a)
            if not isinstance(sv, Tensor) and isinstance(sv, (int, float, bool)):
                d = self.dt_of(a)
                tv = self.tvals[d] if isinstance(d, fx.Node) else d
                if tv != sv:
                    return sv
        return self.dt_of(a)

    def narrow(self, arg):
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
                g = self.emit("call_function", operator.getitem, (self.dt_of(a), i), {})
                items.append(self._narrow_node(g, sub) if isinstance(sub, Layout) else g)
            return type(self.svals[a])(items) if isinstance(self.svals[a], (tuple, list)) and not hasattr(self.svals[a], "_fields") else tuple(items)
        return map_aggregate(arg, one)

    def _narrow_node(self, x: fx.Node, lay: Layout) -> fx.Node:
        if not lay.is_interleaved:
            self.permutations += 1
            perm = permutation_between(lay, interleaved(lay.width, self.ratio, lay.dim))
            x = self.emit("call_function", gpd_widen, (x, lay.dim, self.index_node(perm)), {})
        return self.emit("call_function", gpd_narrow, (x, lay.dim, self.ratio), {})

    # --- the walk --------------------------------------------------------------------------
    def run(self, example_inputs: tuple, progress: bool = False) -> WidenResult:
        self._compute_kept_demand()
        inputs = list(example_inputs)
        nodes = list(self.sgm.graph.nodes)
        iterator = nodes
        if progress:
            from tqdm.auto import tqdm
            iterator = tqdm(nodes, desc="expand", unit="node", leave=False)
        max_rel = 0.0
        for node in iterator:
            if node.op == "placeholder":
                val = inputs.pop(0) if inputs else _default_of(node)
                self.svals[node] = val
                dt = self.graph.placeholder(node.name, type_expr=node.type)
                dt.meta = dict(node.meta)
                if len(node.args):
                    dt.args = node.args
                self.tvals[dt] = val
                self.env[node] = _Entry(dt, None)
                self.magnitude[node] = _max_abs(val)
                continue
            if node.op == "get_attr":
                self.svals[node] = _get_path(self.sgm, node.target)
                self.env[node] = _Entry(None, None)
                self.magnitude[node] = _max_abs(self.svals[node])
                continue
            if node.op == "output":
                out_dt = self.narrow(node.args[0])
                self.graph.output(out_dt)
                outs = map_aggregate(node.args[0], lambda a: self.svals[a] if isinstance(a, fx.Node) else a)
                touts = map_aggregate(out_dt, lambda a: self.tvals[a] if isinstance(a, fx.Node) else a)
                max_rel = max(max_rel, _compare_tree(touts, outs, node, self.tol))
                continue
            self._run_student(node)
            self._visit(node)
            self._release(node)
        gm = fx.GraphModule(self.root, self.graph, class_name="DynamicTeacherGraph")
        return WidenResult(gm, self.sources, self.boundaries, self.fallbacks, self.expanded_flops,
                           self.total_flops, max_rel, self.permutations, self.runtime_widenings,
                           self._coupling_graph())

    def _coupling_graph(self):
        """Expanded tensors whose channel maps are tied (an op passes its input's map through,
        or combines inputs that share one): the connected components are the coupling groups."""
        import networkx as nx

        g = nx.Graph()
        for node, entry in self.env.items():
            if not isinstance(entry.layout, Layout) or node.op in ("placeholder", "get_attr"):
                continue
            g.add_node(node.name, dim=entry.layout.dim, width=entry.layout.width)
            for a in node.all_input_nodes:
                lay = self.env[a].layout if a in self.env else None
                if isinstance(lay, Layout) and lay.index is entry.layout.index:
                    g.add_edge(node.name, a.name)
        return g

    def _run_student(self, node: fx.Node) -> None:
        args = map_aggregate(node.args, lambda a: self.svals[a] if isinstance(a, fx.Node) else a)
        kwargs = map_aggregate(node.kwargs, lambda a: self.svals[a] if isinstance(a, fx.Node) else a)
        counter = FlopCounterMode(display=False)
        with counter:
            torch.default_generator.manual_seed(len(self.svals))
            self.svals[node] = _exec(node.op, node.target, args, kwargs, lambda t: self.smods[t])
        flops = float(counter.get_total_flops())
        node.meta.setdefault("gpd", {})["flops"] = flops
        self.total_flops += flops

    def _visit(self, node: fx.Node) -> None:
        entry = lookup(node, self.smods, self.extra)
        reason = None
        if node.op == "call_module" and node.target in self.module_io:
            if self._reuse_module(node):
                return
            reason = "a second call of a widened module with an incompatible layout"
        elif entry is None and _is_tuple_type(node):
            entry = RuleEntry(_pack_tuple, True)
        elif entry is None and _inlinable(node) and self._inline(node):
            return
        elif entry is None:
            reason = "no rule for this op"
        if reason is None:
            snapshot = (len(self.sources), dict(self.param_state), dict(self.added_modules),
                        self.permutations, self.runtime_widenings)
            self._emitted = []
            counted = False
            try:
                torch.default_generator.manual_seed(len(self.svals) - 1)
                dt, lay = entry.fn(RuleContext(self, node), node)
                if _any_layout(lay) or self._inputs_expanded(node):
                    self.expanded_flops += node.meta["gpd"]["flops"]
                    counted = True
                ok, msg = self._check(node, dt, lay)
                if ok:
                    self.env[node] = _Entry(dt, lay)
                    if node.op == "call_module" and node.target in self.added_modules \
                            and node.target not in snapshot[2] and _widened(self.smods[node.target],
                                                                             self.added_modules[node.target]):
                        self.module_io[node.target] = ([self.env[a].layout if isinstance(a, fx.Node) else None
                                                        for a in node.args], lay)
                    self._emitted = None
                    return
                reason = f"rule result does not match the student ({msg})"
                if self.strict:
                    raise VerificationError(
                        f"While expanding {node.format_node()} ({describe(node)}): the teacher value "
                        f"differs from the student value: {msg}. This is a bug in the rule for this op; "
                        "run with strict=False to cut a boundary here instead.")
                self.fallbacks.append(Boundary(node.name, describe(node), reason))
            except CannotExpand as e:
                reason = str(e) or "rule declined"
            except (VerificationError, UnsupportedOpError):
                raise
            except Exception as e:  # a rule crashed: a bug, reported as a fallback, never silent
                if _out_of_memory(e):   # not the rule's fault, and a boundary would hide it
                    raise
                reason = f"the rule raised {type(e).__name__}: {e}"
                if self.strict:
                    raise GPDError(f"While expanding {node.format_node()} ({describe(node)}): {reason}") from e
                self.fallbacks.append(Boundary(node.name, describe(node), reason))
            finally:
                emitted, self._emitted = self._emitted, None
            if counted:
                self.expanded_flops -= node.meta["gpd"]["flops"]
            # roll back what the failed attempt did
            for n in reversed(emitted or []):
                if not n.users:
                    self.graph.erase_node(n)
            del self.sources[snapshot[0]:]
            self.param_state = snapshot[1]
            for t in list(self.added_modules):
                if t not in snapshot[2]:
                    del self.added_modules[t]
            self.permutations, self.runtime_widenings = snapshot[3], snapshot[4]
        self._boundary(node, reason)

    def _reuse_module(self, node: fx.Node) -> bool:
        """Another call of a module that an earlier call widened: feed it the layouts it was
        widened for (one weight, one layout) instead of widening it a second time."""
        in_lays, out_lay = self.module_io[node.target]
        self._emitted = []
        try:
            args = []
            for i, a in enumerate(node.args):
                want = in_lays[i] if i < len(in_lays) else None
                if isinstance(a, fx.Node) and isinstance(self.svals.get(a), Tensor):
                    if isinstance(want, Layout):
                        args.append(self.to_layout(a, want))
                    else:
                        args.append(self.narrow(a))
                else:
                    args.append(self.student_scalar(a) if isinstance(a, fx.Node) else self.dt_of(a))
            dt = self.emit("call_module", node.target, tuple(args), dict(self.dt_of(node.kwargs)))
            ok, _ = self._check(node, dt, out_lay)
        except Exception:   # CannotExpand, or a shape error from a layout that cannot apply
            ok = False
        emitted, self._emitted = self._emitted, None
        if ok:
            self.env[node] = _Entry(dt, out_lay)
            if _any_layout(out_lay) or self._inputs_expanded(node):
                self.expanded_flops += node.meta["gpd"]["flops"]
            return True
        for n in reversed(emitted):
            if not n.users:
                self.graph.erase_node(n)
        return False

    def _inline(self, node: fx.Node) -> bool:
        """Expand a wrapped Python function (fx.wrap, timm's no-trace functions) op by op.

        The function is traced on its own, with every argument that is not a graph value fixed
        as a constant, and its nodes are processed exactly like the model's. Returns False (the
        caller then cuts a boundary) when it cannot be traced.
        """
        if not self._inputs_expanded(node) or self._inline_depth > 4:
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
            value = map_aggregate(value, lambda a: None if isinstance(a, fx.Node) and self._is_none(a) else a)
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
        try:
            from .trace import _ValueTracer

            # traced on this run's values: branches on sizes (``max(H, W)``, ``if pad:``) take
            # this run's path, and guards in the graph re-check them at run time
            values = tuple(map_aggregate(v, lambda a: self.svals[a] if isinstance(a, fx.Node) else a)
                           for v in dynamic.values())
            sub = _ValueTracer(example_inputs=values).trace(scope["_inlined"])
        except Exception:
            return False
        flops = node.meta.get("gpd", {}).get("flops", 0.0)
        self.total_flops -= flops   # the body's ops are counted one by one below
        self._inline_depth += 1
        try:
            for sn in sub.nodes:
                if sn.op == "placeholder":
                    value = dynamic[sn.target]
                    self.svals[sn] = map_aggregate(value, lambda a: self.svals[a] if isinstance(a, fx.Node) else a)
                    self.env[sn] = _Entry(self.dt_of(value), _layouts_of(self, value))
                elif sn.op == "output":
                    out = sn.args[0]
                    self.svals[node] = map_aggregate(out, lambda a: self.svals[a] if isinstance(a, fx.Node) else a)
                    self.env[node] = _Entry(self.dt_of(out), _layouts_of(self, out))
                elif sn.op == "get_attr":
                    return False
                else:
                    self._run_student(sn)
                    self._visit(sn)
                    self._release(sn)
        finally:
            self._inline_depth -= 1
        return True

    _inline_depth = 0

    def _is_none(self, a: fx.Node) -> bool:
        """The node's value is None in the student and in the teacher."""
        if a not in self.svals or self.svals[a] is not None:
            return False
        d = self.dt_of(a)
        return d is None or (isinstance(d, fx.Node) and self.tvals.get(d, 0) is None)

    def _release(self, node: fx.Node) -> None:
        """Drop the values that no later node can read: those of inputs whose users are all
        visited now (and of a node nobody uses).

        Rules read the values of the node and its arguments only, so keeping every value of
        both graphs to the end made the walk's memory the sum of all activations, student and
        r-times-wider teacher (HaloNet-H1 at 256x256: 7.7 GiB for a 0.2 GiB teacher). A
        dropped value becomes a meta tensor of the same shape: shape checks still work, and a
        computation that wrongly reached it fails loudly instead of reading stale data.
        """
        self._held[node] = None
        visited = self.svals
        done = [a for a in (*node.all_input_nodes, node)
                if a in self._held and all(u in visited for u in a.users)]
        for a in done:
            del self._held[a]
            self.svals[a] = _to_meta(self.svals[a])
        # Teacher values: those of the released nodes, and the conversions (permutes, widened
        # operands) emitted while visiting this node, which only this node's op used; but a
        # teacher node may stand for several student nodes (identity rules return their input).
        fresh, self._fresh = self._fresh, []
        candidates: list[fx.Node] = list(fresh)
        for a in done:
            map_aggregate(self.env[a].dt if a in self.env else None,
                          lambda t: candidates.append(t) if isinstance(t, fx.Node) else None)
        live: set[fx.Node] = set()
        for b in self._held:
            map_aggregate(self.env[b].dt if b in self.env else None,
                          lambda t: live.add(t) if isinstance(t, fx.Node) else None)
        for t in candidates:
            if t not in live and t.op not in ("get_attr", "placeholder") and t in self.tvals:
                self.tvals[t] = _to_meta(self.tvals[t])

    def _inputs_expanded(self, node: fx.Node) -> bool:
        return any(_any_layout(self.env[a].layout) for a in node.all_input_nodes)

    def _boundary(self, node: fx.Node, reason: str) -> None:
        from .trace import AutogradApply

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
        if self.strict and self._inputs_expanded(node):
            raise UnsupportedOpError(
                f"While expanding {node.format_node()} ({describe(node)}): {reason}, and strict=True "
                f"forbids a boundary. Fix: register a rule with @gpd_fx.register_rule({key}) or "
                f"expand(..., extra_rules={{{key}: rule}}){hint}, or pass strict=False to narrow "
                "its inputs to student width around it.")
        if self._inputs_expanded(node):
            self.boundaries.append(Boundary(node.name, describe(node), reason))
        args = self.narrow(node.args)
        kwargs = self.narrow(node.kwargs)
        target = node.target
        if node.op == "call_module":
            if target in self.added_modules:
                # this module was widened for another call site; this call needs the original
                target = self.ensure_module(f"{target}_student_width".replace(".", "_"), self.smods[node.target],
                                            student_target=node.target)
            else:
                self.ensure_module(target, self.smods[node.target])
        torch.default_generator.manual_seed(len(self.svals) - 1)
        dt = self.emit(node.op, target, args, kwargs)
        ok, msg = self._check(node, dt, None)
        if not ok and self.strict:
            raise VerificationError(f"While expanding {node.format_node()}: boundary differs ({msg})")
        if not ok:   # a bug upstream (an input that was not really at student width): say so
            self.fallbacks.append(Boundary(node.name, describe(node), f"the boundary differs from the student ({msg})"))
        self.env[node] = _Entry(dt, None)

    def _check(self, node: fx.Node, dt, lay) -> tuple[bool, str]:
        sval = self.svals[node]
        tval = map_aggregate(dt, lambda a: self.tvals[a] if isinstance(a, fx.Node) else a)
        # Rounding noise is of the size of the largest value upstream, not of this node's own
        # values: the channel sum of (shuffled x - x) is 0 in exact arithmetic, and whatever
        # comes out of it carries noise of x's size. So the floor is the largest magnitude on
        # any path into the node (propagated node by node).
        floor = max([self.magnitude.get(a, 0.0) for a in node.all_input_nodes] or [0.0])
        self.magnitude[node] = max(floor, _max_abs(sval))
        try:
            _compare_tree(tval, sval, node, self.tol, layout=lay, floor=floor)
        except VerificationError as e:
            return False, str(e)
        return True, ""

    def _compute_kept_demand(self) -> None:
        """A node is 'kept-demanded' when all its uses lead to the output through transparent ops."""
        for node in reversed(list(self.sgm.graph.nodes)):
            if node.op == "output" or not node.users:
                continue
            ok = True
            for u in node.users:
                if u.op == "output":
                    continue
                entry = lookup(u, self.smods, self.extra)
                transparent = (entry is not None and entry.transparent) or _is_tuple_type(u)
                if not transparent or not self.kept_demand.get(u, False):
                    ok = False
                    break
            self.kept_demand[node] = ok


def _widened(student: nn.Module, teacher: nn.Module) -> bool:
    """True when a rule gave the teacher's copy of a module wider tensors (weights, statistics):
    only such a module must see the same layouts at every call. Parameter-free modules called
    several times (one ReLU instance in a ResNet block) are free to follow each call's layout."""
    theirs = {k: tuple(v.shape) for k, v in student.state_dict().items()}
    try:
        ours = {k: tuple(v.shape) for k, v in teacher.state_dict().items()}
    except Exception:
        return True
    return theirs != ours


def _is_tuple_type(node: fx.Node) -> bool:
    """A call that only builds a (named) tuple of its arguments (GoogLeNet's outputs)."""
    t = node.target
    return node.op == "call_function" and isinstance(t, type) and issubclass(t, tuple)


def _pack_tuple(ctx, node):
    return ctx.emit_same(), tuple(ctx.layout(a) for a in node.args)


def _to_meta(v):
    """``v`` with every tensor replaced by an empty meta tensor of the same shape and dtype."""
    return map_aggregate(v, lambda t: torch.empty_like(t, device="meta") if isinstance(t, Tensor)
                         and not isinstance(t, nn.Parameter) and t.device.type != "meta" else t)


def _max_abs(v) -> float:
    if isinstance(v, Tensor) and v.is_floating_point() and v.numel():
        m = float(v.detach().abs().max())
        return m if math.isfinite(m) else 0.0
    return 0.0


def _set_flag(d: dict, name: str) -> None:
    d[name] = True


def _inlinable(node: fx.Node) -> bool:
    fn = node.target
    return (node.op == "call_function" and inspect.isfunction(fn)
            and not getattr(fn, "__module__", "").startswith(("torch.", "builtins", "operator")))


def _layouts_of(builder, value):
    def one(a):
        if isinstance(a, fx.Node):
            return builder.env[a].layout
        if isinstance(a, (list, tuple)):
            return type(a)(one(x) for x in a) if not hasattr(a, "_fields") else tuple(one(x) for x in a)
        return None
    return one(value)


def _default_of(node: fx.Node):
    if node.args:
        return node.args[0]
    raise VerificationError(f"no example input for placeholder {node.name}")


def _out_of_memory(e: BaseException) -> bool:
    """An allocation failure (CPU allocators raise a plain RuntimeError)."""
    if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
        return True
    msg = str(e)
    return isinstance(e, RuntimeError) and ("can't allocate memory" in msg or "out of memory" in msg)


def _any_layout(lay) -> bool:
    if isinstance(lay, Layout):
        return True
    if isinstance(lay, (list, tuple)):
        return any(_any_layout(x) for x in lay)
    if isinstance(lay, dict):
        return any(_any_layout(x) for x in lay.values())
    return False


def _compare_tree(tval, sval, node: fx.Node, tol: float, layout=None, floor: float = 0.0) -> float:
    """Check teacher value == student value seen through ``layout``; return the max rel. error."""
    if isinstance(sval, Tensor):
        if not isinstance(tval, Tensor):
            raise VerificationError(f"{node.name}: teacher gave {type(tval).__name__}, student a tensor")
        ref = sval
        if isinstance(layout, Layout):
            if tval.dim() != sval.dim() or tval.shape[layout.dim] != layout.index.numel():
                raise VerificationError(f"{node.name}: shape {tuple(tval.shape)} vs student "
                                        f"{tuple(sval.shape)} expanded on dim {layout.dim}")
            ref = sval.index_select(layout.dim, layout.index.to(sval.device))
        ok, rel = _close(tval, ref, tol, floor)
        if not ok:
            raise VerificationError(
                f"{node.name}: teacher {tuple(tval.shape)} != student {tuple(ref.shape)}"
                f"{' in layout dim=' + str(layout.dim) if isinstance(layout, Layout) else ''} "
                f"(max rel. error {rel:.3g} > {tol:g})")
        return rel
    if isinstance(sval, (list, tuple)):
        if not isinstance(tval, (list, tuple)) or len(tval) != len(sval):
            raise VerificationError(f"{node.name}: structure differs")
        lays = layout if isinstance(layout, (list, tuple)) else [layout] * len(sval)
        return max([_compare_tree(t, s, node, tol, l, floor) for t, s, l in zip(tval, sval, lays)] or [0.0])
    if isinstance(sval, dict):
        return max([_compare_tree(tval[k], sval[k], node, tol,
                                  layout.get(k) if isinstance(layout, dict) else None, floor)
                    for k in sval] or [0.0])
    return 0.0
