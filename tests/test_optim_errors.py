"""Bad input: resfast raises what torch raises, when torch raises it, before anything changes."""

from __future__ import annotations

import copy

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


# Sparse gradients, where torch supports them: SGD (any momentum option) and Adagrad, without weight decay.
SPARSE_CASES = [
    ("SGD", {"lr": 0.1}),
    ("SGD", {"lr": 0.1, "momentum": 0.9}),
    ("SGD", {"lr": torch.tensor(0.1), "momentum": 0.9, "dampening": 0.3, "maximize": True}),
    ("SGD", {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
    ("Adagrad", {"lr": 0.1}),
    ("Adagrad", {"lr": 0.1, "lr_decay": 0.1, "initial_accumulator_value": 0.5, "maximize": True}),
]


def _embedding_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Embedding(10, 4, sparse=True), torch.nn.Linear(4, 2))


@pytest.mark.parametrize("case", SPARSE_CASES, ids=case_id)
def test_sparse_grads_follow_torch_where_torch_supports_them(case):
    """An Embedding(sparse=True) beside a dense layer: params and every state (SGD's momentum buffer
    sparse, as torch's) equal torch's after each step, rows repeated within a batch included."""
    name, kwargs = case
    ours, theirs = _embedding_model(0), _embedding_model(0)
    opt_r = getattr(resfast.optim, name)(ours.parameters(), **kwargs)
    opt_t = getattr(torch.optim, name)(theirs.parameters(), **kwargs)
    for step, rows in enumerate(([1, 4, 1], [4, 7], [2, 2, 9])):
        for model, opt in ((ours, opt_r), (theirs, opt_t)):
            opt.zero_grad()
            model(torch.tensor(rows)).square().sum().backward()
            assert model[0].weight.grad.is_sparse
            opt.step()
        for p_r, p_t in zip(ours.parameters(), theirs.parameters(), strict=True):
            torch.testing.assert_close(p_r, p_t, rtol=1e-6, atol=1e-7, msg=f"step {step}")
            state_r, state_t = opt_r.state[p_r], opt_t.state[p_t]
            assert state_r.keys() == state_t.keys()
            for key, want in state_t.items():
                got = state_r[key]
                assert got.layout == want.layout, key
                torch.testing.assert_close(got.to_dense(), want.to_dense(), rtol=1e-6, atol=1e-7, msg=key)


@pytest.mark.parametrize("name, kwargs", [("SGD", {"momentum": 0.9}), ("Adagrad", {})])
def test_sparse_grad_with_weight_decay_raises_before_any_change(name, kwargs):
    """torch refuses weight decay with a sparse grad only once its step is under way (Adagrad has then
    counted the step, SGD fails on add(sparse, dense)); resfast raises torch's Adagrad error before
    anything changes."""
    model = _embedding_model(0)
    opt = getattr(resfast.optim, name)(model.parameters(), lr=0.1, weight_decay=0.01, **kwargs)
    model(torch.tensor([1, 2])).sum().backward()
    model[0].weight.grad = None  # a first step updates the dense layer only: there is state to keep
    opt.step()
    model(torch.tensor([1, 2])).sum().backward()
    params = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict())
    with pytest.raises(RuntimeError, match="weight_decay option is not compatible with sparse gradients"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params, strict=True))
    _assert_same_state(opt.state_dict(), state)


def _assert_same_state(got: dict, want: dict) -> None:
    assert got["state"].keys() == want["state"].keys()
    for index, saved in want["state"].items():
        assert got["state"][index].keys() == saved.keys()
        for key, value in saved.items():
            assert torch.equal(got["state"][index][key], value), (index, key)


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
