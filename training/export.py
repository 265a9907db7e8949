"""PyTorch -> verified ONNX -> a new version in the model repository.

Nothing is registered until every check passes: the ONNX checker, no
training-mode BatchNormalization/Dropout, a symbolic batch dimension, parity
with PyTorch on real images through the shared preprocessing at batch sizes
1, 7 and 32, and batch invariance. Quantized and fp16 variants must also keep
their measured top-1 within a threshold of fp32.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import torch
from torch import nn

from service.engine import create_session, run_logits
from service.manifest import (
    ExportProvenance,
    InputSpec,
    Manifest,
    Metrics,
    OutputSpec,
    TrainingProvenance,
)
from service.preprocessing import PreprocessSpec, image_to_tensor
from service.repository import MODEL_FILE, ModelRepository, ModelVersion, sha256_file
from training import plots
from training.config import TrainConfig
from training.data import Sample, load_splits
from training.evaluation import classification_report
from training.models import create_model

log = logging.getLogger(__name__)

OPSET = 18
PARITY_BATCH_SIZES = (1, 7, 32)
PARITY_ATOL = 1e-4
INVARIANCE_ATOL = 1e-5
Precision = Literal["fp32", "fp16", "int8"]


class ExportError(RuntimeError):
    """An export check failed; nothing was written to the repository."""


@dataclass
class ExportedModel:
    """A model ready to export, with everything the manifest needs to say about it."""

    model: nn.Module
    spec: PreprocessSpec
    labels: list[str]
    architecture: str
    check_images: list[bytes]  # real images for parity checks
    eval_samples: list[Sample]  # labelled images for the version's own metrics; may be empty
    calibration_images: list[bytes]  # for int8 calibration
    training: TrainingProvenance


# --- export and graph checks ----------------------------------------------------------------


def to_onnx(model: nn.Module, spec: PreprocessSpec, path: Path) -> str:
    """Dynamo export with a symbolic batch (traced at batch 2); TorchScript if dynamo fails."""
    model = model.eval()
    example = torch.zeros(2, spec.channels, *spec.input_size)
    try:
        program = torch.onnx.export(
            model, (example,), dynamo=True, input_names=["input"], output_names=["logits"],
            dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=65536)},), opset_version=OPSET, verbose=False,
        )
        program.save(str(path))
        exporter = "dynamo"
    except Exception as exc:  # noqa: BLE001 - any dynamo failure falls back, and says so
        log.warning("dynamo export failed (%s); falling back to the TorchScript exporter", exc)
        torch.onnx.export(
            model, (example,), str(path), dynamo=False, input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=OPSET,
        )
        exporter = "torchscript"
    if path.with_name(path.name + ".data").exists():
        # Models under 2 GB must be one file: moving model.onnx alone must not break it.
        onnx.save_model(onnx.load(str(path)), str(path), save_as_external_data=False)
        path.with_name(path.name + ".data").unlink()
    return exporter


def check_graph(path: Path) -> None:
    """Structural checks: full ONNX check, inference-mode nodes, symbolic batch."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"onnx checker rejected the model: {exc}") from exc
    graph = onnx.load(str(path)).graph
    constants = {i.name for i in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    for node in graph.node:
        if node.op_type == "BatchNormalization" and any(a.name == "training_mode" and a.i == 1 for a in node.attribute):
            raise ExportError(f"BatchNormalization node {node.name!r} is in training mode (model not in eval())")
        training_input = node.input[2] if node.op_type == "Dropout" and len(node.input) > 2 else ""
        if training_input and (training_input not in constants or _constant_value(graph, training_input)):
            raise ExportError(f"Dropout node {node.name!r} is in training mode (model not in eval())")
    dims = graph.input[0].type.tensor_type.shape.dim
    if not dims or not dims[0].dim_param:
        shape = [d.dim_param or d.dim_value for d in dims]
        raise ExportError(f"the batch dimension of input {graph.input[0].name!r} is fixed ({shape}); it must be symbolic")


def _constant_value(graph: onnx.GraphProto, name: str) -> bool:
    from onnx import numpy_helper

    for init in graph.initializer:
        if init.name == name:
            return bool(numpy_helper.to_array(init).any())
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            return bool(numpy_helper.to_array(node.attribute[0].t).any())
    return True


def preprocess_all(images: Sequence[bytes], spec: PreprocessSpec) -> np.ndarray:
    return np.stack([image_to_tensor(data, spec) for data in images])


def check_parity(model: nn.Module, path: Path, batch: np.ndarray) -> dict[str, Any]:
    """ORT vs PyTorch (eval mode) on the same tensors, at several batch sizes; and batch invariance."""
    if len(batch) < max(PARITY_BATCH_SIZES):
        raise ExportError(f"parity needs at least {max(PARITY_BATCH_SIZES)} images, got {len(batch)}")
    with torch.no_grad():
        reference = model.eval()(torch.from_numpy(batch)).float().numpy()
    session = create_session(path)
    figures: dict[str, Any] = {"images": len(batch), "max_abs_logit_diff": {}}
    for size in PARITY_BATCH_SIZES:
        out = np.concatenate([run_logits(session, batch[i:i + size]) for i in range(0, len(batch), size)])
        diff = float(np.abs(out - reference).max())
        figures["max_abs_logit_diff"][str(size)] = diff
        if diff >= PARITY_ATOL or not np.array_equal(out.argmax(1), reference.argmax(1)):
            raise ExportError(
                f"ONNX Runtime disagrees with PyTorch at batch size {size}: max |logit diff| {diff:.2e} "
                f"(limit {PARITY_ATOL:.0e}), top-1 agreement {float((out.argmax(1) == reference.argmax(1)).mean()):.3f}"
            )
    figures["batch_invariance_max_diff"] = check_batch_invariance(session, batch)
    return figures


def check_batch_invariance(session: Any, batch: np.ndarray, atol: float = INVARIANCE_ATOL) -> float:
    """An image alone and inside a batch must give the same output."""
    alone = np.concatenate([run_logits(session, batch[i:i + 1]) for i in range(len(batch))])
    together = run_logits(session, batch)
    diff = float(np.abs(alone - together).max())
    if diff > atol * max(1.0, float(np.abs(alone).max())) or not np.array_equal(alone.argmax(1), together.argmax(1)):
        raise ExportError(f"outputs depend on the batch: an image alone and in a batch differ by {diff:.2e}")
    return diff


# --- variants -----------------------------------------------------------------------------------


def quantize_int8(fp32: Path, out: Path, calibration: np.ndarray) -> dict[str, Any]:
    """ONNX Runtime static QDQ quantization, calibrated on training images."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{"input": calibration[i:i + 16]} for i in range(0, len(calibration), 16)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.items, None)

    prepared = out.with_name("prepared.onnx")
    quant_pre_process(str(fp32), str(prepared))
    # Per-channel weights: per-tensor scales collapse depthwise convolutions (measured on the digits
    # Lite0: per-tensor 10% top-1, per-channel 99.4%, fp32 99.4%).
    settings = {"format": "QDQ", "activation_type": "QUInt8", "weight_type": "QInt8", "per_channel": True,
                "calibration_images": len(calibration), "calibrate_method": "MinMax"}
    quantize_static(
        str(prepared), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
    )
    prepared.unlink()
    return settings


def convert_fp16(fp32: Path, out: Path) -> dict[str, Any]:
    """fp16 weights and compute for GPUs; inputs and outputs stay fp32."""
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    converted = OnnxModel(convert_float_to_float16(onnx.load(str(fp32)), keep_io_types=True))
    converted.topological_sort()  # the converter appends its input casts after their consumers
    onnx.save_model(converted.model, str(out))
    return {"keep_io_types": True}


# --- metrics, card, registration ------------------------------------------------------------------


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


def dataset_fingerprint(samples: Sequence[Sample]) -> str:
    digest = hashlib.sha256()
    for sample in sorted(samples, key=lambda s: (s.label, hashlib.sha256(s.read()).hexdigest())):
        digest.update(f"{sample.label}:{hashlib.sha256(sample.read()).hexdigest()}\n".encode())
    return digest.hexdigest()


def package_versions() -> dict[str, str]:
    out = {}
    for name in ("imgclf", "torch", "onnx", "onnxruntime", "timm", "torchvision"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def model_card(manifest: Manifest) -> str:
    m, e = manifest.metrics, manifest.export
    lines = [
        f"# {manifest.name} v{manifest.version}",
        "",
        (
            f"**What it is.** An image classifier ({manifest.architecture}, {e.precision}, ONNX opset {e.opset}, "
            f"{e.exporter} exporter) over {len(manifest.labels)} classes: {', '.join(manifest.labels[:20])}"
            f"{', ...' if len(manifest.labels) > 20 else ''}."
        ),
        "",
        (
            f"**Input.** {manifest.preprocessing.color_mode} images; shorter side resized to "
            f"{manifest.preprocessing.resize_size} ({manifest.preprocessing.interpolation}), centre crop "
            f"{manifest.preprocessing.input_size[0]}x{manifest.preprocessing.input_size[1]}, normalised with mean "
            f"{list(manifest.preprocessing.mean)} and std {list(manifest.preprocessing.std)}. Serving applies exactly this."
        ),
        "",
        (
            f"**Data.** {manifest.training.weights_source or 'see training provenance'}; dataset fingerprint "
            f"`{manifest.training.dataset_fingerprint or 'n/a'}`."
        ),
        "",
        "**Metrics** (ONNX Runtime on this file, shared preprocessing):",
        "",
    ]
    if m.top1 is not None:
        lines += [
            f"- {m.split} images: {m.num_images}",
            f"- top-1: {m.top1:.4f}, top-5: {m.top5:.4f}",
            f"- expected calibration error after temperature {manifest.temperature:.3f}: {m.ece:.4f}",
            "- recall per class: " + ", ".join(f"{k} {v:.3f}" for k, v in list(m.per_class_recall.items())[:30]),
            "",
            "![confusion matrix](confusion_matrix.png)",
        ]
    else:
        lines.append(f"- {m.note or 'not measured'}")
    lines += [
        "",
        f"**Export checks passed.** {e.parity}",
        "",
        "**Intended use.** Classifying images like those it was trained on, into the classes above.",
        "",
        (
            "**Limits.** It always answers with one of its classes, also for images of none of them; scores are "
            "calibrated on the validation data only; accuracy on other distributions (other cameras, lighting, "
            "domains) is not measured here."
        ),
        "",
    ]
    return "\n".join(lines)


def register(
    repo: ModelRepository, name: str, exported: ExportedModel, onnx_path: Path, *, exporter: str,
    precision: Precision, parity: dict[str, Any], quantization: dict[str, Any] | None, report: dict[str, Any] | None,
    expected_sha256: str | None = None,
) -> ModelVersion:
    """Write the version (model, manifest, labels, card, confusion matrix) atomically.

    ``expected_sha256``: the digest of the file that passed the checks; a copy that differs
    (corrupted or replaced between checking and registering) is refused and nothing is written.
    """
    graph = onnx.load(str(onnx_path)).graph
    out_shape = [d.dim_param or d.dim_value for d in graph.output[0].type.tensor_type.shape.dim]
    metrics = Metrics(note="no labelled evaluation set was given")
    temperature = 1.0
    if report is not None:
        metrics = Metrics(
            split="val", num_images=report["num_images"], top1=report["top1"], top5=report["top5"],
            ece=report["ece_after_temperature"],
            per_class_recall={k: v["recall"] for k, v in report["per_class"].items()},
        )
        temperature = report["temperature"]

    def write(staging: Path, version: int) -> Manifest:
        staging.joinpath(MODEL_FILE).write_bytes(onnx_path.read_bytes())
        if expected_sha256 is not None and sha256_file(staging / MODEL_FILE) != expected_sha256:
            raise ExportError(
                f"{onnx_path} is not the file that passed the export checks (sha256 differs); nothing registered"
            )
        staging.joinpath("labels.txt").write_text("\n".join(exported.labels) + "\n")
        manifest = Manifest(
            name=name, version=version, created_at=datetime.now(UTC), architecture=exported.architecture,
            labels=exported.labels,
            input=InputSpec(shape=["batch", exported.spec.channels, *exported.spec.input_size]),
            output=OutputSpec(shape=out_shape), preprocessing=exported.spec, temperature=temperature,
            metrics=metrics, training=exported.training,
            export=ExportProvenance(exporter=exporter, opset=OPSET, precision=precision, versions=package_versions(),
                                    parity=parity, quantization=quantization),
            files={},
        )
        if report is not None:
            plots.confusion_matrix(report["confusion_matrix"], exported.labels, staging / "confusion_matrix.png")
        staging.joinpath("MODEL_CARD.md").write_text(model_card(manifest))
        return manifest

    return repo.add_version(name, write)


# --- the whole path ---------------------------------------------------------------------------


def from_run(run_dir: Path, parity_images: int = 64, calibration_images: int = 256) -> ExportedModel:
    """Rebuild the run's best checkpoint and gather real images from its own data."""
    ckpt = torch.load(Path(run_dir) / "checkpoints" / "best.pt", map_location="cpu", weights_only=False)
    cfg = TrainConfig.model_validate(ckpt["config"])
    model_cfg = cfg.model.model_copy(update={"pretrained": False, "weights": None})  # weights come from the checkpoint
    bundle = create_model(model_cfg, len(ckpt["classes"]))
    bundle.model.load_state_dict(ckpt["model"])
    splits = load_splits(cfg.data, cfg.seed)
    if splits.classes != ckpt["classes"]:
        raise ExportError(f"the run's data now has classes {splits.classes}, the checkpoint {ckpt['classes']}")
    report_path = Path(run_dir) / "report.json"
    training_report = None
    if report_path.is_file():
        full = json.loads(report_path.read_text())
        training_report = {k: full[k] for k in ("top1", "top5", "ece_before_temperature", "ece_after_temperature",
                                                "temperature", "best_epoch") if k in full}
    rng = np.random.default_rng(cfg.seed)
    calib = [splits.train[i] for i in rng.permutation(len(splits.train))[:calibration_images]]
    return ExportedModel(
        model=bundle.model.eval(),
        spec=PreprocessSpec.model_validate(ckpt["spec"]),
        labels=list(ckpt["classes"]),
        architecture=ckpt["arch"],
        check_images=[s.read() for s in splits.val[:parity_images]],
        eval_samples=splits.val,
        calibration_images=[s.read() for s in calib],
        training=TrainingProvenance(
            run_dir=str(run_dir), config=ckpt["config"], seed=cfg.seed,
            dataset_fingerprint=dataset_fingerprint(splits.train + splits.val),
            weights_source=ckpt.get("weights_source"), training_report=training_report,
        ),
    )


@dataclass
class Candidate:
    """An exported ONNX file that passed every check, not registered yet."""

    path: Path
    exporter: str
    precision: Precision
    parity: dict[str, Any]
    quantization: dict[str, Any] | None
    report: dict[str, Any] | None  # the version's own metrics (validation split), None without one
    sha256: str  # of the checked file: registration refuses any other bytes


def prepare(
    exported: ExportedModel, workdir: Path, *, precision: Precision = "fp32", max_top1_drop: float = 0.01,
) -> Candidate:
    """Export into ``workdir``, check, optionally quantize or halve, and measure. Raises ExportError."""
    workdir = Path(workdir)
    fp32 = workdir / "fp32.onnx"
    exporter = to_onnx(exported.model, exported.spec, fp32)
    check_graph(fp32)
    batch = preprocess_all(exported.check_images, exported.spec)
    parity = check_parity(exported.model, fp32, batch)
    report = evaluate_onnx(fp32, exported.eval_samples, exported.spec, exported.labels) if exported.eval_samples else None
    final, quantization = fp32, None
    if precision != "fp32":
        final = workdir / f"{precision}.onnx"
        if precision == "int8":
            quantization = quantize_int8(fp32, final, preprocess_all(exported.calibration_images, exported.spec))
        else:
            quantization = convert_fp16(fp32, final)
        check_graph(final)
        parity["variant_batch_invariance_max_diff"] = check_batch_invariance(create_session(final), batch, atol=1e-3)
        if report is not None:
            fp32_top1 = report["top1"]
            report = evaluate_onnx(final, exported.eval_samples, exported.spec, exported.labels)
            drop = fp32_top1 - report["top1"]
            quantization |= {"fp32_top1": fp32_top1, "top1": report["top1"], "top1_drop": drop}
            if drop > max_top1_drop:
                raise ExportError(
                    f"{precision} top-1 {report['top1']:.4f} is {drop * 100:.2f} points below fp32 "
                    f"{fp32_top1:.4f}; the limit is {max_top1_drop * 100:.2f} (raise --max-top1-drop to accept)"
                )
    return Candidate(final, exporter, precision, parity, quantization, report, sha256_file(final))


def register_candidate(repo: ModelRepository, name: str, exported: ExportedModel, candidate: Candidate) -> ModelVersion:
    """Register a prepared candidate; only the exact bytes that were checked get in."""
    return register(repo, name, exported, candidate.path, exporter=candidate.exporter, precision=candidate.precision,
                    parity=candidate.parity, quantization=candidate.quantization, report=candidate.report,
                    expected_sha256=candidate.sha256)


def export(
    exported: ExportedModel, repo: ModelRepository, name: str, *, precision: Precision = "fp32",
    max_top1_drop: float = 0.01,
) -> ModelVersion:
    """Export, check, optionally quantize or halve, measure, then register. Raises ExportError."""
    with tempfile.TemporaryDirectory(prefix="imgclf-export-") as tmp:
        candidate = prepare(exported, Path(tmp), precision=precision, max_top1_drop=max_top1_drop)
        return register_candidate(repo, name, exported, candidate)
