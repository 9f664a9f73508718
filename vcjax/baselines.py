"""Baseline predictions: what a useless, a chance-level and a perfect-within-noise model predict.

All functions take per-condition pseudobulks (rows aligned with ``names``) and return
``(P, G)`` predictions for the perturbations ``perts``; none of them scores anything.
Construction follows METRICS.md §2 and §4 (the Diversity-by-Design code path):

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
  ``α = 1 − adjusted p`` (CellSimBench's interpolated positive control, METRICS.md §7).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "NEGATIVE",
    "NULL",
    "POSITIVE",
    "control_mean",
    "dataset_mean",
    "technical_duplicate",
    "null_derangement",
    "null",
    "additive",
    "loo_mean",
    "interpolated_duplicate",
]

NEGATIVE = ("control_mean", "dataset_mean")
NULL = ("null",)
POSITIVE = "technical_duplicate"


def control_mean(u_ntc: np.ndarray, n_perts: int) -> np.ndarray:
    """``u_NTC`` repeated for every perturbation, ``(P, G)``."""
    return np.broadcast_to(np.asarray(u_ntc), (n_perts, np.shape(u_ntc)[-1]))


def dataset_mean(u_all_full: np.ndarray, n_perts: int) -> np.ndarray:
    """``u_ALL`` over all cells repeated for every perturbation, ``(P, G)``."""
    return np.broadcast_to(np.asarray(u_all_full), (n_perts, np.shape(u_all_full)[-1]))


def technical_duplicate(pb_half1: np.ndarray) -> np.ndarray:
    """The perturbations' own half-1 pseudobulks, ``(P, G)`` (rows already perturbations)."""
    return np.asarray(pb_half1)


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


def null(pb_half1: np.ndarray, *, seed: int = 0) -> np.ndarray:
    """Each perturbation predicted by another one's half-1 pseudobulk (all-NaN when P < 2)."""
    pb_half1 = np.asarray(pb_half1)
    if pb_half1.shape[0] < 2:
        return np.full_like(pb_half1, np.nan)
    return pb_half1[null_derangement(pb_half1.shape[0], seed=seed)]


def additive(
    perts: Sequence[str], pb_half1: np.ndarray, u_all_half1: np.ndarray, *, sep: str = "+"
) -> tuple[np.ndarray, list[str]]:
    """Additive prediction for combinations, METRICS.md §4.

    Args:
      perts: perturbation names, rows of ``pb_half1``; combinations are ``A+B``.
      pb_half1: half-1 pseudobulks of the perturbations ``(P, G)``.
      u_all_half1: ``u_ALL`` of half 1 ``(G,)``.

    Returns:
      ``(P, G)`` predictions ``u + Σ_i (μ_i − u)`` over the combination's parts, and a
      reason per row: ``""`` when defined, else why it is NaN (not a combination, or a
      single perturbation missing from the screen).
    """
    index = {p: i for i, p in enumerate(perts)}
    pb_half1 = np.asarray(pb_half1, dtype=np.float64)
    u = np.asarray(u_all_half1, dtype=np.float64)
    out = np.full(pb_half1.shape, np.nan)
    reasons = []
    for row, p in enumerate(perts):
        parts = [s for s in p.split(sep) if s]
        if len(parts) < 2:
            reasons.append("not a combination")
            continue
        missing = [s for s in parts if s not in index]
        if missing:
            reasons.append("single perturbation(s) not in the screen: " + ", ".join(missing))
            continue
        out[row] = u + sum(pb_half1[index[s]] - u for s in parts)
        reasons.append("")
    return out, reasons


def loo_mean(pb_full: np.ndarray) -> np.ndarray:
    """Leave-one-out negative: row ``p`` is the mean of the other perturbations' means.

    ``(Σ_q μ_q − μ_p) / (P − 1)``; all-NaN when ``P < 2``.
    """
    pb_full = np.asarray(pb_full, dtype=np.float64)
    n = pb_full.shape[0]
    if n < 2:
        return np.full_like(pb_full, np.nan)
    return (pb_full.sum(axis=0, keepdims=True) - pb_full) / (n - 1)


def interpolated_duplicate(
    duplicate: np.ndarray, negative: np.ndarray, pvals_adj: np.ndarray
) -> np.ndarray:
    """Per gene ``α·duplicate + (1 − α)·negative`` with ``α = 1 − p_adj`` (NaN p → α = 0).

    CellSimBench's interpolated positive control for averaged profiles (METRICS.md §7):
    genes without evidence of change are predicted by the negative, genes with strong
    evidence by the technical duplicate.
    """
    alpha = 1.0 - np.asarray(pvals_adj, dtype=np.float64)
    alpha[np.isnan(alpha)] = 0.0  # NaN p → α = 0 (as nan_to_num(p, nan=1), without its passes)
    out = alpha * duplicate
    rest = np.multiply(np.subtract(1.0, alpha, out=alpha), negative)
    # = α·duplicate + (1 − α)·negative, the same operations with fewer temporaries; in
    # place only where that keeps NumPy's broadcasting (e.g. p per gene, rows of profiles)
    in_place = out.shape == np.broadcast_shapes(out.shape, rest.shape)
    return np.add(out, rest, out=out if in_place else None)
