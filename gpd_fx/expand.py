"""``gpd_fx.expand``: trace a student and build its exact dynamic teacher (IR, then CBR)."""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
import numbers
import time
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from gpd_fx.errors import ExpandInputError, VerificationError
from gpd_fx.passes import rules as _rules  # noqa: F401  (registers the built-in rules)
from gpd_fx.passes.registry import has_module_rule, load_lazy_rules, make_registry
from gpd_fx.passes.trace import MODE_ATTR, shape_guard, trace
from gpd_fx.passes.widen import Builder, _get_path, _set_path
from gpd_fx.teacher import DynamicTeacher, ExpansionReport

__all__ = ["expand"]

# Self-verification tolerance, relative to the largest student output magnitude. In float64
# (eps 1.1e-16) the teacher's sums have r times more terms in a different order; even for deep
# nets with ~1e5-term reductions the rounding stays below ~1e-11, so 1e-9 leaves two orders of
# headroom while a wrong rule (errors of order 1) cannot pass. In float32 (eps 6e-8) the same
# reasoning gives ~1e-5..1e-4 (dot products of up to ~2e4 terms, sqrt(n)*eps per layer), so
# float32 is checked at 1e-3: still orders below the O(1e-1) error of a wrong rule.
TOL = {torch.float64: 1e-9, torch.float32: 1e-3, torch.bfloat16: 3e-2, torch.float16: 1e-2}

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
            raise ExpandInputError(
                f"the model fails on the example inputs {shapes}: {type(e).__name__}: {e}. "
                "Pass inputs that the model accepts, e.g. example_inputs=(torch.randn(1, 3, 224, 224),)") from e
    return work, inputs


def expand(model: nn.Module, ratio: int = 2, example_inputs: Tensor | Sequence[Any] | None = None, *,
           noise: float = 0.1, seed: int = 0, strict: bool = False,
           leaf_modules: Iterable[type | nn.Module] | None = None,
           concrete_args: dict[str, Any] | None = None,
           extra_rules: dict[Any, Callable] | None = None,
           branches: Sequence[str] | dict[str, Sequence[str]] | None = None,
           verify_dtype: torch.dtype | None = None, progress: bool = False) -> DynamicTeacher:
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
        branches: multi-branch kinds for the teacher's conv/linear layers (CBR): ``()`` for IR only,
            ``None`` for every kind that applies, a list of kinds, or ``{"conv": [...], "linear": [...]}``.
        verify_dtype: dtype of the self-verification (e.g. ``torch.float64`` for a check at
            1e-9 on a converted copy). ``None`` builds and checks in the model's own dtype, which
            is what keeps a 200M-parameter teacher within seconds and memory.
        progress: show a progress bar over the graph's nodes.

    Returns:
        A :class:`~gpd_fx.DynamicTeacher`: ``dt(x)`` is the teacher, ``dt.student(x)`` the
        student as a function of the teacher's parameters, ``dt.report`` the expansion report.

    Raises:
        ExpandInputError: ``model`` is not an ``nn.Module`` or is a teacher already, ``ratio`` or
            ``noise`` is out of range, or the model fails on ``example_inputs``.
        TraceError: ``torch.fx`` cannot trace the model (the message names the line).
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
    inputs = _as_inputs(example_inputs)
    # Building runs the model and its random ops (dropout) under fixed seeds, which would set the
    # process-wide generators; the user's random stream continues as if expand had not run.
    with _rng_untouched():
        dt = _expand(model, ratio, inputs, noise, seed, strict, leaf_modules, concrete_args, extra_rules,
                     branches, verify_dtype, progress)
    dt.report.seconds = time.perf_counter() - t0
    return dt


def _check_noise(noise) -> None:
    if isinstance(noise, bool) or not isinstance(noise, numbers.Real) or not math.isfinite(noise) \
            or not 0 <= noise <= MAX_NOISE:
        raise ExpandInputError(
            f"noise must be a finite number in [0, {MAX_NOISE:g}] (the std of the symmetry-breaking noise "
            f"relative to each weight's std; 0 turns it off; the default is 0.1), got {noise!r}")


@contextlib.contextmanager
def _rng_untouched():
    """Restore the CPU generator and every initialised CUDA generator on exit.

    CUDA generators are saved only when CUDA is initialised already: saving them would otherwise
    start a CUDA context for a CPU-only expand, and a CUDA model initialises it before this point.
    """
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        yield


def _expand(model, ratio, inputs, noise, seed, strict, leaf_modules, concrete_args, extra_rules, branches,
            verify_dtype, progress) -> DynamicTeacher:
    concrete_args = _none_defaults(model, inputs, concrete_args)
    load_lazy_rules()
    orig_dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    with _eval_mode(model):
        work, probe = _probe_model(model, inputs, verify_dtype)
        probe_dtype = verify_dtype or orig_dtype
        tol = TOL.get(probe_dtype, 1e-3)
        extra = make_registry(extra_rules)
        gm = _trace_student(work, model, leaf_modules, concrete_args, extra, probe)
        builder = Builder(gm, ratio, noise=float(noise), seed=seed, strict=strict, tol=tol, extra_rules=extra)
        with torch.no_grad():
            result = builder.run(probe, progress=progress)
        train_result = None
        if gm.meta.get("gpd_root_mode_dependent"):
            train_result = _build_train_graph(work, model, leaf_modules, concrete_args, ratio, noise, seed,
                                              strict, tol, extra, probe)
    teacher = result.graph_module
    _tie_shared_parameters(model, teacher, result.sources)
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
        _verify_again(teacher, work, probe, tol)
    train_teacher = None
    if train_result is not None:
        train_teacher = _share_with(train_result.graph_module, teacher, result.sources, train_result.sources)
        with _eval_mode(model):
            work.training = True   # the root's own branch only; submodules stay in eval mode
            _verify_again(train_teacher, work, probe, tol)
        train_teacher = train_teacher.to(orig_dtype)
    teacher = teacher.to(orig_dtype)
    _own_tensors(model, teacher, train_teacher)
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


def _own_tensors(model: nn.Module, *graphs: nn.Module | None) -> None:
    """Give the teacher its own copy of every parameter and buffer that shares memory with the
    user's model.

    Rules keep tensors that need no widening as they are (the bias of a classifier whose output
    stays at student width), so an optimiser step on the teacher, or a BN update in train mode,
    would write into the user's module. Copying here, after every rule and the multi-branch
    rewrite ran, covers user rules too. One copy is made per distinct view
    of the user's memory, so tensors that are one in the teacher (tied weights) stay one.
    """
    theirs = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())
              if t.device.type != "meta" and t.untyped_storage().nbytes()}
    copies: dict[tuple, Tensor] = {}
    for g in graphs:
        if g is None:
            continue
        for mod in g.modules():
            for store in (mod._parameters, mod._buffers):
                for name, t in store.items():
                    if t is None or t.device.type == "meta" or t.untyped_storage().data_ptr() not in theirs:
                        continue
                    key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(),
                           t.dtype, isinstance(t, nn.Parameter))
                    if key not in copies:
                        own = t.detach().clone()
                        copies[key] = nn.Parameter(own, t.requires_grad) if isinstance(t, nn.Parameter) else own
                    store[name] = copies[key]


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
    probe inputs (and guarded at run time)."""
    return trace(work, leaf_modules=_map_leaf_instances(model, work, leaf_modules), concrete_args=concrete_args,
                 example_inputs=probe, has_rule=lambda m: has_module_rule(m, extra))


def _build_train_graph(work, model, leaf_modules, concrete_args, ratio, noise, seed, strict, tol,
                       extra, probe):
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
            return builder.run(probe)
    finally:
        work.training = flag


def _share_with(train_gm, teacher, sources, train_sources):
    """Make the train-mode graph use the eval graph's modules and parameters wherever both have
    the same target, and give the eval graph's root the train-only ones, so that one set of
    teacher parameters serves both modes and every student-map source resolves from ``teacher``."""
    def own(target):
        return not target.startswith(("_gpd_index", MODE_ATTR))

    for node in train_gm.graph.nodes:
        if node.op not in ("call_module", "get_attr") or not own(node.target):
            continue
        parent, _, name = node.target.rpartition(".")
        try:
            shared = teacher.get_submodule(node.target) if node.op == "call_module" else \
                _get_path(teacher, node.target)
        except AttributeError:
            shared = None
        holder = train_gm.get_submodule(parent) if parent else train_gm
        mine = getattr(holder, name)
        if shared is not None and _shapes(mine) != _shapes(shared):
            raise VerificationError(
                f"the train-mode graph widened {node.target} differently from the eval-mode graph "
                f"({_shapes(mine)} vs {_shapes(shared)}); expand the model with aux outputs disabled")
        if shared is not None:
            if isinstance(shared, nn.Parameter):
                holder.register_parameter(name, shared)
            elif isinstance(shared, Tensor):
                holder.register_buffer(name, shared)
            else:
                setattr(holder, name, shared)
        else:
            _set_path(teacher, node.target, mine)
    known = {s.student_name for s in sources}
    sources.extend(s for s in train_sources if s.student_name not in known)
    return train_gm


def _shapes(obj):
    from gpd_fx.passes.branches import _Branched

    if isinstance(obj, Tensor):
        return tuple(obj.shape)
    if isinstance(obj, _Branched):   # compare by the folded kernel a plain layer would hold
        return {"weight": tuple(obj.weight.shape), **({"bias": tuple(obj.bias.shape)} if obj.bias is not None else {})}
    if isinstance(obj, nn.Module):
        return {k: tuple(v.shape) for k, v in obj.state_dict().items()}
    return None


def _tie_shared_parameters(model: nn.Module, teacher: nn.Module, sources: list) -> None:
    """One teacher parameter (and one student-map source) per student parameter.

    A parameter held by two modules (tied weights) is widened at each use; when both uses got
    the same channel maps, the second teacher tensor is replaced by the first, so the tie holds
    in the teacher too. Otherwise the first use's map defines the student and the other teacher
    copy trains the teacher only.
    """
    canonical: dict[int, str] = {}
    alias: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        alias[name] = canonical.setdefault(id(p), name)
    by_name = {s.student_name: s for s in sources}
    keep = []
    for src in sources:
        first = alias.get(src.student_name, src.student_name)
        if first == src.student_name or first not in by_name:
            keep.append(src)
            continue
        ref = by_name[first]
        if _same_map(src, ref):
            holder = teacher.get_submodule(src.module) if src.module else teacher
            ref_holder = teacher.get_submodule(ref.module) if ref.module else teacher
            if getattr(holder, src.attr).shape == getattr(ref_holder, ref.attr).shape:
                setattr(holder, src.attr, getattr(ref_holder, ref.attr))
    sources[:] = keep


def _same_map(a, b) -> bool:
    def eq(x, y):
        if x is None or y is None:
            return x is y
        return all(torch.equal(u, v) if isinstance(u, Tensor) else u == v for u, v in zip(x, y))
    return eq(a.out, b.out) and eq(a.inp, b.inp) and a.scale == b.scale


def _components(graph) -> int:
    import networkx as nx

    return nx.number_connected_components(graph) if graph is not None and len(graph) else 0


def _verify_again(teacher, work, probe, tol) -> None:
    from gpd_fx.passes.widen import _compare_tree

    with torch.no_grad():
        t = teacher(*probe)
        s = work(*probe)
    class _N:  # a stand-in carrying a name for the message
        name = "output (after multi-branch rewrite)"
    _compare_tree(t, s, _N, tol)
