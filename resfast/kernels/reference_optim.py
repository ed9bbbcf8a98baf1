"""The optimizer updates in plain PyTorch, one tensor at a time: the specification.

Every fast backend (Triton, C++, CUDA) implements these functions with the same signatures and is
tested against them. They follow torch.optim's single-tensor implementations line by line, with two
deliberate differences that make them the specification of a *fused* update:

- Math runs in float32 for bfloat16/float16 tensors (each state is read, updated in fp32 and
  rounded once when stored), as torch's fused kernels do; float32/float64 tensors update in place.
- AMP: ``grad_scale`` divides the gradient (the unscaled gradient is written back to ``.grad``, as
  torch's fused kernels do) and a nonzero ``found_inf`` leaves every tensor untouched.
- Clipping: ``grad_clip`` (a one-element fp32 tensor, ``min(1, max_grad_norm / (norm + 1e-6))`` of the
  optimizer's global grad norm) multiplies the unscaled gradient; ``.grad`` keeps the unclipped one.
- Low-precision params (beyond torch): with ``master_params`` (fp32 copies, one per param) the update
  runs on the master, which is kept, and the param receives it rounded to nearest-even; with
  ``stochastic_seed`` a bf16 param is rounded stochastically instead (unbiased; see
  :func:`stochastic_round_bf16`). The stochastic bits differ between backends; their distribution is
  what the tests check.

Step counters are not touched here: the optimizer increments them (and undoes the increment when
``found_inf`` is set) before calling, so ``steps`` holds the count *including* this step.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["adagrad", "adam", "lars", "rmsprop", "sgd", "stochastic_round_bf16"]


def _skipped(found_inf: Tensor | None) -> bool:
    # The reference may synchronise: it is the readable spec, not the fast path.
    return found_inf is not None and bool(found_inf.item())


def _fp32(t: Tensor) -> Tensor:
    """The tensor to compute with: itself for fp32/fp64 (updated in place), an fp32 copy otherwise."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _store(dst: Tensor, value: Tensor) -> None:
    if value is not dst:
        dst.copy_(value)


def stochastic_round_bf16(value: Tensor, generator: torch.Generator) -> Tensor:
    """fp32 `value` rounded to bf16 stochastically: add 16 random bits below bf16's last bit, then
    truncate, so a value between two bf16 neighbours lands on each with probability proportional to
    its nearness (the expected stored value is exact). Non-finite values pass through."""
    noise = torch.randint(
        0, 1 << 16, value.shape, dtype=torch.int32, device=value.device, generator=generator
    )
    rounded = ((value.contiguous().view(torch.int32) + noise) & -(1 << 16)).view(torch.float32)
    return torch.where(value.isfinite(), rounded, value).to(torch.bfloat16)


class _Params:
    """Where each update reads its fp32 param from and writes it to (see the module docstring)."""

    def __init__(self, params: list[Tensor], masters: list[Tensor] | None, seed: int | None) -> None:
        self.params, self.masters, self.seed = params, masters, seed

    def load(self, i: int) -> Tensor:
        return self.masters[i] if self.masters is not None else _fp32(self.params[i])

    def store(self, i: int, value: Tensor) -> None:
        param = self.params[i]
        if self.masters is not None:
            param.copy_(value)  # value is the master, already updated in place
        elif self.seed is not None and param.dtype == torch.bfloat16:
            generator = torch.Generator(device=param.device).manual_seed(self.seed + i)
            param.copy_(stochastic_round_bf16(value, generator))
        else:
            _store(param, value)


def _grad(grad: Tensor, grad_scale: Tensor | None, grad_clip: Tensor | None, maximize: bool) -> Tensor:
    g = grad.float() if grad.dtype in (torch.float16, torch.bfloat16) else grad.clone()
    if grad_scale is not None:
        g = g / grad_scale.to(g.device)
        grad.copy_(g)
    if grad_clip is not None:
        g = g * grad_clip.to(g.device)  # not written back: .grad keeps the unclipped gradient
    return -g if maximize else g


def sgd(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor | None],
    fresh: list[bool],
    *,
    lr: float | Tensor,
    weight_decay: float | Tensor,
    momentum: float,
    dampening: float,
    nesterov: bool,
    maximize: bool,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    grad_clip: Tensor | None = None,
    master_params: list[Tensor] | None = None,
    stochastic_seed: int | None = None,
) -> None:
    """SGD. ``momentum_buffers[i]`` is None when momentum is 0; ``fresh[i]`` marks a buffer created
    for this step, which starts as the gradient itself (no dampening), as in torch."""
    if _skipped(found_inf):
        return
    out = _Params(params, master_params, stochastic_seed)
    for i, (grad, buf, is_fresh) in enumerate(zip(grads, momentum_buffers, fresh, strict=True)):
        p = out.load(i)
        g = _grad(grad, grad_scale, grad_clip, maximize)
        if weight_decay != 0:
            g = g + p * weight_decay
        if momentum != 0:
            assert buf is not None
            b = _fp32(buf)
            if is_fresh:
                b.copy_(g)
            else:
                b.mul_(momentum).add_(g, alpha=1 - dampening)
            _store(buf, b)
            g = g.add(b, alpha=momentum) if nesterov else b
        p.sub_(g * lr)
        out.store(i, p)


def rmsprop(
    params: list[Tensor],
    grads: list[Tensor],
    square_avgs: list[Tensor],
    grad_avgs: list[Tensor | None],
    momentum_buffers: list[Tensor | None],
    steps: list[Tensor],
    *,
    lr: float | Tensor,
    alpha: float,
    eps: float,
    weight_decay: float,
    momentum: float,
    centered: bool,
    maximize: bool,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    grad_clip: Tensor | None = None,
    master_params: list[Tensor] | None = None,
    stochastic_seed: int | None = None,
) -> None:
    """RMSprop. ``grad_avgs[i]`` is None unless centered; ``momentum_buffers[i]`` None unless momentum > 0.
    ``steps`` is counted (torch keeps it in the state) but not used by the maths."""
    if _skipped(found_inf):
        return
    out = _Params(params, master_params, stochastic_seed)
    for i in range(len(params)):
        p = out.load(i)
        g = _grad(grads[i], grad_scale, grad_clip, maximize)
        if weight_decay != 0:
            g = g.add(p, alpha=weight_decay)
        sq = _fp32(square_avgs[i])
        sq.mul_(alpha).addcmul_(g, g, value=1 - alpha)
        _store(square_avgs[i], sq)
        if centered:
            ga_state = grad_avgs[i]
            assert ga_state is not None
            ga = _fp32(ga_state)
            ga.lerp_(g, 1 - alpha)
            _store(ga_state, ga)
            avg = sq.addcmul(ga, ga, value=-1).sqrt_()
        else:
            avg = sq.sqrt()
        avg = avg.add_(eps)
        buf_state = momentum_buffers[i]
        if momentum > 0:
            assert buf_state is not None
            buf = _fp32(buf_state)
            buf.mul_(momentum).addcdiv_(g, avg)
            _store(buf_state, buf)
            p.sub_(buf * lr)
        else:
            p.sub_(g / avg * lr)
        out.store(i, p)


def adagrad(
    params: list[Tensor],
    grads: list[Tensor],
    state_sums: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float | Tensor,
    lr_decay: float,
    weight_decay: float,
    eps: float,
    maximize: bool,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    grad_clip: Tensor | None = None,
    master_params: list[Tensor] | None = None,
    stochastic_seed: int | None = None,
) -> None:
    """Adagrad, including torch's sparse-gradient update (which only this backend runs)."""
    if _skipped(found_inf):
        return
    out = _Params(params, master_params, stochastic_seed)
    for i, (param, grad, state_sum, step_t) in enumerate(zip(params, grads, state_sums, steps, strict=True)):
        clr = lr / (1 + (step_t.item() - 1) * lr_decay)
        if grad.is_sparse:
            _adagrad_sparse(param, grad, state_sum, clr, weight_decay, eps, maximize, grad_scale, grad_clip)
            continue
        p = out.load(i)
        g = _grad(grad, grad_scale, grad_clip, maximize)
        if weight_decay != 0:
            g = g.add(p, alpha=weight_decay)
        s = _fp32(state_sum)
        s.addcmul_(g, g, value=1)
        p.sub_(g / s.sqrt().add_(eps) * clr)
        _store(state_sum, s)
        out.store(i, p)


def _adagrad_sparse(
    param: Tensor,
    grad: Tensor,
    state_sum: Tensor,
    clr: float | Tensor,
    weight_decay: float,
    eps: float,
    maximize: bool,
    grad_scale: Tensor | None,
    grad_clip: Tensor | None,
) -> None:
    # torch's own sparse rule, verbatim in meaning: only rows present in the gradient change.
    if weight_decay != 0:
        raise RuntimeError("weight_decay option is not compatible with sparse gradients")
    if grad_scale is not None:
        grad = grad / grad_scale
    if grad_clip is not None:
        grad = grad * grad_clip
    grad = (-grad if maximize else grad).coalesce()
    indices, values = grad._indices(), grad._values()

    def make_sparse(v: Tensor) -> Tensor:
        # The indices are a coalesced gradient's: valid, no need to check them again.
        return torch.sparse_coo_tensor(indices, v, grad.size(), check_invariants=False)

    state_sum.add_(make_sparse(values.pow(2)))
    std_values = state_sum.sparse_mask(grad)._values().sqrt_().add_(eps)
    param.sub_(make_sparse(values / std_values) * clr)


def adam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor | None],
    steps: list[Tensor],
    *,
    lr: float | Tensor,
    beta1: float | Tensor,
    beta2: float | Tensor,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    maximize: bool,
    decoupled_weight_decay: bool,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    grad_clip: Tensor | None = None,
    master_params: list[Tensor] | None = None,
    stochastic_seed: int | None = None,
) -> None:
    """Adam; AdamW is ``decoupled_weight_decay=True``. ``max_exp_avg_sqs[i]`` is None unless amsgrad."""
    if _skipped(found_inf):
        return
    out = _Params(params, master_params, stochastic_seed)
    for i in range(len(params)):
        p = out.load(i)
        g = _grad(grads[i], grad_scale, grad_clip, maximize)
        step = steps[i].item()
        if weight_decay != 0:
            if decoupled_weight_decay:
                p.mul_(1 - lr * weight_decay)
            else:
                g = g.add(p, alpha=weight_decay)
        m, v = _fp32(exp_avgs[i]), _fp32(exp_avg_sqs[i])
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        _store(exp_avgs[i], m)
        _store(exp_avg_sqs[i], v)
        bias_correction1 = 1 - beta1**step
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5
        max_state = max_exp_avg_sqs[i]
        if amsgrad:
            assert max_state is not None
            vmax = _fp32(max_state)
            torch.maximum(vmax, v, out=vmax)
            _store(max_state, vmax)
            v = vmax
        denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
        p.sub_(m / denom * (lr / bias_correction1))
        out.store(i, p)


def lars(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    *,
    lr: float | Tensor,
    momentum: float,
    weight_decay: float,
    trust_coefficient: float,
    eps: float,
    lars_adaptation: bool,
    nesterov: bool,
    maximize: bool,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    grad_clip: Tensor | None = None,
    master_params: list[Tensor] | None = None,
    stochastic_seed: int | None = None,
) -> None:
    """LARS with the learning rate inside the momentum buffer (the MLPerf rule). Per tensor, with w the
    param, g its (unscaled, maximize-negated) grad and v its buffer (zeros before the first step)::

        d     = g + weight_decay * w
        trust = trust_coefficient * |w| / (|g| + weight_decay * |w| + eps)
                    if lars_adaptation and |w| > 0 and |g| > 0, else 1
        v     = momentum * v + lr * trust * d
        w     = w - (momentum * v + lr * trust * d  if nesterov  else  v)

    Norms are L2 over the whole tensor, in the compute dtype (fp64 for fp64 tensors, else fp32)."""
    if _skipped(found_inf):
        return
    out = _Params(params, master_params, stochastic_seed)
    for i, (grad, buf) in enumerate(zip(grads, momentum_buffers, strict=True)):
        p = out.load(i)
        g = _grad(grad, grad_scale, grad_clip, maximize)
        scaled_lr = lr
        if lars_adaptation:
            w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(g)
            ratio = trust_coefficient * w_norm / (g_norm + weight_decay * w_norm + eps)
            trust = torch.where((w_norm > 0) & (g_norm > 0), ratio, torch.ones_like(ratio))
            scaled_lr = lr * trust
        d = g.add(p, alpha=weight_decay) if weight_decay != 0 else g
        b = _fp32(buf)
        step = d * scaled_lr
        b.mul_(momentum).add_(step)
        _store(buf, b)
        p.sub_(b * momentum + step if nesterov else b)
        out.store(i, p)
