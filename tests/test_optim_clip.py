"""Gradient clipping inside the step (``max_grad_norm``): the same update as
``torch.nn.utils.clip_grad_norm_(params, max_grad_norm)`` followed by ``step()``, on every optimizer and
backend, without writing the grads.

Tolerances follow tests/test_optim_parity.py: against a float64 run of torch (clip_grad_norm_ + torch's
optimizer), resfast's error is at most twice torch's own error in the same dtype plus 8 ulps of the
tensor's magnitude; fast backends against the reference backend within fp32 reassociation (4 fp32 ulps)
or one rounding of the stored low-precision value (2 ulps of the dtype).
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

import resfast.optim
from resfast import backends
from tests.optim_cases import CASES, backend_params, case_id
from tests.optim_helpers import (
    build,
    device_backend_params,
    make_grads,
    make_params,
    max_err,
    state_tensors,
    ulp,
)

STEPS = 4
# make_grads' global norm is 9 to 65 per step: 3.0 clips every step, 1e3 never does.
CLIPPING, NOT_CLIPPING = 3.0, 1e3
# One case per optimizer with most of its options on, so the clip meets every update's maths.
MIXED = [
    ("SGD", {"lr": 0.1, "momentum": 0.5, "weight_decay": 0.1, "nesterov": True}),
    ("RMSprop", {"centered": True, "momentum": 0.5, "weight_decay": 0.1, "maximize": True}),
    ("Adagrad", {"lr_decay": 0.05, "weight_decay": 0.1}),
    ("Adam", {"amsgrad": True, "weight_decay": 0.1, "maximize": True}),
    ("AdamW", {"weight_decay": 0.1}),
]


def _torch_clipped(name, kwargs, dtype, max_norm, device="cpu", grad_dtype=None):
    """torch's optimizer after clip_grad_norm_ at every step; also the norms clip_grad_norm_ returned."""
    params = make_params(dtype, device)
    opt = build(name, "torch", params, kwargs)
    norms = []
    for step in range(STEPS):
        for p, g in zip(params, make_grads(step, len(params)), strict=True):
            p.grad = None if g is None else g.to(grad_dtype or dtype).to(device, p.dtype)
        norms.append(torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], max_norm))
        opt.step()
    return opt, params, norms


def _resfast_clipped(name, kwargs, dtype, max_norm, backend, device="cpu"):
    params = make_params(dtype, device)
    opt = build(name, "resfast", params, {**kwargs, "max_grad_norm": max_norm}, backend)
    norms, grads_kept = [], True
    for step in range(STEPS):
        grads = make_grads(step, len(params))
        for p, g in zip(params, grads, strict=True):
            p.grad = None if g is None else g.to(device, p.dtype)
        given = [None if p.grad is None else p.grad.clone() for p in params]
        opt.step()
        norms.append(opt.grad_norm.clone())
        # The step clips inside the kernel: .grad keeps what backward wrote.
        grads_kept &= all(g is None or torch.equal(p.grad, g) for p, g in zip(params, given, strict=True))
    return opt, params, norms, grads_kept


def _assert_parity(truth_opt, truth, torch_opt, theirs, ours_opt, ours, dtype):
    expected, got = state_tensors(truth_opt, truth), state_tensors(ours_opt, ours)
    torch_values = state_tensors(torch_opt, theirs)
    assert [n for n, _ in got] == [n for n, _ in expected]
    for (label, want), (_, mine), (_, torch_value) in zip(expected, got, torch_values, strict=True):
        if label.endswith(".step"):
            assert torch.equal(mine.cpu().double(), want.double()), label
            continue
        scale = want.abs().max().item() if want.numel() else 0.0
        bound = 2 * max_err(torch_value, want) + 8 * ulp(dtype) * max(scale, 1e-3)
        assert max_err(mine, want) <= bound, f"{label}: error {max_err(mine, want):.3g} > {bound:.3g}"


@pytest.mark.parametrize("max_norm", [CLIPPING, NOT_CLIPPING], ids=["clipping", "not-clipping"])
@pytest.mark.parametrize("device, backend", device_backend_params())
@pytest.mark.parametrize("case", MIXED, ids=case_id)
def test_matches_clip_grad_norm_then_torch_step(case, device, backend, max_norm):
    name, kwargs = case
    f32 = torch.float32
    truth_opt, truth, truth_norms = _torch_clipped(name, kwargs, torch.float64, max_norm, grad_dtype=f32)
    torch_opt, theirs, torch_norms = _torch_clipped(name, kwargs, f32, max_norm)
    ours_opt, ours, norms, grads_kept = _resfast_clipped(name, kwargs, f32, max_norm, backend, device)

    # The case is what its name says: every step clips, or none does.
    assert all((n > max_norm) == (max_norm == CLIPPING) for n in truth_norms)
    _assert_parity(truth_opt, truth, torch_opt, theirs, ours_opt, ours, torch.float32)
    for mine, want in zip(norms, torch_norms, strict=True):
        # torch's own norm function on the same fp32 grads, on the params' device; the per-tensor norms are
        # combined in group order here, in list order there: a few ulps apart at most.
        assert mine.device.type == device and mine.dtype == torch.float32
        assert max_err(mine, want) <= 4 * ulp(torch.float32) * want.item()
    assert grads_kept


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_every_option_on_the_reference(case):
    name, kwargs = case
    truth_opt, truth, _ = _torch_clipped(name, kwargs, torch.float64, CLIPPING, grad_dtype=torch.float32)
    torch_opt, theirs, _ = _torch_clipped(name, kwargs, torch.float32, CLIPPING)
    ours_opt, ours, _, _ = _resfast_clipped(name, kwargs, torch.float32, CLIPPING, "reference")
    _assert_parity(truth_opt, truth, torch_opt, theirs, ours_opt, ours, torch.float32)


FAST = [b for b in backend_params() if b.values[0] != "reference"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("case", MIXED, ids=case_id)
def test_low_precision_fast_backends_match_the_reference(case, backend, dtype):
    name, kwargs = case
    ref_opt, ref, ref_norms, _ = _resfast_clipped(name, kwargs, dtype, CLIPPING, "reference")
    fast_opt, fast, norms, _ = _resfast_clipped(name, kwargs, dtype, CLIPPING, backend)
    pairs = zip(state_tensors(ref_opt, ref), state_tensors(fast_opt, fast), strict=True)
    for (label, want), (_, got) in pairs:
        scale = want.abs().max().item() if want.numel() else 0.0
        assert max_err(got, want) <= 2 * ulp(dtype) * max(scale, 1.0), label
    # The norm is torch's get_total_norm on both backends: the same number.
    assert all(torch.equal(a, b) for a, b in zip(norms, ref_norms, strict=True))


@pytest.mark.parametrize("max_norm", [CLIPPING, NOT_CLIPPING], ids=["clipping", "not-clipping"])
@pytest.mark.parametrize("backend", backend_params())
def test_lars_matches_clip_grad_norm_then_lars(backend, max_norm):
    """LARS has no torch counterpart: its reference backend, fed grads clipped by clip_grad_norm_, is the
    expectation. Mixed groups, so the trust ratio sees the clipped grad's norm where it adapts."""

    def groups(params):
        return [
            {"params": params[::2], "weight_decay": 0.01},
            {"params": params[1::2], "lars_adaptation": False, "weight_decay": 0.0},
        ]

    kwargs = {"lr": 0.5, "momentum": 0.9, "nesterov": True, "trust_coefficient": 0.02}
    want_params = make_params(torch.float32)
    want_opt = resfast.optim.LARS(groups(want_params), backend="reference", **kwargs)
    params = make_params(torch.float32)
    opt = resfast.optim.LARS(groups(params), backend=backend, max_grad_norm=max_norm, **kwargs)
    for step in range(STEPS):
        for ps in (want_params, params):
            for p, g in zip(ps, make_grads(step, len(ps)), strict=True):
                p.grad = None if g is None else g.to(p.dtype)
        torch.nn.utils.clip_grad_norm_([p for p in want_params if p.grad is not None], max_norm)
        want_opt.step()
        opt.step()
    pairs = zip(state_tensors(want_opt, want_params), state_tensors(opt, params), strict=True)
    for (label, want), (_, got) in pairs:
        scale = want.abs().max().item() if want.numel() else 0.0
        assert max_err(got, want) <= 8 * ulp(torch.float32) * max(scale, 1.0), label


@pytest.mark.parametrize("backend", backend_params())
def test_the_norm_spans_every_group_and_only_grads_that_exist(backend):
    gen = torch.Generator().manual_seed(3)
    a, b, c = (torch.randn(n, generator=gen) for n in (5, 7, 3))
    groups = [{"params": [a]}, {"params": [b, c], "lr": 0.5}]
    opt = resfast.optim.SGD(groups, lr=1.0, max_grad_norm=1.0, backend=backend)
    a.grad, b.grad = torch.full((5,), 2.0), torch.full((7,), -1.0)
    a0, b0, c0 = a.clone(), b.clone(), c.clone()
    opt.step()
    norm = (5 * 4.0 + 7 * 1.0) ** 0.5
    assert opt.grad_norm.item() == pytest.approx(norm, rel=1e-6)
    clip = 1.0 / (norm + 1e-6)
    torch.testing.assert_close(a, a0 - 1.0 * 2.0 * clip)
    torch.testing.assert_close(b, b0 + 0.5 * 1.0 * clip)
    assert torch.equal(c, c0)  # no grad: untouched, and not in the norm


@pytest.mark.parametrize("backend", backend_params())
def test_grad_scaler_scale_is_removed_before_the_norm_and_a_skipped_step_changes_nothing(backend):
    """What GradScaler does with an optimizer that unscales in its kernels: grad_scale/found_inf."""
    kwargs = {"lr": 1e-2, "amsgrad": True, "weight_decay": 0.1}
    want_params, params = make_params(torch.float32), make_params(torch.float32)
    want = build("Adam", "resfast", want_params, {**kwargs, "max_grad_norm": CLIPPING}, backend)
    opt = build("Adam", "resfast", params, {**kwargs, "max_grad_norm": CLIPPING}, backend)
    for step in range(STEPS):
        grads = make_grads(step, len(params))
        for p, q, g in zip(want_params, params, grads, strict=True):
            p.grad = None if g is None else g.float()
            q.grad = None if g is None else g.float() * 1024.0  # scaled by a power of two: exact
        opt.grad_scale, opt.found_inf = torch.tensor(1024.0), torch.tensor(0.0)
        want.step()
        opt.step()
        assert torch.equal(opt.grad_norm, want.grad_norm)
    for (label, a), (_, b) in zip(state_tensors(want, want_params), state_tensors(opt, params), strict=True):
        scale = a.abs().max().item() if a.numel() else 0.0
        assert max_err(b, a) <= 4 * ulp(torch.float32) * max(scale, 1.0), label

    before = [t.clone() for _, t in state_tensors(opt, params)]
    for p in params:
        if p.grad is not None:
            p.grad.fill_(float("inf"))
    opt.grad_scale, opt.found_inf = torch.tensor(1024.0), torch.tensor(1.0)
    opt.step()
    assert all(torch.equal(a, b) for a, (_, b) in zip(before, state_tensors(opt, params), strict=True))
    assert opt.grad_norm.isinf()  # what clip_grad_norm_ would report for those grads


def test_with_a_real_grad_scaler():
    """torch's GradScaler drives the step (fp16 autocast on the CPU): the result equals unscale_ +
    clip_grad_norm_ + torch's SGD, and the scaler's bookkeeping is unchanged."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    twin = copy.deepcopy(model)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    ours = resfast.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, max_grad_norm=0.05)
    theirs = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    scalers = [torch.amp.GradScaler("cpu", init_scale=256.0) for _ in range(2)]
    for _ in range(3):
        for net, opt, scaler in ((model, ours, scalers[0]), (twin, theirs, scalers[1])):
            loss = torch.nn.functional.cross_entropy(net(x), y)
            opt.zero_grad()
            scaler.scale(loss).backward()
            if opt is theirs:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(net.parameters(), 0.05)
            scaler.step(opt)
            scaler.update()
    assert scalers[0].get_scale() == scalers[1].get_scale()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_no_grads_and_no_clipping_leave_grad_norm_empty():
    p = torch.ones(3)
    opt = resfast.optim.Adam([p], max_grad_norm=1.0)
    opt.step()  # no grads: nothing to clip, nothing changes
    assert opt.grad_norm is None and torch.equal(p, torch.ones(3))
    plain = resfast.optim.Adam([p])
    p.grad = torch.ones(3)
    plain.step()
    assert plain.max_grad_norm is None and plain.grad_norm is None


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), True, "1.0", [1.0]], ids=repr)
@pytest.mark.parametrize("name", ["SGD", "RMSprop", "Adagrad", "Adam", "AdamW", "LARS"])
def test_bad_max_grad_norm_raises(name, bad):
    kwargs = {"lr": 0.1} if name in ("SGD", "LARS") else {}
    with pytest.raises(ValueError, match="Invalid max_grad_norm value"):
        getattr(resfast.optim, name)([torch.zeros(2, requires_grad=True)], max_grad_norm=bad, **kwargs)


def test_max_grad_norm_survives_pickling_copying_and_loading_a_state_dict():
    p = torch.nn.Parameter(torch.ones(4))
    opt = resfast.optim.RMSprop([p], max_grad_norm=2.5)
    p.grad = torch.full((4,), 10.0)
    opt.step()
    for other in (pickle.loads(pickle.dumps(opt)), copy.deepcopy(opt)):
        assert other.max_grad_norm == 2.5
    fresh = resfast.optim.RMSprop([p], max_grad_norm=0.5)
    fresh.load_state_dict(opt.state_dict())
    assert fresh.max_grad_norm == 0.5  # an option of the optimizer, like backend: not in the state_dict


def test_sparse_adagrad_grads_are_clipped_as_clip_grad_norm_does():
    def run(clip_inside: bool):
        emb = torch.nn.Embedding(10, 3, sparse=True)
        torch.nn.init.constant_(emb.weight, 0.5)
        if clip_inside:
            opt = resfast.optim.Adagrad(emb.parameters(), lr=0.5, max_grad_norm=0.1)
        else:
            opt = torch.optim.Adagrad(emb.parameters(), lr=0.5)
        for ids in (torch.tensor([1, 2, 2]), torch.tensor([7, 1])):
            opt.zero_grad()
            (emb(ids) * torch.arange(3.0)).sum().backward()
            if not clip_inside:
                torch.nn.utils.clip_grad_norm_(emb.parameters(), 0.1)
            opt.step()
        return emb.weight.detach()

    clipped = run(True)
    torch.testing.assert_close(clipped, run(False))
    assert not torch.equal(clipped[1], torch.full((3,), 0.5))  # it moved: the comparison means something


def test_dtensor_grads_raise_naming_clip_grad_norm(tmp_path):
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs torch.distributed with gloo")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        p = torch.nn.Parameter(distribute_tensor(torch.ones(4), mesh))
        opt = resfast.optim.SGD([p], lr=0.1, max_grad_norm=1.0, backend="reference")
        p.grad = distribute_tensor(torch.ones(4), mesh)
        before = p.detach().full_tensor().clone()
        with pytest.raises(NotImplementedError, match="clip_grad_norm_"):
            opt.step()
        assert torch.equal(p.detach().full_tensor(), before)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_params_on_two_devices_share_one_norm():
    params = [torch.ones(5, device="cuda:0"), torch.ones(7, device="cuda:1")]
    twins = [p.clone() for p in params]
    opt = resfast.optim.SGD(params, lr=0.1, max_grad_norm=1.0)
    theirs = torch.optim.SGD(twins, lr=0.1)
    for ps in (params, twins):
        ps[0].grad = torch.full((5,), 3.0, device="cuda:0")
        ps[1].grad = torch.full((7,), -2.0, device="cuda:1")
    torch.nn.utils.clip_grad_norm_(twins, 1.0)
    opt.step()
    theirs.step()
    for a, b in zip(params, twins, strict=True):
        torch.testing.assert_close(a, b)


# The native CPU norm (resfast._C's total_norm), which the step uses for CPU grads.
NATIVE = backends.native_runs("cpu")


@pytest.mark.skipif(not NATIVE, reason="needs the native extension")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_native_total_norm_is_torchs_norm_in_torchs_dtype(dtype):
    """Odd sizes, an empty tensor, a transposed (dense) and a sliced (not dense) view, and a tensor of
    several chunks; the result is torch's get_total_norm's dtype, within rounding of the float64 norm."""
    from resfast.kernels import cext

    gen = torch.Generator().manual_seed(0)
    tensors = [
        torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in [(0,), (1,), (7, 3), (40000,)]
    ]
    tensors += [
        torch.randn(5, 9, generator=gen).to(dtype).t(),
        torch.randn(6, 10, generator=gen).to(dtype)[:, 1::3],
    ]
    want = torch.linalg.vector_norm(torch.cat([t.double().reshape(-1) for t in tensors]))
    got = cext.total_norm(tensors)
    assert got.dtype == torch.nn.utils.get_total_norm(tensors).dtype == dtype and got.shape == ()
    # The sums run in float64: one rounding of the exact norm to a 16- or 32-bit dtype; for float64
    # itself, the sum's own rounding over ~40K terms in a few accumulators (a few ulps; 16 allowed).
    ulps = 16 if dtype == torch.float64 else 1
    assert abs(got.double() - want).item() <= ulps * torch.finfo(dtype).eps * want.item()


@pytest.mark.skipif(not NATIVE, reason="needs the native extension")
def test_native_total_norm_is_deterministic_and_propagates_inf_and_nan():
    from resfast.kernels import cext

    tensors = [torch.randn(70000), torch.randn(3), torch.randn(100000)]
    threads = torch.get_num_threads()
    try:
        norms = []
        for count in (1, 2):
            torch.set_num_threads(count)
            norms.append(cext.total_norm(tensors))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(norms[0], norms[1])
    tensors[1][2] = float("inf")
    assert cext.total_norm(tensors).isinf()
    tensors[0][5] = float("nan")
    assert cext.total_norm(tensors).isnan()
    # A mix of dtypes promotes as torch does; sparse and integer tensors are refused.
    assert cext.total_norm([torch.ones(2, dtype=torch.bfloat16), torch.ones(2)]).dtype == torch.float32
    with pytest.raises(RuntimeError, match="float32/float64/bfloat16/float16"):
        cext.total_norm([torch.ones(2, dtype=torch.int64)])
    with pytest.raises(NotImplementedError, match="SparseCPU"):  # the dispatcher's own refusal
        cext.total_norm([torch.ones(2).to_sparse()])


@pytest.mark.skipif(not NATIVE, reason="needs the native extension")
def test_native_grads_norm_reads_every_groups_grads():
    """resfast._C.grads_norm: the grads of every list's params (None grads skipped) in one total_norm,
    bit for bit; nothing to read without grads; None (torch's path) when a grad is not a plain strided
    CPU tensor of the four dtypes."""
    from resfast.kernels import cext

    gen = torch.Generator().manual_seed(1)
    dtypes = (torch.float32, torch.bfloat16, torch.float32, torch.float32)
    params = [
        torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype))
        for s, dtype in zip([(3, 5), (7,), (40000,), (2, 2)], dtypes, strict=True)
    ]
    assert cext.grads_norm([params[:2], params[2:]]) == (False, None)
    for p in params[:3]:
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
    found, norm = cext.grads_norm([params[:2], [], params[2:]])
    assert found and torch.equal(norm, cext.total_norm([p.grad for p in params[:3]]))
    assert norm.dtype == torch.float32
    params[3].grad = torch.ones(2, 2).to_sparse()
    assert cext.grads_norm([params]) == (True, None)
    for odd in (torch.ones(2, 2, dtype=torch.complex64), torch.ones(2, 2, device="meta")):
        params[3] = torch.nn.Parameter(odd.clone())
        params[3].grad = odd
        assert cext.grads_norm([params]) == (True, None), odd
    with pytest.raises(RuntimeError, match="lists of params"):
        cext.grads_norm([tuple(params)])


@pytest.mark.skipif(not NATIVE, reason="needs the native extension")
def test_a_cpu_step_takes_the_native_norm(monkeypatch):
    """CPU grads go to the native norm, not torch's get_total_norm (the same number: the tests above)."""
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))]
    opt = resfast.optim.SGD(params, lr=0.1, backend="cpu", max_grad_norm=0.5)
    for p in params:
        p.grad = torch.randn_like(p)
    monkeypatch.setattr(torch.nn.utils, "get_total_norm", lambda *a, **k: pytest.fail("torch's norm ran"))
    opt.step()
    want = torch.linalg.vector_norm(torch.cat([p.grad.reshape(-1) for p in params]))
    torch.testing.assert_close(opt.grad_norm, want)
