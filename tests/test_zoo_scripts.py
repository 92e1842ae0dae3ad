"""zoo-training/finish.sh: a run reaches the zoo only when finished, evaluated into its card."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from models.checkpoint import parse_card, read_metadata, with_card
from training.datasets import data_dir

ROOT = Path(__file__).resolve().parents[1]
MNIST_DIR = data_dir() / "mnist"
pytestmark = [
    pytest.mark.skipif(shutil.which("bash") is None or shutil.which("pgrep") is None, reason="needs bash and pgrep"),
    pytest.mark.skipif(not any(MNIST_DIR.glob("train-images-idx3-ubyte*")), reason=f"real MNIST not in {MNIST_DIR}"),
]


def env(zoo: Path) -> dict[str, str]:
    return {**os.environ, "IWAE_REPO": str(ROOT), "IWAE_ZOO": str(zoo), "IWAE_PYTHON": sys.executable}


def train_tiny(runs: Path, epochs: int, init_from: Path | None = None, plan: int = 2) -> None:
    """A run of a ``plan``-epoch plan on 200 images; with ``epochs=1`` its log stops at epoch 1, as if interrupted."""
    args = [
        "--out",
        str(runs / "tiny.safetensors"),
        "--k",
        "5",
        "--epochs",
        str(plan),
        "--schedule",
        "constant-decay",
        "--max-train-images",
        "200",
        "--threads",
        "1",
        "--no-progress",
        "--val-k",
        "5",
    ]
    args += ["--init-from", str(init_from)] if init_from else []
    subprocess.run([sys.executable, "-m", "iwae_cli", "train", *args], check=True, cwd=ROOT, capture_output=True)
    if epochs < plan:
        log = runs / "tiny.log.jsonl"
        log.write_text(log.read_text().splitlines()[0] + "\n")


def finish(runs: Path, zoo: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(runs / "finish.sh"), "tiny", *extra], env=env(zoo), cwd=ROOT, capture_output=True, text=True
    )


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    runs = tmp_path / "zoo-training"
    runs.mkdir()
    shutil.copy(ROOT / "zoo-training" / "finish.sh", runs)
    return runs


def test_finish_refuses_a_run_short_of_its_epochs(runs: Path, tmp_path: Path) -> None:
    train_tiny(runs, epochs=1)
    result = finish(runs, tmp_path / "zoo")
    assert result.returncode == 2
    assert "has 1 of 2 epochs" in result.stderr
    assert (runs / "tiny.safetensors").exists() and not (tmp_path / "zoo").exists()


def test_finish_ships_a_stopped_run_only_when_asked_and_only_at_an_epoch_boundary(runs: Path, tmp_path: Path) -> None:
    train_tiny(runs, epochs=1, plan=1)
    ckpt = runs / "tiny.safetensors"
    card = parse_card(read_metadata(ckpt.read_bytes()))
    # A run of a longer plan stopped after its first epoch, as a paper-schedule run is (state: epoch 1, step 0).
    ckpt.write_bytes(with_card(ckpt.read_bytes(), {"schedule": card["schedule"] | {"epochs": 3}}))
    zoo, fast = tmp_path / "zoo", ("--max-images", "5", "--k", "5", "--au-images", "20")
    refused = finish(runs, zoo, *fast)
    assert refused.returncode == 2 and "has 1 of 3 epochs" in refused.stderr and "--stopped" in refused.stderr
    result = finish(runs, zoo, "--stopped", *fast)
    assert result.returncode == 0, result.stderr
    shipped = parse_card(read_metadata((zoo / "tiny.safetensors").read_bytes()))
    assert (shipped["epochs"], shipped["schedule"]["epochs"], shipped["eval"]["test"]["epochs_at_eval"]) == (1, 3, 1)


def test_finish_refuses_a_stopped_run_whose_log_and_checkpoint_disagree(runs: Path, tmp_path: Path) -> None:
    train_tiny(runs, epochs=1)  # the log says 1 epoch, the checkpoint and its state 2
    result = finish(runs, tmp_path / "zoo", "--stopped")
    assert result.returncode == 2 and "stopped mid-epoch or its log and checkpoint disagree" in result.stderr
    assert (runs / "tiny.safetensors").exists() and not (tmp_path / "zoo").exists()


def test_finish_evaluates_into_the_card_and_moves_the_run(runs: Path, tmp_path: Path) -> None:
    train_tiny(runs, epochs=2)
    zoo = tmp_path / "zoo"
    result = finish(runs, zoo, "--max-images", "20", "--k", "50", "--au-images", "50")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in runs.glob("tiny*")) == ["tiny.active-units.png"]  # state deleted, rest moved
    assert [json.loads(line)["epoch"] for line in (zoo / "logs" / "tiny.log.jsonl").read_text().splitlines()] == [1, 2]
    with safe_open(str(zoo / "tiny.safetensors"), "pt") as f:
        test = json.loads(f.metadata()["card"])["eval"]["test"]
    assert (test["k"], test["n_images"], test["epochs_at_eval"]) == (50, 20, 2)
    assert test["quantiles"] and test["nll"] > 0


def test_finish_appends_a_continuation_to_the_log_of_the_run_it_continued(runs: Path, tmp_path: Path) -> None:
    zoo = tmp_path / "zoo"
    train_tiny(runs, epochs=2)
    assert finish(runs, zoo, "--max-images", "5", "--k", "5", "--au-images", "20").returncode == 0
    train_tiny(runs, epochs=2, init_from=zoo / "tiny.safetensors")  # as extend.sh continues a zoo model
    result = finish(runs, zoo, "--max-images", "5", "--k", "5", "--au-images", "20")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (zoo / "logs" / "tiny.log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]
    assert [r.get("run_epoch") for r in records] == [None, None, 1, 2]
    assert not list(runs.glob("tiny*.jsonl")) and not list(runs.glob("tiny*.safetensors"))


def test_finish_as_ships_a_run_under_the_zoo_name_with_its_card_and_log_renamed(runs: Path, tmp_path: Path) -> None:
    train_tiny(runs, epochs=2)
    with safe_open(str(runs / "tiny.safetensors"), "pt") as f:
        weights = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
    zoo = tmp_path / "zoo"
    assert finish(runs, zoo, "--as", "-bad").returncode == 2  # refused before any work: not a model name
    result = finish(runs, zoo, "--as", "tiny-2l", "--max-images", "5", "--k", "5", "--au-images", "20")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in zoo.rglob("*.*")) == ["tiny-2l.log.jsonl", "tiny-2l.safetensors"]
    with safe_open(str(zoo / "tiny-2l.safetensors"), "pt") as f:
        card = json.loads(f.metadata()["card"])
        assert all(f.get_tensor(k).equal(v) for k, v in weights.items()) and set(f.keys()) == set(weights)
    assert card["name"] == "tiny-2l" and card["eval"]["test"]["n_images"] == 5
    assert not list(runs.glob("tiny*.safetensors"))
