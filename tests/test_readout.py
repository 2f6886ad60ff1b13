"""The closed-form LDA readout shared by the analytic family and the goodness family's ``lda`` predictor:
forgetting statistics without memory are the analytic family's statistics, a short memory follows features
that move, the predictor resumes exactly across a Gram-matrix update, grows a class without moving the old
ones, and is refused where it cannot be used."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from edgeff import checkpoint, make_learner
from edgeff.analytic import AnalyticLearner
from edgeff.config import LayerSpec
from edgeff.data import ImageData
from edgeff.errors import InputError, UnsupportedError
from edgeff.loop import planned_batches, train_epochs
from edgeff.presets import PRESETS
from edgeff.readout import BLOCK, ForgettingStats, LdaPredictor
from edgeff.trainer import Learner

SYMBA = PRESETS["symba-mlp"]
SLDA = PRESETS["slda-conv"]


def _lda_learner(**train: object) -> Learner:
    tc = replace(SYMBA.train, device="cpu", predictor="lda", **train)  # type: ignore[arg-type]
    learner = make_learner(SYMBA, train=tc)
    assert isinstance(learner, Learner) and isinstance(learner.predictor, LdaPredictor)
    return learner


def test_statistics_without_memory_are_the_analytic_familys(mnist_small: ImageData) -> None:
    """The same features fed one sample at a time to ``ForgettingStats`` (labels held with the pending
    block) and in batches of 50 to the analytic learner (class sums added at once): the same readout."""
    small = replace(SLDA, model=replace(SLDA.model, layers=(LayerSpec("conv", 16, kernel=5, padding=0, pool=4),)))
    analytic = make_learner(small, train=replace(SLDA.train, device="cpu"))
    assert isinstance(analytic, AnalyticLearner)
    x = mnist_small.normalise(mnist_small.x_train[:1200])
    y = torch.from_numpy(mnist_small.y_train[:1200].astype("int64"))
    for j in range(0, 1200, 50):
        analytic.learn_many(x[j : j + 50], y[j : j + 50])
    h = analytic.net.features(x)
    stats = ForgettingStats(h.shape[1], 10, memory=0)
    for i in range(1200):
        stats.accumulate(h[i : i + 1], y[i : i + 1])
    assert int(stats.n_pending) == 1200 % BLOCK
    p, c = stats.readout(small.model.shrinkage)
    pa, ca = analytic.readout()
    torch.testing.assert_close(p, pa, rtol=1e-4, atol=1e-4 * float(pa.abs().max()))
    torch.testing.assert_close(c, ca, rtol=1e-4, atol=1e-4 * float(ca.abs().max()))


def test_a_short_memory_follows_features_that_move() -> None:
    """Two classes whose means swap halfway through the stream (features that kept learning): a readout
    that keeps every sample cannot tell them apart; one that remembers ~2 blocks predicts the new layout."""
    g = torch.Generator().manual_seed(0)
    d, n = 16, 20 * BLOCK
    mean = torch.zeros(2, d)
    mean[0, :4], mean[1, :4] = 1.0, -1.0

    def draw(swapped: bool) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, 2, (n,), generator=g)
        return (mean.flip(0) if swapped else mean)[y] + 0.5 * torch.randn(n, d, generator=g), y

    old, new = draw(False), draw(True)
    test_x, test_y = draw(True)
    acc = {}
    for memory in (0, 2 * BLOCK):
        stats = ForgettingStats(d, 2, memory)
        for h, y in (old, new):
            stats.accumulate(h, y)
        p, c = stats.readout(1e-2)
        acc[memory] = float(((test_x @ p + c).argmax(1) == test_y).float().mean())
    assert acc[2 * BLOCK] > 0.97 and acc[0] < 0.75, acc


def test_the_lda_predictor_learns_and_resumes_exactly(mnist_small: ImageData, tmp_path: Path) -> None:
    """Batches of 100 with a checkpoint after 6 of them (600 samples: two Gram updates done, 88 pending): the
    resumed learner ends at the uninterrupted one's weights, statistics and scores."""
    x = mnist_small.normalise(mnist_small.x_train[:1200])
    y = torch.from_numpy(mnist_small.y_train[:1200].astype("int64"))
    batches = [(x[i : i + 100], y[i : i + 100]) for i in range(0, 1200, 100)]
    straight = _lda_learner(readout_memory=1000)
    for bx, by in batches:
        straight.learn_many(bx, by)
    first = _lda_learner(readout_memory=1000)
    for bx, by in batches[:6]:
        first.learn_many(bx, by)
    checkpoint.save(first, tmp_path / "ck.pt")
    resumed, _ = checkpoint.load(tmp_path / "ck.pt", device="cpu")
    assert isinstance(resumed, Learner) and int(resumed.predictor.stats.n_pending) == 600 - 2 * BLOCK  # type: ignore[union-attr]
    for bx, by in batches[6:]:
        resumed.learn_many(bx, by)
    for k, v in straight.predictor.state_dict().items():
        assert torch.equal(v, resumed.predictor.state_dict()[k]), k
    xt = mnist_small.normalise(mnist_small.x_test[:200])
    assert torch.equal(straight.scores(xt), resumed.scores(xt))
    assert resumed.prediction_kind() == "logits"


def test_solved_when_the_plan_is_complete(mnist_small: ImageData) -> None:
    """readout_memory 0 (the default): nothing per step, one pass through the trained layers when the planned
    run ends (train_epochs) — the same readout as learn_many steps followed by solve_readout on the data."""
    a = _lda_learner(batch_size=100, epochs=2, lr_final=None)
    train_epochs(a, mnist_small, epochs=1, batch_size=100, limit=600)  # half the plan: not solved yet
    assert float(a.predictor.stats.count.sum()) == 0  # type: ignore[union-attr]
    xt = mnist_small.normalise(mnist_small.x_test[:300])
    with pytest.raises(UnsupportedError, match="not been solved"):
        a.scores(xt)
    train_epochs(a, mnist_small, epochs=2, batch_size=100, limit=600)
    b = _lda_learner(batch_size=100, epochs=2, lr_final=None)
    for epoch in range(2):
        for x, y in mnist_small.train_batches(100, seed=0, epoch=epoch, limit=600):
            b.learn_many(x, y)
    b.solve_readout(mnist_small.train_batches(250, seed=0, limit=600))  # the same 600 samples, other batches
    sa, sb = a.scores(xt), b.scores(xt)
    torch.testing.assert_close(sa, sb, rtol=1e-4, atol=1e-5 * float(sa.abs().max()))
    assert float(a.predictor.stats.count.sum()) + int(a.predictor.stats.n_pending) == 600  # type: ignore[union-attr]
    with pytest.raises(InputError, match="lda predictor"):
        make_learner(SYMBA, train=replace(SYMBA.train, device="cpu")).solve_readout([])  # type: ignore[attr-defined]


def test_a_stream_window_is_not_counted_again(mnist_small: ImageData) -> None:
    """At batch 1 with a window of 8 the layers learn every sample 9 times; the readout counts it once."""
    learner = _lda_learner(batch_size=1, window=8, lr=1e-4, lr_final=None, readout_memory=10**6, epochs=1)
    train_epochs(learner, mnist_small, epochs=1, batch_size=1, limit=300)
    stats = learner.predictor.stats  # type: ignore[union-attr]
    counted = float(stats.count.sum()) + int(stats.n_pending)
    assert learner.samples_seen == 300 and counted == 300
    _, y = next(mnist_small.train_batches(300, seed=0, epoch=0, limit=300))  # the pass's 300 samples
    assert torch.equal(stats.count + torch.bincount(stats.pending_y[: int(stats.n_pending)], minlength=10),
                       torch.bincount(torch.as_tensor(y), minlength=10).double())


def test_a_readout_window_solves_from_the_streams_latest_samples(mnist_small: ImageData, tmp_path: Path) -> None:
    """A one-pass stream at batch 1 with a window of 150 samples, checkpointed and resumed halfway: at the end
    of the plan its readout is the one ``solve_readout`` gives a learner without a window, trained on the same
    stream, from the stream's last 150 samples (the window wraps: 300 samples went through it). No second pass
    over the data is taken: ``end_of_plan``'s batches are never iterated."""
    cfg = {"batch_size": 1, "window": 4, "lr": 1e-4, "lr_final": None, "epochs": 1, "readout_memory": 0}
    n = 300
    stream = list(mnist_small.train_batches(1, seed=0, epoch=0, limit=n))
    steps = list(planned_batches(_lda_learner(**cfg).train_cfg, 0, mnist_small, epochs=1, batch_size=1, limit=n))
    windowed = _lda_learner(readout_window=150, **cfg)
    for x, y, _, _ in steps[: n // 2]:
        windowed.learn_many(x, y)
    checkpoint.save(windowed, tmp_path / "ck.pt")
    windowed, _ = checkpoint.load(tmp_path / "ck.pt", device="cpu")
    assert isinstance(windowed, Learner) and int(windowed.predictor.window_seen) == n // 2  # type: ignore[union-attr]
    for x, y, _, _ in steps[n // 2 :]:
        windowed.learn_many(x, y)
    taken = []

    def never() -> list[tuple[torch.Tensor, torch.Tensor]]:
        taken.append(1)
        return []

    windowed.end_of_plan(never)
    assert not taken
    plain = _lda_learner(**cfg)
    train_epochs(plain, mnist_small, epochs=1, batch_size=1, limit=n)  # solved from all 300 samples
    for k, v in plain.net.state_dict().items():
        assert torch.equal(v, windowed.net.state_dict()[k]), k
    plain.solve_readout([(torch.cat([torch.as_tensor(x) for x, _ in stream[n - 150 :]]),
                          torch.cat([torch.as_tensor(y) for _, y in stream[n - 150 :]]))])
    xt = mnist_small.normalise(mnist_small.x_test[:300])
    sa, sb = windowed.scores(xt), plain.scores(xt)
    torch.testing.assert_close(sa, sb, rtol=1e-4, atol=1e-5 * float(sb.abs().max()))
    windowed.solve_readout()  # on demand, from the same window: the same readout
    torch.testing.assert_close(windowed.scores(xt), sb, rtol=1e-4, atol=1e-5 * float(sb.abs().max()))


def test_the_lda_predictor_reads_the_trained_features(mnist_small: ImageData) -> None:
    """One epoch on 2,000 shipped digits: the readout beats goodness on the same network (one forward
    pass instead of ten); a new class from 20 examples is predicted for most of them and the old classes'
    predictions stay."""
    learner = _lda_learner(batch_size=50, epochs=1)
    train_epochs(learner, mnist_small, epochs=1, batch_size=50, limit=2000)
    xt = mnist_small.normalise(mnist_small.x_test[:500])
    yt = torch.from_numpy(mnist_small.y_test[:500].astype("int64"))
    before = learner.scores(xt)
    new_x = torch.flip(mnist_small.normalise(mnist_small.x_test[500:520]), dims=[3])  # mirrored digits
    assert learner.add_class("mirrored", new_x) == 10
    after = learner.scores(xt)  # the neutral input (the mean class pattern) moved a little: so do the scores
    assert float((after[:, :10].argmax(1) == before.argmax(1)).float().mean()) >= 0.99
    taken = float((after.argmax(1) == 10).float().mean())
    assert taken <= 0.05, taken  # old digits now predicted as mirrored ones
    assert float((learner.scores(new_x).argmax(1) == 10).float().mean()) > 0.5
    lda_acc = float((before.argmax(1) == yt).float().mean())
    learner.select_eval_layers("all-but-first")
    goodness_acc = float((learner.scores(xt)[:, :10].argmax(1) == yt).float().mean())
    assert lda_acc > 0.85 and lda_acc > goodness_acc, (lda_acc, goodness_acc)


def test_where_the_lda_predictor_is_refused() -> None:
    with pytest.raises(InputError, match="readout_memory"):  # a goodness predictor has no statistics
        make_learner(SYMBA, train=replace(SYMBA.train, device="cpu", readout_memory=5))
    with pytest.raises(InputError, match="predictor"):  # the contrastive family predicts by its dictionary
        p = PRESETS["cfl-mlp-stream"]
        make_learner(p, train=replace(p.train, device="cpu", predictor="lda"))
    with pytest.raises(InputError, match="readout_memory"):
        replace(SYMBA.train, readout_memory=-1)
    with pytest.raises(InputError, match="readout_window"):
        make_learner(SYMBA, train=replace(SYMBA.train, device="cpu", readout_window=100))
    with pytest.raises(InputError, match="readout_window is 0"):  # nothing kept to solve from
        _lda_learner().solve_readout()
    from edgeff.edge.learner import make_edge_learner

    with pytest.raises(UnsupportedError, match="follows the stream"):  # the edge runtime solves it at the end
        make_edge_learner(SYMBA, train=replace(SYMBA.train, predictor="lda", readout_memory=500))


def _degenerate(case: str) -> tuple[np.ndarray, np.ndarray]:
    """Features (n, D) float32 and labels for the counts and ranks an LDA solve must survive."""
    rng = np.random.default_rng(0)
    if case == "one sample":
        return rng.random((1, 8), dtype=np.float32), np.array([1])
    if case == "identical samples":  # within-class covariance exactly zero
        base = rng.random((2, 12), dtype=np.float32)
        return np.repeat(base, 4, axis=0), np.repeat(np.arange(2), 4)
    if case == "near-identical samples":  # variance ~1e-18 under features of size ~1 (the contract's failure)
        base = (rng.random(64) + 0.5).astype(np.float32)
        x = np.repeat(base[None], 7, axis=0)
        x[:, :3] += np.float32(3e-7) * rng.standard_normal((7, 3)).astype(np.float32)
        x[np.arange(7) % 2 == 1, 0] += np.float32(0.1)
        return x, np.arange(7) % 2
    if case == "all-zero features":
        return np.zeros((6, 10), np.float32), np.arange(6) % 3
    if case == "D > n":
        mean = rng.standard_normal((3, 200)).astype(np.float32)
        y = np.arange(15) % 3
        return mean[y] + np.float32(0.1) * rng.standard_normal((15, 200)).astype(np.float32), y
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["one sample", "identical samples", "near-identical samples",
                                  "all-zero features", "D > n"])
@pytest.mark.parametrize("shrinkage", [0.0, 1e-2])
def test_the_lda_solve_holds_for_every_count_and_rank(case: str, shrinkage: float) -> None:
    """Regression (the contract test's Cholesky failure on a CPU with other kernels, "input is not positive-
    definite"): built directly, so it fails on any CPU without the ridge floor and the eigen fallback. Both
    runtimes' solves: finite, the same predictions, and each class's own samples scored as that class."""
    from edgeff.edge.analytic import LdaStats
    from edgeff.readout import solve_lda

    x, y = _degenerate(case)
    k = 3
    stats = LdaStats(k, x.shape[1])
    stats.accumulate(x, y)
    pe, ce = stats.readout(shrinkage)
    h = torch.from_numpy(x).double()
    class_sum = torch.zeros(k, x.shape[1], dtype=torch.float64).index_add_(0, torch.from_numpy(y), h)
    count = torch.bincount(torch.from_numpy(y), minlength=k).double()
    pt, ct = solve_lda(h.T @ h, class_sum, count, torch.zeros(k, x.shape[1]), shrinkage)
    for p, c in ((pe, ce), (pt.numpy(), ct.numpy())):
        assert np.isfinite(p).all() and np.isfinite(c).all()
    st, se = x @ pt.numpy() + ct.numpy(), x @ pe + ce
    assert (st.argmax(1) == se.argmax(1)).all()
    if case not in ("one sample", "all-zero features"):  # the classes differ: each sample is its own class's
        assert (st.argmax(1) == y).all()
