"""Benchmark: vcjax's vectorised Wilcoxon vs scanpy ``rank_genes_groups(method="wilcoxon")``.

Both test every perturbation against the control ("non-targeting") for every gene, on the
same log-normalised matrix, in the same run. The vcjax time is the steady-state time of
``mannwhitney_vs_control`` (its jitted parts compiled once beforehand, inputs already on
the device, ``block_until_ready``; minimum of ``--repeats``); the scanpy time is a call of
``sc.tl.rank_genes_groups`` with ``reference="non-targeting"`` (minimum of
``--scanpy-repeats``), after a warm-up call on a small subset that compiles or loads
scanpy's numba kernels (``scanpy_warmup_s``; a cold numba cache costs ~10 s once). The
z-scores are checked to agree (scanpy's wilcoxon score is vcjax's z-score without
continuity correction and without tie correction).

On CPU vcjax counts on the host (NumPy sorts, small XLA lookups; see
:mod:`vcjax.stats._wilcoxon`); ``vcjax_stages_ms`` is the CPU time of each stage of that host
path in one extra call, summed over its threads (the XLA computations' own threads are not
counted, so "lookup + terms (xla)" is only their dispatch), and ``vcjax_threads`` the
number of threads it used. ``--xla`` also times the XLA-sort path (the accelerator
implementation) on the same device (``vcjax_xla_s``).

Usage::

    .venv/bin/python benchmarks/bench_wilcoxon.py [--perts 200] [--cells 50]
        [--control 2000] [--genes 2000] [--repeats 5] [--scanpy-repeats 1] [--xla]

Prints one JSON line with both timings and the ratio.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import numpy as np


def make_data(perts: int, cells: int, control: int, genes: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    base = rng.gamma(1.5, 1.0, genes)
    n = perts * cells + control
    labels = np.array(
        ["non-targeting"] * control + [f"P{i:04d}" for i in range(perts) for _ in range(cells)]
    )
    eff = np.zeros((perts + 1, genes))
    for i in range(1, perts + 1):
        idx = rng.choice(genes, 20, replace=False)
        eff[i, idx] = rng.normal(scale=1.0, size=20)
    code = np.concatenate([np.zeros(control, int), np.repeat(np.arange(1, perts + 1), cells)])
    counts = rng.poisson(base[None, :] * np.exp(eff[code]), size=(n, genes)).astype(np.float32)
    lib = counts.sum(1, keepdims=True)
    x = np.log1p(counts / np.maximum(lib, 1) * 1e4).astype(np.float32)
    return x, labels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--perts", type=int, default=200)
    ap.add_argument("--cells", type=int, default=50)
    ap.add_argument("--control", type=int, default=2000)
    ap.add_argument("--genes", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--scanpy-repeats", type=int, default=1)
    ap.add_argument("--xla", action="store_true", help="also time the XLA path")
    args = ap.parse_args()

    import anndata as ad
    import jax
    import pandas as pd
    import scanpy as sc

    from vcjax.stats import _wilcoxon as W
    from vcjax.stats import mannwhitney_vs_control

    x, labels = make_data(args.perts, args.cells, args.control, args.genes)
    perts = sorted(set(labels) - {"non-targeting"})
    index = {p: i for i, p in enumerate(perts)}
    is_ctrl = labels == "non-targeting"
    codes = np.array([index[lab] for lab in labels[~is_ctrl]], np.int32)

    # vcjax: compile, then time steady state
    gx = jax.device_put(x[~is_ctrl])
    gl = jax.device_put(codes)
    cx = jax.device_put(x[is_ctrl])

    def run(continuity=True, tie_correct=True):
        return mannwhitney_vs_control(
            gx, gl, cx, n_groups=len(perts), continuity=continuity, tie_correct=tie_correct
        )

    t0 = time.perf_counter()
    jax.block_until_ready(run())
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(run())
        times.append(time.perf_counter() - t0)
    vcjax_s = min(times)
    extra = {}
    if jax.default_backend() == "cpu":
        stages: dict[str, float] = {}
        W._host_counts(np.asarray(gx), codes, np.asarray(cx), len(perts), profile=stages)
        extra["vcjax_stages_ms"] = {k: round(v * 1e3, 1) for k, v in stages.items()}
        extra["vcjax_threads"] = W._HOST_THREADS
    if args.xla:

        def run_xla():
            return W._mannwhitney(
                gx, gl, cx, n_groups=len(perts), continuity=True, tie_correct=True, path="jax"
            )

        jax.block_until_ready(run_xla())
        xla = []
        for _ in range(max(1, args.repeats // 2)):
            t0 = time.perf_counter()
            jax.block_until_ready(run_xla())
            xla.append(time.perf_counter() - t0)
        extra["vcjax_xla_s"] = round(min(xla), 4)

    # scanpy, same data, same run
    adata = ad.AnnData(x, obs=pd.DataFrame({"target": pd.Categorical(labels)}))
    adata.uns["log1p"] = {"base": None}
    scanpy_times = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # warm-up on a small subset: numba compiles (or loads its on-disk cache of) scanpy's
        # kernels on first use, several seconds that the steady-state time leaves out, as
        # it leaves out vcjax's compilation
        keep = np.isin(labels, ["non-targeting", *perts[:3]])
        small = ad.AnnData(
            x[keep][:, :50], obs=pd.DataFrame({"target": pd.Categorical(labels[keep])})
        )
        small.uns["log1p"] = {"base": None}
        t0 = time.perf_counter()
        sc.tl.rank_genes_groups(small, "target", reference="non-targeting", method="wilcoxon")
        scanpy_warmup_s = time.perf_counter() - t0
        for _ in range(max(1, args.scanpy_repeats)):
            t0 = time.perf_counter()
            sc.tl.rank_genes_groups(
                adata, "target", reference="non-targeting", method="wilcoxon", n_genes=args.genes
            )
            scanpy_times.append(time.perf_counter() - t0)
    scanpy_s = min(scanpy_times)

    # agreement of the z-scores (scanpy: no continuity, no tie correction, float32)
    res = run(continuity=False, tie_correct=False)
    z = np.asarray(res.zscore)
    rg = adata.uns["rank_genes_groups"]
    var_index = {g: i for i, g in enumerate(adata.var_names)}
    err = 0.0
    for p in perts[:10]:
        names = np.asarray(rg["names"][p]).astype(str)
        sc_scores = np.asarray(rg["scores"][p], dtype=np.float64)
        ours = z[index[p], [var_index[n] for n in names]]
        err = max(err, float(np.max(np.abs(ours - sc_scores) / (1 + np.abs(sc_scores)))))

    print(
        json.dumps(
            {
                "perts": args.perts,
                "cells_per_pert": args.cells,
                "control_cells": args.control,
                "genes": args.genes,
                "device": str(jax.devices()[0]),
                "vcjax_s": round(vcjax_s, 4),
                "vcjax_median_s": round(float(np.median(times)), 4),
                "vcjax_compile_s": round(compile_s, 2),
                "scanpy_s": round(scanpy_s, 3),
                "scanpy_warmup_s": round(scanpy_warmup_s, 2),
                "speedup": round(scanpy_s / vcjax_s, 1),
                "max_rel_zscore_diff_vs_scanpy": err,
                **extra,
            }
        )
    )


if __name__ == "__main__":
    main()
