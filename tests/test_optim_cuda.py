"""GPU-only optimizer checks; each skips cleanly without a CUDA device (run them with `make gpu-check`)."""

from __future__ import annotations

import pytest
import torch

import resfast.optim
from tests.optim_cases import CASES, case_id
from tests.optim_helpers import SHAPES, make_grads, max_err, state_tensors, ulp

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _trajectory(name, kwargs, backend, dtype, steps=4):
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen).to("cuda", dtype) for s in SHAPES]
    opt = getattr(resfast.optim, name)(params, backend=backend, **kwargs)
    for step in range(steps):
        for p, g in zip(params, make_grads(step, len(params)), strict=True):
            p.grad = None if g is None else g.to("cuda", dtype)
        opt.step()
    return opt, params


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_triton_on_cuda_matches_reference(case, dtype):
    name, kwargs = case
    ref = _trajectory(name, kwargs, "reference", dtype)
    fast = _trajectory(name, kwargs, "triton", dtype)
    for (label, want), (_, got) in zip(state_tensors(*ref), state_tensors(*fast), strict=True):
        scale = want.abs().max().item() if want.numel() else 0.0
        bound = (4 * ulp(torch.float32) if dtype == torch.float32 else 2 * ulp(dtype)) * max(scale, 1.0)
        assert max_err(got, want) <= bound, label


@pytest.mark.parametrize("name", ["Adam", "AdamW", "RMSprop"])
def test_capturable_step_replays_in_a_cuda_graph(name):
    """With capturable=True and a tensor lr, a captured step replays exactly like eager steps."""
    results = []
    for mode in ("eager", "graph"):
        torch.manual_seed(0)
        params = [torch.randn(s, device="cuda") for s in SHAPES]
        grads = [torch.randn_like(p) for p in params]
        lr = torch.tensor(0.01, device="cuda")
        opt = getattr(resfast.optim, name)(params, lr=lr, capturable=True, backend="triton")
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        opt.step()  # warm-up: creates state and the cached work table outside the capture
        if mode == "eager":
            for _ in range(3):
                opt.step()
        else:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                opt.step()
            for _ in range(3):
                graph.replay()
        results.append(state_tensors(opt, params))
    for (label, a), (_, b) in zip(*results, strict=True):
        assert torch.equal(a, b), label


def test_changing_lr_does_not_recompile():
    from resfast.kernels import triton_optim

    params = [torch.randn(100, device="cuda") for _ in range(3)]
    opt = resfast.optim.Adam(params, lr=1e-3, backend="triton")
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    compiled = sum(len(c[0]) for c in triton_optim._adam_kernel.device_caches.values())
    for lr in (1e-2, 3e-4, 0.5):
        opt.param_groups[0]["lr"] = lr
        opt.step()
    assert sum(len(c[0]) for c in triton_optim._adam_kernel.device_caches.values()) == compiled
