"""Data for the edge runtime, streamed from disk in the torch runtime's order (numpy only).

``load_edge_data`` gives the same sets as ``edgeff.data.load_data`` (``builtin``, ``mnist``,
``fashion-mnist``, ``cifar10``, ``cifar10-exact``) with the same shuffled order per (seed, epoch),
the same normalisation and the same batches, as float32 numpy arrays. The IDX sets are not held in
memory: a ``.gz`` file is unpacked once into a cache folder (default ``~/.cache/edgeff``; the data
folder itself is only read), and each batch's samples are read from it with ``os.pread``, so a
board holds one batch of pixels at a time (the full MNIST training images are 47 MB as uint8).
"""

from __future__ import annotations

import gzip
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from edgeff.edge.rand import permutation
from edgeff.errors import DataNotFoundError
from edgeff.files import atomic_write

DIGITS = tuple(str(i) for i in range(10))
FASHION = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
CIFAR = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# the per-channel pixel mean and std each set is normalised with (pixels scaled to [0, 1]): one definition
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
FASHION_MEAN, FASHION_STD = (0.2860,), (0.3530,)
IDX_SETS = {"mnist": ("MNIST", DIGITS, MNIST_MEAN, MNIST_STD),
            "fashion-mnist": ("FashionMNIST", FASHION, FASHION_MEAN, FASHION_STD)}
DATASETS = ("builtin", "mnist", "fashion-mnist", "cifar10", "cifar10-exact")


def default_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgeff"


class IdxImages:
    """The images of an uncompressed IDX file, read sample by sample with ``os.pread``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with open(path, "rb") as f:
            head = f.read(4)
            if len(head) != 4 or head[2] != 8:
                raise DataNotFoundError(f"{path} is not a uint8 IDX file")
            dims = [int.from_bytes(f.read(4), "big") for _ in range(head[3])]
        self.offset = 4 + 4 * len(dims)
        self.n = dims[0]
        self.shape = (1, *dims[1:]) if len(dims) == 3 else tuple(dims[1:])
        self.per = int(np.prod(self.shape))
        if os.path.getsize(path) < self.offset + self.n * self.per:
            raise DataNotFoundError(f"{path} is truncated; delete it to unpack it again")
        self.fd = os.open(path, os.O_RDONLY)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, idx: np.ndarray) -> np.ndarray:
        out = np.empty((len(idx), self.per), np.uint8)
        for row, i in enumerate(idx):
            out[row] = np.frombuffer(os.pread(self.fd, self.per, self.offset + int(i) * self.per), np.uint8)
        return out.reshape(len(idx), *self.shape)

    def __del__(self) -> None:
        if getattr(self, "fd", None) is not None:
            os.close(self.fd)


def _labels(path: Path) -> np.ndarray:
    opener: Any = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    return np.frombuffer(data, np.uint8, offset=8).astype(np.int64)


def _unpacked(path: Path, cache: Path) -> Path:
    """``path`` itself when uncompressed; else its contents unpacked once into ``cache`` (atomically)."""
    if path.suffix != ".gz":
        return path
    out = cache / path.parent.parent.name / path.stem
    if out.is_file():
        return out

    def unpack(dst: IO[bytes]) -> None:
        with gzip.open(path, "rb") as src:
            shutil.copyfileobj(src, dst, 1 << 20)

    return atomic_write(out, unpack)


def epoch_order(n: int, seed: int, epoch: int, limit: int | None = None) -> np.ndarray:
    """The training order of an epoch, shared by both runtimes: it depends only on (seed, epoch), so a
    stream resumes where it stopped and the torch and numpy runtimes see the same batches."""
    order = permutation(n, [seed, epoch])  # numpy.random.default_rng([seed, epoch])'s, without numpy.random
    return order if limit is None else order[:limit]


@dataclass
class EdgeData:
    """A labelled image set: images in memory or on disk, labels in memory, normalisation."""

    name: str
    x_train: Any  # (N, C, H, W) uint8 array or IdxImages
    y_train: np.ndarray
    x_test: Any
    y_test: np.ndarray
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        shape = self.x_train.shape[1:] if isinstance(self.x_train, np.ndarray) else self.x_train.shape
        return (int(shape[0]), int(shape[1]), int(shape[2]))

    def normalise(self, x_u8: np.ndarray) -> np.ndarray:
        """uint8 (B, C, H, W) -> float32, as ``edgeff.data.ImageData.normalise``."""
        x = x_u8.astype(np.float32) / np.float32(255.0)
        mean = np.asarray(self.mean, np.float32).reshape(1, -1, 1, 1)
        std = np.asarray(self.std, np.float32).reshape(1, -1, 1, 1)
        return (x - mean) / std

    def train_batches(self, batch_size: int, *, seed: int = 0, epoch: int = 0, limit: int | None = None,
                      skip: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Shuffled batches in ``edgeff.data.ImageData.train_batches``'s order for (seed, epoch)."""
        return self._batches(self.x_train, self.y_train, epoch_order(len(self.y_train), seed, epoch, limit),
                             batch_size, skip)

    def test_batches(self, batch_size: int = 1000, *, limit: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        order = np.arange(len(self.y_test) if limit is None else min(limit, len(self.y_test)))
        return self._batches(self.x_test, self.y_test, order, batch_size, 0)

    def _batches(self, x: Any, y: np.ndarray, order: np.ndarray, batch_size: int,
                 skip: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        if batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {batch_size}")
        for start in range(skip * batch_size, len(order), batch_size):
            idx = order[start : start + batch_size]
            yield self.normalise(x[idx]), y[idx].astype(np.int64)


def data_root(name: str, data_dir: str | Path | None) -> Path:
    """The folder holding data set ``name`` (any but ``builtin``), checked; ``DataNotFoundError`` saying
    what to pass otherwise."""
    if name not in DATASETS:
        raise DataNotFoundError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)} or a folder with "
                                "one sub-folder of images per class")
    if data_dir is None:
        raise DataNotFoundError(f"data set {name!r} needs --data-dir pointing at a folder with its files "
                                "(MNIST/raw/, FashionMNIST/raw/ or CIFAR10/); only 'builtin' ships with edgeff")
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DataNotFoundError(f"data folder {root} does not exist")
    return root


def load_edge_data(name: str = "builtin", data_dir: str | Path | None = None, *,
                   cache_dir: str | Path | None = None) -> EdgeData:
    """Load a data set by name (``edgeff.data.load_data``'s names and folder layout)."""
    if name == "builtin":
        from importlib import resources  # the builtin set only (0.9 MiB of modules otherwise left unloaded)

        with resources.files("edgeff").joinpath("data/mnist_small.npz").open("rb") as f:
            z = np.load(f)
            return EdgeData("builtin", z["x_train"][:, None], z["y_train"], z["x_test"][:, None], z["y_test"], DIGITS,
                            MNIST_MEAN, MNIST_STD)
    root = data_root(name, data_dir)
    if name in IDX_SETS:
        folder, classes, mean, std = IDX_SETS[name]
        raw = root / folder / "raw"
        files = []
        for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                     "t10k-labels-idx1-ubyte"):
            p = next((q for q in (raw / f"{stem}.gz", raw / stem) if q.is_file()), None)
            if p is None:
                raise DataNotFoundError(f"{name} not found: missing {raw / stem}.gz; put the four IDX files in {raw}/ "
                                        f"(torchvision's layout) and pass --data-dir {root}")
            files.append(p)
        cache = Path(cache_dir) if cache_dir is not None else default_cache()
        xtr, xte = IdxImages(_unpacked(files[0], cache)), IdxImages(_unpacked(files[2], cache))
        return EdgeData(name, xtr, _labels(files[1]), xte, _labels(files[3]), classes, mean, std)
    fname = "cifar10_jpeg_train10k_test10k.npz" if name == "cifar10" else "cifar10_exact_train4k_test1k.npz"
    p = root / "CIFAR10" / fname
    if not p.is_file():
        raise DataNotFoundError(f"{name} not found: put {fname} in {root / 'CIFAR10'}/")
    z = np.load(p)
    return EdgeData(name, z["x_train"].transpose(0, 3, 1, 2), z["y_train"], z["x_test"].transpose(0, 3, 1, 2),
                    z["y_test"], CIFAR,
                    (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
