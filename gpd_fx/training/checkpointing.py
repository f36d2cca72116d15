"""A run's checkpoint: what it holds, how it is written (collectively, by rank 0) and restored.

Everything a run needs to continue exactly is in ``OUT/checkpoint.pt``: the teacher (which
holds the student's BN statistics), optimizer, scheduler, epoch and step, the interrupted
epoch's metric sums, every rank's RNG states, the config and the metrics so far. It is
written atomically after every epoch and on Ctrl-C, and never after a non-finite loss.
The file format itself (atomic write, validation) is :mod:`gpd_fx.checkpoint`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch.distributed as tdist

from gpd_fx.checkpoint import restore_optimizer, save_checkpoint
from gpd_fx.training.metrics import _Accum
from gpd_fx.training.rng import _rng_state, _seed_everything, _set_rng_state

if TYPE_CHECKING:
    from gpd_fx.training.setup import _Run


def _checkpoint_state(run: _Run, epoch: int, step_in_epoch: int, accum: _Accum | None) -> dict[str, Any]:
    """The checkpoint of the run at ``(epoch, step_in_epoch)``; collective under DDP (every
    rank's own RNG state is gathered, for an exact resume), so every rank must call it."""
    dist, cfg, dt = run.dist, run.cfg, run.dt
    rng = _rng_state()
    rngs = [rng]
    if dist.enabled:
        rngs = [None] * dist.world
        tdist.all_gather_object(rngs, rng)
    return {
        "dt": dt.state_dict(), "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
        "epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": run.global_step,
        "epoch_accum": accum.state() if accum is not None else None,
        "rng": rngs, "config": cfg.to_dict(), "expand_config": dict(getattr(dt, "expand_config", {})),
        "model_spec": cfg.model, "num_classes": run.num_classes,
        "image_size": cfg.image_size, "in_chans": cfg.in_chans, "history": run.history, "world_size": dist.world,
    }


def _save(run: _Run, epoch: int, step_in_epoch: int, accum: _Accum | None) -> None:
    """Write the checkpoint (rank 0) after every rank has contributed its state; then wait for all."""
    state = _checkpoint_state(run, epoch, step_in_epoch, accum)  # collective: every rank
    if run.dist.main:
        save_checkpoint(state, run.ckpt_path)
    if run.dist.enabled:
        tdist.barrier()


def _restore_or_seed(run: _Run) -> None:
    """On resume: optimizer and scheduler state (this run's lr, momentum and decay re-applied),
    the position, the history, the interrupted epoch's sums and this rank's RNG. Otherwise
    seed this rank's RNG."""
    cfg, dist, ckpt = run.cfg, run.dist, run.ckpt
    if ckpt is None:
        _seed_everything(cfg.seed + dist.rank)
        return
    applied = restore_optimizer(run.optimizer, run.scheduler, ckpt["optimizer"], ckpt.get("scheduler"),
                                f"checkpoint {str(cfg.resume)!r}")
    if applied:  # the restored state would have kept the old values; this run's config wins
        run.printer(f"resume: applying this run's optimizer settings from step {ckpt.get('global_step', 0)}: "
                    + "; ".join(applied))
    run.start_epoch, run.start_step = int(ckpt["epoch"]), int(ckpt.get("step_in_epoch", 0))
    run.global_step = int(ckpt.get("global_step", 0))
    run.history = list(ckpt.get("history", []))
    run.accum_saved = ckpt.get("epoch_accum")
    rngs = ckpt.get("rng") or []
    if dist.rank < len(rngs):
        _set_rng_state(rngs[dist.rank])
    else:
        _seed_everything(cfg.seed + 1000 * run.global_step + dist.rank)
    run.printer(f"resumed from {cfg.resume}: {run.start_epoch} epochs and {run.start_step} steps done "
                f"(global step {run.global_step})")
