"""manifest.json: the contract between export and serving.

Like timm's ``pretrained_cfg`` taken all the way to the deployed artifact: a
version carries its labels, its preprocessing, its calibration and where it
came from, so the service needs nothing else to use it correctly.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from service.cam import ExplainSpec  # service.cam never imports the manifest: no cycle
from service.drift import DriftReference
from service.preprocessing.spec import PreprocessSpec
from service.selective import Selective

#: 2 adds optional fields (explanations, selective prediction, drift reference); version 1 files still load.
SCHEMA_VERSION = 2
NAME_PATTERN = re.compile(r"^[a-z0-9](?:[a-z0-9._-]{0,62}[a-z0-9])?$")


def validate_name(name: str) -> str:
    """Model names are one path segment from a strict set: no traversal, no absolute paths."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or ".." in name:
        raise ValueError(
            f"invalid model name {name!r}: use 1-64 lower-case letters, digits, '.', '_' or '-', "
            "starting and ending with a letter or digit"
        )
    return name


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class FileEntry(_Strict):
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)


class InputSpec(_Strict):
    name: str = "input"
    shape: list[int | str] = Field(description="e.g. ['batch', 3, 224, 224]; strings are symbolic")
    dtype: Literal["float32"] = "float32"


class OutputSpec(_Strict):
    name: str = "logits"
    shape: list[int | str]


class Metrics(_Strict):
    """Measured through ONNX Runtime on this very file, with the shared preprocessing."""

    split: str = "val"
    num_images: int = 0
    top1: float | None = None
    top5: float | None = None
    ece: float | None = Field(default=None, description="after temperature scaling")
    per_class_recall: dict[str, float] = Field(default_factory=dict)
    note: str | None = None


class TrainingProvenance(_Strict):
    run_dir: str | None = None
    config: dict[str, Any] | None = None
    seed: int | None = None
    dataset_fingerprint: str | None = None
    weights_source: str | None = None
    training_report: dict[str, Any] | None = Field(default=None, description="top1/top5/ECE as training saw them")


class ParityCheck(_Strict):
    """ONNX Runtime against PyTorch at export: on which images, within which limit, how close."""

    images: int = Field(ge=0, description="real images compared, through the shared preprocessing")
    image_sources: dict[str, int] = Field(
        default_factory=dict, description="how many came from each split: validation, then training or held-out "
        "when the validation split is too small")
    images_sha256: str | None = Field(default=None, description="sha256 over each checked image's sha256, in order")
    batch_sizes: list[int]
    rtol: float = Field(description="the limit is rtol * max(1, max |logit|)")
    tolerance: float = Field(description="the resulting limit on max |logit diff|")
    max_abs_logit: float
    max_abs_logit_diff: dict[str, float] = Field(description="per batch size")
    top1_agreement: float = Field(description="lowest share of identical top-1 over the batch sizes")
    top1_near_ties: int = Field(default=0, description="images whose two best logits are within the tolerance")
    batch_invariance_max_diff: float
    variant_batch_invariance_max_diff: float | None = None


class ExportProvenance(_Strict):
    exporter: Literal["dynamo", "torchscript"]
    opset: int
    precision: Literal["fp32", "fp16", "int8"] = "fp32"
    versions: dict[str, str]
    parity: dict[str, Any] = Field(default_factory=dict, description="max |logit diff| per batch size, etc.")
    parity_check: ParityCheck | None = Field(default=None, description="the parity figures in full; absent in "
                                             "manifests written before they were recorded")
    quantization: dict[str, Any] | None = None


class Variant(_Strict):
    """Another file of this version for other hardware: same labels and preprocessing, checked at export."""

    precision: Literal["int8", "fp16"]
    file: str = Field(description="its name in files (so its sha256 is verified like the model's)")
    preferred_on_cpu: bool = Field(default=False, description="passed export's accuracy check: CPUs serve it "
                                   "unless IMGCLF_PRECISION=fp32 (service/precision.py)")
    decision: str = Field(description="why it is or is not preferred, in words")
    top1: float | None = Field(default=None, description="on the validation set, through ONNX Runtime")
    agreement: float | None = Field(default=None, description="share of check images with fp32's top-1 class")
    quantization: dict[str, Any] = Field(default_factory=dict, description="the recipe and what it measured")
    selective: Selective | None = Field(default=None, description="its own confidence threshold (its scores "
                                        "differ from fp32's); absent without a validation set")


class Manifest(_Strict):
    schema_version: Literal[1, 2] = SCHEMA_VERSION
    name: str
    version: int = Field(ge=1)
    created_at: datetime
    architecture: str
    labels: list[str] = Field(min_length=2)
    input: InputSpec
    output: OutputSpec
    preprocessing: PreprocessSpec
    temperature: float = Field(default=1.0, gt=0)
    metrics: Metrics = Field(default_factory=Metrics)
    training: TrainingProvenance = Field(default_factory=TrainingProvenance)
    export: ExportProvenance
    files: dict[str, FileEntry] = Field(description="every other file of the version, by name")
    selective: Selective | None = Field(default=None, description="the confidence threshold chosen at export "
                                        "(service/selective.py); absent in manifests written before it")
    reference: DriftReference | None = Field(default=None, description="what drift is measured against "
                                             "(service/drift.py); absent without a validation set")
    explain: ExplainSpec | None = Field(default=None, description="how POST /explain explains this model (CAM, "
                                        "Grad-CAM or occlusion); absent in manifests written before: occlusion")

    variants: list[Variant] = Field(default_factory=list, description="other files of this version, e.g. int8")

    _check_name = field_validator("name")(classmethod(lambda cls, v: validate_name(v)))

    def served_as(self, variant: Variant) -> Manifest:
        """This manifest as the variant is served: its precision and its own confidence threshold."""
        export = self.export.model_copy(update={"precision": variant.precision, "quantization": variant.quantization})
        return self.model_copy(update={"export": export, "selective": variant.selective or self.selective})
