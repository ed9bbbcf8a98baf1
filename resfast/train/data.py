"""Datasets: digits, cifar10, imagefolder and synthetic, as train and test `Dataset`s plus a `BatchTransform`.

digits, cifar10 and synthetic are held in memory as uint8 tensors (on the training device when it is a
GPU) and fetched a whole batch at a time (``__getitems__``); normalisation and augmentation then run
on the batch, on the device, with randomness drawn from a seed the loop derives from the sample clock,
so a resumed run augments exactly as the interrupted one. imagefolder decodes files with torchvision
transforms in the DataLoader, as usual.
"""

from __future__ import annotations

import functools
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from resfast.train.config import Config
from resfast.train.errors import SettingError, UserFileNotFoundError

__all__ = ["BatchTransform", "Data", "InMemory", "load"]

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST = "test_batch"
# Per-channel statistics of the CIFAR-10 training set (of pixel / 255), as used across the literature.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DIGITS_TEST = 360  # of 1797 images: a fixed, class-stratified 20% split
SYNTHETIC_TRAIN, SYNTHETIC_TEST = 10000, 2000


class InMemory(Dataset[tuple[Tensor, Tensor]]):
    """uint8 images (N, C, H, W) and int64 labels (N,); a DataLoader fetches a batch by one indexing."""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4 or labels.shape != images.shape[:1]:
            raise ValueError(
                f"expected uint8 images (N, C, H, W) and N labels, got {images.dtype} images of shape "
                f"{tuple(images.shape)} and labels of shape {tuple(labels.shape)}"
            )
        self.images, self.labels = images, labels.long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.images[index], self.labels[index]

    def __getitems__(self, indices: list[int]) -> tuple[Tensor, Tensor]:
        index = torch.tensor(indices)
        if self.images.is_cuda:  # from pinned memory the copy is queued: the host does not wait
            index = index.pin_memory().to(self.images.device, non_blocking=True)
        return self.images[index], self.labels[index]

    def head(self, n: int) -> InMemory:
        """The first n samples (all when n is 0)."""
        return self if n == 0 else InMemory(self.images[:n], self.labels[:n])

    def to(self, device: torch.device) -> InMemory:
        return InMemory(self.images.to(device), self.labels.to(device))


def keep_batch(batch: Any) -> Any:
    """collate_fn of `InMemory`: ``__getitems__`` already returns the batch (module level: picklable)."""
    return batch


@dataclass(frozen=True)
class BatchTransform:
    """What the loop applies to a fetched batch on the device: float, resize, normalise, augment.

    ``scale`` maps the stored values to [0, 1] (1/255 for 8-bit pixels); ``mean``/``std`` then
    normalise per channel. Augmentation: a random crop of the image padded by ``pad`` pixels (a
    shift by up to ``pad``) and, with ``flip``, a horizontal flip with probability 1/2.
    """

    size: int
    scale: float = 1.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    pad: int = 0
    flip: bool = False

    def __call__(self, x: Tensor, *, augment_seed: int | None = None) -> Tensor:
        x = x.float() * self.scale
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        x = (x - _per_channel(self.mean, x.device)) / _per_channel(self.std, x.device)
        if augment_seed is not None:
            # Drawn on the batch's device, so nothing is copied to it (a copy would wait for the GPU).
            generator = torch.Generator(x.device).manual_seed(augment_seed)
            if self.pad:
                x = random_crop(x, self.pad, generator)
            if self.flip:
                flip = torch.rand(len(x), device=x.device, generator=generator) < 0.5
                x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        return x


@functools.cache
def _per_channel(values: tuple[float, ...], device: torch.device) -> Tensor:
    """(C, 1, 1) constants, made once per device."""
    return torch.tensor(values, device=device).view(-1, 1, 1)


def random_crop(x: Tensor, pad: int, generator: torch.Generator) -> Tensor:
    """Each image shifted by its own offsets in [-pad, pad] (zero fill): a crop of the padded image."""
    n, _, h, w = x.shape
    offsets = torch.randint(0, 2 * pad + 1, (2, n), device=x.device, generator=generator)
    rows = offsets[0, :, None] + torch.arange(h, device=x.device)  # (n, h)
    cols = offsets[1, :, None] + torch.arange(w, device=x.device)  # (n, w)
    padded = F.pad(x, (pad, pad, pad, pad)).permute(0, 2, 3, 1)  # (n, H, W, c): index rows and cols
    batch = torch.arange(n, device=x.device).view(-1, 1, 1)
    return padded[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


@dataclass
class Data:
    train: Dataset[Any]
    test: Dataset[Any]
    num_classes: int
    transform: BatchTransform
    collate: Any = None  # the DataLoader's collate_fn; None: torch's default

    def to(self, device: torch.device) -> Data:
        """In-memory data moved to ``device`` (so a batch is gathered there, with no copy per step)."""
        if isinstance(self.train, InMemory) and isinstance(self.test, InMemory):
            self.train, self.test = self.train.to(device), self.test.to(device)
        return self


def load(cfg: Config) -> Data:
    """The dataset ``cfg`` names, subset to ``cfg.train_samples`` / ``cfg.test_samples``."""
    loader = {"digits": _digits, "cifar10": _cifar10, "imagefolder": _imagefolder, "synthetic": _synthetic}
    data = loader[cfg.dataset](cfg)
    if isinstance(data.train, InMemory) and isinstance(data.test, InMemory):
        data.train, data.test = data.train.head(cfg.train_samples), data.test.head(cfg.test_samples)
    elif cfg.train_samples or cfg.test_samples:
        data.train = _head(data.train, cfg.train_samples)
        data.test = _head(data.test, cfg.test_samples)
    return data


def _head(dataset: Dataset[Any], n: int) -> Dataset[Any]:
    return dataset if n == 0 else torch.utils.data.Subset(dataset, range(min(n, len(dataset))))  # type: ignore[arg-type]


def _digits(cfg: Config) -> Data:
    """scikit-learn's 1797 8x8 digits (pixels 0..16), grey repeated to 3 channels, a fixed split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.from_numpy(digits.images).to(torch.uint8)[:, None].expand(-1, 3, -1, -1).contiguous()
    labels = torch.from_numpy(digits.target)
    train_idx, test_idx = train_test_split(
        range(len(labels)), test_size=DIGITS_TEST, stratify=digits.target, random_state=0
    )
    train_idx, test_idx = torch.tensor(train_idx), torch.tensor(test_idx)
    pixels = images[train_idx].float() / 16
    transform = BatchTransform(
        size=cfg.image_size or 8,
        scale=1 / 16,
        mean=tuple(pixels.mean(dim=(0, 2, 3)).tolist()),
        std=tuple(pixels.std(dim=(0, 2, 3)).tolist()),
        pad=1 if cfg.augment else 0,  # a digit shifted by 2 of its 8 pixels starts to leave the frame
    )
    return Data(
        InMemory(images[train_idx], labels[train_idx]),
        InMemory(images[test_idx], labels[test_idx]),
        10,
        transform,
        keep_batch,
    )


def _cifar10_root(data_dir: str) -> Path:
    """The folder holding the batches: data_dir itself or its cifar-10-batches-py (as extracted)."""
    root = Path(data_dir)
    nested = root / "cifar-10-batches-py"
    return nested if not (root / CIFAR10_TEST).exists() and nested.is_dir() else root


def _read_cifar_batch(path: Path) -> tuple[Tensor, Tensor]:
    try:
        with open(path, "rb") as fh:
            # The official files are Python 2 pickles of {b"data": uint8 (N, 3072), b"labels": [int]}.
            batch = pickle.load(fh, encoding="bytes")
        data, labels = batch[b"data"], batch[b"labels"]
        images = torch.as_tensor(data, dtype=torch.uint8)
        if images.dim() != 2 or images.shape[1] != 3 * 32 * 32 or len(labels) != len(images):
            raise ValueError(f"data of shape {tuple(images.shape)} with {len(labels)} labels")
        labels = torch.as_tensor(labels, dtype=torch.int64)
        if labels.numel() and not 0 <= int(labels.min()) <= int(labels.max()) <= 9:
            raise ValueError(f"labels outside 0..9 ({int(labels.min())}..{int(labels.max())})")
    except Exception as e:
        raise SettingError(
            f"cifar10: {path} is not a CIFAR-10 python batch (a pickled dict with b'data', uint8 of shape "
            f"(N, 3072) with rows R, G, B of 32x32, and b'labels', N ints in 0..9): "
            f"{type(e).__name__}: {e}"
        ) from None
    # Each row is 1024 red, then 1024 green, then 1024 blue values, each plane row-major.
    return images.view(-1, 3, 32, 32), labels


def _cifar10(cfg: Config) -> Data:
    root = _cifar10_root(cfg.data_dir)
    missing = [name for name in (*CIFAR10_TRAIN, CIFAR10_TEST) if not (root / name).is_file()]
    if missing:
        raise UserFileNotFoundError(
            f"cifar10: expected the python-pickle CIFAR-10 files data_batch_1 .. data_batch_5 and "
            f"test_batch in {root} (or in {root}/cifar-10-batches-py); missing: {', '.join(missing)}. "
            f"Get them from {CIFAR10_URL} (tar xzf) and pass the extracted folder as --data-dir."
        )
    train = [_read_cifar_batch(root / name) for name in CIFAR10_TRAIN]
    test_images, test_labels = _read_cifar_batch(root / CIFAR10_TEST)
    transform = BatchTransform(
        size=cfg.image_size or 32,
        scale=1 / 255,
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
        pad=4 if cfg.augment else 0,
        flip=cfg.augment,
    )
    return Data(
        InMemory(torch.cat([x for x, _ in train]), torch.cat([y for _, y in train])),
        InMemory(test_images, test_labels),
        10,
        transform,
        keep_batch,
    )


def _imagefolder(cfg: Config) -> Data:
    """torchvision ImageFolder trees ``data_dir/train`` and ``data_dir/val`` (or ``test``)."""
    from torchvision import datasets, transforms

    root = Path(cfg.data_dir)
    test_dir = next((root / name for name in ("val", "test") if (root / name).is_dir()), None)
    if not (root / "train").is_dir() or test_dir is None:
        raise UserFileNotFoundError(
            f"imagefolder: expected {root}/train and {root}/val (or {root}/test), each with one "
            "sub-folder of images per class (torchvision.datasets.ImageFolder layout)"
        )
    size = cfg.image_size or 224
    normalize = [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    augment = [transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip()]
    resize = [transforms.Resize(size * 8 // 7), transforms.CenterCrop(size)]  # 256 -> 224 at ImageNet size
    try:
        train = datasets.ImageFolder(
            str(root / "train"), transforms.Compose((augment if cfg.augment else resize) + normalize)
        )
        test = datasets.ImageFolder(str(test_dir), transforms.Compose(resize + normalize))
    except (FileNotFoundError, RuntimeError) as e:  # ImageFolder's "found no valid file" errors
        raise UserFileNotFoundError(f"imagefolder: {e}") from None
    if train.classes != test.classes:
        raise SettingError(
            f"imagefolder: {root}/train has classes {train.classes} but {test_dir} has {test.classes}"
        )
    # Already normalised tensors: the batch transform only resizes (a no-op) and converts nothing.
    return Data(train, test, len(train.classes), BatchTransform(size=size, mean=(0.0,), std=(1.0,)))


def _synthetic(cfg: Config) -> Data:
    """Random pixels and labels from a fixed generator: same data every run, nothing to learn."""
    generator = torch.Generator().manual_seed(0)
    size = cfg.image_size or 32

    def split(n: int) -> InMemory:
        images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=generator)
        return InMemory(images, torch.randint(0, 10, (n,), generator=generator))

    train = split(cfg.train_samples or SYNTHETIC_TRAIN)
    test = split(cfg.test_samples or SYNTHETIC_TEST)
    transform = BatchTransform(size=size, scale=1 / 255, mean=(0.5,), std=(0.25,))
    return Data(train, test, 10, transform, keep_batch)
