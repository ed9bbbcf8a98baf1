"""A benchmark's rows: their timing columns, reading numbers back, speed-ups within a case."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

TIMING_COLUMNS = (
    "path",
    "status",
    "ms",
    "ms_p20",
    "ms_p80",
    "gbps",
    "pct_copy",
    "speedup",
    "best_torch",
    "reliable",  # "yes", or "no: " and why (reliability.mark)
    "load",  # 1-minute load average when the path finished
    "warmup_s",
    "peak_mib",
    "note",
)


def num(row: Mapping[str, Any], key: str) -> float | None:
    """A row's number, whether the row was just made or read back from a CSV."""
    value = row.get(key)
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def add_speedups(rows: list[dict], baselines: Collection[str]) -> None:
    """speedup = (fastest correct PyTorch path's ms) / (this row's ms), within one case's rows."""
    timed = [r for r in rows if r["status"] == "ok" and r["path"] in baselines]
    if not timed:
        return
    best = min(timed, key=lambda r: r["ms"])
    for r in rows:
        if r["status"] == "ok":
            r["speedup"] = best["ms"] / r["ms"]
            r["best_torch"] = best["path"]
