"""The default path against the floor of reading its inputs (issue 20).

``vcjax.evaluate(truth_path, pred_path, key=..., control=...)`` (default metrics, predicted
cells, first call in a fresh process, compilation cache off) is timed against a raw h5py
read of the two files' CSR arrays (``X/data``, ``X/indices``, ``X/indptr``), each in its
own **fresh subprocess**, interleaved repeat by repeat so that both see the same machine
state; every child reports its own wall time (imports excluded, reported apart) and its
peak RSS (``VmHWM``). cell-eval 0.8.2's full run (``MetricsEvaluator(...).compute(
profile="full")``, its own venv) runs once on the same files for the ratio of issue 20's
"≥ 100×" target. ``--baseline-src DIR`` adds vcjax run from another source tree (e.g. a
``git archive`` of main) as a before/after column of the same run.

The files are written by ``benchmarks/synth_h5ad.py`` (sparse CSR float32, log-normalised,
``target_gene``, ``non-targeting`` controls ≈ 5 %): truth seed 0, predicted cells seed 1.
They are read from the page cache by every child after the first (no cache dropping: the
machine is shared), so the raw read is a memory-speed floor.

Usage::

    python benchmarks/bench_read.py --size 300x50x8000 --repeats 5 --cell-eval
    python benchmarks/bench_read.py --size 100x30x2000 --repeats 3      # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
KEY, CONTROL = "target_gene", "non-targeting"
CELL_EVAL_PY = "/work/peervenv/ce/bin/python"
JSON = HERE / "bench_read.json"


def vm_hwm_mb() -> float:
    """This process's peak RSS in MiB (``VmHWM``; not ``ru_maxrss``, which a child inherits
    from its parent across ``fork``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# ------------------------------------------------------------------------------ children
def child(tool: str, truth: str, pred: str, outdir: str) -> dict:
    """Run ``tool`` once in this fresh process; its seconds, import seconds and peak RSS."""
    t_imp = time.perf_counter()
    out: dict = {}
    if tool == "raw":
        import h5py

        out["import_s"] = time.perf_counter() - t_imp
        t0, c0 = time.perf_counter(), time.process_time()
        nnz = 0
        for path in (truth, pred):
            with h5py.File(path, "r") as f:
                g = f["X"]
                arrays = [g[k][...] for k in ("data", "indices", "indptr")]
                nnz += arrays[0].size
        out["seconds"] = time.perf_counter() - t0
        out["cpu_s"] = time.process_time() - c0
        out["nnz"] = int(nnz)
    elif tool == "vcjax":
        import warnings

        import vcjax

        out["import_s"] = time.perf_counter() - t_imp
        t0, c0 = time.perf_counter(), time.process_time()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            table = vcjax.evaluate(truth, pred, key=KEY, control=CONTROL)
        out["seconds"] = time.perf_counter() - t0
        out["cpu_s"] = time.process_time() - c0  # all threads (XLA compiles in one)
        out["rows"] = len(table)
        table[["perturbation", "metric", "source", "value"]].to_csv(
            Path(outdir) / "values.csv", index=False
        )
    elif tool == "cell-eval":
        import warnings

        warnings.simplefilter("ignore")
        import _common
        import anndata  # noqa: F401  (imports timed apart, as import_s)
        import cell_eval  # noqa: F401

        out["import_s"] = time.perf_counter() - t_imp
        t0, c0 = time.perf_counter(), time.process_time()
        res, _ = _common.cell_eval_full_run(truth, pred, outdir, key=KEY, control=CONTROL)
        out["seconds"] = time.perf_counter() - t0
        out["cpu_s"] = time.process_time() - c0
        out["rows"] = int(res.height)
    else:
        raise SystemExit(f"unknown tool {tool}")
    out["peak_rss_mb"] = vm_hwm_mb()
    return out


def same_run_ratios(num: list[dict], den: list[dict], field: str) -> list[float]:
    """``num[i][field] / den[i][field]`` repeat by repeat, where both children succeeded."""
    return [
        a[field] / b[field]
        for a, b in zip(num, den, strict=True)
        if a.get("status") == "ok" and b.get("status") == "ok"
    ]


def run_child(tool, truth, pred, outdir, *, python=sys.executable, src=None, timeout=900):
    """``tool`` in a fresh subprocess (``src``: the vcjax source tree on its path)."""
    os.makedirs(outdir, exist_ok=True)
    cmd = [python, str(Path(__file__).resolve()), "--child", tool, str(truth), str(pred), outdir]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(src or ROOT)
    env["VCJAX_COMPILATION_CACHE"] = "0"  # the first call compiles every kernel
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return dict(status=f"not run: over {timeout} s", loadavg_before=load)
    if res.returncode != 0:
        tail = (res.stderr.strip().splitlines() or ["?"])[-1][:300]
        return dict(status=f"failed (rc {res.returncode}): {tail}", loadavg_before=load)
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out.update(status="ok", process_s=time.perf_counter() - t0, loadavg_before=round(load, 2))
    return out


def same_values(dir_a: Path, dir_b: Path) -> dict:
    """How two vcjax tables (``values.csv``) compare: rows, max |difference|, NaN mismatch."""
    import numpy as np
    import pandas as pd

    a = pd.read_csv(dir_a / "values.csv", keep_default_na=False, na_values=[""])
    b = pd.read_csv(dir_b / "values.csv", keep_default_na=False, na_values=[""])
    m = a.merge(b, on=["perturbation", "metric", "source"], suffixes=("_a", "_b"))
    va, vb = m["value_a"].to_numpy(float), m["value_b"].to_numpy(float)
    both = np.isfinite(va) & np.isfinite(vb)
    return dict(
        rows=(len(a), len(b), len(m)),
        nan_mismatch=int((np.isnan(va) != np.isnan(vb)).sum()),
        max_abs_diff=float(np.abs(va - vb)[both].max()) if both.any() else float("nan"),
    )


# ------------------------------------------------------------------------------ driver
def med(rows: list[dict], field: str) -> float:
    vals = [r[field] for r in rows if r.get("status") == "ok" and field in r]
    return statistics.median(vals) if vals else float("nan")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="300x50x8000", help="PxCELLSxG")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cell-eval", action="store_true", help="run cell-eval 0.8.2 once")
    ap.add_argument("--baseline-src", default=None, help="a vcjax source tree to compare")
    ap.add_argument("--files", nargs=2, metavar=("TRUTH", "PRED"), help="existing files")
    ap.add_argument("--tmp", default=None, help="folder for generated files")
    ap.add_argument("--json", default=str(JSON))
    ap.add_argument("--child", nargs=4, metavar=("TOOL", "TRUTH", "PRED", "OUTDIR"))
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child)))
        return

    sys.path.insert(0, str(HERE))
    import _common
    from synth_h5ad import make_screen

    info = _common.machine_info()
    print(_common.machine_note(info), flush=True)
    P, cells, G = map(int, args.size.split("x"))
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        if args.files:
            truth, pred = args.files
        else:
            n_cells = round(P * cells / 0.95)  # synth_h5ad puts ~5 % of cells in the control
            truth = make_screen(Path(tmp) / "truth.h5ad", n_cells, G, P + 1, seed=0)
            pred = make_screen(Path(tmp) / "pred.h5ad", n_cells, G, P + 1, seed=1)
        mb = sum(Path(p).stat().st_size for p in (truth, pred)) / 2**20
        print(f"{args.size}: two files, {mb:.0f} MiB together", flush=True)
        tools = [("raw", None), ("vcjax", None)]
        if args.baseline_src:
            tools.append(("vcjax", args.baseline_src))
        runs: dict[str, list[dict]] = {}
        for rep in range(args.repeats):
            for tool, src in tools:
                name = tool if src is None else "vcjax-baseline"
                out = str(Path(tmp) / f"out_{name}")
                r = run_child(tool, truth, pred, out, src=src)
                runs.setdefault(name, []).append(r)
                print(f"  repeat {rep + 1} {name}: {json.dumps(r)}", flush=True)
        summary: dict = dict(size=args.size, file_mib=round(mb, 1), repeats=args.repeats)
        for name, rows in runs.items():
            summary[name] = dict(
                seconds_median=med(rows, "seconds"),
                seconds_all=[r.get("seconds") for r in rows],
                cpu_s_median=med(rows, "cpu_s"),
                peak_rss_mb_median=med(rows, "peak_rss_mb"),
                import_s_median=med(rows, "import_s"),
                loadavg_before=[r.get("loadavg_before") for r in rows],
            )
        # same-run ratios: repeat by repeat, then the median
        ratios = same_run_ratios(runs["vcjax"], runs["raw"], "seconds")
        summary["vcjax_over_raw_median"] = statistics.median(ratios) if ratios else None
        summary["vcjax_over_raw_all"] = ratios
        cpu = same_run_ratios(runs["vcjax"], runs["raw"], "cpu_s")
        summary["vcjax_over_raw_cpu_median"] = statistics.median(cpu) if cpu else None
        if "vcjax-baseline" in runs:
            before = same_run_ratios(runs["vcjax-baseline"], runs["vcjax"], "seconds")
            summary["baseline_over_vcjax_median"] = statistics.median(before) if before else None
        if "vcjax-baseline" in runs:
            summary["values_vs_baseline"] = same_values(
                Path(tmp) / "out_vcjax", Path(tmp) / "out_vcjax-baseline"
            )
        if args.cell_eval:
            r = run_child("cell-eval", truth, pred, str(Path(tmp) / "out_ce"), python=CELL_EVAL_PY,
                          src=HERE, timeout=1800)  # fmt: skip
            print(f"  cell-eval: {json.dumps(r)}", flush=True)
            summary["cell-eval"] = r
            if r.get("status") == "ok":
                summary["cell_eval_over_vcjax"] = r["seconds"] / summary["vcjax"]["seconds_median"]
    summary["machine"] = info
    Path(args.json).write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k != "machine"}, indent=1))


if __name__ == "__main__":
    main()
