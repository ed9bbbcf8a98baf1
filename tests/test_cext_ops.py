"""The native extension's registered ops: schemas, fake implementations and input checks.

(The optimizer parity suites cover the `cpu` backend's numbers: they parametrise over every built
backend.)"""

from __future__ import annotations

import pytest
import torch

from resfast import backends

ext, why = backends.native_extension()
pytestmark = pytest.mark.skipif(ext is None, reason=f"native extension not built: {why}")


def _lists(n: int, count: int, dtype=torch.float32) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    sizes = [5, 1, 0, 37][:count]
    return [[torch.rand(s, generator=gen).to(dtype) + 0.5 for s in sizes] for _ in range(n)]


def _cases():
    from resfast.kernels import optim_coef

    steps = [torch.tensor(3.0) for _ in range(4)]
    adam_coef = optim_coef.adam(
        steps, torch.device("cpu"), lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, decoupled=True
    )
    p, g, m, v, vmax = _lists(5, 4)
    sq, ga, buf = _lists(3, 4)
    lars_coef = optim_coef.lars(
        4, torch.device("cpu"), lr=0.1, momentum=0.9, weight_decay=0.01, trust_coefficient=0.02, eps=0.0
    )
    ops = torch.ops.resfast
    return {
        "sgd_": (ops.sgd_.default, (p, g, buf, torch.full((4, 5), 0.1), None, None, True, True, False)),
        "rmsprop_": (
            ops.rmsprop_.default,
            (p, g, sq, ga, buf, torch.full((4, 6), 0.1), torch.tensor(2.0), torch.tensor(0.0), False, True),
        ),
        # with max_grad_norm's clip factor, the trailing optional argument every update op takes
        "sgd_+grad_clip": (
            ops.sgd_.default,
            (p, g, buf, torch.full((4, 5), 0.1), None, None, True, False, False, torch.tensor([0.25])),
        ),
        "adagrad_": (ops.adagrad_.default, (p, g, sq, torch.full((4, 3), 0.1), None, None, True, False)),
        "adam_": (ops.adam_.default, (p, g, m, v, vmax, adam_coef, None, None, 2, False)),
        "lars_": (
            ops.lars_.default,
            (p, g, buf, lars_coef, torch.tensor(4.0), torch.tensor(0.0), True, True, True, False),
        ),
        "lars_+grad_clip": (
            ops.lars_.default,
            (p, g, buf, lars_coef, None, None, True, True, False, False, torch.tensor(0.5)),
        ),
        "total_norm": (ops.total_norm.default, ([p[0], g[3].bfloat16()],)),
        "count_steps_": (ops.count_steps_.default, (steps, torch.tensor([0.0]))),
        "adam_coef": (ops.adam_coef.default, (steps, torch.tensor(0.01), 0.0, 0.9, 0.999, 1e-8, 0.1, 2)),
        "adagrad_coef": (ops.adagrad_coef.default, (steps, None, 0.01, 0.1, 0.0, 1e-10)),
    }


@pytest.mark.parametrize(
    "name",
    [
        *("sgd_", "rmsprop_", "adagrad_", "adam_", "lars_", "sgd_+grad_clip", "lars_+grad_clip"),
        *("total_norm", "count_steps_", "adam_coef", "adagrad_coef"),
    ],
)
def test_opcheck(name):
    op, args = _cases()[name]
    torch.library.opcheck(op, args)


def test_ops_mutate_in_place_and_declare_it():
    op, args = _cases()["adam_"]
    params_before = [t.clone() for t in args[0]]
    op(*args)
    assert all(not torch.equal(a, b) for a, b in zip(args[0], params_before, strict=True) if a.numel())
    assert all(arg.alias_info is not None and arg.alias_info.is_write for arg in op._schema.arguments[:5])


def test_bad_inputs_are_rejected_with_clear_errors():
    op, args = _cases()["adam_"]
    p, g, m, v, vmax, coef, *rest = args
    with pytest.raises(RuntimeError, match="list 1 has 3 tensors"):
        op(p, g[:3], m, v, vmax, coef, *rest)
    with pytest.raises(RuntimeError, match="must match its param"):
        op(p, [t.double() for t in g], m, v, vmax, coef, *rest)
    with pytest.raises(RuntimeError, match="coef"):
        op(p, g, m, v, vmax, coef.double(), *rest)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        op(*[[t.double() for t in lst] for lst in (p, g, m, v, vmax)], coef, *rest)
    with pytest.raises(RuntimeError, match="grad_clip must be a one-element floating-point tensor"):
        op(p, g, m, v, vmax, coef, *rest, grad_clip=torch.ones(2))
    with pytest.raises(RuntimeError, match="not dense"):
        op(
            [torch.rand(4, 4)[:, :2]],
            [torch.rand(4, 2)],
            [torch.rand(4, 2)],
            [torch.rand(4, 2)],
            [],
            coef[:1],
            *rest,
        )


def test_lars_rejects_a_coefficient_table_of_another_width_and_mismatched_buffers():
    op, args = _cases()["lars_"]
    p, g, buf, coef, *rest = args
    with pytest.raises(RuntimeError, match=r"coef must be a contiguous float32 \[n_tensors, 5\]"):
        op(p, g, buf, torch.zeros(4, 7), *rest)
    with pytest.raises(RuntimeError, match="must match its param"):
        op(p, g, [t.to(torch.bfloat16) for t in buf], coef, *rest)
    with pytest.raises(RuntimeError, match="list 2 has 3 tensors"):
        op(p, g, buf[:3], coef, *rest)


def test_extension_records_the_torch_it_was_built_for():
    assert torch.__version__.split("+")[0] == ext.TORCH_VERSION
