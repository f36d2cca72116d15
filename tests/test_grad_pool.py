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
from gpd_fx.passes import student_map as SM
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


class _ZeroFills(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the ``zero_`` / ``fill_`` calls (top-level ATen ops) made while active."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.zero_, torch.ops.aten.fill_):
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_clean_zero_rows_of_a_reused_buffer_are_not_rewritten(monkeypatch):
    """The teacher-sized gradient is zero outside the rows the student reads. On a reused buffer
    those rows are only checked (still zero: nothing is written), on a fresh one filled."""
    monkeypatch.setattr(SM, "_CHECK_ZERO_MIN_BYTES", 0)
    dt = _dt(())
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    w = torch.randn(4, 5, dtype=torch.float64)
    fills = []
    for _ in range(2):
        dt.zero_grad(set_to_none=True)
        loss = (dt.student(x) * w).sum()
        with _ZeroFills() as mode:
            loss.backward()
        fills.append(mode.count)
    assert fills[0] > 0 and fills[1] == 0, fills


@pytest.mark.parametrize("branches", BRANCHES, ids=["ir", "cbr"])
@pytest.mark.parametrize("how", ["data", "inplace", "negzero", "nan"])
def test_writes_into_zero_rows_between_steps_are_undone(monkeypatch, branches, how):
    """Whatever the user writes into a gradient it then drops (through ``.data``, which the
    version counter does not see, in place, a ``-0.0`` or a NaN) is gone from the next step's
    gradient on the same buffer: bit for bit the gradient of a copy with fresh buffers."""
    monkeypatch.setattr(SM, "_CHECK_ZERO_MIN_BYTES", 0)
    dt = _dt(branches)
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    w = torch.randn(4, 5, dtype=torch.float64)
    ref = copy.deepcopy(dt)
    got = _student_grads(dt, x, w)
    ptrs = {n: g.data_ptr() for n, g in got.items()}
    for g in got.values():
        if how == "data":
            g.data.add_(1.0)
        elif how == "inplace":
            g.fill_(3.0)
        elif how == "negzero":
            g.data.copy_(torch.where(g == 0, torch.tensor(-0.0, dtype=g.dtype), g))
        else:
            g.data[..., -1:] = float("nan")
    del got, g
    dt.zero_grad(set_to_none=True)
    got = _student_grads(dt, x, w)
    want = _student_grads(ref, x, w)
    assert any(got[n].data_ptr() == ptrs[n] for n in got), "no buffer was reused"
    for n in want:
        assert torch.equal(got[n].view(torch.int64), want[n].view(torch.int64)), n


def test_mapped_values_reuse_free_storage_and_leave_held_ones_alone():
    """The map's student-sized outputs go to pooled storage when nothing holds the last one; a
    mapped tensor the user keeps is never overwritten, and values equal a fresh copy's."""
    dt = _dt(())
    ref = copy.deepcopy(dt)
    first = dt.student_parameters()
    saved = {n: t.detach().clone() for n, t in first.items()}
    second = dt.student_parameters()           # ``first`` is alive: fresh storage
    for n in first:
        assert torch.equal(first[n], saved[n]) and torch.equal(second[n], saved[n]), n
    teacher_ptrs = {q.untyped_storage().data_ptr() for q in dt.parameters()}
    # maps that only select (no sum, contiguous) return a view of the teacher tensor itself
    ptrs = {n: t.data_ptr() for n, t in first.items() if t.untyped_storage().data_ptr() not in teacher_ptrs}
    assert ptrs and not any(ptrs[n] == second[n].data_ptr() for n in ptrs)
    del first
    third = dt.student_parameters()
    assert any(ptrs[n] == third[n].data_ptr() for n in ptrs), "no value buffer was reused"
    want = ref.student_parameters()
    for n in want:
        assert torch.equal(third[n], want[n]), n
    third["c2.weight"].sum().backward()    # the pooled outputs stay differentiable
    assert dt.teacher.get_parameter(dt.sources[[s.student_name for s in dt.sources].index("c2.weight")].teacher_name
                                    ).grad is not None


def _kernel_source(r, out=6, inp=5, k=(3, 3)):
    """A conv weight's map at ratio ``r`` (output copy 0, sum of interleaved input copies)."""
    src = SM.ParamSource("w", "", "w", out=(0, torch.arange(out) * r), inp=(1, torch.arange(inp * r) // r, inp))
    t = torch.randn(out * r, inp * r, *k, dtype=torch.float64)
    return src, t


@pytest.mark.parametrize("r", [2, 3, 4])
def test_tap_gemm_map_equals_the_elementwise_map(monkeypatch, r):
    """The batched-GEMM form of the kernel map (forward sum over input copies, backward copies)
    gives bit for bit what the elementwise adds and copies give, and passes gradcheck."""
    monkeypatch.setattr(SM, "_GEMM_MIN_BYTES", 0)
    src, t = _kernel_source(r)
    assert SM._tap_gemm(t, src) is not None
    gs = torch.randn(6, 5, 3, 3, dtype=torch.float64)
    got_f, got_b = SM._map_fast(t, src, _GradPool()), SM._adjoint_fast(gs, src, t.shape, _GradPool())
    monkeypatch.setattr(SM, "_tap_gemm", lambda t, src: None)
    want_f, want_b = SM._map_fast(t, src), SM._adjoint_fast(gs, src, t.shape, _GradPool())
    assert torch.equal(got_f.view(torch.int64), want_f.view(torch.int64))
    assert torch.equal(got_b.view(torch.int64), want_b.view(torch.int64))
    monkeypatch.undo()
    src2, t2 = _kernel_source(r, out=2, inp=2)
    torch.autograd.gradcheck(lambda w: SM.map_tensor(w, src2), (t2.requires_grad_(),))


def test_tap_gemm_is_not_used_under_reduced_precision_matmuls(monkeypatch):
    """A bf16/tf32 float32 matmul setting would round the kernel: the map falls back to adds."""
    src, t = _kernel_source(3)
    t32 = t.float()
    assert SM._tap_gemm(t32, src) is not None
    monkeypatch.setattr(torch.backends.mkldnn.matmul, "fp32_precision", "bf16")
    assert SM._tap_gemm(t32, src) is None
    assert SM._tap_gemm(t, src) is not None      # float64 matmuls are never reduced


@pytest.mark.parametrize("branches", BRANCHES, ids=["ir", "cbr"])
def test_joint_map_values_on_pooled_storage_equal_fresh_ones(monkeypatch, branches):
    """dt.joint's student-sized map outputs reuse the storage of the step before once nothing
    holds it: three joint steps give bit for bit the outputs and teacher gradients of a copy
    whose map outputs are fresh tensors; a mapped weight the user kept (a forward hook) keeps
    its values and its storage is not handed out again."""
    dt = _dt(branches)
    ref = copy.deepcopy(dt)
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    kept = []
    conv = next(m for m in dt.template.modules() if isinstance(m, nn.Conv2d))
    handle = conv.register_forward_hook(lambda mod, args, out: kept.append(mod.weight) if not kept else None)

    def steps(model, fresh):
        if fresh:   # every map output a fresh tensor
            take = SM._GradPool.take_reused
            monkeypatch.setattr(SM._GradPool, "take_reused", lambda self, shape, dtype, device, tag="grad": (
                (torch.empty(tuple(shape), dtype=dtype, device=device), False) if tag == "value"
                else take(self, shape, dtype, device, tag)))
        outs = []
        for _ in range(3):
            model.zero_grad(set_to_none=True)
            t, s = model.joint(x)
            (t.square().sum() + s.sum()).backward()
            outs.append([t.detach(), s.detach()] + [p.grad.clone() for p in model.parameters() if p.grad is not None])
        monkeypatch.undo()
        return outs

    ptrs, takes = [], []
    orig, take = SM._map_fast, SM._GradPool.take_reused
    monkeypatch.setattr(SM, "_map_fast", lambda t, src, pool=None: ptrs.append((r := orig(t, src, pool)).data_ptr()) or r)

    def record(self, shape, dtype, device, tag="grad"):
        out = take(self, shape, dtype, device, tag)
        takes.append((tag, out[1]))
        return out

    monkeypatch.setattr(SM._GradPool, "take_reused", record)
    got = steps(dt, fresh=False)
    handle.remove()
    saved = kept[0].detach().clone()
    want = steps(ref, fresh=True)
    for a, b in zip(got, want):
        assert len(a) == len(b)
        for u, w in zip(a, b):
            assert torch.equal(u.view(torch.int64), w.view(torch.int64))
    assert torch.equal(kept[0], saved)
    assert ("value", True) in takes, "no map output reused its storage"
    n = len(ptrs) // 3
    assert kept[0].data_ptr() not in set(ptrs[n:])
