"""edgeff: on-device continual learning without backpropagation.

The public names are imported lazily (PEP 562), so ``import edgeff.firmware_sim`` — the simulated
device, which must run without torch — does not pull torch in.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "PRESETS": "edgeff.presets",
    "BPLearner": "edgeff.baseline",
    "ContrastiveLearner": "edgeff.contrastive",
    "LearnerBase": "edgeff.contract",
    "MirrorLearner": "edgeff.mirror",
    "EvalResult": "edgeff.evaluation",
    "LayerMetrics": "edgeff.loop",
    "LayerSpec": "edgeff.config",
    "Learner": "edgeff.trainer",
    "ModelConfig": "edgeff.config",
    "TrainConfig": "edgeff.config",
    "evaluate": "edgeff.evaluation",
    "fit": "edgeff.loop",
    "get_preset": "edgeff.presets",
    "make_learner": "edgeff.presets",
}

__all__ = [
    "PRESETS",
    "BPLearner",
    "ContrastiveLearner",
    "EvalResult",
    "LayerMetrics",
    "LayerSpec",
    "Learner",
    "LearnerBase",
    "MirrorLearner",
    "ModelConfig",
    "TrainConfig",
    "__version__",
    "evaluate",
    "fit",
    "get_preset",
    "make_learner",
]

if TYPE_CHECKING:
    from edgeff.baseline import BPLearner
    from edgeff.config import LayerSpec, ModelConfig, TrainConfig
    from edgeff.contract import LearnerBase
    from edgeff.contrastive import ContrastiveLearner
    from edgeff.evaluation import EvalResult, evaluate
    from edgeff.loop import LayerMetrics, fit
    from edgeff.mirror import MirrorLearner
    from edgeff.presets import PRESETS, get_preset, make_learner
    from edgeff.trainer import Learner


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'edgeff' has no attribute {name!r}")
