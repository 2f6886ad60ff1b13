"""Layer-local losses: pure functions of per-sample goodness, looked up by name in ``LOSSES``."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def goodness(h: torch.Tensor) -> torch.Tensor:
    """Goodness of each sample: the mean of its squared activations over all feature dims.

    Args:
        h: activations of shape (B, ...).
    Returns:
        (B,) tensor.
    """
    return h.pow(2).flatten(1).mean(1)  # (B,)


def ff_loss(g_pos: torch.Tensor, g_neg: torch.Tensor, *, threshold: float = 2.0) -> torch.Tensor:
    """Forward-Forward threshold loss (Hinton 2022): ``softplus(θ − G_pos) + softplus(G_neg − θ)``.

    Averaged over the batch; θ = 2 in Hinton's and most public implementations.
    """
    return (F.softplus(threshold - g_pos) + F.softplus(g_neg - threshold)).mean()


def symba_loss(g_pos: torch.Tensor, g_neg: torch.Tensor, *, alpha: float = 4.0) -> torch.Tensor:
    """SymBa loss (Lee & Song 2023, eq. 11): ``softplus(−α (G_pos − G_neg))``, α = 4.

    ``F.softplus`` switches to the identity for large arguments, so the loss stays finite (and its
    gradient exact) for any separation; averaged over the positive/negative pairs of the batch.
    """
    return F.softplus(-alpha * (g_pos - g_neg)).mean()


LOSSES: dict[str, Callable[..., torch.Tensor]] = {"ff": ff_loss, "symba": symba_loss}


def get_loss(name: str, *, threshold: float = 2.0, alpha: float = 4.0) -> LossFn:
    """The loss called ``name`` with its hyperparameter bound."""
    if name == "ff":
        return lambda gp, gn: ff_loss(gp, gn, threshold=threshold)
    if name == "symba":
        return lambda gp, gn: symba_loss(gp, gn, alpha=alpha)
    raise ValueError(f"unknown loss {name!r}; choose one of {sorted(LOSSES)}")
