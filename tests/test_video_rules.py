"""Rules for torchvision's video and window-attention helper functions (issue 14).

Each case runs a reduced instance of the torchvision class in float64, eval and train mode, and
checks both exactness and that the rule widened what it should: the teacher holds about r^2 times
the student's parameters (the q/k/v and projection weights are widened in place, not repeated at
run time) and the attention stays one wrapped call with r times the heads.

Tolerance: 1e-10 relative to max |student output| in float64. The teacher sums r times more
terms in another order through a few thousand-term dot products (rounding ~1e-15 per sum, measured
4.7e-16 on the reduced Swin3D), while a wrong rule or a missing head copy is off by 1e-3..1.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models import SwinTransformer
from torchvision.models import swin_transformer as swin2d
from torchvision.models.video import swin_transformer as swin3d

import gpd_fx
from gpd_fx.testing import randomize_constants

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-10
# the zoo's own "under-widened" line: a fully widened teacher has ~r^2 times the parameters
UNDER_WIDENED = 0.85


def _mini_swin3d() -> nn.Module:
    # a 4x32x32 clip: 2x8x8 patches, 2x4x4 windows; the second block of each stage is shifted,
    # so both the plain and the masked (shifted) window attention run
    return swin3d.SwinTransformer3d(patch_size=[2, 4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 4],
                                    window_size=[2, 4, 4], stochastic_depth_prob=0.2, num_classes=10)


def _mini_swin2d() -> nn.Module:
    return SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4],
                           stochastic_depth_prob=0.2, num_classes=10)


def _expand_exact(model: nn.Module, x: torch.Tensor, ratio: int):
    """Expand in float64 (IR only) and check teacher and student against the model in eval and
    train mode (one seed per forward: stochastic depth draws the same per-sample masks)."""
    torch.manual_seed(0)
    model = model.double()
    randomize_constants(model)
    x = x.double()
    dt = gpd_fx.expand(model, ratio, (x,), branches=())
    assert dt.report.fallbacks == {}
    assert len(dt.report.boundaries) == 0, dt.report.boundary_reasons
    for mode in (False, True):
        model.train(mode)
        dt.train(mode)
        with torch.no_grad():
            torch.manual_seed(1)
            ref = model(x)
            for f in (dt, dt.student):
                torch.manual_seed(1)
                err = float((f(x) - ref).abs().max() / ref.abs().max())
                assert err < TOL, (mode, f, err)
    return dt


def _n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _attention_calls(dt, fn) -> list:
    return [n for n in dt.teacher.graph.nodes if n.op == "call_function" and n.target is fn]


@pytest.mark.parametrize("ratio", [2, 3])
def test_swin3d_window_attention_has_r_times_the_heads(ratio):
    """torchvision's ``shifted_window_attention_3d`` stays one call with r*H heads: q/k/v and the
    projection are widened in place (parameters ~r^2) and nothing is repeated at run time,
    including the relative position bias (its table is widened per head copy)."""
    model = _mini_swin3d()
    dt = _expand_exact(model, torch.randn(2, 3, 4, 32, 32), ratio)
    ratio_params = _n_params(dt.teacher) / _n_params(model)
    assert ratio_params >= UNDER_WIDENED * ratio ** 2, ratio_params
    assert dt.report.runtime_widenings == 0
    calls = _attention_calls(dt, swin3d.shifted_window_attention_3d)
    blocks = [m for m in model.modules() if isinstance(m, swin3d.ShiftedWindowAttention3d)]
    assert len(calls) == len(blocks) == 4
    assert sorted(n.kwargs["num_heads"] for n in calls) == sorted(ratio * b.num_heads for b in blocks)


def test_swin2d_relative_position_bias_is_widened_in_place():
    """The same rule on the 2-D function: the bias table is widened per head copy (it used to be
    repeated at run time, one widening per block, so the teacher's head copies shared it)."""
    model = _mini_swin2d()
    dt = _expand_exact(model, torch.randn(2, 3, 32, 32), 2)
    assert dt.report.runtime_widenings == 0
    assert len(_attention_calls(dt, swin2d.shifted_window_attention)) == 4


def test_one_head_relative_position_bias_is_widened_in_place():
    """A one-head bias table is widened too (the attention runs r heads): nothing at run time."""
    torch.manual_seed(0)
    model = swin2d.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2], num_heads=[1],
                                   window_size=[4, 4], num_classes=5)
    dt = _expand_exact(model, torch.randn(2, 3, 32, 32), 2)
    assert dt.report.runtime_widenings == 0
