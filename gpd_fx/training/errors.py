"""The errors a training run raises (typed, so callers can tell a bad flag from a diverged run)."""

from __future__ import annotations

from pathlib import Path

from gpd_fx.errors import GPDError


class TrainConfigError(GPDError, ValueError):
    """An invalid :class:`TrainConfig` value, or a resume that does not match the checkpoint."""


class TrainingDivergedError(GPDError, FloatingPointError):
    """The loss became NaN or infinite; the message names the step and the checkpoint kept."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (or ``KeyboardInterrupt``) stopped training after a checkpoint was saved.

    A ``KeyboardInterrupt`` so that code which does not know about it still stops.

    Attributes:
        checkpoint: the checkpoint to pass to ``--resume`` (``None`` on ranks other than 0).
        global_step: optimisation steps completed and saved.
    """

    def __init__(self, checkpoint: Path | None, global_step: int) -> None:
        super().__init__(f"training interrupted after step {global_step}; checkpoint saved to {checkpoint} "
                         "(continue with resume=<that path>)")
        self.checkpoint = checkpoint
        self.global_step = global_step


class _AbortNow(KeyboardInterrupt):
    """A second Ctrl-C: stop at once, without writing (the step in flight may be half done)."""
