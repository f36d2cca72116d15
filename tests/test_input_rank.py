"""expand's error for an example input the model cannot take names the rank its first layer expects."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gpd_fx
from gpd_fx.errors import ExpandInputError


def _video_net():
    return nn.Sequential(nn.Conv3d(3, 4, kernel_size=3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool3d(1),
                         nn.Flatten(), nn.Linear(4, 5))


def test_image_input_for_a_video_model_names_the_5d_layout():
    """A 4-D image batch for a model whose first layer is a Conv3d: the error says 5-D (N, C, T, H, W),
    names the layer, and its example has that rank and the layer's 3 input channels."""
    with pytest.raises(ExpandInputError) as exc:
        gpd_fx.expand(_video_net(), 2, (torch.randn(2, 3, 16, 16),))
    msg = str(exc.value)
    assert "5-D (N, C, T, H, W)" in msg and "Conv3d" in msg and "'0'" in msg, msg
    assert "got a 4-D input" in msg and "torch.randn(2, 3, 8, 32, 32)" in msg, msg
    assert "224, 224)" not in msg, msg   # never the image example for a video model


def test_too_small_video_input_suggests_a_5d_example():
    """Right rank, too small for the model (a fixed 2x7x7 pooling head, as torchvision's S3D has):
    the model's own error, and an example of the model's rank, not a 4-D image."""
    m = nn.Sequential(nn.Conv3d(3, 4, kernel_size=3, padding=1), nn.AvgPool3d((2, 7, 7)), nn.Flatten())
    with pytest.raises(ExpandInputError) as exc:
        gpd_fx.expand(m, 2, (torch.randn(2, 3, 1, 4, 4),))
    msg = str(exc.value)
    assert "fails on the example inputs [(2, 3, 1, 4, 4)]" in msg, msg
    assert "5-D (N, C, T, H, W)" in msg and "torch.randn(2, 3, 8, 32, 32)" in msg, msg


def test_conv1d_model_and_a_model_that_takes_another_rank():
    """Conv1d -> 3-D (N, C, L). A model that runs on its input is never refused, whatever its
    first conv's rank (the check only explains a failure)."""
    m = nn.Sequential(nn.Conv1d(2, 4, 3), nn.Flatten())
    with pytest.raises(ExpandInputError, match=r"3-D \(N, C, L\)"):
        gpd_fx.expand(m, 2, (torch.randn(2, 2, 8, 8),))

    class Reshaping(nn.Module):   # takes (N, C*T, H, W) and makes the clip itself
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv3d(3, 4, 3, padding=1)

        def forward(self, x):
            return self.conv(x.reshape(x.shape[0], 3, -1, *x.shape[2:])).mean((2, 3, 4))

    x = torch.randn(2, 6, 8, 8)
    dt = gpd_fx.expand(Reshaping(), 2, (x,), branches=())
    # float32 model and teacher: the widened conv sums twice the terms, ~1e-6 relative
    assert torch.allclose(dt(x), dt.student(x), rtol=1e-5, atol=1e-5)
