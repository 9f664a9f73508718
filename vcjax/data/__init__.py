"""AnnData in, validated per-group sufficient statistics out: the data edge of vcjax.

:func:`group_stats` streams a dense, sparse or backed AnnData once and returns per-condition
cell counts, sums and sums of squares (:class:`GroupStats`, or :class:`SplitStats` for the
two halves of the technical-duplicate split, :func:`split_halves`). :func:`read_h5ad` reads
a file with one-line errors and :func:`open_h5ad` opens one for a streaming pass;
:func:`scale_evidence` and :func:`compare_scales` tell on which scale values are;
:func:`read_gmt` and :func:`gene_set_masks` read gene sets; :func:`grouped_sums` sums an
in-memory matrix's rows by group.
"""

from vcjax._errors import VcjaxInputError
from vcjax.data._gene_sets import (
    GeneSetMasks,
    example_gmt_path,
    gene_set_masks,
    load_gene_sets,
    read_gmt,
    write_gmt,
)
from vcjax.data._group_stats import group_stats, obs_labels, split_halves
from vcjax.data._read import (
    TARGET_SUM,
    grouped_sums,
    iter_chunks,
    normalize_chunk,
    open_h5ad,
    read_h5ad,
)
from vcjax.data._scale import ScaleEvidence, compare_scales, scale_evidence
from vcjax.data._stats import (
    REFERENCES,
    GroupStats,
    SplitStats,
    checked_reference,
    moments,
    reference_from_sums,
    reference_vector,
)

__all__ = [
    "REFERENCES",
    "TARGET_SUM",
    "GeneSetMasks",
    "GroupStats",
    "ScaleEvidence",
    "SplitStats",
    "VcjaxInputError",
    "checked_reference",
    "compare_scales",
    "example_gmt_path",
    "gene_set_masks",
    "group_stats",
    "grouped_sums",
    "iter_chunks",
    "load_gene_sets",
    "moments",
    "normalize_chunk",
    "obs_labels",
    "open_h5ad",
    "read_gmt",
    "read_h5ad",
    "reference_from_sums",
    "reference_vector",
    "scale_evidence",
    "split_halves",
    "write_gmt",
]
