"""Regenerate the committed V2 stubs: ``python -m service.http.v2.proto.generate [--check]``.

Runs grpcio-tools' protoc (the ``dev`` extra pins the version that matches the committed files), then
makes two edits that protoc has no option for:

- a generated module that uses another one's messages (``grpc_predict_v2_pb2_grpc.py``, and
  ``triton_extensions_pb2.py``/``.pyi``, which import ``grpc_predict_v2.proto``) imports it as a sibling
  module of this package (protoc writes a top-level ``import grpc_predict_v2_pb2``, which only works
  from this folder);
- the messages go into the private pool of :mod:`._pool` instead of protobuf's default pool, so
  tritonclient's own ``inference.*`` messages can be imported in the same process;
- a ``# ruff: noqa`` / ``# fmt: off`` header, so ``ruff check --fix`` leaves the files as generated.

``--check`` regenerates into a temporary folder and fails if the committed files differ (a test runs it).
"""

from __future__ import annotations

import argparse
import difflib
import logging
import re
import sys
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
PACKAGE = "service.http.v2.proto"
PROTOS = {  # proto file -> protoc outputs
    "grpc_predict_v2.proto": ("--python_out", "--pyi_out", "--grpc_python_out"),
    "triton_model_config.proto": ("--python_out", "--pyi_out"),
    "triton_extensions.proto": ("--python_out", "--pyi_out"),
}


def protoc_args(proto: str, out: Path) -> list[str]:
    """The exact protoc command line for one file (also printed by ``--print``)."""
    return ["grpc_tools.protoc", f"-I{HERE}", *(f"{flag}={out}" for flag in PROTOS[proto]), str(HERE / proto)]


def _postprocess(name: str, text: str) -> str:
    stem = name.split(".")[0]
    # Linters' fixers must leave generated code alone, or --check finds it stale.
    text = f"# ruff: noqa\n# fmt: off\n# Generated, then edited by {PACKAGE}.generate: do not edit by hand.\n{text}"
    if name.endswith("_pb2.py"):
        text = text.replace(
            "from google.protobuf.internal import builder as _builder\n",
            "from google.protobuf.internal import builder as _builder\n"
            "from ._pool import POOL as _POOL  # imgclf: private pool (see _pool.py)\n",
        )
        text = text.replace("_descriptor_pool.Default().AddSerializedFile(", "_POOL.AddSerializedFile(")
        text = text.replace(f"'{stem}', _globals)", f"'{PACKAGE}.{stem}', _globals)")
    # Every file: a sibling's messages imported from this package (only _pb2_grpc.py and files whose proto
    # imports another have such a line).
    return re.sub(r"^import (\w+_pb2) as (\w+)$", r"from . import \1 as \2", text, flags=re.MULTILINE)


def generate(out: Path) -> list[Path]:
    """Write the stubs into ``out``; the list of files written."""
    from grpc_tools import protoc  # dev dependency: only regeneration needs it

    written: list[Path] = []
    with tempfile.TemporaryDirectory() as raw_dir:
        raw = Path(raw_dir)
        for proto in PROTOS:
            if protoc.main(protoc_args(proto, raw)) != 0:
                raise RuntimeError(f"protoc failed on {proto}")
        for path in sorted(raw.iterdir()):
            target = out / path.name
            target.write_text(_postprocess(path.name, path.read_text()))
            written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the committed stubs are stale")
    args = parser.parse_args(argv)
    if not args.check:
        for path in generate(HERE):
            print(f"wrote {path.relative_to(HERE.parents[3])}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        stale = []
        for fresh in generate(Path(tmp)):
            committed = HERE / fresh.name
            old = committed.read_text() if committed.exists() else ""
            if old != fresh.read_text():
                stale.append(fresh.name)
                sys.stdout.writelines(difflib.unified_diff(
                    old.splitlines(True), fresh.read_text().splitlines(True), str(committed), "regenerated", n=1))
        if stale:
            print(f"stale: {', '.join(stale)}; run python -m {PACKAGE}.generate", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
