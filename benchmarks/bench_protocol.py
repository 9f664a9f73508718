"""``vcjax.evaluate(..., protocol="cell-eval")`` against cell-eval 0.8.2's own full run.

For each size ``PxCELLSxG`` two sparse log-normalised ``.h5ad`` files are written with
``benchmarks/synth_h5ad.py`` (truth seed 0, prediction seed 1, both with ``non-targeting``
control cells, ≈ 5 %). Each tool runs in a **fresh subprocess** and reports its wall time
(reading the files included, imports excluded) and peak RSS:

* ``vcjax``: ``evaluate(truth, pred, key=..., control=..., protocol="cell-eval")`` — first
  call (JAX kernels compiled; the persistent compilation cache disabled) and a second call
  in the same process (``seconds_warm``);
* ``cell-eval``: ``MetricsEvaluator(pred, real, ...).compute(profile="full")`` without
  ``clustering_agreement`` (not reproduced by vcjax), one call (numba compiles on first use).

The per-perturbation values are compared (``max_abs_diff`` over every metric).

Usage::

    python benchmarks/bench_protocol.py --sizes 50x40x2000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

KEY, CTRL = "target_gene", "non-targeting"


def _child(tool: str, truth: str, pred: str, out: str) -> None:
    from _common import peak_rss_mb

    if tool == "vcjax":
        os.environ["VCJAX_COMPILATION_CACHE"] = "0"
        import vcjax

        t0 = time.perf_counter()
        table = vcjax.evaluate(truth, pred, key=KEY, control=CTRL, protocol="cell-eval")
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        vcjax.evaluate(truth, pred, key=KEY, control=CTRL, protocol="cell-eval")
        warm = time.perf_counter() - t0
        table.to_parquet(out)
        res = {"seconds": first, "seconds_warm": warm}
    else:
        from cell_eval import MetricsEvaluator

        t0 = time.perf_counter()
        with warnings.catch_warnings(), tempfile.TemporaryDirectory() as tmp:
            warnings.simplefilter("ignore")
            ev = MetricsEvaluator(
                adata_pred=pred, adata_real=truth, control_pert=CTRL, pert_col=KEY, outdir=tmp
            )
            got, _ = ev.compute(
                profile="full", skip_metrics=["clustering_agreement"], write_csv=False
            )
        res = {"seconds": time.perf_counter() - t0}
        got.to_pandas().to_parquet(out)
    res["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(res))


def _run(tool: str, truth: Path, pred: Path, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", tool, str(truth), str(pred), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"{tool} failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _compare(vc: Path, ce: Path) -> float:
    import pandas as pd

    ours = pd.read_parquet(vc)
    theirs = pd.read_parquet(ce).set_index("perturbation")
    worst = 0.0
    for m, rows in ours.groupby("metric"):
        if rows["perturbation"].iloc[0] == "(all)":
            want = theirs[m].to_numpy(np.float64)[:1]
            got = rows["value"].to_numpy(np.float64)
        else:
            rows = rows.set_index("perturbation").loc[theirs.index]
            got, want = rows["value"].to_numpy(np.float64), theirs[m].to_numpy(np.float64)
        d = np.abs(got - want)
        if not np.array_equal(np.isnan(got), np.isnan(want)):
            return float("inf")
        worst = max(worst, float(np.nanmax(d, initial=0.0)))
    return worst


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["50x40x2000"])
    ap.add_argument("--child", nargs=4, metavar=("TOOL", "TRUTH", "PRED", "OUT"))
    args = ap.parse_args(argv)
    if args.child:
        _child(*args.child)
        return
    from synth_h5ad import make_screen

    for size in args.sizes:
        P, C, G = map(int, size.split("x"))
        with tempfile.TemporaryDirectory() as tmp:
            t = Path(tmp)
            n = P * C
            make_screen(t / "truth.h5ad", n, G, P + 1, seed=0, control=CTRL, key=KEY)
            make_screen(t / "pred.h5ad", n, G, P + 1, seed=1, control=CTRL, key=KEY)
            vc = _run("vcjax", t / "truth.h5ad", t / "pred.h5ad", t / "vc.parquet")
            ce = _run("cell-eval", t / "truth.h5ad", t / "pred.h5ad", t / "ce.parquet")
            diff = _compare(t / "vc.parquet", t / "ce.parquet")
        print(
            f"{size}: vcjax {vc['seconds']:.1f} s (warm {vc['seconds_warm']:.2f} s, "
            f"{vc['peak_rss_mb']:.0f} MiB), cell-eval {ce['seconds']:.1f} s "
            f"({ce['peak_rss_mb']:.0f} MiB); ratio {ce['seconds'] / vc['seconds']:.1f}x "
            f"(warm {ce['seconds'] / vc['seconds_warm']:.0f}x); max |diff| {diff:.2e}"
        )


if __name__ == "__main__":
    main()
