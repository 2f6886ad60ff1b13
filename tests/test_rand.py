"""The numpy runtime's random numbers (``edgeff.edge.rand``) and its lean process: numpy's permutation value for
value (the data order both runtimes share), a generator whose state saves and resumes, and an edge process that
never loads ``numpy.random`` (6.7 MiB of it, with OpenSSL) or writes a copy of an array to save it."""

from __future__ import annotations

import io
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from edgeff.edge.data import epoch_order
from edgeff.edge.rand import Rng, permutation
from edgeff.edge.store import write_npz


@pytest.mark.parametrize("seed", [0, 1, 7, [0, 0], [3, 5], [123456789012, 2], 2**40, [0, 2**33]])
def test_permutation_is_numpys(seed: int | list[int]) -> None:
    for n in (0, 1, 2, 10, 1000, 70_001):
        ours, numpys = permutation(n, seed), np.random.default_rng(seed).permutation(n)
        assert ours.dtype == numpys.dtype and np.array_equal(ours, numpys), (seed, n)


def test_epoch_order_is_the_order_numpy_gave() -> None:
    for seed, epoch in [(0, 0), (0, 3), (11, 1)]:
        assert np.array_equal(epoch_order(60_000, seed, epoch, limit=500),
                              np.random.default_rng([seed, epoch]).permutation(60_000)[:500])


def test_generator_state_resumes_the_stream() -> None:
    a = Rng(5)
    a.random(1000)
    st = dict(a.state)
    x = (a.random(70_000, dtype=np.float32), a.integers(1, 10, size=33), a.standard_normal((3, 7)))
    b = Rng(0)
    b.state = st
    y = (b.random(70_000, dtype=np.float32), b.integers(1, 10, size=33), b.standard_normal((3, 7)))
    for u, v in zip(x, y, strict=True):
        assert np.array_equal(u, v)
    assert Rng([0, 1]).random() != Rng([1, 0]).random() != Rng(0).random()


def test_an_older_files_numpy_state_gives_a_stream_of_its_own() -> None:
    old = np.random.default_rng(3).bit_generator.state  # what edge files held before this generator
    a, b = Rng(0), Rng(0)
    a.state, b.state = old, dict(old)
    assert np.array_equal(a.random(10), b.random(10)) and not np.array_equal(Rng(0).random(10), Rng(1).random(10))


def test_draws_have_their_distributions() -> None:
    r = Rng(1)
    u = r.random(200_000, dtype=np.float32)
    assert u.dtype == np.float32 and 0 <= u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.005
    n = r.standard_normal(200_000, dtype=np.float32)
    assert n.dtype == np.float32 and abs(n.mean()) < 0.01 and abs(n.std() - 1) < 0.01
    assert abs((np.abs(n) > 2).mean() - 0.0455) < 0.003  # the tails, not only the first two moments
    k = r.integers(1, 10, size=90_000)
    counts = np.bincount(k, minlength=10)
    assert counts[0] == 0 and k.max() == 9 and np.abs(counts[1:] / 10_000 - 1).max() < 0.05
    out = np.empty((300, 500), np.float32)
    assert r.random(out.shape, dtype=np.float32, out=out) is out and 0.45 < out.mean() < 0.55


def test_write_npz_writes_what_savez_writes() -> None:
    arrays = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "scalar": np.asarray(3, np.int64),
              "empty": np.zeros((0, 5), np.float32), "big": np.ones(3 << 18, np.float32),
              "header": np.frombuffer(b'{"a": 1}', np.uint8)}
    ours, theirs = io.BytesIO(), io.BytesIO()
    write_npz(ours, arrays)
    np.savez(theirs, **arrays)
    zo, zt = zipfile.ZipFile(ours), zipfile.ZipFile(theirs)
    assert zo.namelist() == zt.namelist()
    for name in zt.namelist():
        assert zo.read(name) == zt.read(name), name
    back = np.load(io.BytesIO(ours.getvalue()))
    assert back["scalar"].shape == () and np.array_equal(back["big"], arrays["big"])


def test_an_edge_training_process_never_loads_numpy_random(tmp_path: Path) -> None:
    code = ("import sys; from edgeff.cli.edge import main; "
            f"main(['train', '--preset', 'symba-mlp', '--samples', '64', '--batch-size', '32', '--no-progress', "
            f"'--out', {str(tmp_path / 'm.npz')!r}]); "
            f"main(['eval', {str(tmp_path / 'm.npz')!r}]); "
            "loaded = sorted(m for m in sys.modules if m.startswith(('numpy.random', 'secrets', 'hmac', 'torch'))); "
            "assert not loaded, loaded")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
