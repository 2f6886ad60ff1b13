"""The device's numpy network against torch autograd on the same numbers, and its model format."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from edgeff.firmware_sim.numpy_net import ModelError, NumpyNet, init_model, pool_matrix

from edgeff.data import ImageData
from edgeff.layers import LengthNorm
from edgeff.losses import ff_loss, goodness, symba_loss


def _images(ds: ImageData, n: int, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    x = ds.x_train[offset : offset + n].reshape(n, -1)
    return x, ds.y_train[offset : offset + n].astype(np.int64)


def test_pool_matrix_matches_cfl_pooling() -> None:
    p = pool_matrix(10, 4)  # stride 2, kernel 10 - 3*2 = 4
    assert p.shape == (4, 10)
    np.testing.assert_allclose(p.sum(1), 1.0)
    assert (p[0, :4] == 0.25).all() and (p[3, 6:] == 0.25).all()
    e = torch.randn(3, 10)
    np.testing.assert_allclose(e.numpy() @ p.T, F.avg_pool1d(e[None], 4, 2)[0].numpy(), atol=1e-6)
    np.testing.assert_array_equal(pool_matrix(8, 8), np.eye(8, dtype=np.float32))
    with pytest.raises(ValueError, match="cannot pool"):
        pool_matrix(4, 8)


class TorchOracle:
    """The same network in torch: autograd computes every gradient, torch.optim steps."""

    def __init__(self, net: NumpyNet) -> None:
        self.net = net
        self.w = [torch.tensor(w, requires_grad=True) for w in net.weights]
        self.b = [torch.tensor(b, requires_grad=True) for b in net.biases]
        self.e = torch.tensor(net.embed, requires_grad=True) if net.embed is not None else None
        opt = torch.optim.Adam if net.spec["optimizer"] == "adam" else (lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9))
        self.opts = [opt([w, b], lr=net.spec["lr"]) for w, b in zip(self.w, self.b, strict=True)]
        self.e_opt = opt([self.e], lr=net.spec["lr"]) if self.e is not None else None

    def step(self, x: np.ndarray, y: np.ndarray, y_neg: np.ndarray | None, noise: list[np.ndarray] | None) -> None:
        net = self.net
        xt = torch.tensor(net.normalise_input(x))
        yt = torch.tensor(y)
        if net.rule == "goodness":
            a = torch.cat([torch.tensor(net.encode(xt.numpy(), y)), torch.tensor(net.encode(xt.numpy(), y_neg))])
        else:
            a = xt
        b = xt.shape[0]
        n = len(self.w)
        for i in range(n):
            u = LengthNorm()(a) if net.spec["layers"][i]["norm"] == "length" else a
            h = F.relu(u @ self.w[i].T + self.b[i])
            if net.rule == "goodness":
                g = goodness(h)
                if net.spec["loss"] == "symba":
                    loss = symba_loss(g[:b], g[b:], alpha=net.spec["alpha"])
                else:
                    loss = ff_loss(g[:b], g[b:], threshold=net.spec["threshold"])
            else:
                assert self.e is not None and noise is not None
                groups = net.spec["layers"][i]["groups"]
                f = h.view(b, groups, -1).mean(1)
                d = f.shape[1]
                stride = self.e.shape[1] // d
                e = self.e if i == n - 1 else self.e.detach()  # the dictionary learns from the last layer only
                ep = F.avg_pool1d(e[None], self.e.shape[1] - (d - 1) * stride, stride)[0] + torch.tensor(noise[i])
                loss = F.cross_entropy(f @ ep.T, yt)
            params = [self.w[i], self.b[i]] + ([self.e] if self.e is not None and i == n - 1 else [])
            for p in params:
                p.grad = None
            loss.backward()
            self.opts[i].step()
            if self.e_opt is not None and i == n - 1 and net.spec["embed_learned"]:
                self.e_opt.step()
            a = h.detach()


CASES = [
    ("goodness", {"loss": "symba", "label": "icp", "norm": "length"}),
    ("goodness", {"loss": "ff", "label": "overlay", "norm": "length"}),
    ("goodness", {"loss": "symba", "label": "icp", "norm": "none", "optimizer": "sgd", "lr": 0.01}),
    ("embed", {"groups": 1, "norm": "length"}),
    ("embed", {"groups": 4, "norm": "none"}),
    ("embed", {"groups": 2, "norm": "length", "optimizer": "sgd", "lr": 0.01, "embed_dim": 40}),
]


@pytest.mark.parametrize("rule,kw", CASES, ids=[f"{r}-{'-'.join(str(v) for v in k.values())}" for r, k in CASES])
def test_numpy_updates_match_torch_autograd(mnist_small: ImageData, rule: str, kw: dict) -> None:
    net = init_model(rule, [32, 24], seed=3, **kw)
    oracle = TorchOracle(net)
    rng = np.random.default_rng(0)
    for step in range(3):
        x, y = _images(mnist_small, 6, 6 * step)
        y_neg = (y + rng.integers(1, 10, 6)) % 10
        noise = [rng.normal(0, 1 / (net.layer_out(i) // net.spec["layers"][i]["groups"]),
                            (10, net.layer_out(i) // net.spec["layers"][i]["groups"])).astype(np.float32)
                 for i in range(net.n_layers)]
        net.train_step(x, y, rng, y_neg=y_neg, noise=noise)
        oracle.step(x, y, y_neg, noise)
        for i in range(net.n_layers):  # every step, every parameter, within 1e-5
            np.testing.assert_allclose(net.weights[i], oracle.w[i].detach().numpy(), atol=1e-5, rtol=0)
            np.testing.assert_allclose(net.biases[i], oracle.b[i].detach().numpy(), atol=1e-5, rtol=0)
        if net.embed is not None:
            assert oracle.e is not None
            np.testing.assert_allclose(net.embed, oracle.e.detach().numpy(), atol=1e-5, rtol=0)


def test_embeddings_learn_only_from_the_last_layer(mnist_small: ImageData) -> None:
    net = init_model("embed", [16], seed=0, embed_dim=16)
    before = net.embed.copy()  # type: ignore[union-attr]
    x, y = _images(mnist_small, 8)
    net.train_step(x, y, np.random.default_rng(0))
    assert not np.array_equal(net.embed, before)  # one layer: it is the last, so the dictionary moves
    frozen = init_model("embed", [16, 16], seed=0, embed_learned=False)
    before = frozen.embed.copy()  # type: ignore[union-attr]
    frozen.train_step(x, y, np.random.default_rng(0))
    np.testing.assert_array_equal(frozen.embed, before)


@pytest.mark.parametrize("rule", ["goodness", "embed"])
def test_save_load_round_trip_keeps_predictions_and_optimizer(mnist_small: ImageData, rule: str) -> None:
    net = init_model(rule, [24, 16], seed=1)
    x, y = _images(mnist_small, 20)
    net.train_step(x, y, np.random.default_rng(0))
    back, state = NumpyNet.from_bytes(net.to_bytes(state={"samples_seen": 20}))
    assert state == {"samples_seen": 20}
    np.testing.assert_array_equal(back.scores(x), net.scores(x))
    assert set(back.opt) == set(net.opt) and all(back.opt[k].t == net.opt[k].t for k in net.opt)
    # both continue identically
    net.train_step(x, y, np.random.default_rng(5))
    back.train_step(x, y, np.random.default_rng(5))
    np.testing.assert_array_equal(back.weights[1], net.weights[1])


@pytest.mark.parametrize("rule", ["goodness", "embed"])
def test_add_class_leaves_existing_scores_unchanged(mnist_small: ImageData, rule: str) -> None:
    net = init_model(rule, [24, 16], seed=1)
    x, y = _images(mnist_small, 30)
    net.train_step(x, y, np.random.default_rng(0))
    before = net.scores(x)
    idx = net.add_class("new", np.random.default_rng(1), x[:5] if rule == "embed" else None)
    assert idx == 10 and net.num_classes == 11
    after = net.scores(x)
    assert after.shape == (30, 11)
    np.testing.assert_allclose(after[:, :10], before, atol=1e-6)
    net.train_step(x, np.full(30, 10), np.random.default_rng(0))  # the new class trains like any other
    with pytest.raises(ModelError, match="already exists"):
        net.add_class("new", np.random.default_rng(1))


def test_bad_inputs_and_specs_are_refused(mnist_small: ImageData) -> None:
    net = init_model("embed", [8], seed=0)
    x, _ = _images(mnist_small, 4)
    with pytest.raises(ModelError, match="shape"):
        net.scores(x[:, :100])
    with pytest.raises(ModelError, match="NaN"):
        net.scores(np.full((1, 784), np.nan, np.float32))
    with pytest.raises(ModelError, match="labels"):
        net.train_step(x, np.array([0, 1, 2, 99]), np.random.default_rng(0))
    with pytest.raises(ModelError, match="not an edgeff device model"):
        NumpyNet.from_bytes(b"definitely not a model")
    with pytest.raises(ModelError, match="rule"):
        init_model("backprop", [8])


def test_memory_plan_counts_adam_state_and_grows_with_batch() -> None:
    adam = init_model("embed", [64, 32], seed=0)
    sgd = init_model("embed", [64, 32], seed=0, optimizer="sgd")
    pa, ps = adam.memory_plan(1), sgd.memory_plan(1)
    params = 4 * (784 * 64 + 64 + 64 * 32 + 32)
    assert sum(lay["params"] for lay in pa["layers"]) == params
    assert sum(lay["optimizer"] for lay in pa["layers"]) == 2 * params
    assert sum(lay["optimizer"] for lay in ps["layers"]) == params
    assert adam.memory_plan(64)["working"] > pa["working"]


def test_exported_symba_mlp_scores_like_torch(mnist_small: ImageData) -> None:
    from dataclasses import replace

    from edgeff.exporters.device import flatten_images, to_device_model

    from edgeff.layers import LayerSpec
    from edgeff.presets import get_preset, make_learner

    p = get_preset("symba-mlp")  # without peer normalisation (the device does not run it)
    p = replace(p, model=replace(p.model, layers=(LayerSpec("linear", 64, norm="length"),) * 2, peer_norm=0.0,
                                 relu_grad="zero"))
    learner = make_learner(p)
    for xb, yb in mnist_small.train_batches(50, limit=500):
        learner.learn_many(xb, yb)
    net = to_device_model(learner)
    assert set(net.opt) == {"W0", "b0", "W1", "b1"} and net.opt["W0"].t == 10
    xb, _ = next(mnist_small.test_batches(100))
    np.testing.assert_allclose(net.scores(flatten_images(xb)), learner.scores(xb).numpy(), atol=1e-5)
    # uint8 pixels with the device's own normalisation give the same predictions
    raw = mnist_small.x_test[:100].reshape(100, -1)
    assert (net.scores(raw).argmax(1) == learner.predict_many(xb).numpy()).mean() >= 0.99


def test_export_refuses_what_the_device_cannot_run() -> None:
    from dataclasses import replace

    from edgeff.exporters.device import to_device_model

    from edgeff.errors import InputError
    from edgeff.presets import PRESETS, TRIFECTA_CNN_BASE, make_learner, without_unread_lda

    with pytest.raises(InputError, match="predicts by goodness"):
        to_device_model(make_learner("trifecta-cnn"))  # its lda readout  # type: ignore[arg-type]
    p, by_goodness = without_unread_lda(PRESETS["trifecta-cnn"], replace(PRESETS["trifecta-cnn"].train,
                                                                         predictor="goodness", eval_layers="last"))
    with pytest.raises(InputError, match="peer normalisation"):
        to_device_model(make_learner(p, train=by_goodness))  # type: ignore[arg-type]
    with pytest.raises(InputError, match="label channel|Linear"):
        to_device_model(make_learner(replace(p, model=replace(TRIFECTA_CNN_BASE, shrinkage=p.model.shrinkage)),  # type: ignore[arg-type]
                                     train=by_goodness))
    with pytest.raises(InputError, match="backprop"):
        to_device_model(make_learner("bp-mlp"))  # type: ignore[arg-type]
