"""Balans: out-of-core batch correction of Cell Painting profiles.

The functions take the tables you already hold (pyarrow, polars, pandas; anything with the
Arrow PyCapsule stream interface) or a path / URL the engine reads itself (local files,
directories, globs, ``s3://``, ``https://``), run the same engine as the ``balans`` command
with the GIL released, and return :class:`pyarrow.Table` results. Options carry the CLI's
names in snake_case (``--sample-rows`` is ``sample_rows=``) and the same defaults; invalid
input raises :class:`ValueError` with the CLI's message, and Ctrl-C cancels a running job.

Example::

    import balans, pandas as pd
    profiles = pd.read_parquet("examples/data/bbbc021.parquet")
    corrected = balans.correct(profiles, batch="Metadata_Batch", seed=0)
    scores = balans.evaluate(corrected, batch="Metadata_Batch", label="Metadata_MoA")
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Optional, Sequence, Union

import pyarrow as pa

from . import _balans, pp
from ._progress import BalansWarning, Reporter

__version__: str = _balans.__version__

__all__ = [
    "BalansWarning",
    "correct",
    "evaluate",
    "inspect",
    "pp",
    "preprocess",
    "sql",
    "train",
]

#: A table (anything with ``__arrow_c_stream__``, or a pandas DataFrame) or a location.
Data = Any
Columns = Union[str, Sequence[str]]


def _columns(value: Optional[Columns]) -> list[str]:
    """A column list: a comma-separated string (as on the CLI) or a sequence of names."""
    if value is None:
        return []
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return [str(v) for v in value]


def _data(data: Data) -> Any:
    """What the native module takes: a location string or an Arrow C stream producer."""
    if isinstance(data, (str, os.PathLike)):
        return os.fspath(data)
    module = type(data).__module__
    if module.startswith("pandas"):
        # The index is not a profile column (from_pandas would add it as __index_level_0__).
        return pa.Table.from_pandas(data, preserve_index=False)
    if module.startswith("polars") and hasattr(data, "collect") and not hasattr(
        data, "__arrow_c_stream__"
    ):
        return data.collect()  # a LazyFrame
    if hasattr(data, "__arrow_c_stream__"):
        return data
    if hasattr(data, "__arrow_c_array__"):
        return pa.table(data)
    raise ValueError(
        "data must be a path or URL, a pyarrow / polars / pandas table, or an object with "
        f"the Arrow C stream interface, not {type(data).__name__}"
    )


def _table(stream: Any) -> pa.Table:
    """Takes over the native result through the C stream interface (no copy)."""
    return pa.RecordBatchReader.from_stream(stream).read_all()


def _options(**options: Any) -> dict[str, Any]:
    return {k: v for k, v in options.items() if v is not None}


def correct(
    data: Data,
    batch: Columns,
    method: str = "balans",
    *,
    features: Optional[Columns] = None,
    exclude: Optional[Columns] = None,
    negcon: Optional[str] = None,
    model: Optional[Union[str, os.PathLike[str]]] = None,
    seed: int = 0,
    memory_limit: Optional[Union[str, int]] = None,
    temp_dir: Optional[Union[str, os.PathLike[str]]] = None,
    progress: Optional[bool] = None,
    **options: Any,
) -> pa.Table:
    """Batch-corrects a profile table; the same job as ``balans correct``.

    Args:
        data: the profiles: a pyarrow Table / RecordBatchReader, a polars or pandas
            DataFrame, any object with ``__arrow_c_stream__``, or a path / URL (Parquet,
            Arrow IPC, CSV; directories, globs, ``s3://``, ``https://``) read by the engine.
        batch: batch key column(s); several are combined into one key.
        method: ``"balans"``, ``"combat"``, ``"sphering"`` (needs ``negcon``),
            ``"harmony"`` (writes PC1..PCp) or ``"embed"`` (needs ``model``).
        features: feature columns (names or regexes; default: every numeric
            non-``Metadata_`` column).
        exclude: feature columns to leave out.
        negcon: SQL predicate marking the negative controls, e.g.
            ``"Metadata_PertType = 'negcon'"``.
        model: model directory of ``method="embed"`` (written by :func:`train`).
        seed: seed of the landmark sampler.
        memory_limit: memory limit such as ``"2GB"`` or a number of bytes.
        temp_dir: directory for working files.
        progress: show progress bars (default: when stderr is a terminal or in Jupyter).
        **options: the other ``balans correct`` options in snake_case: ``variant``, ``k``,
            ``tau``, ``block``, ``pca``, ``elbow``, ``batch_knn_floor``, ``strength``
            (a number or ``"auto"``), ``iterations``, ``estimator``, ``output_space``,
            ``metric``, ``max_landmarks``, ``sample_rows``, ``partitions``, ``anchor``,
            ``anchor_label``, ``nan``, ``sphering``, ``epsilon``, ``clusters``, ``theta``,
            ``sigma``, ``harmony_iterations``, ``s3_endpoint``.

    Returns:
        The corrected profiles (input columns and order, corrected features), with the
        metadata the CLI writes into its Parquet footer (``balans.method``, ...).

    Raises:
        ValueError: bad input or options (the CLI's message).
        KeyboardInterrupt: Ctrl-C; the job is cancelled and its working files removed.

    Example:
        >>> import balans, polars as pl
        >>> df = pl.read_parquet("examples/data/bbbc021.parquet")
        >>> out = balans.correct(df, batch="Metadata_Batch", method="combat")
        >>> out.num_rows == df.height
        True
    """
    reporter = Reporter(progress)
    try:
        stream = _balans.correct(
            _data(data),
            _columns(batch),
            method,
            _options(
                features=_columns(features),
                exclude=_columns(exclude),
                negcon=negcon,
                model=os.fspath(model) if model is not None else None,
                seed=seed,
                memory_limit=memory_limit,
                temp_dir=os.fspath(temp_dir) if temp_dir is not None else None,
                **options,
            ),
            reporter,
        )
    finally:
        reporter.close()
    return _table(stream)


def evaluate(
    data: Data,
    batch: Columns,
    label: str,
    negcon: Optional[str] = None,
    plate: Optional[str] = None,
    *,
    well: Optional[str] = None,
    features: Optional[Columns] = None,
    exclude: Optional[Columns] = None,
    report: Optional[Union[str, os.PathLike[str]]] = None,
    overwrite: bool = False,
    progress: Optional[bool] = None,
    **options: Any,
) -> dict[str, Any]:
    """Scores batch mixing and biology preservation; the same job as ``balans evaluate``.

    Args:
        data: the embedding or profiles (as for :func:`correct`).
        batch: batch key column(s).
        label: biological label column (perturbation, compound or MoA).
        negcon: SQL predicate marking negative-control rows (enables negcon-mAP).
        plate: plate column (default ``Metadata_Plate`` when present).
        well: well column (default ``Metadata_Well`` when present).
        features, exclude: feature selection as for :func:`correct`.
        report: also write a self-contained HTML report to this file.
        overwrite: replace an existing ``report`` file.
        progress: print each evaluation step to stderr.
        **options: ``skip`` (metric families), ``neighbors``, ``lisi_neighbors``,
            ``perplexity``, ``resolution``, ``resolution_sweep``, ``leiden_restarts``,
            ``null_size``, ``folds``, ``subsample``, ``eval_seed``, ``memory_limit``.

    Returns:
        The evaluation as the CLI's ``--json`` writes it (``report`` holds the scores).

    Example:
        >>> scores = balans.evaluate(table, "Metadata_Batch", "Metadata_MoA", skip="classifier")
        >>> scores["report"]["scores"]  # doctest: +SKIP
    """
    reporter = Reporter(progress)
    text = _balans.evaluate(
        _data(data),
        _columns(batch),
        label,
        _options(
            negcon=negcon,
            plate=plate,
            well=well,
            features=_columns(features),
            exclude=_columns(exclude),
            report=os.fspath(report) if report is not None else None,
            overwrite=overwrite,
            **options,
        ),
        reporter,
    )
    result: dict[str, Any] = json.loads(text)
    return result


def preprocess(
    data: Data,
    recipe: Optional[str] = None,
    *,
    plate: Optional[str] = None,
    well: Optional[str] = None,
    negcon: Optional[str] = None,
    features: Optional[Columns] = None,
    exclude: Optional[Columns] = None,
    progress: Optional[bool] = None,
    **options: Any,
) -> pa.Table:
    """Aggregates, normalises and selects features as pycytominer does (``balans preprocess``).

    Args:
        data: the profiles (as for :func:`correct`).
        recipe: ``"mad_int_featselect"`` (Arevalo et al. 2024) or None for the steps below.
        plate, well: plate and well columns.
        negcon: SQL predicate of the negative controls (normalisation reference).
        features, exclude: feature selection as for :func:`correct`.
        progress: print each step to stderr.
        **options: ``aggregate`` (median/mean), ``normalize`` (standardize, robustize,
            mad_robustize, mad), ``normalize_scope`` (plate/all), ``normalize_on_all``,
            ``mad_epsilon``, ``rank_int``, ``feature_select`` (list), ``na_cutoff``,
            ``min_variance``, ``freq_cut``, ``unique_cut``, ``corr_threshold``, ``blocklist``.

    Returns:
        The preprocessed profiles; ``schema.metadata[b"balans.outcome"]`` holds the run's
        outcome (rows, kept and dropped features) as JSON.

    Example:
        >>> out = balans.preprocess("raw.parquet", recipe="mad_int_featselect",
        ...                         plate="Metadata_Plate", negcon="Metadata_PertType = 'negcon'")
    """
    reporter = Reporter(progress)
    stream, outcome = _balans.preprocess(
        _data(data),
        _options(
            recipe=recipe,
            plate=plate,
            well=well,
            negcon=negcon,
            features=_columns(features),
            exclude=_columns(exclude),
            **options,
        ),
        reporter,
    )
    table = _table(stream)
    metadata = dict(table.schema.metadata or {})
    metadata[b"balans.outcome"] = outcome.encode()
    return table.replace_schema_metadata(metadata)


def train(
    data: Data,
    batch: str,
    label: str,
    output: Union[str, os.PathLike[str]],
    model: str = "abra",
    *,
    features: Optional[Columns] = None,
    exclude: Optional[Columns] = None,
    seed: int = 0,
    overwrite: bool = False,
    progress: Optional[bool] = None,
    **options: Any,
) -> dict[str, Any]:
    """Trains a learned batch-robust embedding into the model directory ``output``.

    The same job as ``balans train``; use the directory with
    ``correct(..., method="embed", model=output)``.

    Args:
        data: the training profiles (as for :func:`correct`).
        batch: batch column (validation batches are held out whole).
        label: label column.
        output: model directory to create.
        model: ``"abra"`` or ``"cellpaintr"``.
        **options: ``epochs``, ``batch_size``, ``lr``, ``weight_decay``, ``patience``,
            ``validation_batches``, ``hidden``, ``embedding``, ``scale``, ``margin``,
            ``alignment_weight``, ``perturbation_bound``, ``adversarial_steps``,
            ``d_model``, ``layers``, ``mlp``, ``temperature``, ``device``.

    Returns:
        The model card (``config.json`` of the directory).

    Example:
        >>> card = balans.train(table, "Metadata_Batch", "Metadata_MoA", "model", epochs=5)
    """
    reporter = Reporter(progress)
    text = _balans.train(
        _data(data),
        batch,
        label,
        os.fspath(output),
        model,
        _options(
            features=_columns(features),
            exclude=_columns(exclude),
            seed=seed,
            overwrite=overwrite,
            **options,
        ),
        reporter,
    )
    card: dict[str, Any] = json.loads(text)
    return card


def inspect(
    data: Data,
    batch: Optional[Columns] = None,
    *,
    features: Optional[Columns] = None,
    exclude: Optional[Columns] = None,
    s3_endpoint: Optional[str] = None,
) -> dict[str, Any]:
    """The detected schema, batches and data problems of a table (``balans inspect --json``).

    Example:
        >>> report = balans.inspect("examples/data/bbbc021.parquet", batch="Metadata_Batch")
        >>> report["rows"]  # doctest: +SKIP
    """
    text = _balans.inspect(
        _data(data),
        _columns(batch),
        _options(
            features=_columns(features), exclude=_columns(exclude), s3_endpoint=s3_endpoint
        ),
    )
    report: dict[str, Any] = json.loads(text)
    return report


def sql(
    query: str,
    tables: Optional[Mapping[str, Data]] = None,
    *,
    memory_limit: Optional[Union[str, int]] = None,
    s3_endpoint: Optional[str] = None,
) -> pa.Table:
    """Runs SQL with Balans' functions; each entry of ``tables`` is registered by name.

    Statements are separated by semicolons; the last one's result is returned.

    Example:
        >>> balans.sql("SELECT Metadata_Batch, count(*) AS n FROM p GROUP BY 1",
        ...            tables={"p": df})  # doctest: +SKIP
    """
    stream = _balans.sql(
        query,
        {name: _data(t) for name, t in (tables or {}).items()},
        _options(memory_limit=memory_limit, s3_endpoint=s3_endpoint),
    )
    return _table(stream)
