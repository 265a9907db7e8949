"""PyTorch -> verified ONNX -> a new version in the model repository.

Nothing is registered until every check passes: the ONNX checker, no training-mode
BatchNormalization/Dropout, a symbolic batch dimension (``onnx``), parity with PyTorch on real
images through the shared preprocessing at batch sizes 1, 7 and 32, and batch invariance
(``parity``). An int8 file is written beside the fp32 one as the version's CPU variant, preferred
where it passes its check (``int8``); an fp16 export registers the fp16 file itself. Both must keep
their measured top-1 within a threshold of fp32. The path: :func:`from_run` (or an
:class:`ExportSource` built by hand) -> :func:`prepare` (a checked :class:`Candidate`) ->
:func:`register`; :func:`export` does both.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from service.manifest import (
    ExportProvenance,
    InputSpec,
    Manifest,
    Metrics,
    OutputSpec,
    ParityCheck,
    TrainingProvenance,
    Variant,
)
from service.preprocessing import PreprocessSpec
from service.repository import MODEL_FILE, ModelRepository, ModelVersion, sha256_file
from service.runtime import create_session
from service.selective import DEFAULT_TARGET_PRECISION, Selective
from training import plots
from training.config import TrainConfig
from training.data import Sample, load_splits
from training.explain.heads import ExplainHead, explain_head, occlusion_spec
from training.export.card import model_card
from training.export.errors import ExportError
from training.export.int8 import VARIANT_FILE, int8_variant
from training.export.onnx import OPSET, check_graph, output_shape, to_onnx
from training.export.parity import (
    INVARIANCE_ATOL,
    MIN_PARITY_IMAGES,
    PARITY_BATCH_SIZES,
    PARITY_RTOL,
    check_batch_invariance,
    check_parity,
    evaluate_onnx,
    images_digest,
    legacy_parity,
    onnx_logits,
    parity_tolerance,
    preprocess_all,
)
from training.export.selective import NO_VALIDATION, Measured, measure, risk_coverage_plot
from training.export.selective import PLOT as RISK_COVERAGE_PLOT
from training.export.variants import VARIANT_INVARIANCE_ATOL, Precision, convert_fp16, quantize_int8
from training.models import create_model

__all__ = [
    "INVARIANCE_ATOL", "MIN_PARITY_IMAGES", "OPSET", "PARITY_BATCH_SIZES", "PARITY_RTOL", "Candidate", "ExportError",
    "ExportSource", "ExportedModel", "Precision", "check_batch_invariance", "check_graph", "check_parity",
    "convert_fp16", "dataset_fingerprint", "evaluate_onnx", "export", "from_run", "model_card", "onnx_logits",
    "package_versions", "parity_tolerance", "prepare", "preprocess_all", "quantize_int8", "register", "to_onnx",
]

log = logging.getLogger(__name__)


@dataclass
class ExportSource:
    """A model ready to export, with everything the manifest needs to say about it."""

    model: nn.Module
    spec: PreprocessSpec
    labels: list[str]
    architecture: str
    check_images: list[bytes]  # real images for the parity and batch-invariance checks
    eval_samples: list[Sample]  # labelled images for the version's own metrics; may be empty
    calibration_images: list[bytes]  # for int8 calibration
    training: TrainingProvenance
    check_images_from: dict[str, int] = field(default_factory=dict)  # split -> count; empty: "given"

    def check_sources(self) -> dict[str, int]:
        return dict(self.check_images_from) or {"given": len(self.check_images)}


ExportedModel = ExportSource  # the older name, kept for code that imports it


@dataclass
class Candidate:
    """An exported ONNX file that passed every check, not registered yet."""

    source: ExportSource
    path: Path
    exporter: str
    precision: Precision
    parity: ParityCheck | None  # None only for a file checked elsewhere (a copied version)
    quantization: dict[str, Any] | None
    report: dict[str, Any] | None  # the version's own metrics (validation split), None without one
    sha256: str  # of the checked file: registration refuses any other bytes
    explain: ExplainHead | None = None  # how to explain it: the manifest's spec and the head file's arrays
    measured: Measured | None = None  # confidence threshold and drift reference (validation); None without one
    variants: list[tuple[Variant, Path, str]] = field(default_factory=list)  # with each checked file's sha256


# --- measure and check -------------------------------------------------------------------------


def prepare(
    source: ExportSource, workdir: Path, *, precision: Precision = "fp32", max_top1_drop: float = 0.01,
    target_precision: float = DEFAULT_TARGET_PRECISION,
) -> Candidate:
    """Export into ``workdir``, check, optionally quantize or halve, and measure. Raises ExportError."""
    sources = source.check_sources()
    described = ", ".join(f"{n} {name}" for name, n in sources.items())
    if len(source.check_images) < MIN_PARITY_IMAGES:
        raise ExportError(
            f"parity needs at least {MIN_PARITY_IMAGES} images, got {len(source.check_images)} ({described} "
            f"images): the checks run at batch size {MIN_PARITY_IMAGES}; add images to the data"
        )
    log.info("export checks on %d real images (%s)", len(source.check_images), described)
    workdir = Path(workdir)
    fp32 = workdir / "fp32.onnx"
    batch = preprocess_all(source.check_images, source.spec)
    explain = _explain_head(source, batch)
    if explain.module is not None:  # the graph also outputs the feature map; parity is on the logits output
        exporter = to_onnx(explain.module, source.spec, fp32, ("logits", explain.spec.feature_output or ""))
    else:
        exporter = to_onnx(source.model, source.spec, fp32)
    check_graph(fp32)
    parity = check_parity(source.model, fp32, batch)
    parity.image_sources, parity.images_sha256 = sources, images_digest(source.check_images)
    report = evaluate_onnx(fp32, source.eval_samples, source.spec, source.labels) if source.eval_samples else None
    final, quantization, variants = fp32, None, []
    if precision == "int8":  # fp32 stays the version's file; int8 is its CPU variant (training/export/int8.py)
        path = workdir / VARIANT_FILE
        variant = int8_variant(fp32, path, preprocess_all(source.calibration_images, source.spec), batch,
                               source.eval_samples, source.spec, source.labels, report, max_top1_drop,
                               target_precision)
        variants.append((variant, path, sha256_file(path)))
        parity.variant_batch_invariance_max_diff = variant.quantization["batch_invariance_max_diff"]
    elif precision == "fp16":
        final = workdir / "fp16.onnx"
        quantization = convert_fp16(fp32, final)
        check_graph(final)
        parity.variant_batch_invariance_max_diff = check_batch_invariance(
            create_session(final), batch, atol=VARIANT_INVARIANCE_ATOL)
        if report is not None:
            fp32_top1 = report["top1"]
            report = evaluate_onnx(final, source.eval_samples, source.spec, source.labels)
            drop = fp32_top1 - report["top1"]
            quantization |= {"fp32_top1": fp32_top1, "top1": report["top1"], "top1_drop": drop}
            if drop > max_top1_drop:
                raise ExportError(
                    f"{precision} top-1 {report['top1']:.4f} is {drop * 100:.2f} points below fp32 "
                    f"{fp32_top1:.4f}; the limit is {max_top1_drop * 100:.2f} (raise --max-top1-drop to accept)"
                )
    # The threshold for --target-precision, on the file registered (a variant's own scores), at its temperature.
    measured = None if report is None else measure(final, source.eval_samples, source.spec, source.labels,
                                                   report["temperature"], target_precision)
    registered: Precision = "fp16" if precision == "fp16" else "fp32"
    return Candidate(source, final, exporter, registered, parity, quantization, report, sha256_file(final), explain,
                     measured, variants)


def _explain_head(source: ExportSource, batch: np.ndarray) -> ExplainHead:
    """The (logits, features) split for explanations; occlusion when there is none or it changes the logits.

    The split reuses the model's own modules, so its logits must be the model's bit for bit; a few
    check images prove it before the graph is exported from it.
    """
    try:
        head = explain_head(source.architecture, source.model, source.spec)
    except Exception as exc:  # noqa: BLE001 - a model the split does not know still exports, explained by occlusion
        log.warning("no feature-map split for %s (%s): explanations fall back to occlusion", source.architecture, exc)
        return ExplainHead(None, occlusion_spec(f"feature-map split failed: {exc}"))
    if head.module is not None:
        with torch.no_grad():
            x = torch.from_numpy(batch[:4])
            same = torch.equal(head.module(x)[0], source.model.eval()(x))
        if not same:
            log.warning("the feature-map split of %s changes its logits: explanations fall back to occlusion",
                        source.architecture)
            return ExplainHead(None, occlusion_spec("the feature-map split changed the logits"))
    log.info("explanations for %s: %s (%s)", source.architecture, head.spec.method,
             "exact" if head.spec.exact else "approximate")
    return head


# --- registration ------------------------------------------------------------------------------


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


def register(repo: ModelRepository, name: str, candidate: Candidate) -> ModelVersion:
    """Write the version (model, manifest, labels, card, confusion matrix) atomically.

    Only the exact bytes that were checked get in: a file whose sha256 differs from
    ``candidate.sha256`` (corrupted or replaced since) is refused and nothing is written.
    """
    source, report = candidate.source, candidate.report
    out_shape = output_shape(candidate.path)
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
        checked = [(candidate.path, MODEL_FILE, candidate.sha256), *((p, v.file, h) for v, p, h in candidate.variants)]
        for path, file_name, sha256 in checked:
            staging.joinpath(file_name).write_bytes(path.read_bytes())
            if sha256_file(staging / file_name) != sha256:
                raise ExportError(f"{path} is not the file that passed the export checks (sha256 differs); "
                                  "nothing registered")
        if candidate.explain is not None:
            candidate.explain.save_arrays(staging)  # explain_head.npz: in the manifest's files, sha256 and all
        staging.joinpath("labels.txt").write_text("\n".join(source.labels) + "\n")
        manifest = Manifest(
            name=name, version=version, created_at=datetime.now(UTC), architecture=source.architecture,
            labels=source.labels,
            input=InputSpec(shape=["batch", source.spec.channels, *source.spec.input_size]),
            output=OutputSpec(shape=out_shape), preprocessing=source.spec, temperature=temperature,
            metrics=metrics, training=source.training,
            export=ExportProvenance(exporter=candidate.exporter, opset=OPSET, precision=candidate.precision,
                                    versions=package_versions(), parity=legacy_parity(candidate.parity),
                                    parity_check=candidate.parity, quantization=candidate.quantization),
            files={}, explain=candidate.explain.spec if candidate.explain is not None else None,
            selective=candidate.measured.selective if candidate.measured else Selective.unmeasured(NO_VALIDATION),
            reference=candidate.measured.reference if candidate.measured else None,
            variants=[variant for variant, _, _ in candidate.variants],
        )
        if candidate.measured is not None:
            risk_coverage_plot(candidate.measured.curve, candidate.measured.selective, staging / RISK_COVERAGE_PLOT)
        if report is not None:
            plots.confusion_matrix(report["confusion_matrix"], source.labels, staging / "confusion_matrix.png")
        staging.joinpath("MODEL_CARD.md").write_text(model_card(manifest))
        return manifest

    return repo.add_version(name, write)


def export(
    source: ExportSource, repo: ModelRepository, name: str, *, precision: Precision = "fp32",
    max_top1_drop: float = 0.01, target_precision: float = DEFAULT_TARGET_PRECISION,
) -> ModelVersion:
    """Export, check, optionally quantize or halve, measure, then register. Raises ExportError."""
    with tempfile.TemporaryDirectory(prefix="imgclf-export-") as tmp:
        candidate = prepare(source, Path(tmp), precision=precision, max_top1_drop=max_top1_drop,
                            target_precision=target_precision)
        return register(repo, name, candidate)


# --- from a training run -------------------------------------------------------------------------


def from_run(
    run_dir: Path, parity_images: int = 64, calibration_images: int = 256, *,
    more_check_images: Sequence[tuple[str, Sequence[Sample]]] = (),
) -> ExportSource:
    """Rebuild the run's best checkpoint and gather real images from its own data.

    The export checks use up to ``parity_images`` validation images; when the validation split has
    fewer, images of ``more_check_images`` (the pipeline passes its held-out set), then training
    images, fill the rest. Any real image will do for parity; which ones is recorded.
    """
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
    order = np.random.default_rng(cfg.seed).permutation(len(splits.train))
    shuffled = [splits.train[i] for i in order]
    check, counts = _gather([("validation", splits.val), *more_check_images, ("training", shuffled)], parity_images)
    return ExportSource(
        model=bundle.model.eval(),
        spec=PreprocessSpec.model_validate(ckpt["spec"]),
        labels=list(ckpt["classes"]),
        architecture=ckpt["arch"],
        check_images=check,
        check_images_from=counts,
        eval_samples=splits.val,
        calibration_images=[s.read() for s in shuffled[:calibration_images]],
        training=TrainingProvenance(
            run_dir=str(run_dir), config=ckpt["config"], seed=cfg.seed,
            dataset_fingerprint=dataset_fingerprint(splits.train + splits.val),
            weights_source=ckpt.get("weights_source"), training_report=training_report,
        ),
    )


def _gather(pools: Sequence[tuple[str, Sequence[Sample]]], wanted: int) -> tuple[list[bytes], dict[str, int]]:
    """Up to ``wanted`` images, taking each pool in order; how many came from each."""
    images: list[bytes] = []
    counts: dict[str, int] = {}
    for name, samples in pools:
        taken = [s.read() for s in samples[:max(wanted - len(images), 0)]]
        if taken:
            images += taken
            counts[name] = counts.get(name, 0) + len(taken)
    return images, counts
