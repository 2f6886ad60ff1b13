"""Streaming LDA's statistics and readout in numpy: the edge runtime's half of the analytic family
(``edgeff.analytic`` is the torch half; the same sums, the same shrinkage, the same bias correction, under
the same state names, so ``edgeff.interchange`` moves a model between them and a test drives both)."""

from __future__ import annotations

import numpy as np

F32 = np.float32
PENDING = 64  # samples whose features wait before one Gram-matrix update (as edgeff.analytic.PENDING)
NAMES = ("class_sum", "count", "gram", "pending", "n_pending", "imprint")


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

    def load(self, arrays: dict[str, np.ndarray]) -> None:
        for n in NAMES:
            a = np.asarray(arrays[n])
            want = getattr(self, n)
            if n in ("gram", "pending") and a.shape != want.shape:
                raise ValueError(f"{n}: shape {a.shape}, the model needs {want.shape}")
            setattr(self, n, a.astype(want.dtype, copy=True))

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
                self.gram += block.T @ block
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
        """``(P, c)``: scores = h @ P + c (see ``edgeff.analytic``), float32."""
        k, d = self.count.shape[0], self.dim
        n = float(self.count.sum())
        seen = self.count > 0
        mu = self.means()
        if k == 0:
            return np.zeros((d, 0), F32), np.zeros(0, F32)
        shrink = 0.0
        if n < 2:
            cov = np.eye(d)
        else:
            tail = self.pending[: int(self.n_pending)].astype(np.float64)
            m_seen = mu[seen] * np.sqrt(self.count[seen])[:, None]
            cov = (self.gram + tail.T @ tail - m_seen.T @ m_seen) / n
            scale = float(np.diagonal(cov).mean())
            shrink = shrinkage * (scale if scale > 0 else 1.0)
            cov[np.diag_indices(d)] += shrink
        try:
            chol = np.linalg.cholesky(cov)
        except np.linalg.LinAlgError:  # rank-deficient at shrinkage 0
            cov[np.diag_indices(d)] += 1e-6 * max(float(np.diagonal(cov).mean()), 1e-12)
            chol = np.linalg.cholesky(cov)
        inv_l = np.linalg.solve(chol, np.eye(d))  # L⁻¹: Σ'⁻¹ = L⁻ᵀ L⁻¹
        p = inv_l.T @ (inv_l @ mu.T)  # (D, K)
        c = -0.5 * (mu * p.T).sum(1)
        if n >= 2:
            d_eff = d - shrink * float((inv_l * inv_l).sum())  # tr(Σ'⁻¹ Σ)
            c += np.where(seen, 0.5 * d_eff / np.maximum(self.count, 1), 0.0)
        return p.astype(F32), c.astype(F32)
