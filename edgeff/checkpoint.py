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
from edgeff.config import ModelConfig, TrainConfig
from edgeff.contract import LearnerBase, for_family, learner_class
from edgeff.errors import CheckpointError, InputError
from edgeff.files import atomic_write

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


def save(learner: LearnerBase, path: str | Path, *, meta: dict[str, Any] | None = None) -> Path:
    """Write ``learner`` to ``path`` atomically; ``meta`` (data set, class names, ...) is kept with it."""
    path = Path(path)
    state: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "edgeff_version": __version__,
        "kind": learner.kind,
        "model": learner.model_cfg.to_dict(),
        "train": learner.train_cfg.to_dict(),
        **learner.state(),
        "meta": dict(meta or {}),
    }
    return atomic_write(path, lambda f: torch.save(_cpu(state), f))


def load(path: str | Path, *, device: str | None = None) -> tuple[LearnerBase, dict[str, Any]]:
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
        try:
            cls = learner_class(state["kind"])
        except InputError:
            raise CheckpointError(f"{path} holds a {state['kind']!r} learner, which this edgeff does not know") from None
        # fields the family does not read were ignored when it was saved (older edgeff): reset them
        learner = cls(*for_family(cls, model, train))
        learner.load_state(state)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path} does not match this edgeff version's model code: {e}") from None
    return learner, dict(state.get("meta", {}))
