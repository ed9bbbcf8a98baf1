"""Where and with what a run is made: device name, versions, commit, date, load, copy bandwidth."""

from __future__ import annotations

import gc
import importlib.metadata
import os
import platform
import re
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import timing

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Env:
    """Where and with what a run was made; every row carries it."""

    device: torch.device
    name: str
    slug: str
    torch: str
    triton: str
    commit: str
    date: str
    load: str  # 1-minute load average at the start: CPU figures from a busy machine are noisy
    copy_gbps: float  # device-to-device copy bandwidth measured at the start of the run
    copy_spread: float  # the spread of that measurement (timing.Timing.spread)

    def columns(self) -> dict[str, Any]:
        return {
            "device": self.name,
            "torch": self.torch,
            "triton": self.triton,
            "commit": self.commit,
            "date": self.date,
            "load_avg": self.load,
            "copy_gbps": self.copy_gbps,
            "copy_spread": self.copy_spread,
        }


ENV_COLUMNS = ("device", "torch", "triton", "commit", "date", "load_avg", "copy_gbps", "copy_spread")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{_cpu_name()} ({torch.get_num_threads()} threads)"


def slugify(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def device_slug(device: torch.device) -> str:
    """Folder name of a device's results: the GPU's name, or cpu-<model> (CPU names lack 'cpu')."""
    if device.type == "cuda":
        return slugify(torch.cuda.get_device_name(device))
    return "cpu-" + slugify(_cpu_name()).removeprefix("cpu-")


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def start(device: torch.device, smoke: bool, extra: Sequence[str] = ()) -> Env:
    """Begin a run: freeze what is alive (torch's modules) out of the garbage collector's scans,
    measure the copy bandwidth and print the header."""
    # paths.release() collects garbage after every path; without the freeze each collection would
    # scan every object torch created at import (~0.25 s each on a small CPU).
    gc.freeze()
    load = f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "unknown"
    copy_gbps, copy_spread = timing.copy_bandwidth(device, smoke)
    env = Env(
        device=device,
        name=device_name(device),
        slug=device_slug(device),
        torch=torch.__version__,
        triton=_version("triton"),
        commit=_commit(),
        date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        load=load,
        copy_gbps=copy_gbps,
        copy_spread=copy_spread,
    )
    print(header_text(env.columns(), extra), flush=True)
    return env


def header_text(env: Mapping[str, Any], extra: Sequence[str] = ()) -> str:
    """The lines that say where and with what figures were measured (`env`: Env.columns() or a CSV row)."""
    spread = env.get("copy_spread")  # absent from CSVs written before the reliability rule
    spread_text = f" (p20-p80 spread {float(spread):.0%})" if spread not in (None, "") else ""
    lines = [
        f"device: {env['device']}",
        f"torch {env['torch']}, triton {env['triton']}, resfast commit {env['commit']}, {env['date']}, "
        f"load average {env.get('load_avg', 'unknown')} at the start",
        f"device-to-device copy bandwidth (read + write): {float(env['copy_gbps']):.1f} GB/s{spread_text}",
        *extra,
    ]
    return "\n".join(lines)
