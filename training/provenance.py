"""Where a result came from, for model cards: the hardware and the library versions."""

from __future__ import annotations

import platform
import sys
from pathlib import Path

import torch


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
