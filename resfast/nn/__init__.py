"""Fused BatchNorm + residual add + ReLU for ResNets.

- `BatchNormAddReLU`: the module (a drop-in for `nn.BatchNorm2d` followed by ``+ residual`` and ReLU).
- `functional.batch_norm_add_relu`: the op itself.
- `fuse_resnet`: rewrites torchvision and `resfast.nn.cifar` ResNets to use it.

Importing this package imports neither Triton nor torchvision.
"""

from resfast.nn import cifar, functional
from resfast.nn.convert import fuse_resnet
from resfast.nn.modules import BatchNormAddReLU

__all__ = ["BatchNormAddReLU", "cifar", "functional", "fuse_resnet"]
