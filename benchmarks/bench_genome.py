"""A genome-scale screen scored end to end from a backed ``.h5ad`` (issue 9, issue 20).

Target size: 11,000 perturbations × 8,192 genes × 1,000,000 cells (a genome-wide CRISPR
screen), scored with :func:`vcjax.evaluate`: one streaming pass for the split group
statistics, DEG t-tests and weights, the 7 baselines, all 11 default metrics and the
calibration, for a model given as one pseudobulk row per perturbation (a seeded noisy
float64 matrix built before the call, so its 8·P·G bytes are in the peak; the model's own
cost is not ours to time). ``--genes 20000`` is the same screen at the Virtual Cell
Challenge's width.

The synthetic file is written with ``benchmarks/synth_h5ad.py`` under ``--tmp`` (default
``/tmp``; never in the repository) and deleted afterwards unless ``--keep``; ``--file``
scores a file kept from an earlier run (its shape is read from the file). Scoring runs in
a fresh subprocess so that its peak RSS (``VmHWM``) is its own, with vcjax's persistent
compilation cache disabled (``VCJAX_COMPILATION_CACHE=0``: compilation is timed, as in a
first run; it is a small part at this size). Inside ``evaluate`` the child records each
phase's peak RSS (``VmHWM`` reset at each phase boundary through ``/proc/self/clear_refs``)
and time: the streaming pass, the DEG tests, the rest of the derivation, the rest of the
preparation, aligning the model, scoring, and the rest (calibration, the table). Writing
the full-size file takes about 3 min on this 2-core machine (6.2 GiB; 15 GiB at 20,000
genes), so ``--cells/--perts/--genes`` choose a smaller screen; figures at the target size
are then a **linear extrapolation**, reported as such: the streaming pass scales with the
cells, everything after it with P·G.

Usage::

    python benchmarks/bench_genome.py --cells 200000 --perts 2200 --genes 8192
    python benchmarks/bench_genome.py --keep                 # the full size (1 M cells)
    python benchmarks/bench_genome.py --file /tmp/vcjax_genome_1000000x11000x8192.h5ad
    python benchmarks/bench_genome.py --genes 20000 --keep   # the VCC's width
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
KEY, CONTROL = "target_gene", "non-targeting"
TARGET = dict(cells=1_000_000, perts=11_000, genes=8_192)


def _status_mb(field: str) -> float:
    """``VmHWM`` (peak) or ``VmRSS`` (now) of this process in MiB; not ``ru_maxrss``, which
    Linux carries over ``exec`` from the parent's RSS at ``fork``."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # pragma: no cover


def _rss() -> float:
    return _status_mb("VmHWM")


def _reset_peak() -> bool:
    """Reset this process's ``VmHWM`` to its current RSS (Linux ≥ 4.0); False if refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:  # pragma: no cover - not Linux, or not allowed
        return False


class _Phases:
    """Peak RSS and seconds per phase: wrapped functions switch the phase on entry and
    back on exit; the peak since the last switch is read from ``VmHWM``, then reset."""

    def __init__(self) -> None:
        self.current = "setup"
        self.peak: dict[str, float] = {}
        self.seconds: dict[str, float] = {}
        self.cpu: dict[str, float] = {}  # CPU seconds of the process (less load-dependent)
        self.exact = _reset_peak()

    def switch(self, name: str) -> None:
        self.peak[self.current] = max(self.peak.get(self.current, 0.0), _rss())
        if self.exact:
            _reset_peak()
        self.current = name

    def wrap(self, module, attr: str, name: str) -> None:
        f = getattr(module, attr)

        def run(*args, **kwargs):
            outer = self.current
            self.switch(name)
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                return f(*args, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
                self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - c0
                self.switch(outer)

        setattr(module, attr, run)


def child(path: str) -> dict:
    """Score the backed file in this process; timings and peak RSS per phase."""
    import anndata as ad
    import numpy as np
    import pandas as pd

    import vcjax
    from vcjax import data as D
    from vcjax.pipeline import _derive, _evaluate, _screen

    phases = _Phases()
    out: dict = {"rss_after_import_mb": _rss()}
    phases.switch("open")
    t0 = time.perf_counter()
    a = ad.read_h5ad(path, backed="r")
    labels = a.obs[KEY].astype(str).to_numpy()
    split = D.split_halves(labels, seed=42)
    out["open_s"] = time.perf_counter() - t0
    phases.switch("stream pass alone")
    t0 = time.perf_counter()
    D.group_stats(a, KEY, control=CONTROL, split=split, normalize=None)
    out["stream_stats_s"] = time.perf_counter() - t0  # the streaming pass alone
    out["rss_after_stats_mb"] = _status_mb("VmRSS")

    phases.switch("model")
    perts = [p for p in pd.unique(labels) if p != CONTROL]
    rng = np.random.default_rng(7)
    model = pd.DataFrame(
        rng.normal(0.1, 0.05, size=(len(perts), a.n_vars)) + 0.3,
        index=perts,
        columns=a.var_names,
    )
    # the phases of evaluate (what each wrapped function does, in order)
    phases.wrap(_evaluate, "as_screen", "prepare: other (checks, labels, scale evidence)")
    phases.wrap(D, "group_stats", "prepare: streaming pass (group sums)")
    phases.wrap(_screen, "derive", "prepare: derive (truth, u, baselines)")
    phases.wrap(_derive, "deg_arrays", "prepare: DEG t-tests and weights")
    phases.wrap(_evaluate, "align", "align the model")
    phases.wrap(_evaluate, "score_sources", "score (model + 7 baselines)")
    phases.switch("evaluate: other (calibration, table)")
    t0, c0 = time.perf_counter(), time.process_time()
    table = vcjax.evaluate(a, model, key=KEY, control=CONTROL, split=split, normalize=None)
    out["evaluate_s"] = time.perf_counter() - t0
    out["evaluate_cpu_s"] = time.process_time() - c0
    phases.switch("end")
    out["rows"] = len(table)
    out["n_perts"] = len(perts)
    out["finite_frac"] = float(np.isfinite(table["value"].to_numpy(float)).mean())
    out["phases"] = {
        name: {
            "peak_rss_mb": phases.peak[name],
            "s": phases.seconds.get(name),
            "cpu_s": phases.cpu.get(name),
        }
        for name in phases.peak
        if name not in ("setup", "end")
    }
    out["phase_peaks_exact"] = phases.exact
    out["peak_rss_mb"] = max(phases.peak.values()) if phases.exact else _rss()
    return out


def _file_shape(path: Path) -> dict:
    """Cells, perturbations (conditions less the control) and genes of a screen file."""
    import h5py

    with h5py.File(path, "r") as f:
        cells, genes = (int(x) for x in f["X"].attrs["shape"])
        cats = f["obs"][KEY]["categories"]
        perts = int(cats.shape[0]) - 1
    return dict(cells=cells, perts=perts, genes=genes)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, default=TARGET["cells"])
    ap.add_argument("--perts", type=int, default=TARGET["perts"])
    ap.add_argument("--genes", type=int, default=TARGET["genes"])
    ap.add_argument("--density", type=float, default=0.1)
    ap.add_argument("--tmp", default="/tmp")
    ap.add_argument("--file", default=None, help="score this existing file instead")
    ap.add_argument("--keep", action="store_true", help="keep the generated file")
    ap.add_argument("--json", default=str(HERE / "results_genome.json"))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child)))
        return

    sys.path.insert(0, str(HERE))
    import _common
    from synth_h5ad import make_screen

    info = _common.machine_info()
    print(_common.machine_note(info), flush=True)
    res: dict = dict(cells=args.cells, perts=args.perts, genes=args.genes, density=args.density)
    if args.file:
        path = Path(args.file)
        res.update(_file_shape(path))
        args.cells, args.perts, args.genes = res["cells"], res["perts"], res["genes"]
    else:
        path = Path(args.tmp) / f"vcjax_genome_{args.cells}x{args.perts}x{args.genes}.h5ad"
        t0 = time.perf_counter()
        make_screen(path, args.cells, args.genes, args.perts + 1, density=args.density, seed=0)
        res["generate_s"] = time.perf_counter() - t0
        print(f"wrote {path} in {res['generate_s']:.0f} s", flush=True)
    res["file_gib"] = path.stat().st_size / 2**30
    try:
        env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
        env["VCJAX_COMPILATION_CACHE"] = "0"  # times include compilation, as a first run
        res["loadavg_before"] = round(os.getloadavg()[0], 2)
        t0 = time.perf_counter()
        run = subprocess.run(
            [sys.executable, __file__, "--child", str(path)],
            capture_output=True,
            text=True,
            env=env,
        )
        res["process_s"] = time.perf_counter() - t0
        if run.returncode != 0:
            raise SystemExit(run.stderr[-3000:])
        res.update(json.loads(run.stdout.strip().splitlines()[-1]))
    finally:
        if not args.file and not args.keep:
            path.unlink(missing_ok=True)

    # linear extrapolation to the target screen at this width: streaming ∝ cells, the
    # rest ∝ P·G (not done at the target size itself)
    target = dict(TARGET, genes=args.genes)
    if (args.cells, args.perts) != (target["cells"], target["perts"]):
        f_cells = target["cells"] / args.cells
        f_pg = target["perts"] / args.perts
        stream = res["stream_stats_s"]
        rest = max(res["evaluate_s"] - stream, 0.0)
        res["extrapolated"] = {
            "label": f"linear extrapolation to {target}, not measured",
            "evaluate_s": stream * f_cells + rest * f_pg,
            "stream_s": stream * f_cells,
            "after_stream_s": rest * f_pg,
            "peak_rss_mb": res["rss_after_stats_mb"]
            + (res["peak_rss_mb"] - res["rss_after_stats_mb"]) * f_pg,
        }
    res["machine"] = info
    _common.write_json(args.json, res)
    print(json.dumps(res, indent=1, default=float))
    print(f"\n{'phase':50s} {'peak RSS':>12s} {'seconds':>8s} {'CPU s':>8s}")
    for name, ph in res.get("phases", {}).items():
        sec = "" if ph["s"] is None else f"{ph['s']:8.1f} {ph['cpu_s']:8.1f}"
        print(f"{name:50s} {ph['peak_rss_mb'] / 1024:8.2f} GiB {sec}")
    print(f"{'whole process (VmHWM)':50s} {res['peak_rss_mb'] / 1024:8.2f} GiB")


if __name__ == "__main__":
    main()
