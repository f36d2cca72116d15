"""expand: exactness on small hand-written modules, the report, and errors on bad input."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import gpd_fx
from gpd_fx.errors import ExpandInputError, TraceError, UnsupportedOpError
from nets import seeded_runs

# float64 models: the teacher sums r times more terms in another order, so outputs differ by a
# few ulps times the reduction length (~1e-15 relative); 1e-10 is far above that and far below
# the O(1e-2..1) error of any wrong rule.
TOL = 1e-10


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def check(model: nn.Module, x: torch.Tensor, ratio: int = 2, train: bool = True, **kw) -> gpd_fx.DynamicTeacher:
    model = model.double()
    x = x.double()
    dt = gpd_fx.expand(model, ratio=ratio, example_inputs=(x,), **kw)
    assert dt.report.fallbacks == {}
    for mode in ([False, True] if train else [False]):
        model.train(mode)
        dt.train(mode)
        ref, out, stu = seeded_runs(model, dt, x)
        assert rel_err(out, ref) < TOL, f"teacher differs in {'train' if mode else 'eval'} mode"
        assert rel_err(stu, ref) < TOL, f"student differs in {'train' if mode else 'eval'} mode"
    return dt


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.dw = nn.Conv2d(6, 6, 3, padding=1, groups=6)
        self.grp = nn.Conv2d(6, 9, 1, groups=3)
        self.gn = nn.GroupNorm(3, 9)
        self.se1 = nn.Conv2d(9, 3, 1)
        self.se2 = nn.Conv2d(3, 9, 1)
        self.fc = nn.Linear(9 * 4 * 4, 5)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        x = x + self.dw(x)
        x = self.gn(self.grp(x))
        g = torch.sigmoid(self.se2(F.relu(self.se1(x.mean((2, 3), keepdim=True)))))
        x = F.max_pool2d(x * g, 2)
        return self.fc(torch.flatten(x, 1))


def test_cnn_exact_all_ratios():
    """Residual, depthwise, grouped, GroupNorm, SE gating and flatten->linear stay exact."""
    for r in (1, 2, 3, 4):
        dt = check(ConvNet(), torch.randn(3, 3, 8, 8), ratio=r)
        assert dt.report.boundaries == []
        assert dt.report.expanded_flop_fraction == pytest.approx(1.0)


class Shuffle(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.c = nn.Conv2d(8, 6, 1)

    def forward(self, x):
        x = self.a(x)
        n, c, h, w = x.shape
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)   # channel shuffle
        x1, x2 = x.chunk(2, dim=1)
        return self.c(torch.cat([x1, self.b(x2)], 1))


def test_channel_shuffle_and_split_without_boundary():
    """A channel shuffle is followed exactly (explicit layout), with no boundary cut."""
    dt = check(Shuffle(), torch.randn(2, 3, 6, 6), ratio=3)
    assert dt.report.boundaries == []


class Tokens(nn.Module):
    def __init__(self, c=8, heads=2):
        super().__init__()
        self.embed = nn.Conv2d(3, c, 2, stride=2)
        self.cls = nn.Parameter(torch.randn(1, 1, c))
        self.pos = nn.Parameter(torch.randn(1, 17, c))
        self.norm = nn.LayerNorm(c)
        self.qkv = nn.Linear(c, 3 * c)
        self.proj = nn.Linear(c, c)
        self.gamma = nn.Parameter(torch.rand(c))
        self.heads = heads
        self.head = nn.Linear(c, 4)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        b, n, c = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        a = (q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5
        y = (a.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c)
        x = x + self.gamma * self.proj(y)
        y2 = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        return self.head(x[:, 0] + y2.mean(1))


def test_attention_block_exact():
    """Class token, pos-embed, fused qkv reshape, explicit and SDPA attention, layer scale."""
    dt = check(Tokens(), torch.randn(2, 3, 8, 8), ratio=3)
    assert dt.report.boundaries == []


def test_multihead_attention_module():
    """nn.MultiheadAttention gets r times more heads and stays exact."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(5, 8)
            self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
            self.out = nn.Linear(8, 3)

        def forward(self, x):
            h = self.inp(x)
            y, _ = self.mha(h, h, h, need_weights=False)
            return self.out(y + h)

    dt = check(M(), torch.randn(2, 7, 5), ratio=2)
    assert dt.report.boundaries == []


def test_unknown_op_becomes_boundary_and_strict_raises():
    """An op without a rule is narrowed around (exact); strict=True names it instead."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3)
            self.b = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            return self.b(torch.fft.fft(self.a(x), dim=1).real)

    dt = check(M(), torch.randn(2, 3, 6, 6), ratio=2)
    assert len(dt.report.boundaries) == 1
    assert "fft" in next(iter(dt.report.boundary_reasons.values()))
    assert 0 < dt.report.expanded_flop_fraction <= 1
    with pytest.raises(UnsupportedOpError, match="fft"):
        gpd_fx.expand(M(), 2, (torch.randn(2, 3, 6, 6),), strict=True)


def test_training_flag_stays_live():
    """F.dropout(x, p, self.training) follows dt.train()/dt.eval() instead of being baked."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 6)
            self.b = nn.Linear(6, 2)

        def forward(self, x):
            return self.b(F.dropout(self.a(x), 0.5, self.training))

    m = M().eval()
    x = torch.randn(64, 4)
    dt = gpd_fx.expand(m, 2, (x,))
    dt.eval()
    assert rel_err(dt(x), m(x)) < 1e-5
    dt.train()
    assert not torch.allclose(dt(x), m(x))   # dropout active: the flag is read at run time


def test_input_model_not_modified():
    """expand leaves the user's parameters, buffers and modes untouched."""
    m = ConvNet().train()
    before = copy.deepcopy(m.state_dict())
    gpd_fx.expand(m, 3, (torch.randn(2, 3, 8, 8),))
    assert m.training and all(mod.training for mod in m.modules())
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_report_counts_and_noise_breaks_symmetry():
    """Parameter counts are right and the copies of a weight differ when noise > 0."""
    m = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    dt = gpd_fx.expand(m, 2, (torch.randn(2, 4),))
    assert dt.report.student_params == sum(p.numel() for p in m.parameters())
    w = dt.teacher.get_submodule("2").weight_linear if hasattr(dt.teacher.get_submodule("2"), "weight_linear") \
        else dt.teacher.get_submodule("2").weight
    assert w.shape[1] == 12
    assert not torch.equal(w[:, 0::2], w[:, 1::2])
    dt0 = gpd_fx.expand(m, 2, (torch.randn(2, 4),), noise=0.0, branches=())
    w0 = dt0.teacher.get_submodule("2").weight
    assert torch.equal(w0[:, 0::2], w0[:, 1::2])


def test_same_seed_same_teacher():
    """The noise and branch parameters are reproducible from the seed."""
    m = ConvNet()
    x = torch.randn(2, 3, 8, 8)
    a = gpd_fx.expand(m, 2, (x,), seed=3).state_dict()
    b = gpd_fx.expand(m, 2, (x,), seed=3).state_dict()
    c = gpd_fx.expand(m, 2, (x,), seed=4).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("ratio", [0, -1, 1.5, True, "2"])
def test_bad_ratio(ratio):
    """A ratio that is not an integer >= 1 is refused with a typed error."""
    with pytest.raises(ExpandInputError, match="ratio"):
        gpd_fx.expand(ConvNet(), ratio, (torch.randn(1, 3, 8, 8),))


def test_missing_and_wrong_inputs():
    """Missing example inputs and inputs the model rejects give clear errors."""
    with pytest.raises(ExpandInputError, match="example_inputs"):
        gpd_fx.expand(ConvNet(), 2)
    with pytest.raises(ExpandInputError, match=r"fails on the example inputs \[\(1, 5, 8, 8\)\]"):
        gpd_fx.expand(ConvNet(), 2, (torch.randn(1, 5, 8, 8),))


def test_already_expanded():
    """Expanding a teacher again is refused."""
    dt = gpd_fx.expand(ConvNet(), 2, (torch.randn(1, 3, 8, 8),))
    with pytest.raises(ExpandInputError, match="already an expanded teacher"):
        gpd_fx.expand(dt, 2, (torch.randn(1, 3, 8, 8),))


def test_untraceable_model_names_line_and_fix():
    """Data-dependent control flow fails with the line and the leaf_modules hint; the hint works."""

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)

        def forward(self, x):
            if x.sum() > 0:
                return self.a(x)
            return -self.a(x)

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Branchy()
            self.b = nn.Linear(4, 6)
            self.c = nn.Linear(6, 2)

        def forward(self, x):
            return self.c(torch.relu(self.b(self.inner(x))))

    with pytest.raises(TraceError, match=r"(?s)x.sum\(\) > 0.*leaf_modules"):
        gpd_fx.expand(Outer(), 2, (torch.randn(2, 4),))
    dt = gpd_fx.expand(Outer(), 2, (torch.randn(2, 4),), leaf_modules=[Branchy])
    assert dt.report.expanded_flop_fraction > 0


def test_optional_argument_left_at_none():
    """A forward argument the example inputs leave at its None default (timm Hiera's `mask`):
    the graph holds the branch taken for None, not the proxy's `is not None` branch."""

    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 6)
            self.b = nn.Linear(6, 3)

        def forward(self, x, mask=None):
            if mask is not None:
                x = x * mask.view(x.shape[0], 1).to(x.dtype)
            return self.b(F.relu(self.a(x)))

    check(Masked(), torch.randn(5, 4))


def test_out_of_memory_in_a_rule_is_raised_not_a_fallback(monkeypatch):
    """An allocation failure while widening is the machine's limit, not a rule bug: it must
    surface instead of silently turning the layer into a boundary."""
    from gpd_fx.passes.rules import linear_ops

    def oom(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(linear_ops, "widen_linear_weight", oom)
    with pytest.raises(RuntimeError, match="allocate memory"):
        gpd_fx.expand(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)),
                      example_inputs=(torch.randn(2, 4),))


@pytest.mark.parametrize("branches", [(), None])
def test_teacher_nodes_carry_their_layouts(branches):
    """Every teacher node that stands for a student value, every layout conversion and every
    parameter node has ``node.meta["gpd_layout"]`` after expand (also after the multi-branch
    rewrite), and the layout is the one of the node's value: its expanded dim is r times wider."""
    from torch.fx.passes.shape_prop import ShapeProp

    from gpd_fx.passes.layout import Layout, gpd_narrow, gpd_widen
    from gpd_fx.passes.widen import LAYOUT_KEY, STUDENT_KEY, layouts

    r = 3
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    dt = gpd_fx.expand(ConvNet().double(), ratio=r, example_inputs=(x,), branches=branches)
    teacher = dt.teacher.eval()
    ShapeProp(teacher).propagate(x)
    nodes = {n.name: n for n in teacher.graph.nodes}
    by_student = {n.meta[STUDENT_KEY]: n for n in teacher.graph.nodes if STUDENT_KEY in n.meta}
    assert set(layouts(teacher)) == {n.name for n in teacher.graph.nodes if LAYOUT_KEY in n.meta}
    for n in teacher.graph.nodes:
        if n.op in ("placeholder", "output", "get_attr") or n.target in (gpd_narrow, gpd_widen):
            assert LAYOUT_KEY in n.meta, n.format_node()
        lay = n.meta.get(LAYOUT_KEY)
        if isinstance(lay, Layout):
            shape = n.meta["tensor_meta"].shape
            assert shape[lay.dim] == lay.index.numel() == r * lay.width, (n.format_node(), shape, lay.dim)
    # the student's layers: convs and the GroupNorm run expanded on the channel dim ...
    for student in ("stem", "bn", "dw", "grp", "gn", "se1", "se2", "relu"):
        lay = by_student[student].meta[LAYOUT_KEY]
        assert isinstance(lay, Layout) and lay.dim == 1, (student, lay)
    assert by_student["stem"].meta[LAYOUT_KEY].width == 6
    # ... the logits stay at student width (nothing after them mixes channels), and so do the
    # input and the output
    assert by_student["fc"].meta[LAYOUT_KEY] is None
    assert by_student["x"].meta[LAYOUT_KEY] is None and nodes["output"].meta[LAYOUT_KEY] is None


@pytest.mark.parametrize("how", ["register_rule", "extra_rules"])
def test_user_rule_for_a_module_type_is_applied(how):
    """A rule the user registers for their own module type expands that module whole (the
    README's Extending example): fx would otherwise trace into its forward, and the rule would
    never run. Built-in module rules are unaffected (torch.nn layers are leaves anyway)."""
    from gpd_fx.passes.registry import RULES

    calls = []

    class MyLayer(nn.Module):
        def forward(self, x):
            return x * torch.sigmoid(x)

    def my_rule(ctx, node):
        calls.append(node.target)
        return ctx.emit_same(), ctx.layout(node.args[0])

    net = nn.Sequential(nn.Conv2d(3, 8, 3), MyLayer(), nn.Conv2d(8, 4, 1)).double()
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    try:
        if how == "register_rule":
            gpd_fx.register_rule(MyLayer)(my_rule)
            dt = gpd_fx.expand(net, ratio=2, example_inputs=(x,), strict=True)
        else:
            dt = gpd_fx.expand(net, ratio=2, example_inputs=(x,), strict=True, extra_rules={MyLayer: my_rule})
    finally:
        RULES.modules.pop(MyLayer, None)
    assert calls == ["1"]
    with torch.no_grad():
        assert rel_err(dt(x), net(x)) < TOL


def test_forward_with_var_args_and_kwargs_expands():
    """fx gives ``*args``/``**kwargs`` placeholders of their own; the example inputs leave them
    empty and the teacher keeps the catch-all signature."""

    class CatchAll(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 6)
            self.b = nn.Linear(6, 3)

        def forward(self, x, *args, **kwargs):
            return self.b(torch.relu(self.a(x)))

    m = CatchAll().double()
    x = torch.randn(2, 4, dtype=torch.float64)
    dt = gpd_fx.expand(m, 2, (x,))
    assert dt.report.frontend == "fx" and dt.report.expanded_flop_fraction == 1.0
    with torch.no_grad():
        assert float((dt(x) - m(x)).abs().max() / m(x).abs().max()) <= 1e-9
