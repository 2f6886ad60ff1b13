"""Online class addition, the replay buffer, class-incremental streams and their metrics."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from edgeff.cli.app import app
from typer.testing import CliRunner

from edgeff import checkpoint, make_learner
from edgeff.continual import (
    ReplayBuffer,
    add_one_class,
    average_accuracy,
    backward_transfer,
    forgetting,
    pretrain_without,
    run_stream,
    split_experiences,
    split_scenario,
)
from edgeff.data import ImageData
from edgeff.errors import InputError
from edgeff.layers import grow_rows
from edgeff.loop import fit, train_epochs
from edgeff.losses import cfl_dict_loss
from edgeff.presets import PRESETS

runner = CliRunner()
GROWABLE = [n for n in PRESETS if not n.endswith("-paper") and n not in ("cff-vit", "cfl-conv512")]


def _trained(name: str, data: ImageData, k: int = 9, steps: int = 6):
    learner = make_learner(name, input_shape=data.input_shape, num_classes=k,
                           train=replace(PRESETS[name].train, device="cpu"))
    for i, (x, y) in enumerate(data.train_batches(32, seed=0)):
        keep = y < k
        learner.learn_many(x[keep], y[keep])
        if i + 1 >= steps:
            break
    # mid-plan: a readout solved at the end of the plan (trifecta-cnn's lda) is solved from a pass now
    learner.ready_to_predict(lambda: ((x[y < k], y[y < k]) for x, y in data.train_batches(200, seed=0, limit=600)))
    return learner


# --------------------------------------------------------------------------- add_class
@pytest.mark.parametrize("name", GROWABLE)
def test_add_class_keeps_existing_predictions_until_training_resumes(name: str, mnist_small: ImageData) -> None:
    learner = _trained(name, mnist_small)
    x, y = next(mnist_small.test_batches(200))
    before = learner.scores(x)
    examples = mnist_small.normalise(mnist_small.x_train[mnist_small.y_train == 9][:20])
    idx = learner.add_class("nine", examples=examples)
    after = learner.scores(x)
    assert idx == 9 and after.shape == (200, 10) and learner.class_names[-1] == "nine"
    pred = after.argmax(1)
    kept = pred != 9
    neutral = getattr(getattr(learner, "predictor", None), "kind", "") in ("head", "lda")
    if learner.model_cfg.label == "overlay" or (neutral and learner.model_cfg.label == "channel"):
        # the new one-hot slot zeroes one more (border) pixel; a neutral label channel averages over the classes
        assert (pred[kept] == before.argmax(1)[kept]).float().mean() > 0.95
    elif getattr(getattr(learner, "predictor", None), "kind", "") != "head":  # (a neutral-label head's input moves)
        assert torch.allclose(after[:, :9], before, rtol=1e-5, atol=1e-6)  # the old classes' scores did not move (but for float rounding)
        assert torch.equal(pred[kept], before.argmax(1)[kept])  # only a switch to the new class
    learner.learn_many(x[:16], torch.where(y[:16] == 9, 9, y[:16]))  # learning resumes with the new label
    assert torch.isfinite(learner.scores(x)).all()


def test_add_class_from_examples_is_usable_at_every_layer_at_once(mnist_small: ImageData) -> None:
    data = mnist_small
    learner = make_learner("cfl-mlp", num_classes=9, train=replace(PRESETS["cfl-mlp"].train, device="cpu"))
    keep = data.y_train != 9
    for _ in range(2):
        for i in range(0, 4000, 64):
            xb, yb = data.normalise(data.x_train[keep][i : i + 64]), torch.from_numpy(data.y_train[keep][i : i + 64])
            learner.learn_many(xb, yb)
    learner.add_class("nine", examples=data.normalise(data.x_train[data.y_train == 9][:50]))
    x9 = data.normalise(data.x_test[data.y_test == 9])
    per_layer = learner.layer_predictions(x9)  # (N, L)
    for layer in range(per_layer.shape[1]):
        assert (per_layer[:, layer] == 9).float().mean() > 0.3  # chance is 0.1; no training step taken yet


def test_add_class_rejects_a_taken_name_and_leaves_the_model_alone(mnist_small: ImageData) -> None:
    learner = _trained("cfl-mlp", mnist_small, k=3, steps=1)
    with pytest.raises(InputError, match="already exists"):
        learner.add_class("2")
    with pytest.raises(InputError, match="shape"):
        learner.add_class("new", examples=torch.zeros(3, 1, 5, 5))
    assert learner.model_cfg.num_classes == 3 and learner.net.embed is not None and learner.net.embed.shape[0] == 3


def test_grown_model_saved_and_reloaded_predicts_the_same(mnist_small: ImageData, tmp_path) -> None:
    from edgeff.exporters.onnx import OnnxPredictor, export_onnx

    for name in ("cfl-mlp", "symba-mlp"):
        learner = _trained(name, mnist_small)
        learner.add_class("nine", examples=mnist_small.normalise(mnist_small.x_train[mnist_small.y_train == 9][:10]))
        x, y = next(mnist_small.train_batches(32, seed=3))
        learner.learn_many(x, y)  # optimizer state now includes the grown rows
        path = checkpoint.save(learner, tmp_path / f"{name}.pt")
        again, _ = checkpoint.load(path)
        xt, _ = next(mnist_small.test_batches(300))
        assert torch.equal(again.predict_many(xt), learner.predict_many(xt))
        assert again.class_names == learner.class_names and again.class_names[-1] == "nine"
        learner.learn_many(x, y)
        again.learn_many(x, y)  # resumes exactly: same optimizer state, same generator
        assert torch.allclose(again.scores(xt), learner.scores(xt), atol=1e-5)
        onnx_path = export_onnx(again, tmp_path / f"{name}.onnx")
        pred = OnnxPredictor(onnx_path)
        assert pred.classes[-1] == "nine" and len(pred.classes) == 10


def test_grow_rows_keeps_old_state_and_warms_the_new_row() -> None:
    lin = torch.nn.Linear(4, 3)
    opt = torch.optim.Adam(lin.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        lin(torch.randn(5, 4)).pow(2).sum().backward()
        opt.step()
    old_sq = opt.state[lin.weight]["exp_avg_sq"].clone()
    grow_rows(lin, "weight", torch.ones(1, 4), [opt])
    st = opt.state[lin.weight]
    assert lin.weight.shape == (4, 4) and opt.param_groups[0]["params"][0] is lin.weight
    assert torch.equal(st["exp_avg_sq"][:3], old_sq) and torch.allclose(st["exp_avg_sq"][3], old_sq.mean(0))
    assert torch.equal(st["exp_avg"][3], torch.zeros(4))


# --------------------------------------------------------------------------- replay buffer
def test_buffer_never_exceeds_capacity_and_is_seeded() -> None:
    buf = ReplayBuffer(50, seed=3)
    for i in range(0, 1000, 7):
        n = min(7, 1000 - i)
        buf.add(torch.arange(i, i + n).float().view(n, 1, 1, 1), torch.arange(i, i + n))
        assert len(buf) <= 50
    assert len(buf) == 50 and buf.seen == 1000
    same = ReplayBuffer(50, seed=3)
    for i in range(0, 1000, 7):
        n = min(7, 1000 - i)
        same.add(torch.arange(i, i + n).float().view(n, 1, 1, 1), torch.arange(i, i + n))
    assert torch.equal(same.y, buf.y)
    x, y = buf.sample(20)
    assert x.shape == (20, 1, 1, 1) and len(set(y.tolist())) == 20 and torch.equal(x.view(-1).long(), y)


def test_buffer_samples_the_stream_uniformly() -> None:
    n, cap, trials = 600, 60, 300
    counts = np.zeros(n)
    for seed in range(trials):
        buf = ReplayBuffer(cap, seed=seed)
        for i in range(0, n, 10):
            buf.add(torch.zeros(10, 1, 1, 1), torch.arange(i, i + 10))
        counts[buf.y.numpy()] += 1
    expected = trials * cap / n  # 30 per item
    thirds = counts.reshape(3, -1).mean(1)
    assert np.all(np.abs(thirds - expected) < 0.08 * expected), thirds  # early, middle and late items alike
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < n * 1.3  # ~ n degrees of freedom (slightly less spread than binomial)


def test_balanced_buffer_holds_every_class_equally_in_a_skewed_ordered_stream() -> None:
    # 900 samples of class 0, then 100 of class 1, then 50 of class 2: a reservoir keeps them in proportion,
    # the class-balanced policy about a third each; both keep only samples of their own class
    def fill(policy: str) -> ReplayBuffer:
        buf = ReplayBuffer(90, seed=1, policy=policy)
        for label, n in ((0, 900), (1, 100), (2, 50)):
            for i in range(0, n, 10):
                buf.add(torch.full((10, 1, 1, 1), float(label)), torch.full((10,), label))
        assert torch.equal(buf.x[: len(buf)].view(-1).long(), buf.y[: len(buf)])  # type: ignore[index]
        return buf

    reservoir, balanced = fill("reservoir").class_counts(), fill("balanced").class_counts()
    assert reservoir[0] > 60 and reservoir.get(2, 0) < 12
    assert balanced == {0: 30, 1: 30, 2: 30}
    state = fill("balanced").state()
    again = ReplayBuffer.from_state(state)
    assert again.policy == "balanced" and again.seen_per_class == {0: 900, 1: 100, 2: 50}
    with pytest.raises(InputError, match="policy"):
        ReplayBuffer(10, policy="fifo")


def test_fit_mixes_replay_and_offers_only_the_stream(mnist_small: ImageData) -> None:
    seen: list[tuple[int, int | None]] = []

    class Spy:
        samples_seen = 0

        def learn_many(self, x: torch.Tensor, y: torch.Tensor, fresh: int | None = None) -> float:
            seen.append((int(x.shape[0]), fresh))
            self.samples_seen += int(x.shape[0])  # as a learner counts the rows it learns
            return 0.0

    buf = ReplayBuffer(30, seed=0, batch=6, asymmetric=True)
    spy = Spy()
    fit(spy, mnist_small.train_batches(10, seed=0, limit=40), replay=buf)  # type: ignore[arg-type]
    assert seen == [(10, None), (16, 10), (16, 10), (16, 10)]
    assert len(buf) == 30 and buf.seen == 40
    assert spy.samples_seen == 40  # the stream's samples, each once: replayed rows were counted when they were new


def test_replay_runs_through_the_one_loop_with_the_lr_plan_and_window(mnist_small: ImageData) -> None:
    """train_epochs takes the replay hook: the planned batches (window rows included) are mixed with the
    buffer's samples, the lr plan still applies, only the new rows are offered to the buffer, and a resumed run
    (the buffer restored from its state) continues with exactly the uninterrupted run's weights."""
    p = PRESETS["symba-mlp"]
    tc = replace(p.train, batch_size=8, epochs=2, lr_final=1e-5, window=4, seed=0)

    def build():  # type: ignore[no-untyped-def]
        return make_learner(p, input_shape=mnist_small.input_shape, num_classes=10, train=tc)

    whole, buf = build(), ReplayBuffer(20, seed=1, batch=5)
    train_epochs(whole, mnist_small, epochs=2, batch_size=8, limit=48, replay=buf)
    assert whole.samples_seen == 96 and buf.seen == 96  # each stream sample once, window and replay rows not again
    plain = build()
    train_epochs(plain, mnist_small, epochs=2, batch_size=8, limit=48)
    assert not all(torch.equal(a, b) for a, b in zip(whole.net.state_dict().values(), plain.net.state_dict().values(),
                                                     strict=True))  # the replayed rows were learned
    half, buf2 = build(), ReplayBuffer(20, seed=1, batch=5)
    train_epochs(half, mnist_small, epochs=1, batch_size=8, limit=48, replay=buf2)
    buf2 = ReplayBuffer.from_state(buf2.state())
    train_epochs(half, mnist_small, epochs=2, batch_size=8, limit=48, replay=buf2)
    for a, b in zip(whole.net.state_dict().values(), half.net.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_asymmetric_dict_loss_limits_fresh_samples_to_fresh_classes() -> None:
    h = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    d = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])
    y = torch.tensor([0, 1, 2])
    allowed = torch.tensor([[True, True, False], [True, True, False], [True, True, True]])
    logits = h @ d.T
    by_hand = (-(logits[0, 0] - torch.logsumexp(logits[0, :2], 0)) - (logits[1, 1] - torch.logsumexp(logits[1, :2], 0))
               + F.cross_entropy(logits[2:], y[2:]) ) / 3
    assert float(cfl_dict_loss(h, y, d, allowed=allowed)) == pytest.approx(float(by_hand), rel=1e-6)


# --------------------------------------------------------------------------- metrics
def test_metrics_against_a_hand_made_matrix() -> None:
    r = np.array([[0.9, 0.0, 0.0],
                  [0.6, 0.8, 0.0],
                  [0.5, 0.7, 0.95]])
    assert average_accuracy(r) == pytest.approx((0.5 + 0.7 + 0.95) / 3)
    assert forgetting(r) == pytest.approx(((0.9 - 0.5) + (0.8 - 0.7)) / 2)
    assert backward_transfer(r) == pytest.approx(-0.25)
    assert forgetting(r[:1, :1]) == 0.0 and backward_transfer(r[:1, :1]) == 0.0


# --------------------------------------------------------------------------- streams on real data
def test_split_experiences_are_class_disjoint(mnist_small: ImageData) -> None:
    exps = split_experiences(mnist_small, 5, seed=0)
    assert [e.classes for e in exps] == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
    assert sum(e.y.shape[0] for e in exps) == len(mnist_small.y_train)
    for e in exps:
        assert set(e.y.tolist()) == set(e.classes) and set(e.y_test.tolist()) == set(e.classes)
    with pytest.raises(InputError):
        split_experiences(mnist_small, 3)


@pytest.mark.slow  # two full split streams: `pytest -m slow`
def test_replay_beats_naive_fine_tuning_on_a_real_split_stream(mnist_small: ImageData) -> None:
    naive = split_scenario(mnist_small, preset="cfl-mlp", buffer=0, batch_size=10)
    replay = split_scenario(mnist_small, preset="cfl-mlp", buffer=200, batch_size=10)
    assert naive.matrix.shape == (5, 5) and naive.average_accuracy < 0.35  # catastrophic forgetting
    assert replay.average_accuracy > 0.6 and replay.forgetting < naive.forgetting
    assert all(replay.matrix[i, i] > 0.8 for i in range(5))  # each experience learned when it is current


@pytest.mark.filterwarnings("ignore:Initializing zero-element")
def test_stream_grows_a_learner_from_no_class(mnist_small: ImageData) -> None:
    learner = make_learner("bp-mlp", num_classes=0, train=replace(PRESETS["bp-mlp"].train, device="cpu"))
    exps = split_experiences(mnist_small, 5, limit=100)
    res = run_stream(learner, exps, mnist_small.classes, batch_size=20, eval_every=100, eval_limit=50)
    assert learner.model_cfg.num_classes == 10 and learner.class_names == mnist_small.classes
    assert len(res.curve) == 6 and set(res.curve[0]) == {"samples", *(f"exp{j}" for j in range(5))}


@pytest.mark.slow  # pretraining on 4,500 images: `pytest -m slow`
def test_add_one_class_reports_recall_and_drop(mnist_small: ImageData) -> None:
    learner = pretrain_without(mnist_small, 9, preset="cfl-mlp-stream", epochs=1)
    assert learner.class_names == mnist_small.classes[:9]
    res = add_one_class(learner, mnist_small, 9, 50, traffic=500, replay=ReplayBuffer(100, seed=0))
    assert res.k == 50 and res.samples == 550 and learner.class_names[-1] == "9"
    assert res.old_before > 0.85 and res.new_recall > 0.3  # chance 0.1
    assert res.old_drop == pytest.approx(100 * (res.old_before - res.old_after))


# --------------------------------------------------------------------------- CLI
def test_cli_add_class_from_an_array_and_a_folder(mnist_small: ImageData, tmp_path) -> None:
    from PIL import Image

    ck = tmp_path / "m.pt"
    learner = _trained("cfl-mlp", mnist_small, k=10, steps=20)
    checkpoint.save(learner, ck, meta={"dataset": "builtin", "classes": list(mnist_small.classes),
                                       "mean": [0.1307], "std": [0.3081]})
    sevens = mnist_small.x_test[mnist_small.y_test == 7][:12, 0]  # uint8 (12, 28, 28): stand-in examples
    np.save(tmp_path / "sevens.npy", sevens)
    res = runner.invoke(app, ["add-class", str(ck), "--name", "seven-again", "--data", str(tmp_path / "sevens.npy"),
                              "--out", str(tmp_path / "grown.pt")])
    assert res.exit_code == 0, res.output
    assert "index 10" in res.output and "/12 of its examples" in res.output
    grown, meta = checkpoint.load(tmp_path / "grown.pt")
    assert grown.class_names[-1] == "seven-again" and meta["classes"][-1] == "seven-again"
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, img in enumerate(sevens[:3]):
        Image.fromarray(img).save(folder / f"{i}.png")
    res = runner.invoke(app, ["add-class", str(tmp_path / "grown.pt"), "--name", "png", "--data", str(folder),
                              "--in-place"])
    assert res.exit_code == 0 and "index 11" in res.output, res.output
    res = runner.invoke(app, ["add-class", str(tmp_path / "grown.pt"), "--name", "png"])
    assert res.exit_code == 2 and "already exists" in res.output


def test_cli_add_class_learns_with_replay_and_reports_old_and_held_out(mnist_small: ImageData, tmp_path) -> None:
    ck = tmp_path / "m.pt"
    learner = _trained("bp-mlp", mnist_small, k=9, steps=60)  # classes 0-8
    checkpoint.save(learner, ck, meta={"dataset": "builtin", "classes": list(mnist_small.classes[:9]),
                                       "mean": [0.1307], "std": [0.3081]})
    nines = mnist_small.x_train[mnist_small.y_train == 9][:50, 0]  # uint8 (50, 28, 28)
    held = mnist_small.x_test[mnist_small.y_test == 9][:, 0]
    np.save(tmp_path / "nines.npy", nines)
    np.save(tmp_path / "held.npy", held)
    before = ck.read_bytes()
    common = ["add-class", str(ck), "--name", "9", "--data", str(tmp_path / "nines.npy"), "--held-out",
              str(tmp_path / "held.npy")]
    res = runner.invoke(app, [*common, "--passes", "0", "--out", str(tmp_path / "imprinted.pt")])
    assert res.exit_code == 0, res.output
    imprint_old = float(res.output.split("-> ")[1].split("%")[0])
    res = runner.invoke(app, [*common, "--out", str(tmp_path / "learned.pt")])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "steps with replay from builtin" in text and "held-out recall" in text, text
    old_before, old_after = (float(v) for v in text.split("old classes ")[1].split(";")[0].replace("%", "").split(" -> "))
    recall = float(text.split("held-out recall ")[1].split("%")[0])
    assert ck.read_bytes() == before  # the input is never written
    assert recall > 50 and old_after >= old_before - 5  # chance 10%; this small model barely forgets
    assert old_after > imprint_old or old_after >= old_before - 1  # replay keeps (or restores) the old classes
    grown, meta = checkpoint.load(tmp_path / "learned.pt")
    assert grown.class_names[-1] == "9" and meta["replay"] is not None
    saved = ReplayBuffer.from_state(meta["replay"])
    assert 9 in saved.class_counts()  # its examples joined the buffer
    assert saved.asymmetric and saved.batch is None  # with the settings `edgeff learn` gave it (ER-ACE)


def test_cli_continual_split_prints_the_matrix(tmp_path) -> None:
    res = runner.invoke(app, ["continual", "split", "--buffer", "100", "--json", "--no-progress"])
    assert res.exit_code == 0, res.output
    rec = json.loads(res.output)
    assert np.array(rec["matrix"]).shape == (5, 5) and 0.0 <= rec["average_accuracy"] <= 1.0
    res = runner.invoke(app, ["continual", "split", "--preset", "bp-mlp", "--no-progress"])
    assert res.exit_code == 0 and "average accuracy" in res.output and "forgetting" in res.output, res.output
    pytest.importorskip("matplotlib")
    png = tmp_path / "stream.png"
    res = runner.invoke(app, ["continual", "split", "--buffer", "50", "--plot", str(png), "--no-progress"])
    assert res.exit_code == 0 and png.stat().st_size > 0, res.output


def test_cli_continual_add_one_class_json() -> None:
    res = runner.invoke(app, ["continual", "add-one-class", "--k", "20", "--traffic", "300", "--buffer", "100",
                              "--new-class", "3", "--json", "--no-progress"])
    assert res.exit_code == 0, res.output
    rec = json.loads(res.output)
    assert rec["new_class"] == "3" and rec["k"] == 20 and 0.0 <= rec["new_recall"] <= 1.0
    assert rec["old_before"] > 0.7  # nine classes learned in one pass over 4,500 real images
    res = runner.invoke(app, ["continual", "add-one-class", "--new-class", "12", "--no-progress"])
    assert res.exit_code == 2 and "0..9" in res.output
