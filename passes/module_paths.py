"""Dotted attribute paths on modules (``"layer1.0.conv.weight"``): read one, or install a value.

The tracer reads graph targets with :func:`get_path`; the build installs the teacher's modules,
parameters and buffers with :func:`set_path`, creating empty parent modules as needed.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

__all__ = ["get_path", "set_path"]


def get_path(root: nn.Module, target: str) -> Any:
    """The object at the dotted path ``target`` below ``root`` (module, parameter, buffer, attribute)."""
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def set_path(root: nn.Module, target: str, value: Any) -> None:
    """Install ``value`` at ``target`` below ``root``: a module, a parameter, a buffer (any other
    tensor) or a plain attribute; missing parents become empty modules, and an entry of another
    kind under the same name is replaced."""
    *parents, name = target.split(".")
    obj = root
    for p in parents:
        if not hasattr(obj, p):
            obj.add_module(p, nn.Module())
        obj = getattr(obj, p)
    if isinstance(value, nn.Module):
        if name in obj._parameters:
            del obj._parameters[name]
        if name in obj._buffers:
            del obj._buffers[name]
        obj.add_module(name, value)
    elif isinstance(value, nn.Parameter):
        if name in obj._modules:
            del obj._modules[name]
        obj.register_parameter(name, value)
    elif isinstance(value, Tensor):
        obj.register_buffer(name, value)
    else:
        setattr(obj, name, value)
