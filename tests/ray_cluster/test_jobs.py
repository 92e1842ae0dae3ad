"""Sharded evaluation and the reproduction grid as Ray tasks on the two-node cluster."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch

from iwae_cli import main as cli_main
from service.testing import tiny_model
from training.checkpoints import load_checkpoint, read_train_state_meta, state_path
from training.datasets import data_dir
from training.distributed import evaluate_sharded
from training.evaluate import evaluate_dataset
from training.reproduce import table1_markdown

from .conftest import RayCluster

MNIST = data_dir() / "mnist"
needs_mnist = pytest.mark.skipif(
    not any(MNIST.glob("train-images-idx3-ubyte*")), reason=f"real MNIST not in {MNIST} (set IWAE_DATA_DIR)"
)
ZOO_MODEL = Path(__file__).parents[2] / "models" / "zoo" / "mnist-iwae-k50-1l.safetensors"


def test_two_shard_evaluation_equals_the_local_one(ray_cluster: RayCluster) -> None:
    model = tiny_model(latent_dims=(4, 3), seed=1)
    x = torch.bernoulli(torch.full((150, 784), 0.3), generator=torch.Generator().manual_seed(0))
    memory = 4 * 50 * 7 * 4 * 16  # 16 images per batch: 10 batches, 2 shards of 5
    local = evaluate_dataset(model, x, 50, seed=3, memory_bytes=memory)
    sharded = evaluate_sharded(model, x, 50, shards=2, seed=3, memory_bytes=memory, device="cpu")
    # The same noise, image for image; float32 sums may round differently in another process (threads).
    torch.testing.assert_close(sharded.per_image, local.per_image, rtol=1e-6, atol=1e-5)
    for key in ("loglik", "elbo", "mc_stderr"):
        assert getattr(sharded, key) == pytest.approx(getattr(local, key), rel=1e-6), key
    assert sharded.loglik_stderr == pytest.approx(local.loglik_stderr, rel=1e-5)
    assert sharded.n_images == local.n_images == 150
    other_seed = evaluate_sharded(model, x, 50, shards=2, seed=4, memory_bytes=memory, device="cpu")
    assert other_seed.loglik != local.loglik


@needs_mnist
def test_eval_cli_with_ray_gives_the_local_outputs(
    ray_cluster: RayCluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = tmp_path / ZOO_MODEL.name
    ckpt.write_bytes(ZOO_MODEL.read_bytes())
    common = [str(ckpt), "--k", "100", "--max-images", "40", "--memory-mb", "1", "--au-images", "50"]
    common += [
        "--json",
        "--no-progress",
        "--device",
        "cpu",
        "--seed",
        "2",
        "--threads",
        "1",
        "--histogram",
        str(tmp_path / "h.png"),
    ]
    outputs = []
    for extra in ([], ["--ray", ray_cluster.address, "--shards", "2"]):
        assert cli_main(["eval", *common, *extra]) == 0
        outputs.append(json.loads(capsys.readouterr().out))
    local, sharded = outputs
    for key in ("n_images", "active_units", "log10_A_u", "k", "split", "binarization"):
        assert sharded[key] == local[key], key
    for key in ("loglik", "elbo", "mc_stderr"):
        assert sharded[key] == pytest.approx(local[key], rel=1e-6), key
    assert sharded["loglik_stderr"] == pytest.approx(local["loglik_stderr"], rel=1e-5)


@needs_mnist
def test_reproduce_grid_on_ray_writes_every_row(
    ray_cluster: RayCluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = ["mnist-vae-k1-1l", "mnist-iwae-k5-1l"]
    results = tmp_path / "results.md"
    argv = ["reproduce", "table1", "--ray", ray_cluster.address, "--rows", *rows, "--budget", "1"]
    argv += ["--max-train-images", "100", "--val-k", "1", "--eval-images", "8", "--threads", "1"]
    argv += ["--device", "cpu", "--out-dir", str(tmp_path / "zoo"), "--results", str(results)]
    assert cli_main(argv) == 0
    for name in rows:
        assert (tmp_path / "zoo" / f"{name}.safetensors").is_file()
        assert (tmp_path / "zoo" / f"{name}.log.jsonl").is_file()
    table = results.read_text()
    assert all(f"| {name} |" in table for name in rows)
    assert table1_markdown(tmp_path / "zoo") in table  # the table a local run writes from these checkpoints
    # Rerunning the grid resumes every row: finished, evaluated rows are neither retrained nor re-evaluated.
    before = {name: (tmp_path / "zoo" / f"{name}.safetensors").read_bytes() for name in rows}
    assert cli_main(argv) == 0
    assert {name: (tmp_path / "zoo" / f"{name}.safetensors").read_bytes() for name in rows} == before
    assert results.read_text() == table


def _log_lines(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def _without_seconds(lines: list[str]) -> list[dict[str, float]]:
    # Wall-clock seconds are the one field in which two identical runs differ.
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in lines]


@needs_mnist
def test_a_killed_grid_row_resumes_from_its_checkpoint_when_the_grid_is_rerun(
    ray_cluster: RayCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ray

    row, budget = "mnist-vae-k1-1l", 5

    def grid(name: str) -> list[str]:
        # 2,000 images: 100 steps an epoch, so the row is still training when the test kills it.
        argv = ["reproduce", "table1", "--ray", ray_cluster.address, "--rows", row, "--budget", str(budget)]
        argv += ["--max-train-images", "2000", "--val-k", "1", "--eval-images", "8", "--threads", "1"]
        argv += ["--device", "cpu", "--out-dir", str(tmp_path / name)]
        return [*argv, "--results", str(tmp_path / f"{name}.md")]

    ckpt, log = tmp_path / "killed" / f"{row}.safetensors", tmp_path / "killed" / f"{row}.log.jsonl"
    # The task refs each grid waits on, by driver thread, so that the test can cancel the row's task.
    refs: dict[str, list[ray.ObjectRef]] = {}
    real_wait = ray.wait

    def spying_wait(object_refs: list[ray.ObjectRef], *args: object, **kwargs: object) -> object:
        seen = refs.setdefault(threading.current_thread().name, [])
        seen.extend(r for r in object_refs if r not in seen)
        return real_wait(object_refs, *args, **kwargs)

    monkeypatch.setattr(ray, "wait", spying_wait)
    outcome: dict[str, object] = {}

    def run(name: str) -> None:
        try:
            outcome[name] = cli_main(grid(name))
        except Exception as e:  # expected for the killed grid: its cancelled row fails it
            outcome[name] = e

    # The uninterrupted run of the same row goes on beside the killed one (another folder, the cluster's
    # other CPUs): the result the resumed row must end with.
    drivers = {name: threading.Thread(target=run, args=(name,), name=name) for name in ("killed", "straight")}
    for driver in drivers.values():
        driver.start()
    deadline = time.monotonic() + 120
    while not (_log_lines(log) and state_path(ckpt).exists()):  # an epoch logged and its state saved
        assert drivers["killed"].is_alive() and time.monotonic() < deadline, outcome
        time.sleep(0.01)
    (ref,) = refs["killed"]
    ray.cancel(ref, force=True)  # kills the worker process running the row
    drivers["killed"].join(timeout=60)
    assert "TaskCancelledError" in str(outcome["killed"]), outcome

    saved_epoch = read_train_state_meta(state_path(ckpt))["epoch"]
    kept = _log_lines(log)[:saved_epoch]
    assert 1 <= saved_epoch < budget, f"the row was not killed mid-run (state at epoch {saved_epoch})"
    assert load_checkpoint(ckpt)[1]["epochs"] < budget

    assert cli_main(grid("killed")) == 0  # the rerun
    lines = _log_lines(log)
    assert [json.loads(line)["epoch"] for line in lines] == list(range(1, budget + 1))
    # The epochs saved before the kill were not trained again: their lines, timings included, are untouched.
    assert lines[:saved_epoch] == kept

    drivers["straight"].join(timeout=120)
    assert outcome["straight"] == 0, outcome
    straight = tmp_path / "straight" / f"{row}.safetensors"
    (resumed, resumed_card, _), (reference, straight_card, _) = load_checkpoint(ckpt), load_checkpoint(straight)
    for (name, a), (_, b) in zip(resumed.state_dict().items(), reference.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert _without_seconds(lines) == _without_seconds(_log_lines(straight.with_name(f"{row}.log.jsonl")))
    assert resumed_card["epochs"] == straight_card["epochs"] == budget
    assert resumed_card["eval"]["test"]["loglik"] == straight_card["eval"]["test"]["loglik"]
    assert (tmp_path / "killed.md").read_text() == (tmp_path / "straight.md").read_text()
