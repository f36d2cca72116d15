"""The entry points that start from specs, not modules: :func:`run` (``gpd-fx train``) builds data,
student and static teacher and calls :func:`~gpd_fx.training.loop.train`; :func:`fold_checkpoint`
(``gpd-fx fold``) folds the student out of a checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from gpd_fx.checkpoint import (CheckpointError, load_checkpoint, load_state_dict_checked, load_student,
                               prepare_run_dir, save_student)
from gpd_fx.models import build_model, resolve_stored_spec
from gpd_fx.training.baseline import fit_plain
from gpd_fx.training.config import TrainConfig
from gpd_fx.training.distributed import _is_main_process
from gpd_fx.training.expansion import _expand, _fold
from gpd_fx.training.loop import train
from gpd_fx.training.progress import _Printer
from gpd_fx.training.results import StepInfo, TrainResult
from gpd_fx.training.samplers import _check_dataset


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
