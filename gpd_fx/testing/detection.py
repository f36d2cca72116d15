"""torchvision detectors in the zoo: preparation, targets, and the check through ``scope=``.

Detectors select boxes in Python over image lists, so neither front end captures them whole;
the zoo expands their backbone (+ FPN) with ``gpd_fx.expand(model, r, (images,),
scope=["backbone"])``. What makes such a row meaningful, and is shared by the sweep
(:func:`gpd_fx.testing.measure`) and the tests:

* :func:`prepare_detector`: the input side of the R-CNN/RetinaNet/FCOS transform set to the
  zoo's size (the SSDs keep their fixed 300/320), and every score threshold set to 0, because
  random-init heads score below the defaults and would leave no boxes to compare (Mask and
  Keypoint R-CNN keep 10 detections per image, which their per-detection heads then run on);
* :func:`detection_images`, :func:`detection_targets`: seeded images in [0, 1] and seeded
  targets (boxes, labels, and masks or keypoints where the model has those heads), so that the
  train-mode forward (which needs targets) returns its loss dict;
* :func:`check_detector`: teacher, student and fold against the model through
  :func:`gpd_fx.scope.compare_scoped` (each scope's output within tolerance, and the whole
  outputs equal or, after a discontinuous selection among tied scores, reproduced bit for bit by
  the model run on the teacher's scope outputs).

Everything is decided by module types and attributes (``GeneralizedRCNNTransform``,
``RoIHeads``, ...), never by the model's name.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["DEFAULT_SCOPE", "check_detector", "detection_images", "detection_targets", "prepare_detector",
           "scope_input_side"]

DEFAULT_SCOPE = ("backbone",)   # backbone + FPN (torchvision puts the FPN inside ``backbone``)
MASK_KEYPOINT_DETECTIONS = 10   # detections per image kept by R-CNNs with a mask or keypoint head


def prepare_detector(model: nn.Module, size: int) -> nn.Module:
    """Set ``model``'s transform to ``size`` (unless it has a fixed size, as the SSDs do) and every
    score threshold to 0; returns ``model``.

    Random-init heads give scores below the default thresholds (0.05 and more), so without this
    the detections are empty and any comparison of them passes vacuously.
    """
    from torchvision.models.detection import FCOS, RetinaNet
    from torchvision.models.detection.ssd import SSD
    from torchvision.models.detection.roi_heads import RoIHeads
    from torchvision.models.detection.rpn import RegionProposalNetwork
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    thresholded = (RoIHeads, RegionProposalNetwork, RetinaNet, FCOS, SSD)   # each has a score_thresh

    for m in model.modules():
        if isinstance(m, GeneralizedRCNNTransform) and m.fixed_size is None:
            m.min_size, m.max_size = (size,), size
        if isinstance(m, thresholded):
            m.score_thresh = 0.0
        if isinstance(m, RoIHeads) and (m.has_mask() or m.has_keypoint()):
            # these heads run on every detection: Keypoint R-CNN's 8 convs of 512 channels at
            # 14x14 on 2 x 100 detections are ~1.5 TFLOP per forward (minutes in float64 on one
            # core, and the check runs a dozen forwards); 10 per image still compares masks/points
            m.detections_per_img = min(m.detections_per_img, MASK_KEYPOINT_DETECTIONS)
    return model


def scope_input_side(model: nn.Module, size: int) -> int:
    """Side of the batch the backbone sees for ``size`` images: the fixed size, or ``size``
    rounded up to the transform's ``size_divisible``."""
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    t = next((m for m in model.modules() if isinstance(m, GeneralizedRCNNTransform)), None)
    if t is None:
        return size
    if t.fixed_size is not None:
        return max(t.fixed_size)
    d = t.size_divisible
    return -(-size // d) * d


def detection_images(n: int, size: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> list[Tensor]:
    """``n`` seeded ``(3, size, size)`` images in [0, 1] (what the detectors' transform expects)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, size, size, generator=g, dtype=dtype) for _ in range(n)]


def detection_targets(model: nn.Module, n: int, size: int, dtype: torch.dtype = torch.float32,
                      seed: int = 1) -> list[dict[str, Tensor]]:
    """Seeded train-mode targets for ``n`` images of side ``size``: two boxes per image with labels
    1 and 2, plus ``masks`` (filled boxes) when the model has a mask head and ``keypoints`` (K
    visible points inside each box, float32 as torchvision requires) when it has a keypoint head."""
    from torchvision.models.detection.roi_heads import RoIHeads

    heads = next((m for m in model.modules() if isinstance(m, RoIHeads)), None)
    masks = heads is not None and heads.has_mask()
    n_kp = heads.keypoint_predictor.kps_score_lowres.out_channels if heads is not None and heads.has_keypoint() else 0
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        xy = torch.rand(2, 2, generator=g, dtype=dtype) * size / 2
        wh = size / 8 + torch.rand(2, 2, generator=g, dtype=dtype) * size / 3
        boxes = torch.cat([xy, (xy + wh).clamp(max=size - 1)], 1)
        t: dict[str, Tensor] = {"boxes": boxes, "labels": torch.tensor([1, 2])}
        if masks:
            m = torch.zeros(2, size, size, dtype=torch.uint8)
            for i, (x0, y0, x1, y1) in enumerate(boxes.round().long().tolist()):
                m[i, y0:y1 + 1, x0:x1 + 1] = 1
            t["masks"] = m
        if n_kp:
            u = torch.rand(2, n_kp, 2, generator=g, dtype=dtype)
            pts = boxes[:, None, :2] + u * (boxes[:, None, 2:] - boxes[:, None, :2])
            # torchvision's RoIHeads accepts float32 keypoints only, whatever the model's dtype
            t["keypoints"] = torch.cat([pts, torch.ones(2, n_kp, 1, dtype=dtype)], 2).float()
        out.append(t)
    return out


def _n_boxes(out) -> list[int] | None:
    if isinstance(out, (list, tuple)) and all(isinstance(o, dict) and "boxes" in o for o in out):
        return [len(o["boxes"]) for o in out]
    return None


def check_detector(model: nn.Module, dt, images: list[Tensor], targets: list[dict] | None, tol: float,
                   do_fold: bool = True) -> dict[str, Any]:
    """Teacher (eval, and train with ``targets``), student and ``gpd_fx.fold(dt)`` against
    ``model`` through :func:`gpd_fx.scope.compare_scoped`; returns a dict of results.

    Keys: ``eval``/``student``/``fold``/``train``: :class:`~gpd_fx.scope.ScopeCheck` (``fold`` and
    ``train`` may be absent; ``train_error`` says why when the train-mode forward raised), ``boxes``: detections per image of the model in eval mode,
    ``fold_same_class``: fold gives ``type(model)`` with the same state-dict keys. Train mode
    runs with ``torch.manual_seed(0)`` before every forward: the RPN and box samplers, and the
    transform's choice of size, draw from the global generator. Run it last: train-mode BatchNorm
    moves the running statistics of the model and the teacher.
    """
    import gpd_fx
    from gpd_fx.scope import compare_scoped, record_scopes

    res: dict[str, Any] = {}
    model.eval()
    dt.eval()
    # the model's eval run (its output and each scope's), made once for the three comparisons
    ref = record_scopes(model, list(dt.scope_names), (images,), None)
    res["boxes"] = _n_boxes(ref[0])
    res["eval"] = dt.compare_with(model, images, tol=tol, always_rest=True, reference_run=ref)
    res["student"] = dt.compare_with(model, images, tol=tol, student=True, always_rest=True, reference_run=ref)
    if do_fold:
        folded = gpd_fx.fold(dt).eval()
        res["fold_same_class"] = (type(folded) is type(model)
                                  and folded.state_dict().keys() == model.state_dict().keys())
        res["fold"] = compare_scoped(folded, model, dt.scope_names, (images,), tol, always_rest=True,
                                     reference_run=ref)
        del folded
    if targets is not None:
        model.train()
        dt.train()
        try:
            res["train"] = dt.compare_with(model, images, targets, tol=tol, seed=0, always_rest=True)
        except Exception as e:   # e.g. the model calls a method of a scope other than forward
            res["train_error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        finally:
            model.eval()
            dt.eval()
    return res
