"""Channel layouts of expanded tensors and the small tensor ops that convert between them.

An expanded tensor has one dimension ``dim`` that is ``ratio`` times wider in the teacher than
in the student. Its :class:`Layout` records, for every teacher channel along that dim, the
student channel it holds (``index``, ``DESIGN.md §1``: the channel map as data). The canonical layout is
*interleaved*: teacher channel ``i`` holds student channel ``i // ratio``.

The functions at the bottom (``gpd_widen``, ``gpd_narrow``) are what the teacher graph calls to
move between layouts; they are plain functions so that ``torch.fx``, ``torch.export`` and
``torch.compile`` all see ordinary tensor ops.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["Layout", "interleaved", "permutation_between", "gpd_widen", "gpd_narrow"]


@dataclass(eq=False)
class Layout:
    """Where the expanded channels of one tensor live.

    Attributes:
        dim: non-negative index of the expanded dimension.
        index: ``LongTensor`` of length ``ratio * width``: teacher channel -> student channel.
            Every student channel appears exactly ``ratio`` times.
        ratio: the expansion ratio ``r``.
    """

    dim: int
    index: Tensor
    ratio: int
    _interleaved: bool | None = field(default=None, repr=False)

    @property
    def width(self) -> int:
        """Student width of the expanded dim."""
        return self.index.numel() // self.ratio

    @property
    def is_interleaved(self) -> bool:
        if self._interleaved is None:
            ref = torch.arange(self.index.numel()) // self.ratio
            self._interleaved = bool(torch.equal(self.index, ref))
        return self._interleaved

    def at(self, dim: int) -> "Layout":
        """The same channel map on another dimension (after a permute, squeeze, ...)."""
        return Layout(dim, self.index, self.ratio, self._interleaved)

    def same_map(self, other: "Layout") -> bool:
        if self.index is other.index:
            return True
        if self.is_interleaved and other.is_interleaved:
            return self.index.numel() == other.index.numel()
        return self.index.numel() == other.index.numel() and bool(torch.equal(self.index, other.index))

    def first_copy(self) -> Tensor:
        """For each student channel, the first teacher channel holding it (used by the student map)."""
        pos = torch.arange(self.index.numel())
        first = torch.full((self.width,), self.index.numel(), dtype=torch.long)
        return first.scatter_reduce(0, self.index, pos, reduce="amin")


def interleaved(width: int, ratio: int, dim: int) -> Layout:
    """The canonical layout: teacher channel ``i`` holds student channel ``i // ratio``."""
    return Layout(dim, torch.arange(width * ratio) // ratio, ratio, True)


def permutation_between(src: Layout, dst: Layout) -> Tensor:
    """Index ``p`` with ``src.index[p] == dst.index``, pairing the k-th copy with the k-th copy.

    Applying ``x.index_select(dim, p)`` to a tensor in layout ``src`` gives it layout ``dst``.
    """
    order_src = torch.argsort(src.index, stable=True)
    order_dst = torch.argsort(dst.index, stable=True)
    p = torch.empty_like(order_src)
    p[order_dst] = order_src
    return p


def gpd_widen(x: Tensor, dim: int, index: Tensor) -> Tensor:
    """Gather ``index`` along ``dim``: widens a kept tensor or permutes an expanded one."""
    return x.index_select(dim, index)


def gpd_repeat(x: Tensor, dim: int, ratio: int) -> Tensor:
    """Widen a kept tensor into the interleaved layout (``repeat_interleave``)."""
    return x.repeat_interleave(ratio, dim=dim)


def gpd_narrow(x: Tensor, dim: int, ratio: int) -> Tensor:
    """Back to student width from the interleaved layout: the mean over the ``ratio`` copies.

    The mean (not copy 0) is exact at initialisation and lets every copy receive gradient.
    """
    return x.unflatten(dim, (-1, ratio)).mean(dim + 1)


def gpd_sum_correction(x: Tensor, ratio: int) -> Tensor:
    """Undo the factor ``ratio`` that a contraction over an expanded dim introduces."""
    return x * (1.0 / ratio)
