"""The baseline for bench/bench_service.py: a plain FastAPI endpoint around a straightforward PyTorch L_k.

What a competent user would write without our engine: a synchronous route (Starlette runs it in its thread
pool, so requests compute concurrently on every core), the `.npy` body decoded with numpy, and L_k by the
textbook recipe, chunked over samples to keep the [rows, D] logits block cache-sized: decoder, BCE with
logits against the expanded image, logsumexp.

    python bench/plain_server.py --checkpoint models/zoo/mnist-iwae-k50-1l.safetensors --port 8100 --threads 1
"""

from __future__ import annotations

import argparse
import io
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.checkpoint import from_bytes  # noqa: E402
from models.networks import IWAE  # noqa: E402

# Rows per chunk: the best of 256..1024 on one thread here (bench_service.py --plain-chunk overrides it).
CHUNK_ROWS = 512


def lk_plain(model: IWAE, x: torch.Tensor, k: int, gen: torch.Generator, chunk_rows: int) -> torch.Tensor:
    """L_k per image, x [B, D] -> [B], k samples drawn chunk by chunk (log w of a chunk: [c, B])."""
    per_chunk = max(1, chunk_rows // x.shape[0])
    parts = []
    for start in range(0, k, per_chunk):
        c = min(per_chunk, k - start)
        lat = model.sample_latents(x, c, generator=gen)
        logits = model.p[0](lat.h[0])
        log_px = -F.binary_cross_entropy_with_logits(logits, x.expand(logits.shape), reduction="none").sum(-1)
        log_prior = -0.5 * (lat.h[-1] ** 2).sum(-1) - 0.5 * lat.h[-1].shape[-1] * math.log(2 * math.pi)
        for layer in range(1, model.config.n_layers):
            mean, log_std = model.p[layer](lat.h[layer])
            z = (lat.h[layer - 1] - mean) / torch.exp(log_std)
            log_prior = log_prior - 0.5 * (z**2).sum(-1) - log_std.sum(-1) - 0.5 * z.shape[-1] * math.log(2 * math.pi)
        parts.append(log_prior + log_px - lat.log_q())
    log_w = torch.cat(parts)
    return torch.logsumexp(log_w, 0) - math.log(k)


def build_app(model: IWAE, chunk_rows: int) -> FastAPI:
    app = FastAPI()

    def compute(body: bytes, k: int, seed: int) -> dict[str, object]:
        x = np.load(io.BytesIO(body), allow_pickle=False).astype(np.float32)
        xt = torch.from_numpy(x).view(-1, model.config.x_dim)
        with torch.inference_mode():
            ll = lk_plain(model, xt, k, torch.Generator().manual_seed(seed), chunk_rows)
        return {"k": k, "seed": seed, "results": [{"loglik": float(v)} for v in ll]}

    @app.post("/loglik")
    async def loglik(request: Request, k: int = 50, seed: int = 0) -> JSONResponse:
        body = await request.body()
        return JSONResponse(await run_in_threadpool(compute, body, k, seed))  # Starlette's thread pool

    @app.get("/readyz")
    def readyz() -> dict[str, str]:
        return {"status": "ready"}

    return app


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--chunk-rows", type=int, default=CHUNK_ROWS)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    model, _, _ = from_bytes(a.checkpoint.read_bytes(), source=str(a.checkpoint))
    model.eval()
    import uvicorn

    uvicorn.run(build_app(model, a.chunk_rows), host="127.0.0.1", port=a.port, log_level="warning")


if __name__ == "__main__":
    main()
