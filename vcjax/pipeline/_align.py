"""A model's prediction aligned with a prepared truth: one ``(P, G)`` matrix per stratum.

:func:`align` accepts every form a prediction comes in — an AnnData of predicted cells
(pseudobulked by the condition key) or with one row per perturbation, a DataFrame (index
perturbations, columns genes), a mapping ``name → (G,)`` in the truth's gene order, a tuple
``(names, matrix[, genes])``, or a path to an ``.h5ad`` — and returns a
:class:`Prediction`: rows in the stratum's perturbation order, columns in its gene order,
float64, never an alias of the caller's array. Genes and perturbations match by name;
what the truth needs and the prediction lacks is an error naming the first missing names.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from vcjax import data as vdata
from vcjax._errors import VcjaxInputError
from vcjax.pipeline._screen import Screen, Stratum

__all__ = ["Prediction", "align", "align_stratum", "is_cells"]


@dataclasses.dataclass(frozen=True, eq=False)
class Prediction:
    """A prediction aligned with a :class:`~vcjax.pipeline.Screen`.

    Attributes:
      matrices: one ``(P, G)`` float64 matrix per stratum, in the screen's row and gene order.
      cells: the AnnData of predicted cells when the prediction was given as cells (the
        cell-level peer metrics read it), else None.
      layer: the prediction layer read instead of ``X``.
      normalization: what was done to predicted cells' values (``"log1p_cp10k"``/``"none"``).
    """

    matrices: tuple[np.ndarray, ...]
    cells: Any = None
    layer: str | None = None
    normalization: str = "none"


def is_cells(pred, key: str) -> bool:
    """Whether ``pred`` is an AnnData of predicted cells (several cells per condition)."""
    return (
        hasattr(pred, "obs") and key in pred.obs.columns and not pred.obs[key].astype(str).is_unique
    )


def _cell_normalization(pred, normalize: str | None) -> str:
    """What :func:`vcjax.data.group_stats` does to predicted cells (for cell-level metrics)."""
    if not hasattr(pred, "obs") or normalize is None:
        return "none"
    if normalize != "auto":
        return str(normalize)
    X = pred.X
    vals = np.asarray(X.data if hasattr(X, "tocsr") else np.asarray(X).ravel())[: 1 << 16]
    counts = vals.size and np.all(vals >= 0) and np.all(vals == np.round(vals)) and vals.max() > 1
    return "log1p_cp10k" if counts else "none"


def align(
    pred,
    screen: Screen,
    *,
    layer: str | None = None,
    normalize: str | None = "auto",
) -> Prediction:
    """``pred`` aligned with every stratum of ``screen`` (module docstring).

    Args:
      pred: the prediction in any accepted form, or a :class:`Prediction` (returned as is).
      screen: the prepared truth.
      layer: the prediction layer to read instead of ``X``.
      normalize: ``"auto"`` normalises raw integer counts of predicted cells (1e4 per cell,
        log1p); None trusts the values.

    Returns:
      The :class:`Prediction`.
    """
    if isinstance(pred, Prediction):
        if len(pred.matrices) != len(screen.strata):
            raise VcjaxInputError(
                f"the prediction has {len(pred.matrices)} strata; the screen has {len(screen.strata)}"
            )
        return pred
    if isinstance(pred, (str, os.PathLike)):
        pred = vdata.read_h5ad(pred)
    if len(screen.strata) > 1 and isinstance(pred, (np.ndarray, tuple)) and not _has_names(pred):
        raise VcjaxInputError(
            "with a covariate, give predictions with perturbation/gene names, not bare arrays"
        )
    key, cov = screen.spec.key, screen.spec.covariate
    matrices = tuple(
        align_stratum(pred, s, key=key, covariate_key=cov, layer=layer, normalize=normalize)
        for s in screen.strata
    )
    cells = pred if is_cells(pred, key) else None
    norm = _cell_normalization(pred, normalize) if cells is not None else "none"
    return Prediction(matrices, cells, layer, norm)


def _has_names(pred) -> bool:
    return isinstance(pred, tuple) and len(pred) in (2, 3)


def align_stratum(
    pred,
    stratum: Stratum,
    *,
    key: str,
    covariate_key: str | None = None,
    layer: str | None = None,
    normalize: str | None = "auto",
) -> np.ndarray:
    """The prediction as a ``(P, G)`` float64 matrix aligned with one stratum."""
    genes: Sequence[str] | None
    owned = False  # is ``matrix`` a fresh array (not the caller's)?
    if hasattr(pred, "obs") and hasattr(pred, "var_names"):
        if key not in pred.obs.columns:
            raise VcjaxInputError(f"key {key!r} not in the prediction's obs")
        labels = pred.obs[key].astype(str)
        if stratum.covariate is not None and covariate_key and covariate_key in pred.obs.columns:
            keep = (pred.obs[covariate_key].astype(str) == stratum.covariate).to_numpy()
            pred = pred[keep]
            labels = labels[keep]
        if labels.is_unique:
            X = pred.X if layer is None else pred.layers[layer]
            X = X.toarray() if hasattr(X, "toarray") else np.asarray(X)
            names, matrix = list(labels), np.asarray(X, dtype=np.float64)
        else:
            st = vdata.group_stats(pred, key, control=None, layer=layer, normalize=normalize)
            names, matrix = list(st.names), st.mean
            owned = True
        genes = list(map(str, pred.var_names))
    elif isinstance(pred, pd.DataFrame):
        names, matrix, genes = (
            list(map(str, pred.index)),
            pred.to_numpy(np.float64),
            list(map(str, pred.columns)),
        )
    elif isinstance(pred, Mapping):
        names = list(pred)
        matrix = np.stack([np.asarray(pred[n], dtype=np.float64) for n in names])
        genes = None
        owned = True
    elif isinstance(pred, tuple) and len(pred) in (2, 3):
        names = list(map(str, pred[0]))
        matrix = np.asarray(pred[1], dtype=np.float64)
        genes = list(map(str, pred[2])) if len(pred) == 3 else None
    elif isinstance(pred, np.ndarray) or hasattr(pred, "__array__"):
        matrix = np.asarray(pred, dtype=np.float64)
        shape = (len(stratum.perturbations), len(stratum.genes))
        if matrix.shape != shape:
            raise VcjaxInputError(
                f"prediction array has shape {matrix.shape}, expected {shape} "
                "(the truth's perturbation × gene order)"
            )
        names, genes = list(stratum.perturbations), None
    else:
        raise TypeError(
            "pred must be an AnnData, a DataFrame, a mapping name → profile, (names, matrix[, genes]), "
            "a (P, G) array in the truth's order, or an .h5ad path"
        )
    return _reindex(matrix, names, genes, stratum, owned=owned)


def _reindex(matrix, names, genes, stratum: Stratum, *, owned: bool) -> np.ndarray:
    perts, truth_genes = stratum.perturbations, stratum.genes
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise VcjaxInputError(
            f"duplicated perturbation names in the prediction: {', '.join(dup[:5])}"
        )
    if matrix.ndim != 2 or matrix.shape[0] != len(names):
        raise VcjaxInputError(
            f"prediction matrix has shape {matrix.shape}, expected ({len(names)}, G)"
        )
    if genes is None:
        if matrix.shape[1] != len(truth_genes):
            raise VcjaxInputError(
                f"prediction has {matrix.shape[1]} genes but the truth has {len(truth_genes)}; "
                "pass gene names to match"
            )
        gidx = np.arange(len(truth_genes))
    else:
        if len(set(genes)) != len(genes):
            dup = sorted({g for g in genes if genes.count(g) > 1})
            raise VcjaxInputError(f"duplicated gene names in the prediction: {', '.join(dup[:5])}")
        pos = {g: i for i, g in enumerate(genes)}
        missing = [g for g in truth_genes if g not in pos]
        if len(missing) == len(truth_genes):
            raise VcjaxInputError("the prediction and the truth share no genes")
        if missing:
            raise VcjaxInputError(
                f"the prediction lacks {len(missing)} of the truth's {len(truth_genes)} genes: "
                + ", ".join(missing[:5])
                + (" …" if len(missing) > 5 else "")
            )
        gidx = np.array([pos[g] for g in truth_genes])
    where = {n: i for i, n in enumerate(names)}
    missing = [p for p in perts if p not in where]
    if missing:
        raise VcjaxInputError(
            f"the prediction lacks {len(missing)} of {len(perts)} perturbations: "
            + ", ".join(missing[:5])
            + (" …" if len(missing) > 5 else "")
        )
    ridx = np.array([where[p] for p in perts])
    # skip the (P, G) copies when rows or genes are already in the truth's order
    if _is_identity(ridx, matrix.shape[0]):
        out = matrix if owned else matrix.copy()  # never an alias of the caller's array
    else:
        out = np.take(matrix, ridx, axis=0)
    if not _is_identity(gidx, matrix.shape[1]):
        out = np.take(out, gidx, axis=1)
    if not np.all(np.isfinite(out)):
        r, c = np.argwhere(~np.isfinite(out))[0]
        raise VcjaxInputError(
            f"the prediction has NaN/inf values (first: perturbation {perts[r]!r}, gene {truth_genes[c]!r})"
        )
    return out


def _is_identity(idx: np.ndarray, n: int) -> bool:
    return idx.shape == (n,) and bool(np.all(idx == np.arange(n)))
