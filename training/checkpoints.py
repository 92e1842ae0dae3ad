"""Checkpoint files on disk: atomic writes of the models/ checkpoint format, and resumable training state.

The training state (optimizer moments, RNG states, position, and the weights they belong to) lives in a
second safetensors file beside the checkpoint, ``CKPT.state.safetensors``, so the checkpoint itself stays a
clean model file. The two files are replaced one after the other (checkpoint first), so a process killed
between the two writes leaves a checkpoint one save ahead of its state: the state's own copy of the weights
is what a resume starts from, never the checkpoint's.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from models.checkpoint import CheckpointError, from_bytes, to_bytes, with_card
from models.networks import IWAE
from training.files import atomic_write_bytes

STATE_FORMAT = "iwae-serve-train-state/1"


def save_checkpoint(path: Path, model: IWAE, card: dict[str, Any], data_mean: torch.Tensor | None) -> None:
    atomic_write_bytes(path, to_bytes(model, card, data_mean))


def read_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    return path.read_bytes()


def load_checkpoint(path: Path) -> tuple[IWAE, dict[str, Any], torch.Tensor | None]:
    return from_bytes(read_bytes(path), source=str(path))


def update_card(path: Path, updates: dict[str, Any]) -> None:
    atomic_write_bytes(path, with_card(read_bytes(path), updates, source=str(path)))


def state_path(ckpt: Path) -> Path:
    return ckpt.with_name(ckpt.name.removesuffix(".safetensors") + ".state.safetensors")


def save_train_state(
    path: Path,
    optimizer: torch.optim.Optimizer,
    rng: dict[str, torch.Tensor],
    meta: dict[str, Any],
    params: Sequence[torch.Tensor] = (),
) -> None:
    """Optimizer moments as tensors ``opt.{param}.{key}``, RNG states as ``rng.{name}``, the weights the moments
    belong to as ``param.{index}`` (the optimizer's parameter order), the rest as JSON."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for idx, param in enumerate(params):
        tensors[f"param.{idx}"] = param.detach().cpu().contiguous()
    for idx, st in sd["state"].items():
        for key, value in st.items():
            tensors[f"opt.{idx}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    for name, value in rng.items():
        tensors[f"rng.{name}"] = value.detach().cpu().contiguous()
    metadata = {"format": STATE_FORMAT, "meta": json.dumps(meta), "param_groups": json.dumps(sd["param_groups"])}
    atomic_write_bytes(path, st_save(tensors, metadata=metadata))


def load_train_state(
    path: Path, optimizer: torch.optim.Optimizer, params: Sequence[torch.nn.Parameter] = ()
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Restore the optimizer, and ``params`` (when given) from the state's copy of the weights, in place; return
    (RNG states, meta). A state written before the weights were stored in it leaves ``params`` as they are
    (the checkpoint's)."""
    data = read_bytes(path)
    header_meta = _state_header(data, path)
    try:
        tensors = st_load(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: unreadable training state (corrupt or truncated?): {e}") from e
    state: dict[int, dict[str, torch.Tensor]] = {}
    rng: dict[str, torch.Tensor] = {}
    weights: dict[int, torch.Tensor] = {}
    for name, t in tensors.items():
        kind, rest = name.split(".", 1)
        if kind == "rng":
            rng[rest] = t
        elif kind == "param":
            weights[int(rest)] = t
        else:
            idx, key = rest.split(".", 1)
            state.setdefault(int(idx), {})[key] = t
    if weights and params:
        if sorted(weights) != list(range(len(params))) or any(
            weights[i].shape != p.shape for i, p in enumerate(params)
        ):
            raise CheckpointError(f"{path}: its weights do not match the model being resumed")
        with torch.no_grad():
            for i, p in enumerate(params):
                p.copy_(weights[i])
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(header_meta["param_groups"])})
    return rng, json.loads(header_meta["meta"])


def _state_header(data: bytes, path: Path) -> dict[str, str]:
    try:
        n = int.from_bytes(data[:8], "little")
        header_meta = json.loads(data[8 : 8 + n]).get("__metadata__") or {}
    except (ValueError, AttributeError) as e:
        raise CheckpointError(f"{path}: unreadable training state (corrupt or truncated?): {e}") from e
    if header_meta.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path}: not a training-state file (format {header_meta.get('format')!r})")
    return header_meta


def read_train_state_meta(path: Path) -> dict[str, Any]:
    """The position (epoch, step), running sums and wall time of a saved run, without its tensors."""
    return json.loads(_state_header(read_bytes(path), path)["meta"])
