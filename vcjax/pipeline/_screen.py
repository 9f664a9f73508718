"""The prepared truth: :func:`prepare` streams a screen once into an immutable :class:`Screen`.

A :class:`Screen` holds, per covariate value (a :class:`Stratum`; one when there is no
covariate), the split sufficient statistics and everything :func:`vcjax.pipeline.derive`
makes of them — truth pseudobulks, the Δ reference, ``u_NTC``, ``u_ALL``, DEG scores,
adjusted p-values, weights and sets, every baseline — with the names that order its arrays,
the :class:`~vcjax.pipeline.TruthSpec` it was built with, and what a cell-level resampler
needs (each cell's group and half, and where the cells are). Score any number of
predictions against it (:func:`vcjax.evaluate`, :func:`vcjax.confidence`), save it
(:meth:`Screen.save`) and load it elsewhere (:meth:`Screen.load`).

The file format (``.vcjax``) is a ZIP archive, nothing executable: ``header.json`` (the
format name and version, the vcjax version, the options, names and notes) and one ``.npy``
array per member (NumPy's format, read with ``allow_pickle=False``). Arrays round-trip
bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import warnings
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from vcjax import data as vdata
from vcjax._errors import VcjaxInputError, preview
from vcjax._host import enable_compilation_cache
from vcjax._io import atomic_path, json_safe
from vcjax._version import __version__
from vcjax.pipeline._baselines import HostBaselines, additive_index, null_derangement
from vcjax.pipeline._derive import DEG, Derived, Fixed, Plan, Sums, derive
from vcjax.pipeline._scorer import scorer
from vcjax.pipeline._spec import DEFAULT_BASELINES, TruthSpec

__all__ = ["FORMAT", "FORMAT_VERSION", "Cells", "Screen", "Stratum", "prepare"]

log = logging.getLogger("vcjax")

FORMAT = "vcjax.screen"
FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True, eq=False)
class Cells:
    """Where a stratum's cells are, for the cell bootstrap and the cell-level peer metrics.

    Attributes:
      adata: the truth AnnData (None for a loaded screen until :meth:`open` reads ``path``).
      path: the ``.h5ad`` file it was read from, when known.
      codes: ``(N,)`` int32: each cell's group in the stratum (``-1``: not in it).
      half: ``(N,)`` int8: each cell's half (1 or 2).
      layer: the layer read instead of ``X``.
      normalization: what :func:`vcjax.data.group_stats` did (``"log1p_cp10k"`` or ``"none"``).
    """

    adata: Any
    path: str | None
    codes: np.ndarray
    half: np.ndarray
    layer: str | None
    normalization: str

    def open(self):
        """The AnnData (read backed from :attr:`path` when the screen was loaded)."""
        if self.adata is not None:
            return self.adata
        if self.path is None:
            raise VcjaxInputError(
                "this Screen was prepared from an in-memory AnnData, so its cells are not "
                "on disk: call screen.with_cells(adata) with that AnnData"
            )
        adata = vdata.read_h5ad(self.path, backed=True)
        if adata.n_obs != self.codes.size:
            raise VcjaxInputError(
                f"{self.path} has {adata.n_obs} cells but the Screen was prepared from "
                f"{self.codes.size}"
            )
        return adata


@dataclasses.dataclass(frozen=True, eq=False)
class Stratum:
    """The prepared truth of one covariate value (all of the screen without a covariate).

    Attributes:
      covariate: the covariate value, or None.
      perturbations: the perturbations, the row order of every ``(P, G)`` array.
      genes: the genes, the column order.
      control: the control label.
      stats: the split sufficient statistics (:class:`vcjax.data.SplitStats`), control
        included, groups in ``stats.half1.names`` order.
      derived: the derived arrays (:class:`vcjax.pipeline.Derived`, ``b = 1``).
      notes: per baseline, a reason per perturbation where it is undefined (``""`` else).
      cells: where the cells are (:class:`Cells`).
    """

    covariate: str | None
    perturbations: tuple[str, ...]
    genes: tuple[str, ...]
    control: str
    stats: vdata.SplitStats
    derived: Derived
    notes: Mapping[str, tuple[str, ...]]
    cells: Cells

    # the derived arrays without their resample axis
    @property
    def truth(self) -> np.ndarray:
        """``(P, G)`` float64 half-2 pseudobulks."""
        return self.derived.truth[0]

    @property
    def reference(self) -> np.ndarray:
        """``(G,)`` the Δ reference."""
        return self.derived.reference[0]

    @property
    def u_ntc(self) -> np.ndarray:
        """``(G,)`` the mean of all control cells."""
        return self.derived.u_ntc[0]

    @property
    def u_all_full(self) -> np.ndarray:
        """``(G,)`` ``u_ALL`` of all cells (the dataset-mean baseline)."""
        return self.derived.u_all_full[0]

    @property
    def u_all_half1(self) -> np.ndarray:
        """``(G,)`` ``u_ALL`` of half 1."""
        return self.derived.u_all_half1[0]

    @property
    def weights(self) -> np.ndarray | None:
        """``(P, G)`` float32 gene weights of the weighted metrics (None without weights)."""
        return None if self.derived.weights is None else self.derived.weights[0]

    @property
    def scores(self) -> np.ndarray | None:
        """``(P, G)`` float32 DEG t-scores (NaN → 0), or None."""
        return None if self.derived.deg is None else self.derived.deg.scores[0]

    @property
    def pvals_adj(self) -> np.ndarray | None:
        """``(P, G)`` float64 BH-adjusted DEG p-values, or None."""
        return None if self.derived.deg is None else self.derived.deg.pvals_adj[0]

    @property
    def deg_mask(self) -> np.ndarray | None:
        """``(P, G)`` bool DEG sets, or None."""
        return None if self.derived.deg is None else self.derived.deg.mask[0]

    @property
    def no_degs(self) -> np.ndarray | None:
        """``(P,)`` bool: perturbations without a significant DEG (DbD's gate), or None."""
        mask = self.deg_mask
        return None if mask is None else ~mask.any(axis=1)

    @property
    def baselines(self) -> Mapping[str, np.ndarray]:
        """Baseline name → ``(P, G)`` float64 prediction.

        A prepared screen builds a baseline from its sums each time it is read (it holds no
        baseline matrix; :class:`~vcjax.pipeline._baselines.HostBaselines`): keep what you
        read rather than reading it again.
        """
        return _Unbatched(self.derived.baselines)

    def baseline_sources(self) -> dict[str, Any]:
        """Baseline name → ``(P, G)`` prediction as scoring streams it: an
        :class:`vcjax.engine.Rows` whose row blocks are built from the sums as the engine
        reads them (a prepared screen), a broadcast view for the constant baselines, or the
        array itself (a loaded screen)."""
        b = self.derived.baselines
        if isinstance(b, HostBaselines):
            return {k: b.source(k) for k in b}
        return {k: v[0] for k, v in b.items()}

    def topk_mask(self, k: int) -> np.ndarray:
        """``(P, G)`` bool: the ``k`` genes of largest ``|t|`` (or weight) per perturbation,
        ties to the lower gene index (the genes of ``pearson_delta_topk``)."""
        s = self.scores if self.scores is not None else self.weights
        if s is None:
            raise VcjaxInputError("top-k genes need DEG scores or weights (weights='deg')")
        G = s.shape[1]
        if not 1 <= k <= G:
            raise VcjaxInputError(f"k={k} must be in [1, {G}]")
        order = np.argsort(-np.abs(s.astype(np.float64)), axis=1, kind="stable")
        mask = np.zeros(s.shape, dtype=bool)
        np.put_along_axis(mask, order[:, :k], True, axis=1)
        return mask

    @property
    def groups(self) -> tuple[str, ...]:
        """The ``C`` groups of the sums (control included)."""
        return tuple(self.stats.half1.names)

    def sums(self) -> Sums:
        """The split sums with a resample axis of 1 (views, no copy)."""
        h1, h2 = self.stats.half1, self.stats.half2
        return Sums(h1.n, h2.n, h1.sum[None], h1.sumsq[None], h2.sum[None], h2.sumsq[None])

    def plan(self, spec: TruthSpec, *, deg_strategy: str = "host") -> Plan:
        """The :class:`~vcjax.pipeline.Plan` of :func:`derive` for this stratum."""
        groups = self.groups
        return _plan(
            spec,
            groups,
            self.control,
            self.perturbations,
            tuple(self.derived.baselines),
            deg_strategy,
        )

    def fixed(self, spec: TruthSpec) -> Fixed:
        """The resample-independent inputs of :func:`derive` for this stratum."""
        return _fixed(spec, self.perturbations, len(self.genes))


class _Unbatched(Mapping):
    """A mapping of ``(b, ...)`` arrays read as their first resample (``v[0]``), each value
    got only when it is read."""

    def __init__(self, batched: Mapping[str, Any]) -> None:
        self._batched = batched

    def __getitem__(self, name: str) -> np.ndarray:
        return self._batched[name][0]

    def __iter__(self) -> Iterator[str]:
        return iter(self._batched)

    def __len__(self) -> int:
        return len(self._batched)


def _plan(spec, groups, control, perts, baselines, deg_strategy) -> Plan:
    pos = {g: i for i, g in enumerate(groups)}
    return Plan(
        control=pos[control],
        rows=tuple(pos[p] for p in perts),
        reference=spec.reference_name,
        weights=spec.weights_kind,
        weights_from=spec.weights_from,
        deg_method=spec.deg_method,
        baselines=tuple(baselines),
        deg_strategy=deg_strategy,
    )


def _fixed(spec: TruthSpec, perts: Sequence[str], n_genes: int) -> Fixed:
    P = len(perts)
    reference = weights = None
    if spec.reference_name == "array":
        reference = vdata.checked_reference(spec.reference, n_genes)
    if spec.weights_kind == "array":
        weights = spec.weights
        if weights.shape != (P, n_genes):
            raise VcjaxInputError(f"weights have shape {weights.shape}, expected ({P}, {n_genes})")
    return Fixed(
        reference=reference,
        weights=weights,
        derangement=null_derangement(P, seed=spec.seed).astype(np.int32) if P >= 2 else None,
        additive=additive_index(perts)[0],
    )


@dataclasses.dataclass(frozen=True, eq=False)
class Screen:
    """A prepared truth: score many predictions against it (module docstring).

    Attributes:
      spec: the options it was prepared with (:class:`~vcjax.pipeline.TruthSpec`).
      strata: one :class:`Stratum` per covariate value (one without a covariate).
      normalization: what was done to the truth's values (``"log1p_cp10k"`` or ``"none"``).
      source: where the truth came from (``path`` when read from a file).
      scale: the evidence of the truth cells' scale (:class:`vcjax.data.ScaleEvidence`,
        before normalisation, with what was done to them); None for a screen saved
        before vcjax recorded it (predictions are then checked against the pseudobulks).
      scoring_only: True for the screen :func:`vcjax.evaluate` prepares for one scoring
        without intervals: its sums of squares were released once the DEG tests had read
        them (``stats.*.sumsq`` are NaN views, which no scoring reads), so it cannot be
        saved, bootstrapped or used for confidence intervals. :func:`prepare` never makes
        one.
    """

    spec: TruthSpec
    strata: tuple[Stratum, ...]
    normalization: str
    source: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    scale: vdata.ScaleEvidence | None = None
    scoring_only: bool = False

    @property
    def genes(self) -> tuple[str, ...]:
        """The genes, the column order of every array."""
        return self.strata[0].genes

    @property
    def perturbations(self) -> tuple[str, ...]:
        """Every stratum's perturbations in order (the row order of the evaluation table)."""
        return tuple(p for s in self.strata for p in s.perturbations)

    @property
    def covariates(self) -> tuple[str | None, ...]:
        """The covariate value of each entry of :attr:`perturbations`."""
        return tuple(s.covariate for s in self.strata for _ in s.perturbations)

    def __iter__(self) -> Iterator[Stratum]:
        return iter(self.strata)

    def __len__(self) -> int:
        return len(self.strata)

    def __repr__(self) -> str:
        cov = "" if self.spec.covariate is None else f", {len(self.strata)} × {self.spec.covariate}"
        return (
            f"Screen({len(self.perturbations)} perturbations × {len(self.genes)} genes{cov}, "
            f"key={self.spec.key!r}, control={self.spec.control!r}, "
            f"reference={self.spec.reference_name!r}, weights={self.spec.weights_kind!r})"
        )

    def scorer(self, **options):
        """This truth as a pure JAX function of a ``(P, G)`` prediction:
        :func:`vcjax.pipeline.scorer` (``metrics=``, ``calibrated=``, ``k=``, ``strict=``,
        ``gate=``)."""
        return scorer(self, **options)

    def with_cells(self, adata) -> Screen:
        """The same screen with its cells in ``adata`` (for a screen prepared in memory)."""
        n = self.strata[0].cells.codes.size
        if adata.n_obs != n:
            raise VcjaxInputError(
                f"the AnnData has {adata.n_obs} cells; the Screen was prepared from {n}"
            )
        strata = tuple(
            dataclasses.replace(s, cells=dataclasses.replace(s.cells, adata=adata))
            for s in self.strata
        )
        return dataclasses.replace(self, strata=strata)

    # ------------------------------------------------------------------ save / load
    def save(self, path: str | os.PathLike) -> None:
        """Write the screen to ``path`` atomically (the ``.vcjax`` format, module docstring)."""
        if self.scoring_only:
            raise VcjaxInputError(
                "this Screen was prepared by evaluate() for one scoring (its sums of squares "
                "were released); prepare it with vcjax.prepare to save it"
            )
        header = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "vcjax": __version__,
            "spec": self.spec.options(),
            "normalization": self.normalization,
            "source": json_safe(dict(self.source)),
            "scale": None if self.scale is None else self.scale.to_dict(),
            "genes": list(self.genes),
            "strata": [],
        }
        arrays: dict[str, Any] = {}  # name -> array, or a function building it
        for name in ("reference", "weights", "split"):
            value = getattr(self.spec, name)
            if isinstance(value, np.ndarray):
                arrays[f"spec/{name}"] = value
        for j, s in enumerate(self.strata):
            header["strata"].append(
                {
                    "covariate": s.covariate,
                    "perturbations": list(s.perturbations),
                    "groups": list(s.groups),
                    "control": s.control,
                    "notes": {k: list(v) for k, v in s.notes.items()},
                    "baselines": list(s.derived.baselines),
                    "cells_path": s.cells.path,
                }
            )
            h1, h2 = s.stats.half1, s.stats.half2
            d = s.derived
            own = {
                "n1": h1.n, "n2": h2.n, "s1": h1.sum, "q1": h1.sumsq, "s2": h2.sum, "q2": h2.sumsq,
                "truth": d.truth, "reference": d.reference, "u_ntc": d.u_ntc,
                "u_all_full": d.u_all_full, "u_all_half1": d.u_all_half1,
                "codes": s.cells.codes, "half": s.cells.half,
            }  # fmt: skip
            if d.deg is not None:
                own.update({f"deg_{k}": v for k, v in d.deg._asdict().items()})
            elif d.weights is not None:
                own["weights"] = d.weights
            arrays.update({f"{j}/{k}": np.asarray(v) for k, v in own.items()})
            for name in d.baselines:
                if name not in ("control_mean", "dataset_mean"):  # views of u_ntc / u_all_full
                    # built when written, one at a time (HostBaselines holds none of them)
                    arrays[f"{j}/baseline_{name}"] = lambda b=d.baselines, n=name: b[n]
        with (
            atomic_path(path) as tmp,
            zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf,
        ):
            zf.writestr("header.json", json.dumps(header, indent=1))
            for name, value in arrays.items():
                value = value() if callable(value) else value
                with zf.open(f"{name}.npy", "w", force_zip64=True) as fh:
                    np.lib.format.write_array(fh, np.ascontiguousarray(value), allow_pickle=False)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Screen:
        """Read a screen written by :meth:`save`; another format version is refused."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise VcjaxInputError(f"screen file not found: {path}")
        try:
            zf = zipfile.ZipFile(path)
        except zipfile.BadZipFile:
            raise VcjaxInputError(f"not a vcjax screen file (not a ZIP archive): {path}") from None
        with zf:
            try:
                header = json.loads(zf.read("header.json"))
            except (KeyError, ValueError):
                raise VcjaxInputError(
                    f"not a vcjax screen file (no valid header.json): {path}"
                ) from None
            if header.get("format") != FORMAT:
                raise VcjaxInputError(
                    f"not a vcjax screen file (format {header.get('format')!r}): {path}"
                )
            if header.get("version") != FORMAT_VERSION:
                raise VcjaxInputError(
                    f"{path} is a screen of format version {header.get('version')} (written by vcjax "
                    f"{header.get('vcjax')}); this vcjax reads version {FORMAT_VERSION}: prepare it again"
                )
            names = {n[:-4] for n in zf.namelist() if n.endswith(".npy")}

            def array(name: str) -> np.ndarray:
                with zf.open(f"{name}.npy") as fh:
                    return np.lib.format.read_array(fh, allow_pickle=False)

            opts = dict(header["spec"])
            for name in ("reference", "weights", "split"):
                if opts.get(name) == "array":
                    opts[name] = array(f"spec/{name}")
            opts["baselines"] = tuple(opts["baselines"])
            spec = TruthSpec(**opts)
            genes = tuple(header["genes"])
            strata = []
            for j, meta in enumerate(header["strata"]):

                def a(k: str, j=j) -> np.ndarray:
                    return array(f"{j}/{k}")

                groups = tuple(meta["groups"])
                halves = [
                    vdata.GroupStats(groups, genes, a(f"n{h}"), a(f"s{h}"), a(f"q{h}"), meta["control"],
                                     normalization=header["normalization"])
                    for h in (1, 2)
                ]  # fmt: skip
                deg = (
                    DEG(*(a(f"deg_{k}") for k in DEG._fields))
                    if f"{j}/deg_scores" in names
                    else None
                )
                u_ntc, u_all_full = a("u_ntc"), a("u_all_full")
                P = len(meta["perturbations"])
                shape = (1, P, len(genes))
                baselines = {}
                for b in meta["baselines"]:
                    if b == "control_mean":
                        baselines[b] = np.broadcast_to(u_ntc[:, None, :], shape)
                    elif b == "dataset_mean":
                        baselines[b] = np.broadcast_to(u_all_full[:, None, :], shape)
                    else:
                        baselines[b] = a(f"baseline_{b}")
                derived = Derived(
                    truth=a("truth"), reference=a("reference"), u_ntc=u_ntc, u_all_full=u_all_full,
                    u_all_half1=a("u_all_half1"), deg=deg,
                    weights=deg.weights if deg is not None else (a("weights") if f"{j}/weights" in names else None),
                    baselines=baselines,
                )  # fmt: skip
                cells = Cells(
                    None,
                    meta["cells_path"],
                    a("codes"),
                    a("half"),
                    spec.layer,
                    header["normalization"],
                )
                strata.append(
                    Stratum(meta["covariate"], tuple(meta["perturbations"]), genes, meta["control"],
                            vdata.SplitStats(*halves), derived,
                            {k: tuple(v) for k, v in meta["notes"].items()}, cells)
                )  # fmt: skip
        scale = header.get("scale")  # absent from files written before it was recorded
        return cls(
            spec,
            tuple(strata),
            header["normalization"],
            dict(header.get("source") or {}),
            None if scale is None else vdata.ScaleEvidence.from_dict(scale),
        )


# ---------------------------------------------------------------------------------- prepare


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
) -> Screen:
    """Prepare the truth once: one streaming pass, everything derived, an immutable :class:`Screen`.

    Args:
      truth: the measured screen: an AnnData (in memory or backed) or an ``.h5ad`` path.
      key, control, reference, weights, weights_from, deg_method, baselines, split,
        split_seed, seed, layer, normalize, covariate, drop_small: the truth-side options of
        :func:`vcjax.evaluate` (:class:`~vcjax.pipeline.TruthSpec`).
      progress: show a progress bar over the streaming pass.

    Returns:
      The :class:`Screen`.
    """
    spec = TruthSpec(
        key=key,
        control=control,
        reference=reference,
        weights=weights,
        weights_from=weights_from,
        deg_method=deg_method,
        baselines=tuple(baselines) if not isinstance(baselines, str) else (baselines,),
        split=split,
        split_seed=split_seed,
        seed=seed,
        layer=layer,
        normalize=normalize,
        covariate=covariate,
        drop_small=drop_small,
    )
    return prepare_spec(truth, spec, progress=progress)


def _source_path(truth, adata) -> str | None:
    if isinstance(truth, (str, os.PathLike)):
        return os.path.abspath(os.fspath(truth))
    name = getattr(adata, "filename", None)
    return None if name is None else os.path.abspath(os.fspath(name))


def prepare_spec(
    truth,
    spec: TruthSpec,
    *,
    progress: bool = False,
    path: str | os.PathLike | None = None,
    keep_sumsq: bool = True,
) -> Screen:
    """:func:`prepare` with the options as a :class:`~vcjax.pipeline.TruthSpec`.

    ``path``: the file an in-memory ``truth`` was read from (recorded in the screen, whose
    bootstrap can then re-read the cells after a save and load). ``keep_sumsq=False``
    releases the ``(2C, G)`` float64 sums of squares once the DEG tests have read them
    (:attr:`Screen.scoring_only`: what :func:`vcjax.evaluate` does when it computes no
    intervals, a quarter of its peak memory at genome scale).
    """
    enable_compilation_cache()
    # opened here (or by evaluate, which passes ``path``): the file is closed after the pass
    # (anndata reopens a backed file when its X is read again, e.g. by the bootstrap), so
    # no handle outlives the call
    opened = isinstance(truth, (str, os.PathLike)) or path is not None
    if path is None and isinstance(truth, (str, os.PathLike)):
        path = truth
    # a path is opened backed (CSC read whole): X is streamed by vcjax.data.group_stats
    adata = vdata.open_h5ad(truth) if isinstance(truth, (str, os.PathLike)) else truth
    for name, col in (("key", spec.key), ("covariate", spec.covariate)):
        if col is not None and col not in adata.obs.columns:
            raise VcjaxInputError(
                f"{name} {col!r} not in obs; available columns: {preview(adata.obs.columns, 20)}"
            )
    labels = vdata.obs_labels(adata, spec.key, "condition")
    cov_labels = None
    if spec.covariate is not None:
        cov_labels = vdata.obs_labels(adata, spec.covariate, "covariate")
    if spec.split is None:
        split_labels = labels if cov_labels is None else cov_labels + "\x1f" + labels
        split = vdata.split_halves(split_labels, seed=spec.split_seed)
    else:
        split = spec.split
    stats = vdata.group_stats(
        adata,
        spec.key,
        control=spec.control,
        layer=spec.layer,
        normalize=spec.normalize,
        covariate=spec.covariate,
        split=split,
        drop_small=spec.drop_small,
        progress=progress,
    )
    half = (np.asarray(adata.obs[split]) if isinstance(split, str) else np.asarray(split)).astype(
        np.int8
    )
    path = _source_path(adata if path is None else path, adata)
    parts = (
        [(None, stats)]
        if spec.covariate is None
        else [
            (v, vdata.SplitStats(stats.half1.for_covariate(v), stats.half2.for_covariate(v)))
            for v in dict.fromkeys(stats.half1.covariate)
        ]
    )
    strata = []
    for value, part in parts:
        in_stratum = None if value is None else cov_labels == value
        strata.append(_stratum(spec, part, value, labels, in_stratum, half, adata, path))
    source = {"path": path, "n_obs": int(adata.n_obs), "n_vars": int(adata.n_vars)}
    norm = stats.half1.normalization
    scale = stats.half1.scale  # sampled by group_stats on its pass
    if scale is None:
        X = adata.X if spec.layer is None else adata.layers[spec.layer]
        scale = vdata.scale_evidence(X, normalization=norm)
    if not keep_sumsq:  # nothing else holds the sums of squares: they are freed here
        del stats, parts, part
        strata = [_release_sumsq(s) for s in strata]
    if norm == "log1p_cp10k" and spec.normalize == "auto":
        warnings.warn(
            f"the truth cells look like raw counts ({scale.summary()}): normalised to "
            "log1p(1e4·x/total) per cell; pass normalize=None to score them as given",
            UserWarning,
            stacklevel=3,
        )
    if opened and getattr(adata, "isbacked", False):
        adata.file.close()
    return Screen(spec, tuple(strata), norm, source, scale, scoring_only=not keep_sumsq)


def _release_sumsq(stratum: Stratum) -> Stratum:
    """``stratum`` whose split statistics keep their sums of squares as NaN views only."""

    def lean(h: vdata.GroupStats) -> vdata.GroupStats:
        return dataclasses.replace(h, sumsq=np.broadcast_to(np.float64(np.nan), h.sumsq.shape))

    stats = vdata.SplitStats(lean(stratum.stats.half1), lean(stratum.stats.half2))
    return dataclasses.replace(stratum, stats=stats)


def _stratum(
    spec, split: vdata.SplitStats, covariate, labels, in_stratum, half, adata, path
) -> Stratum:
    groups = tuple(split.half1.names)
    if spec.control not in groups:
        where = f" for covariate {covariate!r}" if covariate is not None else ""
        raise VcjaxInputError(f"control label {spec.control!r} not found{where}")
    perts = tuple(g for g in groups if g != spec.control)
    if not perts:
        raise VcjaxInputError("no perturbation besides the control group")
    G = len(split.half1.genes)
    baselines = spec.baselines
    if "interpolated_duplicate" in baselines and spec.weights_kind != "deg":
        log.info("interpolated_duplicate needs DEG p-values (weights='deg'); skipped")
        baselines = tuple(b for b in baselines if b != "interpolated_duplicate")
    plan = _plan(spec, groups, spec.control, perts, baselines, "host")
    h1, h2 = split.half1, split.half2
    sums = Sums(h1.n, h2.n, h1.sum[None], h1.sumsq[None], h2.sum[None], h2.sumsq[None])
    derived = derive(sums, plan, _fixed(spec, perts, G), xp=np)
    notes = {}
    if "additive" in baselines:
        notes["additive"] = tuple(additive_index(perts)[1])
    code_of = {g: i for i, g in enumerate(groups)}
    codes = np.fromiter((code_of.get(x, -1) for x in labels), dtype=np.int32, count=len(labels))
    if in_stratum is not None:
        codes[~in_stratum] = -1
    cells = Cells(adata, path, codes, half, spec.layer, h1.normalization)
    return Stratum(covariate, perts, tuple(h1.genes), spec.control, split, derived, notes, cells)
