"""What :func:`gpd_fx.trainer.train` hands back: per-step :class:`StepInfo`, final :class:`TrainResult`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn


@dataclass
class StepInfo:
    """What a callback passed to :func:`train` sees after each completed step.

    Attributes:
        epoch: 0-based epoch.
        step: steps completed in this epoch.
        global_step: steps completed in the whole run.
        loss: the step's loss.
    """

    epoch: int
    step: int
    global_step: int
    loss: float


@dataclass
class TrainResult:
    """The outcome of :func:`train`.

    Attributes:
        dt: the trained dynamic teacher (on the training device, eval mode).
        student: the folded student, a plain module of the user's class (CPU, eval mode).
        history: one metrics dict per epoch (what ``metrics.jsonl`` holds).
        teacher_acc: final validation accuracy of the dynamic teacher (fraction).
        student_acc: final validation accuracy of ``dt.student``.
        folded_acc: validation accuracy of the folded student (equals ``student_acc`` up to
            float ties).
        static_acc: validation accuracy of the static teacher, if any.
        paths: files written: ``checkpoint``, ``metrics_jsonl``, ``metrics_csv``, ``plot``,
            ``student_pt``, ``student_safetensors``, ``onnx`` (those that exist).
        onnx_max_abs_diff: onnxruntime vs PyTorch on the folded student, if exported.
        seconds: wall time of the run.
    """

    dt: nn.Module
    student: nn.Module
    history: list[dict[str, Any]]
    teacher_acc: float
    student_acc: float
    folded_acc: float
    static_acc: float | None = None
    paths: dict[str, Path] = field(default_factory=dict)
    onnx_max_abs_diff: float | None = None
    seconds: float = 0.0
