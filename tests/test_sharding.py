"""Issue 9: ``engine.score`` sharded over several devices equals one device.

The host platform is split into 4 CPU devices with
``XLA_FLAGS=--xla_force_host_platform_device_count=4``, which must be set before JAX
initialises, so the check runs in a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    r"""
    import json, sys
    import jax, numpy as np
    from jax.sharding import NamedSharding
    from vcjax import engine
    from tests import reference as R

    assert len(jax.devices()) == 4, jax.devices()
    seen = {"in": [], "out": []}
    orig = engine.row_map

    def spy(fn, row_inputs, **kw):
        def wrapped(*chunk):
            seen["in"].append([(type(c.sharding).__name__, len(c.sharding.device_set),
                                str(getattr(c.sharding, "spec", ""))) for c in chunk])
            out = fn(*chunk)
            seen["out"].append([len(v.sharding.device_set) for v in out.values()])
            return out
        return orig(wrapped, row_inputs, **kw)

    engine.row_map = spy
    # the mesh path, which accelerators take; several CPU devices are dealt whole chunks
    # instead (engine._round_robin, checked in test_distributed.py)
    engine._round_robin = lambda devices: None
    rng = np.random.default_rng(0)
    report = {"cases": []}
    # P not divisible by 4 (13, 37), explicit chunk sizes and the default one
    for p, g, chunk in [(13, 40, 8), (37, 40, 16), (6, 4500, None)]:
        truth = rng.normal(size=(p, g)).astype(np.float32)
        pred = truth + rng.normal(scale=0.6, size=(p, g)).astype(np.float32)
        ref = rng.normal(scale=0.2, size=g).astype(np.float32)
        w = (rng.random((p, g)) ** 3).astype(np.float32)
        mask = rng.random((p, g)) < 0.3
        kw = dict(reference=ref, weights=w, mask=mask, k=5, chunk_size=chunk)
        n_in = len(seen["in"])
        multi = engine.score(pred, truth, **kw)
        n_chunks = len(seen["in"]) - n_in
        one = engine.score(pred, truth, devices=jax.devices()[:1], **kw)
        want = R.reference_scores(pred, truth, ref, w, mask, k=5)
        diff = max(float(np.nanmax(np.abs(np.asarray(multi[m]) - np.asarray(one[m]))))
                   for m in multi)
        ref_diff = max(float(np.nanmax(np.abs(np.asarray(multi[m], np.float64) - want[m])))
                       for m in multi)
        nan_same = all(np.array_equal(np.isnan(np.asarray(multi[m])),
                                      np.isnan(np.asarray(one[m]))) for m in multi)
        report["cases"].append(dict(p=p, g=g, chunk=chunk, diff=diff, ref_diff=ref_diff,
                                    nan_same=nan_same, n_chunks=n_chunks,
                                    shapes=[int(np.asarray(v).shape[0]) for v in multi.values()]))
    report["in"] = seen["in"]
    report["out"] = seen["out"]
    print("REPORT " + json.dumps(report))
    """
)


def test_sharded_score_equals_single_device():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("REPORT ")]
    assert res.returncode == 0 and lines, res.stdout + res.stderr
    report = json.loads(lines[0][len("REPORT ") :])

    for case in report["cases"]:
        assert case["nan_same"], case
        assert all(s == case["p"] for s in case["shapes"]), case
        assert case["diff"] <= 1e-6, case  # identical up to float rounding
        assert case["ref_diff"] <= 2e-4, case  # and right (float64 reference)
    # chunks: ceil(13/8) = 2, ceil(37/16) = 3, and P=6 with the default chunk → one chunk of 8
    assert [c["n_chunks"] for c in report["cases"]] == [2, 3, 1]
    # every per-row input of every sharded chunk was a NamedSharding over the 4 devices on
    # its row axis, and so was every output
    sharded_in = [a for chunk in report["in"] for a in chunk]
    assert sharded_in
    multi_in = [a for a in sharded_in if a[1] == 4]
    assert len(multi_in) >= len(sharded_in) // 2  # the single-device runs are the rest
    for kind, n_dev, spec in multi_in:
        assert kind == "NamedSharding" and "rows" in spec, (kind, n_dev, spec)
    assert any(all(n == 4 for n in outs) for outs in report["out"])
    assert np.isfinite([c["diff"] for c in report["cases"]]).all()
