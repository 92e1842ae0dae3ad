"""Evaluation over a data set: mean L_k with its standard error and the ELBO (active units: models/posterior.py)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from models.checkpoint import finite_or_none
from models.engine import bound_stats, chunk_rows_for, engine_log_weights
from models.networks import IWAE
from models.noise import seeded_generator
from models.psis import reliable

DEFAULT_MEMORY_BYTES = 512 * 2**20


@dataclass
class EvalResult:
    k: int
    n_images: int
    loglik: float  # mean L_k over images (nats)
    loglik_stderr: float  # standard error of that mean over the data set
    mc_stderr: float  # root mean square of the per-image calibrated Monte Carlo standard errors
    unreliable_fraction: float  # fraction of images whose PSIS k̂ > 0.7 (their L_k and stderr not trusted)
    median_pareto_k: float  # median over images of the PSIS k̂
    elbo: float  # mean ELBO from the same samples
    seconds: float
    per_image: torch.Tensor = field(repr=False)  # [N] L_k of each image
    pareto_k: torch.Tensor | None = field(default=None, repr=False)  # [N] PSIS k̂ of each image

    def to_dict(self) -> dict[str, float | int | None]:
        """As JSON holds it: a standard error of one image, or the k̂ of too few samples (inf), is null."""
        return {
            "k": self.k,
            "n_images": self.n_images,
            "loglik": self.loglik,
            "nll": -self.loglik,
            "loglik_stderr": finite_or_none(self.loglik_stderr),
            "mc_stderr": finite_or_none(self.mc_stderr),
            "unreliable_fraction": self.unreliable_fraction,
            "median_pareto_k": finite_or_none(self.median_pareto_k),
            "elbo": self.elbo,
            "seconds": round(self.seconds, 2),
        }


def images_per_batch(model: IWAE, k: int, memory_bytes: int, cap: int = 256) -> int:
    """Images per engine call so that the noise tensors take at most a quarter of the budget."""
    noise_bytes_per_image = k * sum(model.config.latent_dims) * 4
    return max(1, min(cap, (memory_bytes // 4) // noise_bytes_per_image))


def evaluate_dataset(
    model: IWAE,
    x: torch.Tensor,
    k: int,
    seed: int = 0,
    memory_bytes: int = DEFAULT_MEMORY_BYTES,
    progress: bool = False,
    generator: torch.Generator | None = None,
) -> EvalResult:
    """L_k of every image of x [N, D] (already binary), in memory-bounded chunks over images and samples.

    Noise is drawn on the CPU from one generator seeded with ``seed``, batch after batch: the first batch's
    noise is ``models.noise.request_noise(model, k, n, seed)``, so a data set that fits in one batch gets
    exactly the service's answer for the same seed. ``generator`` (CPU) replaces the seeded one: a shard of a
    sharded evaluation continues the local run's stream (training.distributed).
    """
    device = next(model.parameters()).device
    gen = generator if generator is not None else seeded_generator(torch.device("cpu"), seed)
    per_batch = images_per_batch(model, k, memory_bytes)
    chunk_rows = chunk_rows_for(model, device, memory_bytes // 2)
    lls, mcs, elbos, khats = [], [], [], []
    start = time.perf_counter()
    with tqdm(total=x.shape[0], unit="img", disable=not progress, desc=f"L_{k}") as bar:
        for i in range(0, x.shape[0], per_batch):
            xb = x[i : i + per_batch].to(device, torch.float32)
            noise = [n.to(device) for n in model.draw_noise(k, xb.shape[0], generator=gen)]
            stats = bound_stats(engine_log_weights(model, xb, noise, chunk_rows=chunk_rows))
            lls.append(stats.loglik.cpu())
            mcs.append(stats.stderr.cpu())
            elbos.append(stats.elbo.cpu())
            khats.append(stats.pareto_k.cpu())
            bar.update(xb.shape[0])
    ll, mc, el = torch.cat(lls).double(), torch.cat(mcs).double(), torch.cat(elbos).double()
    k_hat = torch.cat(khats)
    n = ll.numel()
    se = float(ll.std() / math.sqrt(n)) if n > 1 else float("nan")
    return EvalResult(
        k=k,
        n_images=n,
        loglik=float(ll.mean()),
        loglik_stderr=se,
        mc_stderr=float(torch.sqrt((mc.nan_to_num(0.0) ** 2).mean())),
        unreliable_fraction=float((~reliable(k_hat)).double().mean()),
        median_pareto_k=float(k_hat.median()),
        elbo=float(el.mean()),
        seconds=time.perf_counter() - start,
        per_image=ll,
        pareto_k=k_hat,
    )
