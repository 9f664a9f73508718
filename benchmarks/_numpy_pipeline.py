"""vcjax's default evaluation in plain NumPy float64, from per-group-half sufficient statistics.

The independent reference pipeline of the benchmarks (no JAX, no vcjax code): from the cell
counts, sums and sums of squares of every condition's two technical-duplicate halves it
computes ``u_ALL``, the truth (half-2 means), scanpy's ``t-test_overestim_var`` of each
perturbation against the other perturbed cells (exact Student-t p-values), BH, logFC, the
DbD weights, DEG sets and top-k genes, the 7 default baselines (no ``A+B`` combinations:
``additive`` is NaN) and the 11 default metrics of every source with DbD's gates.

``bench_peers.py`` feeds it sums read from ``.h5ad`` files; ``bench_bootstrap.py`` feeds it
the sums of each explicitly materialised resample (the "straightforward NumPy loop").
"""

from __future__ import annotations

import numpy as np
from scipy import special


def null_permutation(n: int, seed: int) -> np.ndarray:
    """The null baseline's derangement (vcjax's seed convention: redraw until no fixed point)."""
    rng = np.random.default_rng(seed)
    while True:
        perm = rng.permutation(n)
        if not np.any(perm == np.arange(n)):
            return perm


def _pearson(x, y, m=None):
    m = np.ones_like(x, bool) if m is None else m
    c = m.sum(1, keepdims=True)
    xm = np.where(m, x - (x * m).sum(1, keepdims=True) / c, 0.0)
    ym = np.where(m, y - (y * m).sum(1, keepdims=True) / c, 0.0)
    sxx, syy = (xm * xm).sum(1), (ym * ym).sum(1)
    r = (xm * ym).sum(1) / np.sqrt(sxx * syy)
    return np.where((sxx > 0) & (syy > 0) & (c[:, 0] >= 2), np.clip(r, -1, 1), np.nan)


def _r2(y, yh, ww=None):
    ww = np.ones_like(y) if ww is None else ww
    sw = ww.sum(1, keepdims=True)
    num = (ww * (y - yh) ** 2).sum(1)
    den = (ww * (y - (ww * y).sum(1, keepdims=True) / sw) ** 2).sum(1)
    pos = ww > 0  # a constant truth over the weighted genes has den = 0 exactly
    y0 = np.take_along_axis(y, np.argmax(pos, 1)[:, None], 1)
    const = ~np.any(pos & (y != y0), axis=1)
    den = np.where(const, 0.0, den)
    out = np.where(den == 0, np.where(num == 0, 1.0, 0.0), 1 - num / np.where(den == 0, 1, den))
    return np.where((sw[:, 0] > 0) & ~np.isnan(num), out, np.nan)


def evaluate_sums(
    cnt: np.ndarray,
    s: np.ndarray,
    q: np.ndarray,
    control: int,
    model: np.ndarray | None,
    *,
    k: int = 20,
    seed: int = 0,
    gate: bool = True,
    perm: np.ndarray | None = None,
) -> dict[str, dict[str, np.ndarray]]:
    """``{source: {metric: (P,)}}`` from group-half statistics.

    Args:
      cnt: cells ``(C, 2)`` per condition and half; ``s``, ``q``: sums and sums of squares
        ``(C, 2, G)``.
      control: row of the control condition; the perturbations are the other rows, in order.
      model: predicted pseudobulk ``(P, G)`` in that order, or None.
      k, seed, gate: top-k genes, null-derangement seed, DbD's NaN gates.
      perm: the null derangement (default :func:`null_permutation` ``(P, seed)``).
    """
    C = cnt.shape[0]
    pi = np.array([i for i in range(C) if i != control])
    mean_h = s / cnt[..., None]  # (C, 2, G) half means
    n_f, s_f, q_f = cnt.sum(1), s.sum(1), q.sum(1)
    mean_f = s_f / n_f[:, None]
    u_all_h1, u_all_f = mean_h[:, 0].mean(0), mean_f.mean(0)
    u_ntc = mean_f[control]
    truth = mean_h[pi, 1]
    dup = mean_h[pi, 0]

    # t-test_overestim_var, each perturbation vs the other perturbed cells
    ng, sg, qg = n_f[pi][:, None], s_f[pi], q_f[pi]
    nr, sr, qr = ng.sum() - ng, sg.sum(0) - sg, qg.sum(0) - qg
    mg, mr = sg / ng, sr / nr
    with np.errstate(all="ignore"):
        vg = (qg / ng - mg**2) * ng / (ng - 1)
        vr = (qr / nr - mr**2) * nr / (nr - 1)
        a, b = vg / ng, vr / ng
        t = (mg - mr) / np.sqrt(a + b)
        dof = (a + b) ** 2 / ((a**2 + b**2) / (ng - 1))
        dof = np.where(np.isnan(dof), 1.0, dof)
        p = 2.0 * special.stdtr(dof, -np.abs(t))
    p[np.isnan(p)] = 1.0
    t = np.where(np.isnan(t), 0.0, t).astype(np.float32)
    G = t.shape[1]
    o = np.argsort(p, axis=1, kind="stable")
    ps = np.take_along_axis(p, o, 1) * G / np.arange(1, G + 1)
    padj = np.empty_like(p)
    np.put_along_axis(padj, o, np.minimum(1.0, np.minimum.accumulate(ps[:, ::-1], 1)[:, ::-1]), 1)
    with np.errstate(all="ignore"):
        lfc = np.log2((np.expm1(mg) + 1e-9) / (np.expm1(mr) + 1e-9)).astype(np.float32)
        sc_ = np.abs(t)
        lo, hi = sc_.min(1, keepdims=True), sc_.max(1, keepdims=True)
        w = np.where(hi == lo, np.where(hi == 0, 0.0, 1.0), (sc_ - lo) / (hi - lo))
        w = np.nan_to_num(w.astype(np.float32), nan=0.0) ** 2
    w = w.astype(np.float64)
    deg = (padj < 0.05) & (lfc != 0)
    P = len(pi)
    topk = np.zeros_like(deg)
    np.put_along_axis(topk, np.argsort(-np.abs(t), axis=1, kind="stable")[:, :k], True, 1)

    perm = null_permutation(P, seed) if perm is None else perm
    loo = (mean_f[pi].sum(0) - mean_f[pi]) / (P - 1)
    preds = {
        "control_mean": np.broadcast_to(u_ntc, (P, G)),
        "dataset_mean": np.broadcast_to(u_all_f, (P, G)),
        "null": dup[perm],
        "technical_duplicate": dup,
        "additive": np.full((P, G), np.nan),  # no A+B combinations in these screens
        "loo_mean": loo,
        "interpolated_duplicate": (1 - padj) * dup + padj * loo,
    }
    if model is not None:
        preds = {"model": np.asarray(model, np.float64), **preds}

    no_deg = ~deg.any(1)
    values: dict[str, dict[str, np.ndarray]] = {}
    with np.errstate(all="ignore"):
        for src, yh in preds.items():
            yh = np.asarray(yh, dtype=np.float64)
            d, dh = truth - u_all_h1, yh - u_all_h1
            e2 = (yh - truth) ** 2
            nx, ny = np.sqrt((dh * dh).sum(1)), np.sqrt((d * d).sum(1))
            v = {
                "mse": e2.mean(1),
                "wmse": (w * e2).sum(1) / w.sum(1),
                "mae": np.abs(yh - truth).mean(1),
                "pearson_delta": _pearson(dh, d),
                "pearson_delta_degs": _pearson(dh, d, deg),
                "pearson_delta_topk": _pearson(dh, d, topk),
                "r2_delta": _r2(d, dh),
                "r2w_delta": _r2(d, dh, w),
                "cosine_delta": np.where(
                    (nx > 0) & (ny > 0), np.clip((d * dh).sum(1) / (nx * ny), -1, 1), np.nan
                ),
                "pearson_delta_ctrl": _pearson(yh - u_ntc, truth - u_ntc),
                "r2_delta_ctrl": _r2(truth - u_ntc, yh - u_ntc),
            }
            for m in ("wmse", "r2w_delta", "pearson_delta_degs"):
                v[m] = np.where(no_deg & gate, np.nan, v[m])
            if src == "dataset_mean" and gate:
                for m in ("pearson_delta", "pearson_delta_degs", "pearson_delta_topk"):
                    v[m] = np.full(P, np.nan)
            values[src] = v
    return values
