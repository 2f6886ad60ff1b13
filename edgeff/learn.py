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
from edgeff.trainer import fit

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
    path = Path(out) if out is not None else model.with_name(f"{model.stem}-learned{model.suffix or '.pt'}")
    meta = {**meta, "classes": list(learner.class_names), "replay": replay.state() if replay.capacity else None}
    checkpoint.save(learner, path, meta=meta)
    return LearnResult(path, len(new.y_train), tuple(grown), before, after, new_acc, len(replay), replay.nbytes())


__all__ = ["LearnResult", "learn"]
