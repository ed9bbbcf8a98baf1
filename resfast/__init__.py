"""resfast: faster ResNet training in PyTorch.

Importing the package is cheap: it imports torch only, never Triton or the native extension, and
never queries a GPU. Subpackages (``resfast.optim``, ``resfast.nn``, ``resfast.schedules``) load
their kernels lazily, on first use.
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "backends", "nn", "optim", "schedules"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return import_module(f"resfast.{name}")
    raise AttributeError(f"module 'resfast' has no attribute {name!r}")
