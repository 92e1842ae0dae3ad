"""The `iwae` entry point: flags generated from the typed configs, `serve` handed to the service, and
reproduce driving train/eval through typed configs."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from iwae_cli import build_parser, main
from models.config import ModelConfig
from models.networks import IWAE
from training import reproduce
from training.checkpoints import save_checkpoint
from training.cliargs import cli_fields, from_arguments
from training.config import EvalConfig, TrainConfig
from training.schedule import SCHEDULES


def _help(*argv: str, capsys: pytest.CaptureFixture) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize(
    ("command", "config"), [("train", TrainConfig), ("eval", EvalConfig), ("reproduce table1", reproduce.Plan)]
)
def test_help_lists_every_config_field_with_its_default(
    command: str, config: type, capsys: pytest.CaptureFixture
) -> None:
    text = " ".join(_help(*command.split(), capsys=capsys).split())
    for f in cli_fields(config):
        if f.metadata["positional"]:
            assert f.name in text
            continue
        flag = f.metadata["flag"] or "--" + f.name.replace("_", "-")
        assert flag in text, flag
        if f.default not in (None, dataclasses.MISSING) and not isinstance(f.default, bool):
            assert f"(default: {f.default})" in text, (flag, f.default)
    assert "--threads" in text


def test_parsed_defaults_are_the_config_defaults() -> None:
    args = build_parser().parse_args(["train", "--out", "m.safetensors", "--epochs", "3"])
    assert from_arguments(TrainConfig, args, command="c") == TrainConfig(
        out=Path("m.safetensors"), epochs=3, command="c"
    )
    args = build_parser().parse_args(["eval", "m.safetensors"])
    assert from_arguments(EvalConfig, args) == EvalConfig(ckpt=Path("m.safetensors"))
    args = build_parser().parse_args(["reproduce", "swap", "--budget", "2", "--vae", "v", "--iwae", "i"])
    args.argv = ["reproduce", "swap", "--budget", "2"]
    plan = reproduce.Plan.from_args(args)
    assert plan == reproduce.Plan(budget=2, command="iwae reproduce swap --budget 2")


def test_choices_come_from_one_place() -> None:
    train = next(
        a for a in build_parser()._subparsers._group_actions[0].choices["train"]._actions if a.dest == "schedule"
    )
    assert tuple(train.choices) == SCHEDULES


def test_the_schedule_decides_whether_epochs_are_needed() -> None:
    assert TrainConfig(out=Path("m.safetensors"), schedule="paper").epochs == 3280
    with pytest.raises(ValueError, match="needs --epochs"):
        TrainConfig(out=Path("m.safetensors"))
    with pytest.raises(ValueError, match="fixes the epochs"):
        TrainConfig(out=Path("m.safetensors"), schedule="paper", epochs=5)


def test_serve_is_handed_to_the_service_parser(capsys: pytest.CaptureFixture) -> None:
    text = _help("serve", capsys=capsys)
    assert "--port" in text and "--models" in text


def test_reproduce_trains_and_evaluates_through_typed_configs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Any] = []

    def fake_train(cfg: TrainConfig) -> dict[str, Any]:
        calls.append(cfg)
        if cfg.resume and cfg.out.exists():
            return {}  # a finished run: resuming it changes nothing
        save_checkpoint(
            cfg.out, IWAE(ModelConfig.paper(cfg.layers)), {"name": cfg.out.stem, "epochs": cfg.epochs}, None
        )
        return {}

    def fake_eval(cfg: EvalConfig) -> None:
        calls.append(cfg)
        test = {"k": 5000, "n_images": 20, "epochs_at_eval": 4, "loglik": -90.0, "active_units": [3]}
        save_checkpoint(
            cfg.ckpt, IWAE(ModelConfig.paper(1)), {"name": cfg.ckpt.stem, "epochs": 4, "eval": {"test": test}}, None
        )

    monkeypatch.setattr(reproduce, "train", fake_train)
    monkeypatch.setattr(reproduce, "evaluate_checkpoint", fake_eval)
    plan = reproduce.Plan(budget=4, seed=3, device="cpu", out_dir=tmp_path, eval_images=20, command="iwae reproduce")
    row = reproduce.Row.parse("mnist-iwae-k5-1l")
    reproduce.run_row(row, plan)
    train_cfg, eval_cfg = calls
    assert isinstance(train_cfg, TrainConfig) and isinstance(eval_cfg, EvalConfig)
    assert (train_cfg.objective, train_cfg.k, train_cfg.layers, train_cfg.epochs, train_cfg.seed) == (
        "iwae",
        5,
        1,
        4,
        3,
    )
    assert train_cfg.resume and train_cfg.init_from is None and train_cfg.command == "iwae reproduce"
    assert (eval_cfg.k, eval_cfg.split, eval_cfg.max_images, eval_cfg.update_card) == (5000, "test", 20, True)
    # A finished, evaluated row is resumed (a no-op for the trainer) and not evaluated again.
    reproduce.run_row(row, plan)
    assert len(calls) == 3 and isinstance(calls[2], TrainConfig)
    # An objective swap starts from the base weights, then resumes its own run.
    base = tmp_path / "mnist-iwae-k5-1l.safetensors"
    reproduce.swap_one("swap-test", base, "vae", 1, plan)
    assert calls[3].init_from == base and not calls[3].resume and calls[3].objective == "vae"
