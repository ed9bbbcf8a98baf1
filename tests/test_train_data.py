"""resfast.train.data: the CIFAR-10 pickle layout, ImageFolder trees, digits split, augmentation, errors."""

import pickle

import numpy as np
import pytest
import torch

from resfast.train import Config, data, run

CIFAR_PER_BATCH = 3  # images per data_batch_i in the tiny folder (real files: 10000)


def _cifar_image(k: int) -> np.ndarray:
    """Image k as a CIFAR row: red plane k, green plane 100 + k, blue plane 0..255 repeating, row-major."""
    return np.concatenate([np.full(1024, k), np.full(1024, 100 + k), np.arange(1024) % 256]).astype(np.uint8)


def _write_cifar_batch(path, first: int, n: int) -> None:
    batch = {
        b"batch_label": b"tiny batch",
        b"labels": [(first + i) % 10 for i in range(n)],
        b"data": np.stack([_cifar_image(first + i) for i in range(n)]),
        b"filenames": [f"img_{first + i}.png".encode() for i in range(n)],
    }
    with open(path, "wb") as fh:
        pickle.dump(batch, fh, protocol=2)  # the official files are Python 2 pickles with bytes keys


@pytest.fixture
def cifar_dir(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    for i in range(5):
        _write_cifar_batch(root / f"data_batch_{i + 1}", i * CIFAR_PER_BATCH, CIFAR_PER_BATCH)
    _write_cifar_batch(root / "test_batch", 50, 2)
    return root


def test_cifar10_reads_the_pickle_layout(cifar_dir):
    d = data.load(Config(dataset="cifar10", data_dir=str(cifar_dir.parent)))  # the folder above works too
    n = 5 * CIFAR_PER_BATCH
    assert d.train.images.shape == (n, 3, 32, 32) and d.train.images.dtype == torch.uint8
    assert d.train.labels.tolist() == [k % 10 for k in range(n)]  # batches 1..5 in order
    for k in (0, 7, n - 1):
        image = d.train.images[k]
        assert (image[0] == k).all() and (image[1] == 100 + k).all()  # planes are channels R, G, B
        assert torch.equal(image[2], (torch.arange(1024) % 256).view(32, 32).to(torch.uint8))  # rows
    assert d.test.labels.tolist() == [0, 1] and (d.test.images[1, 0] == 51).all()
    assert (d.transform.size, d.transform.scale, d.transform.pad, d.transform.flip) == (32, 1 / 255, 4, True)


def test_cifar10_trains_end_to_end(cifar_dir, tmp_path):
    cfg = Config(
        dataset="cifar10",
        data_dir=str(cifar_dir),
        model="resnet8",
        epochs=1,
        batch_size=4,
        batch_schedule="constant",
        out=str(tmp_path / "run"),
        progress=False,
    )
    summary = run(cfg)
    assert summary["samples"] == 5 * CIFAR_PER_BATCH and summary["steps"] == 4  # 4 + 4 + 4 + 3
    assert 0 <= summary["test_acc"] <= 1


def test_cifar10_missing_files_are_named(cifar_dir, tmp_path):
    (cifar_dir / "test_batch").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing: test_batch\. Get them from https://") as e:
        data.load(Config(dataset="cifar10", data_dir=str(cifar_dir)))
    assert "data_batch_1" not in str(e.value).split("missing:")[1]
    with pytest.raises(
        FileNotFoundError, match=r"data_batch_1 \.\. data_batch_5 and test_batch in .*nowhere"
    ):
        data.load(Config(dataset="cifar10", data_dir=str(tmp_path / "nowhere")))


@pytest.mark.parametrize(
    "content",
    [b"not a pickle", pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)}), pickle.dumps({b"labels": [1]})],
    ids=["garbage", "no-labels", "no-data"],
)
def test_cifar10_malformed_batch_is_named(cifar_dir, content):
    (cifar_dir / "data_batch_3").write_bytes(content)
    with pytest.raises(ValueError, match=r"data_batch_3 is not a CIFAR-10 python batch .*b'data'.*3072"):
        data.load(Config(dataset="cifar10", data_dir=str(cifar_dir)))


def test_cifar10_wrong_row_length_is_rejected(cifar_dir):
    with open(cifar_dir / "data_batch_2", "wb") as fh:
        pickle.dump({b"data": np.zeros((2, 1024), np.uint8), b"labels": [0, 1]}, fh, protocol=2)
    with pytest.raises(ValueError, match=r"data_batch_2 .*shape \(2, 1024\)"):
        data.load(Config(dataset="cifar10", data_dir=str(cifar_dir)))


def test_imagefolder_trains_and_reports_missing_splits(tmp_path):
    from PIL import Image

    for split, per_class in (("train", 3), ("val", 2)):
        for c, colour in enumerate(("red", "blue")):
            folder = tmp_path / "images" / split / f"class_{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (20 + i, 18), colour).save(folder / f"{i}.png")
    cfg = Config(
        dataset="imagefolder",
        data_dir=str(tmp_path / "images"),
        image_size=16,
        model="resnet8",
        epochs=1,
        batch_size=2,
        batch_schedule="constant",
        out=str(tmp_path / "run"),
        progress=False,
    )
    d = data.load(cfg)
    assert (len(d.train), len(d.test), d.num_classes) == (6, 4, 2)
    image, label = d.train[0]
    assert image.shape == (3, 16, 16) and label == 0
    assert run(cfg)["samples"] == 6
    with pytest.raises(FileNotFoundError, match=r"expected .*empty/train and .*empty/val \(or .*test\)"):
        data.load(Config(dataset="imagefolder", data_dir=str(tmp_path / "empty")))


def test_digits_split_is_fixed_stratified_and_normalised():
    a, b = data.load(Config()), data.load(Config(seed=5))  # the split does not follow the run's seed
    assert (len(a.train), len(a.test)) == (1437, 360)
    assert torch.equal(a.test.labels, b.test.labels) and torch.equal(a.train.images, b.train.images)
    counts = torch.bincount(a.test.labels)  # 20% of each class's ~180 images
    assert len(counts) == 10 and counts.min() >= 35 and counts.max() <= 37
    x = a.transform(a.train.images)
    assert x.shape == (1437, 3, 8, 8)
    assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(x.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-3)
    assert data.load(Config(image_size=16, train_samples=100)).transform(a.train.images[:100]).shape[-1] == 16


def test_random_crop_shifts_each_image_by_at_most_pad():
    x = torch.arange(64 * 3 * 8 * 8, dtype=torch.float32).view(64, 3, 8, 8) + 1
    out = data.random_crop(x, 1, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
    shifts = []
    for i in range(len(x)):
        found = [
            (dy, dx)
            for dy in range(3)
            for dx in range(3)
            if torch.equal(out[i], padded[i, :, dy : dy + 8, dx : dx + 8])
        ]
        assert len(found) == 1, f"image {i} is not a crop of its padded self"
        shifts.append(found[0])
    assert len(set(shifts)) == 9  # every offset in [-1, 1]^2 is drawn among 64 images


def test_augmentation_is_a_function_of_its_seed():
    d = data.load(Config(dataset="synthetic", train_samples=32, test_samples=8))
    t = data.BatchTransform(size=32, scale=1 / 255, pad=4, flip=True)
    x = d.train.images
    assert torch.equal(t(x, augment_seed=3), t(x, augment_seed=3))
    assert not torch.equal(t(x, augment_seed=3), t(x, augment_seed=4))
    flipped = data.BatchTransform(size=32, scale=1 / 255, flip=True)(x, augment_seed=1)
    plain = data.BatchTransform(size=32, scale=1 / 255)(x)
    same = [torch.equal(f, p) for f, p in zip(flipped, plain, strict=True)]
    mirrored = [torch.equal(f, p.flip(-1)) for f, p in zip(flipped, plain, strict=True)]
    assert all(s or m for s, m in zip(same, mirrored, strict=True)) and any(mirrored) and any(same)


def test_synthetic_sizes():
    d = data.load(Config(dataset="synthetic", image_size=12))
    assert (len(d.train), len(d.test)) == (data.SYNTHETIC_TRAIN, data.SYNTHETIC_TEST)
    assert d.train.images.shape[1:] == (3, 12, 12)
    assert int(d.train.labels.max()) == 9 and int(d.train.labels.min()) == 0
