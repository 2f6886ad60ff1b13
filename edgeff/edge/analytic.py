"""Streaming LDA's statistics and readout in numpy: the edge runtime's half of the analytic family
(``edgeff.analytic`` is the torch half; the same sums, the same shrinkage, the same bias correction, under
the same state names, so ``edgeff.interchange`` moves a model between them and a test drives both)."""

from __future__ import annotations

from typing import Any

import numpy as np

from edgeff.edge.blocked import LowerBlocks, NotPositiveDefinite

F32 = np.float32
PENDING = 64  # samples whose features wait before one Gram-matrix update (as edgeff.analytic.PENDING)
GRAM_ROWS = 256  # rows of the Gram matrix one update adds to at a time (edgeff.edge.plan plans the band)
NAMES = ("class_sum", "count", "gram", "pending", "n_pending", "imprint")
RIDGE_FLOOR = 1e-9  # the least ridge, a share of the features' mean square (see ``ridge_floor``)


def ridge_floor(mean_square: float) -> float:
    """The least ridge an LDA solve adds to its pooled covariance, whatever its shrinkage: ``RIDGE_FLOOR`` ×
    the features' mean square (``tr(Σ h hᵀ) / (N·D)``), or 1 when every feature is zero. The covariance is a
    difference of two sums of that size, so its rounding error scales with it; above it, the matrix is
    positive definite for any count and rank. Both runtimes' solves use it."""
    return RIDGE_FLOOR * mean_square if mean_square > 0 else 1.0


def own(a: np.ndarray, dtype: Any) -> np.ndarray:
    """``a`` as a writeable array of ``dtype``: itself where it already is one (no copy), else a copy."""
    a = np.asarray(a)
    return a if a.dtype == dtype and a.flags.writeable and a.flags.c_contiguous else a.astype(dtype, copy=True)


class LdaStats:
    """Per-class feature sums and counts, the Gram matrix (float64) and the pending feature block."""

    def __init__(self, num_classes: int, dim: int) -> None:
        self.dim = dim
        self.class_sum = np.zeros((num_classes, dim))
        self.count = np.zeros(num_classes)
        self.gram = np.zeros((dim, dim))
        self.pending = np.zeros((PENDING, dim), F32)
        self.n_pending = np.zeros((), np.int64)
        self.imprint = np.zeros((num_classes, dim), F32)

    def arrays(self) -> dict[str, np.ndarray]:
        return {n: getattr(self, n) for n in NAMES}

    def load(self, arrays: dict[str, np.ndarray], *, adopt: bool = False) -> None:
        """Set the statistics from ``arrays``; ``adopt``: arrays of the right type are taken, not copied."""
        for n in NAMES:
            a = np.asarray(arrays[n])
            want = getattr(self, n)
            if n in ("gram", "pending") and a.shape != want.shape:
                raise ValueError(f"{n}: shape {a.shape}, the model needs {want.shape}")
            setattr(self, n, own(a, want.dtype) if adopt else a.astype(want.dtype, copy=True))

    def accumulate(self, h: np.ndarray, y: np.ndarray) -> None:
        """Add features ``h`` (B, D) of classes ``y`` (B,)."""
        np.add.at(self.class_sum, y, h.astype(np.float64))
        self.count += np.bincount(y, minlength=self.count.shape[0])
        i = 0
        while i < h.shape[0]:
            n = int(self.n_pending)
            take = min(PENDING - n, h.shape[0] - i)
            self.pending[n : n + take] = h[i : i + take]
            self.n_pending = np.asarray(n + take, np.int64)
            i += take
            if n + take == PENDING:
                block = self.pending.astype(np.float64)
                for r in range(0, self.dim, GRAM_ROWS):  # a band at a time: no D×D temporary beside the Gram matrix
                    self.gram[r : r + GRAM_ROWS] += block[:, r : r + GRAM_ROWS].T @ block
                self.pending[:] = 0
                self.n_pending = np.zeros((), np.int64)

    def clear(self) -> None:
        """No samples counted (imprinted class means kept)."""
        self.class_sum[:] = 0
        self.count[:] = 0
        self.gram[:] = 0
        self.pending[:] = 0
        self.n_pending = np.zeros((), np.int64)

    def grow(self, proto: np.ndarray) -> None:
        """One more class with no samples; ``proto`` (D,) stands for its mean until it has some."""
        self.class_sum = np.concatenate([self.class_sum, np.zeros((1, self.dim))])
        self.count = np.concatenate([self.count, np.zeros(1)])
        self.imprint = np.concatenate([self.imprint, proto.astype(F32)[None]])

    def means(self) -> np.ndarray:
        seen = self.count > 0
        return np.where(seen[:, None], self.class_sum / np.maximum(self.count, 1)[:, None], self.imprint)

    def readout(self, shrinkage: float) -> tuple[np.ndarray, np.ndarray]:
        """``(P, c)``: scores = h @ P + c (see ``edgeff.analytic``), float32. The covariance is held as its lower
        blocks (``edgeff.edge.blocked``), factored and inverted in place: the solve adds about half a D×D float64
        matrix to the Gram matrix the model keeps."""
        k, d = self.count.shape[0], self.dim
        n = float(self.count.sum())
        seen = self.count > 0
        mu = self.means()
        if k == 0:
            return np.zeros((d, 0), F32), np.zeros(0, F32)
        d_eff: float | None = None
        if n < 2:
            p = mu.T.copy()  # Σ' = I
        else:
            tail = self.pending[: int(self.n_pending)].astype(np.float64)
            m_seen = mu[seen] * np.sqrt(self.count[seen])[:, None]
            diag = (np.diagonal(self.gram) + (tail * tail).sum(0) - (m_seen * m_seen).sum(0)) / n
            floor = ridge_floor(float(np.diagonal(self.gram).sum() + (tail * tail).sum()) / (n * d))
            shrink = max(shrinkage * max(float(diag.mean()), 0.0), floor)

            def block(rows: slice, cols: slice) -> np.ndarray:  # (G + tailᵀ tail − Σ n_c μ_c μ_cᵀ) / n + s·I
                a = self.gram[rows, cols] + tail[:, rows].T @ tail[:, cols] - m_seen[:, rows].T @ m_seen[:, cols]
                a /= n
                r0, c0 = rows.indices(d)[0], cols.indices(d)[0]  # the diagonal's part in this block
                first, last = max(r0, c0), min(rows.indices(d)[1], cols.indices(d)[1])
                idx = np.arange(first, last)
                a[idx - r0, idx - c0] += shrink
                return a

            try:
                low = LowerBlocks(d, block)
                low.cholesky()  # Σ' = L Lᵀ: Σ'⁻¹ = L⁻ᵀ L⁻¹
            except NotPositiveDefinite:
                low = None
            if low is not None:
                low.invert_lower()
                p = low.lower_t_times(low.lower_times(mu.T))  # (D, K): Σ'⁻¹ μᵀ
                # Σ' = Σ + s·I: d_eff = tr(Σ'⁻¹ Σ) = D − s·tr(Σ'⁻¹), as edgeff.readout.solve_lda
                d_eff = d - shrink * low.frobenius_sq()
                del low
            else:  # rounding left it indefinite: Σ' = V Λ Vᵀ with Λ clamped at the floor (dense: a rare case)
                cov = np.empty((d, d))
                for r in range(0, d, GRAM_ROWS):
                    cov[r : r + GRAM_ROWS] = block(slice(r, r + GRAM_ROWS), slice(0, d))
                lam, vec = np.linalg.eigh(cov)
                del cov
                lam = np.maximum(lam, max(floor, 1e-300))
                p = vec @ ((vec.T @ mu.T) / lam[:, None])
                del vec
                d_eff = float(np.maximum((lam - shrink) / lam, 0.0).sum())
        c = -0.5 * (mu * p.T).sum(1)
        if d_eff is not None:
            c += np.where(seen, 0.5 * d_eff / np.maximum(self.count, 1), 0.0)
        return p.astype(F32), c.astype(F32)
