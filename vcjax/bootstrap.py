"""Bootstrap confidence intervals: cells resampled within conditions, everything recomputed.

Two resampling schemes:

* **Cells** (:func:`add_intervals`, called by :func:`vcjax.evaluate` with ``n_boot > 0``).
  The cells of every condition (each perturbation *and* the control group) are resampled
  with replacement *within each technical-duplicate half*, so every group keeps its size.
  A resample is represented by integer multiplicity weights ``w_ri`` on the cells (one
  multinomial draw per group-half, :func:`multiplicity_weights`): the resampled sufficient
  statistics are ``Σ_i w_ri x_i`` and ``Σ_i w_ri x_i²`` per group, a weights ``@`` cells
  product (:func:`resampled_group_moments`), never a copy of the data per resample. From
  them, per resample and fully vectorised over the resamples of a chunk: the truth (half-2
  means), ``u_ALL`` of half 1 and of all cells, ``u_NTC``, the delta reference, the DEG
  t-scores (:func:`vcjax.deg.t_from_moments`), p-values, BH, logFC, the DEG weights
  (:func:`vcjax.deg.minmax_weights`) and DEG sets, the data-dependent baselines (technical
  duplicate, control mean, dataset mean, null with the *same* derangement as the point
  estimate, additive, leave-one-out mean, interpolated duplicate), and every metric of the
  model and of every baseline on the *same* resamples (paired). The model's prediction is
  fixed. DbD's gates are applied per resample (no DEGs → WMSE, R²w(Δ) and Pearson(Δ) on
  DEGs are NaN; dataset-mean Pearson metrics NaN).
* **Perturbations** (:func:`summary_intervals`): intervals for dataset-level means or
  medians over perturbations, resampling the perturbations' per-perturbation values.

Intervals (:func:`percentile_interval`, :func:`bca_interval`):

* *percentile*: the ``(1 − ci)/2`` and ``(1 + ci)/2`` quantiles (linear interpolation, as
  ``numpy.quantile``) of the resampled values.
* *BCa* (Efron 1987): bias correction ``z0 = Φ⁻¹(#{θ* < θ̂}/B + ½·#{θ* = θ̂}/B)`` (ties
  counted half; the proportion is clipped to ``[½/B, 1 − ½/B]`` so that ``z0`` stays
  finite) and acceleration ``a``. For the cell bootstrap a jackknife over cells would need
  one full evaluation per cell, so ``a`` is estimated from the resample distribution as
  ``a = γ*/6``, ``γ*`` the sample skewness of the resampled values. For a statistic that is
  linear in the cells, ``θ* − θ̂ = Σ_i (w_i − 1) L_i / n`` with empirical influence values
  ``L_i``, whose skewness is ``Σ L³ / (Σ L²)^{3/2}`` — exactly ``6a`` of the jackknife
  formula — so the estimate is first-order correct; curvature (non-linearity) enters both
  and is not separated. :func:`bootstrap_metric` and :func:`summary_intervals` use the
  exact jackknife acceleration ``a = Σ d³ / (6 (Σ d²)^{3/2})``, ``d_i = θ̄_(·) − θ_(i)``
  (as ``scipy.stats.bootstrap``).

NaN rules: resamples in which a value is NaN (an undefined metric, a gate that fired in
that resample) are ignored for that row; the fraction ignored is reported in the column
``boot_nan_frac``. A row whose point estimate is NaN gets NaN intervals. A row with no
finite resample gets NaN intervals.

Comparisons: for each baseline ``b`` and metric, rows with ``source = "model-vs-<b>"``,
``value = s·(m_model − m_b)`` with ``s = +1`` for higher-is-better metrics and ``−1`` for
errors, so **positive always means the model is better**; ``ci_low``/``ci_high`` are the
interval of the paired resampled differences and ``win_rate`` is the fraction of the
resamples (both values finite) in which the model is strictly better.

Reproducibility: resample ``r`` of context (covariate) ``j`` uses the key
``fold_in(fold_in(PRNGKey(seed), j), r)``, so the same seed gives identical intervals and
the results do not depend on the chunk size (number of resamples evaluated at once). Peak
memory of the resampling is ``O(chunk × groups × genes)`` plus the cell matrix (held once,
dense, in the blocked layout below) and is independent of ``n_boot``; the stored resampled
values are ``n_boot × rows`` (float32, float64 under x64).

Layout: the cells of each group-half are cut into blocks of ``L`` cells (zero-padded), so
the resampled sums are one batched ``(chunk × L) @ (L × 2G)`` product per block; a
group-half takes its first block and adds its others (only large groups, such as the
controls, have more than one). The values are not centred before squaring, so a
gene that is zero in every drawn cell of a group has a variance of exactly 0, as in
:func:`vcjax.data.group_stats` (float32 variances of log-normalised data lose about
``eps · E[x²]/Var[x]`` relative precision to cancellation).

References:
  Efron, B. (1987). Better bootstrap confidence intervals. JASA 82, 171–185.
  Efron & Tibshirani (1993), *An Introduction to the Bootstrap*, ch. 14 and 22.
  Hill, G. W. (1970). Algorithm 395: Student's t-distribution. CACM 13, 617–619.
  METRICS.md §2–§5.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import logging
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jax.typing import ArrayLike
from scipy import special

from vcjax import baselines as B
from vcjax import data as D
from vcjax import deg as DEG
from vcjax import engine
from vcjax import metrics as M
from vcjax.engine import METRICS as ENGINE_METRICS
from vcjax.evaluate import _CTRL_METRICS, _DEG_GATED, _PEARSON_LIKE

__all__ = [
    "add_intervals",
    "summary_intervals",
    "bootstrap_metric",
    "BootstrapResult",
    "multiplicity_weights",
    "resampled_group_moments",
    "percentile_interval",
    "center_samples",
    "bca_interval",
    "student_t_pvalues_fast",
    "context_samples",
    "context_key",
]

log = logging.getLogger("vcjax")

_DEG_ALPHA = 0.05


# =========================================================================== keys & weights


def context_key(seed: int, index: int) -> jax.Array:
    """The key of context (covariate value) ``index``: ``fold_in(PRNGKey(seed), index)``."""
    return jax.random.fold_in(jax.random.PRNGKey(seed), index)


@functools.partial(jax.jit, static_argnames="n")
def _resample_keys(key: jax.Array, start, *, n: int) -> jax.Array:
    """The keys ``fold_in(key, r)`` of resamples ``r = start .. start + n - 1`` (one compiled
    function per ``n``, not a retrace per chunk)."""
    return jax.vmap(lambda r: jax.random.fold_in(key, r))(start + jnp.arange(n))


def _draw(key: jax.Array, starts: jax.Array, sizes: jax.Array) -> jax.Array:
    """Indices of one resample: draw ``j`` of group ``g`` picks ``starts[g] + U{0..n_g−1}``.

    ``starts``/``sizes`` are given per draw (cell), so a group of ``n`` cells gets ``n``
    independent uniform picks among its own cells.
    """
    return starts + jax.random.randint(key, sizes.shape, 0, jnp.maximum(sizes, 1), jnp.int32)


def _per_cell(group_sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sizes = np.asarray(group_sizes, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    return np.repeat(starts, sizes).astype(np.int32), np.repeat(sizes, sizes).astype(np.int32)


@functools.partial(jax.jit, static_argnames=("n_cells",))
def _weights_chunk(
    keys: jax.Array, starts: jax.Array, sizes: jax.Array, *, n_cells: int
) -> jax.Array:
    def one(k):
        idx = _draw(k, starts, sizes)
        return jnp.zeros((n_cells,), jnp.int32).at[idx].add(1)

    return jax.vmap(one)(keys)


def multiplicity_weights(
    key: jax.Array, group_sizes: ArrayLike, n_boot: int, *, start: int = 0
) -> jax.Array:
    """Integer multiplicity weights of ``n_boot`` within-group bootstrap resamples.

    The cells are ordered group by group (the first ``group_sizes[0]`` cells are group 0,
    …). Resample ``r`` (key ``fold_in(key, start + r)``) draws, for each group of ``n``
    cells, ``n`` cells uniformly with replacement among that group's cells; ``w_ri`` is the
    number of times cell ``i`` was drawn, so ``Σ_{i∈g} w_ri = n_g`` (a multinomial
    ``Mult(n_g, 1/n_g)`` per group). ``Σ_i w_ri f(x_i)`` is then the resampled sum of any
    per-cell quantity.

    Args:
      key: a ``jax.random`` key.
      group_sizes: ``(C,)`` cells per group.
      n_boot: number of resamples.
      start: index of the first resample (resample ``r`` depends only on ``key`` and
        ``start + r``, so chunks of resamples can be generated independently).

    Returns:
      ``(n_boot, N)`` int32 weights, ``N = Σ group_sizes``.
    """
    starts, sizes = _per_cell(np.asarray(group_sizes))
    keys = _resample_keys(key, start, n=n_boot)
    return _weights_chunk(keys, jnp.asarray(starts), jnp.asarray(sizes), n_cells=int(starts.size))


def resampled_group_moments(
    X: ArrayLike, codes: ArrayLike, weights: ArrayLike, *, n_groups: int | None = None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-group weighted count, sum and sum of squares for each resample.

    .. math:: n_{rc} = \\sum_{i: c(i)=c} w_{ri},\\quad S_{rc} = \\sum_{i: c(i)=c} w_{ri} x_i,
              \\quad Q_{rc} = \\sum_{i: c(i)=c} w_{ri} x_i^2

    Mean ``S/n`` and unbiased variance ``(Q/n − (S/n)²)·n/(n−1)`` (scanpy's convention,
    :mod:`vcjax.data`) follow. A product ``(B × N) @ (N × G)`` per group via a one-hot
    matrix: meant for user-sized arrays (for whole screens :func:`add_intervals` uses a
    blocked layout).

    Args:
      X: ``(N, G)`` cell values.
      codes: ``(N,)`` integer group code per cell (``0..C−1``).
      weights: ``(B, N)`` multiplicities (e.g. :func:`multiplicity_weights`).
      n_groups: ``C``; default ``max(codes) + 1``.

    Returns:
      ``(n, S, Q)`` with shapes ``(B, C)``, ``(B, C, G)``, ``(B, C, G)``.
    """
    X = jnp.asarray(X)
    codes_np = np.asarray(codes)
    C = int(n_groups if n_groups is not None else codes_np.max() + 1)
    w = jnp.asarray(weights).astype(
        X.dtype if jnp.issubdtype(X.dtype, jnp.floating) else jnp.float32
    )
    onehot = jax.nn.one_hot(jnp.asarray(codes_np), C, dtype=w.dtype)  # (N, C)
    wc = w[:, :, None] * onehot[None]  # (B, N, C)
    n = jnp.sum(wc, axis=1)
    S = jnp.einsum("bnc,ng->bcg", wc, X)
    Q = jnp.einsum("bnc,ng->bcg", wc, X * X)
    return n, S, Q


# =========================================================================== intervals


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


def _interval(samples, estimate, *, ci, method, acceleration=None, target="population"):
    if target == "expected":
        samples = center_samples(samples, estimate)
    elif target != "population":
        raise ValueError(f"target must be 'expected' or 'population', got {target!r}")
    if method == "percentile":
        lo, hi = percentile_interval(samples, ci=ci)
        bad = ~np.isfinite(np.asarray(estimate, dtype=np.float64))
        return np.where(bad, np.nan, lo), np.where(bad, np.nan, hi)
    if method == "bca":
        return bca_interval(samples, estimate, ci=ci, acceleration=acceleration)
    raise ValueError(f"ci method must be 'percentile' or 'bca', got {method!r}")


def _jackknife_acceleration(theta_jack: np.ndarray) -> np.ndarray:
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
    starts, per = _per_cell(sizes)
    order_j, starts_j, per_j = jnp.asarray(order), jnp.asarray(starts), jnp.asarray(per)
    key = jax.random.PRNGKey(seed)

    @jax.jit
    def chunk(rs):
        def one(r):
            idx = order_j[_draw(jax.random.fold_in(key, r), starts_j, per_j)]
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
        acc = _jackknife_acceleration(np.moveaxis(np.asarray(jk, dtype=np.float64), 0, -1))
    lo, hi = _interval(moved, est, ci=ci, method=method, acceleration=acc)
    return BootstrapResult(
        estimate=est,
        ci_low=lo,
        ci_high=hi,
        samples=samples,
        nan_fraction=np.mean(~np.isfinite(samples), axis=0),
    )


# =========================================================================== fast p-values


def student_t_pvalues_fast(t: ArrayLike, dof: ArrayLike) -> jax.Array:
    """Two-sided Student-t p-values by Hill's (1970) normalising expansion.

    With ``a = ν − ½``, ``b = 48a²``, ``y = a·ln(1 + t²/ν)``::

        z = √y · (1 + (y + 3)/b − (0.4y³ + 3.3y² + 24y + 85.5) / (b (0.8y² + 100 + b)))
        p = 2 Φ(−z)

    Relative error vs the exact ``I_{ν/(ν+t²)}(ν/2, ½)`` (measured over ``|t| ≤ 40``):
    < 2.5e-3 for ``ν ≥ 8``, < 8e-4 for ``ν ≥ 20``, < 4e-5 for ``ν ≥ 50``, < 5e-7 for
    ``ν ≥ 100``; about 40× cheaper than ``betainc`` on CPU. NaN where ``t`` is NaN; 0 for
    ``t = ±inf``.
    """
    t = jnp.asarray(t)
    nu = jnp.asarray(dof, t.dtype)
    a = nu - 0.5
    b = 48.0 * a * a
    y = a * jnp.log1p(t * t / nu)
    z = (
        ((((-0.4 * y - 3.3) * y - 24.0) * y - 85.5) / (0.8 * y * y + 100.0 + b) + y + 3.0) / b + 1.0
    ) * jnp.sqrt(y)
    p = 2.0 * jax.scipy.special.ndtr(-z)
    return jnp.where(jnp.isinf(t), jnp.zeros_like(p), p)


def _benjamini_hochberg(p: jax.Array) -> jax.Array:
    """:func:`vcjax.deg.benjamini_hochberg` over the genes of every row, inside the jit.

    On CPU it runs on the host (:func:`jax.pure_callback` to :func:`vcjax.deg._bh_host`):
    XLA:CPU's sort is generic (a comparator call per comparison), about 17× slower than
    NumPy's on ``(200, 2000)`` rows, and made BH ~70 % of a resample. The host version does
    the same arithmetic in the same dtype, so the results are bit-identical (tested). On
    accelerators, and for float64, :func:`vcjax.deg.benjamini_hochberg` as it is (a
    callback runs on an XLA thread, where a ``jax.enable_x64`` context does not hold, and
    its float64 values would be cast to float32 there).
    """
    if jax.default_backend() != "cpu" or p.dtype != jnp.float32:
        return DEG.benjamini_hochberg(p)
    return jax.pure_callback(
        DEG._bh_host, jax.ShapeDtypeStruct(p.shape, p.dtype), p, vmap_method="broadcast_all"
    )


# =========================================================================== cell bootstrap


@dataclasses.dataclass
class _Layout:
    """The cells of one context in the blocked layout."""

    names: tuple[str, ...]
    n1: np.ndarray  # (C,)
    n2: np.ndarray  # (C,)
    sizes: np.ndarray  # (2C,) cells per group-half (code 2c + half − 1)
    cells: np.ndarray  # (N,) adata row of each cell, sorted by group-half (dataset order)
    pos: np.ndarray  # (N,) slot of each sorted cell in the (nb·L) blocked layout
    block_gh: np.ndarray  # (nb,) group-half of each block
    L: int
    shift: np.ndarray  # (G,) per-gene shift c (zeros: kept for generality)
    Xb: np.ndarray  # (nb, L, 2G) [x − c, (x − c)²], zero padding


def _block_sums_index(block_gh: np.ndarray, n_gh: int) -> dict[str, np.ndarray]:
    """How blocks add up to group-halves (sorted ``block_gh``, each half at least one block):
    ``first_block`` (n_gh,) the first block of each, and the other blocks ``extra_block``
    with their group-halves ``extra_gh``."""
    nb = block_gh.size
    starts = np.flatnonzero(np.r_[True, block_gh[1:] != block_gh[:-1]])
    if not np.array_equal(block_gh[starts], np.arange(n_gh)):  # pragma: no cover - internal
        raise AssertionError("every group-half needs a block")
    first = starts.astype(np.int32)
    extra = np.setdiff1d(np.arange(nb), starts).astype(np.int32)
    return dict(first_block=first, extra_block=extra, extra_gh=block_gh[extra].astype(np.int32))


def _block_size(sizes: np.ndarray) -> int:
    med = float(np.median(sizes[sizes > 0])) if np.any(sizes > 0) else 8.0
    return int(min(512, max(8, 8 * math.ceil(med / 8))))


def _context_cells(ctx) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """(adata rows, group-half code 2c + half − 1) of the cells of ``ctx``, dataset order."""
    adata = ctx.adata
    if adata is None or ctx.cell_split is None:
        raise D.VcjaxInputError("bootstrap: the evaluation context lacks the truth AnnData / split")
    key = ctx.options["key"]
    labels = np.asarray(adata.obs[key].astype(str), dtype=object)
    names = tuple(ctx.stats.half1.names)
    code_of = {nm: i for i, nm in enumerate(names)}
    codes = np.array([code_of.get(x, -1) for x in labels], dtype=np.int64)
    keep = codes >= 0
    if ctx.cell_mask is not None:
        keep &= np.asarray(ctx.cell_mask, dtype=bool)
    half = np.asarray(ctx.cell_split).astype(np.int64)
    rows = np.flatnonzero(keep)
    gh = 2 * codes[rows] + (half[rows] - 1)
    return rows, gh, names


def _read_layout(ctx, *, dtype) -> _Layout:
    rows, gh, names = _context_cells(ctx)
    C = len(names)
    order = np.argsort(gh, kind="stable")
    cells, gh_sorted = rows[order], gh[order]
    sizes = np.bincount(gh_sorted, minlength=2 * C).astype(np.int64)
    n1 = np.asarray(ctx.stats.half1.n, dtype=np.int64)
    n2 = np.asarray(ctx.stats.half2.n, dtype=np.int64)
    if not (np.array_equal(sizes[0::2], n1) and np.array_equal(sizes[1::2], n2)):
        raise D.VcjaxInputError("bootstrap: the cells found do not match the context's group sizes")
    L = _block_size(sizes)
    nblk = np.maximum(1, -(-sizes // L))  # an empty group-half keeps one (all-padding) block
    block_gh = np.repeat(np.arange(2 * C), nblk)
    blk_start = np.concatenate([[0], np.cumsum(nblk)[:-1]])
    gh_start = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    j = np.arange(cells.size) - gh_start[gh_sorted]
    pos = (blk_start[gh_sorted] + j // L) * L + j % L
    nb = int(nblk.sum())
    G = len(ctx.genes)
    # No centring: exact zeros must stay exact (zero variance → the t-test's ±inf/NaN rules).
    shift = np.zeros(G)

    # Map adata row -> slot, then stream the matrix once (data.py's chunk reader and
    # normaliser, exactly as group_stats).
    slot_of = np.full(ctx.adata.n_obs, -1, dtype=np.int64)
    slot_of[cells] = pos
    Xb = np.zeros((nb * L, 2 * G), dtype=dtype)
    layer = ctx.options.get("layer")
    X = ctx.adata.layers[layer] if layer is not None else ctx.adata.X
    normalise = ctx.options.get("normalization", "none") == "log1p_cp10k"
    for start, stop, chunk in D._iter_chunks(X, ctx.options.get("chunk_cells", 16384)):
        sl = slot_of[start:stop]
        sel = np.flatnonzero(sl >= 0)
        if sel.size == 0:
            continue
        part = chunk[sel]
        if normalise:
            part = D._normalize_chunk(part)
        part = part.toarray() if hasattr(part, "toarray") else np.asarray(part)
        part = part - shift
        Xb[sl[sel], :G] = part
        Xb[sl[sel], G:] = part * part
    # Sanity check against the sufficient statistics of the point estimate.
    sums = np.zeros((2 * C, G))
    np.add.at(sums, block_gh, Xb[:, :G].reshape(nb, L, G).sum(1, dtype=np.float64))
    want = np.empty_like(sums)
    want[0::2] = ctx.stats.half1.sum - n1[:, None] * shift
    want[1::2] = ctx.stats.half2.sum - n2[:, None] * shift
    scale = np.sqrt(ctx.stats.full.sumsq.sum(0) + 1.0)
    if not np.allclose(sums / scale, want / scale, atol=1e-3 if dtype == np.float32 else 1e-8):
        raise D.VcjaxInputError(
            "bootstrap: re-reading the cells does not reproduce the point estimate's group sums "
            "(layer or normalisation differ?)"
        )
    return _Layout(names, n1, n2, sizes, cells, pos, block_gh, L, shift, Xb.reshape(nb, L, 2 * G))


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static configuration of the jitted chunk function (hashable)."""

    n_cells: int
    n_slots: int
    n_blocks: int
    C: int
    G: int
    ctrl: int
    rows: tuple[int, ...]
    reference: str
    deg: str  # "refit", "frozen", "array" (fixed user weights) or "none"
    weights_from: str
    deg_method: str
    pvalue: str  # "fast" or "exact"
    sources: tuple[str, ...]
    metrics: tuple[str, ...]
    k: int
    strict: bool
    gate: bool
    sub_batch: int = 1 << 30  # resamples per metric sub-batch
    refit_batch: int = 1 << 30  # resamples per DEG-refit sub-batch


def _moments_j(n, s, q):
    """Shifted mean and unbiased variance (scanpy's order) from (n, Σx, Σx²)."""
    mean = s / n
    var = (q / n - mean * mean) * (n / (n - 1))
    return mean, var


def _refit_needs(cfg: _Config) -> tuple[str, ...]:
    """The per-resample DEG arrays the metric stage reads (see :func:`_refit`)."""
    need = ["weights", "mask"]
    if "pearson_delta_topk" in cfg.metrics:
        need.append("scores")
    if "interpolated_duplicate" in cfg.sources:
        need.append("padj")
    return tuple(need)


def _refit(cfg: _Config, S: jax.Array, arrs: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """The DEG t-scores, weights, DEG sets and adjusted p-values of resampled sums ``S``.

    Each ``(b, P, G)``: ``weights`` (min-max |t|², float32), ``mask`` (BH-adjusted
    p < 0.05 and logFC ≠ 0), and where :func:`_refit_needs` asks for them ``scores``
    (t, NaN → 0) and ``padj``, as :func:`vcjax.deg.rank_genes` defines them.
    """
    G = cfg.G
    rows = np.asarray(cfg.rows)
    c = arrs["shift"]
    S1, Q1 = S[:, 0::2, :G], S[:, 0::2, G:]
    S2, Q2 = S[:, 1::2, :G], S[:, 1::2, G:]
    pert = np.ones(cfg.C, dtype=bool)
    pert[cfg.ctrl] = False
    if cfg.weights_from == "all":
        nd, Sd, Qd = arrs["n1"] + arrs["n2"], S1 + S2, Q1 + Q2
    else:
        nd, Sd, Qd = arrs["n1"], S1, Q1
    pmask = jnp.asarray(pert)
    ng = nd[rows][None, :, None].astype(S.dtype)
    n_tot = jnp.sum(jnp.where(pmask, nd, 0)).astype(S.dtype)
    Sg, Qg = Sd[:, rows], Qd[:, rows]
    Sr = jnp.sum(jnp.where(pmask[None, :, None], Sd, 0), axis=1, keepdims=True) - Sg
    Qr = jnp.sum(jnp.where(pmask[None, :, None], Qd, 0), axis=1, keepdims=True) - Qg
    nr = n_tot - ng
    mg, vg = _moments_j(ng, Sg, Qg)
    mr, vr = _moments_j(nr, Sr, Qr)
    mg, mr = mg + c, mr + c
    t, dof = DEG.t_from_moments(mg, vg, ng, mr, vr, nr, method=cfg.deg_method)
    p = student_t_pvalues_fast(t, dof) if cfg.pvalue == "fast" else DEG.pvalues(t, dof)
    p = jnp.where(jnp.isnan(p), jnp.ones_like(p), p)
    padj = _benjamini_hochberg(p)
    scores = jnp.where(jnp.isnan(t), jnp.zeros_like(t), t).astype(jnp.float32)
    lfc = DEG.log_fold_change(mg, mr).astype(jnp.float32)
    out = dict(
        weights=DEG.minmax_weights(scores),
        mask=(padj < _DEG_ALPHA) & (lfc != 0),
        scores=scores,
        padj=padj,
    )
    return {k: out[k] for k in _refit_needs(cfg)}


def _resample_values(
    cfg: _Config,
    S: jax.Array,
    arrs: Mapping[str, jax.Array],
    refit: Mapping[str, jax.Array] | None = None,
) -> dict[str, jax.Array]:
    """Every metric of every source for a batch of resampled sums ``S`` (b, 2C, 2G), with
    the DEG arrays of :func:`_refit` when ``cfg.deg == "refit"``."""
    G, C = cfg.G, cfg.C
    rows = np.asarray(cfg.rows)
    c = arrs["shift"]
    n1 = arrs["n1"][None, :, None]
    n2 = arrs["n2"][None, :, None]
    S1, S2 = S[:, 0::2, :G], S[:, 1::2, :G]
    m1 = S1 / n1 + c
    m2 = S2 / n2 + c
    mf = (S1 + S2) / (n1 + n2) + c
    u_all_h1 = m1.mean(axis=1)
    u_all_full = mf.mean(axis=1)
    u_ntc = mf[:, cfg.ctrl]
    pert = np.ones(C, dtype=bool)
    pert[cfg.ctrl] = False
    if cfg.reference == "perturbed":
        ref = u_all_h1
    elif cfg.reference == "perturbed_no_control":
        ref = m1[:, pert].mean(axis=1)
    elif cfg.reference == "perturbed_cells":
        ref = S1[:, pert].sum(1) / arrs["n1"][pert].sum() + c
    elif cfg.reference == "control":
        ref = u_ntc
    else:
        ref = jnp.broadcast_to(arrs["reference"], u_ntc.shape)
    truth = m2[:, rows]
    dup = m1[:, rows]
    P = rows.size

    weights = mask = scores = padj = None
    if cfg.deg == "refit":
        weights, mask = refit["weights"], refit["mask"]
        scores, padj = refit.get("scores"), refit.get("padj")
    elif cfg.deg == "frozen":
        weights, mask = arrs["weights"][None], arrs["deg_mask"][None]
        scores, padj = arrs["scores"][None], arrs["pvals_adj"][None]
    elif cfg.deg == "array":
        weights = arrs["weights"][None]

    preds: dict[str, jax.Array] = {}
    loo = None
    for name in cfg.sources:
        if name == "model":
            preds[name] = arrs["model"][None]
        elif name == "control_mean":
            preds[name] = u_ntc[:, None]
        elif name == "dataset_mean":
            preds[name] = u_all_full[:, None]
        elif name == "technical_duplicate":
            preds[name] = dup
        elif name == "null":
            preds[name] = dup[:, arrs["derangement"]] if P >= 2 else jnp.full_like(dup, jnp.nan)
        elif name == "additive":
            idx, valid = arrs["add_idx"], arrs["add_valid"]
            d = dup - u_all_h1[:, None]
            parts = jnp.where(idx[None, :, :, None] >= 0, d[:, jnp.maximum(idx, 0)], 0.0)
            add = u_all_h1[:, None] + parts.sum(axis=2)
            preds[name] = jnp.where(valid[None, :, None], add, jnp.nan)
        elif name in ("loo_mean", "interpolated_duplicate"):
            if loo is None:
                pf = mf[:, rows]
                loo = (
                    (pf.sum(axis=1, keepdims=True) - pf) / (P - 1)
                    if P >= 2
                    else jnp.full_like(pf, jnp.nan)
                )
            if name == "loo_mean":
                preds[name] = loo
            else:
                alpha = 1.0 - jnp.where(jnp.isnan(padj), 1.0, padj).astype(dup.dtype)
                preds[name] = alpha * dup + (1.0 - alpha) * loo
        else:  # pragma: no cover - validated by the caller
            raise ValueError(name)

    # All sources through each kernel at once: predictions stacked on a leading source axis
    # (one trace per metric, not per source × metric).
    no_deg = None if mask is None else ~jnp.any(mask, axis=-1)
    stack = jnp.stack(
        [jnp.broadcast_to(preds[s], truth.shape) for s in cfg.sources]
    )  # (S, b, P, G)
    stack, truth, ref = jax.lax.optimization_barrier((stack, truth, ref))
    tr = truth[None]
    ref_b = ref[None, :, None]
    ntc_b = u_ntc[None, :, None]
    w_b = None if weights is None else weights[None]
    m_b = None if mask is None else mask[None]
    is_dm = jnp.asarray([s == "dataset_mean" for s in cfg.sources])[:, None, None]
    # Every metric through the engine's fused kernel (two passes over shared per-row sums),
    # on the (source × resample × perturbation, G) rows; the same code scores the point
    # estimate in vcjax.engine.score.
    lead = stack.shape[:3]

    def flat(x):  # one float dtype throughout, as engine.score casts its inputs
        x = x if x.dtype == bool else x.astype(stack.dtype)
        return jnp.broadcast_to(x, stack.shape).reshape(-1, G)

    def fused(names, reference, weights=None, mask=None):
        if not names:
            return {}
        w = flat(weights) if weights is not None else jnp.zeros((G,), stack.dtype)
        mk = flat(mask) if mask is not None else jnp.zeros((G,), bool)
        got = engine._fused_scores(
            tuple(names), cfg.k, cfg.strict, flat(stack), flat(tr), flat(reference), w, mk
        )
        return {n: v.reshape(lead) for n, v in got.items()}

    core = [m for m in cfg.metrics if m in ENGINE_METRICS and m != "pearson_delta_topk"]
    values = fused(core, ref_b, w_b, m_b)
    ctrl = [m for m in cfg.metrics if m in _CTRL_METRICS]
    got = fused(sorted({_CTRL_METRICS[m] for m in ctrl}), ntc_b)
    values.update({m: got[_CTRL_METRICS[m]] for m in ctrl})
    if "pearson_delta_topk" in cfg.metrics:
        # the k genes depend on the resample and perturbation only: select them once and
        # gather every source's values there (not one top-k per source)
        topk_w = jnp.abs(scores) if scores is not None else weights
        if cfg.k > G or cfg.k < 2:
            values["pearson_delta_topk"] = jnp.full(lead, jnp.nan, stack.dtype)
        else:
            idx = M._topk_indices(jnp.broadcast_to(topk_w, truth.shape), cfg.k)  # (b, P, k)
            ref_k = ref[jnp.arange(ref.shape[0])[:, None, None], idx]
            values["pearson_delta_topk"] = M.pearson_delta(
                jnp.take_along_axis(stack, idx[None], axis=-1),
                jnp.take_along_axis(truth, idx, axis=-1)[None],
                ref_k[None].astype(stack.dtype),
            )
    out: dict[str, jax.Array] = {}
    for m in cfg.metrics:
        v = values[m]
        v = jnp.broadcast_to(v, stack.shape[:3])
        if cfg.gate and no_deg is not None and m in _DEG_GATED:
            v = jnp.where(no_deg[None], jnp.nan, v)
        if cfg.gate and m in _PEARSON_LIKE:
            v = jnp.where(is_dm, jnp.nan, v)
        out[m] = v
    return out


def _over_resamples(fn, batch: int, S: jax.Array, *rest):
    """``fn(S_r, *rest_r)`` over sub-batches of ``batch`` resamples (bounded memory).

    ``S`` is group-major ``(2C, b, 2G)``, as the cell product gives it; each sub-batch is
    sliced and turned resample-major ``(batch, 2C, 2G)`` on its own (in cache), never the
    whole chunk. ``rest`` are resample-major ``(b, ...)``; outputs are resample-major.
    ``batch`` is lowered to a divisor of ``b``.
    """
    b = S.shape[1]
    batch = max(d for d in range(1, min(batch, b) + 1) if b % d == 0)
    if batch == b:
        return fn(jnp.swapaxes(S, 0, 1), *rest)

    def body(i):
        s = jax.lax.dynamic_slice_in_dim(S, i * batch, batch, axis=1)
        r = jax.tree.map(lambda v: jax.lax.dynamic_slice_in_dim(v, i * batch, batch), rest)
        return fn(jnp.swapaxes(s, 0, 1), *r)

    out = jax.lax.map(body, jnp.arange(b // batch))
    return jax.tree.map(lambda v: v.reshape(b, *v.shape[2:]), out)


@functools.lru_cache(maxsize=16)
def _chunk_fn(cfg: _Config, devices: tuple[jax.Device, ...] = ()):
    """The resampler of one chunk of resamples: ``(keys (b, ...), arrs) -> values``.

    Two jitted stages: (1) the resampled group sums and, with refitted weights, the DEG
    arrays (:func:`_refit`); (2) every metric of every source (:func:`_resample_values`).
    They are compiled apart because XLA:CPU's two fusion emitters suit them differently:
    the classic one vectorises the metric kernels' row reductions (about 5× faster), but
    emits the t-test/p-value chain about 7× slower than the newer one.

    With several ``devices`` the resample axis is sharded over a 1-D mesh
    (:func:`jax.shard_map`): each device draws and scores its own resamples from a
    replicated copy of the cells, so ``b`` must be a multiple of the device count.
    Resample ``r`` depends only on its key, so the values equal one device's.
    """

    def draw(keys, arrs):
        def weights_one(k):
            idx = _draw(k, arrs["starts"], arrs["per"])
            w = jnp.zeros((cfg.n_cells,), jnp.int32).at[idx].add(1)
            return (
                jnp.zeros((cfg.n_slots,), arrs["Xb"].dtype)
                .at[arrs["pos"]]
                .set(w.astype(arrs["Xb"].dtype))
            )

        W = jax.vmap(weights_one)(keys).reshape(keys.shape[0], cfg.n_blocks, -1)  # (b, nb, L)
        Sb = jax.lax.dot_general(W, arrs["Xb"], (((2,), (1,)), ((1,), (0,))))  # (nb, b, 2G)
        # group-half sums: most group-halves fill one block, so take each one's first block
        # and add the few extra blocks of the large ones (the controls), instead of a
        # segment sum over every block
        # (kept group-major (2C, b, 2G): each stage turns its own sub-batches around)
        S = (
            jnp.take(Sb, arrs["first_block"], axis=0)
            .at[arrs["extra_gh"]]
            .add(Sb[arrs["extra_block"]])
        )
        refit = {}
        if cfg.deg == "refit":
            refit = _over_resamples(lambda s: _refit(cfg, s, arrs), cfg.refit_batch, S)
        return S, refit

    def score(S, refit, arrs):
        def one(s, r):  # values are (sources, b, P): resamples first while sub-batched
            return {k: jnp.swapaxes(v, 0, 1) for k, v in _resample_values(cfg, s, arrs, r).items()}

        out = _over_resamples(one, cfg.sub_batch, S, refit)
        return {k: jnp.swapaxes(v, 0, 1) for k, v in out.items()}

    if len(devices) > 1:
        mesh = Mesh(np.asarray(devices), ("resamples",))
        rs, rep = PartitionSpec("resamples"), PartitionSpec()
        # the host BH sort (pure_callback) carries no replication info: check_vma off
        rs1 = PartitionSpec(None, "resamples")  # group sums are (2C, b, 2G)
        draw = jax.shard_map(
            draw, mesh=mesh, in_specs=(rs, rep), out_specs=(rs1, rs), check_vma=False
        )
        score = jax.shard_map(
            score,
            mesh=mesh,
            in_specs=(rs1, rs, rep),
            out_specs=PartitionSpec(None, "resamples"),  # values are (sources, b, P)
            check_vma=False,
        )
    draw = jax.jit(draw)
    score = jax.jit(score, compiler_options=engine._compiler_options())

    def run(keys, arrs):
        S, refit = draw(keys, arrs)
        return score(S, refit, arrs)

    return run


def _float_dtype():
    return np.dtype(jax.dtypes.canonicalize_dtype(np.float64))


def _additive_index(perts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    index = {p: i for i, p in enumerate(perts)}
    parts_all = []
    for p in perts:
        parts = [s for s in p.split("+") if s]
        ok = len(parts) >= 2 and all(s in index for s in parts)
        parts_all.append([index[s] for s in parts] if ok else [])
    K = max(1, max(len(x) for x in parts_all))
    idx = np.full((len(perts), K), -1, dtype=np.int32)
    for r, x in enumerate(parts_all):
        idx[r, : len(x)] = x
    return idx, np.array([len(x) > 0 for x in parts_all])


def default_chunk(n_perts: int, n_genes: int, n_sources: int) -> int:
    """Resamples per chunk (the cells product): about 2**28 elements of group sums, 1..32.

    The product reads the whole cell matrix once per chunk, so its cost per resample falls
    as the chunk grows (measured about 3.5× from 4 to 32 resamples at P = 1000, G = 2000);
    the group sums of a chunk take ``chunk × 2(P+1) × 2G`` floats (1 GiB in float32 at that
    size and 32 resamples).
    """
    return int(max(1, min(32, (1 << 28) // max(1, 4 * (n_perts + 1) * n_genes))))


def default_sub_batch(n_perts: int, n_genes: int, n_sources: int) -> int:
    """Resamples per metric sub-batch: about 2**21 elements per ``(sources, b, P, G)`` stack."""
    return int(max(1, (1 << 21) // max(1, n_perts * n_genes * max(n_sources, 1))))


def default_refit_batch(n_perts: int, n_genes: int) -> int:
    """Resamples per DEG-refit sub-batch: about 2**24 elements per ``(b, P, G)`` array
    (larger batches than the metric stage's: the t-test chain streams, with no reuse to
    keep in cache; measured ~15 % faster per resample at 8 than at 1 for P·G = 2e6)."""
    return int(max(1, (1 << 24) // max(1, n_perts * n_genes)))


def _setup(ctx, *, refit_weights: bool = True, pvalue: str = "auto"):
    """Static configuration, device arrays and cell layout of one context's resampler."""
    E = importlib.import_module("vcjax.evaluate")
    opts = ctx.options
    dtype = _float_dtype()
    metrics = []
    for m in opts.get("metrics", E.DEFAULT_METRICS):  # the metric set of evaluate's _score_sources
        if m in _CTRL_METRICS:
            metrics.append(m)
        elif m == "pearson_delta_topk":
            if ctx.scores is not None or ctx.weights is not None:
                metrics.append(m)
        elif m in ENGINE_METRICS:
            have = {"weights": ctx.weights is not None, "mask": ctx.deg_mask is not None}
            if all(have[x] for x in ENGINE_METRICS[m].needs):
                metrics.append(m)
    metrics = tuple(metrics)
    sources = (("model",) if opts.get("model") is not None else ()) + tuple(ctx.baselines)
    if ctx.scores is not None:
        deg = "refit" if refit_weights else "frozen"
    elif ctx.weights is not None:
        deg = "array"
    else:
        deg = "none"
    lay = _read_layout(ctx, dtype=dtype)
    C = len(lay.names)
    rows = tuple(lay.names.index(p) for p in ctx.perts)
    ctrl = lay.names.index(ctx.control)
    wf = opts.get("weights_from", "all")
    method = opts.get("deg_method", "t-test_overestim_var")
    if pvalue == "auto":
        nd = (lay.n1 + lay.n2) if wf == "all" else lay.n1
        npert = np.asarray([nd[r] for r in rows])
        min_dof = npert.min() - 1
        if method == "t-test":
            min_dof = min(min_dof, (npert.sum() - npert.max()) - 1)
        pvalue = "fast" if min_dof >= 30 else "exact"
    cfg = _Config(
        n_cells=int(lay.cells.size),
        n_slots=int(lay.Xb.shape[0] * lay.L),
        n_blocks=int(lay.Xb.shape[0]),
        C=C,
        G=len(ctx.genes),
        ctrl=ctrl,
        rows=rows,
        reference=opts.get("reference", "perturbed"),
        deg=deg,
        weights_from=wf,
        deg_method=method,
        pvalue=pvalue,
        sources=sources,
        metrics=metrics,
        k=int(opts.get("k", 20)),
        strict=bool(opts.get("strict", False)),
        gate=bool(opts.get("gate", True)),
    )
    starts, per = _per_cell(lay.sizes)
    arrs: dict[str, Any] = dict(
        starts=starts,
        per=per,
        pos=lay.pos.astype(np.int32),
        Xb=lay.Xb,
        **_block_sums_index(lay.block_gh, 2 * C),
        shift=lay.shift.astype(dtype),
        n1=lay.n1.astype(dtype),
        n2=lay.n2.astype(dtype),
        reference=np.asarray(ctx.reference, dtype=dtype),
    )
    if "model" in sources:
        arrs["model"] = np.asarray(opts["model"], dtype=dtype)
    if "null" in sources and len(rows) >= 2:
        arrs["derangement"] = B.null_derangement(len(rows), seed=opts.get("seed", 0)).astype(
            np.int32
        )
    if "additive" in sources:
        arrs["add_idx"], arrs["add_valid"] = _additive_index(ctx.perts)
    if deg == "frozen":
        arrs.update(
            weights=ctx.weights, deg_mask=ctx.deg_mask, scores=ctx.scores, pvals_adj=ctx.pvals_adj
        )
    elif deg == "array":
        arrs["weights"] = np.asarray(ctx.weights, dtype=np.float32)
    if "interpolated_duplicate" in sources and deg == "array":
        raise D.VcjaxInputError("bootstrap: interpolated_duplicate needs DEG p-values")
    arrs = {k: jnp.asarray(v) for k, v in arrs.items()}
    return cfg, arrs, lay


def context_samples(
    ctx,
    *,
    n_boot: int,
    seed: int = 0,
    index: int = 0,
    refit_weights: bool = True,
    chunk_size: int | None = None,
    pvalue: str = "auto",
    progress: bool | Callable[[int], None] = False,
    devices: Sequence[jax.Device] | None = None,
) -> dict[str, Any]:
    """Resampled metric values of one evaluation context (the engine of :func:`add_intervals`).

    Args:
      ctx: a :class:`vcjax.evaluate.EvalContext` scored by :func:`vcjax.evaluate.evaluate`
        (its ``options`` carry ``metrics``, ``k``, ``strict``, ``gate`` and ``model``).
      n_boot: resamples.
      seed, index: resample ``r`` uses ``fold_in(context_key(seed, index), r)``.
      refit_weights: recompute the DEG t-scores, weights, DEG sets and adjusted p-values
        per resample (default); ``False`` freezes the point-estimate ones.
      chunk_size: resamples per jitted call (default :func:`default_chunk`); results do
        not depend on it.
      pvalue: ``"fast"`` (Hill's expansion, :func:`student_t_pvalues_fast`), ``"exact"``
        (``betainc``) or ``"auto"``: fast when every DEG test has ``ν ≥ 30``
        (group sizes ≥ 31), else exact.
      progress: True for log messages, or a callback receiving resamples done.
      devices: devices to shard the resamples of each chunk over (default: all of
        ``jax.devices()``); the chunk is rounded up to a multiple of their number. Each
        device holds a copy of the cell matrix.

    Returns:
      ``{"values": {source: {metric: (n_boot, P)}}, "calibrated": same, "perts", "metrics",
      "sources", "seconds"}``.
    """
    E = importlib.import_module("vcjax.evaluate")
    cfg, arrs, lay = _setup(ctx, refit_weights=refit_weights, pvalue=pvalue)
    sources, metrics, rows, dtype = cfg.sources, cfg.metrics, cfg.rows, _float_dtype()
    chunk = int(chunk_size or default_chunk(len(rows), cfg.G, len(sources)))
    devices = tuple(jax.devices() if devices is None else devices)
    n_dev = len(devices)
    chunk = -(-chunk // n_dev) * n_dev  # a multiple of the device count
    cfg = dataclasses.replace(
        cfg,
        sub_batch=min(chunk // n_dev, default_sub_batch(len(rows), cfg.G, len(sources))),
        refit_batch=min(chunk // n_dev, default_refit_batch(len(rows), cfg.G)),
    )
    fn = _chunk_fn(cfg, devices if n_dev > 1 else ())
    if n_dev > 1:
        arrs = jax.device_put(
            arrs, NamedSharding(Mesh(np.asarray(devices), ("resamples",)), PartitionSpec())
        )
    key = context_key(seed, index)
    P = len(rows)
    store = {(s, m): np.empty((n_boot, P), dtype=dtype) for s in sources for m in metrics}
    cal_store = {(s, m): np.empty((n_boot, P), dtype=dtype) for s in sources for m in metrics}
    t0 = time.perf_counter()
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        # the last chunk is padded with extra resample indices (never recompiles); their
        # values are dropped, and resample r depends only on r.
        keys = _resample_keys(key, start, n=chunk)
        out = fn(keys, arrs)
        vals: dict[str, dict[str, np.ndarray]] = {s: {} for s in sources}
        for m in metrics:
            arr = np.asarray(out[m], dtype=np.float64)[:, :b]
            for i, s in enumerate(sources):
                vals[s][m] = arr[i]
        cal = E.calibrate(vals)
        for s in sources:
            for m in metrics:
                store[(s, m)][start : start + b] = vals[s][m]
                cal_store[(s, m)][start : start + b] = cal[s].get(m, np.full((b, P), np.nan))
        if callable(progress):
            progress(b)
        elif progress:
            log.info("bootstrap: %d/%d resamples", start + b, n_boot)
    values = {s: {m: store[(s, m)] for m in metrics} for s in sources}
    calibrated = {s: {m: cal_store[(s, m)] for m in metrics} for s in sources}
    return dict(
        values=values,
        calibrated=calibrated,
        perts=ctx.perts,
        metrics=metrics,
        sources=sources,
        seconds=time.perf_counter() - t0,
        pvalue=cfg.pvalue,
        chunk=chunk,
    )


# =========================================================================== table API


def _orientation(metric: str) -> float:
    E = importlib.import_module("vcjax.evaluate")
    return 1.0 if E.higher_is_better(metric) else -1.0


def add_intervals(
    table: pd.DataFrame,
    contexts: Sequence[Any],
    *,
    n_boot: int,
    ci: float = 0.95,
    method: str = "percentile",
    refit_weights: bool = True,
    seed: int = 0,
    progress: bool = False,
    chunk_size: int | None = None,
    pvalue: str = "auto",
    target: str = "expected",
) -> pd.DataFrame:
    """Cell-bootstrap intervals for an :func:`vcjax.evaluate.evaluate` table.

    Adds the columns ``ci_low``, ``ci_high`` (interval of ``value``),
    ``calibrated_ci_low``, ``calibrated_ci_high`` (interval of ``calibrated``, the
    calibration recomputed per resample), ``boot_nan_frac`` (fraction of resamples in
    which the value was NaN and therefore ignored) and ``win_rate``; and appends, for every
    baseline ``b``, rows ``source = "model-vs-<b>"`` with ``value = s·(m_model − m_b)``
    (``s = +1`` higher-is-better, ``−1`` for errors: **positive = model better**), the
    interval of the paired resampled difference and ``win_rate`` = fraction of resamples
    (both finite) in which the model is strictly better (NaN on non-comparison rows).

    Metrics not computed by the resampler (peer metrics from ``metrics="all"``) get NaN
    intervals; they are listed in ``table.attrs["bootstrap"]["unsupported"]``.

    Args:
      table: the tidy table of :func:`vcjax.evaluate.evaluate`.
      contexts: its :class:`vcjax.evaluate.EvalContext` list (one per covariate value).
      n_boot: resamples (e.g. 1000).
      ci: coverage (0.95).
      method: ``"percentile"`` or ``"bca"`` (module docstring).
      refit_weights: recompute DEG weights and sets per resample (default) or freeze the
        point-estimate ones.
      seed: seed; same seed → identical intervals.
      progress: log progress.
      chunk_size: resamples per jitted call (memory knob; results do not depend on it).
      pvalue: DEG p-values ``"auto"``, ``"fast"`` or ``"exact"`` (:func:`context_samples`).
      target: ``"expected"`` (default): intervals for ``E[θ̂]``, the metric's expected
        value for a screen of this size (the resamples are centred by the bootstrap bias
        estimate, :func:`center_samples`); ``"population"``: plain percentile/BCa of the
        raw resamples, aimed at the infinite-cell value (valid only when the bias is small
        relative to the spread; metrics scored against a noisy truth are biased, see
        validation/README.md).

    Returns:
      A new DataFrame (the input rows first, in order, then the comparison rows).
    """
    if n_boot < 2:
        raise ValueError("n_boot must be >= 2")
    if not 0 < ci < 1:
        raise ValueError("ci must be in (0, 1)")
    if method not in ("percentile", "bca"):
        raise ValueError(f"ci method must be 'percentile' or 'bca', got {method!r}")
    out = table.copy()
    for col in (
        "ci_low",
        "ci_high",
        "calibrated_ci_low",
        "calibrated_ci_high",
        "boot_nan_frac",
        "win_rate",
    ):
        out[col] = np.nan
    has_cov = "covariate" in out.columns
    comp_frames = []
    info: dict[str, Any] = dict(
        n_boot=n_boot,
        ci=ci,
        method=method,
        refit_weights=refit_weights,
        seed=seed,
        target=target,
        unsupported=[],
        seconds=0.0,
    )
    for j, ctx in enumerate(contexts):
        res = context_samples(
            ctx,
            n_boot=n_boot,
            seed=seed,
            index=j,
            refit_weights=refit_weights,
            chunk_size=chunk_size,
            pvalue=pvalue,
            progress=progress,
        )
        info["seconds"] += res["seconds"]
        info["pvalue"] = res["pvalue"]
        pert_pos = {p: i for i, p in enumerate(ctx.perts)}
        sel = (
            np.ones(len(out), dtype=bool)
            if not has_cov
            else (out["covariate"] == ctx.covariate).to_numpy()
        )
        sub = out[sel]
        for (source, metric), idx in sub.groupby(["source", "metric"], sort=False).groups.items():
            if source not in res["values"] or metric not in res["values"][source]:
                if metric not in info["unsupported"]:
                    info["unsupported"].append(metric)
                continue
            ridx = np.asarray([pert_pos[p] for p in out.loc[idx, "perturbation"]])
            samp = res["values"][source][metric][:, ridx].T
            est = out.loc[idx, "value"].to_numpy(float)
            lo, hi = _interval(samp, est, ci=ci, method=method, target=target)
            out.loc[idx, "ci_low"], out.loc[idx, "ci_high"] = lo, hi
            out.loc[idx, "boot_nan_frac"] = np.mean(~np.isfinite(samp), axis=1)
            csamp = res["calibrated"][source][metric][:, ridx].T
            cest = out.loc[idx, "calibrated"].to_numpy(float)
            clo, chi = _interval(csamp, cest, ci=ci, method=method, target=target)
            out.loc[idx, "calibrated_ci_low"], out.loc[idx, "calibrated_ci_high"] = clo, chi
        # paired comparisons model vs each baseline
        if "model" not in res["values"]:
            continue
        for metric in res["metrics"]:
            sgn = _orientation(metric)
            mrows = sub[(sub["source"] == "model") & (sub["metric"] == metric)]
            if mrows.empty:
                continue
            ridx = np.asarray([pert_pos[p] for p in mrows["perturbation"]])
            m_s = res["values"]["model"][metric][:, ridx].T
            m_v = mrows["value"].to_numpy(float)
            for source in res["sources"]:
                if source == "model":
                    continue
                brows = sub[(sub["source"] == source) & (sub["metric"] == metric)].set_index(
                    "perturbation"
                )
                b_v = brows.loc[list(mrows["perturbation"]), "value"].to_numpy(float)
                b_notes = brows.loc[list(mrows["perturbation"]), "note"].to_numpy()
                d_s = sgn * (m_s - res["values"][source][metric][:, ridx].T)
                d_v = sgn * (m_v - b_v)
                lo, hi = _interval(d_s, d_v, ci=ci, method=method, target=target)
                fin = np.isfinite(d_s)
                with np.errstate(invalid="ignore"):
                    win = np.sum((d_s > 0) & fin, axis=1) / np.sum(fin, axis=1)
                win = np.where(np.isfinite(d_v), win, np.nan)
                frame = {
                    "perturbation": mrows["perturbation"].to_numpy(),
                    "metric": metric,
                    "source": f"model-vs-{source}",
                    "value": d_v,
                    "calibrated": np.nan,
                    "note": np.where(
                        mrows["note"].to_numpy() != "", mrows["note"].to_numpy(), b_notes
                    ),
                    "ci_low": lo,
                    "ci_high": hi,
                    "calibrated_ci_low": np.nan,
                    "calibrated_ci_high": np.nan,
                    "boot_nan_frac": np.mean(~fin, axis=1),
                    "win_rate": win,
                }
                if has_cov:
                    frame["covariate"] = ctx.covariate
                comp_frames.append(pd.DataFrame(frame))
    if comp_frames:
        comp = pd.concat(comp_frames, ignore_index=True)[list(out.columns)]
        out = pd.concat([out, comp], ignore_index=True)
    out.attrs = dict(table.attrs)
    out.attrs["bootstrap"] = info
    return out


def summary_intervals(
    table: pd.DataFrame,
    *,
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    statistic: str = "mean",
    method: str = "percentile",
    column: str = "value",
    target: str = "population",
) -> pd.DataFrame:
    """Intervals for dataset-level summaries by resampling perturbations.

    Per (source, metric[, covariate]) the NaN-skipping mean or median of ``column`` over
    perturbations, with a bootstrap interval from resampling the perturbations with
    replacement. The same perturbation indices are used for every (source, metric) of a
    covariate (paired), so ``model-vs-<b>`` rows give intervals for mean differences. BCa
    uses the jackknife over perturbations for the acceleration. ``target="expected"``
    centres the resamples as :func:`add_intervals` does (no effect for the mean).

    Returns:
      DataFrame with ``source``, ``metric`` [``covariate``], ``statistic``, ``value``,
      ``ci_low``, ``ci_high``, ``n`` (finite perturbations).
    """
    if statistic not in ("mean", "median"):
        raise ValueError("statistic must be 'mean' or 'median'")
    stat = np.nanmean if statistic == "mean" else np.nanmedian
    keys = ["source", "metric"] + (["covariate"] if "covariate" in table.columns else [])
    rows = []
    rng_cache: dict[Any, np.ndarray] = {}
    for gkey, sub in table.groupby(keys, sort=False, dropna=False):
        v = sub[column].to_numpy(float)
        P = v.size
        ck = (P, gkey[2] if len(keys) == 3 else None)
        if ck not in rng_cache:
            rng = np.random.default_rng([seed, P])
            rng_cache[ck] = rng.integers(0, P, size=(n_boot, P))
        idx = rng_cache[ck]
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            est = stat(v) if np.isfinite(v).any() else np.nan
            samp = stat(v[idx], axis=1)
            acc = None
            if method == "bca" and P > 1:
                jk = np.array([stat(np.delete(v, i)) for i in range(P)])
                acc = _jackknife_acceleration(jk[None])[0]
        lo, hi = _interval(
            samp[None], np.array([est]), ci=ci, method=method, acceleration=acc, target=target
        )
        row = dict(zip(keys, gkey if isinstance(gkey, tuple) else (gkey,)))
        row.update(
            statistic=statistic, value=est, ci_low=lo[0], ci_high=hi[0], n=int(np.isfinite(v).sum())
        )
        rows.append(row)
    return pd.DataFrame(rows)
