"""Continual learning: class-incremental streams, a reservoir replay buffer, and the usual metrics.

- ``ReplayBuffer``: reservoir sampling (Vitter's algorithm R) with a fixed capacity and its own seed;
  the training loop's replay hook (``edgeff.loop.run_batches``, ``replay=``): a replay batch mixed into every step.
- ``split_experiences``: split-MNIST / split-Fashion-MNIST (5 experiences of 2 classes each, in class
  order 0-1, 2-3, ... unless ``class_order`` says otherwise).
- ``run_stream``: streams experiences through any learner in one pass, growing the learner with
  ``add_class`` the first time a class appears (initialised from that batch's examples of it), and
  fills the accuracy matrix.
- Metrics, as Avalanche defines them: ``R[i, j]`` is the accuracy on experience j's test set after
  training on experience i; average accuracy = mean_j R[T−1, j]; forgetting of experience j < T−1 =
  R[j, j] − R[T−1, j] (the accuracy right after learning it minus the final one), averaged; backward
  transfer = mean_j (R[T−1, j] − R[j, j]) (Lopez-Paz & Ranzato), which is −forgetting under these
  definitions.
- ``add_one_class``: a model trained on all classes but one meets the last class, k examples of it
  mixed at random positions into ongoing traffic of the old classes; reports new-class recall and the
  old classes' accuracy drop.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgeff.contract import LearnerBase
from edgeff.data import ImageData
from edgeff.errors import InputError
from edgeff.loop import fit

POLICIES = ("reservoir", "balanced")


class ReplayBuffer:
    """A fixed-capacity store of past samples, filled online as the stream passes, with one of two policies:

    - ``reservoir``: after n samples were offered, each is held with probability capacity / n (Vitter's
      algorithm R) — the classes are held in proportion to the stream's;
    - ``balanced``: class-balanced reservoir sampling (CBRS, Chrysakis & Moens 2020): once full, a sample of
      a class that is not among the largest held ones replaces a random sample of a largest class; a sample
      of a largest class replaces a random one of its own class with probability held/seen for that class.
      Every class seen keeps about capacity / classes samples, however skewed or ordered the stream.

    Seeded; ``sample`` draws without replacement.

    Args:
        capacity: the most samples ever held (0 disables replay).
        seed: seeds the buffer's own generator (admission and sampling).
        batch: samples replayed per training step (default: as many as the step's stream batch).
        policy: ``reservoir`` or ``balanced``.
    """

    def __init__(self, capacity: int, *, seed: int = 0, batch: int | None = None, asymmetric: bool = False,
                 policy: str = "reservoir") -> None:
        if capacity < 0:
            raise InputError(f"a replay buffer's capacity must be >= 0, got {capacity}")
        if batch is not None and batch < 1:
            raise InputError(f"replay batch must be at least 1, got {batch}")
        if policy not in POLICIES:
            raise InputError(f"unknown buffer policy {policy!r}; choose one of {', '.join(POLICIES)}")
        self.capacity = capacity
        self.batch = batch
        self.asymmetric = asymmetric
        self.policy = policy
        self.generator = torch.Generator().manual_seed(seed)
        self.seen = 0  # samples offered so far
        self.seen_per_class: dict[int, int] = {}  # samples of each class offered so far (the balanced policy)
        self.x: torch.Tensor | None = None  # (capacity, ...) storage, allocated on the first add
        self.y = torch.zeros(capacity, dtype=torch.long)
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def _randint(self, n: int) -> int:
        return int(torch.randint(0, n, (1,), generator=self.generator))

    def _slot(self, label: int) -> int:
        """Where a full buffer stores a new sample of class ``label`` (``capacity``: nowhere)."""
        if self.policy == "reservoir":
            return self._randint(self.seen + 1)
        held = torch.bincount(self.y[: self.size], minlength=label + 1)
        largest = held.max()
        if held[label] < largest:  # not among the largest classes: take a place from one of them
            candidates = torch.nonzero(held[self.y[: self.size]] == largest).flatten()
        else:  # a largest class: reservoir sampling within the class
            if self._randint(self.seen_per_class[label]) >= int(held[label]):
                return self.capacity
            candidates = torch.nonzero(self.y[: self.size] == label).flatten()
        return int(candidates[self._randint(candidates.numel())])

    def mixed(self, x: torch.Tensor, y: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's batch ``x, y`` followed by ``batch`` (default: as many) samples drawn from the buffer, on
        ``x``'s device (the training loop's replay hook, ``edgeff.loop.run_batches``)."""
        yt = torch.as_tensor(y)
        rx, ry = self.sample(self.batch or int(x.shape[0]))
        return torch.cat([x, rx.to(x.device)]), torch.cat([yt, ry.to(yt.device)])

    def add(self, x: torch.Tensor, y: Any) -> None:
        """Offer a batch (labels as a tensor, an array or a list); never keeps a reference to the caller's tensors."""
        y = torch.as_tensor(y)
        if self.capacity == 0:
            self.seen += int(x.shape[0])
            return
        if self.x is None:
            self.x = torch.zeros(self.capacity, *x.shape[1:], dtype=x.dtype)
        for i in range(x.shape[0]):
            label = int(y[i])
            self.seen_per_class[label] = self.seen_per_class.get(label, 0) + 1
            if self.size < self.capacity:
                slot = self.size
                self.size += 1
            else:
                slot = self._slot(label)
            self.seen += 1
            if slot < self.capacity:
                self.x[slot] = x[i].detach().cpu()
                self.y[slot] = label

    def class_counts(self) -> dict[int, int]:
        """How many samples of each class the buffer holds."""
        labels, counts = torch.unique(self.y[: self.size], return_counts=True)
        return {int(a): int(b) for a, b in zip(labels, counts, strict=True)}

    def nbytes(self) -> int:
        """Memory the buffer holds (its sample storage and labels)."""
        return (0 if self.x is None else self.x.numel() * self.x.element_size()) + self.y.numel() * 8

    def state(self) -> dict[str, Any]:
        """Everything to restore the buffer exactly (kept in a checkpoint's meta by ``edgeff learn``)."""
        return {"capacity": self.capacity, "batch": self.batch, "asymmetric": self.asymmetric, "seen": self.seen,
                "policy": self.policy, "seen_per_class": dict(self.seen_per_class), "size": self.size, "generator": self.generator.get_state(),
                "x": None if self.x is None else self.x[: self.size].clone(), "y": self.y[: self.size].clone()}

    @staticmethod
    def from_state(state: dict[str, Any], capacity: int | None = None) -> ReplayBuffer:
        """The buffer ``state`` describes; a smaller ``capacity`` keeps a uniform subset of its samples."""
        cap = int(state["capacity"]) if capacity is None else capacity
        buf = ReplayBuffer(cap, batch=state["batch"], asymmetric=bool(state["asymmetric"]),
                           policy=state.get("policy", "reservoir"))
        buf.generator.set_state(state["generator"])
        buf.seen = int(state["seen"])
        buf.seen_per_class = {int(k): int(v) for k, v in state.get("seen_per_class", {}).items()}
        x, y = state["x"], state["y"]
        keep = min(int(state["size"]), cap)
        if x is not None and keep:
            idx = torch.randperm(int(state["size"]), generator=buf.generator)[:keep] if keep < state["size"] else \
                torch.arange(keep)
            buf.x = torch.zeros(cap, *x.shape[1:], dtype=x.dtype)
            buf.x[:keep], buf.y[:keep] = x[idx], y[idx]
            buf.size = keep
        return buf

    def sample(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Up to ``n`` held samples, uniformly without replacement: (x, y)."""
        if self.x is None or self.size == 0 or n < 1:
            raise InputError("the replay buffer is empty")
        idx = torch.randperm(self.size, generator=self.generator)[: min(n, self.size)]
        return self.x[idx].clone(), self.y[idx].clone()


# --------------------------------------------------------------------------- metrics
def average_accuracy(r: np.ndarray) -> float:
    """Mean accuracy over all experiences after the last one: mean_j R[T−1, j]."""
    return float(np.mean(r[-1]))


def forgetting(r: np.ndarray) -> float:
    """Avalanche's forgetting: mean over j < T−1 of R[j, j] − R[T−1, j] (0 for a single experience)."""
    t = r.shape[0]
    if t < 2:
        return 0.0
    return float(np.mean([r[j, j] - r[-1, j] for j in range(t - 1)]))


def backward_transfer(r: np.ndarray) -> float:
    """Backward transfer (Lopez-Paz & Ranzato 2017): mean over j < T−1 of R[T−1, j] − R[j, j]."""
    t = r.shape[0]
    if t < 2:
        return 0.0
    return float(np.mean([r[-1, j] - r[j, j] for j in range(t - 1)]))


# --------------------------------------------------------------------------- streams
@dataclass(frozen=True)
class Experience:
    """One step of a class-incremental stream: its classes, training samples (stream order) and
    test samples (data-set labels)."""

    classes: tuple[int, ...]
    x: torch.Tensor  # (N, C, H, W)
    y: torch.Tensor  # (N,)
    x_test: torch.Tensor
    y_test: torch.Tensor

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(0, self.y.shape[0], batch_size):
            yield self.x[i : i + batch_size], self.y[i : i + batch_size]


def split_experiences(data: ImageData, n_experiences: int = 5, *, seed: int = 0,
                      class_order: list[int] | None = None, limit: int | None = None) -> list[Experience]:
    """Split a data set into ``n_experiences`` class-disjoint experiences (split-MNIST: 5 × 2 classes).

    Args:
        class_order: the classes in stream order (default 0..K−1); split into equal consecutive groups.
        seed: shuffles the samples inside each experience.
        limit: at most this many training samples per experience (default: all of them).
    """
    k = len(data.classes)
    order = list(range(k)) if class_order is None else list(class_order)
    if sorted(order) != list(range(k)):
        raise InputError(f"class_order must list each of the {k} classes once, got {order}")
    if n_experiences < 1 or k % n_experiences:
        raise InputError(f"cannot split {k} classes into {n_experiences} equal experiences")
    per = k // n_experiences
    rng = np.random.default_rng(seed)
    out = []
    for e in range(n_experiences):
        cls = tuple(order[e * per : (e + 1) * per])
        idx = np.flatnonzero(np.isin(data.y_train, cls))
        idx = rng.permutation(idx)[:limit]
        tidx = np.flatnonzero(np.isin(data.y_test, cls))
        out.append(Experience(cls, data.normalise(data.x_train[idx]), torch.from_numpy(data.y_train[idx].astype(np.int64)),
                              data.normalise(data.x_test[tidx]), torch.from_numpy(data.y_test[tidx].astype(np.int64))))
    return out


@dataclass
class StreamResult:
    """What ``run_stream`` measured."""

    matrix: np.ndarray  # R[i, j], (T, T)
    curve: list[dict[str, float]] = field(default_factory=list)  # accuracy per experience over the stream
    classes: list[tuple[int, ...]] = field(default_factory=list)

    @property
    def average_accuracy(self) -> float:
        return average_accuracy(self.matrix)

    @property
    def forgetting(self) -> float:
        return forgetting(self.matrix)

    @property
    def backward_transfer(self) -> float:
        return backward_transfer(self.matrix)


class ClassMap:
    """Data-set labels -> the learner's class indices, assigned in order of first appearance."""

    def __init__(self, learner: LearnerBase, names: tuple[str, ...], known: dict[int, int] | None = None) -> None:
        self.learner = learner
        self.names = names
        self.index: dict[int, int] = dict(known or {})

    def learn_labels(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The learner's labels for a batch, first adding (from this batch's examples) any new class."""
        for label in sorted({int(v) for v in y}):
            if label not in self.index:
                self.index[label] = self.learner.add_class(self.names[label], examples=x[y == label])
        return self.to_model(y)

    def to_model(self, y: torch.Tensor) -> torch.Tensor:
        return torch.tensor([self.index.get(int(v), -1) for v in y], dtype=torch.long)


def accuracy(learner: LearnerBase, cmap: ClassMap, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    """Accuracy on data-set labels ``y`` (a class the learner has not met counts as wrong)."""
    if y.shape[0] == 0:
        raise InputError("no test samples")
    target = cmap.to_model(y)
    hits = 0
    for i in range(0, y.shape[0], batch):
        hits += int((learner.predict_many(x[i : i + batch]) == target[i : i + batch]).sum())
    return hits / y.shape[0]


def run_stream(
    learner: LearnerBase,
    experiences: list[Experience],
    names: tuple[str, ...],
    *,
    batch_size: int = 10,
    replay: ReplayBuffer | None = None,
    eval_every: int = 0,
    eval_limit: int | None = 1000,
    known: dict[int, int] | None = None,
    on_step: Callable[[Any, int], None] | None = None,
) -> StreamResult:
    """Stream every experience through ``learner`` once, batch by batch (class-incremental, online).

    Args:
        learner: any edgeff learner; it grows with ``add_class`` when a class first appears.
        names: a name per data-set label.
        replay: the loop's replay hook: every step also learns from an equal number of replayed samples.
        eval_every: also record the accuracy on each experience's test set every this many samples (the
            plot's curve; the first ``eval_limit`` test samples of each experience), 0 for none.
        known: data-set label -> learner class index for classes the learner already has.
    Returns:
        the accuracy matrix (full test sets) and the curve.
    """
    if batch_size < 1:
        raise InputError(f"batch size must be at least 1, got {batch_size}")
    cmap = ClassMap(learner, names, known)
    t = len(experiences)
    r = np.zeros((t, t))
    curve: list[dict[str, float]] = []
    next_eval = [eval_every]

    def record() -> None:
        row: dict[str, float] = {"samples": float(learner.samples_seen)}
        for j, e in enumerate(experiences):
            n = eval_limit or e.y_test.shape[0]
            row[f"exp{j}"] = accuracy(learner, cmap, e.x_test[:n], e.y_test[:n])
        curve.append(row)

    def step(metrics: Any, n: int) -> None:
        if on_step is not None:
            on_step(metrics, n)
        if eval_every and learner.samples_seen >= next_eval[0]:
            record()
            next_eval[0] += eval_every

    for i, e in enumerate(experiences):
        batches = ((x, cmap.learn_labels(x, y)) for x, y in e.batches(batch_size))
        fit(learner, batches, replay=replay, on_step=step)  # type: ignore[arg-type]
        for j, ej in enumerate(experiences):  # an experience none of whose classes the learner has scores 0
            met = any(int(c) in cmap.index for c in ej.classes)  # (nothing to evaluate: each answer is wrong)
            r[i, j] = accuracy(learner, cmap, ej.x_test, ej.y_test) if met else 0.0
    if eval_every:
        record()
    return StreamResult(r, curve, [e.classes for e in experiences])


# --------------------------------------------------------------------------- add one class
@dataclass(frozen=True)
class AddClassResult:
    k: int  # examples of the new class in the stream
    new_recall: float  # share of the new class's test samples predicted as it
    old_before: float  # accuracy on the old classes' test samples before the class was added
    old_after: float  # ... after the stream (all classes competing)
    samples: int  # samples in the stream (old traffic + k)

    @property
    def old_drop(self) -> float:
        """Old-class accuracy lost, in points (positive = worse)."""
        return 100.0 * (self.old_before - self.old_after)


def add_one_class(
    learner: LearnerBase,
    data: ImageData,
    new: int,
    k: int,
    *,
    traffic: int = 2000,
    batch_size: int = 10,
    replay: ReplayBuffer | None = None,
    seed: int = 0,
) -> AddClassResult:
    """Stream ``k`` training examples of class ``new``, at random positions among ``traffic`` samples of
    the other classes, through a learner that knows every class but ``new`` (its class indices are the
    data-set labels with ``new`` removed). The class is added at its first example.

    Returns:
        new-class recall and the old-class accuracy before/after on the full test set.
    """
    if not 1 <= k:
        raise InputError(f"k must be at least 1, got {k}")
    rng = np.random.default_rng(seed)
    old_labels = [c for c in range(len(data.classes)) if c != new]
    known = {c: i for i, c in enumerate(old_labels)}
    cmap = ClassMap(learner, data.classes, known)
    new_idx = rng.choice(np.flatnonzero(data.y_train == new), k, replace=False)
    old_idx = rng.choice(np.flatnonzero(data.y_train != new), traffic, replace=False)
    order = rng.permutation(np.concatenate([old_idx, new_idx]))
    x = data.normalise(data.x_train[order])
    y = torch.from_numpy(data.y_train[order].astype(np.int64))
    test_old = np.flatnonzero(data.y_test != new)
    test_new = np.flatnonzero(data.y_test == new)
    xo, yo = data.normalise(data.x_test[test_old]), torch.from_numpy(data.y_test[test_old].astype(np.int64))
    before = accuracy(learner, cmap, xo, yo)
    batches = ((x[i : i + batch_size], cmap.learn_labels(x[i : i + batch_size], y[i : i + batch_size]))
               for i in range(0, y.shape[0], batch_size))
    fit(learner, batches, replay=replay)  # type: ignore[arg-type]
    xn, yn = data.normalise(data.x_test[test_new]), torch.from_numpy(data.y_test[test_new].astype(np.int64))
    return AddClassResult(k, accuracy(learner, cmap, xn, yn), before, accuracy(learner, cmap, xo, yo), int(y.shape[0]))


def plot_stream(result: StreamResult, path: str | Path, *, title: str = "", names: tuple[str, ...] = ()) -> None:
    """Accuracy on each experience's test samples over the stream (one line per experience), with the
    experience boundaries marked. Needs matplotlib and a result recorded with ``eval_every``."""
    if not result.curve:
        raise InputError("no accuracy curve recorded: run the stream with eval_every > 0")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise RuntimeError("--plot needs matplotlib: pip install 'edgeff[plot]'") from e
    xs = [row["samples"] for row in result.curve]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for j, cls in enumerate(result.classes):
        label = "+".join(names[c] if names else str(c) for c in cls)
        ax.plot(xs, [100 * row[f"exp{j}"] for row in result.curve], label=f"exp {j + 1}: {label}")
    avg = [100 * float(np.mean([row[f"exp{j}"] for j in range(len(result.classes))])) for row in result.curve]
    ax.plot(xs, avg, "k--", label="mean")
    ax.set_xlabel("stream samples")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title or "class-incremental stream")
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- scenarios (CLI and bench)
def _learner(preset: str, data: ImageData, num_classes: int, *, backprop: bool, seed: int,
             names: tuple[str, ...] = ()) -> Any:
    import warnings
    from dataclasses import replace

    from edgeff.presets import get_preset, make_learner

    p = get_preset(preset)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")  # a head with 0 classes
        learner = make_learner(p, input_shape=data.input_shape, num_classes=num_classes,
                               train=replace(p.train, seed=seed), backprop=backprop)
    if names:
        learner.model_cfg = replace(learner.model_cfg, class_names=names)
        if hasattr(learner.net, "cfg"):
            learner.net.cfg = learner.model_cfg
    return learner


def split_scenario(
    data: ImageData,
    *,
    preset: str = "cfl-mlp-stream",
    backprop: bool = False,
    buffer: int = 0,
    asymmetric: bool = True,
    buffer_policy: str = "reservoir",
    replay_batch: int | None = None,
    n_experiences: int = 5,
    batch_size: int = 10,
    seed: int = 0,
    limit: int | None = None,
    eval_every: int = 0,
    on_step: Callable[[Any, int], None] | None = None,
) -> StreamResult:
    """Online class-incremental split (split-MNIST: 5 experiences × 2 classes, one pass, batches of
    ``batch_size``) for a learner that starts with no class at all and grows one per new label.

    Args:
        preset: the architecture and local rule; with ``backprop`` its end-to-end baseline (growing head).
        buffer: replay capacity (0: naive fine-tuning).
        buffer_policy: ``reservoir`` or ``balanced`` (``ReplayBuffer``).
        replay_batch: replayed samples per step (default: as many as the stream batch).
        asymmetric: with a buffer, fresh samples' softmax runs over the fresh classes only (ER-ACE).
        limit: at most this many training samples per experience.
    """
    learner = _learner(preset, data, 0, backprop=backprop, seed=seed)
    exps = split_experiences(data, n_experiences, seed=seed, limit=limit)
    replay = ReplayBuffer(buffer, seed=seed, asymmetric=asymmetric, policy=buffer_policy,
                          batch=replay_batch) if buffer else None
    return run_stream(learner, exps, data.classes, batch_size=batch_size, replay=replay, eval_every=eval_every,
                      on_step=on_step)


def pretrain_without(data: ImageData, new: int, *, preset: str = "cfl-mlp-stream", backprop: bool = False,
                     epochs: int = 1, seed: int = 0, limit: int | None = None) -> Any:
    """A learner trained (the preset's batch size and lr schedule, ``epochs`` passes) on every class of
    ``data`` but ``new``; its class indices are the data-set labels with ``new`` left out."""
    from dataclasses import replace

    from edgeff.loop import train_epochs

    k = len(data.classes)
    if not 0 <= new < k:
        raise InputError(f"the new class must be one of 0..{k - 1}, got {new}")
    old = [c for c in range(k) if c != new]
    keep = data.y_train != new
    relabel = np.array([old.index(c) if c != new else -1 for c in range(k)])
    sub = replace(data, x_train=data.x_train[keep], y_train=relabel[data.y_train[keep]])
    learner = _learner(preset, data, k - 1, backprop=backprop, seed=seed, names=tuple(data.classes[c] for c in old))
    learner.train_cfg = replace(learner.train_cfg, epochs=epochs)
    train_epochs(learner, sub, epochs=epochs, batch_size=learner.train_cfg.batch_size, seed=seed, limit=limit)
    return learner
