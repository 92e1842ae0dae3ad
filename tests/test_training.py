"""The training loop, schedules, resume, the eval command and the CLI's error handling."""

from __future__ import annotations

import itertools
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from iwae_cli import main as cli_main
from models.checkpoint import CheckpointError
from models.engine import bound_stats, engine_log_weights
from models.estimators import ESTIMATORS
from training import train as train_mod
from training.checkpoints import load_checkpoint, read_train_state_meta, state_path
from training.datasets import Dataset, binarize, data_dir, load_dataset, subset
from training.schedule import Schedule, paper_stage_lr
from training.train import TrainConfig, log_path, train

MNIST_DIR = data_dir() / "mnist"
needs_mnist = pytest.mark.skipif(
    not any(MNIST_DIR.glob("train-images-idx3-ubyte*")), reason=f"real MNIST not in {MNIST_DIR}"
)


def synthetic_dataset(n: int = 200, seed: int = 0) -> Dataset:
    """Noisy copies of four prototypes: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    protos = (torch.rand(4, 784, generator=g) < 0.3).float() * 0.9 + 0.05
    x = protos[torch.randint(0, 4, (n,), generator=g)]
    x = (x + 0.05 * torch.rand(x.shape, generator=g)).clamp(0, 1)
    return Dataset("mnist", x[: n - 40], x[n - 40 : n - 20], x[n - 20 :], "dynamic", x[: n - 40].mean(0), "synthetic")


def test_compressed_schedule_keeps_the_paper_stages_in_proportion() -> None:
    paper = Schedule.paper()
    assert paper.epochs == 3280
    assert paper.stage_bounds()[0] == 1 and paper.stage_bounds()[-1] == 3280
    small = Schedule("compressed", 328)
    lengths = torch.diff(torch.tensor([0.0, *small.stage_bounds()]))
    assert torch.allclose(lengths, torch.tensor([3.0**i / 10 for i in range(8)], dtype=lengths.dtype))
    assert small.lr_at(0.0) == pytest.approx(1e-3)
    assert small.lr_at(327.9) == pytest.approx(1e-4)
    assert small.lr_at(0.35) == pytest.approx(paper_stage_lr(1))  # stage 1 spans [0.1, 0.4)
    with pytest.raises(ValueError, match="unknown schedule"):
        Schedule("linear", 10)


@pytest.mark.parametrize(
    ("objective", "estimator", "match"),
    [("vae", "dreg", "does not estimate"), ("iwae", "vae", "does not estimate"), ("elbo", None, "objective")],
)
def test_train_config_rejects_inconsistent_choices(objective: str, estimator: str | None, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TrainConfig(out=Path("x.safetensors"), objective=objective, estimator=estimator)


def test_interrupted_run_resumes_to_the_same_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = synthetic_dataset()
    common = dict(k=3, epochs=2, batch_size=20, seed=3, val_k=5, progress=False, device="cpu")
    straight = tmp_path / "straight.safetensors"
    train(TrainConfig(out=straight, **common), data)

    # Interrupt in the middle of the second epoch, after a mid-epoch checkpoint.
    interrupted = tmp_path / "resumed.safetensors"
    real = ESTIMATORS["iwae"]
    calls = {"n": 0}

    def flaky(model, x, k):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 12:
            raise KeyboardInterrupt
        return real(model, x, k)

    monkeypatch.setitem(ESTIMATORS, "iwae", flaky)
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(out=interrupted, checkpoint_minutes=0.0, **common), data)
    monkeypatch.setitem(ESTIMATORS, "iwae", real)
    assert state_path(interrupted).exists()
    card = train(TrainConfig(out=interrupted, resume=True, **common), data)

    assert card["epochs"] == 2
    a, _, _ = load_checkpoint(straight)
    b, _, _ = load_checkpoint(interrupted)
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(pa, pb), name
    lines = log_path(interrupted).read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]


class _Killed(BaseException):
    """Stands in for SIGKILL: not an Exception, so nothing in the loop catches it and saves the state."""


def _kill_at_save(monkeypatch: pytest.MonkeyPatch, nth: int) -> None:
    """Die at the ``nth`` training-state write: after that save's checkpoint, before its state (the window a
    kill of the process can land in)."""
    real, calls = train_mod.save_train_state, {"n": 0}

    def dying(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == nth:
            raise _Killed
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "save_train_state", dying)


def _records(log: Path) -> list[dict[str, float]]:
    """The log's records without their wall-clock seconds (the one field two identical runs differ in)."""
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in log.read_text().splitlines()]


def _assert_same_weights(a_path: Path, b_path: Path) -> None:
    a, _, _ = load_checkpoint(a_path)
    b, _, _ = load_checkpoint(b_path)
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(pa, pb), name


def test_a_run_killed_between_its_checkpoint_and_its_state_resumes_to_the_same_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = synthetic_dataset()
    common = dict(k=3, epochs=3, batch_size=20, seed=3, val_k=5, progress=False, device="cpu")
    straight = tmp_path / "straight.safetensors"
    train(TrainConfig(out=straight, **common), data)

    killed = tmp_path / "killed.safetensors"
    with monkeypatch.context() as m:
        _kill_at_save(m, nth=2)  # the end of epoch 2: its log line and checkpoint written, its state not
        with pytest.raises(_Killed):
            train(TrainConfig(out=killed, **common), data)
    assert load_checkpoint(killed)[1]["epochs"] == 2
    assert train_mod.read_train_state_meta(state_path(killed))["epoch"] == 1
    assert [r["epoch"] for r in _records(log_path(killed))] == [1, 2]

    card = train(TrainConfig(out=killed, resume=True, **common), data)
    assert card["epochs"] == 3
    # Epoch 2 ran again from the state's weights and moments, and is logged once.
    _assert_same_weights(straight, killed)
    assert _records(log_path(killed)) == _records(log_path(straight))


def test_a_fine_tuning_run_killed_before_its_first_state_starts_again_from_its_base(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from training import reproduce

    data = synthetic_dataset()
    base = tmp_path / "base.safetensors"
    train(TrainConfig(out=base, k=1, objective="vae", epochs=1, val_k=5, progress=False), data)
    monkeypatch.setattr(reproduce, "train", lambda cfg: train(cfg, data))
    row = reproduce.Row("mnist", 1, "iwae", 3)
    straight = reproduce.Plan(budget=2, seed=3, device="cpu", out_dir=tmp_path / "straight", val_k=5)
    straight.out_dir.mkdir()
    straight.train(straight.out_dir / "swap.safetensors", row, init_from=base)

    plan = reproduce.Plan(budget=2, seed=3, device="cpu", out_dir=tmp_path / "killed", val_k=5)
    out = plan.out_dir / "swap.safetensors"
    plan.out_dir.mkdir()
    with monkeypatch.context() as m:
        _kill_at_save(m, nth=1)  # the first checkpoint is written, no training state yet
        with pytest.raises(_Killed):
            plan.train(out, row, init_from=base)
    assert out.exists() and not state_path(out).exists()
    plan.train(out, row, init_from=base)  # the rerun of the experiment
    _assert_same_weights(straight.out_dir / "swap.safetensors", out)
    assert _records(log_path(out)) == _records(log_path(straight.out_dir / "swap.safetensors"))


def test_init_from_starts_from_the_given_weights(tmp_path: Path) -> None:
    data = synthetic_dataset()
    base = tmp_path / "base.safetensors"
    train(TrainConfig(out=base, k=1, objective="vae", epochs=1, val_k=5, progress=False), data)
    tuned = tmp_path / "tuned.safetensors"
    card = train(
        TrainConfig(out=tuned, k=5, epochs=1, val_k=5, progress=False, init_from=base, schedule="constant", lr=1e-12),
        data,
    )
    assert card["init_from"]["from"] == "base.safetensors" and card["init_from"]["card"]["objective"] == "vae"
    again = train(
        TrainConfig(out=tmp_path / "again.safetensors", k=5, epochs=1, val_k=5, progress=False, init_from=tuned), data
    )
    lineage = again["init_from"]["card"]  # the base's summary keeps its own base's, for the results table
    assert lineage["epochs"] == 1 and lineage["init_from"]["card"]["objective"] == "vae"
    assert lineage["wall_time_s"] == card["wall_time_s"]
    a, _, _ = load_checkpoint(base)
    b, _, _ = load_checkpoint(tuned)
    # A learning rate of 1e-12 leaves the weights where --init-from put them.
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.allclose(pa, pb, atol=1e-8)


@needs_mnist
def test_short_training_on_real_mnist_lowers_validation_nll(tmp_path: Path) -> None:
    data = subset(load_dataset("mnist"), 3000)
    from models.config import ModelConfig
    from models.networks import IWAE
    from training.evaluate import evaluate_dataset

    torch.manual_seed(0)
    valid = binarize(data.valid, torch.Generator().manual_seed(train_mod.VALID_BINARIZATION_SEED))
    before = evaluate_dataset(IWAE(ModelConfig.paper(1), data_mean=data.train_mean), valid, 100).loglik
    cfg = TrainConfig(out=tmp_path / "m.safetensors", k=5, epochs=3, schedule="constant", lr=1e-3, progress=False)
    card = train(cfg, data)
    after = card["valid_L100"]
    assert after > before + 25.0, (before, after)


@needs_mnist
def test_eval_command_matches_the_engine_and_updates_the_card(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ckpt = tmp_path / "m.safetensors"
    train(TrainConfig(out=ckpt, k=2, epochs=1, max_train_images=400, val_k=5, progress=False), load_dataset("mnist"))
    hist = tmp_path / "au.png"
    args = [
        "eval",
        str(ckpt),
        "--k",
        "64",
        "--max-images",
        "12",
        "--seed",
        "7",
        "--json",
        "--update-card",
        "--quantiles",
    ]
    assert cli_main([*args, "--histogram", str(hist), "--no-progress", "--au-images", "50"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n_images"] == 12 and out["k"] == 64 and hist.stat().st_size > 0

    # The same numbers straight from the engine: same images, binarization and noise convention.
    model, card, _ = load_checkpoint(ckpt)
    x = binarize(load_dataset("mnist").test, torch.Generator().manual_seed(7))[:12]
    noise = model.draw_noise(64, 12, generator=torch.Generator().manual_seed(7))
    stats = bound_stats(engine_log_weights(model, x, noise))
    assert out["loglik"] == pytest.approx(float(stats.loglik.double().mean()), abs=1e-4)
    assert out["elbo"] == pytest.approx(float(stats.elbo.double().mean()), abs=1e-4)
    # The Monte Carlo stderr and the reliability verdicts are the service's, image by image.
    assert out["mc_stderr"] == pytest.approx(float(stats.stderr.pow(2).mean().sqrt()), rel=1e-4)
    assert out["unreliable_fraction"] == pytest.approx(float((~stats.reliable).double().mean()))
    assert out["median_pareto_k"] == pytest.approx(float(stats.pareto_k.median()), abs=1e-4)
    assert card["eval"]["test"]["loglik"] == out["loglik"]
    assert card["eval"]["test"]["unreliable_fraction"] == out["unreliable_fraction"]
    assert card["eval"]["test"]["epochs_at_eval"] == card["epochs"] == 1
    assert len(card["eval"]["test"]["active_units"]) == 1
    # --quantiles: the per-image L_k quantiles at k=64 (the same images) and at k=50, for the service's percentiles.
    q = card["eval"]["test"]["quantiles"]
    assert set(q["by_k"]) == {"64", "50"} and len(q["probs"]) == len(q["by_k"]["64"]) == 101
    assert q["by_k"]["64"][0] == pytest.approx(float(stats.loglik.double().min()), abs=1e-4)
    assert q["by_k"]["64"][-1] == pytest.approx(float(stats.loglik.double().max()), abs=1e-4)
    assert q["by_k"]["64"][50] == pytest.approx(float(stats.loglik.double().quantile(0.5)), abs=1e-4)


def test_cli_reports_bad_input_without_traceback(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli_main(["eval", str(tmp_path / "missing.safetensors")]) == 2
    assert "no such checkpoint file" in capsys.readouterr().err
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    assert cli_main(["eval", str(bad)]) == 2
    assert "bad.safetensors" in capsys.readouterr().err
    code = cli_main(["train", "--objective", "vae", "--estimator", "dreg", "--epochs", "1", "--out", str(bad)])
    assert code == 2 and "does not estimate" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["train", "--k", "0", "--epochs", "1", "--out", str(bad)])
    assert "positive integer" in capsys.readouterr().err


def test_plot_log_draws_the_curves(tmp_path: Path) -> None:
    from PIL import Image

    log = tmp_path / "run.log.jsonl"
    log.write_text("\n".join(json.dumps({"epoch": e, "train_bound": -100 + e, "valid_L100": -95 + e}) for e in (1, 2)))
    out = tmp_path / "curves.png"
    assert cli_main(["plot-log", str(log), "--out", str(out)]) == 0
    with Image.open(out) as im:
        assert im.format == "PNG" and im.width > 500
    empty = tmp_path / "empty.log.jsonl"
    empty.write_text("")
    assert cli_main(["plot-log", str(empty)]) == 2


def test_load_checkpoint_names_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "nope.safetensors")


def test_resume_from_a_corrupt_training_state_names_the_file(tmp_path: Path) -> None:
    data = synthetic_dataset()
    out = tmp_path / "m.safetensors"
    cfg = dict(k=2, epochs=1, val_k=5, progress=False)
    train(TrainConfig(out=out, **cfg), data)
    state_path(out).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00garbage!")
    with pytest.raises(CheckpointError, match=r"m\.state\.safetensors: unreadable training state"):
        train(TrainConfig(out=out, resume=True, **cfg), data)


@pytest.mark.parametrize("name", ["cosine", "constant-decay"])
def test_smooth_schedules_span_the_paper_range_and_never_increase(name: str) -> None:
    from training.schedule import FINAL_LR, PAPER_BASE_LR

    s = Schedule(name, 10)
    lrs = [s.lr_at(e / 4) for e in range(41)]
    assert lrs[0] == pytest.approx(PAPER_BASE_LR)
    assert lrs[-1] == pytest.approx(FINAL_LR)
    assert all(b <= a + 1e-15 for a, b in itertools.pairwise(lrs))
    if name == "constant-decay":
        assert s.lr_at(4.9) == pytest.approx(PAPER_BASE_LR)  # flat for the first half
        assert s.lr_at(7.5) == pytest.approx((PAPER_BASE_LR * FINAL_LR) ** 0.5)  # geometric midpoint of the decay
    else:
        assert s.lr_at(5.0) == pytest.approx((PAPER_BASE_LR + FINAL_LR) / 2)


@needs_mnist
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_saves_the_state_mid_epoch(tmp_path: Path, sig: signal.Signals) -> None:
    """`kill` (SIGTERM) and `kill -INT` on a background run stop it like Ctrl-C: state saved at the current step.
    The child starts with SIGINT ignored, as a shell's background job does."""
    out = tmp_path / "run.safetensors"
    cmd = [
        sys.executable,
        "-m",
        "iwae_cli",
        "train",
        "--out",
        str(out),
        "--k",
        "50",
        "--epochs",
        "1",
        "--max-train-images",
        "40000",
        "--threads",
        "1",
        "--checkpoint-minutes",
        "60",
        "--val-k",
        "5",
    ]
    with (tmp_path / "stderr").open("w+") as err:
        proc = subprocess.Popen(
            cmd,
            stderr=err,
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).parents[1],
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
        )
        try:
            deadline = time.monotonic() + 120
            while not re.search(r"\d+it/s", (tmp_path / "stderr").read_text()) and time.monotonic() < deadline:
                time.sleep(0.2)
            proc.send_signal(sig)
            assert proc.wait(timeout=60) == 130
        finally:
            proc.kill()
    assert "interrupted: state saved" in (tmp_path / "stderr").read_text()
    meta = read_train_state_meta(state_path(out))
    assert meta["epoch"] == 0 and 0 < meta["step"] < 2000, meta
