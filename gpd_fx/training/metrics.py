"""Training metrics: one epoch's running sums, and the metrics files rewritten from the history."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.distributed as tdist
from torch import Tensor

from gpd_fx.checkpoint import atomic_write


class _Accum:
    """Running sums of one epoch's training metrics, kept on the device (no per-step sync)."""

    KEYS = ("loss", "ce_teacher", "ce_student", "kd_teacher_static", "kd_student_static", "kd_student_dt")

    def __init__(self, device: torch.device, saved: Mapping[str, float] | None = None) -> None:
        self.sums = torch.zeros(len(self.KEYS) + 3, dtype=torch.float64, device=device)
        if saved:
            self.sums.copy_(torch.tensor([saved[k] for k in self.names()], dtype=torch.float64))

    def names(self) -> list[str]:
        return [*self.KEYS, "teacher_correct", "student_correct", "n"]

    def add(self, loss: Tensor, parts: Mapping[str, Tensor], t: Tensor, s: Tensor, y: Tensor) -> None:
        vals = [loss.detach(), *(parts[k] for k in self.KEYS[1:])]
        n = y.numel()
        row = torch.stack([v.double() * n for v in vals]
                          + [(t.argmax(1) == y).sum().double(), (s.argmax(1) == y).sum().double(),
                             torch.tensor(float(n), dtype=torch.float64, device=y.device)])
        self.sums += row

    def state(self) -> dict[str, float]:
        return dict(zip(self.names(), self.sums.tolist()))

    def summary(self) -> dict[str, float]:
        st = self.state()
        if tdist.is_available() and tdist.is_initialized():
            total = self.sums.clone()
            tdist.all_reduce(total)
            st = dict(zip(self.names(), total.tolist()))
        n = max(1.0, st["n"])
        out = {f"train_{k}": st[k] / n for k in self.KEYS}
        out["train_teacher_acc"] = st["teacher_correct"] / n
        out["train_student_acc"] = st["student_correct"] / n
        return out


def _write_metrics(history: list[dict[str, Any]], out: Path) -> tuple[Path, Path]:
    """Rewrite ``metrics.jsonl`` and ``metrics.csv`` from the history (atomic, resume-safe).

    Rewriting rather than appending keeps the files equal to the checkpoint's history after
    a resume, with no duplicated or lost epochs.
    """
    jsonl = atomic_write(out / "metrics.jsonl",
                         lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n" for r in history)))
    keys: list[str] = []
    for row in history:
        keys += [k for k in row if k not in keys]

    def write_csv(tmp: Path) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=keys)
        writer.writeheader()
        writer.writerows(history)
        tmp.write_text(buf.getvalue())

    return jsonl, atomic_write(out / "metrics.csv", write_csv)


def _write_outputs(history: list[dict[str, Any]], out: Path, title: str) -> dict[str, Path]:
    """``metrics.jsonl``, ``metrics.csv`` and the accuracy plot, all rewritten from the history."""
    from gpd_fx.plot import plot_accuracy

    paths: dict[str, Path] = {}
    paths["metrics_jsonl"], paths["metrics_csv"] = _write_metrics(history, out)
    paths["plot"] = plot_accuracy(history, out / "accuracy.png", title=title)
    return paths
