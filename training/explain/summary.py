"""``imgclf summary``: a per-layer table measured from the model itself with forward hooks.

Every row comes from one call of a module during one forward pass at the
model's input size: its type, kernel/stride/padding/dilation, output shape,
parameters, multiply-adds and receptive field. Output sizes follow
out = floor((in + 2p - d(k-1) - 1)/s) + 1 (convolution) and
out = (in - 1)s - 2p + d(k-1) + output_padding + 1 (transposed convolution),
which tests check row by row.

Receptive field (theoretical, along the main path): r_out = r_in + d(k-1) j_in and
j_out = j_in s for convolutions and pools (j: the distance between neighbouring outputs
in input pixels); transposed convolutions divide the jump by s. Global pooling and
Linear layers on pooled vectors see the whole image ("global"). Squeeze-and-excitation
gates are global too, but are left out of the main path, as receptive-field tables usually do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

_WINDOWED = (nn.Conv2d, nn.ConvTranspose2d, nn.MaxPool2d, nn.AvgPool2d)
GLOBAL = None  # receptive field of something that sees the whole image


@dataclass
class LayerRow:
    name: str
    type: str
    input_shape: tuple[int, ...]  # per sample (no batch dimension)
    output_shape: tuple[int, ...]
    kernel: tuple[int, int] | None = None
    stride: tuple[int, int] | None = None
    padding: tuple[int, int] | str | None = None
    dilation: tuple[int, int] | None = None
    output_padding: tuple[int, int] | None = None  # transposed convolutions
    params: int = 0  # counted on a module's first call only, so the column sums to the model's total
    macs: int = 0  # multiply-adds of convolutions and Linear layers, batch 1
    receptive_field: tuple[float, float] | None = GLOBAL
    jump: tuple[float, float] | None = GLOBAL


def _pair(v: Any) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _window(m: nn.Module) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int] | str, tuple[int, int] | None]:
    """Kernel, stride, padding and dilation (None for average pooling, which has none)."""
    padding = m.padding if isinstance(m.padding, str) else _pair(m.padding)
    dilation = _pair(m.dilation) if hasattr(m, "dilation") else None
    return _pair(m.kernel_size), _pair(m.stride or m.kernel_size), padding, dilation


def _macs(m: nn.Module, inp: torch.Tensor, out: torch.Tensor) -> int:
    if isinstance(m, nn.Conv2d):
        return out[0].numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
    if isinstance(m, nn.ConvTranspose2d):
        return inp[0].numel() * (m.out_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
    if isinstance(m, nn.Linear):
        return out[0].numel() * m.in_features
    return 0


class _Tracker:
    """Follows (receptive field, jump) from tensor to tensor during one forward pass."""

    def __init__(self) -> None:
        self.by_id: dict[int, tuple[torch.Tensor, tuple | None]] = {}
        self.by_shape: dict[tuple[int, ...], tuple] = {}  # last local info per per-sample shape
        self.last: tuple | None = ((1.0, 1.0), (1.0, 1.0))

    def get(self, t: torch.Tensor) -> tuple | None:
        """Known tensor; else the last main-path tensor of its shape (residual adds, SE gating)."""
        if id(t) in self.by_id and self.by_id[id(t)][0] is t:
            return self.by_id[id(t)][1]
        return self.by_shape.get(tuple(t.shape[1:]), self.last)

    def put(self, t: torch.Tensor, info: tuple | None) -> None:
        self.by_id[id(t)] = (t, info)  # the reference keeps the id from being reused
        self.last = info
        if info is not GLOBAL:
            self.by_shape[tuple(t.shape[1:])] = info


def _propagate(m: nn.Module, info: tuple | None, inp: torch.Tensor, out: torch.Tensor) -> tuple | None:
    if info is GLOBAL:
        return GLOBAL
    (rf, jump) = info
    if isinstance(m, _WINDOWED):
        k, s, _, dil = _window(m)
        d = dil or (1, 1)
        if isinstance(m, nn.ConvTranspose2d):
            jump = (jump[0] / s[0], jump[1] / s[1])
            return ((rf[0] + d[0] * (k[0] - 1) * jump[0], rf[1] + d[1] * (k[1] - 1) * jump[1]), jump)
        return ((rf[0] + d[0] * (k[0] - 1) * jump[0], rf[1] + d[1] * (k[1] - 1) * jump[1]),
                (jump[0] * s[0], jump[1] * s[1]))
    if isinstance(m, nn.Linear) and inp.ndim == 2:
        return GLOBAL
    pooled = out.ndim == 4 and out.shape[-2:] == (1, 1) and out.shape[1] == inp.shape[1]
    if inp.ndim == 4 and inp.shape[-2:] != (1, 1) and pooled:  # adaptive/global pooling
        return GLOBAL
    if inp.ndim == 4 and out.ndim == 2 and inp.shape[-2:] != (1, 1):
        return GLOBAL  # flatten of a map with more than one position
    return info  # elementwise: norms, activations, dropout, permutes, pointwise Linear


def summarize(model: nn.Module, input_shape: tuple[int, int, int]) -> list[LayerRow]:
    """One forward pass of a (1, C, H, W) zero image with hooks on every module that computes."""
    model.eval()
    tracker = _Tracker()
    rows: list[LayerRow] = []
    counted: set[int] = set()
    handles = []

    def hook(name: str, m: nn.Module) -> Any:
        def fn(_m: nn.Module, args: tuple, out: Any) -> None:
            inp = next((a for a in args if isinstance(a, torch.Tensor)), None)
            if inp is None or not isinstance(out, torch.Tensor):
                return
            leaf = not any(True for _ in m.children())
            if leaf:
                info = _propagate(m, tracker.get(inp), inp, out)
            else:  # a composite with parameters of its own: its output was made inside it
                info = tracker.get(out)
            tracker.put(out, info)
            params = 0 if id(m) in counted else sum(p.numel() for p in m.parameters(recurse=False))
            counted.add(id(m))
            row = LayerRow(name, type(m).__name__, tuple(inp.shape[1:]), tuple(out.shape[1:]), params=params,
                           macs=_macs(m, inp, out), receptive_field=info[0] if info else GLOBAL,
                           jump=info[1] if info else GLOBAL)
            if isinstance(m, _WINDOWED):
                row.kernel, row.stride, row.padding, row.dilation = _window(m)
            if isinstance(m, nn.ConvTranspose2d):
                row.output_padding = _pair(m.output_padding)
            rows.append(row)

        return fn

    for name, m in model.named_modules():
        if m is model and any(True for _ in m.children()):
            continue
        if not any(True for _ in m.children()) or any(True for _ in m.parameters(recurse=False)):
            handles.append(m.register_forward_hook(hook(name or type(m).__name__, m)))
    x = torch.zeros(1, *input_shape)
    tracker.put(x, ((1.0, 1.0), (1.0, 1.0)))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return rows


def summarize_arch(arch: str, image_size: int | None = None, num_classes: int = 1000) -> list[LayerRow]:
    """``imgclf summary --arch A [--image-size N]``: random weights (shapes and counts do not depend on them)."""
    from training.config import ModelConfig
    from training.models import create_model

    bundle = create_model(ModelConfig(arch=arch, image_size=image_size), num_classes)
    return summarize(bundle.model, (bundle.spec.channels, *bundle.spec.input_size))


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, tuple):
        if len(v) == 2 and v[0] == v[1] and not isinstance(v[0], str):
            return _fmt(v[0])
        return "x".join(_fmt(x) for x in v)
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def format_table(rows: list[LayerRow]) -> str:
    """Plain-text table for the CLI, with totals."""
    head = ("layer", "type", "kernel", "stride", "pad", "dil", "output", "RF", "params", "MACs")
    body = [(r.name, r.type, _fmt(r.kernel), _fmt(r.stride), _fmt(r.padding), _fmt(r.dilation),
             "x".join(map(str, r.output_shape)), "global" if r.receptive_field is None else _fmt(r.receptive_field),
             f"{r.params:,}", f"{r.macs:,}") for r in rows]
    body.append(("total", "", "", "", "", "", "", "", f"{sum(r.params for r in rows):,}",
                 f"{sum(r.macs for r in rows):,}"))
    widths = [max(len(str(row[i])) for row in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) for row in [head, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
