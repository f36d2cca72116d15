"""The GPD training loop: :func:`train` = set up, epochs of steps, end of run.

One optimisation step (``DESIGN.md §4``)::

    t, s  = dt(x), dt.student(x)              # teacher and student forwards
    loss  = gpd_loss(t, s, y, cfg.loss, T(x))  # CE for both, KD T->both, KD DT->S
    loss.backward(); optimizer.step()          # one backward; parameters are the DT's only

:func:`_train_step` is that step with its guards (a non-finite loss or gradient norm stops the
run before the update); :func:`_train_epoch` runs the steps of one epoch; :func:`_end_epoch`
evaluates, records and checkpoints; :func:`_run_epochs` turns Ctrl-C into a checkpoint;
:func:`_finish` folds, evaluates and saves the student. The state they share is the
:class:`~gpd_fx.training.setup._Run` that :func:`~gpd_fx.training.setup._set_up` builds.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.distributed as tdist
from torch import Tensor, nn
from torch.utils.data import Dataset

from gpd_fx.checkpoint import atomic_write, save_student
from gpd_fx.training.checkpointing import _save
from gpd_fx.training.config import TrainConfig
from gpd_fx.training.distributed import _agree, _init_distributed
from gpd_fx.training.errors import _AbortNow, TrainingDivergedError, TrainingInterrupted
from gpd_fx.training.evaluate import evaluate
from gpd_fx.training.expansion import _fold, _maybe_export
from gpd_fx.training.metrics import _Accum, _write_outputs
from gpd_fx.training.progress import _progress_bar
from gpd_fx.training.results import StepInfo, TrainResult
from gpd_fx.training.samplers import _check_dataset
from gpd_fx.training.setup import _Run, _set_up
from gpd_fx.training.signals import _deferred_sigint


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
        run = _set_up(model, cfg, train_ds, val_ds, static_teacher, callbacks, dist, n_train)
        _run_epochs(run)
        return _finish(run, t_start)
    finally:
        if dist.owns_group:
            tdist.destroy_process_group()


def _run_epochs(run: _Run) -> None:
    """Epochs from the resumed position to ``cfg.epochs``; Ctrl-C saves the last completed step.

    The first Ctrl-C only sets a flag (see :func:`~gpd_fx.training.signals._deferred_sigint`),
    checked after each step and after each epoch's evaluation; then the state of
    ``run.global_step`` completed steps, at position ``run.pos``, is saved and
    :class:`TrainingInterrupted` raised. A second Ctrl-C aborts without writing.
    """
    run.dt.train()
    with _deferred_sigint(run.printer) as sig:
        run.accum = None
        # updated only together with the state it describes, so that an interrupt anywhere
        # saves a consistent position
        run.pos = (run.start_epoch, run.start_step)
        try:
            for epoch in range(run.start_epoch, run.cfg.epochs):
                t_epoch = time.perf_counter()
                _train_epoch(run, epoch, sig)
                _end_epoch(run, epoch, t_epoch)
                if _agree(sig["stop"], run.dist, run.device) and epoch + 1 < run.cfg.epochs:
                    raise KeyboardInterrupt  # Ctrl-C during evaluation: stop before the next epoch
        except _AbortNow:
            raise
        except KeyboardInterrupt:
            _save(run, *run.pos, run.accum)
            raise TrainingInterrupted(run.ckpt_path if run.dist.main else None, run.global_step) from None


def _train_epoch(run: _Run, epoch: int, sig: dict[str, bool]) -> None:
    """The steps of one epoch (the rest of it when resuming mid-epoch), with progress and callbacks."""
    cfg = run.cfg
    step_in_epoch = run.start_step if epoch == run.start_epoch else 0
    run.accum = _Accum(run.device, run.accum_saved if epoch == run.start_epoch else None)
    run.sampler.set_epoch(epoch, skip=step_in_epoch * cfg.batch_size)
    run.loader_gen.manual_seed(cfg.seed + epoch)  # worker seeds, same on resume
    run.dt.train()
    bar = _progress_bar(run.show, total=run.steps_per_epoch, initial=step_in_epoch,
                        desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False)
    try:
        for x, y in run.train_loader:
            if step_in_epoch >= run.steps_per_epoch:
                break
            loss_value, stop = _train_step(run, x, y, sig, epoch, step_in_epoch)
            step_in_epoch += 1
            run.pos = (epoch, step_in_epoch)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}", refresh=False)
            if cfg.log_every and run.global_step % cfg.log_every == 0:
                run.printer(f"epoch {epoch + 1} step {step_in_epoch}/{run.steps_per_epoch} loss {loss_value:.4f} "
                            f"lr {run.scheduler.get_last_lr()[0]:.3g}")
            info = StepInfo(epoch, step_in_epoch, run.global_step, loss_value)
            for cb in run.callbacks:
                cb(info)
            # a single process can also honour a Ctrl-C that came during the callbacks; under
            # DDP only the flag all-reduced in the step is agreed on
            if stop or (sig["stop"] and not run.dist.enabled):
                raise KeyboardInterrupt
    finally:
        bar.close()


def _train_step(run: _Run, x: Tensor, y: Tensor, sig: dict[str, bool], epoch: int,
                step_in_epoch: int) -> tuple[float, bool]:
    """One optimisation step on ``(x, y)``; adds it to ``run.accum`` and counts it.

    Returns:
        ``(loss, stop)``: the step's loss, and whether any rank has asked to stop (Ctrl-C).

    Raises:
        TrainingDivergedError: a non-finite loss or gradient norm, before the weights change.
    """
    cfg, device = run.cfg, run.device
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    static_logits = None
    if run.static_teacher is not None:
        with torch.no_grad(), run.amp:
            static_logits = run.static_teacher(x).float()
    run.optimizer.zero_grad(set_to_none=True)
    with run.amp:
        loss, parts, t_logits, s_logits = run.forward_loss(x, y, static_logits)
    # one host sync per step: a non-finite loss must stop the run before its update reaches
    # the weights, and all ranks must agree to stop
    flags = torch.stack([(~torch.isfinite(loss.detach())).double(),
                         torch.tensor(float(sig["stop"]), dtype=torch.float64, device=device)])
    if run.dist.enabled:
        tdist.all_reduce(flags, op=tdist.ReduceOp.MAX)
    bad, stop = (bool(v) for v in flags.tolist())
    if bad:
        raise _diverged(run, f"loss is {float(loss.detach()):.4g}", epoch, step_in_epoch,
                        "try a lower --lr or --grad-clip")
    loss.backward()
    if cfg.grad_clip > 0:
        # a finite loss can still have non-finite gradients (overflow in the backward);
        # clipping would turn them into NaN weights without a word
        norm = nn.utils.clip_grad_norm_(run.params, cfg.grad_clip)
        if not torch.isfinite(norm):  # the same on every rank: grads are all-reduced
            raise _diverged(run, f"gradient norm is {float(norm):.4g}", epoch, step_in_epoch, "try a lower --lr")
    run.optimizer.step()
    run.scheduler.step()
    run.global_step += 1
    run.accum.add(loss, parts, t_logits, s_logits, y)
    return float(loss.detach()), stop


def _diverged(run: _Run, what: str, epoch: int, step_in_epoch: int, hint: str) -> TrainingDivergedError:
    """The error for a non-finite ``what`` at this step, naming the checkpoint that is kept."""
    kept = f"; the last good checkpoint {str(run.ckpt_path)!r} is kept" if run.ckpt_path.exists() else ""
    return TrainingDivergedError(f"{what} at epoch {epoch + 1}, step {step_in_epoch + 1} "
                                 f"(global step {run.global_step + 1}); stopped before updating the weights"
                                 f"{kept}; {hint}")


def _end_epoch(run: _Run, epoch: int, t_epoch: float) -> None:
    """Evaluate teacher and student, append the epoch's metrics row, checkpoint, write the files."""
    cfg, dist, dt = run.cfg, run.dist, run.dt
    if dist.enabled:
        # DDP keeps parameters in sync, but BN statistics drift per rank within an epoch;
        # take rank 0's so that every rank evaluates and saves one model
        for b in dt.buffers():
            tdist.broadcast(b, 0)
    train_metrics = run.accum.summary()
    val = evaluate({"teacher": dt, "student": dt.student}, run.val_loader, run.device,
                   progress=run.show, desc="eval")
    row = {"epoch": epoch + 1, "global_step": run.global_step, "lr": run.scheduler.get_last_lr()[0],
           **train_metrics,
           "val_teacher_acc": val["teacher_acc"], "val_student_acc": val["student_acc"],
           "val_teacher_loss": val["teacher_loss"], "val_student_loss": val["student_loss"],
           "gap": val["teacher_acc"] - val["student_acc"],
           "epoch_seconds": time.perf_counter() - t_epoch}
    if run.static_acc is not None:
        row["val_static_acc"] = run.static_acc
    run.history.append(row)
    run.accum = None
    run.pos = (epoch + 1, 0)
    _save(run, epoch + 1, 0, None)
    if dist.main:
        run.paths.update(_write_outputs(run.history, run.out, title=f"GPD {cfg.model} x{cfg.ratio}"))
    run.printer(f"epoch {epoch + 1}/{cfg.epochs}: loss {row['train_loss']:.4f}  "
                f"val acc teacher {100 * row['val_teacher_acc']:.2f}%  "
                f"student {100 * row['val_student_acc']:.2f}%  gap {100 * row['gap']:+.2f}  "
                f"({row['epoch_seconds']:.1f} s)")


def _finish(run: _Run, t_start: float) -> TrainResult:
    """After the last epoch: the metrics files, then fold, final evaluation, save and export."""
    cfg, dist, dt, device, paths = run.cfg, run.dist, run.dt, run.device, run.paths
    if not run.history:  # resumed from a finished run: nothing was trained here
        run.history = list(run.ckpt["history"]) if run.ckpt else []
    if dist.main:
        paths["checkpoint"] = run.ckpt_path
        if "metrics_jsonl" not in paths and run.history:
            paths.update(_write_outputs(run.history, run.out, title=f"GPD {cfg.model} x{cfg.ratio}"))

    dt.eval()
    student, deploy = _fold(dt, cfg.fuse_bn)
    student = student.to(device)
    final = evaluate({"teacher": dt, "student": dt.student, "folded": student}, run.val_loader, device,
                     progress=run.show, desc="final eval")
    student = student.cpu()
    deploy = deploy.cpu()
    onnx_diff = None
    if dist.main:
        meta = {"model_spec": cfg.model, "num_classes": run.num_classes, "image_size": cfg.image_size,
                "in_chans": cfg.in_chans}
        paths["student_pt"], paths["student_safetensors"] = save_student(student, run.out / "student.pt", meta)
        if cfg.export_onnx:
            onnx_diff, onnx_path = _maybe_export(deploy, run.example, run.out / "student.onnx", run.printer)
            if onnx_path is not None:
                paths["onnx"] = onnx_path
        _write_summary(run, final, onnx_diff, t_start)
    # training is over: give back the storage the teacher keeps between steps (DESIGN.md §2)
    dt.release_buffers()
    return TrainResult(dt=dt, student=student, history=run.history, teacher_acc=final["teacher_acc"],
                       student_acc=final["student_acc"], folded_acc=final["folded_acc"], static_acc=run.static_acc,
                       paths=paths, onnx_max_abs_diff=onnx_diff, seconds=time.perf_counter() - t_start)


def _write_summary(run: _Run, final: dict[str, float], onnx_diff: float | None, t_start: float) -> None:
    """``OUT/summary.json``: the final accuracies, the run's length and the files written."""
    summary = {"teacher_acc": final["teacher_acc"], "student_acc": final["student_acc"],
               "folded_acc": final["folded_acc"], "static_acc": run.static_acc, "onnx_max_abs_diff": onnx_diff,
               "epochs": run.cfg.epochs, "global_step": run.global_step,
               "seconds": time.perf_counter() - t_start, "paths": {k: str(v) for k, v in run.paths.items()}}
    path: Path = run.out / "summary.json"
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(summary, indent=2) + "\n"))
    run.paths["summary"] = path
