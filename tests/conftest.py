"""Shared pytest fixtures: paths to the oracle fixtures and to the real data in ../shared."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Tests compile in memory only: no writes to ~/.cache from the persistent compilation cache
# (tests/test_evaluate.py checks the cache itself in a subprocess with its own setting).
os.environ.setdefault("VCJAX_COMPILATION_CACHE", "0")

FIXTURES = Path(__file__).resolve().parent / "fixtures"
SHARED_DATA = Path(os.environ.get("VCJAX_SHARED_DATA", ROOT.parent / "shared" / "data"))


def shared_file(name: str) -> Path:
    """Path of a real dataset in ../shared/data; skip (or fail in CI) when it is absent."""
    path = SHARED_DATA / name
    if not path.exists():
        msg = f"real data file {path} not found (../shared/data is absent)"
        if os.environ.get("VCJAX_REQUIRE_SHARED_DATA") == "1":
            pytest.fail(msg + " and VCJAX_REQUIRE_SHARED_DATA=1")
        pytest.skip(msg)
    return path


@pytest.fixture
def shared_data():
    """Callable fixture: ``shared_data("norman19_perturbench_devel.h5ad") -> Path``."""
    return shared_file


@pytest.fixture(scope="session", params=["ds1_sparse", "ds2_double"])
def fixture_name(request) -> str:
    return request.param


def load_fixture(name: str):
    """(AnnData, dict of expected arrays) for an oracle fixture dataset."""
    import anndata as ad
    import numpy as np

    adata = ad.read_h5ad(FIXTURES / f"{name}.h5ad")
    expected = dict(np.load(FIXTURES / f"{name}_expected.npz", allow_pickle=False))
    return adata, expected


def grouped_adata(
    rng, *, counts=True, n_cells=203, n_genes=37, density=0.3, empty_rows=(5,), dtype=None
):
    """A small sparse CSR screen: six groups of odd and tiny sizes (``g5`` is ``ctrl``,
    shuffled), Poisson counts (``log1p(1.7·x)`` unless ``counts``), all-zero ``empty_rows``,
    a ``batch`` covariate; ``X`` in ``dtype`` (default float64)."""
    import anndata as ad
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp

    sizes = [2, 3, 31, 57, 40, 70]  # total 203
    labels = np.concatenate([[f"g{i}"] * k for i, k in enumerate(sizes)]).astype(object)
    labels[labels == "g5"] = "ctrl"
    labels = labels[rng.permutation(n_cells)]
    vals = rng.poisson(3.0, size=(n_cells, n_genes)).astype(np.float64)
    vals *= rng.random((n_cells, n_genes)) < density
    vals[list(empty_rows)] = 0.0
    if not counts:
        vals = np.log1p(vals * 1.7)
    obs = pd.DataFrame(
        {"cond": pd.Categorical(labels), "batch": rng.choice(["b1", "b2"], n_cells)},
        index=[f"c{i}" for i in range(n_cells)],
    )
    var = pd.DataFrame(index=[f"G{j}" for j in range(n_genes)])
    X = vals if dtype is None else vals.astype(dtype)
    return ad.AnnData(X=sp.csr_matrix(X), obs=obs, var=var)
