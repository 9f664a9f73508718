r"""Scores of a prediction against a noisy measurement, and of a model's own uncertainty.

**Replicate noise.** A truth pseudobulk ``y`` of ``n₂`` cells with unbiased per-gene
variance ``s₂²`` and the technical duplicate ``d`` (``n₁``, ``s₁²``) are two measurements of
the same population; they differ by ``d − y`` with variance ``s₁²/n₁ + s₂²/n₂``
(:func:`replicate_noise`, Welch–Satterthwaite ``ν``). :func:`gene_confidence` maps a
prediction's error in those units, ``z = (ŷ − y)/se``, through that distribution,
``p = P(|T_ν| ≥ |z|)``, and :func:`confidence_score` to 0–100:

.. math::
   \mathrm{confidence} = 100 \cdot \mathrm{clip}\Big(1 + \frac{\log_{10}(p/\alpha)}{D},\ 0,\ 1\Big)

with tolerance ``α = 0.05`` and ``D = 3`` decades by default: an error inside the central
``1 − α`` range of replicate noise (``|z| ≤ 1.96`` for large ``ν``) scores 100; beyond it the
score loses ``100/D`` points per decade of p-value, 0 at ``p ≤ α·10^{-D}`` (``|z| ≥ 4.06``).
For a replicate ``p ~ U(0, 1)`` exactly, hence
``E[confidence] = 100 (1 − α/(D ln 10)) = 99.28``.

**A model's own uncertainty** (:func:`uncertainty_scores`): given a predictive variance or
an ensemble, the empirical coverage of Gaussian central intervals, the Gaussian NLL, the
CRPS (closed form for a Gaussian; the energy form for an ensemble, or the "fair" version),
the mean squared standardised error and the Spearman correlation between the predicted
standard deviation and the absolute error.

References:
  Jumper et al., Nature 596 (2021) — pLDDT, the inspiration. Gneiting & Raftery, JASA 102
  (2007) — CRPS, its Gaussian closed form and the energy form. Grimit et al., QJRMS 132
  (2006) — CRPS of Gaussian mixtures. Ferro, QJRMS 140 (2014) — the fair ensemble CRPS.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from jax.typing import ArrayLike

from vcjax import engine
from vcjax._errors import VcjaxInputError
from vcjax.metrics import pearson
from vcjax.stats import pvalues

__all__ = [
    "BANDS",
    "LEVELS",
    "UncertaintyScores",
    "chunk_for",
    "confidence_band",
    "confidence_score",
    "ensemble_crps",
    "gaussian_crps",
    "gaussian_nll",
    "gene_confidence",
    "interval_covered",
    "level_name",
    "replicate_noise",
    "spearman",
    "uncertainty_scores",
]

#: default central-interval levels scored by :func:`uncertainty_scores`.
LEVELS = (0.5, 0.8, 0.9, 0.95)
#: per-perturbation band thresholds on the calibrated score (:func:`confidence_band`).
BANDS = {"high": 0.75, "interval_floor": 0.5}


def _f(*xs: ArrayLike) -> list[jax.Array]:
    dt = jnp.result_type(jnp.float32, *[jnp.asarray(x) for x in xs])
    return [jnp.asarray(x, dt) for x in xs]


@functools.partial(jax.jit, static_argnames=("min_se",))
def replicate_noise(
    var_truth: ArrayLike,
    n_truth: ArrayLike,
    var_dup: ArrayLike | None = None,
    n_dup: ArrayLike | None = None,
    *,
    min_se: float = 0.0,
) -> tuple[jax.Array, jax.Array]:
    r"""Standard error and degrees of freedom of the replicate noise.

    ``se² = s₂²/n₂ + s₁²/n₁`` with Welch–Satterthwaite ``ν`` when the duplicate's moments
    are given (``null="replicate"``); ``se² = s₂²/n₂``, ``ν = n₂ − 1`` otherwise.

    Args:
      var_truth, n_truth: unbiased per-gene variance and cell count of the truth half
        (``n`` broadcastable, e.g. ``(P, 1)``).
      var_dup, n_dup: the same for the duplicate half, or None.
      min_se: floor on ``se`` (0: none).

    Returns:
      ``(se, dof)``; NaN where a variance is NaN (fewer than 2 cells). ``dof`` is NaN where
      ``se = 0`` (no noise: both variances zero).
    """
    v2, n2 = _f(var_truth, n_truth)
    b = v2 / n2
    if var_dup is None:
        se2 = b
        dof = jnp.broadcast_to(n2 - 1.0, b.shape)
    else:
        v1, n1 = _f(var_dup, n_dup)
        a = v1 / n1
        se2 = a + b
        den = a * a / (n1 - 1.0) + b * b / (n2 - 1.0)
        ok = den > 0
        dof = jnp.where(ok, se2 * se2 / jnp.where(ok, den, 1.0), jnp.nan)
    se = jnp.sqrt(jnp.maximum(se2, 0.0))
    if min_se > 0:
        se = jnp.where(jnp.isnan(se), se, jnp.maximum(se, min_se))
        dof = jnp.where(
            jnp.isnan(dof) & ~jnp.isnan(se), jnp.broadcast_to(_f(n_truth)[0] - 1.0, se.shape), dof
        )
    return se, dof


@functools.partial(jax.jit, static_argnames=("alpha", "decades"))
def confidence_score(p: ArrayLike, *, alpha: float = 0.05, decades: float = 3.0) -> jax.Array:
    r"""Map a replicate-noise p-value to 0–100: ``100·clip(1 + log10(p/α)/D, 0, 1)``.

    100 for ``p ≥ α``; ``100/D`` points lost per decade below; 0 at ``p ≤ α·10^{-D}``.
    For a replicate (``p ~ U(0, 1)``) the mean is ``100(1 − α/(D ln 10))``. NaN for NaN.
    """
    (p,) = _f(p)
    pos = p > 0
    logp = jnp.log10(jnp.where(pos, p, 1.0) / alpha)
    val = jnp.where(pos, jnp.clip(1.0 + logp / decades, 0.0, 1.0), 0.0)
    return jnp.where(jnp.isnan(p), jnp.nan, 100.0 * val)


@functools.partial(jax.jit, static_argnames=("alpha", "decades"))
def gene_confidence(
    pred: ArrayLike,
    truth: ArrayLike,
    se: ArrayLike,
    dof: ArrayLike,
    *,
    alpha: float = 0.05,
    decades: float = 3.0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    r"""Per-gene replicate z, two-sided p-value and confidence.

    ``z = (pred − truth)/se``; ``p = P(|T_ν| ≥ |z|)``; confidence = :func:`confidence_score`.

    Returns:
      ``(z, p, confidence)``, each of the broadcast shape. NaN where ``se`` is NaN or 0.
    """
    pred, truth, se, dof = _f(pred, truth, se, dof)
    ok = (se > 0) & jnp.isfinite(dof)
    z = jnp.where(ok, (pred - truth) / jnp.where(ok, se, 1.0), jnp.nan)
    p = pvalues(z, jnp.where(ok, dof, 1.0))
    p = jnp.where(ok, jnp.clip(p, 0.0, 1.0), jnp.nan)
    return z, p, confidence_score(p, alpha=alpha, decades=decades)


@jax.jit
def gaussian_nll(y: ArrayLike, mean: ArrayLike, var: ArrayLike) -> jax.Array:
    r"""Gaussian negative log-likelihood ``½ log(2π σ²) + (y − μ)²/(2σ²)``; NaN for ``σ² ≤ 0``."""
    y, mean, var = _f(y, mean, var)
    ok = var > 0
    v = jnp.where(ok, var, 1.0)
    return jnp.where(ok, 0.5 * (jnp.log(2 * jnp.pi * v) + jnp.square(y - mean) / v), jnp.nan)


def _phi(z):
    return jnp.exp(-0.5 * z * z) / jnp.sqrt(2 * jnp.pi)


def _Phi(z):
    return jax.scipy.special.ndtr(z)


@jax.jit
def gaussian_crps(y: ArrayLike, mean: ArrayLike, var: ArrayLike) -> jax.Array:
    r"""CRPS of ``N(μ, σ²)`` at ``y``, closed form (Gneiting & Raftery 2007, eq. 21).

    .. math:: \mathrm{CRPS} = \sigma\left[z\,(2\Phi(z) - 1) + 2\varphi(z) - \tfrac{1}{\sqrt\pi}\right],
              \quad z = (y - \mu)/\sigma

    ``σ = 0`` gives ``|y − μ|`` (the limit); NaN for ``σ² < 0``. Lower is better.
    """
    y, mean, var = _f(y, mean, var)
    pos = var > 0
    sd = jnp.sqrt(jnp.where(pos, var, 1.0))
    z = (y - mean) / sd
    val = sd * (z * (2 * _Phi(z) - 1) + 2 * _phi(z) - 1 / jnp.sqrt(jnp.pi))
    val = jnp.where(pos, val, jnp.abs(y - mean))
    return jnp.where(var < 0, jnp.nan, val)


def _abs_normal_mean(m: jax.Array, s2: jax.Array) -> jax.Array:
    """``E|X|`` for ``X ~ N(m, s2)`` (folded normal mean); ``|m|`` at ``s2 = 0``."""
    pos = s2 > 0
    s = jnp.sqrt(jnp.where(pos, s2, 1.0))
    val = s * jnp.sqrt(2 / jnp.pi) * jnp.exp(-0.5 * jnp.square(m / s)) + m * (1 - 2 * _Phi(-m / s))
    return jnp.where(pos, val, jnp.abs(m))


@functools.partial(jax.jit, static_argnames=("axis", "fair"))
def ensemble_crps(
    y: ArrayLike,
    ensemble: ArrayLike,
    *,
    axis: int = 0,
    noise_var: ArrayLike | None = None,
    fair: bool = False,
) -> jax.Array:
    r"""CRPS of an ensemble forecast at ``y`` (energy form).

    .. math:: \mathrm{CRPS} = \frac1E\sum_e |x_e - y| - \frac{1}{2E^2}\sum_{e,f}|x_e - x_f|

    ``fair=True`` divides the second term by ``2E(E−1)`` (Ferro 2014; unbiased for the
    CRPS of the distribution the members are drawn from). With ``noise_var`` ``τ²`` each
    member becomes a Gaussian kernel ``N(x_e, τ²)`` and the absolute values become folded
    normal means, ``E|N(x_e − y, τ²)|`` and ``E|N(x_e − x_f, 2τ²)|`` (Grimit et al. 2006) —
    the exact CRPS of the mixture.

    Args:
      y: observations, shape ``S``.
      ensemble: members stacked on ``axis``; the other axes broadcast with ``y``.
      axis: the member axis.
      noise_var: optional ``τ²`` broadcastable to ``S``.
      fair: the fair (unbiased) estimator (needs ``E ≥ 2``).

    Returns:
      CRPS, shape ``S``; lower is better.
    """
    y, ens = _f(y, ensemble)
    ens = jnp.moveaxis(ens, axis, 0)
    E = ens.shape[0]
    pair_den = 2.0 * E * (E - 1) if fair else 2.0 * E * E
    if noise_var is None:
        term1 = jnp.mean(jnp.abs(ens - y), axis=0)
        srt = jnp.sort(ens, axis=0)
        coef = (2.0 * jnp.arange(E, dtype=ens.dtype) - E + 1.0).reshape(
            (E,) + (1,) * (ens.ndim - 1)
        )
        pair = 2.0 * jnp.sum(coef * srt, axis=0)  # Σ_e Σ_f |x_e − x_f|
        return term1 - pair / pair_den
    (tau2,) = _f(noise_var)
    tau2 = jnp.broadcast_to(tau2, jnp.broadcast_shapes(y.shape, ens.shape[1:]))
    term1 = jnp.mean(_abs_normal_mean(ens - y, tau2), axis=0)

    def body(acc, xe):
        return acc + jnp.sum(_abs_normal_mean(xe - ens, 2 * tau2), axis=0), None

    pair, _ = jax.lax.scan(body, jnp.zeros(term1.shape, term1.dtype), ens)
    if fair:  # drop the e == f terms, E|N(0, 2τ²)| each
        pair = pair - E * _abs_normal_mean(jnp.zeros_like(tau2), 2 * tau2)
    return term1 - pair / pair_den


@functools.partial(jax.jit, static_argnames=("level",))
def interval_covered(y: ArrayLike, mean: ArrayLike, var: ArrayLike, *, level: float) -> jax.Array:
    r"""Whether ``y`` lies in the Gaussian central interval ``μ ± Φ⁻¹((1+L)/2)·σ`` (bool)."""
    y, mean, var = _f(y, mean, var)
    q = jax.scipy.special.ndtri(jnp.asarray((1.0 + level) / 2.0, y.dtype))
    return jnp.abs(y - mean) <= q * jnp.sqrt(jnp.maximum(var, 0.0))


def _avg_rank_1d(x: jax.Array, valid: jax.Array) -> jax.Array:
    xv = jnp.where(valid, x, jnp.inf)
    s = jnp.sort(xv)
    left = jnp.searchsorted(s, xv, side="left")
    right = jnp.searchsorted(s, xv, side="right")
    return (left + right + 1).astype(x.dtype) / 2.0


@jax.jit
def spearman(x: ArrayLike, y: ArrayLike, *, where: ArrayLike | None = None) -> jax.Array:
    r"""Spearman rank correlation over the last axis (average ranks for ties).

    The Pearson correlation (:func:`vcjax.metrics.pearson`) of the average ranks of the
    selected, finite pairs. NaN when fewer than 2 pairs or either side is constant.
    """
    x, y = _f(x, y)
    x, y = jnp.broadcast_arrays(x, y)
    valid = jnp.isfinite(x) & jnp.isfinite(y)
    if where is not None:
        valid = valid & jnp.broadcast_to(jnp.asarray(where, bool), x.shape)
    shape = x.shape
    G = shape[-1]
    rank = jax.vmap(_avg_rank_1d)
    rx = rank(x.reshape(-1, G), valid.reshape(-1, G)).reshape(shape)
    ry = rank(y.reshape(-1, G), valid.reshape(-1, G)).reshape(shape)
    return pearson(rx, ry, where=valid)


# ====================================================================== uncertainty


def level_name(level: float) -> str:
    return f"coverage_{level * 100:g}"


@functools.lru_cache(maxsize=32)
def _uncertainty_fn(levels: tuple[float, ...], has_ens: bool, fair: bool, per_gene: bool):
    def rows(truth, mean, var, noise, mask, ens):
        tot = var + noise
        valid = mask & jnp.isfinite(truth) & jnp.isfinite(mean) & jnp.isfinite(tot)
        n = jnp.sum(valid, axis=-1).astype(truth.dtype)
        ok = n > 0

        def avg(a):
            s = jnp.sum(jnp.where(valid, a, 0.0), axis=-1)
            return jnp.where(ok, s / jnp.where(ok, n, 1.0), jnp.nan)

        nll = gaussian_nll(truth, mean, tot)
        crps = (
            ensemble_crps(
                truth, ens, axis=1, noise_var=noise if has_ens == "noise" else None, fair=fair
            )
            if has_ens
            else gaussian_crps(truth, mean, tot)
        )
        sd_tot = jnp.sqrt(tot)
        z = (truth - mean) / sd_tot
        out = {"n_genes": n}
        for lv in levels:
            out[level_name(lv)] = avg(
                interval_covered(truth, mean, tot, level=lv).astype(truth.dtype)
            )
        out["nll"] = avg(nll)
        out["crps"] = avg(crps)
        out["mean_sq_z"] = avg(z * z)
        # the model's own uncertainty (without measurement noise) against its actual error
        out["spearman"] = spearman(jnp.sqrt(var), jnp.abs(truth - mean), where=valid)
        if per_gene:
            out.update(nll_gene=nll, crps_gene=crps, pit_gene=_Phi(z), z_gene=z)
        return out

    return jax.jit(rows)


class UncertaintyScores:
    """Result of :func:`uncertainty_scores`.

    Attributes:
      per_row: metric → ``(P,)`` array (``n_genes``, ``coverage_<L>``, ``nll``, ``crps``,
        ``mean_sq_z``, ``spearman``).
      overall: metric → float over every selected (perturbation, gene) pair (coverages,
        NLL, CRPS and ``mean_sq_z`` are gene-weighted means of the rows; ``spearman`` is
        computed on all pairs at once).
      per_gene: ``nll``, ``crps``, ``pit`` (``Φ(z)``), ``z`` as ``(P, G)`` arrays, or None.
      levels: the interval levels.
    """

    def __init__(self, per_row, overall, per_gene, levels):
        self.per_row = per_row
        self.overall = overall
        self.per_gene = per_gene
        self.levels = levels

    def to_frame(self, index: Sequence[str] | None = None) -> pd.DataFrame:
        """Per-row metrics as a DataFrame (one row per perturbation)."""
        df = pd.DataFrame(self.per_row)
        if index is not None:
            df.insert(0, "perturbation", list(index))
        return df

    def __repr__(self) -> str:  # pragma: no cover - cosmetic
        items = ", ".join(f"{k}={v:.4g}" for k, v in self.overall.items())
        return f"UncertaintyScores({items})"


def uncertainty_scores(
    truth: ArrayLike,
    mean: ArrayLike | None = None,
    var: ArrayLike | None = None,
    ensemble: ArrayLike | None = None,
    *,
    levels: Sequence[float] = LEVELS,
    noise_var: ArrayLike | None = None,
    where: ArrayLike | None = None,
    fair: bool = False,
    var_floor: float = 1e-8,
    per_gene: bool = False,
    chunk_size: int | None = None,
) -> UncertaintyScores:
    r"""Is a model's predictive uncertainty trustworthy? Coverage, NLL, CRPS, Spearman.

    The predictive distribution of gene ``g`` in perturbation ``p`` is ``N(μ, σ² + τ²)``
    with ``σ² = max(var, var_floor)`` and ``τ² = noise_var`` (0 by default) — or, for an
    ensemble, its members (mean and unbiased variance define ``μ, σ²`` for the Gaussian
    scores; the CRPS uses the members themselves, as Gaussian kernels of variance ``τ²``).

    Per perturbation (over the selected genes):

    * ``coverage_<100L>``: fraction of genes with ``|y − μ| ≤ Φ⁻¹((1+L)/2)·sqrt(σ²+τ²)``;
      a calibrated model gives ``L``;
    * ``nll``: mean Gaussian NLL (:func:`gaussian_nll`);
    * ``crps``: mean CRPS (:func:`gaussian_crps`, or :func:`ensemble_crps` for ensembles);
    * ``mean_sq_z``: mean of ``(y − μ)²/(σ²+τ²)`` (1 when calibrated; > 1 overconfident);
    * ``spearman``: rank correlation of ``σ`` (the model's own, without ``τ``) with
      ``|y − μ|`` (positive: the model knows where it errs);
    * ``n_genes``: genes used.

    Args:
      truth: observed profiles ``(P, G)``.
      mean: predicted means ``(P, G)``; default: the ensemble mean.
      var: predicted variances ``(P, G)`` (or ``(G,)``); default: the ensemble's unbiased
        variance.
      ensemble: ``(E, P, G)`` ensemble of predictions (``E ≥ 2``), or None.
      levels: central-interval levels in ``(0, 1)``.
      noise_var: measurement variance of the truth ``(P, G)`` (e.g. ``s²/n`` of the
        pseudobulk), added to the predictive variance.
      where: boolean gene mask ``(P, G)`` or ``(G,)`` (e.g. DEGs, a gene set).
      fair: fair ensemble CRPS.
      var_floor: floor on the predicted variance (keeps the NLL finite).
      per_gene: also return the ``(P, G)`` per-gene NLL, CRPS, PIT and z.
      chunk_size: rows per jitted chunk (default from :func:`vcjax.engine.default_chunk_size`).

    Returns:
      :class:`UncertaintyScores`.

    Raises:
      VcjaxInputError: shape mismatch, negative or non-finite variances, no uncertainty.
    """
    y = np.asarray(truth)
    if y.ndim != 2:
        raise VcjaxInputError(f"truth must be (P, G), got shape {y.shape}")
    P, G = y.shape
    ens = None
    if ensemble is not None:
        ens = np.asarray(ensemble)
        if ens.ndim != 3 or ens.shape[1:] != (P, G):
            raise VcjaxInputError(f"ensemble must be (E, {P}, {G}), got {ens.shape}")
        if ens.shape[0] < 2:
            raise VcjaxInputError("an ensemble needs at least 2 members")
        if not np.all(np.isfinite(ens)):
            raise VcjaxInputError("the ensemble has NaN/inf values")
        if mean is None:
            mean = ens.mean(axis=0)
        if var is None:
            var = ens.var(axis=0, ddof=1)
    if mean is None:
        raise VcjaxInputError("give mean (with var) or an ensemble")
    if var is None:
        raise VcjaxInputError("give a predictive variance (var) or an ensemble")
    mu = np.broadcast_to(np.asarray(mean), (P, G))
    v = np.asarray(var)
    if np.any(~np.isfinite(v)) or np.any(v < 0):
        raise VcjaxInputError("predicted variances must be finite and non-negative")
    v = np.broadcast_to(np.maximum(v, var_floor), (P, G))
    if noise_var is None:
        tau2 = np.zeros((P, G), y.dtype if y.dtype.kind == "f" else np.float32)
    else:
        tau2 = np.nan_to_num(np.broadcast_to(np.asarray(noise_var), (P, G)), nan=0.0)
        if np.any(tau2 < 0):
            raise VcjaxInputError("noise_var must be non-negative")
    mask = (
        np.ones((P, G), bool) if where is None else np.broadcast_to(np.asarray(where, bool), (P, G))
    )
    levels = tuple(float(x) for x in levels)
    if any(not 0 < lv < 1 for lv in levels):
        raise VcjaxInputError(f"levels must lie in (0, 1), got {levels}")

    dtype = engine.dtype_of(y, mu, v, tau2, ens)
    arrays = [np.asarray(a, dtype) for a in (y, mu, v, tau2)] + [mask]
    E = 1
    if ens is not None:
        E = ens.shape[0]
        arrays.append(np.ascontiguousarray(np.moveaxis(ens, 0, 1), dtype=dtype))  # (P, E, G)
    has_ens: Any = False
    if ens is not None:
        has_ens = "noise" if noise_var is not None else True
    fn = _uncertainty_fn(levels, has_ens, bool(fair), bool(per_gene))
    chunk = chunk_size or chunk_for(G * E, P)

    def call(*rows):
        if ens is None:
            return fn(*rows, None)
        return fn(*rows)

    out = engine.row_map(call, arrays, chunk_size=chunk, devices=jax.devices()[:1])
    per_row = {k: v for k, v in out.items() if not k.endswith("_gene")}
    per_row["n_genes"] = per_row["n_genes"].astype(np.int64)
    gene = {k[: -len("_gene")]: v for k, v in out.items() if k.endswith("_gene")} or None
    overall = _overall(per_row, levels, y, mu, v, mask)
    return UncertaintyScores(per_row, overall, gene, levels)


def chunk_for(width: int, n_rows: int, *, budget: int = 1 << 21) -> int:
    """Rows per chunk: about ``budget`` elements of ``width`` per row, a power of two, and
    no more than the next power of two above ``n_rows`` (small screens compile small)."""
    rows = max(1, min(1024, budget // max(width, 1)))
    rows = 1 << (rows.bit_length() - 1)
    cap = 1 << max(0, (max(n_rows, 1) - 1).bit_length())
    return max(1, min(rows, cap))


def _overall(per_row, levels, y, mu, v, mask) -> dict[str, float]:
    n = per_row["n_genes"].astype(np.float64)
    tot = n.sum()
    out: dict[str, float] = {"n_genes": float(tot)}
    names = [level_name(lv) for lv in levels] + ["nll", "crps", "mean_sq_z"]
    for k in names:
        vals = np.asarray(per_row[k], np.float64)
        ok = n > 0
        out[k] = float(np.sum(vals[ok] * n[ok]) / tot) if tot > 0 else np.nan
    sd = np.sqrt(np.asarray(v, np.float64))[mask]
    err = np.abs(np.asarray(y, np.float64) - np.asarray(mu, np.float64))[mask]
    fin = np.isfinite(sd) & np.isfinite(err)
    out["spearman"] = _spearman_np(sd[fin], err[fin])
    return out


def _spearman_np(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import rankdata

    if a.size < 2:
        return np.nan
    ra, rb = rankdata(a), rankdata(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = np.sqrt(np.sum(ra * ra) * np.sum(rb * rb))
    return float(np.sum(ra * rb) / den) if den > 0 else np.nan


def confidence_band(
    calibrated: ArrayLike, ci_low: ArrayLike | None = None, ci_high: ArrayLike | None = None
) -> np.ndarray:
    """``"high"``/``"medium"``/``"low"``/``"undefined"`` per perturbation (module docstring).

    high: ``calibrated ≥ 0.75`` and ``ci_low ≥ 0.5``; low: ``ci_high < 0.5``; medium:
    otherwise; undefined: NaN calibrated. Missing (None or NaN) interval ends fall back to
    the point estimate.
    """
    c = np.asarray(calibrated, np.float64)
    lo = c if ci_low is None else np.where(np.isnan(ci_low), c, np.asarray(ci_low, np.float64))
    hi = c if ci_high is None else np.where(np.isnan(ci_high), c, np.asarray(ci_high, np.float64))
    band = np.full(c.shape, "medium", dtype=object)
    band[(c >= BANDS["high"]) & (lo >= BANDS["interval_floor"])] = "high"
    band[hi < BANDS["interval_floor"]] = "low"
    band[np.isnan(c)] = "undefined"
    return band
