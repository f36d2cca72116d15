"""Validation: accuracy and cross-entropy of several models in one pass, summed over ranks."""

from __future__ import annotations

from typing import Callable, Mapping

import torch
import torch.distributed as tdist
from torch import Tensor, nn
from torch.utils.data import DataLoader

from gpd_fx.training.progress import _progress_bar


@torch.no_grad()
def evaluate(models: Mapping[str, Callable[[Tensor], Tensor]], loader: DataLoader, device: torch.device | str,
             *, progress: bool = False, desc: str = "eval") -> dict[str, float]:
    """Accuracy and mean cross-entropy of several models on one loader, in one pass.

    Under ``torch.distributed`` every rank evaluates its shard and the sums are all-reduced,
    so each rank returns the metrics of the whole set. Modules are evaluated in eval mode
    and put back into the mode they were in.

    Args:
        models: ``{name: callable}``, e.g. ``{"teacher": dt, "student": dt.student}``.
        loader: yields ``(images, labels)``.
        device: where to run.
        progress: show a progress bar.
        desc: the bar's label.

    Returns:
        ``{f"{name}_acc": fraction, f"{name}_loss": mean CE}`` for every name, and ``"n"``.

    Example:
        >>> evaluate({"student": model}, val_loader, "cpu")["student_acc"]  # doctest: +SKIP
        0.97
    """
    owners = {name: getattr(fn, "__self__", fn) for name, fn in models.items()}
    modes = {name: m.training for name, m in owners.items() if isinstance(m, nn.Module)}
    for name in modes:
        owners[name].eval()
    device = torch.device(device)
    sums = torch.zeros(2 * len(models) + 1, dtype=torch.float64, device=device)
    try:
        for x, y in _progress_bar(progress, iterable=loader, desc=desc, leave=False):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            for i, fn in enumerate(models.values()):
                logits = fn(x).float()
                sums[2 * i] += (logits.argmax(1) == y).sum()
                sums[2 * i + 1] += nn.functional.cross_entropy(logits, y, reduction="sum")
            sums[-1] += y.numel()
    finally:
        for name, mode in modes.items():
            owners[name].train(mode)
    if tdist.is_available() and tdist.is_initialized():
        tdist.all_reduce(sums)
    n = max(1.0, float(sums[-1]))
    out: dict[str, float] = {"n": float(sums[-1])}
    for i, name in enumerate(models):
        out[f"{name}_acc"] = float(sums[2 * i]) / n
        out[f"{name}_loss"] = float(sums[2 * i + 1]) / n
    return out
