"""Trust in the Python API: expand, training the teacher and fold never touch the user's model or
the process-wide RNG; custom autograd Functions keep their backward; bad arguments and
non-finite teachers give typed errors."""

from __future__ import annotations

import copy
import math
import pickle
import random

import numpy as np
import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import gpd_fx
from gpd_fx.errors import ExpandInputError, FoldError, UnsupportedOpError
from gpd_fx.passes.rules.elementwise import broadcast
from strategies import cnn_cases, cnn_program, conv_spec, vit_cases, vit_program


# --- the dynamic teacher owns every tensor it trains ----------------------------------------

class Conv1dLinear(nn.Module):
    """Conv1d -> pooled -> Linear: the classifier's input is widened, its output (and bias) kept."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(F.relu(self.conv(x)).mean(-1))


class SmallCNN(nn.Module):
    """Two conv+BN blocks and a linear head (BN statistics, a kept classifier bias)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.b1 = nn.BatchNorm2d(6)
        self.c2 = nn.Conv2d(6, 8, 3, padding=1)
        self.b2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.b1(self.c1(x)))
        x = F.relu(self.b2(self.c2(x)))
        return self.fc(x.mean((2, 3)))


class Tied(nn.Module):
    """Tied weights: the output projection reuses the embedding, and two heads share one bias."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.h = nn.Linear(6, 6)
        self.out = nn.Linear(6, 10)
        self.out.weight = self.emb.weight
        self.aux = nn.Linear(6, 10)
        self.aux.bias = self.out.bias

    def forward(self, x):
        z = torch.tanh(self.h(self.emb(x)))
        return self.out(z), self.aux(z)   # outputs: both heads (and the shared bias) stay at width


def _flat(out) -> torch.Tensor:
    return torch.cat([t.flatten() for t in out]) if isinstance(out, tuple) else out


def _models():
    return [
        ("conv1d_linear", Conv1dLinear, lambda: torch.randn(4, 3, 7)),
        ("cnn_bn", SmallCNN, lambda: torch.randn(4, 3, 6, 6)),
        ("tied", Tied, lambda: torch.randint(0, 10, (4, 5))),
    ]


def _storages(module: nn.Module) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in [*module.parameters(), *module.buffers()]
            if t.device.type != "meta" and t.untyped_storage().nbytes()}


@pytest.mark.parametrize("name,cls,make_x", _models(), ids=[m[0] for m in _models()])
def test_user_model_bit_identical_after_training_and_fold(name, cls, make_x):
    """expand + a few SGD/Adam steps on the teacher (teacher and student loss) + fold +
    dt.student leave every tensor of the user's model bit-identical; no teacher tensor shares
    storage with it. Both without multi-branch layers (where kept tensors used to be shared)
    and with them."""
    torch.manual_seed(0)
    x = make_x()
    for branches in ((), None):
        for opt_cls in (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), lambda p: torch.optim.Adam(p, lr=0.05)):
            torch.manual_seed(1)
            m = cls().train()
            before = {k: v.clone() for k, v in m.state_dict(keep_vars=True).items()}
            dt = gpd_fx.expand(m, 2, (x,), branches=branches)
            assert not (_storages(dt) & _storages(m)), f"{name}: teacher shares storage with the user's model"
            dt.train()
            opt = opt_cls(dt.parameters())
            for _ in range(3):
                opt.zero_grad()
                t, s = _flat(dt(x)), _flat(dt.student(x))
                target = torch.zeros_like(s)
                loss = F.mse_loss(t, target) + F.mse_loss(s, target) + F.mse_loss(t, s.detach())
                loss.backward()
                opt.step()
            folded = gpd_fx.fold(dt)
            folded(x)
            dt.eval().student(x)
            after = m.state_dict(keep_vars=True)
            assert after.keys() == before.keys()
            for k, v in before.items():
                assert after[k].dtype == v.dtype and torch.equal(after[k], v), \
                    f"{name} (branches={branches}): the user's {k} changed"
                assert getattr(after[k], "grad", None) is None, f"{name}: the user's {k} got a gradient"
            assert m.training


_SGD_OR_ADAM = st.sampled_from(["sgd", "adam"])


def _train_and_fold_leaves_model_untouched(case, ratio, branches, optimizer) -> None:
    model, x = case.model, case.x
    before = {k: v.clone() for k, v in model.state_dict(keep_vars=True).items()}
    flags = [m.training for m in model.modules()]
    dt = gpd_fx.expand(model, ratio, (x,), branches=branches)
    assert not (_storages(dt) & _storages(model)), "the teacher shares storage with the user's model"
    dt.train()
    opt = (torch.optim.SGD(dt.parameters(), lr=0.05, momentum=0.9) if optimizer == "sgd"
           else torch.optim.Adam(dt.parameters(), lr=0.01))
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        xb = torch.randn(x.shape, generator=gen, dtype=x.dtype)
        yb = torch.randint(case.num_classes, (x.shape[0],), generator=gen)
        t, s = dt(xb), dt.student(xb)
        loss = F.cross_entropy(t, yb) + F.cross_entropy(s, yb) + F.mse_loss(s, t.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    gpd_fx.fold(dt)(x)
    gpd_fx.fold(dt, fuse_bn=True)
    after = model.state_dict(keep_vars=True)
    for k, v in before.items():
        assert torch.equal(after[k], v) and after[k].grad is None, f"the user's {k} changed"
    assert [m.training for m in model.modules()] == flags


# the classifier of this CNN keeps its output at student width: its bias was shared
_HEAD_CNN = cnn_program(dict(kind="cna", conv=conv_spec(4, 4, 3, norm="bn")))


@settings(deadline=None, max_examples=8, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@example(case=_HEAD_CNN, ratio=2, branches=(), optimizer="sgd")
@given(case=cnn_cases(), ratio=st.integers(2, 3), branches=st.sampled_from([None, ()]), optimizer=_SGD_OR_ADAM)
def test_random_cnn_untouched_by_expand_training_and_fold(case, ratio, branches, optimizer):
    """Property: for random CNNs (tests/strategies.py) expand + 2 SGD/Adam steps on the
    teacher and the student + fold leave the user's model bit-identical."""
    _train_and_fold_leaves_model_untouched(case, ratio, branches, optimizer)


@settings(deadline=None, max_examples=5, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@example(case=vit_program({}), ratio=2, branches=(), optimizer="adam")
@given(case=vit_cases(), ratio=st.integers(2, 3), branches=st.sampled_from([None, ()]), optimizer=_SGD_OR_ADAM)
def test_random_vit_untouched_by_expand_training_and_fold(case, ratio, branches, optimizer):
    """The same property for random transformer blocks."""
    _train_and_fold_leaves_model_untouched(case, ratio, branches, optimizer)


def test_tied_weights_stay_tied_in_teacher_and_student():
    """A parameter tied in the user's model is one teacher tensor where both uses have the same
    channel maps, stays one after training, and is one parameter again in the folded student."""
    torch.manual_seed(0)
    m = Tied()
    x = torch.randint(0, 10, (4, 5))
    dt = gpd_fx.expand(m, 2, (x,), branches=())
    t = dt.teacher
    assert t.get_submodule("aux").bias is t.get_submodule("out").bias
    assert t.get_submodule("aux").bias.untyped_storage().data_ptr() != m.out.bias.untyped_storage().data_ptr()
    opt = torch.optim.SGD(dt.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        (_flat(dt(x)).square().mean() + _flat(dt.student(x)).square().mean()).backward()
        opt.step()
    assert t.get_submodule("aux").bias is t.get_submodule("out").bias
    s = gpd_fx.fold(dt)
    assert s.aux.bias is s.out.bias and s.out.weight is s.emb.weight
    torch.testing.assert_close(_flat(s(x)), _flat(dt.eval().student(x)), rtol=0, atol=0)


# --- expand leaves the global RNG state as it found it --------------------------------------

class WithDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3)
        self.d = nn.Dropout(0.3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.d(F.relu(self.c(x))).mean((2, 3)))


def test_expand_leaves_cpu_rng_state():
    """torch.rand after expand equals torch.rand after the same manual_seed without expand;
    numpy's and Python's global generators are untouched too."""
    m = WithDropout()
    x = torch.randn(2, 3, 6, 6)
    torch.manual_seed(1234)
    want = torch.rand(8)
    np_state, py_state = np.random.get_state(), random.getstate()
    torch.manual_seed(1234)
    gpd_fx.expand(m, 2, (x,))
    got = torch.rand(8)
    assert torch.equal(got, want), "expand changed the global torch RNG state"
    after = np.random.get_state()
    assert after[0] == np_state[0] and np.array_equal(after[1], np_state[1]) and after[2:] == np_state[2:]
    assert random.getstate() == py_state


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_expand_leaves_cuda_rng_state():
    """The same on the GPU: the CUDA generators are restored (model on the GPU)."""
    m = WithDropout().cuda()
    x = torch.randn(2, 3, 6, 6, device="cuda")
    torch.manual_seed(99)
    want = torch.rand(8, device="cuda"), torch.rand(8)
    torch.manual_seed(99)
    gpd_fx.expand(m, 2, (x,))
    got = torch.rand(8, device="cuda"), torch.rand(8)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


# --- custom autograd Functions keep their backward -----------------------------------------

class RoundSTE(torch.autograd.Function):
    """Straight-through estimator: round forward, identity backward."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):
        return g


class QuantNet(nn.Module):
    """conv1 -> STE -> conv2: conv1 gets a gradient only through the STE's own backward."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 5, 3, padding=1)

    def forward(self, x):
        return self.conv2(RoundSTE.apply(4.0 * self.conv1(x))).mean((2, 3))


def _ste_setup(**kw):
    torch.manual_seed(0)
    m = QuantNet().double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    dt = gpd_fx.expand(m, 2, (x,), branches=(), **kw)
    return m, x, dt


def test_autograd_function_is_one_node_with_its_backward():
    """``Fn.apply`` stays one call node (never inlined to ``round``); without a rule it is a
    boundary listed in the report, and the teacher's conv1 gets the student's gradient,
    spread over the output copies: grad W'[o] = grad W[o // r] / r (first layer, no noise)."""
    m, x, dt = _ste_setup()
    calls = [n for n in dt.teacher.graph.nodes if n.op == "call_function" and n.target == RoundSTE.apply]
    assert len(calls) == 1
    assert not any(n.target in (torch.round, "round") for n in dt.teacher.graph.nodes)
    assert any("RoundSTE" in why for why in dt.report.boundary_reasons.values()), dt.report.boundary_reasons
    torch.testing.assert_close(dt(x), m(x), rtol=1e-12, atol=1e-12)

    m(x).sum().backward()
    dt(x).sum().backward()
    g_student = m.conv1.weight.grad
    g_teacher = dt.teacher.get_submodule("conv1").weight.grad
    assert g_student.abs().sum() > 0
    assert g_teacher.shape[0] == 2 * g_student.shape[0]
    # the boundary narrows by the mean over the 2 copies: each copy gets half the gradient
    torch.testing.assert_close(g_teacher, g_student.repeat_interleave(2, 0) / 2, rtol=1e-12, atol=1e-12)
    # and the student through the teacher's parameters keeps the custom backward too
    dt.zero_grad()
    dt.student(x).sum().backward()
    # (the student map reads output copy 0 of each channel: copy 1 gets no student gradient)
    mapped = dt.teacher.get_submodule("conv1").weight.grad
    torch.testing.assert_close(mapped[0::2], g_student, rtol=1e-12, atol=1e-12)
    assert not mapped[1::2].any()


def test_compiled_teacher_keeps_the_function_backward():
    """torch.compile (fullgraph) of the teacher runs the Function with its own backward: the
    same conv1 gradient as eager."""
    m, x, dt = _ste_setup()
    dt(x).sum().backward()
    eager = dt.teacher.get_submodule("conv1").weight.grad.clone()
    dt.zero_grad()
    torch.compile(dt, backend="aot_eager", fullgraph=True)(x).sum().backward()
    assert eager.abs().sum() > 0
    torch.testing.assert_close(dt.teacher.get_submodule("conv1").weight.grad, eager, rtol=1e-12, atol=1e-12)


def test_autograd_function_strict_names_the_function_and_the_fix():
    """strict=True refuses the boundary naming the node, the Function class and the fix."""
    with pytest.raises(UnsupportedOpError, match=r"RoundSTE") as e:
        _ste_setup(strict=True)
    msg = str(e.value)
    assert "register_rule(RoundSTE.apply)" in msg and "apply" in msg


def test_autograd_function_with_a_user_rule_runs_expanded():
    """A user who knows their Function acts per element registers the element-wise rule for
    ``Fn.apply``: it then runs on the widened tensor, exact, with its own backward."""
    m, x, dt = _ste_setup(extra_rules={RoundSTE.apply: broadcast})
    assert dt.report.boundaries == []
    torch.testing.assert_close(dt(x), m(x), rtol=1e-12, atol=1e-12)
    dt(x).sum().backward()
    g = dt.teacher.get_submodule("conv1").weight.grad
    assert g.shape[0] == 8 and bool((g.flatten(1).abs().sum(1) > 0).all())


def test_trace_keeps_autograd_function_apply():
    """The tracer records ``Fn.apply`` as one call_function node, and the traced module runs it
    with the Function's backward."""
    from gpd_fx.passes.trace import trace

    m = QuantNet()
    gm = trace(m)
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"].count(RoundSTE.apply) == 1
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    gm(x).sum().backward()
    assert x.grad.abs().sum() > 0
    # Function.apply is patched only while tracing, also when the trace fails
    assert not getattr(torch.autograd.Function.__dict__["apply"], "_gpd_patched", False)

    class DataBranch(nn.Module):
        def forward(self, x):
            y = RoundSTE.apply(x)
            return y if y.sum() > 0 else -y   # a branch on data: fx cannot trace it

    with pytest.raises(gpd_fx.TraceError):
        trace(DataBranch())
    assert not getattr(torch.autograd.Function.__dict__["apply"], "_gpd_patched", False)
    # the node's callable survives pickling (torch.save of a teacher) and deepcopy
    for copied in (pickle.loads(pickle.dumps(gm)), copy.deepcopy(gm)):
        assert [n.target for n in copied.graph.nodes].count(RoundSTE.apply) == 1
        torch.testing.assert_close(copied(x), gm(x), rtol=0, atol=0)


class SignSplit(torch.autograd.Function):
    """Two outputs (positive and negative part) and a backward of its own (the sum of both)."""

    @staticmethod
    def forward(ctx, x):
        return x.clamp(min=0), x.clamp(max=0)

    @staticmethod
    def backward(ctx, ga, gb):
        return ga + gb


class SplitNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        pos, neg = SignSplit.apply(self.bn(self.conv1(x)))
        return self.conv2(pos - 0.5 * neg).mean((2, 3))


def test_autograd_function_with_two_outputs_survives_fold_with_fused_bn():
    """A two-output Function stays one node in the teacher and in fold(dt, fuse_bn=True)'s
    graph (traced without example values), and the folded and fused students are exact."""
    torch.manual_seed(0)
    m = SplitNet().double()
    x = torch.randn(3, 3, 6, 6, dtype=torch.float64)
    m.train()(x)   # BN statistics that are not the identity
    m.eval()
    dt = gpd_fx.expand(m, 2, (x,))
    assert [n.target for n in dt.teacher.graph.nodes].count(SignSplit.apply) == 1
    torch.testing.assert_close(dt(x), m(x), rtol=1e-9, atol=1e-12)
    student, fused = gpd_fx.fold(dt, fuse_bn=True)
    assert [n.target for n in fused.graph.nodes].count(SignSplit.apply) == 1
    assert not any(isinstance(mod, nn.BatchNorm2d) for mod in fused.modules())
    torch.testing.assert_close(student(x), m(x), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(fused(x), m(x), rtol=1e-9, atol=1e-12)


# --- bad arguments and non-finite teachers --------------------------------------------------

def test_non_module_is_refused():
    """expand("resnet", ...) names the type and says what to pass."""
    with pytest.raises(ExpandInputError, match=r"nn\.Module.*got str") as e:
        gpd_fx.expand("resnet", 2, (torch.randn(1, 3, 8, 8),))
    assert "torchvision.models" in str(e.value)


def test_noise_must_be_finite_and_in_range():
    """noise outside [0, 1] (or NaN, inf, a bool, a string) is an ExpandInputError; the range
    ends are accepted (above 1, float32 rounding breaks the exactness: see MAX_NOISE)."""
    m = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    x = torch.randn(2, 4)
    for bad in (math.nan, math.inf, -math.inf, -0.1, 1.5, 10.0, 100.0, True, "0.1"):
        with pytest.raises(ExpandInputError, match="noise"):
            gpd_fx.expand(m, 2, (x,), noise=bad)
    for ok in (0, 0.1, 1):
        assert gpd_fx.expand(m, 2, (x,), noise=ok).report.fallbacks == {}


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_fold_of_non_finite_teacher_names_the_parameter(value):
    """A teacher with a NaN/inf parameter does not fold into a NaN student silently."""
    m = SmallCNN()
    dt = gpd_fx.expand(m, 2, (torch.randn(2, 3, 6, 6),), branches=())
    with torch.no_grad():
        dt.teacher.get_submodule("c2").weight[3, 1, 0, 0] = value
    with pytest.raises(FoldError, match=r"'c2\.weight'.*non-finite"):
        gpd_fx.fold(dt)


def test_fold_of_non_finite_student_statistics_names_the_buffer():
    """A NaN in the student's own BN statistics is named as well."""
    m = SmallCNN()
    dt = gpd_fx.expand(m, 2, (torch.randn(2, 3, 6, 6),))
    dt.student_state.as_dict()["b1.running_var"][0] = math.nan
    with pytest.raises(FoldError, match=r"b1\.running_var"):
        gpd_fx.fold(dt)
