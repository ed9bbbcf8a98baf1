"""fuse_resnet on torchvision's resnet18 and resnet50: outputs, gradients and running stats equal to
the unfused model's in train and eval mode; state_dict keys unchanged; tensors shared; idempotent."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from resfast.nn import BatchNormAddReLU, fuse_resnet
from resfast.nn.convert import FusedBasicBlock, FusedBottleneck
from tests.bn_helpers import (
    assert_results_as_accurate,
    assert_results_close,
    model_results,
    poisoned_memory,  # noqa: F401 (fixture)
    randomized,
)

torchvision = pytest.importorskip("torchvision")
from torchvision.models import resnet as tv  # noqa: E402

pytestmark = pytest.mark.usefixtures("poisoned_memory")

# (constructor, fused BatchNorms: stem + blocks x BNs per block, BatchNorm2d left in downsample branches)
MODELS = {"resnet18": (tv.resnet18, 1 + 8 * 2, 3), "resnet50": (tv.resnet50, 1 + 16 * 3, 4)}


# In training, the last stage of a ResNet on 32x32 images is 1x1, so its BatchNorms see only N values
# per channel: (x - mean) / std of a few values is ill-conditioned, and each block of that stage
# amplifies rounding differences between any two implementations ~100-1000x (measured: fp32 outputs
# of resnet50 differ by ~1e-3 relative at N = 4, and at N = 2 even float64 ones by ~1e-4). So the
# semantics are checked in float64 at N = 4 (amplified rounding stays < 1e-10), and fp32 in eval
# mode, which is well conditioned, against the float64 truth. The CIFAR ResNet tests cover fp32 training.


def _pair(name: str) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """(unfused float64 model, its fused copy, input); images of 4 x 3 x 32 x 32."""
    torch.manual_seed(0)
    unfused = randomized(MODELS[name][0](num_classes=10)).double()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    return unfused, fuse_resnet(copy.deepcopy(unfused)), x


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", MODELS)
def test_fused_model_matches_unfused_in_float64(name: str, training: bool) -> None:
    unfused, fused, x = _pair(name)
    assert_results_close(model_results(fused, x, training), model_results(unfused, x, training), 1e-9)


@pytest.mark.parametrize("name", MODELS)
def test_fused_model_in_float32_eval_is_as_accurate_as_unfused(name: str) -> None:
    unfused64, _, x = _pair(name)
    truth = model_results(unfused64, x, training=False)
    unfused = copy.deepcopy(unfused64).float()
    fused = fuse_resnet(copy.deepcopy(unfused))
    torch_fp32 = model_results(unfused, x.float(), training=False)
    assert_results_as_accurate(model_results(fused, x.float(), training=False), torch_fp32, truth, 1e-6)


@pytest.mark.parametrize("name", MODELS)
def test_keys_unchanged_tensors_shared_and_idempotent(name: str) -> None:
    build, n_fused, n_plain = MODELS[name]
    model = build()
    keys = list(model.state_dict())
    tensors = {k: v.data_ptr() for k, v in model.state_dict().items()}
    params = [id(p) for p in model.parameters()]
    assert fuse_resnet(model) is model
    assert list(model.state_dict()) == keys
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == tensors
    assert [id(p) for p in model.parameters()] == params, "an optimizer built before fusing would lose them"
    kinds = [type(m) for m in model.modules()]
    assert kinds.count(BatchNormAddReLU) == n_fused
    assert kinds.count(nn.BatchNorm2d) == n_plain  # the downsample branches' BatchNorms
    assert nn.ReLU not in kinds
    assert (FusedBasicBlock if name == "resnet18" else FusedBottleneck) in kinds
    structure = repr(model)
    fuse_resnet(model)
    assert repr(model) == structure
    assert list(model.state_dict()) == keys


def test_checkpoints_load_across_fusion() -> None:
    source = randomized(tv.resnet18())
    fused = fuse_resnet(tv.resnet18())
    fused.load_state_dict(source.state_dict())
    plain = tv.resnet18()
    plain.load_state_dict(fused.state_dict())
    for (k, a), b in zip(source.state_dict().items(), plain.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_fusion_keeps_the_training_mode() -> None:
    model = fuse_resnet(tv.resnet18().eval())
    assert not any(m.training for m in model.modules())


def test_blocks_with_other_norms_or_subclasses_are_left_alone() -> None:
    block = tv.BasicBlock(8, 8)
    block.bn2 = nn.SyncBatchNorm(8)  # fusing would drop the cross-device synchronisation
    with pytest.warns(UserWarning, match="nothing to fuse in BasicBlock"):
        assert fuse_resnet(block) is block and type(block.bn1) is nn.BatchNorm2d
    with pytest.raises(ValueError, match=r"1 ResNet block\(s\) left alone.*BasicBlock"):
        fuse_resnet(block, strict=True)

    class MyBlock(tv.BasicBlock):  # may have changed forward
        pass

    container = nn.Sequential(MyBlock(8, 8))
    with pytest.warns(UserWarning, match="nothing to fuse in Sequential"):
        fuse_resnet(container)
    assert type(container[0]) is MyBlock


@pytest.mark.parametrize("name", ["mobilenet_v2", "vgg11_bn", "densenet121"])
def test_a_model_with_nothing_to_fuse_warns_or_raises_when_strict(name: str) -> None:
    model = getattr(torchvision.models, name)()
    keys = list(model.state_dict())
    with pytest.warns(UserWarning, match=f"nothing to fuse in {type(model).__name__}.*unchanged"):
        assert fuse_resnet(model) is model
    assert list(model.state_dict()) == keys
    with pytest.raises(ValueError, match="nothing to fuse"):
        fuse_resnet(model, strict=True)


def test_strict_names_the_blocks_left_alone_and_changes_nothing() -> None:
    model = tv.resnet18()
    model.layer2[1].bn1 = nn.SyncBatchNorm(128)
    with pytest.raises(ValueError, match=r"left alone.*: layer2\.1$"):
        fuse_resnet(model, strict=True)
    assert not any(isinstance(m, BatchNormAddReLU) for m in model.modules())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # everything else fused: no warning; fusing again: none either
        fuse_resnet(model)
        fuse_resnet(model)
    assert type(model.layer2[1]) is tv.BasicBlock and type(model.layer2[0]) is FusedBasicBlock


def test_a_single_block_is_returned_fused() -> None:
    block = randomized(tv.Bottleneck(16, 4))
    fused = fuse_resnet(copy.deepcopy(block))
    assert type(fused) is FusedBottleneck
    x = torch.randn(2, 16, 5, 5, generator=torch.Generator().manual_seed(3))
    # 50 values per channel: well conditioned, fp32 rounding only.
    assert_results_close(model_results(fused, x, True), model_results(block, x, True), 1e-5)


def test_unknown_backend_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown backend"):
        fuse_resnet(tv.resnet18(), backend="fast")
