"""The training side of the `iwae` command: train, eval, compare, plot-log, data, reproduce.

The `iwae` entry point itself (iwae_cli/) adds `serve`; nothing here knows about the service. The train, eval
and compare flags are generated from TrainConfig, EvalConfig and CompareConfig (training/config.py).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import shlex
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from models.checkpoint import CheckpointError
from training import datacmd, reproduce
from training.cliargs import add_arguments, from_arguments, positive_int
from training.config import CompareConfig, EvalConfig, TrainConfig
from training.datasets import DatasetError

# What a command reports as "iwae CMD: error: ..." with exit status 2 instead of a traceback.
USER_ERRORS = (CheckpointError, DatasetError, ValueError, FileNotFoundError)


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add train, eval, compare, plot-log, data and reproduce to the `iwae` command's subparsers."""
    _add_train(sub)
    _add_eval(sub)
    _add_compare(sub)
    _add_plot_log(sub)
    datacmd.add_parser(sub)
    reproduce.add_parser(sub)


def run(args: argparse.Namespace) -> int:
    """Run a parsed command; bad input is reported in one line naming the problem."""
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as e:
        print(f"iwae {args.command}: error: {e}", file=sys.stderr)
        return 2


def _add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's choice)")


def _set_threads(n: int | None) -> None:
    if n:
        torch.set_num_threads(n)


def _command_line(a: argparse.Namespace) -> str:
    return "iwae " + shlex.join(getattr(a, "argv", sys.argv[1:]))


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train an IWAE or VAE", description="Train an IWAE or VAE on a data set.")
    add_arguments(p, TrainConfig)
    _add_threads(p)
    p.set_defaults(func=_cmd_train)


def _cmd_train(a: argparse.Namespace) -> int:
    from training.train import train

    _set_threads(a.threads)
    cfg = from_arguments(TrainConfig, a, command=_command_line(a))
    try:
        with _stop_signals_interrupt():
            card = train(cfg)
    except KeyboardInterrupt:
        print(
            f"\ninterrupted: state saved; continue with the same command plus --resume (out {cfg.out})",
            file=sys.stderr,
        )
        return 130
    print(json.dumps({"out": str(cfg.out), "epochs": card["epochs"], "wall_time_s": card.get("wall_time_s")}))
    return 0


@contextlib.contextmanager
def _stop_signals_interrupt() -> Iterator[None]:
    """SIGTERM and SIGINT save the state and stop like Ctrl-C. Without this, `kill`, `docker stop` or a
    cluster's preemption (SIGTERM) lose everything since the last periodic checkpoint, and so does `kill -INT`
    on a run started in the background, where the shell sets SIGINT to ignored."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _add_config_command(
    sub: argparse._SubParsersAction,
    name: str,
    help_text: str,
    cls: type,
    compute: str,
    summary: Callable[[Any, dict[str, Any]], str],
) -> None:
    """A subcommand whose flags are the fields of ``cls`` plus --json and --threads: it builds the config, runs
    ``compute`` ("module:function", imported only when the command runs, so that `iwae --help` stays quick) on it
    and prints the result's ``to_dict()`` as JSON or as ``summary``'s text."""

    def command(a: argparse.Namespace) -> int:
        _set_threads(a.threads)
        cfg = from_arguments(cls, a)
        module, function = compute.split(":")
        r = getattr(importlib.import_module(module), function)(cfg).to_dict()
        print(json.dumps(r, indent=2) if a.json else summary(cfg, r))
        return 0

    p = sub.add_parser(name, help=help_text)
    add_arguments(p, cls)
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    _add_threads(p)
    p.set_defaults(func=command)


def _add_eval(sub: argparse._SubParsersAction) -> None:
    help_text = "evaluate a checkpoint: L_k, ELBO, active units"
    compute = "training.eval_checkpoint:evaluate_checkpoint"
    _add_config_command(sub, "eval", help_text, EvalConfig, compute, _eval_summary)


def _eval_summary(cfg: EvalConfig, r: dict[str, Any]) -> str:
    return (
        f"{cfg.ckpt.name}: {cfg.split} L_{cfg.k} = {r['loglik']:.3f} ± {_fmt_stderr(r['loglik_stderr'])} nats "
        f"(NLL {-r['loglik']:.3f}; over {r['n_images']} images), ELBO = {r['elbo']:.3f}, "
        f"Monte Carlo stderr {_fmt_stderr(r['mc_stderr'], 'n/a')} (RMS per image), "
        f"{100 * r['unreliable_fraction']:.1f}% of images unreliable (PSIS k̂ > 0.7), "
        f"active units {r['active_units']} (A_u > {r['active_units_threshold']}, "
        f"{r['active_units_images']} training images), {r['seconds']:.1f} s"
    )


def _add_compare(sub: argparse._SubParsersAction) -> None:
    help_text = "compare two checkpoints on the same images and noise: L_k(B) - L_k(A) with its paired stderr"
    compute = "training.compare:compare_checkpoints"
    _add_config_command(sub, "compare", help_text, CompareConfig, compute, _compare_summary)


def _fmt_stderr(se: float | None, missing: str = "n/a (one image)") -> str:
    """A standard error, or why there is none (the JSON's null: over images, one image has no spread)."""
    return missing if se is None else f"{se:.3f}"


def _compare_summary(cfg: CompareConfig, r: dict[str, Any]) -> str:
    lines = [
        f"{name}: {cfg.split} L_{cfg.k} = {res['loglik']:.3f} ± {_fmt_stderr(res['loglik_stderr'])} nats"
        for name, res in ((cfg.a.name, r["a"]), (cfg.b.name, r["b"]))
    ]
    lines.append(
        f"B - A = {r['difference']:+.3f} ± {_fmt_stderr(r['difference_stderr'])} nats (paired over "
        f"{r['a']['n_images']} images, same binarization and noise seed; unpaired it would be ± "
        f"{_fmt_stderr(r['unpaired_stderr'])}); "
        f"B is higher on {100 * r['b_better_fraction']:.1f}% of images"
    )
    return "\n".join(lines)


def _add_plot_log(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot-log", help="draw training curves from JSONL logs to PNG")
    p.add_argument("logs", type=Path, nargs="+")
    p.add_argument("--out", type=Path, help="PNG path (default: beside the first log)")
    p.set_defaults(func=_cmd_plot_log)


def _cmd_plot_log(a: argparse.Namespace) -> int:
    from training.plots import plot_training_curves, read_log

    logs = {p.name.removesuffix(".log.jsonl"): read_log(p) for p in a.logs}
    out = a.out or a.logs[0].with_name(a.logs[0].name.removesuffix(".jsonl") + ".png")
    plot_training_curves(logs, out)
    print(out)
    return 0
