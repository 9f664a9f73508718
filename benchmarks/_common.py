"""Shared helpers for the vcjax benchmarks: timing, peak RSS, memory bandwidth, reports.

Import from a benchmark script with ``sys.path.insert(0, str(Path(__file__).parent))`` then
``import _common``. Nothing here imports JAX at module import time, so a benchmark can set
``XLA_FLAGS`` first.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"


def timeit(
    fn: Callable[[], object], *, repeat: int = 5, warmup: int = 1, min_time: float = 0.0
) -> dict[str, float]:
    """Wall-clock seconds of ``fn()`` (blocking on JAX results): min, median and count.

    ``warmup`` calls are discarded (compilation). Repeats continue until ``repeat`` calls
    and at least ``min_time`` seconds have been spent.
    """
    for _ in range(warmup):
        _block(fn())
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeat or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        _block(fn())
        times.append(time.perf_counter() - t0)
    return {"min": min(times), "median": statistics.median(times), "n": len(times)}


def _block(out: object) -> None:
    try:
        import jax
    except ImportError:  # pragma: no cover
        return
    jax.block_until_ready(out)


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux ``ru_maxrss`` is KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        m = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
        if m:
            return m.group(1).strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, object]:
    """CPU model, core count, memory, library versions and the date, for result tables."""
    info: dict[str, object] = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "date": datetime.date.today().isoformat(),
    }
    try:
        info["mem_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):  # pragma: no cover
        pass
    try:
        import jax

        info["jax"] = jax.__version__
        info["backend"] = jax.default_backend()
        info["devices"] = len(jax.devices())
    except ImportError:  # pragma: no cover
        pass
    try:
        info["loadavg_1m"] = round(os.getloadavg()[0], 2)
    except OSError:  # pragma: no cover
        pass
    return info


def machine_note(info: dict[str, object]) -> str:
    parts = [
        f"{info.get('cpu')}, {info.get('cores')} cores",
        f"{info.get('mem_gib')} GiB RAM" if "mem_gib" in info else None,
        f"jax {info.get('jax')} ({info.get('backend')})" if "jax" in info else None,
        f"numpy {info.get('numpy')}",
        f"load average {info.get('loadavg_1m')} at start" if "loadavg_1m" in info else None,
        str(info.get("date")),
    ]
    return "; ".join(p for p in parts if p)


def measure_bandwidth(n_bytes: int = 256 * 2**20, repeat: int = 7) -> dict[str, float]:
    """Read bandwidth (GB/s) of this machine: a jitted ``jnp.sum`` and NumPy sum / copy.

    For ``copy`` the bytes moved are counted twice (read + write).
    """
    a = np.random.default_rng(0).random(n_bytes // 4, dtype=np.float32)
    out: dict[str, float] = {}
    t = timeit(lambda: a.sum(), repeat=repeat)
    out["numpy_sum_gbs"] = a.nbytes / t["min"] / 1e9
    t = timeit(lambda: a.copy(), repeat=repeat)
    out["numpy_copy_gbs"] = 2 * a.nbytes / t["min"] / 1e9
    try:
        import jax
        import jax.numpy as jnp

        x = jnp.asarray(a)
        f = jax.jit(jnp.sum)
        t = timeit(lambda: f(x), repeat=repeat)
        out["jax_sum_gbs"] = a.nbytes / t["min"] / 1e9
    except ImportError:  # pragma: no cover
        pass
    return out


def cell_eval_full_run(truth: str, pred: str, outdir: str, *, key: str, control: str):
    """cell-eval's full run on two ``.h5ad`` files, as a user calls it:
    ``MetricsEvaluator(...).compute(profile="full")`` (2 threads, no CSV). Returns its
    ``(per-perturbation results, aggregates)``. Import ``anndata`` and ``cell_eval`` before
    timing it (their import is not part of the run)."""
    import anndata as ad
    from cell_eval import MetricsEvaluator

    ev = MetricsEvaluator(
        adata_pred=ad.read_h5ad(pred),
        adata_real=ad.read_h5ad(truth),
        control_pert=control,
        pert_col=key,
        outdir=outdir,
        num_threads=2,
    )
    return ev.compute(profile="full", write_csv=False)


def markdown_table(rows: Sequence[dict[str, object]], columns: Sequence[tuple[str, str]]) -> str:
    """``columns`` is ``[(key, header)]``; floats are printed with 3 significant digits."""

    def fmt(v: object) -> str:
        if isinstance(v, float):
            if v != v:  # NaN
                return "–"
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)

    head = "| " + " | ".join(h for _, h in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(fmt(r.get(k, "")) for k, _ in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def write_json(path: str | Path, payload: object) -> None:
    Path(path).write_text(json.dumps(payload, indent=2, default=float) + "\n")


def update_results_section(heading: str, body: str, path: Path = RESULTS_MD) -> None:
    """Replace (or append) the section starting at the line ``heading`` (e.g. ``## Kernels``).

    The section runs to the next ``## `` heading; other sections are left untouched.
    """
    text = path.read_text() if path.exists() else "# vcjax benchmark results\n"
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == heading.strip()), None)
    block = [heading, "", *body.strip("\n").splitlines(), ""]
    if start is None:
        if lines and lines[-1].strip():
            lines.append("")
        lines.extend(block)
    else:
        end = next(
            (i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines)
        )
        lines[start:end] = block
    path.write_text("\n".join(lines).rstrip("\n") + "\n")
