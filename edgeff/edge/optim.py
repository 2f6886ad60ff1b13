"""Optimizers with torch's arithmetic (``torch.optim.Adam``/``AdamW``/``SGD``, single-tensor path).

State is kept per parameter under torch's names (``exp_avg``, ``exp_avg_sq``, ``momentum_buffer``)
plus the step count, so it converts to and from a torch optimizer's ``state_dict``. Updates work in
place on row blocks of a parameter, so a step's scratch memory is a few hundred KiB whatever the
layer's size.
"""

from __future__ import annotations

import numpy as np

F32 = np.float32
OPTIMIZERS = ("adam", "adamw", "sgd")
BETA1, BETA2, EPS = 0.9, 0.999, 1e-8  # torch's Adam defaults
WEIGHT_DECAY = {"adam": 0.0, "adamw": 0.01, "sgd": 0.0}  # torch's defaults (edgeff.layers.make_optimizer)
MOMENTUM = 0.9
BLOCK = 1 << 16  # values per in-place block


class Optimizer:
    """One layer's optimizer over named parameters (the order torch's optimizer sees them in)."""

    def __init__(self, kind: str, lr: float) -> None:
        if kind not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {kind!r}; choose one of {OPTIMIZERS}")
        self.kind = kind
        self.lr = float(lr)
        self.state: dict[str, dict[str, np.ndarray]] = {}  # per parameter: exp_avg, exp_avg_sq | momentum_buffer
        self.steps: dict[str, int] = {}

    def nbytes(self) -> int:
        return sum(a.nbytes for st in self.state.values() for a in st.values())

    def step(self, name: str, p: np.ndarray, g: np.ndarray) -> None:
        """Update ``p`` in place from its gradient ``g`` (same shape)."""
        t = self.steps.get(name, 0) + 1
        self.steps[name] = t
        lr = self.lr
        pf, gf = p.reshape(-1), g.reshape(-1)
        if self.kind == "sgd":
            st = self.state.get(name)
            if st is None:  # torch: the first buffer is a copy of the gradient
                self.state[name] = {"momentum_buffer": gf.copy().reshape(p.shape)}
                buf = self.state[name]["momentum_buffer"].reshape(-1)
            else:
                buf = st["momentum_buffer"].reshape(-1)
                buf *= F32(MOMENTUM)
                buf += gf
            pf -= F32(lr) * buf
            return
        st = self.state.get(name)
        if st is None:
            st = self.state[name] = {"exp_avg": np.zeros_like(p), "exp_avg_sq": np.zeros_like(p)}
        m, v = st["exp_avg"].reshape(-1), st["exp_avg_sq"].reshape(-1)
        wd = WEIGHT_DECAY[self.kind]
        step_size = F32(lr / (1 - BETA1**t))
        bc2_sqrt = F32(np.sqrt(1 - BETA2**t))
        for s in range(0, pf.size, BLOCK):
            sl = slice(s, s + BLOCK)
            pb, gb, mb, vb = pf[sl], gf[sl], m[sl], v[sl]
            if wd:
                pb *= F32(1 - lr * wd)
            mb += (gb - mb) * F32(1 - BETA1)  # lerp
            vb *= F32(BETA2)
            vb += gb * gb * F32(1 - BETA2)
            denom = np.sqrt(vb)
            denom /= bc2_sqrt
            denom += F32(EPS)
            pb -= step_size * (mb / denom)

    def grow(self, name: str, new_rows: int) -> None:
        """A parameter gained ``new_rows`` rows (a new class): first moments start at zero for them,
        second moments at the mean of the existing rows (``edgeff.layers.grow_rows``)."""
        st = self.state.get(name)
        if st is None:
            return
        for k, a in list(st.items()):
            fill = a.mean(0, keepdims=True) if k == "exp_avg_sq" else np.zeros_like(a[:1])
            st[k] = np.concatenate([a, np.repeat(fill, new_rows, 0)]).astype(F32)
