"""Marks every test that needs a GPU with `gpu`, so that a lent GPU machine runs just those in one call:

    pytest -m gpu -n 8 tests     # (pytest-xdist; benchmarks/gpu_check.sh does this)

A test needs a GPU when it is parametrised with the `cuda` device or backend, or when it carries a
skip whose reason names a CUDA device (how every GPU-only test here skips without one). Nothing here
queries a GPU: marking reads only the collected parameters and markers.
"""

from __future__ import annotations

import pytest


def _needs_gpu(item: pytest.Item) -> bool:
    callspec = getattr(item, "callspec", None)
    if callspec is not None and "cuda" in [v for v in callspec.params.values() if isinstance(v, str)]:
        return True
    return any(
        "CUDA device" in str(marker.kwargs.get("reason", ""))
        for marker in item.iter_markers()
        if marker.name in ("skip", "skipif")
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _needs_gpu(item):
            item.add_marker(pytest.mark.gpu)


@pytest.fixture(scope="module", autouse=True)
def _fresh_dynamo_per_module():
    """torch.compile's caches are per process and count recompiles per code object (limit 8): a
    module that compiles optimizer steps must not leave another module at that limit."""
    yield
    import torch

    torch._dynamo.reset()
