"""`iwae reproduce`: the paper's Table 1 grid and objective-swap experiment under an epoch budget.

Each row trains (resuming an interrupted run), evaluates test L_5000 into its model card, and the table is
rewritten after every row, so an interrupted reproduction picks up where it stopped.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from training.checkpoints import load_checkpoint

# Table 1 of Burda et al. (2016), MNIST with dynamic binarization: NLL in nats (active units).
PAPER_TABLE1: dict[tuple[str, int, str, int], tuple[float, str]] = {
    ("mnist", 1, "vae", 1): (86.76, "19"),
    ("mnist", 1, "vae", 5): (86.47, "20"),
    ("mnist", 1, "vae", 50): (86.35, "20"),
    ("mnist", 1, "iwae", 1): (86.76, "19"),
    ("mnist", 1, "iwae", 5): (85.54, "22"),
    ("mnist", 1, "iwae", 50): (84.78, "25"),
    ("mnist", 2, "vae", 1): (85.33, "16+5"),
    ("mnist", 2, "vae", 5): (85.01, "17+5"),
    ("mnist", 2, "vae", 50): (84.78, "17+5"),
    ("mnist", 2, "iwae", 1): (85.33, "16+5"),
    ("mnist", 2, "iwae", 5): (83.89, "21+5"),
    ("mnist", 2, "iwae", 50): (82.90, "26+7"),
}
PAPER_SWAP = {
    "vae_to_iwae": {"before": (86.76, 19), "after": (84.88, 22)},
    "iwae_to_vae": {"before": (84.78, 25), "after": (86.02, 23)},
}


@dataclass(frozen=True)
class Row:
    dataset: str
    layers: int
    objective: str
    k: int

    @property
    def name(self) -> str:
        return f"{self.dataset}-{self.objective}-k{self.k}-{self.layers}l"

    @classmethod
    def parse(cls, name: str) -> Row:
        try:
            dataset, objective, k, layers = name.rsplit("-", 3)
            row = cls(dataset, int(layers.removesuffix("l")), objective, int(k.removeprefix("k")))
        except ValueError:
            raise ValueError(
                f"bad row name {name!r}: expected DATASET-OBJECTIVE-kK-Ll, e.g. mnist-iwae-k50-1l"
            ) from None
        if row.name != name or row.objective not in ("vae", "iwae") or row.layers not in (1, 2):
            raise ValueError(f"bad row name {name!r}: expected DATASET-OBJECTIVE-kK-Ll, e.g. mnist-iwae-k50-1l")
        return row


ALL_ROWS = [Row(dataset, layers, objective, k) for (dataset, layers, objective, k) in PAPER_TABLE1]


def _train_argv(row: Row, out: Path, a: argparse.Namespace) -> list[str]:
    argv = ["train", "--dataset", row.dataset, "--objective", row.objective, "--k", str(row.k)]
    argv += ["--layers", str(row.layers), "--epochs", str(a.budget), "--seed", str(a.seed), "--out", str(out)]
    argv += ["--device", a.device, "--resume", "--no-progress"]
    for flag in ("max_train_images", "val_k"):  # smoke runs
        if getattr(a, flag, None):
            argv += [f"--{flag.replace('_', '-')}", str(getattr(a, flag))]
    return argv + _common(a)


def _common(a: argparse.Namespace) -> list[str]:
    extra = []
    if a.threads:
        extra += ["--threads", str(a.threads)]
    if a.data_dir:
        extra += ["--data-dir", str(a.data_dir)]
    return extra


def _eval_argv(ckpt: Path, a: argparse.Namespace) -> list[str]:
    argv = ["eval", str(ckpt), "--k", "5000", "--split", "test", "--update-card", "--no-progress", "--json"]
    argv += ["--device", a.device]
    if a.eval_images:
        argv += ["--max-images", str(a.eval_images)]
    return argv + _common(a)


def _run(argv: list[str]) -> None:
    from training.cli import main

    print("$ iwae " + shlex.join(argv), file=sys.stderr, flush=True)
    code = main(argv)
    if code != 0:
        raise RuntimeError(f"`iwae {shlex.join(argv)}` failed with exit code {code}")


def _needs_eval(card: dict[str, Any], a: argparse.Namespace) -> bool:
    test = (card.get("eval") or {}).get("test")
    want = a.eval_images or 10_000
    return (
        not test
        or test.get("k") != 5000
        or test.get("n_images") != want
        or test.get("epochs_at_eval") != card["epochs"]
    )


def run_row(row: Row, a: argparse.Namespace) -> None:
    ckpt = a.out_dir / f"{row.name}.safetensors"
    _run(_train_argv(row, ckpt, a))
    _, card, _ = load_checkpoint(ckpt)
    if _needs_eval(card, a):
        _run(_eval_argv(ckpt, a))


def _fmt_units(units: list[int]) -> str:
    return "+".join(str(u) for u in units)


def table1_markdown(out_dir: Path) -> str:
    lines = [
        "| row | our test NLL (−L_5000) | ± s.e. | active units | epochs | wall time | hardware | paper NLL (units) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in ALL_ROWS:
        ckpt = out_dir / f"{row.name}.safetensors"
        if not ckpt.exists():
            continue
        _, card, _ = load_checkpoint(ckpt)
        test = (card.get("eval") or {}).get("test")
        if not test:
            continue
        paper_nll, paper_units = PAPER_TABLE1[(row.dataset, row.layers, row.objective, row.k)]
        lines.append(
            f"| {row.name} | {-test['loglik']:.2f} | {test['loglik_stderr']:.2f} | {_fmt_units(test['active_units'])} "
            f"| {card['epochs']} | {card.get('wall_time_s', 0) / 60:.0f} min | {card.get('hardware', '?')} "
            f"| {paper_nll:.2f} ({paper_units}) |"
        )
    return "\n".join(lines)


def _cmd_table1(a: argparse.Namespace) -> int:
    rows = [Row.parse(r) for r in a.rows] if a.rows else ALL_ROWS
    a.out_dir.mkdir(parents=True, exist_ok=True)
    if a.ray:
        return _table1_on_ray(rows, a)
    for row in rows:
        run_row(row, a)
        write_results(a)
    return 0


def _table1_on_ray(rows: list[Row], a: argparse.Namespace) -> int:
    """Every row a Ray task writing into --out-dir, a folder every node shares; the table is rewritten here."""
    from functools import partial

    from training.distributed import connect, run_grid_on_ray

    a.out_dir = a.out_dir.resolve()
    connect(a.ray)
    run_grid_on_ray(
        rows,
        partial(run_row, a=a),
        cpus_per_row=a.threads or 1,
        gpus_per_row=1 if a.device == "cuda" else 0,
        on_done=lambda _row: write_results(a),
    )
    return 0


def _swap_one(name: str, base: Path, objective: str, k: int, a: argparse.Namespace) -> dict[str, Any]:
    out = a.out_dir / f"{name}.safetensors"
    argv = ["train", "--objective", objective, "--k", str(k), "--epochs", str(a.budget), "--seed", str(a.seed)]
    argv += ["--init-from", str(base), "--out", str(out), "--device", a.device, "--no-progress"]
    if out.exists():
        argv = [x for x in argv if x not in ("--init-from", str(base))] + ["--resume"]
    _run(argv + _common(a))
    _, card, _ = load_checkpoint(out)
    if _needs_eval(card, a):
        _run(_eval_argv(out, a))
        _, card, _ = load_checkpoint(out)
    _, base_card, _ = load_checkpoint(base)
    before, after = base_card["eval"]["test"], card["eval"]["test"]
    return {
        "base": base.name,
        "fine_tuned": out.name,
        "epochs": a.budget,
        "before": {"nll": -before["loglik"], "active_units": before["active_units"]},
        "after": {"nll": -after["loglik"], "active_units": after["active_units"]},
    }


def _cmd_swap(a: argparse.Namespace) -> int:
    for ckpt in (a.vae, a.iwae):
        _, card, _ = load_checkpoint(ckpt)
        if not (card.get("eval") or {}).get("test"):
            raise ValueError(f"{ckpt}: no test evaluation in its card: run `iwae eval {ckpt} --update-card` first")
    a.out_dir.mkdir(parents=True, exist_ok=True)
    result = {
        "vae_to_iwae": _swap_one("swap-vae-to-iwae-k50", a.vae, "iwae", 50, a),
        "iwae_to_vae": _swap_one("swap-iwae-to-vae-k1", a.iwae, "vae", 1, a),
        "command": "iwae " + shlex.join(sys.argv[1:]),
    }
    (a.out_dir / "swap.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


def _cmd_figures(a: argparse.Namespace) -> int:
    """Sample grids of every model in --out-dir, one log A_u histogram over all of them, training curves."""
    import torch

    from training.datasets import binarize, load_dataset
    from training.evaluate import active_unit_stats
    from training.plots import plot_active_units, plot_training_curves, read_log, save_image_grid

    figs: Path = a.figures
    ckpts = sorted(a.out_dir.glob("*.safetensors"))
    ckpts = [c for c in ckpts if not c.name.endswith(".state.safetensors")]
    if not ckpts:
        raise ValueError(f"no checkpoints in {a.out_dir}")
    train_x = load_dataset("mnist", a.data_dir).train
    au_x = binarize(
        train_x[torch.randperm(train_x.shape[0], generator=torch.Generator().manual_seed(0))[:500]],
        torch.Generator().manual_seed(0),
    )
    a_u, logs = {}, {}
    for ckpt in ckpts:
        model, card, _ = load_checkpoint(ckpt)
        name = card["name"]
        save_image_grid(model.sample(64, generator=torch.Generator().manual_seed(0)), figs / f"samples-{name}.png")
        a_u[name] = active_unit_stats(model, au_x, seed=0)
        for log in (ckpt.with_name(name + ".log.jsonl"), ckpt.parent / "logs" / f"{name}.log.jsonl"):
            if log.exists():
                logs[name] = read_log(log)
                break
    # The paper's comparison (VAE vs IWAE, one layer) on its own, then every model.
    pair = {n: a_u[n] for n in ("mnist-vae-k1-1l", "mnist-iwae-k50-1l") if n in a_u}
    plot_active_units(pair or a_u, figs / "active-units.png")
    plot_active_units(a_u, figs / "active-units-all.png")
    plot_training_curves(logs, figs / "training-curves.png")
    print(f"figures written to {figs}")
    return 0


def write_results(a: argparse.Namespace) -> None:
    """Rewrite the generated table inside docs/results.md between its markers (or print it)."""
    table = table1_markdown(a.out_dir)
    target: Path = a.results
    begin, end = "<!-- table1:begin -->", "<!-- table1:end -->"
    block = f"{begin}\n{table}\n{end}"
    if target.exists() and begin in target.read_text():
        text = target.read_text()
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
    else:
        text = f"# Results\n\n{block}\n"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("reproduce", help="reproduce the paper's Table 1 and objective swap at a budget")
    rsub = p.add_subparsers(dest="experiment", required=True)
    for name, func in (("table1", _cmd_table1), ("swap", _cmd_swap)):
        q = rsub.add_parser(name)
        q.add_argument("--budget", type=int, required=True, help="epochs per run (compressed paper schedule)")
        q.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
        q.add_argument("--seed", type=int, default=1)
        q.add_argument("--threads", type=int)
        q.add_argument("--data-dir", type=Path)
        q.add_argument("--out-dir", type=Path, default=Path("runs/zoo"), help="checkpoints and logs")
        q.add_argument("--results", type=Path, default=Path("docs/results.md"), help="table to (re)write")
        q.add_argument("--eval-images", type=int, help="evaluate on the first N test images (default all)")
        q.set_defaults(func=func)
        if name == "table1":
            q.add_argument("--rows", nargs="+", help="rows to run, e.g. mnist-iwae-k50-1l (default: all 12)")
            q.add_argument("--ray", metavar="ADDRESS", help="run every row as a task on this Ray cluster")
            q.add_argument("--max-train-images", type=int, help="train on the first N images (smoke runs)")
            q.add_argument("--val-k", type=int, help="k of the per-epoch validation L_k (smoke runs)")
        else:
            q.add_argument("--vae", type=Path, required=True, help="converged VAE k=1 checkpoint")
            q.add_argument("--iwae", type=Path, required=True, help="converged IWAE k=50 checkpoint")
    q = rsub.add_parser("figures", help="sample grids, log A_u histogram and training curves of --out-dir")
    q.add_argument("--out-dir", type=Path, default=Path("runs/zoo"))
    q.add_argument("--figures", type=Path, default=Path("docs/figures"))
    q.add_argument("--data-dir", type=Path)
    q.set_defaults(func=_cmd_figures)
