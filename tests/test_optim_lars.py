"""LARS: the reference against a float64 transcription of the rule, the fused backends (Triton: two
launches, norms then update; the native C++ CPU kernels: a norm pass then the update; the CUDA kernels
on a GPU) against the reference and against the float64 rule, determinism, GradScaler, checkpoints,
errors, routing, and the MLPerf param groups. The CUDA kernel body run on the host is checked in
tests/test_cuda_kernel_on_host.py.

Tolerances, with their reasons:

- reference vs the float64 transcription, on float64 tensors: both are float64 and differ only in the
  order of the norms' sums and of a few products, so a few float64 ulps; 1e-12 relative to the
  tensor's magnitude leaves room for the norms of 40,000-element tensors and five steps.
- fused backends vs reference: both compute in fp32 from the same inputs; the norms are summed in
  another order (Triton: blocked, then per span; cpu: fp32 vector lanes per 1024-element block, then
  double; cuda: a tree per 4096-element chunk, then over chunks; against torch's reduction), which
  moves each trust ratio by a few fp32 ulps, and every update (itself at most the tensor's magnitude
  here) by that much relative: the shared helper's 4 fp32 ulps of the largest magnitude
  (fast_backend_bound); bf16 stores round once more, 2 bf16 ulps.
- fused backends in fp32 vs the float64 rule: at most twice the reference's own fp32 error on the same
  tensor (the project's rule for a fast path), plus 2 fp32 ulps of the tensor's magnitude where the
  reference happens to land (almost) exactly.
"""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import Tensor, nn

import resfast.optim
from resfast import backends
from resfast.optim import LARS, lars_param_groups
from tests.optim_helpers import fast_backend_bound, max_err

# Empty, single, odd, 4-d, several BLOCKs, several of the norm pass's spans (32 * 1024 elements each);
# parameter 3 is all zeros (trust 1), parameter 2 gets a zero grad on step 1 (trust 1 there).
SHAPES = [(0,), (1,), (7, 3), (5,), (3, 1, 3, 3), (4100,), (40000,), (2, 5)]
ZERO_PARAM, ZERO_GRAD = 3, 2
STEPS = 4
# Large enough that each step moves the params by ~10% (with the default trust_coefficient, 1e-3, a bf16
# update would round away and the comparison would prove nothing).
BASE = {"lr": 4.0, "trust_coefficient": 0.02}

# (name, optimizer kwargs, options of the second param group): each option alone, then combined.
CASES = [
    ("default", {}, {}),
    ("weight_decay", {"weight_decay": 0.05}, {}),
    ("nesterov", {"nesterov": True, "weight_decay": 0.05}, {}),
    ("maximize", {"maximize": True, "momentum": 0.5}, {}),
    ("no_momentum_eps", {"momentum": 0.0, "eps": 0.1}, {}),
    ("mixed_groups", {"weight_decay": 0.05}, {"lars_adaptation": False, "weight_decay": 0.0, "lr": 0.3}),
    ("no_adaptation", {"nesterov": True}, {"lars_adaptation": False}),
]


def _backends() -> list:
    """Every backend that runs fp32 CPU tensors here (triton under TRITON_INTERPRET=1, cpu when the
    native extension is built); the others as skips that say why."""
    params = []
    for backend in ("reference", "triton", "cpu"):
        try:
            backends.choose(torch.device("cpu"), torch.float32, backend)
            marks = ()
        except backends.BackendUnavailable as e:
            marks = (pytest.mark.skip(reason=str(e)),)
        params.append(pytest.param(backend, marks=marks, id=backend))
    return params


TRITON = [b for b in _backends() if b.values[0] == "triton"]
NATIVE_CPU = [b for b in _backends() if b.values[0] == "cpu"]
FAST = TRITON + NATIVE_CPU


def _params(dtype: torch.dtype) -> list[Tensor]:
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    params[ZERO_PARAM].zero_()
    return [p.to(dtype) for p in params]


def _grads(step: int) -> list[Tensor | None]:
    gen = torch.Generator().manual_seed(100 + step)
    grads: list[Tensor | None] = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    if step == 1:
        grads[ZERO_GRAD] = torch.zeros(SHAPES[ZERO_GRAD], dtype=torch.float64)
    if step == 2:
        grads[4] = None  # a param without a grad is skipped, its buffer kept
    return grads


def _groups(params: list[Tensor], second: dict) -> list[dict]:
    return [{"params": params[::2]}, {"params": params[1::2], **second}]


def _lr(step: int) -> float:
    return BASE["lr"] * (1 + 0.25 * step)  # a changing lr, as a scheduler sets it


def _set_lr(opt: LARS, step: int) -> None:
    for group in opt.param_groups:
        group["lr"] = _lr(step) * (0.5 if group is opt.param_groups[1] else 1.0)


def _run(dtype: torch.dtype, kwargs: dict, second: dict, backend: str, steps: int = STEPS):
    params = _params(dtype)
    opt = LARS(_groups(params, second), **{**BASE, **kwargs}, backend=backend)
    for step in range(steps):
        _set_lr(opt, step)
        for p, g in zip(params, _grads(step), strict=True):
            p.grad = None if g is None else g.to(dtype)
        opt.step()
    return opt, params


def _truth(kwargs: dict, second: dict, steps: int = STEPS) -> tuple[list[Tensor], list[Tensor | None]]:
    """The rule, transcribed in float64 with nothing shared with resfast: params and buffers."""
    options = {"momentum": 0.9, "weight_decay": 0.0, "eps": 0.0, "nesterov": False, "maximize": False}
    options |= {"lars_adaptation": True, **BASE, **kwargs}
    group_options = [options, {**options, **second}]
    ws = _params(torch.float64)
    vs: list[Tensor | None] = [None] * len(ws)
    for step in range(steps):
        for i, g in enumerate(_grads(step)):
            if g is None:
                continue
            o = group_options[i % 2]
            lr = _lr(step) * (0.5 if i % 2 else 1.0)
            w = ws[i]
            if o["maximize"]:
                g = -g
            w_norm, g_norm = math.sqrt((w * w).sum().item()), math.sqrt((g * g).sum().item())
            trust = 1.0
            if o["lars_adaptation"] and w_norm > 0 and g_norm > 0:
                trust = o["trust_coefficient"] * w_norm / (g_norm + o["weight_decay"] * w_norm + o["eps"])
            d = g + o["weight_decay"] * w
            v = o["momentum"] * (vs[i] if vs[i] is not None else torch.zeros_like(w)) + lr * trust * d
            vs[i] = v
            ws[i] = w - (o["momentum"] * v + lr * trust * d if o["nesterov"] else v)
    return ws, vs


@pytest.mark.parametrize(("name", "kwargs", "second"), CASES, ids=[c[0] for c in CASES])
def test_reference_is_the_rule_in_float64(name, kwargs, second):
    opt, params = _run(torch.float64, kwargs, second, "reference")
    want_params, want_buffers = _truth(kwargs, second)
    for i, (p, want) in enumerate(zip(params, want_params, strict=True)):
        scale = max(want.abs().max().item() if want.numel() else 0.0, 1.0)
        assert max_err(p, want) <= 1e-12 * scale, f"param {i}: {max_err(p, want):.3g}"
        buf = opt.state[p]["momentum_buffer"]
        assert max_err(buf, want_buffers[i]) <= 1e-12 * scale, f"buffer {i}"


@pytest.mark.parametrize("backend", _backends())
def test_zero_param_and_zero_grad_take_the_plain_lr(backend):
    """Trust 1 where ‖w‖ = 0 or ‖g‖ = 0: the update is lr * d, not trust_coefficient * 0 (no update) or
    a division by zero (NaN). The fused backends run fp32, where every value here is exact but the
    decay's 0.1: d = wd * w differs from float64's by fp32's rounding of 0.1."""
    dtype = torch.float64 if backend == "reference" else torch.float32
    w0, w1 = torch.zeros(4, dtype=dtype), torch.full((3,), 2.0, dtype=dtype)
    opt = LARS([w0, w1], lr=0.5, momentum=0.0, weight_decay=0.1, backend=backend)
    w0.grad = torch.ones(4, dtype=dtype)
    w1.grad = torch.zeros(3, dtype=dtype)
    opt.step()
    assert torch.equal(w0, torch.full((4,), -0.5, dtype=dtype))  # 0 - 0.5 * 1
    decay = torch.tensor(0.1, dtype=dtype)
    assert torch.equal(w1, torch.full((3,), 2.0, dtype=dtype) - 0.5 * (decay * 2.0))  # d = wd * w


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize(("name", "kwargs", "second"), CASES, ids=[c[0] for c in CASES])
def test_fast_backends_match_reference(name, kwargs, second, backend, dtype):
    ref_opt, ref = _run(dtype, kwargs, second, "reference")
    fast_opt, fast = _run(dtype, kwargs, second, backend)
    for i, (want, got) in enumerate(zip(ref, fast, strict=True)):
        # The magnitude the update came from: the param's, and the buffer's (lr * trust * d).
        want_buf, got_buf = ref_opt.state[want]["momentum_buffer"], fast_opt.state[got]["momentum_buffer"]
        scale = max(want.abs().max().item(), want_buf.abs().max().item()) if want.numel() else 0.0
        assert max_err(got, want) <= fast_backend_bound(want, scale), f"param {i}: {max_err(got, want):.3g}"
        assert max_err(got_buf, want_buf) <= fast_backend_bound(want_buf, scale), f"buffer {i}"
        assert got_buf.dtype == dtype


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize(("name", "kwargs", "second"), CASES, ids=[c[0] for c in CASES])
def test_fast_backends_against_the_float64_rule(name, kwargs, second, backend):
    """fp32 runs of a fused backend and of the reference against the rule in float64 (_truth): the fused
    backend's error is at most twice the reference's, plus 2 fp32 ulps of the magnitude (module
    docstring)."""
    ref_opt, ref = _run(torch.float32, kwargs, second, "reference")
    fast_opt, fast = _run(torch.float32, kwargs, second, backend)
    want_params, want_buffers = _truth(kwargs, second)
    for i, (want, want_buf) in enumerate(zip(want_params, want_buffers, strict=True)):
        scale = max(want.abs().max().item(), want_buf.abs().max().item()) if want.numel() else 0.0
        floor = 2 * torch.finfo(torch.float32).eps * max(scale, 1.0)
        for label, mine, theirs, truth in (
            ("param", fast[i], ref[i], want),
            ("buffer", fast_opt.state[fast[i]]["momentum_buffer"], ref_opt.state[ref[i]]["momentum_buffer"],
             want_buf),
        ):  # fmt: skip
            allowed = 2 * max_err(theirs, truth) + floor
            assert max_err(mine, truth) <= allowed, f"{label} {i}: {max_err(mine, truth):.3g} > {allowed:.3g}"


@pytest.mark.parametrize("backend", FAST)
def test_fast_backends_repeat_bit_for_bit(backend):
    """The norms are reduced in a fixed order (no atomics): two runs give identical bits, and on the
    native CPU backend so do runs on one thread and on several (the 40,000-element tensor and the
    others exceed the size below which a call stays on the calling thread)."""
    threads = torch.get_num_threads()
    runs = []
    try:
        for n_threads in (threads, threads, 1, max(threads, 2)):
            torch.set_num_threads(n_threads)
            opt, params = _run(torch.float32, {"weight_decay": 0.05, "nesterov": True}, {}, backend)
            runs.append([t.clone() for p in params for t in (p, opt.state[p]["momentum_buffer"])])
    finally:
        torch.set_num_threads(threads)
    for run in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], run, strict=True))


@pytest.mark.parametrize("backend", TRITON)
def test_triton_norms_over_many_spans_and_partial_blocks(backend, monkeypatch):
    """Tiny spans and partial-row blocks (1 BLOCK per span, 2 rows summed per iteration) make the
    40,000-element tensor cover 40 spans, summed in 20 iterations: every index of the two-launch scheme
    is exercised, and a wrong span or row offset changes a trust ratio."""
    from resfast.kernels import triton_optim

    monkeypatch.setattr(triton_optim, "NORM_ITERS", 1)
    monkeypatch.setattr(triton_optim, "NORM_SPAN", triton_optim.BLOCK)
    monkeypatch.setattr(triton_optim, "PARTS_BLOCK", 2)
    kwargs = {"weight_decay": 0.05}
    ref_opt, ref = _run(torch.float32, kwargs, {}, "reference", steps=2)
    _, fast = _run(torch.float32, kwargs, {}, backend, steps=2)
    for i, (want, got) in enumerate(zip(ref, fast, strict=True)):
        want_buf = ref_opt.state[want]["momentum_buffer"]
        scale = max(want.abs().max().item(), want_buf.abs().max().item()) if want.numel() else 0.0
        assert max_err(got, want) <= fast_backend_bound(want, scale), f"param {i}"


def _clone(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.clone()


@pytest.mark.parametrize("backend", _backends())
def test_skipped_step_changes_nothing_and_scale_is_removed_before_the_norms(backend):
    """GradScaler's protocol (what GradScaler.step sets on an optimizer that unscales in its kernels):
    found_inf != 0 leaves params, buffers and grads bit-identical, on a first step and a later one;
    with found_inf = 0 a scaled grad (a power of two, exact) gives exactly the unscaled run, and the
    grad is written back unscaled."""
    opt, params = _run(torch.float32, {"weight_decay": 0.05}, {}, backend, steps=0)
    for step in range(3):
        _set_lr(opt, step)
        for p, g in zip(params, _grads(step), strict=True):
            p.grad = None if g is None else (g * 8).float()
        before = [(p.clone(), _clone(opt.state[p].get("momentum_buffer")), _clone(p.grad)) for p in params]
        opt.grad_scale, opt.found_inf = torch.tensor(8.0), torch.tensor(1.0)
        opt.step()
        for (w, b, g), p in zip(before, params, strict=True):
            assert torch.equal(p, w)
            if g is not None:
                assert torch.equal(p.grad, g)
            buf = opt.state[p].get("momentum_buffer")
            assert (b is None and (buf is None or not buf.any())) or torch.equal(buf, b)
        opt.found_inf = torch.tensor(0.0)
        opt.step()
    del opt.grad_scale, opt.found_inf
    plain_opt, plain = _run(torch.float32, {"weight_decay": 0.05}, {}, backend, steps=3)
    for p, q in zip(params, plain, strict=True):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["momentum_buffer"], plain_opt.state[q]["momentum_buffer"])
        assert (p.grad is None) == (q.grad is None)
        assert q.grad is None or torch.equal(p.grad, q.grad)  # unscaled in place


@pytest.mark.parametrize("backend", _backends())
def test_state_dict_round_trip(backend):
    """Save after two steps (through torch.save with weights_only=True), load into a fresh optimizer over
    cloned params; both then follow the same trajectory, bit for bit."""
    second = {"lars_adaptation": False, "weight_decay": 0.0}
    opt, params = _run(torch.float32, {"weight_decay": 0.05, "nesterov": True}, second, backend, steps=2)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    clones = [p.detach().clone() for p in params]
    other = LARS(_groups(clones, {}), lr=1.0, backend=backend)
    other.load_state_dict(saved)
    assert [g["lars_adaptation"] for g in other.param_groups] == [True, False]
    assert other.param_groups[0]["nesterov"] is True
    for step in range(2, 5):
        _set_lr(opt, step)
        _set_lr(other, step)
        for ps in (params, clones):
            for p, g in zip(ps, _grads(step), strict=True):
                p.grad = None if g is None else g.float()
        opt.step()
        other.step()
    for p, q in zip(params, clones, strict=True):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["momentum_buffer"], other.state[q]["momentum_buffer"])


BAD = [
    ({"lr": -0.1}, ValueError),
    ({"lr": float("nan")}, ValueError),
    ({"lr": torch.tensor([0.1, 0.2])}, ValueError),
    ({"momentum": -0.5}, ValueError),
    ({"weight_decay": -1e-4}, ValueError),
    ({"weight_decay": float("inf")}, ValueError),
    ({"trust_coefficient": 0.0}, ValueError),
    ({"eps": -1e-9}, ValueError),
    ({"nesterov": True, "momentum": 0.0}, ValueError),
    ({"momentum": "0.9"}, TypeError),
    ({"nesterov": 1}, TypeError),
]


@pytest.mark.parametrize(("kwargs", "error"), BAD, ids=[str(k) for k, _ in BAD])
def test_bad_hyperparameters_raise(kwargs, error):
    with pytest.raises(error, match=r"lr|momentum|weight_decay|trust_coefficient|eps|Nesterov|nesterov"):
        LARS([torch.zeros(2, requires_grad=True)], **{"lr": 0.1, **kwargs})


def test_bad_group_raises_before_it_is_added():
    p, q = torch.zeros(2, requires_grad=True), torch.zeros(3, requires_grad=True)
    opt = LARS([p], lr=0.1)
    with pytest.raises(TypeError, match="lars_adaptation"):
        opt.add_param_group({"params": [q], "lars_adaptation": "yes"})
    with pytest.raises(ValueError, match="trust_coefficient"):
        LARS([{"params": [p]}, {"params": [q], "trust_coefficient": -1.0}], lr=0.1)
    assert len(opt.param_groups) == 1


def _native_available(device: str) -> bool:
    try:
        backends.choose(torch.device(device), torch.float32, "cuda" if device == "cuda" else "cpu")
    except backends.BackendUnavailable:
        return False
    return True


def test_auto_picks_the_native_backend_and_env_override_raises_before_anything_changes(monkeypatch):
    """auto picks the native cpu backend on the CPU (the reference without the extension), as for the
    other optimizers; RESFAST_BACKEND naming a backend that cannot run CPU tensors raises at the step,
    before any state exists."""
    p = torch.ones(3, requires_grad=True)
    opt = LARS([p], lr=0.1)
    assert opt._choose_backend(p) == ("cpu" if _native_available("cpu") else "reference")
    monkeypatch.setenv(backends.ENV_VAR, "cuda")
    p.grad = torch.ones(3)
    with pytest.raises(backends.BackendUnavailable, match="cuda"):
        opt.step()
    assert torch.equal(p, torch.ones(3)) and not opt.state


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_picks_the_cuda_kernels_on_cuda():
    p = torch.ones(3, device="cuda", requires_grad=True)
    assert LARS([p], lr=0.1)._choose_backend(p) == ("cuda" if _native_available("cuda") else "triton")


def test_sparse_grads_are_refused():
    p = torch.zeros(4, requires_grad=True)
    opt = LARS([p], lr=0.1)
    p.grad = torch.zeros(4).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


def _names_by_group(model: nn.Module, groups: list[dict]) -> list[set[str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [{names[id(p)] for p in g["params"]} for g in groups]


def _expected_split(model: nn.Module) -> tuple[set[str], set[str]]:
    """Conv and Linear weights adapted; BN params and biases not, by module type."""
    adapted, plain = set(), set()
    for prefix, module in model.named_modules():
        for name, _ in module.named_parameters(recurse=False):
            full = f"{prefix}.{name}" if prefix else name
            conv_or_linear = isinstance(module, (nn.Conv2d, nn.Linear))
            (adapted if conv_or_linear and name == "weight" else plain).add(full)
    return adapted, plain


def test_lars_param_groups_on_resnet18_and_its_fused_form():
    torchvision = pytest.importorskip("torchvision")
    from resfast.nn import BatchNormAddReLU, fuse_resnet

    model = torchvision.models.resnet18(num_classes=10)
    for m in (model, fuse_resnet(torchvision.models.resnet18(num_classes=10))):
        groups = lars_param_groups(m, 5e-5)
        assert [(g["weight_decay"], g["lars_adaptation"]) for g in groups] == [(5e-5, True), (0.0, False)]
        adapted, plain = _names_by_group(m, groups)
        assert (adapted, plain) == _expected_split(m)
        assert len(adapted) == 21 and "fc.weight" in adapted and "conv1.weight" in adapted  # 20 convs + fc
        assert "fc.bias" in plain and "bn1.weight" in plain and len(plain) == 41  # 20 BNs x 2 + fc.bias
    fused_bns = [n for n, mod in m.named_modules() if isinstance(mod, BatchNormAddReLU)]
    assert fused_bns and all(f"{n}.weight" in plain and f"{n}.bias" in plain for n in fused_bns)
    # The groups drive a step: adapted weights move by the trust-scaled lr, BN params by the plain lr.
    opt = LARS(lars_param_groups(m, 5e-5), lr=0.1, backend="reference")
    m(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    assert {g["lars_adaptation"] for g in opt.param_groups} == {True, False}


def test_lars_param_groups_rejects_a_negative_decay_and_lists_shared_params_once():
    shared = nn.Linear(3, 3)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    groups = lars_param_groups(model, 0.0)
    assert [len(g["params"]) for g in groups] == [1, 1]
    with pytest.raises(ValueError, match="weight_decay"):
        lars_param_groups(model, -1.0)


def test_quadratic_loss_decreases_and_lars_is_exported():
    assert resfast.optim.LARS is LARS and "lars_param_groups" in resfast.optim.__all__
    w = torch.full((10,), 3.0, requires_grad=True)
    opt = LARS([w], lr=1.0, trust_coefficient=0.1, weight_decay=0.0)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = (w**2).sum()
        loss.backward()
        losses.append(loss.item())
        opt.step()
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("backend", _backends())
def test_with_a_real_grad_scaler(backend):
    """torch.amp.GradScaler drives the step: an inf backs the scale off and changes nothing, and a
    finite step equals the unscaled run (2^10 scales are exact)."""
    finals = []
    for poisoned in (False, True):
        w = torch.linspace(-1.0, 2.0, 37).requires_grad_()
        opt = LARS([w], lr=2.0, trust_coefficient=0.05, weight_decay=0.01, backend=backend)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        for step in range(3):
            opt.zero_grad()
            loss = (w * torch.arange(37.0) * (step + 1)).square().sum()
            if poisoned and step == 1:
                loss = loss * float("inf")
            before = (w.detach().clone(), _clone(opt.state[w].get("momentum_buffer")))
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            if poisoned and step == 1:
                assert scaler.get_scale() == 512.0 and torch.equal(w, before[0])
                assert torch.equal(opt.state[w]["momentum_buffer"], before[1])
        finals.append((w.detach().clone(), opt.state[w]["momentum_buffer"].clone()))
    # The poisoned run skipped step 1; the clean run took it: so they differ, and the skip was real.
    assert not torch.equal(finals[0][0], finals[1][0])
    clean = torch.linspace(-1.0, 2.0, 37).requires_grad_()
    opt = LARS([clean], lr=2.0, trust_coefficient=0.05, weight_decay=0.01, backend=backend)
    for step in (0, 2):
        opt.zero_grad()
        (clean * torch.arange(37.0) * (step + 1)).square().sum().backward()
        opt.step()
    assert torch.equal(clean, finals[1][0])
    assert torch.equal(opt.state[clean]["momentum_buffer"], finals[1][1])


class _Counting:
    """A Triton kernel whose launches are counted."""

    def __init__(self, kernel, counts: list[str]) -> None:
        self.kernel, self.counts = kernel, counts

    def __getitem__(self, grid):
        self.counts.append(self.kernel.__name__)
        return self.kernel[grid]


@pytest.mark.parametrize("backend", NATIVE_CPU)
def test_native_cpu_runs_one_op_per_bucket(backend, monkeypatch):
    """One lars_ call per (group, dtype) bucket and step, with adaptation as the group says, whichever
    way resfast.kernels.cext reaches the op (torch.ops.resfast.lars_, or a kept call's PreparedUpdate)."""
    import resfast._C

    from resfast.kernels import cext

    calls: list[tuple[str, bool]] = []
    ops = cext._ops

    class _Recording:
        def __getattr__(self, name):
            op = getattr(ops, name)
            if name != "lars_":
                return op
            return lambda *args, **kw: calls.append(("op", kw["lars_adaptation"])) or op(*args, **kw)

    class _Prepared(resfast._C.PreparedUpdate):
        def run(self, *args, **options):
            calls.append(("prepared", options["lars_adaptation"]))
            super().run(*args, **options)

    monkeypatch.setattr(cext, "_ops", _Recording())
    monkeypatch.setattr(resfast._C, "PreparedUpdate", _Prepared)
    mixed = [torch.randn(n) for n in (3, 2000, 1)] + [torch.randn(5, dtype=torch.bfloat16)]
    plain = [torch.randn(n) for n in (4, 6)]
    opt = LARS([{"params": mixed}, {"params": plain, "lars_adaptation": False}], lr=0.1, backend=backend)
    for _ in range(3):
        for p in mixed + plain:
            p.grad = torch.randn_like(p)
        opt.step()
    assert sorted(adapted for _, adapted in calls) == [False] * 3 + [True] * 6


@pytest.mark.parametrize("backend", NATIVE_CPU)
def test_native_lars_refuses_the_low_precision_modes(backend):
    """LARS offers no master weights or stochastic rounding; a direct call of the native update with
    either is refused, naming the backends that have them, before any tensor changes."""
    from resfast.kernels import cext

    w, g, v = (torch.full((4,), x, dtype=torch.bfloat16) for x in (1.0, 1.0, 0.0))
    options = {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.0, "trust_coefficient": 0.02, "eps": 0.0,
               "lars_adaptation": True, "nesterov": False, "maximize": False}  # fmt: skip
    for extra in ({"master_params": [torch.ones(4)]}, {"stochastic_seed": 1}):
        with pytest.raises(NotImplementedError, match="triton or reference"):
            cext.lars([w], [g], [v], **options, **extra)
    assert torch.equal(w, torch.ones(4, dtype=torch.bfloat16))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("adaptation", [True, False], ids=["adapted", "plain"])
def test_cuda_launches_per_bucket_without_host_sync(adaptation):
    """On the cuda backend a step launches two kernels per bucket with adaptation (lars_norms, then
    lars_update), one without, whatever the number of tensors; and it reads nothing back to the host
    (torch.cuda.set_sync_debug_mode raises on a synchronising call)."""
    if not _native_available("cuda"):
        pytest.skip("resfast._C was built without CUDA kernels")
    from torch.profiler import ProfilerActivity, profile

    params = [torch.randn(n, device="cuda") for n in (3, 5000, 1, 70000)]
    opt = LARS([{"params": params, "lars_adaptation": adaptation}], lr=0.1, weight_decay=1e-4, backend="cuda")
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # creates the state and the device work table
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
    # Device kernels carry their own names; the host's launch events are named cudaLaunchKernel.
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    kernels = [k for e in events for k in ("lars_norms", "lars_update") if k in e.name]
    assert kernels == (["lars_norms", "lars_update"] if adaptation else ["lars_update"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(("name", "kwargs", "second"), CASES, ids=[c[0] for c in CASES])
def test_cuda_matches_reference_and_repeats_bit_for_bit(name, kwargs, second, dtype):
    """The CUDA kernels on the GPU against the reference on the GPU (fast_backend_bound, module
    docstring), and two runs identical to the bit."""
    if not _native_available("cuda"):
        pytest.skip("resfast._C was built without CUDA kernels")

    def run(backend):
        params = [p.cuda() for p in _params(dtype)]
        opt = LARS(_groups(params, second), **{**BASE, **kwargs}, backend=backend)
        for step in range(STEPS):
            _set_lr(opt, step)
            for p, g in zip(params, _grads(step), strict=True):
                p.grad = None if g is None else g.to("cuda", dtype)
            opt.step()
        return [(p, opt.state[p]["momentum_buffer"]) for p in params]

    ref, fast, again = run("reference"), run("cuda"), run("cuda")
    for i, ((want, want_buf), (got, got_buf), (p2, b2)) in enumerate(zip(ref, fast, again, strict=True)):
        scale = max(want.abs().max().item(), want_buf.abs().max().item()) if want.numel() else 0.0
        assert max_err(got, want) <= fast_backend_bound(want, scale), f"param {i}: {max_err(got, want):.3g}"
        assert max_err(got_buf, want_buf) <= fast_backend_bound(want_buf, scale), f"buffer {i}"
        assert torch.equal(got, p2) and torch.equal(got_buf, b2), f"tensor {i} differs between runs"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_step_replays_in_a_cuda_graph():
    """A captured cuda-backend step (norms and update, a tensor lr) replays exactly like eager steps."""
    if not _native_available("cuda"):
        pytest.skip("resfast._C was built without CUDA kernels")
    results = []
    for mode in ("eager", "graph"):
        gen = torch.Generator().manual_seed(0)
        params = [torch.randn(n, generator=gen).cuda() for n in (3, 5000, 1, 70000)]
        lr = torch.tensor(0.5, device="cuda")
        opt = LARS(params, lr=lr, weight_decay=1e-4, trust_coefficient=0.02, backend="cuda")
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).cuda()
        opt.step()  # warm-up: creates the state and the cached work table outside the capture
        if mode == "eager":
            for value in (0.4, 0.3, 0.2):
                lr.fill_(value)
                opt.step()
        else:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                opt.step()
            for value in (0.4, 0.3, 0.2):
                lr.fill_(value)
                graph.replay()
        results.append([t.clone() for p in params for t in (p, opt.state[p]["momentum_buffer"])])
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


@pytest.mark.parametrize("backend", TRITON)
def test_triton_launches_per_bucket(backend, monkeypatch):
    """Two launches per (group, dtype) bucket with adaptation (norms, update), one without, whatever the
    number of tensors; an fp32 and a bf16 bucket in one group are two buckets."""
    from resfast.kernels import triton_optim

    counts: list[str] = []
    monkeypatch.setattr(
        triton_optim, "_lars_norms_kernel", _Counting(triton_optim._lars_norms_kernel, counts)
    )
    monkeypatch.setitem(triton_optim._KERNELS, "lars", _Counting(triton_optim._lars_kernel, counts))
    mixed = [torch.randn(n) for n in (3, 2000, 1)] + [torch.randn(5, dtype=torch.bfloat16)]
    plain = [torch.randn(n) for n in (4, 6)]
    opt = LARS([{"params": mixed}, {"params": plain, "lars_adaptation": False}], lr=0.1, backend=backend)
    for p in mixed + plain:
        p.grad = torch.randn_like(p)
    opt.step()
    assert sorted(counts) == sorted(["_lars_norms_kernel", "_lars_kernel"] * 2 + ["_lars_kernel"])


@pytest.mark.parametrize("backend", _backends())
def test_tensor_lr_equals_float_lr_and_no_grads_change_nothing(backend):
    runs = []
    for lr in (0.5, torch.tensor(0.5)):
        w = torch.linspace(-1.0, 1.0, 9)
        opt = LARS([w], lr=lr, weight_decay=0.1, trust_coefficient=0.1, backend=backend)
        opt.step()  # no grad yet: nothing happens, no state is made
        assert torch.equal(w, torch.linspace(-1.0, 1.0, 9)) and not opt.state
        w.grad = torch.linspace(2.0, 3.0, 9)
        assert opt.step(lambda: 7.0) == 7.0  # the closure's loss comes back
        runs.append(w)
    assert torch.equal(*runs)
