"""A whole edge training run as a library call (what ``edgeff-edge train`` does): build or resume a
learner, stream a data set through it, evaluate, save atomically."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from edgeff.edge.data import EdgeData, load_edge_data
from edgeff.edge.learner import EdgeLearner, evaluate, make_edge_learner
from edgeff.edge.limits import check_fits
from edgeff.edge.plan import still_needed
from edgeff.edge.store import load, save
from edgeff.errors import CheckpointError, InputError
from edgeff.files import check_output
from edgeff.loop import train_epochs


@dataclass(frozen=True)
class RunResult:
    learner: EdgeLearner
    data: EdgeData
    path: Path
    test: dict[str, Any]  # accuracy, samples, layer_accuracy
    resumed_from: int  # samples the learner had seen before this run
    readied: str | None = None  # how a model stopped before its plan was complete was readied to predict
    seconds: float = 0.0  # wall seconds of the training steps (the plan's end included: a readout solve)
    trained: int = 0  # samples learned in this run


def train_run(
    *,
    preset: str = "symba-mlp",
    data: str = "builtin",
    data_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    out: str | Path | None = None,
    resume: bool = False,
    epochs: int | None = None,
    batch_size: int | None = None,
    samples: int | None = None,
    overrides: dict[str, Any] | None = None,
    shrinkage: float | None = None,
    on_step: Callable[[object, int], None] | None = None,
    on_start: Callable[[EdgeLearner, int], None] | None = None,
) -> RunResult:
    """Train ``preset`` on ``data`` with the numpy runtime and save it to ``out`` (``runs/PRESET.npz``).

    With ``resume`` and an existing ``out`` the run continues from it (same preset required) up to
    ``epochs`` passes in all. ``overrides`` replaces a new model's train-config fields (lr, schedule, seed,
    views, window, predictor, ...); ``shrinkage`` its lda readout's ridge (refused on a resumed run).
    ``on_start(learner, total_samples)`` is called before the first step (progress bars).
    """
    path = check_output(Path(out) if out is not None else Path("runs") / f"{preset}.npz", (".npz",))
    ds = load_edge_data(data, data_dir, cache_dir=cache_dir)
    if shrinkage is not None and not (math.isfinite(shrinkage) and shrinkage >= 0):
        raise InputError(f"--shrinkage must be a finite number >= 0, got {shrinkage}")
    if resume and path.is_file():
        if shrinkage is not None:
            raise InputError("--shrinkage sets a new model's readout; a resumed run keeps the one it was saved with")
        learner, meta = load(path)
        if meta.get("preset") not in (None, preset):
            raise CheckpointError(f"{path} holds a {meta.get('preset')} model, not {preset}; pass --preset "
                                  f"{meta.get('preset')} or another --out")
        if meta.get("data") not in (None, data):
            raise CheckpointError(f"{path} was trained on {meta.get('data')}, not {data}")
        saved = meta.get("samples_per_epoch")
        if samples is None and isinstance(saved, int) and 0 < saved < len(ds.y_train):
            samples = saved  # the saved run's passes, not a full one, unless --samples says
    else:
        from edgeff.presets import for_data, get_preset, stream_preset, stream_train, without_unread_lda

        p = for_data(get_preset(preset), data)  # its measured recipe for a named data set
        train = replace(p.train, **{**(overrides or {}), **({"batch_size": batch_size} if batch_size else {})})
        train = stream_train(p, train, overrides or {})  # batch 1: the stream recipe where not overridden
        if epochs is not None and "epochs" not in (overrides or {}):
            train = replace(train, epochs=epochs)  # the planned run: the lr schedule's horizon
        p = stream_preset(p, train.batch_size)  # batch 1: the stream recipe's model
        p, train = without_unread_lda(p, train, overrides or {})  # another predictor than the recipe's lda
        if shrinkage is not None:
            if train.predictor != "lda":
                raise InputError(f"--shrinkage is the lda readout's ridge; the {train.predictor} predictor does not "
                                 "use it (add --predictor lda)")
            p = replace(p, model=replace(p.model, shrinkage=shrinkage))
        learner = make_edge_learner(p, input_shape=ds.input_shape, num_classes=len(ds.classes), train=train)
        learner.model_cfg = replace(learner.model_cfg, class_names=tuple(ds.classes))
    n_epochs = epochs if epochs is not None else learner.train_cfg.epochs
    bs = batch_size if batch_size is not None else learner.train_cfg.batch_size
    if bs < 1 or n_epochs < 1:
        raise InputError("batch size and epochs must be at least 1")
    per_epoch = min(samples, len(ds.y_train)) if samples is not None else len(ds.y_train)
    before = learner.samples_seen
    check_fits(still_needed(learner, bs), f"training {preset} at batch {bs}")  # before any work
    if on_start is not None:
        on_start(learner, max(0, per_epoch * n_epochs - before))
    t0 = time.perf_counter()
    train_epochs(learner, ds, epochs=n_epochs, batch_size=bs, seed=learner.train_cfg.seed, limit=samples,
                 on_step=on_step)
    seconds = time.perf_counter() - t0
    # a plan not complete yet: an lda readout is solved from its window to test (the end of the plan solves
    # it again, from scratch, from the window it has then)
    readied = learner.ready_to_predict(lambda: ds.train_batches(500, seed=learner.train_cfg.seed, limit=samples))
    test = evaluate(learner, ds.test_batches(200), per_layer=True)
    save(learner, path, meta={"preset": preset, "data": data, "test_accuracy": test["accuracy"], "samples_per_epoch": per_epoch,
                              "mean": list(ds.mean), "std": list(ds.std), "classes": list(ds.classes)})
    return RunResult(learner, ds, path, test, before, readied, seconds, learner.samples_seen - before)
