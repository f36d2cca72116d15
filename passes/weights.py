"""The weight rule (design.md §1), written once for every op that mixes channels linearly.

``W'[o, i] = W[Mo(o), Mi(i)] / m(Mi(i)) + E[o, i]`` where ``E`` is zero-sum over the copies of
each student input channel, so the teacher output equals the student output exactly while the
copies start different. Per-channel tensors are gathered with the layout index.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["widen_weight", "widen_per_channel", "zero_sum_noise"]


def zero_sum_noise(shape: torch.Size, in_dim: int, in_index: Tensor, scale: float,
                   generator: torch.Generator, dtype: torch.dtype) -> Tensor:
    """Gaussian noise whose sum over the copies of each student input channel is exactly zero.

    Drawn in float32 (cheap, reproducible for a given seed) and centred in ``dtype``: subtracting
    the per-group mean makes every group sum to zero up to the rounding of ``dtype``.
    """
    e = torch.randn(shape, generator=generator, dtype=torch.float32).to(dtype) * scale
    width = int(in_index.max()) + 1
    sshape = list(shape)
    sshape[in_dim] = width
    sums = torch.zeros(sshape, dtype=dtype).index_add_(in_dim, in_index, e)
    counts = torch.bincount(in_index, minlength=width).to(dtype)
    cshape = [1] * len(shape)
    cshape[in_dim] = width
    mean = sums / counts.view(cshape)
    return e - mean.index_select(in_dim, in_index)


def widen_weight(w: Tensor, *, out_dim: int, out_index: Tensor | None, in_dim: int,
                 in_index: Tensor | None, noise: float, generator: torch.Generator | None) -> Tensor:
    """Apply the weight rule to one weight tensor.

    Args:
        w: student weight.
        out_dim / out_index: the output-channel dim of ``w`` and the teacher->student map of the
            output channels (``None``: output kept at student width).
        in_dim / in_index: the same for input channels (for grouped convs: the map *within* a
            group). ``None``: input kept.
        noise: noise std relative to the std of the widened weight; 0 disables it.
        generator: seeded generator for the noise.

    Returns:
        The teacher weight.
    """
    out = w
    if out_index is not None:
        out = out.index_select(out_dim, out_index)
    if in_index is not None:
        counts = torch.bincount(in_index, minlength=w.shape[in_dim]).to(w.dtype)
        out = out.index_select(in_dim, in_index)
        cshape = [1] * w.dim()
        cshape[in_dim] = -1
        out = out / counts.index_select(0, in_index).view(cshape)
        if noise > 0 and out.numel() > 1:
            std = float(out.std()) if out.numel() > 1 else 0.0
            if std > 0:
                out = out + zero_sum_noise(out.shape, in_dim, in_index, noise * std, generator, out.dtype)
    return out.contiguous()


def widen_per_channel(t: Tensor, dim: int, index: Tensor) -> Tensor:
    """Per-channel parameter or buffer: gather the student channel of every teacher channel."""
    return t.index_select(dim, index).contiguous()
