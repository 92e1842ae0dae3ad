"""The training loop: Adam on one of the four surrogates, periodic resumable checkpoints, a JSONL log."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from models.config import ModelConfig
from models.device import resolve_device
from models.estimators import get_surrogate
from models.networks import IWAE
from training.checkpoints import (
    load_checkpoint,
    load_train_state,
    read_train_state_meta,
    save_checkpoint,
    save_train_state,
    state_path,
)
from training.config import TrainConfig
from training.datasets import Dataset, binarize, load_dataset
from training.evaluate import evaluate_dataset
from training.files import atomic_write_bytes
from training.provenance import hardware, versions
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
    dynamic = data.binarization == "dynamic"
    valid_x = binarize(data.valid, torch.Generator().manual_seed(VALID_BINARIZATION_SEED)) if dynamic else data.valid
    run = _Run(cfg, data, device, Schedule(cfg.schedule, cfg.epochs, cfg.lr))
    for epoch in range(run.start_epoch, run.schedule.epochs):
        epoch_start = time.perf_counter()
        first_step = run.start_step if epoch == run.start_epoch else 0
        run.train_epoch(epoch, train_x, first_step, steps_per_epoch)
        run.finish_epoch(epoch, valid_x, epoch_start)
    run.model.eval()
    return run.card


class _Run:
    """The state of one run (model, optimizer, RNGs, running sums) and how to step and checkpoint it."""

    def __init__(self, cfg: TrainConfig, data: Dataset, device: torch.device, schedule: Schedule) -> None:
        self.cfg, self.data, self.device, self.schedule = cfg, data, device, schedule
        self.dynamic = data.binarization == "dynamic"
        self.model, self.card, self.start_epoch, self.start_step, self.wall = _initial_state(cfg, data, schedule)
        self.model.to(device).train()
        use_fused_output(self.model)
        keep_freed_memory()
        self.opt = make_optimizer(self.model, schedule.lr_at(0.0))
        self.bin_gen = torch.Generator().manual_seed(cfg.seed + 1)
        self.sums = BoundSum(device)
        if cfg.resume and self.start_epoch + self.start_step > 0:
            # The state's weights, not the checkpoint's: a process killed between the two files' writes
            # leaves the checkpoint one save ahead of the optimizer and RNG states (training/checkpoints.py).
            rng, meta = load_train_state(state_path(cfg.out), self.opt, list(self.model.parameters()))
            restore_fast_adam(self.opt)
            torch.set_rng_state(rng["torch"])
            self.bin_gen.set_state(rng["binarize"])
            if device.type == "cuda" and "cuda" in rng:
                torch.cuda.set_rng_state(rng["cuda"], device)
            self.sums = BoundSum(device, meta["sums"])
        # The log holds this run's epochs up to where it starts: a fresh run starts a new log.
        _drop_log_lines_after(log_path(cfg.out), self.start_epoch)
        self.step_fn = TrainStep(self.model, self.opt, get_surrogate(cfg.estimator or cfg.objective), cfg.k)
        self.t0 = self.last_save = time.perf_counter()

    def global_rng(self) -> dict[str, torch.Tensor]:
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return rng

    def rng_states(self, rng: dict[str, torch.Tensor], batches: EpochBatches, step: int) -> dict[str, torch.Tensor]:
        """``rng`` and the binarization generator's state, both as they were before ``step``'s draws."""
        return {**rng, "binarize": batches.generator_state(step) if self.dynamic else self.bin_gen.get_state()}

    def save(self, epoch: int, step: int, rng: dict[str, torch.Tensor]) -> None:
        wall_time_s = round(self.wall + time.perf_counter() - self.t0, 1)
        self.card.update(epochs=epoch, wall_time_s=wall_time_s, hardware=hardware(self.device))
        save_checkpoint(self.cfg.out, self.model, self.card, self.data.train_mean)
        meta = {"epoch": epoch, "step": step, "sums": self.sums.as_dict(), "wall_time_s": wall_time_s}
        save_train_state(state_path(self.cfg.out), self.opt, rng, meta, list(self.model.parameters()))
        self.last_save = time.perf_counter()

    def train_epoch(self, epoch: int, train_x: torch.Tensor, first_step: int, steps_per_epoch: int) -> None:
        """Steps ``first_step`` .. end of the epoch; on an interrupt, save the state before the current step."""
        cfg = self.cfg
        perm = torch.randperm(train_x.shape[0], generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch))
        batches = EpochBatches(train_x, perm, cfg.batch_size, self.bin_gen if self.dynamic else None, self.device)
        desc = f"epoch {epoch + 1}/{self.schedule.epochs}"
        bar = tqdm(total=steps_per_epoch, initial=first_step, desc=desc, disable=not cfg.progress, leave=False)
        step, step_rng, lr = first_step, self.global_rng(), -1.0
        try:
            for step in range(first_step, steps_per_epoch):
                # The state before this step's noise, so an interrupt can resume at this very step.
                step_rng = self.global_rng()
                step_lr = self.schedule.lr_at(epoch + step / steps_per_epoch)
                if step_lr != lr:  # set only when it changes: a per-step loop over the groups is measurable
                    lr = step_lr
                    for group in self.opt.param_groups:
                        group["lr"] = lr
                self.sums.add(self.step_fn(batches.batch(step)))
                if (step + 1) % PROGRESS_EVERY == 0:
                    bar.update(PROGRESS_EVERY)
                if time.perf_counter() - self.last_save > 60 * cfg.checkpoint_minutes:
                    self.save(epoch, step + 1, self.rng_states(self.global_rng(), batches, step + 1))
        except KeyboardInterrupt:
            self.save(epoch, step, self.rng_states(step_rng, batches, step))
            raise
        bar.close()

    def finish_epoch(self, epoch: int, valid_x: torch.Tensor, epoch_start: float) -> None:
        """Validation L_k, one log line, and a checkpoint at the epoch boundary."""
        cfg = self.cfg
        self.model.eval()
        val = evaluate_dataset(self.model, valid_x, cfg.val_k, seed=cfg.seed)
        self.model.train()
        record = {
            "epoch": epoch + 1,
            "train_bound": self.sums.mean(),
            f"valid_L{cfg.val_k}": val.loglik,
            "valid_k": cfg.val_k,
            "lr": self.opt.param_groups[0]["lr"],
            "seconds": round(time.perf_counter() - epoch_start, 2),
        }
        self.sums = BoundSum(self.device)
        with log_path(cfg.out).open("a") as f:
            f.write(json.dumps(record) + "\n")
        if cfg.progress:
            print(json.dumps(record), file=sys.stderr, flush=True)
        self.card[f"valid_L{cfg.val_k}"] = val.loglik
        self.save(epoch + 1, 0, {**self.global_rng(), "binarize": self.bin_gen.get_state()})


def _drop_log_lines_after(log: Path, epoch: int) -> None:
    """Keep the log lines of epochs 1..``epoch``: a process killed after an epoch's log line but before its
    training state was written resumes at that epoch, which would otherwise be logged twice (and a line cut
    short by the kill is dropped)."""
    if not log.exists():
        return
    lines = log.read_text().splitlines(keepends=True)
    kept = [line for line in lines if _logged_epoch(line) <= epoch]
    if kept != lines:
        atomic_write_bytes(log, "".join(kept).encode())


def _logged_epoch(line: str) -> float:
    """The epoch of one log line; infinity for a line that is incomplete or not a record."""
    try:
        return int(json.loads(line)["epoch"]) if line.endswith("\n") else math.inf
    except (ValueError, KeyError, TypeError):
        return math.inf


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


# init_from too, so that a model continued from a continued model keeps its whole lineage.
_CARD_SUMMARY = (
    "name",
    "objective",
    "k",
    "estimator",
    "epochs",
    "schedule",
    "seed",
    "wall_time_s",
    "hardware",
    "eval",
    "init_from",
)
