"""The numpy runtime's first layer over a labelled input's split (``edgeff.edge.labelled``) against the same layer
run on the encoded rows (image and label code side by side), its other path: outputs, weight and bias gradients,
and a prediction's scores over every label."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from edgeff import get_preset
from edgeff.config import LayerSpec
from edgeff.edge.labelled import applies
from edgeff.edge.learner import EdgeLearner


def _learner(name: str, norm: str | None) -> EdgeLearner:
    p = get_preset(name)
    model = p.model if norm is None else replace(p.model, layers=(replace(p.model.layers[0], norm=norm),
                                                                  *p.model.layers[1:]))
    return EdgeLearner(model, replace(p.train, batch_size=6, window=0))


@pytest.mark.parametrize(("name", "norm"), [("ff-mlp", None), ("symba-mlp", None), ("symba-mlp", "none")])
def test_split_first_layer_equals_the_encoded_rows(name: str, norm: str | None) -> None:
    e = _learner(name, norm)
    assert applies(e.model_cfg)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 1, 28, 28)).astype(np.float32)
    y, y_neg = rng.integers(0, 10, 6), rng.integers(0, 10, 6)
    labels = np.concatenate([y, y_neg])
    layer, first = e.layers[0], e._split_first()
    assert first is not None
    dy = rng.standard_normal((12, layer.ops[2].params["bias"].size)).astype(np.float32)

    ref = layer.forward(np.concatenate([e._encode(x, y), e._encode(x, y_neg)]), train=True)
    layer.backward(dy, need_input_grad=False)
    gw, gb = layer.ops[2].grads["weight"].full(), layer.ops[2].grads["bias"]
    layer.clear()
    out = first.forward(e._split(x), labels, lambda t: np.concatenate([t, t]), train=True)
    first.backward(dy, lambda d: d[:6] + d[6:])
    sw, sb = layer.ops[2].grads["weight"], layer.ops[2].grads["bias"]

    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sw.full(), gw, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.concatenate([sw.rows(r, r + 7) for r in range(0, gw.shape[0], 7)]),
                               gw.reshape(-1), rtol=1e-5, atol=1e-4)  # the optimizer's blocks of rows
    np.testing.assert_allclose(sb, gb, rtol=1e-6, atol=1e-6)


def test_prediction_scores_equal_the_encoded_rows() -> None:
    e = _learner("symba-mlp", None)
    x = np.random.default_rng(1).standard_normal((5, 1, 28, 28)).astype(np.float32)
    split = e._chunk_scores(x)
    e._split_first = lambda: None  # type: ignore[method-assign]  # every label's rows encoded and multiplied whole
    whole = e._chunk_scores(x)
    for s, w in zip(split, whole, strict=True):
        np.testing.assert_allclose(s, w, rtol=1e-5, atol=1e-6)


def test_a_first_layer_that_cannot_split_runs_the_encoded_rows() -> None:
    p = get_preset("trifecta-cnn")  # a learned label channel into a conv layer
    assert not applies(p.model)
    assert not applies(replace(p.model, label="icp", label_learned=False, layers=(LayerSpec("linear", 8, norm="layer"),)))
