"""Tests of the gpd-fx command line: help, end-to-end train/fold/resume, one-line user errors."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys

import pytest
import torch

from gpd_fx import cli
from gpd_fx.checkpoint import load_checkpoint, load_student

FAST = ["--image-size", "8", "--batch-size", "32", "--max-steps-per-epoch", "2", "--no-progress", "--device", "cpu"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


@pytest.mark.parametrize("command", ["train", "fold", "zoo"])
def test_help_documents_every_option(command, capsys):
    """Every option of every subcommand appears in --help with a description."""
    sub = _subparsers(cli.build_parser())[command]
    for action in sub._actions:
        assert action.help and action.help != argparse.SUPPRESS, action.dest
    if command == "zoo":  # its --help belongs to the zoo sweep; check the parser's own text
        text = sub.format_help()
    else:
        with pytest.raises(SystemExit) as exc:
            cli.main([command, "--help"])
        assert exc.value.code == 0
        text = capsys.readouterr().out
    for action in sub._actions:
        for option in action.option_strings:
            assert option in text, option


def test_compile_help_says_what_each_mode_is_for():
    """--compile's help carries the one description per mode (gpd_fx.compile.COMPILE_MODE_HELP),
    so a CPU user reads that the gpd backend runs at eager speed there and Inductor is the choice."""
    from gpd_fx.compile import COMPILE_MODE_HELP, COMPILE_MODES
    (action,) = [a for a in _subparsers(cli.build_parser())["train"]._actions if "--compile" in a.option_strings]
    assert set(COMPILE_MODE_HELP) == set(COMPILE_MODES)
    for mode, text in COMPILE_MODE_HELP.items():
        assert f"{mode} = {text}" in action.help
    assert "prefer inductor" in COMPILE_MODE_HELP["gpd"]


def test_console_script_user_error_is_one_line_without_traceback():
    """The installed `gpd-fx` (or `python -m gpd_fx.cli`) exits 1 with one 'gpd-fx: error:' line."""
    exe = shutil.which("gpd-fx")
    cmd = [exe] if exe else [sys.executable, "-m", "gpd_fx.cli"]
    out = subprocess.run([*cmd, "train", "torchvision:resnet181"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpd-fx: error:") and "did you mean 'resnet18'" in lines[0]


def _error(capsys, argv) -> str:
    rc = cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == cli.EXIT_ERROR, err
    assert "Traceback" not in err
    return err.splitlines()[-1]


def test_bad_inputs_exit_nonzero_with_a_clear_message(tmp_path, capsys):
    """Bad ratio, missing/empty data, corrupt checkpoint and NaN loss each give one clear line."""
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--ratio", "0"])
    assert exc.value.code == cli.EXIT_USAGE
    assert "ratio must be an integer >= 1" in capsys.readouterr().err
    assert "neither 'digits' nor an existing directory" in _error(capsys, ["train", "--data", str(tmp_path / "nope")])
    (tmp_path / "empty").mkdir()
    assert "no images found" in _error(capsys, ["train", "--data", str(tmp_path / "empty")])
    (tmp_path / "bad.pt").write_bytes(b"\x00garbage")
    assert "corrupt" in _error(capsys, ["train", "--resume", str(tmp_path / "bad.pt")])
    assert "corrupt" in _error(capsys, ["fold", str(tmp_path / "bad.pt")])
    out = tmp_path / "nan"
    msg = _error(capsys, ["train", *FAST, "--lr", "1e12", "--epochs", "1", "--out", str(out), "--no-export-onnx"])
    # the loss, or (with gradient clipping) the gradient norm, becomes non-finite; either stops the run
    assert ("is nan" in msg or "is inf" in msg) and "stopped before updating the weights" in msg
    assert not (out / "checkpoint.pt").exists()  # nothing half-trained was written as a checkpoint


def test_train_fold_and_resume_end_to_end(tmp_path, capsys):
    """Default job shape: train prints accuracies and paths, fold rebuilds the student, resume continues."""
    out = tmp_path / "run"
    assert cli.main(["train", *FAST, "--epochs", "1", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "dynamic teacher (x2) val accuracy" in text and "student val accuracy" in text
    for name in ("student.pt", "student.safetensors", "student.onnx", "metrics.jsonl", "metrics.csv",
                 "accuracy.png", "checkpoint.pt"):
        assert (out / name).is_file(), name
        assert str(out / name) in text, name

    assert cli.main(["fold", str(out / "checkpoint.pt"), "--out", str(tmp_path / "f" / "s.pt")]) == 0
    a, b = load_student(out / "student.pt"), load_student(tmp_path / "f" / "s.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # settings not repeated on the command line come from the checkpoint
    assert cli.main(["train", "--resume", str(out / "checkpoint.pt"), "--epochs", "2", "--no-export-onnx",
                     "--no-progress"]) == 0
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["epoch"] == 2 and ckpt["config"]["image_size"] == 8
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]


def test_zoo_delegates_to_the_packaged_sweep(monkeypatch, capsys):
    """`zoo` runs gpd_fx.testing.zoo's main (no script from the checkout) with the remaining
    arguments, under the program name `gpd-fx zoo`, and returns its exit status."""
    from gpd_fx.testing import zoo

    def fake_main(argv):
        print("zoo got", argv, "as", sys.argv[0])
        return 3

    with monkeypatch.context() as m:
        m.setattr(zoo, "main", fake_main)
        assert cli.main(["zoo", "--models", "resnet18"]) == 3
    assert "zoo got ['--models', 'resnet18'] as gpd-fx zoo" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:   # the real one answers its own --help, from the package
        cli.main(["zoo", "--help"])
    assert exc.value.code == 0
    assert "usage: gpd-fx zoo" in capsys.readouterr().out
