r"""The Virtual Cell Challenge 2026 score, as cell-eval2 0.20.0 computes it (``--preset vcc2026``).

Two functions, one frozen dataclass:

* :func:`vcc2026_truth` — everything that depends on the real data alone, computed once:
  the real DE table, the gene gate, the real pseudobulks and their sampling corrections,
  the **baseline** end of the scale (the generic-response arm, scored like a submission)
  and the **replicate** end (five disjoint split halves of the real data, plus the
  full-gate split-half reference for ``de_wilcoxon_lfc_nmae``).
* :func:`vcc2026_scores` — one submission: every per-perturbation metric cell-eval2
  reports under the preset (``"metrics"``, same names), the aggregates, each scored
  member rescaled between baseline (0) and replicate (1), and the composite ``"score"``
  (cell-eval2 ``score --real-bundle``'s ``from_replicate`` ``avg_score``).
* :func:`vcc2026_composite` — the composite from per-perturbation values and a multiplicity
  per perturbation (``(B, P)``), vectorised over resamples: what a bootstrap over
  perturbations or a sweep needs.

Input: raw integer counts for real and predicted cells (``(N, G)`` dense or scipy sparse)
and a perturbation label per cell; the label sets must be equal and contain the control
(``"non-targeting"``). Fractional or negative values, or a cell total above 1e6, are a
``ValueError`` (the challenge scores raw counts; a log-normalised matrix is refused).

Definitions (our own wording of cell-eval2 0.20.0's rules; file names are in its package).
Notation: ``x_ic`` counts, ``L_i = Σ_g x_ig``, ``P`` perturbations, ``G`` genes, α = 0.05.

**Expression space** (``prep.bulk_lognorm_means``, comparator ``bulk_lognorm``): per group
``p`` the count sums ``S_pg = Σ_{i∈p} x_ig`` give ``μ_pg = log1p(T · S_pg / Σ_g S_pg)`` with
``T = 5·10⁴`` (``bulk_target_sum``). Sampling correction (``moments.jackknife_correction``):
delete-one jackknife ``C_p = (n-1)/n Σ_g Σ_i (v_ig - v̄_g)²`` with
``v_ig = log1p(T (S_pg - x_ig) / (Σ_g S_pg - L_i))`` (0 for a cell holding the whole group),
clamped at 0, 0 for ``n < 2``. "Own gene" of ``p``: the gene named like ``p``.

* ``expr_mse_unbiased`` (``metrics/delta.py``): ``(‖μ̂_p - μ_p‖² - Ĉ_p - C_p - (μ̂_pg* - μ_pg*)²)
  / |G_p|`` with ``g*`` the own gene and ``|G_p| = G - 1`` when it resolves, else ``G``.
* ``expr_mse_unbiased_capped``: the same with ``Ĉ_p`` replaced by ``min(Ĉ_p, C_p)`` and, when
  the weighted claim ``Σ_p min(Ĉ_p, C_p)/|G_p|`` exceeds the across-perturbation budget
  ``B = Σ_g max(0, Σ_p w_p d_pg² - (Σ_p w_p d_pg)² / Σ_p w_p)`` (``d_pg = μ̂_pg - mean_p μ̂_pg``,
  ``w_p = 1/|G_p|``, own-gene cells left out, genes with < 2 rows skipped), scaled by
  ``B / claim`` (#348).
* ``expr_distance_unbiased`` (real only): ``(‖μ_p - μ_ctrl‖² - C_p - C_ctrl - own²)/|G_p|``.
* ``expr_real_mass_ratio`` (real only): ``Σ_g expm1(μ_pg) / T``.
* ``expr_mse_unbiased_capped_norm`` (scored; aggregate only, ``run._derived_value``):
  ``Σ_p capped_p / Σ_p distance_p`` over perturbations finite on both.
* ``pds_cosine`` (scored; ``metrics/discrimination.py``): effects ``μ̂_p - μ_ctrl`` (the REAL
  control) and ``μ_q - μ_ctrl`` with every panel target gene removed from the features;
  cosine distance ``clip(1 - cos, 0, 2)`` (0-norm → distance 1); midrank of the own real
  effect among all ``P`` real effects, ``1 - rank/(P - 1)``.

**DE** (``de_compute.compute_de``, pdex backend): per cell CPM ``x / (L/10⁶)``; log2 fold change
``log2((m_p + 10⁻⁹)/(m_ctrl + 10⁻⁹))`` of arithmetic CPM means; p-value: two-sided asymptotic
Mann–Whitney U of ``log1p(CPM)`` (tie and continuity corrected, ``p = 1`` when all values are
equal) of the group against the control cells; gene gate (#351): genes whose mean CPM over the
CONTROL cells exceeds 5 (one set for all perturbations); ``p_adj``: Benjamini–Hochberg within
each perturbation over the gated genes. Real: real perturbations vs real control. Prediction
(``control_source="real"``): predicted non-control cells vs the REAL control cells, so both
tables gate the same genes. The own-gene row of ``p`` is dropped from every scored DE metric
when ``p`` names a gated gene (``de.resolve_target_genes``). ``R_p``: real rows with
``p_adj < α``; ``Q_p``: predicted rows with ``p_adj < α``.

* ``de_wilcoxon_sig_jaccard``: ``|R ∩ Q| / |R ∪ Q|``, 1 for an empty union.
* ``de_wilcoxon_lfc_nmae``: over the gate ``R_p`` (finite real lfc), ``mean|l̂ - l| / mean|l|``
  (a missing or non-finite predicted lfc counts as 0); NaN (omitted) if the gate has < 10 genes
  or a zero denominator.
* ``de_wilcoxon_direction_fidelity_yield_raw`` (``metrics/direction.py``): ``k / max(n_pred,
  N_conf)``: ``N_conf = |R_p|``; scored set: genes in both tables with predicted ``p_adj < α``
  and a non-zero real lfc (``n_pred``); ``k``: those whose predicted lfc has the real sign.
  NaN when both counts are 0.
* ``de_wilcoxon_direction_reach_raw``: rank the genes of ``R_p`` present in both tables by
  (predicted significant first, predicted ``p_adj``, ``p``, ``|l̂|`` descending, gene name);
  depth ``k`` counts rows with a non-zero real lfc, purity = sign matches / depth; ``k*`` =
  deepest depth with purity ≥ 0.9; value ``k*/N_conf`` (NaN for ``N_conf = 0``).
* ``de_wilcoxon_*`` names are cell-eval2's; every metric is reported per perturbation in
  sorted label order; the aggregate of each is the mean over its finite values.

**The scale** (``score.py``, ``scoring.py``, ``anchor.py``, ``baseline.py``, ``ceiling.py``):
baseline ``b_m``: the aggregates of the generic-response arm — every non-control cell
replaced by a control cell drawn uniformly (``numpy.random.default_rng(0).integers``, one
call per label in sorted order) with gene ``g`` multiplied by ``r_g = m̄_g / c̄_g`` (mean over
perturbations of per-perturbation mean counts, each perturbation's own gene left out;
``c̄`` the control mean; ``r_g = 0`` where ``c̄_g = 0``), stored as float32; control rows are the
real control cells. Replicate ``r_m``: the mean over five seeds (``numpy.random.SeedSequence(0)
.generate_state(5)``) of the aggregates from scoring half B against half A of a split of the
real data (``default_rng(seed).permutation`` of each group's cells in sorted label order,
``⌊n/2⌋`` cells each, the control included) with each half's own control for its DE and its
deltas (``control_source="pred"``); for ``de_wilcoxon_lfc_nmae`` instead
``mean|l_A - l_B| / mean|l_full|`` over the full real data's gate (``lfc_nmae_ref.py``).
Member score (anchor = ``r_m``): higher-is-better ``(u - b)/(r - b)``, no floor (a missing value
scores ``-b/(r - b)``); ``de_wilcoxon_lfc_nmae`` ``1 - (u - r)/(b - r)`` floored at -6;
``expr_mse_unbiased_capped_norm`` ``1 - (u - r)/(b - r)`` clipped to ``[0, 1]``. The composite
``score`` is the unweighted mean of the six member scores (pds_cosine, the capped norm and the
four DE members). It is NOT a mean over perturbations: each member's aggregate is a mean over
perturbations (a ratio of sums for the capped norm), then rescaled and clipped, then averaged.
:func:`vcc2026_composite` recomputes it from per-perturbation values for any multiset of
perturbations (exact for a bootstrap over perturbations with fixed anchors).

Numerics: float64 throughout on the host (NumPy), the Wilcoxon counts by
:func:`vcjax.stats.mannwhitney_vs_control` under ``jax.enable_x64``. cell-eval2 computes DE on
a GPU with a different engine (gpudge) when one is present; these definitions follow its
CPU path (pdex).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp

from vcjax._host import host_threads
from vcjax.stats import benjamini_hochberg_host, mannwhitney_from_counts
from vcjax.stats._wilcoxon_split import EXCLUDED, mannwhitney_counts_passes

__all__ = [
    "Vcc2026Truth",
    "VCC2026_METRICS",
    "VCC2026_MEMBERS",
    "vcc2026_composite",
    "vcc2026_scores",
    "vcc2026_truth",
]

#: Per-perturbation metrics cell-eval2 reports under the preset (its output names).
VCC2026_METRICS = (
    "de_wilcoxon_direction_fidelity_yield_raw",
    "de_wilcoxon_direction_reach_raw",
    "de_wilcoxon_lfc_nmae",
    "de_wilcoxon_sig_jaccard",
    "expr_distance_unbiased",
    "expr_mse_unbiased",
    "expr_mse_unbiased_capped",
    "expr_real_mass_ratio",
    "pds_cosine",
)
_CAPPED_NORM = "expr_mse_unbiased_capped_norm"
#: The six scored members: name -> direction.
VCC2026_MEMBERS = {
    "de_wilcoxon_direction_fidelity_yield_raw": "higher",
    "de_wilcoxon_direction_reach_raw": "higher",
    "de_wilcoxon_lfc_nmae": "lower",
    "de_wilcoxon_sig_jaccard": "higher",
    _CAPPED_NORM: "lower",
    "pds_cosine": "higher",
}

ALPHA = 0.05
MIN_CPM = 5.0
TARGET_SUM = 1e6
BULK_TARGET_SUM = 5e4
EPSILON = 1e-9
MIN_GATE = 10
PURITY_FLOOR = 0.9
MAX_COUNTS = 1e6
N_SPLITS = 5
BASE_SEED = 0
LFC_NMAE_FLOOR = -6.0


# ------------------------------------------------------------------------------ data prep


def _rowsum(x: sp.csr_matrix) -> np.ndarray:
    """Row sums accumulated in float64 (as scipy sums a float64 CSR), for float32 data too."""
    out = np.zeros(x.shape[0])
    rows = np.flatnonzero(np.diff(x.indptr))
    step = 1 << 16
    for lo in range(0, rows.size, step):
        r = rows[lo : lo + step]
        a, b = int(x.indptr[r[0]]), int(x.indptr[r[-1] + 1])
        out[r] = np.add.reduceat(x.data[a:b].astype(np.float64), x.indptr[r] - a)
    return out


def _csr(x, name: str) -> sp.csr_matrix:
    """``x`` as CSR after the preset's raw-count checks, never modifying the caller's matrix.

    float32 and float64 data are kept as they are (counts are exact in either; every sum
    below accumulates in float64), other types become float64; the index arrays are
    shared with ``x`` when it is already a canonical CSR.
    """
    if sp.issparse(x):
        m = x.tocsr()
        if m.dtype not in (np.float32, np.float64):
            m = m.astype(np.float64)
        if not m.has_canonical_format:
            m = m.copy()
            m.sum_duplicates()
        m = sp.csr_matrix((m.data, m.indices, m.indptr), shape=m.shape)
    else:
        a = np.asarray(x)
        m = sp.csr_matrix(a if a.dtype in (np.float32, np.float64) else a.astype(np.float64))
    d = m.data
    if d.size and not np.isfinite(d).all():
        raise ValueError(f"vcc2026: {name} holds NaN or infinite values")
    if d.size and d.min() < 0:
        raise ValueError(f"vcc2026: {name} holds negative values; the challenge scores raw counts")
    if d.size and not np.array_equal(d, np.round(d)):
        raise ValueError(
            f"vcc2026: {name} holds fractional values (log-normalised?); "
            "the challenge scores raw integer counts"
        )
    tot = _rowsum(m)
    if tot.size and tot.max() > MAX_COUNTS:
        i = int(np.argmax(tot))
        raise ValueError(
            f"vcc2026: {name} cell {i} has {tot[i]:.0f} counts, above the preset's "
            f"max_counts_per_cell={MAX_COUNTS:.0f}"
        )
    return m


def _group_order(labels) -> list[str]:
    """Group order of a pandas groupby on the label column (categories, else sorted)."""
    cats = getattr(getattr(labels, "cat", None), "categories", None)
    if cats is None:
        cats = getattr(labels, "categories", None)
    present = set(np.asarray(labels).astype(str).tolist())
    if cats is not None:
        return [str(c) for c in cats if str(c) in present]
    return sorted(present)


def _indicator(codes: np.ndarray, n: int) -> sp.csr_matrix:
    keep = np.flatnonzero((codes >= 0) & (codes < n))
    return sp.csr_matrix(
        (np.ones(keep.size), (codes[keep], keep)), shape=(n, codes.size), dtype=np.float64
    )


@dataclass(frozen=True)
class _Cells:
    """A side's cells: rows ``rows`` of the counts ``x``, in this order (no copy), and the
    float64 sums of every row of ``x``."""

    x: sp.csr_matrix
    rows: np.ndarray
    lib: np.ndarray

    @classmethod
    def of(cls, x: sp.csr_matrix, rows=None, lib=None) -> _Cells:
        rows = np.arange(x.shape[0]) if rows is None else np.asarray(rows, np.int64)
        return cls(x, rows, _rowsum(x) if lib is None else lib)

    def take(self, sel) -> sp.csr_matrix:
        """The counts of the side's cells ``sel`` (positions), in this order."""
        return self.x[self.rows[sel]]

    def cpm_divisor(self) -> np.ndarray:
        """CPM's divisor of each cell (library / 1e6; 1 for an empty cell), side order."""
        lib = self.lib[self.rows] / TARGET_SUM
        return np.where(lib > 0, lib, 1.0)


_SUM_CHUNK = 1 << 22  # stored entries per block of groups summed at once


def _group_sums(c: _Cells, codes: np.ndarray, n: int, *, cpm: bool = False):
    """``(n, G)`` sums over the cells of groups ``0..n-1``; with ``cpm``, also those of the
    per-cell CPM (a pair).

    Blocks of whole groups, each summed over its cells in the side's order: the same
    float64 additions in the same order as one indicator product over every cell.
    """
    g = c.x.shape[1]
    out = np.zeros((n, g))
    out_cpm = np.zeros((n, g)) if cpm else None
    valid = (codes >= 0) & (codes < n)
    if not valid.any():
        return (out, out_cpm) if cpm else out
    nnz_row = np.diff(c.x.indptr)[c.rows]
    ends = np.cumsum(np.bincount(codes[valid], weights=nnz_row[valid], minlength=n))
    div = c.cpm_divisor() if cpm else None
    q0 = 0
    while q0 < n:
        base = ends[q0 - 1] if q0 else 0.0
        q1 = min(n, max(q0 + 1, int(np.searchsorted(ends, base + _SUM_CHUNK, "right"))))
        sel = np.flatnonzero((codes >= q0) & (codes < q1))
        if sel.size:
            sub = c.take(sel)
            ind = _indicator(codes[sel] - q0, q1 - q0)
            out[q0:q1] = (ind @ sub).toarray()
            if cpm:
                data = sub.data / np.repeat(div[sel], np.diff(sub.indptr))
                sub = sp.csr_matrix((data, sub.indices, sub.indptr), shape=sub.shape)
                out_cpm[q0:q1] = (ind @ sub).toarray()
        q0 = q1
    return (out, out_cpm) if cpm else out


def _bulk_lognorm(sums: np.ndarray) -> np.ndarray:
    tot = sums.sum(axis=1)
    scale = np.divide(BULK_TARGET_SUM, tot, out=np.zeros_like(tot), where=tot > 0)
    return np.log1p(sums * scale[:, None])


_JK_CHUNK = 1 << 20  # stored entries per XLA call of the jackknife
_JK_EPS_MAX = 0.3  # largest L_i / (tot - L_i) of a group summed as a series


@jax.jit
def _jk_entries(y, s, ui, h, ei):
    """Stored entries: ``d = v - v⁰ = log1p(-y u_i / (1 + S u_i))`` and ``v⁰ = log1p(h ε_i)``."""
    d = jnp.log1p(-y * ui / (1.0 + s * ui))
    v0 = jnp.log1p(h * ei)
    return d, d * (2.0 * v0 + d)


def _series_terms(eps_max: float) -> int:
    """Terms ``M`` with ``eps_max^(M+1) / (1 - eps_max) < 2^-56`` (at least 2)."""
    if eps_max <= 0.0:
        return 2
    return max(2, int(np.ceil(np.log(2.0**-56 * (1.0 - eps_max)) / np.log(eps_max))))


def _jackknife(cells: _Cells, codes: np.ndarray, sums: np.ndarray) -> np.ndarray:
    r"""Delete-one jackknife ``C_p`` of the bulk_lognorm mean of every group, ``(n_groups,)``.

    With ``u = T / tot_p`` (the bulk's scale) and ``u_i = T / (tot_p - L_i)`` (a cell left
    out), a cell's deviation at gene ``g`` is
    ``v_ig = log1p((S_pg - x_ig) u_i) - log1p(S_pg u)``; ``C_p`` is invariant to a shift of
    ``v`` per gene, so this is the rule's ``v`` up to the bulk's rounding. At a zero entry
    ``v⁰_ig = log1p(h_pg ε_i)`` with ``h = S u / (1 + S u) < 1`` and
    ``ε_i = L_i / (tot_p - L_i)``, so the sums over a group's cells of ``v⁰`` and ``v⁰²``
    are power series in ``h`` whose coefficients are the moments ``Σ_i ε_i^k``:

    .. math:: \sum_i v^0 = \sum_{k\ge1} \frac{(-1)^{k+1}}{k} h^k \sum_i \varepsilon_i^k,
              \quad \sum_i (v^0)^2 = \sum_{k\ge2} (-1)^k \frac{2 H_{k-1}}{k} h^k
              \sum_i \varepsilon_i^k

    (``H`` harmonic numbers), truncated where ``max ε^(M+1) < 2⁻⁵⁶``; the stored entries add
    ``d = v - v⁰`` and ``d (2 v⁰ + d)``. A group with a cell holding more than
    ``1 / (1 + 1/0.3)`` of its counts (small groups) is summed cell by cell instead.
    """
    n_groups, g = sums.shape
    sizes = np.bincount(codes[codes >= 0], minlength=n_groups)
    tot = sums.sum(axis=1)
    lib = cells.lib[cells.rows]
    rows = np.flatnonzero(codes >= 0)
    c = codes[rows]
    rem = tot[c] - lib[rows]
    if (rem < 0).any():
        raise ValueError("vcc2026: negative leave-one-out remainder; input is not counts")
    active = (sizes >= 2) & (tot > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        eps = np.where(rem > 0, lib[rows] / rem, np.inf)
    eps_max = np.full(n_groups, -np.inf)
    np.maximum.at(eps_max, c, eps)
    series = active & (eps_max <= _JK_EPS_MAX)
    direct = np.flatnonzero(active & ~series)
    s1 = np.zeros((n_groups, g))
    s2 = np.zeros((n_groups, g))
    if series.any():
        sg = np.flatnonzero(series)
        u = BULK_TARGET_SUM / tot[sg]
        su = sums[sg] * u[:, None]
        h = su / (1.0 + su)
        m_terms = _series_terms(float(eps_max[sg].max()))
        in_s = series[c]
        ce, ee = c[in_s], eps[in_s]
        pos = np.full(n_groups, -1)
        pos[sg] = np.arange(sg.size)
        mom = np.zeros((m_terms, sg.size))
        pw = np.ones_like(ee)
        for k in range(m_terms):
            pw = pw * ee
            mom[k] = np.bincount(pos[ce], weights=pw, minlength=sg.size)
        ks = np.arange(1, m_terms + 1)
        harm = np.concatenate([[0.0], np.cumsum(1.0 / ks)])[:-1]  # H_{k-1}
        c1 = ((-1.0) ** (ks + 1) / ks)[:, None] * mom
        c2 = ((-1.0) ** ks * 2.0 * harm / ks)[:, None] * mom
        a1 = np.broadcast_to(c1[-1][:, None], h.shape).copy()
        a2 = np.broadcast_to(c2[-1][:, None], h.shape).copy()
        for k in range(m_terms - 2, -1, -1):
            a1 *= h
            a1 += c1[k][:, None]
            a2 *= h
            a2 += c2[k][:, None]
        s1[sg] = a1 * h
        s2[sg] = a2 * h
        del a1, a2
        # stored entries of the series groups' cells, rows in group order, a chunk at a time
        hfull = np.zeros((n_groups, g))
        hfull[sg] = h
        del h, su
        srows = rows[in_s][np.argsort(ce, kind="stable")]
        scode = codes[srows]
        ui_row = BULK_TARGET_SUM / (tot[scode] - lib[srows])
        eps_row = lib[srows] / (tot[scode] - lib[srows])
        ends = np.cumsum(np.diff(cells.x.indptr)[cells.rows[srows]])
        flat_s, flat_h = sums.ravel(), hfull.ravel()
        bounds, lo = [], 0
        while lo < srows.size:
            base = ends[lo - 1] if lo else 0
            hi = min(max(int(np.searchsorted(ends, base + _JK_CHUNK, "right")), lo + 1), srows.size)
            bounds.append((lo, hi))
            lo = hi

        def chunk(b):
            lo, hi = b
            sub = cells.take(srows[lo:hi])
            k = sub.nnz
            q0, q1 = int(scode[lo]), int(scode[hi - 1]) + 1
            per_row = np.diff(sub.indptr)
            loc = np.repeat(scode[lo:hi] - q0, per_row) * g + sub.indices
            glob = loc + q0 * g
            size = max(_JK_CHUNK, 1 << max(k - 1, 0).bit_length())
            buf = np.zeros((5, size))
            buf[0, :k] = sub.data
            np.take(flat_s, glob, out=buf[1, :k])
            buf[2, :k] = np.repeat(ui_row[lo:hi], per_row)
            np.take(flat_h, glob, out=buf[3, :k])
            buf[4, :k] = np.repeat(eps_row[lo:hi], per_row)
            with jax.enable_x64(True):  # per thread: workers do not inherit the context
                d1, d2 = _jk_entries(*buf)
                d1, d2 = np.asarray(d1)[:k], np.asarray(d2)[:k]
            span = (q1 - q0) * g
            return q0, q1, np.bincount(loc, d1, span), np.bincount(loc, d2, span)

        with ThreadPoolExecutor(min(host_threads(), max(len(bounds), 1))) as ex:
            for q0, q1, a1, a2 in ex.map(chunk, bounds):  # added in chunk order
                s1[q0:q1] += a1.reshape(q1 - q0, g)
                s2[q0:q1] += a2.reshape(q1 - q0, g)
    if direct.size:  # cell by cell: v = log1p(T (S - x) / rem) - b (0 - b where rem = 0)
        b = _bulk_lognorm(sums[direct])
        for j, q in enumerate(direct):
            sel = c == q
            y = cells.take(rows[sel]).toarray()
            rq = rem[sel]
            safe = np.where(rq > 0, rq, 1.0)
            v = np.log1p(BULK_TARGET_SUM * (sums[q] - y) / safe[:, None])
            v = np.where((rq > 0)[:, None], v, 0.0) - b[j]
            s1[q] = v.sum(axis=0)
            s2[q] = (v * v).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        q = (s2 - s1**2 / sizes[:, None]).sum(axis=1)
        out = np.maximum((sizes - 1) / sizes * q, 0.0)
    return np.where(active, out, 0.0)


def _cpm(x: sp.csr_matrix) -> sp.csr_matrix:
    """Per-cell CPM ``x / (L / 1e6)`` (scanpy ``normalize_total``'s arithmetic)."""
    return sp.csr_matrix(
        (x.data / np.repeat(_Cells.of(x).cpm_divisor(), np.diff(x.indptr)), x.indices, x.indptr),
        shape=x.shape,
    )


@dataclass(frozen=True)
class _Reference:
    """A control pool for DE: its mean CPM, the gene gate and (real data) its counts."""

    mean_cpm: np.ndarray  # (G,)
    kept: np.ndarray  # (G,) bool
    counts: sp.csr_matrix | None = None  # (m, G), kept for the prediction's DE


def _reference(ctrl: sp.csr_matrix, keep_counts: bool = False) -> _Reference:
    if ctrl.shape[0] == 0:
        raise ValueError("vcc2026: no control cells to compute DE against")
    mean = np.asarray(_cpm(ctrl).mean(axis=0)).ravel()
    return _Reference(mean, mean > MIN_CPM, ctrl if keep_counts else None)


@dataclass(frozen=True)
class _DE:
    """One side's DE table as ``(P, G)`` arrays; rows outside the gate are absent (NaN)."""

    lfc: np.ndarray
    pval: np.ndarray
    padj: np.ndarray
    kept: np.ndarray


def _lfc(cpm_sums: np.ndarray, codes: np.ndarray, n: int, ref: _Reference) -> np.ndarray:
    """``log2`` fold change of the mean CPM of groups ``0..n-1`` over the reference's."""
    sizes = np.bincount(codes[(codes >= 0) & (codes < n)], minlength=n).astype(np.float64)
    means = cpm_sums[:n] / sizes[:, None]
    return np.log2((means + EPSILON) / (ref.mean_cpm + EPSILON))


def _pass_roles(codes: np.ndarray, n: int) -> np.ndarray:
    """Roles of :func:`mannwhitney_counts_passes`: group ``code``, control ``-1``."""
    out = np.full(codes.size, EXCLUDED, np.int32)
    grp = (codes >= 0) & (codes < n)
    out[grp] = codes[grp]
    out[codes == n] = -1
    return out


def _pvalues(u: np.ndarray, ties: np.ndarray, n: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Wilcoxon p-values from exact counts (rows: groups, each with its control size ``m``).

    The finishing arithmetic of :func:`vcjax.stats.mannwhitney_vs_control` (one call per
    control size), so the p-values equal its results bit for bit.
    """
    pval = np.full(u.shape, np.nan)
    with jax.enable_x64(True):
        for size in np.unique(m):
            rows = np.flatnonzero(m == size)
            res = _finish_p(u[rows], ties[rows], n[rows], m=int(size))
            pval[rows] = np.asarray(res, dtype=np.float64)
    return pval


@partial(jax.jit, static_argnames=("m",))
def _finish_p(u, ties, n, *, m: int):
    return mannwhitney_from_counts(u, ties, n, m, True, True).pvalue


def _wilcoxon(parts, div, roles, cols, *, classes=None, n_groups=None):
    """p-values ``(R, |cols|)`` of every (pass, group) row: the exact sparse counts of
    :func:`mannwhitney_counts_passes` on ``log1p(x / div)`` (CPM, formed a gene block at a
    time from the counts), finished :data:`FINISH_WIDTH` genes at a time."""

    def lcpm(v, rows):
        return np.log1p(v.astype(np.float64) / div[rows])

    res = mannwhitney_counts_passes(
        parts, roles, classes=classes, n_groups=n_groups, genes=cols, transform=lcpm,
        finish=_pvalues,
    )  # fmt: skip
    return res.u, res.offsets


def _de_table(lfc: np.ndarray, pval_cols: np.ndarray, cols: np.ndarray, kept: np.ndarray) -> _DE:
    """A side's :class:`_DE` from its lfc and its p-values on ``cols`` (gated by ``kept``)."""
    g = kept.size
    pval = np.full((lfc.shape[0], g), np.nan)
    pos = np.full(g, -1)
    pos[cols] = np.arange(cols.size)
    gated = np.flatnonzero(kept)
    pval[:, gated] = pval_cols[:, pos[gated]]
    padj = np.full_like(pval, np.nan)
    if gated.size:
        padj[:, gated] = benjamini_hochberg_host(pval[:, gated])
    return _DE(np.where(kept[None, :], lfc, np.nan), pval, padj, kept)


def _de(cells: _Cells, codes: np.ndarray, n: int, ref: _Reference, lfc, ctrl=None) -> _DE:
    """Wilcoxon DE of groups ``0..n-1`` of ``cells`` (raw counts) against a control.

    The control: ``ctrl`` (counts, e.g. the real control for a prediction; the cells' own
    control rows are then left out), else the cells with code ``n``. ``lfc``: from
    :func:`_lfc`.
    """
    if not np.array_equal(cells.rows, np.arange(cells.x.shape[0])):  # pragma: no cover
        raise AssertionError("vcc2026: DE of a row subset is not used")
    roles = _pass_roles(codes, n)
    parts, div = [cells.x], cells.cpm_divisor()
    if ctrl is not None:
        roles[roles == -1] = EXCLUDED
        parts.append(ctrl)
        roles = np.concatenate([roles, np.full(ctrl.shape[0], -1, np.int32)])
        div = np.concatenate([div, _Cells.of(ctrl).cpm_divisor()])
    cols = np.flatnonzero(ref.kept)
    pval, _ = _wilcoxon(parts, div, roles[None, :], cols, n_groups=[n])
    return _de_table(lfc, pval, cols, ref.kept)


@dataclass(frozen=True)
class _Side:
    """One dataset scored as real or predicted: bulks, jackknife, DE."""

    bulk: np.ndarray  # (P, G) bulk_lognorm, perturbation order
    jk: np.ndarray  # (P,)
    ctrl_bulk: np.ndarray  # (G,)
    ctrl_jk: float
    de: _DE


def _codes(labels: np.ndarray, perts: list[str], control: str) -> np.ndarray:
    """Group of each cell: ``i`` for ``perts[i]``, ``len(perts)`` for the control, else -1."""
    names = np.asarray([*perts, control])
    uniq, inv = np.unique(np.asarray(labels).astype(str), return_inverse=True)
    pos = np.searchsorted(names[np.argsort(names)], uniq)
    pos = np.minimum(pos, names.size - 1)
    srt = np.argsort(names)
    hit = names[srt][pos] == uniq
    return np.where(hit, srt[pos], -1)[inv].astype(np.int64)


def _side(cells: _Cells, codes: np.ndarray, n: int, de: _DE, sums: np.ndarray) -> _Side:
    """Groups ``0..n-1`` perturbations, ``n`` the control (``sums``: their count sums)."""
    bulk = _bulk_lognorm(sums)
    jk = _jackknife(cells, codes, sums)
    return _Side(bulk[:n], jk[:n], bulk[n], float(jk[n]), de)


# ------------------------------------------------------------------------------ metrics


def _expr_metrics(pred: _Side, real: _Side, own: np.ndarray) -> dict[str, np.ndarray]:
    """The four per-perturbation ``expr_*`` metrics (``metrics/delta.py``)."""
    p, g = real.bulk.shape
    rows = np.arange(p)
    has = own >= 0
    oc = np.where(has, own, 0)
    n_row = np.where(has, g - 1.0, float(g))
    w = np.divide(1.0, n_row, out=np.zeros_like(n_row), where=n_row > 0)
    d = pred.bulk - real.bulk
    own_sq = np.where(has, d[rows, oc] ** 2, 0.0)
    base = np.einsum("ij,ij->i", d, d)

    def per_gene(summed):
        return np.divide(summed, n_row, out=np.full(p, np.nan), where=n_row > 0)

    mse = per_gene(base - pred.jk - real.jk - own_sq)
    term = np.minimum(pred.jk, real.jk)
    claim = float((term * w).sum())
    if claim > 0.0:
        dev = pred.bulk - pred.bulk.mean(axis=0)
        mask = np.ones((p, g))
        mask[rows[has], own[has]] = 0.0
        wm = w[:, None] * mask
        s1 = (wm * dev).sum(axis=0)
        s2 = (wm * dev * dev).sum(axis=0)
        wsum = wm.sum(axis=0)
        cnt = mask.sum(axis=0)
        ok = (cnt >= 2.0) & (wsum > 0.0)
        budget = float(np.maximum(s2[ok] - s1[ok] ** 2 / wsum[ok], 0.0).sum()) if ok.any() else 0.0
        ratio = budget / claim
        if ratio < 1.0:
            term = term * ratio
    capped = per_gene(base - term - real.jk - own_sq)
    e = real.bulk - real.ctrl_bulk
    e_own = np.where(has, e[rows, oc] ** 2, 0.0)
    dist = per_gene(np.einsum("ij,ij->i", e, e) - real.jk - real.ctrl_jk - e_own)
    mass = np.expm1(real.bulk).sum(axis=1) / BULK_TARGET_SUM
    return {
        "expr_mse_unbiased": mse,
        "expr_mse_unbiased_capped": capped,
        "expr_distance_unbiased": dist,
        "expr_real_mass_ratio": mass,
    }


_dot_t = jax.jit(lambda a, b: a @ b.T)


def _pds_cosine(pred_eff: np.ndarray, real_eff: np.ndarray, panel: np.ndarray) -> np.ndarray:
    """Midrank cosine discrimination with the panel's target genes removed."""
    keep = np.ones(real_eff.shape[1], bool)
    keep[panel] = False
    if not keep.any():
        raise ValueError("vcc2026: every gene is a panel target; pds_cosine has no features")
    a, b = pred_eff[:, keep], real_eff[:, keep]
    with jax.enable_x64(True):  # XLA's dot: OpenBLAS's threads stall on a busy machine
        sim = np.asarray(_dot_t(a, b), dtype=np.float64)
    den = np.sqrt(np.einsum("ij,ij->i", a, a))[:, None] * np.sqrt(np.einsum("ij,ij->i", b, b))
    cos = np.divide(sim, den, out=np.zeros_like(sim), where=den != 0)
    dist = np.clip(1.0 - cos, 0.0, 2.0)
    n = dist.shape[1]
    match = np.diag(dist)[:, None]
    rank = (dist < match).sum(axis=1) + ((dist == match).sum(axis=1) - 1) / 2.0
    return np.ones(n) if n - 1 <= 0 else 1.0 - rank / (n - 1)


def _name_rank(genes: np.ndarray) -> np.ndarray:
    order = sorted(range(genes.size), key=lambda i: str(genes[i]))
    out = np.empty(genes.size, np.int64)
    out[order] = np.arange(genes.size)
    return out


def _de_metrics(pred: _DE, real: _DE, own: np.ndarray, name_rank: np.ndarray) -> dict:
    """The four scored DE metrics, ``(P,)`` each (``metrics/de.py``, ``metrics/direction.py``)."""
    p, g = real.lfc.shape
    rows = np.arange(p)
    ex = np.zeros((p, g), bool)
    has = own >= 0
    ex[rows[has], own[has]] = True
    real_row = real.kept[None, :] & ~ex
    pred_row = pred.kept[None, :] & ~ex
    r_sig = real_row & (real.padj < ALPHA)
    p_sig = pred_row & (pred.padj < ALPHA)

    inter = (r_sig & p_sig).sum(axis=1)
    union = r_sig.sum(axis=1) + p_sig.sum(axis=1) - inter
    jac = np.where(union == 0, 1.0, inter / np.maximum(union, 1))

    gate = r_sig & np.isfinite(real.lfc)
    lp = np.where(pred.kept[None, :] & np.isfinite(pred.lfc), pred.lfc, 0.0)
    n_gate = gate.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        num = np.where(gate, np.abs(lp - np.where(gate, real.lfc, 0.0)), 0.0).sum(axis=1) / n_gate
        den = np.where(gate, np.abs(real.lfc), 0.0).sum(axis=1) / n_gate
        nmae = num / den
    nmae = np.where((n_gate >= MIN_GATE) & np.isfinite(den) & (den != 0), nmae, np.nan)

    both = real_row & pred_row
    rl = np.where(real_row, real.lfc, np.nan)
    pl = np.where(pred_row, pred.lfc, np.nan)
    in_denom = both & ~np.isnan(rl) & (rl != 0)
    committed = ~np.isnan(pl) & (pl != 0)
    match = in_denom & committed & (np.sign(pl) == np.sign(rl))
    pad = np.where(both, pred.padj, np.nan)
    psig = both & (pad < ALPHA)
    n_conf = r_sig.sum(axis=1)
    scored = psig & in_denom
    n_pred = scored.sum(axis=1)
    k = (scored & match).sum(axis=1)
    top = np.maximum(n_pred, n_conf)
    fyr = np.where(top > 0, k / np.maximum(top, 1), np.nan)

    valid = both & (real.padj < ALPHA)
    # the ranking of each row's valid entries (the others never count): flat indices of
    # the valid entries sorted by (row, significant first, padj, p, |lfc| desc, name)
    idx = np.flatnonzero(valid.ravel())
    r_i, c_i = np.divmod(idx, g)
    pad_i = pad.ravel()[idx]
    pv_i = pred.pval.ravel()[idx]
    pl_i = pl.ravel()[idx]
    order = np.lexsort(
        (
            name_rank[c_i],
            np.where(np.isnan(pl_i), np.inf, -np.abs(pl_i)),
            np.where(np.isnan(pv_i), np.inf, pv_i),
            np.where(np.isnan(pad_i), np.inf, pad_i),
            ~psig.ravel()[idx],
            r_i,
        )
    )
    idx, r_i = idx[order], r_i[order]
    d_s = in_denom.ravel()[idx]
    m_s = match.ravel()[idx]
    first = np.searchsorted(r_i, rows)  # each row's first ranked entry
    depth = np.cumsum(d_s)
    hits = np.cumsum(m_s)
    base = np.concatenate([[0], depth])[first]
    base_h = np.concatenate([[0], hits])[first]
    depth = depth - base[r_i]
    hits = hits - base_h[r_i]
    with np.errstate(invalid="ignore", divide="ignore"):
        purity = hits / depth
    qual = (depth > 0) & (purity >= PURITY_FLOOR)
    k_star = np.zeros(p, depth.dtype)
    np.maximum.at(k_star, r_i[qual], depth[qual])
    reach = np.where(n_conf > 0, k_star / np.maximum(n_conf, 1), np.nan)
    return {
        "de_wilcoxon_direction_fidelity_yield_raw": fyr.astype(np.float64),
        "de_wilcoxon_direction_reach_raw": reach.astype(np.float64),
        "de_wilcoxon_lfc_nmae": nmae.astype(np.float64),
        "de_wilcoxon_sig_jaccard": jac.astype(np.float64),
    }


def _own_cols(perts: list[str], genes: np.ndarray) -> np.ndarray:
    pos = {str(gn): i for i, gn in enumerate(genes)}
    return np.array([pos.get(p, -1) for p in perts], dtype=np.int64)


def _score_pair(
    pred: _Side,
    real: _Side,
    own: np.ndarray,
    panel: np.ndarray,
    name_rank: np.ndarray,
    *,
    pred_ctrl: np.ndarray,
) -> dict[str, np.ndarray]:
    """All nine per-perturbation metrics of ``pred`` against ``real`` (same perturbations)."""
    if not (own >= 0).any():
        raise ValueError(
            "vcc2026: no perturbation label names a measured gene; the preset excludes each "
            "perturbation's own gene and refuses a panel where none resolves"
        )
    own_de = np.where((own >= 0) & real.de.kept[np.maximum(own, 0)], own, -1)
    out = _de_metrics(pred.de, real.de, own_de, name_rank)
    out.update(_expr_metrics(pred, real, own))
    out["pds_cosine"] = _pds_cosine(pred.bulk - pred_ctrl, real.bulk - real.ctrl_bulk, panel)
    return {m: out[m] for m in VCC2026_METRICS}


def _aggregates(metrics: dict[str, np.ndarray]) -> dict[str, float]:
    """cell-eval2's aggregate: mean of finite values; the capped norm is a ratio of sums."""
    out = {}
    for m in VCC2026_METRICS:
        v = metrics[m]
        f = v[np.isfinite(v)]
        out[m] = float(f.mean()) if f.size else float("nan")
    num, den = metrics["expr_mse_unbiased_capped"], metrics["expr_distance_unbiased"]
    ok = np.isfinite(num) & np.isfinite(den)
    d = den[ok].sum()
    out[_CAPPED_NORM] = float(num[ok].sum() / d) if ok.any() and d > 0 else float("nan")
    return out


# ------------------------------------------------------------------------------ truth


@dataclass(frozen=True)
class Vcc2026Truth:
    """The real-data half of the vcc2026 score (see the module docstring).

    Attributes:
      perts: scored perturbations, sorted (the row order of every per-perturbation array).
      genes: gene names (column order).
      control: control label.
      baseline: aggregate of each metric (and the capped norm) on the generic-response arm.
      replicate: the split-half replicate anchor of each metric (mean over the splits).
      replicate_splits: per split, the same aggregates (``(N_SPLITS,)`` per metric).
      baseline_metrics: per-perturbation metrics of the baseline arm.
      seeds: the split seeds.
    """

    perts: tuple[str, ...]
    genes: np.ndarray
    control: str
    real: _Side = field(repr=False)
    ref: _Reference = field(repr=False)
    own: np.ndarray = field(repr=False)
    panel: np.ndarray = field(repr=False)
    name_rank: np.ndarray = field(repr=False)
    baseline: dict = field(default_factory=dict)
    replicate: dict = field(default_factory=dict)
    replicate_splits: dict = field(default_factory=dict, repr=False)
    baseline_metrics: dict = field(default_factory=dict, repr=False)
    seeds: tuple[int, ...] = ()


def _halves(labels: np.ndarray, order: list[str], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``ceiling._disjoint_halves``' cell indices: per group, a permutation split in two."""
    rng = np.random.default_rng(seed)
    a, b = [], []
    for lab in order:
        idx = np.flatnonzero(labels == lab)
        perm = rng.permutation(idx)
        h = perm.size // 2
        if h < 1:
            continue
        a.append(perm[:h])
        b.append(perm[h : 2 * h])
    return np.concatenate(a), np.concatenate(b)


def _baseline_cells(
    cells: _Cells, codes: np.ndarray, n: int, ctrl: sp.csr_matrix, own: np.ndarray
) -> sp.csr_matrix:
    """The generic-response arm: its emitted cells (grouped in perturbation order), then
    the real control cells."""
    sizes = np.bincount(codes[codes >= 0], minlength=n + 1)
    means = _group_sums(cells, codes, n + 1) / np.maximum(sizes, 1)[:, None]
    bulk = means[:n]
    total = bulk.sum(axis=0)
    count = np.full(cells.x.shape[1], float(n))
    has = own >= 0
    np.subtract.at(total, own[has], bulk[np.flatnonzero(has), own[has]])
    np.subtract.at(count, own[has], 1.0)
    if (count <= 0).any():
        raise ValueError("vcc2026: a gene is targeted by every perturbation; no baseline profile")
    profile = total / count
    cmean = np.asarray(ctrl.astype(np.float64).mean(axis=0)).ravel()
    zero = cmean <= 0
    scale = np.where(zero, 0.0, profile / np.where(zero, 1.0, cmean))
    rng = np.random.default_rng(0)
    src = np.concatenate(
        [rng.integers(0, ctrl.shape[0], size=int(sizes[i])) for i in range(n)]
        + [np.arange(ctrl.shape[0])]
    )
    out = ctrl[src]
    e = int(out.indptr[src.size - ctrl.shape[0]])  # the emitted cells' entries
    d = out.data[:e] * scale[out.indices[:e]]
    out.data[:e] = d.astype(np.float32).astype(out.dtype)
    out.eliminate_zeros()
    return out


def _lfc_nmae_ref(full: _DE, a: _DE, b: _DE, own_de: np.ndarray) -> float:
    """``lfc_nmae_ref``: mean over perturbations of ``mean|l_A - l_B| / mean|l_full|``."""
    p, g = full.lfc.shape
    ex = np.zeros((p, g), bool)
    has = own_de >= 0
    ex[np.flatnonzero(has), own_de[has]] = True
    gate = full.kept[None, :] & ~ex & (full.padj < ALPHA) & np.isfinite(full.lfc)
    la = np.where(a.kept[None, :] & np.isfinite(a.lfc), a.lfc, 0.0)
    lb = np.where(b.kept[None, :] & np.isfinite(b.lfc), b.lfc, 0.0)
    n = gate.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        num = np.where(gate, np.abs(la - lb), 0.0).sum(axis=1) / n
        den = np.where(gate, np.abs(np.where(gate, full.lfc, 0.0)), 0.0).sum(axis=1) / n
        v = num / den
    ok = (n >= MIN_GATE) & np.isfinite(den) & (den != 0)
    if not ok.any():
        raise ValueError(
            "vcc2026: the lfc_nmae reference scored no perturbation (gates < 10 genes)"
        )
    return float(v[ok].mean())


def vcc2026_truth(
    real_counts,
    real_labels,
    genes,
    *,
    control: str = "non-targeting",
    n_splits: int = N_SPLITS,
    base_seed: int = BASE_SEED,
) -> Vcc2026Truth:
    """Everything the vcc2026 score needs from the real data, computed once.

    Args:
      real_counts: ``(N, G)`` raw integer counts (dense or scipy sparse).
      real_labels: ``(N,)`` perturbation label per cell (a pandas categorical keeps its
        category order for the replicate splits, as cell-eval2's groupby does).
      genes: ``(G,)`` gene names.
      control: control label.
      n_splits, base_seed: the replicate anchor's splits (the rule pins 5 and 0).

    Returns:
      :class:`Vcc2026Truth`.
    """
    genes = np.asarray(genes).astype(str)
    x = _csr(real_counts, "real counts")
    if x.shape[1] != genes.size:
        raise ValueError(f"vcc2026: {genes.size} gene names for {x.shape[1]} columns")
    order = _group_order(real_labels)
    labels = np.asarray(real_labels).astype(str)
    if control not in order:
        raise ValueError(f"vcc2026: control {control!r} absent from the real labels")
    perts = sorted(set(order) - {control})
    if not perts:
        raise ValueError("vcc2026: no perturbation besides the control")
    codes = _codes(labels, perts, control)
    n = len(perts)
    cells = _Cells.of(x)
    ref = _reference(x[codes == n], keep_counts=True)
    own = _own_cols(perts, genes)
    panel = np.unique(own[own >= 0])
    name_rank = _name_rank(genes)
    ctx = dict(own=own, panel=panel, name_rank=name_rank)

    # the replicate halves (cells, codes, own control of each), in seed order
    seeds = [int(s) for s in np.random.SeedSequence(int(base_seed)).generate_state(n_splits)]
    halves = []
    for seed in seeds:
        ia, ib = _halves(labels, order, seed)
        la = labels[ia]
        sp_perts = sorted(set(la.tolist()) - {control})
        if control not in set(la.tolist()):
            raise ValueError("vcc2026: the control has < 2 cells; no split-half anchor")
        hs = []
        for idx in (ia, ib):
            c = _codes(labels[idx], sp_perts, control)
            hs.append((idx, c, _reference(x[idx[c == len(sp_perts)]])))
        halves.append((sp_perts, hs))

    # DE of the real data and of every half in one Wilcoxon call: one sort per gene
    roles = [_pass_roles(codes, n)]
    n_groups = [n]
    cols = ref.kept.copy()
    pert_pos = {q: i for i, q in enumerate(perts)}
    for sp_perts, hs in halves:
        k = len(sp_perts)
        to_full = np.array([pert_pos[q] for q in sp_perts] + [n])  # half code -> real code
        for idx, c, href in hs:
            r = np.full(x.shape[0], EXCLUDED, np.int32)
            r[idx] = _pass_roles(c, k)
            if (codes[idx][c >= 0] != to_full[c[c >= 0]]).any():  # pragma: no cover
                raise AssertionError("vcc2026: half labels disagree with the real labels")
            roles.append(r)
            n_groups.append(k)
            cols |= href.kept
    cols = np.flatnonzero(cols)
    pval, off = _wilcoxon(
        [x], cells.cpm_divisor(), np.stack(roles), cols,
        classes=np.maximum(codes, -1) + 1, n_groups=n_groups,
    )  # fmt: skip
    del roles
    sums, cpm_sums = _group_sums(cells, codes, n + 1, cpm=True)
    real_de = _de_table(_lfc(cpm_sums, codes, n, ref), pval[:n], cols, ref.kept)
    real = _side(cells, codes, n, real_de, sums)

    # baseline arm: emitted cells + the real control cells, scored like a submission
    bx = _baseline_cells(cells, codes, n, ref.counts, own)
    bcodes = np.repeat(np.arange(n), np.bincount(codes[(codes >= 0) & (codes < n)], minlength=n))
    bcodes = np.concatenate([bcodes, np.full(ref.counts.shape[0], n)])
    bc = _Cells.of(bx)
    sums, cpm_sums = _group_sums(bc, bcodes, n + 1, cpm=True)
    base_side = _side(bc, bcodes, n, _de(bc, bcodes, n, ref, _lfc(cpm_sums, bcodes, n, ref)), sums)
    del bx, bc
    base_m = _score_pair(base_side, real, **ctx, pred_ctrl=real.ctrl_bulk)

    # replicate anchor: split halves, each with its own control
    own_de_full = np.where((own >= 0) & real.de.kept[np.maximum(own, 0)], own, -1)
    splits: dict[str, list[float]] = {}
    for i, (sp_perts, hs) in enumerate(halves):
        k = len(sp_perts)
        sides = []
        for j, (idx, c, href) in enumerate(hs):
            hc = _Cells(x, idx, cells.lib)
            pv = pval[off[2 * i + j + 1] : off[2 * i + j + 2]]
            sums, cpm_sums = _group_sums(hc, c, k + 1, cpm=True)
            de = _de_table(_lfc(cpm_sums, c, k, href), pv, cols, href.kept)
            sides.append(_side(hc, c, k, de, sums))
        half_a, half_b = sides
        s_own = _own_cols(sp_perts, genes)
        m = _score_pair(
            half_b,
            half_a,
            s_own,
            np.unique(s_own[s_own >= 0]),
            name_rank,
            pred_ctrl=half_b.ctrl_bulk,
        )
        agg = _aggregates(m)
        pos = [perts.index(q) for q in sp_perts]
        full_sub = _DE(real.de.lfc[pos], real.de.pval[pos], real.de.padj[pos], real.de.kept)
        agg["de_wilcoxon_lfc_nmae"] = _lfc_nmae_ref(
            full_sub, half_a.de, half_b.de, own_de_full[pos]
        )
        for key, v in agg.items():
            splits.setdefault(key, []).append(v)
    replicate = {k: float(np.mean(v)) for k, v in splits.items()}
    baseline = _aggregates(base_m)
    for mname, direction in VCC2026_MEMBERS.items():
        b, r = baseline[mname], replicate[mname]
        d = (r - b) if direction == "higher" else (b - r)
        if not (np.isfinite(b) and np.isfinite(r) and d > 0):
            raise ValueError(
                f"vcc2026: {mname} has no usable scale (baseline {b!r}, replicate {r!r})"
            )
    return Vcc2026Truth(
        perts=tuple(perts),
        genes=genes,
        control=control,
        real=real,
        ref=ref,
        own=own,
        panel=panel,
        name_rank=name_rank,
        baseline=baseline,
        replicate=replicate,
        replicate_splits={k: np.asarray(v) for k, v in splits.items()},
        baseline_metrics=base_m,
        seeds=tuple(seeds),
    )


# ------------------------------------------------------------------------------ scores


def _member_score(name: str, u: np.ndarray, b: float, r: float) -> np.ndarray:
    """``score_one`` on the replicate scale, elementwise over ``u``."""
    u = np.asarray(u, dtype=np.float64)
    if VCC2026_MEMBERS[name] == "higher":
        s = (u - b) / (r - b)
        return np.where(np.isfinite(s), s, (0.0 - b) / (r - b))
    s = 1.0 - (u - r) / (b - r)
    if name == _CAPPED_NORM:
        return np.where(np.isfinite(s), np.clip(s, 0.0, 1.0), 0.0)
    return np.where(np.isfinite(s), np.maximum(s, LFC_NMAE_FLOOR), LFC_NMAE_FLOOR)


def vcc2026_composite(truth: Vcc2026Truth, metrics: dict, weights=None) -> dict:
    """The composite from per-perturbation metrics and perturbation multiplicities.

    Each member's aggregate is recomputed as the ``weights``-weighted mean of its finite
    per-perturbation values (the capped norm as ``Σ w·capped / Σ w·distance``), rescaled on
    the truth's fixed baseline/replicate scale, and the six are averaged.

    Args:
      truth: :class:`Vcc2026Truth`.
      metrics: ``"metrics"`` of :func:`vcc2026_scores` (``(P,)`` per name).
      weights: ``(P,)`` or ``(B, P)`` multiplicities (e.g. bootstrap counts); default ones.

    Returns:
      dict with ``"score"`` (``()`` or ``(B,)``) and ``"members"`` {name: score}.
    """
    p = len(truth.perts)
    w = np.ones(p) if weights is None else np.asarray(weights, dtype=np.float64)
    w2 = np.atleast_2d(w)
    members = {}
    for name in VCC2026_MEMBERS:
        if name == _CAPPED_NORM:
            num, den = metrics["expr_mse_unbiased_capped"], metrics["expr_distance_unbiased"]
            ok = np.isfinite(num) & np.isfinite(den)
            n_ = w2 @ np.where(ok, num, 0.0)
            d_ = w2 @ np.where(ok, den, 0.0)
            with np.errstate(invalid="ignore", divide="ignore"):
                u = np.where(d_ > 0, n_ / d_, np.nan)
        else:
            v = metrics[name]
            ok = np.isfinite(v)
            with np.errstate(invalid="ignore", divide="ignore"):
                u = (w2 @ np.where(ok, v, 0.0)) / (w2 @ ok.astype(np.float64))
        s = _member_score(name, u, truth.baseline[name], truth.replicate[name])
        members[name] = s if w.ndim == 2 else s[0]
    score = np.mean(np.stack(list(members.values())), axis=0)
    return {"score": score, "members": members}


def vcc2026_scores(truth: Vcc2026Truth, pred_counts, pred_labels) -> dict:
    """Score one prediction as ``cell-eval2 run --preset vcc2026`` + ``score --real-bundle``.

    Args:
      truth: from :func:`vcc2026_truth`.
      pred_counts: ``(N', G)`` raw integer counts of the predicted cells, same genes.
      pred_labels: ``(N',)`` labels; the same label set as the real data (control included).

    Returns:
      dict with ``"perts"`` (row order), ``"metrics"`` {cell-eval2 name: ``(P,)`` float64;
      NaN where cell-eval2 omits the row}, ``"aggregates"`` (cell-eval2's ``agg_results``
      means, plus ``expr_mse_unbiased_capped_norm``), ``"member_scores"`` (each scored
      member on the replicate scale), ``"score"`` (their mean: the challenge score),
      ``"per_pert_member_values"`` {member: ``(P,)`` values whose (weighted) mean is the
      member's aggregate: the metric itself, or ``capped_p / mean(distance)`` for the capped
      norm} and ``"baseline"``/``"replicate"`` (the scale's two ends).
    """
    x = _csr(pred_counts, "predicted counts")
    if x.shape[1] != truth.genes.size:
        raise ValueError(
            f"vcc2026: predicted counts have {x.shape[1]} genes, the truth {truth.genes.size}"
        )
    labels = np.asarray(pred_labels).astype(str)
    perts = list(truth.perts)
    want, got = set(perts) | {truth.control}, set(labels.tolist())
    if want != got:
        raise ValueError(
            f"vcc2026: perturbation sets differ: missing from the prediction "
            f"{sorted(want - got)[:10]}, not in the truth {sorted(got - want)[:10]}"
        )
    codes = _codes(labels, perts, truth.control)
    n = len(perts)
    pc = _Cells.of(x)
    sums, cpm_sums = _group_sums(pc, codes, n + 1, cpm=True)
    lfc = _lfc(cpm_sums, codes, n, truth.ref)
    pred = _side(pc, codes, n, _de(pc, codes, n, truth.ref, lfc, ctrl=truth.ref.counts), sums)
    m = _score_pair(
        pred, truth.real, truth.own, truth.panel, truth.name_rank, pred_ctrl=truth.real.ctrl_bulk
    )
    agg = _aggregates(m)
    comp = vcc2026_composite(truth, m)
    dist = m["expr_distance_unbiased"]
    ok = np.isfinite(dist) & np.isfinite(m["expr_mse_unbiased_capped"])
    dbar = dist[ok].mean() if ok.any() else np.nan
    per = {k: m[k] for k in VCC2026_MEMBERS if k != _CAPPED_NORM}
    per[_CAPPED_NORM] = np.where(ok, m["expr_mse_unbiased_capped"] / dbar, np.nan)
    return {
        "perts": perts,
        "metrics": m,
        "aggregates": agg,
        "member_scores": {k: float(v) for k, v in comp["members"].items()},
        "score": float(comp["score"]),
        "per_pert_member_values": per,
        "baseline": dict(truth.baseline),
        "replicate": dict(truth.replicate),
    }
