"""The reproduction grid: row names, the results table, and resuming a finished row without retraining."""

from __future__ import annotations

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
