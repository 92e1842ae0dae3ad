"""`iwae reproduce`: the paper's Table 1 grid and objective-swap experiment under an epoch budget.

Each row trains (resuming an interrupted run), evaluates test L_5000 into its model card, and the table is
rewritten after every row, so an interrupted reproduction picks up where it stopped. Runs are driven through
the typed configs (``train(TrainConfig)``, ``evaluate_checkpoint(EvalConfig)``), never through argv.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from models.device import DEVICE_CHOICES
from training.checkpoints import load_checkpoint, state_path
from training.cliargs import add_arguments, arg, from_arguments, positive_int
from training.config import LAYERS, OBJECTIVES, EvalConfig, TrainConfig
from training.eval_checkpoint import evaluate_checkpoint
from training.schedule import SCHEDULES
from training.train import train

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

SWAPS = {  # direction: (--flag holding its base model, fine-tuned name, objective, k)
    "vae_to_iwae": ("vae", "swap-vae-to-iwae-k50", "iwae", 50),
    "iwae_to_vae": ("iwae", "swap-iwae-to-vae-k1", "vae", 1),
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
        if row.name != name or row.objective not in OBJECTIVES or row.layers not in LAYERS:
            raise ValueError(f"bad row name {name!r}: expected DATASET-OBJECTIVE-kK-Ll, e.g. mnist-iwae-k50-1l")
        return row


ALL_ROWS = [Row(dataset, layers, objective, k) for (dataset, layers, objective, k) in PAPER_TABLE1]


@dataclass(frozen=True)
class Plan:
    """How every run of a reproduction is trained and evaluated (the common `iwae reproduce` flags)."""

    budget: int = field(metadata=arg("epochs per run", type=positive_int))
    schedule: str = field(
        default="compressed",
        metadata=arg(
            "learning-rate schedule of every run (the zoo's 300-epoch runs: constant-decay; see `iwae train --help`)",
            choices=tuple(s for s in SCHEDULES if s != "paper"),
        ),
    )
    seed: int = field(default=1, metadata=arg("seed of every run"))
    device: str = field(default="auto", metadata=arg("torch device", choices=DEVICE_CHOICES))
    data_root: Path | None = field(
        default=None, metadata=arg("data directory (default: IWAE_DATA_DIR or a cache dir)", flag="--data-dir")
    )
    out_dir: Path = field(default=Path("runs/zoo"), metadata=arg("checkpoints and logs"))
    eval_images: int | None = field(
        default=None, metadata=arg("evaluate on the first N test images (default: all)", type=positive_int)
    )
    max_train_images: int | None = field(
        default=None, metadata=arg("train on the first N images (smoke runs)", type=positive_int)
    )
    val_k: int = field(default=100, metadata=arg("k of the per-epoch validation L_k", type=positive_int))
    command: str | None = field(default=None, metadata=arg("", cli=False))  # for the model cards

    @classmethod
    def from_args(cls, a: argparse.Namespace) -> Plan:
        if a.threads:
            torch.set_num_threads(a.threads)
        return from_arguments(cls, a, command="iwae " + shlex.join(getattr(a, "argv", sys.argv[1:])))

    def train(self, out: Path, row: Row, init_from: Path | None = None) -> None:
        """Train ``out`` (continuing an interrupted or finished run there, else starting from ``init_from``)."""
        # The training state, not the checkpoint, marks a run to continue: a run killed after writing its first
        # checkpoint but before its state must start again from ``init_from``, not from random weights.
        resume = init_from is None or state_path(out).exists()
        print(f"reproduce: training {out.name} ({self.budget} epochs)", file=sys.stderr, flush=True)
        cfg = TrainConfig(
            out=out,
            dataset=row.dataset,
            objective=row.objective,
            k=row.k,
            layers=row.layers,
            epochs=self.budget,
            schedule=self.schedule,
            seed=self.seed,
            device=self.device,
            init_from=None if resume else init_from,
            resume=resume,
            progress=False,
            data_root=self.data_root,
            command=self.command,
            max_train_images=self.max_train_images,
            val_k=self.val_k,
        )
        train(cfg)

    def evaluate(self, ckpt: Path) -> dict[str, Any]:
        """Test L_5000 of ``ckpt`` into its card, unless the card already has it for the current weights."""
        _, card, _ = load_checkpoint(ckpt)
        if not self.needs_eval(card):
            return card
        print(f"reproduce: evaluating {ckpt.name} (test L_5000)", file=sys.stderr, flush=True)
        cfg = EvalConfig(
            ckpt=ckpt,
            k=5000,
            split="test",
            max_images=self.eval_images,
            device=self.device,
            data_root=self.data_root,
            update_card=True,
            progress=False,
        )
        evaluate_checkpoint(cfg)
        return load_checkpoint(ckpt)[1]

    def needs_eval(self, card: dict[str, Any]) -> bool:
        test = test_eval(card)
        want = self.eval_images or 10_000
        return (
            not test
            or test.get("k") != 5000
            or test.get("n_images") != want
            or test.get("epochs_at_eval") != card["epochs"]
        )


def test_eval(card: dict[str, Any]) -> dict[str, Any] | None:
    """The card's test-set evaluation (`iwae eval --split test --update-card`), if it has one."""
    return (card.get("eval") or {}).get("test")


def run_row(row: Row, plan: Plan) -> None:
    ckpt = plan.out_dir / f"{row.name}.safetensors"
    plan.train(ckpt, row)
    plan.evaluate(ckpt)


def _fmt_units(units: list[int]) -> str:
    return "+".join(str(u) for u in units)


def _fmt_wall(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds < 2 * 3600 else f"{seconds / 3600:.1f} h"


def lineage(card: dict[str, Any]) -> list[dict[str, Any]]:
    """The cards of the runs that made a model, first run first (``--init-from`` chains: the swap, a continued
    run), as far as each card kept a summary of the one it started from."""
    chain = [card]
    while (base := (chain[-1].get("init_from") or {}).get("card")) and len(chain) < 100:
        chain.append(base)
    return chain[::-1]


def _fmt_epochs(card: dict[str, Any]) -> str:
    """The epochs column: "300 + 100" for a model trained on from another; "300 + 40 dreg" where a run used
    another gradient estimator than the rest of the lineage (a model trained with one estimator throughout says so
    elsewhere); "300 of 3,280" for a run shipped before the end of its schedule (``finish.sh --stopped``)."""
    runs = [c for c in lineage(card) if c.get("epochs") is not None]
    mixed = len({c.get("estimator") for c in runs}) > 1

    def fmt(c: dict[str, Any]) -> str:
        other = mixed and c.get("estimator") not in (None, c.get("objective"))
        planned = (c.get("schedule") or {}).get("epochs")
        epochs = f"{c['epochs']} of {planned:,}" if planned and planned > c["epochs"] else str(c["epochs"])
        return f"{epochs} {c['estimator']}" if other else epochs

    return " + ".join(fmt(c) for c in runs)


def _total_wall(card: dict[str, Any]) -> float:
    """Training seconds of every run in the lineage whose card recorded them."""
    return sum(c.get("wall_time_s") or 0 for c in lineage(card))


def _table_row(name: str, card: dict[str, Any], paper: str) -> str:
    test = card["eval"]["test"]
    return (
        f"| {name} | {-test['loglik']:.2f} | {test['loglik_stderr']:.2f} | {_fmt_units(test['active_units'])} "
        f"| {_fmt_epochs(card)} | {_fmt_wall(_total_wall(card))} | {card.get('hardware', '?')} | {paper} |"
    )


def paper_column(card: dict[str, Any]) -> str:
    """What the paper reports for a model outside its Table 1 grid, or why there is nothing to compare with."""
    name = card.get("name", "")
    for direction, (_flag, swap_name, _objective, _k) in SWAPS.items():
        if name == swap_name:
            nll, units = PAPER_SWAP[direction]["after"]
            return f"{nll:.2f} ({units}) after the swap"
    if card.get("dataset") == "omniglot":
        return "not comparable: our 28×28 approximation of OMNIGLOT, not the paper's file"
    if card.get("estimator") not in (None, card.get("objective")):
        return f"not in the paper ({card['estimator']} gradient estimator)"
    return "not in the paper"


def _evaluated(ckpt: Path) -> dict[str, Any] | None:
    if not ckpt.exists():
        return None
    _, card, _ = load_checkpoint(ckpt)
    return card if test_eval(card) else None


def table1_markdown(out_dir: Path) -> str:
    """Table 1's rows found evaluated in ``out_dir``, then every other evaluated model there (DReG, OMNIGLOT,
    the objective swap) with what the paper says of it."""
    lines = [
        "| row | our test NLL (−L_5000) | ± s.e. | active units | epochs | wall time | hardware | paper NLL (units) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in ALL_ROWS:
        if card := _evaluated(out_dir / f"{row.name}.safetensors"):
            paper_nll, paper_units = PAPER_TABLE1[(row.dataset, row.layers, row.objective, row.k)]
            lines.append(_table_row(row.name, card, f"{paper_nll:.2f} ({paper_units})"))
    grid = {f"{row.name}.safetensors" for row in ALL_ROWS}
    for ckpt in sorted(out_dir.glob("*.safetensors")):
        if ckpt.name in grid or ckpt.name.endswith(".state.safetensors"):
            continue
        if card := _evaluated(ckpt):
            lines.append(_table_row(ckpt.stem, card, paper_column(card)))
    return "\n".join(lines)


def _cmd_table1(a: argparse.Namespace) -> int:
    rows = [Row.parse(r) for r in a.rows] if a.rows else ALL_ROWS
    plan = Plan.from_args(a)
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    if a.ray:
        return _table1_on_ray(rows, plan, a)
    for row in rows:
        run_row(row, plan)
        write_results(plan.out_dir, a.results)
    return 0


def _table1_on_ray(rows: list[Row], plan: Plan, a: argparse.Namespace) -> int:
    """Every row a Ray task writing into --out-dir, a folder every node shares; the table is rewritten here."""
    from training.distributed import connect, run_grid_on_ray

    plan = dataclasses.replace(plan, out_dir=plan.out_dir.resolve())  # every node sees the same absolute path
    connect(a.ray)
    run_grid_on_ray(
        rows,
        partial(run_row, plan=plan),
        cpus_per_row=a.threads or 1,
        gpus_per_row=1 if plan.device == "cuda" else 0,
        on_done=lambda _row: write_results(plan.out_dir, a.results),
    )
    return 0


def swap_one(name: str, base: Path, objective: str, k: int, plan: Plan) -> dict[str, Any]:
    """Fine-tune ``base`` on the other objective for the budget; its test NLL and active units before and after."""
    out = plan.out_dir / f"{name}.safetensors"
    plan.train(out, Row("mnist", 1, objective, k), init_from=base)
    card = plan.evaluate(out)
    _, base_card, _ = load_checkpoint(base)
    before, after = base_card["eval"]["test"], card["eval"]["test"]
    return {
        "base": base.name,
        "fine_tuned": out.name,
        "epochs": plan.budget,
        "before": {"nll": -before["loglik"], "active_units": before["active_units"]},
        "after": {"nll": -after["loglik"], "active_units": after["active_units"]},
    }


def _cmd_swap(a: argparse.Namespace) -> int:
    """Each direction whose base model is given; swap.json keeps the other direction's earlier result."""
    given = {d: getattr(a, flag) for d, (flag, *_rest) in SWAPS.items() if getattr(a, flag) is not None}
    if not given:
        raise ValueError("give --vae, --iwae or both: the converged base model(s) of the swap")
    for ckpt in given.values():
        _, card, _ = load_checkpoint(ckpt)
        if not test_eval(card):
            raise ValueError(f"{ckpt}: no test evaluation in its card: run `iwae eval {ckpt} --update-card` first")
    plan = Plan.from_args(a)
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    out = plan.out_dir / "swap.json"
    result = json.loads(out.read_text()) if out.exists() else {}
    for direction, base in given.items():
        _, name, objective, k = SWAPS[direction]
        result[direction] = swap_one(name, base, objective, k, plan) | {"command": plan.command}
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


def _cmd_figures(a: argparse.Namespace) -> int:
    """Sample grids of every model in --out-dir, one log A_u histogram over all of them, training curves."""
    from models.posterior import active_unit_variances
    from training.datasets import binarize, load_dataset
    from training.plots import plot_active_units, plot_training_curves, read_log, save_image_grid

    figs: Path = a.figures
    ckpts = sorted(a.out_dir.glob("*.safetensors"))
    ckpts = [c for c in ckpts if not c.name.endswith(".state.safetensors")]
    if not ckpts:
        raise ValueError(f"no checkpoints in {a.out_dir}")
    au_x: dict[str, torch.Tensor] = {}  # per data set: 500 training images, binarized once

    def au_images(dataset: str) -> torch.Tensor:
        if dataset not in au_x:
            train_x = load_dataset(dataset, a.data_dir).train
            pick = torch.randperm(train_x.shape[0], generator=torch.Generator().manual_seed(0))[:500]
            au_x[dataset] = binarize(train_x[pick], torch.Generator().manual_seed(0))
        return au_x[dataset]

    a_u, logs = {}, {}
    for ckpt in ckpts:
        model, card, _ = load_checkpoint(ckpt)
        name = card["name"]
        save_image_grid(model.sample(64, generator=torch.Generator().manual_seed(0)), figs / f"samples-{name}.png")
        a_u[name] = active_unit_variances(model, au_images(card["dataset"]), generator=torch.Generator().manual_seed(0))
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


def _cmd_results(a: argparse.Namespace) -> int:
    write_results(a.out_dir, a.results)
    print(f"{a.results}: table rewritten from the evaluated checkpoints in {a.out_dir}")
    return 0


def write_results(out_dir: Path, target: Path) -> None:
    """Rewrite the generated table inside ``target`` (docs/results.md) between its markers."""
    table = table1_markdown(out_dir)
    begin, end = "<!-- table1:begin -->", "<!-- table1:end -->"
    block = f"{begin}\n{table}\n{end}"
    if target.exists() and begin in target.read_text():
        text = target.read_text()
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
    else:
        text = f"# Results\n\n{block}\n"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)


def _add_results_arg(q: argparse.ArgumentParser) -> None:
    q.add_argument(
        "--results", type=Path, default=Path("docs/results.md"), help="table to (re)write (default: %(default)s)"
    )


def _add_out_dir_arg(q: argparse.ArgumentParser) -> None:
    q.add_argument("--out-dir", type=Path, default=Path("runs/zoo"), help="checkpoints (default: %(default)s)")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("reproduce", help="reproduce the paper's Table 1 and objective swap at a budget")
    rsub = p.add_subparsers(dest="experiment", required=True)
    for name, func in (("table1", _cmd_table1), ("swap", _cmd_swap)):
        q = rsub.add_parser(name)
        add_arguments(q, Plan)
        q.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's choice)")
        _add_results_arg(q)
        q.set_defaults(func=func)
        if name == "table1":
            q.add_argument("--rows", nargs="+", help="rows to run, e.g. mnist-iwae-k50-1l (default: all 12)")
            q.add_argument("--ray", metavar="ADDRESS", help="run every row as a task on this Ray cluster")
        else:
            q.add_argument("--vae", type=Path, help="converged VAE k=1 checkpoint: fine-tune it as an IWAE k=50")
            q.add_argument("--iwae", type=Path, help="converged IWAE k=50 checkpoint: fine-tune it as a VAE k=1")
    q = rsub.add_parser("results", help="rewrite --results' table from the evaluated checkpoints in --out-dir")
    _add_out_dir_arg(q)
    _add_results_arg(q)
    q.set_defaults(func=_cmd_results)
    q = rsub.add_parser("figures", help="sample grids, log A_u histogram and training curves of --out-dir")
    _add_out_dir_arg(q)
    q.add_argument("--figures", type=Path, default=Path("docs/figures"), help="output folder (default: %(default)s)")
    q.add_argument("--data-dir", type=Path, help="data directory (default: IWAE_DATA_DIR or a cache dir)")
    q.set_defaults(func=_cmd_figures)
