"""`make bench`: every benchmark this machine supports, one after another, then their tables.

Each benchmark runs in its own process (a crash or an out-of-memory in one leaves the others, and
every one starts with a clean allocator and compile cache). With no --device, CUDA is used when
present, else the CPU. Results go to <out>/<device>/{optim,bn,train}.{csv,png}; each benchmark
prints its tables as it ends, and the summary tables are printed again last. Ctrl-C or SIGTERM
stops the run once the running benchmark has printed the tables of what it finished.

    python benchmarks/run_all.py                   # everything, on CUDA if present
    python benchmarks/run_all.py --smoke           # tiny sizes: checks that every script runs
    python benchmarks/run_all.py --bench optim,bn --device cuda
    python benchmarks/run_all.py --bench optim --tag r50 --params resnet50   # other options: to the scripts
    python benchmarks/run_all.py --report benchmarks/results/<device>   # tables from CSVs, no runs
"""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository (benchmarks, resfast) importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common.cli import choice_list, device_arg, finish_args
from benchmarks.common.env import device_slug, header_text
from benchmarks.common.results import EXIT_INTERRUPTED, StopOnInterrupt, read_csv
from benchmarks.common.table import Column, Summary, format_table, summary_table

BENCHES = ("optim", "bn", "train")
HERE = Path(__file__).resolve().parent


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--bench",
        type=choice_list(BENCHES, "benchmark"),
        default=list(BENCHES),
        help=f"comma-separated: {', '.join(BENCHES)} (default: all)",
    )
    p.add_argument(
        "--device",
        type=device_arg,
        default=None,
        help="cpu, cuda or cuda:N (default: cuda if present)",
    )
    p.add_argument("--smoke", action="store_true", help="tiny sizes, few repetitions")
    p.add_argument(
        "--out", type=Path, default=None, help="results root (default: benchmarks/results; temp with --smoke)"
    )
    p.add_argument(
        "--compile",
        choices=("auto", "on", "off"),
        default="auto",
        help="torch.compile rows (see each script)",
    )
    p.add_argument("--full", action="store_true", help="print every row's table, not only the summaries")
    p.add_argument(
        "--report",
        type=Path,
        default=None,
        metavar="DIR",
        help="print the tables of the CSVs in DIR (a device folder or a results root) and exit",
    )
    args, args.extra = p.parse_known_args(argv)
    return args


def bench_command(name: str, args: argparse.Namespace) -> list[str]:
    cmd = [
        sys.executable,
        str(HERE / f"bench_{name}.py"),
        "--device",
        str(args.device),
        "--out",
        str(args.out),
    ]
    cmd += ["--compile", args.compile] + (["--smoke"] if args.smoke else [])
    return cmd + args.extra  # anything run_all does not know goes to the scripts (e.g. --tag, --params)


def result_files(folder: Path, name: str) -> list[Path]:
    """A benchmark's CSVs in a device folder: the untagged run first, then tagged ones (name-tag.csv)."""
    return sorted(folder.glob(f"{name}.csv")) + sorted(folder.glob(f"{name}-*.csv"))


def report(folder: Path, benches: Sequence[str] = BENCHES, full: bool = False) -> int:
    """Print the header and tables of every CSV found; returns how many were found."""
    if not folder.is_dir():
        print(f"no results: {folder} is not a folder")
        return 0
    folders = [folder] if any(folder.glob("*.csv")) else sorted(p for p in folder.iterdir() if p.is_dir())
    found = 0
    for where in folders:
        for name in benches:
            module = importlib.import_module(f"benchmarks.bench_{name}")
            for stem, (table, summary) in module.OUTPUTS.items():
                for path in result_files(where, stem):
                    found += print_tables(stem, path, table, summary, full)
    return found


def print_tables(stem: str, path: Path, table: Sequence[Column], summary: Summary, full: bool) -> bool:
    rows = read_csv(path)
    print(f"\n## {stem} ({path})\n")
    if not rows:
        print("no rows")
        return False
    print(header_text(rows[0]) + "\n")
    if full:
        print(format_table(rows, table) + "\n")
    print(summary_table(rows, summary))
    return True


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report is not None:
        return 0 if report(args.report, args.bench, args.full) else 1
    args = finish_args(args)
    results = []
    for name in args.bench:
        cmd = bench_command(name, args)
        print(f"\n=== bench_{name}: {' '.join(cmd)}", flush=True)
        start = time.perf_counter()
        with StopOnInterrupt() as stop:
            bench = subprocess.Popen(cmd)
            bench.wait()
        # Ctrl-C and `timeout` signal the whole process group: the bench was interrupted too and is
        # printing the tables of what it finished; wait for it (only a bench that was not signalled
        # runs to its end).
        rc = bench.wait()
        results.append((name, rc, time.perf_counter() - start))
        if stop.interrupted:
            break
    report(args.out / device_slug(args.device), args.bench, args.full)
    print()
    for name, rc, seconds in results:
        print(f"bench_{name}: {'ok' if rc == 0 else f'FAILED (exit {rc})'} in {seconds:.0f} s")
    if stop.interrupted:
        return EXIT_INTERRUPTED
    return 0 if all(rc == 0 for _, rc, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
