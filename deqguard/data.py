"""CIFAR-10 from disk: validated loading, a seeded validation split, batched augmentation.

The data lives outside the repository in a *root* that holds `cifar-10-batches-py/`
(torchvision's python layout). We read the pickles ourselves rather than through
`torchvision.datasets.CIFAR10`, because torchvision checks md5s that a lossless rebuild of the
data (such as the one under `../shared/data`) does not match, and because we want one clear error
for a missing or malformed root. The pickles are read with a restricted unpickler that only
rebuilds numpy arrays, so a tampered file cannot run code.

Images stay uint8 `[N, 3, 32, 32]` in memory (150 MB for train) and become float32 in `[0, 1]`
only per batch, on the model's device. There is no normalisation: the models take `[0, 1]` inputs,
as in the paper. Test images keep the official order, so "the first n test images" is a protocol.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pickle
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "CLASSES",
    "ENV_VAR",
    "BATCH_DIR",
    "DatasetError",
    "DatasetNotFoundError",
    "DatasetFormatError",
    "CifarSplit",
    "resolve_data_root",
    "load_cifar10",
    "load_test",
    "train_val_split",
    "dataset_fingerprint",
    "augment",
    "random_crop_flip_params",
    "crop_flip",
    "iterate_batches",
]

CLASSES: tuple[str, ...] = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
ENV_VAR = "DEQGUARD_DATA_DIR"
BATCH_DIR = "cifar-10-batches-py"
TRAIN_FILES: tuple[str, ...] = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILES: tuple[str, ...] = ("test_batch",)
META_FILE = "batches.meta"
IMAGES_PER_FILE = 10_000
N_TRAIN = 50_000
N_TEST = 10_000
IMAGE_SHAPE = (3, 32, 32)

_REPO_ROOT = Path(__file__).resolve().parents[1]
_HINT = (
    f"Expected a directory holding '{BATCH_DIR}/' ({', '.join(TRAIN_FILES + TEST_FILES)}, "
    f"{META_FILE}) in torchvision's python layout. Pass the root explicitly or set {ENV_VAR}; "
    "with internet access, `torchvision.datasets.CIFAR10(root, download=True)` populates a root."
)


class DatasetError(Exception):
    """Base class: the CIFAR-10 root is missing or its files are not what we expect."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """No usable root, or a required file is absent."""


class DatasetFormatError(DatasetError, ValueError):
    """A file exists but its content (shape, dtype, labels, counts) is wrong."""


# --------------------------------------------------------------------------------------------
# Root resolution
# --------------------------------------------------------------------------------------------


def _default_candidates() -> list[Path]:
    """`../shared/data` next to the repository, then relative to the working directory."""
    out: list[Path] = []
    for base in (_REPO_ROOT, Path.cwd()):
        p = (base / ".." / "shared" / "data").resolve()
        if p not in out:
            out.append(p)
    return out


def _as_root(path: Path) -> Path:
    """Accept the `cifar-10-batches-py` directory itself as well as its parent."""
    path = path.expanduser().resolve()
    if path.name == BATCH_DIR and not (path / BATCH_DIR).is_dir():
        return path.parent
    return path


def resolve_data_root(root: str | os.PathLike[str] | None = None) -> Path:
    """Return the root directory that holds `cifar-10-batches-py/`.

    Order: the explicit `root`, else the `DEQGUARD_DATA_DIR` environment variable, else
    `../shared/data` relative to the repository and then to the working directory.
    Raises `DatasetNotFoundError` naming every path that was tried.
    """
    if root is not None:
        candidates, source = [_as_root(Path(root))], "the given root"
    elif os.environ.get(ENV_VAR):
        candidates, source = [_as_root(Path(os.environ[ENV_VAR]))], f"${ENV_VAR}"
    else:
        candidates, source = _default_candidates(), "the default locations"
    for c in candidates:
        if (c / BATCH_DIR).is_dir():
            return c
    tried = ", ".join(f"'{c / BATCH_DIR}'" for c in candidates)
    raise DatasetNotFoundError(f"CIFAR-10 not found in {source}: no directory {tried}. {_HINT}")


# --------------------------------------------------------------------------------------------
# Reading and validating the pickles
# --------------------------------------------------------------------------------------------


class _ArrayUnpickler(pickle.Unpickler):
    """Only the globals needed to rebuild numpy arrays: a data file cannot run code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),  # how Python 3 pickles bytes at protocol 2
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed")
        if name in ("ndarray", "dtype"):
            return getattr(np, name)
        if module == "_codecs":
            import codecs

            return codecs.encode
        # numpy 2 moved numpy.core to numpy._core; resolve there to avoid the shim's warning.
        try:
            from numpy._core import multiarray
        except ImportError:  # numpy < 2
            from numpy.core import multiarray

        return getattr(multiarray, name)


def _read_pickle(path: Path) -> dict[str, object]:
    if not path.is_file():
        raise DatasetNotFoundError(f"CIFAR-10 file missing: '{path}'. {_HINT}")
    try:
        with path.open("rb") as fh:
            obj = _ArrayUnpickler(fh, encoding="latin1").load()
    except Exception as exc:  # any decoding failure is a malformed file
        raise DatasetFormatError(
            f"CIFAR-10 file '{path}' could not be read as a CIFAR-10 python pickle "
            f"({type(exc).__name__}: {exc}). {_HINT}"
        ) from exc
    if not isinstance(obj, dict):
        raise DatasetFormatError(f"CIFAR-10 file '{path}' holds {type(obj).__name__}, not a dict.")
    return obj


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch file -> (uint8 [10000, 3, 32, 32], int64 [10000]), validated."""
    d = _read_pickle(path)
    data, labels = d.get("data"), d.get("labels")
    if not isinstance(data, np.ndarray) or labels is None:
        raise DatasetFormatError(
            f"CIFAR-10 file '{path}' must hold 'data' (numpy array) and 'labels'; "
            f"found keys {sorted(d)}."
        )
    expected = (IMAGES_PER_FILE, int(np.prod(IMAGE_SHAPE)))
    if data.dtype != np.uint8 or data.shape != expected:
        raise DatasetFormatError(
            f"CIFAR-10 file '{path}': 'data' must be uint8 with shape {expected}, "
            f"got {data.dtype} with shape {data.shape}."
        )
    try:
        lab = np.asarray(labels)
    except Exception as exc:
        raise DatasetFormatError(f"CIFAR-10 file '{path}': 'labels' is not a list.") from exc
    if lab.shape != (IMAGES_PER_FILE,) or not np.issubdtype(lab.dtype, np.integer):
        raise DatasetFormatError(
            f"CIFAR-10 file '{path}': 'labels' must be {IMAGES_PER_FILE} integers, "
            f"got dtype {lab.dtype} with shape {lab.shape}."
        )
    if lab.min() < 0 or lab.max() >= len(CLASSES):
        raise DatasetFormatError(
            f"CIFAR-10 file '{path}': labels must lie in 0..{len(CLASSES) - 1}, "
            f"got {int(lab.min())}..{int(lab.max())}."
        )
    # Rows hold the R, G, B planes of 1024 pixels each, row-major: a plain reshape is CHW.
    return data.reshape(-1, *IMAGE_SHAPE), lab.astype(np.int64)


def _check_meta(batch_dir: Path) -> None:
    meta = _read_pickle(batch_dir / META_FILE)
    names = meta.get("label_names")
    if names is None or tuple(names) != CLASSES:
        raise DatasetFormatError(
            f"CIFAR-10 file '{batch_dir / META_FILE}': 'label_names' must be {list(CLASSES)}, "
            f"got {names!r}."
        )


@functools.lru_cache(maxsize=4)
def _load_split(batch_dir: str, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode and validate one split once per process (keyed on the resolved directory)."""
    path = Path(batch_dir)
    _check_meta(path)
    files = TRAIN_FILES if train else TEST_FILES
    parts = [_read_batch(path / name) for name in files]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    expected = N_TRAIN if train else N_TEST
    if len(images) != expected:  # guards against a future change of the file lists
        raise DatasetFormatError(
            f"CIFAR-10 in '{path}': expected {expected} images, got {len(images)}."
        )
    return torch.from_numpy(images), torch.from_numpy(labels)


# --------------------------------------------------------------------------------------------
# The split type and loaders
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CifarSplit:
    """A set of CIFAR-10 images kept as uint8, with their positions in the official split.

    The tensors of a freshly loaded split are shared with the in-process cache: treat them as
    read-only (indexing, `subset`, `head` and `float_images` all return new tensors).
    """

    images: torch.Tensor  # uint8 [N, 3, 32, 32]
    labels: torch.Tensor  # int64 [N], values in 0..9
    indices: torch.Tensor = field(default=None)  # type: ignore[assignment]  # int64 [N] official positions

    def __post_init__(self) -> None:
        if self.images.dim() != 4 or tuple(self.images.shape[1:]) != IMAGE_SHAPE:
            raise ValueError(f"images must be [N, 3, 32, 32], got {tuple(self.images.shape)}")
        if self.images.dtype != torch.uint8:
            raise ValueError(f"images must be uint8, got {self.images.dtype}")
        if self.labels.shape != (len(self.images),):
            raise ValueError(f"labels must be [{len(self.images)}], got {tuple(self.labels.shape)}")
        if self.indices is None:
            object.__setattr__(self, "indices", torch.arange(len(self.images)))
        elif self.indices.shape != (len(self.images),):
            raise ValueError(
                f"indices must be [{len(self.images)}], got {tuple(self.indices.shape)}"
            )

    def __len__(self) -> int:
        return len(self.labels)

    def float_images(
        self, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """All images as `dtype` in [0, 1], [N, 3, 32, 32]; converted on `device` (moves uint8)."""
        return self.images.to(device).to(dtype).div_(255)

    def subset(self, idx: torch.Tensor | Sequence[int] | slice) -> CifarSplit:
        """The samples at `idx` (positions in this split), keeping their official indices."""
        if not isinstance(idx, slice):
            idx = torch.as_tensor(idx, dtype=torch.long)
        return CifarSplit(self.images[idx], self.labels[idx], self.indices[idx])

    def head(self, n: int) -> CifarSplit:
        """The first `n` samples in order (e.g. "the first n test images")."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        return self.subset(slice(0, n))


def load_cifar10(root: str | os.PathLike[str] | None = None, train: bool = True) -> CifarSplit:
    """The official train (50,000) or test (10,000) split, in the official order.

    Decoded arrays are cached per process, keyed on the resolved root.
    """
    batch_dir = resolve_data_root(root) / BATCH_DIR
    images, labels = _load_split(str(batch_dir), bool(train))
    return CifarSplit(images, labels)


def load_test(root: str | os.PathLike[str] | None = None, n: int | None = None) -> CifarSplit:
    """The test split in the official order; with `n`, the first `n` test images."""
    test = load_cifar10(root, train=False)
    return test if n is None else test.head(n)


def train_val_split(
    train: CifarSplit, n_val: int = 5000, seed: int = 0, *, stratify: bool = True
) -> tuple[CifarSplit, CifarSplit]:
    """Hold out `n_val` samples of `train` for model selection; returns (train_rest, val).

    Deterministic for a given seed (numpy PCG64). With `stratify`, every class gets
    `n_val // 10` samples (the remainder goes to the first classes), so the validation accuracy
    is not skewed by class mix. Both parts keep the official order of the samples they hold.
    """
    n = len(train)
    if not 0 < n_val < n:
        raise ValueError(f"n_val must be in 1..{n - 1}, got {n_val}")
    rng = np.random.default_rng(seed)
    labels = train.labels.numpy()
    if stratify:
        n_cls = len(CLASSES)
        quota = [n_val // n_cls + (1 if c < n_val % n_cls else 0) for c in range(n_cls)]
        picked = []
        for c in range(n_cls):
            members = np.flatnonzero(labels == c)
            if len(members) < quota[c]:
                raise ValueError(f"class {c} has {len(members)} samples, fewer than {quota[c]}")
            picked.append(members[rng.permutation(len(members))[: quota[c]]])
        val_idx = np.concatenate(picked)
    else:
        val_idx = rng.permutation(n)[:n_val]
    mask = np.zeros(n, dtype=bool)
    mask[val_idx] = True
    val_pos = torch.from_numpy(np.flatnonzero(mask))
    rest_pos = torch.from_numpy(np.flatnonzero(~mask))
    return train.subset(rest_pos), train.subset(val_pos)


@functools.lru_cache(maxsize=8)
def _fingerprint(batch_dir: str, stamp: tuple[tuple[str, int, int], ...]) -> str:
    h = hashlib.sha256()
    for name, _size, _mtime in stamp:
        h.update(name.encode())
        h.update(hashlib.sha256((Path(batch_dir) / name).read_bytes()).digest())
    return h.hexdigest()


def dataset_fingerprint(root: str | os.PathLike[str] | None = None) -> str:
    """sha256 over the names and bytes of the batch files, for model manifests.

    Cached per process; the cache key includes each file's size and mtime, so edits are seen.
    """
    batch_dir = resolve_data_root(root) / BATCH_DIR
    stamp = []
    for name in (*TRAIN_FILES, *TEST_FILES, META_FILE):
        p = batch_dir / name
        if not p.is_file():
            raise DatasetNotFoundError(f"CIFAR-10 file missing: '{p}'. {_HINT}")
        st = p.stat()
        stamp.append((name, st.st_size, st.st_mtime_ns))
    return _fingerprint(str(batch_dir), tuple(stamp))


# --------------------------------------------------------------------------------------------
# Augmentation (batched, on the tensor's device)
# --------------------------------------------------------------------------------------------


def random_crop_flip_params(
    batch: int,
    *,
    padding: int = 4,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw per-sample crop offsets int64 [B, 2] (dy, dx in 0..2*padding) and flips bool [B].

    Draws on the generator's device (or `device` without a generator) and returns tensors there.
    """
    gen_device = generator.device if generator is not None else device
    offsets = torch.randint(0, 2 * padding + 1, (batch, 2), generator=generator, device=gen_device)
    flips = torch.rand(batch, generator=generator, device=gen_device) < 0.5
    return offsets, flips


def crop_flip(
    x: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, *, padding: int = 4
) -> torch.Tensor:
    """Zero-pad `x` [B, C, H, W] by `padding`, crop H x W at `offsets`, mirror where `flips`.

    One gather for the whole batch (no per-sample Python loop). Equals, per sample i:
    `pad(x)[i, :, dy:dy+H, dx:dx+W]`, then `.flip(-1)` if `flips[i]`.
    """
    b, c, h, w = x.shape
    dev = x.device
    offsets, flips = offsets.to(dev), flips.to(dev)
    padded = F.pad(x, (padding, padding, padding, padding))
    rows = offsets[:, 0, None] + torch.arange(h, device=dev)  # [B, H]
    cols = offsets[:, 1, None] + torch.arange(w, device=dev)  # [B, W]
    cols = torch.where(flips[:, None], cols.flip(-1), cols)
    bi = torch.arange(b, device=dev)[:, None, None, None]
    ci = torch.arange(c, device=dev)[None, :, None, None]
    return padded[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]


def augment(
    x: torch.Tensor, generator: torch.Generator | None = None, *, padding: int = 4
) -> torch.Tensor:
    """Random crop (zero padding 4) and random horizontal flip, batched on `x`'s device."""
    offsets, flips = random_crop_flip_params(
        x.shape[0], padding=padding, generator=generator, device=x.device
    )
    return crop_flip(x, offsets, flips, padding=padding)


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------


def iterate_batches(
    split: CifarSplit,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    drop_last: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (images float32 [B, 3, 32, 32] in [0, 1], labels int64 [B]) on `device`.

    The uint8 split is moved to `device` once and batches are gathered there, so a GPU loop
    costs no per-batch host copies. With `shuffle`, the order comes from `generator` (a CPU
    generator), else from `seed`, else from torch's global RNG.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    n = len(split)
    if shuffle:
        if generator is None and seed is not None:
            generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(n, generator=generator)
    else:
        order = torch.arange(n)
    images = split.images.to(device)
    labels = split.labels.to(device)
    order = order.to(images.device)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        yield images[idx].to(torch.float32).div_(255), labels[idx]
