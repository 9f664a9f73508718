"""The ``vcjax`` command: outputs, atomic writes and one-line errors (exit 2) for bad input.

Everything runs in-process (``typer.testing.CliRunner``) on one small simulated screen so
that the JAX compilations are shared; one subprocess test checks ``python -m vcjax``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from typer.testing import CliRunner

from vcjax import _io
from vcjax.cli import app

ROOT = Path(__file__).resolve().parents[1]
SIM = dict(
    n_perturbations=6,
    n_genes=80,
    cells_per_perturbation=12,
    n_control=30,
    n_combinations=2,
    shared_shift_genes=8,
    effect_genes=4,
)


def _log_norm(X) -> np.ndarray:
    X = X.toarray() if sp.issparse(X) else np.asarray(X, dtype=np.float64)
    return np.log1p(1e4 * X / X.sum(axis=1, keepdims=True))


def _pseudobulk_pred(truth: ad.AnnData, *, noise: float = 0.1, seed: int = 0) -> ad.AnnData:
    """One row per perturbation: the truth's log-normalised mean plus Gaussian noise."""
    X = _log_norm(truth.X)
    lab = truth.obs["condition"].astype(str).to_numpy()
    names = [n for n in pd.unique(lab) if n != "control"]
    M = np.stack([X[lab == n].mean(0) for n in names])
    M = M + np.random.default_rng(seed).normal(0.0, noise, M.shape)
    return ad.AnnData(
        M.astype(np.float32),
        obs=pd.DataFrame({"condition": names}, index=names),
        var=pd.DataFrame(index=truth.var_names.copy()),
    )


@pytest.fixture(scope="module")
def screen(tmp_path_factory):
    """(folder, truth AnnData, pred AnnData) with truth.h5ad and pred.h5ad written."""
    from vcjax.simulate import simulate_screen

    d = tmp_path_factory.mktemp("screen")
    truth = simulate_screen(seed=0, **SIM)
    truth.obs_names_make_unique()
    pred = _pseudobulk_pred(truth)
    truth.write_h5ad(d / "truth.h5ad")
    pred.write_h5ad(d / "pred.h5ad")
    return d, truth, pred


runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def _score_args(d: Path, out: Path, *extra, truth=None, pred=None):
    return [
        "score",
        "--truth",
        truth or d / "truth.h5ad",
        "--pred",
        pred or d / "pred.h5ad",
        "--key",
        "condition",
        "--control",
        "control",
        "--out",
        out,
        *extra,
    ]


def _assert_input_error(res, *needles: str):
    assert res.exit_code == 2, (res.exit_code, res.stdout, res.stderr, res.exception)
    err = res.stderr.strip()
    assert err.startswith("error: "), err
    assert len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, (n, err)
    return err


def _files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


# ---------------------------------------------------------------------------- success paths


def test_score_csv_and_report(screen, tmp_path):
    d, truth, pred = screen
    out, rep = tmp_path / "results.csv", tmp_path / "report.html"
    res = invoke(*_score_args(d, out, "--report", rep, "--device", "cpu"))
    assert res.exit_code == 0, (res.stdout, res.stderr, res.exception)
    assert _files(tmp_path) == {"results.csv", "results.genes.npz", "report.html"}  # no temporaries
    assert "JAX backend: cpu" in res.stderr
    assert "median over 8 perturbations" in res.stdout
    got = _io.read_table(out)  # (pandas' own read_csv would turn the "null" baseline into NaN)
    assert {"perturbation", "metric", "source", "value", "calibrated"} <= set(got.columns)
    import vcjax
    from vcjax.metrics import DEFAULT_METRICS

    assert set(got["metric"]) == set(DEFAULT_METRICS)
    # the file holds exactly what the library computes
    ref = vcjax.evaluate(truth, pred, key="condition", control="control")
    merged = got.merge(ref, on=["perturbation", "metric", "source"], suffixes=("", "_ref"))
    assert len(merged) == len(ref) == len(got)
    np.testing.assert_allclose(
        merged["value"], merged["value_ref"], rtol=1e-12, atol=1e-12, equal_nan=True
    )
    np.testing.assert_allclose(
        merged["calibrated"], merged["calibrated_ref"], rtol=1e-12, atol=1e-12, equal_nan=True
    )
    html = rep.read_text()
    assert "data:image/png;base64," in html
    assert "<script" not in html and 'src="http' not in html and "<link" not in html
    assert "Per-gene errors on the top DEGs" in html and "worst:" in html
    genes = np.load(tmp_path / "results.genes.npz")
    assert set(genes["perturbations"]) == set(ref["perturbation"])


def test_score_parquet_quiet_metadata_and_report_command(screen, tmp_path):
    d, _, _ = screen
    out = tmp_path / "results.parquet"
    res = invoke(*_score_args(d, out, "--quiet", "--reference", "control", "--seed", "3"))
    assert res.exit_code == 0, (res.stdout, res.stderr, res.exception)
    # quiet: no progress, no summary; only the one line saying the raw-count truth was
    # normalised (warnings are never silenced)
    assert res.stdout == ""
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: the truth cells look like raw counts")
    assert "--normalize none" in lines[0] and "normalize=None" not in lines[0]
    table = _io.read_table(out)
    assert table.attrs["key"] == "condition" and table.attrs["control"] == "control"
    assert table.attrs["reference"] == "control" and table.attrs["seed"] == 3
    assert table.attrs["backend"] in ("cpu", "gpu", "cuda", "rocm", "tpu")
    assert set(table["source"]) >= {"model", "technical_duplicate", "dataset_mean", "control_mean"}

    # the per-gene view computed from the h5ad files (key/control from the parquet metadata);
    # (test_report.py covers a report without per-gene data)
    rep2 = tmp_path / "r2.html"
    res = invoke(
        "report", out, "--out", rep2, "--truth", d / "truth.h5ad", "--pred", d / "pred.h5ad", "-q"
    )
    assert res.exit_code == 0, (res.stderr, res.exception)
    assert "worst:" in rep2.read_text()


def test_baselines_card(screen, tmp_path):
    d, truth, _ = screen
    out, card = tmp_path / "baselines.tsv", tmp_path / "card.csv"
    res = invoke(
        "baselines",
        "--truth",
        d / "truth.h5ad",
        "--key",
        "condition",
        "--control",
        "control",
        "--out",
        out,
        "--card",
        card,
    )
    assert res.exit_code == 0, (res.stderr, res.exception)
    assert "calibration card" in res.stdout and "DRF" in res.stdout
    table = _io.read_table(out)
    assert "model" not in set(table["source"])
    assert {"technical_duplicate", "dataset_mean", "control_mean", "null"} <= set(table["source"])
    got = _io.read_table(card)
    import vcjax

    ref = vcjax.calibration_card(truth, key="condition", control="control")
    pd.testing.assert_frame_equal(
        got.reset_index(drop=True), ref.reset_index(drop=True), check_dtype=False, rtol=1e-10
    )


def test_metrics_option(screen, tmp_path):
    d, _, _ = screen
    out = tmp_path / "r.csv"
    res = invoke(*_score_args(d, out, "-q", "--metrics", "mse,wmse", "--metrics", "r2w_delta"))
    assert res.exit_code == 0, (res.stderr, res.exception)
    assert set(_io.read_table(out)["metric"]) == {"mse", "wmse", "r2w_delta"}
    res = invoke(*_score_args(d, out, "-q", "--metrics", "nonsense_metric"))
    _assert_input_error(res, "nonsense_metric")


def _leaderboard_rows(stdout: str) -> dict[str, list[str]]:
    """The leaderboard's printed rows: model name → its cells."""
    rows = {}
    for ln in stdout.splitlines():
        cells = [c.strip() for c in ln.strip().strip("│").split("│")]
        if len(cells) == 7 and cells[1] and cells[1] != "model":
            rows[cells[1]] = cells
    return rows


def test_demo_on_a_file(screen, tmp_path):
    """`vcjax demo --h5ad`: a sweep of the models of known quality, ranked as expected, the
    printed leaderboard the API's."""
    d, truth, _ = screen
    out = tmp_path / "demo.parquet"
    res = invoke("demo", "--h5ad", d / "truth.h5ad", "--n-boot", "30", "--out", out)
    assert res.exit_code == 0, (res.stderr, res.exception)
    rows = _leaderboard_rows(res.stdout)
    assert rows["other half"][0] == "1"
    assert int(rows["effects halved"][0]) < int(rows["collapsed"][0])
    assert "[technical_duplicate]" in rows and "[dataset_mean]" in rows
    assert "p_best" in res.stdout and "JAX backend:" in res.stderr
    import vcjax
    from vcjax.pipeline import known_models

    sc = vcjax.prepare(truth, key="condition", control="control")
    api = vcjax.sweep(sc, known_models(sc), n_boot=30).leaderboard(baselines=True)
    for name in ("other half", "collapsed", "[dataset_mean]"):
        assert rows[name][2] == f"{api.loc[name, 'value']:.3f}"
    assert rows["other half"][5] == f"{api.loc['other half', 'p_best']:.2f}"
    table = _io.read_table(out)
    assert set(table["model"].dropna()) == set(known_models(sc))


@pytest.mark.slow
def test_demo_on_norman19(shared_data):
    """On a real screen the truth's other half wins and the collapsed model calibrates
    near 0 (the dataset mean's own calibrated R²w(Δ) is below it)."""
    path = shared_data("norman19_perturbench_devel.h5ad")
    res = invoke("demo", "--h5ad", path, "--n-boot", "50")
    assert res.exit_code == 0, (res.stderr, res.exception)
    rows = _leaderboard_rows(res.stdout)
    assert rows["other half"][0] == "1" and float(rows["other half"][5]) >= 0.9
    assert rows["[technical_duplicate]"][2] == "1.000"


@pytest.mark.slow
def test_demo_default_simulator():
    res = invoke("demo", "--n-boot", "20")
    assert res.exit_code == 0, (res.stderr, res.exception)
    assert "simulate_screen(seed=0)" in res.stdout and "JAX backend:" in res.stderr
    rows = _leaderboard_rows(res.stdout)
    assert rows["simulator truth"][0] == "1" and rows["collapsed"][0] == "5"


def _write_models(d: Path, truth) -> dict[str, Path]:
    paths = {}
    for i, noise in enumerate((0.05, 0.3, 0.6)):
        run = d / "runs" / f"seed{i}"
        run.mkdir(parents=True, exist_ok=True)
        _pseudobulk_pred(truth, noise=noise, seed=i).write_h5ad(run / "pred.h5ad")
        paths[f"seed{i}"] = run / "pred.h5ad"
    return paths


def test_sweep_command(screen, tmp_path):
    d, truth, _ = screen
    paths = _write_models(tmp_path, truth)
    out, lb, rep = tmp_path / "sweep.parquet", tmp_path / "lb.csv", tmp_path / "sweep.html"
    res = invoke(
        "sweep", "--truth", d / "truth.h5ad", "--key", "condition", "--control", "control",
        "--preds", str(tmp_path / "runs" / "*" / "pred.h5ad"), "--pred", f"extra={d / 'pred.h5ad'}",
        "--n-boot", "16", "--out", out, "--leaderboard", lb, "--report", rep,
    )  # fmt: skip
    assert res.exit_code == 0, (res.stderr, res.exception)
    rows = _leaderboard_rows(res.stdout)
    assert {"seed0", "seed1", "seed2", "extra"} <= set(rows)
    assert int(rows["seed0"][0]) < int(rows["seed1"][0]) < int(rows["seed2"][0])
    # the outputs are the API's sweep of the same files
    import vcjax

    models = {"extra": str(d / "pred.h5ad"), **{k: str(v) for k, v in paths.items()}}
    api = vcjax.sweep(str(d / "truth.h5ad"), models, key="condition", control="control", n_boot=16)
    board = _io.read_table(lb).set_index("model")
    want = api.leaderboard(baselines=True)
    np.testing.assert_allclose(board.loc[want.index, "value"], want["value"], rtol=1e-12)
    np.testing.assert_allclose(board.loc[api.models, "p_best"], want.loc[api.models, "p_best"])
    table = _io.read_table(out)
    assert set(table["model"].dropna()) == set(models) and table.attrs["n_boot"] == 16
    text = rep.read_text()
    assert 'id="leaderboard"' in text and 'id="pairwise"' in text and 'id="differences"' in text
    assert text.index('id="leaderboard"') < text.index('id="pairwise"')


def test_sweep_command_refusals(screen, tmp_path):
    d, truth, _ = screen
    base = ["sweep", "--truth", d / "truth.h5ad", "--key", "condition", "--control", "control"]
    _assert_input_error(invoke(*base, "--n-boot", "0"), "no model")
    _assert_input_error(
        invoke(*base, "--preds", str(tmp_path / "nothing*.h5ad")), "matches no file"
    )
    p = str(d / "pred.h5ad")
    _assert_input_error(invoke(*base, "--pred", f"a={p}", "--pred", f"a={p}"), "'a' is given twice")
    _assert_input_error(invoke(*base, "--pred", f"a={tmp_path / 'missing.h5ad'}"), "missing.h5ad")
    _assert_input_error(invoke(*base, "--pred", p, "--metric", "bogus"), "bogus")
    _assert_input_error(invoke(*base, "--pred", p, "--resample", "genes"), "--resample")
    # a model missing perturbations is named; --skip-failed leaves it out with a warning
    short = _pseudobulk_pred(truth)[:-1].copy()
    short.write_h5ad(tmp_path / "short.h5ad")
    args = [
        *base,
        "--pred",
        f"ok={p}",
        "--pred",
        f"short={tmp_path / 'short.h5ad'}",
        "--n-boot",
        "0",
    ]
    _assert_input_error(invoke(*args), "model 'short'")
    res = invoke(*args, "--skip-failed")
    assert res.exit_code == 0, (res.stderr, res.exception)
    assert "warning: model 'short' left out" in res.stderr and "ok" in _leaderboard_rows(res.stdout)


def test_model_names_from_paths():
    from vcjax.cli import _names_from_paths

    assert _names_from_paths(["runs/a/pred.h5ad", "runs/b/pred.h5ad"]) == ["a", "b"]
    assert _names_from_paths(["x/m1.h5ad", "x/m2.h5ad"]) == ["m1", "m2"]
    assert _names_from_paths(["only/model.h5ad"]) == ["model"]
    assert _names_from_paths(["p/lr0.1/s1/pred.csv", "p/lr0.01/s1/pred.csv"]) == ["lr0.1", "lr0.01"]
    assert _names_from_paths(["a/s1/pred.csv", "b/s2/pred.csv"]) == ["a/s1", "b/s2"]


@pytest.mark.slow
def test_score_with_bootstrap_intervals(screen, tmp_path):
    d, _, _ = screen
    out, rep = tmp_path / "r.parquet", tmp_path / "r.html"
    res = invoke(*_score_args(d, out, "-q", "--n-boot", "20", "--report", rep))
    assert res.exit_code == 0, (res.stderr, res.exception)
    table = _io.read_table(out)
    assert {"ci_low", "ci_high", "calibrated_ci_low", "calibrated_ci_high"} <= set(table.columns)
    model = table[(table.source == "model") & (table.metric == "r2w_delta")].dropna(
        subset=["ci_low"]
    )
    assert len(model) and (model.ci_low <= model.ci_high).all()
    assert table.attrs["n_boot"] == 20
    html = rep.read_text()
    assert "Intervals from the table's bootstrap" in html and 'id="paired"' in html


def test_python_m_vcjax(monkeypatch, capsys):
    """``python -m vcjax`` runs vcjax/__main__.py (in-process, as runpy does for ``-m``)."""
    import runpy

    monkeypatch.setattr(sys, "argv", ["vcjax", "--help"])
    with pytest.raises(SystemExit) as exc:
        runpy.run_module("vcjax", run_name="__main__", alter_sys=True)
    assert exc.value.code in (0, None)
    out = capsys.readouterr().out
    for cmd in ("score", "baselines", "prepare", "sweep", "report", "demo"):
        assert cmd in out


@pytest.mark.slow
def test_console_script_and_python_m_in_a_subprocess(screen, tmp_path):
    d, _, _ = screen
    exe = Path(sys.executable).with_name("vcjax")
    for cmd in ([str(exe)] if exe.exists() else []) + [sys.executable + " -m vcjax"]:
        argv = cmd.split() + [
            "score",
            "--truth",
            str(d / "nope.h5ad"),
            "--pred",
            str(d / "pred.h5ad"),
            "-k",
            "condition",
            "-c",
            "control",
            "--out",
            str(tmp_path / "r.csv"),
        ]
        res = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert res.returncode == 2 and res.stderr.strip().startswith(
            "error: truth file not found"
        ), res.stderr


def test_device_gpu_unavailable_is_an_input_error(screen, tmp_path):
    import jax

    if any(dev.platform == "gpu" or dev.platform in ("cuda", "rocm") for dev in jax.devices()):
        pytest.skip("a GPU is present")
    d, _, _ = screen
    res = invoke(*_score_args(d, tmp_path / "r.csv", "--device", "gpu"))
    _assert_input_error(res, "--device gpu", "no GPU")
    assert _files(tmp_path) == set()


# ---------------------------------------------------------------------------- atomic writes


def test_failed_run_never_overwrites_a_good_file(screen, tmp_path):
    d, truth, pred = screen
    out = tmp_path / "results.csv"
    out.write_text("good\n")
    short = pred[pred.obs["condition"] != pred.obs["condition"].iloc[0]].copy()
    short.write_h5ad(tmp_path / "short.h5ad")
    res = invoke(*_score_args(d, out, pred=tmp_path / "short.h5ad"))
    _assert_input_error(res, "lacks 1 of 8 perturbations")
    assert out.read_text() == "good\n"
    assert _files(tmp_path) == {"results.csv", "short.h5ad"}


def test_failure_while_rendering_writes_nothing(screen, tmp_path, monkeypatch):
    from vcjax import report

    def boom(*a, **k):
        raise RuntimeError("renderer exploded")

    monkeypatch.setattr(report, "build_report", boom)
    d, _, _ = screen
    out = tmp_path / "results.parquet"
    res = invoke(*_score_args(d, out, "--report", tmp_path / "r.html"))
    assert res.exit_code == 1 and "renderer exploded" in res.stderr
    assert _files(tmp_path) == set()


def test_io_atomic_primitives(tmp_path):
    p = tmp_path / "x.txt"
    p.write_text("old")
    with pytest.raises(RuntimeError), _io.atomic_path(p) as tmp:
        tmp.write_text("half")
        raise RuntimeError
    assert p.read_text() == "old" and _files(tmp_path) == {"x.txt"}
    with _io.Staged() as st:
        st.add(tmp_path / "a.csv", lambda t: t.write_text("a"))
        st.add(p, lambda t: t.write_text("new"))
        assert p.read_text() == "old"  # nothing moved before commit
    assert _files(tmp_path) == {"x.txt"} and p.read_text() == "old"
    with _io.Staged() as st:
        st.add(tmp_path / "a.csv", lambda t: t.write_text("a"))
        st.add(p, lambda t: t.write_text("new"))
        st.commit()
    assert p.read_text() == "new" and (tmp_path / "a.csv").read_text() == "a"
    assert _files(tmp_path) == {"x.txt", "a.csv"}
    df = pd.DataFrame({"a": [1.0, np.nan], "b": ["x", "y"]})
    for name in ("t.csv", "t.tsv", "t.csv.gz", "t.parquet"):
        _io.save_table(df, tmp_path / name, meta={"k": np.int64(3), "f": np.nan})
        back = _io.read_table(tmp_path / name)
        pd.testing.assert_frame_equal(back, df)
    assert _io.read_table(tmp_path / "t.parquet").attrs == {"k": 3, "f": None}
    with pytest.raises(_io.OutputPathError, match="table format"):
        _io.table_format("x.xlsx")


# ---------------------------------------------------------------------------- bad input → exit 2


def test_missing_file(screen, tmp_path):
    d, _, _ = screen
    res = invoke(*_score_args(d, tmp_path / "r.csv", truth=tmp_path / "nope.h5ad"))
    _assert_input_error(res, "nope.h5ad", "not found")
    res = invoke(*_score_args(d, tmp_path / "r.csv", pred=tmp_path / "nopred.h5ad"))
    _assert_input_error(res, "nopred.h5ad", "not found")
    res = invoke("report", tmp_path / "missing.parquet", "--out", tmp_path / "r.html")
    _assert_input_error(res, "missing.parquet")
    assert _files(tmp_path) == set()


def test_not_an_h5ad(screen, tmp_path):
    d, _, _ = screen
    bad = tmp_path / "bad.h5ad"
    bad.write_text("perturbation,gene\nA,1\n")
    res = invoke(*_score_args(d, tmp_path / "r.csv", truth=bad))
    _assert_input_error(res, "bad.h5ad", "not an HDF5/h5ad")
    assert _files(tmp_path) == {"bad.h5ad"}


def test_key_not_in_obs(screen, tmp_path):
    d, _, _ = screen
    res = invoke(
        "score",
        "--truth",
        d / "truth.h5ad",
        "--pred",
        d / "pred.h5ad",
        "--key",
        "guide",
        "--control",
        "control",
        "--out",
        tmp_path / "r.csv",
    )
    _assert_input_error(res, "'guide'", "not in obs")
    assert _files(tmp_path) == set()


def test_control_not_found(screen, tmp_path):
    d, _, _ = screen
    res = invoke(
        "score",
        "--truth",
        d / "truth.h5ad",
        "--pred",
        d / "pred.h5ad",
        "--key",
        "condition",
        "--control",
        "NTC",
        "--out",
        tmp_path / "r.csv",
    )
    _assert_input_error(res, "'NTC'", "not found")


def test_genes_shared_none_or_some_missing(screen, tmp_path):
    d, _, pred = screen
    p = pred.copy()
    p.var_names = [f"X{i}" for i in range(p.n_vars)]
    p.write_h5ad(tmp_path / "nogenes.h5ad")
    res = invoke(*_score_args(d, tmp_path / "r.csv", pred=tmp_path / "nogenes.h5ad"))
    _assert_input_error(res, "share no genes")
    p = pred[:, 3:].copy()
    p.write_h5ad(tmp_path / "fewgenes.h5ad")
    res = invoke(*_score_args(d, tmp_path / "r.csv", pred=tmp_path / "fewgenes.h5ad"))
    err = _assert_input_error(res, "lacks 3 of", "genes")
    for g in pred.var_names[:3]:
        assert g in err
    assert _files(tmp_path) == {"nogenes.h5ad", "fewgenes.h5ad"}


def test_prediction_missing_perturbations(screen, tmp_path):
    d, _, pred = screen
    drop = list(pred.obs["condition"][:2])
    pred[~pred.obs["condition"].isin(drop)].copy().write_h5ad(tmp_path / "p.h5ad")
    res = invoke(*_score_args(d, tmp_path / "r.csv", pred=tmp_path / "p.h5ad"))
    _assert_input_error(res, "lacks 2 of 8 perturbations", *drop)


def test_duplicated_gene_names(screen, tmp_path):
    d, truth, _ = screen
    t = truth.copy()
    names = list(t.var_names)
    names[5] = names[4]
    t.var_names = names
    t.write_h5ad(tmp_path / "dup.h5ad")
    res = invoke(*_score_args(d, tmp_path / "r.csv", truth=tmp_path / "dup.h5ad"))
    _assert_input_error(res, "duplicated gene names", names[4])


def test_duplicated_perturbation_names(screen, tmp_path):
    d, _, pred = screen
    df = pd.DataFrame(pred.X, index=list(pred.obs["condition"]), columns=list(pred.var_names))
    df = pd.concat([df, df.iloc[[1]]])
    df.to_csv(tmp_path / "pred.csv")
    res = invoke(*_score_args(d, tmp_path / "r.csv", pred=tmp_path / "pred.csv"))
    _assert_input_error(res, "duplicated perturbation names", str(df.index[1]))
    # the same table without the duplicate is accepted
    df.iloc[:-1].to_csv(tmp_path / "ok.csv")
    res = invoke(*_score_args(d, tmp_path / "r.csv", "-q", pred=tmp_path / "ok.csv"))
    assert res.exit_code == 0, (res.stderr, res.exception)


def test_nan_and_inf_values(screen, tmp_path):
    d, truth, pred = screen
    t = truth.copy()
    X = t.X.toarray()
    X[7, 11] = np.nan
    t.X = sp.csr_matrix(X)
    t.write_h5ad(tmp_path / "nan.h5ad")
    res = invoke(*_score_args(d, tmp_path / "r.csv", truth=tmp_path / "nan.h5ad"))
    _assert_input_error(res, "non-finite", str(t.var_names[11]), str(t.obs_names[7]))
    p = pred.copy()
    p.X[2, 4] = np.inf
    p.write_h5ad(tmp_path / "inf.h5ad")
    res = invoke(*_score_args(d, tmp_path / "r.csv", pred=tmp_path / "inf.h5ad"))
    _assert_input_error(res, "inf", str(p.var_names[4]))


def test_negative_counts(screen, tmp_path):
    d, truth, _ = screen
    t = truth.copy()
    X = t.X.toarray()
    X[3, 2] = -4
    t.X = sp.csr_matrix(X)
    t.write_h5ad(tmp_path / "neg.h5ad")
    res = invoke(
        *_score_args(d, tmp_path / "r.csv", "--normalize", "counts", truth=tmp_path / "neg.h5ad")
    )
    _assert_input_error(res, "negative value", str(t.var_names[2]), "counts")


def _one_cell_truth(truth, path) -> str:
    """Write ``truth`` with one perturbation cut to a single cell; return its name."""
    lab = truth.obs["condition"].astype(str)
    victim = lab[lab != "control"].iloc[0]
    keep = (lab != victim).to_numpy()
    keep[np.flatnonzero(~keep)[0]] = True  # one cell of the victim survives
    truth[keep].copy().write_h5ad(path)
    return victim


def test_single_cell_perturbation(screen, tmp_path):
    d, truth, _ = screen
    victim = _one_cell_truth(truth, tmp_path / "one.h5ad")
    res = invoke(*_score_args(d, tmp_path / "r.csv", truth=tmp_path / "one.h5ad"))
    _assert_input_error(res, victim, "fewer than")


def test_empty_files(screen, tmp_path):
    d, truth, _ = screen
    (tmp_path / "zero.h5ad").write_bytes(b"")
    res = invoke(*_score_args(d, tmp_path / "r.csv", truth=tmp_path / "zero.h5ad"))
    _assert_input_error(res, "zero.h5ad", "empty")
    truth[:0].copy().write_h5ad(tmp_path / "nocells.h5ad")
    res = invoke(*_score_args(d, tmp_path / "r.csv", truth=tmp_path / "nocells.h5ad"))
    _assert_input_error(res, "nocells.h5ad", "empty")
    assert _files(tmp_path) == {"zero.h5ad", "nocells.h5ad"}


def test_output_folder_missing_is_checked_first(screen, tmp_path, monkeypatch):
    import vcjax.pipeline

    def never(*a, **k):  # the check must come before any computation
        raise AssertionError("the truth was prepared or scored")

    monkeypatch.setattr(vcjax.pipeline, "prepare", never)
    monkeypatch.setattr(vcjax.pipeline, "evaluate", never)
    d, _, _ = screen
    res = invoke(*_score_args(d, tmp_path / "nodir" / "r.csv"))
    _assert_input_error(res, "output folder does not exist", "nodir")
    res = invoke(*_score_args(d, tmp_path / "r.csv", "--report", tmp_path / "nodir2" / "r.html"))
    _assert_input_error(res, "nodir2")
    res = invoke(*_score_args(d, tmp_path / "r.xlsx"))
    _assert_input_error(res, "r.xlsx")
    res = invoke(
        "baselines",
        "--truth",
        d / "truth.h5ad",
        "--key",
        "condition",
        "--control",
        "control",
        "--out",
        tmp_path / "nodir3" / "b.csv",
    )
    _assert_input_error(res, "nodir3")
    res = invoke("report", tmp_path / "whatever.parquet", "--out", tmp_path / "nodir4" / "r.html")
    _assert_input_error(res, "nodir4")
    assert not any(tmp_path.iterdir())
    assert not os.path.exists(tmp_path / "nodir")


def test_score_with_gene_sets_and_pred_var(screen, tmp_path):
    """--gene-sets writes the per-pathway confidence table (and a report heatmap);
    --pred-var writes the model-uncertainty table; both equal vcjax.confidence directly."""
    import vcjax

    d, truth, pred = screen
    genes = list(truth.var_names)
    gmt = tmp_path / "sets.gmt"
    gmt.write_text(
        "SET_A\tna\t" + "\t".join(genes[:20]) + "\n"
        "SET_B\tna\t" + "\t".join(genes[20:45] + ["NOT_A_GENE"]) + "\n"
    )
    var = pd.DataFrame(
        np.full((pred.n_obs, pred.n_vars), 0.01),
        index=pred.obs["condition"].astype(str).to_numpy(),
        columns=pred.var_names,
    )
    var.index.name = "perturbation"
    var_path = tmp_path / "var.csv"
    var.to_csv(var_path)
    out, rep = tmp_path / "r.csv", tmp_path / "r.html"
    res = invoke(
        *_score_args(d, out, "-q", "--gene-sets", gmt, "--pred-var", var_path, "--report", rep)
    )
    assert res.exit_code == 0, (res.stderr, res.exception)
    pw = _io.read_table(tmp_path / "r.pathways.csv")
    want = vcjax.confidence(
        truth, pred, key="condition", control="control", level="pathway", gene_sets=str(gmt)
    )
    assert set(pw["gene_set"]) == {"SET_A", "SET_B"}
    np.testing.assert_allclose(
        pw.sort_values(["gene_set", "perturbation"])["confidence"].to_numpy(float),
        want.sort_values(["gene_set", "perturbation"])["confidence"].to_numpy(float),
        rtol=1e-6,
        equal_nan=True,
    )
    unc = _io.read_table(tmp_path / "r.uncertainty.csv")
    assert unc["perturbation"].nunique() == pred.n_obs
    assert 'id="pathways"' in rep.read_text()
    # a missing gene-set file is an input error, nothing written
    out2 = tmp_path / "r2.csv"
    res = invoke(*_score_args(d, out2, "-q", "--gene-sets", tmp_path / "nope.gmt"))
    _assert_input_error(res, "nope.gmt")
    assert not out2.exists()


# ------------------------------------------------------------------------- prepared truth


def test_prepare_then_score_equals_scoring_the_h5ad(screen, tmp_path):
    """`vcjax prepare` writes a .vcjax that `score` and `baselines` take for --truth: the
    same results as from the .h5ad, with or without the bootstrap."""
    d, _, _ = screen
    prepared = tmp_path / "truth.vcjax"
    res = invoke(
        "prepare", "--truth", d / "truth.h5ad", "--key", "condition", "--control", "control",
        "--out", prepared, "--seed", "3",
    )  # fmt: skip
    assert res.exit_code == 0, (res.stderr, res.exception)
    assert _files(tmp_path) == {"truth.vcjax"}
    for extra in ((), ("--n-boot", "8")):
        a, b = tmp_path / "a.csv", tmp_path / "b.csv"
        assert invoke(*_score_args(d, a, "-q", "--seed", "3", *extra)).exit_code == 0
        res = invoke(
            "score", "--truth", prepared, "--pred", d / "pred.h5ad", "--out", b, "-q",
            "--seed", "3", *extra,
        )  # fmt: skip
        assert res.exit_code == 0, (res.stderr, res.exception)
        pd.testing.assert_frame_equal(_io.read_table(a), _io.read_table(b))
    res = invoke("baselines", "--truth", prepared, "--out", tmp_path / "c.csv", "-q")
    assert res.exit_code == 0, (res.stderr, res.exception)
    assert set(_io.read_table(tmp_path / "c.csv")["source"]) >= {"technical_duplicate", "null"}


def test_a_prepared_truth_fixes_the_truth_options(screen, tmp_path):
    d, _, _ = screen
    prepared = tmp_path / "t.vcjax"
    args = ["--truth", d / "truth.h5ad", "--key", "condition", "--control", "control"]
    assert invoke("prepare", *args, "--out", prepared, "-q").exit_code == 0
    base = ["score", "--truth", prepared, "--pred", d / "pred.h5ad", "--out", tmp_path / "r.csv"]
    _assert_input_error(invoke(*base, "--reference", "control"), "--reference", "vcjax prepare")
    _assert_input_error(invoke(*base, "--control", "ntc"), "--control", "'ntc'", "'control'")
    # an .h5ad truth without --key / --control
    res = invoke(
        "score", "--truth", d / "truth.h5ad", "--pred", d / "pred.h5ad", "--out", tmp_path / "r.csv"
    )
    _assert_input_error(res, "--key and --control are required")
    _assert_input_error(invoke("prepare", *args, "--out", tmp_path / "t.h5ad"), ".vcjax")
    assert _files(tmp_path) == {"t.vcjax"}


def test_one_run_reads_and_prepares_the_truth_once(screen, tmp_path, monkeypatch):
    """score --report --gene-sets --pred-var streams the truth once (it did so four times)."""
    import vcjax.data

    d, truth, pred = screen
    passes = []
    real = vcjax.data.group_stats

    def counting(adata, key, **kw):
        if adata.n_obs == truth.n_obs:  # the truth (not the predicted rows)
            passes.append(kw.get("split") is not None)
        return real(adata, key, **kw)

    monkeypatch.setattr(vcjax.data, "group_stats", counting)
    var = pd.DataFrame(
        np.full((pred.n_obs, pred.n_vars), 0.01),
        index=pred.obs["condition"].astype(str).to_numpy(),
        columns=pred.var_names,
    )
    var.to_csv(tmp_path / "var.csv")
    res = invoke(
        *_score_args(
            d, tmp_path / "r.csv", "-q", "--report", tmp_path / "r.html", "--gene-sets", "example",
            "--pred-var", tmp_path / "var.csv",
        )
    )  # fmt: skip
    assert res.exit_code == 0, (res.stderr, res.exception)
    assert passes == [True]


# ------------------------------------------------------------- options, help and warnings


def _commands() -> list[str]:
    import typer.main

    return sorted(typer.main.get_command(app).commands)


def test_version():
    import vcjax

    res = invoke("--version")
    assert res.exit_code == 0, (res.stderr, res.exception)
    assert res.stdout.strip() == vcjax.__version__


def test_short_help_on_every_command():
    cmds = _commands()
    assert {"score", "baselines", "prepare", "report", "sweep", "demo"} <= set(cmds)
    for args in ([], *([c] for c in cmds)):
        res = invoke(*args, "-h")
        assert res.exit_code == 0, (args, res.stdout, res.stderr)
        assert "Usage:" in res.stdout and "--help" in res.stdout, args


def test_flags_are_plain():
    """--quiet, --drop-small and --backed are flags without a --no- twin."""
    for cmd in _commands():
        res = invoke(cmd, "--no-quiet")
        assert res.exit_code == 2 and "No such option: --no-quiet" in res.stderr, cmd
    for cmd in ("score", "baselines", "prepare", "sweep", "demo"):
        res = invoke(cmd, "--no-drop-small")
        assert res.exit_code == 2 and "No such option: --no-drop-small" in res.stderr, cmd
    res = invoke("score", "--no-backed")
    assert res.exit_code == 2 and "No such option: --no-backed" in res.stderr


def test_help_lists_the_registry_metrics():
    from vcjax.metrics import METRICS

    wide = {"COLUMNS": "400", "TERMINAL_WIDTH": "400"}  # no wrapping inside a name
    for cmd in ("score", "baselines", "sweep"):
        res = runner.invoke(app, [cmd, "--help"], env=wide)
        assert res.exit_code == 0, res.stderr
        text = " ".join(res.stdout.split())
        for name in METRICS:
            assert name in text, (cmd, name)
    assert "warnings still print" in text  # --quiet says what it keeps
    res = runner.invoke(app, ["score", "--help"], env=wide)
    text = " ".join(res.stdout.split())
    for opt in ("--n-boot", "--ci", "--ci-method", "--covariate", "--deg-method"):
        assert opt in text, opt
    assert "clipped to its metric's range" in text and "docs/metrics.md §11" in text
    assert "Fisher" not in text  # the transformed scale was measured and dropped


def test_errors_name_the_options_not_the_api_arguments(screen, tmp_path):
    d, truth, _ = screen
    victim = _one_cell_truth(truth, tmp_path / "one.h5ad")
    res = invoke(*_score_args(d, tmp_path / "r.csv", truth=tmp_path / "one.h5ad"))
    err = _assert_input_error(res, victim, "fewer than 2 cells", "pass --drop-small")
    assert "drop_small" not in err and "min_cells" not in err
    # with --drop-small the run goes on, and the library's warning prints in CLI terms
    res = invoke(
        *_score_args(d, tmp_path / "r.csv", "-q", "--drop-small", truth=tmp_path / "one.h5ad")
    )
    assert res.exit_code == 0, (res.stderr, res.exception)
    lines = res.stderr.strip().splitlines()
    assert any(ln.startswith("warning: dropping 1 group(s)") and victim in ln for ln in lines), (
        lines
    )


def test_api_messages_translated_at_the_boundary():
    """Every API argument spelled in a VcjaxInputError/warning reaching the CLI."""
    from vcjax.cli import _cli_terms

    cases = {
        "2 group(s) have fewer than min_cells=2 cells: A (1); pass drop_small=True to drop them":
            "2 group(s) have fewer than 2 cells: A (1); pass --drop-small to drop them",
        "x has 1.5; pass normalize=None or 'log1p_cp10k' explicitly":
            "x has 1.5; pass --normalize none or --normalize counts explicitly",
        "normalize='auto': cells before 'c1' onward": "--normalize auto: cells before 'c1' onward",
        "adata.X is None; pass layer=":
            "adata.X is None; pass --layer LAYER (truth) or --pred-layer LAYER (prediction)",
        "group 'A' occurs in several covariates ['x', 'y']; pass covariate=":
            "group 'A' occurs in several covariates ['x', 'y']; pass --covariate COLUMN",
        "try deg_method='t-test' (Welch), covariate=COLUMN (pooled)":
            "try --deg-method t-test (Welch), --covariate COLUMN (pooled)",
        "n_boot=10 resamples give rough intervals": "--n-boot 10 resamples give rough intervals",
        "ci_method='bca' needs": "--ci-method bca needs",
        "n_boot must be >= 2 for intervals, got 1": "--n-boot must be >= 2 for intervals, got 1",
        "a\nmulti-line\tmessage": "a multi-line message",
    }  # fmt: skip
    for api, cli in cases.items():
        assert _cli_terms(api) == cli, (api, _cli_terms(api))


def test_pred_layer_with_a_table_is_an_error(screen, tmp_path):
    d, _, pred = screen
    df = pd.DataFrame(pred.X, index=list(pred.obs["condition"]), columns=list(pred.var_names))
    df.to_csv(tmp_path / "pred.csv")
    res = invoke(
        *_score_args(d, tmp_path / "r.csv", "--pred-layer", "counts", pred=tmp_path / "pred.csv")
    )
    _assert_input_error(res, "--pred-layer", "pred.csv", "table")
    res = invoke(
        "sweep", "--truth", d / "truth.h5ad", "-k", "condition", "-c", "control",
        "--pred", f"a={d / 'pred.h5ad'}", "--pred", f"b={tmp_path / 'pred.csv'}",
        "--pred-layer", "counts",
    )  # fmt: skip
    _assert_input_error(res, "--pred-layer", "pred.csv")
    assert _files(tmp_path) == {"pred.csv"}


def test_warnings_print_as_one_line_each_even_when_quiet(screen, tmp_path, monkeypatch):
    """--n-boot 10 warns that intervals are rough; a UserWarning from the API becomes one
    `warning:` line (twice the same: once), in CLI terms; --quiet keeps them."""
    import warnings

    import vcjax.pipeline

    real = vcjax.pipeline.evaluate

    def evaluate(*a, **k):  # the scoring without its bootstrap (the options are the CLI's)
        assert k["n_boot"] == 10
        for _ in range(2):
            warnings.warn("the model is odd; pass drop_small=True", UserWarning, stacklevel=2)
        warnings.warn("n_boot=10 is few", UserWarning, stacklevel=2)  # said by the CLI already
        warnings.warn("all-NaN slice", RuntimeWarning, stacklevel=2)  # not a UserWarning
        return real(*a, **{**k, "n_boot": 0})

    monkeypatch.setattr(vcjax.pipeline, "evaluate", evaluate)
    d, _, _ = screen
    res = invoke(*_score_args(d, tmp_path / "r.csv", "-q", "--n-boot", "10"))
    assert res.exit_code == 0, (res.stderr, res.exception)
    assert res.stdout == ""
    lines = res.stderr.splitlines()
    assert lines[0] == (
        "warning: --n-boot 10: intervals from fewer than 100 resamples are rough (their ends "
        "move from seed to seed); use 1000 for reporting"
    )
    # the library's own line on the raw-count truth, then the patched evaluate's, once
    assert lines[1].startswith("warning: the truth cells look like raw counts")
    assert lines[2:] == ["warning: the model is odd; pass --drop-small"]
    # a failed run prints its error line only
    res = invoke(*_score_args(d, tmp_path / "nodir" / "r.csv", "--n-boot", "10"))
    _assert_input_error(res, "nodir")


def test_undefined_summary_counts():
    """The NaN summary counts the perturbations (per covariate value) whose rows carry the
    no-DEG gate's note, ignores dataset-level rows, and speaks above the threshold only."""
    from vcjax.pipeline import undefined_summary
    from vcjax.pipeline._tidy import NO_DEG_NOTE

    def table(gated: list[bool], cov=None):
        rows = []
        for i, g in enumerate(gated):
            for m in ("r2w_delta", "mse"):
                note = NO_DEG_NOTE if g and m == "r2w_delta" else ""
                c = None if cov is None else cov[i]
                rows.append(dict(perturbation=f"P{i % 3}", metric=m, note=note, covariate=c))
        rows.append(dict(perturbation="(all)", metric="pds", note="dataset-level", covariate=None))
        return pd.DataFrame(rows)

    assert undefined_summary(table([True, True, False])).startswith(
        "2 of 3 perturbations have no significant DEG (t-test_overestim_var"
    )
    assert undefined_summary(table([True, False, False])) is None
    assert undefined_summary(table([True, False, False]), threshold=0.3) is not None
    msg = undefined_summary(
        table([True] * 4 + [False] * 2, cov=list("aaabbb")), deg_method="t-test"
    )
    assert msg.startswith("4 of 6 perturbation × covariate groups")
    assert "R²w(Δ) are NaN" in msg and "deg_method" not in msg and "covariate=" not in msg
    assert undefined_summary(table([False, False, False])) is None


def test_nan_summary_line(screen, tmp_path):
    """`vcjax baselines` on a screen without effects (most perturbations without a DEG)
    says so in one line with the right count; on the module's screen (few) it says nothing."""
    import vcjax
    from vcjax.simulate import simulate_screen

    null = simulate_screen(seed=1, effect_size=0.0, knockdown=0.0, **SIM)
    null.obs_names_make_unique()
    null.write_h5ad(tmp_path / "null.h5ad")
    for path, data in ((tmp_path / "null.h5ad", null), (screen[0] / "truth.h5ad", screen[1])):
        no_deg = vcjax.prepare(data, key="condition", control="control").strata[0].no_degs
        n, P = int(no_deg.sum()), no_deg.size
        res = invoke(
            "baselines", "--truth", path, "-k", "condition", "-c", "control", "-q",
            "--out", tmp_path / "b.csv",
        )  # fmt: skip
        assert res.exit_code == 0, (res.stderr, res.exception)
        lines = [ln for ln in res.stderr.splitlines() if "no significant DEG" in ln]
        if n > P / 2:
            assert path.name == "null.h5ad" and n >= 6
            assert lines == [lines[0]] and lines[0].startswith(
                f"warning: {n} of {P} perturbations have no significant DEG"
            )
            assert "--deg-method t-test" in lines[0] and "--covariate COLUMN" in lines[0]
        else:
            assert path.name == "truth.h5ad" and lines == []


def _covariate_pred(truth: ad.AnnData, cov: str) -> ad.AnnData:
    X = _log_norm(truth.X)
    obs = truth.obs[[cov, "condition"]].astype(str)
    groups = obs[obs["condition"] != "control"].drop_duplicates()
    rng = np.random.default_rng(1)
    rows = [
        X[((obs[cov] == c) & (obs["condition"] == p)).to_numpy()].mean(0)
        for c, p in groups.itertuples(index=False)
    ]
    M = np.stack(rows) + rng.normal(0.0, 0.1, (len(rows), X.shape[1]))
    return ad.AnnData(
        M.astype(np.float32),
        obs=groups.reset_index(drop=True).set_axis([f"r{i}" for i in range(len(rows))]),
        var=pd.DataFrame(index=truth.var_names.copy()),
    )


def test_covariate_option(tmp_path):
    """--covariate scores within each covariate value: the file is evaluate(covariate=...)."""
    import vcjax
    from vcjax.simulate import simulate_screen

    truth = simulate_screen(seed=0, covariate="cell_type", n_covariates=2, **SIM)
    truth.obs_names_make_unique()
    pred = _covariate_pred(truth, "cell_type")
    truth.write_h5ad(tmp_path / "t.h5ad")
    pred.write_h5ad(tmp_path / "p.h5ad")
    out = tmp_path / "r.csv"
    res = invoke(
        *_score_args(tmp_path, out, "-q", "--covariate", "cell_type", truth=tmp_path / "t.h5ad",
                     pred=tmp_path / "p.h5ad")
    )  # fmt: skip
    assert res.exit_code == 0, (res.stderr, res.exception)
    got = _io.read_table(out)
    ref = vcjax.evaluate(truth, pred, key="condition", control="control", covariate="cell_type")
    assert set(ref["covariate"]) == {"cell_type_0", "cell_type_1"}
    keys = ["covariate", "perturbation", "metric", "source"]
    assert got.groupby("covariate").size().to_dict() == ref.groupby("covariate").size().to_dict()
    merged = got.merge(ref, on=keys, suffixes=("", "_ref"))
    assert len(merged) == len(ref) == len(got)
    np.testing.assert_allclose(merged["value"], merged["value_ref"], rtol=1e-12, equal_nan=True)
    # a prepared truth fixes the covariate
    res = invoke("prepare", "--truth", tmp_path / "t.h5ad", "-k", "condition", "-c", "control",
                 "--covariate", "cell_type", "--out", tmp_path / "t.vcjax", "-q")  # fmt: skip
    assert res.exit_code == 0, (res.stderr, res.exception)
    res = invoke("score", "--truth", tmp_path / "t.vcjax", "--pred", tmp_path / "p.h5ad",
                 "--out", tmp_path / "r2.csv", "--covariate", "cell_type")  # fmt: skip
    _assert_input_error(res, "--covariate", "vcjax prepare")


@pytest.mark.slow
def test_demo_on_mcfaline23_by_cell_type(shared_data):
    """McFaline 2023 pools three cell lines: with the paper's DEG test no perturbation has a
    DEG (all rows NaN, said in one warning line); within each cell line and with Welch's
    test most do, and the leaderboard has values."""
    path = shared_data("mcfaline23_perturbench_devel.h5ad")
    base = ["demo", "--h5ad", path, "-k", "condition", "-c", "control", "--n-boot", "100"]
    res = invoke(*base)
    assert res.exit_code == 0, (res.stderr, res.exception)
    warn = [ln for ln in res.stderr.splitlines() if "no significant DEG" in ln]
    assert len(warn) == 1 and warn[0].startswith("warning: 9 of 9 perturbations"), res.stderr
    assert _leaderboard_rows(res.stdout)["other half"][2] == "—"
    res = invoke(*base, "--covariate", "cell_type", "--deg-method", "t-test")
    assert res.exit_code == 0, (res.stderr, res.exception)
    assert "no significant DEG" not in res.stderr, res.stderr
    assert "27 perturbations (3 values of cell_type)" in " ".join(res.stdout.split())
    rows = _leaderboard_rows(res.stdout)
    assert rows["[technical_duplicate]"][2] == "1.000"
    for name in ("other half", "collapsed", "[dataset_mean]"):
        assert rows[name][2] != "—", rows[name]
