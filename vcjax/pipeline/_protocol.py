"""Protocols: a peer's conventions, under which vcjax reproduces that peer's numbers.

``vcjax.evaluate(..., protocol=NAME)`` / ``vcjax.sweep(..., protocol=NAME)`` / ``vcjax score
--protocol NAME``. A protocol fixes how the truth is formed (all cells or a half split), the
delta reference, whose control cells the prediction's deltas use, the DE test and its
multiple-testing scope, the normalisation and the metric names (docs/metrics.md
§13). The default, ``"dbd"`` (``protocol=None``), is vcjax's own pipeline
(:func:`vcjax.evaluate` without a protocol); the others are entries of :data:`PROTOCOLS`:

* a :class:`Protocol` names its ``prepare`` (truth AnnData / path → its prepared truth,
  computed once per sweep) and ``score`` (prepared truth, prediction → per-perturbation
  values under the peer's metric names) functions and the :func:`vcjax.evaluate` options it
  fixes (setting one is an error naming it);
* :func:`protocol_evaluate` turns one prediction's values into the evaluation table
  (``source = "model"``, no baselines, ``calibrated`` NaN) and :func:`protocol_sweep` many
  models' into a :class:`~vcjax.pipeline.SweepResult` (values, per-model aggregates, ranks on
  perturbation resamples shared by every model).

Adding a protocol is one :class:`Protocol` entry: its two functions, the options it fixes
and its metric names and orientations, then ``register_protocol(entry)`` (or one more item in
the tuple that builds :data:`PROTOCOLS`), e.g. for the Virtual Cell Challenge::

    VCC2026 = Protocol(
        name="vcc2026",
        description="Virtual Cell Challenge 2026 scoring as cell-eval2 0.20.0 --preset vcc2026",
        prepare=_vcc_prepare, score=_vcc_score, fixes=_FIXED_ALL_CELLS,
        metrics=VCC_METRICS, higher_is_better=VCC_ORIENTATION,
        default_metric="overall_score",
    )
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import pandas as pd
import scipy.sparse as sp

from vcjax import data as vdata
from vcjax._errors import VcjaxInputError, preview
from vcjax.peers import _celleval as ce
from vcjax.peers import _vcc2026 as vcc
from vcjax.pipeline._tidy import ALL

__all__ = [
    "PROTOCOLS",
    "Protocol",
    "ProtocolScores",
    "get_protocol",
    "protocol_evaluate",
    "protocol_sweep",
    "register_protocol",
]


@dataclasses.dataclass(frozen=True)
class ProtocolScores:
    """One prediction's per-perturbation values under a protocol.

    Attributes:
      perts: the perturbations, in the protocol's order.
      values: metric name → ``(P,)`` float64 (dataset-level metrics repeat their value).
      notes: metric name → ``(P,)`` object array, why a value is NaN or what it means ("").
      inputs: what each side's values looked like and what was done to them.
      overall: metric → ``(value, calibrated, note)`` of whole-data-set rows (``(all)``):
        the aggregates a peer reports with its own rescaled value (vcc2026's members and
        ``avg_score``).
    """

    perts: list[str]
    values: dict[str, np.ndarray]
    notes: dict[str, np.ndarray]
    inputs: dict[str, Any]
    overall: dict[str, tuple[float, float, str]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Protocol:
    """A named set of conventions (one entry of :data:`PROTOCOLS`).

    Attributes:
      name: the name users pass (``protocol="cell-eval"``).
      description: one line.
      prepare: ``prepare(truth, *, key, control, layer, metrics) -> prepared`` — the truth
        side, once (an AnnData, an ``.h5ad`` path, or an already prepared truth); None for
        the default pipeline.
      score: ``score(prepared, pred, *, key, layer, metrics) -> ProtocolScores``.
      fixes: the :func:`vcjax.evaluate` / :func:`vcjax.sweep` options the protocol fixes →
        why (the error when a user sets one quotes it).
      metrics: the metric names it reports, in order.
      higher_is_better: metric → orientation (None: no better direction, never ranked).
      dataset_level: metrics with one value for the whole data set.
      default_metric: the metric a leaderboard ranks by default.
      composite: ``composite(prepared, values, counts) -> {(name, calibrated): (B,)}``:
        whole-data-set scores recomputed from one model's per-perturbation ``values`` with perturbation
        multiplicities ``counts`` ``(B, P)`` (a sweep's shared perturbation resamples), for
        scores that are not a plain mean over perturbations; None when there are none.
    """

    name: str
    description: str
    prepare: Callable[..., Any] | None
    score: Callable[..., ProtocolScores] | None
    fixes: Mapping[str, str]
    metrics: tuple[str, ...] = ()
    higher_is_better: Mapping[str, bool | None] = dataclasses.field(default_factory=dict)
    dataset_level: tuple[str, ...] = ()
    default_metric: str | None = None
    composite: Callable[..., dict[tuple[str, bool], np.ndarray]] | None = None

    @property
    def is_default(self) -> bool:
        return self.prepare is None


# --------------------------------------------------------------------------- cell-eval


def _matrix(adata, layer: str | None, which: str):
    """The AnnData's matrix in memory (backed X read whole, as cell-eval does)."""
    if layer is not None:
        if layer not in adata.layers:
            raise VcjaxInputError(f"layer {layer!r} not in the {which}'s layers")
        x = adata.layers[layer]
    else:
        x = adata.X
    if x is None:
        raise VcjaxInputError(f"the {which} AnnData has no X")
    if not (isinstance(x, np.ndarray) or sp.issparse(x)):
        x = x.to_memory() if hasattr(x, "to_memory") else np.asarray(x[...])
    return x


def _labels(adata, key: str | None, which: str) -> np.ndarray:
    if key is None:
        raise VcjaxInputError("key is required (the obs column with the condition labels)")
    if key not in adata.obs.columns:
        raise VcjaxInputError(
            f"obs column {key!r} not in the {which} (columns: {preview(adata.obs.columns)})"
        )
    return adata.obs[key].astype(str).to_numpy()


_NEEDS_CELLS = (
    "protocol='cell-eval' needs predicted cells with control cells (an AnnData or .h5ad of "
    "cells labelled by key, the control included), as cell-eval itself: got {what}"
)


def _celleval_prepare(truth, *, key, control, layer=None, metrics=None) -> ce.CellEvalTruth:
    if isinstance(truth, ce.CellEvalTruth):
        if control is not None and control != truth.control:
            raise VcjaxInputError(
                f"control={control!r} differs from the prepared truth's {truth.control!r}"
            )
        names = ce.CELLEVAL_METRICS if metrics is None else metrics
        lack = [m for m in names if m not in truth.metrics]
        if lack:
            raise VcjaxInputError(f"the prepared truth was not prepared for {preview(lack)}")
        return truth
    if type(truth).__name__ == "Screen":
        raise VcjaxInputError(
            "protocol='cell-eval' needs the truth's cells (an AnnData or .h5ad path), not a "
            "prepared Screen (DbD's half split); or a truth from vcjax.peers.celleval_truth"
        )
    if control is None:
        raise VcjaxInputError("control is required (the control label)")
    if isinstance(truth, (str, os.PathLike)):
        truth = vdata.read_h5ad(truth)
    if not hasattr(truth, "obs"):
        raise VcjaxInputError(
            f"protocol='cell-eval' takes the truth as an AnnData or .h5ad path; got "
            f"{type(truth).__name__}"
        )
    return ce.celleval_truth(
        _matrix(truth, layer, "truth"),
        _labels(truth, key, "truth"),
        truth.var_names,
        control=control,
        metrics=metrics,
    )


def _celleval_cells(pred, key: str | None, layer: str | None):
    """(matrix, labels, genes) of predicted cells, or a one-line error."""
    cells = getattr(pred, "cells", None) if type(pred).__name__ == "Prediction" else pred
    if type(pred).__name__ == "Prediction" and cells is None:
        raise VcjaxInputError(_NEEDS_CELLS.format(what="a Prediction of pseudobulk rows"))
    if isinstance(cells, (str, os.PathLike)):
        path = os.fspath(cells)
        if not path.lower().endswith(".h5ad"):
            raise VcjaxInputError(
                _NEEDS_CELLS.format(what=f"a table of pseudobulk rows ({os.path.basename(path)})")
            )
        cells = vdata.read_h5ad(path)
    if not hasattr(cells, "obs"):
        raise VcjaxInputError(
            _NEEDS_CELLS.format(what=f"a {type(cells).__name__} of pseudobulk rows")
        )
    labels = _labels(cells, key, "prediction")
    if pd.Series(labels).is_unique:
        raise VcjaxInputError(
            _NEEDS_CELLS.format(what="an AnnData with one row per perturbation (pseudobulks)")
        )
    return _matrix(cells, layer, "prediction"), labels, [str(g) for g in cells.var_names]


def _celleval_notes(res: dict, names: Sequence[str]) -> dict[str, np.ndarray]:
    """Why a value is NaN, or what a surprising 0 means, per (metric, perturbation)."""
    P = len(res["perts"])
    notes = {m: np.full(P, "", dtype=object) for m in names}
    n_deg = res.get("n_deg")
    vals = res["metrics"]
    if n_deg is not None:
        t0, p0 = n_deg["truth"] == 0, n_deg["prediction"] == 0
        for m in names:
            v = vals[m]
            if m.startswith(("overlap_at", "precision_at")):
                notes[m] = np.where(t0, "no truth DEG (FDR < 0.05): cell-eval reports 0", "")
                notes[m] = np.where(
                    ~t0 & p0, "no predicted DEG (FDR < 0.05): cell-eval reports 0", notes[m]
                )
            elif m in ("de_direction_match", "de_spearman_lfc_sig", "de_sig_genes_recall"):
                notes[m] = np.where(t0, "no truth DEG (FDR < 0.05): cell-eval reports null", "")
                if m == "de_spearman_lfc_sig":
                    why = "fewer than 2 truth DEGs or constant log fold changes: undefined"
                    notes[m] = np.where(~t0 & np.isnan(v), why, notes[m])
            elif m in ("pr_auc", "roc_auc"):
                why = "every gene or none is a truth DEG: AUC undefined (cell-eval: NaN)"
                notes[m] = np.where(np.isnan(v), why, "")
    for m in ("pearson_delta",):
        if m in names:
            notes[m] = np.where(np.isnan(vals[m]), "a delta is constant: undefined", "")
    for m in names:
        notes[m] = np.asarray(notes[m], dtype=object)
    return notes


def _celleval_score(prepared: ce.CellEvalTruth, pred, *, key, layer=None, metrics=None):
    x, labels, genes = _celleval_cells(pred, key, layer)
    res = ce.celleval_scores(prepared, x, labels, genes=genes, metrics=metrics)
    names = list(res["metrics"])
    return ProtocolScores(
        perts=list(res["perts"]),
        values=res["metrics"],
        notes=_celleval_notes(res, names),
        inputs={
            "truth": {"normalization": prepared.normalization},
            "prediction": {"normalization": res["normalization"], "cells": True},
        },
    )


#: options every non-default protocol fixes (it forms its own truth and has no baselines)
_FIXED_COMMON = {
    "reference": "its deltas are against control cells",
    "weights": "it has no DEG weights",
    "baselines": "it has no calibration baselines",
    "split": "its truth is every cell (no half split)",
    "split_seed": "its truth is every cell (no half split)",
    "weights_from": "it has no DEG weights",
    "deg_method": "its DE test is the peer's",
    "k": "its metrics are the peer's",
    "strict": "its metrics are the peer's",
    "gate": "it applies the peer's own NaN rules",
    "covariate": "it scores the whole data set",
    "drop_small": "the peer keeps every condition",
    "n_boot": "cell-bootstrap intervals would redo the peer's DE per resample; a sweep under "
    "the protocol gives intervals from perturbation resamples",
    "ci_method": "there are no cell-bootstrap intervals",
    "refit_weights": "it has no DEG weights",
    "chunk_size": "it does not use the engine's chunks",
    "check_scale": "the peer checks the scale itself",
}

CELL_EVAL = Protocol(
    name="cell-eval",
    description="cell-eval 0.8.2's MetricsEvaluator(...).compute(profile='full'): every "
    "per-perturbation metric under its names",
    prepare=_celleval_prepare,
    score=_celleval_score,
    fixes={
        **_FIXED_COMMON,
        "normalize": "cell-eval normalises integer counts itself (median total, log1p)",
        "pred_normalize": "cell-eval normalises integer counts itself (median total, log1p)",
    },
    metrics=ce.CELLEVAL_METRICS,
    higher_is_better=dict(ce.HIGHER_IS_BETTER),
    dataset_level=ce.DATASET_LEVEL,
    default_metric="discrimination_score_l1",
)

# --------------------------------------------------------------------------- vcc2026

#: the challenge's obs column and control label (cell-eval2's preset pins them)
VCC_KEY, VCC_CONTROL = "target", "non-targeting"
#: the composite's name in cell-eval2's score table; its one member that is no mean over
#: perturbations (a ratio of sums)
VCC_SCORE, VCC_CAPPED_NORM = "avg_score", "expr_mse_unbiased_capped_norm"


def _vcc_error(exc: ValueError, which: str) -> VcjaxInputError:
    msg = str(exc).removeprefix("vcc2026: ")
    if "fractional" in msg or "negative" in msg:
        msg = (
            f"the {which} is not raw counts ({msg}): protocol='vcc2026' scores raw integer "
            "counts, as the challenge does; pass the counts (layer=/pred_layer= if they are a "
            "layer), not log-normalised values"
        )
    return VcjaxInputError(f"protocol='vcc2026': {msg}")


def _vcc_labels(adata, key: str, which: str):
    labels = _labels(adata, key, which)
    col = adata.obs[key]
    # a categorical keeps its category order: cell-eval2's groupby (the replicate splits)
    return col if isinstance(col.dtype, pd.CategoricalDtype) else labels


def _vcc_prepare(truth, *, key, control, layer=None, metrics=None) -> vcc.Vcc2026Truth:
    if isinstance(truth, vcc.Vcc2026Truth):
        if control is not None and control != truth.control:
            raise VcjaxInputError(
                f"control={control!r} differs from the prepared truth's {truth.control!r}"
            )
        return truth
    if type(truth).__name__ == "Screen":
        raise VcjaxInputError(
            "protocol='vcc2026' needs the truth's raw-count cells (an AnnData or .h5ad path), "
            "not a prepared Screen; or a truth from vcjax.peers.vcc2026_truth"
        )
    if isinstance(truth, (str, os.PathLike)):
        truth = vdata.read_h5ad(truth)
    if not hasattr(truth, "obs"):
        raise VcjaxInputError(
            f"protocol='vcc2026' takes the truth as an AnnData or .h5ad path; got "
            f"{type(truth).__name__}"
        )
    key = key or VCC_KEY
    try:
        return vcc.vcc2026_truth(
            _matrix(truth, layer, "truth"),
            _vcc_labels(truth, key, "truth"),
            truth.var_names,
            control=control or VCC_CONTROL,
        )
    except ValueError as exc:
        raise _vcc_error(exc, "truth") from exc


def _vcc_score(prepared: vcc.Vcc2026Truth, pred, *, key, layer=None, metrics=None):
    key = key or VCC_KEY
    cells = getattr(pred, "cells", None) if type(pred).__name__ == "Prediction" else pred
    if isinstance(cells, (str, os.PathLike)) and os.fspath(cells).lower().endswith(".h5ad"):
        cells = vdata.read_h5ad(cells)
    if not hasattr(cells, "obs"):
        raise VcjaxInputError(
            "protocol='vcc2026' needs predicted raw-count cells (an AnnData or .h5ad of cells "
            f"labelled by {key!r}, the control included), as the challenge: got "
            f"{type(pred).__name__}"
        )
    labels = _labels(cells, key, "prediction")
    genes = [str(g) for g in cells.var_names]
    if genes != [str(g) for g in prepared.genes]:
        missing = sorted(set(map(str, prepared.genes)) - set(genes))
        if missing:
            raise VcjaxInputError(
                f"protocol='vcc2026': the prediction lacks {len(missing)} of the truth's genes "
                f"({preview(missing)}); the challenge scores the same genes"
            )
        raise VcjaxInputError(
            "protocol='vcc2026': the prediction's genes are in another order than the truth's"
        )
    try:
        res = vcc.vcc2026_scores(prepared, _matrix(cells, layer, "prediction"), labels)
    except ValueError as exc:
        raise _vcc_error(exc, "prediction") from exc
    values = {m: np.asarray(v, np.float64) for m, v in res["metrics"].items()}
    if metrics is not None:
        values = {m: v for m, v in values.items() if m in metrics}
    notes = {
        m: np.where(np.isnan(v), "cell-eval2 omits this row (undefined)", "").astype(object)
        for m, v in values.items()
    }
    overall = {}
    for m, cal in res["member_scores"].items():
        overall[m] = (
            float(res["aggregates"][m]),
            float(cal),
            f"{VCC2026_LABEL} member: value the aggregate, calibrated its score between the "
            f"baseline ({res['baseline'][m]:.4g}) and the split-half replicate "
            f"({res['replicate'][m]:.4g})",
        )
    overall[VCC_SCORE] = (
        float(res["score"]),
        float(res["score"]),
        f"the {VCC2026_LABEL} score: the mean of the {len(res['member_scores'])} members' "
        "calibrated scores",
    )
    return ProtocolScores(
        perts=list(res["perts"]),
        values=values,
        notes=notes,
        inputs={
            "truth": {"normalization": "raw counts (the preset normalises)"},
            "prediction": {"normalization": "raw counts (the preset normalises)", "cells": True},
        },
        overall=overall,
    )


def _vcc_composite(prepared: vcc.Vcc2026Truth, values, counts) -> dict:
    """``{(name, calibrated): (B,)}``: ``avg_score`` and each member's score (calibrated),
    and the capped norm's aggregate (raw; the other members' raw aggregates are plain means
    over perturbations, which the sweep computes itself)."""
    got = vcc.vcc2026_composite(prepared, values, counts)
    out = {(VCC_SCORE, c): np.atleast_1d(got["score"]) for c in (False, True)}
    out.update({(m, True): np.atleast_1d(v) for m, v in got["members"].items()})
    num, den = values["expr_mse_unbiased_capped"], values["expr_distance_unbiased"]
    ok = np.isfinite(num) & np.isfinite(den)
    w = np.atleast_2d(counts)
    n_, d_ = w @ np.where(ok, num, 0.0), w @ np.where(ok, den, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        out[(VCC_CAPPED_NORM, False)] = np.where(d_ > 0, n_ / d_, np.nan)
    return out


VCC2026_LABEL = "Virtual Cell Challenge 2026"

VCC2026 = Protocol(
    name="vcc2026",
    description="the Virtual Cell Challenge 2026 score as cell-eval2 0.20.0 --preset vcc2026 "
    "computes it (raw counts in; its per-perturbation metrics, members and avg_score)",
    prepare=_vcc_prepare,
    score=_vcc_score,
    fixes={
        **_FIXED_COMMON,
        "normalize": "the challenge normalises raw counts itself (CPM, log1p)",
        "pred_normalize": "the challenge normalises raw counts itself (CPM, log1p)",
    },
    metrics=vcc.VCC2026_METRICS,
    higher_is_better={
        **{m: d == "higher" for m, d in vcc.VCC2026_MEMBERS.items()},
        "expr_mse_unbiased": False,
        "expr_mse_unbiased_capped": False,
        "expr_distance_unbiased": None,
        "expr_real_mass_ratio": None,
        VCC_SCORE: True,
    },
    dataset_level=(),
    default_metric=VCC_SCORE,
    composite=_vcc_composite,
)


DBD = Protocol(
    name="dbd",
    description="vcjax's default (Diversity by Design): half-split truth, u_ALL reference, "
    "t-test DEG weights, calibrated against baselines",
    prepare=None,
    score=None,
    fixes={},
)

#: the known protocols by name; ``None`` means ``"dbd"``
PROTOCOLS: dict[str, Protocol] = {p.name: p for p in (DBD, CELL_EVAL, VCC2026)}


def register_protocol(protocol: Protocol) -> None:
    """Add (or replace) a protocol of :data:`PROTOCOLS`."""
    PROTOCOLS[protocol.name] = protocol


def get_protocol(name: str | None) -> Protocol:
    """The protocol called ``name`` (None: ``"dbd"``); an unknown name lists the known ones."""
    if name is None:
        return PROTOCOLS["dbd"]
    if not isinstance(name, str) or name not in PROTOCOLS:
        raise VcjaxInputError(f"unknown protocol {name!r}; known: {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]


def check_fixed(protocol: Protocol, given: Mapping[str, Any], defaults: Mapping[str, Any]) -> None:
    """A protocol's fixed options left at their defaults, else a one-line error naming one."""
    for opt, why in protocol.fixes.items():
        if opt in given and not _same(given[opt], defaults.get(opt)):
            raise VcjaxInputError(
                f"protocol={protocol.name!r} fixes {opt}= ({why}); leave {opt} at its default"
            )


def _same(a, b) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and np.array_equal(a, b)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return tuple(a) == tuple(b)
    return a == b


def _metric_names(protocol: Protocol, metrics) -> list[str] | None:
    if metrics is None or (isinstance(metrics, str) and metrics == "all"):
        return None
    names = [metrics] if isinstance(metrics, str) else list(metrics)
    bad = [m for m in names if m not in protocol.metrics]
    if bad:
        raise VcjaxInputError(
            f"metric(s) {preview(bad)} not in protocol={protocol.name!r}; its metrics: "
            + ", ".join(protocol.metrics)
        )
    return names


# --------------------------------------------------------------------------- tables


def _table(protocol: Protocol, scores: ProtocolScores) -> pd.DataFrame:
    """The evaluation table of one model: ``perturbation, metric, source, value, calibrated,
    note``; dataset-level metrics as one ``(all)`` row."""
    P = len(scores.perts)
    perts = np.empty(P, dtype=object)
    perts[:] = scores.perts
    frames = []
    for m, v in scores.values.items():
        if m in protocol.dataset_level:
            frames.append(
                pd.DataFrame(
                    dict(
                        perturbation=[ALL],
                        metric=[m],
                        value=[float(v[0]) if P else np.nan],
                        note=["dataset-level (the peer repeats it on every perturbation's row)"],
                    )
                )  # fmt: skip
            )
            continue
        frames.append(
            pd.DataFrame(
                dict(
                    perturbation=perts,
                    metric=m,
                    value=np.asarray(v, np.float64),
                    note=scores.notes.get(m, np.full(P, "", dtype=object)),
                )
            )  # fmt: skip
        )
    t = (
        pd.concat(frames, ignore_index=True)
        if frames
        else pd.DataFrame(columns=["perturbation", "metric", "value", "note"])
    )
    t.insert(2, "source", "model")
    t.insert(4, "calibrated", np.nan)
    if scores.overall:
        rows = pd.DataFrame(
            [(ALL, m, "model", v, c, why) for m, (v, c, why) in scores.overall.items()],
            columns=["perturbation", "metric", "source", "value", "calibrated", "note"],
        )
        t = pd.concat([t, rows], ignore_index=True)
    t = t[["perturbation", "metric", "source", "value", "calibrated", "note"]]
    t["note"] = t["note"].astype(object)
    return t


def _attrs(table: pd.DataFrame, protocol: Protocol, inputs: dict, metrics) -> None:
    table.attrs["protocol"] = protocol.name
    table.attrs["backend"] = jax.default_backend()
    table.attrs["metrics"] = list(metrics)
    table.attrs["inputs"] = inputs
    table.attrs["normalization"] = inputs.get("truth", {}).get("normalization")


def protocol_evaluate(
    truth,
    pred,
    *,
    protocol: str,
    key: str | None = None,
    control: str | None = None,
    metrics: Sequence[str] | str | None = None,
    layer: str | None = None,
    pred_layer: str | None = None,
    given: Mapping[str, Any] | None = None,
    defaults: Mapping[str, Any] | None = None,
) -> pd.DataFrame:
    """:func:`vcjax.evaluate` under a non-default protocol (called by it).

    Args:
      truth: an AnnData, an ``.h5ad`` path or the protocol's prepared truth.
      pred: the prediction (cells, for cell-eval); None is an error (no baselines to score).
      protocol: a name of :data:`PROTOCOLS` other than ``"dbd"``.
      key, control, layer, pred_layer: as :func:`vcjax.evaluate`.
      metrics: a subset of the protocol's metric names (default: all).
      given, defaults: :func:`vcjax.evaluate`'s other options and their defaults; one the
        protocol fixes and the caller changed is an error naming it.

    Returns:
      The table: ``perturbation``, ``metric`` (the peer's names), ``source = "model"``,
      ``value``, ``calibrated`` (NaN: no baselines), ``note``; ``attrs["protocol"]``.
    """
    p = get_protocol(protocol)
    if p.is_default:
        raise VcjaxInputError("protocol_evaluate is for protocols other than 'dbd'")
    check_fixed(p, given or {}, defaults or {})
    names = _metric_names(p, metrics)
    if pred is None:
        raise VcjaxInputError(
            f"protocol={p.name!r} scores a prediction: pred is required (there are no baselines)"
        )
    prepared = p.prepare(truth, key=key, control=control, layer=layer, metrics=names)
    scores = p.score(prepared, pred, key=key, layer=pred_layer, metrics=names)
    table = _table(p, scores)
    _attrs(table, p, scores.inputs, scores.values)
    return table


# --------------------------------------------------------------------------- sweep


def protocol_sweep(
    truth,
    models,
    *,
    protocol: str,
    names: Sequence[str] | None = None,
    key: str | None = None,
    control: str | None = None,
    metrics: Sequence[str] | str | None = None,
    n_boot: int = 0,
    ci: float = 0.95,
    seed: int = 0,
    resample: str | None = None,
    layer: str | None = None,
    pred_layer: str | None = None,
    on_error: str = "raise",
    progress: bool | Callable[[str, int, int], None] = False,
    given: Mapping[str, Any] | None = None,
    defaults: Mapping[str, Any] | None = None,
):
    """:func:`vcjax.sweep` under a non-default protocol (called by it).

    The truth is prepared once; each model is scored with the protocol's function (the
    same values as :func:`protocol_evaluate`). With ``n_boot > 0`` the perturbations are
    resampled with replacement — the same draws for every model (:func:`vcjax.sweep`'s
    ``resample="perturbations"``) — giving intervals of each model's mean and median over
    perturbations, rank intervals and ``p_best``; dataset-level metrics have no interval
    (one value per data set, not an aggregate over perturbations). Cell resamples would
    redo the peer's DE per resample and are not offered.

    Returns:
      :class:`~vcjax.pipeline.SweepResult` with raw values only (``calibrated`` NaN: rank
      with ``leaderboard(metric, calibrated=False)``); no baselines.
    """
    from vcjax.pipeline._sweep import (
        AGGREGATES,
        SweepResult,
        _aggregate,
        _model_items,
        _one_line,
        _perturbation_resamples,
    )

    p = get_protocol(protocol)
    # a sweep's n_boot resamples perturbations under a protocol: allowed here
    check_fixed(p, {k: v for k, v in (given or {}).items() if k != "n_boot"}, defaults or {})
    if resample not in (None, "perturbations"):
        raise VcjaxInputError(
            f"protocol={p.name!r} resamples perturbations only (resample='perturbations'); "
            f"got resample={resample!r}"
        )
    t_start = time.perf_counter()
    report = progress if callable(progress) else None
    wanted = _metric_names(p, metrics)
    items = _model_items(models, names)
    n_models = len(models) if isinstance(models, Mapping) else 0
    prepared = p.prepare(truth, key=key, control=control, layer=layer, metrics=wanted)
    frames, points, errors, seen, model_values = [], [], {}, set(), []
    met: list[str] = []
    for name, pred in items:
        if name in seen:
            raise VcjaxInputError(f"duplicated model name {name!r}")
        seen.add(name)
        try:
            scores = p.score(prepared, pred, key=key, layer=pred_layer, metrics=wanted)
        except (VcjaxInputError, TypeError, ValueError, FileNotFoundError, KeyError) as exc:
            if on_error == "raise":
                raise VcjaxInputError(f"model {name!r}: {_one_line(exc)}") from exc
            errors[name] = f"{type(exc).__name__}: {_one_line(exc)}"
            continue
        met = list(scores.values)
        frames.append(_table(p, scores).drop(columns=["source"]).assign(model=name))
        points.append(np.stack([scores.values[m] for m in met]))  # (metrics, P)
        model_values.append(scores.values)
        if report:
            report("models", len(frames), n_models)
    if not frames:
        raise VcjaxInputError(
            "no model to score" + (f" (every model failed: {errors})" if errors else "")
        )
    table = pd.concat(frames, ignore_index=True)
    table = table[["model"] + [c for c in table.columns if c != "model"]]
    models_ = [str(n) for n in dict.fromkeys(table["model"])]
    info: dict[str, Any] = dict(
        protocol=p.name, n_boot=int(n_boot), ci=float(ci), seed=int(seed),
        resample="perturbations", backend=jax.default_backend(), n_models=len(models_),
        metrics=list(met), higher_is_better={m: p.higher_is_better.get(m) for m in (*met, *p.higher_is_better)},
        dataset_level=[m for m in met if m in p.dataset_level],
        normalization=prepared.normalization if hasattr(prepared, "normalization") else None,
    )  # fmt: skip
    baselines = pd.DataFrame(
        {c: pd.Series(dtype=table[c].dtype) for c in table.columns if c != "model"}
    ).assign(source=pd.Series(dtype=object))
    result = SweepResult(table, baselines, models_, errors, info)
    point = np.stack(points)  # (M, metrics, P)
    full = np.full((point.shape[0], len(met), 2, point.shape[2]), np.nan)
    full[:, :, 0] = point
    for i, m in enumerate(met):
        result.point_values[(m, False)] = point[:, i]
        for how in AGGREGATES:
            result.aggregates[(m, False, how)] = _aggregate(point[:, i], how)
    info["point_seconds"] = time.perf_counter() - t_start
    if n_boot:
        per = [i for i, m in enumerate(met) if m not in p.dataset_level]
        _perturbation_resamples(
            result, [met[i] for i in per], full[:, per], full[:0, per], [], n_boot, seed
        )
        for key_ in [k for k in result.resampled if k[1]]:  # no calibrated values here
            del result.resampled[key_]
            result.baseline_resampled.pop(key_, None)
        if report:
            report("resamples", n_boot, n_boot)
    if p.composite is not None:
        _composite(result, p, prepared, model_values, int(n_boot), int(seed))
    info["seconds"] = time.perf_counter() - t_start
    return result


def _composite(result, p: Protocol, prepared, model_values: list, n_boot: int, seed: int) -> None:
    """A protocol's whole-data-set scores (:attr:`Protocol.composite`) of every model, at
    the point and on the sweep's perturbation resamples (the same draws as every other
    metric's), as aggregates that :meth:`SweepResult.leaderboard` ranks (both aggregates
    hold the score: it is no mean or median over perturbations)."""
    from vcjax.pipeline._sweep import AGGREGATES, _perturbation_counts

    n_rows = len(next(iter(model_values[0].values())))
    point = [p.composite(prepared, v, np.ones((1, n_rows))) for v in model_values]
    counts = (
        np.stack([_perturbation_counts(seed, b, n_rows) for b in range(n_boot)]) if n_boot else None
    )
    for name_cal in point[0]:
        pt = np.array([c[name_cal][0] for c in point])
        for how in AGGREGATES:
            result.aggregates[(*name_cal, how)] = pt
    if counts is None:
        return
    got = [p.composite(prepared, v, counts) for v in model_values]
    for name_cal in got[0]:
        arr = np.stack([g[name_cal] for g in got])  # (M, B)
        for how in AGGREGATES:
            result.resampled[(*name_cal, how)] = arr
    composite_names = sorted({k[0] for k in got[0]})
    result.info["composite"] = composite_names
