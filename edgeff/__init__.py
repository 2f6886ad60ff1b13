"""edgeff: on-device continual learning without backpropagation."""

__version__ = "0.1.0"

from edgeff.baseline import BPLearner
from edgeff.config import ModelConfig, TrainConfig
from edgeff.evaluation import EvalResult, evaluate
from edgeff.layers import LayerSpec
from edgeff.presets import PRESETS, get_preset, make_learner
from edgeff.trainer import LayerMetrics, Learner, fit

__all__ = [
    "PRESETS",
    "BPLearner",
    "EvalResult",
    "LayerMetrics",
    "LayerSpec",
    "Learner",
    "ModelConfig",
    "TrainConfig",
    "__version__",
    "evaluate",
    "fit",
    "get_preset",
    "make_learner",
]
