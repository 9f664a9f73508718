"""Benchmark of the cell bootstrap (vcjax.pipeline.stratum_samples) against a straightforward NumPy loop.

Default: n_boot = 1000 resamples of a screen with P = 1000 perturbations × 100 cells, 1000
control cells, G = 2000 genes (dense float32 log values), the model and the 7 default
baselines × 11 default metrics, DEG weights refitted per resample. The reference is a
straightforward NumPy loop: it materialises each resample (``X[idx]``), recomputes the group
sums and runs the whole evaluation in NumPy float64 (``_numpy_pipeline.py``: t-tests with
exact p-values, BH, weights, baselines, metrics; its point estimate is checked against
vcjax's); it is timed on ``--ref-reps`` resamples in the same run and extrapolated per
resample. Reports seconds per resample, the speed-up and peak RSS.

    python benchmarks/bench_bootstrap.py            # full size (long on 2 cores)
    python benchmarks/bench_bootstrap.py --quick    # P=100, G=500, n_boot=100
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _numpy_pipeline as NP  # noqa: E402
import anndata as ad  # noqa: E402
import jax  # noqa: E402
import pandas as pd  # noqa: E402

from vcjax import pipeline as PL  # noqa: E402
from vcjax.metrics import DEFAULT_METRICS  # noqa: E402


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


def _group_half_sums(X, order, starts, sizes, draw=None):
    """(cnt (C, 2), sums, sums of squares (C, 2, G)) of the cells ``draw`` (default: all)."""
    Xr = X[order if draw is None else draw].astype(np.float64)  # the resample, materialised
    S = np.add.reduceat(Xr, starts, axis=0)
    Q = np.add.reduceat(Xr * Xr, starts, axis=0)
    C = sizes.size // 2
    return sizes.reshape(C, 2).astype(np.float64), S.reshape(C, 2, -1), Q.reshape(C, 2, -1)


def numpy_reference(adata, stratum, pred, table, *, n_reps: int, seed: int = 0):
    """The straightforward NumPy loop: per resample, draw cell indices within every
    condition-half, copy the cells (``X[idx]``), sum them, and run the whole evaluation in
    NumPy float64 (``_numpy_pipeline.evaluate_sums``: t-tests, BH, weights, baselines, 11
    metrics). Returns (seconds per resample, max |Δ| of its point estimate vs vcjax's
    ``table``, the point-estimate table of ``evaluate``)."""
    X = np.asarray(adata.X)
    labels = adata.obs["condition"].astype(str).to_numpy()
    names = list(stratum.groups)
    code = pd.Index(names).get_indexer(labels)
    gh = 2 * code + np.asarray(stratum.cells.half).astype(int) - 1
    order = np.argsort(gh, kind="stable")
    sizes = np.bincount(gh, minlength=2 * len(names))
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    ctrl = names.index("control")
    perts = [n for n in names if n != "control"]
    model = pred[1][pd.Index(pred[0]).get_indexer(perts)]
    perm = NP.null_permutation(len(perts), 0)
    # sanity: the pipeline's point estimate is vcjax's (float32 kernels vs float64)
    point = NP.evaluate_sums(*_group_half_sums(X, order, starts, sizes), ctrl, model, perm=perm)
    ref = table.set_index(["source", "metric", "perturbation"])["value"].sort_index()
    diff = 0.0
    for src, vals in point.items():
        for m in ("mse", "wmse", "pearson_delta", "r2w_delta"):
            want = ref.loc[(src, m)].reindex(perts).to_numpy(float)
            ok = np.isfinite(want) & np.isfinite(vals[m])
            if ok.any():
                diff = max(diff, float(np.max(np.abs(vals[m][ok] - want[ok]))))
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    for _ in range(n_reps):
        draw = np.concatenate([order[s + rng.integers(0, n, n)] for s, n in zip(starts, sizes)])
        NP.evaluate_sums(*_group_half_sums(X, None, starts, sizes, draw), ctrl, model, perm=perm)
    return (time.perf_counter() - t0) / n_reps, diff


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
    screen = PL.prepare(adata, key="condition", control="control", normalize=None)
    prediction = PL.align(pred, screen)
    table = PL.evaluate(screen, prediction)
    out["evaluate_point_s"] = time.perf_counter() - t
    (stratum,) = screen.strata
    score = PL.ScoreSpec()

    def samples(n_boot):
        boot = PL.BootSpec(n_boot=n_boot, chunk_size=args.chunk)
        return PL.stratum_samples(
            stratum, screen.spec, model=prediction.matrices[0], metrics=DEFAULT_METRICS,
            score=score, boot=boot,
        )  # fmt: skip

    # compile + one chunk (warm-up), then the timed run
    t = time.perf_counter()
    warm = samples(2)
    out["warmup_compile_s"] = time.perf_counter() - t
    out["chunk"] = warm["chunk"]
    out["pvalue"] = warm["pvalue"]
    t = time.perf_counter()
    res = samples(args.boot)
    out["bootstrap_s"] = time.perf_counter() - t
    out["bootstrap_per_resample_s"] = out["bootstrap_s"] / args.boot
    t = time.perf_counter()
    boot50 = PL.BootSpec(n_boot=min(args.boot, 50), chunk_size=args.chunk)
    PL.add_intervals(table, screen, prediction, score=score, boot=boot50)
    out["add_intervals_50_s"] = time.perf_counter() - t
    out["rss_after_bootstrap_mb"] = rss_mb()
    del res
    out["numpy_per_resample_s"], out["numpy_point_max_abs_diff"] = numpy_reference(
        adata, stratum, pred, table, n_reps=args.ref_reps
    )
    out["speedup_per_resample"] = out["numpy_per_resample_s"] / out["bootstrap_per_resample_s"]
    out["peak_rss_mb"] = rss_mb()
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
