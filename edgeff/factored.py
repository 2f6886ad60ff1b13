"""Linear weight gradients kept as their factors, so a frugal step never holds one whole.

Over a batch of ``n`` rows a Linear layer's weight gradient is ``G.T @ X`` (``G``: the gradient at its
output, ``n x out``; ``X``: its input, ``n x in``), a matrix of rank at most ``n``. At batch 1 it is an
outer product: the two vectors cost ``in + out`` values where the matrix costs ``in * out`` (for
symba-mlp's first layer 2.6 thousand against 1.6 million). While ``recording(layer)`` is active every
``nn.Linear`` of the layer keeps ``(G, X)`` from each backward pass instead of adding into
``weight.grad``; the layer's optimizer then asks ``Factors.rows(r0, r1)`` for one block of rows of the
gradient at a time (``edgeff.optim``), so the gradient exists one block at a time. Factors that would
would outgrow the gradient (a large batch) are not recorded: that layer keeps its dense gradient.

The values are the dense path's: each block is ``G[:, r0:r1].T @ X`` summed over the backward passes in
the order they ran, the same products and sums the dense gradient accumulates (at batch 1 bit for bit).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F


class Factors:
    """The weight gradient of one Linear layer as a sum of ``G.T @ X`` terms (or a dense part). A term
    may cover a range of the weight's columns only (``edgeff.labelled``: the label-free and the label
    part of a first layer's input)."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight
        self.parts: list[tuple[torch.Tensor, torch.Tensor, slice | None]] = []
        self.dense: torch.Tensor | None = None

    def add(self, g: torch.Tensor, x: torch.Tensor, cols: slice | None = None) -> None:
        self.parts.append((g, x, cols))
        if sum(a.numel() + b.numel() for a, b, _ in self.parts) > self.weight.numel():
            total = self.rows(0, self.weight.shape[0])  # more rows than planned (``pays``): the dense gradient
            self.parts, self.dense = [], total

    def rows(self, r0: int, r1: int) -> torch.Tensor:
        """Rows ``r0 .. r1-1`` of the gradient as a (r1-r0, in) tensor (not to be written to)."""
        if not self.parts and self.dense is not None:
            return self.dense[r0:r1]
        out = None if self.dense is None else self.dense[r0:r1].clone()
        if out is None and any(cols is not None for _, _, cols in self.parts):
            out = self.weight.new_zeros((min(r1, self.weight.shape[0]) - r0, self.weight.shape[1]))
        for g, x, cols in self.parts:
            if cols is not None:
                assert out is not None
                out[:, cols].addmm_(g[:, r0:r1].t(), x)
                continue
            block = g[:, r0:r1].t().mm(x)
            out = block if out is None else out.add_(block)
        if out is None:
            return self.weight.new_zeros((min(r1, self.weight.shape[0]) - r0, self.weight.shape[1]))
        return out

    def values(self) -> int:
        """How many values the factors (and any dense part) hold."""
        return sum(a.numel() + b.numel() for a, b, _ in self.parts) + (0 if self.dense is None else self.dense.numel())

    def nbytes(self) -> int:
        return self.values() * self.weight.element_size()


class _FactoredLinear(torch.autograd.Function):
    """``F.linear`` whose backward hands the weight gradient's factors to a ``Factors``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, sink: Factors,
                cols: slice | None = None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.sink, ctx.cols = sink, cols
        return F.linear(x, weight if cols is None else weight[:, cols], bias)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, None, torch.Tensor | None, None, None]:
        x, weight = ctx.saved_tensors
        cols = ctx.cols
        gx = g.matmul(weight if cols is None else weight[:, cols]) if ctx.needs_input_grad[0] else None
        g2 = g.reshape(-1, g.shape[-1])
        ctx.sink.add(g2, x.reshape(-1, x.shape[-1]), cols)
        gb = g2.sum(0) if ctx.needs_input_grad[2] else None
        return gx, None, gb, None, None


_RECORDING: weakref.WeakKeyDictionary[nn.Linear, Factors] = weakref.WeakKeyDictionary()


def partial_linear(x: torch.Tensor, linear: nn.Linear, cols: slice) -> torch.Tensor:
    """``x @ linear.weight[:, cols].T`` (no bias): the product with some of the layer's input columns,
    its weight gradient recorded as factors over those columns while ``recording`` the layer."""
    sink = _RECORDING.get(linear)
    if sink is None:
        return F.linear(x, linear.weight[:, cols])
    return _FactoredLinear.apply(x, linear.weight, None, sink, cols)  # type: ignore[no-any-return]


def pays(linear: nn.Linear, rows: int) -> bool:
    """Whether ``rows`` rows of factors cost less than the weight's gradient."""
    return rows * (linear.in_features + linear.out_features) < linear.weight.numel()


@contextmanager
def recording(module: nn.Module, rows: int) -> Iterator[dict[torch.Tensor, Factors]]:
    """While active, the weight gradients of ``module``'s Linear layers (those whose factors over
    ``rows`` rows in all cost less than the gradient) are recorded as factors in the yielded
    ``{weight: Factors}`` instead of ``weight.grad`` (give it to ``LeanOptimizer.step``)."""
    sinks: dict[torch.Tensor, Factors] = {}
    patched = []
    for m in module.modules():
        if type(m) is nn.Linear and m.weight.requires_grad and pays(m, rows):
            sink = sinks[m.weight] = Factors(m.weight)

            def forward(x: torch.Tensor, m: nn.Linear = m, sink: Factors = sink) -> torch.Tensor:
                return _FactoredLinear.apply(x, m.weight, m.bias, sink)

            m.forward = forward  # type: ignore[method-assign, assignment]
            _RECORDING[m] = sink
            patched.append(m)
    try:
        yield sinks
    finally:
        for m in patched:
            del m.forward  # back to the class's forward
            _RECORDING.pop(m, None)


__all__ = ["Factors", "partial_linear", "pays", "recording"]
