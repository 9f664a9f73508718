"""Benchmark (issue 3): ``vcjax.score`` with every core metric vs a vectorised NumPy reference.

For each ``P`` (perturbations) × ``G`` (genes) it times, in the same run,

* ``vcjax.score(pred, truth, reference=ref, weights=w)`` — all 8 metrics that need no mask
  (mse, wmse, mae, pearson_delta, pearson_delta_topk (k=20), r2_delta, r2w_delta,
  cosine_delta), float32, default chunking; inputs are ordinary NumPy arrays;
* a NumPy float64 reference of the same metrics, vectorised over P (``np.einsum``,
  ``np.argpartition``; processed in blocks of 256 rows, which is faster than whole-array
  NumPy). Above ``--ref-max-rows`` rows it is timed on that many rows and extrapolated
  linearly (its cost is linear in P); the table marks such rows with ``*``.

It reports the speed-up, the effective bandwidth of ``score`` (bytes of pred + truth +
weights / seconds) against the machine's read bandwidth measured in the same run (a large
jitted ``jnp.sum`` and NumPy sum / copy), and the peak RSS of a fresh process per
configuration (inputs included). Each configuration runs in its own subprocess.

Usage::

    python benchmarks/bench_kernels.py            # P ∈ {100, 1000, 10000} × G ∈ {2000, 8192}
    python benchmarks/bench_kernels.py --quick    # small grid
    python benchmarks/bench_kernels.py --write-results   # also update RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import _common  # noqa: E402

K = 20
BLOCK = 256


# ----------------------------------------------------------------------- NumPy reference


def _pearson_np(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Row-wise Pearson r of float64 arrays, NaN for constant rows, clipped to [-1, 1]."""
    dx = x - x.mean(axis=1, keepdims=True)
    dy = y - y.mean(axis=1, keepdims=True)
    sxx = np.einsum("ij,ij->i", dx, dx)
    syy = np.einsum("ij,ij->i", dy, dy)
    sxy = np.einsum("ij,ij->i", dx, dy)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.clip(sxy / np.sqrt(sxx * syy), -1, 1)
    r[(sxx == 0) | (syy == 0)] = np.nan
    return r


def _r2_np(y: np.ndarray, yhat: np.ndarray, w: np.ndarray | None) -> np.ndarray:
    """Row-wise sklearn ``r2_score(y, yhat, sample_weight=w)`` (force_finite) in float64."""
    if w is None:
        sw = np.full(y.shape[0], float(y.shape[1]))
        mean = y.mean(axis=1, keepdims=True)
        d, c = y - yhat, y - mean
        num = np.einsum("ij,ij->i", d, d)
        den = np.einsum("ij,ij->i", c, c)
    else:
        sw = w.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = (np.einsum("ij,ij->i", w, y) / sw)[:, None]
        d, c = y - yhat, y - mean
        num = np.einsum("ij,ij,ij->i", w, d, d)
        den = np.einsum("ij,ij,ij->i", w, c, c)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = 1 - num / den
    out[den == 0] = np.where(num[den == 0] == 0, 1.0, 0.0)
    out[sw == 0] = np.nan
    return out


def numpy_scores(pred, truth, ref, w, k: int = K) -> dict[str, np.ndarray]:
    """The 8 metrics of ``score(..., weights=w)`` in float64 NumPy, vectorised over rows.

    Top-k uses ``np.argpartition`` (ties in the weights are not broken towards the lower
    index as vcjax does; irrelevant for continuous random weights).
    """
    outs: dict[str, list[np.ndarray]] = {}
    r = np.asarray(ref, np.float64)
    for s in range(0, pred.shape[0], BLOCK):
        p = pred[s : s + BLOCK].astype(np.float64)
        t = truth[s : s + BLOCK].astype(np.float64)
        ww = w[s : s + BLOCK].astype(np.float64)
        e = p - t
        e2 = e * e
        sw = ww.sum(axis=1)
        x, y = p - r, t - r
        nx = np.einsum("ij,ij->i", x, x)
        ny = np.einsum("ij,ij->i", y, y)
        with np.errstate(invalid="ignore", divide="ignore"):
            wmse = np.einsum("ij,ij->i", ww, e2) / sw
            cos = np.clip(np.einsum("ij,ij->i", x, y) / np.sqrt(nx * ny), -1, 1)
        idx = np.argpartition(-ww, k - 1, axis=1)[:, :k]
        res = {
            "mse": e2.mean(axis=1),
            "wmse": wmse,
            "mae": np.abs(e).mean(axis=1),
            "pearson_delta": _pearson_np(x, y),
            "pearson_delta_topk": _pearson_np(
                np.take_along_axis(x, idx, 1), np.take_along_axis(y, idx, 1)
            ),
            "r2_delta": _r2_np(y, x, None),
            "r2w_delta": _r2_np(y, x, ww),
            "cosine_delta": cos,
        }
        for name, v in res.items():
            outs.setdefault(name, []).append(v)
    return {name: np.concatenate(v) for name, v in outs.items()}


# ----------------------------------------------------------------------- one configuration


def make_inputs(p: int, g: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    truth = rng.normal(size=(p, g)).astype(np.float32)
    pred = truth + rng.normal(scale=0.7, size=(p, g)).astype(np.float32)
    ref = rng.normal(scale=0.2, size=g).astype(np.float32)
    w = (rng.random((p, g), dtype=np.float32) ** 4).astype(np.float32)
    return pred, truth, ref, w


def run_one(p: int, g: int, *, repeat: int, ref_max_rows: int) -> dict[str, object]:
    """Time one (P, G) in this process; returns a JSON-able dict."""
    import jax

    import vcjax

    pred, truth, ref, w = make_inputs(p, g)
    run = lambda: vcjax.score(pred, truth, reference=ref, weights=w)  # noqa: E731
    t_jax = _common.timeit(run, repeat=repeat, warmup=1, min_time=0.5)
    got = {k: np.asarray(v, np.float64) for k, v in run().items()}
    # the same call on jax.Arrays already in device memory (made once, outside the timing)
    jp, jt, jw = (jax.device_put(x) for x in (pred, truth, w))
    run_dev = lambda: vcjax.score(jp, jt, reference=ref, weights=jw)  # noqa: E731
    t_dev = _common.timeit(run_dev, repeat=repeat, warmup=1, min_time=0.5)
    got_dev = {k: np.asarray(v, np.float64) for k, v in run_dev().items()}
    dev_diff = max(float(np.nanmax(np.abs(got_dev[k] - got[k]), initial=0.0)) for k in got)
    if not dev_diff <= 1e-6:  # the same kernel on the same values
        raise RuntimeError(f"jax.Array inputs scored {dev_diff:g} away from NumPy inputs")
    core = [m for m in got if m != "pearson_delta_topk"]  # the same call without top-k
    run_core = lambda: vcjax.score(pred, truth, reference=ref, weights=w, metrics=core)  # noqa: E731
    t_core = _common.timeit(run_core, repeat=repeat, warmup=1, min_time=0.5)
    rss_after_jax = _common.peak_rss_mb()

    n_ref = min(p, ref_max_rows)
    ref_run = lambda: numpy_scores(pred[:n_ref], truth[:n_ref], ref, w[:n_ref])  # noqa: E731
    t_np = _common.timeit(ref_run, repeat=max(1, min(repeat, 3)), warmup=0)
    want = ref_run()
    scale = p / n_ref
    err = max(
        float(np.nanmax(np.abs(got[k][:n_ref] - want[k]))) if np.isfinite(want[k]).any() else 0.0
        for k in want
    )
    nbytes = pred.nbytes + truth.nbytes + w.nbytes
    return {
        "P": p,
        "G": g,
        "metrics": len(got),
        "vcjax_s": t_jax["median"],
        "vcjax_min_s": t_jax["min"],
        "numpy_s": t_np["median"] * scale,
        "numpy_extrapolated": n_ref < p,
        "numpy_rows_timed": n_ref,
        "speedup": t_np["median"] * scale / t_jax["median"],
        "vcjax_gbs": nbytes / t_jax["median"] / 1e9,
        "vcjax_gbs_best": nbytes / t_jax["min"] / 1e9,
        "vcjax_dev_s": t_dev["median"],
        "speedup_dev": t_np["median"] * scale / t_dev["median"],
        "vcjax_dev_gbs": nbytes / t_dev["median"] / 1e9,
        "max_abs_diff_dev_vs_numpy_inputs": dev_diff,
        "vcjax_core_s": t_core["median"],
        "vcjax_core_gbs": nbytes / t_core["median"] / 1e9,
        "input_mb": nbytes / 2**20,
        "peak_rss_mb_vcjax": rss_after_jax,
        "peak_rss_mb": _common.peak_rss_mb(),
        "max_abs_diff_vs_numpy": err,
        "jax_devices": len(jax.devices()),
    }


def _child(args) -> None:
    n_dev = args.cpu_devices[0]
    if n_dev > 1:
        import jax

        jax.config.update("jax_num_cpu_devices", n_dev)  # before JAX starts
    out = run_one(args.P, args.G, repeat=args.repeat, ref_max_rows=args.ref_max_rows)
    print("RESULT " + json.dumps(out))


def _spawn(p: int, g: int, args, devices: int = 1) -> dict[str, object]:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        "--P",
        str(p),
        "--G",
        str(g),
        "--repeat",
        str(args.repeat),
        "--ref-max-rows",
        str(args.ref_max_rows),
        "--cpu-devices",
        str(devices),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False, env=os.environ)
    for line in res.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(f"P={p} G={g} failed:\n{res.stdout}\n{res.stderr}")


COLUMNS = [
    ("P", "P"),
    ("G", "G"),
    ("jax_devices", "CPU devices"),
    ("vcjax_ms", "vcjax ms (median)"),
    ("numpy_ms", "NumPy f64 ms"),
    ("speedup", "speed-up ×"),
    ("vcjax_gbs", "vcjax GB/s"),
    ("pct_jax_bw", "% of jnp.sum BW"),
    ("vcjax_gbs_best", "vcjax GB/s (best run)"),
    ("vcjax_dev_ms", "jax.Array inputs: ms"),
    ("speedup_dev", "jax.Array: speed-up ×"),
    ("pct_dev_bw", "jax.Array: % of BW"),
    ("vcjax_core_ms", "7 metrics, no top-k: ms"),
    ("pct_core_bw", "7 metrics: % of BW"),
    ("peak_rss_mb", "peak RSS MiB"),
    ("max_abs_diff_vs_numpy", "max |Δ| vs NumPy"),
]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small grid: P ∈ {100, 1000}, G = 2000")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--ref-max-rows", type=int, default=2000)
    ap.add_argument("--json", default=str(HERE / "bench_kernels.json"))
    ap.add_argument("--write-results", action="store_true", help="update RESULTS.md")
    ap.add_argument(
        "--cpu-devices",
        type=int,
        nargs="+",
        default=[1],
        help="JAX CPU device counts to run each size with (jax_num_cpu_devices), e.g. 1 2",
    )
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--P", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--G", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        _child(args)
        return

    info = _common.machine_info()
    bw = _common.measure_bandwidth()
    grid = [(p, g) for g in (2000, 8192) for p in (100, 1000, 10000)]
    if args.quick:
        grid = [(100, 2000), (1000, 2000)]
    rows = []
    for p, g, devices in [(p, g, d) for p, g in grid for d in args.cpu_devices]:
        r = _spawn(p, g, args, devices)
        r["vcjax_ms"] = r["vcjax_s"] * 1e3
        r["vcjax_dev_ms"] = r["vcjax_dev_s"] * 1e3
        r["pct_dev_bw"] = 100 * r["vcjax_dev_gbs"] / bw["jax_sum_gbs"]
        r["numpy_ms"] = r["numpy_s"] * 1e3
        r["pct_jax_bw"] = 100 * r["vcjax_gbs"] / bw["jax_sum_gbs"]
        r["vcjax_core_ms"] = r["vcjax_core_s"] * 1e3
        r["pct_core_bw"] = 100 * r["vcjax_core_gbs"] / bw["jax_sum_gbs"]
        if r["numpy_extrapolated"]:
            r["P"] = f"{p:,}*"
        rows.append(r)
        print(
            f"  done P={p} G={g} devices={devices}: {r['vcjax_ms']:.1f} ms, "
            f"×{r['speedup']:.1f} (jax.Array inputs ×{r['speedup_dev']:.1f})",
            flush=True,
        )

    table = _common.markdown_table(rows, COLUMNS)
    note = (
        f"Machine: {_common.machine_note(info)}. Measured read bandwidth in the same run: "
        f"jitted jnp.sum {bw['jax_sum_gbs']:.1f} GB/s, NumPy sum {bw['numpy_sum_gbs']:.1f} GB/s, "
        f"NumPy copy {bw['numpy_copy_gbs']:.1f} GB/s (read+write)."
    )
    legend = (
        "`score` computes 8 metrics (mse, wmse, mae, pearson_delta, pearson_delta_topk k=20, "
        "r2_delta, r2w_delta, cosine_delta) in float32 from NumPy float32 inputs (pred, truth, "
        "weights per row; reference shared); the NumPy reference computes the same in float64, "
        "vectorised over rows. GB/s = bytes of pred+truth+weights / median time. Peak RSS: a "
        'fresh process per row, inputs included. "7 metrics": the same call without '
        "pearson_delta_topk (its exact top-k selection costs ~10 µs per row on XLA:CPU). "
        '"jax.Array inputs": the same call on arrays already in device memory. "CPU devices": '
        "`jax_num_cpu_devices` of the process (chunks dealt to the devices in turn). "
        f"`*`: NumPy timed on {args.ref_max_rows:,} rows and extrapolated linearly."
    )
    print()
    print(table)
    print()
    print(note)
    _common.write_json(
        args.json, {"machine": info, "bandwidth": bw, "rows": rows, "quick": args.quick}
    )
    print(f"JSON: {args.json}")
    if args.write_results:
        body = "\n\n".join(
            [
                "Command: `python benchmarks/bench_kernels.py"
                + (" --quick" if args.quick else "")
                + (
                    " --cpu-devices " + " ".join(map(str, args.cpu_devices))
                    if args.cpu_devices != [1]
                    else ""
                )
                + " --write-results`",
                note,
                table,
                legend,
            ]
        )
        _common.update_results_section("## Kernels (issue 3)", body)
        print(f"updated {_common.RESULTS_MD}")


if __name__ == "__main__":
    main()
