"""vcjax vs a NumPy float64 reference vs cell-eval vs scanpy on the same synthetic screens.

Issue 9. For each size ``PxCELLSxG`` (perturbations, cells per perturbation, genes) two files
are written with ``benchmarks/synth_h5ad.py`` (sparse CSR, log-normalised, ``target_gene``
column, ``non-targeting`` controls ≈ 5 % of cells): the truth (seed 0) and the model's
predicted cells (seed 1, a seeded noisy copy with the same perturbations). Every tool then
runs in a **fresh subprocess** (``--child``), which reports its own wall time (file reading
included, imports excluded) and peak RSS (``VmHWM``):

* ``vcjax``: ``vcjax.evaluate(truth, pred)``: group statistics, DEG t-tests and weights,
  all 11 default metrics for the model and the 7 baselines, calibration. ``evaluate`` uses
  JAX's persistent compilation cache (:func:`vcjax.engine.enable_compilation_cache`), so
  vcjax runs in **two** fresh processes sharing a cache folder that starts empty for each
  size: the first gives ``seconds`` (first call, *cold* cache: every kernel compiled and
  written to the cache) and ``seconds_warm`` (a second call in the same process, nothing
  compiled); the second process gives ``seconds_cached`` (first call in a new process with
  a *warm* cache: kernels traced and loaded from disk, not compiled). A user's very first
  run is the cold-cache figure; later runs are the warm-cache one;
* ``numpy``: the same pipeline written here in vectorised NumPy float64 (sparse group sums,
  ``t-test_overestim_var`` vs rest, BH, DEG weights and set, baselines, metrics, gates,
  calibration); its values are compared with vcjax's table (``max_abs_diff``);
* ``cell-eval``: ``cell_eval.MetricsEvaluator(adata_pred, adata_real, pert_col='target_gene',
  control_pert='non-targeting').compute(profile='full')``: its full run;
* ``vcjax-all``: ``vcjax.evaluate(truth, pred, metrics="all")``: every metric the inputs
  allow, the peers' included (cell-eval's DE on both sides, PDS, distances, ...); times as
  ``vcjax`` (cold cache, warm cache in a second process, warm call);
* ``cell-eval2``: cell-eval2's full CPU run, its CLI in-process:
  ``cell-eval2 run -ap pred.h5ad -ar real.h5ad --pert-col target_gene --control
  non-targeting --input-type lognorm --no-target-genes --set device=cpu`` (the synthetic
  labels name no gene, hence ``--no-target-genes``; its default DE backend). It runs in its
  own interpreter, ``--celleval2-python`` (default ``$VCJAX_CELLEVAL2_PYTHON``, else this
  one when ``cell_eval2`` imports here); its ratio is to ``vcjax-all``;
* ``scanpy``: ``sc.tl.rank_genes_groups(method='t-test_overestim_var', reference='rest')``
  on the perturbed cells: the DE step alone;
* ``vcjax-boot``: ``evaluate(..., n_boot=B)``; the cost per resample is
  ``(t_warm(n_boot=B) − t_warm(n_boot=0)) / B`` (compilation cache disabled).

Usage::

    python benchmarks/bench_peers.py --quick                  # a few minutes on 2 cores
    python benchmarks/bench_peers.py --sizes 300x50x8000 --tools vcjax-all cell-eval2 \
        --celleval2-python /work/peervenv/ce2/bin/python
    python benchmarks/bench_peers.py --sizes 20x100x2000 2000x100x8192 --tools vcjax numpy
    python benchmarks/plot_results.py                          # results_time_vs_p.png

Results go to ``benchmarks/results_peers.json`` (merged with earlier runs by size and tool).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
KEY, CONTROL = "target_gene", "non-targeting"
TOOLS = ("vcjax", "numpy", "scanpy", "cell-eval", "vcjax-boot", "vcjax-all", "cell-eval2")
#: the vcjax tool each peer's ratio is taken to (default ``vcjax``)
RATIO_TO = {"cell-eval2": "vcjax-all"}
#: tools with vcjax's three times (cold cache, warm cache in a second process, warm call)
VCJAX_TIMED = ("vcjax", "vcjax-all")
QUICK = ("20x100x2000", "100x100x2000")
FULL = ("20x100x2000", "100x100x2000", "500x100x2000", "2000x100x8192")
JSON = HERE / "results_peers.json"


# ----------------------------------------------------------------------------- reference
def numpy_reference(
    truth_path: str, pred_path: str, *, k: int = 20, seed: int = 0, gate: bool = True
):
    """The evaluate() pipeline in NumPy float64; returns ``(perts, {source: {metric: (P,)}})``.

    Independent of vcjax except for the split definition (``data.split_halves``, the DbD
    seeded shuffle) and the null derangement's seed convention, which define the inputs.
    Sparse indicator products give the group-half sums; ``_numpy_pipeline.evaluate_sums``
    does the rest. ``gate=False`` skips DbD's NaN gates (as ``evaluate(..., gate=False)``).
    """
    import anndata as ad
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import _numpy_pipeline as NP

    from vcjax.data import split_halves

    def sums(path, split=None):
        a = ad.read_h5ad(path)
        labels = a.obs[KEY].astype(str).to_numpy()
        codes, names = pd.factorize(labels)
        n = labels.size
        X = sp.csr_matrix(a.X, dtype=np.float64)
        row = codes if split is None else codes * 2 + (split(labels) - 1)
        ind = sp.csr_matrix((np.ones(n), (row, np.arange(n))), shape=(row.max() + 1, n))
        s = np.asarray((ind @ X).todense())
        X.data **= 2
        q = np.asarray((ind @ X).todense())
        cnt = np.bincount(row, minlength=ind.shape[0]).astype(np.float64)
        return list(names), cnt, s, q

    names, cnt, s, q = sums(truth_path, split=lambda lab: split_halves(lab, seed=42))
    C = len(names)
    cnt, s, q = cnt.reshape(C, 2), s.reshape(C, 2, -1), q.reshape(C, 2, -1)
    ci = names.index(CONTROL)
    # perturbations in order of first appearance (the null derangement's row order)
    perts = [names[i] for i in range(C) if i != ci]
    pnames, pcnt, ps_, _ = sums(pred_path)
    pmean = ps_ / pcnt[:, None]
    model = pmean[[pnames.index(x) for x in perts]]
    return perts, NP.evaluate_sums(cnt, s, q, ci, model, k=k, seed=seed, gate=gate)


def _tidy(perts, values):
    import pandas as pd

    return pd.concat(
        [
            pd.DataFrame({"perturbation": perts, "metric": m, "source": s, "value": v})
            for s, d in values.items()
            for m, v in d.items()
        ],
        ignore_index=True,
    )


# ----------------------------------------------------------------------------- children
def child(tool: str, truth: str, pred: str, outdir: str, n_boot: int) -> dict:
    """Run one tool in this (fresh) process; return its timings and peak RSS."""
    os.makedirs(outdir, exist_ok=True)
    out: dict = {}
    t_imp = time.perf_counter()
    if tool in ("vcjax", "vcjax-cached", "vcjax-boot", "vcjax-all", "vcjax-all-cached"):
        import anndata as ad

        import vcjax

        out["import_s"] = time.perf_counter() - t_imp
        kw = dict(key=KEY, control=CONTROL, normalize=None, pred_normalize=None)
        if tool.startswith("vcjax-all"):
            kw["metrics"] = "all"

        def run(**extra):
            t0 = time.perf_counter()
            table = vcjax.evaluate(truth, ad.read_h5ad(pred), **kw, **extra)
            return table, time.perf_counter() - t0

        if tool != "vcjax-boot":
            table, out["seconds"] = run()
            _, out["seconds_warm"] = run()
            table[["perturbation", "metric", "source", "value"]].to_csv(
                Path(outdir) / "values.csv", index=False
            )
            out["rows"] = len(table)
        else:
            _, out["seconds_boot_first"] = run(n_boot=n_boot)
            _, out["seconds_boot_warm"] = run(n_boot=n_boot)
            _, plain = run()
            _, out["seconds_warm"] = run()
            out["n_boot"] = n_boot
            out["seconds"] = out["seconds_boot_first"]
            out["per_resample_s"] = (out["seconds_boot_warm"] - out["seconds_warm"]) / n_boot
    elif tool == "numpy":
        import anndata  # noqa: F401
        import scipy.sparse  # noqa: F401

        out["import_s"] = time.perf_counter() - t_imp
        t0 = time.perf_counter()
        perts, values = numpy_reference(truth, pred)
        out["seconds"] = time.perf_counter() - t0
        _tidy(perts, values).to_csv(Path(outdir) / "values.csv", index=False)
    elif tool == "cell-eval":
        import warnings

        warnings.simplefilter("ignore")
        import _common
        import anndata  # noqa: F401  (imports timed apart, as import_s)
        import cell_eval  # noqa: F401

        out["import_s"] = time.perf_counter() - t_imp
        t0 = time.perf_counter()
        res, _ = _common.cell_eval_full_run(truth, pred, outdir, key=KEY, control=CONTROL)
        out["seconds"] = time.perf_counter() - t0
        out["rows"] = res.height
    elif tool == "cell-eval2":
        import contextlib
        import io
        import warnings

        warnings.simplefilter("ignore")
        from cell_eval2.cli import main as ce2_main

        out["import_s"] = time.perf_counter() - t_imp
        argv = ["run", "-ap", pred, "-ar", truth, "--pert-col", KEY, "--control", CONTROL,
                "--input-type", "lognorm", "--no-target-genes", "--set", "device=cpu",
                "-o", outdir]  # fmt: skip
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):  # keep stdout for the JSON line
            ce2_main(argv)
        out["seconds"] = time.perf_counter() - t0
        with open(Path(outdir) / "results.csv") as fh:
            out["rows"] = sum(1 for _ in fh) - 1
    elif tool == "scanpy":
        import anndata as ad
        import scanpy as sc

        out["import_s"] = time.perf_counter() - t_imp
        t0 = time.perf_counter()
        a = ad.read_h5ad(truth)
        a = a[a.obs[KEY] != CONTROL].copy()
        sc.tl.rank_genes_groups(a, KEY, method="t-test_overestim_var", reference="rest")
        out["seconds"] = time.perf_counter() - t0
    else:
        raise SystemExit(f"unknown tool {tool}")
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def peak_rss_mb() -> float:
    """This process's own peak RSS in MiB: ``VmHWM`` of its address space.

    Not ``ru_maxrss``: Linux carries the parent's RSS at ``fork`` over ``exec`` into it, so a
    child of a large driver would report the driver's size.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:  # pragma: no cover
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_tool(
    tool, truth, pred, outdir, *, timeout, n_boot, cache: str = "0", python: str | None = None
) -> dict:
    """Run ``tool`` in a fresh subprocess of ``python`` (default this interpreter);
    ``cache``: ``VCJAX_COMPILATION_CACHE`` for it."""
    cmd = [python or sys.executable, __file__, "--child", tool, str(truth), str(pred), str(outdir)]
    cmd += ["--n-boot", str(n_boot)]
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # vcjax would defer to a user's cache
    env["VCJAX_COMPILATION_CACHE"] = cache
    t0 = time.perf_counter()
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return dict(status=f"not run: did not finish within {timeout:.0f} s")
    if res.returncode != 0:
        tail = (res.stderr.strip().splitlines() or ["?"])[-1][:200]
        return dict(status=f"failed (rc {res.returncode}): {tail}")
    try:
        out = json.loads(res.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return dict(status=f"failed: no result line ({res.stdout[-200:]!r})")
    out["process_s"] = time.perf_counter() - t0
    return dict(status="ok", **out)


def compare(outdir_v: Path, outdir_n: Path) -> dict:
    """max |vcjax − NumPy| over all (perturbation, metric, source) values; NaN agreement."""
    import numpy as np
    import pandas as pd

    a = pd.read_csv(outdir_v / "values.csv", keep_default_na=False, na_values=[""])
    b = pd.read_csv(outdir_n / "values.csv", keep_default_na=False, na_values=[""])
    m = a.merge(b, on=["perturbation", "metric", "source"], suffixes=("_v", "_n"))
    va, vb = m["value_v"].to_numpy(float), m["value_n"].to_numpy(float)
    both = np.isfinite(va) & np.isfinite(vb)
    d = np.abs(va - vb)[both]
    per_metric = {
        k: float(np.abs(g["value_v"] - g["value_n"]).max()) for k, g in m[both].groupby("metric")
    }
    return dict(
        compared=int(len(m)),
        nan_mismatch=int((np.isnan(va) != np.isnan(vb)).sum()),
        max_abs_diff=float(d.max()) if d.size else float("nan"),
        max_abs_diff_by_metric=per_metric,
    )


# ----------------------------------------------------------------------------- driver
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="*", default=None, help="PxCELLSxG, e.g. 20x100x2000")
    ap.add_argument("--quick", action="store_true", help=f"sizes {' '.join(QUICK)}")
    ap.add_argument("--tools", nargs="*", default=list(TOOLS), choices=TOOLS)
    ap.add_argument("--timeout", type=float, default=600, help="seconds per tool and size")
    ap.add_argument("--n-boot", type=int, default=8)
    ap.add_argument(
        "--boot-max-pg",
        type=float,
        default=2.1e6,
        help="skip vcjax-boot above P·G (the bootstrap holds sources × resamples × P × G)",
    )
    ap.add_argument(
        "--celleval2-python",
        default=os.environ.get("VCJAX_CELLEVAL2_PYTHON") or None,
        help="interpreter with cell-eval2 (default $VCJAX_CELLEVAL2_PYTHON, else this one "
        "when cell_eval2 imports here)",
    )
    ap.add_argument("--json", default=str(JSON))
    ap.add_argument("--tmp", default=None, help="folder for the generated files (default /tmp)")
    ap.add_argument("--child", nargs=4, metavar=("TOOL", "TRUTH", "PRED", "OUTDIR"))
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child, n_boot=args.n_boot)))
        return

    sys.path.insert(0, str(HERE))
    import importlib.util

    import _common
    from synth_h5ad import make_screen

    ce2_python = args.celleval2_python
    if ce2_python is None and importlib.util.find_spec("cell_eval2") is not None:
        ce2_python = sys.executable

    sizes = args.sizes or list(QUICK if args.quick else FULL)
    path = Path(args.json)
    rows = json.loads(path.read_text())["rows"] if path.exists() else []
    info = _common.machine_info()
    for tool_mod in ("scanpy", "cell_eval", "anndata", "scipy"):
        try:
            from importlib.metadata import version

            info[tool_mod] = version(tool_mod.replace("_", "-"))
        except Exception:  # pragma: no cover
            pass
    print(_common.machine_note(info), flush=True)
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        for size in sizes:
            P, cells, G = map(int, size.split("x"))
            n_cells = round(P * cells / 0.95)  # synth_h5ad puts ~5 % of cells in the control
            t0 = time.perf_counter()
            truth = make_screen(Path(tmp) / f"truth_{size}.h5ad", n_cells, G, P + 1, seed=0)
            pred = make_screen(Path(tmp) / f"pred_{size}.h5ad", n_cells, G, P + 1, seed=1)
            print(f"{size}: {n_cells} cells, files in {time.perf_counter() - t0:.0f} s", flush=True)
            got = {}
            for tool in args.tools:
                if tool == "vcjax-boot" and P * G > args.boot_max_pg:
                    r = dict(status=f"not run: P·G = {P * G:.2g} > --boot-max-pg (memory)")
                elif tool == "cell-eval2" and ce2_python is None:
                    r = dict(status="not run: no interpreter with cell-eval2 (--celleval2-python)")
                else:
                    load = os.getloadavg()[0]
                    # vcjax: a compilation cache folder that is empty for each size
                    cache = (
                        str(Path(tmp) / f"jaxcache_{tool}_{size}") if tool in VCJAX_TIMED else "0"
                    )
                    python = ce2_python if tool == "cell-eval2" else None

                    def run(name, cache=cache, size=size, truth=truth, pred=pred, python=python):
                        out = Path(tmp) / f"out_{name}_{size}"
                        return run_tool(
                            name, truth, pred, out, timeout=args.timeout, n_boot=args.n_boot,
                            cache=cache, python=python,
                        )  # fmt: skip

                    r = run(tool)
                    r["loadavg_before"] = round(load, 2)
                    if tool in VCJAX_TIMED and r["status"] == "ok":
                        r["compilation_cache"] = "cold (empty) for seconds/seconds_warm"
                        again = run(f"{tool}-cached")
                        if again["status"] == "ok":
                            r["seconds_cached"] = again["seconds"]
                            r["peak_rss_mb_cached"] = again["peak_rss_mb"]
                        else:
                            r["seconds_cached_status"] = again["status"]
                r.update(tool=tool, P=P, cells=cells, G=G, n_cells=n_cells)
                got[tool] = r
                print(json.dumps(r), flush=True)
            if (
                got.get("vcjax", {}).get("status") == "ok"
                and got.get("numpy", {}).get("status") == "ok"
            ):
                cmp = compare(Path(tmp) / f"out_vcjax_{size}", Path(tmp) / f"out_numpy_{size}")
                got["numpy"]["parity"] = cmp
                print("parity vcjax vs numpy:", json.dumps(cmp), flush=True)
            rows = [
                r for r in rows if not (r["P"] == P and r["G"] == G and r["tool"] in got)
            ] + list(got.values())
            payload = dict(machine=info, rows=rows)
            _common.write_json(path, payload)
    print(markdown(rows))


def markdown(rows) -> str:
    """The results table (one line per size and tool) with ratios to vcjax (cell-eval2's to
    vcjax-all: the same work, every metric).

    vcjax's (and vcjax-all's) three times: first call in a fresh process with an empty (cold) compilation
    cache, first call in a fresh process with a warm cache, and a warm second call.
    """
    lines = [
        "| P | cells/pert | G | cells | tool | seconds (first call; vcjax: cold cache) "
        "| vcjax first call, warm cache | vcjax warm call | peak RSS MiB "
        "| tool / vcjax (first, cold cache) | tool / vcjax (first, warm cache) "
        "| tool / vcjax (warm call) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = {t: i for i, t in enumerate(TOOLS)}
    for r in sorted(rows, key=lambda r: (r["P"], r["G"], order.get(r["tool"], 99))):
        ref = RATIO_TO.get(r["tool"], "vcjax")
        v = next(
            (x for x in rows if x["tool"] == ref and x["P"] == r["P"] and x["G"] == r["G"]), {}
        )
        ok = r.get("status") == "ok"
        ratios = ok and v.get("status") == "ok" and r["tool"] not in ("vcjax-boot", *VCJAX_TIMED)

        def ratio(key: str, r=r, v=v, ratios=ratios) -> str:
            return f"{r['seconds'] / v[key]:.1f}×" if ratios and key in v else ""

        if r["tool"] == "vcjax-boot" and ok:
            sec = f"{r['per_resample_s']:.3f} s per resample (n_boot={r['n_boot']})"
        else:
            sec = f"{r['seconds']:.2f}" if ok else r.get("status", "")
        is_v = ok and r["tool"] in VCJAX_TIMED
        sc = f"{r['seconds_cached']:.2f}" if is_v and "seconds_cached" in r else ""
        sw = f"{r['seconds_warm']:.2f}" if is_v else ""
        rss = f"{r['peak_rss_mb']:,.0f}" if "peak_rss_mb" in r else ""
        lines.append(
            f"| {r['P']:,} | {r['cells']} | {r['G']:,} | {r.get('n_cells', 0):,} | {r['tool']} "
            f"| {sec} | {sc} | {sw} | {rss} | {ratio('seconds')} | {ratio('seconds_cached')} "
            f"| {ratio('seconds_warm')} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
