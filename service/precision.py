"""Which file of a version a server runs: the int8 variant on CPUs where export's check holds, else fp32.

Export marks an int8 variant preferred on the CPU only when it passed its accuracy check
(``training.export``). The check ran on one CPU; 8-bit weights can saturate ONNX Runtime's int8
kernels on x86 CPUs without VNNI, which a CPU with VNNI cannot show, so such a file is served as int8
here only if it was checked without VNNI too.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path
from typing import Literal

from service.manifest import Manifest, Variant
from service.repository import ModelVersion
from service.runtime import Device, on_cuda

Precision = Literal["auto", "fp32"]


@functools.cache
def cpu_has_vnni() -> bool:
    """AVX-512 VNNI or AVX-VNNI (int8 dot products into int32, no int16 saturation); False off x86 Linux."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return "avx512_vnni" in flags or "avx_vnni" in flags


def preferred_variant(manifest: Manifest, device: Device, precision: Precision = "auto") -> Variant | None:
    """The variant a server runs instead of the fp32 file, or None: int8 on CPUs, where export preferred it."""
    if precision == "fp32" or on_cuda(device):
        return None
    return next((v for v in manifest.variants if v.precision == "int8" and v.preferred_on_cpu and _holds_here(v)),
                None)


def _holds_here(variant: Variant) -> bool:
    """8-bit weights checked only on a CPU with VNNI may saturate on one without (module docstring)."""
    recipe = variant.quantization
    return recipe.get("weight_bits") == 7 or not recipe.get("checked_with_vnni", True) or cpu_has_vnni()


def served_file(version: ModelVersion, device: Device, precision: Precision = "auto") -> tuple[Path, Manifest]:
    """The ONNX file a server, a batch job or the CLI runs for ``version``, and its manifest as served."""
    variant = preferred_variant(version.manifest, device, precision)
    if variant is None:
        return version.model_path, version.manifest
    return version.path / variant.file, version.manifest.served_as(variant)
