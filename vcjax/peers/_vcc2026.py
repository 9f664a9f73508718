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

from dataclasses import dataclass, field

import jax
import numpy as np
import scipy.sparse as sp

from vcjax.stats import benjamini_hochberg_host, mannwhitney_vs_control

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


def _csr(x, name: str) -> sp.csr_matrix:
    """``x`` as a float64 CSR copy, after the preset's raw-count checks."""
    m = sp.csr_matrix(x, dtype=np.float64) if sp.issparse(x) else sp.csr_matrix(np.asarray(x))
    m = m.astype(np.float64)
    m.sum_duplicates()
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
    tot = np.asarray(m.sum(axis=1)).ravel()
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


def _group_sums(x: sp.csr_matrix, codes: np.ndarray, n: int) -> np.ndarray:
    return np.asarray((_indicator(codes, n) @ x).toarray(), dtype=np.float64)


def _bulk_lognorm(sums: np.ndarray) -> np.ndarray:
    tot = sums.sum(axis=1)
    scale = np.divide(BULK_TARGET_SUM, tot, out=np.zeros_like(tot), where=tot > 0)
    return np.log1p(sums * scale[:, None])


def _jackknife(x: sp.csr_matrix, codes: np.ndarray, sums: np.ndarray, chunk: int = 1024):
    """Delete-one jackknife ``C_p`` of the bulk_lognorm mean of every group, ``(n_groups,)``."""
    n_groups, g = sums.shape
    sizes = np.bincount(codes[codes >= 0], minlength=n_groups).astype(np.float64)
    tot = sums.sum(axis=1)
    b = _bulk_lognorm(sums)
    lib = np.asarray(x.sum(axis=1)).ravel()
    s1 = np.zeros((n_groups, g))
    s2 = np.zeros((n_groups, g))
    rows = np.flatnonzero(codes >= 0)
    for lo in range(0, rows.size, chunk):
        r = rows[lo : lo + chunk]
        c = codes[r]
        y = x[r].toarray()
        rem = tot[c] - lib[r]
        if (rem < 0).any():
            raise ValueError("vcc2026: negative leave-one-out remainder; input is not counts")
        safe = np.where(rem > 0, rem, 1.0)
        v = np.log1p(BULK_TARGET_SUM * (sums[c] - y) / safe[:, None])
        v = np.where((rem > 0)[:, None], v, 0.0) - b[c]
        ind = _indicator(c, n_groups)
        s1 += ind @ v
        s2 += ind @ (v * v)
    with np.errstate(invalid="ignore", divide="ignore"):
        q = (s2 - s1**2 / sizes[:, None]).sum(axis=1)
        out = np.maximum((sizes - 1) / sizes * q, 0.0)
    return np.where((sizes >= 2) & (tot > 0), out, 0.0)


def _cpm(x: sp.csr_matrix) -> sp.csr_matrix:
    """Per-cell CPM ``x / (L / 1e6)`` (scanpy ``normalize_total``'s arithmetic)."""
    lib = np.asarray(x.sum(axis=1)).ravel() / TARGET_SUM
    lib = np.where(lib > 0, lib, 1.0)
    out = x.copy()
    out.data = out.data / np.repeat(lib, np.diff(out.indptr))
    return out


@dataclass(frozen=True)
class _Reference:
    """A control pool for DE: its log1p-CPM cells, mean CPM and the gene gate."""

    lcpm: sp.csc_matrix  # (m, G)
    mean_cpm: np.ndarray  # (G,)
    kept: np.ndarray  # (G,) bool


def _reference(ctrl: sp.csr_matrix) -> _Reference:
    if ctrl.shape[0] == 0:
        raise ValueError("vcc2026: no control cells to compute DE against")
    cpm = _cpm(ctrl)
    mean = np.asarray(cpm.mean(axis=0)).ravel()
    l = cpm.copy()
    l.data = np.log1p(l.data)
    return _Reference(l.tocsc(), mean, mean > MIN_CPM)


@dataclass(frozen=True)
class _DE:
    """One side's DE table as ``(P, G)`` arrays; rows outside the gate are absent (NaN)."""

    lfc: np.ndarray
    pval: np.ndarray
    padj: np.ndarray
    kept: np.ndarray


def _de(cells: sp.csr_matrix, codes: np.ndarray, n: int, ref: _Reference, block: int = 2048) -> _DE:
    """Wilcoxon DE of groups ``0..n-1`` of ``cells`` (raw counts) against ``ref``."""
    cpm = _cpm(cells)
    sums = _group_sums(cpm, codes, n)
    sizes = np.bincount(codes[(codes >= 0) & (codes < n)], minlength=n).astype(np.float64)
    means = sums / sizes[:, None]
    lfc = np.log2((means + EPSILON) / (ref.mean_cpm + EPSILON))
    kept = ref.kept
    cols = np.flatnonzero(kept)
    sel = np.flatnonzero((codes >= 0) & (codes < n))
    lc = cpm[sel]
    lc.data = np.log1p(lc.data)
    lc = lc.tocsc()
    lab = codes[sel].astype(np.int32)
    pval = np.full((n, cells.shape[1]), np.nan)
    with jax.enable_x64(True):
        for s0 in range(0, cols.size, block):
            cb = cols[s0 : s0 + block]
            gx = lc[:, cb].toarray()
            cx = ref.lcpm[:, cb].toarray()
            res = mannwhitney_vs_control(gx, lab, cx, n_groups=n)
            pval[:, cb] = np.asarray(res.pvalue, dtype=np.float64)
    padj = np.full_like(pval, np.nan)
    if cols.size:
        padj[:, cols] = benjamini_hochberg_host(pval[:, cols])
    lfc = np.where(kept[None, :], lfc, np.nan)
    return _DE(lfc, pval, padj, kept)


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


def _side(x: sp.csr_matrix, codes: np.ndarray, n: int, ref: _Reference) -> _Side:
    """Groups ``0..n-1`` perturbations, ``n`` the control."""
    sums = _group_sums(x, codes, n + 1)
    bulk = _bulk_lognorm(sums)
    jk = _jackknife(x, codes, sums)
    return _Side(bulk[:n], jk[:n], bulk[n], float(jk[n]), _de(x, codes, n, ref))


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


def _pds_cosine(pred_eff: np.ndarray, real_eff: np.ndarray, panel: np.ndarray) -> np.ndarray:
    """Midrank cosine discrimination with the panel's target genes removed."""
    keep = np.ones(real_eff.shape[1], bool)
    keep[panel] = False
    if not keep.any():
        raise ValueError("vcc2026: every gene is a panel target; pds_cosine has no features")
    a, b = pred_eff[:, keep], real_eff[:, keep]
    sim = a @ b.T
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
    rank_padj = np.where(np.isnan(pad), np.inf, pad)
    pv = np.where(both, pred.pval, np.nan)
    rank_pv = np.where(np.isnan(pv), np.inf, pv)
    neg_abs = np.where(np.isnan(pl), np.inf, -np.abs(pl))
    order = (
        np.lexsort(
            (
                np.broadcast_to(name_rank, (p, g)).ravel(),
                neg_abs.ravel(),
                rank_pv.ravel(),
                rank_padj.ravel(),
                (~psig).ravel(),
                (~valid).ravel(),
                np.repeat(rows, g),
            )
        ).reshape(p, g)
        - (rows * g)[:, None]
    )
    v_s = np.take_along_axis(valid, order, axis=1)
    d_s = np.take_along_axis(in_denom, order, axis=1) & v_s
    m_s = np.take_along_axis(match, order, axis=1) & v_s
    depth = np.cumsum(d_s, axis=1)
    hits = np.cumsum(m_s, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        purity = hits / depth
    qual = v_s & (depth > 0) & (purity >= PURITY_FLOOR)
    k_star = np.where(qual, depth, 0).max(axis=1, initial=0)
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
    x: sp.csr_matrix, labels: np.ndarray, perts: list[str], control: str, own: np.ndarray
) -> sp.csr_matrix:
    """The generic-response arm's non-control cells, grouped in ``perts`` order."""
    codes = _codes(labels, perts, control)
    n = len(perts)
    sizes = np.bincount(codes[codes >= 0], minlength=n + 1)
    means = _group_sums(x, codes, n + 1) / np.maximum(sizes, 1)[:, None]
    bulk = means[:n]
    total = bulk.sum(axis=0)
    count = np.full(x.shape[1], float(n))
    has = own >= 0
    np.subtract.at(total, own[has], bulk[np.flatnonzero(has), own[has]])
    np.subtract.at(count, own[has], 1.0)
    if (count <= 0).any():
        raise ValueError("vcc2026: a gene is targeted by every perturbation; no baseline profile")
    profile = total / count
    ctrl = x[labels == control]
    cmean = np.asarray(ctrl.mean(axis=0)).ravel()
    zero = cmean <= 0
    scale = np.where(zero, 0.0, profile / np.where(zero, 1.0, cmean))
    rng = np.random.default_rng(0)
    src = [rng.integers(0, ctrl.shape[0], size=int(sizes[i])) for i in range(n)]
    out = ctrl[np.concatenate(src)].tocsr()
    out.data = (out.data * scale[out.indices]).astype(np.float32).astype(np.float64)
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
    ref = _reference(x[codes == n])
    real = _side(x, codes, n, ref)
    own = _own_cols(perts, genes)
    panel = np.unique(own[own >= 0])
    name_rank = _name_rank(genes)
    ctx = dict(own=own, panel=panel, name_rank=name_rank)

    # baseline arm: emitted cells + the real control cells, scored like a submission
    bx = _baseline_cells(x, labels, perts, control, own)
    bcodes = np.repeat(np.arange(n), np.bincount(codes[(codes >= 0) & (codes < n)], minlength=n))
    bx = sp.vstack([bx, x[codes == n]], format="csr")
    bcodes = np.concatenate([bcodes, np.full(int((codes == n).sum()), n)])
    base_side = _side(bx, bcodes, n, ref)
    base_m = _score_pair(base_side, real, **ctx, pred_ctrl=real.ctrl_bulk)

    # replicate anchor: split halves, each with its own control
    seeds = [int(s) for s in np.random.SeedSequence(int(base_seed)).generate_state(n_splits)]
    own_de_full = np.where((own >= 0) & real.de.kept[np.maximum(own, 0)], own, -1)
    splits: dict[str, list[float]] = {}
    for seed in seeds:
        ia, ib = _halves(labels, order, seed)
        la, lb = labels[ia], labels[ib]
        sp_perts = sorted(set(la.tolist()) - {control})
        if control not in set(la.tolist()):
            raise ValueError("vcc2026: the control has < 2 cells; no split-half anchor")
        sides = []
        for idx, lab in ((ia, la), (ib, lb)):
            c = _codes(lab, sp_perts, control)
            xs = x[idx]
            sides.append(_side(xs, c, len(sp_perts), _reference(xs[c == len(sp_perts)])))
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
        for k, v in agg.items():
            splits.setdefault(k, []).append(v)
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
    pred = _side(x, codes, n, truth.ref)
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
