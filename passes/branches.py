"""Channel-branch reparameterization: OREPA-style multi-branch layers folded online (design §2).

Every branch is linear in the input, so the sum of branches is one kernel. Instead of running
the branches separately (DBB) the kernel ``K = sum_b v_b[:, None, ...] * K_b`` is rebuilt in
every forward and applied with a single conv / linear call. The scale vectors ``v_b`` (one
entry per output channel) start at 1 for the original branch and 0 for every other, so the
layer is *exactly* the given one at init, while each extra branch owns randomly initialised
parameters so that ``d loss / d v_b`` is non-zero from the first step.

Which conv branches apply (see :meth:`BranchConvNd.applicable_branches`):

=========== ==================================================================================
``kxk``      always: the original kernel (must be in every branch set).
``1x1``      kernel > 1 somewhere and odd in every spatial dim (a 1x1 needs a centre tap).
``1x1_kxk``  kernel > 1 somewhere: grouped 1x1 (in -> mid) then k×k (mid -> out), composed.
``1x1_avg``  kernel > 1 somewhere: 1x1 (in -> out) then a k×k average (uniform kernel).
``identity`` out == in, stride 1 everywhere, kernel odd everywhere (Dirac at the centre).
=========== ==================================================================================

Every branch uses the layer's stride, padding, dilation and groups, so all land on the k×k
output grid. The fold equals running the branches as separate ops (1x1 conv, then a k×k conv or
average padded like the layer) at the borders too, for every ``padding_mode``: the inner 1x1s
have no bias and act per pixel, so they commute with zero, reflect, replicate and circular
padding. The 1x1 and identity branches read the centre tap of each k×k window.

For 1x1 convs only ``kxk`` and ``identity`` apply: a 1x1 or 1x1-average branch would be the
original kernel again, and 1x1->1x1 only re-factors the same linear map, so they add
parameters without adding a new direction of the kernel.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gpd_fx.errors import GPDError

__all__ = [
    "BRANCH_KINDS_CONV",
    "BRANCH_KINDS_LINEAR",
    "BranchConfigError",
    "BranchConvNd",
    "BranchLinear",
]

BRANCH_KINDS_CONV = ("kxk", "1x1", "1x1_kxk", "1x1_avg", "identity")
BRANCH_KINDS_LINEAR = ("linear", "identity", "lowrank")


class BranchConfigError(GPDError, ValueError):
    """A branch set or layer configuration that the multi-branch layers cannot build."""


def _tuple(value: int | Sequence[int], dim: int, name: str) -> tuple[int, ...]:
    out = (value,) * dim if isinstance(value, int) else tuple(int(v) for v in value)
    if len(out) != dim:
        raise BranchConfigError(f"{name}={value!r} must be an int or a {dim}-tuple")
    return out


def _uniform(shape: Sequence[int], fan_in: int, like: Tensor, generator: torch.Generator | None) -> Tensor:
    # nn.Conv/nn.Linear's default (kaiming_uniform with a=sqrt(5)) bound, drawn from the
    # caller's generator on its own device so that a seed reproduces the layer anywhere.
    bound = 1.0 / math.sqrt(max(1, fan_in))
    device = generator.device if generator is not None else like.device
    t = torch.empty(tuple(shape), dtype=like.dtype, device=device)
    return t.uniform_(-bound, bound, generator=generator).to(like.device)


def _resolve(requested: Sequence[str] | None, reasons: dict[str, str | None], original: str) -> tuple[str, ...]:
    """Validate a requested branch set against ``reasons`` (kind -> why it does not apply)."""
    if requested is None:
        return tuple(k for k, why in reasons.items() if why is None)
    if isinstance(requested, str):
        requested = (requested,)
    kinds = tuple(requested)
    for kind in kinds:
        if kind not in reasons:
            raise BranchConfigError(f"unknown branch kind {kind!r}; valid kinds are {tuple(reasons)}")
        if reasons[kind] is not None:
            raise BranchConfigError(f"branch {kind!r} does not apply to this layer: {reasons[kind]}")
    if len(set(kinds)) != len(kinds):
        raise BranchConfigError(f"branch kinds listed twice in {kinds}")
    if original not in kinds:
        raise BranchConfigError(
            f"branches={kinds} lacks {original!r}, the branch that holds the given weight; add it"
        )
    # The original branch first: at init the sum is then 1*W + 0 + ... + 0, which is W exactly.
    return (original,) + tuple(k for k in kinds if k != original)


@contextlib.contextmanager
def shared_folds(root: nn.Module):
    """Within this block every multi-branch layer under ``root`` folds its kernel at most once.

    Under ``torch.compile`` nothing is cached: the compiler sees both uses and deduplicates them.
    """
    if torch.compiler.is_compiling():
        yield
        return
    layers = [m for m in root.modules() if isinstance(m, _Branched)]
    for m in layers:
        m.__dict__["_fold_memo"] = {}
    try:
        yield
    finally:
        for m in layers:
            m.__dict__["_fold_memo"] = None


class _Branched(nn.Module):
    """Shared plumbing: scale vectors ``v_<kind>`` and the online fold."""

    branches: tuple[str, ...]

    def _init_scales(self, out_features: int, like: Tensor, original: str) -> None:
        self._v_shape = (-1,) + (1,) * (like.dim() - 1)
        self._w_shape = tuple(like.shape)
        for kind in self.branches:
            fill = 1.0 if kind == original else 0.0
            v = torch.full((out_features,), fill, dtype=like.dtype, device=like.device)
            self.register_parameter(f"v_{kind}", nn.Parameter(v))

    def branch_kernel(self, kind: str) -> Tensor:
        """The unscaled kernel ``K_b`` of one branch, shaped like the effective weight."""
        raise NotImplementedError

    def effective_weight(self) -> Tensor:
        """``sum_b v_b[:, None, ...] * K_b``: the one kernel the layer applies (differentiable).

        Inside :func:`shared_folds` the kernel is folded once and reused, so a joint teacher and
        student forward (the student map reads the same kernel) pays for one fold, not two.

        Returns:
            A tensor shaped like the weight given at construction.
        """
        memo = self.__dict__.get("_fold_memo")
        if memo is not None:
            if "w" not in memo:
                memo["w"] = self._fold()
            return memo["w"]
        return self._fold()

    def _fold(self) -> Tensor:
        total = None
        for kind in self.branches:
            kernel = self.branch_kernel(kind)
            # Static shape (not kernel.dim()) so the fold stays traceable by torch.fx.
            v = getattr(self, f"v_{kind}").view(self._v_shape)
            total = v * kernel if total is None else total + v * kernel
        return total

    @property
    def weight(self) -> Tensor:
        """Read-only view of :meth:`effective_weight`, so code that reads ``.weight`` sees the fold."""
        return self.effective_weight()


class BranchConvNd(_Branched):
    """Multi-branch convolution whose effective kernel is re-folded every forward (one conv call).

    Args:
        weight: the original kernel, ``(out, in // groups, *kernel_size)``; copied into ``weight_kxk``.
        bias: the original bias or ``None``; copied, shared by all branches.
        dim: spatial dimensions (1, 2 or 3).
        stride, padding, dilation, groups, padding_mode: as for ``nn.Conv{dim}d`` (``padding``
            may be ``'same'`` or ``'valid'``); every branch uses them, so all share one output grid.
        branches: kinds from :data:`BRANCH_KINDS_CONV`; ``None`` means all that apply.
        generator: source of the extra branches' random initial parameters.
        mid_channels: middle width of the ``1x1_kxk`` branch (a multiple of ``groups``);
            defaults to the input channels.

    Returns:
        A module whose forward is ``F.conv{dim}d(x, effective_weight(), bias, ...)``.

    Example:
        >>> conv = nn.Conv2d(8, 8, 3, padding=1)
        >>> b = BranchConvNd(conv.weight, conv.bias, dim=2, stride=1, padding=1, dilation=1, groups=1)
        >>> torch.equal(b.weight, conv.weight)
        True
    """

    def __init__(
        self,
        weight: Tensor,
        bias: Tensor | None,
        *,
        dim: int,
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] | str = 0,
        dilation: int | Sequence[int] = 1,
        groups: int = 1,
        padding_mode: str = "zeros",
        branches: Sequence[str] | None = None,
        generator: torch.Generator | None = None,
        mid_channels: int | None = None,
    ) -> None:
        super().__init__()
        if dim not in (1, 2, 3) or weight.dim() != dim + 2:
            raise BranchConfigError(f"dim={dim} with a weight of shape {tuple(weight.shape)}; expected dim+2 axes")
        if padding_mode not in ("zeros", "reflect", "replicate", "circular"):
            raise BranchConfigError(f"padding_mode={padding_mode!r} is not one nn.Conv accepts")
        self.dim, self.groups, self.padding_mode = dim, groups, padding_mode
        self.out_channels, self.in_channels = weight.shape[0], weight.shape[1] * groups
        self.kernel_size = tuple(weight.shape[2:])
        self.stride = _tuple(stride, dim, "stride")
        self.dilation = _tuple(dilation, dim, "dilation")
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise BranchConfigError(f"padding={padding!r}; string padding must be 'same' or 'valid'")
            if padding == "same" and any(s != 1 for s in self.stride):
                raise BranchConfigError("padding='same' needs stride 1 (as in nn.Conv)")
            self.padding: tuple[int, ...] | str = padding
        else:
            self.padding = _tuple(padding, dim, "padding")
        if self.out_channels % groups:
            raise BranchConfigError(f"out_channels={self.out_channels} is not divisible by groups={groups}")
        self._pad = self._explicit_padding()

        mid = self.in_channels if mid_channels is None else mid_channels
        if mid % groups:
            raise BranchConfigError(f"mid_channels={mid} is not divisible by groups={groups}")
        reasons = self._reasons(self.in_channels, self.out_channels, self.kernel_size, self.stride)
        self.branches = _resolve(branches, reasons, "kxk")

        self.weight_kxk = nn.Parameter(weight.detach().clone())
        self.register_parameter("bias", None if bias is None else nn.Parameter(bias.detach().clone()))
        cin_g, ones, ksize = self.in_channels // groups, (1,) * dim, math.prod(self.kernel_size)
        if "1x1" in self.branches:
            self.weight_1x1 = nn.Parameter(_uniform((self.out_channels, cin_g, *ones), cin_g, weight, generator))
        if "1x1_kxk" in self.branches:
            self.weight_1x1_kxk_a = nn.Parameter(_uniform((mid, cin_g, *ones), cin_g, weight, generator))
            self.weight_1x1_kxk_b = nn.Parameter(
                _uniform((self.out_channels, mid // groups, *self.kernel_size), mid // groups * ksize, weight, generator)
            )
        if "1x1_avg" in self.branches:
            self.weight_1x1_avg = nn.Parameter(_uniform((self.out_channels, cin_g, *ones), cin_g, weight, generator))
        if "identity" in self.branches:
            # Fixed Dirac kernel; only v_identity learns. Output channel o reads channel o of
            # its own group, which is index o % (in/groups) inside the grouped weight.
            dirac = torch.zeros_like(weight)
            centre = tuple(k // 2 for k in self.kernel_size)
            o = torch.arange(self.out_channels)
            dirac[(o, o % cin_g, *centre)] = 1
            self.register_buffer("dirac", dirac, persistent=False)
        self._init_scales(self.out_channels, weight, "kxk")

    @classmethod
    def _reasons(cls, cin: int, cout: int, kernel: Sequence[int], stride: Sequence[int]) -> dict[str, str | None]:
        big = any(k > 1 for k in kernel)
        odd = all(k % 2 for k in kernel)
        no_big = f"kernel {tuple(kernel)} is 1 everywhere, so this branch would repeat the original"
        return {
            "kxk": None,
            "1x1": None if big and odd else (no_big if not big else f"kernel {tuple(kernel)} has no centre tap (even size)"),
            "1x1_kxk": None if big else no_big,
            "1x1_avg": None if big else no_big,
            "identity": (
                f"needs out_channels == in_channels (got {cout} != {cin})" if cin != cout
                else f"needs stride 1 (got {tuple(stride)})" if any(s != 1 for s in stride)
                else f"kernel {tuple(kernel)} has no centre tap (even size)" if not odd
                else None
            ),
        }

    @classmethod
    def applicable_branches(
        cls, in_channels: int, out_channels: int, kernel_size: int | Sequence[int], *, dim: int = 2,
        stride: int | Sequence[int] = 1,
    ) -> tuple[str, ...]:
        """Which kinds of :data:`BRANCH_KINDS_CONV` apply to a conv of this shape.

        Args:
            in_channels, out_channels, kernel_size, dim, stride: as for ``nn.Conv{dim}d``.

        Returns:
            The applicable kinds, in :data:`BRANCH_KINDS_CONV` order.
        """
        reasons = cls._reasons(in_channels, out_channels, _tuple(kernel_size, dim, "kernel_size"),
                               _tuple(stride, dim, "stride"))
        return tuple(k for k, why in reasons.items() if why is None)

    def _explicit_padding(self) -> list[int]:
        # F.pad order (last dim first), built exactly like nn.Conv's _reversed_padding_repeated_twice.
        if self.padding == "valid":
            return [0, 0] * self.dim
        if self.padding == "same":
            pad = []
            for d, k in zip(reversed(self.dilation), reversed(self.kernel_size)):
                total = d * (k - 1)
                pad += [total // 2, total - total // 2]
            return pad
        return [p for p in reversed(self.padding) for _ in range(2)]

    def branch_kernel(self, kind: str) -> Tensor:
        """The unscaled k×k kernel of branch ``kind`` (composed and zero-padded as needed)."""
        if kind == "kxk":
            return self.weight_kxk
        if kind == "1x1":
            # Zero-pad to the centre: the 1x1 then reads the same input pixel as the k×k centre tap.
            return F.pad(self.weight_1x1, [k // 2 for k in reversed(self.kernel_size) for _ in range(2)])
        if kind == "1x1_kxk":
            g, (out, cin_g, *_) = self.groups, self._w_shape
            # Compose per group: group i of the k×k only sees the middle channels of group i.
            a = self.weight_1x1_kxk_a.reshape(g, -1, cin_g)  # (g, mid/g, in/g)
            b = self.weight_1x1_kxk_b.reshape(g, out // g, -1, math.prod(self.kernel_size))  # (g, out/g, mid/g, k)
            return torch.einsum("gomk,gmi->goik", b, a).reshape(self._w_shape)
        if kind == "1x1_avg":
            # An average over the k×k window after a 1x1 is the 1x1 spread uniformly over the window.
            return (self.weight_1x1_avg / math.prod(self.kernel_size)).expand(self._w_shape)
        if kind == "identity":
            return self.dirac
        raise BranchConfigError(f"branch {kind!r} is not part of this layer (it has {self.branches})")

    def forward(self, x: Tensor) -> Tensor:
        """One convolution with the online-folded kernel, padded as ``nn.Conv`` pads."""
        conv = (F.conv1d, F.conv2d, F.conv3d)[self.dim - 1]
        weight = self.effective_weight()
        if self.padding_mode != "zeros":
            x = F.pad(x, self._pad, mode=self.padding_mode)
            return conv(x, weight, self.bias, self.stride, 0, self.dilation, self.groups)
        return conv(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    @torch.no_grad()
    def fold(self) -> nn.Module:
        """A plain ``nn.Conv{dim}d`` holding the current effective kernel and bias.

        Returns:
            A new conv module with the same configuration; its forward equals this module's.
        """
        cls = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[self.dim - 1]
        w = self.weight_kxk
        conv = cls(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                   self.dilation, self.groups, self.bias is not None, self.padding_mode,
                   device=w.device, dtype=w.dtype)
        conv.weight.copy_(self.effective_weight())
        if self.bias is not None:
            conv.bias.copy_(self.bias)
        return conv

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
                f"padding_mode={self.padding_mode!r}, branches={self.branches}")


class BranchLinear(_Branched):
    """Multi-branch linear layer: original, identity (square only) and low-rank ``A @ B``.

    Args:
        weight: the original ``(out, in)`` weight; copied into ``weight_linear``.
        bias: the original bias or ``None``; copied, shared by all branches.
        branches: kinds from :data:`BRANCH_KINDS_LINEAR`; ``None`` means all that apply.
        rank: rank of the ``lowrank`` branch; default ``max(1, min(in, out) // 4)``.
        generator: source of the low-rank factors' random initial values.

    Returns:
        A module whose forward is ``F.linear(x, effective_weight(), bias)``.
    """

    def __init__(
        self,
        weight: Tensor,
        bias: Tensor | None,
        *,
        branches: Sequence[str] | None = None,
        rank: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if weight.dim() != 2:
            raise BranchConfigError(f"a linear weight must be 2-D, got shape {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self.rank = max(1, min(self.in_features, self.out_features) // 4) if rank is None else int(rank)
        if self.rank < 1:
            raise BranchConfigError(f"rank={rank} must be at least 1")
        reasons = self._reasons(self.in_features, self.out_features)
        self.branches = _resolve(branches, reasons, "linear")
        self.weight_linear = nn.Parameter(weight.detach().clone())
        self.register_parameter("bias", None if bias is None else nn.Parameter(bias.detach().clone()))
        if "lowrank" in self.branches:
            self.lowrank_a = nn.Parameter(_uniform((self.out_features, self.rank), self.rank, weight, generator))
            self.lowrank_b = nn.Parameter(_uniform((self.rank, self.in_features), self.in_features, weight, generator))
        if "identity" in self.branches:
            eye = torch.eye(self.out_features, dtype=weight.dtype, device=weight.device)
            self.register_buffer("eye", eye, persistent=False)
        self._init_scales(self.out_features, weight, "linear")

    @classmethod
    def _reasons(cls, in_features: int, out_features: int) -> dict[str, str | None]:
        square = in_features == out_features
        why = None if square else f"needs in_features == out_features (got {in_features} != {out_features})"
        return {"linear": None, "identity": why, "lowrank": None}

    @classmethod
    def applicable_branches(cls, in_features: int, out_features: int) -> tuple[str, ...]:
        """Which kinds of :data:`BRANCH_KINDS_LINEAR` apply to an ``in -> out`` linear layer.

        Returns:
            The applicable kinds, in :data:`BRANCH_KINDS_LINEAR` order.
        """
        return tuple(k for k, why in cls._reasons(in_features, out_features).items() if why is None)

    def branch_kernel(self, kind: str) -> Tensor:
        """The unscaled ``(out, in)`` matrix of branch ``kind``."""
        if kind == "linear":
            return self.weight_linear
        if kind == "identity":
            return self.eye
        if kind == "lowrank":
            return self.lowrank_a @ self.lowrank_b
        raise BranchConfigError(f"branch {kind!r} is not part of this layer (it has {self.branches})")

    def forward(self, x: Tensor) -> Tensor:
        """One ``F.linear`` with the online-folded weight."""
        return F.linear(x, self.effective_weight(), self.bias)

    @torch.no_grad()
    def fold(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding the current effective weight and bias.

        Returns:
            A new linear module whose forward equals this module's.
        """
        w = self.weight_linear
        lin = nn.Linear(self.in_features, self.out_features, self.bias is not None, device=w.device, dtype=w.dtype)
        lin.weight.copy_(self.effective_weight())
        if self.bias is not None:
            lin.bias.copy_(self.bias)
        return lin

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, rank={self.rank}, branches={self.branches}"
