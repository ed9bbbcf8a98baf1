"""The CPU side of the native extension beyond the optimizer parity suites: every instruction-set build
of the kernels, the native layout rule the optimizers use at every step, and the step counter op."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from resfast import backends
from resfast.optim._layout import fast_layout

ext, why = backends.native_extension()
pytestmark = pytest.mark.skipif(ext is None, reason=f"native extension not built: {why}")

# ATen's levels, lowest first; a machine runs its own and every lower one.
_LEVELS = ["default", "avx2", "avx512"]


def _machine_level() -> str:
    level = torch.backends.cpu.get_cpu_capability().lower()
    return level if level in _LEVELS else "default"


# Run in a fresh process, since torch fixes its CPU capability (ATEN_CPU_CAPABILITY) at first use. Sizes
# cover one element, vector tails of every 16-bit and 32-bit width, and a tensor of several parallel
# chunks (16384 elements each) with a tail (LARS's norm pass sums it per chunk). Each optimizer runs 3
# steps on the cpu backend and on the reference from the same state; every param and state must agree
# within 4 ulps of the storage dtype of the tensor's largest element: both compute in float32 but in
# another order (and ATen's vector maths may fuse multiply-adds; LARS sums its norms in another order),
# and 16-bit stores can round such differences to a whole ulp.
_SCRIPT = textwrap.dedent(
    """
    import sys, torch, resfast, resfast._C as C
    want = sys.argv[1]
    assert C.cpu_kernel_isa() == want, (C.cpu_kernel_isa(), want)
    cases = [
        ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01, maximize=True)),
        ("SGD", dict(lr=0.1)),
        ("RMSprop", dict(lr=0.01, centered=True, momentum=0.9, weight_decay=0.01)),
        ("RMSprop", dict(lr=0.01)),
        ("Adagrad", dict(lr=0.1, lr_decay=0.01, weight_decay=0.01)),
        ("Adam", dict(lr=0.01, amsgrad=True, weight_decay=0.01)),
        ("AdamW", dict(lr=0.01)),
        ("LARS", dict(lr=1.0, trust_coefficient=0.02, weight_decay=0.01, nesterov=True)),
        ("LARS", dict(lr=0.5, momentum=0.0, maximize=True)),
    ]
    sizes = [1, 7, 15, 17, 31, 33, 2 * 16384 + 5]
    checked = 0
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for name, kwargs in cases:
            gen = torch.Generator().manual_seed(0)
            start = [torch.randn(n, generator=gen).to(dtype) for n in sizes]
            grads = [[torch.randn(n, generator=gen).to(dtype) for n in sizes] for _ in range(3)]
            runs = []
            for backend in ("cpu", "reference"):
                params = [torch.nn.Parameter(t.clone()) for t in start]
                opt = getattr(resfast.optim, name)(params, backend=backend, **kwargs)
                for step_grads in grads:
                    for p, g in zip(params, step_grads):
                        p.grad = g.clone()
                    opt.step()
                runs.append([p.detach() for p in params] + [
                    s for p in params for s in opt.state[p].values() if s.numel() == p.numel()
                ])
            eps = torch.finfo(dtype).eps
            for got, want_t in zip(*runs):
                got, want_t = got.double(), want_t.double()
                assert torch.isfinite(got).all() and torch.isfinite(want_t).all(), (name, dtype)
                err = (got - want_t).abs().max().item() / (want_t.abs().max().item() or 1.0)
                assert err <= 4 * eps, (name, kwargs, dtype, err)
                checked += 1
    print("checked", checked)
    """
)


@pytest.mark.parametrize("level", _LEVELS)
def test_every_instruction_set_build_matches_the_reference(level: str) -> None:
    if _LEVELS.index(level) > _LEVELS.index(_machine_level()):
        pytest.skip(f"this CPU runs up to {_machine_level()}, not {level}")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": level}
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT, level], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # 3 dtypes x 9 cases x (7 params + their states): a silently skipped comparison would lower it.
    assert int(done.stdout.split()[-1]) >= 3 * 9 * 7 * 2


def _layout_rows() -> list[list[torch.Tensor]]:
    """Rows (param, then tensors updated with it) that fit the flat kernels and rows that do not."""
    p = torch.randn(4, 3, 5, 5)
    cl = p.contiguous(memory_format=torch.channels_last)
    sliced = torch.randn(4, 6)[:, :3]
    one = torch.randn(1, 1)
    return [
        [p, torch.randn_like(p), torch.zeros_like(p)],  # contiguous
        [cl, torch.zeros_like(cl), torch.zeros_like(cl)],  # channels_last, states alike
        [cl, torch.zeros_like(p)],  # a contiguous state for a channels_last param
        [p.transpose(0, 1), torch.zeros_like(p.transpose(0, 1))],  # dense, permuted
        [sliced, torch.zeros(4, 3)],  # the param has gaps
        [p, torch.zeros(4, 3, 5, 5, dtype=torch.float64)],  # another dtype
        [p, torch.zeros(4, 3, 5, 4)],  # another shape
        [p, torch.zeros(2, 3, 5, 5)],  # fewer elements
        [p, torch.zeros(4, 3, 5, 5, device="meta")],  # another device
        [one, torch.zeros(1, 1)[:, :1], torch.zeros(4, 4)[:1, :1]],  # one element: strides say nothing
        [torch.zeros(0, 3), torch.zeros(0, 3)],  # empty
        [p],  # no states (SGD without momentum has only param and grad; rows may be this short)
    ]


def test_native_layout_rule_is_fast_layout() -> None:
    rows = _layout_rows()
    native = ext.layouts_fit(rows)
    python = [fast_layout(row[0], row[1:]) for row in rows]
    assert native == python
    assert native[:2] == [True, True] and native[2] is False and native[4:9] == [False] * 5


def test_native_layout_rule_refuses_an_empty_row() -> None:
    with pytest.raises(RuntimeError, match="row 1 is empty"):
        ext.layouts_fit([[torch.zeros(2)], []])


def test_count_steps_counts_and_skips_on_found_inf() -> None:
    steps = [torch.tensor(0.0), torch.tensor(4.0, dtype=torch.float64), torch.zeros(1)]
    torch.ops.resfast.count_steps_(steps, None)
    assert [s.item() for s in steps] == [1.0, 5.0, 1.0]
    torch.ops.resfast.count_steps_(steps, torch.tensor([1.0]))  # GradScaler skips this step
    assert [s.item() for s in steps] == [1.0, 5.0, 1.0]
    torch.ops.resfast.count_steps_(steps, torch.tensor([0.0]))
    assert [s.item() for s in steps] == [2.0, 6.0, 2.0]


@pytest.mark.parametrize("bad", [torch.zeros(2), torch.tensor(1, dtype=torch.int64), torch.tensor(True)])
def test_count_steps_refuses_bad_counters_before_counting_any(bad: torch.Tensor) -> None:
    good = torch.tensor(3.0)
    with pytest.raises(RuntimeError, match="one-element float32/float64 step counters on one device"):
        torch.ops.resfast.count_steps_([good, bad], None)
    assert good.item() == 3.0


def test_prepared_update_refuses_an_unknown_op_or_a_wrong_state_count() -> None:
    p = [torch.zeros(3)]
    with pytest.raises(RuntimeError, match="unknown op 'lamb'"):
        ext.PreparedUpdate("lamb", p, [p])
    with pytest.raises(RuntimeError, match="adam takes 3 state lists, got 1"):
        ext.PreparedUpdate("adam", p, [p])


def test_prepared_update_runs_the_op() -> None:
    """The same kernel as torch.ops.resfast.adam_, with the lists kept from construction."""
    gen = torch.Generator().manual_seed(0)
    made = [[torch.randn(n, generator=gen) for n in (5, 17, 1)] for _ in range(3)]
    made.append([torch.rand(n, generator=gen) for n in (5, 17, 1)])  # exp_avg_sq: nonnegative
    twins = [[t.clone() for t in ts] for ts in made]
    coef = torch.rand(3, 7, generator=gen)
    p, g, m, v = made
    before = [t.clone() for t in p]
    ext.PreparedUpdate("adam", p, [m, v, []]).run(g, coef, None, None, wd_mode=1, maximize=True)
    tp, tg, tm, tv = twins
    torch.ops.resfast.adam_(tp, tg, tm, tv, [], coef, None, None, wd_mode=1, maximize=True)
    for ours, theirs in zip(p + m + v, tp + tm + tv, strict=True):
        assert torch.equal(ours, theirs)
    assert all(not torch.equal(a, b) for a, b in zip(p, before, strict=True))  # it did update


def test_prepared_lars_update_runs_the_op() -> None:
    """PreparedUpdate("lars", ...) passes every flag, lars_adaptation included, to torch.ops.resfast.lars_:
    with and without adaptation it equals the op's result, and the two differ (the flag reached it)."""
    from resfast.kernels import optim_coef

    gen = torch.Generator().manual_seed(0)
    made = [[torch.randn(n, generator=gen) for n in (5, 17, 1)] for _ in range(3)]
    coef = optim_coef.lars(3, torch.device("cpu"), lr=0.5, momentum=0.9, weight_decay=0.1,
                           trust_coefficient=0.02, eps=0.0)  # fmt: skip
    results = []
    for adaptation in (True, False):
        p, g, buf = ([t.clone() for t in ts] for ts in made)
        tp, tg, tbuf = ([t.clone() for t in ts] for ts in made)
        options = {"has_wd": True, "lars_adaptation": adaptation, "nesterov": True, "maximize": False}
        ext.PreparedUpdate("lars", p, [buf]).run(g, coef, None, None, **options)
        torch.ops.resfast.lars_(tp, tg, tbuf, coef, None, None, **options)
        assert all(torch.equal(a, b) for a, b in zip(p + buf, tp + tbuf, strict=True))
        results.append(p)
    assert not torch.equal(results[0][0], results[1][0])


def _sgd_call(n: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """n params with grads (one 2-D, so strides matter) and SGD's coefficient table for them."""
    from resfast.kernels import optim_coef

    gen = torch.Generator().manual_seed(n)
    params = [torch.randn(3, 4, generator=gen)] + [torch.randn(k, generator=gen) for k in range(1, n)]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    coef = optim_coef.sgd(n, torch.device("cpu"), lr=0.5, weight_decay=0.0, momentum=0.0, dampening=0.0,
                          fresh=[False] * n)  # fmt: skip
    return params, coef


def test_prepared_update_loads_its_params_grads_and_runs_with_them() -> None:
    """load reads each param's grad natively; run(None) updates with them, exactly as the op given the
    grads does, and releases them (a second run(None) has none)."""
    params, coef = _sgd_call(3)
    twins = [p.clone() for p in params]
    update = ext.PreparedUpdate("sgd", params, [[]])
    assert update.load(params)
    update.run(None, coef, None, None)
    torch.ops.resfast.sgd_(twins, [p.grad for p in params], [], coef, None, None, False, False, False)
    assert all(torch.equal(p, t) for p, t in zip(params, twins, strict=True))
    with pytest.raises(RuntimeError, match="no grads given and none loaded"):
        update.run(None, coef, None, None)


def _swap(params: list[torch.Tensor]) -> None:
    torch.utils.swap_tensors(params[1], params[1].detach().clone())


# Each change makes a kept call's tensors stale or its grads unfit for the flat kernels.
_UNFIT = {
    "a tuple": lambda ps: tuple(ps),
    "a param missing": lambda ps: ps[:-1],
    "another param object": lambda ps: [ps[0], ps[1].clone(), ps[2]],
    "a grad None": lambda ps: setattr(ps[2], "grad", None) or ps,
    "a transposed grad": lambda ps: setattr(ps[0], "grad", ps[0].grad.t().contiguous().t()) or ps,
    "a sparse grad": lambda ps: setattr(ps[1], "grad", ps[1].grad.to_sparse()) or ps,
    "new storage (p.data = ...)": lambda ps: setattr(ps[2], "data", ps[2].data.clone()) or ps,
    "a swapped tensor (torch.utils.swap_tensors)": lambda ps: _swap(ps) or ps,
}


@pytest.mark.parametrize("change", _UNFIT)
def test_prepared_update_refuses_to_load_a_stale_or_unfit_call(change: str) -> None:
    """load is false, and keeps nothing, for every change after which the kept call would update the wrong
    tensors or could not take the grads; the same list before the change loads."""
    params, coef = _sgd_call(3)
    update = ext.PreparedUpdate("sgd", params, [[]])
    assert update.load(params)  # loaded, then refused below: a refused load forgets the earlier grads too
    assert not update.load(_UNFIT[change](params))
    with pytest.raises(RuntimeError, match="none loaded"):
        update.run(None, coef, None, None)


def _watched_state() -> tuple[list[torch.Tensor], dict, list, list, list]:
    """Two params' optimizer state as torch keeps it (param -> {key: tensor}), and the (dict, key,
    tensor) columns a kept call watches."""
    params = [torch.zeros(2), torch.zeros(3)]
    state = {p: {"step": torch.tensor(1.0), "exp_avg": torch.zeros_like(p)} for p in params}
    dicts = [state[p] for p in params for _ in range(2)]
    keys = ["step", "exp_avg"] * 2
    tensors = [state[p][k] for p in params for k in ("step", "exp_avg")]
    return params, state, dicts, keys, tensors


# Each change makes the watched state stale: the step cache must plan again.
_STALE_STATE = {
    "a state tensor assigned": lambda s, ps: s[ps[0]].__setitem__("exp_avg", torch.zeros(2)),
    "a counter assigned": lambda s, ps: s[ps[1]].__setitem__("step", torch.tensor(1.0)),
    "a key deleted": lambda s, ps: s[ps[1]].pop("exp_avg"),
    "a param's dict replaced": lambda s, ps: s.__setitem__(ps[0], dict(s[ps[0]])),
    "a param's state dropped": lambda s, ps: s.pop(ps[1]),
    "another param's state added": lambda s, ps: s.__setitem__(torch.zeros(1), {}),
    "the dicts reordered": lambda s, ps: s.__setitem__(ps[0], s.pop(ps[0])),
}


@pytest.mark.parametrize("change", _STALE_STATE)
def test_prepared_update_holds_only_the_state_it_watched(change: str) -> None:
    """holds is PreparedUpdate's form of the step cache's identity checks over the optimizer state:
    true while the same per-param dicts (in order) hold the same tensor objects, false after each
    change that replaces, drops, adds or reorders one."""
    params, state, dicts, keys, tensors = _watched_state()
    update = ext.PreparedUpdate("sgd", params, [[]])
    update.watch(list(state.values()), dicts, keys, tensors)
    assert update.holds(state)
    state[params[0]]["exp_avg"].add_(1)  # changed in place: the same tensor, still held
    assert update.holds(state)
    _STALE_STATE[change](state, params)
    assert not update.holds(state)


def test_prepared_update_watch_refuses_columns_of_different_lengths() -> None:
    params, state, dicts, keys, tensors = _watched_state()
    with pytest.raises(RuntimeError, match="one length"):
        ext.PreparedUpdate("sgd", params, [[]]).watch(list(state.values()), dicts, keys[:-1], tensors)
