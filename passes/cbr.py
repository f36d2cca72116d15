"""Channel-Branch Reparameterization: rewrite the teacher's widened conv/linear layers into
multi-branch layers (each branch folded into an online kernel or run on the activations).

The student map is untouched: a source that reads ``weight`` of a multi-branch layer gets the map
of its ``effective_weight()`` (computed per branch at student size, see
``_Branched.mapped_weight``), so the student always sees the folded kernel.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .branches import BRANCH_KINDS_CONV, BRANCH_KINDS_LINEAR, BranchConfigError, BranchConvNd, BranchLinear
from .student_map import ParamSource

__all__ = ["MID_CHOICES", "DEFAULT_MID", "add_branches", "resolve_branches", "resolve_options", "teacher_cost"]

_CONV = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}

MID_CHOICES = ("student", "teacher")
"""Named middle widths of the 1x1->kxk branch: the layer's input width in the student or in the
teacher. Also accepted: a positive float, a factor of the teacher's input width (rounded to a
multiple of the layer's groups), or a positive int, one width for every layer (it must be a
multiple of each layer's groups)."""

DEFAULT_MID = "student"
"""Default middle width of the 1x1->kxk branch (see :data:`MID_CHOICES`). The student's input
width is the narrowest middle at which the branch's share of the *student* kernel (its map,
``out(B) o inp(A)``) is not rank-limited, and it costs 1/r of a teacher-width middle in
parameters and in the per-step fold (measured on a ResNet-18 GPD step, 32x32, batch 16, r=2:
1.31x faster than a teacher-width middle; see benchmarks/README.md)."""

_OPTION_KEYS = ("conv", "linear", "mid", "mode")


def resolve_options(branches) -> dict:
    """The non-kind options of a ``branches={...}`` dict: ``mid`` (1x1->kxk middle width: one of
    :data:`MID_CHOICES`, a float factor of the teacher's input width or an int width) and ``mode``
    (``'auto'``, ``'fold'`` or ``'run'``, see ``BranchConvNd``)."""
    from .branches import BRANCH_MODES

    opts = {"mid": DEFAULT_MID, "mode": "auto"}
    if isinstance(branches, dict):
        opts.update({k: branches[k] for k in ("mid", "mode") if k in branches})
    mid = opts["mid"]
    if not (mid in MID_CHOICES or (isinstance(mid, (int, float)) and not isinstance(mid, bool) and mid > 0)):
        raise BranchConfigError(f"branches['mid']={mid!r}; allowed: {MID_CHOICES}, a positive float factor of "
                                "the teacher's input width (e.g. 0.5) or a positive int width")
    if opts["mode"] not in BRANCH_MODES:
        raise BranchConfigError(f"branches['mode']={opts['mode']!r}; allowed: {BRANCH_MODES}")
    return opts


def _mid_width(mid, layer: str, teacher_in: int, student_in: int, groups: int) -> int:
    if mid == "teacher":
        width = teacher_in
    elif mid == "student":
        width = student_in
    elif isinstance(mid, int):
        width = mid
    else:   # a factor of the teacher's input width, rounded to a multiple of groups
        width = max(groups, int(round(mid * teacher_in / groups)) * groups)
    if width < groups or width % groups:
        raise BranchConfigError(
            f"layer {layer!r}: the 1x1->kxk middle width {width} (branches['mid']={mid!r}) is not a positive multiple "
            f"of groups={groups}; allowed: multiples of {groups} (the teacher's input width {teacher_in}, the "
            f"student's {student_in}), or {MID_CHOICES}")
    return width


def resolve_branches(branches) -> tuple[tuple[str, ...] | None, tuple[str, ...] | None]:
    """Normalise ``expand(branches=...)`` to (conv kinds, linear kinds); ``None`` = all that apply.

    Accepts ``None`` (everything that applies), a list of kind names from either catalogue (each
    layer gets those of its own catalogue that apply to it), or ``{"conv": [...], "linear": [...]}``
    (a missing key means none of that catalogue; a dict with only the options ``mid`` / ``mode``
    means every kind that applies).
    """
    if branches is None:
        return None, None
    if isinstance(branches, dict):
        unknown_keys = set(branches) - set(_OPTION_KEYS)
        if unknown_keys:
            raise BranchConfigError(f"branches dict keys must be among {_OPTION_KEYS}, got {sorted(unknown_keys)}")
        if "conv" not in branches and "linear" not in branches and ("mid" in branches or "mode" in branches):
            return None, None     # only options given: every kind that applies
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

    ``branches`` may be a dict with options besides the kinds: ``mid`` (the 1x1->kxk middle
    width, see :func:`resolve_options`) and ``mode`` (fold/run policy of every layer).

    Returns:
        The number of layers rewritten.

    Raises:
        BranchConfigError: an unknown kind or option, or a middle width that does not fit a
            layer's groups (the message names the layer and the allowed values).
    """
    conv_kinds, lin_kinds = resolve_branches(branches)
    opts = resolve_options(branches)
    weight_src = {s.module: s for s in sources if s.attr == "weight"}
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
            src = weight_src[node.target]
            student_in = src.inp[2] * m.groups if src.inp is not None else m.in_channels
            mid = (_mid_width(opts["mid"], node.target, m.in_channels, student_in, m.groups)
                   if "1x1_kxk" in kinds else None)
            new = BranchConvNd(m.weight, m.bias, dim=dim, stride=m.stride, padding=m.padding,
                               dilation=m.dilation, groups=m.groups, padding_mode=m.padding_mode,
                               branches=kinds, generator=gen, mid_channels=mid, branch_mode=opts["mode"],
                               name=node.target, share_weight=True)
        elif type(m) is nn.Linear and (lin_kinds is None or lin_kinds):
            applicable = BranchLinear.applicable_branches(m.in_features, m.out_features)
            kinds = _pick(lin_kinds, applicable, "linear")
            if kinds == ("linear",):
                continue
            new = BranchLinear(m.weight, m.bias, branches=kinds, generator=gen, branch_mode=opts["mode"],
                               name=node.target)
        if new is None:
            continue
        parent, _, name = node.target.rpartition(".")
        setattr(teacher.get_submodule(parent) if parent else teacher, name, new.to(m.weight.dtype))
        count += 1
    return count


def _conv_flops(m, shape) -> float:
    """FLOPs (2 per multiply-add, as ``torch.utils.flop_counter`` counts) of the plain layer of
    ``m``'s geometry on an input of ``shape``: what the IR teacher runs there."""
    from .branches import BranchConvNd

    if isinstance(m, BranchConvNd):
        spatial = 1
        for size, p, k, d, st in zip(shape[2:], m._pad_per_dim(), m.kernel_size, m.dilation, m.stride):
            spatial *= (size + p - d * (k - 1) - 1) // st + 1
        return 2.0 * shape[0] * spatial * m.out_channels * (m.in_channels // m.groups) * math.prod(m.kernel_size)
    rows = math.prod(shape[:-1])
    return 2.0 * rows * m.out_features * m.in_features


def teacher_cost(teacher: nn.Module, inputs: tuple) -> dict[str, Any]:
    """The multi-branch teacher's size and forward FLOPs next to the IR teacher's, and which
    branches each layer folds or runs, at ``inputs`` (the example inputs).

    The IR figures are those of the same teacher with every multi-branch layer a plain layer
    (its weight and bias only, one conv/linear), computed from the shapes each layer sees.

    Returns:
        ``{"params", "ir_params", "flops", "ir_flops", "input_shapes", "layers"}``, where
        ``layers`` maps each multi-branch layer to ``{"fold": [...], "run": [...]}``.
    """
    from torch.utils.flop_counter import FlopCounterMode

    from .branches import _Branched

    layers = {n: m for n, m in teacher.named_modules() if isinstance(m, _Branched)}
    shapes: dict[str, tuple] = {}
    def record(name):
        def hook(mod, args):
            shapes.setdefault(name, tuple(args[0].shape))   # returns None: the inputs stay as they are
        return hook

    hooks = [m.register_forward_pre_hook(record(n)) for n, m in layers.items()]
    own: dict[str, float] = {}
    modes = {m: m.training for m in teacher.modules()}
    teacher.eval()   # no running-statistics update, no dropout
    try:
        with torch.no_grad():
            counter = FlopCounterMode(display=False)
            with counter:
                teacher(*inputs)
            total = float(counter.get_total_flops())
            for n, m in layers.items():
                if n in shapes:
                    w = next(m.parameters())
                    x = torch.zeros(shapes[n], dtype=w.dtype, device=w.device)
                    c = FlopCounterMode(display=False)
                    with c:
                        m(x)
                    own[n] = float(c.get_total_flops())
    finally:
        for h in hooks:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    params = sum(p.numel() for p in teacher.parameters() if p.requires_grad)
    extra = 0
    for m in layers.values():
        keep = {id(m.weight_kxk if hasattr(m, "weight_kxk") else m.weight_linear)}
        if m.bias is not None:
            keep.add(id(m.bias))
        extra += sum(p.numel() for p in m.parameters(recurse=False) if p.requires_grad and id(p) not in keep)
    ir_flops = total - sum(own.values()) + sum(_conv_flops(layers[n], shapes[n]) for n in own)
    plans = {}
    for n, m in layers.items():
        if n in shapes:
            run = _cached_plan(m, shapes[n])
            plans[n] = {"fold": [k for k in m.branches if k not in run], "run": list(run)}
    return {"params": params, "ir_params": params - extra, "flops": total, "ir_flops": ir_flops,
            "input_shapes": [tuple(x.shape) for x in inputs if isinstance(x, torch.Tensor)], "layers": plans}


def _cached_plan(m, shape) -> tuple[str, ...]:
    for (key_shape, _), run in m.__dict__.get("_plans", {}).items():
        if key_shape == shape:
            return run
    return m.plan(torch.empty(shape, device="meta"))
