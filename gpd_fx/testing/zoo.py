"""Zoo benchmark: does ``gpd_fx.expand`` give an exact teacher on every model of a model zoo?

    gpd-fx zoo                                                # torchvision, ratios 2 and 3
    python benchmarks/zoo.py                                  # the same, from a source checkout
    python benchmarks/zoo.py --source timm --ratio 2          # one model per timm family
    python benchmarks/zoo.py --models resnet18,swin_t --ratio 2 --json /tmp/zoo.json
    python benchmarks/zoo.py --tasks segmentation,video,optical_flow --ratio 2 --max-gib 6
    python benchmarks/zoo.py --tasks detection --ratio 2 --max-gib 6 --fold   # detectors, scope=["backbone"]
    python benchmarks/zoo.py --tasks all        # every torchvision task

Results go to ``--json`` (default: ``zoo_<source>.json`` in the current directory, never into
the source tree); the timm parameter-count cache goes to ``$XDG_CACHE_HOME/gpd_fx`` (default
``~/.cache/gpd_fx``).

One row per model and ratio: traced, exact in eval and in train mode, max relative error,
expanded FLOP share, boundaries, expand seconds, student/teacher parameters (and, with
``--fold``, fold exact / export ok / onnx agrees), then a summary
line and the ResNet-50 timing row. Each model runs in a fresh subprocess with a timeout (an
exception, an OOM kill or a hang becomes a row, not the end of the sweep).

Measurement, independent of expand's own self-verification:

* error = max|teacher(x) - student(x)| / max|student(x)|, over all output tensors.
* eval mode, and train mode (BatchNorm on batch statistics; ``torch.manual_seed`` before each
  forward so stochastic depth draws the same per-sample masks). Every dropout module gets
  ``p = 0`` before expanding, and so do dropout rates that a model passes to ``F.dropout``
  itself (timm's ``drop_rate``): a dropout mask over r*C teacher channels and one over C student
  channels are different random draws and cannot agree, so with p > 0 no teacher could be exact
  in train mode. (Stochastic depth masks are per sample, not per channel, and do agree.)
* float64 where the float64 teacher fits the memory budget (tolerance 1e-9), else float32
  (tolerance 1e-3); the row says which. The reasoning for both numbers is at
  ``gpd_fx.passes.widen_verify.TOL``, the project's one tolerance table.
* heads have 10 classes (``num_classes=10``) to keep them small; weights are random, backbones
  too (``weights=None, weights_backbone=None``: nothing is downloaded).
* tasks (``--tasks``): torchvision's classification, segmentation (FCN/DeepLabV3 with their aux
  head, output ``{"out", "aux"}``), video (``(N, 3, T, H, W)`` clips) and optical flow (RAFT on
  two frames) models, each at the smallest input it takes (``gpd_fx.testing.specs``).
  A model that fails in float64 although it runs in float32 (RAFT builds its coordinate grids
  in float32) is measured in float32, and the row says why.
* detection: neither front end captures a detector whole, so its backbone (+ FPN) is expanded
  with ``expand(model, r, (images,), scope=["backbone"])`` (``--scope`` for others) on a list of
  two images (64x64; the SSDs resize to their fixed 300/320), score thresholds 0 so that there
  are boxes to compare. Exact = each scope's output within tolerance, and the whole detections
  equal or, where a discontinuous selection (top-k, NMS) among scores tied to within rounding
  picks other boxes, reproduced bit for bit by the model run on the teacher's scope outputs
  (``gpd_fx.scope.ScopeCheck``; the row keeps the direct comparison too). Train mode runs with
  seeded targets and the same ``torch.manual_seed`` before each forward (the samplers draw
  from it) and compares the loss dicts. share = the whole model's expanded FLOP share; the
  scope's own share is in the row.
* parameters that the zoo initialises to a constant (torchvision's ViT head is all zeros, BN
  affine 1/0, layer scale 1e-6) get seeded noise and BN running statistics are randomised
  (``gpd_fx.testing.randomize_constants``), so no check passes vacuously: with a zero head
  every output is 0.

This module is the sweep: its command line, one worker subprocess per model and ratio, the table,
the summary and the JSON file. What one row measures lives in :mod:`gpd_fx.testing.measurement`.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import math
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from gpd_fx.argtypes import positive_int
from gpd_fx.checkpoint import atomic_write

from .measurement import CNN_SHARE, GIB, TRANSFORMER_SHARE, UNDER_WIDENED, Row, measure
from .detection import DEFAULT_SCOPE
from .specs import BATCH, TASKS, Spec, family, hf_specs, timm_specs, torchvision_specs

__all__ = ["build_parser", "main", "run_one", "summarize"]

HERE = Path(__file__).resolve().parent


def time_resnet50(runs: int = 3) -> dict:
    """Median expand time of ResNet-50 at ratio 3 on a 1x3x64x64 input, float32, in one process."""
    import gpd_fx
    import torchvision

    out = {}
    model = torchvision.models.resnet50(weights=None)
    x = torch.randn(1, 3, 64, 64)
    variants = {"default": {}, "IR only (branches=())": {"branches": ()}}
    for label, kw in variants.items():
        secs = []
        for _ in range(runs):
            t0 = time.perf_counter()
            gpd_fx.expand(model, ratio=3, example_inputs=(x,), **kw)
            secs.append(time.perf_counter() - t0)
        out[label] = {"median_s": statistics.median(secs), "runs_s": secs}
    return out


# --------------------------------------------------------------------------------------------
# Driver: subprocess per model, table, summary, JSON
# --------------------------------------------------------------------------------------------
def environment(threads: int) -> dict:
    """Versions, machine and commit of this sweep (the JSON file's ``environment``)."""
    import torchvision

    env = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__, "torchvision": torchvision.__version__,
        "python": platform.python_version(), "platform": platform.platform(),
        "cpu_count": os.cpu_count(), "torch_threads": threads,
        "load_avg_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "mem_total_gib": None,
    }
    import gpd_fx
    env["gpd_fx_file"] = gpd_fx.__file__
    try:
        import timm
        env["timm"] = timm.__version__
    except ImportError:
        env["timm"] = None
    try:
        env["gpd_fx_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE,
                                              capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:
        env["gpd_fx_commit"] = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                env["mem_total_gib"] = round(int(line.split()[1]) * 1024 / GIB, 1)
    except OSError:
        pass
    return env


def _fmt_params(n) -> str:
    if n is None:
        return "-"
    return f"{n / 1e6:.1f}M"


def _yn(b) -> str:
    return "-" if b is None else ("yes" if b else "NO")


def format_row(r: Row, fold: bool) -> str:
    """One table line for ``r`` (fold/export/onnx columns when ``fold``)."""
    if r.status in ("skipped", "timeout", "crashed") or (r.status == "error" and r.expand_s is None):
        cols = [f"{r.name:<34}", f"{r.task[:12]:<12}", f"r{r.ratio}", f"{r.input or '-':<16}",
                f"{r.status.upper()}: {r.reason}"]
        return " ".join(cols)
    err = max(x for x in (r.err_eval or 0.0, r.err_train or 0.0))
    cols = [
        f"{r.name:<34}", f"{r.task[:12]:<12}", f"r{r.ratio}", f"{r.input:<16}", f"{r.dtype[:7]:<7}",
        f"{_yn(r.traced):<4}", f"{(r.frontend or '-')[:6]:<6}", f"{_yn(r.exact_eval):>3}/{_yn(r.exact_train):<3}",
        f"{err:9.2e}", f"{r.share:6.3f}" if r.share is not None else "     -",
        f"{r.n_boundaries if r.n_boundaries is not None else '-':>4}",
        f"{r.expand_s:7.2f}" if r.expand_s is not None else "      -",
        f"{_fmt_params(r.student_params):>8}", f"{_fmt_params(r.teacher_params):>9}",
    ]
    if fold:
        cols += [f"{_yn(r.fold_exact):>4}", f"{_yn(r.export_ok):>4}", f"{_yn(r.onnx_agrees):>4}"]
    if r.source == "timm":
        cols.append(f"fx:{_yn(r.timm_fx)}")
    extra = r.reason if r.status != "ok" or not r.exact else ""
    if r.fallbacks:
        extra = f"FALLBACKS {list(r.fallbacks)[:3]} " + extra
    if r.status == "ok" and r.exact and r.share is not None and r.share < 1 and r.boundary_reasons:
        extra = "boundaries: " + ", ".join(sorted({v.split(":")[0] for v in r.boundary_reasons.values()}))[:120]
    if r.scope and r.status == "ok":
        # detection: the scope's own share, the whole outputs compared directly, and the boxes
        def e(x):
            return "-" if x is None else f"{x:.1e}"
        det = (f"scope {r.scope} share {r.scope_share:.3f}; direct e/t {e(r.direct_eval)}/{e(r.direct_train)}; "
               f"boxes {r.boxes}")
        extra = det + (f"  {extra}" if extra else "")
    if r.under_widened and not r.branch_layers:
        extra += (f"  teacher/student params {r.teacher_params / r.student_params:.2f} < {UNDER_WIDENED} r^2 "
                  f"({r.runtime_widenings} run-time widenings)")
    return " ".join(cols) + (f"  {extra}" if extra else "")


def header(fold: bool, source: str) -> str:
    """The table's column titles, matching :func:`format_row`."""
    cols = [f"{'model':<34}", f"{'task':<12}", "r ", f"{'input':<16}", f"{'dtype':<7}", "trcd", "front ", "exact e/t",
            "max.rel.err", "share", "#bnd", "expand s", " student", "  teacher"]
    if fold:
        cols += ["fold", "expt", "onnx"]
    if source == "timm":
        cols.append("timm-fx")
    return " ".join(cols)


def summarize(rows: list[Row], source: str) -> dict:
    """Counts per ratio (see the issue acceptance criteria)."""
    out: dict = {}
    for ratio in sorted({r.ratio for r in rows}):
        rs = [r for r in rows if r.ratio == ratio]
        ran = [r for r in rs if r.status not in ("skipped",)]
        skipped = [r for r in rs if r.status == "skipped"]
        exact = [r for r in rs if r.status == "ok" and r.exact]
        s: dict = {
            "models": len(rs), "ran": len(ran), "traced": sum(1 for r in rs if r.traced),
            "exact": len(exact), "exact_eval": sum(1 for r in rs if r.exact_eval),
            "exact_train": sum(1 for r in rs if r.exact_train),
            "with_fallbacks": [r.name for r in rs if r.fallbacks],
            "under_widened": {r.name: round(r.teacher_params / r.student_params, 2)
                              for r in rs if r.under_widened and not r.branch_layers},
            "skipped": {r.name: r.reason for r in skipped},
            "not_exact": {r.name: r.reason for r in ran if not (r.status == "ok" and r.exact)},
        }
        if rs and all(r.scope for r in rs):
            ok = [r for r in ran if r.status == "ok"]
            shares = sorted(r.share for r in ok if r.share is not None)
            s["detection"] = {
                "scopes": sorted({r.scope for r in rs}),
                "fold_exact": sum(1 for r in ran if r.fold_exact),
                "fold_checked": sum(1 for r in ran if r.fold_exact is not None),
                "scope_share_ok": sum(1 for r in ok if (r.scope_share or 0) >= CNN_SHARE),
                "whole_share": ([shares[0], statistics.median(shares), shares[-1]] if shares else None),
                "direct_equal_eval": sum(1 for r in ok if r.direct_eval is not None and r.direct_eval <= r.tol),
                "direct_equal_train": sum(1 for r in ok if r.direct_train is not None and r.direct_train <= r.tol),
                "dtypes": dict(collections.Counter(r.dtype for r in ok)),
            }
        if source == "torchvision":
            cnn = [r for r in ran if r.kind == "cnn"]
            tr = [r for r in ran if r.kind == "transformer"]
            s["cnn"] = len(cnn)
            s["cnn_share_ok"] = sum(1 for r in cnn if (r.share or 0) >= CNN_SHARE)
            s["cnn_low_share"] = {r.name: r.share for r in cnn if (r.share or 0) < CNN_SHARE}
            s["transformers"] = len(tr)
            s["transformer_share_ok"] = sum(1 for r in tr if (r.share or 0) >= TRANSFORMER_SHARE)
            s["transformer_low_share"] = {r.name: r.share for r in tr if (r.share or 0) < TRANSFORMER_SHARE}
        elif source == "hf":
            s["frontends"] = dict(collections.Counter(r.frontend or "-" for r in ran))
            s["share_ok"] = sum(1 for r in ran if (r.share or 0) >= TRANSFORMER_SHARE)
        else:
            fx = [r for r in rs if r.timm_fx]
            s["families"] = len(rs)
            s["built"] = sum(1 for r in rs if r.input and not r.reason.startswith("pick input size"))
            s["timm_traceable"] = len(fx)
            s["timm_traceable_exact"] = sum(1 for r in fx if r.status == "ok" and r.exact)
            s["timm_traceable_share_ok"] = sum(1 for r in fx if (r.share or 0) >= TRANSFORMER_SHARE)
            s["timm_traceable_share_ok_pct"] = (100.0 * s["timm_traceable_share_ok"] / len(fx)) if fx else None
            trf = [r for r in fx if r.kind == "transformer"]
            s["timm_traceable_transformers"] = len(trf)
            s["timm_traceable_transformers_exact"] = sum(1 for r in trf if r.status == "ok" and r.exact)
            s["timm_traceable_transformers_share_ok"] = sum(1 for r in trf if (r.share or 0) >= TRANSFORMER_SHARE)
            s["timm_traceable_not_exact"] = {r.name: r.reason for r in fx if not (r.status == "ok" and r.exact)}
            s["timm_traceable_low_share"] = {r.name: r.share for r in fx if (r.share or 0) < TRANSFORMER_SHARE}
        out[f"ratio_{ratio}"] = s
    return out


def summary_lines(summary: dict, source: str) -> list[str]:
    """The ``SUMMARY`` lines printed under the table, one per ratio."""
    lines = []
    for key, s in summary.items():
        r = key.split("_")[1]
        skip_why = collections.Counter(re.sub(r"~?[\d.]+ GiB", "N GiB", v) for v in s["skipped"].values())
        skips = "; ".join(f"{n}x {w}" for w, n in skip_why.items()) or "none"
        if "detection" in s:
            d = s["detection"]
            share = ("whole-model share {:.3f} / {:.3f} / {:.3f} (min / median / max)".format(*d["whole_share"])
                     if d["whole_share"] else "whole-model share -")
            dtypes = ", ".join(f"{k} {v}" for k, v in sorted(d["dtypes"].items())) or "-"
            lines.append(
                f"SUMMARY ratio {r}: {s['exact']}/{s['ran']} run detectors exact through scope "
                f"{'/'.join(d['scopes'])} (eval+train; eval {s['exact_eval']}, train {s['exact_train']}; {dtypes}), "
                f"fold to their class with the same keys and detections {d['fold_exact']}/{d['fold_checked']}; "
                f"scope share >= {CNN_SHARE}: {d['scope_share_ok']}/{s['ran']}; {share}; whole outputs equal "
                f"directly: eval {d['direct_equal_eval']}, train {d['direct_equal_train']} (the others differ only "
                f"after a discontinuous selection, top-k/NMS, of rounding-level differences); fallbacks in {len(s['with_fallbacks'])}; "
                f"skipped {len(s['skipped'])} ({skips})")
        elif source == "torchvision":
            lines.append(
                f"SUMMARY ratio {r}: {s['exact']}/{s['ran']} run models exact (eval+train; "
                f"eval {s['exact_eval']}, train {s['exact_train']}), traced {s['traced']}/{s['ran']}; "
                f"CNNs with share >= {CNN_SHARE}: {s['cnn_share_ok']}/{s['cnn']}; transformers with share "
                f">= {TRANSFORMER_SHARE}: {s['transformer_share_ok']}/{s['transformers']}; "
                f"fallbacks in {len(s['with_fallbacks'])}; under-widened {len(s['under_widened'])}; "
                f"skipped {len(s['skipped'])} ({skips})")
        elif source == "hf":
            fronts = ", ".join(f"{k} {v}" for k, v in sorted(s["frontends"].items())) or "none"
            lines.append(
                f"SUMMARY ratio {r}: {s['exact']}/{s['ran']} run models exact (eval+train), front ends: {fronts}; "
                f"share >= {TRANSFORMER_SHARE}: {s['share_ok']}/{s['ran']}; fallbacks in {len(s['with_fallbacks'])}; "
                f"skipped {len(s['skipped'])} ({skips})")
        else:
            pct = s["timm_traceable_share_ok_pct"]
            lines.append(
                f"SUMMARY ratio {r}: {s['families']} families; timm can FX-trace {s['timm_traceable']}; of "
                f"those exact (eval+train) {s['timm_traceable_exact']}/{s['timm_traceable']}, share >= "
                f"{TRANSFORMER_SHARE}: {s['timm_traceable_share_ok']}/{s['timm_traceable']}"
                f" ({pct:.0f}%)" if pct is not None else f"SUMMARY ratio {r}: {s['families']} families; none traceable")
            lines[-1] += (f"; transformers among them: exact {s['timm_traceable_transformers_exact']}/"
                          f"{s['timm_traceable_transformers']}, share >= {TRANSFORMER_SHARE} "
                          f"{s['timm_traceable_transformers_share_ok']}/{s['timm_traceable_transformers']}; "
                          f"all families exact {s['exact']}/{s['ran']}; fallbacks in {len(s['with_fallbacks'])}; "
                          f"skipped {len(s['skipped'])} ({skips})")
    return lines


def _set_threads(n: int) -> None:
    torch.set_num_threads(n)


def run_worker(args) -> None:
    """Subprocess entry: measure one (model, ratio) and write the row as JSON."""
    _set_threads(args.threads)
    _die_with_parent()
    if args.mem_limit_gib:
        # A hard address-space cap turns a runaway allocation into a MemoryError row instead of
        # the kernel's OOM killer picking some process on this shared machine.
        lim = int(args.mem_limit_gib * GIB)
        resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
    if args.worker == "__timing__":
        res = time_resnet50()
        Path(args.worker_out).write_text(json.dumps(res))
        return
    spec = Spec(**json.loads(args.worker))
    row = measure(spec, args.worker_ratio, dtype=args.dtype, max_gib=args.max_gib,
                  branches=args.branches, do_fold=args.fold, check_free_memory=args.free_memory_check,
                  frontend=args.frontend)
    Path(args.worker_out).write_text(json.dumps(asdict(row)))


def _die_with_parent() -> None:
    """Linux: have the kernel kill this worker when the driver dies (no orphaned sweeps)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def _spawn(payload: str, ratio: int, args, timeout: float) -> tuple[dict | None, str, int | None]:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "row.json"
        err = Path(d) / "stderr.txt"
        # the installed module, not a script path: the same worker from a checkout or a wheel
        cmd = [sys.executable, "-m", "gpd_fx.testing.zoo", "--worker", payload, "--worker-ratio", str(ratio),
               "--worker-out", str(out), "--threads", str(args.threads), "--dtype", args.dtype,
               "--max-gib", str(args.max_gib), "--branches", args.branches, "--frontend", args.frontend,
               "--mem-limit-gib", str(args.mem_limit_gib)]
        if not args.free_memory_check:
            cmd.append("--no-free-memory-check")
        if args.fold:
            cmd.append("--fold")
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONWARNINGS="ignore")
        with open(err, "w") as ef:
            try:
                p = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=ef, timeout=timeout, env=env)
                rc = p.returncode
            except subprocess.TimeoutExpired:
                rc = None
        tail = err.read_text(errors="replace")[-2000:]
        data = json.loads(out.read_text()) if out.exists() else None
        return data, tail, rc


def run_one(spec: Spec, ratio: int, args) -> Row:
    """Measure ``spec`` at ``ratio`` in a worker subprocess (or in process with ``--no-isolate``);
    a timeout or a crash of the worker becomes a row too."""
    if not args.isolate:
        return measure(spec, ratio, dtype=args.dtype, max_gib=args.max_gib, branches=args.branches,
                       do_fold=args.fold, check_free_memory=args.free_memory_check, frontend=args.frontend)
    data, tail, rc = _spawn(json.dumps(asdict(spec)), ratio, args, args.timeout)
    if data is not None:
        return Row(**data)
    row = Row(spec.name, spec.source, ratio, family=spec.family)
    if rc is None:
        row.status, row.reason = "timeout", f"no result within {args.timeout:g} s"
    else:
        last = [ln for ln in tail.strip().splitlines() if ln.strip()][-1:] or [""]
        sig = f"signal {-rc}" if rc < 0 else f"exit code {rc}"
        oom = " (killed: out of memory?)" if rc in (-9, 137) else ""
        row.status, row.reason = "crashed", f"{sig}{oom}: {last[0][:300]}"
    return row


_ratio = positive_int("ratio", "a ratio r makes the teacher r x wider")
_positive_int = positive_int()


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def _mem_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024 / GIB
    except OSError:
        pass
    return None


def parse_args(argv=None):
    """Parse the sweep's command line (``argv=None`` reads ``sys.argv``)."""
    return build_parser().parse_args(argv)


def build_parser() -> argparse.ArgumentParser:
    """The command line of this script (every option's help states its default)."""
    total = _mem_total_gib()
    # budgets scale with the machine the sweep runs on (fixed fallbacks where /proc is missing)
    max_gib = round(0.8 * total, 1) if total else 20.0
    mem_limit = round(0.9 * total, 1) if total else 0.0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", choices=["torchvision", "timm", "hf"], default="torchvision",
                   help="model zoo: every torchvision classifier, one model per timm family, or Hugging "
                        "Face architectures built from small configs (needs the hf extra) (default: %(default)s)")
    p.add_argument("--frontend", choices=["auto", "fx", "export"], default="auto",
                   help="expand's capture: torch.fx, torch.export, or FX then export (default: %(default)s)")
    p.add_argument("--tasks", default="classification",
                   help="torchvision: comma-separated tasks out of " + ", ".join(TASKS) + ", or 'all' "
                        "(default: %(default)s)")
    p.add_argument("--scope", nargs="+", default=list(DEFAULT_SCOPE),
                   help="detection: the submodules expand widens (expand's scope=), e.g. backbone head "
                        "for RetinaNet/FCOS (default: %(default)s)")
    p.add_argument("--ratio", type=_ratio, nargs="+", default=[2, 3],
                   help="expansion ratios r >= 1 (default: 2 3)")
    p.add_argument("--models", default="", help="comma-separated model names (timm: names or families) "
                                                "(default: the whole zoo)")
    p.add_argument("--image-size", type=_positive_int, default=None,
                   help="input side for every model (default: per model)")
    p.add_argument("--json", default=None, help="output JSON, rewritten after every row "
                                                "(default: zoo_<source>.json in the current directory)")
    p.add_argument("--limit", type=_positive_int, default=None, help="first K models only (default: all)")
    p.add_argument("--fold", action="store_true", help="also fill fold/export/onnx columns (default: off)")
    p.add_argument("--dtype", choices=["auto", "float64", "float32"], default="auto",
                   help="auto: float64 when the float64 teacher fits --max-gib, else float32 "
                        "(default: %(default)s)")
    p.add_argument("--branches", choices=["default", "none", "all"], default="default",
                   help="multi-branch (CBR) kinds of the teacher's conv/linear layers: none = IR only "
                        "(expand's branches=()), all = every kind that applies (expand's branches=None), "
                        "default = expand's own default, i.e. none (default: %(default)s)")
    p.add_argument("--max-gib", type=_positive_float, default=max_gib,
                   help="memory budget per model in GiB; a model estimated above it is a skipped row "
                        "(default: 80%% of this machine's memory, %(default)s)")
    p.add_argument("--mem-limit-gib", type=float, default=mem_limit,
                   help="hard address-space cap of each worker in GiB, 0 = none "
                        "(default: 90%% of this machine's memory, %(default)s)")
    p.add_argument("--no-free-memory-check", dest="free_memory_check", action="store_false",
                   help="do not skip a model whose estimate exceeds the memory free when it starts "
                        "(default: such a model is a skipped row, 'rerun')")
    p.add_argument("--threads", type=_positive_int, default=1,
                   help="torch threads per model; the inputs are tiny (batch 2), and more threads mostly "
                        "wait on each other when the cores are busy (default: %(default)s)")
    p.add_argument("--timeout", type=_positive_float, default=1800.0,
                   help="seconds per model and ratio (default: %(default)s)")
    p.add_argument("--no-isolate", dest="isolate", action="store_false",
                   help="run in this process (default: one subprocess per model and ratio)")
    p.add_argument("--resume", action="store_true", help="keep rows already in the JSON file (default: off)")
    p.add_argument("--rerun", default="",
                   help="with --resume: comma-separated models (timm: names or families) whose rows are "
                        "measured again, e.g. after a fix (default: none)")
    p.add_argument("--no-timing", dest="timing", action="store_false",
                   help="skip the ResNet-50 timing row (default: timed)")
    p.add_argument("--all-ratios", action="store_true",
                   help="timm: run every ratio on every family (default: ratios after the first "
                        "only on transformers)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-ratio", type=int, default=2, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    return p


def _parse_tasks(text: str) -> tuple[str, ...]:
    if text.strip() == "all":
        return TASKS
    tasks = tuple(t.strip() for t in text.split(",") if t.strip())
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        raise SystemExit(f"--tasks: unknown task(s) {bad or [text]}; choose from {', '.join(TASKS)} or 'all'")
    return tasks


def main(argv=None) -> int:
    """Run the sweep: print the table and the summary, write the JSON file; returns the exit status."""
    args = parse_args(argv)
    if args.worker is not None:
        run_worker(args)
        return 0
    _set_threads(args.threads)
    from tqdm import tqdm

    tasks = _parse_tasks(args.tasks)
    if args.source == "torchvision":
        # named models are looked up in every task, so `--models r3d_18` needs no --tasks
        specs = torchvision_specs(args.image_size, TASKS if args.models else tasks, scope=tuple(args.scope))
    elif args.source == "hf":
        specs = hf_specs()
    else:
        specs = timm_specs(args.image_size)
    if args.models:
        want = [m.strip() for m in args.models.split(",") if m.strip()]
        by_name = {s.name: s for s in specs}
        chosen = []
        for w in want:
            if w in by_name:
                chosen.append(by_name[w])
            elif args.source == "timm" and any(s.family == w for s in specs):
                chosen += [s for s in specs if s.family == w]
            elif args.source == "timm":
                chosen.append(Spec("timm", w, {}, args.image_size, family=family(w)))
            else:
                print(f"unknown model {w!r}", file=sys.stderr)
                return 2
        specs = chosen
    if args.limit:
        specs = specs[:args.limit]
    out_path = Path(args.json) if args.json else Path.cwd() / f"zoo_{args.source}.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    done: dict = {}
    rerun = {m.strip() for m in args.rerun.split(",") if m.strip()}
    if args.resume and out_path.exists():
        for d in json.loads(out_path.read_text()).get("rows", []):
            r = Row(**d)
            if r.status != "skipped" and r.name not in rerun and r.family not in rerun:
                # skips are re-judged: cheap, and the budget may differ
                done[(r.name, r.ratio)] = r
    env = environment(args.threads)
    print(f"# gpd_fx zoo benchmark, source={args.source}, ratios={args.ratio}, heads num_classes=10, "
          f"random weights, batch {BATCH}; torch {env['torch']}, {env['cpu_count']} CPUs, "
          f"{args.threads} thread(s)/model, budget {args.max_gib:g} GiB/model; {env['date']}")
    print("# exact = max|teacher - student| / max|student| <= tol (float64: 1e-9, float32: 1e-3), "
          "eval and train mode (dropout p=0, same seed per forward)")
    fold_on = args.fold
    print(header(fold_on, args.source))
    rows: list[Row] = []
    kinds: dict[str, str] = {}
    jobs = [(s, r) for r in args.ratio for s in specs]
    bar = tqdm(jobs, desc="zoo", file=sys.stderr, dynamic_ncols=True)
    payload = {"environment": env, "config": {k: v for k, v in vars(args).items() if not k.startswith("worker")}}
    for spec, ratio in bar:
        bar.set_postfix_str(f"{spec.name} r{ratio}")
        if (args.source == "timm" and not args.all_ratios and ratio != args.ratio[0]
                and kinds.get(spec.name) not in (None, "transformer")):
            continue
        row = done.get((spec.name, ratio)) or run_one(spec, ratio, args)
        kinds[spec.name] = row.kind or kinds.get(spec.name, "")
        rows.append(row)
        tqdm.write(format_row(row, fold_on), file=sys.stdout)
        payload["rows"] = [asdict(r) for r in rows]
        payload["summary"] = summarize(rows, args.source)
        _atomic_write(out_path, payload)
    bar.close()
    summary = summarize(rows, args.source)
    row_tasks = sorted({r.task for r in rows}, key=TASKS.index) if args.source == "torchvision" else []
    if row_tasks and row_tasks != ["classification"]:
        payload["summary_by_task"] = {}
        for task in row_tasks:
            s_task = summarize([r for r in rows if r.task == task], args.source)
            payload["summary_by_task"][task] = s_task
            for line in summary_lines(s_task, args.source):
                print(line.replace("SUMMARY ", f"SUMMARY {task} ", 1))
    else:
        for line in summary_lines(summary, args.source):
            print(line)
    if args.timing and args.source == "torchvision":
        timing = _timing(args)
        payload["timing"] = timing
        for label, t in timing.items():
            if isinstance(t, dict):
                runs = ", ".join(f"{s:.2f}" for s in t["runs_s"])
                print(f"TIMING resnet50 ratio 3, 1x3x64x64, float32, {args.threads} thread(s), {label}: "
                      f"expand {t['median_s']:.2f} s (median of 3 in one process: {runs}) (target < 3 s)")
            else:
                print(f"TIMING resnet50: {t}")
    payload["summary"] = summary
    payload["rows"] = [asdict(r) for r in rows]
    _atomic_write(out_path, payload)
    print(f"# wrote {out_path}")
    return 0


def _timing(args) -> dict:
    if not args.isolate:
        return time_resnet50()
    data, tail, rc = _spawn("__timing__", 3, args, args.timeout)
    return data if data is not None else {"error": f"rc={rc}: {tail.strip().splitlines()[-1:] }"}


def _atomic_write(path: Path, payload: dict) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(payload, indent=1, default=str)))


if __name__ == "__main__":
    sys.exit(main())
