"""Model specs: build a classifier from ``torchvision:NAME``, ``timm:NAME`` or ``module.path:factory``.

A *spec* is a short string that names a model and can be stored in a checkpoint, so that
``gpd-fx fold`` can rebuild the user's module without any Python from the user. Built-in
models live here too: :func:`small_cnn` (the default student, fast on a laptop CPU) and
:func:`wide_cnn` (the default static teacher of the "with teacher" scenario).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from typing import Any, Callable

import torch
from torch import Tensor, nn

from gpd_fx.errors import GPDError

__all__ = [
    "DEFAULT_STUDENT",
    "DEFAULT_TEACHER",
    "ModelSpecError",
    "SmallCNN",
    "build_model",
    "small_cnn",
    "wide_cnn",
]

DEFAULT_STUDENT = "gpd_fx.models:small_cnn"
"""Spec of the default student: :func:`small_cnn`, about 78k parameters."""

DEFAULT_TEACHER = "gpd_fx.models:wide_cnn"
"""Spec of the default static teacher: :func:`wide_cnn`, about 700k parameters."""


class ModelSpecError(GPDError, ValueError):
    """A model spec that cannot be resolved (bad syntax, unknown name, failing factory)."""


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
