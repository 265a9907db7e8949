"""One image's explanation with ONNX Runtime and numpy: what ``POST /explain`` and ``imgclf explain NAME`` share.

The steps: decode and crop exactly as classification does (the crop is kept: the PNG is drawn over it),
run the graph for ``(logits, features)``, pick the target (default: top-1), then

- ``cam`` / ``gradcam``: backpropagate the target's logit through the head the manifest describes
  (:class:`service.cam.Head`, numpy) and weight the feature map with it;
- ``occlusion`` (no head recorded, or a manifest written before explanations): hide patches and measure
  the drop of the target's probability, in batches.

The model step is a parameter (``run`` / ``probabilities``), so the HTTP side can send it through its
batching queue while the CLI calls ONNX Runtime directly; everything else is the same code.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from service.cam import (
    ExplainError,
    ExplainSpec,
    ExplainTarget,
    Explanation,
    Head,
    Heatmap,
    heatmaps,
    occlusion,
    resolve_target,
)
from service.manifest import Manifest
from service.overlay import crop_box, overlay_png
from service.preprocessing import (
    DecodeLimits,
    ImageTooLargeError,
    PreprocessSpec,
    decode_for_spec,
    detect_format,
    resize_and_crop,
    to_array,
)
from service.runtime import LOGITS, OnnxModel, softmax

log = logging.getLogger(__name__)

DECIMALS = 4  # heatmap values in JSON: 1e-4 steps, finer than the PNG's 1/255
# Every value in [0, 1] as the same 6 bytes ("0.1234", "1.0000"): the map is written by indexing this table.
_DIGITS = np.frombuffer("".join(f"{i / 10**DECIMALS:.{DECIMALS}f}" for i in range(10**DECIMALS + 1)).encode(),
                        np.uint8).reshape(10**DECIMALS + 1, DECIMALS + 2)
OCCLUSION_NOTE = "no explanation recorded at export (an older manifest): occlusion, forward passes only"


def explain_spec(manifest: Manifest) -> ExplainSpec:
    """The manifest's method; a manifest without one (written before explanations) is explained by occlusion."""
    return manifest.explain or ExplainSpec(method="occlusion", exact=False, note=OCCLUSION_NOTE)


def load_head(manifest: Manifest, directory: Path | None) -> Head:
    """The head's arrays from the version directory, read once and checked against the manifest's sha256.

    The repository verified every file when the model was loaded; the head is read later (on the first
    explanation), so its bytes are checked again rather than trusted.
    """
    spec = explain_spec(manifest)
    if spec.head_file is None:
        raise ExplainError(f"{manifest.name}:{manifest.version} has no head file ({spec.method})")
    entry = manifest.files.get(spec.head_file)
    if directory is None or entry is None:
        where = "the model was loaded from bytes" if directory is None else "the manifest does not list it"
        raise ExplainError(f"cannot read head file {spec.head_file}: {where}")
    try:
        data = (Path(directory) / spec.head_file).read_bytes()
    except OSError as exc:
        raise ExplainError(f"cannot read head file {spec.head_file}: {exc}") from exc
    if hashlib.sha256(data).hexdigest() != entry.sha256:
        raise ExplainError(f"head file {spec.head_file} does not match the manifest's sha256")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as exc:
        raise ExplainError(f"cannot read head file {spec.head_file}: {exc}") from exc
    return Head(spec, arrays)


def check_target(target: str | int | None, labels: Sequence[str]) -> None:
    """Refuse a bad target before any work, naming what is allowed (ExplainError)."""
    if target is None:
        return
    try:
        resolve_target(target, labels, np.zeros(len(labels)))
    except ExplainError as exc:
        raise ExplainError(f"{exc}; give one of the model's {len(labels)} labels or an index in "
                           f"0..{len(labels) - 1}") from None


@dataclass(frozen=True)
class PreparedImage:
    """The model's input for one image, the crop it was made from, and where that crop lies in the photo."""

    tensor: np.ndarray  # (C, H, W) float32, exactly what /classify feeds the model
    crop: Image.Image
    crop_box: tuple[float, float, float, float]  # left, top, right, bottom in the upright image's pixels


def _upright_size(data: bytes, decoded: Image.Image) -> tuple[int, int]:
    """The upright photo's size: a JPEG may have been decoded at 1/2..1/8 scale (draft), the client's is not."""
    fmt = detect_format(data)
    if fmt not in ("JPEG", "MPO"):
        return decoded.size  # only JPEG decodes at reduced scale
    try:
        with Image.open(io.BytesIO(data), formats=[fmt]) as img:
            width, height = img.size
            orientation = img.getexif().get(0x0112)  # what decoding applied (a broken EXIF block: none)
    except Exception:  # noqa: BLE001 - the pixels decoded; a broken header just means no rescaling
        return decoded.size
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def prepare(data: bytes, spec: PreprocessSpec, limits: DecodeLimits | None = None) -> PreparedImage:
    """Decode, crop and normalise as ``image_to_tensor`` does, keeping the crop (raises ImageInputError)."""
    upright = decode_for_spec(data, spec, limits)
    try:
        crop = resize_and_crop(upright, spec)
    except MemoryError as exc:
        raise ImageTooLargeError("image is too large to resize in the available memory") from exc
    left, top, right, bottom = crop_box(upright.width, upright.height, spec)
    width, height = _upright_size(data, upright)
    sx, sy = width / upright.width, height / upright.height
    return PreparedImage(to_array(crop, spec), crop, (left * sx, top * sy, right * sx, bottom * sy))


@dataclass(frozen=True)
class ExplainResult:
    """An explanation: the JSON fields of ``POST /explain`` and the map itself, with the crop to draw it on."""

    model: str
    version: int
    target: ExplainTarget
    method: str
    heatmap: np.ndarray  # (H, W) in [0, 1] over the crop
    crop: Image.Image
    crop_box: tuple[float, float, float, float]
    confident: bool | None = None  # the explained class's score against the model's threshold (service.selective)
    threshold: float | None = None

    def png(self, alpha: float = 0.5) -> bytes:
        """The colour-mapped heatmap over the crop."""
        return overlay_png(self.crop, self.heatmap, alpha)

    def explanation(self) -> Explanation:
        return Explanation(model=self.model, version=self.version, target=self.target,
                           method=self.method, heatmap=Heatmap.from_array(self.heatmap, DECIMALS),
                           crop_box=self.crop_box, confident=self.confident, threshold=self.threshold)

    def json_bytes(self) -> bytes:
        """The JSON body, same fields as :meth:`explanation`. The map's 50k numbers are written by numpy from
        a table of their digits: on the 2-core test machine 5 ms for a 224x224 map, where pydantic took 24."""
        q = np.clip(np.rint(np.asarray(self.heatmap, np.float64) * 10**DECIMALS), 0, 10**DECIMALS).astype(np.intp)
        height, width = q.shape
        cells = np.empty((height, width, DECIMALS + 3), np.uint8)
        cells[:, :, :-1] = _DIGITS[q]
        cells[:, :, -1] = ord(",")
        cells[:, -1, -1] = ord("]")  # each row: "[" + "v,v,...,v" + "]" + ","
        rows = np.empty((height, width * (DECIMALS + 3) + 2), np.uint8)
        rows[:, 0], rows[:, 1:-1], rows[:, -1] = ord("["), cells.reshape(height, -1), ord(",")
        values = rows.tobytes()[:-1]
        head = {"model": self.model, "version": self.version, "target": self.target.model_dump(),
                "method": self.method}
        tail = f', "confident": {json.dumps(self.confident)}, "threshold": {json.dumps(self.threshold)}'
        return (json.dumps(head)[:-1].encode() + f', "heatmap": {{"width": {width}, "height": {height}, '
                f'"values": ['.encode() + values + f']}}, "crop_box": {json.dumps(list(self.crop_box))}{tail}}}'.encode())


RunOutputs = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # (C, H, W) -> (logits (K,), features)
Probabilities = Callable[[np.ndarray], np.ndarray]  # (N, C, H, W) -> (N, K) calibrated


class Explainer:
    """One model version's explanation method, with what it needs (its head, read once)."""

    def __init__(self, model: OnnxModel) -> None:
        self.model = model
        self.spec = explain_spec(model.manifest)
        self.head = load_head(model.manifest, model.directory) if self.spec.method != "occlusion" else None

    @property
    def method(self) -> str:
        return self.spec.method

    @property
    def feature_output(self) -> str | None:
        return self.spec.feature_output if self.head is not None else None

    def check_target(self, target: str | int | None) -> None:
        check_target(target, self.model.manifest.labels)

    def _result(self, image: PreparedImage, probs: np.ndarray, index: int, heat: np.ndarray) -> ExplainResult:
        m = self.model.manifest
        return ExplainResult(m.name, m.version, ExplainTarget(label=m.labels[index], index=index,
                                                               score=float(probs[index])),
                             self.method, heat, image.crop, image.crop_box)

    def from_features(self, image: PreparedImage, logits: np.ndarray, features: np.ndarray,
                      target: str | int | None) -> ExplainResult:
        """CAM / Grad-CAM from one image's logits (K,) and feature map (C, h, w)."""
        assert self.head is not None, "occlusion models have no features to explain from"
        m = self.model.manifest
        probs = softmax(logits[None], m.temperature)[0]
        index = resolve_target(target, m.labels, probs)
        heat = heatmaps(self.head, features[None], [index], m.preprocessing.input_size)[0]
        return self._result(image, probs, index, heat)

    def by_occlusion(self, image: PreparedImage, probabilities: Probabilities, target: str | int | None,
                     batch_size: int) -> ExplainResult:
        """Forward-only: the unoccluded image rides in the first batch, its probabilities pick the target."""
        first = probabilities(image.tensor[None])[0]
        index = resolve_target(target, self.model.manifest.labels, first)
        heat = occlusion(probabilities, image.tensor, index, batch_size=batch_size)
        return self._result(image, first, index, heat)

    def explain(self, data: bytes, target: str | int | None = None, limits: DecodeLimits | None = None,
                batch_size: int = 32) -> ExplainResult:
        """Synchronously, straight on ONNX Runtime (the CLI; batch jobs)."""
        self.check_target(target)
        image = prepare(data, self.model.manifest.preprocessing, limits)
        if self.feature_output is None:
            return self.by_occlusion(image, self.model.probabilities, target, batch_size)
        logits, features = self.model.run([LOGITS, self.feature_output], image.tensor[None])
        return self.from_features(image, logits[0], features[0], target)
