"""Atomic, ``weights_only``-loadable checkpoints and student files.

Every file is written to a temporary name in the destination directory and moved into place
with ``os.replace``, which is atomic on POSIX and Windows within one file system: a crash,
Ctrl-C or full disk leaves either the previous file or the new one, never half of one.

Checkpoints hold only tensors and primitive containers (dict, list, tuple, str, int, float,
bool, None), so that they load with ``torch.load(..., weights_only=True)`` -- no pickled code
runs when a user opens a file they were sent.
"""

from __future__ import annotations

import glob
import os
import pickle
import re
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from gpd_fx.errors import GPDError

__all__ = [
    "CHECKPOINT_FORMAT",
    "STUDENT_FORMAT",
    "CheckpointError",
    "OutputDirError",
    "RUN_FILES",
    "RunExistsError",
    "atomic_write",
    "prepare_run_dir",
    "restore_optimizer",
    "load_checkpoint",
    "load_state_dict_checked",
    "load_student",
    "save_checkpoint",
    "save_student",
]

CHECKPOINT_FORMAT = "gpd_fx.checkpoint/1"
"""Value of the ``"format"`` key of a training checkpoint (bumped on incompatible changes)."""

STUDENT_FORMAT = "gpd_fx.student/1"
"""Value of the ``"format"`` key of a folded ``student.pt``."""


def _current_umask() -> int:
    mask = os.umask(0)  # the only portable way to read it is to set it
    os.umask(mask)
    return mask


_UMASK = _current_umask()


class CheckpointError(GPDError, ValueError):
    """A checkpoint is missing, corrupt, of another format, or does not match the model."""


class RunExistsError(GPDError, FileExistsError):
    """The output directory already holds a run, and neither resume nor overwrite was asked for."""


class OutputDirError(GPDError, OSError):
    """The output directory cannot be created or written to."""


RUN_FILES = ("checkpoint.pt", "metrics.jsonl", "metrics.csv", "accuracy.png", "summary.json",
             "student.pt", "student.safetensors", "student.onnx")
"""Files of a training run in its output directory; any one of them means the directory holds a run."""

# files written atomically into a run directory besides RUN_FILES (their temp names are cleaned too)
_OTHER_FILES = ("static_teacher.pt", "static_teacher.safetensors")
_PROBE_PREFIX = ".gpd_fx-write-check."


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Write a file atomically: ``write(tmp)`` then ``os.replace(tmp, path)``.

    The temporary file lives in the destination directory (``os.replace`` is only atomic
    within one file system) and is fsynced before the rename, so that a power cut cannot
    leave a renamed but empty file. On any exception -- ``KeyboardInterrupt`` included --
    the temporary file is removed and ``path`` is untouched.

    Args:
        path: destination.
        write: called with the temporary path; must write the whole file there.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Example:
        >>> atomic_write("/tmp/x.txt", lambda p: p.write_text("hi"))  # doctest: +SKIP
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        # mkstemp creates 0600; give the file the permissions a plain open() would
        os.chmod(tmp, 0o666 & ~_UMASK)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Save a training checkpoint atomically.

    Args:
        state: tensors and primitive containers only (checked by a ``weights_only`` round
            trip in the tests, not here, to keep saving cheap).
        path: destination, usually ``OUT/checkpoint.pt``.

    Returns:
        The path written.
    """
    state = {"format": CHECKPOINT_FORMAT, **state}
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def _load(path: str | os.PathLike, what: str) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} {str(path)!r} does not exist")
    if not zipfile.is_zipfile(path):
        # torch.save has written zip archives since PyTorch 1.6; anything else is truncated,
        # corrupt, or another kind of file
        raise CheckpointError(f"{what} {str(path)!r} is corrupt or truncated (not a PyTorch zip archive)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError,
            AttributeError, TypeError, KeyError) as err:
        text = str(err)
        # torch words it "Unsupported global: GLOBAL x.y" (<= 2.5) or "unsupported GLOBAL x.y" (2.6+)
        found = re.search(r"unsupported (?:global: )?GLOBAL ([\w.]+)", text, flags=re.IGNORECASE)
        if found:
            # never repeat torch's advice to reload with weights_only=False: that runs the file's code
            raise CheckpointError(f"{what} {str(path)!r} is not trusted: it holds a pickled {found.group(1)} "
                                  "where only tensors and plain containers belong, and loading it could run "
                                  "code, so it was not loaded; gpd_fx never writes such files: use one written "
                                  "by gpd-fx or a plain state dict") from None
        # torch's weights_only message opens with advice to load unsafely and ends with a link;
        # the cause is the first line that is neither
        lines = [ln.strip() for ln in text.splitlines() if ln.strip() and "weights_only" not in ln
                 and not ln.strip().startswith("Check the documentation")]
        reason = lines[0] if lines else type(err).__name__
        raise CheckpointError(f"{what} {str(path)!r} is corrupt or unsafe to load ({reason})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{what} {str(path)!r} holds a {type(obj).__name__}, expected a dict")
    return obj


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a training checkpoint written by :func:`save_checkpoint` (``weights_only=True``).

    Args:
        path: the checkpoint file.

    Returns:
        The state dict saved, tensors on the CPU.

    Raises:
        CheckpointError: missing, corrupt, or not a gpd_fx training checkpoint.
    """
    state = _load(path, "checkpoint")
    fmt = state.get("format")
    if fmt != CHECKPOINT_FORMAT:
        hint = " (this is a folded student; use it with your model class)" if fmt == STUDENT_FORMAT else ""
        raise CheckpointError(f"{str(path)!r} is not a gpd_fx training checkpoint "
                              f"(format {fmt!r}, expected {CHECKPOINT_FORMAT!r}){hint}")
    missing = [k for k in ("dt", "optimizer", "epoch", "config") if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {str(path)!r} lacks the entries {missing}; it is incomplete")
    return state


def load_state_dict_checked(module: nn.Module, state_dict: dict[str, Tensor], what: str) -> None:
    """``module.load_state_dict(state_dict, strict=True)`` with a one-line error on mismatch.

    Args:
        module: the module to fill.
        state_dict: its saved state.
        what: names the source in the error (e.g. ``"checkpoint 'out/checkpoint.pt'"``).

    Raises:
        CheckpointError: keys or shapes differ; the message lists the first few of each.
    """
    if not isinstance(state_dict, dict):
        raise CheckpointError(f"{what} holds no state dict (found {type(state_dict).__name__})")
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state_dict and isinstance(state_dict[k], Tensor) and state_dict[k].shape != v.shape]
    if missing or unexpected or shapes:
        parts = []
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected),
                             ("shape mismatches (saved vs model)", shapes)):
            if items:
                more = f" and {len(items) - 3} more" if len(items) > 3 else ""
                parts.append(f"{label}: {', '.join(items[:3])}{more}")
        raise CheckpointError(f"{what} does not match the model ({'; '.join(parts)}); was it "
                              "written for another model spec, ratio or number of classes?")
    try:
        module.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{what} does not match the model: {str(err).splitlines()[0]}") from None


def save_student(model: nn.Module, path: str | os.PathLike, meta: dict[str, Any]) -> tuple[Path, Path]:
    """Save a folded student as ``NAME.pt`` and ``NAME.safetensors``, both atomically.

    ``NAME.pt`` is ``{"format", "state_dict", **meta}`` (loadable with ``weights_only=True``);
    ``NAME.safetensors`` holds the same tensors with ``meta`` as string metadata, for tools
    outside PyTorch. Keys are the user's own module's, so ``model.load_state_dict`` works.

    Args:
        model: the folded student (a plain module of the user's class).
        path: destination of the ``.pt`` file; the ``.safetensors`` goes beside it.
        meta: primitive values to store with it (model spec, num_classes, image_size, ...).

    Returns:
        ``(pt_path, safetensors_path)``.
    """
    from safetensors.torch import save_file

    path = Path(path)
    # safetensors refuses tensors that share storage; contiguous clones also drop views
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    pt = atomic_write(path, lambda tmp: torch.save({"format": STUDENT_FORMAT, "state_dict": tensors, **meta}, tmp))
    st_path = path.with_suffix(".safetensors")
    str_meta = {k: str(v) for k, v in meta.items()}
    st = atomic_write(st_path, lambda tmp: save_file(tensors, str(tmp), metadata=str_meta))
    return pt, st


def load_student(path: str | os.PathLike) -> dict[str, Tensor]:
    """The state dict of a student file: a ``student.pt`` of ours, a plain state dict, or safetensors.

    Used for fine-tuning (``--student-checkpoint``) and for static teachers
    (``--teacher-checkpoint``), which may come from anywhere.

    Args:
        path: ``.pt``/``.pth`` (``weights_only=True``) or ``.safetensors`` file.

    Returns:
        The state dict.

    Raises:
        CheckpointError: missing or corrupt file, or no state dict inside.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise CheckpointError(f"weights file {str(path)!r} does not exist")
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"weights file {str(path)!r} is corrupt ({err})") from None
    obj = _load(path, "weights file")
    if obj.get("format") == CHECKPOINT_FORMAT:
        raise CheckpointError(f"{str(path)!r} is a training checkpoint, not model weights; "
                              "fold it first with `gpd-fx fold` and pass the student .pt")
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"weights file {str(path)!r} holds no state dict of tensors")
    return obj


def prepare_run_dir(out: str | os.PathLike, *, resume: str | os.PathLike | None = None, overwrite: bool = False,
                    main: bool = True) -> Path:
    """Make sure a run may write into ``out``, before any work starts.

    * ``out`` is created if needed and checked writable (a probe file is created and
      removed), so an unwritable ``--out`` is found before expanding or training.
    * Temporary files left by an interrupted atomic write (``.NAME.*.tmp`` of a killed
      process) are removed.
    * A directory that holds a run (any of :data:`RUN_FILES`) is never overwritten silently:
      it is refused unless ``resume`` is that run's own ``checkpoint.pt`` or ``overwrite`` is
      set, in which case the old run's files (:data:`RUN_FILES` and its cached static teacher)
      are deleted first (other files are kept), so that nothing of the old run is mistaken for
      or reused by the new one.

    Args:
        out: the output directory.
        resume: the checkpoint the run continues from, if any.
        overwrite: replace a run found in ``out``.
        main: whether this process writes files (rank 0); other ranks only check.

    Returns:
        ``out`` as a :class:`~pathlib.Path`.

    Raises:
        OutputDirError: ``out`` cannot be created or written to.
        RunExistsError: ``out`` holds a run and neither ``resume`` (of that run) nor ``overwrite``.

    Example:
        >>> prepare_run_dir("/tmp/gpd-new-run")  # doctest: +SKIP
        PosixPath('/tmp/gpd-new-run')
    """
    out = Path(out)
    fix = "choose another --out (out_dir)"
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"output directory {str(out)!r} is an existing file, not a directory; {fix}")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=_PROBE_PREFIX, suffix=".tmp", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise OutputDirError(f"output directory {str(out)!r} is not writable "
                             f"({err.strerror or type(err).__name__}); {fix}") from None
    if main:
        for name in (*RUN_FILES, *_OTHER_FILES):
            for stale in out.glob(f".{glob.escape(name)}.*.tmp"):
                stale.unlink(missing_ok=True)
    found = [name for name in RUN_FILES if (out / name).exists()]
    own = resume is not None and Path(resume).resolve() == (out / "checkpoint.pt").resolve()
    if found and not own:
        if not overwrite:
            what = "continue it with --resume (resume=its checkpoint.pt)" if (out / "checkpoint.pt").exists() \
                else "it has no checkpoint to --resume from"
            raise RunExistsError(f"output directory {str(out)!r} already holds a run ({', '.join(found)}); "
                                 f"{what}, replace it with --overwrite (overwrite=True), or choose another --out")
        if main:
            for name in (*RUN_FILES, *_OTHER_FILES):
                (out / name).unlink(missing_ok=True)
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape and bool(torch.equal(a, b))
    return bool(a == b)


def restore_optimizer(optimizer: torch.optim.Optimizer, scheduler: Any, optimizer_state: dict[str, Any],
                      scheduler_state: dict[str, Any], what: str) -> list[str]:
    """Load a resumed run's optimizer and scheduler state, keeping this run's hyperparameters.

    ``optimizer.load_state_dict`` replaces every hyperparameter of every group (lr, momentum,
    weight decay, ...) with the saved ones, which would silently ignore values changed on
    resume. Here the saved *state* (momentum buffers, step counts, the schedule position) is
    kept, while the hyperparameters of the freshly built ``optimizer`` win; a changed peak
    learning rate is applied to the scheduler too, at its current position.

    Args:
        optimizer: built for this run (its groups hold this run's hyperparameters).
        scheduler: built on ``optimizer``, a :class:`~torch.optim.lr_scheduler.LRScheduler`.
        optimizer_state: the checkpoint's ``optimizer`` entry.
        scheduler_state: the checkpoint's ``scheduler`` entry.
        what: names the checkpoint in errors.

    Returns:
        One line per hyperparameter whose value changed, e.g. ``"lr 0.05 -> 0.01"``
        (``initial_lr`` is reported as ``lr``, the peak learning rate); empty when none did.

    Raises:
        CheckpointError: the saved state does not fit this optimizer (other groups or parameters).
    """
    wanted = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    try:
        optimizer.load_state_dict(optimizer_state)
        scheduler.load_state_dict(scheduler_state)
    except (ValueError, KeyError, RuntimeError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{what}: optimizer/scheduler state does not match this run "
                              f"({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None
    changed: dict[str, list[tuple[int, Any, Any]]] = {}
    rescheduled = False
    for i, (group, want) in enumerate(zip(optimizer.param_groups, wanted)):
        for key, value in want.items():
            if key == "lr":  # the scheduled value of the current step, recomputed below
                continue
            if key in group and _same(group[key], value):
                continue
            if key in group:  # a key the saved state lacks (older torch) is filled in, not reported
                changed.setdefault(key, []).append((i, group[key], value))
            group[key] = value
            rescheduled |= key == "initial_lr"
    if rescheduled:
        base = [g["initial_lr"] for g in optimizer.param_groups]
        scheduler.base_lrs = list(base)
        if hasattr(scheduler, "lr_lambdas"):
            lrs = [b * fn(scheduler.last_epoch) for b, fn in zip(base, scheduler.lr_lambdas)]
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # get_lr() warns when called outside step()
                lrs = scheduler.get_lr()
        for group, lr in zip(optimizer.param_groups, lrs):
            group["lr"] = lr
        scheduler._last_lr = list(lrs)
    lines = []
    for key, items in changed.items():
        olds = sorted({repr(o) for _, o, _ in items})
        news = sorted({repr(n) for _, _, n in items})
        groups = ", ".join(str(i) for i, _, _ in items)
        label = "lr" if key == "initial_lr" else key
        lines.append(f"{label} {'/'.join(olds)} -> {'/'.join(news)} (parameter group {groups})")
    return lines
