"""Regularizers and the parameter bookkeeping they need.

L1 is a loss term; L2 is decoupled weight decay applied only to weights (norm
layers and biases excluded, as in timm and torchvision's reference scripts);
mixup/cutmix come from torchvision.transforms.v2; freezing covers linear
probing, head-first fine-tuning and frozen batch-norm statistics.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torchvision.transforms import v2

from training.config import RegularizationConfig

_NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def l1_penalty(model: nn.Module) -> torch.Tensor:
    """Sum of |w| over trainable weights (the lecture's lambda * sum |w_i|)."""
    terms = [p.abs().sum() for p in model.parameters() if p.requires_grad]
    return torch.stack(terms).sum() if terms else torch.zeros(())


def no_decay_names(model: nn.Module) -> set[str]:
    """Biases and every parameter of a normalisation layer: decaying them only hurts."""
    names = set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            full = f"{module_name}.{param_name}" if module_name else param_name
            if isinstance(module, _NORM_TYPES) or param.ndim <= 1:
                names.add(full)
    return names


def is_head(name: str, head: Iterable[str]) -> bool:
    return any(name == h or name.startswith(h + ".") for h in head)


def param_groups(
    model: nn.Module, weight_decay: float, lr: float, head: list[str], backbone_lr_mult: float = 1.0
) -> list[dict]:
    """Optimizer groups: (head | backbone) x (decay | no decay), each with its own lr.

    All parameters are in the optimizer from the start, so freezing and
    unfreezing never rebuild it and a resumed run restores one optimizer state.
    """
    skip = no_decay_names(model)
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        groups.setdefault((is_head(name, head), name in skip), []).append(param)
    out = []
    for (in_head, no_decay), params in sorted(groups.items()):
        out.append({
            "params": params,
            "lr": lr if in_head or not head else lr * backbone_lr_mult,
            "weight_decay": 0.0 if no_decay else weight_decay,
            "name": f"{'head' if in_head else 'backbone'}/{'no_decay' if no_decay else 'decay'}",
        })
    return out


def set_backbone_frozen(model: nn.Module, head: list[str], frozen: bool) -> None:
    for name, param in model.named_parameters():
        if not is_head(name, head):
            param.requires_grad_(not frozen)


def apply_train_mode(model: nn.Module, head: list[str], backbone_frozen: bool, freeze_bn: bool) -> None:
    """model.train(), but batch norm stays in eval mode where its statistics must not move."""
    model.train()
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and (
            freeze_bn or (backbone_frozen and not is_head(name, head))
        ):
            module.eval()


def batch_mixer(cfg: RegularizationConfig, num_classes: int) -> v2.Transform | None:
    """Mixup and/or cutmix on a batch: one of them, chosen at random, as in the reference scripts."""
    mixers: list[v2.Transform] = []
    if cfg.mixup_alpha > 0:
        mixers.append(v2.MixUp(alpha=cfg.mixup_alpha, num_classes=num_classes))
    if cfg.cutmix_alpha > 0:
        mixers.append(v2.CutMix(alpha=cfg.cutmix_alpha, num_classes=num_classes))
    if not mixers:
        return None
    return mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)
