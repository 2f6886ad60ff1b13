"""Real image data, read offline, streamed as normalised float batches.

- ``builtin``: 5,000 train / 1,000 test MNIST images shipped inside the package (the default).
- ``mnist``, ``fashion-mnist``: the original IDX ``.gz`` files in torchvision's folder layout
  (``DATA_DIR/MNIST/raw/``, ``DATA_DIR/FashionMNIST/raw/``), read with numpy, so a read-only folder
  works and nothing is unpacked. Uncompressed IDX files are accepted too.
- ``cifar10`` (10k train JPEG-decoded + the full 10k test) and ``cifar10-exact`` (4k/1k lossless):
  the ``.npz`` subsets in ``DATA_DIR/CIFAR10/``.

The arrays stay uint8 in memory; each batch is converted and normalised when it is drawn.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from edgeff.errors import DataNotFoundError

DIGITS = tuple(str(i) for i in range(10))
FASHION = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
CIFAR = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

DATASETS = ("builtin", "mnist", "fashion-mnist", "cifar10", "cifar10-exact")


@dataclass(frozen=True)
class ImageData:
    """A labelled image data set held as uint8 (N, C, H, W) arrays, with its normalisation."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        c, h, w = self.x_train.shape[1:]
        return (int(c), int(h), int(w))

    def normalise(self, x_u8: np.ndarray) -> torch.Tensor:
        """uint8 (B, C, H, W) -> float32 normalised tensor."""
        x = torch.from_numpy(np.ascontiguousarray(x_u8)).float().div_(255.0)
        mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.std).view(1, -1, 1, 1)
        return (x - mean) / std

    def train_batches(
        self, batch_size: int, *, seed: int = 0, epoch: int = 0, limit: int | None = None, skip: int = 0
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Shuffled training batches; the order depends only on (seed, epoch), so a stream can resume."""
        order = np.random.default_rng([seed, epoch]).permutation(len(self.y_train))
        if limit is not None:
            order = order[:limit]
        return self._batches(self.x_train, self.y_train, order, batch_size, skip)

    def test_batches(self, batch_size: int = 1000, *, limit: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = np.arange(len(self.y_test) if limit is None else min(limit, len(self.y_test)))
        return self._batches(self.x_test, self.y_test, order, batch_size, 0)

    def _batches(
        self, x: np.ndarray, y: np.ndarray, order: np.ndarray, batch_size: int, skip: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {batch_size}")
        for start in range(skip * batch_size, len(order), batch_size):
            idx = order[start : start + batch_size]
            yield self.normalise(x[idx]), torch.from_numpy(y[idx].astype(np.int64))


def _read_idx(raw: Path, stem: str) -> np.ndarray:
    for p in (raw / f"{stem}.gz", raw / stem):
        if p.is_file():
            if p.suffix == ".gz":
                with gzip.open(p) as f:
                    data = f.read()
            else:
                data = p.read_bytes()
            ndim = data[3]
            dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
            return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)
    raise DataNotFoundError(str(raw / f"{stem}.gz"))


def _idx_set(name: str, folder: str, data_dir: Path, classes: tuple[str, ...], mean: float, std: float) -> ImageData:
    raw = data_dir / folder / "raw"
    try:
        arrays = [_read_idx(raw, s) for s in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                                              "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")]
    except DataNotFoundError as e:
        raise DataNotFoundError(
            f"{name} not found: missing {e}. Put the four original IDX files (train-images-idx3-ubyte.gz, "
            f"train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) in "
            f"{raw}/ (torchvision's layout) and pass --data-dir {data_dir}"
        ) from None
    xtr, ytr, xte, yte = arrays
    return ImageData(name, xtr[:, None], ytr, xte[:, None], yte, classes, (mean,), (std,))


def load_data(name: str = "builtin", data_dir: str | Path | None = None) -> ImageData:
    """Load a data set by name. ``data_dir`` is needed for everything but ``builtin``."""
    if name == "builtin":
        with resources.files("edgeff").joinpath("data/mnist_small.npz").open("rb") as f:
            z = np.load(f)
            return ImageData("builtin", z["x_train"][:, None], z["y_train"], z["x_test"][:, None], z["y_test"],
                             DIGITS, (0.1307,), (0.3081,))
    if name not in DATASETS:
        raise DataNotFoundError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    if data_dir is None:
        raise DataNotFoundError(f"data set {name!r} needs --data-dir pointing at a folder with its files "
                                "(MNIST/raw/, FashionMNIST/raw/ or CIFAR10/); only 'builtin' ships with edgeff")
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DataNotFoundError(f"data folder {root} does not exist")
    if name == "mnist":
        return _idx_set(name, "MNIST", root, DIGITS, 0.1307, 0.3081)
    if name == "fashion-mnist":
        return _idx_set(name, "FashionMNIST", root, FASHION, 0.2860, 0.3530)
    fname = "cifar10_jpeg_train10k_test10k.npz" if name == "cifar10" else "cifar10_exact_train4k_test1k.npz"
    p = root / "CIFAR10" / fname
    if not p.is_file():
        raise DataNotFoundError(f"{name} not found: put {fname} in {root / 'CIFAR10'}/")
    z = np.load(p)
    tr = z["x_train"].transpose(0, 3, 1, 2)
    te = z["x_test"].transpose(0, 3, 1, 2)
    return ImageData(name, tr, z["y_train"], te, z["y_test"], CIFAR, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
