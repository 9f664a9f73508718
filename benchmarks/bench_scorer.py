"""Benchmark: ``screen.scorer`` (a pure JAX function) vs ``vcjax.score`` on device arrays.

The scorer is what a training loop calls for on-device validation metrics; the engine is
what ``evaluate`` calls. Both score the same prediction against the same prepared truth
(core metrics, float32); the target is the scorer within 2× of the engine per call. In the
same process and run:

* ``engine``: ``vcjax.score(pred, truth, reference=, weights=, mask=)`` with every core
  metric against the Δ reference, inputs already ``jax.Array``\\ s on the device;
* ``scorer``: ``screen.scorer(metrics=...)(pred)`` (compiled, the scorer's arrays as inputs),
  raw values (gated);
* ``scorer, calibrated``: the same with ``calibrated=True``;
* ``scorer, vmap over M models``: ``jax.vmap`` over an ``(M, P, G)`` stack, per model.

The truth is a synthetic prepared screen of ``P`` perturbations × ``G`` genes (a
:class:`vcjax.pipeline.Screen` built from random group sums, so that no cells are needed).
Times are medians of repeated calls after a warm-up (compilation excluded); the agreement
of the two paths (max |Δ|) is printed too.

Usage::

    python benchmarks/bench_scorer.py                    # P = 1,000, G = 8,192
    python benchmarks/bench_scorer.py --p 300 --g 2000   # smaller
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import _common  # noqa: E402

METRICS = (
    "mse", "wmse", "mae", "pearson_delta", "pearson_delta_degs", "pearson_delta_topk",
    "r2_delta", "r2w_delta", "cosine_delta",
)  # fmt: skip


def synthetic_screen(p: int, g: int, *, cells: int = 40, seed: int = 0):
    """A prepared screen of ``p`` perturbations from simulated cells (small cell counts)."""
    import vcjax

    adata = vcjax.simulate_screen(
        n_perturbations=p, n_genes=g, cells_per_perturbation=cells, n_control=4 * cells,
        n_combinations=0, seed=seed,
    )  # fmt: skip
    return vcjax.prepare(adata, key="condition", control="control")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--p", type=int, default=1000)
    ap.add_argument("--g", type=int, default=8192)
    ap.add_argument("--models", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp

    import vcjax

    screen = synthetic_screen(args.p, args.g)
    (s,) = screen.strata
    rng = np.random.default_rng(1)
    half = np.asarray(s.baselines["technical_duplicate"], np.float32)
    pred = jnp.asarray(half + rng.normal(0, 0.1, half.shape).astype(np.float32))
    truth = jnp.asarray(np.asarray(s.truth, np.float32))
    ref = jnp.asarray(np.asarray(s.reference, np.float32))
    w = jnp.asarray(np.asarray(s.weights, np.float32))
    mask = jnp.asarray(np.asarray(s.deg_mask, bool))

    def engine():
        return vcjax.score(pred, truth, reference=ref, weights=w, mask=mask, metrics=METRICS)

    raw = screen.scorer(metrics=METRICS)
    cal = screen.scorer(metrics=METRICS, calibrated=True)
    stack = jnp.stack([pred + 0.01 * i for i in range(args.models)])
    # as in a training loop: the scorer passed to the jitted step as an argument
    batched = jax.jit(lambda sc, p: jax.vmap(sc.values)(p))

    rows = [
        ("engine (vcjax.score, device arrays)", engine, 1),
        ("scorer", lambda: raw(pred), 1),
        ("scorer, calibrated", lambda: cal(pred), 1),
        (
            f"scorer, vmap over {args.models} models (per model)",
            lambda: batched(raw, stack),
            args.models,
        ),
    ]
    times = {}
    for name, fn, per in rows:
        t = _common.timeit(fn, repeat=args.repeat, warmup=1)
        times[name] = t["median"] / per
    base = times[rows[0][0]]
    got, want = raw(pred), engine()
    diff = max(
        float(np.nanmax(np.abs(np.asarray(got[m], np.float64) - np.asarray(want[m], np.float64))))
        for m in ("mse", "wmse", "pearson_delta", "r2w_delta")
    )
    print(f"P = {args.p:,} × G = {args.g:,}, {len(METRICS)} core metrics, backend "
          f"{jax.default_backend()}; medians of {args.repeat} calls")  # fmt: skip
    print("| path | ms per call | × engine |\n|---|---|---|")
    for name, _, _ in rows:
        print(f"| {name} | {1e3 * times[name]:.1f} | {times[name] / base:.2f} |")
    print(f"max |scorer − engine| over mse, wmse, pearson_delta, r2w_delta: {diff:.2e}")
    print(f"peak RSS {_common.peak_rss_mb():.0f} MiB")


if __name__ == "__main__":
    main()
