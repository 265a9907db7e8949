"""The training configuration: one validated object that holds every hyperparameter.

Resolution order, lowest first: field defaults < the architecture's recipe
(``training/recipes/<arch>.yaml``, like the per-model commands of torchvision's
reference scripts) < the user's YAML file < command-line flags. The resolved
object is saved in the run directory, so a run can be repeated or resumed.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class _Section(BaseModel):
    """Base of every config section, training and pipeline alike.

    Unknown keys are errors: a typo in a YAML file must not be silently ignored.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    source: str = Field(
        default="digits",
        description="'digits', an ImageFolder directory (with or without train/val/test), or a CSV manifest",
    )
    val_fraction: float = Field(default=0.2, gt=0, lt=1, description="held out when the data has no val split")
    split_seed: int | None = Field(default=None, description="seed of the stratified split; default: run seed")
    class_balance: Literal["none", "loss", "sampler"] = Field(
        default="none", description="counter class imbalance with a weighted loss or a weighted sampler"
    )
    num_workers: int = Field(default=0, ge=0, description="DataLoader worker processes")


class ModelConfig(_Section):
    arch: str = Field(default="lenet5", description="a name from `training.models.list_models()`")
    pretrained: bool = False
    weights: Path | None = Field(default=None, description="local weights file instead of a download")
    image_size: int | None = Field(default=None, gt=0, description="square input size; default: the model's")
    crop_pct: float | None = Field(default=None, gt=0, le=1, description="eval centre-crop fraction")
    dropout: float | None = Field(default=None, ge=0, lt=1, description="dropout before the classifier")
    drop_path: float | None = Field(default=None, ge=0, lt=1, description="stochastic depth rate")
    # simple_cnn only: the lecture's knobs for building a CNN from config.
    channels: list[int] = Field(default=[32, 64], min_length=1)
    kernel_size: int = Field(default=3, ge=1)
    padding: int | Literal["same"] = "same"
    stride: int = Field(default=1, ge=1)
    dilation: int = Field(default=1, ge=1)
    activation: Literal["relu", "tanh", "sigmoid", "gelu"] = "relu"
    pooling: Literal["max", "avg", "none"] = "max"
    batch_norm: bool = True
    color_mode: Literal["RGB", "L"] = "RGB"


class AugmentConfig(_Section):
    """Training-time augmentation (torchvision.transforms.v2); evaluation never augments."""

    random_resized_crop: bool = False
    scale: tuple[float, float] = (0.08, 1.0)
    hflip: float = Field(default=0.0, ge=0, le=1)
    policy: Literal["none", "trivial", "randaugment"] = "none"
    color_jitter: float = Field(default=0.0, ge=0)
    random_erasing: float = Field(default=0.0, ge=0, le=1)


class RegularizationConfig(_Section):
    l1: float = Field(default=0.0, ge=0, description="lambda of the L1 penalty added to the loss")
    weight_decay: float = Field(default=0.0, ge=0, description="decoupled L2; norm and bias params excluded")
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)
    mixup_alpha: float = Field(default=0.0, ge=0)
    cutmix_alpha: float = Field(default=0.0, ge=0)
    grad_clip_norm: float | None = Field(default=None, gt=0)


class OptimConfig(_Section):
    optimizer: Literal["sgd", "adamw"] = "adamw"
    lr: float = Field(default=1e-3, gt=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    lr_scaling: Literal["none", "linear"] = Field(
        default="none", description="linear: the rate used is lr x batch_size / lr_reference_batch (Goyal et al., "
        "2017), so a recipe tuned at one global batch carries over to a larger one")
    lr_reference_batch: int = Field(default=256, ge=1, description="linear: the global batch that lr was tuned for")

    @model_validator(mode="after")
    def _check(self) -> OptimConfig:
        if self.nesterov and (self.optimizer != "sgd" or self.momentum == 0):
            raise ValueError("nesterov needs optimizer 'sgd' with momentum > 0")
        return self


class ScheduleConfig(_Section):
    name: Literal["constant", "cosine", "step", "onecycle", "plateau"] = "cosine"
    warmup_epochs: float = Field(default=0.0, ge=0)
    min_lr_ratio: float = Field(default=0.0, ge=0, le=1, description="cosine floor as a fraction of lr")
    step_size: int = Field(default=10, ge=1, description="step: epochs between decays")
    gamma: float = Field(default=0.1, gt=0, le=1, description="step/plateau: decay factor")
    plateau_patience: int = Field(default=2, ge=0)


class TransferConfig(_Section):
    strategy: Literal["full", "linear_probe", "fine_tune"] = "full"
    head_epochs: int = Field(default=1, ge=0, description="fine_tune: epochs with the backbone frozen")
    backbone_lr_mult: float = Field(default=0.1, gt=0, le=1, description="fine_tune: backbone lr / head lr")
    freeze_bn: bool = Field(default=False, description="keep batch-norm running statistics frozen")


class EarlyStoppingConfig(_Section):
    enabled: bool = False
    monitor: Literal["val_loss", "val_top1"] = "val_loss"
    patience: int = Field(default=5, ge=1)
    min_delta: float = Field(default=0.0, ge=0)


class DistributedConfig(_Section):
    """Only read when several processes train (torchrun, ``imgclf train --nproc``)."""

    sync_batchnorm: bool = Field(default=False, description="batch-norm statistics over the global batch "
                                 "(SyncBatchNorm; CUDA only) instead of each process's share")


class TrainConfig(_Section):
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    augment: AugmentConfig = AugmentConfig()
    regularization: RegularizationConfig = RegularizationConfig()
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    transfer: TransferConfig = TransferConfig()
    early_stopping: EarlyStoppingConfig = EarlyStoppingConfig()
    distributed: DistributedConfig = DistributedConfig()
    epochs: int = Field(default=15, ge=1)
    batch_size: int = Field(default=64, ge=1, description="the global batch: with N processes each takes 1/N")
    seed: int = 0
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    amp: Literal["auto", "off", "bf16", "fp16"] = Field(default="auto", description="mixed precision (CUDA only)")

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.model.weights is not None and not self.model.pretrained:
            raise ValueError("model.weights is given but model.pretrained is false; set pretrained: true")
        return self


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key and what is allowed."""


def format_validation_error(exc: ValidationError, what: str = "training config") -> str:
    """One line per bad key (dotted path: message, allowed values), under ``invalid <what>:``."""
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(config)"
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        ctx = err.get("ctx") or {}
        if "expected" in ctx:
            msg = f"{msg} (allowed: {ctx['expected']})"
        lines.append(f"{key}: {msg}")
    return f"invalid {what}:\n  " + "\n  ".join(lines)


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def recipe_for(arch: str, pretrained: bool) -> dict[str, Any]:
    """The architecture's default recipe; pretrained and from-scratch runs may differ."""
    path = resources.files("training") / "recipes" / f"{arch}.yaml"
    if not path.is_file():
        return {}
    recipe = yaml.safe_load(path.read_text()) or {}
    base = {k: v for k, v in recipe.items() if k not in ("pretrained", "scratch")}
    return deep_merge(base, recipe.get("pretrained" if pretrained else "scratch") or {})


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping of keys to values")
    return data


def resolve_config(file: Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults < recipe < file < overrides, validated once at the end."""
    user = deep_merge(read_yaml(file) if file else {}, overrides or {})
    model = user.get("model", {}) if isinstance(user.get("model"), dict) else {}
    arch = model.get("arch", ModelConfig().arch)
    pretrained = bool(model.get("pretrained", False))
    merged = deep_merge(recipe_for(str(arch), pretrained), user)
    try:
        return TrainConfig.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from exc


def save_config(cfg: TrainConfig, path: Path) -> None:
    from service.atomic import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
