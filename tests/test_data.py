"""Tests for gpd_fx.data: built-in digits, ImageFolder trees on tmp_path, loaders, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gpd_fx.data import (
    DataError,
    DatasetNotFoundError,
    build_datasets,
    digits_datasets,
    image_folder_datasets,
    make_loaders,
    stratified_split,
)

# ------------------------------------------------------------------------------- digits


def test_digits_shapes_and_dtypes():
    """(N, C, H, W) float32 images, int64 labels, 1797 samples in all, 10 classes."""
    train, val, k = digits_datasets(image_size=32, channels=3)
    x, y = train.tensors
    assert k == 10
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.shape[1:] == (3, 32, 32) and val.tensors[0].shape[1:] == (3, 32, 32)
    assert len(train) + len(val) == 1797
    assert len(val) == pytest.approx(0.2 * 1797, abs=10)


def test_digits_native_size_single_channel():
    """image_size=8 keeps the native grid; channels=1 gives one channel."""
    train, _, _ = digits_datasets(image_size=8, channels=1)
    assert train.tensors[0].shape[1:] == (1, 8, 8)


def test_digits_split_is_deterministic():
    """Same seed, same split and values; another seed, another split."""
    a_train, a_val, _ = digits_datasets(image_size=8, seed=3)
    b_train, b_val, _ = digits_datasets(image_size=8, seed=3)
    for a, b in zip(a_train.tensors + a_val.tensors, b_train.tensors + b_val.tensors):
        assert torch.equal(a, b)
    c_train, _, _ = digits_datasets(image_size=8, seed=4)
    assert not torch.equal(a_train.tensors[1], c_train.tensors[1])


def test_digits_split_is_stratified():
    """Each class contributes ~val_fraction of its samples to validation."""
    from sklearn.datasets import load_digits

    total = np.bincount(load_digits().target, minlength=10)
    _, val, _ = digits_datasets(image_size=8, val_fraction=0.25)
    val_counts = np.bincount(val.tensors[1].numpy(), minlength=10)
    assert np.all(np.abs(val_counts - 0.25 * total) <= 1)


def test_digits_normalised_on_train():
    """Train split has per-channel mean 0 and std 1; validation is close but not forced."""
    train, val, _ = digits_datasets(image_size=16, channels=3)
    x = train.tensors[0]
    torch.testing.assert_close(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(x.std(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-5, rtol=0)
    assert abs(val.tensors[0].mean().item()) < 0.1


def test_digits_bad_arguments():
    """Out-of-range arguments raise DataError naming the argument."""
    with pytest.raises(DataError, match="val_fraction"):
        digits_datasets(val_fraction=1.0)
    with pytest.raises(DataError, match="channels"):
        digits_datasets(channels=0)


def test_stratified_split_tiny_classes():
    """A single-sample class stays in train; a too-small fraction is a clear error."""
    train, val = stratified_split([0, 0, 0, 0, 1], 0.5, seed=0)
    assert 4 in train and len(val) == 2 and sorted(train + val) == [0, 1, 2, 3, 4]
    with pytest.raises(DataError, match="validation split empty"):
        stratified_split([0, 1, 2], 0.1, seed=0)


# ---------------------------------------------------------------------------- ImageFolder


def _write_tree(root: Path, classes=("cat", "dog"), per_class: int = 5, size: int = 12) -> Path:
    rng = np.random.default_rng(0)
    for cls in classes:
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / cls / f"{i}.png")
    return root


def test_image_folder_split_by_fraction(tmp_path):
    """A single tree is split per class; images come out normalised at image_size."""
    root = _write_tree(tmp_path / "imgs")
    train, val, k = image_folder_datasets(root, image_size=8, val_fraction=0.4, seed=0)
    assert k == 2 and len(train) == 6 and len(val) == 4
    x, y = val[0]
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32 and isinstance(y, int)
    assert train[0][0].shape == (3, 8, 8)
    assert sorted(val.dataset.targets[i] for i in val.indices) == [0, 0, 1, 1]


def test_build_datasets_train_val_layout(tmp_path):
    """A root with train/ and val/ uses them as the splits; channels=1 gives grey images."""
    _write_tree(tmp_path / "train", per_class=3)
    _write_tree(tmp_path / "val", per_class=2)
    train, val, k = build_datasets(str(tmp_path), image_size=10, channels=1)
    assert (k, len(train), len(val)) == (2, 6, 4)
    assert val[0][0].shape == (1, 10, 10)


def test_build_datasets_single_tree(tmp_path):
    """A root without train/val is itself split by fraction."""
    _write_tree(tmp_path, per_class=4)
    train, val, k = build_datasets(str(tmp_path), image_size=8, val_fraction=0.25)
    assert (k, len(train), len(val)) == (2, 6, 2)


def test_image_folder_mismatched_classes(tmp_path):
    """train/ and val/ with different class folders is an error listing both."""
    _write_tree(tmp_path / "train", classes=("a", "b"), per_class=1)
    _write_tree(tmp_path / "val", classes=("a", "c"), per_class=1)
    with pytest.raises(DataError, match="class folders differ"):
        build_datasets(str(tmp_path), image_size=8)


def test_missing_directory_errors(tmp_path):
    """A missing path is named in the error, for both entry points."""
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetNotFoundError, match="nowhere"):
        image_folder_datasets(missing)
    with pytest.raises(DatasetNotFoundError, match="neither 'digits' nor an existing directory"):
        build_datasets(str(missing))


@pytest.mark.parametrize("layout", ["empty", "no_class_dirs", "empty_class_dirs"])
def test_empty_directory_errors(tmp_path, layout):
    """Directories without images in class folders raise an error naming the path."""
    root = tmp_path / "data"
    root.mkdir()
    if layout == "no_class_dirs":
        Image.new("RGB", (4, 4)).save(root / "loose.png")
    elif layout == "empty_class_dirs":
        (root / "cat").mkdir()
        (root / "dog").mkdir()
    with pytest.raises(DatasetNotFoundError, match=r"no images found under .*data"):
        image_folder_datasets(root)


def test_one_class_folder_is_refused(tmp_path):
    """One class folder would train a 1-logit model to a vacuous 100%: refused, naming the directory."""
    root = _write_tree(tmp_path / "one class", classes=("only",), per_class=3)
    with pytest.raises(DataError, match=r"at least 2") as exc:
        build_datasets(str(root), image_size=8)
    assert str(root) in str(exc.value)


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_image_error_names_the_file(tmp_path, workers):
    """A truncated image among good ones raises CorruptImageError naming it, short also from workers."""
    from torch.utils.data import DataLoader

    from gpd_fx.data import CorruptImageError

    root = _write_tree(tmp_path / "imgs", per_class=4, size=32)
    bad = root / "dog" / "2.png"
    bad.write_bytes(bad.read_bytes()[:80])
    train, val, _ = image_folder_datasets(root, image_size=8, val_fraction=0.25, seed=0)
    loader = DataLoader(torch.utils.data.ConcatDataset([train, val]), batch_size=4, num_workers=workers)
    with pytest.raises(CorruptImageError) as exc:
        for _ in loader:
            pass
    msg = str(exc.value)
    assert str(bad) in msg and "delete or replace it" in msg
    assert "Traceback" not in msg and len(msg) < 400, msg


# -------------------------------------------------------------------------------- loaders


def _toy():
    x = torch.arange(20, dtype=torch.float32).unsqueeze(1)
    return torch.utils.data.TensorDataset(x, torch.arange(20) % 2)


def test_make_loaders_seeded_order():
    """Same seed, same shuffled order; validation keeps its order."""

    def first_epoch(seed):
        tl, vl = make_loaders(_toy(), _toy(), batch_size=4, seed=seed)
        return torch.cat([b[0] for b in tl]).flatten(), torch.cat([b[0] for b in vl]).flatten()

    a_train, a_val = first_epoch(0)
    b_train, _ = first_epoch(0)
    c_train, _ = first_epoch(1)
    assert torch.equal(a_train, b_train) and not torch.equal(a_train, c_train)
    assert sorted(a_train.tolist()) == list(range(20))
    assert torch.equal(a_val, torch.arange(20, dtype=torch.float32))


def test_make_loaders_distributed_shards():
    """With distributed=True, two ranks see disjoint halves of the train set."""
    seen = []
    for rank in (0, 1):
        tl, vl = make_loaders(_toy(), _toy(), batch_size=3, distributed=True, num_replicas=2, rank=rank)
        assert isinstance(tl.sampler, torch.utils.data.DistributedSampler)
        seen.append(set(torch.cat([b[0] for b in tl]).flatten().tolist()))
        assert len(vl.sampler) == 10
    assert seen[0].isdisjoint(seen[1]) and len(seen[0] | seen[1]) == 20


def test_make_loaders_digits_batch():
    """Digits batches have the expected shape and dtypes."""
    train, val, _ = digits_datasets(image_size=8)
    tl, _ = make_loaders(train, val, batch_size=32, drop_last=True)
    x, y = next(iter(tl))
    assert x.shape == (32, 3, 8, 8) and y.dtype == torch.int64
    assert len(tl) == len(train) // 32
