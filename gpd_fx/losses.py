"""Knowledge-distillation losses and the GPD training objective.

Everything here is a pure function of logits (no modules, no state), so the training step
that calls :func:`gpd_loss` can be traced by ``torch.compile`` as one graph: input checks
only look at shapes and dtypes, never at tensor values.

The GPD objective (DESIGN.md §4), per batch, with an optional static teacher ``T``::

    L_DT = CE(DT, y) + [w_s * KD_s(DT, T)]
    L_S  = CE(S, y)  + [w_s * KD_s(S, T)] + lambda * KD_dt(S, DT.detach())
    loss = L_DT + L_S

``KD_s`` and ``KD_dt`` are looked up by name in :data:`KD_LOSSES`; users add their own with
:func:`register_kd_loss`.

Which loss applies to which output (DESIGN.md §4.1):

- **class logits** ``(N, K)`` with targets ``(N,)``: :func:`gpd_loss`, or one KD loss
  (:func:`hinton_kd`, :func:`label_smoothed_soft_ce`, :func:`dkd`) on its own.
- **dense logits** ``(N, K, *spatial)`` (segmentation ``(N, K, H, W)``, any trailing dims) with
  targets ``(N, *spatial)``: the same :func:`gpd_loss`, with ``ignore_index`` for unlabelled
  pixels. Every pixel is one row of the class-logit objective: the CE terms and every KD term
  are averaged over the pixels that are not ignored. :func:`flatten_dense` exposes that
  mapping for a KD loss used on its own.
- **features** of the same layer in teacher and student (the teacher's ``r`` times wider on its
  channel dim, interleaved layout): :func:`feature_kd`, an MSE between the student's feature and
  the teacher's narrowed to student width by :func:`narrow_feature` (the mean over the ``r``
  copies of each channel, as the student map and the boundaries narrow).

Dense targets with ``ignore_index`` select the kept pixels by a boolean mask (a row count that
depends on the data); torch 2.14's ``torch.compile`` still captures the objective as one graph,
and nothing here branches on that count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from gpd_fx.errors import GPDError

__all__ = [
    "KD_LOSSES",
    "GPDLossConfig",
    "KDLossFn",
    "LossInputError",
    "dkd",
    "feature_kd",
    "flatten_dense",
    "get_kd_loss",
    "gpd_loss",
    "hinton_kd",
    "label_smoothed_soft_ce",
    "narrow_feature",
    "register_kd_loss",
]


class LossInputError(GPDError, ValueError):
    """Bad logits/targets or an invalid :class:`GPDLossConfig` (unknown loss name, bad range)."""


# ----------------------------------------------------------------------------- checks


def _check_logits(student_logits: Tensor, teacher_logits: Tensor, who: str = "teacher") -> None:
    """Both logits must be ``(N, K)`` with identical shapes; name both shapes otherwise."""
    if student_logits.dim() != 2:
        raise LossInputError(
            f"student_logits must be 2-D (batch, num_classes), got shape {tuple(student_logits.shape)}"
        )
    if student_logits.shape != teacher_logits.shape:
        raise LossInputError(
            f"student_logits shape {tuple(student_logits.shape)} does not match "
            f"{who}_logits shape {tuple(teacher_logits.shape)}; both must be (batch, num_classes)"
        )


def _check_targets(logits: Tensor, targets: Tensor) -> None:
    """Targets are class indices ``(N,)`` of an integer dtype, one per row of ``logits``."""
    if targets.dim() != 1 or targets.shape[0] != logits.shape[0]:
        raise LossInputError(
            f"targets shape {tuple(targets.shape)} does not match logits shape "
            f"{tuple(logits.shape)}; expected class indices of shape ({logits.shape[0]},)"
        )
    _check_target_dtype(targets)


def _check_target_dtype(targets: Tensor) -> None:
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise LossInputError(
            f"targets must hold integer class indices (torch.long), got dtype {targets.dtype}"
        )


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise LossInputError(f"temperature must be > 0, got {temperature}")


def _kl_rows(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``sum_k p_k (log p_k - log q_k)`` per row, from log-probabilities.

    ``kl_div`` with ``log_target=True`` is used because it stays finite where ``p_k``
    underflows to 0 (an explicit ``p * (log p - log q)`` would give ``0 * -inf = nan``).
    """
    return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(dim=-1)


# ----------------------------------------------------------------------------- dense outputs


def _check_dense_logits(student_logits: Tensor, other: Tensor, who: str) -> None:
    """Logits ``(N, K)`` or ``(N, K, *spatial)``, identical shapes; name both shapes otherwise."""
    if student_logits.dim() < 2:
        raise LossInputError(
            f"student_logits must be (batch, num_classes) or (batch, num_classes, *spatial), "
            f"got shape {tuple(student_logits.shape)}"
        )
    if student_logits.shape != other.shape:
        raise LossInputError(
            f"student_logits shape {tuple(student_logits.shape)} does not match "
            f"{who}_logits shape {tuple(other.shape)}; both must be (batch, num_classes) or "
            "(batch, num_classes, *spatial) with the same sizes"
        )


def _check_dense_targets(logits: Tensor, targets: Tensor) -> None:
    """Targets hold one integer class per row/pixel: shape ``(N, *spatial)`` of ``(N, K, *spatial)``."""
    expected = (logits.shape[0], *logits.shape[2:])
    if tuple(targets.shape) != expected:
        raise LossInputError(
            f"targets shape {tuple(targets.shape)} does not match logits shape "
            f"{tuple(logits.shape)}; expected class indices of shape {expected} "
            "(the logits' shape without the class dim 1)"
        )
    _check_target_dtype(targets)


def _check_ignore_index(targets: Tensor, ignore_index: int | None) -> None:
    """``ignore_index`` is ``None`` or a plain int that the targets' dtype can hold.

    A value the dtype cannot hold (``-100`` with ``uint8`` masks) would silently ignore
    nothing, so it is refused rather than compared.
    """
    if ignore_index is None:
        return
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise LossInputError(
            f"ignore_index must be an int (the label of unlabelled pixels, e.g. 255) or None, "
            f"got {ignore_index!r} of type {type(ignore_index).__name__}"
        )
    info = torch.iinfo(targets.dtype)
    if not info.min <= ignore_index <= info.max:
        raise LossInputError(
            f"ignore_index={ignore_index} cannot occur in targets of dtype {targets.dtype} "
            f"(range [{info.min}, {info.max}]), so no pixel would be ignored; "
            "use the label your masks use for unlabelled pixels"
        )


def flatten_dense(
    targets: Tensor, *logits: Tensor, ignore_index: int | None = None
) -> tuple[Tensor, ...]:
    """Dense logits and targets as rows of class logits, one row per kept pixel.

    ``(N, K, *spatial)`` logits become ``(M, K)`` with the class dim last, in the order of
    ``targets.reshape(-1)``; ``(N, *spatial)`` targets become ``(M,)`` long. ``M`` counts the
    pixels whose target is not ``ignore_index`` (all of them when it is ``None``). Every
    class-logit loss in this module then applies per pixel, averaged over kept pixels. Shapes
    are checked by the caller (:func:`gpd_loss`) or must already agree.

    Args:
        targets: ``(N, *spatial)`` integer classes.
        *logits: any number of ``(N, K, *spatial)`` logits of the same shape.
        ignore_index: label of pixels to drop, or ``None`` to keep every pixel.

    Returns:
        ``(targets_rows, *logit_rows)``.

    Example:
        >>> y = torch.tensor([[[0, 255], [1, 2]]])          # (1, 2, 2), one pixel unlabelled
        >>> z = torch.randn(1, 3, 2, 2)
        >>> rows_y, rows_z = flatten_dense(y, z, ignore_index=255)
        >>> rows_y.tolist(), tuple(rows_z.shape)
        ([0, 1, 2], (3, 3))
    """
    rows_targets = targets.reshape(-1).long()
    rows = [z.movedim(1, -1).reshape(-1, z.shape[1]) for z in logits]
    if ignore_index is None:
        return (rows_targets, *rows)
    keep = rows_targets != ignore_index
    return (rows_targets[keep], *(z[keep] for z in rows))


# ----------------------------------------------------------------------------- losses


def hinton_kd(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0) -> Tensor:
    """Hinton et al. (2015) soft-target distillation loss.

    ``T^2 * mean_n KL(softmax(t_n / T) || softmax(s_n / T))``. The ``T^2`` keeps the gradient
    magnitude comparable across temperatures. Gradients flow into both arguments; detach the
    teacher yourself if it must stay fixed (:func:`gpd_loss` does).

    Args:
        student_logits: ``(N, K)`` logits of the model being taught.
        teacher_logits: ``(N, K)`` logits of the teacher.
        temperature: softmax temperature ``T > 0``.

    Returns:
        Scalar tensor; exactly 0 when the logits are equal, > 0 otherwise (up to shifts of a
        row by a constant, which leave its softmax unchanged).

    Example:
        >>> s, t = torch.randn(8, 10), torch.randn(8, 10)
        >>> hinton_kd(s, t, temperature=4.0).shape
        torch.Size([])
    """
    _check_logits(student_logits, teacher_logits)
    _check_temperature(temperature)
    log_p_t = F.log_softmax(teacher_logits / temperature, dim=-1)
    log_p_s = F.log_softmax(student_logits / temperature, dim=-1)
    return _kl_rows(log_p_t, log_p_s).mean() * temperature**2


def label_smoothed_soft_ce(
    student_logits: Tensor,
    teacher_logits: Tensor,
    smoothing: float = 0.1,
    temperature: float = 1.0,
) -> Tensor:
    """Soft cross-entropy against the teacher's probabilities, label-smoothed towards uniform.

    The official GPD default for the dynamic-teacher -> student term. Exactly::

        q_n    = (1 - smoothing) * softmax(t_n / T) + smoothing / K
        loss   = T^2 * mean_n ( - sum_k q_nk * log_softmax(s_n / T)_k )

    with ``K`` the number of classes. With ``T = 1`` (the default) the ``T^2`` factor is 1;
    it is there so that raising ``T`` scales gradients like :func:`hinton_kd`. Unlike a KL
    divergence this loss is not 0 when the logits agree: it includes the entropy of ``q``.

    Args:
        student_logits: ``(N, K)`` logits of the model being taught.
        teacher_logits: ``(N, K)`` logits of the teacher.
        smoothing: weight ``0 <= smoothing <= 1`` of the uniform distribution in the target.
        temperature: softmax temperature ``T > 0``.

    Returns:
        Scalar tensor.

    Example:
        >>> s, t = torch.randn(8, 10), torch.randn(8, 10)
        >>> float(label_smoothed_soft_ce(s, t, smoothing=0.1)) > 0
        True
    """
    _check_logits(student_logits, teacher_logits)
    _check_temperature(temperature)
    if not 0.0 <= smoothing <= 1.0:
        raise LossInputError(f"smoothing must be in [0, 1], got {smoothing}")
    num_classes = teacher_logits.shape[-1]
    target = (1.0 - smoothing) * F.softmax(teacher_logits / temperature, dim=-1) + smoothing / num_classes
    log_p_s = F.log_softmax(student_logits / temperature, dim=-1)
    return -(target * log_p_s).sum(dim=-1).mean() * temperature**2


def _non_target_logits(logits: Tensor, targets: Tensor) -> Tensor:
    """The ``(N, K-1)`` logits of every class but the target, in class order.

    Dropping the column (rather than setting it to ``-inf``) keeps the softmax over the
    non-target classes free of ``0 * -inf`` terms. A gather with index ``j + (j >= y)``
    rather than boolean-mask indexing keeps every shape static for ``torch.compile``.
    """
    j = torch.arange(logits.shape[1] - 1, device=logits.device).unsqueeze(0)
    index = j + (j >= targets.unsqueeze(1)).to(j.dtype)
    return logits.gather(1, index)


def dkd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
) -> Tensor:
    """Decoupled Knowledge Distillation (Zhao et al., CVPR 2022): ``alpha*TCKD + beta*NCKD``.

    With ``p = softmax(z / T)`` and target class ``y`` (per sample, for teacher and student):

    - binary distribution ``b = [p_y, 1 - p_y]``; ``TCKD = KL(b^T || b^S)``;
    - non-target distribution ``p_hat_k = p_k / (1 - p_y)`` for ``k != y``, i.e. the softmax of
      the logits with class ``y`` removed; ``NCKD = KL(p_hat^T || p_hat^S)``.

    Classical KD decomposes as ``TCKD + (1 - p_y^T) * NCKD``; DKD replaces the coupled weight
    by free ``alpha`` and ``beta``. The result is averaged over the batch and multiplied by
    ``T^2`` as in :func:`hinton_kd`. All log-probabilities are formed by ``log_softmax`` /
    ``logsumexp`` so that confident teachers (``p_y -> 1``) stay finite.

    Args:
        student_logits: ``(N, K)`` logits of the model being taught, ``K >= 2``.
        teacher_logits: ``(N, K)`` logits of the teacher.
        targets: ``(N,)`` integer ground-truth classes.
        alpha: weight of the target-class term TCKD.
        beta: weight of the non-target-class term NCKD.
        temperature: softmax temperature ``T > 0``.

    Returns:
        Scalar tensor.

    Example:
        >>> s, t, y = torch.randn(8, 10), torch.randn(8, 10), torch.randint(0, 10, (8,))
        >>> bool(torch.isfinite(dkd(s, t, y)))
        True
    """
    _check_logits(student_logits, teacher_logits)
    _check_targets(student_logits, targets)
    _check_temperature(temperature)
    if student_logits.shape[1] < 2:
        raise LossInputError(
            f"dkd needs at least 2 classes, got logits of shape {tuple(student_logits.shape)}"
        )

    def binary_and_non_target(z: Tensor) -> tuple[Tensor, Tensor]:
        z = z / temperature
        log_all = torch.logsumexp(z, dim=-1)
        non_target = _non_target_logits(z, targets)
        log_rest = torch.logsumexp(non_target, dim=-1)
        log_p_y = z.gather(1, targets.unsqueeze(1)).squeeze(1) - log_all
        log_b = torch.stack([log_p_y, log_rest - log_all], dim=-1)  # log [p_y, 1 - p_y]
        return log_b, F.log_softmax(non_target, dim=-1)

    log_b_t, log_hat_t = binary_and_non_target(teacher_logits)
    log_b_s, log_hat_s = binary_and_non_target(student_logits)
    tckd = _kl_rows(log_b_t, log_b_s).mean()
    nckd = _kl_rows(log_hat_t, log_hat_s).mean()
    return (alpha * tckd + beta * nckd) * temperature**2


# ----------------------------------------------------------------------------- registry


@dataclass
class GPDLossConfig:
    """Which KD losses :func:`gpd_loss` uses, and their weights and hyper-parameters.

    Attributes:
        dt_to_student: :data:`KD_LOSSES` name of the dynamic-teacher -> student term.
        dt_to_student_weight: ``lambda`` in DESIGN.md §4 (official default 3).
        static_kd: :data:`KD_LOSSES` name of the static-teacher -> {DT, student} terms.
        static_kd_weight: weight of each static-teacher term.
        temperature: temperature of ``"kd"`` and ``"dkd"``.
        smoothing: label smoothing of ``"ls_ce"``.
        dkd_alpha: ``alpha`` of ``"dkd"``.
        dkd_beta: ``beta`` of ``"dkd"``.
        ls_temperature: temperature of ``"ls_ce"``. Separate from ``temperature`` because the
            official DT -> student loss works on raw logits (``T = 1``) while the static KD
            default uses ``T = 4``.
    """

    dt_to_student: str = "ls_ce"
    dt_to_student_weight: float = 3.0
    static_kd: str = "kd"
    static_kd_weight: float = 1.0
    temperature: float = 4.0
    smoothing: float = 0.1
    dkd_alpha: float = 1.0
    dkd_beta: float = 8.0
    ls_temperature: float = 1.0

    def __post_init__(self) -> None:
        # fail when the config is built, not at the first training step
        get_kd_loss(self.dt_to_student)
        get_kd_loss(self.static_kd)
        for name in ("temperature", "ls_temperature"):
            if not getattr(self, name) > 0:
                raise LossInputError(f"GPDLossConfig.{name} must be > 0, got {getattr(self, name)}")
        for name in ("dt_to_student_weight", "static_kd_weight"):
            if getattr(self, name) < 0:
                raise LossInputError(f"GPDLossConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.smoothing <= 1.0:
            raise LossInputError(f"GPDLossConfig.smoothing must be in [0, 1], got {self.smoothing}")


KDLossFn = Callable[[Tensor, Tensor, Tensor, GPDLossConfig], Tensor]
"""Uniform signature of a registered KD loss: ``(student_logits, teacher_logits, targets, cfg)``."""

KD_LOSSES: dict[str, KDLossFn] = {}
"""KD losses by name. Each entry adapts a loss to :data:`KDLossFn`, reading its
hyper-parameters from the :class:`GPDLossConfig`. Fill with :func:`register_kd_loss`."""


def register_kd_loss(name: str) -> Callable[[KDLossFn], KDLossFn]:
    """Decorator adding a KD loss to :data:`KD_LOSSES` under ``name``.

    Args:
        name: key used in :class:`GPDLossConfig` (``dt_to_student`` / ``static_kd``).

    Returns:
        The decorator; it returns the function unchanged.

    Example:
        >>> @register_kd_loss("mse_logits")
        ... def _mse(student, teacher, targets, cfg):
        ...     return F.mse_loss(student, teacher)
        >>> cfg = GPDLossConfig(dt_to_student="mse_logits")
    """

    def decorator(fn: KDLossFn) -> KDLossFn:
        if name in KD_LOSSES:
            raise LossInputError(f"a KD loss named {name!r} is already registered; pick another name")
        KD_LOSSES[name] = fn
        return fn

    return decorator


def get_kd_loss(name: str) -> KDLossFn:
    """The registered KD loss called ``name``; the error lists the valid names.

    Args:
        name: a key of :data:`KD_LOSSES`.

    Returns:
        The loss, with signature :data:`KDLossFn`.

    Example:
        >>> get_kd_loss("kd") is KD_LOSSES["kd"]
        True
    """
    try:
        return KD_LOSSES[name]
    except KeyError:
        raise LossInputError(
            f"unknown KD loss {name!r}; valid names: {sorted(KD_LOSSES)} "
            "(add your own with gpd_fx.losses.register_kd_loss)"
        ) from None


@register_kd_loss("kd")
def _kd_entry(student: Tensor, teacher: Tensor, targets: Tensor, cfg: GPDLossConfig) -> Tensor:
    return hinton_kd(student, teacher, temperature=cfg.temperature)


@register_kd_loss("ls_ce")
def _ls_ce_entry(student: Tensor, teacher: Tensor, targets: Tensor, cfg: GPDLossConfig) -> Tensor:
    return label_smoothed_soft_ce(student, teacher, smoothing=cfg.smoothing, temperature=cfg.ls_temperature)


@register_kd_loss("dkd")
def _dkd_entry(student: Tensor, teacher: Tensor, targets: Tensor, cfg: GPDLossConfig) -> Tensor:
    return dkd(student, teacher, targets, alpha=cfg.dkd_alpha, beta=cfg.dkd_beta, temperature=cfg.temperature)


# ----------------------------------------------------------------------------- objective


def gpd_loss(
    teacher_logits: Tensor,
    student_logits: Tensor,
    targets: Tensor,
    cfg: GPDLossConfig | None = None,
    static_logits: Tensor | None = None,
    ignore_index: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The GPD objective for one batch (DESIGN.md §4), for class or dense logits.

    ::

        L_DT = CE(DT, y) + [w_s * KD_s(DT, T)]
        L_S  = CE(S, y)  + [w_s * KD_s(S, T)] + lambda * KD_dt(S, DT.detach())
        loss = L_DT + L_S

    ``DT`` is detached in the ``lambda`` term so the dynamic teacher is trained by its own
    terms only and is not pulled towards the student. Static-teacher logits are constants
    (detached here too, so a caller that forgot ``torch.no_grad`` still cannot train it).
    The bracketed terms are present only when ``static_logits`` is given.

    Dense logits ``(N, K, *spatial)`` (segmentation) are the same objective per pixel: each
    pixel is one row of class logits (:func:`flatten_dense`), pixels whose target is
    ``ignore_index`` are dropped, and every term is the mean over the kept pixels. For
    ``(N, K)`` logits without ``ignore_index`` nothing is reshaped. A batch whose pixels are
    all ignored gives a zero loss (zero gradients) instead of ``F.cross_entropy``'s ``nan``.

    Args:
        teacher_logits: ``(N, K)`` or ``(N, K, *spatial)`` logits of the dynamic teacher.
        student_logits: logits of the student, same shape.
        targets: ``(N,)`` or ``(N, *spatial)`` integer ground-truth classes.
        cfg: loss names, weights and hyper-parameters; defaults to ``GPDLossConfig()``.
        static_logits: optional logits of a static (pretrained) teacher, same shape.
        ignore_index: target value of unlabelled rows/pixels (255 for VOC-style masks), or
            ``None`` (default) to use every one.

    Returns:
        ``(loss, parts)``: the scalar loss to backpropagate, and a dict of detached scalars
        for logging: ``ce_teacher``, ``ce_student``, ``kd_teacher_static``,
        ``kd_student_static``, ``kd_student_dt`` (each before its weight; the static ones are
        0 without a static teacher) and ``total`` (the weighted sum, equal to ``loss``).

    Example:
        >>> dt, s, y = torch.randn(4, 10), torch.randn(4, 10), torch.randint(0, 10, (4,))
        >>> loss, parts = gpd_loss(dt, s, y, GPDLossConfig())
        >>> sorted(parts)[:2]
        ['ce_student', 'ce_teacher']
        >>> seg_dt, seg_s = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
        >>> mask = torch.randint(0, 3, (2, 8, 8)); mask[:, 0] = 255   # first row unlabelled
        >>> bool(torch.isfinite(gpd_loss(seg_dt, seg_s, mask, ignore_index=255)[0]))
        True
    """
    cfg = GPDLossConfig() if cfg is None else cfg
    _check_dense_logits(student_logits, teacher_logits, who="teacher")
    if static_logits is not None:
        _check_dense_logits(student_logits, static_logits, who="static")
    _check_dense_targets(student_logits, targets)
    _check_ignore_index(targets, ignore_index)
    if student_logits.dim() == 2 and ignore_index is None:
        # the class-logit case: the original objective, untouched
        return _gpd_rows(teacher_logits, student_logits, targets, cfg, static_logits)

    logits = (teacher_logits, student_logits) + (() if static_logits is None else (static_logits,))
    rows_targets, *rows = flatten_dense(targets, *logits, ignore_index=ignore_index)
    loss, parts = _gpd_rows(rows[0], rows[1], rows_targets, cfg, rows[2] if len(rows) == 3 else None)
    if ignore_index is None:
        return loss, parts
    return _zero_when_unlabelled((targets != ignore_index).any(), loss, parts)


def _zero_when_unlabelled(
    labelled: Tensor, loss: Tensor, parts: dict[str, Tensor]
) -> tuple[Tensor, dict[str, Tensor]]:
    """0 instead of ``nan`` for a batch whose pixels are all ignored.

    Then the rows are empty and every mean is ``nan``. A ``where`` on a tensor flag, not a
    Python branch on the row count, so a compiled step has no data-dependent guard. The
    loss stays connected to every input (``backward`` works, DDP sees every parameter used)
    and the gradients are exactly 0: the logits reach it only through the empty rows.
    """
    zero = loss.new_zeros(())
    return torch.where(labelled, loss, zero), {k: torch.where(labelled, v, zero) for k, v in parts.items()}


def _gpd_rows(
    teacher_logits: Tensor,
    student_logits: Tensor,
    targets: Tensor,
    cfg: GPDLossConfig,
    static_logits: Tensor | None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """:func:`gpd_loss` on checked ``(N, K)`` rows and ``(N,)`` targets."""
    dt_kd = get_kd_loss(cfg.dt_to_student)

    ce_teacher = F.cross_entropy(teacher_logits, targets)
    ce_student = F.cross_entropy(student_logits, targets)
    kd_student_dt = dt_kd(student_logits, teacher_logits.detach(), targets, cfg)

    if static_logits is not None:
        static_kd = get_kd_loss(cfg.static_kd)
        static = static_logits.detach()
        kd_teacher_static = static_kd(teacher_logits, static, targets, cfg)
        kd_student_static = static_kd(student_logits, static, targets, cfg)
        loss_teacher = ce_teacher + cfg.static_kd_weight * kd_teacher_static
        loss_student = ce_student + cfg.static_kd_weight * kd_student_static
    else:
        # zeros keep the set of logged keys fixed whatever the scenario
        kd_teacher_static = kd_student_static = student_logits.new_zeros(())
        loss_teacher, loss_student = ce_teacher, ce_student

    loss = loss_teacher + loss_student + cfg.dt_to_student_weight * kd_student_dt
    parts = {
        "ce_teacher": ce_teacher.detach(),
        "ce_student": ce_student.detach(),
        "kd_teacher_static": kd_teacher_static.detach(),
        "kd_student_static": kd_student_static.detach(),
        "kd_student_dt": kd_student_dt.detach(),
        "total": loss.detach(),
    }
    return loss, parts


# ----------------------------------------------------------------------------- features


def _check_feature_pair(teacher_feat: Tensor, student_feat: Tensor, ratio: int, channel_dim: int) -> int:
    """The teacher's feature is the student's with ``ratio`` times the channels; returns the dim >= 0."""
    if isinstance(ratio, bool) or not isinstance(ratio, int) or ratio < 1:
        raise LossInputError(f"ratio must be an int >= 1 (the expand ratio), got {ratio!r}")
    t_shape, s_shape = tuple(teacher_feat.shape), tuple(student_feat.shape)
    if teacher_feat.dim() != student_feat.dim():
        raise LossInputError(
            f"teacher feature shape {t_shape} and student feature shape {s_shape} differ in rank; "
            "they must come from the same layer"
        )
    if not -student_feat.dim() <= channel_dim < student_feat.dim():
        raise LossInputError(
            f"channel_dim={channel_dim} is out of range for features of rank {student_feat.dim()} "
            f"(student shape {s_shape})"
        )
    dim = channel_dim % student_feat.dim()
    expected = s_shape[:dim] + (ratio * s_shape[dim],) + s_shape[dim + 1 :]
    if t_shape != expected:
        raise LossInputError(
            f"teacher feature shape {t_shape} does not fit student feature shape {s_shape} at "
            f"ratio {ratio}: expected {expected} (channel dim {dim} ratio times wider, every other "
            "dim equal); pass the ratio given to expand and the feature's channel dim"
        )
    return dim


def narrow_feature(teacher_feat: Tensor, ratio: int, channel_dim: int = 1) -> Tensor:
    """A teacher feature at student width: the mean over the ``ratio`` copies of each channel.

    In the interleaved layout (DESIGN.md §1) teacher channel ``i`` holds student channel
    ``i // r``, so the copies of a channel are adjacent: ``(..., r*C, ...)`` is reshaped to
    ``(..., C, r, ...)`` and averaged over the ``r`` axis. At initialisation the copies are
    equal, so this returns the student's feature; it is the same narrowing the boundaries use.
    Only for tensors in the interleaved layout (conv, linear and norm outputs, residual sums);
    a tensor in another channel order (after ``flatten(1)`` of NCHW, a channel shuffle) is not.

    Args:
        teacher_feat: the teacher's feature, ``ratio * C`` channels on ``channel_dim``.
        ratio: the expand ratio ``r``.
        channel_dim: the channel dim (1 for NCHW / NC..., -1 for tokens ``(N, L, C)``).

    Returns:
        The narrowed feature, ``C`` channels on ``channel_dim``.

    Example:
        >>> s = torch.randn(2, 4, 5, 5)
        >>> torch.equal(narrow_feature(s.repeat_interleave(2, dim=1), 2), s)
        True
    """
    if isinstance(ratio, bool) or not isinstance(ratio, int) or ratio < 1:
        raise LossInputError(f"ratio must be an int >= 1 (the expand ratio), got {ratio!r}")
    if not -teacher_feat.dim() <= channel_dim < teacher_feat.dim():
        raise LossInputError(
            f"channel_dim={channel_dim} is out of range for a feature of shape {tuple(teacher_feat.shape)}"
        )
    dim = channel_dim % teacher_feat.dim()
    width = teacher_feat.shape[dim]
    if width % ratio:
        raise LossInputError(
            f"teacher feature shape {tuple(teacher_feat.shape)} has {width} channels on dim {dim}, "
            f"not a multiple of ratio {ratio}"
        )
    shape = teacher_feat.shape[:dim] + (width // ratio, ratio) + teacher_feat.shape[dim + 1 :]
    return teacher_feat.reshape(shape).mean(dim=dim + 1)


def feature_kd(
    teacher_feat: Tensor,
    student_feat: Tensor,
    ratio: int,
    channel_dim: int = 1,
    detach_teacher: bool = True,
) -> Tensor:
    """Feature distillation between one layer's teacher and student outputs (an MSE hint loss).

    ``mean((student_feat - narrow_feature(teacher_feat))**2)`` over every element. MSE on the
    raw features (a FitNets-style hint) is the choice because the narrowed teacher feature and
    the student's are on the same scale by construction (equal at initialisation), so no
    learned adapter or normalisation is needed; the loss is exactly 0 for an exact pair and
    grows as the wide teacher's copies diverge from the student.

    The teacher side is detached by default, as the DT is in :func:`gpd_loss`'s
    DT -> student term: the teacher is not pulled towards the student.

    During training, capture the pair with forward hooks on ``dt.teacher.get_submodule(name)``
    and ``dt.template.get_submodule(name)`` (the teacher's modules keep the student's names;
    ``dt.joint`` and ``dt.student`` run ``dt.template``). Store ``out.clone()`` in the hook: a
    model may modify the output in place after the hook has run (torchvision's ResNet adds
    the shortcut into ``bn2``'s output), while the teacher graph computes out of place.

    Args:
        teacher_feat: the dynamic teacher's feature, ``ratio`` times wider on ``channel_dim``
            in the interleaved layout (e.g. a conv output inside the teacher).
        student_feat: the student's feature of the same layer.
        ratio: the expand ratio ``r``.
        channel_dim: channel dim of both features (1 for NCHW, -1 for ``(N, L, C)`` tokens).
        detach_teacher: stop gradients into the teacher's feature (default ``True``).

    Returns:
        Scalar tensor.

    Example:
        >>> s = torch.randn(2, 4, 5, 5)
        >>> feature_kd(s.repeat_interleave(3, dim=1), s, ratio=3).item() < 1e-12
        True
    """
    dim = _check_feature_pair(teacher_feat, student_feat, ratio, channel_dim)
    teacher = teacher_feat.detach() if detach_teacher else teacher_feat
    return F.mse_loss(student_feat, narrow_feature(teacher, ratio, dim))
