"""One measurement: build a zoo model, expand it, and check the teacher against the student.

:func:`measure` never raises: every outcome (exact, not exact, skipped for memory, an error at
some stage) is a :class:`Row`. Exactness is judged against the project's one tolerance table,
:data:`gpd_fx.passes.widen_verify.TOL`, independently of ``expand``'s own self-verification.
"""

from __future__ import annotations

import copy
import math
import resource
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gpd_fx.passes.widen_verify import TOL

from .checks import model_kind, randomize_constants, rel_error, tree_tensors, zero_dropout
from .specs import BATCH, DEFAULT_IMAGE, Spec

__all__ = ["CNN_SHARE", "TRANSFORMER_SHARE", "UNDER_WIDENED", "Row", "activation_numel", "estimate_gib",
           "mem_available_gib", "measure", "timm_fx_check"]

GIB = 2 ** 30
CNN_SHARE = 0.95     # issue 2: every CNN expands at least this share of its FLOPs
TRANSFORMER_SHARE = 0.9  # issue 3: transformers (and every timm family) at least this share
# IR (no branches) gives every expanded weight r^2 times the parameters; only the kept input side
# of the stem and the 10-class head grow by r alone, so a healthy teacher is above ~0.95 r^2.
UNDER_WIDENED = 0.85
# Bytes of working memory per teacher parameter, in units of the dtype's size: the widened
# weights, the noise/interleave temporaries while a layer is widened, the verification copy.
# Measured peak RSS on the torchvision zoo (IR only): twice the student's weights + ~0.6 GiB of
# interpreter and libraries + 1.2-1.9x the teacher's weights, the factor falling with size
# (1.2-1.5 for the 2-4 GiB teachers that come near the gate, e.g. regnet_y_32gf, efficientnet_v2_l).
WEIGHT_FACTOR = 1.5
BASE_GIB = 0.6
BRANCH_FACTOR = 1.5  # CBR: a kxk conv gains 1x1, 1x1->kxk, avg-pool branches (~1.5x its weights)


@dataclass
class Row:
    """One model at one ratio: the outcome of :func:`measure` (a row of the zoo table, JSON-ready)."""

    name: str
    source: str
    ratio: int
    family: str = ""
    task: str = "classification"
    status: str = "ok"            # ok | skipped | error | timeout | crashed
    reason: str = ""
    kind: str = ""                # cnn | transformer (attention inside)
    kind_evidence: str = ""
    input: str = ""
    dtype: str = ""
    tol: float | None = None
    traced: bool | None = None
    frontend: str = ""            # fx | export: the capture that ran (expand's report)
    timm_fx: bool | None = None   # timm's own FX trace (torchvision feature extractor) reproduces it
    timm_fx_reason: str = ""
    exact_eval: bool | None = None
    exact_train: bool | None = None
    err_eval: float | None = None
    err_train: float | None = None
    err_student: float | None = None   # dt.student(x) vs model(x), eval mode
    train_note: str = ""
    share: float | None = None
    n_boundaries: int | None = None
    boundary_reasons: dict = field(default_factory=dict)
    fallbacks: dict = field(default_factory=dict)
    branch_layers: int | None = None
    runtime_widenings: int | None = None  # kept tensors widened in forward (report.runtime_widenings)
    expand_s: float | None = None
    check_s: float | None = None
    student_params: int | None = None
    teacher_params: int | None = None
    est_gib: float | None = None
    peak_rss_gib: float | None = None
    fold_exact: bool | None = None
    export_ok: bool | None = None
    onnx_agrees: bool | None = None
    fold_note: str = ""
    error_type: str = ""
    error_where: str = ""
    repro: str = ""
    note: str = ""
    # detection (expand's scope=): the scopes, their own expanded FLOP share (``share`` is the
    # whole model's), the whole outputs compared directly (``err_*`` is the check through the
    # scopes, gpd_fx.scope.ScopeCheck), and the model's detections per image in eval mode
    scope: str = ""
    scope_share: float | None = None
    direct_eval: float | None = None
    direct_train: float | None = None
    boxes: list | None = None
    scope_params: list | None = None    # [student, teacher] parameters inside the scopes

    @property
    def exact(self) -> bool:
        return bool(self.exact_eval and self.exact_train)

    @property
    def under_widened(self) -> bool:
        """Teacher has < UNDER_WIDENED * r^2 the student's parameters (e.g. weights kept at student
        size and widened at run time: tied copies, no extra capacity)."""
        student, teacher = self.scope_params if self.scope_params else (self.student_params, self.teacher_params)
        if not teacher or not student:
            return False
        return teacher < UNDER_WIDENED * self.ratio ** 2 * student




def estimate_gib(model_meta: nn.Module, ratio: int, itemsize: int, branches: bool,
                 act_numel: int = 0, scopes: list[nn.Module] | None = None) -> float:
    """Peak memory (GiB) of one expand + checks, from parameter counts on the meta device.

    student weights (x2: the model and the student map's copy) + teacher weights (student * r^2,
    plus CBR branches on kxk convs) * WEIGHT_FACTOR + one more teacher-sized copy of the largest
    weight (the weight rule builds its noise next to the gathered copy: VGG's 25088x4096
    classifier peaked at 11.2 GiB against 8.3 estimated without this term, r2 float64)
    + activations (student + teacher widths) + BASE_GIB.

    With ``scopes`` (``expand(..., scope=...)``): the model x3 (the model, expand's working copy
    and the teacher's copy of the rest), and the teacher terms over the scopes' weights only.
    Pass no activations then: a detector does not run on the meta device (the zoo's detector
    inputs are small).
    """
    p_all = sum(p.numel() for p in model_meta.parameters())
    parts = [model_meta] if scopes is None else scopes
    ps = [p for m in parts for p in m.parameters()]
    p_max = max((p.numel() for p in ps), default=0)
    p_kxk = sum(m.weight.numel() for part in parts for m in part.modules()
                if isinstance(m, nn.modules.conv._ConvNd) and math.prod(m.kernel_size) > 1)
    teacher = ratio ** 2 * (sum(p.numel() for p in ps) + (BRANCH_FACTOR * p_kxk if branches else 0))
    copies = 2 if scopes is None else 3
    bytes_ = itemsize * (copies * p_all + WEIGHT_FACTOR * teacher + ratio ** 2 * p_max + (1 + ratio) * act_numel)
    return bytes_ / GIB + BASE_GIB


def activation_numel(model_meta: nn.Module, x_shape: tuple | list[tuple]) -> int:
    """Sum of every leaf module's output elements for one forward on the meta device (0 if it fails).

    ``x_shape``: the input's shape, or a list of shapes for a model with several inputs."""
    shapes = x_shape if isinstance(x_shape, list) else [x_shape]
    total = [0]

    def hook(_m, _i, out):
        total[0] += sum(t.numel() for t in tree_tensors(out))

    hs = [m.register_forward_hook(hook) for m in model_meta.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            model_meta.eval()(*(torch.empty(s, device="meta") for s in shapes))
    except Exception:
        total[0] = 0
    finally:
        for h in hs:
            h.remove()
    return total[0]


def mem_available_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 / GIB
    except OSError:
        pass
    return math.inf


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return f"{type(e).__name__}: {s.splitlines()[0] if s else ''}"[:500]


def _where(e: BaseException) -> str:
    """Innermost frame in gpd_fx/passes (where a library failure surfaced)."""
    frames = traceback.extract_tb(e.__traceback__)
    # the library's frames, not this measurement's own (it calls everything)
    ours = [f for f in frames if ("/passes/" in f.filename or "/gpd_fx/" in f.filename)
            and "/gpd_fx/testing/" not in f.filename]
    f = (ours or frames or [None])[-1]
    return f"{Path(f.filename).name}:{f.lineno} in {f.name}" if f else ""


def _repro(spec: Spec, ratio: int, size: int, dtype: torch.dtype) -> str:
    if spec.source == "torchvision":
        kw = dict(spec.kwargs)
        if spec.task != "optical_flow":
            kw.setdefault("num_classes", 10)
        if spec.task in ("segmentation", "detection"):
            kw.setdefault("weights_backbone", None)
        build = (f"torchvision.models.get_model({spec.name!r}, weights=None"
                 + "".join(f", {k}={v!r}" for k, v in kw.items()) + ")")
        imp = "import torch, torchvision, gpd_fx"
    else:
        build = (f"timm.create_model({spec.name!r}, pretrained=False, num_classes=10"
                 + "".join(f", {k}={v!r}" for k, v in spec.kwargs.items()) + ")")
        imp = "import torch, timm, gpd_fx"
    d = "double" if dtype == torch.float64 else "float"
    if spec.scope:
        return (f"import torch, torchvision, gpd_fx; from gpd_fx.testing import randomize_constants; "
                f"from gpd_fx.testing.detection import prepare_detector, detection_images; "
                f"m = prepare_detector({build}, {size}).{d}().eval(); randomize_constants(m); "
                f"dt = gpd_fx.expand(m, {ratio}, (detection_images({BATCH}, {size}, torch.{str(dtype)[6:]}),), "
                f"scope={list(spec.scope)}); print(dt.report, dt.verification.summary())")
    xs = ", ".join(f"torch.randn{s}.{d}()" for s in spec.input_shapes(size))
    return (f"{imp}; m = {build}.{d}(); xs = ({xs},); "
            f"dt = gpd_fx.expand(m, ratio={ratio}, example_inputs=xs); print(dt.report)")


def _timm_pick_size(spec: Spec, target: int | None) -> tuple[dict, int, str, int]:
    """(kwargs, image size, note, channels) for a timm model: the smallest input it runs with."""
    import timm

    cfg = timm.get_pretrained_cfg(spec.name)
    cfg = cfg.to_dict() if cfg is not None else {}
    default = int(cfg.get("input_size", (3, 224, 224))[-1])
    fixed = bool(cfg.get("fixed_input_size", False))
    sizes = [target] if target else [64, 96, 128, 160, 192, 224]
    sizes = sorted({s for s in sizes if s <= default} | {default}) if not target else sizes
    in_chans = int(cfg.get("input_size", (3,))[0])
    with torch.device("meta"):
        try:
            timm.create_model(spec.name, pretrained=False, num_classes=10, img_size=sizes[0])
            takes_img_size = True
        except TypeError as e:
            takes_img_size = "img_size" not in str(e)
        except Exception:
            takes_img_size = True  # failed for another reason; the real build will tell
    last = ""
    for s in sizes:
        kw = {"img_size": s} if takes_img_size and s != default else {}
        if not takes_img_size and fixed and s != default:
            continue
        try:
            m = timm.create_model(spec.name, pretrained=False, num_classes=10, **kw)
            with torch.no_grad():
                m.eval()(torch.randn(BATCH, in_chans, s, s))
                m.train()(torch.randn(BATCH, in_chans, s, s))
            del m
            return kw, s, ("img_size" if kw else ("fixed input size" if fixed else "")), in_chans
        except Exception as e:
            last = _first_line(e)
    raise RuntimeError(f"builds/runs at none of the sizes {sizes}: {last}")


def timm_fx_check(model: nn.Module, x: Tensor) -> tuple[bool, str]:
    """Can timm itself FX-trace the model? As timm's own ``test_model_forward_fx`` does it:

    torchvision's ``create_feature_extractor`` with timm's no-trace modules/functions as leaves,
    returning the last node, and the traced output must equal the model's (eval mode).
    """
    from timm.layers import get_notrace_functions, get_notrace_modules
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    was = model.training
    kw = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(),
              param_shapes_constant=True)
    try:
        train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=kw)
        fxm = create_feature_extractor(model, train_return_nodes=[train_nodes[-1]],
                                       eval_return_nodes=[eval_nodes[-1]], tracer_kwargs=kw)
        model.eval()
        fxm.eval()
        with torch.no_grad():
            out = model(x)
            fx_out = tuple(fxm(x).values())
        out = torch.cat(out) if isinstance(out, tuple) else out
        fx_out = torch.cat(fx_out) if len(fx_out) > 1 else fx_out[0]
        if fx_out.shape != out.shape or not torch.equal(fx_out, out):
            return False, "traced graph output differs from the model's"
        return True, ""
    except Exception as e:
        return False, _first_line(e)
    finally:
        model.train(was)


def _check_fold(dt, model: nn.Module, xs: tuple[Tensor, ...], tol: float, row: Row) -> None:
    import gpd_fx

    try:
        folded = gpd_fx.fold(dt)
        folded.eval()
        dt.eval()
        with torch.no_grad():
            e1, why = rel_error(folded(*xs), dt.student(*xs))
            e2, _ = rel_error(folded(*xs), model.eval()(*xs))
        row.fold_exact = e1 <= tol and e2 <= tol and type(folded) is type(model)
        if not row.fold_exact:
            row.fold_note = f"fold vs dt.student {e1:.2e}, vs model {e2:.2e} {why}".strip()
    except Exception as e:
        row.fold_exact = False
        row.fold_note = f"fold: {_first_line(e)}"
        return
    try:
        torch.export.export(folded, xs)
        row.export_ok = True
    except Exception as e:
        row.export_ok = False
        row.fold_note += f"; export: {_first_line(e)}"
    try:
        from gpd_fx.export import export_onnx, onnx_available
    except ImportError:
        return
    if not onnx_available() or len(xs) > 1:   # export_onnx verifies one input batch
        return
    try:
        with tempfile.TemporaryDirectory() as d:
            x0 = xs[0].float() if xs[0].is_floating_point() else xs[0]   # token ids stay integers
            export_onnx(folded.float(), x0, Path(d) / "m.onnx")
        row.onnx_agrees = True
    except Exception as e:
        row.onnx_agrees = False
        row.fold_note += f"; onnx: {_first_line(e)}"


class _Stage:
    """Where a measurement is, so that an error row says in which stage it failed."""

    def __init__(self) -> None:
        self.name = "build"


def measure(spec: Spec, ratio: int, *, dtype: str = "auto", max_gib: float = 20.0,
            branches: str = "default", do_fold: bool = False, timm_fx: bool = True,
            model: nn.Module | None = None, check_free_memory: bool = True, frontend: str = "auto") -> Row:
    """Build ``spec``, expand it at ``ratio`` and measure exactness; never raises.

    Stages: input size, memory gate (on the meta device), build, expand, eval check (and fold),
    train check; an exception in any of them is an ``error`` row naming the stage.

    Args:
        spec: the model and its input size (``spec.image_size``; None picks per model).
        ratio: expansion ratio.
        dtype: ``"auto"`` (float64 if it fits ``max_gib``, else float32), ``"float64"``, ``"float32"``.
        max_gib: memory budget; a model estimated above it becomes a ``skipped`` row.
        branches: ``"default"`` (expand's default), ``"none"`` (IR only) or ``"all"``.
        do_fold: also fill the fold/export/onnx columns.
        timm_fx: for timm models, also check whether timm's own FX tracing reproduces the model.
        model: an already built model to use instead of ``spec.build()`` (e.g. a reduced-width
            instance of a zoo class in tests); it is converted and modified in place.
        check_free_memory: also skip when the estimate exceeds the memory free at this moment
            (sweeps on a shared machine). Tests pass ``False``: their outcome must not depend on
            what other processes hold; the ``max_gib`` budget alone is deterministic.
        frontend: ``expand``'s capture: ``"auto"``, ``"fx"`` or ``"export"``.

    Returns:
        A :class:`Row`.
    """
    import gpd_fx

    row = Row(spec.name, spec.source, ratio, family=spec.family, task=spec.task, note=spec.note)
    if spec.skip:
        row.status, row.reason = "skipped", spec.skip
        return row
    t_start = time.perf_counter()
    at = _Stage()
    try:
        if spec.source == "timm":
            at.name = "pick input size"
            kw, size, how, chans = _timm_pick_size(spec, spec.image_size)
            spec = Spec(spec.source, spec.name, {**spec.kwargs, **kw}, size, spec.family, spec.note, chans)
            row.note = "; ".join(x for x in (spec.note, how) if x)
        size = spec.image_size or DEFAULT_IMAGE
        row.input = spec.input_label(size)
        model, tdtype, est32 = _memory_gate(spec, size, ratio, row, at, model, dtype, max_gib, branches,
                                            check_free_memory)
        if row.status == "skipped":
            return row
        model, xs = _build(spec, size, ratio, row, at, model, tdtype, est32, timm_fx)
        dt = _expand(model, xs, ratio, branches, row, at, frontend, spec.scope)
        if spec.scope:
            _check_detection(model, dt, xs, size, row, at, do_fold)
        else:
            _check_exact(model, dt, xs, row, at, do_fold)
    except Exception as e:
        row.status = "error"
        row.reason = f"{at.name}: {_first_line(e)}"
        row.error_type = type(e).__name__
        row.error_where = _where(e)
        if at.name == "expand" and row.traced is None:
            row.traced = not isinstance(e, getattr(gpd_fx, "TraceError", ()))
    finally:
        row.peak_rss_gib = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB, 2)
        row.check_s = row.check_s if row.check_s is not None else round(time.perf_counter() - t_start, 1)
    return row


def _memory_gate(spec: Spec, size: int, ratio: int, row: Row, at: _Stage, model: nn.Module | None, dtype: str,
                 max_gib: float, branches: str, check_free_memory: bool
                 ) -> tuple[nn.Module | None, torch.dtype, float]:
    """Estimate the peak memory from the model built on the meta device, choose the dtype, and
    mark ``row`` skipped when the estimate is over the budget (or the memory free now).

    Returns ``(model, dtype, float32 estimate)``; ``model`` is the real one when the meta build
    failed and it had to be built for counting.
    """
    at.name = "memory estimate"
    use_branches = branches != "none"
    meta = None
    if model is None:
        try:
            with torch.device("meta"):
                meta = spec.build()
        except Exception:
            pass  # e.g. regnet computes widths with .tolist(): count on the real model below
    if meta is None:
        at.name = "build"
        model = model if model is not None else spec.build()
        meta = model
    if spec.scope:
        # a detector cannot run on the meta device (box selection is data-dependent): count the
        # scopes' parameters, and probe the scopes for attention on the batch they see
        from .detection import scope_input_side

        scopes = [meta.get_submodule(n) for n in spec.scope]
        acts = 0
        est64 = estimate_gib(meta, ratio, 8, use_branches, scopes=scopes)
        est32 = estimate_gib(meta, ratio, 4, use_branches, scopes=scopes)
        side = scope_input_side(meta, size)
        kinds = [model_kind(m, [(BATCH, 3, side, side)]) for m in scopes]
        row.kind = "transformer" if any(k == "transformer" for k, _ in kinds) else kinds[0][0]
        row.kind_evidence = "; ".join(e for _, e in kinds if e)
    else:
        acts = activation_numel(meta, spec.input_shapes(size)) if meta is not model else 0
        est64 = estimate_gib(meta, ratio, 8, use_branches, acts)
        est32 = estimate_gib(meta, ratio, 4, use_branches, acts)
        row.kind, row.kind_evidence = model_kind(meta, spec.input_shapes(size))
    row.student_params = sum(p.numel() for p in meta.parameters() if p.requires_grad)
    del meta
    if dtype == "auto":
        tdtype = torch.float64 if est64 <= max_gib else torch.float32
    else:
        tdtype = getattr(torch, dtype)
    est = est64 if tdtype == torch.float64 else est32
    row.est_gib = round(est, 2)
    row.dtype = str(tdtype).replace("torch.", "")
    # the project's one table; train-mode BN over a batch of 2 at 2x2 maps divides by small
    # standard deviations, which takes float32 rounding to ~1e-4: still under its 1e-3
    row.tol = TOL[tdtype]
    row.repro = _repro(spec, ratio, size, tdtype)
    if est > max_gib:
        row.status, row.reason = "skipped", f"needs ~{est:.1f} GiB (> {max_gib:g} GiB budget)"
        return model, tdtype, est32
    avail = mem_available_gib() if check_free_memory else math.inf
    if est > avail - 0.5:
        row.status, row.reason = "skipped", f"needs ~{est:.1f} GiB, only {avail:.1f} GiB free now (rerun)"
    return model, tdtype, est32


def _build(spec: Spec, size: int, ratio: int, row: Row, at: _Stage, model: nn.Module | None,
           tdtype: torch.dtype, est32: float, timm_fx: bool) -> tuple[nn.Module, tuple[Tensor, ...]]:
    """The real model in the measurement dtype (float32 if it fails in float64), constants
    randomised and dropout off, and its seeded inputs."""
    at.name = "build"
    if model is None:
        model = spec.build()
    model = model.to(tdtype)
    if tdtype == torch.float64:
        at.name = "float64 forward"
        why64 = _float64_failure(model, spec.make_inputs(size, tdtype))
        if why64:
            # e.g. RAFT builds its coordinate grids in float32 whatever the model's dtype
            tdtype = torch.float32
            model = model.to(tdtype)
            row.dtype, row.tol, row.est_gib = "float32", TOL[tdtype], round(est32, 2)
            row.repro = _repro(spec, ratio, size, tdtype)
            row.note = "; ".join(x for x in (row.note, f"float32: the model fails in float64 ({why64})") if x)
    randomize_constants(model, seed=0)
    zero_dropout(model)
    xs = spec.make_inputs(size, tdtype)
    if spec.source == "timm" and timm_fx:
        at.name = "timm fx check"
        row.timm_fx, row.timm_fx_reason = timm_fx_check(model, xs[0])
    return model, xs


def _expand(model: nn.Module, xs: tuple[Tensor, ...], ratio: int, branches: str, row: Row, at: _Stage,
            frontend: str = "auto", scope: tuple[str, ...] = ()):
    """``gpd_fx.expand`` as the zoo runs it (noise 0.1, seed 0, not strict; ``scope=`` when given);
    the report goes to ``row``."""
    import gpd_fx

    at.name = "expand"
    kwargs: dict[str, Any] = dict(ratio=ratio, example_inputs=xs, noise=0.1, seed=0, strict=False,
                                  frontend=frontend)
    if scope:
        kwargs["scope"] = list(scope)
        row.scope = "+".join(scope)
    if branches != "default":
        kwargs["branches"] = () if branches == "none" else None
    model.eval()
    t0 = time.perf_counter()
    try:
        dt = gpd_fx.expand(model, **kwargs)
    except gpd_fx.TraceError:
        row.traced = False
        raise
    row.expand_s = round(time.perf_counter() - t0, 3)
    row.traced = True
    rep = dt.report
    row.frontend = rep.frontend
    if rep.tolerance is not None and row.tol is not None and rep.tolerance > row.tol:
        # the graph computes in a less precise dtype than the probe (Llama's float32 RMSNorm in a
        # float64 model): its outputs agree to that dtype's rounding only
        row.tol = rep.tolerance
        row.note = "; ".join(x for x in (row.note, f"verified to {rep.tolerance:g}: the model computes in a "
                                         "less precise dtype inside") if x)
    row.share = float(rep.expanded_flop_fraction)
    row.n_boundaries = len(rep.boundaries)
    row.boundary_reasons = dict(getattr(rep, "boundary_reasons", {}) or {})
    row.fallbacks = dict(getattr(rep, "fallbacks", {}) or {})
    row.branch_layers = getattr(rep, "branch_layers", None)
    row.runtime_widenings = getattr(rep, "runtime_widenings", None)
    row.teacher_params = int(rep.teacher_params)
    row.student_params = int(rep.student_params)
    if scope:
        reps = list(dt.reports.values())
        flops = sum(r.student_flops for r in reps)
        row.scope_share = float(sum(r.expanded_flop_fraction * r.student_flops for r in reps) / flops) if flops else 1.0
        # teacher_params/student_params are the whole model's (the rest is shared); these the scopes'
        row.scope_params = [sum(r.student_params for r in reps), sum(r.teacher_params for r in reps)]
    return dt


def _check_exact(model: nn.Module, dt, xs: tuple[Tensor, ...], row: Row, at: _Stage, do_fold: bool) -> None:
    """Teacher vs model in eval mode (and ``dt.student``, and fold), then in train mode."""
    at.name = "eval check"
    t0 = time.perf_counter()
    model.eval()
    dt.eval()
    with torch.no_grad():
        y = model(*xs)
        row.err_eval, why = rel_error(dt(*xs), y)
        row.err_student, _ = rel_error(dt.student(*xs), y)
    row.exact_eval = row.err_eval <= row.tol
    if why:
        row.train_note = f"eval: {why}"
    if do_fold:
        # before the train-mode forward, which moves the model's BN running statistics away
        # from the student buffers kept in dt
        at.name = "fold"
        _check_fold(dt, model, xs, row.tol, row)
    at.name = "train check"
    model.train()
    dt.train()
    with torch.no_grad():
        torch.manual_seed(0)
        y = model(*xs)
        torch.manual_seed(0)
        row.err_train, why = rel_error(dt(*xs), y)
    row.exact_train = row.err_train <= row.tol
    if why:
        row.train_note = (row.train_note + "; " if row.train_note else "") + f"train: {why}"
    _finish_check(row, t0)


def _finish_check(row: Row, t0: float) -> None:
    """The check's time since ``t0``, and the reason when it was not exact."""
    row.check_s = round(time.perf_counter() - t0, 3)
    if not row.exact:
        row.reason = (f"not exact: eval {row.err_eval:.2e}, train {row.err_train:.2e} "
                      f"(tol {row.tol:g}) {row.train_note}").strip()


def _check_detection(model: nn.Module, dt, xs: tuple, size: int, row: Row, at: _Stage, do_fold: bool) -> None:
    """A detector through ``scope=``: teacher and student in eval mode, fold, and train mode with
    seeded targets (:func:`gpd_fx.testing.detection.check_detector`)."""
    from .detection import check_detector, detection_targets, scope_input_side

    at.name = "detection checks"
    t0 = time.perf_counter()
    images = xs[0]
    targets = detection_targets(model, len(images), size, images[0].dtype)
    res = check_detector(model, dt, images, targets, row.tol, do_fold=do_fold)
    ev, tr, st = res["eval"], res.get("train"), res["student"]
    row.boxes = res["boxes"]
    side = scope_input_side(model, size)
    row.note = "; ".join(x for x in (row.note, f"backbone input {BATCH}x3x{side}x{side}") if x)
    row.err_eval, row.direct_eval, row.exact_eval = ev.error, ev.direct, ev.ok
    notes = []
    if tr is not None:
        row.err_train, row.direct_train, row.exact_train = tr.error, tr.direct, tr.ok
    else:   # the train-mode forward raised: eval results stand, train is not exact
        row.err_train, row.exact_train = math.inf, False
        notes.append(f"train mode: {res['train_error']}")
    row.err_student = st.error
    if not row.boxes or not all(row.boxes):
        notes.append(f"vacuous: detections per image {row.boxes}")
        row.exact_eval = False
    for label, c in (("eval", ev), ("train", tr), ("student", st)):
        if c is not None and (not c.ok or c.direct > row.tol):
            notes.append(f"{label}: {c.summary()}")
    if do_fold:
        fo = res["fold"]
        row.fold_exact = bool(res["fold_same_class"] and fo.ok)
        if not res["fold_same_class"]:
            row.fold_note = "fold: not the model's class or other state-dict keys"
        if not fo.ok or fo.direct > row.tol:
            row.fold_note = "; ".join(x for x in (row.fold_note, f"fold: {fo.summary()}") if x)
        row.fold_note = "; ".join(x for x in (row.fold_note, "no torch.export/ONNX: a detector is not "
                                              "capturable whole") if x)
    row.train_note = " | ".join(notes)
    _finish_check(row, t0)


def _float64_failure(model: nn.Module, xs: tuple[Tensor, ...]) -> str:
    """Why ``model`` (converted to float64) fails on float64 inputs when it runs in float32, or ''."""
    try:
        with torch.no_grad():
            model.eval()(*xs)
        return ""
    except Exception as e:
        why = _first_line(e)
    try:
        with torch.no_grad():
            copy_ = copy.deepcopy(model).float()
            copy_.eval()(*(x.float() for x in xs))
    except Exception:
        return ""   # fails in float32 too: not a dtype problem, expand will report it
    return why[:120]

