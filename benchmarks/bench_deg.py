"""Benchmark: vcjax group_stats + rank_genes + weights vs scanpy rank_genes_groups.

Default: 100,000 cells × 2,000 genes × 500 groups (10% non-zeros, CSR in memory); both run
``t-test_overestim_var`` against the rest (control excluded) in the same process, and the
float32 scores are compared. ``--quick``: 20,000 × 1,000 × 100. ``--streaming``: score a
backed 1,000,000 × 8,192 × 2,000-group file (10% nnz, ~6.6 GB on disk) and report wall time
and peak RSS (scanpy is not run: it would need the whole matrix in memory).

Usage::

    python benchmarks/bench_deg.py --quick
    python benchmarks/bench_deg.py
    python benchmarks/bench_deg.py --streaming --file /tmp/screen_1m.h5ad
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from synth_h5ad import make_screen  # noqa: E402

from vcjax import data  # noqa: E402
from vcjax import stats as deg  # noqa: E402

KEY, CONTROL = "target_gene", "non-targeting"


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def run_vcjax(adata, chunk_cells: int = 16384):
    t0 = time.perf_counter()
    st = data.group_stats(adata, KEY, control=CONTROL, chunk_cells=chunk_cells)
    t1 = time.perf_counter()
    res = deg.rank_genes(st)
    w = res.weights()
    t2 = time.perf_counter()
    return res, w, t1 - t0, t2 - t1


def bench_in_memory(cells, genes, groups, density, tmpdir, skip_scanpy=False):
    import anndata as ad

    path = Path(tmpdir) / f"screen_{cells}x{genes}x{groups}.h5ad"
    t0 = time.perf_counter()
    make_screen(path, cells, genes, groups, density=density, seed=0)
    print(f"data: {cells} cells x {genes} genes x {groups} groups, density {density} "
          f"(generated in {time.perf_counter() - t0:.1f} s)")  # fmt: skip
    adata = ad.read_h5ad(path)
    adata.X = adata.X.astype(np.float64)  # scanpy and vcjax read the same float64 CSR

    res, w, t_stats, t_de = run_vcjax(adata)  # cold: includes jit compilation for (P, G)
    print(f"vcjax  cold: group_stats {t_stats:7.2f} s | rank_genes+weights {t_de:6.2f} s")
    res, w, t_stats, t_de = run_vcjax(adata)
    t_vc = t_stats + t_de
    print(f"vcjax  warm: group_stats {t_stats:7.2f} s | rank_genes+weights {t_de:6.2f} s | "
          f"total {t_vc:7.2f} s")  # fmt: skip
    if skip_scanpy:
        return
    import scanpy as sc

    sub = adata[adata.obs[KEY] != CONTROL].copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tiny = sub[sub.obs[KEY].isin(sub.obs[KEY].cat.categories[1:4])].copy()  # numba warm-up
        sc.tl.rank_genes_groups(tiny, KEY, method="t-test_overestim_var", use_raw=False)
        t0 = time.perf_counter()
        sc.tl.rank_genes_groups(
            sub, KEY, method="t-test_overestim_var", reference="rest", use_raw=False,
            n_genes=genes,
        )  # fmt: skip
        t_sc = time.perf_counter() - t0
    rg = sub.uns["rank_genes_groups"]
    gidx = {g: j for j, g in enumerate(sub.var_names)}
    ref = np.empty(res.scores.shape, np.float32)
    for i, nm in enumerate(res.names):
        ref[i, [gidx[g] for g in rg["names"][nm]]] = rg["scores"][nm]
    exact = np.mean(ref == res.scores)
    rel = np.max(np.abs(ref.astype(float) - res.scores) / np.maximum(np.abs(ref), 1e-12))
    print(f"scanpy rank_genes_groups {t_sc:7.2f} s")
    print(f"speed-up vcjax vs scanpy: {t_sc / t_vc:6.1f}x   "
          f"(scores bit-identical: {exact:.6f}, max rel diff {rel:.1e})")  # fmt: skip


def bench_streaming(path: Path, cells, genes, groups, density, chunk_cells):
    if not path.exists():
        print(f"generating {path} in a subprocess ...", flush=True)
        t0 = time.perf_counter()
        subprocess.run(
            [sys.executable, str(ROOT / "benchmarks" / "synth_h5ad.py"), "--cells", str(cells),
             "--genes", str(genes), "--groups", str(groups), "--density", str(density),
             "--out", str(path)],
            check=True,
        )  # fmt: skip
        print(f"generated in {time.perf_counter() - t0:.0f} s")
    adata = data.read_h5ad(path, backed=True)
    print(f"backed file {path} ({path.stat().st_size / 2**30:.2f} GiB): {adata.shape}, "
          f"nnz {adata.X.group['data'].shape[0]:,}")  # fmt: skip
    rss0 = peak_rss_gib()
    res, w, t_stats, t_de = run_vcjax(adata, chunk_cells=chunk_cells)
    print(f"streaming group_stats {t_stats:7.1f} s | rank_genes+weights {t_de:5.1f} s | "
          f"total {t_stats + t_de:7.1f} s")  # fmt: skip
    print(f"peak RSS {peak_rss_gib():.2f} GiB (before scoring {rss0:.2f} GiB); "
          f"result {res.scores.shape}, weights sum {float(w.sum()):.1f}")  # fmt: skip


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="20,000 x 1,000 x 100")
    p.add_argument("--streaming", action="store_true")
    p.add_argument("--cells", type=int)
    p.add_argument("--genes", type=int)
    p.add_argument("--groups", type=int)
    p.add_argument("--density", type=float, default=0.1)
    p.add_argument("--chunk-cells", type=int, default=16384)
    p.add_argument("--file", default=os.path.join(tempfile.gettempdir(), "vcjax_screen_1m.h5ad"))
    p.add_argument("--no-scanpy", action="store_true")
    a = p.parse_args(argv)
    if a.streaming:
        dims = (1_000_000, 8_192, 2_000)
    elif a.quick:
        dims = (20_000, 1_000, 100)
    else:
        dims = (100_000, 2_000, 500)
    cells, genes, groups = (
        x if x is not None else d for x, d in zip((a.cells, a.genes, a.groups), dims, strict=True)
    )
    import jax

    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPUs")
    if a.streaming:
        bench_streaming(Path(a.file), cells, genes, groups, a.density, a.chunk_cells)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            bench_in_memory(cells, genes, groups, a.density, tmp, skip_scanpy=a.no_scanpy)


if __name__ == "__main__":
    main()
