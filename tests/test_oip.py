"""The Open Inference Protocol (KServe / Triton v2 REST) against a real server, driven by the real
`tritonclient[http]` in JSON and binary mode: the numbers equal /loglik's; bad requests get 400/404 with
{"error": ...}, never a 500."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from models import percentiles
from service.testing import service_process, tiny_model, write_checkpoint

httpclient = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is not installed (dev extra)")
from tritonclient.utils import InferenceServerException  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUTPUTS = ("loglik", "stderr", "ess", "elbo", "bits_per_dim", "percentile")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("oip-models")
    model = tiny_model(seed=3)
    x = (torch.rand(200, 784, generator=torch.Generator().manual_seed(0)) < 0.3).float()
    noise = model.draw_noise(40, 200, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ll = model.log_weights(x, 40, noise=noise).logsumexp(0) - np.log(40)
    quantiles = {"probs": list(percentiles.STANDARD_PROBS), "by_k": {"40": percentiles.test_quantiles(ll)}}
    write_checkpoint(folder / "tiny.safetensors", model, {"eval": {"test": {"quantiles": quantiles}}})
    write_checkpoint(folder / "plain.safetensors", tiny_model(seed=4))
    env = {
        "IWAE_MODELS": str(folder),
        "IWAE_DEFAULT_MODEL": "tiny",
        "IWAE_DEVICE": "cpu",
        "IWAE_THREADS": "1",
        "IWAE_ENGINE_COMPILE": "0",
        "IWAE_MAX_IMAGES": "50",
    }
    log = tmp_path_factory.mktemp("log") / "server.log"
    with service_process(env, log) as url:
        yield url
    assert "Traceback" not in log.read_text()


@pytest.fixture
def client(server: str) -> Iterator[httpclient.InferenceServerClient]:
    c = httpclient.InferenceServerClient(server.removeprefix("http://"))
    yield c
    c.close()


def images(n: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((n, 784)) < 0.3).astype(np.float32)


def native(url: str, x: np.ndarray, **params: object) -> dict[str, np.ndarray]:
    body = httpx.post(f"{url}/loglik", params=params, json={"images": x.reshape(len(x), -1).tolist()}).json()
    return {k: np.array([np.nan if r[k] is None else r[k] for r in body["results"]]) for k in OUTPUTS}


def triton_input(x: np.ndarray, datatype: str, binary: bool) -> httpclient.InferInput:
    tensor = httpclient.InferInput("images", list(x.shape), datatype)
    tensor.set_data_from_numpy(x, binary_data=binary)
    return tensor


def test_metadata_and_health(client: httpclient.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "iwae-serve" and "binary_tensor_data" in meta["extensions"]
    model = client.get_model_metadata("tiny")
    assert model["name"] == "tiny"
    assert model["inputs"] == [{"name": "images", "datatype": "FP32", "shape": [-1, 784]}]
    assert [(o["name"], o["datatype"], o["shape"]) for o in model["outputs"]] == [(n, "FP64", [-1]) for n in OUTPUTS]
    # A model without test-set quantiles has no percentile output.
    assert [o["name"] for o in client.get_model_metadata("plain")["outputs"]] == list(OUTPUTS[:-1])
    config = client.get_model_config("tiny")
    assert config["max_batch_size"] == 0 and config["input"][0]["dims"] == [-1, 784]
    assert [o["name"] for o in config["output"]] == list(OUTPUTS)
    assert client.is_model_ready("tiny") and not client.is_model_ready("nope")
    with pytest.raises(InferenceServerException, match="unknown model") as e:
        client.get_model_metadata("nope")
    assert e.value.status() == "404"


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_infer_equals_loglik(server: str, client: httpclient.InferenceServerClient, binary: bool) -> None:
    x = images(3, seed=1)
    outputs = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in OUTPUTS]
    result = client.infer(
        "tiny", [triton_input(x, "FP32", binary)], outputs=outputs, parameters={"k": 40, "seed": 9}, request_id="r1"
    )
    want = native(server, x, k=40, seed=9)
    for name in OUTPUTS:
        got = result.as_numpy(name)
        assert got.dtype == np.float64 and got.shape == (3,)
        np.testing.assert_array_equal(got, want[name], err_msg=name)
    response = result.get_response()
    assert response["id"] == "r1" and response["model_name"] == "tiny"
    assert response["parameters"] == {"k": 40, "seed": 9, "binarize": "none", "percentile_k": 40}
    assert ((want["percentile"] >= 0) & (want["percentile"] <= 100)).all()


def test_default_binary_mode_datatypes_and_shapes(server: str, client: httpclient.InferenceServerClient) -> None:
    x = images(2, seed=2)
    want = native(server, x, k=16, seed=3)
    # tritonclient's defaults: binary inputs, and all outputs in binary (binary_data_output).
    for arr, datatype in (
        (x, "FP32"),
        (x.astype(np.float64).reshape(2, 28, 28), "FP64"),
        ((x * 255).astype(np.uint8), "UINT8"),
        (x.astype(bool).reshape(2, 28, 28), "BOOL"),
    ):
        tensor = httpclient.InferInput("images", list(arr.shape), datatype)
        tensor.set_data_from_numpy(arr)
        result = client.infer("tiny", [tensor], parameters={"k": 16, "seed": 3})
        np.testing.assert_array_equal(result.as_numpy("loglik"), want["loglik"], err_msg=datatype)
    # UINT8 grayscale follows binarize, as /loglik does with the same pixels / 255.
    gray = np.random.default_rng(5).integers(0, 256, (2, 784), dtype=np.uint8)
    result = client.infer(
        "tiny", [triton_input(gray, "UINT8", True)], parameters={"k": 16, "seed": 3, "binarize": "threshold"}
    )
    thr = native(server, gray / 255.0, k=16, seed=3, binarize="threshold")
    np.testing.assert_array_equal(result.as_numpy("loglik"), thr["loglik"])
    # A model without quantiles, k = 1 (no stderr: NaN), a random seed returned in the response.
    result = client.infer("plain", [triton_input(x, "FP32", False)], parameters={"k": 1})
    assert np.isnan(result.as_numpy("stderr")).all() and result.as_numpy("percentile") is None
    seed = result.get_response()["parameters"]["seed"]
    again = native(server, x, k=1, seed=seed, model="plain")
    np.testing.assert_array_equal(result.as_numpy("loglik"), again["loglik"])


def test_infer_runs_on_the_loglik_scheduler(server: str, client: httpclient.InferenceServerClient) -> None:
    def evaluated() -> float:
        for line in httpx.get(f"{server}/metrics").text.splitlines():
            if line.startswith('iwae_rows_computed_total{model="tiny"}'):
                return float(line.split()[-1])
        return 0.0

    before = evaluated()
    client.infer("tiny", [triton_input(images(4), "FP32", True)], parameters={"k": 25, "seed": 0})
    assert evaluated() == before + 4 * 25


@pytest.mark.parametrize(
    ("make_input", "parameters", "message"),
    [
        (lambda: triton_input(images(1).astype(np.int32), "INT32", True), {}, "datatype 'INT32'"),
        (lambda: triton_input(images(1)[:, :100], "FP32", True), {}, "shape [1, 100]"),
        (lambda: triton_input(images(1).reshape(1, 1, 784), "FP32", False), {}, "shape [1, 1, 784]"),
        (lambda: _named("x"), {}, "missing input 'images'"),
        (lambda: triton_input(images(1), "FP32", True), {"temperature": 2}, "unknown parameter(s) temperature"),
        (lambda: triton_input(images(1), "FP32", True), {"k": 0}, "parameter k"),
        (lambda: triton_input(images(1), "FP32", True), {"binarize": "otsu"}, "parameter binarize"),
        (lambda: triton_input(np.full((1, 784), 0.5, np.float32), "FP32", True), {}, "binarize"),
        (lambda: triton_input(np.full((1, 784), np.nan, np.float32), "FP32", True), {"k": 2}, "NaN"),
        (lambda: triton_input(images(51), "FP32", True), {}, "too many images"),
    ],
)
def test_bad_requests_are_4xx_with_a_message(
    client: httpclient.InferenceServerClient, make_input: object, parameters: dict, message: str
) -> None:
    with pytest.raises(InferenceServerException) as e:
        client.infer("tiny", [make_input()], parameters=parameters)  # type: ignore[operator]
    assert e.value.status() in ("400", "413"), e.value
    assert message in e.value.message(), e.value.message()


def _named(name: str) -> httpclient.InferInput:
    tensor = httpclient.InferInput(name, [1, 784], "FP32")
    tensor.set_data_from_numpy(images(1))
    return tensor


def test_unknown_model_is_404(client: httpclient.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException, match="unknown model 'nope'") as e:
        client.infer("nope", [triton_input(images(1), "FP32", True)])
    assert e.value.status() == "404"


def _raw(server: str, header: dict, binary: bytes = b"", header_length: int | None = None) -> httpx.Response:
    head = json.dumps(header).encode()
    length = len(head) if header_length is None else header_length
    headers = {"Inference-Header-Content-Length": str(length)} if binary or header_length is not None else {}
    return httpx.post(f"{server}/v2/models/tiny/infer", content=head + binary, headers=headers)


def test_inconsistent_binary_and_malformed_bodies(server: str) -> None:
    x = images(1).tobytes()
    good = {"name": "images", "shape": [1, 784], "datatype": "FP32", "parameters": {"binary_data_size": len(x)}}
    assert _raw(server, {"inputs": [good]}, x).status_code == 200
    cases = [
        (_raw(server, {"inputs": [good]}, x[:-4]), "inconsistent binary sizes"),
        (_raw(server, {"inputs": [good]}, x + b"\0\0\0\0"), "inconsistent binary sizes"),
        (_raw(server, {"inputs": [{**good, "parameters": {"binary_data_size": 12}}]}, x), "does not match"),
        (_raw(server, {"inputs": [good]}, x, header_length=10**6), "Inference-Header-Content-Length"),
        (_raw(server, {"inputs": [good]}, x, header_length=5), "not valid JSON"),
        (httpx.post(f"{server}/v2/models/tiny/infer", content=b"not json"), "not valid JSON"),
        (_raw(server, {"inputs": []}), "missing input"),
        (_raw(server, {"inputs": [{**good, "parameters": {}, "data": [0.0] * 10}]}), "holds 10 values"),
        (_raw(server, {"inputs": [{**good, "parameters": {}, "data": ["a"] * 784}]}), "must hold numbers"),
        (_raw(server, {"inputs": [{**good, "datatype": "BOOL", "parameters": {}, "data": [2] * 784}]}), "true/false"),
        (_raw(server, {"inputs": [{**good, "datatype": "UINT8", "parameters": {}, "data": [300] * 784}]}), "0 to 255"),
        (_raw(server, {"inputs": [good], "outputs": [{"name": "nll"}]}, x), "unknown output 'nll'"),
        (_raw(server, {"inputs": [good], "id": 5}, x), "'id' must be a string"),
    ]
    for response, message in cases:
        assert response.status_code == 400, (message, response.text)
        assert message in response.json()["error"], (message, response.json())
    bools = {**good, "datatype": "BOOL", "parameters": {"binary_data_size": 784}}
    assert _raw(server, {"inputs": [bools]}, b"\x02" * 784).status_code == 400
    missing = httpx.get(f"{server}/v2/models/tiny/versions/1")
    assert missing.status_code == 404 and "error" in missing.json()


def test_json_response_without_binary_has_no_header_length(server: str) -> None:
    body = {"inputs": [{"name": "images", "shape": [1, 784], "datatype": "FP32", "data": images(1).tolist()}]}
    r = httpx.post(f"{server}/v2/models/tiny/infer", json=body)
    assert r.status_code == 200 and "inference-header-content-length" not in r.headers
    assert [o["name"] for o in r.json()["outputs"]] == list(OUTPUTS)
    both = {**body, "parameters": {"binary_data_output": True, "k": 5, "seed": 1}}
    r = httpx.post(f"{server}/v2/models/tiny/infer", json=both)
    n = int(r.headers["inference-header-content-length"])
    header = json.loads(r.content[:n])
    assert len(r.content) - n == sum(o["parameters"]["binary_data_size"] for o in header["outputs"]) == 6 * 8
    loglik = np.frombuffer(r.content[n : n + 8], dtype="<f8")
    np.testing.assert_array_equal(loglik, native(server, images(1), k=5, seed=1)["loglik"])


def test_values_of_the_wrong_json_type_are_400_never_500(server: str) -> None:
    """Found by the schemathesis run over /v2 (tests/test_schemathesis.py): unhashable values where a string
    is expected were a 500, and unknown fields or a non-object in an output entry were ignored."""
    good = {"name": "images", "shape": [1, 784], "datatype": "FP32", "data": images(1).reshape(-1).tolist()}
    cases = [
        ({"inputs": [good], "parameters": {"binarize": {"a": 1}}}, "parameter binarize"),
        ({"inputs": [good], "parameters": {"binarize": ["none"]}}, "parameter binarize"),
        ({"inputs": [{**good, "datatype": ["FP32"]}]}, "datatype"),
        ({"inputs": [good], "outputs": [{"name": "ess", "extra": 42}]}, "unknown field(s) ['extra']"),
        ({"inputs": [good], "outputs": [{"name": "ess", "parameters": []}]}, "the only output parameter"),
        ({"inputs": [{**good, "parameters": {"binary_data_size": None}}]}, "binary_data_size"),
        ({"inputs": [good], "parameters": {"k": 2.5}}, "parameter k"),
        ({"inputs": [{**good, "shape": [1, 784.5]}]}, "'shape'"),
    ]
    for body, message in cases:
        r = httpx.post(f"{server}/v2/models/tiny/infer", json=body)
        assert r.status_code == 400, (body, r.text)
        assert message in r.json()["error"], (message, r.json())


def test_integral_json_numbers_are_integers(server: str) -> None:
    """JSON Schema (and so the OpenAPI schema) counts 5.0 as an integer: the server agrees, with the same answer."""
    x = images(1)
    body = {"inputs": [{"name": "images", "shape": [1.0, 784], "datatype": "FP32", "data": x.reshape(-1).tolist()}]}
    r = httpx.post(f"{server}/v2/models/tiny/infer", json={**body, "parameters": {"k": 5.0, "seed": 3.0}})
    assert r.status_code == 200, r.text
    assert r.json()["parameters"]["k"] == 5 and r.json()["parameters"]["seed"] == 3
    loglik = next(o["data"] for o in r.json()["outputs"] if o["name"] == "loglik")
    np.testing.assert_array_equal(loglik, native(server, x, k=5, seed=3)["loglik"])


def test_openapi_declares_what_the_v2_routes_answer(server: str) -> None:
    spec = httpx.get(f"{server}/openapi.json").json()
    infer = spec["paths"]["/v2/models/{name}/infer"]["post"]
    assert sorted(infer["responses"]) == ["200", "400", "404", "413", "503", "504"]
    assert infer["responses"]["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/V2Error")
    assert set(infer["responses"]["200"]["content"]) == {"application/json", "application/octet-stream"}
    body = infer["requestBody"]["content"]["application/json"]["schema"]
    assert body["properties"]["parameters"]["properties"]["k"]["maximum"] == 5000  # IWAE_MAX_K
    names = spec["paths"]["/v2/models/{name}"]["get"]["parameters"][0]["schema"]["enum"]
    assert "tiny" in names
    assert all(
        "422" not in op["responses"] for p, ops in spec["paths"].items() if p.startswith("/v2") for op in ops.values()
    )
