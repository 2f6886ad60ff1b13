"""Memory per layer: accounted and measured, for layer-local training and for backprop on the same net.

Accounting (``account``) per local layer, at a batch size and dtype:

- ``params``, ``grads``: the layer's parameters (layer 1 also holds a learned label matrix) and their
  gradients, which exist only during its step (gradients are set to ``None`` between steps);
- ``optimizer``: Adam keeps two moments per parameter, SGD with momentum one;
- ``saved``: the activations autograd keeps for the layer's backward pass, counted exactly by
  running the layer's forward once under ``torch.autograd.graph.saved_tensors_hooks`` on a batch of
  the given size (2B rows: positives and negatives) and adding up the distinct tensors it saves;
- ``input``/``output``: the batch entering the layer and the detached batch it passes on;
- ``workspace``: temporaries of the step: the optimizer's (foreach Adam: about one copy of the
  parameters) and the backward pass's activation gradients (estimated as two copies of the layer's
  largest activation). This term is an estimate; the rest is exact.

Local training holds every parameter and the optimizer state its schedule keeps (every layer for
``all``/``olu``, the active layer only for ``greedy``) at all times, plus one layer's working set
(input, saved activations, gradients, output; an OLU pair's two layers at once). Backprop holds every
parameter and every layer's optimizer state, plus every layer's saved activations at once until the
backward pass (B rows, no negatives, and a linear head). The **physical limit** of layer-local
training is the greedy schedule's peak: all parameters, one layer's optimizer state, and the largest
single working set.

Measurement (``measure``) runs in a fresh subprocess with one thread, after a warm-up step. On CPU it
resets the peak resident set through ``/proc/self/clear_refs`` and reads ``VmHWM`` from
``/proc/self/status`` around each layer's step (and around the whole backprop step), so it reports the
step's peak above the resident baseline ("transient"). ``tracemalloc`` would not see torch's
allocations. On CUDA it uses ``torch.cuda.reset_peak_memory_stats``/``max_memory_allocated``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from edgeff.config import ModelConfig, TrainConfig
from edgeff.layers import make_block, out_shape

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
OPT_SLOTS = {"adam": 2, "adamw": 2, "sgd": 1}


@dataclass(frozen=True)
class LayerMemory:
    """Bytes one layer needs (local training, or its part of backprop)."""

    layer: int
    params: int
    grads: int
    optimizer: int
    saved: int
    input: int
    output: int
    # temporaries: the optimizer step's (torch's foreach Adam: about one copy of the params) and the
    # backward pass's activation gradients (estimated as two copies of the layer's largest activation)
    workspace: int

    @property
    def working_set(self) -> int:
        """What exists only while this layer steps: input, saved activations, gradients, output, and
        the optimizer step's temporaries."""
        return self.input + self.saved + self.grads + self.output + self.workspace


@dataclass(frozen=True)
class MemoryReport:
    """Accounted bytes for layer-local training and for backprop on the same architecture."""

    batch_size: int
    dtype: str
    schedule: str
    local: tuple[LayerMemory, ...]
    bp: tuple[LayerMemory, ...]  # the last entry is the linear head
    local_resident: int  # parameters + the optimizer state the schedule keeps
    local_peak: int  # resident + the largest working set
    physical_limit: int  # the greedy schedule's peak
    bp_resident: int
    bp_peak: int  # resident + input + every saved activation + all gradients + logits

    @property
    def local_transient(self) -> int:
        return self.local_peak - self.local_resident

    @property
    def bp_transient(self) -> int:
        return self.bp_peak - self.bp_resident

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(local_transient=self.local_transient, bp_transient=self.bp_transient)
        return d


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def saved_bytes(block: nn.Module, x: torch.Tensor, *, with_goodness: bool) -> tuple[int, int]:
    """Bytes of the distinct tensors autograd saves for ``block``'s backward on input ``x``, and the
    bytes of the largest intermediate activation.

    Parameters and the input saved for the backward pass are not counted: they exist anyway.
    """
    params = {p.data_ptr() for p in block.parameters()} | {x.untyped_storage().data_ptr()}  # resident anyway
    seen: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key[0] not in params:
            seen[key] = key[1]
        return t

    x = x.detach().requires_grad_(False)
    largest = [0]

    def track(_m: nn.Module, _i: Any, out: torch.Tensor) -> None:
        largest[0] = max(largest[0], out.numel() * out.element_size())

    handles = [m.register_forward_hook(track) for m in block]  # type: ignore[attr-defined]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            h = block(x)
            if with_goodness:
                h.pow(2).flatten(1).mean(1)
    finally:
        for hd in handles:
            hd.remove()
    return sum(seen.values()), largest[0]


def account(
    model: ModelConfig, train: TrainConfig, batch_size: int, *, dtype: str = "float32"
) -> MemoryReport:
    """Accounted memory of one training step at ``batch_size`` (see the module docstring)."""
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    tdt = DTYPES[dtype]
    item = torch.tensor([], dtype=tdt).element_size()
    slots_f = OPT_SLOTS[train.optimizer] * torch.tensor([], dtype=DTYPES[train.optim_state_dtype]).element_size() / item
    g = torch.Generator().manual_seed(0)
    kw = {"bn_momentum": model.bn_momentum, "bn_min_batch": model.bn_min_batch,
          "bn_always_running": model.bn_always_running}

    def layers_for(shape: tuple[int, ...], rows: int, local: bool) -> list[LayerMemory]:
        out: list[LayerMemory] = []
        for i, spec in enumerate(model.layers):
            block = make_block(spec, shape, g, **kw).to(tdt).train()  # type: ignore[arg-type]
            n = _numel(block)
            if local and i == 0 and model.label_learned:
                n += model.num_classes * model.input_shape[1] * model.input_shape[2]
            nxt = out_shape(spec, shape)
            x = torch.zeros(rows, *shape, dtype=tdt)
            saved, largest = saved_bytes(block, x, with_goodness=local)
            out.append(LayerMemory(
                layer=i + 1, params=n * item, grads=n * item, optimizer=int((slots_f if local else OPT_SLOTS[train.optimizer]) * n * item), saved=saved,
                input=rows * math.prod(shape) * item, output=rows * math.prod(nxt) * item,
                workspace=(n * item if train.optimizer in ("adam", "adamw") else 0) + 2 * largest))
            shape = nxt
        return out

    c, h, w = model.input_shape
    enc_shape = (c + (0 if model.label == "overlay" else 1), h, w)
    local = layers_for(enc_shape, 2 * batch_size, True)
    bp_layers = layers_for(model.input_shape, batch_size, False)
    feat = bp_layers[-1].output // batch_size // item
    head_n = feat * model.num_classes + model.num_classes
    head_saved = batch_size * feat * item  # the head's input
    bp = [*bp_layers, LayerMemory(len(bp_layers) + 1, head_n * item, head_n * item, OPT_SLOTS[train.optimizer] * head_n * item,
                                  head_saved, 0, batch_size * model.num_classes * item, 0)]
    buffers = 0 if model.label_learned or model.label == "overlay" else model.num_classes * h * w * item

    params = sum(m.params for m in local) + buffers

    def working(i: int, schedule: str) -> int:
        ws = local[i].working_set
        if schedule == "olu" and i > 0:  # a pair: the first layer's graph stays alive into the second
            ws = max(ws, local[i].working_set + local[i - 1].saved + local[i - 1].grads + local[i - 1].output)
        return ws

    def peak(schedule: str) -> tuple[int, int]:
        kept = max(m.optimizer for m in local) if schedule == "greedy" else sum(m.optimizer for m in local)
        resident = params + kept
        return resident, resident + max(working(i, schedule) for i in range(len(local)))

    local_resident, local_peak = peak(train.schedule)
    _, limit = peak("greedy")
    bp_resident = sum(m.params + m.optimizer for m in bp)
    bp_work = (sum(m.params for m in bp) if train.optimizer in ("adam", "adamw") else 0) + max(m.workspace - m.params
                                                                                      for m in bp_layers)
    bp_peak = bp_resident + bp[0].input + sum(m.saved + m.grads for m in bp) + bp[-1].output + bp_work
    return MemoryReport(batch_size, dtype, train.schedule, tuple(local), tuple(bp), local_resident, local_peak,
                        limit, bp_resident, bp_peak)


# --------------------------------------------------------------------------------------------- measured
def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _probe(cuda: bool) -> tuple[Any, Any]:
    def start() -> int:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated()
        _reset_peak()
        return _rss_kib("VmRSS") * 1024

    def stop(base: int) -> int:
        if cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - base
        return _rss_kib("VmHWM") * 1024 - base

    return start, stop


def measure_learner(learner: Any, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, Any]:
    """Train ``learner`` on ``batches`` and measure each step's transient peak (per layer for a
    layer-local ``Learner``) in this process. The first batch is a warm-up and is not measured."""
    from edgeff.trainer import Learner

    cuda = learner.device.type == "cuda"
    start, stop = _probe(cuda)
    x0, y0 = batches[0]
    learner.learn_many(x0, y0)
    method = "cuda.max_memory_allocated" if cuda else "VmHWM via /proc/self/clear_refs"
    if isinstance(learner, Learner):
        per_layer: dict[int, int] = {}
        bases: dict[int, int] = {}

        def hook(i: int, begin: bool) -> None:
            if begin:
                bases[i] = start()
            else:
                per_layer[i] = max(per_layer.get(i, 0), stop(bases[i]))

        learner.layer_hook = hook
        try:
            for x, y in batches[1:]:
                learner.learn_many(x, y)
        finally:
            learner.layer_hook = None
        layers = [per_layer.get(i, 0) for i in range(len(learner.net.local_layers))]
        return {"method": method, "layers": layers, "transient": max(layers)}
    peak = 0
    for x, y in batches[1:]:
        base = start()
        learner.learn_many(x, y)
        peak = max(peak, stop(base))
    return {"method": method, "layers": [], "transient": peak}


def _measure_here(model: ModelConfig, train: TrainConfig, batch_size: int, steps: int) -> dict[str, Any]:
    """Run in the measuring subprocess: per-layer transient peaks (local) and the whole-step peak (BP)."""
    from edgeff.baseline import BPLearner
    from edgeff.trainer import Learner

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, *model.input_shape, generator=g)
    y = torch.randint(0, model.num_classes, (batch_size,), generator=g)
    batches = [(x, y)] * (steps + 1)
    local = measure_learner(Learner(model, train), batches)
    bp = measure_learner(BPLearner(model, train), batches)
    return {"method": local["method"], "local_layers": local["layers"], "local_transient": local["transient"],
            "bp_transient": bp["transient"]}


def measure(model: ModelConfig, train: TrainConfig, batch_size: int, *, steps: int = 3) -> dict[str, Any]:
    """Measured transient peaks in a fresh subprocess (see the module docstring). CPU needs Linux /proc."""
    payload = json.dumps({"model": model.to_dict(), "train": train.to_dict(), "batch": batch_size, "steps": steps})
    code = ("import json, sys; from edgeff.memory import _measure_main; "
            "print(json.dumps(_measure_main(json.loads(sys.argv[1]))))")
    proc = subprocess.run([sys.executable, "-c", code, payload], capture_output=True, text=True, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                               # freed blocks go straight back to the OS, so the peak RSS sees every new allocation
                               "MALLOC_MMAP_THRESHOLD_": "4096", "MALLOC_TRIM_THRESHOLD_": "0", "MALLOC_TOP_PAD_": "0"})
    if proc.returncode != 0:
        raise RuntimeError(f"memory measurement failed: {proc.stderr.strip()[-2000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def _measure_main(p: dict[str, Any]) -> dict[str, Any]:
    model = ModelConfig.from_dict(p["model"])
    train = TrainConfig.from_dict(p["train"])
    return _measure_here(model, train, int(p["batch"]), int(p["steps"]))



def rows(report: MemoryReport, measured: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """One flat record per layer (KiB), local next to backprop, plus measured values when given."""
    out = []
    for i, m in enumerate(report.local):
        b = report.bp[i]
        r = {"layer": m.layer, "params_kib": m.params / 1024, "optimizer_kib": m.optimizer / 1024,
             "local_saved_kib": m.saved / 1024, "local_working_kib": m.working_set / 1024,
             "bp_saved_kib": b.saved / 1024}
        if measured is not None and measured.get("local_layers"):
            r["local_measured_kib"] = measured["local_layers"][i] / 1024
        out.append(r)
    return out


def plot(report: MemoryReport, path: str, measured: dict[str, Any] | None = None, title: str = "") -> None:
    """Grouped bars per layer: local working set (accounted, measured) and the layer's share under
    backprop (its saved activations, all live at once), plus the totals. Needs matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise RuntimeError("--plot needs matplotlib: pip install 'edgeff[plot]'") from e
    n = len(report.local)
    labels = [f"L{i + 1}" for i in range(n)] + ["peak"]
    mib = 1024 * 1024
    series = {
        "local, accounted": [m.working_set / mib for m in report.local] + [report.local_peak / mib],
        "backprop, accounted": [report.bp[i].saved / mib for i in range(n)] + [report.bp_peak / mib],
    }
    if measured is not None and measured.get("local_layers"):
        series["local, measured"] = [v / mib for v in measured["local_layers"]] + [
            (report.local_resident + measured["local_transient"]) / mib]
        series["backprop, measured"] = [0.0] * n + [(report.bp_resident + measured["bp_transient"]) / mib]
    fig, ax = plt.subplots(figsize=(1.2 * (n + 1) + 3, 4.5))
    width = 0.8 / len(series)
    for k, (name, vals) in enumerate(series.items()):
        ax.bar([i + (k - (len(series) - 1) / 2) * width for i in range(n + 1)], vals, width, label=name)
    ax.set_xticks(range(n + 1), labels)
    ax.set_ylabel("MiB")
    ax.set_title(title or f"training memory per layer, batch {report.batch_size}, {report.dtype}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
