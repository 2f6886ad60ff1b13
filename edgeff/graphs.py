"""The parts of the inference graphs. Each family owns its prediction rule as a plain torch module in its own
module (``learner.inference_graph(layers)``, the learner contract; the ONNX exporter traces it); every graph takes
a batch ``x`` (B, C, H, W) and returns ``scores`` (B, K) and ``label`` (B,). Here: what they share. Running-statistics BatchNorm
is folded into one per-feature multiply-add (its normalisation sits *before* the weights and the
convolutions are zero-padded, so folding it into the weights themselves would change the border pixels).
"""

from __future__ import annotations

import torch
from torch import nn

from edgeff.labels import ChannelEncoder, ICPEncoder, OverlayEncoder
from edgeff.layers import RunningBatchNorm


class FoldedNorm(nn.Module):
    """Inference form of ``RunningBatchNorm``: ``x * scale + shift`` per feature."""

    scale: torch.Tensor
    shift: torch.Tensor

    def __init__(self, bn: RunningBatchNorm) -> None:
        super().__init__()
        scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
        shift = bn.bias.detach() - bn.running_mean * scale
        shape = (1, -1, 1, 1) if bn.spatial else (1, -1)
        self.register_buffer("scale", scale.view(shape).clone())
        self.register_buffer("shift", shift.view(shape).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift


def inference_block(block: nn.Sequential) -> nn.Sequential:
    """A copy of ``block`` with every running-statistics BatchNorm folded."""
    return nn.Sequential(*[FoldedNorm(m) if isinstance(m, RunningBatchNorm) else m for m in block]).eval()


class AllLabels(nn.Module):
    """(B, C, H, W) -> (B*K, C', H, W): the input once per label, each with its label encoding."""

    codes: torch.Tensor

    def __init__(self, encoder: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.k = num_classes
        self.mode = "overlay" if isinstance(encoder, OverlayEncoder) else "channel"
        if isinstance(encoder, OverlayEncoder):
            codes = torch.eye(num_classes) * encoder.on_value  # (K, K)
        elif isinstance(encoder, ICPEncoder):
            codes = encoder.patterns.detach().clone()  # (K, 1, H, W)
        elif isinstance(encoder, ChannelEncoder):
            _, h, w = encoder.in_shape
            codes = encoder.matrix.detach().clone().view(num_classes, 1, h, w)
        else:
            raise TypeError(f"cannot export label encoder {type(encoder).__name__}")
        self.register_buffer("codes", codes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        xr = x.unsqueeze(1).expand(-1, self.k, -1, -1, -1)  # (B, K, C, H, W)
        codes = self.codes.unsqueeze(0).expand(b, *self.codes.shape)
        if self.mode == "overlay":
            flat = xr.reshape(b, self.k, c * h * w)
            z = torch.cat([codes, flat[:, :, self.k :]], dim=2)  # (B, K, C*H*W)
            return z.reshape(-1, c, h, w)
        return torch.cat([xr, codes], dim=2).reshape(-1, c + 1, h, w)  # (B*K, C+1, H, W)
