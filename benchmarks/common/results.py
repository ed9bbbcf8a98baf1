"""One benchmark's output: its CSV, rewritten as each path finishes, and its printed tables and chart."""

from __future__ import annotations

import csv
import os
import signal
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import reliability
from benchmarks.common.chart import Chart, bar_chart
from benchmarks.common.env import ENV_COLUMNS, Env, header_text
from benchmarks.common.rows import TIMING_COLUMNS, add_speedups, num
from benchmarks.common.table import Column, Summary, format_table, summary_table


def _csv_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


@dataclass
class Report:
    """One benchmark's output: <out>/<device>/<name>.csv holds every path finished so far (a run cut
    short keeps what it measured), then `finish` prints the tables and writes the PNG."""

    name: str
    env: Env
    out_root: Path
    columns: Sequence[str]  # the case's columns (what was run), then TIMING_COLUMNS
    metrics: Sequence[str] = ()  # extra measured columns (e.g. img/s)
    rows: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.dir = self.out_root / self.env.slug
        self.dir.mkdir(parents=True, exist_ok=True)
        self.csv_path = self.dir / f"{self.name}.csv"
        self._all_columns = [*self.columns, *TIMING_COLUMNS, *self.metrics, *ENV_COLUMNS]
        self._write()

    def add(self, case_rows: Iterable[dict], baselines: Collection[str]) -> None:
        """Take one case's rows as its paths finish: each is marked, written and printed at once.
        A later row can change an earlier one's speed-up and verdict (a faster baseline), so the
        whole case is marked again and the CSV rewritten each time."""
        case: list[dict] = []
        for row in case_rows:
            row["load"] = reliability.current_load()
            case.append(row)
            add_speedups(case, baselines)
            reliability.mark(case, reliability.cores())
            self._write(case)
            _progress(row, self.columns)
        self.rows += case

    def _write(self, pending: Sequence[dict] = ()) -> None:
        # Written beside, then renamed over: a kill mid-write leaves the previous complete file.
        env = self.env.columns()
        partial = self.csv_path.with_suffix(".csv.partial")
        with partial.open("w", newline="") as f:
            writer = csv.DictWriter(f, self._all_columns, extrasaction="ignore")
            writer.writeheader()
            for row in [*self.rows, *pending]:
                writer.writerow({k: _csv_value(v) for k, v in {**row, **env}.items()})
        os.replace(partial, self.csv_path)

    def finish(
        self, table: Sequence[Column], summary: Summary, chart: Chart | None, extra: Sequence[str] = ()
    ) -> None:
        print()
        print(format_table(self.rows, table))
        print()
        print(header_text(self.env.columns(), extra))
        print()
        print(summary_table(self.rows, summary), flush=True)
        png = None
        if chart is not None:
            title = f"{self.env.name} · torch {self.env.torch} · {self.env.date}"
            png = bar_chart(self.rows, chart, title, self.dir / f"{self.name}.png")
        print(f"\nwrote {self.csv_path}" + (f" and {png}" if png else ""), flush=True)


def _progress(row: Mapping[str, Any], case_columns: Sequence[str]) -> None:
    case = " ".join(str(row.get(k, "")) for k in case_columns)
    ms = num(row, "ms")
    timing = f"{ms:9.4g} ms" if ms is not None else " " * 12
    verdict = "" if reliability.trusted(row) else f" [unreliable: {reliability.why_not(row)}]"
    print(
        f"{case:<44} {row['path']:<20} {timing}  {row['status']} {row.get('note') or ''}{verdict}", flush=True
    )


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


class StopOnInterrupt:
    """Ctrl-C, or SIGTERM (`kill`, `timeout`), ends the block it guards instead of the program, so
    that what was measured is still printed. `interrupted` says whether it happened."""

    interrupted = False

    def __enter__(self) -> StopOnInterrupt:
        self._previous = signal.signal(signal.SIGTERM, _interrupt)
        return self

    def __exit__(self, kind: type | None, value: object, traceback: object) -> bool:
        signal.signal(signal.SIGTERM, self._previous)
        if kind is not None and issubclass(kind, KeyboardInterrupt):
            self.interrupted = True
            print("\ninterrupted: what follows covers only the paths finished so far", flush=True)
            return True
        return False


EXIT_INTERRUPTED = 130  # a script stopped by StopOnInterrupt exits with this, as shells report Ctrl-C
