"""Property-based tests: ``expand`` and ``fold`` are exact on random CNNs and transformer blocks.

The strategies in ``tests/strategies.py`` build random float64 networks step by step; every
property below must hold for every one of them, for ratios 2..4, with the multi-branch teacher
layers (``branches=None``, CBR) and without (``branches=()``, IR only).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import gpd_fx
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
