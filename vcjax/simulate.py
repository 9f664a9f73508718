"""Seeded synthetic single-cell perturbation screens.

:func:`simulate_screen` builds a small Perturb-seq-like :class:`anndata.AnnData` with a
known ground truth. It is the embedded default data set for ``vcjax demo``, the tests,
the benchmarks and the training example.

Generative model (natural logs throughout). Let ``b_g`` be a per-gene baseline
log-abundance, ``e_cg`` the perturbation-specific log-fold change of condition ``c``
(0 for control), ``s_g`` the shared shift (``±shared_shift`` on ``shared_shift_genes``
genes, 0 elsewhere; applied to *every* perturbed cell, never to control) and ``a_lg`` a
small baseline offset of covariate line ``l`` (0 without covariates). The expected
composition of a cell of condition ``c`` in line ``l`` is

    q_lcg = exp(b_g + a_lg + e_cg + 1[c ≠ control]·s_g) / Σ_g' exp(…)

and its counts are negative binomial (gamma–Poisson) with mean ``L_i · q_lcg`` and
variance ``m + dispersion · m²``, where the expected library size of cell ``i`` is
``L_i = mean_counts · exp(σ z_i − σ²/2)``, ``z_i ~ N(0, 1)``, ``σ = library_sigma``.

* Single perturbations are named after their target gene (a real ``var_name``, e.g.
  ``"GENE0012"``); the target is knocked down by ``-knockdown`` (log-fold) and
  ``effect_genes`` other genes move by ``±effect_size · U(0.5, 1.5)``.
* A fraction ``null_fraction`` of singles are *null*: ``e_c = 0`` (no knockdown, no
  effect genes). Their cells differ from control only by the shared shift ``s``.
* A combination ``"A+B"`` has ``e = e_A + e_B + i_AB`` where the interaction ``i_AB`` is
  ``±effect_size · U(0.5, 1.5)`` on one or two genes.
* Targets, effect genes, interaction genes and shift genes are drawn from the 75 % most
  abundant genes (so effects are visible in the counts); effect / interaction genes and
  targets never overlap the shift genes.

The ground truth is in ``adata.uns["simulation"]`` (see :func:`simulate_screen`), and
:func:`population_means` returns the expected per-condition pseudobulk of the
log-normalised data, ``E[ln(1 + 1e4 · x_ig / Σ_g' x_ig')]``.

Randomness: independent :class:`numpy.random.SeedSequence` children of ``seed`` drive
the design (baseline, effects), the cells (group sizes, library sizes, order) and the
counts (one child per fixed-size chunk of cells, sampled on a thread pool). The output
is therefore identical for a given set of arguments whatever the number of threads, and
the design does not change when only cell numbers change.
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.special import gammaln, roots_genlaguerre, roots_hermitenorm

__all__ = ["simulate_screen", "population_means", "log_normalize"]

_UNS_KEY = "simulation"
_ABUNDANT_QUANTILE = 0.25  # targets / effect genes come from genes above this quantile
_BASELINE_SIGMA = 1.2  # sd of the per-gene baseline log-abundance
_COVARIATE_SIGMA = 0.2  # sd of the per-line baseline offset
_HIGH_MEAN = 3.0  # NB entries with mean >= this use gamma–Poisson, others inverse CDF
_CHUNK_ENTRIES = 1 << 21  # cells × genes per sampling chunk


# --------------------------------------------------------------------------------------
# sampling
# --------------------------------------------------------------------------------------


_LOW_STEPS = 6  # inverse-CDF steps fused in the XLA kernel; larger counts finish in numpy


@functools.cache
def _low_kernel(dispersion: float, steps: int, high_mean: float):
    """Jitted CPU kernel: uint8 code per entry of ``m = lib[:, None] · q[rows]``.

    The code is ``#{k < steps : F(k) < u}`` for ``X ~ NB(m, dispersion)`` (so ``X`` itself
    when below ``steps``; ``steps`` means ``X >= steps``, finished by
    :func:`_finish_inverse_cdf`), and 255 where ``m >= high_mean`` (gamma–Poisson entries).
    """
    import jax
    import jax.numpy as jnp

    def kernel(lib, rows, q, u):
        m = lib[:, None] * q[rows]
        if dispersion > 0:
            r = 1.0 / dispersion
            p = jnp.exp(-r * jnp.log1p(dispersion * m))
            ratio = m / (m + r)
        else:
            p = jnp.exp(-m)
            ratio = m
        cdf = p
        x = jnp.zeros(m.shape, jnp.int32)
        for k in range(1, steps + 1):
            x = x + (cdf < u).astype(jnp.int32)
            step = (k - 1 + r) / k if dispersion > 0 else 1.0 / k
            p = p * ratio * step
            cdf = cdf + p
        return jnp.where(m >= high_mean, 255, x).astype(jnp.uint8)

    return jax.jit(kernel)


def _finish_inverse_cdf(m: np.ndarray, u: np.ndarray, dispersion: float) -> np.ndarray:
    """Exact inverse-CDF search ``min{k : F(k) >= u}`` in float64 (for the few long tails)."""
    r = 1.0 / dispersion if dispersion > 0 else np.inf
    m = m.astype(np.float64)
    uu = u.astype(np.float64)
    if dispersion > 0:
        pk = np.exp(-r * np.log1p(dispersion * m))
        ratio = m / (m + r)
    else:
        pk = np.exp(-m)
        ratio = m
    cdf = pk.copy()
    res = np.zeros(m.size, dtype=np.float32)
    active = np.arange(m.size)
    k = 0
    while active.size:
        done = cdf >= uu
        if done.any():
            res[active[done]] = k
            keep = ~done
            active, pk, cdf, uu, ratio = (a[keep] for a in (active, pk, cdf, uu, ratio))
        if k >= 100_000:  # float rounding left u above the summed cdf: take the tail
            res[active] = k
            break
        k += 1
        pk = pk * (ratio * ((k - 1 + r) / k if dispersion > 0 else 1.0 / k))
        cdf += pk
    return res


def _sample_nb_chunk(
    rng: np.random.Generator,
    lib: np.ndarray,
    rows: np.ndarray,
    q: np.ndarray,
    dispersion: float,
    pad_rows: int = 0,
) -> sp.csr_matrix:
    """Negative-binomial counts, mean ``lib[:, None]·q[rows]``, variance ``m + dispersion·m²``.

    Exact and vectorised: one uniform ``u`` per entry; low-mean entries are
    ``F⁻¹(u)`` (inverse CDF via the pmf recurrence, fused in XLA for the first
    ``_LOW_STEPS`` values, float64 numpy beyond); entries with mean ``>= _HIGH_MEAN`` are
    gamma–Poisson draws.
    """
    import jax

    cpu = jax.devices("cpu")[0]
    n, g = rows.size, q.shape[1]
    lib = lib.astype(np.float32)
    u = rng.random((n, g), dtype=np.float32)
    pad = max(0, pad_rows - n)  # padded rows (lib = 0, u = 0) give code 0: fewer compiles
    qpad = np.zeros((1 << max(0, int(np.ceil(np.log2(q.shape[0])))), g), dtype=np.float32)
    qpad[: q.shape[0]] = q
    args = (lib, rows.astype(np.int32), qpad, u)
    if pad:
        args = (
            np.pad(lib, (0, pad)),
            np.pad(args[1], (0, pad)),
            qpad,
            np.pad(u, ((0, pad), (0, 0))),
        )
    args = jax.device_put(args, cpu)
    code = np.asarray(_low_kernel(float(dispersion), _LOW_STEPS, _HIGH_MEAN)(*args))
    code = code[:n].ravel()
    nz = np.flatnonzero(code)
    data = code[nz].astype(np.float32)
    special = np.flatnonzero(code[nz] >= _LOW_STEPS)  # positions within nz
    if special.size:
        cell, gene = np.divmod(nz[special], g)
        m = lib[cell] * q[rows[cell], gene]  # the same float32 product as in the kernel
        high = m >= _HIGH_MEAN
        tail = special[~high]
        if tail.size:
            data[tail] = _finish_inverse_cdf(m[~high], u.ravel()[nz[tail]], dispersion)
        if high.any():
            lam = m[high].astype(np.float64)
            if dispersion > 0:
                r = 1.0 / dispersion
                lam = lam * (rng.standard_gamma(r, size=lam.size) / r)
            data[special[high]] = rng.poisson(lam)
            keep = data != 0
            nz, data = nz[keep], data[keep]
    indptr = np.searchsorted(nz, np.arange(n + 1, dtype=np.int64) * g)
    return sp.csr_matrix((data, (nz % g).astype(np.int32), indptr), shape=(n, g))


def log_normalize(counts: sp.csr_matrix | np.ndarray) -> sp.csr_matrix | np.ndarray:
    """``ln(1 + 1e4 · x_ig / Σ_g' x_ig')`` (docs/metrics.md §1), float32; empty cells stay 0."""
    if sp.issparse(counts):
        x = sp.csr_matrix(counts, dtype=np.float64, copy=True)
        tot = np.asarray(x.sum(axis=1)).ravel()
        scale = np.divide(1e4, tot, out=np.zeros_like(tot), where=tot > 0)
        x.data *= np.repeat(scale, np.diff(x.indptr))
        np.log1p(x.data, out=x.data)
        return x.astype(np.float32)
    x = np.asarray(counts, dtype=np.float64)
    tot = x.sum(axis=1, keepdims=True)
    scale = np.divide(1e4, tot, out=np.zeros_like(tot), where=tot > 0)
    return np.log1p(x * scale).astype(np.float32)


# --------------------------------------------------------------------------------------
# expected log-normalised means
# --------------------------------------------------------------------------------------


def _expected_log1p_cp10k(
    q: np.ndarray, *, mean_counts: float, library_sigma: float, dispersion: float
) -> np.ndarray:
    """``E[ln(1 + 1e4·X/L)]`` for ``X ~ NB(L·q, dispersion)``, ``L`` lognormal, per entry of ``q``.

    The observed library total is replaced by its expectation ``L``. The function of the
    scalar ``q`` is tabulated on a fine log grid (Gauss–Hermite over ``ln L``; an exact NB
    sum for means ≤ 200, Gauss–Laguerre over the gamma rate plus a second-order Poisson
    correction above) and interpolated.
    """
    q = np.asarray(q, dtype=np.float64)
    pos = q[q > 0]
    out = np.zeros(q.shape, dtype=np.float64)
    if pos.size == 0:
        return out
    lo, hi = np.log(pos.min()) - 1e-6, np.log(pos.max()) + 1e-6
    grid = np.exp(np.linspace(lo, hi, 512))
    zn, zw = roots_hermitenorm(16)
    zw = zw / zw.sum()
    lib = mean_counts * np.exp(library_sigma * zn - library_sigma**2 / 2)
    m = grid[:, None] * lib[None, :]  # (grid, nodes)
    c = 1e4 / lib[None, :]
    f = np.zeros_like(m)
    small = m <= 200.0
    if small.any():
        ms_all, cs_all = m[small], np.broadcast_to(c, m.shape)[small]
        order = np.argsort(ms_all)
        vals = np.empty(ms_all.size)
        for b in range(0, order.size, 256):  # blocks of similar means share a support
            sel = order[b : b + 256]
            ms, cs = ms_all[sel], cs_all[sel]
            kmax = int(np.ceil(ms.max() + 20 * np.sqrt(ms.max() + dispersion * ms.max() ** 2))) + 30
            k = np.arange(kmax + 1, dtype=np.float64)
            if dispersion > 0:
                r = 1.0 / dispersion
                logp = (
                    (gammaln(k + r) - gammaln(r) - gammaln(k + 1))[None, :]
                    + r * np.log(r / (r + ms))[:, None]
                    + k[None, :] * np.log(ms / (r + ms))[:, None]
                )
            else:
                logp = k[None, :] * np.log(ms)[:, None] - ms[:, None] - gammaln(k + 1)[None, :]
            vals[sel] = np.sum(np.exp(logp) * np.log1p(cs[:, None] * k[None, :]), axis=1)
        f[small] = vals
    big = ~small
    if big.any():
        mb, cb = m[big], np.broadcast_to(c, m.shape)[big]

        def _pois(lam: np.ndarray, cc: np.ndarray) -> np.ndarray:
            return np.log1p(cc * lam) - cc**2 * lam / (2 * (1 + cc * lam) ** 2)

        if dispersion > 0:
            r = 1.0 / dispersion
            x, w = roots_genlaguerre(48, r - 1)
            w = w / w.sum()
            lam = mb[:, None] * (x[None, :] / r)
            f[big] = np.sum(w * _pois(lam, cb[:, None]), axis=1)
        else:
            f[big] = _pois(mb, cb)
    table = f @ zw
    out[q > 0] = np.interp(np.log(pos), np.log(grid), table)
    return out


# --------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------


def _child(seed: int, *key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=key)))


def simulate_screen(
    *,
    n_perturbations: int = 24,
    n_genes: int = 500,
    cells_per_perturbation: int | tuple[int, int] = 100,
    n_control: int = 300,
    n_combinations: int = 6,
    effect_genes: int = 8,
    effect_size: float = 1.0,
    shared_shift: float = 0.4,
    shared_shift_genes: int = 30,
    null_fraction: float = 0.1,
    mean_counts: float = 2000.0,
    dispersion: float = 0.3,
    key: str = "condition",
    control: str = "control",
    covariate: str | None = None,
    n_covariates: int = 1,
    counts: bool = True,
    seed: int = 0,
    dtype=np.float32,
    knockdown: float = 2.0,
    library_sigma: float = 0.3,
    shuffle: bool = True,
    n_threads: int | None = None,
):
    """Simulate a seeded single-cell perturbation screen with a known ground truth.

    See the module docstring for the generative model. All log-folds are natural logs of
    the expected rates *before* library-size normalisation (so the composition of a cell
    is renormalised to sum 1).

    Args:
      n_perturbations: number of single perturbations (each named after its target gene).
      n_genes: number of genes, named ``GENE0000``, ``GENE0001``, …
      cells_per_perturbation: cells per perturbation (and per covariate line), or an
        inclusive ``(low, high)`` range drawn uniformly per perturbation and line.
      n_control: control cells per covariate line.
      n_combinations: number of ``"A+B"`` double perturbations of distinct singles.
      effect_genes: genes with a specific effect per (non-null) single perturbation,
        besides its knocked-down target.
      effect_size: typical absolute log-fold of those effects (``× U(0.5, 1.5)``).
      shared_shift: absolute log-fold of the shift shared by every perturbed cell.
      shared_shift_genes: number of genes carrying the shared shift (random signs).
      null_fraction: fraction of singles with no effect beyond the shared shift.
      mean_counts: mean expected library size (UMIs per cell).
      dispersion: negative-binomial dispersion ``φ`` (variance ``m + φm²``; 0 is Poisson).
      key: ``obs`` column with the condition labels.
      control: control label.
      covariate: optional ``obs`` column (e.g. ``"cell_type"``) with ``n_covariates``
        lines ``f"{covariate}_{l}"``; every line has its own control cells and its own
        small baseline offset (line 0 has none).
      n_covariates: number of covariate lines (ignored when ``covariate`` is None).
      counts: ``X`` holds raw counts when True, else ``ln(1 + cp10k)``.
      seed: seed of every random draw.
      dtype: dtype of ``X`` and ``layers["counts"]``.
      knockdown: log-fold knock-down of a single perturbation's own target (positive).
      library_sigma: sd of the log expected library size across cells.
      shuffle: shuffle the cell order (seeded) instead of grouping cells by condition.
      n_threads: threads for count sampling (default: CPU count, at most 8). Does not
        change the result.

    Returns:
      AnnData with CSR ``X`` and ``layers["counts"]`` (integer-valued), ``obs[key]``
      (categorical: control, singles, combinations), ``obs["n_counts"]`` (observed
      totals), ``obs["library_size"]`` (expected ``L_i``), optional ``obs[covariate]``,
      and ``uns["simulation"]`` with

      * ``params``: every argument (``covariate`` as ``""`` when None, ``dtype`` as str);
      * ``perturbations`` (P,), ``effects`` (P, G) float32 perturbation-specific
        log-folds (without the shared shift; combinations include their interaction),
        ``targets`` (P,) (``"A+B"`` for combinations), ``is_null`` (P,),
        ``is_combination`` (P,), ``interaction`` (n_combinations, G) float32;
      * ``shared_shift`` (G,) float32 and ``shift_genes`` (names);
      * ``baseline_log_abundance`` (lines, G) float32 (``b + a_l``, unnormalised);
      * ``conditions`` (C,) = control + perturbations, ``covariates`` (lines,);
        ``row_condition`` / ``row_covariate`` (lines·C,) label the rows of
      * ``expected_frequency`` (lines·C, G) float32: ``q_lc``;
      * ``population_means`` (lines·C, G) float32: ``E[ln(1 + 1e4·x/Σx)]`` per condition,
        the expected pseudobulk (observed library total approximated by ``L_i``).

    References:
      The model follows the common gamma–Poisson description of UMI counts (e.g.
      Svensson 2020, Nat. Biotechnol. 38:147) and the "systematic variation" / control
      bias of Perturb-seq screens described by Mejia, Miller et al. 2025
      (arXiv:2506.22641), which the shared shift imitates.
    """
    import anndata as ad

    n_lines = int(n_covariates) if covariate is not None else 1
    cpp = cells_per_perturbation
    cpp_range = (int(cpp[0]), int(cpp[1])) if isinstance(cpp, tuple | list) else (int(cpp),) * 2
    G, P1 = int(n_genes), int(n_perturbations)
    if G < 2:
        raise ValueError("n_genes must be >= 2")
    if P1 < 0 or n_combinations < 0 or n_control < 1 or n_lines < 1:
        raise ValueError("n_perturbations/n_combinations >= 0, n_control >= 1, n_covariates >= 1")
    if not 0 <= cpp_range[0] <= cpp_range[1] or (P1 and cpp_range[1] < 1):
        raise ValueError(f"invalid cells_per_perturbation {cells_per_perturbation!r}")
    if not 0.0 <= null_fraction <= 1.0 or dispersion < 0 or mean_counts <= 0:
        raise ValueError("need 0 <= null_fraction <= 1, dispersion >= 0, mean_counts > 0")
    if n_combinations > P1 * (P1 - 1) // 2:
        raise ValueError(f"n_combinations={n_combinations} > pairs of {P1} singles")

    # ---- design ------------------------------------------------------------------
    rng = _child(seed, 0)
    gene_names = np.array([f"GENE{g:04d}" for g in range(G)])
    base = rng.normal(0.0, _BASELINE_SIGMA, size=G)
    cov_off = rng.normal(0.0, _COVARIATE_SIGMA, size=(n_lines, G))
    cov_off[0] = 0.0
    order = np.argsort(-base, kind="stable")
    pool = order[: max(2, int(np.ceil((1 - _ABUNDANT_QUANTILE) * G)))]
    n_shift = int(shared_shift_genes) if shared_shift != 0 else 0
    if n_shift > pool.size // 2:
        raise ValueError(f"shared_shift_genes={n_shift} > half of the {pool.size} abundant genes")
    shift_idx = np.sort(rng.choice(pool, size=n_shift, replace=False))
    shift = np.zeros(G)
    shift[shift_idx] = shared_shift * rng.choice([-1.0, 1.0], size=n_shift)
    free = np.setdiff1d(pool, shift_idx)
    if P1 > free.size:
        raise ValueError(f"n_perturbations={P1} > {free.size} available target genes")
    if effect_genes > free.size - 1:
        raise ValueError(f"effect_genes={effect_genes} > {free.size - 1} available genes")
    targets = rng.choice(free, size=P1, replace=False)
    n_null = int(round(null_fraction * P1))
    is_null1 = np.zeros(P1, dtype=bool)
    is_null1[rng.choice(P1, size=n_null, replace=False)] = True
    eff1 = np.zeros((P1, G))
    for p in range(P1):  # design only (P draws), not cells
        others = free[free != targets[p]]
        idx = rng.choice(others, size=effect_genes, replace=False)
        val = (
            effect_size
            * rng.uniform(0.5, 1.5, effect_genes)
            * rng.choice([-1.0, 1.0], effect_genes)
        )
        if not is_null1[p]:
            eff1[p, idx] = val
            eff1[p, targets[p]] = -knockdown
    pairs: list[tuple[int, int]] = []
    if n_combinations:
        all_pairs = np.array([(a, b) for a in range(P1) for b in range(a + 1, P1)])
        pairs = [
            tuple(x) for x in all_pairs[rng.choice(len(all_pairs), n_combinations, replace=False)]
        ]
    inter = np.zeros((len(pairs), G))
    for j in range(len(pairs)):
        n_int = int(rng.integers(1, 3))
        idx = rng.choice(free, size=n_int, replace=False)
        inter[j, idx] = effect_size * rng.uniform(0.5, 1.5, n_int) * rng.choice([-1.0, 1.0], n_int)
    single_names = list(gene_names[targets])
    combo_names = [f"{single_names[a]}+{single_names[b]}" for a, b in pairs]
    pert_names = single_names + combo_names
    if control in pert_names:
        raise ValueError(f"control label {control!r} collides with a perturbation name")
    combo_eff = np.array([eff1[a] + eff1[b] for a, b in pairs]).reshape(len(pairs), G) + inter
    eff = np.concatenate([eff1, combo_eff])
    P = len(pert_names)
    conditions = [control, *pert_names]
    C = P + 1

    # expected composition of every (line, condition) row
    logit = np.zeros((C, G))
    logit[1:] = eff + shift
    rows_logit = (base + cov_off)[:, None, :] + logit[None, :, :]  # (lines, C, G)
    rows_logit -= rows_logit.max(axis=2, keepdims=True)
    q = np.exp(rows_logit)
    q /= q.sum(axis=2, keepdims=True)
    q = q.reshape(n_lines * C, G)

    # ---- cells -------------------------------------------------------------------
    crng = _child(seed, 1)
    sizes = np.empty((n_lines, C), dtype=np.int64)
    sizes[:, 0] = n_control
    sizes[:, 1:] = crng.integers(cpp_range[0], cpp_range[1] + 1, size=(n_lines, P))
    row_of_cell = np.repeat(np.arange(n_lines * C), sizes.ravel())
    if shuffle:
        row_of_cell = crng.permutation(row_of_cell)
    N = row_of_cell.size
    lib = mean_counts * np.exp(library_sigma * crng.standard_normal(N) - library_sigma**2 / 2)

    # ---- counts (chunks of cells on a thread pool; one seed child per chunk) ------
    q32 = q.astype(np.float32)
    lib32 = lib.astype(np.float32)
    rows_per_chunk = max(1, min(_CHUNK_ENTRIES // G, 1 << int(np.ceil(np.log2(max(N, 1))))))
    starts = range(0, N, rows_per_chunk)

    def _chunk(j_start: tuple[int, int]) -> sp.csr_matrix:
        j, s = j_start
        e = min(N, s + rows_per_chunk)
        return _sample_nb_chunk(
            _child(seed, 2, j), lib32[s:e], row_of_cell[s:e], q32, dispersion, rows_per_chunk
        )

    workers = n_threads or min(8, os.cpu_count() or 1)
    jobs = list(enumerate(starts))
    if workers > 1 and len(jobs) > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool_ex:
            blocks = list(pool_ex.map(_chunk, jobs))
    else:
        blocks = [_chunk(j) for j in jobs]
    if blocks:
        indptr = np.concatenate(
            [
                [0],
                *[
                    blk.indptr[1:] + off
                    for blk, off in zip(blocks, np.cumsum([0] + [b.nnz for b in blocks[:-1]]))
                ],
            ]
        )
        raw = sp.csr_matrix(
            (
                np.concatenate([blk.data for blk in blocks]),
                np.concatenate([blk.indices for blk in blocks]),
                indptr,
            ),
            shape=(N, G),
        )
    else:
        raw = sp.csr_matrix((0, G), dtype=np.float32)
    raw.has_sorted_indices = True

    # ---- AnnData -------------------------------------------------------------------
    cond_of_row = np.tile(np.arange(C), n_lines)
    line_of_row = np.repeat(np.arange(n_lines), C)
    obs = pd.DataFrame(index=pd.Index([f"cell{i:07d}" for i in range(N)]))
    obs[key] = pd.Categorical.from_codes(cond_of_row[row_of_cell], categories=conditions)
    cov_names = [f"{covariate}_{l}" for l in range(n_lines)] if covariate is not None else []
    if covariate is not None:
        obs[covariate] = pd.Categorical.from_codes(line_of_row[row_of_cell], categories=cov_names)
    obs["n_counts"] = np.asarray(raw.sum(axis=1)).ravel().astype(np.float32)
    obs["library_size"] = lib.astype(np.float32)
    var = pd.DataFrame(index=pd.Index(gene_names))

    raw = raw.astype(dtype, copy=False)
    X = raw.copy() if counts else log_normalize(raw).astype(dtype, copy=False)
    adata = ad.AnnData(X=X, obs=obs, var=var)
    adata.layers["counts"] = raw

    pop = _expected_log1p_cp10k(
        q, mean_counts=mean_counts, library_sigma=library_sigma, dispersion=dispersion
    )
    params = dict(
        n_perturbations=P1,
        n_genes=G,
        cells_per_perturbation=np.array(cpp_range),
        n_control=int(n_control),
        n_combinations=int(n_combinations),
        effect_genes=int(effect_genes),
        effect_size=float(effect_size),
        shared_shift=float(shared_shift),
        shared_shift_genes=n_shift,
        null_fraction=float(null_fraction),
        mean_counts=float(mean_counts),
        dispersion=float(dispersion),
        key=key,
        control=control,
        covariate=covariate or "",
        n_covariates=n_lines,
        counts=bool(counts),
        seed=int(seed),
        dtype=str(np.dtype(dtype)),
        knockdown=float(knockdown),
        library_sigma=float(library_sigma),
        shuffle=bool(shuffle),
    )
    adata.uns[_UNS_KEY] = {
        "params": params,
        "perturbations": np.array(pert_names, dtype=object),
        "effects": eff.astype(np.float32),
        "targets": np.array(single_names + combo_names, dtype=object),
        "is_null": np.concatenate([is_null1, np.zeros(len(pairs), dtype=bool)]),
        "is_combination": np.arange(P) >= P1,
        "interaction": inter.astype(np.float32),
        "shared_shift": shift.astype(np.float32),
        "shift_genes": np.array(gene_names[shift_idx], dtype=object),
        "baseline_log_abundance": (base + cov_off).astype(np.float32),
        "conditions": np.array(conditions, dtype=object),
        "covariates": np.array(cov_names, dtype=object),
        "row_condition": np.array([conditions[c] for c in cond_of_row], dtype=object),
        "row_covariate": np.array(
            [cov_names[l] for l in line_of_row] if cov_names else [""] * C, dtype=object
        ),
        "expected_frequency": q.astype(np.float32),
        "population_means": pop.astype(np.float32),
    }
    return adata


def population_means(adata, *, which: str = "log") -> pd.DataFrame:
    """The simulator's true per-condition means, from ``adata.uns["simulation"]``.

    Args:
      adata: an AnnData made by :func:`simulate_screen` (genes may have been subset).
      which: ``"log"``: expected pseudobulk of the log-normalised data,
        ``E[ln(1 + 1e4·x_ig/Σ_g' x_ig')]`` (what docs/metrics.md §1 calls ``μ_c``);
        ``"frequency"``: expected composition ``q_cg`` (``1e4·q`` is the expected cp10k).

    Returns:
      DataFrame, one row per condition (control first) — indexed by a
      ``(covariate, condition)`` MultiIndex in covariate mode — and one column per gene of
      ``adata.var_names``.
    """
    try:
        sim = adata.uns[_UNS_KEY]
    except KeyError:
        raise KeyError(f"adata.uns[{_UNS_KEY!r}] not found: not made by simulate_screen") from None
    field = {"log": "population_means", "frequency": "expected_frequency"}.get(which)
    if field is None:
        raise ValueError(f"which must be 'log' or 'frequency', got {which!r}")
    genes = [f"GENE{g:04d}" for g in range(int(sim["params"]["n_genes"]))]
    cond = list(sim["row_condition"])
    if sim["params"]["covariate"]:
        index = pd.MultiIndex.from_arrays(
            [list(sim["row_covariate"]), cond], names=[sim["params"]["covariate"], "condition"]
        )
    else:
        index = pd.Index(cond, name="condition")
    df = pd.DataFrame(np.asarray(sim[field]), index=index, columns=genes)
    return df.loc[:, list(adata.var_names)]
