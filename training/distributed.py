"""Ray for the two embarrassingly parallel jobs: L_k over a data set in shards, and the reproduction grid.

Both connect to an existing Ray cluster (`ray.init(address=...)`: "auto", "HOST:PORT" or "ray://HOST:PORT"),
whose nodes have this package installed. Ray is imported lazily: nothing else needs it.

Sharded evaluation gives the numbers of a local `evaluate_dataset` with the same seed: the local run draws
its noise batch after batch from one CPU generator, so shards start on batch boundaries and each continues
that stream from the state it has at its first image (found by replaying the draws, without the model).
Per-image L_k are concatenated in data-set order, so the mean and its standard error are computed by the
same float64 operations as locally; the ELBO and Monte Carlo error merge from per-shard means (float
rounding).
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch

from models.checkpoint import from_bytes, to_bytes
from models.networks import IWAE
from models.psis import reliable
from training.evaluate import DEFAULT_MEMORY_BYTES, EvalResult, evaluate_dataset, images_per_batch

R = TypeVar("R")


def cluster_cpus() -> int:
    """CPUs of the connected cluster (the default number of shards)."""
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def connect(address: str) -> None:
    """Join the cluster at ``address`` unless this process already has."""
    import ray

    if ray.is_initialized():
        return
    try:
        ray.init(address=address, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise ValueError(f"cannot join the Ray cluster at {address!r}: {e}") from e


# --- sharded evaluation -----------------------------------------------------------------------------------
def shard_bounds(n_images: int, per_batch: int, shards: int) -> list[tuple[int, int]]:
    """[start, stop) image ranges on batch boundaries, as even as the batches allow (fewer when few batches)."""
    if n_images < 1 or per_batch < 1 or shards < 1:
        raise ValueError(f"need images, batch size and shards >= 1, got {n_images}, {per_batch}, {shards}")
    n_batches = math.ceil(n_images / per_batch)
    shards = min(shards, n_batches)
    cuts = [min(n_images, round(i * n_batches / shards) * per_batch) for i in range(shards + 1)]
    return list(itertools.pairwise(cuts))


def noise_states(model: IWAE, k: int, n_images: int, per_batch: int, starts: Sequence[int], seed: int) -> list[bytes]:
    """The CPU generator's state at each start image of a local run with ``seed``: its noise draws replayed.

    ``starts`` are batch boundaries in increasing order. The draws have the local run's shapes
    ([k, batch, d_l] per layer), so the generator consumes exactly what the local run does.
    """
    gen = torch.Generator().manual_seed(seed)
    states, i = [], 0
    for start in starts:
        if start % per_batch or start < i:
            raise ValueError(f"shard start {start} is not an increasing multiple of the batch size {per_batch}")
        while i < start:
            b = min(per_batch, n_images - i)
            model.draw_noise(k, b, generator=gen)
            i += b
        states.append(gen.get_state().numpy().tobytes())
    return states


@dataclass(frozen=True)
class ShardTask:
    checkpoint: bytes  # safetensors bytes of the model (tasks never unpickle a model)
    images: np.ndarray  # [n, D] binary float32, this shard's images
    k: int
    generator_state: bytes
    memory_bytes: int
    device: str
    threads: int | None


def evaluate_shard(task: ShardTask) -> dict[str, Any]:
    """One shard, continuing the local run's noise stream: per-image L_k and the shard's ELBO and MC error."""
    from models.device import resolve_device

    if task.threads:
        torch.set_num_threads(task.threads)
    device = resolve_device(task.device)
    model, _, _ = from_bytes(task.checkpoint, source="shard checkpoint")
    model.to(device).eval()
    gen = torch.Generator()
    gen.set_state(torch.frombuffer(bytearray(task.generator_state), dtype=torch.uint8))
    res = evaluate_dataset(model, torch.from_numpy(task.images), task.k, memory_bytes=task.memory_bytes, generator=gen)
    return {
        "n": res.n_images,
        "per_image": res.per_image.numpy(),
        "pareto_k": res.pareto_k.numpy(),  # type: ignore[union-attr]
        "elbo": res.elbo,
        "mc_stderr": res.mc_stderr,
        "seconds": res.seconds,
    }


def merge_shards(parts: Sequence[dict[str, Any]], k: int, seconds: float) -> EvalResult:
    """Shard results in data-set order -> the EvalResult a local run gives (see the module docstring)."""
    ll = torch.from_numpy(np.concatenate([p["per_image"] for p in parts])).double()
    k_hat = torch.from_numpy(np.concatenate([p["pareto_k"] for p in parts]))
    n = ll.numel()
    weights = [p["n"] / n for p in parts]
    return EvalResult(
        k=k,
        n_images=n,
        loglik=float(ll.mean()),
        loglik_stderr=float(ll.std() / math.sqrt(n)) if n > 1 else float("nan"),
        mc_stderr=math.sqrt(sum(w * p["mc_stderr"] ** 2 for w, p in zip(weights, parts, strict=True))),
        unreliable_fraction=float((~reliable(k_hat)).double().mean()),
        median_pareto_k=float(k_hat.median()),
        elbo=sum(w * p["elbo"] for w, p in zip(weights, parts, strict=True)),
        seconds=seconds,
        per_image=ll,
        pareto_k=k_hat,
    )


def evaluate_sharded(
    model: IWAE,
    x: torch.Tensor,
    k: int,
    shards: int,
    seed: int = 0,
    memory_bytes: int = DEFAULT_MEMORY_BYTES,
    device: str = "auto",
    cpus_per_shard: float = 1,
    gpus_per_shard: float = 0,
) -> EvalResult:
    """`evaluate_dataset(model, x, k, seed, memory_bytes)` with the data set split into Ray tasks.

    Call `connect(address)` first. Each task loads the model from checkpoint bytes and evaluates its images
    on ``device`` with ``cpus_per_shard`` torch threads (``gpus_per_shard`` GPUs reserved).
    """
    import ray

    start = time.perf_counter()
    per_batch = images_per_batch(model, k, memory_bytes)
    bounds = shard_bounds(int(x.shape[0]), per_batch, shards)
    states = noise_states(model, k, int(x.shape[0]), per_batch, [b for b, _ in bounds], seed)
    checkpoint = ray.put(to_bytes(model, card={"name": "shard"}))
    images = x.to(torch.float32).numpy()
    remote = ray.remote(_evaluate_shard_ref).options(num_cpus=cpus_per_shard, num_gpus=gpus_per_shard)
    threads = max(1, int(cpus_per_shard))
    refs = [
        remote.remote(checkpoint, images[a:b], k, state, memory_bytes, device, threads)
        for (a, b), state in zip(bounds, states, strict=True)
    ]
    return merge_shards(ray.get(refs), k, time.perf_counter() - start)


def _evaluate_shard_ref(
    checkpoint: bytes, images: np.ndarray, k: int, state: bytes, memory_bytes: int, device: str, threads: int
) -> dict[str, Any]:
    # Ray resolves the object ref to the bytes before the call.
    return evaluate_shard(ShardTask(checkpoint, np.ascontiguousarray(images), k, state, memory_bytes, device, threads))


# --- the reproduction grid ----------------------------------------------------------------------------------
def run_grid_on_ray(
    rows: Sequence[R],
    run_row: Callable[[R], Any],
    cpus_per_row: float = 1,
    gpus_per_row: float = 0,
    max_retries: int = 2,
    on_done: Callable[[R], None] | None = None,
) -> dict[R, Any]:
    """Every row as a Ray task with its own CPU/GPU request; ``on_done(row)`` on the driver as each finishes.

    ``run_row`` must be picklable and resumable (a retried task continues from the row's last checkpoint on
    the storage every node shares). Every row runs even when some fail; failures are raised together at the
    end, naming their rows. Returns each row's result. Call `connect(address)` first.
    """
    import ray

    remote = ray.remote(_run_one).options(num_cpus=cpus_per_row, num_gpus=gpus_per_row, max_retries=max_retries)
    pending = {remote.remote(run_row, row): row for row in rows}
    results: dict[R, Any] = {}
    failed: list[str] = []
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        row = pending.pop(done[0])
        try:
            results[row] = ray.get(done[0])
        except Exception as e:  # one row's failure must not lose the others' results
            failed.append(f"{row}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            continue
        if on_done is not None:
            on_done(row)
    if failed:
        raise RuntimeError("grid rows failed on the cluster: " + "; ".join(failed))
    return results


def _run_one(run_row: Callable[[R], Any], row: R) -> Any:
    # ray.remote needs a plain function; run_row may be a functools.partial.
    return run_row(row)
