"""The evaluation table: one row per (perturbation, metric, source), with why a value is NaN.

Notes (column ``note``) say why a value is undefined where the reason is known: a baseline
that does not exist for that perturbation (``additive`` for a single perturbation), DbD's
no-DEG gate, or the dataset mean's Pearson metrics against a ``u_ALL``-type reference.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from vcjax.metrics import METRICS
from vcjax.pipeline._screen import Stratum
from vcjax.pipeline._spec import ScoreSpec, TruthSpec

__all__ = ["ALL", "NO_DEG_NOTE", "UNDEFINED_NOTE", "tidy", "tidy_dataset"]

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
) -> pd.DataFrame:
    """The rows of one stratum: source, then metric, then perturbation.

    Columns ``perturbation``, ``metric``, ``source``, ``value``, ``calibrated``, ``note``,
    ``covariate``.
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
