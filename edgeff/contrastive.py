"""The contrastive family: one forward pass per sample, no label in the input.

- **CFL** (Lee et al., *Backpropagation-free contrastive forward learning using label embeddings*):
  a learned label-embedding dictionary D (Z × C_D) gives every layer a local target. Layer l's output
  is read as K feature vectors of width C_l (conv: K = H×W locations; linear: the output split into
  ``groups`` contiguous chunks); their mean h̄ represents the sample. D is average-pooled to C_l
  (stride C_D / C_l, kernel C_D − (C_l − 1)·stride, no padding) and, while training, gets noise
  N(0, 1/C_l²). Loss: λ1·L_batch + λ2·L_dict + λ3·L_feat (``edgeff.losses``); D receives gradients only
  from the last layer's loss and steps with that layer's optimizer. Any layer predicts in one pass by
  arg-max ⟨h̄, pooled D⟩; the scores of ``eval_layers`` are summed after dividing each layer's by
  ‖h̄‖ (so no layer's feature scale dominates; a single layer's arg-max is the paper's rule, and the
  existing classes' scores do not move when a class is added).
- **CFF** (Aghagolzadeh & Ezoji, *Contrastive Forward-Forward*): every layer minimises the supervised
  contrastive loss on its L2-normalised mean feature (CFF+M: the marginal variant, margin falling
  linearly from ``margin_first`` to ``margin_last``). Two-view mode (``TrainConfig.views = 2``: every
  batch as two randomly augmented copies, ``edgeff.augment``) or one-forward mode (one view, half the
  cost; the paper: 1-2 pt lower). Either mode works for CFL too. Prediction: a linear head trained
  with cross-entropy on the detached last-layer mean features, alongside the stream (the paper's
  stage 2 run concurrently; it converges to the same frozen-feature head once the encoder settles).
  Or (``TrainConfig.predictor = "lda"``) the goodness family's closed-form lda readout
  (``edgeff.readout.LdaPredictor``) on the ``eval_layers``' outputs, a ViT's tokens pooled over the patch grid
  they cover to about ``readout_size``×``readout_size`` (CIFAR-10's cff-vit: 2×2 of the last layer's 8×8 tokens,
  where the head reads their mean), solved when the planned run is complete; no head is trained then.

``ContrastiveLearner`` speaks the same verbs as ``edgeff.trainer.Learner``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgeff import factored
from edgeff.augment import make_augment, make_views
from edgeff.config import ModelConfig, TrainConfig
from edgeff.contract import LearnerBase, register
from edgeff.errors import InputError
from edgeff.families import declaration
from edgeff.graphs import inference_block
from edgeff.inputs import as_batch, as_labels, check_loss
from edgeff.layers import (
    HEAD_ROW_NORM,
    LocalLayer,
    class_row,
    grow_linear,
    grow_rows,
    make_block,
    make_optimizer,
    out_shape,
)
from edgeff.loop import LayerMetrics
from edgeff.losses import (
    cfl_batch_loss,
    cfl_dict_loss,
    cfl_feat_loss,
    fresh_class_mask,
    margin_at,
    supcon_loss,
)
from edgeff.model import select_layers
from edgeff.readout import LdaPredictor, layer_features

CONTRASTIVE_LOSSES = ("supcon", "cfl")


def feature_vectors(h: torch.Tensor, groups: int) -> torch.Tensor:
    """A layer's output as K feature vectors: (B, K, C). Conv (B, C, H, W): K = H·W; ViT (B, N, E): the
    N tokens; linear (B, G·C): K = G."""
    if h.dim() == 4:
        return h.flatten(2).transpose(1, 2)  # (B, H*W, C)
    if h.dim() == 3:
        return h  # (B, N, E) tokens
    b, n = h.shape
    if n % groups:
        raise ValueError(f"a linear layer of width {n} cannot be split into {groups} groups")
    return h.view(b, groups, n // groups)  # (B, G, C)


def pool_embeddings(d: torch.Tensor, width: int) -> torch.Tensor:
    """CFL's average pooling of the dictionary rows (Z, C_D) to ``width`` values (Z, width)."""
    dim = d.shape[1]
    if width > dim:
        raise ValueError(f"cannot pool {dim}-wide embeddings to {width} values; raise embed_dim")
    stride = dim // width
    return F.avg_pool1d(d[None], dim - (width - 1) * stride, stride)[0]


class NoLabel:
    """The neutral-label pass of a network with no label in its input: the input as it is."""

    @staticmethod
    def neutral(x: torch.Tensor) -> torch.Tensor:
        return x


class ContrastiveNet(nn.Module):
    """Local layers (no label encoder), the CFL dictionary or the CFF head."""

    def __init__(self, cfg: ModelConfig, train: TrainConfig, generator: torch.Generator) -> None:
        super().__init__()
        if cfg.loss not in CONTRASTIVE_LOSSES:
            raise ValueError(f"ContrastiveNet trains {CONTRASTIVE_LOSSES}, not {cfg.loss!r}")
        if not cfg.layers:
            raise ValueError("a model needs at least one layer")
        self.cfg = cfg
        shape: tuple[int, ...] = cfg.input_shape
        layers = []
        self.shapes: list[tuple[int, ...]] = []
        for spec in cfg.layers:
            block = make_block(spec, shape, generator, bn_momentum=cfg.bn_momentum, bn_min_batch=cfg.bn_min_batch,
                               bn_always_running=cfg.bn_always_running)
            layers.append(LocalLayer(block, optimizer=train.optimizer, lr=train.lr, state_dtype=train.optim_state_dtype))
            shape = out_shape(spec, shape)
            self.shapes.append(shape)
        self.layers = nn.ModuleList(layers)
        # C_l per layer: conv channels, ViT embedding width, or a linear layer's group width
        self.widths = [s[0] if len(s) == 3 else s[1] if len(s) == 2 else s[0] // cfg.groups for s in self.shapes]
        self.embed: nn.Parameter | None = None
        if cfg.loss == "cfl":
            dim = cfg.embed_dim or max(self.widths)
            self.embed = nn.Parameter(torch.randn(cfg.num_classes, dim, generator=generator))
            layers[-1].extra_params = [self.embed]  # D learns from the last layer's loss only
        self.head = nn.Linear(self.widths[-1], cfg.num_classes)
        bound = 1 / math.sqrt(self.widths[-1])
        nn.init.uniform_(self.head.weight, -bound, bound, generator=generator)
        nn.init.zeros_(self.head.bias)
        self.readout: LdaPredictor | None = None  # CFF's lda predictor (in the checkpoint as readout.*)
        if cfg.loss == "supcon" and train.predictor == "lda":
            self.readout = LdaPredictor(self, select_layers(train.eval_layers, len(self.layers)), train.readout_memory,
                                        cfg.shrinkage, train.readout_window, train.readout_size,
                                        mirror=train.hflip)

    encoder = NoLabel()  # what a readout reads through (``readout.LocalNet``): no label in the input

    def features(self, z: torch.Tensor) -> list[torch.Tensor]:
        """Every layer's output (no gradient)."""
        out = []
        with torch.no_grad():
            for layer in self.layers:
                z = layer(z)
                out.append(z)
        return out

    @property
    def local_layers(self) -> list[LocalLayer]:
        return [layer for layer in self.layers if isinstance(layer, LocalLayer)]

    @property
    def num_classes(self) -> int:
        return int(self.embed.shape[0]) if self.embed is not None else self.cfg.num_classes

    def mean_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every layer's mean feature vector h̄ (B, C_l), no gradient."""
        out = []
        with torch.no_grad():
            h = x
            for layer in self.layers:
                h = layer(h)
                out.append(feature_vectors(h, self.cfg.groups).mean(1))
        return out

    def layer_scores(self, x: torch.Tensor) -> list[torch.Tensor]:
        """CFL: ⟨h̄ / ‖h̄‖, pooled D⟩ per layer, each (B, Z) (per sample, the arg-max of ⟨h̄, pooled D⟩)."""
        assert self.embed is not None
        return [F.normalize(f, dim=1) @ pool_embeddings(self.embed.detach(), f.shape[1]).T for f in self.mean_features(x)]


@register
class ContrastiveLearner(LearnerBase):
    """Learns a ``ContrastiveNet`` layer by layer from a stream (the learner contract, ``edgeff.contract``).

    Args:
        model: layers and ``loss`` = ``cfl`` or ``supcon`` with their hyperparameters.
        train: optimiser, eval_layers (CFL), head_lr (CFF), views and augmentation, seed.
    """

    net: ContrastiveNet
    declaration = declaration("contrastive")  # kind, losses, fields read (edgeff.families)
    metrics = "norm"

    def __init__(self, model: ModelConfig, train: TrainConfig) -> None:
        super().__init__(model, train)
        self.net = ContrastiveNet(model, train, self.generator).to(self.device)
        self.head_opt = make_optimizer(list(self.net.head.parameters()), "adam", train.head_lr,
                                       train.optim_state_dtype) if model.loss == "supcon" and self.net.readout is None \
            else None
        self.eval_layers = select_layers(train.eval_layers, len(self.net.layers))
        self.augment = make_augment(train, self.generator)

    def set_lr(self, lr: float) -> None:
        for layer in self.net.local_layers:
            layer.set_lr(lr)

    # ----------------------------------------------------------------- losses
    def _noise(self, shape: tuple[int, ...], width: int) -> torch.Tensor:
        if not self.model_cfg.embed_noise:
            return torch.zeros(shape, device=self.device)
        return (torch.randn(shape, generator=self.generator) / width).to(self.device)

    def _cfl_loss(self, i: int, hbar: torch.Tensor, y: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor:
        cfg = self.model_cfg
        assert self.net.embed is not None
        d = self.net.embed if i == len(self.net.layers) - 1 else self.net.embed.detach()  # CFL eq. 3
        c = hbar.shape[1]
        pooled = pool_embeddings(d, c)  # (Z, C_l)
        l1, l2, l3 = cfg.cfl_weights
        loss = hbar.new_zeros(())
        if l1:
            t = pooled[y] + self._noise((y.shape[0], c), c)  # one noisy embedding per sample (eq. 2)
            loss = loss + l1 * cfl_batch_loss(hbar, y, t)
        if l2:
            loss = loss + l2 * cfl_dict_loss(hbar, y, pooled + self._noise(tuple(pooled.shape), c), allowed=allowed)
        if l3:
            loss = loss + l3 * cfl_feat_loss(F.normalize(hbar, dim=1), y, tau=cfg.temperature)
        return loss

    def _supcon_loss(self, i: int, hbar: torch.Tensor, y: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor:
        cfg = self.model_cfg
        m = margin_at(i, len(self.net.layers), cfg.margin_first, cfg.margin_last)
        return supcon_loss(F.normalize(hbar, dim=1), y, tau=cfg.temperature, margin=m)

    # ----------------------------------------------------------------- learning
    def learn_many(self, x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray | list[int], *,
                   fresh: int | None = None) -> list[LayerMetrics]:
        """One local step of every layer on a batch; returns one ``LayerMetrics`` per layer (loss; the
        goodness fields hold the mean feature norm for positives and 0). Never mutates ``x`` or ``y``.

        ``fresh``: the batch is ``fresh`` new stream samples followed by replayed ones; CFL's L_dict
        then lets a fresh sample compete only with the fresh samples' classes (ER-ACE's asymmetric
        loss), replayed samples with every class. Ignored by CFF.

        With ``views = 2`` (or an augmentation) the layers step on the augmented views
        (``edgeff.augment.make_views``): 2B features, the two views of a sample are positives.
        """
        xb = as_batch(x, self.model_cfg.input_shape).to(self.device)
        yb = as_labels(y, xb.shape[0], self.net.num_classes).to(self.device)
        allowed = fresh_class_mask(yb, fresh, self.net.num_classes)
        n = xb.shape[0]
        x0, y0 = xb, yb  # the samples as they came, for a readout that follows the stream or keeps a window
        xb, yb, allowed = make_views(xb, yb, self.train_cfg.views, self.augment, allowed)
        self.net.train()
        loss_fn = self._cfl_loss if self.model_cfg.loss == "cfl" else self._supcon_loss
        metrics = []
        h = xb
        hook = self.layer_hook
        for i, layer in enumerate(self.net.local_layers):
            if hook is not None:
                hook(i, True)
            opt = layer.ensure_optimizer()
            opt.zero_grad(set_to_none=True)
            with factored.recording(layer, h.shape[0]) as factors:  # small batches: Linear gradients as factors
                out = layer(h)
                hbar = feature_vectors(out, self.model_cfg.groups).mean(1)  # (B, C_l)
                loss = loss_fn(i, hbar, yb, allowed)
                check_loss(loss, f"layer {i + 1}")
                loss.backward()
            layer.optimizer_step(factors)
            metrics.append(LayerMetrics(float(loss.detach()), float(hbar.detach().norm(dim=1).mean()), 0.0, True))
            h = out.detach()  # the memory contract: no graph crosses this boundary
            if hook is not None:
                hook(i, False)
        if self.head_opt is not None:  # CFF's linear head on the detached last-layer features
            feats = feature_vectors(h, self.model_cfg.groups).mean(1)
            head_loss = F.cross_entropy(self.net.head(feats), yb)
            self.head_opt.zero_grad(set_to_none=True)
            head_loss.backward()
            self.head_opt.step()
        if self.net.readout is not None:  # the new samples, not a stream window's repeats (as the goodness learner)
            new = min(n, self.train_cfg.batch_size) if self.train_cfg.window else n
            self.net.readout.learn(self.net, x0[:new], y0[:new])
        self.step += 1
        self.samples_seen += n
        return metrics

    # ----------------------------------------------------------------- prediction
    def _layer_scores(self, xb: torch.Tensor) -> list[torch.Tensor]:
        self.net.eval()
        if self.model_cfg.loss == "cfl":
            return self.net.layer_scores(xb)
        if self.net.readout is not None:
            return [self.net.readout.scores(self.net, xb)]
        with torch.no_grad():
            return [self.net.head(self.net.mean_features(xb)[-1])]

    def scores(self, x: torch.Tensor | np.ndarray, layers: list[int] | None = None) -> torch.Tensor:
        """Class scores (B, Z). CFL: the per-layer dot-product scores of ``layers`` (default: the
        train config's ``eval_layers``), summed. CFF: the head's logits."""
        xb = as_batch(x, self.model_cfg.input_shape).to(self.device)
        per = self._layer_scores(xb)
        if self.model_cfg.loss != "cfl":
            return per[-1]
        sel = self.eval_layers if layers is None else layers
        if len(sel) == 1:
            return per[sel[0]]
        return torch.stack([per[i] for i in sel]).sum(0)

    # ----------------------------------------------------------------- an lda readout (CFF)
    def end_of_plan(self, batches: Callable[[], Iterable[tuple[Any, Any]]]) -> None:
        """The planned run is complete: an lda readout that does not follow the stream is solved from one pass
        over ``batches()`` through the trained layers (or from its window)."""
        if self.net.readout is not None:
            self.net.readout.end_of_plan(self.net, lambda: self._as_tensors(batches()))

    def ready_to_predict(self, batches: Callable[[], Iterable[tuple[Any, Any]]] | None = None) -> str | None:
        if self.net.readout is None:
            return None
        return self.net.readout.ready(self.net, None if batches is None else lambda: self._as_tensors(batches()))

    def solve_readout(self, batches: Iterable[tuple[Any, Any]] | None = None) -> None:
        """Solve the lda readout from ``batches`` through the layers as they are now (None: its window)."""
        if self.net.readout is None:
            raise InputError("solve_readout needs the lda predictor; this model predicts by "
                             f"{'its label embeddings' if self.net.embed is not None else 'its head'}")
        self.net.readout.solve(self.net, None if batches is None else self._as_tensors(batches))

    def layer_predictions(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Each layer's own prediction (B, L) (CFL); CFF has only the head: (B, 1)."""
        xb = as_batch(x, self.model_cfg.input_shape).to(self.device)
        return torch.stack([s.argmax(1) for s in self._layer_scores(xb)], dim=1).cpu()

    # ----------------------------------------------------------------- growth
    def add_class(self, name: str, examples: torch.Tensor | np.ndarray | None = None) -> int:
        """Add a class online; returns its index. Usable for prediction at every layer at once.

        CFL: a new dictionary row. From ``examples`` it is their mean feature at each of the
        ``eval_layers`` (the layers that predict), L2-normalised, widened to C_D by repeating each value
        (the inverse of CFL's average pooling when C_D is a multiple of C_l; nearest-neighbour otherwise)
        and averaged over those layers; without examples, a random direction. Either way it is scaled to
        the mean norm of the existing rows. The row then learns from the stream with the last layer's
        optimizer, whose state grows with it. CFF: the head gets a row imprinted from the last layer's
        mean feature (or random). The existing classes' per-layer scores are unchanged until training
        resumes.

        Raises:
            InputError: the name is empty or taken, or ``examples`` has the wrong shape; nothing changes.
        """
        cfg = self.model_cfg.with_class(name)
        feats = None
        if examples is not None:
            xb = as_batch(examples, self.model_cfg.input_shape).to(self.device)
            self.net.eval()
            feats = self.net.mean_features(xb)  # per layer (n, C_l)
        if self.net.embed is not None:
            proto = None
            if feats is not None:
                dim = self.net.embed.shape[1]
                proto = torch.stack([F.interpolate(F.normalize(feats[i].mean(0), dim=0)[None, None], size=dim)[0, 0]
                                     for i in self.eval_layers]).mean(0)  # (C_D,)
            last = self.net.local_layers[-1]
            row = class_row(self.net.embed, proto, self.generator)
            grow_rows(self.net, "embed", row[None], [last.opt])
            last.extra_params = [self.net.embed]
        if self.net.readout is not None:
            self.net.readout.grow(self.net, None if examples is None else xb, self.generator)
        head_proto = None if feats is None else feats[-1].mean(0)
        grow_linear(self.net.head, class_row(self.net.head.weight, head_proto, self.generator, HEAD_ROW_NORM), [self.head_opt])
        self.model_cfg = cfg
        self.net.cfg = cfg
        return cfg.num_classes - 1

    # ----------------------------------------------------------------- zero-shot
    def zero_shot_scores(self, x: torch.Tensor | np.ndarray, groups: list[list[int]],
                         layers: list[int] | None = None) -> torch.Tensor:
        """CFL zero-shot: scores (B, G) for new classes, each the mean of existing class embeddings."""
        if self.net.embed is None:
            raise ValueError("zero-shot prediction needs label embeddings (a cfl model)")
        xb = as_batch(x, self.model_cfg.input_shape).to(self.device)
        self.net.eval()
        d = self.net.embed.detach()
        new = torch.stack([d[torch.tensor(g, device=d.device)].mean(0) for g in groups])  # (G, C_D)
        feats = self.net.mean_features(xb)
        sel = self.eval_layers if layers is None else layers
        per = [F.normalize(feats[i], dim=1) @ pool_embeddings(new, feats[i].shape[1]).T for i in sel]
        return torch.stack(per).sum(0)

    # ------------------------------------------------------------------------ checkpoint, export
    def _optim_state(self) -> dict[str, Any]:
        return {"optim": [None if layer.opt is None else layer.opt.state_dict() for layer in self.net.local_layers],
                "predictor_optim": None if self.head_opt is None else self.head_opt.state_dict()}

    def _load_optim_state(self, state: dict[str, Any]) -> None:
        for layer, opt_state in zip(self.net.local_layers, state["optim"], strict=True):
            if opt_state is not None:
                layer.ensure_optimizer().load_state_dict(opt_state)
        if self.head_opt is not None and state.get("predictor_optim") is not None:
            self.head_opt.load_state_dict(state["predictor_optim"])

    def supports(self, capability: str) -> bool:
        if capability in ("zero_shot", "attention_maps"):  # label-embedding (CFL) models only
            return self.net.embed is not None
        return super().supports(capability)

    def select_eval_layers(self, layers: str) -> None:
        if self.net.embed is None:
            super().select_eval_layers(layers)
        self.eval_layers = select_layers(layers, len(self.net.layers))

    def inference_graph(self, layers: str | None = None) -> nn.Module:
        if self.net.readout is not None:
            return ReadoutGraph(self).eval()

        return ContrastiveGraph(self, layers).eval()

    def prediction_kind(self, layers: str | None = None) -> str:
        return f"label-embedding:{layers or self.train_cfg.eval_layers}" if self.net.embed is not None else "logits"


class ReadoutGraph(nn.Module):
    """One pass through the layers and the solved lda readout on their pooled outputs (CFF's lda predictor)."""

    def __init__(self, learner: ContrastiveLearner) -> None:
        super().__init__()
        readout = learner.net.readout
        assert readout is not None
        self.blocks = nn.ModuleList(inference_block(layer.block) for layer in learner.net.local_layers)
        self.idx, self.pools, self.scales = list(readout.idx), list(readout.pools), list(readout.scales)
        self.linear = readout.linear

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outs, h = [], x
        for block in self.blocks[: max(self.idx) + 1]:
            h = block(h)
            outs.append(h)
        feats = torch.cat([layer_features(outs[i], k, s) for i, k, s in zip(self.idx, self.pools, self.scales,
                                                                            strict=True)], dim=1)
        logits = self.linear(feats)
        return logits, logits.argmax(1)


class ContrastiveGraph(nn.Module):
    """One pass: CFL scores (per-layer ⟨normalised mean feature, pooled embeddings⟩, summed over the
    chosen layers, as ``ContrastiveLearner.scores``) or CFF's head logits on the last layer's mean feature."""

    def __init__(self, learner: ContrastiveLearner, layers: str | None) -> None:
        super().__init__()
        net = learner.net
        self.blocks = nn.ModuleList(inference_block(layer.block) for layer in net.local_layers)
        self.groups = learner.model_cfg.groups
        self.cfl = net.embed is not None
        if self.cfl:
            assert net.embed is not None
            self.idx = select_layers(layers, len(self.blocks)) if layers else learner.eval_layers
            for i in self.idx:
                self.register_buffer(f"emb{i}", pool_embeddings(net.embed.detach(), net.widths[i]).T.clone())  # (C_l, Z)
        else:
            self.idx = [len(self.blocks) - 1]
            self.head = net.head

    def _mean(self, h: torch.Tensor) -> torch.Tensor:
        if h.dim() == 4:
            return h.mean((2, 3))  # (B, C): the mean over the H*W feature vectors
        if h.dim() == 3:
            return h.mean(1)  # (B, E): the mean over the tokens
        return h.reshape(h.shape[0], self.groups, -1).mean(1)  # (B, C): the mean over the groups

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = x
        per = []
        for i, block in enumerate(self.blocks):
            h = block(h)
            if i in self.idx:
                f = self._mean(h)
                per.append(f / f.norm(dim=1, keepdim=True).clamp_min(1e-12) @ getattr(self, f"emb{i}") if self.cfl
                           else self.head(f))
            if i >= max(self.idx):
                break
        scores = per[0] if len(per) == 1 else torch.stack(per).sum(0)
        return scores, scores.argmax(1)
