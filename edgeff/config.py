"""Configuration: one frozen dataclass per concern. Override with ``dataclasses.replace``.

Each config checks its own values when built (``InputError`` naming the field); which fields a learner
family reads, and the refusal of the ones it does not, is the learner contract's (``edgeff.contract``)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

from edgeff.errors import InputError
from edgeff.families import check_loss_of, family_of_loss
from edgeff.names import checked_name, names_problem

# the largest |value| a learner accepts in a batch after the float32 cast (normalised pixels are O(1); a larger
# value overflows goodness and losses to inf/NaN and would poison every parameter)
MAX_INPUT = 1e6


@dataclass(frozen=True)
class LayerSpec:
    """One local layer. ``kind`` is ``linear`` (inputs are flattened) or ``conv``."""

    # "linear" | "conv" | "vit" (a pre-LN transformer encoder layer; the first also embeds patches) | "kmeans"
    # (unsupervised k-means patch features, edgeff.kmeans: ``out`` centroids, ``kernel`` patches, ``pool`` the grid)
    kind: str
    out: int  # output features (linear) or channels (conv)
    norm: str = "none"  # applied to the layer's input: none | length | layer | batch
    kernel: int = 3  # conv only
    stride: int = 1  # conv only
    padding: int = 1  # conv only
    pool: int = 1  # max-pool size after the activation (1 = no pooling), conv only
    heads: int = 4  # vit only: attention heads
    patch: int = 4  # vit only: patch size of the first vit layer
    mlp_ratio: int = 2  # vit only: MLP hidden width / embedding width
    order: str = "pre"  # pre: norm-weights-ReLU (FF, Trifecta) | post: weights-norm-ReLU (CFL conv) | post-act: weights-ReLU-norm (CFL FC)


@dataclass(frozen=True)
class ModelConfig:
    """The network: its layers, how labels enter it, and its local loss."""

    layers: tuple[LayerSpec, ...]  # the local layers, input to output
    input_shape: tuple[int, int, int] = (1, 28, 28)  # (C, H, W) of one sample
    num_classes: int = 10
    label: str = "icp"  # overlay (FF) | icp (SymBa) | channel (Trifecta)
    label_learned: bool = False  # channel encoder only: learn the label matrix with layer 0
    icp_rate: float = 0.1  # SymBa's pattern sampling rate
    loss: str = "symba"  # ff | symba (goodness, label in the input) | supcon (CFF) | cfl (label embeddings) | mirror | lda (analytic)
    threshold: float = 2.0  # FF loss θ
    sharpness: float = 1.0  # FF loss slope s: softplus(s(θ − G+)) + softplus(s(G− − θ)); s = width, θ = 1 is a BCE on Σh² − width
    peer_norm: float = 0.0  # goodness family: weight of the peer-normalisation loss (each unit's running mean activity on positives pulled toward the layer's mean; 0 = off)
    relu_grad: str = "zero"  # zero: ReLU's gradient below 0 is 0 | pass: passes every gradient (dead units recover under peer_norm)
    init: str = "torch"  # torch: Kaiming-uniform weights and uniform biases | normal: N(0, 1/√out) weights, zero biases
    alpha: float = 4.0  # SymBa α
    bn_momentum: float = 0.1  # running-statistics BatchNorm momentum
    bn_min_batch: int = 8  # batches (pos+neg) smaller than this normalise with running stats in training
    bn_always_running: bool = False  # always normalise with running stats (single-sample training)
    global_pool: bool = False  # conv features are averaged over H×W before a head (BP baseline, CFL's GAP)
    temperature: float = 0.15  # supcon τ (CFF's code: 0.15); CFL's L_feat uses 0.07
    margin_first: float = 0.0  # CFF+M: margin at the first layer (0.4), falling linearly to margin_last
    margin_last: float = 0.0  # CFF+M: margin at the last layer (0.1)
    cfl_weights: tuple[float, float, float] = (1.0, 0.0, 1.0)  # CFL λ1 (L_batch), λ2 (L_dict), λ3 (L_feat)
    embed_dim: int = 0  # CFL dictionary width C_D (0: the widest layer's feature width)
    groups: int = 1  # CFL/CFF linear layers: K feature groups per output (features = mean over groups)
    embed_noise: bool = True  # CFL: N(0, 1/C_l²) noise on the pooled embeddings while training
    mirror_negatives: bool = False  # mirror FFCL: also same-class (+1) and other-class (−1) pairs
    shrinkage: float = 1e-2  # lda (analytic family, lda predictor): the covariance's ridge, a share of its mean variance
    fit_samples: int = 500  # analytic family with kmeans layers: the stream's first samples they are fitted from
    class_names: tuple[str, ...] = ()  # one name per class (empty: "0".."K-1"); grows with add_class
    # the learner family (edgeff.families: local, contrastive, mirror, analytic, or one registered later), which
    # selects the learner in each runtime; "" only in configs written before the field: the family declaring
    # ``loss`` is filled in when such a config is read (the one place the loss names a family)
    family: str = ""

    def __post_init__(self) -> None:
        if not self.family:
            object.__setattr__(self, "family", family_of_loss(self.loss))
        check_loss_of(self.family, self.loss)  # a known family, and a loss it trains
        labels = ("overlay", "icp", "channel", "none")
        for name, allowed in (("relu_grad", ("zero", "pass")), ("init", ("torch", "normal"))):
            if getattr(self, name) not in allowed:
                raise InputError(f"unknown {name} {getattr(self, name)!r}; choose one of {', '.join(allowed)}")
        if not (math.isfinite(self.sharpness) and self.sharpness > 0):
            raise InputError(f"sharpness must be a positive finite number, got {self.sharpness!r}")
        if not (math.isfinite(self.shrinkage) and self.shrinkage >= 0):
            raise InputError(f"shrinkage must be a finite number >= 0, got {self.shrinkage!r}")
        if not (math.isfinite(self.peer_norm) and self.peer_norm >= 0):
            raise InputError(f"peer_norm must be a finite number >= 0, got {self.peer_norm!r}")
        if self.label not in labels:
            raise InputError(f"unknown label encoding {self.label!r}; choose one of {', '.join(labels)}")
        if not self.layers:
            raise InputError("a model needs at least one layer")
        if self.fit_samples < 1:
            raise InputError(f"fit_samples must be >= 1, got {self.fit_samples}")
        if self.num_classes < 0 or len(self.input_shape) != 3 or min(self.input_shape) < 1:
            raise InputError(f"bad model shape: {self.num_classes} classes, input {self.input_shape} (want C, H, W)")
        if self.class_names and len(self.class_names) != self.num_classes:
            raise InputError(f"{len(self.class_names)} class names for {self.num_classes} classes")
        if (why := names_problem(self.class_names)) is not None:
            raise InputError(why)

    @property
    def names(self) -> tuple[str, ...]:
        """The class names, defaulting to the class indices."""
        return self.class_names or tuple(str(i) for i in range(self.num_classes))

    def with_class(self, name: str) -> ModelConfig:
        """This config with one more class called ``name`` (online class addition).

        Raises:
            InputError: the name breaks the one rule for names (``edgeff.names``) or is taken.
        """
        name = checked_name(name)
        if name in self.names:
            raise InputError(f"class {name!r} already exists (index {self.names.index(name)}); pick another name")
        return replace(self, num_classes=self.num_classes + 1, class_names=(*self.names, name))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = [asdict(s) for s in self.layers]
        d["input_shape"] = list(self.input_shape)
        return d

    @staticmethod
    def from_dict(d: dict[str, Any]) -> ModelConfig:
        d = dict(d)
        d["layers"] = tuple(LayerSpec(**s) for s in d["layers"])
        d["input_shape"] = tuple(d["input_shape"])
        if "class_names" in d:
            d["class_names"] = tuple(d["class_names"])
        if "cfl_weights" in d:
            d["cfl_weights"] = tuple(d["cfl_weights"])
        return ModelConfig(**d)


@dataclass(frozen=True)
class TrainConfig:
    """How the layers learn and how the model predicts."""

    lr: float = 1e-3  # every layer's learning rate
    optimizer: str = "adam"  # adam | adamw (weight decay 0.01) | sgd (momentum 0.9)
    optim_state_dtype: str = "float32"  # float32 | bfloat16 | float16: optimizer state between steps
    schedule: str = "all"  # all (every layer every batch) | greedy | olu (Overlapping Local Updates)
    greedy_steps: int = 1000  # greedy: steps each layer trains before it freezes
    negatives: str = "uniform"  # uniform wrong label | hard (drawn by current goodness)
    predictor: str = "goodness"  # goodness (one pass per label) | head (softmax on neutral-label features) | lda (closed-form readout on them)
    eval_layers: str = "all-but-first"  # all | all-but-first | last | last:K
    head_lr: float = 1e-3  # softmax head learning rate
    readout_memory: int = 0  # lda predictor: 0 = solved once the planned run is complete; N = follows the stream, remembering ~N samples
    readout_window: int = 0  # lda predictor: keep the last N samples learned and solve the readout from them at the end of the plan (no second pass over the data)
    readout_size: int = 0  # lda predictor: conv maps larger than N×N are average-pooled to about N×N before the readout (0: read as they are)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    batch_size: int = 128
    epochs: int = 1
    lr_final: float | None = None  # if set, fit() decays each layer's lr linearly to this over the run
    lr_hold: float = 0.0  # with lr_final: the fraction of the planned run at lr before the linear decay starts
    weight_decay: float | None = None  # None: the optimizer's default (adamw 0.01, adam/sgd 0)
    window: int = 0  # each step also learns this many samples that came just before the batch (0: off)
    views: int = 1  # contrastive/backprop learners: 1 (one-forward) or 2 augmented views of every batch (CFF)
    crop_padding: int = 0  # random-crop augmentation: pad by this many border pixels, crop back (0: off)
    hflip: bool = False  # random horizontal flips (not for digits)
    frugal: bool = True  # goodness learners, all/greedy: a layer at a time in chunks of pairs (the whole-batch update); olu and the contrastive families step whole batches
    chunk: int = 64  # frugal step: positive/negative pairs per chunk (0: the whole batch)

    def __post_init__(self) -> None:
        choices = {"optimizer": ("adam", "adamw", "sgd"), "optim_state_dtype": ("float32", "bfloat16", "float16"),
                   "schedule": ("all", "greedy", "olu"), "negatives": ("uniform", "hard"),
                   "predictor": ("goodness", "head", "lda")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise InputError(f"unknown {name} {getattr(self, name)!r}; choose one of {', '.join(map(str, allowed))}")
        if self.views not in (1, 2):
            raise InputError(f"views must be 1 (one-forward) or 2 (two augmented views), got {self.views}")
        for name in ("lr", "head_lr") + (("lr_final",) if self.lr_final is not None else ()):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and math.isfinite(v) and v > 0):
                raise InputError(f"{name} must be a positive finite number, got {v!r}")
        if not 0.0 <= self.lr_hold < 1.0:
            raise InputError(f"lr_hold must be a fraction in [0, 1), got {self.lr_hold!r}")
        select_layers(self.eval_layers, None)  # the spelling; the layer count is checked when a model is built
        if self.weight_decay is not None and not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise InputError(f"weight_decay must be a finite number >= 0, got {self.weight_decay!r}")
        for name, least in (("batch_size", 1), ("epochs", 1), ("greedy_steps", 1), ("chunk", 0), ("crop_padding", 0),
                            ("window", 0), ("readout_memory", 0), ("readout_window", 0), ("readout_size", 0)):
            if getattr(self, name) < least:
                raise InputError(f"{name} must be at least {least}, got {getattr(self, name)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> TrainConfig:
        return TrainConfig(**d)


def token_grid(shape: tuple[int, ...]) -> tuple[int, int, int] | None:
    """A ViT layer's output (N tokens, E) as the map it covers, (E, g, g), when its N tokens are a g×g grid of
    patches (no class token); None for any other shape."""
    if len(shape) != 2:
        return None
    g = math.isqrt(shape[0])
    return (shape[1], g, g) if g * g == shape[0] else None


def readout_pool(shape: tuple[int, ...], size: int) -> tuple[int, int]:
    """The lda readout's average-pooling kernel (= stride, remainder rows and columns dropped) for a layer's
    output ``shape`` under ``TrainConfig.readout_size``: (1, 1) for flat features, maps of at most size×size
    and size 0. A ViT layer's tokens are pooled as the patch grid they cover (``token_grid``)."""
    shape = token_grid(shape) or shape
    if size <= 0 or len(shape) != 3:
        return 1, 1
    return -(-shape[1] // size), -(-shape[2] // size)


def readout_shape(shape: tuple[int, ...], size: int) -> tuple[int, ...]:
    """A layer's output shape as the lda readout reads it (``readout_pool``)."""
    kh, kw = readout_pool(shape, size)
    grid = token_grid(shape) or shape
    return shape if (kh, kw) == (1, 1) else (grid[0], grid[1] // kh, grid[2] // kw)


def select_layers(spec: str, n_layers: int | None) -> list[int]:
    """Indices of the layers a goodness or head predictor reads.

    ``all``, ``all-but-first`` (Hinton's default; the only layer when there is one), ``last``
    (the Trifecta's default) or ``last:K`` (the Trifecta's last-K ensemble, app. I). With ``n_layers``
    None only the spelling is checked (and an empty list returned). Raises ``InputError``.
    """
    if spec in ("all", "all-but-first", "last") and n_layers is None:
        return []
    if spec == "all":
        return list(range(n_layers or 0))
    if spec == "all-but-first":
        return list(range(1, n_layers or 0)) or [0]
    if spec == "last":
        return [(n_layers or 0) - 1]
    if spec.startswith("last:"):
        try:
            k = int(spec.split(":", 1)[1])
        except ValueError:
            k = 0
        if k < 1:
            raise InputError(f"bad layer selection {spec!r}: use last:K with K >= 1")
        if n_layers is None:
            return []
        if k > n_layers:
            raise InputError(f"{spec} asks for {k} layers but the model has {n_layers}; use last:{n_layers} or all")
        return list(range(max(0, n_layers - k), n_layers))
    raise InputError(f"unknown layer selection {spec!r}; use all, all-but-first, last or last:K")
