"""Shared fixtures: the bundled BBBC021 table and the `balans` CLI built from this tree."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[2]
BBBC021 = ROOT / "examples" / "data" / "bbbc021.parquet"
NEGCON = "Metadata_PertType = 'negcon'"


def cli_path() -> Path:
    """The CLI binary: $BALANS_CLI, else target/debug/balans ($CARGO_TARGET_DIR honoured)."""
    if "BALANS_CLI" in os.environ:
        return Path(os.environ["BALANS_CLI"])
    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    return target / "debug" / "balans"


@pytest.fixture(scope="session")
def cli() -> Path:
    path = cli_path()
    if not path.exists():
        pytest.fail(f"the balans CLI is not built at {path} (cargo build, or set BALANS_CLI)")
    return path


def run_cli(cli: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(cli), "--quiet", *args], capture_output=True, text=True)


@pytest.fixture(scope="session")
def bbbc021() -> pa.Table:
    return pq.read_table(BBBC021)


def same_values(a: pa.Table, b: pa.Table) -> None:
    """Equal column names, types and values (bit for bit; NaN equal to NaN)."""
    assert a.column_names == b.column_names
    assert a.num_rows == b.num_rows
    for name in a.column_names:
        x, y = a.column(name).combine_chunks(), b.column(name).combine_chunks()
        assert x.type == y.type, name
        assert x.equals(y), name
