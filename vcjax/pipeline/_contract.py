"""Many models against one resampled truth: every core metric as contractions over genes.

For a model ``ŷ`` and a resample's truth ``y_b``, reference ``r_b`` and DEG weights and sets
``w_b``, ``m_b``, every core metric except MAE and the top-k Pearson is a function of sums
over genes of products of a *model-side* term and a *resample-side* term. Centred on the
point estimate (truth ``y0``, reference ``r0``), with

* model side: ``a0 = ŷ − y0`` (the point residual), ``x0 = ŷ − r0`` (the point Δ̂), ``x0c``
  (``x0`` centred over genes) and ``x0m`` (``x0`` centred over the point DEG set);
* resample side: ``e = y_b − y0``, ``y = y_b − r_b`` (the resampled Δ), ``ρ = r_b − r0``,
  ``ρ' = u_NTC,b − r0``, ``w``, ``m``;

the metrics need ten contractions ``a0·e, a0·(w e), a0²·w, x0c·e, x0c·ρ, x0c·ρ', x0m·m,
x0m²·m, x0m·(m ρ), x0m·(m (y_b − r0))``, each for every (model, resample, perturbation):
for ``M`` models and ``B`` resamples a batched matrix product per perturbation instead of
``M·B`` passes over the data. The remaining sums involve one side only. The error metrics
expand around the point residual ``a0`` and the correlations around the point Δ̂ ``x0``, so
neither a good model (``a0`` small) nor a collapsed one (``x0`` small) loses precision to
cancellation. MAE is computed directly, the top-k Pearson on the gathered top-k genes.
Every NaN rule is the kernels' (:mod:`vcjax.metrics`), gates included.

:func:`resample_terms` is the resample side (it runs inside the bootstrap's compiled
resampler, :func:`vcjax.pipeline.resampler`), :func:`model_values` the model side, and
:func:`model_sums` the model-side sums that no resample changes (computed once per block of
models: a third of the model stage's time otherwise). Terms that multiply the same
model-side vector are stacked (``[e, w e]`` with ``a0``; ``[m, m ρ, m (y_b − r0)]`` with
``x0m``) so that each is one product.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from vcjax.metrics import (
    METRICS,
    cosine_from_moments,
    gate,
    pearson,
    pearson_from_moments,
    r2_from_moments,
    safe_div,
    topk_indices,
)
from vcjax.pipeline._derive import Derived

__all__ = ["model_sums", "model_values", "resample_term_names", "resample_terms"]


def _sum(x):
    return jnp.sum(x, axis=-1)


def _mean(x):
    return jnp.mean(x, axis=-1)


def resample_term_names(metrics, *, weights: bool, mask: bool) -> frozenset[str]:
    """Which groups of resample-side terms the metrics need."""
    need = {"base"}
    if weights and ({"wmse", "r2w_delta"} & set(metrics)):
        need.add("weights")
    if mask and "pearson_delta_degs" in metrics:
        need.add("mask")
    if {"pearson_delta_ctrl", "r2_delta_ctrl"} & set(metrics):
        need.add("ctrl")
    if "pearson_delta_topk" in metrics:
        need.add("topk")
    return frozenset(need)


def resample_terms(cfg, d: Derived, arrs: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """The resample side of the contractions, from one sub-batch's resampled truth ``d``.

    Reads ``arrs["sweep_y0"]`` (the point truth, ``(P, G)``), ``arrs["sweep_r0"]`` (the point
    reference, ``(G,)``) and ``cfg.metrics``, ``cfg.k``. Returns resample-major arrays:
    ``(b, P, G)`` vectors, ``(b, P)`` truth-only sums, ``(b, G)`` / ``(b,)`` per-resample ones.
    """
    y0, r0 = arrs["sweep_y0"], arrs["sweep_r0"]
    truth, ref, u = d.truth, d.reference, d.u_ntc
    dt = truth.dtype
    need = resample_term_names(cfg.metrics, weights=d.weights is not None, mask=d.deg is not None)
    e = truth - y0[None]
    y = truth - ref[:, None, :]
    rho = ref - r0[None]
    ybar = _mean(y)
    yc = y - ybar[..., None]
    rhobar = _mean(rho)
    rhoc = rho - rhobar[..., None]
    t: dict[str, jax.Array] = dict(
        Se2=_sum(e * e),
        ybar=ybar,
        Syy=_sum(yc * yc),
        rho=rho,
        rhobar=rhobar,
        Srr_c=_sum(rhoc * rhoc),
        Sry_c=_sum(rhoc[:, None, :] * yc),
        Sy=_sum(y),
        Syy_u=_sum(y * y),
        Sry_u=_sum(rho[:, None, :] * y),
        Sr=_sum(rho),
        Srr=_sum(rho * rho),
    )
    if "ctrl" in need:
        rho2 = u - r0[None]
        y2 = truth - u[:, None, :]
        y2bar = _mean(y2)
        y2c = y2 - y2bar[..., None]
        rho2bar = _mean(rho2)
        rho2c = rho2 - rho2bar[..., None]
        t.update(
            rho2=rho2,
            rho2bar=rho2bar,
            Sr2r2_c=_sum(rho2c * rho2c),
            y2bar=y2bar,
            Sy2y2=_sum(y2c * y2c),
            Sr2y2_c=_sum(rho2c[:, None, :] * y2c),
        )
    if "weights" in need:
        w = jnp.broadcast_to(d.weights, truth.shape).astype(dt)
        sw = _sum(w)
        mw = _sum(w * y) / jnp.where(sw > 0, sw, 1.0)
        t.update(
            w=w,
            ewe=jnp.stack([e, w * e], axis=1),  # (b, 2, P, G): one product with a0 for both
            Sw=sw,
            Swe2=_sum(w * e * e),
            mw=mw,
            Swyy=_sum(w * jnp.square(y - mw[..., None])),
        )
    if "mask" in need:
        m = jnp.broadcast_to(d.deg.mask, truth.shape).astype(dt)
        nm = _sum(m)
        mrho = m * rho[:, None, :]
        smy = _sum(m * y)
        mym = smy / jnp.maximum(nm, 1.0)
        t.update(
            mset=jnp.stack([m, mrho, m * (truth - r0[None])], axis=1),  # (b, 3, P, G)
            nm=nm,
            Smr=_sum(mrho),
            Smrr=_sum(mrho * rho[:, None, :]),
            Smry=_sum(mrho * y),
            Smy=smy,
            mym=mym,
            Smyy=_sum(m * jnp.square(y - mym[..., None])),
        )
    if "ewe" not in t:
        t["e"] = e
    if d.deg is not None:  # (b, P) whether the DEG sets are resampled or frozen
        t["no_deg"] = ~jnp.any(jnp.broadcast_to(d.deg.mask, truth.shape), axis=-1)
    if "topk" in need and 2 <= cfg.k <= cfg.G:
        ts = jnp.abs(d.deg.scores) if d.deg is not None else d.weights
        idx = topk_indices(jnp.broadcast_to(ts, truth.shape), cfg.k)  # (b, P, k)
        t.update(
            topk_idx=idx.astype(jnp.int32),
            yk=jnp.take_along_axis(y, idx, axis=-1),
            rhok=jnp.take_along_axis(jnp.broadcast_to(rho[:, None, :], truth.shape), idx, -1),
        )
    return t


#: the resample-side arrays that are per (resample, perturbation[, gene]) — the others are
#: per resample and shared by every perturbation; the stacked ones are ``(b, k, P, G)``
_PER_ROW = frozenset(
    ("e", "ewe", "w", "mset", "Se2", "ybar", "Syy", "Sry_c", "Sy", "Syy_u", "Sry_u",
     "y2bar", "Sy2y2", "Sr2y2_c", "Sw", "Swe2", "mw", "Swyy", "nm", "Smr", "Smrr", "Smry", "Smy",
     "mym", "Smyy", "no_deg", "topk_idx", "yk", "rhok")
)  # fmt: skip
_STACKED = frozenset(("ewe", "mset"))


def _bdot(lhs, rhs):
    """``Σ_g lhs[p, m, g] · rhs[p, b, g]`` → ``(p, m, b)``: a batched product per perturbation."""
    return jax.lax.dot_general(lhs, rhs, (((2,), (2,)), ((0,), (0,))))


def _gdot(lhs, rhs):
    """``Σ_g lhs[p, m, g] · rhs[b, g]`` → ``(p, m, b)``: one matrix product."""
    p, m, g = lhs.shape
    return (lhs.reshape(p * m, g) @ rhs.T).reshape(p, m, rhs.shape[0])


#: elements per model-side temporary in one block of perturbations: small enough to stay in
#: cache between its creation and the products that read it (several times faster)
_BLOCK_ELEMENTS = 1 << 20


@functools.lru_cache(maxsize=16)
def _model_fn(metrics: tuple[str, ...], k: int, strict: bool, gated: bool, block: int):
    def fn(terms, yhat, sums, y0, r0, m0):
        P = yhat.shape[0]
        n_full, tail = divmod(P, block)
        row = {kk: v for kk, v in terms.items() if kk in _PER_ROW}
        shared = {kk: v for kk, v in terms.items() if kk not in _PER_ROW}

        def rows(start, size):  # one block of perturbations, its terms turned (p, b, …)
            def cut(x, axis=0):
                return jax.lax.dynamic_slice_in_dim(x, start, size, axis=axis)

            rb = {  # (p, b, …); a stacked term (p, b·k, G), index b·k + j
                kk: jnp.moveaxis(cut(v, 2), 2, 0).reshape(size, -1, v.shape[-1])
                if kk in _STACKED
                else jnp.swapaxes(cut(v, 1), 0, 1)
                for kk, v in row.items()
            }
            sb = {kk: cut(v) for kk, v in sums.items()}
            return _values(
                {**rb, **shared}, cut(yhat), sb, cut(y0), r0, cut(m0), metrics, k, strict, gated
            )  # {metric: (p, Mc, b)}

        parts = []
        if n_full:
            out = jax.lax.map(lambda i: rows(i * block, block), jnp.arange(n_full))
            parts.append({kk: v.reshape((-1,) + v.shape[2:]) for kk, v in out.items()})
        if tail:
            parts.append(rows(n_full * block, tail))
        return {
            kk: jnp.transpose(jnp.concatenate([q[kk] for q in parts]), (1, 2, 0)) for kk in parts[0]
        }

    return jax.jit(fn)


@jax.jit
def model_sums(
    yhat: jax.Array, y0: jax.Array, r0: jax.Array, m0: jax.Array
) -> dict[str, jax.Array]:
    """The model-side sums that do not depend on the resample, ``(P, Mc)`` each: computed
    once per block of models instead of once per chunk of resamples.

    ``yhat`` ``(P, Mc, G)``; ``y0``, ``r0``, ``m0`` as :func:`model_values`."""
    yhat = yhat.astype(y0.dtype)
    a0 = yhat - y0[:, None, :]
    x0 = yhat - r0[None, None, :]
    mu = _mean(x0)
    x0c = x0 - mu[..., None]
    m0f = jnp.broadcast_to(m0, y0.shape).astype(y0.dtype)[:, None, :]
    n0 = _sum(m0f)
    return dict(
        mu=mu,
        mum=jnp.where(n0 > 0, _sum(x0 * m0f) / jnp.maximum(n0, 1.0), mu),
        Sa2=_sum(a0 * a0),
        Sxc2=_sum(x0c * x0c),
        Sx02=_sum(x0 * x0),
        xcD0=_sum(x0c * (y0 - r0[None])[:, None, :]),
    )


def model_values(
    terms: Mapping[str, jax.Array],
    yhat: jax.Array,
    *,
    y0: jax.Array,
    r0: jax.Array,
    m0: jax.Array | None,
    metrics: tuple[str, ...],
    k: int,
    strict: bool,
    gate: bool,
    sums: Mapping[str, jax.Array] | None = None,
) -> dict[str, jax.Array]:
    """Every core metric of a chunk of models against a chunk of resamples.

    Args:
      terms: :func:`resample_terms` of ``b`` resamples (resample-major).
      yhat: ``(P, Mc, G)`` model predictions, perturbation-major.
      y0, r0: the point truth ``(P, G)`` and reference ``(G,)`` the terms are centred on.
      m0: the point DEG sets ``(P, G)`` (the centre of ``x0m``), or None.
      metrics, k, strict, gate: as :class:`vcjax.pipeline.ScoreSpec` (core metrics only).
      sums: :func:`model_sums` of ``yhat`` (computed here when not given).

    Returns:
      ``{metric: (Mc, b, P)}``.
    """
    P, Mc, G = yhat.shape
    block = int(max(1, min(P, _BLOCK_ELEMENTS // max(1, Mc * G))))
    fn = _model_fn(tuple(metrics), int(k), bool(strict), bool(gate), block)
    if m0 is None:
        m0 = jnp.zeros((P, 1), bool)  # unread: no DEG sets
    if sums is None:
        sums = model_sums(yhat, y0, r0, m0)
    return fn(dict(terms), yhat, dict(sums), y0, r0, m0)


def _values(t, yhat, sums, y0, r0, m0, metrics, k, strict, gated) -> dict[str, jax.Array]:
    """The metrics of one block of perturbations: ``yhat`` ``(p, M, G)``, per-row terms
    ``(p, b, …)``, shared terms ``(b, …)``; returns ``{metric: (p, M, b)}``."""
    dt = t["Se2"].dtype
    yhat = yhat.astype(dt)
    G = yhat.shape[-1]
    b = t["Se2"].shape[-1]
    n = jnp.asarray(G, dt)
    want = set(metrics)
    a0 = yhat - y0[:, None, :]
    x0 = yhat - r0[None, None, :]
    mu = sums["mu"]  # (p, M)
    x0c = x0 - mu[..., None]
    Sa2 = sums["Sa2"][..., None]  # (p, M, 1)
    Sxc2 = sums["Sxc2"][..., None]
    Sx02 = sums["Sx02"][..., None]
    xcD0 = sums["xcD0"][..., None]
    mu_b = mu[..., None]

    def bc(name):  # a per-(row, resample) truth-only sum (p, b), broadcast over models
        return t[name][:, None, :]

    def bb(name):  # a per-resample sum (b,)
        return t[name][None, None, :]

    out: dict[str, jax.Array] = {}
    if "ewe" in t:  # a0 · [e, w e] in one product
        e = t["ewe"].reshape(t["ewe"].shape[0], b, 2, G)[:, :, 0]
        prod = _bdot(a0, t["ewe"]).reshape(*a0.shape[:2], b, 2)
        ae, awe = prod[..., 0], prod[..., 1]
    else:
        e = t["e"]
        ae = _bdot(a0, e)
    err2 = jnp.maximum(Sa2 - 2.0 * ae + bc("Se2"), 0.0)  # Σ (ŷ − y_b)², = Σ (Δ − Δ̂)²
    if "mse" in want:
        out["mse"] = err2 / n
    if "mae" in want:
        out["mae"] = _sum(jnp.abs(a0[:, :, None, :] - e[:, None, :, :])) / n
    if "r2_delta" in want:
        out["r2_delta"] = r2_from_moments(err2, bc("Syy"), n, bc("ybar"), n >= 2, strict=strict)
    if "r2_delta_ctrl" in want:
        out["r2_delta_ctrl"] = r2_from_moments(
            err2, bc("Sy2y2"), n, bc("y2bar"), n >= 2, strict=strict
        )
    if "w" in t and want & {"wmse", "r2w_delta"}:
        werr2 = jnp.maximum(_bdot(a0 * a0, t["w"]) - 2.0 * awe + bc("Swe2"), 0.0)
        sw = bc("Sw")
        if "wmse" in want:
            out["wmse"] = safe_div(werr2, sw, sw > 0)
        if "r2w_delta" in want:
            ok = (n >= 2) & (sw > 0)
            out["r2w_delta"] = r2_from_moments(werr2, bc("Swyy"), sw, bc("mw"), ok, strict=strict)
    if want & {"pearson_delta", "cosine_delta", "pearson_delta_ctrl"}:
        xc_c = xcD0 + _bdot(x0c, e)  # x0c · (y_b − r0)
        xcr = _gdot(x0c, t["rho"])
        if "pearson_delta" in want:
            sxx = Sxc2 - 2.0 * xcr + bb("Srr_c")
            sxy = xc_c - xcr - bc("Sry_c")
            mx = mu_b - bb("rhobar")
            out["pearson_delta"] = pearson_from_moments(sxx, bc("Syy"), sxy, n, mx, bc("ybar"))
        if "cosine_delta" in want:
            x0r = xcr + mu_b * bb("Sr")  # x0 · ρ
            sxy = (xc_c - xcr) + mu_b * bc("Sy") - bc("Sry_u")
            sxx = Sx02 - 2.0 * x0r + bb("Srr")
            out["cosine_delta"] = cosine_from_moments(sxx, bc("Syy_u"), sxy)
        if "pearson_delta_ctrl" in want:
            xcr2 = _gdot(x0c, t["rho2"])
            sxx = Sxc2 - 2.0 * xcr2 + bb("Sr2r2_c")
            sxy = xc_c - xcr2 - bc("Sr2y2_c")
            mx = mu_b - bb("rho2bar")
            out["pearson_delta_ctrl"] = pearson_from_moments(
                sxx, bc("Sy2y2"), sxy, n, mx, bc("y2bar")
            )
    if "mset" in t and "pearson_delta_degs" in want:
        mum = sums["mum"]  # (p, M): x0's mean over the point DEG set
        x0m = x0 - mum[..., None]
        nm = bc("nm")
        prod = _bdot(x0m, t["mset"]).reshape(*x0m.shape[:2], b, 3)  # x0m · [m, m ρ, m (y − r0)]
        m_b = t["mset"].reshape(t["mset"].shape[0], b, 3, G)[:, :, 0]
        smx = prod[..., 0] - bc("Smr")
        xmr = prod[..., 1]
        smx2 = _bdot(x0m * x0m, m_b) - 2.0 * xmr + bc("Smrr")
        smxy = prod[..., 2] - xmr - bc("Smry")
        safe_nm = jnp.maximum(nm, 1.0)
        mxx = smx2 - smx * smx / safe_nm
        mxy = smxy - smx * bc("Smy") / safe_nm
        mxm = smx / safe_nm + mum[..., None]
        out["pearson_delta_degs"] = pearson_from_moments(mxx, bc("Smyy"), mxy, nm, mxm, bc("mym"))
    if "pearson_delta_topk" in want:
        if "topk_idx" in t:
            idx = t["topk_idx"]  # (p, b, k): the same genes for every model
            p_, M_ = x0.shape[:2]
            base = (jnp.arange(p_ * M_, dtype=idx.dtype) * G).reshape(p_, M_, 1, 1)
            xk = x0.reshape(-1)[base + idx[:, None]]  # (p, M, b, k), one flat gather
            out["pearson_delta_topk"] = pearson(xk - t["rhok"][:, None], t["yk"][:, None])
        else:  # k > G or k < 2
            out["pearson_delta_topk"] = jnp.full(ae.shape, jnp.nan, dt)
    no_deg = t["no_deg"][:, None, :] if "no_deg" in t else None
    result = {}
    for m in metrics:
        v = out[m]
        if gated and METRICS[m].gated_by_degs and no_deg is not None:
            v = gate(m, v, no_deg=no_deg, undefined=False, xp=jnp)
        result[m] = v
    return result
