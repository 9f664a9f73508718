"""Bootstrap interval maths: percentile and BCa intervals, bias centring, the jackknife.

* *percentile*: the ``(1 − ci)/2`` and ``(1 + ci)/2`` quantiles (linear interpolation, as
  ``numpy.quantile``) of the resampled values, NaN resamples ignored.
* *BCa* (Efron 1987): bias correction ``z0 = Φ⁻¹(#{θ* < θ̂}/B + ½·#{θ* = θ̂}/B)`` (ties
  counted half; the proportion is clipped to ``[½/B, 1 − ½/B]`` so that ``z0`` stays
  finite) and acceleration ``a`` — by default ``a = γ*/6`` from the skewness ``γ*`` of the
  resampled values (first-order correct for a statistic linear in the resampled units, see
  :func:`bca_interval`), or the exact jackknife ``a = Σ d³ / (6 (Σ d²)^{3/2})``,
  ``d_i = θ̄_(·) − θ_(i)`` (as ``scipy.stats.bootstrap``; :func:`jackknife_acceleration`).
* *centring* (:func:`center_samples`): ``θ* − (mean(θ*) − θ̂)``, for intervals around the
  expected value of the estimate rather than the population value.

:func:`bootstrap_metric` bootstraps any traceable statistic of row-aligned arrays.

References:
  Efron, B. (1987). Better bootstrap confidence intervals. JASA 82, 171–185.
  Efron & Tibshirani (1993), *An Introduction to the Bootstrap*, ch. 14 and 22.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from jax.typing import ArrayLike
from scipy import special

__all__ = [
    "TIE_TOL",
    "BootstrapResult",
    "bca_interval",
    "bootstrap_metric",
    "center_samples",
    "draw_within_groups",
    "interval",
    "jackknife_acceleration",
    "per_cell_groups",
    "paired_summary",
    "percentile_interval",
    "ties",
    "win_rate",
]


def draw_within_groups(key: jax.Array, starts: jax.Array, sizes: jax.Array) -> jax.Array:
    """Indices of one resample: draw ``j`` of group ``g`` picks ``starts[g] + U{0..n_g−1}``.

    ``starts``/``sizes`` are given per draw (cell), so a group of ``n`` cells gets ``n``
    independent uniform picks among its own cells.
    """
    return starts + jax.random.randint(key, sizes.shape, 0, jnp.maximum(sizes, 1), jnp.int32)


def per_cell_groups(group_sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sizes = np.asarray(group_sizes, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    return np.repeat(starts, sizes).astype(np.int32), np.repeat(sizes, sizes).astype(np.int32)


def _sorted_valid(samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = np.sort(samples, axis=-1)  # NaN last
    return s, np.sum(np.isfinite(samples), axis=-1)


def _rowwise_quantile(sorted_s: np.ndarray, n_valid: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Linear-interpolation quantile (numpy's default) of the first ``n_valid`` values per row."""
    q = np.broadcast_to(np.asarray(q, dtype=np.float64), n_valid.shape)
    pos = q * np.maximum(n_valid - 1, 0)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, np.maximum(n_valid - 1, 0))
    frac = pos - lo
    lo_v = np.take_along_axis(sorted_s, lo[..., None], axis=-1)[..., 0]
    hi_v = np.take_along_axis(sorted_s, hi[..., None], axis=-1)[..., 0]
    with np.errstate(invalid="ignore"):
        out = lo_v + (hi_v - lo_v) * frac
        out = np.where(frac == 0, lo_v, out)
    return np.where(n_valid > 0, out, np.nan)


def percentile_interval(samples: ArrayLike, *, ci: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval over the last axis, ignoring NaN resamples.

    Returns:
      ``(low, high)``: the ``(1−ci)/2`` and ``(1+ci)/2`` quantiles (linear interpolation);
      NaN where no resample is finite.
    """
    s, n = _sorted_valid(np.asarray(samples, dtype=np.float64))
    a = (1.0 - ci) / 2.0
    return _rowwise_quantile(s, n, a), _rowwise_quantile(s, n, 1.0 - a)


def _skewness(samples: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mu = np.nanmean(samples, axis=-1, keepdims=True)
        d = samples - mu
        m2 = np.nanmean(d * d, axis=-1)
        m3 = np.nanmean(d * d * d, axis=-1)
        g = m3 / m2**1.5
    return np.where(m2 > 0, g, 0.0)


def bca_interval(
    samples: ArrayLike,
    estimate: ArrayLike,
    *,
    ci: float = 0.95,
    acceleration: ArrayLike | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Bias-corrected and accelerated interval over the last axis (Efron 1987).

    ``z0 = Φ⁻¹(p)`` with ``p = (#{θ* < θ̂} + ½ #{θ* = θ̂}) / B`` over the finite resamples,
    clipped to ``[½/B, 1 − ½/B]``; with ``z_α = Φ⁻¹(α)`` the interval is the percentile
    interval at ``α' = Φ(z0 + (z0 + z_α)/(1 − a (z0 + z_α)))`` for ``α = (1∓ci)/2``.

    Args:
      samples: ``(..., B)`` resampled values (NaN ignored).
      estimate: ``(...)`` point estimates θ̂.
      ci: coverage.
      acceleration: ``(...)`` acceleration ``a``; default ``skewness(θ*)/6`` (see the
        module docstring). Pass a jackknife value for the classical BCa.

    Returns:
      ``(low, high)``; NaN where the estimate is NaN or no resample is finite.
    """
    x = np.asarray(samples, dtype=np.float64)
    est = np.asarray(estimate, dtype=np.float64)
    s, n = _sorted_valid(x)
    with np.errstate(invalid="ignore", divide="ignore"):
        below = np.sum(x < est[..., None], axis=-1) + 0.5 * np.sum(x == est[..., None], axis=-1)
        nn = np.maximum(n, 1)
        prop = np.clip(below / nn, 0.5 / nn, 1.0 - 0.5 / nn)
        z0 = special.ndtri(prop)
        a = (
            _skewness(x) / 6.0
            if acceleration is None
            else np.asarray(acceleration, dtype=np.float64)
        )
        a = np.where(np.isfinite(a), a, 0.0)
        # The BCa map is monotone only while 1 − a(z0 + z_α) > 0 at both ends; where a very
        # skewed (e.g. nearly constant) resample distribution breaks that, use a = 0 (BC).
        z_ends = [z0 + special.ndtri(al) for al in ((1.0 - ci) / 2.0, (1.0 + ci) / 2.0)]
        a = np.where((1.0 - a * z_ends[0] > 0) & (1.0 - a * z_ends[1] > 0), a, 0.0)
        out = []
        for z in z_ends:
            q = special.ndtr(z0 + z / (1.0 - a * z))
            q = np.where(np.isfinite(q), q, 0.5)
            out.append(_rowwise_quantile(s, n, q))
    bad = ~np.isfinite(est)
    return np.where(bad, np.nan, out[0]), np.where(bad, np.nan, out[1])


def center_samples(samples: ArrayLike, estimate: ArrayLike) -> np.ndarray:
    """Remove the bootstrap bias estimate: ``θ* − (mean(θ*) − θ̂)`` over the last axis (NaN ignored).

    The bootstrap distribution of a plug-in statistic is centred near
    ``θ̂ + (E[θ̂] − θ_pop)``: it estimates the bias relative to the *population* value.
    Quantiles of the centred resamples give intervals for ``E[θ̂]``, the value the same
    experiment would give on average (``target="expected"``).
    """
    x = np.asarray(samples, dtype=np.float64)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        bias = np.nanmean(x, axis=-1) - np.asarray(estimate, dtype=np.float64)
    return x - bias[..., None]


def interval(
    samples,
    estimate,
    *,
    ci,
    method,
    acceleration=None,
    target="population",
    bounds=(-np.inf, np.inf),
):
    """A bootstrap interval over the last axis, inside the statistic's range, containing its
    estimate.

    ``target="expected"`` first removes the bootstrap's bias estimate from the resamples
    (:func:`center_samples`: an interval for the value the same experiment gives on average),
    then the percentile or BCa interval is taken. A shift can carry an end past the range
    of the statistic (a correlation above 1, an error below 0): the ends are clipped to
    ``bounds``, which changes the coverage of no value inside the range (an interval
    covers such a value after clipping exactly when it did before). Finally each interval is
    widened, if need be, to contain its finite estimate.

    Args:
      samples: ``(..., B)`` resampled values (NaN ignored).
      estimate: ``(...)`` point estimates.
      ci: coverage.
      method: ``"percentile"`` or ``"bca"``.
      acceleration: BCa's acceleration (:func:`bca_interval`).
      target: ``"expected"`` or ``"population"`` (the quantiles of the resamples themselves).
      bounds: ``(low, high)``, the closed range of the statistic
        (:func:`vcjax.metrics.metric_bounds`).

    Returns:
      ``(low, high)``; NaN where the estimate is not finite or no resample is.
    """
    est = np.asarray(estimate, dtype=np.float64)
    if target == "expected":
        samples = center_samples(samples, est)
    elif target != "population":
        raise ValueError(f"target must be 'expected' or 'population', got {target!r}")
    if method == "percentile":
        lo, hi = percentile_interval(samples, ci=ci)
    elif method == "bca":
        lo, hi = bca_interval(samples, est, ci=ci, acceleration=acceleration)
    else:
        raise ValueError(f"ci method must be 'percentile' or 'bca', got {method!r}")
    low, high = (float(b) for b in bounds)
    ok = np.isfinite(est) & np.isfinite(lo) & np.isfinite(hi)
    with np.errstate(invalid="ignore"):
        lo = np.where(ok, np.minimum(np.clip(lo, low, high), est), np.nan)
        hi = np.where(ok, np.maximum(np.clip(hi, low, high), est), np.nan)
    return lo, hi


#: a paired difference within this, relative to ``max(1, |a|, |b|)``, is a tie: float32
#: round-off of the values compared (documented in docs/metrics.md §11)
TIE_TOL = 6e-8


def ties(a, b) -> np.ndarray:
    """Where ``a`` and ``b`` are equal within :data:`TIE_TOL` (relative); infinite values
    tie only an equal value, NaN nothing."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        close = np.abs(a - b) <= TIE_TOL * np.maximum(1.0, np.maximum(np.abs(a), np.abs(b)))
        return (a == b) | (close & np.isfinite(a) & np.isfinite(b))


def win_rate(a, b) -> np.ndarray:
    """Share of the paired resamples (last axis) in which ``a`` beats ``b`` (larger is
    better), a tie (:func:`ties`) counting one half; resamples where either is not finite
    are left out (NaN where none is finite).

    Args:
      a, b: ``(..., B)`` paired resampled values, oriented so that larger is better.

    Returns:
      ``(...)`` win rates in ``[0, 1]``.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    fin = np.isfinite(a) & np.isfinite(b)
    tie = ties(a, b) & fin
    with np.errstate(invalid="ignore"):
        wins = np.sum((a > b) & fin & ~tie, axis=-1) + 0.5 * np.sum(tie, axis=-1)
        return wins / np.where(fin.any(axis=-1), fin.sum(axis=-1), np.nan)


def jackknife_acceleration(theta_jack: np.ndarray) -> np.ndarray:
    """``a = Σ d³ / (6 (Σ d²)^{3/2})``, ``d = mean(θ_(i)) − θ_(i)`` over the last axis."""
    with np.errstate(invalid="ignore", divide="ignore"):
        d = np.nanmean(theta_jack, axis=-1, keepdims=True) - theta_jack
        num = np.nansum(d**3, axis=-1)
        den = 6.0 * np.nansum(d**2, axis=-1) ** 1.5
        return np.where(den > 0, num / den, 0.0)


# =========================================================================== generic API


@dataclasses.dataclass(frozen=True)
class BootstrapResult:
    """Result of :func:`bootstrap_metric`.

    Attributes:
      estimate: the statistic on the original data.
      ci_low, ci_high: interval endpoints.
      samples: ``(n_boot, ...)`` resampled statistics.
      nan_fraction: fraction of resamples that were NaN (ignored).
    """

    estimate: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray
    samples: np.ndarray
    nan_fraction: np.ndarray


def bootstrap_metric(
    fn: Callable[..., ArrayLike],
    *arrays: ArrayLike,
    n_boot: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
    method: str = "percentile",
    groups: ArrayLike | None = None,
    chunk_size: int = 256,
) -> BootstrapResult:
    """Bootstrap any jnp statistic of row-aligned arrays (paired resampling of rows).

    Resample ``r`` draws ``n`` rows with replacement (within each group of ``groups`` when
    given, a stratified bootstrap), applies the *same* row indices to every array and calls
    ``fn``. ``fn`` must be traceable (jnp) and return a scalar or a fixed-shape array; it
    is vmapped over chunks of ``chunk_size`` resamples. Rows of resample ``r`` depend only
    on ``seed`` and ``r``.

    BCa uses the jackknife (leave-one-row-out, ``n`` evaluations) for the acceleration, as
    ``scipy.stats.bootstrap``; NaN resamples are ignored.

    Example::

        res = bootstrap_metric(lambda p, t: vcjax.metrics.pearson(p, t), pred, truth,
                               n_boot=2000, method="bca")

    Args:
      fn: statistic ``fn(*arrays) -> (...)``.
      *arrays: arrays with a common leading axis ``n``.
      n_boot: resamples.
      seed: seed (``jax.random``).
      ci: coverage.
      method: ``"percentile"`` or ``"bca"``.
      groups: optional ``(n,)`` strata labels.
      chunk_size: resamples evaluated per vmapped call.

    Returns:
      :class:`BootstrapResult`.
    """
    arrs = [jnp.asarray(a) for a in arrays]
    n = int(arrs[0].shape[0])
    if any(int(a.shape[0]) != n for a in arrs):
        raise ValueError("all arrays must share the leading axis")
    if groups is None:
        order = np.arange(n)
        sizes = np.array([n])
    else:
        codes, _ = pd.factorize(np.asarray(groups))
        order = np.argsort(codes, kind="stable")
        sizes = np.bincount(codes)
    starts, per = per_cell_groups(sizes)
    order_j, starts_j, per_j = jnp.asarray(order), jnp.asarray(starts), jnp.asarray(per)
    key = jax.random.PRNGKey(seed)

    @jax.jit
    def chunk(rs):
        def one(r):
            idx = order_j[draw_within_groups(jax.random.fold_in(key, r), starts_j, per_j)]
            return jnp.asarray(fn(*[a[idx] for a in arrs]))

        return jax.vmap(one)(rs)

    est = np.asarray(fn(*arrs), dtype=np.float64)
    parts = []
    for s in range(0, n_boot, chunk_size):
        rs = jnp.arange(s, min(s + chunk_size, n_boot))
        parts.append(np.asarray(chunk(rs), dtype=np.float64))
    samples = np.concatenate(parts, axis=0)
    moved = np.moveaxis(samples, 0, -1)
    acc = None
    if method == "bca":
        loo = np.array([np.delete(np.arange(n), i) for i in range(n)])
        jk = jax.jit(jax.vmap(lambda idx: jnp.asarray(fn(*[a[idx] for a in arrs]))))(
            jnp.asarray(loo)
        )
        acc = jackknife_acceleration(np.moveaxis(np.asarray(jk, dtype=np.float64), 0, -1))
    lo, hi = interval(moved, est, ci=ci, method=method, acceleration=acc)
    return BootstrapResult(
        estimate=est,
        ci_low=lo,
        ci_high=hi,
        samples=samples,
        nan_fraction=np.mean(~np.isfinite(samples), axis=0),
    )


def paired_summary(
    diff: np.ndarray,
    ci_low: np.ndarray | None = None,
    ci_high: np.ndarray | None = None,
    win_rate: np.ndarray | None = None,
    *,
    ci: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> dict[str, float]:
    """The median over perturbations of a per-perturbation paired difference, with an interval
    (what the evaluation report's verdict states).

    The interval resamples the perturbations (with replacement) and, within each, draws the
    difference from a normal with that perturbation's cell-bootstrap interval
    (``sd = (ci_high − ci_low) / (2 z)``): it covers both another draw of cells and another
    draw of perturbations like these. Without ``ci_low``/``ci_high`` (no bootstrap) the
    interval is NaN.

    Returns:
      ``median``, ``low``, ``high``, ``n`` (finite differences), ``better``/``worse``
      (perturbations whose own interval is above/below 0; NaN without intervals),
      ``win_rate`` (mean over perturbations; NaN without).
    """
    d = np.asarray(diff, float)
    fin = np.isfinite(d)
    n = int(fin.sum())
    out = dict(median=np.nan, low=np.nan, high=np.nan, n=n, better=np.nan, worse=np.nan)
    out["win_rate"] = np.nan
    if n == 0:
        return out
    out["median"] = float(np.median(d[fin]))
    if win_rate is not None and np.isfinite(np.asarray(win_rate, float)[fin]).any():
        out["win_rate"] = float(np.nanmean(np.asarray(win_rate, float)[fin]))
    if ci_low is None or ci_high is None:
        return out
    lo, hi = np.asarray(ci_low, float)[fin], np.asarray(ci_high, float)[fin]
    if not (np.isfinite(lo) | np.isfinite(hi)).any():
        return out
    out["better"], out["worse"] = int(np.sum(lo > 0)), int(np.sum(hi < 0))
    z = float(special.ndtri(0.5 + ci / 2))
    sd = np.where(np.isfinite(hi - lo), (hi - lo) / (2 * z), 0.0)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_resamples, n))
    draws = d[fin][idx] + rng.standard_normal((n_resamples, n)) * sd[idx]
    meds = np.median(draws, axis=1)
    out["low"], out["high"] = (float(q) for q in np.quantile(meds, [(1 - ci) / 2, (1 + ci) / 2]))
    return out
