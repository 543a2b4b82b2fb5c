"""The results as a text table (stdout), JSON, a markdown table and a PNG chart of the speedups."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.peers import CORETYPE

Row = dict[str, Any]
Column = tuple[str, Callable[[Row], str]]

# The whole model's implementations the ratios refer to (benchmarks/models.py runs them).
EAGER, CHANNELS_LAST, COMPILE = "eager", "eager+channels_last", "compile"
DIFFUSERS_LAYOUTS = (EAGER, CHANNELS_LAST)  # "best diffusers": the faster of these under the same precision
AUTO = "vqfast[auto]"
CONVS = f"{AUTO} convs"  # the limit: vqfast[auto]'s convolutions alone
LIMIT_GOAL = 1.15  # whole model time over its convolutions' time, at most
MODEL_CASE_KEYS = ("model", "task", "input", "dtype")


def num(x: float | None, digits: int = 3) -> str:
    """``x`` to ``digits`` significant digits, without an exponent; empty for None."""
    if x is None:
        return ""
    if x == 0 or not math.isfinite(x):
        return str(x)
    return f"{x:.{max(0, digits - 1 - math.floor(math.log10(abs(x))))}f}"


def _ratio(x: float | None) -> str:
    return f"{num(x)}x" if x is not None else ""


def _spread(row: Row) -> str:
    return f"{num(100 * row['iqr_ms'] / row['median_ms'], 2)}%" if row["repeats"] > 1 else ""


def _rate(row: Row) -> str:
    return f"{num(row['rate'])} {row['metric']}"


def _check(row: Row) -> str:
    """``ok 2.9e-06 <= 5.0e-05``: the relative L2 error to diffusers' float32 output and the bound it passes."""
    if row["error"] is None:
        return ""
    if row["bound"] is None:
        return f"{row['error']:.1e}"
    return f"{'ok' if row['match'] else 'MISMATCH'} {row['error']:.1e} {'<=' if row['match'] else '>'} {row['bound']:.1e}"


def _best(row: Row) -> str:
    """The ratio to the faster diffusers layout, and which it was."""
    if row["vs_best_diffusers"] is None:
        return ""
    return f"{_ratio(row['vs_best_diffusers'])} ({row['best_diffusers'].removeprefix('eager+') or 'nchw'})"


def ratio(base_ms: float | None, ms: float | None) -> float | None:
    """How many times faster than ``base_ms`` (``2.0`` = twice as fast); None when either is missing."""
    return base_ms / ms if base_ms and ms else None


def model_ratios(rows: list[Row]) -> None:
    """Fills in the ratios of one model case's rows (one model, task, input and precision), from their medians:
    ``vs_eager``, ``vs_channels_last``, ``vs_compile``, ``vs_best_diffusers`` (to the faster of diffusers' eager
    layouts, named in ``best_diffusers``) and, on vqfast[auto]'s row, ``limit_ratio``: its time over its
    convolutions' alone."""
    median = {row["impl"]: row["median_ms"] for row in rows}
    best = min((impl for impl in DIFFUSERS_LAYOUTS if impl in median), key=median.__getitem__, default=None)
    for row in rows:
        ms = row["median_ms"]
        row["vs_eager"] = ratio(median.get(EAGER), ms)
        row["vs_channels_last"] = ratio(median.get(CHANNELS_LAST), ms)
        row["vs_compile"] = ratio(median.get(COMPILE), ms)
        row["vs_best_diffusers"], row["best_diffusers"] = ratio(median.get(best), ms), best
        row["limit_ratio"] = ratio(ms, median.get(CONVS)) if row["impl"] == AUTO else None


def model_cases(rows: list[Row]) -> list[list[Row]]:
    """``rows`` grouped by model case (MODEL_CASE_KEYS), in first-seen order."""
    cases: dict[tuple, list[Row]] = {}
    for row in rows:
        cases.setdefault(tuple(row[k] for k in MODEL_CASE_KEYS), []).append(row)
    return list(cases.values())


OP_COLUMNS: list[Column] = [
    ("op", lambda r: r["op"]),
    ("shape", lambda r: r["shape"]),
    ("dtype", lambda r: r["dtype"]),
    ("layout", lambda r: r["layout"]),
    ("impl", lambda r: r["impl"]),
    ("median ms", lambda r: num(r["median_ms"])),
    ("IQR", _spread),
    ("n", lambda r: str(r["repeats"])),
    ("vs eager", lambda r: _ratio(r["vs_eager"])),
    ("vs compile", lambda r: _ratio(r["vs_compile"])),
    ("rate", _rate),
    ("% peak", lambda r: num(100 * r["peak_share"], 2)),
    ("extra MiB", lambda r: num(r.get("peak_extra_mib"))),
    ("compile s", lambda r: num(r["compile_s"], 2)),
]
MODEL_CASE_COLUMNS: list[Column] = [
    ("model", lambda r: r["model"]),
    ("task", lambda r: r["task"]),
    ("input", lambda r: r["input"]),
    ("dtype", lambda r: r["dtype"]),
]
MODEL_COLUMNS: list[Column] = [
    *MODEL_CASE_COLUMNS,
    ("impl", lambda r: r["impl"]),
    ("median ms", lambda r: num(r["median_ms"])),
    ("IQR", _spread),
    ("n", lambda r: str(r["repeats"])),
    ("images/s", lambda r: num(r["images_per_s"])),
    ("vs eager", lambda r: _ratio(r["vs_eager"])),
    ("vs best diffusers", _best),
    ("vs compile", lambda r: _ratio(r["vs_compile"])),
    ("compile s", lambda r: num(r["compile_s"], 2)),
    ("error vs diffusers float32", _check),
]
# vqfast[auto]'s rows: every ratio the comparison asks for, side by side.
SUMMARY_COLUMNS: list[Column] = [
    *MODEL_CASE_COLUMNS,
    ("vqfast ms", lambda r: num(r["median_ms"])),
    ("vs eager", lambda r: _ratio(r["vs_eager"])),
    ("vs eager+channels_last", lambda r: _ratio(r["vs_channels_last"])),
    ("vs compile", lambda r: _ratio(r["vs_compile"])),
    ("vs best diffusers", _best),
    (f"limit (<= {LIMIT_GOAL})", lambda r: num(r["limit_ratio"])),
    ("error vs diffusers float32", _check),
]


def _cells(rows: list[Row], columns: list[Column]) -> list[list[str]]:
    return [[header for header, _ in columns]] + [[cell(row) for _, cell in columns] for row in rows]


def text_table(rows: list[Row], columns: list[Column]) -> str:
    cells = _cells(rows, columns)
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(rows: list[Row], columns: list[Column]) -> str:
    cells = _cells(rows, columns)
    lines = ["| " + " | ".join(line) + " |" for line in cells]
    lines.insert(1, "|" + "---|" * len(columns))
    return "\n".join(lines)


def stamp_line(meta: dict[str, Any]) -> str:
    return (
        f"{meta['device']} ({meta['threads']} threads) | torch {meta['torch']} | triton {meta['triton'] or '-'} | "
        f"commit {meta['commit']} | {meta['date']}"
    )


def peaks_line(peak: dict[str, Any]) -> str:
    return f"measured peaks: copy {num(peak['copy_gbps'])} GB/s; float32 matmul {num(peak['matmul_gflops'])} GFLOP/s"


def peers_line(peers: dict[str, Any]) -> str:
    """Each peer's BLAS, version, core and threads, and the environment steering them."""
    torch_ = peers["torch"]
    blas = " ".join(filter(None, (torch_["blas"], torch_["blas_version"])))
    parts = [f"torch: {blas} (ATen {torch_['cpu_capability']}), {torch_['num_threads']} threads"]
    if "faiss" in peers:
        faiss, core = peers["faiss"], peers["faiss"]["core"]
        blas = next((lib for lib in faiss["libraries"] or () if lib["user_api"] == "blas"), {})
        how = {
            "runner": f"named {core['named']}: it picked {core['picked']} by itself",
            "environment": f"{CORETYPE}={core['named']} from the environment",
            "": "its own pick",
        }[core["by"]]
        parts.append(
            f"faiss: {blas.get('internal_api', '?')} {blas.get('version', '')} on {faiss['runs_on']} ({how}), "
            f"{blas.get('num_threads', '?')} threads"
        )
    env = ", ".join(f"{k}={v}" for k, v in peers["environment"].items())
    return "; ".join(parts) + f"; environment: {env or 'none set'}"


def render(results: dict[str, Any], table: Callable[[list[Row], list[Column]], str], heading: str = "") -> str:
    """The whole report as text (``table=text_table``) or markdown (``table=markdown_table``, with
    ``heading`` "## " before section titles)."""
    meta = results["meta"]
    parts = [
        stamp_line(meta),
        peaks_line(results["peak"]),
        "backends: " + ", ".join(f"{k}: {v}" for k, v in meta["backends"].items()),
        "auto tries: " + "; ".join(f"{op}: {' > '.join(order)}" for op, order in meta["auto"].items()),
        "peers' BLAS: " + peers_line(meta["peers"]),
    ]
    if results["ops"]:
        parts += [f"{heading}Ops", table(results["ops"], OP_COLUMNS)]
    if results["models"]:
        summary = [row for row in results["models"] if row["impl"] == AUTO]
        if summary:
            parts += [
                f"{heading}Whole model: vqfast[auto] against diffusers",
                "Ratios > 1: vqfast is faster. best diffusers: the faster of eager (NCHW) and eager+channels_last "
                f"under the same precision. limit: vqfast's time over its convolutions' alone (goal <= {LIMIT_GOAL}). "
                "error: relative L2 to diffusers' float32 output; it passes within 5e-5 in float32, within 1.25x "
                "diffusers eager's own error in reduced precision.",
                table(summary, SUMMARY_COLUMNS),
            ]
        parts += [f"{heading}Whole model, every implementation (images/s = batch / median)",
                  table(results["models"], MODEL_COLUMNS)]
    if results["skipped"]:
        parts.append(f"{heading}Not run")
        parts.append(
            "\n".join(
                f"- {s['impl']} on {len(s['cases'])} case(s), e.g. {s['cases'][0]}: {s['reason']}"
                for s in results["skipped"]
            )
        )
    parts.append(f"wall time {num(meta['wall_s'])} s; options: {meta['command']}")
    return "\n\n".join(parts)


def basename(meta: dict[str, Any], quick: bool) -> str:
    """``<device>-<date>``, e.g. ``cpu-intel-r-xeon-r-processor-2025-01-31``; ``-quick`` for quick runs."""
    slug = re.sub(r"[^a-z0-9]+", "-", f"{meta['device_type']} {meta['device']}".lower()).strip("-")
    return f"{slug}-{meta['date'][:10]}" + ("-quick" if quick else "")


def chart(results: dict[str, Any], path: Path) -> bool:
    """A horizontal bar chart of every non-eager row's speedup over eager (log scale); False when
    matplotlib is not installed (``pip install -e '.[bench]'``)."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for title, rows, keys in (
        ("ops", results["ops"], ("op", "shape", "dtype", "layout")),
        ("whole model", results["models"], ("model", "task", "input", "dtype")),
    ):
        bars = [
            (" ".join(str(r[k]) for k in keys if r[k] != "nchw") + f"  {r['impl']}", r["vs_eager"])
            for r in rows
            if r["vs_eager"] is not None and r["impl"] != "eager"
        ]
        if bars:
            panels.append((title, bars))
    heights = [max(len(bars), 2) for _, bars in panels] or [2]
    fig, axes = plt.subplots(
        len(heights),
        1,
        figsize=(11, 1.5 + 0.2 * sum(heights)),
        squeeze=False,
        gridspec_kw={"height_ratios": heights},
        layout="constrained",
    )
    for ax, (title, bars) in zip(axes[:, 0], panels):
        labels, values = zip(*bars)
        rects = ax.barh(range(len(bars)), values, color=["tab:green" if v >= 1 else "tab:red" for v in values])
        ax.bar_label(rects, [_ratio(v) for v in values], padding=2, fontsize=6)
        ax.set_yticks(range(len(bars)), labels, fontsize=7)
        ax.set_ylim(len(bars) - 0.5, -0.5)  # first row on top, no margins
        ax.set_xscale("log")
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_title(f"{title}: speedup over eager (higher is faster)", fontsize=8)
    fig.suptitle(stamp_line(results["meta"]), fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write(results: dict[str, Any], out_dir: Path, quick: bool) -> list[Path]:
    """JSON, markdown and (with matplotlib) PNG under ``out_dir``, named by device and date."""
    out_dir.mkdir(parents=True, exist_ok=True)
    base = out_dir / basename(results["meta"], quick)
    paths = [base.with_suffix(".json"), base.with_suffix(".md")]
    paths[0].write_text(json.dumps(results, indent=1) + "\n")
    png = base.with_suffix(".png")
    image = f"\n\n![speedups]({png.name})" if chart(results, png) else ""
    paths[1].write_text(f"# vqfast benchmark\n\n{render(results, markdown_table, '## ')}{image}\n")
    return paths + ([png] if image else [])
