#!/usr/bin/env python3
"""harmonypy 2.1 as a whole process, for `balans bench --harmonypy PYTHON`.

Usage: harmonypy_bench.py INPUT OUTPUT

INPUT is a Parquet file or a directory of Parquet files (read with pyarrow.dataset, rows in
path order). The features are the f* columns; PCA to min(50, d) components exactly as our
`--method harmony` does it (covariance eigendecomposition in float64, components ordered by
variance); then harmonypy.run_harmony(pcs, meta, "Metadata_Batch", random_state=0); the
corrected coordinates and the metadata columns are written to OUTPUT (Parquet, zstd).
"""
import sys

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import harmonypy


def main():
    src, dst = sys.argv[1], sys.argv[2]
    table = ds.dataset(src, format="parquet").to_table()
    feats = [c for c in table.column_names if c.startswith("f") and c[1:].isdigit()]
    meta_cols = [c for c in table.column_names if c.startswith("Metadata_")]
    x = np.column_stack([table.column(c).to_numpy().astype(np.float64) for c in feats])
    p = min(50, x.shape[1])
    mean = x.mean(axis=0)
    xc = x - mean
    cov = xc.T @ xc / (x.shape[0] - 1)
    vals, vecs = np.linalg.eigh(cov)
    axes = vecs[:, np.argsort(vals)[::-1][:p]]
    pcs = xc @ axes
    del x, xc
    meta = table.select(["Metadata_Batch"]).to_pandas()
    ho = harmonypy.run_harmony(pcs, meta, "Metadata_Batch", random_state=0)
    z = np.asarray(ho.Z_corr)
    if z.shape[0] != pcs.shape[0]:
        z = z.T
    out = {c: table.column(c) for c in meta_cols}
    for k in range(p):
        out[f"PC{k + 1}"] = pa.array(z[:, k].astype(np.float32))
    pq.write_table(pa.table(out), dst, compression="zstd")


if __name__ == "__main__":
    main()
