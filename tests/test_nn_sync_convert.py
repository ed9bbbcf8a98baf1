"""torch's `nn.SyncBatchNorm.convert_sync_batchnorm` on models fused by `fuse_resnet` (what torchvision's
reference training script runs for ``--sync-bn``): every fused BatchNorm must become a
`SyncBatchNormAddReLU` over the same tensors, not a plain SyncBatchNorm, which would make the fused
blocks' ``bn(x, shortcut)`` raise and silently drop the ReLU of every ``relu(bn(x))`` layer, the
fused stem's included. Checked on torchvision's resnet18 and resnet50 and resfast's resnet20, in
float64 so that the comparison with the unfused model is tight (see test_bn_fuse_resnet.py for why
training a ResNet on 32x32 images needs it), and in one process of a gloo group for training."""

from __future__ import annotations

import copy
import datetime
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from resfast.nn import BatchNormAddReLU, SyncBatchNormAddReLU, convert_sync_batchnorm, fuse_resnet
from resfast.nn.cifar import resnet20
from resfast.nn.convert import FusedBasicBlock, FusedBottleneck
from tests.bn_helpers import assert_results_close, model_results, randomized

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

NAMES = ["resnet18", "resnet50", "resnet20"]
# Fused and unfused models differ by rounding only: test_bn_fuse_resnet.py's float64 bound.
RTOL_UNFUSED = 1e-9


def _unfused(name: str) -> nn.Module:
    """A float64 model with non-trivial BatchNorm parameters and running stats (so eval mode and the
    ReLU masks matter)."""
    torch.manual_seed(0)
    if name == "resnet20":
        model = resnet20(num_classes=10)
    else:
        tv = pytest.importorskip("torchvision.models.resnet")
        model = getattr(tv, name)(num_classes=10)
    return randomized(model).double()


def _input(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)


def _models(name: str) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(unfused, fused, fused then converted by torch's converter), three independent copies."""
    unfused = _unfused(name)
    fused = fuse_resnet(copy.deepcopy(unfused))
    return unfused, fused, nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(fused))


@pytest.fixture
def process_group(tmp_path: Path) -> Iterator[None]:
    """A one-process gloo group, as SyncBatchNorm training runs under (a bounded timeout: a collective
    that waits for a missing peer fails instead of hanging)."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group(
        "gloo",
        init_method=f"file://{tmp_path / 'rendezvous'}",
        rank=0,
        world_size=1,
        timeout=datetime.timedelta(seconds=60),
    )
    yield
    dist.destroy_process_group()


def _of_type(model: nn.Module, kind: type) -> list[str]:
    return [name for name, m in model.named_modules() if type(m) is kind]


@pytest.mark.parametrize("name", NAMES)
def test_fused_batchnorms_become_synchronised_fused_ones_over_the_same_tensors(name: str) -> None:
    _, fused, _ = _models(name)
    fused_names, plain_names = _of_type(fused, BatchNormAddReLU), _of_type(fused, nn.BatchNorm2d)
    tensors = {k: v.data_ptr() for k, v in fused.state_dict().items()}
    params = [id(p) for p in fused.parameters()]
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(fused)
    assert converted is fused, "torch's converter converts a model in place"
    assert _of_type(converted, SyncBatchNormAddReLU) == fused_names
    assert _of_type(converted, nn.SyncBatchNorm) == plain_names  # the downsample branches' BatchNorms
    assert not _of_type(converted, BatchNormAddReLU) and not _of_type(converted, nn.BatchNorm2d)
    assert type(converted.relu) is nn.Identity, "the stem's ReLU stays fused into bn1"
    assert {k: v.data_ptr() for k, v in converted.state_dict().items()} == tensors, "keys or tensors changed"
    assert [id(p) for p in converted.parameters()] == params, "an optimizer built before would lose them"


@pytest.mark.parametrize("name", NAMES)
def test_eval_output_equals_the_fused_and_the_unfused_models(name: str) -> None:
    unfused, fused, converted = _models(name)
    x = _input(4, 3, 32, 32)
    with torch.no_grad():
        expected, out = fused.eval()(x), converted.eval()(x)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)  # the same ops on the same tensors
        assert_results_close({"output": out}, {"output": unfused.eval()(x)}, RTOL_UNFUSED)


@pytest.mark.parametrize("name", NAMES)
def test_training_step_equals_the_fused_and_the_unfused_models(
    name: str, request: pytest.FixtureRequest
) -> None:
    """Output, every gradient and every buffer after one training forward and backward; a group of one
    process normalises with its own batch, as the unconverted model does."""
    # torch's plain SyncBatchNorm refuses CPU inputs in training once a process group exists, and
    # torchvision's downsample branches keep plain ones: those models train here without a group.
    if name == "resnet20":
        request.getfixturevalue("process_group")
    unfused, fused, converted = _models(name)
    x = _input(4, 3, 32, 32)
    results = model_results(converted, x, training=True)
    assert_results_close(results, model_results(fused, x, training=True), 0.0)
    assert_results_close(results, model_results(unfused, x, training=True), RTOL_UNFUSED)


# One test per way a plain SyncBatchNorm breaks a fused model, each failing without the conversion.


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("block", [FusedBasicBlock, FusedBottleneck])
def test_fused_block_still_takes_its_shortcut(
    block: type[FusedBasicBlock | FusedBottleneck], training: bool, process_group: None
) -> None:
    """A plain SyncBatchNorm raises a TypeError on the block's ``bn(x, shortcut)``. (The second block:
    the first one's downsample BatchNorm would become a plain SyncBatchNorm, which refuses CPU inputs
    in training.)"""
    _, fused, _ = _models("resnet18" if block is FusedBasicBlock else "resnet50")
    fused = fused.layer1[1].train(training)
    assert type(fused) is block
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(fused))
    x = _input(4, fused.conv1.in_channels, 8, 8)
    torch.testing.assert_close(converted(x), fused(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_relu_of_bn_layers_keep_their_relu(name: str) -> None:
    """Every fused BatchNorm of the blocks (those called without a residual, the first one or two of
    each block, included) still applies its ReLU: a plain SyncBatchNorm returns negative values there.
    The stem's bn1 has its own test."""
    _, fused, converted = _models(name)
    converted.eval(), fused.eval()
    block_bns = [n for n in _of_type(fused, BatchNormAddReLU) if n != "bn1"]
    assert len(block_bns) == {"resnet18": 16, "resnet50": 48, "resnet20": 18}[name]
    for module_name in block_bns:
        bn = converted.get_submodule(module_name)
        x = _input(2, bn.num_features, 3, 3)
        expected = fused.get_submodule(module_name)(x)
        assert (expected == 0).any(), "the ReLU must matter for this input"
        torch.testing.assert_close(bn(x), expected, rtol=0, atol=0, msg=lambda m, n=module_name: f"{n}: {m}")


@pytest.mark.parametrize("name", NAMES)
def test_stem_keeps_its_relu(name: str) -> None:
    """The fused stem's ``relu`` is an identity (bn1 applies the ReLU): a plain SyncBatchNorm in bn1
    leaves the stem without any."""
    _, fused, converted = _models(name)
    x = _input(2, 3, 16, 16)

    def stem(model: nn.Module) -> torch.Tensor:
        return model.relu(model.bn1(model.conv1(x)))

    with torch.no_grad():
        expected = stem(fused.eval())
        assert (expected == 0).any(), "the ReLU must matter for this input"
        torch.testing.assert_close(stem(converted.eval()), expected, rtol=0, atol=0)


def test_fused_module_in_a_users_container_keeps_its_relu() -> None:
    """Not only fuse_resnet's models: a BatchNormAddReLU in any container is kept fused."""
    torch.manual_seed(0)
    fused = randomized(nn.Sequential(nn.Conv2d(3, 8, 3), BatchNormAddReLU(8, backend="reference"))).eval()
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(fused))
    assert type(converted[1]) is SyncBatchNormAddReLU
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(converted(x), fused(x), rtol=0, atol=0)


# What the conversion carries over, and what it leaves alone.


@pytest.mark.parametrize(
    ("affine", "track_running_stats"), [(True, True), (False, True), (True, False)], ids=str
)
def test_conversion_carries_every_setting(
    affine: bool, track_running_stats: bool, process_group: None
) -> None:
    bn = BatchNormAddReLU(6, 1e-3, None, affine, track_running_stats, backend="reference").eval()
    if affine:
        bn.weight.requires_grad_(False)  # a frozen scale stays frozen
    bn.qconfig = "a qconfig"  # type: ignore[assignment]  # torch's converter carries it: so must this
    group = dist.new_group([0])
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(bn), group)[0]
    assert type(synced) is SyncBatchNormAddReLU
    assert (synced.num_features, synced.eps, synced.momentum) == (6, 1e-3, None)
    assert (synced.affine, synced.track_running_stats, synced.training) == (
        affine,
        track_running_stats,
        False,
    )
    assert (synced.backend, synced.process_group, synced.qconfig) == ("reference", group, "a qconfig")
    for tensor_name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        assert getattr(synced, tensor_name) is getattr(bn, tensor_name), tensor_name
    if affine:
        assert not synced.weight.requires_grad and synced.bias.requires_grad


def test_assigning_a_plain_syncbatchnorm_over_a_fused_one_is_converted_too() -> None:
    """Converters that assign (``setattr(parent, name, new)``) instead of calling add_module."""
    block = fuse_resnet(resnet20()).layer1[0]
    bn1 = block.bn1
    block.bn1 = nn.SyncBatchNorm.convert_sync_batchnorm(bn1)
    assert type(block.bn1) is SyncBatchNormAddReLU and block.bn1.weight is bn1.weight


def test_other_replacements_are_left_alone() -> None:
    """Only a plain SyncBatchNorm replacing a fused module is converted: a SyncBatchNorm replacing a
    plain BatchNorm, or a SyncBatchNorm subclass (whose forward may be its own), stays as it is."""
    model = nn.Sequential(nn.BatchNorm2d(4), BatchNormAddReLU(4))
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert type(converted[0]) is nn.SyncBatchNorm

    class OwnSyncBatchNorm(nn.SyncBatchNorm):
        pass

    own = OwnSyncBatchNorm(4)
    converted[1] = own
    assert converted[1] is own


def test_resfast_converter_agrees_with_torchs_and_converts_a_lone_fused_module() -> None:
    """resfast's converter gives the same model as torch's; a BatchNormAddReLU passed on its own (no
    parent to register it) is converted by resfast's only."""
    _, fused, by_torch = _models("resnet18")
    by_resfast = convert_sync_batchnorm(fused)
    assert [(n, type(m)) for n, m in by_resfast.named_modules()] == [
        (n, type(m)) for n, m in by_torch.named_modules()
    ]
    lone = BatchNormAddReLU(4)
    synced = convert_sync_batchnorm(lone)
    assert type(synced) is SyncBatchNormAddReLU and synced.weight is lone.weight
    assert synced.process_group is None
