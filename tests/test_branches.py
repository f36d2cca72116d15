"""Tests for gpd_fx.passes.branches: online-folded multi-branch conv and linear layers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from nets import randomize_branch_scales

from gpd_fx.errors import GPDError
from gpd_fx.passes.branches import (
    BRANCH_KINDS_CONV,
    BranchConfigError,
    BranchConvNd,
    BranchLinear,
)

# torch's own note that 'same' with an even kernel pads a copy of the input; expected here.
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

# (dim, cin, cout, kernel, stride, padding, dilation, groups, padding_mode, expected branches)
ALL = BRANCH_KINDS_CONV
NO_ID = ("kxk", "1x1", "1x1_kxk", "1x1_avg")
EVEN = ("kxk", "1x1_kxk", "1x1_avg")
CASES = [
    (2, 4, 4, 3, 1, 1, 1, 1, "zeros", ALL),
    (2, 4, 6, 3, 2, 1, 1, 1, "zeros", NO_ID),
    (2, 4, 4, 3, 1, "same", 2, 1, "reflect", ALL),
    (2, 4, 4, 5, 1, "valid", 1, 2, "zeros", ALL),
    (2, 6, 6, 3, 1, 1, 1, 6, "zeros", ALL),  # depthwise
    (2, 6, 6, 3, 2, 1, 1, 6, "replicate", NO_ID),  # strided depthwise
    (2, 4, 6, 3, 2, (1, 0), 1, 2, "circular", NO_ID),
    (2, 4, 4, 4, 2, 1, 1, 1, "zeros", EVEN),
    (2, 4, 4, 2, 1, "same", 1, 2, "zeros", EVEN),  # asymmetric 'same' padding
    (2, 4, 4, (1, 3), 1, (0, 1), 1, 1, "replicate", ALL),
    (2, 4, 4, (3, 5), (2, 1), (2, 0), (1, 2), 4, "zeros", NO_ID),
    (1, 4, 4, 3, 1, 0, 3, 2, "zeros", ALL),
    (1, 3, 5, 5, 3, 2, 1, 1, "reflect", NO_ID),
    (3, 4, 4, 3, 1, 1, 1, 4, "zeros", ALL),
    (3, 2, 4, (3, 1, 3), (1, 2, 1), (1, 0, 2), (2, 1, 1), 2, "circular", NO_ID),
    (2, 4, 4, 1, 1, 0, 1, 1, "zeros", ("kxk", "identity")),
    (2, 4, 4, 1, 2, 0, 1, 2, "zeros", ("kxk",)),
]


def _conv(dim, cin, cout, k, stride, padding, dilation, groups, mode, bias=True):
    return CONVS[dim - 1](cin, cout, k, stride, padding, dilation, groups, bias, mode, dtype=torch.float64)


def _branch(conv, **kw):
    return BranchConvNd(conv.weight, conv.bias, dim=conv.weight.dim() - 2, stride=conv.stride,
                        padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                        padding_mode=conv.padding_mode, **kw)


def _pad(conv, x):
    """Pad ``x`` exactly as ``conv`` pads it (the reference for crop-style branches)."""
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    return F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)


def _separate(m: BranchConvNd, conv, x):
    """Run every branch as its own sequence of ops, scale per output channel and sum."""
    dim, g, k = m.dim, m.groups, m.kernel_size
    ref = CONVS[dim - 1]
    xp = _pad(conv, x)
    y = F.conv1d if dim == 1 else F.conv2d if dim == 2 else F.conv3d
    outs = {"kxk": conv(x)}
    out_shape = outs["kxk"].shape[2:]
    # Centre tap of the k×k window sits d*(k-1)/2 past the window start in the padded input.
    centre = tuple(slice(d * (kk // 2), None) for d, kk in zip(m.dilation, k))
    crop = tuple(slice(0, n) for n in out_shape)
    if "1x1" in m.branches:
        outs["1x1"] = y(xp[(..., *centre)], m.weight_1x1, None, m.stride, 0, 1, g)[(..., *crop)]
    if "1x1_kxk" in m.branches:
        second = ref(m.weight_1x1_kxk_b.shape[1] * g, m.out_channels, k, m.stride, m.padding, m.dilation, g,
                     False, m.padding_mode, dtype=x.dtype)
        second.weight.data.copy_(m.weight_1x1_kxk_b)
        outs["1x1_kxk"] = second(y(x, m.weight_1x1_kxk_a, None, 1, 0, 1, g))
    if "1x1_avg" in m.branches:
        # Average pooling with count_include_pad=True as a depthwise uniform conv (avg_pool has no dilation).
        avg = ref(m.out_channels, m.out_channels, k, m.stride, m.padding, m.dilation, m.out_channels,
                  False, m.padding_mode, dtype=x.dtype)
        avg.weight.data.fill_(1.0 / math.prod(k))
        outs["1x1_avg"] = avg(y(x, m.weight_1x1_avg, None, 1, 0, 1, g))
    if "identity" in m.branches:
        outs["identity"] = xp[(..., *centre)][(..., *crop)]
    bias = 0 if m.bias is None else m.bias.view(-1, *[1] * dim)
    total = sum(getattr(m, f"v_{b}").view(-1, *[1] * dim) * (o - bias if b == "kxk" else o) for b, o in outs.items())
    return total + bias


@pytest.mark.parametrize("case", CASES, ids=str)
def test_fold_equals_separate_branches(case):
    """The folded single conv equals the branches run separately, scaled and summed."""
    *cfg, expected = case
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    conv = _conv(*cfg)
    m = _branch(conv, generator=g)
    assert m.branches == expected
    with torch.no_grad():
        for b in m.branches:
            getattr(m, f"v_{b}").normal_(generator=g)
    x = torch.randn(2, cfg[1], *(11, 10, 9)[: cfg[0]], dtype=torch.float64)
    # float64 and O(10) terms per output: rounding differences stay far below 1e-12.
    assert_close(m(x), _separate(m, conv, x), atol=1e-12, rtol=0)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_init_is_exact(case):
    """At init the effective weight is the given weight bitwise, and the output matches nn.Conv bitwise."""
    *cfg, _ = case
    conv = _conv(*cfg)
    m = _branch(conv, generator=torch.Generator().manual_seed(1))
    x = torch.randn(2, cfg[1], *[10] * cfg[0], dtype=torch.float64)
    assert torch.equal(m.effective_weight(), conv.weight)
    assert torch.equal(m.weight, conv.weight)
    assert torch.equal(m(x), conv(x))
    assert torch.equal(m.fold()(x), conv(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_init_exact_in_dtype(dtype):
    """Exactness at init holds in every float dtype (1*W + 0*K_b adds exact zeros)."""
    w = torch.randn(8, 8, 3, 3, dtype=dtype)
    m = BranchConvNd(w, None, dim=2, padding=1, generator=torch.Generator().manual_seed(0))
    lin = BranchLinear(w[:, :, 0, 0], None, generator=torch.Generator().manual_seed(0))
    assert torch.equal(m.effective_weight(), w)
    assert torch.equal(lin.effective_weight(), w[:, :, 0, 0])


def test_avg_branch_matches_avg_pool():
    """The 1x1_avg branch equals a 1x1 conv followed by F.avg_pool2d(count_include_pad=True)."""
    g = torch.Generator().manual_seed(0)
    m = BranchConvNd(torch.randn(6, 4, 3, 3, dtype=torch.float64), None, dim=2, stride=2, padding=1,
                     branches=("kxk", "1x1_avg"), generator=g)
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        m.v_kxk.zero_()
        m.v_1x1_avg.fill_(1)
    ref = F.avg_pool2d(F.conv2d(x, m.weight_1x1_avg), 3, 2, 1, count_include_pad=True)
    assert_close(m(x), ref, atol=1e-12, rtol=0)  # float64, 9-term sums


@pytest.mark.parametrize("case", CASES, ids=str)
def test_every_scale_gets_gradient(case):
    """After one backward at init, every v_b has a non-zero gradient in every output channel."""
    *cfg, _ = case
    m = _branch(_conv(*cfg), generator=torch.Generator().manual_seed(2))
    x = torch.randn(2, cfg[1], *[10] * cfg[0], dtype=torch.float64)
    (m(x) * torch.randn_like(m(x))).sum().backward()
    for b in m.branches:
        grad = getattr(m, f"v_{b}").grad
        assert grad is not None and bool((grad != 0).all()), b


def test_seeded_generator_reproduces():
    """The same generator seed gives the same extra-branch parameters."""
    w = torch.randn(4, 4, 3, 3)
    a = BranchConvNd(w, None, dim=2, padding=1, generator=torch.Generator().manual_seed(3))
    b = BranchConvNd(w, None, dim=2, padding=1, generator=torch.Generator().manual_seed(3))
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb and torch.equal(pa, pb)


def test_mid_channels_option():
    """A wider 1x1_kxk middle (per group) still folds exactly."""
    torch.manual_seed(0)
    conv = _conv(2, 4, 6, 3, 1, 1, 1, 2, "zeros")
    m = _branch(conv, branches=("kxk", "1x1_kxk"), mid_channels=8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        m.v_1x1_kxk.normal_()
    assert m.weight_1x1_kxk_a.shape == (8, 2, 1, 1) and m.weight_1x1_kxk_b.shape == (6, 4, 3, 3)
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    assert_close(m(x), _separate(m, conv, x), atol=1e-12, rtol=0)  # float64


def test_applicable_branches():
    """applicable_branches reports the kinds the constructor builds by default."""
    assert BranchConvNd.applicable_branches(8, 8, 3) == BRANCH_KINDS_CONV
    assert BranchConvNd.applicable_branches(8, 8, 3, stride=2) == ("kxk", "1x1", "1x1_kxk", "1x1_avg")
    assert BranchConvNd.applicable_branches(8, 16, 4) == ("kxk", "1x1_kxk", "1x1_avg")
    assert BranchConvNd.applicable_branches(8, 8, 1) == ("kxk", "identity")
    assert BranchConvNd.applicable_branches(8, 8, (3, 1, 3), dim=3) == BRANCH_KINDS_CONV
    assert BranchLinear.applicable_branches(5, 5) == ("linear", "identity", "lowrank")
    assert BranchLinear.applicable_branches(5, 7) == ("linear", "lowrank")


def test_branch_config_errors():
    """Unknown, inapplicable, duplicate or original-less branch sets raise BranchConfigError."""
    w = torch.randn(6, 4, 3, 3)
    assert issubclass(BranchConfigError, GPDError) and issubclass(BranchConfigError, ValueError)
    with pytest.raises(BranchConfigError, match=r"unknown branch kind 'bogus'.*valid kinds.*'1x1_avg'"):
        BranchConvNd(w, None, dim=2, branches=("kxk", "bogus"))
    with pytest.raises(BranchConfigError, match=r"'identity' does not apply.*6 != 4"):
        BranchConvNd(w, None, dim=2, branches=("kxk", "identity"))
    with pytest.raises(BranchConfigError, match=r"'identity' does not apply.*stride 1"):
        BranchConvNd(torch.randn(4, 4, 3, 3), None, dim=2, stride=2, branches=("kxk", "identity"))
    with pytest.raises(BranchConfigError, match=r"'1x1' does not apply.*even"):
        BranchConvNd(torch.randn(4, 4, 2, 2), None, dim=2, branches=("kxk", "1x1"))
    with pytest.raises(BranchConfigError, match=r"lacks 'kxk'"):
        BranchConvNd(w, None, dim=2, branches=("1x1",))
    with pytest.raises(BranchConfigError, match=r"twice"):
        BranchConvNd(w, None, dim=2, branches=("kxk", "1x1", "1x1"))
    with pytest.raises(BranchConfigError, match=r"'identity' does not apply.*5 != 3"):
        BranchLinear(torch.randn(3, 5), None, branches=("linear", "identity"))
    with pytest.raises(BranchConfigError, match=r"valid kinds.*'lowrank'"):
        BranchLinear(torch.randn(3, 5), None, branches=("linear", "1x1"))
    with pytest.raises(BranchConfigError, match=r"'same' needs stride 1"):
        BranchConvNd(w, None, dim=2, stride=2, padding="same")


def test_linear_fold_and_gradients():
    """BranchLinear: exact at init, equals separate branches, default rank, every v_b gets a gradient."""
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(12, 12, dtype=torch.float64)
    m = BranchLinear(lin.weight, lin.bias, generator=g)
    x = torch.randn(3, 5, 12, dtype=torch.float64)
    assert m.rank == 3 and m.branches == ("linear", "identity", "lowrank")
    assert torch.equal(m.weight, lin.weight) and torch.equal(m(x), lin(x))
    (m(x) * torch.randn(3, 5, 12, dtype=torch.float64)).sum().backward()
    assert all(bool((getattr(m, f"v_{b}").grad != 0).all()) for b in m.branches)
    with torch.no_grad():
        for b in m.branches:
            getattr(m, f"v_{b}").normal_(generator=g)
    ref = (m.v_linear * (x @ lin.weight.T) + m.v_identity * x
           + m.v_lowrank * ((x @ m.lowrank_b.T) @ m.lowrank_a.T) + lin.bias)
    assert_close(m(x), ref, atol=1e-12, rtol=0)  # float64, 12-term dot products
    assert_close(m.fold()(x), m(x), atol=1e-12, rtol=0)
    assert BranchLinear(torch.randn(3, 40), None, rank=2).lowrank_a.shape == (3, 2)


def test_fx_traceable():
    """Both layers trace with torch.fx and the traced graph reproduces the module bitwise."""
    conv = BranchConvNd(torch.randn(4, 4, 3, 3), torch.randn(4), dim=2, padding=1, padding_mode="reflect")
    lin = BranchLinear(torch.randn(6, 6), torch.randn(6))
    for m, x in ((conv, torch.randn(1, 4, 8, 8)), (lin, torch.randn(2, 6))):
        with torch.no_grad():
            for b in m.branches:
                getattr(m, f"v_{b}").normal_()
        traced = torch.fx.symbolic_trace(m)
        # A trace cannot see the input shape, so it folds every branch: bitwise the fold path,
        # and equal to rounding to the per-shape plan of 'auto'.
        assert_close(traced(x), m(x), atol=1e-5, rtol=1e-5)
        m.branch_mode = "fold"
        assert torch.equal(traced(x), m(x))


# ----------------------------------------------------------------- folded vs run branch paths


def _grads(m, x, weight):
    m.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    (m(x) * weight).sum().backward()
    named = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    return named, x.grad.clone()


def _randomise_scales(m, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for b in m.branches:
            getattr(m, f"v_{b}").normal_(generator=g)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_run_paths_equal_fold_values_and_gradients(case):
    """Every branch run on the activations equals the same branch folded into the kernel, in
    value and in the gradient of every parameter and of the input (float64), for each stride,
    dilation, groups and padding mode of CASES; also every mix of one branch run, rest folded."""
    *cfg, _ = case
    torch.manual_seed(0)
    conv = _conv(*cfg)
    m = _branch(conv, generator=torch.Generator().manual_seed(4))
    _randomise_scales(m, 5)
    x = torch.randn(2, cfg[1], *(11, 10, 9)[: cfg[0]], dtype=torch.float64)
    m.branch_mode = "fold"
    assert m.plan(x) == ()
    y_fold = m(x)
    weight = torch.randn_like(y_fold)
    g_fold, gx_fold = _grads(m, x, weight)
    modes = ["run"] + [{k: "run"} for k in m.branches]
    for mode in modes:
        m.branch_mode = mode
        run = m.plan(x)
        assert run == (m.branches if mode == "run" else tuple(mode))
        # float64; each output is a sum of <= ~200 products of O(1) terms: 1e-12 is ~1e3 ulps
        assert_close(m(x), y_fold, atol=1e-12, rtol=0, msg=f"value, run={run}")
        g_run, gx_run = _grads(m, x, weight)
        assert g_run.keys() == g_fold.keys()
        for n in g_fold:
            assert_close(g_run[n], g_fold[n], atol=1e-10, rtol=1e-12, msg=f"grad {n}, run={run}")
        assert_close(gx_run, gx_fold, atol=1e-11, rtol=0, msg=f"input grad, run={run}")


@pytest.mark.parametrize("mode", ["fold", "run", "auto"])
def test_linear_run_paths_equal_fold(mode):
    """BranchLinear: running each branch on the activations equals the fold, values and gradients."""
    lin = nn.Linear(10, 10, dtype=torch.float64)
    m = BranchLinear(lin.weight, lin.bias, generator=torch.Generator().manual_seed(0))
    _randomise_scales(m, 1)
    x = torch.randn(3, 4, 10, dtype=torch.float64)
    m.branch_mode = "fold"
    y_fold = m(x)
    w = torch.randn_like(y_fold)
    g_fold, gx_fold = _grads(m, x, w)
    for run_mode in (mode, {"lowrank": "run"}, {"identity": "run", "linear": "run"}):
        m.branch_mode = run_mode
        assert_close(m(x), y_fold, atol=1e-12, rtol=0)   # float64, 10-term dot products
        g_run, gx_run = _grads(m, x, w)
        for n in g_fold:
            assert_close(g_run[n], g_fold[n], atol=1e-11, rtol=1e-12, msg=n)
        assert_close(gx_run, gx_fold, atol=1e-12, rtol=0)


def test_run_path_exact_at_init():
    """With every branch run, the layer still equals the given conv at init (to rounding: the
    bias is added after the convolution instead of inside it)."""
    conv = _conv(2, 4, 4, 3, 1, 1, 1, 1, "zeros")
    m = _branch(conv, generator=torch.Generator().manual_seed(0), branch_mode="run")
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    assert_close(m(x), conv(x), atol=1e-14, rtol=0)


def test_auto_plan_follows_shape_and_is_cached():
    """'auto' runs the 1x1->kxk branch on a tiny spatial grid and folds it on a large one; the
    decision is cached per input shape."""
    w = torch.randn(256, 256, 3, 3)
    m = BranchConvNd(w, None, dim=2, padding=1, generator=torch.Generator().manual_seed(0))
    small, large = torch.empty(2, 256, 1, 1), torch.empty(2, 256, 64, 64)
    assert "1x1_kxk" in m.plan(small)
    assert "1x1_kxk" not in m.plan(large)
    assert m.plan(large) == ()
    assert set(m._plans) == {((2, 256, 1, 1), torch.float32), ((2, 256, 64, 64), torch.float32)}
    costs = m.plan_costs(small)
    assert set(costs["fold"]) == set(m.branches) and costs["run_branches"] == m.plan(small)


def test_branch_mode_errors_name_the_layer():
    """A bad branch_mode or mid width is a typed error naming the layer and the allowed values."""
    w = torch.randn(6, 4, 3, 3)
    with pytest.raises(BranchConfigError, match=r"layer 'blk.conv'.*branch_mode='sometimes'.*'auto', 'fold', 'run'"):
        BranchConvNd(w, None, dim=2, branch_mode="sometimes", name="blk.conv")
    with pytest.raises(BranchConfigError, match=r"layer 'c'.*'bogus'.*'fold' or 'run'"):
        BranchConvNd(w, None, dim=2, branch_mode={"bogus": "run"}, name="c")
    with pytest.raises(BranchConfigError, match=r"layer 'c'.*mid_channels=3.*multiple of groups=2.*allowed: 2, 4"):
        BranchConvNd(w, None, dim=2, groups=2, mid_channels=3, name="c")
    with pytest.raises(BranchConfigError, match=r"layer 'c': unknown branch kind 'bogus'.*valid kinds"):
        BranchConvNd(w, None, dim=2, branches=("kxk", "bogus"), name="c")


def _interleaved_source(out, cin_g, r, dims):
    from gpd_fx.passes.student_map import ParamSource

    return ParamSource("w", "", "weight", out=(0, torch.arange(out // r) * r),
                       inp=(1, torch.arange(cin_g) // r, cin_g // r))


@pytest.mark.parametrize("case", [c for c in CASES if (c[2] // 2) % c[7] == 0 and (c[1] // c[7]) % 2 == 0
                                  and c[2] % 2 == 0], ids=str)
def test_mapped_weight_equals_map_of_fold(case):
    """The student map computed per branch at student size equals the map of the folded kernel,
    in value and gradient (float64), for an interleaved r=2 source."""
    from gpd_fx.passes.student_map import map_tensor

    *cfg, _ = case
    conv = _conv(*cfg)
    m = _branch(conv, generator=torch.Generator().manual_seed(6))
    _randomise_scales(m, 7)
    src = _interleaved_source(m.out_channels, m.in_channels // m.groups, 2, cfg[0])
    ref = map_tensor(m.effective_weight(), src)
    got = m.mapped_weight(src)
    assert_close(got, ref, atol=1e-12, rtol=0)   # float64, O(10)-term sums
    w = torch.randn_like(ref)
    g_ref = torch.autograd.grad((ref * w).sum(), list(m.parameters()), allow_unused=True)
    g_got = torch.autograd.grad((m.mapped_weight(src) * w).sum(), list(m.parameters()), allow_unused=True)
    for a, b in zip(g_ref, g_got):
        assert (a is None) == (b is None) or (a is not None and not a.any()) or (b is not None and not b.any())
        if a is not None and b is not None:
            assert_close(b, a, atol=1e-12, rtol=0)


# ------------------------------------------------------------------ student map and joint step


def _index_map(t, src):
    """The map by its definition with gathers and scatters (reference for the strided paths)."""
    if src.out is not None:
        t = t.index_select(src.out[0], src.out[1])
    if src.inp is not None:
        dim, idx, width = src.inp
        shape = list(t.shape)
        shape[dim] = width
        t = t.new_zeros(shape).index_add(dim, idx, t)
    return t * src.scale


@pytest.mark.parametrize("r", [2, 3])
@pytest.mark.parametrize("kind", ["weight", "vector", "inp_only", "single_row"])
def test_map_and_shared_map_match_definition(r, kind):
    """map_tensor's strided forward/backward and share_map's fused backward equal the map's
    definition (gather output copy 0, scatter-add input copies), in float64."""
    from gpd_fx.passes.student_map import ParamSource, map_tensor, share_map

    shape = {"weight": (4 * r, 3 * r, 3, 3), "vector": (4 * r,), "inp_only": (5, 3 * r), "single_row": (1, 3 * r)}[kind]
    out = None if kind == "inp_only" else (0, torch.tensor([0]) if kind == "single_row" else torch.arange(4) * r)
    inp = None if kind == "vector" else (1, torch.arange(3 * r) // r, 3)
    src = ParamSource("s", "", "w", out=out, inp=inp, scale=0.75)
    t = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    ref = _index_map(t, src)
    got = map_tensor(t, src)
    assert_close(got, ref, atol=1e-15, rtol=0)   # float64: the same r-term sums
    w = torch.randn_like(ref)
    (g_ref,) = torch.autograd.grad((ref * w).sum(), t)
    (g_got,) = torch.autograd.grad((map_tensor(t, src) * w).sum(), t)
    assert torch.equal(g_got, g_ref)
    # fused: the alias feeds a teacher-side use, the map a student-side one
    aliases, mapped = share_map([t], [src])
    wt = torch.randn_like(t)
    (g_shared,) = torch.autograd.grad((aliases[0] * wt).sum() + (mapped[0] * w).sum(), t)
    assert_close(g_shared, g_ref + wt, atol=1e-15, rtol=0)
    # only the map used: the teacher-sized gradient is built from zeros
    aliases, mapped = share_map([t], [src])
    (g_only,) = torch.autograd.grad((mapped[0] * w).sum(), t)
    assert torch.equal(g_only, g_ref)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.b1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.c3 = nn.Conv2d(8, 8, 3, stride=2, padding=1, padding_mode="reflect")
        self.fc = nn.Linear(8, 8)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = x + torch.relu(self.c2(x))
        x = self.c3(x).mean((2, 3))
        return self.head(torch.relu(self.fc(x)) + x)


@pytest.mark.parametrize("mode", ["fold", "run", "auto"])
@pytest.mark.parametrize("mid", ["teacher", "student", 0.5])
def test_joint_equals_separate_teacher_and_student(mode, mid):
    """dt.joint (fused map, student kernel computed during the teacher forward) gives the same
    outputs and parameter gradients as dt(x) and dt.student(x) called separately, for every
    fold/run policy and middle width (float64)."""
    import copy

    import gpd_fx

    torch.manual_seed(0)
    net = _Net().double()
    dt = gpd_fx.expand(net, ratio=2, example_inputs=(torch.randn(2, 3, 8, 8, dtype=torch.float64),),
                       branches={"mid": mid, "mode": mode}).train()
    randomize_branch_scales(dt)
    ref = copy.deepcopy(dt)
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    t, s = dt.joint(x)
    _assert_joint_matches_separate_calls(dt, ref, x, t, s)


def test_bad_mid_is_a_typed_error_naming_the_layer():
    """A middle width that does not divide a layer's groups names the layer and the allowed values."""
    import gpd_fx

    net = _Net()
    with pytest.raises(BranchConfigError, match=r"layer 'c2'.*middle width 3.*multiple of groups=2.*allowed"):
        gpd_fx.expand(net, ratio=2, example_inputs=(torch.randn(1, 3, 8, 8),), branches={"mid": 3})
    with pytest.raises(BranchConfigError, match=r"branches\['mid'\]='wide'; allowed: \('student', 'teacher'\)"):
        gpd_fx.expand(net, ratio=2, example_inputs=(torch.randn(1, 3, 8, 8),), branches={"mid": "wide"})
    with pytest.raises(BranchConfigError, match=r"unknown branch kind 'bogus'.*conv kinds.*linear kinds"):
        gpd_fx.expand(net, ratio=2, example_inputs=(torch.randn(1, 3, 8, 8),), branches=["kxk", "bogus"])


def test_report_teacher_cost_matches_ir_teacher():
    """dt.report.teacher_cost gives the IR teacher's parameters and forward FLOPs exactly (as an
    IR-only expand and torch's FLOP counter measure them) next to the CBR teacher's, and the
    fold/run split of every multi-branch layer."""
    import gpd_fx
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    net = _Net()
    x = torch.randn(2, 3, 8, 8)
    ir = gpd_fx.expand(net, ratio=2, example_inputs=(x,), branches=())
    dt = gpd_fx.expand(net, ratio=2, example_inputs=(x,), branches={"mode": "run"})
    assert ir.report.teacher_cost is None
    cost = dt.report.teacher_cost
    with torch.no_grad(), FlopCounterMode(display=False) as fc_ir:
        ir.teacher.eval()(x)
    assert cost["ir_params"] == ir.report.teacher_params
    assert cost["params"] == dt.report.teacher_params > cost["ir_params"]
    assert cost["ir_flops"] == fc_ir.get_total_flops()
    assert cost["flops"] > cost["ir_flops"]
    assert set(cost["layers"]) == {"c1", "c2", "c3", "fc", "head"}   # head: input widened, lowrank applies
    assert all(p["fold"] == [] and p["run"] for p in cost["layers"].values())
    assert "CBR teacher vs IR teacher" in str(dt.report)


@pytest.mark.parametrize("dim,size,k,stride,pad,dil,groups", [
    (2, 1, 3, 1, 1, 1, 1), (2, 2, 3, 2, 1, 1, 1), (2, 2, 3, 1, 1, 1, 4), (2, 5, 5, 1, 2, 2, 1),
    (1, 2, 3, 1, (1, 2), 1, 1), (3, 1, 3, 1, 1, 1, 2), (2, 5, 3, 2, 1, 1, 1), (2, 4, 1, 2, 0, 1, 1),
    (2, 4, 1, 1, 0, 1, 2), (2, 1, 3, 1, 4, 1, 1),
])
def test_conv_nd_equals_conv(dim, size, k, stride, pad, dil, groups):
    """conv_nd (dead taps cut, 1x1 as matmul, explicit padding) equals F.conv in value and
    gradients, including maps smaller than the kernel (float64)."""
    from gpd_fx.passes.branches import conv_nd

    torch.manual_seed(0)
    pads = (pad if isinstance(pad, tuple) else (pad, pad),) * dim
    x = torch.randn(2, 8, *(size,) * dim, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, 8 // groups, *(k,) * dim, dtype=torch.float64, requires_grad=True)
    b = torch.randn(8, dtype=torch.float64, requires_grad=True)
    conv = (F.conv1d, F.conv2d, F.conv3d)[dim - 1]
    ref = conv(F.pad(x, [p for lr in reversed(pads) for p in lr]), w, b, stride, 0, dil, groups)
    got = conv_nd(x, w, b, (stride,) * dim, pads, (dil,) * dim, groups)
    assert_close(got, ref, atol=1e-12, rtol=0)   # float64, <= 200-term sums
    gy = torch.randn_like(ref)
    g_ref = torch.autograd.grad((ref * gy).sum(), (x, w, b))
    g_got = torch.autograd.grad((got * gy).sum(), (x, w, b))
    for a, c in zip(g_got, g_ref):
        assert_close(a, c, atol=1e-12, rtol=0)


@pytest.mark.parametrize("mode", ["auto", "run"])
def test_joint_step_compiles_without_graph_breaks(mode):
    """A GPD step over a multi-branch teacher is one Dynamo graph, also on a fresh copy whose
    per-source caches were never used eagerly (they are filled when the teacher is built)."""
    import copy

    import torch._dynamo

    import gpd_fx
    from gpd_fx.losses import GPDLossConfig, gpd_loss

    torch.manual_seed(0)
    dt = gpd_fx.expand(_Net(), ratio=2, example_inputs=(torch.randn(2, 3, 8, 8),), branches={"mode": mode})
    dt = copy.deepcopy(dt).train()
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))
    cfg = GPDLossConfig()
    torch._dynamo.reset()
    explained = torch._dynamo.explain(lambda a, b: gpd_loss(*dt.joint(a), b, cfg)[0])(x, y)
    assert explained.graph_break_count == 0, [b.reason.splitlines()[0] for b in explained.break_reasons]


def test_joint_gradient_of_a_parameter_added_in_the_graph():
    """A parameter added to an activation of the same shape (its gradient is the activation's
    gradient itself) gets the same gradients in dt.joint as in separate calls: the fused map must
    not update that shared gradient in place."""
    import copy

    import gpd_fx

    class PosNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 6)
            self.pos = nn.Parameter(torch.randn(1, 3, 6))
            self.head = nn.Linear(6, 2)

        def forward(self, x):          # x: (1, 3, 4): batch 1, so x + pos needs no broadcast
            return self.head(torch.relu(self.proj(x) + self.pos)).sum(1)

    torch.manual_seed(0)
    net = PosNet().double()
    dt = gpd_fx.expand(net, ratio=2, example_inputs=(torch.randn(1, 3, 4, dtype=torch.float64),))
    ref = copy.deepcopy(dt)
    x = torch.randn(1, 3, 4, dtype=torch.float64)
    t, s = dt.joint(x)
    (t.sum() + 3 * s.sum()).backward()
    (ref(x).sum() + 3 * ref.student(x).sum()).backward()
    for (n, p), q in zip(dt.named_parameters(), ref.parameters()):
        assert_close(p.grad, q.grad, atol=1e-12, rtol=0, msg=n)   # float64, same sums


@pytest.mark.parametrize("shape", [(6, 4, 3, 3), (5, 7), (4, 2, 3)])
def test_scale_rows_equals_broadcast_product(shape):
    """``scale_rows`` (row-wise dot backward) equals ``w * v[:, None, ...]`` in value and in both
    gradients (float64), and passes gradcheck."""
    from gpd_fx.passes.branches import scale_rows

    g = torch.Generator().manual_seed(0)
    w = torch.randn(shape, dtype=torch.float64, generator=g, requires_grad=True)
    v = torch.randn(shape[0], dtype=torch.float64, generator=g, requires_grad=True)
    up = torch.randn(shape, dtype=torch.float64, generator=g)
    got = scale_rows(w, v)
    want = w * v.view((-1,) + (1,) * (w.dim() - 1))
    assert_close(got, want, atol=0, rtol=0)
    gw, gv = torch.autograd.grad((got * up).sum(), (w, v))
    rw, rv = torch.autograd.grad((want * up).sum(), (w, v))
    assert_close(gw, rw, atol=0, rtol=0)
    assert_close(gv, rv, atol=1e-12, rtol=1e-12)
    assert torch.autograd.gradcheck(scale_rows, (w, v))


class _SmallMaps(nn.Module):
    """Convs on 2x2 and 1x1 maps (most 3x3 taps read only padding), one of them called twice,
    one 5x5 with dilation whose centre tap is dead at stride 2, and a 'same'-padded one."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)      # 4x4 -> 2x2
        self.c2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)      # 2x2 -> 1x1: taps (1..2, 1..2)
        self.c3 = nn.Conv2d(8, 8, 3, padding=1)                # 1x1: the centre only
        self.c4 = nn.Conv2d(8, 8, 3, padding=1)                # called twice
        self.c5 = nn.Conv2d(8, 8, 3, padding="same")
        self.c6 = nn.Conv2d(8, 8, (1, 5), padding=(0, 4), dilation=(1, 2))
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.bn(self.c1(x)))
        y = torch.relu(self.c2(x))
        y = torch.relu(self.c3(y)) + y
        y = self.c4(self.c4(y)) + self.c5(y)
        y = self.c6(y)
        return self.head(y.mean((2, 3)))


def _student_kernel_calls(monkeypatch) -> list[tuple[bool, bool]]:
    """Record ``(a box was given, unbox)`` of every student kernel fold from now on."""
    from gpd_fx.passes.branches import BranchConvNd

    calls = []
    orig = BranchConvNd._student_kernel

    def record(self, src, mapped, box=None, unbox=True, **kw):
        calls.append((box is not None, unbox))
        return orig(self, src, mapped, box, unbox, **kw)

    monkeypatch.setattr(BranchConvNd, "_student_kernel", record)
    return calls


@pytest.mark.parametrize("mode", ["fold", "auto"])
def test_joint_student_kernel_of_live_taps_is_exact(mode, monkeypatch):
    """In dt.joint the student kernel of a conv on a small map is folded over its live taps only
    (zero elsewhere): outputs and every teacher gradient equal the separate dt(x), dt.student(x)
    (full kernels) in float64; the cut is taken where allowed and never for the layer called twice."""
    import copy

    import gpd_fx
    from gpd_fx.passes.branches import BranchConvNd

    torch.manual_seed(0)
    net = _SmallMaps().double()
    dt = gpd_fx.expand(net, ratio=2, example_inputs=(torch.randn(2, 3, 4, 4, dtype=torch.float64),),
                       branches={"mode": mode}).train()
    randomize_branch_scales(dt)
    cut = {n: m.__dict__.get("_student_cut") for n, m in dt.teacher.named_modules() if isinstance(m, BranchConvNd)}
    assert cut["c4"] is False and cut["c3"] is True and cut["c2"] is True, cut
    calls = _student_kernel_calls(monkeypatch)
    ref = copy.deepcopy(dt)
    paddings = {n: m.padding for n, m in dt.template.named_modules() if isinstance(m, nn.Conv2d)}
    x = torch.randn(4, 3, 4, 4, dtype=torch.float64)
    t, s = dt.joint(x)
    boxes = [unbox for has_box, unbox in calls if has_box]
    assert len(boxes) >= 2, boxes        # c2 and c3 (and c5) at least
    # symmetric cuts run box-shaped with the student conv's padding cut (restored after)
    assert False in boxes, boxes
    assert paddings == {n: m.padding for n, m in dt.template.named_modules() if isinstance(m, nn.Conv2d)}
    assert not any("forward" in m.__dict__ for m in dt.template.modules())
    _assert_joint_matches_separate_calls(dt, ref, x, t, s)


def test_share_map_of_a_box_is_the_map_of_the_sliced_tensor():
    """``share_map`` with a box maps only those taps (the map acts on channels and commutes with
    slicing) and adds the student's box gradient into that box of the teacher gradient's rows:
    values and gradients equal plain autograd through ``map_tensor(t[box])`` (float64), and
    ``dt.joint`` maps the student kernel of a conv on a 1x1 map box-shaped."""
    import gpd_fx
    from gpd_fx.passes.branches import BranchConvNd
    from gpd_fx.passes.student_map import map_tensor, share_map

    torch.manual_seed(0)
    net = _SmallMaps().double()
    dt = gpd_fx.expand(net, ratio=2, example_inputs=(torch.randn(2, 3, 4, 4, dtype=torch.float64),),
                       branches={"mode": "fold"}).train()
    src, layer, _ = next(item for item in dt._lazy_kernels() if item[0].module == "c3")
    t = layer.weight_kxk.detach().clone().requires_grad_(True)
    box = (slice(None), slice(None), slice(1, 2), slice(1, 2))
    (alias,), (mapped,) = share_map([t], [src], [box])
    want_mapped = map_tensor(t.detach()[box], src)
    assert mapped.shape == want_mapped.shape and torch.equal(mapped, want_mapped)
    c1, c2 = torch.randn_like(alias), torch.randn_like(mapped)
    (g,) = torch.autograd.grad((alias * c1).sum() + (mapped * c2).sum(), t)
    (want,) = torch.autograd.grad((t * c1).sum() + (map_tensor(t[box], src) * c2).sum(), t)
    assert_close(g, want, atol=0, rtol=0)

    shapes = []
    orig = BranchConvNd._fold_kernel

    def record(self, kinds, tt, v, ident, box=None):
        if box is not None:
            shapes.append(tuple(tt["kxk"].shape[2:]))
        return orig(self, kinds, tt, v, ident, box)

    import unittest.mock
    with unittest.mock.patch.object(BranchConvNd, "_fold_kernel", record):
        dt.joint(torch.randn(4, 3, 4, 4, dtype=torch.float64))
    assert (1, 1) in shapes, shapes    # c3's student kxk arrives mapped box-shaped


def test_student_kernel_of_live_taps_at_call_is_exact(monkeypatch):
    """dt.student maps the weights of cut-eligible convs when they are called, over the live taps
    of that input: outputs and teacher gradients equal running the template on the full mapped
    state (float64); afterwards the template holds its own weights again and no hook is left."""
    import copy

    import gpd_fx
    from torch.func import functional_call

    from gpd_fx.passes.branches import BranchConvNd

    torch.manual_seed(0)
    net = _SmallMaps().double()
    dt = gpd_fx.expand(net, ratio=2, example_inputs=(torch.randn(2, 3, 4, 4, dtype=torch.float64),),
                       branches=None).train()
    randomize_branch_scales(dt)
    ref = copy.deepcopy(dt)
    cuts, unboxed = [], []
    orig_cut, orig_unbox = BranchConvNd.student_cut, BranchConvNd._unbox
    monkeypatch.setattr(BranchConvNd, "student_cut", lambda self, x: cuts.append(orig_cut(self, x)) or cuts[-1])
    monkeypatch.setattr(BranchConvNd, "_unbox", lambda self, k, box: unboxed.append(box) or orig_unbox(self, k, box))
    before = {n: p for n, p in dt.template.named_parameters()}
    pads = {n: m.padding for n, m in dt.template.named_modules() if isinstance(m, nn.Conv2d)}
    x = torch.randn(4, 3, 4, 4, dtype=torch.float64)
    s = dt.student(x)
    cut = [c for c in cuts if c is not None]
    assert len(cut) >= 2, cuts
    # symmetric cuts run the box-shaped kernel with cut padding (no full kernel); others unbox
    assert len(unboxed) == sum(1 for _, p in cut if any(left != right for left, right in p)), (cut, unboxed)
    assert len(unboxed) < len(cut)
    assert {n: p for n, p in dt.template.named_parameters()} == before
    assert {n: m.padding for n, m in dt.template.named_modules() if isinstance(m, nn.Conv2d)} == pads
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in dt.template.modules())
    s_ref = functional_call(ref.template, ref.student_state_dict(), (x,), tie_weights=True, strict=False)
    assert_close(s, s_ref, atol=1e-12, rtol=0)
    _assert_same_teacher_grads(dt, ref, (s, s_ref))
    # eval mode (running statistics) and no grad take the same path
    dt.eval(), ref.eval()
    with torch.no_grad():
        assert_close(dt.student(x), functional_call(ref.template, ref.student_state_dict(), (x,),
                                                    tie_weights=True, strict=False), atol=1e-12, rtol=0)


def _assert_same_teacher_grads(dt, ref, *pairs):
    """Backward of the same random projection of each ``(out, out_ref)`` pair: every teacher
    gradient of ``dt`` equals ``ref``'s (float64: sums of <= ~1e3 products, 1e-11 is ~1e5 ulps
    of O(1))."""
    ws = [torch.randn_like(o) for o, _ in pairs]
    sum((o * w).sum() for (o, _), w in zip(pairs, ws)).backward()
    sum((o_ref * w).sum() for (_, o_ref), w in zip(pairs, ws)).backward()
    for (n, p), q in zip(dt.named_parameters(), ref.parameters()):
        assert (p.grad is None) == (q.grad is None), n
        if p.grad is not None:
            assert_close(p.grad, q.grad, atol=1e-11, rtol=1e-12, msg=n)


def _assert_joint_matches_separate_calls(dt, ref, x, t, s):
    """``(t, s) = dt.joint(x)`` equals ``ref(x), ref.student(x)`` on an unchanged copy ``ref`` of
    ``dt``, in value and in every teacher gradient (float64: the same ops up to summation order)."""
    from torch.func import functional_call

    t_ref, s_ref = ref(x), ref.student(x)
    assert_close(t, t_ref, atol=1e-12, rtol=0)
    assert_close(s, s_ref, atol=1e-12, rtol=0)
    # and independently of the live-tap machinery: the user's module on the full mapped kernels
    with torch.no_grad():
        plain = functional_call(ref.template, ref.student_state_dict(), (x,))
    assert_close(s.detach(), plain, atol=1e-12, rtol=0)
    _assert_same_teacher_grads(dt, ref, (t, t_ref), (s, s_ref))


class _TinyMapsNd(nn.Module):
    """Convs of one dimensionality on maps of 1-2 pixels per dim: strided, dilated, grouped."""

    def __init__(self, dim: int, groups: int):
        super().__init__()
        conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dim - 1]
        self.dim = dim
        self.c1 = conv(3, 8, 3, stride=2, padding=1)                    # 4 -> 2 per dim
        self.c2 = conv(8, 8, 3, stride=2, padding=1, groups=groups)     # 2 -> 1: taps 1..2
        self.c3 = conv(8, 8, 3, padding=2, dilation=2, groups=groups)   # 1: the centre only
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        y = torch.relu(self.c2(torch.relu(self.c1(x))))
        y = self.c3(y) + y
        return self.head(y.flatten(2).mean(2))


@pytest.mark.parametrize("dim,groups", [(1, 1), (2, 2), (3, 1)])
def test_joint_live_tap_cuts_are_exact_in_every_dimensionality(dim, groups, monkeypatch):
    """The live-tap cuts of dt.joint (box kernels with cut padding through conv_nd, maps of the
    box only) on 1-D, grouped 2-D and 3-D convs equal the separate calls and the user's module
    on the full mapped kernels, in value and every teacher gradient (float64)."""
    import copy

    import gpd_fx

    torch.manual_seed(0)
    net = _TinyMapsNd(dim, groups).double()
    shape = (2, 3) + (4,) * dim
    dt = gpd_fx.expand(net, ratio=2, example_inputs=(torch.randn(*shape, dtype=torch.float64),),
                       branches=None).train()
    randomize_branch_scales(dt)
    ref = copy.deepcopy(dt)
    x = torch.randn(*shape, dtype=torch.float64)
    calls = _student_kernel_calls(monkeypatch)
    t, s = dt.joint(x)
    boxed = [has_box and not unbox for has_box, unbox in calls]
    assert boxed.count(True) >= 2, boxed          # c2 (taps 1..2) and c3 (centre) run box-shaped
    _assert_joint_matches_separate_calls(dt, ref, x, t, s)


def test_a_user_forward_on_a_student_conv_is_kept_and_run():
    """A forward the user puts on a student conv's instance after the first step is called in
    dt.joint and dt.student (its conv gets a full, eagerly mapped kernel) and is still there
    after; outputs equal the user's module on the mapped kernels (float64)."""
    import gpd_fx
    from torch.func import functional_call

    torch.manual_seed(0)
    net = _SmallMaps().double()
    dt = gpd_fx.expand(net, ratio=2, example_inputs=(torch.randn(2, 3, 4, 4, dtype=torch.float64),),
                       branches=None).train()
    randomize_branch_scales(dt)
    x = torch.randn(4, 3, 4, 4, dtype=torch.float64)
    dt.joint(x)                                  # the lazy kernels are cached here
    assert any(item[2] is dt.template.c3 for item in dt._lazy_kernels())
    conv = dt.template.c3
    calls = []

    def forward(inp, _conv=conv):
        calls.append(tuple(_conv.weight.shape))
        return type(_conv).forward(_conv, inp)

    conv.forward = forward
    t, s = dt.joint(x)
    s2 = dt.student(x)
    assert calls == [(8, 8, 3, 3)] * 2, calls     # called, with the full kernel, both times
    assert conv.__dict__.get("forward") is forward
    with torch.no_grad():
        want = functional_call(dt.template, dt.student_state_dict(), (x,))
    assert_close(s.detach(), want, atol=1e-12, rtol=0)
    assert_close(s2.detach(), want, atol=1e-12, rtol=0)


def test_pooled_buffers_are_released_on_a_dtype_move():
    """A multi-branch teacher keeps gradient storage between steps; ``release_buffers()`` and a
    move to another dtype drop it, and the next step is still exact."""
    import gpd_fx

    torch.manual_seed(0)
    dt = gpd_fx.expand(_SmallMaps(), ratio=2, example_inputs=(torch.randn(2, 3, 4, 4),), branches=None).train()
    x = torch.randn(4, 3, 4, 4)

    def pooled():   # the (tag, shape, dtype, device) keys of every pooled buffer
        pools = [p for m in dt.teacher.modules() for p in m.__dict__.get("_grad_pools", {}).values()]
        pools += [s.__dict__["_grad_pool"] for s in dt.sources if "_grad_pool" in s.__dict__]
        return [key for pool in pools for key in pool.by_key]

    t, s = dt.joint(x)
    (t.sum() + s.sum()).backward()
    assert pooled(), "nothing was pooled"
    dt.zero_grad(set_to_none=True)
    dt.double()
    assert pooled() == []
    xd = x.double()
    t, s = dt.joint(xd)
    (t.sum() + s.sum()).backward()
    assert pooled() and {key[2] for key in pooled()} == {torch.float64}
    assert {p.grad.dtype for p in dt.parameters() if p.grad is not None} == {torch.float64}
    dt.release_buffers()
    assert pooled() == []


def test_box_slice_equals_indexing_in_value_and_gradient():
    """``_BoxSlice`` (one full-size gradient write) is ``w[box]``: same values, same gradient
    (zero outside the box), and gradcheck and gradgradcheck pass."""
    from gpd_fx.passes.branches import _BoxSlice

    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    w3 = torch.randn(4, 3, 3, 3, 3, dtype=torch.float64, requires_grad=True)          # a 3-D kernel
    strided = torch.randn(3, 4, 3, 3, dtype=torch.float64).transpose(0, 1).requires_grad_(True)
    cases = [(w, (slice(None), slice(None), slice(1, 2), slice(1, 2))),
             (w, (slice(None), slice(None), slice(0, 2), slice(1, 3))),
             (w3, (slice(None), slice(None), slice(1, 3), slice(0, 2), slice(1, 2))),
             (strided, (slice(None), slice(None), slice(1, 3), slice(1, 3)))]
    for w, box in cases:
        got = _BoxSlice.apply(w, box)
        assert torch.equal(got, w[box]) and got.is_contiguous()
        g = torch.randn_like(got)
        (gw,) = torch.autograd.grad(got, w, g)
        (want,) = torch.autograd.grad(w[box], w, g)
        assert torch.equal(gw, want)
        torch.autograd.gradcheck(lambda t: _BoxSlice.apply(t, box), (w,))
        # differentiable backward: double backward (and torch.func) work as with plain indexing
        torch.autograd.gradgradcheck(lambda t: _BoxSlice.apply(t, box), (w,))


def test_live_taps_trim_unread_right_padding_to_a_symmetric_cut():
    """A strided 3x3 (padding 1) on a 2x2 map reads taps 1-2 of each dim and never the right
    padding: the cut is the 2x2 box without padding (it was a (0, 1) asymmetric cut, which no
    conv call can use); a 3x3 on a 1x1 map keeps its centre; full-map convs are not cut."""
    from gpd_fx.passes.branches import _live_taps

    assert _live_taps((2, 2), (3, 3), (2, 2), ((1, 1), (1, 1)), (1, 1)) == (((1, 3), (1, 3)), ((0, 0), (0, 0)))
    assert _live_taps((1, 1), (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1)) == (((1, 2), (1, 2)), ((0, 0), (0, 0)))
    assert _live_taps((4, 4), (3, 3), (2, 2), ((1, 1), (1, 1)), (1, 1)) is None   # every tap live
    assert _live_taps((2, 2), (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1)) is None


@pytest.mark.parametrize("size,stride,k_cols", [(1, 1, 8), (2, 2, 32)])
def test_conv_nd_on_tiny_maps_multiplies_live_taps_only(size, stride, k_cols):
    """On a 1x1 map a 3x3 conv's GEMM has ``cin`` columns (the centre tap), not ``9 cin``; a
    strided one on a 2x2 map ``4 cin``: the products with padding are not computed, in the
    forward or either gradient, and the kernel's gradient is still the full kernel's (zero at
    the dead taps)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from gpd_fx.passes.branches import conv_nd

    class Shapes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.k = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default):
                a, b = args[-2], args[-1]
                self.k.append(max(a.shape[-1], b.shape[-1]) if a.shape[-1] != b.shape[-2] else a.shape[-1])
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    x = torch.randn(2, 8, size, size, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 8, 3, 3, dtype=torch.float64, requires_grad=True)
    with Shapes() as mode:
        y = conv_nd(x, w, None, (stride, stride), ((1, 1), (1, 1)), (1, 1), 1)
        gx, gw = torch.autograd.grad(y.sum(), (x, w))
    assert mode.k and max(mode.k) <= k_cols, mode.k
    ref = F.conv2d(x, w, None, stride, 1)
    rx, rw = torch.autograd.grad(ref.sum(), (x, w))
    assert_close(y, ref, atol=1e-12, rtol=0)
    assert_close(gx, rx, atol=1e-12, rtol=0)
    assert torch.equal(gw == 0, rw == 0) and gw.shape == w.shape
    assert_close(gw, rw, atol=1e-12, rtol=0)


def test_box_slice_gradient_on_pooled_storage_is_a_fresh_ones():
    """With a pool the full-size gradient of ``_BoxSlice`` reuses the storage once nothing holds
    it; whatever was written outside the box in between (``.data``, ``-0.0``, NaN) is gone: bit
    for bit the plain gradient. A gradient still held is never overwritten."""
    from gpd_fx.passes import student_map as SM
    from gpd_fx.passes.branches import _BoxSlice

    pool = SM._GradPool()
    w = torch.randn(64, 64, 3, 3, dtype=torch.float64, requires_grad=True)   # 295 KB: the check path
    box = (slice(None), slice(None), slice(1, 2), slice(1, 2))
    ptrs = []
    for step, how in enumerate(["", "data", "negzero", "nan", ""]):
        g = torch.randn(64, 64, 1, 1, dtype=torch.float64)
        _BoxSlice.apply(w, box, pool).backward(g)
        (want,) = torch.autograd.grad(w[box], w, g)
        assert torch.equal(w.grad.view(torch.int64), want.view(torch.int64)), (step, how)
        ptrs.append(w.grad.data_ptr())
        if how == "data":
            w.grad.data[:, :, 0, 0] = 1.0
        elif how == "negzero":
            w.grad.data[:, :, 2, 2] = -0.0
        elif how == "nan":
            w.grad.data[0, 0, 0, 1] = float("nan")
        if step < 4:
            w.grad = None
    assert len(set(ptrs)) == 1, "the pooled storage was not reused"
    held = w.grad                      # kept: the next backward must not write into it
    saved = held.clone()
    w.grad = None
    _BoxSlice.apply(w, box, pool).backward(torch.ones(64, 64, 1, 1, dtype=torch.float64))
    assert torch.equal(held, saved) and w.grad.data_ptr() != held.data_ptr()


def _student_run_calls(monkeypatch):
    """Record each student conv call that runs branches on the activations."""
    from gpd_fx.passes.branches import BranchConvNd

    calls = []
    orig = BranchConvNd.student_run_term
    monkeypatch.setattr(BranchConvNd, "student_run_term",
                        lambda self, *a, **k: calls.append(self) or orig(self, *a, **k))
    return calls


@pytest.mark.parametrize("mode", ["run", "auto"])
def test_student_runs_small_map_branches_on_activations_exactly(mode, monkeypatch):
    """Where the student's conv runs the 1x1->kxk branch on its activations (the student-width
    images of the branch's two factors) instead of folding it into its kernel, dt.student and
    dt.joint equal the folded student (functional_call on the mapped state) in value and every
    teacher gradient, float64, train and eval; the run path is taken on the small maps; the
    template keeps its weights, padding and forward, and no hook is left."""
    import copy

    import gpd_fx
    from torch.func import functional_call

    torch.manual_seed(0)
    net = _SmallMaps().double()
    dt = gpd_fx.expand(net, ratio=2, example_inputs=(torch.randn(2, 3, 4, 4, dtype=torch.float64),),
                       branches={"mode": mode}).train()
    randomize_branch_scales(dt)
    ref = copy.deepcopy(dt)
    calls = _student_run_calls(monkeypatch)
    before = {n: p for n, p in dt.template.named_parameters()}
    pads = {n: m.padding for n, m in dt.template.named_modules() if isinstance(m, nn.Conv2d)}
    x = torch.randn(4, 3, 4, 4, dtype=torch.float64)

    def folded(m):
        return functional_call(m.template, m.student_state_dict(), (x,), tie_weights=True, strict=False)

    for train in (True, False):
        dt.train(train), ref.train(train)
        for p in list(dt.parameters()) + list(ref.parameters()):
            p.grad = None
        calls.clear()
        s, s_ref = dt.student(x), folded(ref)
        if mode == "run":
            assert len(calls) >= 3, calls           # c2, c3, c5 (c4 is called twice: folded)
        assert_close(s, s_ref, atol=1e-12, rtol=1e-12)
        _assert_same_teacher_grads(dt, ref, (s, s_ref))
        # joint: the teacher forward computes the student's branch images; same values/gradients
        for p in list(dt.parameters()) + list(ref.parameters()):
            p.grad = None
        n_before = len(calls)
        t, s = dt.joint(x)
        if mode == "run":
            assert len(calls) - n_before >= 3
        t_ref, s_ref = ref(x), folded(ref)
        assert_close(t, t_ref, atol=1e-12, rtol=1e-12)
        assert_close(s, s_ref, atol=1e-12, rtol=1e-12)
        _assert_same_teacher_grads(dt, ref, (t, t_ref), (s, s_ref))
    assert {n: p for n, p in dt.template.named_parameters()} == before
    assert {n: m.padding for n, m in dt.template.named_modules() if isinstance(m, nn.Conv2d)} == pads
    assert all(not m._forward_pre_hooks and not m._forward_hooks and "forward" not in m.__dict__
               for m in dt.template.modules())
    # the user-visible student parameters are the folded map, untouched by the run path (the BN
    # statistics saw outputs equal up to rounding)
    got = dt.student_state_dict()
    for k, v in ref.student_parameters().items():
        assert_close(got[k], v, atol=0, rtol=0, msg=k)
    for k, v in ref.student_state.as_dict().items():
        assert_close(got[k], v, atol=1e-12, rtol=1e-12, msg=k)


def test_student_run_path_gradcheck():
    """gradcheck of dt.student through the run path, in the 1x1->kxk factors of one layer."""
    import gpd_fx
    from gpd_fx.passes.branches import BranchConvNd

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1)).double()
    dt = gpd_fx.expand(net, ratio=2, example_inputs=(torch.randn(2, 2, 2, 2, dtype=torch.float64),),
                       branches={"mode": "run"}).eval()
    randomize_branch_scales(dt)
    layer = dt.teacher.get_submodule("2")
    assert isinstance(layer, BranchConvNd) and layer.__dict__.get("_student_cut")
    x = torch.randn(3, 2, 2, 2, dtype=torch.float64)

    def f(a, b, v):
        saved = dict(layer._parameters)
        layer._parameters.update(weight_1x1_kxk_a=a, weight_1x1_kxk_b=b, v_1x1_kxk=v)
        try:
            return dt.student(x)
        finally:
            layer._parameters.update(saved)

    args = tuple(layer._parameters[k].detach().clone().requires_grad_()
                 for k in ("weight_1x1_kxk_a", "weight_1x1_kxk_b", "v_1x1_kxk"))
    assert torch.autograd.gradcheck(f, args)


def test_student_run_path_is_not_taken_under_compile(monkeypatch):
    """Under torch.compile (eager backend: Dynamo only) dt.student and dt.joint keep the folded
    student path (no run term traced) and equal the eager results."""
    import gpd_fx

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1)).double()
    dt = gpd_fx.expand(net, ratio=2, example_inputs=(torch.randn(2, 2, 2, 2, dtype=torch.float64),),
                       branches={"mode": "run"}).eval()
    randomize_branch_scales(dt)
    x = torch.randn(3, 2, 2, 2, dtype=torch.float64)
    calls = _student_run_calls(monkeypatch)
    t, s = dt.joint(x)
    assert calls, "the eager joint step runs the branch on the activations"
    calls.clear()
    torch._dynamo.reset()
    tc, sc = torch.compile(dt.joint, backend="eager")(x)
    assert not calls
    assert_close(tc, t, atol=1e-12, rtol=1e-12)
    assert_close(sc, s, atol=1e-12, rtol=1e-12)
    assert_close(torch.compile(dt.student, backend="eager")(x), dt.student(x), atol=1e-12, rtol=1e-12)
    torch._dynamo.reset()
