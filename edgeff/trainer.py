"""The streaming layer-local trainer: ``learn_one/learn_many/predict_one/predict_many``.

Each step concatenates a positive batch (true labels) and a negative batch (wrong labels) and walks
the layers once. Every training layer computes its goodness, its local loss, and steps its own
optimizer; its output is detached before the next layer sees it. Under Overlapping Local Updates
(Trifecta app. G, Algorithm 1) a layer whose index parity differs from the step parity passes its
output on *without* detaching, so the next layer's loss also updates it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from edgeff import factored
from edgeff.augment import make_augment
from edgeff.config import ModelConfig, TrainConfig
from edgeff.contract import LearnerBase, register
from edgeff.errors import InputError
from edgeff.families import declaration
from edgeff.graphs import AllLabels, inference_block
from edgeff.inputs import as_batch, as_labels, check_loss, resolve_device  # noqa: F401 - re-exported
from edgeff.labelled import LabelledPairs, PairSource, TensorPairs
from edgeff.labels import OverlayEncoder
from edgeff.layers import RunningBatchNorm
from edgeff.loop import LayerMetrics, fit, train_epochs  # noqa: F401 - re-exported: the runtime-free training loop
from edgeff.losses import get_loss, goodness, peer_loss
from edgeff.model import NEGATIVES, GoodnessPredictor, HeadPredictor, LocalNet, make_predictor, select_layers
from edgeff.readout import LdaPredictor, layer_features

SCHEDULES = ("all", "greedy", "olu")
PEER_MOMENTUM = 0.9  # peer normalisation's running mean activity (the reference implementation's value)


def _fresh_negatives(y: torch.Tensor, fallback: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """For each label, another label present in ``y`` drawn uniformly; ``fallback`` where none is."""
    classes = torch.unique(y)  # sorted
    if classes.numel() < 2:
        return fallback
    pos = torch.searchsorted(classes, y)  # each label's place among the fresh classes
    shift = torch.randint(1, classes.numel(), (y.shape[0],), generator=generator).to(y.device)
    return classes[(pos + shift) % classes.numel()]


@register
class Learner(LearnerBase):
    """A ``LocalNet`` with its schedule, negatives and predictor, learning from a stream (the goodness
    family of the learner contract, ``edgeff.contract``).

    Args:
        model: the architecture and local loss.
        train: optimiser, schedule, predictor and seed.
    """

    net: LocalNet
    declaration = declaration("local")  # kind, losses, fields read (edgeff.families)
    metrics = "goodness"

    def __init__(self, model: ModelConfig, train: TrainConfig) -> None:
        if train.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {train.schedule!r}; choose one of {SCHEDULES}")
        if train.negatives not in NEGATIVES:
            raise ValueError(f"unknown negatives {train.negatives!r}; choose one of {sorted(NEGATIVES)}")
        if train.chunk < 0:
            raise ValueError(f"chunk must be 0 (whole batch) or a number of pairs, got {train.chunk}")
        super().__init__(model, train)
        self.net = LocalNet(model, train, self.generator).to(self.device)
        self.predictor = make_predictor(train, self.net, self.generator)
        if isinstance(self.predictor, torch.nn.Module):
            self.predictor.to(self.device)
        self.negatives = NEGATIVES[train.negatives]
        self.augment = make_augment(train, self.generator)  # random crops / flips of each batch before its step
        self.loss_fn = get_loss(model.loss, threshold=model.threshold, alpha=model.alpha, sharpness=model.sharpness)

    def _layer_loss(self, layer: torch.nn.Module, out: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                                     torch.Tensor | None]:
        """A layer's local loss on its output for ``n`` positives followed by ``n`` negatives: the goodness
        loss plus, with ``peer_norm``, the peer-normalisation loss; returns (loss, goodness, the positives'
        mean unit activity to fold into the layer's running mean once per batch, or None)."""
        g = goodness(out)  # (2n,)
        loss = self.loss_fn(g[:n], g[n:])
        if not self.model_cfg.peer_norm:
            return loss, g, None
        peer, act = peer_loss(out[:n], layer.get_buffer("peer_mean"), PEER_MOMENTUM)
        return loss + self.model_cfg.peer_norm * peer, g, act

    @staticmethod
    def _fold_peer(layer: torch.nn.Module, act: torch.Tensor | None) -> None:
        if act is not None:
            layer.get_buffer("peer_mean").mul_(PEER_MOMENTUM).add_(act, alpha=1 - PEER_MOMENTUM)

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
        seen, xb, yb = self._step_batch(x, y)  # the predictor learns ``seen``, the samples as they came
        b = xb.shape[0]
        self.net.train()
        y_neg = self.negatives(self.net, xb, yb, self.generator)
        if fresh is not None and 0 < fresh < b:
            y_neg = y_neg.clone()
            y_neg[:fresh] = _fresh_negatives(yb[:fresh], y_neg[:fresh], self.generator)
        first = self._first_pairs(xb, yb, y_neg)
        if self.train_cfg.frugal and self.train_cfg.schedule != "olu":  # olu carries two layers' graphs by design
            frugal, _, _ = self.learn_block(first)
            self._predictor_learns(seen, yb)
            self.step += 1
            self.samples_seen += b
            return frugal
        h = torch.empty(0)  # each layer's input batch after the first: positives then negatives (2B, ...)
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
            if not trains:  # the same loss as a training layer reports, peer term included (the frugal step's)
                with torch.no_grad():
                    out = first.run(layer, 0, b) if i == 0 else layer(h)
                    frozen_loss, g, _ = self._layer_loss(layer, out, b)
                metrics.append(LayerMetrics(float(frozen_loss), float(g[:b].mean()), float(g[b:].mean()), False))
                h = out
                continue
            out = first.run(layer, 0, b) if i == 0 else layer(h)  # (2B, ...)
            loss, g, act = self._layer_loss(layer, out, b)  # g: (2B,)
            check_loss(loss, f"layer {i + 1}")
            self._fold_peer(layer, act)
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
        self._predictor_learns(seen, yb)
        self.step += 1
        self.samples_seen += b
        return metrics

    def end_of_plan(self, batches: Callable[[], Iterable[tuple[Any, Any]]]) -> None:
        """The planned run is complete: the predictor's chance to solve itself (an lda readout that does not
        follow the stream takes one pass over ``batches()`` through the trained layers)."""
        self.predictor.end_of_plan(self.net, lambda: self._as_tensors(batches()))

    def ready_to_predict(self, batches: Callable[[], Iterable[tuple[Any, Any]]] | None = None) -> str | None:
        return self.predictor.ready(self.net, None if batches is None else lambda: self._as_tensors(batches()))

    def solve_readout(self, batches: Iterable[tuple[Any, Any]] | None = None) -> None:
        """Solve an lda predictor's readout from ``batches`` (labelled samples) through the layers as they
        are now, e.g. after training with ``learn_many``; its statistics restart from these samples. Without
        batches, from the samples its window holds (``TrainConfig.readout_window``)."""
        if not isinstance(self.predictor, LdaPredictor):
            raise InputError(f"solve_readout needs the lda predictor; this learner predicts by {self.predictor.kind}")
        self.predictor.solve(self.net, None if batches is None else self._as_tensors(batches))

    def _predictor_learns(self, xb: torch.Tensor, yb: torch.Tensor) -> None:
        """The predictor learns the batch's new samples: with a stream window the loop puts them first
        (``loop.planned_batches``: at most ``batch_size``), and the window's repeats are left out (a head
        would take one more gradient step on them; the lda statistics would count them again)."""
        new = min(xb.shape[0], self.train_cfg.batch_size) if self.train_cfg.window else xb.shape[0]
        self.predictor.learn(self.net, xb[:new], yb[:new])

    def encode_batch(self, x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray | list[int]) -> PairSource:
        """The positive and negative rows of layer 1 for a batch (negatives drawn as ``learn_many`` draws
        them): what the first stage of a layer pipeline computes before its layers."""
        _, xb, yb = self._step_batch(x, y)
        self.net.train()
        return self._first_pairs(xb, yb, self.negatives(self.net, xb, yb, self.generator))

    def _step_batch(self, x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray | list[int]
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(the batch as it came, the batch a step learns: randomly cropped / flipped with --crop-padding / --hflip,
        its labels), on the learner's device (an lda readout mirrors the samples itself)."""
        xb = as_batch(x, self.model_cfg.input_shape).to(self.device)
        yb = as_labels(y, xb.shape[0], self.model_cfg.num_classes).to(self.device)
        return xb, xb if self.augment is None else self.augment(xb), yb

    def _first_pairs(self, xb: torch.Tensor, yb: torch.Tensor, y_neg: torch.Tensor) -> PairSource:
        """The first layer's positive and negative rows: from the input's split where the layer takes it
        (``edgeff.labelled``: the image multiplied once for both labels), else the encoded batches."""
        enc = self.net.encoder
        if self.net.split_first:
            split = enc.split(xb)
            assert split is not None
            return LabelledPairs(split, yb, y_neg)
        return TensorPairs(enc(xb, yb), enc(xb, y_neg))

    def learn_block(self, src: PairSource, start: int = 0, stop: int | None = None
                    ) -> tuple[list[LayerMetrics], torch.Tensor, torch.Tensor]:
        """The frugal step of layers ``start .. stop-1`` on their positive and negative rows (``encode_batch``
        for layer 1, ``TensorPairs`` of the previous block's outputs after it); returns their metrics and
        the block's detached outputs (the next block's inputs). ``learn_many`` runs every layer through
        it; a layer pipeline runs one block per rank (``edgeff.pipeline``)."""
        self.net.train()
        return self._learn_frugal(src, start, len(self.net.layers) if stop is None else stop)

    def _learn_frugal(self, src: PairSource, start: int = 0, stop: int | None = None
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
        b = src.b
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
                bn.prepare(src.parts())
            if trains:
                layer.ensure_optimizer().zero_grad(set_to_none=True)
            recorder: contextlib.AbstractContextManager[dict[torch.Tensor, factored.Factors]] = (
                factored.recording(layer, 2 * b) if trains else contextlib.nullcontext({}))
            try:
                with recorder as factors:  # Linear weight gradients as factors, never whole (edgeff.factored)
                    outs, loss_sum, gp_sum, gn_sum = self._chunks(layer, i, src, step, trains)
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
            src = TensorPairs(*outs)
            del outs
            if hook is not None:
                hook(i, False)
        assert isinstance(src, TensorPairs)  # at least one layer ran
        return metrics, src.hp, src.hn

    def _chunks(self, layer: torch.nn.Module, i: int, src: PairSource, step: int, trains: bool
                ) -> tuple[list[torch.Tensor], float, float, float]:
        """Layer ``i`` over the batch in chunks of ``step`` pairs, each chunk's share of the gradient
        accumulated (when it ``trains``); returns its output batches and the sums of loss, g+ and g-."""
        b = src.b
        outs: list[torch.Tensor] = []
        loss_sum = gp_sum = gn_sum = 0.0
        acts: torch.Tensor | None = None  # the positives' mean unit activity over the batch (peer normalisation)
        for s in range(0, b, step):
            n = min(step, b - s)
            with torch.set_grad_enabled(trains):
                out = src.run(layer, s, n)  # (2n, ...): the chunk's pairs
                loss, g, act = self._layer_loss(layer, out, n)  # g: (2n,)
                check_loss(loss, f"layer {i + 1}")
                if act is not None:
                    acts = act * (n / b) if acts is None else acts + act * (n / b)
                if trains:  # this chunk's share of the batch's gradient; a learned label encoder's
                    # graph (layer 0's input) is shared by every chunk, so it is kept to the last one
                    (loss * (n / b)).backward(retain_graph=src.requires_grad and s + n < b)
            out = out.detach()
            if not outs:  # the layer's output batches, filled chunk by chunk
                outs = [out.new_empty((b, *out.shape[1:])) for _ in range(2)]
            outs[0][s:s + n], outs[1][s:s + n] = out[:n], out[n:]
            loss_sum += float(loss.detach()) * n
            gp_sum += float(g[:n].detach().sum())
            gn_sum += float(g[n:].detach().sum())
            del out, g, loss
        if trains:
            self._fold_peer(layer, acts)
        return outs, loss_sum, gp_sum, gn_sum

    # ----------------------------------------------------------------- growth
    def add_class(self, name: str, examples: torch.Tensor | np.ndarray | None = None) -> int:
        """Add a class online; returns its index (the old classes keep theirs).

        The label encoder grows (a new Intrinsic Class Pattern, label-channel row or overlay slot) and
        so does a head predictor. Goodness has nothing to initialise from ``examples`` — the new label
        is learned from the stream — but a head predictor imprints their mean feature. The goodness
        and scores of the existing classes are unchanged until training resumes, with two exceptions:
        a head predictor's neutral input averages over the classes, and an overlay label (FF) covers one
        more image pixel with the new class's slot, so their scores move a little.

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

    def layer_predictions(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Each layer's own goodness arg-max: (B, L)."""
        xb = as_batch(x, self.model_cfg.input_shape).to(self.device)
        self.net.eval()
        return self.net.label_goodness(xb).argmax(1).cpu()

    def select_eval_layers(self, layers: str) -> None:
        select_layers(layers, len(self.net.local_layers))  # validates
        self.predictor = GoodnessPredictor(layers)

    # ------------------------------------------------------------------------ checkpoint, export
    def _optim_state(self) -> dict[str, Any]:
        popt = getattr(self.predictor, "opt", None)
        return {"optim": [None if layer.opt is None else layer.opt.state_dict() for layer in self.net.local_layers],
                "predictor": self.predictor.state_dict(),
                "predictor_optim": None if popt is None else popt.state_dict()}

    def _load_optim_state(self, state: dict[str, Any]) -> None:
        for layer, opt_state in zip(self.net.local_layers, state["optim"], strict=True):
            if opt_state is not None:
                layer.ensure_optimizer().load_state_dict(opt_state)
        self.predictor.load_state_dict(state["predictor"])
        if state.get("predictor_optim") is not None and isinstance(self.predictor, HeadPredictor):
            self.predictor.ensure_optimizer().load_state_dict(state["predictor_optim"])

    def inference_graph(self, layers: str | None = None) -> nn.Module:
        pred = self.predictor
        if isinstance(pred, HeadPredictor | LdaPredictor) and layers is None:  # one linear map on neutral features
            return HeadGraph(self, pred).eval()
        sel = layers or (pred.layers if isinstance(pred, GoodnessPredictor) else "all-but-first")
        return GoodnessGraph(self, sel).eval()

    def prediction_kind(self, layers: str | None = None) -> str:
        return "logits" if isinstance(self.predictor, HeadPredictor | LdaPredictor) and layers is None else \
            f"goodness:{layers or 'default'}"


class GoodnessGraph(nn.Module):
    """scores[b, k] = sum over the chosen layers of the goodness of x_b encoded with label k."""

    def __init__(self, learner: Learner, layers: str) -> None:
        super().__init__()
        self.k = learner.model_cfg.num_classes
        self.encode = AllLabels(learner.net.encoder, self.k)
        self.blocks = nn.ModuleList(inference_block(layer.block) for layer in learner.net.local_layers)
        self.idx = select_layers(layers, len(self.blocks))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encode(x)
        total = torch.zeros_like(x[:, 0, 0, 0]).unsqueeze(1)  # (B, 1), broadcast below
        for i, block in enumerate(self.blocks):
            h = block(h)
            if i in self.idx:
                total = total + h.pow(2).flatten(1).mean(1).view(-1, self.k)  # (B, K)
            if i >= max(self.idx):
                break
        return total, total.argmax(1)


class HeadGraph(nn.Module):
    """One neutral-label pass and the softmax head's logits."""

    code: torch.Tensor

    def __init__(self, learner: Learner, head: HeadPredictor | LdaPredictor) -> None:
        super().__init__()
        enc = learner.net.encoder
        neutral = enc.neutral(torch.zeros(1, *learner.model_cfg.input_shape))  # (1, C', H, W)
        c = learner.model_cfg.input_shape[0]
        self.overlay = isinstance(enc, OverlayEncoder)
        self.k = learner.model_cfg.num_classes
        code = neutral.flatten(1)[:, : self.k] if self.overlay else neutral[:, c:]
        self.register_buffer("code", code.clone())
        self.blocks = nn.ModuleList(inference_block(layer.block) for layer in learner.net.local_layers)
        self.idx = head.idx
        # an lda readout pools large maps (readout_size) and scales by the pooled size, as its own features do
        pools = getattr(head, "pools", [(1, 1)] * len(head.idx))
        self.pools = {i: tuple(k) for i, k in zip(head.idx, pools, strict=True)}
        self.scales = dict(zip(head.idx, head.scales, strict=True)) if hasattr(head, "scales") else \
            {i: math.sqrt(math.prod(learner.net.shapes[i])) for i in head.idx}
        self.linear = head.linear

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, c, h, w = x.shape
        code = self.code.expand(b, *self.code.shape[1:])
        if self.overlay:
            z = torch.cat([code, x.reshape(b, -1)[:, self.k :]], dim=1).reshape(b, c, h, w)
        else:
            z = torch.cat([x, code], dim=1)
        feats = []
        for i, block in enumerate(self.blocks):
            z = block(z)
            if i in self.idx:
                feats.append(layer_features(z, self.pools[i], self.scales[i]))
        logits = self.linear(torch.cat(feats, dim=1))
        return logits, logits.argmax(1)
