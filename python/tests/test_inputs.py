"""pyarrow, polars, pandas and path inputs give the same result; AnnData integration."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

import balans
from conftest import BBBC021, NEGCON, same_values


def plain_strings(table: pa.Table) -> pa.Table:
    schema = pa.schema(
        [f.with_type(pa.string()) if pa.types.is_large_string(f.type) else f for f in table.schema]
    )
    return table.cast(schema).replace_schema_metadata(None)


@pytest.mark.parametrize("method", ["balans", "combat"])
def test_every_input_kind_gives_the_same_table(bbbc021: pa.Table, method: str) -> None:
    import pandas as pd
    import polars as pl

    reference = balans.correct(BBBC021, "Metadata_Batch", method, progress=False)
    inputs = {
        "pyarrow": bbbc021,
        "pyarrow-chunked": pa.Table.from_batches(bbbc021.to_batches(max_chunksize=100)),
        "reader": pa.RecordBatchReader.from_batches(bbbc021.schema, bbbc021.to_batches()),
        "polars": pl.from_arrow(bbbc021),
        "pandas": bbbc021.to_pandas(),
        "pathlib": BBBC021,
    }
    for kind, data in inputs.items():
        got = balans.correct(data, ["Metadata_Batch"], method, progress=False)
        assert got.schema.metadata[b"balans.method"] == method.encode(), kind
        # String columns come back in the input's string type (pandas: string; a Parquet file
        # written by pyarrow: large_string; polars' views: string); the values are the same.
        same_values(plain_strings(got), plain_strings(reference))


def test_pandas_index_is_not_a_feature(bbbc021: pa.Table) -> None:
    frame = bbbc021.to_pandas()
    frame.index = frame.index * 7
    got = balans.correct(frame, "Metadata_Batch", "combat", progress=False)
    assert "__index_level_0__" not in got.column_names


def test_tables_cross_the_boundary_without_a_copy(bbbc021: pa.Table) -> None:
    # A pass-through query returns the very buffers it was given: neither the import (C
    # stream into a memory table) nor the export (capsule taken over by pyarrow) copies.
    out = balans.sql("SELECT * FROM p", tables={"p": bbbc021})
    for name in ("Metadata_Compound", "Cells_AreaShape_Compactness"):
        src = bbbc021.column(name).chunk(0).buffers()[-1]
        got = out.column(name).chunk(0).buffers()[-1]
        assert got.address == src.address, name


def test_anndata_integration_writes_obsm_and_leaves_x(bbbc021: pa.Table) -> None:
    anndata = pytest.importorskip("anndata")
    frame = bbbc021.to_pandas()
    meta = [c for c in frame.columns if c.startswith("Metadata_")]
    features = frame.drop(columns=meta).to_numpy(np.float64)
    obs = frame[meta].astype({"Metadata_Batch": "category"})
    obs.index = [f"cell{i}" for i in range(len(obs))]
    adata = anndata.AnnData(X=features.copy(), obs=obs)
    rng = np.random.default_rng(0)
    adata.obsm["X_pca"] = features[:, :20] + rng.normal(size=(adata.n_obs, 20))
    x_before = adata.X.copy()
    pca_before = adata.obsm["X_pca"].copy()
    balans.pp.integrate(adata, "Metadata_Batch", negcon=NEGCON, anchor="negcon")
    assert adata.obsm["X_balans"].shape == (adata.n_obs, 20)
    assert np.array_equal(adata.X, x_before)
    assert np.array_equal(adata.obsm["X_pca"], pca_before)
    # The correction is the one balans.correct gives on the same embedding.
    table = pa.table(
        {"Metadata_Batch": obs["Metadata_Batch"].astype(str).to_numpy(),
         "Metadata_PertType": obs["Metadata_PertType"].to_numpy(),
         **{f"PC{i + 1}": pca_before[:, i] for i in range(20)}}
    )
    direct = balans.correct(table, "Metadata_Batch", negcon=NEGCON, anchor="negcon",
                            progress=False)
    expected = np.column_stack([direct.column(f"PC{i + 1}").to_numpy() for i in range(20)])
    assert np.array_equal(adata.obsm["X_balans"], expected)
    assert not np.array_equal(adata.obsm["X_balans"], pca_before)
    # Harmony writes its own PCA coordinates (fewer columns are allowed).
    balans.pp.integrate(adata, "Metadata_Batch", method="harmony", basis="X",
                        adjusted_basis="X_harmony", pca=10, clusters=5)
    assert adata.obsm["X_harmony"].shape == (adata.n_obs, 10)
    assert np.array_equal(adata.X, x_before)
