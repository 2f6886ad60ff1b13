"""Local layers: normalisation -> weights -> activation (-> max-pool), each owning its optimizer.

A layer never sends a gradient upstream: the trainer detaches its output (``LocalLayer.step``), which
is the memory contract of layer-local training. The same ``block`` modules also build the
end-to-end backprop baseline, so both learners train exactly the same architecture.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from edgeff.config import LayerSpec  # defined with the configs (torch-free), still importable from here
from edgeff.factored import Factors
from edgeff.kinds import builder, layer_kind
from edgeff.optim import LeanOptimizer

NORMS = ("none", "length", "layer", "batch")


class LengthNorm(nn.Module):
    """Hinton's length normalisation of each sample's vector, scaled to unit root-mean-square.

    Dividing by the RMS instead of the L2 norm is the same direction with a width-independent
    scale, so a goodness threshold (mean of squares) keeps its meaning for any layer width.
    """

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rms = x.pow(2).flatten(1).mean(1).add(self.eps).sqrt()  # (B,)
        return x / rms.view(-1, *([1] * (x.dim() - 1)))


class SampleLayerNorm(nn.Module):
    """LayerNorm over all non-batch dims, without affine parameters."""

    def __init__(self, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)  # (B, N); written out (not F.layer_norm) so ONNX export keeps a dynamic shape
        mu = flat.mean(1, keepdim=True)
        var = flat.var(1, unbiased=False, keepdim=True)
        return ((flat - mu) / torch.sqrt(var + self.eps)).view_as(x)


class RunningBatchNorm(nn.Module):
    """BatchNorm that also trains at batch size 1 (Trifecta, app. F: rolling averages throughout).

    In training, a batch with at least ``min_batch`` samples is normalised with its own statistics;
    a smaller one (or every batch when ``always_running``) with the running statistics. Either way
    the running mean/variance are updated with ``momentum`` from the batch (the variance only
    when the batch holds at least two values per feature), before being used. The gradient does not
    flow through the running statistics. In eval mode the running statistics are always used.
    """

    running_mean: torch.Tensor
    running_var: torch.Tensor

    def __init__(
        self,
        num_features: int,
        *,
        spatial: bool,
        momentum: float = 0.1,
        min_batch: int = 8,
        always_running: bool = False,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.spatial = spatial
        self.momentum = momentum
        self.min_batch = min_batch
        self.always_running = always_running
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.fixed: tuple[torch.Tensor, torch.Tensor] | None = None  # set by prepare() for a step in parts

    def _shape(self, v: torch.Tensor) -> torch.Tensor:
        return v.view(1, -1, 1, 1) if self.spatial else v.view(1, -1)

    def prepare(self, parts: Sequence[torch.Tensor], rows: int = 64) -> None:
        """Before a training step that passes one batch through in ``parts`` (B_i, ...), taken together
        in order: update the running statistics once from the whole batch and fix the statistics its
        forward would normalise with (the batch's own, or the running ones), so every part is normalised
        as the whole batch would be. Sums run ``rows`` rows at a time (no batch-sized temporary). The
        statistics hold until ``release``; they carry no gradient, as in ``forward`` wherever the input
        is a constant (a local layer's input is detached)."""
        dims = [0, 2, 3] if self.spatial else [0]
        flat = [p if self.spatial else p.flatten(1) for p in parts]
        n_rows = sum(p.shape[0] for p in flat)
        n = sum(p.numel() for p in flat) // flat[0].shape[1]
        with torch.no_grad():
            mean = sum((p.sum(dims) for p in flat), torch.zeros_like(self.running_mean)) / n
            ss = torch.zeros_like(self.running_var)
            for p in flat:
                for r in range(0, p.shape[0], rows):
                    ss += (p[r:r + rows] - self._shape(mean)).pow(2).sum(dims)
            self.running_mean.lerp_(mean, self.momentum)
            if n > 1:
                self.running_var.lerp_(ss / (n - 1), self.momentum)
            if not self.always_running and n_rows >= self.min_batch:
                self.fixed = (mean, ss / n)
            else:
                self.fixed = (self.running_mean.clone(), self.running_var.clone())

    def release(self) -> None:
        self.fixed = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torch's fused batch_norm (one kernel each way: on trifecta-cnn's activations ~3.5x the speed of the
        # same formula in elementwise ops, and a whole-batch step's peak ~20% lower): in training on the batch's
        # own statistics it also lerps the running mean and unbiased variance by ``momentum``, as below. A step
        # in parts keeps the elementwise formula: its backward holds less than the fused kernel's there.
        if self.training and self.fixed is not None:
            mu, var = self._shape(self.fixed[0]), self._shape(self.fixed[1])
            return (x - mu) / torch.sqrt(var + self.eps) * self._shape(self.weight) + self._shape(self.bias)
        if self.training:
            if not self.always_running and x.shape[0] >= self.min_batch:
                return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, True,
                                    self.momentum, self.eps)
            dims = [0, 2, 3] if self.spatial else [0]
            with torch.no_grad():
                self.running_mean.lerp_(x.mean(dims), self.momentum)
                if x.numel() // x.shape[1] > 1:
                    self.running_var.lerp_(x.var(dims, unbiased=True), self.momentum)
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


class PassReLU(nn.Module):
    """ReLU forward, identity backward: the gradient passes below zero too (the Forward-Forward reference
    implementation's ``ReLU_full_grad``). Goodness (a square) has no gradient at a silent unit anyway, so
    this only lets the peer-normalisation loss revive dead units. Written as ``x + (relu(x) − x)`` with
    the bracket detached: the value is exactly relu(x) and it exports to ONNX as plain ops."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + (torch.relu(x) - x).detach()


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` computed on channels-last activations: oneDNN's CPU kernels for the few channels of the
    small CNNs here are 1.5-2x as fast that way forward and backward (trifecta-cnn's 28x28 and 14x14 layers);
    ReLU, batch norm and max-pool keep the layout, so only the first layer's input is converted. Values and
    parameter names are nn.Conv2d's (its weight stays in the default layout)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.contiguous(memory_format=torch.channels_last))


def make_norm(
    norm: str, features: int, *, spatial: bool, bn_momentum: float, bn_min_batch: int, bn_always_running: bool
) -> nn.Module:
    if norm == "none":
        return nn.Identity()
    if norm == "length":
        return LengthNorm()
    if norm == "layer":
        return SampleLayerNorm()
    if norm == "batch":
        return RunningBatchNorm(
            features,
            spatial=spatial,
            momentum=bn_momentum,
            min_batch=bn_min_batch,
            always_running=bn_always_running,
        )
    raise ValueError(f"unknown normalisation {norm!r}; choose one of {NORMS}")


def out_shape(spec: LayerSpec, in_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of one sample after the layer (without the batch axis); vit layers give (tokens, E). The kind's
    registered rule (``edgeff.kinds``), shared with the numpy runtime."""
    return layer_kind(spec.kind).out_shape(spec, in_shape)


class PatchEmbed(nn.Module):
    """Non-overlapping p×p patches -> linear projection + learned positional embedding: (B, N, E)."""

    def __init__(self, in_shape: tuple[int, ...], dim: int, patch: int, generator: torch.Generator) -> None:
        super().__init__()
        c, h, w = in_shape
        if h % patch or w % patch:
            raise ValueError(f"patch size {patch} does not divide the {h}x{w} input")
        self.proj = nn.Conv2d(c, dim, patch, patch)
        nn.init.kaiming_uniform_(self.proj.weight, a=math.sqrt(5), generator=generator)
        assert self.proj.bias is not None
        nn.init.zeros_(self.proj.bias)
        self.pos = nn.Parameter(torch.randn(1, (h // patch) * (w // patch), dim, generator=generator) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2) + self.pos  # (B, N, E)


class SelfAttention(nn.Module):
    """Multi-head self-attention written out (no fused kernel, so it exports to ONNX opset 17)."""

    def __init__(self, dim: int, heads: int, generator: torch.Generator) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        for m in (self.qkv, self.proj):
            nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5), generator=generator)
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, e = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, H, N, d)
        q, k, v = qkv.unbind(0)
        att = torch.softmax((q @ k.transpose(-2, -1)) * self.scale, dim=-1)  # (B, H, N, N)
        return self.proj((att @ v).transpose(1, 2).reshape(b, n, e))  # (B, N, E)


class EncoderLayer(nn.Module):
    """Pre-LN transformer encoder layer (ViT): z = x + MHSA(LN(x)); out = z + MLP(LN(z))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int, generator: torch.Generator) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"embedding width {dim} is not divisible by {heads} heads")
        self.ln1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads, generator)
        self.ln2 = nn.LayerNorm(dim)
        fc1, fc2 = nn.Linear(dim, mlp_ratio * dim), nn.Linear(mlp_ratio * dim, dim)
        for m in (fc1, fc2):  # torch's default init, drawn from the learner's generator (reproducible under a seed)
            nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5), generator=generator)
            nn.init.uniform_(m.bias, -1 / math.sqrt(m.in_features), 1 / math.sqrt(m.in_features), generator=generator)
        self.mlp = nn.Sequential(fc1, nn.GELU(), fc2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln1(x)
        z = x + self.attn(y)
        return z + self.mlp(self.ln2(z))  # (B, N, E)


def make_block(
    spec: LayerSpec,
    in_shape: tuple[int, ...],
    generator: torch.Generator,
    *,
    bn_momentum: float = 0.1,
    bn_min_batch: int = 8,
    bn_always_running: bool = False,
    relu_grad: str = "zero",
    init: str = "torch",
) -> nn.Sequential:
    """The torch block of one local layer: its kind's registered builder (``edgeff.kinds``). Weighted kinds are
    normalisation -> weights -> ReLU (-> max-pool), initialised from ``generator``: torch's default
    (Kaiming-uniform weights, uniform biases) or ``init="normal"`` (N(0, 1/√out) weights, zero biases);
    ``relu_grad="pass"`` lets the ReLU's gradient through below zero (``PassReLU``)."""
    return builder(layer_kind(spec.kind).torch_block)(spec, in_shape, generator, bn_momentum=bn_momentum,  # type: ignore[no-any-return]
                                                      bn_min_batch=bn_min_batch, bn_always_running=bn_always_running,
                                                      relu_grad=relu_grad, init=init)


def kmeans_block(spec: LayerSpec, in_shape: tuple[int, ...], generator: torch.Generator, **_: Any) -> nn.Sequential:
    """No weights to initialise: fitted from samples (``edgeff.kmeans``)."""
    from edgeff.kmeans import KMeansPatches

    return nn.Sequential(KMeansPatches(in_shape, spec.out, spec.kernel, spec.pool))


def vit_block(spec: LayerSpec, in_shape: tuple[int, ...], generator: torch.Generator, **_: Any) -> nn.Sequential:
    mods: list[nn.Module] = []
    if len(in_shape) == 3:
        mods.append(PatchEmbed(in_shape, spec.out, spec.patch, generator))
    out_shape(spec, in_shape)  # validates the input
    mods.append(EncoderLayer(spec.out, spec.heads, spec.mlp_ratio, generator))
    return nn.Sequential(*mods)


def linear_block(spec: LayerSpec, in_shape: tuple[int, ...], generator: torch.Generator, **opts: Any) -> nn.Sequential:
    fan_in = math.prod(in_shape)
    return weighted_block(spec, [nn.Flatten()], nn.Linear(fan_in, spec.out), fan_in, False, generator, **opts)


def conv_block(spec: LayerSpec, in_shape: tuple[int, ...], generator: torch.Generator, **opts: Any) -> nn.Sequential:
    if len(in_shape) != 3:
        raise ValueError(f"a conv layer cannot follow a linear one (input shape {in_shape})")
    weight = Conv2d(in_shape[0], spec.out, spec.kernel, spec.stride, spec.padding)
    block = weighted_block(spec, [], weight, in_shape[0], True, generator, **opts)
    if spec.pool > 1:
        block.append(nn.MaxPool2d(spec.pool))
    return block


def weighted_block(spec: LayerSpec, head: list[nn.Module], weight: nn.Module, in_features: int, spatial: bool,
                   generator: torch.Generator, *, bn_momentum: float = 0.1, bn_min_batch: int = 8,
                   bn_always_running: bool = False, relu_grad: str = "zero", init: str = "torch") -> nn.Sequential:
    """``head`` -> (norm) -> ``weight`` -> (norm) -> ReLU -> (norm) in ``spec.order``, the weight initialised from
    ``generator`` (a kind with weights builds its block through this)."""
    bn = {"bn_momentum": bn_momentum, "bn_min_batch": bn_min_batch, "bn_always_running": bn_always_running}
    if spec.order not in ("pre", "post", "post-act"):
        raise ValueError(f"unknown layer order {spec.order!r}; choose pre, post or post-act")
    post = spec.order != "pre"
    mods = list(head)
    if not post:
        mods.append(make_norm(spec.norm, in_features, spatial=spatial, **bn))  # type: ignore[arg-type]
    w, b = weight.weight, weight.bias  # type: ignore[union-attr]
    assert isinstance(w, torch.Tensor) and isinstance(b, torch.Tensor)
    if init == "normal":
        nn.init.normal_(w, 0.0, 1 / math.sqrt(spec.out), generator=generator)
        nn.init.zeros_(b)
    else:
        nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=generator)
        bound = 1 / math.sqrt(w[0].numel())
        nn.init.uniform_(b, -bound, bound, generator=generator)
    mods.append(weight)
    out_norm = make_norm(spec.norm, spec.out, spatial=spatial, **bn) if post else None  # type: ignore[arg-type]
    if spec.order == "post":
        mods.append(out_norm)  # type: ignore[arg-type]
    mods.append(PassReLU() if relu_grad == "pass" else nn.ReLU())
    if spec.order == "post-act":
        mods.append(out_norm)  # type: ignore[arg-type]
    return nn.Sequential(*mods)


def make_optimizer(params: list[nn.Parameter], kind: str, lr: float, state_dtype: str = "float32",
                   weight_decay: float | None = None) -> LeanOptimizer:
    """Adam, AdamW (weight decay 0.01, as CFL and CFF train) or SGD with momentum 0.9: torch's updates,
    stepped a block at a time, without importing ``torch.optim`` (see ``edgeff.optim``); the state is kept
    in ``state_dtype`` between steps. ``weight_decay`` overrides the kind's default."""
    return LeanOptimizer(params, kind, lr, state_dtype, weight_decay)


class LocalLayer(nn.Module):
    """A block with its own optimizer. The optimizer is created on demand and can be dropped
    (greedy schedule), so a frozen layer holds no optimizer state."""

    def __init__(self, block: nn.Sequential, *, optimizer: str, lr: float, state_dtype: str = "float32",
                 weight_decay: float | None = None) -> None:
        super().__init__()
        self.block = block
        self.optimizer_kind = optimizer
        self.lr = lr
        self.state_dtype = state_dtype
        self.weight_decay = weight_decay
        self.extra_params: list[nn.Parameter] = []  # e.g. a learned label channel, trained with layer 0
        self.opt: LeanOptimizer | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)

    def ensure_optimizer(self) -> LeanOptimizer:
        if self.opt is None:
            self.opt = make_optimizer(list(self.block.parameters()) + self.extra_params, self.optimizer_kind, self.lr,
                                      self.state_dtype, self.weight_decay)
        return self.opt

    def drop_optimizer(self) -> None:
        self.opt = None

    def set_lr(self, lr: float) -> None:
        """This layer's learning rate, for its live optimizer and any created later."""
        self.lr = lr
        if self.opt is not None:
            for group in self.opt.param_groups:
                group["lr"] = lr

    def optimizer_step(self, factored: Mapping[torch.Tensor, Factors] | None = None) -> None:
        """Step the optimizer (``factored``: weight gradients recorded as factors, ``edgeff.factored``); its
        state is held in the layer's ``state_dtype`` between steps."""
        self.ensure_optimizer().step(factored)


def grow_rows(
    owner: nn.Module, name: str, rows: torch.Tensor, optimizers: Sequence[LeanOptimizer | None] = ()
) -> torch.Tensor:
    """Append ``rows`` (n, ...) to the tensor ``owner.<name>`` along dim 0 (online class addition).

    A parameter stays a parameter and is swapped in every optimizer in ``optimizers`` that holds it;
    its state grows with it: first moments (and momentum buffers) start at zero for the new rows,
    second moments (``exp_avg_sq``) at the mean of the existing rows, so the new rows step at the same
    scale as the old ones instead of Adam's ~1/sqrt(1 − β2) jump for a zero second moment with a mature
    step count. Existing rows and their state are unchanged. Returns the new tensor.
    """
    old = getattr(owner, name)
    data = torch.cat([old.detach(), rows.to(old.device, old.dtype)])  # (K+n, ...)
    if isinstance(old, nn.Parameter):
        new: torch.Tensor = nn.Parameter(data, requires_grad=old.requires_grad)
        setattr(owner, name, new)
        for opt in optimizers:
            if opt is None:
                continue
            for group in opt.param_groups:
                for j, p in enumerate(group["params"]):
                    if p is old:
                        group["params"][j] = new
            if old in opt.state:
                st = opt.state.pop(old)
                for k, v in list(st.items()):
                    if isinstance(v, torch.Tensor) and v.shape == old.shape:
                        fill = v.mean(0, keepdim=True) if k.endswith("exp_avg_sq") else torch.zeros_like(v[:1])
                        st[k] = torch.cat([v, fill.expand(rows.shape[0], *v.shape[1:])])
                opt.state[new] = st
    else:
        owner.register_buffer(name, data)
        new = data
    return new


HEAD_ROW_NORM = 3 ** -0.5  # a row's expected norm under torch's default Linear init (uniform ±1/√D over D values)


def class_row(existing: torch.Tensor, proto: torch.Tensor | None, generator: torch.Generator,
              first_norm: float | None = None) -> torch.Tensor:
    """A new class's row for a (K, D) matrix of class vectors (label embeddings, head weights): the
    direction of ``proto`` (D,) — a mean feature of the class's examples — or a random Gaussian one,
    scaled to the mean row norm of ``existing`` so no class starts louder than the others. The first row
    of an empty matrix gets ``first_norm`` (default: a Gaussian row's norm √D, the label dictionary's
    init; heads pass ``HEAD_ROW_NORM``: √D would start a 1,024-wide head ~55× louder than torch's init)."""
    rows = existing.detach()
    if proto is None:
        proto = torch.randn(rows.shape[1], generator=generator).to(rows.device)
    first = float(rows.shape[1]) ** 0.5 if first_norm is None else first_norm
    scale = rows.norm(dim=1).mean() if rows.shape[0] else torch.tensor(first)
    return proto.to(rows.dtype).flatten() / proto.norm().clamp_min(1e-12) * scale  # (D,)


def grow_linear(linear: nn.Linear, row: torch.Tensor, optimizers: Sequence[LeanOptimizer | None] = ()) -> None:
    """Give ``linear`` one more output (a new class): weight row ``row`` (D,), bias the mean of the
    existing biases; optimizer state grows as in ``grow_rows``."""
    grow_rows(linear, "weight", row[None], optimizers)
    if linear.bias is not None:
        b = linear.bias.detach()
        grow_rows(linear, "bias", (b.mean() if b.numel() else b.new_zeros(())).reshape(1), optimizers)
    linear.out_features += 1
