"""Label encoders: how the label enters the network for positive and negative passes.

Every encoder maps images ``x`` (B, C, H, W) and labels ``y`` (B,) to the network's input, and has a
``neutral`` encoding (the average over all labels) for one-pass feature extraction.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from edgeff.errors import InputError
from edgeff.layers import grow_rows
from edgeff.optim import LeanOptimizer

ENCODERS = ("overlay", "icp", "channel")


class LabelSplit(NamedTuple):
    """A batch's encoded inputs, flattened, as the values no label touches plus one code per label, in
    separate columns: ``encoder(x, y).flatten(1)[:, base_cols] == base`` and ``[:, code_cols] == table[y]``
    (``edgeff.labelled`` multiplies a first Linear layer with each part once instead of per label)."""

    base: torch.Tensor  # (B, Db): the input values the label leaves as they are
    base_cols: slice  # their columns in the flattened encoded input
    table: torch.Tensor  # (K, Dc): every label's code
    code_cols: slice  # its columns
    width: int  # the flattened encoded input's size, Db + Dc


class OverlayEncoder(nn.Module):
    """Hinton's FF: a one-hot label written over the first ``num_classes`` input values.

    The overwritten values are the first pixels in row-major order (the top-left border of an
    MNIST digit, which is blank). ``on_value`` is the value of the hot entry.
    """

    def __init__(self, num_classes: int, in_shape: tuple[int, int, int], *, on_value: float = 1.0) -> None:
        super().__init__()
        if num_classes > in_shape[0] * in_shape[1] * in_shape[2]:
            raise ValueError("more classes than input values to overlay them on")
        self.num_classes = num_classes
        self.in_shape = in_shape
        self.on_value = on_value

    def out_shape(self) -> tuple[int, int, int]:
        return self.in_shape

    def _write(self, x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1).clone()  # (B, C*H*W), never mutates the caller's tensor
        flat[:, : self.num_classes] = code
        return flat.view_as(x)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self._write(x, F.one_hot(y, self.num_classes).to(x.dtype) * self.on_value)

    def neutral(self, x: torch.Tensor) -> torch.Tensor:
        return self._write(x, torch.full((x.shape[0], self.num_classes), self.on_value / self.num_classes,
                                         dtype=x.dtype, device=x.device))

    def split(self, x: torch.Tensor) -> LabelSplit:
        k, flat = self.num_classes, x.flatten(1)  # (B, D)
        table = torch.eye(k, dtype=x.dtype, device=x.device) * self.on_value  # (K, K)
        return LabelSplit(flat[:, k:], slice(k, flat.shape[1]), table, slice(0, k), flat.shape[1])

    def grow(self, generator: torch.Generator, optimizers: Sequence[LeanOptimizer | None] = ()) -> None:
        """One more class: its one-hot slot is the next input value, so the old labels' codes now also
        zero that (border) pixel and their goodness moves slightly (the icp and channel encoders keep it
        exactly)."""
        if self.num_classes + 1 > self.in_shape[0] * self.in_shape[1] * self.in_shape[2]:
            raise InputError("no input value left to overlay another class on; use an icp or channel model")
        self.num_classes += 1


class ICPEncoder(nn.Module):
    """SymBa's Intrinsic Class Patterns: a fixed sparse random binary image per class (each pixel on
    with probability ``rate``, 0.1 in the paper), concatenated as one extra input channel so no
    pixel of the input is covered."""

    patterns: torch.Tensor

    def __init__(
        self, num_classes: int, in_shape: tuple[int, int, int], generator: torch.Generator, *, rate: float = 0.1
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.in_shape = in_shape
        _, h, w = in_shape
        self.rate = rate
        patterns = (torch.rand(num_classes, 1, h, w, generator=generator) < rate).float()
        self.register_buffer("patterns", patterns)  # (K, 1, H, W)

    def out_shape(self) -> tuple[int, int, int]:
        c, h, w = self.in_shape
        return (c + 1, h, w)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.patterns[y].to(x.dtype)], dim=1)  # (B, C+1, H, W)

    def neutral(self, x: torch.Tensor) -> torch.Tensor:
        mean = self.patterns.mean(0, keepdim=True).to(x.dtype).expand(x.shape[0], -1, -1, -1)
        return torch.cat([x, mean], dim=1)

    def split(self, x: torch.Tensor) -> LabelSplit:
        flat = x.flatten(1)  # (B, C*H*W); the pattern is the channel after x's
        d, hw = flat.shape[1], self.patterns[0].numel()
        return LabelSplit(flat, slice(0, d), self.patterns.flatten(1).to(x.dtype), slice(d, d + hw), d + hw)

    def grow(self, generator: torch.Generator, optimizers: Sequence[LeanOptimizer | None] = ()) -> None:
        """One more class: a new fixed sparse pattern drawn like the others."""
        _, h, w = self.in_shape
        grow_rows(self, "patterns", (torch.rand(1, 1, h, w, generator=generator) < self.rate).float())
        self.num_classes += 1


class ChannelEncoder(nn.Module):
    """The Trifecta's label channel: one-hot × a (K, H·W) matrix, reshaped to one extra image channel.

    The matrix is random and fixed, or learned (the paper learns it under OLU). A learned matrix is
    trained by the first layer's optimizer with that layer's local loss. Initialised N(0, 1).
    """

    matrix: torch.Tensor

    def __init__(
        self,
        num_classes: int,
        in_shape: tuple[int, int, int],
        generator: torch.Generator,
        *,
        learned: bool = False,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.in_shape = in_shape
        _, h, w = in_shape
        m = torch.randn(num_classes, h * w, generator=generator)
        if learned:
            self.matrix = nn.Parameter(m)
        else:
            self.register_buffer("matrix", m)

    def out_shape(self) -> tuple[int, int, int]:
        c, h, w = self.in_shape
        return (c + 1, h, w)

    def _cat(self, x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        _, _, h, w = x.shape
        chan = (code @ self.matrix.to(x.dtype)).view(-1, 1, h, w)  # (B, 1, H, W)
        return torch.cat([x, chan], dim=1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self._cat(x, F.one_hot(y, self.num_classes).to(x.dtype))

    def neutral(self, x: torch.Tensor) -> torch.Tensor:
        code = torch.full((x.shape[0], self.num_classes), 1.0 / self.num_classes, dtype=x.dtype, device=x.device)
        return self._cat(x, code)

    def split(self, x: torch.Tensor) -> LabelSplit | None:
        """None: the label channel feeds a convolution, which mixes it with the image at every position."""
        return None

    def grow(self, generator: torch.Generator, optimizers: Sequence[LeanOptimizer | None] = ()) -> None:
        """One more class: a new N(0, 1) row of the label matrix (a learned matrix keeps learning with
        the optimizers given, whose state grows with it)."""
        _, h, w = self.in_shape
        grow_rows(self, "matrix", torch.randn(1, h * w, generator=generator), optimizers)
        self.num_classes += 1


LabelEncoder = OverlayEncoder | ICPEncoder | ChannelEncoder


def make_encoder(
    kind: str,
    num_classes: int,
    in_shape: tuple[int, int, int],
    generator: torch.Generator,
    *,
    icp_rate: float = 0.1,
    learned: bool = False,
) -> LabelEncoder:
    if kind == "overlay":
        return OverlayEncoder(num_classes, in_shape)
    if kind == "icp":
        return ICPEncoder(num_classes, in_shape, generator, rate=icp_rate)
    if kind == "channel":
        return ChannelEncoder(num_classes, in_shape, generator, learned=learned)
    raise ValueError(f"unknown label encoder {kind!r}; choose one of {ENCODERS}")
