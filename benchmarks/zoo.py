"""Zoo benchmark: does ``gpd_fx.expand`` give an exact teacher on every model of a model zoo?

    python benchmarks/zoo.py                                  # torchvision, ratios 2 and 3
    python benchmarks/zoo.py --source timm --ratio 2          # one model per timm family
    python benchmarks/zoo.py --models resnet18,swin_t --ratio 2 --json /tmp/zoo.json
    python benchmarks/zoo.py --tasks segmentation,video,optical_flow --ratio 2 --max-gib 6
    python benchmarks/zoo.py --tasks all        # + detection rows, skipped (need scope= / export)

Results go to ``--json`` (default: ``zoo_<source>.json`` in the current directory, never into
the source tree); the timm parameter-count cache goes to ``$XDG_CACHE_HOME/gpd_fx`` (default
``~/.cache/gpd_fx``).

One row per model and ratio: traced, exact in eval and in train mode, max relative error,
expanded FLOP share, boundaries, expand seconds, student/teacher parameters (and, with
``--fold`` when ``gpd_fx.fold`` exists, fold exact / export ok / onnx agrees), then a summary
line and the ResNet-50 timing row. Each model runs in a fresh subprocess with a timeout (an
exception, an OOM kill or a hang becomes a row, not the end of the sweep).

Measurement, independent of expand's own self-verification:

* error = max|teacher(x) - student(x)| / max|student(x)|, over all output tensors.
* eval mode, and train mode (BatchNorm on batch statistics; ``torch.manual_seed`` before each
  forward so stochastic depth draws the same per-sample masks). Every dropout module gets
  ``p = 0`` before expanding, and so do dropout rates that a model passes to ``F.dropout``
  itself (timm's ``drop_rate``): a dropout mask over r*C teacher channels and one over C student
  channels are different random draws and cannot agree, so with p > 0 no teacher could be exact
  in train mode. (Stochastic depth masks are per sample, not per channel, and do agree.)
* float64 where the float64 teacher fits the memory budget (tolerance 1e-9), else float32
  (tolerance 1e-3); the row says which. The reasoning for both numbers is at ``TOL``.
* heads have 10 classes (``num_classes=10``) to keep them small; weights are random, backbones
  too (``weights=None, weights_backbone=None``: nothing is downloaded).
* tasks (``--tasks``): torchvision's classification, segmentation (FCN/DeepLabV3 with their aux
  head, output ``{"out", "aux"}``), video (``(N, 3, T, H, W)`` clips) and optical flow (RAFT on
  two frames) models, each at the smallest input it takes (``_segmentation_specs``,
  ``_video_specs``); detection models are skipped rows (they need partial expansion or the
  export front end). A model that fails in float64 although it runs in float32 (RAFT builds its
  coordinate grids in float32) is measured in float32, and the row says why.
* parameters that the zoo initialises to a constant (torchvision's ViT head is all zeros, BN
  affine 1/0, layer scale 1e-6) get seeded noise and BN running statistics are randomised
  (``randomize_constants``), so no check passes vacuously: with a zero head every output is 0.
"""

from __future__ import annotations

import argparse
import collections
import copy
import datetime
import json
import math
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

HERE = Path(__file__).resolve().parent
GIB = 2 ** 30


def _cache_dir() -> Path:
    """Per-user cache (not the source tree): ``$XDG_CACHE_HOME/gpd_fx`` or ``~/.cache/gpd_fx``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "gpd_fx"

# Exactness tolerances, relative to max |student output|. float64 (eps 1.1e-16): the teacher sums
# r times more terms in another order; even ~1e5-term reductions through a deep net stay near
# 1e-12, so 1e-9 keeps headroom while any wrong rule (errors of order 1e-2..1) fails by 7 orders.
# float32 (eps 6e-8): the same effect is ~1e-6..1e-5, and train-mode BatchNorm over a batch of 2
# at 2x2 spatial divides by small batch standard deviations, which amplifies it to ~1e-4; 1e-3
# stays two orders below a wrong rule.
TOL = {torch.float64: 1e-9, torch.float32: 1e-3}
BATCH = 2           # train-mode BN needs more than one value per channel
DEFAULT_IMAGE = 64  # smallest input that keeps >= 2x2 maps at stride 32 for the zoo's CNNs
CNN_SHARE = 0.95     # issue 2: every CNN expands at least this share of its FLOPs
TRANSFORMER_SHARE = 0.9  # issue 3: transformers (and every timm family) at least this share
# IR (no branches) gives every expanded weight r^2 times the parameters; only the kept input side
# of the stem and the 10-class head grow by r alone, so a healthy teacher is above ~0.95 r^2.
UNDER_WIDENED = 0.85
# Bytes of working memory per teacher parameter, in units of the dtype's size: the widened
# weights, the noise/interleave temporaries while a layer is widened, the verification copy.
# Measured peak RSS on the torchvision zoo (IR only): twice the student's weights + ~0.6 GiB of
# interpreter and libraries + 1.2-1.9x the teacher's weights, the factor falling with size
# (1.2-1.5 for the 2-4 GiB teachers that come near the gate, e.g. regnet_y_32gf, efficientnet_v2_l).
WEIGHT_FACTOR = 1.5
BASE_GIB = 0.6
BRANCH_FACTOR = 1.5  # CBR: a kxk conv gains 1x1, 1x1->kxk, avg-pool branches (~1.5x its weights)


# --------------------------------------------------------------------------------------------
# Model specifications
# --------------------------------------------------------------------------------------------

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

    def build(self) -> nn.Module:
        if self.source == "torchvision":
            import torchvision
            kw = dict(self.kwargs)
            if self.task != "optical_flow":   # RAFT predicts flow, it has no classes
                kw.setdefault("num_classes", 10)
            if self.task in ("segmentation", "detection"):
                kw.setdefault("weights_backbone", None)   # no download of ImageNet backbones
            return torchvision.models.get_model(self.name, weights=None, **kw)
        import timm
        return timm.create_model(self.name, pretrained=False, num_classes=10, **self.kwargs)

    def input_shapes(self, size: int) -> list[tuple[int, ...]]:
        """Shape of each example input at side ``size``, batch included."""
        if self.frames is not None:
            return [(BATCH, self.in_chans, self.frames, size, size)] * self.n_inputs
        return [(BATCH, self.in_chans, size, size)] * self.n_inputs

    def input_label(self, size: int) -> str:
        shapes = ["x".join(map(str, s)) for s in self.input_shapes(size)]
        return shapes[0] if len(shapes) == 1 else f"{len(shapes)}*{shapes[0]}"

    def make_inputs(self, size: int, dtype: torch.dtype) -> tuple[Tensor, ...]:
        """Seeded random inputs (the same on every run)."""
        g = torch.Generator().manual_seed(0)
        return tuple(torch.randn(s, dtype=dtype, generator=g) for s in self.input_shapes(size))


TASKS = ("classification", "segmentation", "video", "optical_flow", "detection")
# Detectors take lists of images and branch on them in Python (transform, anchors, NMS): plain FX
# cannot trace them whole; they need partial expansion of the backbone or the export front end.
DETECTION_SKIP = "needs scope= / export front end"


def torchvision_specs(image_size: int | None = None, tasks: tuple[str, ...] = ("classification",)) -> list[Spec]:
    """torchvision's models of the given tasks (``torchvision.models.list_models(module=...)``),
    each with the smallest input that works in both modes."""
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
        for name in torchvision.models.list_models(module=torchvision.models.detection):
            specs.append(Spec("torchvision", name, {}, image_size or 64, task="detection", skip=DETECTION_SKIP))
    return specs


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


def _family(name: str) -> str:
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
            cache.write_text(json.dumps({"timm": timm.__version__, "counts": counts}))
    return counts


def timm_specs(image_size: int | None = None, progress: bool = True) -> list[Spec]:
    """One spec per timm family: its smallest model by parameter count (meta device)."""
    import timm

    counts = timm_param_counts(_cache_dir() / "timm_param_counts.json", progress)
    families: dict[str, list[str]] = collections.defaultdict(list)
    for n in timm.list_models():
        families[_family(n)].append(n)
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

@dataclass
class Row:
    name: str
    source: str
    ratio: int
    family: str = ""
    task: str = "classification"
    status: str = "ok"            # ok | skipped | error | timeout | crashed
    reason: str = ""
    kind: str = ""                # cnn | transformer (attention inside)
    kind_evidence: str = ""
    input: str = ""
    dtype: str = ""
    tol: float | None = None
    traced: bool | None = None
    timm_fx: bool | None = None   # timm's own FX trace (torchvision feature extractor) reproduces it
    timm_fx_reason: str = ""
    exact_eval: bool | None = None
    exact_train: bool | None = None
    err_eval: float | None = None
    err_train: float | None = None
    err_student: float | None = None   # dt.student(x) vs model(x), eval mode
    train_note: str = ""
    share: float | None = None
    n_boundaries: int | None = None
    boundary_reasons: dict = field(default_factory=dict)
    fallbacks: dict = field(default_factory=dict)
    branch_layers: int | None = None
    runtime_widenings: int | None = None  # kept tensors widened in forward (report.runtime_widenings)
    expand_s: float | None = None
    check_s: float | None = None
    student_params: int | None = None
    teacher_params: int | None = None
    est_gib: float | None = None
    peak_rss_gib: float | None = None
    fold_exact: bool | None = None
    export_ok: bool | None = None
    onnx_agrees: bool | None = None
    fold_note: str = ""
    error_type: str = ""
    error_where: str = ""
    repro: str = ""
    note: str = ""

    @property
    def exact(self) -> bool:
        return bool(self.exact_eval and self.exact_train)

    @property
    def under_widened(self) -> bool:
        """Teacher has < UNDER_WIDENED * r^2 the student's parameters (e.g. weights kept at student
        size and widened at run time: tied copies, no extra capacity)."""
        if not self.teacher_params or not self.student_params:
            return False
        return self.teacher_params < UNDER_WIDENED * self.ratio ** 2 * self.student_params


@torch.no_grad()
def randomize_constants(model: nn.Module, seed: int = 0) -> int:
    """Add seeded noise to every constant floating parameter; randomise BN running stats.

    A constant c becomes c + N(0, (0.2 * max(|c|, 0.1))^2): zero heads/biases get std 0.02,
    BN weights 1 +- 0.2. Running means get N(0, 0.1^2), running variances U(0.5, 2), so that
    eval-mode BN is not the identity. Returns the number of tensors changed.
    """
    g = torch.Generator().manual_seed(seed)
    n = 0
    for p in model.parameters():
        if not p.is_floating_point() or p.numel() == 0:
            continue
        flat = p.detach().reshape(-1)
        if bool((flat == flat[0]).all()):
            c = float(flat[0])
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * (0.2 * max(abs(c), 0.1)))
            n += 1
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.running_mean is not None:
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g, dtype=m.running_mean.dtype) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g, dtype=m.running_var.dtype) * 1.5 + 0.5)
            n += 2
    return n


def _tree_tensors(out) -> list[Tensor]:
    from torch.utils._pytree import tree_flatten

    return [t for t in tree_flatten(out)[0] if isinstance(t, Tensor)]


def rel_error(teacher_out, student_out) -> tuple[float, str]:
    """max |t - s| / max |s| over every output tensor; inf (and why) if the outputs do not match up."""
    t, s = _tree_tensors(teacher_out), _tree_tensors(student_out)
    if len(t) != len(s):
        return math.inf, (f"output structure differs: teacher gives {len(t)} tensor(s) "
                          f"({type(teacher_out).__name__}), student {len(s)} ({type(student_out).__name__})")
    num, den = 0.0, 0.0
    for a, b in zip(t, s):
        if a.shape != b.shape:
            return math.inf, f"output shape differs: teacher {tuple(a.shape)} vs student {tuple(b.shape)}"
        if a.numel() == 0:
            continue
        num = max(num, float((a.double() - b.double()).abs().max()))
        den = max(den, float(b.double().abs().max()))
    if not math.isfinite(num):
        return math.inf, "non-finite teacher output"
    if den == 0:
        return math.nan, "student output is identically zero (vacuous check)"
    return num / den, ""


# Float attributes that models pass to F.dropout themselves (timm's GhostNet/ReXNet heads use
# ``F.dropout(x, self.drop_rate, self.training)``). Per-sample stochastic depth (drop_path,
# drop_prob) is left alone: its (N, 1, 1, 1) masks agree between teacher and student.
_DROPOUT_ATTRS = re.compile(r"^(drop_rate|dropout|dropout_rate|dropout_p|drop|head_drop_rate|attn_drop_rate|proj_drop_rate)$")


def zero_dropout(model: nn.Module) -> int:
    """Set ``p = 0`` on every dropout module and zero float dropout-rate attributes (see the
    module docstring); returns how many were changed."""
    n = 0
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p:
            m.p = 0.0
            n += 1
        for k, v in list(vars(m).items()):
            if isinstance(v, float) and v > 0 and _DROPOUT_ATTRS.match(k):
                setattr(m, k, 0.0)
                n += 1
    return n


_NOT_SELF_ATTENTION = ("channel", "spatial", "eca", "cbam", "split", "selective", "squeeze", "excit",
                       "gather", "coord", "triplet", "radix", "global", "gc", "se", "sk")
_ATTENTION_CODE = re.compile(r"scaled_dot_product_attention|\.softmax\(|\bsoftmax\(")


def _is_gating(low: str) -> bool:
    stem = low.replace("attention", "").replace("attn", "")
    return any(stem.startswith(x) or stem.endswith(x) for x in _NOT_SELF_ATTENTION)


def model_kind(model: nn.Module) -> tuple[str, str]:
    """``("transformer", cls)`` if a module does (self-)attention, else ``("cnn", "")``.

    A module counts when its class is named ``*Attention*`` / ``*Attn*`` (``nn.MultiheadAttention``,
    window attention, timm's ``Attention``) or its ``forward`` calls softmax or
    ``scaled_dot_product_attention`` (ConViT's ``GPSA``/``MHSA``), unless the name marks a
    channel/spatial gating block (SE, ECA, CBAM, split/selective-kernel attention).
    """
    import inspect

    seen: set[type] = set()
    for m in model.modules():
        cls = type(m)
        if cls in seen:
            continue
        seen.add(cls)
        low = cls.__name__.lower()
        if _is_gating(low):
            continue
        if "attention" in low or "attn" in low:
            return "transformer", cls.__name__
        if cls.__module__.startswith("torch.nn"):
            continue
        try:
            src = inspect.getsource(cls.forward)
        except (OSError, TypeError):
            continue
        if _ATTENTION_CODE.search(src):
            return "transformer", cls.__name__
    return "cnn", ""


def estimate_gib(model_meta: nn.Module, ratio: int, itemsize: int, branches: bool,
                 act_numel: int = 0) -> float:
    """Peak memory (GiB) of one expand + checks, from parameter counts on the meta device.

    student weights (x2: the model and the student map's copy) + teacher weights (student * r^2,
    plus CBR branches on kxk convs) * WEIGHT_FACTOR + one more teacher-sized copy of the largest
    weight (the weight rule builds its noise next to the gathered copy: VGG's 25088x4096
    classifier peaked at 11.2 GiB against 8.3 estimated without this term, r2 float64)
    + activations (student + teacher widths) + BASE_GIB.
    """
    p_all = sum(p.numel() for p in model_meta.parameters())
    p_max = max((p.numel() for p in model_meta.parameters()), default=0)
    p_kxk = sum(m.weight.numel() for m in model_meta.modules()
                if isinstance(m, nn.modules.conv._ConvNd) and math.prod(m.kernel_size) > 1)
    teacher = ratio ** 2 * (p_all + (BRANCH_FACTOR * p_kxk if branches else 0))
    bytes_ = itemsize * (2 * p_all + WEIGHT_FACTOR * teacher + ratio ** 2 * p_max + (1 + ratio) * act_numel)
    return bytes_ / GIB + BASE_GIB


def activation_numel(model_meta: nn.Module, x_shape: tuple | list[tuple]) -> int:
    """Sum of every leaf module's output elements for one forward on the meta device (0 if it fails).

    ``x_shape``: the input's shape, or a list of shapes for a model with several inputs."""
    shapes = x_shape if isinstance(x_shape, list) else [x_shape]
    total = [0]

    def hook(_m, _i, out):
        total[0] += sum(t.numel() for t in _tree_tensors(out))

    hs = [m.register_forward_hook(hook) for m in model_meta.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            model_meta.eval()(*(torch.empty(s, device="meta") for s in shapes))
    except Exception:
        total[0] = 0
    finally:
        for h in hs:
            h.remove()
    return total[0]


def mem_available_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 / GIB
    except OSError:
        pass
    return math.inf


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return f"{type(e).__name__}: {s.splitlines()[0] if s else ''}"[:500]


def _where(e: BaseException) -> str:
    """Innermost frame in gpd_fx/passes (where a library failure surfaced)."""
    frames = traceback.extract_tb(e.__traceback__)
    ours = [f for f in frames if "/passes/" in f.filename or "/gpd_fx/" in f.filename]
    f = (ours or frames or [None])[-1]
    return f"{Path(f.filename).name}:{f.lineno} in {f.name}" if f else ""


def _repro(spec: Spec, ratio: int, size: int, dtype: torch.dtype) -> str:
    if spec.source == "torchvision":
        kw = dict(spec.kwargs)
        if spec.task != "optical_flow":
            kw.setdefault("num_classes", 10)
        if spec.task in ("segmentation", "detection"):
            kw.setdefault("weights_backbone", None)
        build = (f"torchvision.models.get_model({spec.name!r}, weights=None"
                 + "".join(f", {k}={v!r}" for k, v in kw.items()) + ")")
        imp = "import torch, torchvision, gpd_fx"
    else:
        build = (f"timm.create_model({spec.name!r}, pretrained=False, num_classes=10"
                 + "".join(f", {k}={v!r}" for k, v in spec.kwargs.items()) + ")")
        imp = "import torch, timm, gpd_fx"
    d = "double" if dtype == torch.float64 else "float"
    xs = ", ".join(f"torch.randn{s}.{d}()" for s in spec.input_shapes(size))
    return (f"{imp}; m = {build}.{d}(); xs = ({xs},); "
            f"dt = gpd_fx.expand(m, ratio={ratio}, example_inputs=xs); print(dt.report)")


def _timm_pick_size(spec: Spec, target: int | None) -> tuple[dict, int, str, int]:
    """(kwargs, image size, note, channels) for a timm model: the smallest input it runs with."""
    import timm

    cfg = timm.get_pretrained_cfg(spec.name)
    cfg = cfg.to_dict() if cfg is not None else {}
    default = int(cfg.get("input_size", (3, 224, 224))[-1])
    fixed = bool(cfg.get("fixed_input_size", False))
    sizes = [target] if target else [64, 96, 128, 160, 192, 224]
    sizes = sorted({s for s in sizes if s <= default} | {default}) if not target else sizes
    in_chans = int(cfg.get("input_size", (3,))[0])
    with torch.device("meta"):
        try:
            timm.create_model(spec.name, pretrained=False, num_classes=10, img_size=sizes[0])
            takes_img_size = True
        except TypeError as e:
            takes_img_size = "img_size" not in str(e)
        except Exception:
            takes_img_size = True  # failed for another reason; the real build will tell
    last = ""
    for s in sizes:
        kw = {"img_size": s} if takes_img_size and s != default else {}
        if not takes_img_size and fixed and s != default:
            continue
        try:
            m = timm.create_model(spec.name, pretrained=False, num_classes=10, **kw)
            with torch.no_grad():
                m.eval()(torch.randn(BATCH, in_chans, s, s))
                m.train()(torch.randn(BATCH, in_chans, s, s))
            del m
            return kw, s, ("img_size" if kw else ("fixed input size" if fixed else "")), in_chans
        except Exception as e:
            last = _first_line(e)
    raise RuntimeError(f"builds/runs at none of the sizes {sizes}: {last}")


def timm_fx_check(model: nn.Module, x: Tensor) -> tuple[bool, str]:
    """Can timm itself FX-trace the model? As timm's own ``test_model_forward_fx`` does it:

    torchvision's ``create_feature_extractor`` with timm's no-trace modules/functions as leaves,
    returning the last node, and the traced output must equal the model's (eval mode).
    """
    from timm.layers import get_notrace_functions, get_notrace_modules
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    was = model.training
    kw = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(),
              param_shapes_constant=True)
    try:
        train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=kw)
        fxm = create_feature_extractor(model, train_return_nodes=[train_nodes[-1]],
                                       eval_return_nodes=[eval_nodes[-1]], tracer_kwargs=kw)
        model.eval()
        fxm.eval()
        with torch.no_grad():
            out = model(x)
            fx_out = tuple(fxm(x).values())
        out = torch.cat(out) if isinstance(out, tuple) else out
        fx_out = torch.cat(fx_out) if len(fx_out) > 1 else fx_out[0]
        if fx_out.shape != out.shape or not torch.equal(fx_out, out):
            return False, "traced graph output differs from the model's"
        return True, ""
    except Exception as e:
        return False, _first_line(e)
    finally:
        model.train(was)


def _check_fold(dt, model: nn.Module, xs: tuple[Tensor, ...], tol: float, row: Row) -> None:
    import gpd_fx

    try:
        folded = gpd_fx.fold(dt)
        folded.eval()
        dt.eval()
        with torch.no_grad():
            e1, why = rel_error(folded(*xs), dt.student(*xs))
            e2, _ = rel_error(folded(*xs), model.eval()(*xs))
        row.fold_exact = e1 <= tol and e2 <= tol and type(folded) is type(model)
        if not row.fold_exact:
            row.fold_note = f"fold vs dt.student {e1:.2e}, vs model {e2:.2e} {why}".strip()
    except Exception as e:
        row.fold_exact = False
        row.fold_note = f"fold: {_first_line(e)}"
        return
    try:
        torch.export.export(folded, xs)
        row.export_ok = True
    except Exception as e:
        row.export_ok = False
        row.fold_note += f"; export: {_first_line(e)}"
    try:
        from gpd_fx.export import export_onnx, onnx_available
    except ImportError:
        return
    if not onnx_available() or len(xs) > 1:   # export_onnx verifies one input batch
        return
    try:
        with tempfile.TemporaryDirectory() as d:
            export_onnx(folded.float(), xs[0].float(), Path(d) / "m.onnx")
        row.onnx_agrees = True
    except Exception as e:
        row.onnx_agrees = False
        row.fold_note += f"; onnx: {_first_line(e)}"


def measure(spec: Spec, ratio: int, *, dtype: str = "auto", max_gib: float = 20.0,
            branches: str = "default", do_fold: bool = False, timm_fx: bool = True,
            model: nn.Module | None = None, check_free_memory: bool = True) -> Row:
    """Build ``spec``, expand it at ``ratio`` and measure exactness; never raises.

    Args:
        spec: the model and its input size (``spec.image_size``; None picks per model).
        ratio: expansion ratio.
        dtype: ``"auto"`` (float64 if it fits ``max_gib``, else float32), ``"float64"``, ``"float32"``.
        max_gib: memory budget; a model estimated above it becomes a ``skipped`` row.
        branches: ``"default"`` (expand's default), ``"none"`` (IR only) or ``"all"``.
        do_fold: also fill the fold/export/onnx columns (when ``gpd_fx.fold`` exists).
        timm_fx: for timm models, also check whether timm's own FX tracing reproduces the model.
        model: an already built model to use instead of ``spec.build()`` (e.g. a reduced-width
            instance of a zoo class in tests); it is converted and modified in place.
        check_free_memory: also skip when the estimate exceeds the memory free at this moment
            (sweeps on a shared machine). Tests pass ``False``: their outcome must not depend on
            what other processes hold; the ``max_gib`` budget alone is deterministic.

    Returns:
        A :class:`Row`.
    """
    import gpd_fx

    row = Row(spec.name, spec.source, ratio, family=spec.family, task=spec.task, note=spec.note)
    if spec.skip:
        row.status, row.reason = "skipped", spec.skip
        return row
    t_start = time.perf_counter()
    stage = "build"
    try:
        # ---- input size and constructor arguments
        if spec.source == "timm":
            stage = "pick input size"
            kw, size, how, chans = _timm_pick_size(spec, spec.image_size)
            spec = Spec(spec.source, spec.name, {**spec.kwargs, **kw}, size, spec.family, spec.note, chans)
            row.note = "; ".join(x for x in (spec.note, how) if x)
        size = spec.image_size or DEFAULT_IMAGE
        row.input = spec.input_label(size)
        # ---- memory gate on the meta device
        stage = "memory estimate"
        use_branches = branches != "none"
        meta = None
        if model is None:
            try:
                with torch.device("meta"):
                    meta = spec.build()
            except Exception:
                pass  # e.g. regnet computes widths with .tolist(): count on the real model below
        if meta is None:
            stage = "build"
            model = model if model is not None else spec.build()
            meta = model
        acts = activation_numel(meta, spec.input_shapes(size)) if meta is not model else 0
        est64 = estimate_gib(meta, ratio, 8, use_branches, acts)
        est32 = estimate_gib(meta, ratio, 4, use_branches, acts)
        row.student_params = sum(p.numel() for p in meta.parameters() if p.requires_grad)
        row.kind, row.kind_evidence = model_kind(meta)
        del meta
        if dtype == "auto":
            tdtype = torch.float64 if est64 <= max_gib else torch.float32
        else:
            tdtype = getattr(torch, dtype)
        est = est64 if tdtype == torch.float64 else est32
        row.est_gib = round(est, 2)
        row.dtype = str(tdtype).replace("torch.", "")
        row.tol = TOL[tdtype]
        row.repro = _repro(spec, ratio, size, tdtype)
        if est > max_gib:
            row.status, row.reason = "skipped", f"needs ~{est:.1f} GiB (> {max_gib:g} GiB budget)"
            return row
        avail = mem_available_gib() if check_free_memory else math.inf
        if est > avail - 0.5:
            row.status, row.reason = "skipped", f"needs ~{est:.1f} GiB, only {avail:.1f} GiB free now (rerun)"
            return row
        # ---- build
        stage = "build"
        if model is None:
            model = spec.build()
        model = model.to(tdtype)
        if tdtype == torch.float64:
            stage = "float64 forward"
            why64 = _float64_failure(model, spec.make_inputs(size, tdtype))
            if why64:
                # e.g. RAFT builds its coordinate grids in float32 whatever the model's dtype
                tdtype = torch.float32
                model = model.to(tdtype)
                row.dtype, row.tol, row.est_gib = "float32", TOL[tdtype], round(est32, 2)
                row.repro = _repro(spec, ratio, size, tdtype)
                row.note = "; ".join(x for x in (row.note, f"float32: the model fails in float64 ({why64})") if x)
        randomize_constants(model, seed=0)
        zero_dropout(model)
        xs = spec.make_inputs(size, tdtype)
        x = xs[0]
        if spec.source == "timm" and timm_fx:
            stage = "timm fx check"
            row.timm_fx, row.timm_fx_reason = timm_fx_check(model, x)
        # ---- expand
        stage = "expand"
        kwargs: dict[str, Any] = dict(ratio=ratio, example_inputs=xs, noise=0.1, seed=0, strict=False)
        if branches != "default":
            kwargs["branches"] = () if branches == "none" else None
        model.eval()
        t0 = time.perf_counter()
        try:
            dt = gpd_fx.expand(model, **kwargs)
        except gpd_fx.TraceError as e:
            row.traced = False
            raise e
        row.expand_s = round(time.perf_counter() - t0, 3)
        row.traced = True
        rep = dt.report
        row.share = float(rep.expanded_flop_fraction)
        row.n_boundaries = len(rep.boundaries)
        row.boundary_reasons = dict(getattr(rep, "boundary_reasons", {}) or {})
        row.fallbacks = dict(getattr(rep, "fallbacks", {}) or {})
        row.branch_layers = getattr(rep, "branch_layers", None)
        row.runtime_widenings = getattr(rep, "runtime_widenings", None)
        row.teacher_params = int(rep.teacher_params)
        row.student_params = int(rep.student_params)
        # ---- exactness, eval then train
        stage = "eval check"
        t0 = time.perf_counter()
        model.eval()
        dt.eval()
        with torch.no_grad():
            y = model(*xs)
            row.err_eval, why = rel_error(dt(*xs), y)
            row.err_student, _ = rel_error(dt.student(*xs), y)
        row.exact_eval = row.err_eval <= row.tol
        if why:
            row.train_note = f"eval: {why}"
        if do_fold and hasattr(gpd_fx, "fold"):
            # before the train-mode forward, which moves the model's BN running statistics away
            # from the student buffers kept in dt
            stage = "fold"
            _check_fold(dt, model, xs, row.tol, row)
        stage = "train check"
        model.train()
        dt.train()
        with torch.no_grad():
            torch.manual_seed(0)
            y = model(*xs)
            torch.manual_seed(0)
            row.err_train, why = rel_error(dt(*xs), y)
        row.exact_train = row.err_train <= row.tol
        if why:
            row.train_note = (row.train_note + "; " if row.train_note else "") + f"train: {why}"
        row.check_s = round(time.perf_counter() - t0, 3)
        if not row.exact:
            row.reason = (f"not exact: eval {row.err_eval:.2e}, train {row.err_train:.2e} "
                          f"(tol {row.tol:g}) {row.train_note}").strip()
    except Exception as e:
        row.status = "error"
        row.reason = f"{stage}: {_first_line(e)}"
        row.error_type = type(e).__name__
        row.error_where = _where(e)
        if stage == "expand" and row.traced is None:
            row.traced = not isinstance(e, getattr(gpd_fx, "TraceError", ()))
    finally:
        row.peak_rss_gib = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB, 2)
        row.check_s = row.check_s if row.check_s is not None else round(time.perf_counter() - t_start, 1)
    return row


def _float64_failure(model: nn.Module, xs: tuple[Tensor, ...]) -> str:
    """Why ``model`` (converted to float64) fails on float64 inputs when it runs in float32, or ''."""
    try:
        with torch.no_grad():
            model.eval()(*xs)
        return ""
    except Exception as e:
        why = _first_line(e)
    try:
        with torch.no_grad():
            copy_ = copy.deepcopy(model).float()
            copy_.eval()(*(x.float() for x in xs))
    except Exception:
        return ""   # fails in float32 too: not a dtype problem, expand will report it
    return why[:120]


def time_resnet50(runs: int = 3) -> dict:
    """Median expand time of ResNet-50 at ratio 3 on a 1x3x64x64 input, float32, in one process."""
    import gpd_fx
    import torchvision

    out = {}
    model = torchvision.models.resnet50(weights=None)
    x = torch.randn(1, 3, 64, 64)
    variants = {"default": {}}
    if "branches" in _expand_params():
        variants["IR only (branches=())"] = {"branches": ()}
    for label, kw in variants.items():
        secs = []
        for _ in range(runs):
            t0 = time.perf_counter()
            gpd_fx.expand(model, ratio=3, example_inputs=(x,), **kw)
            secs.append(time.perf_counter() - t0)
        out[label] = {"median_s": statistics.median(secs), "runs_s": secs}
    return out


def _expand_params() -> set[str]:
    import inspect

    import gpd_fx
    return set(inspect.signature(gpd_fx.expand).parameters)


# --------------------------------------------------------------------------------------------
# Driver: subprocess per model, table, summary, JSON
# --------------------------------------------------------------------------------------------

def environment(threads: int) -> dict:
    import torchvision

    env = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__, "torchvision": torchvision.__version__,
        "python": platform.python_version(), "platform": platform.platform(),
        "cpu_count": os.cpu_count(), "torch_threads": threads,
        "load_avg_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "mem_total_gib": None,
    }
    import gpd_fx
    env["gpd_fx_file"] = gpd_fx.__file__
    try:
        import timm
        env["timm"] = timm.__version__
    except ImportError:
        env["timm"] = None
    try:
        env["gpd_fx_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE,
                                              capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:
        env["gpd_fx_commit"] = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                env["mem_total_gib"] = round(int(line.split()[1]) * 1024 / GIB, 1)
    except OSError:
        pass
    return env


def _fmt_params(n) -> str:
    if n is None:
        return "-"
    return f"{n / 1e6:.1f}M"


def _yn(b) -> str:
    return "-" if b is None else ("yes" if b else "NO")


def format_row(r: Row, fold: bool) -> str:
    if r.status in ("skipped", "timeout", "crashed") or (r.status == "error" and r.expand_s is None):
        cols = [f"{r.name:<34}", f"{r.task[:12]:<12}", f"r{r.ratio}", f"{r.input or '-':<16}",
                f"{r.status.upper()}: {r.reason}"]
        return " ".join(cols)
    err = max(x for x in (r.err_eval or 0.0, r.err_train or 0.0))
    cols = [
        f"{r.name:<34}", f"{r.task[:12]:<12}", f"r{r.ratio}", f"{r.input:<16}", f"{r.dtype[:7]:<7}",
        f"{_yn(r.traced):<4}", f"{_yn(r.exact_eval):>3}/{_yn(r.exact_train):<3}",
        f"{err:9.2e}", f"{r.share:6.3f}" if r.share is not None else "     -",
        f"{r.n_boundaries if r.n_boundaries is not None else '-':>4}",
        f"{r.expand_s:7.2f}" if r.expand_s is not None else "      -",
        f"{_fmt_params(r.student_params):>8}", f"{_fmt_params(r.teacher_params):>9}",
    ]
    if fold:
        cols += [f"{_yn(r.fold_exact):>4}", f"{_yn(r.export_ok):>4}", f"{_yn(r.onnx_agrees):>4}"]
    if r.source == "timm":
        cols.append(f"fx:{_yn(r.timm_fx)}")
    extra = r.reason if r.status != "ok" or not r.exact else ""
    if r.fallbacks:
        extra = f"FALLBACKS {list(r.fallbacks)[:3]} " + extra
    if r.status == "ok" and r.exact and r.share is not None and r.share < 1 and r.boundary_reasons:
        extra = "boundaries: " + ", ".join(sorted({v.split(":")[0] for v in r.boundary_reasons.values()}))[:120]
    if r.under_widened and not r.branch_layers:
        extra += (f"  teacher/student params {r.teacher_params / r.student_params:.2f} < {UNDER_WIDENED} r^2 "
                  f"({r.runtime_widenings} run-time widenings)")
    return " ".join(cols) + (f"  {extra}" if extra else "")


def header(fold: bool, source: str) -> str:
    cols = [f"{'model':<34}", f"{'task':<12}", "r ", f"{'input':<16}", f"{'dtype':<7}", "trcd", "exact e/t",
            "max.rel.err", "share", "#bnd", "expand s", " student", "  teacher"]
    if fold:
        cols += ["fold", "expt", "onnx"]
    if source == "timm":
        cols.append("timm-fx")
    return " ".join(cols)


def summarize(rows: list[Row], source: str) -> dict:
    """Counts per ratio (see the issue acceptance criteria)."""
    out: dict = {}
    for ratio in sorted({r.ratio for r in rows}):
        rs = [r for r in rows if r.ratio == ratio]
        ran = [r for r in rs if r.status not in ("skipped",)]
        skipped = [r for r in rs if r.status == "skipped"]
        exact = [r for r in rs if r.status == "ok" and r.exact]
        s: dict = {
            "models": len(rs), "ran": len(ran), "traced": sum(1 for r in rs if r.traced),
            "exact": len(exact), "exact_eval": sum(1 for r in rs if r.exact_eval),
            "exact_train": sum(1 for r in rs if r.exact_train),
            "with_fallbacks": [r.name for r in rs if r.fallbacks],
            "under_widened": {r.name: round(r.teacher_params / r.student_params, 2)
                              for r in rs if r.under_widened and not r.branch_layers},
            "skipped": {r.name: r.reason for r in skipped},
            "not_exact": {r.name: r.reason for r in ran if not (r.status == "ok" and r.exact)},
        }
        if source == "torchvision":
            cnn = [r for r in ran if r.kind == "cnn"]
            tr = [r for r in ran if r.kind == "transformer"]
            s["cnn"] = len(cnn)
            s["cnn_share_ok"] = sum(1 for r in cnn if (r.share or 0) >= CNN_SHARE)
            s["cnn_low_share"] = {r.name: r.share for r in cnn if (r.share or 0) < CNN_SHARE}
            s["transformers"] = len(tr)
            s["transformer_share_ok"] = sum(1 for r in tr if (r.share or 0) >= TRANSFORMER_SHARE)
            s["transformer_low_share"] = {r.name: r.share for r in tr if (r.share or 0) < TRANSFORMER_SHARE}
        else:
            fx = [r for r in rs if r.timm_fx]
            s["families"] = len(rs)
            s["built"] = sum(1 for r in rs if r.input and not r.reason.startswith("pick input size"))
            s["timm_traceable"] = len(fx)
            s["timm_traceable_exact"] = sum(1 for r in fx if r.status == "ok" and r.exact)
            s["timm_traceable_share_ok"] = sum(1 for r in fx if (r.share or 0) >= TRANSFORMER_SHARE)
            s["timm_traceable_share_ok_pct"] = (100.0 * s["timm_traceable_share_ok"] / len(fx)) if fx else None
            trf = [r for r in fx if r.kind == "transformer"]
            s["timm_traceable_transformers"] = len(trf)
            s["timm_traceable_transformers_exact"] = sum(1 for r in trf if r.status == "ok" and r.exact)
            s["timm_traceable_transformers_share_ok"] = sum(1 for r in trf if (r.share or 0) >= TRANSFORMER_SHARE)
            s["timm_traceable_not_exact"] = {r.name: r.reason for r in fx if not (r.status == "ok" and r.exact)}
            s["timm_traceable_low_share"] = {r.name: r.share for r in fx if (r.share or 0) < TRANSFORMER_SHARE}
        out[f"ratio_{ratio}"] = s
    return out


def summary_lines(summary: dict, source: str) -> list[str]:
    lines = []
    for key, s in summary.items():
        r = key.split("_")[1]
        skip_why = collections.Counter(re.sub(r"~?[\d.]+ GiB", "N GiB", v) for v in s["skipped"].values())
        skips = "; ".join(f"{n}x {w}" for w, n in skip_why.items()) or "none"
        if source == "torchvision":
            lines.append(
                f"SUMMARY ratio {r}: {s['exact']}/{s['ran']} run models exact (eval+train; "
                f"eval {s['exact_eval']}, train {s['exact_train']}), traced {s['traced']}/{s['ran']}; "
                f"CNNs with share >= {CNN_SHARE}: {s['cnn_share_ok']}/{s['cnn']}; transformers with share "
                f">= {TRANSFORMER_SHARE}: {s['transformer_share_ok']}/{s['transformers']}; "
                f"fallbacks in {len(s['with_fallbacks'])}; under-widened {len(s['under_widened'])}; "
                f"skipped {len(s['skipped'])} ({skips})")
        else:
            pct = s["timm_traceable_share_ok_pct"]
            lines.append(
                f"SUMMARY ratio {r}: {s['families']} families; timm can FX-trace {s['timm_traceable']}; of "
                f"those exact (eval+train) {s['timm_traceable_exact']}/{s['timm_traceable']}, share >= "
                f"{TRANSFORMER_SHARE}: {s['timm_traceable_share_ok']}/{s['timm_traceable']}"
                f" ({pct:.0f}%)" if pct is not None else f"SUMMARY ratio {r}: {s['families']} families; none traceable")
            lines[-1] += (f"; transformers among them: exact {s['timm_traceable_transformers_exact']}/"
                          f"{s['timm_traceable_transformers']}, share >= {TRANSFORMER_SHARE} "
                          f"{s['timm_traceable_transformers_share_ok']}/{s['timm_traceable_transformers']}; "
                          f"all families exact {s['exact']}/{s['ran']}; fallbacks in {len(s['with_fallbacks'])}; "
                          f"skipped {len(s['skipped'])} ({skips})")
    return lines


def _set_threads(n: int) -> None:
    torch.set_num_threads(n)


def run_worker(args) -> None:
    """Subprocess entry: measure one (model, ratio) and write the row as JSON."""
    _set_threads(args.threads)
    _die_with_parent()
    if args.mem_limit_gib:
        # A hard address-space cap turns a runaway allocation into a MemoryError row instead of
        # the kernel's OOM killer picking some process on this shared machine.
        lim = int(args.mem_limit_gib * GIB)
        resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
    if args.worker == "__timing__":
        res = time_resnet50()
        Path(args.worker_out).write_text(json.dumps(res))
        return
    spec = Spec(**json.loads(args.worker))
    row = measure(spec, args.worker_ratio, dtype=args.dtype, max_gib=args.max_gib,
                  branches=args.branches, do_fold=args.fold, check_free_memory=args.free_memory_check)
    Path(args.worker_out).write_text(json.dumps(asdict(row)))


def _die_with_parent() -> None:
    """Linux: have the kernel kill this worker when the driver dies (no orphaned sweeps)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def _spawn(payload: str, ratio: int, args, timeout: float) -> tuple[dict | None, str, int | None]:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "row.json"
        err = Path(d) / "stderr.txt"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", payload, "--worker-ratio", str(ratio),
               "--worker-out", str(out), "--threads", str(args.threads), "--dtype", args.dtype,
               "--max-gib", str(args.max_gib), "--branches", args.branches,
               "--mem-limit-gib", str(args.mem_limit_gib)]
        if not args.free_memory_check:
            cmd.append("--no-free-memory-check")
        if args.fold:
            cmd.append("--fold")
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONWARNINGS="ignore")
        with open(err, "w") as ef:
            try:
                p = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=ef, timeout=timeout, env=env)
                rc = p.returncode
            except subprocess.TimeoutExpired:
                rc = None
        tail = err.read_text(errors="replace")[-2000:]
        data = json.loads(out.read_text()) if out.exists() else None
        return data, tail, rc


def run_one(spec: Spec, ratio: int, args) -> Row:
    if not args.isolate:
        return measure(spec, ratio, dtype=args.dtype, max_gib=args.max_gib, branches=args.branches,
                       do_fold=args.fold, check_free_memory=args.free_memory_check)
    data, tail, rc = _spawn(json.dumps(asdict(spec)), ratio, args, args.timeout)
    if data is not None:
        return Row(**data)
    row = Row(spec.name, spec.source, ratio, family=spec.family)
    if rc is None:
        row.status, row.reason = "timeout", f"no result within {args.timeout:g} s"
    else:
        last = [ln for ln in tail.strip().splitlines() if ln.strip()][-1:] or [""]
        sig = f"signal {-rc}" if rc < 0 else f"exit code {rc}"
        oom = " (killed: out of memory?)" if rc in (-9, 137) else ""
        row.status, row.reason = "crashed", f"{sig}{oom}: {last[0][:300]}"
    return row


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1 (a ratio r makes the teacher r x wider), "
                                         f"got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def _mem_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024 / GIB
    except OSError:
        pass
    return None


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def build_parser() -> argparse.ArgumentParser:
    """The command line of this script (every option's help states its default)."""
    total = _mem_total_gib()
    # budgets scale with the machine the sweep runs on (fixed fallbacks where /proc is missing)
    max_gib = round(0.8 * total, 1) if total else 20.0
    mem_limit = round(0.9 * total, 1) if total else 0.0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", choices=["torchvision", "timm"], default="torchvision",
                   help="model zoo: every torchvision classifier, or one model per timm family "
                        "(default: %(default)s)")
    p.add_argument("--tasks", default="classification",
                   help="torchvision: comma-separated tasks out of " + ", ".join(TASKS) + ", or 'all'; "
                        f"detection rows are reported as skipped ({DETECTION_SKIP}) (default: %(default)s)")
    p.add_argument("--ratio", type=_positive_int, nargs="+", default=[2, 3],
                   help="expansion ratios r >= 1 (default: 2 3)")
    p.add_argument("--models", default="", help="comma-separated model names (timm: names or families) "
                                                "(default: the whole zoo)")
    p.add_argument("--image-size", type=_positive_int, default=None,
                   help="input side for every model (default: per model)")
    p.add_argument("--json", default=None, help="output JSON, rewritten after every row "
                                                "(default: zoo_<source>.json in the current directory)")
    p.add_argument("--limit", type=_positive_int, default=None, help="first K models only (default: all)")
    p.add_argument("--fold", action="store_true", help="also fill fold/export/onnx columns (default: off)")
    p.add_argument("--dtype", choices=["auto", "float64", "float32"], default="auto",
                   help="auto: float64 when the float64 teacher fits --max-gib, else float32 "
                        "(default: %(default)s)")
    p.add_argument("--branches", choices=["default", "none", "all"], default="default",
                   help="multi-branch (CBR) kinds of the teacher's conv/linear layers: none = IR only "
                        "(expand's branches=()), all = every kind that applies (expand's branches=None), "
                        "default = expand's own default, i.e. none (default: %(default)s)")
    p.add_argument("--max-gib", type=_positive_float, default=max_gib,
                   help="memory budget per model in GiB; a model estimated above it is a skipped row "
                        "(default: 80%% of this machine's memory, %(default)s)")
    p.add_argument("--mem-limit-gib", type=float, default=mem_limit,
                   help="hard address-space cap of each worker in GiB, 0 = none "
                        "(default: 90%% of this machine's memory, %(default)s)")
    p.add_argument("--no-free-memory-check", dest="free_memory_check", action="store_false",
                   help="do not skip a model whose estimate exceeds the memory free when it starts "
                        "(default: such a model is a skipped row, 'rerun')")
    p.add_argument("--threads", type=_positive_int, default=1,
                   help="torch threads per model; the inputs are tiny (batch 2), and more threads mostly "
                        "wait on each other when the cores are busy (default: %(default)s)")
    p.add_argument("--timeout", type=_positive_float, default=1800.0,
                   help="seconds per model and ratio (default: %(default)s)")
    p.add_argument("--no-isolate", dest="isolate", action="store_false",
                   help="run in this process (default: one subprocess per model and ratio)")
    p.add_argument("--resume", action="store_true", help="keep rows already in the JSON file (default: off)")
    p.add_argument("--rerun", default="",
                   help="with --resume: comma-separated models (timm: names or families) whose rows are "
                        "measured again, e.g. after a fix (default: none)")
    p.add_argument("--no-timing", dest="timing", action="store_false",
                   help="skip the ResNet-50 timing row (default: timed)")
    p.add_argument("--all-ratios", action="store_true",
                   help="timm: run every ratio on every family (default: ratios after the first "
                        "only on transformers)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-ratio", type=int, default=2, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    return p


def _parse_tasks(text: str) -> tuple[str, ...]:
    if text.strip() == "all":
        return TASKS
    tasks = tuple(t.strip() for t in text.split(",") if t.strip())
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        raise SystemExit(f"--tasks: unknown task(s) {bad or [text]}; choose from {', '.join(TASKS)} or 'all'")
    return tasks


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        run_worker(args)
        return 0
    _set_threads(args.threads)
    from tqdm import tqdm

    tasks = _parse_tasks(args.tasks)
    if args.source == "torchvision":
        # named models are looked up in every task, so `--models r3d_18` needs no --tasks
        specs = torchvision_specs(args.image_size, TASKS if args.models else tasks)
    else:
        specs = timm_specs(args.image_size)
    if args.models:
        want = [m.strip() for m in args.models.split(",") if m.strip()]
        by_name = {s.name: s for s in specs}
        chosen = []
        for w in want:
            if w in by_name:
                chosen.append(by_name[w])
            elif args.source == "timm" and any(s.family == w for s in specs):
                chosen += [s for s in specs if s.family == w]
            elif args.source == "timm":
                chosen.append(Spec("timm", w, {}, args.image_size, family=_family(w)))
            else:
                print(f"unknown model {w!r}", file=sys.stderr)
                return 2
        specs = chosen
    if args.limit:
        specs = specs[:args.limit]
    out_path = Path(args.json) if args.json else Path.cwd() / f"zoo_{args.source}.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    done: dict = {}
    rerun = {m.strip() for m in args.rerun.split(",") if m.strip()}
    if args.resume and out_path.exists():
        for d in json.loads(out_path.read_text()).get("rows", []):
            r = Row(**d)
            if r.status != "skipped" and r.name not in rerun and r.family not in rerun:
                # skips are re-judged: cheap, and the budget may differ
                done[(r.name, r.ratio)] = r
    env = environment(args.threads)
    print(f"# gpd_fx zoo benchmark, source={args.source}, ratios={args.ratio}, heads num_classes=10, "
          f"random weights, batch {BATCH}; torch {env['torch']}, {env['cpu_count']} CPUs, "
          f"{args.threads} thread(s)/model, budget {args.max_gib:g} GiB/model; {env['date']}")
    print("# exact = max|teacher - student| / max|student| <= tol (float64: 1e-9, float32: 1e-3), "
          "eval and train mode (dropout p=0, same seed per forward)")
    fold_on = args.fold and _has_fold()
    print(header(fold_on, args.source))
    rows: list[Row] = []
    kinds: dict[str, str] = {}
    jobs = [(s, r) for r in args.ratio for s in specs]
    bar = tqdm(jobs, desc="zoo", file=sys.stderr, dynamic_ncols=True)
    payload = {"environment": env, "config": {k: v for k, v in vars(args).items() if not k.startswith("worker")}}
    for spec, ratio in bar:
        bar.set_postfix_str(f"{spec.name} r{ratio}")
        if (args.source == "timm" and not args.all_ratios and ratio != args.ratio[0]
                and kinds.get(spec.name) not in (None, "transformer")):
            continue
        row = done.get((spec.name, ratio)) or run_one(spec, ratio, args)
        kinds[spec.name] = row.kind or kinds.get(spec.name, "")
        rows.append(row)
        tqdm.write(format_row(row, fold_on), file=sys.stdout)
        payload["rows"] = [asdict(r) for r in rows]
        payload["summary"] = summarize(rows, args.source)
        _atomic_write(out_path, payload)
    bar.close()
    summary = summarize(rows, args.source)
    row_tasks = sorted({r.task for r in rows}, key=TASKS.index) if args.source == "torchvision" else []
    if row_tasks and row_tasks != ["classification"]:
        payload["summary_by_task"] = {}
        for task in row_tasks:
            s_task = summarize([r for r in rows if r.task == task], args.source)
            payload["summary_by_task"][task] = s_task
            for line in summary_lines(s_task, args.source):
                print(line.replace("SUMMARY ", f"SUMMARY {task} ", 1))
    else:
        for line in summary_lines(summary, args.source):
            print(line)
    if args.timing and args.source == "torchvision":
        timing = _timing(args)
        payload["timing"] = timing
        for label, t in timing.items():
            if isinstance(t, dict):
                runs = ", ".join(f"{s:.2f}" for s in t["runs_s"])
                print(f"TIMING resnet50 ratio 3, 1x3x64x64, float32, {args.threads} thread(s), {label}: "
                      f"expand {t['median_s']:.2f} s (median of 3 in one process: {runs}) (target < 3 s)")
            else:
                print(f"TIMING resnet50: {t}")
    payload["summary"] = summary
    payload["rows"] = [asdict(r) for r in rows]
    _atomic_write(out_path, payload)
    print(f"# wrote {out_path}")
    return 0


def _has_fold() -> bool:
    import gpd_fx
    return hasattr(gpd_fx, "fold")


def _timing(args) -> dict:
    if not args.isolate:
        return time_resnet50()
    data, tail, rc = _spawn("__timing__", 3, args, args.timeout)
    return data if data is not None else {"error": f"rc={rc}: {tail.strip().splitlines()[-1:] }"}


def _atomic_write(path: Path, payload: dict) -> None:
    from gpd_fx.checkpoint import atomic_write  # gpd_fx is imported lazily throughout this file

    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(payload, indent=1, default=str)))


if __name__ == "__main__":
    sys.exit(main())
