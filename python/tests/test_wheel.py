"""The built wheel installs and imports in a fresh virtual environment."""

from __future__ import annotations

import os
import subprocess
import venv
from pathlib import Path

import pytest

from conftest import BBBC021


def test_wheel_imports_in_a_fresh_venv(tmp_path: Path) -> None:
    wheel_dir = os.environ.get("BALANS_WHEEL_DIR")
    if not wheel_dir:
        pytest.fail("set BALANS_WHEEL_DIR to the directory of the built wheel (.ci/run does)")
    wheels = sorted(Path(wheel_dir).glob("balans-*.whl"))
    assert wheels, f"no balans wheel in {wheel_dir}"
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    # pyarrow from the same place the test environment got it (the index or a local cache).
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", str(wheels[-1])],
        capture_output=True, text=True,
    )
    assert install.returncode == 0, install.stderr
    check = subprocess.run(
        [
            str(python), "-c",
            "import sys, balans, pyarrow.parquet as pq; "
            "t = pq.read_table(sys.argv[1]); "
            "out = balans.correct(t, 'Metadata_Batch', 'combat', progress=False); "
            "print(balans.__version__, out.num_rows, balans.__file__)",
            str(BBBC021),
        ],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert check.returncode == 0, check.stderr
    version, rows, module = check.stdout.split()
    assert rows == "632"
    # Imported from the fresh environment, not from the test's.
    assert module.startswith(str(env_dir)), module
