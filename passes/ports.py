"""Ports: a teacher value that crosses from one expanded scope into another at teacher width.

A teacher built by ``expand`` takes and returns student-width values: its outputs are narrowed
(the mean over the ``r`` copies of each channel) and its inputs widened. When two scopes of one
model connect (``expand(model, r, x, scope=["backbone", "head"])`` and the head reads the
backbone's features), narrowing and widening again at the joint would make the teacher pass
through student width there: the ``r`` copies that the backbone's teacher has learned to make
different would be averaged before the head sees them.

A port keeps the joint at teacher width without changing either teacher's signature:

* the producing scope's output narrowing is :func:`gpd_port_narrow`: the narrowed tensor it
  returns is registered together with the teacher-width tensor it came from;
* the consuming scope's input widening is :func:`gpd_port_widen`: given exactly that narrowed
  tensor (the same object, as the model's own Python code passes it on), it returns the
  registered teacher-width tensor; given anything else, it widens as usual.

Any other reader of the narrowed tensor (the model's own code between the scopes) still sees
student width, and gradients reach the producing scope through both paths. At initialisation the
copies are equal, so both routes give the same values up to rounding; the difference is what
training makes of the copies. A registration lives as long as the narrowed tensor does, and is
not used once the tensor was changed in place (its version counter moved): the consumer then
widens the changed value, as without a port.
"""

from __future__ import annotations

import weakref

from torch import Tensor

from .layout import gpd_narrow, gpd_repeat

__all__ = ["gpd_port_narrow", "gpd_port_widen"]

# id(narrowed tensor) -> (weak reference to it, its teacher-width source, dim, ratio, its version)
_PORTS: dict[int, tuple[weakref.ref, Tensor, int, int, int]] = {}


def _forget(key: int, ref: weakref.ref) -> None:
    entry = _PORTS.get(key)
    if entry is not None and entry[0] is ref:
        del _PORTS[key]


def gpd_port_narrow(x: Tensor, dim: int, ratio: int) -> Tensor:
    """:func:`~gpd_fx.passes.layout.gpd_narrow` of the interleaved ``x``, registering ``x`` as
    the teacher-width value of the result (for :func:`gpd_port_widen`)."""
    y = gpd_narrow(x, dim, ratio)
    key = id(y)
    ref = weakref.ref(y, lambda r, key=key: _forget(key, r))
    _PORTS[key] = (ref, x, dim, ratio, y._version)
    return y


def _widen_one(x, dim, ratio):
    if dim is None or not isinstance(x, Tensor):
        return x
    entry = _PORTS.get(id(x))
    # the version counter (shared with every view) tells whether the model's code between the
    # scopes changed the narrowed tensor in place (relu_, +=): then the source no longer matches
    if entry is not None and entry[0]() is x and entry[2] == dim and entry[3] == ratio and x._version == entry[4]:
        return entry[1]
    return gpd_repeat(x, dim, ratio)


def gpd_port_widen(x, dim, ratio: int):
    """``x`` in the interleaved layout on ``dim``: the registered teacher-width value when ``x``
    is a tensor a producing scope returned through :func:`gpd_port_narrow`, else
    ``repeat_interleave``. For a list or tuple input ``dim`` is a tuple with one entry per member
    (``None``: the member is passed as it is)."""
    if isinstance(x, (list, tuple)):
        return type(x)(_widen_one(v, d, ratio) for v, d in zip(x, dim, strict=True))
    return _widen_one(x, dim, ratio)
