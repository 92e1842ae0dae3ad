"""Make the OpenAPI schema state what the server enforces, from the loaded models and the settings.

FastAPI derives the query parameters' ranges from the route signatures; what it cannot know comes from the
models loaded at startup: the model names (an enum, for `model=` and `/models/{name}`), the image shapes and
the image count limits of a JSON body. Pixels are declared as 0 or 1: grayscale in [0, 1] is accepted too,
but only with `binarize=threshold|stochastic`, a dependency on a query parameter that a body schema cannot
express (the description says so). `.npy` and PNG bodies are binary: their schema says only that.

The Open Inference Protocol's inference request (/v2/models/{name}/infer) gets the same treatment: one tensor
schema per datatype and image layout, every parameter's range. Two of its rules relate fields and no JSON
schema states them (the body's description does): `data` holds exactly as many values as `shape` says, and
an output is named at most once.
"""

from __future__ import annotations

from typing import Any

from service import oip
from service.inputs import Binarize
from service.registry import ModelRegistry
from service.settings import Settings

# Operations with an image body, and the fewest images each needs.
MIN_IMAGES = {"/loglik": 1, "/encode": 1, "/reconstruct": 1, "/active-units": 2}
PIXEL = {"enum": [0, 1], "description": "A pixel: 0 or 1 (grayscale in [0, 1] with binarize=threshold|stochastic)."}
V2_INFER = "/v2/models/{name}/infer"
# The values of a JSON tensor per datatype: binary pixels (grayscale needs binarize, as on /loglik).
V2_PIXELS: dict[str, dict[str, Any]] = {
    "FP32": PIXEL,
    "FP64": PIXEL,
    "UINT8": {"enum": [0, 255], "description": "A pixel: 0 or 255 (0-255 with binarize=threshold|stochastic)."},
    "BOOL": {"type": "boolean"},
}


def image_schemas(registry: ModelRegistry) -> list[dict[str, Any]]:
    """One JSON schema per accepted image layout: a flat list of x_dim pixels or an H × W nested list."""
    layouts: list[tuple[int, ...]] = []
    for loaded in registry.models.values():
        for shape in ((loaded.x_dim,), loaded.image_shape):
            if shape and tuple(shape) not in layouts:
                layouts.append(tuple(shape))
    return [_nested(shape) for shape in layouts]


def _nested(shape: tuple[int, ...]) -> dict[str, Any]:
    inner: dict[str, Any] = PIXEL
    for size in reversed(shape):
        inner = {"type": "array", "minItems": size, "maxItems": size, "items": inner}
    return inner


def _image_list(min_images: int, settings: Settings, layout: dict[str, Any]) -> dict[str, Any]:
    return {"type": "array", "minItems": min_images, "maxItems": settings.max_images, "items": layout}


def _one_of(schemas: list[dict[str, Any]]) -> dict[str, Any]:
    return schemas[0] if len(schemas) == 1 else {"oneOf": schemas}


def v2_statuses(schema: dict[str, Any]) -> dict[str, Any]:
    """Drop the 422 FastAPI declares for every route with parameters from the /v2 routes: their only parameter
    is the model name (any string passes validation) and the protocol answers bad input with 400."""
    for path, ops in schema.get("paths", {}).items():
        if path.startswith("/v2"):
            for op in ops.values():
                op.get("responses", {}).pop("422", None)
    return schema


def _v2_shape(layout: tuple[int, ...], settings: Settings) -> dict[str, Any]:
    n = {"type": "integer", "minimum": 1, "maximum": settings.max_images}
    dims = [{"type": "integer", "enum": [d]} for d in layout]
    return {"type": "array", "minItems": 1 + len(layout), "maxItems": 1 + len(layout), "prefixItems": [n, *dims]}


def _v2_tensor(datatype: str, layout: tuple[int, ...], settings: Settings) -> dict[str, Any]:
    x_dim = 1
    for d in layout:
        x_dim *= d
    return {
        "type": "object",
        "required": ["name", "datatype", "shape", "data"],
        "additionalProperties": False,
        "properties": {
            "name": {"type": "string", "enum": [oip.INPUT_NAME]},
            "datatype": {"type": "string", "enum": [datatype]},
            "shape": _v2_shape(layout, settings),
            "data": {
                "type": "array",
                "minItems": x_dim,
                "maxItems": x_dim * settings.max_images,
                "items": V2_PIXELS[datatype],
                "description": "The tensor's values, flat in row-major order, as many as `shape` says.",
            },
            # binary_data_size belongs to binary requests (application/octet-stream) only.
            "parameters": {"type": ["object", "null"], "additionalProperties": False, "properties": {}},
        },
    }


def v2_infer_body(registry: ModelRegistry, settings: Settings) -> dict[str, Any]:
    """The JSON inference request the server accepts, for the loaded models' layouts and outputs."""
    layouts: list[tuple[int, ...]] = []
    outputs: list[str] = list(oip.OUTPUT_NAMES)
    for loaded in registry.models.values():
        for shape in ((loaded.x_dim,), loaded.image_shape):
            if shape and tuple(shape) not in layouts:
                layouts.append(tuple(shape))
        if loaded.quantiles is not None and oip.PERCENTILE not in outputs:
            outputs.append(oip.PERCENTILE)
    tensors = [_v2_tensor(d, lay, settings) for d in oip.DATATYPES for lay in layouts]
    output = {
        "type": "object",
        "required": ["name"],
        "additionalProperties": False,
        "properties": {
            "name": {"type": "string", "enum": outputs},
            "parameters": {
                "type": ["object", "null"],
                "additionalProperties": False,
                "properties": {"binary_data": {"type": "boolean"}},
            },
        },
    }
    parameters = {
        "k": {"type": "integer", "minimum": 1, "maximum": settings.max_k},
        "seed": {"type": "integer", "minimum": 0, "maximum": oip.MAX_SEED},
        "binarize": {"type": "string", "enum": [b.value for b in Binarize]},
        "binary_data_output": {"type": "boolean"},
    }
    return {
        "type": "object",
        "required": ["inputs"],
        "additionalProperties": False,
        "description": "Also enforced, beyond what a schema states: `data` holds exactly the number of values "
        "`shape` says, an output is named at most once, `percentile` only for models with test-set quantiles, "
        "and images × k is at most IWAE_MAX_REQUEST_COST (413).",
        "properties": {
            "id": {"type": ["string", "null"]},
            "parameters": {"type": ["object", "null"], "additionalProperties": False, "properties": parameters},
            "inputs": {"type": "array", "minItems": 1, "maxItems": 1, "items": _one_of(tensors)},
            "outputs": {"type": ["array", "null"], "minItems": 1, "maxItems": len(outputs), "items": output},
        },
    }


def refine(schema: dict[str, Any], registry: ModelRegistry, settings: Settings) -> dict[str, Any]:
    """Tighten ``schema`` (FastAPI's OpenAPI dict) in place: model enums and image body schemas."""
    names = registry.names()
    layouts = image_schemas(registry)
    for path, ops in schema.get("paths", {}).items():
        for op in ops.values():
            if path == V2_INFER:
                op["requestBody"]["content"]["application/json"]["schema"] = v2_infer_body(registry, settings)
            for param in op.get("parameters", []):
                named = path in ("/models/{name}", "/v2/models/{name}") or path.startswith("/v2/models/{name}/")
                if param["name"] == "model" or (named and param["name"] == "name"):
                    param["schema"] = {"type": "string", "enum": names, "title": param["schema"].get("title", "")}
            body = op.get("requestBody", {}).get("content", {}).get("application/json")
            if body is not None and path in MIN_IMAGES:
                body["schema"] = {
                    "type": "object",
                    "required": ["images"],
                    "additionalProperties": False,
                    # One layout for all the images of a request.
                    "properties": {
                        "images": _one_of([_image_list(MIN_IMAGES[path], settings, lay) for lay in layouts])
                    },
                }
    return schema
