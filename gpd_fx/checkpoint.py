"""Atomic, ``weights_only``-loadable checkpoints and student files.

Every file is written to a temporary name in the destination directory and moved into place
with ``os.replace``, which is atomic on POSIX and Windows within one file system: a crash,
Ctrl-C or full disk leaves either the previous file or the new one, never half of one.

Checkpoints hold only tensors and primitive containers (dict, list, tuple, str, int, float,
bool, None), so that they load with ``torch.load(..., weights_only=True)`` -- no pickled code
runs when a user opens a file they were sent.
"""

from __future__ import annotations

import os
import pickle
import re
import tempfile
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
    "atomic_write",
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
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        if found:
            reason = f"it holds a pickled {found.group(1)}, which weights_only=True refuses to load"
        else:
            reason = text.strip().splitlines()[0] if text.strip() else type(err).__name__
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
