"""The student's way into and out of training: expand it into the dynamic teacher, fold it back, export.

``gpd_fx`` is imported at call time: ``gpd_fx/__init__`` imports the trainer, which imports this.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from gpd_fx.training.config import TrainConfig
from gpd_fx.training.progress import _Printer


def _expand(model: nn.Module, cfg: TrainConfig, example: Tensor) -> nn.Module:
    """The dynamic teacher of ``model`` with the run's ratio, noise, seed and branch kinds."""
    import gpd_fx  # at call time: gpd_fx/__init__ may import this module

    return gpd_fx.expand(model, ratio=cfg.ratio, example_inputs=(example,), noise=cfg.noise,
                         seed=cfg.expand_seed, branches=cfg.expand_branches())


def _fold(dt: nn.Module, fuse_bn: bool) -> tuple[nn.Module, nn.Module]:
    """``(student, deployable)``: the user's class, and the BN-fused graph (or the same student)."""
    import gpd_fx

    if fuse_bn:
        student, fused = gpd_fx.fold(dt, fuse_bn=True)
        return student.eval(), fused.eval()
    student = gpd_fx.fold(dt)
    return student.eval(), student


def _num_classes(dt: nn.Module, example: Tensor) -> int:
    """Number of logits, from the teacher's output on the example batch (eval mode, no grad)."""
    was = dt.training
    dt.eval()
    with torch.no_grad():
        k = int(dt(example).shape[-1])
    dt.train(was)
    return k


def _maybe_export(student: nn.Module, example: Tensor, path: Path, printer: _Printer) -> tuple[float | None, Path | None]:
    """Export and check ONNX if its packages are installed: ``(max |diff|, path)`` or ``(None, None)``."""
    from gpd_fx.export import ExportError, export_onnx, onnx_available

    if not onnx_available():
        printer("ONNX export skipped: onnx/onnxscript/onnxruntime are not installed (pip install 'gpd_fx[onnx]')")
        return None, None
    try:
        return export_onnx(student, example, path), path
    except ExportError as err:
        # the trained student is saved already; a failed export must not lose it
        printer(f"ONNX export failed (student.pt and student.safetensors are saved): {err}")
        return None, None
