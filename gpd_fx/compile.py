"""``torch.compile`` for the training step: Inductor, or our own Triton-free ``gpd`` backend.

The ``gpd`` backend is AOTAutograd (Dynamo captures the step, AOTAutograd splits it into a
forward and a backward ATen graph) followed by our graph passes, with no code generation:

- on the CPU each graph runs as the FX ``GraphModule`` it is, so no C++ compiler and no Triton
  are needed, and the numbers equal eager up to the order of gradient accumulation;
- on CUDA each graph is recorded once into a CUDA graph and replayed, which removes the
  per-kernel launch overhead that dominates small-model steps -- again without Triton, for
  machines where Triton is missing or broken.

No state is shared between compilations: each :class:`GpdBackend` holds its own graph passes
(plain functions ``GraphModule -> GraphModule``: :data:`DEFAULT_GRAPH_PASSES`, then yours, given
as ``passes=`` or added for a block with :func:`graph_passes`) and its own CUDA-graph counters
(:class:`CudaGraphStats`, ``backend.stats``).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import fx

from gpd_fx.errors import GPDError

__all__ = [
    "COMPILE_MODES",
    "COMPILE_MODE_HELP",
    "DEFAULT_GRAPH_PASSES",
    "CompileError",
    "CudaGraphStats",
    "GpdBackend",
    "compile_step",
    "gpd_backend",
    "graph_passes",
]

log = logging.getLogger(__name__)

COMPILE_MODES = ("none", "inductor", "gpd")
"""Values accepted by :func:`compile_step` (and ``gpd-fx train --compile``)."""

COMPILE_MODE_HELP = {
    "none": "eager PyTorch",
    "inductor": "torch.compile with Inductor (needs a C++ compiler on the CPU, Triton on CUDA; the first "
                "compile of a GPD step takes minutes on a small CPU). On a 2-core CPU it measured 1.32x "
                "eager on a small CNN but 0.7x on ResNet-18 at 32x32 (benchmarks/README.md): time your model",
    "gpd": "AOTAutograd without code generation, CUDA graphs on CUDA: for CUDA machines without a working "
           "Triton; on the CPU it runs at eager speed (measured 0.94-0.99x eager): prefer inductor or eager there",
}
"""One line per mode saying what it is for (for ``--help`` texts)."""


class CompileError(GPDError, ValueError):
    """An unknown compile mode, or a mode this machine cannot run (named in the message)."""


GraphPass = Callable[[fx.GraphModule], fx.GraphModule]


@dataclass
class CudaGraphStats:
    """Counters of one backend's CUDA-graph runners (``GpdBackend.stats``), for tests and benchmarks."""

    captured: int = 0
    replayed: int = 0
    fallbacks: int = 0


def _eliminate_dead_code(gm: fx.GraphModule) -> fx.GraphModule:
    """Drop nodes whose results nothing uses (AOTAutograd leaves a few after partitioning)."""
    if gm.graph.eliminate_dead_code():
        gm.recompile()
    return gm


DEFAULT_GRAPH_PASSES: tuple[GraphPass, ...] = (_eliminate_dead_code,)
"""Passes every :class:`GpdBackend` applies first, in order, to each forward and backward graph."""

# Passes added by enclosing `graph_passes` blocks. A context variable, not a module list, so a
# pass added for one block (or one thread) never leaks into backends built elsewhere.
_EXTRA_PASSES: contextvars.ContextVar[tuple[GraphPass, ...]] = contextvars.ContextVar(
    "gpd_fx_graph_passes", default=())


@contextlib.contextmanager
def graph_passes(*passes: GraphPass) -> Iterator[tuple[GraphPass, ...]]:
    """Within the block, :class:`GpdBackend` objects built without ``passes=`` also run ``passes``.

    Args:
        *passes: ``GraphModule -> GraphModule`` functions; each may modify its argument and
            return it. They run after :data:`DEFAULT_GRAPH_PASSES` and after the passes of
            enclosing blocks.

    Yields:
        The passes a backend built in the block runs.

    Example:
        >>> def count_nodes(gm):
        ...     print(len(gm.graph.nodes)); return gm
        >>> with graph_passes(count_nodes):
        ...     step = compile_step(lambda x: (x * 2).sum(), "gpd")
    """
    token = _EXTRA_PASSES.set(_EXTRA_PASSES.get() + tuple(passes))
    try:
        yield DEFAULT_GRAPH_PASSES + _EXTRA_PASSES.get()
    finally:
        _EXTRA_PASSES.reset(token)


# ----------------------------------------------------------------------------- CUDA graphs


def _signature(args: Sequence[Any]) -> tuple:
    """What a recorded CUDA graph depends on: shapes, strides, dtypes, devices and scalar values."""
    sig = []
    for a in args:
        if isinstance(a, torch.Tensor):
            sig.append((tuple(a.shape), a.stride(), a.dtype, a.device, a.requires_grad))
        else:
            sig.append(a)
    return tuple(sig)


class _CUDAGraphRunner:
    """Runs a boxed ATen graph function through CUDA graphs, one graph per input signature.

    The first ``warmup`` calls of a signature run eagerly (cuDNN/cuBLAS pick algorithms and
    allocate workspaces then, which must not happen during capture) and record which inputs
    keep their address between calls: those are parameters and buffers, updated in place by
    the optimiser, so the graph reads them where they live. Every other input (the batch,
    saved activations in the backward) gets a static buffer that it is copied into before
    each replay. An input found at another address than the one captured is copied too, so
    a replay always reads the current values (AOTAutograd graphs never write their inputs:
    mutations are applied outside the graph, so copying in is all a replay needs).

    Outputs living in the graph's private memory are cloned out, because the next replay
    overwrites it while callers (autograd's saved tensors, the logger) may still hold them.
    Outputs that alias a parameter are returned as they are, keeping their view metadata.

    Anything not capturable (CPU tensors, too many distinct shapes, a capture error) falls
    back to running the graph as-is, so the result is always correct.
    """

    _boxed_call = True  # AOTAutograd calls us with one list of arguments

    def __init__(self, fn: Callable[[list], Any], stats: CudaGraphStats, warmup: int = 2,
                 max_graphs: int = 8) -> None:
        self.fn = fn
        self.stats = stats
        self.warmup = warmup
        self.max_graphs = max_graphs
        self.pool = torch.cuda.graph_pool_handle()
        self.calls: dict[tuple, int] = {}
        self.ptrs: dict[tuple, list[int | None]] = {}
        self.graphs: dict[tuple, Any] = {}
        self.failed: set[tuple] = set()

    def __call__(self, args: list) -> Any:
        key = _signature(args)
        entry = self.graphs.get(key)
        if entry is not None:
            return self._replay(entry, args)
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if (key in self.failed or len(self.graphs) >= self.max_graphs
                or not tensors or any(not t.is_cuda for t in tensors)):
            return self.fn(list(args))
        n = self.calls.get(key, 0) + 1
        self.calls[key] = n
        ptrs = [a.data_ptr() if isinstance(a, torch.Tensor) else None for a in args]
        if n == 1:
            self.ptrs[key] = ptrs
        else:
            # an input is "stable" only if it sat at the same address on every warm-up call
            self.ptrs[key] = [p if p == q else None for p, q in zip(self.ptrs[key], ptrs)]
        if n <= self.warmup:
            return self.fn(list(args))
        try:
            entry = self._capture(args, self.ptrs[key])
        except Exception as err:  # e.g. an op that syncs with the host; eager is still right
            warnings.warn(f"gpd backend: CUDA graph capture failed, running this graph without it ({err})")
            self.failed.add(key)
            self.stats.fallbacks += 1
            return self.fn(list(args))
        self.graphs[key] = entry
        self.stats.captured += 1
        return self._replay(entry, args)

    def _capture(self, args: list, stable: list[int | None]) -> tuple:
        static_in = []
        for a, p in zip(args, stable):
            if isinstance(a, torch.Tensor) and p is None:
                static_in.append(a.detach().clone())
            else:
                static_in.append(a)
        # one run on a side stream before the capture, as torch.cuda.graphs documents
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self.fn(list(static_in))
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            static_out = self.fn(list(static_in))
        stable_storages = {a.untyped_storage().data_ptr() for a, p in zip(args, stable)
                           if isinstance(a, torch.Tensor) and p is not None}
        outs = static_out if isinstance(static_out, (list, tuple)) else [static_out]
        # True: the output lives in graph memory (clone it); False: it views a parameter
        private = [isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() not in stable_storages
                   for o in outs]
        return graph, static_in, static_out, private

    def _replay(self, entry: tuple, args: list) -> Any:
        graph, static_in, static_out, private = entry
        for a, s in zip(args, static_in):
            if isinstance(a, torch.Tensor) and a.data_ptr() != s.data_ptr():
                s.copy_(a)
        args.clear()  # boxed convention: free the inputs as early as eager would
        graph.replay()
        self.stats.replayed += 1
        if isinstance(static_out, (list, tuple)):
            return type(static_out)(o.clone() if p else o for o, p in zip(static_out, private))
        return static_out.clone() if private[0] else static_out


# ----------------------------------------------------------------------------- backend


@functools.cache
def _log_cpu_notice() -> None:
    """Say once per process that the gpd backend on the CPU is no faster than eager."""
    log.warning("gpd compile backend on the CPU: %s", COMPILE_MODE_HELP["gpd"])


class GpdBackend:
    """Our ``torch.compile`` backend: AOTAutograd + graph passes, no code generation.

    Each instance owns its passes and its CUDA-graph counters, so two compiled steps never
    share state.

    Args:
        cuda_graphs: record and replay CUDA graphs for graphs whose inputs are on CUDA.
        passes: the graph passes to run, in order; ``None`` (default) means
            :data:`DEFAULT_GRAPH_PASSES` plus those of enclosing :func:`graph_passes` blocks.

    Attributes:
        passes: the passes this backend runs.
        stats: its :class:`CudaGraphStats`.
    """

    def __init__(self, cuda_graphs: bool = True, passes: Sequence[GraphPass] | None = None) -> None:
        from torch._dynamo.backends.common import aot_autograd

        self.cuda_graphs = cuda_graphs
        self.passes = tuple(passes) if passes is not None else DEFAULT_GRAPH_PASSES + _EXTRA_PASSES.get()
        self.stats = CudaGraphStats()
        self._aot = aot_autograd(fw_compiler=self._compile, bw_compiler=self._compile)

    def __call__(self, gm: fx.GraphModule, example_inputs: list, **kwargs: Any) -> Callable:
        return self._aot(gm, example_inputs, **kwargs)

    def _compile(self, gm: fx.GraphModule, example_inputs: list) -> Callable:
        from functorch.compile import make_boxed_func

        for graph_pass in self.passes:
            gm = graph_pass(gm)
        fn = make_boxed_func(gm.forward)
        on_cuda = any(isinstance(t, torch.Tensor) and t.is_cuda for t in example_inputs)
        if self.cuda_graphs and on_cuda:
            return _CUDAGraphRunner(fn, self.stats)
        if not on_cuda:
            _log_cpu_notice()
        return fn


def gpd_backend(cuda_graphs: bool = True, passes: Sequence[GraphPass] | None = None) -> GpdBackend:
    """A new :class:`GpdBackend`: AOTAutograd + graph passes, no code generation.

    Args:
        cuda_graphs: record and replay CUDA graphs for graphs whose inputs are on CUDA.
        passes: graph passes (default: :data:`DEFAULT_GRAPH_PASSES` plus :func:`graph_passes`).

    Returns:
        A backend for ``torch.compile(fn, backend=gpd_backend())``; its ``stats`` count CUDA graphs.

    Example:
        >>> f = torch.compile(lambda x: (x.sin() * 2).sum(), backend=gpd_backend())
        >>> float(f(torch.zeros(3)))
        0.0
    """
    return GpdBackend(cuda_graphs, passes)


def compile_step(fn: Callable, mode: str = "none", *, dynamic: bool | None = False,
                 backend: GpdBackend | None = None) -> Callable:
    """Compile a training-step function (forward + loss; its backward is compiled with it).

    Args:
        fn: the function, e.g. ``lambda x, y: loss(model(x), y)``.
        mode: ``"none"`` (eager, returned unchanged), ``"inductor"`` (``torch.compile`` default
            backend; on the CPU it needs a C++ compiler, on CUDA Triton) or ``"gpd"``
            (:func:`gpd_backend`: no Triton, CUDA graphs on CUDA; on the CPU it runs at eager
            speed, so prefer ``"inductor"`` there). See :data:`COMPILE_MODE_HELP`.
        dynamic: passed to ``torch.compile``. ``False`` (default) specialises on the batch
            size; the training loader drops its last partial batch so a step sees one shape.
        backend: for ``"gpd"``, the :class:`GpdBackend` to use (e.g. to read its ``stats``);
            default: a new :func:`gpd_backend`.

    Returns:
        The compiled callable (same signature as ``fn``).

    Raises:
        CompileError: unknown mode.

    Example:
        >>> step = compile_step(lambda x: (x * 2).sum(), "gpd")
        >>> float(step(torch.ones(2)))
        4.0
    """
    if mode not in COMPILE_MODES:
        raise CompileError(f"unknown compile mode {mode!r}; choose one of {list(COMPILE_MODES)}")
    if mode == "none":
        return fn
    if mode == "inductor":
        return torch.compile(fn, backend="inductor", dynamic=dynamic)
    return torch.compile(fn, backend=backend if backend is not None else gpd_backend(), dynamic=dynamic)
