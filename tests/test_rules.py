"""One tiny module per op family that the random-architecture tests do not draw often."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import gpd_fx

TOL = 1e-10   # float64; see test_expand.py for the reasoning


def exact(model: nn.Module, *inputs, ratio: int = 3, boundaries: int = 0, branches=()):
    """Expand in float64 and check teacher and student in eval and train mode."""
    model = model.double()
    inputs = tuple(x.double() if x.is_floating_point() else x for x in inputs)
    dt = gpd_fx.expand(model, ratio, inputs, branches=branches)
    assert dt.report.fallbacks == {}
    assert len(dt.report.boundaries) == boundaries, dt.report.boundary_reasons
    for mode in (False, True):
        model.train(mode)
        dt.train(mode)
        with torch.no_grad():
            ref = model(*inputs)
            for got in (dt(*inputs), dt.student(*inputs)):
                err = float((got - ref).abs().max() / ref.abs().max())
                assert err < TOL, (mode, err)
    return dt


def test_conv1d_conv3d_and_transpose():
    """Convs of every dim and conv-transpose (grouped) follow the weight rule."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv1d(2, 6, 3, padding=1)
            self.t1 = nn.ConvTranspose1d(6, 4, 3, stride=2, groups=2)
            self.c3 = nn.Conv3d(1, 4, 3, padding=1)
            self.t3 = nn.ConvTranspose3d(4, 2, 2, stride=2)

        def forward(self, x, v):
            a = self.t1(F.relu(self.c1(x))).mean(-1)
            b = self.t3(self.c3(v)).mean((2, 3, 4))
            return torch.cat([a, b], 1)

    exact(M(), torch.randn(2, 2, 9), torch.randn(2, 1, 4, 4, 4))


def test_norms_and_prelu():
    """InstanceNorm, LayerNorm over (C, H, W), channels-last LayerNorm and per-channel PReLU."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 6, 3, padding=1)
            self.inorm = nn.InstanceNorm2d(6, affine=True)
            self.prelu = nn.PReLU(6)
            self.ln_chw = nn.LayerNorm([6, 5, 5])
            self.ln_last = nn.LayerNorm(6)
            self.rms = nn.RMSNorm(6)
            self.out = nn.Linear(6, 2)

        def forward(self, x):
            x = self.ln_chw(self.prelu(self.inorm(self.c(x))))
            x = self.rms(self.ln_last(x.permute(0, 2, 3, 1)))
            return self.out(x.mean((1, 2)))

    exact(M(), torch.randn(3, 3, 5, 5))


def test_contractions_sum_einsum_and_raw_parameters():
    """sum over channels gets /r, einsum contractions too; raw weights in F.linear/F.conv2d/@."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(6, 3, 3, 3))
            self.lin = nn.Parameter(torch.randn(5, 6))
            self.proj = nn.Parameter(torch.randn(5, 4))

        def forward(self, x):
            y = F.conv2d(x, self.w, padding=1)                      # (N, 6, H, W)
            t = y.flatten(2).transpose(1, 2)                          # (N, HW, 6)
            t = F.linear(t, self.lin) @ self.proj                    # (N, HW, 4)
            g = torch.einsum("nlc,nmc->nlm", t, t)                    # contraction over channels
            s = y.sum(1, keepdim=True)                                # sum over channels
            return g.mean((1, 2)) + s.mean((1, 2, 3)) + t.amax((1, 2))

    exact(M(), torch.randn(2, 3, 4, 4))


def test_embedding_and_token_mixing_linear():
    """Embedding tables widen along their output dim; a linear over tokens runs unchanged."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(11, 6)
            self.mix = nn.Linear(7, 7)   # over the sequence dim (MLP-Mixer style)
            self.out = nn.Linear(6, 3)

        def forward(self, ids):
            h = self.emb(ids)                                   # (N, L, 6)
            h = h + self.mix(h.transpose(1, 2)).transpose(1, 2)
            return self.out(h.mean(1))

    exact(M(), torch.randint(0, 11, (4, 7)))


def test_weight_standardised_conv_is_widened_at_run_time():
    """A computed weight (weight standardisation) is widened exactly by the same rule, no noise."""

    class StdConv(nn.Conv2d):
        def forward(self, x):
            w = self.weight
            w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
            return F.conv2d(x, w, self.bias, self.stride, self.padding)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 1)
            self.b = StdConv(4, 6, 3, padding=1)
            self.out = nn.Linear(6, 2)

        def forward(self, x):
            return self.out(self.b(self.a(x)).mean((2, 3)))

    dt = exact(M(), torch.randn(2, 3, 5, 5))
    assert dt.report.expanded_flop_fraction == pytest.approx(1.0)


def test_user_rule_for_a_custom_leaf():
    """extra_rules lets a user make a custom leaf channel-wise instead of a boundary."""

    class Swishy(nn.Module):
        def forward(self, x):
            return x * torch.sigmoid(x)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 5)
            self.act = Swishy()
            self.b = nn.Linear(5, 2)

        def forward(self, x):
            return self.b(self.act(self.a(x)))

    x = torch.randn(4, 3)
    dt = gpd_fx.expand(M(), 2, (x,), leaf_modules=[Swishy])
    assert len(dt.report.boundaries) == 1

    def channelwise(ctx, node):
        return ctx.emit_same(), ctx.layout(node.args[0])

    dt = gpd_fx.expand(M(), 2, (x,), leaf_modules=[Swishy], extra_rules={Swishy: channelwise})
    assert dt.report.boundaries == []


def test_one_parameter_free_module_called_at_several_widths():
    """A single ReLU instance used after layers of different widths (torchvision's Bottleneck)."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 1)
            self.b = nn.Conv2d(4, 8, 1)
            self.relu = nn.ReLU()
            self.out = nn.Conv2d(8, 2, 1)

        def forward(self, x):
            return self.out(self.relu(self.b(self.relu(self.a(x)))))

    exact(M(), torch.randn(2, 3, 5, 5))


def _split_cls(x, has_cls: bool):
    if has_cls:
        return x[:, 1:], x[:, :1]
    return x, None


def _join_cls(x, cls):
    if cls is not None:
        x = torch.cat((cls, x), 1)
    return x


torch.fx.wrap("_split_cls")
torch.fx.wrap("_join_cls")


@pytest.mark.parametrize("has_cls", [False, True])
def test_wrapped_function_given_none_by_another(has_cls):
    """A wrapped function's output that is None (timm mvitv2's `cls_tok`) passed into another
    wrapped function: the inlined body must take the `is None` branch the student takes."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 4)
            self.b = nn.Linear(4, 2)

        def forward(self, x):
            y, cls = _split_cls(self.a(x), has_cls)
            return self.b(_join_cls(F.gelu(y), cls))

    exact(M(), torch.randn(2, 5, 3))


def test_functional_weight_used_at_two_layouts():
    """One raw weight in several F.linear calls (csatv2's DCT matrix, applied to rows and then
    to columns): the weight rule widens it for the first call; a call over a kept dim needs it
    at student width, a call with the same channel maps shares the widened one."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 4))
            self.out = nn.Linear(4, 2)

        def forward(self, x):
            a = F.linear(x, self.w)                        # output channels widened
            b = F.linear(a.transpose(-1, -2), self.w)      # over the kept dim: student width
            c = F.linear(x * 2, self.w)                    # the same maps as the first call
            return self.out(b.transpose(-1, -2) + c)

    exact(M(), torch.randn(2, 3, 4, 4))


def test_gate_of_one_expanded_channel_broadcasts():
    """FocalNet's modulation: a one-channel slice of an expanded tensor gates all channels of
    another (`ctx * gates[:, l:l+1]`); it broadcasts in the teacher as in the student."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.f = nn.Conv2d(3, 2 * 4 + 2, 1)
            self.h = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            q, c, gates = torch.split(self.f(x), (4, 4, 2), 1)
            c = c * gates[:, 0:1] + gates[:, 1:2] * F.gelu(c)
            return self.h(q * c)

    exact(M(), torch.randn(2, 3, 5, 5))


def test_walk_drops_values_no_later_node_reads():
    """The lockstep walk keeps a value only while a node still to be visited reads it: holding
    every activation of both graphs to the end cost HaloNet-H1 6.7 GiB for a 0.2 GiB teacher."""
    from gpd_fx.passes.trace import trace
    from gpd_fx.passes.widen import Builder

    m = nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(6)]).double()
    b = Builder(trace(m), 2, noise=0.1, seed=0, strict=True, tol=1e-9)
    b.run((torch.randn(4, 8).double(),))
    held = [v for v in [*b.svals.values(), *b.tvals.values()]
            if isinstance(v, torch.Tensor) and not isinstance(v, nn.Parameter) and v.device.type != "meta"]
    assert len(held) <= 6, len(held)   # the input and the output, in both graphs


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU, nn.RNN])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_recurrent_layers_expand_exactly(cls, bidirectional):
    """Sequencer-style RNN over tokens: two layers, both directions, exact teacher and student."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 5)
            self.rnn = cls(5, 4, num_layers=2, bidirectional=bidirectional, batch_first=True)
            self.head = nn.Linear(8 if bidirectional else 4, 2)

        def forward(self, x):
            y, _ = self.rnn(self.fc(x))
            return self.head(y)

    torch.manual_seed(0)
    dt = exact(M(), torch.randn(2, 6, 3), ratio=3)
    assert dt._graph().get_submodule("rnn").hidden_size == 12
    plain = gpd_fx.fold(dt)
    x = torch.randn(3, 7, 3, dtype=torch.float64)
    assert torch.allclose(plain(x), dt.student(x), rtol=0, atol=1e-12)


def test_matmul_of_two_free_expansions_keeps_the_wider():
    """EfficientViM's state-space mixer: ``h = x @ (a*b)^T`` with x expanded on its C rows and
    the state operand on its S < C columns; keeping C lets the next conv (over C) expand."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Conv1d(3, 8, 1)
            self.state = nn.Conv1d(8, 2, 1)
            self.mix = nn.Conv1d(8, 8, 1)

        def forward(self, x):
            x = self.inp(x)                       # B, C=8, L
            s = self.state(x).softmax(-1)         # B, S=2, L
            h = x @ s.transpose(-2, -1)           # B, C, S
            return self.mix(h).flatten(1)

    torch.manual_seed(0)
    exact(M(), torch.randn(2, 3, 5), boundaries=0)


@pytest.mark.parametrize("src,dst,dim", [
    ([2, 6, 1], [2, 2, 3, 1], 2),     # a width-1 channel dim split off with its row
    ([4, 1, 1], [2, 2, 1], 1),
    ([2, 1], [2, 1, 1], 1),
    ([2, 1, 1, 5], [2, 1, 5], 1),
    ([2, 3, 4], [2, 12], 1),
])
def test_reshape_layout_follows_the_teacher_values(src, dst, dim):
    """reshape_layout's teacher shape and layout, checked on values: the teacher tensor (r
    interleaved copies on ``dim``) reshaped must equal the student reshape seen through the
    layout. A channel dim of student width 1 (HaloNet) once crashed the rule."""
    from gpd_fx.passes.layout import interleaved
    from gpd_fx.passes.rules.shape import reshape_layout

    r = 3
    x = torch.randn(src)
    tshape, lay, need_inter = reshape_layout(src, dst, interleaved(src[dim], r, dim), r)
    assert not need_inter
    teacher = x.repeat_interleave(r, dim).reshape(tshape)
    assert torch.equal(teacher, x.reshape(dst).index_select(lay.dim, lay.index))


def test_unfold_windows_over_spatial_dims():
    """HaloNet's halo blocks: ``x.unfold`` over H and W keeps the channel dim in place."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 1)
            self.b = nn.Conv2d(4, 2, 1)

        def forward(self, x):
            w = self.a(x).unfold(2, 3, 1).unfold(3, 2, 2)      # B, C, H', W', 3, 2
            return self.b(w.mean((-2, -1)))

    torch.manual_seed(0)
    exact(M(), torch.randn(2, 3, 5, 6))


def test_im2col_unfold_carries_the_channel_map_tap_by_tap():
    """``F.unfold``/``nn.Unfold`` (ATen im2col): output channel ``c*k*k + j`` is tap ``j`` of
    channel ``c``, so the widened input's map carries over tap by tap. A convolution written as
    unfold + linear then reads the unfolded channels with the widened weight (no boundary)."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 1)
            self.lin = nn.Linear(4 * 9, 5)                    # a 3x3 conv as im2col + GEMM
            self.unf = nn.Unfold((2, 3), dilation=(1, 2), stride=2)
            self.b = nn.Conv1d(4 * 6, 2, 1)

        def forward(self, x):
            y = self.a(x)
            cols = F.unfold(y, 3, padding=1)                  # (N, 36, H*W)
            p = self.lin(cols.transpose(1, 2)).mean(1)
            q = self.b(self.unf(y)).mean(-1)                  # (N, 24, L) -> (N, 2)
            return torch.cat([p, q], 1)

    torch.manual_seed(0)
    dt = exact(M(), torch.randn(2, 3, 7, 8), ratio=2)
    assert dt.report.runtime_widenings == 0
    lin = [m for m in dt.teacher.modules() if isinstance(m, nn.Linear)]
    assert [m.in_features for m in lin] == [2 * 4 * 9]


def test_raft_convex_upsampling_of_a_widened_flow():
    """RAFT's ``upsample_flow`` (torchvision): unfold of the flow, viewed as (N, 2, 9, 1, 1, h, w)
    and weighted by a softmaxed mask. Exact with no boundary at the unfold; the mask keeps its
    copies on a sub-pixel dim, so the flow is narrowed at the product (see the im2col rule)."""
    from torchvision.models.optical_flow._utils import upsample_flow

    class Up(nn.Module):
        def __init__(self):
            super().__init__()
            self.flow = nn.Conv2d(4, 2, 3, padding=1)
            self.mask = nn.Conv2d(4, 9 * 4 * 4, 1)

        def forward(self, x):
            return upsample_flow(self.flow(x), self.mask(x), factor=4)

    torch.manual_seed(0)
    exact(Up(), torch.randn(2, 4, 5, 6), ratio=2)
    # through torch.export the op is ATen im2col, bound to torch._C._nn.im2col (the same rule)
    m, x = Up().double(), torch.randn(2, 4, 5, 6, dtype=torch.float64)
    dt = gpd_fx.expand(m, 2, (x,), branches=(), frontend="export")
    assert dt.report.frontend == "export" and len(dt.report.boundaries) == 0, dt.report.boundary_reasons
    with torch.no_grad():
        assert float((dt(x) - m(x)).abs().max() / m(x).abs().max()) < TOL


def test_builtin_rule_key_registered_twice_is_an_error():
    """A built-in key claimed twice (``"masked_fill"`` was in two lists, the later silently won)
    is an error at import; aliases inside one call (``F.linear`` / ``torch._C._nn.linear``) and
    user rules replacing a built-in one are not."""
    from gpd_fx.errors import GPDError
    from gpd_fx.passes.registry import RULES, DuplicateRuleError, builtin_rules, register

    def rule_a(ctx, node):
        return ctx.emit_same(), None

    def rule_b(ctx, node):
        return ctx.emit_same(), None

    key, fn_key = "_gpd_test_duplicate_key", lambda x: x
    try:
        with builtin_rules():
            register(key, fn_key, fn_key)(rule_a)   # the same function twice in one call: an alias
            with pytest.raises(DuplicateRuleError, match="_gpd_test_duplicate_key.*registered twice"):
                register(key)(rule_b)
            with pytest.raises(DuplicateRuleError):
                register("_gpd_test_other", "_gpd_test_other")(rule_b)   # a name listed twice
        assert issubclass(DuplicateRuleError, GPDError)
        register(key)(rule_b)   # outside the built-ins: a user rule replaces the built-in one
        assert RULES.methods[key].fn is rule_b
    finally:
        for table in (RULES.methods, RULES.functions, RULES._builtin_keys):
            for k in (key, fn_key, "_gpd_test_other"):
                table.pop(k, None)


def test_rule_context_worked_example_runs():
    """The worked example in ``RuleContext``'s module docstring, executed as written: exact
    teacher (strict), the scale widened and expanded, fold gives the model's parameters back."""
    import textwrap

    from gpd_fx.passes import widen_context
    from gpd_fx.passes.layout import Layout
    from gpd_fx.passes.registry import RULES
    from gpd_fx.passes.widen import LAYOUT_KEY

    doc = widen_context.__doc__
    code = textwrap.dedent(doc[doc.index("::\n") + 3:doc.index("fx traces into")])
    scope = {"nn": nn, "torch": torch, "gpd_fx": gpd_fx}
    exec(code, scope)  # noqa: S102 - the documentation's own example
    ChannelScale = scope["ChannelScale"]
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 6), ChannelScale(6), nn.ReLU(), nn.Linear(6, 3)).double()
        x = torch.randn(5, 4, dtype=torch.float64)
        dt = gpd_fx.expand(model, ratio=3, example_inputs=(x,), strict=True, branches=())
        with torch.no_grad():
            assert (dt(x) - model(x)).abs().max() < TOL
        assert dt.teacher.get_submodule("1").scale.shape == (18,)
        node = next(n for n in dt.teacher.graph.nodes if n.op == "call_module" and n.target == "1")
        assert isinstance(node.meta[LAYOUT_KEY], Layout)
        folded = gpd_fx.fold(dt)
        assert torch.equal(folded.state_dict()["1.scale"], model.state_dict()["1.scale"])
    finally:
        RULES.modules.pop(ChannelScale, None)


def test_lp_pool_3d_acts_on_three_trailing_dims():
    """nn.LPPool3d has a rule (its spatial rank from the pooling table): no boundary, exact."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.pool, self.head = nn.Conv3d(3, 4, 3, padding=1), nn.LPPool3d(2, 2), nn.Conv3d(4, 2, 1)

        def forward(self, x):
            return self.head(self.pool(self.conv(x).relu() + 0.1))

    torch.manual_seed(0)
    dt = gpd_fx.expand(Net().double(), 2, (torch.randn(2, 3, 4, 8, 8, dtype=torch.float64),))
    assert dt.report.boundaries == [] and dt.report.max_rel_error < 1e-12
