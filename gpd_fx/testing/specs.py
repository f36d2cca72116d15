"""The zoo's model catalogue: which models, built how, with which example inputs.

A :class:`Spec` names one torchvision or timm model, its constructor arguments and the smallest
input it runs with in both modes; :func:`torchvision_specs` and :func:`timm_specs` list a whole
zoo. Heads have 10 classes and weights are random (nothing is downloaded).
"""

from __future__ import annotations

import collections
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from gpd_fx.checkpoint import atomic_write

__all__ = ["BATCH", "DEFAULT_IMAGE", "DETECTION_IMAGE", "TASKS", "Spec", "cache_dir", "family", "hf_specs",
           "timm_param_counts", "timm_specs", "torchvision_specs"]


def cache_dir() -> Path:
    """Per-user cache (not the source tree): ``$XDG_CACHE_HOME/gpd_fx`` or ``~/.cache/gpd_fx``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "gpd_fx"


BATCH = 2           # train-mode BN needs more than one value per channel
DEFAULT_IMAGE = 64  # smallest input that keeps >= 2x2 maps at stride 32 for the zoo's CNNs


@dataclass
class Spec:
    """How to build one zoo model and which input it gets."""

    source: str                     # "torchvision" | "timm"
    name: str
    kwargs: dict = field(default_factory=dict)
    image_size: int | None = None   # None: the worker picks the smallest size that works
    family: str = ""                # timm family (prefix before the first "_")
    note: str = ""
    in_chans: int = 3
    task: str = "classification"    # torchvision module: classification | segmentation | video | ...
    frames: int | None = None       # video: T of the (N, C, T, H, W) clip
    n_inputs: int = 1               # optical flow: two frames, each (N, C, H, W)
    skip: str = ""                  # why this model is not run (a skipped row, never built)
    vocab: int | None = None        # token-id input (batch, image_size) with ids < vocab (hf text)
    scope: tuple[str, ...] = ()     # detection: expand only these submodules (expand's scope=)

    def build(self) -> nn.Module:
        if self.source == "hf":
            from .hf import build_hf
            return build_hf(self.name)
        if self.source == "torchvision":
            import torchvision
            kw = dict(self.kwargs)
            if self.task != "optical_flow":   # RAFT predicts flow, it has no classes
                kw.setdefault("num_classes", 10)
            if self.task in ("segmentation", "detection"):
                kw.setdefault("weights_backbone", None)   # no download of ImageNet backbones
            model = torchvision.models.get_model(self.name, weights=None, **kw)
            if self.task == "detection":
                from .detection import prepare_detector
                prepare_detector(model, self.image_size or DETECTION_IMAGE)
            return model
        import timm
        return timm.create_model(self.name, pretrained=False, num_classes=10, **self.kwargs)

    def input_shapes(self, size: int) -> list[tuple[int, ...]]:
        """Shape of each example input at side ``size``, batch included."""
        if self.vocab is not None:
            return [(BATCH, size)] * self.n_inputs
        if self.frames is not None:
            return [(BATCH, self.in_chans, self.frames, size, size)] * self.n_inputs
        return [(BATCH, self.in_chans, size, size)] * self.n_inputs

    def input_label(self, size: int) -> str:
        if self.task == "detection":   # a list of BATCH images
            return f"[{BATCH}*3x{size}x{size}]"
        shapes = ["x".join(map(str, s)) for s in self.input_shapes(size)]
        return shapes[0] if len(shapes) == 1 else f"{len(shapes)}*{shapes[0]}"

    def make_inputs(self, size: int, dtype: torch.dtype) -> tuple[Tensor, ...]:
        """Seeded random inputs (the same on every run)."""
        if self.task == "detection":   # a list of images in [0, 1], as the detectors' transform expects
            from .detection import detection_images
            return (detection_images(BATCH, size, dtype),)
        g = torch.Generator().manual_seed(0)
        if self.vocab is not None:
            return tuple(torch.randint(0, self.vocab, s, generator=g) for s in self.input_shapes(size))
        return tuple(torch.randn(s, dtype=dtype, generator=g) for s in self.input_shapes(size))


TASKS = ("classification", "segmentation", "video", "optical_flow", "detection")
# Detectors take lists of images and branch on them in Python (transform, anchors, NMS): neither
# front end captures them whole, so the zoo expands their backbone (+ FPN) with scope= (see
# gpd_fx.testing.detection). 64: the R-CNN/RetinaNet/FCOS transforms resize to it (the ResNet's
# 1/32 map is 2x2, the FPN's pooled level 1x1); the SSDs keep their fixed 300/320.
DETECTION_IMAGE = 64


def torchvision_specs(image_size: int | None = None, tasks: tuple[str, ...] = ("classification",),
                      scope: tuple[str, ...] | None = None) -> list[Spec]:
    """torchvision's models of the given tasks (``torchvision.models.list_models(module=...)``),
    each with the smallest input that works in both modes; detection models expand ``scope``
    (default :data:`gpd_fx.testing.detection.DEFAULT_SCOPE`, the backbone + FPN)."""
    import torchvision

    specs: list[Spec] = []
    if "classification" in tasks:
        specs += _classification_specs(image_size)
    if "segmentation" in tasks:
        specs += _segmentation_specs(image_size)
    if "video" in tasks:
        specs += _video_specs(image_size)
    if "optical_flow" in tasks:
        for name in torchvision.models.list_models(module=torchvision.models.optical_flow):
            # RAFT needs sides divisible by 8; its correlation pyramid pools the 1/8 map 3 times
            # (4 levels), so 128 (16x16 at 1/8, 2x2 at the coarsest level) keeps every level >= 2
            specs.append(Spec("torchvision", name, {}, image_size or 128, task="optical_flow", n_inputs=2,
                              note="two frames (image1, image2)"))
    if "detection" in tasks:
        from .detection import DEFAULT_SCOPE
        for name in torchvision.models.list_models(module=torchvision.models.detection):
            specs.append(Spec("torchvision", name, {}, image_size or DETECTION_IMAGE, task="detection",
                              scope=tuple(scope or DEFAULT_SCOPE), note="score thresholds 0"))
    return specs


def hf_specs() -> list[Spec]:
    """The Hugging Face architectures of :data:`gpd_fx.testing.hf.HF_MODELS` (small configs)."""
    from .hf import HF_MODELS, SEQ_LEN, VOCAB

    return [Spec("hf", name, {}, SEQ_LEN if kind == "tokens" else 32, task="text" if kind == "tokens" else "image",
                 vocab=VOCAB if kind == "tokens" else None) for name, (_, kind) in HF_MODELS.items()]


def _classification_specs(image_size: int | None) -> list[Spec]:
    """The 80 torchvision classification models with the smallest input that works in both modes."""
    import torchvision

    specs = []
    for name in torchvision.models.list_models(module=torchvision.models):
        kw: dict = {}
        size = image_size or DEFAULT_IMAGE
        note = ""
        if name.startswith("vit_"):
            patch = int(name.rsplit("_", 1)[1])
            # VisionTransformer takes image_size: 56/64 (a 4x4 grid of 14/16-pixel patches, 2x2
            # of 32-pixel ones) keeps the ViTs cheap.
            size = image_size or (56 if patch == 14 else 64)
            kw["image_size"] = size
        elif name == "maxvit_t":
            # every stage's 7x7 partition must tile the map exactly: 224 = 7 * 32 is the smallest
            size = image_size or 224
            kw["input_size"] = (size, size)
        elif name == "inception_v3":
            # 75 is the eval-mode minimum, but the auxiliary head (on by default, active in train
            # mode) needs a 17x17 Mixed_6e map, i.e. the native 299x299
            size = image_size or 299
            note = "aux head on (train mode)"
        elif name == "googlenet":
            note = "aux heads on (train mode)"
        specs.append(Spec("torchvision", name, kw, size, note=note))
    return specs


def _segmentation_specs(image_size: int | None) -> list[Spec]:
    """FCN / DeepLabV3 with their auxiliary FCN head on (output ``{"out", "aux"}``), LRASPP."""
    import torchvision

    specs = []
    for name in torchvision.models.list_models(module=torchvision.models.segmentation):
        kw: dict = {}
        note = ""
        if not name.startswith("lraspp"):
            kw["aux_loss"] = True
            note = "aux head on"
        # 64x64: the ResNet backbones are dilated (1/8 map: 8x8), MobileNetV3's 1/16 map is 4x4,
        # enough for DeepLabV3's ASPP (dilations 12-36 then touch only the zero padding: still
        # a real conv) and train-mode BN at batch 2
        specs.append(Spec("torchvision", name, kw, image_size or 64, task="segmentation", note=note))
    return specs


def _video_specs(image_size: int | None) -> list[Spec]:
    """Video classifiers on (N, 3, T, H, W) clips: the smallest T, H, W each architecture takes."""
    import torchvision

    specs = []
    for name in torchvision.models.list_models(module=torchvision.models.video):
        kw: dict = {}
        note = ""
        if name.startswith("mvit"):
            # the builders fix spatial_size=(224, 224) and temporal_size=16 (the positional
            # embedding is sized for them), so MViT takes exactly 16x224x224 clips
            size, frames = 224, 16
            note = "fixed 16x224x224 input"
        elif name == "s3d":
            # a fixed AvgPool3d((2, 7, 7)) head after a 1/8 x 1/32 x 1/32 trunk: 16x224x224 at least
            size, frames = image_size or 224, 16
            note = "fixed (2, 7, 7) pooling head"
        elif name.startswith("swin3d"):
            # patch (2, 4, 4) and 8x7x7 windows; maps smaller than a window are padded
            size, frames = image_size or 64, 4
        else:
            # R3D / MC3 / R(2+1)D: stride-2 stem in H, W and three stride-2 stages
            size, frames = image_size or 32, 4
        specs.append(Spec("torchvision", name, kw, size, task="video", frames=frames, note=note))
    return specs


def family(name: str) -> str:
    return name.split("_", 1)[0]


def timm_param_counts(cache: Path | None = None, progress: bool = True) -> dict[str, float]:
    """Parameter count of every ``timm.list_models()`` model, built on the meta device (cached).

    A model that cannot be built on the meta device gets ``nan``.
    """
    import timm

    data: dict = {}
    if cache is not None and cache.exists():
        data = json.loads(cache.read_text())
        if data.get("timm") != timm.__version__:
            data = {}
    counts: dict = data.get("counts", {})
    names = [n for n in timm.list_models() if n not in counts]
    if names:
        from tqdm import tqdm

        for n in tqdm(names, desc="timm params (meta)", disable=not progress, file=sys.stderr):
            try:
                with torch.device("meta"):
                    m = timm.create_model(n, pretrained=False, num_classes=10)
                counts[n] = sum(p.numel() for p in m.parameters())
            except Exception:
                counts[n] = float("nan")
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            payload = json.dumps({"timm": timm.__version__, "counts": counts})
            # atomic: sweeps run side by side, and a half-written cache would fail every later one
            atomic_write(cache, lambda tmp: tmp.write_text(payload))
    return counts


def timm_specs(image_size: int | None = None, progress: bool = True) -> list[Spec]:
    """One spec per timm family: its smallest model by parameter count (meta device)."""
    import timm

    counts = timm_param_counts(cache_dir() / "timm_param_counts.json", progress)
    families: dict[str, list[str]] = collections.defaultdict(list)
    for n in timm.list_models():
        families[family(n)].append(n)
    specs = []
    for fam, names in sorted(families.items()):
        known = [n for n in names if not math.isnan(counts.get(n, float("nan")))]
        if known:
            name = min(known, key=lambda n: (counts[n], n))
            note = ""
        else:
            name, note = sorted(names)[0], "no model of the family builds on the meta device"
        specs.append(Spec("timm", name, {}, image_size, family=fam, note=note))
    return specs


# --------------------------------------------------------------------------------------------
# Measurement (one model, one ratio; runs inside the worker process)
# --------------------------------------------------------------------------------------------

