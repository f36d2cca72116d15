"""Tests of gpd_fx.trainer: outputs, exact resume, Ctrl-C, NaN stop, scenarios, model specs."""

from __future__ import annotations

import dataclasses
import json
import os
import signal

import pytest
import torch
from torch.utils.data import Dataset, Subset

from gpd_fx.checkpoint import CheckpointError, load_checkpoint, load_student
from gpd_fx.data import digits_datasets
from gpd_fx.models import ModelSpecError, build_model, small_cnn
from gpd_fx.trainer import (TrainConfig, TrainConfigError, TrainingDivergedError, TrainingInterrupted, fit_plain,
                            train)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data():
    """A digits subset at the native 8x8: big enough for real batches, small enough to be fast."""
    train_ds, val_ds, k = digits_datasets(image_size=8, seed=0)
    return Subset(train_ds, range(192)), Subset(val_ds, range(64)), k


def _cfg(tmp_path, **kw) -> TrainConfig:
    base = dict(epochs=2, batch_size=32, max_steps_per_epoch=3, image_size=8, device="cpu", progress=False,
                export_onnx=False, out_dir=str(tmp_path / "run"))
    base.update(kw)
    return TrainConfig(**base)


def _student(k: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return small_cnn(k)


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _no_temp_files(directory) -> bool:
    return not [p for p in os.listdir(directory) if p.endswith(".tmp")]


def test_train_writes_metrics_plot_checkpoint_and_student(tmp_path, data):
    """Two short epochs write per-epoch metrics, a PNG, a weights_only checkpoint and the folded student."""
    tr, va, k = data
    res = train(_student(k), _cfg(tmp_path), tr, va)
    out = tmp_path / "run"
    # the storage kept between steps is given back at the end (release_buffers)
    assert not any(m.__dict__.get("_grad_pools") for m in res.dt.teacher.modules())
    assert not any("_grad_pool" in s.__dict__ for s in res.dt.sources)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert {"val_teacher_acc", "val_student_acc", "gap", "train_loss", "lr"} <= rows[0].keys()
    assert (out / "metrics.csv").read_text().splitlines()[0].startswith("epoch,")
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ckpt = load_checkpoint(out / "checkpoint.pt")  # weights_only=True inside
    assert ckpt["epoch"] == 2 and ckpt["global_step"] == 6 and ckpt["step_in_epoch"] == 0
    # the folded student is the user's class, its keys, and equals dt.student in eval mode
    state = load_student(out / "student.pt")
    assert state.keys() == small_cnn(k).state_dict().keys()
    assert (out / "student.safetensors").is_file()
    x = tr[0][0].unsqueeze(0).repeat(4, 1, 1, 1)
    res.dt.eval()
    with torch.no_grad():
        torch.testing.assert_close(res.student(x), res.dt.student(x), rtol=1e-4, atol=1e-5)
    assert res.folded_acc == pytest.approx(res.student_acc, abs=1 / 64)
    assert 0.0 <= res.teacher_acc <= 1.0
    assert json.loads((out / "summary.json").read_text())["student_acc"] == res.student_acc
    assert _no_temp_files(out)


def test_resume_mid_epoch_after_interrupt_is_exact(tmp_path, data):
    """Interrupting at a step and resuming gives bitwise the same teacher as an uninterrupted run."""
    tr, va, k = data
    straight = train(_student(k), _cfg(tmp_path, out_dir=str(tmp_path / "a")), tr, va)

    def stop_at_4(info):
        if info.global_step == 4:  # mid-way through epoch 2
            raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted) as exc:
        train(_student(k), _cfg(tmp_path, out_dir=str(tmp_path / "b")), tr, va, callbacks=[stop_at_4])
    assert exc.value.global_step == 4
    ckpt = load_checkpoint(exc.value.checkpoint)
    assert (ckpt["epoch"], ckpt["step_in_epoch"], ckpt["global_step"]) == (1, 1, 4)
    assert _no_temp_files(tmp_path / "b")

    resumed = train(_student(k), _cfg(tmp_path, out_dir=str(tmp_path / "b"), resume=str(exc.value.checkpoint)),
                    tr, va)
    _assert_same_state(straight.dt.state_dict(), resumed.dt.state_dict())
    drop = {"epoch_seconds"}
    assert [{k2: v for k2, v in r.items() if k2 not in drop} for r in straight.history] == \
        [{k2: v for k2, v in r.items() if k2 not in drop} for r in resumed.history]


def test_resume_at_epoch_boundary_continues_exactly(tmp_path, data):
    """1 epoch + resume to 2 epochs equals 2 epochs straight (constant LR, so the plans agree)."""
    tr, va, k = data
    a = train(_student(k), _cfg(tmp_path, schedule="none", out_dir=str(tmp_path / "a")), tr, va)
    train(_student(k), _cfg(tmp_path, schedule="none", epochs=1, out_dir=str(tmp_path / "b")), tr, va)
    b = train(_student(k), _cfg(tmp_path, schedule="none", out_dir=str(tmp_path / "b"),
                                resume=str(tmp_path / "b" / "checkpoint.pt")), tr, va)
    _assert_same_state(a.dt.state_dict(), b.dt.state_dict())
    assert len(b.history) == 2


def test_sigint_is_deferred_to_the_end_of_the_step(tmp_path, data):
    """A real SIGINT during a step stops after it, with a loadable checkpoint of that step."""
    tr, va, k = data

    def ctrl_c(info):
        if info.global_step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # handled by the trainer's handler, not raised here

    with pytest.raises(TrainingInterrupted) as exc:
        train(_student(k), _cfg(tmp_path), tr, va, callbacks=[ctrl_c])
    assert exc.value.global_step == 2
    assert load_checkpoint(exc.value.checkpoint)["global_step"] == 2
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored


class _Poisonable(Dataset):
    """Wraps a data set; once ``poisoned`` every image is NaN."""

    def __init__(self, base):
        self.base, self.poisoned = base, False

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        return (torch.full_like(x, float("nan")) if self.poisoned else x), y


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, data):
    """A NaN loss raises naming the step, and the epoch-1 checkpoint stays untouched."""
    tr, va, k = data
    poisonable = _Poisonable(tr)
    ckpt_path = tmp_path / "run" / "checkpoint.pt"

    def poison_after_epoch_1(info):
        if info.global_step == 3:
            poisonable.poisoned = True

    with pytest.raises(TrainingDivergedError, match=r"epoch 2, step 1 \(global step 4\)"):
        train(_student(k), _cfg(tmp_path), poisonable, va, callbacks=[poison_after_epoch_1])
    ckpt = load_checkpoint(ckpt_path)
    assert ckpt["epoch"] == 1 and ckpt["global_step"] == 3
    assert all(torch.isfinite(v).all() for v in ckpt["dt"].values() if v.is_floating_point())
    assert _no_temp_files(ckpt_path.parent)


def test_static_teacher_and_fine_tuning(tmp_path, data):
    """With a static teacher the KD terms are active; a student checkpoint is loaded before expanding."""
    tr, va, k = data
    first = train(_student(k), _cfg(tmp_path, epochs=1, out_dir=str(tmp_path / "a")), tr, va)
    torch.manual_seed(1)
    static = build_model("gpd_fx.models:wide_cnn", k, 8)
    # a vanishing learning rate: the fine-tuned student must still be the first run's student
    res = train(small_cnn(k), _cfg(tmp_path, epochs=1, max_steps_per_epoch=1, lr=1e-12, out_dir=str(tmp_path / "b"),
                                   teacher="gpd_fx.models:wide_cnn",
                                   student_checkpoint=str(tmp_path / "a" / "student.pt")), tr, va, static)
    row = res.history[0]
    assert row["train_kd_teacher_static"] > 0 and row["train_kd_student_static"] > 0
    assert "val_static_acc" in row and res.static_acc is not None
    for (name, p), q in zip(first.student.named_parameters(), res.student.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)


def test_bad_inputs_raise_clear_errors(tmp_path, data):
    """Empty data, ratio < 1, mismatched resume and a bad student checkpoint give library errors."""
    tr, va, k = data
    with pytest.raises(TrainConfigError, match="training set is empty"):
        train(_student(k), _cfg(tmp_path), Subset(tr, []), va)
    with pytest.raises(TrainConfigError, match="ratio must be an integer >= 1"):
        _cfg(tmp_path, ratio=0)
    train(_student(k), _cfg(tmp_path, epochs=1, max_steps_per_epoch=1), tr, va)
    ckpt = str(tmp_path / "run" / "checkpoint.pt")
    with pytest.raises(TrainConfigError, match="ratio=2 but this run has ratio=3"):
        train(_student(k), _cfg(tmp_path, ratio=3, resume=ckpt), tr, va)
    with pytest.raises(CheckpointError, match="does not match the model"):
        train(build_model("gpd_fx.models:wide_cnn", k, 8), _cfg(tmp_path, resume=ckpt), tr, va)
    with pytest.raises(CheckpointError, match="training checkpoint, not model weights"):
        train(_student(k), _cfg(tmp_path, student_checkpoint=ckpt), tr, va)


def test_fit_plain_trains_a_baseline(tmp_path, data):
    """The plain baseline / teacher pre-training loop learns something and returns per-epoch accuracy."""
    tr, va, k = data
    model, hist = fit_plain(_student(k), _cfg(tmp_path, max_steps_per_epoch=None, lr=0.05), tr, va, epochs=2)
    assert len(hist) == 2 and hist[-1]["val_acc"] > 0.2
    assert not model.training


def test_build_model_specs_and_errors():
    """torchvision/timm/factory specs build; unknown names suggest close matches."""
    assert build_model("torchvision:resnet18", 7, 32).fc.out_features == 7
    assert build_model("timm:resnet18", 7, 32).num_classes == 7
    assert build_model("gpd_fx.models:small_cnn", 7).fc.out_features == 7
    with pytest.raises(ModelSpecError, match="did you mean 'resnet18'"):
        build_model("torchvision:resnet181", 10)
    with pytest.raises(ModelSpecError, match="did you mean 'small_cnn'"):
        build_model("gpd_fx.models:smal_cnn", 10)
    with pytest.raises(ModelSpecError, match="must look like"):
        build_model("resnet18", 10)


def test_config_round_trips_through_a_checkpoint_dict():
    """TrainConfig.to_dict is primitive-only and from_dict rebuilds an equal config."""
    cfg = TrainConfig(ratio=3, branches="kxk,1x1")
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.expand_branches() == ["kxk", "1x1"]
    assert dataclasses.replace(cfg, branches="all").expand_branches() is None
