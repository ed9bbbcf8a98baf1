"""Backend selection: auto's choice, the env override, and errors that say why."""

from __future__ import annotations

import pytest
import torch

import resfast.nn
import resfast.optim
from resfast import backends


def test_auto_on_cpu_is_an_available_backend():
    assert backends.choose("cpu", torch.float32, "auto") in ("cpu", "reference")
    # float64 has no fused kernels: auto falls back to the reference, an explicit fast backend refuses.
    assert backends.choose("cpu", torch.float64, "auto") == "reference"
    with pytest.raises(backends.BackendUnavailable, match="float64"):
        backends.choose("cpu", torch.float64, "triton")


def test_env_overrides_auto_only(monkeypatch):
    monkeypatch.setenv("RESFAST_BACKEND", "reference")
    assert backends.choose("cpu", torch.float32, "auto") == "reference"
    monkeypatch.setenv("RESFAST_BACKEND", "")  # empty: unset
    assert backends.choose("cpu", torch.float32, "auto") == backends.choose("cpu", torch.float32, "cpu")
    monkeypatch.setenv("RESFAST_BACKEND", "gpu")
    assert backends.choose("cpu", torch.float32, "reference") == "reference"  # explicit wins


def test_bad_env_value_names_the_variable_at_construction(monkeypatch):
    """A bad RESFAST_BACKEND is refused when an optimizer or module is built (not at its first step),
    naming the variable, its value and the allowed ones."""
    monkeypatch.setenv("RESFAST_BACKEND", "gpu")
    message = r"RESFAST_BACKEND='gpu' is not a backend; set it to one of auto, triton, cuda, cpu, reference"
    for build in (
        lambda: resfast.optim.SGD([torch.zeros(2, requires_grad=True)], lr=0.1),
        lambda: resfast.nn.BatchNormAddReLU(3),
        lambda: backends.choose("cpu", torch.float32, "auto"),
    ):
        with pytest.raises(ValueError, match=message):
            build()
    resfast.optim.SGD([torch.zeros(2, requires_grad=True)], lr=0.1, backend="reference")  # not read


def test_unavailable_backend_lists_every_backend_and_why():
    with pytest.raises(backends.BackendUnavailable) as info:
        backends.choose("cpu", torch.float32, "cuda")
    message = str(info.value)
    assert "cuda" in message and all(name in message for name in ("triton", "cpu", "reference"))


def test_info_reports_every_backend_per_op_and_prints_once(capsys):
    report = backends.info()
    assert capsys.readouterr().out == ""  # a REPL shows its repr, the table, once
    assert set(backends.BACKENDS[1:]) <= set(report)
    assert report["reference"] == "available on cpu: optimizers, batch_norm_add_relu"
    # The fused BN runs on the native CPU kernels when the extension is built, else on the reference.
    native = backends.native_extension()[0] is not None
    assert f"batch_norm_add_relu: {'cpu' if native else 'reference'}" in report["auto on cpu"]
    assert "float64/complex: reference" in report["auto on cpu"]
    lines = repr(report).splitlines()  # one line per finding, the key first
    assert [line.split("  ")[0].rstrip() for line in lines] == list(report)
    assert str(report) == repr(report)


def test_auto_on_cuda_prefers_triton_for_the_fused_bn():
    """The fused BN's CUDA C++ driver is an explicit choice until a GPU has timed it against Triton;
    the optimizers' auto order is unchanged. Nothing here touches a GPU: only the order is asked."""
    bn = {"implemented": backends.implementing("batch_norm_add_relu"), "op": "batch_norm_add_relu"}
    try:
        triton_runs = backends.choose("cuda", torch.float32, "triton", **bn) == "triton"
    except backends.BackendUnavailable:
        triton_runs = False
    native_cuda = backends.native_runs("cuda")
    expected = "triton" if triton_runs else ("cuda" if native_cuda else "reference")
    assert backends.choose("cuda", torch.float32, "auto", **bn) == expected
    if native_cuda:
        assert backends.choose("cuda", torch.float32, "auto") == "cuda"  # the optimizers
        assert backends.choose("cuda", torch.float32, "cuda", **bn) == "cuda"


@pytest.mark.skipif(backends.native_extension()[0] is None, reason="native extension not built")
def test_info_names_the_cpu_kernels_instruction_set():
    isa = backends.native_extension()[0].cpu_kernel_isa()
    assert f"CPU kernels for {isa}" in backends.info()["native extension (resfast._C)"]
    assert backends.info()["cpu"] == "available on cpu: optimizers, batch_norm_add_relu"


def test_validate_rejects_unknown_names():
    with pytest.raises(ValueError, match="choose one of"):
        backends.validate("fast")
