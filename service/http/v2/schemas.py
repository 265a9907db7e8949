"""Pydantic models of the V2 REST JSON bodies (required_api.md / OIP ``inference_rest.md``).

They validate the JSON header of ``POST /v2/models/{m}/infer`` (:mod:`.rest`) and document every V2
route in the OpenAPI schema. Responses are built as plain dicts for speed; the tests check that they
validate against these models.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

# "$parameter = $string : $string | $number | $boolean"
ParameterValue = StrictBool | StrictInt | StrictFloat | StrictStr
Parameters = dict[str, ParameterValue]
Shape = list[StrictInt]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RequestInput(_Body):
    name: str = Field(description="'image' (BYTES [-1], encoded files) or 'pixels' (FP32 [-1, C, H, W])")
    shape: Shape
    datatype: str = Field(description="BYTES for 'image', FP32 for 'pixels'")
    parameters: Parameters | None = Field(
        default=None,
        description="binary_data_size: bytes of this tensor after the JSON header (binary tensor extension); "
                    "content_type='base64': BYTES data are base64 strings (MLServer's convention)")
    data: list[Any] | None = Field(default=None, description="row-major values, flat or nested")


class RequestOutput(_Body):
    name: str = Field(description="'probabilities' or 'logits'")
    parameters: Parameters | None = Field(
        default=None, description="binary_data: answer this output as binary; classification: K, the top-K "
                                  "classes as BYTES [N, K] of 'score:index:label'")


class InferenceRequest(_Body):
    id: str | None = None
    model_name: str | None = Field(default=None, description="ignored (the route names the model); "
                                                           "KServe's client sends it")
    model_version: str | None = Field(default=None, description="ignored, as model_name")
    parameters: Parameters | None = Field(default=None, description="binary_data_output: all outputs binary")
    inputs: Annotated[list[RequestInput], Field(min_length=1)]
    outputs: list[RequestOutput] | None = Field(default=None, description="omitted: every output")


class ResponseOutput(_Body):
    name: str
    shape: Shape
    datatype: str
    parameters: Parameters | None = Field(default=None, description="binary_data_size when sent as binary")
    data: list[Any] | None = None


class InferenceResponse(_Body):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: Parameters | None = None
    outputs: list[ResponseOutput]


class TensorMetadata(_Body):
    name: str
    datatype: str
    shape: Shape = Field(description="-1: a variable dimension (the batch)")


class ModelMetadataResponse(_Body):
    name: str
    versions: list[str] | None = None
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: Parameters | None = Field(
        default=None, description="labels (count), architecture, temperature, preprocessing (JSON), max_images")


class ServerMetadataResponse(_Body):
    name: str
    version: str
    extensions: list[str]


class ServerLiveResponse(_Body):
    live: bool


class ServerReadyResponse(_Body):
    ready: bool


class ModelReadyResponse(_Body):
    name: str
    ready: bool


class ErrorResponse(_Body):
    error: str = Field(description="what was wrong; tritonclient and KServe's clients read this key")


class ConfigInput(_Body):
    name: str
    data_type: str
    format: str = "FORMAT_NONE"
    dims: Shape = Field(description="-1: variable (with max_batch_size 0 the batch is the first dim)")
    optional: bool = False


class ConfigOutput(_Body):
    name: str
    data_type: str
    dims: Shape


class DynamicBatching(_Body):
    preferred_batch_size: list[int] = []
    max_queue_delay_microseconds: int = 0


class ModelConfigResponse(_Body):
    """Triton's model configuration (the part perf_analyzer reads)."""

    name: str
    platform: str
    backend: str
    max_batch_size: int = Field(description="0: requests give full shapes, batch dimension included")
    input: list[ConfigInput]
    output: list[ConfigOutput]
    dynamic_batching: DynamicBatching | None = None
