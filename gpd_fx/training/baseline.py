"""Plain (non-GPD) training of one model: the static teacher's pre-training and the benchmarks' baselines."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from gpd_fx.losses import get_kd_loss
from gpd_fx.training.config import TrainConfig
from gpd_fx.training.distributed import _env_dist, _resolve_device
from gpd_fx.training.errors import TrainingDivergedError
from gpd_fx.training.evaluate import evaluate
from gpd_fx.training.optim import _build_optimizer, _build_scheduler
from gpd_fx.training.progress import _progress_bar
from gpd_fx.training.rng import _seed_everything
from gpd_fx.training.samplers import _check_dataset, _EpochSampler


def fit_plain(model: nn.Module, cfg: TrainConfig, train_ds: Dataset, val_ds: Dataset, *,
              teacher: nn.Module | None = None, kd: str = "kd", kd_weight: float = 1.0,
              epochs: int | None = None, desc: str = "plain") -> tuple[nn.Module, list[dict[str, Any]]]:
    """Train one model plainly with cross-entropy, optionally plus KD from a frozen teacher.

    Used to pre-train a static teacher and as the baseline of ``benchmarks/accuracy.py``
    (plain student; Hinton KD student). Same optimizer, schedule and data order as
    :func:`train`; no checkpoints (runs are short), single process.

    Args:
        model: trained in place.
        cfg: optimizer, schedule, batch size, seed, device, progress.
        train_ds: training set.
        val_ds: validation set.
        teacher: frozen teacher for ``CE + kd_weight * KD(model, teacher)``.
        kd: :data:`gpd_fx.losses.KD_LOSSES` name of the KD term.
        kd_weight: its weight.
        epochs: overrides ``cfg.epochs``.
        desc: progress-bar label.

    Returns:
        ``(model, history)`` with ``val_acc`` per epoch in ``history``; the model in eval mode.
    """
    n = _check_dataset(train_ds, "training")
    _check_dataset(val_ds, "validation")
    # no process group here, but under torchrun each rank still takes its own GPU
    device = _resolve_device(cfg.device, _env_dist())
    epochs = cfg.epochs if epochs is None else epochs
    _seed_everything(cfg.seed)
    model = model.to(device).train()
    if teacher is not None:
        teacher = teacher.to(device).eval().requires_grad_(False)
    kd_fn = get_kd_loss(kd)
    sampler = _EpochSampler(n, cfg.seed)
    drop_last = n >= cfg.batch_size
    loader = DataLoader(train_ds, batch_size=cfg.batch_size, sampler=sampler, drop_last=drop_last,
                        num_workers=cfg.num_workers)
    val_loader = DataLoader(val_ds, batch_size=max(256, cfg.batch_size), num_workers=cfg.num_workers)
    steps = n // cfg.batch_size if drop_last else 1
    if cfg.max_steps_per_epoch:
        steps = min(steps, cfg.max_steps_per_epoch)
    run_cfg = dataclasses.replace(cfg, epochs=epochs)
    params = list(model.parameters())
    opt = _build_optimizer(model, run_cfg)
    sched = _build_scheduler(opt, run_cfg, steps)
    history = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        model.train()
        for i, (x, y) in enumerate(_progress_bar(cfg.progress, iterable=loader, total=steps, leave=False,
                                                 desc=f"{desc} {epoch + 1}/{epochs}")):
            if i >= steps:
                break
            x, y = x.to(device), y.to(device)
            logits = model(x)
            loss = nn.functional.cross_entropy(logits, y)
            if teacher is not None:
                with torch.no_grad():
                    t = teacher(x)
                loss = loss + kd_weight * kd_fn(logits, t, y, run_cfg.loss)
            if not torch.isfinite(loss):
                raise TrainingDivergedError(f"{desc}: loss is {float(loss):.4g} at epoch {epoch + 1}, step {i + 1}; "
                                            "try a lower --lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if run_cfg.grad_clip > 0:  # the same recipe as train()
                if not torch.isfinite(nn.utils.clip_grad_norm_(params, run_cfg.grad_clip)):
                    raise TrainingDivergedError(f"{desc}: gradient norm is not finite at epoch {epoch + 1}, "
                                                f"step {i + 1}; try a lower --lr")
            opt.step()
            sched.step()
        val = evaluate({"model": model}, val_loader, device)
        history.append({"epoch": epoch + 1, "val_acc": val["model_acc"], "val_loss": val["model_loss"]})
    return model.eval(), history
