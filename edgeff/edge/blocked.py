"""A symmetric matrix held as its lower triangle in square blocks: the closed-form solve's working matrix at about
half a full matrix's bytes.

An lda readout solves ``Σ' P = μᵀ`` for a D×D covariance ``Σ'`` built from the float64 Gram matrix the model keeps.
A full copy of it, LAPACK's factor and numpy's working copy of the input would hold three more D×D float64 matrices
beside the Gram matrix (slda-conv: 4 × 42 MB). Here the covariance is written once, as its lower blocks, factored
in place (``L Lᵀ = Σ'``), inverted in place (``L⁻¹``), and read by block products: one half-matrix in all, no
LAPACK call larger than one block. Every block is float64, so the result agrees with a dense solve to rounding.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import pairwise

import numpy as np

BLOCK = 128  # rows and columns of one block (smaller: less of the full matrix, more, smaller products)


class NotPositiveDefinite(ValueError):
    """A diagonal block had no Cholesky factor: the matrix is not (numerically) positive definite."""


class LowerBlocks:
    """The lower triangle of a D×D float64 matrix as blocks ``(i, j)``, ``i ≥ j``, of ``BLOCK`` rows and columns
    (the last ones smaller)."""

    def __init__(self, dim: int, block_fn: Callable[[slice, slice], np.ndarray], block: int = BLOCK) -> None:
        """``block_fn(rows, cols)``: the matrix's values in that block (float64, a new array)."""
        self.dim, self.size = dim, block
        self.edges = list(range(0, dim, block)) + [dim]
        self.n = len(self.edges) - 1
        self.blocks: dict[tuple[int, int], np.ndarray] = {}
        for i in range(self.n):
            for j in range(i + 1):
                self.blocks[i, j] = np.ascontiguousarray(block_fn(self._sl(i), self._sl(j)), dtype=np.float64)

    @staticmethod
    def nbytes_for(dim: int, block: int = BLOCK) -> int:
        """Bytes the blocks of a ``dim``-wide matrix take (``edgeff.edge.plan`` plans the solve with it)."""
        edges = list(range(0, dim, block)) + [dim]
        widths = [b - a for a, b in pairwise(edges)]
        return sum(widths[i] * widths[j] for i in range(len(widths)) for j in range(i + 1)) * 8

    def _sl(self, i: int) -> slice:
        return slice(self.edges[i], self.edges[i + 1])

    def cholesky(self) -> None:
        """In place: the blocks become ``L`` with ``L Lᵀ`` = the matrix (left-looking, a block column at a time).
        Raises ``NotPositiveDefinite`` where a diagonal block has no factor."""
        b = self.blocks
        for j in range(self.n):
            d = b[j, j]
            for k in range(j):
                d -= b[j, k] @ b[j, k].T
            try:
                b[j, j] = d = np.linalg.cholesky(d)
            except np.linalg.LinAlgError as e:
                raise NotPositiveDefinite(str(e)) from e
            d_inv_t = np.linalg.inv(d).T  # one block: (A - Σ L_ik L_jkᵀ) L_jj⁻ᵀ
            for i in range(j + 1, self.n):
                a = b[i, j]
                for k in range(j):
                    a -= b[i, k] @ b[j, k].T
                b[i, j] = a @ d_inv_t

    def invert_lower(self) -> None:
        """In place: the blocks of ``L`` (lower-triangular) become those of ``L⁻¹``, a block column at a time from
        the left: ``X_jj = L_jj⁻¹``, ``X_ij = −L_ii⁻¹ Σ_{k=j}^{i−1} L_ik X_kj`` (the ``L`` blocks it reads, in
        columns right of ``j`` and ``L_ij`` itself, are not yet overwritten; ``L_ii⁻¹ ·`` is a solve of one block)."""
        b = self.blocks
        for j in range(self.n):
            b[j, j] = np.tril(np.linalg.inv(b[j, j]))
            for i in range(j + 1, self.n):
                acc = b[i, j] @ b[j, j]
                for k in range(j + 1, i):
                    acc += b[i, k] @ b[k, j]
                b[i, j] = -np.linalg.solve(b[i, i], acc)

    def lower_times(self, m: np.ndarray) -> np.ndarray:
        """``X m`` for the lower-triangular ``X`` the blocks hold (``m``: (D, K))."""
        out = np.zeros((self.dim, m.shape[1]))
        for i in range(self.n):
            for j in range(i + 1):
                out[self._sl(i)] += self.blocks[i, j] @ m[self._sl(j)]
        return out

    def lower_t_times(self, m: np.ndarray) -> np.ndarray:
        """``Xᵀ m`` for the lower-triangular ``X`` the blocks hold."""
        out = np.zeros((self.dim, m.shape[1]))
        for i in range(self.n):
            for j in range(i + 1):
                out[self._sl(j)] += self.blocks[i, j].T @ m[self._sl(i)]
        return out

    def frobenius_sq(self) -> float:
        """Σ of the squares of the lower triangle's values."""
        return float(sum(np.einsum("ij,ij->", a, a) for a in self.blocks.values()))
