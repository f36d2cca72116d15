"""The rule registry: one expansion rule per op kind, keyed by module type, function or method name.

A rule is a function ``rule(ctx, node) -> Out`` (see :class:`gpd_fx.passes.widen.RuleContext`).
It emits the teacher version of ``node`` and returns its output layout, or raises
:class:`CannotExpand` to let the driver cut a boundary. Module calls, ``torch.*`` functions,
``F.*`` functions and tensor methods reach the same rule by registering all their keys at once::

    @register(nn.ReLU, F.relu, torch.relu, "relu", transparent=True)
    def elementwise(ctx, node): ...

Users add rules for their own layers with the same decorator or ``expand(extra_rules=...)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch.fx as fx
from torch import nn

__all__ = ["register", "lookup", "has_module_rule", "CannotExpand", "RuleEntry", "RULES"]


class CannotExpand(Exception):
    """Raised by a rule when this instance of its op cannot run expanded; the driver cuts a boundary."""


@dataclass(frozen=True)
class RuleEntry:
    fn: Callable[..., Any]
    # True when the op maps channels one-to-one and never mixes them (activations, pooling,
    # reshapes): a weight layer whose output only reaches the model output through such ops
    # keeps its output at student width (no point widening logits just to narrow them again).
    transparent: bool = False


class _Registry:
    def __init__(self) -> None:
        self.modules: dict[type, RuleEntry] = {}
        self.functions: dict[Any, RuleEntry] = {}
        self.methods: dict[str, RuleEntry] = {}

    def add(self, key: Any, entry: RuleEntry) -> None:
        if isinstance(key, type):
            self.modules[key] = entry
        elif isinstance(key, str):
            self.methods[key] = entry
        elif callable(key):
            self.functions[key] = entry
        else:
            raise TypeError(f"rule key must be a module type, a function or a method name, got {key!r}")

    def lookup(self, node: fx.Node, modules: dict[str, nn.Module],
               extra: "_Registry | None" = None) -> RuleEntry | None:
        for reg in ((extra, self) if extra is not None else (self,)):
            found = reg._lookup_one(node, modules)
            if found is not None:
                return found
        return None

    def _lookup_one(self, node: fx.Node, modules: dict[str, nn.Module]) -> RuleEntry | None:
        if node.op == "call_function":
            return self.functions.get(node.target)
        if node.op == "call_method":
            return self.methods.get(node.target)
        if node.op == "call_module":
            return self.module_rule(type(modules[node.target]))
        return None

    def module_rule(self, cls: type) -> RuleEntry | None:
        if cls in self.modules:
            return self.modules[cls]
        # A subclass inherits its base's rule only if it does not override forward:
        # an overridden forward may do anything (timm's BatchNormAct2d adds an activation).
        for base in cls.__mro__[1:]:
            if base in self.modules and cls.forward is base.forward:
                return self.modules[base]
        return None


RULES = _Registry()


def register(*keys: Any, transparent: bool = False, registry: _Registry | None = None):
    """Register ``fn`` as the expansion rule for every key (module types, functions, method names)."""

    def deco(fn):
        entry = RuleEntry(fn, transparent)
        for k in keys:
            (registry or RULES).add(k, entry)
        return fn

    return deco


def lookup(node: fx.Node, modules: dict[str, nn.Module], extra=None) -> RuleEntry | None:
    """The rule for ``node``, user rules first; ``None`` when there is none."""
    return RULES.lookup(node, modules, extra)


def has_module_rule(module: nn.Module, extra: "_Registry | None" = None) -> bool:
    """True when a rule (a user rule in ``extra`` or a registered one) expands ``module`` whole."""
    return any(reg is not None and reg.module_rule(type(module)) is not None for reg in (extra, RULES))


_LAZY: list[tuple[str, Callable[[], None]]] = []


def register_when_imported(module: str, installer: Callable[[], None]) -> None:
    """Run ``installer`` (which registers rules keyed by another library's classes/functions)
    once that library is imported. Importing gpd_fx thus never imports torchvision or timm:
    a model that contains their layers has imported them already."""
    _LAZY.append((module, installer))


def load_lazy_rules() -> None:
    """Install the rules of every optional library that is imported by now."""
    import sys

    for item in list(_LAZY):
        if item[0] in sys.modules:
            _LAZY.remove(item)
            item[1]()


def make_registry(extra_rules: dict[Any, Callable] | None) -> _Registry | None:
    """A registry holding user-supplied rules (``expand(extra_rules={key: fn})``)."""
    if not extra_rules:
        return None
    reg = _Registry()
    for k, fn in extra_rules.items():
        reg.add(k, fn if isinstance(fn, RuleEntry) else RuleEntry(fn))
    return reg
