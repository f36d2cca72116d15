"""Rules for timm's fused norm+activation layers that timm registers as no-trace leaves."""

from __future__ import annotations

import torch.fx as fx
from torch import nn

from ..registry import RULES, CannotExpand, register, register_when_imported
from .norm import batch_norm


def is_channelwise(module: nn.Module) -> bool:
    """True when ``module`` only applies ops registered as channel-wise (activations, dropout).

    Modules with a rule of their own are looked up; any other module is traced and every node
    must be such an op, so a custom activation counts while anything that mixes channels does not.
    """
    cls = type(module)
    for base in cls.__mro__:
        entry = RULES.modules.get(base)
        if entry is not None and (base is cls or cls.forward is base.forward):
            return entry.transparent and not list(module.parameters())
    try:
        graph = fx.Tracer().trace(module)
    except Exception:
        return False
    for n in graph.nodes:
        if n.op in ("placeholder", "output"):
            continue
        entry = (RULES.functions.get(n.target) if n.op == "call_function" else
                 RULES.methods.get(n.target) if n.op == "call_method" else None)
        if entry is None or not entry.transparent:
            return False
    return True


def _install() -> None:
    from timm.layers.norm_act import BatchNormAct2d, FrozenBatchNormAct2d, SyncBatchNormAct

    register(BatchNormAct2d, SyncBatchNormAct, FrozenBatchNormAct2d, transparent=True)(batch_norm_act)


register_when_imported("timm", _install)


def batch_norm_act(ctx, node):
    """BatchNorm + dropout + activation in one leaf: per-channel BN widened, the rest channel-wise."""
    def check(m):
        for sub in (getattr(m, "drop", None), getattr(m, "act", None)):
            if sub is not None and not is_channelwise(sub):
                raise CannotExpand(f"{type(sub).__name__} inside {type(m).__name__} is not channel-wise")

    return batch_norm(ctx, node, check)
