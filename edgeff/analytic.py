"""The analytic family: streaming linear discriminant analysis over a fixed random body.

No gradient at all. The body (``ModelConfig.layers``, e.g. a conv layer with max-pooling) keeps its seeded
random initialisation; what learns is a closed-form readout over its features ``h`` (D,): per class a
feature sum and a count, and one shared Gram matrix ``Σ h hᵀ`` (the sufficient statistics of streaming
LDA, Hayes & Kanan 2020, "Lifelong Machine Learning with Deep Streaming Linear Discriminant Analysis",
CVPRW). Prediction is LDA with equal class priors and a shrunk pooled within-class covariance:

    Σ = G / N − Σ_c (n_c / N) μ_c μ_cᵀ,   Σ' = Σ + λ · (tr Σ / D) · I   (λ = ``ModelConfig.shrinkage``)
    score_c(h) = hᵀ Σ'⁻¹ μ_c − ½ μ_cᵀ Σ'⁻¹ μ_c

(−½ the squared Mahalanobis distance to μ_c, up to a term shared by every class). The statistics are sums,
so the readout after a stream does not depend on the order of the samples: a class-incremental stream ends
at the same model as shuffled data, without a replay buffer; a new class is one more row, and the old
classes' means are untouched. Random features with a closed-form readout are Rahimi & Recht 2007 (random
features) / Huang et al. 2006 (extreme learning machines); a random conv body is what makes it work on
images (MNIST, one pass: 98.4% with 64 random 5x5 filters and a 4x4 max-pool).

Memory: the statistics are float64 (the covariance is a difference of two large sums); the Gram matrix
is D² values (D = 2304 for ``slda-conv``: 42 MB), updated a block of ``PENDING`` samples at a time (one
matrix product per block instead of a rank-one pass over D² values per sample). The readout is solved
(a Cholesky factorisation, D³/3 flops) when scores are asked for after new samples, and kept until the
next step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from edgeff.config import ModelConfig, TrainConfig
from edgeff.contract import LearnerBase, register
from edgeff.errors import UnsupportedError
from edgeff.families import declaration
from edgeff.inputs import BLOCK_BYTES, as_batch, as_labels, in_row_blocks
from edgeff.kmeans import KMeansPatches
from edgeff.layers import make_block, out_shape
from edgeff.loop import LayerMetrics
from edgeff.readout import PENDING, solve_lda


class FrozenLayer(nn.Module):
    """A body layer: a block at its random initialisation, with no optimizer (the edge runtime's names)."""

    opt = None
    lr = 0.0

    def __init__(self, block: nn.Sequential) -> None:
        super().__init__()
        self.block = block.requires_grad_(False).eval()

    def set_lr(self, lr: float) -> None:
        """Nothing learns here."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class AnalyticNet(nn.Module):
    """The frozen body and the readout's statistics (all buffers, so the state dict is the checkpoint).

    A body with ``kmeans`` layers (``edgeff.kmeans``) first holds the stream's first ``fit_samples`` samples
    (``fit_x``/``fit_y``), fits those layers from them (no labels used), then counts them; from then on the
    body is fixed, so the statistics stay exact sums over every sample, each counted once."""

    class_sum: torch.Tensor
    count: torch.Tensor
    gram: torch.Tensor
    pending: torch.Tensor
    n_pending: torch.Tensor
    imprint: torch.Tensor
    fit_x: torch.Tensor  # with kmeans layers only
    fit_y: torch.Tensor
    n_fit: torch.Tensor

    def __init__(self, cfg: ModelConfig, generator: torch.Generator) -> None:
        super().__init__()
        shape: tuple[int, ...] = cfg.input_shape
        layers = []
        for spec in cfg.layers:
            layers.append(FrozenLayer(make_block(spec, shape, generator, init=cfg.init)))
            shape = out_shape(spec, shape)
        self.layers = nn.ModuleList(layers)
        self.dim = math.prod(shape)
        self.unsupervised = [m for m in self.modules() if isinstance(m, KMeansPatches)]
        self.row_bytes = max((m.map_bytes for m in self.unsupervised), default=0)  # the largest map per sample
        if self.unsupervised:
            self.register_buffer("fit_x", torch.zeros(cfg.fit_samples, *cfg.input_shape))  # held until fitted
            self.register_buffer("fit_y", torch.zeros(cfg.fit_samples, dtype=torch.long))
            self.register_buffer("n_fit", torch.zeros((), dtype=torch.long))
        k, d = cfg.num_classes, self.dim
        self.register_buffer("class_sum", torch.zeros(k, d, dtype=torch.float64))  # Σ h per class
        self.register_buffer("count", torch.zeros(k, dtype=torch.float64))  # samples per class
        self.register_buffer("gram", torch.zeros(d, d, dtype=torch.float64))  # Σ h hᵀ over flushed samples
        self.register_buffer("pending", torch.zeros(PENDING, d))  # features not yet in the Gram matrix
        self.register_buffer("n_pending", torch.zeros((), dtype=torch.long))
        self.register_buffer("imprint", torch.zeros(k, d))  # a class's mean before it has samples (add_class)

    @property
    def local_layers(self) -> list[FrozenLayer]:
        return list(self.layers)  # type: ignore[arg-type]

    def body(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x.flatten(1)  # (B, D)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The body's features (B, D), a bounded block of rows at a time (a kmeans layer's activation map is
        K × H' × W' values per sample: 9 MB at 3,200 centroids on 32x32 inputs)."""
        with torch.no_grad():
            return in_row_blocks(self.body, x, self.row_bytes)

    @property
    def unfitted(self) -> bool:
        """Some kmeans layer still waits for its samples."""
        return any(not bool(m.fitted) for m in self.unsupervised)

    def hold(self, x: torch.Tensor, y: torch.Tensor) -> int:
        """Keep as many of ``x`` (B, ...) as the fitting buffer takes; how many it took."""
        n = int(self.n_fit)
        take = min(self.fit_x.shape[0] - n, x.shape[0])
        self.fit_x[n : n + take] = x[:take]
        self.fit_y[n : n + take] = y[:take]
        self.n_fit += take
        return take

    def fit_layers(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Fit the unfitted kmeans layers from samples ``x`` (each layer from the previous layers' outputs; no
        labels); the body's outputs for ``x``."""
        n, chunk = x.shape[0], max(1, BLOCK_BYTES // max(1, self.row_bytes))
        with torch.no_grad():
            for layer in self.layers:
                for m in layer.modules():
                    if isinstance(m, KMeansPatches) and not bool(m.fitted):
                        m.fit(x, generator)
                x = torch.cat([layer(x[i : i + chunk]) for i in range(0, n, chunk)])
        return x.flatten(1)

    def fit_body(self, generator: torch.Generator, mirror: bool) -> None:
        """Fit the kmeans layers from the held samples, then count those samples (and with ``mirror`` their
        mirror images) in the statistics and empty the buffer."""
        n = int(self.n_fit)
        if n == 0:
            raise UnsupportedError("this model's kmeans layers learn their filters from the first samples it "
                                   "learns, and it has learned none yet")
        y = self.fit_y[:n]
        self.accumulate(self.fit_layers(self.fit_x[:n], generator), y)  # features come back in row blocks
        if mirror:
            self.accumulate(self.features(self.fit_x[:n].flip(3)), y)
        self.fit_x.zero_()
        self.n_fit.zero_()

    def accumulate(self, h: torch.Tensor, y: torch.Tensor) -> None:
        """Add features ``h`` (B, D) of classes ``y`` (B,) to the statistics."""
        self.class_sum.index_add_(0, y, h.double())
        self.count += torch.bincount(y, minlength=self.count.shape[0]).double()
        i = 0
        while i < h.shape[0]:
            n = int(self.n_pending)
            take = min(PENDING - n, h.shape[0] - i)
            self.pending[n : n + take] = h[i : i + take]
            self.n_pending += take
            i += take
            if int(self.n_pending) == PENDING:
                block = self.pending.double()  # (PENDING, D)
                self.gram.addmm_(block.T, block)
                self.pending.zero_()
                self.n_pending.zero_()

    def readout(self, shrinkage: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The LDA readout ``(P, c)``: scores = h @ P + c, P (D, K) and c (K,), float32 (``solve_lda``; the
        pending block counts, without changing the state)."""
        tail = self.pending[: int(self.n_pending)].double()
        return solve_lda(self.gram.clone().addmm_(tail.T, tail), self.class_sum, self.count, self.imprint, shrinkage)


class AnalyticGraph(nn.Module):
    """The inference rule: the body, then one linear map (the solved readout)."""

    def __init__(self, learner: AnalyticLearner) -> None:
        super().__init__()
        p, c = learner.readout()
        self.layers = learner.net.layers
        self.head = nn.Linear(p.shape[0], p.shape[1])
        with torch.no_grad():
            self.head.weight.copy_(p.T)
            self.head.bias.copy_(c)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for layer in self.layers:
            x = layer(x)
        scores = self.head(x.flatten(1))  # (B, K)
        return scores, scores.argmax(1)


@register
class AnalyticLearner(LearnerBase):
    """Streaming LDA on a frozen random body (see the module docstring). Closed form: no learning rate,
    no optimizer, no window (each sample must count once), so those settings are refused."""

    net: AnalyticNet
    declaration = declaration("analytic")  # kind, losses, fields read, no lr or window (edgeff.families)
    exact_once = True
    metrics = "spread"  # no loss: the batch's mean squared distance to its classes' means

    def __init__(self, model: ModelConfig, train: TrainConfig) -> None:
        super().__init__(model, train)
        self.net = AnalyticNet(model, self.generator).to(self.device)
        self._solved: tuple[torch.Tensor, torch.Tensor] | None = None

    def supports(self, capability: str) -> bool:
        """The numpy runtime has no kmeans op: such a body needs torch."""
        if capability == "edge_runtime" and self.net.unsupervised:
            return False
        return super().supports(capability)

    def set_lr(self, lr: float) -> None:
        """Nothing to set: the readout is solved in closed form."""

    def learn_many(self, x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray | list[int], *,
                   fresh: int | None = None) -> list[LayerMetrics]:
        """Add the batch to the statistics. With ``fresh`` (a replay step), only the first ``fresh`` samples:
        the replayed ones were counted when they were new. The metric is the batch's mean squared distance
        to its classes' running means, per feature."""
        xb = as_batch(x, self.model_cfg.input_shape).to(self.device)
        yb = as_labels(y, xb.shape[0], self.model_cfg.num_classes).to(self.device)
        if fresh is not None:
            xb, yb = xb[:fresh], yb[:fresh]
        self.step += 1
        self.samples_seen += int(xb.shape[0])
        self._solved = None
        if self.net.unfitted:  # the stream's first samples: held until the kmeans layers are fitted
            took = self.net.hold(xb, yb)
            xb, yb = xb[took:], yb[took:]
            if int(self.net.n_fit) < self.net.fit_x.shape[0]:
                return [LayerMetrics(0.0, 0.0, 0.0, True)]
            self.net.fit_body(self.generator, self.train_cfg.hflip)
            if xb.shape[0] == 0:
                return [LayerMetrics(0.0, 0.0, 0.0, True)]
        h = self.net.features(xb)  # (B, D)
        self.net.accumulate(h, yb)
        if self.train_cfg.hflip:  # the mirror images count as samples too
            self.net.accumulate(self.net.features(xb.flip(3)), yb)
        mu = self.net.class_sum[yb] / self.net.count[yb, None]
        spread = float(((h.double() - mu) ** 2).mean())
        return [LayerMetrics(spread, 0.0, 0.0, True)]

    def _fit_held(self) -> str | None:
        """Fit the kmeans layers from the samples held so far, if they are still waiting for more."""
        if not self.net.unfitted:
            return None
        held = int(self.net.n_fit)
        self.net.fit_body(self.generator, self.train_cfg.hflip)
        self._solved = None
        return f"fitted the kmeans layers from the {held} samples held (fewer than fit_samples)"

    def end_of_plan(self, batches: Any) -> None:
        """A run shorter than ``fit_samples``: the kmeans layers are fitted from what it held."""
        self._fit_held()

    def ready_to_predict(self, batches: Callable[[], Iterable[tuple[Any, Any]]] | None = None) -> str | None:
        return self._fit_held()

    def readout(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The solved readout ``(P, c)`` (cached until the next step)."""
        self._fit_held()
        if self._solved is None:
            self._solved = self.net.readout(self.model_cfg.shrinkage)
        return self._solved

    def scores(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        xb = as_batch(x, self.model_cfg.input_shape).to(self.device)
        p, c = self.readout()
        return torch.addmm(c, self.net.features(xb), p)  # (B, K)

    def add_class(self, name: str, examples: torch.Tensor | np.ndarray | None = None) -> int:
        """One more class, with no samples yet: until it has some, its mean is that of ``examples`` (which
        are not counted as samples; learn them to count them) or, without examples, the origin (far from
        any ReLU feature, so the class is rarely predicted). The old classes' statistics do not change."""
        cfg = self.model_cfg.with_class(name)
        proto = torch.zeros(1, self.net.dim, device=self.device)
        if examples is not None and not self.net.unfitted:  # (a body still waiting for its samples has no
            xb = as_batch(examples, self.model_cfg.input_shape).to(self.device)  # features to imprint yet)
            proto = self.net.features(xb).mean(0, keepdim=True)
        net = self.net
        net.class_sum = torch.cat([net.class_sum, torch.zeros(1, net.dim, dtype=torch.float64, device=self.device)])
        net.count = torch.cat([net.count, torch.zeros(1, dtype=torch.float64, device=self.device)])
        net.imprint = torch.cat([net.imprint, proto])
        self.model_cfg = cfg
        self._solved = None
        return cfg.num_classes - 1

    def load_state(self, state: dict[str, Any]) -> None:
        super().load_state(state)
        self._solved = None

    def _optim_state(self) -> dict[str, Any]:
        return {}

    def _load_optim_state(self, state: dict[str, Any]) -> None:
        pass

    def inference_graph(self, layers: str | None = None) -> nn.Module:
        return AnalyticGraph(self).eval()

    def prediction_kind(self, layers: str | None = None) -> str:
        return "lda"
