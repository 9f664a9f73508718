"""Seeded synthetic perturbation screens as sparse CSR ``.h5ad`` files, written in chunks.

Memory stays bounded (``O(chunk × G)``) even for 1,000,000 cells × 8,192 genes: obs/var are
written by anndata, then ``X`` is appended chunk by chunk with h5py in anndata's on-disk CSR
layout (group ``X`` with ``data``/``indices``/``indptr`` and ``encoding-type=csr_matrix``).

Model: each cell gets a condition (``control`` ≈ 5% of cells, the rest uniform over
``n_groups − 1`` perturbations, in random cell order); non-zeros are Bernoulli(density) per
gene (column positions drawn as geometric gaps, so no dense mask is built); values are
``log1p``-like positives (or integer counts) plus a per-perturbation shift on 20 genes.

CLI::

    python benchmarks/synth_h5ad.py --cells 1000000 --genes 8192 --groups 2000 --out big.h5ad
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

__all__ = ["make_screen"]


def _labels(n_cells: int, n_groups: int, control: str, rng: np.random.Generator) -> np.ndarray:
    """Codes per cell: 0 = control (~5%, at least 2 cells per group guaranteed)."""
    n_ctrl = max(2, int(0.05 * n_cells)) if n_groups > 1 else n_cells
    rest = n_cells - n_ctrl
    base = np.repeat(np.arange(1, n_groups), 2)  # every perturbation has >= 2 cells
    extra = rng.integers(1, n_groups, size=rest - base.size) if n_groups > 1 else []
    codes = np.concatenate([np.zeros(n_ctrl, np.int64), base, extra]).astype(np.int64)
    return codes[rng.permutation(n_cells)]


def _chunk_csr(rows: int, n_genes: int, density: float, rng: np.random.Generator):
    """indptr (rows+1,), indices: Bernoulli(density) columns via geometric gaps."""
    # expected samples per row: density·G + 6·sd margin; redraw the rare overflowing rows
    per_row = int(density * n_genes + 6 * np.sqrt(n_genes * density * (1 - density)) + 8)
    gaps = rng.geometric(density, size=(rows, per_row))
    cols = np.cumsum(gaps, axis=1) - 1
    short = cols[:, -1] < n_genes
    while short.any():  # extremely rare: extend those rows
        more = np.cumsum(rng.geometric(density, size=(short.sum(), per_row)), axis=1)
        cols = np.concatenate([cols, np.zeros((rows, per_row), cols.dtype) + n_genes], axis=1)
        cols[short, -per_row:] = cols[short, -per_row - 1 : -per_row] + more
        short = cols[:, -1] < n_genes
    keep = cols < n_genes
    counts = keep.sum(axis=1)
    indptr = np.zeros(rows + 1, np.int64)
    np.cumsum(counts, out=indptr[1:])
    return indptr, cols[keep].astype(np.int32)


def make_screen(
    path: str | Path,
    n_cells: int,
    n_genes: int,
    n_groups: int,
    density: float = 0.1,
    seed: int = 0,
    control: str = "non-targeting",
    key: str = "target_gene",
    log_normalised: bool = True,
    chunk_cells: int = 16384,
) -> Path:
    """Write a synthetic screen to ``path`` (sparse CSR float32 X) and return the path.

    Args:
      path: output ``.h5ad``.
      n_cells, n_genes, n_groups: shape; ``n_groups`` includes the control.
      density: fraction of non-zero entries.
      seed: RNG seed (the file is a deterministic function of all arguments).
      control: control label; key: ``obs`` column of the condition.
      log_normalised: positive non-integer values (True) or integer counts (False).
      chunk_cells: rows generated and written at a time.
    """
    import anndata as ad
    import h5py
    import pandas as pd

    path = Path(path)
    rng = np.random.default_rng(seed)
    codes = _labels(n_cells, n_groups, control, rng)
    names = np.array([control] + [f"PERT{i:05d}" for i in range(1, n_groups)], dtype=object)
    width = len(str(n_cells))
    obs = pd.DataFrame(
        {key: pd.Categorical.from_codes(codes, categories=names)},
        index=pd.Index([f"cell{i:0{width}d}" for i in range(n_cells)]),
    )
    var = pd.DataFrame(index=pd.Index([f"GENE{j:05d}" for j in range(n_genes)]))
    ad.AnnData(obs=obs, var=var).write_h5ad(path)  # X absent; appended below
    del obs

    # per-perturbation effects: 20 genes each, shift in [-1, 1.5]
    eff_genes = rng.integers(0, n_genes, size=(n_groups, 20))
    eff_vals = rng.uniform(-1.0, 1.5, size=(n_groups, 20)).astype(np.float32)
    eff_vals[0] = 0.0
    # which effect (1 + its index; 0: none) a (group, gene) pair gets: the first of a
    # group's repeated genes wins, as a search of its 20 genes in order would find it
    # (int8, n_groups x n_genes bytes; looked up per non-zero instead of comparing every
    # non-zero with 20 genes, which was most of the writing time)
    eff_index = np.zeros((n_groups, n_genes), np.int8)
    for j in range(eff_genes.shape[1] - 1, -1, -1):
        eff_index[np.arange(n_groups), eff_genes[:, j]] = j + 1
    with h5py.File(path, "a") as f:
        if "X" in f:
            del f["X"]
        g = f.create_group("X")
        g.attrs["encoding-type"] = "csr_matrix"
        g.attrs["encoding-version"] = "0.1.0"
        g.attrs["shape"] = np.array([n_cells, n_genes], dtype=np.int64)
        cdt = min(1 << 20, max(1, int(n_genes * density * chunk_cells)))
        d_data = g.create_dataset("data", shape=(0,), maxshape=(None,), dtype="f4", chunks=(cdt,))
        d_ind = g.create_dataset("indices", shape=(0,), maxshape=(None,), dtype="i4", chunks=(cdt,))
        indptr = np.zeros(n_cells + 1, np.int64)
        nnz = 0
        for start in range(0, n_cells, chunk_cells):
            stop = min(start + chunk_cells, n_cells)
            ip, cols = _chunk_csr(stop - start, n_genes, density, rng)
            k = cols.size
            row_of = np.repeat(np.arange(stop - start), np.diff(ip))
            cc = codes[start:stop][row_of]
            if log_normalised:
                # capped at ln(1 + 1e4) ≈ 9.2, the largest value a log1p(cp10k) cell can hold
                vals = np.minimum(rng.exponential(1.0, size=k), 9.0).astype(
                    np.float32
                ) + np.float32(0.2)
            else:
                vals = (rng.poisson(2.0, size=k) + 1).astype(np.float32)
            # add the effect where the cell's perturbation targets this column
            eff = eff_index[cc, cols]
            hit = eff > 0
            if hit.any():
                j = eff[hit].astype(np.intp) - 1
                shift = eff_vals[cc[hit], j]
                if log_normalised:
                    vals[hit] = np.maximum(vals[hit] + shift, np.float32(0.05))
                else:
                    vals[hit] = np.maximum(np.round(vals[hit] * np.exp(shift)), 1)
            d_data.resize((nnz + k,))
            d_ind.resize((nnz + k,))
            d_data[nnz:] = vals
            d_ind[nnz:] = cols
            indptr[start + 1 : stop + 1] = nnz + ip[1:]
            nnz += k
        g.create_dataset("indptr", data=indptr)
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", type=int, default=100_000)
    p.add_argument("--genes", type=int, default=2_000)
    p.add_argument("--groups", type=int, default=500)
    p.add_argument("--density", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--counts", action="store_true", help="integer counts instead of log values")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    make_screen(
        a.out, a.cells, a.genes, a.groups, density=a.density, seed=a.seed,
        log_normalised=not a.counts,
    )  # fmt: skip
    size = Path(a.out).stat().st_size / 2**30
    print(f"wrote {a.out}: {a.cells} x {a.genes}, {a.groups} groups, {size:.2f} GiB "
          f"in {time.perf_counter() - t0:.1f} s")  # fmt: skip


if __name__ == "__main__":
    main()
