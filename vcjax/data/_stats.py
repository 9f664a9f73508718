"""Per-group sufficient statistics ``(n, Σx, Σx²)`` and what follows from them alone.

Everything downstream of the cell matrix (pseudobulks, reference vectors, t-tests, DEG
weights, the bootstrap) only needs, per condition ``c``, the cell count ``n_c`` and the
per-gene sums ``Σ_{i∈S_c} x_i`` and ``Σ_{i∈S_c} x_i²``: :class:`GroupStats` holds them
(float64), :class:`SplitStats` holds the two halves of the technical-duplicate split.

References:
  docs/metrics.md §1–§3 (DbD, Mejia, Miller et al., arXiv:2506.22641); scanpy 1.11
  ``tl.rank_genes_groups`` for the variance convention.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from vcjax._errors import VcjaxInputError, preview

__all__ = [
    "REFERENCES",
    "GroupStats",
    "SplitStats",
    "checked_reference",
    "mean_of",
    "moments",
    "reference_from_sums",
    "reference_vector",
]

#: the named Δ references (docs/metrics.md §2).
REFERENCES = ("perturbed", "perturbed_no_control", "perturbed_cells", "control")
ReferenceName = Literal["perturbed", "perturbed_no_control", "perturbed_cells", "control"]


def mean_of(n: np.ndarray, s: np.ndarray) -> np.ndarray:
    """``Σx/n`` per group (NaN where ``n == 0``); the ``mean`` of :func:`moments`, alone."""
    n = np.asarray(n, dtype=np.float64)[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        return s / n


def moments(n, s, ss, *, xp: Any = np):
    """Mean and unbiased variance from (n, Σx, Σx²), in scanpy's order of operations.

    ``mean = Σx/n``; ``var = (Σx²/n − mean²) · (n/(n−1))`` (scanpy ``_get_mean_var``).
    NaN where ``n < 2`` (variance) or ``n == 0`` (mean). ``n`` has one axis fewer than the
    sums (the gene axis); ``xp`` is NumPy (float64) or ``jax.numpy`` (the sums' dtype).
    """
    n = xp.asarray(n).astype(np.float64 if xp is np else s.dtype)[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = s / n
        var = ss / n - mean**2
        var = var * (n / (n - 1))
    return mean, xp.where(n < 2, np.nan, var)


@dataclasses.dataclass(frozen=True)
class GroupStats:
    """Per-group sufficient statistics ``(n, Σx, Σx²)``.

    Attributes:
      names: condition label per group, order of first appearance in ``obs``.
      genes: gene names (``var_names``).
      n: ``(C,)`` int64 cell counts.
      sum: ``(C, G)`` float64 per-gene sums.
      sumsq: ``(C, G)`` float64 per-gene sums of squares.
      control: the control label (present in ``names``) or ``None``.
      covariate: per-group covariate value (e.g. cell type) or ``None``.
      normalization: what :func:`group_stats` did: ``"log1p_cp10k"`` or ``"none"``.
      scale: the evidence of the cells' scale (:class:`vcjax.data.ScaleEvidence`, of the
        whole matrix the sums were read from, before normalisation), recorded by
        :func:`group_stats` on its pass over all cells; None otherwise.
    """

    names: tuple[str, ...]
    genes: tuple[str, ...]
    n: np.ndarray
    sum: np.ndarray
    sumsq: np.ndarray
    control: str | None
    covariate: tuple[str, ...] | None = None
    normalization: str = "none"
    scale: Any = dataclasses.field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        C, G = len(self.names), len(self.genes)
        if np.shape(self.n) != (C,) or np.shape(self.sum) != (C, G):
            raise VcjaxInputError(
                f"GroupStats: shapes n{np.shape(self.n)} sum{np.shape(self.sum)} do not match "
                f"{C} groups x {G} genes"
            )
        if np.shape(self.sumsq) != (C, G):
            raise VcjaxInputError(f"GroupStats: sumsq shape {np.shape(self.sumsq)} != ({C}, {G})")
        if self.covariate is not None and len(self.covariate) != C:
            raise VcjaxInputError("GroupStats: covariate must have one value per group")

    # ------------------------------------------------------------------ moments
    @property
    def mean(self) -> np.ndarray:
        """``(C, G)`` float64 pseudobulk ``Σx/n`` (NaN for empty groups)."""
        return mean_of(self.n, self.sum)

    @property
    def var(self) -> np.ndarray:
        """``(C, G)`` unbiased variance ``(E[x²]−E[x]²)·n/(n−1)`` as scanpy (NaN for n<2)."""
        return moments(self.n, self.sum, self.sumsq)[1]

    @property
    def n_groups(self) -> int:
        return len(self.names)

    @property
    def n_genes(self) -> int:
        return len(self.genes)

    # ---------------------------------------------------------------- selection
    def index(self, name: str, covariate: str | None = None) -> int:
        """Position of group ``name`` (and ``covariate`` when stats have covariates)."""
        hits = [
            i
            for i, nm in enumerate(self.names)
            if nm == name and (covariate is None or self.covariate[i] == covariate)
        ]
        if not hits:
            where = f" in covariate {covariate!r}" if covariate is not None else ""
            raise VcjaxInputError(f"group {name!r}{where} not found; groups: {preview(self.names)}")
        if len(hits) > 1:
            raise VcjaxInputError(
                f"group {name!r} occurs in several covariates {preview([self.covariate[i] for i in hits])}; "
                "pass covariate="
            )
        return hits[0]

    def _take(self, idx: np.ndarray) -> GroupStats:
        idx = np.asarray(idx, dtype=np.int64)
        names = tuple(self.names[i] for i in idx)
        control = self.control if self.control in names else None
        cov = None if self.covariate is None else tuple(self.covariate[i] for i in idx)
        return dataclasses.replace(
            self,
            names=names,
            n=self.n[idx],
            sum=self.sum[idx],
            sumsq=self.sumsq[idx],
            control=control,
            covariate=cov,
        )

    def select(self, which: Sequence[str] | np.ndarray) -> GroupStats:
        """Subset of groups by a boolean mask ``(C,)``, integer positions, or names.

        Names select every group carrying that condition label (all covariates), in the
        order the names are given.
        """
        arr = np.asarray(which)
        if arr.dtype == bool:
            if arr.shape != (self.n_groups,):
                raise VcjaxInputError(
                    f"select: boolean mask has shape {arr.shape}, expected ({self.n_groups},)"
                )
            return self._take(np.flatnonzero(arr))
        if arr.size and np.issubdtype(arr.dtype, np.integer):
            return self._take(arr.ravel())
        idx: list[int] = []
        names = np.asarray(self.names, dtype=object)
        for nm in [str(x) for x in np.atleast_1d(arr)]:
            hits = np.flatnonzero(names == nm)
            if hits.size == 0:
                raise VcjaxInputError(
                    f"select: group {nm!r} not found; groups: {preview(self.names)}"
                )
            idx.extend(hits.tolist())
        return self._take(np.asarray(idx, dtype=np.int64))

    def perturbed(self) -> GroupStats:
        """The stats without the control group(s)."""
        return self._take(np.flatnonzero([nm != self.control for nm in self.names]))

    def for_covariate(self, value: str) -> GroupStats:
        """The groups of one covariate value (``covariate`` kept)."""
        if self.covariate is None:
            raise VcjaxInputError("for_covariate: these stats have no covariate")
        idx = np.flatnonzero([c == value for c in self.covariate])
        if idx.size == 0:
            raise VcjaxInputError(
                f"for_covariate: covariate {value!r} not found; values: "
                f"{preview(list(dict.fromkeys(self.covariate)))}"
            )
        out = self._take(idx)
        if self.control is not None and out.control is None:
            out = dataclasses.replace(out, control=None)
        return out

    def covariate_values(self) -> tuple[str, ...]:
        """Distinct covariate values in order of first appearance (``()`` if none)."""
        return () if self.covariate is None else tuple(dict.fromkeys(self.covariate))

    def __add__(self, other: GroupStats) -> GroupStats:
        if not isinstance(other, GroupStats):
            return NotImplemented
        if (
            other.names != self.names
            or other.genes != self.genes
            or other.covariate != self.covariate
        ):
            raise VcjaxInputError("GroupStats.__add__: groups, genes or covariates differ")
        if other.normalization != self.normalization:
            raise VcjaxInputError(
                f"GroupStats.__add__: normalization {self.normalization!r} vs {other.normalization!r}"
            )
        return dataclasses.replace(
            self, n=self.n + other.n, sum=self.sum + other.sum, sumsq=self.sumsq + other.sumsq
        )


@dataclasses.dataclass(frozen=True)
class SplitStats:
    """Statistics of the two technical-duplicate halves (same groups, same order)."""

    half1: GroupStats
    half2: GroupStats

    @property
    def full(self) -> GroupStats:
        """All cells: ``half1 + half2``."""
        return self.half1 + self.half2


def reference_from_sums(kind: ReferenceName, n, s, is_control, *, xp: Any = np):
    """A named Δ reference from group counts and sums, over NumPy or ``jax.numpy``.

    Args:
      kind: ``"perturbed"`` (DbD ``u_ALL``): the mean over all groups of the per-group
        means, control included as one group; ``"perturbed_no_control"``: the same without
        the control; ``"perturbed_cells"``: the mean over all non-control cells;
        ``"control"``: ``u_NTC``, the control group's mean.
      n: ``(C,)`` cells per group.
      s: ``(..., C, G)`` per-group sums (a leading resample axis is allowed).
      is_control: ``(C,)`` bool, True for the control group (a NumPy array: static).
      xp: the array module.

    Returns:
      ``(..., G)`` reference vectors.
    """
    is_control = np.asarray(is_control, dtype=bool)
    pert = np.flatnonzero(~is_control)
    nf = xp.asarray(n).astype(s.dtype)
    if kind == "perturbed":
        return (s / nf[:, None]).mean(axis=-2)
    if kind == "perturbed_no_control":
        return (s[..., pert, :] / nf[pert, None]).mean(axis=-2)
    if kind == "perturbed_cells":
        return s[..., pert, :].sum(axis=-2) / nf[pert].sum()
    if kind == "control":
        c = int(np.flatnonzero(is_control)[0])
        return s[..., c, :] / nf[c]
    raise VcjaxInputError(
        f"unknown reference {kind!r}; use one of {', '.join(map(repr, REFERENCES))} or a (G,) array"
    )


def checked_reference(reference, n_genes: int) -> np.ndarray:
    """A given Δ reference as ``(G,)`` float64; a wrong shape or a non-finite value raises."""
    ref = np.asarray(reference, dtype=np.float64)
    if ref.shape != (n_genes,):
        raise VcjaxInputError(f"reference array has shape {ref.shape}, expected ({n_genes},)")
    if not np.all(np.isfinite(ref)):
        raise VcjaxInputError("reference array contains NaN or inf")
    return ref


def reference_vector(stats: GroupStats, reference: ReferenceName | Any = "perturbed") -> np.ndarray:
    """The Δ reference vector ``(G,)`` of one covariate's statistics (docs/metrics.md §2).

    Args:
      stats: group statistics of one covariate (use :meth:`GroupStats.for_covariate`).
      reference: a name of :func:`reference_from_sums`, or an explicit ``(G,)`` array.

    Returns:
      ``(G,)`` float64.
    """
    if stats.covariate is not None and len(stats.covariate_values()) > 1:
        raise VcjaxInputError(
            f"reference_vector: stats span {len(stats.covariate_values())} covariates "
            f"({preview(stats.covariate_values())}); call stats.for_covariate(value) first"
        )
    if not isinstance(reference, str):
        return checked_reference(reference, stats.n_genes)
    is_ctrl = np.array([nm == stats.control for nm in stats.names], dtype=bool)
    if reference in ("perturbed_no_control", "perturbed_cells") and is_ctrl.all():
        raise VcjaxInputError(f"reference {reference!r}: no perturbed groups")
    if reference == "control" and not is_ctrl.any():
        raise VcjaxInputError("reference 'control': stats have no control group")
    return reference_from_sums(reference, stats.n, stats.sum, is_ctrl)
