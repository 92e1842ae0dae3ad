"""Service settings: `IWAE_*` environment variables, overridable by `iwae serve` flags.

Every field is documented in docs/service.md (keep the two in sync). Unknown `IWAE_*` variables are
ignored because the training side reads some of its own (e.g. `IWAE_DATA_DIR`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator
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
    queue_size: int = Field(512, ge=1, description="Requests waiting per model before new ones get 503.")
    timeout_s: float = Field(
        60.0,
        gt=0,
        description="Per-request limit on queue wait plus compute (504 after); a request's `timeout_ms` may "
        "only shorten it.",
    )
    retry_after_s: int = Field(
        1, ge=0, description="Retry-After seconds while models load; a full queue or a drain computes its own."
    )
    threads: int | None = Field(
        None,
        ge=1,
        description="torch threads per engine worker (default: 1 on CPUs when there are several workers).",
    )
    engine_workers: int | None = Field(
        None,
        ge=1,
        description="Engine worker threads per model (default: one per usable CPU core divided by IWAE_THREADS; "
        "1 on a GPU). On a machine shared with other jobs, lower it to leave cores free.",
    )
    drain_s: float = Field(
        30.0,
        ge=0,
        description="Grace period on SIGTERM/SIGINT: queued and running jobs finish within it (new ones get "
        "503), then the process exits 0.",
    )
    api_keys: SecretStr | None = Field(
        None,
        description="API keys: comma-separated, or the path of a file with one key per line. When set, every "
        "endpoint but /healthz and /readyz needs `Authorization: Bearer <key>`.",
    )
    metrics_public: bool = Field(False, description="Serve /metrics without an API key even when IWAE_API_KEYS is set.")
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
            elif name == "api_keys":
                env["IWAE_API_KEYS"] = self.api_keys.get_secret_value()  # type: ignore[union-attr]
            else:
                env[f"IWAE_{name.upper()}"] = str(value)
        return env
