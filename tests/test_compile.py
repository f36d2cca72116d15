"""Tests of gpd_fx.compile: the gpd backend gives eager's loss and gradients (CPU; CUDA when present)."""

from __future__ import annotations

import copy
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gpd_fx
from gpd_fx.compile import DEFAULT_GRAPH_PASSES, CompileError, compile_step, gpd_backend, graph_passes
from gpd_fx.losses import gpd_loss


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch, and tiny convs run single-threaded (see test_trainer)."""
    torch._dynamo.reset()
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
    torch._dynamo.reset()


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 5))


def _grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in model.parameters()]


def _assert_equal_to_eager(eager_model, compiled_model, step_eager, step_compiled, batches):
    """Same losses, gradients and BN statistics, step after step.

    Tolerance: on the CPU the gpd backend runs the very ATen ops eager runs, so results are
    expected bitwise equal; 1e-6 relative allows for AOTAutograd summing a parameter's
    gradient contributions in another order (float32 rounding, ~1e-7 relative).
    """
    tol = dict(rtol=1e-6, atol=1e-7)
    for x, y in batches:
        l0, l1 = step_eager(x, y), step_compiled(x, y)
        l0.backward()
        l1.backward()
        torch.testing.assert_close(l1, l0, **tol)
        for g0, g1 in zip(_grads(eager_model), _grads(compiled_model)):
            torch.testing.assert_close(g1, g0, **tol)
        for b0, b1 in zip(eager_model.buffers(), compiled_model.buffers()):
            torch.testing.assert_close(b1, b0, **tol)
        eager_model.zero_grad()
        compiled_model.zero_grad()


def test_gpd_backend_matches_eager_on_cpu():
    """Loss, gradients and BN running stats of a conv-BN-linear model equal eager's."""
    a = _tiny()
    b = copy.deepcopy(a)
    step_a = lambda x, y: F.cross_entropy(a(x), y)  # noqa: E731
    step_b = compile_step(lambda x, y: F.cross_entropy(b(x), y), "gpd")
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 3, 6, 6, generator=g), torch.randint(0, 5, (4,), generator=g)) for _ in range(3)]
    _assert_equal_to_eager(a, b, step_a, step_b, batches)


def test_gpd_backend_matches_eager_on_the_gpd_step():
    """The full GPD step (teacher + functional student + gpd_loss) compiles to eager's numbers."""
    torch.manual_seed(0)
    x = torch.randn(6, 3, 6, 6)
    y = torch.randint(0, 5, (6,))
    dt_a = gpd_fx.expand(_tiny(), ratio=2, example_inputs=(x[:2],))
    dt_b = copy.deepcopy(dt_a)

    def step(dt):
        return lambda x, y: gpd_loss(dt(x), dt.student(x), y)[0]

    _assert_equal_to_eager(dt_a, dt_b, step(dt_a), compile_step(step(dt_b), "gpd"), [(x, y), (x.flip(0), y.flip(0))])


def test_graph_passes_apply_to_backends_built_in_the_block_only():
    """A pass added with graph_passes() runs on the graphs of a backend built inside the block,
    after the defaults; backends built outside it, or with passes= given, do not run it."""
    seen = []

    def record(gm):
        seen.append(len(gm.graph.nodes))
        return gm

    outside = gpd_backend()
    with graph_passes(record) as active:
        inside = gpd_backend()
        explicit = gpd_backend(passes=DEFAULT_GRAPH_PASSES)
    assert active == DEFAULT_GRAPH_PASSES + (record,) and inside.passes == active
    assert outside.passes == DEFAULT_GRAPH_PASSES == explicit.passes == gpd_backend().passes
    assert inside.stats is not outside.stats
    x = torch.randn(3, requires_grad=True)
    compile_step(lambda t: (t.sin() * 2).sum(), "gpd", backend=outside)(x).backward()
    assert seen == []
    compile_step(lambda t: (t.cos() * 2).sum(), "gpd", backend=inside)(x).backward()
    assert len(seen) == 2   # the forward and the backward graph


def test_compile_step_modes():
    """'none' returns the function itself; unknown modes are refused with the valid list."""
    fn = lambda x: x  # noqa: E731
    assert compile_step(fn, "none") is fn
    with pytest.raises(CompileError, match=r"choose one of \['none', 'inductor', 'gpd'\]"):
        compile_step(fn, "tensorrt")


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("GPD_FX_TEST_INDUCTOR") != "1" or shutil.which("g++") is None,
                    reason="Inductor's C++ build of a GPD step takes minutes on 2 cores; set GPD_FX_TEST_INDUCTOR=1")
def test_inductor_matches_eager_within_codegen_tolerance():
    """Inductor fuses and reorders float math, so only agreement to ~1e-5 is expected."""
    a = _tiny()
    b = copy.deepcopy(a)
    fa = lambda x, y: F.cross_entropy(a(x), y)  # noqa: E731
    fb = compile_step(lambda x, y: F.cross_entropy(b(x), y), "inductor")
    x, y = torch.randn(4, 3, 6, 6), torch.randint(0, 5, (4,))
    la, lb = fa(x, y), fb(x, y)
    la.backward()
    lb.backward()
    torch.testing.assert_close(lb, la, rtol=1e-5, atol=1e-5)
    for ga, gb in zip(_grads(a), _grads(b)):
        torch.testing.assert_close(gb, ga, rtol=1e-4, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpd_backend_cuda_graphs_match_eager():
    """On CUDA the gpd backend records CUDA graphs and replays them with eager's numbers.

    Tolerance 1e-4 relative: cuDNN may pick different convolution algorithms for the eager and
    the captured runs, whose float32 sums differ in order (TF32 is disabled for the comparison).
    """
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    a = _tiny().cuda()
    b = copy.deepcopy(a)
    opt_a = torch.optim.SGD(a.parameters(), lr=0.1)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1)
    backend = gpd_backend()
    step_b = compile_step(lambda x, y: F.cross_entropy(b(x), y), "gpd", backend=backend)
    g = torch.Generator(device="cuda").manual_seed(0)
    for _ in range(6):  # 2 warm-up calls, capture on the 3rd, replays after
        x = torch.randn(8, 3, 6, 6, device="cuda", generator=g)
        y = torch.randint(0, 5, (8,), device="cuda", generator=g)
        la, lb = F.cross_entropy(a(x), y), step_b(x, y)
        la.backward()
        lb.backward()
        torch.testing.assert_close(lb, la, rtol=1e-4, atol=1e-5)
        for ga, gb in zip(_grads(a), _grads(b)):
            torch.testing.assert_close(gb, ga, rtol=1e-4, atol=1e-5)
        opt_a.step()
        opt_b.step()
        opt_a.zero_grad()
        opt_b.zero_grad()
    assert backend.stats.captured > 0 and backend.stats.replayed > 0
    assert backend.stats.fallbacks == 0
