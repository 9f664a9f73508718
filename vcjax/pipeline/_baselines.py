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

The point estimate (:func:`vcjax.prepare`) holds none of them as a ``(P, G)`` matrix: a
:class:`HostBaselines` builds a baseline's rows from the group sums when they are asked
for — every row (``baselines[name]``, what saving a screen writes) or a block of rows at a
time (:meth:`HostBaselines.source`, what scoring streams through the engine) — with the
same float64 operations as :func:`build_baselines`, so the values are the same.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from vcjax.engine import Rows

__all__ = [
    "BASELINE_ROLES",
    "HostBaselines",
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


#: baselines that are one ``(G,)`` vector for every perturbation (held as broadcast views)
CONSTANT = ("control_mean", "dataset_mean")

#: elements per block when a baseline's rows are built in blocks (about 8 MB in float64)
_BLOCK_ELEMENTS = 1 << 20


def sequential_row_sum(rows_of, n_rows: int, n_cols: int) -> np.ndarray:
    """``Σ_r rows_of(r0, r1)`` over row blocks, added row after row in order.

    The same float64 sequence of additions as NumPy's ``x.sum(axis=0)`` of the stacked
    ``(n_rows, n_cols)`` matrix (NumPy adds the rows of a reduction over a non-contiguous
    axis one after another), so the result is bit-identical to it without the matrix.
    """
    step = max(1, _BLOCK_ELEMENTS // max(n_cols, 1))
    buf = np.empty((step + 1, n_cols))
    total = None
    for r0 in range(0, n_rows, step):
        r1 = min(r0 + step, n_rows)
        if total is None:
            total = np.add.reduce(rows_of(r0, r1), axis=0)
        else:
            buf[0] = total
            buf[1 : 1 + r1 - r0] = rows_of(r0, r1)
            total = np.add.reduce(buf[: 1 + r1 - r0], axis=0)
    return np.zeros(n_cols) if total is None else total


class HostBaselines(Mapping):
    """The point estimate's baselines, built from the half sums when asked for (``b = 1``).

    A mapping name → ``(1, P, G)`` float64 prediction, like :func:`build_baselines`'s
    (whose arithmetic it repeats row block by row block, so the values are the same): the
    constant baselines are broadcast views of ``u_NTC`` / ``u_ALL``, every other one is
    built whole on each access (nothing is kept). :meth:`block` builds rows ``r0:r1``
    only and :meth:`source` wraps that as an :class:`vcjax.engine.Rows`, which scoring
    streams chunk by chunk: no baseline's ``(P, G)`` matrix exists while it is scored.

    Args:
      names: the baselines (``interpolated_duplicate`` is left out without p-values).
      s1, s2: ``(C, G)`` float64 per-group sums of half 1 and half 2.
      n1, n_full: ``(C,)`` float64 cells per group in half 1 and in both halves.
      rows: ``(P,)`` the perturbations' group indices.
      u_ntc, u_all_full, u_all_half1: ``(G,)`` control mean, ``u_ALL`` of all cells / of
        half 1.
      pvals_adj: ``(P, G)`` adjusted DEG p-values, or None.
      derangement: ``(P,)`` the null's permutation (None when ``P < 2``).
      additive: ``(P, K)`` parts of each combination (:func:`additive_index`).
    """

    def __init__(
        self,
        names: Sequence[str],
        *,
        s1: np.ndarray,
        s2: np.ndarray,
        n1: np.ndarray,
        n_full: np.ndarray,
        rows: np.ndarray,
        u_ntc: np.ndarray,
        u_all_full: np.ndarray,
        u_all_half1: np.ndarray,
        pvals_adj: np.ndarray | None,
        derangement: np.ndarray | None,
        additive: np.ndarray | None,
    ) -> None:
        self._names = tuple(
            n for n in names if not (n == "interpolated_duplicate" and pvals_adj is None)
        )
        self._s1, self._s2, self._n1, self._n_full = s1, s2, n1, n_full
        self._rows = np.asarray(rows, dtype=np.intp)
        self._u = {"control_mean": u_ntc, "dataset_mean": u_all_full}
        self._u_h1 = u_all_half1
        self._padj = pvals_adj
        self._der = None if derangement is None else np.asarray(derangement, dtype=np.intp)
        self._additive = additive
        P = self._rows.size
        self.shape = (P, s1.shape[1])
        self._loo_total = None
        if P >= 2 and {"loo_mean", "interpolated_duplicate"} & set(self._names):
            # Σ over perturbations of their all-cell means, NumPy's order (build_baselines)
            self._loo_total = sequential_row_sum(self._full_means, P, self.shape[1])

    # -- the rows of each baseline (float64, the operations of build_baselines)
    def _duplicate_of(self, idx: np.ndarray) -> np.ndarray:
        g = self._rows[idx]
        return self._s1[g] / self._n1[g, None]

    def _full_means(self, r0: int, r1: int) -> np.ndarray:
        g = self._rows[r0:r1]
        return (self._s1[g] + self._s2[g]) / self._n_full[g, None]

    def _loo(self, r0: int, r1: int) -> np.ndarray:
        if self._loo_total is None:  # P < 2
            return np.full((r1 - r0, self.shape[1]), np.nan)
        return (self._loo_total - self._full_means(r0, r1)) / (self.shape[0] - 1)

    def _additive_block(self, r0: int, r1: int) -> np.ndarray:
        out = np.full((r1 - r0, self.shape[1]), np.nan)
        index = self._additive[r0:r1]
        valid = np.flatnonzero(index[:, 0] >= 0)
        if valid.size:
            idx = index[valid]
            u = self._u_h1[None, :]
            parts = self._duplicate_of(np.maximum(idx, 0)) - u[None]  # (R, K, G)
            parts = np.where((idx >= 0)[:, :, None], parts, 0.0)
            out[valid] = u + parts.sum(axis=-2)
        return out

    def block(self, name: str, r0: int, r1: int) -> np.ndarray:
        """Rows ``r0:r1`` of baseline ``name``, ``(r1 - r0, G)`` float64."""
        if name not in self._names:
            raise KeyError(name)
        with np.errstate(divide="ignore", invalid="ignore"):
            if name in CONSTANT:
                return np.broadcast_to(self._u[name], (r1 - r0, self.shape[1]))
            if name == "technical_duplicate":
                return self._duplicate_of(np.arange(r0, r1))
            if name == "null":
                if self._der is None:
                    return np.full((r1 - r0, self.shape[1]), np.nan)
                return self._duplicate_of(self._der[r0:r1])
            if name == "additive":
                return self._additive_block(r0, r1)
            if name == "loo_mean":
                return self._loo(r0, r1)
            if name == "interpolated_duplicate":
                dup = self._duplicate_of(np.arange(r0, r1))
                return interpolated_duplicate(dup, self._loo(r0, r1), self._padj[r0:r1])
        raise KeyError(name)  # pragma: no cover - names are validated above

    def source(self, name: str) -> Rows | np.ndarray:
        """Baseline ``name`` as scoring streams it: a ``(P, G)`` broadcast view for the
        constant ones, else an :class:`vcjax.engine.Rows` of :meth:`block`."""
        if name in CONSTANT:
            return np.broadcast_to(self._u[name], self.shape)
        if name not in self._names:
            raise KeyError(name)
        return Rows(lambda r0, r1: self.block(name, r0, r1), self.shape, np.float64)

    def __getitem__(self, name: str) -> np.ndarray:
        if name in CONSTANT and name in self._names:
            return np.broadcast_to(self._u[name][None, None, :], (1, *self.shape))
        return np.asarray(self.source(name))[None]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __repr__(self) -> str:
        return f"HostBaselines({list(self._names)}, P={self.shape[0]}, G={self.shape[1]})"
