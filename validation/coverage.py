"""Empirical coverage of vcjax's cell-bootstrap intervals on simulated screens.

Design (Gaussian cells, known population):

* ``P`` perturbations and a control group; gene ``g`` of a cell of condition ``c`` is
  ``N(μ_cg, σ_g²)``: control ``μ_0g = b_g``; perturbation ``p`` moves ``k`` genes by
  ``±U(0.5, 1.5)·effect`` and every gene by a small shared shift. Values are used as
  log-normalised expression (``normalize=None``).
* A fixed model prediction (the same in every experiment):
  ``ŷ_p = u + shrink·(μ_p − u) + N(0, noise²)`` (``u`` the population mean of the
  condition means), i.e. a model that under-predicts effects and adds gene noise.
* One *experiment* draws the cells, splits each condition into halves (DbD split) and
  runs the point estimate of :func:`vcjax.evaluate` (via :func:`vcjax.prepare` and
  :func:`vcjax.pipeline.score_sources`) plus :func:`vcjax.pipeline.stratum_samples` (cells resampled within
  condition and half, DEG weights refitted per resample) → percentile and BCa intervals for
  the model's R²w(Δ), WMSE and Pearson(Δ) of every perturbation.
* Estimand: the statistic's expected value over repeated experiments, ``E[θ̂_p]``, estimated
  from ``n_estimand`` independent experiments. Their point estimates are computed by the
  resampler's vectorised pipeline (:func:`vcjax.pipeline.sums_scorer`, which the test-suite
  shows equal to evaluate's point path) fed with exactly simulated sufficient statistics (for
  Gaussian cells the half means and variances are independent: mean ``~ N(μ, σ²/n)``,
  ``(n−1)s²/σ² ~ χ²_{n−1}``).
* Also reported: coverage of the *population* (infinite-cell) value, the same pipeline on
  the population means and variances with ``n → ∞`` (every gene with a population effect
  is a DEG and the weights are the min-max of ``|δ_g| / sqrt(σ²_g + σ²_rest,g)``).
  Metrics scored against a noisy truth are biased (WMSE is inflated by the truth's
  sampling variance ``σ²/n₂``; Pearson(Δ) and R²w(Δ) are attenuated), so intervals centred
  on ``E[θ̂]`` under-cover the population value; the table shows by how much.

Run ``python -m validation.coverage`` (``--quick`` for a smoke run); it prints the
markdown table of validation/README.md.
"""

from __future__ import annotations

import argparse
import time

import anndata as ad
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from vcjax import pipeline as PL
from vcjax.metrics import metric_bounds
from vcjax.stats import interval

METRICS = ("r2w_delta", "wmse", "pearson_delta")


# --------------------------------------------------------------------------- design


def design(*, n_perts=12, n_genes=60, k=6, effect=0.6, shift=0.1, shrink=0.6, noise=0.08, seed=0):
    """Population means ``(C, G)`` (row 0 = control), per-gene sd ``(G,)`` and the model ``(P, G)``."""
    rng = np.random.default_rng(seed)
    b = rng.normal(2.0, 0.6, n_genes)
    sd = rng.uniform(0.35, 0.7, n_genes)
    mu = np.tile(b, (n_perts + 1, 1))
    shared = rng.normal(0, shift, n_genes)
    for p in range(1, n_perts + 1):
        genes = rng.choice(n_genes, k, replace=False)
        mu[p] += shared
        mu[p, genes] += rng.choice([-1, 1], k) * rng.uniform(0.5, 1.5, k) * effect
    u = mu.mean(0)
    model = u + shrink * (mu[1:] - u) + rng.normal(0, noise, (n_perts, n_genes))
    return mu, sd, model


def names(n_perts):
    return ["control"] + [f"P{p:02d}" for p in range(1, n_perts + 1)]


def simulate_cells(mu, sd, n_cells, n_control, rng):
    """AnnData of Gaussian cells (conditions in blocks) and the condition labels."""
    nm = names(mu.shape[0] - 1)
    sizes = [n_control] + [n_cells] * (mu.shape[0] - 1)
    lab = np.repeat(nm, sizes)
    code = np.repeat(np.arange(mu.shape[0]), sizes)
    X = mu[code] + rng.standard_normal((code.size, mu.shape[1])) * sd
    a = ad.AnnData(
        X=X.astype(np.float64),
        obs=pd.DataFrame({"condition": lab}, index=[f"c{i}" for i in range(lab.size)]),
    )
    a.var_names = [f"G{g:03d}" for g in range(mu.shape[1])]
    return a


def _screen(adata):
    return PL.prepare(adata, key="condition", control="control", normalize=None)


def _point(screen, model):
    (stratum,) = screen.strata
    preds = {"model": model, **stratum.baselines}
    v = PL.score_sources(stratum, screen.spec, preds, list(METRICS), PL.ScoreSpec())
    return {m: v["model"][m] for m in METRICS}


# --------------------------------------------------------------------------- estimands


def _stats_batch(mu, sd, n1, n2, n_exp, rng) -> PL.Sums:
    """Exact sufficient statistics of ``n_exp`` experiments (each ``(n_exp, C, G)``)."""
    C, G = mu.shape
    out = []
    for n in (n1, n2):
        nn = n[:, None]
        mean = mu[None] + rng.standard_normal((n_exp, C, G)) * sd / np.sqrt(nn)
        ss = rng.chisquare(nn - 1, size=(n_exp, C, G)) * sd**2  # Σ (x − x̄)²
        out += [nn * mean, ss + nn * mean**2]
    return PL.Sums(n1, n2, *(jnp.asarray(a) for a in out))


def estimands(screen, model, mu, sd, *, n_exp=20000, seed=1, batch=500):
    """``E[θ̂_p]`` over ``n_exp`` experiments and the population value, per metric ``(P,)``."""
    (stratum,) = screen.strata
    with jax.enable_x64(True):
        fn, sources = PL.sums_scorer(stratum, screen.spec, model=model, metrics=METRICS)
        row = sources.index("model")
        n1 = np.asarray(stratum.stats.half1.n, float)
        n2 = np.asarray(stratum.stats.half2.n, float)
        rng = np.random.default_rng(seed)
        acc = {m: [] for m in METRICS}
        for s in range(0, n_exp, batch):
            out = fn(_stats_batch(mu, sd, n1, n2, min(batch, n_exp - s), rng))
            for m in METRICS:
                acc[m].append(np.asarray(out[m])[row])
        expected = {m: np.nanmean(np.concatenate(acc[m]), axis=0) for m in METRICS}
        nan_frac = {m: float(np.mean(np.isnan(np.concatenate(acc[m])))) for m in METRICS}
        # population: huge n with exact means and variances
        big = np.full_like(n1, 1e8)
        pop = [jnp.asarray((big[:, None] * a)[None]) for a in (mu, sd**2 + mu**2)]
        pop_out = fn(PL.Sums(big, big, pop[0], pop[1], pop[0], pop[1]))
        population = {m: np.asarray(pop_out[m])[row, 0] for m in METRICS}
    return expected, population, nan_frac


# --------------------------------------------------------------------------- coverage


def run(
    *,
    n_rep=400,
    n_boot=1000,
    ci=0.95,
    n_cells=80,
    n_control=160,
    n_estimand=20000,
    seed=0,
    verbose=True,
    **design_kw,
):
    """Coverage table (DataFrame) of percentile and BCa intervals; see the module docstring."""
    mu, sd, model = design(seed=seed, **design_kw)
    rng = np.random.default_rng(seed + 1000)
    screen0 = _screen(simulate_cells(mu, sd, n_cells, n_control, rng))
    t0 = time.time()
    expected, population, est_nan = estimands(
        screen0, model, mu, sd, n_exp=n_estimand, seed=seed + 1
    )
    t_est = time.time() - t0
    kinds = [(meth, tg) for tg in ("expected", "population") for meth in ("percentile", "bca")]
    sane = {(m, k): [] for m in METRICS for k in kinds}  # in range and containing θ̂
    hits = {(m, k, tgt): [] for m in METRICS for k in kinds for tgt in ("E", "pop")}
    widths = {(m, k): [] for m in METRICS for k in kinds}
    boot_nan = {m: [] for m in METRICS}
    point_all = {m: [] for m in METRICS}
    t0 = time.time()
    for rep in range(n_rep):
        adata = simulate_cells(mu, sd, n_cells, n_control, rng)
        screen = _screen(adata)
        point = _point(screen, model)
        res = PL.stratum_samples(
            screen.strata[0],
            screen.spec,
            model=model,
            metrics=METRICS,
            score=PL.ScoreSpec(),
            boot=PL.BootSpec(n_boot=n_boot, seed=seed * 100003 + rep),
        )
        for m in METRICS:
            samp = res["values"]["model"][m].T  # (P, B)
            boot_nan[m].append(np.mean(np.isnan(samp)))
            point_all[m].append(point[m])
            for kd in kinds:
                lo, hi = interval(
                    samp, point[m], ci=ci, method=kd[0], target=kd[1], bounds=metric_bounds(m)
                )
                ok = np.isfinite(lo) & np.isfinite(hi)
                sane[(m, kd)].append(np.where(ok, _sane(m, lo, hi, point[m]), np.nan))
                hits[(m, kd, "E")].append(
                    np.where(ok, (lo <= expected[m]) & (expected[m] <= hi), np.nan)
                )
                hits[(m, kd, "pop")].append(
                    np.where(ok, (lo <= population[m]) & (population[m] <= hi), np.nan)
                )
                widths[(m, kd)].append(np.nanmean(hi - lo))
        if verbose and (rep + 1) % max(1, n_rep // 10) == 0:
            print(f"  rep {rep + 1}/{n_rep}  ({time.time() - t0:.0f} s)", flush=True)
    rows = []
    for m in METRICS:
        pts = np.array(point_all[m])
        for kd in kinds:
            meth = f"{kd[0]} (target={kd[1]})"
            cov_e = np.array(hits[(m, kd, "E")])
            cov_p = np.array(hits[(m, kd, "pop")])
            n_int = int(np.isfinite(cov_e).sum())
            ce = float(np.nanmean(cov_e))
            rows.append(
                dict(
                    metric=m,
                    method=meth,
                    coverage_E=ce,
                    mc_se=float(np.sqrt(ce * (1 - ce) / max(n_int, 1))),
                    coverage_population=float(np.nanmean(cov_p)),
                    n_intervals=n_int,
                    mean_width=float(np.mean(widths[(m, kd)])),
                    mean_point=float(np.nanmean(pts)),
                    mean_E=float(np.mean(expected[m])),
                    mean_population=float(np.mean(population[m])),
                    boot_nan_frac=float(np.mean(boot_nan[m])),
                    sane=float(np.nanmean(np.array(sane[(m, kd)]))),
                )
            )
    table = pd.DataFrame(rows)
    table.attrs.update(
        seconds_estimand=t_est,
        seconds_reps=time.time() - t0,
        estimand_nan=est_nan,
        sd_point={m: float(np.nanmean(np.nanstd(np.array(point_all[m]), axis=0))) for m in METRICS},
    )
    return table


#: the closed range of each metric: (low, high), written out independently of the registry
_RANGE = {"r2w_delta": (-np.inf, 1.0), "wmse": (0.0, np.inf), "pearson_delta": (-1.0, 1.0)}


def _sane(metric, lo, hi, est):
    """Whether each interval lies in the metric's range and contains its estimate."""
    a, b = _RANGE[metric]
    return (lo >= a) & (hi <= b) & (lo <= est) & (est <= hi)


def coverage_of_mean(*, n_rep=300, n_cells=40, n_boot=400, ci=0.9, seed=0) -> dict[str, float]:
    """Coverage of the population mean of Gaussian data by percentile and BCa intervals of
    the sample mean, using :func:`vcjax.pipeline.multiplicity_weights` (fast sanity check)."""
    rng = np.random.default_rng(seed)
    W = np.asarray(
        PL.multiplicity_weights(jax.random.PRNGKey(seed), [n_cells], n_boot), dtype=np.float64
    )
    x = rng.standard_normal((n_rep, n_cells))
    est = x.mean(1)
    samples = x @ W.T / n_cells  # (n_rep, n_boot): resampled means, one weight matrix reused
    out = {}
    for meth in ("percentile", "bca"):
        lo, hi = interval(samples, est, ci=ci, method=meth, target="expected")
        out[meth] = float(np.mean((lo <= 0) & (0 <= hi)))
    return out


def markdown(table: pd.DataFrame) -> str:
    lines = [
        "| metric | method | coverage of E[θ̂] | ± MC s.e. | coverage of population value | mean width | mean θ̂ | E[θ̂] | population | NaN resamples | in range, contains θ̂ |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in table.itertuples():
        lines.append(
            f"| {r.metric} | {r.method} | {100 * r.coverage_E:.1f}% | {100 * r.mc_se:.1f} | "
            f"{100 * r.coverage_population:.1f}% | {r.mean_width:.4f} | {r.mean_point:.4f} | {r.mean_E:.4f} | "
            f"{r.mean_population:.4f} | {100 * r.boot_nan_frac:.2f}% | {100 * r.sane:.1f}% |"
        )
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="40 repetitions, 300 resamples")
    ap.add_argument("--reps", type=int, default=400)
    ap.add_argument("--boot", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    n_rep, n_boot = (40, 300) if args.quick else (args.reps, args.boot)
    t = time.time()
    table = run(n_rep=n_rep, n_boot=n_boot, seed=args.seed)
    print(markdown(table))
    print(
        f"\nreps={n_rep} n_boot={n_boot}; estimand {table.attrs['seconds_estimand']:.0f} s, "
        f"repetitions {table.attrs['seconds_reps']:.0f} s, total {time.time() - t:.0f} s; "
        f"sd of θ̂ per perturbation: {table.attrs['sd_point']}; estimand NaN fraction {table.attrs['estimand_nan']}"
    )
    return table


if __name__ == "__main__":
    main()
