"""The numpy runtime's one memory model: what a model needs, in bytes, before anything is allocated.

``memory_plan`` reads a model's configs and the sizes of its arrays (as a file holds them, or as a learner holds
them: ``state_sizes``), so the device can check an upload against its budget from the file's table of contents
before it builds the model, and ``edgeff-edge`` and the docs use the same figures. The terms:

- ``resident``: every array the model keeps between steps: parameters, BatchNorm statistics, label codes and
  dictionaries, the closed-form statistics (per-class sums and the float64 Gram matrix of the analytic family
  or of an lda readout), the windows of recent samples, and the optimizer's moments (planned whether or not the
  first step has created them yet);
- per layer, ``train_working`` and ``infer_working``: what one layer's step (forward with its caches, backward,
  the optimizer's block) or one layer's forward pass holds at a batch size (the largest layer is the working set);
- ``solve``: what solving a closed-form readout adds (the covariance's lower blocks, factored and inverted in
  place: about half the Gram matrix's bytes; the readout itself);
- ``load``: reading a model file: the file, its unpacked arrays and the model built from them, together;
- ``save``: writing one (numpy copies an array into a buffer of at most 16 MiB as it writes it).

A request needs ``resident`` + the working set it runs (+ ``solve`` for a prediction of a closed-form readout);
``total`` is the largest need of training and predicting at ``batch`` and of loading the file.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgeff.config import ModelConfig, TrainConfig, readout_shape
from edgeff.edge.analytic import GRAM_ROWS, PENDING
from edgeff.edge.blocked import BLOCK as BLOCK_ROWS
from edgeff.edge.blocked import LowerBlocks
from edgeff.edge.learner import PlanTerms, check_supported, chunk_samples, numpy_class
from edgeff.edge.ops import cols_samples, out_shape
from edgeff.edge.optim import BLOCK
from edgeff.kinds import numpy_kind

F32, F64 = 4, 8
SAVE_BUFFER = 16 << 20  # numpy.lib.format.write_array's buffer (bytes of one array copied at a time)


def state_sizes(arrays: dict[str, np.ndarray]) -> dict[str, int]:
    """Bytes of each array, by name (``edgeff.edge.store.to_arrays`` names: ``t:…`` tensors, ``o:…`` moments)."""
    return {name: int(a.nbytes) for name, a in arrays.items() if name != "header"}


def _layer_working(model: ModelConfig, terms: PlanTerms, i: int, in_shape: tuple[int, ...], batch: int,
                   params: int) -> tuple[int, int]:
    """(train, infer) working bytes of layer ``i`` (``params`` bytes of weights) at ``batch`` samples."""
    spec = model.layers[i]
    rows_train = terms.train_rows * batch
    rows_infer = min(batch, chunk_samples(model, terms.input_shape, terms.infer_rows)) * terms.infer_rows
    n_in = int(np.prod(in_shape))
    cost = numpy_kind(spec.kind).cost(spec, in_shape)  # type: ignore[misc]
    n_out_pre = cost.pre_pool
    # unfolded patches (im2col) a few samples at a time, and in training their gradient and the whole weight's
    # (edgeff.edge.ops.Conv2d); a linear layer's gradient is read a block at a time (edgeff.edge.optim.Outer)
    cols_rows = min(rows_train, cols_samples(cost.patches))
    conv_grad = params if cost.patches else 0
    # the optimizer's scratch: a block of the gradient and one of its temporaries (edgeff.edge.optim)
    train = (F32 * (rows_train * (2 * n_in + 4 * n_out_pre) + 2 * cols_rows * cost.patches) + conv_grad
             + 2 * F32 * min(BLOCK, params // F32))
    infer = F32 * (rows_infer * (2 * n_in + 2 * n_out_pre) + min(rows_infer, cols_samples(cost.patches)) * cost.patches)
    if terms.frozen_body:  # the body only runs forward; its features go into the statistics
        train = F32 * (batch * (2 * n_in + 2 * n_out_pre) + min(batch, cols_samples(cost.patches)) * cost.patches)
    return train, infer


def memory_plan(model: ModelConfig, train: TrainConfig, sizes: dict[str, int], batch: int, *,
                file_bytes: int = 0) -> dict[str, Any]:
    """The plan of a model (configs and array sizes by name) at ``batch`` samples; ``file_bytes``: the size of the
    file it is loaded from (0: not loading). The family's part comes from its numpy learner's ``plan_terms``."""
    check_supported(model, train)  # the edge runtime trains it (or its one-line refusal)
    terms = numpy_class(model).plan_terms(model, train)
    c, h, w = model.input_shape
    shape: tuple[int, ...] = terms.input_shape
    tensors = {n[2:]: b for n, b in sizes.items() if n.startswith("t:")}
    moments = sum(b for n, b in sizes.items() if n.startswith("o:"))
    layers, shapes = [], []
    for i, spec in enumerate(model.layers):
        out = out_shape(spec, shape)
        params = sum(b for n, b in tensors.items() if n.startswith(f"layers.{i}.") and n.endswith((".weight", ".bias")))
        tw, iw = _layer_working(model, terms, i, shape, batch, params)
        layers.append({"layer": i, "params": params, "optimizer": terms.moments * params, "train_working": tw,
                       "infer_working": iw})
        shape = out
        shapes.append(out)
    labels = sum(b for n, b in tensors.items() if n.startswith(("encoder.", "embed")))
    planned_moments = sum(lay["optimizer"] for lay in layers) + terms.moments * (labels if terms.learned_labels else 0)
    stats_dim = sum(int(np.prod(readout_shape(shapes[i], terms.readout_size))) for i in terms.readout_layers)
    k = model.num_classes
    # the closed-form statistics and the readout's window of samples, as the model holds them
    stats = sum(b for n, b in tensors.items() if not n.startswith(("layers.", "encoder.", "embed")))
    windows = train.window * c * h * w * F32 * terms.window_views
    resident = sum(lay["params"] for lay in layers) + labels + max(moments, planned_moments) + stats + windows
    resident += sum(b for n, b in tensors.items() if n.startswith("layers.") and not n.endswith((".weight", ".bias")))
    # the covariance's lower blocks, factored and inverted in place (edgeff.edge.blocked), a few blocks' temporaries,
    # two D×K products and the readout
    solve = (LowerBlocks.nbytes_for(stats_dim) + 4 * BLOCK_ROWS * BLOCK_ROWS * F64 + stats_dim * k * (F32 + 3 * F64)
             if stats_dim else 0)
    # adding features to the statistics: the pending block in float64 and a band of the Gram matrix's update
    accumulate = (PENDING * stats_dim + GRAM_ROWS * stats_dim) * F64 if stats_dim else 0
    working_train = max(lay["train_working"] for lay in layers) + accumulate
    working_infer = max(lay["infer_working"] for lay in layers)
    unpacked = sum(sizes.values())
    # loading: the file, its arrays, the model built beside them (its arrays then taken over from the file's:
    # ``adopt``), the optimizer's moments copied from the file's; moments not in the file yet come with a first step
    built = resident - max(moments, planned_moments) + moments
    load = file_bytes + unpacked + built if file_bytes else 0
    need_train = resident + working_train
    need_infer = resident + solve + working_infer
    save = min(max(sizes.values(), default=0), SAVE_BUFFER)  # a moment array is as large as its weight
    return {"layers": layers, "labels": labels, "statistics": stats, "windows": windows, "resident": resident,
            "working": max(working_train, working_infer), "train": need_train, "infer": need_infer, "solve": solve,
            "load": load, "save": save, "total": max(need_train, need_infer, load, resident + save)}


def file_plan(blob: bytes | bytearray, batch: int = 1) -> dict[str, Any] | None:
    """``memory_plan`` of an edge file from its header and its table of contents (nothing else is read or built);
    None where the file has no edge header. Raises ``ValueError`` for a header that cannot be read."""
    import io
    import json
    import zipfile

    from edgeff.edge.store import FORMAT
    from edgeff.files import BytesReader

    with zipfile.ZipFile(BytesReader(blob) if isinstance(blob, bytearray) else io.BytesIO(blob)) as zf:
        sizes = {i.filename.removesuffix(".npy"): i.file_size for i in zf.infolist()}
        if "header" not in sizes or sizes["header"] > 1 << 20:
            return None
        with zf.open("header.npy") as f:
            head = json.loads(np.load(f, allow_pickle=False).tobytes().decode())
    if not isinstance(head, dict) or head.get("format") != FORMAT:
        return None
    model, train = ModelConfig.from_dict(head["model"]), TrainConfig.from_dict(head["train"])
    return memory_plan(model, train, {n: b for n, b in sizes.items() if n != "header"}, batch, file_bytes=len(blob))


def still_needed(learner: Any, batch: int, *, predict_only: bool = False) -> int:
    """Bytes a live learner still needs beyond the arrays it holds now, to train (and save, and predict) at
    ``batch`` samples, or only to predict (``predict_only``)."""
    from edgeff.edge.store import to_arrays

    arrays = to_arrays(learner)
    plan = memory_plan(learner.model_cfg, learner.train_cfg, state_sizes(arrays), batch)
    held = sum(a.nbytes for a in arrays.values())
    if predict_only:
        moments = plan["resident"] - held if not any(n.startswith("o:") for n in arrays) else 0
        return max(plan["infer"] - held - max(moments, 0), 0)
    return max(plan["total"] - held, 0)


def learner_plan(learner: Any, batch: int, *, file_bytes: int = 0) -> dict[str, Any]:
    """``memory_plan`` of a live ``EdgeLearner`` (its arrays as ``edgeff.edge.store.to_arrays`` names them)."""
    from edgeff.edge.store import to_arrays

    return memory_plan(learner.model_cfg, learner.train_cfg, state_sizes(to_arrays(learner)), batch,
                       file_bytes=file_bytes)
