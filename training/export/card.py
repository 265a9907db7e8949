"""MODEL_CARD.md: what a version is, what it was measured on, and what it is not for."""

from __future__ import annotations

from service.manifest import Manifest, ParityCheck
from training.export.selective import card_lines


def _parity_line(check: ParityCheck | None, legacy: dict[str, object]) -> str:
    if check is None:
        return f"**Export checks passed.** {legacy}"
    worst = max(check.max_abs_logit_diff.values())
    sources = ", ".join(f"{n} {name}" for name, n in check.image_sources.items()) or "given"
    return (
        f"**Export checks passed.** ONNX checker, inference-mode graph, symbolic batch; ONNX Runtime matches "
        f"PyTorch on {check.images} real images ({sources}) at batch sizes {'/'.join(map(str, check.batch_sizes))}: "
        f"max |logit diff| {worst:.1e} (limit {check.tolerance:.1e} = {check.rtol:g} x max(1, max |logit| "
        f"{check.max_abs_logit:.3g})), top-1 agreement {check.top1_agreement:.3f}; batch invariance "
        f"{check.batch_invariance_max_diff:.1e}."
    )


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
        *(f"**{v.precision} variant** (`{v.file}`): {'served on CPUs' if v.preferred_on_cpu else 'kept; fp32 is served'}"
          f" ({v.decision})." for v in manifest.variants),
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
    lines += card_lines(manifest)  # the confidence threshold and its risk-coverage plot
    lines += [
        "",
        _parity_line(e.parity_check, e.parity),
        "",
        "**Intended use.** Classifying images like those it was trained on, into the classes above.",
        "",
        (
            "**Limits.** It scores every image against its classes, also images of none of them: where it has "
            "a confidence threshold, an answer under it is marked `confident: false` (and withheld with "
            "`IMGCLF_ABSTAIN=1`), which is no promise about such images; scores are calibrated on the validation "
            "data only; accuracy on other distributions (other cameras, lighting, domains) is not measured here."
        ),
        "",
    ]
    return "\n".join(lines)
