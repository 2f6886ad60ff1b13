"""The streaming layer-local trainer: ``learn_one/learn_many/predict_one/predict_many``.

Each step concatenates a positive batch (true labels) and a negative batch (wrong labels) and walks
the layers once. Every training layer computes its goodness, its local loss, and steps its own
optimizer; its output is detached before the next layer sees it. Under Overlapping Local Updates
(Trifecta app. G, Algorithm 1) a layer whose index parity differs from the step parity passes its
output on *without* detaching, so the next layer's loss also updates it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol

import numpy as np
import torch

from edgeff.augment import require_one_view
from edgeff.config import ModelConfig, TrainConfig
from edgeff.errors import InputError
from edgeff.loop import LayerMetrics, train_epochs  # noqa: F401 - re-exported: the runtime-free training loop
from edgeff.losses import get_loss, goodness
from edgeff.model import NEGATIVES, LocalNet, make_predictor

SCHEDULES = ("all", "greedy", "olu")


class BPLearnerLike(Protocol):
    train_cfg: TrainConfig
    samples_seen: int

    def learn_many(self, x: torch.Tensor, y: torch.Tensor, *, fresh: int | None = None) -> Any: ...

    def set_lr(self, lr: float) -> None: ...


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {name!r} asked for but CUDA is not available; use --device cpu or auto")
    return dev


def as_batch(x: torch.Tensor | np.ndarray, input_shape: tuple[int, int, int], *, single: bool = False) -> torch.Tensor:
    """Check a batch and return it as float32 (B, C, H, W). Raises ``InputError`` with what to fix."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise InputError(f"expected a torch.Tensor or numpy array, got {type(x).__name__}")
    if not (x.is_floating_point()):
        raise InputError(f"expected float inputs (normalised pixels), got dtype {x.dtype}; convert with .float()")
    want = tuple(input_shape)
    if single:
        if tuple(x.shape) != want:
            raise InputError(f"expected one sample of shape {want}, got {tuple(x.shape)}")
        x = x.unsqueeze(0)
    elif x.dim() == 2 and x.shape[1] == int(np.prod(want)):
        x = x.view(x.shape[0], *want)
    if tuple(x.shape[1:]) != want or x.shape[0] < 1:
        raise InputError(f"expected a batch of shape (B, {', '.join(map(str, want))}) with B >= 1, got {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise InputError("the batch contains NaN or infinite values; clean the input before learning from it")
    return x.float()


def as_labels(y: torch.Tensor | np.ndarray | Iterable[int] | int, n: int, num_classes: int) -> torch.Tensor:
    y = torch.as_tensor(y if not isinstance(y, np.ndarray) else y.astype(np.int64)).long().reshape(-1)
    if y.shape[0] != n:
        raise InputError(f"got {y.shape[0]} labels for {n} samples")
    if n and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise InputError(f"labels must lie in 0..{num_classes - 1}; got {int(y.min())}..{int(y.max())}")
    return y


class _RunningStatsKept:
    """Restore a layer's BatchNorm running statistics on exit (a look-ahead pass must not update them)."""

    def __init__(self, layer: torch.nn.Module) -> None:
        self.buffers = [b for n, b in layer.named_buffers() if n.endswith(("running_mean", "running_var"))]

    def __enter__(self) -> None:
        self.saved = [b.clone() for b in self.buffers]

    def __exit__(self, *exc: object) -> None:
        for b, v in zip(self.buffers, self.saved, strict=True):
            b.copy_(v)


def _fresh_negatives(y: torch.Tensor, fallback: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """For each label, another label present in ``y`` drawn uniformly; ``fallback`` where none is."""
    classes = torch.unique(y)  # sorted
    if classes.numel() < 2:
        return fallback
    pos = torch.searchsorted(classes, y)  # each label's place among the fresh classes
    shift = torch.randint(1, classes.numel(), (y.shape[0],), generator=generator).to(y.device)
    return classes[(pos + shift) % classes.numel()]


class Learner:
    """A ``LocalNet`` with its schedule, negatives and predictor, learning from a stream.

    Args:
        model: the architecture and local loss.
        train: optimiser, schedule, predictor and seed.
    """

    kind = "local"

    def __init__(self, model: ModelConfig, train: TrainConfig) -> None:
        if train.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {train.schedule!r}; choose one of {SCHEDULES}")
        if train.negatives not in NEGATIVES:
            raise ValueError(f"unknown negatives {train.negatives!r}; choose one of {sorted(NEGATIVES)}")
        require_one_view(train, "goodness")
        self.model_cfg = model
        self.train_cfg = train
        self.device = resolve_device(train.device)
        self.generator = torch.Generator().manual_seed(train.seed)
        self.net = LocalNet(model, train, self.generator).to(self.device)
        self.predictor = make_predictor(train, self.net, self.generator)
        if isinstance(self.predictor, torch.nn.Module):
            self.predictor.to(self.device)
        self.negatives = NEGATIVES[train.negatives]
        self.loss_fn = get_loss(model.loss, threshold=model.threshold, alpha=model.alpha)
        self.step = 0  # learn_many calls so far
        self.samples_seen = 0
        # called as hook(i, True) before layer i's step and hook(i, False) after it (memory measurement)
        self.layer_hook: Callable[[int, bool], None] | None = None

    # ----------------------------------------------------------------- schedule
    def _greedy_active(self) -> int:
        return min(self.step // self.train_cfg.greedy_steps, len(self.net.layers) - 1)

    def _apply_greedy(self) -> int:
        active = self._greedy_active()
        for i, layer in enumerate(self.net.local_layers):
            if i != active:
                layer.drop_optimizer()  # frozen (or not yet started) layers keep no optimizer state
        return active

    def set_lr(self, lr: float) -> None:
        """Set every layer's learning rate (live optimizers and those created later)."""
        for layer in self.net.local_layers:
            layer.set_lr(lr)

    # ----------------------------------------------------------------- learning
    def learn_many(self, x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray | list[int], *,
                   fresh: int | None = None) -> list[LayerMetrics]:
        """One local step of every scheduled layer on a batch of any size (including 1).

        Returns one ``LayerMetrics`` per layer that ran. Never mutates ``x`` or ``y``.
        ``fresh``: the batch is ``fresh`` new stream samples followed by replayed ones; a fresh sample's
        negative label is then drawn from the fresh samples' other classes (when there are any), the
        goodness analogue of ER-ACE's asymmetric loss, so new data does not push down old classes.
        """
        xb = as_batch(x, self.model_cfg.input_shape).to(self.device)
        yb = as_labels(y, xb.shape[0], self.model_cfg.num_classes).to(self.device)
        b = xb.shape[0]
        self.net.train()
        y_neg = self.negatives(self.net, xb, yb, self.generator)
        if fresh is not None and 0 < fresh < b:
            y_neg = y_neg.clone()
            y_neg[:fresh] = _fresh_negatives(yb[:fresh], y_neg[:fresh], self.generator)
        enc = self.net.encoder
        if self.train_cfg.frugal and self.train_cfg.schedule != "olu":
            frugal = self._learn_frugal(enc(xb, yb), enc(xb, y_neg))
            self.predictor.learn(self.net, xb, yb)
            self.step += 1
            self.samples_seen += b
            return frugal
        h = torch.cat([enc(xb, yb), enc(xb, y_neg)])  # (2B, C', H, W): positives then negatives
        schedule = self.train_cfg.schedule
        n_layers = len(self.net.layers)
        last_to_run = n_layers - 1
        active = -1
        if schedule == "greedy":
            active = self._apply_greedy()
            last_to_run = active  # layers after the active one do not run yet
        pending = []  # OLU: layers whose graph is carried into the next layer's loss
        metrics: list[LayerMetrics] = []
        hook = self.layer_hook
        for i, layer in enumerate(self.net.local_layers):
            if i > last_to_run:
                break
            if hook is not None:
                if i > 0:
                    hook(i - 1, False)
                hook(i, True)
            trains = schedule != "greedy" or i == active
            if not trains:
                with torch.no_grad():
                    out = layer(h)
                g = goodness(out)
                metrics.append(LayerMetrics(float(self.loss_fn(g[:b], g[b:])), float(g[:b].mean()),
                                            float(g[b:].mean()), False))
                h = out
                continue
            out = layer(h)
            g = goodness(out)  # (2B,)
            loss = self.loss_fn(g[:b], g[b:])
            passes = schedule == "olu" and ((i % 2 == 0) ^ (self.step % 2 == 0)) and i < n_layers - 1
            gd = g.detach()
            if passes:
                pending.append(layer)
                metrics.append(LayerMetrics(float(loss.detach()), float(gd[:b].mean()), float(gd[b:].mean()), False))
                h = out  # not detached: the next layer's loss updates this layer too
                continue
            stepping = [*pending, layer]
            for lay in stepping:
                lay.ensure_optimizer().zero_grad(set_to_none=True)
            loss.backward()
            for lay in stepping:
                lay.optimizer_step()
            if pending:
                metrics[-1] = LayerMetrics(metrics[-1].loss, metrics[-1].g_pos, metrics[-1].g_neg, True)
            pending = []
            metrics.append(LayerMetrics(float(loss.detach()), float(gd[:b].mean()), float(gd[b:].mean()), True))
            h = out.detach()  # the memory contract: no graph crosses this boundary
        if hook is not None:
            hook(min(last_to_run, n_layers - 1), False)
        self.predictor.learn(self.net, xb, yb)
        self.step += 1
        self.samples_seen += b
        return metrics

    def _learn_frugal(self, hp: torch.Tensor, hn: torch.Tensor) -> list[LayerMetrics]:
        """The frugal step (schedules ``all`` and ``greedy``): a training layer holds the graph of one half
        of the batch at a time. The negatives' goodness is read first without a graph; the positives pass
        with a graph and their part of the loss is backpropagated; then the negatives pass again with a
        graph for theirs. The gradients add up to the whole-batch gradient exactly (the loss is a sum over
        pairs), at the cost of one more forward pass of the negatives. Where a layer normalises with
        batch statistics (BN on batches of at least ``bn_min_batch``), each half is normalised with its own
        statistics and the running statistics take two updates (positives, negatives) instead of one:
        a different, not a worse, update. The layer's gradients are freed right after its step."""
        active = self._apply_greedy() if self.train_cfg.schedule == "greedy" else -1
        metrics: list[LayerMetrics] = []
        hook = self.layer_hook
        for i, layer in enumerate(self.net.local_layers):
            if active >= 0 and i > active:
                break
            if hook is not None:
                hook(i, True)
            if active >= 0 and i != active:
                with torch.no_grad():
                    hp, hn = layer(hp), layer(hn)
                gp, gn = goodness(hp), goodness(hn)
                metrics.append(LayerMetrics(float(self.loss_fn(gp, gn)), float(gp.mean()), float(gn.mean()), False))
            else:
                opt = layer.ensure_optimizer()
                opt.zero_grad(set_to_none=True)
                with torch.no_grad(), _RunningStatsKept(layer):
                    gn = goodness(layer(hn))  # (B,): the negatives' side of each pair, no graph
                op = layer(hp)
                gp = goodness(op)
                self.loss_fn(gp, gn).backward()  # the positives' part of the gradient
                hp, gp = op.detach(), gp.detach()
                del op
                on = layer(hn)
                gn = goodness(on)
                loss = self.loss_fn(gp, gn)
                loss.backward()  # the negatives' part
                hn = on.detach()
                del on
                layer.optimizer_step()
                opt.zero_grad(set_to_none=True)
                metrics.append(LayerMetrics(float(loss.detach()), float(gp.mean()), float(gn.detach().mean()), True))
            if hook is not None:
                hook(i, False)
        return metrics

    def learn_one(self, x: torch.Tensor | np.ndarray, y: int) -> list[LayerMetrics]:
        """``learn_many`` on a single sample of shape (C, H, W)."""
        return self.learn_many(as_batch(x, self.model_cfg.input_shape, single=True), [int(y)])

    # ----------------------------------------------------------------- growth
    @property
    def class_names(self) -> tuple[str, ...]:
        return self.model_cfg.names

    def add_class(self, name: str, examples: torch.Tensor | np.ndarray | None = None) -> int:
        """Add a class online; returns its index (the old classes keep theirs).

        The label encoder grows (a new Intrinsic Class Pattern, label-channel row or overlay slot) and
        so does a head predictor. Goodness has nothing to initialise from ``examples`` — the new label
        is learned from the stream — but a head predictor imprints their mean feature. The goodness
        and scores of the existing classes are unchanged until training resumes (a head predictor's
        neutral input averages over the classes, so its scores do move).

        Raises:
            InputError: the name is empty or taken, or ``examples`` has the wrong shape; nothing changes.
        """
        cfg = self.model_cfg.with_class(name)
        xb = None if examples is None else as_batch(examples, self.model_cfg.input_shape).to(self.device)
        first = self.net.local_layers[0]
        self.net.encoder.grow(self.generator, [first.opt])
        if self.model_cfg.label_learned:
            first.extra_params = list(self.net.encoder.parameters())
        self.model_cfg = cfg
        self.net.cfg = cfg
        self.net.eval()
        self.predictor.grow(self.net, xb, self.generator)
        return cfg.num_classes - 1

    # ----------------------------------------------------------------- prediction
    def scores(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Class scores (B, K) from the predictor; higher is more likely."""
        xb = as_batch(x, self.model_cfg.input_shape).to(self.device)
        self.net.eval()
        with torch.no_grad():
            return self.predictor.scores(self.net, xb)

    def predict_many(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        return self.scores(x).argmax(1).cpu()

    def predict_one(self, x: torch.Tensor | np.ndarray) -> int:
        return int(self.predict_many(as_batch(x, self.model_cfg.input_shape, single=True))[0])

    def layer_predictions(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Each layer's own goodness arg-max: (B, L)."""
        xb = as_batch(x, self.model_cfg.input_shape).to(self.device)
        self.net.eval()
        return self.net.label_goodness(xb).argmax(1).cpu()


class ReplayLike(Protocol):
    batch: int | None
    asymmetric: bool

    def __len__(self) -> int: ...

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None: ...

    def sample(self, n: int) -> tuple[torch.Tensor, torch.Tensor]: ...


def fit(
    learner: Learner | BPLearnerLike,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    on_step: Callable[[Any, int], None] | None = None,
    replay: ReplayLike | None = None,
) -> None:
    """Stream ``batches`` through ``learner.learn_many``; ``on_step(metrics, batch_size)`` after each.

    With a ``replay`` buffer (e.g. ``edgeff.continual.ReplayBuffer``) every step learns from the batch
    plus ``replay.batch`` (default: as many) samples drawn from the buffer (experience replay), and the batch is then offered to
    the buffer; ``on_step`` counts the stream's samples only.
    """
    for x, y in batches:
        if replay is None or not len(replay):
            m = learner.learn_many(x, y)
        else:
            yt = torch.as_tensor(y)
            rx, ry = replay.sample(replay.batch or int(x.shape[0]))
            xs, ys = torch.cat([x, rx.to(x.device)]), torch.cat([yt, ry.to(yt.device)])
            m = learner.learn_many(xs, ys, fresh=int(x.shape[0])) if replay.asymmetric else learner.learn_many(xs, ys)
        if replay is not None:
            replay.add(x, torch.as_tensor(y))
        if on_step is not None:
            on_step(m, int(x.shape[0]))
