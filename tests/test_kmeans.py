"""The kmeans layer kind (``edgeff.kmeans``) and the analytic family over it (``kmeans-conv``): the conv
formulation equals the patch-by-patch definition, fitting is seeded, the stream's first samples are held
until the fit and then counted once (whatever the batch size), and the numpy runtime refuses it in one line."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from edgeff.analytic import AnalyticLearner
from edgeff.config import LayerSpec
from edgeff.contract import build
from edgeff.data import ImageData
from edgeff.errors import UnsupportedError
from edgeff.kmeans import KMeansPatches
from edgeff.presets import PRESETS

P = PRESETS["kmeans-conv"]


def _small(k: int = 24, fit: int = 40, pool: int = 2, hflip: bool = False) -> AnalyticLearner:
    model = replace(P.model, input_shape=(1, 28, 28), fit_samples=fit,
                    layers=(LayerSpec("kmeans", k, kernel=5, pool=pool),))
    learner = build(model, replace(P.train, device="cpu", hflip=hflip))
    assert isinstance(learner, AnalyticLearner)
    return learner


def test_the_conv_features_are_the_patch_definition(mnist_small: ImageData) -> None:
    """Each patch normalised, whitened, its distance to each centroid, the triangle activation, the grid
    average: computed patch by patch from the layer's fitted state, against the layer's convolutions."""
    x = mnist_small.normalise(mnist_small.x_train[:60])
    layer = KMeansPatches((1, 28, 28), 16, 5, 2)
    layer.fit(x[:50], torch.Generator().manual_seed(0))
    got = layer(x[50:]).double()  # (10, 16, 2, 2)
    p = F.unfold(x[50:].double(), 5).transpose(1, 2)  # (10, 576, 25)
    p = p - p.mean(2, keepdim=True)
    p = p / (p.pow(2).mean(2, keepdim=True) + layer.var_eps.double()).sqrt()
    w = (p - layer.patch_mean.double()) @ layer.zca.double()
    z = torch.cdist(w, layer.centroids.double()[None].expand(10, -1, -1))  # (10, 576, 16)
    f = (z.mean(2, keepdim=True) - z).clamp(min=0).transpose(1, 2).reshape(10, 16, 24, 24)
    want = F.adaptive_avg_pool2d(f, 2)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3 * float(want.abs().max()))
    assert float(want.abs().max()) > 0


def test_fitting_is_seeded_and_refused_before(mnist_small: ImageData) -> None:
    x = mnist_small.normalise(mnist_small.x_train[:30])
    a, b = KMeansPatches((1, 28, 28), 8, 5, 2), KMeansPatches((1, 28, 28), 8, 5, 2)
    with pytest.raises(RuntimeError, match="not been fitted"):
        a(x)
    a.fit(x, torch.Generator().manual_seed(3))
    b.fit(x, torch.Generator().manual_seed(3))
    assert torch.equal(a.centroids, b.centroids) and torch.equal(a(x), b(x))
    torch.testing.assert_close(a.centroids.norm(dim=1), torch.ones(8))  # unit centroids


def test_the_first_samples_are_held_then_counted_once_at_any_batch_size(mnist_small: ImageData) -> None:
    """Regression for the hold/fit/count path: batch 1 and batch 25 streams end at the same statistics (the
    same 40 samples fit the layer), every sample counted once, mirror images too with hflip."""
    x = mnist_small.normalise(mnist_small.x_train[:100])
    y = torch.from_numpy(mnist_small.y_train[:100].astype("int64"))
    one, many = _small(), _small()
    for i in range(100):
        one.learn_many(x[i : i + 1], y[i : i + 1])
        if i == 38:
            assert one.net.unfitted and int(one.net.n_fit) == 39 and float(one.net.count.sum()) == 0
    for i in range(0, 100, 25):
        many.learn_many(x[i : i + 25], y[i : i + 25])
    assert not one.net.unfitted and float(one.net.count.sum()) == 100 == one.samples_seen
    torch.testing.assert_close(one.net.class_sum, many.net.class_sum)
    torch.testing.assert_close(one.net.count, many.net.count)
    torch.testing.assert_close(one.scores(x), many.scores(x), rtol=1e-4, atol=1e-3)
    mirrored = _small(hflip=True)
    mirrored.learn_many(x, y)
    assert float(mirrored.net.count.sum()) == 200


def test_a_short_run_fits_from_what_it_held_and_learns(mnist_small: ImageData) -> None:
    """Fewer samples than fit_samples: predicting fits the layer from them (and says so); it learns digits."""
    learner = _small(k=64, fit=5000, pool=2)
    x = mnist_small.normalise(mnist_small.x_train[:600])
    y = torch.from_numpy(mnist_small.y_train[:600].astype("int64"))
    for i in range(0, 600, 100):
        learner.learn_many(x[i : i + 100], y[i : i + 100])
    assert learner.net.unfitted
    assert "600 samples" in (learner.ready_to_predict() or "")
    xt = mnist_small.normalise(mnist_small.x_test[:500])
    acc = float((learner.predict_many(xt) == torch.from_numpy(mnist_small.y_test[:500].astype("int64"))).float().mean())
    assert acc > 0.8, acc


def test_nothing_learned_yet_is_refused_and_a_class_can_still_be_added() -> None:
    learner = _small()
    with pytest.raises(UnsupportedError, match="learned none yet"):
        learner.scores(torch.zeros(1, 1, 28, 28))
    assert learner.add_class("extra") == 10  # no examples: no fit needed


def test_the_numpy_runtime_refuses_kmeans_layers() -> None:
    from edgeff.interchange import to_edge

    learner = _small()
    assert not learner.supports("edge_runtime")
    with pytest.raises(UnsupportedError, match="kmeans"):
        to_edge(learner)


def test_the_backprop_twin_scores_a_large_batch_in_bounded_blocks(monkeypatch: pytest.MonkeyPatch,
                                                                  mnist_small: ImageData) -> None:
    """The twin's wide conv maps are megabytes per sample: kmeans-conv3200's took 19 GB for a test batch of 1,000
    (measured after: 1.05 GiB peak RSS in a fresh process). Scoring in blocks gives the scores of one pass."""
    import edgeff.inputs

    p = PRESETS["kmeans-conv"]
    twin = build(replace(p.model, input_shape=(1, 28, 28), layers=(replace(p.model.layers[0], out=16),)),
                 replace(p.train, device="cpu"), backprop=True)
    x = mnist_small.normalise(mnist_small.x_test[:40])
    whole = twin.scores(x)
    one_sample_maps = twin._row_bytes
    assert one_sample_maps is not None and one_sample_maps >= 16 * 23 * 23 * 4  # the 6x6 conv's map on 28x28
    monkeypatch.setattr(edgeff.inputs, "BLOCK_BYTES", 3 * one_sample_maps)  # blocks of 3 rows
    torch.testing.assert_close(twin.scores(x), whole, rtol=1e-5, atol=1e-6)
