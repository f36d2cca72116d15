"""Tests for gpd_fx.losses: values against float64 reference formulas, gradients, errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gpd_fx.losses import (
    KD_LOSSES,
    GPDLossConfig,
    LossInputError,
    dkd,
    get_kd_loss,
    gpd_loss,
    hinton_kd,
    label_smoothed_soft_ce,
    register_kd_loss,
)

# --------------------------------------------------------------------- reference formulas
# Written from the definitions with explicit exp / sum / log in float64, independent of the
# log_softmax / logsumexp / kl_div route the library takes.


def _softmax64(z: torch.Tensor) -> torch.Tensor:
    e = torch.exp(z.double())
    return e / e.sum(dim=-1, keepdim=True)


def _kl64(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return (p * (torch.log(p) - torch.log(q))).sum(dim=-1)


def _ref_hinton(s, t, T):
    return _kl64(_softmax64(t / T), _softmax64(s / T)).mean() * T**2


def _ref_ls_ce(s, t, eps, T):
    K = t.shape[-1]
    q = (1 - eps) * _softmax64(t / T) + eps / K
    return -(q * torch.log(_softmax64(s / T))).sum(-1).mean() * T**2


def _ref_dkd(s, t, y, alpha, beta, T):
    tckd, nckd = [], []
    for n in range(s.shape[0]):
        ps, pt = _softmax64(s[n] / T), _softmax64(t[n] / T)
        yn = int(y[n])
        bs = torch.stack([ps[yn], 1 - ps[yn]])
        bt = torch.stack([pt[yn], 1 - pt[yn]])
        others = [k for k in range(s.shape[1]) if k != yn]
        hs = ps[others] / (1 - ps[yn])
        ht = pt[others] / (1 - pt[yn])
        tckd.append(_kl64(bt, bs))
        nckd.append(_kl64(ht, hs))
    return (alpha * torch.stack(tckd).mean() + beta * torch.stack(nckd).mean()) * T**2


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(5, 7, generator=g, dtype=torch.float64) * 2
    t = torch.randn(5, 7, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, 7, (5,), generator=g)
    return s, t, y


# --------------------------------------------------------------------------- hinton_kd


def test_hinton_kd_hand_computed():
    """Two classes, T=1: p_t=[3/4,1/4], p_s=[1/2,1/2]."""
    s = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    t = torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64)
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert hinton_kd(s, t, temperature=1.0).item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_hinton_kd_matches_reference(logits, T):
    """Matches T^2 * KL(softmax(t/T) || softmax(s/T)) in float64."""
    s, t, _ = logits
    torch.testing.assert_close(hinton_kd(s, t, T), _ref_hinton(s, t, T), rtol=1e-12, atol=1e-12)


def test_hinton_kd_zero_iff_equal(logits):
    """0 for equal logits (and row shifts), > 0 for different ones."""
    s, t, _ = logits
    assert hinton_kd(s, s.clone()).item() == 0.0
    assert hinton_kd(s, s + 3.0).item() == pytest.approx(0.0, abs=1e-12)
    assert hinton_kd(s, t).item() > 0


# ---------------------------------------------------------------------- label smoothing


def test_ls_ce_hand_computed():
    """K=2, eps=0.1: q = 0.9*[3/4,1/4] + 0.05; uniform student gives ln 2."""
    s = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    t = torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64)
    assert label_smoothed_soft_ce(s, t, smoothing=0.1).item() == pytest.approx(math.log(2.0), rel=1e-12)
    s2 = torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64)  # student p=[3/4,1/4]
    expected = -(0.725 * math.log(0.75) + 0.275 * math.log(0.25))
    assert label_smoothed_soft_ce(s2, t, smoothing=0.1).item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(("eps", "T"), [(0.0, 1.0), (0.1, 1.0), (0.3, 2.0)])
def test_ls_ce_matches_reference(logits, eps, T):
    """Matches the documented formula in float64."""
    s, t, _ = logits
    torch.testing.assert_close(
        label_smoothed_soft_ce(s, t, eps, T), _ref_ls_ce(s, t, eps, T), rtol=1e-12, atol=1e-12
    )


def test_ls_ce_without_smoothing_is_kd_plus_entropy(logits):
    """With eps=0, T=1: soft CE = KL(p_t || p_s) + H(p_t)."""
    s, t, _ = logits
    p = _softmax64(t)
    entropy = -(p * torch.log(p)).sum(-1).mean()
    torch.testing.assert_close(label_smoothed_soft_ce(s, t, 0.0), hinton_kd(s, t, 1.0) + entropy)


# --------------------------------------------------------------------------------- dkd


@pytest.mark.parametrize(("alpha", "beta", "T"), [(1.0, 8.0, 4.0), (0.5, 2.0, 1.0)])
def test_dkd_matches_reference(logits, alpha, beta, T):
    """Matches TCKD/NCKD written directly from the paper's definitions."""
    s, t, y = logits
    torch.testing.assert_close(
        dkd(s, t, y, alpha, beta, T), _ref_dkd(s, t, y, alpha, beta, T), rtol=1e-10, atol=1e-12
    )


def test_dkd_recovers_kd_with_coupled_weight(logits):
    """Per sample, KD = TCKD + (1 - p_y^T) * NCKD (the decomposition DKD decouples)."""
    s, t, y = logits
    T = 2.0
    for n in range(s.shape[0]):
        sn, tn, yn = s[n : n + 1], t[n : n + 1], y[n : n + 1]
        beta = 1 - _softmax64(tn / T)[0, yn].item()
        torch.testing.assert_close(dkd(sn, tn, yn, 1.0, beta, T), hinton_kd(sn, tn, T))


def test_dkd_finite_for_confident_teacher():
    """A teacher with p_y -> 1 in float32 gives a finite loss and finite gradients."""
    t = torch.tensor([[200.0, 0.0, -5.0], [0.0, 90.0, 1.0]])
    s = torch.randn(2, 3, requires_grad=True)
    y = torch.tensor([0, 1])
    loss = dkd(s, t, y)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(s.grad).all()


def test_dkd_zero_for_equal_logits(logits):
    """Both KL terms vanish when student equals teacher."""
    s, _, y = logits
    assert dkd(s, s.clone(), y).item() == pytest.approx(0.0, abs=1e-12)


# ---------------------------------------------------------------------------- registry


def test_registry_names_and_lookup():
    """The three built-in losses are registered; unknown names list the valid ones."""
    assert {"kd", "ls_ce", "dkd"} <= set(KD_LOSSES)
    assert get_kd_loss("kd") is KD_LOSSES["kd"]
    with pytest.raises(LossInputError, match=r"unknown KD loss 'nope'.*'dkd'.*'kd'.*'ls_ce'"):
        get_kd_loss("nope")
    with pytest.raises(LossInputError, match="valid names"):
        GPDLossConfig(dt_to_student="nope")


def test_register_custom_loss(logits):
    """A user loss registered by name is used by gpd_loss; duplicates are refused."""
    s, t, y = logits

    @register_kd_loss("_test_mse")
    def _mse(student, teacher, targets, cfg):
        return F.mse_loss(student, teacher)

    try:
        with pytest.raises(LossInputError, match="already registered"):
            register_kd_loss("_test_mse")(_mse)
        _, parts = gpd_loss(t, s, y, GPDLossConfig(dt_to_student="_test_mse"))
        torch.testing.assert_close(parts["kd_student_dt"], F.mse_loss(s, t))
    finally:
        KD_LOSSES.pop("_test_mse")


def test_config_validation():
    """Out-of-range hyper-parameters fail when the config is built."""
    with pytest.raises(LossInputError, match="temperature"):
        GPDLossConfig(temperature=0.0)
    with pytest.raises(LossInputError, match="smoothing"):
        GPDLossConfig(smoothing=1.5)
    with pytest.raises(LossInputError, match="dt_to_student_weight"):
        GPDLossConfig(dt_to_student_weight=-1.0)


# ---------------------------------------------------------------------------- gpd_loss


def _manual_gpd(dt, s, y, cfg, static=None):
    kd_dt = KD_LOSSES[cfg.dt_to_student]
    loss = F.cross_entropy(dt, y) + F.cross_entropy(s, y) + cfg.dt_to_student_weight * kd_dt(s, dt, y, cfg)
    if static is not None:
        kd_s = KD_LOSSES[cfg.static_kd]
        loss = loss + cfg.static_kd_weight * (kd_s(dt, static, y, cfg) + kd_s(s, static, y, cfg))
    return loss


@pytest.mark.parametrize("with_static", [False, True])
@pytest.mark.parametrize("dt_name", ["ls_ce", "kd", "dkd"])
def test_gpd_loss_value_and_parts(logits, with_static, dt_name):
    """loss = L_DT + L_S; parts are detached, complete, and sum to the total."""
    s, t, y = logits
    static = torch.randn_like(s) if with_static else None
    cfg = GPDLossConfig(dt_to_student=dt_name, static_kd="dkd" if dt_name == "kd" else "kd")
    loss, parts = gpd_loss(t, s, y, cfg, static_logits=static)
    torch.testing.assert_close(loss, _manual_gpd(t, s, y, cfg, static))
    assert set(parts) == {
        "ce_teacher", "ce_student", "kd_teacher_static", "kd_student_static", "kd_student_dt", "total"
    }
    assert all(not v.requires_grad and v.dim() == 0 for v in parts.values())
    recomposed = (
        parts["ce_teacher"] + parts["ce_student"]
        + cfg.static_kd_weight * (parts["kd_teacher_static"] + parts["kd_student_static"])
        + cfg.dt_to_student_weight * parts["kd_student_dt"]
    )
    torch.testing.assert_close(recomposed, parts["total"])
    if not with_static:
        assert parts["kd_teacher_static"].item() == 0.0 and parts["kd_student_static"].item() == 0.0


@pytest.mark.parametrize("with_static", [False, True])
def test_dt_gets_no_gradient_from_lambda_term(logits, with_static):
    """The DT gradient equals that of L_DT alone, whatever lambda is; the student's does not."""
    s0, t0, y = logits
    static = torch.randn_like(s0, requires_grad=True) if with_static else None
    grads = {}
    for lam in (0.0, 3.0):
        s, t = s0.clone().requires_grad_(), t0.clone().requires_grad_()
        loss, _ = gpd_loss(t, s, y, GPDLossConfig(dt_to_student_weight=lam), static_logits=static)
        grads[lam] = torch.autograd.grad(loss, [t, s])
    t = t0.clone().requires_grad_()
    l_dt = F.cross_entropy(t, y)
    if with_static:
        l_dt = l_dt + hinton_kd(t, static.detach(), 4.0)
    (g_dt_only,) = torch.autograd.grad(l_dt, [t])
    torch.testing.assert_close(grads[3.0][0], g_dt_only)
    torch.testing.assert_close(grads[0.0][0], g_dt_only)
    assert not torch.allclose(grads[3.0][1], grads[0.0][1])


def test_static_teacher_gets_no_gradient(logits):
    """Static-teacher logits are constants even if they require grad."""
    s, t, y = logits
    static = torch.randn_like(s, requires_grad=True)
    loss, _ = gpd_loss(t.requires_grad_(), s.requires_grad_(), y, GPDLossConfig(), static)
    (g,) = torch.autograd.grad(loss, [static], allow_unused=True)
    assert g is None


def test_gpd_loss_default_config(logits):
    """cfg=None means GPDLossConfig()."""
    s, t, y = logits
    torch.testing.assert_close(gpd_loss(t, s, y)[0], gpd_loss(t, s, y, GPDLossConfig())[0])


def test_input_errors_name_shapes(logits):
    """Shape mismatches name both shapes; bad targets say what is expected."""
    s, t, y = logits
    with pytest.raises(LossInputError, match=r"\(5, 7\).*\(5, 6\)"):
        gpd_loss(t[:, :6], s, y)
    with pytest.raises(LossInputError, match=r"static_logits shape \(4, 7\)"):
        gpd_loss(t, s, y, static_logits=s[:4])
    with pytest.raises(LossInputError, match=r"targets shape \(4,\)"):
        gpd_loss(t, s, y[:4])
    with pytest.raises(LossInputError, match="integer class indices"):
        dkd(s, t, y.double())
    with pytest.raises(LossInputError, match="2-D"):
        hinton_kd(s.flatten(), t.flatten())
    with pytest.raises(LossInputError, match="temperature"):
        hinton_kd(s, t, temperature=-1.0)


def test_gpd_loss_compiles_without_graph_breaks():
    """The whole objective traces as one graph (the training step is torch.compile'd)."""
    torch._dynamo.reset()
    cfg = GPDLossConfig(dt_to_student="dkd")
    s, t, st = torch.randn(4, 10), torch.randn(4, 10), torch.randn(4, 10)
    y = torch.randint(0, 10, (4,))
    compiled = torch.compile(gpd_loss, fullgraph=True, backend="eager")
    loss, parts = compiled(t, s, y, cfg, st)
    torch.testing.assert_close(loss, gpd_loss(t, s, y, cfg, st)[0])
