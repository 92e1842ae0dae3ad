"""POST /loglik: the k-sample bound L_k on log p(x) per image."""

# No `from __future__ import annotations`: FastAPI must evaluate the route signature, whose bounds
# (le=settings.max_k) are variables of the factory.
import math
from typing import Annotated

from fastapi import APIRouter, Query

from service import schemas
from service.deps import ImageComputation, check_query
from service.inputs import bits_per_dim
from service.routes.openapi import IMAGE_ROUTE_ERRORS, error_responses, image_body
from service.settings import Settings


def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None


def add_routes(r: APIRouter, settings: Settings) -> None:
    KQuery = Annotated[
        int, Query(ge=1, le=settings.max_k, description=f"Importance samples per image, 1..{settings.max_k}.")
    ]

    @r.post(
        "/loglik",
        response_model=schemas.LoglikResponse,
        responses=error_responses(*IMAGE_ROUTE_ERRORS),
        openapi_extra=image_body(),
        dependencies=check_query(),
        summary="L_k log-likelihood estimate per image",
        description="The k-sample importance weighted bound L_k on log p(x) (nats) per image, its Monte Carlo "
        "standard error, the ESS of the normalised weights, the ELBO and bits/dim, from k samples of q(h|x) "
        "drawn with the seed. Concurrent requests share engine calls; each gets the answer it would get alone. "
        "Jobs are computed in chunks interleaved with other requests, so small requests are not held up by big "
        "ones; 503 responses carry Retry-After.",
    )
    async def loglik(req: ImageComputation, k: KQuery = min(5000, settings.max_k)) -> schemas.LoglikResponse:
        req.check_cost(req.n, k, "k")
        stats = await req.loglik(req.x, k)
        quantiles = req.loaded.quantiles
        pct, pct_k = quantiles.percentile(stats.loglik, k) if quantiles else ([None] * req.n, None)
        results = [
            schemas.ImageLoglik(
                loglik=float(ll),
                stderr=_finite(float(se)),
                ess=float(ess),
                elbo=float(el),
                bits_per_dim=bits_per_dim(float(ll), req.loaded.x_dim),
                percentile=None if p is None else float(p),
            )
            for ll, se, ess, el, p in zip(stats.loglik, stats.stderr, stats.ess, stats.elbo, pct, strict=True)
        ]
        return schemas.LoglikResponse(
            model=req.loaded.name,
            k=k,
            seed=req.seed,
            binarize=req.binarize.value,
            n_images=len(results),
            percentile_k=pct_k,
            results=results,
        )
