"""Datasets, the training loop, evaluation and the `iwae` command line."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("iwae-serve")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0"
