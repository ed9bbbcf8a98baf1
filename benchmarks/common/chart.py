"""Rows as PNG bar charts."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common.rows import num


@dataclass(frozen=True)
class Chart:
    """A PNG of grouped horizontal bars: one panel per value of `panel_keys`, one group of bars per
    value of `group_keys`, one bar colour per path; only rows that were checked and timed."""

    panel_keys: tuple[str, ...]
    group_keys: tuple[str, ...]
    value_key: str
    xlabel: str


def _label(row: Mapping[str, Any], keys: Sequence[str]) -> str:
    return " ".join(str(row.get(k, "")) for k in keys)


def bar_chart(rows: Sequence[Mapping[str, Any]], chart: Chart, title: str, path: Path) -> Path | None:
    """Write the chart; returns None (and says why) when matplotlib is missing or nothing was timed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        print(f"no chart: matplotlib cannot be imported ({e})")
        return None
    timed = [r for r in rows if r.get("status") == "ok" and num(r, chart.value_key) is not None]
    if not timed:
        print(f"no chart: no timed rows for {path.name}")
        return None
    panels = list(dict.fromkeys(_label(r, chart.panel_keys) for r in timed))
    series = list(dict.fromkeys(str(r["path"]) for r in timed))
    ncols = min(2, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    tallest = max(
        len({_label(r, chart.group_keys) for r in timed if _label(r, chart.panel_keys) == p}) for p in panels
    )
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(7.5 * ncols, nrows * (1.2 + 0.22 * tallest * len(series))), squeeze=False
    )
    colours = plt.get_cmap("tab10")
    for ax, panel in zip(axes.flat, panels, strict=False):
        mine = [r for r in timed if _label(r, chart.panel_keys) == panel]
        groups = list(dict.fromkeys(_label(r, chart.group_keys) for r in mine))
        height = 0.8 / len(series)
        for s, name in enumerate(series):
            values = {_label(r, chart.group_keys): num(r, chart.value_key) for r in mine if r["path"] == name}
            ys = [g + s * height for g, group in enumerate(groups) if group in values]
            ax.barh(ys, [values[g] for g in groups if g in values], height, color=colours(s % 10), label=name)
        ax.set_yticks([g + 0.4 - height / 2 for g in range(len(groups))], groups, fontsize=8)
        ax.invert_yaxis()
        ax.set_title(panel, fontsize=9)
        ax.set_xlabel(chart.xlabel, fontsize=8)
        ax.grid(axis="x", alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=min(len(series), 4), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=9, y=0.0, va="bottom")
    fig.tight_layout(rect=(0, 0.03, 1, 1 - 0.35 / (nrows * (1.2 + 0.22 * tallest * len(series)))))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
