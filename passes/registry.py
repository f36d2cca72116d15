"""The rule registry: one expansion rule per op kind, keyed by module type, function or method name.

A rule is a function ``rule(ctx, node) -> Out`` (see :class:`gpd_fx.passes.widen_context.RuleContext`).
It emits the teacher version of ``node`` and returns its output layout, or raises
:class:`CannotExpand` to let the driver cut a boundary. Module calls, ``torch.*`` functions,
``F.*`` functions and tensor methods reach the same rule by registering all their keys at once::

    @register(nn.ReLU, F.relu, torch.relu, "relu", transparent=True)
    def elementwise(ctx, node): ...

Users add rules for their own layers with the same decorator or ``expand(extra_rules=...)``; a
user rule registered for a key replaces the built-in one. Built-in rules are registered inside
:func:`builtin_rules`, where a key registered twice is an error (the later rule would silently
win): one rule per op kind.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch.fx as fx
from torch import nn

from gpd_fx.errors import GPDError

__all__ = ["register", "lookup", "has_module_rule", "has_user_module_rule", "CannotExpand", "RuleEntry", "RULES", "builtin_rules",
           "DuplicateRuleError"]


class CannotExpand(Exception):
    """Raised by a rule when this instance of its op cannot run expanded; the driver cuts a boundary."""


@dataclass(frozen=True)
class RuleEntry:
    fn: Callable[..., Any]
    # True when the op maps channels one-to-one and never mixes them (activations, pooling,
    # reshapes): a weight layer whose output only reaches the model output through such ops
    # keeps its output at student width (no point widening logits just to narrow them again).
    transparent: bool = False


class DuplicateRuleError(GPDError):
    """A built-in rule key registered twice (a bug in gpd_fx's rule modules)."""


class _Registry:
    def __init__(self) -> None:
        self.modules: dict[type, RuleEntry] = {}
        self.functions: dict[Any, RuleEntry] = {}
        self.methods: dict[str, RuleEntry] = {}
        self._builtin_depth = 0          # > 0 inside ``builtin_rules()``
        self._builtin_keys: dict[Any, RuleEntry] = {}

    def add(self, key: Any, entry: RuleEntry) -> None:
        if isinstance(key, type):
            table = self.modules
        elif isinstance(key, str):
            table = self.methods
        elif callable(key):
            table = self.functions
        else:
            raise TypeError(f"rule key must be a module type, a function or a method name, got {key!r}")
        if self._builtin_depth:
            # one register(...) call may name a function twice: ``F.linear`` is
            # ``torch._C._nn.linear`` in some torch versions and not in others
            alias = self._builtin_keys.get(key) is entry and not isinstance(key, str)
            if key in self._builtin_keys and not alias:
                old = self._builtin_keys[key]
                raise DuplicateRuleError(
                    f"built-in rule key {key!r} is registered twice: by {_name(old)} "
                    f"(transparent={old.transparent}) and by {_name(entry)} (transparent={entry.transparent}). "
                    "Fix: keep the key in one register(...) call of gpd_fx/passes/rules (one rule per op kind).")
            self._builtin_keys[key] = entry
        table[key] = entry

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


def _name(entry: RuleEntry) -> str:
    fn = entry.fn
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', fn)}"


RULES = _Registry()


@contextlib.contextmanager
def builtin_rules() -> Iterator[None]:
    """Rules registered inside this block are gpd_fx's own: registering one key twice raises
    :class:`DuplicateRuleError` (at import, where the duplicate is written)."""
    RULES._builtin_depth += 1
    try:
        yield
    finally:
        RULES._builtin_depth -= 1


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


def has_user_module_rule(module: nn.Module, extra: "_Registry | None" = None) -> bool:
    """True when a user rule (in ``extra``, or registered outside gpd_fx's built-in rules)
    expands ``module`` whole: the tracer must then keep it as one node."""
    if extra is not None and extra.module_rule(type(module)) is not None:
        return True
    entry = RULES.module_rule(type(module))
    return entry is not None and not any(entry is e for e in RULES._builtin_keys.values())


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
            with builtin_rules():
                item[1]()


def make_registry(extra_rules: dict[Any, Callable] | None) -> _Registry | None:
    """A registry holding user-supplied rules (``expand(extra_rules={key: fn})``)."""
    if not extra_rules:
        return None
    reg = _Registry()
    for k, fn in extra_rules.items():
        reg.add(k, fn if isinstance(fn, RuleEntry) else RuleEntry(fn))
    return reg
