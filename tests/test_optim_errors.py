"""Bad input: resfast raises what torch raises, when torch raises it, before anything changes."""

from __future__ import annotations

import pytest
import torch

import resfast.optim
from resfast import backends
from tests.optim_cases import BAD_KWARGS, OPTIMIZERS, case_id
from tests.optim_helpers import make_params


def _raised(factory) -> type[BaseException] | None:
    try:
        factory()
    except Exception as e:
        return type(e)
    return None


@pytest.mark.parametrize("case", BAD_KWARGS, ids=case_id)
def test_constructor_rejects_what_torch_rejects(case):
    name, kwargs = case
    expected = _raised(lambda: getattr(torch.optim, name)([torch.zeros(2, requires_grad=True)], **kwargs))
    assert expected is not None, "the table must list inputs torch rejects"
    with pytest.raises(expected):
        getattr(resfast.optim, name)([torch.zeros(2, requires_grad=True)], **kwargs)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_params_errors_match_torch(name):
    p = torch.zeros(2, requires_grad=True)
    for bad in (p, [{"params": [p]}, {"params": [p]}]):  # a bare tensor; a param in two groups
        expected = _raised(lambda bad=bad: getattr(torch.optim, name)(bad))
        assert expected is not None
        with pytest.raises(expected):
            getattr(resfast.optim, name)(bad)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_differentiable_is_refused_clearly(name):
    with pytest.raises(NotImplementedError, match="differentiable"):
        getattr(resfast.optim, name)([torch.zeros(2, requires_grad=True)], differentiable=True)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_unknown_backend_is_refused_at_construction(name):
    with pytest.raises(ValueError, match=r"unknown backend 'tritonn'.*reference"):
        getattr(resfast.optim, name)([torch.zeros(2, requires_grad=True)], backend="tritonn")


@pytest.mark.parametrize("name", ["Adam", "AdamW", "RMSprop"])
def test_sparse_grad_raises_before_any_change(name):
    dense = torch.randn(4, 3, requires_grad=True)
    embedding = torch.nn.Embedding(5, 3, sparse=True)
    (dense.sum() + embedding(torch.tensor([1, 3])).sum()).backward()
    assert embedding.weight.grad.is_sparse
    for module in (torch.optim, resfast.optim):
        before = [dense.detach().clone(), embedding.weight.detach().clone()]
        opt = getattr(module, name)([dense, embedding.weight])
        with pytest.raises(RuntimeError, match="sparse"):
            opt.step()
        assert torch.equal(dense, before[0]) and torch.equal(embedding.weight, before[1])
    assert len(opt.state) == 0  # resfast created no state for the dense param either


@pytest.mark.parametrize("name", ["SGD", "Adagrad"])
def test_sparse_grads_follow_torch_where_torch_supports_them(name):
    dense = torch.randn(6, 3)
    ours, theirs = dense.clone(), dense.clone()
    grad = torch.zeros(6, 3)
    grad[[1, 4]] = torch.randn(2, 3)
    opt_r = getattr(resfast.optim, name)([ours], lr=0.1)
    opt_t = getattr(torch.optim, name)([theirs], lr=0.1)
    for _ in range(2):
        ours.grad, theirs.grad = grad.to_sparse(), grad.to_sparse()
        opt_r.step()
        opt_t.step()
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    assert not torch.equal(ours, dense)


def test_unavailable_backend_raises_at_step_before_any_change():
    params = make_params(torch.float32)[:6]
    opt = resfast.optim.Adam(params, backend="cuda")  # CPU tensors: the cuda backend cannot run them
    for p in params:
        p.grad = torch.ones_like(p)
    before = [p.detach().clone() for p in params]
    with pytest.raises(backends.BackendUnavailable, match=r"cuda.*cpu"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(params, before, strict=True))
    assert len(opt.state) == 0


def test_capturable_on_cpu_raises_like_torch():
    for module in (torch.optim, resfast.optim):
        p = torch.zeros(3, requires_grad=True)
        p.grad = torch.ones(3)
        with pytest.raises(AssertionError, match="capturable"):
            module.Adam([p], capturable=True).step()
