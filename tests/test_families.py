"""Families are declared once (edgeff.families) and both runtimes read the declarations: the torch contract builds
the declared family for a loss, both runtimes refuse a setting the family does not read with the same line,
the numpy runtime refuses what only torch runs with the declared reason, and a toy family declared in this test
(a torch learner and a numpy learner, registered under one name) is accepted by the configs, built, trained,
checkpointed, converted to the numpy runtime and trained there step for step alike, with no other edit."""

from __future__ import annotations

from dataclasses import fields, replace

import pytest
import torch

from edgeff import checkpoint
from edgeff.config import ModelConfig, TrainConfig
from edgeff.contract import build, families, register
from edgeff.data import load_data
from edgeff.edge.learner import GoodnessEdge, check_supported
from edgeff.errors import InputError, UnsupportedError
from edgeff.families import Family, declaration, declared, family_for, register_family, unregister_family
from edgeff.interchange import to_edge
from edgeff.presets import PRESETS, get_preset
from edgeff.trainer import Learner


def test_every_declared_family_is_the_registered_torch_learner_of_its_kind():
    reg = families()
    for kind, d in declared().items():
        module, _, name = d.torch.partition(":")
        cls = reg[kind]
        assert (cls.__module__, cls.__name__) == (module, name) and cls.declaration is d
        assert cls.kind == d.kind and cls.losses == d.losses and cls.capabilities == d.capabilities


@pytest.mark.parametrize("preset", ["symba-mlp", "cfl-mlp", "slda-conv"])
def test_both_runtimes_refuse_an_unread_setting_with_the_same_line(preset):
    p = get_preset(preset)
    d = family_for(p.model)
    model_unread = [f for f in fields(ModelConfig) if f.name not in d.reads(p.model, p.train)[1]
                    and f.name not in {"layers", "input_shape", "num_classes", "class_names", "loss", "label",
                                       "bn_momentum", "bn_min_batch", "bn_always_running"}
                    and isinstance(f.default, float)]
    train_unread = [f for f in fields(TrainConfig) if f.name not in d.train_read(p.model, p.train)
                    and isinstance(f.default, int | float) and not isinstance(f.default, bool)]
    assert model_unread and train_unread
    cases = [(replace(p.model, **{model_unread[0].name: model_unread[0].default + 1}), p.train),
             (p.model, replace(p.train, **{train_unread[0].name: train_unread[0].default + 1}))]
    for model, train in cases:
        with pytest.raises(InputError) as torch_says:
            build(model, replace(train, device="cpu"))
        with pytest.raises(InputError) as numpy_says:
            check_supported(model, train)
        assert str(torch_says.value) == str(numpy_says.value) and "does not use" in str(torch_says.value)


def test_the_numpy_runtime_refuses_what_only_torch_runs_with_the_declared_reason():
    for p in PRESETS.values():
        if p.algorithm != "local":
            continue
        d = family_for(p.model)
        if d.numpy is None or (d.numpy_losses is not None and p.model.loss not in d.numpy_losses):
            with pytest.raises(UnsupportedError, match="need torch; the edge runtime trains goodness"):
                check_supported(p.model, p.train)
    # slda-conv with flips: torch learns each sample mirrored too; the numpy runtime used to ignore the flag
    p = get_preset("slda-conv")
    with pytest.raises(UnsupportedError, match="not also mirrored"):
        check_supported(p.model, replace(p.train, hflip=True))
    assert check_supported(p.model, p.train) == "analytic"


# ------------------------------------------------------------------------------------------ a toy family
# the toy family trains FF's loss, as the goodness family does: the model's family field, not its loss, selects it
TOY = Family("toy", "toy goodness", frozenset({"ff"}),
             train_fields=declaration("local").train_fields - {"predictor", "head_lr"},
             model_fields=frozenset({"label", "threshold"}), capabilities=frozenset({"edge_runtime"}),
             torch=f"{__name__}:ToyLearner", numpy=f"{__name__}:ToyEdge", numpy_name="goodness",
             numpy_limits=declaration("local").numpy_limits)


class ToyLearner(Learner):
    """FF's loss under another family name: the goodness learner with a declaration of its own."""

    declaration = TOY

    def __init__(self, model: ModelConfig, train: TrainConfig) -> None:
        super().__init__(replace(model, family="local"), train)  # the goodness machinery, trained with FF's loss
        self.model_cfg = model


class ToyEdge(GoodnessEdge):
    """The numpy twin: the goodness family's numpy learner, which trains any loss but symba with FF's."""


@pytest.fixture
def toy_family():  # type: ignore[no-untyped-def]
    register_family(TOY)
    register(ToyLearner)
    yield
    unregister_family(TOY.kind)
    from edgeff.contract import _REGISTRY

    _REGISTRY.pop(TOY.kind, None)


def test_a_declared_toy_family_is_built_trained_checkpointed_and_refused_by_numpy(toy_family, tmp_path):
    p = get_preset("ff-mlp")
    model = ModelConfig(layers=p.model.layers[:1], family="toy", loss="ff", label="overlay")  # accepted: declared
    assert type(build(replace(model, family=""), TrainConfig(device="cpu", chunk=0))) is Learner  # by loss: local
    with pytest.raises(InputError, match="a toy goodness learner \\(toy\\) trains ff, not loss 'symba'"):
        replace(model, loss="symba")
    train = TrainConfig(batch_size=32, epochs=1, device="cpu", chunk=0)
    learner = build(model, train)
    assert type(learner) is ToyLearner and learner.kind == "toy" and learner.family == "toy goodness"
    data = load_data("builtin")
    for x, y in data.train_batches(32, limit=128):
        learner.learn_many(x, y)
    checkpoint.save(learner, tmp_path / "toy.pt")
    again, _ = checkpoint.load(tmp_path / "toy.pt")
    x, _ = next(data.test_batches(64))
    assert type(again) is ToyLearner and torch.equal(again.scores(x), learner.scores(x))
    with pytest.raises(InputError, match=r"a toy goodness learner does not use predictor='lda'"):
        build(model, replace(train, predictor="lda"))
    with pytest.raises(InputError, match=r"a toy goodness learner does not use predictor='lda'"):
        check_supported(model, replace(train, predictor="lda"))  # the numpy runtime: the same declaration
    register_family(replace(TOY, numpy=None))  # declared torch-only: refused by the numpy runtime
    with pytest.raises(UnsupportedError, match=r"toy goodness models \(toy, loss 'ff'\) need torch"):
        check_supported(model, train)


def test_a_declared_toy_family_trains_alike_in_both_runtimes(toy_family, tmp_path):
    """The toy family's numpy learner (its declaration's numpy class) against its torch learner, step for step."""
    from test_edge import _assert_same_state, _recording

    from edgeff.edge.store import load as load_edge
    from edgeff.edge.store import save as save_edge

    p = get_preset("ff-mlp")
    model = ModelConfig(layers=p.model.layers[:2], family="toy", loss="ff", label="overlay")
    t = build(model, TrainConfig(batch_size=16, epochs=1, device="cpu", chunk=0))
    e = to_edge(t)
    assert type(e) is ToyEdge and e.family == "goodness"
    _recording(t, e)
    data = load_data("builtin")
    for x, y in data.train_batches(16, seed=3, limit=16 * 5):
        mt, me = t.learn_many(x, y), e.learn_many(x.numpy(), y.numpy())
        assert [m.loss for m in me] == pytest.approx([m.loss for m in mt], rel=1e-3, abs=1e-5)
    _assert_same_state(t, e, 1e-4)
    x, _ = next(data.test_batches(64))
    assert e.scores(x.numpy()) == pytest.approx(t.scores(x).numpy(), rel=1e-3, abs=1e-4)
    save_edge(e, tmp_path / "toy.npz")
    back, _ = load_edge(tmp_path / "toy.npz")
    assert type(back) is ToyEdge and (back.scores(x.numpy()) == e.scores(x.numpy())).all()


def test_a_loss_no_family_declares_is_refused_by_the_configs():
    with pytest.raises(InputError, match="unknown loss 'toy'; choose one of cfl, ff, lda, mirror, supcon, symba"):
        ModelConfig(layers=get_preset("ff-mlp").model.layers, loss="toy")


def test_a_config_written_before_the_family_field_takes_the_family_of_its_loss(tmp_path):
    """Checkpoints and edge files written before ModelConfig.family hold no family: reading one names the family
    declaring its loss (the one place a loss names a family), and the file then loads and predicts as before."""
    from edgeff.edge.store import load as load_edge
    from edgeff.edge.store import save as save_edge

    for name in ("symba-mlp", "cfl-mlp", "ffcl-mirror", "slda-conv"):
        cfg = get_preset(name).model
        old = {k: v for k, v in cfg.to_dict().items() if k != "family"}
        assert ModelConfig.from_dict(old) == cfg and cfg.family == family_for(cfg).kind
    learner = build(get_preset("symba-mlp").model, TrainConfig(device="cpu"))
    path = checkpoint.save(learner, tmp_path / "m.pt")
    state = torch.load(path, weights_only=True)
    state["model"].pop("family")  # as an older edgeff wrote it
    torch.save(state, path)
    again, _ = checkpoint.load(path)
    x, _ = next(load_data("builtin").test_batches(8))
    assert again.model_cfg.family == "local" and torch.equal(again.scores(x), learner.scores(x))
    e = to_edge(learner)
    save_edge(e, tmp_path / "m.npz")
    assert load_edge(tmp_path / "m.npz")[0].model_cfg.family == "local"
