"""Make the OpenAPI schema state what the server enforces, from the loaded models and the settings.

FastAPI derives the query parameters' ranges from the route signatures; what it cannot know comes from the
models loaded at startup: the model names (an enum, for `model=` and `/models/{name}`), the image shapes and
the image count limits of a JSON body. Pixels are declared as 0 or 1: grayscale in [0, 1] is accepted too,
but only with `binarize=threshold|stochastic`, a dependency on a query parameter that a body schema cannot
express (the description says so). `.npy` and PNG bodies are binary: their schema says only that.
"""

from __future__ import annotations

from typing import Any

from service.registry import ModelRegistry
from service.settings import Settings

# Operations with an image body, and the fewest images each needs.
MIN_IMAGES = {"/loglik": 1, "/encode": 1, "/reconstruct": 1, "/active-units": 2}
PIXEL = {"enum": [0, 1], "description": "A pixel: 0 or 1 (grayscale in [0, 1] with binarize=threshold|stochastic)."}


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


def refine(schema: dict[str, Any], registry: ModelRegistry, settings: Settings) -> dict[str, Any]:
    """Tighten ``schema`` (FastAPI's OpenAPI dict) in place: model enums and image body schemas."""
    names = registry.names()
    layouts = image_schemas(registry)
    for path, ops in schema.get("paths", {}).items():
        for op in ops.values():
            for param in op.get("parameters", []):
                if param["name"] == "model" or (path == "/models/{name}" and param["name"] == "name"):
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
