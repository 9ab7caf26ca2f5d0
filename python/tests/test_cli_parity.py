"""Every method gives the CLI's values on the bundled BBBC021 table."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

import balans
from conftest import BBBC021, NEGCON, run_cli, same_values

METHODS = [
    ("balans", [], {}),
    ("balans", ["--variant", "paper"], {"variant": "paper"}),
    ("balans", ["--variant", "balanced", "--seed", "3"], {"variant": "balanced", "seed": 3}),
    (
        "balans",
        ["--anchor", "negcon", "--negcon", NEGCON, "--sample-rows", "all"],
        {"anchor": "negcon", "negcon": NEGCON, "sample_rows": "all"},
    ),
    ("combat", [], {}),
    ("sphering", ["--negcon", NEGCON], {"negcon": NEGCON}),
    ("harmony", ["--clusters", "8"], {"clusters": 8}),
]


@pytest.mark.parametrize("method,cli_args,options", METHODS)
def test_correct_matches_the_cli(
    cli: Path, tmp_path: Path, method: str, cli_args: list[str], options: dict
) -> None:
    out = tmp_path / "cli.parquet"
    done = run_cli(
        cli, "correct", "-i", str(BBBC021), "-b", "Metadata_Batch", "-o", str(out),
        "--method", method, *cli_args,
    )
    assert done.returncode == 0, done.stderr
    expected = pq.read_table(out)
    got = balans.correct(str(BBBC021), "Metadata_Batch", method, progress=False, **options)
    same_values(got, expected)
    # The CLI's Parquet footer metadata comes along.
    cli_meta = pq.read_metadata(out).metadata
    assert got.schema.metadata[b"balans.method"] == cli_meta[b"balans.method"]
    assert got.schema.metadata[b"balans.parameters"] == cli_meta[b"balans.parameters"]


def test_embed_matches_the_cli(cli: Path, tmp_path: Path) -> None:
    model = tmp_path / "model"
    done = run_cli(
        cli, "train", "-i", str(BBBC021), "-b", "Metadata_Batch", "--label", "Metadata_MoA",
        "-o", str(model), "--epochs", "2", "--hidden", "32", "--embedding", "8",
    )
    assert done.returncode == 0, done.stderr
    out = tmp_path / "cli.parquet"
    done = run_cli(
        cli, "correct", "-i", str(BBBC021), "-b", "Metadata_Batch", "-o", str(out),
        "--method", "embed", "--model", str(model),
    )
    assert done.returncode == 0, done.stderr
    got = balans.correct(BBBC021, "Metadata_Batch", "embed", model=model, progress=False)
    same_values(got, pq.read_table(out))
    assert [c for c in got.column_names if c.startswith("E")][:2] == ["E1", "E2"]
    # The Python trainer writes the same model as the CLI (same seed).
    card = balans.train(
        BBBC021, "Metadata_Batch", "Metadata_MoA", tmp_path / "py_model", epochs=2,
        hidden=32, embedding=8, progress=False,
    )
    assert len(card["features"]) == 189
    again = balans.correct(
        BBBC021, "Metadata_Batch", "embed", model=tmp_path / "py_model", progress=False
    )
    same_values(again, got)


def test_evaluate_matches_the_cli(cli: Path, tmp_path: Path) -> None:
    json_out = tmp_path / "eval.json"
    done = run_cli(
        cli, "evaluate", "-i", str(BBBC021), "-b", "Metadata_Batch", "--label", "Metadata_MoA",
        "--negcon", NEGCON, "--skip", "classifier", "--json", str(json_out),
    )
    assert done.returncode == 0, done.stderr
    import json

    expected = json.loads(json_out.read_text())
    report = tmp_path / "report.html"
    got = balans.evaluate(
        BBBC021, "Metadata_Batch", "Metadata_MoA", negcon=NEGCON, skip=["classifier"],
        report=report, progress=False,
    )
    assert got["report"]["scores"] == expected["report"]["scores"]
    assert report.read_text().lstrip().lower().startswith("<!doctype html")


def test_preprocess_and_inspect_match_the_cli(cli: Path, tmp_path: Path) -> None:
    out = tmp_path / "pre.parquet"
    done = run_cli(
        cli, "preprocess", "-i", str(BBBC021), "-o", str(out), "--normalize", "standardize",
        "--feature-select", "variance-threshold,correlation-threshold",
    )
    assert done.returncode == 0, done.stderr
    got = balans.preprocess(
        BBBC021, normalize="standardize",
        feature_select=["variance_threshold", "correlation_threshold"], progress=False,
    )
    same_values(got, pq.read_table(out))
    done = run_cli(cli, "inspect", str(BBBC021), "-b", "Metadata_Batch", "--json")
    assert done.returncode == 0, done.stderr
    import json

    expected = json.loads(done.stdout)
    got_report = balans.inspect(BBBC021, "Metadata_Batch")
    assert got_report == expected


def test_sql_over_python_tables(bbbc021) -> None:
    import polars as pl

    out = balans.sql(
        "SELECT Metadata_Batch AS b, count(*) AS n FROM p GROUP BY 1 ORDER BY 1",
        tables={"p": pl.from_arrow(bbbc021)},
    )
    counts = bbbc021.group_by("Metadata_Batch").aggregate([("Metadata_Batch", "count")])
    assert dict(zip(out.column("b").to_pylist(), out.column("n").to_pylist())) == dict(
        zip(counts.column(0).to_pylist(), counts.column(1).to_pylist())
    )
