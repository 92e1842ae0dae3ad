"""POST /encode: the posterior q(h | x) per stochastic layer."""

# No `from __future__ import annotations`: FastAPI evaluates the signature (le=settings.max_k).
from typing import Annotated

from fastapi import APIRouter, Query

from service import jobs, schemas
from service.deps import ImageComputation, check_query
from service.routes.openapi import IMAGE_ROUTE_ERRORS, error_responses, image_body
from service.settings import Settings


def add_routes(r: APIRouter, settings: Settings) -> None:
    SamplesQuery = Annotated[
        int, Query(ge=0, le=settings.max_k, description="Draws per image from q(h|x) to return (0: none).")
    ]

    @r.post(
        "/encode",
        response_model=schemas.EncodeResponse,
        responses=error_responses(*IMAGE_ROUTE_ERRORS),
        openapi_extra=image_body(),
        dependencies=check_query(),
        summary="Posterior q(h|x) per stochastic layer",
        description="Per stochastic layer: the posterior mean and standard deviation of each image's latent "
        "code (exact for layer 1; Monte Carlo moments over 100 draws for upper layers), and `samples` draws "
        "from q(h|x) on request (the same draws /loglik weighs with k=samples and the same seed).",
    )
    async def encode(req: ImageComputation, samples: SamplesQuery = 0) -> schemas.EncodeResponse:
        req.check_cost(req.n, max(samples, 1), "samples")
        layers = await req.call(jobs.encode(req.x, samples, req.seed), req.n * max(samples, 1))
        return schemas.EncodeResponse(
            model=req.loaded.name,
            seed=req.seed,
            binarize=req.binarize.value,
            n_images=req.n,
            samples=samples,
            layers=layers,
        )
