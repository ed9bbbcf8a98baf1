"""resfast/kernels/optim_spec.py is the one declaration of each fused update's contract: these tests
hold every other place to it (torch's own state keys, the native kernels' coefficient columns, the
coefficient tables Python builds)."""

from __future__ import annotations

import pytest
import torch

import resfast.optim
from resfast import backends
from resfast.kernels import optim_coef
from resfast.kernels.optim_spec import ADAM_WEIGHT_DECAY, SPECS
from tests.optim_cases import CASES, case_id


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_state_keys_are_torchs(case):
    """After a step, torch's optimizer holds exactly the spec's state tensors (plus `step` where the
    spec keeps one), and resfast's the same."""
    name, kwargs = case
    states = {}
    for module in (torch.optim, resfast.optim):
        p = torch.randn(3, requires_grad=True)
        extra = {"backend": "reference"} if module is resfast.optim else {"foreach": False}
        opt = getattr(module, name)([p], **extra, **kwargs)
        p.grad = torch.randn(3)
        opt.step()
        states[module.__name__] = set(opt.state[p])
        spec = SPECS[opt._spec.op] if module is resfast.optim else None
    group = opt.param_groups[0]
    want = set(spec.state_keys(group)) | ({"step"} if spec.has_step else set())
    assert states["torch.optim"] == want
    assert states["resfast.optim"] == want


def _native_extension():
    ext, why = backends.native_extension()
    if ext is None:
        pytest.skip(f"needs the native extension: {why}")
    return ext


def test_native_coefficient_columns_are_the_specs():
    """csrc/optim_math.h names each column; a column added on one side only fails here, and so does an
    update without a native op."""
    native = {f"{op}_": list(spec.columns) for op, spec in SPECS.items()}
    assert native == _native_extension().COEF_COLUMNS


def test_native_adam_weight_decay_modes_are_the_specs():
    assert _native_extension().ADAM_WEIGHT_DECAY == ADAM_WEIGHT_DECAY


def test_coefficient_tables_have_the_specs_width():
    cpu, one = torch.device("cpu"), [torch.ones(())]
    tables = {
        "sgd": optim_coef.sgd(1, cpu, lr=0.1, weight_decay=0.0, momentum=0.9, dampening=0.0, fresh=[True]),
        "rmsprop": optim_coef.rmsprop(1, cpu, lr=0.1, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0),
        "adagrad": optim_coef.adagrad(one, cpu, lr=0.1, lr_decay=0.0, weight_decay=0.0, eps=1e-10),
        "adam": optim_coef.adam(
            one, cpu, lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, decoupled=True
        ),
        "lars": optim_coef.lars(
            1, cpu, lr=0.1, momentum=0.9, weight_decay=1e-4, trust_coefficient=1e-3, eps=0.0
        ),
    }
    assert {op: table.shape for op, table in tables.items()} == {
        op: (1, len(spec.columns)) for op, spec in SPECS.items()
    }
    # Spot values by name: AdamW's decay term is 1 - lr * weight_decay; SGD's fresh flag is set.
    assert tables["adam"][0, SPECS["adam"].column("weight_decay_term")].item() == pytest.approx(0.99)
    assert tables["sgd"][0, SPECS["sgd"].column("fresh")].item() == 1.0
    assert tables["lars"][0, SPECS["lars"].column("trust_coefficient")].item() == pytest.approx(1e-3)


@pytest.mark.parametrize("op", SPECS)
def test_native_op_schemas_take_the_specs_lists_and_options(op):
    """Each native op takes params, grads, one list per state of the spec (its key, plural), the
    coefficients, GradScaler's tensors, exactly the spec's options in order, then max_grad_norm's
    clip factor (optional, last: every update takes it the same way)."""
    _native_extension()
    spec = SPECS[op]
    names = [a.name for a in getattr(torch.ops.resfast, f"{op}_").default._schema.arguments]
    states = [f"{s.key}s" for s in spec.states]
    scaler = ["grad_scale", "found_inf"]
    assert names == ["params", "grads", *states, "coef", *scaler, *spec.options, "grad_clip"]
