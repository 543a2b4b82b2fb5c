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
    if row["max_rel_err"] is None:
        return ""
    return f"{'ok' if row['match'] else 'MISMATCH'} {row['max_rel_err']:.1e}"


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
MODEL_COLUMNS: list[Column] = [
    ("model", lambda r: r["model"]),
    ("task", lambda r: r["task"]),
    ("input", lambda r: r["input"]),
    ("dtype", lambda r: r["dtype"]),
    ("impl", lambda r: r["impl"]),
    ("median ms", lambda r: num(r["median_ms"])),
    ("n", lambda r: str(r["repeats"])),
    ("images/s", lambda r: num(r["images_per_s"])),
    ("vs eager", lambda r: _ratio(r["vs_eager"])),
    ("compile s", lambda r: num(r["compile_s"], 2)),
    ("check vs eager", _check),
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
        parts += [f"{heading}Whole model (images/s = batch / median)", table(results["models"], MODEL_COLUMNS)]
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
