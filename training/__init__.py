"""Datasets, the training loop, evaluation, figures and the training subcommands of `iwae` (see iwae_cli/)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("iwae-serve")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0"
