"""The reproduction grid: row names, the results table, and resuming a finished row without retraining."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from models.config import ModelConfig
from models.networks import IWAE
from training.checkpoints import save_checkpoint
from training.reproduce import ALL_ROWS, PAPER_TABLE1, Row, table1_markdown, write_results


def test_row_names_round_trip_and_bad_names_are_refused() -> None:
    assert len(ALL_ROWS) == 12
    for row in ALL_ROWS:
        assert Row.parse(row.name) == row
    assert Row.parse("mnist-iwae-k50-1l") == Row("mnist", 1, "iwae", 50)
    for bad in ("mnist-iwae-50-1l", "mnist-elbo-k5-1l", "mnist-iwae-k5-3l", "iwae"):
        with pytest.raises(ValueError, match="bad row name"):
            Row.parse(bad)


def _fake_evaluated(out_dir: Path, name: str, nll: float, units: list[int]) -> None:
    card = {
        "name": name,
        "epochs": 7,
        "wall_time_s": 600.0,
        "hardware": "test-cpu",
        "eval": {"test": {"loglik": -nll, "loglik_stderr": 0.31, "active_units": units, "k": 5000}},
    }
    save_checkpoint(out_dir / f"{name}.safetensors", IWAE(ModelConfig.paper(len(units))), card, None)


def test_results_table_lists_evaluated_rows_beside_the_paper(tmp_path: Path) -> None:
    _fake_evaluated(tmp_path, "mnist-iwae-k50-1l", 88.123, [31])
    _fake_evaluated(tmp_path, "mnist-vae-k1-2l", 90.5, [12, 3])
    table = table1_markdown(tmp_path)
    rows = [line for line in table.splitlines() if line.startswith("| mnist")]
    assert len(rows) == 2
    assert "| mnist-iwae-k50-1l | 88.12 | 0.31 | 31 | 7 | 10 min | test-cpu | 84.78 (25) |" in rows
    assert "12+3" in rows[1] and f"{PAPER_TABLE1[('mnist', 2, 'vae', 1)][0]:.2f}" in rows[1]

    results = tmp_path / "results.md"
    results.write_text("# Results\n\nintro\n<!-- table1:begin -->\nold\n<!-- table1:end -->\n\nafter\n")
    write_results(tmp_path, results)
    text = results.read_text()
    assert "intro" in text and "after" in text and "old" not in text and "88.12" in text


def _fake_card(out_dir: Path, name: str, nll: float, **card: object) -> None:
    base = {"name": name, "epochs": 300, "wall_time_s": 4 * 3600.0, "hardware": "test-cpu", "objective": "iwae"}
    base["eval"] = {"test": {"loglik": -nll, "loglik_stderr": 0.2, "active_units": [20], "k": 5000}}
    save_checkpoint(out_dir / f"{name}.safetensors", IWAE(ModelConfig.paper(1)), base | card, None)


def test_results_table_lists_models_outside_table1_with_what_the_paper_says(tmp_path: Path) -> None:
    _fake_evaluated(tmp_path, "mnist-iwae-k50-1l", 86.0, [22])
    _fake_card(tmp_path, "mnist-dreg-k50-1l", 85.5, dataset="mnist", estimator="dreg", k=50)
    _fake_card(tmp_path, "omniglot-vae-k1-1l", 116.7, dataset="omniglot", objective="vae", estimator="vae", k=1)
    _fake_card(tmp_path, "swap-vae-to-iwae-k50", 86.8, dataset="mnist", estimator="iwae", k=50)
    save_checkpoint(tmp_path / "unevaluated.safetensors", IWAE(ModelConfig.paper(1)), {"name": "x"}, None)
    rows = {line.split(" | ")[0][2:]: line for line in table1_markdown(tmp_path).splitlines()[2:]}
    assert list(rows) == ["mnist-iwae-k50-1l", "mnist-dreg-k50-1l", "omniglot-vae-k1-1l", "swap-vae-to-iwae-k50"]
    assert rows["mnist-dreg-k50-1l"].endswith("| 4.0 h | test-cpu | not in the paper (dreg gradient estimator) |")
    assert "not comparable: our 28×28 approximation of OMNIGLOT" in rows["omniglot-vae-k1-1l"]
    assert rows["swap-vae-to-iwae-k50"].endswith("| 84.88 (22) after the swap |")


def test_results_table_counts_the_epochs_and_hours_of_a_continued_model(tmp_path: Path) -> None:
    first = {"name": "mnist-iwae-k50-1l", "epochs": 300, "wall_time_s": 8 * 3600.0}
    _fake_card(tmp_path, "mnist-iwae-k50-1l", 85.9, epochs=100, wall_time_s=3600.0, init_from={"card": first})
    _fake_card(
        tmp_path, "swap-vae-to-iwae-k50", 86.8, epochs=10, wall_time_s=600.0, init_from={"card": {"epochs": 300}}
    )  # a card from before the summary kept the wall time
    rows = {line.split(" | ")[0][2:]: line for line in table1_markdown(tmp_path).splitlines()[2:]}
    assert "| 300 + 100 | 9.0 h | test-cpu | 84.78 (25) |" in rows["mnist-iwae-k50-1l"]
    assert "| 300 + 10 | 10 min |" in rows["swap-vae-to-iwae-k50"]


def test_results_table_follows_a_chain_of_continued_runs(tmp_path: Path) -> None:
    first = {"epochs": 300, "wall_time_s": 8 * 3600.0, "init_from": None}
    second = {"epochs": 100, "wall_time_s": 3600.0, "init_from": {"card": first}}
    _fake_card(tmp_path, "mnist-iwae-k50-1l", 85.9, epochs=50, wall_time_s=1800.0, init_from={"card": second})
    assert "| 300 + 100 + 50 | 9.5 h |" in table1_markdown(tmp_path)


def test_results_table_names_the_estimator_of_a_run_that_changed_it(tmp_path: Path) -> None:
    first = {"epochs": 300, "objective": "iwae", "estimator": "iwae", "wall_time_s": 8 * 3600.0}
    _fake_card(tmp_path, "mnist-iwae-k50-1l", 85.7, epochs=40, estimator="dreg", k=50, init_from={"card": first})
    _fake_card(tmp_path, "mnist-dreg-k50-1l", 85.8, dataset="mnist", estimator="dreg", k=50)
    rows = {line.split(" | ")[0][2:]: line for line in table1_markdown(tmp_path).splitlines()[2:]}
    assert "| 300 + 40 dreg | 12.0 h | test-cpu | 84.78 (25) |" in rows["mnist-iwae-k50-1l"]
    assert "| 300 | 4.0 h |" in rows["mnist-dreg-k50-1l"]  # one estimator throughout: the paper column says it


def test_results_table_says_how_far_a_stopped_run_got(tmp_path: Path) -> None:
    _fake_card(tmp_path, "mnist-iwae-k50-2l", 84.9, epochs=300, schedule={"name": "paper", "epochs": 3280})
    _fake_card(tmp_path, "mnist-iwae-k5-1l", 86.8, epochs=300, schedule={"name": "constant-decay", "epochs": 300})
    rows = {line.split(" | ")[0][2:]: line for line in table1_markdown(tmp_path).splitlines()[2:]}
    assert "| 300 of 3,280 | 4.0 h |" in rows["mnist-iwae-k50-2l"]
    assert "| 300 | 4.0 h |" in rows["mnist-iwae-k5-1l"]


def test_swap_runs_the_directions_given_and_keeps_the_other_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from iwae_cli import main as cli_main
    from training import reproduce

    for name in ("vae", "iwae"):
        _fake_card(tmp_path, name, 90.0)
    ran = []
    monkeypatch.setattr(
        reproduce, "swap_one", lambda name, base, objective, k, plan: ran.append(name) or {"base": base.name}
    )
    out = tmp_path / "out"
    common = ["reproduce", "swap", "--budget", "1", "--out-dir", str(out)]
    assert cli_main([*common, "--vae", str(tmp_path / "vae.safetensors")]) == 0
    assert ran == ["swap-vae-to-iwae-k50"]
    assert cli_main([*common, "--iwae", str(tmp_path / "iwae.safetensors")]) == 0
    assert ran == ["swap-vae-to-iwae-k50", "swap-iwae-to-vae-k1"]
    result = json.loads((out / "swap.json").read_text())
    assert result["vae_to_iwae"]["base"] == "vae.safetensors" and result["iwae_to_vae"]["base"] == "iwae.safetensors"
    assert "--iwae" in result["iwae_to_vae"]["command"] and "--vae" in result["vae_to_iwae"]["command"]
    assert cli_main(common) == 2  # neither base model: a CLI error naming the flags, no traceback


def test_results_command_rewrites_the_table_without_training(tmp_path: Path) -> None:
    from iwae_cli import main as cli_main

    _fake_card(tmp_path, "mnist-iwae-k5-1l", 86.84, dataset="mnist", k=5)
    results = tmp_path / "results.md"
    results.write_text("intro\n<!-- table1:begin -->\nold\n<!-- table1:end -->\n")
    assert cli_main(["reproduce", "results", "--out-dir", str(tmp_path), "--results", str(results)]) == 0
    text = results.read_text()
    assert "| mnist-iwae-k5-1l | 86.84 | 0.20 | 20 | 300 | 4.0 h | test-cpu | 85.54 (22) |" in text
    assert "old" not in text and not list(tmp_path.glob("*.state.safetensors"))
