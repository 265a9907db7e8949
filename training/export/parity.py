"""Does ONNX Runtime compute what PyTorch computes? Parity, batch invariance, and ORT metrics.

Parity compares logits on real images, through the serving side's preprocessing, at batch sizes
1, 7 and 32. The limit scales with the logits: ``max |diff| <= rtol * max(1, max |logit|)``. A
fixed absolute limit (1e-4 until 0.1) refused correct models on CPUs without AVX-512, whose
float32 kernels round differently: 1.8e-4 on logits of 9 (2e-5 relative). Broken exports are
orders of magnitude further off: one weight tensor scaled by 1.01 moves LeNet-5's logits by
1.7e-3 relative, train-mode BatchNorm Lite0's by 0.7. ``PARITY_RTOL`` sits between the two,
25x above the rounding measured and 3x below the smallest break planted by the tests.

Top-1 must be identical too, except on an image whose two best PyTorch logits are closer than the
tolerance: that tie is rounding's to break either way, so it is counted in the figures, not failed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from service.manifest import ParityCheck
from service.preprocessing import PreprocessSpec, image_to_tensor
from service.runtime import create_session, run_logits
from training.data import Sample
from training.evaluation import classification_report
from training.export.errors import ExportError

PARITY_BATCH_SIZES = (1, 7, 32)
MIN_PARITY_IMAGES = max(PARITY_BATCH_SIZES)  # one full batch of the largest size
PARITY_RTOL = 5e-4
INVARIANCE_ATOL = 1e-5  # relative as well: times max(1, max |logit|)


def preprocess_all(images: Sequence[bytes], spec: PreprocessSpec) -> np.ndarray:
    """Images as one float32 batch, through exactly the serving side's preprocessing."""
    return np.stack([image_to_tensor(data, spec) for data in images])


def images_digest(images: Sequence[bytes]) -> str:
    """Which images were checked, in order: sha256 over each image's sha256."""
    digest = hashlib.sha256()
    for data in images:
        digest.update(hashlib.sha256(data).hexdigest().encode() + b"\n")
    return digest.hexdigest()


def parity_tolerance(reference: np.ndarray, rtol: float = PARITY_RTOL) -> float:
    """The limit on max |logit diff|: relative to the largest logit, never below ``rtol`` itself."""
    return rtol * max(1.0, float(np.abs(reference).max()))


def check_parity(model: nn.Module, path: Path, batch: np.ndarray, *, rtol: float = PARITY_RTOL) -> ParityCheck:
    """ORT vs PyTorch (eval mode) on the same tensors, at several batch sizes; and batch invariance."""
    if len(batch) < MIN_PARITY_IMAGES:
        raise ExportError(f"parity needs at least {MIN_PARITY_IMAGES} images, got {len(batch)}")
    with torch.no_grad():
        reference = model.eval()(torch.from_numpy(batch)).float().numpy()
    tolerance = parity_tolerance(reference, rtol)
    top2 = np.sort(reference, axis=1)[:, -2:] if reference.shape[1] > 1 else np.zeros((len(reference), 2))
    tied = (top2[:, 1] - top2[:, 0]) <= tolerance  # rounding within the limit may swap these two
    session = create_session(path)
    diffs: dict[str, float] = {}
    agreement = 1.0
    for size in PARITY_BATCH_SIZES:
        out = np.concatenate([run_logits(session, batch[i:i + size]) for i in range(0, len(batch), size)])
        diff = float(np.abs(out - reference).max())
        same = out.argmax(1) == reference.argmax(1)
        diffs[str(size)] = diff
        agreement = min(agreement, float(same.mean()))
        if diff > tolerance or not np.all(same | tied):
            raise ExportError(
                f"ONNX Runtime disagrees with PyTorch at batch size {size}: max |logit diff| {diff:.2e} "
                f"(limit {tolerance:.2e} = {rtol:g} x max(1, max |logit| {float(np.abs(reference).max()):.3g})), "
                f"top-1 agreement {float(same.mean()):.3f} on {len(batch)} images"
            )
    return ParityCheck(
        images=len(batch), batch_sizes=list(PARITY_BATCH_SIZES), rtol=rtol, tolerance=tolerance,
        max_abs_logit=float(np.abs(reference).max()), max_abs_logit_diff=diffs, top1_agreement=agreement,
        top1_near_ties=int(tied.sum()), batch_invariance_max_diff=check_batch_invariance(session, batch),
    )


def check_batch_invariance(session: Any, batch: np.ndarray, atol: float = INVARIANCE_ATOL) -> float:
    """An image alone and inside a batch must give the same output."""
    alone = np.concatenate([run_logits(session, batch[i:i + 1]) for i in range(len(batch))])
    together = run_logits(session, batch)
    diff = float(np.abs(alone - together).max())
    if diff > atol * max(1.0, float(np.abs(alone).max())) or not np.array_equal(alone.argmax(1), together.argmax(1)):
        raise ExportError(f"outputs depend on the batch: an image alone and in a batch differ by {diff:.2e}")
    return diff


def legacy_parity(check: ParityCheck | None) -> dict[str, Any]:
    """The figures in the manifest's older ``export.parity`` shape, as older readers know it."""
    if check is None:
        return {}
    out: dict[str, Any] = {"images": check.images, "max_abs_logit_diff": dict(check.max_abs_logit_diff),
                           "batch_invariance_max_diff": check.batch_invariance_max_diff}
    if check.variant_batch_invariance_max_diff is not None:
        out["variant_batch_invariance_max_diff"] = check.variant_batch_invariance_max_diff
    return out


def onnx_logits(path: Path, samples: Sequence[Sample], spec: PreprocessSpec) -> np.ndarray:
    """Logits of ONNX Runtime on this file for labelled images, through the shared preprocessing."""
    session = create_session(path)
    return np.concatenate([
        run_logits(session, preprocess_all([s.read() for s in samples[i:i + 64]], spec))
        for i in range(0, len(samples), 64)
    ])


def evaluate_onnx(path: Path, samples: Sequence[Sample], spec: PreprocessSpec, labels: list[str]) -> dict[str, Any]:
    """The version's own accuracy: ORT on this file, the shared preprocessing, the validation split."""
    targets = torch.tensor([s.label for s in samples])
    return classification_report(torch.from_numpy(onnx_logits(path, samples, spec)), targets, labels)
