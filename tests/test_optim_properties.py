"""Property tests: random optimizer options x random parameter lists x random steps, every fast backend
against the reference backend on every param and state.

A parameter list mixes shapes with 0 and 1 elements, odd and multi-chunk sizes; every layout of
``tests.optim_helpers.LAYOUTS`` for params and, independently, for grads; fp32, bf16 and fp16 (several
buckets in one optimizer); one or two param groups; grads that are None on some steps (so per-tensor
step counts diverge). Options come from the case table or are drawn (including beta1 and alpha below
one half, where torch.lerp switches form, and tensor learning rates).

Compared after every step. Tolerance: ``fast_backend_bound``, as test_optim_parity's fast-vs-reference
check (both backends compute in fp32: a few fp32 ulps, plus one rounding of each stored low-precision
value), relative to the largest magnitude the tensor reached so far: random grads make, e.g., a
momentum buffer a small difference of large terms, whose rounding errors it keeps.

Profiles: ``ci`` (the default: 25 examples per backend, derandomized so CI is reproducible) and
``long`` (1000 random examples), chosen by RESFAST_HYPOTHESIS_PROFILE, e.g.
``RESFAST_HYPOTHESIS_PROFILE=long TRITON_INTERPRET=1 pytest tests/test_optim_properties.py``.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import resfast.optim
from tests.optim_cases import CASES, OPTIMIZERS
from tests.optim_helpers import (
    device_backend_params,
    fast_backend_bound,
    laid_out,
    layouts_for,
    state_tensors,
    untouched_outside,
)

settings.register_profile("resfast-ci", max_examples=25, deadline=None, derandomize=True, print_blob=True)
settings.register_profile("resfast-long", max_examples=1000, deadline=None, print_blob=True)
PROFILE = settings.get_profile("resfast-" + os.environ.get("RESFAST_HYPOTHESIS_PROFILE", "ci"))

FAST = [p for p in device_backend_params() if p.values[1] != "reference"]
# 0-d, empty, 1 element, odd, one past Triton's 1024-element chunk; 2-d (transposable) and 4-d
# (channels_last, with size-1 dims whose strides are ambiguous).
SHAPES = [
    (),
    (0,),
    (1,),
    (2,),
    (7,),
    (33,),
    (1025,),
    (0, 3),
    (1, 1),
    (3, 5),
    (5, 3),
    (2, 3, 2, 2),
    (4, 1, 3, 3),
    (3, 2, 1, 1),
]
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class Param(NamedTuple):
    shape: tuple[int, ...]
    dtype: torch.dtype
    layout: str
    grad_layout: str


@st.composite
def params(draw) -> Param:
    shape = draw(st.sampled_from(SHAPES))
    layouts = layouts_for(shape)
    return Param(
        shape, draw(st.sampled_from(DTYPES)), draw(st.sampled_from(layouts)), draw(st.sampled_from(layouts))
    )


@st.composite
def drawn_options(draw) -> tuple[str, dict]:
    """Valid options of a random optimizer, in ranges where the maths is well conditioned (the bound
    is relative to each tensor's magnitude, not to the conditioning of, e.g., centered RMSprop's
    variance estimate)."""
    name = draw(st.sampled_from(OPTIMIZERS))
    lr = draw(st.floats(1e-4, 0.5))
    kwargs = {
        "lr": draw(st.sampled_from([lr, torch.tensor(lr)])),
        "weight_decay": draw(st.sampled_from([0.0, 0.01, 0.1])),
        "maximize": draw(st.booleans()),
    }
    if name == "SGD":
        kwargs["momentum"] = draw(st.sampled_from([0.0, 0.5, 0.9]))
        kwargs["nesterov"] = kwargs["momentum"] > 0 and draw(st.booleans())
        kwargs["dampening"] = 0.0 if kwargs["nesterov"] else draw(st.sampled_from([0.0, 0.3]))
    elif name == "RMSprop":
        kwargs["alpha"] = draw(st.floats(0.3, 0.999))
        kwargs["eps"] = draw(st.sampled_from([1e-8, 1e-3]))
        kwargs["momentum"] = draw(st.sampled_from([0.0, 0.5]))
        kwargs["centered"] = draw(st.booleans())
    elif name == "Adagrad":
        kwargs["lr_decay"] = draw(st.sampled_from([0.0, 0.1]))
        kwargs["initial_accumulator_value"] = draw(st.sampled_from([0.0, 0.5]))
        kwargs["eps"] = draw(st.sampled_from([1e-10, 1e-3]))
    else:
        kwargs["betas"] = (draw(st.floats(0.0, 0.99)), draw(st.floats(0.5, 0.999)))
        kwargs["eps"] = draw(st.sampled_from([1e-8, 1e-3]))
        kwargs["amsgrad"] = draw(st.booleans())
    return name, kwargs


@st.composite
def problems(draw):
    specs = draw(st.lists(params(), min_size=1, max_size=6))
    steps = draw(st.integers(1, 3))
    # Mostly present: a grad is None with probability 1/4, on its own schedule per param.
    present = [[draw(st.sampled_from([True, True, True, False])) for _ in specs] for _ in range(steps)]
    return specs, present, draw(st.booleans()), draw(st.integers(0, 2**16))


def _trajectory(device: str, backend: str, case, specs: list[Param], present, two_groups: bool, seed: int):
    """Every param and state tensor after each step: {label: tensor} per step."""
    name, kwargs = case
    gen = torch.Generator().manual_seed(seed)
    laid = [laid_out(torch.randn(s.shape, generator=gen).to(device, s.dtype), s.layout) for s in specs]
    tensors = [p for p, _ in laid]
    groups = [{"params": tensors[::2]}, {"params": tensors[1::2], "lr": 0.5 * kwargs.get("lr", 1e-2)}]
    opt = getattr(resfast.optim, name)(
        groups if two_groups and len(tensors) > 1 else tensors, backend=backend, **kwargs
    )
    snapshots = []
    for step_present in present:
        for p, s, has_grad in zip(tensors, specs, step_present, strict=True):
            grad = torch.randn(s.shape, generator=gen).to(device, s.dtype)  # drawn either way: same stream
            p.grad = laid_out(grad, s.grad_layout)[0] if has_grad else None
        opt.step()
        snapshots.append({label: t.clone() for label, t in state_tensors(opt, tensors)})
    assert all(untouched_outside(p, base) for p, base in laid), "a write landed outside a view"
    return snapshots


@pytest.mark.parametrize(("device", "backend"), FAST)
@PROFILE
@given(case=st.one_of(st.sampled_from(CASES), drawn_options()), problem=problems())
def test_fast_backend_matches_reference(device, backend, case, problem):
    largest: dict[str, float] = {}  # each tensor's largest magnitude so far, in the reference run
    for expected, got in zip(
        _trajectory(device, "reference", case, *problem),
        _trajectory(device, backend, case, *problem),
        strict=True,
    ):
        assert got.keys() == expected.keys()
        for label, want in expected.items():
            mine = got[label]
            if label.endswith(".step"):
                assert mine.item() == want.item(), label
                continue
            finite = want[want.isfinite()].abs()
            largest[label] = max(largest.get(label, 0.0), finite.max().item() if finite.numel() else 0.0)
            bound = fast_backend_bound(want, largest[label])
            torch.testing.assert_close(mine, want, rtol=0, atol=bound, equal_nan=True, msg=label)
