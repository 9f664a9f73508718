"""Calibration: each metric between the best negative baseline (0) and the technical duplicate (1).

:func:`calibrate` turns raw metric values into calibrated ones, per perturbation and metric,
over NumPy or ``jax.numpy`` (the point estimate, every bootstrap resample and the parametric
confidence draws use the same code). :func:`card` summarises whether each metric
can tell signal from a trivial prediction on a data set (CellSimBench's dynamic range
fraction, :func:`dynamic_range_fraction`, :func:`card`); :func:`summarize` gives medians and
means.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from vcjax.metrics import METRICS, higher_is_better
from vcjax.pipeline._baselines import NEGATIVES, POSITIVE

__all__ = [
    "calibrate",
    "card",
    "drf_table",
    "dynamic_range_fraction",
    "summarize",
    "wide",
]


def calibrate(
    values: Mapping[str, Mapping[str, Any]], *, xp: Any = np
) -> dict[str, dict[str, Any]]:
    """Calibrated scores: 0 at the best negative/null baseline, 1 at the technical duplicate.

    Per metric and perturbation, ``(m − m_neg) / (m_dup − m_neg)`` where ``m_neg`` is the
    best (by the metric's orientation) of the ``control_mean``, ``dataset_mean`` and
    ``null`` values that are not NaN. Because numerator and denominator share the
    orientation, higher is better for error metrics too. NaN when the duplicate is no
    better than ``m_neg``, or either is NaN.

    Args:
      values: ``{source: {metric: array}}`` (any common shape per metric).
      xp: NumPy or ``jax.numpy``.

    Returns:
      The same layout, calibrated.
    """
    dup = values.get(POSITIVE)
    if dup is None:
        return {s: {m: xp.full_like(v, np.nan) for m, v in d.items()} for s, d in values.items()}
    out: dict[str, dict[str, Any]] = {s: {} for s in values}
    for metric, m_dup in dup.items():
        hib = higher_is_better(metric)
        negs = [values[s][metric] for s in NEGATIVES if s in values and metric in values[s]]
        with np.errstate(all="ignore"):
            if negs:
                stack = xp.stack(negs)
                missing = xp.isnan(stack)
                filled = xp.where(missing, -np.inf if hib else np.inf, stack)
                best = filled.max(axis=0) if hib else filled.min(axis=0)
                m_neg = xp.where(xp.all(missing, axis=0), np.nan, best)
            else:
                m_neg = xp.full_like(m_dup, np.nan)
            span = m_dup - m_neg
            better = span > 0 if hib else span < 0
            for source, d in values.items():
                if metric in d:
                    out[source][metric] = xp.where(
                        better, (d[metric] - m_neg) / xp.where(better, span, 1.0) + 0.0, np.nan
                    )  # + 0.0 turns -0.0 into 0.0
    return out


def summarize(table: pd.DataFrame) -> pd.DataFrame:
    """Per (source, metric): NaN-skipping median and mean of ``value`` and ``calibrated``."""
    g = table.groupby(["source", "metric"], sort=False)
    out = g.agg(
        value_median=("value", "median"),
        value_mean=("value", "mean"),
        calibrated_median=("calibrated", "median"),
        calibrated_mean=("calibrated", "mean"),
        n=("value", lambda v: int(np.isfinite(v).sum())),
    )
    return out.reset_index()


def dynamic_range_fraction(
    m_pos: np.ndarray, m_neg: np.ndarray, *, higher_is_better: bool
) -> np.ndarray:
    r"""CellSimBench's dynamic range fraction (docs/metrics.md §7), clipped to ``[-1, 1]``.

    Higher-is-better metrics (perfect 1): ``(m_pos − m_neg) / ((1 − m_neg) + 1e-6)``;
    error metrics (perfect 0): ``(m_neg − m_pos) / (m_neg + 1e-6)``. NaN if an input is.
    """
    m_pos, m_neg = np.asarray(m_pos, float), np.asarray(m_neg, float)
    with np.errstate(all="ignore"):
        if higher_is_better:
            drf = (m_pos - m_neg) / ((1.0 - m_neg) + 1e-6)
        else:
            drf = (m_neg - m_pos) / (m_neg + 1e-6)
    return np.clip(drf, -1.0, 1.0)


def wide(
    table: pd.DataFrame, metric: str, column: str = "value", *, index: list[str] | None = None
) -> pd.DataFrame:
    """One metric's ``column`` as a table of rows ``index`` (default: perturbation, and
    covariate when present) by source."""
    sub = table[table["metric"] == metric]
    if index is None:
        index = ["perturbation"] + (["covariate"] if "covariate" in table.columns else [])
    return sub.pivot_table(index=index, columns="source", values=column, dropna=False, sort=False)


def _iqr(x: np.ndarray) -> float:
    x = x[np.isfinite(x)]
    return float(np.subtract(*np.percentile(x, [75, 25]))) if x.size else np.nan


def _nanstat(fn, x: np.ndarray) -> float:
    """``fn`` over the finite values of ``x``; NaN (without a warning) when there are none."""
    x = x[np.isfinite(x)]
    return float(fn(x)) if x.size else np.nan


def _is_error(metric: str) -> bool:
    """Error metrics (MSE, WMSE, MAE) take the dataset mean as CellSimBench's negative."""
    spec = METRICS.get(metric)
    return spec is not None and spec.kind == "error"


def card(table: pd.DataFrame) -> pd.DataFrame:
    """The calibration card of an evaluation table (:func:`vcjax.calibration_card`)."""
    rows = [_card_row(table, metric) for metric in dict.fromkeys(table["metric"])]
    return pd.DataFrame([r for r in rows if r is not None])


def _card_row(table: pd.DataFrame, metric: str) -> dict | None:
    w = wide(table, metric)
    if POSITIVE not in w:
        return None
    hib = higher_is_better(metric)
    pos = w[POSITIVE].to_numpy(float)
    nan = np.full_like(pos, np.nan)

    def col(source: str) -> np.ndarray:
        return w[source].to_numpy(float) if source in w else nan

    neg = col("dataset_mean") if _is_error(metric) else col("control_mean")
    drf = dynamic_range_fraction(pos, neg, higher_is_better=hib)
    drf_ctrl = dynamic_range_fraction(pos, col("control_mean"), higher_is_better=hib)
    drf_interp = dynamic_range_fraction(col("interpolated_duplicate"), neg, higher_is_better=hib)
    drf_loo = dynamic_range_fraction(pos, col("loo_mean"), higher_is_better=hib)
    negs = np.stack([col(s) for s in NEGATIVES])
    filled = np.where(np.isnan(negs), -np.inf if hib else np.inf, negs)
    best = filled.max(0) if hib else filled.min(0)
    ok = np.isfinite(pos) & np.isfinite(best)
    beats = (pos > best) if hib else (pos < best)
    return dict(
        metric=metric,
        drf_median=_nanstat(np.median, drf),
        drf_mean=_nanstat(np.mean, drf),
        drf_iqr=_iqr(drf),
        drf_ctrl_median=_nanstat(np.median, drf_ctrl),
        drf_interpolated_median=_nanstat(np.median, drf_interp),
        drf_loo_median=_nanstat(np.median, drf_loo),
        discrimination=float(beats[ok].mean()) if ok.any() else np.nan,
        n=int(np.isfinite(pos).sum()),
    )


def drf_table(table: pd.DataFrame, metric: str, *, negative: str | None = None) -> pd.Series:
    """Per-perturbation DRF of the technical duplicate for one metric (see :func:`card`)."""
    w = wide(table, metric)
    negative = negative or ("dataset_mean" if _is_error(metric) else "control_mean")
    drf = dynamic_range_fraction(
        w[POSITIVE].to_numpy(float),
        w[negative].to_numpy(float),
        higher_is_better=higher_is_better(metric),
    )
    return pd.Series(drf, index=w.index, name=f"drf_{metric}")
