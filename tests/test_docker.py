"""What can be checked of the Docker deployment without a Docker engine: compose files, Dockerfile, build context,
smoke script and the serving dependencies. docker/smoke.sh builds and runs the image for real (docs/deploy.md)."""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import yaml
from PIL import Image

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


# --- build context, stop behaviour, compile cache, GPU override, smoke script, serving dependencies ---

DOCKERIGNORE = ROOT / ".dockerignore"
GPU_COMPOSE = ROOT / "compose.gpu.yaml"
SMOKE = ROOT / "docker" / "smoke.sh"
PYPROJECT = ROOT / "pyproject.toml"
TRAINING_ONLY = {"tqdm", "matplotlib", "scipy"}


def dockerignore_excludes(path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders decides; `!` re-includes."""
    rules = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            neg = line.startswith("!")
            pat = line.lstrip("!").strip("/")
            rx = re.escape(pat).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
            rules.append((neg, re.compile(rx.replace(r"\?", "[^/]"))))
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for neg, rx in rules:
        if any(rx.fullmatch(p) for p in prefixes):
            excluded = not neg
    return excluded


def test_dockerignore_sends_only_what_the_image_needs() -> None:
    # The legacy builder reads only the root .dockerignore; BuildKit would prefer this one over it.
    assert not (ROOT / "docker" / "Dockerfile.dockerignore").exists()
    for path in [
        ".git/HEAD",
        ".git",
        ".venv/bin/python",
        "runs/table1/mnist-iwae-k50-1l.safetensors",
        "data/mnist/t10k-images-idx3-ubyte.gz",
        "tmp/x",
        ".env",
        "docs/figures/training-curves.png",
        "service/__pycache__/app.cpython-311.pyc",
        "models/zoo/mnist-iwae-k50-1l.state.safetensors",
        "iwae_serve.egg-info/PKG-INFO",
    ]:
        assert dockerignore_excludes(path), path
    for path in ["pyproject.toml", "README.md", "service/app.py", "training/cli.py", "models/engine.py"]:
        assert not dockerignore_excludes(path), path
    assert not dockerignore_excludes("models/zoo/mnist-iwae-k50-1l.safetensors")
    # Everything the Dockerfile copies is in the context.
    for word, rest in dockerfile_instructions():
        if word == "COPY":
            for src in rest.split()[:-1]:
                assert not dockerignore_excludes(src), src


def test_stop_signal_grace_period_and_init_process() -> None:
    svc = compose_service()
    stopsignal = [rest for word, rest in dockerfile_instructions() if word == "STOPSIGNAL"]
    assert stopsignal == ["SIGTERM"] and svc["stop_signal"] == "SIGTERM"
    # Room for the 30 s drain (IWAE_DRAIN_S default) plus the server's own shutdown.
    grace = re.fullmatch(r"(\d+)s", svc["stop_grace_period"])
    assert grace and int(grace.group(1)) >= 35
    # tini in the image (so plain `docker run` and Kubernetes get it too, unlike compose's `init`) forwards the
    # signal, reaps torch.compile's workers and maps uvicorn's re-raised SIGTERM (143) to 0.
    (entrypoint,) = [json.loads(rest) for word, rest in dockerfile_instructions() if word == "ENTRYPOINT"]
    assert entrypoint == ["tini", "-e", "143", "--"]
    assert "init" not in svc and "entrypoint" not in svc
    assert re.search(r"apt-get install [^&]*\btini\b", " ".join(r for w, r in dockerfile_instructions() if w == "RUN"))


def test_healthcheck_is_the_same_in_dockerfile_and_compose() -> None:
    (health,) = [rest for word, rest in dockerfile_instructions() if word == "HEALTHCHECK"]
    flags, _, cmd = health.partition(" CMD ")
    svc = compose_service()["healthcheck"]
    assert ["CMD", *json.loads(cmd)] == svc["test"]
    opts = dict(f.removeprefix("--").split("=") for f in flags.split())
    for key in ("interval", "timeout", "retries"):
        assert str(svc[key]) == opts[key], key
    assert svc["start_period"] == opts["start-period"]
    # Frequent enough that `up` to healthy stays near `up` to ready (target <= 20 s).
    assert int(svc["interval"].removesuffix("s")) <= 5
    # Only flags every engine knows: Docker 20.10 refuses to build with --start-interval (tried in the sandbox).
    assert set(opts) <= {"interval", "timeout", "start-period", "retries"}, opts


def test_compile_cache_is_a_named_volume_owned_by_the_service_user() -> None:
    env: dict[str, str] = {}
    for word, rest in dockerfile_instructions():
        if word == "ENV":
            env.update(kv.split("=", 1) for kv in rest.split() if "=" in kv)
    cache = env["TORCHINDUCTOR_CACHE_DIR"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in compose_service()["volumes"]}
    (mount,) = [m for m in mounts if cache.startswith(m + "/")]
    volume = mounts[mount]
    assert volume in yaml.safe_load(COMPOSE.read_text())["volumes"]  # named, so `down` + `up` keeps it
    # A new named volume copies the image folder's owner: the folder must exist and belong to the service user.
    runs = " ".join(rest for word, rest in dockerfile_instructions() if word == "RUN")
    assert f"mkdir -p {mount}" in runs and f"chown iwae:iwae {mount}" in runs


def test_no_precompiled_header_outside_the_compile_cache() -> None:
    """inductor keeps its precompiled C++ header in default_cache_dir() (under /tmp), not in
    TORCHINDUCTOR_CACHE_DIR: a container built it again at every start, a warm compile cache or not. The image
    turns the header off, through the variable this torch reads."""
    env: dict[str, str] = {}
    for word, rest in dockerfile_instructions():
        if word == "ENV":
            env.update(kv.split("=", 1) for kv in rest.split() if "=" in kv)
    assert env["TORCHINDUCTOR_CPP_CACHE_PRECOMPILE_HEADERS"] == "0"
    code = (
        "import os, torch._inductor.codecache as cc, torch._inductor.config as c\n"
        "print(c.cpp_cache_precompile_headers, cc._HEADER_DIR.startswith(os.environ['TORCHINDUCTOR_CACHE_DIR']))"
    )
    run_env = {**os.environ, "TORCHINDUCTOR_CPP_CACHE_PRECOMPILE_HEADERS": "0", "TORCHINDUCTOR_CACHE_DIR": "/x/cache"}
    r = subprocess.run([sys.executable, "-c", code], env=run_env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    # Off, and still needed: were the header kept in the cache directory, it could be turned back on.
    assert r.stdout.split() == ["False", "False"]


def test_gpu_override_reserves_a_gpu_on_a_cuda_build() -> None:
    doc = yaml.safe_load(GPU_COMPOSE.read_text())
    assert set(doc["services"]) == {"iwae"}
    gpu = doc["services"]["iwae"]
    args = gpu["build"]["args"]
    assert set(args) == set(compose_service()["build"]["args"])
    assert re.fullmatch(r"\$\{IWAE_BASE_IMAGE:-nvidia/cuda:[^}]+\}", args["BASE_IMAGE"])
    assert re.fullmatch(
        r"\$\{IWAE_TORCH_INDEX_URL:-https://download\.pytorch\.org/whl/cu\d+\}", args["TORCH_INDEX_URL"]
    )
    assert gpu["image"] != compose_service()["image"]  # the two builds do not overwrite each other
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert set(gpu["environment"]) <= {f"IWAE_{n.upper()}" for n in Settings.model_fields}
    assert gpu["environment"]["IWAE_DEVICE"] == "${IWAE_DEVICE:-cuda}"


def test_smoke_script_is_executable_and_parses() -> None:
    assert os.access(SMOKE, os.X_OK)
    subprocess.run(["bash", "-n", str(SMOKE)], check=True)
    usage = subprocess.run(["bash", str(SMOKE), "--help"], capture_output=True, text=True, check=True).stdout
    assert "--base-image" in usage and "--torch-index" in usage
    bad = subprocess.run(["bash", str(SMOKE), "--bogus"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown argument --bogus" in bad.stderr
    text = SMOKE.read_text()
    for needle in ("trap teardown EXIT", "/readyz", "/loglik", "/sample", "State.ExitCode", "compose.yaml"):
        assert needle in text, needle
    digit = re.search(r"^digit=(\S+)", text, re.M)
    assert digit
    with Image.open(ROOT / digit.group(1)) as im:
        assert im.size == (28, 28) and im.mode == "L"


def _requirement_name(req: str) -> str:
    return re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0].lower().replace("_", "-")


def _imported_top_modules(folder: Path) -> set[str]:
    out = set()
    for f in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                out |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                out.add(node.module.split(".")[0])
    return out


def _closure(names: set[str]) -> set[str]:
    """The installed distributions that ``names`` need, transitively (extras and markers ignored: a superset)."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            reqs = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        todo += [_requirement_name(r) for r in reqs if "extra ==" not in r]
    return seen


def test_serving_dependencies_exclude_training_ones() -> None:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    core = {_requirement_name(r) for r in project["dependencies"]}
    extras = project["optional-dependencies"]
    assert {_requirement_name(r) for r in extras["train"]} == TRAINING_ONLY
    assert not core & TRAINING_ONLY
    assert "iwae-serve[train]" in extras["dev"]  # `make test` installs .[dev], so it gets everything
    # Every third-party module that models/ and service/ import comes with the core dependencies.
    local = set(sys.stdlib_module_names) | {"models", "service", "training", "__future__"}
    # The `ray` extra: service/ray_serve.py imports it only inside a Ray Serve replica, never in the image.
    local |= {"ray"}
    dists = importlib.metadata.packages_distributions()
    available = _closure(core)
    imported = _imported_top_modules(ROOT / "models") | _imported_top_modules(ROOT / "service")
    for module in sorted(imported - local):
        providers = {_requirement_name(d) for d in dists.get(module, [module])}
        assert providers & available, f"{module} (from {providers}) is not a serving dependency"
    assert not available & TRAINING_ONLY


def test_service_and_iwae_serve_import_without_training_dependencies() -> None:
    blocked = ", ".join(repr(m) for m in sorted(TRAINING_ONLY))
    code = (
        f"import sys\nfor m in ({blocked},): sys.modules[m] = None\n"
        "import importlib, pkgutil, models, service\n"
        "for pkg in (models, service):\n"
        "    for m in pkgutil.iter_modules(pkg.__path__):\n"
        "        importlib.import_module(f'{pkg.__name__}.{m.name}')\n"
        "from iwae_cli import main\n"
        "main(['serve', '--help'])\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "usage: iwae serve" in r.stdout


def test_stop_signal_and_grace_period_agree_with_the_drain() -> None:
    svc = compose_service()
    assert svc["stop_signal"] == "SIGTERM"
    grace = svc["stop_grace_period"]
    assert grace.endswith("s") and int(grace[:-1]) >= Settings().drain_s + 10  # drain, then shutdown
    assert re.fullmatch(r"\$\{IWAE_DRAIN_S:-(\d+)\}", svc["environment"]["IWAE_DRAIN_S"])
    assert ("STOPSIGNAL", "SIGTERM") in dockerfile_instructions()
