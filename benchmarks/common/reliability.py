"""When a row's figures can be trusted.

A timed row is unreliable when

- the machine was loaded: the 1-minute load average when its path finished was above the number of
  cores plus LOAD_MARGIN. The benchmark's own threads count in the load, up to one per core (torch
  uses every core), so on a quiet machine the load sits at or just below the core count; another
  job busy for half a core or more on average pushes it past the margin; or
- its samples were spread wide: (p80 - p20) / median above SPREAD_LIMIT; or
- its speed-up is over a baseline row that is spread wide (a 4.27 ms baseline with p20-p80
  2.45-92.2 ms once made a resfast row "31.44x").

An unreliable row keeps its median and spread, but its speed-up and % of copy are not shown in the
tables (the CSV keeps every number, and its `reliable` column says why). % of copy also needs the
copy bandwidth, measured once per run: when that measurement's own spread is above SPREAD_LIMIT,
no row's % of copy is shown (an 11-21 GB/s range was once seen within one run).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from benchmarks.common.rows import num

# In a quiet CPU run (load 0.9, 114 optimizer rows, 5-50 samples each) 94% of rows were within 30%;
# the noisy rows this rule exists for spread by 100% and more.
SPREAD_LIMIT = 0.3
LOAD_MARGIN = 0.5


def cores() -> int:
    """The machine's cores: what the (system-wide) load average is compared with."""
    return os.cpu_count() or 1


def current_load() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def spread(row: Mapping[str, Any]) -> float | None:
    """(p80 - p20) / median of a timed row, None when it was not timed."""
    ms, p20, p80 = num(row, "ms"), num(row, "ms_p20"), num(row, "ms_p80")
    if ms is None or p20 is None or p80 is None or ms <= 0:
        return None
    return (p80 - p20) / ms


def _spread_problem(row: Mapping[str, Any]) -> str | None:
    s = spread(row)
    return f"spread {s:.0%} > {SPREAD_LIMIT:.0%}" if s is not None and s > SPREAD_LIMIT else None


def _load_problem(row: Mapping[str, Any], ncores: int) -> str | None:
    load = num(row, "load")
    limit = ncores + LOAD_MARGIN
    return (
        f"load {load:.2f} > {limit:g} ({ncores} cores + {LOAD_MARGIN:g})"
        if load is not None and load > limit
        else None
    )


def mark(rows: Sequence[dict], ncores: int) -> None:
    """Set every timed row's `reliable` to "yes", or "no: " and the reasons (see the module's rule).
    `rows` are one case's, with speed-ups already added."""
    by_path = {r["path"]: r for r in rows}
    for r in rows:
        if r["status"] != "ok":
            continue
        reasons = [_load_problem(r, ncores), _spread_problem(r)]
        baseline = by_path.get(r.get("best_torch"))
        if baseline is not None and baseline is not r and _spread_problem(baseline):
            reasons.append(f"baseline {baseline['path']} {_spread_problem(baseline)}")
        found = [why for why in reasons if why]
        r["reliable"] = "no: " + "; ".join(found) if found else "yes"


def trusted(row: Mapping[str, Any]) -> bool:
    """Whether a row's speed-up may be shown. Rows from CSVs older than the rule have no verdict:
    they are shown as they were."""
    return not str(row.get("reliable") or "").startswith("no")


def copy_trusted(row: Mapping[str, Any]) -> bool:
    """Whether the run's copy bandwidth, hence a row's % of copy, may be shown."""
    s = num(row, "copy_spread")
    return s is None or s <= SPREAD_LIMIT


def why_not(row: Mapping[str, Any]) -> str:
    """The reasons of an unreliable row, without the "no: " prefix."""
    return str(row.get("reliable") or "").removeprefix("no: ")
