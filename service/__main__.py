"""`python -m service` and `iwae serve`: run the HTTP service with uvicorn.

Command-line flags override `IWAE_*` environment variables, which override the defaults in settings.py.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from pydantic import ValidationError

from service.settings import Settings

log = logging.getLogger("iwae.service")

# flag -> (settings field, type, help)
_FLAGS: list[tuple[str, str, type, str]] = [
    ("--default-model", "default_model", str, "model used when a request names none (IWAE_DEFAULT_MODEL)"),
    ("--host", "host", str, "address to bind (IWAE_HOST; 0.0.0.0 in containers)"),
    ("--port", "port", int, "port to bind (IWAE_PORT)"),
    ("--workers", "workers", int, "uvicorn worker processes, each with every model (IWAE_WORKERS)"),
    ("--threads", "threads", int, "torch threads per engine worker (IWAE_THREADS)"),
    ("--max-k", "max_k", int, "largest k for /loglik (IWAE_MAX_K)"),
    ("--max-n", "max_n", int, "largest n for /sample (IWAE_MAX_N)"),
    ("--max-images", "max_images", int, "most images per request (IWAE_MAX_IMAGES)"),
    ("--max-request-cost", "max_request_cost", int, "most images × k per request (IWAE_MAX_REQUEST_COST)"),
    ("--max-body-bytes", "max_body_bytes", int, "largest request body (IWAE_MAX_BODY_BYTES)"),
    ("--engine-workers", "engine_workers", int, "engine worker threads per model (IWAE_ENGINE_WORKERS)"),
    ("--drain-s", "drain_s", float, "grace period for finishing work on SIGTERM/SIGINT (IWAE_DRAIN_S)"),
    ("--queue-size", "queue_size", int, "queued requests per model before 503 (IWAE_QUEUE_SIZE)"),
    ("--timeout-s", "timeout_s", float, "per-request time limit, queue plus compute (IWAE_TIMEOUT_S)"),
    ("--retry-after-s", "retry_after_s", int, "Retry-After seconds while loading (IWAE_RETRY_AFTER_S)"),
    ("--memory-bytes", "memory_bytes", int, "L_k engine activation memory budget (IWAE_MEMORY_BYTES)"),
]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="iwae serve",
        description="Serve IWAE checkpoints over HTTP (L_k log-likelihoods, encodings, samples, active units). "
        "Every option also reads from an IWAE_* environment variable; flags win. See docs/service.md.",
    )
    p.add_argument(
        "--models",
        nargs="+",
        type=Path,
        metavar="DIR|FILE",
        help="checkpoint files or folders of *.safetensors (IWAE_MODELS; default: the repository's models/zoo)",
    )
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where the models run (IWAE_DEVICE)")
    for flag, _field, typ, text in _FLAGS:
        p.add_argument(flag, type=typ, help=text)
    p.add_argument(
        "--api-keys",
        metavar="KEYS|FILE",
        help="require `Authorization: Bearer <key>`: comma-separated keys or a file of keys (IWAE_API_KEYS; "
        "prefer the variable or a file: flags show in process listings)",
    )
    p.add_argument(
        "--metrics-public",
        action="store_true",
        default=None,
        help="serve /metrics without a key even with API keys set (IWAE_METRICS_PUBLIC)",
    )
    p.add_argument(
        "--log-level", choices=["critical", "error", "warning", "info", "debug"], help="log level (IWAE_LOG_LEVEL)"
    )
    return p


def settings_from_args(args: argparse.Namespace) -> Settings:
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    return Settings(**overrides)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(args)
    except ValidationError as e:
        print(f"iwae serve: invalid settings:\n{e}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    from service.auth import ApiKeyError, load_api_keys, warn_if_exposed
    from service.drain import serve

    try:
        keys = load_api_keys(settings.api_keys.get_secret_value() if settings.api_keys else None)
    except ApiKeyError as e:
        print(f"iwae serve: {e}", file=sys.stderr)
        return 2
    warn_if_exposed(settings.host, len(keys))
    common = {"host": settings.host, "port": settings.port, "log_level": settings.log_level}
    if settings.workers > 1:
        # Worker processes build their own app from the environment (uvicorn needs an import string).
        os.environ.update(settings.to_env())
        serve("service.app:create_app_from_env", drain_s=settings.drain_s, workers=settings.workers, **common)
        return 0

    import torch

    from service.app import create_app
    from service.registry import ModelRegistry, NoModelsError

    if settings.threads:
        torch.set_num_threads(settings.threads)
    try:
        # Loaded here, before binding the port, so that a bad models path fails the command at once.
        registry = ModelRegistry.load(settings)
    except NoModelsError as e:
        log.error("%s", e)
        print(f"iwae serve: {e}", file=sys.stderr)
        return 1
    # On SIGTERM/SIGINT the server drains (IWAE_DRAIN_S) and this returns: exit status 0.
    serve(create_app(settings, registry=registry), drain_s=settings.drain_s, **common)
    return 0


if __name__ == "__main__":
    sys.exit(main())
