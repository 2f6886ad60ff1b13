"""The learner contract, checked over every preset and its backprop twin (river's ``check_estimator`` is
the model): the verbs and their shapes, determinism under a seed, the checkpoint round trip, ONNX
parity, class addition, refused bad input with the state untouched, and every config field either
honoured or refused."""

from __future__ import annotations

import copy
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from edgeff import checkpoint
from edgeff.config import ModelConfig, TrainConfig
from edgeff.contract import CORE_MODEL, LearnerBase, build, families, family_of, train_read
from edgeff.errors import InputError, UnsupportedError
from edgeff.loop import LayerMetrics
from edgeff.presets import PRESETS

CASES = [(name, bp) for name, p in PRESETS.items() for bp in ((False, True) if p.algorithm == "local" else (True,))]
IDS = [f"{n}{'-bp' if bp else ''}" for n, bp in CASES]
B = 6


def make(name: str, backprop: bool, **train: Any) -> LearnerBase:
    p = PRESETS[name]
    return build(p.model, replace(p.train, device="cpu", **train), backprop=backprop)


def batch(learner: LearnerBase, seed: int = 0, n: int = B) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *learner.model_cfg.input_shape, generator=g)
    return x, torch.arange(n) % learner.model_cfg.num_classes


def state_tensors(learner: LearnerBase) -> dict[str, torch.Tensor]:
    """Every tensor of the learner's checkpoint state, flattened to names."""
    out: dict[str, torch.Tensor] = {}

    def walk(prefix: str, v: Any) -> None:
        if isinstance(v, torch.Tensor):
            out[prefix] = v.detach().clone()
        elif isinstance(v, dict):
            for k, w in v.items():
                walk(f"{prefix}.{k}", w)
        elif isinstance(v, list | tuple):
            for k, w in enumerate(v):
                walk(f"{prefix}.{k}", w)

    walk("", learner.state())
    return out


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(("name", "backprop"), CASES, ids=IDS)
def test_the_contract(name: str, backprop: bool, tmp_path: Path) -> None:
    """One learner per case through every verb (rebuilding per check would take minutes over 26 cases)."""
    a, b = make(name, backprop), make(name, backprop)
    assert type(a) is family_of(a.model_cfg, backprop=backprop)
    x, y = batch(a)
    k = a.model_cfg.num_classes
    # ---- verbs and shapes
    for learner in (a, b):
        m = learner.learn_many(x, y)
        assert isinstance(m, list) and m and all(isinstance(r, LayerMetrics) for r in m)
        assert all(isinstance(r, LayerMetrics) for r in learner.learn_one(x[0], int(y[0])))
    assert a.step == 2 and a.samples_seen == B + 1
    for learner in (a, b):  # the plan ends: a family that waits for more samples (kmeans layers: fit_samples)
        learner.end_of_plan(lambda: iter([(x, y)]))  # or solves a readout from a pass (trifecta-cnn's lda) does
    s = a.scores(x)
    assert s.shape == (B, k) and torch.isfinite(s).all()
    p = a.predict_many(x)
    assert p.shape == (B,) and p.dtype == torch.long and int(p.min()) >= 0 and int(p.max()) < k
    assert a.predict_one(x[0]) == int(p[0])
    assert a.class_names == tuple(str(i) for i in range(k))
    if a.supports("layer_predictions"):
        lp = a.layer_predictions(x)
        assert lp.shape[0] == B and lp.dim() == 2
    else:
        with pytest.raises(UnsupportedError):
            a.layer_predictions(x)
    # ---- the same seed and the same batches: the same state, bit for bit
    assert same_state(state_tensors(a), state_tensors(b))
    assert torch.equal(a.scores(x), b.scores(x))
    # ---- checkpoint round trip: the loaded learner continues exactly as the original
    path = checkpoint.save(a, tmp_path / "m.pt", meta={"preset": name})
    c, meta = checkpoint.load(path, device="cpu")
    assert type(c) is type(a) and meta["preset"] == name and same_state(state_tensors(a), state_tensors(c))
    x2, y2 = batch(a, seed=1)
    a.learn_many(x2, y2)
    c.learn_many(x2, y2)
    assert same_state(state_tensors(a), state_tensors(c))
    # ---- ONNX export: onnxruntime scores as the learner does
    from edgeff.exporters.onnx import export_onnx
    from edgeff.exporters.runtime import OnnxPredictor

    ort = OnnxPredictor(export_onnx(a, tmp_path / "m.onnx", meta={"preset": name}))
    np.testing.assert_allclose(ort.scores(x.numpy()), a.scores(x).numpy(), rtol=1e-4, atol=1e-4)
    assert ort.meta["prediction"] == a.prediction_kind()
    # ---- bad input is refused and changes nothing
    kept, counters = state_tensors(a), (a.step, a.samples_seen)
    bad_x = x.clone()
    bad_x[0].view(-1)[0] = float("nan")
    for xb, yb in ((bad_x, y), (x * 1e7, y), (x, y + k), (x, y[:-1]), (x[:, :, :-1], y), (x.long(), y), (x, y + 0.5)):
        with pytest.raises(InputError):
            a.learn_many(xb, yb)
    with pytest.raises(InputError):
        a.scores(bad_x)
    with pytest.raises(InputError):
        a.add_class("")
    assert same_state(kept, state_tensors(a)) and (a.step, a.samples_seen) == counters
    # ---- a new class: the old classes' scores stay until training resumes
    before = a.scores(x)
    assert a.add_class("new", x[:3]) == k
    after = a.scores(x)
    assert after.shape == (B, k + 1) and a.class_names[-1] == "new"
    moves = not backprop and (a.train_cfg.predictor in ("head", "lda") or a.model_cfg.label == "overlay")
    if not moves:  # documented exceptions: a head's neutral input averages over the classes; an overlay label
        torch.testing.assert_close(after[:, :k], before, rtol=1e-5, atol=1e-5)  # covers one more pixel
    a.learn_many(x, torch.full((B,), k))  # the new class trains
    with pytest.raises(InputError):
        a.add_class("new")  # taken


# a value other than the default for every config field a family may read (conditional fields with the
# setting that makes them matter)
ALTERNATIVE_TRAIN: dict[str, dict[str, Any]] = {
    "lr": {"lr": 0.05}, "optimizer": {"optimizer": "sgd"}, "optim_state_dtype": {"optim_state_dtype": "bfloat16"},
    "seed": {"seed": 7}, "schedule": {"schedule": "greedy"}, "greedy_steps": {"greedy_steps": 1},
    "negatives": {"negatives": "hard"}, "predictor": {"predictor": "head"}, "eval_layers": {"eval_layers": "all"},
    "readout_size": {"readout_size": 7},
    "head_lr": {"head_lr": 0.5}, "views": {"views": 2}, "crop_padding": {"crop_padding": 2}, "hflip": {"hflip": True},
    "weight_decay": {"weight_decay": 0.5},
}
# a field that matters only with another setting is compared under that setting
CONDITION = {"greedy_steps": {"schedule": "greedy"}, "head_lr": {"predictor": "head"}}
# fields that change how a step is computed or when, not what it computes (their exactness and memory are
# tested in test_trainer.py / test_memory.py) or that only the training loop reads
NOT_OBSERVABLE_IN_TWO_STEPS = {"frugal", "chunk", "device", "batch_size", "epochs", "lr_final", "lr_hold",
                               "window",  # window: the loop's (test_window.py)
                               "readout_memory",  # forgets a block of 64 samples at a time (test_readout.py)
                               "readout_window"}  # read when the plan is complete (test_readout.py)


def _observed(learner: LearnerBase, x: torch.Tensor, y: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    for _ in range(2):
        learner.learn_many(x, y)
    return state_tensors(learner), learner.scores(x)


@pytest.mark.parametrize("kind", ["local", "contrastive", "mirror", "bp", "analytic"])
def test_every_config_field_is_honoured_or_refused(kind: str) -> None:
    cls = families()[kind]
    name = {"local": "symba-mlp", "contrastive": "cfl-mlp-stream", "mirror": "ffcl-mirror", "bp": "bp-mlp",
            "analytic": "slda-conv"}[kind]
    p = PRESETS[name]
    model, train = p.model, replace(p.train, device="cpu")
    base_learner = cls(model, train)
    x, y = batch(base_learner, n=8)
    base = _observed(base_learner, x, y)
    for f in fields(TrainConfig):
        if f.name in NOT_OBSERVABLE_IN_TWO_STEPS:
            continue
        cond = replace(train, **CONDITION.get(f.name, {}))
        try:
            reference = base if f.name not in CONDITION else _observed(cls(model, cond), x, y)
        except InputError:  # the condition itself is refused (the family has no such setting)
            reference, cond = base, train
        change = ALTERNATIVE_TRAIN[f.name]
        if f.name not in train_read(cls, model, cond):
            with pytest.raises(InputError, match=f.name):
                cls(model, replace(cond, **change))
            continue
        if all(getattr(cond, k) == v for k, v in change.items()):
            continue  # the preset already uses the alternative
        state, scores = _observed(cls(model, replace(cond, **change)), x, y)
        assert not (same_state(state, reference[0]) and torch.equal(scores, reference[1])), f"{kind} ignores {f.name}"
    other = {bool: lambda v: not v, int: lambda v: v + 1, float: lambda v: v + 0.25, str: lambda v: v + "x",
             tuple: lambda v: (*v, 1.0)}
    for f in fields(ModelConfig):
        if f.name not in CORE_MODEL | cls.reads(model, train)[1] and f.name != "label":
            value = getattr(model, f.name)
            with pytest.raises(InputError, match=f.name):
                cls(replace(model, **{f.name: other[type(value)](value)}), train)


def test_bf16_optimizer_state_is_kept_by_every_local_family() -> None:
    """The bug the contract test was asked to catch: a family that drops ``optim_state_dtype``."""
    for name in ("symba-mlp", "cfl-mlp-stream", "ffcl-mirror"):
        a = make(name, False, optim_state_dtype="bfloat16")
        x, y = batch(a)
        a.learn_many(x, y)
        moments = [v for k, v in state_tensors(a).items() if "exp_avg" in k]
        assert moments and all(v.dtype == torch.bfloat16 for v in moments), name


def test_the_twin_takes_only_the_fields_it_reads() -> None:
    p = PRESETS["trifecta-cnn"]  # schedule olu, a learned label channel: nothing the backprop net reads
    twin = build(p.model, replace(p.train, device="cpu"), backprop=True)
    assert twin.kind == "bp" and twin.train_cfg.schedule == "all" and twin.train_cfg.lr == p.train.lr
    with pytest.raises(InputError, match="schedule"):
        type(twin)(p.model, p.train)
    copy.deepcopy(twin)  # plain objects: copyable


def test_a_presets_backprop_twin_keeps_its_own_recipe(tmp_path) -> None:
    """trifecta-cnn's local layers learn at lr 1e-2; its backprop twin at the 1e-3 it was measured with, through
    the CLI too, unless the user sets --lr; other presets' twins share the preset's lr; a stream's twin the
    stream recipe's."""
    from edgeff.cli.app import app
    from typer.testing import CliRunner

    from edgeff.checkpoint import load
    from edgeff.presets import twin_train

    p = PRESETS["trifecta-cnn"]
    assert p.train.lr == 1e-2 and twin_train(p, p.train).lr == 1e-3 and twin_train(p, p.train, {"lr"}).lr == 1e-2
    assert twin_train(p, replace(p.train, batch_size=1)).lr == 1e-2  # batch 1: stream_train's business
    assert all(twin_train(q, q.train) == q.train for q in PRESETS.values() if not q.backprop)
    base = ["train", "--preset", "trifecta-cnn", "--backprop", "--samples", "40", "--batch-size", "20", "--epochs", "1",
            "--device", "cpu", "--no-progress"]
    for extra, lr in (([], 1e-3), (["--lr", "0.005"], 5e-3)):
        res = CliRunner().invoke(app, [*base, *extra, "--out", str(tmp_path / f"{lr}.pt")])
        assert res.exit_code == 0, res.output
        learner, _ = load(tmp_path / f"{lr}.pt", device="cpu")
        assert learner.kind == "bp" and learner.train_cfg.lr == lr


def test_every_preset_and_its_twin_build_with_the_stream_recipe() -> None:
    """At batch 1 each learner gets the part of the stream recipe its family reads (none of it refused), its
    model the recipe's changes."""
    from edgeff.presets import STREAM_RECIPE, stream_preset, stream_train

    for name, p in PRESETS.items():
        at_one = replace(p.train, batch_size=1, device="cpu")
        if p.algorithm == "local":
            build(stream_preset(p, 1).model, stream_train(p, at_one))
        twin = stream_train(p, at_one, backprop=True)  # the same stream: the preset's recipe, lr and window
        recipe = {**STREAM_RECIPE, **p.stream}
        assert (twin.lr, twin.window) == (recipe["lr"], recipe["window"]) == (1e-4, 0 if name == "trifecta-cnn" else 8), name
        build(p.model, twin, backprop=True)
