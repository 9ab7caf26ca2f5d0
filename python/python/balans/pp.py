"""Scanpy-style integration: ``balans.pp.integrate`` (as ``sc.external.pp.harmony_integrate``).

anndata and numpy are optional dependencies (``pip install ./python[anndata]``).
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa


def integrate(
    adata: Any,
    key: str,
    method: str = "balans",
    basis: str = "X_pca",
    adjusted_basis: str = "X_balans",
    **options: Any,
) -> None:
    """Batch-corrects an embedding of ``adata`` and stores it in ``adata.obsm[adjusted_basis]``.

    Like scanpy's external integrations, it reads ``adata.obsm[basis]`` (or ``adata.X``
    when ``basis="X"``), corrects it with ``balans.correct`` using ``adata.obs[key]`` as the
    batch, and writes the result as a new ``obsm`` entry; ``X`` and ``basis`` are left
    untouched. The ``obs`` columns are passed along, so ``negcon="..."`` predicates and
    ``anchor_label=`` can name them.

    Args:
        adata: an :class:`anndata.AnnData`.
        key: the batch column of ``adata.obs``.
        method: as for :func:`balans.correct` (``harmony`` and ``output_space="pca"``
            write PCA coordinates, so the result may have fewer columns than ``basis``).
        basis: the ``obsm`` key of the embedding to correct (``"X"``: the data matrix).
        adjusted_basis: the ``obsm`` key to write.
        **options: the options of :func:`balans.correct` (``seed``, ``negcon``, ...).

    Example:
        >>> import balans, scanpy as sc
        >>> sc.pp.pca(adata)
        >>> balans.pp.integrate(adata, "batch")
        >>> sc.pp.neighbors(adata, use_rep="X_balans")
    """
    import numpy as np

    from . import correct

    if key not in adata.obs.columns:
        raise ValueError(f"the batch column '{key}' is not in adata.obs")
    if basis == "X":
        matrix = adata.X
        if hasattr(matrix, "toarray"):
            matrix = matrix.toarray()
    else:
        if basis not in adata.obsm:
            raise ValueError(f"adata.obsm has no '{basis}' (run sc.pp.pca first?)")
        matrix = adata.obsm[basis]
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.ndim != 2:
        raise ValueError(f"{basis} must be a 2-d matrix, not {matrix.ndim}-d")
    if options.get("nan") == "drop-rows" or options.get("nan") == "drop_rows":
        raise ValueError("nan='drop-rows' would drop cells: use 'error' or 'zero'")
    # Column-major so that each dimension is one contiguous column (no further copy).
    columns = np.asfortranarray(matrix)
    names = [f"__balans_dim_{i + 1}" for i in range(columns.shape[1])]
    obs = pa.Table.from_pandas(adata.obs, preserve_index=False)
    if "features" in options:
        raise ValueError("integrate corrects the whole embedding: leave out features=")
    table = obs
    for i, name in enumerate(names):
        table = table.append_column(name, pa.array(columns[:, i]))
    corrected = correct(table, key, method, features=names, **options)
    if corrected.num_rows != adata.n_obs:
        raise ValueError(
            f"the correction returned {corrected.num_rows} rows for {adata.n_obs} cells"
        )
    keep = set(obs.column_names) | {"Metadata_balans_covered"}
    out = [n for n in corrected.column_names if n not in keep]
    adata.obsm[adjusted_basis] = np.column_stack(
        [corrected.column(n).to_numpy() for n in out]
    ).astype(np.float64, copy=False)
