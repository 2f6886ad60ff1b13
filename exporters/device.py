"""Export a trained torch learner to the device's numpy model format (``edgeff.firmware_sim.numpy_net``).

The device runs Linear layers with length or no normalisation, a label overlay or Intrinsic Class
Pattern, the SymBa or FF loss and goodness prediction — ``symba-mlp`` and ``ff-mlp``. The Adam state
travels with the weights, so training continues on the device where the host left off.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from edgeff.firmware_sim.numpy_net import AdamState, NumpyNet
from torch import nn

from edgeff.edge.data import MNIST_MEAN, MNIST_STD
from edgeff.errors import InputError, UnsupportedError
from edgeff.labels import ICPEncoder, OverlayEncoder
from edgeff.layers import LengthNorm
from edgeff.model import GoodnessPredictor, select_layers


def to_device_model(learner: Any, *, classes: list[str] | None = None, mean: float = MNIST_MEAN[0],
                    std: float = MNIST_STD[0]) -> NumpyNet:
    """The learner as a device model; raises ``InputError`` naming what the device cannot run.

    Args:
        learner: a trained layer-local learner with Linear layers.
        classes: class names (default "0".."K-1").
        mean, std: the input normalisation the device applies to uint8 pixels.
    """
    if not learner.supports("device_export"):
        raise UnsupportedError(f"the device trains goodness models; a {learner.family} model does not export to it")
    net = learner.net
    cfg = learner.model_cfg
    if not isinstance(learner.predictor, GoodnessPredictor):
        raise InputError("the device predicts by goodness; a softmax-head model cannot be exported to it")
    if cfg.loss not in ("symba", "ff"):
        raise InputError(f"the device trains the symba and ff losses, not {cfg.loss!r}")
    if cfg.peer_norm or cfg.relu_grad != "zero":
        raise InputError(f"the device trains without peer normalisation and with a plain ReLU; this model has "
                         f"peer_norm={cfg.peer_norm:g}, relu_grad={cfg.relu_grad!r} (the symba-mlp4 model, or "
                         f"peer_norm=0, goes to the device)")
    enc = net.encoder
    codes = None
    if isinstance(enc, ICPEncoder):
        codes = enc.patterns.flatten(1).cpu().numpy().astype(np.float32)  # (K, H*W)
        label = "icp"
    elif isinstance(enc, OverlayEncoder):
        label = "overlay"
    else:
        raise InputError("the device takes an overlay or ICP label, not a label channel")
    weights, biases, layers = [], [], []
    params: list[tuple[str, torch.Tensor]] = []
    for i, layer in enumerate(net.local_layers):
        mods = [m for m in layer.block if not isinstance(m, (nn.Flatten, nn.ReLU, nn.Identity))]
        lin = [m for m in mods if isinstance(m, nn.Linear)]
        norm = "length" if any(isinstance(m, LengthNorm) for m in mods) else "none"
        if len(lin) != 1 or len(mods) != 1 + (norm == "length"):
            raise InputError(f"layer {i} is not Linear with length or no normalisation; the device runs only those")
        weights.append(lin[0].weight.detach().cpu().numpy().astype(np.float32).copy())
        biases.append(lin[0].bias.detach().cpu().numpy().astype(np.float32).copy())
        layers.append({"out": lin[0].out_features, "norm": norm, "groups": 1})
        params += [(f"W{i}", lin[0].weight), (f"b{i}", lin[0].bias)]
    spec = {
        "format": "edgeff-device-model", "version": 1, "rule": "goodness",
        "input_dim": int(np.prod(cfg.input_shape)), "input_mean": mean, "input_std": std,
        "classes": classes or list(cfg.names), "layers": layers, "label": label, "loss": cfg.loss,
        "alpha": cfg.alpha, "threshold": cfg.threshold, "icp_rate": cfg.icp_rate, "embed_noise": False,
        "embed_learned": False, "optimizer": learner.train_cfg.optimizer, "lr": learner.net.local_layers[0].lr,
        "eval_layers": select_layers(learner.predictor.layers, len(layers)), "seed": learner.train_cfg.seed,
    }
    out = NumpyNet(spec, weights, biases, codes, None)
    for i, layer in enumerate(net.local_layers):  # carry the optimizer state over
        if layer.opt is None:
            continue
        for name, p in params[2 * i : 2 * i + 2]:
            st = layer.opt.state.get(p)
            if not st:
                continue
            if "exp_avg" in st:
                out.opt[name] = AdamState(st["exp_avg"].float().cpu().numpy().copy(),
                                          st["exp_avg_sq"].float().cpu().numpy().copy(), int(st["step"]))
            elif "momentum_buffer" in st and st["momentum_buffer"] is not None:
                out.opt[name] = AdamState(st["momentum_buffer"].float().cpu().numpy().copy(),
                                          np.zeros(0, np.float32), 1)
    out.validate()
    return out


def flatten_images(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """(B, C, H, W) images -> (B, C*H*W) in the device's layout (channel-major)."""
    a = x.cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    return a.reshape(a.shape[0], -1)
