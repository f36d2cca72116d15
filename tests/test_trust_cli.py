"""Trust on the command line: files never choose code, runs are never overwritten silently,
--resume applies (and records) changed hyperparameters, and bad data/outputs fail early and
clearly, naming the file, directory or flag."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gpd_fx import cli
from gpd_fx.checkpoint import load_checkpoint

FAST = ["--image-size", "8", "--batch-size", "32", "--max-steps-per-epoch", "2", "--no-progress", "--device", "cpu",
        "--no-export-onnx"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _error(capsys, argv) -> str:
    """Run the CLI, expect exit status 1 and return its single error line."""
    rc = cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == cli.EXIT_ERROR, err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpd-fx: error:"), err
    return lines[0]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """One finished 1-epoch run (default student); tests copy it before changing anything."""
    out = tmp_path_factory.mktemp("trust") / "run"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli.main(["train", *FAST, "--epochs", "1", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(n)
    return out


def _copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ------------------------------------------------------------------ files never choose code


MARKER_MODULE = """
import pathlib
pathlib.Path({marker!r}).write_text("imported")

def make(num_classes=10, in_chans=3):
    from gpd_fx.models import small_cnn
    return small_cnn(num_classes, in_chans)
"""


@pytest.fixture
def marker_module(tmp_path, monkeypatch):
    """A module on sys.path whose import writes a marker file; yields (spec, marker path)."""
    name = f"gpd_marker_{os.getpid()}_{time.monotonic_ns()}"
    marker = tmp_path / "IMPORTED"
    pkg = tmp_path / "mods"
    pkg.mkdir()
    (pkg / f"{name}.py").write_text(MARKER_MODULE.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(pkg))
    yield f"{name}:make", marker
    sys.modules.pop(name, None)


def _poison(ckpt_path: Path, **fields) -> None:
    """Rewrite spec fields of a checkpoint; the result still loads with weights_only=True."""
    state = torch.load(ckpt_path, weights_only=True)
    for key, value in fields.items():
        if key in ("model", "teacher"):
            state["config"][key] = value
        else:
            state[key] = value
    torch.save(state, ckpt_path)
    torch.load(ckpt_path, weights_only=True)  # still a "safe" file as far as torch is concerned


def test_fold_never_imports_a_module_named_by_the_checkpoint(finished_run, tmp_path, marker_module, capsys):
    """fold of a checkpoint naming module.path:factory refuses without importing it and says how to pass it."""
    spec, marker = marker_module
    run = _copy_run(finished_run, tmp_path / "run")
    _poison(run / "checkpoint.pt", model_spec=spec, model=spec)
    msg = _error(capsys, ["fold", str(run / "checkpoint.pt"), "--out", str(tmp_path / "f" / "s.pt")])
    assert not marker.exists()
    assert spec in msg and "allow-list" in msg and f"--model {spec}" in msg
    # a different spec given explicitly is a mismatch, still without importing anything
    msg = _error(capsys, ["fold", str(run / "checkpoint.pt"), "--model", "gpd_fx.models:small_cnn",
                          "--out", str(tmp_path / "f" / "s.pt")])
    assert not marker.exists() and "was written for model" in msg and "gpd_fx.models:small_cnn" in msg
    # the user naming the module explicitly is what makes it run
    assert cli.main(["fold", str(run / "checkpoint.pt"), "--model", spec, "--out", str(tmp_path / "f" / "s.pt")]) == 0
    assert marker.exists() and (tmp_path / "f" / "s.pt").is_file()


def test_resume_never_imports_a_model_or_teacher_named_by_the_checkpoint(finished_run, tmp_path, marker_module,
                                                                          capsys):
    """--resume takes model/teacher specs from the checkpoint only from the allow-list."""
    spec, marker = marker_module
    run = _copy_run(finished_run, tmp_path / "run")
    _poison(run / "checkpoint.pt", model=spec, model_spec=spec)
    msg = _error(capsys, ["train", *FAST, "--epochs", "2", "--resume", str(run / "checkpoint.pt")])
    assert not marker.exists()
    assert spec in msg and "allow-list" in msg and f"gpd-fx train {spec} --resume" in msg

    run2 = _copy_run(finished_run, tmp_path / "run2")
    _poison(run2 / "checkpoint.pt", teacher=spec)
    msg = _error(capsys, ["train", *FAST, "--epochs", "2", "--resume", str(run2 / "checkpoint.pt")])
    assert not marker.exists()
    assert "static teacher" in msg and f"--teacher {spec}" in msg
    # a spec given on the command line that differs from the stored one is refused too
    msg = _error(capsys, ["train", "torchvision:resnet18", *FAST, "--resume", str(run2 / "checkpoint.pt"),
                          "--teacher", spec])
    assert not marker.exists() and "was written for model" in msg


# -------------------------------------------------------------------------- no overwrite


def test_a_run_directory_is_never_overwritten_without_resume_or_overwrite(finished_run, tmp_path, capsys):
    """A second train into a directory holding a run is refused naming it and both flags; --overwrite replaces."""
    run = _copy_run(finished_run, tmp_path / "run")
    before = (run / "checkpoint.pt").read_bytes()
    msg = _error(capsys, ["train", *FAST, "--epochs", "1", "--out", str(run)])
    assert str(run) in msg and "--resume" in msg and "--overwrite" in msg
    assert (run / "checkpoint.pt").read_bytes() == before
    # an interrupted run (checkpoint only) is protected the same way
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(run / "checkpoint.pt", partial / "checkpoint.pt")
    assert "--overwrite" in _error(capsys, ["train", *FAST, "--out", str(partial)])
    # --overwrite: a fresh run replaces the old one (the old metrics rows are gone, not appended to)
    (run / "metrics.jsonl").write_text('{"epoch": 99}\n')
    assert cli.main(["train", *FAST, "--epochs", "1", "--out", str(run), "--overwrite"]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1]


def test_default_output_directory_is_new_for_every_run(tmp_path, monkeypatch, capsys):
    """`gpd-fx train` pasted twice writes two runs side by side; --help says so."""
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        assert cli.main(["train", *FAST, "--epochs", "1"]) == 0
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 2 and all((r / "checkpoint.pt").is_file() for r in runs)
    assert all(r.name.startswith("gpd-") for r in runs)
    capsys.readouterr()
    monkeypatch.setenv("COLUMNS", "1000")  # argparse would wrap the name at its hyphens
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "runs/gpd-YYYYmmdd-HHMMSS" in text and "--overwrite" in text
    # a failed start leaves no empty run directory behind
    _error(capsys, ["train", "--data", str(tmp_path / "missing")])
    assert len(list((tmp_path / "runs").iterdir())) == 2


# ------------------------------------------------------------------ resume hyperparameters


def test_resume_applies_changed_optimizer_flags_and_records_them(finished_run, tmp_path, capsys):
    """--lr/--momentum/--weight-decay on --resume are applied from the next step, said, and saved."""
    run = _copy_run(finished_run, tmp_path / "run")
    saved = load_checkpoint(run / "checkpoint.pt")
    assert saved["config"]["lr"] == 0.05 and saved["config"]["momentum"] == 0.9
    old = saved["optimizer"]["param_groups"]
    assert cli.main(["train", "--resume", str(run / "checkpoint.pt"), "--epochs", "2", "--lr", "0.01",
                     "--momentum", "0.5", "--weight-decay", "0.001", "--schedule", "none", "--no-progress",
                     "--no-export-onnx"]) == 0
    out = capsys.readouterr().out
    assert "resume: applying" in out and "momentum 0.9 -> 0.5" in out
    assert "lr " in out and "weight_decay " in out
    ckpt = load_checkpoint(run / "checkpoint.pt")
    new = ckpt["optimizer"]["param_groups"]
    assert len(new) == len(old)
    for g0, g1 in zip(old, new):  # every group's peak lr scaled by 0.01 / 0.05, its decay by 0.001 / 0.0005
        assert g1["initial_lr"] == pytest.approx(g0["initial_lr"] * 0.2, rel=1e-12)
        assert g1["lr"] == g1["initial_lr"]  # schedule none: the peak from the resumed step on
        assert g1["weight_decay"] == pytest.approx(g0["weight_decay"] * 2, rel=1e-12)
        assert g1["momentum"] == 0.5
    assert ckpt["config"]["lr"] == 0.01 and ckpt["config"]["momentum"] == 0.5
    assert ckpt["config"]["weight_decay"] == 0.001
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["lr"] == new[0]["lr"]  # what epoch 2 actually ran with


def test_resume_refuses_every_flag_the_saved_state_fixes(finished_run, tmp_path, capsys):
    """Flags the restored teacher/optimizer would silently override are refused, each one named."""
    run = _copy_run(finished_run, tmp_path / "run")
    msg = _error(capsys, ["train", *FAST, "--resume", str(run / "checkpoint.pt"), "--epochs", "2",
                          "--noise", "0.5", "--expand-seed", "3", "--optimizer", "adamw"])
    for flag in ("--noise", "--expand-seed", "--optimizer"):
        assert flag in msg
    assert load_checkpoint(run / "checkpoint.pt")["epoch"] == 1


# ---------------------------------------------------------------------- data and outputs


def _image_tree(root: Path, classes=("a", "b"), per_class=4, size=12) -> list[Path]:
    rng = np.random.default_rng(0)
    files = []
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            path = root / c / f"img {i}.png"  # a space in every name
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
            files.append(path)
    return files


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_image_is_named_in_one_short_line(tmp_path, workers, capsys):
    """A truncated image among good ones: the error names the file, also through 2 loader workers."""
    files = _image_tree(tmp_path / "data dir", per_class=8)
    bad = files[3]
    bad.write_bytes(bad.read_bytes()[:60])
    msg = _error(capsys, ["train", *FAST, "--epochs", "1", "--num-workers", str(workers), "--data",
                          str(tmp_path / "data dir"), "--out", str(tmp_path / "out")])
    assert str(bad) in msg and "delete or replace it" in msg
    assert len(msg) < 400, msg


def test_one_class_image_folder_is_refused(tmp_path, capsys):
    """A single class would train a 1-logit model to a vacuous 100%."""
    _image_tree(tmp_path / "one", classes=("only",))
    msg = _error(capsys, ["train", *FAST, "--data", str(tmp_path / "one"), "--out", str(tmp_path / "out")])
    assert str(tmp_path / "one") in msg and "at least 2" in msg


def test_unwritable_out_is_found_before_any_work(tmp_path, capsys, monkeypatch):
    """--out under a file fails at once, naming the directory, before expand or an epoch runs."""
    (tmp_path / "file").write_text("x")
    import gpd_fx

    def boom(*a, **k):
        raise AssertionError("expand ran before the output directory was checked")

    monkeypatch.setattr(gpd_fx, "expand", boom)  # the trainer looks it up at call time
    msg = _error(capsys, ["train", *FAST, "--out", str(tmp_path / "file" / "run")])
    assert str(tmp_path / "file" / "run") in msg and "--out" in msg


def test_stale_temp_files_of_a_killed_write_are_removed(finished_run, tmp_path, capsys):
    """A SIGKILL during an atomic write leaves .checkpoint.pt.*.tmp; the next start (resume) removes it."""
    run = _copy_run(finished_run, tmp_path / "run")
    code = ("import os, signal, sys\n"
            "from gpd_fx.checkpoint import atomic_write\n"
            "def die(p):\n"
            "    p.write_bytes(b'half')\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n"
            f"atomic_write({str(run / 'checkpoint.pt')!r}, die)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    stale = [p for p in os.listdir(run) if p.endswith(".tmp")]
    assert stale and all(p.startswith(".checkpoint.pt.") for p in stale)
    assert cli.main(["train", "--resume", str(run / "checkpoint.pt"), "--epochs", "1", "--no-progress",
                     "--no-export-onnx"]) == 0
    assert not [p for p in os.listdir(run) if p.endswith(".tmp")]


def test_zoo_ratio_zero_exits_nonzero(tmp_path, capsys):
    """`gpd-fx zoo --ratio 0` is a usage error, not an ERROR row with exit status 0."""
    with pytest.raises(SystemExit) as exc:
        cli.main(["zoo", "--ratio", "0", "--models", "squeezenet1_1", "--no-timing", "--no-isolate",
                  "--json", str(tmp_path / "zoo.json")])
    assert exc.value.code == cli.EXIT_USAGE
    assert "ratio" in capsys.readouterr().err


def test_version_flag(capsys):
    """`gpd-fx --version` prints the installed version."""
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    import gpd_fx

    assert capsys.readouterr().out.strip() == f"gpd-fx {gpd_fx.__version__}"


def test_api_train_refuses_a_directory_holding_a_run(tmp_path):
    """gpd_fx.train into a directory with a run raises RunExistsError; overwrite=True replaces it."""
    from torch.utils.data import Subset

    from gpd_fx.checkpoint import RunExistsError
    from gpd_fx.data import digits_datasets
    from gpd_fx.models import small_cnn
    from gpd_fx.trainer import TrainConfig, train

    tr, va, k = digits_datasets(image_size=8)
    tr, va = Subset(tr, range(64)), Subset(va, range(32))
    cfg = TrainConfig(epochs=1, batch_size=32, max_steps_per_epoch=1, image_size=8, device="cpu", progress=False,
                      export_onnx=False, out_dir=str(tmp_path / "run"))
    train(small_cnn(k), cfg, tr, va)
    before = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    with pytest.raises(RunExistsError, match="overwrite=True"):
        train(small_cnn(k), cfg, tr, va)
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == before
    cfg.overwrite = True
    train(small_cnn(k), cfg, tr, va)


def test_branches_means_the_same_in_train_help_trainconfig_and_zoo(capsys, monkeypatch):
    """--branches: none = IR only, all = every kind that applies, in every place that documents it."""
    from gpd_fx.trainer import TrainConfig

    monkeypatch.setenv("COLUMNS", "1000")
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    texts = {"gpd-fx train --help": capsys.readouterr().out, "TrainConfig": TrainConfig.__doc__}
    with pytest.raises(SystemExit):
        cli.main(["zoo", "--help"])
    texts["gpd-fx zoo --help"] = capsys.readouterr().out
    for where, text in texts.items():
        text = " ".join(text.replace("``", "").replace('"', "").split())
        assert "none = IR only" in text and "all = every kind that applies" in text, where


def test_torchrun_without_out_is_refused(tmp_path, monkeypatch, capsys):
    """Under torchrun each rank would pick its own time-stamped directory: --out is required."""
    import gpd_fx.trainer as trainer

    def no_run(cfg):
        raise AssertionError(f"training started with out_dir={cfg.out_dir!r}")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(trainer, "run", no_run)
    msg = _error(capsys, ["train", *FAST])
    assert "torchrun" in msg and "--out DIR" in msg
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
