"""The `iwae` command line: train, eval, plot-log, data, serve, reproduce."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch

from models.checkpoint import CheckpointError
from training.datasets import DatasetError


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train an IWAE or VAE", description="Train an IWAE or VAE on a data set.")
    p.add_argument("--dataset", default="mnist", choices=["mnist", "binarized-mnist", "omniglot"])
    p.add_argument("--objective", default="iwae", choices=["iwae", "vae"])
    p.add_argument("--k", type=_positive_int, default=50, help="samples per image in the objective")
    p.add_argument("--layers", type=int, default=1, choices=[1, 2], help="stochastic layers (paper's nets)")
    p.add_argument("--estimator", choices=["iwae", "vae", "dreg", "stl"], help="gradient estimator")
    p.add_argument("--epochs", type=_positive_int, help="epoch budget (the compressed paper schedule by default)")
    p.add_argument(
        "--schedule",
        choices=["paper", "compressed", "constant"],
        help="paper: the full 3,280 epochs; compressed (default with --epochs): its 8 stages scaled to --epochs; "
        "constant: --lr throughout",
    )
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate of the constant schedule")
    p.add_argument("--batch-size", type=_positive_int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=_positive_int, help="torch CPU threads")
    p.add_argument("--out", type=Path, required=True, help="checkpoint to write (.safetensors)")
    p.add_argument("--init-from", type=Path, help="start from this checkpoint's weights (objective swap)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run at --out")
    p.add_argument("--val-k", type=_positive_int, default=100, help="k of the per-epoch validation L_k")
    p.add_argument("--checkpoint-minutes", type=float, default=10.0, help="mid-epoch checkpoint period")
    p.add_argument("--max-train-images", type=_positive_int, help="train on the first N images only")
    p.add_argument("--data-dir", type=Path, help="data directory (default: IWAE_DATA_DIR or a cache dir)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_train)


def _cmd_train(a: argparse.Namespace) -> int:
    from training.train import TrainConfig, train

    if a.threads:
        torch.set_num_threads(a.threads)
    schedule = a.schedule or "compressed"
    if schedule in ("compressed", "constant") and a.epochs is None:
        raise ValueError(f"the {schedule} schedule needs --epochs N (or use --schedule paper)")
    if schedule == "paper" and a.epochs is not None:
        raise ValueError("--schedule paper fixes the epochs at 3,280: drop --epochs, or use --schedule compressed")
    cfg = TrainConfig(
        out=a.out,
        dataset=a.dataset,
        objective=a.objective,
        k=a.k,
        layers=a.layers,
        estimator=a.estimator,
        epochs=a.epochs or 1,
        schedule=schedule,
        lr=a.lr,
        batch_size=a.batch_size,
        seed=a.seed,
        device=a.device,
        init_from=a.init_from,
        resume=a.resume,
        val_k=a.val_k,
        checkpoint_minutes=a.checkpoint_minutes,
        max_train_images=a.max_train_images,
        progress=not a.no_progress,
        data_root=a.data_dir,
        command="iwae " + shlex.join(sys.argv[1:]),
    )
    try:
        card = train(cfg)
    except KeyboardInterrupt:
        print(
            f"\ninterrupted: state saved; continue with the same command plus --resume (out {a.out})", file=sys.stderr
        )
        return 130
    print(json.dumps({"out": str(a.out), "epochs": card["epochs"], "wall_time_s": card.get("wall_time_s")}))
    return 0


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint: L_k, ELBO, active units")
    p.add_argument("ckpt", type=Path)
    p.add_argument("--k", type=_positive_int, default=5000)
    p.add_argument("--split", default="test", choices=["train", "valid", "test"])
    p.add_argument("--max-images", type=_positive_int, help="evaluate the first N images of the split")
    p.add_argument("--seed", type=int, default=0, help="seed of the samples and of the test binarization")
    p.add_argument("--memory-mb", type=_positive_int, default=512, help="memory budget of the engine")
    p.add_argument("--au-images", type=_positive_int, default=500, help="training images for active units")
    p.add_argument("--histogram", type=Path, help="PNG of log A_u (default: beside the checkpoint)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=_positive_int)
    p.add_argument("--data-dir", type=Path)
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--update-card", action="store_true", help="store the results in the model card")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_eval)


def _cmd_eval(a: argparse.Namespace) -> int:
    from training.evalcmd import run_eval

    if a.threads:
        torch.set_num_threads(a.threads)
    result = run_eval(a)
    if a.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"{a.ckpt.name}: {a.split} L_{a.k} = {result['loglik']:.3f} ± {result['loglik_stderr']:.3f} nats "
            f"(NLL {-result['loglik']:.3f}; over {result['n_images']} images), ELBO = {result['elbo']:.3f}, "
            f"Monte Carlo stderr {result['mc_stderr']:.3f} (RMS per image), "
            f"{100 * result['unreliable_fraction']:.1f}% of images unreliable (PSIS k̂ > 0.7), "
            f"active units {result['active_units']} (A_u > {result['active_units_threshold']}, "
            f"{result['active_units_images']} training images), {result['seconds']:.1f} s"
        )
    return 0


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


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the HTTP service (see `iwae serve --help`)", add_help=False)
    p.add_argument("args", nargs=argparse.REMAINDER)
    p.set_defaults(func=_cmd_serve)


def _cmd_serve(a: argparse.Namespace) -> int:
    from service.__main__ import main as serve_main

    return serve_main(a.args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="iwae", description="Importance weighted autoencoders: train, evaluate, serve."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_eval(sub)
    _add_plot_log(sub)
    from training import datacmd, reproduce

    datacmd.add_parser(sub)
    reproduce.add_parser(sub)
    _add_serve(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:
        # Everything after `serve` belongs to the service's own parser (including --help).
        from service.__main__ import main as serve_main

        return serve_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (CheckpointError, DatasetError, ValueError, FileNotFoundError) as e:
        print(f"iwae {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
