r"""Confidence per gene, per pathway and per perturbation, and scores for a model's own uncertainty.

The pLDDT of perturbation prediction: how far is a prediction from the measurement, in
units of the measurement's own sampling noise?

**Per (perturbation, gene)** — the replicate z-score and a 0–100 confidence.
The truth ``y`` is the half-2 pseudobulk (METRICS.md §2) of ``n₂`` cells with unbiased
per-gene variance ``s₂²``; the technical duplicate ``d`` is the half-1 pseudobulk (``n₁``,
``s₁²``). Two measurements of the same population differ by ``d − y`` with variance
``s₁²/n₁ + s₂²/n₂``. With ``null="replicate"`` (default)

.. math::
   z = \frac{\hat y - y}{\mathrm{se}}, \qquad
   \mathrm{se}^2 = \frac{s_1^2}{n_1} + \frac{s_2^2}{n_2}, \qquad
   \nu = \frac{\mathrm{se}^4}{\frac{(s_1^2/n_1)^2}{n_1-1} + \frac{(s_2^2/n_2)^2}{n_2-1}}

so that the technical duplicate's ``z`` follows the replicate-noise distribution, Student
``t`` with Welch–Satterthwaite ``ν`` (≈ N(0, 1)). ``null="population"`` uses
``se² = s₂²/n₂``, ``ν = n₂ − 1``: the null is a perfect model of the population mean.
``|z|`` is mapped through that distribution, ``p = P(|T_ν| ≥ |z|)``, and then

.. math::
   \mathrm{confidence} = 100 \cdot \mathrm{clip}\Big(1 + \frac{\log_{10}(p/\alpha)}{D},\ 0,\ 1\Big)

with tolerance ``α = 0.05`` and ``D = 3`` decades by default. Reading: an error inside the
central ``1 − α`` range of replicate noise (``|z| ≤ 1.96`` for large ``ν``) scores 100;
beyond it the score loses ``100/D`` points per decade of p-value, 0 at ``p ≤ α·10^{-D}``
(``|z| ≥ 4.06``). Calibration: for a replicate ``p ~ U(0, 1)`` exactly, hence

.. math:: \mathbb E[\mathrm{confidence}_{\text{replicate}}] = 100\,\big(1 - \tfrac{\alpha}{D \ln 10}\big)
          = 99.28 \quad(\alpha = 0.05, D = 3).

Reference points (large ``ν``): ``|z|`` = 1.96 → 100, 2.58 → 76.7, 3.0 → 57.7, 3.29 →
43.4, 3.89 → 10, ≥ 4.06 → 0. Sparse genes: where a half holds less than one detection of
a gene (``n·mean < v̄_g``, with ``v̄_g = Σx²/Σx`` over all cells, the gene's typical
non-zero value), that half's variance is raised to ``v̄_g²/n``, the variance of a single
detection among ``n`` cells (``floor="detection"``; dense genes are untouched). NaN where
the noise is undefined (a half with fewer than 2 cells) or zero (``floor=None`` and a gene
constant in both halves; ``min_se`` floors ``se``).

**Per gene set** (GMT file or dict, :mod:`vcjax.gene_sets`) and perturbation: R²w(Δ) and
WMSE restricted to the set's genes through the kernels' ``where=`` mask (same DEG weights,
reference and DbD no-DEG gate as :func:`vcjax.evaluate`), the mean gene confidence over
the set's genes (the ``confidence`` column), and ``coverage`` = fraction of the set's genes
present in the data. Intervals: a parametric (central-limit) resampling of the truth
measurement, ``y* = y + se₂·ε``, ``ε ~ N(0, 1)`` per gene, ``n_boot`` draws, percentile
interval at level ``ci``; weights, reference and prediction are held fixed. It answers
"how much would this score move with another measurement of the same cells' population".

**Per perturbation**: the calibrated score of :func:`vcjax.evaluate` (0 at the best
negative/null baseline, 1 at the technical duplicate; default metric R²w(Δ)) with an
interval: ``interval="bootstrap"`` (default when :mod:`vcjax.bootstrap` is present) takes
the cell bootstrap of :func:`vcjax.evaluate` (``calibrated_ci_low/high``);
``interval="parametric"`` uses the Gaussian resampling above, applied to the truth and to
the duplicate (``d* = d + se₁·ε'``, and the null baseline's half-1 profile likewise;
control and data means fixed). ``confidence = 100·clip(calibrated, 0, 1)`` and a band:

* ``high``: calibrated ≥ 0.75 **and** the interval's lower end ≥ 0.5;
* ``low``: the interval's upper end < 0.5;
* ``medium``: otherwise; ``undefined`` when the calibrated score is NaN.
  Without intervals (``n_boot=0``) the interval is the point estimate.

**A model's own uncertainty** (:func:`uncertainty_scores`): given a predictive variance
``(P, G)`` or an ensemble ``(E, P, G)``, the empirical coverage of Gaussian central
intervals ``μ ± Φ⁻¹((1+L)/2)·σ`` at levels ``L``, the Gaussian NLL, the CRPS (closed form
for a Gaussian; for an ensemble the energy-form estimator
``(1/E)Σ|x_e − y| − (1/2E²)ΣΣ|x_e − x_f|``, or the "fair" ``1/(2E(E−1))`` version), the
mean squared standardised error (1 when calibrated), and the Spearman correlation between
the predicted standard deviation and the absolute error, per perturbation (over genes) and
overall (over all perturbation × gene pairs). The truth is a noisy measurement: pass
``noise_var`` (in :func:`confidence`: ``add_noise=True`` adds ``se₂²``) to score the
model's predictive distribution convolved with the measurement noise (for an ensemble, the
CRPS of the Gaussian-kernel mixture ``N(x_e, noise_var)``, closed form).

Everything per perturbation runs row-wise through :func:`vcjax.engine.row_map` (jitted,
chunked, no Python loop over perturbations).

References:
  Jumper et al., *Highly accurate protein structure prediction with AlphaFold*, Nature 596
  (2021) — pLDDT, the inspiration. Gneiting & Raftery, *Strictly proper scoring rules,
  prediction, and estimation*, JASA 102 (2007) — CRPS, its Gaussian closed form and the
  energy form. Grimit et al., QJRMS 132 (2006) — CRPS of Gaussian mixtures. Ferro, QJRMS
  140 (2014) — the fair ensemble CRPS. METRICS.md §2–§5 (truth, duplicate, metrics).
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from jax.typing import ArrayLike

from vcjax import baselines as B
from vcjax import deg as DEG
from vcjax import engine
from vcjax import gene_sets as GS
from vcjax import metrics as M
from vcjax.data import VcjaxInputError

__all__ = [
    "LEVELS",
    "BANDS",
    "confidence",
    "confidence_score",
    "detection_value",
    "replicate_noise",
    "gene_confidence",
    "gaussian_nll",
    "gaussian_crps",
    "ensemble_crps",
    "interval_covered",
    "spearman",
    "UncertaintyScores",
    "uncertainty_scores",
    "confidence_band",
    "plot_pathway_heatmap",
]

#: default central-interval levels scored by :func:`uncertainty_scores`.
LEVELS = (0.5, 0.8, 0.9, 0.95)
#: per-perturbation band thresholds on the calibrated score (see the module docstring).
BANDS = {"high": 0.75, "interval_floor": 0.5}

_PREPARE_KEYS = {
    "reference",
    "weights",
    "weights_from",
    "deg_method",
    "baselines",
    "split",
    "split_seed",
    "layer",
    "normalize",
    "covariate",
    "drop_small",
    "progress",
}
_SCORE_KEYS = {"k", "strict", "gate"}


# =========================================================================== kernels


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
    p = DEG.pvalues(z, jnp.where(ok, dof, 1.0))
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
    return M.pearson(rx, ry, where=valid)


# ====================================================================== uncertainty


def _level_name(level: float) -> str:
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
            out[_level_name(lv)] = avg(
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

    dtype = engine._dtype_of(y, mu, v, tau2, ens)
    arrays = [np.asarray(a, dtype) for a in (y, mu, v, tau2)] + [mask]
    E = 1
    if ens is not None:
        E = ens.shape[0]
        arrays.append(np.ascontiguousarray(np.moveaxis(ens, 0, 1), dtype=dtype))  # (P, E, G)
    has_ens: Any = False
    if ens is not None:
        has_ens = "noise" if noise_var is not None else True
    fn = _uncertainty_fn(levels, has_ens, bool(fair), bool(per_gene))
    chunk = chunk_size or _chunk_for(G * E, P)

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


def _chunk_for(width: int, n_rows: int, *, budget: int = 1 << 21) -> int:
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
    names = [_level_name(lv) for lv in levels] + ["nll", "crps", "mean_sq_z"]
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


# ================================================================== truth-side inputs


def _ev():
    """The :mod:`vcjax.evaluate` module (``vcjax.evaluate`` is shadowed by the function)."""
    import importlib

    return importlib.import_module("vcjax.evaluate")


def _split_kwargs(kwargs: Mapping[str, Any]) -> tuple[dict, dict]:
    unknown = set(kwargs) - _PREPARE_KEYS - _SCORE_KEYS
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {sorted(unknown)}")
    return (
        {k: v for k, v in kwargs.items() if k in _PREPARE_KEYS},
        {k: v for k, v in kwargs.items() if k in _SCORE_KEYS},
    )


def detection_value(stats) -> np.ndarray:
    r"""Typical non-zero value of each gene, ``v̄_g = Σ x² / Σ x`` over all cells (``(G,)``).

    For a gene with values in ``{0, v}`` this is exactly ``v``; NaN for a gene that is zero
    in every cell. ``stats`` is a :class:`vcjax.data.GroupStats` (or ``SplitStats.full``).
    """
    s = np.asarray(stats.sum, np.float64).sum(axis=0)
    ss = np.asarray(stats.sumsq, np.float64).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(s > 0, ss / np.where(s > 0, s, 1.0), np.nan)


def _halves(ctx, floor: str | None = "detection") -> dict[str, np.ndarray]:
    """Per-perturbation half-1 / half-2 moments, rows aligned with ``ctx.perts``.

    With ``floor="detection"``, where a half holds less than one detection's worth of a
    gene (``0 ≤ n·mean < v̄_g``, e.g. the gene is not detected in any of its cells), the
    half's variance is raised to ``v̄_g²/n``: the variance of one detection event (one cell
    at ``v̄_g``, the others 0) among ``n`` cells. Genes detected in at least a cell or so
    (every dense gene) keep their sample variance.
    """
    h1, h2 = ctx.stats.half1, ctx.stats.half2
    names = list(h1.names)
    rows = np.array([names.index(p) for p in ctx.perts])
    n1 = np.asarray(h1.n)[rows].astype(np.float64)
    n2 = np.asarray(h2.n)[rows].astype(np.float64)
    mean1, mean2 = h1.mean[rows], h2.mean[rows]
    var1, var2 = h1.var[rows], h2.var[rows]
    if floor == "detection":
        vbar = detection_value(ctx.stats.full)[None, :]

        def raise_(var, mean, n):
            n = n[:, None]
            with np.errstate(invalid="ignore"):
                sparse = (mean >= 0) & (n * mean < vbar) & np.isfinite(var)
                return np.where(sparse, np.maximum(var, vbar**2 / n), var)

        var1, var2 = raise_(var1, mean1, n1), raise_(var2, mean2, n2)
    elif floor is not None:
        raise ValueError(f"floor must be 'detection' or None, got {floor!r}")
    return dict(n1=n1, var1=var1, mean1=mean1, n2=n2, var2=var2)


def _as_matrix(obj, ctx, *, key, layer, normalize, what: str) -> np.ndarray:
    """A prediction-like input as ``(P, G)`` float64 aligned with ``ctx``."""
    _align_prediction = _ev()._align_prediction
    if isinstance(obj, str) and not os.path.exists(obj):
        if obj not in ctx.baselines:
            raise VcjaxInputError(
                f"{what} {obj!r} is not a baseline; available: {sorted(ctx.baselines)}"
            )
        return np.asarray(ctx.baselines[obj], np.float64)
    if isinstance(obj, (np.ndarray, jax.Array)):
        arr = np.asarray(obj, np.float64)
        shape = (len(ctx.perts), len(ctx.genes))
        if arr.shape != shape:
            raise VcjaxInputError(
                f"{what} array has shape {arr.shape}, expected {shape} (truth's perturbation × gene order)"
            )
        return arr
    if isinstance(obj, str) or hasattr(obj, "__fspath__"):
        from vcjax.data import read_h5ad

        obj = read_h5ad(obj)
    return _align_prediction(obj, ctx, key=key, layer=layer, normalize=normalize)


def _ensemble_matrix(ens, ctx, *, key, layer, normalize) -> np.ndarray:
    if isinstance(ens, (np.ndarray, jax.Array)):
        arr = np.asarray(ens, np.float64)
        shape = (len(ctx.perts), len(ctx.genes))
        if arr.ndim != 3 or arr.shape[1:] != shape:
            raise VcjaxInputError(
                f"ensemble array has shape {arr.shape}, expected (E, {shape[0]}, {shape[1]})"
            )
        return arr
    return np.stack(
        [
            _as_matrix(e, ctx, key=key, layer=layer, normalize=normalize, what="ensemble member")
            for e in ens
        ]
    )


# ============================================================== parametric resampling


@functools.lru_cache(maxsize=16)
def _pathway_fn(n_boot: int, strict: bool):
    def one_row(i, pred, y, se, dup, w, gated, ref, masks, key):
        S = masks.shape[0]

        def vals(p, yy):
            pb = jnp.broadcast_to(p, (S, p.shape[-1]))
            yb = jnp.broadcast_to(yy, pb.shape)
            wb = jnp.broadcast_to(w, pb.shape)
            r2 = M.r2w_delta(pb, yb, ref, wb, where=masks, strict=strict)
            e = M.wmse(pb, yb, wb, where=masks)
            nan = jnp.full_like(r2, jnp.nan)
            return jnp.where(gated, nan, r2), jnp.where(gated, nan, e)

        r2, e = vals(pred, y)
        r2d, ed = vals(dup, y)
        out = dict(r2w_delta=r2, wmse=e, r2w_delta_duplicate=r2d, wmse_duplicate=ed)
        if n_boot:
            keys = jax.random.split(jax.random.fold_in(key, i), n_boot)

            def draw(k):
                eps = jax.random.normal(k, y.shape, y.dtype)
                return vals(pred, y + jnp.nan_to_num(se) * eps)

            out["boot_r2w_delta"], out["boot_wmse"] = jax.vmap(draw)(keys)  # (B, S)
        return out

    return jax.jit(jax.vmap(one_row, in_axes=(0, 0, 0, 0, 0, 0, 0, None, None, None)))


def _percentile_interval(draws: np.ndarray, ci: float, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """NaN-skipping percentile interval over ``axis`` (NaN where every draw is NaN)."""
    d = np.asarray(draws, np.float64)
    d = np.where(np.isfinite(d), d, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices give NaN
        lo, hi = np.nanpercentile(d, [50 * (1 - ci), 50 * (1 + ci)], axis=axis)
    return lo, hi


@functools.lru_cache(maxsize=16)
def _perturbation_fn(
    metric: str,
    negatives: tuple[str, ...],
    n_boot: int,
    k: int,
    strict: bool,
    gate_deg: bool,
    gate_dm: bool,
    hib: bool,
):
    fn = engine.METRICS[metric].fn

    def calib(mm, md, negs):
        stack = jnp.stack(negs)
        isn = jnp.isnan(stack)
        fill = jnp.where(isn, -jnp.inf if hib else jnp.inf, stack)
        m_neg = jnp.where(jnp.all(isn), jnp.nan, jnp.max(fill) if hib else jnp.min(fill))
        span = md - m_neg
        better = span > 0 if hib else span < 0
        return jnp.where(better, (mm - m_neg) / jnp.where(better, span, 1.0), jnp.nan)

    def one_row(i, pred, y, se_y, dup, se_d, nul, se_n, w, m, nodeg, ref, u_ntc, u_full, key):
        def f(p, yy):
            v = fn(p, yy, ref, w, m, k=k, strict=strict)
            return jnp.where(nodeg, jnp.nan, v) if gate_deg else v

        def calibrated(yy, dd, nn):
            negs = []
            for name in negatives:
                if name == "control_mean":
                    negs.append(f(u_ntc, yy))
                elif name == "dataset_mean":
                    negs.append(jnp.full_like(f(u_full, yy), jnp.nan) if gate_dm else f(u_full, yy))
                else:
                    negs.append(f(nn, yy))
            return calib(f(pred, yy), f(dd, yy), negs)

        keys = jax.random.split(jax.random.fold_in(key, i), n_boot)

        def draw(kk):
            k1, k2, k3 = jax.random.split(kk, 3)
            yy = y + jnp.nan_to_num(se_y) * jax.random.normal(k1, y.shape, y.dtype)
            dd = dup + jnp.nan_to_num(se_d) * jax.random.normal(k2, y.shape, y.dtype)
            nn = nul + jnp.nan_to_num(se_n) * jax.random.normal(k3, y.shape, y.dtype)
            return calibrated(yy, dd, nn)

        return {"draws": jax.vmap(draw)(keys)}  # (B,)

    in_axes = (0,) * 11 + (None,) * 4
    return jax.jit(jax.vmap(one_row, in_axes=in_axes))


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


# ============================================================================ surface


def confidence(
    truth,
    pred=None,
    *,
    key: str,
    control: str,
    level: str = "gene",
    gene_sets: str | os.PathLike | Mapping[str, Sequence[str]] | None = None,
    pred_var=None,
    ensemble=None,
    seed: int = 0,
    metric: str = "r2w_delta",
    n_boot: int = 200,
    ci: float = 0.95,
    interval: str = "auto",
    null: str = "replicate",
    alpha: float = 0.05,
    decades: float = 3.0,
    min_se: float = 0.0,
    floor: str | None = "detection",
    levels: Sequence[float] = LEVELS,
    add_noise: bool = True,
    fair: bool = False,
    pred_layer: str | None = None,
    pred_normalize: str | None = "auto",
    chunk_size: int | None = None,
    **evaluate_kwargs: Any,
) -> pd.DataFrame:
    """Confidence of a prediction per gene, per gene set or per perturbation (0–100).

    See the module docstring for every formula and threshold.

    Args:
      truth: the measured screen (AnnData or ``.h5ad`` path), as for :func:`vcjax.evaluate`.
      pred: the model's point prediction (any form :func:`vcjax.evaluate` accepts, a
        ``(P, G)`` array in the truth's perturbation × gene order, or the name of a
        baseline such as ``"technical_duplicate"``). Default with an ensemble: its mean.
      key, control: the condition column and the control label.
      level: ``"gene"``, ``"pathway"`` or ``"perturbation"``.
      gene_sets: GMT path, ``"example"`` or mapping name → genes (needed for ``"pathway"``).
      pred_var: the model's predictive variance per (perturbation, gene), as ``pred``
        (not normalised).
      ensemble: ``(E, P, G)`` array, or a sequence of ``E`` predictions.
      seed: seed of the null baseline's derangement and of the resampling.
      metric: the per-perturbation metric (any engine metric, or a ``*_ctrl`` one).
      n_boot: resampling draws for intervals (0: none).
      ci: interval level.
      interval: per-perturbation interval: ``"bootstrap"`` (the cell bootstrap of
        :func:`vcjax.evaluate` / :mod:`vcjax.bootstrap`, ``calibrated_ci_low/high``: cells
        resampled within halves, weights and baselines refitted), ``"parametric"`` (the
        Gaussian resampling of the module docstring; cheap), or ``"auto"`` (bootstrap when
        :mod:`vcjax.bootstrap` is importable). Gene-set intervals are always parametric.
      null: ``"replicate"`` (100 ≈ a technical duplicate) or ``"population"``.
      alpha, decades: the confidence mapping (:func:`confidence_score`).
      min_se: floor on the noise standard error.
      floor: ``"detection"`` (default): where a half holds less than one detection of a
        gene (``n·mean < v̄_g``, :func:`detection_value`; e.g. not detected at all), its
        variance is raised to ``v̄_g²/n``, that of one detection among ``n`` cells, so
        undetected genes still get a noise scale (meant for non-negative expression);
        None keeps the raw variances (genes constant in both halves then get NaN).
      levels: predictive-interval levels scored when uncertainty is given.
      add_noise: add the truth's measurement variance ``s₂²/n₂`` to the predictive
        variance when scoring the model's uncertainty.
      fair: fair ensemble CRPS.
      pred_layer, pred_normalize: as :func:`vcjax.evaluate`.
      chunk_size: rows per jitted chunk.
      **evaluate_kwargs: ``reference``, ``weights``, ``weights_from``, ``deg_method``,
        ``baselines``, ``split``, ``split_seed``, ``layer``, ``normalize``, ``covariate``,
        ``drop_small``, ``progress`` (truth preparation) and ``k``, ``strict``, ``gate``.

    Returns:
      A tidy DataFrame (plus ``covariate`` with a covariate):

      * ``level="gene"``: ``perturbation, gene, pred, truth, error, se, dof, z, p_value,
        confidence, is_deg`` and, with uncertainty, ``pred_sd, nll, crps, pit``;
      * ``level="pathway"``: ``perturbation, gene_set, n_genes, n_present, coverage,
        confidence, r2w_delta, r2w_delta_ci_low, r2w_delta_ci_high, wmse, wmse_ci_low,
        wmse_ci_high, r2w_delta_duplicate, wmse_duplicate`` and, with uncertainty,
        ``coverage_<L>, nll, crps, spearman``;
      * ``level="perturbation"``: ``perturbation, metric, value, calibrated, ci_low,
        ci_high, confidence, band, gene_confidence, gene_confidence_degs`` and, with
        uncertainty, ``coverage_<L>, nll, crps, mean_sq_z, spearman``;
        ``df.attrs["uncertainty"]`` holds the overall uncertainty scores.
    """
    EV = _ev()
    if level not in ("gene", "pathway", "perturbation"):
        raise ValueError(f"level must be 'gene', 'pathway' or 'perturbation', got {level!r}")
    if null not in ("replicate", "population"):
        raise ValueError(f"null must be 'replicate' or 'population', got {null!r}")
    if level == "pathway" and gene_sets is None:
        raise ValueError("level='pathway' needs gene_sets (a GMT path or a mapping)")
    if pred is None and ensemble is None:
        raise ValueError("give a prediction (pred) or an ensemble")
    if interval not in ("auto", "bootstrap", "parametric"):
        raise ValueError(f"interval must be 'auto', 'bootstrap' or 'parametric', got {interval!r}")
    if interval == "auto":
        try:
            import vcjax.bootstrap  # noqa: F401

            interval = "bootstrap"
        except ImportError:  # pragma: no cover - bootstrap is part of the package
            interval = "parametric"
    prep_kw, score_kw = _split_kwargs(evaluate_kwargs)
    contexts = EV.prepare(truth, key=key, control=control, seed=seed, **prep_kw)
    for ctx in contexts:
        ctx.options["prepare_kwargs"] = dict(prep_kw)
    if len(contexts) > 1 and any(
        isinstance(x, (np.ndarray, jax.Array)) for x in (pred, pred_var, ensemble)
    ):
        raise VcjaxInputError(
            "with a covariate, give predictions with perturbation/gene names, not bare arrays"
        )
    frames, overall = [], {}
    for ctx in contexts:
        ctx.options["covariate_key"] = prep_kw.get("covariate")
        df, ov = _one(
            ctx,
            pred,
            level=level,
            gene_sets=gene_sets,
            pred_var=pred_var,
            ensemble=ensemble,
            seed=seed,
            metric=metric,
            n_boot=int(n_boot),
            ci=float(ci),
            null=null,
            alpha=alpha,
            decades=decades,
            min_se=min_se,
            floor=floor,
            levels=tuple(levels),
            add_noise=add_noise,
            fair=fair,
            key=key,
            pred_layer=pred_layer,
            pred_normalize=pred_normalize,
            chunk_size=chunk_size,
            score_kw=score_kw,
            interval=interval,
        )
        if ctx.covariate is not None:
            df.insert(1, "covariate", ctx.covariate)
            overall[ctx.covariate] = ov
        else:
            overall = ov
        frames.append(df)
    out = pd.concat(frames, ignore_index=True)
    out.attrs.update(
        level=level,
        null=null,
        alpha=alpha,
        decades=decades,
        n_boot=int(n_boot),
        ci=float(ci),
        metric=metric if level == "perturbation" else None,
        backend=jax.default_backend(),
    )
    if overall:
        out.attrs["uncertainty"] = overall
    return out


def _one(
    ctx,
    pred,
    *,
    level,
    gene_sets,
    pred_var,
    ensemble,
    seed,
    metric,
    n_boot,
    ci,
    null,
    alpha,
    decades,
    min_se,
    floor,
    levels,
    add_noise,
    fair,
    key,
    pred_layer,
    pred_normalize,
    chunk_size,
    score_kw,
    interval,
):
    P, G = len(ctx.perts), len(ctx.genes)
    align = dict(ctx=ctx, key=key, layer=pred_layer)
    ens = None
    if ensemble is not None:
        ens = _ensemble_matrix(ensemble, normalize=pred_normalize, **align)
    yhat = (
        _as_matrix(pred, normalize=pred_normalize, what="prediction", **align)
        if pred is not None
        else ens.mean(axis=0)
    )
    pvar = (
        None if pred_var is None else _as_matrix(pred_var, normalize=None, what="pred_var", **align)
    )
    h = _halves(ctx, floor)
    y = np.asarray(ctx.truth, np.float64)
    se2 = np.sqrt(h["var2"] / h["n2"][:, None])

    # ---- per gene: replicate z and confidence (row-wise, jitted)
    se, dof = replicate_noise(
        h["var2"],
        h["n2"][:, None],
        *((h["var1"], h["n1"][:, None]) if null == "replicate" else (None, None)),
        min_se=min_se,
    )
    gfn = _gene_fn(float(alpha), float(decades))
    got = engine.row_map(
        gfn,
        [yhat.astype(np.float32), y.astype(np.float32), np.asarray(se), np.asarray(dof)],
        chunk_size=chunk_size or _chunk_for(G, P),
        devices=jax.devices()[:1],
    )
    z, pval, conf = got["z"], got["p"], got["confidence"]

    # ---- the model's own uncertainty
    unc = None
    if pvar is not None or ens is not None:
        noise = np.nan_to_num(se2**2) if add_noise else None
        unc = uncertainty_scores(
            y,
            yhat if pred is not None else None,
            pvar,
            None if ens is None else ens,
            levels=levels,
            noise_var=noise,
            fair=fair,
            per_gene=level == "gene",
            chunk_size=chunk_size,
        )

    if level == "gene":
        df = pd.DataFrame(
            {
                "perturbation": np.repeat(np.asarray(ctx.perts, dtype=object), G),
                "gene": np.tile(np.asarray(ctx.genes, dtype=object), P),
                "pred": yhat.ravel(),
                "truth": y.ravel(),
                "error": (yhat - y).ravel(),
                "se": np.asarray(se, np.float64).ravel(),
                "dof": np.asarray(dof, np.float64).ravel(),
                "z": z.ravel().astype(np.float64),
                "p_value": pval.ravel().astype(np.float64),
                "confidence": conf.ravel().astype(np.float64),
            }
        )
        if ctx.deg_mask is not None:
            df["is_deg"] = np.asarray(ctx.deg_mask, bool).ravel()
        if unc is not None:
            sd = np.sqrt(pvar) if pvar is not None else ens.std(axis=0, ddof=1)
            df["pred_sd"] = sd.ravel()
            for k in ("nll", "crps", "pit"):
                df[k] = np.asarray(unc.per_gene[k], np.float64).ravel()
        return df, ({} if unc is None else unc.overall)

    if level == "pathway":
        return _pathway_table(
            ctx,
            yhat,
            y,
            se2,
            h["mean1"],
            conf,
            gene_sets,
            n_boot=n_boot,
            ci=ci,
            seed=seed,
            strict=bool(score_kw.get("strict", False)),
            gate=bool(score_kw.get("gate", True)),
            unc_inputs=(yhat if pred is not None else None, pvar, ens, add_noise, levels, fair),
            chunk_size=chunk_size,
        )

    return _perturbation_table(
        ctx,
        yhat,
        y,
        h,
        conf,
        metric=metric,
        n_boot=n_boot,
        ci=ci,
        seed=seed,
        score_kw=score_kw,
        unc=unc,
        chunk_size=chunk_size,
        interval=interval,
        source=pred if isinstance(pred, str) and pred in ctx.baselines else "model",
    )


@functools.lru_cache(maxsize=8)
def _gene_fn(alpha: float, decades: float):
    def f(pred, truth, se, dof):
        z, p, c = gene_confidence(pred, truth, se, dof, alpha=alpha, decades=decades)
        return {"z": z, "p": p, "confidence": c}

    return jax.jit(f)


def _masked_mean(values: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """``(P, S)`` mean of ``values (P, G)`` over each mask's genes, skipping NaN."""
    fin = np.isfinite(values)
    num = np.where(fin, values, 0.0) @ masks.T.astype(np.float64)
    cnt = fin.astype(np.float64) @ masks.T.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(cnt > 0, num / np.maximum(cnt, 1), np.nan)


def _pathway_table(
    ctx,
    yhat,
    y,
    se2,
    dup,
    conf,
    gene_sets,
    *,
    n_boot,
    ci,
    seed,
    strict,
    gate,
    unc_inputs,
    chunk_size,
):
    gsm = GS.gene_set_masks(gene_sets, ctx.genes)
    P, G = y.shape
    S = len(gsm.names)
    w = ctx.weights if ctx.weights is not None else np.ones((P, G), np.float32)
    gated = (
        (~np.asarray(ctx.deg_mask).any(axis=1))
        if (gate and ctx.deg_mask is not None)
        else np.zeros(P, bool)
    )
    fn = _pathway_fn(int(n_boot), strict)
    masks = jnp.asarray(gsm.masks)
    ref = jnp.asarray(ctx.reference, jnp.float32)
    key = jax.random.PRNGKey(seed)
    chunk = chunk_size or _chunk_for(S * G * max(n_boot, 1), P, budget=1 << 24)
    rows = (
        [np.arange(P, dtype=np.int32)]
        + [np.asarray(a, np.float32) for a in (yhat, y, se2, dup, w)]
        + [gated]
    )
    out = engine.row_map(
        lambda *r: fn(*r, ref, masks, key), rows, chunk_size=chunk, devices=jax.devices()[:1]
    )
    gene_conf = _masked_mean(np.asarray(conf, np.float64), gsm.masks)
    cols = {
        "perturbation": np.repeat(np.asarray(ctx.perts, dtype=object), S),
        "gene_set": np.tile(np.asarray(gsm.names, dtype=object), P),
        "n_genes": np.tile(gsm.n_genes, P),
        "n_present": np.tile(gsm.n_present, P),
        "coverage": np.tile(gsm.coverage, P),
        "confidence": gene_conf.ravel(),
    }
    for nm in ("r2w_delta", "wmse"):
        cols[nm] = np.asarray(out[nm], np.float64).ravel()
        if n_boot:
            lo, hi = _percentile_interval(out["boot_" + nm], ci, axis=1)  # (P, S)
        else:
            lo = hi = np.full((P, S), np.nan)
        cols[nm + "_ci_low"], cols[nm + "_ci_high"] = lo.ravel(), hi.ravel()
    for nm in ("r2w_delta_duplicate", "wmse_duplicate"):
        cols[nm] = np.asarray(out[nm], np.float64).ravel()
    df = pd.DataFrame(cols)
    mean, pvar, ens, add_noise, levels, fair = unc_inputs
    if pvar is not None or ens is not None:
        noise = np.nan_to_num(se2**2) if add_noise else None
        per_set = []
        for s in range(S):  # a loop over gene sets; each call is vectorised over perturbations
            u = uncertainty_scores(
                y,
                mean,
                pvar,
                ens,
                levels=levels,
                noise_var=noise,
                where=gsm.masks[s],
                fair=fair,
                chunk_size=chunk_size,
            )
            per_set.append(u.per_row)
        for k in [_level_name(lv) for lv in levels] + ["nll", "crps", "spearman"]:
            df[k] = np.stack([ps[k] for ps in per_set], axis=1).ravel().astype(np.float64)
    df.attrs["missing_genes"] = gsm.missing
    return df, {}


def _cell_bootstrap(ctx, yhat, *, metric, n_boot, ci, seed, score_kw, chunk_size, source="model"):
    """``calibrated_ci_low/high`` of the model (or of the baseline ``source``) from
    :func:`vcjax.evaluate`'s cell bootstrap."""
    EV = _ev()
    opts = ctx.options
    kw = {k: v for k, v in opts.get("prepare_kwargs", {}).items() if k != "progress"}
    table = EV.evaluate(
        ctx.adata,
        None if source != "model" else (list(ctx.perts), yhat, list(ctx.genes)),
        key=opts["key"],
        control=ctx.control,
        metrics=None if metric in EV.DEFAULT_METRICS else [metric],
        seed=seed,
        n_boot=n_boot,
        ci=ci,
        chunk_size=chunk_size,
        pred_normalize=None,
        **score_kw,
        **kw,
    )
    m = table[(table["source"] == source) & (table["metric"] == metric)]
    if ctx.covariate is not None and "covariate" in m.columns:
        m = m[m["covariate"].astype(str) == str(ctx.covariate)]
    m = m.set_index("perturbation").reindex(list(ctx.perts))
    lo = "calibrated_ci_low" if "calibrated_ci_low" in m.columns else "ci_low"
    hi = "calibrated_ci_high" if "calibrated_ci_high" in m.columns else "ci_high"
    return m[lo].to_numpy(np.float64), m[hi].to_numpy(np.float64)


def _perturbation_table(
    ctx,
    yhat,
    y,
    h,
    conf,
    *,
    metric,
    n_boot,
    ci,
    seed,
    score_kw,
    unc,
    chunk_size,
    interval="parametric",
    source="model",
):
    EV = _ev()
    k = int(score_kw.get("k", 20))
    strict = bool(score_kw.get("strict", False))
    gate = bool(score_kw.get("gate", True))
    base = EV._CTRL_METRICS.get(metric, metric)
    if base not in engine.METRICS:
        raise ValueError(
            f"metric {metric!r} is not supported here; use one of {sorted(engine.METRICS)}"
        )
    needs = engine.METRICS[base].needs
    if "weights" in needs and ctx.weights is None:
        raise ValueError(f"metric {metric!r} needs DEG weights (weights='deg')")
    if "mask" in needs and ctx.deg_mask is None:
        raise ValueError(f"metric {metric!r} needs DEG sets (weights='deg')")
    P, G = y.shape
    preds = {"model": yhat, **ctx.baselines}
    values = EV._score_sources(
        ctx, preds, [metric], k=k, strict=strict, gate=gate, chunk_size=chunk_size
    )
    cal = EV.calibrate(values)
    value = values["model"][metric]
    calibrated = cal["model"][metric]

    lo = hi = np.full(P, np.nan)
    if n_boot > 0 and interval == "bootstrap":
        lo, hi = _cell_bootstrap(
            ctx,
            yhat,
            metric=metric,
            n_boot=n_boot,
            ci=ci,
            seed=seed,
            score_kw=score_kw,
            chunk_size=chunk_size,
            source=source,
        )
    elif n_boot > 0 and P >= 1:
        negatives = tuple(s for s in EV._NEGATIVES if s in ctx.baselines)
        if not negatives:
            negatives = ("control_mean",)
        w = ctx.weights if ctx.weights is not None else np.ones((P, G), np.float32)
        if base == "pearson_delta_topk" and ctx.scores is not None:
            w = np.abs(ctx.scores)
        m = ctx.deg_mask if ctx.deg_mask is not None else np.ones((P, G), bool)
        nodeg = ~np.asarray(m).any(axis=1) if ctx.deg_mask is not None else np.zeros(P, bool)
        se_y = np.sqrt(h["var2"] / h["n2"][:, None])
        se_d = np.sqrt(h["var1"] / h["n1"][:, None])
        dup = h["mean1"]
        if P >= 2 and "null" in negatives:
            perm = B.null_derangement(P, seed=int(ctx.options.get("seed", seed)))
            nul, se_n = dup[perm], se_d[perm]
        else:
            nul, se_n = np.full_like(dup, np.nan), np.zeros_like(dup)
        ref = ctx.u_ntc if metric in EV._CTRL_METRICS else ctx.reference
        fn = _perturbation_fn(
            base,
            negatives,
            int(n_boot),
            k,
            strict,
            gate and metric in EV._DEG_GATED and ctx.deg_mask is not None,
            gate and metric in EV._PEARSON_LIKE,
            EV.higher_is_better(metric),
        )
        shared = [jnp.asarray(a, jnp.float32) for a in (ref, ctx.u_ntc, ctx.u_all_full)] + [
            jax.random.PRNGKey(seed + 1)
        ]
        rows = (
            [np.arange(P, dtype=np.int32)]
            + [np.asarray(a, np.float32) for a in (yhat, y, se_y, dup, se_d, nul, se_n, w)]
            + [np.asarray(m, bool), nodeg]
        )
        chunk = chunk_size or _chunk_for(G * int(n_boot) * 6, P, budget=1 << 24)
        out = engine.row_map(
            lambda *r: fn(*r, *shared), rows, chunk_size=chunk, devices=jax.devices()[:1]
        )
        lo, hi = _percentile_interval(out["draws"], ci, axis=1)
        lo = np.where(np.isnan(calibrated), np.nan, lo)
        hi = np.where(np.isnan(calibrated), np.nan, hi)

    conf64 = np.asarray(conf, np.float64)
    fin = np.isfinite(conf64)
    with np.errstate(invalid="ignore", divide="ignore"):
        gconf = np.where(
            fin.any(1), np.where(fin, conf64, 0).sum(1) / np.maximum(fin.sum(1), 1), np.nan
        )
        if ctx.deg_mask is not None:
            dm = np.asarray(ctx.deg_mask, bool) & fin
            gconf_deg = np.where(
                dm.any(1), np.where(dm, conf64, 0).sum(1) / np.maximum(dm.sum(1), 1), np.nan
            )
        else:
            gconf_deg = np.full(P, np.nan)
    df = pd.DataFrame(
        {
            "perturbation": list(ctx.perts),
            "metric": metric,
            "value": value,
            "calibrated": calibrated,
            "ci_low": lo,
            "ci_high": hi,
            "confidence": 100.0 * np.clip(calibrated, 0.0, 1.0),
            "band": confidence_band(calibrated, lo, hi),
            "gene_confidence": gconf,
            "gene_confidence_degs": gconf_deg,
        }
    )
    if unc is not None:
        for key_, v in unc.per_row.items():
            if key_ != "n_genes":
                df[key_] = np.asarray(v, np.float64)
    return df, ({} if unc is None else unc.overall)


# ============================================================================ figure


def plot_pathway_heatmap(
    df: pd.DataFrame,
    *,
    value: str = "confidence",
    cmap: str = "viridis",
    vmin: float | None = None,
    vmax: float | None = None,
    annotate: bool | None = None,
    title: str | None = None,
):
    """Heat map of a ``level="pathway"`` table: gene sets × perturbations.

    Rows are gene sets labelled ``name (present/total)``; columns perturbations (with the
    covariate appended when present). NaN cells are grey. Built on
    :class:`matplotlib.figure.Figure` (no pyplot state), ready for ``fig.savefig`` or a
    report.

    Args:
      df: output of :func:`confidence` with ``level="pathway"``.
      value: column to show (``confidence`` 0–100 by default; e.g. ``r2w_delta``).
      cmap: matplotlib colour map.
      vmin, vmax: colour limits (default 0–100 for ``confidence``, else the data range).
      annotate: write values in the cells (default: when the grid has at most 400 cells).
      title: figure title.

    Returns:
      ``matplotlib.figure.Figure``.
    """
    import matplotlib
    from matplotlib.figure import Figure

    need = {"perturbation", "gene_set", value}
    if not need <= set(df.columns):
        raise ValueError(
            f"plot_pathway_heatmap needs columns {sorted(need)} (a level='pathway' table)"
        )
    d = df.copy()
    if "covariate" in d.columns:
        d["perturbation"] = d["perturbation"].astype(str) + " | " + d["covariate"].astype(str)
    sets = list(dict.fromkeys(d["gene_set"]))
    perts = list(dict.fromkeys(d["perturbation"]))
    grid = d.pivot_table(
        index="gene_set", columns="perturbation", values=value, aggfunc="mean", dropna=False
    )
    grid = grid.reindex(index=sets, columns=perts)
    data = np.ma.masked_invalid(grid.to_numpy(np.float64))
    if value == "confidence":
        vmin = 0.0 if vmin is None else vmin
        vmax = 100.0 if vmax is None else vmax
    labels = sets
    if {"n_present", "n_genes"} <= set(d.columns):
        first = d.drop_duplicates("gene_set").set_index("gene_set")
        labels = [
            f"{s} ({int(first.at[s, 'n_present'])}/{int(first.at[s, 'n_genes'])})" for s in sets
        ]
    S, P = data.shape
    fig = Figure(figsize=(max(4.0, 0.32 * P + 3.5), max(2.5, 0.32 * S + 1.6)), layout="constrained")
    ax = fig.add_subplot()
    cm = matplotlib.colormaps[cmap].with_extremes(bad="#d0d0d0")
    im = ax.imshow(data, aspect="auto", cmap=cm, vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_xticks(range(P), labels=perts, rotation=90, fontsize=7)
    ax.set_yticks(range(S), labels=labels, fontsize=7)
    ax.set_xlabel("perturbation")
    ax.set_ylabel("gene set (present/total genes)")
    if annotate is None:
        annotate = S * P <= 400
    if annotate:
        lo, hi = im.get_clim()
        for i in range(S):
            for j in range(P):
                if data.mask is not np.ma.nomask and data.mask[i, j]:
                    continue
                v = float(data[i, j])
                frac = (v - lo) / (hi - lo) if hi > lo else 0.5
                ax.text(
                    j,
                    i,
                    f"{v:.0f}" if value == "confidence" else f"{v:.2f}",
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="white" if frac < 0.5 else "black",
                )
    cbar = fig.colorbar(im, ax=ax, shrink=0.8)
    cbar.set_label(value)
    ax.set_title(title or f"per-pathway {value}", fontsize=9)
    return fig
