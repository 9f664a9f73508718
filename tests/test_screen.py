"""The prepared truth (vcjax.prepare → Screen): the same tables as from the AnnData, a
float-exact save/load, refusals, DbD's gates as the registry states them, and the one
derivation's host and JAX forms held to each other."""

from __future__ import annotations

import json
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

import vcjax
from tests.conftest import load_fixture
from vcjax import VcjaxInputError
from vcjax import pipeline as PL
from vcjax.metrics import DEFAULT_METRICS, METRICS

KW = dict(key="condition", control="control", normalize=None)


@pytest.fixture(scope="module")
def ds1():
    adata, exp = load_fixture("ds1_sparse")
    pred = (list(exp["perts"]), np.asarray(exp["pred_noisy"]), list(exp["genes"]))
    return adata, pred


@pytest.fixture(scope="module")
def covariate_screen():
    return vcjax.simulate_screen(
        n_perturbations=5, n_genes=80, cells_per_perturbation=14, n_control=30, n_combinations=2,
        shared_shift_genes=8, effect_genes=4,
        covariate="cell_line", n_covariates=2, seed=3,
    )  # fmt: skip


def _arrays(screen: PL.Screen) -> dict[str, np.ndarray]:
    """Every array a screen holds, by a stable name."""
    out = {}
    for j, s in enumerate(screen.strata):
        for h, g in (("1", s.stats.half1), ("2", s.stats.half2)):
            out.update({f"{j}/n{h}": g.n, f"{j}/s{h}": g.sum, f"{j}/q{h}": g.sumsq})
        d = s.derived
        for name in ("truth", "reference", "u_ntc", "u_all_full", "u_all_half1", "weights"):
            if getattr(d, name) is not None:
                out[f"{j}/{name}"] = np.asarray(getattr(d, name))
        if d.deg is not None:
            out.update({f"{j}/deg_{k}": np.asarray(v) for k, v in d.deg._asdict().items()})
        out.update({f"{j}/b_{k}": np.asarray(v) for k, v in d.baselines.items()})
        out.update({f"{j}/codes": s.cells.codes, f"{j}/half": s.cells.half})
    return out


def test_evaluate_screen_equals_evaluate_anndata(ds1):
    adata, pred = ds1
    screen = vcjax.prepare(adata, **KW)
    assert screen.perturbations == tuple(pred[0]) and screen.genes == tuple(pred[2])
    pd.testing.assert_frame_equal(vcjax.evaluate(screen, pred), vcjax.evaluate(adata, pred, **KW))
    # the same intervals for a seed, and the same paired rows (``seed`` of an AnnData
    # evaluation is also the null baseline's, a truth-side option of prepare)
    a = vcjax.evaluate(vcjax.prepare(adata, seed=4, **KW), pred, n_boot=12, seed=4)
    b = vcjax.evaluate(adata, pred, n_boot=12, seed=4, **KW)
    pd.testing.assert_frame_equal(a, b)
    assert a["ci_low"].notna().sum() > 100


def test_evaluate_screen_with_a_covariate(covariate_screen):
    a = covariate_screen
    kw = dict(key="condition", control="control", covariate="cell_line")
    screen = vcjax.prepare(a, **kw)
    assert len(screen.strata) == 2
    assert (
        len(screen.perturbations)
        == len(screen.covariates)
        == sum(len(s.perturbations) for s in screen.strata)
    )
    pd.testing.assert_frame_equal(vcjax.evaluate(screen), vcjax.evaluate(a, **kw))


def test_save_load_round_trip_is_float_exact(ds1, tmp_path):
    adata, pred = ds1
    path = tmp_path / "ds1.h5ad"
    adata.write_h5ad(path)
    screen = vcjax.prepare(str(path), **KW)
    screen.save(tmp_path / "t.vcjax")
    back = vcjax.Screen.load(tmp_path / "t.vcjax")
    want, got = _arrays(screen), _arrays(back)
    assert set(want) == set(got)
    for k, v in want.items():
        assert got[k].dtype == v.dtype, k
        np.testing.assert_array_equal(got[k], v, err_msg=k)
    assert back.perturbations == screen.perturbations and back.genes == screen.genes
    assert back.strata[0].notes == screen.strata[0].notes
    assert back.spec.options() == screen.spec.options()
    assert back.source["path"] == str(path.resolve())
    assert back.strata[0].cells.path == str(path.resolve())
    assert PL.as_screen(str(path), **KW).source["path"] == str(path.resolve())
    # scoring the loaded screen: the same table, and the bootstrap re-reads the recorded file
    pd.testing.assert_frame_equal(vcjax.evaluate(back, pred), vcjax.evaluate(screen, pred))
    pd.testing.assert_frame_equal(
        vcjax.evaluate(back, pred, n_boot=6, seed=1), vcjax.evaluate(screen, pred, n_boot=6, seed=1)
    )


def test_a_screen_prepared_in_memory_needs_its_cells_for_the_bootstrap(ds1, tmp_path):
    adata, pred = ds1
    screen = vcjax.prepare(adata, reference=np.zeros(adata.n_vars), **KW)
    screen.save(tmp_path / "m.vcjax")
    back = vcjax.Screen.load(tmp_path / "m.vcjax")
    np.testing.assert_array_equal(back.spec.reference, np.zeros(adata.n_vars))
    with pytest.raises(VcjaxInputError, match=r"in-memory AnnData.*with_cells"):
        vcjax.evaluate(back, pred, n_boot=4)
    pd.testing.assert_frame_equal(
        vcjax.evaluate(back.with_cells(adata), pred, n_boot=4),
        vcjax.evaluate(screen, pred, n_boot=4),
    )
    with pytest.raises(VcjaxInputError, match="has 3 cells"):
        back.with_cells(adata[:3])


def test_load_refuses_other_versions_and_other_files(ds1, tmp_path):
    adata, _ = ds1
    vcjax.prepare(adata, **KW).save(tmp_path / "t.vcjax")
    with zipfile.ZipFile(tmp_path / "t.vcjax") as zf:
        header = json.loads(zf.read("header.json"))
        members = {n: zf.read(n) for n in zf.namelist()}
    header["version"] = PL.FORMAT_VERSION + 1
    with zipfile.ZipFile(tmp_path / "v2.vcjax", "w") as zf:
        for n, b in members.items():
            zf.writestr(n, json.dumps(header) if n == "header.json" else b)
    with pytest.raises(
        VcjaxInputError, match=rf"format version {PL.FORMAT_VERSION + 1}.*prepare it again"
    ):
        vcjax.Screen.load(tmp_path / "v2.vcjax")
    (tmp_path / "x.vcjax").write_text("not a zip")
    with pytest.raises(VcjaxInputError, match="not a vcjax screen file"):
        vcjax.Screen.load(tmp_path / "x.vcjax")
    with pytest.raises(VcjaxInputError, match="not found"):
        vcjax.Screen.load(tmp_path / "missing.vcjax")


def test_truth_options_are_fixed_by_a_screen(ds1):
    adata, pred = ds1
    screen = vcjax.prepare(adata, **KW)
    with pytest.raises(VcjaxInputError, match=r"reference is a truth-side option.*vcjax.prepare"):
        vcjax.evaluate(screen, pred, reference="control")
    with pytest.raises(VcjaxInputError, match="control='ctrl' differs"):
        vcjax.evaluate(screen, pred, control="ctrl")
    # the screen's own values (and the defaults) are accepted
    vcjax.evaluate(screen, pred, key="condition", normalize=None, reference="perturbed")
    with pytest.raises(VcjaxInputError, match="key and control are required"):
        vcjax.evaluate(adata, pred)


def test_gate_false_leaves_no_gate_notes(ds1):
    """gate=False: no value is gated, so no row says it was (the notes follow the option)."""
    adata, pred = ds1
    on = vcjax.evaluate(adata, pred, **KW)
    off = vcjax.evaluate(adata, pred, gate=False, **KW)
    gated = on["note"].str.contains("gate|undefined for the dataset mean", regex=True)
    assert gated.sum() > 0
    assert not off["note"].str.contains("gate|undefined for the dataset mean", regex=True).any()
    dm = off[(off.source == "dataset_mean") & (off.metric == "pearson_delta")]
    assert dm["value"].notna().all()


def test_data_mean_pearson_is_defined_against_the_control(ds1):
    """DbD's data-mean gate is for a u_ALL reference, where its Δ is degenerate; against
    u_NTC the data mean has a real Δ and its Pearson(Δ) is the plain correlation."""
    adata, pred = ds1
    t = vcjax.evaluate(adata, pred, reference="control", **KW)
    (s,) = vcjax.prepare(adata, reference="control", **KW).strata
    got = t[(t.source == "dataset_mean") & (t.metric == "pearson_delta")].set_index("perturbation")
    got = got.loc[list(s.perturbations)]
    x = s.u_all_full - s.u_ntc
    want = [np.corrcoef(x, y - s.u_ntc)[0, 1] for y in s.truth]
    np.testing.assert_allclose(got["value"].to_numpy(float), want, rtol=1e-5)
    assert (got["note"] == "").all()
    # against u_ALL it stays undefined, as DbD has it
    t = vcjax.evaluate(adata, pred, **KW)
    dm = t[(t.source == "dataset_mean") & (t.metric == "pearson_delta")]
    assert dm["value"].isna().all() and (dm["note"] == PL._tidy.UNDEFINED_NOTE).all()  # noqa: SLF001


def test_registry_states_every_gate():
    """The gates' metric sets come from the registry: DbD's no-DEG gate on WMSE, R²w(Δ) and
    Pearson(Δ) on DEGs; the data-mean gate on the Pearson metrics against u_ALL."""
    gated = {m for m, s in METRICS.items() if s.gated_by_degs}
    assert gated == {"wmse", "r2w_delta", "pearson_delta_degs"}
    undefined = {m for m, s in METRICS.items() if "dataset_mean" in s.undefined_for}
    assert undefined == {"pearson_delta", "pearson_delta_degs", "pearson_delta_topk"}
    assert {m for m, s in METRICS.items() if s.reference == "control"} == {
        "pearson_delta_ctrl",
        "r2_delta_ctrl",
    }
    assert set(DEFAULT_METRICS) == {m for m, s in METRICS.items() if s.is_core}
    v = np.ones((2, 3))
    no_deg = np.array([[True, False, False]] * 2)
    np.testing.assert_array_equal(
        np.isnan(PL.gate("wmse", v, no_deg=no_deg, undefined=True)), no_deg
    )
    assert np.isnan(PL.gate("pearson_delta", v, no_deg=no_deg, undefined=True)).all()
    assert not np.isnan(PL.gate("pearson_delta", v, no_deg=no_deg, undefined=False)).any()
    assert not np.isnan(PL.gate("mse", v, no_deg=no_deg, undefined=True)).any()


@pytest.mark.parametrize(
    "reference", ["perturbed", "perturbed_no_control", "perturbed_cells", "control"]
)
def test_derive_host_and_jax_forms_agree(ds1, reference):
    """pipeline.derive over NumPy (host DEG, the point estimate) and over jax.numpy (the
    bootstrap's form) give the same truth, references, DEG arrays and baselines."""
    adata, _ = ds1
    (s,) = vcjax.prepare(adata, reference=reference, **KW).strata
    spec = vcjax.prepare(adata, reference=reference, **KW).spec
    fixed = s.fixed(spec)
    with jax.enable_x64(True):
        sums = PL.Sums(*(jnp.asarray(a) for a in s.sums()))
        plan = s.plan(spec, deg_strategy="exact")
        got = jax.jit(lambda x: PL.derive(x, plan, fixed, xp=jnp))(sums)
    want = s.derived
    for name in ("truth", "reference", "u_ntc", "u_all_full", "u_all_half1"):
        np.testing.assert_allclose(
            getattr(got, name), getattr(want, name), rtol=1e-12, err_msg=name
        )
    for name, v in want.baselines.items():
        np.testing.assert_allclose(got.baselines[name], v, rtol=1e-10, atol=1e-12, err_msg=name)
    np.testing.assert_array_equal(np.asarray(got.deg.mask), want.deg.mask)
    np.testing.assert_array_equal(np.asarray(got.deg.scores), want.deg.scores)  # float32 t
    np.testing.assert_array_equal(np.asarray(got.deg.weights), want.deg.weights)
    np.testing.assert_allclose(got.deg.pvals_adj, want.deg.pvals_adj, rtol=1e-9, atol=1e-300)


def test_stratum_arrays_match_the_fixture(fixture_name):
    """A Screen's derived arrays are the paper's code path's (oracle fixtures, float64)."""
    adata, exp = load_fixture(fixture_name)
    (s,) = vcjax.prepare(adata, **KW, split="half").strata
    np.testing.assert_allclose(s.truth, exp["truth"], rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(s.weights, exp["weights"])
    np.testing.assert_array_equal(s.deg_mask, exp["deg_mask"].astype(bool))
    np.testing.assert_array_equal(s.scores, exp["t_scores"])
    np.testing.assert_allclose(s.pvals_adj, exp["pvals_adj"], rtol=1e-9)
    for name in ("u_all_half1", "u_all_full", "u_ntc"):
        np.testing.assert_allclose(getattr(s, name), exp[name], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(s.baselines["technical_duplicate"], exp["pred_techdup"], rtol=1e-12)
