"""A first Linear layer over labelled inputs: the image multiplied once per sample, each label once per batch.

A goodness network's first layer sees every image under two labels in a training step (the positive and
the negative) and under every label in a prediction. Its encoded input is the image's values plus the
label's code in other columns (``labels.LabelSplit``), so ``W @ h = W[:, image] @ x + W[:, code] @ code(y)``:
the image's product is computed once per sample and each label's once per batch, instead of once per
(sample, label) row. A length normalisation before the weights divides that sum by each row's RMS, which
the two parts' sums of squares give. The weight gradient follows the same split: the rows' output
gradients are summed per sample and per label first (autograd's ``index_select`` backward), and the frugal
step records the two column ranges as factors (``factored.partial_linear``).

symba-mlp's first layer (784 image values + a 784-value pattern, 1000 units) costs 784 multiply-adds per
unit for a positive/negative pair this way instead of 2 x 1568, and a prediction's 10 labels 784 instead of
10 x 1568; an epoch of MNIST at batch 100 fell from 58 to 36.5 CPU s (bench/accuracy.py). The rows are
``block(encoder(x, y))``'s up to float rounding (tests/test_labelled.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from edgeff.edge.labelled import applies  # noqa: F401  # the rule both runtimes split by
from edgeff.factored import partial_linear
from edgeff.labels import LabelSplit
from edgeff.layers import LengthNorm


def layer_rows(layer: nn.Module, split: LabelSplit, labels: torch.Tensor,
               rows_of: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The first layer's output for rows ``j`` = ``block(encoder(x[s_j], labels[j]))``: (M, out), where
    ``rows_of`` maps a per-sample tensor (B, ...) to its rows (M, ...) (a tile or a repeat: their
    gradients sum a fixed number of rows, in the same order on any number of threads, unlike
    ``index_add``; the label part is a one-hot product for the same reason)."""
    _, norm, linear, *rest = list(layer.block.children())  # type: ignore[union-attr]  # the ``applies`` layout
    assert isinstance(linear, nn.Linear) and linear.bias is not None
    image = partial_linear(split.base, linear, split.base_cols)  # (B, out)
    code = partial_linear(split.table, linear, split.code_cols)  # (K, out)
    z = rows_of(image) + F.one_hot(labels, split.table.shape[0]).to(code.dtype) @ code  # (M, out)
    if isinstance(norm, LengthNorm):  # W (h / rms) = (W h) / rms, rms from both parts' sums of squares
        sq = rows_of(split.base.pow(2).sum(1)) + split.table.pow(2).sum(1).index_select(0, labels)  # (M,)
        z = z / sq.div(split.width).add(norm.eps).sqrt().unsqueeze(1)
    z = z + linear.bias
    for m in rest:
        z = m(z)
    return z


def every_label(layer: nn.Module, split: LabelSplit) -> torch.Tensor:
    """The first layer's output for every sample under every label, sample-major: (B*K, out)."""
    b, k = split.base.shape[0], split.table.shape[0]
    labels = torch.arange(k, device=split.base.device).repeat(b)  # (B*K,)
    return layer_rows(layer, split, labels, lambda t: t.repeat_interleave(k, dim=0))


class LabelledPairs:
    """The first layer's positive and negative rows of a batch, from its split (the trainer's ``PairSource``)."""

    requires_grad = False  # the split is a constant: no learned label encoder's graph to keep

    def __init__(self, split: LabelSplit, y_pos: torch.Tensor, y_neg: torch.Tensor) -> None:
        self.split, self.y_pos, self.y_neg = split, y_pos, y_neg
        self.b = int(y_pos.shape[0])

    def parts(self) -> list[torch.Tensor]:
        return []  # a split first layer has no BatchNorm to prepare (``applies``)

    def run(self, layer: nn.Module, s: int, n: int) -> torch.Tensor:
        """Pairs ``s .. s+n-1``: (2n, out), positives then negatives."""
        sp = self.split
        part = LabelSplit(sp.base[s:s + n], sp.base_cols, sp.table, sp.code_cols, sp.width)
        labels = torch.cat([self.y_pos[s:s + n], self.y_neg[s:s + n]])  # (2n,)
        return layer_rows(layer, part, labels, lambda t: torch.cat([t, t]))


class TensorPairs:
    """A layer's positive and negative input batches, as tensors (every layer after the first, a layer
    pipeline's blocks, and first layers whose input cannot be split)."""

    def __init__(self, hp: torch.Tensor, hn: torch.Tensor) -> None:
        self.hp, self.hn = hp, hn
        self.b = int(hp.shape[0])
        self.requires_grad = hp.requires_grad

    def parts(self) -> list[torch.Tensor]:
        return [self.hp, self.hn]

    def run(self, layer: nn.Module, s: int, n: int) -> torch.Tensor:
        return layer(torch.cat([self.hp[s:s + n], self.hn[s:s + n]]))  # type: ignore[no-any-return]


PairSource = LabelledPairs | TensorPairs
