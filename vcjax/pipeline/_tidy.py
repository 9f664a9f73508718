"""The evaluation table: one row per (perturbation, metric, source), with why a value is NaN.

Notes (column ``note``) say why a value is undefined where the reason is known: a baseline
that does not exist for that perturbation (``additive`` for a single perturbation), DbD's
no-DEG gate, or the dataset mean's Pearson metrics against a ``u_ALL``-type reference; and
how a value was computed where that departs from the metric's source (the cell-level DE
metrics of predicted cells without control cells, tested against the truth's control).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from vcjax.metrics import METRICS
from vcjax.pipeline._screen import Stratum
from vcjax.pipeline._spec import ScoreSpec, TruthSpec

__all__ = ["ALL", "NO_DEG_NOTE", "UNDEFINED_NOTE", "tidy", "tidy_dataset", "undefined_summary"]

#: the ``perturbation`` of dataset-level rows.
ALL = "(all)"
NO_DEG_NOTE = "no DEGs (gate, docs/metrics.md §5)"
UNDEFINED_NOTE = "undefined for the dataset mean against u_ALL (docs/metrics.md §5)"


def tidy(
    stratum: Stratum,
    spec: TruthSpec,
    score: ScoreSpec,
    values: Mapping[str, Mapping[str, np.ndarray]],
    calibrated: Mapping[str, Mapping[str, np.ndarray]],
    *,
    metric_notes: Mapping[str, Mapping[str, str]] | None = None,
) -> pd.DataFrame:
    """The rows of one stratum: source, then metric, then perturbation.

    Columns ``perturbation``, ``metric``, ``source``, ``value``, ``calibrated``, ``note``,
    ``covariate``. ``metric_notes``: ``{source: {metric: note}}`` for the rows of a metric computed
    under a stated convention (set where no other note is).
    """
    # one DataFrame from concatenated columns (one small frame per (source, metric) and a
    # concat cost more than the scoring at small P)
    P = len(stratum.perturbations)
    perts = np.empty(P, dtype=object)
    perts[:] = list(stratum.perturbations)
    no_deg = stratum.no_degs if score.gate else None
    sources, metrics, vals, cals, notes = [], [], [], [], []
    for source, d in values.items():
        base = np.empty(P, dtype=object)
        base[:] = list(stratum.notes.get(source, [""] * P))
        for metric, v in d.items():
            note = base
            m = METRICS[metric]
            if no_deg is not None and m.gated_by_degs and no_deg.any():
                note = np.where((note == "") & no_deg, NO_DEG_NOTE, note)
            if score.gate and spec.uall_reference and source in m.undefined_for:
                note = np.full(P, UNDEFINED_NOTE, dtype=object)
            extra = (metric_notes or {}).get(source, {}).get(metric)
            if extra:
                note = np.where(note == "", extra, note)
            sources.append(source)
            metrics.append(metric)
            vals.append(np.asarray(v))
            cals.append(np.asarray(calibrated[source].get(metric, np.full(P, np.nan))))
            notes.append(note)
    n = len(sources)
    cov = np.empty(n * P, dtype=object)
    cov[:] = stratum.covariate
    return pd.DataFrame(
        {
            "perturbation": np.tile(perts, n),
            "metric": np.repeat(np.asarray(metrics, dtype=object), P),
            "source": np.repeat(np.asarray(sources, dtype=object), P),
            "value": np.concatenate(vals) if n else np.zeros(0),
            "calibrated": np.concatenate(cals) if n else np.zeros(0),
            "note": np.concatenate(notes) if n else np.zeros(0, dtype=object),
            "covariate": cov,
        }
    )


def tidy_dataset(
    stratum: Stratum,
    values: Mapping[str, Mapping[str, np.ndarray]],
    calibrated: Mapping[str, Mapping[str, np.ndarray]],
) -> pd.DataFrame:
    """Rows of the dataset-level metrics (``perturbation = "(all)"``)."""
    rows = [
        dict(
            perturbation=ALL,
            metric=m,
            source=s,
            value=float(v[0]),
            calibrated=float(calibrated[s][m][0]) if m in calibrated.get(s, {}) else np.nan,
            note="dataset-level",
            covariate=stratum.covariate,
        )
        for s, d in values.items()
        for m, v in d.items()
    ]
    return pd.DataFrame(rows)


def undefined_summary(
    table: pd.DataFrame,
    *,
    deg_method: str = "t-test_overestim_var",
    threshold: float = 0.5,
) -> str | None:
    """One line saying why most perturbations of ``table`` have NaN gated metrics, or None.

    DbD's no-DEG gate (docs/metrics.md §5) sets WMSE, R²w(Δ) and Pearson(Δ) on DEGs to NaN
    for a perturbation without a significant DEG; a screen with few cells per perturbation,
    or with several cell types pooled, can lose most of its rows that way. This counts the
    perturbations (per covariate value, if any) whose rows carry the gate's note and, when
    more than ``threshold`` of them do, says how many, why, and what to try. The message
    names API arguments (``covariate=``, ``deg_method=``); the CLI translates them into its
    options.

    Args:
      table: an :func:`evaluate` table, or a sweep's :meth:`SweepResult.tidy` (columns
        ``perturbation``, ``metric``, ``note``, optionally ``covariate``).
      deg_method: the DEG test the table's truth used (``screen.spec.deg_method``): the
        suggestion of Welch's test is left out when it was already used.
      threshold: the share of undefined perturbations above which a message is returned.

    Returns:
      The message (one line), or None when at most ``threshold`` of the perturbations are
      undefined (or the table has no gated metric).
    """
    rows = table[table["perturbation"].astype(str) != ALL]
    if rows.empty:
        return None
    cov = rows["covariate"] if "covariate" in rows.columns else None
    has_cov = cov is not None and cov.notna().any()
    unit = (
        list(zip(cov.astype(str), rows["perturbation"].astype(str)))
        if has_cov
        else list(rows["perturbation"].astype(str))
    )
    units = pd.Series(unit, index=rows.index)
    gated = rows["note"].astype(str) == NO_DEG_NOTE
    n_total = int(units.nunique())
    n_undefined = int(units[gated].nunique())
    if n_total == 0 or n_undefined <= threshold * n_total:
        return None
    names = [METRICS[m].label for m in dict.fromkeys(rows.loc[gated, "metric"]) if m in METRICS]
    what = "perturbation × covariate groups" if has_cov else "perturbations"
    tries = []
    if deg_method == "t-test_overestim_var":
        tries.append(
            "deg_method='t-test' (Welch's test; the default overestimates the rest's variance)"
        )
    if not has_cov:
        tries.append("covariate=COLUMN (if the screen pools cell types or conditions)")
    tries.append("more cells per perturbation")
    return (
        f"{n_undefined} of {n_total} {what} have no significant DEG ({deg_method} vs the other "
        f"perturbed cells, BH FDR < 0.05), so {', '.join(names)} are NaN for them (DbD's gate, "
        f"docs/metrics.md §5; the other metrics are defined); try "
        + (", ".join(tries[:-1]) + ", or " if len(tries) > 1 else "")
        + tries[-1]
    )
