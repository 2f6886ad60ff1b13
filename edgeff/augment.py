"""Augmented views for contrastive learners (CFF's two-view mode) and their backprop baseline.

CFF (Aghagolzadeh & Ezoji) passes two randomly augmented copies of every batch through each layer
and contrasts all 2B features; its one-forward mode uses one un-augmented view at half the cost.
The augmentations are the paper's: random crop (pad, then crop back to H×W at a random offset) and
a random horizontal flip. Choices the paper leaves open, made here:

- the crop pads by *replicating the border* rather than with zeros: batches arrive normalised, so a
  zero is mid-grey, while the border of a digit or a CIFAR photo is the image's own background;
- digits (MNIST) get no flip (a flipped 2 is no digit) but the random crop, so the two views differ
  (the paper uses no augmentation on MNIST; with identical views the second pass adds nothing);
- every sample draws its own offset and flip from the learner's generator, so a run is reproducible
  from its seed, and the views are computed on the batch's device in one vectorised step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from edgeff.config import TrainConfig
from edgeff.errors import InputError


class Augment:
    """Random crop after ``padding`` replicated border pixels and, with ``hflip``, a random
    horizontal flip (probability 0.5), drawn per sample from ``generator``."""

    def __init__(self, padding: int, hflip: bool, generator: torch.Generator) -> None:
        if padding < 0:
            raise InputError(f"crop padding must be >= 0, got {padding}")
        self.padding = int(padding)
        self.hflip = bool(hflip)
        self.generator = generator

    @property
    def active(self) -> bool:
        return self.padding > 0 or self.hflip

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W), a new tensor; ``x`` is not modified."""
        b, _, h, w = x.shape
        p = self.padding
        if p:
            xp = F.pad(x, (p, p, p, p), mode="replicate")
            off = torch.randint(0, 2 * p + 1, (2, b), generator=self.generator).to(x.device)
            rows = off[0][:, None] + torch.arange(h, device=x.device)  # (B, H)
            cols = off[1][:, None] + torch.arange(w, device=x.device)  # (B, W)
            idx = torch.arange(b, device=x.device)[:, None, None]
            x = xp[idx, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)  # (B, H, W, C) -> (B, C, H, W)
        if self.hflip:
            flip = (torch.rand(b, generator=self.generator) < 0.5).to(x.device)
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
        return x.contiguous() if p or self.hflip else x.clone()


def make_augment(train: TrainConfig, generator: torch.Generator) -> Augment | None:
    """The augmentation a train config asks for, or None (one un-augmented view)."""
    if train.views not in (1, 2):
        raise InputError(f"views must be 1 (one-forward) or 2 (two augmented views), got {train.views}")
    aug = Augment(train.crop_padding, train.hflip, generator)
    return aug if aug.active else None


def make_views(x: torch.Tensor, y: torch.Tensor, views: int, augment: Augment | None,
               allowed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The batch a learner steps on: ``views`` augmented copies of (x, y) stacked [view 1; view 2]
    (2B samples for two views; sample i and i + B are the same image), the per-sample class mask
    (ER-ACE) repeated alongside. Without augmentation and with one view, (x, y, allowed) as given."""
    if augment is None and views == 1:
        return x, y, allowed
    xs = torch.cat([augment(x) if augment is not None else x for _ in range(views)])
    return xs, y.repeat(views), None if allowed is None else allowed.repeat(views, 1)
