"""`fuse_resnet`: every ``bn -> (+ shortcut) -> relu`` of a ResNet becomes one `BatchNormAddReLU`.

Recognised, by exact type (a subclass may have changed the forward): torchvision's `ResNet`,
`BasicBlock` and `Bottleneck`, and `resfast.nn.cifar`'s `CifarResNet` and `BasicBlock`. A block is
replaced by a `FusedBasicBlock` / `FusedBottleneck` holding the same convolutions and shortcut under
the same names, and fused BatchNorms sharing the original parameter and buffer tensors, so state_dict
keys (and their order) are unchanged and an optimizer built before fusing keeps working. A block whose
BatchNorms are not exactly `nn.BatchNorm2d` (SyncBatchNorm, FrozenBatchNorm2d, ...) or whose
activation is not `nn.ReLU` is left alone. Hooks registered on a replaced block are not carried over.
A model with nothing to fuse (MobileNet, VGG, DenseNet, ...) is returned unchanged with a warning, or
refused with ``strict=True``.
"""

from __future__ import annotations

import sys
import warnings

from torch import Tensor, nn

from resfast import backends
from resfast.nn import cifar
from resfast.nn.modules import BatchNormAddReLU

__all__ = ["FusedBasicBlock", "FusedBottleneck", "fuse_resnet"]


class _FusedBlock(nn.Module):
    """conv1, bn1, ..., conv{depth}, bn{depth} and downsample of a ResNet block, BatchNorms fused."""

    depth: int

    def __init__(self, block: nn.Module, backend: str) -> None:
        super().__init__()
        for i in range(1, self.depth + 1):
            setattr(self, f"conv{i}", getattr(block, f"conv{i}"))
            setattr(self, f"bn{i}", BatchNormAddReLU.from_batchnorm(getattr(block, f"bn{i}"), backend))
        self.downsample = block.downsample
        self.train(block.training)

    def _shortcut(self, x: Tensor) -> Tensor:
        return x if self.downsample is None else self.downsample(x)


class FusedBasicBlock(_FusedBlock):
    """A BasicBlock: relu(bn1(conv1 x)) and relu(bn2(conv2 .) + shortcut) as two fused ops."""

    depth = 2

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn1(self.conv1(x))
        return self.bn2(self.conv2(out), self._shortcut(x))


class FusedBottleneck(_FusedBlock):
    """A Bottleneck: two relu(bn(conv .)) and relu(bn3(conv3 .) + shortcut) as three fused ops."""

    depth = 3

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(self.bn1(self.conv1(x))))
        return self.bn3(self.conv3(out), self._shortcut(x))


def _recognised() -> tuple[dict[type, type[_FusedBlock]], tuple[type, ...]]:
    """(block type -> fused type, model types whose stem is conv1 -> bn1 -> relu)."""
    blocks: dict[type, type[_FusedBlock]] = {cifar.BasicBlock: FusedBasicBlock}
    stems: tuple[type, ...] = (cifar.CifarResNet,)
    # A model can only hold torchvision's blocks if torchvision is imported: no import needed here.
    tv = sys.modules.get("torchvision.models.resnet")
    if tv is not None:
        blocks |= {tv.BasicBlock: FusedBasicBlock, tv.Bottleneck: FusedBottleneck}
        stems += (tv.ResNet,)
    return blocks, stems


def _fusable(module: nn.Module, depth: int) -> bool:
    bns = [getattr(module, f"bn{i}") for i in range(1, depth + 1)]
    return all(type(bn) is nn.BatchNorm2d for bn in bns) and type(module.relu) is nn.ReLU


def _fuse_stem(model: nn.Module, backend: str) -> None:
    """bn1 -> relu of a ResNet's stem: bn1 fused, relu (used by the stem only) made an identity."""
    model.bn1 = BatchNormAddReLU.from_batchnorm(model.bn1, backend)
    model.relu = nn.Identity().train(model.training)


def _check_outcome(model: nn.Module, fused: int, left_alone: list[str], strict: bool) -> None:
    """Warn when nothing was fused (raise if `strict`); with `strict`, refuse blocks left alone too."""
    if strict and left_alone:
        raise ValueError(
            f"fuse_resnet(strict=True): {len(left_alone)} ResNet block(s) left alone, whose BatchNorms are "
            f"not exactly nn.BatchNorm2d or whose activation is not nn.ReLU: {', '.join(left_alone)}"
        )
    # Fusing a fused model again changes nothing, and is no mistake.
    if fused or any(isinstance(m, BatchNormAddReLU) for m in model.modules()):
        return
    message = (
        f"fuse_resnet found nothing to fuse in {type(model).__name__} and returns it unchanged: it fuses "
        "BatchNorm2d -> (+ shortcut) -> ReLU in torchvision's ResNet, BasicBlock and Bottleneck and in "
        "resfast.nn.cifar's ResNets, matched by exact type"
    )
    if strict:
        raise ValueError(message)
    warnings.warn(message, stacklevel=3)


def fuse_resnet(model: nn.Module, *, backend: str = "auto", strict: bool = False) -> nn.Module:
    """Fuse, in place, every BatchNorm -> (+ shortcut) -> ReLU of the ResNets in `model`.

    Returns `model` (a new module only when `model` is itself a single block). Outputs, gradients
    and running stats match the unfused model's within rounding, in train and eval mode; state_dict
    keys are unchanged; calling it again changes nothing. `backend` is the fused modules' backend.
    A model with nothing to fuse is returned unchanged with a warning; `strict=True` raises a
    ValueError instead, and also when a recognised block is left alone (see the module docstring).
    """
    backends.validate(backend)
    blocks, stems = _recognised()
    if type(model) in blocks:
        fused_type = blocks[type(model)]
        if _fusable(model, fused_type.depth):
            return fused_type(model, backend)
        _check_outcome(model, 0, [type(model).__name__], strict)
        return model
    # Found first, replaced after the checks: a refused model is left as it was.
    fusable_stems = [m for m in model.modules() if type(m) in stems and _fusable(m, 1)]
    swaps, left_alone = [], []
    for prefix, module in model.named_modules():
        for name, child in module.named_children():
            fused_type = blocks.get(type(child))
            if fused_type is None:
                continue
            if _fusable(child, fused_type.depth):
                swaps.append((module, name, fused_type))
            else:
                left_alone.append(f"{prefix}.{name}" if prefix else name)
    _check_outcome(model, len(fusable_stems) + len(swaps), left_alone, strict)
    for stem in fusable_stems:
        _fuse_stem(stem, backend)
    for module, name, fused_type in swaps:
        setattr(module, name, fused_type(getattr(module, name), backend))
    return model
