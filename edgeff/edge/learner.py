"""``EdgeLearner``: the layer-local learners of ``edgeff`` in numpy alone, for boards without torch.

The same presets (``edgeff.presets``), the same updates and the same verbs (``learn_many``,
``learn_one``, ``predict_one``, ``predict_many``, ``scores``, ``layer_predictions``, ``add_class``,
``set_lr``) as the torch learners:

- **goodness family** (``ff``/``symba`` losses; ``edgeff.trainer.Learner``): label encoders ``overlay``,
  ``icp`` and ``channel`` (fixed or learned with layer 0), positives and negatives (a uniformly drawn
  wrong label) through each layer, goodness = mean of squares, the ``all`` and ``greedy`` schedules,
  prediction by goodness over every label summed over ``eval_layers``;
- **CFL** (``cfl`` loss; ``edgeff.contrastive.ContrastiveLearner``): L_dict on the pooled noisy
  dictionary and L_feat on the normalised mean features, the dictionary learned from the last layer,
  one or two augmented views, prediction at any layer by ⟨h̄/‖h̄‖, pooled D⟩.

Layers: linear and conv (+ max-pool) with no/length/layer/running-statistics batch normalisation in
any of the three orders; optimizers Adam, AdamW, SGD (``edgeff.edge.optim``). What needs torch is
refused with ``UnsupportedError`` naming it: the ``olu`` schedule, ``hard`` negatives, the softmax
``head`` predictor, an lda readout that follows the stream, CFF/ViT/mirror/backprop models and CFL's L_batch
term. The goodness family's ``lda`` predictor is ``edgeff.edge.readout``: solved at the end of the plan from a
pass over the data or from a window of the stream's last samples.

Random draws (wrong labels, embedding noise, crops) come from an ``edgeff.edge.rand.Rng`` (no ``numpy.random``) seeded by
``train.seed``; they differ from torch's draws, so the two runtimes agree step for step only when given
the same draws (``Draws``), which is how the parity tests drive them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from edgeff.config import MAX_INPUT, ModelConfig, TrainConfig, readout_pool, readout_shape, select_layers
from edgeff.edge.analytic import LdaStats, own
from edgeff.edge.labelled import Split, SplitFirst, split
from edgeff.edge.labelled import applies as split_applies
from edgeff.edge.ops import F32, Op, make_block, out_shape
from edgeff.edge.optim import Optimizer
from edgeff.edge.rand import Rng
from edgeff.edge.readout import LdaReadout
from edgeff.errors import InputError, UnsupportedError
from edgeff.families import family_for
from edgeff.kinds import builder, numpy_kind
from edgeff.loop import LayerMetrics

PEER_MOMENTUM = 0.9  # edgeff.trainer.PEER_MOMENTUM (this module imports no torch)


def pool_matrix(dim: int, width: int) -> np.ndarray:
    """(width, dim) matrix of CFL's 1-D average pooling (stride dim // width, kernel dim − (width − 1)·stride)."""
    if not 1 <= width <= dim:
        raise ValueError(f"cannot pool {dim}-wide embeddings to {width} values; raise embed_dim")
    stride = dim // width
    kernel = dim - (width - 1) * stride
    p = np.zeros((width, dim), F32)
    for j in range(width):
        p[j, j * stride : j * stride + kernel] = 1.0 / kernel
    return p


def _softplus(x: np.ndarray) -> np.ndarray:
    return np.logaddexp(F32(0), x)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return F32(0.5) * (F32(1) + np.tanh(F32(0.5) * x))


def _log_softmax_masked(logits: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise (log Σ_mask exp, softmax over the mask) for rows with at least one True."""
    z = np.where(mask, logits, -np.inf)
    mx = z.max(1, keepdims=True)
    mx = np.where(np.isfinite(mx), mx, 0)
    e = np.where(mask, np.exp(logits - mx), 0).astype(F32)
    s = e.sum(1, keepdims=True)
    lse = (np.log(np.maximum(s, 1e-38)) + mx)[:, 0]
    return lse, e / np.maximum(s, 1e-38)


class Draws:
    """The random draws of a step, from a numpy generator: wrong labels, embedding noise, crops.

    A test replaces this object to feed the draws a torch learner made, so both runtimes take the
    same step."""

    def __init__(self, rng: Rng) -> None:
        self.rng = rng

    def negatives(self, y: np.ndarray, k: int) -> np.ndarray:
        """A uniformly drawn wrong label per sample."""
        return (y + self.rng.integers(1, k, size=y.shape[0])) % k

    def noise(self, shape: tuple[int, ...], width: int) -> np.ndarray:
        """CFL's N(0, 1/width²) embedding noise."""
        return (self.rng.standard_normal(shape, dtype=F32) / F32(width)).astype(F32)

    def augment(self, x: np.ndarray, padding: int, hflip: bool) -> np.ndarray:
        """A random crop after ``padding`` replicated border pixels, and a random flip (``edgeff.augment``)."""
        b, _, h, w = x.shape
        if padding:
            xp = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)), mode="edge")
            off = self.rng.integers(0, 2 * padding + 1, size=(2, b))
            rows = off[0][:, None] + np.arange(h)
            cols = off[1][:, None] + np.arange(w)
            x = xp[np.arange(b)[:, None, None], :, rows[:, :, None], cols[:, None, :]].transpose(0, 3, 1, 2)
        if hflip:
            flip: np.ndarray = np.asarray(self.rng.random(b) < 0.5)
            x = np.where(flip[:, None, None, None], x[..., ::-1], x)
        return np.ascontiguousarray(x, dtype=F32)


class EdgeLayer:
    """One local layer: its ops, its optimizer (created on demand, dropped when frozen) and any extra
    parameters it trains (a learned label matrix, the CFL dictionary), named as in torch's state dict."""

    def __init__(self, index: int, ops: list[Op], optimizer: str, lr: float, weight_decay: float | None = None) -> None:
        self.index = index
        self.ops = ops
        self.optimizer_kind = optimizer
        self.lr = lr
        self.weight_decay = weight_decay
        self.peer_mean: np.ndarray | None = None  # peer normalisation's running mean unit activity (goodness)
        self.opt: Optimizer | None = None
        self.extra: list[str] = []  # names of learner-level parameters this layer's loss trains

    def forward(self, x: np.ndarray, train: bool) -> np.ndarray:
        for op in self.ops:
            x = op.forward(x, train)
        return x

    def backward(self, dy: np.ndarray, need_input_grad: bool) -> np.ndarray | None:
        """Gradients of every op's parameters from the output gradient; the input gradient if asked."""
        first = -1 if need_input_grad else next((j for j, op in enumerate(self.ops) if op.params), len(self.ops))
        g: np.ndarray | None = dy
        for j in range(len(self.ops) - 1, -1, -1):
            self.ops[j].dy_owned = g is not None and g is not dy and not np.may_share_memory(g, dy)
            g = self.ops[j].backward(g, need_dx=j > first)  # type: ignore[arg-type]
        return g

    def named(self, kind: str) -> list[tuple[str, np.ndarray]]:
        """(torch name, array) of the ``params`` or ``buffers`` of this layer's ops, in torch's order."""
        return [(f"layers.{self.index}.block.{j}.{n}", a) for j, op in enumerate(self.ops)
                for n, a in getattr(op, kind).items()]

    def ensure_optimizer(self) -> Optimizer:
        if self.opt is None:
            self.opt = Optimizer(self.optimizer_kind, self.lr, self.weight_decay)
        return self.opt

    def set_lr(self, lr: float) -> None:
        self.lr = lr
        if self.opt is not None:
            self.opt.lr = lr

    def step(self, extra: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
        """Step this layer's optimizer on its ops' gradients and ``extra`` (name -> (param, grad)),
        then free the gradients and the forward cache."""
        opt = self.ensure_optimizer()
        for j, op in enumerate(self.ops):
            for n, p in op.params.items():
                opt.step(f"layers.{self.index}.block.{j}.{n}", p, op.grads[n])
            op.clear()
        for name, (p, g) in extra.items():
            opt.step(name, p, g)

    def clear(self) -> None:
        for op in self.ops:
            op.clear()


def as_batch(x: Any, input_shape: tuple[int, int, int], *, single: bool = False) -> np.ndarray:
    """Check a batch and return it as float32 (B, C, H, W). Raises ``InputError`` saying what to fix."""
    if not isinstance(x, np.ndarray):
        if not hasattr(x, "__array__"):  # a torch tensor converts; a list, a string or a path does not
            raise InputError(f"expected a numpy array (or a torch tensor), got {type(x).__name__}")
        x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        raise InputError(f"expected float inputs (normalised pixels), got dtype {x.dtype}")
    want = tuple(input_shape)
    if single:
        if tuple(x.shape) != want:
            raise InputError(f"expected one sample of shape {want}, got {tuple(x.shape)}")
        x = x[None]
    elif x.ndim == 2 and x.shape[1] == int(np.prod(want)):
        x = x.reshape(x.shape[0], *want)
    if tuple(x.shape[1:]) != want or x.shape[0] < 1:
        raise InputError(f"expected a batch of shape (B, {', '.join(map(str, want))}) with B >= 1, got {tuple(x.shape)}")
    with np.errstate(over="ignore"):
        x = x.astype(F32, copy=False)  # checked after the cast: a float64 1e39 is inf in float32
    if not np.isfinite(x).all():
        raise InputError("the batch contains NaN or infinite values (after the float32 cast); clean the input "
                         "before learning from it")
    if float(np.abs(x).max()) > MAX_INPUT:
        raise InputError(f"the batch holds values beyond ±{MAX_INPUT:g}; normalise the pixels (e.g. to mean 0, "
                         "std 1) before learning from them")
    return x


def as_labels(y: Any, n: int, k: int) -> np.ndarray:
    y = np.asarray(y)
    if y.dtype.kind not in "iu":
        if y.dtype.kind == "f" and np.all(y == np.round(y)):
            y = y.astype(np.int64)
        else:
            raise InputError(f"labels must be integers, got dtype {y.dtype}")
    y = y.astype(np.int64).reshape(-1)
    if y.shape[0] != n:
        raise InputError(f"got {y.shape[0]} labels for {n} samples")
    if n and (int(y.min()) < 0 or int(y.max()) >= k):
        raise InputError(f"labels must lie in 0..{k - 1}; got {int(y.min())}..{int(y.max())}")
    return y


def check_supported(model: ModelConfig, train: TrainConfig) -> str:
    """The family (``goodness``, ``cfl`` or ``analytic``) the edge runtime trains this config with, checked through
    the family's declaration (``edgeff.families``), the one the torch contract checks too: ``UnsupportedError``
    naming what needs torch (its declared numpy limits, a layer kind only torch runs), ``InputError`` for a
    setting the family does not read."""
    fam = family_for(model)
    fam.refuse_numpy(model, train)
    fam.refuse_unread(model, train)
    for spec in model.layers:
        numpy_kind(spec.kind)  # a kind only torch runs: refused with its registered reason
    return fam.numpy_name

def _pairs(t: np.ndarray) -> np.ndarray:
    """A per-sample array's rows for positive/negative pairs: positives then negatives."""
    return np.concatenate([t, t])


INFER_ROWS = 128  # rows a prediction pass runs through a layer at a time, at most
INFER_BYTES = 4 << 20  # a prediction chunk's largest layer working set, at most (one sample at least)


def infer_row_bytes(model: ModelConfig, input_shape: tuple[int, ...], layers: int | None = None) -> int:
    """Bytes one row holds in a prediction pass at its largest layer (of the first ``layers``): the layer's input
    and output, before and after the norm and pool (a conv's patches are unfolded a few samples at a time apart:
    ``edgeff.edge.ops.cols_samples``; ``edgeff.edge.plan`` plans the same)."""
    shape, most = input_shape, 0
    for spec in model.layers[:layers]:
        cost = numpy_kind(spec.kind).cost(spec, shape)  # type: ignore[misc]
        most = max(most, 4 * (2 * int(np.prod(shape)) + 2 * cost.pre_pool))
        shape = out_shape(spec, shape)
    return most


def chunk_samples(model: ModelConfig, input_shape: tuple[int, ...], rows_per_sample: int,
                  layers: int | None = None) -> int:
    """Samples a prediction pass runs at a time: at most ``INFER_ROWS`` rows (``rows_per_sample`` each: one per label
    for the goodness family) and at most ``INFER_BYTES`` at its largest layer; one at least."""
    per_sample = rows_per_sample * infer_row_bytes(model, input_shape, layers)
    return max(1, min(INFER_ROWS // rows_per_sample, INFER_BYTES // max(per_sample, 1)))


@dataclass(frozen=True)
class PlanTerms:
    """What a family adds to the numpy runtime's memory plan (``edgeff.edge.plan``), from its configs alone: the
    plan reads these instead of comparing family names (``EdgeLearner.plan_terms``, overridden per family)."""

    input_shape: tuple[int, ...]  # the first layer's input (a label written into it adds a channel)
    train_rows: int = 1  # rows a layer's training step runs per sample (positives and negatives, views)
    infer_rows: int = 1  # rows a prediction runs per sample (goodness: one per label)
    moments: int = 2  # optimizer moments per trained value (0: nothing is trained by gradient)
    frozen_body: bool = False  # the layers only run forward (their features feed closed-form statistics)
    learned_labels: bool = False  # the label codes / dictionary are trained (their moments are planned)
    window_views: int = 1  # copies of each windowed sample the window holds
    readout_layers: tuple[int, ...] = ()  # layers whose features feed closed-form statistics (a Gram matrix)
    readout_size: int = 0  # their maps pooled to about N×N first (0: as they are)


def numpy_class(model: ModelConfig) -> type[EdgeLearner]:
    """The numpy learner class ``model``'s family declares (``EdgeLearner`` itself for a family only torch runs:
    its ``__init__`` refuses the config in one line)."""
    path = family_for(model).numpy
    return builder(path) if path is not None else EdgeLearner  # type: ignore[no-any-return]


class EdgeLearner:
    """A layer-local learner in numpy; ``edgeff.trainer.Learner``'s and ``ContrastiveLearner``'s verbs.

    Args:
        model: the architecture and local loss (a preset's ``model``).
        train: optimizer, schedule, views, eval layers and seed (a preset's ``train``).

    Raises:
        UnsupportedError: the config uses something only the torch learners implement.
    """

    runtime = "numpy"
    kind = ""  # the contract's kind: set by each family's class below
    exact_once = False  # each sample counted once (``LearnerBase.exact_once``): the analytic family

    def __new__(cls, model: ModelConfig | None = None, train: TrainConfig | None = None,  # noqa: PYI034
                **_: Any) -> EdgeLearner:
        """``EdgeLearner(model, train)`` builds the numpy learner its family declares (``edgeff.families``: the
        declaration's ``numpy`` class); ``__init__`` checks the config (a family only torch runs is refused there)."""
        impl = numpy_class(model) if cls is EdgeLearner and model is not None else cls
        return super().__new__(impl)  # the family's class, not necessarily cls

    def __init__(self, model: ModelConfig, train: TrainConfig, *, fill: bool = True) -> None:
        """``fill=False``: the weights are left unwritten (zero pages the kernel has not handed out yet), for a
        learner whose every tensor is about to be loaded from a file."""
        if not model.layers:
            raise ValueError("a model needs at least one layer")
        self.family = check_supported(model, train)
        self.model_cfg = model
        self.train_cfg = train
        self.rng = Rng(train.seed)
        self.draws = Draws(self.rng)
        self.step = 0
        self.samples_seen = 0
        self.extra: dict[str, np.ndarray] = {}  # learner-level tensors by torch name (label codes, dictionary)
        shape = self._input_shape()
        bn = {"momentum": model.bn_momentum, "min_batch": model.bn_min_batch, "always_running": model.bn_always_running}
        self.layers: list[EdgeLayer] = []
        self.shapes: list[tuple[int, ...]] = []
        for i, spec in enumerate(model.layers):
            self.layers.append(EdgeLayer(i, make_block(spec, shape, self.rng, bn=bn, relu_grad=model.relu_grad,
                                                       init=model.init, fill=fill), train.optimizer, train.lr, train.weight_decay))
            shape = out_shape(spec, shape)
            self._layer_built(self.layers[-1], shape)
            self.shapes.append(shape)
        self.eval_layers = select_layers(train.eval_layers, len(self.layers))
        self.lda: LdaStats | None = None  # the analytic family's statistics
        self.predictor: LdaReadout | None = None  # the goodness family's lda predictor (None: goodness)
        self._readout: tuple[np.ndarray, np.ndarray] | None = None  # the LDA readout, until the next step
        self._built(shape)

    # ------------------------------------------------------------ a family's part (overridden below)
    @classmethod
    def plan_terms(cls, model: ModelConfig, train: TrainConfig) -> PlanTerms:
        """The family's terms of the memory plan (``PlanTerms``): a gradient-trained body, one row per sample."""
        return PlanTerms(tuple(model.input_shape), moments=1 if train.optimizer == "sgd" else 2)

    def _input_shape(self) -> tuple[int, ...]:
        """The first layer's input shape (a family that writes labels into the input draws its codes here)."""
        return self.model_cfg.input_shape

    def _layer_built(self, layer: EdgeLayer, shape: tuple[int, ...]) -> None:
        """Layer ``layer`` (output ``shape``) was just built."""

    def _built(self, shape: tuple[int, ...]) -> None:
        """Every layer is built (``shape``: the last one's output): the family's own tensors."""

    def _learn(self, x: np.ndarray, y: np.ndarray, fresh: int | None) -> list[LayerMetrics]:
        raise NotImplementedError

    def _chunk_scores(self, x: np.ndarray) -> list[np.ndarray]:
        """Each layer's class scores (b, K) of a chunk of samples."""
        raise NotImplementedError

    def _grow(self, xb: np.ndarray | None, cfg: ModelConfig) -> None:
        """Add a class (``cfg``: the config with it) to the family's tensors; ``xb``: its examples, or None."""
        raise NotImplementedError

    # ----------------------------------------------------------------- state
    @property
    def class_names(self) -> tuple[str, ...]:
        return self.model_cfg.names

    @property
    def num_classes(self) -> int:
        return self.model_cfg.num_classes

    def arrays(self) -> dict[str, np.ndarray]:
        """Every tensor of the model by its torch state-dict name (parameters, BN statistics, codes)."""
        out: dict[str, np.ndarray] = {}
        for layer in self.layers:
            out.update(layer.named("params"))
            out.update(layer.named("buffers"))
            if layer.peer_mean is not None:
                out[f"layers.{layer.index}.peer_mean"] = layer.peer_mean
        out.update(self.extra)
        if self.lda is not None:
            out.update(self.lda.arrays())
        if self.predictor is not None:
            out.update(self.predictor.arrays())
        return out

    def param_order(self, i: int) -> list[str]:
        """Layer ``i``'s trained parameters in the order its torch optimizer holds them."""
        return [n for n, _ in self.layers[i].named("params")] + self.layers[i].extra

    def load_arrays(self, arrays: dict[str, np.ndarray], *, adopt: bool = False) -> None:
        """Set every tensor from ``arrays`` (names as ``arrays()``); shapes must match, except label
        codes and dictionaries, which may hold more classes than the config (they set the class count).
        ``adopt``: arrays of the right type become the model's own, not copied (arrays read from a file, which
        nothing else holds: loading then needs no second copy of the statistics)."""
        take = own if adopt else (lambda a, dt: np.asarray(a, dt).copy())
        for layer in self.layers:
            for op_index, op in enumerate(layer.ops):
                for kind in ("params", "buffers"):
                    store = getattr(op, kind)
                    for n in store:
                        name = f"layers.{layer.index}.block.{op_index}.{n}"
                        a = np.asarray(arrays[name])
                        if a.shape != store[n].shape:
                            raise ValueError(f"{name}: shape {a.shape}, the model needs {store[n].shape}")
                        store[n] = take(a, F32)
            if layer.peer_mean is not None:
                layer.peer_mean = take(arrays[f"layers.{layer.index}.peer_mean"], F32)
        for name in self.extra:
            self.extra[name] = take(arrays[name], F32)
        if self.lda is not None:
            self.lda.load(arrays, adopt=adopt)
            self._readout = None
        if self.predictor is not None:
            self.predictor.load(arrays, adopt=adopt)

    def end_of_plan(self, batches: Any) -> None:
        """The planned run is complete (``LearnerBase.end_of_plan``): nothing for most families."""

    def ready_to_predict(self, batches: Any = None) -> str | None:
        """``LearnerBase.ready_to_predict``: nothing to do for most families."""
        return None

    def solve_readout(self, batches: Any = None) -> None:
        raise InputError("solve_readout needs the lda predictor; this learner predicts by its family rule")

    def set_lr(self, lr: float) -> None:
        """Every layer's learning rate (live optimizers and those created later)."""
        for layer in self.layers:
            layer.set_lr(lr)

    # ----------------------------------------------------------------- learning
    def learn_many(self, x: Any, y: Any, *, fresh: int | None = None) -> list[LayerMetrics]:
        """One local step of every scheduled layer on a batch of any size (including 1).

        Returns one ``LayerMetrics`` per layer that ran; never mutates ``x`` or ``y``. ``fresh``: the
        batch is ``fresh`` new samples followed by replayed ones (ER-ACE's asymmetric loss, as the
        torch learners). Raises ``InputError`` (state untouched) for a bad batch.
        """
        xb = as_batch(x, self.model_cfg.input_shape)
        yb = as_labels(y, xb.shape[0], self.num_classes)
        out = self._learn(xb, yb, fresh)
        self.step += 1
        self.samples_seen += xb.shape[0]
        return out

    def learn_one(self, x: Any, y: int) -> list[LayerMetrics]:
        """``learn_many`` on one sample of shape (C, H, W)."""
        return self.learn_many(as_batch(x, self.model_cfg.input_shape, single=True), [int(y)])

    def _body(self, x: np.ndarray) -> np.ndarray:
        for layer in self.layers:
            x = layer.forward(x, train=False)
        return x.reshape(x.shape[0], -1)  # (B, D)

    # ----------------------------------------------------------------- prediction
    def _chunk(self, rows_per_sample: int | None = None, layers: int | None = None) -> int:
        """Samples per prediction chunk (``chunk_samples``): the family's rows per sample (``PlanTerms.infer_rows``)
        unless given, through all layers or the first ``layers``."""
        terms = self.plan_terms(self.model_cfg, self.train_cfg)
        rows = terms.infer_rows if rows_per_sample is None else rows_per_sample
        return chunk_samples(self.model_cfg, terms.input_shape, rows, layers)

    def layer_scores(self, x: Any) -> np.ndarray:
        """Per-layer class scores (B, K, L), computed in chunks, so the working set stays small for any batch."""
        xb = as_batch(x, self.model_cfg.input_shape)
        step = self._chunk()
        out = [np.stack(self._chunk_scores(xb[s : s + step]), axis=-1) for s in range(0, xb.shape[0], step)]
        if not out:
            return np.zeros((0, self.num_classes, len(self.layers)), F32)
        return np.concatenate(out).astype(F32, copy=False)

    def scores(self, x: Any, layers: list[int] | None = None) -> np.ndarray:
        """Class scores (B, K): the lda predictor's readout, or (goodness, CFL, and any ``layers`` given) the
        layers' scores summed over ``layers`` (default: the train config's ``eval_layers``)."""
        if self.predictor is not None and layers is None:
            p, c = self.predictor.readout()
            return (self._readout_features(as_batch(x, self.model_cfg.input_shape)) @ p + c).astype(F32, copy=False)
        sel = self.eval_layers if layers is None else layers
        return self.layer_scores(x)[..., sel].sum(-1)

    def predict_many(self, x: Any) -> np.ndarray:
        return self.scores(x).argmax(1)

    def predict_one(self, x: Any) -> int:
        return int(self.predict_many(as_batch(x, self.model_cfg.input_shape, single=True))[0])

    def layer_predictions(self, x: Any) -> np.ndarray:
        """Each layer's own prediction: (B, L)."""
        return self.layer_scores(x).argmax(1)

    # ----------------------------------------------------------------- growth
    def add_class(self, name: str, examples: Any = None) -> int:
        """Add a class online; returns its index. As the torch learners (each family's ``_grow``); optimizer
        state grows with the tensors. Raises ``InputError`` with nothing changed."""
        cfg = self.model_cfg.with_class(name)
        xb = None if examples is None else as_batch(examples, self.model_cfg.input_shape)
        self._grow(xb, cfg)
        self.model_cfg = cfg
        return cfg.num_classes - 1


class GoodnessEdge(EdgeLearner):
    """The goodness family (``ff``/``symba``; ``edgeff.trainer.Learner``): labels written into the input,
    positives and negatives through each layer, prediction by goodness over every label or an lda readout."""

    kind = "local"

    @classmethod
    def plan_terms(cls, model: ModelConfig, train: TrainConfig) -> PlanTerms:
        """Positives and negatives through each layer, one pass per label to predict (or one through an lda
        readout's statistics), a label channel unless overlaid."""
        c, h, w = model.input_shape
        lda = train.predictor == "lda"
        return replace(super().plan_terms(model, train), input_shape=(c, h, w) if model.label == "overlay" else
                       (c + 1, h, w), train_rows=2, infer_rows=model.num_classes, learned_labels=model.label_learned,
                       readout_layers=tuple(select_layers(train.eval_layers, len(model.layers))) if lda else (),
                       readout_size=train.readout_size)

    def _input_shape(self) -> tuple[int, ...]:
        model = self.model_cfg
        c, h, w = model.input_shape
        k = model.num_classes
        if model.label == "icp":
            self.extra["encoder.patterns"] = (self.rng.random((k, 1, h, w)) < model.icp_rate).astype(F32)
            return (c + 1, h, w)
        if model.label == "channel":
            self.extra["encoder.matrix"] = self.rng.standard_normal((k, h * w), dtype=F32)
            return (c + 1, h, w)
        if k > c * h * w:
            raise ValueError("more classes than input values to overlay them on")
        return model.input_shape

    def _layer_built(self, layer: EdgeLayer, shape: tuple[int, ...]) -> None:
        if self.model_cfg.peer_norm:
            layer.peer_mean = np.full(shape[0], 0.5, F32)

    def _built(self, shape: tuple[int, ...]) -> None:
        model, train = self.model_cfg, self.train_cfg
        if model.label == "channel" and model.label_learned:
            self.layers[0].extra = ["encoder.matrix"]
        if train.predictor == "lda":
            self.predictor = LdaReadout(self._readout_dim(), model.num_classes, model.shrinkage,
                                        train.readout_window, model.input_shape)

    def end_of_plan(self, batches: Any) -> None:
        """The planned run is complete (``LearnerBase.end_of_plan``): an lda predictor is solved, from the
        samples its window holds or from one pass over ``batches()``; nothing for goodness."""
        if self.predictor is not None:
            self.predictor.solve(self._readout_features, None if self.predictor.window else batches())

    def ready_to_predict(self, batches: Any = None) -> str | None:
        """``LearnerBase.ready_to_predict``: an lda readout saved before its plan was complete is solved from
        its window, else from one pass over ``batches()`` when given."""
        return None if self.predictor is None else self.predictor.ready(self._readout_features, batches)

    def solve_readout(self, batches: Any = None) -> None:
        """Solve the lda predictor's readout from labelled ``batches`` through the layers as they are now (None:
        from the samples its window holds)."""
        if self.predictor is None:
            raise InputError("solve_readout needs the lda predictor; this learner predicts by goodness")
        self.predictor.solve(self._readout_features, batches)

    # ----------------------------------------------------------------- encoders
    def _encode(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """The label written into the input (goodness family): (B, C', H, W)."""
        label = self.model_cfg.label
        b, _, h, w = x.shape
        if label == "overlay":
            flat = x.reshape(b, -1).copy()
            flat[:, : self.num_classes] = np.eye(self.num_classes, dtype=F32)[y]
            return flat.reshape(x.shape)
        if label == "icp":
            return np.concatenate([x, self.extra["encoder.patterns"][y]], axis=1)
        chan = self.extra["encoder.matrix"][y].reshape(b, 1, h, w)  # one-hot @ matrix
        return np.concatenate([x, chan], axis=1)

    def _neutral(self, x: np.ndarray) -> np.ndarray:
        """The neutral label written into the input: every class's code averaged (as the torch encoders)."""
        k = self.num_classes
        if self.model_cfg.label == "overlay":
            flat = x.reshape(x.shape[0], -1).copy()
            flat[:, :k] = F32(1.0 / k)
            return flat.reshape(x.shape)
        codes = self.extra["encoder.patterns" if self.model_cfg.label == "icp" else "encoder.matrix"]
        mean = codes.reshape(k, -1).mean(0).reshape(1, 1, *x.shape[2:])
        return np.concatenate([x, np.broadcast_to(mean, (x.shape[0], 1, *x.shape[2:]))], axis=1).astype(F32)

    def _readout_dim(self) -> int:
        return sum(int(np.prod(readout_shape(self.shapes[i], self.train_cfg.readout_size))) for i in self.eval_layers)

    def _readout_features(self, x: np.ndarray) -> np.ndarray:
        """What the lda predictor reads: each chosen layer's output on the neutral-label input (a conv map
        average-pooled to about readout_size×readout_size), flattened, scaled to length √D
        (``edgeff.readout.LdaPredictor._features``), side by side; in chunks."""
        out, step = [], self._chunk(1, max(self.eval_layers) + 1)
        for s in range(0, x.shape[0], step):
            h, feats = self._neutral(x[s : s + step]), []
            for i, layer in enumerate(self.layers[: max(self.eval_layers) + 1]):
                h = layer.forward(h, train=False)
                if i in self.eval_layers:
                    kh, kw = readout_pool(self.shapes[i], self.train_cfg.readout_size)
                    m = h
                    if (kh, kw) != (1, 1):
                        b, c, hh, ww = h.shape
                        m = h[:, :, : hh // kh * kh, : ww // kw * kw].reshape(b, c, hh // kh, kh, ww // kw, kw)
                        m = m.mean((3, 5), dtype=F32)
                    f = m.reshape(m.shape[0], -1)
                    norm = np.maximum(np.sqrt((f * f).sum(1, keepdims=True)), F32(1e-12))
                    feats.append(f / norm * F32(np.sqrt(f.shape[1])))
            out.append(np.concatenate(feats, axis=1))
        if not out:
            return np.zeros((0, self._readout_dim()), F32)
        return np.concatenate(out).astype(F32, copy=False)

    def _learn(self, x: np.ndarray, y: np.ndarray, fresh: int | None) -> list[LayerMetrics]:
        out = self._learn_goodness(x, y, fresh)
        if self.predictor is not None:  # as the torch learner: the new samples, not a stream window's repeats
            new = min(x.shape[0], self.train_cfg.batch_size) if self.train_cfg.window else x.shape[0]
            self.predictor.learn(x[:new], y[:new])
        return out

    def _greedy_active(self) -> int:
        active = min(self.step // self.train_cfg.greedy_steps, len(self.layers) - 1)
        for i, layer in enumerate(self.layers):
            if i != active:
                layer.opt = None  # frozen (or not yet started) layers keep no optimizer state
        return active

    def _goodness_loss(self, gp: np.ndarray, gn: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
        """Loss (mean over the B pairs) and its gradients w.r.t. G_pos and G_neg."""
        b = gp.shape[0]
        cfg = self.model_cfg
        if cfg.loss == "symba":
            a = F32(cfg.alpha)
            d = gp - gn
            s = _sigmoid(-a * d)
            return float(_softplus(-a * d).mean()), -a * s / F32(b), a * s / F32(b)
        th, k = F32(cfg.threshold), F32(cfg.sharpness)
        if cfg.sharpness == 1.0:
            loss = float((_softplus(th - gp) + _softplus(gn - th)).mean())
            return loss, -_sigmoid(th - gp) / F32(b), _sigmoid(gn - th) / F32(b)
        loss = float((_softplus(k * (th - gp)) + _softplus(k * (gn - th))).mean())
        return loss, -k * _sigmoid(k * (th - gp)) / F32(b), k * _sigmoid(k * (gn - th)) / F32(b)

    def _learn_goodness(self, x: np.ndarray, y: np.ndarray, fresh: int | None) -> list[LayerMetrics]:
        b, k = x.shape[0], self.num_classes
        y_neg = self.draws.negatives(y, k)
        if fresh is not None and 0 < fresh < b:
            y_neg = y_neg.copy()
            y_neg[:fresh] = self._fresh_negatives(y[:fresh], y_neg[:fresh])
        labels = np.concatenate([y, y_neg])
        first = self._split_first()
        # the first layer's input: the image and the label codes apart (edge.labelled), or encoded rows (2B, C', H, W)
        h = x if first is not None else np.concatenate([self._encode(x, y), self._encode(x, y_neg)])
        schedule = self.train_cfg.schedule
        last, active = len(self.layers) - 1, -1
        if schedule == "greedy":
            active = last = self._greedy_active()
        metrics = []
        for i, layer in enumerate(self.layers[: last + 1]):
            if i == 0 and first is not None:  # positives then negatives: each sample's row twice
                out = first.forward(self._split(x), labels, _pairs, train=True)
            else:
                out = layer.forward(h, train=True)
            g = (out * out).reshape(2 * b, -1).mean(1)  # (2B,)
            loss, dgp, dgn = self._goodness_loss(g[:b], g[b:])
            trains = schedule != "greedy" or i == active
            if trains:
                n = out[0].size
                dout = np.concatenate([dgp, dgn]).reshape(-1, *([1] * (out.ndim - 1))) * (F32(2.0 / n) * out)
                if layer.peer_mean is not None:
                    loss += self._peer_step(layer, out[:b], dout[:b])
                learned = "encoder.matrix" in layer.extra
                extra = {}
                if i == 0 and first is not None:  # a sample's positive and negative rows summed: its share
                    first.backward(dout.astype(F32, copy=False), lambda d: d[:b] + d[b:])
                else:
                    dx = layer.backward(dout.astype(F32, copy=False), need_input_grad=learned)
                if learned:
                    assert dx is not None
                    dchan = dx[:, -1].reshape(2 * b, -1)  # (2B, H·W)
                    dm = np.zeros_like(self.extra["encoder.matrix"])
                    np.add.at(dm, labels, dchan)
                    extra["encoder.matrix"] = (self.extra["encoder.matrix"], dm)
                layer.step(extra)
            else:
                layer.clear()
            metrics.append(LayerMetrics(loss, float(g[:b].mean()), float(g[b:].mean()), trains))
            h = out
        return metrics

    def _peer_step(self, layer: EdgeLayer, pos: np.ndarray, dpos: np.ndarray) -> float:
        """Peer normalisation (``edgeff.losses.peer_loss``) of a layer's positive outputs ``pos`` (B, C, ...):
        adds its gradient into ``dpos`` in place, folds the batch's mean activity into the running mean and
        returns the weighted loss."""
        assert layer.peer_mean is not None
        w, m = F32(self.model_cfg.peer_norm), F32(PEER_MOMENTUM)
        axes = (0, *range(2, pos.ndim))
        act = pos.mean(axes)  # (C,)
        mixed = layer.peer_mean * m + act * (F32(1) - m)
        dev = mixed - mixed.mean()
        c = mixed.shape[0]
        per_value = pos.size // c  # values averaged into each unit's activity
        dact = (w * F32(2.0 / c) * (F32(1) - m) / F32(per_value)) * dev  # (C,)
        dpos += dact.reshape(1, c, *([1] * (pos.ndim - 2)))
        layer.peer_mean = mixed.astype(F32)
        return float(w * (dev * dev).mean())

    def _fresh_negatives(self, y: np.ndarray, fallback: np.ndarray) -> np.ndarray:
        classes = np.unique(y)
        if classes.size < 2:
            return fallback
        pos = np.searchsorted(classes, y)
        return classes[(pos + self.draws.rng.integers(1, classes.size, size=y.shape[0])) % classes.size]

    def _chunk_scores(self, x: np.ndarray) -> list[np.ndarray]:
        b, k = x.shape[0], self.num_classes
        first = self._split_first()
        labels = np.tile(np.arange(k), b)  # sample-major: every label of a sample, then the next sample
        per = []
        if first is not None:
            h = first.forward(self._split(x), labels, lambda t: np.repeat(t, k, axis=0), train=False)
            per.append((h * h).reshape(b, k, -1).mean(-1))
        else:
            h = self._encode(np.repeat(x, k, axis=0), labels)  # (b·K, C', H, W)
        for layer in self.layers[len(per):]:
            h = layer.forward(h, train=False)
            per.append((h * h).reshape(b, k, -1).mean(-1))
        return per

    def _split_first(self) -> SplitFirst | None:
        """The first layer run on the image and the label codes apart, where it takes them so (edge.labelled)."""
        return SplitFirst(self.layers[0].ops) if split_applies(self.model_cfg) else None

    def _split(self, x: np.ndarray) -> Split:
        return split(self.model_cfg.label, x, self.extra.get("encoder.patterns"), self.num_classes)

    def _grow(self, xb: np.ndarray | None, cfg: ModelConfig) -> None:
        """A new ICP pattern, label-channel row (N(0, 1)) or overlay slot; an lda predictor's mean is the
        examples' features until it has samples."""
        c, h, w = self.model_cfg.input_shape
        if self.predictor is not None:
            dim = self.predictor.stats.dim
            self.predictor.grow(self._readout_features(xb).mean(0) if xb is not None else np.zeros(dim, F32))
        if self.model_cfg.label == "overlay" and cfg.num_classes > c * h * w:
            raise InputError("no input value left to overlay another class on; use an icp or channel model")
        if self.model_cfg.label == "icp":
            row = (self.rng.random((1, 1, h, w)) < self.model_cfg.icp_rate).astype(F32)
            self.extra["encoder.patterns"] = np.concatenate([self.extra["encoder.patterns"], row])
        elif self.model_cfg.label == "channel":
            row = self.rng.standard_normal((1, h * w), dtype=F32)
            self.extra["encoder.matrix"] = np.concatenate([self.extra["encoder.matrix"], row])
            if self.layers[0].opt is not None:
                self.layers[0].opt.grow("encoder.matrix", 1)


class CflEdge(EdgeLearner):
    """CFL (``cfl`` loss; ``edgeff.contrastive.ContrastiveLearner``): L_dict on the pooled noisy dictionary and
    L_feat on the normalised mean features, the dictionary learned from the last layer, prediction at any layer."""

    kind = "contrastive"

    @classmethod
    def plan_terms(cls, model: ModelConfig, train: TrainConfig) -> PlanTerms:
        """Every view through each layer (and in the window); the label dictionary is learned."""
        return replace(super().plan_terms(model, train), train_rows=train.views, learned_labels=True,
                       window_views=train.views)

    def _built(self, shape: tuple[int, ...]) -> None:
        model = self.model_cfg
        self.widths = [s[0] if len(s) == 3 else s[0] // model.groups for s in self.shapes]
        for s in self.shapes:
            if len(s) == 1 and s[0] % model.groups:
                raise ValueError(f"a linear layer of width {s[0]} cannot be split into {model.groups} groups")
        self.extra["embed"] = self.rng.standard_normal((model.num_classes, model.embed_dim or max(self.widths)),
                                                       dtype=F32)
        self.layers[-1].extra = ["embed"]
        self._pool = {wd: pool_matrix(self.extra["embed"].shape[1], wd) for wd in set(self.widths)}

    def _features(self, i: int, out: np.ndarray) -> np.ndarray:
        """A layer's mean feature h̄ (B, C_l): the mean over conv locations or linear groups."""
        if out.ndim == 4:
            return out.mean((2, 3))
        g = self.model_cfg.groups
        return out.reshape(out.shape[0], g, -1).mean(1)

    def _features_backward(self, out: np.ndarray, dh: np.ndarray) -> np.ndarray:
        if out.ndim == 4:
            hw = out.shape[2] * out.shape[3]
            # a read-only broadcast view (no map of copies): the ops read their output gradient, never write it
            return np.broadcast_to((dh / F32(hw)).astype(F32, copy=False)[:, :, None, None], out.shape)
        g = self.model_cfg.groups
        return np.tile(dh / F32(g), (1, g))

    def _cfl_loss(self, i: int, hbar: np.ndarray, y: np.ndarray,
                  allowed: np.ndarray | None) -> tuple[float, np.ndarray, np.ndarray | None]:
        """λ2·L_dict + λ3·L_feat of one layer, with the gradients w.r.t. h̄ and (last layer) the dictionary."""
        cfg = self.model_cfg
        _, l2, l3 = cfg.cfl_weights
        n, c = hbar.shape
        embed = self.extra["embed"]
        pmat = self._pool[c]
        pooled = embed @ pmat.T  # (Z, C_l)
        loss, dh = 0.0, np.zeros_like(hbar)
        de = None
        if l2:
            e = pooled + (self.draws.noise(pooled.shape, c) if cfg.embed_noise else F32(0))
            logits = hbar @ e.T  # (N, Z)
            mask = np.ones_like(logits, bool) if allowed is None else allowed
            lse, p = _log_softmax_masked(logits, mask)
            loss += l2 * float((lse - logits[np.arange(n), y]).mean())
            dlog = p
            dlog[np.arange(n), y] -= F32(1)
            dlog *= F32(l2 / n)
            dh += dlog @ e
            if i == len(self.layers) - 1:
                de = (dlog.T @ hbar) @ pmat  # (Z, C_D)
        if l3:
            norm = np.sqrt((hbar * hbar).sum(1, keepdims=True))
            nrm = np.maximum(norm, F32(1e-12))
            z = hbar / nrm
            logits = (z @ z.T) / F32(cfg.temperature)
            same = y[:, None] == y[None, :]
            pos = same & ~np.eye(n, dtype=bool)
            neg = ~same
            valid = pos.any(1) & neg.any(1)
            if valid.any():
                lse_p, sp = _log_softmax_masked(logits, pos)
                lse_n, sn = _log_softmax_masked(logits, neg)
                per = -(lse_p - np.log(np.maximum(pos.sum(1), 1))) + lse_n
                nv = int(valid.sum())
                loss += l3 * float(per[valid].mean())
                gl = (sn - sp) * (valid[:, None] * F32(l3 / nv))  # d loss / d logits
                ds = gl / F32(cfg.temperature)
                dz = (ds + ds.T) @ z
                dz_h = (dz - z * (dz * z).sum(1, keepdims=True)) / nrm
                dh += np.where(norm > 1e-12, dz_h, dz / nrm)
        return loss, dh.astype(F32, copy=False), de

    def _learn(self, x: np.ndarray, y: np.ndarray, fresh: int | None) -> list[LayerMetrics]:
        return self._learn_cfl(x, y, fresh)

    def _learn_cfl(self, x: np.ndarray, y: np.ndarray, fresh: int | None) -> list[LayerMetrics]:
        k = self.num_classes
        allowed = None
        if fresh is not None and fresh < y.shape[0]:
            allowed = np.ones((y.shape[0], k), bool)
            allowed[:fresh] = np.isin(np.arange(k), y[:fresh])
        tc = self.train_cfg
        if tc.views == 2 or tc.crop_padding or tc.hflip:
            aug = tc.crop_padding or tc.hflip
            x = np.concatenate([self.draws.augment(x, tc.crop_padding, tc.hflip) if aug else x
                                for _ in range(tc.views)])
            y = np.tile(y, tc.views)
            allowed = None if allowed is None else np.tile(allowed, (tc.views, 1))
        metrics = []
        h = x
        for i, layer in enumerate(self.layers):
            out = layer.forward(h, train=True)
            hbar = self._features(i, out)
            loss, dh, de = self._cfl_loss(i, hbar, y, allowed)
            layer.backward(self._features_backward(out, dh), need_input_grad=False)
            layer.step({"embed": (self.extra["embed"], de)} if de is not None else {})
            metrics.append(LayerMetrics(loss, float(np.sqrt((hbar * hbar).sum(1)).mean()), 0.0, True))
            h = out
        return metrics

    def _chunk_scores(self, x: np.ndarray) -> list[np.ndarray]:
        h, per = x, []
        for i, layer in enumerate(self.layers):
            h = layer.forward(h, train=False)
            f = self._features(i, h)
            f = f / np.maximum(np.sqrt((f * f).sum(1, keepdims=True)), F32(1e-12))
            per.append(f @ (self.extra["embed"] @ self._pool[f.shape[1]].T).T)
        return per

    def _grow(self, xb: np.ndarray | None, cfg: ModelConfig) -> None:
        """A dictionary row from the examples' mean features at the ``eval_layers`` (random without examples) at
        the mean norm of the other rows."""
        embed = self.extra["embed"]
        dim = embed.shape[1]
        if xb is not None:
            feats, hcur = [], xb
            for i, layer in enumerate(self.layers):
                hcur = layer.forward(hcur, train=False)
                feats.append(self._features(i, hcur).mean(0))
            protos = []
            for i in self.eval_layers:
                f = feats[i] / max(float(np.linalg.norm(feats[i])), 1e-12)
                protos.append(f[(np.arange(dim) * f.shape[0]) // dim])  # nearest-neighbour widening
            proto = np.mean(protos, axis=0)
        else:
            proto = self.rng.standard_normal(dim)
        scale = float(np.linalg.norm(embed, axis=1).mean()) if embed.shape[0] else float(np.sqrt(dim))
        row = (proto / max(float(np.linalg.norm(proto)), 1e-12) * scale).astype(F32)
        self.extra["embed"] = np.concatenate([embed, row[None]])
        if self.layers[-1].opt is not None:
            self.layers[-1].opt.grow("embed", 1)


class AnalyticEdge(EdgeLearner):
    """Streaming LDA on a frozen random body (``lda`` loss; ``edgeff.analytic.AnalyticLearner``): the features'
    class sums and Gram matrix, the readout solved in closed form."""

    kind = "analytic"
    exact_once = True

    @classmethod
    def plan_terms(cls, model: ModelConfig, train: TrainConfig) -> PlanTerms:
        """A frozen body (no moments, forward only) whose last features feed the statistics."""
        return replace(super().plan_terms(model, train), moments=0, frozen_body=True,
                       readout_layers=(len(model.layers) - 1,))

    def _built(self, shape: tuple[int, ...]) -> None:
        self.lda = LdaStats(self.model_cfg.num_classes, int(np.prod(shape)))

    def _learn(self, x: np.ndarray, y: np.ndarray, fresh: int | None) -> list[LayerMetrics]:
        if fresh is not None:
            x, y = x[:fresh], y[:fresh]
        return self._learn_analytic(x, y)

    def _learn_analytic(self, x: np.ndarray, y: np.ndarray) -> list[LayerMetrics]:
        """Streaming LDA (``edgeff.analytic``): the batch's features into the statistics (the replayed
        samples of a ``fresh`` step were counted when new); the metric is the batch's mean squared
        distance to its classes' running means."""
        assert self.lda is not None
        h = self._body(x)
        self.lda.accumulate(h, y)
        mu = self.lda.class_sum[y] / self.lda.count[y, None]
        self._readout = None
        return [LayerMetrics(float(((h.astype(np.float64) - mu) ** 2).mean()), 0.0, 0.0, True)]

    def readout(self) -> tuple[np.ndarray, np.ndarray]:
        """The solved LDA readout ``(P, c)`` (analytic family; cached until the next step)."""
        assert self.lda is not None
        if self._readout is None:
            self._readout = self.lda.readout(self.model_cfg.shrinkage)
        return self._readout

    def layer_scores(self, x: Any) -> np.ndarray:
        """The readout's scores (B, K, 1)."""
        xb = as_batch(x, self.model_cfg.input_shape)
        p, c = self.readout()
        step = self._chunk()
        return np.concatenate([self._body(xb[s : s + step]) @ p + c for s in range(0, xb.shape[0], step)]
                              or [np.zeros((0, self.num_classes), F32)])[..., None]

    def _grow(self, xb: np.ndarray | None, cfg: ModelConfig) -> None:
        assert self.lda is not None
        self.lda.grow(self._body(xb).mean(0) if xb is not None else np.zeros(self.lda.dim, F32))
        self._readout = None


def make_edge_learner(preset: Any, *, input_shape: tuple[int, int, int] | None = None,
                      num_classes: int | None = None, train: TrainConfig | None = None) -> EdgeLearner:
    """An ``EdgeLearner`` for a preset (name or ``Preset``), adapted to a data set like ``make_learner``."""
    from edgeff.presets import get_preset

    p = get_preset(preset) if isinstance(preset, str) else preset
    if p.algorithm != "local":
        raise UnsupportedError(f"{p.name} is a backprop preset; the edge runtime trains layer-local ones")
    model = p.model
    if input_shape is not None:
        model = replace(model, input_shape=tuple(int(v) for v in input_shape))
    if num_classes is not None:
        model = replace(model, num_classes=num_classes)
    return EdgeLearner(model, train or p.train)


def evaluate(learner: EdgeLearner, batches: Iterable[tuple[np.ndarray, np.ndarray]], *,
             per_layer: bool = False) -> dict[str, Any]:
    """Test accuracy (and each layer's own) over ``batches``."""
    correct = total = 0
    layer_correct = np.zeros(len(learner.layers), np.int64)
    for x, y in batches:
        s = learner.layer_scores(x)
        yy = np.asarray(y)
        overall = learner.scores(x) if learner.predictor is not None else s[..., learner.eval_layers].sum(-1)
        correct += int((overall.argmax(1) == yy).sum())
        if per_layer:
            layer_correct += (s.argmax(1) == yy[:, None]).sum(0)
        total += len(yy)
    out: dict[str, Any] = {"accuracy": correct / max(total, 1), "samples": total}
    if per_layer:
        out["layer_accuracy"] = [float(c) / max(total, 1) for c in layer_correct]
    return out
