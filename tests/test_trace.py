"""Tracing: branches on sizes decided on the example inputs (and guarded), timm's no-trace
modules opened, mode-dependent caches that take their graph-capture path."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import gpd_fx
from gpd_fx.errors import TraceError
from gpd_fx.passes.trace import shape_guard, trace

from test_expand import check


class PadToMultiple(nn.Module):
    """Twins/Swin-style window padding: Python branches on the spatial size."""

    def __init__(self, c: int = 8, ws: int = 4):
        super().__init__()
        self.ws = ws
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.mix = nn.Conv2d(c, c, 1)

    def forward(self, x):
        x = self.conv(x)
        H, W = x.shape[-2:]
        pad_b = (self.ws - H % self.ws) % self.ws
        pad_r = (self.ws - W % self.ws) % self.ws
        if pad_b > 0 or pad_r > 0:
            x = F.pad(x, (0, pad_r, 0, pad_b))
        x = self.mix(x)
        if pad_b > 0 or pad_r > 0:
            x = x[:, :, :H, :W].contiguous()
        n = x.shape[-1] // self.ws
        return x.flatten(2).mean(-1) * n


def test_size_branches_are_decided_and_guarded():
    torch.manual_seed(0)
    m = PadToMultiple()
    with pytest.raises(TraceError):   # plain fx cannot trace the branch
        trace(m)
    x = torch.randn(2, 3, 10, 10)
    dt = check(m, x)
    gm = dt._graph()
    assert any(n.target is shape_guard for n in gm.graph.nodes)
    assert len(dt.report.size_guards) == 2 and all("test_trace.py" in g for g in dt.report.size_guards)
    # another batch size takes the same path and runs
    y = torch.randn(3, 3, 10, 10).double()
    assert torch.allclose(dt(y), m(y), rtol=0, atol=1e-10 * m(y).abs().max().item())
    # a size for which the traced branch is wrong stops with the guard's message
    with pytest.raises(RuntimeError, match="example inputs"):
        dt(torch.randn(2, 3, 12, 12).double())


def test_branch_on_tensor_data_still_fails_to_trace():
    class DataBranch(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            if x.sum() > 0:
                return self.fc(x)
            return -self.fc(x)

    with pytest.raises(TraceError, match="DataBranch"):
        gpd_fx.expand(DataBranch(), example_inputs=(torch.randn(2, 4),))


class CachedBias(nn.Module):
    """LeViT's attention biases: a Python-side cache in eval mode, skipped under tracing."""

    def __init__(self, c: int = 6):
        super().__init__()
        self.fc = nn.Linear(c, c)
        self.biases = nn.Parameter(torch.randn(3))
        self.register_buffer("idx", torch.tensor([0, 2, 1, 1, 0, 2]), persistent=False)
        self.cache: dict = {}

    def bias(self):
        if torch.jit.is_tracing() or self.training:
            return self.biases[self.idx]
        if "b" not in self.cache:
            self.cache["b"] = self.biases[self.idx]
        return self.cache["b"]

    def forward(self, x):
        return self.fc(x) + self.bias()


def test_mode_dependent_cache_takes_its_tracing_path():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 6), CachedBias(), nn.ReLU(), nn.Linear(6, 3))
    dt = check(m, torch.randn(5, 4))
    assert dt.report.boundaries == []
    assert m[1].cache == {} or all(not isinstance(v, torch.fx.Proxy) for v in m[1].cache.values())


@contextlib.contextmanager
def timm_notrace(base: type):
    """A subclass of ``base`` registered in timm's no-trace set for the duration of a test."""
    timm_fx = pytest.importorskip("timm.layers._fx")
    cls = type(f"NoTrace{base.__name__}", (base,), {})
    timm_fx.register_notrace_module(cls)
    try:
        yield cls
    finally:
        timm_fx._leaf_modules.discard(cls)


def test_timm_notrace_module_is_opened():
    with timm_notrace(PadToMultiple) as NoTraceWindow:
        torch.manual_seed(0)
        m = nn.Sequential(NoTraceWindow(), nn.Linear(8, 4))
        x = torch.randn(2, 3, 10, 10)
        dt = check(m, x)
        assert dt.report.boundaries == [] and dt.report.expanded_flop_fraction > 0.95
        # with a rule of its own (here: the user's), the module stays one node
        gm = trace(m, example_inputs=(x,), has_rule=lambda mod: isinstance(mod, NoTraceWindow))
        assert [n.target for n in gm.graph.nodes if n.op == "call_module"][0] == "0"


class RelIndexAttn(nn.Module):
    """ConViT GPSA's pattern: a plain tensor attribute (not a buffer) refreshed on a size change."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.qk = nn.Linear(c, c)
        self.pos = nn.Linear(3, 1)
        self.rel: torch.Tensor = torch.zeros(1, 1, 1, 3)

    def forward(self, x):
        B, N, C = x.shape
        if self.rel.shape[1] != N:
            self.rel = torch.arange(N * N * 3, dtype=x.dtype).reshape(1, N, N, 3) / (N * N * 3)
        pos = self.pos(self.rel.expand(B, -1, -1, -1)).squeeze(-1)    # B, N, N
        att = (self.qk(x) @ x.transpose(1, 2)).softmax(-1) + pos.softmax(-1)
        return att @ x


def test_opened_module_with_a_tensor_attribute_cache():
    with timm_notrace(RelIndexAttn) as NoTraceRel:
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(4, 8), NoTraceRel(), nn.Linear(8, 2))
        x = torch.randn(2, 5, 4)
        dt = check(m, x)
        assert dt.report.boundaries == []
        assert isinstance(m[1].rel, torch.Tensor) and not isinstance(m[1].rel, torch.fx.Proxy)
        assert "rel" not in m[1]._buffers      # the attribute is put back as it was


def _pool_to_square(x):
    """A wrapped function with a branch on sizes (timm's no-trace functions are like this)."""
    h, w = x.shape[-2:]
    side = max(h, w)
    if side != h or side != w:
        x = F.pad(x, (0, side - w, 0, side - h))
    return x.mean((-2, -1)) * side


torch.fx.wrap("_pool_to_square")


def test_wrapped_function_with_size_branches_is_inlined():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 6, 3, padding=1)
            self.fc = nn.Linear(6, 2)

        def forward(self, x):
            return self.fc(_pool_to_square(self.conv(x)))

    torch.manual_seed(0)
    dt = check(M(), torch.randn(2, 3, 6, 9))
    assert dt.report.boundaries == []
    with pytest.raises(RuntimeError, match="example inputs"):
        dt(torch.randn(2, 3, 8, 8).double())


def test_cat_of_a_split_result_is_unpacked():
    """timm's BilinearAttnTransform: ``torch.cat(torch.split(x, 1, dim=1), dim=3)``."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            y = self.conv(x)                                   # B, C, H, W
            y = torch.cat(torch.split(y, 1, dim=2), dim=3)     # B, C, 1, H*W
            return self.fc(y.flatten(2).mean(-1))

    torch.manual_seed(0)
    dt = check(M(), torch.randn(2, 3, 3, 5))
    assert dt.report.boundaries == [] and dt.report.fallbacks == {}
    with pytest.raises(RuntimeError, match="example inputs"):
        dt(torch.randn(2, 3, 4, 5).double())


def test_branch_on_item_is_not_decided():
    """``.item()`` is tensor data: deciding it on the example inputs would bake one sample's path."""

    class ItemBranch(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            if x.abs().sum().item() > 1e9:
                return self.fc(x)
            return -self.fc(x)

    with pytest.raises(TraceError, match="ItemBranch"):
        gpd_fx.expand(ItemBranch(), example_inputs=(torch.randn(2, 4),))


def test_passes_import_no_cycle_and_not_the_public_wrapper():
    """Layering: the modules of ``gpd_fx.passes`` import each other without a cycle (trace.py
    and widen.py once imported each other), and never the public wrapper (``gpd_fx.teacher``,
    ``gpd_fx.expand``, the trainer); ``gpd_fx.errors`` is the one ``gpd_fx`` module they share."""
    import ast
    import pathlib

    import gpd_fx.passes

    root = pathlib.Path(gpd_fx.passes.__file__).parent
    modules = {str(p.relative_to(root).with_suffix("")).replace("/", ".").removesuffix(".__init__"): p
               for p in root.rglob("*.py")}
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name.rsplit(".", 1)[0] if "." in name else ""
        if path.name == "__init__.py":
            package = name.removesuffix("__init__").rstrip(".")
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = package.split(".") if package else []
                    base = parts[:len(parts) - (node.level - 1)] if node.level > 1 else parts
                    target = ".".join(base + ([node.module] if node.module else []))
                    for alias in node.names:   # `from . import rules` names a module
                        sub = f"{target}.{alias.name}".strip(".")
                        deps.add(sub if sub in modules else target)
                else:
                    assert not (node.module or "").startswith(("gpd_fx.teacher", "gpd_fx.expand", "gpd_fx.trainer",
                                                               "gpd_fx.cli")), f"{name} imports {node.module}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    assert not alias.name.startswith(("gpd_fx.teacher", "gpd_fx.expand", "gpd_fx.trainer")), name
        edges[name] = {d for d in deps if d in modules and d != name}

    state: dict[str, int] = {}

    def visit(n, path):
        state[n] = 1
        for d in edges[n]:
            assert state.get(d) != 1, "import cycle: " + " -> ".join(path + [n, d])
            if d not in state:
                visit(d, path + [n])
        state[n] = 2

    for n in edges:
        if n not in state:
            visit(n, [])
    assert "widen" not in edges["trace"] and "gpd_fx.teacher" not in (root / "fold.py").read_text()


def test_trace_and_build_leave_global_state_as_found():
    """No process-wide patch outlives tracing (``torch.jit.is_tracing``, ``Function.apply``),
    also when tracing fails, and the build's per-node reseeding of the global RNG is scoped."""
    from gpd_fx.errors import TraceError
    from gpd_fx.passes.widen import Builder

    is_tracing, apply = torch.jit.is_tracing, torch.autograd.Function.__dict__["apply"]

    class DataBranch(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x   # data-dependent: fx cannot trace it

    m = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.ReLU()).double()
    gm = trace(m)
    with pytest.raises(TraceError):
        trace(DataBranch())
    assert torch.jit.is_tracing is is_tracing and not torch.jit.is_tracing()
    assert torch.autograd.Function.__dict__["apply"] is apply
    x = torch.randn(3, 4, dtype=torch.float64)
    before = torch.random.get_rng_state()
    b = Builder(gm, 2, noise=0.1, seed=0, strict=True, tol=1e-9)
    b.run((x,))
    after = torch.random.get_rng_state()
    assert torch.equal(before, after)
    assert "inline_depth" not in vars(Builder) and b.inline_depth == 0
