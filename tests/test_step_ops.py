"""The native ops over step counters (csrc/step_ops.h): count_steps_, and the coefficient tables that
depend on the counts (adam_coef, adagrad_coef), against resfast/kernels/optim_coef.py's torch-op
tables, which the Triton backend uses without the extension. Also the kept tables of SGD and RMSprop.
(Their opchecks are in tests/test_cext_ops.py with the other ops'.)"""

from __future__ import annotations

import pytest
import torch

from resfast import backends
from resfast.kernels import optim_coef

pytestmark = pytest.mark.skipif(not backends.native_runs("cpu"), reason="resfast._C is not built")
needs_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and backends.native_runs("cuda")), reason="needs a CUDA device"
)

STEP_VALUES = [1.0, 2.0, 3.0, 10.0, 999.0, 123457.0, 3e7]


def _steps(dtype: torch.dtype, device: str = "cpu") -> list[torch.Tensor]:
    return [torch.tensor(v, dtype=dtype, device=device) for v in STEP_VALUES]


def _torch_ops_table(monkeypatch, build, *args, **kwargs) -> torch.Tensor:
    """The table optim_coef builds when the native ops are not there."""
    with monkeypatch.context() as m:
        m.setattr(backends, "native_runs", lambda device_type: False)
        return build(*args, **kwargs)


LRS = {
    "float": lambda: 3e-3,
    "fp32 tensor": lambda: torch.tensor(3e-3),
    "fp64 tensor": lambda: torch.tensor(3e-3, dtype=torch.float64),
}


@pytest.mark.parametrize("step_dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("lr", list(LRS), ids=str)
@pytest.mark.parametrize(
    ("weight_decay", "decoupled"), [(0.0, False), (0.1, False), (0.1, True), (0.37, True)]
)
@pytest.mark.parametrize(("beta1", "beta2"), [(0.9, 0.999), (0.5, 0.9)])
def test_adam_table_is_the_torch_ops_table(
    monkeypatch, step_dtype, lr, weight_decay, decoupled, beta1, beta2
):
    """Bit for bit: the same float64 formulas, rounded to float32 once (pow may differ from torch's by
    an ulp of float64, far below float32's rounding, which the values here would show)."""
    kwargs = dict(
        lr=LRS[lr](), beta1=beta1, beta2=beta2, eps=1e-8, weight_decay=weight_decay, decoupled=decoupled
    )
    cpu = torch.device("cpu")
    want = _torch_ops_table(monkeypatch, optim_coef.adam, _steps(step_dtype), cpu, **kwargs)
    got = optim_coef.adam(_steps(step_dtype), cpu, **kwargs)
    assert got.dtype == torch.float32 and got.shape == want.shape == (len(STEP_VALUES), 7)
    assert torch.equal(got, want), (got - want).abs().max()


@pytest.mark.parametrize("step_dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("lr", list(LRS), ids=str)
@pytest.mark.parametrize("lr_decay", [0.0, 0.05, 1e-7])
def test_adagrad_table_is_the_torch_ops_table(monkeypatch, step_dtype, lr, lr_decay):
    kwargs = dict(lr=LRS[lr](), lr_decay=lr_decay, weight_decay=0.1, eps=1e-10)
    cpu = torch.device("cpu")
    want = _torch_ops_table(monkeypatch, optim_coef.adagrad, _steps(step_dtype), cpu, **kwargs)
    got = optim_coef.adagrad(_steps(step_dtype), cpu, **kwargs)
    assert torch.equal(got, want), (got - want).abs().max()


def test_coefficient_ops_read_the_counters_at_call_time():
    """The table follows the counters' current values (nothing about them is cached)."""
    steps = [torch.tensor(1.0), torch.tensor(5.0)]
    first = torch.ops.resfast.adam_coef(steps, None, 0.1, 0.9, 0.999, 1e-8, 0.0, 0)
    torch.ops.resfast.count_steps_(steps, None)
    second = torch.ops.resfast.adam_coef(steps, None, 0.1, 0.9, 0.999, 1e-8, 0.0, 0)
    assert first[0, 0].item() == pytest.approx(0.1 / (1 - 0.9), rel=1e-6)
    assert second[0, 0].item() == pytest.approx(0.1 / (1 - 0.9**2), rel=1e-6)
    assert second[1, 0].item() == pytest.approx(0.1 / (1 - 0.9**6), rel=1e-6)


def test_tensor_betas_and_other_dtypes_build_with_torch_ops(monkeypatch):
    """What the native ops do not take (tensor betas, a bf16 lr) still works, through the torch ops."""
    called = []
    monkeypatch.setattr(torch.ops.resfast, "adam_coef", lambda *a: called.append(a), raising=False)
    steps = _steps(torch.float32)
    cpu = torch.device("cpu")
    table = optim_coef.adam(
        steps, cpu, lr=0.1, beta1=torch.tensor(0.9), beta2=0.99, eps=1e-8, weight_decay=0.0, decoupled=False
    )
    bf16_lr = torch.tensor(0.1, dtype=torch.bfloat16)
    table_bf16_lr = optim_coef.adam(
        steps, cpu, lr=bf16_lr, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0, decoupled=False
    )
    assert not called
    assert table.isfinite().all() and table_bf16_lr.isfinite().all()


@pytest.mark.parametrize(
    "call",
    [
        lambda steps: torch.ops.resfast.adam_coef(steps, None, 0.1, 0.9, 0.999, 1e-8, 0.0, 0),
        lambda steps: torch.ops.resfast.adagrad_coef(steps, None, 0.1, 0.0, 0.0, 1e-10),
        lambda steps: torch.ops.resfast.count_steps_(steps, None),
    ],
    ids=["adam_coef", "adagrad_coef", "count_steps_"],
)
@pytest.mark.parametrize(
    "bad",
    [torch.zeros(2), torch.tensor(1, dtype=torch.int64), torch.tensor(1.0, dtype=torch.bfloat16)],
    ids=str,
)
def test_bad_counters_are_refused_before_any_counts(call, bad):
    good = torch.tensor(3.0)
    with pytest.raises(RuntimeError, match="one-element float32/float64 step counters on one device"):
        call([good, bad])
    assert good.item() == 3.0


def test_bad_hyperparameters_are_refused():
    steps = [torch.tensor(1.0)]
    with pytest.raises(RuntimeError, match="wd_mode must be 0"):
        torch.ops.resfast.adam_coef(steps, None, 0.1, 0.9, 0.999, 1e-8, 0.1, 3)
    with pytest.raises(RuntimeError, match="a tensor lr must have one float32/float64 element"):
        torch.ops.resfast.adam_coef(steps, torch.ones(2), 0.0, 0.9, 0.999, 1e-8, 0.1, 0)


# -- tables of numbers alone are kept --------------------------------------------------------------


def test_sgd_and_rmsprop_tables_are_kept_while_their_numbers_stay():
    cpu = torch.device("cpu")
    kwargs = dict(lr=0.1, weight_decay=1e-4, momentum=0.9, dampening=0.0)
    first = optim_coef.sgd(4, cpu, fresh=[False] * 4, **kwargs)
    assert optim_coef.sgd(4, cpu, fresh=[False] * 4, **kwargs) is first
    changed = optim_coef.sgd(4, cpu, fresh=[False] * 4, **(kwargs | {"lr": 0.05}))
    assert changed is not first and changed[:, 0].eq(0.05).all() and first[:, 0].eq(0.1).all()
    fresh = optim_coef.sgd(4, cpu, fresh=[True, False, False, False], **kwargs)
    assert fresh is not first and fresh[:, 4].tolist() == [1.0, 0.0, 0.0, 0.0]
    lr = torch.tensor(0.1)
    from_tensor = optim_coef.sgd(4, cpu, fresh=[False] * 4, **(kwargs | {"lr": lr}))
    lr.fill_(0.2)  # a tensor's value may change between steps: its table is built every time
    assert optim_coef.sgd(4, cpu, fresh=[False] * 4, **(kwargs | {"lr": lr}))[:, 0].eq(0.2).all()
    assert from_tensor[:, 0].eq(0.1).all()
    rms = dict(lr=0.01, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0)
    assert optim_coef.rmsprop(3, cpu, **rms) is optim_coef.rmsprop(3, cpu, **rms)
    assert optim_coef.rmsprop(5, cpu, **rms).shape == (5, 6)


# -- on a GPU ----------------------------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("lr", list(LRS), ids=str)
def test_cuda_tables_equal_the_cpu_tables(lr):
    """300 counters: two launches of the CUDA op (256 counters each at most)."""
    values = [float(v) for v in range(1, 301)]
    lr_value = LRS[lr]()
    for build, args in (
        (torch.ops.resfast.adam_coef, (0.9, 0.999, 1e-8, 0.1, 2)),
        (torch.ops.resfast.adagrad_coef, (0.05, 0.1, 1e-10)),
    ):
        tables = []
        for device in ("cpu", "cuda"):
            steps = [torch.tensor(v, device=device) for v in values]
            lr_arg = lr_value.to(device) if isinstance(lr_value, torch.Tensor) else None
            tables.append(build(steps, lr_arg, 0.0 if lr_arg is not None else lr_value, *args).cpu())
        # Same float64 formulas; CUDA's pow may differ from the CPU's by an ulp of float64, which
        # can move a float32 rounding by one ulp.
        torch.testing.assert_close(tables[1], tables[0], rtol=2**-23, atol=0)


@needs_cuda
def test_cuda_count_steps_counts_and_skips_on_found_inf():
    steps = [torch.tensor(float(i), device="cuda") for i in range(300)]
    steps[5] = torch.tensor(5.0, dtype=torch.float64, device="cuda")
    torch.ops.resfast.count_steps_(steps, None)
    assert [s.item() for s in steps] == [float(i + 1) for i in range(300)]
    torch.ops.resfast.count_steps_(steps, torch.tensor([1.0], device="cuda"))  # GradScaler skips
    assert [s.item() for s in steps] == [float(i + 1) for i in range(300)]
    torch.ops.resfast.count_steps_(steps, torch.tensor([0.0], device="cuda"))
    assert [s.item() for s in steps] == [float(i + 2) for i in range(300)]


# -- a kept call's counters, held natively ------------------------------------------------------------


@pytest.mark.parametrize("step_dtype", [torch.float32, torch.float64], ids=str)
def test_held_counters_count_and_build_the_tables_of_the_list_ops(step_dtype):
    """resfast._C.StepCounters runs the same ops over the counters it holds: same counts (and skip on
    found_inf), the same tables bit for bit, and it follows the counters' values at call time."""
    import resfast._C

    held, listed = _steps(step_dtype), _steps(step_dtype)
    counters = resfast._C.StepCounters(held)
    assert len(counters) == len(held)
    for found_inf in (None, torch.tensor([1.0]), torch.tensor([0.0])):
        counters.count_(found_inf)
        torch.ops.resfast.count_steps_(listed, found_inf)
        assert [s.item() for s in held] == [s.item() for s in listed]
    assert held[0].item() == STEP_VALUES[0] + 2  # counted twice, skipped once
    lr = torch.tensor(3e-3)
    for args in ((None, 0.1), (lr, 0.0)):
        assert torch.equal(
            counters.adam_coef(*args, 0.9, 0.999, 1e-8, 0.1, 2),
            torch.ops.resfast.adam_coef(listed, *args, 0.9, 0.999, 1e-8, 0.1, 2),
        )
        assert torch.equal(
            counters.adagrad_coef(*args, 0.05, 0.1, 1e-10),
            torch.ops.resfast.adagrad_coef(listed, *args, 0.05, 0.1, 1e-10),
        )


@pytest.mark.parametrize(
    "steps",
    [[], [torch.tensor(1.0), torch.zeros(2)], [torch.tensor(1, dtype=torch.int64)]],
    ids=["none", "two-elements", "int64"],
)
def test_held_counters_refuse_bad_counters(steps):
    import resfast._C

    with pytest.raises(RuntimeError, match=r"no step counters|one-element float32/float64 step counters"):
        resfast._C.StepCounters(steps)


@needs_cuda
def test_held_cuda_counters_count_and_build_the_tables_of_the_list_ops():
    """The held counters on the GPU: the same CUDA ops through the dispatcher (300 counters: two
    launches each), a device found_inf read by the kernel."""
    import resfast._C

    held = [torch.tensor(float(i), device="cuda") for i in range(1, 301)]
    listed = [s.clone() for s in held]
    counters = resfast._C.StepCounters(held)
    for found_inf in (torch.tensor([1.0], device="cuda"), None, torch.tensor([0.0], device="cuda")):
        counters.count_(found_inf)
        torch.ops.resfast.count_steps_(listed, found_inf)
    assert torch.equal(torch.stack(held), torch.stack(listed))
    assert held[0].item() == 3.0
    lr = torch.tensor(3e-3, device="cuda")
    assert torch.equal(
        counters.adam_coef(lr, 0.0, 0.9, 0.999, 1e-8, 0.1, 2),
        torch.ops.resfast.adam_coef(listed, lr, 0.0, 0.9, 0.999, 1e-8, 0.1, 2),
    )
    assert torch.equal(
        counters.adagrad_coef(None, 0.1, 0.05, 0.1, 1e-10),
        torch.ops.resfast.adagrad_coef(listed, None, 0.1, 0.05, 0.1, 1e-10),
    )
