"""The checkpoint format: a safetensors file of float32 weights plus a JSON model card in its metadata.

Pure bytes in, bytes out (callers do the file I/O), so the service and training share one definition of
the contract without either importing the other. Nothing here unpickles anything. The layout is
documented in docs/checkpoint-format.md.
"""

from __future__ import annotations

import json
import math
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from models.config import ModelConfig
from models.networks import IWAE

FORMAT = "iwae-serve/1"
DATA_MEAN_KEY = "data_mean"
# Keys every complete model card carries (evaluation results are added by `iwae eval --update-card`).
REQUIRED_CARD_KEYS = ("name", "config", "dataset", "binarization", "objective", "k", "estimator")


class CheckpointError(ValueError):
    """A checkpoint that is corrupt, truncated, of another format or does not match its config."""


def to_bytes(model: IWAE, card: dict[str, Any], data_mean: torch.Tensor | None = None) -> bytes:
    """Serialise weights (float32) and the model card. The card's ``config`` is taken from the model."""
    card = {**card, "config": model.config.to_dict()}
    tensors = {name: t.detach().to("cpu", torch.float32).contiguous() for name, t in model.state_dict().items()}
    if data_mean is not None:
        tensors[DATA_MEAN_KEY] = data_mean.detach().reshape(-1).to("cpu", torch.float32).contiguous()
    return st_save(tensors, metadata={"format": FORMAT, "card": json.dumps(card, sort_keys=True)})


def from_bytes(data: bytes, source: str = "checkpoint") -> tuple[IWAE, dict[str, Any], torch.Tensor | None]:
    """Parse and validate a checkpoint: returns (model in eval mode, card, training data mean or None).

    Raises CheckpointError naming ``source`` and the problem for anything but a well-formed file.
    """
    if not data:
        raise CheckpointError(f"{source}: empty file")
    try:
        tensors = st_load(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{source}: not a readable safetensors file (corrupt or truncated?): {e}") from e
    meta = read_metadata(data, source)
    card = parse_card(meta, source)
    try:
        config = ModelConfig.from_dict(card["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: invalid model config in card: {e}") from e
    data_mean = tensors.pop(DATA_MEAN_KEY, None)
    # Check against a storage-free (meta) model first: a config that disagrees with the tensors (say a wrong
    # x_dim) must be reported, not allocated (it can ask for gigabytes).
    with torch.device("meta"):
        expected = IWAE(config).state_dict()
    _check_tensors(expected, tensors, source)
    if data_mean is not None:
        _check_tensors({DATA_MEAN_KEY: torch.empty(config.x_dim, device="meta")}, {DATA_MEAN_KEY: data_mean}, source)
    model = IWAE(config)
    model.load_state_dict(tensors)
    model.eval()
    return model, card, data_mean


def read_metadata(data: bytes, source: str = "checkpoint") -> dict[str, str]:
    """The safetensors header's ``__metadata__`` (cheap: reads only the header)."""
    if len(data) < 8:
        raise CheckpointError(f"{source}: truncated (only {len(data)} bytes)")
    n = int.from_bytes(data[:8], "little")
    if n <= 0 or 8 + n > len(data):
        raise CheckpointError(f"{source}: truncated or corrupt header (declares {n} bytes)")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{source}: corrupt header: {e}") from e
    meta = header.get("__metadata__") or {}
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{source}: format is {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def parse_card(meta: dict[str, str], source: str = "checkpoint") -> dict[str, Any]:
    try:
        card = json.loads(meta["card"])
    except (KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{source}: missing or invalid model card: {e}") from e
    if not isinstance(card, dict):
        raise CheckpointError(f"{source}: model card is not a JSON object")
    return card


def _check_tensors(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor], source: str) -> None:
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: tensor names do not match the config: missing {missing}, unexpected {unexpected}"
        )
    for name, ref in expected.items():
        t = got[name]
        if t.shape != ref.shape:
            raise CheckpointError(f"{source}: {name} has shape {tuple(t.shape)}, config expects {tuple(ref.shape)}")
        if t.dtype != torch.float32:
            raise CheckpointError(f"{source}: {name} has dtype {t.dtype}, expected float32")
        if not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{source}: {name} contains NaN or infinite values")


def with_card(data: bytes, updates: dict[str, Any], source: str = "checkpoint") -> bytes:
    """The same checkpoint with ``updates`` merged into its model card (weights unchanged)."""
    model, card, data_mean = from_bytes(data, source)
    card.update(updates)
    return to_bytes(model, card, data_mean)


def card_is_complete(card: dict[str, Any]) -> list[str]:
    """Names of required card keys that are missing (empty list when complete)."""
    return [k for k in REQUIRED_CARD_KEYS if k not in card]


def finite_or_none(v: float) -> float | None:
    """JSON has no NaN: store non-finite numbers as null."""
    return v if math.isfinite(v) else None
