"""A training run's best model, rebuilt for looking inside it (``imgclf explain RUN_DIR``, ``imgclf featuremaps``).

Only the checkpoint is read (architecture, config, classes, preprocessing, weights), not the run's
data: explaining one image must not need the dataset that trained the model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from service.preprocessing import PreprocessSpec
from training.config import ModelConfig, TrainConfig
from training.models import create_model


class RunError(ValueError):
    """The directory is not a finished training run (no checkpoints/best.pt)."""


@dataclass
class RunModel:
    model: nn.Module  # in eval mode
    arch: str
    spec: PreprocessSpec
    labels: list[str]
    temperature: float = 1.0  # the run's calibration (report.json), so scores read as the exported version's


def checkpoint_path(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints" / "best.pt"


def load_run(run_dir: Path) -> RunModel:
    """The run's best checkpoint as a model (no pretrained weights are fetched: they come from the file)."""
    path = checkpoint_path(run_dir)
    if not path.is_file():
        raise RunError(f"{run_dir} is not a training run: {path} does not exist")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    cfg = TrainConfig.model_validate(ckpt["config"])
    bundle = create_model(cfg.model.model_copy(update={"pretrained": False, "weights": None}), len(ckpt["classes"]))
    bundle.model.load_state_dict(ckpt["model"])
    report = Path(run_dir) / "report.json"
    temperature = json.loads(report.read_text()).get("temperature", 1.0) if report.is_file() else 1.0
    return RunModel(bundle.model.eval(), ckpt["arch"], PreprocessSpec.model_validate(ckpt["spec"]),
                    list(ckpt["classes"]), float(temperature))


def arch_model(arch: str, image_size: int | None = None, pretrained: bool = False) -> RunModel:
    """An architecture from the registry (ImageNet head when pretrained), for looking at its feature maps."""
    bundle = create_model(ModelConfig(arch=arch, image_size=image_size, pretrained=pretrained), 1000)
    return RunModel(bundle.model.eval(), arch, bundle.spec, [str(i) for i in range(1000)])
