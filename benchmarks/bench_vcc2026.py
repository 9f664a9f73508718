"""The vcc2026 protocol: vcjax against cell-eval2 0.20.0's own CPU pipeline, same files.

For each size ``PxCELLSxG`` (perturbations, cells per perturbation, genes) a raw-counts pair
is written in the challenge's format (:func:`make_counts_pair`): ``real.h5ad`` and
``pred.h5ad``, CSR float32 integer counts, ``obs['target']`` categorical, control
``non-targeting`` (≈ 5 % of cells, in both files), perturbation ``i`` named after gene ``i``
(a knock-down of its own gene plus a shift on 30 other genes). Then, each in a **fresh
subprocess** that reports its own wall time (imports excluded) and peak RSS (``VmHWM``):

* ``cell-eval2``: the four steps a challenge user (or organiser) runs on CPU, exactly as
  ``tests/test_vcc2026.py``'s parity test does::

      cell-eval2 run -ap pred.h5ad -ar real.h5ad --preset vcc2026 -o out
      cell-eval2 baseline -ar real.h5ad --preset vcc2026 -o base --save-pred base_pred.h5ad
      cell-eval2 prep-real-bundle --real real.h5ad --baseline base_pred.h5ad --preset vcc2026 -o bundle
      cell-eval2 score --user-agg out/agg_results.csv --real-bundle bundle -o score.csv

  one process per step (``cell_eval2.cli.main``); the total is their sum, the peak the
  largest of the four. ``run`` scores the submission (real DE included), ``baseline`` and
  ``prep-real-bundle`` build the two ends of the scale from the real data (the
  truth-side work a sweep would reuse), ``score`` combines them.
* ``vcjax``: read both files (anndata), :func:`vcjax.peers._vcc2026.vcc2026_truth` (real
  DE, gate, baseline arm, five split-half anchors), :func:`vcc2026_scores` (the
  submission: its DE and the nine metrics, the composite), then the submission again
  (``score_warm_s``: a sweep's cost per further submission, the truth reused).

The driver checks vcjax's per-perturbation values and composite against cell-eval2's
``results.csv`` / ``score.csv`` of the same run (``max_abs_diff``) and reports same-run
ratios (cell-eval2 / vcjax, per repeat, then the median).

Usage::

    python benchmarks/bench_vcc2026.py --sizes 50x50x2000 --repeats 3
    python benchmarks/bench_vcc2026.py --sizes 300x50x8000 --repeats 1 --write-results

Results go to ``benchmarks/results_vcc2026.json`` (rows merged by size).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
KEY, CONTROL = "target", "non-targeting"
JSON = HERE / "results_vcc2026.json"
CE2_STEPS = ("run", "baseline", "prep-real-bundle", "score")
HEADING = "## vcc2026 protocol vs cell-eval2 (issue 21)"


# ----------------------------------------------------------------------------- data
def _counts_block(rng, mu, lib, eff, disp: float = 0.3):
    """Negative-binomial counts ``(cells, G)``: mean ``lib_c · mu_g · eff_cg``, var
    ``m + disp·m²`` (a Poisson of a gamma-scaled mean)."""
    m = lib[:, None] * mu[None, :] * eff
    shape = 1.0 / disp
    return rng.poisson(rng.gamma(shape, 1.0 / shape, size=m.shape) * m).astype(np.float32)


def make_counts_pair(
    folder,
    n_perts: int,
    cells: int,
    n_genes: int,
    *,
    seed: int = 0,
    ctrl_frac: float = 0.05,
    chunk: int = 2048,
):
    """Write ``real.h5ad`` and ``pred.h5ad`` (raw counts, the challenge's format) to ``folder``.

    Genes: mean counts per cell ``mu_g`` log-normal (median ≈ 0.25, a long upper tail: a
    library of ≈ 4·10³ counts at G = 8,000, ~20 % non-zero entries, most genes above the
    5-CPM gate); cell library factor log-normal (σ = 0.3). Perturbation ``i`` (``i < P``;
    named like gene ``i``) multiplies its own gene by 0.1 and 30 other genes by
    ``exp(N(0, 0.8))``. ``pred``: the same design with the effects blurred (a model that
    gets them partly right: each effect ``× exp(N(0, 0.7))``) and its own cells.

    Returns:
      ``(real_path, pred_path, n_cells)``.
    """
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    folder = Path(folder)
    rng = np.random.default_rng(seed)
    genes = np.array([f"GENE{j:05d}" for j in range(n_genes)])
    mu = np.exp(rng.normal(-1.4, 1.6, size=n_genes))
    perts = list(genes[:n_perts])
    n_ctrl = max(2, round(ctrl_frac * n_perts * cells / (1 - ctrl_frac)))
    k = max(30, n_genes // 20)
    others = rng.integers(0, n_genes, size=(n_perts, k))
    shifts = np.exp(rng.normal(0.0, 1.0, size=(n_perts, k)))
    blur = np.exp(rng.normal(0.0, 0.7, size=(n_perts, k)))
    labels = np.array([CONTROL] * n_ctrl + [p for p in perts for _ in range(cells)])
    codes = np.concatenate([np.full(n_ctrl, -1), np.repeat(np.arange(n_perts), cells)])
    out = []
    for name, s, fx in (("real", seed + 1, shifts), ("pred", seed + 2, shifts * blur)):
        r = np.random.default_rng(s)
        order = r.permutation(labels.size)
        lab, cod = labels[order], codes[order]
        blocks = []
        for lo in range(0, lab.size, chunk):
            c = cod[lo : lo + chunk]
            eff = np.ones((c.size, n_genes))
            hit = np.flatnonzero(c >= 0)
            eff[hit[:, None], others[c[hit]]] = fx[c[hit]]
            eff[hit, c[hit]] = 0.1  # knock-down of its own gene
            lib = np.exp(r.normal(0.0, 0.3, size=c.size))
            blocks.append(sp.csr_matrix(_counts_block(r, mu, lib, eff)))
        x = sp.vstack(blocks, format="csr")
        obs = pd.DataFrame(
            {KEY: pd.Categorical(lab)}, index=[f"{name}{i}" for i in range(lab.size)]
        )
        path = folder / f"{name}.h5ad"
        ad.AnnData(x, obs=obs, var=pd.DataFrame(index=genes)).write_h5ad(path)
        out.append(path)
    return out[0], out[1], int(labels.size)


# ----------------------------------------------------------------------------- children
def cpu_s() -> float:
    """CPU seconds of this process so far, all its threads (user + system)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def peak_rss_mb() -> float:
    """This process's own peak RSS (``VmHWM``), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _ce2_argv(step: str) -> list[str]:
    return {
        "run": ["run", "-ap", "pred.h5ad", "-ar", "real.h5ad", "--preset", "vcc2026", "-o", "out"],
        "baseline": [
            "baseline",
            "-ar",
            "real.h5ad",
            "--preset",
            "vcc2026",
            "-o",
            "base",
            "--save-pred",
            "base_pred.h5ad",
        ],  # fmt: skip
        "prep-real-bundle": [
            "prep-real-bundle",
            "--real",
            "real.h5ad",
            "--baseline",
            "base_pred.h5ad",
            "--preset",
            "vcc2026",
            "-o",
            "bundle",
        ],  # fmt: skip
        "score": [
            "score",
            "--user-agg",
            "out/agg_results.csv",
            "--real-bundle",
            "bundle",
            "-o",
            "score.csv",
        ],  # fmt: skip
    }[step]


def child_ce2(step: str, workdir: str) -> dict:
    t0 = time.perf_counter()
    import warnings

    warnings.simplefilter("ignore")
    from cell_eval2.cli import main

    imp = time.perf_counter() - t0
    os.chdir(workdir)
    t0, c0 = time.perf_counter(), cpu_s()
    main(_ce2_argv(step))
    return dict(
        seconds=time.perf_counter() - t0, cpu_s=cpu_s() - c0, import_s=imp,
        peak_rss_mb=peak_rss_mb(),
    )  # fmt: skip


def child_vcjax(workdir: str) -> dict:
    t0 = time.perf_counter()
    import anndata as ad

    from vcjax.peers._vcc2026 import vcc2026_scores, vcc2026_truth

    out = dict(import_s=time.perf_counter() - t0)
    wd = Path(workdir)
    t0, c0 = time.perf_counter(), cpu_s()
    real = ad.read_h5ad(wd / "real.h5ad")
    pred = ad.read_h5ad(wd / "pred.h5ad")
    t1 = time.perf_counter()
    truth = vcc2026_truth(real.X, real.obs[KEY], real.var_names.to_numpy(), control=CONTROL)
    t2 = time.perf_counter()
    got = vcc2026_scores(truth, pred.X, pred.obs[KEY])
    t3 = time.perf_counter()
    out["cpu_s"] = cpu_s() - c0
    out["peak_rss_mb"] = peak_rss_mb()
    vcc2026_scores(truth, pred.X, pred.obs[KEY])
    t4 = time.perf_counter()
    out.update(read_s=t1 - t0, truth_s=t2 - t1, score_s=t3 - t2, score_warm_s=t4 - t3)
    out["seconds"] = t3 - t0  # read + truth + one submission (the composite included)
    rows = [
        dict(perturbation=p, metric=m, value=float(v[i]))
        for m, v in got["metrics"].items()
        for i, p in enumerate(got["perts"])
    ]
    (wd / "vcjax_values.json").write_text(
        json.dumps(dict(rows=rows, score=got["score"], members=got["member_scores"]))
    )
    return out


def _spawn(args: list[str], timeout: float) -> dict:
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    t0 = time.perf_counter()
    try:
        res = subprocess.run(
            [sys.executable, __file__, "--child", *args],
            capture_output=True, text=True, timeout=timeout, env=env,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return dict(status=f"not run: did not finish within {timeout:.0f} s")
    if res.returncode != 0:
        tail = (res.stderr.strip().splitlines() or ["?"])[-1][:300]
        return dict(status=f"failed (rc {res.returncode}): {tail}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out["process_s"] = time.perf_counter() - t0
    return dict(status="ok", **out)


def compare(workdir: Path) -> dict:
    """vcjax's values against cell-eval2's ``results.csv`` and ``score.csv`` (same files)."""
    import pandas as pd

    v = json.loads((workdir / "vcjax_values.json").read_text())
    a = pd.DataFrame(v["rows"])
    b = pd.read_csv(workdir / "out" / "results.csv")
    m = a.merge(b[["perturbation", "metric", "value"]], on=["perturbation", "metric"])
    va, vb = m["value_x"].to_numpy(float), m["value_y"].to_numpy(float)
    both = np.isfinite(va) & np.isfinite(vb)
    score = pd.read_csv(workdir / "score.csv").set_index("metric")["from_replicate"]
    member = max(abs(x - float(score[k])) for k, x in v["members"].items())
    return dict(
        compared=int(len(m)),
        nan_mismatch=int((np.isnan(va) != np.isnan(vb)).sum()),
        max_abs_diff=float(np.abs(va - vb)[both].max()) if both.any() else float("nan"),
        member_max_abs_diff=float(member),
        score_abs_diff=float(abs(v["score"] - float(score["avg_score"]))),
        score=float(v["score"]),
    )


# ----------------------------------------------------------------------------- driver
def one_repeat(workdir: Path, timeout: float, tools) -> dict:
    row: dict = dict(loadavg_before=round(os.getloadavg()[0], 2))
    if "cell-eval2" in tools:
        steps = {}
        for step in CE2_STEPS:
            steps[step] = _spawn(["ce2", step, str(workdir)], timeout)
            print(f"  cell-eval2 {step}: {json.dumps(steps[step])}", flush=True)
            if steps[step]["status"] != "ok":
                break
        ok = all(s.get("status") == "ok" for s in steps.values()) and len(steps) == 4
        row["cell-eval2"] = dict(
            status="ok" if ok else "failed",
            steps=steps,
            seconds=sum(s["seconds"] for s in steps.values()) if ok else None,
            cpu_s=sum(s["cpu_s"] for s in steps.values()) if ok else None,
            peak_rss_mb=max(s["peak_rss_mb"] for s in steps.values()) if ok else None,
        )
    if "vcjax" in tools:
        row["vcjax"] = _spawn(["vcjax", "-", str(workdir)], timeout)
        print(f"  vcjax: {json.dumps(row['vcjax'])}", flush=True)
    c, v = row.get("cell-eval2", {}), row.get("vcjax", {})
    if c.get("status") == "ok" and v.get("status") == "ok":
        row["parity"] = compare(workdir)
        st = c["steps"]
        row["ratio_total"] = c["seconds"] / v["seconds"]
        row["ratio_truth"] = (st["baseline"]["seconds"] + st["prep-real-bundle"]["seconds"]) / v[
            "truth_s"
        ]
        row["ratio_submission"] = (st["run"]["seconds"] + st["score"]["seconds"]) / v["score_s"]
        row["ratio_peak"] = c["peak_rss_mb"] / v["peak_rss_mb"]
        row["ratio_cpu"] = c["cpu_s"] / v["cpu_s"]
        print(
            f"  ratios: total {row['ratio_total']:.1f}x, peak {row['ratio_peak']:.2f}x; "
            f"parity {json.dumps(row['parity'])}",
            flush=True,
        )
    return row


def _med(rows, *path):
    vals = []
    for r in rows:
        x = r
        for p in path:
            x = x.get(p) if isinstance(x, dict) else None
        if isinstance(x, (int, float)):
            vals.append(float(x))
    return statistics.median(vals) if vals else float("nan")


def summarise(size: str, reps: list[dict]) -> dict:
    out = dict(size=size, repeats=len(reps), loadavg=[r["loadavg_before"] for r in reps])
    for k in ("ratio_total", "ratio_truth", "ratio_submission", "ratio_peak", "ratio_cpu"):
        out[k] = _med(reps, k)
        out[k + "_range"] = [
            min(r.get(k, np.nan) for r in reps),
            max(r.get(k, np.nan) for r in reps),
        ]
    for s in CE2_STEPS:
        out[f"ce2_{s}_s"] = _med(reps, "cell-eval2", "steps", s, "seconds")
        out[f"ce2_{s}_mb"] = _med(reps, "cell-eval2", "steps", s, "peak_rss_mb")
    out["ce2_s"] = _med(reps, "cell-eval2", "seconds")
    out["ce2_cpu_s"] = _med(reps, "cell-eval2", "cpu_s")
    out["ce2_mb"] = _med(reps, "cell-eval2", "peak_rss_mb")
    for k in ("seconds", "read_s", "truth_s", "score_s", "score_warm_s", "peak_rss_mb", "cpu_s"):
        out[f"vcjax_{k}"] = _med(reps, "vcjax", k)
    out["max_abs_diff"] = max(r.get("parity", {}).get("max_abs_diff", np.nan) for r in reps)
    out["score_abs_diff"] = max(r.get("parity", {}).get("score_abs_diff", np.nan) for r in reps)
    return out


def markdown(summ: list[dict]) -> str:
    head = (
        "| P × cells × G | cells | repeats | cell-eval2 s: run / baseline / prep-real-bundle "
        "/ score = total | cell-eval2 peak MiB | vcjax s: read / truth / submission = total "
        "| vcjax next submission s | vcjax peak MiB | ratio total (range) | ratio truth side "
        "| ratio submission side | peak ratio | max abs diff (per pert) / score |"
    )
    lines = [head, "|" + "---|" * 13]
    for s in summ:
        lines.append(
            f"| {s['size']} | {s.get('n_cells', '')} | {s['repeats']} "
            f"| {s['ce2_run_s']:.1f} / {s['ce2_baseline_s']:.1f} / "
            f"{s['ce2_prep-real-bundle_s']:.1f} / {s['ce2_score_s']:.1f} = **{s['ce2_s']:.1f}** "
            f"| {s['ce2_mb']:,.0f} "
            f"| {s['vcjax_read_s']:.2f} / {s['vcjax_truth_s']:.2f} / {s['vcjax_score_s']:.2f} "
            f"= **{s['vcjax_seconds']:.2f}** | {s['vcjax_score_warm_s']:.2f} "
            f"| {s['vcjax_peak_rss_mb']:,.0f} "
            f"| **{s['ratio_total']:.1f}×** ({s['ratio_total_range'][0]:.1f}–"
            f"{s['ratio_total_range'][1]:.1f}) | {s['ratio_truth']:.1f}× "
            f"| {s['ratio_submission']:.1f}× | {s['ratio_peak']:.2f}× "
            f"| {s['max_abs_diff']:.1e} / {s['score_abs_diff']:.1e} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="*", default=["50x50x2000"], help="PxCELLSxG")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tools", nargs="*", default=["cell-eval2", "vcjax"])
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per step")
    ap.add_argument("--json", default=str(JSON))
    ap.add_argument("--tmp", default=None)
    ap.add_argument("--write-results", action="store_true", help="update RESULTS.md's section")
    ap.add_argument("--child", nargs=3, metavar=("TOOL", "STEP", "WORKDIR"))
    args = ap.parse_args(argv)
    if args.child:
        tool, step, wd = args.child
        out = child_ce2(step, wd) if tool == "ce2" else child_vcjax(wd)
        print(json.dumps(out))
        return

    sys.path.insert(0, str(HERE))
    import _common

    info = _common.machine_info()
    from importlib.metadata import version

    for mod in ("cell-eval2", "pdex", "anndata", "scipy"):
        try:
            info[mod] = version(mod)
        except Exception:  # pragma: no cover
            pass
    print(_common.machine_note(info), flush=True)
    path = Path(args.json)
    old = json.loads(path.read_text()) if path.exists() else {}
    summ = {s["size"]: s for s in old.get("summary", [])}
    raw = old.get("raw", {})
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        for size in args.sizes:
            p, c, g = map(int, size.split("x"))
            wd = Path(tmp) / size
            wd.mkdir()
            t0 = time.perf_counter()
            _, _, n_cells = make_counts_pair(wd, p, c, g)
            mb = sum(f.stat().st_size for f in wd.glob("*.h5ad")) / 2**20
            print(f"{size}: {n_cells} cells, {mb:.0f} MiB, files in "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)  # fmt: skip
            reps = []
            for i in range(args.repeats):
                print(f" repeat {i + 1}/{args.repeats}", flush=True)
                reps.append(one_repeat(wd, args.timeout, args.tools))
                for d in ("out", "base", "bundle"):
                    subprocess.run(["rm", "-rf", str(wd / d)], check=False)
            s = summarise(size, reps)
            s.update(n_cells=n_cells, files_mib=round(mb), machine=info)
            summ[size] = s
            raw[size] = reps
            _common.write_json(path, dict(summary=list(summ.values()), raw=raw))
    rows = sorted(summ.values(), key=lambda s: [int(v) for v in s["size"].split("x")])
    table = markdown(rows)
    print(table)
    if args.write_results:
        _common.update_results_section(HEADING, table)


if __name__ == "__main__":
    main()
