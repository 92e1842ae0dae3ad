"""The `iwae` command: the one place that puts training and the service side by side.

`iwae train|eval|plot-log|data|reproduce` come from training/cli.py; `iwae serve ...` hands everything after
`serve` to the service's own parser (service/__main__.py). training/ and service/ never import each other.
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    # Imported here, not at the top: `iwae serve` must run in the serving image, which has no training extras.
    from training import cli as training_cli

    parser = argparse.ArgumentParser(
        prog="iwae", description="Importance weighted autoencoders: train, evaluate, serve."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    training_cli.add_commands(sub)
    # Listed for `iwae --help` only: main() hands `serve` to the service before this parser sees it.
    sub.add_parser("serve", help="run the HTTP service (see `iwae serve --help`)", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:
        # Everything after `serve` belongs to the service's own parser (including --help).
        from service.__main__ import main as serve_main

        return serve_main(argv[1:])
    from training import cli as training_cli

    args = build_parser().parse_args(argv)
    args.argv = argv  # the command line, for model cards
    return training_cli.run(args)
