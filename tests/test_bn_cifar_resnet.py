"""resfast.nn.cifar: the He et al. 2016 CIFAR ResNets (option A shortcuts), and fuse_resnet on them,
with the reference backend and with the Triton kernels (under the interpreter on CPU)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from resfast.nn import BatchNormAddReLU, cifar, fuse_resnet
from resfast.nn.convert import FusedBasicBlock
from tests.bn_helpers import (
    assert_results_as_accurate,
    assert_results_close,
    model_results,
    poisoned_memory,  # noqa: F401 (fixture)
    randomized,
)

pytestmark = pytest.mark.usefixtures("poisoned_memory")


@pytest.mark.parametrize(
    "build, millions", [(cifar.resnet20, 0.27), (cifar.resnet32, 0.46), (cifar.resnet56, 0.85)]
)
def test_parameter_counts_match_the_paper(build, millions: float) -> None:
    """Table 6 of the paper; option B's projection shortcuts would add parameters."""
    model = build()
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == millions
    assert model.fc.out_features == 10


def test_depth_must_be_6n_plus_2() -> None:
    with pytest.raises(ValueError, match="6n \\+ 2"):
        cifar.CifarResNet(21)


def test_option_a_shortcut_subsamples_and_pads_with_zeros() -> None:
    shortcut = cifar.ZeroPadShortcut(16, 32, stride=2)
    x = torch.randn(2, 16, 8, 8)
    out = shortcut(x)
    assert out.shape == (2, 32, 4, 4) and not list(shortcut.parameters())
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])
    assert not out[:, :8].any() and not out[:, 24:].any()


def test_forward_shapes() -> None:
    model = cifar.resnet20(num_classes=7)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    stages = [model.layer1[0], model.layer2[0], model.layer3[0]]
    assert [type(b.downsample) for b in stages] == [type(None), cifar.ZeroPadShortcut, cifar.ZeroPadShortcut]


def _models(training: bool) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """(an unfused float32 resnet20 in channels_last, its float64 results on tiny images)."""
    torch.manual_seed(0)
    unfused = randomized(cifar.resnet20()).to(memory_format=torch.channels_last)
    return unfused, model_results(copy.deepcopy(unfused).double(), _images().double(), training)


def _images() -> torch.Tensor:
    # Tiny (the interpreter is slow); the last stage still sees 4 * 2 * 2 values per channel.
    return torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1)).to(
        memory_format=torch.channels_last
    )


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_fused_resnet20_matches_unfused_in_float64(training: bool) -> None:
    unfused, truth = _models(training)
    fused = fuse_resnet(copy.deepcopy(unfused).double())
    assert list(fused.state_dict()) == list(unfused.state_dict())
    kinds = [type(m) for m in fused.modules()]
    assert kinds.count(BatchNormAddReLU) == 1 + 9 * 2 and kinds.count(FusedBasicBlock) == 9
    assert nn.BatchNorm2d not in kinds  # option A shortcuts have no BatchNorm
    assert_results_close(model_results(fused, _images().double(), training), truth, 1e-9)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_fused_resnet20_on_triton_kernels_is_as_accurate_as_unfused(training: bool) -> None:
    """The whole network through the Triton kernels in fp32 and channels_last, as on a GPU; the
    option A shortcut's residual comes back contiguous (NCHW), so mixed layouts are exercised too."""
    unfused, truth = _models(training)
    fused = fuse_resnet(copy.deepcopy(unfused), backend="triton")
    assert {m.backend for m in fused.modules() if isinstance(m, BatchNormAddReLU)} == {"triton"}
    torch_fp32 = model_results(unfused, _images(), training)
    assert_results_as_accurate(model_results(fused, _images(), training), torch_fp32, truth, 1e-6)
