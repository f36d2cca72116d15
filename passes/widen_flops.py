"""FLOP accounting of the build: the student's FLOPs per node, and the share the teacher widens.

``ExpansionReport.expanded_flop_fraction`` is ``expanded / total``: the FLOPs of student nodes
whose teacher version runs expanded (an expanded input or output), over all student FLOPs.
"""

from __future__ import annotations

from typing import Any, Callable

import torch.fx as fx
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["FlopAccount", "flops_of"]


def flops_of(node: fx.Node) -> float:
    """The student FLOPs measured for ``node`` (``node.meta["gpd"]["flops"]``; 0 if not run)."""
    return node.meta.get("gpd", {}).get("flops", 0.0)


class FlopAccount:
    """Running totals of student FLOPs and of the expanded ones."""

    def __init__(self):
        self.total = 0.0
        self.expanded = 0.0

    def measure(self, node: fx.Node, run: Callable[[], Any]) -> Any:
        """Run the student ``node`` (``run()``), record its FLOPs in ``node.meta`` and the total."""
        counter = FlopCounterMode(display=False)
        with counter:
            value = run()
        flops = float(counter.get_total_flops())
        node.meta.setdefault("gpd", {})["flops"] = flops
        self.total += flops
        return value

    def expand(self, node: fx.Node) -> None:
        """``node`` runs expanded in the teacher."""
        self.expanded += node.meta["gpd"]["flops"]

    def unexpand(self, node: fx.Node) -> None:
        """Undo :meth:`expand` (the rule's result was rejected)."""
        self.expanded -= node.meta["gpd"]["flops"]

    def forget(self, node: fx.Node) -> None:
        """Take ``node`` out of the total (an inlined call: its body's ops are counted instead)."""
        self.total -= flops_of(node)
