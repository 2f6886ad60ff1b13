"""Layer kinds, registered once for both runtimes (standard library only: no torch, no numpy).

A ``LayerKind`` is one registration: the shape rule, the torch block builder, the numpy block builder (or the
one line that says why the numpy runtime refuses the kind), and its cost (trained values, the values a sample
produces before pooling, the patches a sample unfolds into) from which the numpy runtime's memory plan
(``edgeff.edge.plan``) and the planned file size (``edgeff.edge.store``) are computed. Builders are named as
``"module:function"`` and imported on first use, so this module loads neither runtime.

    register_kind(LayerKind("linear", linear_shape, torch_block="edgeff.layers:linear_block",
                            numpy_block="edgeff.edge.ops:linear_block", cost=linear_cost))

The torch builder is ``f(spec, in_shape, generator, *, bn_momentum, bn_min_batch, bn_always_running, relu_grad,
init) -> nn.Sequential`` (``edgeff.layers.make_block`` calls it); the numpy builder is ``f(spec, in_shape, rng,
*, bn, relu_grad, init, fill) -> list[Op]`` (``edgeff.edge.ops.make_block``) with the torch block's parameter
names in the same order, so a torch checkpoint maps onto it name for name (``edgeff.interchange``).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edgeff.errors import InputError, UnsupportedError

if TYPE_CHECKING:
    from edgeff.config import LayerSpec

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Cost:
    """What one layer costs, per the numpy runtime's plan: trained values (weights and biases), values a
    sample produces before pooling, values a sample's input unfolds into (im2col patches; 0 for none)."""

    params: int
    pre_pool: int
    patches: int = 0


@dataclass(frozen=True)
class LayerKind:
    name: str
    out_shape: Callable[[LayerSpec, Shape], Shape]  # one sample's shape after the layer (no batch axis)
    torch_block: str  # "module:function"
    numpy_block: str | None = None  # "module:function"; None: the numpy runtime refuses the kind with ``needs_torch``
    needs_torch: str = ""  # why the numpy runtime refuses it ("'vit' layers need torch")
    cost: Callable[[LayerSpec, Shape], Cost] | None = None  # needed where numpy_block is set (the plan)


_KINDS: dict[str, LayerKind] = {}


def register_kind(kind: LayerKind) -> LayerKind:
    """Make ``kind`` known to both runtimes (a name registered again is replaced)."""
    if kind.numpy_block is not None and kind.cost is None:
        raise ValueError(f"layer kind {kind.name!r} runs in the numpy runtime, so it needs a cost (the memory plan)")
    if kind.numpy_block is None and not kind.needs_torch:
        raise ValueError(f"layer kind {kind.name!r} is torch-only: say why in needs_torch (the numpy runtime's refusal)")
    _KINDS[kind.name] = kind
    return kind


def unregister_kind(name: str) -> None:
    _KINDS.pop(name, None)


def kinds() -> dict[str, LayerKind]:
    return dict(_KINDS)


def layer_kind(name: str) -> LayerKind:
    """The registration of ``name``; ``InputError`` naming the known kinds otherwise."""
    try:
        return _KINDS[name]
    except KeyError:
        raise InputError(f"unknown layer kind {name!r}; choose one of {', '.join(sorted(_KINDS))}") from None


def numpy_kind(name: str) -> LayerKind:
    """``layer_kind(name)`` where the numpy runtime runs it; ``UnsupportedError`` with the kind's reason otherwise."""
    k = layer_kind(name)
    if k.numpy_block is None:
        raise UnsupportedError(f"{k.needs_torch}; the edge runtime trains {' and '.join(numpy_kinds())} layers")
    return k


def numpy_kinds() -> list[str]:
    return sorted(n for n, k in _KINDS.items() if k.numpy_block is not None)


def builder(path: str) -> Callable[..., Any]:
    """The function a ``"module:function"`` path names."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)  # type: ignore[no-any-return]


# ------------------------------------------------------------------------------------ the built-in kinds
def _linear_shape(spec: LayerSpec, in_shape: Shape) -> Shape:
    return (spec.out,)


def _linear_cost(spec: LayerSpec, in_shape: Shape) -> Cost:
    return Cost((math.prod(in_shape) + 1) * spec.out, spec.out)


def _conv_grid(spec: LayerSpec, in_shape: Shape) -> tuple[int, int]:
    if len(in_shape) != 3:
        raise ValueError(f"a conv layer needs (C, H, W) inputs, got {in_shape}")
    _, h, w = in_shape
    return ((h + 2 * spec.padding - spec.kernel) // spec.stride + 1, (w + 2 * spec.padding - spec.kernel) // spec.stride + 1)


def _conv_shape(spec: LayerSpec, in_shape: Shape) -> Shape:
    h, w = _conv_grid(spec, in_shape)
    return (spec.out, h // spec.pool, w // spec.pool)


def _conv_cost(spec: LayerSpec, in_shape: Shape) -> Cost:
    h, w = _conv_grid(spec, in_shape)
    fan_in = in_shape[0] * spec.kernel * spec.kernel
    return Cost((fan_in + 1) * spec.out, spec.out * h * w, h * w * fan_in)


def _vit_shape(spec: LayerSpec, in_shape: Shape) -> Shape:
    if len(in_shape) == 3:
        return ((in_shape[1] // spec.patch) * (in_shape[2] // spec.patch), spec.out)
    if len(in_shape) != 2 or in_shape[1] != spec.out:
        raise ValueError(f"a vit layer of width {spec.out} cannot follow a layer with output {in_shape}")
    return in_shape


def _kmeans_shape(spec: LayerSpec, in_shape: Shape) -> Shape:
    if len(in_shape) != 3:
        raise ValueError(f"a kmeans layer needs (C, H, W) inputs, got {in_shape}")
    return (spec.out, spec.pool, spec.pool)


register_kind(LayerKind("linear", _linear_shape, "edgeff.layers:linear_block", "edgeff.edge.ops:linear_block",
                        cost=_linear_cost))
register_kind(LayerKind("conv", _conv_shape, "edgeff.layers:conv_block", "edgeff.edge.ops:conv_block",
                        cost=_conv_cost))
register_kind(LayerKind("vit", _vit_shape, "edgeff.layers:vit_block",
                        needs_torch="'vit' layers need torch"))
register_kind(LayerKind("kmeans", _kmeans_shape, "edgeff.layers:kmeans_block",
                        needs_torch="'kmeans' layers need torch (k-means patch features, edgeff.kmeans)"))


__all__ = ["Cost", "LayerKind", "builder", "kinds", "layer_kind", "numpy_kind", "numpy_kinds", "register_kind",
           "unregister_kind"]
