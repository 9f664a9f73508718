"""Prepare once, derive once, score many: the truth side and the evaluation pipeline.

* :func:`prepare` streams a screen once into an immutable :class:`Screen` (per covariate
  value a :class:`Stratum`): split sufficient statistics and everything :func:`derive`
  makes of them — truth, Δ reference, ``u_NTC``, ``u_ALL``, DEG arrays, baselines;
* :func:`align` aligns a model's prediction with it (:class:`Prediction`);
* :func:`evaluate` scores a prediction and the baselines into one tidy table, calibrated
  (:func:`calibrate`), with cell-bootstrap intervals and paired comparisons
  (:func:`add_intervals`);
* :data:`PROTOCOLS`: a peer's conventions (``protocol="cell-eval"``) under which
  :func:`evaluate` and :func:`sweep` reproduce that peer's numbers;
* :func:`calibration_card`, :func:`summarize`, :func:`summary_intervals`,
  :func:`per_gene_data` summarise it; :func:`undefined_summary` says why most rows are NaN.
"""

from vcjax.metrics import gate
from vcjax.pipeline._align import CHECK_SCALE, Prediction, align, align_stratum, read_prediction
from vcjax.pipeline._baselines import (
    BASELINE_ROLES,
    NEGATIVES,
    POSITIVE,
    additive_index,
    interpolated_duplicate,
    null_derangement,
)
from vcjax.pipeline._bootstrap import (
    Resampler,
    add_intervals,
    multiplicity_weights,
    resampled_group_moments,
    resampler,
    stratum_key,
    stratum_samples,
    summary_intervals,
    sums_scorer,
)
from vcjax.pipeline._calibrate import (
    calibrate,
    drf_table,
    dynamic_range_fraction,
    summarize,
    wide,
)
from vcjax.pipeline._derive import DEG, Derived, Fixed, Plan, Sums, deg_arrays, derive
from vcjax.pipeline._evaluate import as_screen, calibration_card, evaluate, score_screen
from vcjax.pipeline._known import known_models
from vcjax.pipeline._per_gene import PER_GENE_SOURCES, per_gene_data
from vcjax.pipeline._protocol import (
    PROTOCOLS,
    Protocol,
    ProtocolScores,
    get_protocol,
    register_protocol,
)
from vcjax.pipeline._scorer import Scorer, scorer
from vcjax.pipeline._scoring import resolve_metrics, score_sources
from vcjax.pipeline._screen import FORMAT_VERSION, Cells, Screen, Stratum, prepare, prepare_spec
from vcjax.pipeline._spec import (
    DEFAULT_BASELINES,
    ROUGH_N_BOOT,
    UALL_REFERENCES,
    BootSpec,
    ScoreSpec,
    TruthSpec,
)
from vcjax.pipeline._sweep import TIE_TOL, SweepResult, sweep
from vcjax.pipeline._tidy import undefined_summary

__all__ = [
    "CHECK_SCALE",
    "PROTOCOLS",
    "Protocol",
    "ProtocolScores",
    "get_protocol",
    "register_protocol",
    "read_prediction",
    "Scorer",
    "scorer",
    "BASELINE_ROLES",
    "DEFAULT_BASELINES",
    "ROUGH_N_BOOT",
    "DEG",
    "FORMAT_VERSION",
    "NEGATIVES",
    "PER_GENE_SOURCES",
    "POSITIVE",
    "UALL_REFERENCES",
    "BootSpec",
    "Cells",
    "Derived",
    "Fixed",
    "Plan",
    "Prediction",
    "Resampler",
    "ScoreSpec",
    "Screen",
    "Stratum",
    "Sums",
    "SweepResult",
    "TIE_TOL",
    "TruthSpec",
    "add_intervals",
    "additive_index",
    "align",
    "align_stratum",
    "as_screen",
    "calibrate",
    "calibration_card",
    "deg_arrays",
    "derive",
    "drf_table",
    "dynamic_range_fraction",
    "evaluate",
    "gate",
    "interpolated_duplicate",
    "multiplicity_weights",
    "null_derangement",
    "per_gene_data",
    "prepare",
    "prepare_spec",
    "resampled_group_moments",
    "resampler",
    "resolve_metrics",
    "score_screen",
    "score_sources",
    "stratum_key",
    "stratum_samples",
    "summarize",
    "summary_intervals",
    "sums_scorer",
    "sweep",
    "known_models",
    "undefined_summary",
    "wide",
]
