"""CBR + fold: the student map at init, after training, BN fusion, export, and bad input."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import gpd_fx
from gpd_fx.errors import FoldError

# float64 throughout: the map sums r copies (a few ulps, ~1e-16 relative); 1e-10 is loose for
# that and tight for any wrong index or missing branch.
TOL = 1e-10


def rel(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def small_resnet():
    """A small torchvision CNN with residuals, channel shuffle, depthwise convs and BN."""
    torch.manual_seed(0)
    return torchvision.models.shufflenet_v2_x0_5(num_classes=5).double()


def gpd_steps(dt, x, steps=3, lr=0.05):
    """A few SGD steps on the GPD objective (CE for both + student<-teacher KD), random labels."""
    y = torch.randint(0, 5, (x.shape[0],))
    opt = torch.optim.SGD(dt.parameters(), lr=lr)
    dt.train()
    for _ in range(steps):
        t, s = dt.joint(x)
        kd = F.kl_div(F.log_softmax(s, -1), F.softmax(t.detach(), -1), reduction="batchmean")
        loss = F.cross_entropy(t, y) + F.cross_entropy(s, y) + kd
        opt.zero_grad()
        loss.backward()
        opt.step()
    dt.eval()


@pytest.mark.parametrize("branches", [(), None])
def test_fold_at_init_returns_the_student(branches):
    """fold(expand(m)) has m's class, keys and values; teacher == student with branches too."""
    m = small_resnet().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    dt = gpd_fx.expand(m, 3, (x,), branches=branches)
    if branches is None:
        assert dt.report.branch_layers > 0
    dt.eval()
    assert rel(dt(x), m(x)) < TOL
    s = gpd_fx.fold(dt)
    assert type(s) is type(m)
    ref = m.state_dict()
    got = s.state_dict()
    assert list(got) == list(ref)
    for k in ref:
        if ref[k].is_floating_point():
            assert rel(got[k], ref[k]) < TOL or ref[k].abs().max() == 0, k
        else:
            assert torch.equal(got[k], ref[k]), k


def test_student_gradients_reach_every_teacher_parameter():
    """A student-only loss moves every teacher parameter, branch scales included."""
    m = small_resnet()
    # 64x64 keeps a 2x2 map in the last stage: at 1x1 with batch 2, train-mode BN sees two values
    # per channel and some BN biases get an exactly zero gradient
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    dt = gpd_fx.expand(m, 2, (x,), branches=None)
    dt.train()
    dt.student(x).square().mean().backward()
    scales = [n for n, _ in dt.named_parameters() if n.rsplit(".", 1)[-1].startswith("v_")]
    assert scales, "CBR should have added branch scaling vectors"
    no_grad = [n for n, p in dt.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    # The extra branches' own kernels are multiplied by their scale, which starts at 0, so they
    # only receive gradient once the scale has moved; everything else must have it now.
    branch_kernels = {n for n, _ in dt.named_parameters()
                      if n.rsplit(".", 1)[-1] in ("weight_1x1", "weight_1x1_kxk_a", "weight_1x1_kxk_b",
                                                  "weight_1x1_avg", "lowrank_a", "lowrank_b")}
    assert set(no_grad) <= branch_kernels, sorted(set(no_grad) - branch_kernels)


def test_fold_after_training_equals_student_and_changed():
    """After GPD steps, fold(dt)(x) == dt.student(x) (with and without BN fusion) != initial."""
    m = small_resnet().eval()
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    dt = gpd_fx.expand(m, 2, (x,), branches=None)
    gpd_steps(dt, x)
    s, fused = gpd_fx.fold(dt, fuse_bn=True)
    with torch.no_grad():
        ref = dt.student(x)
        assert rel(s(x), ref) < TOL
        assert rel(fused(x), ref) < 1e-9   # BN folding reorders a few more float64 ops
        assert rel(s(x), m(x)) > 1e-3
    assert not any(isinstance(mod, nn.BatchNorm2d) for mod in fused.modules())


def test_student_bn_statistics_are_its_own():
    """dt.student in train mode updates the student's running stats, not the teacher's."""
    m = small_resnet()
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    dt = gpd_fx.expand(m, 2, (x,), branches=None)
    dt.train()
    teacher_before = dt.teacher.get_submodule("conv1.1").running_mean.clone()
    student_before = dt.student_state.as_dict()["conv1.1.running_mean"].clone()
    dt.student(x)
    assert not torch.equal(dt.student_state.as_dict()["conv1.1.running_mean"], student_before)
    assert torch.equal(dt.teacher.get_submodule("conv1.1").running_mean, teacher_before)
    assert torch.equal(m.conv1[1].running_mean, torch.zeros_like(m.conv1[1].running_mean))


def test_no_parameter_stored_twice():
    """The DT's trainable parameters are the teacher's only; the template holds no data."""
    m = small_resnet()
    dt = gpd_fx.expand(m, 2, (torch.randn(1, 3, 32, 32, dtype=torch.float64),), branches=None)
    assert all(p.device.type == "meta" for p in dt.template.parameters())
    teacher_ids = {id(p) for p in dt.teacher.parameters()}
    assert {id(p) for p in dt.parameters()} == teacher_ids


def test_export_and_onnx_agree():
    """The folded student passes torch.export, and onnxruntime agrees with PyTorch."""
    pytest.importorskip("onnxruntime")
    from gpd_fx.export import export_onnx

    torch.manual_seed(0)
    m = torchvision.models.mobilenet_v3_small(num_classes=5).eval()
    x = torch.randn(2, 3, 64, 64)
    dt = gpd_fx.expand(m, 2, (x,), branches=None)
    gpd_steps(dt, x, steps=2, lr=0.01)
    s = gpd_fx.fold(dt)
    ep = torch.export.export(s, (x,))
    with torch.no_grad():
        assert rel(ep.module()(x), s(x)) < 1e-6
    import tempfile, os

    with tempfile.TemporaryDirectory() as d:
        diff = export_onnx(s, x, os.path.join(d, "s.onnx"))
    assert diff < 1e-4


def test_onnx_export_of_nested_outputs_and_token_inputs():
    """Dict outputs (segmentation heads, ModelOutputs) are compared tensor by tensor, and integer
    inputs (token ids) stay integers."""
    pytest.importorskip("onnxruntime")
    import os
    import tempfile

    from gpd_fx.export import export_onnx

    class TwoHeads(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(50, 8)
            self.a = torch.nn.Linear(8, 3)
            self.b = torch.nn.Linear(8, 2)

        def forward(self, ids):
            h = self.emb(ids)
            return {"out": self.a(h), "aux": self.b(h)}

    torch.manual_seed(0)
    m = TwoHeads().eval()
    ids = torch.randint(0, 50, (2, 7))
    with tempfile.TemporaryDirectory() as d:
        assert export_onnx(m, ids, os.path.join(d, "m.onnx")) < 1e-4


def test_fold_rejects_non_teacher_and_wrong_shapes():
    """Folding a plain module, or a teacher whose parameters were swapped for wrong shapes, fails clearly."""
    m = small_resnet()
    with pytest.raises(FoldError, match="DynamicTeacher"):
        gpd_fx.fold(m)
    dt = gpd_fx.expand(m, 2, (torch.randn(1, 3, 32, 32, dtype=torch.float64),), branches=())
    conv = dt.teacher.get_submodule("stage2.0.branch1.2")
    conv.weight = nn.Parameter(conv.weight.detach()[:, :10].clone())
    with pytest.raises(FoldError, match="stage2.0.branch1.2.weight"):
        gpd_fx.fold(dt)


def test_state_dict_round_trip_rebuild():
    """A DT rebuilt with the same expand arguments loads the saved state and folds identically."""
    m = small_resnet()
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    dt = gpd_fx.expand(m, 2, (x,), branches=None)
    gpd_steps(dt, x, steps=1)
    state = copy.deepcopy(dt.state_dict())
    dt2 = gpd_fx.expand(m, 2, (x,), **{k: v for k, v in dt.expand_config.items() if k != "ratio"})
    dt2.load_state_dict(state)
    dt2.eval()
    with torch.no_grad():
        assert torch.equal(gpd_fx.fold(dt2)(x), gpd_fx.fold(dt)(x))
