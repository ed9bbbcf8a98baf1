"""Checkpoints cross between torch.optim and resfast in both directions and continue the trajectory."""

from __future__ import annotations

import copy
import io

import pytest
import torch

import resfast.optim
from tests.optim_cases import CASES, backend_params, case_id
from tests.optim_helpers import build, make_params, max_err, run, state_tensors

# Two runs in fp32 from the same checkpoint differ only by fp32 rounding of the same maths.
RTOL = 1e-5


def _roundtrip(state_dict: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _assert_close(opt_a, params_a, opt_b, params_b) -> None:
    for (label, a), (_, b) in zip(
        state_tensors(opt_a, params_a), state_tensors(opt_b, params_b), strict=True
    ):
        bound = RTOL * max(a.abs().max().item() if a.numel() else 0.0, 1.0)
        assert max_err(a, b) <= bound, f"{label}: {max_err(a, b):.3g}"


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("direction", ["torch->resfast", "resfast->torch"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_checkpoint_crosses_and_continues(case, direction, backend):
    name, kwargs = case
    first, second = direction.split("->")
    params = make_params(torch.float32)
    opt = build(name, first, params, kwargs, backend)
    run(opt, params, steps=3)
    saved = _roundtrip(opt.state_dict())

    resumed_params = [p.detach().clone() for p in params]
    resumed = build(name, second, resumed_params, kwargs, backend)
    resumed.load_state_dict(saved)
    assert resumed.state_dict()["param_groups"] == opt.state_dict()["param_groups"]
    run(opt, params, steps=3, first=3)
    run(resumed, resumed_params, steps=3, first=3)
    _assert_close(opt, params, resumed, resumed_params)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_state_keys_and_dtypes_are_torchs(case):
    name, kwargs = case
    params_t, params_r = make_params(torch.bfloat16), make_params(torch.bfloat16)
    theirs, ours = (
        build(name, "torch", params_t, kwargs),
        build(name, "resfast", params_r, kwargs, "reference"),
    )
    run(theirs, params_t, steps=2)
    run(ours, params_r, steps=2)
    sd_t, sd_r = theirs.state_dict(), ours.state_dict()
    assert sd_t["param_groups"] == sd_r["param_groups"]
    assert sd_t["state"].keys() == sd_r["state"].keys()
    for index, state in sd_t["state"].items():
        assert state.keys() == sd_r["state"][index].keys()
        for key, value in state.items():
            assert sd_r["state"][index][key].dtype == value.dtype, (index, key)


@pytest.mark.parametrize("backend", backend_params())
def test_loaded_copy_stays_identical(backend):
    """A fresh optimizer over cloned params that loads the state dict follows bit for bit."""
    params = make_params(torch.float32)
    opt = build("Adam", "resfast", params, {"amsgrad": True}, backend)
    run(opt, params, steps=2)
    clones = [p.detach().clone() for p in params]
    twin = build("Adam", "resfast", clones, {"amsgrad": True}, backend)
    twin.load_state_dict(copy.deepcopy(opt.state_dict()))
    run(opt, params, steps=10, first=2)
    run(twin, clones, steps=10, first=2)
    for (label, a), (_, b) in zip(state_tensors(opt, params), state_tensors(twin, clones), strict=True):
        assert torch.equal(a, b), label


def test_deepcopy_pickle_and_repr():
    params = make_params(torch.float32)
    opt = resfast.optim.SGD(params, lr=0.1, momentum=0.9, backend="reference")
    run(opt, params, steps=1)
    twin = copy.deepcopy(opt)
    assert twin.backend == "reference" and len(twin.state) == len(opt.state)
    assert "momentum: 0.9" in repr(opt)
    buffer = io.BytesIO()
    torch.save(opt, buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=False).backend == "reference"
