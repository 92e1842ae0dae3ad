"""The training loop: Adam on one of the four surrogates, periodic resumable checkpoints, a JSONL log."""

from __future__ import annotations

import json
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from models.config import ModelConfig
from models.estimators import ESTIMATORS, get_surrogate
from models.networks import IWAE
from training.checkpoints import (
    load_checkpoint,
    load_train_state,
    read_train_state_meta,
    save_checkpoint,
    save_train_state,
    state_path,
)
from training.datasets import Dataset, binarize, load_dataset
from training.evaluate import evaluate_dataset
from training.schedule import Schedule
from training.step import (
    ADAM_BETAS,
    ADAM_EPS,
    BoundSum,
    EpochBatches,
    TrainStep,
    keep_freed_memory,
    make_optimizer,
    restore_fast_adam,
    use_fused_output,
)

VALID_BINARIZATION_SEED = 1234
# Steps between progress-bar updates.
PROGRESS_EVERY = 50


@dataclass
class TrainConfig:
    out: Path
    dataset: str = "mnist"
    objective: str = "iwae"
    k: int = 50
    layers: int = 1
    estimator: str | None = None  # defaults to the objective's own estimator
    epochs: int = 10
    schedule: str = "compressed"  # paper | compressed | constant
    lr: float = 1e-3  # only for the constant schedule
    batch_size: int = 20
    seed: int = 0
    device: str = "auto"
    init_from: Path | None = None
    resume: bool = False
    val_k: int = 100
    checkpoint_minutes: float = 10.0
    max_train_images: int | None = None
    progress: bool = True
    data_root: Path | None = None
    command: str | None = None  # the command line that started the run, for the model card

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if self.estimator is None:
            self.estimator = self.objective
        if self.objective not in ("iwae", "vae"):
            raise ValueError(f"--objective must be iwae or vae, got {self.objective!r}")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"--estimator must be one of {sorted(ESTIMATORS)}, got {self.estimator!r}")
        if (self.objective == "vae") != (self.estimator == "vae"):
            raise ValueError(
                f"estimator {self.estimator!r} does not estimate the {self.objective!r} objective "
                "(vae objective: vae estimator; iwae objective: iwae, dreg or stl)"
            )
        if self.k < 1 or self.batch_size < 1 or self.val_k < 1:
            raise ValueError("k, batch size and val-k must be >= 1")
        if self.schedule == "paper":
            self.epochs = Schedule.paper().epochs
        Schedule(self.schedule, self.epochs, self.lr)  # validates name and epochs
        if self.resume and self.init_from is not None:
            raise ValueError("--resume and --init-from are exclusive: resume continues the run at --out")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA device is available")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


def hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA)"
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} torch threads"


def versions() -> dict[str, str]:
    import numpy
    import safetensors

    from training import __version__

    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "safetensors": safetensors.__version__,
        "iwae-serve": __version__,
    }


def log_path(ckpt: Path) -> Path:
    return ckpt.with_name(ckpt.name.removesuffix(".safetensors") + ".log.jsonl")


def train(cfg: TrainConfig, data: Dataset | None = None) -> dict[str, Any]:
    """Train (or resume) a model; write the checkpoint, its training state and the JSONL log. Returns the
    final model card."""
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    data = data if data is not None else load_dataset(cfg.dataset, cfg.data_root)
    train_x = data.train if cfg.max_train_images is None else data.train[: cfg.max_train_images]
    steps_per_epoch = train_x.shape[0] // cfg.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"batch size {cfg.batch_size} exceeds the {train_x.shape[0]} training images")
    schedule = Schedule(cfg.schedule, cfg.epochs, cfg.lr)
    surrogate = get_surrogate(cfg.estimator or cfg.objective)
    dynamic = data.binarization == "dynamic"
    valid_x = binarize(data.valid, torch.Generator().manual_seed(VALID_BINARIZATION_SEED)) if dynamic else data.valid

    model, card, start_epoch, start_step, wall = _initial_state(cfg, data, schedule)
    model.to(device).train()
    use_fused_output(model)
    keep_freed_memory()
    opt = make_optimizer(model, schedule.lr_at(0.0))
    bin_gen = torch.Generator().manual_seed(cfg.seed + 1)
    sums = BoundSum(device)
    if cfg.resume and start_epoch + start_step > 0:
        rng, meta = load_train_state(state_path(cfg.out), opt)
        restore_fast_adam(opt)
        torch.set_rng_state(rng["torch"])
        bin_gen.set_state(rng["binarize"])
        if device.type == "cuda" and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], device)
        sums = BoundSum(device, meta["sums"])
    step_fn = TrainStep(model, opt, surrogate, cfg.k)

    def global_rng() -> dict[str, torch.Tensor]:
        rng = {"torch": torch.get_rng_state()}
        if device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(device)
        return rng

    def rng_states(rng: dict[str, torch.Tensor], batches: EpochBatches, step: int) -> dict[str, torch.Tensor]:
        """``rng`` and the binarization generator's state, both as they were before ``step``'s draws."""
        return {**rng, "binarize": batches.generator_state(step) if dynamic else bin_gen.get_state()}

    def save(epoch: int, step: int, rng: dict[str, torch.Tensor]) -> None:
        card.update(epochs=epoch, wall_time_s=round(wall + time.perf_counter() - t0, 1), hardware=hardware(device))
        save_checkpoint(cfg.out, model, card, data.train_mean)
        meta = {"epoch": epoch, "step": step, "sums": sums.as_dict(), "wall_time_s": card["wall_time_s"]}
        save_train_state(state_path(cfg.out), opt, rng, meta)

    t0 = time.perf_counter()
    last_save = t0
    for epoch in range(start_epoch, cfg.epochs):
        epoch_start = time.perf_counter()
        perm = torch.randperm(train_x.shape[0], generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch))
        batches = EpochBatches(train_x, perm, cfg.batch_size, bin_gen if dynamic else None, device)
        first = start_step if epoch == start_epoch else 0
        bar = tqdm(
            total=steps_per_epoch,
            initial=first,
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            disable=not cfg.progress,
            leave=False,
        )
        step, step_rng, lr = first, global_rng(), -1.0
        try:
            for step in range(first, steps_per_epoch):
                # The state before this step's noise, so an interrupt can resume at this very step.
                step_rng = global_rng()
                xb = batches.batch(step)
                step_lr = schedule.lr_at(epoch + step / steps_per_epoch)
                if step_lr != lr:
                    lr = step_lr
                    for group in opt.param_groups:
                        group["lr"] = lr
                sums.add(step_fn(xb))
                if (step + 1) % PROGRESS_EVERY == 0:
                    bar.update(PROGRESS_EVERY)
                if time.perf_counter() - last_save > 60 * cfg.checkpoint_minutes:
                    save(epoch, step + 1, rng_states(global_rng(), batches, step + 1))
                    last_save = time.perf_counter()
        except KeyboardInterrupt:
            save(epoch, step, rng_states(step_rng, batches, step))
            raise
        bar.close()
        model.eval()
        val = evaluate_dataset(model, valid_x, cfg.val_k, seed=cfg.seed)
        model.train()
        record = {
            "epoch": epoch + 1,
            "train_bound": sums.mean(),
            f"valid_L{cfg.val_k}": val.loglik,
            "valid_k": cfg.val_k,
            "lr": opt.param_groups[0]["lr"],
            "seconds": round(time.perf_counter() - epoch_start, 2),
        }
        sums = BoundSum(device)
        with log_path(cfg.out).open("a") as f:
            f.write(json.dumps(record) + "\n")
        if cfg.progress:
            print(json.dumps(record), file=sys.stderr, flush=True)
        card[f"valid_L{cfg.val_k}"] = val.loglik
        save(epoch + 1, 0, {**global_rng(), "binarize": bin_gen.get_state()})
        last_save = time.perf_counter()
    model.eval()
    return card


def _initial_state(cfg: TrainConfig, data: Dataset, schedule: Schedule) -> tuple[IWAE, dict[str, Any], int, int, float]:
    """(model, card, epoch, step, wall time so far) for a fresh, resumed or initialised run."""
    if cfg.resume and cfg.out.exists() and state_path(cfg.out).exists():
        model, card, _ = load_checkpoint(cfg.out)
        st_meta = read_train_state_meta(state_path(cfg.out))
        return model, card, st_meta["epoch"], st_meta["step"], float(st_meta.get("wall_time_s", 0.0))
    if cfg.resume:
        print(f"--resume: no checkpoint and state at {cfg.out}; starting a new run", file=sys.stderr)
    if cfg.init_from is not None:
        model, base_card, _ = load_checkpoint(cfg.init_from)
        if model.config != ModelConfig.paper(cfg.layers, x_dim=data.train.shape[1]):
            print(f"--init-from: using the architecture of {cfg.init_from}", file=sys.stderr)
        init = {"from": str(cfg.init_from.name), "card": {k: base_card.get(k) for k in _CARD_SUMMARY}}
    else:
        model = IWAE(ModelConfig.paper(cfg.layers, x_dim=data.train.shape[1]), data_mean=data.train_mean)
        init = None
    card = {
        "name": cfg.out.name.removesuffix(".safetensors"),
        "dataset": data.name,
        "binarization": data.binarization,
        "objective": cfg.objective,
        "k": cfg.k,
        "estimator": cfg.estimator,
        "epochs": 0,
        "schedule": schedule.describe(),
        "seed": cfg.seed,
        "batch_size": cfg.batch_size,
        "optimizer": {"name": "adam", "betas": list(ADAM_BETAS), "eps": ADAM_EPS},
        "train_images": min(data.train.shape[0], cfg.max_train_images or data.train.shape[0]),
        "data_mean": float(data.train_mean.mean()),
        "init_from": init,
        "versions": versions(),
        "train_command": cfg.command,
    }
    return model, card, 0, 0, 0.0


_CARD_SUMMARY = ("name", "objective", "k", "estimator", "epochs", "eval")
