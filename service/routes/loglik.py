"""POST /loglik: the k-sample bound L_k on log p(x) per image."""

# No `from __future__ import annotations`: FastAPI must evaluate the route signature, whose bounds
# (le=settings.max_k) are variables of the factory.
import math
from typing import Annotated

from fastapi import APIRouter, Query

from models.engine import chunk_rows_for
from service import schemas
from service.deps import ImageComputation, check_query
from service.inputs import bits_per_dim
from service.loglik import LoglikStats, loglik_to_target
from service.routes.openapi import IMAGE_ROUTE_ERRORS, error_responses, image_body
from service.settings import Settings


def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None


def add_routes(r: APIRouter, settings: Settings) -> None:
    KQuery = Annotated[
        int, Query(ge=1, le=settings.max_k, description=f"Importance samples per image, 1..{settings.max_k}.")
    ]

    TargetQuery = Annotated[
        float | None,
        Query(
            gt=0,
            allow_inf_nan=False,
            description="Nats: sample each image in chunks (100, then doubling) until its standard error is at "
            "most this, or k (the cap) is reached; `k_used` in each result says where it stopped.",
        ),
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
        "drawn with the seed, and the PSIS reliability diagnostic (pareto_k, reliable). With target_stderr, "
        "samples are drawn in chunks until each image's standard error is at most that, with k as the cap. "
        "Concurrent requests share engine calls; each gets the answer it would get alone. "
        "Jobs are computed in chunks interleaved with other requests, so small requests are not held up by big "
        "ones; 503 responses carry Retry-After.",
    )
    async def loglik(
        req: ImageComputation, k: KQuery = min(5000, settings.max_k), target_stderr: TargetQuery = None
    ) -> schemas.LoglikResponse:
        req.check_cost(req.n, k, "k")
        if target_stderr is None:
            res = await req.loglik(req.x, k)
            k_used = [k] * req.n
        else:  # one indivisible job: each chunk's size depends on the results so far
            x, seed, target = req.x, req.seed, target_stderr

            def run(lm):
                rows = chunk_rows_for(lm.model, lm.device, settings.memory_bytes)
                return loglik_to_target(lm.model, lm.device, x, k, seed, target, rows)

            res: LoglikStats = await req.call(run, cost=req.n * k)  # type: ignore[no-redef]
            k_used = [int(v) for v in res.k_used]
        stats = res
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
                pareto_k=_finite(float(kh)),
                reliable=bool(ok),
                k_used=ku,
            )
            for ll, se, ess, el, p, kh, ok, ku in zip(
                stats.loglik,
                stats.stderr,
                stats.ess,
                stats.elbo,
                pct,
                stats.pareto_k,
                stats.reliable,
                k_used,
                strict=True,
            )
        ]
        return schemas.LoglikResponse(
            model=req.loaded.name,
            k=k,
            seed=req.seed,
            binarize=req.binarize.value,
            n_images=len(results),
            target_stderr=target_stderr,
            percentile_k=pct_k,
            results=results,
        )
