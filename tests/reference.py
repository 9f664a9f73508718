"""Independent float64 NumPy references of the core metrics (docs/metrics.md §5), written loop-style.

These deliberately avoid the vectorised formulations of ``vcjax.metrics``: each metric is
computed for one perturbation at a time with plain NumPy on the selected genes.
"""

from __future__ import annotations

import numpy as np


def _rows(*arrays):
    arrays = [np.asarray(a, dtype=np.float64) for a in arrays]
    shape = np.broadcast_shapes(*(a.shape for a in arrays))
    arrays = [np.broadcast_to(a, shape).reshape(-1, shape[-1]) for a in arrays]
    return arrays, shape[:-1]


def ref_mse(pred, truth):
    (p, t), shape = _rows(pred, truth)
    return np.array([np.mean((a - b) ** 2) for a, b in zip(p, t)]).reshape(shape)


def ref_mae(pred, truth):
    (p, t), shape = _rows(pred, truth)
    return np.array([np.mean(np.abs(a - b)) for a, b in zip(p, t)]).reshape(shape)


def ref_wmse(pred, truth, weights):
    (p, t, w), shape = _rows(pred, truth, weights)
    out = []
    for a, b, ww in zip(p, t, w):
        s = ww.sum()
        out.append(np.nan if s == 0 else float(np.sum(ww / s * (a - b) ** 2)))
    return np.array(out).reshape(shape)


def _pearson1(x, y):
    if len(x) < 2 or np.all(x == x[0]) or np.all(y == y[0]):
        return np.nan
    r = np.corrcoef(x, y)[0, 1]
    return float(np.clip(r, -1, 1))


def ref_pearson_delta(pred, truth, reference, mask=None):
    (p, t, r), shape = _rows(pred, truth, reference)
    m = np.ones_like(p, bool) if mask is None else np.broadcast_to(np.asarray(mask, bool), p.shape)
    return np.array(
        [_pearson1(a[k] - c[k], b[k] - c[k]) for a, b, c, k in zip(p, t, r, m)]
    ).reshape(shape)


def _r2_1(y, yhat, w=None, strict=False):
    """sklearn r2_score(y, yhat, sample_weight=w) with force_finite=True, one output."""
    if len(y) < 2:
        return np.nan
    w = np.ones_like(y) if w is None else w
    if w.sum() == 0:
        return np.nan
    num = np.sum(w * (y - yhat) ** 2)
    den = np.sum(w * (y - np.average(y, weights=w)) ** 2)
    if np.all(y[w > 0] == y[w > 0][0]):
        den = 0.0
    if den == 0:
        if strict:
            return np.nan
        return 1.0 if num == 0 else 0.0
    return 1.0 - num / den


def ref_r2_delta(pred, truth, reference, strict=False):
    (p, t, r), shape = _rows(pred, truth, reference)
    return np.array([_r2_1(b - c, a - c, strict=strict) for a, b, c in zip(p, t, r)]).reshape(shape)


def ref_r2w_delta(pred, truth, reference, weights, strict=False):
    (p, t, r, w), shape = _rows(pred, truth, reference, weights)
    return np.array(
        [_r2_1(b - c, a - c, ww, strict=strict) for a, b, c, ww in zip(p, t, r, w)]
    ).reshape(shape)


def ref_topk_mask(scores, k):
    s = np.asarray(scores, dtype=np.float64)
    out = np.zeros(s.shape, bool)
    for i, row in enumerate(s.reshape(-1, s.shape[-1])):
        order = np.argsort(-np.nan_to_num(row, nan=-np.inf), kind="stable")
        out.reshape(-1, s.shape[-1])[i, order[:k]] = True
    return out


def ref_pearson_delta_topk(pred, truth, reference, weights, k):
    (p, t, r, w), shape = _rows(pred, truth, reference, weights)
    if k > p.shape[-1] or k < 2:
        return np.full(shape, np.nan)
    return ref_pearson_delta(p, t, r, ref_topk_mask(w, k)).reshape(shape)


def ref_cosine_delta(pred, truth, reference):
    (p, t, r), shape = _rows(pred, truth, reference)
    out = []
    for a, b, c in zip(p, t, r):
        x, y = a - c, b - c
        nx, ny = np.linalg.norm(x), np.linalg.norm(y)
        out.append(np.nan if nx == 0 or ny == 0 else float(np.clip(x @ y / (nx * ny), -1, 1)))
    return np.array(out).reshape(shape)


def reference_scores(pred, truth, reference, weights=None, mask=None, k=20, strict=False):
    """All core metrics, as ``vcjax.score`` returns them, in float64."""
    out = {
        "mse": ref_mse(pred, truth),
        "mae": ref_mae(pred, truth),
        "pearson_delta": ref_pearson_delta(pred, truth, reference),
        "r2_delta": ref_r2_delta(pred, truth, reference, strict=strict),
        "cosine_delta": ref_cosine_delta(pred, truth, reference),
    }
    if weights is not None:
        out["wmse"] = ref_wmse(pred, truth, weights)
        out["r2w_delta"] = ref_r2w_delta(pred, truth, reference, weights, strict=strict)
        out["pearson_delta_topk"] = ref_pearson_delta_topk(pred, truth, reference, weights, k)
    if mask is not None:
        out["pearson_delta_degs"] = ref_pearson_delta(pred, truth, reference, mask)
    return out
