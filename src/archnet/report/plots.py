"""The per-block plot of a report."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_blocks(rep: dict[str, Any], path: Path) -> None:
    """Per block: teacher latency vs the chosen candidate's, labelled with the choice."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    blocks = rep["blocks"]
    xs = range(len(blocks))
    fig = Figure(figsize=(max(6, 0.6 * len(blocks)), 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.bar(
        [x - 0.2 for x in xs],
        [b["teacher_latency_ms"] or 0 for b in blocks],
        0.4,
        label="teacher block",
    )
    ax.bar([x + 0.2 for x in xs], [b["latency_ms"] for b in blocks], 0.4, label="chosen")
    for x, b in zip(xs, blocks):
        ax.text(
            x + 0.2, b["latency_ms"], b["choice"], rotation=90, fontsize=7, va="bottom", ha="center"
        )
    ax.set_xticks(list(xs), [b["block"] for b in blocks], rotation=45, ha="right", fontsize=8)
    how = "estimated" if rep["latency"].get("estimated") else "measured"
    ax.set_ylabel(f"latency, {how} in the latency stage (ms)")
    ax.set_title("Chosen candidate per block")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
