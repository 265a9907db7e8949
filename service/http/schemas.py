"""HTTP response bodies: the public contract of the service, shown in /docs."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from service.cam import Explanation
from service.preprocessing.spec import PreprocessSpec
from service.selective import Selective


def _nullable(schema: dict, _cls: type) -> None:
    """BentoML 1.4 flattens ``anyOf: [X, null]`` to ``X`` when it builds /docs.json (``_flatten_field``
    keeps the first branch only); marking such fields ``nullable`` keeps the published schema true."""
    for prop in schema.get("properties", {}).values():
        if any(option.get("type") == "null" for option in prop.get("anyOf", [])):
            prop["nullable"] = True


class _Body(BaseModel):
    model_config = ConfigDict(json_schema_extra=_nullable)

class PredictionOut(_Body):
    label: str
    index: int = Field(description="position in the model's output")
    score: float = Field(description="calibrated probability (softmax of logits / temperature)")


class ClassifyResponse(_Body):
    model: str
    version: int
    label: str | None = Field(default=None, description="the top-1 label; null when the answer abstains "
                              "(IMGCLF_ABSTAIN=1 and not confident)")
    confident: bool | None = Field(default=None, description="whether the top-1 score clears the threshold "
                                   "(the request's min_score, else the model's); null: the model has none")
    threshold: float | None = Field(default=None, description="the threshold the answer was judged by")
    abstained: bool = Field(default=False, description="the label is withheld; the predictions are kept")
    predictions: list[PredictionOut]
    timing_ms: dict[str, float] = Field(description="milliseconds: preprocess (decode, resize, normalise; 0 for an answer "
                                              "from the response cache, which adds cached: 1) and total")


class ErrorOut(_Body):
    kind: str = Field(description="machine-readable error kind, e.g. invalid_image, unsupported_format")
    message: str
    status: int


class BatchItem(_Body):
    index: int = Field(description="position of the image in the request")
    label: str | None = Field(default=None, description="top-1 label; null when abstaining or on error")
    confident: bool | None = Field(default=None, description="as in /classify; null on error or without threshold")
    threshold: float | None = None
    abstained: bool = False
    predictions: list[PredictionOut] | None = None
    error: ErrorOut | None = None


class BatchResponse(_Body):
    model: str
    version: int
    results: list[BatchItem]
    timing_ms: dict[str, float]


class DriftOut(_Body):
    """This worker's rolling window of answers against the model's validation reference."""

    window: int = Field(description="answers in the window now")
    size: int = Field(description="answers the window holds when full (IMGCLF_DRIFT_WINDOW)")
    class_psi: float | None = Field(description="population stability index of the answered classes")
    score_psi: float | None = Field(description="population stability index of the top-1 scores")
    verdict: Literal["ok", "drift", "not_enough_data", "no_reference"]


class ModelInfo(_Body):
    name: str
    version: int
    labels: int
    preprocessing: PreprocessSpec
    provider: str
    precision: str = Field(description="of the file served: fp32, or int8 where export preferred its int8 variant "
                           "on CPUs (IMGCLF_PRECISION=fp32 forces fp32)")
    load_seconds: float
    default: bool = Field(description="a request without `model` gets this version (IMGCLF_DEFAULT_MODEL, or the "
                          "only model served)")
    threshold: float | None = Field(default=None, description="top-1 score from which an answer is confident; "
                                    "null: no validation set to choose one")
    selective: Selective | None = Field(default=None, description="how the threshold was chosen and what it reached")
    drift: DriftOut | None = None


class RolloutOut(_Body):
    version: int = Field(description="the candidate")
    mode: Literal["canary", "shadow"] = Field(description="canary: answers `weight` of the requests that name no "
                                              "version; shadow: scores `weight` of them after production answered")
    weight: float


class StoreOut(_Body):
    location: str = Field(description="the repository's URL (a folder for a local repository)")
    reachable: bool = Field(description="false: the last read failed; this worker serves what its verified cache "
                            "holds and picks up changes when the store answers again")
    error: str | None = Field(default=None, description="why the store could not be read")


class ModelsResponse(_Body):
    models: list[ModelInfo]
    not_loaded: dict[str, str] = Field(default_factory=dict, description="name:version -> why this worker "
                                       "could not load it (it reports not ready on /readyz meanwhile)")
    rollouts: dict[str, RolloutOut] = Field(default_factory=dict, description="model name -> its candidate on "
                                            "trial (`imgclf models canary`)")
    store: StoreOut | None = Field(default=None, description="the model repository this worker reads")


class ReadyResponse(_Body):
    ready: Literal[True] = True
    serving: dict[str, int] = Field(description="model name -> the production version this worker serves")
    rollouts: dict[str, RolloutOut] = Field(default_factory=dict)
    store: StoreOut | None = None


class ServedVersion(_Body):
    name: str
    version: int


class VersionChange(_Body):
    """Serialised with ``by_alias=True``: the JSON field is ``from``."""

    model_config = ConfigDict(populate_by_name=True)

    name: str
    from_: int | None = Field(alias="from", description="version served before; null for a model new to the service")
    to: int = Field(description="version served now")


class ReloadResponse(_Body):
    """POST /admin/reload (200): what the worker that took the request serves now.

    Other workers converge by watching the repository's aliases (IMGCLF_POLL_SECONDS).
    """

    models: list[ServedVersion]
    changed: list[VersionChange] = Field(description="models whose version this reload changed; empty: none")


class ExplainResponse(_Body, Explanation):
    """POST /explain (JSON): :class:`service.cam.Explanation`, published with its nullable fields marked."""
