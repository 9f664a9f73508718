"""Predictions on another scale than the truth, and the forms a prediction comes in.

The scale evidence (``vcjax.data.scale_evidence``) against NumPy; ``check_scale`` on
``evaluate``/``sweep``/the CLI (error by default, warn, off); what was done to each input in
``table.attrs["inputs"]``; backed, path, list/sparse predictions; extra perturbations and
genes named in one warning; correct predictions (the simulator, and each real screen's
own other half) never trip the check.
"""

from __future__ import annotations

import json
import warnings
import zipfile

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from typer.testing import CliRunner

import vcjax
from vcjax import VcjaxInputError
from vcjax.data import ScaleEvidence, compare_scales, scale_evidence
from vcjax.pipeline import align

KW = dict(key="condition", control="control")
SIM = dict(
    n_perturbations=6,
    n_genes=60,
    cells_per_perturbation=24,
    n_control=40,
    n_combinations=1,
    shared_shift_genes=6,
    effect_genes=4,
)


def _log_norm(X) -> np.ndarray:
    X = X.toarray() if sp.issparse(X) else np.asarray(X, dtype=np.float64)
    X = np.asarray(X, dtype=np.float64)
    tot = X.sum(axis=1, keepdims=True)
    return np.log1p(np.divide(1e4 * X, tot, out=np.zeros_like(X), where=tot > 0))


@pytest.fixture(scope="module")
def sim():
    """(raw-count AnnData, its Screen, the other half's log1p pseudobulk as a tuple)."""
    adata = vcjax.simulate_screen(seed=0, **SIM)
    with pytest.warns(UserWarning, match="truth cells look like raw counts"):
        screen = vcjax.prepare(adata, **KW)
    (s,) = screen.strata
    half = np.asarray(s.baselines["technical_duplicate"], np.float64)
    return adata, screen, (list(s.perturbations), half, list(s.genes))


def _scale_warnings(w) -> list[str]:
    return [str(x.message) for x in w if "scale mismatch" in str(x.message)]


# ------------------------------------------------------------------------------ the evidence


def test_scale_evidence_against_numpy_dense_csr_and_backed(tmp_path):
    rng = np.random.default_rng(0)
    counts = rng.negative_binomial(2, 0.3, size=(300, 40)).astype(np.float64)
    counts[:, 0] += 1  # no empty cell
    logn = _log_norm(counts)
    z = (logn - logn.mean(0)) / logn.std(0)
    lin = 1e4 * counts / counts.sum(1, keepdims=True)
    for X, kind in ((counts, "counts"), (logn, "log1p"), (z, "centred"), (lin, "linear")):
        ref_nz = X[X != 0]
        neg = -ref_nz[ref_nz < 0].sum() / np.abs(ref_nz).sum()
        tot = X.sum(1)
        for M in (X, sp.csr_matrix(X)):
            e = scale_evidence(M)
            assert e.kind == kind, (kind, e)
            assert e.n_rows == 300 and e.max == X.max() and e.min == X.min()
            assert e.frac_integer == np.mean(ref_nz == np.round(ref_nz))
            np.testing.assert_allclose(e.negative_share, neg, rtol=1e-12)
            if kind != "centred":  # (totals about 0: their CV is rounding)
                np.testing.assert_allclose(
                    e.total_spread, tot.std() / tot.mean(), rtol=1e-9, atol=1e-12
                )
        path = tmp_path / f"{kind}.h5ad"
        for M in (X, sp.csr_matrix(X)):
            ad.AnnData(M).write_h5ad(path)
            backed = ad.read_h5ad(path, backed="r")
            got, want = scale_evidence(backed.X).to_dict(), scale_evidence(X).to_dict()
            for f in ("total_spread", "expm1_total_spread"):  # sparse and dense row sums
                a, b = got.pop(f), want.pop(f)
                if a is None or b is None:  # NaN
                    assert a is b
                elif kind != "centred":
                    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
            assert got == want
            backed.file.close()
    # linear-scale totals are constant; expm1 totals of log1p over these genes too
    assert scale_evidence(lin).total_spread < 1e-9
    assert scale_evidence(logn).expm1_total_spread < 1e-9
    # a sample of blocks, never the whole matrix: 16 blocks of max_values // G // 16 rows
    e = scale_evidence(sp.csr_matrix(counts), max_values=16 * 40 * 5)
    assert e.n_rows == 80 and e.n_total_rows == 300 and e.kind == "counts"
    # pseudobulk rows have no per-cell totals
    assert np.isnan(scale_evidence(logn[:6], form="pseudobulk").total_spread)


def test_compare_scales_names_the_evidence():
    rng = np.random.default_rng(1)
    counts = rng.poisson(30.0, size=(50, 30)).astype(float)
    counts[0, 0] = 3412
    logn = _log_norm(counts)
    truth = scale_evidence(logn)
    msg = compare_scales(truth, scale_evidence(counts, form="pseudobulk"))
    assert msg.startswith("prediction max 3,412 and 100% integers (raw counts?) vs truth max ")
    assert "(log1p-normalised)" in msg
    assert compare_scales(truth, scale_evidence(logn[:5] + 0.01, form="pseudobulk")) is None
    normalised = scale_evidence(counts, normalization="log1p_cp10k")
    assert normalised.scored_kind == "log1p" and compare_scales(normalised, truth) is None
    assert "log1p-normalised by vcjax from raw counts" in compare_scales(
        normalised, scale_evidence(np.expm1(logn))
    )
    # all-zero predictions are no evidence
    assert compare_scales(truth, scale_evidence(np.zeros((3, 30)))) is None
    # a JSON round trip (the screen file) keeps every field, NaN included
    for e in (truth, scale_evidence(logn[:4], form="pseudobulk")):
        back = ScaleEvidence.from_dict(json.loads(json.dumps(e.to_dict())))
        assert back.to_dict() == e.to_dict()


# ------------------------------------------------------------------------- check_scale


def test_linear_prediction_is_an_error_naming_evidence_and_override(sim):
    _, screen, (P, half, G) = sim
    linear = np.expm1(half)
    with pytest.raises(VcjaxInputError) as info:
        vcjax.evaluate(screen, (P, linear, G))
    msg = str(info.value)
    assert "\n" not in msg
    assert f"prediction max {linear.max():,.0f} (linear scale" in msg
    assert "truth log1p-normalised by vcjax from raw counts (max " in msg
    assert "check_scale='warn'" in msg and "--check-scale warn" in msg
    # sweep: the same check, per model
    with pytest.raises(VcjaxInputError, match="model 'lin': scale mismatch: prediction max"):
        vcjax.sweep(screen, {"ok": (P, half, G), "lin": (P, linear, G)})
    with pytest.raises(VcjaxInputError, match="check_scale must be one of"):
        vcjax.evaluate(screen, (P, half, G), check_scale="loud")


def test_warn_gives_a_warning_and_the_scores(sim):
    _, screen, (P, half, G) = sim
    linear = (P, np.expm1(half), G)
    with pytest.warns(UserWarning, match=r"scale mismatch: prediction max [\d,]+ \(linear"):
        warned = vcjax.evaluate(screen, linear, check_scale="warn")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        off = vcjax.evaluate(screen, linear, check_scale="off")
    pd.testing.assert_frame_equal(warned, off)
    model = warned[(warned.source == "model") & (warned.metric == "mse")]
    want = ((np.expm1(half) - screen.strata[0].truth) ** 2).mean(1)
    np.testing.assert_allclose(model["value"].to_numpy(), want, rtol=1e-5)
    assert warned.attrs["inputs"]["prediction"]["kind"] == "linear"
    res = vcjax.sweep(screen, {"lin": linear}, check_scale="off")
    assert res.models == ["lin"]


def test_raw_count_predictions(sim):
    adata, screen, (P, half, G) = sim
    counts = adata.X
    lab = adata.obs["condition"].astype(str).to_numpy()
    sums = np.stack([np.asarray(counts[lab == p].sum(0)).ravel() for p in P])
    # one row per perturbation of raw counts: never normalised, so an error
    with pytest.raises(VcjaxInputError, match=r"prediction max [\d,]+ and 100% integers"):
        vcjax.evaluate(screen, (P, sums, G))
    # predicted cells of raw counts: normalised as the truth, said, and recorded
    cells = adata[np.isin(lab, P)].copy()
    with pytest.warns(UserWarning, match="predicted cells look like raw counts") as w:
        table = vcjax.evaluate(screen, cells)
    assert not _scale_warnings(w)
    rec = table.attrs["inputs"]
    assert rec["prediction"]["normalization"] == "log1p_cp10k"
    assert rec["prediction"]["kind"] == "counts" and rec["prediction"]["pseudobulked"]
    assert rec["prediction"]["max"] == float(np.max(cells.X.toarray()))
    assert rec["truth"]["normalization"] == "log1p_cp10k" and rec["truth"]["kind"] == "counts"
    json.dumps(rec)  # JSON-safe (parquet metadata)
    # the scores are those of the cells normalised by hand (NumPy), given as they are
    by_hand = ad.AnnData(_log_norm(cells.X), obs=cells.obs.copy(), var=cells.var.copy())
    want = vcjax.evaluate(screen, by_hand, pred_normalize=None)
    np.testing.assert_allclose(table["value"], want["value"], rtol=1e-6, atol=1e-9)
    # pred_normalize=None on raw counts: the scale check catches it
    with pytest.raises(VcjaxInputError, match=r"and 100% integers \(raw counts\?\) vs truth"):
        vcjax.evaluate(screen, cells, pred_normalize=None)


def test_z_scored_truth_against_log_prediction():
    adata = vcjax.simulate_screen(seed=1, counts=False, **SIM)
    X = adata.X.toarray()
    z = ad.AnnData((X - X.mean(0)) / (X.std(0) + 1e-12), obs=adata.obs.copy(), var=adata.var)
    screen_z = vcjax.prepare(z, **KW)
    assert screen_z.scale.kind == "centred" and screen_z.normalization == "none"
    screen = vcjax.prepare(adata, **KW)
    (s,) = screen.strata
    pred = (list(s.perturbations), s.baselines["technical_duplicate"], list(s.genes))
    align(pred, screen)  # log against log: fine
    with pytest.raises(VcjaxInputError, match=r"vs truth min -[\d.]+, \d+% of the mass negative"):
        align(pred, screen_z)
    # and a centred prediction against the log truth
    (sz,) = screen_z.strata
    with pytest.raises(VcjaxInputError, match=r"prediction min -[\d.]+, \d+% of the mass neg"):
        align((pred[0], sz.baselines["technical_duplicate"], pred[2]), screen)


def test_correct_predictions_never_warn_on_the_simulator(sim):
    adata, screen, (P, half, G) = sim
    rng = np.random.default_rng(0)
    lab = adata.obs["condition"].astype(str).to_numpy()
    half_cells = adata[(screen.strata[0].cells.half == 1) & np.isin(lab, P)].copy()
    log_cells = ad.AnnData(_log_norm(half_cells.X), obs=half_cells.obs, var=half_cells.var)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for pred in (
            (P, half, G),
            (P, half + rng.normal(0, 0.5, half.shape), G),  # a poor model on the right scale
            (P, np.broadcast_to(screen.strata[0].u_all_full, half.shape), G),
            log_cells,
        ):
            align(pred, screen)
        vcjax.sweep(screen, {"a": (P, half, G)}, n_boot=0)


def test_shallow_raw_count_truth_kept_as_counts_accepts_its_count_means():
    """Count means of a shallow screen (max < 20) look like log1p means; against a truth
    kept as raw counts they agree with its own pseudobulks, so they pass."""
    adata = vcjax.simulate_screen(seed=2, mean_counts=30, **SIM)
    screen = vcjax.prepare(adata, normalize=None, **KW)
    (s,) = screen.strata
    h1 = s.stats.half1
    means = h1.mean[[list(h1.names).index(p) for p in s.perturbations]]
    ev = scale_evidence(means, form="pseudobulk")
    assert screen.scale.kind == "counts" and ev.kind == "log1p" and ev.max < 20
    assert compare_scales(screen.scale, ev) is not None  # the cells alone would object
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        align((list(s.perturbations), means, list(s.genes)), screen)


@pytest.mark.parametrize(
    "name, key, control, covariate",
    [
        ("norman19_perturbench_devel.h5ad", "condition", "control", None),
        ("mcfaline23_perturbench_devel.h5ad", "condition", "control", "cell_type"),
        ("papalexi21_thp1_eccite_sceptredata.h5ad", "perturbation", "non-targeting", None),
        ("datlinger21_jurkat_scperturb_test.h5ad", "perturbation", "control", "stimulation"),
    ],
)
def test_real_screens_own_other_half_never_trips(shared_data, name, key, control, covariate):
    adata = ad.read_h5ad(shared_data(name))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        screen = vcjax.prepare(adata, key=key, control=control, covariate=covariate)
    raw = screen.scale.kind == "counts"
    assert screen.scale.kind == ("counts" if raw else "log1p")
    half1 = []
    for s in screen.strata:
        h1 = s.stats.half1
        rows = [list(h1.names).index(p) for p in s.perturbations]
        obs = {key: list(s.perturbations)}
        if covariate:
            obs[covariate] = [s.covariate] * len(rows)
        half1.append(pd.DataFrame(obs).assign(_m=list(h1.mean[rows])))
    df = pd.concat(half1, ignore_index=True)
    bulk = ad.AnnData(np.stack(df.pop("_m")), obs=df.set_index(df.index.astype(str)))
    bulk.var_names = list(screen.genes)
    cells = adata[screen.strata[0].cells.half == 1].copy()
    for pred, pred_normalize in ((bulk, "auto"), (cells, "auto")):
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            got = align(pred, screen, normalize=pred_normalize)
        assert not _scale_warnings(w)
        assert got.normalization == ("log1p_cp10k" if raw and pred is cells else "none")
    linear = ad.AnnData(np.expm1(bulk.X), obs=bulk.obs, var=bulk.var)
    with pytest.raises(VcjaxInputError, match=r"scale mismatch: prediction max [\d.,]+ \(linear"):
        align(linear, screen)
    if raw:  # the truth kept as raw counts: its own raw-count halves agree with it
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            screen = vcjax.prepare(adata, key=key, control=control, normalize=None)
        (s,) = screen.strata
        h1 = s.stats.half1
        rows = [list(h1.names).index(p) for p in s.perturbations]
        align((list(s.perturbations), h1.mean[rows], list(s.genes)), screen)
        align(cells, screen, normalize=None)


# -------------------------------------------------------------------------- input forms


def test_backed_prediction_equals_in_memory_bit_for_bit(sim, tmp_path):
    adata, screen, (P, half, G) = sim
    lab = adata.obs["condition"].astype(str).to_numpy()
    keep = (screen.strata[0].cells.half == 1) & np.isin(lab, P)
    cells = ad.AnnData(
        _log_norm(adata.X[keep]).astype(np.float32), obs=adata.obs[keep].copy(), var=adata.var
    )
    bulk = ad.AnnData(half, obs=pd.DataFrame({"condition": P}, index=P), var=adata.var)
    for pred in (cells, bulk):
        ref = vcjax.evaluate(screen, pred)
        for X in (pred.X, sp.csr_matrix(pred.X)):
            path = tmp_path / "pred.h5ad"
            ad.AnnData(X, obs=pred.obs, var=pred.var).write_h5ad(path)
            backed = ad.read_h5ad(path, backed="r")
            got = vcjax.evaluate(screen, backed)
            backed.file.close()
            pd.testing.assert_frame_equal(got, ref)


def test_path_prediction_equals_the_object(sim, tmp_path):
    adata, screen, (P, half, G) = sim
    df = pd.DataFrame(half, index=P, columns=G)
    ref = vcjax.evaluate(screen, df)
    ad.AnnData(half, obs=pd.DataFrame({"condition": P}, index=P), var=adata.var).write_h5ad(
        tmp_path / "p.h5ad"
    )
    df.to_csv(tmp_path / "p.csv")
    df.to_parquet(tmp_path / "p.parquet")
    for name in ("p.h5ad", "p.csv", "p.parquet"):
        for path in (tmp_path / name, str(tmp_path / name)):
            pd.testing.assert_frame_equal(vcjax.evaluate(screen, path), ref, check_exact=False)
    with pytest.raises(VcjaxInputError, match="prediction file not found: .*nope.csv"):
        vcjax.evaluate(screen, tmp_path / "nope.csv")


def test_tuples_lists_sparse_and_what_is_accepted(sim):
    _, screen, (P, half, G) = sim
    ref = vcjax.evaluate(screen, (P, half, G))
    for pred in (
        [P, half, G],
        (np.array(P), sp.csr_matrix(half), pd.Index(G)),
        (tuple(P), half.tolist(), G),
        (P, half),
        sp.csr_matrix(half),
        ad.AnnData(half, obs=pd.DataFrame(index=P), var=pd.DataFrame(index=G)),  # obs_names
    ):
        pd.testing.assert_frame_equal(vcjax.evaluate(screen, pred), ref)
    other = ad.AnnData(half, obs=pd.DataFrame({"x": 1}, index=[f"r{i}" for i in range(len(P))]))
    with pytest.raises(VcjaxInputError, match=r"key 'condition' not in the prediction's obs \(co"):
        vcjax.evaluate(screen, other)
    with pytest.raises(
        VcjaxInputError, match=r"cannot read a prediction of type set: give an AnnData"
    ):
        vcjax.evaluate(screen, {1, 2})


def test_extra_perturbations_and_genes_are_named_in_one_warning(sim):
    _, screen, (P, half, G) = sim
    extra_p = ["XTRA1", "XTRA2", "XTRA3"]
    extra_g = [f"NEWGENE{i}" for i in range(7)]
    rng = np.random.default_rng(0)
    M = np.zeros((len(P) + 3, len(G) + 7))
    M[: len(P), : len(G)] = half
    M[len(P) :] = rng.uniform(0, 2, (3, M.shape[1]))
    with pytest.warns(UserWarning) as w:
        got = vcjax.evaluate(screen, (P + extra_p, M, G + extra_g))
    msgs = [str(x.message) for x in w if "truth lacks" in str(x.message)]
    assert msgs == [
        f"the prediction has 3 of its {len(P) + 3} perturbations (XTRA1, XTRA2, XTRA3) and 7 "
        f"of its {len(G) + 7} genes (NEWGENE0, NEWGENE1, NEWGENE2, NEWGENE3, NEWGENE4, …) "
        "that the truth lacks; not scored"
    ]
    pd.testing.assert_frame_equal(got, vcjax.evaluate(screen, (P, half, G)))
    with warnings.catch_warnings():  # the control row of a prediction is no extra
        warnings.simplefilter("error")
        ctrl = np.vstack([half, screen.strata[0].u_ntc])
        vcjax.evaluate(screen, (P + ["control"], ctrl, G))


def test_screen_keeps_the_truth_evidence_through_save_and_load(sim, tmp_path):
    _, screen, (P, half, G) = sim
    screen.save(tmp_path / "t.vcjax")
    back = vcjax.Screen.load(tmp_path / "t.vcjax")
    assert back.scale.to_dict() == screen.scale.to_dict()
    # a file written before the evidence was recorded still loads and is still checked
    old = tmp_path / "old.vcjax"
    with zipfile.ZipFile(tmp_path / "t.vcjax") as src, zipfile.ZipFile(old, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename == "header.json":
                header = json.loads(data)
                del header["scale"]
                data = json.dumps(header).encode()
            dst.writestr(item, data)
    legacy = vcjax.Screen.load(old)
    assert legacy.scale is None
    align((P, half, G), legacy)
    with pytest.raises(VcjaxInputError, match=r"vs truth max [\d.]+ \(log1p-normalised\)"):
        align((P, np.expm1(half), G), legacy)


# --------------------------------------------------------------------------------- the CLI


def test_cli_check_scale(sim, tmp_path):
    from vcjax.cli import app

    adata, screen, (P, half, G) = sim
    truth = tmp_path / "truth.vcjax"
    screen.save(truth)
    pd.DataFrame(np.expm1(half), index=P, columns=G).to_csv(tmp_path / "lin.csv")
    runner = CliRunner()
    base = ["--truth", truth, "--pred", tmp_path / "lin.csv", "--out", tmp_path / "r.csv"]
    base = [str(a) for a in base]
    for cmd in (["score"], ["sweep", "--n-boot", "0"]):
        res = runner.invoke(app, cmd + base)
        assert res.exit_code == 2, (res.stdout, res.stderr, res.exception)
        err = res.stderr.strip()
        assert err.startswith("error: ") and len(err.splitlines()) == 1, err
        assert "scale mismatch: prediction max" in err and "--check-scale warn" in err
        assert not (tmp_path / "r.csv").exists()
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            res = runner.invoke(app, cmd + base + ["--check-scale", "warn"])
        assert res.exit_code == 0, (res.stdout, res.stderr, res.exception)
        said = _scale_warnings(w) or [
            ln for ln in res.stderr.splitlines() if "scale mismatch" in ln
        ]
        assert said, res.stderr
        assert (tmp_path / "r.csv").exists()
        (tmp_path / "r.csv").unlink()
