"""The checks behind "exact": relative error of two outputs, and the model preparation that keeps
a check from passing vacuously (constant parameters randomised, dropout off).
"""

from __future__ import annotations

import math
import re

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["model_kind", "randomize_constants", "rel_error", "tree_tensors", "zero_dropout"]


@torch.no_grad()
def randomize_constants(model: nn.Module, seed: int = 0) -> int:
    """Add seeded noise to every constant floating parameter; randomise BN running stats.

    A constant c becomes c + N(0, (0.2 * max(|c|, 0.1))^2): zero heads/biases get std 0.02,
    BN weights 1 +- 0.2. Running means get N(0, 0.1^2), running variances U(0.5, 2), so that
    eval-mode BN is not the identity. Returns the number of tensors changed.
    """
    g = torch.Generator().manual_seed(seed)
    n = 0
    for p in model.parameters():
        if not p.is_floating_point() or p.numel() == 0:
            continue
        flat = p.detach().reshape(-1)
        if bool((flat == flat[0]).all()):
            c = float(flat[0])
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * (0.2 * max(abs(c), 0.1)))
            n += 1
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.running_mean is not None:
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g, dtype=m.running_mean.dtype) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g, dtype=m.running_var.dtype) * 1.5 + 0.5)
            n += 2
    return n


def tree_tensors(out) -> list[Tensor]:
    return [t for t in tree_flatten(out)[0] if isinstance(t, Tensor)]


def rel_error(teacher_out, student_out) -> tuple[float, str]:
    """max |t - s| / max |s| over every output tensor; inf (and why) if the outputs do not match up."""
    t, s = tree_tensors(teacher_out), tree_tensors(student_out)
    if len(t) != len(s):
        return math.inf, (f"output structure differs: teacher gives {len(t)} tensor(s) "
                          f"({type(teacher_out).__name__}), student {len(s)} ({type(student_out).__name__})")
    num, den = 0.0, 0.0
    for a, b in zip(t, s):
        if a.shape != b.shape:
            return math.inf, f"output shape differs: teacher {tuple(a.shape)} vs student {tuple(b.shape)}"
        if a.numel() == 0:
            continue
        num = max(num, float((a.double() - b.double()).abs().max()))
        den = max(den, float(b.double().abs().max()))
    if not math.isfinite(num):
        return math.inf, "non-finite teacher output"
    if den == 0:
        return math.nan, "student output is identically zero (vacuous check)"
    return num / den, ""


# Float attributes that models pass to F.dropout themselves (timm's GhostNet/ReXNet heads use
# ``F.dropout(x, self.drop_rate, self.training)``). Per-sample stochastic depth (drop_path,
# drop_prob) is left alone: its (N, 1, 1, 1) masks agree between teacher and student.
_DROPOUT_ATTRS = re.compile(r"^(drop_rate|dropout|dropout_rate|dropout_p|drop|head_drop_rate|attn_drop_rate|proj_drop_rate)$")


def zero_dropout(model: nn.Module) -> int:
    """Set ``p = 0`` on every dropout module and zero float dropout-rate attributes; returns how
    many were changed.

    A dropout mask over r*C teacher channels and one over C student channels are different
    random draws, so with p > 0 no teacher could be exact in train mode.
    """
    n = 0
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p:
            m.p = 0.0
            n += 1
        for k, v in list(vars(m).items()):
            if isinstance(v, float) and v > 0 and _DROPOUT_ATTRS.match(k):
                setattr(m, k, 0.0)
                n += 1
    return n


# Ops that carry an attention score through unchanged in kind: views and elementwise maps
# (scale, relative-position bias, mask). The pointwise tag covers the elementwise ones.
_PASS_THROUGH = frozenset({
    "view", "_unsafe_view", "reshape", "permute", "transpose", "t", "expand", "unsqueeze", "squeeze",
    "slice", "select", "clone", "contiguous", "alias", "_to_copy", "masked_fill", "where", "narrow",
    "unbind", "split", "split_with_sizes", "chunk", "flatten", "roll", "index", "cat", "repeat",
})
_PRODUCTS = frozenset({"bmm", "mm", "matmul", "baddbmm", "addmm", "einsum"})
_SOFTMAX = frozenset({"_softmax", "softmax", "_safe_softmax"})


class _AttentionProbe(TorchDispatchMode):
    """Watches one forward at the ATen level for self-attention: a softmax over a product of two
    activations (``q @ k^T``, possibly scaled, biased or masked on the way), or a fused
    scaled-dot-product attention. Products with a weight (linear layers) do not count, and
    neither does a softmax over a layer's output (split/selective-kernel attention, global
    context), which weights channels or positions but does not compare tokens with each other.
    """

    def __init__(self, params: list[Tensor]) -> None:
        super().__init__()
        self.weights = {id(p) for p in params}   # parameters and views of them
        self.scores: set[int] = set()             # products of two activations, and what follows
        self.alive: list[Tensor] = []             # keeps ids unique while the forward runs
        self.modules: list[str] = []              # class names of the modules being run ("": a wrapper)
        self.found: str | None = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.found is not None:
            return out
        name = func.overloadpacket.__name__
        ins = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)]
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, Tensor)]
        scored = any(id(t) in self.scores for t in ins)
        if "scaled_dot_product" in name or (name in _SOFTMAX and scored):
            self.found = next((m for m in reversed(self.modules) if m), "")
        elif name in _PRODUCTS and len(ins) >= 2 and not any(id(t) in self.weights for t in ins[-2:]):
            self.scores.update(id(t) for t in outs)
        elif name in _PASS_THROUGH or torch.Tag.pointwise in func.tags:
            if scored:
                self.scores.update(id(t) for t in outs)
            elif ins and name in _PASS_THROUGH and all(id(t) in self.weights for t in ins):
                self.weights.update(id(t) for t in outs)   # e.g. a linear layer's weight.t()
        self.alive.extend(outs)
        return out


def model_kind(model: nn.Module, input_shapes: list[tuple[int, ...]]) -> tuple[str, str]:
    """``("transformer", cls)`` if the model does self-attention, else ``("cnn", "")``.

    Decided by what one forward computes, not by names: run on ``input_shapes`` (on the meta
    device when the model lives there, so nothing is allocated), a model does self-attention
    when some module takes a softmax over the product of two activations (``q @ k^T``) or calls
    scaled-dot-product attention; ``cls`` is the class of the innermost module running then
    (``MultiheadAttention``, ``ShiftedWindowAttention``, ...; a parameterless leaf such as
    ``nn.Softmax`` names its owner instead). A model whose forward fails on
    these inputs is ``("", why)``.
    """
    params = list(model.parameters()) + list(model.buffers())
    probe = _AttentionProbe(params)
    device = params[0].device if params else torch.device("cpu")
    dtype = next((p.dtype for p in params if p.is_floating_point()), torch.float32)

    def enter(m, _args):
        # a parameterless leaf (nn.Softmax, nn.Dropout) only wraps a function: name its owner
        wraps_a_function = not any(True for _ in m.children()) and not any(True for _ in m.parameters())
        probe.modules.append("" if wraps_a_function else type(m).__name__)

    def leave(m, _args, _out):
        probe.modules.pop()

    hooks = [h for m in model.modules()
             for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    was = model.training
    try:
        xs = [torch.zeros(s, device=device, dtype=dtype) for s in input_shapes]
        with torch.no_grad(), probe:
            model.eval()(*xs)
    except Exception as e:
        if probe.found is None:
            return "", f"forward failed: {type(e).__name__}"
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    return ("transformer", probe.found) if probe.found is not None else ("cnn", "")
