"""The optimizer test table (in the spirit of torch's optim_db): every option combination the parity
suite runs, the dtypes and backends it runs them on, and the construction errors torch raises."""

from __future__ import annotations

import pytest
import torch

from resfast import backends

OPTIMIZERS = ("SGD", "RMSprop", "Adagrad", "Adam", "AdamW")

# (optimizer, constructor kwargs): each option alone, then combined.
CASES: list[tuple[str, dict]] = [
    ("SGD", {"lr": 0.1}),
    ("SGD", {"lr": 0.1, "momentum": 0.9}),
    ("SGD", {"lr": 0.1, "momentum": 0.9, "dampening": 0.3}),
    ("SGD", {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
    ("SGD", {"lr": 0.1, "weight_decay": 0.1}),
    ("SGD", {"lr": 0.1, "momentum": 0.5, "weight_decay": 0.1, "maximize": True}),
    ("RMSprop", {}),
    ("RMSprop", {"centered": True}),
    ("RMSprop", {"momentum": 0.9}),
    ("RMSprop", {"alpha": 0.9, "eps": 1e-3, "weight_decay": 0.1}),
    ("RMSprop", {"centered": True, "momentum": 0.5, "weight_decay": 0.1, "maximize": True}),
    ("Adagrad", {}),
    ("Adagrad", {"lr_decay": 0.1}),
    ("Adagrad", {"initial_accumulator_value": 0.5, "eps": 1e-3}),
    ("Adagrad", {"lr_decay": 0.05, "weight_decay": 0.1, "maximize": True}),
    ("Adam", {}),
    ("Adam", {"amsgrad": True}),
    ("Adam", {"betas": (0.5, 0.9), "weight_decay": 0.1}),
    ("Adam", {"decoupled_weight_decay": True, "weight_decay": 0.1}),
    ("Adam", {"amsgrad": True, "weight_decay": 0.1, "maximize": True}),
    ("AdamW", {}),
    ("AdamW", {"amsgrad": True, "weight_decay": 0.1}),
    ("AdamW", {"maximize": True, "lr": 1e-2}),
]

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def case_id(case: tuple[str, dict]) -> str:
    name, kwargs = case
    return name + "".join(f"-{k}={v}" for k, v in kwargs.items())


def backend_params(device: str = "cpu") -> list:
    """Every backend that can run fp32 on `device` here; the others as skips that say why."""
    params = []
    for backend in ("reference", "triton", "cpu", "cuda"):
        try:
            backends.choose(torch.device(device), torch.float32, backend)
            marks = ()
        except backends.BackendUnavailable as e:
            marks = (pytest.mark.skip(reason=str(e)),)
        params.append(pytest.param(backend, marks=marks, id=backend))
    return params


def devices() -> list:
    """CPU always; CUDA as a clean skip without a GPU."""
    cuda = pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
        id="cuda",
    )
    return [pytest.param("cpu", id="cpu"), cuda]


# Bad constructor arguments: torch's own optimizer must raise the same exception type.
BAD_KWARGS: list[tuple[str, dict]] = [
    ("SGD", {"lr": -0.1}),
    ("SGD", {"momentum": -0.5}),
    ("SGD", {"weight_decay": -1.0}),
    ("SGD", {"nesterov": True}),
    ("SGD", {"nesterov": True, "momentum": 0.9, "dampening": 0.1}),
    ("SGD", {"lr": torch.tensor([0.1, 0.2])}),
    ("SGD", {"fused": True, "foreach": True}),
    ("RMSprop", {"lr": -1.0}),
    ("RMSprop", {"eps": -1e-8}),
    ("RMSprop", {"momentum": -0.1}),
    ("RMSprop", {"alpha": -0.1}),
    ("RMSprop", {"weight_decay": -0.1}),
    ("Adagrad", {"lr": -1.0}),
    ("Adagrad", {"lr_decay": -0.1}),
    ("Adagrad", {"initial_accumulator_value": -0.1}),
    ("Adagrad", {"eps": -1.0}),
    ("Adagrad", {"weight_decay": -0.1}),
    ("Adam", {"lr": -1e-3}),
    ("Adam", {"eps": -1e-8}),
    ("Adam", {"betas": (1.0, 0.999)}),
    ("Adam", {"betas": (0.9, -0.1)}),
    ("Adam", {"weight_decay": -0.1}),
    ("Adam", {"betas": (0.9, torch.tensor(0.999))}),
    ("Adam", {"lr": torch.tensor(0.1), "foreach": True}),
    ("Adam", {"fused": True, "foreach": True}),
    ("AdamW", {"lr": -1.0}),
    ("AdamW", {"betas": (0.9, 1.5)}),
    ("AdamW", {"weight_decay": -0.1}),
]
