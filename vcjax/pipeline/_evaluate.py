"""``evaluate()``: a model's predictions against calibrated baselines, as one tidy table.

The pipeline (docs/metrics.md §1–§7, the Diversity-by-Design construction):

1. :func:`vcjax.prepare` streams the truth cells once into a :class:`~vcjax.pipeline.Screen`
   (skipped when a Screen is given): per-condition sufficient statistics of the two halves
   of a seeded technical-duplicate split, and everything derived from them — the truth
   (half-2 pseudobulks), the Δ reference (``u_ALL`` of half 1 by default), DEG t-scores,
   weights and sets (each perturbation against the other perturbed cells), the baselines;
2. the model's prediction is aligned with it by perturbation and gene names
   (:func:`vcjax.pipeline.align`);
3. the model and every baseline are scored with the same kernels, weights and reference
   (:func:`vcjax.engine.score`), DbD's gates applied (no DEGs → WMSE, R²w(Δ) and Pearson(Δ)
   on DEGs are NaN; the dataset mean's Pearson metrics against ``u_ALL`` are NaN);
4. each value is calibrated between the best negative/null baseline (0) and the technical
   duplicate (1); with ``n_boot > 0`` the cell bootstrap adds intervals and paired
   comparisons (:func:`vcjax.pipeline.add_intervals`).

Cost of a first call: the metric kernels are compiled in a background thread while the host
streams the truth and runs the t-tests (:func:`vcjax.pipeline._scoring.warm_up`), and JAX's
persistent compilation cache (on by default, ``VCJAX_COMPILATION_CACHE=0`` turns it off) lets
later processes load them from disk instead of compiling.

Memory, for ``P`` perturbations × ``G`` genes (one ``P × G`` float64 matrix is ``8·P·G``
bytes): the streaming pass holds the split sums (four such matrices, float64), the
derivation adds the truth and the adjusted p-values (float64) and the t-scores, weights
and DEG sets (float32, float32, bool) — about three more — and no baseline matrix (each is
built from the sums chunk by chunk while it is scored); without intervals the sums of
squares are released after the DEG tests. Peak: about eight such matrices with the
model's own (``benchmarks/RESULTS.md``, genome scale).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from typing import Literal

import jax
import numpy as np
import pandas as pd

from vcjax import data as vdata
from vcjax._errors import VcjaxInputError
from vcjax._host import enable_compilation_cache
from vcjax.pipeline._align import Prediction, align, validate_check_scale
from vcjax.pipeline._bootstrap import add_intervals
from vcjax.pipeline._calibrate import calibrate, card
from vcjax.pipeline._scoring import resolve_metrics, score_sources, warm_up
from vcjax.pipeline._screen import Screen, prepare_spec
from vcjax.pipeline._spec import (
    DEFAULT_BASELINES,
    BootSpec,
    ScoreSpec,
    TruthSpec,
    warn_if_rough,
)
from vcjax.pipeline._tidy import tidy, tidy_dataset

__all__ = ["as_screen", "calibration_card", "evaluate", "input_record", "score_screen"]

#: the truth-side options of :func:`evaluate` and their defaults (fixed by a Screen).
_TRUTH_DEFAULTS = dict(
    reference="perturbed",
    weights="deg",
    baselines=DEFAULT_BASELINES,
    split=None,
    split_seed=42,
    weights_from="all",
    deg_method="t-test_overestim_var",
    layer=None,
    normalize="auto",
    covariate=None,
    drop_small=False,
)


def _same(a, b) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and np.array_equal(a, b)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return tuple(a) == tuple(b)
    return a == b


def _check_screen_options(screen: Screen, key, control, given: dict) -> None:
    """A Screen fixes the truth side: options that differ from it are an error."""
    spec = screen.spec
    for name, value in (("key", key), ("control", control)):
        if value is not None and value != getattr(spec, name):
            raise VcjaxInputError(
                f"{name}={value!r} differs from the Screen's {name}={getattr(spec, name)!r}"
            )
    for name, value in given.items():
        if not _same(value, _TRUTH_DEFAULTS[name]) and not _same(value, getattr(spec, name)):
            raise VcjaxInputError(
                f"{name} is a truth-side option, fixed when the Screen was prepared "
                f"({name}={getattr(spec, name)!r}); pass it to vcjax.prepare instead"
            )


def as_screen(
    truth,
    *,
    key: str | None,
    control: str | None,
    seed: int = 0,
    progress: bool = False,
    warm: ScoreSpec | None = None,
    keep_sumsq: bool = True,
    **options,
) -> Screen:
    """``truth`` as a :class:`~vcjax.pipeline.Screen`: checked against the options when it
    is one, else prepared with them (the truth-side options of :func:`evaluate`).

    Args:
      truth: a Screen, an AnnData or an ``.h5ad`` path.
      key, control: required unless ``truth`` is a Screen (then they must match it).
      seed: the null baseline's seed (ignored for a Screen).
      progress: progress bar over the streaming pass.
      warm: compile the kernels of these scoring options while the truth streams.
      keep_sumsq: False releases the sums of squares of a screen prepared here once the
        DEG tests have read them (:attr:`Screen.scoring_only`; for one scoring without
        intervals).
      **options: the other truth-side options; for a Screen, any that differs from both its
        default and the Screen's own value is an error naming it.
    """
    unknown = set(options) - set(_TRUTH_DEFAULTS)
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {sorted(unknown)}")
    if isinstance(truth, Screen):
        _check_screen_options(truth, key, control, options)
        return truth
    if key is None or control is None:
        raise VcjaxInputError("key and control are required unless truth is a prepared Screen")
    enable_compilation_cache()
    path = truth if isinstance(truth, (str, os.PathLike)) else None
    if path is not None:
        truth = vdata.open_h5ad(path)  # X is streamed by prepare
    spec = TruthSpec(key=key, control=control, seed=seed, **options)
    thread = warm_up(truth, spec, warm) if warm is not None else None
    try:
        return prepare_spec(truth, spec, progress=progress, path=path, keep_sumsq=keep_sumsq)
    finally:
        if thread is not None:
            thread.join()


def score_screen(
    screen: Screen,
    prediction: Prediction | None,
    score: ScoreSpec,
) -> pd.DataFrame:
    """The evaluation table of an aligned prediction (or of the baselines alone) on a screen.

    What :func:`evaluate` returns before intervals: one row per (perturbation, metric,
    source), calibrated, with notes; ``df.attrs`` records the backend and options.
    """
    metrics = resolve_metrics(score.metrics, prediction, screen.spec)
    frames = []
    for j, stratum in enumerate(screen.strata):
        # the baselines are streamed to the engine block by block, built from the sums
        preds = stratum.baseline_sources()
        if prediction is not None:
            preds = {"model": prediction.matrices[j], **preds}
        dataset: dict[str, dict[str, np.ndarray]] = {}
        notes: dict[str, dict[str, str]] = {}
        values = score_sources(
            stratum, screen.spec, preds, metrics, score, prediction=prediction, dataset=dataset,
            notes=notes,
        )  # fmt: skip
        frames.append(
            tidy(stratum, screen.spec, score, values, calibrate(values), metric_notes=notes)
        )
        if dataset:
            frames.append(tidy_dataset(stratum, dataset, calibrate(dataset)))
    table = pd.concat(frames, ignore_index=True)
    if screen.spec.covariate is None:
        table = table.drop(columns=["covariate"])
    table.attrs["backend"] = jax.default_backend()
    table.attrs["reference"] = screen.spec.reference_name
    table.attrs["normalization"] = screen.normalization
    table.attrs["metrics"] = list(metrics)
    table.attrs["inputs"] = input_record(screen, prediction)
    return table


def input_record(screen: Screen, prediction: Prediction | None) -> dict:
    """What each input's values looked like and what was done to them (``attrs["inputs"]``).

    ``{"truth": {...}, "prediction": {...}}``: the fields of
    :class:`vcjax.data.ScaleEvidence` (``kind``, ``max``, ``frac_integer``, …) and
    ``normalization`` (``"log1p_cp10k"`` when vcjax normalised raw counts, else
    ``"none"``); a prediction given as cells also has ``pseudobulked: True``.
    """
    truth = {"normalization": screen.normalization}
    if screen.scale is not None:
        truth = {**screen.scale.to_dict(), **truth}
    out = {"truth": truth}
    if prediction is not None:
        pred = {"normalization": prediction.normalization}
        if prediction.scale is not None:
            pred = {**prediction.scale.to_dict(), **pred}
        pred["pseudobulked"] = prediction.cells is not None
        out["prediction"] = pred
    return out


def evaluate(
    truth,
    pred=None,
    *,
    key: str | None = None,
    control: str | None = None,
    reference: str | np.ndarray = "perturbed",
    weights: str | np.ndarray | None = "deg",
    baselines: Sequence[str] = DEFAULT_BASELINES,
    metrics: Sequence[str] | str | None = None,
    seed: int = 0,
    split: str | np.ndarray | None = None,
    split_seed: int = 42,
    weights_from: str = "all",
    deg_method: str = "t-test_overestim_var",
    k: int = 20,
    strict: bool = False,
    gate: bool = True,
    layer: str | None = None,
    pred_layer: str | None = None,
    normalize: str | None = "auto",
    pred_normalize: str | None = "auto",
    covariate: str | None = None,
    drop_small: bool = False,
    n_boot: int = 0,
    ci: float = 0.95,
    ci_method: str = "percentile",
    refit_weights: bool = True,
    chunk_size: int | None = None,
    progress: bool = False,
    check_scale: Literal["error", "warn", "off"] = "error",
    protocol: str | None = None,
) -> pd.DataFrame:
    """Score a model's predictions and the calibration baselines; return a tidy table.

    Args:
      truth: the measured screen: an AnnData (in memory or backed), a path to ``.h5ad``, or
        a :class:`~vcjax.pipeline.Screen` from :func:`vcjax.prepare` (then the truth-side
        options below are fixed by it: only the scoring options apply). Under
        ``protocol="cell-eval"`` an AnnData, a path or a
        :class:`vcjax.peers.CellEvalTruth` (its truth side prepared once).
      pred: the model's predictions — an AnnData of predicted cells (pseudobulked by
        ``key``) or with one row per perturbation, a DataFrame (index perturbations,
        columns genes), a mapping ``name → (G,)`` in the truth's gene order, a tuple
        ``(names, matrix[, genes])`` (matrix dense or sparse), a ``(P, G)`` array in the
        screen's order, a path (``.h5ad``, ``.csv``/``.tsv``, ``.parquet``), or a
        :class:`~vcjax.pipeline.Prediction` — or None to score the baselines only.
        Predicted cells may be backed (``anndata.read_h5ad(path, backed="r")``).
        Perturbations and genes the truth lacks are left out, with one warning naming them.
      key: ``obs`` column with the condition labels (required unless ``truth`` is a Screen).
      control: the control label (e.g. ``"control"``, ``"non-targeting"``); required
        unless ``truth`` is a Screen.
      reference: the delta reference. ``"perturbed"`` (default): ``u_ALL`` of half 1, the
        mean of per-condition means with control counted as one condition (docs/metrics.md
        §2); ``"perturbed_no_control"``; ``"perturbed_cells"`` (mean over perturbed cells of
        half 1); ``"control"`` (``u_NTC`` over all control cells); or a ``(G,)`` array.
      weights: ``"deg"`` (the DbD DEG weights), ``"uniform"``/None (no weighted metrics),
        or a ``(P, G)`` array.
      baselines: which baselines to score (:data:`vcjax.pipeline.DEFAULT_BASELINES`).
      metrics: metric names (default :data:`vcjax.metrics.DEFAULT_METRICS`; ``"all"`` adds
        every peer metric that the inputs allow).
      seed: seed of the null derangement (truth side) and of the bootstrap.
      split: the technical-duplicate split: an ``obs`` column or ``(N,)`` array of 1/2;
        default: the paper's seeded split (``split_seed=42``).
      weights_from: ``"all"`` cells (the paper's; the weights see the half-2 truth) or
        ``"half1"`` only (stricter).
      deg_method: ``"t-test_overestim_var"`` (the paper's) or ``"t-test"`` (Welch).
      k: genes of ``pearson_delta_topk`` (largest ``|t|``).
      strict: NaN instead of sklearn's forced R² values for constant truths.
      gate: apply DbD's NaN gates (no DEGs; data-mean Pearson against u_ALL).
      layer, pred_layer: AnnData layers to read instead of ``X``.
      normalize, pred_normalize: ``"auto"`` normalises raw integer counts (1e4 per cell,
        log1p); None trusts the input.
      covariate: ``obs`` column (e.g. ``cell_type``): every step runs within each value.
      drop_small: drop conditions with fewer than 2 cells (with a warning) instead of
        raising.
      n_boot, ci, ci_method, refit_weights: bootstrap intervals
        (:func:`vcjax.pipeline.add_intervals`).
      chunk_size: rows per engine chunk.
      progress: show progress bars.
      check_scale: ``"error"`` (default): a prediction on another scale than the truth
        (linear or raw counts against log1p-normalised, centred/z-scored against
        non-negative, …), told from the values' range, integers, sign and per-cell totals
        (:func:`vcjax.data.compare_scales`), raises a one-line error naming the evidence;
        ``"warn"``: a ``UserWarning`` and the table; ``"off"``: no check.
      protocol: None or ``"dbd"`` (default, everything above), or a peer's conventions
        (:data:`vcjax.pipeline.PROTOCOLS`, docs/metrics.md §13): ``"cell-eval"``
        gives cell-eval 0.8.2's per-perturbation metrics under its names, from the truth's
        and the predicted cells (which must include control cells). A protocol fixes the
        truth-side options, the baselines and the bootstrap; setting one is an error naming
        it. Its table has ``source = "model"`` rows only, ``calibrated`` NaN, and
        ``attrs["protocol"]``.

    Returns:
      A DataFrame with one row per (perturbation, metric, source) and columns
      ``perturbation``, ``metric``, ``source`` (``"model"`` or a baseline name),
      ``value``, ``calibrated`` and ``note`` (why a value is undefined, where known), plus
      ``covariate`` when one is given. Dataset-level metrics (hit discovery) have one row
      with ``perturbation = "(all)"``. With ``n_boot > 0``: ``ci_low``/``ci_high`` (and
      ``calibrated_ci_low``/``calibrated_ci_high``, ``boot_nan_frac``) on every row, plus
      paired rows ``source = "model-vs-<baseline>"`` whose ``value`` is the difference
      oriented so that positive means the model is better, with its interval and
      ``win_rate`` (fraction of resamples the model wins). ``df.attrs`` records the JAX
      backend and the options used, and ``df.attrs["inputs"]`` what the truth's and the
      prediction's values looked like and what was done to them
      (:func:`input_record`).
    """
    if protocol is not None and protocol != "dbd":
        from vcjax.pipeline._protocol import protocol_evaluate

        given = dict(locals())
        return protocol_evaluate(
            truth, pred, protocol=protocol, key=key, control=control, metrics=metrics,
            layer=layer, pred_layer=pred_layer, given=given, defaults=_EVALUATE_DEFAULTS,
        )  # fmt: skip
    validate_check_scale(check_scale)  # before the truth is read
    score = ScoreSpec(metrics=metrics, k=k, strict=strict, gate=gate, chunk_size=chunk_size)
    boot = None
    if n_boot:
        warn_if_rough(n_boot)
        boot = BootSpec(
            n_boot=n_boot, ci=ci, method=ci_method, refit_weights=refit_weights, seed=seed
        )
    screen = as_screen(
        truth,
        key=key,
        control=control,
        seed=seed,
        progress=progress,
        warm=score,
        keep_sumsq=boot is not None,  # only the bootstrap reads them after the DEG tests
        reference=reference,
        weights=weights,
        baselines=baselines,
        split=split,
        split_seed=split_seed,
        weights_from=weights_from,
        deg_method=deg_method,
        layer=layer,
        normalize=normalize,
        covariate=covariate,
        drop_small=drop_small,
    )
    prediction = None
    if pred is not None:
        prediction = align(
            pred, screen, layer=pred_layer, normalize=pred_normalize, check_scale=check_scale
        )
    table = score_screen(screen, prediction, score)
    if boot is not None:
        table = add_intervals(table, screen, prediction, score=score, boot=boot, progress=progress)
    return table


#: evaluate's options and their defaults (what a protocol checks it was not given)
_EVALUATE_DEFAULTS = {
    name: par.default
    for name, par in inspect.signature(evaluate).parameters.items()
    if par.default is not inspect.Parameter.empty
}


def calibration_card(table_or_truth, **kwargs) -> pd.DataFrame:
    """The dataset's calibration card: can each metric tell signal from a trivial prediction?

    Per metric (from an :func:`evaluate` table, or from a truth — an AnnData, a path or a
    :class:`~vcjax.pipeline.Screen` — scored without a model, ``kwargs`` for
    :func:`evaluate`):

    * ``drf_median``/``drf_mean``/``drf_iqr``: dynamic range fraction of the technical
      duplicate against the CellSimBench negative (dataset mean for error metrics, control
      mean for delta metrics), over perturbations;
    * ``drf_ctrl_median``: the same with the control mean as negative for every metric;
    * ``drf_interpolated_median``: positive = the interpolated duplicate;
    * ``drf_loo_median``: negative = the leave-one-out mean of the other perturbations;
    * ``discrimination``: the fraction of perturbations where the duplicate strictly beats
      the best negative/null baseline (the baseline discrimination score);
    * ``n``: perturbations with a defined duplicate value.
    """
    if isinstance(table_or_truth, pd.DataFrame):
        return card(table_or_truth)
    return card(evaluate(table_or_truth, None, **kwargs))
