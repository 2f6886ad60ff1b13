"""The end-to-end backprop baseline: the same blocks as a ``LocalNet``, no label input, a linear
head, cross-entropy through every layer and one optimizer. The learner contract (``edgeff.contract``);
``learn_many`` reports the whole net as one ``LayerMetrics`` (its cross-entropy)."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgeff.augment import make_augment, make_views
from edgeff.config import ModelConfig, TrainConfig
from edgeff.contract import LearnerBase, register
from edgeff.families import declaration
from edgeff.graphs import inference_block
from edgeff.inputs import as_batch, as_labels, check_loss, in_row_blocks, peak_row_bytes
from edgeff.kmeans import GridMean
from edgeff.layers import HEAD_ROW_NORM, class_row, grow_linear, make_block, make_optimizer, out_shape
from edgeff.loop import LayerMetrics
from edgeff.losses import fresh_class_mask


class BPNet(nn.Module):
    def __init__(self, cfg: ModelConfig, generator: torch.Generator) -> None:
        super().__init__()
        shape: tuple[int, ...] = cfg.input_shape
        blocks = []
        for spec in cfg.layers:
            # a kmeans layer (fitted, not trained: edgeff.kmeans) is, under backprop, its trainable
            # counterpart: a conv of as many kernel×kernel filters, ReLU, average-pooled to the same grid
            trainable = replace(spec, kind="conv", padding=0, pool=1) if spec.kind == "kmeans" else spec
            block = make_block(trainable, shape, generator, bn_momentum=cfg.bn_momentum,
                               bn_min_batch=cfg.bn_min_batch, bn_always_running=cfg.bn_always_running)
            if spec.kind == "kmeans":
                block.append(GridMean(spec.pool))
            blocks.append(block)
            shape = out_shape(spec, shape)
        self.blocks = nn.Sequential(*blocks)
        self.global_pool = cfg.global_pool and len(shape) in (2, 3)  # conv maps or ViT tokens
        dim = (shape[0] if len(shape) == 3 else shape[1]) if self.global_pool else math.prod(shape)
        self.head = nn.Linear(dim, cfg.num_classes)
        bound = 1 / math.sqrt(dim)
        nn.init.uniform_(self.head.weight, -bound, bound, generator=generator)
        nn.init.zeros_(self.head.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """What the head reads: (B, D)."""
        h = self.blocks(x)
        if self.global_pool:
            h = h.mean((2, 3)) if h.dim() == 4 else h.mean(1)  # (B, C): global average pooling / token mean
        return h.flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # (B, K)


@register
class BPLearner(LearnerBase):
    """Backprop on the architecture of ``model`` (a preset's twin is built with
    ``edgeff.contract.build(..., backprop=True)``, which drops the label encoder and local loss settings)."""

    net: BPNet
    declaration = declaration("bp")  # kind, fields read (edgeff.families)

    def __init__(self, model: ModelConfig, train: TrainConfig) -> None:
        super().__init__(model, train)
        self.net = BPNet(model, self.generator).to(self.device)
        self.opt = make_optimizer(list(self.net.parameters()), train.optimizer, train.lr, train.optim_state_dtype,
                                  train.weight_decay)
        self.augment = make_augment(train, self.generator)
        self._row_bytes: int | None = None  # one sample's largest activation, measured at the first scores()

    def set_lr(self, lr: float) -> None:
        for group in self.opt.param_groups:
            group["lr"] = lr

    def learn_many(self, x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray | list[int], *,
                   fresh: int | None = None) -> list[LayerMetrics]:
        """One end-to-end step; its cross-entropy as one ``LayerMetrics`` (the goodness fields are 0). ``fresh``: the first ``fresh`` samples are
        new stream samples whose softmax runs over the fresh samples' classes only, the rest replayed
        ones over every class (ER-ACE, Caccia et al. 2022). With the train config's ``views`` /
        augmentation the step sees the same kind of augmented views as a contrastive learner (two
        views: a 2B batch), so a side-by-side comparison trains both on the same data."""
        xb = as_batch(x, self.model_cfg.input_shape).to(self.device)
        yb = as_labels(y, xb.shape[0], self.model_cfg.num_classes).to(self.device)
        n = xb.shape[0]
        allowed = fresh_class_mask(yb, fresh, self.model_cfg.num_classes)
        xb, yb, allowed = make_views(xb, yb, self.train_cfg.views, self.augment, allowed)
        self.net.train()
        logits = self.net(xb)  # (B, K)
        if allowed is not None:
            logits = logits.masked_fill(~allowed, float("-inf"))
        loss = F.cross_entropy(logits, yb)
        check_loss(loss, "the backprop step")  # before anything changes
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.step += 1
        self.samples_seen += n
        return [LayerMetrics(float(loss.detach()), 0.0, 0.0, True)]

    def add_class(self, name: str, examples: torch.Tensor | np.ndarray | None = None) -> int:
        """A growing output head: one more logit, its weights imprinted from the mean feature of
        ``examples`` (or random) at the mean norm of the existing rows, bias the mean existing bias;
        the optimizer's state grows with it. Returns the new class's index."""
        cfg = self.model_cfg.with_class(name)
        proto = None
        if examples is not None:
            xb = as_batch(examples, self.model_cfg.input_shape).to(self.device)
            self.net.eval()
            with torch.no_grad():
                proto = self.net.features(xb).mean(0)
        grow_linear(self.net.head, class_row(self.net.head.weight, proto, self.generator, HEAD_ROW_NORM), [self.opt])
        self.model_cfg = cfg
        return cfg.num_classes - 1

    def scores(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Class scores (B, K), the batch in blocks of rows whose activations stay bounded (``BLOCK_BYTES``: a
        wide conv's maps are megabytes per sample, and a test batch of 1,000 through kmeans-conv3200's twin
        took 19 GB at once)."""
        xb = as_batch(x, self.model_cfg.input_shape).to(self.device)
        self.net.eval()
        if self._row_bytes is None:
            self._row_bytes = peak_row_bytes(self.net, xb[:1])
        with torch.no_grad():
            return in_row_blocks(self.net, xb, self._row_bytes)

    # ------------------------------------------------------------------------ checkpoint, export
    def _optim_state(self) -> dict[str, Any]:
        return {"optim": self.opt.state_dict()}

    def _load_optim_state(self, state: dict[str, Any]) -> None:
        self.opt.load_state_dict(state["optim"])

    def inference_graph(self, layers: str | None = None) -> nn.Module:
        return BPGraph(self).eval()


class BPGraph(nn.Module):
    def __init__(self, learner: BPLearner) -> None:
        super().__init__()
        self.blocks = inference_block(learner.net.blocks)
        self.head = learner.net.head
        self.global_pool = learner.net.global_pool

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.blocks(x)
        if self.global_pool:
            h = h.mean((2, 3)) if h.dim() == 4 else h.mean(1)
        logits = self.head(h.flatten(1))
        return logits, logits.argmax(1)
