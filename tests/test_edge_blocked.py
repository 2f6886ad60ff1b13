"""The closed-form solve on lower blocks (``edgeff.edge.blocked``) against LAPACK's dense factor and inverse, and
the lda readout it serves against a dense solve of the same statistics: same values to rounding, about half a
matrix of working memory."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from edgeff.edge.analytic import LdaStats
from edgeff.edge.blocked import LowerBlocks, NotPositiveDefinite


def _spd(d: int, seed: int = 0) -> np.ndarray:
    a = np.random.default_rng(seed).standard_normal((d, d + 5))
    return a @ a.T / d + 0.1 * np.eye(d)


@pytest.mark.parametrize(("d", "block"), [(600, 256), (256, 256), (70, 32), (5, 256)])
def test_factor_and_inverse_equal_lapacks(d: int, block: int) -> None:
    m = _spd(d)
    low = LowerBlocks(d, lambda r, c: m[r, c].copy(), block)
    low.cholesky()
    dense = np.zeros((d, d))
    for (i, j), b in low.blocks.items():
        dense[low._sl(i), low._sl(j)] = b
    ref = np.linalg.cholesky(m)
    assert np.abs(dense - ref).max() < 1e-10 * np.abs(ref).max()
    low.invert_lower()
    inv = np.linalg.inv(ref)
    got = low.lower_t_times(low.lower_times(np.eye(d)))  # L⁻ᵀ L⁻¹ = m⁻¹
    assert np.abs(got - np.linalg.inv(m)).max() < 1e-9 * np.abs(np.linalg.inv(m)).max()
    assert low.frobenius_sq() == pytest.approx(float((inv * inv).sum()), rel=1e-10)
    assert LowerBlocks.nbytes_for(d, block) == sum(b.nbytes for b in low.blocks.values())


def test_an_indefinite_matrix_is_reported() -> None:
    m = _spd(300)
    m[290, 290] = -5.0
    low = LowerBlocks(300, lambda r, c: m[r, c].copy(), 128)
    with pytest.raises(NotPositiveDefinite):
        low.cholesky()


def _stats(d: int, n: int = 1500) -> LdaStats:
    rng = np.random.default_rng(1)
    h = np.abs(rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) * 0.1 + rng.standard_normal(d))
    st = LdaStats(10, d)
    st.accumulate(h.astype(np.float32), rng.integers(0, 10, n))
    return st


def test_the_readout_equals_a_dense_solve_in_half_a_matrix() -> None:
    d = 1100
    st = _stats(d)
    tracemalloc.start()
    try:
        p, c = st.readout(0.01)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    mu, n = st.means(), float(st.count.sum())
    tail = st.pending[: int(st.n_pending)].astype(np.float64)
    ms = mu * np.sqrt(st.count)[:, None]
    cov = (st.gram + tail.T @ tail - ms.T @ ms) / n
    s = 0.01 * float(np.diagonal(cov).mean())
    cov[np.diag_indices(d)] += s
    inv = np.linalg.inv(cov)
    p_ref = inv @ mu.T
    c_ref = -0.5 * (mu * p_ref.T).sum(1) + 0.5 * (d - s * np.trace(inv)) / st.count
    assert np.abs(p - p_ref).max() < 1e-5 * np.abs(p_ref).max()
    assert np.abs(c - c_ref).max() < 1e-5 * np.abs(c_ref).max()
    # the dense path held a covariance, LAPACK's factor and numpy's working copy: 3 matrices beside the Gram one;
    # the blocks take 0.61 of one here (15 of 25 blocks), their temporaries a few blocks more
    assert peak < 0.85 * st.gram.nbytes, f"solve peaked at {peak / st.gram.nbytes:.2f} Gram matrices"
