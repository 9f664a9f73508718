"""Plot wall time against the number of perturbations P for each tool (log–log).

Reads ``benchmarks/results_peers.json`` (written by ``bench_peers.py``) and writes
``benchmarks/results_time_vs_p.png`` (small: 8.6 × 4 in at 100 dpi). One line per tool and
gene count G; vcjax is drawn twice: first call (JIT compilation included) and warm. Sizes a
tool did not finish are left out (their reason is in the JSON and in RESULTS.md).

Usage::

    python benchmarks/plot_results.py [--json results_peers.json] [--out results_time_vs_p.png]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
STYLE = {
    "vcjax": ("C0", "o", "-"),
    "vcjax (warm)": ("C0", "o", ":"),
    "numpy": ("C2", "s", "-"),
    "scanpy": ("C1", "^", "-"),
    "cell-eval": ("C3", "D", "-"),
}
LABEL = {
    "vcjax": "vcjax evaluate (first call)",
    "vcjax (warm)": "vcjax evaluate (warm)",
    "numpy": "NumPy float64 reference",
    "scanpy": "scanpy rank_genes_groups (DE only)",
    "cell-eval": "cell-eval MetricsEvaluator (full)",
}


def series(rows):
    """``{(tool, G): [(P, seconds), ...]}`` for the finished runs."""
    out: dict[tuple[str, int], list[tuple[int, float]]] = {}
    for r in rows:
        if r.get("status") != "ok" or r["tool"] == "vcjax-boot":
            continue
        out.setdefault((r["tool"], r["G"]), []).append((r["P"], r["seconds"]))
        if r["tool"] == "vcjax" and "seconds_warm" in r:
            out.setdefault(("vcjax (warm)", r["G"]), []).append((r["P"], r["seconds_warm"]))
    return {k: sorted(v) for k, v in out.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=str(HERE / "results_peers.json"))
    ap.add_argument("--out", default=str(HERE / "results_time_vs_p.png"))
    args = ap.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    payload = json.loads(Path(args.json).read_text())
    data = series(payload["rows"])
    fig, ax = plt.subplots(figsize=(8.6, 4.0), dpi=100)
    for (tool, G), pts in sorted(
        data.items(), key=lambda kv: (list(STYLE).index(kv[0][0]), kv[0][1])
    ):
        color, marker, ls = STYLE.get(tool, ("k", "x", "-"))
        xs, ys = zip(*pts)
        ax.plot(
            xs,
            ys,
            color=color,
            marker=marker,
            ls=ls,
            mfc=color if G <= 2000 else "none",  # open markers: the larger gene count
            label=f"{LABEL.get(tool, tool)}, G={G:,}",
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("perturbations P (100 cells each)")
    ax.set_ylabel("wall time, s (file reading included)")
    m = payload.get("machine", {})
    ax.set_title(
        f"{m.get('cpu', '')}, {m.get('cores', '?')} cores, {m.get('date', '')}", fontsize=9
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6.5, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(args.out)
    print(f"wrote {args.out} ({Path(args.out).stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
