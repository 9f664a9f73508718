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

**Per gene set** (GMT file or dict) and perturbation: R²w(Δ) and WMSE restricted to the
set's genes through the kernels' ``where=`` mask (same DEG weights, reference and DbD no-DEG
gate as :func:`vcjax.evaluate`), the mean gene confidence over the set's genes
(``confidence``), and ``coverage`` = fraction of the set's genes present in the data.
Intervals: a parametric (central-limit) resampling of the truth measurement,
``y* = y + se₂·ε``, ``ε ~ N(0, 1)`` per gene, ``n_boot`` draws, percentile interval at level
``ci``; weights, reference and prediction held fixed.

**Per perturbation**: the calibrated score of :func:`vcjax.evaluate` (0 at the best
negative/null baseline, 1 at the technical duplicate; default metric R²w(Δ)) with an
interval: ``interval="bootstrap"`` (default) from the cell bootstrap
(:func:`vcjax.pipeline.stratum_samples`: cells resampled within halves, weights and
baselines refitted, on the same prepared truth); ``interval="parametric"`` from the Gaussian
resampling above, applied to the truth and to the duplicate (``d* = d + se₁·ε'``, and the
null baseline's half-1 profile likewise; control and data means fixed).
``confidence = 100·clip(calibrated, 0, 1)`` and a band (:func:`confidence_band`):
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
from vcjax.data import gene_set_masks, read_h5ad
from vcjax.metrics import KERNELS, METRICS, metric_spec, r2w_delta, wmse
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
from vcjax.stats import percentile_interval
from vcjax.uncertainty._scores import (
    LEVELS,
    chunk_for,
    confidence_band,
    gene_confidence,
    level_name,
    replicate_noise,
    uncertainty_scores,
)

__all__ = ["confidence", "detection_value"]


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


def _percentile(draws: np.ndarray, ci: float) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval over the last axis; non-finite draws are ignored."""
    d = np.asarray(draws, np.float64)
    return percentile_interval(np.where(np.isfinite(d), d, np.nan), ci=ci)


# ============================================================== parametric resampling


@functools.lru_cache(maxsize=16)
def _pathway_fn(n_boot: int, strict: bool):
    def one_row(i, pred, y, se, dup, w, gated, ref, masks, key):
        S = masks.shape[0]

        def vals(p, yy):
            pb = jnp.broadcast_to(p, (S, p.shape[-1]))
            yb = jnp.broadcast_to(yy, pb.shape)
            wb = jnp.broadcast_to(w, pb.shape)
            r2 = r2w_delta(pb, yb, ref, wb, where=masks, strict=strict)
            e = wmse(pb, yb, wb, where=masks)
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
        parametric. ``"auto"`` is ``"bootstrap"``.
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
      k, strict, gate: scoring options, as :func:`vcjax.evaluate`.
      progress: progress bar over the truth's streaming pass (when preparing here).
      **truth_options: the other truth-side options of :func:`vcjax.evaluate`
        (``reference``, ``weights``, ``covariate``, ...), when preparing here.

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
            se2,
            h["mean1"],
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


def _masked_mean(values: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """``(P, S)`` mean of ``values (P, G)`` over each mask's genes, skipping NaN."""
    fin = np.isfinite(values)
    num = np.where(fin, values, 0.0) @ masks.T.astype(np.float64)
    cnt = fin.astype(np.float64) @ masks.T.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(cnt > 0, num / np.maximum(cnt, 1), np.nan)


def _pathway_table(
    stratum: Stratum, yhat, y, se2, dup, conf, gene_sets, *, n_boot, ci, seed, score, unc_inputs
):
    gsm = gene_set_masks(gene_sets, stratum.genes)
    P, G = y.shape
    S = len(gsm.names)
    w = stratum.weights if stratum.weights is not None else np.ones((P, G), np.float32)
    gated = stratum.no_degs if (score.gate and stratum.deg_mask is not None) else np.zeros(P, bool)
    fn = _pathway_fn(int(n_boot), bool(score.strict))
    masks = jnp.asarray(gsm.masks)
    ref = jnp.asarray(stratum.reference, jnp.float32)
    key = jax.random.PRNGKey(seed)
    chunk = score.chunk_size or chunk_for(S * G * max(n_boot, 1), P, budget=1 << 24)
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
        "perturbation": np.repeat(np.asarray(stratum.perturbations, dtype=object), S),
        "gene_set": np.tile(np.asarray(gsm.names, dtype=object), P),
        "n_genes": np.tile(gsm.n_genes, P),
        "n_present": np.tile(gsm.n_present, P),
        "coverage": np.tile(gsm.coverage, P),
        "confidence": gene_conf.ravel(),
    }
    for nm in ("r2w_delta", "wmse"):
        cols[nm] = np.asarray(out[nm], np.float64).ravel()
        if n_boot:
            lo, hi = _percentile(np.moveaxis(np.asarray(out["boot_" + nm]), 1, -1), ci)  # (P, S)
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
        shared = [jnp.asarray(a, jnp.float32) for a in (ref, stratum.u_ntc, stratum.u_all_full)] + [
            jax.random.PRNGKey(seed + 1)
        ]
        rows = (
            [np.arange(P, dtype=np.int32)]
            + [np.asarray(a, np.float32) for a in (yhat, y, se_y, dup, se_d, nul, se_n, w)]
            + [np.asarray(m, bool), nodeg]
        )
        chunk = score.chunk_size or chunk_for(G * int(n_boot) * 6, P, budget=1 << 24)
        out = engine.row_map(
            lambda *r: fn(*r, *shared), rows, chunk_size=chunk, devices=jax.devices()[:1]
        )
        lo, hi = _percentile(np.asarray(out["draws"]), ci)
        lo = np.where(np.isnan(calibrated), np.nan, lo)
        hi = np.where(np.isnan(calibrated), np.nan, hi)

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
        }
    )
    if unc is not None:
        for key_, v in unc.per_row.items():
            if key_ != "n_genes":
                df[key_] = np.asarray(v, np.float64)
    return df, ({} if unc is None else unc.overall)
