"""The goodness family's lda predictor in numpy: ``edgeff.readout.LdaPredictor``'s edge half.

A closed-form LDA readout on the length-normalised features of one neutral-label pass through the layers it
reads, solved when the planned run is complete: from one more pass over the training set, or from the last
``readout_window`` samples the learner kept (inputs and labels, in memory and in the ``.npz``), so a stream
on a board gets the readout its torch twin gets, without torch. The statistics are ``LdaStats`` (the analytic
family's); the names of every array (``predictor.*``) follow the torch predictor's state, which
``edgeff.interchange`` moves both ways. A readout that follows the stream (``readout_memory`` > 0) needs torch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from edgeff.edge.analytic import NAMES, LdaStats, own
from edgeff.errors import InputError, UnsupportedError

F32 = np.float32
Features = Callable[[np.ndarray], np.ndarray]  # inputs (B, C, H, W) -> the readout's features (B, D)


class LdaReadout:
    """The readout's statistics and window; ``features`` turns inputs into what it reads (the learner's)."""

    kind = "lda"

    def __init__(self, dim: int, num_classes: int, shrinkage: float, window: int,
                 input_shape: tuple[int, int, int]) -> None:
        self.stats = LdaStats(num_classes, dim)
        self.shrinkage = shrinkage
        self.window_x = np.zeros((window, *input_shape), F32)
        self.window_y = np.zeros(window, np.int64)
        self.window_seen = np.zeros((), np.int64)
        self._solved: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def window(self) -> int:
        return int(self.window_x.shape[0])

    @property
    def unsolved(self) -> bool:
        return float(self.stats.count.sum()) + int(self.stats.n_pending) == 0

    def learn(self, x: np.ndarray, y: np.ndarray) -> None:
        """New samples into the window (the oldest leave); nothing else until the end of the plan."""
        if not self.window:
            return
        x, y = x[-self.window :], y[-self.window :]  # a batch larger than the window: its latest samples
        slots = (int(self.window_seen) + np.arange(x.shape[0])) % self.window
        self.window_x[slots] = x
        self.window_y[slots] = y
        self.window_seen = np.asarray(int(self.window_seen) + x.shape[0], np.int64)

    def window_batches(self, size: int = 500) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The samples the window holds, oldest first."""
        n = min(int(self.window_seen), self.window)
        order = (np.arange(n) + int(self.window_seen) - n) % max(1, self.window)
        for i in range(0, n, size):
            yield self.window_x[order[i : i + size]], self.window_y[order[i : i + size]]

    def solve(self, features: Features, batches: Iterable[tuple[np.ndarray, np.ndarray]] | None = None) -> None:
        """Statistics from scratch over ``batches`` (None: the window's samples), keeping imprinted means."""
        if batches is None:
            if not self.window:
                raise InputError("this lda readout keeps no window of samples (readout_window is 0): pass the "
                                 "labelled batches to solve it from")
            batches = self.window_batches()
        self.stats.clear()
        self._solved = None
        for x, y in batches:
            self.stats.accumulate(features(np.asarray(x, F32)), np.asarray(y, np.int64))

    def ready(self, features: Features, batches: Any = None) -> str | None:
        """Unsolved (a model saved before its plan was complete): solve from the samples in the window, else
        from one pass over ``batches()`` when given."""
        held = min(int(self.window_seen), self.window)
        if self.unsolved and not held and batches is not None:
            self.solve(features, batches())
            return ("the lda readout was not solved yet (its planned run is not complete): solved it from one pass "
                    "over the training data; the end of the plan solves it again")
        if not (self.unsolved and held):
            return None
        self.solve(features)
        return (f"the lda readout was not solved yet (saved before its planned run was complete): solved it from "
                f"the {held} samples its window holds")

    def readout(self) -> tuple[np.ndarray, np.ndarray]:
        """``(P, c)``: scores = features @ P + c (cached until the statistics change)."""
        if self._solved is None:
            if self.unsolved:
                raise UnsupportedError("the lda readout of this model is solved when its planned run is complete "
                                       "(edgeff-edge train, loop.train_epochs); it has not been solved yet")
            self._solved = self.stats.readout(self.shrinkage)
        return self._solved

    def grow(self, proto: np.ndarray) -> None:
        """One more class; ``proto`` (D,) is its mean until it has samples."""
        self.stats.grow(proto)
        self._solved = None

    def arrays(self) -> dict[str, np.ndarray]:
        out = {f"predictor.stats.{n}": a for n, a in self.stats.arrays().items()}
        out.update({"predictor.window_x": self.window_x, "predictor.window_y": self.window_y,
                    "predictor.window_seen": self.window_seen})
        return out

    def load(self, arrays: dict[str, np.ndarray], *, adopt: bool = False) -> None:
        self.stats.load({n: arrays[f"predictor.stats.{n}"] for n in NAMES}, adopt=adopt)
        for n in ("window_x", "window_y", "window_seen"):
            a, want = np.asarray(arrays[f"predictor.{n}"]), getattr(self, n)
            if a.shape != want.shape:
                raise ValueError(f"predictor.{n}: shape {a.shape}, the model needs {want.shape}")
            setattr(self, n, own(a, want.dtype) if adopt else a.astype(want.dtype, copy=True))
        self._solved = None
