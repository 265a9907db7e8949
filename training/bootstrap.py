"""The embedded default model: ImageNet-1k EfficientNet-Lite0, offline, registered as ``imagenet-lite0``.

A fresh machine serves a real, useful classifier without any training.
"""

from __future__ import annotations

import logging

import torch

from service.manifest import TrainingProvenance
from service.preprocessing import image_to_tensor
from service.repository import ModelRepository, ModelVersion
from training.config import ModelConfig
from training.export import ExportError, ExportSource, export
from training.models import create_model
from training.sample_images import photo_variants, real_photos

log = logging.getLogger(__name__)

NAME = "imagenet-lite0"
CATS = {281, 282, 285}  # tabby, tiger cat, Egyptian cat
ESPRESSO = 967


def imagenet_labels() -> list[str]:
    """The 1000 ImageNet class names that ship inside torchvision (no download)."""
    from torchvision.models import ResNet18_Weights

    return list(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


def bootstrap(repo: ModelRepository) -> ModelVersion | None:
    """Register the model once; make it production if the name has none. Idempotent."""
    if repo.versions(NAME):
        if "production" not in repo.aliases(NAME):
            repo.promote(NAME, repo.versions(NAME)[-1])
        log.info("%s already registered (versions %s); nothing to do", NAME, repo.versions(NAME))
        return None
    bundle = create_model(ModelConfig(arch="efficientnet_lite0", pretrained=True), 1000)
    model = bundle.model.eval()
    photos = real_photos()
    with torch.no_grad():
        top1 = {
            name: int(model(torch.from_numpy(image_to_tensor(photos[name], bundle.spec))[None]).argmax())
            for name in ("chelsea", "coffee")
        }
    if top1["chelsea"] not in CATS or top1["coffee"] != ESPRESSO:
        raise ExportError(f"ImageNet weights give wrong answers on reference photos ({top1}); not registering")
    views = photo_variants(32)
    source = ExportSource(
        model=model, spec=bundle.spec, labels=imagenet_labels(), architecture="efficientnet_lite0",
        check_images=views, check_images_from={"reference photo views": len(views)}, eval_samples=[],
        calibration_images=[], training=TrainingProvenance(weights_source=bundle.source),
    )
    version = export(source, repo, NAME)
    if "production" not in repo.aliases(NAME):
        repo.promote(NAME, version.manifest.version)
    return version

