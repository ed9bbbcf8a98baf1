"""Errors in what the user asked for, as opposed to bugs.

A run that cannot start as asked (a setting the chosen optimizer or schedule rejects, a missing or
malformed dataset, a checkpoint that does not fit, an output folder holding another run, a backend
this machine lacks) raises a `UserError`. The command line prints its message as one line and exits
with status 2, as argparse does for a bad flag; any other exception is a bug and keeps its traceback.
Each concrete class is also the built-in exception a Python caller would expect.
"""

from __future__ import annotations

__all__ = ["SettingError", "UserError", "UserFileNotFoundError"]


class UserError(Exception):
    """Marks an exception whose message tells the user what to change; never raised itself."""


class SettingError(UserError, ValueError):
    """A setting, or a file it points to, that the run cannot use."""


class UserFileNotFoundError(UserError, FileNotFoundError):
    """A file or folder a setting names that is not there."""
