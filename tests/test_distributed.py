"""Multi-host statistics and multi-device results equal the single-process ones."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from vcjax import data as D
from vcjax.distributed import group_stats_distributed, process_rows

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def backed_file(tmp_path_factory):
    from vcjax.simulate import simulate_screen

    a = simulate_screen(
        seed=5, n_perturbations=8, n_genes=160, cells_per_perturbation=30, n_control=60
    )
    path = tmp_path_factory.mktemp("dist") / "screen.h5ad"
    a.write_h5ad(path)
    return path


def test_process_slices_sum_to_the_whole(backed_file):
    """Each process's slice (rows) summed over processes equals one pass over all cells."""
    import anndata as ad

    a = ad.read_h5ad(backed_file, backed="r")
    full = D.group_stats(a, "condition", control="control", chunk_cells=37)
    parts = [
        D.group_stats(
            a,
            "condition",
            control="control",
            chunk_cells=37,
            rows=process_rows(a.n_obs, index=i, count=3),
        )
        for i in range(3)
    ]
    assert (
        sum(
            p.stop - p.start
            for p in [slice(*process_rows(a.n_obs, index=i, count=3)) for i in range(3)]
        )
        == a.n_obs
    )
    np.testing.assert_array_equal(parts[0].n, full.n)  # counts are global on every process
    np.testing.assert_allclose(sum(p.sum for p in parts), full.sum, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sum(p.sumsq for p in parts), full.sumsq, rtol=1e-12, atol=1e-12)
    # one process: the distributed entry point is group_stats
    one = group_stats_distributed(str(backed_file), "condition", control="control", chunk_cells=37)
    np.testing.assert_array_equal(one.sum, full.sum)


def _run_on_devices(code: str, n_devices: int, *args) -> subprocess.CompletedProcess:
    """Run ``python -c code *args`` in a fresh process that sees ``n_devices`` CPU devices.

    The XLA flag must be set before JAX initialises, hence the subprocess.
    """
    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT),
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={n_devices}",
    )
    res = subprocess.run(
        [sys.executable, "-c", code, *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    return res


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_get_the_global_stats(backed_file, tmp_path):
    """Two JAX processes on localhost (CPU): each reads half of the cells, both end with the global sums."""
    port = _free_port()
    script = textwrap.dedent(
        f"""
        import json, sys
        import jax
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address="127.0.0.1:{port}", num_processes=2,
                                   process_id=int(sys.argv[1]))
        from vcjax.distributed import group_stats_distributed
        st = group_stats_distributed({str(backed_file)!r}, "condition", control="control", chunk_cells=50)
        json.dump({{"sum": st.sum.tolist(), "sumsq": st.sumsq.tolist()}}, open(sys.argv[2], "w"))
        """
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    outs = [tmp_path / f"p{i}.json" for i in range(2)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(i), str(outs[i])],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    logs = [p.communicate(timeout=240)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs
    import anndata as ad

    full = D.group_stats(ad.read_h5ad(backed_file, backed="r"), "condition", control="control")
    for out in outs:
        got = json.loads(out.read_text())
        np.testing.assert_allclose(np.array(got["sum"]), full.sum, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(np.array(got["sumsq"]), full.sumsq, rtol=1e-12, atol=1e-12)


def test_evaluate_on_four_devices_equals_one(backed_file, tmp_path):
    """evaluate (and so score) sharded over 4 CPU devices gives the single-device table."""
    code = textwrap.dedent(
        f"""
        import sys, anndata as ad, jax, vcjax
        a = ad.read_h5ad({str(backed_file)!r})
        t = vcjax.evaluate(a, None, key="condition", control="control", chunk_size=8)
        t.to_csv(sys.argv[1], index=False)
        print(jax.device_count())
        """
    )
    out = {}
    for n in (1, 4):
        path = tmp_path / f"t{n}.csv"
        res = _run_on_devices(code, n, path)
        assert res.stdout.strip().splitlines()[-1] == str(n)
        import pandas as pd

        out[n] = pd.read_csv(path, keep_default_na=False, na_values=[""])
    np.testing.assert_array_equal(
        out[1][["perturbation", "metric", "source"]].to_numpy(),
        out[4][["perturbation", "metric", "source"]].to_numpy(),
    )
    np.testing.assert_allclose(
        out[4]["value"].to_numpy(float),
        out[1]["value"].to_numpy(float),
        rtol=1e-5,
        atol=1e-6,
        equal_nan=True,
    )


_BOOT = """
import sys, json, numpy as np, anndata as ad, jax, vcjax
a = ad.read_h5ad(sys.argv[1])
t = vcjax.evaluate(a, None, key="condition", control="control", n_boot=20, seed=1)
out = {"devices": jax.device_count(),
       "boot": t[["value", "ci_low", "ci_high"]].to_numpy(np.float64).tolist(),
       "boot_keys": (t["perturbation"] + "|" + t["metric"] + "|" + t["source"]).tolist()}
json.dump(out, open(sys.argv[2], "w"))
"""


def _one_and_four(backed_file, tmp_path):
    got = {}
    for n in (1, 4):
        path = tmp_path / f"s{n}.json"
        _run_on_devices(_BOOT, n, backed_file, path)
        got[n] = json.loads(path.read_text())
        assert got[n]["devices"] == n
    return got[1], got[4]


_SCORE_DEVICES = """
import sys, json, numpy as np, jax, vcjax
rng = np.random.default_rng(3)
P, G = 37, 160  # 37 rows: chunks of 8 leave a ragged, padded last chunk
pred, truth = rng.normal(size=(P, G)), rng.normal(size=(P, G))
w, ref = rng.uniform(size=(P, G)), rng.normal(size=G)
kw = dict(reference=ref, weights=w, mask=w > 0.5, chunk_size=8)
dealt, put = set(), jax.device_put
def record(x, target=None, *a, **k):  # the devices that row chunks are placed on
    if isinstance(target, jax.Device) and getattr(x, "ndim", 0) == 2:
        dealt.add(target.id)
    return put(x, target, *a, **k)
jax.device_put = record
res = lambda **extra: {m: np.asarray(v, np.float64).tolist()
                       for m, v in vcjax.score(pred, truth, **kw, **extra).items()}
out = {n: res(devices=jax.devices()[:n]) for n in (1, 4)}
out["dealt_to"] = sorted(dealt)
out["default"] = res()
# CPU devices are dealt whole chunks in turn; the mesh path (accelerators) shards each
# chunk over the devices with a NamedSharding: force it here to check it on CPU too
vcjax.engine._round_robin = lambda devices: None
out["mesh"] = res()
out["devices"] = jax.device_count()
json.dump(out, open(sys.argv[1], "w"))
"""


def test_score_on_four_devices_equals_one(tmp_path):
    """vcjax.score over 4 CPU devices gives the single-device values, every metric: chunks
    dealt to the devices in turn (the CPU default), and each chunk sharded over a mesh."""
    path = tmp_path / "score.json"
    _run_on_devices(_SCORE_DEVICES, 4, path)
    got = json.loads(path.read_text())
    assert got["devices"] == 4
    assert got["dealt_to"] == [0, 1, 2, 3]  # 5 chunks of 8 rows: every device got one
    one, four = got["1"], got["4"]
    assert set(one) == set(four) == set(got["default"]) == set(got["mesh"]) and len(one) >= 8
    for m in one:
        a = np.array(one[m], float)
        assert a.shape == (37,) and np.isfinite(a).any()
        for other in (four[m], got["default"][m], got["mesh"][m]):
            np.testing.assert_allclose(
                np.array(other, float), a, rtol=1e-5, atol=1e-6, equal_nan=True, err_msg=m
            )


@pytest.mark.slow
def test_bootstrap_on_four_devices_equals_one(backed_file, tmp_path):
    """evaluate(n_boot=20) over 4 CPU devices: same values and intervals as on one device."""
    one, four = _one_and_four(backed_file, tmp_path)
    assert one["boot_keys"] == four["boot_keys"]
    a, b = np.array(one["boot"], float), np.array(four["boot"], float)
    assert np.isfinite(a[:, 1]).mean() > 0.5  # the intervals exist
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5, equal_nan=True)


_BOOT_SHARDED = """
import sys, json, numpy as np, jax
sys.path.insert(0, sys.argv[2])
from tests.conftest import load_fixture
from vcjax import pipeline as PL
from vcjax.metrics import DEFAULT_METRICS
adata, exp = load_fixture("ds1_sparse")
screen = PL.prepare(adata, key="condition", control="control", normalize=None)
boot = PL.BootSpec(n_boot=10, seed=1, chunk_size=3)
runs = {n: PL.stratum_samples(screen.strata[0], screen.spec, model=np.asarray(exp["pred_noisy"]),
                              metrics=DEFAULT_METRICS, score=PL.ScoreSpec(k=10), boot=boot,
                              devices=jax.devices()[:n])
        for n in (1, 4)}
out = {"devices": jax.device_count(), "chunk4": runs[4]["chunk"],
       "values": {n: {f"{s}|{m}": np.asarray(v, np.float64).tolist()
                      for s, d in r["values"].items() for m, v in d.items()}
                  for n, r in runs.items()}}
json.dump(out, open(sys.argv[1], "w"))
"""


def test_bootstrap_resamples_sharded_over_four_devices(tmp_path):
    """stratum_samples shards each chunk's resamples over 4 CPU devices (shard_map): the
    chunk is rounded up to a multiple of 4 and every resampled value equals one device's."""
    path = tmp_path / "boot.json"
    _run_on_devices(_BOOT_SHARDED, 4, path, Path(__file__).resolve().parents[1])
    got = json.loads(path.read_text())
    assert got["devices"] == 4 and got["chunk4"] == 4
    one, four = got["values"]["1"], got["values"]["4"]
    assert set(one) == set(four) and len(one) >= 80
    for key in one:
        a, b = np.array(one[key], float), np.array(four[key], float)
        assert a.shape[0] == 10  # (n_boot, P)
        np.testing.assert_allclose(b, a, rtol=2e-4, atol=1e-5, equal_nan=True, err_msg=key)


_SWEEP_SHARDED = """
import sys, json, numpy as np, jax
import vcjax
adata = vcjax.simulate_screen(n_perturbations=6, n_genes=60, cells_per_perturbation=16,
                              n_control=40, n_combinations=1, effect_genes=4,
                              shared_shift_genes=6, seed=2)
screen = vcjax.prepare(adata, key="condition", control="control")
(s,) = screen.strata
half = np.asarray(s.baselines["technical_duplicate"])
rng = np.random.default_rng(0)
P, G = list(screen.perturbations), list(screen.genes)
models = {f"m{i}": (P, half + rng.normal(0, 0.1 * i, half.shape), G) for i in range(3)}
runs = {n: vcjax.sweep(screen, models, n_boot=8, seed=3, chunk_size=4, devices=jax.devices()[:n])
        for n in (1, 4)}
out = {"devices": jax.device_count(),
       "resampled": {n: {"|".join(map(str, k)): v.tolist() for k, v in r.resampled.items()}
                     for n, r in runs.items()},
       "ci": {n: r.table["ci_low"].tolist() for n, r in runs.items()}}
json.dump(out, open(sys.argv[1], "w"))
"""


def test_sweep_sharded_over_four_devices(tmp_path):
    """vcjax.sweep with the resamples sharded over 4 CPU devices (models replicated):
    every resampled aggregate and per-perturbation interval equals one device's."""
    path = tmp_path / "sweep.json"
    _run_on_devices(_SWEEP_SHARDED, 4, path)
    got = json.loads(path.read_text())
    assert got["devices"] == 4
    one, four = got["resampled"]["1"], got["resampled"]["4"]
    assert set(one) == set(four) and len(one) >= 40
    for key in one:
        np.testing.assert_allclose(four[key], one[key], rtol=2e-5, atol=1e-6, err_msg=key)
    np.testing.assert_allclose(got["ci"]["4"], got["ci"]["1"], rtol=2e-5, atol=1e-6)
