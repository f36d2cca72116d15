"""The student map's pooled gradient buffers (``passes.student_map._GradPool``).

The map's backward writes each teacher-sized gradient into the storage it handed out the step
before when nothing else holds that storage any more. These tests pin down that this is
invisible: gradients equal a fresh computation step after step (float64), a gradient the user
still holds is never overwritten, accumulation (``set_to_none=False``) adds up exactly, and
copies of the teacher do not share buffers.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from nets import randomize_branch_scales

import gpd_fx
from gpd_fx.passes.student_map import _GradPool


class _Net(nn.Module):
    """Convs with every branch kind's geometry, BN and a linear head (float64)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.b1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = x + torch.relu(self.c2(x))
        return self.head(x.mean((2, 3)))


def _dt(branches):
    torch.manual_seed(0)
    net = _Net().double()
    dt = gpd_fx.expand(net, ratio=2, example_inputs=(torch.randn(2, 3, 8, 8, dtype=torch.float64),),
                       branches=branches).train()
    randomize_branch_scales(dt)
    return dt


def _student_grads(dt, x, w):
    (dt.student(x) * w).sum().backward()
    return {n: p.grad for n, p in dt.named_parameters() if p.grad is not None}


BRANCHES = [(), None]


@pytest.mark.parametrize("branches", BRANCHES, ids=["ir", "cbr"])
def test_reused_buffers_give_the_fresh_gradient(branches):
    """Step after step with ``set_to_none=True`` the gradients equal those of an untouched copy
    whose pools are empty (a fresh allocation), and the buffers are in fact reused."""
    dt = _dt(branches)
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    w = torch.randn(4, 5, dtype=torch.float64)
    ptrs = None
    for step in range(3):
        ref = copy.deepcopy(dt)   # a copy starts with empty pools
        dt.zero_grad(set_to_none=True)
        got = _student_grads(dt, x, w)
        want = _student_grads(ref, x, w)
        assert got.keys() == want.keys()
        for n in want:
            assert_close(got[n], want[n], atol=0, rtol=0, msg=n)
        now = {n: g.data_ptr() for n, g in got.items()}
        if ptrs is not None:
            big = [n for n, g in got.items() if g.numel() >= 64]
            assert any(now[n] == ptrs[n] for n in big), "no buffer was reused"
        ptrs = now
        del got


def test_a_held_gradient_is_never_overwritten():
    """A gradient the user keeps after ``zero_grad(set_to_none=True)`` keeps its values."""
    dt = _dt(None)
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    w1, w2 = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    held = _student_grads(dt, x, w1)
    saved = {n: g.clone() for n, g in held.items()}
    dt.zero_grad(set_to_none=True)
    second = _student_grads(dt, x, w2)
    for n in saved:
        assert_close(held[n], saved[n], atol=0, rtol=0, msg=n)
        assert held[n].data_ptr() != second[n].data_ptr(), n


@pytest.mark.parametrize("branches", BRANCHES, ids=["ir", "cbr"])
def test_accumulation_adds_exactly(branches):
    """With ``set_to_none=False`` two backward passes accumulate to twice one pass."""
    dt = _dt(branches)
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    w = torch.randn(4, 5, dtype=torch.float64)
    one = {n: g.clone() for n, g in _student_grads(dt, x, w).items()}
    _student_grads(dt, x, w)
    for n, p in dt.named_parameters():
        if n in one:
            assert_close(p.grad, 2 * one[n], atol=1e-12, rtol=1e-12, msg=n)


def test_pool_copies_and_pickles_empty():
    """Deep copies and pickles of a pool start empty, so copies never share a buffer."""
    import pickle

    pool = _GradPool()
    t = pool.take((3, 4), torch.float64, torch.device("cpu"))
    assert len(pool.by_key) == 1 and t.shape == (3, 4)
    assert not copy.deepcopy(pool).by_key
    assert not pickle.loads(pickle.dumps(pool)).by_key


def test_pool_reuses_only_free_storage():
    """``take`` returns the pooled storage when nothing else holds it, a fresh tensor otherwise."""
    pool = _GradPool()
    cpu = torch.device("cpu")
    a = pool.take((1000,), torch.float32, cpu)
    b = pool.take((1000,), torch.float32, cpu)   # ``a`` is alive: fresh, not pooled
    assert a.data_ptr() != b.data_ptr()
    ptr = a.data_ptr()
    del a, b
    c = pool.take((1000,), torch.float32, cpu)
    assert c.data_ptr() == ptr
    view = c[10:20]
    del c
    d = pool.take((1000,), torch.float32, cpu)   # a view still holds the storage
    assert d.data_ptr() != ptr
    del view
