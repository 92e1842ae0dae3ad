"""`python -m service` and `iwae serve`: run the HTTP service with uvicorn, draining on SIGTERM (service/drain.py).

Command-line flags override `IWAE_*` environment variables, which override the defaults in settings.py. The
flags are generated from the `Settings` fields: name, type, choices and help all come from the field.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import types
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import SecretStr, ValidationError
from pydantic.fields import FieldInfo

from service.settings import Settings, env_name, flag_name, metavar, shown_default

log = logging.getLogger("iwae.service")


def _argument(name: str, info: FieldInfo) -> dict[str, Any]:
    """argparse keywords for one settings field. Every flag defaults to None: unset flags leave the field to
    the environment and the field's default."""
    help_text = f"{(info.description or '').replace('`', '')} ({env_name(name)}; default: "
    help_text += shown_default(name, info).replace("`", "") + ")"
    kwargs: dict[str, Any] = {"help": help_text.replace("%", "%%")}
    annotation = info.annotation
    if get_origin(annotation) in (Union, types.UnionType):  # `int | None`: the flag takes the int
        annotation = next(a for a in get_args(annotation) if a is not type(None))
    if annotation is bool:  # --x sets true, --no-x false; absent leaves the environment's value
        kwargs.update(action=argparse.BooleanOptionalAction, default=None)
    elif annotation is SecretStr:
        kwargs.update(type=str, metavar=metavar(info))
    elif get_origin(annotation) is Literal:
        kwargs["choices"] = list(get_args(annotation))
    elif get_origin(annotation) is list:
        (item,) = get_args(annotation)
        kwargs.update(nargs="+", type=item, metavar=metavar(info))
    else:
        kwargs["type"] = annotation
    return kwargs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="iwae serve",
        description="Serve IWAE checkpoints over HTTP (L_k log-likelihoods, encodings, samples, active units). "
        "Every option also reads from an IWAE_* environment variable; flags win. See docs/service.md.",
    )
    for name, info in Settings.model_fields.items():
        p.add_argument(flag_name(name), dest=name, **_argument(name, info))
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
    common = {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        "access_log": settings.access_log,
    }
    if settings.workers > 1:
        # Worker processes build their own app from the environment (uvicorn needs an import string).
        os.environ.update(settings.to_env())
        serve("service.app:create_app_from_env", drain_s=settings.drain_s, workers=settings.workers, **common)
        return 0

    from service.app import create_app
    from service.registry import ModelRegistry, NoModelsError

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
