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
    if h.requires_grad and h.dim() == 4 and not h.is_contiguous():
        return _ChannelsLastGoodness.apply(h)
    return h.pow(2).flatten(1).mean(1)  # (B,)


class _ChannelsLastGoodness(torch.autograd.Function):
    """``goodness`` of channels-last conv activations with a gradient in their layout: autograd's own formula
    multiplies the broadcast (B,) gradient by 2h and lays the result out as NCHW, and every elementwise op
    after that mixes the two layouts (ReLU's backward 3x slower on trifecta-cnn's 28x28 layers)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, h: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(h)
        return h.pow(2).mean((1, 2, 3))

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        (h,) = ctx.saved_tensors  # type: ignore[attr-defined]
        return h * (grad * (2.0 / h[0].numel())).view(-1, 1, 1, 1)


def ff_loss(g_pos: torch.Tensor, g_neg: torch.Tensor, *, threshold: float = 2.0, sharpness: float = 1.0) -> torch.Tensor:
    """Forward-Forward threshold loss (Hinton 2022): ``softplus(s(θ − G_pos)) + softplus(s(G_neg − θ))``.

    Averaged over the batch; θ = 2, s = 1 in Hinton's and most public implementations. With goodness the
    mean of squares over W features, s = W and θ = 1 is the binary cross-entropy on ``Σh² − W`` (times two:
    summed over the positive and the negative instead of averaged).
    """
    if sharpness == 1.0:
        return (F.softplus(threshold - g_pos) + F.softplus(g_neg - threshold)).mean()
    return (F.softplus(sharpness * (threshold - g_pos)) + F.softplus(sharpness * (g_neg - threshold))).mean()


def symba_loss(g_pos: torch.Tensor, g_neg: torch.Tensor, *, alpha: float = 4.0) -> torch.Tensor:
    """SymBa loss (Lee & Song 2023, eq. 11): ``softplus(−α (G_pos − G_neg))``, α = 4.

    ``F.softplus`` switches to the identity for large arguments, so the loss stays finite (and its
    gradient exact) for any separation; averaged over the positive/negative pairs of the batch.
    """
    return F.softplus(-alpha * (g_pos - g_neg)).mean()


LOSSES: dict[str, Callable[..., torch.Tensor]] = {"ff": ff_loss, "symba": symba_loss}


def get_loss(name: str, *, threshold: float = 2.0, alpha: float = 4.0, sharpness: float = 1.0) -> LossFn:
    """The loss called ``name`` with its hyperparameters bound."""
    if name == "ff":
        return lambda gp, gn: ff_loss(gp, gn, threshold=threshold, sharpness=sharpness)
    if name == "symba":
        return lambda gp, gn: symba_loss(gp, gn, alpha=alpha)
    raise ValueError(f"unknown loss {name!r}; choose one of {sorted(LOSSES)}")


# --------------------------------------------------------------------------- contrastive family
def _masked_logsumexp(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Row-wise log Σ exp over the entries where ``mask`` is True (−inf for an empty row)."""
    return torch.logsumexp(logits.masked_fill(~mask, float("-inf")), dim=1)


def supcon_loss(z: torch.Tensor, y: torch.Tensor, *, tau: float = 0.15, margin: float = 0.0) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020, L_out), as used per layer by Contrastive
    Forward-Forward (Aghagolzadeh & Ezoji, eq. 3):

        L_i = −1/|P(i)| Σ_{p∈P(i)} log( exp(Q(z_i, z_p)/τ) / Σ_{a≠i} exp(Q(z_i, z_a)/τ) ),

    averaged over the anchors that have a positive. ``z`` must be L2-normalised (N, C). With
    ``margin`` m > 0 this is the Marginal Contrastive Loss (CFF+M, eq. 15): Q(a, b) = min(a·b + m, 1)
    for same-class pairs (wherever they appear, numerator and denominator), a·b otherwise.
    A batch without any positive pair gives 0 (with a gradient of zeros).
    """
    n = z.shape[0]
    sim = z @ z.T  # (N, N) cosine similarities
    same = y[:, None] == y[None, :]
    not_self = ~torch.eye(n, dtype=torch.bool, device=z.device)
    pos = same & not_self
    if margin:
        sim = torch.where(pos, torch.clamp(sim + margin, max=1.0), sim)
    logits = sim / tau
    log_denom = _masked_logsumexp(logits, not_self)  # (N,)
    n_pos = pos.sum(1)
    valid = n_pos > 0
    if not bool(valid.any()):
        return z.sum() * 0.0
    log_prob = logits - log_denom[:, None]
    per_anchor = -(log_prob * pos).sum(1) / n_pos.clamp(min=1)
    return per_anchor[valid].mean()


def cfl_batch_loss(h: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """CFL's batch embedding contrastive loss (Lee et al., eq. 4): with t_n the (pooled, noisy) label
    embedding of sample n's label,

        L_n = −log( exp⟨h̄_n, t_n⟩ / Σ_{i: y_i ≠ y_n} exp⟨h̄_n, t_i⟩ ),

    the denominator holding only the other-label samples' embeddings (dot products, not cosines).
    Averaged over the samples that have a negative in the batch; 0 when none has (e.g. batch 1).
    """
    logits = h @ t.T  # (N, N)
    neg = y[:, None] != y[None, :]
    valid = neg.any(1)
    if not bool(valid.any()):
        return h.sum() * 0.0
    per = -logits.diagonal() + _masked_logsumexp(logits, neg)
    return per[valid].mean()


def fresh_class_mask(y: torch.Tensor, fresh: int | None, k: int) -> torch.Tensor | None:
    """ER-ACE's mask (N, K) for a batch of ``fresh`` new stream samples followed by replayed ones: a fresh
    row allows only the classes present among the fresh labels, a replayed row every class. None when
    there is nothing to restrict (no ``fresh`` count, or no replayed samples)."""
    if fresh is None or fresh >= y.shape[0]:
        return None
    allowed = torch.ones(y.shape[0], k, dtype=torch.bool, device=y.device)
    allowed[:fresh] = torch.isin(torch.arange(k, device=y.device), y[:fresh])
    return allowed


def cfl_dict_loss(h: torch.Tensor, y: torch.Tensor, d: torch.Tensor, *, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """CFL's dictionary contrastive loss (Lee et al., eq. 6): softmax cross-entropy of the dot
    products between each mean feature h̄_n (N, C) and every (pooled, noisy) dictionary row d (Z, C).

    ``allowed`` (N, Z) bool, optional, limits each sample's softmax to some rows (it must allow the
    sample's own label): the asymmetric replay loss of ER-ACE (Caccia et al. 2022), where a fresh
    stream sample competes only with the classes of the fresh batch.
    """
    logits = h @ d.T  # (N, Z)
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    return F.cross_entropy(logits, y)


def cfl_feat_loss(z: torch.Tensor, y: torch.Tensor, *, tau: float = 0.07) -> torch.Tensor:
    """CFL's feature contrastive loss (Lee et al., eq. 9), on L2-normalised mean features z (N, C):

        L_n = −log( 1/|P(n)| Σ_{p∈P(n)} exp(⟨z_n, z_p⟩/τ) / Σ_{k∈N(n)} exp(⟨z_n, z_k⟩/τ) ),

    positives summed inside the log, negatives only in the denominator; averaged over the samples
    that have both a positive and a negative (0 when none has).
    """
    n = z.shape[0]
    logits = (z @ z.T) / tau
    same = y[:, None] == y[None, :]
    pos = same & ~torch.eye(n, dtype=torch.bool, device=z.device)
    neg = ~same
    valid = pos.any(1) & neg.any(1)
    if not bool(valid.any()):
        return z.sum() * 0.0
    per = -(_masked_logsumexp(logits, pos) - torch.log(pos.sum(1).clamp(min=1).float())) + _masked_logsumexp(logits, neg)
    return per[valid].mean()


def peer_loss(h_pos: torch.Tensor, running: torch.Tensor, momentum: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Peer normalisation (the Forward-Forward reference implementation of Löwe): each unit's mean
    activity over the positive samples ``h_pos`` (B, C, ...; spatial dims averaged too) is folded into its
    ``running`` mean (C,) with ``momentum``, and the loss is the mean squared distance of the units' running
    means from their average, so no unit goes silent or takes over. Returns (loss, this batch's mean
    activity, detached) — the caller folds the latter into ``running`` once per batch."""
    dims = [0, *range(2, h_pos.dim())]
    act = h_pos.mean(dims)  # (C,)
    mixed = running * momentum + act * (1 - momentum)
    return (mixed.mean() - mixed).pow(2).mean(), act.detach()


def margin_at(layer: int, n_layers: int, first: float, last: float) -> float:
    """CFF+M's margin schedule: ``first`` at layer 0 falling linearly to ``last`` at the last layer."""
    if n_layers <= 1:
        return last
    return first + (last - first) * layer / (n_layers - 1)
