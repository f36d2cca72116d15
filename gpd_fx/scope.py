"""Partial expansion: ``gpd_fx.expand(model, ratio, example_inputs, scope=["backbone"])``.

For models that neither front end captures whole (torchvision's detectors: Python control flow
over image lists, data-dependent box selection), the named submodules are expanded on their
own and put back into a copy of the user's model. Each scope is captured on the inputs it
receives when the whole model runs on ``example_inputs`` (one eval-mode run with forward
hooks), so it is verified on exactly the values it sees inside the model. A scope's inputs and
outputs keep student width (as a whole-model teacher's do), so the rest of the model runs
unchanged around it and is shared: the teacher run and the student run both use and train it.

The result, :class:`ScopedTeacher`, is used like a :class:`~gpd_fx.DynamicTeacher`:
``dt(x)``, ``dt.student(x)``, ``dt.joint(x)``, ``dt.report``, ``gpd_fx.fold(dt)`` and
``gpd_fx.param_groups(dt, lr)``.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import functools
from typing import Any, Sequence

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from gpd_fx.errors import ExpandInputError, VerificationError
from gpd_fx.passes.widen_verify import TOL, compare_tree
from gpd_fx.teacher import DynamicTeacher, ExpansionReport

__all__ = ["ScopeError", "ScopedTeacher", "expand_scoped"]


class ScopeError(ExpandInputError):
    """A ``scope=`` entry of :func:`gpd_fx.expand` is unusable: no such submodule (the message
    lists the closest names), nested in another scope, or not called exactly once with tensor
    arguments when the model runs on the example inputs."""


class _ScopeSlot(nn.Module):
    """Stands in the user's model where a scope was: runs the scope's teacher, or its student
    (``use_student``, set by :class:`ScopedTeacher` around a student run)."""

    def __init__(self, dt: DynamicTeacher):
        super().__init__()
        self.dt = dt
        self.use_student = False

    def forward(self, *args, **kwargs):
        return self.dt.student(*args, **kwargs) if self.use_student else self.dt(*args, **kwargs)


class ScopedTeacher(nn.Module):
    """The user's model (a copy) with each scope replaced by its dynamic teacher.

    ``dt(x)`` runs the whole model with the scopes' teachers, ``dt.student(x)`` with their
    students (each a differentiable map of its teacher's parameters); the modules outside the
    scopes are shared by both runs. ``dt.parameters()`` are the scopes' teacher parameters and
    the shared ones.

    Attributes:
        model: the copy of the user's model; each scope is a slot holding its teacher.
        scope_names: the scopes, in the order given.
        report: the merged :class:`~gpd_fx.ExpansionReport` (FLOP share over the whole model;
            boundaries and fallbacks prefixed with their scope's name).
        reports: ``{scope: ExpansionReport}`` of each scope's own expansion.
        expand_config: the arguments of :func:`gpd_fx.expand`, ``scope`` included.
    """

    # read by gpd_fx.fold and gpd_fx.param_groups (duck-typed: the passes do not import this class)
    is_scoped_teacher = True

    def __init__(self, model: nn.Module, scope_names: Sequence[str], report: ExpansionReport,
                 expand_config: dict[str, Any]):
        super().__init__()
        self.model = model
        self.scope_names = list(scope_names)
        self.report = report
        self.expand_config = dict(expand_config)
        self.ratio = report.ratio

    @property
    def scopes(self) -> dict[str, DynamicTeacher]:
        """``{scope name: its DynamicTeacher}``."""
        return {n: self.model.get_submodule(n).dt for n in self.scope_names}

    @property
    def reports(self) -> dict[str, ExpansionReport]:
        return {n: dt.report for n, dt in self.scopes.items()}

    @contextlib.contextmanager
    def _students(self, on: bool):
        slots = [self.model.get_submodule(n) for n in self.scope_names]
        before = [s.use_student for s in slots]
        for s in slots:
            s.use_student = on
        try:
            yield
        finally:
            for s, b in zip(slots, before):
                s.use_student = b

    def forward(self, *args, **kwargs):
        """The whole model with the scopes' teachers."""
        with self._students(False):
            return self.model(*args, **kwargs)

    def student(self, *args, **kwargs):
        """The whole model with the scopes' students (mapped from the teachers' parameters)."""
        with self._students(True):
            return self.model(*args, **kwargs)

    def joint(self, *args, **kwargs):
        """``(dt(x), dt.student(x))``: two runs of the model, since the parts outside the scopes
        see different values in each (a scope's output differs once training starts)."""
        return self(*args, **kwargs), self.student(*args, **kwargs)

    def student_state_dict(self) -> dict[str, Tensor]:
        """The student's tensors keyed like the user's model: the scopes' mapped parameters and
        buffers, and the shared modules' own tensors."""
        return self.fold_scopes().state_dict()

    def fold_scopes(self, fuse_bn: bool = False):
        """What :func:`gpd_fx.fold` returns for a scoped teacher: the user's model class with each
        scope folded in place (eval mode), and with ``fuse_bn`` a copy whose scopes also have
        BatchNorm fused (each scope a ``GraphModule``; the rest of the model is untraceable)."""
        from gpd_fx.passes.fold import fold, fuse_batchnorm

        folded = {n: fold(dt) for n, dt in self.scopes.items()}
        # deep-copy the shell with each slot replaced by its folded scope (teachers not copied)
        memo = {id(self.model.get_submodule(n)): m for n, m in folded.items()}
        student = copy.deepcopy(self.model, memo)
        for p in student.parameters():
            p.requires_grad_(True)
        student.eval()
        if not fuse_bn:
            return student
        fused = copy.deepcopy(student)
        for n in self.scope_names:
            _set_submodule(fused, n, fuse_batchnorm(fused.get_submodule(n)))
        return student, fused.eval()

    def scoped_width_factors(self) -> dict:
        """:func:`gpd_fx.param_groups.width_factors` of a scoped teacher: each scope's teacher
        tensors take their width-aware factors; shared tensors (outside the scopes) are
        ``"shared"``, at the plain learning rate (the student reads them as they are)."""
        from gpd_fx.param_groups import WidthFactor, width_factors

        names = {id(p): n for n, p in self.named_parameters()}
        out = {}
        for dt in self.scopes.values():
            for key, (_, f) in width_factors(dt).items():
                out[key] = (names[key], f)
        for p in self.parameters():
            if id(p) not in out:
                out[id(p)] = (names[id(p)], WidthFactor(1, 1.0, "shared", p.ndim < 2))
        return out

    def extra_repr(self) -> str:
        return f"ratio={self.ratio}, scopes={self.scope_names}"


def expand_scoped(model: nn.Module, ratio: int, inputs: tuple, scope, *, verify_dtype=None,
                  **expand_kwargs) -> ScopedTeacher:
    """Expand the named submodules of ``model`` in place (in a copy); see :func:`gpd_fx.expand`.

    Args:
        model: the user's model (never modified).
        ratio: the expansion ratio.
        inputs: the whole model's example inputs (a tuple).
        scope: a submodule name or a list of them (``model.named_modules()`` names).
        verify_dtype: dtype of the whole model's verification (and of each scope's build).
        **expand_kwargs: the other arguments of :func:`gpd_fx.expand`, applied to every scope.

    Raises:
        ScopeError: a name is unknown (the closest names are listed), repeated, nested in another
            scope, or its submodule is not called exactly once with tensor arguments.
        VerificationError: the whole model's outputs with the teachers differ from the model's.
    """
    from gpd_fx.expand import _eval_mode, expand

    names = _check_scope_names(model, scope)
    orig_dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    probe_dtype = verify_dtype or orig_dtype
    tol = TOL.get(probe_dtype, 1e-3)
    work = copy.deepcopy(model)
    probe = inputs
    if verify_dtype is not None:
        work = work.to(verify_dtype)
        probe = _cast(inputs, verify_dtype)
    with _eval_mode(work):
        scope_inputs, reference, total_flops = _capture_scope_inputs(work, names, probe)
        # each scope is built in the probe dtype (verify_dtype=None: work is converted already)
        teachers = {}
        for n in names:
            kwargs = dict(expand_kwargs, leaf_modules=_scope_leaves(model, work, n, expand_kwargs.get("leaf_modules")))
            teachers[n] = expand(work.get_submodule(n), ratio, scope_inputs[n], verify_dtype=None, **kwargs)
        for n, dt in teachers.items():
            _set_submodule(work, n, _ScopeSlot(dt))
        with torch.no_grad():
            got = work(*probe)
        try:
            err = compare_tree(got, reference, _Named(f"whole-model output with scopes {names}"), tol)
        except VerificationError as e:
            scoped = ", ".join(f"{n!r} {dt.report.max_rel_error:.1e}" for n, dt in teachers.items())
            hint = ("Post-processing that selects (top-k, NMS, score thresholds) is discontinuous: rounding of "
                    f"the scopes' outputs in {str(probe_dtype).replace('torch.', '')} can change which boxes are "
                    "kept. Verify with verify_dtype=torch.float64") if probe_dtype != torch.float64 else \
                ("If the scopes' errors above are at rounding level, the difference comes after them: a selection "
                 "among exactly tied scores (constant image regions, score thresholds of 0) can flip on a 1e-16 "
                 "difference; verify on inputs without ties (e.g. distinct random images at the model's size). "
                 "Otherwise report this as a bug with the model")
            raise VerificationError(f"{e}. Each scope's own outputs agree with the student's (max rel. error "
                                    f"{scoped}); the rest of the model amplifies the difference. {hint}") from e
    if verify_dtype is not None:
        # the shell is the user's own tensors again; only the scopes come from the probe copy
        shell = copy.deepcopy(model, {id(model.get_submodule(n)): None for n in names})
        for n, dt in teachers.items():
            _set_submodule(shell, n, _ScopeSlot(dt.to(orig_dtype)))
    else:
        shell = work
    report = _merged_report(ratio, teachers, total_flops, err, probe_dtype, names)
    # parameter counts of the whole model: the student's, and the teacher's (scopes + shared rest)
    report.student_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    report.teacher_params = sum(p.numel() for p in shell.parameters() if p.requires_grad)
    config = dict(ratio=ratio, scope=list(names), **{k: v for k, v in expand_kwargs.items()
                                                   if k in ("noise", "seed", "strict", "branches", "frontend")})
    dt = ScopedTeacher(shell, names, report, config)
    dt.train(model.training)
    # modules whose own flag differs from the root's (frozen parts in eval mode) keep it
    flags = dict(model.named_modules())
    for name, m in dt.model.named_modules():
        if name in flags and not isinstance(m, _ScopeSlot) and not name.startswith(tuple(n + "." for n in names)):
            m.training = flags[name].training
    return dt


def _scope_leaves(model: nn.Module, work: nn.Module, scope: str, leaves):
    """``leaf_modules`` for one scope: module types as given; module instances of the user's
    model translated to the working copy, keeping those inside this scope."""
    if not leaves:
        return leaves
    names = {id(m): n for n, m in model.named_modules()}
    out = []
    for x in leaves:
        if not isinstance(x, nn.Module):
            out.append(x)
        elif id(x) not in names:
            raise ExpandInputError(f"leaf module {type(x).__name__} is not a submodule of the model")
        elif names[id(x)].startswith(scope + "."):
            out.append(work.get_submodule(names[id(x)]))
    return out


def _cast(value, dtype):
    """``value`` with its floating tensors in ``dtype``, through lists, tuples and dicts (a
    detector takes a list of images)."""
    if isinstance(value, Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (list, tuple)):
        return type(value)(_cast(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _cast(v, dtype) for k, v in value.items()}
    return value


class _Named:
    def __init__(self, name: str):
        self.name = name


def _check_scope_names(model: nn.Module, scope) -> list[str]:
    """The scope names as a list, each an existing, distinct, non-nested submodule."""
    names = [scope] if isinstance(scope, str) else list(scope)
    if not names or not all(isinstance(n, str) for n in names):
        raise ScopeError(f"scope must be a submodule name or a non-empty list of them, got {scope!r}")
    known = [n for n, _ in model.named_modules() if n]
    for n in names:
        if n not in known:
            close = difflib.get_close_matches(n, known, n=5, cutoff=0.4)
            hint = f"closest: {', '.join(map(repr, close))}" if close else \
                f"top-level submodules: {', '.join(repr(k) for k in known if '.' not in k)}"
            raise ScopeError(f"scope {n!r} is not a submodule of {type(model).__name__} ({hint}). "
                             "Pass names from model.named_modules(), e.g. scope=['backbone']")
    if len(set(names)) != len(names):
        raise ScopeError(f"scope names repeat: {names}")
    for a in names:
        for b in names:
            if a != b and b.startswith(a + "."):
                raise ScopeError(f"scope {b!r} lies inside scope {a!r}; pass only {a!r}")
    return names


def _capture_scope_inputs(model: nn.Module, names: list[str], inputs: tuple):
    """One no-grad run of ``model`` on ``inputs``: each scope's positional tensor inputs, the
    model's output, and its FLOPs. Raises :class:`ScopeError` for a scope not called exactly
    once with tensors only."""
    calls: dict[str, list] = {n: [] for n in names}

    def record(name, module, args, kwargs):
        calls[name].append((args, kwargs))

    hooks = [model.get_submodule(n).register_forward_pre_hook(functools.partial(record, n), with_kwargs=True)
             for n in names]
    counter = FlopCounterMode(display=False)
    try:
        with torch.no_grad(), counter:
            out = model(*inputs)
    except Exception as e:
        shapes = [tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__ for x in inputs]
        raise ExpandInputError(f"the model fails on the example inputs {shapes}: {type(e).__name__}: {e}. "
                               "Pass inputs that the whole model accepts (scope= still takes the whole "
                               "model's inputs)") from e
    finally:
        for h in hooks:
            h.remove()
    captured = {}
    for n in names:
        seen = calls[n]
        if len(seen) != 1:
            raise ScopeError(f"scope {n!r} is called {len(seen)} times when the model runs on the example "
                             "inputs; a scope must run exactly once per forward. Name a submodule that "
                             "does (its parent, or each called part separately)")
        args, kwargs = seen[0]
        bad = [type(a).__name__ for a in list(args) + list(kwargs.values()) if not _tensors_only(a)]
        if kwargs or bad:
            raise ScopeError(f"scope {n!r} is called with {'keyword arguments ' + str(list(kwargs)) if kwargs else ''}"
                             f"{' and ' if kwargs and bad else ''}{'non-tensor arguments ' + str(bad) if bad else ''}; "
                             "a scope takes positional tensors (or lists/tuples of them) only. Name the "
                             "submodule inside it that "
                             "does, or wrap the call so that the scope's forward takes tensors")
        captured[n] = tuple(_clone(a) for a in args)
    return captured, out, float(counter.get_total_flops())


def _tensors_only(value) -> bool:
    """A tensor, or a (nested) list/tuple of tensors (a detection head takes the FPN's levels)."""
    if isinstance(value, (list, tuple)):
        return all(_tensors_only(v) for v in value)
    return isinstance(value, Tensor)


def _clone(value):
    if isinstance(value, (list, tuple)):
        return type(value)(_clone(v) for v in value)
    return value.detach().clone()


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, module)


def _merged_report(ratio: int, teachers: dict[str, DynamicTeacher], total_flops: float, err: float,
                   probe_dtype, names: list[str]) -> ExpansionReport:
    """One report over the whole model: the FLOP share is the scopes' expanded FLOPs over the
    whole model's FLOPs on the example inputs; the rest runs at student width."""
    reps = {n: dt.report for n, dt in teachers.items()}
    expanded = sum(r.expanded_flop_fraction * r.student_flops for r in reps.values())
    in_scopes = sum(r.student_flops for r in reps.values())
    total = max(total_flops, in_scopes)
    notes = [f"scope {n!r}: {r.summary()}" for n, r in reps.items()]
    notes.append(f"{in_scopes / total if total else 1.0:.3f} of the model's FLOPs lie in the scopes; "
                 "the rest runs at student width, shared by teacher and student")
    fronts = sorted({r.frontend for r in reps.values()})
    return ExpansionReport(
        ratio=ratio,
        boundaries=[f"{n}:{b}" for n, r in reps.items() for b in r.boundaries],
        boundary_reasons={f"{n}:{b}": w for n, r in reps.items() for b, w in r.boundary_reasons.items()},
        fallbacks={f"{n}:{b}": w for n, r in reps.items() for b, w in r.fallbacks.items()},
        expanded_flop_fraction=expanded / total if total else 1.0,
        student_params=sum(r.student_params for r in reps.values()),
        teacher_params=sum(r.teacher_params for r in reps.values()),
        student_flops=total,
        max_rel_error=max([err] + [r.max_rel_error for r in reps.values()]),
        permutations=sum(r.permutations for r in reps.values()),
        runtime_widenings=sum(r.runtime_widenings for r in reps.values()),
        branch_layers=sum(r.branch_layers for r in reps.values()),
        seconds=sum(r.seconds for r in reps.values()),
        probe_dtype=str(probe_dtype).replace("torch.", ""),
        size_guards=sorted({g for r in reps.values() for g in r.size_guards}),
        coupling_groups=sum(r.coupling_groups for r in reps.values()),
        frontend="+".join(fronts),
        frontend_notes=notes + [f"scope {n!r}: {x}" for n, r in reps.items() for x in r.frontend_notes],
    )
