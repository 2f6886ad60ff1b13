"""A whole edge training run as a library call (what ``edgeff-edge train`` does): build or resume a
learner, stream a data set through it, evaluate, save atomically."""

from __future__ import annotations

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
from edgeff.errors import CheckpointError
from edgeff.files import check_output
from edgeff.loop import train_epochs
from edgeff.spec import RunOptions, check_options


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
    options: RunOptions | None = None,
    *,
    on_step: Callable[[object, int], None] | None = None,
    on_start: Callable[[EdgeLearner, int], None] | None = None,
    **fields: Any,
) -> RunResult:
    """Train ``options.preset`` on ``options.data`` with the numpy runtime and save it to ``options.out``
    (``runs/PRESET.npz``); ``fields`` are ``RunOptions`` fields, given instead of ``options`` or over it.

    The run is built from the specification both runtimes share (``edgeff.spec``: the same checks, the same
    recipe as ``edgeff train``). With ``resume`` and an existing ``out`` the run continues from it (same preset
    required) up to ``epochs`` passes in all. ``on_start(learner, total_samples)`` is called before the first
    step (progress bars).
    """
    o = replace(options or RunOptions(), **fields)
    path = check_output(o.out if o.out is not None else Path("runs") / f"{o.preset}.npz", (".npz",))
    check_options(o, path, "edge")
    ds = load_edge_data(o.data, o.data_dir, cache_dir=o.cache_dir)
    preset, samples, epochs, batch_size = o.preset, o.samples, o.epochs, o.batch_size
    if o.resume and path.is_file():
        learner, meta = load(path)
        if meta.get("preset") not in (None, preset):
            raise CheckpointError(f"{path} holds a {meta.get('preset')} model, not {preset}; pass --preset "
                                  f"{meta.get('preset')} or another --out")
        if meta.get("data") not in (None, o.data):
            raise CheckpointError(f"{path} was trained on {meta.get('data')}, not {o.data}")
        saved = meta.get("samples_per_epoch")
        if samples is None and isinstance(saved, int) and 0 < saved < len(ds.y_train):
            samples = saved  # the saved run's passes, not a full one, unless --samples says
    else:
        from edgeff.presets import for_data, get_preset
        from edgeff.spec import recipe

        r = recipe(for_data(get_preset(preset), o.data), o, "edge")  # its measured recipe for a named data set
        learner = make_edge_learner(r.preset, input_shape=ds.input_shape, num_classes=len(ds.classes), train=r.train)
        learner.model_cfg = replace(learner.model_cfg, class_names=tuple(ds.classes))
    n_epochs = epochs if epochs is not None else learner.train_cfg.epochs
    bs = batch_size if batch_size is not None else learner.train_cfg.batch_size
    per_epoch = min(samples, len(ds.y_train)) if samples is not None else len(ds.y_train)
    before = learner.samples_seen
    check_fits(still_needed(learner, bs), f"training {preset} at batch {bs}")  # before any work
    if on_start is not None:
        on_start(learner, max(0, per_epoch * n_epochs - before))
    seed = learner.train_cfg.seed if o.seed is None else o.seed  # the data order's: a resumed run keeps its own
    t0 = time.perf_counter()
    train_epochs(learner, ds, epochs=n_epochs, batch_size=bs, seed=seed, limit=samples, on_step=on_step)
    seconds = time.perf_counter() - t0
    # a plan not complete yet: an lda readout is solved from its window to test (the end of the plan solves
    # it again, from scratch, from the window it has then)
    readied = learner.ready_to_predict(lambda: ds.train_batches(500, seed=seed, limit=samples))
    test = evaluate(learner, ds.test_batches(200), per_layer=True)
    save(learner, path, meta={"preset": preset, "data": o.data, "test_accuracy": test["accuracy"], "samples_per_epoch": per_epoch,
                              "mean": list(ds.mean), "std": list(ds.std), "classes": list(ds.classes)})
    return RunResult(learner, ds, path, test, before, readied, seconds, learner.samples_seen - before)
