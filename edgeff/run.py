"""A training run as ``edgeff train`` runs it: a preset on a data set, checked up front, resumable,
checkpointed along the way, evaluated at the end. The CLI only parses options and draws progress.

    run = Run(RunOptions(preset="symba-mlp", data="mnist", data_dir=Path("../shared/data")))
    run.train(on_step=lambda metrics, n: ...)   # periodic checkpoints; resumes where ``--resume`` left off
    result = run.finish()                        # final checkpoint + test accuracy (per layer where defined)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from edgeff import checkpoint
from edgeff.contract import LearnerBase
from edgeff.errors import InputError
from edgeff.evaluation import EvalResult, evaluate
from edgeff.files import check_output
from edgeff.inputs import resolve_device
from edgeff.loop import READOUT_BATCH, train_epochs
from edgeff.optim import STATE_DTYPES
from edgeff.presets import Preset, for_data, get_preset, make_learner, stream_line
from edgeff.spec import RunOptions, recipe, train_config
from edgeff.spec import check_options as check_run_options

CHECKPOINT_SECONDS = 300.0  # a run saves its checkpoint this often by default


def check_options(o: RunOptions, path: Path) -> None:
    """Every option mistake, found before any work starts (``InputError``, one line each): the checks both
    runtimes share (``edgeff.spec.check_options``), the optimizer state's dtype and the device."""
    check_run_options(o, path, "torch")
    if o.optim_state not in STATE_DTYPES:
        raise InputError(f"--optim-state must be {', '.join(STATE_DTYPES)}, got {o.optim_state!r}")
    resolve_device(o.device)  # unknown or unavailable device
    check_output(path, (".pt", ".pth", ".ckpt"))


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
        r = recipe(p, o, "torch")
        self.epochs = o.epochs or p.train.epochs
        self.resumed = o.resume and self.path.is_file()
        self.learner: LearnerBase
        self.model_changes: dict[str, Any] = {}  # the stream recipe's changes to the preset's model
        if self.resumed:
            self.learner = self._resume(p)
        else:
            classes = tuple(self.data.classes)  # the data set's class names travel with the model
            self.model_changes = r.model_changes
            p = replace(r.preset, model=replace(r.preset.model, input_shape=self.data.input_shape,
                                                num_classes=len(classes), class_names=classes))
            self.learner = make_learner(p, train=r.train, backprop=o.backprop)
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


__all__ = ["CHECKPOINT_SECONDS", "Run", "RunOptions", "check_options", "train_config"]  # RunOptions, train_config:
# edgeff.spec's, re-exported
