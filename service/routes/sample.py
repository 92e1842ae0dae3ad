"""GET /sample: draws from the generative model, as JSON or a PNG grid."""

# No `from __future__ import annotations`: FastAPI evaluates the signature (le=settings.max_n).
import asyncio
import io
from typing import Annotated, Literal

import numpy as np
from fastapi import APIRouter, Query
from fastapi.responses import Response
from PIL import Image

from models.grid import tile, to_uint8
from service import jobs, schemas
from service.deps import Computation, check_query
from service.errors import ErrorCode, InvalidInputError
from service.routes.openapi import error_responses
from service.settings import Settings


def add_routes(r: APIRouter, settings: Settings) -> None:
    NQuery = Annotated[int, Query(ge=1, le=settings.max_n, description=f"Number of samples, 1..{settings.max_n}.")]
    FormatQuery = Annotated[Literal["json", "png"], Query(description="json or png (a grid image).")]
    PixelsQuery = Annotated[
        Literal["probs", "binary"], Query(description="What the PNG shows: pixel probabilities or binary draws.")
    ]

    @r.get(
        "/sample",
        response_model=schemas.SampleResponse,
        responses={
            200: {"content": {"image/png": {}}, "description": "JSON samples, or a PNG grid with format=png."},
            **error_responses(404, 422, 503, 504),
        },
        dependencies=check_query(),
        summary="Draw samples from the generative model",
        description="n ancestral samples x ~ p(x, h). format=json returns each sample's pixel probabilities and "
        "one binary draw; format=png returns the probabilities (or, with pixels=binary, the draws) as a grid.",
    )
    async def sample(
        req: Computation,
        n: NQuery = 16,
        format: FormatQuery = "json",
        pixels: PixelsQuery = "probs",
    ) -> schemas.SampleResponse | Response:
        loaded, seed = req.loaded, req.seed
        shape = loaded.image_shape
        if format == "png" and shape is None:
            raise InvalidInputError(
                f"model {loaded.name!r} has no image shape (x_dim {loaded.x_dim}); use format=json",
                ErrorCode.not_an_image_model,
            )
        probs, binary = await req.call(jobs.sample(n, seed), n)
        if format == "png" and shape is not None:
            shown = probs if pixels == "probs" else binary.astype(np.float64)
            png = await asyncio.to_thread(grid_png, shown.reshape(n, *shape))
            return Response(
                png, media_type="image/png", headers={"X-IWAE-Seed": str(seed), "X-IWAE-Model": loaded.name}
            )
        return schemas.SampleResponse(
            model=loaded.name,
            seed=seed,
            n=n,
            x_dim=loaded.x_dim,
            image_shape=list(shape) if shape else None,
            probs=probs.tolist(),
            binary=binary.tolist(),
        )


def grid_png(images: np.ndarray) -> bytes:
    """[n, h, w] intensities in [0, 1] -> one PNG, the images on a near-square grid on a grey ground."""
    buf = io.BytesIO()
    Image.fromarray(to_uint8(tile(images, fill=0.5)), mode="L").save(buf, format="PNG")
    return buf.getvalue()
