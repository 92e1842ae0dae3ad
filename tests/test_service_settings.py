"""Settings from the environment and the command line, and loading models (bad files skipped, fallbacks)."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.__main__ import build_parser, main, settings_from_args
from service.registry import ModelRegistry, NoModelsError, UnknownModelError
from service.settings import DEFAULT_MODEL, DEFAULT_MODELS_DIR, Settings, settings_table
from service.testing import tiny_model, write_checkpoint


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("IWAE_"):
            monkeypatch.delenv(key)


def test_defaults() -> None:
    s = Settings()
    assert s.models == [DEFAULT_MODELS_DIR]
    assert DEFAULT_MODELS_DIR.parts[-2:] == ("models", "zoo")
    assert (s.default_model, s.device, s.max_k, s.host, s.port) == (DEFAULT_MODEL, "auto", 5000, "127.0.0.1", 8000)
    assert DEFAULT_MODEL == "mnist-iwae-k50-1l"


def test_environment_variables(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("IWAE_MAX_K", "20000")
    monkeypatch.setenv("IWAE_DEVICE", "cpu")
    monkeypatch.setenv("IWAE_MODELS", f"{tmp_path}/a, {tmp_path}/b.safetensors")
    monkeypatch.setenv("IWAE_DRAIN_S", "7.5")
    monkeypatch.setenv("IWAE_DATA_DIR", "/somewhere")  # the training side's: ignored here
    monkeypatch.setenv("IWAE_ENGINE_COMPILE", "1")
    s = Settings()
    assert (s.max_k, s.device, s.drain_s) == (20000, "cpu", 7.5)
    assert s.models == [tmp_path / "a", tmp_path / "b.safetensors"]
    monkeypatch.setenv("IWAE_MODELS", '["/x", "/y"]')
    assert Settings().models == [Path("/x"), Path("/y")]


def test_invalid_settings_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IWAE_DEVICE", "tpu")
    with pytest.raises(ValidationError, match="device"):
        Settings()
    monkeypatch.delenv("IWAE_DEVICE")
    with pytest.raises(ValidationError, match="max_k"):
        Settings(max_k=0)


def test_flags_override_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("IWAE_MAX_K", "100")
    monkeypatch.setenv("IWAE_PORT", "9000")
    args = build_parser().parse_args(["--max-k", "7", "--models", str(tmp_path), "x.safetensors", "--device", "cpu"])
    s = settings_from_args(args)
    assert (s.max_k, s.port, s.device) == (7, 9000, "cpu")
    assert s.models == [tmp_path, Path("x.safetensors")]


def test_settings_round_trip_through_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    s = Settings(models=[tmp_path, tmp_path / "m.safetensors"], max_k=123, threads=2, drain_s=1.5, api_keys="k1,k2")
    for key, value in s.to_env().items():
        monkeypatch.setenv(key, value)
    assert Settings() == s


def test_parser_documents_every_setting() -> None:
    text = build_parser().format_help()
    for name in Settings.model_fields:
        flag = "--" + name.replace("_", "-")
        assert flag in text, flag


def test_main_fails_cleanly_without_models(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "broken.safetensors").write_bytes(b"not a checkpoint")
    assert main(["--models", str(tmp_path), "--device", "cpu", "--port", "0"]) == 1
    err = capsys.readouterr().err
    assert "no loadable checkpoint" in err and "broken.safetensors" in err
    assert main(["--max-k", "0"]) == 2
    assert "max_k" in capsys.readouterr().err


def test_registry_skips_bad_files_and_logs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_checkpoint(tmp_path / "good.safetensors", tiny_model())
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x00" * 64)
    (tmp_path / "notes.txt").write_text("not a model")
    with caplog.at_level(logging.WARNING, logger="iwae.service"):
        reg = ModelRegistry.load(Settings(models=[tmp_path, tmp_path / "missing.safetensors"], device="cpu"))
    assert reg.names() == ["good"]
    messages = [r.getMessage() for r in caplog.records]
    assert any("corrupt.safetensors" in m and "cannot load" in m for m in messages)
    assert any("notes.txt" in m and "not a checkpoint" in m for m in messages)
    assert any("missing.safetensors" in m and "does not exist" in m for m in messages)
    # The configured default is absent: the first model alphabetically stands in, and it is logged.
    assert reg.default == "good"
    assert any("default model" in m and "'good'" in m for m in messages)
    with pytest.raises(UnknownModelError, match="available models: good"):
        reg.get("other")


def test_registry_default_and_explicit_files(tmp_path: Path) -> None:
    for name in ("b-model", "a-model", "c-model"):
        write_checkpoint(tmp_path / f"{name}.safetensors", tiny_model())
    reg = ModelRegistry.load(Settings(models=[tmp_path], default_model="c-model", device="cpu"))
    assert (reg.default, reg.names()) == ("c-model", ["a-model", "b-model", "c-model"])
    assert reg.get(None).name == "c-model"
    reg = ModelRegistry.load(Settings(models=[tmp_path], default_model="zzz", device="cpu"))
    assert reg.default == "a-model"
    only = ModelRegistry.load(Settings(models=[tmp_path / "b-model.safetensors"], device="cpu"))
    assert only.names() == ["b-model"]


def test_registry_with_nothing_loadable(tmp_path: Path) -> None:
    with pytest.raises(NoModelsError, match="no loadable checkpoint"):
        ModelRegistry.load(Settings(models=[tmp_path], device="cpu"))


def _doc_settings_rows() -> list[list[str]]:
    doc = (Path(__file__).resolve().parents[1] / "docs" / "service.md").read_text()
    section = doc.split("\n## Settings\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `IWAE_")]
    return [[c.strip() for c in re.split(r"(?<!\\)\|", row.strip().strip("|"))] for row in rows]


def test_docs_settings_table_rows_are_the_fields() -> None:
    rows = _doc_settings_rows()
    # One row per field, in field order: the variable, the flag and the default.
    assert [r[0] for r in rows] == [f"`IWAE_{name.upper()}`" for name in Settings.model_fields]
    for (_, flag, default, meaning), (name, info) in zip(rows, Settings.model_fields.items(), strict=True):
        assert flag.startswith(f"`--{name.replace('_', '-')}"), flag
        value = info.get_default(call_default_factory=True)
        if isinstance(value, bool) or value is None or isinstance(value, list):
            continue  # shown in words ("torch's default", "the repository's models/zoo")
        if isinstance(value, str):
            assert default == f"`{value}`", (name, default)
        else:
            assert float(default.split()[0]) == value, (name, default)
        assert meaning == info.description, name
    # The whole table is what settings_table() generates from the fields.
    doc = (Path(__file__).resolve().parents[1] / "docs" / "service.md").read_text()
    assert settings_table() in doc


def test_flags_are_generated_from_the_fields() -> None:
    parser = build_parser()
    actions = {a.dest: a for a in parser._actions if a.dest != "help"}
    assert list(actions) == list(Settings.model_fields)
    assert actions["device"].choices == ["auto", "cpu", "cuda"]
    assert actions["log_level"].choices == ["critical", "error", "warning", "info", "debug"]
    assert (actions["drain_s"].type, actions["threads"].type, actions["models"].nargs) == (float, int, "+")
    assert all(a.default is None for a in actions.values())  # unset flags leave the environment's value
    for name, action in actions.items():
        flag = f"--{name.replace('_', '-')}"
        want = [flag, f"--no-{flag[2:]}"] if Settings.model_fields[name].annotation is bool else [flag]
        assert action.option_strings == want
        assert f"IWAE_{name.upper()}" in (action.help or "")


def test_readme_links_to_the_settings_table_instead_of_repeating_it() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "| `IWAE_MAX_K`" not in readme
    assert "docs/service.md#settings" in readme


def test_openapi_operations_are_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    """Paths, parameters (names, bounds, descriptions, defaults) and response statuses as recorded before the
    service was split into modules (tests/data/openapi_operations.json, default settings)."""
    from service.app import create_app

    spec = create_app(Settings()).openapi()
    got = {
        f"{method.upper()} {path}": {"parameters": op.get("parameters", []), "responses": sorted(op["responses"])}
        for path, ops in spec["paths"].items()
        for method, op in ops.items()
    }
    want = json.loads((Path(__file__).parent / "data" / "openapi_operations.json").read_text())
    assert got == want


def test_main_runs_uvicorn_with_the_loaded_app(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from fastapi import FastAPI

    import service.drain

    write_checkpoint(tmp_path / "m.safetensors", tiny_model())
    calls: list[tuple[object, dict[str, object]]] = []
    monkeypatch.setattr(service.drain, "serve", lambda app, **kw: calls.append((app, kw)))
    assert main(["--models", str(tmp_path), "--device", "cpu", "--port", "8123", "--host", "127.0.0.2"]) == 0
    ((app, kw),) = calls
    assert isinstance(app, FastAPI)
    assert (kw["host"], kw["port"], kw["access_log"]) == ("127.0.0.2", 8123, True)
    registry = app.state.service.registry
    assert registry is not None and registry.names() == ["m"]  # loaded before uvicorn started


def test_switches_turn_on_and_off_from_flags_and_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import service.drain

    monkeypatch.setenv("IWAE_ACCESS_LOG", "false")
    monkeypatch.setenv("IWAE_METRICS_PUBLIC", "true")
    s = settings_from_args(build_parser().parse_args([]))
    assert (s.access_log, s.metrics_public) == (False, True)
    s = settings_from_args(build_parser().parse_args(["--access-log", "--no-metrics-public"]))
    assert (s.access_log, s.metrics_public) == (True, False)
    write_checkpoint(tmp_path / "m.safetensors", tiny_model())
    calls: list[dict[str, object]] = []
    monkeypatch.setattr(service.drain, "serve", lambda app, **kw: calls.append(kw))
    assert main(["--models", str(tmp_path), "--device", "cpu", "--no-access-log"]) == 0
    assert calls[0]["access_log"] is False  # uvicorn is told not to log every request


def test_main_with_workers_passes_settings_through_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import os

    import service.drain
    from service.app import create_app_from_env

    write_checkpoint(tmp_path / "m.safetensors", tiny_model())
    calls: list[tuple[object, dict[str, object]]] = []
    monkeypatch.setattr(service.drain, "serve", lambda app, **kw: calls.append((app, kw)))
    assert main(["--models", str(tmp_path), "--workers", "2", "--max-k", "77", "--device", "cpu"]) == 0
    ((target, kw),) = calls
    assert target == "service.app:create_app_from_env" and kw["workers"] == 2 and kw["drain_s"] == 30
    assert os.environ["IWAE_MAX_K"] == "77"
    app = create_app_from_env()  # what each worker process builds
    assert app.state.service.settings.max_k == 77
    assert app.state.service.settings.models == [tmp_path]
