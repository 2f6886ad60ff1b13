"""The edge runtime's file format: one ``.npz`` (no pickles), written atomically.

Arrays ``t:NAME`` hold every tensor under its torch state-dict name (``layers.0.block.2.weight``,
``encoder.patterns``, ``embed``, BN ``running_mean``/``running_var``); ``o:I:NAME:KEY`` the optimizer
state of layer I (torch's ``exp_avg``, ``exp_avg_sq``, ``momentum_buffer``); ``header`` a JSON
document with the configs, class names (in the model config), counters, learning rates, step counts,
the numpy generator's state and the user's ``meta``. ``edgeff.interchange`` converts it to and from
torch checkpoints, field for field.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from edgeff import __version__
from edgeff.config import ModelConfig, TrainConfig
from edgeff.edge.analytic import own
from edgeff.edge.learner import EdgeLearner
from edgeff.edge.optim import Optimizer
from edgeff.errors import CheckpointError
from edgeff.files import atomic_write

FORMAT = "edgeff-edge"
FORMAT_VERSION = 1
MAX_HEADER = 1 << 20  # bytes: a header is a few KiB; refuse absurd ones before parsing
MAX_MEMBERS = 4096  # arrays in a file (a 12-layer model with Adam state holds ~150)


def to_arrays(learner: EdgeLearner, meta: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
    """The learner as named arrays plus a JSON ``header`` (what ``save`` writes)."""
    arrays = {f"t:{n}": a for n, a in learner.arrays().items()}
    optim: list[dict[str, Any] | None] = []
    for i, layer in enumerate(learner.layers):
        if layer.opt is None:
            optim.append(None)
            continue
        for name, st in layer.opt.state.items():
            for key, a in st.items():
                arrays[f"o:{i}:{name}:{key}"] = a
        optim.append({"kind": layer.opt.kind, "params": learner.param_order(i), "steps": dict(layer.opt.steps)})
    header = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "edgeff_version": __version__, "kind": learner.kind,
        "model": learner.model_cfg.to_dict(), "train": learner.train_cfg.to_dict(), "step": learner.step,
        "samples_seen": learner.samples_seen, "lrs": [layer.lr for layer in learner.layers], "optim": optim,
        "rng": learner.rng.state, "meta": dict(meta or {}),
    }
    arrays["header"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
    return arrays


def from_arrays(arrays: dict[str, np.ndarray], *, adopt: bool = False) -> tuple[EdgeLearner, dict[str, Any]]:
    """Rebuild a learner from ``to_arrays`` output; returns it and its ``meta``. ``adopt``: the arrays become the
    learner's own where they can (arrays read from a file, held by nothing else)."""
    head = json.loads(bytes(arrays["header"]).decode())
    if head.get("format") != FORMAT:
        raise CheckpointError("not an edgeff edge model (convert a torch checkpoint with `edgeff-edge convert`)")
    if head.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"edge format {head.get('format_version')}; this edgeff reads {FORMAT_VERSION}")
    learner = EdgeLearner(ModelConfig.from_dict(head["model"]), TrainConfig.from_dict(head["train"]), fill=False)
    learner.load_arrays({k[2:]: v for k, v in arrays.items() if k.startswith("t:")}, adopt=adopt)
    learner.step, learner.samples_seen = int(head["step"]), int(head["samples_seen"])
    moments = any(k.startswith("o:") for k in arrays)  # none: read to predict only (``load(optimizer=False)``)
    for layer, lr, opt in zip(learner.layers, head["lrs"], head["optim"], strict=True):
        layer.set_lr(float(lr))
        if opt is None or not moments:
            continue
        o = Optimizer(opt["kind"], float(lr), learner.train_cfg.weight_decay)
        o.steps = {k: int(v) for k, v in opt["steps"].items()}
        prefix = f"o:{layer.index}:"
        for k, a in arrays.items():
            if k.startswith(prefix):
                name, key = k[len(prefix):].rsplit(":", 1)
                o.state.setdefault(name, {})[key] = own(a, np.float32) if adopt else np.asarray(a, np.float32).copy()
        layer.opt = o
    learner.rng.state = head["rng"]  # an older file's numpy state: a stream derived from it (edge.rand)
    return learner, dict(head.get("meta", {}))


WRITE_CHUNK = 1 << 20  # bytes of an array handed to the zip member at a time


def write_npz(f: Any, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez(f, **arrays)``'s file (stored members ``NAME.npy``, read back by ``np.load``) without its copies:
    ``np.savez`` hands each array to the zip member as ``tobytes()`` chunks of up to 16 MiB (a layer's weights or
    moments copied whole, at the end of a run); this writes views of 1 MiB."""
    with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, a in arrays.items():
            a = np.asarray(a, order="C")  # every array the runtime saves already is C-ordered (no copy)
            with zf.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array_header_1_0(member, np.lib.format.header_data_from_array_1_0(a))
                view = memoryview(a.reshape(-1)).cast("B") if a.size else memoryview(b"")
                for s in range(0, len(view), WRITE_CHUNK):
                    member.write(view[s : s + WRITE_CHUNK])


def save(learner: EdgeLearner, path: str | Path, *, meta: dict[str, Any] | None = None) -> Path:
    """Write ``learner`` to ``path`` atomically (temp file in the same folder, fsync, rename)."""
    arrays = to_arrays(learner, meta)
    return atomic_write(path, lambda f: write_npz(f, arrays))


def _declared(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> tuple[tuple[int, ...], np.dtype, int]:
    """A member's array shape, dtype and byte count, read from its ``.npy`` header alone (no data)."""
    with zf.open(info) as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(f, max_header_size=10_000)
        header_len = f.tell()
    if dtype.hasobject or dtype.kind not in "biuf":
        raise CheckpointError(f"array {info.filename} has dtype {dtype}; an edge model holds numbers only")
    nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if nbytes != info.file_size - header_len:  # checked before anything is allocated
        raise CheckpointError(f"array {info.filename} declares {shape} ({nbytes} bytes) but holds "
                              f"{info.file_size - header_len} bytes")
    return shape, dtype, nbytes


def planned_tensor_bytes(model: ModelConfig) -> int:
    """What a model config's weights take as float32 (the kinds' registered costs; torch-free, allocates nothing)."""
    from edgeff.kinds import numpy_kind

    shape: tuple[int, ...] = tuple(model.input_shape)
    total = 0
    for spec in model.layers:
        kind = numpy_kind(spec.kind)
        total += kind.cost(spec, shape).params * 4  # type: ignore[misc]
        shape = kind.out_shape(spec, shape)
    return total


def read_arrays(path: str | Path, *, optimizer: bool = True) -> dict[str, np.ndarray]:
    """The arrays of an edge model file (without the optimizer's moments when ``optimizer`` is False: they are
    never read). Every member's declared shape is checked against its stored size, and the model its header
    describes against the tensors the file holds, before anything is allocated. Raises ``CheckpointError`` for
    anything unreadable or inconsistent."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"edge model {path} does not exist; train one with `edgeff-edge train --out {path}`")
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            if len(infos) > MAX_MEMBERS:
                raise CheckpointError(f"{path} holds {len(infos)} arrays; an edge model has at most {MAX_MEMBERS}")
            names = {i.filename for i in infos}
            if "header.npy" not in names:
                if any(n.endswith("data.pkl") for n in names):
                    raise CheckpointError(f"{path} is a torch checkpoint; convert it first: `edgeff-edge convert {path} "
                                          f"{path.with_suffix('.npz')}` (on a machine with torch)")
                raise CheckpointError(f"{path} is not an edgeff edge model (it has no header)")
            info = zf.getinfo("header.npy")
            if info.file_size > MAX_HEADER:
                raise CheckpointError(f"{path}: header of {info.file_size} bytes is not an edge model's")
            declared = {i.filename: _declared(zf, i) for i in infos}
            with zf.open(info) as f:
                head = json.loads(np.lib.format.read_array(f, allow_pickle=False).tobytes().decode())
        tensors = sum(n for name, (_, _, n) in declared.items() if name.startswith("t:"))
        if isinstance(head, dict) and isinstance(head.get("model"), dict):
            planned = planned_tensor_bytes(ModelConfig.from_dict(head["model"]))
            if planned > tensors + (1 << 20):
                raise CheckpointError(f"{path}: its header describes a model of {planned / 2**20:.1f} MiB of weights "
                                      f"but the file holds {tensors / 2**20:.1f} MiB of tensors; it is not a "
                                      "consistent edge model")
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files if optimizer or not k.startswith("o:")}
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile, EOFError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not a readable edge model ({type(e).__name__}); it may be truncated or "
                              "not an edgeff edge file") from None


def load(path: str | Path, *, optimizer: bool = True) -> tuple[EdgeLearner, dict[str, Any]]:
    """Read an edge model file; returns the learner and its ``meta``. ``optimizer=False``: to predict only, the
    optimizer's moments stay on disk (the learner has none; saving it would drop them)."""
    try:
        return from_arrays(read_arrays(path, optimizer=optimizer), adopt=True)
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} does not match this edgeff version's edge format: {e}") from None


def to_bytes(learner: EdgeLearner, meta: dict[str, Any] | None = None) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **to_arrays(learner, meta))  # type: ignore[arg-type]
    return buf.getvalue()
