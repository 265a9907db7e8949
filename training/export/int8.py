"""Which int8 file to write for a model: the weight range measured, the worst layers named.

8-bit weights keep more of a model's answers than 7-bit ones, unless the CPU's int8 kernels saturate
on them: without VNNI, ORT's x86 kernels add pairs of u8 x s8 products in int16 (VPMADDUBSW). Whether
that happens depends on the model (the digits Lite0 at 32 px saturated: fp32 72.8% top-1, 8-bit
57.5%, 7-bit 75.6%; the ImageNet Lite0 did not: 99.5% agreement with fp32 on confident views with
8-bit weights, 92.7% with 7-bit), so export quantizes both and keeps the one whose answers agree
more with fp32. A CPU with VNNI cannot show the saturation (OpenVINO's guidance: the only check is to
run on a CPU without it), so the measurement records whether it ran on one, and a server without VNNI
serves an 8-bit file only when it was checked without VNNI (``service.precision``).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from service.manifest import Variant
from service.precision import cpu_has_vnni
from service.preprocessing import PreprocessSpec
from service.runtime import create_session, run_logits
from training.data import Sample
from training.export.errors import ExportError
from training.export.onnx import check_graph
from training.export.parity import check_batch_invariance, evaluate_onnx
from training.export.selective import measure
from training.export.variants import (
    EXPORT_RECIPE,
    VARIANT_INVARIANCE_ATOL,
    Int8Recipe,
    quantize_int8,
)

log = logging.getLogger(__name__)
VARIANT_FILE = "model.int8.onnx"
# Without labels, the check is agreement with fp32's top-1 on the check images.
MIN_AGREEMENT = 0.99


def top1(path: Path, batch: np.ndarray) -> np.ndarray:
    """Each image's top-1 class under the file (ONNX Runtime, batches of 32)."""
    session = create_session(path)
    return np.concatenate([run_logits(session, batch[i:i + 32]).argmax(1) for i in range(0, len(batch), 32)])


def quantize_measured(fp32: Path, out: Path, calibration: np.ndarray, check: np.ndarray,
                      recipe: Int8Recipe = EXPORT_RECIPE) -> dict[str, Any]:
    """Quantize with 8-bit and 7-bit weights; keep the file whose top-1 agrees more with fp32 on ``check``.

    Ties go to 8 bits (more precision where it does not saturate). The returned settings carry both
    agreements and whether this CPU has VNNI, for the manifest.
    """
    measured: dict[int, float] = {}
    reference = top1(fp32, check)
    with tempfile.TemporaryDirectory() as tmp:
        files = {bits: Path(tmp) / f"int8-w{bits}.onnx" for bits in (8, 7)}
        settings = {}
        for bits, path in files.items():
            settings[bits] = quantize_int8(fp32, path, calibration, replace(recipe, weight_bits=bits))
            measured[bits] = float((top1(path, check) == reference).mean())
        bits = 8 if measured[8] >= measured[7] else 7
        shutil.move(files[bits], out)  # the temporary folder may be on another file system
    log.info("int8 weight bits: top-1 agreement with fp32 %s -> %d bits", measured, bits)
    return {**settings[bits], "weight_bits_measured": {str(b): a for b, a in measured.items()},
            "checked_images": len(check), "checked_with_vnni": cpu_has_vnni()}


def worst_layers(fp32: Path, int8: Path, batch: np.ndarray, count: int) -> list[tuple[str, float]]:
    """The ``count`` convolutions or matrix products whose outputs lose most to quantization: lowest
    SQNR (dB) of the output against its own quantize-dequantize (ONNX Runtime's ``qdq_loss_debug``)."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader
    from onnxruntime.quantization.qdq_loss_debug import (
        collect_activations,
        compute_activation_error,
        create_activation_matching,
        modify_model_output_intermediate_tensors,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{"input": batch[i:i + 8]} for i in range(0, len(batch), 8)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.items, None)

    with tempfile.TemporaryDirectory() as tmp:
        float_model, qdq_model = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        modify_model_output_intermediate_tensors(str(fp32), str(float_model))
        modify_model_output_intermediate_tensors(str(int8), str(qdq_model))
        matching = create_activation_matching(collect_activations(str(qdq_model), Reader()),
                                              collect_activations(str(float_model), Reader()))
    errors = compute_activation_error(matching)
    # Only nodes that run as int8 kernels: a Clip's own QDQ pair is folded into its producer's.
    producer = {output: node.name for node in onnx.load(str(fp32)).graph.node for output in node.output
                if node.op_type in ("Conv", "Gemm", "MatMul")}
    ranked = sorted((float(e["qdq_err"]), producer[t]) for t, e in errors.items() if t in producer and "qdq_err" in e)
    return [(node, sqnr) for sqnr, node in ranked[:count]]


def int8_variant(fp32: Path, out: Path, calibration: np.ndarray, check: np.ndarray, samples: list[Sample],
                 spec: PreprocessSpec, labels: list[str], fp32_report: dict[str, Any] | None,
                 max_top1_drop: float, target_precision: float) -> Variant:
    """Quantize, check (graph, batch invariance) and judge the int8 file; ``out`` is its path.

    With labelled ``samples`` the export gate decides: more than ``max_top1_drop`` of top-1 lost is an
    ExportError, as for every variant. Without them, int8 is kept but preferred on CPUs only when its
    top-1 agrees with fp32's on at least 99% of the check images.
    """
    recipe = quantize_measured(fp32, out, calibration, check)
    check_graph(out)
    recipe["batch_invariance_max_diff"] = check_batch_invariance(create_session(out), check,
                                                                 atol=VARIANT_INVARIANCE_ATOL)
    agreement_ = recipe["weight_bits_measured"][str(recipe["weight_bits"])]
    if fp32_report is None:
        preferred = agreement_ >= MIN_AGREEMENT
        decision = (f"no labelled validation set: top-1 agrees with fp32 on {agreement_:.1%} of "
                    f"{len(check)} check images; {'at least' if preferred else 'under'} {MIN_AGREEMENT:.0%}")
        return Variant(precision="int8", file=VARIANT_FILE, preferred_on_cpu=preferred, decision=decision,
                       agreement=agreement_, quantization=recipe)
    report = evaluate_onnx(out, samples, spec, labels)
    drop = fp32_report["top1"] - report["top1"]
    if drop > max_top1_drop:
        raise ExportError(
            f"int8 top-1 {report['top1']:.4f} is {drop * 100:.2f} points below fp32 {fp32_report['top1']:.4f}; "
            f"the limit is {max_top1_drop * 100:.2f} (raise --max-top1-drop to accept)")
    selective = measure(out, samples, spec, labels, fp32_report["temperature"], target_precision).selective
    decision = (f"top-1 {report['top1']:.4f} on {report['num_images']} validation images, {drop * 100:.2f} points "
                f"from fp32 (limit {max_top1_drop * 100:.2f})")
    return Variant(precision="int8", file=VARIANT_FILE, preferred_on_cpu=True, decision=decision,
                   top1=report["top1"], agreement=agreement_, selective=selective,
                   quantization=recipe | {"fp32_top1": fp32_report["top1"], "top1_drop": drop})

