"""Peer metrics (cell-eval, GEARS, Systema, PerturBench, hit discovery) vs float64 NumPy
loop references, and a cell-eval 0.8.2 parity run."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest
import scipy.stats as ss
from scipy.spatial.distance import cdist

from vcjax import peers as Pm

RNG = np.random.default_rng(0)


def _pair(p=14, g=40, noise=1.0, seed=0):
    rng = np.random.default_rng(seed)
    t = rng.normal(size=(p, g))
    return rng.normal(scale=noise, size=(p, g)) + t, t


# --------------------------------------------------------------------------- (..., G) kernels


def test_direction_agreement_vs_loop():
    pred, truth = _pair(6, 30, seed=1)
    ref, pref = RNG.normal(size=30), RNG.normal(size=30)
    truth[0, :5] = ref[:5]  # sign 0 on the truth side
    where = RNG.uniform(size=(6, 30)) < 0.4
    where[3] = False
    got = np.asarray(Pm.direction_agreement(pred, truth, ref, pred_reference=pref, where=where))
    for i in range(6):
        s = np.flatnonzero(where[i])
        if len(s) == 0:
            assert np.isnan(got[i])
            continue
        want = np.mean([np.sign(pred[i, g] - pref[g]) == np.sign(truth[i, g] - ref[g]) for g in s])
        assert got[i] == pytest.approx(want, abs=1e-6)
    full = np.asarray(Pm.direction_agreement(pred, truth, ref))
    np.testing.assert_allclose(
        full, np.mean(np.sign(pred - ref) == np.sign(truth - ref), 1), atol=1e-6
    )


def test_pearson_delta_top20_vs_loop():
    pred, truth = _pair(5, 60, seed=2)
    ref = RNG.normal(size=60)
    scores = np.abs(RNG.normal(size=(5, 60)))
    got = np.asarray(Pm.pearson_delta_top20(pred, truth, ref, scores))
    for i in range(5):
        top = np.argsort(-scores[i], kind="stable")[:20]
        want = ss.pearsonr(pred[i, top] - ref[top], truth[i, top] - ref[top])[0]
        assert got[i] == pytest.approx(want, abs=1e-5)


# --------------------------------------------------------------------------- PDS / rank / centroid


def _ref_pds(pred, truth, exclude, distance):
    p, g = pred.shape
    out = []
    for i in range(p):
        keep = np.arange(g) != exclude[i]
        a, b = pred[i, keep], truth[:, keep]
        if distance == "l1":
            d = np.abs(b - a).sum(1)
        elif distance == "l2":
            d = np.sqrt(((b - a) ** 2).sum(1))
        else:
            den = np.linalg.norm(a) * np.linalg.norm(b, axis=1)
            d = 1 - np.where(den > 0, b @ a / np.where(den > 0, den, 1), 0)
        out.append(1 - np.sum(d < d[i]) / p)
    return np.array(out)


@pytest.mark.parametrize("distance", ["l1", "l2", "cosine"])
def test_pds_vs_loop(distance):
    pred, truth = _pair(16, 50, noise=4.0, seed=3)
    exclude = np.full(16, -1)
    exclude[:6] = [0, 4, 9, 49, 20, 3]
    got = np.asarray(Pm.pds(pred, truth, exclude=exclude, distance=distance, block_size=5))
    want = _ref_pds(pred, truth, exclude, distance)
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert 0.3 < want.mean() < 1.0  # informative: neither perfect nor degenerate
    assert np.all(got >= 1 / 16)


def test_pds_exclusion_changes_ranking_and_ties_do_not_count():
    # an error on the target gene pushes the own truth behind another unless excluded
    truth = np.array([[1.0, 0, 0, 0.2], [0, 1, 0, 0], [0, 0, 1, 0]])
    pred = truth.copy()
    pred[0] = [-3.0, 0.5, 0, 0.2]
    assert np.asarray(Pm.pds(pred, truth))[0] == pytest.approx(2 / 3)
    assert np.asarray(Pm.pds(pred, truth, exclude=np.array([0, -1, -1])))[0] == 1
    # exact ties with the own truth never count against p
    same = np.ones((3, 4))
    np.testing.assert_array_equal(np.asarray(Pm.pds(same, same)), 1.0)


def _ref_rank(pred, truth, metric):
    p, g = pred.shape
    out = []
    for q in range(p):
        if metric in ("cosine", "pearson"):
            a = pred - pred.mean(1, keepdims=True) if metric == "pearson" else pred
            b = truth[q] - truth[q].mean() if metric == "pearson" else truth[q]
            s = np.array([x @ b / (np.linalg.norm(x) * np.linalg.norm(b)) for x in a])
        else:
            s = -np.array([np.mean((x - truth[q]) ** 2) for x in pred])
        better = np.sum(s > s[q] + 1e-9)
        ties = np.sum(np.abs(s - s[q]) <= 1e-9) - 1
        out.append((better + 0.5 * ties) / p)
    return np.array(out)


@pytest.mark.parametrize("metric", ["cosine", "pearson", "mse"])
def test_rank_vs_loop(metric):
    pred, truth = _pair(15, 30, noise=4.0, seed=4)
    got = np.asarray(Pm.rank(pred, truth, metric=metric))
    np.testing.assert_allclose(got, _ref_rank(pred, truth, metric), atol=1e-6)


def test_rank_ties_count_half():
    truth = np.eye(4)
    pred = np.ones((4, 4))  # equally similar to every truth
    np.testing.assert_allclose(np.asarray(Pm.rank(pred, truth)), 1.5 / 4)


def test_centroid_accuracy_vs_systema_loop():
    pred, truth = _pair(12, 25, noise=4.0, seed=5)
    pred[3] = truth[7]  # an exact tie with another centroid is not "farther"
    got = np.asarray(Pm.centroid_accuracy(pred, truth))
    d = cdist(pred, truth)
    want = np.array([(d[i] > d[i, i]).sum() / 11 for i in range(12)])
    np.testing.assert_allclose(got, want, atol=1e-6)
    np.testing.assert_allclose(np.asarray(Pm.perturbed_centroid(truth)), truth.mean(0), atol=1e-6)
    m = np.arange(12) < 5
    np.testing.assert_allclose(
        np.asarray(Pm.perturbed_centroid(truth, mask=m)), truth[:5].mean(0), atol=1e-6
    )


# --------------------------------------------------------------------------- DE metrics


def _sorted_degs(fdr, lfc, alpha):
    sig = np.flatnonzero(fdr.astype(np.float32) < alpha)
    order = np.argsort(-np.abs(lfc[sig]), kind="stable")
    return sig[order]


def _ref_overlap(tf, tl, pf, pl, k, mode, alpha=0.05):
    out = []
    for i in range(tf.shape[0]):
        real, pred = _sorted_degs(tf[i], tl[i], alpha), _sorted_degs(pf[i], pl[i], alpha)
        if len(real) == 0 or len(pred) == 0:
            out.append(0.0)
            continue
        base = len(real) if mode == "overlap" else len(pred)
        ke = min(base if not k else k, base)
        out.append(np.intersect1d(real[:ke], pred[:ke]).size / ke if ke else 0.0)
    return np.array(out)


def _de_inputs(seed=6, p=8, g=50):
    rng = np.random.default_rng(seed)
    tf = rng.uniform(size=(p, g)) ** 4
    pf = np.clip(tf * rng.uniform(0.3, 3, size=(p, g)), 0, 1)
    tl = rng.normal(size=(p, g)).round(1)  # ties in |lfc|
    pl = tl + rng.normal(scale=0.8, size=(p, g))
    tl[0, :3] = np.inf
    pl[1, :2] = -np.inf
    tf[2] = 1.0  # no truth DEG
    pf[3] = 1.0  # no predicted DEG
    return tf, tl, pf, pl


@pytest.mark.parametrize(
    "mode,k", [("overlap", None), ("overlap", 5), ("precision", None), ("precision", 4)]
)
def test_de_overlap_vs_celleval_loop(mode, k):
    tf, tl, pf, pl = _de_inputs()
    got = np.asarray(Pm.de_overlap_at_k(tf, tl, pf, pl, k=k, mode=mode))
    want = _ref_overlap(tf, tl, pf, pl, k, mode)
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert np.ptp(want) > 0


def test_de_metrics_host_equal_the_kernels():
    """The NumPy twin of the two cell-eval DE metrics (what the pipeline calls) gives the
    kernels' numbers, infinities, ties in |lfc|, NaN and empty sets included."""
    tf, tl, pf, pl = _de_inputs(seed=9, p=10, g=60)
    tl[5, :4] = np.nan
    pl[6, 2:5] = 0.0
    ov, dr = Pm.de_metrics_host(tf, tl, pf, pl)
    np.testing.assert_array_equal(ov, np.asarray(Pm.de_overlap_at_k(tf, tl, pf, pl)))
    np.testing.assert_array_equal(dr, np.asarray(Pm.de_direction_agreement(tf, tl, pl)))
    assert np.isnan(dr[2]) and np.ptp(ov) > 0


def test_de_direction_agreement_vs_loop():
    tf, tl, pf, pl = _de_inputs()
    pl[4, :10] = 0.0
    got = np.asarray(Pm.de_direction_agreement(tf, tl, pl))
    for i in range(tf.shape[0]):
        t = np.flatnonzero(tf[i].astype(np.float32) < 0.05)
        if len(t) == 0:
            assert np.isnan(got[i])
        else:
            assert got[i] == pytest.approx(np.mean(np.sign(tl[i, t]) == np.sign(pl[i, t])))


# --------------------------------------------------------------------------- hit discovery


def _expected_recall_budget(scores, hits, budget):
    """Exact expectation over all tie-breaking orders (enumerated)."""
    groups = {}
    for i, s in enumerate(scores):
        groups.setdefault(s, []).append(i)
    keys = sorted(groups, reverse=True)
    perms = [list(itertools.permutations(groups[k])) for k in keys]
    total, count = 0.0, 0
    for combo in itertools.product(*perms):
        order = [i for grp in combo for i in grp]
        total += hits[order[:budget]].sum()
        count += 1
    return total / count / hits.sum()


def test_hit_recall_at_budget_ties_vs_enumeration():
    scores = np.array([5.0, 4, 4, 4, 3, 2, 2, 1])
    hits = np.array([1, 0, 1, 1, 0, 1, 0, 1])
    for b in range(0, 9):
        got = float(Pm.hit_recall_at_budget(scores, hits, budget=b))
        assert got == pytest.approx(_expected_recall_budget(scores, hits, b), abs=1e-6), b
    assert np.isnan(float(Pm.hit_recall_at_budget(scores, np.zeros(8), budget=3)))
    # batched rows
    got = np.asarray(
        Pm.hit_recall_at_budget(np.stack([scores, -scores]), np.stack([hits, hits]), budget=3)
    )
    assert got[1] == pytest.approx(_expected_recall_budget(-scores, hits, 3), abs=1e-6)


def test_hit_recall_at_fdr_vs_thresholds():
    rng = np.random.default_rng(7)
    for trial in range(5):
        scores = rng.integers(0, 6, size=20).astype(float)
        hits = (rng.uniform(size=20) < 0.5 + 0.08 * scores).astype(int)
        for alpha in (0.0, 0.1, 0.3):
            best = 0.0
            for t in np.unique(scores):
                called = scores >= t
                fdp = (called & (hits == 0)).sum() / called.sum()
                if fdp <= alpha:
                    best = max(best, (called & (hits == 1)).sum() / hits.sum())
            got = float(Pm.hit_recall_at_fdr(scores, hits, fdr=alpha))
            assert got == pytest.approx(best, abs=1e-6), (trial, alpha)


# --------------------------------------------------------------------------- distributions


def test_energy_distance_and_mmd_vs_cdist_with_padding():
    rng = np.random.default_rng(8)
    x = rng.normal(size=(37, 12))
    y = rng.normal(size=(23, 12)) + 0.4
    e_ref = 2 * cdist(x, y).mean() - cdist(x, x).mean() - cdist(y, y).mean()
    s2 = np.var(np.concatenate([x, y]), axis=0).sum()

    def k(a, b):
        return np.exp(-cdist(a, b, "sqeuclidean") / (2 * s2))

    mmd_ref = k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean()
    assert float(Pm.rbf_bandwidth(x, y)) == pytest.approx(s2, rel=1e-5)
    # padded rows with masks give the same numbers (one compiled shape for many sizes)
    xp = np.concatenate([x, rng.normal(size=(11, 12)) * 50])
    mx = np.r_[np.ones(37), np.zeros(11)]
    yp = np.concatenate([y, np.zeros((9, 12))])
    my = np.r_[np.ones(23), np.zeros(9)]
    got_e = float(Pm.energy_distance(xp, yp, x_mask=mx, y_mask=my, block_size=16))
    got_m = float(Pm.mmd(xp, yp, x_mask=mx, y_mask=my, block_size=16))
    assert got_e == pytest.approx(e_ref, rel=1e-4)
    assert got_m == pytest.approx(mmd_ref, rel=1e-3)
    assert float(Pm.energy_distance(x, y, block_size=16)) == pytest.approx(e_ref, rel=1e-4)
    kk = np.exp(-cdist(np.concatenate([x, y]), np.concatenate([x, y]), "sqeuclidean") / 8.0)
    want_s = kk[:37, :37].mean() + kk[37:, 37:].mean() - 2 * kk[:37, 37:].mean()
    got_s = float(Pm.mmd(xp, yp, sigma=2.0, x_mask=mx, y_mask=my, block_size=16))
    assert got_s == pytest.approx(want_s, rel=1e-3)


def test_distribution_distances_host_helper():
    rng = np.random.default_rng(9)
    pc = rng.normal(size=(50, 6))
    pl = np.array(["a"] * 20 + ["b"] * 30)
    tc = rng.normal(size=(45, 6)) + 0.2
    tl = np.array(["a"] * 25 + ["b"] * 20)
    got = Pm.distribution_distances(pc, pl, tc, tl, ["a", "b", "c"], block_size=16)
    for i, p in enumerate("ab"):
        x, y = pc[pl == p], tc[tl == p]
        want = 2 * cdist(x, y).mean() - cdist(x, x).mean() - cdist(y, y).mean()
        assert got[i] == pytest.approx(want, rel=1e-4)
    assert np.isnan(got[2])


# --------------------------------------------------------------------------- cell-eval pipeline


def _synthetic_screen(seed=0, g=60, pred_noise=0.9):
    """Log-normalised synthetic real and predicted cells; some labels are gene names."""
    rng = np.random.default_rng(seed)
    genes = [f"G{i:03d}" for i in range(g)]
    perts = ["G003", "G010", "G017", "G025", "G040", "G044", "G051",
             "pertA", "pertB", "pertC", "pertD", "pertE"]  # fmt: skip
    base = rng.gamma(2.0, 1.0, g)
    eff = np.zeros((len(perts), g))
    for i, p in enumerate(perts):
        idx = rng.choice(g, 8, replace=False)
        eff[i, idx] = rng.normal(scale=1.2, size=8)
        if p in genes:
            eff[i, genes.index(p)] = -2.0

    def make(n_ctrl, n_per, noise, shift_ctrl=0.0, scale=1.0):
        xs, lab = [rng.poisson(base * np.exp(shift_ctrl * rng.normal(size=g)), (n_ctrl, g))], []
        lab += ["non-targeting"] * n_ctrl
        for i, p in enumerate(perts):
            e = eff[i] * scale + noise * rng.normal(size=g)
            xs.append(rng.poisson(base * np.exp(e), (n_per, g)))
            lab += [p] * n_per
        c = np.concatenate(xs).astype(float)
        x = np.log1p(c / c.sum(1, keepdims=True) * 1e3).astype(np.float32)
        return x, np.array(lab)

    xr, lr = make(120, 40, 0.0)
    xp, lp = make(100, 35, pred_noise, shift_ctrl=0.1, scale=0.7)
    return genes, xr, lr, xp, lp


def test_celleval_de_table_vs_scipy():
    genes, xr, lr, _, _ = _synthetic_screen()
    de = Pm.celleval_de_table(xr, lr, control="non-targeting", gene_block=25)  # padded blocks
    ctrl = xr[lr == "non-targeting"].astype(np.float64)
    assert de["perts"] == sorted(set(lr) - {"non-targeting"})
    for i, p in enumerate(de["perts"][:4]):
        x = xr[lr == p].astype(np.float64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pv = np.clip(ss.mannwhitneyu(x, ctrl, method="asymptotic", axis=0).pvalue, 0, 1)
        pv = np.where(np.isnan(pv), 1.0, pv)
        np.testing.assert_allclose(de["pvalue"][i], pv, rtol=2e-4, atol=1e-30)
        np.testing.assert_allclose(de["fdr"][i], ss.false_discovery_control(pv), rtol=2e-4)
        with np.errstate(divide="ignore", invalid="ignore"):
            lfc = np.log2(np.expm1(x.mean(0)) / np.expm1(ctrl.mean(0)))
        lfc[np.isnan(lfc)] = 0
        np.testing.assert_allclose(de["lfc"][i], lfc, rtol=1e-5, atol=1e-5)
        assert (de["fdr"][i] < 0.05).sum() > 0


def test_celleval_metrics_own_control_convention():
    genes, xr, lr, xp, lp = _synthetic_screen()
    r = Pm.celleval_metrics(xr, lr, xp, lp, genes)
    perts = r["perts"]
    names = perts + ["non-targeting"]
    rb = np.stack([xr[lr == p].astype(np.float64).mean(0) for p in names])
    pb = np.stack([xp[lp == p].astype(np.float64).mean(0) for p in names])
    np.testing.assert_allclose(r["mae"], np.abs(pb[:-1] - rb[:-1]).mean(1), atol=1e-5)
    ex = np.array([genes.index(p) if p in genes else -1 for p in perts])
    want = _ref_pds(pb[:-1] - pb[-1], rb[:-1] - rb[-1], ex, "l1")
    np.testing.assert_allclose(r["pds"], want, atol=1e-6)
    assert np.all((0 <= r["de_overlap_at_k"]) & (r["de_overlap_at_k"] <= 1))


@pytest.mark.peers
@pytest.mark.slow
def test_parity_with_cell_eval(tmp_path):
    """Our four columns equal cell-eval 0.8.2's on h5ad files (run in-process)."""
    pytest.importorskip("cell_eval")
    import anndata as ad
    import pandas as pd
    from cell_eval import MetricsEvaluator

    genes, xr, lr, xp, lp = _synthetic_screen()
    for name, x, lab in (("real", xr, lr), ("pred", xp, lp)):
        obs = pd.DataFrame(
            {"target": pd.Categorical(lab)}, index=[f"c{i}" for i in range(len(lab))]
        )
        ad.AnnData(x, obs=obs, var=pd.DataFrame(index=genes)).write_h5ad(tmp_path / f"{name}.h5ad")
    keep = {"discrimination_score_l1", "overlap_at_N", "de_direction_match", "mae"}
    from cell_eval.metrics import metrics_registry

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ev = MetricsEvaluator(
            adata_pred=str(tmp_path / "pred.h5ad"),
            adata_real=str(tmp_path / "real.h5ad"),
            control_pert="non-targeting",
            pert_col="target",
            outdir=str(tmp_path / "out"),
            num_threads=1,
        )
        res, _ = ev.compute(
            profile="full",
            skip_metrics=[m for m in metrics_registry.list_metrics() if m not in keep],
            write_csv=False,
        )
    res = res.sort("perturbation")
    ours = Pm.celleval_metrics(xr, lr, xp, lp, genes)
    assert list(res["perturbation"]) == ours["perts"]
    pairs = {
        "pds": "discrimination_score_l1",
        "de_overlap_at_k": "overlap_at_N",
        "de_direction_agreement": "de_direction_match",
        "mae": "mae",
    }
    for mine, theirs in pairs.items():
        want = res[theirs].to_numpy().astype(np.float64)
        np.testing.assert_allclose(ours[mine], want, atol=2e-6, err_msg=mine)
    assert np.ptp(ours["pds"]) > 0 and np.ptp(ours["de_overlap_at_k"]) > 0


@pytest.mark.parametrize("form", ["dense", "csr", "int_csr"])
def test_pseudobulk_against_a_loop(form):
    """Means per label from one sparse indicator product equal a per-label NumPy loop, for
    dense, sparse and integer inputs; labels absent from the cells give NaN rows, cells
    whose label is not asked for are ignored."""
    import scipy.sparse as sps

    pseudobulk = Pm.pseudobulk
    rng = np.random.default_rng(3)
    X = rng.poisson(1.0, size=(60, 7)) * (rng.random((60, 7)) < 0.5)
    labels = rng.choice(["a", "b", "c", "other"], size=60)
    cells = {
        "dense": X.astype(np.float32),
        "csr": sps.csr_matrix(X.astype(np.float32)),
        "int_csr": sps.csr_matrix(X),
    }[form]
    perts = ["c", "a", "absent", "b"]
    got = pseudobulk(cells, labels, perts)
    for i, p in enumerate(perts):
        rows = X[labels == p].astype(np.float64)
        if len(rows) == 0:
            assert np.isnan(got[i]).all()
        else:
            np.testing.assert_allclose(got[i], rows.mean(0), rtol=1e-12)
    assert got.dtype == np.float64
    assert pseudobulk(cells, labels, perts, dtype=np.float32).dtype == np.float32


# --------------------------------------------------------------------------- issue 20: fast paths


def test_hit_recalls_host_equal_the_kernels():
    """The NumPy twin used by the pipeline gives the kernels' numbers (ties, NaN, no hit)."""
    rng = np.random.default_rng(11)
    for trial in range(4):
        scores = rng.integers(0, 5, size=30).astype(float)
        scores[rng.uniform(size=30) < 0.1] = np.nan
        hits = rng.uniform(size=30) < (0.0 if trial == 3 else 0.4)
        for budget in (0, 3):
            got = Pm.hit_recalls_host(scores, hits, budget=budget, fdr=0.2)
            want = (
                float(Pm.hit_recall_at_budget(scores, hits, budget=budget)),
                float(Pm.hit_recall_at_fdr(scores, hits, fdr=0.2)),
            )
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7, err_msg=str(trial))


def test_bh_fdr_host_is_the_kernel_bit_for_bit():
    from vcjax.peers._kernels import _bh_fdr_host
    from vcjax.stats import bh_fdr

    rng = np.random.default_rng(12)
    p = rng.uniform(size=(5, 40)) ** 3
    p[0, :5] = p[0, 5]  # ties
    p[1, 3] = np.nan
    got = _bh_fdr_host(p)
    np.testing.assert_array_equal(got, np.asarray(bh_fdr(p)))
    assert np.isnan(got[1, 3]) and np.isfinite(got[1, :3]).all()


def test_pds_l1_tiles_vs_loop():
    """The L1 distances in row blocks and unrolled gene steps: genes not a multiple of the
    step, rows not a multiple of the block, with and without an exclusion."""
    pred, truth = _pair(23, 37, noise=3.0, seed=13)
    for exclude in (None, np.r_[np.arange(10) * 3, np.full(13, -1)]):
        got = np.asarray(Pm.pds(pred, truth, exclude=exclude, block_size=7))
        ex = np.full(23, -1) if exclude is None else exclude
        np.testing.assert_allclose(got, _ref_pds(pred, truth, ex, "l1"), atol=1e-6)


def _sparse_screen(seed, n_groups=6, g=45):
    """Cells with many zeros, negatives, tied values (in the first half of the genes),
    a label outside the groups and an empty group; labels: -2 control, -1 neither,
    0..n_groups-1 groups."""
    import scipy.sparse as sps

    rng = np.random.default_rng(seed)
    n = 260
    x = rng.integers(-2, 5, size=(n, g)).astype(np.float32)
    x[:, g // 2 :] += rng.normal(scale=0.3, size=(n, g - g // 2)).astype(np.float32)
    x *= rng.uniform(size=(n, g)) < 0.35
    lab = rng.integers(-2, n_groups, size=n)
    lab[lab == 2] = -1  # group 2 is empty
    return sps.csr_matrix(x), lab


def test_mannwhitney_sparse_pvalues_equal_scipy():
    """The sparse Wilcoxon's p-values equal scipy's asymptotic test on the dense cells, for
    cells with negative values (the stored-entry sort) and without (the one-pass counter);
    an empty group gives NaN. (The exact counts of both routes: the next test.)"""
    from vcjax.stats import mannwhitney_vs_control_sparse

    X, lab = _sparse_screen(14)
    X = X.copy()
    X.data[::9] = 0.0  # explicit zeros
    X.data[1::9] = -0.0
    ctrl = lab == -2
    for Y in (X, abs(X)):
        dense = Y.toarray()
        res = mannwhitney_vs_control_sparse(Y, lab, ctrl, n_groups=6)
        assert np.isnan(np.asarray(res.pvalue)[2]).all()  # the empty group
        c = dense[ctrl].astype(np.float64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for grp in (0, 3, 5):
                pv = ss.mannwhitneyu(dense[lab == grp], c, method="asymptotic", axis=0).pvalue
                pv = np.where(np.isnan(pv), 1.0, pv)
                got = np.asarray(res.pvalue)[grp]
                np.testing.assert_allclose(got, pv, rtol=2e-4, atol=1e-30)


def test_mannwhitney_sparse_counts_of_non_negative_cells_by_the_passes(monkeypatch):
    """Non-negative cells (log1p data) are counted by the gene-major multi-pass counter,
    negative ones by the stored-entry sort: both give the dense test's exact U, tie terms
    and sizes (control as a row mask, a sparse or a dense matrix; explicit zeros and -0.0;
    a label outside the groups and an empty group; float32 and float64)."""
    import scipy.sparse as sps

    from vcjax.stats import _wilcoxon_sparse as ws
    from vcjax.stats._wilcoxon import _host_counts

    routes = []
    passes = ws.mannwhitney_counts_passes
    monkeypatch.setattr(
        ws, "mannwhitney_counts_passes", lambda *a, **k: routes.append(1) or passes(*a, **k)
    )
    X, lab = _sparse_screen(15)
    for sign in (1, -1):  # -1 keeps the negative values: the stored-entry sort
        Y = abs(X) if sign == 1 else X.copy()
        Y.data[::9] = 0.0
        Y.data[1::9] = -0.0
        ctrl = lab == -2
        dense = Y.toarray()
        sel = lab >= 0
        for dt in (np.float32, np.float64):
            d = dense.astype(dt)
            u_ref, t_ref, n_ref = _host_counts(d[sel], lab[sel], d[ctrl], 6)
            ne = n_ref > 0
            for control in (ctrl, sps.csr_matrix(d[ctrl]), d[ctrl]):
                before = len(routes)
                u, t, n = ws._counts(Y.astype(dt), lab, control, 6)
                assert len(routes) == before + (sign == 1)
                np.testing.assert_array_equal(n, n_ref)
                np.testing.assert_array_equal(u[ne], u_ref[ne])
                np.testing.assert_array_equal(t[ne], t_ref[ne])
                np.testing.assert_array_equal(u[~ne], 0)


def test_celleval_de_table_sparse_and_external_control():
    """Sparse cells give the dense table's numbers; ``control_cells`` tests against
    another object's control cells (scipy reference)."""
    import scipy.sparse as sps

    genes, xr, lr, xp, lp = _synthetic_screen(seed=2)
    dense = Pm.celleval_de_table(xr, lr)
    sparse = Pm.celleval_de_table(sps.csr_matrix(xr), lr)
    for key in ("pvalue", "fdr", "lfc", "statistic"):
        np.testing.assert_array_equal(sparse[key], dense[key], err_msg=key)
    keep = lp != "non-targeting"
    ext = Pm.celleval_de_table(
        sps.csr_matrix(xp[keep]), lp[keep], control_cells=xr[lr == "non-targeting"]
    )
    ctrl = xr[lr == "non-targeting"].astype(np.float64)
    for i, p in enumerate(ext["perts"][:3]):
        x = xp[lp == p].astype(np.float64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pv = ss.mannwhitneyu(x, ctrl, method="asymptotic", axis=0).pvalue
        pv = np.where(np.isnan(pv), 1.0, pv)
        np.testing.assert_allclose(ext["pvalue"][i], pv, rtol=2e-4, atol=1e-30)
        np.testing.assert_allclose(ext["fdr"][i], ss.false_discovery_control(pv), rtol=2e-4)
        with np.errstate(divide="ignore", invalid="ignore"):
            lfc = np.log2(np.expm1(x.mean(0)) / np.expm1(ctrl.mean(0)))
        np.testing.assert_allclose(ext["lfc"][i], np.nan_to_num(lfc, nan=0.0), atol=1e-5)


def test_celleval_metrics_without_pred_control_use_the_truths():
    """Predicted cells without control cells: the prediction's deltas (PDS) and its DE
    test use the truth's control cells; checked against NumPy/scipy references."""
    import scipy.sparse as sps

    genes, xr, lr, xp, lp = _synthetic_screen(seed=3)
    keep = lp != "non-targeting"
    xp, lp = xp[keep], lp[keep]
    r = Pm.celleval_metrics(sps.csr_matrix(xr), lr, sps.csr_matrix(xp), lp, genes)
    assert r["pred_control"] == "truth"
    perts = r["perts"]
    rb = np.stack([xr[lr == p].astype(np.float64).mean(0) for p in perts + ["non-targeting"]])
    pb = np.stack([xp[lp == p].astype(np.float64).mean(0) for p in perts])
    ex = np.array([genes.index(p) if p in genes else -1 for p in perts])
    np.testing.assert_allclose(r["pds"], _ref_pds(pb - rb[-1], rb[:-1] - rb[-1], ex, "l1"))
    ctrl = xr[lr == "non-targeting"].astype(np.float64)

    def table(x, lab):
        fdr, lfc = [], []
        for p in perts:
            a = x[lab == p].astype(np.float64)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pv = ss.mannwhitneyu(a, ctrl, method="asymptotic", axis=0).pvalue
            pv = np.where(np.isnan(pv), 1.0, pv)
            fdr.append(ss.false_discovery_control(pv))
            with np.errstate(divide="ignore", invalid="ignore"):
                lfc.append(np.nan_to_num(np.log2(np.expm1(a.mean(0)) / np.expm1(ctrl.mean(0)))))
        return np.array(fdr), np.array(lfc)

    tf, tl = table(xr, lr)
    pf, pl = table(xp, lp)
    np.testing.assert_allclose(
        r["de_overlap_at_k"], _ref_overlap(tf, tl, pf, pl, None, "overlap"), atol=1e-6
    )
    t_set = tf.astype(np.float32) < 0.05
    want = [np.mean(np.sign(tl[i, s]) == np.sign(pl[i, s])) for i, s in enumerate(t_set)]
    np.testing.assert_allclose(r["de_direction_agreement"], want, atol=1e-6)
    assert np.ptp(r["de_overlap_at_k"]) > 0 and np.ptp(r["pds"]) > 0
    note = Pm.pred_control_note(["pds", "de_overlap_at_k", "mmd"], lp, "non-targeting")
    assert note == {"pds": Pm.TRUTH_CONTROL_NOTE, "de_overlap_at_k": Pm.TRUTH_CONTROL_NOTE}
    assert "de_overlap_at_k" in Pm.available(cells=True, pred_control=False)


def test_cell_distances_batched_sparse_vs_cdist():
    """Energy distance and MMD of many perturbations batched (several size classes,
    chunks, padded slots), from sparse or dense cells, equal float64 cdist references;
    a perturbation without predicted cells is NaN; one over ``max_rows`` takes the
    tiled single-pair kernels."""
    import scipy.sparse as sps

    rng = np.random.default_rng(15)
    g = 30
    perts = [f"p{i}" for i in range(9)]
    npred = [5, 9, 12, 20, 33, 0, 7, 60, 3]
    ntrue = [6, 4, 15, 22, 30, 8, 7, 70, 2]
    pl = np.repeat(perts + ["other"], npred + [4])
    tl = np.repeat(perts + ["non-targeting"], ntrue + [10])
    perm = rng.permutation(pl.size)
    pl = pl[perm]
    shift = {p: rng.normal(scale=0.5, size=g) for p in perts}
    pc = rng.normal(size=(pl.size, g)) * (rng.uniform(size=(pl.size, g)) < 0.4)
    tc = rng.normal(size=(tl.size, g)) * (rng.uniform(size=(tl.size, g)) < 0.4)
    for lab, x in ((pl, pc), (tl, tc)):
        for p in perts:
            x[lab == p] += shift[p] * (lab[lab == p, None] == p)
    pc, tc = pc.astype(np.float32), tc.astype(np.float32)
    for form in ("sparse", "dense"):
        a = sps.csr_matrix(pc) if form == "sparse" else pc
        b = sps.csr_matrix(tc) if form == "sparse" else tc
        got = Pm.cell_distances(a, pl, b, tl, perts, chunk_bytes=16 * 4 * g * 2, max_rows=100)
        got_s = Pm.cell_distances(a, pl, b, tl, perts, sigma=1.5, chunk_bytes=1 << 20)
        for i, p in enumerate(perts):
            x, y = pc[pl == p].astype(np.float64), tc[tl == p].astype(np.float64)
            if len(x) == 0:
                assert np.isnan(got["energy"][i]) and np.isnan(got["mmd"][i])
                continue
            e = 2 * cdist(x, y).mean() - cdist(x, x).mean() - cdist(y, y).mean()
            z = np.concatenate([x, y])
            for s2, res in ((np.var(z, axis=0).sum(), got), (1.5**2, got_s)):
                k = np.exp(-cdist(z, z, "sqeuclidean") / (2 * s2))
                n = len(x)
                m = k[:n, :n].mean() + k[n:, n:].mean() - 2 * k[:n, n:].mean()
                assert res["mmd"][i] == pytest.approx(m, rel=1e-3, abs=1e-6), (form, p)
            assert got["energy"][i] == pytest.approx(e, rel=1e-4, abs=1e-6), (form, p)
    single = Pm.distribution_distances(pc, pl, tc, tl, perts, metric="mmd")
    np.testing.assert_allclose(single, got["mmd"], rtol=1e-5)


def test_centred_gram_host_equals_the_jitted_one():
    """The Gram matrices of cell_distances: NumPy's (the CPU backend's) equal the jitted
    kernel's (an accelerator's) and a float64 reference, padded rows and an empty true
    side included."""
    rng = np.random.default_rng(21)
    b, r, g = 3, 12, 50
    z = rng.normal(size=(b, r, g)).astype(np.float32)
    my = np.zeros((b, r), np.float32)
    my[0, 5:9] = 1  # rows 9.. are padding (zero cells)
    my[1, 2:] = 1
    z[0, 9:] = 0
    want = []
    for zb, mb in zip(z.astype(np.float64), my.astype(np.float64)):
        zc = zb - (mb @ zb) / max(mb.sum(), 1.0)
        want.append(zc @ zc.T)
    want = np.stack(want)
    from vcjax.peers import _kernels as K

    host = K._centred_gram_host(z, my)
    dev = np.asarray(K._centred_gram(z, my))
    assert host.dtype == np.float32 and host.shape == (b, r, r)
    scale = np.abs(want).max()
    np.testing.assert_allclose(host, want, rtol=0, atol=1e-5 * scale)
    np.testing.assert_allclose(dev, want, rtol=0, atol=1e-5 * scale)


def test_score_pseudobulk_sources_equal_the_kernels():
    """One compiled call per source gives the per-metric kernels' values."""
    from vcjax.metrics import pearson_delta, topk_mask

    rng = np.random.default_rng(16)
    p, g = 12, 40
    truth = rng.normal(size=(p, g))
    u = rng.normal(size=g) * 0.1
    scores = rng.normal(size=(p, g))
    genes = [f"G{i}" for i in range(g)]
    perts = ["G3", "G7", "x"] + [f"q{i}" for i in range(p - 3)]
    preds = {"a": truth + rng.normal(size=(p, g)), "b": truth * 0.5}
    names = list(Pm.PEER_METRICS)
    got = Pm.score_pseudobulk_sources(
        names, preds, truth=truth, u_ntc=u, scores=scores, genes=genes, perts=perts
    )
    where = topk_mask(np.abs(scores), k=20)
    ex = np.array([3, 7] + [-1] * (p - 2))
    for s, pred in preds.items():
        want = {
            "pearson_delta_top20": Pm.pearson_delta_top20(pred, truth, u, np.abs(scores)),
            "direction_agreement": Pm.direction_agreement(pred, truth, u, where=where),
            "pearson_delta_centroid": pearson_delta(pred, truth, Pm.perturbed_centroid(truth)),
            "centroid_accuracy": Pm.centroid_accuracy(pred, truth),
            "rank": Pm.rank(pred - u, truth - u),
            "pds": Pm.pds(pred - u, truth - u, exclude=ex),
        }
        assert set(got[s]) == set(want)
        for m, v in want.items():
            np.testing.assert_allclose(got[s][m], np.asarray(v), rtol=1e-5, atol=1e-6, err_msg=m)


def test_warm_up_compiles_what_scoring_calls():
    """After ``warm_up`` for (P, G), scoring the pseudobulk peer metrics and the cell-eval
    DE metrics compiles none of their kernels again, and ``pds`` is one compiled function
    for both paths."""
    import logging

    import jax

    p, g = 9, 31
    Pm.warm_up(list(Pm.PEER_METRICS), n_perts=p, n_genes=g, scores=True, cells=True)
    compiled = []

    class Catch(logging.Handler):
        def emit(self, record):
            msg = record.getMessage()
            if "Finished XLA compilation of" in msg:
                compiled.append(msg.split(" of ")[1].split(" in ")[0])

    handler = Catch()
    logger = logging.getLogger("jax")
    logger.addHandler(handler)
    try:
        with jax.log_compiles(True):
            rng = np.random.default_rng(17)
            truth = rng.normal(size=(p, g))
            Pm.score_pseudobulk_sources(
                list(Pm.PEER_METRICS), {"a": truth + 1.0}, truth=truth, u_ntc=truth[0],
                scores=rng.normal(size=(p, g)).astype(np.float32),
                genes=[f"g{i}" for i in range(g)], perts=[f"p{i}" for i in range(p)],
            )  # fmt: skip
            from vcjax.peers._kernels import _log2_fold_change  # what _de_table calls

            _log2_fold_change(truth, truth[0])
            # the pseudobulk path's pds is the cell-level path's compiled call: warmed up
            # without cells, a cell-level pds (float64 deltas, int32 exclusions) compiles
            # nothing either
            q, h = 11, 29
            Pm.warm_up(list(Pm.PEER_METRICS), n_perts=q, n_genes=h, scores=True, cells=False)
            compiled.clear()
            d = rng.normal(size=(2, q, h))
            Pm.pds(d[0], d[1], exclude=np.full(q, -1, np.int32))
    finally:
        logger.removeHandler(handler)
    hot = {
        "jit(_pseudobulk_kernel)",
        "jit(topk_mask)",
        "jit(perturbed_centroid)",
        "jit(_de_metrics)",
        "jit(pds)",
    }
    assert not hot & set(compiled), compiled
