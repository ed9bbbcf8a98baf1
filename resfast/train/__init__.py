"""The reference training script: ``python -m resfast.train`` (``resfast-train``, ``make train``).

``run(Config(...))`` trains in-process and returns the summary; ``main()`` is the command line. See
docs/train.md.
"""

import json
import sys

from resfast.train.config import PROG, Config, parse_args
from resfast.train.errors import UserError
from resfast.train.loop import run

__all__ = ["Config", "UserError", "main", "parse_args", "run"]


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and train; rank 0 prints the summary as the last line of stdout.

    A user error (bad settings, data, checkpoint, --out or backend) ends the command with its message
    on one line and exit status 2, as a bad flag does; anything else is a bug and shows its traceback.
    """
    try:
        summary = run(parse_args(argv))
    except UserError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        sys.exit(2)
    if summary is not None:
        compiling = f", {summary['compile_time_s']:.1f} s compiling" if summary["config"]["compile"] else ""
        print(
            f"test accuracy {summary['test_acc']:.2%} after {summary['epochs']} epochs "
            f"({summary['samples']} samples, {summary['train_time_s']:.1f} s of training{compiling})",
            f"curves: {summary['out']}/curves.png",
            sep="\n",
        )
        print(json.dumps(summary), flush=True)
