"""The analytic family (streaming LDA on a frozen random body): the stream's order and batching do not
change the model, a class-incremental stream ends where shuffled data does, replayed samples are not
counted twice, the refused settings, resume across a Gram-matrix update, and class addition on real digits."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from edgeff import checkpoint, make_learner
from edgeff.analytic import PENDING, AnalyticLearner
from edgeff.config import LayerSpec
from edgeff.continual import add_one_class, pretrain_without
from edgeff.data import ImageData
from edgeff.errors import InputError
from edgeff.presets import PRESETS, stream_train

P = PRESETS["slda-conv"]
# the mechanics on a 16-filter body (576 features: a solve 64x cheaper than the preset's 2,304)
SMALL = replace(P, model=replace(P.model, layers=(LayerSpec("conv", 16, kernel=5, padding=0, pool=4),)))


def _learner(k: int = 10, **train: object) -> AnalyticLearner:
    learner = make_learner(SMALL, num_classes=k, train=replace(P.train, device="cpu", **train))  # type: ignore[arg-type]
    assert isinstance(learner, AnalyticLearner)
    return learner


def _sample(data: ImageData, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    return data.normalise(data.x_train[:n]), torch.from_numpy(data.y_train[:n].astype("int64"))


def test_order_and_batch_size_do_not_change_the_model(mnist_small: ImageData) -> None:
    """Classes in order, one sample per step vs shuffled in batches of 50: the same scores (the statistics
    are sums), where a gradient learner would end at two different models."""
    x, y = _sample(mnist_small, 300)
    a, b = _learner(), _learner()
    order = torch.argsort(y, stable=True)  # class-incremental: all 0s, then all 1s, ...
    for i in order.tolist():
        a.learn_one(x[i], int(y[i]))
    perm = torch.randperm(300, generator=torch.Generator().manual_seed(1))
    for j in range(0, 300, 50):
        b.learn_many(x[perm[j : j + 50]], y[perm[j : j + 50]])
    assert a.samples_seen == b.samples_seen == 300 and a.step == 300 and b.step == 6
    xt = mnist_small.normalise(mnist_small.x_test[:200])
    sa, sb = a.scores(xt), b.scores(xt)
    torch.testing.assert_close(sa, sb, rtol=1e-4, atol=1e-3 * float(sa.abs().max()))
    assert torch.equal(sa.argmax(1), sb.argmax(1))
    acc = float((sa.argmax(1) == torch.from_numpy(mnist_small.y_test[:200].astype("int64"))).float().mean())
    assert acc > 0.8  # 300 training digits, no gradient step (chance: 0.1)


def test_replayed_samples_are_not_counted_again(mnist_small: ImageData) -> None:
    x, y = _sample(mnist_small, 40)
    a, b = _learner(), _learner()
    a.learn_many(x, y, fresh=25)  # 25 new samples, 15 replayed
    b.learn_many(x[:25], y[:25])
    assert a.samples_seen == 25
    assert torch.equal(a.net.class_sum, b.net.class_sum) and torch.equal(a.net.count, b.net.count)


@pytest.mark.parametrize("field", [{"lr": 0.01}, {"optimizer": "sgd"}, {"window": 8}, {"lr_final": 1e-4}])
def test_settings_it_has_no_use_for_are_refused(field: dict[str, object]) -> None:
    with pytest.raises(InputError, match=next(iter(field))):
        _learner(**field)


def test_the_edge_runtime_refuses_a_window_too() -> None:
    from edgeff.edge import make_edge_learner

    with pytest.raises(InputError, match="window"):
        make_edge_learner(SMALL, train=replace(P.train, window=8))


def test_the_stream_recipe_gives_it_nothing_and_the_twin_its_share() -> None:
    at_one = replace(P.train, batch_size=1)
    mine = stream_train(P, at_one)
    assert (mine.lr, mine.window) == (P.train.lr, 0)
    _learner(batch_size=1)  # buildable with the recipe applied
    twin = stream_train(P, at_one, backprop=True)
    assert (twin.lr, twin.window) == (1e-4, 8)


def test_a_checkpoint_taken_between_gram_updates_resumes_exactly(mnist_small: ImageData, tmp_path: Path) -> None:
    x, y = _sample(mnist_small, PENDING + 30)
    a = _learner()
    a.learn_many(x[: PENDING + 10], y[: PENDING + 10])  # one block in the Gram matrix, 10 samples pending
    assert int(a.net.n_pending) == 10
    c, _ = checkpoint.load(checkpoint.save(a, tmp_path / "m.pt"), device="cpu")
    for learner in (a, c):
        learner.learn_many(x[PENDING + 10 :], y[PENDING + 10 :])
    assert all(torch.equal(u, v) for u, v in zip(a.net.state_dict().values(), c.net.state_dict().values(), strict=True))
    assert torch.equal(a.scores(x[:20]), c.scores(x[:20]))


def test_adding_a_class_from_50_examples_keeps_the_old_ones(mnist_small: ImageData) -> None:
    """Class addition on the shipped digits (4,500 training images), no replay buffer: the new class from 50
    examples among 500 samples of traffic, the old classes within 2 points. (The issue's bar, recall >= 90%
    after pretraining on full MNIST, is the bench's: bench/continual.py add jobs.)"""
    learner = pretrain_without(mnist_small, 9, preset="slda-conv", epochs=1)
    before = learner.scores(mnist_small.normalise(mnist_small.x_test[:50]))
    res = add_one_class(learner, mnist_small, 9, 50, traffic=500)
    assert res.new_recall >= 0.85, res
    assert res.old_drop <= 2.0, res
    assert res.old_before > 0.9
    assert before.shape == (50, 9) and learner.class_names[-1] == "9"


def test_an_unlearned_class_sits_at_its_examples_mean_and_counts_nothing(mnist_small: ImageData) -> None:
    x, y = _sample(mnist_small, 200)
    keep = y < 9
    learner = _learner(k=9)
    learner.learn_many(x[keep], y[keep])
    nines = mnist_small.normalise(mnist_small.x_test[mnist_small.y_test == 9][:30])
    assert (learner.predict_many(nines) == 9).sum() == 0
    learner.add_class("nine", examples=nines[:10])
    assert learner.samples_seen == int(keep.sum()) and float(learner.net.count[9]) == 0
    assert float((learner.predict_many(nines[10:]) == 9).float().mean()) > 0.5


def test_torch_and_the_numpy_edge_runtime_learn_the_same_readout(mnist_small: ImageData, tmp_path: Path) -> None:
    """The same statistics and readout in both runtimes: a torch learner moved to numpy mid-stream, both fed
    the same batches (across Gram-matrix updates and a class addition), score alike; the edge file and the
    way back to torch keep it."""
    from edgeff.edge import load as load_edge
    from edgeff.edge import save as save_edge
    from edgeff.interchange import from_edge, to_edge

    x, y = _sample(mnist_small, 400)
    t = _learner(k=9)
    keep = y < 9
    t.learn_many(x[:30][keep[:30]], y[:30][keep[:30]])
    e = to_edge(t)
    for s in range(30, 400, 37):
        k = keep[s : s + 37]
        t.learn_many(x[s : s + 37][k], y[s : s + 37][k])
        e.learn_many(x[s : s + 37][k].numpy(), y[s : s + 37][k].numpy())
    nines = x[y == 9][:5]
    assert t.add_class("nine", nines) == e.add_class("nine", nines.numpy()) == 9
    xt = mnist_small.normalise(mnist_small.x_test[:300])
    st, se = t.scores(xt).numpy(), e.scores(xt.numpy())
    scale = float(abs(st).max())
    assert abs(st - se).max() < 1e-5 * scale
    assert (st.argmax(1) == se.argmax(1)).all() and e.samples_seen == t.samples_seen
    e2, _ = load_edge(save_edge(e, tmp_path / "m.npz"))
    assert (e2.scores(xt.numpy()) == se).all()
    back = from_edge(e2)
    assert abs(back.scores(xt).numpy() - st).max() < 1e-5 * scale


def test_the_edge_runtime_trains_it_from_scratch(tmp_path: Path) -> None:
    from edgeff.edge.run import train_run

    res = train_run(preset="slda-conv", data="builtin", out=tmp_path / "m.npz", batch_size=1, samples=1000)
    assert res.learner.samples_seen == 1000 and res.learner.train_cfg.window == 0
    assert res.test["accuracy"] > 0.85  # 1,000 digits, one pass at batch 1 (chance 0.1)


def test_cli_add_class_counts_each_example_once_and_leaves_the_old_classes(mnist_small: ImageData,
                                                                          tmp_path: Path) -> None:
    import numpy as np
    from edgeff.cli.app import app
    from typer.testing import CliRunner

    x, y = _sample(mnist_small, 1000)
    keep = y < 9
    learner = _learner(k=9)
    learner.learn_many(x[keep], y[keep])
    ck = checkpoint.save(learner, tmp_path / "m.pt", meta={"dataset": "builtin", "classes": list(learner.class_names)})
    np.save(tmp_path / "nines.npy", mnist_small.x_train[mnist_small.y_train == 9][:20, 0])
    res = CliRunner().invoke(app, ["add-class", str(ck), "--name", "nine", "--data", str(tmp_path / "nines.npy"),
                                   "--out", str(tmp_path / "g.pt")])
    assert res.exit_code == 0, res.output
    assert "in closed form" in res.output
    grown, _ = checkpoint.load(tmp_path / "g.pt", device="cpu")
    assert isinstance(grown, AnalyticLearner)
    assert float(grown.net.count[9]) == 20  # one pass, not --passes 10 (the examples would count 10 times)
    assert torch.equal(grown.net.class_sum[:9], learner.net.class_sum) and torch.equal(grown.net.count[:9], learner.net.count)
