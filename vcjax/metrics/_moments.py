"""Finishing steps of the metric kernels: per-row moments to metric values, NaN rules included.

Shared by the kernels (:mod:`vcjax.metrics._kernels`) and the fused multi-metric pass
(:mod:`vcjax.metrics._fused`), which compute the same per-row moments in different ways.
Divisions inside ``jnp.where`` use the double-``where`` trick so gradients stay finite.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = [
    "cosine_from_moments",
    "negligible",
    "pearson_from_moments",
    "r2_from_moments",
    "safe_div",
]


def safe_div(num: jax.Array, den: jax.Array, ok: jax.Array) -> jax.Array:
    """``num / den`` where ``ok``; NaN elsewhere, with finite gradients (double ``where``)."""
    safe_den = jnp.where(ok, den, jnp.ones_like(den))
    return jnp.where(ok, num / safe_den, jnp.nan)


def negligible(ss: jax.Array, n: jax.Array, mean: jax.Array) -> jax.Array:
    """True where a centred sum of squares ``ss`` over ``n`` values is zero up to rounding.

    A constant vector ``c`` gives deviations ``c - fl(mean)`` of the order of the rounding
    error of its mean, not exactly zero; such a vector is treated as constant (NaN Pearson,
    zero R² denominator), as ``np.corrcoef`` and ``r2_score`` do in exact cases. The error
    of a (weighted) mean of G values grows with the summation: a few units of ``eps`` for a
    pairwise sum, more for weights that are not powers of two, so the bound is
    ``ss <= n · (64 · eps · |mean|)²`` (deviations within 64 rounding units of the mean:
    7.6e-6 relative in float32), which is 0 for an all-zero vector. (With 4 units, a constant
    true Δ of 23 genes with weights 0.001 escaped it and gave R²w = −1e30.)
    """
    eps = jnp.finfo(ss.dtype).eps
    return ss <= n * jnp.square(64 * eps * jnp.abs(mean))


def pearson_from_moments(
    sxx: jax.Array, syy: jax.Array, sxy: jax.Array, n: jax.Array, mx: jax.Array, my: jax.Array
) -> jax.Array:
    """Pearson r from centred sums over ``n`` values with means ``mx``, ``my`` (NaN rules)."""
    ok = (n >= 2) & ~negligible(sxx, n, mx) & ~negligible(syy, n, my)
    den = jnp.where(ok, sxx * syy, jnp.ones_like(sxx))
    r = sxy / jnp.sqrt(den)
    return jnp.where(ok, jnp.clip(r, -1.0, 1.0), jnp.nan)


def r2_from_moments(
    num: jax.Array,
    den: jax.Array,
    sw: jax.Array,
    mean: jax.Array,
    ok: jax.Array,
    *,
    strict: bool,
) -> jax.Array:
    """sklearn R² (``force_finite``) from the weighted residual and centred sums of squares."""
    den_zero = negligible(den, sw, mean)
    num_zero = num == 0
    ratio = num / jnp.where(den_zero, jnp.ones_like(den), den)
    forced = jnp.where(num_zero, 1.0, 0.0).astype(num.dtype)
    if strict:
        forced = jnp.full_like(forced, jnp.nan)
    value = jnp.where(den_zero, forced, jnp.where(num_zero, 1.0, 1.0 - ratio))
    return jnp.where(ok, value, jnp.nan)


def cosine_from_moments(sxx: jax.Array, syy: jax.Array, sxy: jax.Array) -> jax.Array:
    """Cosine similarity from uncentred sums (NaN when either vector is zero)."""
    ok = (sxx > 0) & (syy > 0)
    den = jnp.where(ok, sxx * syy, jnp.ones_like(sxx))
    return jnp.where(ok, jnp.clip(sxy / jnp.sqrt(den), -1.0, 1.0), jnp.nan)
