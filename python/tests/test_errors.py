"""Bad input raises ValueError with the CLI's message and leaves nothing behind."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

import balans
from conftest import BBBC021, run_cli


def cli_error(cli: Path, *args: str) -> str:
    done = run_cli(cli, *args)
    assert done.returncode == 1, done.stderr
    line = [l for l in done.stderr.splitlines() if l.startswith("balans: error: ")][-1]
    return line.removeprefix("balans: error: ")


def test_missing_batch_column_has_the_cli_message(cli: Path, tmp_path: Path) -> None:
    message = cli_error(
        cli, "correct", "-i", str(BBBC021), "-b", "Metadata_Nope", "-o", str(tmp_path / "o.parquet")
    )
    with pytest.raises(ValueError) as err:
        balans.correct(BBBC021, "Metadata_Nope", temp_dir=tmp_path / "tmp", progress=False)
    assert str(err.value) == message
    assert list(tmp_path.glob("**/*")) in ([], [tmp_path / "tmp"])
    assert not any((tmp_path / "tmp").glob("*")) if (tmp_path / "tmp").exists() else True


def test_nan_features_have_the_cli_message(cli: Path, tmp_path: Path, bbbc021: pa.Table) -> None:
    name = [c for c in bbbc021.column_names if not c.startswith("Metadata_")][3]
    values = bbbc021.column(name).to_numpy().copy()
    values[5] = np.nan
    table = bbbc021.set_column(bbbc021.column_names.index(name), name, pa.array(values))
    path = tmp_path / "nan.parquet"
    pq.write_table(table, path)
    message = cli_error(
        cli, "correct", "-i", str(path), "-b", "Metadata_Batch", "-o", str(tmp_path / "o.parquet")
    )
    for data in (table, path):
        with pytest.raises(ValueError) as err:
            balans.correct(data, "Metadata_Batch", temp_dir=tmp_path / "tmp", progress=False)
        assert name in str(err.value)
    assert str(err.value) == message
    assert sorted(p.name for p in tmp_path.iterdir()) in (["nan.parquet"], ["nan.parquet", "tmp"])
    # nan="zero" as on the CLI.
    out = balans.correct(table, "Metadata_Batch", "combat", nan="zero", progress=False)
    assert out.num_rows == table.num_rows


def test_wrong_types_and_options() -> None:
    with pytest.raises(ValueError, match="not int"):
        balans.correct(42, "Metadata_Batch")
    with pytest.raises(ValueError, match="seed= has the wrong type"):
        balans.correct(BBBC021, "Metadata_Batch", seed="zero", progress=False)
    with pytest.raises(ValueError, match="possible values: residual, balanced, paper"):
        balans.correct(BBBC021, "Metadata_Batch", variant="fancy", progress=False)
    with pytest.raises(ValueError, match="unknown option"):
        balans.correct(BBBC021, "Metadata_Batch", landmark_count=3, progress=False)
    with pytest.raises(ValueError, match="--method sphering is fitted on negative controls"):
        balans.correct(BBBC021, "Metadata_Batch", "sphering", progress=False)
    with pytest.raises(ValueError, match="--method embed needs --model"):
        balans.correct(BBBC021, "Metadata_Batch", "embed", progress=False)
    # A string batch column used as a feature: the engine's check.
    table = pa.table({"Metadata_Batch": ["a", "b"] * 10, "f": [str(i) for i in range(20)]})
    with pytest.raises(ValueError):
        balans.correct(table, "Metadata_Batch", features=["f"], progress=False)


def test_model_for_other_features(cli: Path, tmp_path: Path, bbbc021: pa.Table) -> None:
    model = tmp_path / "model"
    done = run_cli(
        cli, "train", "-i", str(BBBC021), "-b", "Metadata_Batch", "--label", "Metadata_MoA",
        "-o", str(model), "--epochs", "1", "--hidden", "16", "--embedding", "4",
    )
    assert done.returncode == 0, done.stderr
    features = [c for c in bbbc021.column_names if not c.startswith("Metadata_")]
    renamed = bbbc021.rename_columns(
        [c if c.startswith("Metadata_") else "X_" + c for c in bbbc021.column_names]
    )
    path = tmp_path / "other.parquet"
    pq.write_table(renamed, path)
    message = cli_error(
        cli, "correct", "-i", str(path), "-b", "Metadata_Batch", "-o",
        str(tmp_path / "o.parquet"), "--method", "embed", "--model", str(model),
    )
    with pytest.raises(ValueError):
        balans.correct(renamed, "Metadata_Batch", "embed", model=model, progress=False)
    with pytest.raises(ValueError) as err:
        balans.correct(path, "Metadata_Batch", "embed", model=model, progress=False)
    assert str(err.value) == message
    assert features[0] in message or "feature" in message
    assert not (tmp_path / "o.parquet").exists()
