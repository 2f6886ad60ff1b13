from pathlib import Path

import numpy as np
import pytest
import torch

from edgeff.data import load_data
from edgeff.errors import DataNotFoundError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def test_builtin_subset_is_real_mnist(mnist_small) -> None:
    assert mnist_small.x_train.shape == (5000, 1, 28, 28) and mnist_small.x_test.shape == (1000, 1, 28, 28)
    assert mnist_small.x_train.dtype == np.uint8
    assert set(np.unique(mnist_small.y_train)) == set(range(10))
    assert 30 < mnist_small.x_train.mean() < 37  # MNIST's mean pixel is 33.3


def test_batches_are_normalised_seeded_and_resumable(mnist_small) -> None:
    a = list(mnist_small.train_batches(300, seed=1, epoch=0, limit=1000))
    b = list(mnist_small.train_batches(300, seed=1, epoch=0, limit=1000))
    c = list(mnist_small.train_batches(300, seed=1, epoch=1, limit=1000))
    assert [x.shape[0] for x, _ in a] == [300, 300, 300, 100]
    assert all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(a, b, strict=True))
    assert not torch.equal(a[0][1], c[0][1])
    skipped = list(mnist_small.train_batches(300, seed=1, epoch=0, limit=1000, skip=2))
    assert torch.equal(skipped[0][0], a[2][0])
    x = torch.cat([x for x, _ in a])
    assert abs(x.mean().item()) < 0.1 and abs(x.std().item() - 1) < 0.1
    with pytest.raises(ValueError, match="batch size"):
        next(mnist_small.train_batches(0))


def test_missing_data_says_where_to_put_it(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError, match="needs --data-dir"):
        load_data("mnist")
    with pytest.raises(DataNotFoundError, match=r"MNIST/raw/ \(torchvision's layout\)"):
        load_data("mnist", tmp_path)
    with pytest.raises(DataNotFoundError, match="unknown data set"):
        load_data("imagenet", tmp_path)


@pytest.mark.skipif(not SHARED.is_dir(), reason="the full data sets are not beside the checkout")
@pytest.mark.parametrize(("name", "n_train", "shape"), [("mnist", 60000, (1, 28, 28)),
                                                       ("fashion-mnist", 60000, (1, 28, 28)),
                                                       ("cifar10-exact", 4000, (3, 32, 32))])
def test_full_data_sets_read_in_place(name: str, n_train: int, shape: tuple[int, ...]) -> None:
    d = load_data(name, SHARED)
    assert len(d.y_train) == n_train and d.input_shape == shape and len(d.classes) == 10


def test_stream_idx_reads_lazily_in_file_order(mnist_small, tmp_path: Path) -> None:
    import gzip

    from edgeff.data import stream_idx

    x, y = mnist_small.x_train[:250, 0], mnist_small.y_train[:250]
    with gzip.open(tmp_path / "img.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 3]) + b"".join(v.to_bytes(4, "big") for v in (250, 28, 28)) + x.tobytes())
    with gzip.open(tmp_path / "lab.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + (250).to_bytes(4, "big") + y.tobytes())
    batches = list(stream_idx(tmp_path / "img.gz", tmp_path / "lab.gz", 100))
    assert [b[0].shape[0] for b in batches] == [100, 100, 50]
    assert torch.equal(torch.cat([b[1] for b in batches]), torch.from_numpy(y.astype(np.int64)))
    assert torch.allclose(torch.cat([b[0] for b in batches]), mnist_small.normalise(mnist_small.x_train[:250]))
    assert len(list(stream_idx(tmp_path / "img.gz", tmp_path / "lab.gz", 64, limit=70))) == 2
    with pytest.raises(DataNotFoundError):
        next(stream_idx(tmp_path / "nope.gz", tmp_path / "lab.gz", 1))


def _idx_folder(root: Path, d) -> Path:  # type: ignore[no-untyped-def]
    """``d``'s images written as an MNIST folder of IDX .gz files (torchvision's layout)."""
    import gzip

    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for stem, arr in (("train-images-idx3-ubyte", d.x_train[:, 0]), ("t10k-images-idx3-ubyte", d.x_test[:, 0]),
                      ("train-labels-idx1-ubyte", d.y_train), ("t10k-labels-idx1-ubyte", d.y_test)):
        with gzip.open(raw / f"{stem}.gz", "wb") as f:
            f.write(bytes([0, 0, 8, arr.ndim]) + b"".join(v.to_bytes(4, "big") for v in arr.shape)
                    + arr.astype(np.uint8).tobytes())
    return root


@pytest.mark.parametrize("preset", ["symba-mlp", "trifecta-cnn"])
def test_a_lazy_run_reads_from_disk_and_trains_exactly_as_one_in_memory(preset, mnist_small, tmp_path, monkeypatch):
    """--lazy runs the same loop (lr plan, window, the readout solved at the end of the plan) over the same shuffled
    batches, reading the images from disk batch by batch: the checkpoints are equal tensor for tensor. Before, it
    went through trainer.fit in file order, with no lr plan and no readout solve, and loaded the whole set."""
    from edgeff.run import Run, RunOptions

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = _idx_folder(tmp_path / "data", mnist_small)
    extra = {"predictor": "lda", "schedule": "all"} if preset == "trifecta-cnn" else {"window": 2}
    states, accs = [], []
    for lazy in (False, True):
        o = RunOptions(preset=preset, data="mnist", data_dir=root, samples=96, epochs=2, batch_size=16, device="cpu",
                       lazy=lazy, out=tmp_path / f"{lazy}.pt", checkpoint_every=0, **extra)
        run = Run(o)
        assert run.data.in_memory is not lazy
        run.train()
        accs.append(run.finish().accuracy)
        states.append(run.learner.state())
    assert list((tmp_path / "cache" / "edgeff").iterdir())  # unpacked once, read with pread
    a, b = states[0]["net"], states[1]["net"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert accs[0] == accs[1]


def test_lazy_is_refused_in_one_line_where_the_set_is_held_in_memory(tmp_path):
    from edgeff.errors import InputError

    with pytest.raises(InputError, match="--lazy reads the IDX sets"):
        load_data("builtin", lazy=True)
