"""Baseline predictions: what a useless, a chance-level and a perfect-within-noise model predict.

Each baseline is built from the quantities :func:`vcjax.pipeline.derive` computes from the
group sums, over NumPy (the point estimate) or ``jax.numpy`` (every bootstrap resample), with
a leading resample axis ``b`` (docs/metrics.md §3):

* ``control_mean`` — ``u_NTC``, the mean of all control cells (negative baseline);
* ``dataset_mean`` — ``u_ALL`` over all cells (negative baseline);
* ``null`` — each perturbation predicted by *another* perturbation's half-1 pseudobulk, a
  seeded derangement (chance level for perturbation specificity);
* ``technical_duplicate`` — the perturbation's own half-1 pseudobulk (positive baseline,
  the noise ceiling);
* ``additive`` — for combinations ``A+B``: ``u + (μ_A − u) + (μ_B − u)`` from half-1
  means, with ``u = u_ALL`` of half 1; NaN (with a reason) otherwise;
* ``loo_mean`` — leave-one-out negative: the mean of the *other* perturbations' means;
* ``interpolated_duplicate`` — per gene ``α·duplicate + (1 − α)·loo_mean`` with
  ``α = 1 − adjusted p`` (CellSimBench's interpolated positive control).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "BASELINE_ROLES",
    "NEGATIVES",
    "POSITIVE",
    "additive_index",
    "build_baselines",
    "interpolated_duplicate",
    "null_derangement",
]

#: what each baseline is for: the calibration's negatives and null, its positive, others.
BASELINE_ROLES: Mapping[str, str] = {
    "control_mean": "negative",
    "dataset_mean": "negative",
    "null": "null",
    "technical_duplicate": "positive",
    "additive": "reference",
    "loo_mean": "negative",
    "interpolated_duplicate": "positive",
}
#: the baselines calibration takes its 0 from (the best of them, per perturbation).
NEGATIVES = ("control_mean", "dataset_mean", "null")
#: the baseline calibration takes its 1 from.
POSITIVE = "technical_duplicate"


def null_derangement(n: int, *, seed: int = 0) -> np.ndarray:
    """A seeded permutation of ``range(n)`` with no fixed point (``n >= 2``).

    Uses rejection sampling of uniform permutations (expected ``e`` tries), so every
    derangement is equally likely.
    """
    if n < 2:
        raise ValueError("a derangement needs at least 2 perturbations")
    rng = np.random.default_rng(seed)
    idx = np.arange(n)
    while True:
        perm = rng.permutation(n)
        if not np.any(perm == idx):
            return perm


def additive_index(perts: Sequence[str], *, sep: str = "+") -> tuple[np.ndarray, list[str]]:
    """The parts of each combination ``A+B`` among ``perts``, and why a row has none.

    Returns:
      ``(index, reasons)``: ``(P, K)`` int32 row of each part (``-1`` pads), all ``-1`` where
      the additive baseline is undefined; and per row ``""`` when defined, else the reason
      (not a combination, or a single perturbation missing from the screen).
    """
    pos = {p: i for i, p in enumerate(perts)}
    parts_all, reasons = [], []
    for p in perts:
        parts = [s for s in p.split(sep) if s]
        missing = [s for s in parts if s not in pos]
        if len(parts) < 2:
            reasons.append("not a combination")
        elif missing:
            reasons.append("single perturbation(s) not in the screen: " + ", ".join(missing))
        else:
            reasons.append("")
        parts_all.append([pos[s] for s in parts] if reasons[-1] == "" else [])
    K = max(1, max((len(x) for x in parts_all), default=1))
    index = np.full((len(perts), K), -1, dtype=np.int32)
    for r, x in enumerate(parts_all):
        index[r, : len(x)] = x
    return index, reasons


def _additive(dup, u_all_h1, index: np.ndarray, *, xp: Any):
    """``u + Σ_k (μ_{part k} − u)`` per row of ``index`` (NaN for rows without parts)."""
    valid = index[:, 0] >= 0
    u = u_all_h1[..., None, :]
    if xp is np:  # the host computes only the combinations (most screens have few or none)
        out = np.full(dup.shape, np.nan)
        rows = np.flatnonzero(valid)
        if rows.size:
            out[..., rows, :] = _additive_rows(dup, u, index[rows], xp=np)
        return out
    return xp.where(xp.asarray(valid)[:, None], _additive_rows(dup, u, index, xp=xp), xp.nan)


def _additive_rows(dup, u, index: np.ndarray, *, xp: Any):
    parts = dup[..., np.maximum(index, 0), :] - u[..., None, :]  # (b, R, K, G)
    parts = xp.where(xp.asarray(index >= 0)[:, :, None], parts, 0.0)
    return u + parts.sum(axis=-2)


def interpolated_duplicate(duplicate, negative, pvals_adj, *, xp: Any = np):
    """Per gene ``α·duplicate + (1 − α)·negative`` with ``α = 1 − p_adj`` (NaN p → α = 0).

    CellSimBench's interpolated positive control for averaged profiles: genes without
    evidence of change are predicted by the negative, genes with strong evidence by the
    technical duplicate.
    """
    alpha = xp.asarray(1.0 - xp.where(xp.isnan(pvals_adj), 1.0, pvals_adj), dtype=duplicate.dtype)
    return alpha * duplicate + (1.0 - alpha) * negative


def build_baselines(
    names: Sequence[str],
    *,
    duplicate,
    u_ntc,
    u_all_full,
    u_all_half1,
    full_means,
    pvals_adj,
    derangement: np.ndarray | None,
    additive: np.ndarray | None,
    xp: Any = np,
) -> dict[str, Any]:
    """The baselines ``names`` as ``(b, P, G)`` predictions (constant ones as broadcast views).

    Args:
      names: baselines to build (``interpolated_duplicate`` is skipped without p-values).
      duplicate: ``(b, P, G)`` half-1 pseudobulks of the perturbations.
      u_ntc, u_all_full, u_all_half1: ``(b, G)`` control mean and ``u_ALL`` of all cells /
        of half 1.
      full_means: ``(b, P, G)`` pseudobulks of the perturbations over all cells (for the
        leave-one-out mean), or None when not needed.
      pvals_adj: ``(b, P, G)`` adjusted DEG p-values, or None.
      derangement: ``(P,)`` the null's permutation (None when ``P < 2``).
      additive: ``(P, K)`` parts of each combination (:func:`additive_index`).
      xp: NumPy or ``jax.numpy``.
    """
    P = duplicate.shape[-2]
    out: dict[str, Any] = {}
    loo = None
    for name in names:
        if name == "control_mean":
            out[name] = xp.broadcast_to(u_ntc[..., None, :], duplicate.shape)
        elif name == "dataset_mean":
            out[name] = xp.broadcast_to(u_all_full[..., None, :], duplicate.shape)
        elif name == "technical_duplicate":
            out[name] = duplicate
        elif name == "null":
            out[name] = (
                duplicate[..., derangement, :]
                if derangement is not None
                else xp.full_like(duplicate, xp.nan)
            )
        elif name == "additive":
            out[name] = _additive(duplicate, u_all_half1, additive, xp=xp)
        elif name in ("loo_mean", "interpolated_duplicate"):
            if name == "interpolated_duplicate" and pvals_adj is None:
                continue
            if loo is None:
                loo = (
                    (full_means.sum(axis=-2, keepdims=True) - full_means) / (P - 1)
                    if P >= 2
                    else xp.full_like(full_means, xp.nan)
                )
            out[name] = (
                loo
                if name == "loo_mean"
                else interpolated_duplicate(duplicate, loo, pvals_adj, xp=xp)
            )
        else:  # pragma: no cover - TruthSpec validates the names
            raise ValueError(name)
    return out
