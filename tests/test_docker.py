"""What can be checked of the Docker deployment without a Docker engine: the compose file and the Dockerfile."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from service.__main__ import build_parser
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
COMPOSE = ROOT / "compose.yaml"
E2E = ROOT / "tests" / "test_e2e.py"


def compose_service() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE.read_text())
    assert set(doc["services"]) == {"iwae"}
    return doc["services"]["iwae"]


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())  # join continuation lines
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def container_cmd() -> list[str]:
    (cmd,) = [rest for word, rest in dockerfile_instructions() if word == "CMD"]
    return json.loads(cmd)


def test_compose_builds_the_dockerfile() -> None:
    svc = compose_service()
    assert svc["build"]["context"] == "."
    assert (ROOT / svc["build"]["dockerfile"]).resolve() == DOCKERFILE.resolve()


def test_container_command_is_the_e2e_command() -> None:
    cmd = container_cmd()
    assert cmd == ["python", "-m", "service", "--host", "0.0.0.0", "--port", "8000"]
    assert compose_service()["command"] == cmd
    # The end-to-end test derives its command from this CMD (only the interpreter, host and port change).
    e2e = E2E.read_text()
    assert "container_command()" in e2e and "local_command(port)" in e2e
    args = build_parser().parse_args(cmd[3:])
    assert (args.host, args.port) == ("0.0.0.0", 8000)


def test_compose_healthcheck_and_models_volume() -> None:
    svc = compose_service()
    test = svc["healthcheck"]["test"]
    assert test[0] == "CMD" and "/readyz" in " ".join(test)
    assert "http://127.0.0.1:8000/readyz" in " ".join(test)
    volumes = svc["volumes"]
    assert any(v.split(":")[0] == "./models/zoo" and v.split(":")[1] == "/models" for v in volumes)
    env = svc["environment"]
    assert env["IWAE_MODELS"] == "/models"
    assert any(p.endswith(":8000") for p in svc["ports"])


def test_compose_environment_names_real_settings() -> None:
    fields = {f"IWAE_{name.upper()}" for name in Settings.model_fields}
    env = compose_service()["environment"]
    assert set(env) <= fields, set(env) - fields
    # Every variable is passed through from the host's environment (or .env), with the default as fallback.
    for key, value in env.items():
        if key != "IWAE_MODELS":
            assert re.fullmatch(r"\$\{" + key + r":-[^}]+\}", str(value)), (key, value)


def test_dockerfile_is_cpu_by_default_with_cuda_base_argument() -> None:
    instr = dockerfile_instructions()
    args = dict(rest.split("=", 1) for word, rest in instr if word == "ARG" and "=" in rest)
    assert args["BASE_IMAGE"].startswith("python:")
    assert args["TORCH_INDEX_URL"].endswith("/whl/cpu")
    assert args["TORCH_VERSION"] == "2.13.0"
    assert ("FROM", "${BASE_IMAGE}") in instr
    runs = " ".join(rest for word, rest in instr if word == "RUN")
    assert '"torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"' in runs
    health = [rest for word, rest in instr if word == "HEALTHCHECK"]
    assert len(health) == 1 and "/readyz" in health[0]
    copied = {rest.split()[0] for word, rest in instr if word == "COPY"}
    assert {"models", "service", "pyproject.toml"} <= copied


def test_stop_signal_and_grace_period_agree_with_the_drain() -> None:
    svc = compose_service()
    assert svc["stop_signal"] == "SIGTERM"
    grace = svc["stop_grace_period"]
    assert grace.endswith("s") and int(grace[:-1]) >= Settings().drain_s + 10  # drain, then shutdown
    assert re.fullmatch(r"\$\{IWAE_DRAIN_S:-(\d+)\}", svc["environment"]["IWAE_DRAIN_S"])
    assert ("STOPSIGNAL", "SIGTERM") in dockerfile_instructions()
