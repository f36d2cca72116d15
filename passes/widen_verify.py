"""Verification of the build: teacher value == student value seen through the node's layout.

One tolerance table (:data:`TOL`) for the whole project's self-verification, the comparison of
(nested) values, and the rounding floor that each node inherits from its inputs
(``DESIGN.md §1``: the teacher is verified node by node, in lockstep with the student).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor

from gpd_fx.errors import VerificationError

from .layout import Layout

__all__ = ["TOL", "close", "compare_tree", "max_abs", "Verifier", "verify_output"]

# Self-verification tolerance, relative to the largest student output magnitude. In float64
# (eps 1.1e-16) the teacher's sums have r times more terms in a different order; even for deep
# nets with ~1e5-term reductions the rounding stays below ~1e-11, so 1e-9 leaves two orders of
# headroom while a wrong rule (errors of order 1) cannot pass. In float32 (eps 6e-8) the same
# reasoning gives ~1e-5..1e-4 (dot products of up to ~2e4 terms, sqrt(n)*eps per layer), so
# float32 is checked at 1e-3: still orders below the O(1e-1) error of a wrong rule.
TOL = {torch.float64: 1e-9, torch.float32: 1e-3, torch.bfloat16: 3e-2, torch.float16: 1e-2}


def close(t: Tensor, ref: Tensor, tol: float, floor: float = 0.0) -> tuple[bool, float]:
    """``max|t - ref| <= tol * max(max|ref|, floor)``; non-finite values must sit at the same places.

    ``floor`` is the magnitude of the op's inputs: an output that is exactly 0 in exact
    arithmetic (the mean of centred data) carries rounding of the inputs' size, not its own.
    """
    if t.shape != ref.shape or t.dtype != ref.dtype:
        return False, float("inf")
    if not t.is_floating_point() and not t.is_complex():
        return bool(torch.equal(t, ref)), 0.0
    if t.numel() == 0:
        return True, 0.0
    err = float((t - ref).abs().max())
    scale = max(float(ref.abs().max()), floor)
    if math.isfinite(err) and math.isfinite(scale):
        rel = err / scale if scale > 0 else err
        return rel <= tol, rel
    # NaN/inf in the student itself (masked attention, log of 0) must appear in the same places
    fin = torch.isfinite(ref)
    if not torch.equal(fin, torch.isfinite(t)) or not torch.equal(torch.isnan(ref), torch.isnan(t)):
        return False, float("inf")
    if not fin.any():
        return True, 0.0
    err = float((t[fin] - ref[fin]).abs().max())
    scale = max(float(ref[fin].abs().max()), floor)
    rel = err / scale if scale > 0 else err
    return rel <= tol, rel


def compare_tree(tval, sval, node: Any, tol: float, layout=None, floor: float = 0.0) -> float:
    """Check teacher value == student value seen through ``layout``; return the max rel. error.

    ``node`` is anything with a ``name`` (the message names it). Raises
    :class:`~gpd_fx.errors.VerificationError` when they differ.
    """
    if isinstance(sval, Tensor):
        if not isinstance(tval, Tensor):
            raise VerificationError(f"{node.name}: teacher gave {type(tval).__name__}, student a tensor")
        ref = sval
        if isinstance(layout, Layout):
            if tval.dim() != sval.dim() or tval.shape[layout.dim] != layout.index.numel():
                raise VerificationError(f"{node.name}: shape {tuple(tval.shape)} vs student "
                                        f"{tuple(sval.shape)} expanded on dim {layout.dim}")
            ref = sval.index_select(layout.dim, layout.index.to(sval.device))
        ok, rel = close(tval, ref, tol, floor)
        if not ok:
            raise VerificationError(
                f"{node.name}: teacher {tuple(tval.shape)} != student {tuple(ref.shape)}"
                f"{' in layout dim=' + str(layout.dim) if isinstance(layout, Layout) else ''} "
                f"(max rel. error {rel:.3g} > {tol:g})")
        return rel
    if isinstance(sval, (list, tuple)):
        if not isinstance(tval, (list, tuple)) or len(tval) != len(sval):
            raise VerificationError(f"{node.name}: structure differs")
        lays = layout if isinstance(layout, (list, tuple)) else [layout] * len(sval)
        return max([compare_tree(t, s, node, tol, l, floor) for t, s, l in zip(tval, sval, lays)] or [0.0])
    if isinstance(sval, dict):
        return max([compare_tree(tval[k], sval[k], node, tol,
                                 layout.get(k) if isinstance(layout, dict) else None, floor)
                    for k in sval] or [0.0])
    return 0.0


def max_abs(v) -> float:
    """Largest finite ``|v|`` of a floating tensor (0 for anything else)."""
    if isinstance(v, Tensor) and v.is_floating_point() and v.numel():
        m = float(v.detach().abs().max())
        return m if math.isfinite(m) else 0.0
    return 0.0


class Verifier:
    """Checks each built node against the student, with the rounding floor of its inputs.

    Rounding noise is of the size of the largest value upstream, not of this node's own
    values: the channel sum of (shuffled x - x) is 0 in exact arithmetic, and whatever comes
    out of it carries noise of x's size. So the floor is the largest magnitude on any path into
    the node, propagated node by node.
    """

    def __init__(self, tol: float):
        self.tol = tol
        self.magnitude: dict[fx.Node, float] = {}

    def source(self, node: fx.Node, value) -> None:
        """An input of the graph (placeholder, parameter): its magnitude starts the floors."""
        self.magnitude[node] = max_abs(value)

    def check(self, node: fx.Node, tval, sval, layout) -> tuple[bool, str]:
        """``(True, "")`` when the teacher value ``tval`` equals ``sval`` in ``layout``, else
        ``(False, message)``."""
        floor = max([self.magnitude.get(a, 0.0) for a in node.all_input_nodes] or [0.0])
        self.magnitude[node] = max(floor, max_abs(sval))
        try:
            compare_tree(tval, sval, node, self.tol, layout=layout, floor=floor)
        except VerificationError as e:
            return False, str(e)
        return True, ""


class _Named:
    def __init__(self, name: str):
        self.name = name


def verify_output(teacher, student, inputs: tuple, tol: float,
                  what: str = "output (after multi-branch rewrite)", seed: int | None = None) -> float:
    """Run the finished ``teacher`` and the ``student`` once on ``inputs`` and compare outputs.

    The lockstep check saw each node as it was built; this catches anything a later pass
    changed (a module widened again, the multi-branch rewrite). ``seed``: run each on that
    random stream (the caller's is left as it was). Returns the max relative error; raises
    :class:`~gpd_fx.errors.VerificationError` naming ``what`` when they differ.
    """
    with torch.no_grad(), torch.random.fork_rng():
        # with ``seed``, both see the same random stream (graphs with random ops in them)
        if seed is not None:
            torch.manual_seed(seed)
        t = teacher(*inputs)
        if seed is not None:
            torch.manual_seed(seed)
        s = student(*inputs)
    return compare_tree(t, s, _Named(what), tol)
