"""Small helpers shared by the rule modules (argument access, module cloning)."""

from __future__ import annotations

import copy
from typing import Any

import torch.fx as fx
from torch import Tensor, nn

from ..layout import Layout
from ..registry import CannotExpand


def arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    """Positional-or-keyword argument ``i``/``name`` of a student node."""
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def tensor_inputs(ctx, node: fx.Node) -> list[fx.Node]:
    """Student argument nodes (flattened) whose value is a tensor."""
    return ctx.tensor_inputs(node)


def norm_dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def clone_module(m: nn.Module, params: dict[str, Tensor | None], buffers: dict[str, Tensor | None] | None = None,
                 **attrs) -> nn.Module:
    """A shallow copy of ``m`` (same class and settings) with new parameters/buffers/attributes.

    Deep-copying would duplicate the student weights only to throw them away; the new module
    keeps everything else (stride, padding, eps, hooks-free state) from the original.
    """
    new = copy.copy(m)
    new.__dict__ = m.__dict__.copy()
    # tensors not replaced are cloned: the teacher must never write into the user's model
    # (a BN's num_batches_tracked is updated in place in train mode)
    new._parameters = {k: None if v is None else nn.Parameter(v.detach().clone(), v.requires_grad)
                       for k, v in m._parameters.items() if k not in params}
    new._buffers = {k: None if v is None else v.clone() for k, v in m._buffers.items() if k not in (buffers or {})}
    new._modules = m._modules.copy()
    for k, v in params.items():
        new._parameters[k] = None if v is None else nn.Parameter(v, requires_grad=m._parameters[k].requires_grad)
    for k, v in (buffers or {}).items():
        new._buffers[k] = v
    for k, v in attrs.items():
        setattr(new, k, v)
    return new


def need_dim(lay: Layout | None, dim: int, what: str) -> None:
    if lay is not None and lay.dim != dim:
        raise CannotExpand(f"{what} expects the channels on dim {dim}, the input has them on dim {lay.dim}")
