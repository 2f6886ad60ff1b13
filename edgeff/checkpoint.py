"""Checkpoints: everything needed to predict and to resume training exactly where it stopped.

A checkpoint holds the configs, the weights and BatchNorm statistics, each live optimizer's state,
the predictor's state, the random generator's state and the step counters. It is written
atomically (temp file in the same folder, fsync, rename), so a crash never leaves half a file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from edgeff import __version__
from edgeff.baseline import BPLearner
from edgeff.config import ModelConfig, TrainConfig
from edgeff.contrastive import ContrastiveLearner
from edgeff.errors import CheckpointError
from edgeff.files import atomic_write
from edgeff.layers import make_optimizer
from edgeff.mirror import MirrorLearner
from edgeff.model import HeadPredictor
from edgeff.trainer import Learner

FORMAT = "edgeff-checkpoint"
FORMAT_VERSION = 1


def _cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_cpu(v) for v in obj)
    return obj


def save(learner: Learner | BPLearner | ContrastiveLearner | MirrorLearner, path: str | Path, *, meta: dict[str, Any] | None = None) -> Path:
    """Write ``learner`` to ``path`` atomically; ``meta`` (data set, class names, ...) is kept with it."""
    path = Path(path)
    state: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "edgeff_version": __version__,
        "kind": learner.kind,
        "model": learner.model_cfg.to_dict(),
        "train": learner.train_cfg.to_dict(),
        "net": learner.net.state_dict(),
        "generator": learner.generator.get_state(),
        "step": learner.step,
        "samples_seen": learner.samples_seen,
        "meta": dict(meta or {}),
    }
    if isinstance(learner, MirrorLearner):
        state["optim"] = [None if layer.opt is None else layer.opt.state_dict()
                          for m in learner.mirrors for layer in m.local_layers]
        state["predictor_optim"] = [o.state_dict() for o in getattr(learner, "_out_opts", [])]
    elif isinstance(learner, ContrastiveLearner):
        state["optim"] = [None if layer.opt is None else layer.opt.state_dict() for layer in learner.net.local_layers]
        state["predictor_optim"] = None if learner.head_opt is None else learner.head_opt.state_dict()
    elif isinstance(learner, Learner):
        state["optim"] = [None if layer.opt is None else layer.opt.state_dict() for layer in learner.net.local_layers]
        pred = learner.predictor
        state["predictor"] = pred.state_dict()
        popt = getattr(pred, "opt", None)
        state["predictor_optim"] = None if popt is None else popt.state_dict()
    else:
        state["optim"] = learner.opt.state_dict()
    return atomic_write(path, lambda f: torch.save(_cpu(state), f))


def load(path: str | Path, *, device: str | None = None) -> tuple[Learner | BPLearner | ContrastiveLearner | MirrorLearner, dict[str, Any]]:
    """Rebuild the learner saved at ``path``; returns it and its ``meta``.

    Raises:
        CheckpointError: the file is missing, not an edgeff checkpoint, or from an incompatible version.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; train one with `edgeff train --out {path}`")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a corrupt file
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(e).__name__}); it may be truncated "
                              "or corrupt: retrain or restore it") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an edgeff checkpoint")
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format {state.get('format_version')}, this edgeff reads "
                              f"{FORMAT_VERSION}; re-export it with edgeff {state.get('edgeff_version')}")
    try:
        model = ModelConfig.from_dict(state["model"])
        train = TrainConfig.from_dict(state["train"])
        if device is not None:
            from dataclasses import replace

            train = replace(train, device=device)
        kinds: dict[str, Any] = {"local": Learner, "bp": BPLearner, "contrastive": ContrastiveLearner,
                                 "mirror": MirrorLearner}
        if state["kind"] not in kinds:
            raise CheckpointError(f"{path} holds a {state['kind']!r} learner, which this edgeff does not know")
        learner: Learner | BPLearner | ContrastiveLearner | MirrorLearner = kinds[state["kind"]](model, train)
        learner.net.load_state_dict(state["net"])
        learner.generator.set_state(state["generator"])
        learner.step = int(state["step"])
        learner.samples_seen = int(state["samples_seen"])
        if isinstance(learner, MirrorLearner):
            for layer, opt_state in zip([la for m in learner.mirrors for la in m.local_layers], state["optim"], strict=True):
                if opt_state is not None:
                    layer.ensure_optimizer().load_state_dict(opt_state)
            for i, opt_state in enumerate(state.get("predictor_optim") or []):
                learner._out_opt(i).load_state_dict(opt_state)
        elif isinstance(learner, ContrastiveLearner):
            for layer, opt_state in zip(learner.net.local_layers, state["optim"], strict=True):
                if opt_state is not None:
                    layer.ensure_optimizer().load_state_dict(opt_state)
            if learner.head_opt is not None and state.get("predictor_optim") is not None:
                learner.head_opt.load_state_dict(state["predictor_optim"])
        elif isinstance(learner, Learner):
            for layer, opt_state in zip(learner.net.local_layers, state["optim"], strict=True):
                if opt_state is not None:
                    layer.ensure_optimizer().load_state_dict(opt_state)
            learner.predictor.load_state_dict(state["predictor"])
            pred = learner.predictor
            if state.get("predictor_optim") is not None and isinstance(pred, HeadPredictor):
                pred.opt = make_optimizer(list(pred.linear.parameters()), "adam", pred.lr)
                pred.opt.load_state_dict(state["predictor_optim"])
        else:
            learner.opt.load_state_dict(state["optim"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path} does not match this edgeff version's model code: {e}") from None
    return learner, dict(state.get("meta", {}))
