"""Bytes -> tensor transforms for training and evaluation.

Evaluation is exactly the serving path (``image_to_tensor``). Training decodes
the same way, then augments with torchvision.transforms.v2 before the same
normalisation, so the only difference between the two is the augmentation.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2

from service.preprocessing import (
    PreprocessSpec,
    decode_for_spec,
    image_to_tensor,
    resize_and_crop,
    to_array,
)
from training.config import AugmentConfig

Transform = Callable[[bytes], torch.Tensor]


def eval_transform(spec: PreprocessSpec) -> Transform:
    def transform(data: bytes) -> torch.Tensor:
        return torch.from_numpy(image_to_tensor(data, spec))

    return transform


def train_transform(spec: PreprocessSpec, aug: AugmentConfig) -> Transform:
    geometric: list[Callable[[Image.Image], Image.Image]] = []
    if aug.random_resized_crop:
        geometric.append(
            v2.RandomResizedCrop(spec.input_size, scale=aug.scale, interpolation=InterpolationMode(spec.interpolation))
        )
    else:
        geometric.append(partial(resize_and_crop, spec=spec))
    if aug.hflip > 0:
        geometric.append(v2.RandomHorizontalFlip(aug.hflip))
    if aug.policy == "trivial":
        geometric.append(v2.TrivialAugmentWide(interpolation=InterpolationMode.BILINEAR))
    elif aug.policy == "randaugment":
        geometric.append(v2.RandAugment(interpolation=InterpolationMode.BILINEAR))
    if aug.color_jitter > 0:
        j = aug.color_jitter
        geometric.append(v2.ColorJitter(brightness=j, contrast=j, saturation=j if spec.channels == 3 else 0))
    pil_ops = v2.Compose(geometric)
    erase = v2.RandomErasing(p=aug.random_erasing) if aug.random_erasing > 0 else None

    def transform(data: bytes) -> torch.Tensor:
        img = decode_for_spec(data, spec)
        tensor = torch.from_numpy(to_array(pil_ops(img), spec))
        return erase(tensor) if erase is not None else tensor

    return transform
