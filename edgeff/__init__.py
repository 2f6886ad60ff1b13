"""edgeff: on-device continual learning without backpropagation."""

__version__ = "0.1.0"

from edgeff.baseline import BPLearner  # noqa: E402
from edgeff.config import ModelConfig, TrainConfig  # noqa: E402
from edgeff.evaluation import EvalResult, evaluate  # noqa: E402
from edgeff.layers import LayerSpec  # noqa: E402
from edgeff.presets import PRESETS, get_preset, make_learner  # noqa: E402
from edgeff.trainer import Learner, LayerMetrics, fit  # noqa: E402

__all__ = [
    "BPLearner",
    "EvalResult",
    "LayerMetrics",
    "LayerSpec",
    "Learner",
    "ModelConfig",
    "PRESETS",
    "TrainConfig",
    "__version__",
    "evaluate",
    "fit",
    "get_preset",
    "make_learner",
]
