"""Configuration: one frozen dataclass per concern. Override with ``dataclasses.replace``."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from edgeff.layers import LayerSpec


@dataclass(frozen=True)
class ModelConfig:
    """The network: its layers, how labels enter it, and its local loss."""

    layers: tuple[LayerSpec, ...]  # the local layers, input to output
    input_shape: tuple[int, int, int] = (1, 28, 28)  # (C, H, W) of one sample
    num_classes: int = 10
    label: str = "icp"  # overlay (FF) | icp (SymBa) | channel (Trifecta)
    label_learned: bool = False  # channel encoder only: learn the label matrix with layer 0
    icp_rate: float = 0.1  # SymBa's pattern sampling rate
    loss: str = "symba"  # ff | symba
    threshold: float = 2.0  # FF loss θ
    alpha: float = 4.0  # SymBa α
    bn_momentum: float = 0.1  # running-statistics BatchNorm momentum
    bn_min_batch: int = 8  # batches (pos+neg) smaller than this normalise with running stats in training
    bn_always_running: bool = False  # always normalise with running stats (single-sample training)

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
        return ModelConfig(**d)


@dataclass(frozen=True)
class TrainConfig:
    """How the layers learn and how the model predicts."""

    lr: float = 1e-3  # every layer's learning rate
    optimizer: str = "adam"  # adam | sgd (momentum 0.9)
    optim_state_dtype: str = "float32"  # float32 | bfloat16 | float16: optimizer state between steps
    schedule: str = "all"  # all (every layer every batch) | greedy | olu (Overlapping Local Updates)
    greedy_steps: int = 1000  # greedy: steps each layer trains before it freezes
    negatives: str = "uniform"  # uniform wrong label | hard (drawn by current goodness)
    predictor: str = "goodness"  # goodness (one pass per label) | head (softmax on neutral-label features)
    eval_layers: str = "all-but-first"  # all | all-but-first | last | last:K
    head_lr: float = 1e-3  # softmax head learning rate
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    batch_size: int = 128
    epochs: int = 1
    lr_final: float | None = None  # if set, fit() decays each layer's lr linearly to this over the run

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> TrainConfig:
        return TrainConfig(**d)
