"""The edge runtime's building blocks: numpy modules with a forward pass and a hand-written backward.

Each module mirrors one entry of the ``torch.nn.Sequential`` that ``edgeff.layers.make_block`` builds
(same order, same parameter names: ``weight``, ``bias``, ``running_mean``, ``running_var``), so a
torch checkpoint maps onto these arrays name for name. ``forward(x, train)`` keeps what ``backward``
needs (one layer's working set); ``backward(dy, need_dx)`` returns the input gradient (or None when
nothing upstream needs it) and leaves the parameter gradients in ``grads``. Everything is float32.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgeff.config import LayerSpec
from edgeff.edge.optim import Outer
from edgeff.edge.rand import Rng
from edgeff.kinds import builder, layer_kind, numpy_kind

F32 = np.float32


class Op:
    """A module of a block: parameters and buffers by name, a forward and its backward."""

    def __init__(self) -> None:
        self.params: dict[str, np.ndarray] = {}  # trained arrays, in torch's registration order
        self.buffers: dict[str, np.ndarray] = {}  # running statistics
        self.grads: dict[str, Any] = {}  # arrays, or an Outer the optimizer reads block by block
        self.cache: Any = None

    def forward(self, x: np.ndarray, train: bool) -> np.ndarray:
        raise NotImplementedError

    def backward(self, dy: np.ndarray, need_dx: bool) -> np.ndarray | None:
        raise NotImplementedError

    def clear(self) -> None:
        """Drop the forward cache and the gradients (the step is over)."""
        self.cache = None
        self.grads = {}


class Identity(Op):
    def forward(self, x: np.ndarray, train: bool) -> np.ndarray:
        return x

    def backward(self, dy: np.ndarray, need_dx: bool) -> np.ndarray | None:
        return dy if need_dx else None


class Flatten(Op):
    def forward(self, x: np.ndarray, train: bool) -> np.ndarray:
        self.cache = x.shape if train else None
        return x.reshape(x.shape[0], -1)

    def backward(self, dy: np.ndarray, need_dx: bool) -> np.ndarray | None:
        return dy.reshape(self.cache) if need_dx else None


class ReLU(Op):
    """max(x, 0); ``passes``: the gradient passes below zero too (``edgeff.layers.PassReLU``)."""

    def __init__(self, passes: bool = False) -> None:
        super().__init__()
        self.passes = passes

    def forward(self, x: np.ndarray, train: bool) -> np.ndarray:
        y = np.maximum(x, F32(0))
        self.cache = y if train and not self.passes else None
        return y

    def backward(self, dy: np.ndarray, need_dx: bool) -> np.ndarray | None:
        if not need_dx:
            return None
        return dy if self.passes else np.where(self.cache > 0, dy, F32(0))


def _sample_axes(x: np.ndarray) -> tuple[int, ...]:
    return tuple(range(1, x.ndim))


class LengthNorm(Op):
    """x / sqrt(mean(x²) + eps) per sample (``edgeff.layers.LengthNorm``)."""

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = F32(eps)

    def forward(self, x: np.ndarray, train: bool) -> np.ndarray:
        ax = _sample_axes(x)
        r = np.sqrt(np.mean(x * x, axis=ax, keepdims=True) + self.eps)  # (B, 1, ...)
        y = x / r
        self.cache = (y, r) if train else None
        return y

    def backward(self, dy: np.ndarray, need_dx: bool) -> np.ndarray | None:
        if not need_dx:
            return None
        y, r = self.cache
        return (dy - y * np.mean(dy * y, axis=_sample_axes(y), keepdims=True)) / r


class LayerNorm(Op):
    """Affine-free LayerNorm over all non-batch dims (``edgeff.layers.SampleLayerNorm``)."""

    def __init__(self, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = F32(eps)

    def forward(self, x: np.ndarray, train: bool) -> np.ndarray:
        ax = _sample_axes(x)
        mu = x.mean(axis=ax, keepdims=True)
        xc = x - mu
        s = np.sqrt((xc * xc).mean(axis=ax, keepdims=True) + self.eps)
        y = xc / s
        self.cache = (y, s) if train else None
        return y

    def backward(self, dy: np.ndarray, need_dx: bool) -> np.ndarray | None:
        if not need_dx:
            return None
        y, s = self.cache
        ax = _sample_axes(y)
        return (dy - dy.mean(axis=ax, keepdims=True) - y * (dy * y).mean(axis=ax, keepdims=True)) / s


class BatchNorm(Op):
    """``edgeff.layers.RunningBatchNorm``: batch statistics for batches of at least ``min_batch``
    samples, running statistics otherwise (or always); the running statistics are updated with
    ``momentum`` from every training batch before they are used."""

    def __init__(self, features: int, *, spatial: bool, momentum: float, min_batch: int, always_running: bool,
                 eps: float = 1e-5) -> None:
        super().__init__()
        self.spatial, self.momentum, self.min_batch = spatial, momentum, min_batch
        self.always_running, self.eps = always_running, F32(eps)
        self.params = {"weight": np.ones(features, F32), "bias": np.zeros(features, F32)}
        self.buffers = {"running_mean": np.zeros(features, F32), "running_var": np.ones(features, F32)}

    def _axes(self) -> tuple[int, ...]:
        return (0, 2, 3) if self.spatial else (0,)

    def _shape(self, v: np.ndarray) -> np.ndarray:
        return v.reshape(1, -1, 1, 1) if self.spatial else v.reshape(1, -1)

    def forward(self, x: np.ndarray, train: bool) -> np.ndarray:
        ax = self._axes()
        w, b = self._shape(self.params["weight"]), self._shape(self.params["bias"])
        if train:
            n = x.size // x.shape[1]
            mean = x.mean(axis=ax)
            rm, rv = self.buffers["running_mean"], self.buffers["running_var"]
            rm += F32(self.momentum) * (mean - rm)  # torch's lerp_
            if n > 1:
                rv += F32(self.momentum) * (x.var(axis=ax, ddof=1) - rv)
            if not self.always_running and x.shape[0] >= self.min_batch:
                mu = self._shape(mean)
                inv = F32(1) / np.sqrt(self._shape(x.var(axis=ax)) + self.eps)
                xhat = (x - mu) * inv
                self.cache = ("batch", xhat, inv)
                return xhat * w + b
        inv = F32(1) / np.sqrt(self._shape(self.buffers["running_var"]) + self.eps)
        xhat = (x - self._shape(self.buffers["running_mean"])) * inv
        self.cache = ("running", xhat, inv) if train else None
        return xhat * w + b

    def backward(self, dy: np.ndarray, need_dx: bool) -> np.ndarray | None:
        mode, xhat, inv = self.cache
        ax = self._axes()
        self.grads = {"weight": (dy * xhat).sum(axis=ax), "bias": dy.sum(axis=ax)}
        if not need_dx:
            return None
        g = dy * self._shape(self.params["weight"])
        if mode == "running":
            return g * inv
        return inv * (g - g.mean(axis=ax, keepdims=True) - xhat * (g * xhat).mean(axis=ax, keepdims=True))


class Linear(Op):
    """y = x Wᵀ + b, W (out, in)."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.params = {"weight": np.zeros((n_out, n_in), F32), "bias": np.zeros(n_out, F32)}

    def forward(self, x: np.ndarray, train: bool) -> np.ndarray:
        self.cache = x if train else None
        return x @ self.params["weight"].T + self.params["bias"]  # (B, out)

    def backward(self, dy: np.ndarray, need_dx: bool) -> np.ndarray | None:
        self.grads = {"weight": Outer(dy, self.cache, self.params["weight"].shape), "bias": dy.sum(0)}
        return dy @ self.params["weight"] if need_dx else None


def _im2col(x: np.ndarray, k: int, stride: int, pad: int) -> tuple[np.ndarray, int, int]:
    """(B, C, H, W) -> (B·Ho·Wo, C·k·k) patches in torch's weight order (C, kh, kw)."""
    if pad:
        x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    win = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(2, 3))[:, :, ::stride, ::stride]  # (B,C,Ho,Wo,k,k)
    b, c, ho, wo = win.shape[:4]
    return np.ascontiguousarray(win.transpose(0, 2, 3, 1, 4, 5)).reshape(b * ho * wo, c * k * k), ho, wo


class Conv2d(Op):
    """2-D convolution by im2col and one matrix product; W (out, in, k, k)."""

    def __init__(self, n_in: int, n_out: int, kernel: int, stride: int, padding: int) -> None:
        super().__init__()
        self.k, self.stride, self.pad = kernel, stride, padding
        self.params = {"weight": np.zeros((n_out, n_in, kernel, kernel), F32), "bias": np.zeros(n_out, F32)}

    def forward(self, x: np.ndarray, train: bool) -> np.ndarray:
        cols, ho, wo = _im2col(x, self.k, self.stride, self.pad)
        w = self.params["weight"]
        y = cols @ w.reshape(w.shape[0], -1).T + self.params["bias"]  # (B·Ho·Wo, O)
        self.cache = (cols, x.shape, ho, wo) if train else None
        return np.ascontiguousarray(y.reshape(x.shape[0], ho, wo, -1).transpose(0, 3, 1, 2))  # (B, O, Ho, Wo)

    def backward(self, dy: np.ndarray, need_dx: bool) -> np.ndarray | None:
        cols, shape, ho, wo = self.cache
        w = self.params["weight"]
        o = w.shape[0]
        dym = dy.transpose(0, 2, 3, 1).reshape(-1, o)  # (B·Ho·Wo, O)
        self.grads = {"weight": Outer(dym, cols, w.shape), "bias": dym.sum(0)}
        if not need_dx:
            return None
        b, c, h, wd = shape
        k, s, p = self.k, self.stride, self.pad
        dcols = (dym @ w.reshape(o, -1)).reshape(b, ho, wo, c, k, k)
        dxp = np.zeros((b, c, h + 2 * p, wd + 2 * p), F32)
        for i in range(k):
            for j in range(k):
                dxp[:, :, i : i + s * ho : s, j : j + s * wo : s] += dcols[:, :, :, :, i, j].transpose(0, 3, 1, 2)
        return dxp[:, :, p : p + h, p : p + wd]


class MaxPool(Op):
    """Non-overlapping p×p max-pool (floor); the gradient goes to the first maximum, as in torch."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.p = size

    def forward(self, x: np.ndarray, train: bool) -> np.ndarray:
        b, c, h, w = x.shape
        p = self.p
        ho, wo = h // p, w // p
        win = x[:, :, : ho * p, : wo * p].reshape(b, c, ho, p, wo, p).transpose(0, 1, 2, 4, 3, 5).reshape(b, c, ho, wo, p * p)
        arg = win.argmax(-1)
        self.cache = (arg, x.shape) if train else None
        return np.take_along_axis(win, arg[..., None], -1)[..., 0]

    def backward(self, dy: np.ndarray, need_dx: bool) -> np.ndarray | None:
        if not need_dx:
            return None
        arg, (b, c, h, w) = self.cache
        p = self.p
        ho, wo = dy.shape[2:]
        win = np.zeros((b, c, ho, wo, p * p), F32)
        np.put_along_axis(win, arg[..., None], dy[..., None], -1)
        dx = np.zeros((b, c, h, w), F32)
        dx[:, :, : ho * p, : wo * p] = win.reshape(b, c, ho, wo, p, p).transpose(0, 1, 2, 4, 3, 5).reshape(b, c, ho * p, wo * p)
        return dx


NORMS = ("none", "length", "layer", "batch")


def make_norm(norm: str, features: int, *, spatial: bool, bn: dict[str, Any]) -> Op:
    if norm == "none":
        return Identity()
    if norm == "length":
        return LengthNorm()
    if norm == "layer":
        return LayerNorm()
    if norm == "batch":
        return BatchNorm(features, spatial=spatial, **bn)
    raise ValueError(f"unknown normalisation {norm!r}; choose one of {NORMS}")


def out_shape(spec: LayerSpec, in_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of one sample after the layer: the kind's registered rule (``edgeff.kinds``), as torch's."""
    return layer_kind(spec.kind).out_shape(spec, in_shape)


def make_block(spec: LayerSpec, in_shape: tuple[int, ...], rng: Rng, *, bn: dict[str, Any],
               relu_grad: str = "zero", init: str = "torch", fill: bool = True) -> list[Op]:
    """The ops of one local layer: its kind's registered numpy builder (``edgeff.kinds``), in the order and with
    the parameter names of the torch block; ``UnsupportedError`` for a kind only torch runs."""
    build = builder(numpy_kind(spec.kind).numpy_block)  # type: ignore[arg-type]
    return build(spec, in_shape, rng, bn=bn, relu_grad=relu_grad, init=init, fill=fill)  # type: ignore[no-any-return]


def linear_block(spec: LayerSpec, in_shape: tuple[int, ...], rng: Rng, **opts: Any) -> list[Op]:
    fan_in = int(np.prod(in_shape))
    return weighted_block(spec, [Flatten()], Linear(fan_in, spec.out), fan_in, fan_in, False, rng, **opts)


def conv_block(spec: LayerSpec, in_shape: tuple[int, ...], rng: Rng, **opts: Any) -> list[Op]:
    if len(in_shape) != 3:
        raise ValueError(f"a conv layer cannot follow a linear one (input shape {in_shape})")
    weight = Conv2d(in_shape[0], spec.out, spec.kernel, spec.stride, spec.padding)
    ops = weighted_block(spec, [], weight, in_shape[0], in_shape[0] * spec.kernel * spec.kernel, True, rng, **opts)
    if spec.pool > 1:
        ops.append(MaxPool(spec.pool))
    return ops


def weighted_block(spec: LayerSpec, head: list[Op], weight: Op, in_features: int, fan_in: int, spatial: bool,
                   rng: Rng, *, bn: dict[str, Any], relu_grad: str = "zero", init: str = "torch",
                   fill: bool = True) -> list[Op]:
    """``edgeff.layers.weighted_block``: ``head`` -> (norm) -> ``weight`` -> (norm) -> ReLU -> (norm), initialised
    like torch's defaults (weights and biases U(±1/√fan_in)) or ``init="normal"`` (N(0, 1/√out) weights, zero
    biases) from ``rng`` (the values differ from torch's draws); ``fill=False`` leaves them unwritten."""
    if spec.order not in ("pre", "post", "post-act"):
        raise ValueError(f"unknown layer order {spec.order!r}; choose pre, post or post-act")
    post = spec.order != "pre"
    ops: list[Op] = list(head)
    if not post:
        ops.append(make_norm(spec.norm, in_features, spatial=spatial, bn=bn))
    bound = 1.0 / np.sqrt(fan_in)
    for name, arr in weight.params.items() if fill else ():  # drawn in float32 (no float64 copy of a big layer)
        if init == "normal":
            if name == "weight":
                rng.standard_normal(arr.shape, dtype=F32, out=arr)
                arr *= F32(1.0 / np.sqrt(spec.out))
            else:
                arr[...] = 0
            continue
        rng.random(arr.shape, dtype=F32, out=arr)  # U(-bound, bound)
        arr *= F32(2 * bound)
        arr -= F32(bound)
    ops.append(weight)
    out_norm = make_norm(spec.norm, spec.out, spatial=spatial, bn=bn) if post else None
    if spec.order == "post":
        ops.append(out_norm)  # type: ignore[arg-type]
    ops.append(ReLU(passes=relu_grad == "pass"))
    if spec.order == "post-act":
        ops.append(out_norm)  # type: ignore[arg-type]
    return ops
