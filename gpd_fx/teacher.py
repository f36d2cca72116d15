"""The dynamic teacher module returned by :func:`gpd_fx.expand`, and its expansion report."""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from gpd_fx.passes.branches import _Branched, conv_nd, cut_padding, shared_folds
from gpd_fx.passes.student_map import ParamSource, _stride_of, evaluate_map, mapped_tensor, share_map

__all__ = ["DynamicTeacher", "ExpansionReport"]


@dataclass
class ExpansionReport:
    """What :func:`gpd_fx.expand` did.

    Attributes:
        ratio: the expansion ratio.
        boundaries: names of the nodes that run at student width (their inputs are narrowed).
        boundary_reasons: ``{node: "op: reason"}`` for each boundary.
        fallbacks: nodes whose rule gave a result that did not verify and became boundaries
            (always a bug in a rule; empty in a healthy run).
        expanded_flop_fraction: share of the student's FLOPs (conv/matmul/attention, as counted by
            ``torch.utils.flop_counter``) that run expanded in the teacher, 0..1.
        student_params / teacher_params: trainable parameter counts.
        student_flops: FLOPs of one student forward on the example input.
        max_rel_error: max |teacher - student| / max |student| at the outputs on the probe.
        permutations: explicit layout permutations inserted.
        runtime_widenings: kept tensors widened at run time (not parameters).
        branch_layers: layers rewritten into multi-branch form (CBR).
        seconds: wall time of ``expand``.
        probe_dtype: dtype the self-verification ran in.
        size_guards: source locations (``file:line``) of Python branches on sizes that tracing
            decided on the example inputs; the teacher re-checks each on every run and stops
            with an error if another input shape would take the other path.
        coupling_groups: number of groups of expanded tensors whose channel maps are tied
            (residual adds, concat inputs, shared layouts); ``coupling_graph`` is the
            ``networkx.Graph`` behind it (nodes are graph node names) for inspection.
        teacher_cost: (computed on first access) for a multi-branch (CBR) teacher, its cost next
            to the IR teacher's at
            the example input: ``{"params", "ir_params", "flops", "ir_flops" (one forward),
            "input_shapes", "layers": {layer: {"fold": [...], "run": [...]}}}``; which
            branches run on the activations is decided per input shape, so a training batch
            may differ (``layer.plan(x)``). ``None`` for an IR-only teacher.
        frontend: the capture that ran: ``"fx"`` (``torch.fx`` symbolic tracing) or ``"export"``
            (``torch.export``; ``DESIGN.md §6``).
        frontend_notes: why the other front end was not used (``frontend="auto"`` fell back to
            export: FX's error), and the ATen ops the export front end left as ATen calls.
        tolerance: the relative tolerance the build was verified to: ``TOL`` of the probe dtype,
            or of a less precise dtype the graph computes in (``DESIGN.md §6``).
    """

    ratio: int
    boundaries: list[str] = field(default_factory=list)
    boundary_reasons: dict[str, str] = field(default_factory=dict)
    fallbacks: dict[str, str] = field(default_factory=dict)
    expanded_flop_fraction: float = 0.0
    student_params: int = 0
    teacher_params: int = 0
    student_flops: float = 0.0
    max_rel_error: float = 0.0
    permutations: int = 0
    runtime_widenings: int = 0
    branch_layers: int = 0
    seconds: float = 0.0
    probe_dtype: str = ""
    size_guards: list[str] = field(default_factory=list)
    coupling_groups: int = 0
    coupling_graph: Any = field(default=None, repr=False)
    teacher_cost_fn: Any = field(default=None, repr=False, compare=False)
    _teacher_cost: dict[str, Any] | None = field(default=None, repr=False, compare=False)
    frontend: str = "fx"
    frontend_notes: list[str] = field(default_factory=list)
    tolerance: float | None = None

    @property
    def teacher_cost(self) -> dict[str, Any] | None:
        # computed on first use (one teacher forward at the example input under a FLOP counter),
        # so that expand does not pay for it
        if self._teacher_cost is None and self.teacher_cost_fn is not None:
            self._teacher_cost = self.teacher_cost_fn()
        return self._teacher_cost

    def summary(self) -> str:
        return (f"ratio {self.ratio}: teacher {self.teacher_params:,} params vs student "
                f"{self.student_params:,}; expanded FLOP share {self.expanded_flop_fraction:.3f}; "
                f"{len(self.boundaries)} boundaries; {self.branch_layers} multi-branch layers; "
                f"max rel. error {self.max_rel_error:.2e} ({self.probe_dtype}); {self.seconds:.2f} s; "
                f"front end {self.frontend}")

    def cost_summary(self) -> str:
        """One line: the CBR teacher's parameters and forward FLOPs against the IR teacher's, and
        how many layers fold all branches / run some on the activations at the example input."""
        c = self.teacher_cost
        if c is None:
            return "IR teacher (no multi-branch layers)"
        layers = c["layers"]
        n_run = sum(1 for p in layers.values() if p["run"])
        kinds: dict[str, int] = {}
        for p in layers.values():
            for k in p["run"]:
                kinds[k] = kinds.get(k, 0) + 1
        run = ", ".join(f"{k} x{n}" for k, n in kinds.items()) or "none"
        return (f"CBR teacher vs IR teacher: {c['params']:,} vs {c['ir_params']:,} params "
                f"({c['params'] / max(1, c['ir_params']):.2f}x); forward {c['flops'] / 1e9:.3g} vs "
                f"{c['ir_flops'] / 1e9:.3g} GFLOP ({c['flops'] / max(1.0, c['ir_flops']):.2f}x) at {c['input_shapes']}; "
                f"{len(layers) - n_run} of {len(layers)} layers fold every branch, {n_run} run some on the "
                f"activations ({run})")

    def __str__(self) -> str:
        lines = [self.summary()]
        if self.teacher_cost is not None:
            lines.append("  " + self.cost_summary())
        for n, why in self.boundary_reasons.items():
            lines.append(f"  boundary {n}: {why}")
        for n, why in self.fallbacks.items():
            lines.append(f"  FALLBACK {n}: {why}")
        for note in self.frontend_notes:
            lines.append(f"  front end: {note}")
        if self.size_guards:
            lines.append(f"  {len(self.size_guards)} size branches decided on the example inputs "
                         f"(guarded at run time): {', '.join(self.size_guards)}")
        return "\n".join(lines)


class _BufferStore(nn.Module):
    """Holds the student's own buffers (BN running statistics) under '/'-joined names."""

    def __init__(self, buffers: dict[str, Tensor]):
        super().__init__()
        for name, t in buffers.items():
            self.register_buffer(name.replace(".", "/"), t)

    def as_dict(self) -> dict[str, Tensor]:
        return {k.replace("/", "."): v for k, v in self._buffers.items()}


class DynamicTeacher(nn.Module):
    """A wider teacher that computes the student's function at initialisation.

    ``dt(x)`` runs the teacher. ``dt.student(x)`` runs the user's own module with parameters
    mapped (differentiably) from the teacher's, so one backward trains both. The only trainable
    parameters are the teacher's; the student's BN running statistics are kept here as buffers
    and updated by ``dt.student`` in train mode.

    Attributes:
        teacher: the teacher ``GraphModule``.
        report: the :class:`ExpansionReport`.
        expand_config: the arguments of :func:`gpd_fx.expand`, to rebuild before loading a state dict.
    """

    def __init__(self, teacher: nn.Module, template: nn.Module, sources: list[ParamSource],
                 student_buffers: dict[str, Tensor], report: ExpansionReport, expand_config: dict[str, Any],
                 train_teacher: nn.Module | None = None):
        super().__init__()
        self.teacher = teacher
        # Only for models whose own forward depends on the mode (aux logits in train mode): the
        # train-mode graph, sharing every module and parameter with ``teacher``.
        self.teacher_train = train_teacher
        self.student_state = _BufferStore(student_buffers)
        # The user's module is a template only: its mapped parameters live on the meta device,
        # so no parameter exists twice. Not registered as a submodule for the same reason.
        self.__dict__["_template"] = template
        self.sources = sources
        # Decide each map's strided form, and the per-branch maps of multi-branch layers, now and
        # eagerly: computed first inside a compiled step they would break its graph.
        for s in sources:
            _stride_of(s)
        for s in sources:
            mod = teacher.get_submodule(s.module) if s.module else teacher
            if isinstance(mod, _Branched) and s.attr == "weight":
                mod.prepare_map(s)
        _mark_student_cuts(teacher, template, sources)
        self.report = report
        self.expand_config = dict(expand_config)
        self.ratio = report.ratio

    @property
    def template(self) -> nn.Module:
        """The user's module class and structure (mapped parameters are on the meta device)."""
        return self._template

    def forward(self, *args, **kwargs):
        return self._graph()(*args, **kwargs)

    def _graph(self) -> nn.Module:
        return self.teacher_train if self.training and self.teacher_train is not None else self.teacher

    def student_parameters(self) -> dict[str, Tensor]:
        """The student's parameters as a differentiable function of the teacher's."""
        return evaluate_map(self.teacher, self.sources)

    def student_state_dict(self) -> dict[str, Tensor]:
        """Mapped parameters plus the student's own buffers, keyed like the user's model."""
        state = self.student_parameters()
        state.update(self.student_state.as_dict())
        return state

    def student(self, *args, **kwargs):
        """Run the user's student module with the mapped parameters and its own buffers.

        The weights of multi-branch convs allowed a live-tap cut (``_mark_student_cuts``) are
        mapped when their conv is called, from its input's size, so that taps reading only
        zero padding are not folded (``BranchConvNd.student_cut``), and those convs run through
        ``conv_nd`` (box-shaped kernels with cut padding; GEMMs on tiny maps); all others are
        mapped up front. On small maps such a conv may also run its 1x1->kxk branch on its
        activations instead of folding it (``BranchConvNd.student_plan``): the same output and
        gradients up to rounding.
        """
        lazy = self._lazy_now()
        if not lazy or torch.compiler.is_compiling():
            state = self.student_state_dict()
            return functional_call(self._template, state, args, kwargs, tie_weights=True, strict=False)
        skip = {s.student_name for s, _, _ in lazy}
        state = evaluate_map(self.teacher, [s for s in self.sources if s.student_name not in skip])
        state.update(self.student_state.as_dict())
        with _kernels_at_call(lazy):
            return functional_call(self._template, state, args, kwargs, tie_weights=True, strict=False)

    def _lazy_kernels(self) -> list[tuple[ParamSource, nn.Module, nn.Module]]:
        """``(source, teacher layer, student conv)`` of each weight mapped at call time; computed
        once. Only untied conv weights of layers marked for the live-tap cut."""
        cached = self.__dict__.get("_lazy")
        if cached is None:
            counts: dict[int, int] = {}
            for _, p in self._template.named_parameters(remove_duplicate=False):
                counts[id(p)] = counts.get(id(p), 0) + 1
            cached = []
            for s in self.sources:
                mod = _holder(self.teacher, s.module)
                if not (isinstance(mod, _Branched) and s.attr == "weight" and mod.__dict__.get("_student_cut")
                        and mod._mappable(s)):
                    continue
                conv = self._template.get_submodule(s.student_name.rpartition(".")[0])
                w = conv._parameters.get("weight")
                if w is not None and counts.get(id(w), 0) == 1:
                    cached.append((s, mod, conv))
            self.__dict__["_lazy"] = cached
        return cached

    def _lazy_now(self) -> list[tuple[ParamSource, nn.Module, nn.Module]]:
        """:meth:`_lazy_kernels` whose student conv runs its class's own forward now, with their
        layers marked for this call: such a conv is run by ``_student_convs`` (it may take a
        box-shaped kernel, ``_student_lazy``) and may run branches on its activations (its
        widths in ``_student_run``, for ``BranchConvNd.student_plan``). A conv given an instance
        ``forward`` (a user override) keeps it and gets an eagerly mapped full kernel."""
        now = []
        for item in self._lazy_kernels():
            _, mod, conv = item
            own = "forward" not in conv.__dict__
            mod.__dict__["_student_lazy"] = own
            mod.__dict__["_student_run"] = ((conv.out_channels, conv.in_channels)
                                            if own and conv.groups == mod.groups else None)
            if own:
                now.append(item)
        return now

    def release_buffers(self) -> None:
        """Drop the storage kept between steps for gradients and mapped tensors (see
        ``passes.student_map._GradPool``): up to about the teacher's parameter size for a
        multi-branch teacher. Called by ``.to()``/``.double()`` and friends; call it after
        training to give the memory back. The next step allocates afresh."""
        for m in self.teacher.modules():
            m.__dict__.pop("_grad_pools", None)
        for s in self.sources:
            s.__dict__.pop("_grad_pool", None)

    def joint(self, *args, **kwargs):
        """``(teacher(x), student(x))`` in one call: the forward to wrap in DDP or compile.

        The student map shares its work with the teacher forward: each teacher parameter the
        student reads is passed to the teacher as an alias from one fused map
        (:func:`~gpd_fx.passes.student_map.share_map`), so the student's gradient is added into
        the rows of the teacher's gradient it belongs to instead of through a teacher-sized
        zero tensor; each multi-branch layer computes the student's kernel from its branch
        tensors at student size during the teacher forward (and, where the student's conv runs
        its 1x1->kxk branch on the activations, that branch's student-size factors instead of
        folding them in: ``BranchConvNd.student_plan``). Values and gradients equal
        ``(dt(x), dt.student(x))``.
        """
        graph = self._graph()
        if torch.compiler.is_compiling() or graph is not self.teacher:
            with shared_folds(self.teacher):
                return graph(*args, **kwargs), self.student(*args, **kwargs)
        lazy = self._lazy_now()   # marks the layers whose student conv may run branches
        with shared_folds(self.teacher, self.sources):
            plain, rest = self._split_sources()
            tensors = [_holder(self.teacher, s.module)._parameters[s.attr] for s in plain]
            aliases, mapped = share_map(tensors, plain)
            with _swap_parameters(self.teacher, tensors, aliases):
                t = graph(*args, **kwargs)
            state = {s.student_name: m for s, m in zip(plain, mapped)}
            for s in rest:   # multi-branch weights: the kernel their teacher forward computed
                state[s.student_name] = mapped_tensor(self.teacher, s)
            state.update(self.student_state.as_dict())
            # the student convs of multi-branch layers run as conv_nd, with the padding cut to
            # the box kernel the teacher forward folded (memo "student_pads"), and add the
            # branch images their layer ran on the activations (BranchConvNd.student_plan)
            calls = []
            for s, layer, conv in lazy:
                memo = layer.__dict__.get("_fold_memo") or {}
                term = None
                if memo.get("student_run") is not None:
                    run, v, mapped = memo["student_run"]
                    term = functools.partial(layer.student_run_term, run=run, v=v, mapped=mapped, scale=s.scale)
                calls.append((conv, term, memo.get("student_pads")))
            with _student_convs(calls):
                out = functional_call(self._template, state, args, kwargs, tie_weights=True, strict=False)
        return t, out

    def _split_sources(self) -> tuple[list[ParamSource], list[ParamSource]]:
        """(sources whose teacher Parameter goes through the fused map, each Parameter once; all
        others, mapped by plain autograd).

        The fused backward adds the student's gradient in place into the teacher's gradient of
        the alias, which is only safe where that gradient is a fresh tensor no other pending
        backward node reads. That holds for the parameters of the standard layers below, whose
        backward kernels return new gradient tensors; a parameter added in the graph directly
        (``x + pos_embed`` hands the same gradient to both operands) is left to autograd.
        """
        plain, rest, seen = [], [], set()
        for s in self.sources:
            mod = _holder(self.teacher, s.module)
            p = mod._parameters.get(s.attr) if not isinstance(mod, _Branched) or s.attr != "weight" else None
            fresh = isinstance(mod, _Branched) or type(mod) in _FRESH_GRAD_MODULES
            if fresh and isinstance(p, nn.Parameter) and p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                plain.append(s)
            else:
                rest.append(s)
        return plain, rest

    def train(self, mode: bool = True):
        super().train(mode)
        self._template.train(mode)
        return self

    def _apply(self, fn, recurse=True):
        # kept buffers are of the old dtype/device: drop them
        self.release_buffers()
        # keep the template's non-mapped tensors (unused parameters) on the same device/dtype
        super()._apply(fn, recurse)
        mapped = {s.student_name for s in self.sources}
        for name, p in list(self._template.named_parameters()):
            if name not in mapped and p.device.type != "meta":
                p.data = fn(p.data)
        return self

    def extra_repr(self) -> str:
        return f"ratio={self.ratio}, {len(self.sources)} mapped student parameters"


# Layers whose weight and bias gradients are new tensors (convolution, matmul, norm and
# embedding backward kernels); exact types, since a subclass may use its parameters otherwise.
_FRESH_GRAD_MODULES = frozenset({
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear,
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm, nn.Embedding,
})


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _mark_student_cuts(teacher: nn.Module, template: nn.Module, sources: list[ParamSource]) -> None:
    """Allow each multi-branch conv to fold only the live taps of the student's kernel in
    ``dt.joint`` (``BranchConvNd.student_cut``) where that is provably invisible: the teacher
    graph calls the layer exactly once and reads none of its tensors directly, and the student
    parameter it maps to is the weight of a plain zero-padded ``nn.ConvNd`` of the same geometry
    (so the student applies that kernel once, to an input of the teacher layer's spatial size,
    and nothing else reads it). Anything else keeps the full kernel."""
    graph = getattr(teacher, "graph", None)
    if graph is None:
        return
    calls: dict[str, int] = {}
    read: set[str] = set()
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
        elif node.op == "get_attr":
            read.add(node.target.rpartition(".")[0])
    for s in sources:
        if s.attr != "weight" or not s.module:
            continue
        mod = teacher.get_submodule(s.module)
        if not isinstance(mod, _Branched):
            continue
        owner, _, attr = s.student_name.rpartition(".")
        try:
            conv = template.get_submodule(owner)
        except AttributeError:
            continue
        mod.__dict__["_student_cut"] = (
            calls.get(s.module, 0) == 1 and s.module not in read and attr == "weight"
            and type(conv) in _CONVS and conv.padding_mode == "zeros" and isinstance(conv.padding, tuple)
            and tuple(conv.kernel_size) == tuple(mod.kernel_size) and tuple(conv.stride) == tuple(mod.stride)
            and tuple(conv.dilation) == tuple(mod.dilation) and mod._pads_lr() == tuple((p, p) for p in conv.padding))


@contextlib.contextmanager
def _kernels_at_call(lazy: list[tuple[ParamSource, nn.Module, nn.Module]]):
    """Within the block each student conv of ``lazy`` computes its weight when called: the map
    of its teacher layer folded over the live taps at that input's size, as a kernel of the live
    box with the conv's padding cut to match where that padding stays symmetric (else zero-padded
    back to full size). Every such conv runs through ``conv_nd`` (``_student_convs``), which
    also adds the branches the layer's ``student_plan`` runs on the activations (the kernel
    then folds only the others) to the conv's output. Hooks and overrides are added for the block only (copies of the teacher
    never share them) and the weight and padding restored after."""
    handles, terms = [], []

    def install(src, layer, conv):
        original, padding = conv._parameters["weight"], conv.padding
        pending = []   # this call's branch images to run on the activations (at most one)

        def term(y, x):
            if not pending:
                return y
            run, v, mapped = pending.pop()
            return layer.student_run_term(y, x, run, v, mapped, src.scale)

        terms.append((conv, term if layer.__dict__.get("_student_run") is not None else None, None))

        def pre(module, args):
            x = args[0] if args else None
            cut = layer.student_cut(x)
            pads = cut_padding(cut)
            run = layer.student_plan(x)
            pending.clear()
            # the kernel folds every branch but those of `run` (which go on the activations, added
            # by `term` after the conv); box-shaped with the padding cut to match where the cut is
            # symmetric: the same output grid, minus products with zero padding (on a 1x1 map a
            # 3x3 conv becomes a 1x1 one); else zero outside the box
            kern, v, mapped = layer.student_split(src, x, run, cut)
            module._parameters["weight"] = kern
            if pads is not None:
                module.padding = pads
            if run:
                pending.append((run, v, mapped))

        def post(module, args, out):
            module._parameters["weight"], module.padding = original, padding

        handles.append(conv.register_forward_pre_hook(pre))
        handles.append(conv.register_forward_hook(post, always_call=True))
        return conv, original, padding

    restore = [install(*item) for item in lazy]
    try:
        with _student_convs(terms):
            yield
    finally:
        for h in handles:
            h.remove()
        for conv, original, padding in restore:
            conv._parameters["weight"], conv.padding = original, padding


@contextlib.contextmanager
def _student_convs(calls: list[tuple[nn.Module, Any, tuple[int, ...] | None]]):
    """Within the block each student conv of ``calls`` (``(conv, term, padding)``) computes
    ``term(conv_nd(x, its weight, ...), x)`` (``term`` ``None``: the conv alone), with its
    ``padding`` replaced where given: a forward override on the instance, removed after, so
    that copies of the teacher never share it.

    These are the plain zero-padded convs of multi-branch layers (``_mark_student_cuts``);
    :func:`~gpd_fx.passes.branches.conv_nd` is the same sum as ``F.conv{1,2,3}d``, computed
    without the taps that read only padding and as a GEMM on tiny maps (oneDNN's backward of a
    3x3 conv on a 1x1 map measured 4-10x the GEMM's). Swapping the weight alone cannot add the
    output of branches run on the activations (``BranchConvNd.student_plan``)."""
    saved = []
    try:
        for conv, term, padding in calls:
            def forward(x, _conv=conv, _term=term):
                y = conv_nd(x, _conv.weight, _conv.bias, tuple(_conv.stride), tuple((p, p) for p in _conv.padding),
                            tuple(_conv.dilation), _conv.groups)
                return y if _term is None else _term(y, x)

            saved.append((conv, conv.__dict__.get("forward"), conv.padding))
            conv.__dict__["forward"] = forward
            if padding is not None:
                conv.padding = padding
        yield
    finally:
        for conv, inner, padding in reversed(saved):
            if inner is None:
                del conv.__dict__["forward"]
            else:   # (DynamicTeacher._lazy_now leaves such convs out; restored all the same)
                conv.__dict__["forward"] = inner
            conv.padding = padding


def _holder(root: nn.Module, name: str) -> nn.Module:
    return root.get_submodule(name) if name else root


@contextlib.contextmanager
def _swap_parameters(root: nn.Module, params: list[Tensor], replacements: list[Tensor]):
    """Within the block every module of ``root`` that holds one of ``params`` (tied ones included)
    reads its replacement instead; a dictionary write per holder, restored on exit. Cheaper than
    ``functional_call``'s general re-parametrisation, which matters once per training step."""
    by_id = {id(p): r for p, r in zip(params, replacements)}
    swapped = []
    try:
        for mod in root.modules():
            for name, p in mod._parameters.items():
                if p is not None and id(p) in by_id:
                    swapped.append((mod, name, p))
        for mod, name, p in swapped:
            mod._parameters[name] = by_id[id(p)]
        yield
    finally:
        for mod, name, p in swapped:
            mod._parameters[name] = p
