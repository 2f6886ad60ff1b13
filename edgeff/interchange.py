"""Torch learners <-> the numpy edge runtime, field for field.

A laptop trains with torch, a board continues with numpy, and the result comes back for ONNX export:
``to_edge`` and ``from_edge`` move the weights, BatchNorm statistics, label codes or dictionary, class
names (in the model config), each live optimizer's state (moments and step counts), learning rates
and counters. The random generators cannot move between runtimes (torch's and numpy's streams
differ): each side is re-seeded from (seed, step), so a converted learner is deterministic too.
``convert_file`` does the same for files: a torch checkpoint (``.pt``) becomes an edge model
(``.npz``) and back, ``meta`` included.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgeff.checkpoint import load as load_checkpoint
from edgeff.checkpoint import save as save_checkpoint
from edgeff.contract import LearnerBase, learner_class
from edgeff.edge.analytic import PENDING
from edgeff.edge.learner import EdgeLearner, UnsupportedError
from edgeff.edge.optim import Optimizer
from edgeff.edge.rand import Rng
from edgeff.edge.store import load as load_edge
from edgeff.edge.store import save as save_edge
from edgeff.files import check_output
from edgeff.kinds import numpy_kind


def to_edge(learner: LearnerBase) -> EdgeLearner:
    """The numpy ``EdgeLearner`` in the same state as a torch ``Learner`` or CFL ``ContrastiveLearner``.

    Raises:
        UnsupportedError: the learner uses something only torch implements (see ``edgeff.edge.learner``).
    """
    for spec in learner.model_cfg.layers:
        numpy_kind(spec.kind)  # a kind only torch runs: refused with its registered reason
    if not learner.supports("edge_runtime"):
        raise UnsupportedError(f"a {type(learner).__name__} cannot run on the edge runtime; it trains goodness, "
                               "CFL and streaming-LDA models")
    edge = EdgeLearner(learner.model_cfg, learner.train_cfg)
    arrays = {k: v.detach().cpu().numpy() if v.dtype in (torch.float64, torch.int64) else
              v.detach().cpu().float().numpy() for k, v in learner.net.state_dict().items()}
    if edge.predictor is not None:
        arrays.update(_lda_to_edge(learner.predictor))  # type: ignore[attr-defined]
    edge.load_arrays(arrays)
    edge.step, edge.samples_seen = learner.step, learner.samples_seen
    for i, (tl, el) in enumerate(zip(learner.net.local_layers, edge.layers, strict=True)):
        el.set_lr(tl.lr)
        if tl.opt is None:
            el.opt = None
            continue
        names = edge.param_order(i)
        opt = Optimizer(learner.train_cfg.optimizer, tl.lr)
        for j, st in tl.opt.state_dict()["state"].items():
            opt.steps[names[j]] = int(st["step"]) if "step" in st else learner.step
            opt.state[names[j]] = {k: v.detach().cpu().float().numpy().copy() for k, v in st.items() if k != "step"}
        el.opt = opt
    edge.rng = Rng([learner.train_cfg.seed, learner.step])
    edge.draws.rng = edge.rng
    return edge


def _lda_to_edge(predictor: Any) -> dict[str, np.ndarray]:
    """A torch ``LdaPredictor``'s state as the edge's arrays. Both keep the same sums; they differ in what waits
    in the pending block (torch: features and labels; numpy: features for the Gram matrix only), so the block
    is folded in: the same statistics, nothing pending."""
    gram, class_sum, count = predictor.stats.folded()
    state = predictor.state_dict()
    dim = gram.shape[0]
    return {"predictor.stats.class_sum": class_sum.numpy(), "predictor.stats.count": count.numpy(),
            "predictor.stats.gram": gram.numpy(), "predictor.stats.pending": np.zeros((PENDING, dim), np.float32),
            "predictor.stats.n_pending": np.zeros((), np.int64),
            "predictor.stats.imprint": state["stats.imprint"].float().numpy(),
            **{f"predictor.{n}": state[n].numpy() for n in ("window_x", "window_y", "window_seen")}}


def _lda_from_edge(arrays: dict[str, np.ndarray], template: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The edge's lda arrays as a torch predictor's state (``template``: its shapes and dtypes); the edge's
    pending features are folded into the Gram matrix (its sums and counts already hold them)."""
    n = int(arrays["predictor.stats.n_pending"])
    tail = np.asarray(arrays["predictor.stats.pending"][:n], np.float64)
    state = {k: v.clone().zero_() for k, v in template.items()}
    state["stats.gram"] = torch.from_numpy(np.asarray(arrays["predictor.stats.gram"], np.float64) + tail.T @ tail)
    for name in ("class_sum", "count", "imprint"):
        state[f"stats.{name}"] = torch.from_numpy(np.array(arrays[f"predictor.stats.{name}"])).to(template[f"stats.{name}"].dtype)
    for name in ("window_x", "window_y", "window_seen"):
        state[name] = torch.from_numpy(np.array(arrays[f"predictor.{name}"])).to(template[name].dtype)
    return state


def from_edge(edge: EdgeLearner) -> LearnerBase:
    """The torch learner in the same state as an ``EdgeLearner`` (for ONNX export, or more training)."""
    learner = learner_class(edge.kind)(edge.model_cfg, edge.train_cfg)
    sd = learner.net.state_dict()
    for name, a in edge.arrays().items():
        if name.startswith("predictor."):  # the lda predictor's, below
            continue
        sd[name] = torch.from_numpy(np.array(a)).to(sd[name].dtype) if name in sd else torch.from_numpy(np.array(a))
    learner.net.load_state_dict(sd)  # into the parameters the layers' optimizers were built on
    if edge.predictor is not None:
        learner.predictor.load_state_dict(_lda_from_edge(edge.arrays(), learner.predictor.state_dict()))  # type: ignore[attr-defined]
    learner.step, learner.samples_seen = edge.step, edge.samples_seen
    for i, (tl, el) in enumerate(zip(learner.net.local_layers, edge.layers, strict=True)):
        tl.set_lr(el.lr)
        if el.opt is None:
            continue
        opt = tl.ensure_optimizer()
        template = opt.state_dict()
        state = {}
        for j, name in enumerate(edge.param_order(i)):
            if name not in el.opt.state:
                continue
            st: dict[str, Any] = {k: torch.from_numpy(np.array(v, np.float32)) for k, v in el.opt.state[name].items()}
            if el.opt.kind != "sgd":
                st["step"] = torch.tensor(float(el.opt.steps.get(name, 0)))
            state[j] = st
        template["state"] = state
        opt.load_state_dict(template)
        tl.set_lr(el.lr)
    learner.generator.manual_seed(Rng([edge.train_cfg.seed, edge.step]).key >> 2)  # 62 bits of a seeded word
    return learner


def convert_file(src: str | Path, dst: str | Path) -> Path:
    """Convert a torch checkpoint (``.pt``) to an edge model (``.npz``) or back, by the suffix of ``dst``."""
    src, dst = Path(src), check_output(dst, (".npz", ".pt"), what="the output")
    if dst.suffix == ".npz":
        learner, meta = load_checkpoint(src, device="cpu")
        return save_edge(to_edge(learner), dst, meta=meta)
    edge, meta = load_edge(src)
    return save_checkpoint(from_edge(edge), dst, meta=meta)
