"""The Open Inference Protocol (KServe / Triton "v2" REST) for the L_k bound: decoding inference requests,
with the binary tensor extension, and encoding responses. No web framework here: the routes are in
service/routes/v2.py.

One input, ``images``: FP32, FP64, UINT8 (0-255) or BOOL, shape [N, x_dim] or [N, H, W]. Outputs, FP64 [N]:
``loglik``, ``stderr``, ``ess``, ``elbo``, ``bits_per_dim`` and, for models whose card holds test-set
quantiles, ``percentile``. Request parameters: ``k``, ``seed``, ``binarize`` (and the extension's
``binary_data_output``). Binary tensor extension: tensor bytes follow the JSON header, whose length is the
``Inference-Header-Content-Length`` header; each binary tensor gives its size as ``binary_data_size``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.inputs import Binarize

INPUT_NAME = "images"
OUTPUT_NAMES = ("loglik", "stderr", "ess", "elbo", "bits_per_dim")
PERCENTILE = "percentile"
EXTENSIONS = ("binary_tensor_data",)
# Little-endian, as the binary extension requires; BOOL is one byte per element (0 or 1).
DATATYPES = {"FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"), "UINT8": np.dtype("u1"), "BOOL": np.dtype("?")}
MAX_SEED = 2**63 - 1


class ProtocolError(ValueError):
    """A request the protocol cannot accept: answered with ``{"error": message}`` and ``status``."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool


@dataclass(frozen=True)
class InferRequest:
    """A decoded inference request. ``x``: [N, x_dim] float64 pixel values in [0, 1] before binarization
    (UINT8 divided by 255, BOOL as 0/1); ``seed`` None when the client sent none."""

    id: str | None
    x: np.ndarray
    k: int
    seed: int | None
    binarize: Binarize
    outputs: tuple[RequestedOutput, ...]


@dataclass(frozen=True)
class ModelSpec:
    """What the model accepts and returns, and the service's limits."""

    x_dim: int
    image_shape: tuple[int, int] | None
    outputs: tuple[str, ...]
    max_images: int
    max_k: int
    default_k: int

    def shapes_text(self) -> str:
        shapes = [f"[N, {self.x_dim}]"]
        if self.image_shape:
            shapes.append(f"[N, {self.image_shape[0]}, {self.image_shape[1]}]")
        return " or ".join(shapes)


def server_metadata(version: str) -> dict[str, Any]:
    return {"name": "iwae-serve", "version": version, "extensions": list(EXTENSIONS)}


def model_metadata(name: str, spec: ModelSpec) -> dict[str, Any]:
    """$metadata_model_response: the input is listed as FP32 [-1, x_dim] (the other datatypes and the image
    shape are accepted too)."""
    return {
        "name": name,
        "platform": "pytorch",
        "inputs": [{"name": INPUT_NAME, "datatype": "FP32", "shape": [-1, spec.x_dim]}],
        "outputs": [{"name": o, "datatype": "FP64", "shape": [-1]} for o in spec.outputs],
    }


def model_config(name: str, spec: ModelSpec) -> dict[str, Any]:
    """Triton's model configuration (GET /v2/models/{name}/config, which perf_analyzer reads): no implicit
    batch dimension (max_batch_size 0), so the shapes carry N as -1."""
    return {
        "name": name,
        "platform": "pytorch",
        "max_batch_size": 0,
        "input": [{"name": INPUT_NAME, "data_type": "TYPE_FP32", "dims": [-1, spec.x_dim]}],
        "output": [{"name": o, "data_type": "TYPE_FP64", "dims": [-1]} for o in spec.outputs],
    }


# --- requests ---------------------------------------------------------------------------------------------
def split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """The JSON header and the binary tensor data that follows it."""
    if header_length is None:
        return body, b""
    try:
        n = int(header_length)
    except ValueError:
        raise ProtocolError(f"Inference-Header-Content-Length {header_length!r} is not an integer") from None
    if not 0 < n <= len(body):
        raise ProtocolError(f"Inference-Header-Content-Length {n} is outside the body's {len(body)} bytes")
    return body[:n], body[n:]


def parse_infer_request(body: bytes, header_length: str | None, spec: ModelSpec) -> InferRequest:
    header, binary = split_body(body, header_length)
    try:
        payload = json.loads(header)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ProtocolError(f"the inference request is not valid JSON: {e}") from None
    if not isinstance(payload, dict):
        raise ProtocolError("the inference request must be a JSON object")
    unknown = sorted(set(payload) - {"id", "parameters", "inputs", "outputs"})
    if unknown:
        raise ProtocolError(f"unknown field(s) {unknown} in the inference request")
    request_id = payload.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise ProtocolError("'id' must be a string")
    params = _parameters(payload.get("parameters"), spec)
    x = _images(payload.get("inputs"), binary, spec)
    outputs = _requested_outputs(payload.get("outputs"), bool(params.get("binary_data_output", False)), spec)
    return InferRequest(
        id=request_id,
        x=x,
        k=params.get("k", spec.default_k),
        seed=params.get("seed"),
        binarize=Binarize(params.get("binarize", Binarize.none.value)),
        outputs=outputs,
    )


def _integer(v: Any) -> int | None:
    """``v`` as an integer if it is one in JSON's sense (JSON Schema counts 5.0 as an integer; true is not
    one), else None."""
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return None


def _parameters(raw: Any, spec: ModelSpec) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ProtocolError("'parameters' must be an object")
    known = ("k", "seed", "binarize", "binary_data_output")
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ProtocolError(f"unknown parameter(s) {', '.join(unknown)}; this model takes {', '.join(known)}")
    out = dict(raw)
    if "k" in raw:
        out["k"] = _integer(raw["k"])
        if out["k"] is None or not 1 <= out["k"] <= spec.max_k:
            raise ProtocolError(f"parameter k must be an integer from 1 to {spec.max_k} (IWAE_MAX_K); got {raw['k']!r}")
    if "seed" in raw:
        out["seed"] = _integer(raw["seed"])
        if out["seed"] is None or not 0 <= out["seed"] <= MAX_SEED:
            raise ProtocolError(f"parameter seed must be an integer from 0 to 2^63 - 1; got {raw['seed']!r}")
    # A list is not a string: compared as one rather than hashed (an unhashable value must be a 400, not a 500).
    if "binarize" in raw and raw["binarize"] not in [b.value for b in Binarize]:
        choices = ", ".join(b.value for b in Binarize)
        raise ProtocolError(f"parameter binarize must be one of {choices}; got {raw['binarize']!r}")
    if "binary_data_output" in raw and not isinstance(raw["binary_data_output"], bool):
        raise ProtocolError("parameter binary_data_output must be true or false")
    return out


def _images(inputs: Any, binary: bytes, spec: ModelSpec) -> np.ndarray:
    if not isinstance(inputs, list) or not inputs:
        raise ProtocolError(f"missing input: the request needs 'inputs' holding the tensor {INPUT_NAME!r}")
    if not all(isinstance(i, dict) for i in inputs):
        raise ProtocolError("each entry of 'inputs' must be an object")
    names = [i.get("name") for i in inputs]
    if INPUT_NAME not in names:
        raise ProtocolError(f"missing input {INPUT_NAME!r}; got {names}")
    if len(inputs) > 1:
        raise ProtocolError(f"the model has one input, {INPUT_NAME!r}; got {names}")
    tensor = inputs[0]
    unknown = sorted(set(tensor) - {"name", "shape", "datatype", "parameters", "data"})
    if unknown:
        raise ProtocolError(f"unknown field(s) {unknown} in input {INPUT_NAME!r}")
    dtype, shape = _datatype_and_shape(tensor, spec)
    count = math.prod(shape)
    size = _binary_size(tensor.get("parameters"))
    if size is not None:
        if "data" in tensor:
            raise ProtocolError(f"input {INPUT_NAME!r} has both 'data' and binary_data_size")
        want = count * dtype.itemsize
        if size != want:
            raise ProtocolError(
                f"input {INPUT_NAME!r}: binary_data_size {size} does not match shape {shape} of "
                f"{tensor['datatype']} ({want} bytes)"
            )
        if len(binary) != size:
            raise ProtocolError(
                f"inconsistent binary sizes: the body holds {len(binary)} bytes after the JSON header, the inputs "
                f"declare {size} (binary_data_size)"
            )
        arr = np.frombuffer(binary, dtype=dtype, count=count)
        if tensor["datatype"] == "BOOL" and bool((arr.view(np.uint8) > 1).any()):
            raise ProtocolError(f"input {INPUT_NAME!r} is BOOL: each byte must be 0 or 1")
    else:
        if binary:
            raise ProtocolError(f"the body holds {len(binary)} bytes after the JSON header but no input is binary")
        arr = _json_data(tensor.get("data"), tensor["datatype"], count)
    x = arr.reshape(shape[0], spec.x_dim).astype(np.float64)
    return x / 255.0 if tensor["datatype"] == "UINT8" else x


def _datatype_and_shape(tensor: dict[str, Any], spec: ModelSpec) -> tuple[np.dtype, list[int]]:
    datatype = tensor.get("datatype")
    if not isinstance(datatype, str) or datatype not in DATATYPES:
        raise ProtocolError(f"input {INPUT_NAME!r} has datatype {datatype!r}; expected one of {', '.join(DATATYPES)}")
    shape = tensor.get("shape")
    dims = [_integer(s) for s in shape] if isinstance(shape, list) else [None]
    if not all(d is not None and d >= 0 for d in dims):
        raise ProtocolError(f"input {INPUT_NAME!r}: 'shape' must be a list of non-negative integers")
    shape = [int(d) for d in dims]  # type: ignore[arg-type]
    ok = (len(shape) == 2 and shape[1] == spec.x_dim) or (
        spec.image_shape is not None and len(shape) == 3 and tuple(shape[1:]) == spec.image_shape
    )
    if not ok:
        raise ProtocolError(f"input {INPUT_NAME!r} has shape {shape}; expected {spec.shapes_text()}")
    if shape[0] == 0:
        raise ProtocolError(f"input {INPUT_NAME!r} holds no images (shape {shape})")
    if shape[0] > spec.max_images:
        raise ProtocolError(
            f"too many images: {shape[0]} in one request, the limit is {spec.max_images} (IWAE_MAX_IMAGES)", 413
        )
    return DATATYPES[datatype], shape


def _binary_size(params: Any) -> int | None:
    if params is None:
        return None
    if not isinstance(params, dict):
        raise ProtocolError(f"input {INPUT_NAME!r}: 'parameters' must be an object")
    unknown = sorted(set(params) - {"binary_data_size"})
    if unknown:
        raise ProtocolError(f"input {INPUT_NAME!r}: unknown parameter(s) {', '.join(unknown)}")
    if "binary_data_size" not in params:
        return None
    size = _integer(params["binary_data_size"])
    if size is None or size < 0:
        raise ProtocolError(f"input {INPUT_NAME!r}: binary_data_size must be a non-negative integer")
    return size


def _json_data(data: Any, datatype: str, count: int) -> np.ndarray:
    if not isinstance(data, list):
        raise ProtocolError(f"input {INPUT_NAME!r} needs 'data' (a list) or binary data (binary_data_size)")
    try:
        arr = np.array(data)
    except ValueError:
        raise ProtocolError(f"input {INPUT_NAME!r}: 'data' is a ragged nested list") from None
    if arr.size != count:
        raise ProtocolError(f"input {INPUT_NAME!r}: 'data' holds {arr.size} values, its shape needs {count}")
    kind = arr.dtype.kind
    if datatype == "BOOL":
        if kind != "b":
            raise ProtocolError(f"input {INPUT_NAME!r} is BOOL: 'data' must hold true/false values")
    elif datatype == "UINT8":
        if kind not in "iu" or arr.min() < 0 or arr.max() > 255:
            raise ProtocolError(f"input {INPUT_NAME!r} is UINT8: 'data' must hold integers from 0 to 255")
    elif kind not in "iuf":
        raise ProtocolError(f"input {INPUT_NAME!r} is {datatype}: 'data' must hold numbers")
    return arr.reshape(-1)


def _requested_outputs(raw: Any, binary_default: bool, spec: ModelSpec) -> tuple[RequestedOutput, ...]:
    if raw is None:
        return tuple(RequestedOutput(name, binary_default) for name in spec.outputs)
    if not isinstance(raw, list) or not all(isinstance(o, dict) for o in raw):
        raise ProtocolError("'outputs' must be a list of objects")
    out: list[RequestedOutput] = []
    for entry in raw:
        name = entry.get("name")
        unknown = sorted(set(entry) - {"name", "parameters"})
        if unknown:
            raise ProtocolError(f"unknown field(s) {unknown} in output {name!r}")
        if name not in spec.outputs:
            hint = " (the model's card holds no test-set quantiles)" if name == PERCENTILE else ""
            raise ProtocolError(f"unknown output {name!r}{hint}; the model's outputs are {', '.join(spec.outputs)}")
        if any(o.name == name for o in out):
            raise ProtocolError(f"output {name!r} is requested twice")
        params = entry.get("parameters")
        params = {} if params is None else params
        if not isinstance(params, dict) or set(params) - {"binary_data"}:
            raise ProtocolError(f"output {name!r}: the only output parameter is binary_data")
        binary = params.get("binary_data", binary_default)
        if not isinstance(binary, bool):
            raise ProtocolError(f"output {name!r}: binary_data must be true or false")
        out.append(RequestedOutput(name, binary))
    if not out:
        raise ProtocolError("'outputs' is empty: name at least one output, or leave 'outputs' out for all")
    return tuple(out)


# --- responses --------------------------------------------------------------------------------------------
def encode_infer_response(
    model_name: str,
    request_id: str | None,
    tensors: dict[str, np.ndarray],
    outputs: tuple[RequestedOutput, ...],
    parameters: dict[str, Any],
) -> tuple[bytes, int | None]:
    """$inference_response, then the binary outputs' bytes in output order. Returns the body and the JSON
    header's length (None when every output is JSON: the body is the header)."""
    entries, blobs = [], []
    for out in outputs:
        arr = np.ascontiguousarray(tensors[out.name], dtype="<f8").reshape(-1)
        entry: dict[str, Any] = {"name": out.name, "datatype": "FP64", "shape": [int(arr.shape[0])]}
        if out.binary:
            blob = arr.tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            # JSON has no NaN or infinity (a k = 1 stderr): null, which numpy reads back as NaN.
            entry["data"] = [v if math.isfinite(v) else None for v in arr.tolist()]
        entries.append(entry)
    payload: dict[str, Any] = {"model_name": model_name}
    if request_id is not None:
        payload["id"] = request_id
    payload |= {"parameters": parameters, "outputs": entries}
    header = json.dumps(payload, allow_nan=False).encode()
    if not blobs:
        return header, None
    return header + b"".join(blobs), len(header)
