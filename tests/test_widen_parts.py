"""Unit tests of the parts the build's walk delegates to (passes/widen_*.py)."""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn as nn

from gpd_fx.passes.layout import Layout, gpd_narrow, gpd_repeat, gpd_widen, interleaved
from gpd_fx.passes.widen_convert import LayoutConverter
from gpd_fx.passes.widen_emit import TeacherGraph
from gpd_fx.passes.widen_flops import FlopAccount
from gpd_fx.passes.widen_params import KEPT, ParamStore
from gpd_fx.passes.widen_values import LAYOUT_KEY, Entry
from gpd_fx.passes.widen_verify import Verifier, compare_tree


class _Student(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.register_buffer("stat", torch.arange(3.0))


def test_param_store_installs_records_and_rolls_back():
    """``install`` is the one place that puts a teacher tensor in and records its source: a
    parameter gets a ParamSource (with the maps given), a buffer none; ``rollback`` forgets
    both; ``copy_kept`` copies (the teacher never shares the student's storage)."""
    student, root = _Student(), nn.Module()
    store = ParamStore(student, root)
    cp = store.checkpoint()
    lay = interleaved(2, 2, 0)
    store.install("lin.bias", student.lin.bias.detach()[lay.index], state=lay, node="n1",
                  out=(0, lay.first_copy()))
    store.install("stat", student.stat.repeat_interleave(2), state=lay, node="n2")
    assert isinstance(root.lin.bias, nn.Parameter) and root.lin.bias.shape == (4,)
    assert "stat" in root._buffers and [s.student_name for s in store.sources] == ["lin.bias"]
    assert store.sources[0].node == "n1" and store.sources[0].out[0] == 0
    store.rollback(cp)
    assert store.sources == [] and store.state == {}
    store.copy_kept("lin.weight")
    assert store.state["lin.weight"] == KEPT and store.sources[0].node == "(copied)"
    assert torch.equal(root.lin.weight, student.lin.weight)
    assert root.lin.weight.untyped_storage().data_ptr() != student.lin.weight.untyped_storage().data_ptr()


def test_teacher_graph_runs_each_node_and_erases_a_failed_attempt():
    tg = TeacherGraph()
    x = tg.graph.placeholder("x")
    tg.values[x] = torch.ones(2, 3)
    kept = tg.emit("call_function", operator.mul, (x, 2.0), {})
    cp = tg.checkpoint()
    tg.record()
    used = tg.emit("call_function", operator.add, (kept, 1.0), {})
    tg.emit("call_method", "sum", (used,), {})
    tg.add_module("m", nn.ReLU())
    emitted = tg.stop()
    assert torch.equal(tg.values[used], torch.full((2, 3), 3.0)) and len(emitted) == 2
    tg.erase_unused(emitted)            # last first: the sum, then the add it used
    tg.rollback(cp)
    assert [n.name for n in tg.graph.nodes] == ["x", "mul"] and tg.added_modules == {}
    idx = torch.tensor([1, 0])
    assert tg.index_node(idx) is tg.index_node(idx)   # one buffer per index tensor


def test_verifier_floor_comes_from_the_inputs():
    """A value that is 0 in exact arithmetic (x - x shuffled and summed) carries rounding of
    the inputs' size: checked against the inputs' magnitude it passes; an O(1) error fails."""
    g = fx.Graph()
    x = g.placeholder("x")
    y = g.call_function(torch.sum, (x,))
    v = Verifier(tol=1e-9)
    v.source(x, torch.full((4,), 1e3, dtype=torch.float64))
    zero = torch.tensor(0.0, dtype=torch.float64)
    assert v.check(y, torch.tensor(1e-13, dtype=torch.float64), zero, None)[0]
    ok, msg = v.check(y, torch.tensor(1.0, dtype=torch.float64), zero, None)
    assert not ok and "sum" in msg
    lay = interleaved(2, 2, 1)
    s = torch.randn(3, 2, dtype=torch.float64)
    assert compare_tree(s.repeat_interleave(2, 1), s, y, 1e-12, layout=lay) == 0.0


def test_layout_converter_widens_permutes_and_narrows():
    """Kept -> interleaved is a repeat; another layout of one width is one permute; narrowing
    is the mean over the copies; every conversion node carries its layout in meta."""
    tg = TeacherGraph()
    g = fx.Graph()
    k, e = g.placeholder("k"), g.placeholder("e")
    sk = torch.randn(2, 3, dtype=torch.float64)
    lay = interleaved(3, 2, 1)
    tk, te = tg.graph.placeholder("k"), tg.graph.placeholder("e")
    tg.values[tk], tg.values[te] = sk, sk.repeat_interleave(2, 1)
    env = {k: Entry(tk, None), e: Entry(te, lay)}
    conv = LayoutConverter(tg, ParamStore(nn.Module(), tg.root), env, {k: sk, e: sk}, ratio=2)
    wide = conv.to_layout(k, lay)
    assert wide.target is gpd_repeat and torch.equal(tg.values[wide], tg.values[te])
    assert wide.meta[LAYOUT_KEY] is lay and conv.runtime_widenings == 1
    other = Layout(1, lay.index.flip(0), 2)
    perm = conv.to_layout(e, other)
    assert perm.target is gpd_widen and conv.permutations == 1
    assert torch.equal(tg.values[perm], sk.index_select(1, other.index))
    narrow = conv.narrow(e)
    assert narrow.target is gpd_narrow and torch.allclose(tg.values[narrow], sk) and narrow.meta[LAYOUT_KEY] is None


def test_flop_account_records_each_node():
    g = fx.Graph()
    node = g.call_function(torch.mm, ())
    acc = FlopAccount()
    a = torch.randn(4, 5)
    out = acc.measure(node, lambda: a @ a.T)
    assert out.shape == (4, 4) and node.meta["gpd"]["flops"] == acc.total == 2 * 4 * 5 * 4
    acc.expand(node)
    assert acc.expanded == acc.total
    acc.unexpand(node), acc.forget(node)
    assert acc.expanded == 0 and acc.total == 0
