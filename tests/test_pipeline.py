"""The layer pipeline (edgeff.pipeline) on localhost: 2 gloo ranks under torchrun against the single-process
learner (the same updates, bit for bit), a rank killed mid-run and resumed, the merge, and what it refuses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from edgeff import checkpoint, evaluate
from edgeff.data import load_data
from edgeff.errors import InputError
from edgeff.pipeline import balanced_split, parse_split, run
from edgeff.presets import PRESETS, make_learner
from edgeff.trainer import train_epochs

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available on this platform")
ARGS = ["--preset", "symba-mlp4", "--schedule", "all", "--samples", "400", "--epochs", "2", "--batch-size", "20",
        "--device", "cpu", "--no-progress"]


def _torchrun(out: Path, *extra: str, restarts: int = 0) -> subprocess.Popen[str]:
    tmp = out.parent / "torchrun-tmp"  # torchrun's own torchelastic_* folders, inside the test's directory
    tmp.mkdir(exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--max-restarts", str(restarts), "-m", "edgeff.cli.app", "train", *ARGS, "--out", str(out), "--pipeline",
           *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def _single_process() -> tuple[dict[str, torch.Tensor], float]:
    """The reference, on one thread as each rank runs (OMP_NUM_THREADS=1): BLAS may split a product's sum
    differently on another number of threads, which changes the last bit of some products."""
    p = PRESETS["symba-mlp4"]
    data = load_data("builtin")
    learner = make_learner(p, train=type(p.train)(**{**p.train.to_dict(), "schedule": "all", "batch_size": 20,
                                                     "epochs": 2, "device": "cpu"}))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_epochs(learner, data, epochs=2, batch_size=20, seed=0, limit=400)
        return learner.net.state_dict(), evaluate(learner, data.test_batches(500)).accuracy
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference() -> tuple[dict[str, torch.Tensor], float]:
    return _single_process()


@pytest.mark.parametrize("mode", ["lockstep", "overlap"])
def test_two_ranks_train_exactly_what_one_process_trains(mode: str, tmp_path: Path, reference) -> None:
    out = tmp_path / "m.pt"
    proc = _torchrun(out, "--pipeline-mode", mode)
    stdout, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, stdout
    assert "over 2 ranks" in stdout and "layers 1-" in stdout
    state, acc = reference
    merged, meta = checkpoint.load(out, device="cpu")
    assert all(torch.equal(v, merged.net.state_dict()[k]) for k, v in state.items())  # bit for bit
    # the distributed evaluation, the merged checkpoint's and the single process's agree
    assert f"test accuracy {100 * acc:.2f}%" in stdout
    assert evaluate(merged, load_data("builtin").test_batches(500)).accuracy == acc
    assert "pipeline" not in meta and (tmp_path / "m.rank1.0.pt").is_file()


def test_a_killed_rank_resumes_and_finishes_as_if_uninterrupted(tmp_path: Path, reference) -> None:
    out = tmp_path / "m.pt"
    proc = _torchrun(out, "--checkpoint-every", "5", restarts=1)
    rank1 = tmp_path / "m.rank1.json"  # rank 1 committed a save
    deadline = time.monotonic() + 240
    while not rank1.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert rank1.exists(), "no checkpoint written"
    killed = False
    for pid in os.listdir("/proc"):  # the worker with RANK=1 of this job
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if b"RANK=1" in env and str(out).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
            os.kill(int(pid), signal.SIGKILL)
            killed = True
            break
    stdout, _ = proc.communicate(timeout=300)
    assert killed and proc.returncode == 0, stdout
    merged, _ = checkpoint.load(out, device="cpu")
    state, _ = reference
    assert all(torch.equal(v, merged.net.state_dict()[k]) for k, v in state.items())


def test_a_resumed_run_keeps_its_saved_split(tmp_path: Path, reference) -> None:
    """What a crash leaves behind, made deterministic: a run split 3,1 whose last committed save is rolled back
    one save (step 35 of 40), resumed without a split. Each rank's save holds only its own block's training,
    so the resumed run must keep 3,1 rather than measure a new balance (which split 2,2 or 1,3 under load)."""
    import json

    out = tmp_path / "m.pt"
    proc = _torchrun(out, "--checkpoint-every", "5", "--pipeline-split", "3,1")
    stdout, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "layers 1-3 | 4" in stdout, stdout
    for rank in (0, 1):
        marker = tmp_path / f"m.rank{rank}.json"
        committed = json.loads(marker.read_text())["committed"]
        assert [e[0] for e in committed] == [40, 35]
        marker.write_text(json.dumps({"committed": committed[1:]}))
    proc = _torchrun(out, "--resume", "--pipeline-split", "2,2")
    stdout, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0 and "was split 3,1, not '2,2'" in stdout
    proc = _torchrun(out, "--resume")
    stdout, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "100 samples" in stdout and "layers 1-3 | 4" in stdout, stdout
    merged, _ = checkpoint.load(out, device="cpu")
    state, _ = reference
    assert all(torch.equal(v, merged.net.state_dict()[k]) for k, v in state.items())


def test_what_the_pipeline_refuses(tmp_path: Path) -> None:
    assert balanced_split([3.0, 1.0, 1.0, 1.0], 2) == [(0, 1), (1, 4)]
    assert balanced_split([1.0, 1.0, 1.0, 1.0], 2) == [(0, 2), (2, 4)]
    assert parse_split("1,3", 4, 2) == [(0, 1), (1, 4)]
    with pytest.raises(InputError, match="at least one layer"):
        parse_split("4,0", 4, 2)
    with pytest.raises(InputError, match="at most 4"):
        balanced_split([1.0] * 4, 5)
    from edgeff.cli.app import app
    from typer.testing import CliRunner

    res = CliRunner().invoke(app, ["train", "--pipeline", "--out", str(tmp_path / "m.pt")])
    assert res.exit_code == 2 and "torchrun" in res.output
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29561", RANK="0", WORLD_SIZE="1")
    try:
        for preset, msg in (("cfl-mlp", "contrastive"), ("trifecta-cnn", "--schedule all")):
            with pytest.raises(InputError, match=msg):
                run(preset, out=tmp_path / f"{preset}.pt", samples=20, batch_size=10)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE"):
            os.environ.pop(k, None)
