"""Augmented views (CFF's two-view mode): the crop and flip themselves, how views enter a batch,
and which learners take them."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from edgeff import evaluate, get_preset, make_learner
from edgeff.augment import Augment, make_augment, make_views
from edgeff.baseline import BPLearner
from edgeff.config import TrainConfig
from edgeff.contrastive import ContrastiveLearner
from edgeff.data import ImageData
from edgeff.errors import InputError
from edgeff.presets import with_changes


def _offset(padded: torch.Tensor, crop: torch.Tensor) -> list[tuple[int, int]]:
    """Every (dy, dx) at which ``crop`` (C, H, W) is a window of ``padded``."""
    _, h, w = crop.shape
    ph, pw = padded.shape[1:]
    return [(dy, dx) for dy in range(ph - h + 1) for dx in range(pw - w + 1)
            if torch.equal(padded[:, dy:dy + h, dx:dx + w], crop)]


def test_crop_is_a_window_of_the_border_padded_image() -> None:
    x = torch.randn(64, 3, 6, 5)
    aug = Augment(2, False, torch.Generator().manual_seed(0))
    out = aug(x)
    assert out.shape == x.shape
    offsets = []
    for i in range(len(x)):
        padded = F.pad(x[i : i + 1], (2, 2, 2, 2), mode="replicate")[0]
        found = _offset(padded, out[i])
        assert found, f"sample {i} is not a crop of its padded image"
        offsets.append(found[0])
    assert len(set(offsets)) > 10  # per-sample offsets, not one shift for the whole batch
    assert {dy for dy, _ in offsets} == set(range(5)) and {dx for _, dx in offsets} == set(range(5))


def test_flip_mirrors_about_half_the_samples_and_nothing_else() -> None:
    x = torch.randn(400, 1, 4, 4)
    out = Augment(0, True, torch.Generator().manual_seed(1))(x)
    same = torch.tensor([torch.equal(o, s) for o, s in zip(out, x)])
    flipped = torch.tensor([torch.equal(o, s.flip(2)) for o, s in zip(out, x)])
    assert bool((same | flipped).all())
    assert 150 < int(flipped.sum()) < 250


def test_augment_is_seeded_and_leaves_its_input_alone() -> None:
    x = torch.randn(16, 1, 28, 28)
    x0 = x.clone()
    a = Augment(2, True, torch.Generator().manual_seed(3))(x)
    b = Augment(2, True, torch.Generator().manual_seed(3))(x)
    assert torch.equal(a, b) and torch.equal(x, x0)
    assert not torch.equal(a, x)


def test_make_views_stacks_views_labels_and_class_masks() -> None:
    x, y = torch.randn(5, 1, 8, 8), torch.tensor([0, 1, 2, 1, 0])
    allowed = torch.rand(5, 3) > 0.5
    aug = Augment(1, False, torch.Generator().manual_seed(0))
    xs, ys, al = make_views(x, y, 2, aug, allowed)
    assert xs.shape == (10, 1, 8, 8) and ys.tolist() == y.tolist() * 2
    assert al is not None and torch.equal(al, allowed.repeat(2, 1))
    assert make_views(x, y, 1, None, None)[0] is x  # one plain view: the batch itself
    # two views without augmentation are two copies (the loss then has each sample's copy as a positive)
    xs, ys, _ = make_views(x, y, 2, None)
    assert torch.equal(xs[:5], x) and torch.equal(xs[5:], x)


def test_config_validation() -> None:
    g = torch.Generator()
    assert make_augment(TrainConfig(), g) is None
    assert make_augment(TrainConfig(views=2, crop_padding=2), g) is not None
    with pytest.raises(InputError, match="views"):
        make_augment(TrainConfig(views=3), g)
    with pytest.raises(InputError, match="padding"):
        make_augment(TrainConfig(crop_padding=-1), g)
    p = get_preset("symba-mlp")
    with pytest.raises(InputError, match="goodness"):
        make_learner(p, train=replace(p.train, views=2, crop_padding=2))
    p = get_preset("ffcl-mirror")
    with pytest.raises(InputError, match="mirror"):
        make_learner(p, train=replace(p.train, hflip=True))


@pytest.mark.parametrize("backprop", [False, True])
def test_two_view_step_sees_both_views_and_counts_samples_once(backprop: bool, real_batch) -> None:
    x, y = real_batch
    p = get_preset("cff-mlp")
    learner = make_learner(p, train=replace(p.train, views=2, crop_padding=2), backprop=backprop)
    net = learner.net
    seen: list[int] = []
    first = net.blocks[0] if isinstance(learner, BPLearner) else net.layers[0]
    handle = first.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    learner.learn_many(x, y)
    handle.remove()
    assert seen == [2 * len(x)]
    assert learner.samples_seen == len(x)
    learner.learn_one(x[0], int(y[0]))  # a single sample's two views are a positive pair
    assert learner.samples_seen == len(x) + 1


def test_two_view_supcon_loss_counts_the_other_view_as_positive(real_batch) -> None:
    """With views = 2 the loss a layer minimises is supcon over the 2B stacked features."""
    x, y = real_batch
    x, y = x[:6], y[:6]
    p = get_preset("cff-mlp")
    a = make_learner(p, train=replace(p.train, views=2, crop_padding=0))  # two identical views (no augmentation)
    b = make_learner(p, train=replace(p.train, views=1, crop_padding=0))
    assert isinstance(a, ContrastiveLearner) and isinstance(b, ContrastiveLearner)
    ma = a.learn_many(x, y)[0].loss
    mb = b.learn_many(torch.cat([x, x]), torch.cat([y, y]))[0].loss  # the same 2B batch, by hand
    assert ma == pytest.approx(mb, rel=1e-5)


def test_two_view_cff_learns_real_mnist(mnist_small: ImageData) -> None:
    p = get_preset("cff-mlp")
    learner = make_learner(p, train=replace(p.train, views=2, crop_padding=1, lr_final=None))
    for xb, yb in mnist_small.train_batches(64, seed=0):  # all 5,000 images: at τ = 0.07 the start is slow
        learner.learn_many(xb, yb)
    res = evaluate(learner, mnist_small.test_batches(500, limit=500))
    assert res.accuracy > 0.7, res  # chance 0.1; 0.79 here (0.58 after 2,000 images)


# ---------------------------------------------------------------------------------- the goodness family
def test_a_goodness_step_learns_the_augmented_batch(real_batch) -> None:
    """With crops or flips a goodness learner steps on the augmented batch: the same step as a plain learner
    given those images (the augmentation made deterministic here: every image mirrored)."""
    x, y = real_batch
    p = get_preset("symba-mlp")
    a = make_learner(p, train=replace(p.train, hflip=True))
    b = make_learner(p, train=p.train)
    assert a.augment is not None and b.augment is None
    a.augment = lambda xb: xb.flip(-1)  # type: ignore[assignment]
    a.learn_many(x, y)
    b.learn_many(x.flip(-1), y)
    for (name, va), vb in zip(a.net.state_dict().items(), b.net.state_dict().values(), strict=True):
        torch.testing.assert_close(va, vb, msg=name)
    c = make_learner(p, train=p.train)  # and not the step on the images as they came
    c.learn_many(x, y)
    assert any(not torch.equal(vc, va) for vc, va in zip(c.net.state_dict().values(), a.net.state_dict().values()))


def test_a_flipped_learners_lda_readout_counts_each_sample_and_its_mirror(mnist_small: ImageData) -> None:
    """The lda readout of a learner trained with flips is solved from each sample and its mirror image: the
    readout a plain learner with the same layers solves from the batches and their mirrored copies."""
    p = with_changes(get_preset("trifecta-cnn"), {"shrinkage": 0.1, "readout_size": 4})  # a well-conditioned solve
    train = replace(p.train, epochs=1)
    a = make_learner(p, train=replace(train, hflip=True), input_shape=(1, 28, 28), num_classes=10)
    b = make_learner(p, train=train, input_shape=(1, 28, 28), num_classes=10)
    b.net.load_state_dict(a.net.state_dict())
    batches = list(mnist_small.train_batches(250, seed=0, limit=500))
    a.solve_readout(batches)
    b.solve_readout([*batches, *((xb.flip(-1), yb) for xb, yb in batches)])
    x = next(mnist_small.test_batches(100, limit=100))[0]
    torch.testing.assert_close(a.scores(x), b.scores(x), rtol=1e-4, atol=1e-4)
    c = make_learner(p, train=train, input_shape=(1, 28, 28), num_classes=10)  # without the mirrors: another readout
    c.net.load_state_dict(a.net.state_dict())
    c.solve_readout(batches)
    assert not torch.allclose(c.scores(x), a.scores(x), atol=1e-3)


def test_the_edge_runtime_refuses_a_goodness_learner_with_crops_or_flips() -> None:
    from edgeff.edge.learner import check_supported
    from edgeff.errors import UnsupportedError

    p = get_preset("symba-mlp")
    assert check_supported(p.model, p.train) == "goodness"
    for change in ({"hflip": True}, {"crop_padding": 2}):
        with pytest.raises(UnsupportedError, match="crops and flips .* need torch"):
            check_supported(p.model, replace(p.train, **change))
