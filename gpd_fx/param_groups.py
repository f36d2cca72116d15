"""Width-aware optimiser parameter groups for a dynamic teacher.

Why: the student is a linear function of the teacher. A student weight whose input channels are
widened is the *sum* of ``m`` teacher input copies (``m = r`` for an interleaved input, 1 where the
input is not widened), and each copy receives the student's full gradient. One plain optimiser
step on the teacher therefore moves that student weight ``m`` times the step the optimiser asked
for (measured: 2.00x at r=2, 3.00x at r=3, for SGD and Adam alike).

The rule, derived per teacher tensor from the recorded student map (:class:`ParamSource`), never
from layer names. With ``W_s = s * sum_{copies i} W_t[first(o), i]`` (``s`` the map's constant
scale, 1 for every built-in rule):

============  =========================  =============================================
optimiser     learning rate              weight decay
============  =========================  =============================================
SGD (+ mom.,  ``lr / (m s^2)``           ``wd * m s^2`` (coupled: enters the gradient)
Nesterov)
Adam, AdamW   ``lr / (m |s|)``           ``wd * m |s|`` (AdamW's decoupled decay);
                                         ``eps * |s|``
============  =========================  =============================================

SGD is linear in the gradient, so the sum over copies of ``lr_t * (s g + wd_t W_t)`` is
``lr * (g + wd W_s)``: the student follows exactly the trajectory of a plain copy trained with the
same optimiser (momentum and Nesterov buffers are linear too). Adam's copies see identical
gradients, hence identical moments and identical updates, and ``m`` equal updates sum to one
step of the asked size. Adam with *coupled* weight decay is the exception: the decay term
differs between copies (they carry different noise), so the copies' moments differ and no
per-tensor factor is exact; use AdamW.

The teacher-only directions share these factors where they share a tensor (the other output
copies of a weight, its noise): a teacher weight whose fan-in is ``m`` times the student's gets
``lr / m``, its vectors (biases, norm affines, first-layer weights) keep ``lr``. For Adam that
is the maximal-update parametrisation's learning-rate rule (Yang et al., Tensor Programs V,
Table 3: hidden and output weights ``lr / width multiplier``, input weights and vectors
unchanged) with the student as the base model, so the teacher's own training is width-stable
by construction. For SGD muP would keep hidden weights at ``lr``; we keep the student-exact
factor instead, because the student is what the user ships (``benchmarks/accuracy.py`` measures
the effect). Extra CBR branch kernels of a layer take the factors of that layer's weight (same
fan-in); branch scale vectors keep ``lr`` and are never decayed (decaying them would shrink the
original branch, a direction the plain student does not have).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gpd_fx.errors import GPDError
from gpd_fx.passes.student_map import ParamSource

__all__ = ["ParamGroupsError", "WidthFactor", "param_groups", "width_factors"]

UPDATES = ("sgd", "adam")


class ParamGroupsError(GPDError, ValueError):
    """Bad arguments to :func:`param_groups` (not a dynamic teacher, lr <= 0, unknown update)."""


@dataclass(frozen=True)
class WidthFactor:
    """How one teacher tensor relates to the student.

    Attributes:
        copies: ``m``, the number of teacher input copies summed into one student entry (1 when
            the input is not widened or the tensor is a vector).
        scale: ``|s|``, the map's constant scale.
        role: ``"mapped"`` (read by the student map), ``"branch"`` (an extra CBR kernel of a
            mapped layer), ``"branch-scale"`` (a CBR scale vector) or ``"teacher-only"``.
        vector: the tensor has rank < 2 (bias, norm affine, scale vector).
    """

    copies: int = 1
    scale: float = 1.0
    role: str = "teacher-only"
    vector: bool = False

    def lr_mult(self, update: str) -> float:
        return 1.0 / (self.copies * (self.scale ** 2 if update == "sgd" else self.scale))

    def wd_mult(self, update: str) -> float:
        return float(self.copies) * (self.scale ** 2 if update == "sgd" else self.scale)


def _copies(src: ParamSource) -> int:
    """``m`` of one source: how many teacher input entries sum into one student entry."""
    if src.inp is None:
        return 1
    _, idx, width = src.inp
    counts = torch.bincount(idx.reshape(-1).long().cpu(), minlength=width)
    lo, hi = int(counts.min()), int(counts.max())
    if lo != hi:
        # a non-uniform map has no single exact factor: the largest keeps every student channel's
        # step at or below the one asked for
        warnings.warn(f"student parameter {src.student_name!r} (node {src.node}) sums {lo} to {hi} teacher "
                      f"copies per input channel; its learning rate is divided by {hi}", stacklevel=3)
    return max(hi, 1)


def width_factors(dt: nn.Module) -> dict[int, tuple[str, WidthFactor]]:
    """Per trainable teacher tensor (keyed by ``id``): its name and :class:`WidthFactor`.

    Args:
        dt: a :class:`gpd_fx.DynamicTeacher`.

    Raises:
        ParamGroupsError: ``dt`` is not a dynamic teacher.
    """
    from gpd_fx.teacher import DynamicTeacher  # the teacher module imports the passes; keep this leaf-light

    if getattr(dt, "is_scoped_teacher", False):
        # expand(..., scope=[...]) (gpd_fx.scope): each scope's factors, "shared" for the rest
        return dt.scoped_width_factors()
    if not isinstance(dt, DynamicTeacher):
        raise ParamGroupsError(
            f"param_groups needs the dynamic teacher returned by gpd_fx.expand, got {type(dt).__name__}; "
            f"for a plain model use model.parameters()")
    teacher = dt.teacher
    names = {id(p): n for n, p in dt.named_parameters()}
    out: dict[int, tuple[str, WidthFactor]] = {}

    def put(p: torch.Tensor, f: WidthFactor) -> None:
        if id(p) not in names:
            return
        old = out.get(id(p))
        if old is not None and old[1].role == "mapped" and (old[1].copies, old[1].scale) != (f.copies, f.scale):
            # a teacher tensor read by two maps that disagree (e.g. a tied embedding and output
            # layer): keep the smaller step, and say so
            warnings.warn(f"teacher tensor {names[id(p)]!r} is read by student maps with {old[1].copies} and "
                          f"{f.copies} input copies; it uses the smaller learning rate", stacklevel=3)
            if f.lr_mult("sgd") >= old[1].lr_mult("sgd"):
                return
        elif old is not None and old[1].role == "mapped" and f.role != "mapped":
            return
        out[id(p)] = (names[id(p)], f)

    for src in dt.sources:
        mod = teacher.get_submodule(src.module) if src.module else teacher
        m, s = _copies(src), abs(float(src.scale))
        if callable(getattr(mod, "effective_" + src.attr, None)):
            # a multi-branch layer: the student reads its folded kernel, a function of every
            # tensor of the layer. Its kernels share the layer's fan-in, hence its factor.
            # The kernel of the original branch is the one the student map reads at init.
            orig = _original_kernel(mod)
            for q in mod.parameters(recurse=False):
                if q.ndim >= 2:
                    put(q, WidthFactor(m, s, "mapped" if q is orig else "branch", False))
                else:
                    put(q, WidthFactor(1, 1.0, "branch-scale", True))
            continue
        t = getattr(mod, src.attr)
        if isinstance(t, nn.Parameter):
            put(t, WidthFactor(m, s, "mapped", t.ndim < 2))
    for p in dt.parameters():
        if id(p) not in out:
            out[id(p)] = (names[id(p)], WidthFactor(1, 1.0, "teacher-only", p.ndim < 2))
    return out


def _original_kernel(mod: nn.Module) -> torch.Tensor | None:
    """The kernel that holds the given weight in a multi-branch layer (its first branch)."""
    branches = getattr(mod, "branches", None)
    if not branches:
        return None
    return getattr(mod, f"weight_{branches[0]}", None)


def param_groups(dt: nn.Module, lr: float, weight_decay: float = 0.0, *, update: str = "sgd",
                 decay_vectors: bool = True, **defaults: Any) -> list[dict[str, Any]]:
    """Optimiser parameter groups under which the student moves exactly as a plain student would.

    Example::

        opt = torch.optim.SGD(gpd_fx.param_groups(dt, lr=0.1, weight_decay=5e-4), momentum=0.9)
        opt = torch.optim.AdamW(gpd_fx.param_groups(dt, lr=1e-3, weight_decay=0.05, update="adam"))

    When only the student's loss is on, a step built from these groups moves every student
    parameter (``dt.student_parameters()``) as the same optimiser moves a plain copy of the
    student (IR teachers; with CBR the original-branch kernel follows the same rule and the extra
    branches add directions by design). See the module docstring for the derivation.

    Args:
        dt: a :class:`gpd_fx.DynamicTeacher`.
        lr: the learning rate you would give the plain student (> 0).
        weight_decay: the weight decay you would give the plain student (>= 0).
        update: ``"sgd"`` for optimisers whose step is proportional to the gradient (SGD,
            momentum, Nesterov) or ``"adam"`` for scale-invariant ones (Adam, AdamW, Adamax).
            They differ only for maps with a constant scale other than 1, which no built-in rule
            produces today; ``"adam"`` also scales ``eps`` there.
        decay_vectors: decay tensors of rank < 2 too (the plain optimiser's behaviour). ``False``
            exempts biases and norm affines, as many recipes (and ``gpd-fx train``) do. CBR scale
            vectors are never decayed.
        **defaults: any other per-group option (``momentum``, ``betas``, ...) copied into every group.

    Returns:
        A list of param-group dicts, each with ``params``, ``lr``, ``weight_decay``, ``name`` and
        ``defaults``; frozen parameters (``requires_grad=False``) are left out. Schedulers scale
        each group's own ``lr``.

    Raises:
        ParamGroupsError: ``dt`` is not a dynamic teacher, ``lr`` is not positive and finite,
            ``weight_decay`` is negative, or ``update`` is unknown.
    """
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ParamGroupsError(f"lr must be a positive finite number, got {lr!r}")
    if not (isinstance(weight_decay, (int, float)) and math.isfinite(weight_decay) and weight_decay >= 0):
        raise ParamGroupsError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
    if update not in UPDATES:
        raise ParamGroupsError(f"update={update!r}; choose 'sgd' (SGD, momentum, Nesterov) or 'adam' "
                               f"(Adam, AdamW and other scale-invariant optimisers)")
    factors = width_factors(dt)
    groups: dict[tuple, dict[str, Any]] = {}
    for p in dt.parameters():
        if not p.requires_grad:
            continue
        name, f = factors[id(p)]
        decays = f.role != "branch-scale" and (decay_vectors or not f.vector)
        key = (f.role, f.copies, f.scale, decays)
        g = groups.get(key)
        if g is None:
            label = f"{f.role} m={f.copies}" + (f" s={f.scale:g}" if f.scale != 1.0 else "")
            g = groups[key] = {
                **defaults,
                "params": [],
                "lr": lr * f.lr_mult(update),
                "weight_decay": weight_decay * f.wd_mult(update) if decays else 0.0,
                "name": label + ("" if decays or weight_decay == 0 else " (no decay)"),
                "tensors": [],
            }
            if update == "adam" and f.scale != 1.0:
                g["eps"] = defaults.get("eps", 1e-8) * f.scale
        g["params"].append(p)
        g["tensors"].append(name)
    return list(groups.values())

