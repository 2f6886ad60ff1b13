"""The learner contract: one interface for every family, and the registry that picks a family.

Every learner (goodness ``Learner``, ``ContrastiveLearner``, ``MirrorLearner``, the backprop twin
``BPLearner``, and any family added later) subclasses ``LearnerBase`` and registers itself with
``register``. Checkpoints, export, evaluation, the continual loop and the CLI talk to learners only
through this contract, so adding a family touches its own module plus its declaration (``edgeff.families``).

The verbs (``learn_many`` returns one ``LayerMetrics`` per layer that ran, for every family):

- ``learn_many(x, y, *, fresh=None)``, ``learn_one(x, y)``: one step on a batch / a sample;
- ``scores(x)`` (B, K), ``predict_many(x)`` (B,), ``predict_one(x)``;
- ``layer_predictions(x)`` (B, L): each layer's own prediction, where ``"layer_predictions"`` is among the
  family's ``capabilities`` (otherwise ``UnsupportedError``);
- ``add_class(name, examples=None)`` -> the new class's index; ``class_names``;
- ``set_lr(lr)``;
- ``state()`` / ``load_state(state)``: everything a checkpoint needs (``edgeff.checkpoint``);
- ``inference_graph(layers)``: the torch module of its prediction rule that ONNX export traces, and
  ``prediction_kind(layers)``: the rule's name stored in the exported file.

Configs: a family reads the shared core of ``TrainConfig`` (``CORE_TRAIN``) and the fields it names in
``train_fields``; the model fields it reads beyond ``CORE_MODEL`` in ``model_fields`` (``reads`` narrows
both to what matters under the given configs: no head learning rate without a head). A field it does
not read must stay at its default, or the learner refuses to be built (no silently ignored settings). The
backprop twin of a preset is built with ``build(..., backprop=True)``, which gives it the preset's
configs with the fields it does not read reset (``for_family``).

Capabilities (strings a caller may ask ``supports`` about): ``layer_predictions``, ``per_layer_export``
(one ONNX file per layer), ``device_export`` (the simulated device's model), ``edge_runtime`` (the numpy
runtime trains it), ``pipeline`` (a layer pipeline over ranks), ``zero_shot`` and ``attention_maps``
(label-embedding models). ``select_eval_layers`` picks the layers that predict where that means something.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import fields, replace
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch
from torch import nn

from edgeff.config import ModelConfig, TrainConfig
from edgeff.errors import InputError, UnsupportedError
from edgeff.families import CORE_MODEL, CORE_TRAIN, Family, declared, family_for
from edgeff.inputs import as_batch, as_labels, resolve_device
from edgeff.loop import LayerMetrics


class LearnerBase(ABC):
    """The contract (see the module docstring). Subclasses set the class attributes, call
    ``super().__init__(model, train)`` first (it checks the configs, resolves the device and seeds
    the generator), then build ``self.net``."""

    # the family's declaration (edgeff.families): kind, name, losses, fields read, capabilities, for both runtimes;
    # a subclass that sets it gets the class attributes below from it
    declaration: ClassVar[Family | None] = None
    kind: ClassVar[str]  # the registry's and the checkpoint's key: "local", "contrastive", "mirror", "bp"
    family: ClassVar[str]  # its name for people: "goodness", "contrastive", "mirror", "backprop"
    losses: ClassVar[frozenset[str]] = frozenset()  # the ModelConfig.loss values it trains
    capabilities: ClassVar[frozenset[str]] = frozenset()
    # what its LayerMetrics mean: "goodness" (loss, g+ - g-), "norm" (loss, mean feature norm) or "loss"
    metrics: ClassVar[str] = "loss"
    train_fields: ClassVar[frozenset[str]] = frozenset()  # TrainConfig fields read beyond CORE_TRAIN
    model_fields: ClassVar[frozenset[str]] = frozenset()  # ModelConfig fields read beyond CORE_MODEL
    # CORE_TRAIN fields it has no use for (a closed-form family: no lr, no optimizer); refused like the others
    core_unused: ClassVar[frozenset[str]] = frozenset()
    # it learns sufficient statistics (the analytic family): a sample learned again counts twice, so the
    # loops give it each sample once (``fit`` mixes no replayed samples in, class addition makes one pass)
    exact_once: ClassVar[bool] = False

    net: Any  # the family's network (a torch module; families narrow the type)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        d = cls.__dict__.get("declaration")
        if d is not None:
            cls.kind, cls.family, cls.losses, cls.capabilities = d.kind, d.name, d.losses, d.capabilities
            cls.train_fields, cls.model_fields, cls.core_unused = d.train_fields, d.model_fields, d.core_unused

    def __init__(self, model: ModelConfig, train: TrainConfig) -> None:
        refuse_unread(type(self), model, train)
        self.model_cfg = model
        self.train_cfg = train
        self.device = resolve_device(train.device)
        self.generator = torch.Generator().manual_seed(train.seed)
        self.step = 0  # learn_many calls so far
        self.samples_seen = 0
        self.layer_hook: Callable[[int, bool], None] | None = None  # (layer, entering) around each layer's step

    # ------------------------------------------------------------------------------------- verbs
    @abstractmethod
    def learn_many(self, x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray | list[int], *,
                   fresh: int | None = None) -> list[LayerMetrics]:
        """One step on a batch; one ``LayerMetrics`` per layer that ran. Never mutates ``x`` or ``y``."""

    def end_of_plan(self, batches: Callable[[], Iterable[tuple[Any, Any]]]) -> None:
        """The planned run is complete (``loop.train_epochs`` calls it; ``batches()`` iterates over the training
        set once). Nothing for most families; a goodness learner with an lda predictor that does not follow
        the stream (``readout_memory=0``) solves its readout here, from one pass through the trained layers (or
        from the samples its ``readout_window`` holds, without that pass)."""

    def _as_tensors(self, batches: Iterable[tuple[Any, Any]]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Labelled batches checked and moved to the learner's device (what a readout solve reads)."""
        for x, y in batches:
            xb = as_batch(x, self.model_cfg.input_shape).to(self.device)
            yield xb, as_labels(y, xb.shape[0], self.model_cfg.num_classes).to(self.device)

    def ready_to_predict(self, batches: Callable[[], Iterable[tuple[Any, Any]]] | None = None) -> str | None:
        """Ready a model saved partway through its plan to predict; a line saying what was done, or None when
        nothing was needed (every family but a goodness learner with an lda readout: solved from the samples its
        window holds, else from one pass over ``batches()`` when given, as the end of the plan would; the end of
        the plan solves it again from scratch)."""
        return None

    def learn_one(self, x: torch.Tensor | np.ndarray, y: int) -> list[LayerMetrics]:
        """``learn_many`` on a single sample of shape (C, H, W)."""
        return self.learn_many(as_batch(x, self.model_cfg.input_shape, single=True), [int(y)])

    @abstractmethod
    def scores(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Class scores (B, K); higher is more likely."""

    def predict_many(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        return self.scores(x).argmax(1).cpu()

    def predict_one(self, x: torch.Tensor | np.ndarray) -> int:
        return int(self.predict_many(as_batch(x, self.model_cfg.input_shape, single=True))[0])

    def layer_predictions(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Each layer's own prediction (B, L), for families with the ``layer_predictions`` capability."""
        raise UnsupportedError(f"a {self.family} learner has no per-layer predictions")

    @abstractmethod
    def add_class(self, name: str, examples: torch.Tensor | np.ndarray | None = None) -> int:
        """Add a class online; returns its index (the old classes keep theirs)."""

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.model_cfg.names

    @abstractmethod
    def set_lr(self, lr: float) -> None:
        """Every layer's learning rate from now on."""

    @classmethod
    def reads(cls, model: ModelConfig, train: TrainConfig) -> tuple[frozenset[str], frozenset[str]]:
        """The train and model fields this family reads under these configs (beyond the core ones);
        a family narrows its ``train_fields``/``model_fields`` where a field only matters with another
        setting (e.g. a head's learning rate without a head): its declaration's ``narrow``."""
        if cls.declaration is not None:
            return cls.declaration.reads(model, train)
        return cls.train_fields, cls.model_fields

    def supports(self, capability: str) -> bool:
        """Whether this learner does ``capability`` (see the module docstring)."""
        return capability in self.capabilities

    def select_eval_layers(self, layers: str) -> None:
        """Predict from the layers ``layers`` names (all, all-but-first, last, last:K) from now on."""
        raise UnsupportedError(f"a {self.family} model predicts from its output; --layers does not apply")

    # ------------------------------------------------------------------------------ checkpoints
    def state(self) -> dict[str, Any]:
        """Everything needed to resume exactly: weights and statistics, the generator, the counters,
        and the family's optimizer and predictor state (``_optim_state``)."""
        return {"net": self.net.state_dict(), "generator": self.generator.get_state(), "step": self.step,
                "samples_seen": self.samples_seen, **self._optim_state()}

    def load_state(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state["net"])
        self.generator.set_state(state["generator"])
        self.step = int(state["step"])
        self.samples_seen = int(state["samples_seen"])
        self._load_optim_state(state)

    @abstractmethod
    def _optim_state(self) -> dict[str, Any]:
        """The optimizers' (and a learned predictor's) state, under checkpoint keys of the family's choosing."""

    @abstractmethod
    def _load_optim_state(self, state: dict[str, Any]) -> None: ...

    # ----------------------------------------------------------------------------------- export
    @abstractmethod
    def inference_graph(self, layers: str | None = None) -> nn.Module:
        """The prediction rule as a module ``x -> (scores, label)`` (``edgeff.graphs``), in eval mode."""

    def prediction_kind(self, layers: str | None = None) -> str:
        """How the exported scores are made (stored in the ONNX file's metadata)."""
        return "logits"


L = TypeVar("L", bound=type[LearnerBase])
_REGISTRY: dict[str, type[LearnerBase]] = {}


def register(cls: L) -> L:
    """Class decorator: make a family known by its ``kind``."""
    _REGISTRY[cls.kind] = cls
    return cls


def families() -> dict[str, type[LearnerBase]]:
    """Every registered family by kind (the modules of the declared families' torch learners imported on first
    use)."""
    for d in declared().values():
        if d.torch:
            importlib.import_module(d.torch.partition(":")[0])
    return dict(_REGISTRY)


def learner_class(kind: str) -> type[LearnerBase]:
    reg = families()
    if kind not in reg:
        raise InputError(f"unknown learner kind {kind!r}; this edgeff knows {', '.join(sorted(reg))}")
    return reg[kind]


def family_of(model: ModelConfig, *, backprop: bool = False) -> type[LearnerBase]:
    """The family that trains ``model`` (the declaration naming its loss, ``edgeff.families``), or the backprop
    twin."""
    return learner_class(family_for(model, backprop=backprop).kind)


def for_family(cls: type[LearnerBase], model: ModelConfig, train: TrainConfig) -> tuple[ModelConfig, TrainConfig]:
    """``model`` and ``train`` with every field ``cls`` does not read reset to its default (a preset's
    configs handed to its backprop twin)."""
    m_keep, t_keep = CORE_MODEL | cls.reads(model, train)[1], train_read(cls, model, train)
    m_defaults: dict[str, Any] = {f.name: f.default for f in fields(ModelConfig) if f.name not in m_keep}
    t_defaults: dict[str, Any] = {f.name: f.default for f in fields(TrainConfig) if f.name not in t_keep}
    return replace(model, **m_defaults), replace(train, **t_defaults)


def build(model: ModelConfig, train: TrainConfig, *, backprop: bool = False) -> LearnerBase:
    """The learner of ``model``'s family (or its backprop twin, on the fields the twin reads)."""
    cls = family_of(model, backprop=backprop)
    if backprop:
        model, train = for_family(cls, model, train)
    return cls(model, train)


def train_read(cls: type[LearnerBase], model: ModelConfig, train: TrainConfig) -> frozenset[str]:
    """Every ``TrainConfig`` field ``cls`` reads under these configs: the core it uses and its own."""
    return (CORE_TRAIN - cls.core_unused) | cls.reads(model, train)[0]


def refuse_unread(cls: type[LearnerBase], model: ModelConfig, train: TrainConfig) -> None:
    """Raise ``InputError`` naming every config field ``cls`` would ignore that is not at its default
    (a family without a label input also takes ``label="none"``)."""
    d = cls.declaration or Family(cls.kind, cls.family, cls.losses, cls.train_fields, cls.model_fields,
                                  cls.core_unused)
    d.refuse_unread(model, train)  # the check the numpy runtime makes too, from the same declaration


__all__ = ["CORE_MODEL", "CORE_TRAIN", "LearnerBase", "UnsupportedError", "build", "families", "family_of",
           "for_family", "learner_class", "refuse_unread", "register", "train_read"]
