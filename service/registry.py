"""Loading checkpoints into memory: one `LoadedModel` per file, looked up by name (the file stem)."""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from models.checkpoint import CheckpointError, from_bytes
from models.device import resolve_device
from models.networks import IWAE
from models.percentiles import LoglikQuantiles
from service.errors import UnknownModelError
from service.schemas import ModelInfo
from service.settings import Settings

log = logging.getLogger("iwae.service")

CHECKPOINT_SUFFIX = ".safetensors"


class NoModelsError(RuntimeError):
    """Not a single checkpoint could be loaded: the service cannot answer anything."""


@dataclass
class LoadedModel:
    name: str
    path: Path
    model: IWAE
    card: dict[str, Any]
    device: torch.device
    image_shape: tuple[int, int] | None
    data_mean: torch.Tensor | None = None

    @property
    def x_dim(self) -> int:
        return self.model.config.x_dim

    @property
    def n_parameters(self) -> int:
        return self.model.n_parameters()

    @functools.cached_property
    def quantiles(self) -> LoglikQuantiles | None:
        """Test-set quantiles of per-image L_k from the card; None when absent or malformed (logged)."""
        try:
            return LoglikQuantiles.from_card(self.card)
        except ValueError as e:
            log.warning("model %s: ignoring the card's test-set quantiles: %s", self.name, e)
            return None

    def describe(self, default: bool) -> ModelInfo:
        """The card as stored, plus what the service derives from the loaded weights."""
        return ModelInfo(
            name=self.name,
            default=default,
            file=self.path.name,
            device=str(self.device),
            n_parameters=self.n_parameters,
            x_dim=self.x_dim,
            image_shape=list(self.image_shape) if self.image_shape else None,
            config=self.model.config.to_dict(),
            card=self.card,
        )


def image_shape_for(x_dim: int, card: dict[str, Any]) -> tuple[int, int] | None:
    """Height × width of the model's images: the card's `image_shape` when valid, else square when x_dim is."""
    shape = card.get("image_shape")
    if (
        isinstance(shape, list | tuple)
        and len(shape) == 2
        and all(isinstance(s, int) and s > 0 for s in shape)
        and shape[0] * shape[1] == x_dim
    ):
        return int(shape[0]), int(shape[1])
    side = math.isqrt(x_dim)
    return (side, side) if side * side == x_dim else None


def _candidate_files(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            for f in sorted(p.iterdir()):
                if f.name.startswith(".") or not f.is_file():
                    continue
                if f.name.endswith(CHECKPOINT_SUFFIX):
                    files.append(f)
                else:
                    log.warning("skipping %s: not a checkpoint (expected a %s file)", f, CHECKPOINT_SUFFIX)
        elif p.is_file():
            files.append(p)
        else:
            log.error("models path %s does not exist", p)
    return files


@dataclass
class ModelRegistry:
    models: dict[str, LoadedModel]
    default: str

    @classmethod
    def load(cls, settings: Settings) -> ModelRegistry:
        """Load every checkpoint under ``settings.models``; bad files are logged and skipped."""
        try:
            device = resolve_device(settings.device)
        except ValueError as e:
            raise NoModelsError(f"IWAE_DEVICE: {e}") from None
        loaded: dict[str, LoadedModel] = {}
        errors: list[str] = []
        for f in _candidate_files(list(settings.models)):
            name = f.name.removesuffix(CHECKPOINT_SUFFIX)
            if name in loaded:
                msg = f"skipping {f}: a model named {name!r} was already loaded from {loaded[name].path}"
                log.error(msg)
                errors.append(msg)
                continue
            try:
                model, card, data_mean = from_bytes(f.read_bytes(), source=str(f))
            except (CheckpointError, OSError) as e:
                msg = f"skipping {f}: cannot load checkpoint: {e}"
                log.error(msg)
                errors.append(msg)
                continue
            model = model.to(device).eval()
            model.requires_grad_(False)
            loaded[name] = LoadedModel(
                name=name,
                path=f,
                model=model,
                card=card,
                device=device,
                image_shape=image_shape_for(model.config.x_dim, card),
                data_mean=data_mean,
            )
            _ = loaded[name].quantiles  # validated now, so that a malformed entry is reported at startup
            log.info("loaded model %s from %s (%d parameters, %s)", name, f, model.n_parameters(), device)
        if not loaded:
            where = ", ".join(str(p) for p in settings.models)
            raise NoModelsError(
                f"no loadable checkpoint found in {where}" + (f": {'; '.join(errors)}" if errors else "")
            )
        default = settings.default_model
        if default not in loaded:
            fallback = sorted(loaded)[0]
            log.warning("default model %r is not loaded; using %r instead", default, fallback)
            default = fallback
        return cls(models=loaded, default=default)

    def get(self, name: str | None) -> LoadedModel:
        if name is None:
            return self.models[self.default]
        try:
            return self.models[name]
        except KeyError:
            raise UnknownModelError(name, sorted(self.models)) from None

    def names(self) -> list[str]:
        return sorted(self.models)
