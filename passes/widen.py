"""Inverse Reparameterization: build the wider teacher graph node by node, verifying as it goes.

The walk (:class:`Builder`) visits the traced student graph once. For every node it looks up
the rule for the op, lets the rule emit the teacher version through a
:class:`~gpd_fx.passes.widen_context.RuleContext`, runs that teacher node on the probe input
(the student node runs beside it) and checks that the teacher value equals the student value
in the node's layout (``DESIGN.md §1``). A rule that cannot handle an instance raises
``CannotExpand``; an op without a rule, or a rule whose result does not verify, becomes a
*boundary*: its expanded inputs are narrowed back to student width, it runs unchanged, and its
output is kept.

Running both graphs in lockstep is what makes the whole pass self-verifying: the first node
whose values diverge is known by name, and shape arguments computed inside the model
(``x.shape[0]``, ``C // heads``) are checked against their real teacher values.

The walk delegates to small parts, one module each:

============================  ===============================================================
``widen_context.py``          ``RuleContext``, the rule-author API
``widen_emit.py``             the teacher graph: emit a node and run it on the probe values
``widen_params.py``           teacher parameters and their student-map sources
``widen_convert.py``          layout conversion (permute, widen, narrow)
``widen_values.py``           the value store (teacher node + layout per student node), release
``widen_verify.py``           the tolerance table and the lockstep comparison
``widen_boundary.py``         boundaries and their messages
``widen_inline.py``           inlining of wrapped Python functions
``widen_flops.py``            FLOP accounting
``widen_coupling.py``         coupling groups of channel maps
============================  ===============================================================

After the build every teacher node that stands for a student value (and every parameter and
layout conversion) carries its layout in ``node.meta["gpd_layout"]`` (:data:`LAYOUT_KEY`),
and the student node it stands for in ``node.meta["gpd_student"]``.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.fx.node import map_aggregate
from torch.utils._pytree import tree_leaves

from gpd_fx.errors import GPDError, UnsupportedOpError, VerificationError

from .layout import Layout
from .module_paths import get_path, set_path
from .registry import CannotExpand, RuleEntry, lookup
from .student_map import ParamSource
from .widen_boundary import Boundary, describe, explain, strict_error
from .widen_context import RuleContext
from .widen_convert import LayoutConverter
from .widen_coupling import coupling_graph
from .widen_emit import TeacherGraph, execute
from .widen_flops import FlopAccount
from .widen_inline import inlinable, inline_call
from .widen_params import ParamStore, WidenedWeight
from .widen_values import LAYOUT_KEY, STUDENT_KEY, Entry, ValueRelease, annotate, any_layout
from .widen_verify import Verifier, compare_tree, max_abs

__all__ = ["WidenResult", "Builder", "RuleContext", "Boundary", "Layout", "LAYOUT_KEY", "STUDENT_KEY",
           "layouts", "rng_untouched"]


@dataclass
class WidenResult:
    """What the build returns: the teacher, the student-map sources, where it is not expanded
    (boundaries; fallbacks are rules whose result was rejected), FLOP accounting, the largest
    relative error of the outputs, conversion counts, and the coupling graph."""
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


@contextlib.contextmanager
def rng_untouched():
    """Restore the CPU generator and every initialised CUDA generator on exit.

    The walk seeds the process-wide generators before every node (dropout in the student and
    the teacher must draw the same mask); nobody outside the walk sees that. CUDA generators are
    saved only when CUDA is initialised already: saving them would otherwise start a CUDA
    context for a CPU-only expand, and a CUDA model initialises it before this point.
    """
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        yield


def layouts(gm: fx.GraphModule) -> dict[str, Any]:
    """``{teacher node name: layout}`` for every node of a built teacher that carries one
    (``None``: student width)."""
    return {n.name: n.meta[LAYOUT_KEY] for n in gm.graph.nodes if LAYOUT_KEY in n.meta}


class Builder:
    """The walk over the student graph that builds the teacher (see the module docstring).

    Args:
        gm: the traced student.
        ratio: expansion ratio r.
        noise, seed: the symmetry-breaking noise of the weight rule and its seed.
        strict: raise instead of cutting a boundary (or reporting a fallback).
        tol: verification tolerance (relative; see :data:`~gpd_fx.passes.widen_verify.TOL`).
        extra_rules: a registry of user rules, tried first.
    """

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
        self.env: dict[fx.Node, Entry] = {}     # student node -> teacher node and layout
        self.svals: dict[fx.Node, Any] = {}     # student node -> its value on the probe input
        self.teacher = TeacherGraph()
        self.tvals = self.teacher.values        # teacher node -> its value on the probe input
        self.params = ParamStore(gm, self.teacher.root)
        self.convert = LayoutConverter(self.teacher, self.params, self.env, self.svals, ratio)
        self.verifier = Verifier(tol)
        self.flops = FlopAccount()
        self.release = ValueRelease()
        self.boundaries: list[Boundary] = []
        self.fallbacks: list[Boundary] = []
        self.kept_demand: dict[fx.Node, bool] = {}
        # module target -> (layouts of its arguments, output layout) from the call that widened it
        self.module_io: dict[str, tuple[list, Any]] = {}
        self.inline_depth = 0

    # --- read-only views kept for callers of the previous single-class builder ---------------
    @property
    def sources(self) -> list[ParamSource]:
        return self.params.sources

    @property
    def param_state(self) -> dict[str, Any]:
        return self.params.state

    @property
    def root(self) -> nn.Module:
        return self.teacher.root

    @property
    def graph(self) -> fx.Graph:
        return self.teacher.graph

    # --- helpers the parts call ------------------------------------------------------------
    def set_entry(self, node: fx.Node, dt, layout) -> None:
        """Record the teacher counterpart of ``node`` and write its layout into the teacher
        node's meta (``gpd_layout``, ``gpd_student``)."""
        self.env[node] = Entry(dt, layout)
        annotate(dt, layout, node.name)

    def ensure_module(self, target: str, module: nn.Module, student_target: str | None = None) -> str:
        """Make sure the teacher has (a student-size copy of) ``module`` at ``target``."""
        if target not in self.teacher.added_modules:
            self.teacher.add_module(target, copy.deepcopy(module))
            self.params.record_copied_module(target, module, student_target)
        return target

    def inputs_expanded(self, node: fx.Node) -> bool:
        return any(any_layout(self.env[a].layout) for a in node.all_input_nodes)

    def is_none(self, a: fx.Node) -> bool:
        """The node's value is None in the student and in the teacher."""
        if a not in self.svals or self.svals[a] is not None:
            return False
        d = self.convert.dt_of(a)
        return d is None or (isinstance(d, fx.Node) and self.tvals.get(d, 0) is None)

    # --- the walk --------------------------------------------------------------------------
    def run(self, example_inputs: tuple, progress: bool = False,
            wide_inputs: dict[int, int] | None = None, wide_outputs: bool = False) -> WidenResult:
        """Build the teacher on ``example_inputs`` (the probe); the global RNG is left as found.

        ``wide_inputs``: ``{position among the inputs' tensors (pytree order): dim}``, inputs the
        teacher takes widened on ``dim`` (interleaved) through a port (``passes/ports.py``):
        another scope's teacher-width output when it passes one, else ``repeat_interleave``.
        ``wide_outputs``: another scope reads the outputs through a port, so the layers producing
        them are widened too (an output that is only narrowed is otherwise computed at student
        width, where widening would buy nothing)."""
        with rng_untouched():
            return self._run(example_inputs, progress, wide_inputs or {}, wide_outputs)

    def _widen_placeholder(self, node: fx.Node, dt: fx.Node, val, first: int, wide: dict[int, int]) -> None:
        """Give the placeholder ``node`` (value ``val``, whose tensors start at position ``first``)
        a teacher counterpart widened through a port where ``wide`` asks for it."""
        from .layout import interleaved
        from .ports import gpd_port_widen

        if isinstance(val, Tensor):
            if first not in wide:
                return
            d = wide[first]
            lay = interleaved(val.shape[d], self.ratio, d)
            dims = d
        elif isinstance(val, (list, tuple)) and not hasattr(val, "_fields") and \
                all(isinstance(v, Tensor) for v in val):
            dims = tuple(wide.get(first + i) for i in range(len(val)))
            if all(d is None for d in dims):
                return
            lay = type(val)(None if d is None else interleaved(v.shape[d], self.ratio, d) for v, d in zip(val, dims))
        else:
            return   # nested containers: passed at student width
        port = self.convert._emit("call_function", gpd_port_widen, (dt, dims, self.ratio), lay)
        self.set_entry(node, port, lay)
        # held to the end like the placeholder's own value: no visited node owns it, so the
        # release after the next node would otherwise drop it while later nodes still read it
        self.teacher.fresh.remove(port)

    def _run(self, example_inputs: tuple, progress: bool, wide: dict[int, int], wide_outputs: bool) -> WidenResult:
        self._compute_kept_demand(wide_outputs)
        inputs = list(example_inputs)
        position = 0   # of the next input tensor, in pytree order (what ``wide`` counts)
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
                # the target, not the name: ``*args``/``**kwargs`` keep their stars in the signature
                dt = self.graph.create_node("placeholder", node.target, name=node.name, type_expr=node.type)
                dt.meta = dict(node.meta)
                if len(node.args):
                    dt.args = node.args
                self.tvals[dt] = val
                self.set_entry(node, dt, None)
                if wide:
                    self._widen_placeholder(node, dt, val, position, wide)
                    position += len([v for v in tree_leaves(val) if isinstance(v, Tensor)])
                self.verifier.source(node, val)
                continue
            if node.op == "get_attr":
                self.svals[node] = get_path(self.sgm, node.target)
                self.env[node] = Entry(None, None)
                self.verifier.source(node, self.svals[node])
                continue
            if node.op == "output":
                out_dt = self.convert.narrow(node.args[0])
                out = self.graph.output(out_dt)
                out.meta[LAYOUT_KEY] = None
                outs = map_aggregate(node.args[0], lambda a: self.svals[a] if isinstance(a, fx.Node) else a)
                max_rel = max(max_rel, compare_tree(self.teacher.value(out_dt), outs, node, self.tol))
                continue
            self.step(node)
        self._annotate()
        gm = fx.GraphModule(self.root, self.graph, class_name="DynamicTeacherGraph")
        return WidenResult(gm, self.sources, self.boundaries, self.fallbacks, self.flops.expanded,
                           self.flops.total, max_rel, self.convert.permutations, self.convert.runtime_widenings,
                           coupling_graph(self.env))

    def step(self, node: fx.Node) -> None:
        """Run the student ``node``, build its teacher version, release values no longer read."""
        self._run_student(node)
        self._visit(node)
        self.release.after(node, self.svals, self.env, self.tvals, self.teacher.fresh)
        self.teacher.fresh = []

    def _annotate(self) -> None:
        """Layouts of the parameters that rules read (their state in the parameter store; index
        buffers and student-width copies: ``None``). Nodes a rule emits on the way to its
        result (the products inside an attention rule) carry no layout."""
        for n in self.graph.nodes:
            if n.op == "get_attr" and LAYOUT_KEY not in n.meta:
                st = self.params.state.get(n.target)
                n.meta[LAYOUT_KEY] = st if isinstance(st, (Layout, WidenedWeight)) else None

    def _run_student(self, node: fx.Node) -> None:
        args = map_aggregate(node.args, lambda a: self.svals[a] if isinstance(a, fx.Node) else a)
        kwargs = map_aggregate(node.kwargs, lambda a: self.svals[a] if isinstance(a, fx.Node) else a)

        def run():
            torch.default_generator.manual_seed(len(self.svals))
            return execute(node.op, node.target, args, kwargs, lambda t: self.smods[t])
        self.svals[node] = self.flops.measure(node, run)

    def _check(self, node: fx.Node, dt, lay) -> tuple[bool, str]:
        return self.verifier.check(node, self.teacher.value(dt), self.svals[node], lay)

    def _checkpoint(self):
        return self.params.checkpoint(), self.teacher.checkpoint(), self.convert.checkpoint()

    def _rollback(self, cp) -> None:
        self.params.rollback(cp[0])
        self.teacher.rollback(cp[1])
        self.convert.rollback(cp[2])

    def _visit(self, node: fx.Node) -> None:
        """Build the teacher version of ``node``: its rule, a reused widened module, an inlined
        function, or else a boundary."""
        entry = lookup(node, self.smods, self.extra)
        if node.op == "call_module" and node.target in self.module_io:
            if self._reuse_module(node):
                return
            reason = "a second call of a widened module with an incompatible layout"
        elif entry is None and _is_tuple_type(node):
            reason = self._apply_rule(node, RuleEntry(_pack_tuple, True))
        elif entry is None and inlinable(node) and inline_call(self, node):
            return
        elif entry is None:
            reason = "no rule for this op"
        else:
            reason = self._apply_rule(node, entry)
        if reason is not None:
            self._boundary(node, reason)

    def _apply_rule(self, node: fx.Node, entry: RuleEntry) -> str | None:
        """Run the rule and verify its result: ``None`` when it holds, else why not (with the
        attempt undone: its nodes, sources, parameter states, modules and counters)."""
        cp = self._checkpoint()
        self.teacher.record()
        counted = False
        try:
            torch.default_generator.manual_seed(len(self.svals) - 1)
            dt, lay = entry.fn(RuleContext(self, node), node)
            if any_layout(lay) or self.inputs_expanded(node):
                self.flops.expand(node)
                counted = True
            ok, msg = self._check(node, dt, lay)
            if ok:
                self.set_entry(node, dt, lay)
                if node.op == "call_module" and node.target in self.teacher.added_modules \
                        and node.target not in cp[1] and _widened(self.smods[node.target],
                                                                  self.teacher.added_modules[node.target]):
                    self.module_io[node.target] = ([self.env[a].layout if isinstance(a, fx.Node) else None
                                                    for a in node.args], lay)
                self.teacher.stop()
                return None
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
            emitted = self.teacher.stop()
        if counted:
            self.flops.unexpand(node)
        self.teacher.erase_unused(emitted)
        self._rollback(cp)
        return reason

    def _reuse_module(self, node: fx.Node) -> bool:
        """Another call of a module that an earlier call widened: feed it the layouts it was
        widened for (one weight, one layout) instead of widening it a second time."""
        in_lays, out_lay = self.module_io[node.target]
        self.teacher.record()
        try:
            args = []
            for i, a in enumerate(node.args):
                want = in_lays[i] if i < len(in_lays) else None
                if isinstance(a, fx.Node) and isinstance(self.svals.get(a), Tensor):
                    if isinstance(want, Layout):
                        args.append(self.convert.to_layout(a, want))
                    else:
                        args.append(self.convert.narrow(a))
                else:
                    args.append(self.convert.student_scalar(a) if isinstance(a, fx.Node) else self.convert.dt_of(a))
            dt = self.teacher.emit("call_module", node.target, tuple(args), dict(self.convert.dt_of(node.kwargs)))
            ok, _ = self._check(node, dt, out_lay)
        except Exception:   # CannotExpand, or a shape error from a layout that cannot apply
            ok = False
        emitted = self.teacher.stop()
        if ok:
            self.set_entry(node, dt, out_lay)
            if any_layout(out_lay) or self.inputs_expanded(node):
                self.flops.expand(node)
            return True
        self.teacher.erase_unused(emitted)
        return False

    def _boundary(self, node: fx.Node, reason: str) -> None:
        reason, key, hint = explain(node, reason)
        if self.strict and self.inputs_expanded(node):
            raise strict_error(node, reason, key, hint)
        if self.inputs_expanded(node):
            self.boundaries.append(Boundary(node.name, describe(node), reason))
        args = self.convert.narrow(node.args)
        kwargs = self.convert.narrow(node.kwargs)
        target = node.target
        if node.op == "call_module":
            if target in self.teacher.added_modules:
                # this module was widened for another call site; this call needs the original
                target = self.ensure_module(f"{target}_student_width".replace(".", "_"), self.smods[node.target],
                                            student_target=node.target)
            else:
                self.ensure_module(target, self.smods[node.target])
        torch.default_generator.manual_seed(len(self.svals) - 1)
        dt = self.teacher.emit(node.op, target, args, kwargs)
        ok, msg = self._check(node, dt, None)
        if not ok and self.strict:
            raise VerificationError(f"While expanding {node.format_node()}: boundary differs ({msg})")
        if not ok:   # a bug upstream (an input that was not really at student width): say so
            self.fallbacks.append(Boundary(node.name, describe(node), f"the boundary differs from the student ({msg})"))
        self.set_entry(node, dt, None)

    def _compute_kept_demand(self, wide_outputs: bool = False) -> None:
        """A node is 'kept-demanded' when all its uses lead to the output through transparent ops
        (with ``wide_outputs`` the output itself counts as a widened use)."""
        for node in reversed(list(self.sgm.graph.nodes)):
            if node.op == "output" or not node.users:
                continue
            ok = True
            for u in node.users:
                if u.op == "output":
                    if wide_outputs:   # the output is a widened use
                        ok = False
                        break
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


def _default_of(node: fx.Node):
    if node.args:
        return node.args[0]
    # ``forward(self, x, *args, **kwargs)``: fx gives the catch-alls placeholders of their own,
    # which the example inputs leave empty
    if isinstance(node.target, str) and node.target.startswith("**"):
        return {}
    if isinstance(node.target, str) and node.target.startswith("*"):
        return ()
    raise VerificationError(f"no example input for placeholder {node.name}")


def _out_of_memory(e: BaseException) -> bool:
    """An allocation failure (CPU allocators raise a plain RuntimeError)."""
    if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
        return True
    msg = str(e)
    return isinstance(e, RuntimeError) and ("can't allocate memory" in msg or "out of memory" in msg)


# Names of the single-file builder, for code that imported them from here.
_get_path, _set_path = get_path, set_path
_compare_tree, _max_abs = compare_tree, max_abs
_Entry = Entry
