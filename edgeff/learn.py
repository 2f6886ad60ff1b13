"""Continue learning from a checkpoint on new data: ``edgeff learn``.

The model meets the new stream once, batch by batch, growing a class for every class name it has not met
(initialised from that class's first examples), with experience replay: the buffer the checkpoint carries
(``meta["replay"]``, written by an earlier ``learn``), or a new one of ``buffer`` samples. The buffer goes
back into the written checkpoint, so the next session replays what this one saw. Old-class accuracy is
measured before and after on the test images of the old classes that the new data set holds, else on the
test set the checkpoint was trained on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgeff import checkpoint
from edgeff.continual import ReplayBuffer
from edgeff.data import ImageData, load_data
from edgeff.errors import DataNotFoundError, InputError
from edgeff.files import check_output
from edgeff.loop import fit

SEED_EXAMPLES = 20  # a new class's first examples, its initial row


@dataclass(frozen=True)
class LearnResult:
    path: Path
    samples: int
    new_classes: tuple[str, ...]
    old_before: float | None  # accuracy on old-class test images before and after (None: none available)
    old_after: float | None
    new_acc: float | None  # accuracy on the new classes' test images after
    buffer_size: int
    buffer_bytes: int


def _accuracy(learner: Any, data: ImageData, index: dict[str, int], classes: set[str]) -> float | None:
    """Accuracy of ``learner`` on ``data``'s test images of ``classes`` (learner indices by name)."""
    keep = np.isin(data.y_test, [i for i, c in enumerate(data.classes) if c in classes])
    if not keep.any():
        return None
    x = data.normalise(data.x_test[keep])
    want = torch.tensor([index[data.classes[int(v)]] for v in data.y_test[keep]])
    hits = sum(int((learner.predict_many(x[i : i + 500]) == want[i : i + 500]).sum()) for i in range(0, len(want), 500))
    return hits / len(want)


def learn(model: str | Path, data: str, *, data_dir: str | Path | None = None, buffer: int | None = None,
          batch_size: int = 10, out: str | Path | None = None, seed: int = 0,
          on_step: Callable[[Any, int], None] | None = None) -> LearnResult:
    """One pass of ``model`` (a checkpoint) over ``data``'s training images with replay; writes ``out``
    (default: the checkpoint's name + ``-learned``, beside it; pass the checkpoint itself to overwrite)."""
    if batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {batch_size}")
    if buffer is not None and buffer < 0:
        raise InputError(f"--buffer must be 0 or more samples, got {buffer}")
    model = Path(model)
    target = check_output(Path(out) if out is not None else model.with_name(f"{model.stem}-learned{model.suffix or '.pt'}"))
    learner, meta = checkpoint.load(model, device="cpu")
    shape = learner.model_cfg.input_shape
    new = load_data(data, data_dir, input_shape=shape)
    old_names = set(learner.class_names)
    try:  # the old classes' own test set, for when the new data holds none of them
        old = load_data(str(meta.get("dataset", "builtin")), data_dir, input_shape=shape)
    except (DataNotFoundError, InputError):
        old = None
    index = {name: i for i, name in enumerate(learner.class_names)}
    ref = new if old_names & set(new.classes) else old
    before = None if ref is None else _accuracy(learner, ref, index, old_names)
    grown = []
    for k, name in enumerate(new.classes):  # classes met for the first time: a new row from their first examples
        if name not in index:
            x0 = new.normalise(new.x_train[new.y_train == k][:SEED_EXAMPLES])
            index[name] = learner.add_class(name, examples=x0 if len(x0) else None)
            grown.append(name)
    saved = meta.get("replay")
    replay = ReplayBuffer.from_state(saved, buffer) if saved is not None else ReplayBuffer(buffer or 0, seed=seed,
                                                                                           asymmetric=True)
    to_model = torch.tensor([index[c] for c in new.classes])
    batches = ((x, to_model[y]) for x, y in new.train_batches(batch_size, seed=seed))
    fit(learner, batches, on_step=on_step, replay=replay if replay.capacity else None)
    after = None if ref is None else _accuracy(learner, ref, index, old_names)
    new_acc = _accuracy(learner, new, index, set(grown)) if grown else None
    path = target
    meta = {**meta, "classes": list(learner.class_names), "replay": replay.state() if replay.capacity else None}
    checkpoint.save(learner, path, meta=meta)
    return LearnResult(path, len(new.y_train), tuple(grown), before, after, new_acc, len(replay), replay.nbytes())


@dataclass(frozen=True)
class AddResult:
    path: Path
    index: int  # the new class's index
    old_before: float | None  # accuracy on the old classes' test images before and after (None: none available)
    old_after: float | None
    examples_hit: int  # of the examples themselves, how many are predicted as the new class after
    held_out_recall: float | None  # recall on held-out examples of the new class (None: none given)
    replay: str  # where the replayed samples came from ("checkpoint", a data set, "none", or "closed form")
    steps: int


def _replay_from(learner: Any, data: ImageData, index: dict[str, int], capacity: int, seed: int) -> ReplayBuffer:
    """A class-balanced buffer of ``capacity`` samples drawn from ``data``'s training images of the classes
    the learner knows (learner indices by name)."""
    buf = ReplayBuffer(capacity, seed=seed, policy="balanced", asymmetric=True)
    known = [k for k, c in enumerate(data.classes) if c in index]
    rows = np.flatnonzero(np.isin(data.y_train, known))
    if not len(rows):
        raise InputError(f"the replay data holds none of the model's classes ({', '.join(sorted(index))})")
    rows = np.random.default_rng(seed).permutation(rows)[: 20 * capacity]
    to_model = torch.tensor([index.get(c, -1) for c in data.classes])
    for i in range(0, len(rows), 500):
        part = np.sort(rows[i : i + 500])
        buf.add(data.normalise(data.x_train[part]), to_model[torch.from_numpy(data.y_train[part].astype(np.int64))])
    return buf


def add_class(model: str | Path, name: str, examples: torch.Tensor, *, out: str | Path, held_out: torch.Tensor | None = None,
              replay_data: str | None = None, data_dir: str | Path | None = None, buffer: int = 500, passes: int = 10,
              batch_size: int = 10, mix: int | None = None, seed: int = 0) -> AddResult:
    """Add class ``name`` to the model in checkpoint ``model`` from its ``examples`` (N, C, H, W normalised)
    and learn it with replay so the old classes keep their accuracy; writes ``out``.

    The class starts from the examples' mean feature (``add_class`` on the learner), then ``passes`` passes
    over the examples in batches of ``batch_size``, each batch mixed with replayed old samples in the
    proportion one class has among all of them (``batch_size`` × the old class count), so the new class is
    learned without being over-weighted. Replay comes from the buffer the checkpoint carries (written by
    ``edgeff learn``), else from ``replay_data`` (a data set name or image folder; a class-balanced buffer
    of ``buffer`` samples of the old classes), else from the data set the checkpoint was trained on; with
    none available the class is only imprinted. Old-class accuracy is measured before and after on that
    data's test images; ``held_out`` examples give the new class's recall. ``mix`` overrides the replayed
    samples per new example (default: the old class count). The examples join the buffer, which is saved in
    the written checkpoint with its own replay settings (``edgeff learn`` restores them)."""
    if passes < 0 or batch_size < 1 or buffer < 0:
        raise InputError("--passes must be >= 0, --batch-size >= 1 and --buffer >= 0")
    model = Path(model)
    learner, meta = checkpoint.load(model, device="cpu")
    shape = learner.model_cfg.input_shape
    index = {c: i for i, c in enumerate(learner.class_names)}
    old_names = set(index)
    source = replay_data or meta.get("dataset")
    try:
        ref = load_data(str(source), data_dir, input_shape=shape) if source else None
    except (DataNotFoundError, InputError):
        if replay_data:
            raise
        ref = None
    before = None if ref is None else _accuracy(learner, ref, index, old_names)
    saved = meta.get("replay")
    if saved is not None:
        replay, origin = ReplayBuffer.from_state(saved), "checkpoint"
    elif ref is not None and buffer and not learner.exact_once:
        replay, origin = _replay_from(learner, ref, index, buffer, seed), str(source)
    else:
        replay, origin = None, "none"
    if learner.exact_once:  # closed form: the old classes' statistics do not change; each example counts once
        origin, passes = "closed form", min(passes, 1)
    new = learner.add_class(name, examples=examples)
    steps = 0
    if passes and (replay is not None or learner.exact_once):
        if replay is not None:
            kept = replay.batch, replay.asymmetric  # the buffer's own settings go back into the checkpoint
            replay.batch = batch_size * (mix or len(old_names))
            replay.asymmetric = False  # a batch of one new class: its softmax must meet the old classes
        gen = torch.Generator().manual_seed(seed)
        labels = torch.full((examples.shape[0],), new, dtype=torch.long)
        for _ in range(passes):
            order = torch.randperm(examples.shape[0], generator=gen)
            batches = [(examples[order[i : i + batch_size]], labels[order[i : i + batch_size]])
                       for i in range(0, examples.shape[0], batch_size)]
            fit(learner, batches, replay=replay)
            steps += len(batches)
        if replay is not None:
            replay.batch, replay.asymmetric = kept
    after = None if ref is None else _accuracy(learner, ref, index, old_names)
    hit = int((learner.predict_many(examples) == new).sum())
    recall = None if held_out is None else float((learner.predict_many(held_out) == new).float().mean())
    meta = {**meta, "classes": list(learner.class_names), "replay": None if replay is None else replay.state()}
    path = checkpoint.save(learner, out, meta=meta)
    return AddResult(Path(path), new, before, after, hit, recall, origin, steps)


__all__ = ["AddResult", "LearnResult", "add_class", "learn"]
