"""Bounded working sets in the edge runtime: a conv unfolds a few samples' patches at a time (the same values and
gradients as one whole-batch unfold), and a prediction runs as many samples at a time as its largest layer's
maps allow (the same scores whatever the chunk)."""

from __future__ import annotations

import numpy as np
import pytest

from edgeff.config import LayerSpec
from edgeff.edge import make_edge_learner, ops
from edgeff.edge.learner import INFER_BYTES, chunk_samples, infer_row_bytes
from edgeff.edge.rand import Rng


@pytest.mark.parametrize(("stride", "padding"), [(1, 0), (2, 1)])
def test_a_conv_in_chunks_equals_one_whole_batch_unfold(monkeypatch: pytest.MonkeyPatch, stride: int,
                                                        padding: int) -> None:
    spec = LayerSpec("conv", 8, kernel=3, stride=stride, padding=padding)
    (conv,) = [op for op in ops.make_block(spec, (3, 12, 12), Rng(0), bn={}) if isinstance(op, ops.Conv2d)]
    x = np.random.default_rng(0).standard_normal((7, 3, 12, 12)).astype(np.float32)

    def run() -> tuple[np.ndarray, ...]:
        y = conv.forward(x, train=True)
        dy = np.random.default_rng(1).standard_normal(y.shape).astype(np.float32)
        dx = conv.backward(dy, need_dx=True)
        return y, dx, conv.grads["weight"], conv.grads["bias"]

    whole = run()
    monkeypatch.setattr(ops, "COLS_BYTES", 1)  # one sample's patches at a time
    assert conv._step(x) == 1
    chunked = run()
    for a, b in zip(whole, chunked, strict=True):
        assert a.shape == b.shape
        assert np.abs(a - b).max() <= 1e-5 * max(float(np.abs(a).max()), 1.0)


def test_a_prediction_chunk_follows_the_largest_layer() -> None:
    conv = make_edge_learner("cfl-conv", input_shape=(3, 32, 32), num_classes=10)
    mlp = make_edge_learner("cfl-mlp", input_shape=(1, 28, 28), num_classes=10)
    c_step, m_step = conv._chunk(), mlp._chunk()
    assert c_step * infer_row_bytes(conv.model_cfg, (3, 32, 32)) <= INFER_BYTES < (c_step + 1) * infer_row_bytes(
        conv.model_cfg, (3, 32, 32))
    assert m_step == 128  # small rows: the row cap
    assert chunk_samples(conv.model_cfg, (3, 32, 32), 10) < c_step  # ten rows a sample (goodness): fewer samples
    x = np.random.default_rng(0).standard_normal((2 * c_step + 3, 3, 32, 32)).astype(np.float32)
    one_by_one = np.concatenate([conv.layer_scores(x[i : i + 1]) for i in range(x.shape[0])])
    assert np.abs(conv.layer_scores(x) - one_by_one).max() <= 1e-5
