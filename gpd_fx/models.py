"""Model specs: build a classifier from ``torchvision:NAME``, ``timm:NAME`` or ``module.path:factory``.

A *spec* is a short string that names a model and is stored in checkpoints and student files.
Files never choose code: a spec read from a file is used only when it names a model of the
allow-list (``torchvision:NAME``, ``timm:NAME``, ``gpd_fx.models:NAME`` of a built-in model),
which builds a model without importing or calling anything the file names. Any other spec
(``module.path:factory`` imports and calls user code) must be given again by the caller
(``gpd-fx fold CKPT --model SPEC``, ``gpd-fx train SPEC --resume ...``); see
:func:`resolve_stored_spec`. Built-in models live here too: :func:`small_cnn` (the default
student, fast on a laptop CPU) and :func:`wide_cnn` (the default static teacher of the "with
teacher" scenario).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
from typing import Any, Callable

import torch
from torch import Tensor, nn

from gpd_fx.errors import GPDError

__all__ = [
    "DEFAULT_STUDENT",
    "DEFAULT_TEACHER",
    "ModelSpecError",
    "SmallCNN",
    "UntrustedSpecError",
    "build_model",
    "is_trusted_spec",
    "resolve_stored_spec",
    "small_cnn",
    "wide_cnn",
]

DEFAULT_STUDENT = "gpd_fx.models:small_cnn"
"""Spec of the default student: :func:`small_cnn`, about 78k parameters."""

DEFAULT_TEACHER = "gpd_fx.models:wide_cnn"
"""Spec of the default static teacher: :func:`wide_cnn`, about 700k parameters."""


class ModelSpecError(GPDError, ValueError):
    """A model spec that cannot be resolved (bad syntax, unknown name, failing factory)."""


class UntrustedSpecError(ModelSpecError):
    """A file names a model outside the allow-list, or one that differs from the spec given."""


# ------------------------------------------------------------------------- built-in models


class _BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv-BN, identity or 1x1 projection shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.act = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act(out + self.shortcut(x))


class SmallCNN(nn.Module):
    """A small ResNet-like CNN: stem, three stages of one basic block, global pool, linear.

    Args:
        num_classes: output logits.
        in_chans: input image channels.
        width: channels of the first stage; the others use 2x and 4x.
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 3, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.layer1 = _BasicBlock(width, width, 1)
        self.layer2 = _BasicBlock(width, 2 * width, 2)
        self.layer3 = _BasicBlock(2 * width, 4 * width, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def small_cnn(num_classes: int = 10, in_chans: int = 3) -> SmallCNN:
    """The default student: :class:`SmallCNN` of width 16 (about 78k parameters).

    Small enough that GPD with ratio 2 trains a few epochs of digits in well under a minute
    on two CPU cores, and built only from ops every expansion rule covers (conv, BN, ReLU,
    residual add, pooling, flatten, linear).

    Args:
        num_classes: output logits.
        in_chans: input image channels.

    Returns:
        A freshly initialised :class:`SmallCNN`.

    Example:
        >>> sum(p.numel() for p in small_cnn().parameters()) < 100_000
        True
    """
    return SmallCNN(num_classes, in_chans, width=16)


def wide_cnn(num_classes: int = 10, in_chans: int = 3) -> SmallCNN:
    """The default static teacher: :class:`SmallCNN` of width 48 (about 700k parameters).

    Args:
        num_classes: output logits.
        in_chans: input image channels.

    Returns:
        A freshly initialised :class:`SmallCNN`, 3x wider than :func:`small_cnn`.

    Example:
        >>> wide_cnn(10).fc.in_features
        192
    """
    return SmallCNN(num_classes, in_chans, width=48)


# ------------------------------------------------------------------------------ resolving

# Built-in factories a file may name as ``gpd_fx.models:NAME``: a fixed table, so that a stored
# spec never reaches getattr() on an arbitrary attribute.
_BUILTIN = {"small_cnn": small_cnn, "wide_cnn": wide_cnn}
# Names of library models: no module path, no hub prefix (``timm:hf-hub:...`` would download).
_LIBRARY_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")


def is_trusted_spec(spec: object) -> bool:
    """Whether a spec read from a file may be built without the user naming it again.

    True only for ``torchvision:NAME`` and ``timm:NAME`` (a plain model name, looked up in the
    library's own registry; nothing is imported by name and nothing is downloaded) and
    ``gpd_fx.models:small_cnn`` / ``gpd_fx.models:wide_cnn``. ``module.path:factory`` specs
    import and call arbitrary code, so a file can never choose one.

    Args:
        spec: the stored value (any type; non-strings are not trusted).

    Returns:
        ``True`` when the spec is on the allow-list.

    Example:
        >>> is_trusted_spec("torchvision:resnet18"), is_trusted_spec("http.server:test")
        (True, False)
    """
    if not isinstance(spec, str) or ":" not in spec:
        return False
    prefix, name = spec.split(":", 1)
    if prefix in ("torchvision", "timm"):
        return _LIBRARY_NAME.fullmatch(name) is not None
    return prefix == "gpd_fx.models" and name in _BUILTIN


def resolve_stored_spec(stored: object, given: str | None, *, what: str, how: str) -> str | None:
    """The spec to build for a model that a file (checkpoint, student file) names.

    Files never choose code: without ``given`` the stored spec is used only if
    :func:`is_trusted_spec` accepts it. With ``given`` (the caller named the model
    explicitly) it must equal the stored spec, so that a checkpoint is never loaded into
    another model by accident.

    Args:
        stored: the spec recorded in the file (``None`` when it records none).
        given: the spec the caller passed, or ``None``.
        what: the file and field, for messages, e.g. ``"checkpoint 'run/checkpoint.pt'"``.
        how: how the caller passes the model explicitly, with ``{spec}`` where the spec goes,
            e.g. ``"gpd-fx fold CHECKPOINT --model {spec}"``.

    Returns:
        The spec to build (``None`` when neither names one).

    Raises:
        UntrustedSpecError: the stored spec is not on the allow-list and none was given, or
            the given spec differs from the stored one.

    Example:
        >>> resolve_stored_spec("timm:resnet18", None, what="checkpoint", how="--model {spec}")
        'timm:resnet18'
    """
    if given is not None:
        if stored is not None and stored != given:
            raise UntrustedSpecError(f"{what} was written for model {stored!r} but {given!r} was given; pass "
                                     f"the spec it was written with ({how.format(spec=stored)}) or start a new run")
        return given
    if stored is None:
        return None
    if not is_trusted_spec(stored):
        raise UntrustedSpecError(
            f"{what} names model {stored!r}, which is not on the allow-list of specs a file may choose "
            "(torchvision:NAME, timm:NAME, gpd_fx.models:small_cnn|wide_cnn), so nothing was imported; "
            f"if you trust that code, name the model yourself: {how.format(spec=stored)}")
    return str(stored)


def _suggest(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.6)
    return f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""


def _accepted_kwargs(fn: Callable[..., Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The subset of ``kwargs`` that ``fn`` accepts by name (all of them if it takes ``**kw``)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins without a signature: pass only num_classes
        return {k: v for k, v in kwargs.items() if k == "num_classes"}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in params}


def _torchvision(name: str, num_classes: int, image_size: int, in_chans: int) -> nn.Module:
    import torchvision

    names = torchvision.models.list_models()
    if name not in names:
        raise ModelSpecError(f"unknown torchvision model {name!r}{_suggest(name, names)} "
                             "(torchvision.models.list_models() lists all)")
    if in_chans != 3:
        raise ModelSpecError(f"torchvision models take 3 input channels, got in_chans={in_chans}")
    kwargs: dict[str, Any] = {"weights": None, "num_classes": num_classes}
    # ViTs and a few others fix their input size in the constructor
    builder = torchvision.models.get_model_builder(name)
    if "image_size" in _accepted_kwargs(builder, {"image_size": image_size}) and name.startswith("vit"):
        kwargs["image_size"] = image_size
    try:
        return torchvision.models.get_model(name, **kwargs)
    except Exception as err:  # a builder rejecting arguments, e.g. inception's aux_logits
        raise ModelSpecError(f"torchvision:{name} could not be built with {kwargs}: {err}") from None


def _timm(name: str, num_classes: int, image_size: int, in_chans: int) -> nn.Module:
    import timm

    if not timm.is_model(name):
        names = timm.list_models()
        raise ModelSpecError(f"unknown timm model {name!r}{_suggest(name, names)} "
                             "(timm.list_models('*pattern*') lists them)")
    kwargs: dict[str, Any] = {"pretrained": False, "num_classes": num_classes, "in_chans": in_chans}
    try:
        # transformers fix their patch grid from img_size; CNNs reject the argument
        return timm.create_model(name, img_size=image_size, **kwargs)
    except TypeError:
        pass
    try:
        return timm.create_model(name, **kwargs)
    except Exception as err:
        raise ModelSpecError(f"timm:{name} could not be built with {kwargs}: {err}") from None


def _factory(module_path: str, attr: str, num_classes: int, image_size: int, in_chans: int) -> nn.Module:
    try:
        module = importlib.import_module(module_path)
    except ImportError as err:
        raise ModelSpecError(f"cannot import module {module_path!r} of model spec "
                             f"'{module_path}:{attr}': {err}") from None
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        public = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
        raise ModelSpecError(f"module {module_path!r} has no callable {attr!r}{_suggest(attr, public)}")
    kwargs = _accepted_kwargs(fn, {"num_classes": num_classes, "in_chans": in_chans, "image_size": image_size,
                                   "img_size": image_size})
    try:
        model = fn(**kwargs)
    except Exception as err:
        raise ModelSpecError(f"model factory '{module_path}:{attr}' failed with {kwargs}: {err}") from None
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"model factory '{module_path}:{attr}' returned {type(model).__name__}, "
                             "not a torch.nn.Module")
    return model


def build_model(spec: str, num_classes: int, image_size: int = 32, in_chans: int = 3) -> nn.Module:
    """Build a randomly initialised classifier from a spec string.

    Specs:

    - ``torchvision:NAME`` -- ``torchvision.models.get_model(NAME, weights=None, num_classes=...)``;
    - ``timm:NAME`` -- ``timm.create_model(NAME, pretrained=False, num_classes=..., in_chans=...)``,
      plus ``img_size`` for models that accept it (ViTs);
    - ``module.path:factory`` -- imports ``module.path`` and calls ``factory`` with whichever of
      ``num_classes``, ``in_chans``, ``image_size``/``img_size`` it accepts.

    Nothing is ever downloaded.

    Args:
        spec: the model spec.
        num_classes: number of output logits.
        image_size: side of the square input images (used by models that fix it).
        in_chans: input channels.

    Returns:
        The model, in train mode.

    Raises:
        ModelSpecError: malformed spec or unknown name (close matches are suggested).

    Example:
        >>> build_model("gpd_fx.models:small_cnn", num_classes=10).fc.out_features
        10
    """
    if not isinstance(spec, str) or ":" not in spec:
        raise ModelSpecError(f"model spec {spec!r} must look like 'torchvision:NAME', 'timm:NAME' or "
                             f"'module.path:factory' (e.g. {DEFAULT_STUDENT!r})")
    if num_classes < 1:
        raise ModelSpecError(f"num_classes must be >= 1, got {num_classes}")
    prefix, name = spec.split(":", 1)
    if not prefix or not name:
        raise ModelSpecError(f"model spec {spec!r} has an empty part; expected 'PREFIX:NAME'")
    if prefix == "torchvision":
        return _torchvision(name, num_classes, image_size, in_chans)
    if prefix == "timm":
        return _timm(name, num_classes, image_size, in_chans)
    return _factory(prefix, name, num_classes, image_size, in_chans)
