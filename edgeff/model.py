"""The layer-local network, its predictors and its negative samplers."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from edgeff import labelled
from edgeff.config import ModelConfig, TrainConfig, select_layers
from edgeff.labels import LabelEncoder, make_encoder
from edgeff.layers import (
    HEAD_ROW_NORM,
    LocalLayer,
    class_row,
    grow_linear,
    make_block,
    make_optimizer,
    out_shape,
)
from edgeff.losses import goodness
from edgeff.optim import LeanOptimizer
from edgeff.readout import LdaPredictor


class LocalNet(nn.Module):
    """A label encoder followed by local layers; no layer's graph ever reaches another's."""

    def __init__(self, cfg: ModelConfig, train: TrainConfig, generator: torch.Generator) -> None:
        super().__init__()
        if not cfg.layers:
            raise ValueError("a model needs at least one layer")
        self.cfg = cfg
        self.encoder: LabelEncoder = make_encoder(
            cfg.label, cfg.num_classes, cfg.input_shape, generator, icp_rate=cfg.icp_rate, learned=cfg.label_learned
        )
        shape: tuple[int, ...] = self.encoder.out_shape()
        layers = []
        self.shapes: list[tuple[int, ...]] = []
        for spec in cfg.layers:
            block = make_block(
                spec,
                shape,
                generator,
                bn_momentum=cfg.bn_momentum,
                bn_min_batch=cfg.bn_min_batch,
                bn_always_running=cfg.bn_always_running,
                relu_grad=cfg.relu_grad,
                init=cfg.init,
            )
            layers.append(LocalLayer(block, optimizer=train.optimizer, lr=train.lr, state_dtype=train.optim_state_dtype,
                                     weight_decay=train.weight_decay))
            if cfg.peer_norm:  # the running mean activity of each unit on positives (peer normalisation)
                layers[-1].register_buffer("peer_mean", torch.full((out_shape(spec, shape)[0],), 0.5))
            shape = out_shape(spec, shape)
            self.shapes.append(shape)
        self.layers = nn.ModuleList(layers)
        if cfg.label_learned:
            layers[0].extra_params = list(self.encoder.parameters())
        self.split_first = labelled.applies(cfg)  # the first layer multiplies image and label code apart

    @property
    def local_layers(self) -> list[LocalLayer]:
        """The layers, typed."""
        return [layer for layer in self.layers if isinstance(layer, LocalLayer)]

    @property
    def num_classes(self) -> int:
        return self.cfg.num_classes

    def features(self, z: torch.Tensor) -> list[torch.Tensor]:
        """Every layer's output for already-encoded inputs ``z`` (no gradient)."""
        with torch.no_grad():
            return self._through(z, 0)

    def _through(self, h: torch.Tensor, start: int) -> list[torch.Tensor]:
        """The outputs of layers ``start ..`` for ``h``, layer ``start``'s input."""
        outs = []
        for layer in self.layers[start:]:
            h = layer(h)
            outs.append(h)
        return outs

    def label_goodness(self, x: torch.Tensor) -> torch.Tensor:
        """Goodness of every layer for every label: (B, K, L). ``x`` is replicated K times in one batch."""
        b, k = x.shape[0], self.num_classes
        with torch.no_grad():
            split = self.encoder.split(x) if self.split_first else None
            if split is not None:  # the image multiplied once for every label (edgeff.labelled)
                first = labelled.every_label(self.layers[0], split)  # (B*K, out)
                outs = [first, *self._through(first, 1)]
            else:
                labels = torch.arange(k, device=x.device).repeat(b)  # (B*K,)
                outs = self.features(self.encoder(x.repeat_interleave(k, dim=0), labels))  # from (B*K, C', H, W)
            gs = [goodness(h).view(b, k) for h in outs]
        return torch.stack(gs, dim=-1)  # (B, K, L)


class GoodnessPredictor:
    """Predict the label whose encoding gives the highest goodness, summed over chosen layers
    (mean over the chosen layers for the Trifecta's ensemble; the arg-max is the same)."""

    kind = "goodness"

    def __init__(self, layers: str = "all-but-first") -> None:
        self.layers = layers

    def scores(self, net: LocalNet, x: torch.Tensor) -> torch.Tensor:
        idx = select_layers(self.layers, len(net.layers))
        return net.label_goodness(x)[..., idx].sum(-1)  # (B, K)

    def learn(self, net: LocalNet, x: torch.Tensor, y: torch.Tensor) -> float | None:
        return None

    def grow(self, net: LocalNet, examples: torch.Tensor | None, generator: torch.Generator) -> None:
        """Nothing to grow: goodness is read for every label the encoder knows."""

    def end_of_plan(self, net: LocalNet, batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]) -> None:
        """Nothing to solve."""

    def ready(self, net: LocalNet, batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]] | None = None
              ) -> str | None:
        """Always ready to predict."""
        return None

    def state_dict(self) -> dict[str, object]:
        return {}

    def load_state_dict(self, state: dict[str, object]) -> None:
        return None


class HeadPredictor(nn.Module):
    """A linear softmax head on the detached, length-normalised features of one neutral-label pass
    (Hinton's one-pass classifier): one forward pass per sample instead of one per label. It steps with
    the layers' optimizer kind and weight decay at its own learning rate (``head_lr``)."""

    kind = "head"

    def __init__(self, net: LocalNet, layers: str, lr: float, generator: torch.Generator,
                 state_dtype: str = "float32", optimizer: str = "adam", weight_decay: float | None = None) -> None:
        super().__init__()
        self.state_dtype = state_dtype
        self.optimizer_kind = optimizer
        self.weight_decay = weight_decay
        self.layers = layers
        self.idx = select_layers(layers, len(net.layers))
        dim = sum(math.prod(net.shapes[i]) for i in self.idx)
        self.linear = nn.Linear(dim, net.num_classes)
        bound = 1 / math.sqrt(dim)
        nn.init.uniform_(self.linear.weight, -bound, bound, generator=generator)
        nn.init.zeros_(self.linear.bias)
        self.lr = lr
        self.opt: LeanOptimizer | None = None

    def _features(self, net: LocalNet, x: torch.Tensor) -> torch.Tensor:
        outs = net.features(net.encoder.neutral(x))
        feats = [F.normalize(outs[i].flatten(1), dim=1) * math.sqrt(outs[i][0].numel()) for i in self.idx]
        return torch.cat(feats, dim=1)  # (B, D)

    def scores(self, net: LocalNet, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.linear(self._features(net, x))

    def grow(self, net: LocalNet, examples: torch.Tensor | None, generator: torch.Generator) -> None:
        """One more output row: the new class's mean feature over ``examples`` (weight imprinting), or
        random, at the mean norm of the existing rows; its bias is the mean existing bias."""
        proto = None
        if examples is not None:
            with torch.no_grad():
                proto = self._features(net, examples).mean(0)  # (D,)
        grow_linear(self.linear, class_row(self.linear.weight, proto, generator, HEAD_ROW_NORM), [self.opt])

    def learn(self, net: LocalNet, x: torch.Tensor, y: torch.Tensor) -> float | None:
        """One cross-entropy step on the features the head will see at inference (eval mode, so the
        neutral pass does not touch the running BatchNorm statistics)."""
        was_training = net.training
        net.eval()
        feats = self._features(net, x)
        net.train(was_training)
        opt = self.ensure_optimizer()
        loss = F.cross_entropy(self.linear(feats), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    def end_of_plan(self, net: LocalNet, batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]) -> None:
        """Nothing to solve: the head learned every step."""

    def ready(self, net: LocalNet, batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]] | None = None
              ) -> str | None:
        """Always ready to predict: the head learned every step."""
        return None

    def ensure_optimizer(self) -> LeanOptimizer:
        if self.opt is None:
            self.opt = make_optimizer(list(self.linear.parameters()), self.optimizer_kind, self.lr, self.state_dtype,
                                      self.weight_decay)
        return self.opt


def make_predictor(train: TrainConfig, net: LocalNet, generator: torch.Generator
                   ) -> GoodnessPredictor | HeadPredictor | LdaPredictor:
    if train.predictor == "goodness":
        return GoodnessPredictor(train.eval_layers)
    if train.predictor == "head":
        return HeadPredictor(net, train.eval_layers, train.head_lr, generator, train.optim_state_dtype, train.optimizer,
                             train.weight_decay)
    if train.predictor == "lda":
        return LdaPredictor(net, select_layers(train.eval_layers, len(net.layers)), train.readout_memory,
                            net.cfg.shrinkage, train.readout_window, train.readout_size, mirror=train.hflip)
    raise ValueError(f"unknown predictor {train.predictor!r}; choose goodness, head or lda")


class NegativeSampler(Protocol):
    def __call__(self, net: LocalNet, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor: ...


def uniform_negatives(net: LocalNet, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A wrong label drawn uniformly from the other K−1 classes."""
    k = net.num_classes
    shift = torch.randint(1, k, (y.shape[0],), generator=generator).to(y.device)
    return (y + shift) % k


def hard_negatives(net: LocalNet, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A wrong label drawn in proportion to softmax(current goodness) over the wrong labels (Hinton 2022).

    Goodness is read in eval mode (running BatchNorm statistics are not touched) over all but the
    first layer.
    """
    was_training = net.training
    net.eval()
    g = net.label_goodness(x)[..., select_layers("all-but-first", len(net.layers))].sum(-1)  # (B, K)
    net.train(was_training)
    g = g.float().cpu()
    g[torch.arange(y.shape[0]), y.cpu()] = float("-inf")
    probs = torch.softmax(g, dim=1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1).to(y.device)


NEGATIVES: dict[str, NegativeSampler] = {"uniform": uniform_negatives, "hard": hard_negatives}
