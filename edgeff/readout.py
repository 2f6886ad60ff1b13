"""Closed-form LDA readouts: the solve shared by the analytic family and the goodness family's ``lda`` predictor.

``solve_lda`` turns sufficient statistics (a Gram matrix ``Σ h hᵀ``, per-class feature sums and counts) into
a linear readout: LDA with equal class priors and a pooled within-class covariance shrunk by a share of its
mean variance, plus the small-class bias correction (a mean of n samples overstates its squared Mahalanobis
norm by d_eff / n). ``edgeff.analytic`` solves it over a frozen random body.

``LdaPredictor`` is the same readout over a *learning* network's neutral-label features (the goodness
family's third predictor, next to goodness and the softmax head): one forward pass per prediction, and no
gradient or learning rate of its own. Two ways to fill its statistics (``TrainConfig.readout_memory``):

- ``0`` (the default): once, when the planned run is complete (``LearnerBase.end_of_plan``, called by
  ``loop.train_epochs``): one more pass over the training set through the trained layers, every sample
  counted once — the readout of the features the model ends with, at the cost of one forward pass per
  sample and nothing per step;
- ``N > 0``: every step, forgetting exponentially with a memory of N samples (each block of ``BLOCK``
  samples scales the old sums by exp(−BLOCK / N)), so the readout follows layers that are still learning
  (a stream, which has no planned end).

A stream has no data set to take that second pass over. ``TrainConfig.readout_window`` (N > 0) keeps the last
N samples learned (inputs and labels, a ring of buffers) and solves the readout from them through the trained
layers when the planned run is complete, and whenever ``solve`` is called without batches: the final
features of samples the device still holds, each sample having arrived once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from edgeff.config import ModelConfig, readout_pool, readout_shape
from edgeff.edge.analytic import ridge_floor
from edgeff.errors import InputError, UnsupportedError


class LocalNet(Protocol):
    """What a readout reads of the network it serves (``edgeff.model.LocalNet``, which builds this predictor)."""

    cfg: ModelConfig
    encoder: Any
    shapes: list[tuple[int, ...]]
    training: bool

    @property
    def num_classes(self) -> int: ...

    def features(self, z: torch.Tensor) -> list[torch.Tensor]: ...

    def eval(self) -> Any: ...

    def train(self, mode: bool = True) -> Any: ...

PENDING = 64  # analytic family: samples whose features wait before one Gram-matrix update (a (64, D) float32 block)
BLOCK = 256  # lda predictor: the same, in larger blocks (its Gram update runs beside training; fewer passes over D×D)


def solve_lda(cov: torch.Tensor, class_sum: torch.Tensor, count: torch.Tensor, imprint: torch.Tensor,
              shrinkage: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The LDA readout ``(P, c)`` (scores = h @ P + c; P (D, K), c (K,), float32) from ``cov``, the Gram
    matrix ``Σ h hᵀ`` of every counted sample (float64, D×D; it is overwritten: the covariance and its factor
    are built in place), ``class_sum`` (K, D) and ``count`` (K,) of the same samples, and ``imprint`` (K, D):
    the mean of a class that has no samples yet.

    Correct for every count and rank (one sample, identical samples, all-zero features, D > n): the ridge is
    ``shrinkage`` × the mean variance but never below ``RIDGE_FLOOR`` × the features' mean square (the
    covariance is a difference of two large sums, so its rounding error scales with the second moment, not
    with the variance: with a handful of near-identical samples the variance is ~1e-18 and a relative ridge
    alone leaves the matrix indefinite); and where the Cholesky factor still fails, the symmetric
    eigendecomposition (which cannot fail) solves it with the eigenvalues clamped at that floor."""
    k, d = count.shape[0], cov.shape[0]
    dev = cov.device
    if k == 0:
        return torch.zeros(d, 0, device=dev), torch.zeros(0, device=dev)
    n = count.sum()
    seen = count > 0
    mu = torch.where(seen[:, None], class_sum / count.clamp(min=1e-12)[:, None], imprint.double())
    shrink = floor = 0.0
    if float(n) < 2:  # nothing to estimate a covariance from: nearest class mean
        cov.zero_().diagonal().fill_(1.0)
    else:
        floor = ridge_floor(float(cov.diagonal().sum()) / (float(n) * d))
        m_seen = mu[seen] * count[seen, None].sqrt()  # (K', D)
        cov.addmm_(m_seen.T, m_seen, alpha=-1.0).div_(n)  # pooled within-class covariance
        shrink = max(shrinkage * max(float(cov.diagonal().mean()), 0.0), floor)
        cov.diagonal().add_(shrink)
    chol, info = torch.linalg.cholesky_ex(cov)
    if int(info) == 0:
        p = torch.cholesky_solve(mu.T.contiguous(), chol)  # (D, K)
        # Σ' = Σ + s·I: d_eff = tr(Σ'⁻¹ Σ) = D − s·tr(Σ'⁻¹), the inverse from the factor (cheaper than Σ's spectrum)
        d_eff = d - shrink * float(torch.cholesky_inverse(chol).diagonal().sum()) if float(n) >= 2 else None
        del chol
    else:  # rounding left it indefinite: Σ' = V Λ Vᵀ with Λ clamped at the floor
        del chol
        lam, vec = torch.linalg.eigh(cov)
        lam = lam.clamp(min=max(floor, 1e-300))
        p = vec @ ((vec.T @ mu.T) / lam[:, None])  # (D, K)
        del vec
        d_eff = float(((lam - shrink) / lam).clamp(min=0.0).sum()) if float(n) >= 2 else None
    c = -0.5 * (mu * p.T).sum(1)  # (K,)
    if d_eff is not None:
        c += torch.where(seen, 0.5 * max(d_eff, 0.0) / count.clamp(min=1.0), torch.zeros_like(c))
    return p.float(), c.float()


class ForgettingStats(nn.Module):
    """LDA's sufficient statistics over the last ~``memory`` samples (float64 sums; exponential forgetting,
    applied a block of ``BLOCK`` samples at a time so the Gram matrix, the sums and the counts always
    describe the same weighted samples; the block products in float64 too: a float32 product loses the
    covariance of features with a large mean, a small difference of large sums). All state is buffers: a
    checkpoint resumes it exactly."""

    class_sum: torch.Tensor
    count: torch.Tensor
    gram: torch.Tensor
    pending: torch.Tensor
    pending_y: torch.Tensor
    n_pending: torch.Tensor
    imprint: torch.Tensor

    def __init__(self, dim: int, num_classes: int, memory: int) -> None:
        super().__init__()
        self.dim, self.memory = dim, memory
        self.register_buffer("class_sum", torch.zeros(num_classes, dim, dtype=torch.float64))
        self.register_buffer("count", torch.zeros(num_classes, dtype=torch.float64))
        self.register_buffer("gram", torch.zeros(dim, dim, dtype=torch.float64))
        self.register_buffer("pending", torch.zeros(BLOCK, dim))
        self.register_buffer("pending_y", torch.zeros(BLOCK, dtype=torch.long))
        self.register_buffer("n_pending", torch.zeros((), dtype=torch.long))
        self.register_buffer("imprint", torch.zeros(num_classes, dim))

    def accumulate(self, h: torch.Tensor, y: torch.Tensor) -> None:
        """Add features ``h`` (B, D) of classes ``y`` (B,)."""
        i = 0
        while i < h.shape[0]:
            n = int(self.n_pending)
            take = min(BLOCK - n, h.shape[0] - i)
            self.pending[n : n + take] = h[i : i + take]
            self.pending_y[n : n + take] = y[i : i + take]
            self.n_pending += take
            i += take
            if int(self.n_pending) == BLOCK:
                keep = math.exp(-BLOCK / self.memory) if self.memory > 0 else 1.0
                block = self.pending.double()
                self.gram.mul_(keep).addmm_(block.T, block)
                self.class_sum.mul_(keep).index_add_(0, self.pending_y, self.pending.double())
                self.count.mul_(keep).add_(torch.bincount(self.pending_y, minlength=self.count.shape[0]).double())
                self.n_pending.zero_()

    def folded(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(gram, class_sum, count)`` with the pending block counted in (new tensors; the state unchanged)."""
        n = int(self.n_pending)
        tail, ty = self.pending[:n].double(), self.pending_y[:n]
        return (self.gram.clone().addmm_(tail.T, tail), self.class_sum.clone().index_add_(0, ty, tail),
                self.count + torch.bincount(ty, minlength=self.count.shape[0]).double())

    def readout(self, shrinkage: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``solve_lda`` over the statistics and the pending block (which counts, without changing the state)."""
        cov, class_sum, count = self.folded()
        return solve_lda(cov, class_sum, count, self.imprint, shrinkage)

    def grow(self, proto: torch.Tensor) -> None:
        """One more class with no samples; ``proto`` (D,) is its mean until it has some."""
        self.class_sum = torch.cat([self.class_sum, self.class_sum.new_zeros(1, self.dim)])
        self.count = torch.cat([self.count, self.count.new_zeros(1)])
        self.imprint = torch.cat([self.imprint, proto.to(self.imprint)[None]])


def layer_features(h: torch.Tensor, pool: tuple[int, int], scale: float) -> torch.Tensor:
    """One layer's output as a readout reads it: average-pooled by ``pool`` (a ViT's tokens as the patch grid they
    cover, ``config.token_grid``), flattened and scaled to length ``scale`` (B, D_l). The readouts' features and
    their exported graphs both call this."""
    if pool != (1, 1):
        if h.dim() == 3:  # (B, N, E) tokens of a g×g patch grid -> (B, E, g, g)
            g = math.isqrt(h.shape[1])
            h = h.transpose(1, 2).reshape(h.shape[0], h.shape[2], g, g)
        h = F.avg_pool2d(h, pool)
    return F.normalize(h.flatten(1), dim=1) * scale


class LdaPredictor(nn.Module):
    """Streaming LDA on the detached, length-normalised features of one neutral-label pass (the inputs
    ``HeadPredictor`` reads), solved in closed form when scores are asked for after new samples. Exported
    like the head: the solved readout is one linear layer (``linear``)."""

    kind = "lda"

    window_x: torch.Tensor
    window_y: torch.Tensor
    window_seen: torch.Tensor

    def __init__(self, net: LocalNet, idx: list[int], memory: int, shrinkage: float, window: int = 0,
                 size: int = 0, mirror: bool = False) -> None:
        super().__init__()
        self.idx = idx
        self.mirror = mirror  # each sample also counted mirrored (a learner trained with random flips)
        self.pools = [readout_pool(net.shapes[i], size) for i in idx]  # conv maps pooled to about size×size
        shapes = [readout_shape(net.shapes[i], size) for i in idx]
        self.scales = [math.sqrt(math.prod(s)) for s in shapes]
        dim = sum(math.prod(s) for s in shapes)
        self.stats = ForgettingStats(dim, net.num_classes, memory)
        self.shrinkage = shrinkage
        self._solved: nn.Linear | None = None
        # the last `window` samples learned, in a ring (window_seen: how many were ever added)
        self.register_buffer("window_x", torch.zeros(window, *net.cfg.input_shape))
        self.register_buffer("window_y", torch.zeros(window, dtype=torch.long))
        self.register_buffer("window_seen", torch.zeros((), dtype=torch.long))

    def _features(self, net: LocalNet, x: torch.Tensor) -> torch.Tensor:
        return self.features_of(net.features(net.encoder.neutral(x)))

    def features_of(self, outs: list[torch.Tensor]) -> torch.Tensor:
        """The readout's features (B, D) from every layer's output (at least up to the last one it reads)."""
        return torch.cat([layer_features(outs[i], k, s) for i, k, s in zip(self.idx, self.pools, self.scales, strict=True)],
                         dim=1)

    @property
    def linear(self) -> nn.Linear:
        """The solved readout as a linear layer (cached until the statistics change)."""
        if self._solved is None:
            if not self.follows and float(self.stats.count.sum()) + int(self.stats.n_pending) == 0:
                raise UnsupportedError("the lda readout of this model is solved when its planned run is complete "
                                       "(edgeff train, loop.train_epochs) or by learner.solve_readout(batches)"
                                       f"{' or learner.solve_readout() (its window)' if self.window else ''}; it "
                                       "has not been solved yet")
            p, c = self.stats.readout(self.shrinkage)
            lin = nn.Linear(p.shape[0], p.shape[1], device=p.device)
            with torch.no_grad():
                lin.weight.copy_(p.T)
                lin.bias.copy_(c)
            object.__setattr__(self, "_solved", lin.requires_grad_(False))  # not a submodule: not in the state
        return self._solved  # type: ignore[return-value]

    @property
    def follows(self) -> bool:
        """Whether the statistics learn every step (a memory) or are solved at the end of the plan."""
        return self.stats.memory > 0

    def scores(self, net: LocalNet, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.linear(self._features(net, x))

    @property
    def window(self) -> int:
        """How many of the latest samples are kept to solve the readout from (0: none)."""
        return self.window_x.shape[0]

    def learn(self, net: LocalNet, x: torch.Tensor, y: torch.Tensor) -> float | None:
        """Following the stream: add the batch's features as the network now computes them (eval mode: the
        neutral pass does not touch the running BatchNorm statistics). Solved at the end: nothing. With a
        window, the samples also go into it (the oldest ones leave)."""
        if self.follows:
            self._accumulate(net, x, y)
        if self.window:
            start = int(self.window_seen)
            x, y = x[-self.window :], y[-self.window :]  # a batch larger than the window: its latest samples
            slots = torch.arange(start, start + x.shape[0], device=self.window_y.device) % self.window
            self.window_x[slots] = x.to(self.window_x)
            self.window_y[slots] = y.to(self.window_y)
            self.window_seen += x.shape[0]
        return None

    def end_of_plan(self, net: LocalNet, batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]) -> None:
        """The planned run is complete: with a window, the readout is solved from the samples it holds (no
        pass over the data); otherwise a readout that does not follow the stream is solved from ``batches()``."""
        if self.window:
            self.solve(net)
        elif not self.follows:
            self.solve(net, batches())

    def ready(self, net: LocalNet, batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]] | None = None
              ) -> str | None:
        """A readout solved at the end of the plan, asked to predict before it (a checkpoint saved mid-plan):
        solved from the samples its window holds, if it keeps one, else from one pass over ``batches()`` when
        given; a line saying so, or None."""
        unsolved = not self.follows and float(self.stats.count.sum()) + int(self.stats.n_pending) == 0
        held = min(int(self.window_seen), self.window)
        if unsolved and not held and batches is not None:
            self.solve(net, batches())
            return ("the lda readout was not solved yet (its planned run is not complete): solved it from one pass "
                    "over the training data; the end of the plan solves it again")
        if not (unsolved and held):
            return None
        self.solve(net)
        return f"the lda readout was not solved yet (saved before its planned run was complete): solved it from " \
               f"the {held} samples its window holds"

    def window_batches(self, size: int = 500) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The samples the window holds, oldest first, in batches of ``size``."""
        n = min(int(self.window_seen), self.window)
        order = (torch.arange(n, device=self.window_y.device) + int(self.window_seen) - n) % max(1, self.window)
        for i in range(0, n, size):
            yield self.window_x[order[i : i + size]], self.window_y[order[i : i + size]]

    def solve(self, net: LocalNet, batches: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
        """Statistics from scratch over ``batches`` (None: the window's samples) through the layers as they
        are (no forgetting), keeping any class means imprinted for classes that have no samples in them."""
        if batches is None:
            if not self.window:
                raise InputError("this lda readout keeps no window of samples (TrainConfig.readout_window is 0): "
                                 "pass the labelled batches to solve it from")
            batches = self.window_batches()
        dev = self.stats.gram.device
        for buf in (self.stats.class_sum, self.stats.count, self.stats.gram, self.stats.n_pending):
            buf.zero_()
        self._solved = None
        memory, self.stats.memory = self.stats.memory, 0
        try:
            for x, y in batches:
                self._accumulate(net, x.to(dev), y.to(dev))
        finally:
            self.stats.memory = memory

    def _accumulate(self, net: LocalNet, x: torch.Tensor, y: torch.Tensor) -> None:
        was_training = net.training
        net.eval()
        with torch.no_grad():
            self.stats.accumulate(self._features(net, x), y)
            if self.mirror:  # the flipped image is as much a sample of its class: twice the samples to estimate from
                self.stats.accumulate(self._features(net, x.flip(-1)), y)
        net.train(was_training)
        self._solved = None

    def grow(self, net: LocalNet, examples: torch.Tensor | None, generator: torch.Generator) -> None:
        """One more class: its mean is that of ``examples``' features until it has samples (the origin
        without examples, far from any normalised feature, so it is rarely predicted)."""
        proto = torch.zeros(self.stats.dim, device=self.stats.gram.device)
        if examples is not None:
            with torch.no_grad():
                proto = self._features(net, examples).mean(0)
        self.stats.grow(proto)
        self._solved = None

    def load_state_dict(self, state, strict: bool = True, assign: bool = False):  # type: ignore[no-untyped-def,override]
        self._solved = None
        return super().load_state_dict(state, strict=strict, assign=assign)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        if prefix + "window_seen" not in state_dict and not self.window:  # saved before windows existed: none
            for name in ("window_x", "window_y", "window_seen"):
                state_dict[prefix + name] = getattr(self, name)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
