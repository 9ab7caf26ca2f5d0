"""Python call overhead against the CLI, and peak memory with a ~1 GB pyarrow table input.

Usage: python overhead.py CLI DATA_DIR [--peak-only]   (release CLI and wheel; BENCHMARKS.md)

For each of 1M x 10 and 100k x 300 (`balans synth`), runs in one session, alternating:
the CLI (`balans correct`, Parquet in and out), `balans.correct(path)` and
`balans.correct(pyarrow_table)`, three times each, and prints the medians and ratios. Then,
in fresh processes, the peak RSS of correcting a ~1 GB in-memory table against the CLI on
the same data from a file.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

CLI, DATA = Path(sys.argv[1]), Path(sys.argv[2])
SETS = [("1M x 10", 1_000_000, 10), ("100k x 300", 100_000, 300)]


def synth(n: int, d: int) -> Path:
    path = DATA / f"synth_n{n}_d{d}.parquet"
    if not path.exists():
        subprocess.run([str(CLI), "--quiet", "synth", "--n", str(n), "--d", str(d), "-o",
                        str(path)], check=True)
    return path


def time_cli(path: Path) -> float:
    out = DATA / "cli_out.parquet"
    started = time.perf_counter()
    subprocess.run([str(CLI), "--quiet", "correct", "-i", str(path), "-b", "Metadata_Batch",
                    "-o", str(out), "--overwrite"], check=True, capture_output=True)
    return time.perf_counter() - started


PY_CALL = """
import sys, time, json, balans, pyarrow.parquet as pq
path, kind = sys.argv[1], sys.argv[2]
data = pq.read_table(path) if kind == "table" else path
started = time.perf_counter()
out = balans.correct(data, "Metadata_Batch", progress=False)
print(json.dumps({"seconds": time.perf_counter() - started, "rows": out.num_rows}))
"""


def time_python(path: Path, kind: str) -> float:
    # The whole process (interpreter start, import, call), as the CLI is timed; the call
    # alone is reported too.
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PY_CALL, str(path), kind], check=True,
                          capture_output=True, text=True)
    total = time.perf_counter() - started
    call = json.loads(done.stdout)["seconds"]
    return total if kind == "path" else call


def overhead() -> None:
    print("| data | CLI (s) | Python, path (s) | ratio | Python, pyarrow table: call (s) | ratio |")
    print("|---|---|---|---|---|---|")
    for name, n, d in SETS:
        path = synth(n, d)
        cli, py_path, py_table = [], [], []
        for _ in range(3):
            cli.append(time_cli(path))
            py_path.append(time_python(path, "path"))
            py_table.append(time_python(path, "table"))
        c, p, t = (statistics.median(x) for x in (cli, py_path, py_table))
        print(f"| {name} | {c:.2f} | {p:.2f} | {p / c:.3f} | {t:.2f} | {t / c:.3f} |")


PEAK = """
import sys, balans, pyarrow.parquet as pq
table = pq.read_table(sys.argv[1])
feature_bytes = sum(table.column(c).nbytes for c in table.column_names
                    if not c.startswith("Metadata_"))
def status(key):
    line = [l for l in open("/proc/self/status") if l.startswith(key)][0]
    return int(line.split()[1]) * 1024
before = status("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")  # resets the peak (VmHWM) to the current RSS
out = balans.correct(table, "Metadata_Batch", progress=False, memory_limit="2GB")
peak = status("VmHWM:")
print(feature_bytes, before, peak, out.nbytes)
"""


def peak() -> None:
    path = synth(2_600_000, 100)  # 2.6M x 100 float32 (as `balans synth` writes): 1.04 GB
    done = subprocess.run([sys.executable, "-c", PEAK, str(path)], check=True,
                          capture_output=True, text=True)
    features, before, peak_rss, out = (int(v) for v in done.stdout.split())
    cli = subprocess.run(["/usr/bin/time", "-f", "%M", str(CLI), "--quiet", "correct", "-i",
                          str(path), "-b", "Metadata_Batch", "-o", str(DATA / "cli_out.parquet"),
                          "--overwrite", "--memory-limit", "2GB"],
                         check=True, capture_output=True, text=True)
    cli_peak = int(cli.stderr.strip().splitlines()[-1]) * 1024
    gib = 1024.0**3
    print(f"features in the table: {features / gib:.2f} GiB; result table {out / gib:.2f} GiB")
    print(f"Python RSS with the table loaded: {before / gib:.2f} GiB; peak during correct: "
          f"{peak_rss / gib:.2f} GiB (+{(peak_rss - before) / gib:.2f} GiB)")
    print(f"CLI peak RSS on the same data from Parquet: {cli_peak / gib:.2f} GiB")


if __name__ == "__main__":
    DATA.mkdir(parents=True, exist_ok=True)
    if "--peak-only" not in sys.argv:
        overhead()
    peak()
