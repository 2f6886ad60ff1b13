from dataclasses import replace
from pathlib import Path

import pytest
import torch

from edgeff import Learner, ModelConfig, TrainConfig, make_learner
from edgeff.checkpoint import load, save
from edgeff.errors import CheckpointError
from edgeff.layers import LayerSpec
from edgeff.trainer import train_epochs

CNN = ModelConfig(layers=(LayerSpec("conv", 4, norm="batch"), LayerSpec("conv", 4, norm="batch", pool=2),
                          LayerSpec("linear", 16, norm="batch")), label="channel", label_learned=True)


def _state(learner) -> list[torch.Tensor]:  # type: ignore[no-untyped-def]
    return [t.detach().clone() for t in learner.net.state_dict().values()]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize(
    "train",
    [
        TrainConfig(device="cpu", schedule="olu", negatives="hard"),
        TrainConfig(device="cpu", schedule="greedy", greedy_steps=2, predictor="head"),
    ],
    ids=["olu-hard", "greedy-head"],
)
def test_resume_mid_stream_is_exact(train: TrainConfig, real_batch, tmp_path: Path) -> None:
    x, y = real_batch
    batches = [(x[i * 8:(i + 1) * 8], y[i * 8:(i + 1) * 8]) for i in range(6)]
    straight = Learner(CNN, train)
    for bx, by in batches:
        straight.learn_many(bx, by)
    first = Learner(CNN, train)
    for bx, by in batches[:3]:
        first.learn_many(bx, by)
    save(first, tmp_path / "ck.pt")
    resumed, _ = load(tmp_path / "ck.pt")
    for bx, by in batches[3:]:
        resumed.learn_many(bx, by)
    assert _same(_state(straight), _state(resumed))
    assert torch.equal(straight.scores(x), resumed.scores(x))


def test_resume_across_epochs_with_train_epochs(mnist_small, tmp_path: Path) -> None:
    tc = TrainConfig(device="cpu", lr_final=1e-4, epochs=2)
    straight = make_learner("symba-mlp", train=tc)
    train_epochs(straight, mnist_small, epochs=2, batch_size=32, limit=96)
    part = make_learner("symba-mlp", train=tc)
    train_epochs(part, mnist_small, epochs=1, batch_size=32, limit=96)
    save(part, tmp_path / "ck.pt", meta={"dataset": "builtin"})
    resumed, meta = load(tmp_path / "ck.pt")
    assert meta == {"dataset": "builtin"} and resumed.samples_seen == 96
    train_epochs(resumed, mnist_small, epochs=2, batch_size=32, limit=96)
    assert _same(_state(straight), _state(resumed))


def test_backprop_checkpoint_round_trip(real_batch, tmp_path: Path) -> None:
    x, y = real_batch
    bp = make_learner("bp-cnn", train=TrainConfig(device="cpu"))
    bp.learn_many(x, y)
    save(bp, tmp_path / "bp.pt")
    again, _ = load(tmp_path / "bp.pt")
    assert again.kind == "bp" and torch.equal(bp.scores(x), again.scores(x))


def test_save_is_atomic_and_leaves_no_temp_files(real_batch, tmp_path: Path) -> None:
    learner = Learner(CNN, TrainConfig(device="cpu"))
    save(learner, tmp_path / "a.pt")
    save(learner, tmp_path / "a.pt")  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt"]


def test_bad_checkpoints_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="corrupt"):
        load(tmp_path / "junk.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not an edgeff checkpoint"):
        load(tmp_path / "other.pt")
    learner = Learner(CNN, TrainConfig(device="cpu"))
    save(learner, tmp_path / "good.pt")
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        load(tmp_path / "cut.pt")
    state = torch.load(tmp_path / "good.pt", weights_only=True)
    state["model"]["layers"][0]["out"] = 5  # weights no longer fit the architecture
    torch.save(state, tmp_path / "mismatch.pt")
    with pytest.raises(CheckpointError, match="does not match"):
        load(tmp_path / "mismatch.pt")
    state["format_version"] = 99
    torch.save(state, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match="format 99"):
        load(tmp_path / "future.pt")


def test_greedy_checkpoint_holds_one_optimizer_state(real_batch, tmp_path: Path) -> None:
    x, y = real_batch
    learner = Learner(CNN, replace(TrainConfig(device="cpu"), schedule="greedy", greedy_steps=1))
    for _ in range(2):
        learner.learn_many(x[:8], y[:8])
    save(learner, tmp_path / "g.pt")
    state = torch.load(tmp_path / "g.pt", weights_only=True)
    assert [s is not None for s in state["optim"]] == [False, True, False]


@pytest.mark.parametrize("preset", ["cfl-mlp", "cff-mlp", "cfl-conv", "ffcl-mirror"])
def test_contrastive_resume_mid_stream_is_exact(preset: str, real_batch, tmp_path: Path) -> None:
    from edgeff import make_learner
    from edgeff.checkpoint import load, save
    x, y = real_batch
    a = make_learner(preset)
    a.learn_many(x[:32], y[:32])
    path = save(a, tmp_path / "c.pt")
    b, _ = load(path)
    assert b.kind == a.kind and b.samples_seen == 32
    a.learn_many(x[32:], y[32:])  # both continue from the same state: same noise, same optimizer steps
    b.learn_many(x[32:], y[32:])
    assert torch.equal(a.scores(x), b.scores(x))
