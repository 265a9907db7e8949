"""Split each registered architecture at its last convolutional feature map A and write the rest as ops.

:func:`explain_head` returns what export needs: a module whose forward gives
``(logits, features)`` (ONNX Runtime returns both outputs), the
:class:`~service.cam.ExplainSpec` for the manifest and the head's arrays
for the ``.npz`` side file. The head modules are converted generically
(pooling, flatten, Linear, 1x1 Conv after pooling, activations, LayerNorm,
Dropout); an architecture whose head holds anything else gets ``occlusion``.

Which maps are exact (the logit is the spatial mean of the map plus a bias):
resnet18/50, efficientnet_b0, efficientnet_lite0 and simple_cnn (pooling then
Linear). Grad-CAM through a non-linear head (first-order, but the gradient is
exact): mobilenet_v3_* (pool, Linear, Hardswish, Linear), convnext_tiny (pool,
LayerNorm, Linear) and lenet5 (A = the 16x5x5 map before the last 5x5 conv, which
acts as flatten + Linear, then tanh and two Linear layers).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from service.cam import ExplainSpec, HeadOp
from service.preprocessing import PreprocessSpec

log = logging.getLogger(__name__)

FEATURE_OUTPUT = "features"
HEAD_FILE = "explain_head.npz"


class UnsupportedHeadError(ValueError):
    """The head contains a module this converter cannot write as ops."""


@dataclass(frozen=True)
class _Plan:
    feature_layer: str  # module whose output is A (hooked by the torch reference)
    body: tuple[str, ...]  # modules from the input to A, in forward order ("forward_features": timm's method)
    head: tuple[str, ...]  # modules from A to the logits, in forward order ("forward_head": timm's method)
    flatten_before_head: bool = False  # the model calls torch.flatten between pooling and its head


_RESNET = _Plan("layer4", ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"),
                ("avgpool", "fc"), flatten_before_head=True)
_TV_SEQ = _Plan("features", ("features",), ("avgpool", "classifier"), flatten_before_head=True)
_PLANS: dict[str, _Plan] = {
    "lenet5": _Plan("features.5", ("features.0", "features.1", "features.2", "features.3", "features.4",
                                   "features.5"), ("features.6", "features.7", "classifier")),
    "simple_cnn": _Plan("features", ("features",), ("pool", "classifier")),
    "resnet18": _RESNET,
    "resnet50": _RESNET,
    "mobilenet_v3_small": _TV_SEQ,
    "mobilenet_v3_large": _TV_SEQ,
    "efficientnet_b0": _TV_SEQ,
    "convnext_tiny": _Plan("features", ("features",), ("avgpool", "classifier")),
    "efficientnet_lite0": _Plan("bn2", ("forward_features",), ("forward_head",)),
}


class _Method(nn.Module):
    """Calls a named method of the wrapped model (timm's forward_features / forward_head)."""

    def __init__(self, model: nn.Module, method: str) -> None:
        super().__init__()
        self.model, self.method = model, method

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self.model, self.method)(x)


class FeaturesAndLogits(nn.Module):
    """``forward(x) -> (logits, features)``: the model split at A, same weights, same logits."""

    def __init__(self, body: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.body, self.head = body, head

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.body(x)
        return self.head(features), features


@dataclass
class ExplainHead:
    """What export writes: ``module`` (None for occlusion: export the plain model), spec and arrays."""

    module: FeaturesAndLogits | None
    spec: ExplainSpec
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    def save_arrays(self, directory: Path) -> Path | None:
        """Write the head file (plain npz, no pickles) into the version directory."""
        if self.spec.head_file is None:
            return None
        path = Path(directory) / self.spec.head_file
        np.savez(path, **self.arrays)
        return path


def _modules(model: nn.Module, names: tuple[str, ...]) -> list[nn.Module]:
    out: list[nn.Module] = []
    for name in names:
        if name in ("forward_features", "forward_head"):
            out.append(_Method(model, name))
        else:
            out.append(model.get_submodule(name))
    return out


def _head_modules(model: nn.Module, plan: _Plan, *, for_ops: bool) -> list[nn.Module]:
    """The head in forward order; for the op converter timm's forward_head is spelled out."""
    if plan.head == ("forward_head",) and for_ops:  # timm: global_pool -> F.dropout -> classifier
        return [model.global_pool, nn.Dropout(getattr(model, "drop_rate", 0.0)), model.classifier]  # type: ignore[list-item]
    mods = _modules(model, plan.head)
    if plan.flatten_before_head:
        mods.insert(1, nn.Flatten())
    return mods


class _Converter:
    """Walks head modules in order, tracking whether the running value is a map (C, h, w) or a vector."""

    def __init__(self, feature_shape: tuple[int, int, int]) -> None:
        self.shape: tuple[int, ...] = feature_shape
        self.ops: list[HeadOp] = []
        self.arrays: dict[str, np.ndarray] = {}

    def _linear(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        i = len(self.ops)
        self.arrays[f"op{i}.weight"] = weight.detach().float().cpu().numpy()
        if bias is not None:
            self.arrays[f"op{i}.bias"] = bias.detach().float().cpu().numpy()
        self.ops.append(HeadOp(op="linear", weight=f"op{i}.weight", bias=f"op{i}.bias" if bias is not None else None))
        self.shape = (weight.shape[0],)

    def _gap(self) -> None:
        if len(self.shape) == 3:
            self.ops.append(HeadOp(op="gap"))
            self.shape = (self.shape[0],)

    def add(self, m: nn.Module) -> None:
        from timm.layers import SelectAdaptivePool2d
        from torchvision.models.convnext import LayerNorm2d

        vector = len(self.shape) == 1
        acts = {nn.ReLU: "relu", nn.Hardswish: "hardswish", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid"}
        if isinstance(m, nn.Sequential):
            for child in m:
                self.add(child)
        elif (isinstance(m, nn.AdaptiveAvgPool2d) and m.output_size in (1, (1, 1))) or (
            isinstance(m, SelectAdaptivePool2d) and m.pool_type == "avg"
        ):
            self._gap()
        elif isinstance(m, nn.Flatten):
            if not vector:
                self.ops.append(HeadOp(op="flatten"))
                self.shape = (int(np.prod(self.shape)),)
        elif isinstance(m, nn.Linear) and vector:
            self._linear(m.weight, m.bias)
        elif isinstance(m, nn.Conv2d) and m.groups == 1 and self._conv_is_linear(m):
            if not vector:  # the kernel covers the whole map: flatten, then a Linear with the kernel as rows
                self.ops.append(HeadOp(op="flatten"))
            self._linear(m.weight.reshape(m.out_channels, -1), m.bias)
        elif type(m) in acts:
            self.ops.append(HeadOp(op=acts[type(m)]))  # type: ignore[arg-type]
        elif isinstance(m, nn.GELU):
            self.ops.append(HeadOp(op="gelu" if m.approximate == "none" else "gelu_tanh"))
        elif isinstance(m, nn.Dropout):
            self.ops.append(HeadOp(op="dropout"))
        elif isinstance(m, nn.Identity):
            pass
        elif isinstance(m, nn.LayerNorm | LayerNorm2d) and vector and tuple(m.normalized_shape) == self.shape:
            i = len(self.ops)
            names = {}
            for part in ("weight", "bias"):
                t = getattr(m, part)
                if t is not None:
                    self.arrays[f"op{i}.{part}"] = t.detach().float().cpu().numpy()
                    names[part] = f"op{i}.{part}"
            self.ops.append(HeadOp(op="layernorm", eps=m.eps, **names))
        else:
            raise UnsupportedHeadError(f"cannot write {type(m).__name__} (on a value of shape {self.shape}) as an op")

    def _conv_is_linear(self, m: nn.Conv2d) -> bool:
        """1x1 conv on a pooled vector, or a valid conv whose kernel is exactly the map (LeNet-5's C5)."""
        if len(self.shape) == 1:
            return m.kernel_size == (1, 1) and m.in_channels == self.shape[0]
        c, h, w = self.shape
        return (m.in_channels, *m.kernel_size) == (c, h, w) and m.padding in ((0, 0), "valid")


def _is_affine(ops: list[HeadOp]) -> bool:
    """CAM is exact when A is pooled first and nothing after it bends (an affine map of the pooled vector)."""
    return bool(ops) and ops[0].op == "gap" and all(o.op in ("linear", "dropout", "flatten") for o in ops[1:])


def occlusion_spec(note: str) -> ExplainSpec:
    return ExplainSpec(method="occlusion", exact=False, note=note)


def explain_head(arch: str, model: nn.Module, spec: PreprocessSpec) -> ExplainHead:
    """Split ``model`` (an ``arch`` from the registry, put in eval mode) at its input size ``spec.input_size``.

    The returned module's logits equal the model's (same modules, same order); export should still
    compare them on its check images and use ``occlusion`` if they differ.
    """
    plan = _PLANS.get(arch)
    if plan is None:
        return ExplainHead(None, occlusion_spec(f"no feature-map split is known for {arch}"))
    model.eval()
    body = nn.Sequential(*_modules(model, plan.body))
    module = FeaturesAndLogits(body, nn.Sequential(*_head_modules(model, plan, for_ops=False))).eval()
    with torch.no_grad():
        a = body(torch.zeros(1, spec.channels, *spec.input_size))
    feature_shape = (int(a.shape[1]), int(a.shape[2]), int(a.shape[3]))
    conv = _Converter(feature_shape)
    try:
        for m in _head_modules(model, plan, for_ops=True):
            conv.add(m)
    except UnsupportedHeadError as exc:
        log.warning("%s: %s; explanations fall back to occlusion", arch, exc)
        return ExplainHead(None, occlusion_spec(f"head not expressible as ops: {exc}"))
    exact = _is_affine(conv.ops)
    note = ("CAM: pooling then affine layers; the logit is the map's mean plus a bias" if exact else
            "Grad-CAM with the exact gradient of a non-linear head (first-order attribution)")
    spec = ExplainSpec(
        method="cam" if exact else "gradcam", exact=exact, feature_output=FEATURE_OUTPUT,
        feature_layer=plan.feature_layer, feature_shape=feature_shape, head_file=HEAD_FILE,
        head=conv.ops, note=note,
    )
    return ExplainHead(module, spec, conv.arrays)


def feature_layer(arch: str) -> str | None:
    """The module whose output is A for ``arch`` (None: occlusion only)."""
    plan = _PLANS.get(arch)
    return plan.feature_layer if plan else None
