"""Inference graphs: each family's prediction rule as a plain torch module, traced by the ONNX exporter.

A learner builds its own (``learner.inference_graph(layers)``, the learner contract); every graph takes a
batch ``x`` (B, C, H, W) and returns ``scores`` (B, K) and ``label`` (B,). Running-statistics BatchNorm
is folded into one per-feature multiply-add (its normalisation sits *before* the weights and the
convolutions are zero-padded, so folding it into the weights themselves would change the border pixels).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from edgeff.contrastive import pool_embeddings
from edgeff.labels import ChannelEncoder, ICPEncoder, OverlayEncoder
from edgeff.layers import RunningBatchNorm
from edgeff.model import HeadPredictor, select_layers
from edgeff.readout import LdaPredictor

if TYPE_CHECKING:
    from edgeff.baseline import BPLearner
    from edgeff.contrastive import ContrastiveLearner
    from edgeff.mirror import MirrorLearner
    from edgeff.trainer import Learner


class FoldedNorm(nn.Module):
    """Inference form of ``RunningBatchNorm``: ``x * scale + shift`` per feature."""

    scale: torch.Tensor
    shift: torch.Tensor

    def __init__(self, bn: RunningBatchNorm) -> None:
        super().__init__()
        scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
        shift = bn.bias.detach() - bn.running_mean * scale
        shape = (1, -1, 1, 1) if bn.spatial else (1, -1)
        self.register_buffer("scale", scale.view(shape).clone())
        self.register_buffer("shift", shift.view(shape).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift


def inference_block(block: nn.Sequential) -> nn.Sequential:
    """A copy of ``block`` with every running-statistics BatchNorm folded."""
    return nn.Sequential(*[FoldedNorm(m) if isinstance(m, RunningBatchNorm) else m for m in block]).eval()


class AllLabels(nn.Module):
    """(B, C, H, W) -> (B*K, C', H, W): the input once per label, each with its label encoding."""

    codes: torch.Tensor

    def __init__(self, encoder: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.k = num_classes
        self.mode = "overlay" if isinstance(encoder, OverlayEncoder) else "channel"
        if isinstance(encoder, OverlayEncoder):
            codes = torch.eye(num_classes) * encoder.on_value  # (K, K)
        elif isinstance(encoder, ICPEncoder):
            codes = encoder.patterns.detach().clone()  # (K, 1, H, W)
        elif isinstance(encoder, ChannelEncoder):
            _, h, w = encoder.in_shape
            codes = encoder.matrix.detach().clone().view(num_classes, 1, h, w)
        else:
            raise TypeError(f"cannot export label encoder {type(encoder).__name__}")
        self.register_buffer("codes", codes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        xr = x.unsqueeze(1).expand(-1, self.k, -1, -1, -1)  # (B, K, C, H, W)
        codes = self.codes.unsqueeze(0).expand(b, *self.codes.shape)
        if self.mode == "overlay":
            flat = xr.reshape(b, self.k, c * h * w)
            z = torch.cat([codes, flat[:, :, self.k :]], dim=2)  # (B, K, C*H*W)
            return z.reshape(-1, c, h, w)
        return torch.cat([xr, codes], dim=2).reshape(-1, c + 1, h, w)  # (B*K, C+1, H, W)


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
                m = z if self.pools[i] == (1, 1) else F.avg_pool2d(z, self.pools[i])
                feats.append(F.normalize(m.flatten(1), dim=1) * self.scales[i])
        logits = self.linear(torch.cat(feats, dim=1))
        return logits, logits.argmax(1)


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
