"""Learning-rate schedules: the paper's 3^i schedule, its compression to an epoch budget, and smooth
alternatives for short budgets (chosen by the ablation in docs/results.md)."""

from __future__ import annotations

import math
from dataclasses import dataclass

PAPER_STAGES = 8
PAPER_BASE_LR = 1e-3
# The paper's last stage runs at 1e-3 · 10^(-1): the smooth schedules span the same range.
FINAL_LR = PAPER_BASE_LR * 10.0 ** (-(PAPER_STAGES - 1) / 7.0)
# constant-decay: the base rate for this fraction of the budget, then a geometric decay to FINAL_LR.
DECAY_START = 0.5
# Every schedule name (the `iwae train --schedule` choices come from here). All but ``paper`` need an epoch budget.
SCHEDULES = ("paper", "compressed", "constant", "cosine", "constant-decay")


def paper_stage_lengths() -> list[int]:
    """Stage i lasts 3^i epochs: 1, 3, ..., 2187 (3,280 in all)."""
    return [3**i for i in range(PAPER_STAGES)]


def paper_stage_lr(i: int) -> float:
    """Stage i runs at 0.001 · 10^(-i/7)."""
    return PAPER_BASE_LR * 10.0 ** (-i / 7.0)


@dataclass(frozen=True)
class Schedule:
    """A piecewise-constant learning rate over training progress measured in epochs.

    ``paper``: the paper's 3,280 epochs. ``compressed``: the same 8 stages at the same rates, with lengths
    proportional to 3^i scaled to ``epochs`` (a stage may then span a fraction of an epoch: the rate is
    looked up per step). ``constant``: ``lr`` throughout. ``cosine``: from the paper's first rate (1e-3) to its
    last (1e-4) along a half cosine. ``constant-decay``: 1e-3 for the first half, then geometric decay to 1e-4.
    """

    name: str
    epochs: int
    lr: float = PAPER_BASE_LR

    def __post_init__(self) -> None:
        if self.name not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.name!r}; choose one of {', '.join(SCHEDULES)}")
        if self.name == "paper" and self.epochs != sum(paper_stage_lengths()):
            raise ValueError(f"the paper schedule is {sum(paper_stage_lengths())} epochs, got {self.epochs}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")

    @classmethod
    def paper(cls) -> Schedule:
        return cls("paper", sum(paper_stage_lengths()))

    def stage_bounds(self) -> list[float]:
        """Epoch at which each stage ends (the last is ``epochs``)."""
        lengths = paper_stage_lengths()
        scale = self.epochs / sum(lengths)
        ends, total = [], 0
        for n in lengths:
            total += n
            ends.append(total * scale)
        return ends

    def lr_at(self, progress: float) -> float:
        """The learning rate after ``progress`` epochs (fractional)."""
        if self.name == "constant":
            return self.lr
        t = min(max(progress / self.epochs, 0.0), 1.0)
        if self.name == "cosine":
            return FINAL_LR + (PAPER_BASE_LR - FINAL_LR) * 0.5 * (1.0 + math.cos(math.pi * t))
        if self.name == "constant-decay":
            frac = max(0.0, (t - DECAY_START) / (1.0 - DECAY_START))
            return PAPER_BASE_LR * (FINAL_LR / PAPER_BASE_LR) ** frac
        for i, end in enumerate(self.stage_bounds()):
            if progress < end:
                return paper_stage_lr(i)
        return paper_stage_lr(PAPER_STAGES - 1)

    def describe(self) -> dict[str, object]:
        d: dict[str, object] = {"name": self.name, "epochs": self.epochs}
        if self.name == "constant":
            d["lr"] = self.lr
        elif self.name == "cosine":
            d.update(lr_start=PAPER_BASE_LR, lr_end=FINAL_LR)
        elif self.name == "constant-decay":
            d.update(lr_start=PAPER_BASE_LR, lr_end=FINAL_LR, decay_from_epoch=DECAY_START * self.epochs)
        else:
            d["stages"] = [
                {"until_epoch": round(end, 4), "lr": paper_stage_lr(i)} for i, end in enumerate(self.stage_bounds())
            ]
        return d
