"""GPD training end to end: expand -> train teacher and student jointly -> fold -> export.

One optimisation step (design.md section 3)::

    t, s  = dt(x), dt.student(x)              # teacher and student forwards
    loss  = gpd_loss(t, s, y, cfg.loss, T(x))  # CE for both, KD T->both, KD DT->S
    loss.backward(); optimizer.step()          # one backward; parameters are the DT's only

Everything a run needs to continue exactly is in its checkpoint (``OUT/checkpoint.pt``):
the teacher (which holds the student's BN statistics), optimizer, scheduler, epoch and
step, every rank's RNG states, the config and the metrics so far. It is written atomically
after every epoch and on Ctrl-C, and never after a non-finite loss.

Multi-process training uses ``torchrun`` and DDP: when ``WORLD_SIZE > 1`` in the environment
the process group is initialised from the ``env://`` variables (gloo on CPU, NCCL on CUDA),
the data are sharded, and only rank 0 writes files and shows progress bars.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import math
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as tdist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler

from gpd_fx.checkpoint import (CheckpointError, atomic_write, load_checkpoint, load_state_dict_checked,
                               load_student, prepare_run_dir, restore_optimizer, save_checkpoint, save_student)
from gpd_fx.compile import COMPILE_MODES, compile_step
from gpd_fx.errors import GPDError
from gpd_fx.losses import GPDLossConfig, gpd_loss, get_kd_loss
from gpd_fx.models import DEFAULT_STUDENT, build_model, resolve_stored_spec
from gpd_fx.param_groups import param_groups
from gpd_fx.teacher import DynamicTeacher
from gpd_fx.training.config import (_RESUME_FIXED, _STRUCTURAL, AMP_MODES, OPTIMIZERS, PARAM_GROUPS, SCHEDULES,
                                    TrainConfig, _check_resume)
from gpd_fx.training.distributed import _agree, _Dist, _env_dist, _init_distributed, _is_main_process, _resolve_device
from gpd_fx.training.errors import _AbortNow, TrainConfigError, TrainingDivergedError, TrainingInterrupted
from gpd_fx.training.optim import _build_optimizer, _build_scheduler, _lr_factor
from gpd_fx.training.progress import _Printer, _progress_bar
from gpd_fx.training.results import StepInfo, TrainResult
from gpd_fx.training.rng import _rng_state, _seed_everything, _set_rng_state
from gpd_fx.training.samplers import _check_dataset, _EpochSampler, _example_batch, _ShardSampler
from gpd_fx.training.signals import _deferred_sigint
from gpd_fx.training.baseline import fit_plain
from gpd_fx.training.evaluate import evaluate
from gpd_fx.training.expansion import _expand, _fold, _maybe_export, _num_classes
from gpd_fx.training.metrics import _Accum, _write_metrics

__all__ = [
    "StepInfo",
    "TrainConfig",
    "TrainConfigError",
    "TrainResult",
    "TrainingDivergedError",
    "TrainingInterrupted",
    "evaluate",
    "fit_plain",
    "fold_checkpoint",
    "run",
    "train",
]

# --------------------------------------------------------------------------- outputs


class _Joint(nn.Module):
    """``x -> (dt(x), dt.student(x))`` as one ``forward``, the unit DDP and compile wrap.

    DDP only synchronises gradients of computations that run inside its wrapped module's
    ``forward``; calling ``dt.student`` next to it would bypass the wrapper.
    """

    def __init__(self, dt: nn.Module) -> None:
        super().__init__()
        self.dt = dt

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.dt.joint(x)   # folds each multi-branch kernel once for both forwards


def train(model: nn.Module, cfg: TrainConfig, train_ds: Dataset, val_ds: Dataset,
          static_teacher: nn.Module | None = None, *,
          callbacks: Sequence[Callable[[StepInfo], None]] = ()) -> TrainResult:
    """Train ``model`` with Gap Preserving Distillation and return the folded student.

    Expands ``model`` into a dynamic teacher ``ratio`` times wider, trains teacher and student
    jointly (one forward of each, one backward per step) with :func:`gpd_fx.losses.gpd_loss`,
    evaluates both every epoch, checkpoints every epoch, then folds the student back into
    ``model``'s class and saves it (``.pt``, ``.safetensors`` and optionally ``.onnx``).

    Args:
        model: the student; ``expand`` copies it, so training never changes it. With
            ``cfg.student_checkpoint`` (fine-tuning) those weights are loaded into it first.
        cfg: the run's :class:`TrainConfig`. ``cfg.resume`` continues from a checkpoint.
        train_ds: map-style training set of ``(image, label)``.
        val_ds: validation set.
        static_teacher: optional pretrained teacher distilled into both (kept frozen, eval).
        callbacks: called with a :class:`StepInfo` after every completed step (rank 0 and
            others alike); raising ``KeyboardInterrupt`` there stops like Ctrl-C does.

    Returns:
        A :class:`TrainResult`.

    Raises:
        TrainingDivergedError: a non-finite loss (the last good checkpoint is kept).
        TrainingInterrupted: Ctrl-C; a checkpoint of the last completed step was saved.
        CheckpointError: ``cfg.resume`` or a weights file is corrupt or does not match.
        TrainConfigError: bad configuration, empty data set, resume mismatch.

    Example:
        >>> from gpd_fx.data import digits_datasets
        >>> from gpd_fx.models import small_cnn
        >>> tr, va, k = digits_datasets(image_size=16)
        >>> res = train(small_cnn(k), TrainConfig(epochs=1, out_dir="/tmp/gpd"), tr, va)  # doctest: +SKIP
        >>> res.paths["student_pt"]  # doctest: +SKIP
        PosixPath('/tmp/gpd/student.pt')
    """
    t_start = time.perf_counter()
    n_train = _check_dataset(train_ds, "training")
    _check_dataset(val_ds, "validation")
    dist = _init_distributed(cfg.device)
    try:
        return _train(model, cfg, train_ds, val_ds, static_teacher, callbacks, dist, n_train, t_start)
    finally:
        if dist.owns_group:
            tdist.destroy_process_group()


def _train(model, cfg, train_ds, val_ds, static_teacher, callbacks, dist, n_train, t_start) -> TrainResult:
    device = _resolve_device(cfg.device, dist)
    printer = _Printer(dist.main)
    show = cfg.progress and dist.main
    out = Path(cfg.out_dir)
    ckpt_path = out / "checkpoint.pt"

    ckpt = None
    if cfg.resume:
        ckpt = load_checkpoint(cfg.resume)
        _check_resume(ckpt, cfg, str(cfg.resume))
    elif cfg.student_checkpoint:
        load_state_dict_checked(model, load_student(cfg.student_checkpoint),
                                f"student checkpoint {cfg.student_checkpoint!r}")
    prepare_run_dir(out, resume=cfg.resume, overwrite=cfg.overwrite, main=dist.main)

    # ---- expand (on the CPU in float32, identically on every rank) ----
    example = _example_batch(train_ds).float()
    dt = _expand(model, cfg, example)
    num_classes = _num_classes(dt, example)
    dt = dt.to(device)
    if ckpt is not None:
        load_state_dict_checked(dt, ckpt["dt"], f"checkpoint {str(cfg.resume)!r}")
    if dist.main:
        printer(f"expanded: {dt.report.summary() if hasattr(dt.report, 'summary') else dt.report}")

    if static_teacher is not None:
        static_teacher = static_teacher.to(device).eval().requires_grad_(False)

    # ---- data ----
    sampler = _EpochSampler(n_train, cfg.seed, dist.rank, dist.world)
    per_rank = sampler.per_rank()
    # drop the last partial batch: BN fails on a batch of one, and compiled steps see one shape
    drop_last = per_rank >= cfg.batch_size
    pin = device.type == "cuda"
    loader_gen = torch.Generator()
    train_loader = DataLoader(train_ds, batch_size=cfg.batch_size, sampler=sampler, drop_last=drop_last,
                              num_workers=cfg.num_workers, pin_memory=pin, generator=loader_gen)
    val_loader = DataLoader(val_ds, batch_size=max(cfg.batch_size, 256), num_workers=cfg.num_workers,
                            sampler=_ShardSampler(len(val_ds), dist.rank, dist.world), pin_memory=pin)
    steps_per_epoch = per_rank // cfg.batch_size if drop_last else 1
    if cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)

    # ---- optimisation ----
    params = list(dt.parameters())
    optimizer = _build_optimizer(dt, cfg)
    scheduler = _build_scheduler(optimizer, cfg, steps_per_epoch)
    start_epoch, start_step, global_step = 0, 0, 0
    history: list[dict[str, Any]] = []
    accum_saved = None
    if ckpt is not None:
        applied = restore_optimizer(optimizer, scheduler, ckpt["optimizer"], ckpt.get("scheduler"),
                                    f"checkpoint {str(cfg.resume)!r}")
        if applied:  # the restored state would have kept the old values; this run's config wins
            printer(f"resume: applying this run's optimizer settings from step {ckpt.get('global_step', 0)}: "
                    + "; ".join(applied))
        start_epoch, start_step = int(ckpt["epoch"]), int(ckpt.get("step_in_epoch", 0))
        global_step = int(ckpt.get("global_step", 0))
        history = list(ckpt.get("history", []))
        accum_saved = ckpt.get("epoch_accum")
        rngs = ckpt.get("rng") or []
        if dist.rank < len(rngs):
            _set_rng_state(rngs[dist.rank])
        else:
            _seed_everything(cfg.seed + 1000 * global_step + dist.rank)
        printer(f"resumed from {cfg.resume}: {start_epoch} epochs and {start_step} steps done "
                f"(global step {global_step})")
    else:
        _seed_everything(cfg.seed + dist.rank)

    net: nn.Module = _Joint(dt)
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(net, device_ids=[device.index] if device.type == "cuda" else None)
    loss_cfg = cfg.loss
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if cfg.amp == "bf16" else contextlib.nullcontext()

    def step_fn(x: Tensor, y: Tensor, static_logits: Tensor | None):
        t_logits, s_logits = net(x)
        loss, parts = gpd_loss(t_logits.float(), s_logits.float(), y, loss_cfg, static_logits)
        return loss, parts, t_logits.detach(), s_logits.detach()

    step = compile_step(step_fn, cfg.compile)

    static_acc = None
    if static_teacher is not None:
        static_acc = evaluate({"static": static_teacher}, val_loader, device)["static_acc"]
        printer(f"static teacher {cfg.teacher or type(static_teacher).__name__}: val acc {100 * static_acc:.2f}%")

    def checkpoint_state(epoch: int, step_in_epoch: int, accum: _Accum | None) -> dict[str, Any]:
        rng = _rng_state()
        rngs = [rng]
        if dist.enabled:
            rngs = [None] * dist.world
            tdist.all_gather_object(rngs, rng)  # every rank's own RNG, for an exact resume
        return {
            "dt": dt.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": global_step,
            "epoch_accum": accum.state() if accum is not None else None,
            "rng": rngs, "config": cfg.to_dict(), "expand_config": dict(getattr(dt, "expand_config", {})),
            "model_spec": cfg.model, "num_classes": num_classes,
            "image_size": cfg.image_size, "in_chans": cfg.in_chans, "history": history, "world_size": dist.world,
        }

    def save(epoch: int, step_in_epoch: int, accum: _Accum | None) -> None:
        state = checkpoint_state(epoch, step_in_epoch, accum)  # collective: every rank
        if dist.main:
            save_checkpoint(state, ckpt_path)
        if dist.enabled:
            tdist.barrier()

    paths: dict[str, Path] = {}
    dt.train()
    with _deferred_sigint(printer) as sig:
        accum: _Accum | None = None
        # where a checkpoint written now would resume: updated only together with the state
        # it describes, so that an interrupt anywhere saves a consistent position
        pos = {"epoch": start_epoch, "step": start_step}
        try:
            for epoch in range(start_epoch, cfg.epochs):
                t_epoch = time.perf_counter()
                step_in_epoch = start_step if epoch == start_epoch else 0
                accum = _Accum(device, accum_saved if epoch == start_epoch else None)
                sampler.set_epoch(epoch, skip=step_in_epoch * cfg.batch_size)
                loader_gen.manual_seed(cfg.seed + epoch)  # worker seeds, same on resume
                dt.train()
                bar = _progress_bar(show, total=steps_per_epoch, initial=step_in_epoch,
                                    desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False)
                try:
                    for x, y in train_loader:
                        if step_in_epoch >= steps_per_epoch:
                            break
                        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                        static_logits = None
                        if static_teacher is not None:
                            with torch.no_grad(), amp:
                                static_logits = static_teacher(x).float()
                        optimizer.zero_grad(set_to_none=True)
                        with amp:
                            loss, parts, t_logits, s_logits = step(x, y, static_logits)
                        # one host sync per step: a non-finite loss must stop the run before
                        # its update reaches the weights, and all ranks must agree to stop
                        flags = torch.stack([(~torch.isfinite(loss.detach())).double(),
                                             torch.tensor(float(sig["stop"]), dtype=torch.float64, device=device)])
                        if dist.enabled:
                            tdist.all_reduce(flags, op=tdist.ReduceOp.MAX)
                        bad, stop = (bool(v) for v in flags.tolist())
                        if bad:
                            raise TrainingDivergedError(
                                f"loss is {float(loss.detach()):.4g} at epoch {epoch + 1}, step {step_in_epoch + 1} "
                                f"(global step {global_step + 1}); stopped before updating the weights"
                                + (f"; the last good checkpoint {str(ckpt_path)!r} is kept" if ckpt_path.exists() else "")
                                + "; try a lower --lr or --grad-clip")
                        loss.backward()
                        if cfg.grad_clip > 0:
                            # a finite loss can still have non-finite gradients (overflow in the
                            # backward); clipping would turn them into NaN weights without a word
                            norm = nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                            if not torch.isfinite(norm):  # the same on every rank: grads are all-reduced
                                raise TrainingDivergedError(
                                    f"gradient norm is {float(norm):.4g} at epoch {epoch + 1}, step "
                                    f"{step_in_epoch + 1} (global step {global_step + 1}); stopped before "
                                    "updating the weights"
                                    + (f"; the last good checkpoint {str(ckpt_path)!r} is kept" if ckpt_path.exists() else "")
                                    + "; try a lower --lr")
                        optimizer.step()
                        scheduler.step()
                        global_step += 1
                        step_in_epoch += 1
                        accum.add(loss, parts, t_logits, s_logits, y)
                        pos["epoch"], pos["step"] = epoch, step_in_epoch
                        loss_value = float(loss.detach())
                        bar.update(1)
                        bar.set_postfix(loss=f"{loss_value:.3f}", refresh=False)
                        if cfg.log_every and global_step % cfg.log_every == 0:
                            printer(f"epoch {epoch + 1} step {step_in_epoch}/{steps_per_epoch} loss {loss_value:.4f} "
                                    f"lr {scheduler.get_last_lr()[0]:.3g}")
                        info = StepInfo(epoch, step_in_epoch, global_step, loss_value)
                        for cb in callbacks:
                            cb(info)
                        # a single process can also honour a Ctrl-C that came during the
                        # callbacks; under DDP only the flag all-reduced above is agreed on
                        if stop or (sig["stop"] and not dist.enabled):
                            raise KeyboardInterrupt
                finally:
                    bar.close()

                # ---- end of epoch: evaluate, record, checkpoint ----
                if dist.enabled:
                    # DDP keeps parameters in sync, but BN statistics drift per rank within an
                    # epoch; take rank 0's so that every rank evaluates and saves one model
                    for b in dt.buffers():
                        tdist.broadcast(b, 0)
                train_metrics = accum.summary()
                val = evaluate({"teacher": dt, "student": dt.student}, val_loader, device,
                               progress=show, desc="eval")
                row = {"epoch": epoch + 1, "global_step": global_step, "lr": scheduler.get_last_lr()[0],
                       **train_metrics,
                       "val_teacher_acc": val["teacher_acc"], "val_student_acc": val["student_acc"],
                       "val_teacher_loss": val["teacher_loss"], "val_student_loss": val["student_loss"],
                       "gap": val["teacher_acc"] - val["student_acc"],
                       "epoch_seconds": time.perf_counter() - t_epoch}
                if static_acc is not None:
                    row["val_static_acc"] = static_acc
                history.append(row)
                accum = None
                pos["epoch"], pos["step"] = epoch + 1, 0
                save(epoch + 1, 0, None)
                if dist.main:
                    paths["metrics_jsonl"], paths["metrics_csv"] = _write_metrics(history, out)
                    from gpd_fx.plot import plot_accuracy

                    paths["plot"] = plot_accuracy(history, out / "accuracy.png",
                                                  title=f"GPD {cfg.model} x{cfg.ratio}")
                printer(f"epoch {epoch + 1}/{cfg.epochs}: loss {row['train_loss']:.4f}  "
                        f"val acc teacher {100 * row['val_teacher_acc']:.2f}%  "
                        f"student {100 * row['val_student_acc']:.2f}%  gap {100 * row['gap']:+.2f}  "
                        f"({row['epoch_seconds']:.1f} s)")
                if _agree(sig["stop"], dist, device) and epoch + 1 < cfg.epochs:
                    raise KeyboardInterrupt  # Ctrl-C during evaluation: stop before the next epoch
        except _AbortNow:
            raise
        except KeyboardInterrupt:
            # the state is that of `global_step` completed steps (see _deferred_sigint)
            save(pos["epoch"], pos["step"], accum)
            raise TrainingInterrupted(ckpt_path if dist.main else None, global_step) from None

    if not history:  # resumed from a finished run: nothing was trained here
        history = list(ckpt["history"]) if ckpt else []
    if dist.main:
        paths["checkpoint"] = ckpt_path
        if "metrics_jsonl" not in paths and history:
            from gpd_fx.plot import plot_accuracy

            paths["metrics_jsonl"], paths["metrics_csv"] = _write_metrics(history, out)
            paths["plot"] = plot_accuracy(history, out / "accuracy.png", title=f"GPD {cfg.model} x{cfg.ratio}")

    # ---- fold, final evaluation, export ----
    dt.eval()
    student, deploy = _fold(dt, cfg.fuse_bn)
    student = student.to(device)
    final = evaluate({"teacher": dt, "student": dt.student, "folded": student}, val_loader, device,
                     progress=show, desc="final eval")
    student = student.cpu()
    deploy = deploy.cpu()
    onnx_diff = None
    if dist.main:
        meta = {"model_spec": cfg.model, "num_classes": num_classes, "image_size": cfg.image_size,
                "in_chans": cfg.in_chans}
        paths["student_pt"], paths["student_safetensors"] = save_student(student, out / "student.pt", meta)
        if cfg.export_onnx:
            onnx_diff, onnx_path = _maybe_export(deploy, example, out / "student.onnx", printer)
            if onnx_path is not None:
                paths["onnx"] = onnx_path
        summary = {"teacher_acc": final["teacher_acc"], "student_acc": final["student_acc"],
                   "folded_acc": final["folded_acc"], "static_acc": static_acc, "onnx_max_abs_diff": onnx_diff,
                   "epochs": cfg.epochs, "global_step": global_step,
                   "seconds": time.perf_counter() - t_start, "paths": {k: str(v) for k, v in paths.items()}}
        atomic_write(out / "summary.json", lambda tmp: tmp.write_text(json.dumps(summary, indent=2) + "\n"))
        paths["summary"] = out / "summary.json"
    return TrainResult(dt=dt, student=student, history=history, teacher_acc=final["teacher_acc"],
                       student_acc=final["student_acc"], folded_acc=final["folded_acc"], static_acc=static_acc,
                       paths=paths, onnx_max_abs_diff=onnx_diff, seconds=time.perf_counter() - t_start)


# --------------------------------------------------------------------------------- run


def _static_teacher(cfg: TrainConfig, num_classes: int, train_ds: Dataset, val_ds: Dataset) -> nn.Module | None:
    """Build the static teacher: load its checkpoint, reuse ``OUT/static_teacher.pt``, or train it."""
    if cfg.teacher is None:
        return None
    teacher = build_model(cfg.teacher, num_classes, cfg.image_size, cfg.in_chans)
    if cfg.teacher_checkpoint:
        load_state_dict_checked(teacher, load_student(cfg.teacher_checkpoint),
                                f"teacher checkpoint {cfg.teacher_checkpoint!r}")
        return teacher
    cached = Path(cfg.out_dir) / "static_teacher.pt"
    if cached.is_file():
        load_state_dict_checked(teacher, load_student(cached), f"static teacher {str(cached)!r}")
        return teacher
    # Every rank trains the same teacher from the same seed on the full data: identical
    # results without any communication, and this is a short, one-off phase.
    epochs = cfg.teacher_epochs or cfg.epochs
    _Printer(_is_main_process())(f"no --teacher-checkpoint: training static teacher {cfg.teacher} "
                                 f"for {epochs} epochs first")
    torch.manual_seed(cfg.seed)
    teacher, hist = fit_plain(teacher, cfg, train_ds, val_ds, epochs=epochs, desc="static teacher")
    if _is_main_process():
        save_student(teacher.cpu(), cached, {"model_spec": cfg.teacher, "num_classes": num_classes,
                                             "image_size": cfg.image_size, "in_chans": cfg.in_chans})
    return teacher


def run(cfg: TrainConfig, *, callbacks: Sequence[Callable[[StepInfo], None]] = ()) -> TrainResult:
    """Build data, student and static teacher from ``cfg`` and :func:`train`; what ``gpd-fx train`` runs.

    Args:
        cfg: the configuration; ``cfg.model``, ``cfg.data`` and ``cfg.teacher`` are specs.
        callbacks: passed to :func:`train`.

    Returns:
        The :class:`TrainResult`.

    Example:
        >>> res = run(TrainConfig(epochs=1, out_dir="/tmp/gpd"))  # doctest: +SKIP
        >>> round(res.student_acc, 2)  # doctest: +SKIP
        0.9
    """
    from gpd_fx.data import build_datasets

    # before any work (data, static teacher): refuse a directory holding a run, check writability
    prepare_run_dir(cfg.out_dir, resume=cfg.resume, overwrite=cfg.overwrite, main=_is_main_process())
    train_ds, val_ds, num_classes = build_datasets(cfg.data, cfg.image_size, channels=cfg.in_chans,
                                                   seed=cfg.seed, val_fraction=cfg.val_fraction)
    _check_dataset(train_ds, "training")
    _check_dataset(val_ds, "validation")
    torch.manual_seed(cfg.seed)  # same initial student on every rank and every run
    model = build_model(cfg.model, num_classes, cfg.image_size, cfg.in_chans)
    static = _static_teacher(cfg, num_classes, train_ds, val_ds)
    return train(model, cfg, train_ds, val_ds, static, callbacks=callbacks)


# -------------------------------------------------------------------------------- fold


def fold_checkpoint(path: str | os.PathLike, out: str | os.PathLike | None = None, *, fuse_bn: bool = False,
                    export_onnx: bool = False, model: str | None = None) -> dict[str, Path]:
    """Fold the student out of a training checkpoint; what ``gpd-fx fold`` runs.

    Rebuilds the student from the checkpoint's model spec, re-runs :func:`gpd_fx.expand`
    with the stored arguments, loads the teacher's state and folds.

    Args:
        path: a ``checkpoint.pt`` written by :func:`train`.
        out: destination ``.pt`` (default ``student.pt`` beside the checkpoint); the
            ``.safetensors`` and ``.onnx`` go beside it.
        fuse_bn: export ONNX with BN fused into the preceding conv (the ``.pt`` stays the
            unfused student of the user's class, so it loads into their code).
        export_onnx: also export ONNX, verified with onnxruntime.
        model: the student's model spec. Required when the checkpoint's spec is not on the
            allow-list of :func:`gpd_fx.models.is_trusted_spec` (a file never chooses code to
            import); when given it must equal the checkpoint's spec.

    Returns:
        ``{"student_pt", "student_safetensors"[, "onnx"]}`` paths.

    Raises:
        CheckpointError: corrupt checkpoint, no model spec, or a state that does not match.
        UntrustedSpecError: the checkpoint names a model off the allow-list and ``model`` is
            not given, or ``model`` differs from the checkpoint's spec.

    Example:
        >>> fold_checkpoint("runs/gpd/checkpoint.pt")["student_pt"]  # doctest: +SKIP
        PosixPath('runs/gpd/student.pt')
    """
    ckpt = load_checkpoint(path)
    cfg = TrainConfig.from_dict(ckpt["config"])
    spec = resolve_stored_spec(ckpt.get("model_spec") or None, model,
                               what=f"checkpoint {str(path)!r}", how="gpd-fx fold CHECKPOINT --model {spec}")
    num_classes = ckpt.get("num_classes")
    if not spec or not num_classes:
        raise CheckpointError(f"checkpoint {str(path)!r} records no model spec (the student was passed to train() "
                              "as a module); rebuild the model in Python, gpd_fx.expand it with the checkpoint's "
                              "'expand_config' and call gpd_fx.fold")
    image_size, in_chans = int(ckpt.get("image_size", cfg.image_size)), int(ckpt.get("in_chans", cfg.in_chans))
    torch.manual_seed(cfg.seed)
    model = build_model(spec, int(num_classes), image_size, in_chans)
    # expand only needs shapes from the example; the weights come from the checkpoint
    example = torch.randn(2, in_chans, image_size, image_size)
    dt = _expand(model, cfg, example)
    load_state_dict_checked(dt, ckpt["dt"], f"checkpoint {str(path)!r}")
    student, deploy = _fold(dt.eval(), fuse_bn)
    student, deploy = student.cpu(), deploy.cpu()
    dest = Path(out) if out is not None else Path(path).parent / "student.pt"
    meta = {"model_spec": spec, "num_classes": int(num_classes), "image_size": image_size, "in_chans": in_chans}
    paths: dict[str, Path] = {}
    paths["student_pt"], paths["student_safetensors"] = save_student(student, dest, meta)
    if export_onnx:
        from gpd_fx.export import export_onnx as _export

        diff = _export(deploy, example, dest.with_suffix(".onnx"))
        paths["onnx"] = dest.with_suffix(".onnx")
        _Printer(True)(f"ONNX: onnxruntime vs torch max |diff| {diff:.2g}")
    return paths
