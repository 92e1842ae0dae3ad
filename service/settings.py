"""Service settings: `IWAE_*` environment variables, overridable by `iwae serve` flags.

Every field is documented in docs/service.md (keep the two in sync). Unknown `IWAE_*` variables are
ignored because the training side reads some of its own (e.g. `IWAE_DATA_DIR`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

import models as models_pkg

DEFAULT_MODELS_DIR = Path(models_pkg.__file__).parent / "zoo"
DEFAULT_MODEL = "mnist-iwae-k50-1l"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="IWAE_", extra="ignore", validate_default=True)

    models: Annotated[list[Path], NoDecode] = Field(
        default_factory=lambda: [DEFAULT_MODELS_DIR],
        description="Checkpoint files or folders of `*.safetensors` checkpoints (comma-separated or a JSON list "
        "in the environment). The model name is the file stem.",
    )
    default_model: str = Field(DEFAULT_MODEL, description="Model used when a request names none.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when available, else CPU.")
    max_k: int = Field(5000, ge=1, description="Largest k accepted by /loglik (and samples by /encode).")
    max_n: int = Field(1024, ge=1, description="Largest n accepted by /sample.")
    max_images: int = Field(1000, ge=1, description="Most images in one request.")
    max_request_cost: int = Field(
        500_000, ge=1, description="Most images × k (or images × samples) in one request; bounds its noise memory."
    )
    max_body_bytes: int = Field(32 * 2**20, ge=1, description="Largest request body; larger ones get 413.")
    batch_cost: int = Field(250_000, ge=1, description="Batch budget in images × k summed over the batched requests.")
    max_batch_requests: int = Field(256, ge=1, description="Most requests merged in one batch (1 turns batching off).")
    max_wait_ms: float = Field(2.0, ge=0, description="How long a batch waits for more requests after its first.")
    queue_size: int = Field(512, ge=1, description="Requests waiting per model before new ones get 503.")
    timeout_s: float = Field(60.0, gt=0, description="Per-request limit on queue wait plus compute (504 after).")
    retry_after_s: int = Field(1, ge=0, description="Retry-After seconds sent with 503 responses.")
    threads: int | None = Field(None, ge=1, description="torch intra-op threads (default: torch's choice).")
    memory_bytes: int = Field(
        256 * 2**20, ge=2**20, description="Activation memory budget of the L_k engine per batch (sets chunk size)."
    )
    host: str = Field("127.0.0.1", description="Address to bind.")
    port: int = Field(8000, ge=0, le=65535, description="Port to bind.")
    workers: int = Field(1, ge=1, description="uvicorn worker processes (each loads every model).")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field("info", description="Log level.")

    @field_validator("models", mode="before")
    @classmethod
    def _split_models(cls, v: Any) -> Any:
        # Environment values arrive as one string: accept a JSON list or a comma-separated list.
        if isinstance(v, str):
            s = v.strip()
            if s.startswith("["):
                return json.loads(s)
            return [p.strip() for p in s.split(",") if p.strip()]
        if isinstance(v, Path):
            return [v]
        return v

    @field_validator("models")
    @classmethod
    def _non_empty(cls, v: list[Path]) -> list[Path]:
        if not v:
            raise ValueError("at least one models path is needed")
        return v

    def to_env(self) -> dict[str, str]:
        """These settings as `IWAE_*` variables (how worker processes receive them)."""
        env: dict[str, str] = {}
        for name, value in self.model_dump().items():
            if value is None:
                continue
            if name == "models":
                env["IWAE_MODELS"] = json.dumps([str(p) for p in value])
            else:
                env[f"IWAE_{name.upper()}"] = str(value)
        return env
