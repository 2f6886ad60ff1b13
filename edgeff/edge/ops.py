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
        # the next backward's output gradient is this step's own scratch (made by a later op of the layer, shared
        # with nothing else): the op may write its input gradient into it (``EdgeLayer.backward`` sets it)
        self.dy_owned = False

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

    @property
    def _sub(self) -> str:
        """einsum's per-channel sum of a product (no map of products)."""
        return "bchw,bchw->c" if self.spatial else "bc,bc->c"

    def _shape(self, v: np.ndarray) -> np.ndarray:
        return v.reshape(1, -1, 1, 1) if self.spatial else v.reshape(1, -1)

    def forward(self, x: np.ndarray, train: bool) -> np.ndarray:
        ax = self._axes()
        w, b = self._shape(self.params["weight"]), self._shape(self.params["bias"])
        if train:
            n = x.size // x.shape[1]
            mean = x.mean(axis=ax)
            xhat = x - self._shape(mean)  # the centred values; their mean square is the batch's (biased) variance
            var = np.einsum(self._sub, xhat, xhat) / F32(n)  # no map of squares
            rm, rv = self.buffers["running_mean"], self.buffers["running_var"]
            rm += F32(self.momentum) * (mean - rm)  # torch's lerp_
            if n > 1:  # the running variance takes the unbiased one
                rv += F32(self.momentum) * (var * F32(n / (n - 1)) - rv)
            if not self.always_running and x.shape[0] >= self.min_batch:
                inv = F32(1) / np.sqrt(self._shape(var) + self.eps)
                xhat *= inv
                self.cache = ("batch", xhat, inv)
                out = xhat * w
                out += b
                return out
            del xhat
        inv = F32(1) / np.sqrt(self._shape(self.buffers["running_var"]) + self.eps)
        xhat = x - self._shape(self.buffers["running_mean"])
        xhat *= inv
        self.cache = ("running", xhat, inv) if train else None
        out = xhat * w if train else xhat
        if not train:
            out *= w
        out += b
        return out

    def backward(self, dy: np.ndarray, need_dx: bool) -> np.ndarray | None:
        mode, xhat, inv = self.cache
        ax = self._axes()
        self.grads = {"weight": np.einsum(self._sub, dy, xhat), "bias": dy.sum(axis=ax)}
        if not need_dx:
            return None
        w = self._shape(self.params["weight"])
        g = np.multiply(dy, w, out=dy) if self.dy_owned and dy.flags.writeable else dy * w  # g = dy·w
        if mode == "running":
            g *= inv
            return g
        # inv · (g − mean(g) − xhat · mean(g · xhat)), in place on g (one temporary map at a time)
        gx = self._shape(np.einsum(self._sub, g, xhat) / F32(g.size // g.shape[1]))  # mean(g · xhat), no map
        g -= g.mean(axis=ax, keepdims=True)
        xhat *= gx  # the cache is spent: its buffer takes xhat · mean(g · xhat)
        self.cache = None
        g -= xhat
        g *= inv
        return g


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


COLS_BYTES = 1 << 20  # a conv's unfolded patches (im2col) held at a time, at most (one sample at least)


def cols_samples(patches: int) -> int:
    """Samples whose unfolded patches (``patches`` values each) a conv unfolds at a time (``COLS_BYTES``)."""
    return max(1, COLS_BYTES // max(4 * patches, 1))


def _im2col(x: np.ndarray, k: int, stride: int, pad: int) -> tuple[np.ndarray, int, int]:
    """(B, C, H, W) -> (B·Ho·Wo, C·k·k) patches in torch's weight order (C, kh, kw)."""
    if pad:
        x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    win = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(2, 3))[:, :, ::stride, ::stride]  # (B,C,Ho,Wo,k,k)
    b, c, ho, wo = win.shape[:4]
    return np.ascontiguousarray(win.transpose(0, 2, 3, 1, 4, 5)).reshape(b * ho * wo, c * k * k), ho, wo


class Conv2d(Op):
    """2-D convolution by im2col and matrix products, a few samples' patches at a time (``cols_samples``): the
    forward keeps its input, and the backward unfolds it again, so no whole batch of patches is ever held;
    W (out, in, k, k)."""

    def __init__(self, n_in: int, n_out: int, kernel: int, stride: int, padding: int) -> None:
        super().__init__()
        self.k, self.stride, self.pad = kernel, stride, padding
        self.params = {"weight": np.zeros((n_out, n_in, kernel, kernel), F32), "bias": np.zeros(n_out, F32)}

    def _out_hw(self, x: np.ndarray) -> tuple[int, int]:
        return ((x.shape[2] + 2 * self.pad - self.k) // self.stride + 1,
                (x.shape[3] + 2 * self.pad - self.k) // self.stride + 1)

    def _step(self, x: np.ndarray) -> int:
        ho, wo = self._out_hw(x)
        return cols_samples(ho * wo * x.shape[1] * self.k * self.k)

    def forward(self, x: np.ndarray, train: bool) -> np.ndarray:
        w = self.params["weight"]
        wm = w.reshape(w.shape[0], -1).T
        ho, wo = self._out_hw(x)
        out = np.empty((x.shape[0], w.shape[0], ho, wo), F32)  # (B, O, Ho, Wo)
        step = self._step(x)
        for s in range(0, x.shape[0], step):
            cols, _, _ = _im2col(x[s : s + step], self.k, self.stride, self.pad)
            y = cols @ wm + self.params["bias"]  # (b·Ho·Wo, O)
            del cols
            out[s : s + step] = y.reshape(-1, ho, wo, w.shape[0]).transpose(0, 3, 1, 2)
        self.cache = x if train else None
        return out

    def backward(self, dy: np.ndarray, need_dx: bool) -> np.ndarray | None:
        x = self.cache
        w = self.params["weight"]
        o = w.shape[0]
        wm = w.reshape(o, -1)
        b, c, h, wd = x.shape
        k, st, p = self.k, self.stride, self.pad
        ho, wo = dy.shape[2:]
        gw = np.zeros_like(wm)
        dxp = np.zeros((b, c, h + 2 * p, wd + 2 * p), F32) if need_dx else None
        step = self._step(x)
        for s in range(0, b, step):
            dym = dy[s : s + step].transpose(0, 2, 3, 1).reshape(-1, o)  # (b·Ho·Wo, O)
            cols, _, _ = _im2col(x[s : s + step], k, st, p)
            gw += dym.T @ cols
            del cols
            if dxp is not None:
                n = dy[s : s + step].shape[0]
                dcols = (dym @ wm).reshape(n, ho, wo, c, k, k)
                part = dxp[s : s + n]
                for i in range(k):
                    for j in range(k):
                        part[:, :, i : i + st * ho : st, j : j + st * wo : st] += dcols[:, :, :, :, i, j].transpose(0, 3, 1, 2)
                del dcols
        self.grads = {"weight": gw.reshape(w.shape), "bias": dy.sum((0, 2, 3))}
        if dxp is None:
            return None
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
