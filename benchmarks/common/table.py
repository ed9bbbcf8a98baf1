"""Rows as Markdown tables: the full table (one line per path) and the summary (one per case)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from benchmarks.common import reliability
from benchmarks.common.rows import num


@dataclass(frozen=True)
class Column:
    header: str
    render: Callable[[Mapping[str, Any]], str]


def col(key: str, header: str | None = None, spec: str | None = None) -> Column:
    """A table column showing row[key], formatted with `spec` when it is a number."""

    def render(row: Mapping[str, Any]) -> str:
        value = num(row, key) if spec else None
        if value is not None:
            return format(value, spec)
        text = row.get(key)
        return "" if text is None else str(text)

    return Column(header or key, render)


def speedup_column() -> Column:
    """The speed-up over the best PyTorch path, '?' where the row is unreliable."""
    plain = col("speedup", "x best torch", ".2f")
    return Column(plain.header, lambda row: plain.render(row) if reliability.trusted(row) else "?")


def pct_copy_column() -> Column:
    """% of the copy bandwidth, '?' where the row or the run's copy measurement is unreliable."""
    plain = col("pct_copy", "% copy", ".0f")

    def render(row: Mapping[str, Any]) -> str:
        text = plain.render(row)
        return text if not text or (reliability.trusted(row) and reliability.copy_trusted(row)) else "?"

    return Column(plain.header, render)


def fmt_ms(ms: float) -> str:
    """Milliseconds with 3-4 significant digits and never an exponent (1500, 21.3, 0.0512)."""
    return f"{ms:.0f}" if ms >= 1000 else f"{ms:.3g}"


def ms_column(unit: str = "ms") -> Column:
    """The median with the 20th-80th percentile spread, in ms or µs (rows hold ms)."""
    scale = {"ms": 1.0, "µs": 1e3}[unit]

    def render(row: Mapping[str, Any]) -> str:
        ms, lo, hi = num(row, "ms"), num(row, "ms_p20"), num(row, "ms_p80")
        if ms is None or lo is None or hi is None:
            return ""
        return f"{fmt_ms(ms * scale)} ({fmt_ms(lo * scale)}-{fmt_ms(hi * scale)})"

    return Column(f"{unit} (p20-p80)", render)


def status_column() -> Column:
    """The status, with the reason for anything but ok (a WRONG row says what disagreed)."""

    def render(row: Mapping[str, Any]) -> str:
        status, note = str(row.get("status", "")), str(row.get("note") or "")
        if status == "ok" or not note:
            return status
        # The CSV keeps the whole reason; the table shows its start.
        return f"{status}: {note[:100]}..." if len(note) > 100 else f"{status}: {note}"

    return Column("status", render)


def note_column() -> Column:
    """The note of a timed row (e.g. a compiled path's graph breaks); other rows show theirs in status."""

    def render(row: Mapping[str, Any]) -> str:
        return str(row.get("note") or "") if row.get("status") == "ok" else ""

    return Column("note", render)


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[Column]) -> str:
    """A Markdown table (pipes escaped), readable in a terminal and pasteable into RESULTS.md."""
    lines = ["| " + " | ".join(c.header for c in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [c.render(row).replace("|", "\\|") for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


@dataclass(frozen=True)
class Summary:
    """A compact table: one line per case, one column per path, and the best resfast speed-up."""

    case_keys: tuple[str, ...]
    cell: Callable[[Mapping[str, Any]], str]  # what a checked and timed row shows


def summary_table(rows: Sequence[Mapping[str, Any]], summary: Summary) -> str:
    cases: dict[tuple, dict[str, Mapping[str, Any]]] = {}
    for row in rows:
        cases.setdefault(tuple(str(row.get(k, "")) for k in summary.case_keys), {})[str(row["path"])] = row
    paths = list(dict.fromkeys(str(row["path"]) for row in rows))
    lines = [
        "| " + " | ".join([*summary.case_keys, *paths, "best resfast vs best torch"]) + " |",
        "|" + "---|" * (len(summary.case_keys) + len(paths) + 1),
    ]
    for key, by_path in cases.items():
        cells = [_summary_cell(by_path.get(p), summary) for p in paths]
        lines.append("| " + " | ".join([*key, *cells, _best_resfast(by_path.values())]) + " |")
    return "\n".join(lines + _reliability_notes(rows))


def _summary_cell(row: Mapping[str, Any] | None, summary: Summary) -> str:
    if row is None:
        return ""
    status = row.get("status")
    if status != "ok":
        return "-" if status == "SKIP" else str(status)
    return summary.cell(row) + ("" if reliability.trusted(row) else " unreliable")


def _best_resfast(rows: Iterable[Mapping[str, Any]]) -> str:
    timed = [r for r in rows if str(r["path"]).startswith("resfast") and num(r, "speedup") is not None]
    if not timed:
        return ""
    # The fastest, reliable or not: a slower reliable row shown here would hide that a faster
    # resfast path may exist (its figure just cannot be trusted).
    best = max(timed, key=lambda r: num(r, "speedup") or 0.0)
    if not reliability.trusted(best):
        return f"unreliable ({best['path']}: {reliability.why_not(best)})"
    return f"{num(best, 'speedup'):.2f}x ({best['path']} vs {best.get('best_torch', '')})"


def _reliability_notes(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Lines under a summary saying what was not shown and why."""
    timed = [r for r in rows if r.get("status") == "ok"]
    notes = []
    unreliable = [r for r in timed if not reliability.trusted(r)]
    if unreliable:
        notes.append(
            f"{len(unreliable)} of {len(timed)} timed rows unreliable (load average above the core count "
            f"+ {reliability.LOAD_MARGIN:g}, "
            f"or p20-p80 spread above {reliability.SPREAD_LIMIT:.0%} of the median, theirs or their "
            "baseline's): speed-ups and % copy not shown; the CSV's `reliable` column says why."
        )
    if any(num(r, "pct_copy") is not None and not reliability.copy_trusted(r) for r in timed):
        notes.append(
            f"% copy not shown: the copy bandwidth's own p20-p80 spread was above "
            f"{reliability.SPREAD_LIMIT:.0%} of its median."
        )
    return ["", *notes] if notes else []


def ms_pct_cell(row: Mapping[str, Any]) -> str:
    """ms and % of copy bandwidth (when reliable), for the kernel benchmarks' summaries."""
    ms, pct = num(row, "ms"), num(row, "pct_copy")
    shown = pct is not None and reliability.trusted(row) and reliability.copy_trusted(row)
    return ("" if ms is None else f"{fmt_ms(ms)} ms") + (f" ({pct:.0f}%)" if shown else "")
