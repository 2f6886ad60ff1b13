"""The numpy runtime's first Linear layer over labelled inputs: the image multiplied once per sample, each
label's code once per batch (``edgeff.labelled``, the torch learner's, in numpy).

A goodness network's first layer sees every image under two labels in a training step and under every label in a
prediction. Its encoded input is the image's values plus the label's code in other columns, so
``W @ h = W[:, image] @ x + W[:, code] @ code(y)``; a length normalisation before the weights divides that sum by
each row's RMS, which the two parts' sums of squares give. The weight gradient follows the same split: the rows'
output gradients are summed per sample and per label first, and the optimizer reads the two column ranges block
by block (``SplitOuter``). symba-mlp's first layer costs 784 multiply-adds per unit for a positive/negative pair
this way instead of 2 x 1568, and a prediction's 10 labels 784 instead of 10 x 1568.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from edgeff.config import ModelConfig
from edgeff.edge.ops import LengthNorm, Linear, Op
from edgeff.edge.optim import Outer

F32 = np.float32


def applies(cfg: ModelConfig) -> bool:
    """Whether ``cfg``'s first layer takes its labelled input split (both runtimes ask this): a Linear layer
    (normalised by length or not at all, before its weights) after a fixed overlay or pattern label."""
    first = cfg.layers[0]
    return (cfg.label in ("icp", "overlay") and not cfg.label_learned and first.kind == "linear"
            and first.order == "pre" and first.norm in ("length", "none"))


class Split(NamedTuple):
    """A batch's encoded inputs, flattened, as the values no label touches and one code per label in other
    columns (``edgeff.labels.LabelSplit``): ``encode(x, y).reshape(B, -1)[:, base_cols] == base`` and
    ``[:, code_cols] == table[y]``."""

    base: np.ndarray  # (B, Db)
    base_cols: slice
    table: np.ndarray  # (K, Dc)
    code_cols: slice
    width: int  # Db + Dc


def split(label: str, x: np.ndarray, codes: np.ndarray | None, num_classes: int) -> Split:
    """``x`` (B, C, H, W) under an ``overlay`` label (a one-hot over the first K values) or an ``icp`` pattern
    (``codes`` (K, 1, H, W), the channel after x's)."""
    flat = x.reshape(x.shape[0], -1)
    if label == "overlay":
        k = num_classes
        return Split(flat[:, k:], slice(k, flat.shape[1]), np.eye(k, dtype=F32), slice(0, k), flat.shape[1])
    assert codes is not None
    d = flat.shape[1]
    table = codes.reshape(codes.shape[0], -1).astype(F32, copy=False)
    return Split(flat, slice(0, d), table, slice(d, d + table.shape[1]), d + table.shape[1])


class SplitOuter(Outer):
    """The split layer's weight gradient ``Σ_rows dz_jᵀ h_j`` as two column ranges (``edge.optim.Outer``'s
    interface): ``a_base (B, out)ᵀ @ base`` and ``a_code (K, out)ᵀ @ table``, built a block of rows at a time."""

    def __init__(self, parts: list[tuple[np.ndarray, np.ndarray, slice]], shape: tuple[int, ...]) -> None:
        self.parts, self.shape = parts, shape  # (a, b, columns) per part; no single (a, b) pair

    def rows(self, r0: int, r1: int) -> np.ndarray:
        r1 = min(r1, self.shape[0])
        out = np.empty((r1 - r0, self.shape[1]), F32)
        for a, b, cols in self.parts:
            np.matmul(a[:, r0:r1].T, b, out=out[:, cols])
        return out.reshape(-1)

    def full(self) -> np.ndarray:
        return self.rows(0, self.shape[0]).reshape(self.shape)


class SplitFirst:
    """Runs a first layer's ops (``[Flatten, LengthNorm | Identity, Linear, *rest]``) on a batch's split."""

    def __init__(self, ops: list[Op]) -> None:
        norm, linear = ops[1], ops[2]
        assert isinstance(linear, Linear)
        self.norm = norm if isinstance(norm, LengthNorm) else None
        self.linear = linear
        self.rest = ops[3:]

    def forward(self, sp: Split, labels: np.ndarray, rows_of: Callable[[np.ndarray], np.ndarray],
                train: bool) -> np.ndarray:
        """Rows ``j`` = ``block(encode(x[s_j], labels[j]))`` (M, out); ``rows_of`` maps a per-sample array (B, ...)
        to its rows (a tile for positive/negative pairs, a repeat for every label)."""
        w, bias = self.linear.params["weight"], self.linear.params["bias"]
        z = rows_of(sp.base @ w[:, sp.base_cols].T)  # (M, out)
        z += (sp.table @ w[:, sp.code_cols].T)[labels]
        rms = None
        if self.norm is not None:  # W (h / rms) = (W h) / rms, rms from both parts' sums of squares
            sq = rows_of((sp.base * sp.base).sum(1)) + (sp.table * sp.table).sum(1)[labels]  # (M,)
            rms = np.sqrt(sq / F32(sp.width) + self.norm.eps)[:, None]
            z /= rms
        z += bias
        if train:
            self.linear.cache = (sp, labels, rms)
        for op in self.rest:
            z = op.forward(z, train)
        return z

    def backward(self, dy: np.ndarray, per_sample: Callable[[np.ndarray], np.ndarray]) -> None:
        """The Linear layer's gradients from the output gradient (left in its ``grads``, as ``Linear.backward``
        leaves them); ``per_sample`` sums rows (M, out) into their samples' (B, out)."""
        for op in reversed(self.rest):
            dy = op.backward(dy, need_dx=True)  # type: ignore[assignment]
        sp, labels, rms = self.linear.cache
        bias = dy.sum(0)
        d = dy / rms if rms is not None else dy
        onehot = (labels[None, :] == np.arange(sp.table.shape[0])[:, None]).astype(F32)  # (K, M)
        per_label = onehot @ d  # each label's rows summed (a product: no unbuffered scatter)
        shape = self.linear.params["weight"].shape
        self.linear.grads = {"weight": SplitOuter([(per_sample(d), sp.base, sp.base_cols),
                                                   (per_label, sp.table, sp.code_cols)], shape), "bias": bias}
