"""GET /models and GET /models/{name}: the loaded models and their cards."""

from typing import Annotated

from fastapi import APIRouter, Path

from service import schemas
from service.deps import State
from service.routes.openapi import error_responses
from service.settings import Settings


def add_routes(r: APIRouter, settings: Settings) -> None:

    @r.get(
        "/models",
        response_model=schemas.ModelsResponse,
        responses=error_responses(503),
        summary="All loaded models and their cards",
    )
    async def list_models(state: State) -> schemas.ModelsResponse:
        reg = state.models()
        return schemas.ModelsResponse(
            default=reg.default, models=[reg.models[n].describe(n == reg.default) for n in reg.names()]
        )

    @r.get(
        "/models/{name}",
        response_model=schemas.ModelInfo,
        responses=error_responses(404, 503),
        summary="One model's card",
        description="The model card stored in the checkpoint (training settings, and test L_5000 and active units "
        "under `eval` once evaluated), plus what the service derives: parameters, device, config.",
    )
    async def get_model(
        state: State, name: Annotated[str, Path(description="Model name, as listed by GET /models.")]
    ) -> schemas.ModelInfo:
        reg = state.models()
        loaded = reg.get(name)
        return loaded.describe(loaded.name == reg.default)
