"""What a training run and an evaluation are given: typed configs, validated on construction.

The `iwae train` and `iwae eval` flags are generated from these fields (training/cliargs.py): a default, a
choice list or a help text is written here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from models.device import DEVICE_CHOICES
from models.estimators import ESTIMATORS
from training.cliargs import arg, positive_int
from training.datasets import NAMES
from training.schedule import SCHEDULES, Schedule

OBJECTIVES = ("iwae", "vae")
LAYERS = (1, 2)
SPLITS = ("train", "valid", "test")


@dataclass
class TrainConfig:
    """One training run (or the continuation of one)."""

    out: Path = field(metadata=arg("checkpoint to write (.safetensors)"))
    dataset: str = field(default="mnist", metadata=arg("data set", choices=NAMES))
    objective: str = field(default="iwae", metadata=arg("training objective", choices=OBJECTIVES))
    k: int = field(default=50, metadata=arg("samples per image in the objective", type=positive_int))
    layers: int = field(default=1, metadata=arg("stochastic layers (paper's nets)", choices=LAYERS))
    estimator: str | None = field(
        default=None, metadata=arg("gradient estimator (default: the objective's own)", choices=tuple(ESTIMATORS))
    )
    epochs: int | None = field(
        default=None, metadata=arg("epoch budget (needed by every schedule but paper)", type=positive_int)
    )
    schedule: str = field(
        default="compressed",
        metadata=arg(
            "learning-rate schedule. paper: the full 3,280 epochs; compressed: its 8 stages scaled to --epochs; "
            "constant: --lr throughout; cosine: 1e-3 to 1e-4 along a half cosine; constant-decay (best of the "
            "short-budget ablation in docs/results.md): 1e-3 for half of --epochs, then geometric decay to 1e-4",
            choices=SCHEDULES,
        ),
    )
    lr: float = field(default=1e-3, metadata=arg("learning rate of the constant schedule"))
    batch_size: int = field(default=20, metadata=arg("images per step", type=positive_int))
    seed: int = field(default=0, metadata=arg("seed of the initialisation, batch order and binarization"))
    device: str = field(default="auto", metadata=arg("torch device", choices=DEVICE_CHOICES))
    init_from: Path | None = field(default=None, metadata=arg("start from this checkpoint's weights (objective swap)"))
    resume: bool = field(default=False, metadata=arg("continue an interrupted run at --out"))
    val_k: int = field(default=100, metadata=arg("k of the per-epoch validation L_k", type=positive_int))
    checkpoint_minutes: float = field(default=10.0, metadata=arg("mid-epoch checkpoint period"))
    max_train_images: int | None = field(
        default=None, metadata=arg("train on the first N images only", type=positive_int)
    )
    progress: bool = field(default=True, metadata=arg("no progress bars", flag="--no-progress"))
    data_root: Path | None = field(
        default=None, metadata=arg("data directory (default: IWAE_DATA_DIR or a cache dir)", flag="--data-dir")
    )
    # The command line that started the run, for the model card.
    command: str | None = field(default=None, metadata=arg("", cli=False))

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if self.estimator is None:
            self.estimator = self.objective
        if self.objective not in OBJECTIVES:
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
        self.epochs = epochs_for(self.schedule, self.epochs)
        Schedule(self.schedule, self.epochs, self.lr)  # validates name and epochs
        if self.resume and self.init_from is not None:
            raise ValueError("--resume and --init-from are exclusive: resume continues the run at --out")


def epochs_for(schedule: str, epochs: int | None) -> int:
    """The run's length: the paper schedule fixes it, every other schedule is scaled to the budget given."""
    paper = Schedule.paper().epochs
    if schedule == "paper":
        if epochs not in (None, paper):
            raise ValueError(f"--schedule paper fixes the epochs at {paper:,}: drop --epochs, or use another schedule")
        return paper
    if epochs is None:
        raise ValueError(f"the {schedule} schedule needs --epochs N (or use --schedule paper)")
    return epochs


@dataclass
class EvalConfig:
    """One evaluation of a checkpoint on a data split: L_k, ELBO and active units."""

    ckpt: Path = field(metadata=arg("checkpoint (.safetensors)", positional=True))
    k: int = field(default=5000, metadata=arg("samples per image of L_k", type=positive_int))
    split: str = field(default="test", metadata=arg("data split", choices=SPLITS))
    max_images: int | None = field(
        default=None, metadata=arg("evaluate the first N images of the split", type=positive_int)
    )
    seed: int = field(default=0, metadata=arg("seed of the samples and of the test binarization"))
    memory_mb: int = field(default=512, metadata=arg("memory budget of the engine (MiB)", type=positive_int))
    au_images: int = field(default=500, metadata=arg("training images for active units", type=positive_int))
    histogram: Path | None = field(default=None, metadata=arg("PNG of log A_u (default: beside the checkpoint)"))
    device: str = field(default="auto", metadata=arg("torch device", choices=DEVICE_CHOICES))
    data_root: Path | None = field(
        default=None, metadata=arg("data directory (default: IWAE_DATA_DIR or a cache dir)", flag="--data-dir")
    )
    update_card: bool = field(default=False, metadata=arg("store the results in the model card"))
    progress: bool = field(default=True, metadata=arg("no progress bar", flag="--no-progress"))
    quantiles: bool = field(
        default=False,
        metadata=arg(
            "with --update-card: also store the quantiles of the per-image L_k at --k and at k=50 (the service's "
            "percentiles)"
        ),
    )
    ray: str | None = field(
        default=None, metadata=arg("evaluate in shards on this Ray cluster (auto, HOST:PORT, ray://...)")
    )
    shards: int | None = field(
        default=None,
        metadata=arg("Ray tasks the images are split into (default: the cluster's CPUs)", type=positive_int),
    )

    def __post_init__(self) -> None:
        self.ckpt = Path(self.ckpt)
        if self.shards is not None and not self.ray:
            raise ValueError("--shards splits the evaluation over a Ray cluster: add --ray ADDRESS")
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {self.split!r}")
        if self.k < 1 or self.memory_mb < 1 or self.au_images < 2:
            raise ValueError("k and memory-mb must be >= 1 and au-images >= 2")

    @property
    def histogram_path(self) -> Path:
        return self.histogram or self.ckpt.with_name(self.ckpt.name.removesuffix(".safetensors") + ".active-units.png")


@dataclass
class CompareConfig:
    """Two checkpoints evaluated on the same images with the same noise, and their difference."""

    a: Path = field(metadata=arg("first checkpoint (.safetensors)", positional=True))
    b: Path = field(metadata=arg("second checkpoint, compared with the first (B − A)", positional=True))
    k: int = field(default=5000, metadata=arg("samples per image of L_k", type=positive_int))
    split: str = field(default="test", metadata=arg("data split", choices=SPLITS))
    max_images: int | None = field(
        default=None, metadata=arg("compare on the first N images of the split", type=positive_int)
    )
    seed: int = field(default=0, metadata=arg("seed of the samples and of the binarization (shared by both)"))
    memory_mb: int = field(default=512, metadata=arg("memory budget of the engine (MiB)", type=positive_int))
    device: str = field(default="auto", metadata=arg("torch device", choices=DEVICE_CHOICES))
    data_root: Path | None = field(
        default=None, metadata=arg("data directory (default: IWAE_DATA_DIR or a cache dir)", flag="--data-dir")
    )
    progress: bool = field(default=True, metadata=arg("no progress bar", flag="--no-progress"))

    def __post_init__(self) -> None:
        self.a, self.b = Path(self.a), Path(self.b)
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {self.split!r}")
        if self.k < 1 or self.memory_mb < 1:
            raise ValueError("k and memory-mb must be >= 1")
