"""Smaller or faster copies of a checked fp32 graph: int8 (static QDQ) and fp16.

A variant is checked again (graph checks, batch invariance) and measured against fp32 by
``training.export.prepare``; this module only makes the files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx

Precision = Literal["fp32", "fp16", "int8"]
# A variant's outputs alone and in a batch: int8 and fp16 kernels round more than fp32 ones.
VARIANT_INVARIANCE_ATOL = 1e-3


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
    # 7-bit weights (reduce_range): without VNNI, ORT's x86 int8 kernels (VPMADDUBSW) add pairs of
    # u8 x s8 products in int16, which saturates with 8-bit weights. Measured on an AVX2-only EPYC,
    # digits Lite0 at 32 px: fp32 72.8% top-1, int8 57.5%, int8 with reduce_range 75.6%. The file is
    # made once and served anywhere, so it must not depend on the exporting CPU: always 7 bits.
    settings = {"format": "QDQ", "activation_type": "QUInt8", "weight_type": "QInt8", "per_channel": True,
                "reduce_range": True, "calibration_images": len(calibration), "calibrate_method": "MinMax"}
    quantize_static(
        str(prepared), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=True,
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
