"""Named configurations for each published algorithm (values, not subclasses)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from edgeff.baseline import BPLearner
from edgeff.config import ModelConfig, TrainConfig
from edgeff.errors import UnknownPresetError
from edgeff.layers import LayerSpec
from edgeff.trainer import Learner


@dataclass(frozen=True)
class Preset:
    name: str
    algorithm: str  # "local" (layer-local) or "bp" (end-to-end backprop)
    model: ModelConfig
    train: TrainConfig
    paper: str  # where the algorithm and its hyperparameters come from
    notes: str  # what it is, and any deliberate difference from the paper


def _mlp(width: int, depth: int, norm: str) -> tuple[LayerSpec, ...]:
    return tuple(LayerSpec("linear", width, norm=norm) for _ in range(depth))


def _cnn(channels: tuple[int, ...], norm: str = "batch") -> tuple[LayerSpec, ...]:
    # VGG-like: a 2x2 max-pool after every second conv (the Trifecta's layer order: norm, conv, ReLU, pool)
    return tuple(LayerSpec("conv", c, norm=norm, pool=2 if i % 2 == 1 else 1) for i, c in enumerate(channels))


FF_MLP = ModelConfig(layers=_mlp(1000, 3, "length"), label="overlay", loss="ff", threshold=2.0)
SYMBA_MLP = ModelConfig(layers=_mlp(1000, 2, "length"), label="icp", loss="symba", alpha=4.0)
TRIFECTA_CNN = ModelConfig(layers=_cnn((16, 16, 32, 32, 64, 64)), label="channel", label_learned=True,
                           loss="symba", alpha=4.0)
TRIFECTA_CNN_PAPER = replace(TRIFECTA_CNN, layers=_cnn((64, 128, 256, 256, 512, 512)))

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset(
            "ff-mlp", "local", FF_MLP,
            TrainConfig(lr=1e-3, lr_final=1e-4, batch_size=100, epochs=20, eval_layers="all-but-first"),
            "Hinton 2022, The Forward-Forward Algorithm",
            "3x1000 ReLU MLP, length normalisation before every layer, one-hot label overlaid on the first "
            "10 pixels, threshold loss θ=2 on goodness = mean of squares, uniform wrong-label negatives, "
            "prediction by goodness summed over all layers but the first. Hinton used 4x2000 and 60 epochs; "
            "the width is reduced to fit a laptop CPU.",
        ),
        Preset(
            "symba-mlp", "local", SYMBA_MLP,
            TrainConfig(lr=1e-3, lr_final=1e-4, batch_size=100, epochs=20, eval_layers="all-but-first"),
            "Lee & Song 2023, SymBa (arXiv:2303.08418)",
            "2x1000 ReLU MLP, length normalisation, Intrinsic Class Pattern (rate 0.1) concatenated as an "
            "extra 28x28 input, SymBa loss α=4, Adam. The paper trains 2x500/2x2000 with batch 4096 for 120 "
            "epochs; smaller batches reach the same accuracy in far fewer epochs on a CPU.",
        ),
        Preset(
            "trifecta-cnn", "local", TRIFECTA_CNN,
            TrainConfig(lr=1e-3, lr_final=1e-4, batch_size=128, epochs=6, schedule="olu", eval_layers="last"),
            "Dooms, Tsang & Oramas 2023, The Trifecta (arXiv:2311.18130)",
            "6-layer VGG-like CNN (16-16-32-32-64-64 channels, 2x2 max-pool after layers 2, 4, 6), each "
            "layer BatchNorm (running statistics below 8 samples) -> conv3x3 -> ReLU (-> pool), SymBa loss "
            "α=4, Overlapping Local Updates, learned label channel, prediction by the last layer's goodness. "
            "The paper's channel widths are `trifecta-cnn-paper`.",
        ),
        Preset(
            "trifecta-cnn-paper", "local", TRIFECTA_CNN_PAPER,
            TrainConfig(lr=1e-3, batch_size=1024, epochs=200, schedule="olu", eval_layers="last"),
            "Dooms, Tsang & Oramas 2023, The Trifecta (arXiv:2311.18130)",
            "trifecta-cnn at GPU size (64-128-256-256-512-512), batch 1024, lr 1e-3; for a GPU.",
        ),
        Preset(
            "bp-mlp", "bp", SYMBA_MLP, TrainConfig(lr=1e-3, lr_final=1e-4, batch_size=100, epochs=20),
            "backprop baseline",
            "End-to-end backprop with cross-entropy through a linear head on the symba-mlp architecture.",
        ),
        Preset(
            "bp-cnn", "bp", TRIFECTA_CNN, TrainConfig(lr=1e-3, lr_final=1e-4, batch_size=128, epochs=6),
            "backprop baseline",
            "End-to-end backprop with cross-entropy through a linear head on the trifecta-cnn architecture.",
        ),
    ]
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise UnknownPresetError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}") from None


def make_learner(
    preset: str | Preset,
    *,
    input_shape: tuple[int, int, int] | None = None,
    num_classes: int | None = None,
    train: TrainConfig | None = None,
    backprop: bool = False,
) -> Learner | BPLearner:
    """Build a learner from a preset, adapted to a data set's input shape and class count.

    With ``backprop=True`` the end-to-end baseline on the same architecture is built instead.
    """
    p = get_preset(preset) if isinstance(preset, str) else preset
    model = p.model
    if input_shape is not None:
        c, h, w = input_shape
        model = replace(model, input_shape=(int(c), int(h), int(w)))
    if num_classes is not None:
        model = replace(model, num_classes=num_classes)
    tc = train or p.train
    if backprop or p.algorithm == "bp":
        return BPLearner(model, tc)
    return Learner(model, tc)
