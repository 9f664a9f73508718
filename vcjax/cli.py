"""The ``vcjax`` command: score predictions, sweep many models, a data set's calibration card,
reports, a demo.

::

    vcjax score --truth T.h5ad --pred P.h5ad --key condition --control control \\
                --out results.parquet [--report report.html] [--n-boot 1000]
    vcjax baselines --truth T.h5ad --key condition --control control \\
                    --out baselines.csv --card card.csv
    vcjax prepare --truth T.h5ad --key condition --control control --out truth.vcjax
    vcjax sweep --truth truth.vcjax --preds 'runs/*/pred.h5ad' --n-boot 1000 \
                --out sweep.parquet --leaderboard leaderboard.csv --report sweep.html
    vcjax report results.parquet --out report.html
    vcjax demo [--h5ad screen.h5ad --key condition --control control]

Every output is written atomically (a temporary file in the same folder, then
:func:`os.replace`), so a failed run writes nothing and never overwrites a good file.
Bad input ends with one line ``error: <what, naming the culprit>`` on stderr and exit
status 2, before anything is written (output folders are checked before any computation).
A warning from the library (a Python ``UserWarning``) or from the command prints as one line
``warning: <what>`` on stderr after the run, even with ``--quiet``; messages name the
command's options (``--drop-small``), not the library's arguments (``drop_small=True``).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import enum
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

__all__ = ["app", "main"]

app = typer.Typer(
    name="vcjax",
    help="Calibrated metrics for perturbation-response (virtual-cell) models, in JAX.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

EXIT_INPUT = 2  # bad input or options (also what typer uses for usage errors)
EXIT_INTERNAL = 1


class Reference(str, enum.Enum):
    perturbed = "perturbed"
    perturbed_no_control = "perturbed_no_control"
    perturbed_cells = "perturbed_cells"
    control = "control"


class Device(str, enum.Enum):
    cpu = "cpu"
    gpu = "gpu"


class Normalize(str, enum.Enum):
    auto = "auto"
    counts = "counts"
    none = "none"


class DegMethod(str, enum.Enum):
    overestim_var = "t-test_overestim_var"
    welch = "t-test"


class CiMethod(str, enum.Enum):
    percentile = "percentile"
    bca = "bca"


class CheckScale(str, enum.Enum):
    error = "error"
    warn = "warn"
    off = "off"


_NORMALIZE = {"auto": "auto", "counts": "log1p_cp10k", "none": None}
_PRED_TABLES = (".csv", ".csv.gz", ".tsv", ".tsv.gz", ".parquet", ".pq")


# ------------------------------------------------------------------------------ plumbing


def _stderr():
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


def _stdout():
    from rich.console import Console

    # a pipe or file gets whole rows (rich would assume 80 columns)
    return Console(highlight=False, width=None if sys.stdout.isatty() else 120)


#: the library's argument spellings in its messages → the command's options, applied to every
#: ``error:`` and ``warning:`` line (the library's messages stay in API terms)
_API_TO_CLI: tuple[tuple[str, str | Callable[[re.Match], str]], ...] = (
    (r"\bprotocol='([\w-]+)'", r"--protocol \1"),
    (r"\bfixes (\w+)= ", lambda m: f"fixes --{m.group(1).replace('_', '-')} "),
    (r"\bleave (\w+) at its default\b", lambda m: f"leave out --{m.group(1).replace('_', '-')}"),
    (r"\bpass drop_small=True\b", "pass --drop-small"),
    (r"\bdrop_small=True\b", "--drop-small"),
    (r"\bfewer than min_cells=(\d+) cells\b", r"fewer than \1 cells"),
    (r"\bmin_cells=(\d+)", r"\1"),
    (r"\bnormalize=None or 'log1p_cp10k'", "--normalize none or --normalize counts"),
    (r"\bnormalize='log1p_cp10k'", "--normalize counts"),
    (r"\bnormalize=None\b", "--normalize none"),
    (r"\bnormalize='auto'", "--normalize auto"),
    (r"\bpass layer=(?=\W|$)", "pass --layer LAYER (truth) or --pred-layer LAYER (prediction)"),
    (r"\bcovariate=COLUMN\b", "--covariate COLUMN"),
    (r"\bpass covariate=(?=\W|$)", "pass --covariate COLUMN"),
    (r"\bdeg_method='([\w-]+)'", r"--deg-method \1"),
    (r"\bci_method='(\w+)'", r"--ci-method \1"),
    (r"\bpred_layer=", "--pred-layer "),
    (r"\bn_boot=(\d+)", r"--n-boot \1"),
    (r"\bn_boot\b", "--n-boot"),
)


def _cli_terms(message: str) -> str:
    """``message`` in the command's terms (:data:`_API_TO_CLI`), on one line."""
    line = " ".join(str(message).split())  # one line, whatever the message holds
    for pattern, repl in _API_TO_CLI:
        line = re.sub(pattern, repl, line)
    return line


def _fail(message: str, code: int = EXIT_INPUT) -> NoReturn:
    typer.echo(f"error: {_cli_terms(message)}", err=True)
    raise typer.Exit(code)


class _Warnings:
    """The run's warnings: the library's ``UserWarning``\\ s and the command's own, printed
    once each as ``warning: <message>`` on stderr when the run succeeds (even with --quiet)."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.topics: set[str] = set()

    def add(self, message: str | None, *, topic: str | None = None) -> None:
        """Record ``message`` (None: nothing); ``topic`` marks what a command's own warning
        is about, so that the library's warning on the same topic is not printed twice."""
        if not message:
            return
        line = _cli_terms(message)
        if line not in self.lines:
            self.lines.append(line)
        if topic is not None:
            self.topics.add(topic)

    def add_records(self, records: Sequence[warnings.WarningMessage]) -> None:
        for r in records:
            # UserWarning itself (the library's) and vcjax's own subclasses; not NumPy's
            # RuntimeWarnings (NaN is a documented outcome), nor other libraries' subclasses
            if not issubclass(r.category, UserWarning):
                continue
            if r.category is not UserWarning and not r.category.__module__.startswith("vcjax"):
                continue
            line = _cli_terms(str(r.message))
            if "--n-boot" in line and "n_boot" in self.topics:
                continue  # the command said it already
            self.add(line)

    def print(self) -> None:
        for line in self.lines:
            typer.echo(f"warning: {line}", err=True)


@contextlib.contextmanager
def _errors() -> Iterator[_Warnings]:
    """Turn input errors into ``error: <message>`` and exit 2; anything else exits 1.

    Yields the run's :class:`_Warnings`; the library's warnings are recorded too, and all
    print after a successful run (a failed one prints only its error line).
    """
    notes = _Warnings()
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        with _errors_only():
            yield notes
    notes.add_records(records)
    notes.print()


@contextlib.contextmanager
def _errors_only() -> Iterator[None]:
    from vcjax._errors import VcjaxInputError
    from vcjax._io import OutputPathError

    try:
        yield
    except typer.Exit:
        raise
    except (VcjaxInputError, OutputPathError, FileNotFoundError, IsADirectoryError) as exc:
        _fail(str(exc) or type(exc).__name__)
    except (ValueError, KeyError) as exc:  # option values rejected by the library
        if os.environ.get("VCJAX_DEBUG"):
            raise
        if isinstance(exc, KeyError):
            _fail(f"not found: {exc.args[0] if exc.args else exc}")
        _fail(str(exc))
    except KeyboardInterrupt:
        typer.echo("interrupted; nothing written", err=True)
        raise typer.Exit(130) from None
    except Exception as exc:  # noqa: BLE001 - a bug: say so, keep it one line
        if os.environ.get("VCJAX_DEBUG"):
            raise
        _fail(
            f"internal error: {type(exc).__name__}: {exc} (set VCJAX_DEBUG=1 for the traceback)",
            EXIT_INTERNAL,
        )


class _Steps:
    """Transient rich spinners with elapsed time, one per step, on stderr; silent if quiet."""

    def __init__(self, quiet: bool) -> None:
        self.console = _stderr()
        self.show = not quiet and self.console.is_terminal

    @contextlib.contextmanager
    def __call__(self, text: str) -> Iterator[None]:
        if not self.show:
            yield
            return
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        with Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            TimeElapsedColumn(),
            console=self.console,
            transient=True,
        ) as prog:
            prog.add_task(text, total=None)
            yield


def _select_device(device: Device | None) -> None:
    """Make JAX use ``device``; must run before the first JAX computation."""
    if device is None:
        return
    import jax

    try:
        from jax._src import xla_bridge

        initialized = bool(xla_bridge.backends_are_initialized())
    except Exception:  # noqa: BLE001 - private API moved: assume initialised
        initialized = True
    if device is Device.cpu:
        if not initialized:
            jax.config.update("jax_platforms", "cpu")
        else:
            jax.config.update("jax_default_device", jax.devices("cpu")[0])
        return
    try:
        gpus = jax.devices("gpu")
    except RuntimeError:
        gpus = []
    if not gpus:
        try:
            have = sorted({d.platform for d in jax.devices()})
        except RuntimeError:
            have = []
        _fail(
            "--device gpu requested but JAX found no GPU (backends here: "
            + (", ".join(have) or "none")
            + f", jax {jax.__version__}); install a CUDA build: pip install 'vcjax[cuda]'"
        )
    jax.config.update("jax_default_device", gpus[0])


def _backend_line() -> str:
    import jax

    dev = jax.config.jax_default_device
    if dev is None:
        dev = jax.devices()[0]
    n = len(jax.devices(dev.platform))
    kind = getattr(dev, "device_kind", dev.platform)
    return f"JAX backend: {dev.platform} ({n} device{'s' if n != 1 else ''}: {kind}; jax {jax.__version__})"


def _check_outputs(*pairs: tuple[str | None, tuple[str, ...] | None]) -> None:
    from vcjax._io import TABLE_FORMATS, check_output_path

    seen = set()
    for path, exts in pairs:
        if path is None:
            continue
        check_output_path(path, extensions=exts if exts is not None else tuple(TABLE_FORMATS))
        real = os.path.realpath(path)
        if real in seen:
            _fail(f"the same output path is given twice: {path}")
        seen.add(real)


def _check_input_file(path: str, what: str) -> None:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} file not found: {path}")
    if os.path.isdir(path):
        _fail(f"{what} is a folder, not a file: {path}")
    if os.path.getsize(path) == 0:
        _fail(f"{what} file is empty (0 bytes): {path}")


def _read_truth(path: str, *, backed: bool):
    from vcjax.data import read_h5ad

    _check_input_file(path, "truth")
    return read_h5ad(path, backed=backed)  # checks the content, whatever the name


def _is_screen_file(path: str) -> bool:
    """A prepared truth (``vcjax prepare``): a ZIP archive, where an h5ad is HDF5."""
    if path.lower().endswith(".vcjax"):
        return True
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == b"PK\x03\x04"
    except OSError:
        return False


#: truth-side options of `score`/`baselines` and their defaults: a prepared truth fixes them
_TRUTH_FLAGS = {
    "--reference": "perturbed",
    "--normalize": "auto",
    "--layer": None,
    "--backed": False,
    "--drop-small": False,
    "--covariate": None,
    "--deg-method": "t-test_overestim_var",
}


def _screen(
    truth: str,
    *,
    key: str | None,
    control: str | None,
    steps,
    seed: int,
    reference: str = "perturbed",
    normalize: str = "auto",
    layer: str | None = None,
    backed: bool = False,
    drop_small: bool = False,
    covariate: str | None = None,
    deg_method: str = "t-test_overestim_var",
):
    """The prepared truth of a run: loaded from a ``.vcjax`` file, or prepared (once) from
    an ``.h5ad`` with the truth-side options."""
    from vcjax.pipeline import Screen, prepare

    _check_input_file(truth, "truth")
    flags = {
        "--reference": reference,
        "--normalize": normalize,
        "--layer": layer,
        "--backed": backed,
        "--drop-small": drop_small,
        "--covariate": covariate,
        "--deg-method": deg_method,
    }
    if _is_screen_file(truth):
        set_flags = [f for f, v in flags.items() if v != _TRUTH_FLAGS[f]]
        if set_flags:
            _fail(
                f"{', '.join(set_flags)} cannot be used with a prepared truth ({truth}): it was "
                "fixed by `vcjax prepare`"
            )
        with steps("reading the prepared truth"):
            screen = Screen.load(truth)
        for flag, given, have in (
            ("--key", key, screen.spec.key),
            ("--control", control, screen.spec.control),
        ):
            if given is not None and given != have:
                _fail(f"{flag} {given!r} differs from the prepared truth's {have!r} ({truth})")
        return screen
    if key is None or control is None:
        _fail(
            "--key and --control are required with an .h5ad truth (or give a prepared .vcjax truth)"
        )
    # a path (read here, in memory) or a backed AnnData: either way the screen records the
    # file, so that a saved screen can re-read its cells for the bootstrap
    source = _read_truth(truth, backed=True) if backed else truth
    with steps("reading the truth: statistics, DEGs and baselines"):
        return prepare(
            source,
            key=key,
            control=control,
            seed=seed,
            progress=steps.show,
            reference=reference,
            layer=layer,
            normalize=_NORMALIZE[normalize],
            drop_small=drop_small,
            covariate=covariate,
            deg_method=deg_method,
        )


def _read_pred(path: str):
    """A prediction file (:func:`vcjax.pipeline.read_prediction`): ``.h5ad`` (cells or one
    row per perturbation), or a wide table (rows: perturbations; columns: genes)."""
    from vcjax.pipeline import read_prediction

    _check_input_file(path, "prediction")
    return read_prediction(path)


def _metric_list(metrics: Sequence[str] | None) -> list[str] | str | None:
    if not metrics:
        return None
    out = [m.strip() for item in metrics for m in item.split(",") if m.strip()]
    if out == ["all"]:
        return "all"
    return out or None


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("vcjax")
    except Exception:  # noqa: BLE001
        import vcjax

        return getattr(vcjax, "__version__", "unknown")


def _table_meta(table, **extra: Any) -> dict[str, Any]:
    meta = dict(table.attrs)
    meta.update({k: v for k, v in extra.items() if v is not None})
    meta.setdefault("vcjax_version", _version())
    meta.setdefault("created", _dt.datetime.now().isoformat(timespec="seconds"))
    meta.setdefault("command", " ".join(["vcjax", *sys.argv[1:]]) if sys.argv else "vcjax")
    return meta


# ------------------------------------------------------------------------------ summaries


def _summary_table(table, *, title: str, max_rows: int = 14):
    """One screen: per metric, the median value of the main sources (+ model calibrated)."""
    import numpy as np
    from rich.table import Table

    from vcjax.metrics import label
    from vcjax.report import SOURCE_ORDER

    table = table[~table["source"].astype(str).str.startswith("model-vs-")]
    present = list(dict.fromkeys(table["source"].astype(str)))
    main = [
        s for s in ("model", "technical_duplicate", "dataset_mean", "control_mean") if s in present
    ]
    if len(main) < 2:
        main = [s for s in SOURCE_ORDER if s in present][:6]
    med = table.groupby(["metric", "source"], sort=False)["value"].median()
    cal = (
        table[table["source"] == "model"].groupby("metric", sort=False)["calibrated"].median()
        if "model" in present
        else None
    )
    t = Table(title=title, title_justify="left", header_style="bold")
    t.add_column("metric")
    if cal is not None:
        t.add_column("model\ncalibrated", justify="right", style="bold")
    short = {
        "technical_duplicate": "tech.\nduplicate",
        "dataset_mean": "dataset\nmean",
        "control_mean": "control\nmean",
    }
    for s in main:
        t.add_column(short.get(s, s.replace("_", " ")), justify="right")
    metrics = list(dict.fromkeys(table["metric"]))

    def fmt(v):
        return "—" if v is None or not np.isfinite(v) else f"{v:.4g}"

    for m in metrics[:max_rows]:
        row = [label(m)]
        if cal is not None:
            row.append(fmt(cal.get(m, np.nan)))
        row += [fmt(med.get((m, s), np.nan)) for s in main]
        t.add_row(*row)
    if len(metrics) > max_rows:
        t.caption = f"… {len(metrics) - max_rows} more metric(s) in the output"
    return t


def _card_table(card, table):
    import numpy as np
    from rich.table import Table

    from vcjax.metrics import label

    med = table.groupby(["metric", "source"], sort=False)["value"].median()
    t = Table(
        title="calibration card (medians over perturbations)",
        title_justify="left",
        header_style="bold",
    )
    for c in ("metric", "DRF", "discrimination", "tech. duplicate", "dataset mean", "control mean"):
        t.add_column(c, justify="left" if c == "metric" else "right")

    def fmt(v):
        return "—" if v is None or not np.isfinite(v) else f"{v:.3g}"

    for _, r in card.iterrows():
        m = r["metric"]
        t.add_row(
            label(m),
            fmt(r.get("drf_median")),
            fmt(r.get("discrimination")),
            fmt(med.get((m, "technical_duplicate"), np.nan)),
            fmt(med.get((m, "dataset_mean"), np.nan)),
            fmt(med.get((m, "control_mean"), np.nan)),
        )
    return t


@contextlib.contextmanager
def _quiet_warnings() -> Iterator[None]:
    """Silence NumPy's all-NaN and pandas' future warnings (NaN is a documented outcome)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.simplefilter("ignore", FutureWarning)
        yield


# ------------------------------------------------------------------------------ options

TruthOpt = Annotated[
    str,
    typer.Option(
        "--truth", "-t", help="measured screen (.h5ad, cells × genes) or a prepared truth (.vcjax)"
    ),
]
KeyOpt = Annotated[
    str | None,
    typer.Option(
        "--key", "-k", help="obs column with the condition labels (not for a .vcjax truth)"
    ),
]
ControlOpt = Annotated[
    str | None,
    typer.Option("--control", "-c", help="the control label in obs[KEY] (not for a .vcjax truth)"),
]
ReferenceOpt = Annotated[Reference, typer.Option(help="delta reference (docs/metrics.md §2)")]


def _metric_names() -> tuple[list[str], list[str]]:
    """The registry's metric names (vcjax.metrics.METRICS): the core ones, the peers'."""
    from vcjax.metrics import METRICS

    core = [m for m, spec in METRICS.items() if spec.is_core]
    return core, [m for m in METRICS if m not in core]


_CORE, _PEERS = _metric_names()
MetricsOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--metrics",
        "-m",
        help="metric names, repeated or comma-separated (default: the core ones): "
        + ", ".join(_CORE)
        + "; peers' metrics, or 'all' for those the prediction allows: "
        + ", ".join(_PEERS),
    ),
]
SeedOpt = Annotated[int, typer.Option(help="seed of the null baseline and the bootstrap")]
QuietOpt = Annotated[
    bool,
    typer.Option("--quiet", "-q", help="no progress, no summary (warnings still print, on stderr)"),
]
DeviceOpt = Annotated[Device | None, typer.Option(help="JAX platform (default: JAX's choice)")]
NormalizeOpt = Annotated[
    Normalize,
    typer.Option(
        help="auto: raw integer counts are normalised (1e4, log1p); counts: always; none: as is"
    ),
]
LayerOpt = Annotated[str | None, typer.Option(help="truth layer to read instead of X")]
BackedOpt = Annotated[
    bool, typer.Option("--backed", help="read the truth's X from disk (backed mode)")
]
DropSmallOpt = Annotated[
    bool, typer.Option("--drop-small", help="drop conditions with < 2 cells instead of failing")
]
CovariateOpt = Annotated[
    str | None,
    typer.Option(
        "--covariate",
        help="obs column (e.g. cell_type): statistics, DEGs, baselines and scores within each "
        "of its values, one row per (value, perturbation) (not for a .vcjax truth)",
    ),
]
DegMethodOpt = Annotated[
    DegMethod,
    typer.Option(
        "--deg-method",
        help="the DEG test of each perturbation vs the other perturbed cells (docs/metrics.md "
        "§3): the paper's conservative t-test_overestim_var, or Welch's t-test",
    ),
]
CheckScaleOpt = Annotated[
    CheckScale,
    typer.Option(
        "--check-scale",
        help="a prediction on another scale than the truth (raw counts, linear or centred "
        "vs log1p), judged from its values: an error (default), a warning, or not checked",
    ),
]


def _protocol_names() -> list[str]:
    from vcjax.pipeline import PROTOCOLS

    return list(PROTOCOLS)


ProtocolOpt = Annotated[
    str | None,
    typer.Option(
        "--protocol",
        help="whose conventions to score under (docs/metrics.md §13): "
        + ", ".join(_protocol_names())
        + "; default dbd (vcjax's calibrated pipeline); cell-eval: cell-eval 0.8.2's "
        "per-perturbation metrics under its names, from the truth's cells and predicted cells "
        "that include control cells (no baselines, intervals or truth-side options)",
    ),
]
_INTERVALS = (
    "intervals target the value this experiment would give on average: the resamples are "
    "centred on the bootstrap's bias estimate, and each interval is clipped to its "
    "metric's range (a correlation in [-1, 1], an error >= 0, an R² <= 1) and contains its "
    "estimate (docs/metrics.md §11)"
)


# ------------------------------------------------------------------------------ commands


@app.command()
def score(
    truth: TruthOpt,
    out: Annotated[
        str, typer.Option("--out", "-o", help="results table: .csv, .tsv, .parquet (.csv.gz)")
    ],
    pred: Annotated[
        str,
        typer.Option(
            "--pred",
            "-p",
            help="predictions: .h5ad (cells or one row per "
            "perturbation) or a table .csv/.tsv/.parquet (rows: perturbations)",
        ),
    ],
    key: KeyOpt = None,
    control: ControlOpt = None,
    reference: ReferenceOpt = Reference.perturbed,
    metrics: MetricsOpt = None,
    n_boot: Annotated[
        int,
        typer.Option(
            "--n-boot",
            help="cell-bootstrap resamples for intervals (0: none; under 100 the interval ends "
            f"are rough, 1000 for reporting); {_INTERVALS}",
        ),
    ] = 0,
    ci: Annotated[float, typer.Option(help=f"interval level; {_INTERVALS}")] = 0.95,
    ci_method: Annotated[
        CiMethod,
        typer.Option(
            "--ci-method",
            help="percentile: the resamples' quantiles; bca: bias-corrected and accelerated "
            f"(Efron 1987); either way {_INTERVALS}",
        ),
    ] = CiMethod.percentile,
    seed: SeedOpt = 0,
    report: Annotated[
        str | None, typer.Option(help="also write an HTML report (+ per-gene side-car)")
    ] = None,
    quiet: QuietOpt = False,
    device: DeviceOpt = None,
    normalize: NormalizeOpt = Normalize.auto,
    layer: LayerOpt = None,
    pred_layer: Annotated[
        str | None, typer.Option(help="prediction layer to read instead of X (an .h5ad --pred)")
    ] = None,
    backed: BackedOpt = False,
    drop_small: DropSmallOpt = False,
    covariate: CovariateOpt = None,
    deg_method: DegMethodOpt = DegMethod.overestim_var,
    gene_sets: Annotated[
        str | None,
        typer.Option(
            "--gene-sets",
            help="GMT file (or 'example') for per-pathway confidence, written to "
            "<out>.pathways.<ext> and shown in the report",
        ),
    ] = None,
    check_scale: CheckScaleOpt = CheckScale.error,
    pred_var: Annotated[
        str | None,
        typer.Option(
            "--pred-var",
            help="the model's predictive variance, laid out like --pred: scores its "
            "uncertainty (coverage, NLL, CRPS) into <out>.uncertainty.<ext>",
        ),
    ] = None,
    protocol: ProtocolOpt = None,
) -> None:
    """Score a model's predictions against the calibration baselines: the evaluate table.

    The truth is read and prepared once (or loaded from `vcjax prepare`'s .vcjax file);
    the table, the pathway and uncertainty side tables and the report all use it. With
    --protocol cell-eval: cell-eval 0.8.2's per-perturbation metrics instead.
    """
    with _errors() as notes:
        if _protocol(protocol) is not None:
            _check_outputs((out, None))
            _protocol_cli_flags(
                protocol,
                {"--report": report, "--gene-sets": gene_sets, "--pred-var": pred_var},
                {"--backed": backed},
            )
            _select_device(device)
            steps = _Steps(quiet)
            from vcjax.pipeline import evaluate

            with steps(f"scoring under --protocol {protocol}"):
                table = evaluate(
                    _protocol_truth(truth, protocol),
                    _read_pred(pred),
                    key=key,
                    control=control,
                    protocol=protocol,
                    metrics=_metric_list(metrics),
                    layer=layer,
                    pred_layer=pred_layer,
                    reference=reference.value,
                    normalize=_NORMALIZE[normalize.value],
                    drop_small=drop_small,
                    covariate=covariate,
                    deg_method=deg_method.value,
                    n_boot=n_boot,
                    ci_method=ci_method.value,
                    check_scale=CheckScale(check_scale).value,
                )
            meta = _table_meta(
                table, key=key, control=control, truth=os.path.abspath(truth),
                pred=os.path.abspath(pred),
            )  # fmt: skip
            table.attrs.update({k: v for k, v in meta.items() if k != "command"})
            from vcjax._io import Staged, save_table

            with steps("writing"), Staged() as staged:
                save_table(table, out, meta=meta, staged=staged)
                staged.commit()
            if not quiet:
                n = table.loc[table["perturbation"] != "(all)", "perturbation"].nunique()
                title = f"--protocol {protocol}: median over {n} perturbations; (all): the whole data set's value"
                _stdout().print(_protocol_summary(table, title=title))
                steps.console.print(_backend_line())
                steps.console.print(f"wrote {out}")
            return
        _check_outputs((out, None), (report, (".html", ".htm")))
        if gene_sets is not None and gene_sets != "example":
            _check_input_file(gene_sets, "gene-set file")
        if pred_var is not None:
            _check_input_file(pred_var, "prediction-variance file")
        if not 0 < ci < 1:
            _fail(f"--ci must be in (0, 1), got {ci}")
        if n_boot < 0:
            _fail(f"--n-boot must be >= 0, got {n_boot}")
        _check_pred_layer(pred_layer, [pred])
        _rough_boot(n_boot, notes)
        _select_device(device)
        steps = _Steps(quiet)
        screen = _screen(
            truth,
            key=key,
            control=control,
            steps=steps,
            seed=seed,
            reference=reference.value,
            normalize=normalize.value,
            layer=layer,
            backed=backed,
            drop_small=drop_small,
            covariate=covariate,
            deg_method=deg_method.value,
        )
        from vcjax.pipeline import align, evaluate, undefined_summary
        from vcjax.uncertainty import confidence

        with steps("reading the prediction"):
            prediction = align(
                _read_pred(pred),
                screen,
                layer=pred_layer,
                check_scale=CheckScale(check_scale).value,
            )
        with steps("scoring" + (", bootstrap" if n_boot else "")):
            table = evaluate(
                screen,
                prediction,
                metrics=_metric_list(metrics),
                seed=seed,
                n_boot=n_boot,
                ci=ci,
                ci_method=ci_method.value,
                progress=steps.show,
            )
        notes.add(undefined_summary(table, deg_method=screen.spec.deg_method))
        extra = {}
        if gene_sets is not None:
            with steps("per-pathway confidence"):
                extra["pathways"] = confidence(
                    screen, prediction, level="pathway", gene_sets=gene_sets, seed=seed
                )
        if pred_var is not None:
            with steps("scoring the model's uncertainty"):
                extra["uncertainty"] = confidence(
                    screen,
                    prediction,
                    level="perturbation",
                    pred_var=_read_pred(pred_var),
                    n_boot=n_boot,
                    ci=ci,
                    seed=seed,
                )
        meta = _table_meta(
            table,
            key=screen.spec.key,
            control=screen.spec.control,
            truth=os.path.abspath(truth),
            pred=os.path.abspath(pred),
            reference=screen.spec.reference_name,
            seed=seed,
            n_boot=n_boot,
            ci=ci if n_boot else None,
            ci_method=ci_method.value if n_boot else None,
        )
        table.attrs.update({k: v for k, v in meta.items() if k != "command"})
        _write_outputs(
            table,
            out,
            report=report,
            meta=meta,
            steps=steps,
            screen=screen,
            prediction=prediction,
            extra=extra,
        )
        if not quiet:
            n = table["perturbation"].nunique()
            _stdout().print(_summary_table(table, title=f"median over {n} perturbations"))
            steps.console.print(_backend_line())
            steps.console.print(f"wrote {out}" + (f", {report}" if report else ""))


def _protocol(name: str | None):
    """The non-default protocol called ``name``, or None (``dbd``); unknown: an error."""
    from vcjax.pipeline import get_protocol

    p = get_protocol(name)
    return None if p.is_default else p


def _protocol_cli_flags(name: str, given: dict[str, Any], switches: dict[str, bool]) -> None:
    """The command-only options a protocol leaves no room for: an error naming the first."""
    for flag, value in [*given.items(), *switches.items()]:
        if value not in (None, False):
            _fail(f"--protocol {name} does not take {flag} (DbD-pipeline output); leave out {flag}")


def _protocol_truth(truth: str, name: str) -> str:
    _check_input_file(truth, "truth")
    if _is_screen_file(truth):
        _fail(
            f"--protocol {name} needs the truth's cells (.h5ad), not a prepared truth ({truth}); "
            "`vcjax prepare` stores DbD's half-split statistics"
        )
    return truth


def _protocol_summary(table, *, title: str, max_rows: int = 40):
    """Per metric, the model's median over perturbations; a whole-data-set row (``(all)``:
    a dataset-level metric, or a peer's aggregate with its calibrated score) in its place."""
    import numpy as np
    from rich.table import Table

    from vcjax.pipeline._tidy import ALL

    per = table[table["perturbation"] != ALL]
    whole = table[table["perturbation"] == ALL].set_index("metric")
    med = per.groupby("metric", sort=False)["value"].median()
    names = list(dict.fromkeys([*med.index, *whole.index]))
    has_cal = bool(np.isfinite(whole["calibrated"].to_numpy(float)).any())
    t = Table(title=title, title_justify="left", header_style="bold")
    t.add_column("metric")
    t.add_column("model", justify="right", style="bold")
    if has_cal:
        t.add_column("calibrated (baseline 0, anchor 1)", justify="right")

    def fmt(v) -> str:
        return "—" if not np.isfinite(v) else f"{v:.4g}"

    for m in names[:max_rows]:
        if m in whole.index:
            row = [f"{m} (all)" if m in med.index else m, fmt(float(whole.loc[m, "value"]))]
            cal = float(whole.loc[m, "calibrated"])
        else:
            row, cal = [m, fmt(float(med[m]))], np.nan
        t.add_row(*row, *([fmt(cal) if np.isfinite(cal) else ""] if has_cal else []))
    if len(names) > max_rows:
        t.caption = f"… {len(names) - max_rows} more metric(s) in the output"
    return t


def _is_table(path: str) -> bool:
    return path.lower().endswith(_PRED_TABLES)


def _check_pred_layer(pred_layer: str | None, paths: Sequence[str]) -> None:
    """``--pred-layer`` names a layer of an .h5ad prediction; a table has none."""
    if pred_layer is None:
        return
    tables = [p for p in paths if _is_table(p)]
    if tables:
        _fail(
            f"--pred-layer {pred_layer!r} needs an .h5ad prediction, but {tables[0]} is a table "
            "(its values are used as they are); leave out --pred-layer"
        )


def _rough_boot(n_boot: int, notes: _Warnings) -> None:
    from vcjax.pipeline import ROUGH_N_BOOT

    if 0 < n_boot < ROUGH_N_BOOT:
        notes.add(
            f"--n-boot {n_boot}: intervals from fewer than {ROUGH_N_BOOT} resamples are rough "
            "(their ends move from seed to seed); use 1000 for reporting",
            topic="n_boot",
        )


def _side_path(out: str, tag: str) -> str:
    """``results.csv`` → ``results.<tag>.csv`` (a ``.gz`` suffix is kept)."""
    path = Path(out)
    n = 2 if path.suffix == ".gz" and len(path.suffixes) >= 2 else 1
    suffix = "".join(path.suffixes[-n:])
    return str(path.with_name(path.name[: -len(suffix)] + f".{tag}{suffix}"))


def _write_outputs(
    table,
    out: str,
    *,
    report: str | None,
    meta: dict,
    steps: _Steps,
    screen,
    prediction=None,
    extra: dict | None = None,
    others: dict | None = None,
    title: str = "vcjax evaluation report",
) -> None:
    """Results table (+ side tables, per-gene side-car and HTML report), all-or-nothing.

    ``extra`` maps a tag to a side table written at ``<out>.<tag>.<ext>``; ``others`` maps a
    path to a ``(table, meta)`` written there.
    """
    extra = extra or {}
    from vcjax import report as R
    from vcjax._io import Staged, save_table, write_npz
    from vcjax.pipeline import per_gene_data

    html = genes = None
    if report is not None:
        with steps("per-gene data for the report"):
            genes = per_gene_data(screen, prediction)
        with steps("rendering the report"):
            html = R.build_report(
                table, per_gene=genes, pathways=extra.get("pathways"), title=title
            )
    with steps("writing"), Staged() as staged:
        save_table(table, out, meta=meta, staged=staged)
        for path, (df, df_meta) in (others or {}).items():
            save_table(df, path, meta=df_meta, staged=staged)
        for tag, side in extra.items():
            side = side.copy()
            side.attrs = {}
            save_table(side, _side_path(out, tag), meta=meta, staged=staged)
        if genes is not None:
            staged.add(R.sidecar_path(out), lambda p: write_npz(p, genes))
        if html is not None:
            staged.add(report, lambda p: p.write_text(html, encoding="utf-8"))
        staged.commit()


@app.command()
def baselines(
    truth: TruthOpt,
    out: Annotated[
        str,
        typer.Option(
            "--out", "-o", help="every baseline's per-perturbation scores: .csv, .tsv, .parquet"
        ),
    ],
    key: KeyOpt = None,
    control: ControlOpt = None,
    card: Annotated[
        str | None, typer.Option(help="also write the per-metric calibration card (.csv/.parquet)")
    ] = None,
    reference: ReferenceOpt = Reference.perturbed,
    metrics: MetricsOpt = None,
    seed: SeedOpt = 0,
    report: Annotated[str | None, typer.Option(help="also write an HTML report")] = None,
    quiet: QuietOpt = False,
    device: DeviceOpt = None,
    normalize: NormalizeOpt = Normalize.auto,
    layer: LayerOpt = None,
    backed: BackedOpt = False,
    drop_small: DropSmallOpt = False,
    covariate: CovariateOpt = None,
    deg_method: DegMethodOpt = DegMethod.overestim_var,
) -> None:
    """A data set's calibration card: every baseline scored, no model needed.

    --out gets every baseline's per-perturbation scores (the evaluate table without a
    model); --card the card itself, one row per metric (DRF, discrimination); the card also
    prints, and travels in --out's metadata.
    """
    with _errors() as notes:
        _check_outputs((out, None), (card, None), (report, (".html", ".htm")))
        _select_device(device)
        steps = _Steps(quiet)
        screen = _screen(
            truth,
            key=key,
            control=control,
            steps=steps,
            seed=seed,
            reference=reference.value,
            normalize=normalize.value,
            layer=layer,
            backed=backed,
            drop_small=drop_small,
            covariate=covariate,
            deg_method=deg_method.value,
        )
        from vcjax.pipeline import calibration_card, evaluate, undefined_summary

        with steps("scoring the baselines"):
            table = evaluate(screen, None, metrics=_metric_list(metrics), progress=steps.show)
            with _quiet_warnings():
                card_df = calibration_card(table)
        notes.add(undefined_summary(table, deg_method=screen.spec.deg_method))
        meta = _table_meta(
            table,
            key=screen.spec.key,
            control=screen.spec.control,
            truth=os.path.abspath(truth),
            reference=screen.spec.reference_name,
            seed=seed,
        )
        table.attrs.update({k: v for k, v in meta.items() if k != "command"})
        _write_outputs(
            table,
            out,
            report=report,
            meta={**meta, "calibration_card": card_df},
            steps=steps,
            screen=screen,
            others={card: (card_df, meta)} if card is not None else None,
            title="vcjax calibration card",
        )
        if not quiet:
            _stdout().print(_card_table(card_df, table))
            steps.console.print(_backend_line())
            steps.console.print("wrote " + ", ".join(p for p in (out, card, report) if p))


@app.command()
def prepare(
    truth: Annotated[
        str, typer.Option("--truth", "-t", help="measured screen (.h5ad): cells × genes")
    ],
    key: Annotated[str, typer.Option("--key", "-k", help="obs column with the condition labels")],
    control: Annotated[str, typer.Option("--control", "-c", help="the control label in obs[KEY]")],
    out: Annotated[
        str,
        typer.Option(
            "--out", "-o", help="the prepared truth (.vcjax), for --truth of score/baselines"
        ),
    ],
    reference: ReferenceOpt = Reference.perturbed,
    seed: Annotated[int, typer.Option(help="seed of the null baseline")] = 0,
    quiet: QuietOpt = False,
    normalize: NormalizeOpt = Normalize.auto,
    layer: LayerOpt = None,
    backed: BackedOpt = False,
    drop_small: DropSmallOpt = False,
    covariate: CovariateOpt = None,
    deg_method: DegMethodOpt = DegMethod.overestim_var,
) -> None:
    """Read and prepare a truth once (statistics, DEG weights, baselines) into a .vcjax file.

    `vcjax score --truth truth.vcjax` and `vcjax baselines --truth truth.vcjax` then skip the
    truth's streaming pass and t-tests; the cell bootstrap (--n-boot) re-reads the cells from
    the .h5ad the file records.
    """
    with _errors():
        _check_outputs((out, (".vcjax",)))
        steps = _Steps(quiet)
        screen = _screen(
            truth,
            key=key,
            control=control,
            steps=steps,
            seed=seed,
            reference=reference.value,
            normalize=normalize.value,
            layer=layer,
            backed=backed,
            drop_small=drop_small,
            covariate=covariate,
            deg_method=deg_method.value,
        )
        with steps("writing"):
            screen.save(out)
        if not quiet:
            steps.console.print(f"{screen!r}")
            steps.console.print(f"wrote {out}")


@app.command("report")
def report_cmd(
    results: Annotated[
        str, typer.Argument(help="a results table from `vcjax score` or `vcjax baselines`")
    ],
    out: Annotated[str, typer.Option("--out", "-o", help="the HTML file")],
    genes: Annotated[
        str | None,
        typer.Option(
            help="per-gene side-car (.genes.npz); default: the one beside RESULTS if present"
        ),
    ] = None,
    truth: Annotated[
        str | None, typer.Option(help="compute the per-gene view from this truth .h5ad")
    ] = None,
    pred: Annotated[str | None, typer.Option(help="… and this prediction (.h5ad or table)")] = None,
    key: Annotated[
        str | None, typer.Option(help="obs key (default: from the results' metadata)")
    ] = None,
    control: Annotated[
        str | None, typer.Option(help="control label (default: from the metadata)")
    ] = None,
    title: Annotated[str, typer.Option(help="page title")] = "vcjax evaluation report",
    quiet: QuietOpt = False,
) -> None:
    """One self-contained HTML report (figures embedded) from a results table."""
    with _errors():
        _check_outputs((out, (".html", ".htm")))
        from vcjax import report as R
        from vcjax._io import atomic_path, read_table

        _check_input_file(results, "results")
        steps = _Steps(quiet)
        with steps("reading the results"):
            table = read_table(results)
        per_gene = None
        if truth is not None:
            key = key or table.attrs.get("key")
            control = control or table.attrs.get("control")
            if not key or not control:
                _fail("--truth needs --key and --control (the results carry no metadata for them)")
            ref = table.attrs.get("reference", "perturbed")
            screen = _screen(
                truth,
                key=key,
                control=control,
                steps=steps,
                seed=int(table.attrs.get("seed", 0) or 0),
                # a prepared truth carries its own reference
                reference=ref
                if isinstance(ref, str) and ref != "array" and not _is_screen_file(truth)
                else "perturbed",
            )
            with steps("per-gene data"):
                from vcjax.pipeline import per_gene_data

                pred_obj = _read_pred(pred) if pred is not None else None
                per_gene = per_gene_data(screen, pred_obj)
        elif genes is not None:
            per_gene = R.load_per_gene(genes)
        elif os.path.exists(R.sidecar_path(results)):
            per_gene = R.load_per_gene(R.sidecar_path(results))
        with steps("rendering the report"):
            html = R.build_report(table, per_gene=per_gene, title=title)
        with atomic_path(out) as tmp:
            Path(tmp).write_text(html, encoding="utf-8")
        if not quiet:
            steps.console.print(
                f"wrote {out} ({len(html) / 1e6:.1f} MB"
                + ("" if per_gene is not None else "; no per-gene data")
                + ")"
            )


def _strip_ext(name: str) -> str:
    for ext in (".h5ad", *_PRED_TABLES):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name


def _names_from_paths(paths: Sequence[str]) -> list[str]:
    """Model names for prediction files: the path components that differ between them
    (``runs/a/pred.h5ad``, ``runs/b/pred.h5ad`` → ``a``, ``b``); one file: its stem."""
    parts = [Path(p).parts for p in paths]
    if len(parts) == 1:
        return [_strip_ext(parts[0][-1])]
    lead = 0
    while all(len(p) > lead + 1 for p in parts) and len({p[lead] for p in parts}) == 1:
        lead += 1
    trail = 0
    while (
        all(len(p) - lead > trail + 1 for p in parts)
        and len({p[len(p) - 1 - trail] for p in parts}) == 1
    ):
        trail += 1
    names = []
    for p in parts:
        keep = list(p[lead : len(p) - trail])
        if trail == 0:
            keep[-1] = _strip_ext(keep[-1])
        names.append("/".join(keep))
    return names


def _sweep_preds(pred: Sequence[str] | None, preds: Sequence[str] | None) -> list[tuple[str, str]]:
    """``(name, path)`` of every model given by ``--pred NAME=PATH`` / ``--pred PATH`` and
    ``--preds GLOB``; fails on a duplicated name, a missing file, or no model at all."""
    import glob

    out: list[tuple[str, str]] = []
    plain = []
    for item in pred or []:
        name, sep, path = item.partition("=")
        if sep and name and not os.path.exists(item):
            out.append((name.strip(), path.strip()))
        else:
            plain.append(item)
    for pattern in preds or []:
        hits = sorted(glob.glob(pattern, recursive=True))
        if not hits:
            _fail(f"--preds {pattern!r} matches no file")
        plain.extend(hits)
    if plain:
        out.extend(zip(_names_from_paths(plain), plain))
    if not out:
        _fail("no model: give --pred NAME=PATH (repeatable) or --preds 'GLOB'")
    seen: dict[str, str] = {}
    for name, path in out:
        if name in seen:
            _fail(
                f"model name {name!r} is given twice ({seen[name]} and {path}); name them NAME=PATH"
            )
        seen[name] = path
        _check_input_file(path, f"prediction {name!r}")
    return out


class _SweepProgress:
    """A rich progress bar over models (reading, aligning, point scores) and resamples."""

    def __init__(self, steps: _Steps, n_models: int, n_boot: int) -> None:
        self.steps, self.n_models, self.n_boot = steps, n_models, n_boot
        self.prog = None

    def __enter__(self):
        if self.steps.show:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.prog = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=self.steps.console,
                transient=True,
            )
            self.prog.__enter__()
            self.tasks = {"models": self.prog.add_task("models", total=self.n_models)}
            if self.n_boot:
                self.tasks["resamples"] = self.prog.add_task("resamples", total=self.n_boot)
        return self

    def __call__(self, stage: str, done: int, total: int) -> None:
        if self.prog is not None and stage in self.tasks:
            self.prog.update(self.tasks[stage], completed=done)

    def __exit__(self, *exc) -> None:
        if self.prog is not None:
            self.prog.__exit__(*exc)


def _leaderboard_table(lb, *, title: str, caption: str | None = None):
    import numpy as np
    import pandas as pd
    from rich.table import Table
    from rich.text import Text

    t = Table(title=title, title_justify="left", header_style="bold", caption=caption)
    for c in ("rank", "model", "value", "interval", "ranks", "p_best", "vs best"):
        t.add_column(
            c, justify="left" if c == "model" else "right", no_wrap=c != "model", overflow="fold"
        )

    def fmt(v):
        return "—" if v is None or not np.isfinite(v) else f"{v:.3f}"

    def interval(r):
        return f"{fmt(r['ci_low'])} – {fmt(r['ci_high'])}" if np.isfinite(r["ci_low"]) else "—"

    is_base = lb.index.astype(str).str.startswith("[")
    for name, r in lb[~is_base].iterrows():
        d = r["differs_from_best"]
        if pd.isna(r["rank"]):  # undefined aggregate: not ranked
            t.add_row("—", Text(str(name)), fmt(r["value"]), "—", "—", "—", "undefined")
            continue
        vs = {True: "worse", False: "tie"}.get(d, "") if int(r["rank"]) > 1 or d is True else "best"
        ranks = f"{int(r['rank_low'])}–{int(r['rank_high'])}"
        t.add_row(
            str(int(r["rank"])), Text(str(name)), fmt(r["value"]), interval(r), ranks,
            f"{r['p_best']:.2f}", vs,
        )  # fmt: skip
    if is_base.any():
        t.add_section()
        for name, r in lb[is_base].iterrows():
            t.add_row("", Text(str(name)), fmt(r["value"]), interval(r), "", "", "", style="dim")
    return t


def _run_sweep(
    screen,
    models,
    *,
    n_models: int,
    steps: _Steps,
    metrics,
    n_boot: int,
    ci: float,
    seed: int,
    resample: str,
    on_error: str = "raise",
    pred_layer: str | None = None,
    check_scale: str = "error",
    **protocol_options: Any,
):
    from vcjax.pipeline import sweep as run

    with _SweepProgress(steps, n_models, n_boot) as bar, _quiet_warnings():
        return run(
            screen,
            models,
            metrics=metrics,
            n_boot=n_boot,
            ci=ci,
            seed=seed,
            resample=resample,
            on_error=on_error,
            pred_layer=pred_layer,
            check_scale=CheckScale(check_scale).value,
            progress=bar if steps.show else False,
            **protocol_options,
        )


def _sweep_outputs(result, *, out, leaderboard, report, metric, calibrated, meta, steps) -> None:
    """The sweep's table, leaderboard and report, all-or-nothing."""
    from vcjax._io import Staged, save_table
    from vcjax.report import build_sweep_report

    html = None
    if report is not None:
        with steps("rendering the report"):
            html = build_sweep_report(
                result, metric=metric, calibrated=calibrated,
                meta={k: v for k, v in meta.items() if k in ("truth", "vcjax_version", "command")},
            )  # fmt: skip
    with steps("writing"), Staged() as staged:
        if out is not None:
            save_table(result.tidy(), out, meta=meta, staged=staged)
        if leaderboard is not None:
            lb = result.leaderboard(metric, calibrated=calibrated, baselines=True)
            save_table(lb.reset_index(), leaderboard, meta=meta, staged=staged)
        if html is not None:
            staged.add(report, lambda p: p.write_text(html, encoding="utf-8"))
        staged.commit()


MetricOpt = Annotated[
    str | None,
    typer.Option(
        "--metric",
        help="the leaderboard's metric (calibrated unless --raw), a core one: "
        + ", ".join(_CORE)
        + " (default r2w_delta); with --protocol one of the protocol's metrics (raw values; "
        "cell-eval default: discrimination_score_l1)",
    ),
]
ResampleOpt = Annotated[
    str | None,
    typer.Option(
        help="what the intervals resample: cells (within condition-halves; the default), "
        "perturbations (the only one, and the default, with --protocol), both"
    ),
]


@app.command("sweep")
def sweep_cmd(
    truth: TruthOpt,
    pred: Annotated[
        list[str] | None,
        typer.Option(
            "--pred",
            "-p",
            help="a model: NAME=PATH (or PATH, named after it), repeatable; .h5ad or a table",
        ),
    ] = None,
    preds: Annotated[
        list[str] | None,
        typer.Option("--preds", help="a glob of prediction files, e.g. 'runs/*/pred.h5ad'"),
    ] = None,
    key: KeyOpt = None,
    control: ControlOpt = None,
    n_boot: Annotated[int, typer.Option("--n-boot", help="shared resamples (0: none)")] = 1000,
    ci: Annotated[float, typer.Option(help="interval level")] = 0.95,
    seed: SeedOpt = 0,
    resample: ResampleOpt = None,
    metric: MetricOpt = None,
    raw: Annotated[bool, typer.Option("--raw", help="rank on raw, not calibrated, values")] = False,
    metrics: MetricsOpt = None,
    out: Annotated[
        str | None,
        typer.Option("--out", "-o", help="tidy table of every model and baseline (.parquet/.csv)"),
    ] = None,
    leaderboard: Annotated[str | None, typer.Option(help="the leaderboard (.csv/.parquet)")] = None,
    report: Annotated[str | None, typer.Option(help="an HTML sweep report")] = None,
    skip_failed: Annotated[
        bool, typer.Option("--skip-failed", help="leave out models that fail to load or align")
    ] = False,
    pred_layer: Annotated[
        str | None, typer.Option(help="prediction layer to read instead of X")
    ] = None,
    quiet: QuietOpt = False,
    device: DeviceOpt = None,
    reference: ReferenceOpt = Reference.perturbed,
    normalize: NormalizeOpt = Normalize.auto,
    layer: LayerOpt = None,
    backed: BackedOpt = False,
    drop_small: DropSmallOpt = False,
    covariate: CovariateOpt = None,
    deg_method: DegMethodOpt = DegMethod.overestim_var,
    check_scale: CheckScaleOpt = CheckScale.error,
    protocol: ProtocolOpt = None,
) -> None:
    """Score many models against one truth on shared resamples: a leaderboard with rank
    intervals and p_best (the share of resamples in which a model is best).

    The truth is read and prepared once; every model is scored on the same resamples, so
    every comparison is paired. With --protocol cell-eval: cell-eval 0.8.2's metrics, the
    intervals and ranks from perturbation resamples shared by every model.
    """
    with _errors() as notes:
        _check_outputs((out, None), (leaderboard, None), (report, (".html", ".htm")))
        if not 0 < ci < 1:
            _fail(f"--ci must be in (0, 1), got {ci}")
        if n_boot < 0 or n_boot == 1:
            _fail(f"--n-boot must be 0 or >= 2, got {n_boot}")
        _rough_boot(n_boot, notes)
        from vcjax.pipeline._sweep import RESAMPLE

        if resample is not None and resample not in RESAMPLE:
            _fail(f"--resample must be one of {', '.join(RESAMPLE)}; got {resample!r}")
        proto = _protocol(protocol)
        if proto is not None:
            _sweep_protocol(
                proto, truth=truth, pred=pred, preds=preds, key=key, control=control,
                n_boot=n_boot, ci=ci, seed=seed, resample=resample, metric=metric,
                raw=raw, metrics=metrics, out=out, leaderboard=leaderboard, report=report,
                skip_failed=skip_failed, pred_layer=pred_layer, quiet=quiet, device=device,
                layer=layer, notes=notes,
                truth_options=dict(
                    reference=reference.value, normalize=_NORMALIZE[normalize.value],
                    drop_small=drop_small, covariate=covariate, deg_method=deg_method.value,
                    check_scale=CheckScale(check_scale).value,
                ),
                switches={"--backed": backed},
            )  # fmt: skip
            return
        metric = metric or "r2w_delta"
        from vcjax.metrics import METRICS

        if metric not in METRICS or not METRICS[metric].is_core:
            core = ", ".join(m for m in METRICS if METRICS[m].is_core)
            _fail(f"--metric {metric!r} is not a core metric ({core})")
        files = _sweep_preds(pred, preds)
        _check_pred_layer(pred_layer, [path for _, path in files])
        _select_device(device)
        steps = _Steps(quiet)
        screen = _screen(
            truth, key=key, control=control, steps=steps, seed=seed,
            reference=reference.value, normalize=normalize.value, layer=layer,
            backed=backed, drop_small=drop_small, covariate=covariate,
            deg_method=deg_method.value,
        )  # fmt: skip

        def models():
            for name, path in files:
                try:
                    yield name, _read_pred(path)
                except typer.Exit:
                    if not skip_failed:
                        raise
                    yield name, path  # the sweep records the error

        result = _run_sweep(
            screen, models(), n_models=len(files), steps=steps, metrics=_metric_list(metrics),
            n_boot=n_boot, ci=ci, seed=seed, resample=resample or "cells",
            on_error="skip" if skip_failed else "raise", pred_layer=pred_layer,
            check_scale=CheckScale(check_scale).value,
        )  # fmt: skip
        meta = _table_meta(
            result.table, key=screen.spec.key, control=screen.spec.control,
            truth=os.path.abspath(truth), reference=screen.spec.reference_name, seed=seed,
            n_boot=n_boot, ci=ci, resample=resample or "cells", models=dict(files),
        )  # fmt: skip
        _sweep_outputs(
            result, out=out, leaderboard=leaderboard, report=report, metric=metric,
            calibrated=not raw, meta=meta, steps=steps,
        )  # fmt: skip
        _sweep_notes(result, screen, notes)
        if not quiet:
            _print_leaderboard(result, metric=metric, calibrated=not raw, steps=steps)
            written = [p for p in (out, leaderboard, report) if p]
            if written:
                steps.console.print("wrote " + ", ".join(written))


def _sweep_protocol(
    proto, *, truth, pred, preds, key, control, n_boot, ci, seed, resample, metric, raw,
    metrics, out, leaderboard, report, skip_failed, pred_layer, quiet, device, layer, notes,
    truth_options, switches,
) -> None:  # fmt: skip
    """`vcjax sweep --protocol NAME`: every model under the protocol, perturbation resamples."""
    name = proto.name
    _protocol_cli_flags(name, {"--report": report}, {**switches, "--raw": raw})
    metric = metric or proto.default_metric
    known = list(dict.fromkeys([*proto.metrics, *proto.higher_is_better]))
    if metric not in known:
        _fail(f"--metric {metric!r} is not a metric of --protocol {name}: {', '.join(known)}")
    if proto.higher_is_better.get(metric, True) is None:
        _fail(f"--metric {metric!r} has no better direction: it cannot rank models")
    files = _sweep_preds(pred, preds)
    _check_pred_layer(pred_layer, [path for _, path in files])
    _select_device(device)
    steps = _Steps(quiet)
    source = _protocol_truth(truth, name)

    def models():
        for model, path in files:
            try:
                yield model, _read_pred(path)
            except typer.Exit:
                if not skip_failed:
                    raise
                yield model, path  # the sweep records the error

    result = _run_sweep(
        source, models(), n_models=len(files), steps=steps, metrics=_metric_list(metrics),
        n_boot=n_boot, ci=ci, seed=seed, resample=resample,
        on_error="skip" if skip_failed else "raise", pred_layer=pred_layer,
        protocol=name, key=key, control=control, layer=layer, **truth_options,
    )  # fmt: skip
    meta = _table_meta(
        result.table, key=key, control=control, truth=os.path.abspath(truth), seed=seed,
        n_boot=n_boot, ci=ci, resample="perturbations", models=dict(files), protocol=name,
    )  # fmt: skip
    _sweep_outputs(
        result, out=out, leaderboard=leaderboard, report=None, metric=metric,
        calibrated=False, meta=meta, steps=steps,
    )  # fmt: skip
    for model, err in result.errors.items():
        notes.add(f"model {model!r} left out: {err}")
    if not quiet:
        _print_leaderboard(result, metric=metric, calibrated=False, steps=steps)
        written = [p for p in (out, leaderboard) if p]
        if written:
            steps.console.print("wrote " + ", ".join(written))


def _print_leaderboard(result, *, metric: str, calibrated: bool, steps: _Steps) -> None:
    from vcjax.metrics import label

    lb = result.leaderboard(metric, calibrated=calibrated, baselines=True)
    n_boot = int(result.info.get("n_boot", 0))
    name = ("calibrated " if calibrated else "") + label(metric)
    if result.info.get("protocol"):
        name = f"{metric} (--protocol {result.info['protocol']})"
    what = (
        "the whole data set's score, recomputed on each resample"
        if metric in result.info.get("composite", ())
        else "mean over perturbations"
    )
    cap = (
        f"{what}; {100 * result.info['ci']:.0f} % intervals and rank intervals "
        f"from {n_boot} shared {result.info['resample']} resamples; p_best: share of resamples "
        "in which the model is best"
        if n_boot
        else f"{what}; no resamples (--n-boot) so no intervals"
    )
    _stdout().print(_leaderboard_table(lb, title=f"leaderboard: {name}", caption=cap))
    steps.console.print(_backend_line())


def _sweep_notes(result, screen, notes: _Warnings) -> None:
    """A sweep's warnings: the models left out, and the NaN summary."""
    from vcjax.pipeline import undefined_summary

    for model, err in result.errors.items():
        notes.add(f"model {model!r} left out: {err}")
    notes.add(undefined_summary(result.tidy(), deg_method=screen.spec.deg_method))


@app.command()
def demo(
    h5ad: Annotated[
        str | None, typer.Option(help="a real screen (.h5ad); default: the embedded simulator")
    ] = None,
    key: Annotated[
        str, typer.Option("--key", "-k", help="obs column with the condition labels")
    ] = "condition",
    control: Annotated[str, typer.Option("--control", "-c", help="the control label")] = "control",
    seed: Annotated[int, typer.Option(help="simulator seed (and null-baseline seed)")] = 0,
    n_boot: Annotated[
        int, typer.Option("--n-boot", help="shared cell resamples (docs/metrics.md §11)")
    ] = 200,
    out: Annotated[
        str | None, typer.Option("--out", "-o", help="also write the sweep table (.csv/.parquet)")
    ] = None,
    report: Annotated[str | None, typer.Option(help="also write the HTML sweep report")] = None,
    quiet: QuietOpt = False,
    device: DeviceOpt = None,
    normalize: NormalizeOpt = Normalize.auto,
    drop_small: DropSmallOpt = False,
    covariate: CovariateOpt = None,
    deg_method: DegMethodOpt = DegMethod.overestim_var,
) -> None:
    """The engine's job in seconds: a small sweep of models of known quality, ranked.

    The models are made from the screen's own cells (vcjax.pipeline.known_models): the
    truth's other half (the best a model can do without the truth's cells), the same with
    noise, with its effects halved, and collapsed to the mean response; on the simulator
    also its true expected means. They are scored with the baselines on shared cell
    resamples, and the leaderboard prints with rank intervals and p_best.
    """
    with _errors() as notes:
        _check_outputs((out, None), (report, (".html", ".htm")))
        if n_boot < 0 or n_boot == 1:
            _fail(f"--n-boot must be 0 or >= 2, got {n_boot}")
        if covariate is not None and h5ad is None:
            _fail("--covariate needs --h5ad (the simulated screen has no covariate)")
        _rough_boot(n_boot, notes)
        _select_device(device)
        steps = _Steps(quiet)
        oracle = None
        if h5ad is None:
            from vcjax.pipeline import prepare
            from vcjax.simulate import population_means, simulate_screen

            with steps(f"simulating a screen (seed {seed})"):
                adata = simulate_screen(seed=seed, key=key, control=control)
            source = f"vcjax.simulate.simulate_screen(seed={seed})"
            oracle = population_means(adata).drop(index=control)
            with steps("reading the truth: statistics, DEGs and baselines"):
                # the simulator draws raw counts: normalised on purpose, nothing to announce
                screen = prepare(
                    adata, key=key, control=control, seed=seed, progress=steps.show,
                    deg_method=deg_method.value, normalize="log1p_cp10k",
                )  # fmt: skip
        else:
            source = h5ad
            screen = _screen(
                h5ad, key=key, control=control, steps=steps, seed=seed,
                normalize=normalize.value, drop_small=drop_small, covariate=covariate,
                deg_method=deg_method.value,
            )  # fmt: skip
        from vcjax.pipeline import known_models

        models = known_models(screen, seed=seed)
        if oracle is not None:
            models = {"simulator truth": oracle, **models}
        result = _run_sweep(
            screen, models, n_models=len(models), steps=steps, metrics=None,
            n_boot=n_boot, ci=0.95, seed=seed, resample="cells",
        )  # fmt: skip
        meta = _table_meta(result.table, key=key, control=control, truth=source, seed=seed,
                           n_boot=n_boot)  # fmt: skip
        if out is not None or report is not None:
            _sweep_outputs(
                result, out=out, leaderboard=None, report=report, metric="r2w_delta",
                calibrated=True, meta=meta, steps=steps,
            )  # fmt: skip
        _sweep_notes(result, screen, notes)
        if not quiet:
            n_p = sum(len(s.perturbations) for s in screen.strata)
            per = f" ({len(screen.strata)} values of {covariate})" if covariate else ""
            _stdout().print(
                f"{source}: {n_p} perturbations{per} × {len(screen.genes)} genes; "
                f"{len(models)} models of known quality, {n_boot} shared cell resamples"
            )
            _print_leaderboard(result, metric="r2w_delta", calibrated=True, steps=steps)
            _stdout().print(
                "Expected: 'other half' (the truth's other half) near the technical duplicate, "
                "'collapsed' (the mean response) near or below 0"
                + ("; the simulator's truth above both." if oracle is not None else ".")
            )


def _print_version(value: bool) -> None:
    if value:
        import vcjax

        typer.echo(vcjax.__version__)
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="print the version and exit"
        ),
    ] = False,
) -> None:
    """Calibrated metrics for perturbation-response (virtual-cell) models, in JAX."""


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point (``vcjax``, ``python -m vcjax``)."""
    app(args=list(argv) if argv is not None else None, prog_name="vcjax")


if __name__ == "__main__":  # pragma: no cover
    main()
