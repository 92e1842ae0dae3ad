"""bench/bench_loglik.py: the tuned reference is the fastest of the chunk sizes it tried, in the same run, and
the engine agrees with it (a tiny run with the eager kernel, so that it takes seconds)."""

from __future__ import annotations

import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

import models.kernels as kernels_mod

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import bench_loglik


def test_tuned_reference_is_the_fastest_chunk_tried(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(kernels_mod, "_KERNELS", {})  # the eager kernel installed here must not leak
    monkeypatch.setenv(kernels_mod.COMPILE_ENV, "0")
    argv = ["--k", "16", "--images", "2", "--repeats", "2", "--chunk-rows", "8", "--threads", "1"]
    threads = torch.get_num_threads()
    try:
        assert bench_loglik.main([*argv, "--ref-chunks", "4,8,9,1000", "--json"]) == 0
    finally:
        torch.set_num_threads(threads)  # --threads 1 set it for the whole process
    res: dict[str, Any] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # Rows are rounded down to whole samples of both images, duplicates dropped: 4 -> 2, 8 and 9 -> 4, 1000 -> 500.
    assert sorted(int(c) for c in res["ref_by_chunk"]) == [2, 4, 500]
    for col in (0, 1):
        rates = {int(c): v[col] for c, v in res["ref_by_chunk"].items()}
        assert res["ref_tuned_chunk"][col] == max(rates, key=lambda c: rates[c])
        assert res["ref"][col] == max(rates.values())
    assert res["threads"] == 1 and res["kernels"].startswith("eager")
    assert res["max_abs_diff"] < 1e-3
    assert all(v > 0 for v in res["limit"] + res["eng"])


def test_data_parallel_engine_gives_the_engines_numbers(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bench's workers row splits the samples between threads: the same L_k as one engine call."""
    monkeypatch.setattr(kernels_mod, "_KERNELS", {})
    monkeypatch.setenv(kernels_mod.COMPILE_ENV, "0")
    model, x, noise = bench_loglik.make_problem(1, 3, 101, torch.device("cpu"), seed=1)
    threads = torch.get_num_threads()
    try:
        with ThreadPoolExecutor(2, initializer=bench_loglik.one_torch_thread) as pool:
            split = bench_loglik.engine_lk_workers(pool, 2, model, x, noise, chunk_rows=60)
    finally:
        torch.set_num_threads(threads)  # the pool's threads set the process-wide default too
    whole = bench_loglik.engine_lk(model, x, noise, chunk_rows=60)
    assert split.shape == whole.shape == (3,)
    assert float((split - whole).abs().max()) < 1e-4


def test_each_thread_count_child_gets_the_other_arguments() -> None:
    assert bench_loglik.child_argv(["--threads", "1,2", "--k", "5", "--json", "--threads=3", "--images", "2"]) == [
        "--k",
        "5",
        "--images",
        "2",
    ]


@pytest.mark.parametrize("bad", [["--ref-chunks", "0,256"], ["--ref-chunks", "a"], ["--threads", "0"]])
def test_bad_sizes_are_refused(bad: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        bench_loglik.main(bad)
    assert exc.value.code == 2
