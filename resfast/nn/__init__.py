"""Fused BatchNorm + residual add + ReLU for ResNets.

- `BatchNormAddReLU`: the module (a drop-in for `nn.BatchNorm2d` followed by ``+ residual`` and ReLU).
- `functional.batch_norm_add_relu`: the op itself.
- `fuse_resnet`: rewrites torchvision and `resfast.nn.cifar` ResNets to use it.
- `SyncBatchNormAddReLU`, `convert_sync_batchnorm`: the same with nn.SyncBatchNorm's statistics over
  processes.

Importing this package imports neither Triton nor torchvision. It registers a global module-registration
hook (see `resfast.nn.sync`) so that torch's `nn.SyncBatchNorm.convert_sync_batchnorm` keeps fused
modules fused.
"""

from resfast.nn import cifar, functional
from resfast.nn.convert import fuse_resnet
from resfast.nn.modules import BatchNormAddReLU
from resfast.nn.sync import SyncBatchNormAddReLU, convert_sync_batchnorm

__all__ = [
    "BatchNormAddReLU",
    "SyncBatchNormAddReLU",
    "cifar",
    "convert_sync_batchnorm",
    "functional",
    "fuse_resnet",
]
