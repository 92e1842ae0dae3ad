"""`iwae compare`: two checkpoints on the same images and noise, the difference and its paired stderr."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from iwae_cli import main as cli_main
from models.config import ModelConfig
from models.networks import IWAE
from training.checkpoints import save_checkpoint
from training.compare import paired_difference
from training.datasets import data_dir

needs_mnist = pytest.mark.skipif(
    not any((data_dir() / "mnist").glob("t10k-images*")), reason=f"real MNIST not in {data_dir() / 'mnist'}"
)


def test_paired_difference_matches_a_float64_reference_and_removes_the_shared_spread() -> None:
    g = np.random.default_rng(0)
    hardness = g.normal(-90.0, 25.0, 400)  # most of the spread: which images are hard, shared by both
    a, b = hardness + g.normal(0, 0.5, 400), hardness + 0.3 + g.normal(0, 0.5, 400)
    mean, se = paired_difference(torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32))
    d = b - a
    assert mean == pytest.approx(d.mean(), abs=1e-4)
    assert se == pytest.approx(d.std(ddof=1) / math.sqrt(d.size), rel=1e-3)
    unpaired = math.hypot(a.std(ddof=1), b.std(ddof=1)) / math.sqrt(a.size)
    assert se < unpaired / 20  # the shared hardness is gone from the paired error
    with pytest.raises(ValueError, match="same images"):
        paired_difference(torch.zeros(3), torch.zeros(4))


def _checkpoint(path: Path, seed: int, dataset: str = "mnist") -> Path:
    torch.manual_seed(seed)
    save_checkpoint(path, IWAE(ModelConfig.paper(1)), {"name": path.stem, "dataset": dataset, "epochs": 0}, None)
    return path


def _json_run(args: list[str], capsys: pytest.CaptureFixture) -> dict:
    assert cli_main(args) == 0
    return json.loads(capsys.readouterr().out)


@needs_mnist
def test_compare_is_each_models_eval_on_the_same_images_and_noise(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    a, b = _checkpoint(tmp_path / "a.safetensors", 1), _checkpoint(tmp_path / "b.safetensors", 2)
    common = ["--k", "32", "--max-images", "16", "--seed", "5", "--no-progress", "--json"]
    r = _json_run(["compare", str(a), str(b), *common], capsys)
    for name, ckpt in (("a", a), ("b", b)):
        alone = _json_run(
            ["eval", str(ckpt), *common, "--au-images", "20", "--histogram", str(tmp_path / "h.png")], capsys
        )
        assert r[name]["loglik"] == pytest.approx(alone["loglik"], abs=1e-6)
        assert r[name]["n_images"] == 16
    assert r["difference"] == pytest.approx(r["b"]["loglik"] - r["a"]["loglik"], abs=1e-6)
    assert 0 < r["difference_stderr"] < r["unpaired_stderr"]
    # A model against itself: the same noise gives the same per-image values, so no difference at all.
    same = _json_run(["compare", str(a), str(a), *common], capsys)
    assert same["difference"] == 0.0 and same["difference_stderr"] == 0.0 and same["b_better_fraction"] == 0.0
    # One image: no standard error, said as null in strict JSON and in words on the terminal, not as NaN.
    assert cli_main(["compare", str(a), str(b), "--k", "8", "--max-images", "1", "--no-progress", "--json"]) == 0
    one = json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert one["difference_stderr"] is None and one["a"]["loglik_stderr"] is None
    assert cli_main(["compare", str(a), str(b), "--k", "8", "--max-images", "1", "--no-progress"]) == 0
    assert "n/a (one image)" in capsys.readouterr().out


def test_compare_refuses_models_of_different_data(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    a = _checkpoint(tmp_path / "a.safetensors", 1)
    b = _checkpoint(tmp_path / "b.safetensors", 2, dataset="omniglot")
    assert cli_main(["compare", str(a), str(b), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "iwae compare: error:" in err and "different data" in err and "Traceback" not in err
