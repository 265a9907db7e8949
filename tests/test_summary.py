"""`imgclf summary`: the per-layer table measured with hooks obeys the convolution arithmetic."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from training.explain.summary import format_table, summarize, summarize_arch


def conv_out(n: int, k: int, s: int, p: int, d: int) -> int:
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


def transposed_out(n: int, k: int, s: int, p: int, d: int, op: int) -> int:
    return (n - 1) * s - 2 * p + d * (k - 1) + op + 1


def _check_arithmetic(rows) -> int:
    """Every Conv2d / ConvTranspose2d row's output size, from its input size; returns how many were checked."""
    checked = 0
    for r in rows:
        if r.type not in ("Conv2d", "ConvTranspose2d"):
            continue
        for axis in (0, 1):
            n_in, n_out = r.input_shape[1 + axis], r.output_shape[1 + axis]
            k, s, d = r.kernel[axis], r.stride[axis], r.dilation[axis]
            if r.padding == "same":
                p = d * (k - 1) // 2
                assert d * (k - 1) % 2 == 0 and s == 1
            elif r.padding == "valid":
                p = 0
            else:
                p = r.padding[axis]
            if r.type == "Conv2d":
                assert n_out == conv_out(n_in, k, s, p, d), r
            else:
                assert n_out == transposed_out(n_in, k, s, p, d, r.output_padding[axis]), r
        checked += 1
    return checked


class Arithmetic(nn.Module):
    """Convolutions with every knob, then transposed convolutions back up."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.Conv2d(8, 8, 5, stride=2, padding=2),
            nn.Conv2d(8, 16, 3, stride=2, dilation=2),
            nn.Conv2d(16, 16, (3, 5), stride=(1, 2), padding=(1, 0), groups=4),
            nn.Conv2d(16, 16, 3, padding="same", dilation=3),
            nn.MaxPool2d(2),
        )
        self.up = nn.Sequential(
            nn.ConvTranspose2d(16, 8, 4, stride=2, padding=1),
            nn.ConvTranspose2d(8, 8, 3, stride=2, padding=1, output_padding=1),
            nn.ConvTranspose2d(8, 4, 3, stride=3, dilation=2),
            nn.ConvTranspose2d(4, 3, (2, 3), stride=(2, 1), padding=(0, 1), groups=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


@pytest.mark.parametrize("size", [(37, 50), (64, 64)])
def test_convolution_arithmetic(size: tuple[int, int]) -> None:
    model = Arithmetic()
    rows = summarize(model, (3, *size))
    assert _check_arithmetic(rows) == 9
    assert sum(r.params for r in rows) == sum(p.numel() for p in model.parameters())
    conv = next(r for r in rows if r.name == "down.1")
    assert conv.macs == conv.output_shape[0] * conv.output_shape[1] * conv.output_shape[2] * 8 * 5 * 5
    grouped = next(r for r in rows if r.name == "down.3")
    assert grouped.macs == grouped.output_shape[0] * grouped.output_shape[1] * grouped.output_shape[2] * 4 * 3 * 5


def test_lenet5_receptive_fields_and_counts() -> None:
    rows = summarize_arch("lenet5", num_classes=10)
    rf = {r.name: r.receptive_field for r in rows}
    assert [rf[f"features.{i}"][0] for i in (0, 2, 3, 5, 6)] == [5, 6, 14, 16, 32]
    assert rf["classifier.4"] is None  # a Linear layer sees the whole image
    assert [r.output_shape for r in rows if r.type == "Conv2d"] == [(6, 28, 28), (16, 10, 10), (120, 1, 1)]
    assert sum(r.params for r in rows) == 61_706  # LeNet-5 with a 10-class head, as in the lecture
    table = format_table(rows)
    assert "global" in table and "61,706" in table and "AvgPool2d" in table


@pytest.mark.parametrize(("arch", "size"), [("resnet18", 64), ("mobilenet_v3_small", 64), ("efficientnet_lite0", 64),
                                            ("convnext_tiny", 64), ("simple_cnn", 32)])
def test_registry_models_obey_the_arithmetic(arch: str, size: int) -> None:
    from training.config import ModelConfig
    from training.models import create_model

    rows = summarize_arch(arch, image_size=size, num_classes=10)
    assert _check_arithmetic(rows) > 0
    model = create_model(ModelConfig(arch=arch, image_size=size), 10).model
    assert sum(r.params for r in rows) == sum(p.numel() for p in model.parameters())
    local = [r.receptive_field[0] for r in rows if r.receptive_field is not None and r.type == "Conv2d"]
    assert local[0] >= 2 and max(local) > local[0]
    if arch != "simple_cnn":  # deep nets see more than the image (theoretical RF)
        assert max(local) > size


def test_resnet18_matches_published_figures() -> None:
    """torchvision documents 1.814 GFLOPS (multiply-adds) and 11.69 M parameters; the theoretical RF is 435."""
    rows = summarize_arch("resnet18", image_size=224)
    assert sum(r.macs for r in rows) == pytest.approx(1.814e9, rel=1e-3)
    assert sum(r.params for r in rows) == 11_689_512
    assert max(r.receptive_field[0] for r in rows if r.receptive_field is not None) == 435
