"""Smaller or faster copies of a checked fp32 graph: int8 (static QDQ) and fp16.

A variant is checked again (graph checks, batch invariance) and measured against fp32 by
``training.export.prepare``; this module only makes the files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx

Precision = Literal["fp32", "fp16", "int8"]
# A variant's outputs alone and in a batch: int8 and fp16 kernels round more than fp32 ones.
VARIANT_INVARIANCE_ATOL = 1e-3


@dataclass(frozen=True)
class Int8Recipe:
    """How ONNX Runtime's static QDQ quantization is run; the defaults are what export uses.

    ``weight_bits`` 7 is ``reduce_range``: without VNNI, ORT's x86 int8 kernels (VPMADDUBSW) add
    pairs of u8 x s8 products in int16, which can saturate with 8-bit weights. Whether it does is a
    property of the model, so export measures both (``training.export.int8``).
    """

    weight_bits: Literal[7, 8] = 8
    # Percentile (99.999) clips the rare extreme activations MinMax stretches every scale to: on the
    # ImageNet Lite0, 82.6% top-1 agreement with fp32 over 896 views against MinMax's 80.5%, the same
    # 99.5% on confident views, the same graph and speed (benchmarks/results/int8_imagenet_recipes.md).
    calibrate_method: Literal["MinMax", "Entropy", "Percentile"] = "Percentile"
    symmetric_activations: bool = False
    keep_fp32: tuple[str, ...] = ()  # node names left unquantized
    # The histogram methods hold every intermediate output of every calibration image in memory
    # (448 Lite0 views took more than 24 GB), so they calibrate on an evenly spaced sample.
    histogram_images: int = 96

    def settings(self, images: int) -> dict[str, Any]:
        """What the manifest records under ``export.quantization``."""
        return {"format": "QDQ", "activation_type": "QUInt8", "weight_type": "QInt8", "per_channel": True,
                "weight_bits": self.weight_bits, "reduce_range": self.weight_bits == 7,
                "calibrate_method": self.calibrate_method, "symmetric_activations": self.symmetric_activations,
                "calibration_images": images, "keep_fp32": list(self.keep_fp32)}


EXPORT_RECIPE = Int8Recipe()


def quantize_int8(fp32: Path, out: Path, calibration: np.ndarray, recipe: Int8Recipe = EXPORT_RECIPE) -> dict[str, Any]:
    """ONNX Runtime static QDQ quantization, calibrated on training images."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if recipe.calibrate_method != "MinMax" and len(calibration) > recipe.histogram_images:
        calibration = calibration[np.linspace(0, len(calibration) - 1, recipe.histogram_images).astype(int)]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{"input": calibration[i:i + 16]} for i in range(0, len(calibration), 16)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.items, None)

    prepared = out.with_name(f"{out.stem}-prepared.onnx")
    quant_pre_process(str(fp32), str(prepared))
    # Per-channel weights: per-tensor scales collapse depthwise convolutions (measured on the digits
    # Lite0: per-tensor 10% top-1, per-channel 99.4%, fp32 99.4%).
    quantize_static(
        str(prepared), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
        reduce_range=recipe.weight_bits == 7, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod[recipe.calibrate_method], nodes_to_exclude=list(recipe.keep_fp32),
        # Not CalibMaxIntermediateOutputs: in ORT 1.32 MinMaxCalibrater.collect_data clears the outputs
        # it has collected at that count without computing their range first (they are lost).
        extra_options={"ActivationSymmetric": recipe.symmetric_activations},
    )
    prepared.unlink()
    return recipe.settings(len(calibration))


def convert_fp16(fp32: Path, out: Path) -> dict[str, Any]:
    """fp16 weights and compute for GPUs; inputs and outputs stay fp32."""
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    converted = OnnxModel(convert_float_to_float16(onnx.load(str(fp32)), keep_io_types=True))
    converted.topological_sort()  # the converter appends its input casts after their consumers
    onnx.save_model(converted.model, str(out))
    return {"keep_io_types": True}
