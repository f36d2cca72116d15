"""The ``gpd-fx`` command line: ``train``, ``fold`` and ``zoo``.

``gpd-fx train`` with no arguments runs the whole job on the built-in digits data: expand the
default student, train it with GPD, fold it back and export it. User errors (unknown model,
bad ratio, missing data, corrupt checkpoint, diverging loss, ...) end with one line on stderr
and a non-zero exit status, never a traceback.

Multi-process: ``torchrun --nproc_per_node=N -m gpd_fx.cli train ...``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from gpd_fx.argtypes import positive_int
from gpd_fx.errors import GPDError

__all__ = ["build_parser", "main"]

# exit statuses
EXIT_ERROR = 1  # a user error reported in one line (GPDError, unreadable file, ...)
EXIT_USAGE = 2  # argparse's own status for bad command lines
EXIT_INTERRUPTED = 130  # the shell convention for "terminated by Ctrl-C"

_LOSS_FIELDS = {"kd_loss": "dt_to_student", "kd_weight": "dt_to_student_weight", "static_kd": "static_kd",
                "static_kd_weight": "static_kd_weight", "temperature": "temperature", "smoothing": "smoothing"}


class CommandLineError(GPDError, ValueError):
    """A combination of command-line options that cannot work; the message names the options."""


def _version() -> str:
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("gpd_fx")
    except (ImportError, PackageNotFoundError):
        import gpd_fx

        return gpd_fx.__version__


_ratio = positive_int("ratio", "the teacher is ratio x wider")
_positive_int = positive_int()


def _add_train_args(p: argparse.ArgumentParser) -> None:
    from gpd_fx.compile import COMPILE_MODE_HELP, COMPILE_MODES
    from gpd_fx.losses import KD_LOSSES, GPDLossConfig
    from gpd_fx.trainer import AMP_MODES, OPTIMIZERS, PARAM_GROUPS, SCHEDULES, TrainConfig

    d, dl = TrainConfig(), GPDLossConfig()
    # every default is None so that --resume can tell "not given" (take the checkpoint's
    # value) from "given"; the help shows the effective default of a fresh run
    p.add_argument("model", nargs="?", default=None,
                   help="student model spec: torchvision:NAME, timm:NAME or module.path:factory "
                        f"(default: {d.model}, a ~78k-parameter ResNet-like CNN; with --resume: the "
                        "checkpoint's, if it is torchvision:, timm: or gpd_fx.models: -- a module.path:factory "
                        "spec is never imported from a file and must be given again)")
    g = p.add_argument_group("dynamic teacher")
    g.add_argument("--ratio", type=_ratio, help=f"width ratio r >= 1 of the dynamic teacher (default: {d.ratio})")
    g.add_argument("--noise", type=float, help="symmetry-breaking noise of the expansion, relative to each "
                                               f"weight's std (default: {d.noise})")
    g.add_argument("--branches", help="multi-branch (CBR) kinds of the teacher's conv/linear layers: none = IR "
                                      "only (expand's branches=()), all = every kind that applies (expand's "
                                      "branches=None), or a comma list of kinds such as "
                                      f"kxk,1x1,identity (default: {d.branches})")
    g.add_argument("--expand-seed", type=int, help=f"seed of the expansion noise and branches (default: {d.expand_seed})")

    g = p.add_argument_group("data")
    g.add_argument("--data", help="'digits' (built in, no download) or an ImageFolder directory "
                                  f"(class sub-folders, optionally train/ and val/) (default: {d.data})")
    g.add_argument("--image-size", type=_positive_int, help=f"side of the square input images (default: {d.image_size})")
    g.add_argument("--in-chans", type=_positive_int, help=f"input image channels (default: {d.in_chans})")
    g.add_argument("--val-fraction", type=float, help="share held out for validation when the data has no val/ "
                                                      f"folder (default: {d.val_fraction})")
    g.add_argument("--num-workers", type=int, help=f"data loader worker processes (default: {d.num_workers})")

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=_positive_int, help=f"training epochs (default: {d.epochs})")
    g.add_argument("--batch-size", type=_positive_int, help=f"samples per step and process (default: {d.batch_size})")
    g.add_argument("--lr", type=float, help=f"peak learning rate (default: {d.lr})")
    g.add_argument("--optimizer", choices=OPTIMIZERS, help=f"optimizer (default: {d.optimizer})")
    g.add_argument("--momentum", type=float, help=f"SGD momentum, Nesterov (default: {d.momentum})")
    g.add_argument("--weight-decay", type=float, help="weight decay of weight matrices and kernels "
                                                      f"(default: {d.weight_decay})")
    g.add_argument("--param-groups", choices=PARAM_GROUPS,
                   help="gpd: width-aware optimiser groups (gpd_fx.param_groups), so the student moves as "
                        "far as --lr asks at every ratio; plain: one lr for every teacher tensor (inner "
                        f"student weights then move ratio x the asked step) (default: {d.param_groups})")
    g.add_argument("--schedule", choices=SCHEDULES, help="learning-rate schedule, per step: cosine to 0, step "
                                                         f"(x0.1 at 50%% and 75%%) or none (default: {d.schedule})")
    g.add_argument("--warmup-epochs", type=float, help=f"linear warm-up in epochs (default: {d.warmup_epochs})")
    g.add_argument("--grad-clip", type=float, help=f"clip the gradient norm; 0 = off (default: {d.grad_clip})")
    g.add_argument("--max-steps-per-epoch", type=_positive_int, help="cap on steps per epoch, for quick runs "
                                                                     "(default: no cap)")
    g.add_argument("--seed", type=int, help=f"seed of initialisation, split and data order (default: {d.seed})")

    g = p.add_argument_group("losses")
    g.add_argument("--kd-loss", choices=sorted(KD_LOSSES), help="dynamic teacher -> student loss "
                                                               f"(default: {dl.dt_to_student})")
    g.add_argument("--kd-weight", type=float, help=f"weight lambda of that loss (default: {dl.dt_to_student_weight})")
    g.add_argument("--static-kd", choices=sorted(KD_LOSSES), help="static teacher -> teacher and student loss "
                                                                 f"(default: {dl.static_kd})")
    g.add_argument("--static-kd-weight", type=float, help=f"weight of each static KD term (default: {dl.static_kd_weight})")
    g.add_argument("--temperature", type=float, help=f"temperature of kd and dkd (default: {dl.temperature})")
    g.add_argument("--smoothing", type=float, help=f"label smoothing of ls_ce (default: {dl.smoothing})")

    g = p.add_argument_group("scenarios")
    g.add_argument("--teacher", metavar="SPEC", help="static (pretrained) teacher model spec distilled into teacher "
                                                     "and student, e.g. gpd_fx.models:wide_cnn (default: none, "
                                                     "training from scratch)")
    g.add_argument("--teacher-checkpoint", metavar="PATH", help="weights of --teacher (.pt state dict or "
                                                                ".safetensors); without it the teacher is first "
                                                                "trained plainly and saved as OUT/static_teacher.pt")
    g.add_argument("--teacher-epochs", type=_positive_int, help="epochs of that teacher pre-training "
                                                                "(default: --epochs)")
    g.add_argument("--student-checkpoint", metavar="PATH", help="pretrained student weights to fine-tune "
                                                                "(.pt state dict, a gpd-fx student.pt, or .safetensors)")

    g = p.add_argument_group("output and runtime")
    g.add_argument("--out", metavar="DIR", help="output directory for checkpoint, metrics, plot and the folded "
                                                "student (default: a new directory runs/gpd-YYYYmmdd-HHMMSS for "
                                                "every run, so a second run never replaces the first; with "
                                                "--resume PATH: its directory). A directory that already holds a "
                                                "run is refused unless --resume or --overwrite is given")
    g.add_argument("--resume", nargs="?", const="auto", metavar="PATH",
                   help="continue from a checkpoint (PATH defaults to OUT/checkpoint.pt, so without PATH --out "
                        "is needed); settings not given on the command line are taken from the checkpoint. "
                        "--lr, --momentum and --weight-decay given here replace the saved optimizer's values "
                        "from the resumed step on (the run says so, and the saved config records them); flags "
                        "that the saved teacher fixes (--ratio, --branches, --image-size, --in-chans, --noise, "
                        "--expand-seed, --optimizer, --param-groups, --student-checkpoint, the model) must match the checkpoint")
    g.add_argument("--overwrite", action="store_true",
                   help="replace a run already in --out (its checkpoint, metrics, plot, student and cached "
                        "static-teacher files are deleted first; other files are kept) (default: refuse)")
    g.add_argument("--compile", choices=COMPILE_MODES,
                   help="compile the training step: " + "; ".join(f"{k} = {v}" for k, v in COMPILE_MODE_HELP.items())
                        + f" (default: {d.compile})")
    g.add_argument("--device", help=f"auto, cpu, cuda or cuda:N (default: {d.device})")
    g.add_argument("--amp", choices=AMP_MODES, help=f"mixed precision autocast (default: {d.amp})")
    g.add_argument("--threads", type=int, help="intra-op CPU threads; 0 = PyTorch's default (all cores). Default: "
                                              "$OMP_NUM_THREADS if set, else 1 -- small models gain little from "
                                              "more, and threads competing for busy cores slow training several-fold "
                                              "(torchrun sets 1 per process for the same reason)")
    g.add_argument("--log-every", type=int, help="also print a line every N steps; 0 = per epoch only "
                                                 f"(default: {d.log_every})")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="show progress bars (default: on)")
    g.add_argument("--export-onnx", action=argparse.BooleanOptionalAction, default=None,
                   help="export the folded student to ONNX and check it with onnxruntime (default: on)")
    g.add_argument("--fuse-bn", action=argparse.BooleanOptionalAction, default=None,
                   help="export ONNX with batch norm fused into the preceding conv; student.pt stays "
                        "the unfused student of your model class (default: off)")


def build_parser() -> argparse.ArgumentParser:
    """The ``gpd-fx`` argument parser (subcommands ``train``, ``fold``, ``zoo``).

    Returns:
        The parser.
    """
    parser = argparse.ArgumentParser(
        prog="gpd-fx",
        description="Gap Preserving Distillation as torch.fx graph passes: expand a student into a wider "
                    "dynamic teacher, train both jointly, fold the student back.")
    parser.add_argument("--version", action="version", version=f"gpd-fx {_version()}",
                        help="print the installed version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    p = sub.add_parser("train", help="expand -> train -> fold -> export (defaults: built-in digits data)",
                       description="Train a student with GPD. With no arguments: the default student on the "
                                   "built-in digits data, a few minutes on a laptop CPU. Multi-process: "
                                   "torchrun --nproc_per_node=N -m gpd_fx.cli train ...")
    _add_train_args(p)
    p = sub.add_parser("fold", help="training checkpoint -> folded student .pt/.safetensors (+ .onnx)",
                       description="Rebuild the dynamic teacher of a training checkpoint, fold the student out "
                                   "of it and save it as a plain model of its own class.")
    p.add_argument("checkpoint", help="a checkpoint.pt written by gpd-fx train")
    p.add_argument("--model", metavar="SPEC", help="the student's model spec; needed when the checkpoint names one "
                                                   "off the allow-list (torchvision:NAME, timm:NAME, "
                                                   "gpd_fx.models:NAME), e.g. module.path:factory, because a file "
                                                   "never chooses code to import; must equal the checkpoint's spec "
                                                   "(default: the checkpoint's allow-listed spec)")
    p.add_argument("--out", metavar="PATH", help="destination .pt (default: student.pt beside the checkpoint); "
                                                 "the .safetensors and .onnx go beside it")
    p.add_argument("--fuse-bn", action="store_true", help="export ONNX with batch norm fused into the preceding "
                                                          "conv (the .pt stays your model class, unfused)")
    p.add_argument("--export-onnx", action="store_true", help="also export ONNX and check it with onnxruntime")
    p = sub.add_parser("zoo", help="expansion coverage table over model zoos (gpd_fx.testing.zoo)",
                       description="Runs the zoo sweep (gpd_fx.testing.zoo, also python benchmarks/zoo.py); "
                                   "arguments after 'zoo' are passed to it (try: gpd-fx zoo --help).",
                       add_help=False)
    p.add_argument("zoo_args", nargs=argparse.REMAINDER, help="arguments for the zoo sweep")
    return parser


# -------------------------------------------------------------------------------- train


def _train_config(args: argparse.Namespace):
    """TrainConfig from the command line; with --resume, unspecified values come from the checkpoint."""
    from gpd_fx.checkpoint import load_checkpoint
    from gpd_fx.losses import GPDLossConfig
    from gpd_fx.models import resolve_stored_spec
    from gpd_fx.trainer import TrainConfig

    base: dict[str, Any] = TrainConfig().to_dict()
    out = args.out
    resume = args.resume
    if resume is not None:
        if resume == "auto":
            if out is None:
                raise CommandLineError("--resume without PATH continues the run in --out DIR, and no --out was "
                                       "given (every new run gets its own directory); pass --out DIR or "
                                       "--resume DIR/checkpoint.pt")
            resume = str(Path(out) / "checkpoint.pt")
        elif out is None:
            out = str(Path(resume).parent)
        saved = load_checkpoint(resume)["config"]
        base.update({k: v for k, v in saved.items() if k in base})
        # files never choose code: a spec from the checkpoint is used only if it is on the
        # allow-list; any other must be given again, and a given one must match
        where = f"checkpoint {resume!r}"
        base["model"] = resolve_stored_spec(saved.get("model"), args.model, what=where,
                                            how="gpd-fx train {spec} --resume " + shlex.quote(resume))
        base["teacher"] = resolve_stored_spec(saved.get("teacher"), args.teacher, what=f"{where} (static teacher)",
                                              how="--teacher {spec}")
    given = {
        "model": args.model, "ratio": args.ratio, "noise": args.noise, "branches": args.branches,
        "expand_seed": args.expand_seed, "data": args.data, "image_size": args.image_size,
        "in_chans": args.in_chans, "val_fraction": args.val_fraction, "num_workers": args.num_workers,
        "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "optimizer": args.optimizer,
        "momentum": args.momentum, "weight_decay": args.weight_decay, "schedule": args.schedule,
        "param_groups": args.param_groups,
        "warmup_epochs": args.warmup_epochs, "grad_clip": args.grad_clip,
        "max_steps_per_epoch": args.max_steps_per_epoch, "seed": args.seed, "teacher": args.teacher,
        "teacher_checkpoint": args.teacher_checkpoint, "teacher_epochs": args.teacher_epochs,
        "student_checkpoint": args.student_checkpoint, "out_dir": out, "compile": args.compile,
        "device": args.device, "amp": args.amp, "log_every": args.log_every, "progress": args.progress,
        "export_onnx": args.export_onnx, "fuse_bn": args.fuse_bn,
    }
    if out is None:
        out = _new_run_dir()
        args.created_out = out
    given["out_dir"] = out
    base.update({k: v for k, v in given.items() if v is not None})
    base["resume"] = resume
    base["overwrite"] = bool(args.overwrite)
    loss = dict(base["loss"])
    loss.update({field: getattr(args, arg) for arg, field in _LOSS_FIELDS.items() if getattr(args, arg) is not None})
    base["loss"] = GPDLossConfig(**loss)
    return TrainConfig.from_dict(base)


def _new_run_dir(root: Path = Path("runs")) -> str:
    """A new, empty ``runs/gpd-YYYYmmdd-HHMMSS[-N]``, created here so that two runs never share it."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # each process would pick its own time stamp
        raise CommandLineError("under torchrun pass --out DIR: the default output directory is new for every "
                               "process, so the ranks would not agree on one")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    root.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        path = root / (f"gpd-{stamp}" if n == 1 else f"gpd-{stamp}-{n}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return str(path)
    raise CommandLineError(f"could not create a new run directory under {str(root)!r}; pass --out DIR")


def _set_threads(threads: int | None) -> None:
    import torch

    if threads is None:
        if os.environ.get("OMP_NUM_THREADS"):
            return  # the user (or torchrun) chose already
        threads = 1
    if threads > 0:
        torch.set_num_threads(threads)


def _cmd_train(args: argparse.Namespace) -> int:
    from gpd_fx.trainer import run

    _set_threads(args.threads)
    try:
        cfg = _train_config(args)
        res = run(cfg)
    except BaseException:
        # a default run directory made for a run that never wrote anything is not left behind
        created = getattr(args, "created_out", None)
        if created is not None and Path(created).is_dir() and not any(Path(created).iterdir()):
            Path(created).rmdir()
        raise
    if not res.paths:  # ranks other than 0 write and print nothing
        return 0
    p = res.paths
    lines = [
        f"done in {res.seconds:.1f} s",
        f"  dynamic teacher (x{cfg.ratio}) val accuracy: {100 * res.teacher_acc:.2f}%",
        f"  student val accuracy:             {100 * res.student_acc:.2f}% (folded: {100 * res.folded_acc:.2f}%)",
    ]
    if res.static_acc is not None:
        lines.append(f"  static teacher val accuracy:      {100 * res.static_acc:.2f}%")
    lines.append(f"  folded student: {p['student_pt']}  {p['student_safetensors']}")
    if "onnx" in p:
        lines.append(f"  ONNX: {p['onnx']} (onnxruntime vs torch max |diff| {res.onnx_max_abs_diff:.2g})")
    if "metrics_jsonl" in p:
        lines.append(f"  metrics: {p['metrics_jsonl']}  {p['metrics_csv']}")
        lines.append(f"  plot: {p['plot']}")
    lines.append(f"  checkpoint: {p['checkpoint']}")
    print("\n".join(lines), flush=True)
    return 0


# --------------------------------------------------------------------------------- fold


def _cmd_fold(args: argparse.Namespace) -> int:
    from gpd_fx.trainer import fold_checkpoint

    paths = fold_checkpoint(args.checkpoint, args.out, fuse_bn=args.fuse_bn, export_onnx=args.export_onnx,
                            model=args.model)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


# ---------------------------------------------------------------------------------- zoo


def _cmd_zoo(args: argparse.Namespace) -> int:
    from gpd_fx.testing import zoo  # the sweep imports torchvision/timm machinery: only when asked

    zoo_args = list(args.zoo_args)
    # argparse names the program after sys.argv[0]; make its usage line say how it was run
    saved, sys.argv = sys.argv, ["gpd-fx zoo", *zoo_args]
    try:
        status = zoo.main(zoo_args)
    finally:
        sys.argv = saved
    return int(status or 0)


# --------------------------------------------------------------------------------- main


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gpd-fx`` console script.

    Args:
        argv: arguments without the program name; ``None`` reads ``sys.argv``.

    Returns:
        The exit status: 0 on success, 1 for an error reported in one line, 2 for a bad
        command line, 130 after Ctrl-C (with a checkpoint saved when training).

    Example:
        >>> main(["train", "--epochs", "1", "--out", "/tmp/gpd"])  # doctest: +SKIP
        0
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and argv[0] == "zoo":
        # everything after 'zoo' (its --help too) belongs to the zoo sweep; argparse's
        # REMAINDER would refuse a leading option such as --models
        args = argparse.Namespace(command="zoo", zoo_args=argv[1:])
    else:
        args = parser.parse_args(argv)
    from gpd_fx.trainer import TrainingInterrupted

    commands = {"train": _cmd_train, "fold": _cmd_fold, "zoo": _cmd_zoo}
    try:
        return commands[args.command](args)
    except TrainingInterrupted as err:
        if err.checkpoint is not None:
            print(f"gpd-fx: interrupted; checkpoint of step {err.global_step} saved to {err.checkpoint} "
                  f"(continue with --resume {err.checkpoint})", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("gpd-fx: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except GPDError as err:
        print(f"gpd-fx: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_ERROR
    except (OSError, MemoryError) as err:
        # unreadable/unwritable paths, full disk: the user's environment, not a bug
        print(f"gpd-fx: error: {type(err).__name__}: {_one_line(err)}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
