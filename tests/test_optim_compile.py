"""torch.compile(opt.step) compiled from the very first step, as docs/stack.md shows it: quiet (no
warning, no dynamo log record beyond those torch's own optimizer causes) and compiled once more when
the state appears, never again. CPU only; backend="eager" keeps it fast (the counts are dynamo's)."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from torch import nn

import resfast.optim
from resfast import backends
from tests.optim_cases import OPTIMIZERS

STEPS = 5


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _docs_loop(optimizer: torch.optim.Optimizer, model: nn.Module, compile: bool = True) -> list[int]:
    """The loop of docs/stack.md on the CPU; dynamo's count of compiled frames after each step."""
    from torch._dynamo.utils import counters

    compiled_step = torch.compile(optimizer.step, backend="eager") if compile else optimizer.step
    gen = torch.Generator().manual_seed(0)
    frames = []
    for i in range(STEPS):
        x, y = torch.randn(4, 8, generator=gen), torch.randint(0, 4, (4,), generator=gen)
        nn.functional.cross_entropy(model(x), y).backward()
        compiled_step()
        optimizer.zero_grad()
        optimizer.param_groups[0]["lr"].fill_(0.1 / (i + 2))  # a tensor lr: no recompile
        frames.append(counters["frames"]["total"])
    return frames


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def _quiet_run(make_optimizer) -> tuple[list[int], list[str]]:
    """Compiled frames after each step, and every warning or dynamo log record the loop produced."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    handler = _Records()
    loggers = [logging.getLogger(name) for name in ("torch", "torch._dynamo")]  # dynamo's does not propagate
    for logger in loggers:
        logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = _model()
            frames = _docs_loop(make_optimizer(model), model)
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    return frames, [str(w.message) for w in caught] + [r.getMessage() for r in handler.records]


@pytest.fixture(scope="module", autouse=True)
def _torch_loop_first():
    """torch's own optimizer in the same loop first: dynamo logs some notes once per process (e.g. that
    the step's profiler record_function is ignored); they are torch's, not resfast's."""
    _quiet_run(lambda model: torch.optim.SGD(model.parameters(), lr=torch.tensor(0.1), momentum=0.9))


KWARGS = {"SGD": {"momentum": 0.9}, "RMSprop": {"momentum": 0.5, "centered": True}}


def _resfast(name: str, backend: str):
    return lambda model: getattr(resfast.optim, name)(
        model.parameters(), lr=torch.tensor(0.1), backend=backend, **KWARGS.get(name, {})
    )


def _skip_unless_available(backend: str) -> None:
    try:
        backends.choose("cpu", torch.float32, backend)
    except backends.BackendUnavailable as e:
        pytest.skip(str(e))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_compiled_step_from_the_first_step_is_quiet_and_recompiles_once(name):
    """The documented loop on the `cpu` backend (the default here): one compile, one recompile when the
    first step has created the state, then none; nothing printed."""
    _skip_unless_available("cpu")
    frames, noise = _quiet_run(_resfast(name, "cpu"))
    assert noise == []
    assert frames[-1] <= 2, frames


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_compiled_step_on_other_backends_is_quiet(backend):
    """The Triton launchers run behind one graph break, the reference traces: quiet too, and nothing is
    compiled again after the second step (the state exists)."""
    _skip_unless_available(backend)
    frames, noise = _quiet_run(_resfast("SGD", backend))
    assert noise == []
    assert frames[1] == frames[-1], frames


@pytest.mark.parametrize("name", ["SGD", "Adam"])
def test_compiled_step_with_clipping_is_quiet_and_matches_eager(name):
    """max_grad_norm's norm (torch's get_total_norm) and clip factor trace with the step: the same
    compile counts, and the params of the eager loop."""
    _skip_unless_available("cpu")

    def make(model):
        return getattr(resfast.optim, name)(model.parameters(), lr=torch.tensor(0.1), max_grad_norm=0.05)

    frames, noise = _quiet_run(make)
    assert noise == []
    assert frames[-1] <= 2, frames
    eager_model, compiled_model = _model(), _model()
    eager, compiled = make(eager_model), make(compiled_model)
    torch._dynamo.reset()
    _docs_loop(compiled, compiled_model)
    _docs_loop(eager, eager_model, compile=False)
    assert compiled.grad_norm is not None and compiled.grad_norm > 0.05  # the runs clipped
    for a, b in zip(compiled_model.parameters(), eager_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
