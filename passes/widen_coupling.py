"""Coupling of channel maps: expanded tensors whose layouts must stay one map.

An op that passes its input's map through (an activation) or combines inputs that share one
(a residual add) ties their channel maps; the connected components of this graph are the
coupling groups reported by ``ExpansionReport.coupling_groups``.
"""

from __future__ import annotations

import torch.fx as fx

from .layout import Layout
from .widen_values import Entry

__all__ = ["coupling_graph"]


def coupling_graph(env: dict[fx.Node, Entry]):
    """A ``networkx.Graph`` over expanded student nodes (by name), an edge where two share a map."""
    import networkx as nx

    g = nx.Graph()
    for node, entry in env.items():
        if not isinstance(entry.layout, Layout) or node.op in ("placeholder", "get_attr"):
            continue
        g.add_node(node.name, dim=entry.layout.dim, width=entry.layout.width)
        for a in node.all_input_nodes:
            lay = env[a].layout if a in env else None
            if isinstance(lay, Layout) and lay.index is entry.layout.index:
                g.add_edge(node.name, a.name)
    return g
