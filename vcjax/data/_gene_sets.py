"""Gene sets (pathways): GMT reading and boolean gene masks for the metric kernels.

A GMT file (the MSigDB / GSEA "gene matrix transposed" format) has one gene set per line,
tab-separated: the set name, a description (often a URL, may be empty), then the member
genes::

    HEMOGLOBIN<TAB>example<TAB>HBG2<TAB>HBE1<TAB>HBZ<TAB>HBA1

:func:`gene_set_masks` turns sets into a ``(S, G)`` boolean mask aligned with a screen's
genes, the form the kernels' ``where=`` argument takes (:mod:`vcjax.metrics`). Genes of a
set that the data lack are tolerated and reported: ``coverage = n_present / n_genes``.

The package ships a small example, :func:`example_gmt_path` (``vcjax/data/example_pathways.gmt``):
a handful of hand-curated sets of real HGNC symbols that overlap the 500 genes of the
Norman19 PerturBench subset, each with at least one gene that subset lacks. It is a test
and demo file, not a curated pathway database (use MSigDB, Reactome or GO for real work).

References:
  GMT format: https://docs.gsea-msigdb.org/#GSEA/Data_Formats/ (Broad Institute).
"""

from __future__ import annotations

import dataclasses
import gzip
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from vcjax._errors import VcjaxInputError

__all__ = [
    "GeneSetMasks",
    "read_gmt",
    "write_gmt",
    "load_gene_sets",
    "gene_set_masks",
    "example_gmt_path",
]

GeneSets = Mapping[str, Sequence[str]]


def example_gmt_path() -> Path:
    """Path of the small example GMT shipped with vcjax (``vcjax/data/example_pathways.gmt``)."""
    return Path(__file__).resolve().parent / "example_pathways.gmt"


def _open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def read_gmt(path: str | os.PathLike) -> dict[str, list[str]]:
    """Read a GMT file into ``{set name: [genes]}`` (file order kept).

    Rules: blank lines and lines starting with ``#`` are skipped; fields are split on tabs
    and stripped; empty gene fields (trailing tabs) are ignored; a gene repeated within a
    set is kept once; a set with no genes is kept (its coverage is NaN). A ``.gz`` file is
    decompressed.

    Args:
      path: the ``.gmt`` (or ``.gmt.gz``) file.

    Returns:
      dict set name → list of unique gene symbols.

    Raises:
      VcjaxInputError: missing file, a line without a name, or a set name used twice (the
        message gives the line number).
    """
    path = Path(path)
    if not path.exists():
        raise VcjaxInputError(f"GMT file not found: {path}")
    out: dict[str, list[str]] = {}
    with _open_text(path) as fh:
        for lineno, line in enumerate(fh, start=1):
            line = line.rstrip("\r\n")
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            fields = [f.strip() for f in line.split("\t")]
            name = fields[0]
            if not name:
                raise VcjaxInputError(f"{path}:{lineno}: gene set without a name")
            if len(fields) < 2:
                raise VcjaxInputError(
                    f"{path}:{lineno}: expected 'name<TAB>description<TAB>genes...', got one field"
                    " (is the file tab-separated?)"
                )
            if name in out:
                raise VcjaxInputError(f"{path}:{lineno}: gene set {name!r} defined twice")
            out[name] = list(dict.fromkeys(g for g in fields[2:] if g))
    if not out:
        raise VcjaxInputError(f"no gene set in GMT file {path}")
    return out


def write_gmt(
    gene_sets: GeneSets,
    path: str | os.PathLike,
    *,
    descriptions: Mapping[str, str] | None = None,
) -> Path:
    """Write ``{name: genes}`` as a GMT file (description ``"NA"`` unless given)."""
    path = Path(path)
    descriptions = descriptions or {}
    with open(path, "w", encoding="utf-8") as fh:
        for name, genes in gene_sets.items():
            if "\t" in name or "\n" in name:
                raise VcjaxInputError(f"gene set name {name!r} contains a tab or newline")
            fh.write("\t".join([name, descriptions.get(name, "NA"), *map(str, genes)]) + "\n")
    return path


def load_gene_sets(gene_sets: str | os.PathLike | GeneSets) -> dict[str, list[str]]:
    """Gene sets from a GMT path, or a mapping ``name → genes`` (validated, copied).

    ``"example"`` loads the shipped example (:func:`example_gmt_path`).
    """
    if isinstance(gene_sets, str) and gene_sets == "example":
        return read_gmt(example_gmt_path())
    if isinstance(gene_sets, (str, os.PathLike)):
        return read_gmt(gene_sets)
    if isinstance(gene_sets, Mapping):
        out: dict[str, list[str]] = {}
        for name, genes in gene_sets.items():
            if isinstance(genes, str):
                raise VcjaxInputError(
                    f"gene set {name!r}: expected a list of genes, got the string {genes!r}"
                )
            out[str(name)] = list(dict.fromkeys(map(str, genes)))
        if not out:
            raise VcjaxInputError("no gene set given")
        return out
    raise TypeError("gene_sets must be a GMT path, 'example', or a mapping name → genes")


@dataclasses.dataclass(frozen=True)
class GeneSetMasks:
    """Gene sets aligned with a screen's genes.

    Attributes:
      names: set names ``(S,)``.
      masks: ``(S, G)`` boolean, True where the screen's gene belongs to the set.
      n_genes: ``(S,)`` set sizes (unique genes, present or not).
      n_present: ``(S,)`` set genes found among the screen's genes.
      coverage: ``(S,)`` ``n_present / n_genes`` (NaN for an empty set).
      missing: set name → genes of the set absent from the screen.
    """

    names: tuple[str, ...]
    masks: np.ndarray
    n_genes: np.ndarray
    n_present: np.ndarray
    coverage: np.ndarray
    missing: dict[str, list[str]]


def gene_set_masks(
    gene_sets: str | os.PathLike | GeneSets,
    genes: Iterable[str],
    *,
    case_sensitive: bool = True,
) -> GeneSetMasks:
    """Boolean ``(S, G)`` masks of gene sets over ``genes``, with coverage.

    Args:
      gene_sets: a GMT path, ``"example"``, or a mapping ``name → genes``.
      genes: the screen's gene names (``var_names``), in the order of the ``(P, G)`` arrays.
      case_sensitive: match symbols exactly (default; HGNC symbols are upper case, mouse
        symbols are not). ``False`` compares upper-cased symbols.

    Returns:
      :class:`GeneSetMasks`. Sets with no gene present have an all-False mask (the kernels
      then return NaN) and coverage 0.
    """
    sets = load_gene_sets(gene_sets)
    genes = [str(g) for g in genes]
    norm = (lambda s: s) if case_sensitive else (lambda s: s.upper())  # noqa: E731
    pos: dict[str, int] = {}
    for i, g in enumerate(genes):
        pos.setdefault(norm(g), i)
    names = tuple(sets)
    masks = np.zeros((len(names), len(genes)), dtype=bool)
    n_genes = np.zeros(len(names), dtype=np.int64)
    missing: dict[str, list[str]] = {}
    for s, name in enumerate(names):
        members = list(dict.fromkeys(norm(g) for g in sets[name]))
        n_genes[s] = len(members)
        idx = [pos[g] for g in members if g in pos]
        masks[s, idx] = True
        missing[name] = [g for g in sets[name] if norm(g) not in pos]
    n_present = masks.sum(axis=1).astype(np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        coverage = np.where(n_genes > 0, n_present / np.maximum(n_genes, 1), np.nan)
    return GeneSetMasks(names, masks, n_genes, n_present, coverage, missing)
