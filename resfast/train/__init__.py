"""The reference training script: ``python -m resfast.train`` (``resfast-train``, ``make train``).

``run(Config(...))`` trains in-process and returns the summary; ``main()`` is the command line. See
docs/train.md.
"""

import json

from resfast.train.config import Config, parse_args
from resfast.train.loop import run

__all__ = ["Config", "main", "parse_args", "run"]


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and train; rank 0 prints the summary as the last line of stdout."""
    summary = run(parse_args(argv))
    if summary is not None:
        print(
            f"test accuracy {summary['test_acc']:.2%} after {summary['epochs']} epochs "
            f"({summary['samples']} samples, {summary['train_time_s']:.1f} s of training)",
            f"curves: {summary['out']}/curves.png",
            sep="\n",
        )
        print(json.dumps(summary), flush=True)
