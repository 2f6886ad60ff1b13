"""The contrastive family: losses against hand-computed cases, embedding pooling, the memory
contract, any-layer prediction at batch 1, and short real-MNIST runs."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from edgeff import evaluate, get_preset, make_learner
from edgeff.contrastive import ContrastiveLearner, feature_vectors, pool_embeddings
from edgeff.data import ImageData
from edgeff.losses import cfl_batch_loss, cfl_dict_loss, cfl_feat_loss, margin_at, supcon_loss

CONTRASTIVE_PRESETS = ["cfl-mlp", "cfl-conv", "cfl-conv512", "cff-mlp", "cff-vit"]


# --------------------------------------------------------------------------- losses, by hand
def test_supcon_hand_computed() -> None:
    # three unit vectors, labels [0, 0, 1]: z0·z1 = 0, z0·z2 = 1, z1·z2 = 0
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    y = torch.tensor([0, 0, 1])
    tau = 1.0
    # anchor 0: positive 1 (sim 0), others {1: 0, 2: 1} -> -log(e^0 / (e^0 + e^1))
    l0 = -math.log(1 / (1 + math.e))
    # anchor 1: positive 0 (sim 0), others {0: 0, 2: 0} -> -log(1/2)
    l1 = math.log(2)
    # anchor 2 has no positive: skipped
    assert float(supcon_loss(z, y, tau=tau)) == pytest.approx((l0 + l1) / 2, rel=1e-6)


def test_supcon_margin_clamps_positive_similarity() -> None:
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    y = torch.tensor([0, 0, 1])
    # margin 0.4: positive pairs get min(0 + 0.4, 1) = 0.4
    l0 = -math.log(math.exp(0.4) / (math.exp(0.4) + math.e))
    l1 = -math.log(math.exp(0.4) / (math.exp(0.4) + 1))
    assert float(supcon_loss(z, y, tau=1.0, margin=0.4)) == pytest.approx((l0 + l1) / 2, rel=1e-6)
    # identical positives: the similarity is capped at 1, not 1.4
    same = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    capped = supcon_loss(same, torch.tensor([0, 0, 1]), tau=1.0, margin=0.4)
    assert float(capped) == pytest.approx(-math.log(math.e / (math.e + 1)), rel=1e-6)
    assert margin_at(0, 3, 0.4, 0.1) == 0.4 and margin_at(1, 3, 0.4, 0.1) == pytest.approx(0.25)
    assert margin_at(2, 3, 0.4, 0.1) == pytest.approx(0.1)


def test_cfl_batch_loss_hand_computed() -> None:
    h = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    y = torch.tensor([0, 1, 0])
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])  # embeddings of each sample's label
    # sample 0: <h0,t0>=1; negatives {1}: <h0,t1>=0  -> -1 + log(e^0) = -1
    # sample 1: <h1,t1>=2; negatives {0,2}: <h1,t0>=0, <h1,t2>=0 -> -2 + log 2
    # sample 2: <h2,t2>=1; negatives {1}: <h2,t1>=1 -> -1 + 1 = 0
    want = (-1 + (-2 + math.log(2)) + 0) / 3
    assert float(cfl_batch_loss(h, y, t)) == pytest.approx(want, rel=1e-6)
    # a batch of one label has no negative: no signal, no NaN
    assert float(cfl_batch_loss(h[:1], y[:1], t[:1])) == 0.0


def test_cfl_dict_loss_is_cross_entropy_over_the_dictionary() -> None:
    h = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    d = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([0, 0])
    l0 = -math.log(math.exp(2) / (math.exp(2) + 1))
    l1 = -math.log(1 / (1 + math.e))
    assert float(cfl_dict_loss(h, y, d)) == pytest.approx((l0 + l1) / 2, rel=1e-6)


def test_cfl_feat_loss_hand_computed() -> None:
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    y = torch.tensor([0, 0, 1])
    # anchor 0: positives {1} sim 0, negatives {2} sim 1 -> -log(e^0 / e^1) = 1
    # anchor 1: positives {0} sim 0, negatives {2} sim 0 -> 0
    # anchor 2: no positive -> skipped
    assert float(cfl_feat_loss(z, y, tau=1.0)) == pytest.approx(0.5, rel=1e-6)


def test_losses_fall_as_features_separate() -> None:
    y = torch.tensor([0, 0, 1, 1])
    apart = F.normalize(torch.tensor([[1.0, 0.1], [1.0, -0.1], [-1.0, 0.1], [-1.0, -0.1]]), dim=1)
    mixed = F.normalize(torch.tensor([[1.0, 0.1], [-1.0, -0.1], [-1.0, 0.1], [1.0, -0.1]]), dim=1)
    assert supcon_loss(apart, y) < supcon_loss(mixed, y)
    assert cfl_feat_loss(apart, y) < cfl_feat_loss(mixed, y)


# --------------------------------------------------------------------------- pooling, features
@pytest.mark.parametrize("dim,width", [(10, 4), (128, 128), (512, 64), (512, 256), (98, 32)])
def test_embedding_pooling_shapes(dim: int, width: int) -> None:
    d = torch.randn(7, dim)
    pooled = pool_embeddings(d, width)
    assert pooled.shape == (7, width)
    stride = dim // width
    kernel = dim - (width - 1) * stride
    assert torch.allclose(pooled[:, 0], d[:, :kernel].mean(1), atol=1e-6)
    with pytest.raises(ValueError, match="embed_dim"):
        pool_embeddings(d, dim + 1)


def test_feature_vectors_conv_locations_and_linear_groups() -> None:
    conv = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).view(2, 3, 2, 2)
    f = feature_vectors(conv, 1)
    assert f.shape == (2, 4, 3)  # K = H*W locations of C = 3 channels
    assert torch.equal(f.mean(1), conv.mean((2, 3)))  # the mean feature is the global average pool
    lin = torch.arange(2 * 8, dtype=torch.float32).view(2, 8)
    g = feature_vectors(lin, 4)
    assert g.shape == (2, 4, 2) and torch.equal(g[0, 1], torch.tensor([2.0, 3.0]))
    with pytest.raises(ValueError, match="groups"):
        feature_vectors(lin, 3)


# --------------------------------------------------------------------------- learner contracts
def _small(name: str) -> ContrastiveLearner:
    p = get_preset(name)
    if name == "cfl-conv512":
        p = replace(p, model=replace(p.model, layers=tuple(replace(s, out=s.out // 8) for s in p.model.layers)))
    if name == "cff-vit":  # ViT[32 2 2] on 28x28 digits
        p = replace(p, model=replace(p.model, input_shape=(1, 28, 28),
                                     layers=(replace(p.model.layers[0], out=32, heads=2),) * 2))
    learner = make_learner(p)
    assert isinstance(learner, ContrastiveLearner)
    return learner


def test_embeddings_get_no_gradient_below_the_last_layer(real_batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    learner = _small("cfl-mlp")
    x, y = real_batch
    net = learner.net
    assert net.embed is not None
    seen: list[tuple[int, bool]] = []

    def hook(i: int, before: bool) -> None:
        if not before:
            seen.append((i, net.embed.grad is not None and bool(net.embed.grad.abs().sum() > 0)))  # type: ignore[union-attr]

    learner.layer_hook = hook
    before = net.embed.detach().clone()
    learner.learn_many(x, y)
    assert seen == [(0, False), (1, True)]  # only the last layer's loss reaches the dictionary
    assert not torch.equal(before, net.embed.detach())
    assert learner.net.local_layers[0].opt is not None
    first_params = {id(p) for g in learner.net.local_layers[0].opt.param_groups for p in g["params"]}
    assert id(net.embed) not in first_params


@pytest.mark.parametrize("name", CONTRASTIVE_PRESETS)
def test_batch_one_prediction_equals_batched(name: str, real_batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    learner = _small(name)
    x, y = real_batch
    learner.learn_many(x, y)
    batched = learner.layer_predictions(x[:8])
    singles = torch.stack([learner.layer_predictions(x[i : i + 1])[0] for i in range(8)])
    assert torch.equal(batched, singles)
    assert [learner.predict_one(x[i]) for i in range(8)] == learner.predict_many(x[:8]).tolist()


@pytest.mark.parametrize("name", CONTRASTIVE_PRESETS)
def test_no_graph_crosses_layers_and_inputs_are_untouched(name: str, real_batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    learner = _small(name)
    x, y = real_batch
    x0, y0 = x.clone(), y.clone()
    metrics = learner.learn_many(x, y)
    assert len(metrics) == len(learner.net.layers) and all(math.isfinite(m.loss) for m in metrics)
    assert torch.equal(x, x0) and torch.equal(y, y0)
    # learning at batch 1 works (BatchNorm running statistics, losses without pairs)
    learner.learn_one(x[0], int(y[0]))


def test_same_seed_same_predictions(real_batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = real_batch
    a, b = _small("cfl-mlp"), _small("cfl-mlp")
    a.learn_many(x, y)
    b.learn_many(x, y)
    assert torch.equal(a.scores(x), b.scores(x))


# cfl-conv is left out: its global-average-pooled conv features learn slowly from scratch (2,000 images:
# CFL 27%, backprop on the same architecture 23%); bench/accuracy.py measures it on full data sets.
# cff-mlp's two cropped views learn more slowly at first (2,000 images: 58% at τ 0.07; one-forward 65%) and
# overtake the one-forward mode over full epochs (bench/accuracy.py)
@pytest.mark.parametrize("name,floor", [("cfl-mlp", 0.8), ("cff-mlp", 0.5)])
def test_short_real_mnist_run_lands_far_above_chance(name: str, floor: float, mnist_small: ImageData) -> None:
    learner = _small(name)
    for xb, yb in mnist_small.train_batches(64, seed=0, limit=2000):
        learner.learn_many(xb, yb)
    res = evaluate(learner, mnist_small.test_batches(500, limit=500), per_layer=True)
    assert res.accuracy > floor, res  # chance is 0.1
    assert len(res.layer_accuracy) == (1 if name.startswith("cff") else len(learner.net.layers))


def test_zero_shot_super_classes(mnist_small: ImageData) -> None:
    learner = _small("cfl-mlp")
    for xb, yb in mnist_small.train_batches(64, seed=0, limit=2000):
        learner.learn_many(xb, yb)
    x, y = next(mnist_small.test_batches(500))
    groups = [[0, 6, 8, 9], [1, 7], [2, 3, 5], [4]]  # loops / strokes / curves / 4
    sup = torch.tensor([next(g for g, members in enumerate(groups) if int(c) in members) for c in y])
    zs = learner.zero_shot_scores(x, groups).argmax(1)
    assert (zs == sup).float().mean() > 0.4  # chance ~ 0.25-0.4 by group size


# --------------------------------------------------------------------------- mirror FFCL
def test_mirror_loss_hand_computed() -> None:
    from edgeff.mirror import mirror_loss

    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert float(mirror_loss(a, a.clone(), None)) == pytest.approx(0.0, abs=1e-6)
    b = torch.tensor([[0.0, 1.0], [1.0, 0.0]])  # orthogonal to its partner: 1 - cos = 1
    assert float(mirror_loss(a, b, None)) == pytest.approx(1.0)
    # with labels [0, 1] and target == a: pairs (0,0),(1,1) same, cos 1 -> 0; (0,1),(1,0) other, cos 0
    # -> max(0, 0 - 0.3) = 0; plus the self term 0
    assert float(mirror_loss(a, a.clone(), torch.tensor([0, 1]), margin=0.3)) == pytest.approx(0.0, abs=1e-6)
    # labels [0, 0]: the cross pairs are positives with cos 0 -> (0 + 1 + 1 + 0) / 4
    assert float(mirror_loss(a, a.clone(), torch.tensor([0, 0]))) == pytest.approx(0.5)


def test_mirror_models_learn_and_never_share_gradients(mnist_small: ImageData) -> None:
    from edgeff.mirror import MirrorLearner

    learner = make_learner("ffcl-mirror")
    assert isinstance(learner, MirrorLearner)
    for xb, yb in mnist_small.train_batches(128, seed=0, limit=3000):
        learner.learn_many(xb, yb)
    a, b = learner.mirrors
    assert not torch.equal(a.local_layers[0].block[1].weight, b.local_layers[0].block[1].weight)
    res = evaluate(learner, mnist_small.test_batches(500, limit=500))
    assert res.accuracy > 0.3  # one pass over 3,000 images (~41%); chance is 0.1
    x, _ = next(mnist_small.test_batches(8))
    assert [learner.predict_one(x[i]) for i in range(8)] == learner.predict_many(x).tolist()


def test_attention_maps_average_to_the_layer_scores(real_batch: tuple[torch.Tensor, torch.Tensor], tmp_path) -> None:
    from edgeff.errors import InputError
    from edgeff.explain import attention_maps, save_attention

    learner = _small("cfl-conv")
    x, y = real_batch
    learner.learn_many(x, y)
    maps, cls = attention_maps(learner, x[0], label=3)
    assert cls == 3 and [m.shape for m in maps] == [(26, 26), (13, 13)]
    per_layer = learner.net.layer_scores(x[:1])  # ⟨h̄/‖h̄‖, d⟩
    norms = [f.norm() for f in learner.net.mean_features(x[:1])]
    for m, s, n in zip(maps, per_layer, norms, strict=True):
        assert m.mean() == pytest.approx(float(s[0, 3] * n), rel=1e-4, abs=1e-5)  # the map's mean is ⟨h̄, d⟩
    files = save_attention(x[0].numpy(), maps, tmp_path / "att.png")
    assert len(files) == 3 and all(f.stat().st_size > 0 for f in files)
    with pytest.raises(InputError, match="convolutional"):
        attention_maps(_small("cfl-mlp"), x[0])


def test_cli_explain(tmp_path) -> None:
    from edgeff.cli.app import app
    from typer.testing import CliRunner

    runner = CliRunner()
    ck = tmp_path / "c.pt"
    res = runner.invoke(app, ["train", "--preset", "cfl-conv", "--samples", "300", "--epochs", "1", "--no-progress",
                              "--device", "cpu", "--out", str(ck)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["explain", str(ck), "--out", str(tmp_path / "a.png"), "--index", "3"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "a_layer1.png").is_file() and (tmp_path / "a_layer2.png").is_file()
