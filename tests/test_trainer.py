from dataclasses import replace

import numpy as np
import pytest
import torch

from edgeff import LayerSpec, Learner, ModelConfig, TrainConfig, evaluate, make_learner
from edgeff.errors import InputError
from edgeff.layers import RunningBatchNorm
from edgeff.presets import PRESETS
from edgeff.trainer import train_epochs

TINY_MLP = ModelConfig(layers=(LayerSpec("linear", 32, norm="length"), LayerSpec("linear", 32, norm="length"),
                               LayerSpec("linear", 16, norm="length")), label="icp", loss="symba")
TINY_CNN = ModelConfig(layers=(LayerSpec("conv", 4, norm="batch"), LayerSpec("conv", 4, norm="batch", pool=2),
                               LayerSpec("conv", 8, norm="batch", pool=2)), label="channel", label_learned=True)
CPU = TrainConfig(device="cpu", batch_size=16)


def _weights(learner: Learner) -> list[torch.Tensor]:
    return [t.detach().clone() for t in learner.net.state_dict().values()]


def _fixed_negatives(net, x, y, generator):  # type: ignore[no-untyped-def]
    return (y + 1) % net.num_classes


def _inputs_seen_by(learner: Learner, i: int) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    learner.net.layers[i].register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    return seen


@pytest.mark.parametrize("model", [TINY_MLP, TINY_CNN], ids=["mlp", "cnn"])
def test_no_graph_crosses_a_layer_boundary(model: ModelConfig, real_batch) -> None:
    x, y = real_batch
    learner = Learner(model, CPU)
    seen = [_inputs_seen_by(learner, i) for i in (1, 2)]
    learner.learn_many(x[:8], y[:8])
    assert all(t.grad_fn is None and not t.requires_grad for s in seen for t in s)


def test_later_losses_do_not_change_earlier_layers(real_batch) -> None:
    """Oracle: layer 1's update is the same with or without layers stacked on top of it."""
    x, y = real_batch
    deep = Learner(TINY_MLP, CPU)
    shallow = Learner(replace(TINY_MLP, layers=TINY_MLP.layers[:1]), CPU)
    shallow.net.layers[0].load_state_dict(deep.net.layers[0].state_dict())
    shallow.net.encoder.load_state_dict(deep.net.encoder.state_dict())
    deep.negatives = shallow.negatives = _fixed_negatives
    for _ in range(3):
        deep.learn_many(x, y)
        shallow.learn_many(x, y)
    for a, b in zip(deep.net.layers[0].parameters(), shallow.net.layers[0].parameters(), strict=True):
        assert torch.equal(a, b)


def test_olu_carries_the_graph_into_the_next_layer_on_alternate_steps(real_batch) -> None:
    x, y = real_batch
    learner = Learner(TINY_CNN, replace(CPU, schedule="olu"))
    seen = _inputs_seen_by(learner, 1)
    seen2 = _inputs_seen_by(learner, 2)
    w0 = learner.net.layers[0].block[1].weight.detach().clone()
    m = learner.learn_many(x[:8], y[:8])  # step 0: layer 0 alone, layers (1, 2) as a pair
    assert seen[-1].grad_fn is None and seen2[-1].grad_fn is not None
    assert [lm.trained for lm in m] == [True, True, True]
    m = learner.learn_many(x[:8], y[:8])  # step 1: layers (0, 1) as a pair, layer 2 alone
    assert seen[-1].grad_fn is not None and seen2[-1].grad_fn is None
    assert not torch.equal(w0, learner.net.layers[0].block[1].weight)
    assert learner.net.encoder.matrix.grad is not None  # the learned label channel trains with layer 0


def test_greedy_keeps_optimizer_state_for_the_active_layer_only(real_batch) -> None:
    x, y = real_batch
    learner = Learner(TINY_MLP, replace(CPU, schedule="greedy", greedy_steps=2))
    frozen0 = None
    for step in range(7):
        m = learner.learn_many(x[:16], y[:16])
        active = min(step // 2, 2)
        assert [layer.opt is not None for layer in learner.net.layers] == [i == active for i in range(3)]
        assert len(m) == active + 1  # later layers do not run yet
        assert [lm.trained for lm in m] == [i == active for i in range(active + 1)]
        if step == 2:
            frozen0 = learner.net.layers[0].block[2].weight.detach().clone()
    assert torch.equal(frozen0, learner.net.layers[0].block[2].weight)  # type: ignore[arg-type]


@pytest.mark.parametrize("schedule", ["all", "greedy", "olu"])
def test_seeded_reproducibility(schedule: str, real_batch) -> None:
    x, y = real_batch
    tc = replace(CPU, schedule=schedule, negatives="hard" if schedule == "all" else "uniform")
    if schedule == "greedy":  # a setting that matters only for greedy (elsewhere it is refused as unused)
        tc = replace(tc, greedy_steps=2)
    runs = []
    for seed in (3, 3, 4):
        learner = Learner(TINY_CNN, replace(tc, seed=seed))
        for i in range(4):
            learner.learn_many(x[i * 16:(i + 1) * 16], y[i * 16:(i + 1) * 16])
        runs.append((_weights(learner), learner.scores(x)))
    assert all(torch.equal(a, b) for a, b in zip(runs[0][0], runs[1][0], strict=True))
    assert torch.equal(runs[0][1], runs[1][1])
    assert not all(torch.equal(a, b) for a, b in zip(runs[0][0], runs[2][0], strict=True))


@pytest.mark.parametrize("name", [n for n, p in PRESETS.items() if not n.endswith("-paper")])
def test_every_preset_learns_a_step_at_batch_one_and_batch_many(name: str, real_batch) -> None:
    x, y = real_batch
    learner = make_learner(name, input_shape=tuple(x.shape[1:]), train=replace(PRESETS[name].train, device="cpu"))
    learner.learn_one(x[0], int(y[0]))  # batch size 1: running-statistics BatchNorm in train mode
    out = learner.learn_many(x[:4], y[:4])
    if isinstance(out, list):  # layer-local learners: one LayerMetrics per layer
        assert out and all(np.isfinite([m.loss, m.g_pos, m.g_neg]).all() for m in out)
    else:
        assert np.isfinite(out)
    learner.ready_to_predict(lambda: [(x[:4], y[:4])])  # mid-plan: an lda readout solved from a pass
    s = learner.scores(x[:5])
    assert s.shape == (5, 10) and torch.isfinite(s).all()
    assert 0 <= learner.predict_one(x[0]) < 10


def test_symba_mlp_learns_real_mnist(mnist_small) -> None:
    learner = make_learner("symba-mlp", train=replace(PRESETS["symba-mlp"].train, device="cpu", batch_size=50))
    train_epochs(learner, mnist_small, epochs=1, batch_size=50)
    res = evaluate(learner, mnist_small.test_batches(500), per_layer=True)
    assert res.accuracy > 0.75, res  # chance is 0.10
    assert len(res.layer_accuracy) == 2


def test_head_predictor_learns_in_one_pass(mnist_small) -> None:
    tc = replace(PRESETS["symba-mlp"].train, device="cpu", predictor="head", batch_size=50)
    learner = make_learner("symba-mlp", train=tc)
    train_epochs(learner, mnist_small, epochs=1, batch_size=50)
    assert evaluate(learner, mnist_small.test_batches(500)).accuracy > 0.75


def test_bad_inputs_raise_and_leave_the_learner_untouched(real_batch) -> None:
    x, y = real_batch
    learner = Learner(TINY_MLP, CPU)
    before = _weights(learner)
    bad_nan = x[:4].clone()
    bad_nan[0, 0, 0, 0] = float("nan")
    cases = [
        (bad_nan, y[:4], "NaN"),
        (x[:4, :, :20], y[:4], "shape"),
        ((x[:4] * 255).to(torch.uint8), y[:4], "float"),
        (x[:4], y[:3], "labels"),
        (x[:4], torch.tensor([0, 1, 2, 10]), "0..9"),
    ]
    for bx, by, msg in cases:
        with pytest.raises(InputError, match=msg):
            learner.learn_many(bx, by)
    with pytest.raises(InputError, match="one sample"):
        learner.learn_one(x[:2], 1)
    assert learner.step == 0
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(learner), strict=True))
    assert learner.learn_many(x[:4].flatten(1), y[:4])  # flattened batches are accepted


@pytest.mark.parametrize(("preset", "backprop"), [("trifecta-cnn", False), ("cfl-mlp", False), ("cff-mlp", False),
                                                  ("symba-mlp", False), ("ffcl-mirror", False), ("trifecta-cnn", True)])
def test_overflowing_inputs_are_refused_with_the_state_untouched(preset: str, backprop: bool, real_batch) -> None:
    """One finite pixel of 3e38 used to turn every loss and parameter of trifecta-cnn into NaN; a float64 1e39
    passed the finiteness check and became inf in float32; labels 2.7 were truncated to 2."""
    x, y = real_batch
    learner = make_learner(preset, backprop=backprop, train=replace(PRESETS[preset].train, device="cpu"))
    before = {k: v.clone() for k, v in learner.net.state_dict().items()}
    big = x[:8].clone()
    big[0, 0, 3, 3] = 3e38
    wide = x[:8].double()
    wide[1, 0, 5, 5] = 1e39
    for bx, by, msg in ((big, y[:8], "beyond"), (wide, y[:8], "infinite"), (x[:3], [1.0, 2.7, 3.0], "whole class")):
        with pytest.raises(InputError, match=msg):
            learner.learn_many(bx, by)
    after = learner.net.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items()) and learner.step == 0
    learner.learn_many(x[:8], y[:8].double())  # whole-number float labels are still fine


def test_a_non_finite_loss_refuses_the_layer_step(real_batch) -> None:
    """The second line of defence: a loss that overflows inside a layer stops the step before that layer
    changes (parameters, gradients and BN statistics)."""
    p = PRESETS["trifecta-cnn"]
    learner = make_learner(p, train=replace(p.train, schedule="all", device="cpu", chunk=4))
    x, y = real_batch
    learner.learn_many(x[:16], y[:16])
    layer = learner.net.local_layers[0]
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with torch.no_grad():
        next(layer.block[1].parameters()).mul_(1e30)  # conv weights that overflow goodness
    scaled = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(InputError, match="layer 1"):
        learner.learn_many(x[:16], y[:16])
    assert all(torch.equal(v, layer.state_dict()[k]) for k, v in scaled.items())
    assert all(q.grad is None for q in layer.parameters()) and before


@pytest.mark.parametrize("kind", ["uniform", "hard"])
def test_negatives_are_always_wrong_labels(kind: str, real_batch) -> None:
    from edgeff.model import NEGATIVES

    x, y = real_batch
    learner = Learner(TINY_MLP, CPU)
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([NEGATIVES[kind](learner.net, x, y, g) for _ in range(20)])  # (20, B)
    assert (draws != y).all()
    assert ((draws >= 0) & (draws < 10)).all()
    assert len(torch.unique(draws)) == 10  # every class shows up as a negative somewhere


def test_per_layer_metrics_track_separation(mnist_small) -> None:
    learner = make_learner("symba-mlp", train=replace(PRESETS["symba-mlp"].train, device="cpu"))
    first = last = None
    for i, (x, y) in enumerate(mnist_small.train_batches(100, limit=3000)):
        m = learner.learn_many(x, y)
        first = first or m
        last = m
    assert last is not None and first is not None
    assert all(lm.separation > 0.5 for lm in last)  # positives now clearly out-score negatives
    assert all(lm.loss < f.loss for lm, f in zip(last, first, strict=True))


@pytest.mark.parametrize(("preset", "schedule", "chunk"), [
    ("symba-mlp", "all", 5), ("symba-mlp", "greedy", 5), ("ff-mlp", "all", 7),
    # batch-statistics BN at every layer's input: chunks normalised with the whole batch's statistics
    ("trifecta-cnn", "all", 5), ("trifecta-cnn", "greedy", 3),
])
def test_frugal_step_gives_the_whole_batch_update(preset: str, schedule: str, chunk: int, real_batch) -> None:
    """The frugal step (chunks of pairs, one layer at a time) against the whole-batch step of the same
    learner class: the same losses, parameters and BN running statistics after 4 steps (SGD, so
    rounding-level gradient differences stay rounding-level); gradients freed after each layer's step."""
    p = PRESETS[preset]
    x, y = real_batch
    extra = {"greedy_steps": 2} if schedule == "greedy" else {}  # settings a learner does not read are refused
    learners = [make_learner(p, train=replace(p.train, optimizer="sgd", lr=1e-2, schedule=schedule, frugal=frugal,
                                              **extra, **({"chunk": chunk} if frugal else {})))
                for frugal in (False, True)]
    for _ in range(4):
        ms = [lr.learn_many(x[:16], y[:16]) for lr in learners]
        assert [m.trained for m in ms[0]] == [m.trained for m in ms[1]]
        np.testing.assert_allclose([m.loss for m in ms[1]], [m.loss for m in ms[0]], rtol=1e-4)
        np.testing.assert_allclose([m.g_pos for m in ms[1]], [m.g_pos for m in ms[0]], rtol=1e-4)
    # conv weights: oneDNN's channels-last kernels sum a weight gradient over rows in an order that depends on
    # the rows (chunk or batch): up to 1.6e-5 apart after 4 steps here (NCHW kernels: within 1e-5)
    atol = 5e-5 if preset.startswith("trifecta") else 1e-5
    for a, b in zip(learners[0].net.state_dict().values(), learners[1].net.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=atol)
    assert all(q.grad is None for q in learners[1].net.parameters())  # gradients freed right after each step


def test_frugal_step_without_whole_batch_statistics_differs(real_batch, monkeypatch) -> None:
    """The test above can fail: with the whole-batch statistics switched off, each chunk is normalised with
    its own statistics (a naive split), and the BN model's update differs far beyond its tolerance."""
    p = PRESETS["trifecta-cnn"]
    x, y = real_batch
    whole, split = (make_learner(p, train=replace(p.train, optimizer="sgd", lr=1e-2, schedule="all", frugal=f,
                                                  **({"chunk": 5} if f else {}))) for f in (False, True))
    monkeypatch.setattr(RunningBatchNorm, "prepare", lambda self, parts, rows=64: None)
    for _ in range(4):
        whole.learn_many(x[:16], y[:16])
        split.learn_many(x[:16], y[:16])
    states = whole.net.state_dict().values(), split.net.state_dict().values()
    assert max(float((a - b).abs().max()) for a, b in zip(*states, strict=True)) > 1e-2  # frugal: ~1e-6


def test_lr_hold_keeps_the_lr_then_decays_linearly(mnist_small) -> None:
    from edgeff.loop import planned_batches

    def lrs(hold: float) -> list[float]:
        tc = TrainConfig(device="cpu", lr=1e-3, lr_final=1e-4, lr_hold=hold, epochs=2)
        return [lr for _, _, lr, _ in planned_batches(tc, 0, mnist_small, epochs=2, batch_size=10, limit=100)]

    held, plain = lrs(0.5), lrs(0.0)
    assert len(held) == 20 and held[:11] == [1e-3] * 11  # the first half of the plan at lr
    steps = np.diff(held[10:])
    assert np.allclose(steps, steps[0]) and steps[0] < 0  # then a straight line towards lr_final
    assert held[-1] == pytest.approx(1e-3 + (1e-4 - 1e-3) * 9 / 10)
    assert plain[1] < 1e-3 and plain[-1] == pytest.approx(1e-3 + (1e-4 - 1e-3) * 19 / 20)
    with pytest.raises(InputError, match="lr_hold"):
        TrainConfig(lr_hold=1.0)
