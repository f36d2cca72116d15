"""Tests of gpd_fx.checkpoint: atomic writes, weights_only loading, clear errors."""

from __future__ import annotations

import argparse
import os
import stat

import pytest
import torch

from gpd_fx.checkpoint import (CHECKPOINT_FORMAT, CheckpointError, atomic_write, load_checkpoint,
                               load_state_dict_checked, load_student, save_checkpoint, save_student)
from gpd_fx.models import small_cnn, wide_cnn


def _state() -> dict:
    return {"dt": {"w": torch.ones(2)}, "optimizer": {"state": {}, "param_groups": []}, "epoch": 1,
            "config": {"lr": 0.1, "loss": {"smoothing": 0.1}}, "rng": [{"python": (3, (1, 2), None)}]}


def test_atomic_write_keeps_old_file_when_writing_fails(tmp_path):
    """An exception (Ctrl-C included) mid-write leaves the previous file intact and no temp file."""
    path = tmp_path / "f.bin"
    atomic_write(path, lambda p: p.write_bytes(b"old"))

    def half_then_interrupt(p):
        p.write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, half_then_interrupt)
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f.bin"]


def test_atomic_write_uses_normal_permissions(tmp_path):
    """Files are not left with mkstemp's private 0600 mode."""
    path = atomic_write(tmp_path / "f.txt", lambda p: p.write_text("x"))
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask


def test_checkpoint_round_trip_is_weights_only(tmp_path):
    """A saved checkpoint loads with weights_only=True and keeps tensors and primitives."""
    path = save_checkpoint(_state(), tmp_path / "c.pt")
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == CHECKPOINT_FORMAT
    loaded = load_checkpoint(path)
    assert torch.equal(loaded["dt"]["w"], torch.ones(2)) and loaded["config"]["loss"]["smoothing"] == 0.1


def test_load_checkpoint_errors_are_one_clear_line(tmp_path):
    """Missing, garbage, truncated, pickled-object and wrong-format files each raise CheckpointError."""
    good = save_checkpoint(_state(), tmp_path / "good.pt")
    (tmp_path / "garbage.pt").write_text("not a checkpoint")
    (tmp_path / "trunc.pt").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    torch.save({"a": argparse.Namespace(x=1)}, tmp_path / "pickled.pt")
    torch.save({"format": "other", "dt": {}}, tmp_path / "other.pt")
    torch.save({"format": CHECKPOINT_FORMAT, "dt": {}}, tmp_path / "incomplete.pt")
    cases = {"missing.pt": "does not exist", "garbage.pt": "corrupt or truncated", "trunc.pt": "corrupt or truncated",
             "pickled.pt": "pickled argparse.Namespace", "other.pt": "not a gpd_fx training checkpoint",
             "incomplete.pt": "lacks the entries"}
    for name, match in cases.items():
        with pytest.raises(CheckpointError, match=match) as exc:
            load_checkpoint(tmp_path / name)
        assert "\n" not in str(exc.value)


def test_state_dict_mismatch_names_keys_and_shapes():
    """Loading another model's state names the differing keys and shapes."""
    with pytest.raises(CheckpointError, match=r"shape mismatches .*stem\.0\.weight") as exc:
        load_state_dict_checked(small_cnn(10), wide_cnn(10).state_dict(), "weights 'x.pt'")
    assert "weights 'x.pt' does not match the model" in str(exc.value)
    state = small_cnn(10).state_dict()
    state.pop("fc.bias")
    with pytest.raises(CheckpointError, match="missing keys: fc.bias"):
        load_state_dict_checked(small_cnn(10), state, "w")


def test_student_files_round_trip(tmp_path):
    """student.pt and student.safetensors hold the same tensors, loadable into the user's class."""
    model = small_cnn(10)
    pt, st = save_student(model, tmp_path / "student.pt", {"model_spec": "gpd_fx.models:small_cnn", "num_classes": 10})
    for path in (pt, st):
        state = load_student(path)
        fresh = small_cnn(10)
        fresh.load_state_dict(state)
        for k, v in model.state_dict().items():
            assert torch.equal(fresh.state_dict()[k], v)
    assert torch.load(pt, weights_only=True)["model_spec"] == "gpd_fx.models:small_cnn"
    # a plain state dict (e.g. from torchvision) is accepted too
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    assert load_student(tmp_path / "plain.pt").keys() == model.state_dict().keys()
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match="corrupt"):
        load_student(tmp_path / "bad.safetensors")
