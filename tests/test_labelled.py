"""The split first layer (edgeff.labelled) against the same learner multiplying the encoded input whole."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from edgeff import LayerSpec, ModelConfig, factored, labelled, make_learner
from edgeff.labels import make_encoder
from edgeff.presets import PRESETS


def _twins(preset: str, **train):  # type: ignore[no-untyped-def]
    """Two learners with the same seed: the first splits its first layer's input, the second does not."""
    p = PRESETS[preset]
    a, b = (make_learner(p, train=replace(p.train, device="cpu", **train)) for _ in range(2))
    assert a.net.split_first
    b.net.split_first = False  # the encoded (B, C', H, W) input through the block, as every other layer
    return a, b


@pytest.mark.parametrize("preset", ["symba-mlp", "ff-mlp"])
def test_every_label_rows_are_the_blocks_rows_on_the_encoded_input(preset: str, real_batch) -> None:
    a, _ = _twins(preset)
    x, _ = real_batch
    enc, first = a.net.encoder, a.net.layers[0]
    k = a.net.num_classes
    encoded = enc(x.repeat_interleave(k, dim=0), torch.arange(k).repeat(x.shape[0]))
    with torch.no_grad():
        torch.testing.assert_close(labelled.every_label(first, enc.split(x)), first(encoded), rtol=1e-5, atol=1e-5)
    split = enc.split(x)
    flat = enc(x, torch.full((x.shape[0],), 3)).flatten(1)  # the split is the encoded input, column for column
    assert torch.equal(flat[:, split.base_cols], split.base) and torch.equal(flat[:, split.code_cols],
                                                                             split.table[[3] * x.shape[0]])


@pytest.mark.parametrize("preset", ["symba-mlp", "ff-mlp"])
@pytest.mark.parametrize("frugal", [True, False])
def test_split_training_steps_as_the_encoded_input_does(preset: str, frugal: bool, real_batch) -> None:
    """SGD (rounding stays rounding) over 4 steps of 40 pairs in chunks of 16 (frugal: the column factors)
    and whole batches: the same losses, goodness, parameters and label goodness as the unsplit learner."""
    a, b = _twins(preset, optimizer="sgd", lr=1e-2, frugal=frugal, **({"chunk": 16} if frugal else {}))
    x, y = real_batch
    for s in range(4):
        ma, mb = (lr.learn_many(x[s * 10:s * 10 + 40], y[s * 10:s * 10 + 40]) for lr in (a, b))
        for m, n in zip(ma, mb, strict=True):
            assert m.loss == pytest.approx(n.loss, rel=1e-5) and m.g_pos == pytest.approx(n.g_pos, rel=1e-5)
    for (name, p), q in zip(a.net.state_dict().items(), b.net.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)
    torch.testing.assert_close(a.net.label_goodness(x), b.net.label_goodness(x), rtol=1e-4, atol=1e-6)
    assert all(p.grad is None for p in a.net.parameters()) or not frugal  # factors: never a whole gradient


def test_column_factors_build_the_dense_gradient() -> None:
    """Two column ranges recorded as factors (the image's and the label code's) give ``G.T @ [X | C]``."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(30, 20)
    x, c, g = torch.randn(8, 18), torch.randn(8, 12), torch.randn(8, 20)
    sink = factored.Factors(lin.weight)
    sink.add(g, x, slice(0, 18))
    sink.add(g, c, slice(18, 30))
    dense = g.t() @ torch.cat([x, c], 1)  # (20, 30)
    torch.testing.assert_close(torch.cat([sink.rows(r, r + 7) for r in range(0, 20, 7)]), dense)


@pytest.mark.parametrize(("change", "splits"), [
    ({}, True),
    ({"label": "overlay"}, True),
    ({"label": "channel"}, False),  # mixed into a convolution's input at every position
    ({"label_learned": True}, False),  # the code learns through the layer's input gradient
    ({"layers": (LayerSpec("linear", 32, norm="layer"),)}, False),  # a layer norm centres the whole row
    ({"layers": (LayerSpec("linear", 32, norm="batch"),)}, False),
    ({"layers": (LayerSpec("linear", 32, norm="none"),)}, True),
    ({"layers": (LayerSpec("conv", 8),)}, False),
])
def test_which_first_layers_split(change: dict, splits: bool) -> None:
    cfg = replace(ModelConfig(layers=(LayerSpec("linear", 32, norm="length"),), label="icp"), **change)
    assert labelled.applies(cfg) is splits
    if cfg.label != "channel" and not cfg.label_learned:
        enc = make_encoder(cfg.label, 10, (1, 28, 28), torch.Generator().manual_seed(0))
        assert enc.split(torch.zeros(2, 1, 28, 28)) is not None
