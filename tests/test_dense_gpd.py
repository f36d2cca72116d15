"""GPD training on a segmentation model: the dense loss trains the teacher, and fold == student.

The model is torchvision's own FCN class (``{"out": logits}`` output, bilinear upsampling to the
input size) around a one-block-per-stage ResNet cut at ``layer2``: the same code path as
``fcn_resnet50``, small enough to expand and train on two CPU cores in seconds (LRASPP-MobileNetV3
takes ~35 s to expand alone there).
"""

from __future__ import annotations

import math

import pytest
import torch

import gpd_fx
from gpd_fx.losses import GPDLossConfig, feature_kd, gpd_loss
from gpd_fx.passes.widen_verify import TOL

torchvision = pytest.importorskip("torchvision")
from torchvision.models._utils import IntermediateLayerGetter  # noqa: E402
from torchvision.models.resnet import BasicBlock, ResNet  # noqa: E402
from torchvision.models.segmentation.fcn import FCN, FCNHead  # noqa: E402

NUM_CLASSES = 3
IGNORE = 255


def _fcn() -> FCN:
    backbone = IntermediateLayerGetter(ResNet(BasicBlock, [1, 1, 1, 1]), return_layers={"layer2": "out"})
    return FCN(backbone, FCNHead(128, NUM_CLASSES))


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (2, 3, 32, 32) and random masks (2, 32, 32) with a block of unlabelled pixels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 32, 32, generator=g)
    y = torch.randint(0, NUM_CLASSES, (2, 32, 32), generator=g)
    y[:, :8, :8] = IGNORE  # an unlabelled region, as VOC's borders
    y[torch.rand(y.shape, generator=g) < 0.1] = IGNORE
    return x, y


def _rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).abs().max() / ref.abs().max()).item()


def _capture(module: torch.nn.Module, name: str, store: dict, key: str):
    """Keep submodule ``name``'s output under ``store[key]`` on every call.

    A clone: torchvision's BasicBlock adds the shortcut *in place* into ``bn2``'s output
    after the hook has run, while the teacher graph adds out of place, so the raw tensors
    would compare bn2+shortcut with bn2.
    """
    return module.get_submodule(name).register_forward_hook(lambda m, i, out: store.__setitem__(key, out.clone()))


def test_gpd_training_on_segmentation_then_fold_equals_student():
    """A few GPD steps with the per-pixel loss (plus a feature KD on an inner layer, captured by
    hooks during dt.joint) decrease the loss; the feature KD starts at 0 to float32 rounding;
    then fold(dt)(x)["out"] equals dt.student(x)["out"] in float64 to the verification tolerance."""
    torch.manual_seed(0)
    x, y = _batch()
    dt = gpd_fx.expand(_fcn(), ratio=2, example_inputs=(x,))
    opt = torch.optim.SGD(gpd_fx.param_groups(dt, lr=0.02), momentum=0.9)
    cfg = GPDLossConfig()
    feats: dict[str, torch.Tensor] = {}
    layer = "backbone.layer2.0.bn2"  # the teacher's modules keep the student's names
    hooks = [_capture(dt.teacher, layer, feats, "teacher"), _capture(dt.template, layer, feats, "student")]

    dt.train()
    losses, feature_losses = [], []
    for _ in range(4):  # one fixed batch: the loss must go down when training works
        opt.zero_grad()
        teacher_out, student_out = dt.joint(x)
        loss, parts = gpd_loss(teacher_out["out"], student_out["out"], y, cfg, ignore_index=IGNORE)
        feat_loss = feature_kd(feats["teacher"], feats["student"], ratio=2)
        (loss + feat_loss).backward()
        opt.step()
        losses.append(loss.item() + feat_loss.item())
        feature_losses.append(feat_loss.item())
        if len(feature_losses) == 1:  # exact pair at init: MSE of a relative error <= TOL
            init_bound = (TOL[torch.float32] * feats["student"].abs().max().item()) ** 2
        assert all(math.isfinite(v.item()) for v in parts.values()), parts
    for h in hooks:
        h.remove()
    assert losses[-1] < losses[0], losses
    assert feature_losses[0] <= init_bound, (feature_losses, init_bound)
    assert math.isfinite(feature_losses[-1]) and feature_losses[-1] > 0

    # float64 comparison: the fold's only difference from dt.student is evaluating the map once,
    # so they agree to rounding (TOL: 1e-9 relative in float64) while a wrong map is off by O(1)
    dt = dt.double().eval()
    x64 = x.double()
    folded = gpd_fx.fold(dt)
    assert type(folded) is FCN
    with torch.no_grad():
        ref = dt.student(x64)["out"]
        out = folded(x64)["out"]
    assert out.shape == (2, NUM_CLASSES, 32, 32)
    assert _rel_error(out, ref) <= TOL[torch.float64]
