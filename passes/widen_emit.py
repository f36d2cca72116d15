"""The teacher graph under construction: emit a node and run it at once on the probe values.

Every emitted node is executed immediately (its value lands in :attr:`TeacherGraph.values`),
which is what lets the build verify each node as it is made. Nodes emitted since
:meth:`TeacherGraph.record` are remembered so that a failed rule can be erased again.
"""

from __future__ import annotations

from typing import Any, Callable

import torch.fx as fx
from torch import Tensor, nn
from torch.fx.node import map_aggregate

from .module_paths import get_path, set_path
from .trace import _plain_lists

__all__ = ["TeacherGraph", "execute"]


def execute(op: str, target: Any, args, kwargs, modules: Callable[[str], Any]):
    """Run one ``call_function`` / ``call_method`` / ``call_module`` node on concrete values."""
    args, kwargs = _plain_lists(args), _plain_lists(kwargs)   # fx's lists are immutable; run time's are not
    if op == "call_function":
        return target(*args, **kwargs)
    if op == "call_method":
        self_obj, *rest = args
        return getattr(self_obj, target)(*rest, **kwargs)
    if op == "call_module":
        return modules(target)(*args, **kwargs)
    raise ValueError(op)


class TeacherGraph:
    """The teacher's ``fx.Graph``, its root module, and the probe value of every node.

    Attributes:
        graph: the teacher graph being built.
        root: the module holding the teacher's submodules, parameters and buffers.
        values: teacher node -> its value on the probe input (released to meta tensors once no
            later node reads it).
        added_modules: module target -> the teacher module installed there.
    """

    def __init__(self):
        self.graph = fx.Graph()
        self.root = nn.Module()
        self.values: dict[fx.Node, Any] = {}
        self.added_modules: dict[str, nn.Module] = {}
        self._index_nodes: dict[int, fx.Node] = {}
        self._index_count = 0
        self._recording: list[fx.Node] | None = None
        self.fresh: list[fx.Node] = []   # emitted since the caller last took them (memory release)

    def emit(self, op: str, target, args: tuple, kwargs: dict) -> fx.Node:
        """Create the node and compute its value from its arguments' values."""
        node = self.graph.create_node(op, target, args, kwargs)
        self.fresh.append(node)
        if self._recording is not None:
            self._recording.append(node)
        if op == "get_attr":
            self.values[node] = get_path(self.root, target)
        else:
            a = map_aggregate(args, lambda x: self.values[x] if isinstance(x, fx.Node) else x)
            k = map_aggregate(kwargs, lambda x: self.values[x] if isinstance(x, fx.Node) else x)
            self.values[node] = execute(op, target, a, k, lambda t: get_path(self.root, t))
        return node

    def value(self, arg):
        """Probe value of a teacher node (or of a nested structure of nodes and constants)."""
        return map_aggregate(arg, lambda a: self.values[a] if isinstance(a, fx.Node) else a)

    def add_module(self, target: str, module: nn.Module) -> str:
        """Install ``module`` at ``target`` in the teacher (replacing what is there)."""
        set_path(self.root, target, module)
        self.added_modules[target] = module
        return target

    def index_node(self, index: Tensor) -> fx.Node:
        """A ``get_attr`` node for a constant index tensor (one non-persistent buffer per tensor)."""
        key = id(index)
        if key not in self._index_nodes:
            name = f"_gpd_index.i{self._index_count}"
            self._index_count += 1
            holder = self.root._modules.get("_gpd_index")
            if holder is None:
                holder = nn.Module()
                self.root.add_module("_gpd_index", holder)
            holder.register_buffer(name.split(".")[1], index, persistent=False)
            self._index_nodes[key] = self.graph.create_node("get_attr", name)
            self.values[self._index_nodes[key]] = index
        return self._index_nodes[key]

    # --- undoing a failed attempt -------------------------------------------------------------
    def record(self) -> None:
        """Start remembering emitted nodes (see :meth:`stop`)."""
        self._recording = []

    def stop(self) -> list[fx.Node]:
        """Stop remembering; the nodes emitted since :meth:`record`."""
        emitted, self._recording = self._recording, None
        return emitted or []

    def erase_unused(self, nodes: list[fx.Node]) -> None:
        """Erase ``nodes`` (emitted by a failed attempt) that nothing uses, last first."""
        for n in reversed(nodes):
            if not n.users:
                self.graph.erase_node(n)

    def checkpoint(self) -> dict[str, nn.Module]:
        return dict(self.added_modules)

    def rollback(self, checkpoint: dict[str, nn.Module]) -> None:
        """Forget modules added since ``checkpoint`` (they stay on the root, unreachable from
        the graph, and are dropped when the finished ``GraphModule`` is built)."""
        for t in list(self.added_modules):
            if t not in checkpoint:
                del self.added_modules[t]
