"""Exception types raised by gpd_fx. Every message names the node/op and says how to fix it."""

from __future__ import annotations


class GPDError(Exception):
    """Base class of every error raised by gpd_fx."""


class ExpandInputError(GPDError, ValueError):
    """Bad arguments to :func:`gpd_fx.expand` (ratio, example inputs, an already expanded model)."""


class TraceError(GPDError):
    """``torch.fx`` could not trace the model; the message says where and suggests ``leaf_modules``."""


class UnsupportedOpError(GPDError):
    """An op has no expansion rule and ``strict=True`` forbids cutting a boundary."""


class VerificationError(GPDError):
    """The built teacher does not reproduce the student; names the first node that diverges."""


class FoldError(GPDError, ValueError):
    """:func:`gpd_fx.fold` got something that is not an intact expanded teacher."""
