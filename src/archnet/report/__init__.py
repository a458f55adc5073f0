"""A run's report: its figures (``figures``), report.md (``markdown``), the plot (``plots``)
and the terminal summary (``summary``); :func:`write_report` writes the files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from archnet.report.figures import POOR_PREDICTION, ReportInputs, build_report
from archnet.report.markdown import faster, kb, mean_std, render_markdown
from archnet.report.plots import plot_blocks

__all__ = [
    "POOR_PREDICTION",
    "ReportInputs",
    "build_report",
    "faster",
    "kb",
    "mean_std",
    "plot_blocks",
    "render_markdown",
    "write_report",
]


def write_report(rep: dict[str, Any], out_dir: Path) -> list[str]:
    """report.json, report.md and blocks.png in ``out_dir``; returns the file names."""
    (out_dir / "report.json").write_text(json.dumps(rep, indent=2))
    (out_dir / "report.md").write_text(render_markdown(rep))
    plot_blocks(rep, out_dir / "blocks.png")
    return ["report.json", "report.md", "blocks.png"]
