"""Channel-Branch Reparameterization: rewrite the teacher's widened conv/linear layers into
multi-branch layers whose kernel is folded online (design.md §2, branch direction).

The student map is untouched: a source that reads ``weight`` of a multi-branch layer gets its
``effective_weight()``, so the student always sees the folded kernel.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.fx as fx
from torch import nn

from .branches import BRANCH_KINDS_CONV, BRANCH_KINDS_LINEAR, BranchConfigError, BranchConvNd, BranchLinear
from .student_map import ParamSource

__all__ = ["add_branches", "resolve_branches"]

_CONV = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}


def resolve_branches(branches) -> tuple[tuple[str, ...] | None, tuple[str, ...] | None]:
    """Normalise ``expand(branches=...)`` to (conv kinds, linear kinds); ``None`` = all that apply.

    Accepts ``None`` (everything that applies), a list of kind names from either catalogue (each
    layer gets those of its own catalogue that apply to it), or ``{"conv": [...], "linear": [...]}``.
    """
    if branches is None:
        return None, None
    if isinstance(branches, dict):
        unknown_keys = set(branches) - {"conv", "linear"}
        if unknown_keys:
            raise BranchConfigError(f"branches dict keys must be 'conv'/'linear', got {sorted(unknown_keys)}")
        conv = branches.get("conv", ())
        lin = branches.get("linear", ())
        for k in conv:
            if k not in BRANCH_KINDS_CONV:
                raise BranchConfigError(f"unknown conv branch {k!r}; valid: {BRANCH_KINDS_CONV}")
        for k in lin:
            if k not in BRANCH_KINDS_LINEAR:
                raise BranchConfigError(f"unknown linear branch {k!r}; valid: {BRANCH_KINDS_LINEAR}")
        return tuple(conv) if conv is not None else None, tuple(lin) if lin is not None else None
    kinds = list(branches)
    for k in kinds:
        if k not in BRANCH_KINDS_CONV and k not in BRANCH_KINDS_LINEAR:
            raise BranchConfigError(
                f"unknown branch kind {k!r}; conv kinds: {BRANCH_KINDS_CONV}, linear kinds: {BRANCH_KINDS_LINEAR}")
    return (tuple(k for k in kinds if k in BRANCH_KINDS_CONV),
            tuple(k for k in kinds if k in BRANCH_KINDS_LINEAR))


def _pick(wanted: tuple[str, ...] | None, applicable: tuple[str, ...], original: str) -> tuple[str, ...]:
    kinds = applicable if wanted is None else tuple(k for k in applicable if k in wanted)
    if original not in kinds:
        kinds = (original,) + kinds
    return kinds


def add_branches(teacher: fx.GraphModule, sources: list[ParamSource], branches, seed: int = 0) -> int:
    """Replace every widened ``nn.Conv{1,2,3}d``/``nn.Linear`` of ``teacher`` by its multi-branch form.

    Only layers whose weight the IR pass widened (it has a student-map source with an output or
    input map) are rewritten; student-width copies at boundaries stay plain. Layers for which no
    branch beyond the original applies stay plain too (nothing to gain, and one less fold).

    Returns:
        The number of layers rewritten.
    """
    conv_kinds, lin_kinds = resolve_branches(branches)
    widened = {s.module for s in sources if s.attr == "weight" and (s.out is not None or s.inp is not None)}
    gen = torch.Generator().manual_seed(seed)
    count = 0
    # a weight shared by several layers (tied) cannot become several independent branch sets
    holders: dict[int, int] = {}
    for m in teacher.modules():
        w = m._parameters.get("weight") if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) else None
        if w is not None:
            holders[id(w)] = holders.get(id(w), 0) + 1
    for node in teacher.graph.nodes:
        if node.op != "call_module" or node.target not in widened:
            continue
        m = teacher.get_submodule(node.target)
        if holders.get(id(m._parameters.get("weight")), 0) > 1:
            continue
        new = None
        if type(m) in _CONV and (conv_kinds is None or conv_kinds):
            if m.weight.device.type == "meta":
                continue
            dim = _CONV[type(m)]
            applicable = BranchConvNd.applicable_branches(m.in_channels, m.out_channels, m.kernel_size,
                                                          dim=dim, stride=m.stride)
            kinds = _pick(conv_kinds, applicable, "kxk")
            if kinds == ("kxk",):
                continue
            new = BranchConvNd(m.weight, m.bias, dim=dim, stride=m.stride, padding=m.padding,
                               dilation=m.dilation, groups=m.groups, padding_mode=m.padding_mode,
                               branches=kinds, generator=gen)
        elif type(m) is nn.Linear and (lin_kinds is None or lin_kinds):
            applicable = BranchLinear.applicable_branches(m.in_features, m.out_features)
            kinds = _pick(lin_kinds, applicable, "linear")
            if kinds == ("linear",):
                continue
            new = BranchLinear(m.weight, m.bias, branches=kinds, generator=gen)
        if new is None:
            continue
        parent, _, name = node.target.rpartition(".")
        setattr(teacher.get_submodule(parent) if parent else teacher, name, new.to(m.weight.dtype))
        count += 1
    return count
