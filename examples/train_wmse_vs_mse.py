"""Does a DEG-weighted loss (WMSE) reduce mode collapse? MSE vs WMSE on Norman 2019.

A small Flax (``flax.nnx``) model predicts a perturbation's pseudobulk expression (log-normalised) from
learned embeddings of its target genes: a combination ``A+B`` is the *sum* of the
embeddings of ``A`` and ``B``, passed through an MLP to ``G`` outputs, plus a learned
baseline (initialised at the mean training profile). The same architecture is trained
with :func:`vcjax.losses.mse_loss` and with :func:`vcjax.losses.wmse_loss`, whose DEG
weights (``minmax(|t|)²``, docs/metrics.md §3) come from the **training perturbations
only** (:func:`vcjax.data.group_stats` + :func:`vcjax.stats.rank_genes` on training cells).

Held-out perturbations: the eligible perturbations (every target gene also targeted in
some training perturbation) are split into ``--folds`` cross-validation folds, so every
eligible perturbation is predicted once per seed by a model that never saw it — held-out
singles whose gene was seen only inside combinations, and zero-shot combinations ``A+B``
whose genes were seen. All (fold × seed) models of one loss are trained at once
(``vmap`` over runs, ``lax.scan`` over full-batch Adam steps, one ``jit``).

Evaluation follows docs/metrics.md §2/§4/§5 on the half split: truth = half-2 pseudobulk,
Δ reference = ``u_ALL`` of half 1, technical duplicate = half-1 pseudobulk, dataset-mean
baseline = ``u_ALL`` of all cells, evaluation weights and DEG sets from **all** cells
(as the spec; the WMSE and R²w(Δ) of a perturbation without DEGs are NaN, DbD's gate).
Metrics come from :func:`vcjax.engine.score`. Reported, with seeded percentile bootstrap
intervals over held-out perturbations (metrics first averaged over seeds):

* calibrated R²w(Δ) = (m − m_datamean) / (m_techdup − m_datamean), on the means over
  perturbations (a ratio of means; per-perturbation ratios explode when the technical
  duplicate is barely better than the data mean);
* WMSE and Pearson(Δ);
* prediction diversity = Σ_g Var_p(Δ̂_pg) / Σ_g Var_p(Δ_pg), the variance of predicted
  deltas across held-out perturbations relative to the truth's (1 = as diverse as the
  truth, 0 = total mode collapse; the truth's variance includes its sampling noise);
* paired differences WMSE-trained − MSE-trained.

Run from the repository root::

    .venv/bin/python examples/train_wmse_vs_mse.py            # Norman 2019 subset
    .venv/bin/python examples/train_wmse_vs_mse.py --h5ad none # simulated screen

Outputs (``--out``, default ``examples/out/``): ``results.csv``, ``per_perturbation.csv``,
``wmse_vs_mse.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
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

from vcjax import data as vdata  # noqa: E402
from vcjax import stats as vdeg  # noqa: E402
from vcjax.engine import score  # noqa: E402
from vcjax.losses import mse_loss, wmse_loss  # noqa: E402

DEFAULT_H5AD = ROOT.parent / "shared" / "data" / "norman19_perturbench_devel.h5ad"
CONTROL = "control"
KEY = "condition"
LOSSES = ("mse", "wmse")


# --------------------------------------------------------------------------- data


@dataclasses.dataclass(frozen=True)
class Screen:
    """Pseudobulks, references and evaluation weights of one screen (control excluded).

    Attributes:
      names: perturbation labels ``(P,)``.
      genes: gene names ``(G,)``.
      stats: all-cell :class:`vcjax.data.GroupStats` (control included), for training weights.
      pb_full, pb_h1, pb_h2: ``(P, G)`` pseudobulks of all cells / half 1 / half 2.
      u_all_full, u_all_h1: ``(G,)`` mean of per-condition means (control included).
      eval_weights: ``(P, G)`` DEG weights from all cells (docs/metrics.md §3).
      eval_degs: ``(P, G)`` significant DEG sets from all cells (§3.3).
      source: where the data came from.
    """

    names: tuple[str, ...]
    genes: tuple[str, ...]
    stats: vdata.GroupStats
    pb_full: np.ndarray
    pb_h1: np.ndarray
    pb_h2: np.ndarray
    u_all_full: np.ndarray
    u_all_h1: np.ndarray
    eval_weights: np.ndarray
    eval_degs: np.ndarray
    source: str


def simulated_adata(*, seed: int = 0, small: bool = False):
    """A simulated screen with singles and ``A+B`` combinations (raw counts in ``X``)."""
    from vcjax.simulate import simulate_screen

    if small:
        return simulate_screen(
            n_perturbations=10, n_genes=60, cells_per_perturbation=24, n_control=48,
            n_combinations=5, effect_genes=4, shared_shift_genes=8, seed=seed,
        )  # fmt: skip
    return simulate_screen(
        n_perturbations=24, n_genes=500, cells_per_perturbation=100, n_control=300,
        n_combinations=12, seed=seed,
    )  # fmt: skip


def load_adata(h5ad: str | os.PathLike | None):
    """``(adata, source)``: the h5ad when it exists, else a simulated screen."""
    if h5ad is not None and str(h5ad).lower() != "none" and Path(h5ad).exists():
        return vdata.read_h5ad(h5ad), str(h5ad)
    if h5ad is not None and str(h5ad).lower() != "none":
        print(f"[data] {h5ad} not found; using vcjax.simulate.simulate_screen instead")
    return simulated_adata(), "vcjax.simulate.simulate_screen(seed=0)"


def prepare_screen(adata, *, source: str = "") -> Screen:
    """Half split (seed 42), pseudobulks, references and all-cell DEG weights."""
    labels = np.asarray(adata.obs[KEY].astype(str))
    split = vdata.group_stats(adata, KEY, control=CONTROL, split=vdata.split_halves(labels))
    full = split.full
    is_pert = np.array([n != CONTROL for n in full.names])
    res = vdeg.rank_genes(full)  # vs rest, control excluded; rows = perturbations in order
    names = tuple(np.asarray(full.names)[is_pert])
    assert res.names == names
    return Screen(
        names=names,
        genes=tuple(full.genes),
        stats=full,
        pb_full=full.mean[is_pert],
        pb_h1=split.half1.mean[is_pert],
        pb_h2=split.half2.mean[is_pert],
        u_all_full=vdata.reference_vector(full),
        u_all_h1=vdata.reference_vector(split.half1),
        eval_weights=res.weights(),
        eval_degs=res.deg_mask(),
        source=source,
    )


def targets_of(name: str) -> list[str]:
    """Target genes of a perturbation label (``"A+B"`` → ``["A", "B"]``)."""
    return [g for g in name.split("+") if g and g != "ctrl"]


def multi_hot(names: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Vocabulary of target genes and the ``(P, V)`` 0/1 matrix (embedding sum = x @ E)."""
    vocab = sorted({g for n in names for g in targets_of(n)})
    pos = {g: i for i, g in enumerate(vocab)}
    x = np.zeros((len(names), len(vocab)), np.float32)
    for i, n in enumerate(names):
        for g in targets_of(n):
            x[i, pos[g]] = 1.0
    return vocab, x


def make_folds(names: Sequence[str], *, n_folds: int = 3, seed: int = 0) -> list[np.ndarray]:
    """Held-out index sets: every held-out perturbation's targets are trained on in its fold.

    Greedy, seeded: perturbations in random order go to the smallest fold that keeps every
    held-out perturbation of that fold covered (each target gene targeted by a training
    perturbation). Perturbations that cannot be covered are never held out.
    """
    rng = np.random.default_rng(seed)
    tg = [set(targets_of(n)) for n in names]
    held: list[list[int]] = [[] for _ in range(n_folds)]
    for p in rng.permutation(len(names)):
        for f in sorted(range(n_folds), key=lambda f: len(held[f])):
            cand = set(held[f]) | {int(p)}
            seen = set().union(*(tg[q] for q in range(len(names)) if q not in cand))
            if all(tg[q] <= seen for q in cand):
                held[f].append(int(p))
                break
    return [np.sort(np.asarray(h, dtype=np.int64)) for h in held]


def training_weights(screen: Screen, train_idx: np.ndarray) -> np.ndarray:
    """DEG weights ``(n_train, G)`` from the training perturbations' cells only (vs rest)."""
    names = [screen.names[i] for i in train_idx]
    res = vdeg.rank_genes(screen.stats.select([CONTROL, *names]))
    assert list(res.names) == names
    return res.weights()


# --------------------------------------------------------------------------- model


class _MLP(nnx.Module):
    """Target-gene embeddings (summed over a combination) → MLP → ``G`` outputs + baseline."""

    def __init__(self, n_vocab: int, n_genes: int, emb_dim: int, hidden: int, *, rngs: nnx.Rngs):
        self.embedding = nnx.Param(0.1 * jax.random.normal(rngs.params(), (n_vocab, emb_dim)))
        self.dense1 = nnx.Linear(emb_dim, hidden, rngs=rngs)
        self.dense2 = nnx.Linear(hidden, hidden, rngs=rngs)
        self.out = nnx.Linear(hidden, n_genes, kernel_init=nnx.initializers.normal(1e-3), rngs=rngs)
        self.baseline = nnx.Param(jnp.zeros((n_genes,)))

    def __call__(self, x: jax.Array, offset: jax.Array) -> jax.Array:
        h = x @ self.embedding[...]  # sum of the target genes' embeddings
        h = nnx.gelu(self.dense1(h))
        h = nnx.gelu(self.dense2(h))
        return offset + self.baseline[...] + self.out(h)


@dataclasses.dataclass(frozen=True)
class PerturbationMLP:
    """The architecture (hashable, so a compiled trainer can be cached per architecture) and
    the functional view of its :mod:`flax.nnx` module: ``init(key) -> state`` (the
    parameters, a pytree) and ``apply(state, x, offset)``."""

    n_vocab: int
    n_genes: int
    emb_dim: int = 16
    hidden: int = 128

    def module(self, key: jax.Array) -> _MLP:
        return _MLP(self.n_vocab, self.n_genes, self.emb_dim, self.hidden,
                    rngs=nnx.Rngs(params=key))  # fmt: skip

    def init(self, key: jax.Array, *_) -> nnx.State:
        return nnx.split(self.module(key))[1]

    def apply(self, state: nnx.State, x: jax.Array, offset: jax.Array) -> jax.Array:
        return nnx.merge(_graphdef(self), state)(x, offset)


@functools.lru_cache(maxsize=16)
def _graphdef(model: PerturbationMLP):
    return nnx.split(model.module(jax.random.key(0)))[0]


def batch_loss(params, model, x, y, w, mask, offset, use_weights) -> jax.Array:
    """Mean over the (unpadded) training perturbations of the per-perturbation loss.

    ``use_weights`` (a traced 0/1 scalar) selects :func:`vcjax.losses.wmse_loss` (1) or
    :func:`vcjax.losses.mse_loss` (0), so both objectives share one compiled trainer.
    """
    pred = model.apply(params, x, offset)
    per = jnp.where(use_weights > 0, wmse_loss(pred, y, w), mse_loss(pred, y))
    return jnp.sum(per * mask) / jnp.sum(mask)


@functools.lru_cache(maxsize=16)
def make_trainer(model: PerturbationMLP, *, steps: int, lr: float, weight_decay: float):
    """Jitted ``train(keys, x, y, w, mask, offset, use_weights) -> (params, history)``,
    vmapped over runs (full-batch AdamW with a cosine schedule, ``lax.scan`` over steps)."""
    opt = optax.adamw(optax.cosine_decay_schedule(lr, steps, alpha=0.05), weight_decay=weight_decay)
    grad_fn = jax.value_and_grad(batch_loss)

    def train_one(key, x, y, w, mask, offset, use_weights):
        params = model.init(key, x, offset)
        state = opt.init(params)

        def step(carry, _):
            params, state = carry
            value, grads = grad_fn(params, model, x, y, w, mask, offset, use_weights)
            updates, state = opt.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), value

        (params, _), history = jax.lax.scan(step, (params, state), None, length=steps)
        return params, history

    return jax.jit(jax.vmap(train_one))


@dataclasses.dataclass
class RunData:
    """Padded per-run arrays (run = fold × seed); rows past ``n_train`` are masked out."""

    keys: jax.Array
    x: np.ndarray  # (R, N, V)
    y: np.ndarray  # (R, N, G)
    w: np.ndarray  # (R, N, G)
    mask: np.ndarray  # (R, N)
    offset: np.ndarray  # (R, G)
    fold: np.ndarray  # (R,)
    seed: np.ndarray  # (R,)


def build_runs(screen: Screen, folds: list[np.ndarray], seeds: Sequence[int]) -> RunData:
    """Training arrays for every (fold, seed); weights from each fold's training cells."""
    _, xall = multi_hot(screen.names)
    P = len(screen.names)
    trains = [np.setdiff1d(np.arange(P), h) for h in folds]
    n_max = max(len(t) for t in trains)
    per_fold = []
    for tr in trains:
        pad = n_max - len(tr)
        w = training_weights(screen, tr)
        per_fold.append(
            (
                np.pad(xall[tr], ((0, pad), (0, 0))),
                np.pad(screen.pb_full[tr].astype(np.float32), ((0, pad), (0, 0))),
                np.pad(w, ((0, pad), (0, 0))),
                np.r_[np.ones(len(tr), np.float32), np.zeros(pad, np.float32)],
                screen.pb_full[tr].mean(0).astype(np.float32),
            )
        )
    runs = [(f, s) for f in range(len(folds)) for s in seeds]
    stack = [np.stack([per_fold[f][j] for f, _ in runs]) for j in range(5)]
    keys = jnp.stack([jax.random.fold_in(jax.random.key(s), f) for f, s in runs])
    return RunData(
        keys, *stack, fold=np.array([f for f, _ in runs]), seed=np.array([s for _, s in runs])
    )


def train_runs(
    runs: RunData, model: PerturbationMLP, *, loss: str | Sequence[str], steps: int,
    lr: float = 2e-3, weight_decay: float = 0.3,
):  # fmt: skip
    """Train every run of ``runs`` with ``loss`` (``"mse"``/``"wmse"``, or a sequence of
    them: all losses × all runs in one vmapped call, runs repeated per loss).

    Returns:
      ``(params, history)`` with a leading axis of ``len(losses) · R`` runs (loss-major);
      ``history`` is ``(·, steps)``.
    """
    losses = (loss,) if isinstance(loss, str) else tuple(loss)
    bad = [x for x in losses if x not in LOSSES]
    if bad:
        raise ValueError(f"loss must be one of {LOSSES}, got {bad[0]!r}")
    k = len(losses)
    rep = lambda a: np.concatenate([np.asarray(a)] * k)  # noqa: E731
    use_w = np.repeat([1.0 if x == "wmse" else 0.0 for x in losses], len(runs.seed))
    train = make_trainer(model, steps=steps, lr=lr, weight_decay=weight_decay)
    params, hist = train(
        jnp.concatenate([runs.keys] * k), rep(runs.x), rep(runs.y), rep(runs.w), rep(runs.mask),
        rep(runs.offset), use_w.astype(np.float32),
    )  # fmt: skip
    return params, np.asarray(hist)


def predict(params, model: PerturbationMLP, x: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """``(R, P, G)`` predictions of every run's model for the same ``(P, V)`` inputs."""
    fn = jax.jit(jax.vmap(model.apply, in_axes=(0, None, 0)))
    return np.asarray(fn(params, jnp.asarray(x), jnp.asarray(offset)))


# --------------------------------------------------------------------------- evaluation


def per_perturbation_metrics(screen: Screen, idx: np.ndarray, pred: np.ndarray) -> pd.DataFrame:
    """R²w(Δ), WMSE, Pearson(Δ) of ``pred`` (rows = perturbations ``idx``) via the engine.

    The DbD gate is applied: WMSE and R²w(Δ) are NaN for a perturbation without DEGs.
    """
    out = score(
        pred, screen.pb_h2[idx], reference=screen.u_all_h1, weights=screen.eval_weights[idx],
        metrics=["r2w_delta", "wmse", "pearson_delta"],
    )  # fmt: skip
    has_degs = screen.eval_degs[idx].any(axis=1)
    df = pd.DataFrame({k: np.asarray(v, np.float64) for k, v in out.items()})
    df.loc[~has_degs, ["r2w_delta", "wmse"]] = np.nan
    df.insert(0, "perturbation", [screen.names[i] for i in idx])
    return df


def diversity(pred_delta: np.ndarray, true_delta: np.ndarray) -> float:
    """Σ_g Var_p(Δ̂) / Σ_g Var_p(Δ) across perturbations (rows)."""
    return float(np.var(pred_delta, axis=0).sum() / np.var(true_delta, axis=0).sum())


def bootstrap(stat, n: int, *, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile interval of ``stat(indices)`` over resampled perturbations."""
    rng = np.random.default_rng(seed)
    vals = np.array([stat(rng.integers(0, n, n)) for _ in range(n_boot)])
    vals = vals[np.isfinite(vals)]
    return (
        (float(np.quantile(vals, 0.025)), float(np.quantile(vals, 0.975)))
        if vals.size
        else (np.nan, np.nan)
    )


def summarize(
    screen: Screen, held: np.ndarray, preds: dict[str, np.ndarray], *, n_boot: int, seed: int
):
    """Tidy table (source, metric, estimate, 95 % CI, n) and the per-perturbation table.

    ``preds[source]``: ``(S, H, G)`` predictions per seed for the held-out perturbations
    ``held`` (``S = 1`` for the baselines).
    """
    truth_d = screen.pb_h2[held] - screen.u_all_h1
    per = {}
    for src, p in preds.items():
        seeds = [per_perturbation_metrics(screen, held, p[s]) for s in range(p.shape[0])]
        per[src] = (
            pd.concat(seeds)
            .groupby("perturbation", sort=False)
            .mean(numeric_only=True)
            .loc[[screen.names[i] for i in held]]
        )
    gated = np.isfinite(per["techdup"]["r2w_delta"].to_numpy())
    rows = []

    def add(src, metric, fn, n):
        est = fn(np.arange(len(held)))
        lo, hi = bootstrap(fn, len(held), n_boot=n_boot, seed=seed)
        rows.append(dict(source=src, metric=metric, estimate=est, ci_low=lo, ci_high=hi, n_perts=n))

    def calibrated(m, idx):
        g = idx[gated[idx]]
        dm = per["datamean"]["r2w_delta"].to_numpy()[g].mean()
        td = per["techdup"]["r2w_delta"].to_numpy()[g].mean()
        return (m[g].mean() - dm) / (td - dm)

    def div(src):
        p = preds[src]
        return lambda idx: np.mean(
            [diversity(p[s][idx] - screen.u_all_h1, truth_d[idx]) for s in range(p.shape[0])]
        )

    for src in preds:
        m = per[src]
        r2w = m["r2w_delta"].to_numpy()
        add(src, "calibrated_r2w_delta", functools.partial(calibrated, r2w), int(gated.sum()))
        add(src, "r2w_delta", lambda i, r2w=r2w: np.nanmean(r2w[i]), int(gated.sum()))
        add(src, "wmse", lambda i, v=m["wmse"].to_numpy(): np.nanmean(v[i]), int(gated.sum()))
        if src != "datamean":  # Pearson(Δ) of the data mean is undefined (docs/metrics.md §5)
            pe = m["pearson_delta"].to_numpy()
            add(src, "pearson_delta", lambda i, pe=pe: np.nanmean(pe[i]), len(held))
        add(src, "diversity", div(src), len(held))
    for metric in ("calibrated_r2w_delta", "r2w_delta", "wmse", "pearson_delta", "diversity"):
        if metric == "calibrated_r2w_delta":
            a = functools.partial(calibrated, per["wmse_loss"]["r2w_delta"].to_numpy())
            b = functools.partial(calibrated, per["mse_loss"]["r2w_delta"].to_numpy())
        elif metric == "diversity":
            a, b = div("wmse_loss"), div("mse_loss")
        else:
            va, vb = per["wmse_loss"][metric].to_numpy(), per["mse_loss"][metric].to_numpy()
            a = lambda i, v=va: np.nanmean(v[i])  # noqa: E731
            b = lambda i, v=vb: np.nanmean(v[i])  # noqa: E731
        n = len(held) if metric in ("pearson_delta", "diversity") else int(gated.sum())
        add("wmse_loss - mse_loss", metric, lambda i, a=a, b=b: a(i) - b(i), n)
    table = pd.DataFrame(rows)
    long = pd.concat({k: v for k, v in per.items()}, names=["source"]).reset_index()
    return table, long


# --------------------------------------------------------------------------- driver


def run_experiment(
    screen: Screen, *, n_folds: int = 3, seeds: Sequence[int] = (0, 1, 2), steps: int = 400,
    lr: float = 2e-3, weight_decay: float = 0.3, emb_dim: int = 16, hidden: int = 128,
    split_seed: int = 0, n_boot: int = 2000, verbose: bool = True,
):  # fmt: skip
    """Train both losses over folds × seeds and evaluate on the held-out perturbations."""
    t0 = time.perf_counter()
    folds = make_folds(screen.names, n_folds=n_folds, seed=split_seed)
    held = np.concatenate(folds)
    vocab, xall = multi_hot(screen.names)
    model = PerturbationMLP(len(vocab), len(screen.genes), emb_dim=emb_dim, hidden=hidden)
    runs = build_runs(screen, folds, seeds)
    t_prep = time.perf_counter() - t0
    fold_of = np.empty(len(screen.names), np.int64)
    for f, h in enumerate(folds):
        fold_of[h] = f
    preds, hists = {}, {}
    t = time.perf_counter()
    params, hist_all = train_runs(
        runs, model, loss=LOSSES, steps=steps, lr=lr, weight_decay=weight_decay
    )
    allp_all = predict(params, model, xall, np.concatenate([runs.offset] * len(LOSSES)))
    if verbose:
        print(f"[train] {len(LOSSES)} losses x {len(runs.seed)} runs x {steps} steps "
              f"(one vmapped jit): {time.perf_counter() - t:.1f}s")  # fmt: skip
    R = len(runs.seed)
    for j, loss in enumerate(LOSSES):
        allp, hist = allp_all[j * R : (j + 1) * R], hist_all[j * R : (j + 1) * R]  # (R, P, G)
        # seed s, held-out perturbation q: the run of (fold_of[q], s)
        out = np.stack(
            [allp[[np.flatnonzero((runs.fold == fold_of[q]) & (runs.seed == s))[0] for q in held], np.arange(len(held))]
             for s in seeds]
        )  # fmt: skip
        preds[f"{loss}_loss"], hists[loss] = out, hist
        if verbose:
            print(f"[train] {loss:4s} loss {hist[:, 0].mean():.4g} -> {hist[:, -1].mean():.4g}")
    preds["techdup"] = screen.pb_h1[held][None]
    preds["datamean"] = np.broadcast_to(screen.u_all_full, (1, len(held), len(screen.genes)))
    table, per = summarize(screen, held, preds, n_boot=n_boot, seed=split_seed)
    info = dict(
        folds=folds, held=held, preds=preds, hists=hists, t_prep=t_prep,
        t_total=time.perf_counter() - t0, runs=runs,
    )  # fmt: skip
    return table, per, info


def diagnostics(screen: Screen, info: dict) -> dict[str, float]:
    """Why WMSE could or could not help here: how specific the DEG weights are, etc."""
    runs: RunData = info["runs"]
    w = runs.w[0][runs.mask[0] > 0]
    wn = w / np.maximum(w.sum(1, keepdims=True), 1e-12)
    eff = 1.0 / np.sum(wn**2, axis=1)  # effective number of genes per perturbation
    c = np.corrcoef(wn)
    off = c[~np.eye(len(c), dtype=bool)]
    ndeg = screen.eval_degs.sum(1)
    held = info["held"]
    truth_d = screen.pb_h2[held] - screen.u_all_h1
    techdup_d = screen.pb_h1[held] - screen.u_all_h1
    noise = np.var(screen.pb_h2[held] - screen.pb_h1[held], axis=0).sum() / 2
    return {
        "train_weight_effective_genes_median": float(np.median(eff)),
        "train_weight_between_perturbation_corr_mean": float(np.nanmean(off)),
        "perturbations_with_degs": f"{int((ndeg > 0).sum())}/{len(ndeg)}",
        "degs_per_perturbation_median": float(np.median(ndeg)),
        "truth_diversity_noise_fraction": float(noise / np.var(truth_d, axis=0).sum()),
        "techdup_diversity": diversity(techdup_d, truth_d),
    }


def plot(screen: Screen, info: dict, table: pd.DataFrame, path: Path, *, n_show: int = 4) -> None:
    """Predicted vs true Δ for a few held-out perturbations (seed 0), and diversity bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    held, preds = info["held"], info["preds"]
    truth_d = screen.pb_h2[held] - screen.u_all_h1
    strongest = np.argsort(-np.abs(truth_d).sum(1))[:n_show]
    fig, axes = plt.subplots(1, n_show + 2, figsize=(3.2 * (n_show + 2), 3.4))
    for ax, k in zip(axes, strongest):
        for src, col in (("mse_loss", "tab:blue"), ("wmse_loss", "tab:orange")):
            ax.scatter(
                truth_d[k], preds[src][0, k] - screen.u_all_h1, s=6, alpha=0.6, c=col, label=src
            )
        lim = np.abs(truth_d[k]).max() * 1.05
        ax.plot([-lim, lim], [-lim, lim], "k--", lw=0.7)
        ax.set_title(screen.names[held[k]], fontsize=9)
        ax.set_xlabel("true Δ (half 2 − u_ALL h1)")
    axes[0].set_ylabel("predicted Δ")
    axes[0].legend(fontsize=7, markerscale=2)

    def bars(ax, metric, title):
        t = table[
            (table.metric == metric)
            & table.source.isin(["mse_loss", "wmse_loss", "techdup", "datamean"])
        ]
        y = t.estimate.to_numpy()
        err = np.abs(np.vstack([y - t.ci_low.to_numpy(), t.ci_high.to_numpy() - y]))
        ax.bar(
            t.source,
            y,
            yerr=err,
            color=["tab:blue", "tab:orange", "tab:green", "tab:gray"][: len(t)],
            capsize=3,
        )
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="x", labelrotation=30, labelsize=7)

    bars(axes[n_show], "diversity", "diversity Var(Δ̂)/Var(Δ)")
    axes[n_show].axhline(1.0, color="k", lw=0.7, ls="--")
    bars(axes[n_show + 1], "calibrated_r2w_delta", "calibrated R²w(Δ)")
    fig.suptitle(
        f"MSE vs WMSE training, held-out perturbations ({Path(screen.source).name})", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--h5ad",
        default=str(DEFAULT_H5AD),
        help="h5ad (log-normalised or counts); 'none' = simulate",
    )
    ap.add_argument("--out", default=str(ROOT / "examples" / "out"))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--weight-decay", type=float, default=0.3)
    ap.add_argument("--n-boot", type=int, default=2000)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    adata, source = load_adata(args.h5ad)
    screen = prepare_screen(adata, source=source)
    print(f"[data] {source}: {len(screen.names)} perturbations x {len(screen.genes)} genes "
          f"({time.perf_counter() - t0:.1f}s)")  # fmt: skip
    table, per, info = run_experiment(
        screen, n_folds=args.folds, seeds=tuple(range(args.seeds)), steps=args.steps, lr=args.lr,
        weight_decay=args.weight_decay, n_boot=args.n_boot,
    )  # fmt: skip
    held = info["held"]
    combos = [screen.names[i] for i in held if "+" in screen.names[i]]
    print(f"[split] {args.folds} folds: {len(held)} held-out perturbations "
          f"({len(combos)} zero-shot combinations: {', '.join(combos)})")  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "results.csv", index=False)
    per.to_csv(out / "per_perturbation.csv", index=False)
    plot(screen, info, table, out / "wmse_vs_mse.png")
    with pd.option_context("display.width", 140, "display.float_format", "{:.4f}".format):
        print(table.to_string(index=False))
    print("[diagnostics]")
    for k, v in diagnostics(screen, info).items():
        print(f"  {k}: {v if isinstance(v, str) else f'{v:.3f}'}")
    print(f"[done] total {time.perf_counter() - t0:.1f}s; wrote {out}/results.csv, "
          f"per_perturbation.csv, wmse_vs_mse.png")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
