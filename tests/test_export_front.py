"""The ``torch.export`` front end (``expand(frontend="export")``, ``DESIGN.md §6``).

The two front ends must build the same teacher: the export graph is rewritten into the
vocabulary the rules speak (module calls lifted back, ATen ops through their Python bindings),
so for a model both can capture the share, the parameter count and the exactness agree. The
rewrites themselves are checked where they could go wrong: in-place ops, a rebinding that
computes something else, the mode flag, the calling convention.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import gpd_fx
from gpd_fx.errors import ExpandInputError, TraceError
from gpd_fx.passes import export_front
from gpd_fx.passes.registry import has_module_rule
from gpd_fx.passes.widen_verify import TOL
from nets import seeded_runs

F64 = torch.float64
TOL64 = TOL[F64]


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("branches", [(), None], ids=["ir", "cbr"])
def test_export_and_fx_build_the_same_teacher(branches):
    torch.manual_seed(0)
    m = torchvision.models.resnet18(num_classes=10).to(F64).eval()
    x = torch.randn(2, 3, 32, 32, dtype=F64)
    by_fx = gpd_fx.expand(m, 2, (x,), frontend="fx", branches=branches)
    by_export = gpd_fx.expand(m, 2, (x,), frontend="export", branches=branches)
    assert (by_fx.report.frontend, by_export.report.frontend) == ("fx", "export")
    for key in ("teacher_params", "branch_layers", "expanded_flop_fraction", "boundaries", "fallbacks"):
        assert getattr(by_export.report, key) == getattr(by_fx.report, key), key
    assert by_export.report.expanded_flop_fraction == 1.0
    # the same parameter names (the user's FQNs) in both teachers' student maps
    assert set(by_export.student_parameters()) == set(by_fx.student_parameters())
    x5 = torch.randn(5, 3, 32, 32, dtype=F64)   # another batch size: the batch dimension is dynamic
    with torch.no_grad():
        assert _rel(by_export(x5), m(x5)) <= TOL64
        assert _rel(by_export.student(x5), m(x5)) <= TOL64
    by_export.train()
    m.train()
    with torch.no_grad():   # batch norm follows the mode: batch statistics in both
        assert _rel(by_export(x5), m(x5)) <= TOL64
    folded = gpd_fx.fold(by_export.eval())
    assert type(folded) is type(m) and set(folded.state_dict()) == set(m.state_dict())


class _InPlace(nn.Module):
    """``relu_`` mutates ``h`` and later ops read ``h``: they must see the mutated value."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 3)

    def forward(self, x):
        h = self.a(x)
        y = h.relu_()
        return self.b(h) + self.b(y) * 0.5


def test_in_place_ops_become_out_of_place():
    torch.manual_seed(0)
    m = _InPlace().to(F64).eval()
    x = torch.randn(3, 4, dtype=F64)
    gm, _ = export_front.export_graph(m, (x,), has_rule=has_module_rule)
    targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    assert not any(t.endswith("_") or "_." in t for t in targets if "aten" in t), targets
    with torch.no_grad():
        assert torch.equal(gm(x), m(x))
        dt = gpd_fx.expand(m, 2, (x,), frontend="export")
        assert _rel(dt(x), m(x)) <= TOL64


class _ViewMutation(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 6)

    def forward(self, x):
        h = self.a(x)
        h[:, :2].mul_(2.0)   # writes through a view into h
        return h


def test_in_place_op_on_a_view_is_refused_with_the_fix():
    m = _ViewMutation().eval()
    with pytest.raises(TraceError, match=r"(?s)mutates a view in place.*Fix"):
        gpd_fx.expand(m, 2, (torch.randn(2, 4),), frontend="export")


class _DropoutOnFlatten(nn.Module):
    """torchvision's EfficientNet: ``flatten`` (a view) then an in-place dropout; nothing reads
    the view's base afterwards, so the out-of-place rewrite is exact."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.drop = nn.Dropout(0.2, inplace=True)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        return self.fc(self.drop(torch.flatten(self.conv(x), 1)))


def test_in_place_op_on_a_view_nobody_else_reads_is_captured():
    m = _DropoutOnFlatten().to(F64).eval()
    x = torch.randn(2, 3, 6, 6, dtype=F64)
    dt = gpd_fx.expand(m, 2, (x,), frontend="export")
    assert dt.report.expanded_flop_fraction == 1.0
    with torch.no_grad():
        assert _rel(dt(x), m(x)) <= TOL64


def test_a_rebinding_that_computes_something_else_is_reverted(monkeypatch):
    """The check runs each rebound node against its ATen op: a wrong rewrite must not survive."""
    aten = torch.ops.aten
    monkeypatch.setitem(export_front._REWRITES, aten.relu.default, export_front._function(torch.sigmoid))
    m = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 3)).eval()

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.s = m

        def forward(self, x):
            return self.s[1](F.relu(self.s[0](x)))

    net = Net().eval()
    x = torch.randn(3, 4)
    gm, info = export_front.export_graph(net, (x,), has_rule=has_module_rule)
    assert any(n.target is aten.relu.default for n in gm.graph.nodes), gm.code
    assert info.kept_aten.get("aten.relu.default") == 1
    with torch.no_grad():
        assert torch.equal(gm(x), net(x))


class _FunctionalDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)

    def forward(self, x):
        return F.dropout(self.a(x), 0.5, self.training)


def test_functional_dropout_follows_the_mode():
    """Exported in eval mode, ``training=False`` is baked; the front end makes it live again."""
    torch.manual_seed(0)
    m = _FunctionalDropout().eval()
    x = torch.randn(16, 8)
    dt = gpd_fx.expand(m, 2, (x,), frontend="export")
    with torch.no_grad():
        assert torch.allclose(dt(x), m(x), rtol=1e-5, atol=1e-6)
        dt.train()
        y = dt(x)
    assert (y == 0).float().mean() > 0.2        # dropout is active in train mode
    dt.eval()
    with torch.no_grad():
        assert torch.allclose(dt(x), m(x), rtol=1e-5, atol=1e-6)


class _DictOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 2)

    def forward(self, x, scale: float = 1.0):
        h = torch.relu(self.a(x))
        return {"logits": self.b(h) * scale, "features": h}


def test_nested_outputs_keep_their_structure():
    m = _DictOut().to(F64).eval()
    x = torch.randn(3, 4, dtype=F64)
    dt = gpd_fx.expand(m, 2, (x,), frontend="export")
    with torch.no_grad():
        out = dt(x)
        ref = m(x)
    assert set(out) == {"logits", "features"}
    assert _rel(out["logits"], ref["logits"]) <= TOL64
    assert out["features"].shape == ref["features"].shape


def test_unknown_frontend_is_a_typed_error():
    with pytest.raises(ExpandInputError, match="frontend must be one of"):
        gpd_fx.expand(nn.Linear(2, 2), 2, (torch.randn(1, 2),), frontend="dynamo")


def test_export_failure_alone_names_export():
    class DataDependent(nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x

    with pytest.raises(TraceError, match=r"torch.export could not capture DataDependent"):
        gpd_fx.expand(DataDependent(), 2, (torch.randn(2, 4),), frontend="export")


class _FlowWarp(nn.Module):
    """RAFT's pattern in small: a conv predicts a 2-channel flow, the flow becomes a sampling
    grid, features are resampled at it and upsampled."""

    def __init__(self):
        super().__init__()
        self.feat = nn.Conv2d(3, 8, 3, padding=1)
        self.flow = nn.Conv2d(8, 2, 3, padding=1)
        self.out = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        f = torch.relu(self.feat(x))
        grid = torch.tanh(self.flow(f)).permute(0, 2, 3, 1)
        warped = F.grid_sample(f, grid, align_corners=False)
        return F.interpolate(self.out(warped), scale_factor=2, mode="bilinear", align_corners=False)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_grid_sample_and_upsampling_widen_with_a_predicted_grid(frontend):
    torch.manual_seed(0)
    m = _FlowWarp().to(F64).eval()
    x = torch.randn(2, 3, 8, 8, dtype=F64)
    dt = gpd_fx.expand(m, 2, (x,), frontend=frontend)
    assert dt.report.boundaries == [] and dt.report.fallbacks == {}
    assert dt.report.expanded_flop_fraction == 1.0
    with torch.no_grad():
        assert _rel(dt(x), m(x)) <= TOL64


def test_raft_is_captured_by_export_and_expands_exactly():
    """torch.fx cannot trace RAFT; the export front end captures it whole. RAFT's sampling
    coordinates are float32 whatever the model's dtype, so it is checked in float32."""
    torch.manual_seed(0)
    m = torchvision.models.optical_flow.raft_small(weights=None).eval()
    a, b = torch.randn(1, 3, 128, 128), torch.randn(1, 3, 128, 128)
    dt = gpd_fx.expand(m, 2, (a, b, 2))
    r = dt.report
    assert r.frontend == "export" and r.boundaries == [] and r.fallbacks == {}
    assert r.expanded_flop_fraction >= 0.9
    with torch.no_grad():
        ref = m(a, b, 2)[-1]
        assert _rel(dt(a, b, 2)[-1], ref) <= TOL[torch.float32]


class _StochasticDepthNet(nn.Module):
    """``if not self.training: return x`` (torchvision's StochasticDepth): the eval capture
    bakes the identity, so train mode needs a capture of its own."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.drop = torchvision.ops.StochasticDepth(0.5, "row")
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.a(x))
        h = h + self.drop(self.b(h))
        return self.head(h.mean((2, 3)))


def test_train_mode_python_gets_its_own_capture():
    torch.manual_seed(0)
    m = _StochasticDepthNet().to(F64)
    x = torch.randn(8, 3, 6, 6, dtype=F64)
    dt = gpd_fx.expand(m.eval(), 2, (x,), frontend="export")
    assert dt.teacher_train is not None
    assert any("train mode" in n for n in dt.report.frontend_notes)
    m.train()
    dt.train()
    ref, out, stu = seeded_runs(m, dt, x, seed=3)
    with torch.no_grad():
        torch.manual_seed(4)
        other = m(x)
    assert not torch.allclose(ref, other)        # the rows dropped depend on the random stream
    assert _rel(out, ref) <= TOL64 and _rel(stu, ref) <= TOL64


def test_the_teacher_refuses_an_input_shape_the_capture_fixed():
    """Only the batch dimension is dynamic in an export capture; any other change of shape
    would run reshapes sized for the example (silently mixing samples), so it is refused."""
    torch.manual_seed(0)
    m = torchvision.models.resnet18(num_classes=10).eval()
    dt = gpd_fx.expand(m, 2, (torch.randn(2, 3, 32, 32),), frontend="export")
    with torch.no_grad():
        dt(torch.randn(3, 3, 32, 32))
        with pytest.raises(RuntimeError, match=r"captured by torch.export with input 'x' of shape \('N', 3, 32, 32\)"):
            dt(torch.randn(2, 3, 64, 64))
