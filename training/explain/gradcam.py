"""Grad-CAM with torch autograd on a run's model: the reference the numpy serving path is tested against.

The feature map is taken with a forward hook on the original model (not the
export wrapper), so a wrong split in :mod:`training.explain.heads` shows up as
a disagreement.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from service.cam import ExplainTarget, resolve_target
from service.explainer import prepare
from service.overlay import overlay_png
from service.preprocessing import PreprocessSpec


@dataclass
class TorchGradCam:
    logits: np.ndarray  # (N, K)
    features: np.ndarray  # (N, C, h, w): the hooked layer's output
    raw: np.ndarray  # (N, h, w) signed, before the ReLU
    maps: np.ndarray  # (N, H, W) in [0, 1] over the input


def torch_gradcam(model: nn.Module, layer: str, x: torch.Tensor, targets: Sequence[int] | None = None) -> TorchGradCam:
    """Selvaraju et al.: weights = spatial mean of d logit_c / d A, map = ReLU(sum_k w_k A_k), upsampled."""
    model.eval()
    saved: list[torch.Tensor] = []
    handle = model.get_submodule(layer).register_forward_hook(lambda _m, _i, out: saved.append(out))
    try:
        with torch.enable_grad():
            x = x.detach().clone().requires_grad_(True)  # frozen weights must not cut the graph
            logits = model(x)
            idx = logits.argmax(1) if targets is None else torch.as_tensor(list(targets))
            score = logits.gather(1, idx[:, None]).sum()
            (grad,) = torch.autograd.grad(score, saved[-1])
    finally:
        handle.remove()
    feats = saved[-1].detach()
    raw = (grad.mean(dim=(2, 3), keepdim=True) * feats).sum(1)
    up = F.interpolate(F.relu(raw)[:, None], size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    top = up.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
    maps = torch.where(top > 1e-12, up / top, torch.zeros_like(up))
    return TorchGradCam(logits.detach().numpy(), feats.numpy(), raw.detach().numpy(), maps.numpy())


@dataclass
class ImageExplanation:
    target: ExplainTarget
    heatmap: np.ndarray  # (H, W) in [0, 1] over the crop
    crop: Image.Image  # the model's input crop, as the model saw it
    crop_box: tuple[float, float, float, float]  # where the crop lies in the upright image

    def png(self, alpha: float = 0.5) -> bytes:
        return overlay_png(self.crop, self.heatmap, alpha)


def explain_image(
    model: nn.Module, layer: str, data: bytes, spec: PreprocessSpec, labels: Sequence[str],
    target: str | int | None = None, temperature: float = 1.0,
) -> ImageExplanation:
    """``imgclf explain RUN_DIR IMAGE``: torch Grad-CAM of one image at ``layer`` (see heads.feature_layer).

    The target's score is the softmax at ``temperature`` (a run's calibration), as the service scores it.
    """
    image = prepare(data, spec)  # the serving side's crop and crop box (in the photo's pixels, even after a draft)
    x = torch.from_numpy(image.tensor)[None]
    with torch.no_grad():
        probs = torch.softmax(model.eval()(x) / temperature, 1)[0].numpy()
    index = resolve_target(target, labels, probs)
    result = torch_gradcam(model, layer, x, [index])
    return ImageExplanation(
        target=ExplainTarget(label=labels[index], index=index, score=float(probs[index])),
        heatmap=result.maps[0], crop=image.crop, crop_box=image.crop_box,
    )


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Correlation of two maps (1.0 for identical shapes up to scale); nan when either is constant."""
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    a, b = a - a.mean(), b - b.mean()
    denom = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / denom) if denom > 0 else float("nan")
