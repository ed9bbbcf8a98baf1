"""AMP end to end on a fused CIFAR ResNet-20 (on the CPU, and CUDA where present): fp16 autocast with
GradScaler (grads unscaled and inf steps skipped inside resfast's kernels) and bf16 autocast.

Each step is checked against torch.optim taking the same step from the same parameters, state and
(scaled) gradients; comparing two free-running trajectories instead would mostly measure chaos: a
1-ulp fp32 difference in one weight can flip its fp16/bf16 rounding in the next forward, and after 4
steps the two runs' losses differed by 5% with both optimizers correct."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import resfast.optim
from resfast.nn import fuse_resnet
from resfast.nn.cifar import resnet20

STEPS = 8
# fp16: 2^17 overflows the fp16 activation gradients of the first step(s) on the CPU, so GradScaler
# backs off and resfast must skip those steps inside its kernels; whether it does depends on the
# device's kernels, so one step's gradient is also made inf on purpose (POISONED_STEP). bf16 has
# fp32's range and needs no scaling.
INIT_SCALE = {torch.float16: 2.0**17, torch.bfloat16: 1.0}
POISONED_STEP = 3
CASES = [
    (torch.float16, "SGD", {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
    (torch.float16, "Adam", {"lr": 1e-3}),
    (torch.bfloat16, "SGD", {"lr": 0.1, "momentum": 0.9}),
    (torch.bfloat16, "AdamW", {"lr": 1e-3}),
]


def _assert_same_update(got: list[torch.Tensor], want: list[torch.Tensor], step: int) -> None:
    """The fused update and torch's differ by fp32 rounding: a few ulps of each param's magnitude."""
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        atol = 4 * torch.finfo(torch.float32).eps * max(w.abs().max().item(), 1.0)
        torch.testing.assert_close(g, w, rtol=0, atol=atol, msg=f"step {step}, param {i}")


@pytest.mark.parametrize(("dtype", "name", "options"), CASES, ids=[f"{str(d)[6:]}-{n}" for d, n, _ in CASES])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_autocast_training_steps_like_torch(
    device: str, dtype: torch.dtype, name: str, options: dict
) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    torch.manual_seed(0)
    model = fuse_resnet(resnet20()).to(device)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, 8, 8, generator=gen), torch.randint(0, 10, (8,), generator=gen)
    x, y = x.to(device), y.to(device)
    ours = getattr(resfast.optim, name)(model.parameters(), **options)
    # torch's optimizer over a shadow copy, reset to ours before every step
    shadow = [p.detach().clone() for p in model.parameters()]
    theirs = getattr(torch.optim, name)(shadow, **options)
    scaler = torch.amp.GradScaler(device, init_scale=INIT_SCALE[dtype], enabled=dtype == torch.float16)
    losses, skipped = [], 0
    for step in range(STEPS):
        ours.zero_grad()
        with torch.autocast(device, dtype=dtype):
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        if dtype == torch.float16 and step == POISONED_STEP:
            next(model.parameters()).grad.view(-1)[0] = float("inf")
        for s, p in zip(shadow, model.parameters(), strict=True):
            s.copy_(p.detach())
            s.grad = p.grad.clone()
        theirs.load_state_dict(copy.deepcopy(ours.state_dict()))
        scale = scaler.get_scale()
        scaler.step(ours)  # one scaler, two optimizers: each gets its own unscale and inf check
        scaler.step(theirs)
        scaler.update()
        skipped += scaler.get_scale() < scale
        _assert_same_update(list(model.parameters()), shadow, step)
        losses.append(loss.item())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    if dtype == torch.float16:
        assert 1 <= skipped <= STEPS // 2, f"{skipped} skipped steps: the inf path was not exercised"
    assert losses[-1] < 0.5 * losses[0], losses
