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


class Outer:
    """A weight gradient ``aᵀ b`` (a: (N, out), b: (N, in)) that is never materialised whole: the
    optimizer asks for it a block of output rows at a time, so a step holds one block, not the
    (out, in) gradient (a Linear layer's, or a conv layer's with ``shape`` (out, in, k, k))."""

    def __init__(self, a: np.ndarray, b: np.ndarray, shape: tuple[int, ...]) -> None:
        self.a, self.b, self.shape = a, b, shape

    def rows(self, r0: int, r1: int) -> np.ndarray:
        return (self.a[:, r0:r1].T @ self.b).reshape(-1)  # (r1 - r0) rows, flattened

    def full(self) -> np.ndarray:
        return (self.a.T @ self.b).reshape(self.shape)


class Optimizer:
    """One layer's optimizer over named parameters (the order torch's optimizer sees them in)."""

    def __init__(self, kind: str, lr: float, weight_decay: float | None = None) -> None:
        if kind not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {kind!r}; choose one of {OPTIMIZERS}")
        self.kind = kind
        self.lr = float(lr)
        self.weight_decay = WEIGHT_DECAY[kind] if weight_decay is None else float(weight_decay)
        self.state: dict[str, dict[str, np.ndarray]] = {}  # per parameter: exp_avg, exp_avg_sq | momentum_buffer
        self.steps: dict[str, int] = {}

    def nbytes(self) -> int:
        return sum(a.nbytes for st in self.state.values() for a in st.values())

    def step(self, name: str, p: np.ndarray, g: np.ndarray | Outer) -> None:
        """Update ``p`` in place from its gradient ``g`` (same shape, or an ``Outer``), block by block."""
        t = self.steps.get(name, 0) + 1
        self.steps[name] = t
        lr = self.lr
        st = self.state.get(name)
        fresh = st is None
        if st is None:
            if self.kind == "sgd":  # torch: the first momentum buffer is a copy of the first gradient
                st = self.state[name] = {"momentum_buffer": np.zeros_like(p)}
            else:
                st = self.state[name] = {"exp_avg": np.zeros_like(p), "exp_avg_sq": np.zeros_like(p)}
        pf = p.reshape(-1)
        row = int(np.prod(p.shape[1:])) if p.ndim > 1 else pf.size
        rows_per = max(1, BLOCK // row)
        bufs = {k: a.reshape(-1) for k, a in st.items()}
        tmp = np.empty(min(pf.size, rows_per * row), F32)  # the step's scratch buffer
        gflat = None if isinstance(g, Outer) else np.asarray(g, F32).reshape(-1)
        n_rows = p.shape[0] if p.ndim > 1 else 1
        for r0 in range(0, n_rows, rows_per):
            r1 = min(n_rows, r0 + rows_per)
            sl = slice(r0 * row, r1 * row) if p.ndim > 1 else slice(0, pf.size)
            gb = g.rows(r0, r1) if isinstance(g, Outer) else gflat[sl]  # type: ignore[index]
            self._update(t, fresh, pf[sl], gb, {k: b[sl] for k, b in bufs.items()}, tmp[: gb.size], lr)
            del gb  # the next block is built without this one alive (a step holds two blocks: gradient, scratch)

    def _update(self, t: int, fresh: bool, pb: np.ndarray, gb: np.ndarray, st: dict[str, np.ndarray], tmp: np.ndarray,
                lr: float) -> None:
        wd = self.weight_decay
        if wd and self.kind != "adamw":  # L2: torch adds wd·p to the gradient (a copy: gb may be a view)
            gb = gb + F32(wd) * pb
        if self.kind == "sgd":
            buf = st["momentum_buffer"]
            if fresh:
                buf[...] = gb
            else:
                buf *= F32(MOMENTUM)
                buf += gb
            np.multiply(buf, F32(lr), out=tmp)
            pb -= tmp
            return
        mb, vb = st["exp_avg"], st["exp_avg_sq"]
        step_size = F32(lr / (1 - BETA1**t))
        inv_bc2 = F32(1 / np.sqrt(1 - BETA2**t))
        if wd and self.kind == "adamw":
            pb *= F32(1 - lr * wd)
        np.subtract(gb, mb, out=tmp)  # exp_avg.lerp_(grad, 1 - beta1)
        tmp *= F32(1 - BETA1)
        mb += tmp
        vb *= F32(BETA2)  # exp_avg_sq.mul_(beta2).addcmul_(grad, grad, 1 - beta2)
        np.multiply(gb, gb, out=tmp)
        tmp *= F32(1 - BETA2)
        vb += tmp
        np.sqrt(vb, out=tmp)  # denom = sqrt(v) / sqrt(1 - beta2^t) + eps
        tmp *= inv_bc2
        tmp += F32(EPS)
        np.divide(mb, tmp, out=tmp)
        tmp *= step_size
        pb -= tmp

    def grow(self, name: str, new_rows: int) -> None:
        """A parameter gained ``new_rows`` rows (a new class): first moments start at zero for them,
        second moments at the mean of the existing rows (``edgeff.layers.grow_rows``)."""
        st = self.state.get(name)
        if st is None:
            return
        for k, a in list(st.items()):
            fill = a.mean(0, keepdims=True) if k == "exp_avg_sq" else np.zeros_like(a[:1])
            st[k] = np.concatenate([a, np.repeat(fill, new_rows, 0)]).astype(F32)
