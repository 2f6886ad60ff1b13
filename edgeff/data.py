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
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgeff.edge.data import (  # noqa: F401 - the class names and set names are re-exported
    CIFAR,
    DATASETS,
    DIGITS,
    FASHION,
    IDX_SETS,
    MNIST_MEAN,
    MNIST_STD,
    data_root,
    epoch_order,
    load_edge_data,
)
from edgeff.errors import DataNotFoundError, InputError
from edgeff.images import IMAGE_SUFFIXES, image_files, read_image
from edgeff.names import names_problem


@dataclass(frozen=True)
class ImageData:
    """A labelled image data set held as uint8 (N, C, H, W) arrays, with its normalisation."""

    name: str
    x_train: Any  # (N, C, H, W) uint8 array, or edgeff.edge.data.IdxImages read from disk (lazy)
    y_train: np.ndarray
    x_test: Any
    y_test: np.ndarray
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        c, h, w = self.x_train.shape[1:] if isinstance(self.x_train, np.ndarray) else self.x_train.shape
        return (int(c), int(h), int(w))

    @property
    def in_memory(self) -> bool:
        """False when the images are read from disk batch by batch (``load_data(..., lazy=True)``)."""
        return isinstance(self.x_train, np.ndarray)

    def normalise(self, x_u8: np.ndarray) -> torch.Tensor:
        """uint8 (B, C, H, W) -> float32 normalised tensor."""
        # a read-only array (the IDX readers use np.frombuffer) is copied first: torch warns on those
        x = torch.from_numpy(np.require(x_u8, requirements=["C_CONTIGUOUS", "WRITEABLE"])).float().div_(255.0)
        mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.std).view(1, -1, 1, 1)
        return (x - mean) / std

    def train_batches(
        self, batch_size: int, *, seed: int = 0, epoch: int = 0, limit: int | None = None, skip: int = 0
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Shuffled training batches; the order depends only on (seed, epoch), so a stream can resume."""
        return self._batches(self.x_train, self.y_train, epoch_order(len(self.y_train), seed, epoch, limit),
                             batch_size, skip)

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


def load_folder(path: str | Path, input_shape: tuple[int, int, int], *, test_every: int = 5) -> ImageData:
    """A user's own images: ``path`` holds one sub-folder per class (the class names are the folder names,
    sorted); every image is converted to the model's channels and resized to its H×W. With ``train/`` and
    ``test/`` sub-folders (each laid out so) those are the split; otherwise every ``test_every``-th image of
    each class (by file name) is held out for testing. The normalisation is the training pixels' own
    mean and std per channel.

    Raises:
        DataNotFoundError: no class folders or no images in one; InputError: fewer than 2 classes, a folder name
        that is not a class name (``edgeff.names``), or an image ``edgeff.images.read_image`` refuses.
    """
    root = Path(path).expanduser()

    def classes_in(folder: Path) -> list[Path]:
        subs = sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not subs:
            raise DataNotFoundError(f"{folder} has no class folders; put each class's images in a sub-folder "
                                    f"named after it ({folder}/cat/*.png, {folder}/dog/*.png, ...)")
        if len(subs) < 2:
            raise InputError(f"{folder} has one class folder ({subs[0].name}); a classifier needs at least 2 classes, "
                             f"each in its own sub-folder")
        if (why := names_problem([d.name for d in subs])) is not None:
            raise InputError(f"{folder}: the class folders name the classes, and {why}")
        return subs

    def read(folders: list[Path]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        xs, ys = [], []
        for k, d in enumerate(folders):
            xs.append(load_pixels(d, input_shape))
            if xs[-1].dtype != np.uint8:
                raise InputError(f"{d} holds an array of floats; a class folder holds image files")
            ys.append(np.full(len(xs[-1]), k, np.int64))
        return xs, ys

    if (root / "train").is_dir() and (root / "test").is_dir():
        train_dirs, test_dirs = classes_in(root / "train"), classes_in(root / "test")
        names = [d.name for d in train_dirs]
        if [d.name for d in test_dirs] != names:
            raise InputError(f"{root}/train and {root}/test must hold the same class folders")
        (xtr, ytr), (xte, yte) = read(train_dirs), read(test_dirs)
        x_train, y_train, x_test, y_test = np.concatenate(xtr), np.concatenate(ytr), np.concatenate(xte), np.concatenate(yte)
    else:
        dirs = classes_in(root)
        names = [d.name for d in dirs]
        xs, ys = read(dirs)
        held = [np.arange(len(x)) % test_every == test_every - 1 for x in xs]
        if any(len(x) < 2 for x in xs):
            raise InputError(f"every class folder in {root} needs at least 2 images (one is held out for testing)")
        held = [h if h.any() else np.arange(len(h)) == len(h) - 1 for h in held]
        x_train = np.concatenate([x[~h] for x, h in zip(xs, held, strict=True)])
        y_train = np.concatenate([y[~h] for y, h in zip(ys, held, strict=True)])
        x_test = np.concatenate([x[h] for x, h in zip(xs, held, strict=True)])
        y_test = np.concatenate([y[h] for y, h in zip(ys, held, strict=True)])
    pixels = x_train.astype(np.float64) / 255.0
    mean = tuple(float(v) for v in pixels.mean((0, 2, 3)))
    std = tuple(max(float(v), 1e-3) for v in pixels.std((0, 2, 3)))
    return ImageData(str(root), x_train, y_train, x_test, y_test, tuple(names), mean, std)


def load_data(name: str = "builtin", data_dir: str | Path | None = None, *,
              input_shape: tuple[int, int, int] | None = None, lazy: bool = False,
              cache_dir: str | Path | None = None) -> ImageData:
    """Load a data set by name, or a folder of one sub-folder of images per class (``load_folder``,
    converted to ``input_shape``). ``data_dir`` is needed for everything but ``builtin`` and folders. The
    IDX sets are read into memory here, or with ``lazy`` read from disk a batch at a time (``.gz`` files
    unpacked once into ``cache_dir``, as the edge runtime reads them: the same batches in the same order); the
    others come from ``edgeff.edge.data`` (the same arrays)."""
    if name not in DATASETS and Path(name).expanduser().is_dir():
        if lazy:
            raise InputError("--lazy reads the IDX sets (mnist, fashion-mnist) from disk; an image folder is decoded "
                             "into memory (leave --lazy out)")
        return load_folder(name, input_shape or (1, 28, 28))
    if lazy and name not in IDX_SETS:
        raise InputError(f"--lazy reads the IDX sets (mnist, fashion-mnist) from disk; {name} is held in memory "
                         "(leave --lazy out)")
    if name in IDX_SETS and not lazy:
        folder, classes, mean, std = IDX_SETS[name]
        return _idx_set(name, folder, data_root(name, data_dir), classes, mean[0], std[0])
    e = load_edge_data(name, data_dir, cache_dir=cache_dir)
    return ImageData(e.name, e.x_train, e.y_train, e.x_test, e.y_test, e.classes, e.mean, e.std)


def stream_idx(
    images: str | Path,
    labels: str | Path,
    batch_size: int,
    *,
    mean: tuple[float, ...] = MNIST_MEAN,
    std: tuple[float, ...] = MNIST_STD,
    limit: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Read an IDX image/label pair (``.gz`` or raw) lazily, in file order, one batch at a time.

    Only one batch of pixels is ever in memory (frugal mode: no data set in RAM), at the price of no
    shuffling. Batches are normalised like ``ImageData.normalise``.
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    images, labels = Path(images), Path(labels)
    for p in (images, labels):
        if not p.is_file():
            raise DataNotFoundError(f"{p} does not exist")

    def _open(p: Path) -> Any:
        return gzip.open(p, "rb") if p.suffix == ".gz" else open(p, "rb")

    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    with _open(images) as fi, _open(labels) as fl:
        hi = fi.read(4)
        dims = [int.from_bytes(fi.read(4), "big") for _ in range(hi[3])]
        hl = fl.read(4)
        n_labels = int.from_bytes(fl.read(4), "big")
        if hi[2] != 8 or hl[2] != 8 or dims[0] != n_labels:
            raise DataNotFoundError(f"{images} and {labels} are not a matching uint8 IDX image/label pair")
        shape = (1, *dims[1:]) if len(dims) == 3 else tuple(dims[1:])
        per = int(np.prod(shape))
        total = n_labels if limit is None else min(limit, n_labels)
        done = 0
        while done < total:
            n = min(batch_size, total - done)
            x = np.frombuffer(fi.read(n * per), np.uint8).reshape(n, *shape)
            y = np.frombuffer(fl.read(n), np.uint8).astype(np.int64)
            xt = torch.from_numpy(x.copy()).float().div_(255.0)
            yield (xt - m) / s, torch.from_numpy(y)
            done += n


def load_pixels(path: str | Path, input_shape: tuple[int, int, int]) -> np.ndarray:
    """Examples of one class as an array (N, C, H, W): uint8 pixels, or floats taken as already normalised.

    ``path`` is an image file or a folder of them (converted to the model's channels and resized to H×W), or a
    ``.npy``/``.npz`` array (the ``x`` key, else the first array) of shape (N, H, W) or (N, C, H, W).

    Raises:
        DataNotFoundError: nothing readable at ``path``.
        InputError: images or arrays that do not fit ``input_shape``.
    """

    p = Path(path).expanduser()
    c, h, w = input_shape
    if p.is_dir() or p.suffix.lower() in IMAGE_SUFFIXES:
        files = image_files(p)
        if not files:
            raise DataNotFoundError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {p}")
        arr: np.ndarray = np.stack([read_image(f, input_shape) for f in files])  # regular files, bounded pixels
    elif p.is_file() and p.suffix in (".npy", ".npz"):
        try:
            z = np.load(p, allow_pickle=False)
            if isinstance(z, np.lib.npyio.NpzFile):
                arr = z["x"] if "x" in z.files else z[z.files[0]]
            else:
                arr = z
        except (OSError, ValueError, EOFError, KeyError, IndexError) as e:
            raise InputError(f"cannot read pixels from {p} ({str(e)[:100]}); save a numeric array "
                             "(uint8 pixels or floats) with numpy.save") from None
        if arr.dtype.kind not in "uif":
            raise InputError(f"{p} holds a {arr.dtype} array; save uint8 pixels or floats")
    else:
        raise DataNotFoundError(f"{p} is neither a folder of images nor a .npy/.npz file")
    if arr.ndim == 3 and c == 1:
        arr = arr[:, None]
    if arr.ndim != 4 or tuple(arr.shape[1:]) != (c, h, w) or arr.shape[0] < 1:
        raise InputError(f"examples in {p} have shape {tuple(arr.shape)}; the model needs (N, {c}, {h}, {w})")
    return arr if arr.dtype == np.uint8 else arr.astype(np.float32)


def load_examples(path: str | Path, input_shape: tuple[int, int, int], mean: tuple[float, ...],
                  std: tuple[float, ...]) -> torch.Tensor:
    """``load_pixels`` as a normalised float batch (N, C, H, W) for ``add_class``: uint8 pixels get the
    model's normalisation (``mean``, ``std`` per channel), float arrays are taken as already normalised."""
    arr = load_pixels(path, input_shape)
    if arr.dtype == np.uint8:
        x = torch.from_numpy(np.ascontiguousarray(arr)).float().div_(255.0)
        return (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    return torch.from_numpy(np.ascontiguousarray(arr))
