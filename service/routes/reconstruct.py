"""POST /reconstruct: the posterior decoded to pixel probabilities (the web page's reconstructions)."""

# No `from __future__ import annotations`: FastAPI evaluates the signature (le=settings.max_n).
from typing import Annotated

from fastapi import APIRouter, Query

from service import jobs, schemas
from service.deps import ImageComputation, check_query
from service.errors import PayloadTooLargeError
from service.routes.openapi import IMAGE_ROUTE_ERRORS, error_responses, image_body
from service.settings import Settings


def add_routes(r: APIRouter, settings: Settings) -> None:
    SamplesQuery = Annotated[
        int, Query(ge=0, le=settings.max_n, description="Draws per image from q(h|x) to decode (0: none).")
    ]

    @r.post(
        "/reconstruct",
        response_model=schemas.ReconstructResponse,
        responses=error_responses(*IMAGE_ROUTE_ERRORS),
        openapi_extra=image_body(),
        dependencies=check_query(),
        summary="Reconstructions: the posterior decoded",
        description="Pixel probabilities p(x | h1) decoded from each image's posterior: `mean` decodes the "
        "posterior mean E_q[h1 | x]; `draws` decode `samples` draws h ~ q(h | x), the samples /loglik weighs "
        "with k=samples and the same seed. Images × (samples + 1) is at most IWAE_MAX_N (the /sample bound).",
    )
    async def reconstruct(req: ImageComputation, samples: SamplesQuery = 0) -> schemas.ReconstructResponse:
        decoded = req.n * (samples + 1)
        if decoded > settings.max_n:
            raise PayloadTooLargeError(
                f"request too large: {req.n} images × (samples {samples} + 1) = {decoded} decoded images, over "
                f"the limit of {settings.max_n} (IWAE_MAX_N); send fewer images or fewer samples"
            )
        mean, draws = await req.call(jobs.reconstruct(req.x, samples, req.seed), req.n * max(samples, 1))
        return schemas.ReconstructResponse(
            model=req.loaded.name,
            seed=req.seed,
            binarize=req.binarize.value,
            n_images=req.n,
            samples=samples,
            image_shape=list(req.loaded.image_shape) if req.loaded.image_shape else None,
            mean=mean.tolist(),
            draws=draws.tolist() if samples else None,
        )
