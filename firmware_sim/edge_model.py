"""The device's models: an ``edgeff.edge`` file (``edgeff-edge train``, ``edgeff device load --preset``, or a
torch checkpoint converted with ``edgeff-edge convert``) behind the device's model interface, so the device
trains and serves every preset the edge runtime trains with the edge runtime's own learners (one numpy
runtime; the device holds no training math of its own). ``new_model`` builds a fresh one for a device.

The device sends flattened pixels (B, C·H·W): uint8, normalised here with the mean/std stored in the
file's meta (``edgeff-edge train`` writes them; MNIST's by default), or float32 already normalised.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from typing import Any

import numpy as np

from edgeff.edge.data import MNIST_MEAN, MNIST_STD
from edgeff.edge.learner import EdgeLearner
from edgeff.edge.plan import learner_plan
from edgeff.edge.rand import Rng
from edgeff.edge.store import FORMAT, from_arrays, to_arrays, to_bytes
from edgeff.errors import EdgeFFError
from edgeff.files import BytesReader

F32 = np.float32
RULES = ("goodness", "embed", "analytic")  # the families a device trains: goodness, CFL's dictionary, closed form
OLD_FORMAT = "edgeff-device-model"  # the retired device network's files (NumpyNet), refused with a way forward


class ModelError(ValueError):
    """A model file or request the device cannot use."""


def is_edge_file(blob: bytes) -> bool:
    """Whether an ``.npz`` blob is an edge-runtime file (its header names the edge format)."""
    try:
        with np.load(BytesReader(blob), allow_pickle=False) as z:
            if "header" not in z.files:
                return False
            return json.loads(z["header"].tobytes().decode()).get("format") == FORMAT
    except Exception:  # noqa: BLE001 - anything unreadable is not an edge file; model_from_bytes says so
        return False


class EdgeModel:
    """The device's model interface over an ``EdgeLearner``."""

    def __init__(self, learner: EdgeLearner, meta: dict[str, Any]) -> None:
        self.learner = learner
        self.meta = {k: v for k, v in meta.items() if k != "device_state"}
        c, h, w = learner.model_cfg.input_shape
        self.rule = {"goodness": "goodness", "cfl": "embed", "analytic": "analytic"}[learner.family]
        self.spec: dict[str, Any] = {
            "rule": self.rule, "classes": list(learner.class_names), "input_dim": c * h * w,
            "eval_layers": list(learner.eval_layers), "seed": learner.train_cfg.seed, "format": FORMAT,
        }
        self.mean = np.asarray(meta.get("mean", list(MNIST_MEAN) * c), F32).reshape(1, -1, 1, 1)
        self.std = np.asarray(meta.get("std", list(MNIST_STD) * c), F32).reshape(1, -1, 1, 1)
        self.last_working: list[int] = []

    # ----------------------------------------------------------------- shape
    @property
    def n_layers(self) -> int:
        return len(self.learner.layers)

    def layer_out(self, i: int) -> int:
        return int(np.prod(self.learner.shapes[i]))

    def normalise_input(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        shape = self.learner.model_cfg.input_shape
        if x.ndim != 2 or x.shape[1] != self.spec["input_dim"]:
            raise ModelError(f"expected inputs of shape (B, {self.spec['input_dim']}), got {x.shape}")
        x = x.reshape(x.shape[0], *shape)
        if x.dtype == np.uint8:
            return ((x.astype(F32) / F32(255.0) - self.mean) / self.std).astype(F32)
        if not np.all(np.isfinite(x)):
            raise ModelError("inputs hold NaN or infinite values")
        return x.astype(F32, copy=False)

    # ----------------------------------------------------------------- verbs
    def layer_scores(self, x: np.ndarray) -> np.ndarray:
        return self.learner.layer_scores(self.normalise_input(x))

    def scores(self, x: np.ndarray) -> np.ndarray:
        """Class scores (B, K): the model's predicting layers summed (what INFER answers)."""
        return self.layer_scores(x)[..., self.spec["eval_layers"]].sum(-1)

    def train_step(self, x: np.ndarray, y: np.ndarray, rng: Rng, **_: Any) -> list[float]:
        self.learner.rng = self.learner.draws.rng = rng  # the device's generator, saved with its state
        try:
            metrics = self.learner.learn_many(self.normalise_input(x), np.asarray(y).reshape(-1))
        except EdgeFFError as e:
            raise ModelError(str(e)) from None
        return [m.loss for m in metrics]

    def class_snapshot(self) -> Callable[[], None]:
        """A way back from ``add_class`` by reference (it replaces the label tensors and optimizer state arrays
        it grows, never writing into them): no copy of the model."""
        ln = self.learner
        extra, cfg, classes = dict(ln.extra), ln.model_cfg, list(self.spec["classes"])
        states = [(opt, {k: dict(v) for k, v in opt.state.items()}) for opt in (ln.layers[0].opt, ln.layers[-1].opt)
                  if opt is not None]
        # the closed-form statistics (the analytic family's, an lda predictor's) grow by new arrays too
        readout = ln.predictor
        stats = [s for s in (ln.lda, None if readout is None else readout.stats) if s is not None]
        grown = [(s, s.class_sum, s.count, s.imprint) for s in stats]
        caches = (ln._readout, None if readout is None else readout._solved)

        def restore() -> None:
            ln.extra.clear()
            ln.extra.update(extra)
            ln.model_cfg = cfg
            self.spec["classes"] = classes
            for opt, st in states:
                opt.state = st
            for s, class_sum, count, imprint in grown:
                s.class_sum, s.count, s.imprint = class_sum, count, imprint
            ln._readout = caches[0]
            if readout is not None:
                readout._solved = caches[1]

        return restore

    def add_class(self, name: str, rng: Rng, x: np.ndarray | None = None) -> int:
        self.learner.rng = self.learner.draws.rng = rng
        try:
            idx = self.learner.add_class(name, None if x is None or not len(x) else self.normalise_input(x))
        except EdgeFFError as e:
            raise ModelError(str(e)) from None
        self.spec["classes"] = list(self.learner.class_names)
        return idx

    # ----------------------------------------------------------------- memory
    def memory_plan(self, batch: int) -> dict[str, Any]:
        """The numpy runtime's plan of this model at ``batch`` samples (``edgeff.edge.plan``)."""
        return learner_plan(self.learner, batch)

    # ----------------------------------------------------------------- files
    def write(self, f: Any, *, state: dict[str, Any] | None = None) -> None:
        np.savez(f, **to_arrays(self.learner, {**self.meta, "device_state": state or {}}))  # type: ignore[arg-type]

    def to_bytes(self, *, state: dict[str, Any] | None = None) -> bytes:
        buf = io.BytesIO()
        self.write(buf, state=state)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> tuple[EdgeModel, dict[str, Any]]:
        try:
            with np.load(BytesReader(data), allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            learner, meta = from_arrays(arrays, adopt=True)
        except (EdgeFFError, KeyError, ValueError, TypeError, OSError) as e:
            raise ModelError(f"not a usable edge model ({type(e).__name__}: {e})") from None
        return cls(learner, meta), dict(meta.get("device_state", {}))


def model_from_bytes(data: bytes | bytearray) -> tuple[EdgeModel, dict[str, Any]]:
    """A device model from an uploaded or saved ``.npz`` edge file; a file of the retired device format is refused
    with the way forward."""
    if is_edge_file(data):
        return EdgeModel.from_bytes(data)
    try:
        with np.load(BytesReader(data), allow_pickle=False) as z:
            old = "spec" in z.files and OLD_FORMAT in z["spec"].tobytes().decode(errors="replace")
    except Exception:  # noqa: BLE001 - unreadable: said below
        old = False
    if old:
        raise ModelError("this is a model of the retired device format; the device runs edge models now: load a "
                         "fresh one (edgeff device load --preset device-embed) or a trained checkpoint "
                         "(edgeff device load --checkpoint FILE.pt)")
    raise ModelError("not an edge model (.npz written by edgeff-edge or edgeff device load)")


def new_model(preset: str = "device-embed", widths: list[int] | None = None, *, input_shape: tuple[int, int, int] =
              (1, 28, 28), classes: list[str] | None = None, seed: int = 0, optimizer: str | None = None,
              lr: float | None = None, mean: list[float] | None = None, std: list[float] | None = None) -> bytes:
    """A fresh edge model of ``preset`` for a device, as the bytes of its file: ``widths`` replaces an MLP
    preset's layer widths, ``classes`` names its classes (10 digits by default), ``mean``/``std`` the
    normalisation the device applies to raw pixels (MNIST's by default)."""
    from dataclasses import replace

    from edgeff.edge.learner import make_edge_learner
    from edgeff.errors import InputError
    from edgeff.presets import get_preset

    p = get_preset(preset)
    classes = [str(c) for c in (classes or range(10))]
    model = replace(p.model, input_shape=input_shape, num_classes=len(classes), class_names=tuple(classes))
    if widths is not None:
        if not widths or any(w < 1 for w in widths):
            raise InputError("give at least one positive layer width")
        if any(s.kind != "linear" for s in model.layers):
            raise InputError(f"--layers sets an MLP's widths; {preset} has {model.layers[0].kind} layers")
        model = replace(model, layers=tuple(replace(model.layers[0], out=w) for w in widths))
    train = replace(p.train, seed=seed, **{k: v for k, v in (("optimizer", optimizer), ("lr", lr)) if v is not None})
    learner = make_edge_learner(replace(p, model=model), train=train)
    c = input_shape[0]
    meta = {"preset": preset, "classes": classes, "mean": list(mean or list(MNIST_MEAN) * c),
            "std": list(std or list(MNIST_STD) * c)}
    return to_bytes(learner, meta)
