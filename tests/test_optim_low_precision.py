"""Low-precision params beyond torch: fp32 master weights and bf16 stochastic rounding."""

from __future__ import annotations

import io

import pytest
import torch

import resfast.optim
from resfast import backends
from tests.optim_cases import CASES, case_id
from tests.optim_helpers import SHAPES, make_grads, make_params, max_err, state_tensors, ulp

LOW_PRECISION_BACKENDS = [
    pytest.param(b, id=b, marks=() if ok else pytest.mark.skip(reason=why))
    for b, ok, why in [
        ("reference", True, ""),
        (
            "triton",
            backends._why_not("triton", torch.device("cpu"), torch.float32) is None,
            "triton unavailable",
        ),
    ]
]


def _run(name, kwargs, backend, dtype, steps=4, **options):
    params = make_params(dtype)
    opt = getattr(resfast.optim, name)(params, backend=backend, **kwargs, **options)
    for step in range(steps):
        for p, g in zip(params, make_grads(step, len(params)), strict=True):
            p.grad = None if g is None else g.to(dtype)
        opt.step()
    return opt, params


@pytest.mark.parametrize("backend", LOW_PRECISION_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_master_weights_keep_fp32_and_store_the_rounded_param(case, dtype, backend):
    name, kwargs = case
    opt, params = _run(name, kwargs, backend, dtype, master_weights=True)
    for p in params:
        if p in opt.state and p.numel():
            master = opt.state[p]["master_param"]
            assert master.dtype == torch.float32 and master.shape == p.shape
            assert torch.equal(p, master.to(dtype))  # the param is its master, rounded to nearest-even


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_master_weights_triton_matches_reference(case, dtype):
    if backends._why_not("triton", torch.device("cpu"), dtype) is not None:
        pytest.skip("triton unavailable")
    name, kwargs = case
    ref = _run(name, kwargs, "reference", dtype, master_weights=True)
    fast = _run(name, kwargs, "triton", dtype, master_weights=True)
    for (label, want), (_, got) in zip(state_tensors(*ref), state_tensors(*fast), strict=True):
        scale = max(want.abs().max().item() if want.numel() else 0.0, 1.0)
        # Stored states may differ by one rounding step of their dtype where fp32 results straddle a
        # rounding boundary; the fp32 master is computed from those states, so it inherits that too.
        bound = 2 * ulp(dtype) * scale
        assert max_err(got, want) <= bound, label


@pytest.mark.parametrize("backend", LOW_PRECISION_BACKENDS)
@pytest.mark.parametrize("name", ["SGD", "Adam"])
def test_master_weights_track_fp32_training_closer_than_plain_bf16(name, backend):
    """The point of a master copy: small updates are not lost to bf16 rounding. All three runs start
    from the same bf16-representable params and see the same bf16 grads; only the param storage
    differs (fp32; bf16; bf16 + fp32 master)."""
    kwargs = {"lr": 1e-3, "momentum": 0.9} if name == "SGD" else {"lr": 1e-4}
    start = [p.to(torch.bfloat16) for p in make_params(torch.float32) if p.numel()]
    finals = {}
    for run, dtype, options in [
        ("fp32", torch.float32, {}),
        ("bf16", torch.bfloat16, {}),
        ("master", torch.bfloat16, {"master_weights": True}),
    ]:
        params = [p.to(dtype, copy=True) for p in start]
        opt = getattr(resfast.optim, name)(params, backend=backend, **kwargs, **options)
        gen = torch.Generator().manual_seed(0)
        for _ in range(8):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to(torch.bfloat16).to(dtype)
            opt.step()
        finals[run] = [opt.state[p]["master_param"] for p in params] if options else params
    err = {
        run: max(max_err(a, b) for a, b in zip(finals[run], finals["fp32"], strict=True)) for run in finals
    }
    assert err["master"] < err["bf16"] / 10, err


@pytest.mark.parametrize("backend", LOW_PRECISION_BACKENDS)
def test_master_copy_survives_a_checkpoint_in_fp32(backend):
    opt, params = _run("AdamW", {}, backend, torch.bfloat16, master_weights=True)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    clones = [p.detach().clone() for p in params]
    twin = resfast.optim.AdamW(clones, backend=backend, master_weights=True)
    twin.load_state_dict(torch.load(buffer, weights_only=True))
    for p, q in zip(params, clones, strict=True):
        if p in opt.state:
            assert twin.state[q]["master_param"].dtype == torch.float32
            assert torch.equal(twin.state[q]["master_param"], opt.state[p]["master_param"])
    for step in range(4, 6):
        for p, q, g in zip(params, clones, make_grads(step, len(params)), strict=True):
            p.grad = q.grad = None if g is None else g.to(torch.bfloat16)
        opt.step()
        twin.step()
    for (label, a), (_, b) in zip(state_tensors(opt, params), state_tensors(twin, clones), strict=True):
        assert torch.equal(a, b), label


@pytest.mark.parametrize("backend", LOW_PRECISION_BACKENDS)
def test_stochastic_rounding_does_not_stagnate_and_is_unbiased(backend):
    """Updates of 1/8 of a bf16 ulp: round-to-nearest never moves the param, stochastic rounding moves
    it by the right amount on average. 4096 elements x 16 steps: the mean's standard error is ~2e-4."""
    torch.manual_seed(0)
    results = {}
    for options in ({}, {"bf16_stochastic_rounding": True}):
        p = torch.ones(4096, dtype=torch.bfloat16)
        opt = resfast.optim.SGD([p], lr=1.0, backend=backend, **options)
        for _ in range(16):
            p.grad = torch.full_like(p, -(2.0**-7) / 8)  # bf16's ulp at 1.0 is 2^-7
            opt.step()
        results[bool(options)] = p.float().mean().item()
    assert results[False] == 1.0  # stagnation: every update rounded away
    assert results[True] == pytest.approx(1.0 + 16 * 2.0**-10, abs=2e-3)


def test_options_are_validated_and_routed():
    p = torch.ones(3, dtype=torch.bfloat16, requires_grad=True)
    with pytest.raises(ValueError, match="alternatives"):
        resfast.optim.Adam([p], master_weights=True, bf16_stochastic_rounding=True)
    p.grad = torch.ones_like(p)
    # The native kernels lack these updates: auto skips them, an explicit request says so, unchanged.
    opt = resfast.optim.Adam([p], master_weights=True, backend="cpu")
    with pytest.raises(backends.BackendUnavailable, match="master-weight update"):
        opt.step()
    assert torch.equal(p, torch.ones(3, dtype=torch.bfloat16)) and not opt.state
    resfast.optim.Adam([p], master_weights=True).step()  # auto
    fp32 = torch.ones(3, requires_grad=True)
    fp32.grad = torch.ones(3)
    opt = resfast.optim.Adam([fp32], master_weights=True)
    opt.step()
    assert "master_param" not in opt.state[fp32]  # fp32 params need no copy


def test_memory_cost_of_master_weights_is_four_bytes_per_low_precision_param():
    params = [torch.zeros(s, dtype=torch.bfloat16) for s in SHAPES]
    opt = resfast.optim.SGD(params, lr=0.1, master_weights=True, backend="reference")
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    extra = sum(s["master_param"].nbytes for s in opt.state.values())
    assert extra == 4 * sum(p.numel() for p in params)
