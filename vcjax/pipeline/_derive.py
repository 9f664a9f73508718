"""The one derivation: group sums → truth, Δ reference, u_NTC, u_ALL, DEG arrays, baselines.

:func:`derive` is the only code that turns a stratum's split sufficient statistics into
what scoring needs. It is written once over NumPy or ``jax.numpy`` with a leading resample
axis ``b``: the point estimate calls it with NumPy on ``b = 1`` (float64, the DEG step on
the host for scanpy parity), the cell bootstrap inside its jit on resampled sums (float32,
the DEG step in XLA). The DEG step is the one place with two implementations, chosen by
``Plan.deg_strategy`` and held equal by the tests: :func:`vcjax.stats.t_test_vs_rest_host`
(float64, scipy p-values, statsmodels BH) and :func:`vcjax.stats.t_test_vs_rest`.

Definitions (docs/metrics.md §2–§4): the truth of perturbation ``p`` is its half-2
pseudobulk, the technical duplicate its half-1 pseudobulk; ``u_ALL`` is the mean of the
per-group means (control included), of half 1 (``u_all_half1``, the default Δ reference)
or of all cells (``u_all_full``, the dataset-mean baseline); ``u_NTC`` is the mean of all
control cells; the DEG t-tests compare each perturbation with the other perturbed cells, of
all cells (``weights_from="all"``, the paper's) or of half 1.

Memory of the point estimate (one resample, NumPy): it never builds the ``(C, G)`` mean
matrices of the resample form. ``u_ALL`` is accumulated over row blocks in NumPy's order
(bit-identical), the truth is divided out of the half-2 sums row block by row block, the
DEG tests of all cells read the two halves' sums added row by row (no summed copy), and
the baselines are a :class:`~vcjax.pipeline._baselines.HostBaselines` that builds a
baseline's rows from the sums when they are asked for. What it holds beside the sums:
the truth and the adjusted p-values (float64: the oracle fixtures are held to 1e-12 and
1e-9), the t-scores and weights (float32, as the DEG step makes them) and the DEG sets.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal, NamedTuple

import numpy as np

from vcjax._host import aligned_empty, engine_array
from vcjax.data import reference_from_sums
from vcjax.pipeline._baselines import HostBaselines, build_baselines, sequential_row_sum
from vcjax.stats import minmax_weights, minmax_weights_host, t_test_vs_rest, t_test_vs_rest_host

__all__ = [
    "DEG",
    "DEG_ALPHA",
    "Derived",
    "Fixed",
    "Plan",
    "Sums",
    "deg_arrays",
    "derive",
    "derive_arrays",
]

#: BH-adjusted p below which a gene with a non-zero logFC is a DEG (docs/metrics.md §3).
DEG_ALPHA = 0.05


class Sums(NamedTuple):
    """One stratum's split sufficient statistics; ``C`` groups, control included.

    ``n1``/``n2`` are ``(C,)`` cells per group in each half (equal in every resample);
    ``s1``/``q1``/``s2``/``q2`` are ``(b, C, G)`` per-group sums and sums of squares of half 1
    and half 2.
    """

    n1: Any
    n2: Any
    s1: Any
    q1: Any
    s2: Any
    q2: Any


@dataclasses.dataclass(frozen=True)
class Plan:
    """What to derive (static, hashable: part of the bootstrap's compiled configuration).

    Attributes:
      control: the control group's index among the ``C`` groups.
      rows: the perturbations' group indices, in the order of the derived rows.
      reference: the Δ reference name, or ``"array"`` (:attr:`Fixed.reference`).
      weights: ``"deg"`` (DEG weights and sets), ``"array"`` (:attr:`Fixed.weights`) or
        ``"none"``.
      weights_from: the cells of the DEG tests: ``"all"`` or ``"half1"``.
      deg_method: ``"t-test_overestim_var"`` or ``"t-test"``.
      baselines: the baselines to build.
      deg_strategy: ``"host"`` (NumPy float64, scanpy parity), or ``"fast"`` / ``"exact"``
        (``jax.numpy``, p-values by Hill's expansion or exactly).
    """

    control: int
    rows: tuple[int, ...]
    reference: str
    weights: Literal["deg", "array", "none"]
    weights_from: Literal["all", "half1"]
    deg_method: str
    baselines: tuple[str, ...]
    deg_strategy: Literal["host", "fast", "exact"] = "host"


class Fixed(NamedTuple):
    """The inputs of :func:`derive` that no resample changes."""

    reference: Any = None  # (G,) a given Δ reference
    weights: Any = None  # (P, G) given gene weights
    derangement: Any = None  # (P,) the null baseline's permutation (None when P < 2)
    additive: Any = None  # (P, K) parts of each combination (-1 pads)


class DEG(NamedTuple):
    """DEG arrays, each ``(b, P, G)``: float32 t-scores (NaN → 0), BH-adjusted p-values,
    float32 DEG weights ``minmax(|t|)²`` and the bool DEG sets ``p_adj < 0.05 & logFC ≠ 0``."""

    scores: Any
    pvals_adj: Any
    weights: Any
    mask: Any


class Derived(NamedTuple):
    """Everything scoring needs, with a leading resample axis ``b``.

    ``truth`` and ``duplicate`` are ``(b, P, G)``; ``reference``, ``u_ntc``,
    ``u_all_full`` and ``u_all_half1`` are ``(b, G)``; ``deg`` is a :class:`DEG` or None;
    ``weights`` the gene weights scoring uses (the DEG weights, given ones, or None);
    ``baselines`` maps names to ``(b, P, G)`` predictions (a
    :class:`~vcjax.pipeline._baselines.HostBaselines` for the point estimate).
    """

    truth: Any
    reference: Any
    u_ntc: Any
    u_all_full: Any
    u_all_half1: Any
    deg: DEG | None
    weights: Any
    baselines: Mapping[str, Any]


def _deg_sums(sums: Sums, plan: Plan):
    if plan.weights_from == "all":
        return sums.n1 + sums.n2, sums.s1 + sums.s2, sums.q1 + sums.q2
    return sums.n1, sums.s1, sums.q1


class _AddedRows:
    """``a + b`` of two ``(C, G)`` arrays, added when rows are read (``x[i]``, ``x[idx]``):
    what :func:`vcjax.stats.t_test_vs_rest_host` reads of the sums of all cells, without
    a summed ``(C, G)`` copy; each row's values are those of ``(a + b)[i]``."""

    def __init__(self, a: np.ndarray, b: np.ndarray) -> None:
        self.a, self.b = a, b
        self.shape, self.dtype, self.ndim = a.shape, a.dtype, a.ndim

    def __getitem__(self, idx):
        return self.a[idx] + self.b[idx]


def deg_arrays(sums: Sums, plan: Plan, *, xp: Any = np) -> DEG:
    """The DEG arrays of ``sums`` by ``plan.deg_strategy`` (host only for ``b = 1``)."""
    if plan.deg_strategy == "host":
        if sums.s1.shape[0] != 1:
            raise ValueError("the host DEG step takes one set of sums (b = 1)")
        if plan.weights_from == "all":
            n = np.asarray(sums.n1) + np.asarray(sums.n2)
            s = _AddedRows(np.asarray(sums.s1[0]), np.asarray(sums.s2[0]))
            q = _AddedRows(np.asarray(sums.q1[0]), np.asarray(sums.q2[0]))
        else:
            n, s, q = np.asarray(sums.n1), sums.s1[0], sums.q1[0]
        scores, pvals, padj, lfc = t_test_vs_rest_host(
            n, s, q, np.asarray(plan.rows), method=plan.deg_method
        )
        del pvals  # (P, G) float64 that nothing here reads: freed before the weights
        # the DEG sets and weights in aligned buffers, which the engine streams without
        # a copy of each chunk for every source it scores
        mask = aligned_empty(padj.shape, np.dtype(bool))
        np.logical_and(padj < DEG_ALPHA, lfc != 0, out=mask)
        del lfc
        weights = engine_array(minmax_weights_host(scores), np.dtype(np.float32))
        return DEG(scores[None], padj[None], weights[None], mask[None])
    n, s, q = _deg_sums(sums, plan)
    scores, padj, lfc = t_test_vs_rest(
        n, s, q, plan.rows, method=plan.deg_method, pvalue=plan.deg_strategy
    )
    weights = minmax_weights(scores)
    return DEG(scores, padj, weights, (padj < DEG_ALPHA) & (lfc != 0))


def derive(
    sums: Sums, plan: Plan, fixed: Fixed, *, xp: Any = np, deg: DEG | None = None
) -> Derived:
    """Truth, references, DEG arrays and baselines from group sums (module docstring).

    Args:
      sums: the split sums (:class:`Sums`), ``b`` resamples.
      plan: what to derive.
      fixed: the inputs that no resample changes.
      xp: NumPy or ``jax.numpy``.
      deg: DEG arrays computed beforehand (the bootstrap's separately compiled refit, or the
        point estimate's frozen ones); computed here when None and ``plan.weights == "deg"``.

    Returns:
      :class:`Derived`; over NumPy with ``b = 1`` (the point estimate) its baselines are a
      :class:`~vcjax.pipeline._baselines.HostBaselines` (built when read).
    """
    if xp is np and sums.s1.shape[0] == 1:
        return _derive_host(sums, plan, fixed, deg=deg)
    return derive_arrays(sums, plan, fixed, xp=xp, deg=deg)


def derive_arrays(
    sums: Sums, plan: Plan, fixed: Fixed, *, xp: Any = np, deg: DEG | None = None
) -> Derived:
    """:func:`derive` in the resample form: every mean and baseline a ``(b, ·, G)`` array.

    What the bootstrap runs inside its jit; over NumPy it is the reference the point
    estimate's lean form is held to (the same values, bit for bit, in the tests).
    """
    rows = np.asarray(plan.rows)
    is_control = np.zeros(sums.s1.shape[-2], dtype=bool)
    is_control[plan.control] = True
    with np.errstate(divide="ignore", invalid="ignore"):
        dtype = np.float64 if xp is np else sums.s1.dtype
        n1 = xp.asarray(sums.n1).astype(dtype)
        n_full = n1 + xp.asarray(sums.n2).astype(dtype)
        m1 = sums.s1 / n1[:, None]
        m2 = sums.s2 / xp.asarray(sums.n2).astype(dtype)[:, None]
        mf = (sums.s1 + sums.s2) / n_full[:, None]
        u_all_h1 = m1.mean(axis=-2)
        u_all_full = mf.mean(axis=-2)
        u_ntc = mf[..., plan.control, :]
        if plan.reference == "perturbed":
            reference = u_all_h1
        elif plan.reference == "control":
            reference = u_ntc
        elif plan.reference == "array":
            reference = xp.broadcast_to(xp.asarray(fixed.reference, dtype=dtype), u_ntc.shape)
        else:
            reference = reference_from_sums(plan.reference, sums.n1, sums.s1, is_control, xp=xp)
        if plan.weights == "deg" and deg is None:
            deg = deg_arrays(sums, plan, xp=xp)
        duplicate = m1[..., rows, :]
        baselines = build_baselines(
            plan.baselines,
            duplicate=duplicate,
            u_ntc=u_ntc,
            u_all_full=u_all_full,
            u_all_half1=u_all_h1,
            full_means=mf[..., rows, :]
            if {"loo_mean", "interpolated_duplicate"} & set(plan.baselines)
            else None,
            pvals_adj=None if deg is None else deg.pvals_adj,
            derangement=fixed.derangement,
            additive=fixed.additive,
            xp=xp,
        )
    if plan.weights == "deg":
        weights = deg.weights
    elif plan.weights == "array":
        weights = xp.asarray(fixed.weights)[None]
    else:
        weights = None
    return Derived(
        truth=m2[..., rows, :],
        reference=reference,
        u_ntc=u_ntc,
        u_all_full=u_all_full,
        u_all_half1=u_all_h1,
        deg=deg,
        weights=weights,
        baselines=baselines,
    )


def _row_means(s: np.ndarray, n: np.ndarray, plus: np.ndarray | None = None) -> np.ndarray:
    """Mean over the ``C`` rows of ``s / n`` (of ``(s + plus) / n``): ``m.mean(axis=0)`` of
    the ``(C, G)`` means, added in NumPy's order without building them."""

    def rows_of(r0: int, r1: int) -> np.ndarray:
        part = s[r0:r1] if plus is None else s[r0:r1] + plus[r0:r1]
        return part / n[r0:r1, None]

    C, G = s.shape
    return sequential_row_sum(rows_of, C, G) / C


def _derive_host(sums: Sums, plan: Plan, fixed: Fixed, *, deg: DEG | None) -> Derived:
    """:func:`derive` of one set of sums over NumPy in float64, lean (module docstring):
    the values of the generic form, without its ``(C, G)`` means and ``(P, G)`` baselines."""
    s1, s2 = np.asarray(sums.s1[0]), np.asarray(sums.s2[0])
    rows = np.asarray(plan.rows, dtype=np.intp)
    is_control = np.zeros(s1.shape[0], dtype=bool)
    is_control[plan.control] = True
    n1 = np.asarray(sums.n1).astype(np.float64)
    n2 = np.asarray(sums.n2).astype(np.float64)
    n_full = n1 + n2
    c = plan.control
    with np.errstate(divide="ignore", invalid="ignore"):
        u_all_h1 = _row_means(s1, n1)
        u_all_full = _row_means(s1, n_full, plus=s2)
        u_ntc = (s1[c] + s2[c]) / n_full[c]
        if plan.reference == "perturbed":
            reference = u_all_h1[None]
        elif plan.reference == "control":
            reference = u_ntc[None]
        elif plan.reference == "array":
            reference = np.asarray(fixed.reference, dtype=np.float64)[None].copy()
        else:
            reference = reference_from_sums(plan.reference, sums.n1, sums.s1, is_control, xp=np)
        if plan.weights == "deg" and deg is None:
            deg = deg_arrays(sums, plan, xp=np)
        # the truth: half-2 means of the perturbations, divided out block by block
        P, G = rows.size, s1.shape[1]
        truth = np.empty((1, P, G))
        step = max(1, (1 << 20) // max(G, 1))
        for r0 in range(0, P, step):
            g = rows[r0 : r0 + step]
            np.divide(s2[g], n2[g, None], out=truth[0, r0 : r0 + step])
        baselines = HostBaselines(
            plan.baselines,
            s1=s1,
            s2=s2,
            n1=n1,
            n_full=n_full,
            rows=rows,
            u_ntc=u_ntc,
            u_all_full=u_all_full,
            u_all_half1=u_all_h1,
            pvals_adj=None if deg is None else deg.pvals_adj[0],
            derangement=fixed.derangement,
            additive=fixed.additive,
        )
    if plan.weights == "deg":
        weights = deg.weights
    elif plan.weights == "array":
        weights = np.asarray(fixed.weights)[None]
    else:
        weights = None
    return Derived(
        truth=truth,
        reference=reference,
        u_ntc=u_ntc[None],
        u_all_full=u_all_full[None],
        u_all_half1=u_all_h1[None],
        deg=deg,
        weights=weights,
        baselines=baselines,
    )
