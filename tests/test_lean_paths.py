"""The memory-saving paths give the values of the paths they replace.

The point estimate derives without its (C, G) means and holds no baseline matrix
(``_derive_host``, ``HostBaselines``); the DEG tests of all cells read the halves' sums
added row by row; scoring streams each baseline chunk by chunk and reads a prediction once
for all its engine calls (``engine.score_groups``); ``evaluate`` without intervals
releases the sums of squares. Each is held here to the whole-array form it replaces:
bit for bit where the operations are the same, within 1e-12 in float64 otherwise.
"""

from __future__ import annotations

import jax
import numpy as np
import pandas as pd
import pytest

import vcjax
from vcjax import VcjaxInputError, engine
from vcjax.metrics import DEFAULT_METRICS, METRICS
from vcjax.pipeline import _derive as DV
from vcjax.pipeline._baselines import HostBaselines
from vcjax.pipeline._evaluate import as_screen, score_screen
from vcjax.pipeline._spec import ScoreSpec
from vcjax.stats import t_test_vs_rest_host

KW = dict(key="condition", control="control", normalize=None)


@pytest.fixture(scope="module")
def adata():
    # combinations, so that the additive baseline has rows
    return vcjax.simulate_screen(
        n_perturbations=9, n_genes=70, cells_per_perturbation=12, n_control=40,
        n_combinations=3, effect_genes=6, shared_shift_genes=8, seed=5,
    )  # fmt: skip


@pytest.fixture(scope="module")
def stratum(adata):
    screen = vcjax.prepare(adata, **KW)
    (s,) = screen.strata
    return screen, s


@pytest.mark.parametrize("reference", ["perturbed", "control", "perturbed_cells"])
@pytest.mark.parametrize("weights_from", ["all", "half1"])
def test_lean_derivation_equals_the_resample_form_bit_for_bit(adata, reference, weights_from):
    """derive over NumPy (b = 1) = derive_arrays (the (b, C, G) form) exactly: truth,
    references, u vectors, DEG arrays and every baseline, rows or whole."""
    screen = vcjax.prepare(adata, reference=reference, weights_from=weights_from, **KW)
    (s,) = screen.strata
    plan, fixed = s.plan(screen.spec), s.fixed(screen.spec)
    lean = DV.derive(s.sums(), plan, fixed)
    full = DV.derive_arrays(s.sums(), plan, fixed, xp=np)
    assert isinstance(lean.baselines, HostBaselines)
    assert not isinstance(full.baselines, HostBaselines)
    for name in ("truth", "reference", "u_ntc", "u_all_full", "u_all_half1", "weights"):
        np.testing.assert_array_equal(getattr(lean, name), getattr(full, name), err_msg=name)
    for name in DV.DEG._fields:
        np.testing.assert_array_equal(getattr(lean.deg, name), getattr(full.deg, name))
    assert list(lean.baselines) == list(full.baselines)
    assert "additive" in full.baselines and np.isfinite(full.baselines["additive"]).any()
    for name, want in full.baselines.items():
        np.testing.assert_array_equal(lean.baselines[name], want, err_msg=name)
        src = lean.baselines.source(name)
        np.testing.assert_array_equal(np.asarray(src), want[0], err_msg=name)
        for r0, r1 in ((0, 1), (2, 7), (5, len(s.perturbations))):
            np.testing.assert_array_equal(
                lean.baselines.block(name, r0, r1), want[0, r0:r1], err_msg=name
            )


def test_deg_tests_read_the_added_halves_like_their_sum(stratum):
    """The DEG step of all cells (halves added row by row) = t-tests on the summed sums."""
    screen, s = stratum
    h1, h2 = s.stats.half1, s.stats.half2
    rows = np.asarray(s.plan(screen.spec).rows)
    scores, _, padj, lfc = t_test_vs_rest_host(
        h1.n + h2.n, h1.sum + h2.sum, h1.sumsq + h2.sumsq, rows, method=screen.spec.deg_method
    )
    np.testing.assert_array_equal(s.scores, scores)
    np.testing.assert_array_equal(s.pvals_adj, padj)
    np.testing.assert_array_equal(s.deg_mask, (padj < DV.DEG_ALPHA) & (lfc != 0))


def test_score_groups_equals_separate_score_calls():
    """One pass under several references/weightings = one score call each (same compiled
    chunk functions), with a Rows prediction fetched chunk by chunk and a ragged last chunk."""
    rng = np.random.default_rng(0)
    P, G = 37, 50
    pred = rng.normal(size=(P, G))
    truth = rng.normal(size=(P, G))
    weights = rng.uniform(size=(P, G)).astype(np.float32)
    topk = np.abs(rng.normal(size=(P, G))).astype(np.float32)
    mask = rng.uniform(size=(P, G)) < 0.3
    ref, ctrl = rng.normal(size=G), rng.normal(size=G)
    groups = [
        dict(reference=ref, weights=weights, mask=mask, metrics=["mse", "wmse", "pearson_delta"]),
        dict(reference=ref, weights=topk, metrics=["pearson_delta_topk"]),
        dict(reference=ctrl, metrics=["pearson_delta", "mse"]),
    ]
    fetched = []

    def fetch(r0, r1):
        fetched.append((r0, r1))
        return pred[r0:r1]

    lazy = engine.Rows(fetch, (P, G), np.float64)
    got = engine.score_groups(lazy, truth, groups, chunk_size=8, k=5)
    assert sorted(set(fetched)) == [(r, min(r + 8, P)) for r in range(0, P, 8)]
    assert len(fetched) == 5  # each chunk once for all three groups
    for g, group in enumerate(groups):
        want = engine.score(pred, truth, chunk_size=8, k=5, **group)
        assert set(got[g]) == set(want)
        for name in want:
            np.testing.assert_array_equal(got[g][name], want[name], err_msg=f"{g} {name}")


def _old_path_values(s, spec, chunk_size):
    """Every baseline materialised and scored whole, one engine call per reference (the
    path scoring took before baselines were streamed), float64 under x64."""
    wdt = np.float64
    out = {}
    for source, pred in ((k, np.asarray(v)) for k, v in s.baselines.items()):
        res = {}
        for m in DEFAULT_METRICS:
            spec_m = METRICS[m]
            ref = s.u_ntc if spec_m.reference == "control" else s.reference
            weights = np.abs(s.scores) if m == "pearson_delta_topk" else s.weights
            got = engine.score(
                pred.astype(wdt),
                s.truth.astype(wdt),
                reference=ref,
                weights=weights.astype(wdt)
                if "weights" in spec_m.needs or m == "pearson_delta_topk"
                else None,
                mask=s.deg_mask if "mask" in spec_m.needs else None,
                metrics=[spec_m.kernel],
                chunk_size=chunk_size,
            )
            res[m] = np.asarray(got[spec_m.kernel], np.float64)
        out[source] = res
    return out


def test_streamed_baselines_score_like_whole_ones_in_float64(adata):
    """The evaluation table (baselines streamed as Rows, one pass per source, small
    ragged chunks) = each materialised baseline scored whole per metric, to 1e-12."""
    with jax.enable_x64(True):
        screen = vcjax.prepare(adata, **KW)
        (s,) = screen.strata
        table = score_screen(screen, None, ScoreSpec(gate=False, chunk_size=4))
        want = _old_path_values(s, screen.spec, chunk_size=16)
    assert set(table["source"]) == set(s.baselines)
    for source, res in want.items():
        for metric, values in res.items():
            rows = table[(table["source"] == source) & (table["metric"] == metric)]
            np.testing.assert_allclose(
                rows["value"].to_numpy(float), values, rtol=1e-12, atol=1e-12,
                err_msg=f"{source} {metric}",
            )  # fmt: skip


def test_a_scoring_only_screen_scores_the_same_and_is_not_saved(adata, tmp_path):
    """evaluate without intervals releases the sums of squares: the same table, NaN views
    in their place, and such a screen refuses to be saved."""
    full = as_screen(adata, seed=0, **KW)
    lean = as_screen(adata, seed=0, keep_sumsq=False, **KW)
    assert lean.scoring_only and not full.scoring_only
    for half in (lean.strata[0].stats.half1, lean.strata[0].stats.half2):
        assert half.sumsq.strides == (0, 0) and np.isnan(half.sumsq).all()
    score = ScoreSpec()
    perts = list(full.perturbations)
    pred = (perts, np.asarray(full.strata[0].truth) + 0.05, list(full.genes))
    a = score_screen(full, vcjax.pipeline.align(pred, full), score)
    b = score_screen(lean, vcjax.pipeline.align(pred, lean), score)
    pd.testing.assert_frame_equal(a, b)
    table = vcjax.evaluate(adata, pred, **KW)
    pd.testing.assert_frame_equal(table.reset_index(drop=True), a.reset_index(drop=True))
    with pytest.raises(VcjaxInputError, match="prepared by evaluate"):
        lean.save(tmp_path / "lean.vcjax")
