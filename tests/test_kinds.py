"""A layer kind is registered once (edgeff.kinds) and both runtimes take it from there: a toy kind registered
in this test (a bias-free linear layer) trains in torch and in numpy step for step alike, is planned by the
numpy runtime's memory model, saved and loaded, checkpointed, and exported to ONNX with parity; a torch-only
kind is refused by the numpy runtime with its registered reason, and an unknown kind by both in one line."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from test_edge import _assert_same_state, _recording
from torch import nn

from edgeff import checkpoint
from edgeff.config import LayerSpec
from edgeff.data import load_data
from edgeff.edge import ops as eops
from edgeff.edge.plan import learner_plan
from edgeff.edge.store import load as load_edge
from edgeff.edge.store import planned_tensor_bytes
from edgeff.edge.store import save as save_edge
from edgeff.errors import InputError, UnsupportedError
from edgeff.interchange import to_edge
from edgeff.kinds import Cost, LayerKind, kinds, register_kind, unregister_kind
from edgeff.presets import get_preset, make_learner


# ------------------------------------------------------------------------ the toy kind, both runtimes
def torch_nobias(spec, in_shape, generator, *, relu_grad="zero", **_):  # type: ignore[no-untyped-def]
    fan_in = int(np.prod(in_shape))
    lin = nn.Linear(fan_in, spec.out, bias=False)
    nn.init.uniform_(lin.weight, -1 / fan_in**0.5, 1 / fan_in**0.5, generator=generator)
    return nn.Sequential(nn.Flatten(), lin, nn.ReLU())


class NoBiasLinear(eops.Op):
    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.params = {"weight": np.zeros((n_out, n_in), np.float32)}

    def forward(self, x: np.ndarray, train: bool) -> np.ndarray:
        self.cache = x if train else None
        return x @ self.params["weight"].T

    def backward(self, dy: np.ndarray, need_dx: bool) -> np.ndarray | None:
        self.grads = {"weight": eops.Outer(dy, self.cache, self.params["weight"].shape)}
        return dy @ self.params["weight"] if need_dx else None


def numpy_nobias(spec, in_shape, rng, *, fill=True, **_):  # type: ignore[no-untyped-def]
    fan_in = int(np.prod(in_shape))
    lin = NoBiasLinear(fan_in, spec.out)
    if fill:
        lin.params["weight"][...] = rng.uniform(-1 / fan_in**0.5, 1 / fan_in**0.5, lin.params["weight"].shape)
    return [eops.Flatten(), lin, eops.ReLU()]


TOY = LayerKind("nobias", lambda spec, shape: (spec.out,), f"{__name__}:torch_nobias", f"{__name__}:numpy_nobias",
                cost=lambda spec, shape: Cost(int(np.prod(shape)) * spec.out, spec.out))
TORCH_ONLY = LayerKind("toy-attention", lambda spec, shape: (spec.out,), f"{__name__}:torch_nobias",
                       needs_torch="'toy-attention' layers need torch (a test's kind)")


@pytest.fixture
def toy_kinds():  # type: ignore[no-untyped-def]
    register_kind(TOY)
    register_kind(TORCH_ONLY)
    yield
    unregister_kind(TOY.name)
    unregister_kind(TORCH_ONLY.name)


def _toy_preset(first: str = "nobias"):  # type: ignore[no-untyped-def]
    p = get_preset("symba-mlp")
    layers = (LayerSpec(first, 64, norm="length"), LayerSpec("linear", 32, norm="length"))
    return replace(p, model=replace(p.model, layers=layers),
                   train=replace(p.train, batch_size=16, lr_final=None, device="cpu", chunk=0))


def test_a_registered_kind_trains_alike_in_both_runtimes(toy_kinds):  # type: ignore[no-untyped-def]
    p = _toy_preset()
    t = make_learner(p)
    assert isinstance(t.net.local_layers[0].block[1], nn.Linear) and t.net.local_layers[0].block[1].bias is None
    e = to_edge(t)
    assert [type(op).__name__ for op in e.layers[0].ops] == ["Flatten", "NoBiasLinear", "ReLU"]
    _recording(t, e)
    for x, y in load_data("builtin").train_batches(16, seed=3, limit=16 * 6):
        mt, me = t.learn_many(x, y), e.learn_many(x.numpy(), y.numpy())
        np.testing.assert_allclose([m.loss for m in me], [m.loss for m in mt], rtol=1e-3, atol=1e-5)
    _assert_same_state(t, e, 1e-4)
    x, _ = next(load_data("builtin").test_batches(64))
    np.testing.assert_allclose(e.scores(x.numpy()), t.scores(x).numpy(), rtol=1e-3, atol=1e-4)


def test_a_registered_kind_is_planned_saved_checkpointed_and_exported(toy_kinds, tmp_path):  # type: ignore[no-untyped-def]
    from edgeff.exporters.onnx import OnnxPredictor, export_onnx

    p = _toy_preset()
    t = make_learner(p)
    data = load_data("builtin")
    for x, y in data.train_batches(16, seed=0, limit=64):
        t.learn_many(x, y)
    e = to_edge(t)
    # the plan counts the toy layer's weights from its registered cost (no bias: 784 x 64 values)
    assert planned_tensor_bytes(e.model_cfg) == 4 * (784 * 64 + 64 * 32 + 32)
    plan = learner_plan(e, 16)
    assert plan["resident"] >= planned_tensor_bytes(e.model_cfg)
    save_edge(e, tmp_path / "toy.npz")
    back, _ = load_edge(tmp_path / "toy.npz")
    x, _ = next(data.test_batches(32))
    np.testing.assert_array_equal(back.scores(x.numpy()), e.scores(x.numpy()))
    checkpoint.save(t, tmp_path / "toy.pt")
    t2, _ = checkpoint.load(tmp_path / "toy.pt")
    torch.testing.assert_close(t2.scores(x), t.scores(x))
    onnx_path = export_onnx(t, tmp_path / "toy.onnx")
    np.testing.assert_allclose(OnnxPredictor(onnx_path).scores(x.numpy()), t.scores(x).numpy(), rtol=1e-4, atol=1e-4)


def test_torch_only_and_unknown_kinds_are_refused_in_one_line(toy_kinds):  # type: ignore[no-untyped-def]
    from edgeff.edge import make_edge_learner

    t = make_learner(_toy_preset("toy-attention"))  # torch builds it
    with pytest.raises(UnsupportedError, match=r"^'toy-attention' layers need torch \(a test's kind\); the edge runtime "
                                               r"trains conv and linear and nobias layers$"):
        to_edge(t)
    with pytest.raises(UnsupportedError, match="'toy-attention' layers need torch"):
        make_edge_learner(_toy_preset("toy-attention"))
    for build in (make_learner, make_edge_learner):
        with pytest.raises(InputError, match="unknown layer kind 'nope'; choose one of conv, kmeans, linear, nobias"):
            build(_toy_preset("nope"))


def test_the_built_in_kinds_are_registered_with_what_each_runtime_needs():
    reg = kinds()
    assert {"linear", "conv", "vit", "kmeans"} <= set(reg)
    for k in reg.values():
        assert (k.numpy_block is None) == bool(k.needs_torch) and (k.numpy_block is None or k.cost is not None)
    with pytest.raises(ValueError, match="needs a cost"):
        register_kind(LayerKind("bad", TOY.out_shape, TOY.torch_block, TOY.numpy_block))
    assert "bad" not in kinds()
