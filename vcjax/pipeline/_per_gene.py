"""Per-gene deltas on each perturbation's top DEGs: the numbers behind the report's gene view."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np

from vcjax.metrics import pearson
from vcjax.pipeline._align import Prediction, align
from vcjax.pipeline._screen import Screen, prepare

__all__ = ["PER_GENE_SOURCES", "per_gene_data"]

#: baselines kept in the per-gene data besides the model.
PER_GENE_SOURCES = ("technical_duplicate", "dataset_mean", "control_mean")


def per_gene_data(
    truth,
    pred=None,
    *,
    key: str | None = None,
    control: str | None = None,
    reference: str = "perturbed",
    layer: str | None = None,
    pred_layer: str | None = None,
    normalize: str | None = "auto",
    pred_normalize: str | None = "auto",
    top_n: int = 25,
    sources: Sequence[str] = PER_GENE_SOURCES,
) -> dict[str, np.ndarray]:
    """Per-gene deltas on each perturbation's top DEGs, for the report's per-gene view.

    For every perturbation ``p``, the ``top_n`` genes with the largest DEG weight (ties:
    larger ``|t|``, then gene order) and, on those genes, the truth delta ``Δ = y − r`` and
    each source's ``Δ̂ = ŷ − r`` (``r`` the screen's Δ reference). Also, over all genes and
    per source, the control-referenced Pearson ``corr(ŷ − u_NTC, y − u_NTC)``
    (docs/metrics.md §6), so that the control-bias view works even when the table lacks
    ``pearson_delta_ctrl``. With a covariate, rows of every stratum follow one another and
    perturbations are named ``covariate/perturbation``.

    Args:
      truth: a :class:`~vcjax.pipeline.Screen`, or an AnnData / ``.h5ad`` path (prepared
        here with ``key``, ``control``, ``reference``, ``layer``, ``normalize``).
      pred: the model's predictions (any form :func:`vcjax.evaluate` accepts, or a
        :class:`~vcjax.pipeline.Prediction`) or None.
      key, control, reference, layer, normalize: truth options when ``truth`` is not a Screen.
      pred_layer, pred_normalize: as in :func:`vcjax.evaluate`.
      top_n: genes kept per perturbation.
      sources: baselines kept besides the model.

    Returns:
      A dict of arrays (all saveable with ``np.savez``): ``perturbations (P,)``,
      ``genes (P, n)``, ``weight (P, n)``, ``deg (P, n)`` bool, ``truth_delta (P, n)``,
      ``delta__<source> (P, n)``, ``pearson_ctrl__<source> (P,)``, ``sources (S,)``,
      ``reference ()``.
    """
    if isinstance(truth, Screen):
        screen = truth
    else:
        screen = prepare(
            truth,
            key=key,
            control=control,
            reference=reference,
            layer=layer,
            normalize=normalize,
            baselines=tuple(s for s in sources if s != "model"),
        )
    prediction: Prediction | None = None
    if pred is not None:
        prediction = align(pred, screen, layer=pred_layer, normalize=pred_normalize)
    parts = [
        _stratum_data(s, None if prediction is None else prediction.matrices[j], sources, top_n)
        for j, s in enumerate(screen.strata)
    ]
    out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0] if k != "sources"}
    out["sources"] = parts[0]["sources"]
    out["reference"] = np.asarray(screen.spec.reference_name)
    return out


def _stratum_data(stratum, model, sources, top_n) -> dict[str, np.ndarray]:
    preds: dict[str, np.ndarray] = {}
    if model is not None:
        preds["model"] = np.asarray(model, dtype=np.float64)
    baselines = stratum.baselines
    for s in sources:
        if s in baselines:
            preds[s] = np.asarray(baselines[s], dtype=np.float64)
    y = np.asarray(stratum.truth, dtype=np.float64)
    P, G = y.shape
    n = int(min(top_n, G))
    r = np.asarray(stratum.reference, dtype=np.float64)
    zeros = np.zeros((P, G), np.float64)
    w = zeros if stratum.weights is None else np.asarray(stratum.weights, np.float64)
    t = zeros if stratum.scores is None else np.abs(np.asarray(stratum.scores, np.float64))
    mask = np.zeros((P, G), bool) if stratum.deg_mask is None else stratum.deg_mask
    # lexsort: last key is primary → weight desc, |t| desc, gene index asc
    gidx = np.arange(G)
    top = np.stack(
        [np.lexsort((gidx, -np.nan_to_num(t[i]), -np.nan_to_num(w[i])))[:n] for i in range(P)]
    )

    def take(a: np.ndarray) -> np.ndarray:
        return np.take_along_axis(a, top, axis=1)

    names = list(stratum.perturbations)
    if stratum.covariate is not None:
        names = [f"{stratum.covariate}/{p}" for p in names]
    out: dict[str, np.ndarray] = {
        "perturbations": np.asarray(names, dtype=str),
        "genes": np.asarray(stratum.genes, dtype=str)[top],
        "weight": take(w),
        "deg": take(mask),
        "truth_delta": take(y - r),
        "sources": np.asarray(list(preds), dtype=str),
    }
    u = np.asarray(stratum.u_ntc, dtype=np.float64)
    with jax.enable_x64(True):
        for name, yhat in preds.items():
            out[f"delta__{name}"] = take(yhat - r)
            out[f"pearson_ctrl__{name}"] = np.asarray(pearson(yhat - u, y - u), np.float64)
    return out
