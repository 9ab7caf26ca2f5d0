"""Ctrl-C (SIGINT) during a run cancels it, raises KeyboardInterrupt and removes temp files."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

import balans


def synthetic(rows: int, features: int, batches: int) -> pa.Table:
    rng = np.random.default_rng(7)
    batch = rng.integers(0, batches, rows)
    columns = {"Metadata_Batch": pa.array([f"b{b}" for b in batch])}
    shift = rng.normal(size=(batches, features))
    for j in range(features):
        columns[f"f{j}"] = pa.array(rng.normal(size=rows) + shift[batch, j])
    return pa.table(columns)


def test_sigint_cancels_the_job_and_removes_its_files(tmp_path: Path) -> None:
    table = synthetic(400_000, 40, 6)
    temp_dir = tmp_path / "work"
    seen: list[int] = []
    signalled: list[float] = []
    stop = threading.Event()

    def watch() -> None:
        # Ctrl-C once the job has working files, so it is running when the signal comes,
        # however fast or loaded the machine is.
        while not stop.is_set():
            files = sum(1 for _ in temp_dir.rglob("*")) if temp_dir.exists() else 0
            seen.append(files)
            if files > 0 and not signalled:
                signalled.append(time.monotonic())
                os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.02)

    # Python's own Ctrl-C handler, even where the test runner inherited SIGINT as ignored (a
    # shell starts background commands so, and Python then installs no handler).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            # A slow sampling setting (as the CLI's interrupt test uses), so the job does not
            # finish between its first working file and the signal.
            balans.correct(
                table, "Metadata_Batch", temp_dir=temp_dir, progress=False, tau=100000, block=5
            )
    finally:
        stop.set()
        watcher.join()
        signal.signal(signal.SIGINT, previous)
    # Cancelled soon after the signal, not after the job would have finished.
    assert signalled, "the job never wrote a working file"
    elapsed = time.monotonic() - signalled[0]
    assert elapsed < 12.0, elapsed
    # The job had working files when it was interrupted; none are left.
    assert max(seen, default=0) > 0
    assert not any(temp_dir.rglob("*")), list(temp_dir.rglob("*"))
    # The interpreter is usable afterwards and a new job runs normally.
    out = balans.correct(table.slice(0, 2000), "Metadata_Batch", "combat", progress=False)
    assert out.num_rows == 2000


def test_the_gil_is_released_while_the_engine_runs() -> None:
    table = synthetic(200_000, 20, 4)
    ticks = 0
    running = threading.Event()
    done = threading.Event()

    def count() -> None:
        nonlocal ticks
        running.set()
        while not done.is_set():
            ticks += 1

    counter = threading.Thread(target=count)
    counter.start()
    running.wait()
    started = time.monotonic()
    before = ticks
    balans.correct(table, "Metadata_Batch", progress=False)
    during = ticks - before
    elapsed = time.monotonic() - started
    done.set()
    counter.join()
    # A Python thread kept running during the call: with the GIL held by the engine it would
    # only run in the short windows between progress polls.
    assert elapsed > 0.2, elapsed
    assert during > 100_000 * elapsed, (during, elapsed)
