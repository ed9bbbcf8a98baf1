"""What a run shows and leaves behind: the progress bar, metrics.jsonl, summary.json and curves.png."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["Bar", "plot_curves", "write_json", "write_metrics"]


class Bar:
    """One tqdm bar per epoch, counting images, when stderr is a terminal; a no-op when disabled (other
    ranks, --no-progress).

    Elsewhere (a log file, a pipe) a redrawn bar would write an update after update, separated by
    carriage returns, into the log: there the epoch shows as one line, written when it ends.
    """

    _FORMAT = "{desc}: {n_fmt}/{total_fmt} img [{elapsed}, {rate_fmt}{postfix}]"

    def __init__(self, enabled: bool, epoch: int, epochs: int, total: int) -> None:
        self._enabled, self._desc, self._total = enabled, f"epoch {epoch}/{epochs}", total
        self._images, self._start = 0, time.perf_counter()
        self._bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(
                total=total,
                desc=self._desc,
                unit="img",
                unit_scale=True,
                leave=True,
                file=sys.stderr,  # stdout is kept for the summary's JSON line
                dynamic_ncols=True,
            )

    def update(self, images: int, **postfix: Any) -> None:
        self._images += images
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)
            self._bar.update(images)

    def close(self, **postfix: Any) -> None:
        if self._bar is not None:
            self._bar.set_postfix(postfix, refresh=False)
            self._bar.close()
        elif self._enabled:
            from tqdm import tqdm

            line = tqdm.format_meter(
                self._images,
                self._total,
                time.perf_counter() - self._start,
                prefix=self._desc,
                unit="img",
                unit_scale=True,
                postfix=", ".join(f"{k}={v}" for k, v in postfix.items()),
                bar_format=self._FORMAT,
            )
            print(line, file=sys.stderr, flush=True)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, record: dict[str, Any]) -> None:
    _atomic_write(path, json.dumps(record, indent=2) + "\n")


def write_metrics(path: Path, history: Sequence[dict[str, Any]]) -> None:
    """metrics.jsonl, one line per epoch, rewritten whole: after a resume it holds exactly the
    checkpoint's epochs and those trained since, never a line from an epoch that was lost."""
    _atomic_write(path, "".join(json.dumps(record) + "\n" for record in history))


def plot_curves(path: Path, history: Sequence[dict[str, Any]], trace: Sequence[Sequence[float]]) -> None:
    """Loss and accuracy per epoch, LR and batch size per step, all against samples seen."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

    fig: Any = Figure(figsize=(10, 6.5), layout="constrained")
    (loss, acc), (lr, batch) = fig.subplots(2, 2, sharex=True)
    x = [r["samples"] for r in history]
    for split, style in (("train", "-o"), ("test", "-s")):
        loss.plot(x, [r[f"{split}_loss"] for r in history], style, ms=3, label=split)
        acc.plot(x, [100 * r[f"{split}_acc"] for r in history], style, ms=3, label=split)
    # A step's LR and batch size hold from the sample it starts at: steps, not slanted lines.
    starts = [t for t, _, _ in trace]
    lr.plot(starts, [v for _, v, _ in trace], drawstyle="steps-post")
    batch.plot(starts, [b for _, _, b in trace], drawstyle="steps-post")
    for ax, label in ((loss, "loss"), (acc, "accuracy (%)"), (lr, "learning rate"), (batch, "batch size")):
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    for ax in (lr, batch):
        ax.set_xlabel("samples seen")
    loss.set_yscale("log")
    loss.legend()
    acc.legend()
    if history:
        last = history[-1]
        fig.suptitle(f"test accuracy {100 * last['test_acc']:.2f}% after {last['samples']} samples")
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)  # savefig picks the format from the suffix
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
