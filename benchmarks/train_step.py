"""Training-step benchmark: does a GPD step cost about a teacher step plus a student step?

    python benchmarks/train_step.py                          # the issue-9 set, eager, ratios 2 and 3
    python benchmarks/train_step.py --models resnet18_32 --ratios 2 --rounds 7
    python benchmarks/train_step.py --models small_cnn --compile none,inductor,gpd --compile-models small_cnn

A *step* is ``zero_grad -> forward -> loss -> backward -> optimizer.step()`` on one fixed batch
(SGD, momentum 0.9, Nesterov, weight decay 5e-4, PyTorch's fused kernel: the trainer's default
optimiser; before 2026-12-03 session 5 the for-each one, 4.6x slower on 40M parameters, which
made every step longer and the GPD step's own overhead a smaller share of it). A *fwd+bwd*
case has no optimiser (gradients set to None, forward, loss, backward). Cases:

================  ============================================================================
student           the user's original model alone, cross-entropy (step)
teacher           a plain model of the IR teacher's architecture alone (a copy of
                  ``dt.teacher`` of ``branches=()``: ``ratio`` x wider convs/linears), CE (step)
teacher_mb        the multi-branch (CBR) teacher of ``--branches`` alone, CE (step)
gpd               the GPD step with ``branches=()`` (IR only): ``dt.joint`` -> ``gpd_loss`` ->
                  one backward over ``dt.parameters()``, as ``gpd_fx.trainer`` does
gpd_mb            the same with the CBR teacher
student_fb        the plain student, forward + backward (no optimiser)
dt_student_fb     ``dt.student`` (IR teacher) forward + backward: the parameter map + the
                  student's own module
dt_student_mb_fb  ``dt.student`` of the CBR teacher, forward + backward
================  ============================================================================

Models (``--models``): ``resnet18_32`` (torchvision ResNet-18, 100 classes, 32x32, batch 16),
``resnet18_64`` (64x64, batch 32), ``mobilenetv3`` (torchvision MobileNetV3-small, 64x64, batch
32), ``vit_tiny`` (timm ``vit_tiny_patch16_224`` with ``img_size=64``, batch 32) and
``small_cnn`` (digits-sized). Each runs at every ratio of ``--ratios``.

Each case runs eagerly and, for the models in ``--compile-models`` and the cases in
``--compile-cases``, compiled with each mode of ``--compile`` (``gpd_fx.compile.compile_step``:
the forward and loss are compiled, AOTAutograd compiles the backward; the optimiser step stays
eager). After ``--warmup`` steps of every case (compilation happens there and is timed
separately), ``--rounds`` rounds each run every case ``--inner`` times, in a freshly shuffled
order per round, so all cases see the same machine load. Ratios are computed *per round*
(``gpd_i / (teacher_i + student_i)``) and summarised by their median, IQR and range (the
ratio of medians is reported too); this is much less sensitive to load from other processes
than a ratio of medians. Targets (issue 9, eager): ``gpd / (teacher + student) <= 1.10``,
``gpd_mb / (teacher + student) <= 1.5``, ``dt_student_fb / student_fb <= 1.5`` (IR and CBR).

Threads: ``--threads 1`` by default. On a machine shared with other jobs a 2-thread OpenMP
pool spends most of its time waiting for a descheduled sibling; one thread gives stable ratios.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import random
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gpd_fx
from gpd_fx.checkpoint import atomic_write
from gpd_fx.compile import COMPILE_MODES, compile_step
from gpd_fx.losses import GPDLossConfig, gpd_loss

HERE = Path(__file__).resolve().parent
DEFAULT_JSON = HERE / "results" / "train_step.json"


@dataclass
class ModelSetup:
    """One benchmarked student: how to build it and the batch it trains on."""

    name: str
    build: Callable[[], nn.Module]
    image_size: int
    batch: int
    ratio: int
    warmup: int
    inner: int
    classes: int = 10

    @property
    def key(self) -> str:
        return f"{self.name}/r{self.ratio}"


def _small_cnn() -> nn.Module:
    from gpd_fx.models import small_cnn

    return small_cnn(10)


def _resnet18() -> nn.Module:
    import torchvision

    return torchvision.models.resnet18(weights=None, num_classes=100)


def _mobilenetv3() -> nn.Module:
    import torchvision

    return torchvision.models.mobilenet_v3_small(weights=None, num_classes=100)


def _vit_tiny() -> nn.Module:
    import timm

    return timm.create_model("vit_tiny_patch16_224", img_size=64, pretrained=False, num_classes=100)


# (builder, image size, batch, warm-up steps, steps per round, classes)
MODELS: dict[str, tuple[Callable[[], nn.Module], int, int, int, int, int]] = {
    "small_cnn": (_small_cnn, 16, 64, 5, 3, 10),
    "resnet18_32": (_resnet18, 32, 16, 2, 1, 100),
    "resnet18_64": (_resnet18, 64, 32, 2, 1, 100),
    "mobilenetv3": (_mobilenetv3, 64, 32, 2, 1, 100),
    "vit_tiny": (_vit_tiny, 64, 32, 2, 1, 100),
}
DEFAULT_MODELS = ["resnet18_32", "resnet18_64", "mobilenetv3", "vit_tiny"]


# ----------------------------------------------------------------------------- cases


def _optimizer(params) -> torch.optim.Optimizer:
    """The trainer's optimiser: SGD with Nesterov momentum, fused where PyTorch has the kernel."""
    from gpd_fx.training.optim import _fused_if_supported

    return _fused_if_supported(torch.optim.SGD, list(params), lr=0.01, momentum=0.9, nesterov=True,
                               weight_decay=5e-4)


@dataclass
class Case:
    """One timed step: a loss function of ``(x, y)`` (maybe compiled) and its optimiser."""

    model: str
    name: str
    mode: str
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    module: nn.Module
    compile_s: float = 0.0
    opt: torch.optim.Optimizer | None = None
    times: list[float] = field(default_factory=list)
    last_loss: float = float("nan")
    error: str | None = None

    def __post_init__(self) -> None:
        if self.opt is None:
            self.opt = _optimizer(self.module.parameters())

    @property
    def key(self) -> str:
        return f"{self.model}/{self.mode}/{self.name}"

    def step(self, x: Tensor, y: Tensor) -> Tensor:
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss_fn(x, y)
        loss.backward()
        if not self.name.endswith("_fb"):   # fwd+bwd cases: no optimiser
            self.opt.step()
        return loss


def _ce_loss(model: nn.Module) -> Callable[[Tensor, Tensor], Tensor]:
    def loss(x: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(model(x), y)

    return loss


def _dt_student_loss(dt: nn.Module) -> Callable[[Tensor, Tensor], Tensor]:
    def loss(x: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(dt.student(x), y)

    return loss


def _gpd_step_loss(dt: nn.Module, cfg: GPDLossConfig) -> Callable[[Tensor, Tensor], Tensor]:
    def loss(x: Tensor, y: Tensor) -> Tensor:
        t, s = dt.joint(x)
        return gpd_loss(t, s, y, cfg)[0]

    return loss


def _branch_spec(args: argparse.Namespace):
    spec: dict[str, Any] = {}
    if args.kinds:
        from gpd_fx.passes.branches import BRANCH_KINDS_CONV, BRANCH_KINDS_LINEAR

        spec["conv"] = [k for k in args.kinds if k in BRANCH_KINDS_CONV]
        spec["linear"] = [k for k in args.kinds if k in BRANCH_KINDS_LINEAR]
    if args.mid is not None:
        spec["mid"] = float(args.mid) if args.mid.replace(".", "", 1).isdigit() else args.mid
    if args.branch_mode != "auto":
        spec["mode"] = args.branch_mode
    return spec or None


def _plans(dt: nn.Module, x: Tensor) -> dict[str, list[str]]:
    """Which branches each multi-branch layer runs on the activations for the batch ``x``."""
    from gpd_fx.passes.branches import _Branched

    out = {}
    for name, m in dt.teacher.named_modules():
        if isinstance(m, _Branched):
            for key, run in m.__dict__.get("_plans", {}).items():
                if key[0][0] == x.shape[0]:
                    out[name] = list(run)
    return out


def build_cases(setup: ModelSetup, modes: list[str], compile_cases: list[str], seed: int,
                branches: Any) -> tuple[list[Case], dict[str, Any], nn.Module]:
    """Every case of one model, each with its own copy of the weights, in every mode."""
    torch.manual_seed(seed)
    student = setup.build().train()
    example = torch.randn(2, 3, setup.image_size, setup.image_size)
    t0 = time.perf_counter()
    dt_ir = gpd_fx.expand(student, ratio=setup.ratio, example_inputs=(example,), branches=())
    expand_ir_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    dt_mb = gpd_fx.expand(student, ratio=setup.ratio, example_inputs=(example,), branches=branches)
    expand_mb_s = time.perf_counter() - t0
    info = {
        "image_size": setup.image_size, "batch": setup.batch, "ratio": setup.ratio, "branches": repr(branches),
        "student_params": sum(p.numel() for p in student.parameters()),
        "teacher_params": sum(p.numel() for p in dt_ir.parameters()),
        "teacher_mb_params": sum(p.numel() for p in dt_mb.parameters()),
        "branch_layers": dt_mb.report.branch_layers,
        "expand_ir_s": expand_ir_s, "expand_mb_s": expand_mb_s,
        "report_ir": dt_ir.report.summary(), "report_mb": dt_mb.report.summary(),
    }
    cfg = GPDLossConfig()
    # Cases that train the same parameters share the module and one optimiser (the work per
    # step is the same as with copies, and memory stays at one copy of each model plus one set
    # of gradients and momentum buffers: a ratio-3 ResNet-18 teacher is 100M parameters).
    student.train(), dt_ir.train(), dt_mb.train()
    opt_s, opt_ir, opt_mb = (_optimizer(m.parameters()) for m in (student, dt_ir, dt_mb))
    builders: dict[str, tuple[nn.Module, Callable[[Tensor, Tensor], Tensor], torch.optim.Optimizer]] = {
        "student": (student, _ce_loss(student), opt_s),
        "teacher": (dt_ir.teacher, _ce_loss(dt_ir.teacher), opt_ir),
        "teacher_mb": (dt_mb.teacher, _ce_loss(dt_mb.teacher), opt_mb),
        "gpd": (dt_ir, _gpd_step_loss(dt_ir, cfg), opt_ir),
        "gpd_mb": (dt_mb, _gpd_step_loss(dt_mb, cfg), opt_mb),
        "student_fb": (student, _ce_loss(student), opt_s),
        "dt_student_fb": (dt_ir, _dt_student_loss(dt_ir), opt_ir),
        "dt_student_mb_fb": (dt_mb, _dt_student_loss(dt_mb), opt_mb),
    }
    cases: list[Case] = []
    for mode in modes:
        for name, (module, fn, opt) in builders.items():
            if mode == "none" or name in compile_cases:
                cases.append(Case(setup.key, name, mode, compile_step(fn, mode), module, opt=opt))
    return cases, info, dt_mb


# ------------------------------------------------------------------------------ stats


def _summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {"median": float("nan"), "q1": float("nan"), "q3": float("nan"), "iqr": float("nan"), "n": 0}
    if len(values) == 1:
        q1 = q3 = values[0]
    else:
        q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return {"median": statistics.median(values), "q1": q1, "q3": q3, "iqr": q3 - q1, "n": len(values)}


def _ratio_stats(num: list[float], den: list[list[float]]) -> dict[str, float]:
    """Per-round ratio num_i / sum(den_j,i), summarised; plus the ratio of medians."""
    n = min([len(num)] + [len(d) for d in den])
    if n == 0:
        return {"median": float("nan"), "iqr": float("nan"), "ratio_of_medians": float("nan"), "n": 0}
    per_round = [num[i] / sum(d[i] for d in den) for i in range(n)]
    s = _summary(per_round)
    s["min"], s["max"] = min(per_round), max(per_round)
    s["ratio_of_medians"] = statistics.median(num) / sum(statistics.median(d) for d in den)
    return s


# ----------------------------------------------------------------------------- running


def _run_case(case: Case, x: Tensor, y: Tensor, steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = case.step(x, y)
    dt = (time.perf_counter() - t0) / steps
    case.last_loss = float(loss.detach())
    return dt


RATIOS = {
    "gpd / (teacher + student)": ("gpd", ["teacher", "student"]),
    "gpd_mb / (teacher + student)": ("gpd_mb", ["teacher", "student"]),
    "gpd_mb / (teacher_mb + student)": ("gpd_mb", ["teacher_mb", "student"]),
    "gpd_mb / gpd": ("gpd_mb", ["gpd"]),
    "teacher_mb / teacher": ("teacher_mb", ["teacher"]),
    "dt_student_fb / student_fb": ("dt_student_fb", ["student_fb"]),
    "dt_student_mb_fb / student_fb": ("dt_student_mb_fb", ["student_fb"]),
}
TARGETS = {"gpd / (teacher + student)": 1.10, "gpd_mb / (teacher + student)": 1.5,
           "dt_student_fb / student_fb": 1.5, "dt_student_mb_fb / student_fb": 1.5}


def _run_group(setup: ModelSetup, args: argparse.Namespace, rng: random.Random) -> dict[str, Any]:
    """Build, warm up and time every case of one model at one ratio (rounds interleaved)."""
    modes = ["none"] + [m for m in args.compile if m != "none" and setup.name in args.compile_models]
    print(f"[{setup.key}] expanding ({setup.image_size}x{setup.image_size}, batch {setup.batch}); "
          f"modes {modes}", flush=True)
    cases, info, dt_mb = build_cases(setup, modes, args.compile_cases, args.seed, _branch_spec(args))
    info.update(warmup=setup.warmup, inner=setup.inner)
    res: dict[str, Any] = {"setup": info, "modes": modes}
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(setup.batch, 3, setup.image_size, setup.image_size, generator=g)
    y = torch.randint(0, setup.classes, (setup.batch,), generator=g)
    # warm-up (and compilation), case by case; a case that fails is reported, not fatal
    for case in cases:
        t0 = time.perf_counter()
        try:
            case.step(x, y)
            case.compile_s = time.perf_counter() - t0
            for _ in range(setup.warmup - 1):
                case.step(x, y)
        except Exception as err:  # noqa: BLE001 - a row, not the end of the benchmark
            case.error = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            print(f"  {case.key}: FAILED {case.error}", flush=True)
            if args.verbose:
                traceback.print_exc()
            continue
        print(f"  {case.key}: first step {case.compile_s:.2f} s", flush=True)
    res["failed"] = {c.key: c.error for c in cases if c.error is not None}
    res["branch_plans"] = _plans(dt_mb, x)
    good = [c for c in cases if c.error is None]
    t_start = time.perf_counter()
    for r in range(args.rounds):
        order = list(good)
        rng.shuffle(order)
        for case in order:
            case.times.append(_run_case(case, x, y, setup.inner))
        if args.time_budget and time.perf_counter() - t_start > args.time_budget and r + 1 >= 5:
            print(f"  time budget of {args.time_budget:.0f} s reached after {r + 1} rounds", flush=True)
            break
    res["timing_seconds"] = time.perf_counter() - t_start
    by = {(c.mode, c.name): c for c in good}
    res["cases"] = {}
    for (mode, cname), c in by.items():
        res["cases"].setdefault(mode, {})[cname] = {
            **_summary(c.times), "first_step_s": c.compile_s, "final_loss": c.last_loss, "times": c.times}
    res["ratios"] = {}
    for mode in modes:
        rs: dict[str, Any] = {}
        for label, (num, den) in RATIOS.items():
            if (mode, num) in by and all((mode, d) in by for d in den):
                rs[label] = _ratio_stats(by[(mode, num)].times, [by[(mode, d)].times for d in den])
        res["ratios"][mode] = rs
    res["speedup_vs_eager"] = {}
    for mode in modes:
        if mode != "none":
            res["speedup_vs_eager"][mode] = {
                cname: _ratio_stats(by[("none", cname)].times, [by[(mode, cname)].times])
                for (m, cname) in by if m == mode and ("none", cname) in by}
    return res


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Every model at every ratio, one group after another (each group's cases interleaved)."""
    rng = random.Random(args.seed)
    results: dict[str, Any] = {"models": {}}
    t_start = time.perf_counter()
    for name in args.models:
        build, size, batch, warmup, inner, classes = MODELS[name]
        for ratio in args.ratios:
            setup = ModelSetup(name, build, size, batch, ratio, warmup if args.warmup is None else args.warmup,
                               inner if args.inner is None else args.inner, classes)
            results["models"][setup.key] = _run_group(setup, args, rng)
            gc.collect()
            _print_group(setup.key, results["models"][setup.key])
    results["timing_seconds"] = time.perf_counter() - t_start
    return results


# ------------------------------------------------------------------------------ output


def _ms(s: float) -> str:
    return f"{1000 * s:8.1f}"


CASE_ORDER = ["student", "teacher", "teacher_mb", "gpd", "gpd_mb", "student_fb", "dt_student_fb", "dt_student_mb_fb"]


def _print_group(key: str, res: dict[str, Any]) -> None:
    st = res["setup"]
    print(f"\n== {key}: {st['image_size']}x{st['image_size']}, batch {st['batch']}, ratio {st['ratio']}; "
          f"student {st['student_params']:,} params, teacher {st['teacher_params']:,} (IR) / "
          f"{st['teacher_mb_params']:,} (CBR {st['branches']}, {st['branch_layers']} layers)")
    print(f"{'mode':<9} {'case':<17} {'median ms':>10} {'IQR ms':>9} {'n':>3} {'1st step s':>10}  "
          f"{'speedup vs eager (median [IQR])':>30}")
    for mode, cs in res["cases"].items():
        for n in CASE_ORDER:
            if n not in cs:
                continue
            c = cs[n]
            sp = ""
            if mode != "none" and n in res["speedup_vs_eager"].get(mode, {}):
                s = res["speedup_vs_eager"][mode][n]
                sp = f"{s['median']:.2f}x [{s['q1']:.2f}, {s['q3']:.2f}]"
            print(f"{mode:<9} {n:<17} {_ms(c['median']):>10} {_ms(c['iqr']):>9} {c['n']:>3} "
                  f"{c['first_step_s']:>10.2f}  {sp:>30}")
    for k, err in res.get("failed", {}).items():
        print(f"FAILED    {k}: {err}")
    print(f"{'mode':<9} {'ratio':<32} {'median':>7} {'[q1, q3]':>15} {'[min, max]':>15} {'of medians':>11}")
    for mode, rs in res["ratios"].items():
        for label, r in rs.items():
            mark = ""
            if mode == "none" and label in TARGETS:
                mark = f"  <= {TARGETS[label]} ok" if r["median"] <= TARGETS[label] else f"  > {TARGETS[label]} MISSED"
            print(f"{mode:<9} {label:<32} {r['median']:>7.3f} [{r['q1']:.3f}, {r['q3']:.3f}] "
                  f"[{r['min']:.3f}, {r['max']:.3f}] {r['ratio_of_medians']:>11.3f}{mark}")
    plans = res.get("branch_plans") or {}
    if plans:
        run = {n: p for n, p in plans.items() if p}
        print(f"branches run on activations at this batch: {len(run)} of {len(plans)} layers "
              + ", ".join(f"{n}: {'+'.join(p)}" for n, p in list(run.items())[:6]) + (" ..." if len(run) > 6 else ""))


def print_tables(results: dict[str, Any]) -> None:
    for key, res in results["models"].items():
        _print_group(key, res)


def _environment(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
        "processor": platform.processor(), "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
        "loadavg_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "argv": sys.argv[1:], "args": {k: v for k, v in vars(args).items() if k != "json"},
    }


def _list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=_list, default=DEFAULT_MODELS,
                   help=f"comma list of {sorted(MODELS)} (default: {','.join(DEFAULT_MODELS)})")
    p.add_argument("--ratios", type=lambda t: [int(v) for v in _list(t)], default=[2, 3],
                   help="comma list of expansion ratios (default 2,3)")
    p.add_argument("--mid", default=None,
                   help="middle width of the 1x1->kxk branch: student, teacher or a factor of the teacher's "
                        "input width (default: gpd_fx.expand's)")
    p.add_argument("--kinds", type=_list, default=None,
                   help="branch kinds of the CBR teacher, conv and linear together (default: every kind that "
                        "applies, as gpd_fx.expand(branches=None))")
    p.add_argument("--branch-mode", default="auto", choices=["auto", "fold", "run"],
                   help="fold/run policy of the CBR layers (default auto: by the cost of each input shape)")
    p.add_argument("--compile", type=_list, default=["none"],
                   help=f"comma list of {list(COMPILE_MODES)}; eager ('none') is always measured")
    p.add_argument("--compile-models", type=_list, default=["small_cnn"],
                   help="models that are also compiled (default small_cnn: an Inductor compile of the "
                        "ResNet-18 GPD step takes minutes on 2 cores)")
    p.add_argument("--compile-cases", type=_list, default=["student", "teacher", "gpd", "gpd_mb"],
                   help="cases that are also compiled (default student,teacher,gpd,gpd_mb)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps per case, compilation included (default 5 small_cnn, 2 others)")
    p.add_argument("--rounds", type=int, default=7, help="timed rounds (default 7, at least 5)")
    p.add_argument("--inner", type=int, default=None,
                   help="steps per case per round (default 3 small_cnn, 1 others)")
    p.add_argument("--time-budget", type=float, default=0.0,
                   help="per model and ratio, stop timing after this many seconds once 5 rounds ran (0: all rounds)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1; see module doc)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"output JSON (default {DEFAULT_JSON})")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of failing cases")
    args = p.parse_args(argv)
    for m in args.models:
        if m not in MODELS:
            p.error(f"unknown model {m!r}; choose from {sorted(MODELS)}")
    for m in args.compile:
        if m not in COMPILE_MODES:
            p.error(f"unknown compile mode {m!r}; choose from {list(COMPILE_MODES)}")
    if (args.warmup is not None and args.warmup < 1) or args.rounds < 1 or (args.inner is not None and args.inner < 1):
        p.error("--warmup, --rounds and --inner must be >= 1")
    if any(r < 1 for r in args.ratios):
        p.error("--ratios must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    # Every case compiles the same few Python functions for another model; Dynamo counts those
    # as recompilations of one code object and silently runs eagerly past its limit (8).
    import torch._dynamo.config as dynamo_config

    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, 64)
    env = _environment(args)
    t0 = time.perf_counter()
    results = benchmark(args)
    env["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    results = {"environment": env, **results, "total_seconds": time.perf_counter() - t0}
    print(f"\ntotal {results['total_seconds']:.0f} s (timing {results['timing_seconds']:.0f} s); "
          f"load average {env['loadavg_start']} -> {env['loadavg_end']}; {env['threads']} thread(s)")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.json, lambda tmp: tmp.write_text(json.dumps(results, indent=2) + "\n"))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
