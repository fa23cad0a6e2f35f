"""CIFAR-10 loading, splits and augmentation, on the real data under ../shared/data."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from deqguard import data as D


@pytest.fixture(scope="module")
def root() -> Path:
    try:
        return D.resolve_data_root()
    except D.DatasetNotFoundError as exc:  # pragma: no cover - depends on the machine
        pytest.skip(f"no CIFAR-10 root: {exc}")


@pytest.fixture(scope="module")
def train(root: Path) -> D.CifarSplit:
    return D.load_cifar10(root, train=True)


@pytest.fixture(scope="module")
def test(root: Path) -> D.CifarSplit:
    return D.load_test(root)


def test_counts_shapes_dtypes(train: D.CifarSplit, test: D.CifarSplit) -> None:
    assert len(train) == 50_000 and len(test) == 10_000
    for split in (train, test):
        assert split.images.shape[1:] == (3, 32, 32)
        assert split.images.dtype == torch.uint8
        assert split.labels.dtype == torch.int64
        assert int(split.labels.min()) == 0 and int(split.labels.max()) == 9
        assert torch.equal(split.indices, torch.arange(len(split)))


def test_classes_balanced(train: D.CifarSplit, test: D.CifarSplit) -> None:
    assert D.CLASSES[0] == "airplane" and D.CLASSES[-1] == "truck" and len(D.CLASSES) == 10
    assert torch.bincount(train.labels, minlength=10).tolist() == [5000] * 10
    assert torch.bincount(test.labels, minlength=10).tolist() == [1000] * 10


def test_official_order(train: D.CifarSplit, test: D.CifarSplit) -> None:
    assert train.labels[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]
    assert test.labels[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
    # Published values of data_batch_1 row 0 (R plane first) and test_batch row 0.
    assert train.images[0].reshape(-1)[:3].tolist() == [59, 43, 50]
    assert train.images[0].reshape(-1)[-3:].tolist() == [140, 84, 72]
    assert test.images[0].reshape(-1)[:5].tolist() == [158, 159, 165, 166, 160]
    assert torch.equal(D.load_test(n=7).labels, test.labels[:7])


def test_float_images_and_batches(test: D.CifarSplit) -> None:
    small = test.head(10)
    x = small.float_images()
    assert x.dtype == torch.float32 and x.shape == (10, 3, 32, 32)
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert torch.allclose(x * 255, small.images.float())
    batches = list(D.iterate_batches(small, 4))
    assert [len(b[1]) for b in batches] == [4, 4, 2]
    assert torch.equal(torch.cat([b[0] for b in batches]), x)
    assert [len(b[1]) for b in D.iterate_batches(small, 4, drop_last=True)] == [4, 4]
    a = torch.cat([y for _, y in D.iterate_batches(small, 3, shuffle=True, seed=1)])
    b = torch.cat([y for _, y in D.iterate_batches(small, 3, shuffle=True, seed=1)])
    assert torch.equal(a, b) and sorted(a.tolist()) == sorted(small.labels.tolist())


def test_val_split(train: D.CifarSplit) -> None:
    rest, val = D.train_val_split(train, n_val=5000, seed=0)
    assert len(rest) == 45_000 and len(val) == 5000
    vi, ri = set(val.indices.tolist()), set(rest.indices.tolist())
    assert not vi & ri and len(vi | ri) == 50_000
    assert torch.bincount(val.labels, minlength=10).tolist() == [500] * 10
    assert torch.equal(val.labels, train.labels[val.indices])
    assert torch.equal(val.images[:5], train.images[val.indices[:5]])
    _, again = D.train_val_split(train, n_val=5000, seed=0)
    _, other = D.train_val_split(train, n_val=5000, seed=1)
    assert torch.equal(val.indices, again.indices)
    assert not torch.equal(val.indices, other.indices)
    _, flat = D.train_val_split(train, n_val=123, seed=0, stratify=False)
    assert len(flat) == 123


def test_crop_flip_matches_per_sample_reference() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 32, 32, generator=g)
    offsets = torch.tensor([[0, 0], [8, 8], [4, 4], [1, 7], [3, 0], [8, 2]])
    flips = torch.tensor([False, True, False, True, True, False])
    out = D.crop_flip(x, offsets, flips)
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(6):
        dy, dx = offsets[i].tolist()
        ref = padded[i, :, dy : dy + 32, dx : dx + 32]
        ref = ref.flip(-1) if flips[i] else ref
        assert torch.equal(out[i], ref)
    assert torch.equal(out[2], x[2])  # centre crop, no flip: identity
    assert not out[0][:, :4, :].any() and not out[0][:, :, :4].any()  # zero padding shifted in
    assert not out[1][:, -4:, :].any() and not out[1][:, :, :4].any()  # ... and mirrored


def test_augment_random_draws() -> None:
    x = torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    y = D.augment(x, torch.Generator().manual_seed(5))
    assert y.shape == x.shape and y.dtype == x.dtype
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    offsets, flips = D.random_crop_flip_params(64, generator=torch.Generator().manual_seed(5))
    assert torch.equal(y, D.crop_flip(x, offsets, flips))
    assert 0 < int(flips.sum()) < 64  # some flipped, some not
    assert int(offsets.min()) >= 0 and int(offsets.max()) <= 8
    assert len(set(map(tuple, offsets.tolist()))) > 10  # crops vary
    assert not torch.equal(y, x)


def test_missing_root_error(tmp_path: Path) -> None:
    with pytest.raises(D.DatasetNotFoundError) as info:
        D.load_cifar10(tmp_path, train=False)
    msg = str(info.value)
    assert str(tmp_path) in msg and D.ENV_VAR in msg and "download=True" in msg
    assert isinstance(info.value, FileNotFoundError)


def _fake_root(tmp_path: Path, root: Path) -> Path:
    """A copy of the meta file plus one test batch written by the test."""
    batch_dir = tmp_path / D.BATCH_DIR
    batch_dir.mkdir()
    shutil.copy(root / D.BATCH_DIR / D.META_FILE, batch_dir / D.META_FILE)
    return batch_dir


def test_malformed_file_error(tmp_path: Path, root: Path) -> None:
    batch_dir = _fake_root(tmp_path, root)
    bad = {"data": np.zeros((10_000, 1024), dtype=np.uint8), "labels": [0] * 10_000}
    (batch_dir / "test_batch").write_bytes(pickle.dumps(bad, protocol=2))
    with pytest.raises(D.DatasetFormatError) as info:
        D.load_cifar10(tmp_path, train=False)
    msg = str(info.value)
    assert "test_batch" in msg and "(10000, 3072)" in msg and "(10000, 1024)" in msg
    assert isinstance(info.value, ValueError)


def test_bad_labels_and_garbage(tmp_path: Path, root: Path) -> None:
    batch_dir = _fake_root(tmp_path, root)
    bad = {"data": np.zeros((10_000, 3072), dtype=np.uint8), "labels": [10] * 10_000}
    (batch_dir / "test_batch").write_bytes(pickle.dumps(bad, protocol=2))
    with pytest.raises(D.DatasetFormatError, match="0..9"):
        D.load_cifar10(tmp_path, train=False)
    (batch_dir / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(D.DatasetFormatError, match="test_batch"):
        D.load_cifar10(tmp_path, train=False)


def test_unpickler_refuses_code(tmp_path: Path, root: Path) -> None:
    batch_dir = _fake_root(tmp_path, root)
    (batch_dir / "test_batch").write_bytes(pickle.dumps({"data": print}, protocol=2))
    with pytest.raises(D.DatasetFormatError, match="not allowed"):
        D.load_cifar10(tmp_path, train=False)


def test_env_var_resolution(tmp_path: Path, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(D.ENV_VAR, str(root))
    assert D.resolve_data_root() == root.resolve()
    monkeypatch.setenv(D.ENV_VAR, str(root / D.BATCH_DIR))  # the batch dir itself is accepted
    assert D.resolve_data_root() == root.resolve()
    monkeypatch.setenv(D.ENV_VAR, str(tmp_path))
    with pytest.raises(D.DatasetNotFoundError, match=D.ENV_VAR):
        D.resolve_data_root()
    assert D.resolve_data_root(root) == root.resolve()  # an explicit root wins


def test_fingerprint(root: Path) -> None:
    fp = D.dataset_fingerprint(root)
    assert len(fp) == 64 and fp == D.dataset_fingerprint(root)
