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


class _RunsShell:
    """Pickles to ``os.system(...)``: the classic malicious checkpoint."""

    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_blocked_pickle_names_the_global_and_never_advises_weights_only_false(tmp_path):
    """A file pickling os.system is 'not trusted', names the global, and does not repeat torch's advice."""
    torch.save({"format": CHECKPOINT_FORMAT, "dt": _RunsShell()}, tmp_path / "evil.pt")
    for load in (load_checkpoint, load_student):
        with pytest.raises(CheckpointError) as exc:
            load(tmp_path / "evil.pt")
        msg = str(exc.value)
        assert "not trusted" in msg and "system" in msg and "evil.pt" in msg
        assert "weights_only=False" not in msg and "weights_only` set to `False" not in msg
        assert "\n" not in msg


def test_prepare_run_dir_refuses_overwrites_and_cleans(tmp_path):
    """Refuses a run dir (naming it, --resume and --overwrite), allows its own resume, cleans temp files."""
    from gpd_fx.checkpoint import OutputDirError, RunExistsError, prepare_run_dir

    run = tmp_path / "run dir"
    assert prepare_run_dir(run) == run and run.is_dir()  # created; an empty dir is fine
    save_checkpoint(_state(), run / "checkpoint.pt")
    (run / "notes.txt").write_text("mine")
    (run / ".checkpoint.pt.abc123.tmp").write_bytes(b"half")  # a killed atomic write
    with pytest.raises(RunExistsError) as exc:
        prepare_run_dir(run)
    assert str(run) in str(exc.value) and "--resume" in str(exc.value) and "--overwrite" in str(exc.value)
    assert not (run / ".checkpoint.pt.abc123.tmp").exists()
    prepare_run_dir(run, resume=run / "checkpoint.pt")  # continuing this very run
    with pytest.raises(RunExistsError):  # another run's checkpoint would overwrite this one
        prepare_run_dir(run, resume=tmp_path / "other" / "checkpoint.pt")
    (run / "static_teacher.pt").write_bytes(b"cached teacher of the old run")
    prepare_run_dir(run, overwrite=True)
    assert not (run / "checkpoint.pt").exists() and (run / "notes.txt").read_text() == "mine"
    assert not (run / "static_teacher.pt").exists()  # a fresh run must not reuse the old run's teacher
    (tmp_path / "file").write_text("x")
    for bad in (tmp_path / "file", tmp_path / "file" / "sub"):
        with pytest.raises(OutputDirError, match="--out"):
            prepare_run_dir(bad)


def test_restore_optimizer_keeps_state_but_applies_new_hyperparameters():
    """Momentum buffers and the schedule position come from the checkpoint; lr/momentum/decay from this run."""
    from gpd_fx.checkpoint import restore_optimizer

    def build(lr, momentum, wd):
        p = torch.nn.Parameter(torch.ones(3, 3))
        opt = torch.optim.SGD([p], lr=lr, momentum=momentum, weight_decay=wd)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
        return p, opt, sched

    p, opt, sched = build(0.1, 0.9, 0.0)
    for _ in range(3):
        p.grad = torch.ones_like(p)
        opt.step()
        sched.step()
    _, opt2, sched2 = build(0.01, 0.5, 1e-3)
    changes = restore_optimizer(opt2, sched2, opt.state_dict(), sched.state_dict(), "ckpt")
    assert any(c.startswith("lr 0.1 -> 0.01") for c in changes)
    assert any(c.startswith("momentum 0.9 -> 0.5") for c in changes)
    assert any(c.startswith("weight_decay 0.0 -> 0.001") for c in changes)
    g = opt2.param_groups[0]
    assert g["momentum"] == 0.5 and g["weight_decay"] == 1e-3
    assert g["lr"] == pytest.approx(0.01 / 4) and sched2.get_last_lr() == [g["lr"]]  # position 3 kept
    assert torch.equal(next(iter(opt2.state.values()))["momentum_buffer"],
                       next(iter(opt.state.values()))["momentum_buffer"])
    _, opt3, sched3 = build(0.1, 0.9, 0.0)
    assert restore_optimizer(opt3, sched3, opt.state_dict(), sched.state_dict(), "ckpt") == []
