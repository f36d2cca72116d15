"""Accuracy benchmark: does GPD give a better student than plain training or KD, at every ratio?

    python benchmarks/accuracy.py                                   # shifted digits, 5 seeds, all methods
    python benchmarks/accuracy.py --seeds 0,1 --epochs 10 --ratios 2 --json /tmp/acc.json
    python benchmarks/accuracy.py --data digits                     # the saturated built-in images

Data (built locally, nothing downloaded):

- ``synth`` (default): scikit-learn's ``make_classification``, 10 classes of 4 Gaussian clusters
  each in 16 informative of 32 features (6,000 samples, fixed ``--data-seed``; 5,000 train /
  1,000 validation). The student is a 2-hidden-layer MLP of width 16 with BatchNorm; the static
  teacher the same MLP at width 128. The task is capacity-bound: the plain student stays ~15-20
  points under the wide model, so methods can be told apart (the built-in digits saturate: every
  method ends within one validation image of the others).
- ``shifted``: scikit-learn's bundled 8x8 digits, standardised, each pasted at a random offset
  into a 12x12 canvas with Gaussian noise (std 0.5) added; 1,437 train / 360 validation images,
  fixed by ``--data-seed``. Student: ``SmallCNN`` of width 4 (the built-in ResNet-like CNN);
  static teacher: the same at width 16. Plain training leaves the width-4 student ~11 points
  under the width-16 model (79% vs 90%, 15 epochs, measured).
- ``digits``: scikit-learn's bundled 8x8 digits at ``--image-size``, ``small_cnn`` student,
  ``wide_cnn`` static teacher.

Methods, all from the same initial student and data order within a seed (paired):

==================  ===========================================================================
plain               cross-entropy only (``fit_plain``)
plain_matched       plain, trained for as many epochs as fit in the wall time of GPD at ratio 2
                    (compute-matched baseline)
kd                  Hinton KD from the static teacher (trained once, ``--teacher-seed``)
gpd_r{R}_{ir,cbr}   GPD from scratch at ratio R, IR teacher (``branches=none``) or the default
                    multi-branch teacher (``branches=all``), with the width-aware param groups
                    (``--param-groups gpd``) and/or the old single-lr groups (``plain``)
gpd_static_r2_ir    GPD at ratio 2 plus the static teacher's KD into both models
==================  ===========================================================================

Reported: the student's final validation accuracy (for GPD that of the folded student, which must
equal ``dt.student``), mean +- sample std over seeds, and the paired delta against plain on the
same seed (mean and wins/seeds). Every run uses the trainer's recipe (SGD momentum 0.9 Nesterov,
cosine schedule, weight decay on weights only, batch 64) with one torch thread.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
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
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import TensorDataset

from gpd_fx.checkpoint import atomic_write
from gpd_fx.data import digits_datasets
from gpd_fx.losses import GPDLossConfig
from gpd_fx.models import SmallCNN, small_cnn, wide_cnn
from gpd_fx.trainer import TrainConfig, fit_plain, train


class MLP(nn.Module):
    """``Linear -> BN -> ReLU`` twice, then a linear classifier."""

    def __init__(self, d_in: int, width: int, classes: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d_in, width), nn.BatchNorm1d(width), nn.ReLU(),
                                  nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU())
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def synth_datasets(seed: int = 0) -> tuple[TensorDataset, TensorDataset, int]:
    """The capacity-bound synthetic task (see the module docstring), standardised features."""
    from sklearn.datasets import make_classification

    x, y = make_classification(n_samples=6000, n_features=32, n_informative=16, n_redundant=0, n_classes=10,
                               n_clusters_per_class=4, class_sep=1.5, flip_y=0.0, random_state=seed)
    x = torch.tensor(x, dtype=torch.float32)
    x = (x - x[:5000].mean(0)) / x[:5000].std(0)
    y = torch.tensor(y)
    return TensorDataset(x[:5000], y[:5000]), TensorDataset(x[5000:], y[5000:]), 10


def shifted_digits(seed: int = 0, canvas: int = 12, noise: float = 0.5) -> tuple[TensorDataset, TensorDataset, int]:
    """Digits at random offsets in a noisy canvas (see the module docstring)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(d.target), generator=g)
    x = torch.tensor(d.images, dtype=torch.float32)[perm]
    y = torch.tensor(d.target)[perm]
    x = (x - x.mean()) / x.std()
    out = torch.zeros(len(x), 1, canvas, canvas)
    off = torch.randint(0, canvas - 7, (len(x), 2), generator=g)
    for i in range(len(x)):
        out[i, 0, off[i, 0]:off[i, 0] + 8, off[i, 1]:off[i, 1] + 8] = x[i]
    out += noise * torch.randn(out.shape, generator=g)
    n_train = len(x) * 4 // 5
    return TensorDataset(out[:n_train], y[:n_train]), TensorDataset(out[n_train:], y[n_train:]), 10


def _task(args) -> tuple[Any, Any, Callable[[], nn.Module], Callable[[], nn.Module], str]:
    if args.data == "shifted":
        tr, va, k = shifted_digits(args.data_seed)
        return tr, va, (lambda: SmallCNN(k, 1, width=args.width)), (lambda: SmallCNN(k, 1, width=16)), \
            f"shifted noisy digits 12x12, SmallCNN width {args.width} vs 16"
    if args.data == "synth":
        tr, va, k = synth_datasets(args.data_seed)
        return tr, va, (lambda: MLP(32, args.width, k)), (lambda: MLP(32, 128, k)), \
            f"synth (make_classification 10x4 clusters, 32 features), MLP width {args.width} vs 128"
    tr, va, k = digits_datasets(image_size=args.image_size, channels=3, seed=args.data_seed)
    return tr, va, (lambda: small_cnn(k, 3)), (lambda: wide_cnn(k, 3)), \
        f"digits {args.image_size}x{args.image_size}, small_cnn vs wide_cnn"


@contextlib.contextmanager
def _quiet(enabled: bool):
    if not enabled:
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def _config(args, seed: int, out_dir: str, **kw) -> TrainConfig:
    base = dict(model="(benchmark module)", data=args.data, image_size=args.image_size, epochs=args.epochs,
                batch_size=64, lr=args.lr, expand_seed=seed, seed=seed, device="cpu", progress=False,
                export_onnx=False, out_dir=out_dir, loss=GPDLossConfig())
    base.update(kw)
    return TrainConfig(**base)


def method_names(args) -> list[str]:
    names = ["plain", "plain_matched", "kd"]
    first = args.param_groups[0]
    for r in args.ratios:
        for br in args.branches:
            # IR teachers with every group kind asked for; CBR and the static teacher with the first
            # (all combinations with --all-combinations)
            kinds = args.param_groups if br == "ir" or args.all_combinations else [first]
            for pg in kinds:
                names.append(f"gpd_r{r}_{br}" + ("" if pg == "gpd" else "_plaingroups"))
    if args.static:
        kinds = args.param_groups if args.all_combinations else [first]
        names += ["gpd_static_r2_ir" + ("" if pg == "gpd" else "_plaingroups") for pg in kinds]
    return names


def run_seed(args, seed: int, teacher: nn.Module, make_student, train_ds, val_ds) -> dict[str, Any]:
    torch.manual_seed(seed)
    student0 = make_student()  # every method starts from these weights
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="gpd_acc_") as tmp:
        def plain(key: str, epochs: int, **kw) -> None:
            t0 = time.perf_counter()
            cfg = _config(args, seed, tmp, epochs=epochs)
            _, hist = fit_plain(copy.deepcopy(student0), cfg, train_ds, val_ds, desc=key, **kw)
            out[key] = {"student_acc": hist[-1]["val_acc"], "epochs": epochs, "seconds": time.perf_counter() - t0}

        def gpd(key: str, ratio: int, branches: str, groups: str, static: nn.Module | None = None) -> None:
            cfg = _config(args, seed, str(Path(tmp) / key), ratio=ratio, branches=branches, param_groups=groups)
            t0 = time.perf_counter()
            with _quiet(not args.verbose):
                res = train(copy.deepcopy(student0), cfg, train_ds, val_ds, static_teacher=static)
            out[key] = {"student_acc": res.folded_acc, "dt_student_acc": res.student_acc,
                        "teacher_acc": res.teacher_acc, "seconds": time.perf_counter() - t0,
                        "gap_history": [row.get("gap") for row in res.history]}

        plain("plain", args.epochs)
        plain("kd", args.epochs, teacher=teacher, kd="kd", kd_weight=GPDLossConfig().static_kd_weight)
        for name in method_names(args):
            if not name.startswith("gpd"):
                continue
            groups = "plain" if name.endswith("_plaingroups") else "gpd"
            parts = name.split("_")
            if name.startswith("gpd_static"):
                gpd(name, 2, "none", groups, static=teacher)
            else:
                gpd(name, int(parts[1][1:]), "none" if parts[2] == "ir" else "all", groups)
        # compute-matched plain: the epochs that fit in the time GPD r2 IR took
        ref = out.get("gpd_r2_ir") or next((v for k, v in out.items() if k.startswith("gpd_")), None)
        epochs = args.epochs
        if ref is not None:
            epochs = max(args.epochs, round(args.epochs * ref["seconds"] / max(out["plain"]["seconds"], 1e-9)))
        plain("plain_matched", epochs)
    line = "  ".join(f"{k} {100 * v['student_acc']:.1f}" for k, v in out.items())
    print(f"  seed {seed}: {line}  ({sum(v['seconds'] for v in out.values()):.0f} s)", flush=True)
    return out


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(per_seed: dict[int, dict[str, Any]], names: list[str]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    seeds = sorted(per_seed)
    base = [per_seed[s]["plain"]["student_acc"] for s in seeds]
    for key in names:
        rows = [per_seed[s][key] for s in seeds if key in per_seed[s]]
        if not rows:
            continue
        entry: dict[str, Any] = {}
        for metric in ("student_acc", "teacher_acc", "seconds"):
            vals = [r[metric] for r in rows if metric in r]
            if vals:
                m, sd = _mean_std(vals)
                entry[metric] = {"mean": m, "std": sd, "values": vals}
        deltas = [per_seed[s][key]["student_acc"] - b for s, b in zip(seeds, base)]
        entry["delta_vs_plain"] = {"mean": statistics.mean(deltas), "wins": sum(d > 0 for d in deltas),
                                   "seeds": len(deltas), "values": deltas}
        if "dt_student_acc" in rows[0]:
            entry["folded_equals_dt_student"] = all(r["dt_student_acc"] == r["student_acc"] for r in rows)
        summary[key] = entry
    return summary


def format_table(results: dict[str, Any]) -> str:
    s = results["summary"]
    lines = [f"{results['config']['task']}; {results['config']['epochs']} epochs; seeds {results['config']['seeds']}; "
             f"static teacher {100 * results['static_teacher']['val_acc']:.2f}%",
             "| method | student acc % (mean ± std) | Δ vs plain (pts) | wins | dyn. teacher % | s/run |",
             "|---|---|---|---|---|---|"]
    for key, e in s.items():
        acc = e["student_acc"]
        d = e["delta_vs_plain"]
        t = e.get("teacher_acc")
        lines.append(f"| {key} | {100 * acc['mean']:.2f} ± {100 * acc['std']:.2f} | {100 * d['mean']:+.2f} | "
                     f"{d['wins']}/{d['seeds']} | "
                     + (f"{100 * t['mean']:.2f} ± {100 * t['std']:.2f}" if t else "") +
                     f" | {e['seconds']['mean']:.1f} |")
    return "\n".join(lines)


def _list_int(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def _list_str(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", choices=("shifted", "synth", "digits"), default="shifted",
                   help="task (see the module docstring)")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the data set and its split")
    p.add_argument("--width", type=int, default=None, help="student width (default: 4 for shifted, 16 for synth)")
    p.add_argument("--seeds", type=_list_int, default=[0, 1, 2, 3, 4], help="comma list of seeds")
    p.add_argument("--epochs", type=int, default=15, help="epochs of every method and of the static teacher")
    p.add_argument("--image-size", type=int, default=16, help="digits are resized to this side")
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (SGD, Nesterov); default 0.2 for shifted (the best of 0.05, 0.1, "
                        "0.2, 0.4 for plain training, seeds 0-1: 76.3, 80.7, 82.0, 78.9%%), 0.05 otherwise")
    p.add_argument("--ratios", type=_list_int, default=[2, 3, 4], help="GPD expansion ratios")
    p.add_argument("--branches", type=_list_str, default=["ir", "cbr"],
                   help="teacher kinds: ir (branches=none), cbr (branches=all)")
    p.add_argument("--param-groups", type=_list_str, default=["gpd", "plain"],
                   help="optimiser groups of the GPD runs: gpd (width-aware), plain (one lr), or both")
    p.add_argument("--no-static", dest="static", action="store_false", help="skip GPD + static teacher")
    p.add_argument("--all-combinations", action="store_true",
                   help="run CBR and GPD + static with every --param-groups kind, not only the first")
    p.add_argument("--teacher-seed", type=int, default=100, help="seed of the static teacher")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--json", type=Path, default=Path("accuracy.json"), help="output JSON")
    p.add_argument("--verbose", action="store_true", help="show the trainer's per-epoch lines")
    args = p.parse_args(argv)
    if args.lr is None:
        args.lr = 0.2 if args.data == "shifted" else 0.05
    if args.width is None:
        args.width = 4 if args.data == "shifted" else 16
    if not args.seeds or args.epochs < 1 or any(r < 1 for r in args.ratios):
        p.error("need at least one seed, one epoch and ratios >= 1")
    if set(args.branches) - {"ir", "cbr"} or set(args.param_groups) - {"gpd", "plain"}:
        p.error("--branches takes ir,cbr; --param-groups takes gpd,plain")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    train_ds, val_ds, make_student, make_teacher, task = _task(args)
    print(f"{task}: {len(train_ds)} train / {len(val_ds)} val; {args.epochs} epochs; seeds {args.seeds}", flush=True)
    torch.manual_seed(args.teacher_seed)
    teacher = make_teacher()
    t0 = time.perf_counter()
    teacher, hist = fit_plain(teacher, _config(args, args.teacher_seed, "unused"), train_ds, val_ds,
                              desc="static teacher")
    static = {"val_acc": hist[-1]["val_acc"], "seconds": time.perf_counter() - t0,
              "params": sum(p.numel() for p in teacher.parameters())}
    print(f"  static teacher: val acc {100 * static['val_acc']:.2f}% ({static['params']:,} params)", flush=True)
    names = method_names(args)
    per_seed = {seed: run_seed(args, seed, teacher, make_student, train_ds, val_ds) for seed in args.seeds}
    results = {
        "config": {"task": task, **{k: (v if not isinstance(v, Path) else str(v)) for k, v in vars(args).items()}},
        "environment": {"date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
                        "python": platform.python_version(), "threads": torch.get_num_threads(),
                        "loadavg_end": os.getloadavg() if hasattr(os, "getloadavg") else None},
        "static_teacher": static,
        "per_seed": {str(k): v for k, v in per_seed.items()},
        "summary": summarise(per_seed, names),
        "total_seconds": time.perf_counter() - t_start,
    }
    print("\n" + format_table(results))
    print(f"\ntotal {results['total_seconds']:.0f} s")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.json, lambda tmp: tmp.write_text(json.dumps(results, indent=2) + "\n"))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
