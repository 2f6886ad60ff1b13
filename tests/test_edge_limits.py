"""The edge runtime refuses work its memory plan says will not fit in what the process may use, in one line and
before any work (no file written), and reads the process's limits from the kernel."""

from __future__ import annotations

import resource
from pathlib import Path

import pytest

from edgeff.edge import limits
from edgeff.edge.run import train_run
from edgeff.errors import InputError


def test_the_headroom_is_read_from_the_kernel() -> None:
    room, source = limits.headroom()
    assert 0 < room < limits.UNLIMITED and source
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    vsize = limits._status("VmSize")
    try:  # an address-space limit 64 MiB above what the process maps now becomes the limit
        resource.setrlimit(resource.RLIMIT_AS, (vsize + (64 << 20), hard))
        room, source = limits.headroom()
        assert "ulimit -v" in source and room <= 64 << 20
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def test_training_that_will_not_fit_is_refused_before_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(limits, "headroom", lambda: (8 << 20, "the cgroup's memory limit"))
    out = tmp_path / "m.npz"
    with pytest.raises(InputError) as e:  # slda-conv's statistics alone are 42 MB
        train_run(preset="slda-conv", out=out, samples=100, epochs=1)
    assert "needs about" in str(e.value) and "cgroup" in str(e.value) and "\n" not in str(e.value)
    assert not out.exists()
    res = train_run(preset="device-embed", out=out, samples=64, epochs=1)  # ~1 MiB more: it fits in 8 MiB
    assert out.exists() and res.trained == 64
