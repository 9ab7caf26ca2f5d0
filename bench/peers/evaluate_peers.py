#!/usr/bin/env python3
"""Peer-tool (Python) timing of the Arevalo et al. 2024 batch-correction metrics.

What it runs
------------
For one Parquet file (Metadata_Batch, Metadata_Plate, Metadata_Well, Metadata_Compound,
Metadata_IsControl, features f*), exactly as shared/golden/metrics/README.md describes:
cells = non-control rows, embedding = all f* columns as float64, label = Metadata_Compound,
batch = Metadata_Batch, negcon = Metadata_IsControl. Metric families, each in a fresh
subprocess (wall time via time.perf_counter, peak RSS via the child's
resource.getrusage(RUSAGE_SELF).ru_maxrss; a watchdog in the parent kills a family that runs
past --timeout seconds or whose process RSS exceeds --mem-limit-gb):

  leiden        scanpy.pp.neighbors(25, cosine, use_rep="X") + scanpy.tl.leiden(flavor="leidenalg",
                resolution 1, random_state 0, n_iterations -1) + sklearn NMI / ARI.
                Also writes the 25-NN (self first) + UMAP connectivities to the work dir
                for graph_conn / kbet.
  silhouette    scib_metrics.silhouette_label / silhouette_batch, metric="cosine".
  graph_conn    scib 1.x graph connectivity on the UMAP connectivities (per label, strong
                connected components of the label's subgraph; mean of largest fraction).
  kbet          scib_metrics.kbet_per_label(NeighborsResults(25-NN), alpha .05, 100 diffusion comps).
  lisi          sklearn NearestNeighbors(90, cosine, brute) (self excluded) + scib_metrics.lisi_knn
                (perplexity 30) for batch and label; scib scaling of the medians.
  map           copairs 0.5.5 average_precision + mean_average_precision (null_size 10000,
                seed 0, threshold .05, fresh cache dir) for negcon and nonrep (Arevalo rules).
  batch_clf     1 - macro F1 of LogisticRegression(max_iter=1000), cross_val_predict with
                StratifiedKFold(5, shuffle=True, random_state=0).

graph_conn and kbet reuse the graph written by leiden (its time is not counted again); if that
file is missing they build the 25-NN themselves and report that time as "knn_s".

Install (throwaway venv; the versions of the golden data)
---------------------------------------------------------
  python3 -m venv /tmp/peerbench/venv
  /tmp/peerbench/venv/bin/pip install scanpy==1.11.5 anndata==0.12.19 scikit-learn==1.9.1 \
      scib-metrics==0.5.10 "jax[cpu]==0.10.2" copairs==0.5.5 leidenalg==0.12.0 igraph==1.0.0 \
      umap-learn==0.5.12 numpy==2.4.6 scipy==1.17.1 pandas==2.3.3 pyarrow statsmodels

Call
----
  nice -n 10 /tmp/peerbench/venv/bin/python evaluate_peers.py FILE.parquet \
      [--families leiden,silhouette,graph_conn,kbet,lisi,map,batch_clf] \
      [--timeout 1200] [--mem-limit-gb 16] [--workdir DIR] [--json OUT.json]
  /tmp/peerbench/venv/bin/python evaluate_peers.py --table OUT1.json OUT2.json ...   # Markdown table

Threads are left at the libraries' defaults (all cores) unless the caller sets
OMP_NUM_THREADS / XLA_FLAGS etc.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time

FAMILIES = ["leiden", "silhouette", "graph_conn", "kbet", "lisi", "map", "batch_clf"]


# ----------------------------------------------------------------------------- worker side
def load(path):
    import numpy as np
    import pyarrow.parquet as pq

    t = pq.read_table(path)
    names = t.column_names
    feats = [c for c in names if not c.startswith("Metadata_")]
    meta = t.select([c for c in names if c.startswith("Metadata_")]).to_pandas()
    X = np.column_stack([t.column(c).to_numpy().astype(np.float64) for c in feats])
    del t
    return meta, X


def cells(meta, X):
    import numpy as np

    mask = ~meta["Metadata_IsControl"].to_numpy().astype(bool)
    return (
        X[mask],
        meta["Metadata_Compound"].to_numpy()[mask].astype(str),
        meta["Metadata_Batch"].to_numpy()[mask].astype(str),
        np.flatnonzero(mask),
    )


def _patch_scanpy_getnnz():
    """scanpy 1.11.5 + scipy 1.17: the pynndescent path (>= 4096 cells) hands a csr_array to
    scanpy.neighbors._common._ind_dist_shortcut, which calls the removed .getnnz(axis=1)
    (AttributeError). Convert to csr_matrix first; the result is unchanged."""
    import scipy.sparse as sp
    from scanpy.neighbors import _common

    if getattr(_common, "_peerbench_patched", False):
        return
    for name in ("_ind_dist_shortcut", "_ind_dist_slow"):
        f = getattr(_common, name)
        setattr(_common, name, (lambda f: lambda d, *a, **k: f(sp.csr_matrix(d), *a, **k))(f))
    _common._peerbench_patched = True


def knn25(Xc):
    """scanpy 25-NN (cosine); returns adata, (idx, dist) with self first, connectivities."""
    import anndata as ad
    import numpy as np
    import scanpy as sc

    _patch_scanpy_getnnz()
    adata = ad.AnnData(Xc)
    sc.pp.neighbors(adata, use_rep="X", n_neighbors=25, metric="cosine")
    D = adata.obsp["distances"].tocsr()
    n = D.shape[0]
    idx = np.empty((n, 25), dtype=np.int64)
    dist = np.empty((n, 25), dtype=np.float64)
    short = 0
    for i in range(n):
        s, e = D.indptr[i], D.indptr[i + 1]
        j, d = D.indices[s:e], D.data[s:e]
        o = np.lexsort((j, d))
        j, d = j[o][:24], d[o][:24]
        if len(j) < 24:  # pad (approximate kNN can return fewer); repeat the last one
            short += 1
            j = np.concatenate([j, np.repeat(j[-1:], 24 - len(j))])
            d = np.concatenate([d, np.repeat(d[-1:], 24 - len(d))])
        idx[i, 0], dist[i, 0] = i, 0.0
        idx[i, 1:], dist[i, 1:] = j, d
    return adata, idx, dist, adata.obsp["connectivities"].tocsr(), short


def fam_leiden(meta, X, wd, res):
    import numpy as np
    import scanpy as sc
    import scipy.sparse as sp
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    Xc, lab, bat, _ = cells(meta, X)
    t0 = time.perf_counter()
    adata, idx, dist, conn, short = knn25(Xc)
    t1 = time.perf_counter()
    sc.tl.leiden(adata, resolution=1.0, random_state=0, flavor="leidenalg", n_iterations=-1)
    t2 = time.perf_counter()
    cl = adata.obs["leiden"].to_numpy()
    res["nmi"] = float(normalized_mutual_info_score(lab, cl, average_method="arithmetic"))
    res["ari"] = float(adjusted_rand_score(lab, cl))
    t3 = time.perf_counter()
    res["leiden_n_clusters"] = int(len(np.unique(cl)))
    res["knn_rows_padded"] = short
    res["knn_s"], res["leiden_s"], res["nmi_ari_s"] = t1 - t0, t2 - t1, t3 - t2
    res["seconds"] = t3 - t0
    np.savez(os.path.join(wd, "knn25.npz"), idx=idx, dist=dist)
    sp.save_npz(os.path.join(wd, "conn.npz"), conn)


def get_graph(meta, X, wd, res):
    import numpy as np
    import scipy.sparse as sp

    p = os.path.join(wd, "knn25.npz")
    if os.path.exists(p) and os.path.exists(os.path.join(wd, "conn.npz")):
        z = np.load(p)
        res["graph_from"] = "leiden family (cached)"
        return z["idx"], z["dist"], sp.load_npz(os.path.join(wd, "conn.npz")).tocsr()
    Xc = cells(meta, X)[0]
    t0 = time.perf_counter()
    _, idx, dist, conn, _ = knn25(Xc)
    res["knn_s"] = time.perf_counter() - t0
    res["graph_from"] = "recomputed (counted in knn_s)"
    return idx, dist, conn


def fam_silhouette(meta, X, wd, res):
    import scib_metrics

    Xc, lab, bat, _ = cells(meta, X)
    t0 = time.perf_counter()
    res["silhouette_label"] = float(scib_metrics.silhouette_label(Xc, lab, metric="cosine"))
    t1 = time.perf_counter()
    try:
        res["silhouette_batch"] = float(scib_metrics.silhouette_batch(Xc, lab, bat, metric="cosine"))
    except ValueError as e:  # every label skipped (1 batch, or one cell per batch): pd.concat([])
        res["silhouette_batch"] = float("nan")
        res["silhouette_batch_note"] = f"no eligible label ({e})"
    t2 = time.perf_counter()
    res["silhouette_label_s"], res["silhouette_batch_s"] = t1 - t0, t2 - t1
    res["seconds"] = t2 - t0


def fam_graph_conn(meta, X, wd, res):
    import numpy as np
    from scipy.sparse.csgraph import connected_components

    Xc, lab, bat, _ = cells(meta, X)
    _, _, conn = get_graph(meta, X, wd, res)
    t0 = time.perf_counter()
    fr = []
    for l in np.unique(lab):
        m = np.flatnonzero(lab == l)
        sub = conn[m][:, m]
        _, comp = connected_components(sub, connection="strong")
        fr.append(np.bincount(comp).max() / len(m))
    res["graph_connectivity"] = float(np.mean(fr))
    res["seconds"] = time.perf_counter() - t0 + res.get("knn_s", 0.0)


def fam_kbet(meta, X, wd, res):
    import numpy as np
    import scib_metrics
    from scib_metrics.nearest_neighbors import NeighborsResults

    Xc, lab, bat, _ = cells(meta, X)
    idx, dist, _ = get_graph(meta, X, wd, res)
    t0 = time.perf_counter()
    nn = NeighborsResults(indices=idx, distances=dist)
    score, df = scib_metrics.kbet_per_label(nn, bat, lab, alpha=0.05, diffusion_n_comps=100, return_df=True)
    res["kbet"] = float(score)
    res["kbet_labels_scored"] = int(np.isfinite(df["kBET"].to_numpy(dtype=float)).sum())
    res["seconds"] = time.perf_counter() - t0 + res.get("knn_s", 0.0)


def fam_lisi(meta, X, wd, res):
    import numpy as np
    import scib_metrics
    from scib_metrics.nearest_neighbors import NeighborsResults
    from sklearn.neighbors import NearestNeighbors

    Xc, lab, bat, _ = cells(meta, X)
    t0 = time.perf_counter()
    dist, idx = NearestNeighbors(n_neighbors=90, metric="cosine", algorithm="brute").fit(Xc).kneighbors()
    t1 = time.perf_counter()
    nn = NeighborsResults(indices=idx, distances=dist)
    il = np.nanmedian(scib_metrics.lisi_knn(nn, bat, perplexity=30))
    cl = np.nanmedian(scib_metrics.lisi_knn(nn, lab, perplexity=30))
    t2 = time.perf_counter()
    nb, nl = len(np.unique(bat)), len(np.unique(lab))
    res["ilisi"] = float((il - 1) / (nb - 1))
    res["clisi"] = float((nl - cl) / (nl - 1))
    res["ilisi_median_raw"], res["clisi_median_raw"] = float(il), float(cl)
    res["knn90_s"], res["lisi_s"] = t1 - t0, t2 - t1
    res["seconds"] = t2 - t0


def fam_map(meta, X, wd, res):
    import numpy as np
    import pandas as pd
    from copairs.map import average_precision, mean_average_precision

    L = "Metadata_Compound"
    m = meta[["Metadata_Plate", "Metadata_Well", L]].copy()
    m[L] = m[L].astype(str)
    ctrl = meta["Metadata_IsControl"].to_numpy().astype(bool)
    m["Metadata_PertType"] = np.where(ctrl, "negcon", "trt")
    keep = m[L].map(m[L].value_counts()).to_numpy() > 1  # drop labels occurring once
    m, Xk, ctrl = m[keep].reset_index(drop=True), X[keep], ctrl[keep]
    res["map_rows_dropped_singletons"] = int((~keep).sum())
    t_all = time.perf_counter()
    for kind in ("negcon", "nonrep"):
        if kind == "negcon":
            mm = m.copy()
            mm.loc[ctrl, L] = [f"DMSO_{i}" for i in range(int(ctrl.sum()))]
            XX = Xk
            kw = dict(pos_sameby=[L], pos_diffby=["Metadata_Well"], neg_sameby=["Metadata_Plate"],
                      neg_diffby=["Metadata_PertType", L])
        else:
            mm = m[~ctrl].reset_index(drop=True)
            XX = Xk[~ctrl]
            kw = dict(pos_sameby=[L], pos_diffby=[], neg_sameby=["Metadata_Plate"], neg_diffby=[L])
        t0 = time.perf_counter()
        ap = average_precision(mm, XX, batch_size=20000, distance="cosine", progress_bar=False, **kw)
        if kind == "negcon":
            ap = ap[ap["Metadata_PertType"] != "negcon"]
        t1 = time.perf_counter()
        cache = tempfile.mkdtemp(prefix="copairs_cache_", dir=wd)
        mp = mean_average_precision(ap, [L], null_size=10000, threshold=0.05, seed=0,
                                    progress_bar=False, cache_dir=cache)
        t2 = time.perf_counter()
        shutil.rmtree(cache, ignore_errors=True)
        mp = mp.dropna(subset=["mean_average_precision", "p_value"])
        res[f"{kind}_map"] = float(mp["mean_average_precision"].mean())
        res[f"{kind}_fraction_below_p"] = float(mp["below_p"].mean())
        res[f"{kind}_fraction_below_corrected_p"] = float(mp["below_corrected_p"].mean())
        res[f"{kind}_n_groups"] = int(len(mp))
        res[f"{kind}_ap_s"], res[f"{kind}_map_s"] = t1 - t0, t2 - t1
    res["seconds"] = time.perf_counter() - t_all


def fam_batch_clf(meta, X, wd, res):
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    Xc, lab, bat, _ = cells(meta, X)
    t0 = time.perf_counter()
    cv = StratifiedKFold(n_splits=5, shuffle=True, random_state=0)
    pred = cross_val_predict(LogisticRegression(max_iter=1000), Xc, bat, cv=cv)
    t1 = time.perf_counter()
    res["batch_classifier"] = float(1 - f1_score(bat, pred, average="macro"))
    folds = [f1_score(bat[te], pred[te], average="macro") for _, te in cv.split(Xc, bat)]
    res["batch_classifier_mean_over_folds"] = float(1 - np.mean(folds))
    res["seconds"] = t1 - t0


def worker(args):
    res = {"family": args.worker}
    t0 = time.perf_counter()
    meta, X = load(args.input)
    res["load_s"] = time.perf_counter() - t0
    res["n_rows"], res["n_dims"] = int(X.shape[0]), int(X.shape[1])
    res["n_cells"] = int((~meta["Metadata_IsControl"].to_numpy().astype(bool)).sum())
    res["rss_after_load_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    globals()["fam_" + args.worker](meta, X, args.workdir, res)
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    res["status"] = "ok"
    with open(args.result, "w") as f:
        json.dump(res, f)


# ----------------------------------------------------------------------------- parent side
def tree_rss_kb(pid):
    """RSS (kB) of pid and its descendants, from /proc."""
    kids = {}
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                kids.setdefault(ppid, []).append(int(p))
            except (OSError, ValueError, IndexError):
                pass
    tot, todo = 0, [pid]
    while todo:
        q = todo.pop()
        try:
            with open(f"/proc/{q}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        tot += int(line.split()[1])
        except OSError:
            pass
        todo.extend(kids.get(q, []))
    return tot


def run_family(fam, args):
    rfile = os.path.join(args.workdir, f"result_{fam}.json")
    if os.path.exists(rfile):
        os.remove(rfile)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", fam, "--input", args.input,
           "--workdir", args.workdir, "--result", rfile]
    log = open(os.path.join(args.workdir, f"log_{fam}.txt"), "w")
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    status, max_tree = None, 0
    lim_kb = args.mem_limit_gb * 1024 * 1024
    while p.poll() is None:
        time.sleep(0.5)
        rss = tree_rss_kb(p.pid)
        max_tree = max(max_tree, rss)
        if rss > lim_kb:
            status = f"killed (memory > {args.mem_limit_gb} GB)"
        elif time.perf_counter() - t0 > args.timeout:
            status = f"> {args.timeout / 60:g} min"
        if status:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            break
    wall = time.perf_counter() - t0
    log.close()
    if status is None and p.returncode == 0 and os.path.exists(rfile):
        with open(rfile) as f:
            res = json.load(f)
    else:
        res = {"family": fam, "status": status or f"failed (rc {p.returncode}, see log_{fam}.txt)"}
    res["subprocess_wall_s"] = wall
    res["watchdog_max_tree_rss_mb"] = max_tree / 1024
    return res


def fmt_vals(r):
    skip = {"family", "status", "seconds", "load_s", "n_rows", "n_dims", "n_cells", "peak_rss_mb",
            "rss_after_load_mb", "subprocess_wall_s", "watchdog_max_tree_rss_mb", "graph_from",
            "map_rows_dropped_singletons", "knn_rows_padded", "silhouette_batch_note"}
    out = []
    for k, v in r.items():
        if k in skip:
            continue
        if isinstance(v, float):
            out.append(f"{k}={v:.1f}" if k.endswith("_s") else f"{k}={v:.4f}")
        else:
            out.append(f"{k}={v}")
    return ", ".join(out)


def table(runs):
    lines = ["| family | n rows (cells) | seconds | peak RSS MB | values |", "|---|---|---|---|---|"]
    for run in runs:
        for r in run["families"]:
            size = f"{run.get('n_rows', '?')} ({run.get('n_cells', '?')})"
            if r.get("status") == "ok":
                lines.append(f"| {r['family']} | {size} | {r['seconds']:.1f} | {r['peak_rss_mb']:.0f} | {fmt_vals(r)} |")
            else:
                lines.append(f"| {r['family']} | {size} | {r['status']} | {r['watchdog_max_tree_rss_mb']:.0f} (watchdog) | |")
    return "\n".join(lines)


def versions():
    from importlib.metadata import version

    out = {}
    for p in ["scanpy", "anndata", "scikit-learn", "scib-metrics", "jax", "jaxlib", "copairs", "leidenalg",
              "igraph", "umap-learn", "pynndescent", "numpy", "scipy", "pandas", "pyarrow", "statsmodels"]:
        try:
            out[p] = version(p)
        except Exception:
            out[p] = None
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input", nargs="?")
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--timeout", type=float, default=1200)
    ap.add_argument("--mem-limit-gb", type=float, default=16)
    ap.add_argument("--workdir")
    ap.add_argument("--json")
    ap.add_argument("--table", nargs="+", help="print the Markdown table of these --json outputs")
    ap.add_argument("--worker", choices=FAMILIES, help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--input", dest="input_opt", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.table:
        print(table([json.load(open(p)) for p in args.table]))
        return
    if args.worker:
        args.input = args.input_opt
        return worker(args)
    args.input = os.path.abspath(args.input)
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="peerbench_")
    os.makedirs(args.workdir, exist_ok=True)
    run = {"input": args.input, "versions": versions(), "cpu_count": os.cpu_count(),
           "thread_env": {k: os.environ.get(k) for k in ["OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                                         "MKL_NUM_THREADS", "XLA_FLAGS", "NUMBA_NUM_THREADS"]},
           "timeout_s": args.timeout, "mem_limit_gb": args.mem_limit_gb, "families": []}
    for fam in args.families.split(","):
        r = run_family(fam, args)
        for k in ("n_rows", "n_cells"):
            if k in r:
                run[k] = r[k]
        run["families"].append(r)
        print(json.dumps(r), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(run, f, indent=1)
    print(table([run]))


if __name__ == "__main__":
    main()
