"""The weight rule (``DESIGN.md §1``), written once for every op that mixes channels linearly.

``W'[o, i] = W[Mo(o), Mi(i)] / m(Mi(i)) + E[o, i]`` where ``E`` is zero-sum over the copies of
each student input channel, so the teacher output equals the student output exactly while the
copies start different. Per-channel tensors are gathered with the layout index.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["widen_weight", "widen_per_channel"]


def _interleaved(index: Tensor, r: int) -> bool:
    return bool(torch.equal(index, torch.arange(index.numel(), device=index.device) // r))


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

    The teacher weight is built in the interleaved input order as a ``(..., C_in, r, ...)`` view
    and permuted afterwards only when the input layout is not interleaved. The noise
    is uniform with unit variance (cheaper than Gaussian for the hundreds of millions of
    entries of a wide teacher), drawn in the weight's dtype and centred over the copies of each
    input channel, so each group sums to zero up to that dtype's rounding.
    """
    out = w if out_index is None else w.index_select(out_dim, out_index)
    if in_index is None:
        return out.contiguous()
    cin = w.shape[in_dim]
    r = in_index.numel() // cin
    x = out.unsqueeze(in_dim + 1) / r                        # (..., C_in, 1, ...)
    shape = list(x.shape)
    shape[in_dim + 1] = r
    std = float(w.std()) / r if w.numel() > 1 else 0.0
    if noise > 0 and r > 1 and std > 0:
        full = torch.empty(shape, dtype=w.dtype)
        _uniform_(full, generator)
        # unit variance (U[0, 1) has variance 1/12), scaled, then centred over the copies of each
        # input channel, and the student's share x added: u*c - (mean(u*c) - x) in two passes over
        # the teacher-sized tensor (no separate "- 0.5": centring removes any constant)
        full.mul_(noise * std * 12 ** 0.5)
        full.sub_(full.mean(in_dim + 1, keepdim=True).sub_(x))
    else:
        full = x.expand(shape)
    full = full.flatten(in_dim, in_dim + 1)
    if not _interleaved(in_index, r):
        # teacher input channel j holds student channel in_index[j]: pick the matching copy
        order = torch.argsort(in_index, stable=True)
        perm = torch.empty_like(order)
        perm[order] = torch.arange(in_index.numel())
        full = full.index_select(in_dim, perm)
    return full.contiguous()


def _uniform_(t: Tensor, generator) -> None:
    """Fill ``t`` with U[0, 1) from ``generator`` (a numpy ``Generator`` or a torch one).

    numpy's PCG64 writes float32 straight into the tensor's memory about twice as fast as
    torch's CPU generator; for a teacher with hundreds of millions of weights that is most of
    the cost of ``expand``.
    """
    if isinstance(generator, np.random.Generator) and t.dtype in (torch.float32, torch.float64) \
            and t.device.type == "cpu" and t.is_contiguous():
        generator.random(out=t.numpy().reshape(-1), dtype=np.float32 if t.dtype == torch.float32 else np.float64)
    else:
        t.uniform_(0.0, 1.0, generator=generator)


def widen_per_channel(t: Tensor, dim: int, index: Tensor) -> Tensor:
    """Per-channel parameter or buffer: gather the student channel of every teacher channel."""
    return t.index_select(dim, index).contiguous()
