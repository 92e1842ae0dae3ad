"""POST /active-units: A_u per unit over the posted images, and how many are active."""

# No `from __future__ import annotations`: FastAPI evaluates the signature (le=settings.max_k).
from typing import Annotated

import torch
from fastapi import APIRouter, Query

from models import posterior
from models.posterior import ACTIVE_UNIT_THRESHOLD, UPPER_LAYER_SAMPLES
from service import jobs, schemas
from service.deps import ImageComputation, check_query
from service.errors import ErrorCode, InvalidInputError
from service.routes.openapi import IMAGE_ROUTE_ERRORS, error_responses, image_body
from service.settings import Settings


def add_routes(r: APIRouter, settings: Settings) -> None:
    SamplesQuery = Annotated[
        int, Query(ge=1, le=settings.max_k, description="Draws for upper-layer posterior means (2-layer models).")
    ]

    @r.post(
        "/active-units",
        response_model=schemas.ActiveUnitsResponse,
        responses=error_responses(*IMAGE_ROUTE_ERRORS),
        openapi_extra=image_body(),
        dependencies=check_query(),
        summary="Active units over the posted images",
        description="A_u = variance across the posted images (at least 2) of the posterior mean E_q[u|x], per "
        f"unit of each stochastic layer, and the count above {ACTIVE_UNIT_THRESHOLD:g} (Burda et al., section 5.2). "
        "Upper-layer means are averaged over `samples` draws of the layer below.",
    )
    async def active_units(
        req: ImageComputation, samples: SamplesQuery = min(UPPER_LAYER_SAMPLES, settings.max_k)
    ) -> schemas.ActiveUnitsResponse:
        n = req.n
        if n < 2:
            raise InvalidInputError(
                f"active units need at least 2 images (a variance across images); got {n}", ErrorCode.too_few_images
            )
        per_image = samples if req.loaded.model.config.n_layers > 1 else 1
        req.check_cost(n, per_image, "samples")
        variances = await req.call(jobs.active_units(req.x, samples, req.seed), n * per_image)
        layers = [_layer(i + 1, a) for i, a in enumerate(variances)]
        return schemas.ActiveUnitsResponse(
            model=req.loaded.name,
            seed=req.seed,
            binarize=req.binarize.value,
            n_images=n,
            threshold=ACTIVE_UNIT_THRESHOLD,
            active_total=sum(layer.active for layer in layers),
            layers=layers,
        )


def _layer(index: int, a_u: torch.Tensor) -> schemas.LayerActiveUnits:
    """One layer's A_u [d_l] (float64) and its active units."""
    active = posterior.active_units(a_u, ACTIVE_UNIT_THRESHOLD)
    return schemas.LayerActiveUnits(
        layer=index,
        dim=int(a_u.shape[0]),
        active=int(active.numel()),
        variances=a_u.tolist(),
        active_units=active.tolist(),
    )
