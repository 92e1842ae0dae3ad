"""Sharded evaluation and the reproduction grid as Ray tasks on the two-node cluster."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from iwae_cli import main as cli_main
from service.testing import tiny_model
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
