"""GPD training end to end: expand -> train teacher and student jointly -> fold -> export.

One optimisation step (``DESIGN.md §4``)::

    t, s  = dt(x), dt.student(x)              # teacher and student forwards
    loss  = gpd_loss(t, s, y, cfg.loss, T(x))  # CE for both, KD T->both, KD DT->S
    loss.backward(); optimizer.step()          # one backward; parameters are the DT's only

This module is the stable import path (``from gpd_fx.trainer import train``); the code lives in
:mod:`gpd_fx.training`, one module per responsibility:

=========================  =================================================================
``config``                 :class:`TrainConfig`, its validation, the choices, the resume rules
``errors``                 :class:`TrainConfigError`, :class:`TrainingDivergedError`,
                           :class:`TrainingInterrupted`
``results``                :class:`StepInfo` (what callbacks see), :class:`TrainResult`
``entry``                  :func:`run` (``gpd-fx train``: specs -> data, models -> ``train``),
                           :func:`fold_checkpoint` (``gpd-fx fold``)
``loop``                   :func:`train`: epochs, one step, end of epoch, end of run
``setup``                  the run's state and its set-up (device, teacher, loaders, optimiser,
                           compiled step)
``checkpointing``          what a checkpoint holds, the collective save, restore on resume
``distributed``            ``torchrun`` process group, each rank's device, agreeing on a flag
``rng``                    seeding, RNG state saved and restored
``signals``                deferred Ctrl-C
``samplers``               the seeded, resumable, sharded data order; data set checks
``optim``                  optimiser (width-aware groups), learning-rate schedule
``evaluate``               :func:`evaluate`
``metrics``                an epoch's running sums; metrics files and plot
``progress``               rank-0 messages, progress bars
``expansion``              expand the student, fold it back, ONNX export
``baseline``               :func:`fit_plain` (static-teacher pre-training, benchmark baselines)
=========================  =================================================================

The path of one step: :func:`~gpd_fx.training.loop.train` ->
:func:`~gpd_fx.training.setup._set_up` -> :func:`~gpd_fx.training.loop._run_epochs` ->
:func:`~gpd_fx.training.loop._train_epoch` -> :func:`~gpd_fx.training.loop._train_step`
(the compiled forward-and-loss of :func:`~gpd_fx.training.setup._build_step`, then backward,
clip, update) -> :func:`~gpd_fx.training.loop._end_epoch` (evaluate, checkpoint, metrics).

Everything a run needs to continue exactly is in its checkpoint (``OUT/checkpoint.pt``), written
atomically after every epoch and on Ctrl-C, and never after a non-finite loss. Multi-process
training uses ``torchrun`` and DDP: when ``WORLD_SIZE > 1`` in the environment the process group
is initialised from the ``env://`` variables, the data are sharded, and only rank 0 writes files
and shows progress bars.
"""

from __future__ import annotations

from gpd_fx.training.baseline import fit_plain
# the choices of TrainConfig's string fields, which the CLI offers
from gpd_fx.training.config import AMP_MODES, OPTIMIZERS, PARAM_GROUPS, SCHEDULES, TrainConfig
from gpd_fx.training.entry import fold_checkpoint, run
from gpd_fx.training.errors import TrainConfigError, TrainingDivergedError, TrainingInterrupted
from gpd_fx.training.evaluate import evaluate
from gpd_fx.training.loop import train
from gpd_fx.training.optim import _build_optimizer  # tests build the run's optimiser directly
from gpd_fx.training.results import StepInfo, TrainResult

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
