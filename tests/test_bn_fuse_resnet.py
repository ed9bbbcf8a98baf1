"""fuse_resnet on torchvision's resnet18 and resnet50: outputs, gradients and running stats equal to
the unfused model's in train and eval mode; state_dict keys unchanged; tensors shared; idempotent."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from resfast.nn import BatchNormAddReLU, fuse_resnet
from resfast.nn.convert import FusedBasicBlock, FusedBottleneck
from tests.bn_helpers import poisoned_memory  # noqa: F401 (fixture)

torchvision = pytest.importorskip("torchvision")
from torchvision.models import resnet as tv  # noqa: E402

pytestmark = pytest.mark.usefixtures("poisoned_memory")

# (constructor, fused BatchNorms: stem + blocks x BNs per block, BatchNorm2d left in downsample branches)
MODELS = {"resnet18": (tv.resnet18, 1 + 8 * 2, 3), "resnet50": (tv.resnet50, 1 + 16 * 3, 4)}


def randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial affine parameters and running stats, so eval mode and the ReLU masks are tested."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.normal_(0, 0.2, generator=gen)
                m.running_mean.normal_(0, 0.2, generator=gen)
                m.running_var.uniform_(0.5, 1.5, generator=gen)
    return model


def assert_close_relative(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str) -> None:
    """Max error at most rtol times the largest magnitude: activations and gradients of deep nets
    span many scales, and what matters is the error against the tensor's scale."""
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    scale = expected.abs().max().item()
    err = (actual - expected).abs().max().item()
    assert err <= rtol * scale, f"{what}: error {err:.3g} > {rtol:g} x {scale:.3g}"


def assert_same_behaviour(
    fused: nn.Module, unfused: nn.Module, x: torch.Tensor, training: bool, rtol: float
) -> None:
    """Outputs, every parameter's gradient and every buffer agree after one forward and backward."""
    fused.train(training)
    unfused.train(training)
    out_fused, out_unfused = fused(x), unfused(x)
    assert_close_relative(out_fused, out_unfused, rtol, "output")
    dy = torch.randn(out_fused.shape, generator=torch.Generator().manual_seed(1), dtype=x.dtype)
    out_fused.backward(dy)
    out_unfused.backward(dy)
    grads = dict(unfused.named_parameters())
    for name, p in fused.named_parameters():
        assert_close_relative(p.grad, grads[name].grad, rtol, f"{name}.grad")
    expected = unfused.state_dict()
    for name, value in fused.state_dict().items():
        if value.is_floating_point():
            assert_close_relative(value, expected[name], rtol, name)
        else:
            assert torch.equal(value, expected[name]), name


# In training, the last stage of a ResNet on 32x32 images is 1x1, so its BatchNorms see only N values
# per channel: (x - mean) / std of a few values is ill-conditioned, and each block of that stage
# amplifies rounding differences between any two implementations ~100-1000x (measured: fp32 outputs
# of resnet50 differ by ~1e-3 relative at N = 4, and at N = 2 even float64 ones by ~1e-4). So the
# semantics are checked in float64 at N = 4 (amplified rounding stays < 1e-10), and fp32 in eval
# mode, which is well conditioned. The CIFAR ResNet test covers fp32 training.
CASES = [(torch.float64, True, 1e-9), (torch.float64, False, 1e-9), (torch.float32, False, 1e-5)]


@pytest.mark.parametrize(
    "dtype, training, rtol", CASES, ids=["float64-train", "float64-eval", "float32-eval"]
)
@pytest.mark.parametrize("name", MODELS)
def test_fused_model_matches_unfused(name: str, dtype: torch.dtype, training: bool, rtol: float) -> None:
    torch.manual_seed(0)
    unfused = randomized(MODELS[name][0](num_classes=10)).to(dtype)
    fused = fuse_resnet(copy.deepcopy(unfused))
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2)).to(dtype)
    assert_same_behaviour(fused, unfused, x, training, rtol)


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
    assert fuse_resnet(block) is block and type(block.bn1) is nn.BatchNorm2d

    class MyBlock(tv.BasicBlock):  # may have changed forward
        pass

    container = nn.Sequential(MyBlock(8, 8))
    fuse_resnet(container)
    assert type(container[0]) is MyBlock


def test_a_single_block_is_returned_fused() -> None:
    block = randomized(tv.Bottleneck(16, 4))
    fused = fuse_resnet(copy.deepcopy(block))
    assert type(fused) is FusedBottleneck
    x = torch.randn(2, 16, 5, 5, generator=torch.Generator().manual_seed(3))
    assert_same_behaviour(fused, block, x, True, 1e-5)  # 25 values per channel: well conditioned


def test_unknown_backend_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown backend"):
        fuse_resnet(tv.resnet18(), backend="fast")
