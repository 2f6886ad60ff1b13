"""Attention maps of label-embedding (CFL) conv models: at every location of a layer's feature map, the
dot product of the local feature vector with the (pooled) embedding of a class — the paper's figure 2.
Mean over the locations is exactly that layer's class score, so the map shows where the score comes from.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from edgeff.contrastive import ContrastiveLearner, pool_embeddings
from edgeff.errors import InputError
from edgeff.trainer import as_batch


def attention_maps(learner: ContrastiveLearner, x: torch.Tensor | np.ndarray, label: int | None = None
                   ) -> tuple[list[np.ndarray], int]:
    """Per-layer (H_l, W_l) maps of ⟨h_l(location), pooled embedding of ``label``⟩ for one image.

    Args:
        learner: a CFL learner whose layers are convolutional.
        x: one image (C, H, W).
        label: the class to explain; default: the model's prediction.
    Returns:
        the maps (one per layer) and the class they explain.
    """
    net = learner.net
    if net.embed is None:
        raise InputError("attention maps need label embeddings: use a cfl-* model")
    if any(len(s) != 3 for s in net.shapes):
        raise InputError("attention maps need convolutional layers (cfl-conv, cfl-conv512); an MLP has no locations")
    xb = as_batch(x, learner.model_cfg.input_shape, single=True).to(learner.device)
    if label is None:
        label = int(learner.predict_many(xb)[0])
    if not 0 <= label < net.num_classes:
        raise InputError(f"label {label} is not a class of this model (0..{net.num_classes - 1})")
    net.eval()
    maps = []
    with torch.no_grad():
        h = xb
        for layer in net.local_layers:
            h = layer(h)  # (1, C, H, W)
            e = pool_embeddings(net.embed.detach(), h.shape[1])[label]  # (C,)
            maps.append(torch.einsum("chw,c->hw", h[0], e).cpu().numpy())
    return maps, label


def _heat(m: np.ndarray) -> np.ndarray:
    """A map scaled to [0, 1] as blue (low) -> red (high) RGB."""
    lo, hi = float(m.min()), float(m.max())
    t = (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)
    return np.stack([t, 1 - np.abs(2 * t - 1), 1 - t], axis=-1)


def save_attention(image: np.ndarray, maps: list[np.ndarray], path: str | Path, *, size: int = 112) -> list[Path]:
    """Write ``path`` with the image and each layer's map side by side, and one file per layer
    (``path`` stem + ``_layerN``), each upscaled (nearest) to ``size`` pixels. Returns the files."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.asarray(image, np.float32)
    img = img.mean(0) if img.ndim == 3 else img
    img = (img - img.min()) / max(float(img.max() - img.min()), 1e-8)
    tiles = [Image.fromarray((np.stack([img] * 3, -1) * 255).astype(np.uint8)).resize((size, size), Image.Resampling.NEAREST)]
    files = []
    for i, m in enumerate(maps):
        tile = Image.fromarray((_heat(m) * 255).astype(np.uint8)).resize((size, size), Image.Resampling.NEAREST)
        f = path.with_name(f"{path.stem}_layer{i + 1}{path.suffix or '.png'}")
        tile.save(f)
        files.append(f)
        tiles.append(tile)
    strip = Image.new("RGB", (size * len(tiles) + 4 * (len(tiles) - 1), size), (255, 255, 255))
    for i, t in enumerate(tiles):
        strip.paste(t, (i * (size + 4), 0))
    strip.save(path)
    return [path, *files]
