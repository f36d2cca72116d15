"""Partial expansion: ``gpd_fx.expand(model, ratio, example_inputs, scope=["backbone"])``.

For models that neither front end captures whole (torchvision's detectors: Python control flow
over image lists, data-dependent box selection), the named submodules are expanded on their
own and put back into a copy of the user's model. Each scope is captured on the inputs it
receives when the whole model runs on ``example_inputs`` (one eval-mode run with forward
hooks), so it is verified on exactly the values it sees inside the model. A scope's inputs and
outputs keep student width (as a whole-model teacher's do), so the rest of the model runs
unchanged around it and is shared: the teacher run and the student run both use and train it.
Where scopes connect (a scope's input tensor *is* another scope's output, as a detector's head
reads the FPN's levels), the teacher passes that value at teacher width through a port
(``passes/ports.py``): the consuming teacher's first layers read all ``r`` copies, while the
model's own code between the scopes still sees student width.

The whole model is verified as :class:`ScopeCheck` says: its outputs against the model's, and
where a discontinuous selection (top-k, NMS, thresholds among scores tied to within rounding)
makes them differ, each scope's output exactly and the rest of the model bit for bit on the
teachers' scope outputs (``dt.verification``; :meth:`ScopedTeacher.compare_with` runs the same
check on other inputs, modes or the student).

The result, :class:`ScopedTeacher`, is used like a :class:`~gpd_fx.DynamicTeacher`:
``dt(x)``, ``dt.student(x)``, ``dt.joint(x)``, ``dt.report``, ``gpd_fx.fold(dt)`` and
``gpd_fx.param_groups(dt, lr)``.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import functools
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor, nn
from torch.utils._pytree import keystr, tree_flatten, tree_flatten_with_path, tree_map
from torch.utils.flop_counter import FlopCounterMode

from gpd_fx.errors import ExpandInputError, VerificationError
from gpd_fx.passes.widen_verify import TOL, close
from gpd_fx.teacher import DynamicTeacher, ExpansionReport

__all__ = ["ScopeCheck", "ScopeError", "ScopedTeacher", "compare_scoped"]


class ScopeError(ExpandInputError):
    """A ``scope=`` entry of :func:`gpd_fx.expand` is unusable: no such submodule (the message
    lists the closest names), nested in another scope, or not called exactly once with tensor
    arguments when the model runs on the example inputs."""


class _ScopeSlot(nn.Module):
    """Stands in the user's model where a scope was: runs the scope's teacher, or its student
    (``use_student``, set by :class:`ScopedTeacher` around a student run).

    The model may also read other attributes of the scope or call its other methods (RetinaNet's
    and FCOS's train-mode loss calls ``self.head.compute_loss(...)``). Those come from a copy of
    the scope on the meta device (``shadow``, not a submodule: no parameters, no state): its
    configuration and parameter-free methods work as in the model, while a method that reads the
    scope's parameters fails with a :class:`ScopeError` instead of silently using stale ones.
    """

    def __init__(self, dt: DynamicTeacher, shadow: nn.Module | None = None):
        super().__init__()
        self.dt = dt
        self.use_student = False
        object.__setattr__(self, "_shadow", shadow)

    def forward(self, *args, **kwargs):
        return self.dt.student(*args, **kwargs) if self.use_student else self.dt(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            shadow = self.__dict__.get("_shadow")
            if shadow is None or name.startswith("__"):
                raise
        value = getattr(shadow, name)
        if isinstance(value, (nn.Module, Tensor)):
            # a meta copy would take a freeze (requires_grad_, eval) or a read without effect
            raise ScopeError(f"the model reads {type(shadow).__name__}.{name} ({type(value).__name__}) of a scope; "
                             "a scope's submodules, parameters and buffers live in its teacher (dt.scopes[name]."
                             "teacher) and student, not in the model. Freeze or change them before expand, or "
                             "name a smaller scope that leaves this part out")
        if callable(value):
            return functools.partial(_call_shadow, value, type(shadow).__name__, name)
        return value


def _call_shadow(method, owner: str, name: str, *args, **kwargs):
    try:
        return method(*args, **kwargs)
    except (RuntimeError, NotImplementedError) as e:
        # PyTorch reports a meta tensor's missing data as one of these two ("Cannot copy out of
        # meta tensor", "Tensor on device meta is not on the expected device"): only that case
        # means the method read the scope's parameters; every other error passes unchanged
        if "meta" not in str(e):
            raise
        raise ScopeError(f"the model calls {owner}.{name}() of a scope, and it reads the scope's parameters: "
                         "only a scope's forward runs its teacher or student; its other methods run on a "
                         "copy without parameters. Put the code that calls it inside the scope's forward, or "
                         f"leave this module out of scope= ({type(e).__name__}: {str(e)[:200]})") from e


def _shadow(module: nn.Module) -> nn.Module:
    """A copy of ``module`` on the meta device (its attributes and methods, no tensor data): the
    deep copy takes a meta tensor for each parameter and buffer, so no data is copied first."""
    memo = {}
    for t in [*module.parameters(), *module.buffers()]:
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(module, memo)


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
        self.verification: ScopeCheck | None = None   # expand's own whole-model check

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

    def compare_with(self, model: nn.Module, *inputs, tol: float | None = None, seed: int | None = None,
                     student: bool = False, always_rest: bool = False, reference_run=None) -> ScopeCheck:
        """:func:`compare_scoped` of this model (the scopes' teachers, or with ``student`` their
        students) against ``model`` (the user's model) on ``inputs``, both run in their current
        modes. ``tol`` defaults to the project's tolerance for the parameters' dtype;
        ``reference_run`` as in :func:`compare_scoped` (``model``'s run, when already made)."""
        if tol is None:
            dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
            tol = TOL.get(dtype, 1e-3)
        with self._students(student):
            return compare_scoped(self.model, model, self.scope_names, inputs, tol, seed=seed,
                                  always_rest=always_rest, reference_run=reference_run)

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


@dataclass
class ScopeCheck:
    """How a model with expanded (or folded) scopes compares with the reference model on one input.

    A scope's teacher is exact up to rounding; what the rest of the model does with a
    rounding-level difference is the rest's own business. Post-processing that selects (top-k,
    NMS, score thresholds) is discontinuous: where scores tie to within rounding (e.g. a backbone
    whose signal has faded below float64 resolution, so that many anchors score the same to a
    few ulp), any reordering of the sums picks other boxes, and the selection then cascades
    (NMS keeps other neighbours). Comparing permutations among tied scores does not cover that.
    What is checked instead, and is what "the scoped model is the model" means up to rounding:

    * ``direct``: the whole outputs against the reference's; enough when it passes;
    * ``scopes``: each scope's output in the whole run against the reference's scope output
      (same containers, keys and order; tensors within ``tol``): the expanded part is exact;
    * ``rest``: the reference model run with each scope's output replaced by the candidate's
      (forward hooks), against the candidate's own outputs: the rest of the model computes the
      same function of the scopes' outputs (no side effect of a scope, no parameter tied across
      a scope's edge, and the slot returns what the rest expects).

    ``ok``: every scope within ``tol``, and ``direct`` or ``rest`` within ``tol``.
    Errors are max |a - b| / max |b| per tensor (integer tensors, e.g. labels, must be equal;
    ``inf`` when shapes or structure differ, with the place in ``*_why``).
    """

    tol: float
    direct: float
    direct_why: str = ""
    scopes: dict = field(default_factory=dict)
    scopes_why: dict = field(default_factory=dict)
    rest: float | None = None       # None: not run (``direct`` passed and it was not asked for)
    rest_why: str = ""

    @property
    def scopes_ok(self) -> bool:
        return all(e <= self.tol for e in self.scopes.values())

    @property
    def ok(self) -> bool:
        return self.scopes_ok and (self.direct <= self.tol or (self.rest is not None and self.rest <= self.tol))

    @property
    def error(self) -> float:
        """The largest error of what was verified: the scopes and the direct comparison when it
        passed, else the scopes and the rest."""
        whole = self.direct if self.direct <= self.tol or self.rest is None else self.rest
        return max([whole] + list(self.scopes.values()))

    def summary(self) -> str:
        """One line: each part's error (and where it differs)."""
        def part(e, why):
            return f"{e:.2g}" + (f" ({why})" if why and e > self.tol else "")
        scopes = ", ".join(f"{n!r} {part(e, self.scopes_why.get(n, ''))}" for n, e in self.scopes.items())
        line = f"direct {part(self.direct, self.direct_why)}; scope outputs {scopes}"
        if self.rest is not None:
            line += f"; rest of the model on the scopes' outputs {part(self.rest, self.rest_why)}"
        line += f" (tol {self.tol:g})"
        if self.ok and self.direct > self.tol:
            line += ("; the whole outputs differ only after the rest of the model amplifies rounding-level "
                     "differences of the scopes' outputs (discontinuous selection: top-k, NMS, thresholds)")
        elif not self.scopes_ok:
            line += "; a scope's output differs inside the whole model: report this as a bug with the model"
        elif self.rest is not None and self.rest > self.tol:
            line += ("; the rest of the model does not compute the same function of the scopes' outputs: a "
                     "scope with side effects, a parameter tied across a scope's edge, or a slot returning "
                     "other containers")
        return line


def compare_scoped(candidate: nn.Module, reference: nn.Module, names: Sequence[str], inputs: tuple, tol: float,
                   *, seed: int | None = None, always_rest: bool = False, reference_run=None) -> ScopeCheck:
    """Compare ``candidate`` (the model with each scope in ``names`` replaced: by its teacher, its
    student or its folded student) with ``reference`` (the model itself) on ``inputs``; see
    :class:`ScopeCheck` for what is compared and why.

    Args:
        candidate, reference: models with the same submodule names at ``names``, each called once
            per forward; run as they are (set eval/train mode before).
        names: the scopes.
        inputs: the whole model's positional inputs (a tuple), e.g. ``(images,)`` or
            ``(images, targets)`` in train mode.
        tol: relative tolerance.
        seed: ``torch.manual_seed(seed)`` before each forward (train mode samples proposals).
        always_rest: also run the ``rest`` check when ``direct`` passes.
        reference_run: ``(output, {scope: output})`` of ``reference`` on ``inputs`` if already run.
    """
    names = list(names)
    ref_out, ref_scopes = (reference_run if reference_run is not None
                           else record_scopes(reference, names, inputs, seed))
    out, scopes = record_scopes(candidate, names, inputs, seed)
    check = ScopeCheck(tol, *_tree_error(out, ref_out))
    for n in names:
        check.scopes[n], why = _tree_error(scopes[n], ref_scopes[n])
        if why:
            check.scopes_why[n] = why
    if always_rest or check.direct > tol:
        again, _ = record_scopes(reference, names, inputs, seed, replace=scopes)
        check.rest, check.rest_why = _tree_error(out, again)
    return check


def record_scopes(root: nn.Module, names: list[str], inputs: tuple, seed: int | None,
                  replace: dict | None = None):
    """``root(*inputs)`` without grad, with each scope's output recorded (a copy), and replaced by
    a copy of ``replace[name]`` when given. Returns ``(output, {name: scope output})``."""
    seen: dict[str, Any] = {}

    def hook(name, module, args, out):
        if name in seen:
            raise ScopeError(f"scope {name!r} is called more than once in one forward of {type(root).__name__}")
        seen[name] = _clone(out)
        return _clone(replace[name]) if replace is not None else None

    hooks = [root.get_submodule(n).register_forward_hook(functools.partial(hook, n)) for n in names]
    try:
        if seed is not None:
            torch.manual_seed(seed)
        with torch.no_grad():
            out = root(*inputs)
    finally:
        for h in hooks:
            h.remove()
    missing = [n for n in names if n not in seen]
    if missing:
        raise ScopeError(f"scope(s) {missing} not called in one forward of {type(root).__name__}")
    return out, seen


def _plain(value):
    """``value`` with every ``OrderedDict`` a plain ``dict`` (same keys, same order): a traced
    scope returns a dict where the module returned an OrderedDict, and both read the same."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(_plain(v) for v in value)
    return value


def _tree_error(got, ref) -> tuple[float, str]:
    """max |got - ref| / max |ref| per tensor over two nested outputs, and where they differ first
    (``inf`` when the containers, keys, shapes or integer tensors differ)."""
    g_leaves, g_spec = tree_flatten(_plain(got))
    r_paths, r_spec = tree_flatten_with_path(_plain(ref))
    if g_spec != r_spec:
        return math.inf, f"structure differs: {type(got).__name__} vs {type(ref).__name__} ({g_spec} vs {r_spec})"[:400]
    err, why = 0.0, ""
    for g, (path, r) in zip(g_leaves, r_paths):
        if not isinstance(r, Tensor):
            if g != r:
                return math.inf, f"{keystr(path)}: {g!r} vs {r!r}"[:300]
            continue
        if not isinstance(g, Tensor) or g.shape != r.shape or g.dtype != r.dtype:
            gs = tuple(g.shape) if isinstance(g, Tensor) else type(g).__name__
            return math.inf, f"{keystr(path)}: {gs} vs {tuple(r.shape)}"
        if not r.is_floating_point() and not r.is_complex():
            if not torch.equal(g, r):
                return math.inf, f"{keystr(path)}: values differ ({int((g != r).sum())} of {r.numel()})"
            continue
        _, rel = close(g, r, 0.0)
        if rel > err:
            err, why = rel, keystr(path)
    return err, why


def expand_scoped(model: nn.Module, ratio: int, inputs: tuple, scope, *, verify_dtype=None,
                  **expand_kwargs) -> ScopedTeacher:
    """Expand the named submodules of ``model`` in place (in a copy); see :func:`gpd_fx.expand`.

    The entry point is ``gpd_fx.expand(..., scope=...)``, which checks ``ratio``, ``noise`` and
    ``frontend`` before calling this (the scopes are then built by the internal ``_expand``).

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
        VerificationError: the whole model's outputs with the teachers differ from the model's,
            and the difference is not explained by rounding at the scopes' outputs (see
            :class:`ScopeCheck`: a scope's output differs, or the rest of the model run on the
            teachers' scope outputs does not give the teachers' whole outputs).
    """
    from gpd_fx.expand import _eval_mode

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
        scope_inputs, reference, total_flops, ref_scopes, links = _capture_scope_inputs(work, names, probe)
        # each scope is built in the probe dtype (verify_dtype=None: work is converted already),
        # in the order the model calls them: a scope reading another's output takes it at teacher
        # width through a port (passes/ports.py) where the producer's teacher has it widened
        teachers, port_dims = {}, {}
        for n in links.order:
            kwargs = dict(expand_kwargs, leaf_modules=_scope_leaves(model, work, n, expand_kwargs.get("leaf_modules")))
            wide = {i: port_dims[p][j] for i, (p, j) in links.inputs[n].items() if j in port_dims.get(p, {})}
            teachers[n] = _expand_scope(work.get_submodule(n), ratio, scope_inputs[n], wide, kwargs,
                                        wide_outputs=n in links.producers())
            if n in links.producers():
                port_dims[n] = _open_ports(teachers[n], scope_inputs[n])
        teachers = {n: teachers[n] for n in names}
        # the model with each scope's slot (a copy of the shell: `work` stays the reference)
        shadows = {n: _shadow(work.get_submodule(n)) for n in names}
        candidate = copy.deepcopy(work, {id(work.get_submodule(n)): _ScopeSlot(dt, shadows[n])
                                         for n, dt in teachers.items()})
        check = compare_scoped(candidate, work, names, probe, tol, reference_run=(reference, ref_scopes))
    if not check.ok:
        hint = ("" if probe_dtype == torch.float64 else " Float32 rounding inside a scope can exceed its "
                "tolerance after deep stacks; verify with verify_dtype=torch.float64.")
        raise VerificationError(f"whole-model output with scopes {names}: {check.summary()}.{hint}")
    err = check.error
    if verify_dtype is not None:
        # the shell is the user's own tensors again; only the scopes come from the probe copy
        shell = copy.deepcopy(model, {id(model.get_submodule(n)): None for n in names})
        for n, dt in teachers.items():
            _set_submodule(shell, n, _ScopeSlot(dt.to(orig_dtype), shadows[n]))
    else:
        shell = candidate
    report = _merged_report(ratio, teachers, total_flops, err, probe_dtype, names)
    if check.direct > tol:
        report.frontend_notes.append(f"whole-model check through the scopes: {check.summary()}")
    # parameter counts of the whole model: the student's, and the teacher's (scopes + shared rest)
    report.student_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    report.teacher_params = sum(p.numel() for p in shell.parameters() if p.requires_grad)
    config = dict(ratio=ratio, scope=list(names), **{k: v for k, v in expand_kwargs.items()
                                                   if k in ("noise", "seed", "strict", "branches", "frontend")})
    dt = ScopedTeacher(shell, names, report, config)
    dt.verification = check
    dt.train(model.training)
    # modules whose own flag differs from the root's (frozen parts in eval mode) keep it
    flags = dict(model.named_modules())
    for name, m in dt.model.named_modules():
        if name in flags and not isinstance(m, _ScopeSlot) and not name.startswith(tuple(n + "." for n in names)):
            m.training = flags[name].training
    return dt


def _expand_scope(module: nn.Module, ratio: int, inputs: tuple, wide: dict[int, int], kwargs: dict,
                  wide_outputs: bool = False) -> DynamicTeacher:
    """:func:`gpd_fx.expand` of one scope on the inputs it receives (``wide``: its input tensors
    taken at teacher width through a port; ``wide_outputs``: a later scope reads its outputs)."""
    import time

    from gpd_fx.expand import _expand

    t0 = time.perf_counter()
    # kwargs are expand's own (noise, seed, strict, leaf_modules, ...), all passed by gpd_fx.expand
    dt = _expand(module, ratio, inputs, verify_dtype=None, wide_inputs=wide or None, wide_outputs=wide_outputs,
                 **kwargs)
    dt.report.seconds = time.perf_counter() - t0
    from gpd_fx.passes.ports import gpd_port_widen

    ported = 0   # the inputs the builder really widened through a port (not nested containers)
    for node in dt.teacher.graph.nodes:
        if node.op == "call_function" and node.target is gpd_port_widen:
            dims = node.args[1]
            ported += sum(d is not None for d in dims) if isinstance(dims, tuple) else 1
    if ported:
        dt.report.frontend_notes.append(f"{ported} input tensor(s) taken at teacher width from another scope "
                                        "through a port")
    return dt


def _open_ports(dt: DynamicTeacher, inputs: tuple) -> dict[int, int]:
    """Make the output narrowing of ``dt``'s teacher graphs ports (``gpd_port_narrow``) and
    return ``{output tensor position: dim}`` of the outputs that now carry their teacher-width
    value to a consuming scope (found by running the teacher once on ``inputs``)."""
    from gpd_fx.passes import ports
    from gpd_fx.passes.layout import gpd_narrow

    for gm in {id(g): g for g in (dt.teacher, dt.teacher_train) if g is not None}.values():
        out = next(n for n in gm.graph.nodes if n.op == "output")
        changed = False

        def swap(a):
            nonlocal changed
            if isinstance(a, torch.fx.Node) and a.op == "call_function" and a.target is gpd_narrow:
                a.target = ports.gpd_port_narrow
                changed = True
            return a

        torch.fx.node.map_aggregate(out.args, swap)
        if changed:
            gm.recompile()
    training = dt.training
    dt.eval()
    try:
        with torch.no_grad():
            leaves = _tensor_leaves(dt(*inputs))
    finally:
        dt.train(training)
    dims = {}
    for j, leaf in enumerate(leaves):
        entry = ports._PORTS.get(id(leaf))
        if entry is not None and entry[0]() is leaf:
            dims[j] = entry[2]
    return dims


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
    model's output, its FLOPs, and each scope's output. Raises :class:`ScopeError` for a scope not called exactly
    once with tensors only."""
    calls: dict[str, list] = {n: [] for n in names}
    outputs: dict[str, Any] = {}
    produced: dict[int, tuple[str, int, Tensor]] = {}   # id(output tensor) -> (scope, position, it)
    links: dict[str, dict[int, tuple[str, int]]] = {n: {} for n in names}
    order: list[str] = []

    def record(name, module, args, kwargs):
        calls[name].append((args, kwargs))
        # an input tensor that *is* an earlier scope's output: the scopes connect there
        for i, leaf in enumerate(_tensor_leaves(args)):
            hit = produced.get(id(leaf))
            if hit is not None and hit[2] is leaf:
                links[name][i] = hit[:2]

    def record_output(name, module, args, out):
        outputs[name] = _clone(out)
        order.append(name)
        for j, leaf in enumerate(_tensor_leaves(out)):
            produced.setdefault(id(leaf), (name, j, leaf))   # holds the tensor: ids stay unique

    hooks = [model.get_submodule(n).register_forward_pre_hook(functools.partial(record, n), with_kwargs=True)
             for n in names]
    hooks += [model.get_submodule(n).register_forward_hook(functools.partial(record_output, n)) for n in names]
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
    return captured, out, float(counter.get_total_flops()), outputs, _Links(order, links)


class _Links:
    """Where scopes connect: ``inputs[consumer][i] = (producer, j)`` when the consumer's i-th
    input tensor (pytree order) is the producer's j-th output tensor, the same object, in the
    run on the example inputs; ``order``: the scopes in the order they ran."""

    def __init__(self, order: list[str], inputs: dict[str, dict[int, tuple[str, int]]]):
        self.order = order
        self.inputs = inputs

    def producers(self) -> set[str]:
        return {p for links in self.inputs.values() for p, _ in links.values()}


def _tensor_leaves(value) -> list[Tensor]:
    return [v for v in tree_flatten(value)[0] if isinstance(v, Tensor)]


def _tensors_only(value) -> bool:
    """A tensor, or a (nested) list/tuple of tensors (a detection head takes the FPN's levels)."""
    if isinstance(value, (list, tuple)):
        return all(_tensors_only(v) for v in value)
    return isinstance(value, Tensor)


def _clone(value):
    """A detached copy of every tensor in ``value`` (same containers; other leaves as they are)."""
    return tree_map(lambda v: v.detach().clone() if isinstance(v, Tensor) else v, value)


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
