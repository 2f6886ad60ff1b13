"""Build the small real MNIST subset shipped inside the package (edgeff/data/mnist_small.npz).

Run once from the repository root:  python tools/make_builtin_data.py ../shared/data
It takes the first 5,000 images of the MNIST training set and the first 1,000 of the test set
(original order, no selection by content), stored as uint8 in a compressed .npz.
"""

from __future__ import annotations

import gzip
import sys
from pathlib import Path

import numpy as np


def _idx(path: Path, offset: int) -> np.ndarray:
    return np.frombuffer(gzip.open(path).read(), np.uint8, offset=offset)


def main(root: str) -> None:
    raw = Path(root) / "MNIST" / "raw"
    x_tr = _idx(raw / "train-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)[:5000]
    y_tr = _idx(raw / "train-labels-idx1-ubyte.gz", 8)[:5000]
    x_te = _idx(raw / "t10k-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)[:1000]
    y_te = _idx(raw / "t10k-labels-idx1-ubyte.gz", 8)[:1000]
    out = Path("edgeff/data/mnist_small.npz")
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te)
    print(out, out.stat().st_size, "bytes", np.bincount(y_tr), np.bincount(y_te))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "../shared/data")
