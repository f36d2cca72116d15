"""Zoo exactness: torchvision and timm models expand to exact teachers in eval and train mode.

Every case goes through the benchmark's own measurement (``gpd_fx.testing.measure``), so the
test and the table agree on what "exact" means: float64 model and input, constant-initialised
parameters randomised (torchvision's ViT head is all zeros, which would make any teacher
"exact"), dropout p = 0 (masks over r*C and C channels cannot agree), ``torch.manual_seed``
before each train-mode forward (stochastic depth draws per-sample masks that do agree).

Tolerance 1e-9 relative to max |student output|, in float64: the teacher adds r times more terms
in another order, and even ~1e5-term sums through a deep net stay near 1e-12 (measured: 1e-16
to 3e-13 on this zoo), while a wrong rule is off by 1e-2..1.

The fast selection uses the real models where that is cheap and, for the transformer families,
reduced-width instances of the same torchvision classes (``VisionTransformer``,
``SwinTransformer`` v1/v2, ``ConvNeXt``, ``MaxVit``): the code paths (attention, window
partition, relative position bias, layer scale, stochastic depth) are the same, the cost is not.
The full-size models run in the ``slow`` cases and in ``python benchmarks/zoo.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import os

import pytest
import torch
from torchvision.models import ConvNeXt, MaxVit, SwinTransformer, VisionTransformer
from torchvision.models.convnext import CNBlockConfig
from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformerBlockV2
from torchvision.models.video.mvit import MSBlockConfig, MViT
from torchvision.models.video.swin_transformer import SwinTransformer3d

import gpd_fx.testing as zoo
from gpd_fx.testing import measurement
from gpd_fx.testing import zoo as sweep

TOL = zoo.TOL[torch.float64]  # the project's one table; every case here runs in float64
# Memory budget of one case in GiB, compared with the benchmark's own estimate (deterministic, from
# parameter counts on the meta device), so that the suite's peak stays well under 8 GB; raise it
# with GPD_FX_TEST_MAX_GIB on a bigger machine (vit_b_16 needs ~5.9, maxvit_t ~6.2 at r2 float64).
# A case above it is a pytest skip, never a failure, and no case looks at the memory free at the
# moment it runs: that depends on other processes, and made the suite flaky on a shared machine.
MAX_GIB = float(os.environ.get("GPD_FX_TEST_MAX_GIB", "5"))




def _mini_vit():
    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64,
                             mlp_dim=128, num_classes=10)


def _mini_swin():
    return SwinTransformer(patch_size=[4, 4], embed_dim=32, depths=[2, 2], num_heads=[2, 4],
                           window_size=[4, 4], stochastic_depth_prob=0.2, num_classes=10)


def _mini_swin_v2():
    return SwinTransformer(patch_size=[4, 4], embed_dim=32, depths=[2, 2], num_heads=[2, 4],
                           window_size=[4, 4], stochastic_depth_prob=0.2, num_classes=10,
                           block=SwinTransformerBlockV2, downsample_layer=PatchMergingV2)


def _mini_convnext():
    return ConvNeXt([CNBlockConfig(16, 32, 1), CNBlockConfig(32, 64, 1), CNBlockConfig(64, None, 1)],
                    stochastic_depth_prob=0.1, num_classes=10)


def _mini_maxvit():
    # partition 4 tiles the 8x8 and 4x4 stage maps of a 32x32 input
    return MaxVit(input_size=(32, 32), stem_channels=16, partition_size=4, block_channels=[16, 32],
                  block_layers=[1, 1], head_dim=8, stochastic_depth_prob=0.2, num_classes=10)


def _mini_mvit(v2: bool):
    # the two kinds of MViT block: pooled keys/values (stride 2 in H, W), and pooled queries
    # (a stage transition, channels 16 -> 32); v2 adds the decomposed relative position bias
    # and the in-place residual pooling shortcut; a 4x32x32 clip gives a 2x8x8 token grid
    blocks = [MSBlockConfig(num_heads=1, input_channels=16, output_channels=32, kernel_q=[3, 3, 3] if v2 else [],
                            kernel_kv=[3, 3, 3], stride_q=[1, 1, 1], stride_kv=[1, 2, 2]),
              MSBlockConfig(num_heads=2, input_channels=32, output_channels=32, kernel_q=[3, 3, 3],
                            kernel_kv=[3, 3, 3], stride_q=[1, 2, 2], stride_kv=[1, 1, 1])]
    return MViT(spatial_size=(32, 32), temporal_size=4, block_setting=blocks, residual_pool=v2,
                residual_with_cls_embed=False, rel_pos_embed=v2, proj_after_attn=v2,
                stochastic_depth_prob=0.2, num_classes=10)


def _mini_swin3d():
    # a 4x32x32 clip: 2x8x8 patches, 2x4x4 windows, the second block of each stage shifted
    return SwinTransformer3d(patch_size=[2, 4, 4], embed_dim=32, depths=[2, 2], num_heads=[2, 4],
                             window_size=[2, 4, 4], stochastic_depth_prob=0.2, num_classes=10)


MINI = {"mini_vit": _mini_vit, "mini_swin": _mini_swin, "mini_swin_v2": _mini_swin_v2,
        "mini_convnext": _mini_convnext, "mini_maxvit": _mini_maxvit,
        "mini_mvit_v1": lambda: _mini_mvit(False), "mini_mvit_v2": lambda: _mini_mvit(True),
        "mini_swin3d": _mini_swin3d}
# input of the reduced instances that are not image classifiers
MINI_VIDEO = {"mini_mvit_v1", "mini_mvit_v2", "mini_swin3d"}

# (model, ratio, branches): "none" = IR only (issue 2/3), "default" = expand's default (IR + CBR).
FAST = [
    ("resnet18", 2, "none"),
    ("mobilenet_v3_small", 2, "none"),
    ("shufflenet_v2_x0_5", 2, "none"),
    ("squeezenet1_0", 2, "none"),
    ("efficientnet_b0", 2, "none"),
    ("densenet121", 2, "none"),
    ("regnet_x_400mf", 2, "none"),
    ("shufflenet_v2_x0_5", 3, "none"),
    ("mobilenet_v3_small", 2, "default"),
    ("squeezenet1_0", 2, "default"),
    ("mini_vit", 2, "default"),
    ("mini_vit", 3, "none"),
    ("mini_swin", 2, "default"),
    ("mini_swin", 3, "none"),
    ("mini_swin_v2", 2, "default"),
    ("mini_convnext", 2, "default"),
    ("mini_maxvit", 2, "default"),
]

# Full-size models; the float64 runs take ~6 min together on the shared 2-core machine (measured
# with the sweep: expand + checks 2-120 s each, maxvit_t at 224x224 the largest).
SLOW = [
    ("googlenet", 2, "none"),
    ("inception_v3", 2, "none"),
    ("resnet50", 2, "none"),
    ("resnext50_32x4d", 2, "none"),
    ("mnasnet0_5", 2, "none"),
    ("mobilenet_v2", 3, "none"),
    ("efficientnet_v2_s", 2, "none"),
    ("regnet_y_400mf", 2, "none"),
    ("convnext_tiny", 2, "none"),
    ("swin_t", 2, "none"),
    ("swin_v2_t", 2, "none"),
    ("vit_b_16", 2, "none"),
    ("maxvit_t", 2, "none"),
    ("resnet18", 2, "default"),
]


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: batch-2, 64x64 tensors gain little from threads, and OpenMP barriers
    stall 5-10x when the runner's cores are busy with other jobs (measured on the 2-core box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _params(cases):
    return [pytest.param(n, r, b, id=f"{n}-r{r}-{b}") for n, r, b in cases]


# timm families whose code paths the torchvision zoo does not have: opened no-trace modules
# (ConViT's GPSA, MobileViT-v2 and TinyViT blocks, NF-RegNet's blocks), LeViT's eval-mode bias
# cache, EfficientViM's state-space mixer; small members at small inputs.
TIMM_FAST = [
    ("deit_tiny_patch16_224", 2),
    ("levit_128s", 3),
    ("convit_tiny", 2),
    ("mobilevitv2_050", 2),
    ("tiny_vit_5m_224", 2),
    ("nf_regnet_b0", 2),
    ("efficientvim_m1", 2),
]


def _run(name: str, ratio: int, branches: str, fold: bool = False):
    if name.startswith("timm:"):
        name = name[len("timm:"):]
        spec = zoo.Spec("timm", name, {}, None, family=zoo.family(name))
        return zoo.measure(spec, ratio, dtype="float64", branches=branches, timm_fx=False, **BUDGET)
    if name in MINI:
        video = dict(task="video", frames=4) if name in MINI_VIDEO else {}
        spec = zoo.Spec("torchvision", name, image_size=32, **video)
        return zoo.measure(spec, ratio, dtype="float64", branches=branches, model=MINI[name](), do_fold=fold,
                           **BUDGET)
    spec = {s.name: s for s in zoo.torchvision_specs(tasks=zoo.TASKS)}[name]
    return zoo.measure(spec, ratio, dtype="float64", branches=branches, do_fold=fold, **BUDGET)


BUDGET = dict(max_gib=MAX_GIB, check_free_memory=False)


def _run_isolated(name: str, ratio: int, branches: str):
    """The benchmark's own worker subprocess: the full-size models' memory goes back to the OS
    after each case instead of piling up in the pytest process (measured: 5.3 GB max RSS for the
    slow cases in one process, which on top of the rest of the suite came to 7.3 GB)."""
    spec = {s.name: s for s in zoo.torchvision_specs()}[name]
    args = sweep.build_parser().parse_args([
        "--dtype", "float64", "--branches", branches, "--max-gib", str(MAX_GIB), "--mem-limit-gib", "0",
        "--threads", "1", "--timeout", "1800", "--no-free-memory-check"])
    row = sweep.run_one(spec, ratio, args)
    if row.status in ("crashed", "timeout"):
        pytest.fail(f"{name} r{ratio} branches={branches}: worker {row.status}: {row.reason}")
    return row


def _check(name: str, ratio: int, branches: str, isolated: bool = False, fold: bool = False) -> None:
    row = _run_isolated(name, ratio, branches) if isolated else _run(name, ratio, branches, fold)
    if row.status == "skipped":
        # Only the memory budget may skip a case: the estimate is computed from the model's shapes,
        # so it is the same on every run. Any other skip (a spec marked skipped, a free-memory
        # check) would hide a case the selection means to run, so it fails.
        if row.est_gib is None or row.est_gib < MAX_GIB:
            pytest.fail(f"{name} r{ratio}: skipped for another reason than the memory budget: {row.reason}")
        pytest.skip(f"{name} r{ratio}: {row.reason}")
    where = f"{name} r{ratio} branches={branches}, input {row.input}; repro: {row.repro}"
    assert row.status == "ok", f"{where}: {row.reason} ({row.error_where})"
    assert row.fallbacks == {}, f"{where}: rules fell back to boundaries: {row.fallbacks}"
    assert row.exact_eval, f"{where}: eval error {row.err_eval:.3e} > {TOL:g} {row.train_note}"
    assert row.exact_train, f"{where}: train error {row.err_train:.3e} > {TOL:g} {row.train_note}"
    assert row.err_student <= TOL, f"{where}: dt.student(x) differs from the model by {row.err_student:.3e}"
    floor = zoo.TRANSFORMER_SHARE if row.kind == "transformer" else zoo.CNN_SHARE
    assert row.share >= floor, (f"{where}: expanded FLOP share {row.share:.3f} < {floor} "
                                f"({row.kind}); boundaries: {row.boundary_reasons}")
    if fold:   # fold(dt) is the user's class and computes dt.student(x) and the model
        assert row.fold_exact, f"{where}: fold not exact: {row.fold_note}"


@pytest.mark.parametrize("name,ratio,branches", _params(FAST))
def test_zoo_exact(name, ratio, branches):
    """Teacher == student (eval and train), no fallbacks, expanded share above the floor."""
    _check(name, ratio, branches)


# Segmentation, video and optical-flow models (issue 14), the real ones where they are small and
# reduced instances of the video transformer classes (MViT v1/v2, Swin3D) at a 4x32x32 clip; each
# case takes 5-30 s on the shared 2-core machine (expand, eval/train checks, fold). RAFT is not
# here: fx cannot trace it (see benchmarks/README.md).
TASK_FAST = [
    ("lraspp_mobilenet_v3_large", 2, "none"),
    ("deeplabv3_mobilenet_v3_large", 2, "default"),
    ("mc3_18", 2, "none"),
    ("r2plus1d_18", 2, "none"),
    ("mini_mvit_v1", 2, "none"),
    ("mini_mvit_v2", 2, "default"),
    ("mini_mvit_v2", 3, "none"),
    ("mini_swin3d", 2, "none"),
]


@pytest.mark.parametrize("name,ratio,branches", _params(TASK_FAST))
def test_task_zoo_exact(name, ratio, branches):
    """Dense and video models: exact (eval and train), share above the floor, fold back to their class."""
    _check(name, ratio, branches, fold=True)


def test_task_specs_inputs():
    """Every torchvision task is listed with an input of its kind; detectors expand their backbone."""
    specs = zoo.torchvision_specs(tasks=zoo.TASKS)
    by_task = {}
    for s in specs:
        by_task.setdefault(s.task, []).append(s)
    assert set(by_task) == set(zoo.TASKS)
    assert all(len(s.input_shapes(s.image_size)[0]) == 5 for s in by_task["video"])
    assert all(s.n_inputs == 2 and s.image_size % 8 == 0 for s in by_task["optical_flow"])
    assert len(by_task["detection"]) == 12
    assert all(s.scope == ("backbone",) and not s.skip for s in by_task["detection"])
    (images,) = by_task["detection"][0].make_inputs(64, torch.float64)
    assert isinstance(images, list) and len(images) == zoo.BATCH and images[0].shape == (3, 64, 64)


# Detection (issue 14): a torchvision detector through scope=["backbone"], as the zoo runs it
# (float64, BN statistics randomised, score thresholds 0, train mode with seeded targets, fold).
# fasterrcnn_mobilenet_v3_large_320_fpn at 64x64 takes ~4 s; ssdlite320_mobilenet_v3_large
# (~10 s, its fixed 320x320) is the case whose randomised MobileNet backbone makes many anchors
# score the same to a few ulp, so that NMS keeps other boxes from a teacher exact to 1e-16:
# exact through the scope check (gpd_fx.scope.ScopeCheck), not by comparing detections.
@pytest.mark.parametrize("name", ["fasterrcnn_mobilenet_v3_large_320_fpn", "ssdlite320_mobilenet_v3_large"])
def test_detection_zoo_row(name):
    spec = {s.name: s for s in zoo.torchvision_specs(tasks=("detection",))}[name]
    row = zoo.measure(spec, 2, dtype="float64", do_fold=True, **BUDGET)
    where = f"{name}: {row.reason} {row.train_note} {row.fold_note}; repro: {row.repro}"
    assert row.status == "ok" and row.fallbacks == {} and row.scope == "backbone", where
    assert row.boxes and all(row.boxes), f"{name}: no detections to compare ({row.boxes})"
    assert row.exact_eval and row.exact_train and row.err_student <= TOL, where
    assert max(row.err_eval, row.err_train) <= TOL and row.direct_eval is not None and row.direct_train is not None
    assert row.fold_exact, where
    assert row.scope_share >= zoo.CNN_SHARE and 0 < row.share <= row.scope_share
    lines = sweep.summary_lines(sweep.summarize([row], "torchvision"), "torchvision")
    assert lines[0].startswith("SUMMARY ratio 2: 1/1 run detectors exact through scope backbone"), lines


@pytest.mark.parametrize("name,ratio", [pytest.param(n, r, id=f"{n}-r{r}") for n, r in TIMM_FAST])
def test_timm_zoo_exact(name, ratio):
    """The same on timm families (IR only), through the benchmark's own measurement."""
    pytest.importorskip("timm")
    _check(f"timm:{name}", ratio, "none")


@pytest.mark.slow
@pytest.mark.parametrize("name,ratio,branches", _params(SLOW))
def test_zoo_exact_full_size(name, ratio, branches):
    """The same on full-size models, transformers included (each in its own worker process)."""
    _check(name, ratio, branches, isolated=True)


def test_rel_error_flags_structure_and_vacuous_outputs():
    """A missing output or an all-zero student output is never reported as exact."""
    a = torch.ones(2, 3)
    assert zoo.rel_error((a, a), a)[0] == math.inf
    assert math.isnan(zoo.rel_error(torch.zeros(2), torch.zeros(2))[0])
    assert zoo.rel_error(a * (1 + 1e-12), a)[0] == pytest.approx(1e-12, rel=1e-3)


def test_randomize_constants_breaks_zero_head():
    """torchvision's ViT head starts at zero; the benchmark must not measure 0/0."""
    m = _mini_vit()
    assert not m.heads.head.weight.any()
    zoo.randomize_constants(m)
    assert m.heads.head.weight.std() > 0
    with torch.no_grad():
        assert m.eval()(torch.randn(1, 3, 32, 32)).abs().max() > 0


def test_zoo_cli_writes_table_and_json(tmp_path, monkeypatch, capsys):
    """The script runs one model in a worker subprocess and writes rows, summary and environment
    to ./zoo_<source>.json by default (the current directory, never the source tree)."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "zoo_torchvision.json"
    rc = sweep.main(["--models", "squeezenet1_1", "--ratio", "2", "--branches", "none", "--no-timing",
                   "--timeout", "600", "--no-free-memory-check"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "squeezenet1_1" in text and "SUMMARY ratio 2: 1/1" in text
    data = json.loads(out.read_text())
    assert {"environment", "config", "rows", "summary"} <= set(data)
    (row,) = data["rows"]
    assert row["status"] == "ok" and row["exact_eval"] and row["exact_train"], row
    assert data["environment"]["cpu_count"] >= 1 and data["environment"]["torch"] == torch.__version__


def test_measure_never_consults_free_memory_when_told_not_to(monkeypatch):
    """Tests pass check_free_memory=False: a busy machine cannot turn a case into a skip or failure."""
    monkeypatch.setattr(measurement, "mem_available_gib", lambda: 0.0)
    spec = zoo.Spec("torchvision", "mini_vit", image_size=32)
    row = zoo.measure(spec, 2, dtype="float64", branches="none", model=_mini_vit(), **BUDGET)
    assert row.status == "ok", row.reason
    row = zoo.measure(spec, 2, dtype="float64", branches="none", model=_mini_vit(), max_gib=MAX_GIB)
    assert row.status == "skipped" and "free now" in row.reason


def test_zoo_help_shows_defaults_and_no_developer_machine(tmp_path, monkeypatch, capsys):
    """Every option's help states its default; nothing about the machine it was written on; no source-tree output."""
    with pytest.raises(SystemExit):
        sweep.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for action in sweep.build_parser()._actions:
        if action.help not in (None, argparse.SUPPRESS) and action.dest != "help":
            assert "(default:" in action.help, action.option_strings
    assert "2 cores" not in text and "benchmarks/results" not in text
    assert "none = IR only" in text and "all = every kind that applies" in text
    monkeypatch.chdir(tmp_path)
    args = sweep.parse_args(["--ratio", "2"])
    assert args.json is None  # resolved to ./zoo_<source>.json in main
    with pytest.raises(SystemExit) as exc:
        sweep.parse_args(["--ratio", "0"])
    assert exc.value.code == 2


def test_model_kind_is_what_the_forward_computes():
    """Self-attention is recognised by what a forward computes (a softmax over the product of two
    activations), whatever the classes are called; a softmax that gates channels is not attention."""

    class Gate(torch.nn.Module):   # selective-kernel style: softmax over a layer's output, times x
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(8, 8, 1)

        def forward(self, x):
            return x * self.conv(x).softmax(dim=1)

    class Mixer(torch.nn.Module):  # plain q @ k^T attention (learned temperature) under a neutral name
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(()))

        def forward(self, x):
            t = x.flatten(2).transpose(1, 2)
            return (t @ t.transpose(1, 2) * self.scale).softmax(-1) @ t

    with torch.device("meta"):
        vit, cnn = _mini_vit(), torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), Gate())
    assert zoo.model_kind(vit, [(2, 3, 32, 32)]) == ("transformer", "MultiheadAttention")
    assert zoo.model_kind(cnn, [(2, 3, 8, 8)]) == ("cnn", "")
    assert zoo.model_kind(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), Mixer()), [(2, 3, 4, 4)]) == \
        ("transformer", "Mixer")
    assert zoo.model_kind(torch.nn.Conv2d(3, 8, 1), [(2, 5, 4, 4)])[0] == ""   # the forward fails
