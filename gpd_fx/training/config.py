"""The run's configuration: :class:`TrainConfig`, its validation, and the resume rules.

A ``TrainConfig`` is stored in every checkpoint (``to_dict``) and read back (``from_dict``), so it
holds primitives only. ``_check_resume`` decides which fields a resumed run may change.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from gpd_fx.compile import COMPILE_MODES
from gpd_fx.losses import GPDLossConfig
from gpd_fx.models import DEFAULT_STUDENT
from gpd_fx.training.errors import TrainConfigError

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "step", "none")
PARAM_GROUPS = ("gpd", "plain")
AMP_MODES = ("off", "bf16")
# fields that fix the shape of the teacher: a resumed run must use the checkpoint's values
_STRUCTURAL = ("model", "ratio", "branches", "image_size", "in_chans")
# fields whose effect the restored state replaces and that cannot be re-applied: the teacher's
# expansion (noise, seed, fine-tuned start) and the optimizer's kind
_RESUME_FIXED = ("noise", "expand_seed", "student_checkpoint", "optimizer", "param_groups")


@dataclass
class TrainConfig:
    """Everything a GPD run needs; stored in its checkpoint.

    Attributes:
        model: student model spec (see :func:`gpd_fx.models.build_model`); metadata only when
            :func:`train` is given a module.
        data: ``"digits"`` or an ImageFolder directory (see :func:`gpd_fx.data.build_datasets`).
        image_size: side of the square input images. Digits are 8x8 natively; 16 keeps the
            default job fast on a laptop CPU. ImageNet-style models want 224 (ViTs need a
            multiple of their patch size).
        in_chans: input image channels.
        val_fraction: share of the data held out for validation when there is no ``val/``.
        epochs: number of epochs (a resumed run continues up to this number).
        batch_size: samples per step, per process.
        lr: peak learning rate.
        optimizer: ``"sgd"`` (momentum, Nesterov) or ``"adamw"``.
        momentum: SGD momentum.
        weight_decay: applied to weights of rank >= 2 only (not to biases, norms or branch
            scales, whose decay only hurts).
        param_groups: ``"gpd"`` (default): the dynamic teacher's optimiser groups come from
            :func:`gpd_fx.param_groups`, so the student moves as far as ``lr`` asks whatever the
            ratio (each teacher tensor's lr divided by the number of input copies the student map
            sums, its weight decay multiplied by it). ``"plain"``: one lr for every teacher
            tensor (inner student weights then move ``ratio`` times the asked step), kept to
            measure the difference.
        schedule: ``"cosine"`` (to 0), ``"step"`` (x0.1 at 50% and 75%) or ``"none"``; per step.
        warmup_epochs: linear warm-up length in epochs (fractions allowed).
        grad_clip: clip the global gradient norm to this value; 0 disables. The default 2.0 keeps
            the first steps of a deep student from diverging: ``gpd-fx train torchvision:resnet18``
            on the built-in data had a student at chance (10%) after epoch 1 without clipping and
            23% after epoch 2 (52% with a one-epoch warm-up); with 2.0 it had 80% and 95%
            (5.0: 18% after epoch 1). The default small CNN ends the same either way (98.3%
            without, 98.6% with).
        ratio: expansion ratio r >= 1 of the dynamic teacher.
        noise: symmetry-breaking noise of :func:`gpd_fx.expand`, relative to each weight's std.
        branches: multi-branch (CBR) kinds of the teacher's conv/linear layers: ``"none"`` = IR
            only (``expand(branches=())``), ``"all"`` = every kind that applies
            (``expand(branches=None)``), or a comma list of kinds from
            ``gpd_fx.passes.branches.BRANCH_KINDS_CONV`` / ``BRANCH_KINDS_LINEAR`` such as
            ``"kxk,1x1,identity"``.
        expand_seed: seed of the expansion noise and branches.
        loss: the :class:`~gpd_fx.losses.GPDLossConfig`.
        seed: seed of initialisation, data order and every other random choice.
        compile: ``"none"``, ``"inductor"`` or ``"gpd"`` (see :func:`gpd_fx.compile.compile_step`).
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        amp: ``"off"`` or ``"bf16"`` autocast.
        out_dir: where checkpoint, metrics, plot and the folded student go.
        resume: a checkpoint to continue from, or ``None``. Hyperparameters that the restored
            optimizer state would override (lr, momentum, weight decay) are re-applied from
            this config and reported; values the saved state fixes (the structural fields, noise,
            expand_seed, student_checkpoint, optimizer) must equal the checkpoint's.
        overwrite: replace a run already in ``out_dir``; without it (and without ``resume``
            of that run) a directory holding a run is refused (see
            :func:`gpd_fx.checkpoint.prepare_run_dir`).
        teacher: static teacher model spec, or ``None`` for training from scratch.
        teacher_checkpoint: weights of the static teacher. Without one, the static teacher is
            first trained plainly for ``teacher_epochs`` and saved as ``OUT/static_teacher.pt``.
        teacher_epochs: epochs of that pre-training (``None``: ``epochs``).
        student_checkpoint: pretrained student weights to fine-tune from.
        max_steps_per_epoch: cap on steps per epoch (quick runs and tests), ``None``: no cap.
        log_every: also print a line every N steps (0: one line per epoch only).
        num_workers: data loader worker processes.
        progress: show tqdm progress bars (rank 0 only).
        export_onnx: export the folded student to ONNX and check it with onnxruntime.
        fuse_bn: export the ONNX model with BN fused into the preceding conv (a deployment
            graph); ``student.pt`` always holds the unfused student of the user's class.
    """

    model: str = DEFAULT_STUDENT
    data: str = "digits"
    image_size: int = 16
    in_chans: int = 3
    val_fraction: float = 0.2
    epochs: int = 6
    batch_size: int = 64
    lr: float = 0.05
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    param_groups: str = "gpd"
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    grad_clip: float = 2.0
    ratio: int = 2
    noise: float = 0.1
    branches: str = "none"
    expand_seed: int = 0
    loss: GPDLossConfig = field(default_factory=GPDLossConfig)
    seed: int = 0
    compile: str = "none"
    device: str = "auto"
    amp: str = "off"
    out_dir: str = "runs/gpd"
    resume: str | None = None
    overwrite: bool = False
    teacher: str | None = None
    teacher_checkpoint: str | None = None
    teacher_epochs: int | None = None
    student_checkpoint: str | None = None
    max_steps_per_epoch: int | None = None
    log_every: int = 0
    num_workers: int = 0
    progress: bool = True
    export_onnx: bool = True
    fuse_bn: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.loss, Mapping):  # from a checkpoint or JSON
            self.loss = GPDLossConfig(**self.loss)

        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise TrainConfigError(msg)

        need(isinstance(self.ratio, int) and not isinstance(self.ratio, bool) and self.ratio >= 1,
             f"ratio must be an integer >= 1 (the teacher is ratio x wider), got {self.ratio!r}")
        need(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        need(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        need(self.lr > 0 and math.isfinite(self.lr), f"lr must be a positive number, got {self.lr}")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        need(0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}")
        need(self.warmup_epochs >= 0, f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        need(self.grad_clip >= 0, f"grad_clip must be >= 0, got {self.grad_clip}")
        need(self.noise >= 0, f"noise must be >= 0, got {self.noise}")
        need(self.image_size >= 1, f"image_size must be >= 1, got {self.image_size}")
        need(self.in_chans >= 1, f"in_chans must be >= 1, got {self.in_chans}")
        need(self.num_workers >= 0, f"num_workers must be >= 0, got {self.num_workers}")
        need(self.log_every >= 0, f"log_every must be >= 0, got {self.log_every}")
        need(self.max_steps_per_epoch is None or self.max_steps_per_epoch >= 1,
             f"max_steps_per_epoch must be >= 1 or None, got {self.max_steps_per_epoch}")
        need(self.teacher_epochs is None or self.teacher_epochs >= 1,
             f"teacher_epochs must be >= 1 or None, got {self.teacher_epochs}")
        need(self.optimizer in OPTIMIZERS, f"unknown optimizer {self.optimizer!r}; choose one of {list(OPTIMIZERS)}")
        need(self.schedule in SCHEDULES, f"unknown schedule {self.schedule!r}; choose one of {list(SCHEDULES)}")
        need(self.compile in COMPILE_MODES, f"unknown compile mode {self.compile!r}; choose one of {list(COMPILE_MODES)}")
        need(self.amp in AMP_MODES, f"unknown amp mode {self.amp!r}; choose one of {list(AMP_MODES)}")
        need(self.param_groups in PARAM_GROUPS,
             f"unknown param_groups {self.param_groups!r}; choose one of {list(PARAM_GROUPS)}")
        need(self.teacher_checkpoint is None or self.teacher is not None,
             "teacher_checkpoint needs teacher (the static teacher's model spec) to build the model")

    def expand_branches(self) -> Sequence[str] | None:
        """``branches`` in the form :func:`gpd_fx.expand` takes: ``()``, ``None`` or a list."""
        text = (self.branches or "none").strip()
        if text == "none":
            return ()
        if text == "all":
            return None
        return [b.strip() for b in text.split(",") if b.strip()]

    def to_dict(self) -> dict[str, Any]:
        """Primitive-only form (for checkpoints, JSON and ``TrainConfig(**d)``)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrainConfig":
        """Inverse of :meth:`to_dict`, ignoring keys this version does not know."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def _check_resume(ckpt: Mapping[str, Any], cfg: TrainConfig, path: str) -> None:
    """Refuse a resume whose structural or state-fixed fields differ from the checkpoint's."""
    saved = ckpt["config"]
    bad = [f"{name}={saved[name]!r} but this run has {name}={getattr(cfg, name)!r} (--{name.replace('_', '-')})"
           for name in (*_STRUCTURAL, *_RESUME_FIXED) if name in saved and saved[name] != getattr(cfg, name)]
    if bad:
        raise TrainConfigError(f"checkpoint {path!r} was written with {'; '.join(bad)}; the saved teacher and "
                               "optimizer state fix these, so use the checkpoint's values to resume "
                               "(or start a new run without --resume)")
