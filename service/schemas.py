"""Response models: the JSON the service returns (they also document it in the OpenAPI schema at /docs)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ErrorResponse(BaseModel):
    error: str = Field(description="Machine-readable error code, e.g. `not_binary`, `unknown_model`, `queue_full`.")
    detail: str = Field(description="What is wrong, naming the offending parameter, image or limit.")


class ImageLoglik(BaseModel):
    loglik: float = Field(description="L_k estimate of log p(x), nats.")
    stderr: float | None = Field(
        description="Monte Carlo standard error of `loglik`: how much it would move with another seed, nats "
        "(calibrated by measurement, see docs/service.md; null for k = 1)."
    )
    ess: float = Field(description="Effective sample size of the normalised importance weights, in [1, k].")
    elbo: float = Field(description="ELBO (mean log weight) from the same k samples, nats.")
    bits_per_dim: float = Field(description="-loglik / (x_dim · ln 2).")
    pareto_k: float | None = Field(
        None,
        description="PSIS k̂: the fitted Pareto shape of the largest importance weights (how heavy their tail "
        "is); null for k < 21.",
    )
    reliable: bool = Field(
        False,
        description="pareto_k <= 0.7. When false a few samples dominate: loglik and stderr can be off by more "
        "than stderr says.",
    )
    k_used: int = Field(0, description="Samples behind this image's numbers: k, or fewer when target_stderr was met.")
    percentile: float | None = Field(
        None,
        description="Percent (0-100) of the model's test images whose L_k is lower than this image's, "
        "interpolated between the card's test-set quantiles at `percentile_k`; null when the card has none.",
    )


class LoglikResponse(BaseModel):
    model: str
    k: int
    seed: int = Field(description="The seed used (the one sent, or a random one): send it back to get the same answer.")
    binarize: str
    n_images: int
    target_stderr: float | None = Field(None, description="The requested target standard error, nats (null: none).")
    percentile_k: int | None = Field(
        None,
        description="The k of the test-set quantiles the percentiles compare with: the stored k nearest "
        "to `k` on a log scale; null when the model's card holds no quantiles.",
    )
    results: list[ImageLoglik] = Field(description="One entry per image, in request order.")


class LayerEncoding(BaseModel):
    layer: int = Field(description="Stochastic layer, 1 = next to the data.")
    dim: int
    exact: bool = Field(
        description="True for layer 1 (q(h1|x) is Gaussian); upper-layer moments are Monte Carlo estimates."
    )
    mean: list[list[float]] = Field(description="Posterior mean per image: [n_images][dim].")
    std: list[list[float]] = Field(description="Posterior standard deviation per image: [n_images][dim].")
    samples: list[list[list[float]]] | None = Field(
        None, description="`samples` draws per image from q(h | x): [n_images][samples][dim]; null if none asked."
    )


class EncodeResponse(BaseModel):
    model: str
    seed: int
    binarize: str
    n_images: int
    samples: int
    layers: list[LayerEncoding]


class ReconstructResponse(BaseModel):
    model: str
    seed: int
    binarize: str
    n_images: int
    samples: int
    image_shape: list[int] | None = Field(description="Height and width to reshape each flat image to, if any.")
    mean: list[list[float]] = Field(
        description="p(x | h1) decoded from the posterior mean E_q[h1 | x], per image: [n_images][x_dim]."
    )
    draws: list[list[list[float]]] | None = Field(
        None, description="p(x | h1) decoded from `samples` draws h ~ q(h | x): [n_images][samples][x_dim]."
    )


class SampleResponse(BaseModel):
    model: str
    seed: int
    n: int
    x_dim: int
    image_shape: list[int] | None = Field(description="Height and width to reshape each flat image to, if any.")
    probs: list[list[float]] = Field(description="Bernoulli pixel probabilities p(x | h) per sample: [n][x_dim].")
    binary: list[list[int]] = Field(description="One binary draw from those probabilities: [n][x_dim].")


class LayerActiveUnits(BaseModel):
    layer: int
    dim: int
    active: int = Field(description="Units with A_u above the threshold.")
    variances: list[float] = Field(description="A_u per unit: variance across the posted images of E_q[u | x].")
    active_units: list[int] = Field(description="Indices of the active units.")


class ActiveUnitsResponse(BaseModel):
    model: str
    seed: int
    binarize: str
    n_images: int
    threshold: float
    active_total: int
    layers: list[LayerActiveUnits]


class ModelInfo(BaseModel):
    name: str = Field(description="The model's name (its checkpoint's file stem).")
    default: bool = Field(description="Whether requests that name no model use this one.")
    file: str
    device: str
    n_parameters: int
    x_dim: int
    image_shape: list[int] | None
    config: dict[str, Any]
    card: dict[str, Any] = Field(
        description="The model card stored in the checkpoint, as is: training settings and, when evaluated, "
        "`eval` results such as test L_5000 and the active units."
    )


class ModelsResponse(BaseModel):
    default: str
    models: list[ModelInfo]


class HealthResponse(BaseModel):
    status: str


class ReadyResponse(BaseModel):
    status: str
    models: list[str]


# --- Open Inference Protocol (/v2): the protocol's own bodies ---------------------------------------------
class V2Error(BaseModel):
    error: str = Field(description="What is wrong, naming the offending field, parameter or limit.")


class V2ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class V2Live(BaseModel):
    live: bool


class V2Ready(BaseModel):
    ready: bool


class V2ModelReady(BaseModel):
    name: str
    ready: bool


class V2TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1 for the batch dimension N.")


class V2ModelMetadata(BaseModel):
    name: str
    platform: str
    inputs: list[V2TensorMetadata]
    outputs: list[V2TensorMetadata]


class V2ConfigTensor(BaseModel):
    name: str
    data_type: str
    dims: list[int]


class V2ModelConfig(BaseModel):
    name: str
    platform: str
    max_batch_size: int
    input: list[V2ConfigTensor]
    output: list[V2ConfigTensor]


class V2OutputParameters(BaseModel):
    binary_data_size: int = Field(description="Bytes of this output after the JSON header (binary outputs).")


class V2OutputTensor(BaseModel):
    name: str
    datatype: str = Field(description="Always FP64.")
    shape: list[int] = Field(description="[N].")
    data: list[float | None] | None = Field(
        None, description="The values (JSON outputs); null for NaN (the stderr of k = 1). Absent for binary outputs."
    )
    parameters: V2OutputParameters | None = None


class V2InferResponse(BaseModel):
    model_name: str
    id: str | None = Field(None, description="The request's id, echoed when it had one.")
    parameters: dict[str, Any] = Field(description="k, seed, binarize and (with quantiles) percentile_k.")
    outputs: list[V2OutputTensor]
