"""The runtime-free part of training: per-layer metrics and the epoch loop with its lr schedule.

Torch-free, so the torch learners (``edgeff.trainer``) and the numpy edge runtime (``edgeff.edge``)
share one data order, one resume rule and one learning-rate schedule.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from edgeff.config import TrainConfig
from edgeff.errors import InputError


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
) -> None:
    """Train for ``epochs`` passes over ``data``'s training set (the first ``limit`` shuffled samples
    of each pass when given), resuming where ``learner.samples_seen`` says it stopped.

    Each epoch's order depends only on (seed, epoch), so a learner loaded from a checkpoint continues
    with exactly the batches an uninterrupted run would have seen. With ``train.lr_final`` set, the
    learning rate falls linearly from ``train.lr`` to it over ``train.epochs`` epochs (after holding ``train.lr``
    for the first ``train.lr_hold`` of them) — the *planned* run,
    stored in checkpoints — and stays at ``lr_final`` after it. A run stopped early and resumed with more
    epochs (up to the plan) is therefore the same as the longer run from the start; to extend a run past
    its plan, plan it longer from the start (``edgeff train --lr-epochs``).
    """
    for x, y, lr in planned_batches(learner.train_cfg, learner.samples_seen, data, epochs=epochs, batch_size=batch_size,
                                    seed=seed, limit=limit):
        if lr is not None:
            learner.set_lr(lr)
        m = learner.learn_many(x, y)
        if on_step is not None:
            on_step(m, int(x.shape[0]))


def decayed(step: int, total: int, hold: float) -> float:
    """How far the lr has gone from ``lr`` to ``lr_final`` at ``step`` of a planned ``total``: 0 for the first
    ``hold`` of the run, then linearly to 1 at its end (and 1 after it)."""
    start = hold * total
    return min(1.0, max(0.0, step - start) / max(1e-12, total - start))


def planned_batches(
    train: TrainConfig,
    samples_seen: int,
    data: ImageDataLike,
    *,
    epochs: int,
    batch_size: int,
    seed: int = 0,
    limit: int | None = None,
) -> Iterator[tuple[Any, Any, float | None]]:
    """The batches ``train_epochs`` feeds a learner that has seen ``samples_seen`` samples, each with the
    learning rate of its step (None without ``train.lr_final``): one data order and one schedule for
    every runner (one process, or the first stage of a layer pipeline)."""
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
        for x, y in data.train_batches(batch_size, seed=seed, epoch=epoch, limit=limit, skip=skip):
            yield x, y, (None if lr1 is None else lr0 + (lr1 - lr0) * decayed(step, total, train.lr_hold))
            step += 1
