"""``evaluate()``: a model's predictions against calibrated baselines, as one tidy table.

The pipeline (METRICS.md §2–§5, the Diversity-by-Design construction):

1. one streaming pass over the truth cells gives per-condition sufficient statistics for
   the two halves of a seeded technical-duplicate split (:mod:`vcjax.data`);
2. the truth of perturbation ``p`` is its half-2 pseudobulk; the delta reference is
   ``u_ALL`` of half 1 (``reference="perturbed"``); DEG t-scores, weights and DEG sets
   come from all cells, each perturbation against the other perturbed cells
   (:mod:`vcjax.deg`);
3. the model and every baseline (:mod:`vcjax.baselines`) are scored with the same
   kernels, weights and reference (:func:`vcjax.engine.score`);
4. DbD's gates are applied (no DEGs → WMSE, R²w(Δ) and Pearson(Δ) on DEGs are NaN; the
   data-mean baseline's Pearson metrics are NaN), and each value is calibrated between
   the best negative/null baseline (0) and the technical duplicate (1).

Cost of a first call: the metric kernels are compiled in a background thread while the
host streams the truth and runs the t-tests (:func:`_warm_up`), and JAX's persistent
compilation cache (:func:`enable_compilation_cache`, on by default, ``VCJAX_COMPILATION_CACHE=0``
turns it off) lets later processes load them from disk instead of compiling.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
import pandas as pd

from vcjax import _peer_table, engine
from vcjax import baselines as B
from vcjax import data as D
from vcjax import deg as DEG
from vcjax.engine import METRICS as ENGINE_METRICS
from vcjax.engine import score

__all__ = [
    "DEFAULT_BASELINES",
    "DEFAULT_METRICS",
    "EvalContext",
    "prepare",
    "evaluate",
    "calibrate",
    "calibration_card",
    "summarize",
    "dynamic_range_fraction",
    "higher_is_better",
    "enable_compilation_cache",
]

log = logging.getLogger("vcjax")

DEFAULT_BASELINES = (
    "control_mean",
    "dataset_mean",
    "null",
    "technical_duplicate",
    "additive",
    "loo_mean",
    "interpolated_duplicate",
)
#: metrics computed against the delta reference, plus two control-referenced ones that
#: show the control bias (``*_ctrl``: deltas against u_NTC).
DEFAULT_METRICS = (
    "mse",
    "wmse",
    "mae",
    "pearson_delta",
    "pearson_delta_degs",
    "pearson_delta_topk",
    "r2_delta",
    "r2w_delta",
    "cosine_delta",
    "pearson_delta_ctrl",
    "r2_delta_ctrl",
)
_CTRL_METRICS = {"pearson_delta_ctrl": "pearson_delta", "r2_delta_ctrl": "r2_delta"}
_DEG_GATED = ("wmse", "r2w_delta", "pearson_delta_degs")
_PEARSON_LIKE = ("pearson_delta", "pearson_delta_degs", "pearson_delta_topk")
_NEGATIVES = ("control_mean", "dataset_mean", "null")


#: environment variable: ``0``/``off`` disables vcjax's persistent compilation cache; any
#: other value is the folder to use instead of ``~/.cache/vcjax/jax``.
CACHE_ENV = "VCJAX_COMPILATION_CACHE"
_cache_state: dict[str, str | None] = {}
_CACHE_MAX_BYTES = 1 << 30  # least recently used entries are evicted beyond this


def enable_compilation_cache() -> str | None:
    """Turn on JAX's persistent compilation cache for vcjax's kernels, once per process.

    The first :func:`evaluate` in a fresh process otherwise spends most of its time
    compiling the metric kernels; with the cache, a later process loads them from disk.
    Nothing is changed when the user configured a cache already (``JAX_COMPILATION_CACHE_DIR``,
    ``jax.config.update("jax_compilation_cache_dir", ...)``), when JAX's cache is disabled
    (``jax_enable_compilation_cache=False``), or when ``VCJAX_COMPILATION_CACHE=0``. Else the
    folder is ``$VCJAX_COMPILATION_CACHE`` if set, or ``$XDG_CACHE_HOME/vcjax/jax``
    (default ``~/.cache/vcjax/jax``), and compilations of any duration are cached (JAX's
    default threshold, 1 s, would skip every vcjax kernel); with the ``filelock`` package
    installed the folder is capped at 1 GiB (least recently used entries evicted; JAX's
    default is no limit). Like any JAX compilation cache,
    the folder must only be writable by users you trust.

    Returns:
      The cache folder in use, or None when no cache is used.
    """
    if "dir" in _cache_state:
        return _cache_state["dir"]
    setting = os.environ.get(CACHE_ENV, "").strip()
    configured = jax.config.jax_compilation_cache_dir
    path: str | None
    if setting.lower() in ("0", "off", "false", "no", "none"):
        path = configured or None
    elif configured:
        path = configured
    elif not jax.config.jax_enable_compilation_cache:
        path = None
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        path = setting or os.path.join(base, "vcjax", "jax")
        try:
            os.makedirs(path, exist_ok=True)
            writable = os.access(path, os.W_OK)
        except OSError:
            writable = False
        if not writable:
            log.info("compilation cache folder %s is not writable; not caching", path)
            path = None
        else:
            jax.config.update("jax_compilation_cache_dir", path)
            if jax.config.jax_persistent_cache_min_compile_time_secs == 1.0:  # JAX's default
                jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
            if jax.config.jax_compilation_cache_max_size == -1 and _have("filelock"):
                # JAX's default is unbounded; its LRU eviction needs the filelock package
                jax.config.update("jax_compilation_cache_max_size", _CACHE_MAX_BYTES)
            # JAX decides whether to use the cache at its first compilation: if that came
            # before this call, make it decide again.
            from jax.experimental.compilation_cache import compilation_cache as cc

            cc.reset_cache()
            log.info("JAX compilation cache: %s", path)
    _cache_state["dir"] = path
    return path


def _have(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def higher_is_better(metric: str) -> bool:
    """Orientation of a metric (errors such as MSE are lower-is-better)."""
    base = _CTRL_METRICS.get(metric, metric)
    spec = ENGINE_METRICS.get(base)
    if spec is not None:
        return spec.higher_is_better
    return _peer_table.higher_is_better(metric)


@dataclasses.dataclass
class EvalContext:
    """Everything the truth side of an evaluation needs, for one covariate value.

    Arrays are float64 NumPy; rows follow ``perts``. ``stats`` keeps the split sufficient
    statistics (with the control group) so that resampling code (:mod:`vcjax.bootstrap`)
    can rebuild every quantity.
    """

    perts: tuple[str, ...]
    genes: tuple[str, ...]
    control: str
    covariate: str | None
    stats: Any  # vcjax.data.SplitStats restricted to this covariate
    truth: np.ndarray  # (P, G) half-2 pseudobulks
    reference: np.ndarray  # (G,) delta reference
    u_ntc: np.ndarray  # (G,)
    u_all_full: np.ndarray  # (G,)
    u_all_half1: np.ndarray  # (G,)
    weights: np.ndarray | None  # (P, G) float32
    scores: np.ndarray | None  # (P, G) float32 t-scores
    pvals_adj: np.ndarray | None  # (P, G)
    deg_mask: np.ndarray | None  # (P, G) bool
    baselines: dict[str, np.ndarray]
    notes: dict[str, list[str]]
    options: dict[str, Any]
    #: the truth AnnData, the per-cell split (1/2) and, with a covariate, the cells of this
    #: covariate value: what a cell-level resampler needs to rebuild ``stats``.
    adata: Any = None
    cell_split: np.ndarray | None = None
    cell_mask: np.ndarray | None = None


def _reference(stats_h1, stats_full, reference) -> np.ndarray:
    if isinstance(reference, str) and reference == "control":
        return D.reference_vector(stats_full, "control")
    if isinstance(reference, str):
        return D.reference_vector(stats_h1, reference)
    return D.reference_vector(stats_h1, np.asarray(reference, dtype=np.float64))


def _one_context(
    split,
    *,
    control,
    covariate,
    reference,
    weights,
    weights_from,
    deg_method,
    baselines,
    seed,
    options,
) -> EvalContext:
    full = split.full
    h1, h2 = split.half1, split.half2
    names = list(full.names)
    if control not in names:
        where = f" for covariate {covariate!r}" if covariate is not None else ""
        raise D.VcjaxInputError(f"control label {control!r} not found{where}")
    perts = tuple(n for n in names if n != control)
    if not perts:
        raise D.VcjaxInputError("no perturbation besides the control group")
    rows = np.array([names.index(p) for p in perts])
    ci = names.index(control)
    pb_full, pb_h1, pb_h2 = full.mean, h1.mean, h2.mean
    # = D.reference_vector(·, "perturbed"), from the pseudobulks already at hand
    u_all_h1 = pb_h1.mean(axis=0)
    u_all_full = pb_full.mean(axis=0)
    u_ntc = pb_full[ci]
    if isinstance(reference, str) and reference == "perturbed":
        ref = u_all_h1
    else:
        ref = _reference(h1, full, reference)

    w = scores = padj = mask = None
    if isinstance(weights, str) and weights == "deg":
        deg_stats = full if weights_from == "all" else h1
        res = DEG.rank_genes(deg_stats, method=deg_method, vs="rest")
        if res.names == perts:  # the usual case: no reordering copies
            scores, padj, w, mask = res.scores, res.pvals_adj, res.weights(), res.deg_mask()
        else:
            order = [res.names.index(p) for p in perts]
            scores = np.asarray(res.scores)[order]
            padj = np.asarray(res.pvals_adj)[order]
            w = np.asarray(res.weights())[order]
            mask = np.asarray(res.deg_mask())[order]
    elif weights is not None and not isinstance(weights, str):
        w = np.asarray(weights, dtype=np.float32)
        if w.shape != (len(perts), len(full.genes)):
            raise D.VcjaxInputError(
                f"weights have shape {w.shape}, expected ({len(perts)}, {len(full.genes)})"
            )
    elif weights not in (None, "uniform"):
        raise ValueError(f"weights must be 'deg', 'uniform', None or an array, got {weights!r}")

    P = len(perts)
    preds: dict[str, np.ndarray] = {}
    notes: dict[str, list[str]] = {}
    dup = pb_h1[rows]
    loo = None

    def loo_mean() -> np.ndarray:  # shared by loo_mean and interpolated_duplicate
        nonlocal loo
        if loo is None:
            loo = B.loo_mean(pb_full[rows])
        return loo

    for name in baselines:
        if name == "control_mean":
            preds[name] = B.control_mean(u_ntc, P)
        elif name == "dataset_mean":
            preds[name] = B.dataset_mean(u_all_full, P)
        elif name == "technical_duplicate":
            preds[name] = B.technical_duplicate(dup)
        elif name == "null":
            preds[name] = B.null(dup, seed=seed)
        elif name == "additive":
            preds[name], notes[name] = B.additive(perts, dup, u_all_h1)
        elif name == "loo_mean":
            preds[name] = loo_mean()
        elif name == "interpolated_duplicate":
            if padj is None:
                log.info("interpolated_duplicate needs DEG p-values (weights='deg'); skipped")
                continue
            preds[name] = B.interpolated_duplicate(dup, loo_mean(), padj)
        else:
            raise ValueError(f"unknown baseline {name!r}; available: {DEFAULT_BASELINES}")
    return EvalContext(
        perts=perts,
        genes=tuple(full.genes),
        control=control,
        covariate=covariate,
        stats=split,
        truth=pb_h2[rows],
        reference=ref,
        u_ntc=u_ntc,
        u_all_full=u_all_full,
        u_all_half1=u_all_h1,
        weights=w,
        scores=scores,
        pvals_adj=padj,
        deg_mask=mask,
        baselines=preds,
        notes=notes,
        options=options,
    )


def prepare(
    truth,
    *,
    key: str,
    control: str,
    reference: str | np.ndarray = "perturbed",
    weights: str | np.ndarray | None = "deg",
    weights_from: str = "all",
    deg_method: str = "t-test_overestim_var",
    baselines: Sequence[str] = DEFAULT_BASELINES,
    split: str | np.ndarray | None = None,
    split_seed: int = 42,
    seed: int = 0,
    layer: str | None = None,
    normalize: str | None = "auto",
    covariate: str | None = None,
    drop_small: bool = False,
    progress: bool = False,
) -> list[EvalContext]:
    """Truth-side preparation of :func:`evaluate` (one context per covariate value).

    See :func:`evaluate` for the arguments.
    """
    if weights_from not in ("all", "half1"):
        raise ValueError("weights_from must be 'all' (the paper's) or 'half1' (stricter)")
    enable_compilation_cache()
    adata = D.read_h5ad(truth) if isinstance(truth, str) or hasattr(truth, "__fspath__") else truth
    if split is None:
        if key not in adata.obs.columns:
            raise D.VcjaxInputError(
                f"key {key!r} not in obs; available columns: {', '.join(map(str, adata.obs.columns))}"
            )
        labels = adata.obs[key].astype(str).to_numpy()
        if covariate is not None:
            if covariate not in adata.obs.columns:
                raise D.VcjaxInputError(f"covariate {covariate!r} not in obs")
            labels = adata.obs[covariate].astype(str).to_numpy() + "\x1f" + labels
        split = D.split_halves(labels, seed=split_seed)
    stats = D.group_stats(
        adata,
        key,
        control=control,
        layer=layer,
        normalize=normalize,
        covariate=covariate,
        split=split,
        drop_small=drop_small,
        progress=progress,
    )
    options = dict(
        key=key,
        reference=reference if isinstance(reference, str) else "array",
        weights_from=weights_from,
        deg_method=deg_method,
        split_seed=split_seed,
        seed=seed,
        normalization=stats.half1.normalization,
    )
    kw = dict(
        control=control,
        reference=reference,
        weights=weights,
        weights_from=weights_from,
        deg_method=deg_method,
        baselines=tuple(baselines),
        seed=seed,
        options=options,
    )
    split_arr = split if not isinstance(split, str) else adata.obs[split].to_numpy()
    split_arr = np.asarray(split_arr)
    if covariate is None:
        ctx = _one_context(stats, covariate=None, **kw)
        ctx.adata, ctx.cell_split = adata, split_arr
        return [ctx]
    contexts = []
    cov_labels = adata.obs[covariate].astype(str).to_numpy()
    for v in dict.fromkeys(stats.half1.covariate):
        sub = D.SplitStats(stats.half1.for_covariate(v), stats.half2.for_covariate(v))
        ctx = _one_context(sub, covariate=v, **dict(kw, options=dict(options)))
        ctx.adata, ctx.cell_split, ctx.cell_mask = adata, split_arr, cov_labels == v
        contexts.append(ctx)
    return contexts


# ------------------------------------------------------------------ predictions


def _align_prediction(pred, ctx: EvalContext, *, key: str, layer, normalize) -> np.ndarray:
    """The model prediction as a ``(P, G)`` float64 matrix aligned with ``ctx``.

    Accepts an AnnData of predicted cells (pseudobulked by ``key``) or with one row per
    perturbation, a DataFrame (index perturbations, columns genes), a mapping
    ``name → (G,)`` in the truth's gene order, or a tuple ``(names, matrix[, genes])``.
    """
    genes: Sequence[str] | None
    owned = False  # is ``matrix`` a fresh array (not the caller's)?
    if hasattr(pred, "obs") and hasattr(pred, "var_names"):
        if key not in pred.obs.columns:
            raise D.VcjaxInputError(f"key {key!r} not in the prediction's obs")
        labels = pred.obs[key].astype(str)
        if ctx.covariate is not None:
            cov = ctx.options.get("covariate_key")
            if cov and cov in pred.obs.columns:
                keep = (pred.obs[cov].astype(str) == ctx.covariate).to_numpy()
                pred = pred[keep]
                labels = labels[keep]
        if labels.is_unique:
            X = pred.X if layer is None else pred.layers[layer]
            X = X.toarray() if hasattr(X, "toarray") else np.asarray(X)
            names, matrix = list(labels), np.asarray(X, dtype=np.float64)
        else:
            st = D.group_stats(pred, key, control=None, layer=layer, normalize=normalize)
            names, matrix = list(st.names), st.mean
            owned = True
        genes = list(map(str, pred.var_names))
    elif isinstance(pred, pd.DataFrame):
        names, matrix, genes = (
            list(map(str, pred.index)),
            pred.to_numpy(np.float64),
            list(map(str, pred.columns)),
        )
    elif isinstance(pred, Mapping):
        names = list(pred)
        matrix = np.stack([np.asarray(pred[n], dtype=np.float64) for n in names])
        genes = None
        owned = True
    elif isinstance(pred, tuple) and len(pred) in (2, 3):
        names = list(map(str, pred[0]))
        matrix = np.asarray(pred[1], dtype=np.float64)
        genes = list(map(str, pred[2])) if len(pred) == 3 else None
    else:
        raise TypeError(
            "pred must be an AnnData, a DataFrame, a mapping name → profile, or (names, matrix[, genes])"
        )

    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise D.VcjaxInputError(
            f"duplicated perturbation names in the prediction: {', '.join(dup[:5])}"
        )
    if matrix.ndim != 2 or matrix.shape[0] != len(names):
        raise D.VcjaxInputError(
            f"prediction matrix has shape {matrix.shape}, expected ({len(names)}, G)"
        )
    if genes is None:
        if matrix.shape[1] != len(ctx.genes):
            raise D.VcjaxInputError(
                f"prediction has {matrix.shape[1]} genes but the truth has {len(ctx.genes)}; pass gene names to match"
            )
        gidx = np.arange(len(ctx.genes))
    else:
        if len(set(genes)) != len(genes):
            dup = sorted({g for g in genes if genes.count(g) > 1})
            raise D.VcjaxInputError(
                f"duplicated gene names in the prediction: {', '.join(dup[:5])}"
            )
        pos = {g: i for i, g in enumerate(genes)}
        missing = [g for g in ctx.genes if g not in pos]
        if len(missing) == len(ctx.genes):
            raise D.VcjaxInputError("the prediction and the truth share no genes")
        if missing:
            raise D.VcjaxInputError(
                f"the prediction lacks {len(missing)} of the truth's {len(ctx.genes)} genes: "
                + ", ".join(missing[:5])
                + (" …" if len(missing) > 5 else "")
            )
        gidx = np.array([pos[g] for g in ctx.genes])
    where = {n: i for i, n in enumerate(names)}
    missing = [p for p in ctx.perts if p not in where]
    if missing:
        raise D.VcjaxInputError(
            f"the prediction lacks {len(missing)} of {len(ctx.perts)} perturbations: "
            + ", ".join(missing[:5])
            + (" …" if len(missing) > 5 else "")
        )
    ridx = np.array([where[p] for p in ctx.perts])
    # skip the (P, G) copies when rows or genes are already in the truth's order
    if _is_identity(ridx, matrix.shape[0]):
        out = matrix if owned else matrix.copy()  # never an alias of the caller's array
    else:
        out = np.take(matrix, ridx, axis=0)
    if not _is_identity(gidx, matrix.shape[1]):
        out = np.take(out, gidx, axis=1)
    if not np.all(np.isfinite(out)):
        r, c = np.argwhere(~np.isfinite(out))[0]
        raise D.VcjaxInputError(
            f"the prediction has NaN/inf values (first: perturbation {ctx.perts[r]!r}, gene {ctx.genes[c]!r})"
        )
    return out


def _is_identity(idx: np.ndarray, n: int) -> bool:
    return idx.shape == (n,) and bool(np.all(idx == np.arange(n)))


# ------------------------------------------------------------------ scoring


def _engine_metric_sets(
    metrics: Sequence[str], *, weights: bool, mask: bool
) -> tuple[list[str], list[str]]:
    """The engine metrics of one scoring call against the delta reference (``core``, all but
    ``pearson_delta_topk``, which has its own call) and the control-referenced ones."""
    core = [m for m in metrics if m in ENGINE_METRICS and m != "pearson_delta_topk"]
    ctrl = [m for m in metrics if m in _CTRL_METRICS]
    if not weights:
        core = [m for m in core if "weights" not in ENGINE_METRICS[m].needs]
    if not mask:
        core = [m for m in core if "mask" not in ENGINE_METRICS[m].needs]
    return core, ctrl


def _warm_up(adata, *, key, control, metrics, weights, k, strict, chunk_size):
    """Compile the engine's kernels in a background thread while the host prepares the truth.

    The scoring calls of :func:`_score_sources` are made once on one chunk of zero inputs
    with the same chunk size, ``G``, dtypes and options as the real ``P``-row calls, so
    their compiled functions are ready (in JAX's caches) when those come; XLA compiles and NumPy
    computes with the GIL released, so on two or more cores the first call's compilation
    overlaps the streaming pass and the t-tests. Returns the thread (join it before
    scoring), or None when the shapes cannot be known yet. Never raises: it is only a
    warm-up, and any error is left for the real calls to report.
    """
    import threading

    try:
        labels = adata.obs[key]
        n_groups = int(labels.nunique())
        present = bool((labels.astype(str) == control).any())
        P, G = n_groups - int(present), int(adata.n_vars)
        if P < 1 or G < 1:
            return None
        names = _requested_metrics(metrics)  # "all" adds only peer-table metrics
        has_w = (isinstance(weights, str) and weights == "deg") or (
            weights is not None and not isinstance(weights, str)
        )
        has_m = isinstance(weights, str) and weights == "deg"
        core, ctrl = _engine_metric_sets(names, weights=has_w, mask=has_m)
        topk = "pearson_delta_topk" in names and has_w
    except Exception:  # noqa: BLE001 - prepare() reports bad input
        return None
    if not (core or ctrl or topk):
        return None
    x64 = bool(jax.config.jax_enable_x64)  # a thread does not inherit jax.enable_x64()

    def run() -> None:
        try:
            with jax.enable_x64(x64):
                wdt = np.dtype(jax.dtypes.canonicalize_dtype(np.float64))
                # one chunk of the real calls' chunk size: the same compiled function,
                # a chunk's work instead of P rows'
                rows = chunk_size or engine.chunk_rows(P, G, engine._shards_per_chunk())
                row = np.zeros(G, wdt)
                z = np.broadcast_to(row, (rows, G))  # O(G) memory; chunks are copied as needed
                zb = np.broadcast_to(np.zeros(G, bool), (rows, G))
                ref = np.zeros(G)
                kw = dict(k=int(k), strict=bool(strict), chunk_size=rows)
                if core:
                    score(
                        z,
                        z,
                        reference=ref,
                        weights=z if has_w else None,
                        mask=zb if has_m else None,
                        metrics=core,
                        **kw,
                    )
                if topk:
                    score(z, z, reference=ref, weights=z, metrics=["pearson_delta_topk"], **kw)
                if ctrl:
                    score(z, z, reference=ref, metrics=[_CTRL_METRICS[m] for m in ctrl], **kw)
        except Exception:  # noqa: BLE001 - only a warm-up
            log.debug("kernel warm-up failed", exc_info=True)

    thread = threading.Thread(target=run, name="vcjax-warm-up", daemon=True)
    thread.start()
    return thread


def _engine_array(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``x`` as a C-contiguous, 64-byte aligned array of ``dtype`` (a copy only if needed).

    What :func:`vcjax.engine.score` streams to the device without a further copy.
    """
    x = np.asarray(x)
    if x.dtype == dtype and x.flags.c_contiguous and x.ctypes.data % engine._ALIGN == 0:
        return x
    out = engine._aligned_empty(x.shape, dtype)
    np.copyto(out, x, casting="unsafe")
    return out


def _score_sources(
    ctx: EvalContext,
    preds: Mapping[str, np.ndarray],
    metrics: Sequence[str],
    *,
    k: int,
    strict: bool,
    gate: bool,
    chunk_size: int | None,
    pred_object=None,
    dataset: dict[str, dict[str, np.ndarray]] | None = None,
) -> dict[str, dict[str, np.ndarray]]:
    """``{source: {metric: (P,)}}`` for every prediction, with DbD's gates applied.

    Dataset-level values (the hit-discovery metrics) go into ``dataset`` as
    ``{source: {metric: (1,)}}`` when a dict is given; they are dropped otherwise.
    """
    core, ctrl = _engine_metric_sets(
        metrics, weights=ctx.weights is not None, mask=ctx.deg_mask is not None
    )
    # The engine casts every input to its working dtype chunk by chunk; cast the inputs
    # shared by all sources once instead (same values: the same cast, done earlier).
    wdt = np.dtype(jax.dtypes.canonicalize_dtype(np.float64))
    truth = _engine_array(ctx.truth, wdt)
    weights = None if ctx.weights is None else _engine_array(ctx.weights, wdt)
    mask = None if ctx.deg_mask is None else _engine_array(ctx.deg_mask, np.dtype(bool))
    topk_w = None
    if "pearson_delta_topk" in metrics:
        topk_w = np.abs(ctx.scores) if ctx.scores is not None else ctx.weights
        topk_w = None if topk_w is None else _engine_array(topk_w, wdt)
    peer_names = [m for m in metrics if m not in ENGINE_METRICS and m not in _CTRL_METRICS]
    no_deg = None if ctx.deg_mask is None else ~ctx.deg_mask.any(axis=1)
    out: dict[str, dict[str, np.ndarray]] = {}
    dataset = {} if dataset is None else dataset
    for source, pred in preds.items():
        res: dict[str, np.ndarray] = {}
        kw = dict(chunk_size=chunk_size, k=k, strict=strict)
        pred_w = _engine_array(pred, wdt)
        if core:
            got = score(
                pred_w,
                truth,
                reference=ctx.reference,
                weights=weights,
                mask=mask,
                metrics=core,
                **kw,
            )
            res.update({m: np.asarray(v, dtype=np.float64) for m, v in got.items()})
        if topk_w is not None:
            got = score(
                pred_w,
                truth,
                reference=ctx.reference,
                weights=topk_w,
                metrics=["pearson_delta_topk"],
                **kw,
            )
            res["pearson_delta_topk"] = np.asarray(got["pearson_delta_topk"], dtype=np.float64)
        if ctrl:
            got = score(
                pred_w, truth, reference=ctx.u_ntc, metrics=[_CTRL_METRICS[m] for m in ctrl], **kw
            )
            res.update({m: np.asarray(got[_CTRL_METRICS[m]], dtype=np.float64) for m in ctrl})
        if peer_names:
            usable = bool(np.all(np.isfinite(pred)))
            peer = _peer_table.score(peer_names, source, pred, ctx, pred_object) if usable else {}
            res.update({m: v for m, v in peer.items() if m not in _peer_table.DATASET})
            ds = _peer_table.score_dataset(peer_names, pred, ctx) if usable else {}
            wanted = [m for m in peer_names if m in _peer_table.DATASET]
            if wanted:
                dataset[source] = {m: np.array([ds.get(m, np.nan)]) for m in wanted}
            for m in peer_names:
                if m not in res and m not in _peer_table.DATASET:
                    res[m] = np.full(len(ctx.perts), np.nan)
        if gate and no_deg is not None:
            for m in _DEG_GATED:
                if m in res:
                    res[m] = np.where(no_deg, np.nan, res[m])
        if gate and source == "dataset_mean":
            for m in _PEARSON_LIKE:
                if m in res:
                    res[m] = np.full_like(res[m], np.nan)
        out[source] = {m: res[m] for m in metrics if m in res}
    return out


def calibrate(values: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, dict[str, np.ndarray]]:
    """Calibrated scores: 0 at the best negative/null baseline, 1 at the technical duplicate.

    Per metric and perturbation, ``(m − m_neg) / (m_dup − m_neg)`` where ``m_neg`` is the
    best (by the metric's orientation) of the ``control_mean``, ``dataset_mean`` and
    ``null`` values that are not NaN. Because numerator and denominator share the
    orientation, higher is better for error metrics too. NaN when the duplicate is no
    better than ``m_neg``, or either is NaN.
    """
    dup = values.get("technical_duplicate")
    out: dict[str, dict[str, np.ndarray]] = {s: {} for s in values}
    if dup is None:
        return {s: {m: np.full_like(v, np.nan) for m, v in d.items()} for s, d in values.items()}
    for metric, m_dup in dup.items():
        hib = higher_is_better(metric)
        negs = [values[s][metric] for s in _NEGATIVES if s in values and metric in values[s]]
        if negs:
            stack = np.stack(negs)
            with np.errstate(all="ignore"):
                all_nan = np.all(np.isnan(stack), axis=0)
                filled = np.where(np.isnan(stack), -np.inf if hib else np.inf, stack)
                m_neg = np.where(all_nan, np.nan, filled.max(0) if hib else filled.min(0))
        else:
            m_neg = np.full_like(m_dup, np.nan)
        span = m_dup - m_neg
        better = span > 0 if hib else span < 0
        for source, d in values.items():
            if metric in d:
                with np.errstate(all="ignore"):
                    out[source][metric] = np.where(
                        better, (d[metric] - m_neg) / np.where(better, span, 1.0) + 0.0, np.nan
                    )  # + 0.0 turns -0.0 into 0.0
    return out


def evaluate(
    truth,
    pred=None,
    *,
    key: str,
    control: str,
    reference: str | np.ndarray = "perturbed",
    weights: str | np.ndarray | None = "deg",
    baselines: Sequence[str] = DEFAULT_BASELINES,
    metrics: Sequence[str] | str | None = None,
    seed: int = 0,
    split: str | np.ndarray | None = None,
    split_seed: int = 42,
    weights_from: str = "all",
    deg_method: str = "t-test_overestim_var",
    k: int = 20,
    strict: bool = False,
    gate: bool = True,
    layer: str | None = None,
    pred_layer: str | None = None,
    normalize: str | None = "auto",
    pred_normalize: str | None = "auto",
    covariate: str | None = None,
    drop_small: bool = False,
    n_boot: int = 0,
    ci: float = 0.95,
    ci_method: str = "percentile",
    refit_weights: bool = True,
    chunk_size: int | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    """Score a model's predictions and the calibration baselines; return a tidy table.

    Args:
      truth: the measured screen: an AnnData (in memory or backed) or a path to ``.h5ad``.
      pred: the model's predictions (see :func:`_align_prediction` for the accepted
        forms), or None to score the baselines only.
      key: ``obs`` column with the condition labels.
      control: the control label (e.g. ``"control"``, ``"non-targeting"``).
      reference: the delta reference. ``"perturbed"`` (default): ``u_ALL`` of half 1, the
        mean of per-condition means with control counted as one condition (METRICS.md
        §2); ``"perturbed_no_control"``; ``"perturbed_cells"`` (mean over perturbed
        cells of half 1); ``"control"`` (``u_NTC`` over all control cells); or a ``(G,)``
        array.
      weights: ``"deg"`` (the DbD DEG weights, METRICS.md §3.2), ``"uniform"``/None (no
        weighted metrics), or a ``(P, G)`` array.
      baselines: which baselines to score (:data:`DEFAULT_BASELINES`).
      metrics: metric names (default :data:`DEFAULT_METRICS`; ``"all"`` adds every peer
        metric that the inputs allow).
      seed: seed of the null derangement and of the bootstrap.
      split: the technical-duplicate split: an ``obs`` column or ``(N,)`` array of 1/2;
        default: the paper's seeded split (``split_seed=42``, METRICS.md §2).
      weights_from: ``"all"`` cells (the paper's; the weights see the half-2 truth) or
        ``"half1"`` only (stricter).
      deg_method: ``"t-test_overestim_var"`` (the paper's) or ``"t-test"`` (Welch).
      k: genes of ``pearson_delta_topk`` (largest ``|t|``).
      strict: NaN instead of sklearn's forced R² values for constant truths.
      gate: apply DbD's NaN gates (no DEGs; data-mean Pearson).
      layer, pred_layer: AnnData layers to read instead of ``X``.
      normalize, pred_normalize: ``"auto"`` normalises raw integer counts (1e4 per cell,
        log1p); None trusts the input.
      covariate: ``obs`` column (e.g. ``cell_type``): every step runs within each value.
      drop_small: drop conditions with fewer than 2 cells (with a warning) instead of
        raising.
      n_boot, ci, ci_method, refit_weights: bootstrap intervals (:mod:`vcjax.bootstrap`).
      chunk_size: rows per engine chunk.
      progress: show progress bars.

    Returns:
      A DataFrame with one row per (perturbation, metric, source) and columns
      ``perturbation``, ``metric``, ``source`` (``"model"`` or a baseline name),
      ``value``, ``calibrated`` and ``note`` (why a value is undefined, where known), plus
      ``covariate`` when one is given. Dataset-level metrics (hit discovery) have one row
      with ``perturbation = "(all)"``. With ``n_boot > 0`` (:func:`vcjax.bootstrap.add_intervals`):
      ``ci_low``/``ci_high`` (and ``calibrated_ci_low``/``calibrated_ci_high``,
      ``boot_nan_frac``) on every row, plus paired rows ``source = "model-vs-<baseline>"``
      whose ``value`` is the difference oriented so that positive means the model is better,
      with its interval and ``win_rate`` (fraction of resamples the model wins).
      ``df.attrs`` records the JAX backend and the options used.
    """
    enable_compilation_cache()
    if isinstance(truth, str) or hasattr(truth, "__fspath__"):
        truth = D.read_h5ad(truth)
    warm = None
    if covariate is None:  # the shapes of the scoring calls are known before the truth pass
        warm = _warm_up(
            truth,
            key=key,
            control=control,
            metrics=metrics,
            weights=weights,
            k=k,
            strict=strict,
            chunk_size=chunk_size,
        )
    try:
        contexts = prepare(
            truth,
            key=key,
            control=control,
            reference=reference,
            weights=weights,
            weights_from=weights_from,
            deg_method=deg_method,
            baselines=baselines,
            split=split,
            split_seed=split_seed,
            seed=seed,
            layer=layer,
            normalize=normalize,
            covariate=covariate,
            drop_small=drop_small,
            progress=progress,
        )
    finally:
        if warm is not None:
            warm.join()
    metric_list = _resolve_metrics(metrics, contexts[0], pred)
    frames = []
    for ctx in contexts:
        ctx.options["covariate_key"] = covariate
        preds = dict(ctx.baselines)
        if pred is not None:
            preds = {
                "model": _align_prediction(
                    pred, ctx, key=key, layer=pred_layer, normalize=pred_normalize
                ),
                **preds,
            }
            ctx.options["model"] = preds["model"]
        ctx.options.update(
            layer=layer,
            pred_layer=pred_layer,
            pred_normalization=_pred_normalization(pred, pred_normalize),
        )
        dataset: dict[str, dict[str, np.ndarray]] = {}
        values = _score_sources(
            ctx,
            preds,
            metric_list,
            k=k,
            strict=strict,
            gate=gate,
            chunk_size=chunk_size,
            pred_object=pred,
            dataset=dataset,
        )
        frames.append(_tidy(ctx, values, calibrate(values)))
        if dataset:
            frames.append(_tidy_dataset(ctx, dataset, calibrate(dataset)))
        ctx.options.update(
            metrics=tuple(metric_list), k=k, strict=strict, gate=gate, chunk_size=chunk_size
        )
    table = pd.concat(frames, ignore_index=True)
    if covariate is None:
        table = table.drop(columns=["covariate"])
    table.attrs["backend"] = jax.default_backend()
    table.attrs["reference"] = reference if isinstance(reference, str) else "array"
    table.attrs["normalization"] = contexts[0].options["normalization"]
    if n_boot:
        from vcjax import bootstrap

        table = bootstrap.add_intervals(
            table,
            contexts,
            n_boot=n_boot,
            ci=ci,
            method=ci_method,
            refit_weights=refit_weights,
            seed=seed,
            progress=progress,
        )
    return table


def _requested_metrics(metrics) -> list[str]:
    """The ``metrics`` argument as names: None and ``"all"`` give :data:`DEFAULT_METRICS`
    (:func:`_resolve_metrics` adds the peer-table extras of ``"all"``), a string one name."""
    if metrics is None or (isinstance(metrics, str) and metrics == "all"):
        return list(DEFAULT_METRICS)
    return [metrics] if isinstance(metrics, str) else list(metrics)


def _resolve_metrics(metrics, ctx: EvalContext, pred) -> list[str]:
    if isinstance(metrics, str) and metrics == "all":
        extra = _peer_table.available(pred, ctx.options["key"], ctx.control)
        return list(DEFAULT_METRICS) + [m for m in extra if m not in DEFAULT_METRICS]
    metrics = _requested_metrics(metrics)
    known = set(DEFAULT_METRICS) | set(ENGINE_METRICS) | set(_peer_table.TABLE_METRICS)
    unknown = [m for m in metrics if m not in known]
    if unknown:
        raise D.VcjaxInputError(f"unknown metric(s) {unknown}; available: {sorted(known)}")
    return list(metrics)


def _pred_normalization(pred, pred_normalize) -> str:
    """What :func:`vcjax.data.group_stats` does to predicted cells (for cell-level metrics)."""
    if pred is None or not hasattr(pred, "obs") or pred_normalize is None:
        return "none"
    if pred_normalize != "auto":
        return str(pred_normalize)
    X = pred.X
    vals = np.asarray(X.data if hasattr(X, "tocsr") else np.asarray(X).ravel())[: 1 << 16]
    is_counts = (
        vals.size and np.all(vals >= 0) and np.all(vals == np.round(vals)) and vals.max() > 1
    )
    return "log1p_cp10k" if is_counts else "none"


def _tidy_dataset(ctx: EvalContext, values, cal) -> pd.DataFrame:
    """Rows of the dataset-level metrics (``perturbation = "(all)"``)."""
    rows = [
        dict(
            perturbation=_peer_table.ALL,
            metric=m,
            source=s,
            value=float(v[0]),
            calibrated=float(cal[s][m][0]) if m in cal.get(s, {}) else np.nan,
            note="dataset-level",
            covariate=ctx.covariate,
        )
        for s, d in values.items()
        for m, v in d.items()
    ]
    return pd.DataFrame(rows)


def _tidy(ctx: EvalContext, values, cal) -> pd.DataFrame:
    # one DataFrame from concatenated columns (one small frame per (source, metric) and a
    # concat cost more than the scoring at small P); rows: source, then metric, then pert.
    P = len(ctx.perts)
    perts = np.empty(P, dtype=object)
    perts[:] = list(ctx.perts)
    sources, metrics_, vals, cals, notes = [], [], [], [], []
    for source, d in values.items():
        note = np.empty(P, dtype=object)
        note[:] = list(ctx.notes.get(source, [""] * P))
        for metric, v in d.items():
            sources.append(source)
            metrics_.append(metric)
            vals.append(np.asarray(v))
            cals.append(np.asarray(cal[source].get(metric, np.full(P, np.nan))))
            notes.append(note)
    n = len(sources)
    cov = np.empty(n * P, dtype=object)
    cov[:] = ctx.covariate
    df = pd.DataFrame(
        {
            "perturbation": np.tile(perts, n),
            "metric": np.repeat(np.asarray(metrics_, dtype=object), P),
            "source": np.repeat(np.asarray(sources, dtype=object), P),
            "value": np.concatenate(vals) if n else np.zeros(0),
            "calibrated": np.concatenate(cals) if n else np.zeros(0),
            "note": np.concatenate(notes) if n else np.zeros(0, dtype=object),
            "covariate": cov,
        }
    )
    no_deg = None if ctx.deg_mask is None else ~ctx.deg_mask.any(axis=1)
    if no_deg is not None and no_deg.any():
        gated = (
            df["metric"].isin(_DEG_GATED)
            & df["perturbation"].isin(np.array(ctx.perts)[no_deg])
            & (df["note"] == "")
        )
        df.loc[gated, "note"] = "no DEGs (gate, METRICS.md §5)"
    if ctx.options.get("gate", True):
        dm = (df["source"] == "dataset_mean") & df["metric"].isin(_PEARSON_LIKE)
        df.loc[dm, "note"] = "undefined for the dataset mean (METRICS.md §5)"
    return df


# ------------------------------------------------------------------ summaries


def summarize(table: pd.DataFrame) -> pd.DataFrame:
    """Per (source, metric): NaN-skipping median and mean of ``value`` and ``calibrated``."""
    g = table.groupby(["source", "metric"], sort=False)
    out = g.agg(
        value_median=("value", "median"),
        value_mean=("value", "mean"),
        calibrated_median=("calibrated", "median"),
        calibrated_mean=("calibrated", "mean"),
        n=("value", lambda v: int(np.isfinite(v).sum())),
    )
    return out.reset_index()


def dynamic_range_fraction(
    m_pos: np.ndarray, m_neg: np.ndarray, *, higher_is_better: bool
) -> np.ndarray:
    r"""CellSimBench's dynamic range fraction (METRICS.md §7), clipped to ``[-1, 1]``.

    Higher-is-better metrics (perfect 1): ``(m_pos − m_neg) / ((1 − m_neg) + 1e-6)``;
    error metrics (perfect 0): ``(m_neg − m_pos) / (m_neg + 1e-6)``. NaN if an input is.
    """
    m_pos, m_neg = np.asarray(m_pos, float), np.asarray(m_neg, float)
    with np.errstate(all="ignore"):
        if higher_is_better:
            drf = (m_pos - m_neg) / ((1.0 - m_neg) + 1e-6)
        else:
            drf = (m_neg - m_pos) / (m_neg + 1e-6)
    return np.clip(drf, -1.0, 1.0)


def _wide(table: pd.DataFrame, metric: str) -> pd.DataFrame:
    sub = table[table["metric"] == metric]
    idx = ["perturbation"] + (["covariate"] if "covariate" in table.columns else [])
    return sub.pivot_table(index=idx, columns="source", values="value", dropna=False, sort=False)


def _iqr(x: np.ndarray) -> float:
    x = x[np.isfinite(x)]
    return float(np.subtract(*np.percentile(x, [75, 25]))) if x.size else np.nan


def calibration_card(table_or_truth, **kwargs) -> pd.DataFrame:
    """The dataset's calibration card: can each metric tell signal from a trivial prediction?

    Per metric (from an :func:`evaluate` table, or from a truth screen with ``kwargs`` for
    :func:`evaluate`, scored without a model):

    * ``drf_median``/``drf_mean``/``drf_iqr``: dynamic range fraction of the technical
      duplicate against the CellSimBench negative (dataset mean for error metrics, control
      mean for delta metrics), over perturbations;
    * ``drf_ctrl_median``: the same with the control mean as negative for every metric;
    * ``drf_interpolated_median``: positive = the interpolated duplicate;
    * ``drf_loo_median``: negative = the leave-one-out mean of the other perturbations;
    * ``discrimination``: the fraction of perturbations where the duplicate strictly beats
      the best negative/null baseline (the baseline discrimination score);
    * ``n``: perturbations with a defined duplicate value.
    """
    table = (
        table_or_truth
        if isinstance(table_or_truth, pd.DataFrame)
        else evaluate(table_or_truth, None, **kwargs)
    )
    rows = [_card_row(table, metric) for metric in dict.fromkeys(table["metric"])]
    return pd.DataFrame([r for r in rows if r is not None])


def _nanstat(fn, x: np.ndarray) -> float:
    """``fn`` over the finite values of ``x``; NaN (without a warning) when there are none."""
    x = x[np.isfinite(x)]
    return float(fn(x)) if x.size else np.nan


def _card_row(table: pd.DataFrame, metric: str) -> dict | None:
    w = _wide(table, metric)
    if "technical_duplicate" not in w:
        return None
    hib = higher_is_better(metric)
    pos = w["technical_duplicate"].to_numpy(float)
    nan = np.full_like(pos, np.nan)

    def col(source: str) -> np.ndarray:
        return w[source].to_numpy(float) if source in w else nan

    is_error = not hib and metric in ("mse", "wmse", "mae")
    neg = col("dataset_mean") if is_error else col("control_mean")
    drf = dynamic_range_fraction(pos, neg, higher_is_better=hib)
    drf_ctrl = dynamic_range_fraction(pos, col("control_mean"), higher_is_better=hib)
    drf_interp = dynamic_range_fraction(col("interpolated_duplicate"), neg, higher_is_better=hib)
    drf_loo = dynamic_range_fraction(pos, col("loo_mean"), higher_is_better=hib)
    negs = np.stack([col(s) for s in _NEGATIVES])
    filled = np.where(np.isnan(negs), -np.inf if hib else np.inf, negs)
    best = filled.max(0) if hib else filled.min(0)
    ok = np.isfinite(pos) & np.isfinite(best)
    beats = (pos > best) if hib else (pos < best)
    return dict(
        metric=metric,
        drf_median=_nanstat(np.median, drf),
        drf_mean=_nanstat(np.mean, drf),
        drf_iqr=_iqr(drf),
        drf_ctrl_median=_nanstat(np.median, drf_ctrl),
        drf_interpolated_median=_nanstat(np.median, drf_interp),
        drf_loo_median=_nanstat(np.median, drf_loo),
        discrimination=float(beats[ok].mean()) if ok.any() else np.nan,
        n=int(np.isfinite(pos).sum()),
    )


def drf_table(table: pd.DataFrame, metric: str, *, negative: str | None = None) -> pd.Series:
    """Per-perturbation DRF of the technical duplicate for one metric (see :func:`calibration_card`)."""
    w = _wide(table, metric)
    hib = higher_is_better(metric)
    if negative is None:
        negative = "dataset_mean" if metric in ("mse", "wmse", "mae") else "control_mean"
    drf = dynamic_range_fraction(
        w["technical_duplicate"].to_numpy(float), w[negative].to_numpy(float), higher_is_better=hib
    )
    return pd.Series(drf, index=w.index, name=f"drf_{metric}")
