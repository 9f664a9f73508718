"""Sweeps: many models scored against one prepared truth, on shared resamples, with ranks.

:func:`sweep` prepares the truth once (or takes a :class:`~vcjax.pipeline.Screen`), aligns
every model, scores each one's point estimate with the same code as :func:`vcjax.evaluate`,
and with ``n_boot > 0`` scores every model on the **same** resamples:

* ``resample="cells"`` (default): the cells of every condition-half are resampled, the truth
  side re-derived (DEG weights refitted) once per resample for all models and baselines
  (:func:`vcjax.pipeline.resampler`), and every model contracted against it
  (:mod:`vcjax.pipeline._contract`). An interval answers: how much would this number move
  with another draw of the same cells' populations, for these perturbations?
* ``resample="perturbations"``: the perturbations are resampled with replacement (the cell
  values fixed at the point estimate): how much would an aggregate over perturbations move
  had another set of perturbations been screened? Only the aggregates (leaderboard, pairwise)
  have intervals then.
* ``resample="both"``: resample ``b`` draws cells *and* perturbations.

Every comparison is paired: the models, and the baselines, see the same resample ``b``.
:class:`SweepResult` holds the tidy table, the baselines, and per resample the aggregate of
every model, from which :meth:`SweepResult.leaderboard` (value, interval, rank, rank interval,
``p_best``) and :meth:`SweepResult.pairwise` (P(row beats column)) are computed. A difference
within :data:`TIE_TOL` (float32 noise, relative) is a tie.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import pandas as pd

from vcjax._errors import VcjaxInputError
from vcjax._host import working_dtype
from vcjax._io import save_table
from vcjax.metrics import METRICS, higher_is_better, metric_bounds
from vcjax.pipeline._align import align
from vcjax.pipeline._bootstrap import resampler
from vcjax.pipeline._calibrate import calibrate
from vcjax.pipeline._contract import model_sums, model_values, resample_terms
from vcjax.pipeline._evaluate import _TRUTH_DEFAULTS, as_screen
from vcjax.pipeline._scoring import engine_inputs, resolve_metrics, score_sources, usable_metrics
from vcjax.pipeline._screen import Screen
from vcjax.pipeline._spec import BootSpec, ScoreSpec, warn_if_rough
from vcjax.pipeline._tidy import tidy
from vcjax.stats import TIE_TOL, interval, ties

__all__ = ["AGGREGATES", "RESAMPLE", "TIE_TOL", "SweepResult", "sweep"]

AGGREGATES = ("mean", "median")
RESAMPLE = ("cells", "perturbations", "both")


# ----------------------------------------------------------------------------- the models


def _model_items(models, names: Sequence[str] | None) -> Iterator[tuple[str, Any]]:
    """``(name, prediction)`` pairs of any accepted ``models`` form, lazily."""
    if isinstance(models, np.ndarray) or (hasattr(models, "shape") and hasattr(models, "ndim")):
        arr = models
        if arr.ndim != 3:
            raise VcjaxInputError(f"a models array must be (M, P, G); got shape {tuple(arr.shape)}")
        if names is None or len(names) != arr.shape[0]:
            raise VcjaxInputError(
                f"a models array of {arr.shape[0]} models needs names=[...] with one name each"
            )
        return ((str(n), np.asarray(arr[i])) for i, n in enumerate(names))
    if isinstance(models, Mapping):
        return ((str(k), v) for k, v in models.items())
    if isinstance(models, (str, bytes, os.PathLike)) or not isinstance(models, Iterable):
        raise VcjaxInputError(
            "models must be a mapping name → prediction, an iterable of (name, prediction) "
            "pairs, or an (M, P, G) array with names="
        )

    def pairs():
        for item in models:
            if not (isinstance(item, tuple) and len(item) == 2):
                raise VcjaxInputError("an iterable of models must yield (name, prediction) pairs")
            yield str(item[0]), item[1]

    return pairs()


class _ModelStore:
    """Aligned models, float32, in perturbation-major blocks of ``block`` models (one
    ``(P_j, Mc, G)`` array per stratum): filled in place as models arrive, each full block
    moved to the device (or, beyond ``budget`` bytes, spilled to a temporary file)."""

    def __init__(
        self, sizes: Sequence[int], n_genes: int, block: int, budget: int, place: Callable
    ) -> None:
        self.place = place  # host array -> device array (replicated over the devices)
        self.sizes = [int(n) for n in sizes]
        self.offsets = np.cumsum([0] + self.sizes)
        self.G, self.block, self.budget = int(n_genes), max(1, int(block)), int(budget)
        self.names: list[str] = []
        self.blocks: list[tuple[int, int]] = []
        self._device: list[tuple[jax.Array, ...]] = []
        self._file = None
        self._buf: np.ndarray | None = None  # (rows, block, G): the block being filled
        self._held = 0

    def __len__(self) -> int:
        return len(self.names)

    @property
    def spilled(self) -> bool:
        return self._file is not None

    def add(self, name: str, matrices: Sequence[np.ndarray]) -> None:
        if self._buf is None:
            self._buf = np.empty((int(self.offsets[-1]), self.block, self.G), np.float32)
        i = len(self.names) - (self.blocks[-1][1] if self.blocks else 0)
        for j, m in enumerate(matrices):
            self._buf[self.offsets[j] : self.offsets[j + 1], i] = m
        self.names.append(name)
        if i + 1 == self.block:
            self._flush()

    def finish(self) -> None:
        """Flush the last, partial block."""
        if self._buf is not None:
            self._flush()

    def _flush(self) -> None:
        i0 = self.blocks[-1][1] if self.blocks else 0
        i1 = len(self.names)
        buf, self._buf = self._buf[:, : i1 - i0], None
        self.blocks.append((i0, i1))
        self._held += buf.nbytes
        if self._file is None and self._held > self.budget:
            self._file = tempfile.TemporaryFile(prefix="vcjax-sweep-models-")
            for arrays in self._device:  # the blocks held so far go to the file too
                self._file.write(np.concatenate([np.asarray(a) for a in arrays]).tobytes())
            self._device = []
        if self._file is None:
            self._device.append(
                tuple(self.place(np.ascontiguousarray(buf[a:b])) for a, b in self._ranges())
            )
        else:
            self._file.seek(0, os.SEEK_END)
            self._file.write(np.ascontiguousarray(buf).tobytes())

    def _ranges(self) -> list[tuple[int, int]]:
        return [(int(self.offsets[j]), int(self.offsets[j + 1])) for j in range(len(self.sizes))]

    def chunk(self, index: int) -> tuple[jax.Array, ...]:
        """Block ``index``: one ``(P_j, Mc, G)`` float32 array per stratum."""
        if self._file is None:
            return self._device[index]
        i0, i1 = self.blocks[index]
        rows = int(self.offsets[-1])
        self._file.seek(i0 * rows * self.G * 4)
        raw = np.frombuffer(self._file.read((i1 - i0) * rows * self.G * 4), np.float32)
        raw = raw.reshape(rows, i1 - i0, self.G)
        return tuple(self.place(np.ascontiguousarray(raw[a:b])) for a, b in self._ranges())

    def close(self) -> None:
        self._device = []
        self._buf = None
        if self._file is not None:
            self._file.close()


class _Spool:
    """Per (metric, model, row) resampled values, written chunk by chunk to a temp file and
    read back a few models at a time (memory bounded by a chunk, not by ``n_boot``)."""

    def __init__(self, n_metrics: int, n_rows: int) -> None:
        self.n_metrics, self.n_rows = n_metrics, n_rows
        self._file = tempfile.TemporaryFile(prefix="vcjax-sweep-samples-")
        self._blocks: list[tuple[int, int, int, int]] = []  # (offset, i0, i1, b)

    def write(self, block: np.ndarray, i0: int) -> None:
        """``block``: ``(n_metrics, models, rows, b)`` float32 of models ``i0 …``."""
        block = np.ascontiguousarray(block, dtype=np.float32)
        self._file.seek(0, os.SEEK_END)
        offset = self._file.tell()
        self._file.write(block.tobytes())
        self._blocks.append((offset, i0, i0 + block.shape[1], block.shape[3]))

    def read(self, metric: int, i0: int, i1: int) -> np.ndarray:
        """``(i1 − i0, rows, B)`` samples of one metric for models ``i0 … i1 − 1`` (within
        one written block of models)."""
        parts = []
        for offset, b0, b1, b in self._blocks:
            if not b0 <= i0 < b1:
                continue
            per_model = self.n_rows * b * 4
            self._file.seek(offset + (metric * (b1 - b0) + (i0 - b0)) * per_model)
            raw = self._file.read((i1 - i0) * per_model)
            parts.append(np.frombuffer(raw, np.float32).reshape(i1 - i0, self.n_rows, b))
        return np.concatenate(parts, axis=-1)

    def close(self) -> None:
        self._file.close()


# ---------------------------------------------------------------------------- aggregates


def _perturbation_counts(seed: int, b: int, n_rows: int) -> np.ndarray:
    """How often each row is drawn in perturbation resample ``b`` (``n_rows`` draws)."""
    rng = np.random.default_rng([int(seed), 0x5EED, int(b)])
    return np.bincount(rng.integers(0, n_rows, n_rows), minlength=n_rows).astype(np.float64)


def _aggregate(values: np.ndarray, how: str, counts: np.ndarray | None = None) -> np.ndarray:
    """Mean or median over the last axis, skipping non-finite values, rows weighted by
    ``counts`` (broadcast against ``values``); NaN where no value is finite."""
    v = np.asarray(values)
    ok = np.isfinite(v)
    if counts is None:
        n = ok.sum(axis=-1)
        if how == "mean":
            tot = np.where(ok, v, 0.0).sum(axis=-1, dtype=np.float64)
            with np.errstate(invalid="ignore", divide="ignore"):
                return np.where(n > 0, tot / np.maximum(n, 1), np.nan)
        srt = np.sort(np.where(ok, v, np.nan), axis=-1)  # the finite values first
        lo = np.take_along_axis(srt, np.maximum((n - 1) // 2, 0)[..., None], -1)[..., 0]
        hi = np.take_along_axis(srt, np.minimum(n // 2, v.shape[-1] - 1)[..., None], -1)[..., 0]
        return np.where(n > 0, 0.5 * (lo.astype(np.float64) + hi), np.nan)
    v, c = np.broadcast_arrays(v, np.asarray(counts, np.float64))
    ok = np.isfinite(v)
    c = np.where(ok, c, 0.0)
    tot = c.sum(axis=-1)
    if how == "mean":
        with np.errstate(invalid="ignore", divide="ignore"):
            num = (np.where(ok, v, 0.0).astype(np.float64) * c).sum(-1)
            return np.where(tot > 0, num / np.where(tot > 0, tot, 1.0), np.nan)
    order = np.argsort(np.where(ok, v, np.inf), axis=-1)
    vs = np.take_along_axis(v, order, -1).astype(np.float64)
    cum = np.cumsum(np.take_along_axis(c, order, -1), axis=-1)
    half = tot[..., None] / 2.0
    lo = np.argmax(cum >= half, axis=-1)[..., None]  # first position reaching half the weight
    hi = np.argmax(cum > half, axis=-1)[..., None]
    exact = np.take_along_axis(cum, lo, -1) == half
    vlo, vhi = np.take_along_axis(vs, lo, -1), np.take_along_axis(vs, hi, -1)
    med = np.where(exact, 0.5 * (vlo + vhi), vlo)[..., 0]
    return np.where(tot > 0, med, np.nan)


# ------------------------------------------------------------------------------- result


@dataclasses.dataclass
class SweepResult:
    """The outcome of :func:`sweep`.

    Attributes:
      table: one row per (model, perturbation, metric): ``model``, ``perturbation``,
        ``metric``, ``value``, ``calibrated``, ``note`` (+ ``covariate``), and with cell
        resamples ``ci_low``, ``ci_high`` (per perturbation; see :func:`sweep`).
      baselines: the baselines' rows (``source`` instead of ``model``), scored once.
      models: the models' names, in order.
      errors: models that failed with ``on_error="skip"``: name → one-line reason.
      info: the options and timings.
      aggregates, resampled, baseline_aggregates, baseline_resampled, point_values: the
        arrays behind :meth:`leaderboard` and :meth:`pairwise` (see the field comments).
    """

    table: pd.DataFrame
    baselines: pd.DataFrame
    models: list[str]
    errors: dict[str, str]
    info: dict[str, Any]
    #: (metric, calibrated, aggregate) → the aggregate over rows of each model's point
    #: estimates (M,), and of each resample (M, B); the same for the baselines by name
    aggregates: dict[tuple[str, bool, str], np.ndarray] = dataclasses.field(
        repr=False, default_factory=dict
    )
    resampled: dict[tuple[str, bool, str], np.ndarray] = dataclasses.field(
        repr=False, default_factory=dict
    )
    baseline_aggregates: dict[tuple[str, bool, str], dict[str, float]] = dataclasses.field(
        repr=False, default_factory=dict
    )
    baseline_resampled: dict[tuple[str, bool, str], dict[str, np.ndarray]] = dataclasses.field(
        repr=False, default_factory=dict
    )
    #: (metric, calibrated) → the point estimates (M, rows), rows in the screen's order
    point_values: dict[tuple[str, bool], np.ndarray] = dataclasses.field(
        repr=False, default_factory=dict
    )

    def _key(self, metric: str, calibrated: bool, aggregate: str) -> tuple[str, bool, str]:
        if aggregate not in AGGREGATES:
            raise VcjaxInputError(f"aggregate must be one of {AGGREGATES}; got {aggregate!r}")
        key = (metric, bool(calibrated), aggregate)
        protocol = self.info.get("protocol")
        if (
            key not in self.aggregates
            and protocol
            and (metric, False, aggregate) in self.aggregates
        ):
            raise VcjaxInputError(
                f"protocol={protocol!r} values are not calibrated: pass calibrated=False"
            )
        if key not in self.aggregates:
            have = sorted({k[0] for k in self.aggregates})
            raise VcjaxInputError(f"metric {metric!r} was not scored in this sweep; scored: {have}")
        return key

    def _oriented(self, metric: str, calibrated: bool) -> float:
        hib = self.info.get("higher_is_better")  # a protocol's own metrics
        if calibrated:  # calibrated scores (also a protocol's, e.g. vcc2026's): higher is better
            return 1.0
        if hib is not None and metric in hib:
            if hib[metric] is None:
                raise VcjaxInputError(f"metric {metric!r} has no better direction: not ranked")
            return 1.0 if hib[metric] else -1.0
        return 1.0 if calibrated or higher_is_better(metric) else -1.0

    def leaderboard(
        self,
        metric: str = "r2w_delta",
        *,
        calibrated: bool = True,
        aggregate: str = "mean",
        ci: float | None = None,
        baselines: bool = False,
    ) -> pd.DataFrame:
        """One row per model, best first, indexed by name.

        Columns: ``value`` (the aggregate over perturbations of the point estimates),
        ``ci_low``/``ci_high`` (its interval over the resamples, centred as
        :func:`vcjax.evaluate`'s), ``rank`` (1 = best; ties share the best rank),
        ``rank_low``/``rank_high`` (the rank's interval over the resamples), ``p_best`` (the
        share of resamples in which the model is best, ties shared, so the column sums to 1)
        and ``differs_from_best`` (the paired interval of its difference from the best model
        excludes 0). ``baselines=True`` appends the baselines (aggregate and interval only).
        Without resamples the intervals are NaN, the rank interval is the rank and ``p_best``
        is 1 for the best (shared when tied). A model whose aggregate is undefined (NaN: e.g.
        every perturbation gated) has no rank and no ``p_best`` (<NA>/NaN) and comes last.
        """
        key = self._key(metric, calibrated, aggregate)
        ci = float(self.info.get("ci", 0.95) if ci is None else ci)
        s = self._oriented(metric, calibrated)
        point = self.aggregates[key]
        M = point.size
        ranks = _rank(s * point[:, None])[:, 0]
        samples = self.resampled.get(key)
        if samples is None or samples.shape[1] == 0:
            lo = hi = np.full(M, np.nan)
            r_lo = r_hi = ranks
            best = _best_share(s * point[:, None])[:, 0]
            differs = np.full(M, None, dtype=object)
        else:
            lo, hi = interval(
                samples, point, ci=ci, method="percentile", target="expected",
                bounds=metric_bounds(metric, calibrated=calibrated),
            )  # fmt: skip
            rk = _rank(s * samples)  # (M, B)
            r_lo = np.floor(np.quantile(rk, (1 - ci) / 2, axis=1, method="lower"))
            r_hi = np.ceil(np.quantile(rk, (1 + ci) / 2, axis=1, method="higher"))
            best = _best_share(s * samples).mean(axis=1)
            top = int(np.nanargmax(np.where(np.isfinite(point), s * point, -np.inf)))
            d = s * (samples[top][None] - samples)  # (M, B) best − model, oriented
            dlo, _ = interval(
                d, s * (point[top] - point), ci=ci, method="percentile", target="expected"
            )
            differs = np.where(np.arange(M) == top, False, dlo > 0).astype(object)
        # a model whose aggregate is undefined (every perturbation NaN) has no rank
        defined = np.isfinite(point)
        if not defined.any():
            differs = np.full(M, None, dtype=object)
        differs = np.where(defined, differs, None)

        def ranked(x) -> pd.array:
            return pd.array(np.where(defined, np.asarray(x, float), np.nan)).astype("Int64")

        out = pd.DataFrame(
            {
                "value": point,
                "ci_low": lo,
                "ci_high": hi,
                "rank": ranked(ranks),
                "rank_low": ranked(r_lo),
                "rank_high": ranked(r_hi),
                "p_best": np.where(defined, best, np.nan),
                "differs_from_best": differs,
            },
            index=pd.Index(self.models, name="model"),
        )
        out = out.sort_values(
            ["rank", "value"], ascending=[True, s < 0], kind="stable", na_position="last"
        )
        if baselines and key in self.baseline_aggregates:
            rows = []
            for name, v in self.baseline_aggregates[key].items():
                smp = self.baseline_resampled.get(key, {}).get(name)
                b_lo, b_hi = (np.nan, np.nan)
                if smp is not None and smp.size:
                    lo_, hi_ = interval(
                        smp[None], np.array([v]), ci=ci, method="percentile", target="expected",
                        bounds=metric_bounds(metric, calibrated=calibrated),
                    )  # fmt: skip
                    b_lo, b_hi = float(lo_[0]), float(hi_[0])
                rows.append(dict(model=f"[{name}]", value=v, ci_low=b_lo, ci_high=b_hi))
            extra = pd.DataFrame(rows).set_index("model")
            out = pd.concat([out, extra])
        out.attrs.update(metric=metric, calibrated=calibrated, aggregate=aggregate, ci=ci,
                         resample=self.info.get("resample"), n_boot=self.info.get("n_boot", 0))  # fmt: skip
        return out

    def pairwise(
        self, metric: str = "r2w_delta", *, calibrated: bool = True, aggregate: str = "mean"
    ) -> pd.DataFrame:
        """``M × M``: the share of resamples in which the row model beats the column model on
        the aggregate (ties count half; the diagonal is 0.5). Without resamples, from the
        point estimates (1, 0 or 0.5)."""
        key = self._key(metric, calibrated, aggregate)
        s = self._oriented(metric, calibrated)
        samples = self.resampled.get(key)
        x = s * (
            self.aggregates[key][:, None] if samples is None or samples.shape[1] == 0 else samples
        )
        x = np.where(np.isfinite(x), x, -np.inf)
        a, b = x[:, None, :], x[None, :, :]
        tie = ties(a, b)  # two undefined aggregates (−inf) are equal: a tie
        win = np.where(tie, 0.5, (a > b).astype(float)).mean(axis=-1)
        return pd.DataFrame(win, index=pd.Index(self.models, name="model"), columns=self.models)

    def tidy(self) -> pd.DataFrame:
        """The models' and the baselines' rows as one table: ``source`` is ``"model"`` or
        the baseline's name, ``model`` the model's name (empty for baselines)."""
        t = self.table.assign(source="model")
        b = self.baselines.assign(model=None)
        out = pd.concat([t, b[[c for c in t.columns if c in b.columns]]], ignore_index=True)
        out["model"] = out["model"].astype(object)
        return out

    def save(self, path: str | os.PathLike) -> None:
        """:meth:`tidy`, written atomically (``.parquet``, ``.csv``…) with :attr:`info` as
        metadata."""
        save_table(self.tidy(), path, meta=dict(self.info))


def _rank(x: np.ndarray) -> np.ndarray:
    """Rank of each row within each column (1 = largest; ties share the best rank; NaN last)."""
    x = np.where(np.isfinite(x), x, -np.inf)
    M = x.shape[0]
    out = np.empty(x.shape, dtype=np.int64)
    for j in range(x.shape[1]):
        col = x[:, j]
        order = np.argsort(-col, kind="stable")
        srt = col[order]
        r = np.arange(1, M + 1)
        # ties (within TIE_TOL) take the rank of the first of their run
        same = np.r_[False, ties(srt[1:], srt[:-1])]  # −inf ties −inf (equal values)
        starts = np.where(same, 0, r)
        r = np.maximum.accumulate(starts)
        out[order, j] = r
    return out


def _best_share(x: np.ndarray) -> np.ndarray:
    """Per column, 1/k for each of the k rows tied for the largest value, 0 elsewhere."""
    x = np.where(np.isfinite(x), x, -np.inf)
    top = x.max(axis=0, keepdims=True)
    is_best = ties(x, top) & np.isfinite(top)
    k = is_best.sum(axis=0, keepdims=True)
    return np.where(k > 0, is_best / np.maximum(k, 1), 0.0)


# --------------------------------------------------------------------------------- sweep


def sweep(
    truth,
    models,
    *,
    names: Sequence[str] | None = None,
    key: str | None = None,
    control: str | None = None,
    metrics: Sequence[str] | str | None = None,
    n_boot: int = 0,
    ci: float = 0.95,
    seed: int = 0,
    resample: str | None = None,
    k: int = 20,
    strict: bool = False,
    gate: bool = True,
    pred_layer: str | None = None,
    pred_normalize: str | None = "auto",
    check_scale: str = "error",
    on_error: str = "raise",
    model_chunk: int | None = None,
    chunk_size: int | None = None,
    memory_budget: int = 1 << 30,
    progress: bool | Callable[[str, int, int], None] = False,
    devices: Sequence[jax.Device] | None = None,
    protocol: str | None = None,
    **truth_options: Any,
) -> SweepResult:
    """Score many models against one prepared truth, on shared resamples.

    Args:
      truth: a :class:`~vcjax.pipeline.Screen`, or an AnnData / ``.h5ad`` path prepared here
        (with ``key``, ``control``, ``seed`` and ``**truth_options``, as :func:`vcjax.evaluate`).
      models: a mapping name → prediction (any form :func:`vcjax.evaluate` accepts, paths
        included), an iterable of ``(name, prediction)`` pairs (consumed once, lazily; each
        model is aligned and kept as float32, spilled to a temporary file beyond
        ``memory_budget``), or an ``(M, P, G)`` array in the screen's order with ``names``.
      names: the names of an array of models.
      key, control: the condition column and control label (not needed for a Screen).
      metrics: metric names (default: the core metrics; peer metrics are scored for the
        point estimates only).
      n_boot: resamples (0: point estimates only).
      ci: interval level.
      seed: the resamples' seed (and, when preparing here, the null baseline's).
      resample: ``"cells"`` (default), ``"perturbations"`` or ``"both"`` (module docstring);
        under a protocol only ``"perturbations"`` (its default).
      k, strict, gate: scoring options, as :func:`vcjax.evaluate`.
      pred_layer, pred_normalize: how predictions are read, as :func:`vcjax.evaluate`.
      check_scale: ``"error"``, ``"warn"`` or ``"off"``: a model on another scale than the
        truth, as :func:`vcjax.evaluate` (with ``on_error="skip"`` an error skips it).
      on_error: ``"raise"`` (default) or ``"skip"``: a model that cannot be aligned is left
        out and its error recorded in :attr:`SweepResult.errors`.
      model_chunk: models contracted at once (default: about 2**28 elements, at most 128).
      chunk_size: resamples per compiled call.
      memory_budget: bytes of aligned models held in memory before spilling to disk.
      progress: True for a log line per chunk, or ``callback(stage, done, total)`` with
        ``stage`` in ``"models"``, ``"resamples"``.
      devices: the devices the resamples are sharded over (default: every local device);
        the models are replicated on them. Resample ``b`` depends only on ``seed`` and
        ``b``, so the values do not depend on the devices.
      protocol: None/``"dbd"`` (default), or a peer's conventions (``"cell-eval"``, as
        :func:`vcjax.evaluate`): the truth is prepared once under it, every model scored
        with it (raw values, no baselines, ``calibrated`` NaN), and with ``n_boot > 0`` the
        perturbations resampled, the same draws for every model
        (:func:`vcjax.pipeline._protocol.protocol_sweep`).

    Returns:
      :class:`SweepResult`.
    """
    if protocol is not None and protocol != "dbd":
        from vcjax.pipeline._protocol import protocol_sweep

        given = {**{k_: v for k_, v in locals().items() if k_ != "truth_options"}, **truth_options}
        return protocol_sweep(
            truth, models, protocol=protocol, names=names, key=key, control=control,
            metrics=metrics, n_boot=n_boot, ci=ci, seed=seed, resample=resample,
            layer=truth_options.pop("layer", None), pred_layer=pred_layer, on_error=on_error,
            progress=progress, given=given, defaults={**_SWEEP_DEFAULTS, **_TRUTH_DEFAULTS},
        )  # fmt: skip
    if resample is None:
        resample = "cells"
    if resample not in RESAMPLE:
        raise VcjaxInputError(f"resample must be one of {RESAMPLE}; got {resample!r}")
    if on_error not in ("raise", "skip"):
        raise VcjaxInputError(f"on_error must be 'raise' or 'skip'; got {on_error!r}")
    if n_boot and n_boot < 2:
        raise VcjaxInputError(f"n_boot must be 0 or >= 2, got {n_boot}")
    warn_if_rough(n_boot)
    t_start = time.perf_counter()
    report = progress if callable(progress) else None
    score = ScoreSpec(metrics=metrics, k=k, strict=strict, gate=gate, chunk_size=None)
    items = _model_items(models, names)  # checks the form of `models` before any work
    n_models = (
        len(models)
        if isinstance(models, Mapping)
        else (int(models.shape[0]) if hasattr(models, "shape") else 0)
    )
    if n_models == 0 and (isinstance(models, Mapping) or hasattr(models, "shape")):
        raise VcjaxInputError("no model to score (an empty set of models)")
    screen = as_screen(truth, key=key, control=control, seed=seed, **truth_options)
    spec, strata = screen.spec, screen.strata
    sizes = [len(s.perturbations) for s in strata]
    offsets = np.cumsum([0] + sizes)
    n_rows, G = int(offsets[-1]), len(screen.genes)
    names_metrics = resolve_metrics(score.metrics, None, spec)
    core = [m for m in names_metrics if METRICS[m].is_core]

    # ---- baselines, scored once
    base_frames, base_values = [], []
    bnames = list(dict.fromkeys(n for s in strata for n in s.derived.baselines))
    base_point = np.full((len(bnames), len(core), 2, n_rows), np.nan)
    for j, s in enumerate(strata):
        values = score_sources(s, spec, dict(s.baselines), names_metrics, score)
        cal = calibrate(values)
        base_values.append(values)
        base_frames.append(tidy(s, spec, score, values, cal))
        for si, n in enumerate(bnames):
            _fill_point(base_point[si], core, values.get(n, {}), cal.get(n, {}), offsets[j : j + 2])
    baselines = _finish_frame(pd.concat(base_frames, ignore_index=True), spec)

    # ---- models: aligned, point-scored (as evaluate), kept for the resamples
    inputs = [engine_inputs(s) for s in strata]  # the truth side cast once for every model
    store = None
    if n_boot and resample != "perturbations":
        block = model_chunk or max(1, min(128, (1 << 28) // max(1, n_rows * G)))
        if n_models and not model_chunk:  # blocks of equal size: one compilation
            block = -(-n_models // -(-n_models // block))
        store = _ModelStore(sizes, G, block, memory_budget, _placer(devices))
    frames, where, points, errors, seen = [], [], [], {}, set()
    try:
        for name, pred in items:
            if name in seen:
                raise VcjaxInputError(f"duplicated model name {name!r}")
            seen.add(name)
            try:
                prediction = align(
                    pred, screen, layer=pred_layer, normalize=pred_normalize,
                    check_scale=check_scale,
                )  # fmt: skip
            except (VcjaxInputError, TypeError, ValueError, FileNotFoundError, KeyError) as exc:
                if on_error == "raise":
                    raise VcjaxInputError(f"model {name!r}: {_one_line(exc)}") from exc
                errors[name] = f"{type(exc).__name__}: {_one_line(exc)}"
                continue
            mets = resolve_metrics(score.metrics, prediction, spec)
            per, rows_of, mets_of = [], [], []
            point = np.full((len(core), 2, n_rows), np.nan)
            for j, s in enumerate(strata):
                values = score_sources(
                    s, spec, {"model": prediction.matrices[j]}, mets, score,
                    prediction=prediction, inputs=inputs[j],
                )  # fmt: skip
                cal = calibrate({**base_values[j], **values})
                per.append(tidy(s, spec, score, values, {"model": cal["model"]}))
                _fill_point(point, core, values["model"], cal["model"], offsets[j : j + 2])
                order = list(values["model"])  # tidy's row order: metric, then perturbation
                rows_of.append(np.tile(np.arange(offsets[j], offsets[j + 1]), len(order)))
                mets_of.append(
                    np.repeat([core.index(m) if m in core else -1 for m in order], sizes[j])
                )
            frame = pd.concat(per, ignore_index=True).drop(columns=["source"])
            frames.append(frame.assign(model=name))
            where.append((np.concatenate(mets_of), np.concatenate(rows_of)))
            points.append(point)
            if store is not None:
                store.add(name, prediction.matrices)
            if report:
                report("models", len(frames), n_models)
        if not frames:
            raise VcjaxInputError(
                "no model to score" + (f" (every model failed: {errors})" if errors else "")
            )
        if store is not None:
            store.finish()
        table = _finish_frame(pd.concat(frames, ignore_index=True), spec)
        table = table[["model"] + [c for c in table.columns if c != "model"]]
        model_names = [str(n) for n in dict.fromkeys(table["model"])]
        info: dict[str, Any] = dict(
            n_boot=int(n_boot), ci=float(ci), seed=int(seed), resample=resample,
            backend=jax.default_backend(), reference=spec.reference_name,
            normalization=screen.normalization, n_models=len(model_names),
            metrics=list(core),
        )  # fmt: skip
        result = SweepResult(table, baselines, model_names, errors, info)
        point_all = np.stack(points)  # (M, metrics, 2, rows)
        for ci_, m in enumerate(core):
            for cal in (False, True):
                v, bv = point_all[:, ci_, int(cal)], base_point[:, ci_, int(cal)]
                result.point_values[(m, cal)] = v
                for how in AGGREGATES:
                    result.aggregates[(m, cal, how)] = _aggregate(v, how)
                    result.baseline_aggregates[(m, cal, how)] = dict(
                        zip(bnames, _aggregate(bv, how))
                    )
        info["point_seconds"] = time.perf_counter() - t_start
        if n_boot and resample == "perturbations":
            _perturbation_resamples(result, core, point_all, base_point, bnames, n_boot, seed)
        elif n_boot:
            lo, hi = _cell_resamples(
                result, screen, store, core, bnames, score, n_boot, ci, seed, resample,
                chunk_size=chunk_size, devices=devices, report=report, log=progress is True,
            )  # fmt: skip
            mi = np.concatenate([w[0] for w in where])
            row = np.concatenate([w[1] for w in where])
            model = np.repeat(np.arange(len(where)), [w[0].size for w in where])
            ok = mi >= 0
            for col, arr in (("ci_low", lo), ("ci_high", hi)):
                out = np.full(mi.size, np.nan)
                out[ok] = arr[mi[ok], model[ok], row[ok]]
                table[col] = out
    finally:
        if store is not None:
            store.close()
    info["seconds"] = time.perf_counter() - t_start
    return result


#: sweep's options and their defaults (what a protocol checks it was not given)
_SWEEP_DEFAULTS = {
    name: par.default
    for name, par in inspect.signature(sweep).parameters.items()
    if par.default is not inspect.Parameter.empty
}


def _placer(devices: Sequence[jax.Device] | None) -> Callable[[np.ndarray], jax.Array]:
    """How the models and the point truth go to the devices: replicated over a mesh of
    several (the resamples are sharded over it), else on the one device."""
    devs = list(jax.devices() if devices is None else devices)
    if len(devs) == 1:
        return lambda x: jax.device_put(x, devs[0])
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    sharding = NamedSharding(Mesh(np.asarray(devs), ("resamples",)), PartitionSpec())
    return lambda x: jax.device_put(x, sharding)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _fill_point(out, core, values, calibrated, bounds) -> None:
    """Write one source's point values of one stratum into ``out`` ``(metrics, 2, rows)``."""
    a, b = int(bounds[0]), int(bounds[1])
    for ci, m in enumerate(core):
        if m in values:
            out[ci, 0, a:b] = values[m]
            out[ci, 1, a:b] = calibrated.get(m, np.nan)


def _finish_frame(df: pd.DataFrame, spec) -> pd.DataFrame:
    if spec.covariate is None and "covariate" in df.columns:
        df = df.drop(columns=["covariate"])
    return df.reset_index(drop=True)


def _perturbation_resamples(result, core, point, base_point, bnames, n_boot, seed) -> None:
    """Perturbation resampling: the aggregates of the point values, rows weighted by how
    often each is drawn (the same draws for every model and baseline)."""
    n_rows = point.shape[-1]
    for m in core:
        for cal in (False, True):
            for how in AGGREGATES:
                result.resampled[(m, cal, how)] = np.full((point.shape[0], n_boot), np.nan)
                result.baseline_resampled[(m, cal, how)] = {}
    bres = {k: np.full((len(bnames), n_boot), np.nan) for k in result.resampled}
    for b0 in range(0, n_boot, 64):
        b1 = min(b0 + 64, n_boot)
        counts = np.stack([_perturbation_counts(seed, b, n_rows) for b in range(b0, b1)])
        for ci_, m in enumerate(core):
            for cal in (False, True):
                v = point[:, ci_, int(cal), None, :]  # (M, 1, rows)
                bv = base_point[:, ci_, int(cal), None, :]
                for how in AGGREGATES:
                    result.resampled[(m, cal, how)][:, b0:b1] = _aggregate(v, how, counts)
                    bres[(m, cal, how)][:, b0:b1] = _aggregate(bv, how, counts)
    for key, arr in bres.items():
        result.baseline_resampled[key] = dict(zip(bnames, arr))


def _cell_resamples(
    result: SweepResult,
    screen: Screen,
    store: _ModelStore,
    metrics: list[str],
    bnames: list[str],
    score: ScoreSpec,
    n_boot: int,
    ci: float,
    seed: int,
    resample: str,
    *,
    chunk_size: int | None,
    devices: Sequence[jax.Device] | None,
    report,
    log: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """The cell bootstrap of every model: the resampled truth once per resample (the
    baselines scored with it), every model contracted against it. Fills the result's
    resampled aggregates; returns the per-(metric, model, row) interval ends."""
    spec, strata = screen.spec, screen.strata
    dtype = working_dtype()
    M, offsets = len(store), store.offsets
    n_rows, n_met, S = int(offsets[-1]), len(metrics), len(bnames)
    boot = BootSpec(n_boot=n_boot, ci=ci, seed=seed, chunk_size=chunk_size or 16)
    runners, consts = [], []
    for j, s in enumerate(strata):
        y0 = np.asarray(s.truth, dtype)
        r0 = np.asarray(s.reference, dtype)
        rs = resampler(
            s, spec, model=None, metrics=metrics, score=score, boot=boot, index=j, devices=devices,
            extra=resample_terms, extra_arrays=dict(sweep_y0=y0, sweep_r0=r0),
            recycle=len(strata) == 1,  # else one chunk's buffers would stay held per stratum
        )  # fmt: skip
        runners.append(rs)
        consts.append(
            dict(
                y0=store.place(y0),
                r0=store.place(r0),
                m0=None if s.deg_mask is None else store.place(np.asarray(s.deg_mask)),
                m0z=store.place(
                    np.zeros((len(s.perturbations), 1), bool)
                    if s.deg_mask is None
                    else np.asarray(s.deg_mask)
                ),
                metrics=tuple(usable_metrics(metrics, s)),
            )
        )
    chunk = runners[0].chunk
    agg = np.full((n_met, 2, len(AGGREGATES), M, n_boot), np.nan)
    bagg = np.full((n_met, 2, len(AGGREGATES), S, n_boot), np.nan)
    spool = _Spool(n_met, n_rows)
    clock = dict(truth=0.0, models=0.0)
    model_side: dict[tuple[int, int], dict] = {}  # (block, stratum) -> model_sums
    t0 = time.perf_counter()
    try:
        for start in range(0, n_boot, chunk):
            b = min(chunk, n_boot - start)
            sl = slice(start, start + b)
            t_a = time.perf_counter()
            outs = [rs.run(start) for rs in runners]
            terms = [o[1] for o in outs]
            bvals = np.full((n_met, S, b, n_rows), np.nan, dtype)  # every stratum's rows
            for j, o in enumerate(outs):
                rows = slice(offsets[j], offsets[j + 1])
                slots = [bnames.index(n) for n in runners[j].sources]  # this stratum's baselines
                for mi, m in enumerate(metrics):
                    if m in o[0]:
                        bvals[mi, slots, :, rows] = np.asarray(o[0][m])[:, :b]
            bdict = {
                n: {m: bvals[mi, si] for mi, m in enumerate(metrics)} for si, n in enumerate(bnames)
            }
            clock["truth"] += time.perf_counter() - t_a  # (the outputs above waited for it)
            bcal = calibrate(bdict)
            counts = None
            if resample == "both":
                counts = np.stack([_perturbation_counts(seed, start + i, n_rows) for i in range(b)])
            for mi, m in enumerate(metrics):
                bc = np.stack([bcal[n][m] for n in bnames])
                for h, how in enumerate(AGGREGATES):
                    bagg[mi, 0, h, :, sl] = _aggregate(bvals[mi], how, counts)
                    bagg[mi, 1, h, :, sl] = _aggregate(bc, how, counts)
            for bi, (i0, i1) in enumerate(store.blocks):
                t_m = time.perf_counter()
                parts = store.chunk(bi)
                for j, c in enumerate(consts):  # resample-free sums, once per block
                    if (bi, j) not in model_side:
                        model_side[(bi, j)] = model_sums(parts[j], c["y0"], c["r0"], c["m0z"])
                got = [
                    model_values(
                        terms[j],
                        parts[j],
                        sums=model_side[(bi, j)],
                        y0=c["y0"],
                        r0=c["r0"],
                        m0=c["m0"],
                        metrics=c["metrics"],
                        k=score.k,
                        strict=score.strict,
                        gate=score.gate,
                    )  # fmt: skip
                    for j, c in enumerate(consts)
                ]
                raw = np.full((n_met, i1 - i0, b, n_rows), np.nan, dtype)
                for j, g in enumerate(got):
                    for mi, m in enumerate(metrics):
                        if m in g:
                            raw[mi, :, :, offsets[j] : offsets[j + 1]] = np.asarray(g[m])[:, :b]
                clock["models"] += time.perf_counter() - t_m
                cal = calibrate({**bdict, "model": {m: raw[mi] for mi, m in enumerate(metrics)}})
                for mi, m in enumerate(metrics):
                    for h, how in enumerate(AGGREGATES):
                        agg[mi, 0, h, i0:i1, sl] = _aggregate(raw[mi], how, counts)
                        agg[mi, 1, h, i0:i1, sl] = _aggregate(cal["model"][m], how, counts)
                spool.write(np.swapaxes(raw, 2, 3), i0)  # (metrics, models, rows, b)
            done = start + b
            if report:
                report("resamples", done, n_boot)
            elif log:
                rate = (time.perf_counter() - t0) / done
                print(f"sweep: {done}/{n_boot} resamples ({rate:.2f} s each)", flush=True)
        for mi, m in enumerate(metrics):
            for c in (0, 1):
                for h, how in enumerate(AGGREGATES):
                    result.resampled[(m, bool(c), how)] = agg[mi, c, h]
                    result.baseline_resampled[(m, bool(c), how)] = dict(zip(bnames, bagg[mi, c, h]))
        lo, hi = _row_intervals(result, spool, metrics, store.blocks, ci)
    finally:
        spool.close()
    result.info["resample_seconds"] = time.perf_counter() - t0
    result.info["truth_seconds"] = clock["truth"]  # resampled truth and baselines
    result.info["model_seconds"] = clock["models"]  # the models' contractions
    result.info["pvalue"] = runners[0].pvalue
    result.info["model_chunk"] = min(store.block, M)
    result.info["resample_chunk"] = chunk
    return lo, hi


def _row_intervals(result, spool: _Spool, metrics, blocks, ci, step: int = 8):
    """``(metrics, M, rows)`` interval ends of every (model, row) from the spooled samples,
    a few models at a time."""
    M, R = len(result.models), spool.n_rows
    lo = np.full((len(metrics), M, R), np.nan)
    hi = np.full((len(metrics), M, R), np.nan)
    for mi, m in enumerate(metrics):
        point = result.point_values[(m, False)]  # (M, R)
        for i0, i1 in blocks:
            for a in range(i0, i1, step):
                c = min(a + step, i1)
                smp = spool.read(mi, a, c)  # (c − a, R, B)
                l_, h_ = interval(
                    smp.reshape(-1, smp.shape[-1]), point[a:c].reshape(-1), ci=ci,
                    method="percentile", target="expected", bounds=metric_bounds(m),
                )  # fmt: skip
                lo[mi, a:c], hi[mi, a:c] = l_.reshape(c - a, R), h_.reshape(c - a, R)
    return lo, hi
