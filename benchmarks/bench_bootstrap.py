"""Benchmark of the cell bootstrap (vcjax.bootstrap) against a straightforward NumPy loop.

Default: n_boot = 1000 resamples of a screen with P = 1000 perturbations × 100 cells, 1000
control cells, G = 2000 genes (dense float32 log values), the model and the 7 default
baselines × 11 default metrics, DEG weights refitted per resample. The NumPy reference
materialises each resample (``X[idx]``), recomputes the group sums and runs evaluate's
point-estimate path (:func:`vcjax.evaluate.prepare`'s context builder, rank_genes,
baselines, engine scoring) on it; it is timed on ``--ref-reps`` resamples in the same run
and extrapolated per resample. Reports seconds per resample, the speed-up and peak RSS.

    python benchmarks/bench_bootstrap.py            # full size (long on 2 cores)
    python benchmarks/bench_bootstrap.py --quick    # P=100, G=500, n_boot=100
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import anndata as ad  # noqa: E402
import jax  # noqa: E402
import pandas as pd  # noqa: E402

from vcjax import bootstrap as BS  # noqa: E402
from vcjax import data as D  # noqa: E402

E = importlib.import_module("vcjax.evaluate")


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def make_screen(P: int, G: int, cells: int, n_control: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    base = rng.gamma(2.0, 0.8, G).astype(np.float32)
    eff = np.zeros((P + 1, G), np.float32)
    for p in range(1, P + 1):
        g = rng.choice(G, 20, replace=False)
        eff[p, g] = rng.normal(0, 0.8, 20)
    sizes = np.array([n_control] + [cells] * P)
    code = np.repeat(np.arange(P + 1), sizes)
    X = np.empty((code.size, G), np.float32)
    for s in range(0, code.size, 20000):
        c = code[s : s + 20000]
        X[s : s + c.size] = np.maximum(
            base + eff[c] + rng.standard_normal((c.size, G), np.float32) * 0.6, 0
        )
    names = np.array(["control"] + [f"P{p:04d}" for p in range(1, P + 1)])
    obs = pd.DataFrame({"condition": names[code]}, index=[f"c{i}" for i in range(code.size)])
    adata = ad.AnnData(X=X, obs=obs)
    adata.var_names = [f"G{g:05d}" for g in range(G)]
    pb = np.stack([X[code == p].mean(0) for p in range(1, P + 1)])
    model = pb + rng.normal(0, 0.2, pb.shape).astype(np.float32)
    return adata, (list(names[1:]), model.astype(np.float64), list(adata.var_names))


def numpy_reference(adata, ctx, model, *, n_reps: int, seed: int = 0) -> float:
    """Seconds per resample of the explicit loop (materialise, sum, point-estimate path)."""
    X = np.asarray(adata.X)
    labels = adata.obs["condition"].astype(str).to_numpy()
    names = list(ctx.stats.half1.names)
    code = pd.Index(names).get_indexer(labels)
    gh = 2 * code + np.asarray(ctx.cell_split).astype(int) - 1
    order = np.argsort(gh, kind="stable")
    sizes = np.bincount(gh, minlength=2 * len(names))
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    rng = np.random.default_rng(seed)
    metrics = list(ctx.options["metrics"])
    t0 = time.perf_counter()
    for _ in range(n_reps):
        draw = np.concatenate([order[s + rng.integers(0, n, n)] for s, n in zip(starts, sizes)])
        Xr = X[draw]  # the materialised resample
        S = np.add.reduceat(Xr.astype(np.float64), starts, axis=0)
        Q = np.add.reduceat(Xr.astype(np.float64) ** 2, starts, axis=0)

        def mk(h, S=S, Q=Q):
            return D.GroupStats(
                names=tuple(names),
                genes=ctx.genes,
                n=sizes[h::2],
                sum=S[h::2],
                sumsq=Q[h::2],
                control="control",
            )

        rctx = E._one_context(
            D.SplitStats(mk(0), mk(1)),
            control="control",
            covariate=None,
            reference="perturbed",
            weights="deg",
            weights_from="all",
            deg_method="t-test_overestim_var",
            baselines=E.DEFAULT_BASELINES,
            seed=0,
            options={},
        )
        E._score_sources(
            rctx,
            {"model": model, **rctx.baselines},
            metrics,
            k=20,
            strict=False,
            gate=True,
            chunk_size=None,
        )
    return (time.perf_counter() - t0) / n_reps


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--perts", type=int, default=1000)
    ap.add_argument("--genes", type=int, default=2000)
    ap.add_argument("--cells", type=int, default=100)
    ap.add_argument("--control", type=int, default=1000)
    ap.add_argument("--boot", type=int, default=1000)
    ap.add_argument("--ref-reps", type=int, default=3)
    ap.add_argument("--chunk", type=int, default=None)
    ap.add_argument("--json", type=str, default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.perts, args.genes, args.boot, args.control = 100, 500, 100, 400
    out = dict(
        P=args.perts,
        G=args.genes,
        cells=args.cells,
        control=args.control,
        n_boot=args.boot,
        backend=jax.default_backend(),
        devices=len(jax.devices()),
        machine=platform.machine(),
    )
    t = time.perf_counter()
    adata, pred = make_screen(args.perts, args.genes, args.cells, args.control)
    out["simulate_s"] = time.perf_counter() - t
    out["rss_after_data_mb"] = rss_mb()
    t = time.perf_counter()
    table = E.evaluate(adata, pred, key="condition", control="control", normalize=None)
    out["evaluate_point_s"] = time.perf_counter() - t
    (ctx,) = E.prepare(adata, key="condition", control="control", normalize=None)
    ctx.options.update(model=pred[1], metrics=E.DEFAULT_METRICS, k=20, strict=False, gate=True)
    # compile + one chunk (warm-up), then the timed run
    t = time.perf_counter()
    warm = BS.context_samples(ctx, n_boot=2, chunk_size=args.chunk)
    out["warmup_compile_s"] = time.perf_counter() - t
    out["chunk"] = warm["chunk"]
    out["pvalue"] = warm["pvalue"]
    t = time.perf_counter()
    res = BS.context_samples(ctx, n_boot=args.boot, chunk_size=args.chunk)
    out["bootstrap_s"] = time.perf_counter() - t
    out["bootstrap_per_resample_s"] = out["bootstrap_s"] / args.boot
    t = time.perf_counter()
    BS.add_intervals(table, [ctx], n_boot=min(args.boot, 50), chunk_size=args.chunk)
    out["add_intervals_50_s"] = time.perf_counter() - t
    out["rss_after_bootstrap_mb"] = rss_mb()
    del res
    out["numpy_per_resample_s"] = numpy_reference(adata, ctx, pred[1], n_reps=args.ref_reps)
    out["speedup_per_resample"] = out["numpy_per_resample_s"] / out["bootstrap_per_resample_s"]
    out["peak_rss_mb"] = rss_mb()
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
