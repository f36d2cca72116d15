"""Accuracy benchmark on digits: does GPD give a better student than plain training or KD?

    python benchmarks/accuracy.py                          # 3 seeds x 10 epochs, small_cnn at 16x16
    python benchmarks/accuracy.py --seeds 0,1,2,3,4 --epochs 15 --json /tmp/acc.json
    python benchmarks/accuracy.py --teacher-per-seed       # train the static teacher once per seed

The same student (``gpd_fx.models.small_cnn``, identical initial weights within a seed) is
trained on scikit-learn's digits for the same number of epochs in four ways:

====  ========================================================================================
a     plain: cross-entropy only (``gpd_fx.trainer.fit_plain``)
b     Hinton KD: ``CE + 1.0 * KD(T=4)`` from a fixed static teacher (``fit_plain(teacher=...)``)
c     GPD from scratch: ``gpd_fx.trainer.train`` (ratio 2, IR teacher, the default GPD loss:
      label-smoothed soft CE from the dynamic teacher, weight 3)
d     GPD + static teacher: ``train(..., static_teacher=...)``, the same KD term as (b) into both
      the dynamic teacher and the student
====  ========================================================================================

The static teacher is ``gpd_fx.models.wide_cnn`` (width 48, about 9x the student's
parameters), trained plainly with the same recipe and epochs. By default it is trained **once**
(with ``--teacher-seed``) and the same frozen teacher serves every seed, so the spread over
seeds is the students' own; ``--teacher-per-seed`` trains one per seed instead.

Every method shares the trainer's recipe (SGD momentum 0.9 Nesterov, lr 0.05, cosine schedule,
weight decay 5e-4 on weights, batch 64, last partial batch dropped) and, within a seed, the
same data order and initial student. The train/validation split (80/20, stratified) is fixed
(``--split-seed``), so every seed is scored on the same 360 validation images. Reported: final
validation accuracy of the student (for c/d that of ``dt.student`` and of the folded student,
which must agree, and of the dynamic teacher), mean and sample std over seeds, and the
maximum |folded(x) - dt.student(x)| over the validation set.

Runs with one torch thread by default (see ``benchmarks/train_step.py``: on a shared machine a
two-thread pool mostly waits); ``--threads`` changes it.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from gpd_fx.data import digits_datasets
from gpd_fx.losses import GPDLossConfig
from gpd_fx.models import small_cnn, wide_cnn
from gpd_fx.trainer import TrainConfig, evaluate, fit_plain, train

HERE = Path(__file__).resolve().parent
DEFAULT_JSON = HERE / "results" / "accuracy.json"
METHODS = {
    "a_plain": "(a) plain CE",
    "b_kd": "(b) Hinton KD from static teacher",
    "c_gpd": "(c) GPD from scratch",
    "d_gpd_static": "(d) GPD + static teacher",
}


@contextlib.contextmanager
def _quiet(enabled: bool):
    """Swallow the trainer's per-epoch lines unless ``--verbose``."""
    if not enabled:
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def _config(args: argparse.Namespace, seed: int, out_dir: str) -> TrainConfig:
    return TrainConfig(
        model="gpd_fx.models:small_cnn", data="digits", image_size=args.image_size, in_chans=3,
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, ratio=args.ratio,
        branches=args.branches, expand_seed=seed, seed=seed, device="cpu", progress=False,
        export_onnx=False, out_dir=out_dir, loss=GPDLossConfig(),
    )


@torch.no_grad()
def _fold_max_diff(res, val_ds) -> float:
    """max |folded(x) - dt.student(x)| over the validation set (both in eval mode)."""
    x = torch.stack([val_ds[i][0] for i in range(len(val_ds))])
    dt = res.dt.cpu().eval()
    folded = res.student.cpu().eval()
    return float((folded(x) - dt.student(x)).abs().max())


def _train_static_teacher(args: argparse.Namespace, seed: int, train_ds, val_ds) -> tuple[nn.Module, dict]:
    torch.manual_seed(seed)
    teacher = wide_cnn(10, 3)
    cfg = _config(args, seed, "unused")
    t0 = time.perf_counter()
    teacher, hist = fit_plain(teacher, cfg, train_ds, val_ds, epochs=args.epochs, desc="static teacher")
    info = {"seed": seed, "val_acc": hist[-1]["val_acc"], "seconds": time.perf_counter() - t0,
            "params": sum(p.numel() for p in teacher.parameters()), "history": hist}
    print(f"  static teacher wide_cnn (seed {seed}): val acc {100 * info['val_acc']:.2f}%  "
          f"({info['seconds']:.0f} s)", flush=True)
    return teacher, info


def run_seed(args: argparse.Namespace, seed: int, teacher: nn.Module, train_ds, val_ds) -> dict[str, Any]:
    torch.manual_seed(seed)
    student0 = small_cnn(10, 3)  # every method starts from these weights
    out: dict[str, Any] = {}

    with tempfile.TemporaryDirectory(prefix="gpd_acc_") as tmp:
        cfg = _config(args, seed, tmp)

        t0 = time.perf_counter()
        model, hist = fit_plain(copy.deepcopy(student0), cfg, train_ds, val_ds, desc="plain")
        out["a_plain"] = {"student_acc": hist[-1]["val_acc"], "seconds": time.perf_counter() - t0, "history": hist}

        t0 = time.perf_counter()
        model, hist = fit_plain(copy.deepcopy(student0), cfg, train_ds, val_ds, teacher=teacher, kd="kd",
                                kd_weight=cfg.loss.static_kd_weight, desc="kd")
        out["b_kd"] = {"student_acc": hist[-1]["val_acc"], "seconds": time.perf_counter() - t0, "history": hist}

        for key, static in (("c_gpd", None), ("d_gpd_static", teacher)):
            run_cfg = dataclasses.replace(cfg, out_dir=str(Path(tmp) / key))
            t0 = time.perf_counter()
            with _quiet(not args.verbose):
                res = train(copy.deepcopy(student0), run_cfg, train_ds, val_ds, static_teacher=static)
            out[key] = {
                "student_acc": res.student_acc, "folded_acc": res.folded_acc, "teacher_acc": res.teacher_acc,
                "fold_max_abs_diff": _fold_max_diff(res, val_ds), "seconds": time.perf_counter() - t0,
                "history": [{k: v for k, v in row.items() if k.startswith(("epoch", "val_", "train_", "gap"))}
                            for row in res.history],
            }
    line = "  ".join(f"{k[:1]} {100 * v['student_acc']:.2f}%" for k, v in out.items())
    print(f"  seed {seed}: {line}  (GPD teachers {100 * out['c_gpd']['teacher_acc']:.2f}% / "
          f"{100 * out['d_gpd_static']['teacher_acc']:.2f}%; "
          f"{sum(v['seconds'] for v in out.values()):.0f} s)", flush=True)
    return out


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(per_seed: dict[int, dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for key in METHODS:
        rows = [per_seed[s][key] for s in per_seed]
        entry: dict[str, Any] = {}
        for metric in ("student_acc", "folded_acc", "teacher_acc", "seconds"):
            vals = [r[metric] for r in rows if metric in r]
            if vals:
                m, sd = _mean_std(vals)
                entry[metric] = {"mean": m, "std": sd, "values": vals}
        if any("fold_max_abs_diff" in r for r in rows):
            entry["fold_max_abs_diff"] = max(r["fold_max_abs_diff"] for r in rows)
            entry["folded_equals_student"] = all(r["folded_acc"] == r["student_acc"] for r in rows)
        summary[key] = entry
    return summary


def print_table(results: dict[str, Any]) -> None:
    s = results["summary"]
    cfg = results["config"]
    print(f"\n== digits {cfg['image_size']}x{cfg['image_size']}, small_cnn student, {cfg['epochs']} epochs, "
          f"seeds {cfg['seeds']}, GPD ratio {cfg['ratio']} (branches={cfg['branches']})")
    teachers = results["static_teachers"]
    accs = [t["val_acc"] for t in teachers]
    m, sd = _mean_std(accs)
    print(f"static teacher wide_cnn ({teachers[0]['params']:,} params, "
          f"{'one per seed' if cfg['teacher_per_seed'] else 'trained once, seed ' + str(cfg['teacher_seed'])}): "
          f"val acc {100 * m:.2f}%" + (f" ± {100 * sd:.2f}" if len(accs) > 1 else ""))
    print(f"{'method':<36} {'student val acc %':>18} {'folded %':>16} {'dyn. teacher %':>16} "
          f"{'fold |diff|':>11} {'s/seed':>7}")

    def fmt(e: dict | None) -> str:
        return f"{100 * e['mean']:6.2f} ± {100 * e['std']:4.2f}" if e else ""

    for key, label in METHODS.items():
        e = s[key]
        diff = f"{e['fold_max_abs_diff']:.1e}" if "fold_max_abs_diff" in e else ""
        print(f"{label:<36} {fmt(e.get('student_acc')):>18} {fmt(e.get('folded_acc')):>16} "
              f"{fmt(e.get('teacher_acc')):>16} {diff:>11} {e['seconds']['mean']:>7.0f}")
    print("per seed (student val acc %): " + "; ".join(
        f"{k[:1]} " + " ".join(f"{100 * v:.2f}" for v in s[k]["student_acc"]["values"]) for k in METHODS))


def _list_int(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=_list_int, default=[0, 1, 2], help="comma list of seeds (default 0,1,2)")
    p.add_argument("--epochs", type=int, default=10, help="epochs of every method and of the teacher (default 10)")
    p.add_argument("--image-size", type=int, default=16, help="digits are resized to this side (default 16)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--ratio", type=int, default=2, help="GPD expansion ratio (default 2)")
    p.add_argument("--branches", default="none", help="GPD multi-branch kinds: none (IR only, default) or all")
    p.add_argument("--teacher-seed", type=int, default=100, help="seed of the once-trained static teacher")
    p.add_argument("--teacher-per-seed", action="store_true",
                   help="train a static teacher per seed (seed + 100) instead of once")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the fixed train/val split")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"output JSON (default {DEFAULT_JSON})")
    p.add_argument("--verbose", action="store_true", help="show the trainer's per-epoch lines")
    args = p.parse_args(argv)
    if len(args.seeds) < 1 or args.epochs < 1:
        p.error("need at least one seed and one epoch")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    train_ds, val_ds, num_classes = digits_datasets(image_size=args.image_size, channels=3, seed=args.split_seed)
    print(f"digits: {len(train_ds)} train / {len(val_ds)} val images, {args.image_size}x{args.image_size}; "
          f"{args.epochs} epochs; seeds {args.seeds}", flush=True)

    teachers: list[dict] = []
    shared = None
    if not args.teacher_per_seed:
        shared, info = _train_static_teacher(args, args.teacher_seed, train_ds, val_ds)
        teachers.append(info)
    per_seed: dict[int, dict[str, Any]] = {}
    for seed in args.seeds:
        teacher = shared
        if teacher is None:
            teacher, info = _train_static_teacher(args, seed + 100, train_ds, val_ds)
            teachers.append(info)
        per_seed[seed] = run_seed(args, seed, teacher, train_ds, val_ds)

    check = None
    if shared is not None:  # sanity: distilling from the shared teacher left it unchanged
        check = evaluate({"t": shared}, DataLoader(val_ds, batch_size=512), "cpu")["t_acc"]
    results = {
        "config": {"seeds": args.seeds, "epochs": args.epochs, "image_size": args.image_size,
                   "batch_size": args.batch_size, "lr": args.lr, "ratio": args.ratio, "branches": args.branches,
                   "teacher_per_seed": args.teacher_per_seed, "teacher_seed": args.teacher_seed,
                   "split_seed": args.split_seed, "train_size": len(train_ds), "val_size": len(val_ds),
                   "trainer_defaults": {k: v for k, v in _config(args, 0, "-").to_dict().items()
                                        if k in ("optimizer", "momentum", "weight_decay", "schedule", "loss")}},
        "environment": {"date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
                        "python": platform.python_version(), "cpu_count": os.cpu_count(),
                        "threads": torch.get_num_threads(), "loadavg_start": load_start,
                        "loadavg_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
                        "argv": sys.argv[1:]},
        "static_teachers": teachers,
        "static_teacher_acc_after_all_runs": check,
        "per_seed": {str(k): v for k, v in per_seed.items()},
        "summary": summarise(per_seed),
        "total_seconds": time.perf_counter() - t_start,
    }
    print_table(results)
    print(f"\ntotal {results['total_seconds']:.0f} s; load average {load_start} -> "
          f"{results['environment']['loadavg_end']}; {torch.get_num_threads()} thread(s)")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.json.with_suffix(args.json.suffix + ".tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, args.json)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
