"""Bad inputs to BatchNormAddReLU / batch_norm_add_relu: clear errors naming the offending shapes,
dtypes or devices, raised before any running stat (or num_batches_tracked) changes."""

from __future__ import annotations

import pytest
import torch

from resfast.backends import BackendUnavailable, implementing
from resfast.nn import BatchNormAddReLU
from resfast.nn.functional import batch_norm_add_relu

# (id, x, residual, exception, message pattern) for a module of 3 channels in training mode.
MODULE_ERRORS = [
    (
        "channels",
        torch.randn(2, 4, 3, 3),
        None,
        ValueError,
        r"shape \(3,\) but the input of shape \(2, 4, 3, 3\) has 4",
    ),
    ("rank-5", torch.randn(2, 3, 2, 2, 2), None, ValueError, r"got 5D input of shape \(2, 3, 2, 2, 2\)"),
    ("rank-1", torch.randn(3), None, ValueError, r"got 1D input"),
    (
        "residual-shape",
        torch.randn(2, 3, 3, 3),
        torch.randn(2, 3, 3, 4),
        ValueError,
        r"residual has shape \(2, 3, 3, 4\) but the input has shape \(2, 3, 3, 3\)",
    ),
    (
        "residual-dtype",
        torch.randn(2, 3, 3, 3),
        torch.randn(2, 3, 3, 3, dtype=torch.float16),
        TypeError,
        r"residual has dtype torch.float16 but the input \(shape \(2, 3, 3, 3\)\) has torch.float32",
    ),
    (
        "residual-device",
        torch.randn(2, 3, 3, 3),
        torch.empty(2, 3, 3, 3, device="meta"),
        ValueError,
        r"residual \(shape \(2, 3, 3, 3\)\) is on meta but the input \(shape \(2, 3, 3, 3\)\) is on cpu",
    ),
    (
        "integer-input",
        torch.ones(2, 3, 3, 3, dtype=torch.int64),
        None,
        TypeError,
        "floating-point input, got torch.int64",
    ),
    (
        "one-value-per-channel",
        torch.randn(1, 3, 1, 1),
        None,
        ValueError,
        "Expected more than 1 value per channel",
    ),
    (
        "one-value-per-channel-2d",
        torch.randn(1, 3),
        None,
        ValueError,
        "Expected more than 1 value per channel",
    ),
]


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("_, x, residual, error, pattern", MODULE_ERRORS, ids=[e[0] for e in MODULE_ERRORS])
def test_module_errors_leave_state_unchanged(backend, _, x, residual, error, pattern) -> None:
    m = BatchNormAddReLU(3, momentum=None, backend=backend)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(error, match=pattern):
        m(x, residual)
    for name, value in m.state_dict().items():
        assert torch.equal(value, before[name]), f"{name} changed"


def test_unavailable_backend_leaves_state_unchanged() -> None:
    m = BatchNormAddReLU(3, backend="triton", dtype=torch.float64)
    with pytest.raises(BackendUnavailable, match="float64"):
        m(torch.randn(4, 3, dtype=torch.float64))
    assert m.num_batches_tracked.item() == 0


def _stats() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(3), torch.ones(3)


FUNCTIONAL_ERRORS = [
    (
        "eval-without-running-stats",
        dict(running_mean=None, running_var=None, training=False),
        RuntimeError,
        "running_mean must be defined in evaluation mode",
    ),
    ("mean-without-var", dict(running_var=None, training=True), ValueError, "both be given or both be None"),
    (
        "running-var-shape",
        dict(running_var=torch.ones(4)),
        ValueError,
        r"running_var has shape \(4,\) but the input of shape \(2, 3, 4\)",
    ),
    (
        "weight-shape",
        dict(weight=torch.ones(2)),
        ValueError,
        r"weight has shape \(2,\) but the input of shape \(2, 3, 4\) has 3",
    ),
    (
        "bias-device",
        dict(bias=torch.empty(3, device="meta")),
        ValueError,
        "bias is on meta but the input is on cpu",
    ),
    (
        "eps-zero-in-training",
        dict(eps=0.0, training=True),
        ValueError,
        "eps must be positive during training",
    ),
    ("unknown-backend", dict(backend="fastest"), ValueError, "unknown backend 'fastest'"),
]


@pytest.mark.parametrize(
    "_, changes, error, pattern", FUNCTIONAL_ERRORS, ids=[e[0] for e in FUNCTIONAL_ERRORS]
)
def test_functional_errors(_, changes, error, pattern) -> None:
    running_mean, running_var = _stats()
    kwargs = (
        dict(
            x=torch.randn(2, 3, 4),
            residual=None,
            running_mean=running_mean,
            running_var=running_var,
            weight=None,
            bias=None,
            training=False,
        )
        | changes
    )
    x = kwargs.pop("x")
    with pytest.raises(error, match=pattern):
        batch_norm_add_relu(x, **kwargs)
    assert torch.equal(running_mean, torch.zeros(3)) and torch.equal(running_var, torch.ones(3))


def test_backends_that_cannot_run_these_tensors() -> None:
    """auto picks a backend that can run CPU tensors; asking for the native CUDA one (which has BN
    kernels, for CUDA tensors) with CPU tensors says why it cannot."""
    x = torch.randn(2, 3, 2, 2)
    expected = torch.relu(torch.nn.functional.batch_norm(x, None, None, training=True))
    torch.testing.assert_close(batch_norm_add_relu(x, None, None, None, training=True), expected)
    assert "cuda" in implementing("batch_norm_add_relu")
    with pytest.raises(
        BackendUnavailable,
        match=r"cannot run torch\.float32 tensors on cpu: the cuda backend runs CUDA tensors",
    ) as e:
        batch_norm_add_relu(x, None, None, None, training=True, backend="cuda")
    assert "no batch_norm_add_relu kernels" not in str(e.value)
