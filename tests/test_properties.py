"""Property-based tests: ``expand`` and ``fold`` are exact on random CNNs and transformer blocks.

The strategies in ``tests/strategies.py`` build random float64 networks step by step; every
property below must hold for every one of them, for ratios 2..4, with the multi-branch teacher
layers (``branches=None``, CBR) and without (``branches=()``, IR only).
"""

from __future__ import annotations

import copy
import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import gpd_fx
from gpd_fx.passes.branches import BranchConvNd
from strategies import Case, cnn_cases, cnn_program, conv_spec, vit_cases, vit_program

# Tolerance, relative to max(1, max |reference|). Everything runs in float64 (eps 1.1e-16).
# The teacher computes each output from r times more terms than the student, in another order,
# and its zero-sum noise only cancels up to rounding; with <= ~2e3-term dot products, <= ~20
# layers and normalisations whose 1/std can amplify by ~1e2 (eps 1e-5 in BN/GN/IN), the worst
# case stays near 1e-12. 1e-9 keeps about three orders of headroom, while a wrong rule (a
# mis-ordered layout, a missed 1/r, stale statistics) is off by O(1e-2..1) and cannot pass.
# The floor of 1 in the scale keeps outputs that happen to cancel to ~0 from making the bound
# meaningless; intermediate activations are O(1) by construction (default init, normalisation).
TOL = 1e-9

RATIOS = st.integers(2, 4)
BRANCHES = st.sampled_from([None, ()])

# The number of examples comes from the loaded profile (tests/conftest.py: `ci` 25, `dev` 10).
# One example (build, expand, a few forwards; 3 SGD steps for the training properties) takes
# ~0.05-0.3 s on one thread, so the whole file stays well under a minute at 25 examples.
FAST = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Run these tiny-tensor tests on one intra-op thread, restoring the setting afterwards.

    The tensors here have tens to hundreds of elements, so OpenMP parallelism buys nothing; on a
    busy 2-core machine its worker threads spin-wait for each other and a 10 us LayerNorm took
    15 ms (measured), i.e. the file ran about 5x slower with 2 threads than with 1.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """``max |actual - expected| <= TOL * max(1, max |expected|)``."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    scale = max(1.0, expected.detach().abs().max().item())
    err = (actual.detach() - expected.detach()).abs().max().item()
    assert err <= TOL * scale, f"{what}: max abs error {err:.3e} > {TOL:.0e} * {scale:.3e}"


def assert_state_close(actual: dict, expected: dict, what: str) -> None:
    assert list(actual) == list(expected), f"{what}: keys differ: {sorted(set(actual) ^ set(expected))}"
    for k, v in expected.items():
        if v.is_floating_point():
            assert_close_rel(actual[k], v, f"{what}[{k!r}]")
        else:
            assert torch.equal(actual[k], v), f"{what}[{k!r}]: {actual[k]} != {v}"


def expand(case: Case, ratio: int, branches, noise: float = 0.1):
    dt = gpd_fx.expand(case.model, ratio=ratio, example_inputs=(case.x,), noise=noise, seed=0,
                       branches=branches)
    assert dt.report.fallbacks == {}, str(dt.report)
    return dt


def check_init_exact(case: Case, ratio: int, branches, noise: float, expect_no_boundaries: bool,
                     expand_in_eval: bool = False) -> None:
    """Teacher == student == model at init (eval and train mode), and fold(dt) == model's state.

    ``expand_in_eval``: the model is in eval mode when expanded (then switched to train mode),
    so a ``self.training`` flag baked into the traced graph would show up as a mismatch.
    """
    model, x = case.model, case.x
    init_state = copy.deepcopy(model.state_dict())
    model.train(not expand_in_eval)
    dt = expand(case, ratio, branches, noise)
    assert dt.training == model.training
    if expect_no_boundaries:
        assert dt.report.boundaries == [], str(dt.report)
        assert_widened(dt, x)
    assert 0.0 <= dt.report.expanded_flop_fraction <= 1.0
    # expand never modifies the model
    assert_state_close(model.state_dict(), init_state, "model state after expand")

    folded = gpd_fx.fold(dt)
    assert type(folded) is type(model) and not folded.training
    assert_state_close(folded.state_dict(), init_state, "fold(dt) at init")

    model.eval(), dt.eval()
    with torch.no_grad():
        y = model(x)
        assert_close_rel(dt(x), y, "teacher (eval)")
        assert_close_rel(dt.student(x), y, "dt.student (eval)")
        assert_close_rel(folded(x), y, "fold(dt) (eval)")
        # expand verified itself on x only: the teacher must be exact on any input, not just x
        for x2 in case.other_inputs():
            assert_close_rel(dt(x2), model(x2), f"teacher (eval, unseen input {tuple(x2.shape)})")

    # Train mode: BN normalises with batch statistics and updates its running statistics. The
    # model, the teacher and dt.student each see one batch, so each updates its own statistics.
    model.train(), dt.train()
    with torch.no_grad():
        y = model(x)
        assert_close_rel(dt(x), y, "teacher (train)")
        assert_close_rel(dt.student(x), y, "dt.student (train)")
    # ... and after that one update, eval mode still agrees: the teacher's running statistics
    # are the widened student's, and the student's own buffers follow the model's.
    model.eval(), dt.eval()
    with torch.no_grad():
        y = model(x)
        assert_close_rel(dt(x), y, "teacher (eval after a train-mode batch)")
        assert_close_rel(dt.student(x), y, "dt.student (eval after a train-mode batch)")
    assert_state_close(gpd_fx.fold(dt).state_dict(), model.state_dict(), "fold(dt) after a train-mode batch")


def _derives_from_parameter(n) -> bool:
    """``n`` is a parameter read (``get_attr``) through layout conversions only: the narrowing of
    a parameter widened for another consumer, not of an activation."""
    from gpd_fx.passes.layout import gpd_narrow, gpd_widen

    while n.op == "call_function" and n.target in (gpd_narrow, gpd_widen, operator.mul):
        n = n.args[0]
    return n.op == "get_attr"


def _weight_layer(n, modules) -> bool:
    """A node that mixes channels with a learned weight: a module with a >= 2-dim ``weight``
    (conv, linear, their multi-branch versions) or ``F.linear``/``F.conv*``."""
    if n.op == "call_module":
        w = getattr(modules[n.target], "weight", None)
        return isinstance(w, torch.Tensor) and w.dim() >= 2
    return n.op == "call_function" and n.target in (F.linear, F.conv1d, F.conv2d, F.conv3d)


def _conv_like(n, modules) -> bool:
    """Channels on dim 1 (a convolution), not on the last dim (a linear layer)."""
    if n.op == "call_module":
        m = modules[n.target]
        return isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                              nn.ConvTranspose3d, BranchConvNd))
    return n.target in (F.conv1d, F.conv2d, F.conv3d)


def assert_widened(dt, x: torch.Tensor) -> None:
    """The teacher is actually wider, not only exact (a rule that narrowed its inputs and ran
    the op at student width would be exact too). For a model whose every op has a rule:

    * every weight layer's output is expanded (``node.meta["gpd_layout"]`` is a Layout), except
      by design (``DESIGN.md §1``) a width-1 output (a spatial-attention map, broadcast by its
      consumers) and an output that reaches the model output through channel-wise
      (transparent) ops only (the logits);
    * nothing is narrowed back to student width before the output: ``gpd_narrow`` of an
      activation feeds only the output node.
    """
    from torch.fx.passes.shape_prop import ShapeProp

    from gpd_fx.passes.layout import Layout, gpd_narrow
    from gpd_fx.passes.registry import lookup
    from gpd_fx.passes.widen import LAYOUT_KEY

    rep = dt.report
    assert rep.boundaries == [] and rep.fallbacks == {}, str(rep)
    teacher = dt.teacher
    was_training = teacher.training
    ShapeProp(teacher.eval()).propagate(x)
    teacher.train(was_training)
    modules = dict(teacher.named_modules())
    kept_tail: dict = {}

    def to_output_channelwise(n) -> bool:
        """All uses of ``n`` reach the output through transparent ops (see registry.RuleEntry)."""
        if n not in kept_tail:
            kept_tail[n] = False
            ok = True
            for u in n.users:
                if u.op == "output":
                    continue
                entry = lookup(u, modules) if u.op != "call_module" or u.target in modules else None
                ok = ok and entry is not None and entry.transparent and to_output_channelwise(u)
            kept_tail[n] = ok
        return kept_tail[n]

    for n in teacher.graph.nodes:
        if n.op == "call_function" and n.target is gpd_narrow and not _derives_from_parameter(n.args[0]):
            assert all(u.op == "output" for u in n.users), \
                f"{n.format_node()} narrows an activation for {[u.format_node() for u in n.users]}"
        if _weight_layer(n, modules) and not to_output_channelwise(n):
            shape = n.meta["tensor_meta"].shape
            width = shape[1] if _conv_like(n, modules) else shape[-1]   # student width when kept
            assert width == 1 or isinstance(n.meta.get(LAYOUT_KEY), Layout), \
                f"weight layer {n.format_node()} runs at student width {width} (layout {n.meta.get(LAYOUT_KEY)})"


def gpd_loss(t: torch.Tensor, s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """CE(teacher) + CE(student) + KL(student || teacher.detach())."""
    kl = F.kl_div(F.log_softmax(t.detach(), -1), F.log_softmax(s, -1), log_target=True, reduction="batchmean")
    return F.cross_entropy(t, y) + F.cross_entropy(s, y) + kl


def check_fold_after_training(case: Case, ratio: int, branches, steps: int = 3) -> None:
    """After a few GPD steps, fold(dt) (and its BN-fused variant) equals dt.student in eval mode."""
    model, x = case.model, case.x
    init_state = copy.deepcopy(model.state_dict())
    dt = expand(case, ratio, branches)
    gen = torch.Generator().manual_seed(1)
    opt = torch.optim.SGD(dt.parameters(), lr=0.05, momentum=0.9)
    dt.train()
    for _ in range(steps):
        xb = torch.randn(x.shape, generator=gen, dtype=x.dtype)
        yb = torch.randint(case.num_classes, (x.shape[0],), generator=gen)
        loss = gpd_loss(dt(xb), dt.student(xb), yb)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()

    dt.eval()
    with torch.no_grad():
        ref = dt.student(x)
        folded = gpd_fx.fold(dt)
        assert type(folded) is type(model) and not folded.training
        assert_close_rel(folded(x), ref, "fold(dt) after training")
        folded2, fused = gpd_fx.fold(dt, fuse_bn=True)
        assert_close_rel(folded2(x), ref, "fold(dt, fuse_bn=True)[0] after training")
        assert_close_rel(fused(x), ref, "fold(dt, fuse_bn=True)[1] (fused) after training")
    state = folded.state_dict()
    assert list(state) == list(init_state)
    changed = [k for k, v in init_state.items()
               if v.is_floating_point() and (state[k] - v).abs().max().item() > 1e-6]
    assert changed, "training did not change any folded weight"


# --------------------------------------------------------------------------------------------
# random CNNs (issue 2, issue 4)
# --------------------------------------------------------------------------------------------

# Minimal failing programs found by the strategies, kept as explicit examples (always run).
_POOL_HEAD = dict(kind="pool_linear", hidden=0, pool="mean", act="relu", hidden_bn=False)
CNN_REGRESSIONS = [
    # one conv module called on x and on a channel-shuffled x (two input layouts, one weight)
    cnn_program(dict(kind="shared", k=1, mode="shuffled", groups=2)),
    # one weight parameter held by two conv modules (tied weights)
    cnn_program(dict(kind="shared", k=1, mode="tied", groups=1)),
    # reshape(x.shape): the target shape is a traced torch.Size
    cnn_program(dict(kind="token_mix", how="shape")),
    # nodes whose exact value is 0 (spatial mean of an InstanceNorm output; mean of centred data)
    cnn_program(dict(kind="cna", conv=conv_spec(4, 4, 3, norm="in")), head=_POOL_HEAD),
    cnn_program(dict(kind="arith", how="center"), dict(kind="arith", how="center")),
    # CBAM: torch.max(x, dim=1, keepdim=True)[0] over the channel dim (values only)
    cnn_program(dict(kind="spatial_att", k=3, how="mean_max")),
    # F.batch_norm(x, self.running_mean, ..., self.training): the teacher's running statistics
    # must follow a train-mode batch like the model's
    cnn_program(dict(kind="cna", conv=conv_spec(4, 4, norm="bn_fn"))),
]
VIT_REGRESSIONS = [
    vit_program(dict(heads=3, head_dim=1)),              # head_dim 1 (SDPA)
    vit_program({}, norm="rms_fn"),                       # F.rms_norm(x, (x.shape[-1],), w)
    vit_program({}, norm="ln_fn"),                        # F.layer_norm(x, self.weight.shape, w, b)
]


def _regressions(cases, **extra):
    """Decorator adding ``@example(case=c, ratio=2, branches=(), noise=0.1, **extra)`` for each case."""
    def deco(fn):
        for c in reversed(cases):
            fn = example(case=c, ratio=2, branches=(), noise=0.1, **extra)(fn)
        return fn
    return deco


@FAST
@_regressions(CNN_REGRESSIONS, expand_in_eval=False)
@given(case=cnn_cases(), ratio=RATIOS, branches=BRANCHES, noise=st.sampled_from([0.1, 0.1, 0.0, 1.0]),
       expand_in_eval=st.booleans())
def test_cnn_expand_and_fold_exact_at_init(case, ratio, branches, noise, expand_in_eval):
    """Random CNNs: teacher, dt.student and fold(dt) equal the model at init, eval and train."""
    # every op the CNN strategy generates has a rule, so no boundary may be cut
    check_init_exact(case, ratio, branches, noise, expect_no_boundaries=True, expand_in_eval=expand_in_eval)


@FAST
@given(case=cnn_cases(), ratio=RATIOS, branches=BRANCHES)
def test_cnn_fold_after_training(case, ratio, branches):
    """Random CNNs: after 3 GPD steps fold(dt)(x) == dt.student(x) (also BN-fused), weights moved."""
    check_fold_after_training(case, ratio, branches)


# --------------------------------------------------------------------------------------------
# random transformer blocks (issue 3, issue 4)
# --------------------------------------------------------------------------------------------

@FAST
@_regressions(VIT_REGRESSIONS)
@given(case=vit_cases(), ratio=RATIOS, branches=BRANCHES, noise=st.sampled_from([0.1, 0.1, 0.0, 1.0]))
def test_vit_expand_and_fold_exact_at_init(case, ratio, branches, noise):
    """Random ViT-style models: teacher, dt.student and fold(dt) equal the model at init."""
    check_init_exact(case, ratio, branches, noise, expect_no_boundaries=True)


@FAST
@given(case=vit_cases(), ratio=RATIOS, branches=BRANCHES)
def test_vit_fold_after_training(case, ratio, branches):
    """Random ViT-style models: after 3 GPD steps fold(dt)(x) == dt.student(x), weights moved."""
    check_fold_after_training(case, ratio, branches)


# --------------------------------------------------------------------------------------------
# the widening check itself (issue 12): it must catch a rule that silently stopped widening
# --------------------------------------------------------------------------------------------

class _WideningNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc1 = nn.Linear(8, 16)
        self.ln = nn.LayerNorm(16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x):
        y = self.relu(self.bn(self.conv1(x)))
        y = y + self.conv2(y)
        z = F.gelu(self.ln(self.fc1(y.mean((2, 3)))))
        return self.fc2(z)


def _unwidened(ctx, node):
    """Exact but not wider: inputs narrowed to student width, the op run as the student's."""
    return ctx.emit_same(ctx.narrow(node.args), ctx.narrow(node.kwargs)), None


@pytest.mark.parametrize("key", [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, operator.add, "mean", nn.Linear,
                                 nn.LayerNorm, F.gelu], ids=str)
def test_widening_check_catches_a_rule_that_stops_widening(monkeypatch, key):
    """With the built-in registry the net passes :func:`assert_widened`; with the rule of ``key``
    replaced by one that narrows its inputs and runs the op at student width (still exact, so
    no boundary and no fallback), it fails."""
    from gpd_fx.passes.registry import RULES, RuleEntry

    torch.manual_seed(0)
    model, x = _WideningNet().double(), torch.randn(2, 3, 6, 6, dtype=torch.float64)
    dt = gpd_fx.expand(model, ratio=2, example_inputs=(x,), branches=())
    assert_widened(dt, x)

    table = RULES.modules if isinstance(key, type) else RULES.methods if isinstance(key, str) else RULES.functions
    monkeypatch.setitem(table, key, RuleEntry(_unwidened, table[key].transparent))
    broken = gpd_fx.expand(model, ratio=2, example_inputs=(x,), branches=())
    assert broken.report.boundaries == [] and broken.report.fallbacks == {}   # silent: exact, verified
    with torch.no_grad():
        assert_close_rel(broken.eval()(x), model.eval()(x), "teacher with the unwidened rule")
    with pytest.raises(AssertionError, match="runs at student width|narrows an activation"):
        assert_widened(broken, x)


def _rules_that_widen(case: Case) -> dict:
    """``{(table name, key): student node}`` for every registered rule whose teacher node is
    expanded when ``case`` is expanded (each rule once, at its first node)."""
    from gpd_fx.passes.registry import RULES, has_module_rule, lookup
    from gpd_fx.passes.trace import trace
    from gpd_fx.passes.layout import Layout
    from gpd_fx.passes.widen import LAYOUT_KEY, STUDENT_KEY

    model = copy.deepcopy(case.model).eval()
    dt = gpd_fx.expand(model, ratio=2, example_inputs=(case.x,), branches=())
    expanded = {n.meta[STUDENT_KEY] for n in dt.teacher.graph.nodes
                if STUDENT_KEY in n.meta and isinstance(n.meta.get(LAYOUT_KEY), Layout)}
    gm = trace(model, example_inputs=(case.x,), has_rule=has_module_rule)
    modules = dict(gm.named_modules())
    found = {}
    for node in gm.graph.nodes:
        entry = lookup(node, modules) if node.name in expanded else None
        if entry is None:
            continue
        for name, table in (("modules", RULES.modules), ("functions", RULES.functions), ("methods", RULES.methods)):
            key = type(modules[node.target]) if node.op == "call_module" else node.target
            if table.get(key) is entry:
                found.setdefault((name, key), node.name)
    return found


def test_every_widening_rule_of_the_regression_nets_is_caught_when_it_stops_widening(monkeypatch):
    """For the kept regression nets: every registered rule that produced an expanded teacher
    node, replaced by an exact rule that runs at student width, makes the net fail the widening
    check (or be reported as a boundary/fallback); none goes unnoticed."""
    from gpd_fx.passes.registry import RULES, RuleEntry

    tables = {"modules": RULES.modules, "functions": RULES.functions, "methods": RULES.methods}
    checked = set()
    for case in CNN_REGRESSIONS + VIT_REGRESSIONS:
        for (tname, key), where in _rules_that_widen(case).items():
            if (tname, key) in checked:
                continue
            checked.add((tname, key))
            with monkeypatch.context() as mp:
                mp.setitem(tables[tname], key, RuleEntry(_unwidened, tables[tname][key].transparent))
                model = copy.deepcopy(case.model)
                dt = gpd_fx.expand(model, ratio=2, example_inputs=(case.x,), branches=())
                if dt.report.boundaries or dt.report.fallbacks:
                    continue   # noticed: reported
                with pytest.raises(AssertionError):
                    assert_widened(dt, case.x)
    assert len(checked) >= 15, sorted(map(str, checked))   # the nets exercise many rules
