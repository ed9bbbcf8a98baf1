"""Backend selection: auto's choice, the env override, and errors that say why."""

from __future__ import annotations

import pytest
import torch

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
    monkeypatch.setenv("RESFAST_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="nonsense"):
        backends.choose("cpu", torch.float32, "auto")
    assert backends.choose("cpu", torch.float32, "reference") == "reference"  # explicit wins


def test_unavailable_backend_lists_every_backend_and_why():
    with pytest.raises(backends.BackendUnavailable) as info:
        backends.choose("cpu", torch.float32, "cuda")
    message = str(info.value)
    assert "cuda" in message and all(name in message for name in ("triton", "cpu", "reference"))


def test_info_reports_every_backend(capsys):
    report = backends.info()
    assert set(backends.BACKENDS[1:]) <= set(report)
    assert report["reference"].startswith("available")
    assert "reference" in capsys.readouterr().out


def test_validate_rejects_unknown_names():
    with pytest.raises(ValueError, match="choose one of"):
        backends.validate("fast")
