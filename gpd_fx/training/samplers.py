"""Data order: the seeded, resumable, rank-sharded training sampler, the validation shard, data checks."""

from __future__ import annotations

import math
from typing import Iterator

import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from gpd_fx.training.errors import TrainConfigError


class _EpochSampler(Sampler[int]):
    """Seeded per-epoch order, sharded over ranks, able to skip the samples already seen.

    The order of epoch ``e`` depends only on ``(seed, e)``, never on a generator's history,
    which is what lets a run resumed mid-epoch see exactly the batches it would have seen.
    Like ``DistributedSampler`` the order is padded (by repeating its start) to a multiple of
    the world size, so every rank runs the same number of steps -- DDP needs that.
    """

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1, shuffle: bool = True) -> None:
        self.n, self.seed, self.rank, self.world, self.shuffle = n, seed, rank, world, shuffle
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def _indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        total = math.ceil(self.n / self.world) * self.world
        order += order[: total - self.n]
        return order[self.rank:total:self.world]

    def per_rank(self) -> int:
        return math.ceil(self.n / self.world)

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices()[self.skip:])

    def __len__(self) -> int:
        return self.per_rank() - self.skip


class _ShardSampler(Sampler[int]):
    """Validation shard ``rank::world`` without padding, so all-reduced counts are exact."""

    def __init__(self, n: int, rank: int, world: int) -> None:
        self.indices = list(range(rank, n, world))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def _check_dataset(ds: Dataset, name: str) -> int:
    """``len(ds)``, refusing a set without a length or an empty one (``name`` goes in the message)."""
    try:
        n = len(ds)  # type: ignore[arg-type]
    except TypeError:
        raise TrainConfigError(f"the {name} set has no len(); gpd_fx needs a map-style Dataset") from None
    if n == 0:
        raise TrainConfigError(f"the {name} set is empty; check the data directory or the split")
    return n


def _example_batch(ds: Dataset, k: int = 2) -> Tensor:
    """The first ``k`` images stacked: the example input ``expand`` traces with."""
    return torch.stack([ds[i][0] for i in range(min(k, len(ds)))])  # type: ignore[arg-type]
