"""Request and response bodies of the HTTP API (v1 and the KServe v2 protocol).

They exist so that the OpenAPI schema at ``/docs`` says exactly what is sent and returned, and
so that schemathesis can hold the server to it.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from deqguard.defense import Preset

__all__ = [
    "DefenseFields",
    "ErrorBody",
    "ErrorResponse",
    "ImagePrediction",
    "InferInput",
    "InferOutput",
    "InferRequest",
    "InferResponse",
    "ModelInfo",
    "ModelList",
    "PredictJSON",
    "PredictResponse",
    "PresetName",
    "StepEntropy",
    "V2ErrorResponse",
    "Timing",
]

PresetName = Literal[tuple(p.value for p in Preset)]  # type: ignore[valid-type]
"""The core's presets as the API's (and the settings') choices."""

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
MODEL_REF_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}(@[A-Za-z0-9][A-Za-z0-9._-]{0,63})?$"
PRESET_DOC = (
    "Defense preset: off (no input updates), paper (Tf 2, R 10: acts after steps 2, 4, 6, 8),"
    " fast (Tf 4, R 5), strong (Tf 1, R 20)."
)


def _no_bool(value: Any) -> Any:
    """JSON ``true`` is not the number 1."""
    if isinstance(value, bool):
        raise ValueError("expected a number, got a boolean")
    return value


Number = BeforeValidator(_no_bool)


class DefenseFields(BaseModel):
    """Per-request defense settings; each overrides the preset's value."""

    model_config = ConfigDict(extra="forbid")

    preset: PresetName | None = Field(None, description=PRESET_DOC)
    beta: Annotated[float | None, Number] = Field(
        None, ge=0, le=1, allow_inf_nan=False, description="input step size (l_inf, [0, 1])"
    )
    R: Annotated[int | None, Number] = Field(
        None, ge=0, description="input-gradient steps (Eq. 8) per intervention; 0 = no defense"
    )
    Tf: Annotated[int | None, Number] = Field(
        None,
        ge=1,
        description="intervene after every solver step t with t mod Tf = 0 up to and"
        " including t = N (Algorithm 1)",
    )
    eps: Annotated[float | None, Number] = Field(
        None, ge=0, le=1, allow_inf_nan=False, description="l_inf radius around the input"
    )
    state: Annotated[int | None, Number] = Field(
        None, ge=1, description="early state read out, 1..N (default N)"
    )
    model: str | None = Field(
        None,
        pattern=MODEL_REF_PATTERN,
        description="model `name` or `name@version` (default: the server's)",
    )
    deadline_ms: Annotated[float | None, Number] = Field(
        None,
        gt=0,
        le=3_600_000,
        allow_inf_nan=False,
        description="drop the request (504) if not started by then",
    )


class PredictJSON(DefenseFields):
    """JSON form of /v1/predict: base64-encoded PNG/JPEG/WebP images plus settings."""

    images: list[Annotated[str, Field(min_length=1)]] = Field(
        ..., min_length=1, description="base64-encoded images (PNG, JPEG or WebP)"
    )


class StepEntropy(BaseModel):
    step: int = Field(description="solver step t (1..N)")
    entropy: float = Field(
        description="prediction entropy (nats, Eq. 6) at the state z[t] of Algorithm 1; where the"
        " defense acted, z[t] is the state solved again under the updated input x[t]"
    )
    defense_acted: bool = Field(
        description="the defense updated the input after this step (t mod Tf = 0 up to and"
        " including t = N, R > 0), then z[t] was recomputed by one solver step from z[<t]"
        " under x[t]"
        " (Algorithm 1, line 13)"
    )
    post_entropy: float | None = Field(
        None,
        description="Eq. 8's objective after the R input updates: entropy of f(z~[t]; x[t]),"
        " z~[t] being the state first solved under the previous input (only where it acted)",
    )


class ImagePrediction(BaseModel):
    index: int = Field(description="position of the image in the request")
    label: str
    class_index: int
    probabilities: dict[str, float]
    entropy: float = Field(description="entropy (nats) of the returned prediction")
    entropy_trace: list[StepEntropy]
    state: int = Field(description="the state z[t] of Algorithm 1 the prediction was read from")
    final_residual: float = Field(description="relative residual of z[N] under the final input")
    nfe: int = Field(
        description="f-evaluations of the solver: 1 + one per step (converged steps are free)"
        " + 2 per intervention (f at z[t-1] under x[t], and the recomputed step)"
    )
    grad_steps: int = Field(
        description="input-gradient steps the defense spent: R per intervention (40 for paper)"
    )


class Timing(BaseModel):
    queue_ms: float
    compute_ms: float
    total_ms: float
    batch_size: int = Field(description="images in the device batch this request ran in")


class ServedModelRef(BaseModel):
    name: str
    version: str
    sha256: str


class PredictResponse(BaseModel):
    request_id: str
    model: ServedModelRef
    defense: dict[str, Any] = Field(description="the defense settings applied")
    predictions: list[ImagePrediction]
    timing: Timing


class ErrorBody(BaseModel):
    code: int
    reason: str
    message: str
    field: str | None = None
    part: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class V2ErrorResponse(BaseModel):
    """A v2 error as the KServe v2 protocol has it (``error``: a string), with the details."""

    error: str
    details: ErrorBody


class ModelInfo(BaseModel):
    name: str
    version: str
    sha256: str
    created: str = ""
    model_config_: dict[str, Any] = Field(default_factory=dict, alias="model_config")
    solver_config: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    training_args: dict[str, Any] = Field(default_factory=dict)
    notes: str = ""
    size_bytes: int = -1
    dataset_fingerprint: str | None = None
    git_commit: str | None = None
    loaded: bool = False
    default: bool = False

    model_config = ConfigDict(populate_by_name=True, protected_namespaces=())


class ModelList(BaseModel):
    models: list[ModelInfo]


# ---------------------------------------------------------------- KServe v2 (Open Inference Protocol)
V2DataType = Literal[
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
    "FP16", "FP32", "FP64", "BYTES",
]  # fmt: skip


class InferInput(BaseModel):
    name: str
    shape: list[int]
    datatype: V2DataType
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class RequestedOutput(BaseModel):
    name: str
    parameters: dict[str, Any] | None = None


class InferRequest(BaseModel):
    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[InferInput] = Field(..., min_length=1)
    outputs: list[RequestedOutput] | None = None


class InferOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class InferResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: dict[str, Any] | None = None
    outputs: list[InferOutput]

    model_config = ConfigDict(protected_namespaces=())


class TensorMeta(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMeta]
    outputs: list[TensorMeta]


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class StatDuration(BaseModel):
    count: int
    ns: int


class InferStats(BaseModel):
    success: StatDuration
    fail: StatDuration
    queue: StatDuration
    compute_input: StatDuration
    compute_infer: StatDuration
    compute_output: StatDuration
    cache_hit: StatDuration
    cache_miss: StatDuration


class BatchStats(BaseModel):
    batch_size: int
    compute_input: StatDuration
    compute_infer: StatDuration
    compute_output: StatDuration


class ModelStatsEntry(BaseModel):
    """One model version's statistics (Triton's statistics extension)."""

    name: str
    version: str
    last_inference: int = Field(description="ms since the epoch of the last success")
    inference_count: int = Field(description="images inferred")
    execution_count: int = Field(description="device batches run")
    inference_stats: InferStats
    batch_stats: list[BatchStats]


class ModelStatsResponse(BaseModel):
    model_stats: list[ModelStatsEntry]


class RepositoryIndexEntry(BaseModel):
    name: str
    version: str
    state: str
    reason: str
