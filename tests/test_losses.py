"""Tests for gpd_fx.losses: values against float64 reference formulas, gradients, errors;
dense (per-pixel) logits and feature KD."""

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
    feature_kd,
    flatten_dense,
    get_kd_loss,
    gpd_loss,
    hinton_kd,
    label_smoothed_soft_ce,
    narrow_feature,
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


# ------------------------------------------------------------------- dense logits (issue 14)
# Segmentation-style logits (N, K, *spatial): every pixel is one row of the class objective.

IGNORE = 255


def _dense(shape=(2, 5, 3, 4), seed=1, ignore_share=0.3):
    """float64 teacher/student/static logits (N, K, *S) and targets with some pixels ignored."""
    g = torch.Generator().manual_seed(seed)
    n, k, *spatial = shape
    t, s, st = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 for _ in range(3))
    y = torch.randint(0, k, (n, *spatial), generator=g)
    y[torch.rand(y.shape, generator=g) < ignore_share] = IGNORE
    return t, s, st, y


def _kept_rows(z, y):
    """The (M, K) logits of non-ignored pixels by explicit iteration (not via flatten_dense)."""
    rows, labels = [], []
    for n in range(y.shape[0]):
        for idx in torch.cartesian_prod(*(torch.arange(d) for d in y.shape[1:])).reshape(-1, y.dim() - 1):
            pix = (n, *idx.tolist())
            if int(y[pix]) != IGNORE:
                rows.append(z[(n, slice(None), *idx.tolist())])
                labels.append(int(y[pix]))
    return torch.stack(rows), torch.tensor(labels)


@pytest.mark.parametrize("shape", [(2, 5, 3, 4), (3, 4, 6), (1, 3, 2, 3, 2)])
@pytest.mark.parametrize("with_static", [False, True])
@pytest.mark.parametrize("dt_name", ["ls_ce", "kd", "dkd"])
def test_dense_equals_class_loss_on_kept_pixels(shape, with_static, dt_name):
    """Dense gpd_loss == the (N, K) gpd_loss on the non-ignored pixels' rows, every part."""
    t, s, st, y = _dense(shape)
    cfg = GPDLossConfig(dt_to_student=dt_name, static_kd="dkd" if dt_name == "kd" else "kd")
    static = st if with_static else None
    loss, parts = gpd_loss(t, s, y, cfg, static_logits=static, ignore_index=IGNORE)
    rt, ry = _kept_rows(t, y)
    rs, _ = _kept_rows(s, y)
    rst = _kept_rows(st, y)[0] if with_static else None
    assert 0 < ry.numel() < y.numel()  # the fixture really ignores some pixels, not all
    ref_loss, ref_parts = gpd_loss(rt, rs, ry, cfg, static_logits=rst)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    for name in ref_parts:
        torch.testing.assert_close(parts[name], ref_parts[name], rtol=1e-12, atol=1e-12)


def test_dense_without_ignore_index_uses_every_pixel():
    """ignore_index=None: all pixels are rows (255 would be an out-of-range class, so none here)."""
    t, s, _, y = _dense(ignore_share=0.0)
    rt, ry = _kept_rows(t, y)
    rs, _ = _kept_rows(s, y)
    torch.testing.assert_close(gpd_loss(t, s, y)[0], gpd_loss(rt, rs, ry)[0], rtol=1e-12, atol=1e-12)
    # and the per-pixel CE is torch's own spatial cross-entropy
    torch.testing.assert_close(gpd_loss(t, s, y)[1]["ce_teacher"], F.cross_entropy(t, y))


def test_class_logits_with_ignore_index_drop_rows(logits):
    """(N, K) rows whose target is ignore_index are dropped, like pixels."""
    s, t, y = logits
    y2 = y.clone()
    y2[[1, 3]] = -100
    keep = y2 != -100
    torch.testing.assert_close(
        gpd_loss(t, s, y2, ignore_index=-100)[0], gpd_loss(t[keep], s[keep], y[keep])[0]
    )


def test_ignored_pixels_contribute_nothing():
    """Changing every logit at ignored pixels changes neither the loss nor any gradient elsewhere."""
    t, s, st, y = _dense()
    ignored = (y == IGNORE).unsqueeze(1).expand_as(t)
    results = []
    for bump in (0.0, 50.0):
        args = [(z + bump * ignored * torch.randn_like(z)).requires_grad_() for z in (t, s, st)]
        loss, parts = gpd_loss(args[0], args[1], y, static_logits=args[2], ignore_index=IGNORE)
        grads = torch.autograd.grad(loss, args[:2])
        results.append((loss, parts, grads))
        for g in grads:  # ignored pixels get exactly zero gradient
            assert torch.count_nonzero(g[ignored]) == 0
    (l0, p0, g0), (l1, p1, g1) = results
    assert l0.item() == l1.item()
    assert all(p0[k].item() == p1[k].item() for k in p0)
    for a, b in zip(g0, g1):
        assert torch.equal(a, b)


@pytest.mark.parametrize("with_static", [False, True])
def test_dense_dt_gets_no_gradient_from_kd_term(with_static):
    """The DT's per-pixel gradient equals that of L_DT alone, whatever lambda is."""
    t0, s0, st, y = _dense()
    static = st if with_static else None
    grads = {}
    for lam in (0.0, 3.0):
        t, s = t0.clone().requires_grad_(), s0.clone().requires_grad_()
        loss, _ = gpd_loss(t, s, y, GPDLossConfig(dt_to_student_weight=lam), static, ignore_index=IGNORE)
        grads[lam] = torch.autograd.grad(loss, [t, s])
    t = t0.clone().requires_grad_()
    l_dt = F.cross_entropy(t, y, ignore_index=IGNORE)
    if with_static:
        _, rt, rst = flatten_dense(y, t, st, ignore_index=IGNORE)
        l_dt = l_dt + hinton_kd(rt, rst, 4.0)
    (g_dt_only,) = torch.autograd.grad(l_dt, [t])
    torch.testing.assert_close(grads[3.0][0], g_dt_only, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(grads[0.0][0], g_dt_only, rtol=1e-12, atol=1e-15)
    assert not torch.allclose(grads[3.0][1], grads[0.0][1])


def test_uint8_masks_with_255():
    """VOC-style uint8 masks work as targets (converted to long for the loss)."""
    t, s, _, y = _dense()
    ref = gpd_loss(t, s, y, ignore_index=IGNORE)[0]
    torch.testing.assert_close(gpd_loss(t, s, y.to(torch.uint8), ignore_index=IGNORE)[0], ref)


def test_all_pixels_ignored_gives_zero_loss_and_zero_grads():
    """No labelled pixel: loss 0 (not nan), backward works, every gradient is 0."""
    t, s, _, y = _dense()
    t.requires_grad_(), s.requires_grad_()
    loss, parts = gpd_loss(t, s, torch.full_like(y, IGNORE), ignore_index=IGNORE)
    loss.backward()
    assert loss.item() == 0.0 and all(v.item() == 0.0 for v in parts.values())
    assert torch.count_nonzero(t.grad) == 0 and torch.count_nonzero(s.grad) == 0


def test_dense_input_errors():
    """Wrong shapes name both shapes and the expected one; ignore_index misuse is refused."""
    t, s, _, y = _dense()
    with pytest.raises(LossInputError, match=r"targets shape \(2, 4, 3\).*\(2, 5, 3, 4\).*\(2, 3, 4\)"):
        gpd_loss(t, s, y.transpose(1, 2), ignore_index=IGNORE)
    with pytest.raises(LossInputError, match=r"\(2, 5, 3, 4\).*teacher_logits shape \(2, 5, 4, 3\)"):
        gpd_loss(t.transpose(2, 3), s, y)
    with pytest.raises(LossInputError, match=r"static_logits shape \(2, 5, 3, 3\)"):
        gpd_loss(t, s, y, static_logits=t[..., :3])
    with pytest.raises(LossInputError, match=r"got shape \(7,\)"):
        gpd_loss(t.flatten()[:7], s.flatten()[:7], y.flatten()[:7])
    with pytest.raises(LossInputError, match="ignore_index must be an int.*255.0"):
        gpd_loss(t, s, y, ignore_index=255.0)
    with pytest.raises(LossInputError, match="ignore_index must be an int"):
        gpd_loss(t, s, y, ignore_index=True)
    with pytest.raises(LossInputError, match=r"ignore_index=-100 cannot occur in targets of dtype torch.uint8"):
        gpd_loss(t, s, y.clamp(max=4).to(torch.uint8), ignore_index=-100)
    with pytest.raises(LossInputError, match="integer class indices"):
        gpd_loss(t, s, y.double(), ignore_index=IGNORE)


def test_flatten_dense_order_and_mask():
    """Rows follow targets.reshape(-1); the class dim goes last."""
    z = torch.arange(2 * 3 * 2 * 2, dtype=torch.float64).reshape(2, 3, 2, 2)
    y = torch.tensor([[[0, 255], [1, 2]], [[255, 255], [2, 0]]])
    ry, rz = flatten_dense(y, z, ignore_index=255)
    assert ry.tolist() == [0, 1, 2, 2, 0]
    assert ry.dtype == torch.long
    torch.testing.assert_close(rz[1], z[0, :, 1, 0])
    torch.testing.assert_close(rz[3], z[1, :, 1, 0])


@pytest.mark.parametrize("ignore", ["none", "some", "all"])
def test_dense_gpd_loss_compiles_without_graph_breaks(ignore):
    """The dense objective is one graph, with ignore_index too (no branch on the row count),
    and the compiled all-ignored batch is the same zero as in eager."""
    torch._dynamo.reset()
    t, s, st, y = (v.float() if v.is_floating_point() else v for v in _dense(ignore_share=0.0))
    if ignore != "none":
        y[..., 0] = IGNORE
    if ignore == "all":
        y[:] = IGNORE
    ignore_index = None if ignore == "none" else IGNORE
    compiled = torch.compile(gpd_loss, fullgraph=True, backend="eager")
    out = compiled(t, s, y, GPDLossConfig(), st, ignore_index)
    ref = gpd_loss(t, s, y, GPDLossConfig(), st, ignore_index)
    torch.testing.assert_close(out[0], ref[0])
    assert torch.isfinite(out[0])


# ------------------------------------------------------------------------- feature KD


def test_narrow_feature_is_mean_over_interleaved_copies():
    """Teacher channel i holds student channel i // r: the narrowed channel c averages r*c..r*c+r-1."""
    g = torch.Generator().manual_seed(3)
    t = torch.randn(2, 12, 5, generator=g, dtype=torch.float64)
    out = narrow_feature(t, 3)
    assert out.shape == (2, 4, 5)
    torch.testing.assert_close(out[:, 1], t[:, 3:6].mean(dim=1), rtol=0, atol=1e-15)
    tokens = torch.randn(2, 7, 8, generator=g, dtype=torch.float64)  # (N, L, C) channels last
    torch.testing.assert_close(narrow_feature(tokens, 2, channel_dim=-1), tokens.view(2, 7, 4, 2).mean(-1))


def _small_seg_net():
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 3, 1),
    ).double()


def _features(module, name, x):
    """The output of submodule ``name`` during ``module(x)``, by a forward hook."""
    seen = []
    handle = module.get_submodule(name).register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        module(x)
    finally:
        handle.remove()
    return seen[0]


def test_feature_kd_zero_at_init_positive_after_training():
    """An expanded teacher's inner feature narrows to the student's (to the float64 verification
    tolerance) at init; after a few teacher steps the copies diverge and feature_kd > 0."""
    import gpd_fx
    from gpd_fx.passes.widen_verify import TOL

    torch.manual_seed(0)
    net = _small_seg_net().eval()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    dt = gpd_fx.expand(net, ratio=2, example_inputs=(x,)).eval()
    name = "3"  # the inner conv: teacher output 16 channels, interleaved
    t_feat, s_feat = _features(dt.teacher, name, x), _features(gpd_fx.fold(dt), name, x)
    assert t_feat.shape == (2, 16, 6, 6) and s_feat.shape == (2, 8, 6, 6)
    # MSE of a relative error <= TOL: bounded by (TOL * max|s|)^2
    bound = (TOL[torch.float64] * s_feat.abs().max().item()) ** 2
    assert feature_kd(t_feat, s_feat, ratio=2).item() <= bound

    opt = torch.optim.SGD(dt.parameters(), lr=0.1)
    y = torch.randint(0, 3, (2, 6, 6))
    dt.train()
    for _ in range(3):
        opt.zero_grad()
        loss, _ = gpd_loss(*dt.joint(x), y)
        loss.backward()
        opt.step()
    dt.eval()
    t_feat, s_feat = _features(dt.teacher, name, x), _features(gpd_fx.fold(dt), name, x)
    assert feature_kd(t_feat, s_feat, ratio=2).item() > 1e6 * bound


def test_feature_kd_values_and_gradient():
    """MSE against the narrowed teacher; exact pair is 0; teacher detached unless asked."""
    g = torch.Generator().manual_seed(4)
    s = torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    t = s.detach().repeat_interleave(3, dim=1).requires_grad_()
    assert feature_kd(t, s, 3).item() == pytest.approx(0.0, abs=1e-30)
    t2 = (t.detach() + torch.randn(t.shape, generator=g, dtype=torch.float64)).requires_grad_()
    loss = feature_kd(t2, s, 3)
    torch.testing.assert_close(loss, ((s - narrow_feature(t2, 3)) ** 2).mean())
    assert loss.item() > 0
    g_t, g_s = torch.autograd.grad(loss, [t2, s], allow_unused=True)
    assert g_t is None and g_s is not None
    (g_t,) = torch.autograd.grad(feature_kd(t2, s, 3, detach_teacher=False), [t2])
    assert torch.count_nonzero(g_t) > 0


def test_feature_kd_errors_name_shapes():
    """Mismatched features name both shapes and the expected teacher shape."""
    s, t = torch.randn(2, 4, 3, 3), torch.randn(2, 8, 3, 3)
    with pytest.raises(LossInputError, match=r"\(2, 8, 3, 3\).*\(2, 4, 3, 3\).*ratio 3.*expected \(2, 12, 3, 3\)"):
        feature_kd(t, s, ratio=3)
    with pytest.raises(LossInputError, match=r"expected \(2, 4, 3, 6\)"):
        feature_kd(t, s, ratio=2, channel_dim=-1)
    with pytest.raises(LossInputError, match="differ in rank"):
        feature_kd(t.flatten(2), s, ratio=2)
    with pytest.raises(LossInputError, match="ratio must be an int >= 1"):
        feature_kd(t, s, ratio=2.0)
    with pytest.raises(LossInputError, match="channel_dim=4 is out of range"):
        feature_kd(t, s, ratio=2, channel_dim=4)
    with pytest.raises(LossInputError, match="not a multiple of ratio 3"):
        narrow_feature(t, 3)
