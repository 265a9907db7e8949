"""PyTorch -> ONNX, and the structural checks every exported graph must pass.

The checks refuse what would serve wrongly without failing loudly: a graph the ONNX checker
rejects, BatchNormalization or Dropout left in training mode (the model was not in ``eval()``),
and a fixed batch dimension (the service batches requests).
"""

from __future__ import annotations

import logging
from pathlib import Path

import onnx
import torch
from onnx import numpy_helper
from torch import nn

from service.preprocessing import PreprocessSpec
from training.export.errors import ExportError

log = logging.getLogger(__name__)

OPSET = 18


def to_onnx(model: nn.Module, spec: PreprocessSpec, path: Path, output_names: tuple[str, ...] = ("logits",)) -> str:
    """Dynamo export with a symbolic batch (traced at batch 2); TorchScript if dynamo fails.

    ``output_names``: one per output of ``model`` (explanations export ``("logits", "features")``);
    every output gets the symbolic batch.
    """
    model = model.eval()
    example = torch.zeros(2, spec.channels, *spec.input_size)
    try:
        program = torch.onnx.export(
            model, (example,), dynamo=True, input_names=["input"], output_names=list(output_names),
            dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=65536)},), opset_version=OPSET, verbose=False,
        )
        program.save(str(path))
        exporter = "dynamo"
    except Exception as exc:  # noqa: BLE001 - any dynamo failure falls back, and says so
        log.warning("dynamo export failed (%s); falling back to the TorchScript exporter", exc)
        torch.onnx.export(
            model, (example,), str(path), dynamo=False, input_names=["input"], output_names=list(output_names),
            dynamic_axes={"input": {0: "batch"}, **{name: {0: "batch"} for name in output_names}}, opset_version=OPSET,
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


def output_shape(path: Path) -> list[int | str]:
    """The first output's shape as the manifest records it (symbolic dimensions by name)."""
    graph = onnx.load(str(path)).graph
    return [d.dim_param or d.dim_value for d in graph.output[0].type.tensor_type.shape.dim]


def _constant_value(graph: onnx.GraphProto, name: str) -> bool:
    for init in graph.initializer:
        if init.name == name:
            return bool(numpy_helper.to_array(init).any())
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            return bool(numpy_helper.to_array(node.attribute[0].t).any())
    return True
