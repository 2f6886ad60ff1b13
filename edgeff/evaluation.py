"""Accuracy of any learner over a stream of labelled batches."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from edgeff.contract import LearnerBase


@dataclass(frozen=True)
class EvalResult:
    accuracy: float
    n: int
    layer_accuracy: tuple[float, ...] = ()  # each layer's own prediction (goodness and CFL models)


def evaluate(
    learner: LearnerBase, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *, per_layer: bool = False,
    on_batch: Callable[[int], None] | None = None,
) -> EvalResult:
    """Accuracy of ``learner.predict_many``; with ``per_layer``, also each layer's own accuracy (where the
    family predicts per layer); ``on_batch(n)`` after each batch (progress)."""
    correct, n = 0, 0
    layer_correct: torch.Tensor | None = None
    for x, y in batches:
        y = y.cpu()
        if per_layer and learner.supports("layer_predictions"):
            lp = learner.layer_predictions(x)  # (B, L)
            hits = (lp == y[:, None]).sum(0)
            layer_correct = hits if layer_correct is None else layer_correct + hits
        correct += int((learner.predict_many(x) == y).sum())
        n += int(y.shape[0])
        if on_batch is not None:
            on_batch(int(y.shape[0]))
    if n == 0:
        raise ValueError("no samples to evaluate")
    layers = tuple(float(c) / n for c in layer_correct) if layer_correct is not None else ()
    return EvalResult(correct / n, n, layers)
