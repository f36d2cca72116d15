"""The accuracy plot: teacher and student validation accuracy per epoch, and the gap between them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from gpd_fx.checkpoint import atomic_write

__all__ = ["plot_accuracy"]


def plot_accuracy(history: Sequence[dict[str, Any]], path: str | os.PathLike, title: str = "") -> Path:
    """Write a PNG of teacher and student validation accuracy per epoch.

    The shaded band between the two curves is the teacher-student gap that GPD keeps small.
    Uses matplotlib's ``Agg`` backend so it works without a display.

    Args:
        history: one dict per epoch with ``epoch``, ``val_teacher_acc`` and ``val_student_acc``
            (fractions in [0, 1]); an optional ``val_static_acc`` adds the static teacher.
        path: destination ``.png`` (written atomically).
        title: plot title.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Example:
        >>> plot_accuracy([{"epoch": 1, "val_teacher_acc": .9, "val_student_acc": .85}], "/tmp/a.png")  # doctest: +SKIP
    """
    import matplotlib

    matplotlib.use("Agg", force=False)  # no display needed; keeps a user's backend if set
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    teacher = [100 * h["val_teacher_acc"] for h in history]
    student = [100 * h["val_student_acc"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    try:
        ax.plot(epochs, teacher, "o-", label="dynamic teacher")
        ax.plot(epochs, student, "s-", label="student")
        ax.fill_between(epochs, student, teacher, alpha=0.2, label="gap")
        static = [h.get("val_static_acc") for h in history]
        if all(v is not None for v in static) and static:
            ax.plot(epochs, [100 * v for v in static], "--", color="grey", label="static teacher")
        ax.set_xlabel("epoch")
        ax.set_ylabel("validation accuracy (%)")
        ax.set_title(title or "GPD: teacher vs student")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
        if len(epochs) == 1:
            ax.set_xticks(epochs)
        fig.tight_layout()
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)
