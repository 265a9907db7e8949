"""Triton Python-backend model: imgclf's own preprocessing and ONNX Runtime behind Triton's serving layer.

Copied as ``model.py`` into the model repository that ``benchmarks.peers.triton`` writes; it runs in
Triton's Python-backend stub, never in the project's venv. Each request carries one encoded image
(``IMAGE``, BYTES); a bad image gets its own ``INVALID_ARG`` answer (HTTP 400) and the rest of the
dynamic batch is still answered. One session call per batch. The output ``PROBS`` is softmaxed, so
Triton's classification extension can answer the top k with labels, as imgclf does.

Config parameters: ``site_dirs`` (``os.pathsep``-separated; the stub ignores PYTHONPATH, so they go
first in ``sys.path`` here), ``model_path``, ``spec`` (a PreprocessSpec as JSON), ``intra_op_threads``.
"""

from __future__ import annotations

import json
import os
import site
import sys
from typing import Any


def _prepend_site_dirs(dirs: list[str]) -> None:
    """``site.addsitedir`` for each (so .pth files count), with everything it added first in sys.path."""
    before = list(sys.path)
    for d in dirs:
        site.addsitedir(d)
    added = [p for p in sys.path if p not in before]
    sys.path[:] = added + before


class TritonPythonModel:
    """One instance of the model: a single-threaded ONNX Runtime session."""

    def initialize(self, args: dict[str, Any]) -> None:
        params = {k: v["string_value"] for k, v in json.loads(args["model_config"])["parameters"].items()}
        _prepend_site_dirs([d for d in params["site_dirs"].split(os.pathsep) if d])
        import numpy as np
        import onnxruntime
        import PIL
        import triton_python_backend_utils as pb_utils

        import service
        from service.preprocessing import (
            DecodeLimits,
            ImageInputError,
            PreprocessSpec,
            image_to_tensor,
        )
        from service.runtime import create_session, run_logits, softmax

        pb_utils.Logger.log_warn("peer-stack " + json.dumps({  # what the harness records: the stack really used
            "numpy": np.__version__, "pillow": PIL.__version__, "onnxruntime": onnxruntime.__version__,
            "python": sys.version.split()[0], "service": os.path.dirname(service.__file__)}))
        self.np, self.pb = np, pb_utils
        self.image_to_tensor, self.input_error = image_to_tensor, ImageInputError
        self.run_logits, self.softmax = run_logits, softmax
        self.spec = PreprocessSpec.model_validate_json(params["spec"])
        self.limits = DecodeLimits()
        self.session = create_session(params["model_path"], "cpu",
                                      intra_op_threads=int(params.get("intra_op_threads", "1")))

    def execute(self, requests: list[Any]) -> list[Any]:
        np, pb = self.np, self.pb
        tensors, errors = [], {}
        for i, request in enumerate(requests):
            data = pb.get_input_tensor_by_name(request, "IMAGE").as_numpy().reshape(-1)[0]
            try:
                tensors.append(self.image_to_tensor(bytes(data), self.spec, self.limits))
            except self.input_error as exc:
                errors[i] = pb.TritonError(f"invalid image: {exc}", pb.TritonError.INVALID_ARG)
        probs = iter(())
        if tensors:
            probs = iter(self.softmax(self.run_logits(self.session, np.stack(tensors))).astype(np.float32))
        responses = []
        for i in range(len(requests)):
            if i in errors:
                responses.append(pb.InferenceResponse(output_tensors=[], error=errors[i]))
            else:
                responses.append(pb.InferenceResponse(output_tensors=[pb.Tensor("PROBS", next(probs)[None])]))
        return responses
