"""Data sets and loaders. Nothing here ever downloads anything.

The built-in default is scikit-learn's bundled ``digits`` set (1797 greyscale 8x8 images, 10
classes), small enough to train on a CPU in seconds and present wherever scikit-learn is
installed. Anything else comes from an ``ImageFolder`` tree on disk.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset, TensorDataset

from gpd_fx.errors import GPDError

__all__ = [
    "CorruptImageError",
    "DataError",
    "DatasetNotFoundError",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "build_datasets",
    "digits_datasets",
    "image_folder_datasets",
    "make_loaders",
    "stratified_split",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DataError(GPDError, ValueError):
    """Bad data-set arguments (split fraction, image size, channels, mismatched class lists)."""


class DatasetNotFoundError(GPDError, FileNotFoundError):
    """A data directory is missing or holds no images; the message names the path."""


class CorruptImageError(DataError):
    """An image file cannot be decoded; the message names the file.

    Raised in a ``DataLoader`` worker, it reaches the main process re-created from a message
    that holds the worker's whole traceback; the constructor keeps only this error's own line,
    so the user sees the file and the fix, not 2,000 characters of worker frames.
    """

    def __init__(self, message: str) -> None:
        marker = f"{type(self).__name__}: "
        if "Traceback (most recent call last)" in message and marker in message:
            message = message.rsplit(marker, 1)[1].strip()
        super().__init__(message)


def _load_image(path: str):
    """torchvision's default image loader, with decoding errors naming the file."""
    from PIL import Image
    from torchvision.datasets.folder import default_loader

    try:
        return default_loader(path)
    # PIL: truncated or not an image (OSError), bad header (ValueError, SyntaxError), too many pixels
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise CorruptImageError(f"image file {path!r} cannot be read ({type(err).__name__}: {err}); "
                                "delete or replace it") from None


def _check_fraction(val_fraction: float) -> None:
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")


def stratified_split(labels: Sequence[int] | np.ndarray, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded per-class split of sample indices into train and validation.

    Each class sends ``round(n_c * val_fraction)`` of its samples to validation, but always
    keeps at least one in train, so tiny folders (a class with one image) still work — which
    scikit-learn's ``train_test_split(stratify=...)`` refuses.

    Args:
        labels: class label of every sample.
        val_fraction: share of each class that goes to validation, in ``(0, 1)``.
        seed: seed of the shuffle; the same seed gives the same split on every machine.

    Returns:
        ``(train_indices, val_indices)``, each sorted.

    Example:
        >>> stratified_split([0, 0, 0, 0, 1, 1, 1, 1], 0.5, seed=0)[1].__len__()
        4
    """
    _check_fraction(val_fraction)
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    train, val = [], []
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        n_val = min(int(round(len(idx) * val_fraction)), len(idx) - 1)
        val.extend(idx[:n_val].tolist())
        train.extend(idx[n_val:].tolist())
    if not val:
        raise DataError(
            f"val_fraction={val_fraction} leaves the validation split empty for {len(labels)} "
            "samples; use a larger fraction or give a separate validation directory"
        )
    return sorted(train), sorted(val)


# -------------------------------------------------------------------------------- digits


def digits_datasets(
    image_size: int = 32,
    channels: int = 3,
    seed: int = 0,
    val_fraction: float = 0.2,
) -> tuple[TensorDataset, TensorDataset, int]:
    """scikit-learn's bundled ``digits`` as image tensors, split and normalised.

    Images are scaled from 0..16 to [0, 1], resized bilinearly to ``image_size`` (so models
    built for larger inputs can run unchanged), repeated to ``channels``, and normalised
    per channel with the mean and std of the *train* split only (no peeking at validation).
    All tensors are built once here; the data set is about 1.8k images.

    Args:
        image_size: side of the square output images (8 keeps the native size).
        channels: number of identical channels (3 for ImageNet-style models).
        seed: seed of the stratified train/validation split.
        val_fraction: share of every class that goes to validation.

    Returns:
        ``(train_ds, val_ds, num_classes)``: ``TensorDataset``s of float32 images
        ``(N, channels, image_size, image_size)`` and int64 labels ``(N,)``, and 10.

    Example:
        >>> train, val, k = digits_datasets(image_size=16, channels=1)
        >>> train[0][0].shape, k
        (torch.Size([1, 16, 16]), 10)
    """
    from sklearn.datasets import load_digits  # local: only this function needs scikit-learn

    if image_size < 1:
        raise DataError(f"image_size must be >= 1, got {image_size}")
    if channels < 1:
        raise DataError(f"channels must be >= 1, got {channels}")
    digits = load_digits()
    labels = torch.as_tensor(digits.target, dtype=torch.int64)
    images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if image_size != images.shape[-1]:
        # antialias only matters when shrinking below 8x8; it is a no-op when enlarging
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True)
    images = images.repeat(1, channels, 1, 1)

    train_idx, val_idx = stratified_split(digits.target, val_fraction, seed)
    train_x, val_x = images[train_idx], images[val_idx]
    # population std, so that the train split has std exactly 1 per channel
    mean = train_x.mean(dim=(0, 2, 3), keepdim=True)
    std = train_x.std(dim=(0, 2, 3), keepdim=True, unbiased=False)
    train_x = (train_x - mean) / std
    val_x = (val_x - mean) / std
    num_classes = int(labels.max()) + 1
    return TensorDataset(train_x, labels[train_idx]), TensorDataset(val_x, labels[val_idx]), num_classes


# --------------------------------------------------------------------------- ImageFolder


def _image_transforms(image_size: int, channels: int, train: bool):
    from torchvision import transforms as T

    if channels == 3:
        mean, std, to_channels = IMAGENET_MEAN, IMAGENET_STD, []
    elif channels == 1:
        # a grey image is the average of RGB, so average the ImageNet statistics too
        mean, std = (sum(IMAGENET_MEAN) / 3,), (sum(IMAGENET_STD) / 3,)
        to_channels = [T.Grayscale(num_output_channels=1)]
    else:
        raise DataError(f"ImageFolder data supports channels=1 or 3, got {channels}")
    if train:
        geometry = [T.RandomResizedCrop(image_size), T.RandomHorizontalFlip()]
    else:
        # the usual 256 -> 224 evaluation ratio
        geometry = [T.Resize(int(round(image_size / 0.875))), T.CenterCrop(image_size)]
    return T.Compose([*to_channels, *geometry, T.ToTensor(), T.Normalize(mean, std)])


def _image_folder(root: Path, transform) -> Dataset:
    from torchvision.datasets import ImageFolder

    if not root.is_dir():
        raise DatasetNotFoundError(f"image directory {str(root)!r} does not exist or is not a directory")
    try:
        return ImageFolder(str(root), transform=transform, loader=_load_image)
    except FileNotFoundError as err:
        # torchvision says "Couldn't find any class folder" / "Found no valid file"
        raise DatasetNotFoundError(
            f"no images found under {str(root)!r}: expected one sub-folder per class holding "
            f"image files, e.g. {str(root / 'cat' / '0001.png')!r} ({err})"
        ) from None


def image_folder_datasets(
    root: str | Path,
    image_size: int = 224,
    *,
    val_dir: str | Path | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    channels: int = 3,
) -> tuple[Dataset, Dataset, int]:
    """Train/validation sets from ``torchvision.datasets.ImageFolder`` trees.

    Train images get ``RandomResizedCrop(image_size)`` and a horizontal flip; validation
    images ``Resize(image_size / 0.875)`` and ``CenterCrop(image_size)``; both are normalised
    with the ImageNet statistics.

    Args:
        root: training tree, ``root/<class>/<image>``.
        image_size: side of the square crops.
        val_dir: separate validation tree with the same classes. When ``None``, ``root`` is
            split per class by ``val_fraction`` with ``seed``.
        val_fraction: share of each class held out when ``val_dir`` is ``None``.
        seed: seed of that split (the random crops use torch's RNG, seeded by the loader).
        channels: 3 (RGB) or 1 (converted to grey).

    Returns:
        ``(train_ds, val_ds, num_classes)``.

    Example:
        >>> train, val, k = image_folder_datasets("data/train", 224, val_dir="data/val")  # doctest: +SKIP
    """
    root = Path(root)
    train_tf = _image_transforms(image_size, channels, train=True)
    val_tf = _image_transforms(image_size, channels, train=False)
    train_base = _image_folder(root, train_tf)
    num_classes = len(train_base.classes)
    if num_classes < 2:
        # one class trains a 1-logit model to a vacuous 100% accuracy
        raise DataError(f"image directory {str(root)!r} has {num_classes} class sub-folder "
                        f"({', '.join(train_base.classes)}); a classifier needs at least 2, one sub-folder per "
                        "class (a root with train/ and val/ must hold the classes inside each)")
    if val_dir is not None:
        val_ds = _image_folder(Path(val_dir), val_tf)
        if val_ds.class_to_idx != train_base.class_to_idx:
            raise DataError(
                f"class folders differ between {str(root)!r} {train_base.classes} and "
                f"{str(val_dir)!r} {val_ds.classes}; both trees need the same class sub-folders"
            )
        return train_base, val_ds, num_classes
    _check_fraction(val_fraction)
    train_idx, val_idx = stratified_split(train_base.targets, val_fraction, seed)
    # same file list, different transform; copying avoids scanning the tree twice
    val_base = copy.copy(train_base)
    val_base.transform = val_tf
    return Subset(train_base, train_idx), Subset(val_base, val_idx), num_classes


# -------------------------------------------------------------------------------- entry


def build_datasets(
    spec: str = "digits",
    image_size: int = 32,
    *,
    channels: int = 3,
    seed: int = 0,
    val_fraction: float = 0.2,
) -> tuple[Dataset, Dataset, int]:
    """Data sets from a short spec: ``"digits"`` or a path to an ImageFolder root.

    A root with ``train/`` and ``val/`` sub-folders uses them as the two splits; any other
    root is itself the class tree and is split per class by ``val_fraction``.

    Args:
        spec: ``"digits"`` (the default, built in) or a directory.
        image_size: side of the square images.
        channels: image channels (any for digits; 1 or 3 for folders).
        seed: seed of the train/validation split.
        val_fraction: share held out when no separate ``val/`` folder exists.

    Returns:
        ``(train_ds, val_ds, num_classes)``.

    Example:
        >>> train, val, k = build_datasets("digits", image_size=8, channels=1)
        >>> len(train) + len(val), k
        (1797, 10)
    """
    if spec == "digits":
        return digits_datasets(image_size=image_size, channels=channels, seed=seed, val_fraction=val_fraction)
    root = Path(spec)
    if not root.is_dir():
        raise DatasetNotFoundError(
            f"data spec {spec!r} is neither 'digits' nor an existing directory "
            "(expected an ImageFolder root, optionally with train/ and val/ sub-folders)"
        )
    if (root / "train").is_dir() and (root / "val").is_dir():
        return image_folder_datasets(
            root / "train", image_size, val_dir=root / "val", seed=seed, channels=channels
        )
    return image_folder_datasets(root, image_size, val_fraction=val_fraction, seed=seed, channels=channels)


def make_loaders(
    train_ds: Dataset,
    val_ds: Dataset,
    batch_size: int,
    num_workers: int = 0,
    seed: int = 0,
    distributed: bool = False,
    *,
    drop_last: bool = False,
    pin_memory: bool = False,
    num_replicas: int | None = None,
    rank: int | None = None,
) -> tuple[DataLoader, DataLoader]:
    """Train and validation ``DataLoader``s with reproducible shuffling.

    Without ``distributed`` the train order comes from a ``torch.Generator`` seeded with
    ``seed``, so two runs see the same batches (worker RNGs derive from it too). With
    ``distributed`` both loaders use a ``DistributedSampler`` (seeded; call
    ``train_loader.sampler.set_epoch(epoch)`` each epoch to reshuffle). The validation
    sampler pads the set to a multiple of the world size by repeating a few samples, so
    all-reduced metrics count those twice; with small sets evaluate on rank 0 instead.

    Args:
        train_ds: training set (shuffled).
        val_ds: validation set (kept in order).
        batch_size: samples per batch, per process.
        num_workers: loader worker processes (0 loads in the main process).
        seed: seed of the shuffling.
        distributed: shard both sets over the ``torch.distributed`` process group.
        drop_last: drop the last incomplete training batch (useful with BatchNorm when it
            could hold a single sample).
        pin_memory: pin host memory for faster copies to a GPU.
        num_replicas: world size for the samplers; ``None`` reads the process group.
        rank: this process's rank; ``None`` reads the process group.

    Returns:
        ``(train_loader, val_loader)``.

    Example:
        >>> train, val, _ = digits_datasets(image_size=8)
        >>> tl, vl = make_loaders(train, val, batch_size=64)
        >>> next(iter(tl))[0].shape
        torch.Size([64, 3, 8, 8])
    """
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    common = dict(batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory,
                  persistent_workers=num_workers > 0)
    generator = torch.Generator().manual_seed(seed)
    if distributed:
        train_sampler = DistributedSampler(train_ds, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        val_sampler = DistributedSampler(val_ds, num_replicas=num_replicas, rank=rank, shuffle=False)
        train_loader = DataLoader(train_ds, sampler=train_sampler, drop_last=drop_last, generator=generator, **common)
        val_loader = DataLoader(val_ds, sampler=val_sampler, **common)
    else:
        train_loader = DataLoader(train_ds, shuffle=True, drop_last=drop_last, generator=generator, **common)
        val_loader = DataLoader(val_ds, shuffle=False, **common)
    return train_loader, val_loader
