"""Class activation maps at serving time, with numpy and Pillow only (no torch, no autograd).

ONNX Runtime cannot run gradients, so the gradient of a logit with respect to
the last convolutional feature map A (N, C, h, w) is computed here from the
*structure* of the classifier head: export writes the head after A as a short
list of ops (:class:`ExplainSpec`) plus an ``.npz`` of their arrays, and
:class:`Head` runs it forward and backpropagates through it exactly. With a
head of global average pooling and affine layers this is CAM (Zhou et al.
2016) and decomposes the logit exactly; with a non-linearity after pooling
(MobileNetV3, ConvNeXt, LeNet-5) it is Grad-CAM, a first-order attribution.
Models without a usable head fall back to :func:`occlusion` (forward-only,
batched).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator

OpName = Literal["gap", "flatten", "linear", "relu", "hardswish", "tanh", "sigmoid", "gelu", "gelu_tanh",
                 "layernorm", "dropout"]


class ExplainError(ValueError):
    """A bad target, a head file that does not fit its spec, or features of the wrong shape (a 4xx/5xx)."""


class HeadOp(BaseModel):
    """One op of the head after the feature map; ``weight``/``bias`` name arrays in the head file."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    op: OpName
    weight: str | None = None
    bias: str | None = None
    eps: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _check(self) -> HeadOp:
        if self.op == "linear" and self.weight is None:
            raise ValueError("a linear op needs a weight")
        if self.op == "layernorm" and self.eps is None:
            raise ValueError("a layernorm op needs eps")
        if self.op not in ("linear", "layernorm") and (self.weight or self.bias):
            raise ValueError(f"op {self.op} takes no arrays")
        return self


class ExplainSpec(BaseModel):
    """How to explain a model; travels in its manifest (the head file is covered by the sha256 list)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: Literal["cam", "gradcam", "occlusion"]
    exact: bool = Field(description="the map decomposes the logit exactly (CAM: pooling then affine layers)")
    feature_output: str | None = Field(default=None, description="ONNX graph output holding A (N, C, h, w)")
    feature_layer: str | None = Field(default=None, description="torch module whose output is A")
    feature_shape: tuple[int, int, int] | None = Field(default=None, description="(C, h, w) at the input size")
    head_file: str | None = Field(default=None, description="npz next to model.onnx with the head's arrays")
    head: list[HeadOp] = Field(default_factory=list)
    note: str = ""

    @model_validator(mode="after")
    def _check(self) -> ExplainSpec:
        gradient = self.method != "occlusion"
        if gradient and not (self.feature_output and self.feature_shape and self.head_file and self.head):
            raise ValueError(f"method {self.method} needs feature_output, feature_shape, head_file and head")
        if not gradient and (self.head or self.head_file or self.exact):
            raise ValueError("occlusion takes no head and is never exact")
        if self.head_file and (Path(self.head_file).name != self.head_file or not self.head_file.endswith(".npz")):
            raise ValueError("head_file must be a plain .npz file name")
        return self


def _erf(x: np.ndarray) -> np.ndarray:
    return np.vectorize(math.erf, otypes=[x.dtype])(x)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


_K = math.sqrt(2.0 / math.pi)


def _tanh_gelu_grad(x: np.ndarray) -> np.ndarray:
    t = np.tanh(_K * (x + 0.044715 * x**3))
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t**2) * _K * (1.0 + 3 * 0.044715 * x**2)


# op -> (f(x), f'(x)), with torch's conventions at the kinks (relu'(0) = 0, hardswish'(3) = 1.5)
_ACTS: dict[str, tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]] = {
    "relu": (lambda x: np.maximum(x, 0.0), lambda x: (x > 0).astype(x.dtype)),
    "hardswish": (lambda x: x * np.clip(x + 3.0, 0.0, 6.0) / 6.0,
                  lambda x: np.where(x < -3.0, 0.0, np.where(x <= 3.0, x / 3.0 + 0.5, 1.0))),
    "tanh": (np.tanh, lambda x: 1.0 - np.tanh(x) ** 2),
    "sigmoid": (_sigmoid, lambda x: _sigmoid(x) * (1.0 - _sigmoid(x))),
    "gelu": (lambda x: 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0))),
             lambda x: 0.5 * (1.0 + _erf(x / math.sqrt(2.0))) + x * np.exp(-0.5 * x**2) / math.sqrt(2.0 * math.pi)),
    "gelu_tanh": (lambda x: 0.5 * x * (1.0 + np.tanh(_K * (x + 0.044715 * x**3))), _tanh_gelu_grad),
    "dropout": (lambda x: x, np.ones_like),  # identity at inference
}


class Head:
    """The head after A, run forward and backpropagated in float32; shapes are checked once, at load."""

    def __init__(self, spec: ExplainSpec, arrays: dict[str, np.ndarray]) -> None:
        if spec.method == "occlusion" or spec.feature_shape is None:
            raise ExplainError("occlusion models have no head")
        self.spec = spec
        self.arrays = {k: np.asarray(v, dtype=np.float32) for k, v in arrays.items()}
        self.num_classes = self._check_shapes(spec.feature_shape)

    @classmethod
    def load(cls, spec: ExplainSpec, directory: Path) -> Head:
        """Read the head file (never pickles) next to the model."""
        if spec.head_file is None:
            raise ExplainError("this model has no head file")
        try:
            with np.load(Path(directory) / spec.head_file, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
        except (OSError, ValueError) as exc:
            raise ExplainError(f"cannot read head file {spec.head_file}: {exc}") from exc
        return cls(spec, arrays)

    def _array(self, name: str | None, shape: tuple[int, ...], what: str) -> None:
        arr = self.arrays.get(name or "")
        if name is not None and (arr is None or arr.shape != shape or not np.isfinite(arr).all()):
            raise ExplainError(f"head array {name!r} ({what}) is missing, not finite or not of shape {shape}")

    def _check_shapes(self, feature_shape: tuple[int, int, int]) -> int:
        shape: tuple[int, ...] = feature_shape
        for i, op in enumerate(self.spec.head):
            vector = len(shape) == 1
            if (op.op == "gap" and vector) or (op.op in ("linear", "layernorm") and not vector):
                raise ExplainError(f"op {i}: {op.op} cannot take a value of shape {shape}")
            if op.op in ("gap", "flatten"):
                shape = (shape[0],) if op.op == "gap" else (int(np.prod(shape)),)
            elif op.op == "linear":
                w = self.arrays.get(op.weight or "")
                if w is None or w.ndim != 2 or w.shape[1] != shape[0]:
                    raise ExplainError(f"op {i}: linear weight {op.weight!r} does not take {shape[0]} inputs")
                self._array(op.weight, w.shape, f"op {i} weight")
                shape = (w.shape[0],)
                self._array(op.bias, shape, f"op {i} bias")
            elif op.op == "layernorm":
                self._array(op.weight, shape, f"op {i} weight")
                self._array(op.bias, shape, f"op {i} bias")
        if len(shape) != 1:
            raise ExplainError("the head must end in a vector of logits")
        return shape[0]

    def _run(self, features: np.ndarray, stop: int) -> tuple[np.ndarray, list[np.ndarray]]:
        """Ops ``[:stop]``, keeping each op's input for the backward pass."""
        x = np.asarray(features, dtype=np.float32)
        if x.ndim != 4 or tuple(x.shape[1:]) != self.spec.feature_shape:
            raise ExplainError(f"features of shape {features.shape} do not fit {self.spec.feature_shape}")
        inputs = []
        for op in self.spec.head[:stop]:
            inputs.append(x)
            if op.op == "gap":
                x = x.mean(axis=(2, 3))
            elif op.op == "flatten":
                x = x.reshape(x.shape[0], -1)
            elif op.op == "linear":
                x = x @ self.arrays[op.weight].T + (self.arrays[op.bias] if op.bias else 0.0)  # type: ignore[index]
            elif op.op == "layernorm":
                mu, var = x.mean(axis=-1, keepdims=True), x.var(axis=-1, keepdims=True)
                x = (x - mu) / np.sqrt(var + op.eps)  # type: ignore[operator]
                x = x * (self.arrays[op.weight] if op.weight else 1.0) + (self.arrays[op.bias] if op.bias else 0.0)
            else:
                x = _ACTS[op.op][0](x)
        return x, inputs

    def forward(self, features: np.ndarray) -> np.ndarray:
        """Logits (N, K) from features (N, C, h, w): what the model's own head computes."""
        return self._run(features, len(self.spec.head))[0]

    def gradient(self, features: np.ndarray, targets: Sequence[int]) -> np.ndarray:
        """d logit[n, targets[n]] / d features[n]: exact backpropagation through the ops.

        The final Linear is never run: the gradient of logit t with respect to its input is row t of
        its weight, so a CAM head costs a row lookup, not a (K x C) product.
        """
        targets = np.asarray(targets, dtype=np.int64)
        n = np.shape(features)[0] if np.ndim(features) == 4 else -1
        if targets.shape != (n,) or targets.min() < 0 or targets.max() >= self.num_classes:
            raise ExplainError(f"targets {targets.tolist()} do not fit {n} images x {self.num_classes} classes")
        ops = self.spec.head
        if ops[-1].op == "linear":
            ops = ops[:-1]
            g = self.arrays[self.spec.head[-1].weight][targets]  # type: ignore[index]
        else:
            g = np.eye(self.num_classes, dtype=np.float32)[targets]
        _, inputs = self._run(features, len(ops))
        for op, x in zip(reversed(ops), reversed(inputs), strict=True):
            if op.op == "gap":
                g = np.broadcast_to(g[:, :, None, None] / (x.shape[2] * x.shape[3]), x.shape)
            elif op.op == "flatten":
                g = g.reshape(x.shape)
            elif op.op == "linear":
                g = g @ self.arrays[op.weight]  # type: ignore[index]
            elif op.op == "layernorm":
                rstd = 1.0 / np.sqrt(x.var(axis=-1, keepdims=True) + op.eps)  # type: ignore[operator]
                xhat = (x - x.mean(axis=-1, keepdims=True)) * rstd
                gx = g * (self.arrays[op.weight] if op.weight else 1.0)
                g = rstd * (gx - gx.mean(-1, keepdims=True) - xhat * (gx * xhat).mean(-1, keepdims=True))
            else:
                g = g * _ACTS[op.op][1](x)
        return np.ascontiguousarray(g)


def gradcam(head: Head, features: np.ndarray, targets: Sequence[int]) -> np.ndarray:
    """Signed Grad-CAM maps (N, h, w) before the ReLU: sum_k mean_xy(dy/dA_k) * A_k (= CAM / hw when exact)."""
    weights = head.gradient(features, targets).mean(axis=(2, 3))
    return np.einsum("nk,nkhw->nhw", weights, np.asarray(features, dtype=np.float32))


def normalise(values: np.ndarray) -> np.ndarray:
    """ReLU, then scale to [0, 1]; an all-zero (nothing positive) map stays zero."""
    m = np.maximum(np.asarray(values, dtype=np.float32), 0.0)
    top = float(m.max()) if m.size else 0.0
    return m / top if top > 0 else np.zeros_like(m)


def upsample(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a float map to (height, width), Pillow's mode "F" (no 8-bit rounding)."""
    img = Image.fromarray(np.ascontiguousarray(values, dtype=np.float32))  # float32 -> mode "F"
    return np.asarray(img.resize((size[1], size[0]), Image.Resampling.BILINEAR), dtype=np.float32)


def heatmaps(head: Head, features: np.ndarray, targets: Sequence[int], input_size: tuple[int, int]) -> np.ndarray:
    """The served maps (N, H, W) in [0, 1] over the model's input crop."""
    raw = gradcam(head, features, targets)
    return np.stack([normalise(upsample(np.maximum(r, 0.0), input_size)) for r in raw])


def occlusion(
    probabilities: Callable[[np.ndarray], np.ndarray],
    image: np.ndarray,
    target: int,
    *,
    patch: int | None = None,
    stride: int | None = None,
    fill: float = 0.0,
    batch_size: int = 32,
) -> np.ndarray:
    """Forward-only map (H, W) in [0, 1]: how much the target's probability drops when a patch is hidden.

    ``image`` is one preprocessed (C, H, W) tensor; ``fill`` 0 is the dataset mean after normalisation.
    All occluded copies go through ``probabilities`` in batches of ``batch_size`` (the unoccluded image rides
    in the first batch), so the cost is ceil((positions + 1) / batch_size) calls.
    """
    _, h, w = image.shape
    patch = patch or max(1, min(h, w) // 4)
    stride = stride or max(1, patch // 2)

    def starts(n: int) -> list[int]:
        s = list(range(0, max(n - patch, 0) + 1, stride))
        return s if s[-1] == max(n - patch, 0) else [*s, n - patch]

    boxes = [(y, x) for y in starts(h) for x in starts(w)]
    scores: list[np.ndarray] = []
    for lo in range(0, len(boxes) + 1, batch_size):
        chunk = []
        for i in range(lo, min(lo + batch_size, len(boxes) + 1)):
            copy = image.copy()
            if i > 0:
                y, x = boxes[i - 1]
                copy[:, y : y + patch, x : x + patch] = fill
            chunk.append(copy)
        scores.append(np.asarray(probabilities(np.stack(chunk).astype(np.float32)))[:, target])
    drops = np.concatenate(scores)
    heat, count = np.zeros((h, w), np.float64), np.zeros((h, w), np.float64)
    for (y, x), score in zip(boxes, drops[1:], strict=True):
        heat[y : y + patch, x : x + patch] += drops[0] - score
        count[y : y + patch, x : x + patch] += 1
    return normalise(heat / np.maximum(count, 1))


def resolve_target(target: str | int | None, labels: Sequence[str], scores: np.ndarray) -> int:
    """The class to explain: None -> top-1; a label (exact match first) or an index; else ExplainError."""
    if target is None:
        return int(np.argmax(scores))
    if isinstance(target, str):
        if target in labels:
            return list(labels).index(target)
        if not target.strip().lstrip("-").isdigit():
            raise ExplainError(f"unknown target label {target!r}")
        target = int(target)
    if isinstance(target, bool) or not 0 <= int(target) < len(labels):
        raise ExplainError(f"target index {target} is outside 0..{len(labels) - 1}")
    return int(target)


class ExplainTarget(BaseModel):
    label: str
    index: int
    score: float


class Heatmap(BaseModel):
    width: int
    height: int
    values: list[list[float]] = Field(description="row-major, in [0, 1], covering the model's input crop")

    @classmethod
    def from_array(cls, values: np.ndarray, decimals: int = 4) -> Heatmap:
        return cls(width=values.shape[1], height=values.shape[0], values=np.round(values, decimals).tolist())


class Explanation(BaseModel):
    """The JSON body of ``POST /explain``."""

    model: str
    version: int  # as /classify answers it
    target: ExplainTarget
    method: Literal["cam", "gradcam", "occlusion"]
    heatmap: Heatmap
    crop_box: tuple[float, float, float, float] = Field(description="left, top, right, bottom in the upright image")
    confident: bool | None = Field(default=None, description="whether the explained class's score clears the "
                                   "model's threshold (for the default target: whether the answer is confident); "
                                   "null: the model has none")
    threshold: float | None = None
