"""When does a DEG-weighted loss (WMSE) reduce mode collapse? A regime study on the simulator.

The Norman 2019 example (``train_wmse_vs_mse.py``) finds no WMSE effect because its model
interpolates the training set. This script asks where the weighted loss *does* change what
a model predicts for unseen perturbations, by varying, on screens simulated with
:func:`vcjax.simulate.simulate_screen`:

* **capacity**: the width ``k`` of a linear bottleneck before the ``G`` outputs (the model's
  predictions lie in a ``k``-dimensional affine subspace);
* **training perturbations**: how many perturbations (half singles, half ``A+B``
  combinations) the model is trained on;
* **effect sparsity**: ``sparse`` (4 effect genes per single, log-fold about 1) or
  ``dense`` (40 effect genes, log-fold about 0.32: the same total squared effect).

The task is GEARS' combination task: every single is trained on, and the model predicts
held-out combinations ``A+B`` of trained singles (the simulator's combinations are additive
plus a sparse interaction). The model (:mod:`flax.nnx`) sums learned embeddings of the target
genes, then MLP → bottleneck → ``G`` outputs + a learned baseline. It is trained with four
objectives from :mod:`vcjax.losses` (``mse_loss``, ``wmse_loss``, ``r2w_loss``, ``gears_loss``
= 100·w), with training DEG weights from the training perturbations' cells only, full-batch
AdamW (optax). All (screen × loss × seed) runs of one capacity are one ``jax.vmap``-ed,
``jax.jit``-ed computation: a ``lax.scan`` over chunks of steps, each chunk a ``lax.scan``
over steps followed by the validation score, the calibrated R²w(Δ) of the validation
combinations from ``screen.scorer(metrics=("r2w_delta",), calibrated=True)`` (on the
device); the parameters of the best validation score are kept (early stopping).

The test combinations of each simulated screen are scored for every run by **one**
:func:`vcjax.sweep` call per screen (cell and perturbation resamples, ``resample="both"``,
shared by every run), giving the leaderboard (rank intervals, ``p_best``) and the paired
WMSE − MSE difference of the calibrated R²w(Δ) from the shared resamples. Diversity
``Σ_g Var_p(Δ̂) / Σ_g Var_p(Δ)`` over the test combinations (1 = as diverse as the truth,
0 = every prediction the same) gets a paired perturbation-bootstrap interval.

Run from the repository root::

    .venv/bin/python examples/regime_study.py            # the full grid (a few minutes)
    .venv/bin/python examples/regime_study.py --quick    # seconds: one small regime

Outputs (``--out``, default ``examples/out/``): ``regime_study.csv`` (one row per regime ×
loss), ``regime_runs.csv`` (one row per run), ``regime_leaderboards.csv``,
``regime_study.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pandas as pd
from flax import nnx

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

import vcjax  # noqa: E402
from vcjax import data as vdata  # noqa: E402
from vcjax import stats as vdeg  # noqa: E402
from vcjax.losses import gears_loss, mse_loss, r2w_loss, wmse_loss  # noqa: E402
from vcjax.stats import interval  # noqa: E402

KEY, CONTROL = "condition", "control"
LOSSES = ("mse", "wmse", "r2w", "gears")
SPARSITY = {
    "sparse": dict(effect_genes=4, effect_size=1.0),
    "dense": dict(effect_genes=40, effect_size=0.32),
}


@dataclasses.dataclass(frozen=True)
class Grid:
    """The regime grid and the training / scoring options."""

    capacities: tuple[int, ...] = (4, 16, 64)
    n_train: tuple[int, ...] = (20, 80)
    sparsity: tuple[str, ...] = ("sparse", "dense")
    losses: tuple[str, ...] = LOSSES
    seeds: int = 5
    n_val: int = 8
    n_test: int = 16
    n_genes: int = 300
    cells: int = 60
    n_control: int = 300
    emb_dim: int = 32
    hidden: int = 64
    steps: int = 1500
    eval_every: int = 50
    lr: float = 3e-3
    weight_decay: float = 1e-3
    n_boot: int = 500
    div_boot: int = 2000
    data_seed: int = 0


QUICK = Grid(
    capacities=(2, 16), n_train=(16,), sparsity=("sparse",), seeds=2, n_val=4, n_test=6,
    n_genes=60, cells=24, n_control=60, emb_dim=8, hidden=16, steps=120, eval_every=20,
    lr=1e-2, n_boot=20, div_boot=200,
)  # fmt: skip


# --------------------------------------------------------------------------- data


def targets_of(name: str) -> list[str]:
    """Target genes of a perturbation label (``"A+B"`` → ``["A", "B"]``)."""
    return [g for g in name.split("+") if g and g != CONTROL]


def multi_hot(names: Sequence[str], vocab: Sequence[str], width: int) -> np.ndarray:
    """``(P, width)`` 0/1 rows (the embedding sum of a perturbation is ``x @ E``)."""
    pos = {g: i for i, g in enumerate(vocab)}
    x = np.zeros((len(names), width), np.float32)
    for i, n in enumerate(names):
        for g in targets_of(n):
            x[i, pos[g]] = 1.0
    return x


@dataclasses.dataclass
class Regime:
    """One simulated screen, its split, training arrays and the val/test truths."""

    name: str
    n_train: int
    sparsity: str
    adata: object
    train: list[str]
    val: list[str]
    test: list[str]
    x: np.ndarray  # (N, V) training inputs (padded rows are zero)
    y: np.ndarray  # (N, G) training pseudobulks
    w: np.ndarray  # (N, G) training DEG weights (training cells only)
    mask: np.ndarray  # (N,) 1 for real rows
    offset: np.ndarray  # (G,) mean training profile (also the r2w_loss reference)
    val_screen: object
    test_screen: object
    x_val: np.ndarray  # (n_val, V) in val_screen.perturbations order
    x_test: np.ndarray  # (n_test, V) in test_screen.perturbations order


def simulate(n_train: int, sparsity: str, grid: Grid, *, seed: int):
    """A screen with ``n_train / 2`` singles and enough combinations for train/val/test."""
    n_single = n_train // 2
    n_combo = n_train - n_single + grid.n_val + grid.n_test
    return vcjax.simulate_screen(
        n_perturbations=n_single, n_combinations=n_combo, n_genes=grid.n_genes,
        cells_per_perturbation=grid.cells, n_control=grid.n_control,
        shared_shift_genes=max(2, grid.n_genes // 15), null_fraction=0.0, counts=False,
        seed=seed,
        **SPARSITY[sparsity],
    )  # fmt: skip


def subset(adata, names: Sequence[str]):
    """Control cells and the cells of ``names`` (a copy)."""
    keep = np.isin(np.asarray(adata.obs[KEY].astype(str)), [CONTROL, *names])
    sub = adata[keep].copy()
    sub.obs[KEY] = sub.obs[KEY].astype(str).astype("category")
    return sub


def make_regime(n_train: int, sparsity: str, grid: Grid, *, n_rows: int, n_vocab: int) -> Regime:
    """Simulate, split (every single trains; combinations → train / val / test), prepare.

    The val and test truths are :func:`vcjax.prepare`-d screens of the control cells and the
    val (test) combinations only, so their Δ reference, DEG weights and baselines see no
    training perturbation. Training arrays are padded to ``n_rows`` rows and ``n_vocab``
    target genes so that every regime of the grid shares one compiled trainer.
    """
    adata = simulate(n_train, sparsity, grid, seed=grid.data_seed)
    sim = adata.uns["simulation"]
    names = [str(n) for n in sim["perturbations"]]
    singles = [n for n in names if "+" not in n]
    combos = [n for n in names if "+" in n]
    rng = np.random.default_rng(grid.data_seed)
    combos = [combos[i] for i in rng.permutation(len(combos))]
    n_tc = n_train - len(singles)
    train = singles + combos[:n_tc]
    val = combos[n_tc : n_tc + grid.n_val]
    test = combos[n_tc + grid.n_val : n_tc + grid.n_val + grid.n_test]
    stats = vdata.group_stats(adata, KEY, control=CONTROL)  # log1p(cp10k) pseudobulks
    row = {n: i for i, n in enumerate(stats.names)}
    y = stats.mean[[row[n] for n in train]].astype(np.float32)
    deg = vdeg.rank_genes(stats.select([CONTROL, *train]))  # vs rest, training cells only
    assert list(deg.names) == train
    w = deg.weights().astype(np.float32)
    pad = n_rows - len(train)
    vocab = sorted(singles)
    val_screen = vcjax.prepare(subset(adata, val), key=KEY, control=CONTROL)
    test_screen = vcjax.prepare(subset(adata, test), key=KEY, control=CONTROL)
    return Regime(
        name=f"n{n_train}-{sparsity}", n_train=n_train, sparsity=sparsity, adata=adata,
        train=train, val=val, test=test,
        x=np.pad(multi_hot(train, vocab, n_vocab), ((0, pad), (0, 0))),
        y=np.pad(y, ((0, pad), (0, 0))), w=np.pad(w, ((0, pad), (0, 0))),
        mask=np.r_[np.ones(len(train)), np.zeros(pad)].astype(np.float32),
        offset=y.mean(0), val_screen=val_screen, test_screen=test_screen,
        x_val=multi_hot(val_screen.perturbations, vocab, n_vocab),
        x_test=multi_hot(test_screen.perturbations, vocab, n_vocab),
    )  # fmt: skip


# --------------------------------------------------------------------------- model


class Net(nnx.Module):
    """Sum of target-gene embeddings → MLP → linear bottleneck of width ``k`` → ``G`` outputs."""

    def __init__(self, n_vocab: int, n_genes: int, *, emb_dim: int, hidden: int, k: int,
                 rngs: nnx.Rngs):  # fmt: skip
        self.embedding = nnx.Param(0.1 * jax.random.normal(rngs.params(), (n_vocab, emb_dim)))
        self.hidden = nnx.Linear(emb_dim, hidden, rngs=rngs)
        self.neck = nnx.Linear(hidden, k, rngs=rngs)
        self.out = nnx.Linear(k, n_genes, kernel_init=nnx.initializers.normal(1e-2), rngs=rngs)
        self.baseline = nnx.Param(jnp.zeros((n_genes,)))

    def __call__(self, x: jax.Array, offset: jax.Array) -> jax.Array:
        h = nnx.gelu(self.hidden(x @ self.embedding[...]))
        return offset + self.baseline[...] + self.out(self.neck(h))


def per_loss(pred, y, w, mask, reference) -> jax.Array:
    """``(len(LOSSES),)``: every objective's batch loss (padded rows masked out)."""
    n = jnp.sum(mask)
    mean = lambda v: jnp.sum(v * mask) / n  # noqa: E731
    gears = gears_loss(pred, y, jnp.arange(y.shape[0]), weights=w, cell_mask=mask > 0)
    return jnp.stack([
        mean(mse_loss(pred, y)), mean(wmse_loss(pred, y, w)),
        mean(r2w_loss(pred, y, reference, w)), gears,
    ])  # fmt: skip


def validation_score(scorer, pred) -> jax.Array:
    """Mean over validation perturbations of the calibrated R²w(Δ) (−inf when undefined)."""
    v = jnp.nanmean(scorer(pred)["r2w_delta"])
    return jnp.where(jnp.isfinite(v), v, -jnp.inf)


@functools.lru_cache(maxsize=8)
def make_trainer(n_vocab: int, n_genes: int, *, k: int, grid: Grid):
    """Jitted ``train(keys, loss_ids, data, scorers) -> (best_state, history)``, vmapped
    over runs: full-batch AdamW, ``steps // eval_every`` chunks, best validation kept."""

    def make(key):
        return Net(n_vocab, n_genes, emb_dim=grid.emb_dim, hidden=grid.hidden, k=k,
                   rngs=nnx.Rngs(params=key))  # fmt: skip

    graphdef, _ = nnx.split(make(jax.random.key(0)))
    opt = optax.adamw(grid.lr, weight_decay=grid.weight_decay)
    n_chunks = grid.steps // grid.eval_every

    def apply(state, x, offset):
        return nnx.merge(graphdef, state)(x, offset)

    def train_one(key, loss_id, d, scorer):
        state = nnx.split(make(key))[1]
        opt_state = opt.init(state)

        def loss_fn(state):
            pred = apply(state, d["x"], d["offset"])
            return per_loss(pred, d["y"], d["w"], d["mask"], d["offset"])[loss_id]

        def step(carry, _):
            state, opt_state = carry
            value, grads = jax.value_and_grad(loss_fn)(state)
            updates, opt_state = opt.update(grads, opt_state, state)
            return (optax.apply_updates(state, updates), opt_state), value

        def chunk(carry, i):
            state, opt_state, best, best_score, best_i = carry
            (state, opt_state), losses = jax.lax.scan(
                step, (state, opt_state), None, length=grid.eval_every
            )
            score = validation_score(scorer, apply(state, d["x_val"], d["offset"]))
            better = score > best_score
            best = jax.tree.map(lambda a, b: jnp.where(better, a, b), state, best)
            carry = (state, opt_state, best, jnp.where(better, score, best_score),
                     jnp.where(better, i, best_i))  # fmt: skip
            return carry, (score, losses[-1])

        init = (state, opt_state, state, -jnp.inf, jnp.asarray(-1))
        (_, _, best, best_score, best_i), (scores, losses) = jax.lax.scan(
            chunk, init, jnp.arange(n_chunks)
        )
        return best, dict(val=scores, loss=losses, best_chunk=best_i, best_val=best_score)

    train = jax.jit(jax.vmap(train_one))
    predict = jax.jit(jax.vmap(apply))
    return train, predict


# --------------------------------------------------------------------------- study


def diversity(pred: np.ndarray, truth: np.ndarray) -> float:
    """``Σ_g Var_p(pred) / Σ_g Var_p(truth)`` over rows (perturbations): the variance of the
    predicted deltas relative to the truth's (the Δ reference cancels)."""
    return float(np.var(pred, axis=0).sum() / np.var(truth, axis=0).sum())


def diversity_resamples(
    preds: np.ndarray, truth: np.ndarray, *, n_boot: int, seed: int, genes: np.ndarray | None = None
):
    """``(M,)`` point diversities and ``(M, n_boot)`` on perturbation resamples shared by
    every model (paired); ``genes``: an optional ``(G,)`` mask of the genes summed over."""
    if genes is not None:
        preds, truth = preds[..., genes], truth[..., genes]
    P = truth.shape[0]
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, P, size=(n_boot, P))

    def div(x, i):  # x (..., P, G), i (B, P) → (..., B)
        xi = x[..., i, :]  # (..., B, P, G)
        return np.var(xi, axis=-2).sum(-1)

    den = div(truth, idx)
    point = np.array([diversity(p, truth) for p in preds])
    return point, div(preds, idx) / den


def paired(point_a, point_b, samples_a, samples_b, ci: float = 0.95):
    """The paired difference ``a − b`` and its interval over the shared resamples: the
    bias-centred percentile interval :meth:`vcjax.SweepResult.leaderboard` uses
    (:func:`vcjax.stats.interval`, ``target="expected"``)."""
    est = float(point_a - point_b)
    d = np.asarray(samples_a, np.float64) - np.asarray(samples_b, np.float64)
    lo, hi = interval(d[None], np.array([est]), ci=ci, method="percentile", target="expected")
    return est, float(lo[0]), float(hi[0])


def train_all(regimes: list[Regime], grid: Grid, *, verbose: bool = True):
    """Train every (capacity × regime × loss × seed) run; returns the runs table and the
    test predictions ``{run_name: (n_test, G)}`` per regime, and the histories."""
    n_vocab = regimes[0].x.shape[1]
    G = grid.n_genes
    runs = [
        (ri, li, s)
        for ri in range(len(regimes))
        for li in range(len(grid.losses))
        for s in range(grid.seeds)
    ]
    loss_ids = np.array([LOSSES.index(grid.losses[li]) for _, li, _ in runs])
    data = {
        f: np.stack([getattr(regimes[ri], f) for ri, _, _ in runs])
        for f in ("x", "y", "w", "mask", "offset", "x_val")
    }
    scorers = [r.val_screen.scorer(metrics=("r2w_delta",), calibrated=True) for r in regimes]
    scorer = jax.tree.map(lambda *a: jnp.stack([a[ri] for ri, _, _ in runs]), *scorers)
    x_test = np.stack([regimes[ri].x_test for ri, _, _ in runs])
    rows, preds, hist = [], {r.name: {} for r in regimes}, {}
    for k in grid.capacities:
        t = time.perf_counter()
        train, predict = make_trainer(n_vocab, G, k=k, grid=grid)
        keys = jnp.stack([jax.random.fold_in(jax.random.key(s), k) for _, _, s in runs])
        best, h = train(keys, jnp.asarray(loss_ids), data, scorer)
        test_pred = np.asarray(predict(best, x_test, data["offset"]))
        h = jax.tree.map(np.asarray, h)
        h["val_pred"] = np.asarray(predict(best, data["x_val"], data["offset"]))
        h["runs"] = runs
        hist[k] = h
        if verbose:
            print(f"[train] k={k}: {len(runs)} runs x {grid.steps} steps (one vmapped jit): "
                  f"{time.perf_counter() - t:.1f}s")  # fmt: skip
        for j, (ri, li, s) in enumerate(runs):
            reg, loss = regimes[ri], grid.losses[li]
            name = f"{loss}/k{k}/s{s}"
            preds[reg.name][name] = test_pred[j]
            rows.append(dict(
                regime=reg.name, n_train=reg.n_train, sparsity=reg.sparsity, k=k, loss=loss,
                seed=s, run=name, best_step=(int(h["best_chunk"][j]) + 1) * grid.eval_every,
                best_val=float(h["best_val"][j]), final_train_loss=float(h["loss"][j][-1]),
            ))  # fmt: skip
    return pd.DataFrame(rows), preds, hist


#: the sweep's metrics: (column, metric, calibrated), each the mean over perturbations
SCORED = (
    ("cal_r2w_delta", "r2w_delta", True),
    ("mse", "mse", False),
    ("pearson_delta", "pearson_delta", False),
)


def score_all(regimes: list[Regime], runs: pd.DataFrame, preds, grid: Grid, *, verbose=True):
    """One :func:`vcjax.sweep` per simulated screen; per-regime summary with paired
    (loss − MSE) intervals; leaderboards (calibrated R²w(Δ))."""
    summary, boards, sweeps = [], [], {}
    runs = runs.copy()
    for ri, reg in enumerate(regimes):
        t = time.perf_counter()
        res = vcjax.sweep(reg.test_screen, preds[reg.name], metrics=[m for _, m, _ in SCORED],
                          n_boot=grid.n_boot, resample="both", seed=ri)  # fmt: skip
        sweeps[reg.name] = res
        board = res.leaderboard("r2w_delta", calibrated=True)
        boards.append(board.reset_index().assign(regime=reg.name))
        truth = np.concatenate([s.truth for s in reg.test_screen.strata])
        names = res.models
        stack = np.stack([preds[reg.name][n] for n in names])
        degs = np.concatenate([s.deg_mask for s in reg.test_screen.strata]).any(axis=0)
        values = {}
        for col, genes in (("diversity", None), ("diversity_deg", degs), ("diversity_rest", ~degs)):
            values[col] = diversity_resamples(
                stack, truth, n_boot=grid.div_boot, seed=ri, genes=genes
            )
        for col, metric, cal in SCORED:
            key = (metric, cal, "mean")
            values[col] = (res.aggregates[key], res.resampled[key])
        pos = {n: i for i, n in enumerate(names)}
        sel = runs.regime == reg.name
        for col, (point, _) in values.items():
            runs.loc[sel, col] = [point[pos[n]] for n in runs.run[sel]]
        for k in grid.capacities:

            def avg(loss, a, k=k, pos=pos):  # mean over seeds of the runs of (loss, k)
                return a[[pos[f"{loss}/k{k}/s{s}"] for s in range(grid.seeds)]].mean(0)

            for loss in grid.losses:
                row = dict(regime=reg.name, n_train=reg.n_train, sparsity=reg.sparsity, k=k,
                           loss=loss)  # fmt: skip
                row.update({col: avg(loss, point) for col, (point, _) in values.items()})
                if loss != "mse" and "mse" in grid.losses:
                    for col, (point, smp) in values.items():
                        est, lo, hi = paired(avg(loss, point), avg("mse", point),
                                             avg(loss, smp), avg("mse", smp))  # fmt: skip
                        row.update({f"d_{col}": est, f"d_{col}_lo": lo, f"d_{col}_hi": hi})
                summary.append(row)
        if verbose:
            print(f"[sweep] {reg.name}: {len(names)} runs, {grid.n_boot} resamples: "
                  f"{time.perf_counter() - t:.1f}s")  # fmt: skip
    return pd.DataFrame(summary), pd.concat(boards, ignore_index=True), runs, sweeps


def run_study(grid: Grid, *, verbose: bool = True):
    """Build the regimes, train every run, score them. Returns a dict of tables and objects."""
    t0 = time.perf_counter()
    n_rows = max(grid.n_train)
    n_vocab = max(n // 2 for n in grid.n_train)
    regimes = [
        make_regime(n, s, grid, n_rows=n_rows, n_vocab=n_vocab)
        for n, s in itertools.product(grid.n_train, grid.sparsity)
    ]
    t_data = time.perf_counter() - t0
    if verbose:
        print(f"[data] {len(regimes)} simulated screens ({grid.n_genes} genes): {t_data:.1f}s")
    t = time.perf_counter()
    runs, preds, hist = train_all(regimes, grid, verbose=verbose)
    t_train = time.perf_counter() - t
    t = time.perf_counter()
    summary, boards, runs, sweeps = score_all(regimes, runs, preds, grid, verbose=verbose)
    t_score = time.perf_counter() - t
    times = dict(data=t_data, train=t_train, score=t_score, total=time.perf_counter() - t0)
    return dict(regimes=regimes, runs=runs, preds=preds, hist=hist, summary=summary,
                boards=boards, sweeps=sweeps, times=times)  # fmt: skip


# --------------------------------------------------------------------------- figure


def plot(summary: pd.DataFrame, path: Path, *, losses: Sequence[str] = ("wmse", "gears", "r2w")):
    """Diversity of MSE and WMSE per regime, and the paired (loss − MSE) differences."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(dict.fromkeys(zip(summary.regime, summary.k)))
    labels = [f"{r}\nk={k}" for r, k in keys]
    xs0 = np.arange(len(keys))
    colors = {"mse": "tab:blue", "wmse": "tab:orange", "gears": "tab:red", "r2w": "tab:purple"}
    panels = (("diversity", "Δ diversity"), ("cal_r2w_delta", "Δ calibrated R²w(Δ)"),
              ("mse", "Δ MSE, all genes (lower is better)"))  # fmt: skip
    fig, axes = plt.subplots(len(panels) + 1, 1, figsize=(1.1 * len(keys) + 2.5, 10), sharex=True)
    by = summary.set_index(["loss", "regime", "k"])
    ax = axes[0]
    for j, loss in enumerate(x for x in ("mse", *losses) if x in set(summary.loss)):
        ax.plot(xs0 + (j - 1.5) * 0.12, by.loc[loss].loc[keys, "diversity"], "o",
                color=colors.get(loss), label=loss)  # fmt: skip
    ax.axhline(1.0, color="k", lw=0.7, ls="--")
    ax.set_yscale("log")
    ax.set_ylabel("diversity Σ Var(Δ̂)/Σ Var(Δ)\n(1 = truth, 0 = collapse)", fontsize=8)
    ax.legend(fontsize=8, ncol=4)
    for ax, (col, title) in zip(axes[1:], panels):
        for j, loss in enumerate(x for x in losses if x in set(summary.loss)):
            t = by.loc[loss].loc[keys]
            y = t[f"d_{col}"].to_numpy()
            err = np.abs(np.vstack([y - t[f"d_{col}_lo"], t[f"d_{col}_hi"] - y]))
            ax.errorbar(xs0 + (j - 1) * 0.2, y, yerr=err, fmt="o", color=colors.get(loss),
                        capsize=3, label=f"{loss} − mse")  # fmt: skip
        ax.axhline(0, color="k", lw=0.7)
        ax.set_ylabel(f"{title}\n(paired, 95 % interval)", fontsize=8)
    axes[1].legend(fontsize=8, ncol=3)
    for ax in axes:
        for x in xs0[1:]:
            ax.axvline(x - 0.5, color="0.9", lw=0.6, zorder=0)
    axes[-1].set_xticks(xs0, labels, fontsize=8)
    fig.suptitle("Weighted losses vs MSE on held-out combinations (simulated; n = training "
                 "perturbations, k = bottleneck width)", fontsize=10)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="one small regime (seconds)")
    ap.add_argument("--out", default=str(ROOT / "examples" / "out"))
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--n-boot", type=int, default=None)
    ap.add_argument("--data-seed", type=int, default=None, help="seed of the simulated screens")
    args = ap.parse_args(argv)
    grid = QUICK if args.quick else Grid()
    over = dict(seeds=args.seeds, steps=args.steps, n_boot=args.n_boot, data_seed=args.data_seed)
    grid = dataclasses.replace(grid, **{k: v for k, v in over.items() if v is not None})
    out = run_study(grid)
    path = Path(args.out)
    path.mkdir(parents=True, exist_ok=True)
    out["summary"].to_csv(path / "regime_study.csv", index=False)
    out["runs"].to_csv(path / "regime_runs.csv", index=False)
    out["boards"].to_csv(path / "regime_leaderboards.csv", index=False)
    plot(out["summary"], path / "regime_study.png")
    cols = ["regime", "k", "loss"] + [
        f"{p}{c}{q}" for c in ("diversity", "diversity_deg", "cal_r2w_delta", "mse")
        for p, q in (("", ""), ("d_", ""), ("d_", "_lo"), ("d_", "_hi"))
    ]  # fmt: skip
    with pd.option_context("display.width", 200, "display.float_format", "{:.3f}".format,
                           "display.max_rows", 200):  # fmt: skip
        print(out["summary"][cols].to_string(index=False))
        print(out["runs"].groupby(["regime", "k", "loss"]).best_step.mean().unstack().to_string())
    t = out["times"]
    print(f"[done] data {t['data']:.0f}s, train {t['train']:.0f}s, sweep {t['score']:.0f}s, "
          f"total {t['total']:.0f}s; wrote {path}/regime_study.csv, regime_runs.csv, "
          f"regime_leaderboards.csv, regime_study.png")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
