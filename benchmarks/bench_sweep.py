"""Benchmark of sweeps (vcjax.sweep): many models against one prepared truth.

Two parts, each in a fresh process (so each peak RSS is its own):

* ``point``: M = 16 models, P = 1,000 perturbations × G = 2,000 genes × 50 cells, no
  resamples. ``vcjax.sweep(adata, models)`` against, in the same run, a loop of
  ``vcjax.evaluate(adata, model)`` (what a sweep cost before: every model prepares the
  truth again) and a loop of ``vcjax.evaluate(screen, model)`` on a prepared truth. The
  tables are checked equal. Medians of ``--reps`` runs.
* ``boot``: M = 100 models, P = 1,000 × G = 2,000 × 100 cells, n_boot = 1,000 cell
  resamples, end to end from the AnnData (prepare, point scores, resamples, intervals),
  peak RSS; then, in the same process, the models' contractions alone on one chunk of
  resamples (their FLOP/s: 2·M·b·P·G per contraction) against a float32 matmul
  (4096 × 4096) measured in the same run, and one model's own bootstrap
  (``vcjax.evaluate(screen, model, n_boot=32)``) per resample: what M · n_boot resamples cost
  without shared resamples (extrapolated).

    python benchmarks/bench_sweep.py                  # both parts, full size (~10 min)
    python benchmarks/bench_sweep.py --part point
    python benchmarks/bench_sweep.py --quick          # small sizes (a smoke run)

Writes ``benchmarks/results_sweep.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def models_of(pred, M: int, seed: int = 0):
    """M models of graded quality: the pseudobulk plus noise of 10 levels (lazily)."""
    names, base, genes = pred
    rng = np.random.default_rng(seed)
    for i in range(M):
        noise = rng.normal(0, 0.05 * (1 + i % 10), base.shape).astype(np.float32)
        yield f"m{i:03d}", (names, base + noise, genes)


def part_point(P: int, G: int, cells: int, M: int, reps: int) -> dict:
    from bench_bootstrap import make_screen

    import vcjax

    adata, pred = make_screen(P, G, cells, 1000)
    kw = dict(key="condition", control="control", normalize=None)
    models = dict(models_of(pred, M))
    vcjax.sweep(adata, dict(list(models.items())[:2]), **kw)  # compile once, outside the clock
    t_sweep, t_loop, t_loop_screen = [], [], []
    res = tables = None
    for _ in range(reps):  # each timed run starts from the same state: earlier results freed
        res = tables = None
        gc.collect()
        t = time.perf_counter()
        res = vcjax.sweep(adata, models, **kw)
        t_sweep.append(time.perf_counter() - t)
        gc.collect()
        t = time.perf_counter()
        tables = [vcjax.evaluate(adata, m, **kw) for m in models.values()]
        t_loop.append(time.perf_counter() - t)
        gc.collect()
        t = time.perf_counter()
        screen = vcjax.prepare(adata, **kw)
        for m in models.values():
            vcjax.evaluate(screen, m)
        t_loop_screen.append(time.perf_counter() - t)
    # the same numbers: each model's rows equal evaluate's
    worst = 0.0
    for (name, _), tab in zip(models.items(), tables):
        got = res.table[res.table["model"] == name]
        ev = tab[tab["source"] == "model"]
        j = got.merge(ev, on=["perturbation", "metric"], suffixes=("", "_ev"))
        d = np.abs(j["value"] - j["value_ev"]) / np.maximum(1.0, np.abs(j["value_ev"]))
        worst = max(worst, float(np.nanmax(d)))
    med = {k: statistics.median(v) for k, v in
           dict(sweep=t_sweep, loop=t_loop, loop_screen=t_loop_screen).items()}  # fmt: skip
    return dict(
        part="point", P=P, G=G, cells=cells, M=M, reps=reps,
        sweep_s=t_sweep, evaluate_loop_s=t_loop, evaluate_screen_loop_s=t_loop_screen,
        median_s=med, speedup_vs_loop=med["loop"] / med["sweep"],
        speedup_vs_screen_loop=med["loop_screen"] / med["sweep"],
        max_rel_diff_vs_evaluate=worst, peak_rss_gb=rss_gb(),
    )  # fmt: skip


def _matmul_gflops() -> float:
    import jax
    import jax.numpy as jnp

    a = jnp.asarray(np.random.default_rng(0).normal(size=(4096, 4096)), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    ts = []
    for _ in range(5):
        t = time.perf_counter()
        f(a).block_until_ready()
        ts.append(time.perf_counter() - t)
    return 2 * 4096**3 / statistics.median(ts) / 1e9


def _contraction_gflops(screen, pred, M: int, b: int) -> dict:
    """The models' contractions alone on one chunk of ``b`` resamples (no MAE, no top-k; the
    resample-free model sums computed beforehand, once per block of models, as the sweep
    does)."""
    import jax
    import jax.numpy as jnp

    from vcjax import pipeline as PL
    from vcjax.metrics import DEFAULT_METRICS
    from vcjax.pipeline._contract import model_sums, model_values, resample_terms

    (s,) = screen.strata
    y0 = np.asarray(s.truth, np.float32)
    r0 = np.asarray(s.reference, np.float32)
    rs = PL.resampler(
        s, screen.spec, model=None, metrics=DEFAULT_METRICS, score=PL.ScoreSpec(),
        boot=PL.BootSpec(n_boot=b, chunk_size=b), extra=resample_terms,
        extra_arrays=dict(sweep_y0=y0, sweep_r0=r0),
    )  # fmt: skip
    terms = jax.block_until_ready(rs.run(0)[1])
    yhat = jnp.asarray(np.stack([m for _, (_, m, _) in models_of(pred, M)], axis=1))
    metrics = tuple(m for m in rs.metrics if m not in ("mae", "pearson_delta_topk"))
    m0 = jnp.asarray(s.deg_mask)
    sums = model_sums(yhat, jnp.asarray(y0), jnp.asarray(r0), m0)  # once per block, as sweep
    kw = dict(y0=jnp.asarray(y0), r0=jnp.asarray(r0), m0=m0, metrics=metrics, k=20,
              strict=False, gate=True, sums=sums)  # fmt: skip
    jax.block_until_ready(model_values(terms, yhat, **kw))
    ts = []
    for _ in range(3):
        t = time.perf_counter()
        jax.block_until_ready(model_values(terms, yhat, **kw))
        ts.append(time.perf_counter() - t)
    P, G = y0.shape
    n_contractions = 10  # a0·e, a0²·w, a0·(we), x0c·e, x0c·ρ, x0c·ρ', x0m·{m, mρ, m(y−r0)}, x0m²·m
    flops = n_contractions * 2.0 * M * b * P * G
    return dict(contraction_s=statistics.median(ts), contraction_gflops=flops / statistics.median(ts) / 1e9,
                flops_per_resample=flops / b, metrics=list(metrics))  # fmt: skip


def part_boot(P: int, G: int, cells: int, M: int, n_boot: int) -> dict:
    from bench_bootstrap import make_screen

    import vcjax

    adata, pred = make_screen(P, G, cells, 1000)
    kw = dict(key="condition", control="control", normalize=None)
    t = time.perf_counter()
    res = vcjax.sweep(adata, models_of(pred, M), n_boot=n_boot, seed=0, **kw)
    total = time.perf_counter() - t
    peak = rss_gb()
    lb = res.leaderboard("r2w_delta")
    info = {k: v for k, v in res.info.items() if isinstance(v, (int, float, str))}
    screen = vcjax.prepare(adata, **kw)
    # the same-run reference: one model's own bootstrap (vcjax.evaluate, n_boot = 32, timed
    # after a first call that compiles), per resample; a sweep without shared resamples
    # would pay it M · n_boot times
    one = next(models_of(pred, 1))[1]
    vcjax.evaluate(screen, one, n_boot=32, seed=1)
    t = time.perf_counter()
    vcjax.evaluate(screen, one, n_boot=32, seed=2)
    per_model_resample = (time.perf_counter() - t) / 32
    chunk = int(res.info["resample_chunk"])
    c = _contraction_gflops(screen, pred, M, chunk)
    mm = _matmul_gflops()
    return dict(
        part="boot", P=P, G=G, cells=cells, M=M, n_boot=n_boot, total_s=total,
        per_resample_s=res.info["resample_seconds"] / n_boot, peak_rss_gb=peak, info=info,
        top=lb.head(3)[["value", "ci_low", "ci_high", "rank_low", "rank_high", "p_best"]]
        .reset_index().to_dict("records"),
        **c, matmul_gflops=mm, contraction_share_of_matmul=c["contraction_gflops"] / mm,
        evaluate_boot_s_per_resample=per_model_resample,
        evaluate_loop_projection_s=per_model_resample * M * n_boot,
        speedup_vs_evaluate_loop=per_model_resample * M * n_boot / total,
    )  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=["point", "boot", "all"], default="all")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--n-boot", type=int, default=None)
    ap.add_argument("--out", default=str(Path(__file__).with_name("results_sweep.json")))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        kw = json.loads(a.child)
        fn = part_point if kw.pop("part") == "point" else part_boot
        print("RESULT " + json.dumps(fn(**kw)), flush=True)
        return
    if a.quick:
        sizes = dict(point=dict(P=100, G=500, cells=30, M=8, reps=a.reps),
                     boot=dict(P=100, G=500, cells=30, M=20, n_boot=a.n_boot or 64))  # fmt: skip
    else:
        sizes = dict(point=dict(P=1000, G=2000, cells=50, M=16, reps=a.reps),
                     boot=dict(P=1000, G=2000, cells=100, M=100, n_boot=a.n_boot or 1000))  # fmt: skip
    parts = ["point", "boot"] if a.part == "all" else [a.part]
    import jax

    out = dict(machine=platform.processor() or platform.machine(), python=platform.python_version(),
               jax=jax.__version__, backend=jax.default_backend(), date=time.strftime("%Y-%m-%d"),
               results=[])  # fmt: skip
    for part in parts:
        cmd = [sys.executable, __file__, "--child", json.dumps(dict(part=part, **sizes[part]))]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not line:
            sys.exit(f"bench_sweep: part {part} failed:\n{proc.stderr[-3000:]}")
        r = json.loads(line[0][7:])
        out["results"].append(r)
        if part == "point":
            m = r["median_s"]
            print(f"point  M={r['M']} P={r['P']} G={r['G']}: sweep {m['sweep']:.2f} s, "
                  f"evaluate loop {m['loop']:.2f} s ({r['speedup_vs_loop']:.1f}×), evaluate(screen) "
                  f"loop {m['loop_screen']:.2f} s ({r['speedup_vs_screen_loop']:.1f}×); max rel diff "
                  f"{r['max_rel_diff_vs_evaluate']:.1e}; peak {r['peak_rss_gb']:.2f} GB")  # fmt: skip
        else:
            print(f"boot   M={r['M']} P={r['P']} G={r['G']} n_boot={r['n_boot']}: {r['total_s']:.0f} s "
                  f"end to end ({r['per_resample_s']:.3f} s/resample; truth {r['info'].get('truth_seconds', 0):.0f} s, "
                  f"models {r['info'].get('model_seconds', 0):.0f} s), peak {r['peak_rss_gb']:.2f} GB; "
                  f"contractions {r['contraction_gflops']:.0f} GFLOP/s = "
                  f"{100 * r['contraction_share_of_matmul']:.0f} % of matmul {r['matmul_gflops']:.0f} GFLOP/s; "
                  f"one model's own bootstrap {r['evaluate_boot_s_per_resample']:.3f} s/resample, "
                  f"so a loop of evaluate ~{r['evaluate_loop_projection_s'] / 3600:.1f} h "
                  f"({r['speedup_vs_evaluate_loop']:.0f}× the sweep)")  # fmt: skip
    Path(a.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
