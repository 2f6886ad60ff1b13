"""The device's network: Linear layers trained layer-locally with numpy only (no torch).

Each layer is ``length-norm (optional) -> Linear -> ReLU`` and steps its own optimizer (Adam with
torch's defaults, or SGD with momentum 0.9, as ``edgeff.layers.make_optimizer``) from its own loss;
no gradient crosses a layer. Two local rules:

- ``goodness`` — SymBa (Lee & Song 2023): the label enters as an Intrinsic Class Pattern appended to
  the input (``icp``) or a one-hot overlay (``overlay``); loss ``softplus(-α(G_pos − G_neg))``
  (or Hinton's threshold loss ``ff``) on goodness = mean of squared activations, negatives a
  uniformly drawn wrong label; prediction by the goodness summed over ``eval_layers`` for every label.
  This is the same computation as ``edgeff``'s ``symba-mlp`` preset, whose trained weights export
  to this format (``edgeff.exporters.device``).
- ``embed`` — the label-embedding rule (CFL's dictionary loss, L_dict): a dictionary ``E`` (Z × C_D);
  layer l (width C_l, ``groups`` G_l) represents a sample by the mean of its G_l feature groups
  f (C_l / G_l); ``E`` is average-pooled to that width (stride C_D / d, kernel C_D − (d − 1)·stride)
  and a softmax over ``f · E_pooledᵀ`` is trained with cross-entropy. Gaussian noise N(0, 1/d²) is added
  to the pooled embeddings during training (``embed_noise``); the dictionary is learned only from the
  last layer's loss (``embed_learned``). Any layer predicts in one pass by arg-max ``f · E_pooledᵀ``.
  The batch and feature-contrastive terms of CFL (L_batch, L_feat) are not on the device.

Memory is planned per layer (``memory_plan``): parameters, optimizer state, and the working set of
one layer's step, which is all that is ever live at once.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgeff.edge.data import MNIST_MEAN, MNIST_STD
from edgeff.edge.learner import pool_matrix  # the edge runtime's CFL pooling (one definition)
from edgeff.files import BytesReader

RULES = ("goodness", "embed")
F32 = np.float32
EPS_LEN = 1e-8  # LengthNorm's eps (edgeff.layers.LengthNorm)
ADAM_B1, ADAM_B2, ADAM_EPS = 0.9, 0.999, 1e-8  # torch.optim.Adam defaults


class ModelError(ValueError):
    """A model spec or file the device cannot use."""


def _softplus(x: np.ndarray) -> np.ndarray:
    return np.logaddexp(0.0, x).astype(F32, copy=False)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return (0.5 * (1.0 + np.tanh(0.5 * x))).astype(F32, copy=False)


@dataclass
class AdamState:
    m: np.ndarray
    v: np.ndarray
    t: int = 0


@dataclass
class NumpyNet:
    """A device model: a JSON-able ``spec`` plus arrays. See the module docstring for the rules."""

    spec: dict[str, Any]
    weights: list[np.ndarray]  # (out, in) per layer
    biases: list[np.ndarray]  # (out,) per layer
    codes: np.ndarray | None = None  # (K, code_dim) ICP patterns (goodness rule with icp)
    embed: np.ndarray | None = None  # (Z, C_D) label dictionary (embed rule)
    opt: dict[str, AdamState] = field(default_factory=dict)  # by parameter name (W0, b0, ..., E)
    last_working: list[int] = field(default_factory=list)  # bytes of each layer's last step

    # ----------------------------------------------------------------- construction
    @property
    def rule(self) -> str:
        return str(self.spec["rule"])

    @property
    def num_classes(self) -> int:
        return len(self.spec["classes"])

    @property
    def n_layers(self) -> int:
        return len(self.weights)

    def layer_in(self, i: int) -> int:
        return int(self.weights[i].shape[1])

    def layer_out(self, i: int) -> int:
        return int(self.weights[i].shape[0])

    def params(self) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            out[f"W{i}"], out[f"b{i}"] = w, b
        if self.embed is not None and self.spec.get("embed_learned", True):
            out["E"] = self.embed
        return out

    def to_bytes(self, *, state: dict[str, Any] | None = None) -> bytes:
        """The model as an ``.npz`` (no pickles): spec JSON, arrays, optimizer state, and ``state``."""
        buf = io.BytesIO()
        self.write(buf, state=state)
        return buf.getvalue()

    def write(self, f: Any, *, state: dict[str, Any] | None = None) -> None:
        """``to_bytes`` written straight to a file object, array by array (no copy of the whole model)."""
        arrays: dict[str, np.ndarray] = {}
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            arrays[f"W{i}"], arrays[f"b{i}"] = w, b
        if self.codes is not None:
            arrays["codes"] = self.codes
        if self.embed is not None:
            arrays["embed"] = self.embed
        steps = {}
        for name, st in self.opt.items():
            arrays[f"opt_m_{name}"], arrays[f"opt_v_{name}"] = st.m, st.v
            steps[name] = st.t
        head = {"spec": self.spec, "opt_steps": steps, "state": state or {}}
        arrays["header"] = np.frombuffer(json.dumps(head).encode(), np.uint8)
        np.savez(f, **arrays)  # type: ignore[arg-type]

    @classmethod
    def from_bytes(cls, data: bytes) -> tuple[NumpyNet, dict[str, Any]]:
        """Read ``to_bytes`` output; returns the net and its saved ``state``. Raises ``ModelError``."""
        try:
            with np.load(BytesReader(data), allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            head = json.loads(arrays.pop("header").tobytes().decode())
            spec = head["spec"]
            n = len(spec["layers"])
            weights = [arrays[f"W{i}"].astype(F32, copy=False) for i in range(n)]
            biases = [arrays[f"b{i}"].astype(F32, copy=False) for i in range(n)]
        except ModelError:
            raise
        except Exception as e:  # noqa: BLE001 - any parse failure is the same user-facing error
            raise ModelError(f"not an edgeff device model ({type(e).__name__}: {e})") from None
        net = cls(spec, weights, biases, arrays.get("codes"), arrays.get("embed"))
        for name, t in head.get("opt_steps", {}).items():
            net.opt[name] = AdamState(arrays[f"opt_m_{name}"], arrays[f"opt_v_{name}"], int(t))
        net.validate()
        return net, head.get("state", {})

    def validate(self) -> None:
        """Check that the arrays agree with the spec; raises ``ModelError`` saying what is wrong."""
        s = self.spec
        if s.get("rule") not in RULES:
            raise ModelError(f"unknown rule {s.get('rule')!r}; the device supports {RULES}")
        if len(s["layers"]) != self.n_layers or self.n_layers == 0:
            raise ModelError("the spec's layer list does not match the weights")
        expect = int(s["input_dim"]) + (self.codes.shape[1] if self.codes is not None else 0)
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            if w.ndim != 2 or w.shape[1] != expect or b.shape != (w.shape[0],):
                raise ModelError(f"layer {i}: weight {w.shape} / bias {b.shape} do not take {expect} inputs")
            if s["layers"][i].get("norm", "none") not in ("none", "length"):
                raise ModelError(f"layer {i}: the device supports norm none or length")
            expect = w.shape[0]
        if self.rule == "goodness":
            if s.get("label") not in ("icp", "overlay") or s.get("loss") not in ("symba", "ff"):
                raise ModelError("a goodness model needs label icp|overlay and loss symba|ff")
            if s["label"] == "icp" and (self.codes is None or self.codes.shape[0] != self.num_classes):
                raise ModelError("an icp model needs one pattern per class")
        else:
            if self.embed is None or self.embed.shape[0] != self.num_classes:
                raise ModelError("an embed model needs one embedding row per class")
            for i in range(self.n_layers):
                g = int(s["layers"][i].get("groups", 1))
                if self.layer_out(i) % g or self.layer_out(i) // g > self.embed.shape[1]:
                    raise ModelError(f"layer {i}: width {self.layer_out(i)} with {g} groups does not fit the "
                                     f"{self.embed.shape[1]}-wide embeddings")

    # ----------------------------------------------------------------- forward
    def normalise_input(self, x: np.ndarray) -> np.ndarray:
        """(B, input_dim) uint8 pixels or float32 values -> float32 network input."""
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != int(self.spec["input_dim"]):
            raise ModelError(f"expected inputs of shape (B, {self.spec['input_dim']}), got {x.shape}")
        if x.dtype == np.uint8:
            return ((x.astype(F32, copy=False) / F32(255.0) - F32(self.spec["input_mean"])) / F32(self.spec["input_std"])).astype(F32, copy=False)
        if not np.all(np.isfinite(x)):
            raise ModelError("inputs hold NaN or infinite values")
        return x.astype(F32, copy=False)

    def encode(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Goodness rule: the label written into the input (ICP appended, or one-hot overlay)."""
        if self.spec["label"] == "icp":
            assert self.codes is not None
            return np.concatenate([x, self.codes[y].astype(F32, copy=False)], axis=1)  # (B, D + code_dim)
        out = x.copy()
        k = self.num_classes
        out[:, :k] = np.eye(k, dtype=F32)[y]
        return out

    def layer_forward(self, i: int, a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Returns (normalised input u, pre-activation z, output h) of layer i."""
        if self.spec["layers"][i].get("norm", "none") == "length":
            rms = np.sqrt((a * a).mean(1, keepdims=True) + F32(EPS_LEN)).astype(F32, copy=False)
            u = (a / rms).astype(F32, copy=False)
        else:
            u = a
        z = (u @ self.weights[i].T + self.biases[i]).astype(F32, copy=False)  # (B, out)
        return u, z, np.maximum(z, 0).astype(F32, copy=False)

    def group_mean(self, i: int, h: np.ndarray) -> np.ndarray:
        g = int(self.spec["layers"][i].get("groups", 1))
        return h.reshape(h.shape[0], g, -1).mean(1).astype(F32, copy=False)  # (B, C/G)

    def pooled_embed(self, i: int) -> np.ndarray:
        assert self.embed is not None
        d = self.layer_out(i) // int(self.spec["layers"][i].get("groups", 1))
        return (self.embed @ pool_matrix(self.embed.shape[1], d).T).astype(F32, copy=False)  # (Z, d)

    def layer_scores(self, x: np.ndarray) -> np.ndarray:
        """Per-layer class scores (B, K, L): goodness of every label, or ``f · E_pooledᵀ``."""
        x = self.normalise_input(x)
        b, k = x.shape[0], self.num_classes
        out = []
        if self.rule == "goodness":
            a = self.encode(np.repeat(x, k, axis=0), np.tile(np.arange(k), b))  # (B*K, D')
            for i in range(self.n_layers):
                a = self.layer_forward(i, a)[2]
                out.append((a * a).mean(1).reshape(b, k))
        else:
            a = x
            for i in range(self.n_layers):
                a = self.layer_forward(i, a)[2]
                out.append(self.group_mean(i, a) @ self.pooled_embed(i).T)
        return np.stack(out, axis=-1).astype(F32, copy=False)

    def scores(self, x: np.ndarray, layers: list[int] | None = None) -> np.ndarray:
        """Class scores (B, K) summed over ``layers`` (default: the spec's ``eval_layers``)."""
        sel = self.spec["eval_layers"] if layers is None else layers
        return self.layer_scores(x)[..., sel].sum(-1)

    # ----------------------------------------------------------------- training
    def _update(self, name: str, p: np.ndarray, g: np.ndarray) -> None:
        """One optimizer step on parameter ``p`` in place (torch's Adam / SGD-momentum arithmetic)."""
        lr = F32(self.spec["lr"])
        st = self.opt.get(name)
        if self.spec["optimizer"] == "sgd":
            if st is None:
                st = self.opt[name] = AdamState(g.copy(), np.zeros(0, F32), 0)
            else:
                st.m *= F32(0.9)
                st.m += g
            st.t += 1
            p -= lr * st.m
            return
        if st is None:
            st = self.opt[name] = AdamState(np.zeros_like(p), np.zeros_like(p), 0)
        st.t += 1
        tmp = np.empty_like(p)  # the one scratch buffer: the update holds gradient + scratch only
        st.m *= F32(ADAM_B1)
        np.multiply(g, F32(1 - ADAM_B1), out=tmp)
        st.m += tmp
        st.v *= F32(ADAM_B2)
        np.multiply(g, g, out=tmp)
        tmp *= F32(1 - ADAM_B2)
        st.v += tmp
        bc1 = 1 - ADAM_B1**st.t
        bc2 = 1 - ADAM_B2**st.t
        np.sqrt(st.v, out=tmp)
        tmp /= F32(np.sqrt(bc2))
        tmp += F32(ADAM_EPS)
        np.divide(st.m, tmp, out=tmp)
        tmp *= F32(lr / bc1)
        p -= tmp

    def goodness_loss(self, g_pos: np.ndarray, g_neg: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
        """Loss and its gradients w.r.t. g_pos and g_neg (mean over the B pairs)."""
        b = g_pos.shape[0]
        if self.spec["loss"] == "symba":
            a = F32(self.spec.get("alpha", 4.0))
            d = g_pos - g_neg
            loss = float(_softplus(-a * d).mean())
            s = _sigmoid(-a * d)  # d softplus(-a d)/dd = -a σ(-a d)
            return loss, (-a * s / b).astype(F32, copy=False), (a * s / b).astype(F32, copy=False)
        th = F32(self.spec.get("threshold", 2.0))
        loss = float((_softplus(th - g_pos) + _softplus(g_neg - th)).mean())
        return loss, (-_sigmoid(th - g_pos) / b).astype(F32, copy=False), (_sigmoid(g_neg - th) / b).astype(F32, copy=False)

    def _step_layer(self, i: int, u: np.ndarray, z: np.ndarray, dh: np.ndarray) -> None:
        dz = (dh * (z > 0)).astype(F32, copy=False)  # (B', out)
        self._update(f"W{i}", self.weights[i], (dz.T @ u).astype(F32, copy=False))
        self._update(f"b{i}", self.biases[i], dz.sum(0).astype(F32, copy=False))

    def train_step(
        self,
        x: np.ndarray,
        y: np.ndarray,
        rng: np.random.Generator,
        *,
        y_neg: np.ndarray | None = None,
        noise: np.ndarray | None = None,
    ) -> list[float]:
        """One local step of every layer on a batch; returns each layer's loss.

        Args:
            x: (B, input_dim) uint8 or float32.
            y: (B,) int labels.
            rng: draws wrong labels (goodness) and embedding noise (embed).
            y_neg: goodness rule: explicit wrong labels instead of drawing them.
            noise: embed rule: explicit per-layer noise instead of drawing it (a (L, Z, d) list).
        """
        x = self.normalise_input(x)
        y = np.asarray(y, np.int64).reshape(-1)
        k = self.num_classes
        if y.shape[0] != x.shape[0] or y.min(initial=0) < 0 or y.max(initial=0) >= k:
            raise ModelError(f"labels must be {x.shape[0]} ints in [0, {k})")
        b = x.shape[0]
        losses = []
        self.last_working = []
        if self.rule == "goodness":
            if y_neg is None:
                y_neg = (y + rng.integers(1, k, size=b)) % k
            a = np.concatenate([self.encode(x, y), self.encode(x, np.asarray(y_neg, np.int64))])  # (2B, D')
            for i in range(self.n_layers):
                u, z, h = self.layer_forward(i, a)
                g = (h * h).mean(1)  # (2B,)
                loss, dgp, dgn = self.goodness_loss(g[:b], g[b:])
                dh = (np.concatenate([dgp, dgn])[:, None] * F32(2.0 / h.shape[1]) * h).astype(F32, copy=False)
                self.last_working.append(4 * (a.size + u.size + z.size + h.size + dh.size))
                self._step_layer(i, u, z, dh)
                losses.append(loss)
                a = h
            return losses
        onehot = np.eye(k, dtype=F32)[y]
        a = x
        for i in range(self.n_layers):
            u, z, h = self.layer_forward(i, a)
            f = self.group_mean(i, h)  # (B, d)
            e = self.pooled_embed(i)  # (K, d)
            if noise is not None:
                e = (e + noise[i]).astype(F32, copy=False)
            elif self.spec.get("embed_noise", True):
                e = (e + rng.normal(0.0, 1.0 / e.shape[1], e.shape)).astype(F32, copy=False)
            logits = (f @ e.T).astype(F32, copy=False)  # (B, K)
            logits_s = logits - logits.max(1, keepdims=True)
            p = np.exp(logits_s)
            p /= p.sum(1, keepdims=True)
            losses.append(float(-(np.log(p[np.arange(b), y] + 1e-30)).mean()))
            dlog = ((p - onehot) / b).astype(F32, copy=False)  # (B, K)
            groups = int(self.spec["layers"][i].get("groups", 1))
            df = (dlog @ e).astype(F32, copy=False)  # (B, d)
            dh = np.tile(df / F32(groups), (1, groups)).astype(F32, copy=False)  # (B, C): each group gets df / G
            self.last_working.append(4 * (a.size + u.size + z.size + h.size + dh.size + logits.size))
            if i == self.n_layers - 1 and self.spec.get("embed_learned", True):
                assert self.embed is not None
                de = (dlog.T @ f) @ pool_matrix(self.embed.shape[1], e.shape[1])  # (K, C_D)
                self._update("E", self.embed, de.astype(F32, copy=False))
            self._step_layer(i, u, z, dh)
            a = h
        return losses

    # ----------------------------------------------------------------- growing
    def class_snapshot(self) -> Callable[[], None]:
        """A way back from ``add_class``: it replaces arrays (never writes into them), so keeping references is
        enough — no copy of the model. Calling the result restores the classes as they are now."""
        codes, embed, classes = self.codes, self.embed, list(self.spec["classes"])
        e = self.opt.get("E")
        moments = (e.m, e.v) if e is not None else None

        def restore() -> None:
            self.codes, self.embed = codes, embed
            self.spec["classes"] = classes
            if e is not None and moments is not None:
                e.m, e.v = moments

        return restore

    def add_class(self, name: str, rng: np.random.Generator, x: np.ndarray | None = None) -> int:
        """Add a class; returns its index. Existing classes' scores are unchanged.

        Goodness rule: a new sparse random ICP pattern (or the next overlay position). Embed rule: a new
        dictionary row — the direction of the examples' mean last-layer feature mapped back through the
        pooling (pseudo-inverse), scaled to the mean norm of the existing rows; random without examples.
        """
        if name in self.spec["classes"]:
            raise ModelError(f"class {name!r} already exists")
        k = self.num_classes
        if self.rule == "goodness":
            if self.spec["label"] == "icp":
                assert self.codes is not None
                pattern = (rng.random((1, self.codes.shape[1])) < float(self.spec.get("icp_rate", 0.1))).astype(F32, copy=False)
                self.codes = np.concatenate([self.codes, pattern])
            elif k + 1 > int(self.spec["input_dim"]):
                raise ModelError("no input position left to overlay another class on")
        else:
            assert self.embed is not None
            scale = float(np.linalg.norm(self.embed, axis=1).mean())
            if x is not None and len(x):
                feats = self.normalise_input(x)
                for i in range(self.n_layers):
                    feats = self.layer_forward(i, feats)[2]
                f = self.group_mean(self.n_layers - 1, feats).mean(0)  # (d,)
                pmat = pool_matrix(self.embed.shape[1], f.shape[0])
                row = np.linalg.pinv(pmat) @ f
            else:
                row = np.asarray(rng.normal(size=self.embed.shape[1]), F32)
            row = np.asarray(row / (float(np.linalg.norm(row)) + 1e-12) * scale, F32)
            self.embed = np.concatenate([self.embed, row[None]])
            if "E" in self.opt:  # the new row starts with empty optimizer state
                st = self.opt["E"]
                st.m = np.concatenate([st.m, np.zeros((1, st.m.shape[1]), F32)])
                if st.v.size:
                    st.v = np.concatenate([st.v, np.zeros((1, st.v.shape[1]), F32)])
        self.spec["classes"] = [*self.spec["classes"], name]
        return k

    # ----------------------------------------------------------------- memory
    def memory_plan(self, batch: int) -> dict[str, Any]:
        """Bytes the device needs: resident (weights, optimizer state, codes/embeddings) plus the
        largest working set of one layer's training step or of inference, at ``batch`` samples."""
        per_state = 1 if self.spec["optimizer"] == "sgd" else 2
        k = self.num_classes
        rows_train = 2 * batch if self.rule == "goodness" else batch
        rows_infer = batch * k if self.rule == "goodness" else batch
        layers = []
        for i in range(self.n_layers):
            n_in, n_out = self.layer_in(i), self.layer_out(i)
            params = 4 * (n_in * n_out + n_out)
            # input, normalised input, pre-activation, output, output gradient; weight gradient + Adam temp
            train = 4 * (rows_train * (2 * n_in + 3 * n_out) + 2 * (n_in * n_out + n_out))
            infer = 4 * rows_infer * (2 * n_in + 2 * n_out)
            layers.append({"layer": i, "params": params, "optimizer": per_state * params,
                           "train_working": train, "infer_working": infer})
        extra = 0
        if self.codes is not None:
            extra += self.codes.nbytes
        if self.embed is not None:
            extra += self.embed.nbytes * (1 + (per_state if self.spec.get("embed_learned", True) else 0))
        resident = sum(lay["params"] + lay["optimizer"] for lay in layers) + extra
        working = max(max(lay["train_working"], lay["infer_working"]) for lay in layers)
        return {"layers": layers, "labels": extra, "resident": resident, "working": working,
                "total": resident + working}


def init_model(
    rule: str,
    widths: list[int],
    *,
    input_dim: int = 784,
    classes: list[str] | None = None,
    seed: int = 0,
    norm: str = "length",
    label: str = "icp",
    loss: str = "symba",
    alpha: float = 4.0,
    threshold: float = 2.0,
    icp_rate: float = 0.1,
    groups: int = 1,
    embed_dim: int | None = None,
    embed_noise: bool = True,
    embed_learned: bool = True,
    optimizer: str = "adam",
    lr: float = 1e-3,
    eval_layers: list[int] | None = None,
    input_mean: float = MNIST_MEAN[0],
    input_std: float = MNIST_STD[0],
) -> NumpyNet:
    """A fresh device model with torch's default Linear initialisation (U(±1/√fan_in)), seeded.

    Defaults: goodness rule = ``symba-mlp`` (length norm, ICP, SymBa α=4, Adam 1e-3, all layers but the
    first predict); embed rule = dictionary as wide as the widest layer group, prediction by the sum over all layers.
    """
    if rule not in RULES:
        raise ModelError(f"unknown rule {rule!r}; choose one of {RULES}")
    if not widths or any(w < 1 for w in widths):
        raise ModelError("give at least one positive layer width")
    if optimizer not in ("adam", "sgd"):
        raise ModelError(f"unknown optimizer {optimizer!r}; choose adam or sgd")
    classes = [str(c) for c in (classes or range(10))]
    rng = np.random.default_rng(seed)
    k = len(classes)
    codes = embed = None
    n_in = input_dim
    if rule == "goodness" and label == "icp":
        codes = (rng.random((k, input_dim)) < icp_rate).astype(F32, copy=False)
        n_in += input_dim
    weights, biases = [], []
    for w in widths:
        bound = 1.0 / np.sqrt(n_in)
        weights.append(rng.uniform(-bound, bound, (w, n_in)).astype(F32, copy=False))
        biases.append(rng.uniform(-bound, bound, w).astype(F32, copy=False))
        n_in = w
    layers = [{"out": w, "norm": norm, "groups": groups if rule == "embed" else 1} for w in widths]
    if rule == "embed":
        dim = embed_dim or max(w // groups for w in widths)
        embed = rng.normal(size=(k, dim)).astype(F32, copy=False)
        default_eval = list(range(len(widths)))  # any layer predicts; together they do best
    else:
        default_eval = list(range(1, len(widths))) or [0]
    spec = {
        "format": "edgeff-device-model", "version": 1, "rule": rule, "input_dim": input_dim,
        "input_mean": input_mean, "input_std": input_std, "classes": classes, "layers": layers,
        "label": label, "loss": loss, "alpha": alpha, "threshold": threshold, "icp_rate": icp_rate,
        "embed_noise": embed_noise, "embed_learned": embed_learned, "optimizer": optimizer, "lr": lr,
        "eval_layers": eval_layers if eval_layers is not None else default_eval, "seed": seed,
    }
    net = NumpyNet(spec, weights, biases, codes, embed)
    net.validate()
    return net
