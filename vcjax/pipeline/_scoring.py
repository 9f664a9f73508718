"""Scoring: every metric of every source (the model and the baselines) of one stratum, gated.

The core metrics go through :func:`vcjax.engine.score` in at most three calls per source
(those against the Δ reference, ``pearson_delta_topk`` with its own top-k weights, those
against the control mean); the peers' metrics through :mod:`vcjax.peers`. DbD's gates
(:func:`gate`) come last, and are the same code the bootstrap applies to its resamples.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
import scipy.sparse as sp

from vcjax import engine, peers
from vcjax._host import engine_array, working_dtype
from vcjax.data import normalize_chunk
from vcjax.metrics import DEFAULT_METRICS, METRICS, gate, metric_spec
from vcjax.pipeline._align import Prediction
from vcjax.pipeline._screen import Stratum
from vcjax.pipeline._spec import ScoreSpec, TruthSpec

__all__ = [
    "core_metric_groups",
    "gate",
    "resolve_metrics",
    "score_sources",
    "usable_metrics",
    "warm_up",
]

log = logging.getLogger("vcjax")


def requested_metrics(metrics: Sequence[str] | str | None) -> list[str]:
    """The ``metrics`` option as names: None and ``"all"`` give the default metrics
    (:func:`resolve_metrics` adds the peers' extras of ``"all"``), a string one name."""
    if metrics is None or (isinstance(metrics, str) and metrics == "all"):
        return list(DEFAULT_METRICS)
    return [metrics] if isinstance(metrics, str) else list(metrics)


def resolve_metrics(
    metrics: Sequence[str] | str | None, pred: Prediction | None, spec: TruthSpec
) -> list[str]:
    """The metric names of one evaluation: validated, ``"all"`` expanded for ``pred``."""
    if isinstance(metrics, str) and metrics == "all":
        extra = peers.available(cells=pred is not None and pred.cells is not None)
        return list(DEFAULT_METRICS) + [m for m in extra if m not in DEFAULT_METRICS]
    names = requested_metrics(metrics)
    for m in names:
        metric_spec(m)  # unknown names raise, listing the known ones
    return names


def usable_metrics(metrics: Sequence[str], stratum: Stratum) -> list[str]:
    """The core metrics whose inputs the stratum has (weights, DEG sets)."""
    have = {"weights": stratum.weights is not None, "mask": stratum.deg_mask is not None}
    out = []
    for m in metrics:
        spec = METRICS[m]
        if spec.is_core and all(have.get(x, True) for x in spec.needs):
            out.append(m)
    return out


def core_metric_groups(
    metrics: Sequence[str], *, weights: bool, mask: bool
) -> tuple[list[str], bool, list[str]]:
    """The engine calls of one source: the kernels against the Δ reference (all but
    ``pearson_delta_topk``), whether top-k is scored, and the control-referenced metrics."""
    have = {"weights": weights, "mask": mask}
    core, ctrl, topk = [], [], False
    for m in metrics:
        spec = METRICS[m]
        if not spec.is_core or not all(have[x] for x in spec.needs):
            continue
        if spec.reference == "control":
            ctrl.append(m)
        elif m == "pearson_delta_topk":
            topk = True
        else:
            core.append(m)
    return core, topk, ctrl


def undefined_for(metric: str, source: str, spec: TruthSpec) -> bool:
    """Whether DbD leaves ``metric`` undefined for ``source`` under this truth (the data mean
    against a ``u_ALL``-type reference)."""
    return spec.uall_reference and source in METRICS[metric].undefined_for


def _cast_once(x: np.ndarray | None, dtype: np.dtype) -> np.ndarray | None:
    """``x`` cast to ``dtype`` once when it must be cast; else ``x`` itself (the engine
    copies its chunks into reused aligned buffers: no second ``(P, G)`` matrix)."""
    if x is None or x.dtype == dtype:
        return x
    return engine_array(x, dtype)


def engine_inputs(stratum: Stratum, *, topk: bool = True) -> dict[str, Any]:
    """The truth-side inputs of :func:`score_sources`. The float64 truth is cast once to
    the engine's working dtype (the engine would cast it chunk by chunk, for every source:
    the same values); weights and DEG sets already in their dtype are passed as they are,
    and the top-k ranking ``|t|`` is taken chunk by chunk (an :class:`vcjax.engine.Rows`),
    so that no other ``(P, G)`` copy is made. A caller scoring many predictions against
    one stratum passes them as ``inputs=``."""
    wdt = working_dtype()
    topk_w = None
    if topk and stratum.scores is not None:
        scores = stratum.scores
        topk_w = engine.Rows(lambda r0, r1: np.abs(scores[r0:r1]), scores.shape, scores.dtype)
    elif topk and stratum.weights is not None:
        topk_w = _cast_once(stratum.weights, wdt)
    return dict(
        truth=engine_array(stratum.truth, wdt),
        weights=_cast_once(stratum.weights, wdt),
        mask=_cast_once(stratum.deg_mask, np.dtype(bool)),
        topk=topk_w,
    )


def score_sources(
    stratum: Stratum,
    spec: TruthSpec,
    preds: Mapping[str, np.ndarray],
    metrics: Sequence[str],
    score: ScoreSpec,
    *,
    prediction: Prediction | None = None,
    dataset: dict[str, dict[str, np.ndarray]] | None = None,
    inputs: Mapping[str, np.ndarray | None] | None = None,
    notes: dict[str, dict[str, str]] | None = None,
) -> dict[str, dict[str, np.ndarray]]:
    """``{source: {metric: (P,)}}`` for every prediction, with DbD's gates applied.

    Args:
      stratum: the prepared truth of one covariate value.
      spec: its truth options.
      preds: source name → ``(P, G)`` prediction (an array, or an
        :class:`vcjax.engine.Rows` streamed to the engine chunk by chunk).
      metrics: the metric names (:func:`resolve_metrics`).
      score: the scoring options.
      prediction: the model's aligned prediction (its predicted cells feed the cell-level
        peer metrics of source ``"model"``).
      dataset: when given, receives the dataset-level values ``{source: {metric: (1,)}}``.
      inputs: :func:`engine_inputs` of ``stratum`` (computed here when not given).
      notes: when given, receives ``{source: {metric: note}}`` for values computed under a
        stated convention (the cell-level DE metrics of predicted cells without control
        cells use the truth's control cells).
    """
    core, topk, ctrl = core_metric_groups(
        metrics, weights=stratum.weights is not None, mask=stratum.deg_mask is not None
    )
    if inputs is None:
        inputs = engine_inputs(stratum, topk=bool(topk))
    truth, weights, mask, topk_w = (inputs[k] for k in ("truth", "weights", "mask", "topk"))
    peer_names = [m for m in metrics if not METRICS[m].is_core]
    no_deg = stratum.no_degs if score.gate else None
    kw = dict(chunk_size=score.chunk_size, k=score.k, strict=score.strict)
    out: dict[str, dict[str, np.ndarray]] = {}
    peer_vals = (
        _peer_values(peer_names, preds, stratum, spec, prediction, dataset, notes)
        if peer_names
        else {}
    )
    for source, pred in preds.items():
        res: dict[str, np.ndarray] = {}
        # the engine calls of this source in one pass: each chunk of the prediction (a
        # Rows: built from the sums) is read and cast once for every reference and weighting
        calls, groups = [], []
        if core:
            calls.append(core)
            groups.append(
                dict(
                    reference=stratum.reference,
                    weights=weights,
                    mask=mask,
                    metrics=[METRICS[m].kernel for m in core],
                )
            )
        if topk:
            calls.append(["pearson_delta_topk"])
            groups.append(
                dict(reference=stratum.reference, weights=topk_w, metrics=["pearson_delta_topk"])
            )
        if ctrl:
            calls.append(ctrl)
            kernels = list(dict.fromkeys(METRICS[m].kernel for m in ctrl))
            groups.append(dict(reference=stratum.u_ntc, metrics=kernels))
        if groups:
            for names, got in zip(calls, engine.score_groups(pred, truth, groups, **kw)):
                res.update({m: np.asarray(got[METRICS[m].kernel], np.float64) for m in names})
        res.update(peer_vals.get(source, {}))
        if score.gate:
            for m in list(res):
                res[m] = gate(m, res[m], no_deg=no_deg, undefined=undefined_for(m, source, spec))
        out[source] = {m: res[m] for m in metrics if m in res}
    return out


def _peer_values(
    names, preds: Mapping[str, np.ndarray], stratum: Stratum, spec, prediction, dataset, notes
) -> dict[str, dict[str, np.ndarray]]:
    """``{source: {metric: (P,)}}`` of the peers' metrics of every source (a source with a
    non-finite value gets NaN); fills ``dataset`` and ``notes``."""
    P = len(stratum.perturbations)
    # a baseline may be rows built on demand (engine.Rows): the peers read whole matrices
    preds = {s: np.asarray(p) for s, p in preds.items()}
    per_pert = [m for m in names if METRICS[m].level == "perturbation"]
    wanted_ds = [m for m in names if METRICS[m].level == "dataset"]
    usable = {s: bool(np.all(np.isfinite(p))) for s, p in preds.items()}
    out: dict[str, dict[str, np.ndarray]] = {s: {} for s in preds}
    pb = peers.score_pseudobulk_sources(
        per_pert,
        {s: p for s, p in preds.items() if usable[s]},
        truth=stratum.truth,
        u_ntc=stratum.u_ntc,
        scores=stratum.scores,
        genes=stratum.genes,
        perts=stratum.perturbations,
    )
    for s, vals in pb.items():
        out[s].update(vals)
    if "model" in preds and usable["model"] and prediction is not None:
        if prediction.cells is not None:
            cell_vals, cell_notes = _cell_values(per_pert, stratum, spec.key, prediction)
            out["model"].update(cell_vals)
            if notes is not None and cell_notes:
                notes.setdefault("model", {}).update(cell_notes)
    if wanted_ds and dataset is not None:
        for s, pred in preds.items():
            ds = (
                peers.score_dataset(wanted_ds, pred, u_ntc=stratum.u_ntc, deg_mask=stratum.deg_mask)
                if usable[s]
                else {}
            )
            dataset[s] = {m: np.array([ds.get(m, np.nan)]) for m in wanted_ds}
    for s in preds:
        for m in per_pert:
            out[s].setdefault(m, np.full(P, np.nan))
    return out


def _cell_matrix(adata, rows, *, layer, normalization: str):
    """The cells of ``adata`` (rows ``rows``, or all) as a scipy CSR matrix or a NumPy
    array, read into memory (a backed AnnData included), normalised when asked."""
    X = adata.X if layer is None else adata.layers[layer]
    if rows is not None:
        X = X[rows]
    if hasattr(X, "to_memory"):  # a backed sparse dataset (a path is read backed)
        X = X.to_memory()
    if sp.issparse(X):
        X = sp.csr_matrix(X)
    else:  # dense, or a backed (h5py) dense dataset
        X = np.asarray(X.toarray() if hasattr(X, "toarray") else X)
    if normalization == "log1p_cp10k":
        X = normalize_chunk(X)
    return X


def _cell_values(
    names, stratum: Stratum, key: str, prediction: Prediction
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The cell-level metrics of the model (predicted cells vs the stratum's true cells,
    sparse matrices kept sparse) and their notes."""
    want = [n for n in names if n in peers.CELL_METRICS or n == "pds"]
    if not want:
        return {}, {}
    cells = stratum.cells
    in_stratum = cells.codes >= 0
    rows = None if in_stratum.all() else np.flatnonzero(in_stratum)
    groups = np.asarray(stratum.groups, dtype=object)
    truth_cells = _cell_matrix(
        cells.open(), rows, layer=cells.layer, normalization=cells.normalization
    )
    codes = cells.codes if rows is None else cells.codes[rows]
    pred = prediction.cells
    pred_cells = _cell_matrix(
        pred, None, layer=prediction.layer, normalization=prediction.normalization
    )
    pos = {g: i for i, g in enumerate(map(str, pred.var_names))}
    idx = np.array([pos[g] for g in stratum.genes], dtype=np.intp)
    if idx.size != pred_cells.shape[1] or np.any(idx != np.arange(idx.size)):
        pred_cells = pred_cells[:, idx]
    pred_labels = pred.obs[key].astype(str).to_numpy()
    vals = peers.score_cells(
        want,
        pred_cells=pred_cells,
        pred_labels=pred_labels,
        truth_cells=truth_cells,
        truth_labels=groups[codes].astype(str),
        genes=stratum.genes,
        perts=stratum.perturbations,
        control=stratum.control,
    )
    note = peers.pred_control_note([n for n in want if n in vals], pred_labels, stratum.control)
    return vals, note


# ------------------------------------------------------------------------------ warm-up


def warm_up(adata, spec: TruthSpec, score: ScoreSpec) -> threading.Thread | None:
    """Compile the engine's kernels in a background thread while the host prepares the truth.

    The scoring calls of :func:`score_sources` are made once on one chunk of zero inputs
    with the same chunk size, ``G``, dtypes and options as the real ``P``-row calls, and the
    peers' kernels of the requested peer metrics are compiled ahead of time for ``(P, G)``
    (:func:`vcjax.peers.warm_up`), so their compiled functions are ready (in JAX's caches)
    when those come; XLA compiles and NumPy
    computes with the GIL released, so on two or more cores the first call's compilation
    overlaps the streaming pass and the t-tests. Returns the thread (join it before
    scoring), or None when the shapes cannot be known yet. Never raises: it is only a
    warm-up, and any error is left for the real calls to report.
    """
    try:
        labels = adata.obs[spec.key]
        n_groups = int(labels.nunique())
        is_control = labels.astype(str) == spec.control
        present = bool(is_control.any())
        P, G = n_groups - int(present), int(adata.n_vars)
        if P < 1 or G < 1 or spec.covariate is not None:
            return None
        kind = spec.weights_kind
        core, topk, ctrl = core_metric_groups(
            requested_metrics(score.metrics), weights=kind != "none", mask=kind == "deg"
        )
        # the peers' kernels: "all" (or peer names) compiles them too, the cell-level ones
        # on the guess that a prediction scored with them is given as cells
        every = isinstance(score.metrics, str) and score.metrics == "all"
        asked = [] if every else [m for m in requested_metrics(score.metrics) if m in METRICS]
        peer_names = list(peers.PEER_METRICS) if every else [
            m for m in asked if not METRICS[m].is_core
        ]  # fmt: skip
        n_control = int(is_control.sum())
    except Exception:  # noqa: BLE001 - prepare() reports bad input
        return None
    if not (core or topk or ctrl or peer_names):
        return None
    x64 = bool(jax.config.jax_enable_x64)  # a thread does not inherit jax.enable_x64()
    has_w, has_m = kind != "none", kind == "deg"

    def run() -> None:
        try:
            with jax.enable_x64(x64):
                wdt = working_dtype()
                # one chunk of the real calls' chunk size: the same compiled function,
                # a chunk's work instead of P rows'
                rows = score.chunk_size or engine.chunk_rows(P, G, engine.shards_per_chunk())
                z = np.broadcast_to(np.zeros(G, wdt), (rows, G))  # O(G) memory
                zb = np.broadcast_to(np.zeros(G, bool), (rows, G))
                ref = np.zeros(G)
                kw = dict(k=int(score.k), strict=bool(score.strict), chunk_size=rows)
                if core:
                    engine.score(
                        z,
                        z,
                        reference=ref,
                        weights=z if has_w else None,
                        mask=zb if has_m else None,
                        metrics=[METRICS[m].kernel for m in core],
                        **kw,
                    )
                if topk:
                    engine.score(
                        z, z, reference=ref, weights=z, metrics=["pearson_delta_topk"], **kw
                    )
                if ctrl:
                    kernels = list(dict.fromkeys(METRICS[m].kernel for m in ctrl))
                    engine.score(z, z, reference=ref, metrics=kernels, **kw)
                if peer_names:
                    peers.warm_up(
                        peer_names, n_perts=P, n_genes=G, scores=has_m, n_control=n_control,
                        cells=any(m in peers.CELL_METRICS or m == "pds" for m in peer_names),
                    )  # fmt: skip
        except Exception:  # noqa: BLE001 - only a warm-up
            log.debug("kernel warm-up failed", exc_info=True)

    thread = threading.Thread(target=run, name="vcjax-warm-up", daemon=True)
    thread.start()
    return thread
