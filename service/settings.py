"""Service settings: `IWAE_*` environment variables, overridable by `iwae serve` flags.

Each field is the one source of its setting: the flags of `iwae serve` are generated from the fields
(service/__main__.py), and docs/service.md's settings table is `settings_table()`'s output (a test checks
both). Unknown `IWAE_*` variables are ignored because the training side reads some of its own (e.g.
`IWAE_DATA_DIR`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

import models as models_pkg

DEFAULT_MODELS_DIR = Path(models_pkg.__file__).parent / "zoo"
DEFAULT_MODEL = "mnist-iwae-k50-1l"
ENV_PREFIX = "IWAE_"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", validate_default=True)

    models: Annotated[list[Path], NoDecode] = Field(
        default_factory=lambda: [DEFAULT_MODELS_DIR],
        description="checkpoint files or folders of `*.safetensors` (comma-separated or a JSON list in the "
        "environment); a model's name is its file stem",
        json_schema_extra={"shown_default": "the repository's `models/zoo`", "metavar": "DIR|FILE"},
    )
    default_model: str = Field(
        DEFAULT_MODEL,
        description="model for requests that name none (falls back to the first loaded, alphabetically)",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="`auto` (CUDA when available), `cpu` or `cuda`")
    max_k: int = Field(5000, ge=1, description="largest k (and `/encode` samples); raise it for tighter bounds")
    max_n: int = Field(1024, ge=1, description="largest n for `/sample`")
    max_images: int = Field(1000, ge=1, description="most images per request")
    max_request_cost: int = Field(
        500_000, ge=1, description="most images × k per request (bounds its noise memory: k · n · Σd_l floats)"
    )
    max_body_bytes: int = Field(32 * 2**20, ge=1, description="largest request body; larger ones get 413 unread")
    queue_size: int = Field(512, ge=1, description="requests waiting per model; beyond it, 503 at once")
    timeout_s: float = Field(
        60.0,
        gt=0,
        description="per-request limit on queue wait plus compute (504); a request's `timeout_ms` may only shorten it",
    )
    retry_after_s: int = Field(
        1, ge=0, description="`Retry-After` seconds while models load; a full queue or a drain computes its own"
    )
    threads: int | None = Field(
        None,
        ge=1,
        description="torch threads per engine worker",
        json_schema_extra={"shown_default": "1 per worker on CPUs (usable cores ÷ workers with IWAE_ENGINE_WORKERS)"},
    )
    engine_workers: int | None = Field(
        None,
        ge=1,
        description="engine worker threads per model; on a machine shared with other jobs, lower it to leave "
        "cores free",
        json_schema_extra={"shown_default": "usable CPU cores ÷ IWAE_THREADS; 1 on a GPU"},
    )
    drain_s: float = Field(
        30.0,
        ge=0,
        description="grace period on SIGTERM/SIGINT: queued and running jobs finish within it (new ones get 503), "
        "then the process exits 0",
    )
    api_keys: SecretStr | None = Field(
        None,
        description="API keys: comma-separated, or the path of a file with one key per line; when set, every "
        "endpoint but the health probes needs `Authorization: Bearer <key>` (prefer the variable or a file: "
        "flags show in process listings)",
        json_schema_extra={"shown_default": "none (no keys needed)", "metavar": "KEYS|FILE"},
    )
    metrics_public: bool = Field(False, description="serve `/metrics` without an API key even when keys are set")
    memory_bytes: int = Field(
        256 * 2**20,
        ge=2**20,
        description="the L_k engine's activation memory per chunk (sets the chunk size; on CPUs chunks are also "
        "capped at the engine's cache-sized default)",
    )
    host: str = Field("127.0.0.1", description="address to bind (`0.0.0.0` in containers)")
    port: int = Field(8000, ge=0, le=65535, description="port")
    workers: int = Field(
        1, ge=1, description="uvicorn worker processes; each loads every model and has its own schedulers"
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        "info", description="`critical`, `error`, `warning`, `info` or `debug`"
    )
    access_log: bool = Field(
        True, description="one log line per request (uvicorn's access log, at `info`); turn it off on busy servers"
    )

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
                env[env_name(name)] = json.dumps([str(p) for p in value])
            elif isinstance(value, SecretStr):
                env[env_name(name)] = value.get_secret_value()
            else:
                env[env_name(name)] = str(value)
        return env


# --- one source for the flags and the docs ------------------------------------------------------------------
def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def _extra(info: FieldInfo, key: str) -> str | None:
    extra = info.json_schema_extra
    value = extra.get(key) if isinstance(extra, dict) else None
    return str(value) if value is not None else None


def metavar(info: FieldInfo) -> str | None:
    return _extra(info, "metavar")


def shown_default(name: str, info: FieldInfo) -> str:
    """The default as the docs and `--help` show it."""
    shown = _extra(info, "shown_default")
    if shown is not None:
        return shown
    value = info.get_default(call_default_factory=True)
    if isinstance(value, str):
        return f"`{value}`"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if name.endswith("_bytes") and isinstance(value, int) and value % 2**20 == 0:
        return f"{value} ({value // 2**20} MiB)"
    return str(value)


def settings_table() -> str:
    """docs/service.md's settings table, one row per field."""
    rows = ["| Variable | Flag | Default | Meaning |", "|---|---|---|---|"]
    for name, info in Settings.model_fields.items():
        flag = flag_name(name)
        if info.annotation is bool:
            flag += f", --no-{flag[2:]}"
        if metavar(info):
            flag += f" {metavar(info)} ..."
        cell = flag.replace("|", "\\|")
        rows.append(f"| `{env_name(name)}` | `{cell}` | {shown_default(name, info)} | {info.description} |")
    return "\n".join(rows) + "\n"
