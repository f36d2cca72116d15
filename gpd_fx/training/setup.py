"""Set-up of one GPD run: the state :func:`gpd_fx.trainer.train` works with, built step by step.

:func:`_set_up` returns a :class:`_Run` holding the resolved device, the dynamic teacher, the
loaders, the optimiser and schedule (restored on resume) and the compiled step; the loop
(:mod:`gpd_fx.training.loop`) only reads and advances it. The order of the set-up functions
is part of the behaviour: the RNG is seeded (or restored) after the teacher is expanded and
before the static teacher is evaluated, exactly as a resumed run expects.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from gpd_fx.checkpoint import load_checkpoint, load_state_dict_checked, load_student, prepare_run_dir
from gpd_fx.compile import compile_step
from gpd_fx.losses import gpd_loss
from gpd_fx.training.checkpointing import _restore_or_seed
from gpd_fx.training.config import TrainConfig, _check_resume
from gpd_fx.training.distributed import _Dist, _resolve_device
from gpd_fx.training.evaluate import evaluate
from gpd_fx.training.expansion import _expand, _num_classes
from gpd_fx.training.metrics import _Accum
from gpd_fx.training.optim import _build_optimizer, _build_scheduler
from gpd_fx.training.progress import _Printer
from gpd_fx.training.results import StepInfo
from gpd_fx.training.samplers import _EpochSampler, _example_batch, _ShardSampler


@dataclass(eq=False)
class _Run:
    """Everything one call of ``train`` works with. Set-up fills it; the loop advances the
    position fields (``global_step``, ``history``, ``accum``, ``pos``) and ``paths``."""

    cfg: TrainConfig
    dist: _Dist
    device: torch.device
    printer: _Printer
    show: bool                     # progress bars (rank 0, cfg.progress)
    out: Path
    ckpt_path: Path
    ckpt: dict[str, Any] | None    # the checkpoint resumed from
    callbacks: Sequence[Callable[[StepInfo], None]] = ()
    # the models
    dt: nn.Module | None = None
    example: Tensor | None = None
    num_classes: int = 0
    static_teacher: nn.Module | None = None
    static_acc: float | None = None
    # the data
    sampler: _EpochSampler | None = None
    loader_gen: torch.Generator | None = None
    train_loader: DataLoader | None = None
    val_loader: DataLoader | None = None
    steps_per_epoch: int = 0
    # the optimisation
    params: list[nn.Parameter] = field(default_factory=list)
    optimizer: torch.optim.Optimizer | None = None
    scheduler: torch.optim.lr_scheduler.LambdaLR | None = None
    forward_loss: Callable[..., Any] | None = None   # (x, y, static_logits) -> loss, parts, t, s
    amp: ContextManager[Any] = field(default_factory=contextlib.nullcontext)
    # the position: where a checkpoint written now would resume
    start_epoch: int = 0
    start_step: int = 0
    global_step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    accum_saved: dict[str, float] | None = None      # the interrupted epoch's sums, on resume
    accum: _Accum | None = None                      # the current epoch's sums
    pos: tuple[int, int] = (0, 0)                    # (epoch, step in epoch) of the saved state
    paths: dict[str, Path] = field(default_factory=dict)


def _set_up(model: nn.Module, cfg: TrainConfig, train_ds: Dataset, val_ds: Dataset,
            static_teacher: nn.Module | None, callbacks: Sequence[Callable[[StepInfo], None]],
            dist: _Dist, n_train: int) -> _Run:
    """Everything before the first step, in the order a run (and its resume) depends on."""
    run = _open_run(model, cfg, dist, callbacks)
    _build_teacher(run, model, train_ds, static_teacher)
    _build_data(run, train_ds, val_ds, n_train)
    _build_optimisation(run)
    _build_step(run)
    if run.static_teacher is not None:
        run.static_acc = evaluate({"static": run.static_teacher}, run.val_loader, run.device)["static_acc"]
        run.printer(f"static teacher {cfg.teacher or type(run.static_teacher).__name__}: "
                    f"val acc {100 * run.static_acc:.2f}%")
    return run


def _open_run(model: nn.Module, cfg: TrainConfig, dist: _Dist,
              callbacks: Sequence[Callable[[StepInfo], None]]) -> _Run:
    """Resolve the device, read the checkpoint to resume (or the student's starting weights)
    and claim the output directory."""
    device = _resolve_device(cfg.device, dist)
    out = Path(cfg.out_dir)
    ckpt = None
    if cfg.resume:
        ckpt = load_checkpoint(cfg.resume)
        _check_resume(ckpt, cfg, str(cfg.resume))
    elif cfg.student_checkpoint:
        load_state_dict_checked(model, load_student(cfg.student_checkpoint),
                                f"student checkpoint {cfg.student_checkpoint!r}")
    prepare_run_dir(out, resume=cfg.resume, overwrite=cfg.overwrite, main=dist.main)
    return _Run(cfg=cfg, dist=dist, device=device, printer=_Printer(dist.main), show=cfg.progress and dist.main,
                out=out, ckpt_path=out / "checkpoint.pt", ckpt=ckpt, callbacks=callbacks)


def _build_teacher(run: _Run, model: nn.Module, train_ds: Dataset, static_teacher: nn.Module | None) -> None:
    """Expand the student (on the CPU in float32, identically on every rank) and load the
    resumed teacher state; move the frozen static teacher to the device."""
    cfg = run.cfg
    run.example = _example_batch(train_ds).float()
    dt = _expand(model, cfg, run.example)
    run.num_classes = _num_classes(dt, run.example)
    run.dt = dt = dt.to(run.device)
    if run.ckpt is not None:
        load_state_dict_checked(dt, run.ckpt["dt"], f"checkpoint {str(cfg.resume)!r}")
    if run.dist.main:
        run.printer(f"expanded: {dt.report.summary() if hasattr(dt.report, 'summary') else dt.report}")
    if static_teacher is not None:
        static_teacher = static_teacher.to(run.device).eval().requires_grad_(False)
    run.static_teacher = static_teacher


def _build_data(run: _Run, train_ds: Dataset, val_ds: Dataset, n_train: int) -> None:
    """The sharded, resumable training loader, the validation shard and the steps per epoch."""
    cfg, dist = run.cfg, run.dist
    run.sampler = _EpochSampler(n_train, cfg.seed, dist.rank, dist.world)
    per_rank = run.sampler.per_rank()
    # drop the last partial batch: BN fails on a batch of one, and compiled steps see one shape
    drop_last = per_rank >= cfg.batch_size
    pin = run.device.type == "cuda"
    run.loader_gen = torch.Generator()
    run.train_loader = DataLoader(train_ds, batch_size=cfg.batch_size, sampler=run.sampler, drop_last=drop_last,
                                  num_workers=cfg.num_workers, pin_memory=pin, generator=run.loader_gen)
    run.val_loader = DataLoader(val_ds, batch_size=max(cfg.batch_size, 256), num_workers=cfg.num_workers,
                                sampler=_ShardSampler(len(val_ds), dist.rank, dist.world), pin_memory=pin)
    steps = per_rank // cfg.batch_size if drop_last else 1
    if cfg.max_steps_per_epoch:
        steps = min(steps, cfg.max_steps_per_epoch)
    run.steps_per_epoch = steps


def _build_optimisation(run: _Run) -> None:
    """Optimiser and schedule; on resume their state, the position and the RNG are restored,
    otherwise each rank's RNG is seeded."""
    run.params = list(run.dt.parameters())
    run.optimizer = _build_optimizer(run.dt, run.cfg)
    run.scheduler = _build_scheduler(run.optimizer, run.cfg, run.steps_per_epoch)
    _restore_or_seed(run)


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


def _build_step(run: _Run) -> None:
    """The forward-and-loss function of one step (DDP-wrapped, compiled) and the autocast context."""
    cfg, device = run.cfg, run.device
    net: nn.Module = _Joint(run.dt)
    if run.dist.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(net, device_ids=[device.index] if device.type == "cuda" else None)
    loss_cfg = cfg.loss
    run.amp = torch.autocast(device.type, dtype=torch.bfloat16) if cfg.amp == "bf16" else contextlib.nullcontext()

    def step_fn(x: Tensor, y: Tensor, static_logits: Tensor | None):
        t_logits, s_logits = net(x)
        loss, parts = gpd_loss(t_logits.float(), s_logits.float(), y, loss_cfg, static_logits)
        return loss, parts, t_logits.detach(), s_logits.detach()

    run.forward_loss = compile_step(step_fn, cfg.compile)
