"""The streaming layer-local trainer: ``learn_one/learn_many/predict_one/predict_many``.

Each step concatenates a positive batch (true labels) and a negative batch (wrong labels) and walks
the layers once. Every training layer computes its goodness, its local loss, and steps its own
optimizer; its output is detached before the next layer sees it. Under Overlapping Local Updates
(Trifecta app. G, Algorithm 1) a layer whose index parity differs from the step parity passes its
output on *without* detaching, so the next layer's loss also updates it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import numpy as np
import torch

from edgeff import factored
from edgeff.augment import require_one_view
from edgeff.config import MAX_INPUT, ModelConfig, TrainConfig
from edgeff.errors import InputError
from edgeff.layers import RunningBatchNorm
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
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise InputError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise InputError(f"device {name!r} is not supported; use auto, cpu, cuda or cuda:N")
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
    x = x.float()  # checked after the cast: a float64 1e39 is inf in float32
    if not torch.isfinite(x).all():
        raise InputError("the batch contains NaN or infinite values (after the float32 cast); clean the input "
                         "before learning from it")
    if float(x.abs().max()) > MAX_INPUT:
        raise InputError(f"the batch holds values beyond ±{MAX_INPUT:g}; normalise the pixels (e.g. to mean 0, "
                         "std 1) before learning from them")
    return x


def check_loss(loss: torch.Tensor, where: str) -> None:
    """Refuse a step whose loss is not finite before it changes anything it has not changed yet."""
    if not bool(torch.isfinite(loss.detach()).all()):
        raise InputError(f"the loss of {where} is not finite on this batch; the step was refused there "
                         "(check the inputs' scale)")


def as_labels(y: torch.Tensor | np.ndarray | Iterable[int] | int, n: int, num_classes: int) -> torch.Tensor:
    t = torch.as_tensor(y)
    if t.is_floating_point() or t.is_complex():
        if not bool((t == t.round()).all()):
            raise InputError(f"labels must be whole class indices, got {t.reshape(-1)[:5].tolist()}")
    elif t.dtype == torch.bool:
        raise InputError("labels must be class indices, got booleans")
    y = t.long().reshape(-1)
    if y.shape[0] != n:
        raise InputError(f"got {y.shape[0]} labels for {n} samples")
    if n and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise InputError(f"labels must lie in 0..{num_classes - 1}; got {int(y.min())}..{int(y.max())}")
    return y


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
        if train.chunk < 0:
            raise ValueError(f"chunk must be 0 (whole batch) or a number of pairs, got {train.chunk}")
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
        if self.train_cfg.frugal and self.train_cfg.schedule != "olu":  # olu carries two layers' graphs by design
            frugal, _, _ = self.learn_block(enc(xb, yb), enc(xb, y_neg))
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
            check_loss(loss, f"layer {i + 1}")
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

    def encode_batch(self, x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray | list[int]
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """The positive and negative inputs of layer 1 for a batch (negatives drawn as ``learn_many`` draws
        them): what the first stage of a layer pipeline computes before its layers."""
        xb = as_batch(x, self.model_cfg.input_shape).to(self.device)
        yb = as_labels(y, xb.shape[0], self.model_cfg.num_classes).to(self.device)
        self.net.train()
        y_neg = self.negatives(self.net, xb, yb, self.generator)
        return self.net.encoder(xb, yb), self.net.encoder(xb, y_neg)

    def learn_block(self, hp: torch.Tensor, hn: torch.Tensor, start: int = 0, stop: int | None = None
                    ) -> tuple[list[LayerMetrics], torch.Tensor, torch.Tensor]:
        """The frugal step of layers ``start .. stop-1`` on their positive and negative inputs; returns
        their metrics and the block's detached outputs (the next block's inputs). ``learn_many`` runs
        every layer through it; a layer pipeline runs one block per rank (``edgeff.pipeline``)."""
        self.net.train()
        return self._learn_frugal(hp, hn, start, len(self.net.layers) if stop is None else stop)

    def _learn_frugal(self, hp: torch.Tensor, hn: torch.Tensor, start: int = 0, stop: int | None = None
                      ) -> tuple[list[LayerMetrics], torch.Tensor, torch.Tensor]:
        """The frugal step (schedules ``all`` and ``greedy``): one layer at a time, the batch passes in
        chunks of ``train.chunk`` positive/negative pairs; each chunk's graph is freed after its
        backward pass, so a training layer holds its input and output batches plus one chunk's graph.
        Gradients add up over the chunks to the whole batch's (both goodness losses are means over
        pairs), the layer steps once, and its gradients are freed at once; a Linear weight's gradient is
        kept as its factors and built a block of rows at a time inside the optimizer step
        (``edgeff.factored``), so it never exists whole. A batch-statistics BN at a
        layer's input (``order="pre"``, the goodness presets' layout) normalises every chunk with the
        whole batch's statistics, computed beforehand: the input is a constant for the layer, so this is
        the whole-batch update. A layer whose BN follows its weights (``order="post"``) cannot be split
        that way and takes the whole batch at once."""
        active = self._apply_greedy() if self.train_cfg.schedule == "greedy" else -1
        b = hp.shape[0]
        metrics: list[LayerMetrics] = []
        hook = self.layer_hook
        stop = len(self.net.layers) if stop is None else stop
        for i, layer in enumerate(self.net.local_layers):
            if i < start or i >= stop:
                continue
            if active >= 0 and i > active:
                break
            if hook is not None:
                hook(i, True)
            trains = active < 0 or i == active
            spec = self.model_cfg.layers[i]
            step = b if spec.norm == "batch" and spec.order != "pre" else (self.train_cfg.chunk or b)
            bns = [m for m in layer.modules() if isinstance(m, RunningBatchNorm)] if step < b else []
            kept = [(bn.running_mean.clone(), bn.running_var.clone()) for bn in bns]
            for bn in bns:
                bn.prepare([hp, hn])
            if trains:
                layer.ensure_optimizer().zero_grad(set_to_none=True)
            recorder: contextlib.AbstractContextManager[dict[torch.Tensor, factored.Factors]] = (
                factored.recording(layer, 2 * b) if trains else contextlib.nullcontext({}))
            try:
                with recorder as factors:  # Linear weight gradients as factors, never whole (edgeff.factored)
                    outs, loss_sum, gp_sum, gn_sum = self._chunks(layer, i, hp, hn, step, trains)
            except InputError:  # a non-finite loss: this layer keeps its parameters and statistics
                if trains:
                    layer.opt.zero_grad(set_to_none=True)  # type: ignore[union-attr]
                for bn, (mean, var) in zip(bns, kept, strict=True):
                    bn.running_mean.copy_(mean)
                    bn.running_var.copy_(var)
                raise
            finally:
                for bn in bns:
                    bn.release()
            if trains:
                layer.optimizer_step(factors)
                layer.opt.zero_grad(set_to_none=True)  # type: ignore[union-attr]
            del factors
            metrics.append(LayerMetrics(loss_sum / b, gp_sum / b, gn_sum / b, trains))
            hp, hn = outs
            del outs
            if hook is not None:
                hook(i, False)
        return metrics, hp, hn

    def _chunks(self, layer: torch.nn.Module, i: int, hp: torch.Tensor, hn: torch.Tensor, step: int, trains: bool
                ) -> tuple[list[torch.Tensor], float, float, float]:
        """Layer ``i`` over the batch in chunks of ``step`` pairs, each chunk's share of the gradient
        accumulated (when it ``trains``); returns its output batches and the sums of loss, g+ and g-."""
        b = hp.shape[0]
        outs: list[torch.Tensor] = []
        loss_sum = gp_sum = gn_sum = 0.0
        for s in range(0, b, step):
            n = min(step, b - s)
            with torch.set_grad_enabled(trains):
                out = layer(torch.cat([hp[s:s + n], hn[s:s + n]]))  # (2n, ...): the chunk's pairs
                g = goodness(out)  # (2n,)
                loss = self.loss_fn(g[:n], g[n:])
                check_loss(loss, f"layer {i + 1}")
                if trains:  # this chunk's share of the batch's gradient; a learned label encoder's
                    # graph (layer 0's input) is shared by every chunk, so it is kept to the last one
                    (loss * (n / b)).backward(retain_graph=hp.requires_grad and s + n < b)
            out = out.detach()
            if not outs:  # the layer's output batches, filled chunk by chunk
                outs = [out.new_empty((b, *out.shape[1:])) for _ in range(2)]
            outs[0][s:s + n], outs[1][s:s + n] = out[:n], out[n:]
            loss_sum += float(loss.detach()) * n
            gp_sum += float(g[:n].detach().sum())
            gn_sum += float(g[n:].detach().sum())
            del out, g, loss
        return outs, loss_sum, gp_sum, gn_sum

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
