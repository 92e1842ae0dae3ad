"""Schemathesis over every operation of the app (its Python API, in-process ASGI), with all its checks:
positive data is accepted, negative data refused, every response matches the schema. Bounded examples.

The models and limits are small so that every request the schema allows is cheap; the limits are chosen so
that images × k never passes IWAE_MAX_REQUEST_COST (a product of two fields no schema can state). /reconstruct's
product, images × (samples + 1) decoded images at most IWAE_MAX_N, cannot be kept in bounds that way (it
would need samples < 0): cases over it are skipped, and its 413 is tested in tests/test_web.py.

The Open Inference Protocol's inference request has two rules that relate fields (its schema's description
states them): a tensor's `data` holds as many values as its `shape` says, and no output is named twice. A
generated positive case is made to keep them (its values cycled to the right count, repeated outputs dropped)
so that it tests everything else; tests/test_oip.py checks that breaking them is a 400.
"""

from __future__ import annotations

import itertools
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import schemathesis
from hypothesis import HealthCheck, assume, settings
from schemathesis.config import SchemathesisConfig
from schemathesis.config._checks import NEGATIVE_DATA_REJECTION_EXPECTED_STATUSES
from schemathesis.generation import GenerationMode
from schemathesis.python import asgi

from service.app import create_app
from service.settings import Settings
from service.testing import tiny_model, write_checkpoint

MODELS = Path(tempfile.mkdtemp(prefix="iwae-schemathesis-"))
write_checkpoint(MODELS / "tiny.safetensors", tiny_model())
write_checkpoint(MODELS / "tiny2l.safetensors", tiny_model(latent_dims=(4, 3), seed=1))
APP = create_app(
    Settings(models=[MODELS], default_model="tiny", device="cpu", max_k=20, max_n=8, max_images=3, max_request_cost=60)
)


def _wait_ready() -> None:
    with asgi.get_client(APP) as client:  # starts the app's lifespan, kept for the whole process
        deadline = time.monotonic() + 120
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "app not ready"
            time.sleep(0.05)


_wait_ready()
# 413 is how this server refuses too many images (a documented rejection): add it to the statuses that
# count as refusing invalid data. Every check stays on.
CONFIG = SchemathesisConfig.from_dict(
    {"checks": {"negative_data_rejection": {"expected-statuses": [*NEGATIVE_DATA_REJECTION_EXPECTED_STATUSES, "413"]}}}
)
schema = schemathesis.openapi.from_asgi("/openapi.json", APP, config=CONFIG)


def _consistent_infer_request(body: dict[str, Any]) -> None:
    """Keep the cross-field rules of a v2 inference request (the module docstring): in place."""
    for tensor in body.get("inputs") or []:
        if isinstance(tensor.get("shape"), list) and tensor.get("data"):
            count = int(math.prod(tensor["shape"]))  # JSON Schema's integers include 1.0
            tensor["data"] = list(itertools.islice(itertools.cycle(tensor["data"]), count))
    if body.get("outputs"):
        named: dict[str, Any] = {}
        for out in body["outputs"]:
            named.setdefault(out["name"], out)
        body["outputs"] = list(named.values())


@schema.parametrize()
@settings(max_examples=20, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_every_operation_keeps_its_schema_promises(case: schemathesis.Case) -> None:
    # .npy and PNG bodies are binary strings to a schema: random bytes are not arrays or images, so only
    # the JSON body (whose schema is exact) is generated.
    assume(case.media_type in (None, "application/json"))
    # The plugin ends the app's lifespan after each operation's test and the next request starts it again:
    # warm up first, so that /readyz (and every computing route) meets a ready app.
    _wait_ready()
    samples = str((case.query or {}).get("samples", 0))
    images = case.body.get("images") if isinstance(case.body, dict) else None
    if case.operation.path == "/reconstruct" and samples.isdigit() and isinstance(images, list):
        assume(len(images) * (int(samples) + 1) <= APP.state.service.settings.max_n)
    if (
        case.operation.path == "/v2/models/{name}/infer"
        and case.meta is not None
        and case.meta.generation.mode == GenerationMode.POSITIVE
        and isinstance(case.body, dict)
    ):
        _consistent_infer_request(case.body)
    case.call_and_validate()
