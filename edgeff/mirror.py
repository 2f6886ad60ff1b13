"""Mirror FFCL (Improved Forward-Forward Contrastive Learning, arXiv:2405.03432): two identical models
see the same inputs; each hidden layer is pulled toward the corresponding layer of the *other* model
with a cosine-embedding loss (the other model's output is a fixed target: no gradient crosses models
or layers); each model's output layer learns with binary cross-entropy on one-hot targets from its
detached last hidden features. Prediction: the mean of both models' sigmoid outputs.

The paper pulls only each sample's two copies together (``negatives=False``, 784-64-64-10, ~63% on
MNIST): nothing in the hidden layers depends on the label, so they stay close to their random start.
``negatives=True`` is our supervised variant: each sample's features are also pulled toward the other
model's features of every same-class sample in the batch and pushed (cosine below ``margin``) away from
every other-class sample — the same cosine-embedding loss, fed label-aware pairs.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgeff.config import ModelConfig, TrainConfig
from edgeff.contract import LearnerBase, register
from edgeff.families import declaration
from edgeff.graphs import inference_block
from edgeff.inputs import as_batch, as_labels, check_loss
from edgeff.layers import (
    HEAD_ROW_NORM,
    LocalLayer,
    class_row,
    grow_linear,
    make_block,
    make_optimizer,
    out_shape,
)
from edgeff.loop import LayerMetrics
from edgeff.optim import LeanOptimizer


def mirror_loss(h: torch.Tensor, target: torch.Tensor, y: torch.Tensor | None, *, margin: float = 0.0) -> torch.Tensor:
    """Cosine-embedding loss of features ``h`` (B, N) toward the other model's ``target`` (B, N).

    ``y`` None: pairs (i, i) with target +1 only (the paper): mean of 1 − cos(h_i, t_i).
    With labels: additionally every pair (i, j) of the batch, +1 when y_i = y_j (1 − cos) and −1
    otherwise (max(0, cos − margin)), averaged over the B² pairs.
    """
    h, target = h.flatten(1), target.flatten(1)
    loss = F.cosine_embedding_loss(h, target, torch.ones(h.shape[0], device=h.device))
    if y is None:
        return loss
    cos = F.normalize(h, dim=1) @ F.normalize(target, dim=1).T  # (B, B): every pair across the two models
    same = (y[:, None] == y[None, :]).float()
    pair = same * (1 - cos) + (1 - same) * torch.clamp(cos - margin, min=0)  # CosineEmbeddingLoss, per pair
    return loss + pair.mean()


class MirrorModel(nn.Module):
    """One of the two mirrored models: local hidden layers and the BCE output layer."""

    def __init__(self, layers: list[LocalLayer], out: nn.Linear) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.out = out

    @property
    def local_layers(self) -> list[LocalLayer]:
        return [layer for layer in self.layers if isinstance(layer, LocalLayer)]


@register
class MirrorLearner(LearnerBase):
    """Two mirrored layer-local models (the learner contract, ``edgeff.contract``).

    Args:
        model: the hidden layers (``layers``) and ``loss`` = ``mirror``; ``mirror_negatives`` picks the
            supervised pairing, ``margin_last`` its cosine margin.
        train: optimizer (Adam in the paper), lr, optimizer state dtype, seed.
    """

    declaration = declaration("mirror")  # kind, losses, fields read (edgeff.families)

    def __init__(self, model: ModelConfig, train: TrainConfig) -> None:
        super().__init__(model, train)
        self.mirrors = [self._build(model, train).to(self.device) for _ in range(2)]
        self.models = nn.ModuleList(self.mirrors)
        self._out_opts: list[LeanOptimizer] | None = None  # the output layers' optimizers, made at the first step

    def _build(self, cfg: ModelConfig, train: TrainConfig) -> MirrorModel:
        shape: tuple[int, ...] = cfg.input_shape
        layers = []
        for spec in cfg.layers:
            block = make_block(spec, shape, self.generator, bn_momentum=cfg.bn_momentum, bn_min_batch=cfg.bn_min_batch,
                               bn_always_running=cfg.bn_always_running)
            layers.append(LocalLayer(block, optimizer=train.optimizer, lr=train.lr, state_dtype=train.optim_state_dtype))
            shape = out_shape(spec, shape)
        out = nn.Linear(math.prod(shape), cfg.num_classes)
        bound = 1 / math.sqrt(math.prod(shape))
        nn.init.uniform_(out.weight, -bound, bound, generator=self.generator)
        nn.init.zeros_(out.bias)
        return MirrorModel(layers, out)

    @property
    def net(self) -> nn.ModuleList:  # type: ignore[override]
        return self.models

    def set_lr(self, lr: float) -> None:
        for m in self.mirrors:
            for layer in m.local_layers:
                layer.set_lr(lr)
        for opt in self._out_opts or []:
            for g in opt.param_groups:
                g["lr"] = lr

    def _out_opt(self, i: int) -> LeanOptimizer:
        if self._out_opts is None:
            t = self.train_cfg
            self._out_opts = [make_optimizer(list(m.out.parameters()), t.optimizer, t.lr, t.optim_state_dtype)
                              for m in self.mirrors]
        return self._out_opts[i]

    def learn_many(self, x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray | list[int], *,
                   fresh: int | None = None) -> list[LayerMetrics]:
        """One local step of every layer of both models; metrics per layer (model A's loss). ``fresh``
        (replayed samples follow) is accepted and ignored: the BCE outputs are independent per class."""
        xb = as_batch(x, self.model_cfg.input_shape).to(self.device)
        yb = as_labels(y, xb.shape[0], self.model_cfg.num_classes).to(self.device)
        labels = yb if self.model_cfg.mirror_negatives else None
        self.models.train()
        ha, hb = xb, xb
        metrics = []
        for la, lb in zip(self.mirrors[0].local_layers, self.mirrors[1].local_layers, strict=True):
            oa, ob = la(ha), lb(hb)
            losses = []
            for layer, out, other in ((la, oa, ob), (lb, ob, oa)):
                loss = mirror_loss(out, other.detach(), labels, margin=self.model_cfg.margin_last)
                check_loss(loss, "a mirrored layer")
                opt = layer.ensure_optimizer()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                layer.optimizer_step()
                losses.append(float(loss.detach()))
            metrics.append(LayerMetrics(losses[0], 0.0, 0.0, True))
            ha, hb = oa.detach(), ob.detach()
        onehot = F.one_hot(yb, self.model_cfg.num_classes).float()
        for i, (m, h) in enumerate(zip(self.mirrors, (ha, hb), strict=True)):
            loss = F.binary_cross_entropy_with_logits(m.out(h.flatten(1)), onehot)
            opt = self._out_opt(i)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if i == 0:
                metrics.append(LayerMetrics(float(loss.detach()), 0.0, 0.0, True))
        self.step += 1
        self.samples_seen += xb.shape[0]
        return metrics

    def add_class(self, name: str, examples: torch.Tensor | np.ndarray | None = None) -> int:
        """Both models' output layers get one more unit, imprinted from the mean last hidden feature of
        ``examples`` (or random) at the mean norm of the existing rows. Returns the new index."""
        cfg = self.model_cfg.with_class(name)
        xb = None if examples is None else as_batch(examples, self.model_cfg.input_shape).to(self.device)
        self.models.eval()
        for i, m in enumerate(self.mirrors):
            proto = None
            if xb is not None:
                with torch.no_grad():
                    h = xb
                    for layer in m.local_layers:
                        h = layer(h)
                    proto = h.flatten(1).mean(0)
            opts = [self._out_opts[i]] if self._out_opts is not None else []
            grow_linear(m.out, class_row(m.out.weight, proto, self.generator, HEAD_ROW_NORM), opts)
        self.model_cfg = cfg
        return cfg.num_classes - 1

    def scores(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Mean of both models' sigmoid outputs (B, K)."""
        xb = as_batch(x, self.model_cfg.input_shape).to(self.device)
        self.models.eval()
        outs = []
        with torch.no_grad():
            for m in self.mirrors:
                h = xb
                for layer in m.local_layers:
                    h = layer(h)
                outs.append(torch.sigmoid(m.out(h.flatten(1))))
        return torch.stack(outs).mean(0)

    # ------------------------------------------------------------------------ checkpoint, export
    def _optim_state(self) -> dict[str, Any]:
        return {"optim": [None if layer.opt is None else layer.opt.state_dict()
                          for m in self.mirrors for layer in m.local_layers],
                "predictor_optim": [o.state_dict() for o in self._out_opts or []]}

    def _load_optim_state(self, state: dict[str, Any]) -> None:
        layers = [la for m in self.mirrors for la in m.local_layers]
        for layer, opt_state in zip(layers, state["optim"], strict=True):
            if opt_state is not None:
                layer.ensure_optimizer().load_state_dict(opt_state)
        for i, opt_state in enumerate(state.get("predictor_optim") or []):
            self._out_opt(i).load_state_dict(opt_state)

    def inference_graph(self, layers: str | None = None) -> nn.Module:
        return MirrorGraph(self).eval()


class MirrorGraph(nn.Module):
    """Mirror FFCL: the mean of both models' sigmoid outputs."""

    def __init__(self, learner: MirrorLearner) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(*[inference_block(la.block) for la in m.local_layers])
                                    for m in learner.mirrors)
        self.outs = nn.ModuleList(m.out for m in learner.mirrors)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = [torch.sigmoid(out(blocks(x).flatten(1))) for blocks, out in zip(self.blocks, self.outs, strict=True)]
        scores = torch.stack(probs).mean(0)
        return scores, scores.argmax(1)
