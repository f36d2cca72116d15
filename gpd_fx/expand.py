"""``gpd_fx.expand``: trace a student and build its exact dynamic teacher (IR, then CBR)."""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
import numbers
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from gpd_fx.errors import ExpandInputError, TraceError, VerificationError
from gpd_fx.passes import rules as _rules  # noqa: F401  (registers the built-in rules)
from gpd_fx.passes.registry import has_module_rule, has_user_module_rule, load_lazy_rules, make_registry
from gpd_fx.passes.trace import MODE_ATTR, shape_guard, trace
from gpd_fx.passes.export_front import ExportInfo, export_graph, graph_signature, restore_call_convention
from gpd_fx.passes.share import own_tensors, share_with, tie_shared_parameters
from gpd_fx.passes.widen import Builder, rng_untouched
from gpd_fx.passes.widen_verify import TOL, verify_output
from gpd_fx.teacher import DynamicTeacher, ExpansionReport

__all__ = ["expand"]

# TOL (imported above): the self-verification tolerance per probe dtype, one table for the
# whole project (gpd_fx.passes.widen_verify.TOL, reasoning there).

# Largest accepted ``noise``. The noise std is relative to each weight's std: at 1 the copies of a
# weight already differ from each other as much as the student's weights do. Above it the
# zero-sum cancellation that keeps the teacher exact loses precision fast: measured in float32
# (torchvision resnet18, r = 2, 32x32 input, no multi-branch) the teacher's max relative error
# is 4e-7 at noise 1 and 1e-5 at 3; at 5 the output fails verification (6e-3 > 1e-3), and at 10
# five layers silently became boundaries. MobileNetV2, EfficientNet-B0 and VGG11-BN stay below
# 2e-6 at noise 1.
MAX_NOISE = 1.0


def _as_inputs(example_inputs) -> tuple:
    if example_inputs is None:
        raise ExpandInputError(
            "expand needs example_inputs to verify the teacher, e.g. "
            "expand(model, ratio=2, example_inputs=(torch.randn(1, 3, 64, 64),))")
    if isinstance(example_inputs, Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, list):
        example_inputs = tuple(example_inputs)
    if not isinstance(example_inputs, tuple) or not example_inputs:
        raise ExpandInputError(f"example_inputs must be a tensor or a tuple of them, got {type(example_inputs).__name__}")
    return example_inputs


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """Eval mode for the duration of the build; every module's own flag is restored after."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, f in flags:
            m.training = f


def _probe_model(model: nn.Module, inputs: tuple, verify_dtype) -> tuple[nn.Module, tuple]:
    """The model (or a copy in ``verify_dtype``) and inputs the lockstep verification runs on."""
    work = model
    if verify_dtype is not None:
        work = copy.deepcopy(model).to(verify_dtype)
        inputs = tuple(x.to(verify_dtype) if isinstance(x, Tensor) and x.is_floating_point() else x
                       for x in inputs)
    with torch.no_grad():
        try:
            work(*inputs)
        except Exception as e:
            shapes = [tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__ for x in inputs]
            hint = _input_rank_hint(model, inputs, e)
            raise ExpandInputError(
                f"the model fails on the example inputs {shapes}: {type(e).__name__}: {e}. "
                f"Pass inputs that the model accepts, e.g. {hint}") from e
    return work, inputs


# The input layout a first layer of each rank implies, with an example of it: (rank, layout, sizes)
_CONV_INPUT = {1: (3, "(N, C, L)", (64,)), 2: (4, "(N, C, H, W)", (64, 64)), 3: (5, "(N, C, T, H, W)", (8, 32, 32))}


def _input_rank_hint(model: nn.Module, inputs: tuple, error: BaseException) -> str:
    """An example input for the failure message of a model that fails on ``inputs``.

    The model's first convolution (in registration order: the stem of a CNN, the patch
    embedding of a transformer) fixes the rank its input needs: Conv3d takes a 5-D
    (N, C, T, H, W) clip. When the first example input has another rank this raises an
    :class:`ExpandInputError` that says so; otherwise it returns an example of that rank and
    the layer's input channels (an image example for a video model would mislead).
    """
    first = next(((n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    if first is None or len(first[1].kernel_size) not in _CONV_INPUT:
        return "example_inputs=(torch.randn(1, 3, 224, 224),)"
    name, conv = first
    rank, layout, sizes = _CONV_INPUT[len(conv.kernel_size)]
    example = f"example_inputs=(torch.randn(2, {conv.in_channels}, {', '.join(map(str, sizes))}),)"
    x = inputs[0]
    if isinstance(x, Tensor) and x.dim() != rank:
        raise ExpandInputError(
            f"the model's first layer {name!r} ({type(conv).__name__}) takes a {rank}-D {layout} input, "
            f"got a {x.dim()}-D input of shape {tuple(x.shape)} (the model fails on it: "
            f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). "
            f"Pass a {rank}-D example, e.g. {example}") from error
    return f"{example} (the first layer {name!r} is a {type(conv).__name__}: {rank}-D {layout})"


def expand(model: nn.Module, ratio: int = 2, example_inputs: Tensor | Sequence[Any] | None = None, *,
           noise: float = 0.1, seed: int = 0, strict: bool = False,
           leaf_modules: Iterable[type | nn.Module] | None = None,
           concrete_args: dict[str, Any] | None = None,
           extra_rules: dict[Any, Callable] | None = None,
           branches: Sequence[str] | dict[str, Sequence[str]] | None = (),
           verify_dtype: torch.dtype | None = None, progress: bool = False,
           frontend: str = "auto", scope: str | Sequence[str] | None = None) -> DynamicTeacher:
    """Build the dynamic teacher of ``model``: ``ratio`` times wider, same function at init.

    Args:
        model: the student, any ``torch.fx``-traceable ``nn.Module`` instance. Never modified:
            the teacher owns copies of every tensor it trains, and the process-wide random
            generators (CPU, and CUDA when initialised) are left as they were.
        ratio: integer expansion ratio r >= 1 (r = 1 gives an exact copy with the same graph).
        example_inputs: a tensor or tuple of tensors the model accepts; used to trace shapes and
            to verify the teacher (in float64 when the model allows).
        noise: std of the zero-sum symmetry-breaking noise, relative to each weight's std; 0 off.
            A finite number in [0, 1]: at 1 the copies differ as much as the weights do, and
            beyond it float32 rounding breaks the teacher's exactness.
        seed: seed of the noise and of the multi-branch parameters.
        strict: raise :class:`~gpd_fx.errors.UnsupportedOpError` instead of cutting a boundary.
        leaf_modules: module classes or instances not to trace into.
        concrete_args: fixed Python-level arguments for tracing ``forward``.
        extra_rules: ``{module type | function | method name: rule}`` user rules, tried first.
        branches: multi-branch kinds for the teacher's conv/linear layers (CBR): ``()`` (the default)
            for IR only, ``None`` for every kind that applies, a list of kinds, or
            ``{"conv": [...], "linear": [...]}`` (the dict may also hold ``"mid"``, the 1x1->kxk middle
            width, and ``"mode"``, the fold/run policy: see ``gpd_fx.passes.cbr.resolve_options``).
            IR is the default because the multi-branch teacher
            did not give a better student on any benchmark run (benchmarks/README.md, accuracy:
            shifted digits r2/r3/r4 83.8/83.9/82.9% with branches vs 84.6/84.2/84.4% without,
            5 seeds) while its step costs 1.15-2.3x the IR teacher's; the same default as
            ``TrainConfig.branches`` and ``gpd-fx train --branches``.
        verify_dtype: dtype of the self-verification (e.g. ``torch.float64`` for a check at
            1e-9 on a converted copy). ``None`` builds and checks in the model's own dtype, which
            is what keeps a 200M-parameter teacher within seconds and memory.
        progress: show a progress bar over the graph's nodes.
        frontend: how the student is captured (``DESIGN.md §6``): ``"fx"`` (``torch.fx``
            symbolic tracing, with ``leaf_modules``/``concrete_args``), ``"export"``
            (``torch.export``, non-strict, batch dimension dynamic where the model allows: for
            models FX cannot trace, such as Hugging Face transformers), or ``"auto"`` (the
            default: FX, and export when FX cannot trace). ``dt.report.frontend`` says which ran.
        scope: expand only these submodules (names from ``model.named_modules()``), for models
            neither front end captures whole (torchvision detectors: ``scope=["backbone"]``).
            Each is expanded on the inputs it receives when the whole model runs on
            ``example_inputs``; the whole model's outputs are verified. Where one scope reads
            another's output (the same tensor), the teachers connect at teacher width. Returns a
            :class:`gpd_fx.scope.ScopedTeacher` (the user's model with each scope's teacher in
            place; ``dt.student``, ``dt.joint``, ``fold`` and ``param_groups`` work as for a
            whole teacher). The other arguments apply to every scope.

    Returns:
        A :class:`~gpd_fx.DynamicTeacher`: ``dt(x)`` is the teacher, ``dt.student(x)`` the
        student as a function of the teacher's parameters, ``dt.report`` the expansion report.

    Raises:
        ExpandInputError: ``model`` is not an ``nn.Module`` or is a teacher already, ``ratio`` or
            ``noise`` is out of range, or the model fails on ``example_inputs``.
        TraceError: the model cannot be captured: with ``frontend="auto"`` the message holds
            both front ends' reasons (FX's failing line, export's error) and the fix.
        UnsupportedOpError: ``strict=True`` and an op (a custom ``autograd.Function`` included)
            has no rule.

    Example:
        >>> import torch, torchvision, gpd_fx
        >>> m = torchvision.models.resnet18(num_classes=10)
        >>> dt = gpd_fx.expand(m, ratio=2, example_inputs=(torch.randn(1, 3, 32, 32),))
        >>> dt.report.expanded_flop_fraction > 0.95
        True
    """
    t0 = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise ExpandInputError(
            f"expand takes the student as an nn.Module instance, got {type(model).__name__} {model!r:.60}. "
            "Build the model first and pass it, e.g. expand(torchvision.models.resnet18(num_classes=10), 2, "
            "example_inputs=(torch.randn(1, 3, 224, 224),)); the CLI's model specs (torchvision:resnet18) "
            "are for gpd-fx only")
    if isinstance(model, DynamicTeacher) or any(isinstance(m, DynamicTeacher) for m in model.modules()):
        raise ExpandInputError("this model is already an expanded teacher; expand the original student "
                               "(or gpd_fx.fold(dt) it first)")
    if isinstance(ratio, bool) or not isinstance(ratio, int) or ratio < 1:
        raise ExpandInputError(f"ratio must be an integer >= 1, got {ratio!r}")
    _check_noise(noise)
    if frontend not in FRONTENDS:
        raise ExpandInputError(f"frontend must be one of {', '.join(map(repr, FRONTENDS))}, got {frontend!r}")
    inputs = _as_inputs(example_inputs)
    # --- scope= (issue 14): partial expansion, in gpd_fx.scope ---
    if scope is not None:
        from gpd_fx.scope import expand_scoped   # imports this module: a load-time import would circle

        with rng_untouched():
            dt = expand_scoped(model, ratio, inputs, scope, verify_dtype=verify_dtype, noise=noise, seed=seed,
                               strict=strict, leaf_modules=leaf_modules, concrete_args=concrete_args,
                               extra_rules=extra_rules, branches=branches, progress=progress, frontend=frontend)
        dt.report.seconds = time.perf_counter() - t0
        return dt
    # --- end scope= ---
    # Building runs the model and its random ops (dropout) under fixed seeds, which would set the
    # process-wide generators; the user's random stream continues as if expand had not run.
    with rng_untouched():
        dt = _expand(model, ratio, inputs, noise, seed, strict, leaf_modules, concrete_args, extra_rules,
                     branches, verify_dtype, progress, frontend)
    dt.report.seconds = time.perf_counter() - t0
    return dt


def _check_noise(noise) -> None:
    if isinstance(noise, bool) or not isinstance(noise, numbers.Real) or not math.isfinite(noise) \
            or not 0 <= noise <= MAX_NOISE:
        raise ExpandInputError(
            f"noise must be a finite number in [0, {MAX_NOISE:g}] (the std of the symmetry-breaking noise "
            f"relative to each weight's std; 0 turns it off; the default is 0.1), got {noise!r}")


def _expand(model, ratio, inputs, noise, seed, strict, leaf_modules, concrete_args, extra_rules, branches,
            verify_dtype, progress, frontend="auto", wide_inputs=None, wide_outputs=False) -> DynamicTeacher:
    """:func:`expand` after its argument checks. ``wide_inputs`` / ``wide_outputs`` (used by
    ``scope=`` for connected scopes): ``{input tensor position: dim}`` taken widened through a
    port (``passes/ports.py``), and whether another scope reads the outputs through one (see
    ``Builder.run``)."""
    concrete_args = _none_defaults(model, inputs, concrete_args)
    load_lazy_rules()
    orig_dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    with _eval_mode(model):
        work, probe = _probe_model(model, inputs, verify_dtype)
        probe_dtype = verify_dtype or orig_dtype
        tol = TOL.get(probe_dtype, 1e-3)
        extra = make_registry(extra_rules)
        gm, front = _capture(work, model, leaf_modules, concrete_args, extra, probe, frontend)
        if front.export_info is not None:
            tol, note = _graph_tolerance(tol, probe_dtype, front.export_info.float_dtypes)
            front.notes += [note] if note else []
        builder = Builder(gm, ratio, noise=float(noise), seed=seed, strict=strict, tol=tol, extra_rules=extra)
        with torch.no_grad():
            result = builder.run(probe, progress=progress, wide_inputs=wide_inputs, wide_outputs=wide_outputs)
        if front.export_info is not None:
            restore_call_convention(result.graph_module, front.export_info)
        train_result = train_gm = None
        if gm.meta.get("gpd_root_mode_dependent"):
            train_result = _build_train_graph(work, model, leaf_modules, concrete_args, ratio, noise, seed,
                                              strict, tol, extra, probe, wide_inputs, wide_outputs)
        elif front.export_info is not None:
            train_gm = _export_train_graph(work, probe, extra, gm)
            if train_gm is not None:
                front.notes.append("the model's Python differs in train mode (stochastic depth, attention dropout): "
                                   "a second capture in train mode serves dt.train()")
                builder = Builder(train_gm, ratio, noise=float(noise), seed=seed, strict=strict, tol=tol,
                                  extra_rules=extra)
                with torch.no_grad():
                    train_result = builder.run(probe, wide_inputs=wide_inputs, wide_outputs=wide_outputs)
                restore_call_convention(train_result.graph_module, front.export_info)
    teacher = result.graph_module
    tie_shared_parameters(model, teacher, result.sources)
    n_branch = 0
    if branches != () and branches != []:
        from gpd_fx.passes.cbr import add_branches
        n_branch = add_branches(teacher, result.sources, branches, seed=seed)
        if train_result is not None:
            known = {s.student_name for s in result.sources}
            add_branches(train_result.graph_module,
                         [s for s in train_result.sources if s.student_name not in known], branches, seed=seed)
    # The lockstep check saw each node as it was built; this runs the finished graph once,
    # which catches anything a later node changed (a module widened again, the branch rewrite).
    with _eval_mode(model):
        verify_output(teacher, work, probe, tol)
    train_teacher = None
    if train_result is not None:
        # tied parameters: one source per student parameter in the train graph too
        tie_shared_parameters(model, train_result.graph_module, train_result.sources)
        try:
            train_teacher = share_with(train_result.graph_module, teacher, result.sources, train_result.sources)
        except VerificationError as e:
            if train_gm is None:
                raise
            # the two export captures widened a layer differently: one teacher cannot serve both;
            # the eval-mode capture (its mode flags live) serves dt.train() too, and the report says so
            front.notes[-1] = (f"a train-mode capture differs but could not share the teacher's parameters "
                               f"({_first_line(e)}); dt.train() follows the eval-mode capture")
            train_result = train_gm = None
    if train_result is not None:
        with _eval_mode(model):
            if train_gm is not None:
                # the train capture's Python-level train behaviour (random ops included) is baked
                # into both graphs: compare them on the same random stream
                restore_call_convention(train_gm, front.export_info)
                verify_output(train_teacher, train_gm, probe, tol, seed=0)
            else:
                work.training = True   # the root's own branch only; submodules stay in eval mode
                verify_output(train_teacher, work, probe, tol)
        train_teacher = train_teacher.to(orig_dtype)
    teacher = teacher.to(orig_dtype)
    own_tensors(model, teacher, train_teacher)
    mapped = {s.student_name for s in result.sources}
    template = _template_of(model, mapped)
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    report = ExpansionReport(
        ratio=ratio,
        boundaries=[b.node for b in result.boundaries],
        boundary_reasons={b.node: f"{b.op}: {b.reason}" for b in result.boundaries},
        fallbacks={b.node: f"{b.op}: {b.reason}" for b in result.fallbacks},
        expanded_flop_fraction=(result.expanded_flops / result.total_flops) if result.total_flops else 1.0,
        student_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        teacher_params=sum(p.numel() for p in teacher.parameters() if p.requires_grad),
        student_flops=result.total_flops,
        max_rel_error=result.max_rel_error,
        permutations=result.permutations,
        runtime_widenings=result.runtime_widenings,
        branch_layers=n_branch,
        probe_dtype=str(probe_dtype).replace("torch.", ""),
        size_guards=sorted({str(n.args[2]) for n in teacher.graph.nodes if n.target is shape_guard}),
        coupling_graph=result.coupling,
        coupling_groups=_components(result.coupling),
        teacher_cost_fn=_cbr_cost(teacher, inputs) if n_branch else None,
        frontend=front.name,
        frontend_notes=front.notes,
        tolerance=tol,
    )
    config = dict(ratio=ratio, noise=noise, seed=seed, strict=strict,
                  branches=list(branches) if isinstance(branches, (list, tuple)) else branches)
    dt = DynamicTeacher(teacher, template, result.sources, buffers, report, config, train_teacher=train_teacher)
    dt.train(model.training)
    return dt


def _cbr_cost(teacher, inputs):
    import functools

    from gpd_fx.passes.cbr import teacher_cost

    return functools.partial(teacher_cost, teacher, inputs)   # report.teacher_cost, on first access


def _none_defaults(model: nn.Module, inputs: tuple, concrete_args: dict[str, Any] | None) -> dict[str, Any] | None:
    """``concrete_args`` plus ``None`` for every ``forward`` parameter that the example inputs
    leave at a ``None`` default.

    fx turns such a parameter into a proxy, on which ``if mask is not None:`` is true: the graph
    would hold the branch that the example run (and every run without that argument) does not
    take, and the verification would feed it None (timm's Hiera: ``mask.view`` on None).
    Pinned, fx traces the branch actually taken and asserts at run time that it stays None.
    """
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return concrete_args
    pinned = dict(concrete_args or {})
    for p in params[len(inputs):]:
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) \
                and p.default is None and p.name not in pinned:
            pinned[p.name] = None
    return pinned or concrete_args


def _map_leaf_instances(model, work, leaf_modules):
    """Leaf *instances* given for the user's model, translated to the working copy."""
    if not leaf_modules:
        return leaf_modules
    names = {id(m): n for n, m in model.named_modules()}
    out = []
    for x in leaf_modules:
        if isinstance(x, nn.Module):
            if id(x) not in names:
                raise ExpandInputError(f"leaf module {type(x).__name__} is not a submodule of the model")
            out.append(work.get_submodule(names[id(x)]))
        else:
            out.append(x)
    return out


def _template_of(model: nn.Module, mapped: set[str]) -> nn.Module:
    """A copy of the user's module whose mapped parameters are meta tensors (no data copied)."""
    memo = {}
    params = dict(model.named_parameters(remove_duplicate=False))
    for name in mapped:
        p = params.get(name)
        if p is not None:
            memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad)
    return copy.deepcopy(model, memo)


def _trace_student(work, model, leaf_modules, concrete_args, extra, probe):
    """Trace the working copy; timm's no-trace modules without a rule of their own (here or in
    the user's registry ``extra``) are opened, their shape-dependent Python decided on the
    probe inputs (and guarded at run time). Submodules whose type has a user rule stay single
    nodes, so that the rule (not fx tracing into their forward) expands them."""
    leaves = list(_map_leaf_instances(model, work, leaf_modules) or [])
    leaves += [m for name, m in work.named_modules() if name and has_user_module_rule(m, extra)]
    return trace(work, leaf_modules=leaves or leaf_modules, concrete_args=concrete_args,
                 example_inputs=probe, has_rule=lambda m: has_module_rule(m, extra))


FRONTENDS = ("auto", "fx", "export")


@dataclass
class _Capture:
    name: str
    notes: list[str]
    export_info: ExportInfo | None = None


def _capture(work, model, leaf_modules, concrete_args, extra, probe, frontend: str):
    """The student graph from the chosen front end (``auto``: FX, else ``torch.export``)."""
    fx_error = None
    if frontend in ("fx", "auto"):
        try:
            return _trace_student(work, model, leaf_modules, concrete_args, extra, probe), _Capture("fx", [])
        except TraceError as e:
            if frontend == "fx":
                raise
            fx_error = e
    try:
        gm, info = export_graph(work, probe, has_rule=lambda m: has_module_rule(m, extra))
    except TraceError as e:
        if fx_error is None:
            raise
        raise TraceError(
            f"neither front end can capture {type(model).__name__}.\n"
            f"torch.fx: {fx_error}\n"
            f"torch.export: {e}\n"
            "Fix: make the failing code traceable by one of them (torch.export's message names the guard "
            "or the unsupported construct; for FX pass the submodule that holds the failing line as a "
            "leaf_modules entry and register a rule for it), or expand the traceable submodules one by "
            "one.") from e
    notes = []
    if fx_error is not None:
        notes.append(f"torch.export captured the model because {_first_line(fx_error)}")
    if info.kept_aten:
        notes.append("ATen ops without a rule, run at student width where their inputs are: "
                     + ", ".join(f"{k} x{v}" for k, v in sorted(info.kept_aten.items())))
    return gm, _Capture("export", notes, info)


def _graph_tolerance(tol: float, probe_dtype, dtypes) -> tuple[float, str | None]:
    """The verification tolerance of a graph that computes in a less precise dtype than the
    probe (a float64 check of a model that casts to float32 inside, like Llama's RMSNorm):
    a 1e-16 difference upstream of such a cast can flip the cast's last bit, so the outputs
    agree only to that dtype's rounding."""
    worst = max((TOL.get(d, tol) for d in dtypes or ()), default=tol)
    if worst <= tol:
        return tol, None
    low = [str(d).replace("torch.", "") for d in dtypes if TOL.get(d, tol) > tol]
    return worst, (f"the model computes in {', '.join(sorted(low))} inside a "
                   f"{str(probe_dtype).replace('torch.', '')} probe: verified to {worst:g}")


def _export_train_graph(work, probe, extra, eval_gm):
    """The model captured by ``torch.export`` in train mode, or ``None`` when it computes the
    same ops as the eval-mode capture (its mode flags are live, so one graph serves both).
    Export runs on fake tensors; buffers are restored all the same (BN running statistics)."""
    saved = {n: b.detach().clone() for n, b in work.named_buffers()}
    flags = [(m, m.training) for m in work.modules()]
    work.train()
    try:
        train_gm, _ = export_graph(work, probe, has_rule=lambda m: has_module_rule(m, extra))
    finally:
        for m, f in flags:
            m.training = f
        with torch.no_grad():
            for n, b in work.named_buffers():
                b.copy_(saved[n])
    if graph_signature(train_gm) == graph_signature(eval_gm):
        return None
    return train_gm


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _build_train_graph(work, model, leaf_modules, concrete_args, ratio, noise, seed, strict, tol,
                       extra, probe, wide_inputs=None, wide_outputs=False):
    """The teacher of a model whose own forward depends on the mode (GoogLeNet/Inception-v3
    return aux logits in train mode): traced with the root in train mode, built like the other."""
    flag = work.training
    work.training = True
    try:
        gm = _trace_student(work, model, leaf_modules, concrete_args, extra, probe)
    finally:
        work.training = flag
    if hasattr(gm, MODE_ATTR):
        getattr(gm, MODE_ATTR).training = False   # submodules run in eval mode while building
    builder = Builder(gm, ratio, noise=float(noise), seed=seed, strict=strict, tol=tol, extra_rules=extra)
    work.training = True
    try:
        with torch.no_grad():
            return builder.run(probe, wide_inputs=wide_inputs, wide_outputs=wide_outputs)
    finally:
        work.training = flag


def _components(graph) -> int:
    import networkx as nx

    return nx.number_connected_components(graph) if graph is not None and len(graph) else 0
