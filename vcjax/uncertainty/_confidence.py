r"""Confidence per gene, per pathway and per perturbation: the pLDDT of perturbation prediction.

How far is a prediction from the measurement, in units of the measurement's own sampling
noise (:mod:`vcjax.uncertainty._scores` for the formulas)?

**Per (perturbation, gene)** — the replicate z-score and a 0–100 confidence. The truth
``y`` is the half-2 pseudobulk of ``n₂`` cells with unbiased per-gene variance ``s₂²``; the
technical duplicate ``d`` is the half-1 pseudobulk (``n₁``, ``s₁²``). With
``null="replicate"`` (default) ``se² = s₁²/n₁ + s₂²/n₂`` (Welch–Satterthwaite ``ν``), so that
the technical duplicate's ``z`` follows the replicate-noise distribution; ``null="population"``
uses ``se² = s₂²/n₂``, ``ν = n₂ − 1`` (the null is a perfect model of the population mean).
Reference points (large ``ν``): ``|z|`` = 1.96 → 100, 2.58 → 76.7, 3.0 → 57.7, 3.29 → 43.4,
3.89 → 10, ≥ 4.06 → 0. Sparse genes: where a half holds less than one detection of a gene
(``n·mean < v̄_g``, with ``v̄_g = Σx²/Σx`` over all cells, the gene's typical non-zero value),
that half's variance is raised to ``v̄_g²/n``, the variance of a single detection among
``n`` cells (``floor="detection"``; dense genes are untouched). NaN where the noise is
undefined (a half with fewer than 2 cells) or zero (``floor=None`` and a gene constant in
both halves; ``min_se`` floors ``se``).

Gene-level summaries: ``gene_confidence`` is the unweighted mean of the finite gene
confidences over the genes (all of them per perturbation, the set's per gene set);
``gene_confidence_weighted`` is ``Σ w_g c_g / Σ w_g`` over the same finite genes, with the
DEG weights ``w_g`` of WMSE/R²w(Δ) (the DbD weights; uniform with ``weights="uniform"``;
NaN where those genes carry no weight) — most genes of a perturbation do not respond, so
the unweighted mean is diluted by them (the dataset mean scores ~99 on it);
``gene_confidence_degs`` (per perturbation) is the unweighted mean over the DEG set. The
gene table has the weight of each gene (``weight``).

**Per gene set** (GMT file or dict) and perturbation, with the DEG weights ``w`` restricted
to the set's genes ``S`` (same weights, reference ``r`` and DbD no-DEG gate as
:func:`vcjax.evaluate`; ``coverage`` = fraction of the set's genes present in the data):

* ``r2w_delta`` = R²w(Δ) on the set, ``1 − Σ_S w(Δ − Δ̂)² / Σ_S w(Δ − Δ̄_w)²``, and
  ``r2w_delta_duplicate`` the same for the technical duplicate ``d``; ``wmse`` and
  ``wmse_duplicate`` the weighted MSEs;
* ``calibrated = r2w_delta / r2w_delta_duplicate``: the share of the set's weighted
  variance of Δ explained by the prediction, in units of what a second measurement of the
  same cells explains (0: no better than the set's weighted mean Δ̄_w, which itself knows
  the set's mean response; 1: as good as the duplicate; > 1: better);
* ``confidence = 100·clip(calibrated, 0, 1)``: 100 = the prediction reproduces the set's
  gene-specific response as well as a technical duplicate; 0 = it explains none of it (any
  negative R²w(Δ), e.g. the dataset mean on a set that responds). ``band`` as per
  perturbation (:func:`confidence_band` on ``calibrated`` and its interval).

Undefined (NaN, ``reason`` says why; "" where defined; checked in this order,
:data:`PATHWAY_REASONS`): ``no_genes`` (no gene of the set in the data), ``no_degs``
(perturbation without DEGs: the DbD gate), ``no_weight`` (``Σ_S w = 0``),
``too_few_genes`` (fewer than 2 genes with ``w > 0``), ``constant_truth`` (the truth
``y`` or its Δ is constant on the weighted genes, e.g. the set is not detected in the
truth half): for these ``r2w_delta``, ``r2w_delta_duplicate``, ``calibrated`` and
``confidence`` are NaN (no forced 1.0/0.0 on a gene set, whatever ``strict``); and
``duplicate_not_better`` (``r2w_delta_duplicate ≤ 0``: the duplicate does not reproduce the
set's within-set pattern, so the set's response is not measured above replicate noise and
cannot be calibrated): ``calibrated`` and ``confidence`` are NaN, the R²w(Δ) values are
kept.

Intervals (``n_boot > 0``, level ``ci``): a parametric bootstrap from the fitted model.
Both halves are drawn anew around the pooled pseudobulk ``μ̂ = (n₁d + n₂y)/(n₁+n₂)``:
``y* = μ̂ + σ₂ε``, ``d* = μ̂ + σ₁ε'`` (``σᵢ² = sᵢ²/nᵢ``, floored as above; ``ε, ε' ~ N(0, 1)``
per gene); prediction, weights and reference fixed. Each draw gives ``r2w_delta*``,
``wmse*`` and ``calibrated* = r2w_delta*/r2w_delta_duplicate*`` (NaN, ignored, where
``r2w_delta_duplicate* ≤ 0``). Intervals are :func:`vcjax.stats.interval`'s with
``target="expected"``: the draws' mean is moved to the estimate, their ``(1 ∓ ci)/2``
quantiles taken, the ends clipped to the metric's range (:func:`vcjax.metrics.metric_bounds`:
R²w(Δ) ≤ 1, WMSE ≥ 0, ``calibrated`` unbounded) and widened if need be to contain the
estimate. It is the spread of the estimate over repeats of the experiment, placed at the
estimate; the confidence interval is ``100·clip`` of the calibrated one. NaN where the
estimate is NaN or no draw is defined.

**Per perturbation**: the calibrated score of :func:`vcjax.evaluate` (0 at the best
negative/null baseline, 1 at the technical duplicate; default metric R²w(Δ)) with an
interval: ``interval="bootstrap"`` (default) from the cell bootstrap
(:func:`vcjax.pipeline.stratum_samples`: cells resampled within halves, weights and
baselines refitted, on the same prepared truth; the interval of :func:`vcjax.evaluate`);
``interval="parametric"`` from a Gaussian resampling of the measurements, ``y* = y + σ₂ε``,
``d* = d + σ₁ε'`` and the null baseline's half-1 profile likewise (control and data means
fixed), with the same interval (unbounded; it contains the estimate).
``confidence = 100·clip(calibrated, 0, 1)`` (100: at least as good as the technical
duplicate; 0: no better than the best negative baseline; NaN where the calibrated score is,
:func:`vcjax.pipeline.calibrate`) and a band (:func:`confidence_band`):
``high`` when calibrated ≥ 0.75 **and** the interval's lower end ≥ 0.5; ``low`` when the
interval's upper end < 0.5; ``medium`` otherwise; ``undefined`` when calibrated is NaN.

With ``pred_var=`` or ``ensemble=`` every level also scores the model's own uncertainty
(:func:`vcjax.uncertainty.uncertainty_scores`). Everything per perturbation runs row-wise
through :func:`vcjax.engine.row_map` (jitted, chunked, no Python loop over perturbations).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from vcjax import engine
from vcjax._errors import VcjaxInputError
from vcjax._host import device_array
from vcjax.data import gene_set_masks, read_h5ad
from vcjax.metrics import KERNELS, METRICS, metric_bounds, metric_spec, r2w_delta, wmse
from vcjax.pipeline import (
    NEGATIVES,
    BootSpec,
    Prediction,
    ScoreSpec,
    Screen,
    Stratum,
    align,
    align_stratum,
    as_screen,
    calibrate,
    gate,
    null_derangement,
    score_sources,
    stratum_samples,
)
from vcjax.stats import interval as boot_interval
from vcjax.uncertainty._scores import (
    LEVELS,
    chunk_for,
    confidence_band,
    gene_confidence,
    level_name,
    replicate_noise,
    uncertainty_scores,
)

__all__ = ["PATHWAY_REASONS", "confidence", "detection_value"]


def detection_value(stats) -> np.ndarray:
    r"""Typical non-zero value of each gene, ``v̄_g = Σ x² / Σ x`` over all cells (``(G,)``).

    For a gene with values in ``{0, v}`` this is exactly ``v``; NaN for a gene that is zero
    in every cell. ``stats`` is a :class:`vcjax.data.GroupStats` (or ``SplitStats.full``).
    """
    s = np.asarray(stats.sum, np.float64).sum(axis=0)
    ss = np.asarray(stats.sumsq, np.float64).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(s > 0, ss / np.where(s > 0, s, 1.0), np.nan)


def _halves(stratum: Stratum, floor: str | None = "detection") -> dict[str, np.ndarray]:
    """Per-perturbation half-1 / half-2 moments, rows aligned with the stratum's perturbations.

    With ``floor="detection"``, where a half holds less than one detection's worth of a
    gene (``0 ≤ n·mean < v̄_g``, e.g. the gene is not detected in any of its cells), the
    half's variance is raised to ``v̄_g²/n``: the variance of one detection event (one cell
    at ``v̄_g``, the others 0) among ``n`` cells. Genes detected in at least a cell or so
    (every dense gene) keep their sample variance.
    """
    h1, h2 = stratum.stats.half1, stratum.stats.half2
    pos = {g: i for i, g in enumerate(stratum.groups)}
    rows = np.array([pos[p] for p in stratum.perturbations])
    n1 = np.asarray(h1.n)[rows].astype(np.float64)
    n2 = np.asarray(h2.n)[rows].astype(np.float64)
    mean1, mean2 = h1.mean[rows], h2.mean[rows]
    var1, var2 = h1.var[rows], h2.var[rows]
    if floor == "detection":
        vbar = detection_value(stratum.stats.full)[None, :]

        def raise_(var, mean, n):
            n = n[:, None]
            with np.errstate(invalid="ignore"):
                sparse = (mean >= 0) & (n * mean < vbar) & np.isfinite(var)
                return np.where(sparse, np.maximum(var, vbar**2 / n), var)

        var1, var2 = raise_(var1, mean1, n1), raise_(var2, mean2, n2)
    elif floor is not None:
        raise ValueError(f"floor must be 'detection' or None, got {floor!r}")
    return dict(n1=n1, var1=var1, mean1=mean1, n2=n2, var2=var2)


def _as_matrix(obj, screen: Screen, index: int, *, layer, normalize, what: str) -> np.ndarray:
    """A prediction-like input as ``(P, G)`` float64 aligned with stratum ``index``; a string
    that is not a file names a baseline."""
    stratum, spec = screen.strata[index], screen.spec
    if isinstance(obj, Prediction):
        return align(obj, screen).matrices[index]
    if isinstance(obj, str) and not os.path.exists(obj):
        if obj not in stratum.derived.baselines:
            raise VcjaxInputError(
                f"{what} {obj!r} is not a baseline; available: {sorted(stratum.derived.baselines)}"
            )
        return np.asarray(stratum.baselines[obj], np.float64)
    if isinstance(obj, (str, os.PathLike)):
        obj = read_h5ad(obj)
    if isinstance(obj, (np.ndarray, jax.Array)):
        shape = (len(stratum.perturbations), len(stratum.genes))
        arr = np.asarray(obj, np.float64)
        if arr.shape != shape:
            raise VcjaxInputError(
                f"{what} array has shape {arr.shape}, expected {shape} (truth's perturbation × gene order)"
            )
        return arr
    return align_stratum(
        obj, stratum, key=spec.key, covariate_key=spec.covariate, layer=layer, normalize=normalize
    )


def _ensemble_matrix(ens, screen: Screen, index: int, *, layer, normalize) -> np.ndarray:
    stratum = screen.strata[index]
    if isinstance(ens, (np.ndarray, jax.Array)):
        arr = np.asarray(ens, np.float64)
        shape = (len(stratum.perturbations), len(stratum.genes))
        if arr.ndim != 3 or arr.shape[1:] != shape:
            raise VcjaxInputError(
                f"ensemble array has shape {arr.shape}, expected (E, {shape[0]}, {shape[1]})"
            )
        return arr
    return np.stack(
        [
            _as_matrix(e, screen, index, layer=layer, normalize=normalize, what="ensemble member")
            for e in ens
        ]
    )


def _interval(draws, estimate, *, ci: float, bounds) -> tuple[np.ndarray, np.ndarray]:
    """Interval of resampled values around their estimate, in the metric's range:
    :func:`vcjax.stats.interval` with ``target="expected"`` (the draws' mean bias removed),
    percentile method, ends clipped to ``bounds`` and widened to contain the estimate. NaN
    where the estimate or every draw is NaN."""
    return boot_interval(
        draws, estimate, ci=ci, method="percentile", target="expected", bounds=bounds
    )


# ============================================================== parametric resampling


@functools.lru_cache(maxsize=16)
def _pathway_fn(n_boot: int):
    """Per row: the set statistics of the prediction and of the duplicate, and ``n_boot``
    parametric draws of them (module docstring), vmapped over perturbations."""

    def one_row(i, pred, y, mu, sd_y, sd_d, dup, w, gated, ref, masks, key):
        S = masks.shape[0]

        def vals(p, yy):
            pb = jnp.broadcast_to(p, (S, p.shape[-1]))
            yb = jnp.broadcast_to(yy, pb.shape)
            wb = jnp.broadcast_to(w, pb.shape)
            r2 = r2w_delta(pb, yb, ref, wb, where=masks, strict=True)
            e = wmse(pb, yb, wb, where=masks)
            nan = jnp.full_like(r2, jnp.nan)
            return jnp.where(gated, nan, r2), jnp.where(gated, nan, e)

        r2, e = vals(pred, y)
        r2d, ed = vals(dup, y)
        out = dict(r2w_delta=r2, wmse=e, r2w_delta_duplicate=r2d, wmse_duplicate=ed)
        if n_boot:
            keys = jax.random.split(jax.random.fold_in(key, i), n_boot)

            def draw(k):
                k1, k2 = jax.random.split(k)
                yy = mu + jnp.nan_to_num(sd_y) * jax.random.normal(k1, y.shape, y.dtype)
                dd = mu + jnp.nan_to_num(sd_d) * jax.random.normal(k2, y.shape, y.dtype)
                r2_, e_ = vals(pred, yy)
                r2d_, _ = vals(dd, yy)
                return r2_, e_, r2d_

            b_r2, b_e, b_r2d = jax.vmap(draw)(keys)  # (B, S) each
            out.update(boot_r2w_delta=b_r2, boot_wmse=b_e, boot_r2w_delta_duplicate=b_r2d)
        return out

    return jax.jit(jax.vmap(one_row, in_axes=(0,) * 9 + (None,) * 3))


@functools.lru_cache(maxsize=16)
def _perturbation_fn(
    metric: str,
    negatives: tuple[str, ...],
    n_boot: int,
    k: int,
    strict: bool,
    gated: bool,
    data_mean_undefined: bool,
):
    """Parametric draws of one perturbation's calibrated score (jitted, vmapped over rows)."""
    fn = KERNELS[METRICS[metric].kernel][0]

    def one_row(i, pred, y, se_y, dup, se_d, nul, se_n, w, m, nodeg, ref, u_ntc, u_full, key):
        def f(p, yy, source):
            v = fn(p, yy, ref, w, m, k=k, strict=strict)
            if not gated:
                return v
            return gate(
                metric,
                v,
                no_deg=nodeg,
                undefined=data_mean_undefined and source == "dataset_mean",
                xp=jnp,
            )

        def calibrated(yy, dd, nn):
            preds = {"control_mean": u_ntc, "dataset_mean": u_full, "null": nn}
            values = {s: {metric: f(preds[s], yy, s)} for s in negatives}
            values["model"] = {metric: f(pred, yy, "model")}
            values["technical_duplicate"] = {metric: f(dd, yy, "technical_duplicate")}
            return calibrate(values, xp=jnp)["model"][metric]

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


# ============================================================================ surface


def confidence(
    truth,
    pred=None,
    *,
    key: str | None = None,
    control: str | None = None,
    level: str = "gene",
    gene_sets: str | os.PathLike | Mapping[str, Sequence[str]] | None = None,
    pred_var=None,
    ensemble=None,
    seed: int = 0,
    metric: str = "r2w_delta",
    n_boot: int = 200,
    ci: float = 0.95,
    interval: str = "bootstrap",
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
    k: int = 20,
    strict: bool = False,
    gate: bool = True,
    progress: bool = False,
    **truth_options: Any,
) -> pd.DataFrame:
    """Confidence of a prediction per gene, per gene set or per perturbation (0–100).

    See the module docstring for every formula and threshold.

    Args:
      truth: the measured screen: a :class:`~vcjax.pipeline.Screen` (prepared once, see
        :func:`vcjax.prepare`), or an AnnData / ``.h5ad`` path prepared here with ``key``,
        ``control``, ``seed`` and ``**truth_options``.
      pred: the model's point prediction (any form :func:`vcjax.evaluate` accepts, a
        ``(P, G)`` array in the truth's perturbation × gene order, or the name of a
        baseline such as ``"technical_duplicate"``). Default with an ensemble: its mean.
      key, control: the condition column and the control label (not needed for a Screen).
      level: ``"gene"``, ``"pathway"`` or ``"perturbation"``.
      gene_sets: GMT path, ``"example"`` or mapping name → genes (needed for ``"pathway"``).
      pred_var: the model's predictive variance per (perturbation, gene), as ``pred``
        (not normalised).
      ensemble: ``(E, P, G)`` array, or a sequence of ``E`` predictions.
      seed: seed of the resampling (and of the null baseline when preparing here).
      metric: the per-perturbation metric (any core metric, ``*_ctrl`` included).
      n_boot: resampling draws for intervals (0: none).
      ci: interval level.
      interval: per-perturbation interval: ``"bootstrap"`` (the cell bootstrap of
        :func:`vcjax.evaluate`, on the same prepared truth) or ``"parametric"`` (the
        Gaussian resampling of the module docstring; cheap). Gene-set intervals are always
        the parametric bootstrap of the module docstring. ``"auto"`` is ``"bootstrap"``.
      null: ``"replicate"`` (100 ≈ a technical duplicate) or ``"population"``.
      alpha, decades: the confidence mapping (:func:`vcjax.uncertainty.confidence_score`).
      min_se: floor on the noise standard error.
      floor: ``"detection"`` (default): where a half holds less than one detection of a
        gene (``n·mean < v̄_g``, :func:`detection_value`), its variance is raised to
        ``v̄_g²/n``, so undetected genes still get a noise scale (meant for non-negative
        expression); None keeps the raw variances.
      levels: predictive-interval levels scored when uncertainty is given.
      add_noise: add the truth's measurement variance ``s₂²/n₂`` to the predictive
        variance when scoring the model's uncertainty.
      fair: fair ensemble CRPS.
      pred_layer, pred_normalize: as :func:`vcjax.evaluate`.
      chunk_size: rows per jitted chunk.
      k, strict, gate: scoring options, as :func:`vcjax.evaluate` (gene sets always use
        strict R²: NaN, not a forced value, where the set's truth is constant).
      progress: progress bar over the truth's streaming pass (when preparing here).
      **truth_options: the other truth-side options of :func:`vcjax.evaluate`
        (``reference``, ``weights``, ``covariate``, ...), when preparing here.

    Returns:
      A tidy DataFrame (plus ``covariate`` with a covariate):

      * ``level="gene"``: ``perturbation, gene, pred, truth, error, se, dof, z, p_value,
        confidence, is_deg, weight`` and, with uncertainty, ``pred_sd, nll, crps, pit``;
      * ``level="pathway"``: ``perturbation, gene_set, n_genes, n_present, coverage,
        confidence, calibrated, calibrated_ci_low, calibrated_ci_high, band, reason,
        r2w_delta, r2w_delta_ci_low, r2w_delta_ci_high, wmse, wmse_ci_low, wmse_ci_high,
        r2w_delta_duplicate, wmse_duplicate, gene_confidence, gene_confidence_weighted``
        and, with uncertainty, ``coverage_<L>, nll, crps, spearman``;
      * ``level="perturbation"``: ``perturbation, metric, value, calibrated, ci_low,
        ci_high, confidence, band, gene_confidence, gene_confidence_degs,
        gene_confidence_weighted`` and, with uncertainty, ``coverage_<L>, nll, crps,
        mean_sq_z, spearman``;
        ``df.attrs["uncertainty"]`` holds the overall uncertainty scores.
    """
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
    interval = "bootstrap" if interval == "auto" else interval
    score = ScoreSpec(metrics=(metric,), k=k, strict=strict, gate=gate, chunk_size=chunk_size)
    screen = as_screen(
        truth, key=key, control=control, seed=seed, progress=progress, **truth_options
    )
    if len(screen.strata) > 1 and any(
        isinstance(x, (np.ndarray, jax.Array)) for x in (pred, pred_var, ensemble)
    ):
        raise VcjaxInputError(
            "with a covariate, give predictions with perturbation/gene names, not bare arrays"
        )
    frames, overall = [], {}
    for j, stratum in enumerate(screen.strata):
        df, ov = _stratum_confidence(
            screen,
            j,
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
            pred_layer=pred_layer,
            pred_normalize=pred_normalize,
            score=score,
            interval=interval,
        )
        if stratum.covariate is not None:
            df.insert(1, "covariate", stratum.covariate)
            overall[stratum.covariate] = ov
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


def _stratum_confidence(
    screen: Screen,
    index: int,
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
    pred_layer,
    pred_normalize,
    score: ScoreSpec,
    interval,
):
    stratum = screen.strata[index]
    P, G = len(stratum.perturbations), len(stratum.genes)
    kw = dict(layer=pred_layer)
    ens = None
    if ensemble is not None:
        ens = _ensemble_matrix(ensemble, screen, index, normalize=pred_normalize, **kw)
    yhat = (
        _as_matrix(pred, screen, index, normalize=pred_normalize, what="prediction", **kw)
        if pred is not None
        else ens.mean(axis=0)
    )
    pvar = (
        None
        if pred_var is None
        else _as_matrix(pred_var, screen, index, normalize=None, what="pred_var", **kw)
    )
    h = _halves(stratum, floor)
    y = np.asarray(stratum.truth, np.float64)
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
        chunk_size=score.chunk_size or chunk_for(G, P),
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
            chunk_size=score.chunk_size,
        )

    if level == "gene":
        df = pd.DataFrame(
            {
                "perturbation": np.repeat(np.asarray(stratum.perturbations, dtype=object), G),
                "gene": np.tile(np.asarray(stratum.genes, dtype=object), P),
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
        if stratum.deg_mask is not None:
            df["is_deg"] = np.asarray(stratum.deg_mask, bool).ravel()
        if stratum.weights is not None:
            df["weight"] = np.asarray(stratum.weights, np.float64).ravel()
        if unc is not None:
            sd = np.sqrt(pvar) if pvar is not None else ens.std(axis=0, ddof=1)
            df["pred_sd"] = sd.ravel()
            for k in ("nll", "crps", "pit"):
                df[k] = np.asarray(unc.per_gene[k], np.float64).ravel()
        return df, ({} if unc is None else unc.overall)

    if level == "pathway":
        return _pathway_table(
            stratum,
            yhat,
            y,
            h,
            conf,
            gene_sets,
            n_boot=n_boot,
            ci=ci,
            seed=seed,
            score=score,
            unc_inputs=(yhat if pred is not None else None, pvar, ens, add_noise, levels, fair),
        )

    source = pred if isinstance(pred, str) and pred in stratum.derived.baselines else "model"
    return _perturbation_table(
        screen,
        index,
        yhat,
        y,
        h,
        conf,
        metric=metric,
        n_boot=n_boot,
        ci=ci,
        seed=seed,
        score=score,
        unc=unc,
        interval=interval,
        source=source,
    )


@functools.lru_cache(maxsize=8)
def _gene_fn(alpha: float, decades: float):
    def f(pred, truth, se, dof):
        z, p, c = gene_confidence(pred, truth, se, dof, alpha=alpha, decades=decades)
        return {"z": z, "p": p, "confidence": c}

    return jax.jit(f)


def _masked_mean(values: np.ndarray, masks: np.ndarray, weights=None) -> np.ndarray:
    """``(P, S)`` mean of ``values (P, G)`` over each mask's genes, skipping NaN; with
    ``weights (P, G)`` the weighted mean ``Σ w v / Σ w`` over the finite genes (NaN where
    they carry no weight)."""
    fin = np.isfinite(values)
    w = fin.astype(np.float64) if weights is None else np.where(fin, weights, 0.0)
    mt = np.asarray(masks, np.float64).T
    num = (np.where(fin, values, 0.0) * w) @ mt
    den = w @ mt
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


#: why a gene set's score is NaN (``reason`` column of ``level="pathway"``), in the order
#: they are checked; "" where the score is defined.
PATHWAY_REASONS = (
    "no_genes",  # none of the set's genes is in the data
    "no_degs",  # the perturbation has no DEGs: R²w(Δ) is gated (as vcjax.evaluate)
    "no_weight",  # the set's genes carry no weight
    "too_few_genes",  # fewer than 2 of the set's genes carry weight
    "constant_truth",  # the truth (or its Δ) is constant on the weighted genes
    "duplicate_not_better",  # the duplicate's R²w(Δ) on the set is ≤ 0: no calibration
)


def _set_reasons(stratum: Stratum, y, dup, w, gated, masks, r2d) -> np.ndarray:
    """``(P, S)`` reason why each (perturbation, set) score is undefined (float64, host)."""
    P = y.shape[0]
    S = masks.shape[0]
    delta = y - np.asarray(stratum.reference, np.float64)[None, :]
    out = np.full((P, S), "", dtype=object)
    for s in range(S):  # a loop over gene sets; each step is vectorised over perturbations
        idx = np.flatnonzero(masks[s])
        if idx.size == 0:
            out[:, s] = "no_genes"
            continue
        ws = w[:, idx]
        pos = ws > 0
        npos = pos.sum(axis=1)

        def flat(a, pos=pos):
            hi = np.where(pos, a, -np.inf).max(axis=1)
            lo = np.where(pos, a, np.inf).min(axis=1)
            return hi <= lo

        const = flat(y[:, idx]) | flat(delta[:, idx])
        col = np.full(P, "", dtype=object)
        col[~(r2d[:, s] > 0)] = "duplicate_not_better"
        # a NaN R²w(Δ) of a finite duplicate: zero variance of Δ in float32
        zero_var = np.isnan(r2d[:, s]) & np.isfinite(dup[:, idx]).all(axis=1)
        col[const | zero_var] = "constant_truth"
        col[npos < 2] = "too_few_genes"
        col[ws.sum(axis=1) <= 0] = "no_weight"
        col[gated] = "no_degs"
        out[:, s] = col
    return out


def _pathway_table(
    stratum: Stratum, yhat, y, h, conf, gene_sets, *, n_boot, ci, seed, score, unc_inputs
):
    gsm = gene_set_masks(gene_sets, stratum.genes)
    P, G = y.shape
    S = len(gsm.names)
    w = stratum.weights if stratum.weights is not None else np.ones((P, G), np.float32)
    w64 = np.asarray(w, np.float64)
    gated = stratum.no_degs if (score.gate and stratum.deg_mask is not None) else np.zeros(P, bool)
    gated = np.asarray(gated, bool)
    fn = _pathway_fn(int(n_boot))
    masks = device_array(gsm.masks)
    ref = device_array(np.asarray(stratum.reference, np.float32))
    key = jax.random.PRNGKey(seed)
    dup = h["mean1"]
    n1, n2 = h["n1"][:, None], h["n2"][:, None]
    mu = (n1 * dup + n2 * y) / (n1 + n2)  # the pooled pseudobulk, centre of the draws
    sd_y, sd_d = np.sqrt(h["var2"] / n2), np.sqrt(h["var1"] / n1)
    chunk = score.chunk_size or chunk_for(3 * S * G * max(n_boot, 1), P, budget=1 << 24)
    rows = (
        [np.arange(P, dtype=np.int32)]
        + [np.asarray(a, np.float32) for a in (yhat, y, mu, sd_y, sd_d, dup, w)]
        + [gated]
    )
    out = engine.row_map(
        lambda *r: fn(*r, ref, masks, key), rows, chunk_size=chunk, devices=jax.devices()[:1]
    )
    r2 = np.asarray(out["r2w_delta"], np.float64)
    r2d = np.asarray(out["r2w_delta_duplicate"], np.float64)
    reason = _set_reasons(stratum, y, np.asarray(dup, np.float64), w64, gated, gsm.masks, r2d)
    r2_undefined = np.isin(reason, PATHWAY_REASONS[:5])
    r2 = np.where(r2_undefined, np.nan, r2)
    r2d = np.where(r2_undefined, np.nan, r2d)
    ok = reason == ""
    with np.errstate(invalid="ignore", divide="ignore"):
        cal = np.where(ok, r2 / np.where(ok, r2d, 1.0), np.nan)
    e = np.asarray(out["wmse"], np.float64)
    ed = np.asarray(out["wmse_duplicate"], np.float64)
    nan = np.full((P, S), np.nan)
    ci_r2 = ci_e = ci_cal = (nan, nan)
    if n_boot:
        b_r2 = np.moveaxis(np.asarray(out["boot_r2w_delta"], np.float64), 1, -1)  # (P, S, B)
        b_r2d = np.moveaxis(np.asarray(out["boot_r2w_delta_duplicate"], np.float64), 1, -1)
        b_e = np.moveaxis(np.asarray(out["boot_wmse"], np.float64), 1, -1)
        with np.errstate(invalid="ignore", divide="ignore"):
            b_cal = np.where(b_r2d > 0, b_r2 / np.where(b_r2d > 0, b_r2d, 1.0), np.nan)
        ci_r2 = _interval(b_r2, r2, ci=ci, bounds=metric_bounds("r2w_delta"))
        ci_e = _interval(b_e, e, ci=ci, bounds=metric_bounds("wmse"))
        ci_cal = _interval(b_cal, cal, ci=ci, bounds=metric_bounds("r2w_delta", calibrated=True))
    conf64 = np.asarray(conf, np.float64)
    cols = {
        "perturbation": np.repeat(np.asarray(stratum.perturbations, dtype=object), S),
        "gene_set": np.tile(np.asarray(gsm.names, dtype=object), P),
        "n_genes": np.tile(gsm.n_genes, P),
        "n_present": np.tile(gsm.n_present, P),
        "coverage": np.tile(gsm.coverage, P),
        "confidence": (100.0 * np.clip(cal, 0.0, 1.0)).ravel(),
        "calibrated": cal.ravel(),
        "calibrated_ci_low": ci_cal[0].ravel(),
        "calibrated_ci_high": ci_cal[1].ravel(),
        "band": confidence_band(cal, *ci_cal).ravel(),
        "reason": reason.ravel(),
        "r2w_delta": r2.ravel(),
        "r2w_delta_ci_low": ci_r2[0].ravel(),
        "r2w_delta_ci_high": ci_r2[1].ravel(),
        "wmse": e.ravel(),
        "wmse_ci_low": ci_e[0].ravel(),
        "wmse_ci_high": ci_e[1].ravel(),
        "r2w_delta_duplicate": r2d.ravel(),
        "wmse_duplicate": ed.ravel(),
        "gene_confidence": _masked_mean(conf64, gsm.masks).ravel(),
        "gene_confidence_weighted": _masked_mean(conf64, gsm.masks, w64).ravel(),
    }
    df = pd.DataFrame(cols)
    mean, pvar, ens, add_noise, levels, fair = unc_inputs
    if pvar is not None or ens is not None:
        noise = np.nan_to_num(sd_y**2) if add_noise else None
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
                chunk_size=score.chunk_size,
            )
            per_set.append(u.per_row)
        for k in [level_name(lv) for lv in levels] + ["nll", "crps", "spearman"]:
            df[k] = np.stack([ps[k] for ps in per_set], axis=1).ravel().astype(np.float64)
    df.attrs["missing_genes"] = gsm.missing
    return df, {}


def _bootstrap_interval(screen, index, yhat, *, metric, n_boot, ci, seed, score, source):
    """The cell bootstrap's interval of ``source``'s calibrated score (model or a baseline)."""
    stratum = screen.strata[index]
    model = yhat if source == "model" else None
    res = stratum_samples(
        stratum,
        screen.spec,
        model=model,
        metrics=[metric],
        score=score,
        boot=BootSpec(n_boot=n_boot, ci=ci, seed=seed),
        index=index,
    )
    return res["calibrated"][source][metric].T  # (P, n_boot)


def _perturbation_table(
    screen: Screen,
    index: int,
    yhat,
    y,
    h,
    conf,
    *,
    metric,
    n_boot,
    ci,
    seed,
    score: ScoreSpec,
    unc,
    interval="parametric",
    source="model",
):
    stratum, spec = screen.strata[index], screen.spec
    mspec = metric_spec(metric)
    if not mspec.is_core:
        raise ValueError(
            f"metric {metric!r} is not supported here; use a core metric: "
            f"{sorted(m for m, s in METRICS.items() if s.is_core)}"
        )
    if "weights" in mspec.needs and stratum.weights is None:
        raise ValueError(f"metric {metric!r} needs DEG weights (weights='deg')")
    if "mask" in mspec.needs and stratum.deg_mask is None:
        raise ValueError(f"metric {metric!r} needs DEG sets (weights='deg')")
    P, G = y.shape
    preds = {"model": yhat, **stratum.baselines}
    values = score_sources(stratum, spec, preds, [metric], score)
    cal = calibrate(values)
    value = values["model"][metric]
    calibrated = cal["model"][metric]

    lo = hi = np.full(P, np.nan)
    if n_boot > 0 and interval == "bootstrap":
        samples = _bootstrap_interval(
            screen,
            index,
            yhat,
            metric=metric,
            n_boot=n_boot,
            ci=ci,
            seed=seed,
            score=score,
            source=source,
        )
        lo, hi = boot_interval(
            samples, cal[source][metric], ci=ci, method="percentile", target="expected"
        )
    elif n_boot > 0 and P >= 1:
        negatives = tuple(s for s in NEGATIVES if s in stratum.derived.baselines) or (
            "control_mean",
        )
        w = stratum.weights if stratum.weights is not None else np.ones((P, G), np.float32)
        if metric == "pearson_delta_topk" and stratum.scores is not None:
            w = np.abs(stratum.scores)
        m = stratum.deg_mask if stratum.deg_mask is not None else np.ones((P, G), bool)
        nodeg = stratum.no_degs if stratum.deg_mask is not None else np.zeros(P, bool)
        se_y = np.sqrt(h["var2"] / h["n2"][:, None])
        se_d = np.sqrt(h["var1"] / h["n1"][:, None])
        dup = h["mean1"]
        if P >= 2 and "null" in negatives:
            perm = null_derangement(P, seed=spec.seed)
            nul, se_n = dup[perm], se_d[perm]
        else:
            nul, se_n = np.full_like(dup, np.nan), np.zeros_like(dup)
        ref = stratum.u_ntc if mspec.reference == "control" else stratum.reference
        fn = _perturbation_fn(
            metric,
            negatives,
            int(n_boot),
            int(score.k),
            bool(score.strict),
            bool(score.gate),
            spec.uall_reference,
        )
        shared = [
            device_array(np.asarray(a, np.float32))
            for a in (ref, stratum.u_ntc, stratum.u_all_full)
        ] + [jax.random.PRNGKey(seed + 1)]
        rows = (
            [np.arange(P, dtype=np.int32)]
            + [np.asarray(a, np.float32) for a in (yhat, y, se_y, dup, se_d, nul, se_n, w)]
            + [np.asarray(m, bool), nodeg]
        )
        chunk = score.chunk_size or chunk_for(G * int(n_boot) * 6, P, budget=1 << 24)
        out = engine.row_map(
            lambda *r: fn(*r, *shared), rows, chunk_size=chunk, devices=jax.devices()[:1]
        )
        bounds = metric_bounds(metric, calibrated=True)
        lo, hi = _interval(np.asarray(out["draws"]), calibrated, ci=ci, bounds=bounds)

    conf64 = np.asarray(conf, np.float64)
    fin = np.isfinite(conf64)
    with np.errstate(invalid="ignore", divide="ignore"):
        gconf = np.where(
            fin.any(1), np.where(fin, conf64, 0).sum(1) / np.maximum(fin.sum(1), 1), np.nan
        )
        if stratum.deg_mask is not None:
            dm = np.asarray(stratum.deg_mask, bool) & fin
            gconf_deg = np.where(
                dm.any(1), np.where(dm, conf64, 0).sum(1) / np.maximum(dm.sum(1), 1), np.nan
            )
        else:
            gconf_deg = np.full(P, np.nan)
    w = np.ones((P, G)) if stratum.weights is None else np.asarray(stratum.weights, np.float64)
    gconf_w = _masked_mean(conf64, np.ones((1, G), bool), w)[:, 0]
    df = pd.DataFrame(
        {
            "perturbation": list(stratum.perturbations),
            "metric": metric,
            "value": value,
            "calibrated": calibrated,
            "ci_low": lo,
            "ci_high": hi,
            "confidence": 100.0 * np.clip(calibrated, 0.0, 1.0),
            "band": confidence_band(calibrated, lo, hi),
            "gene_confidence": gconf,
            "gene_confidence_degs": gconf_deg,
            "gene_confidence_weighted": gconf_w,
        }
    )
    if unc is not None:
        for key_, v in unc.per_row.items():
            if key_ != "n_genes":
                df[key_] = np.asarray(v, np.float64)
    return df, ({} if unc is None else unc.overall)
