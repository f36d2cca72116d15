"""Distributed set-up: join the ``torchrun`` process group, pick each rank's device, agree on a flag.

When ``WORLD_SIZE > 1`` in the environment the process group is initialised from the ``env://``
variables (gloo on CPU, NCCL on CUDA); only rank 0 writes files and shows progress bars.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist

from gpd_fx.training.errors import TrainConfigError


@dataclass
class _Dist:
    """This process's place in the run: rank, world size, local rank (its GPU)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False  # we initialised the process group, so we tear it down

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device: str) -> _Dist:
    """Join the ``torchrun`` process group described by the environment, if there is one."""
    if tdist.is_available() and tdist.is_initialized():
        return _Dist(tdist.get_rank(), tdist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    if not tdist.is_available():
        raise TrainConfigError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    on_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    backend = "nccl" if on_cuda else "gloo"
    tdist.init_process_group(backend=backend, init_method="env://")
    return _Dist(tdist.get_rank(), tdist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), owns_group=True)


def _resolve_device(name: str, dist: _Dist) -> torch.device:
    """``cfg.device`` as a device: ``auto`` is CUDA when available; under DDP ``cuda`` is this rank's GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise TrainConfigError(f"device {name!r} requested but CUDA is not available; use --device cpu")
        if name == "cuda":
            name = f"cuda:{dist.local_rank}" if dist.enabled else "cuda"
        device = torch.device(name)
        torch.cuda.set_device(device)
        return device
    if name != "cpu":
        raise TrainConfigError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N")
    return torch.device("cpu")


def _agree(flag: bool, dist: _Dist, device: torch.device) -> bool:
    """``flag`` or-reduced over all ranks (each rank may have seen its own Ctrl-C)."""
    if not dist.enabled:
        return flag
    t = torch.tensor([float(flag)], device=device)  # NCCL reduces CUDA tensors only
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return bool(t.item())


def _is_main_process() -> bool:
    """Rank 0 by the ``torchrun`` environment, before (or without) a process group."""
    return int(os.environ.get("RANK", "0")) == 0


def _env_dist() -> _Dist:
    """The ``torchrun`` ranks from the environment without joining a group (single-process phases)."""
    return _Dist(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                 int(os.environ.get("LOCAL_RANK", 0)))
