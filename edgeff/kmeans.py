"""The ``kmeans`` layer kind: single-layer unsupervised features learned from the stream, without labels or
gradients (Coates, Lee & Ng 2011, "An Analysis of Single-Layer Networks in Unsupervised Feature Learning",
AISTATS: k-means on whitened patches, triangle activation, quadrant pooling; 77.9-79.6% on full CIFAR-10
with 1,600-4,000 features and a linear readout).

Fitting (``KMeansPatches.fit``, once, from a held batch of samples):

1. every k×k patch ``p`` (D = C·k² values) of the samples is normalised for brightness and contrast,
   ``p̂ = (p − mean(p)) / sqrt(var(p) + ε_v)`` (ε_v: 1% of the mean patch variance, so the rule does not
   depend on how the inputs are scaled; Coates et al. add 10 on a 0-255 scale);
2. ZCA whitening: ``w = (p̂ − m) V diag(1 / sqrt(λ + 0.1)) Vᵀ`` from the patches' covariance ``V Λ Vᵀ``;
3. spherical k-means (``ITERS`` rounds): each whitened patch joins the unit centroid it projects on most,
   a centroid becomes the normalised projection-weighted sum of its patches (an empty one restarts at a
   random patch).

Features (``forward``, a fixed map after fitting, so the statistics downstream stay exact): at every
position, ``z_j = ‖w − c_j‖`` and the triangle activation ``f_j = max(0, mean_i z_i − z_j)``, average-pooled
over a ``pool`` × ``pool`` grid (Coates et al.'s quadrants: ``pool=2``). Everything is a convolution: the
patch mean and variance are box filters, ``w · c_j`` is a conv with the filters ``zca c_j`` corrected for the
means, and ``‖w‖²`` the sum of squares of a conv with the D rows of ``zca``; so the layer exports to ONNX as
it runs, and never holds the (B, H'·W', D) patches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ITERS = 10  # k-means rounds
MAX_PATCHES = 400_000  # patches k-means fits (Coates et al.: 400,000); fewer when the samples hold fewer
WHITEN_EPS = 0.1  # ZCA's regulariser on the normalised patches' eigenvalues
VAR_EPS = 0.01  # the contrast normalisation's ε_v, as a share of the mean patch variance
CHUNK = 50_000  # patches assigned per block during fitting (a (CHUNK, K) score block)


def patch_count(in_shape: tuple[int, ...], kernel: int) -> int:
    """Positions of a ``kernel`` × ``kernel`` patch in a (C, H, W) sample."""
    _, h, w = in_shape
    return max(0, h - kernel + 1) * max(0, w - kernel + 1)


class KMeansPatches(nn.Module):
    """``k`` whitened k-means centroids over ``kernel`` × ``kernel`` patches, triangle-activated and pooled to
    (k, pool, pool). Holds no parameters: every tensor is a buffer fitted by ``fit`` (the state dict is the
    checkpoint). Before fitting, ``forward`` refuses."""

    fitted: torch.Tensor
    centroids: torch.Tensor
    zca: torch.Tensor
    patch_mean: torch.Tensor
    var_eps: torch.Tensor

    def __init__(self, in_shape: tuple[int, ...], k: int, kernel: int, pool: int) -> None:
        super().__init__()
        if len(in_shape) != 3:
            raise ValueError(f"a kmeans layer needs (C, H, W) inputs, got {in_shape}")
        c = in_shape[0]
        if patch_count(in_shape, kernel) == 0:
            raise ValueError(f"a {kernel}x{kernel} kmeans patch does not fit in inputs of shape {in_shape}")
        d = c * kernel * kernel
        self.k, self.kernel, self.pool, self.channels = k, kernel, pool, c
        self.map_bytes = 4 * k * patch_count(in_shape, kernel)  # one sample's activation map (float32)
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))
        self.register_buffer("centroids", torch.zeros(k, d))  # unit vectors in the whitened patch space
        self.register_buffer("zca", torch.zeros(d, d))  # V diag(1/sqrt(λ+ε)) Vᵀ (symmetric)
        self.register_buffer("patch_mean", torch.zeros(d))  # m: the normalised patches' mean
        self.register_buffer("var_eps", torch.ones(()))  # ε_v

    def _dots(self, x: torch.Tensor, rows: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """``rows_j · (p̂ − m)`` at every position for ``rows`` (J, D): (B, J, H', W'). With p̂ = (p − μ_p)/σ_p
        this is ``(conv(x, rows) − μ_p Σ rows_j) / σ_p − rows_j · m``."""
        weight = rows.reshape(rows.shape[0], self.channels, self.kernel, self.kernel)
        out = F.conv2d(x, weight)
        out.sub_(mean * rows.sum(1)[None, :, None, None]).div_(scale)
        return out.sub_((rows @ self.patch_mean)[None, :, None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not bool(self.fitted):
            raise RuntimeError("this kmeans layer has not been fitted yet (it learns its filters from the "
                               "stream's first samples)")
        box = torch.full((1, self.channels, self.kernel, self.kernel), 1.0 / (self.channels * self.kernel ** 2),
                         dtype=x.dtype, device=x.device)
        mean = F.conv2d(x, box)  # (B, 1, H', W'): each patch's mean
        var = (F.conv2d(x * x, box) - mean * mean).clamp_(min=0.0)
        scale = (var + self.var_eps).sqrt_()
        z = self._dots(x, self.centroids @ self.zca, mean, scale)  # w · c_j, w = zca (p̂ − m): (B, K, H', W')
        e = self._dots(x, self.zca, mean, scale)  # w itself: (B, D, H', W')
        sq = (e * e).sum(1, keepdim=True)  # ‖w‖²
        del e
        z.mul_(-2.0).add_(sq).add_(1.0).clamp_(min=0.0).sqrt_()  # ‖w − c_j‖ (unit centroids)
        mean_z = z.mean(1, keepdim=True)
        f = z.neg_().add_(mean_z).clamp_(min=0.0)  # triangle activation: max(0, mean_i z_i − z_j)
        return grid_mean(f, self.pool)  # (B, K, pool, pool)

    @torch.no_grad()
    def fit(self, x: torch.Tensor, generator: torch.Generator) -> None:
        """Learn the whitening and the centroids from samples ``x`` (N, C, H, W) (see the module docstring)."""
        kk, d = self.kernel, self.channels * self.kernel ** 2
        x = x.float().cpu()
        per = patch_count(tuple(x.shape[1:]), kk)
        total = x.shape[0] * per
        take = torch.randperm(total, generator=generator)[: min(total, MAX_PATCHES)]
        rows = []
        for i in range(0, x.shape[0], 64):  # unfold a few samples at a time, keep the chosen patches
            lo, hi = i * per, min(x.shape[0], i + 64) * per
            sel = take[(take >= lo) & (take < hi)] - lo
            if sel.numel():
                u = F.unfold(x[i : i + 64], kk).transpose(1, 2).reshape(-1, d)  # (b·per, D)
                rows.append(u[sel])
        p = torch.cat(rows).double()  # (P, D)
        p -= p.mean(1, keepdim=True)
        var = p.pow(2).mean(1, keepdim=True)
        var_eps = VAR_EPS * float(var.mean()) if float(var.mean()) > 0 else 1.0
        p /= (var + var_eps).sqrt()
        m = p.mean(0)
        cov = torch.cov(p.T) if p.shape[0] > 1 else torch.zeros(d, d, dtype=torch.float64)
        lam, vec = torch.linalg.eigh(cov)
        zca = (vec / (lam.clamp(min=0.0) + WHITEN_EPS).sqrt()) @ vec.T  # V diag(1/sqrt(λ+ε)) Vᵀ (symmetric)
        w = ((p - m) @ zca).float()  # (P, D) whitened patches
        del p
        cent = w[torch.randint(0, w.shape[0], (self.k,), generator=generator)].clone()
        cent /= cent.norm(dim=1, keepdim=True).clamp(min=1e-8)
        for _ in range(ITERS):
            acc = torch.zeros_like(cent)
            hits = torch.zeros(self.k, dtype=torch.long)
            for i in range(0, w.shape[0], CHUNK):
                blk = w[i : i + CHUNK]
                proj, a = (blk @ cent.T).max(1)  # each patch's centroid and projection
                acc.index_add_(0, a, blk * proj[:, None])
                hits += torch.bincount(a, minlength=self.k)
            dead = hits == 0
            if bool(dead.any()):
                acc[dead] = w[torch.randint(0, w.shape[0], (int(dead.sum()),), generator=generator)]
            cent = acc / acc.norm(dim=1, keepdim=True).clamp(min=1e-8)
        self.centroids.copy_(cent)
        self.zca.copy_(zca)
        self.patch_mean.copy_(m)
        self.var_eps.fill_(var_eps)
        self.fitted.fill_(True)


def grid_mean(f: torch.Tensor, g: int) -> torch.Tensor:
    """``adaptive_avg_pool2d(f, g)`` as g² slices (the regions [⌊i·n/g⌋, ⌈(i+1)·n/g⌉)), which ONNX exports for
    any map size (its adaptive pooling needs sizes that divide)."""
    h, w = int(f.shape[-2]), int(f.shape[-1])  # plain ints: an exported graph keeps the bounds as constants
    rows = [(i * h // g, ((i + 1) * h + g - 1) // g) for i in range(g)]
    cols = [(j * w // g, ((j + 1) * w + g - 1) // g) for j in range(g)]
    cells = [f[:, :, a:b, c:d].mean((2, 3)) for a, b in rows for c, d in cols]  # g² × (B, K)
    return torch.stack(cells, 2).reshape(f.shape[0], f.shape[1], g, g)


class GridMean(nn.Module):
    """``grid_mean`` as a module (the backprop twin's pooling of a kmeans layer's shape)."""

    def __init__(self, g: int) -> None:
        super().__init__()
        self.g = g

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return grid_mean(f, self.g)
