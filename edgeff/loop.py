"""The runtime-free part of training: per-layer metrics and the one training loop with its hooks.

Torch-free, so the torch learners (``edgeff.trainer``) and the numpy edge runtime (``edgeff.edge``)
share one loop (``run_batches``), one data order, one resume rule and one learning-rate schedule; the
runners (``edgeff train``, ``edgeff-edge train``, ``edgeff learn``, ``edgeff continual``, the layer pipeline's
first stage) differ only in the batches they feed it and the hooks they pass (progress, checkpoints, replay).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Any, Protocol

import numpy as np

from edgeff.config import TrainConfig
from edgeff.errors import InputError

READOUT_BATCH = 500  # samples per forward pass of end_of_plan's pass over the training set


@dataclass(frozen=True)
class LayerMetrics:
    """What one layer did on one step."""

    loss: float
    g_pos: float  # mean goodness of the positive (true-label) samples
    g_neg: float  # mean goodness of the negative samples
    trained: bool  # whether the layer's weights were updated on this step

    @property
    def separation(self) -> float:
        return self.g_pos - self.g_neg


class LearnerLike(Protocol):
    train_cfg: TrainConfig
    samples_seen: int

    def learn_many(self, x: Any, y: Any, *, fresh: int | None = None) -> Any: ...

    def set_lr(self, lr: float) -> None: ...

    def end_of_plan(self, batches: Callable[[], Iterable[tuple[Any, Any]]]) -> None: ...


class ReplayLike(Protocol):
    """The replay hook (``edgeff.continual.ReplayBuffer``): what the loop mixes into a step and offers the stream to."""

    asymmetric: bool

    def __len__(self) -> int: ...

    def mixed(self, x: Any, y: Any) -> tuple[Any, Any]: ...

    def add(self, x: Any, y: Any) -> None: ...


class ImageDataLike(Protocol):
    @property
    def y_train(self) -> Any: ...

    def train_batches(
        self, batch_size: int, *, seed: int = 0, epoch: int = 0, limit: int | None = None, skip: int = 0
    ) -> Iterable[tuple[Any, Any]]: ...


def train_epochs(
    learner: LearnerLike,
    data: ImageDataLike,
    *,
    epochs: int,
    batch_size: int,
    seed: int = 0,
    limit: int | None = None,
    on_step: Callable[[object, int], None] | None = None,
    replay: ReplayLike | None = None,
) -> None:
    """Train for ``epochs`` passes over ``data``'s training set (the first ``limit`` shuffled samples
    of each pass when given), resuming where ``learner.samples_seen`` says it stopped.

    With ``train.window`` each step learns the new batch together with the ``window`` samples that came
    just before it in the pass (a sliding window over the stream, ``planned_batches``); the learner's
    ``samples_seen`` counts each sample once.

    When the planned run (``train.epochs`` passes) is complete, ``learner.end_of_plan`` gets the training set
    once more (a readout solved on the trained layers).

    Each epoch's order depends only on (seed, epoch), so a learner loaded from a checkpoint continues
    with exactly the batches an uninterrupted run would have seen. With ``train.lr_final`` set, the
    learning rate falls linearly from ``train.lr`` to it over ``train.epochs`` epochs (after holding ``train.lr``
    for the first ``train.lr_hold`` of them) — the *planned* run,
    stored in checkpoints — and stays at ``lr_final`` after it. A run stopped early and resumed with more
    epochs (up to the plan) is therefore the same as the longer run from the start; to extend a run past
    its plan, plan it longer from the start (``edgeff train --lr-epochs``).
    """
    run_batches(learner, planned_batches(learner.train_cfg, learner.samples_seen, data, epochs=epochs,
                                         batch_size=batch_size, seed=seed, limit=limit), on_step=on_step, replay=replay)
    per_epoch = min(limit, len(data.y_train)) if limit is not None else len(data.y_train)
    if learner.samples_seen >= per_epoch * max(1, learner.train_cfg.epochs):  # the planned run is complete
        learner.end_of_plan(lambda: data.train_batches(max(batch_size, READOUT_BATCH), seed=seed, limit=limit))


def run_batches(
    learner: LearnerLike,
    batches: Iterable[tuple[Any, Any, float | None, int]],
    *,
    on_step: Callable[[Any, int], None] | None = None,
    replay: ReplayLike | None = None,
) -> None:
    """The one training loop: every runner's steps go through it (``train_epochs`` with the planned batches,
    ``fit`` with a stream's, ``edgeff learn`` and ``edgeff continual`` with a replay buffer).

    Each item is ``(x, y, lr, fresh)``: a batch whose first ``fresh`` rows are new (the rest: the window's,
    ``planned_batches``), and its step's learning rate (None: unchanged). The hooks, in the order a step
    runs them: the lr plan (``learner.set_lr``); ``replay`` mixes its samples into the batch
    (``replay.mixed``; with ``replay.asymmetric`` the learner is told how many rows are the stream's, ER-ACE)
    unless the learner learns each sample exactly once (``exact_once``: the analytic family; its buffer still
    fills); the step; the new rows offered to ``replay``; ``on_step(metrics, fresh)``. ``learner.samples_seen``
    counts each stream sample once (a window's and a replay's rows were counted when they were new)."""
    for x, y, lr, fresh in batches:
        if lr is not None:
            learner.set_lr(lr)
        xs, ys = x, y
        if replay is not None and len(replay) and not getattr(learner, "exact_once", False):
            xs, ys = replay.mixed(x, y)
        if xs is not x and replay is not None and replay.asymmetric:
            m = learner.learn_many(xs, ys, fresh=int(x.shape[0]))
        else:
            m = learner.learn_many(xs, ys)
        learner.samples_seen -= int(xs.shape[0]) - fresh
        if replay is not None:
            replay.add(x[:fresh], y[:fresh])
        if on_step is not None:
            on_step(m, fresh)


def stream(batches: Iterable[tuple[Any, Any]]) -> Iterator[tuple[Any, Any, None, int]]:
    """A stream's batches as the loop takes them: every row new, no lr plan."""
    for x, y in batches:
        yield x, y, None, int(x.shape[0])


def fit(
    learner: LearnerLike,
    batches: Iterable[tuple[Any, Any]],
    *,
    on_step: Callable[[Any, int], None] | None = None,
    replay: ReplayLike | None = None,
) -> None:
    """Stream ``batches`` through the loop (``run_batches``): no lr plan, no window, no end of plan;
    ``on_step(metrics, batch_size)`` after each step. With a ``replay`` buffer (``edgeff.continual.ReplayBuffer``)
    every step also learns from ``replay.batch`` (default: as many) samples drawn from it, and the batch is then
    offered to it."""
    run_batches(learner, stream(batches), on_step=on_step, replay=replay)


def decayed(step: int, total: int, hold: float) -> float:
    """How far the lr has gone from ``lr`` to ``lr_final`` at ``step`` of a planned ``total``: 0 for the first
    ``hold`` of the run, then linearly to 1 at its end (and 1 after it)."""
    start = hold * total
    return min(1.0, max(0.0, step - start) / max(1e-12, total - start))


def _cat(parts: list[Any]) -> Any:
    """Concatenate batches along the first axis: numpy arrays (the edge runtime) or torch tensors."""
    if isinstance(parts[0], np.ndarray):
        return np.concatenate(parts)
    import sys

    return sys.modules["torch"].cat(parts)  # a torch tensor: torch is loaded


def planned_batches(
    train: TrainConfig,
    samples_seen: int,
    data: ImageDataLike,
    *,
    epochs: int,
    batch_size: int,
    seed: int = 0,
    limit: int | None = None,
) -> Iterator[tuple[Any, Any, float | None, int]]:
    """The batches ``train_epochs`` feeds a learner that has seen ``samples_seen`` samples, each with the
    learning rate of its step (None without ``train.lr_final``) and how many of its rows are new: one data
    order and one schedule for every runner (one process, or the first stage of a layer pipeline).

    With ``train.window`` > 0 a batch is the new samples followed by the ``window`` samples before them in
    this pass (fewer at the start of a pass; a resumed run re-reads them from the pass's order, so it
    learns exactly what the uninterrupted run learned). At batch 1 a step's cost is the optimizer's pass
    over the weights, not the rows, so the window adds little time and makes each update an average over
    ``window + 1`` samples, every sample learned ``window + 1`` times in one pass."""
    if batch_size < 1:
        raise InputError(f"batch size must be at least 1, got {batch_size}")
    per_epoch = min(limit, len(data.y_train)) if limit is not None else len(data.y_train)
    if per_epoch < 1:
        raise InputError("no training samples to learn from")
    steps_per_epoch = -(-per_epoch // batch_size)
    total = steps_per_epoch * max(1, train.epochs)  # the lr decay's horizon: the planned run
    done_epochs, rest = divmod(samples_seen, per_epoch)
    step = done_epochs * steps_per_epoch + -(-rest // batch_size)
    lr0, lr1 = train.lr, train.lr_final
    for epoch in range(done_epochs, epochs):
        skip = -(-rest // batch_size) if epoch == done_epochs else 0
        recent: list[tuple[Any, Any]] = []  # the window, newest first, one sample per entry
        if train.window and skip:  # resumed inside a pass: the window holds the samples just before this point
            back = min(train.window, skip * batch_size)
            recent = list(islice(data.train_batches(1, seed=seed, epoch=epoch, limit=limit, skip=skip * batch_size - back),
                                 back))
            recent.reverse()
        for x, y in data.train_batches(batch_size, seed=seed, epoch=epoch, limit=limit, skip=skip):
            lr = None if lr1 is None else lr0 + (lr1 - lr0) * decayed(step, total, train.lr_hold)
            n = int(x.shape[0])
            if not train.window:
                yield x, y, lr, n
            else:
                yield _cat([x, *(r[0] for r in recent)]), _cat([y, *(r[1] for r in recent)]), lr, n
                recent = [(x[i : i + 1], y[i : i + 1]) for i in range(n - 1, -1, -1)] + recent
                del recent[train.window :]
            step += 1
