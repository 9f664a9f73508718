"""A model's prediction aligned with a prepared truth: one ``(P, G)`` matrix per stratum.

:func:`align` accepts every form a prediction comes in — an AnnData of predicted cells
(pseudobulked by the condition key) or with one row per perturbation, a DataFrame (index
perturbations, columns genes), a mapping ``name → (G,)`` in the truth's gene order, a tuple
``(names, matrix[, genes])`` (a list of the same, a matrix dense or sparse), a ``(P, G)``
array in the truth's order, or a path to an ``.h5ad``, ``.csv``/``.tsv`` or ``.parquet``
file — and returns a :class:`Prediction`: rows in the stratum's perturbation order, columns
in its gene order, float64, never an alias of the caller's array. Genes and perturbations
match by name; what the truth needs and the prediction lacks is an error naming the first
missing names, and what the prediction has beyond the truth is named in one warning.

The prediction's scale is checked against the truth's (:func:`vcjax.data.compare_scales`,
``check_scale``): a linear-scale, raw-count or centred prediction scored against a
log-normalised truth is an error naming the evidence, not a table of meaningless numbers.
Predicted cells of raw counts are normalised like the truth (with a warning saying so).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp

from vcjax import data as vdata
from vcjax._errors import VcjaxInputError, preview
from vcjax.pipeline._screen import Screen, Stratum

__all__ = [
    "CHECK_SCALE",
    "Prediction",
    "align",
    "align_stratum",
    "check_scales",
    "is_cells",
    "read_prediction",
    "validate_check_scale",
]

#: the values of ``check_scale``
CHECK_SCALE = ("error", "warn", "off")

#: suffixes of the prediction tables :func:`read_prediction` reads
_TABLES = (".csv", ".tsv", ".csv.gz", ".tsv.gz", ".parquet", ".pq")

_ACCEPTED = (
    "an AnnData (cells, or one row per perturbation), a DataFrame (index perturbations, "
    "columns genes), a mapping name → (G,) profile, a tuple (names, matrix) or (names, "
    "matrix, genes), a (P, G) array in the truth's order, or a path to .h5ad/.csv/.parquet"
)


@dataclasses.dataclass(frozen=True, eq=False)
class Prediction:
    """A prediction aligned with a :class:`~vcjax.pipeline.Screen`.

    Attributes:
      matrices: one ``(P, G)`` float64 matrix per stratum, in the screen's row and gene order.
      cells: the AnnData of predicted cells when the prediction was given as cells (the
        cell-level peer metrics read it), else None.
      layer: the prediction layer read instead of ``X``.
      normalization: what was done to predicted cells' values (``"log1p_cp10k"``/``"none"``).
      scale: the evidence of the prediction's scale (:class:`vcjax.data.ScaleEvidence`;
        of the predicted cells, or of the aligned matrices), None when not computed.
    """

    matrices: tuple[np.ndarray, ...]
    cells: Any = None
    layer: str | None = None
    normalization: str = "none"
    scale: vdata.ScaleEvidence | None = None


def is_cells(pred, key: str) -> bool:
    """Whether ``pred`` is an AnnData of predicted cells (several cells per condition)."""
    return (
        hasattr(pred, "obs") and key in pred.obs.columns and not pred.obs[key].astype(str).is_unique
    )


def read_prediction(path: str | os.PathLike):
    """A prediction file: an ``.h5ad`` (cells or one row per perturbation), or a table
    (``.csv``/``.tsv``/``.parquet``: one row per perturbation, first column or index the
    names, the other columns genes) as a DataFrame."""
    path = os.fspath(path)
    low = path.lower()
    if not low.endswith(_TABLES):
        return vdata.open_h5ad(path)  # X is streamed (vcjax.data.group_stats)
    if not os.path.isfile(path):
        raise VcjaxInputError(f"prediction file not found: {path}")
    try:
        if low.endswith((".parquet", ".pq")):
            df = pd.read_parquet(path)
            if (
                isinstance(df.index, pd.RangeIndex)
                and df.shape[1]
                and not pd.api.types.is_numeric_dtype(df.dtypes.iloc[0])
            ):
                df = df.set_index(df.columns[0])
        else:
            df = pd.read_csv(path, sep="\t" if ".tsv" in low else ",", index_col=0)
    except Exception as exc:  # noqa: BLE001 - re-raised with the path
        raise VcjaxInputError(
            f"cannot read prediction table {path}: {type(exc).__name__}: {exc}"
        ) from exc
    bad = [str(c) for c in df.columns if not pd.api.types.is_numeric_dtype(df[c])]
    if bad:
        raise VcjaxInputError(
            f"prediction table {path}: non-numeric gene column(s) {', '.join(bad[:5])}"
        )
    if df.shape[0] == 0 or df.shape[1] == 0:
        raise VcjaxInputError(
            f"prediction table {path} is empty ({df.shape[0]} rows x {df.shape[1]} genes)"
        )
    df.index = df.index.astype(str)
    df.columns = df.columns.astype(str)
    return df


def _as_named_tuple(pred):
    """A list ``[names, matrix(, genes)]`` as the tuple form; anything else unchanged."""
    if (
        isinstance(pred, list)
        and len(pred) in (2, 3)
        and not isinstance(pred[0], (int, float, np.number))
        and np.ndim(pred[0]) == 1
        and (sp.issparse(pred[1]) or np.ndim(pred[1]) == 2)
    ):
        return tuple(pred)
    return pred


def _truth_bulk_scale(screen: Screen) -> vdata.ScaleEvidence:
    """The scale evidence of the truth's pseudobulk matrices (sampled rows; no copy of
    them)."""
    rows = [s.truth for s in screen.strata]
    return vdata.scale_evidence(rows[0] if len(rows) == 1 else np.concatenate(rows),
                                form="pseudobulk")  # fmt: skip


def check_scales(screen: Screen, evidence: vdata.ScaleEvidence, check_scale: str) -> None:
    """Raise (``"error"``) or warn (``"warn"``) when ``evidence`` of a prediction shows
    another scale than the truth's (:func:`vcjax.data.compare_scales`); ``"off"``: nothing.

    The truth's scale is that of its cells (recorded by :func:`vcjax.prepare`), or of its
    pseudobulk matrices for a screen saved before it was. A pseudobulk prediction that
    disagrees with the truth's cells is compared with the truth's pseudobulk matrices too:
    it mismatches only when it agrees with neither (raw-count means of a shallow screen look
    like log1p means on both sides). The pseudobulk evidence is computed only then.
    """
    if check_scale == "off":
        return
    truth_ev = screen.scale if screen.scale is not None else _truth_bulk_scale(screen)
    reason = vdata.compare_scales(truth_ev, evidence)
    if reason is None:
        return
    if (
        evidence.form == "pseudobulk"
        and screen.scale is not None
        and vdata.compare_scales(_truth_bulk_scale(screen), evidence) is None
    ):
        return
    if check_scale == "error":
        raise VcjaxInputError(
            f"scale mismatch: {reason}; if the scales are right, pass check_scale='warn' "
            "(CLI: --check-scale warn)"
        )
    warnings.warn(f"scale mismatch: {reason}", UserWarning, stacklevel=4)


def validate_check_scale(check_scale) -> str:
    """``check_scale`` itself, or a one-line error listing :data:`CHECK_SCALE`."""
    if check_scale not in CHECK_SCALE:
        raise VcjaxInputError(
            f"check_scale must be one of {', '.join(map(repr, CHECK_SCALE))}; got {check_scale!r}"
        )
    return check_scale


def _cells_matrix(pred, layer: str | None):
    if layer is None:
        return pred.X
    if layer not in pred.layers:
        raise VcjaxInputError(f"layer {layer!r} not in the prediction's layers")
    return pred.layers[layer]


def align(
    pred,
    screen: Screen,
    *,
    layer: str | None = None,
    normalize: str | None = "auto",
    check_scale: Literal["error", "warn", "off"] = "error",
) -> Prediction:
    """``pred`` aligned with every stratum of ``screen`` (module docstring).

    Args:
      pred: the prediction in any accepted form, or a :class:`Prediction` (returned as is).
      screen: the prepared truth.
      layer: the prediction layer to read instead of ``X``.
      normalize: ``"auto"`` normalises raw integer counts of predicted cells (1e4 per cell,
        log1p; a warning says so); None trusts the values.
      check_scale: ``"error"`` (default): a prediction on another scale than the truth
        (raw counts, linear, centred against log1p, …; :func:`vcjax.data.compare_scales`)
        raises a one-line :class:`~vcjax.VcjaxInputError` naming the evidence;
        ``"warn"``: a ``UserWarning`` instead; ``"off"``: no check.

    Returns:
      The :class:`Prediction`.
    """
    validate_check_scale(check_scale)
    if isinstance(pred, Prediction):
        if len(pred.matrices) != len(screen.strata):
            raise VcjaxInputError(
                f"the prediction has {len(pred.matrices)} strata; the screen has {len(screen.strata)}"
            )
        return pred
    opened = isinstance(pred, (str, os.PathLike))
    if opened:
        pred = read_prediction(pred)
    pred = _as_named_tuple(pred)
    if len(screen.strata) > 1 and isinstance(pred, (np.ndarray, tuple)) and not _has_names(pred):
        raise VcjaxInputError(
            "with a covariate, give predictions with perturbation/gene names, not bare arrays"
        )
    key, cov = screen.spec.key, screen.spec.covariate
    parts = [
        _stratum_parts(pred, s, key=key, covariate_key=cov, layer=layer, normalize=normalize)
        for s in screen.strata
    ]
    matrices = tuple(
        _reindex(m, names, genes, s, owned=owned)
        for (m, names, genes, owned, _, _), s in zip(parts, screen.strata)
    )
    _warn_extras(parts, screen)
    cells = pred if is_cells(pred, key) else None
    norm = "none"
    if cells is not None:
        norm = next((p[4] for p in parts if p[4] != "none"), "none")
        evidence = parts[0][5]  # sampled by group_stats on its pass over all the cells
        if evidence is None or evidence.normalization != norm:
            evidence = vdata.scale_evidence(_cells_matrix(pred, layer), normalization=norm)
        if norm == "log1p_cp10k" and normalize == "auto":
            warnings.warn(
                f"the predicted cells look like raw counts ({evidence.summary()}): normalised "
                "to log1p(1e4·x/total) per cell before pseudobulking, as the truth; pass "
                "pred_normalize=None to score them as given",
                UserWarning,
                stacklevel=3,
            )
    else:
        evidence = vdata.scale_evidence(
            matrices[0] if len(matrices) == 1 else np.concatenate(matrices), form="pseudobulk"
        )
    check_scales(screen, evidence, check_scale)
    if opened and getattr(pred, "isbacked", False):
        pred.file.close()  # anndata reopens it if the cells are read again
    return Prediction(matrices, cells, layer, norm, evidence)


def _warn_extras(parts, screen: Screen) -> None:
    """One warning naming the prediction's perturbations and genes that the truth lacks."""
    known = set(screen.perturbations) | {screen.spec.control}
    names = dict.fromkeys(n for p in parts for n in p[1])
    extra_p = [n for n in names if n not in known]
    genes = dict.fromkeys(g for p in parts if p[2] is not None for g in p[2])
    truth_genes = set(screen.genes)
    extra_g = [g for g in genes if g not in truth_genes]
    said = []
    for what, extra, total in (
        ("perturbations", extra_p, len(names)),
        ("genes", extra_g, len(genes)),
    ):
        if extra:
            said.append(
                f"{len(extra)} of its {total} {what} ({', '.join(extra[:5])}"
                + (", …" if len(extra) > 5 else "")
                + ")"
            )
    if said:
        warnings.warn(
            "the prediction has " + " and ".join(said) + " that the truth lacks; not scored",
            UserWarning,
            stacklevel=4,
        )


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
    matrix, names, genes, owned, _, _ = _stratum_parts(
        _as_named_tuple(pred), stratum, key=key, covariate_key=covariate_key, layer=layer,
        normalize=normalize,
    )  # fmt: skip
    return _reindex(matrix, names, genes, stratum, owned=owned)


def _dense(X) -> np.ndarray:
    """An in-memory or backed (h5py / anndata sparse dataset) matrix as float64 ndarray."""
    if hasattr(X, "to_memory"):  # anndata's backed sparse dataset
        X = X.to_memory()
    if sp.issparse(X):
        return X.toarray().astype(np.float64, copy=False)
    return np.asarray(X, dtype=np.float64)


def _stratum_parts(pred, stratum: Stratum, *, key, covariate_key, layer, normalize):
    """``(matrix, names, genes, owned, normalization, scale)`` of one stratum, before
    reindexing.

    ``owned``: ``matrix`` is a fresh array (not the caller's); ``normalization``: what
    :func:`vcjax.data.group_stats` did to predicted cells (``"none"`` otherwise);
    ``scale``: the scale evidence of all the predicted cells when group_stats read them all
    (else None).
    """
    genes: Sequence[str] | None
    owned = False
    norm = "none"
    scale = None
    if hasattr(pred, "obs") and hasattr(pred, "var_names"):
        if key in pred.obs.columns:
            labels = pred.obs[key].astype(str)
        elif pred.obs_names.is_unique and set(map(str, pred.obs_names)) & set(
            stratum.perturbations
        ):
            labels = pd.Series(list(map(str, pred.obs_names)), index=pred.obs_names)
        else:  # one row per perturbation may be named by obs_names instead
            raise VcjaxInputError(
                f"key {key!r} not in the prediction's obs (columns: "
                f"{preview(pred.obs.columns, 10) or 'none'}), and its obs_names are not the "
                "truth's perturbations"
            )
        keep = None
        if stratum.covariate is not None and covariate_key and covariate_key in pred.obs.columns:
            keep = (pred.obs[covariate_key].astype(str) == stratum.covariate).to_numpy()
            labels = labels[keep]
        if labels.is_unique:
            X = _dense(_cells_matrix(pred, layer))  # one row per perturbation: small
            names, matrix = list(labels), X if keep is None else X[keep]
            owned = keep is not None
        else:
            if keep is not None:
                pred = (
                    pred[keep] if not getattr(pred, "isbacked", False) else pred[keep].to_memory()
                )
            st = vdata.group_stats(
                pred, key, control=None, layer=layer, normalize=normalize, sumsq=False
            )
            names, matrix, norm = list(st.names), st.mean, st.normalization
            scale = st.scale if keep is None else None
            owned = True
        genes = list(map(str, pred.var_names))
    elif isinstance(pred, pd.DataFrame):
        names, matrix, genes = (
            list(map(str, pred.index)),
            pred.to_numpy(np.float64),
            list(map(str, pred.columns)),
        )
    elif isinstance(pred, Mapping):
        names = list(map(str, pred))
        matrix = np.stack([_dense(pred[n]).ravel() for n in pred])
        genes = None
        owned = True
    elif isinstance(pred, tuple) and len(pred) in (2, 3):
        names = list(map(str, pred[0]))
        matrix = _dense(pred[1])
        genes = list(map(str, pred[2])) if len(pred) == 3 else None
    elif isinstance(pred, (np.ndarray, list)) or hasattr(pred, "__array__") or sp.issparse(pred):
        matrix = _dense(pred)
        shape = (len(stratum.perturbations), len(stratum.genes))
        if matrix.shape != shape:
            raise VcjaxInputError(
                f"prediction array has shape {matrix.shape}, expected {shape} "
                "(the truth's perturbation × gene order)"
            )
        names, genes = list(stratum.perturbations), None
    else:
        raise VcjaxInputError(
            f"cannot read a prediction of type {type(pred).__name__}: give {_ACCEPTED}"
        )
    return matrix, names, genes, owned, norm, scale


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
