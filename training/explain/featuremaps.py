"""The lecture's "a filter makes a feature map", on the user's own image: one grid PNG per stage.

Stages are taken with torchvision's ``create_feature_extractor`` (torch.fx)
for torchvision and the project's own models, and with timm's
``forward_intermediates`` for timm models. Each PNG shows up to
``max_maps`` channels, each scaled to its own range, under a caption with the
layer name, its filter sizes and the map size.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import nn

from service.preprocessing import PreprocessSpec, image_to_tensor

log = logging.getLogger(__name__)

_RESNET = ["relu", "layer1", "layer2", "layer3", "layer4"]


@dataclass
class StageMaps:
    name: str  # module name in the model
    filters: str  # e.g. "3x3/2, 1x1": the kernel sizes (and strides) of the convolutions in the stage
    maps: np.ndarray  # (C, h, w) for one image


def _is_timm(model: nn.Module) -> bool:
    return type(model).__module__.startswith("timm.") and hasattr(model, "forward_intermediates")


def stage_names(arch: str, model: nn.Module) -> list[str]:
    """Candidate module names whose outputs are stages (for timm: feature_info's modules).

    For models built as one ``features`` Sequential, every block is a candidate and
    :func:`feature_maps` keeps the last block at each resolution (one per stage).
    """
    if _is_timm(model):
        return [info["module"] for info in model.feature_info]  # type: ignore[attr-defined]
    if arch.startswith("resnet"):
        return list(_RESNET)
    feats = getattr(model, "features", None)
    if not isinstance(feats, nn.Sequential):
        raise TypeError(f"no stage list for {arch}: it has no `features` Sequential")
    if arch in ("lenet5", "simple_cnn"):  # the activation right after each convolution (and its norm)
        conv = (nn.Conv2d, nn.BatchNorm2d)
        return [f"features.{i}" for i in range(1, len(feats)) if isinstance(feats[i - 1], conv)
                and not isinstance(feats[i], conv)]
    return [f"features.{i}" for i in range(len(feats))]


def _filters(module: nn.Module) -> str:
    """Distinct kernel sizes (with stride when > 1, 'dw' when depthwise) of the convolutions in ``module``."""
    seen: list[str] = []
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            k = "x".join(map(str, m.kernel_size))
            s = f"/{m.stride[0]}" if m.stride[0] > 1 else ""
            d = " dw" if m.groups > 1 and m.groups == m.in_channels else ""
            label = f"{k}{s}{d}"
            if label not in seen:
                seen.append(label)
    return ", ".join(seen) if seen else "no conv"


def _conv_owner(model: nn.Module, name: str) -> nn.Module:
    """The module holding the stage's filters: the stage itself, or the conv just before an activation."""
    module = model.get_submodule(name)
    if any(isinstance(m, nn.Conv2d) for m in module.modules()):
        return module
    parent, _, idx = name.rpartition(".")
    if idx.isdigit() and parent:  # an activation in a Sequential: its filters are in the nearest conv before it
        seq = model.get_submodule(parent)
        for j in range(int(idx) - 1, -1, -1):
            if isinstance(seq[j], nn.Conv2d):
                return seq[j]
    return model.conv1 if name == "relu" and hasattr(model, "conv1") else module  # resnet's stem


def feature_maps(arch: str, model: nn.Module, x: torch.Tensor) -> list[StageMaps]:
    """Each stage's output for one preprocessed image ``x`` (1, C, H, W)."""
    model.eval()
    names = stage_names(arch, model)
    with torch.no_grad():
        if _is_timm(model):
            outs = model.forward_intermediates(x, intermediates_only=True)  # type: ignore[operator]
            return _timm_stages(model, names, outs)
        else:
            from torchvision.models.feature_extraction import create_feature_extractor

            extractor = create_feature_extractor(model, return_nodes={n: n for n in names})
            got = extractor(x)
            outs = [got[n] for n in names]
    stages: list[StageMaps] = []
    group: list[nn.Module] = []
    for i, (name, out) in enumerate(zip(names, outs, strict=True)):
        group.append(_conv_owner(model, name))
        last_at_size = i + 1 == len(outs) or outs[i + 1].shape[-2:] != out.shape[-2:]
        if last_at_size or not name.startswith("features.") or arch in ("lenet5", "simple_cnn"):
            stages.append(StageMaps(name, _filters(nn.ModuleList(group)), out[0].float().numpy()))
            group = []
    return stages


def _timm_stages(model: nn.Module, names: list[str], outs: list[torch.Tensor]) -> list[StageMaps]:
    """timm reports the last block of each stage; its filters are those of every block since the last one."""
    stages, first = [], 0
    for name, out in zip(names, outs, strict=True):
        idx = int(name.rpartition(".")[2]) if name.startswith("blocks.") else first
        group = [model.get_submodule(f"blocks.{j}") for j in range(first, idx + 1)]
        if first == 0 and hasattr(model, "conv_stem"):
            group.insert(0, model.conv_stem)
        stages.append(StageMaps(name, _filters(nn.ModuleList(group)), out[0].float().numpy()))
        first = idx + 1
    return stages


def grid_image(stage: StageMaps, max_maps: int = 64, tile: int = 64) -> Image.Image:
    """Channel maps in a near-square grid, each min-max scaled (1x1 maps jointly), with a caption band on top."""
    maps = stage.maps[:max_maps]
    c, h, w = maps.shape
    cols = math.ceil(math.sqrt(c))
    rows = math.ceil(c / cols)
    scale = max(1, tile // max(h, w))
    th, tw = h * scale, w * scale
    gap, band = 2, 34
    canvas = Image.new("L", (cols * (tw + gap) + gap, rows * (th + gap) + gap + band), 255)
    for i, fmap in enumerate(maps):
        ref = fmap if h * w > 1 else maps  # a 1x1 map has no range of its own: scale it against the stage
        lo, hi = float(ref.min()), float(ref.max())
        norm = (fmap - lo) / (hi - lo) if hi > lo else np.zeros_like(fmap)
        img = Image.fromarray(np.round(norm * 255).astype(np.uint8)).resize((tw, th), Image.Resampling.NEAREST)
        r, col = divmod(i, cols)
        canvas.paste(img, (gap + col * (tw + gap), band + gap + r * (th + gap)))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    shown = f" (first {c} of {stage.maps.shape[0]})" if stage.maps.shape[0] > c else ""
    draw.text((4, 2), stage.name, fill=0, font=font)
    draw.text((4, 17), f"filters {stage.filters} | maps {stage.maps.shape[0]}x{h}x{w}{shown}", fill=0, font=font)
    return canvas


def write_featuremaps(arch: str, model: nn.Module, image: bytes, spec: PreprocessSpec, out_dir: Path) -> list[Path]:
    """``imgclf featuremaps``: one PNG per stage in ``out_dir``, named by order and layer."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    x = torch.from_numpy(image_to_tensor(image, spec))[None]
    paths = []
    for i, stage in enumerate(feature_maps(arch, model, x)):
        path = out_dir / f"{i:02d}_{re.sub(r'[^A-Za-z0-9_.-]', '_', stage.name)}.png"
        grid_image(stage).save(path, format="PNG")
        paths.append(path)
    log.info("wrote %d feature-map grids to %s", len(paths), out_dir)
    return paths
