"""A training run as ``edgeff train`` runs it: a preset on a data set, checked up front, resumable,
checkpointed along the way, evaluated at the end. The CLI only parses options and draws progress.

    run = Run(RunOptions(preset="symba-mlp", data="mnist", data_dir=Path("../shared/data")))
    run.train(on_step=lambda metrics, n: ...)   # periodic checkpoints; resumes where ``--resume`` left off
    result = run.finish()                        # final checkpoint + test accuracy (per layer where defined)
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from edgeff import checkpoint
from edgeff.config import TrainConfig
from edgeff.contract import LearnerBase
from edgeff.errors import InputError
from edgeff.evaluation import EvalResult, evaluate
from edgeff.files import check_output
from edgeff.inputs import resolve_device
from edgeff.loop import READOUT_BATCH, train_epochs
from edgeff.optim import STATE_DTYPES
from edgeff.presets import (
    Preset,
    for_data,
    get_preset,
    make_learner,
    stream_line,
    stream_preset,
    stream_train,
    twin_train,
    without_unread_lda,
)

CHECKPOINT_SECONDS = 300.0  # a run saves its checkpoint this often by default


@dataclass(frozen=True)
class RunOptions:
    """What a user chooses for a run; ``None`` means the preset's value."""

    preset: str = "symba-mlp"
    data: str = "builtin"  # a data set's name, or a folder with one sub-folder of images per class
    data_dir: Path | None = None
    epochs: int | None = None
    samples: int | None = None  # training samples per pass
    batch_size: int | None = None
    lr: float | None = None
    schedule: str | None = None
    seed: int | None = None  # the preset's (0 for every preset)
    device: str = "auto"
    backprop: bool = False
    out: Path | None = None  # default runs/PRESET.pt
    resume: bool = False
    optim_state: str = "float32"
    lazy: bool = False  # IDX files read from disk batch by batch (unpacked once into cache_dir), same order
    cache_dir: Path | None = None  # where --lazy unpacks .gz files [default: ~/.cache/edgeff]
    frugal: bool = True
    chunk: int | None = None  # frugal step: pairs per chunk [default: the preset's]
    views: int | None = None
    crop_padding: int | None = None
    hflip: bool | None = None
    lr_epochs: int | None = None  # the lr decay's horizon
    window: int | None = None  # stream window (TrainConfig.window) [default: the preset's, its stream recipe's at batch 1]
    predictor: str | None = None  # goodness family: goodness, head or lda (TrainConfig.predictor)
    eval_layers: str | None = None  # the layers the predictor reads (TrainConfig.eval_layers)
    shrinkage: float | None = None  # an lda readout's ridge (ModelConfig.shrinkage) [default: the preset's]
    readout_size: int | None = None  # an lda readout's conv maps pooled to about N×N (TrainConfig.readout_size)
    checkpoint_every: int | None = None  # samples; None: every CHECKPOINT_SECONDS; 0: only at the end


def check_options(o: RunOptions, path: Path) -> None:
    """Every option mistake, found before any work starts (``InputError``, one line each)."""
    if o.lr is not None and not (math.isfinite(o.lr) and o.lr > 0):
        raise InputError(f"--lr must be a positive finite number, got {o.lr}")
    for opt, v in (("--epochs", o.epochs), ("--lr-epochs", o.lr_epochs), ("--samples", o.samples),
                   ("--batch-size", o.batch_size)):
        if v is not None and v < 1:
            raise InputError(f"{opt} must be at least 1, got {v}")
    if o.checkpoint_every is not None and o.checkpoint_every < 0:
        raise InputError(f"--checkpoint-every must be 0 (only at the end) or a number of samples, got {o.checkpoint_every}")
    if o.window is not None and o.window < 0:
        raise InputError(f"--window must be 0 (off) or a number of samples, got {o.window}")
    if o.chunk is not None and o.chunk < 0:
        raise InputError(f"--chunk must be 0 (the whole batch) or a number of pairs, got {o.chunk}")
    if o.shrinkage is not None and not (math.isfinite(o.shrinkage) and o.shrinkage >= 0):
        raise InputError(f"--shrinkage must be a finite number >= 0, got {o.shrinkage}")
    if o.shrinkage is not None and o.resume and path.is_file():
        raise InputError("--shrinkage sets a new model's readout; a resumed run keeps the one it was saved with")
    if o.optim_state not in STATE_DTYPES:
        raise InputError(f"--optim-state must be {', '.join(STATE_DTYPES)}, got {o.optim_state!r}")
    resolve_device(o.device)  # unknown or unavailable device
    check_output(path, (".pt", ".pth", ".ckpt"))


def train_config(p: Preset, o: RunOptions) -> TrainConfig:
    """The preset's train config with the user's choices; ``epochs`` is the planned run (the lr horizon)."""
    chosen: dict[str, Any] = {"batch_size": o.batch_size, "lr": o.lr, "schedule": o.schedule, "views": o.views,
                              "crop_padding": o.crop_padding, "hflip": o.hflip, "window": o.window,
                              "predictor": o.predictor, "eval_layers": o.eval_layers, "readout_size": o.readout_size}
    chosen = {k: v for k, v in chosen.items() if v is not None}
    if o.chunk is not None:
        chosen["chunk"] = o.chunk
    seed = p.train.seed if o.seed is None else o.seed
    tc = replace(p.train, seed=seed, device=o.device, optim_state_dtype=o.optim_state, frugal=o.frugal, **chosen)
    tc = stream_train(p, tc, chosen)  # batch 1: the stream recipe where the user chose nothing
    _, tc = without_unread_lda(p, tc, chosen)  # another predictor than the recipe's lda readout
    if o.backprop:
        tc = twin_train(p, tc, chosen)  # the backprop twin's own recipe where the preset has one
    return replace(tc, epochs=o.lr_epochs or (o.epochs or tc.epochs))


class Run:
    """A run, set up: options checked, data loaded, the learner built or resumed (see the module docstring)."""

    def __init__(self, o: RunOptions) -> None:
        from edgeff.data import load_data

        self.options = o
        p = for_data(get_preset(o.preset), o.data)  # its measured recipe for a named data set
        self.name = f"{o.preset}{'-bp' if o.backprop and p.algorithm != 'bp' else ''}"
        self.path = o.out or Path("runs") / f"{self.name}.pt"
        check_options(o, self.path)
        self.data = load_data(o.data, o.data_dir, input_shape=p.model.input_shape, lazy=o.lazy, cache_dir=o.cache_dir)
        tc = train_config(p, o)
        self.epochs = o.epochs or p.train.epochs
        self.resumed = o.resume and self.path.is_file()
        self.learner: LearnerBase
        self.model_changes: dict[str, Any] = {}  # the stream recipe's changes to the preset's model
        if self.resumed:
            self.learner = self._resume(p)
        else:
            classes = tuple(self.data.classes)  # the data set's class names travel with the model
            streaming = stream_preset(p, tc.batch_size)  # batch 1: the stream recipe's model
            self.model_changes = {} if streaming is p else dict(p.stream_model)
            p, _ = without_unread_lda(streaming, tc, ["shrinkage"] if o.shrinkage is not None else [])
            shrinkage = p.model.shrinkage if o.shrinkage is None else o.shrinkage  # refused where nothing reads it
            p = replace(p, model=replace(p.model, input_shape=self.data.input_shape, num_classes=len(classes),
                                         class_names=classes, shrinkage=shrinkage))
            self.learner = make_learner(p, train=tc, backprop=o.backprop)
        o = self.options
        n = len(self.data.y_train)
        self.per_epoch = min(o.samples, n) if o.samples else n
        self.total = self.per_epoch * self.epochs
        self.meta: dict[str, Any] = {"dataset": self.data.name, "classes": list(self.data.classes),
                                     "mean": list(self.data.mean), "std": list(self.data.std), "preset": o.preset,
                                     "samples_per_epoch": self.per_epoch}
        self.seconds = 0.0
        self.trained = 0  # samples learned by train()
        self.readied: str | None = None

    def _resume(self, p: Preset) -> LearnerBase:
        o = self.options
        learner, old = checkpoint.load(self.path, device=o.device)
        bp = o.backprop or p.algorithm == "bp"
        if old.get("preset") not in (None, o.preset) or (learner.kind == "bp") != bp:
            raise InputError(f"{self.path} holds a {old.get('preset')}{' backprop' if learner.kind == 'bp' else ''} "
                             f"model, not {self.name}; pass --preset {old.get('preset')} or another --out")
        if old.get("dataset") not in (None, self.data.name):
            raise InputError(f"{self.path} was trained on {old.get('dataset')}, not {self.data.name}; pass --data "
                             f"{old.get('dataset')} or another --out")
        if o.lr_epochs is not None:
            learner.train_cfg = replace(learner.train_cfg, epochs=o.lr_epochs)
        saved = old.get("samples_per_epoch")
        if o.samples is None and isinstance(saved, int) and 0 < saved < len(self.data.y_train):
            self.options = replace(o, samples=saved)  # the saved run's passes, not a full one, unless --samples says
        return learner

    @property
    def seed(self) -> int:
        """The data order's seed: the user's, else the model's (a resumed run keeps its own)."""
        return self.learner.train_cfg.seed if self.options.seed is None else self.options.seed

    def stream_note(self) -> str | None:
        """How a batch-1 run streams (the recipe's or the user's settings), for the user; None otherwise."""
        tc = self.learner.train_cfg
        if tc.batch_size != 1 or self.resumed:
            return None
        return stream_line(tc, self.model_changes, closed_form="lr" in type(self.learner).core_unused)

    def resume_note(self) -> str:
        """What resuming means for this run, for people."""
        planned = self.learner.train_cfg.epochs
        later = self.epochs > planned and self.learner.train_cfg.lr_final is not None
        return (f"resuming {self.path} at {self.learner.samples_seen} samples (lr schedule planned over {planned} "
                f"epoch{'s' if planned != 1 else ''}{'; later epochs stay at the final lr' if later else ''})")

    def train(self, on_step: Callable[[Any, int], None] | None = None) -> None:
        """Train the planned epochs (from where a resumed run stopped), saving the checkpoint every
        ``checkpoint_every`` samples or every ``CHECKPOINT_SECONDS``; ``on_step(metrics, n)`` after each step."""
        o, learner = self.options, self.learner
        t0, before = time.perf_counter(), learner.samples_seen
        saved = [learner.samples_seen, t0]  # the last periodic checkpoint: samples and time

        def step(m: Any, n: int) -> None:
            if on_step is not None:
                on_step(m, n)
            now = time.perf_counter()
            due = (learner.samples_seen - saved[0] >= o.checkpoint_every if o.checkpoint_every
                   else o.checkpoint_every is None and now - saved[1] >= CHECKPOINT_SECONDS)
            if due:  # a kill now loses at most this much work; --resume continues from it
                checkpoint.save(learner, self.path, meta=self.meta)
                saved[:] = [learner.samples_seen, time.perf_counter()]

        # --lazy: the same loop over the same batches, the images read from disk batch by batch
        train_epochs(learner, self.data, epochs=self.epochs, batch_size=learner.train_cfg.batch_size, seed=self.seed,
                     limit=o.samples, on_step=step)
        self.seconds += time.perf_counter() - t0
        self.trained += learner.samples_seen - before

    def finish(self, on_batch: Callable[[int], None] | None = None) -> EvalResult:
        """Save the checkpoint and evaluate on the full test set (``on_batch(n)`` after each test batch). A run
        that stops before its plan is complete is saved as it is (to resume), then readied to predict where that
        needs no data (``readied`` says how, or is None)."""
        checkpoint.save(self.learner, self.path, meta=self.meta)
        o = self.options
        self.readied = self.learner.ready_to_predict(
            lambda: self.data.train_batches(READOUT_BATCH, seed=self.seed, limit=o.samples))
        return evaluate(self.learner, self.data.test_batches(500), per_layer=True, on_batch=on_batch)


__all__ = ["CHECKPOINT_SECONDS", "Run", "RunOptions", "check_options", "train_config"]
