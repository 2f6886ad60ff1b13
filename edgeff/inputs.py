"""What every learner checks at its door: the device, a batch, its labels, a step's loss."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from edgeff.config import MAX_INPUT
from edgeff.errors import InputError


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise InputError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise InputError(f"device {name!r} is not supported; use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {name!r} asked for but CUDA is not available; use --device cpu or auto")
    return dev


def as_batch(x: torch.Tensor | np.ndarray, input_shape: tuple[int, int, int], *, single: bool = False) -> torch.Tensor:
    """Check a batch and return it as float32 (B, C, H, W). Raises ``InputError`` with what to fix."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise InputError(f"expected a torch.Tensor or numpy array, got {type(x).__name__}")
    if not (x.is_floating_point()):
        raise InputError(f"expected float inputs (normalised pixels), got dtype {x.dtype}; convert with .float()")
    want = tuple(input_shape)
    if single:
        if tuple(x.shape) != want:
            raise InputError(f"expected one sample of shape {want}, got {tuple(x.shape)}")
        x = x.unsqueeze(0)
    elif x.dim() == 2 and x.shape[1] == int(np.prod(want)):
        x = x.view(x.shape[0], *want)
    if tuple(x.shape[1:]) != want or x.shape[0] < 1:
        raise InputError(f"expected a batch of shape (B, {', '.join(map(str, want))}) with B >= 1, got {tuple(x.shape)}")
    x = x.float()  # checked after the cast: a float64 1e39 is inf in float32
    if not torch.isfinite(x).all():
        raise InputError("the batch contains NaN or infinite values (after the float32 cast); clean the input "
                         "before learning from it")
    if float(x.abs().max()) > MAX_INPUT:
        raise InputError(f"the batch holds values beyond ±{MAX_INPUT:g}; normalise the pixels (e.g. to mean 0, "
                         "std 1) before learning from them")
    return x


def check_loss(loss: torch.Tensor, where: str) -> None:
    """Refuse a step whose loss is not finite before it changes anything it has not changed yet."""
    if not bool(torch.isfinite(loss.detach()).all()):
        raise InputError(f"the loss of {where} is not finite on this batch; the step was refused there "
                         "(check the inputs' scale)")


def as_labels(y: torch.Tensor | np.ndarray | Iterable[int] | int, n: int, num_classes: int) -> torch.Tensor:
    t = torch.as_tensor(y)
    if t.is_floating_point() or t.is_complex():
        if not bool((t == t.round()).all()):
            raise InputError(f"labels must be whole class indices, got {t.reshape(-1)[:5].tolist()}")
    elif t.dtype == torch.bool:
        raise InputError("labels must be class indices, got booleans")
    y = t.long().reshape(-1)
    if y.shape[0] != n:
        raise InputError(f"got {y.shape[0]} labels for {n} samples")
    if n and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise InputError(f"labels must lie in 0..{num_classes - 1}; got {int(y.min())}..{int(y.max())}")
    return y


__all__ = ["as_batch", "as_labels", "check_loss", "resolve_device"]


BLOCK_BYTES = 256 << 20  # a batch's forward pass goes in blocks of rows whose largest activation stays below this


def peak_row_bytes(net: torch.nn.Module, sample: torch.Tensor) -> int:
    """The largest activation one sample makes anywhere in ``net`` (bytes), from one forward pass of ``sample``
    (1, C, H, W) with hooks; what bounds how many rows a forward pass may take at once."""
    peak = [sample[:1].numel() * sample.element_size()]

    def hook(_m: torch.nn.Module, _i: object, out: object) -> None:
        if isinstance(out, torch.Tensor):
            peak[0] = max(peak[0], out.numel() * out.element_size())

    handles = [m.register_forward_hook(hook) for m in net.modules()]
    try:
        with torch.no_grad():
            net(sample[:1])
    finally:
        for h in handles:
            h.remove()
    return peak[0]


def in_row_blocks(fn, x: torch.Tensor, row_bytes: int) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """``fn(x)`` computed a block of rows at a time so that no activation exceeds ``BLOCK_BYTES`` (one
    sample's peak activation is ``row_bytes``); the blocks' outputs concatenated."""
    rows = max(1, BLOCK_BYTES // max(1, row_bytes))
    if x.shape[0] <= rows:
        return fn(x)
    return torch.cat([fn(x[i : i + rows]) for i in range(0, x.shape[0], rows)])
