"""Learner families, declared once for both runtimes (standard library only: no torch, no numpy).

A ``Family`` names what a family is and reads, for every runtime: its registry key (``kind``, also the
checkpoint's), the losses it trains, the config fields it reads (beyond the shared core) and how those narrow
under given configs, its capabilities, and its implementation in each runtime as ``"module:Class"`` -- the torch
learner (``edgeff.contract.LearnerBase``) and, where the numpy runtime runs it, the edge learner with the limits
of that runtime as declared refusals. Both runtimes refuse settings through these declarations:
``refuse_unread`` (a field the family does not read, set away from its default) is the torch contract's check
and the edge runtime's, and ``refuse_numpy`` says in one line what only torch runs.

    register_family(Family("mirror", "mirror", losses=frozenset({"mirror"}), torch="edgeff.mirror:MirrorLearner",
                           model_fields=frozenset({"mirror_negatives", "margin_last"}), narrow=_mirror_reads))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from edgeff.errors import InputError, UnsupportedError

# a ModelConfig and a TrainConfig (edgeff.config imports this module for the declared losses, so the
# declarations name them without importing them)
ModelConfig = TrainConfig = Any

# TrainConfig fields every learner honours (the optimizer and its state, the seed, the device) or the
# training loop reads (batch size, epochs, the lr decay)
CORE_TRAIN = frozenset({"lr", "optimizer", "optim_state_dtype", "seed", "device", "batch_size", "epochs", "lr_final",
                        "lr_hold", "window"})
# ModelConfig fields every learner honours
CORE_MODEL = frozenset({"layers", "input_shape", "num_classes", "class_names", "family", "loss", "bn_momentum",
                        "bn_min_batch", "bn_always_running"})

Narrow = Callable[[Any, Any, set[str], set[str]], None]  # (model, train, train fields, model fields)
Limit = tuple[Callable[[Any, Any], bool], Callable[[Any, Any], str]]  # (refused(model, train), why(model, train))


@dataclass(frozen=True)
class Family:
    """One family's declaration (see the module docstring).

    ``narrow(model, train, t, m)`` removes from the sets ``t`` (train fields) and ``m`` (model fields) those the
    family does not read under these configs (no head learning rate without a head). ``numpy_losses``: the losses
    the numpy runtime trains (None: all of ``losses``); ``numpy_limits``: (refused(model, train), why(model,
    train)) pairs, checked in order, for what only torch runs."""

    kind: str  # the registry's and the checkpoint's key: "local", "contrastive", "mirror", "analytic", "bp"
    name: str  # for people: "goodness", "contrastive", ...
    losses: frozenset[str] = frozenset()
    train_fields: frozenset[str] = frozenset()
    model_fields: frozenset[str] = frozenset()
    core_unused: frozenset[str] = frozenset()  # core TrainConfig fields it has no use for (closed form: no lr)
    capabilities: frozenset[str] = frozenset()
    narrow: Narrow | None = None
    torch: str = ""  # "module:Class" of its torch learner
    numpy: str | None = None  # "module:Class" of its edge learner; None: torch only
    numpy_name: str = ""  # the edge runtime's name for it ("goodness", "cfl", "analytic")
    numpy_losses: frozenset[str] | None = None
    numpy_limits: tuple[Limit, ...] = field(default=())

    def reads(self, model: ModelConfig, train: TrainConfig) -> tuple[frozenset[str], frozenset[str]]:
        """The train and model fields it reads under these configs (beyond the core ones)."""
        t, m = set(self.train_fields), set(self.model_fields)
        if self.narrow is not None:
            self.narrow(model, train, t, m)
        return frozenset(t), frozenset(m)

    def train_read(self, model: ModelConfig, train: TrainConfig) -> frozenset[str]:
        """Every ``TrainConfig`` field it reads under these configs: the core it uses and its own."""
        return (CORE_TRAIN - self.core_unused) | self.reads(model, train)[0]

    def refuse_unread(self, model: ModelConfig, train: TrainConfig) -> None:
        """``InputError`` naming every config field it would ignore that is not at its default (a family without
        a label input also takes ``label="none"``)."""
        m_read = self.reads(model, train)[1]
        t_read = self.train_read(model, train)
        ignored = [f"{f.name}={getattr(train, f.name)!r}" for f in fields(train)
                   if f.name not in t_read and getattr(train, f.name) != f.default]
        ignored += [f"{f.name}={getattr(model, f.name)!r}" for f in fields(model)
                    if f.name not in CORE_MODEL | m_read and getattr(model, f.name) != f.default
                    and not (f.name == "label" and model.label == "none")]
        if ignored:
            raise InputError(f"a {self.name} learner does not use {', '.join(ignored)}; leave "
                             f"{'it' if len(ignored) == 1 else 'them'} at the default")

    def refuse_numpy(self, model: ModelConfig, train: TrainConfig) -> None:
        """``UnsupportedError`` in one line for what only the torch learner of this family runs."""
        losses = self.losses if self.numpy_losses is None else self.numpy_losses
        if self.numpy is None or model.loss not in losses:
            runs = ", ".join(f"{f.numpy_name} ({', '.join(sorted(f.losses if f.numpy_losses is None else f.numpy_losses))})"
                             for f in _FAMILIES.values() if f.numpy is not None)
            raise UnsupportedError(f"{self.name} models ({self.kind}, loss {model.loss!r}) need torch; the edge "
                                   f"runtime trains {runs}")
        for refused, why in self.numpy_limits:
            if refused(model, train):
                raise UnsupportedError(why(model, train))


_FAMILIES: dict[str, Family] = {}


def register_family(f: Family) -> Family:
    """Make ``f`` known to both runtimes under its ``kind`` (registered again: replaced)."""
    _FAMILIES[f.kind] = f
    return f


def unregister_family(kind: str) -> None:
    _FAMILIES.pop(kind, None)


def declared() -> dict[str, Family]:
    return dict(_FAMILIES)


def declaration(kind: str) -> Family:
    try:
        return _FAMILIES[kind]
    except KeyError:
        raise InputError(f"unknown learner kind {kind!r}; this edgeff knows {', '.join(sorted(_FAMILIES))}") from None


def known_losses() -> list[str]:
    return sorted({loss for f in _FAMILIES.values() for loss in f.losses})


def family_for(model: ModelConfig, *, backprop: bool = False) -> Family:
    """The family that trains ``model`` (its ``family`` field), or the backprop twin."""
    return declaration("bp" if backprop else model.family)


def family_of_loss(loss: str) -> str:
    """The kind of the first declared family that trains ``loss``: how a config written before
    ``ModelConfig.family`` existed (a checkpoint, an edge file) names its family, once, when it is read."""
    for f in _FAMILIES.values():
        if loss in f.losses:
            return f.kind
    raise InputError(f"unknown loss {loss!r}; choose one of {', '.join(known_losses())}")


def check_loss_of(kind: str, loss: str) -> None:
    """``InputError`` in one line unless ``kind`` is a declared family (not the backprop twin, which is chosen by
    ``backprop``, not by the model) that trains ``loss``."""
    f = _FAMILIES.get(kind)
    if f is None or kind == "bp":
        kinds = ", ".join(sorted(k for k in _FAMILIES if k != "bp"))
        raise InputError(f"unknown learner family {kind!r}; choose one of {kinds}")
    if loss not in f.losses:
        raise InputError(f"a {f.name} learner ({kind}) trains {', '.join(sorted(f.losses))}, not loss {loss!r}")


# ------------------------------------------------------------------------------ the built-in families
def _goodness_reads(model: Any, train: Any, t: set[str], m: set[str]) -> None:
    if train.predictor != "head":
        t.discard("head_lr")
    if train.predictor != "lda":
        t -= {"readout_memory", "readout_window", "readout_size"}
        m.discard("shrinkage")
    if train.schedule != "greedy":
        t.discard("greedy_steps")
    if train.schedule == "olu":  # olu steps whole batches (two layers' graphs); the whole-batch step (frugal
        t.discard("chunk")  # False) takes a preset's chunk as it is: chunks never change the update
    if model.loss == "symba":
        m -= {"threshold", "sharpness"}
    else:
        m.discard("alpha")
    if not model.peer_norm:
        m.discard("relu_grad")  # goodness has no gradient at a silent unit: only the peer loss reaches below 0
    if model.label != "channel":
        m.discard("label_learned")
    if model.label != "icp":
        m.discard("icp_rate")


def _contrastive_reads(model: Any, train: Any, t: set[str], m: set[str]) -> None:
    readout = {"predictor", "readout_memory", "readout_window", "readout_size"}
    if model.loss == "cfl":  # label embeddings: per-layer prediction; no head, no margins, no readout
        t -= {"head_lr", *readout}
        m -= {"margin_first", "margin_last", "shrinkage"}
        return
    m -= {"cfl_weights", "embed_dim", "embed_noise"}  # CFF: no dictionary
    if train.predictor == "lda":  # an lda readout on the eval_layers (edgeff.readout); no head
        t.discard("head_lr")
    else:  # the head on the last layer (predictor "head", or the default)
        t -= {"eval_layers", *readout} - ({"predictor"} if train.predictor == "head" else set())
        m.discard("shrinkage")


def _mirror_reads(model: Any, train: Any, t: set[str], m: set[str]) -> None:
    if not model.mirror_negatives:  # the cosine margin pushes other-class pairs apart: only the supervised pairing
        m.discard("margin_last")


def _analytic_reads(model: Any, train: Any, t: set[str], m: set[str]) -> None:
    """``fit_samples`` only with kmeans layers; ``init`` only with layers that have random weights."""
    kinds = {spec.kind for spec in model.layers}
    if "kmeans" not in kinds:
        m.discard("fit_samples")
    if not kinds - {"kmeans"}:
        m.discard("init")


_NUMPY_STATE: Limit = (lambda m, t: t.optim_state_dtype != "float32",
                       lambda m, t: "the edge runtime keeps optimizer state in float32")

register_family(Family(
    "local", "goodness", frozenset({"ff", "symba"}),
    train_fields=frozenset({"schedule", "greedy_steps", "negatives", "predictor", "eval_layers", "head_lr", "frugal",
                            "chunk", "weight_decay", "readout_memory", "readout_window", "readout_size",
                            "crop_padding", "hflip"}),
    model_fields=frozenset({"label", "label_learned", "icp_rate", "threshold", "alpha", "sharpness", "peer_norm",
                            "relu_grad", "init", "shrinkage"}),
    capabilities=frozenset({"layer_predictions", "per_layer_export", "device_export", "edge_runtime", "pipeline"}),
    narrow=_goodness_reads, torch="edgeff.trainer:Learner", numpy="edgeff.edge.learner:GoodnessEdge",
    numpy_name="goodness",
    numpy_limits=(
        (lambda m, t: t.schedule == "olu",
         lambda m, t: "the olu schedule (Overlapping Local Updates) needs torch; the edge runtime trains with "
                      "--schedule all or greedy"),
        (lambda m, t: t.schedule not in ("all", "greedy"),
         lambda m, t: f"unknown schedule {t.schedule!r}; the edge runtime trains all or greedy"),
        (lambda m, t: t.negatives != "uniform",
         lambda m, t: f"{t.negatives!r} negatives need torch; the edge runtime draws uniform ones"),
        (lambda m, t: t.predictor not in ("goodness", "lda"),
         lambda m, t: f"the {t.predictor!r} predictor needs torch; the edge runtime predicts by goodness or an lda "
                      "readout"),
        (lambda m, t: t.predictor == "lda" and bool(t.readout_memory),
         lambda m, t: "an lda readout that follows the stream (readout_memory > 0) needs torch; the edge runtime "
                      "solves it when the planned run is complete (readout_memory 0), from a pass over the data or "
                      "its readout_window"),
        (lambda m, t: bool(t.crop_padding or t.hflip),
         lambda m, t: "random crops and flips (--crop-padding, --hflip) need torch; the edge runtime learns each "
                      "sample as it is (leave them out: --crop-padding 0 --no-hflip)"),
        (lambda m, t: m.label not in ("overlay", "icp", "channel"),
         lambda m, t: f"unknown label encoder {m.label!r}"),
        _NUMPY_STATE,
    )))
register_family(Family(
    "contrastive", "contrastive", frozenset({"supcon", "cfl"}),
    train_fields=frozenset({"eval_layers", "head_lr", "views", "crop_padding", "hflip", "predictor", "readout_memory",
                            "readout_window", "readout_size"}),
    model_fields=frozenset({"global_pool", "temperature", "margin_first", "margin_last", "cfl_weights", "embed_dim",
                            "groups", "embed_noise", "shrinkage"}),
    capabilities=frozenset({"layer_predictions", "edge_runtime", "zero_shot", "attention_maps"}),
    narrow=_contrastive_reads, torch="edgeff.contrastive:ContrastiveLearner",
    numpy="edgeff.edge.learner:CflEdge", numpy_name="cfl", numpy_losses=frozenset({"cfl"}),
    numpy_limits=(
        (lambda m, t: bool(m.cfl_weights[0]),
         lambda m, t: "CFL's batch loss L_batch (cfl_weights[0] > 0) needs torch; the edge runtime trains L_dict and "
                      "L_feat (total-D, the presets' choice)"),
        (lambda m, t: t.views not in (1, 2), lambda m, t: f"views must be 1 or 2, got {t.views}"),
        _NUMPY_STATE,
    )))
register_family(Family(
    "mirror", "mirror", frozenset({"mirror"}), model_fields=frozenset({"mirror_negatives", "margin_last"}),
    narrow=_mirror_reads, torch="edgeff.mirror:MirrorLearner"))
register_family(Family(
    "analytic", "streaming-LDA (closed-form)", frozenset({"lda"}),
    train_fields=frozenset({"hflip"}),  # each sample learned with its mirror image (a second sample, both counted)
    model_fields=frozenset({"shrinkage", "init", "fit_samples"}),
    core_unused=frozenset({"lr", "optimizer", "optim_state_dtype", "lr_final", "lr_hold", "window"}),
    capabilities=frozenset({"edge_runtime"}), narrow=_analytic_reads, torch="edgeff.analytic:AnalyticLearner",
    numpy="edgeff.edge.learner:AnalyticEdge", numpy_name="analytic",
    numpy_limits=(
        (lambda m, t: bool(t.window),
         lambda m, t: "a streaming-LDA model counts each sample once; it takes no window (--window 0)"),
        (lambda m, t: bool(t.hflip),
         lambda m, t: "the edge runtime's streaming LDA learns each sample as it is, not also mirrored (hflip needs "
                      "torch; leave --hflip out)"),
    )))
register_family(Family(
    "bp", "backprop", train_fields=frozenset({"views", "crop_padding", "hflip", "weight_decay"}),
    model_fields=frozenset({"global_pool"}), torch="edgeff.baseline:BPLearner"))


__all__ = ["CORE_MODEL", "CORE_TRAIN", "Family", "check_loss_of", "declaration", "declared", "family_for",
           "family_of_loss", "known_losses",
           "register_family", "unregister_family"]
