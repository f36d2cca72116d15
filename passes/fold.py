"""Fold: evaluate the student map once and load it into a copy of the user's own module.

The result has the user's class and state-dict keys, so it loads into their code unchanged;
``fuse_bn=True`` additionally folds eval-mode BatchNorm into the preceding conv/linear.
"""

from __future__ import annotations

import copy

import torch
import torch.fx as fx
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from gpd_fx.errors import FoldError

from .student_map import map_tensor, teacher_tensor

__all__ = ["fold", "fold_parts", "fuse_bn", "fuse_batchnorm"]


def fold(dt, fuse_bn: bool = False):
    """Fold a trained dynamic teacher back into a plain student of the user's class.

    Args:
        dt: a :class:`gpd_fx.DynamicTeacher` returned by :func:`gpd_fx.expand`.
        fuse_bn: also return a deployable copy with BatchNorm fused into the preceding
            conv/linear (a ``GraphModule``; BN in eval mode uses its running statistics).

    Returns:
        The student (same class and state-dict keys as the model given to ``expand``, in eval
        mode), or ``(student, fused)`` when ``fuse_bn=True``.

    Raises:
        FoldError: ``dt`` is not an expanded teacher, its parameters no longer have the
            shapes the student map expects (for instance after a wrong ``load_state_dict``), or
            a teacher parameter or student statistic is NaN/inf (named in the message).

    Example:
        >>> student = gpd_fx.fold(dt)
        >>> torch.testing.assert_close(student(x), dt.eval().student(x))
    """
    if getattr(dt, "is_scoped_teacher", False):
        # expand(..., scope=[...]) (gpd_fx.scope): each scope folds as a whole teacher, in place
        return dt.fold_scopes(fuse_bn=fuse_bn)
    missing = [a for a in _TEACHER_PARTS if not hasattr(dt, a)]
    if not isinstance(dt, nn.Module) or missing:
        raise FoldError(f"fold takes the DynamicTeacher returned by gpd_fx.expand, got {type(dt).__name__}")
    student = fold_parts(dt.teacher, dt.template, dt.sources, dt.student_state.as_dict(),
                         teacher_train=dt.teacher_train)
    if fuse_bn:
        return student, fuse_batchnorm(student)
    return student


# What fold reads from a DynamicTeacher (the pass does not import the public wrapper class).
_TEACHER_PARTS = ("teacher", "template", "sources", "student_state", "teacher_train")


def fold_parts(teacher: nn.Module, template: nn.Module, sources, student_buffers: dict[str, torch.Tensor], *,
               teacher_train: nn.Module | None = None) -> nn.Module:
    """Fold from the parts of a teacher: evaluate the student map once into a copy of ``template``.

    Args:
        teacher: the teacher graph the sources point into.
        template: the user's module (mapped parameters may be meta tensors).
        sources: the :class:`~gpd_fx.passes.student_map.ParamSource` of every student parameter.
        student_buffers: the student's own buffers (BN statistics), by qualified name.
        teacher_train: the train-mode teacher graph, when the model has one (checked for NaN/inf).

    Returns:
        The student in eval mode. Raises :class:`~gpd_fx.errors.FoldError` as :func:`fold`.
    """
    _check_finite(teacher, teacher_train, student_buffers)
    expected = dict(template.named_parameters(remove_duplicate=False))
    state = {}
    with torch.no_grad():
        for src in sources:
            try:
                tt = teacher_tensor(teacher, src)
                _check_teacher_shape(tt, src)
                t = map_tensor(tt, src)
            except Exception as e:
                raise FoldError(
                    f"cannot map teacher tensor {src.teacher_name!r} to student parameter "
                    f"{src.student_name!r} (recorded at node {src.node}): {type(e).__name__}: {e}. "
                    "Were the teacher's parameters replaced? Rebuild with gpd_fx.expand and load a "
                    "state dict saved from the same configuration.") from e
            want = expected.get(src.student_name)
            if want is not None and tuple(want.shape) != tuple(t.shape):
                raise FoldError(
                    f"student parameter {src.student_name!r} should have shape {tuple(want.shape)} but the "
                    f"teacher tensor {src.teacher_name!r} maps to {tuple(t.shape)}")
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                # finite teacher tensors whose sum over the copies overflows (float16)
                raise FoldError(
                    f"student parameter {src.student_name!r} mapped from the teacher tensor "
                    f"{src.teacher_name!r} is non-finite (overflow in {t.dtype}); fold a float32 copy: "
                    "gpd_fx.fold(dt.float())")
            state[src.student_name] = t.detach().clone()
    student = copy.deepcopy(template)
    full = student.state_dict(keep_vars=True)
    # tied parameters appear under several names; all of them take the one mapped value
    owner: dict[int, str] = {}
    for name, p in student.named_parameters(remove_duplicate=False):
        if name in state:
            owner.setdefault(id(p), name)
    for name, p in student.named_parameters(remove_duplicate=False):
        if name not in state and id(p) in owner:
            state[name] = state[owner[id(p)]]
    for k in full:
        if k in state:
            full[k] = state[k]
    buffers = student_buffers
    persistent = set(full)
    for name, b in buffers.items():
        if name in persistent:
            full[name] = b.detach().clone()
    missing = [k for k, v in full.items() if isinstance(v, torch.Tensor) and v.device.type == "meta"]
    if missing:
        raise FoldError(f"no teacher source for student tensors {missing[:5]}")
    student.load_state_dict({k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in full.items()},
                            strict=True, assign=True)
    # non-persistent buffers are not in the state dict: set them directly
    for name, b in buffers.items():
        if name not in persistent:
            mod, _, attr = name.rpartition(".")
            (student.get_submodule(mod) if mod else student)._buffers[attr] = b.detach().clone()
    _retie(student, template)
    for p in student.parameters():
        p.requires_grad_(True)
    student.eval()
    return student


def _check_finite(teacher: nn.Module, teacher_train: nn.Module | None, student_buffers: dict) -> None:
    """A NaN/inf teacher parameter or student statistic is a diverged run, not a model.

    An error rather than a warning: a single non-finite teacher value makes the teacher's
    output non-finite, the next backward spreads it to every parameter, and a folded student
    with NaN weights is unusable anywhere it goes; the one useful action is to fold an earlier
    checkpoint, which the message says. The first offender is named (parameter order).
    """
    seen: set[int] = set()
    graphs = [teacher] + ([teacher_train] if teacher_train is not None else [])
    for g in graphs:
        for name, p in g.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            if p.is_floating_point() and p.device.type != "meta" and not bool(torch.isfinite(p).all()):
                bad = int((~torch.isfinite(p)).sum())
                raise FoldError(
                    f"teacher parameter {name!r} has {bad} non-finite value(s) (NaN/inf) of {p.numel()}: the "
                    "training diverged (or the parameters were overwritten), and the folded student would "
                    "be NaN as well. Fold a checkpoint saved before the divergence, or train again with a "
                    "lower learning rate or gradient clipping.")
    for name, b in student_buffers.items():
        if b.is_floating_point() and not bool(torch.isfinite(b).all()):
            raise FoldError(
                f"student buffer {name!r} (the student's own statistics) has non-finite values: the "
                "training diverged. Fold a checkpoint saved before the divergence.")


def _retie(student: nn.Module, template: nn.Module) -> None:
    """Parameters tied in the user's model (one object under several names) are one object
    again: loading the state dict with ``assign=True`` gave each name its own parameter."""
    names: dict[int, list[str]] = {}
    for name, p in template.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    for group in names.values():
        first = student.get_parameter(group[0])
        for name in group[1:]:
            mod, _, attr = name.rpartition(".")
            (student.get_submodule(mod) if mod else student).register_parameter(attr, first)


def _check_teacher_shape(t: torch.Tensor, src) -> None:
    if src.inp is not None and t.shape[src.inp[0]] != src.inp[1].numel():
        raise ValueError(f"dim {src.inp[0]} has size {t.shape[src.inp[0]]}, expected {src.inp[1].numel()}")
    if src.out is not None and t.shape[src.out[0]] <= int(src.out[1].max()):
        raise ValueError(f"dim {src.out[0]} has size {t.shape[src.out[0]]}, too small for the teacher layout")


def fuse_batchnorm(model: nn.Module) -> fx.GraphModule:
    """A copy of ``model`` (eval mode) with each BN fused into the conv/linear feeding only it."""
    from .trace import trace

    model = copy.deepcopy(model).eval()
    gm = trace(model)
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.modules.batchnorm._BatchNorm):
            continue
        prev = node.args[0]
        if not isinstance(prev, fx.Node) or prev.op != "call_module" or len(prev.users) != 1:
            continue
        layer, bn = modules[prev.target], modules[node.target]
        if not bn.track_running_stats or bn.running_mean is None:
            continue
        if type(layer) in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
            fused = fuse_conv_bn_eval(layer, bn)
        else:
            # Linear+BN1d would need the activation's rank (BN1d on (N, C) vs (N, C, L)); not fused.
            continue
        parent, _, name = prev.target.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, name, fused)
        modules[prev.target] = fused
        node.replace_all_uses_with(prev)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    return gm.eval()


fuse_bn = fuse_batchnorm
