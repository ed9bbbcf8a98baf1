"""Devices, dtypes and the command-line options every benchmark shares."""

from __future__ import annotations

import argparse
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent.parent / "results"  # benchmarks/results: committed figures

DEVICE_CHOICES = ("cpu", "cuda", "cuda:N")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
DTYPE_SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}
# resfast backends worth a row on each device type: those that can run its tensors, at least once built.
RESFAST_BACKENDS = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "triton", "reference")}


def parse_device(text: str) -> torch.device:
    """cpu, cuda or cuda:N; an unknown name or a GPU that is not there is a ValueError saying so."""
    name = text.strip().lower()
    if name != "cpu" and not re.fullmatch(r"cuda(:\d+)?", name):
        raise ValueError(f"unknown device {text!r}; choose from: {', '.join(DEVICE_CHOICES)}")
    device = torch.device(name)
    if device.type == "cpu":
        return device
    if not torch.cuda.is_available():
        raise ValueError(
            f"device {text!r}: CUDA is not available here (torch {torch.__version__}); choose from: cpu"
        )
    index = torch.cuda.current_device() if device.index is None else device.index
    if index >= torch.cuda.device_count():
        raise ValueError(f"device {text!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    return torch.device("cuda", index)


def default_device() -> torch.device:
    return parse_device("cuda" if torch.cuda.is_available() else "cpu")


def parse_choices(text: str, choices: Sequence[str], what: str, aliases: Mapping[str, str] = {}) -> list[str]:
    """A comma-separated selection from `choices` (case-insensitive; 'all' selects every one)."""
    names = [aliases.get(n.strip().lower(), n.strip()) for n in text.split(",") if n.strip()]
    if [n.lower() for n in names] == ["all"]:
        return list(choices)
    lookup = {c.lower(): c for c in choices}
    unknown = [n for n in names if n.lower() not in lookup]
    if unknown or not names:
        given = ", ".join(map(repr, unknown)) or "(nothing)"
        raise ValueError(
            f"unknown {what} {given}; choose from: {', '.join(choices)} (comma-separated, or 'all')"
        )
    return list(dict.fromkeys(lookup[n.lower()] for n in names))


def choice_list(choices: Sequence[str], what: str, aliases: Mapping[str, str] = {}) -> Callable[[str], list]:
    """An argparse `type` for a comma-separated selection; its error lists the choices."""

    def parse(text: str) -> list[str]:
        try:
            return parse_choices(text, choices, what, aliases)
        except ValueError as e:  # argparse shows an ArgumentTypeError's message as it is
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = what  # argparse names the type in some messages
    return parse


def device_arg(text: str) -> torch.device:
    try:
        return parse_device(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def tag_arg(text: str) -> str:
    # Letters, digits, '.', '_' and '-' only: the tag becomes part of file names.
    if not re.fullmatch(r"[A-Za-z0-9._-]+", text):
        raise argparse.ArgumentTypeError(f"tag {text!r}: use letters, digits, '.', '_' and '-' only")
    return text


def result_name(bench: str, args: argparse.Namespace) -> str:
    """The file stem of a run's CSV and PNG: the benchmark, then its --tag if any."""
    return f"{bench}-{args.tag}" if args.tag else bench


def base_parser(
    description: str, default_dtypes: str = "float32,bfloat16", dtypes: Sequence[str] = tuple(DTYPES)
) -> argparse.ArgumentParser:
    """The options every benchmark has; each script adds its own case and path selections."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument(
        "--device", type=device_arg, default=None, help="cpu, cuda or cuda:N (default: cuda if present)"
    )
    p.add_argument(
        "--dtype",
        type=choice_list(dtypes, "dtype", DTYPE_ALIASES),
        default=default_dtypes,  # argparse passes a string default through `type`
        help=f"comma-separated: {', '.join(dtypes)} (or fp32, bf16, fp16); default {default_dtypes}",
    )
    p.add_argument(
        "--smoke", action="store_true", help="tiny sizes and few repetitions: checks the script runs"
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results root; files go to OUT/<device>/ (default: benchmarks/results; a temp dir with --smoke)",
    )
    p.add_argument(
        "--tag",
        type=tag_arg,
        default=None,
        help="name results <bench>-<tag>.csv/.png, so that runs of different selections sit side by side",
    )
    p.add_argument(
        "--compile",
        choices=("auto", "on", "off"),
        default="auto",
        help="time torch.compile rows: auto = on CUDA only (compiling takes minutes on a small CPU)",
    )
    return p


def add_paths_option(p: argparse.ArgumentParser, paths: Sequence[str]) -> None:
    p.add_argument(
        "--paths",
        type=choice_list(paths, "path"),
        default=None,
        help=f"comma-separated subset of: {', '.join(paths)} (default: all that apply to the device)",
    )


def default_paths(paths: Sequence[str], device: torch.device) -> list[str]:
    """Every path but resfast backends for another device type (resfast-cuda on a CPU, ...)."""
    mine = {f"resfast-{b}" for b in RESFAST_BACKENDS[device.type]}
    return [p for p in paths if not p.startswith("resfast-") or p in mine]


def finish_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill in the defaults that depend on the machine (device, output folder)."""
    args.device = args.device or default_device()
    args.dtypes = [DTYPES[name] for name in getattr(args, "dtype", ())]
    if args.out is None:
        # Smoke runs check that a script works; their numbers must never overwrite real results.
        args.out = Path(tempfile.gettempdir()) / "resfast-bench-smoke" if args.smoke else RESULTS
    return args
