"""Memory of a training step, layer-local next to backprop on the same net: accounted and measured.

**The quantity.** A step's *cost* is the peak memory of the step above the model and its optimizer state
(what the process holds anyway): gradients (whoever keeps them between steps), activations, outputs and
temporaries. Both methods are accounted and measured with this one definition, per layer and per step.

**Accounting** (``account``), per local layer, at a batch size and dtype:

- ``params``, ``grads``: the layer's parameters (layer 1 also holds a learned label matrix) and their
  gradients, which the frugal step frees right after the layer's step (the whole-batch and OLU steps
  free them only at the layer's next step, so every layer's gradients are live at once). The frugal
  step keeps a Linear weight's gradient as its factors (``edgeff.factored``: 2B rows of its input and
  output, where that is smaller than the gradient) plus one block of rows being built;
- ``optimizer``: state kept between steps (Adam two moments, SGD one momentum buffer), in its dtype;
- ``input``/``output``: the positive and negative batches entering the layer and leaving it (2B rows);
- ``saved``: the activations autograd keeps for one backward pass, counted exactly by running the block
  under ``torch.autograd.graph.saved_tensors_hooks`` and adding up the distinct storages it saves. The
  frugal step (``TrainConfig.frugal``) keeps one chunk's graph (``2 × chunk`` rows), the whole-batch
  step 2B rows, backprop B rows for every layer at once;
- ``workspace``: the backward pass's activation gradients (two copies of the largest activation of the
  rows in the graph: an estimate); the optimizer needs no scratch (torch's fused kernels, a block at a
  time: ``edgeff.optim``), a factored gradient's block of rows is counted with the gradients.

``local_live[i]`` is what is live while layer i trains: the step's input batch, the layer's input,
output, saved activations, gradients and workspace (an OLU pair adds the previous layer's graph, kept
alive by design). ``bp_live[i]`` is what backprop holds when its backward pass reaches layer i: the
activations saved by layers 1..i, the gradients of layers i..L and the head, and workspace. The step cost
is the largest of these (for backprop also: every gradient at once, as its optimizer steps). The **physical
limit** of layer-local training is the greedy schedule's: one layer's optimizer state.

**Measurement** (``measure_step``): after a warm-up step, every gradient is dropped and the resident set
(``rss_model``) read; then the peak over a few steps comes from the kernel (VmHWM after
``/proc/self/clear_refs``; on CUDA ``max_memory_allocated``), per layer through the learner's layer hook.
``measure`` (random batches) and ``measure_checkpoint`` (a trained checkpoint on real batches) do it in a
fresh 1-thread subprocess per method with glibc returning freed memory at once.
"""

from __future__ import annotations

import gc
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
from edgeff.errors import UnsupportedError
from edgeff.factored import pays
from edgeff.layers import RunningBatchNorm, make_block, out_shape
from edgeff.optim import factored_block

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
OPT_SLOTS = {"adam": 2, "adamw": 2, "sgd": 1}
# the environment of a measuring process: one thread, and freed memory goes straight back to the OS, so
# the peak resident set sees every new allocation
MEASURE_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
               "MALLOC_MMAP_THRESHOLD_": "4096", "MALLOC_TRIM_THRESHOLD_": "0", "MALLOC_TOP_PAD_": "0"}


@dataclass(frozen=True)
class LayerMemory:
    """Bytes one layer needs during a step (local training, or its part of backprop)."""

    layer: int
    params: int
    grads: int
    optimizer: int
    saved: int
    input: int
    output: int
    workspace: int  # activation gradients of the backward pass (estimate) + optimizer scratch

    @property
    def working_set(self) -> int:
        """What exists only while this layer steps: input, output, saved activations, gradients, workspace."""
        return self.input + self.saved + self.grads + self.output + self.workspace


@dataclass(frozen=True)
class MemoryReport:
    """Accounted bytes of a training step, layer-local and backprop on the same architecture."""

    batch_size: int
    dtype: str
    schedule: str
    step: str  # "frugal (chunks of N pairs)" | "whole batch" | "olu pairs"
    optim_state_dtype: str
    local: tuple[LayerMemory, ...]
    bp: tuple[LayerMemory, ...]  # the last entry is the linear head
    local_live: tuple[int, ...]  # per layer: bytes live above the resident set while it trains
    bp_live: tuple[int, ...]  # per layer: bytes backprop holds when its backward pass reaches it
    local_resident: int  # parameters + the optimizer state the schedule keeps
    local_step: int  # the step cost: max(local_live)
    bp_resident: int
    bp_step: int
    physical_limit: int  # the greedy schedule's peak (one layer's optimizer state)

    @property
    def local_peak(self) -> int:
        return self.local_resident + self.local_step

    @property
    def bp_peak(self) -> int:
        return self.bp_resident + self.bp_step

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(local_peak=self.local_peak, bp_peak=self.bp_peak)
        return d


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _saved_per_module(modules: list[nn.Module], run: Any, exclude: set[int]) -> tuple[list[int], list[int]]:
    """Run ``run()`` (a forward pass through ``modules`` in order) under saved-tensor hooks: the bytes of the
    distinct storages each module's part of the graph saves (storages in ``exclude`` and parameters are
    not counted: they exist anyway), and each module's largest output."""
    owner = [0]
    seen: dict[int, tuple[int, int]] = {}  # storage -> (module, bytes)
    largest = [0] * len(modules)
    params = {p.untyped_storage().data_ptr() for m in modules for p in m.parameters()} | exclude

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and ptr not in seen:
            seen[ptr] = (owner[0], t.untyped_storage().nbytes())
        return t

    def enter(k: int) -> Any:
        def hook(_m: nn.Module, _i: Any) -> None:
            owner[0] = k
        return hook

    def leave(k: int) -> Any:
        def hook(_m: nn.Module, _i: Any, out: torch.Tensor) -> None:
            largest[k] = max(largest[k], out.numel() * out.element_size())
        return hook

    handles = []
    for k, m in enumerate(modules):
        handles.append(m.register_forward_pre_hook(enter(k)))
        handles += [s.register_forward_hook(leave(k)) for s in m.modules()]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            run()
    finally:
        for h in handles:
            h.remove()
    saved = [0] * len(modules)
    for k, nbytes in seen.values():
        saved[k] += nbytes
    return saved, largest


def saved_bytes(block: nn.Module, x: torch.Tensor, *, with_goodness: bool, in_parts: bool = False) -> tuple[int, int]:
    """Bytes autograd saves for ``block``'s backward on input ``x`` (parameters and ``x`` itself not
    counted), and the bytes of its largest activation. ``in_parts``: as a step in parts runs it, its batch
    norms on statistics fixed beforehand (``RunningBatchNorm.prepare``)."""
    x = x.detach()
    bns = [m for m in block.modules() if isinstance(m, RunningBatchNorm)] if in_parts else []

    def run() -> None:
        for bn in bns:
            bn.prepare([x])
        try:
            h = block(x)
            if with_goodness:
                h.pow(2).flatten(1).mean(1)
        finally:
            for bn in bns:
                bn.release()

    saved, largest = _saved_per_module([block], run, {x.untyped_storage().data_ptr()})
    return saved[0], largest[0]


def step_kind(model: ModelConfig, train: TrainConfig) -> str:
    if train.schedule == "olu":
        return "olu pairs"
    if train.frugal and model.family == "local":
        return f"frugal (chunks of {train.chunk} pairs)" if train.chunk else "frugal (whole batch)"
    return "whole batch"


def account(model: ModelConfig, train: TrainConfig, batch_size: int, *, dtype: str = "float32") -> MemoryReport:
    """Accounted memory of one training step at ``batch_size`` (see the module docstring)."""
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    if model.family == "analytic":
        raise UnsupportedError("the memory accounting covers the gradient-trained families; a streaming-LDA "
                               "model holds its statistics (D x D float64) and a step only the body's activations: "
                               "measure it (--memory-report measures, bench/memory.py --process)")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    tdt = DTYPES[dtype]
    item = torch.tensor([], dtype=tdt).element_size()
    state_item = torch.tensor([], dtype=DTYPES[train.optim_state_dtype]).element_size()
    slots = OPT_SLOTS[train.optimizer]
    g = torch.Generator().manual_seed(0)
    kw = {"bn_momentum": model.bn_momentum, "bn_min_batch": model.bn_min_batch,
          "bn_always_running": model.bn_always_running}
    kind = step_kind(model, train)
    b = batch_size
    c, h, w = model.input_shape
    batch_bytes = b * c * h * w * item  # the step's input batch, alive throughout

    # ---- layer-local: 2B rows in and out; the graph of 2 x chunk rows (frugal) or 2B rows
    shape: tuple[int, ...] = (c + (0 if model.label == "overlay" else 1), h, w)
    local: list[LayerMemory] = []
    for i, spec in enumerate(model.layers):
        block = make_block(spec, shape, g, **kw).to(tdt).train()  # type: ignore[arg-type]
        n = _numel(block) + (model.num_classes * h * w if i == 0 and model.label_learned else 0)
        nxt = out_shape(spec, shape)
        chunked = kind.startswith("frugal") and not (spec.norm == "batch" and spec.order != "pre")
        rows = 2 * min(train.chunk or b, b) if chunked else 2 * b
        in_parts = chunked and rows < 2 * b and spec.norm == "batch"
        saved, largest = saved_bytes(block, torch.zeros(rows, *shape, dtype=tdt), with_goodness=True,
                                     in_parts=in_parts)
        grads = n
        if kind.startswith("frugal"):  # Linear weights whose factors (2B rows of input and output) cost
            # less than their gradient: those, and the gradient built a block of rows at a time
            for lin in (m for m in block.modules() if type(m) is nn.Linear and pays(m, 2 * b)):
                factors = 2 * b * (lin.in_features + lin.out_features)
                built = min(lin.weight.numel(), max(1, factored_block(factors) // lin.in_features) * lin.in_features)
                grads += factors - lin.weight.numel() + built
        local.append(LayerMemory(i + 1, n * item, grads * item, slots * n * state_item, saved,
                                 2 * b * math.prod(shape) * item, 2 * b * math.prod(nxt) * item,
                                 2 * largest))
        shape = nxt

    frugal = kind.startswith("frugal")

    def live(i: int) -> int:
        m = local[i]
        extra = 0
        if train.schedule == "olu" and i > 0:  # the pair's first layer keeps its graph into the second's loss
            p = local[i - 1]
            extra = p.saved + p.output
        if not frugal:  # gradients are freed only at a layer's next zero_grad: the other layers' stay alive
            extra += sum(o.grads for j, o in enumerate(local) if j != i and (train.schedule != "greedy"))
        return batch_bytes + m.working_set + extra

    local_live = tuple(live(i) for i in range(len(local)))
    params = sum(m.params for m in local) + (0 if model.label_learned or model.label == "overlay"
                                             else model.num_classes * h * w * item)  # ICP/channel buffers
    kept = max(m.optimizer for m in local) if train.schedule == "greedy" else sum(m.optimizer for m in local)
    greedy_kept = max(m.optimizer for m in local)

    # ---- backprop: the whole net's graph at B rows, every block's saved activations at once
    from edgeff.baseline import BPNet

    net = BPNet(model, g).to(tdt).train()
    x = torch.zeros(b, c, h, w, dtype=tdt)
    mods: list[nn.Module] = [*net.blocks, net.head]

    def run() -> None:
        torch.nn.functional.cross_entropy(net(x), torch.zeros(b, dtype=torch.long))

    bp_saved, bp_largest = _saved_per_module(mods, run, {x.untyped_storage().data_ptr()})
    bp = []
    for k, m in enumerate(mods):
        n = _numel(m)
        bp.append(LayerMemory(k + 1, n * item, n * item, slots * n * item, bp_saved[k], batch_bytes if k == 0 else 0,
                              bp_largest[k], 2 * bp_largest[k]))
    head = bp[-1]
    total_grads = sum(m.grads for m in bp)
    # the backward pass at block i: blocks 1..i's saved activations, the gradients of blocks i..L and the head
    bp_live = tuple(batch_bytes + sum(m.saved for m in bp[:i + 1]) + sum(m.grads for m in bp[i:]) + bp[i].workspace
                    for i in range(len(bp) - 1))
    top = batch_bytes + sum(m.saved for m in bp) + head.output  # the forward pass done: every graph and the logits
    bp_step = max(top, *bp_live, batch_bytes + total_grads)
    return MemoryReport(batch_size, dtype, train.schedule, kind, train.optim_state_dtype, tuple(local), tuple(bp),
                        local_live, bp_live, params + kept, max(local_live),
                        sum(m.params + m.optimizer for m in bp), bp_step, params + greedy_kept + max(local_live))


# --------------------------------------------------------------------------------------------- measured
def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def measure_step(learner: Any, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, Any]:
    """Train ``learner`` on ``batches`` in this process and measure each step's cost (see the module
    docstring): the first batch is a warm-up; every layer of a learner with a ``layer_hook`` is measured
    on its own. Returns bytes: ``step_cost``, ``layers`` (per layer, local learners), ``rss_model``,
    ``kept_between_steps`` (gradients a method keeps from one step to the next), ``step_cost_after_warmup``
    (the peak above the resident set before the steps, i.e. leaving those out) and ``peak_rss``."""
    cuda = learner.device.type == "cuda"

    def now() -> int:
        if cuda:
            torch.cuda.synchronize()
            return torch.cuda.memory_allocated()
        return _status("VmRSS")

    def reset() -> None:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            _reset_peak()

    def peak() -> int:
        if cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        return _status("VmHWM")

    x0, y0 = batches[0]
    learner.learn_many(x0, y0)  # warm-up: optimizer state, lazy imports
    gc.collect()
    kept = now()
    for p in learner.net.parameters():
        p.grad = None
    gc.collect()
    base = now()
    warm_peak = peak()
    per_layer: dict[int, int] = {}
    has_hook = hasattr(learner, "layer_hook")

    def hook(i: int, begin: bool) -> None:
        if begin:
            reset()
        else:
            per_layer[i] = max(per_layer.get(i, 0), peak() - base)

    if has_hook:
        learner.layer_hook = hook
    top = 0
    try:
        for x, y in batches[1:]:
            reset()
            learner.learn_many(x, y)
            top = max(top, peak(), *(v + base for v in per_layer.values()))
    finally:
        if has_hook:
            learner.layer_hook = None
    n_layers = len(getattr(learner.net, "local_layers", ())) if per_layer else 0
    layers = [per_layer.get(i) for i in range(n_layers)]  # None: the layer did not run (greedy, not reached yet)
    return {"method": "cuda.max_memory_allocated" if cuda else "VmHWM via /proc/self/clear_refs",
            "step_cost": top - base, "layers": layers, "rss_model": base, "kept_between_steps": kept - base,
            "step_cost_after_warmup": top - kept, "peak_rss": max(warm_peak, top)}


def _measure_main(p: dict[str, Any]) -> dict[str, Any]:
    """Run in the measuring subprocess: one method, random batches of the model's input shape."""
    from edgeff.presets import Preset, make_learner

    model = ModelConfig.from_dict(p["model"])
    train = TrainConfig.from_dict(p["train"])
    torch.set_num_threads(1)
    learner = make_learner(Preset("measured", "local", model, train, "", ""), backprop=p["method"] == "bp")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(p["batch"], *model.input_shape, generator=g)
    y = torch.randint(0, model.num_classes, (p["batch"],), generator=g)
    out = measure_step(learner, [(x, y)] * (p["steps"] + 1))
    out["dynamo_imported"] = "torch._dynamo" in sys.modules
    return out


def _measure_checkpoint_main(p: dict[str, Any]) -> dict[str, Any]:
    """Run in the measuring subprocess: a checkpoint's learner (or its backprop twin) on real batches."""
    from edgeff.checkpoint import load
    from edgeff.data import load_data
    from edgeff.presets import Preset, make_learner

    torch.set_num_threads(1)
    learner, _ = load(p["path"])
    if p["method"] == "bp" and learner.kind != "bp":
        learner = make_learner(Preset("twin", "local", learner.model_cfg, learner.train_cfg, "", ""), backprop=True)
    ds = load_data(p["data"], p["data_dir"])
    batches = list(ds.train_batches(p["batch"], seed=p["seed"], limit=(p["steps"] + 1) * p["batch"]))
    return measure_step(learner, batches)


def _in_subprocesses(main: str, payload: dict[str, Any], methods: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    out = {}
    for method in methods:
        code = (f"import json, sys; from edgeff.memory import {main}; "
                f"print(json.dumps({main}(json.loads(sys.argv[1]))))")
        proc = subprocess.run([sys.executable, "-c", code, json.dumps({**payload, "method": method})],
                              capture_output=True, text=True, check=False, env={**os.environ, **MEASURE_ENV})
        if proc.returncode != 0:
            raise RuntimeError(f"memory measurement failed: {proc.stderr.strip()[-2000:]}")
        out[method] = dict(json.loads(proc.stdout.strip().splitlines()[-1]))
    return out


def measure(model: ModelConfig, train: TrainConfig, batch_size: int, *, steps: int = 3,
            methods: tuple[str, ...] = ("local", "bp")) -> dict[str, dict[str, Any]]:
    """Measured step costs on random batches, one fresh subprocess per method (CPU needs Linux /proc):
    ``{method: result}`` with the fields of ``measure_step``."""
    return _in_subprocesses("_measure_main", {"model": model.to_dict(), "train": train.to_dict(),
                                              "batch": batch_size, "steps": steps}, methods)


def measure_checkpoint(path: str, data: str, data_dir: str | None, batch_size: int, *, seed: int = 1,
                       steps: int = 3, methods: tuple[str, ...] = ("local", "bp")) -> dict[str, dict[str, Any]]:
    """Measured step costs of a checkpoint's learner (``local``) and of its backprop twin (``bp``) on real
    batches of a data set, one fresh subprocess each (a long-lived process's allocator keeps freed memory,
    so its resident set no longer shows a step's peak)."""
    return _in_subprocesses("_measure_checkpoint_main", {"path": str(path), "data": data, "data_dir": data_dir,
                                                         "batch": batch_size, "seed": seed, "steps": steps}, methods)


def rows(report: MemoryReport, measured: dict[str, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """One flat record per layer (KiB): what is live while it trains, local next to backprop, with the
    local measurement when given; then a ``step`` row (the step cost of each, accounted and measured)."""
    out: list[dict[str, Any]] = []
    local_m = (measured or {}).get("local", {}).get("layers") or []
    for i, m in enumerate(report.local):
        r: dict[str, Any] = {"layer": str(m.layer), "params_kib": m.params / 1024, "optimizer_kib": m.optimizer / 1024,
                             "local_kib": report.local_live[i] / 1024}
        if local_m:
            r["local_measured_kib"] = None if i >= len(local_m) or local_m[i] is None else local_m[i] / 1024
        r["bp_kib"] = report.bp_live[i] / 1024
        if measured is not None and "bp" in measured:
            r["bp_measured_kib"] = None
        out.append(r)
    step: dict[str, Any] = {"layer": "step", "params_kib": sum(m.params for m in report.local) / 1024,
                            "optimizer_kib": sum(m.optimizer for m in report.local) / 1024,
                            "local_kib": report.local_step / 1024}
    if local_m or (measured and "local" in measured):
        step["local_measured_kib"] = measured["local"]["step_cost"] / 1024  # type: ignore[index]
    step["bp_kib"] = report.bp_step / 1024
    if measured is not None and "bp" in measured:
        step["bp_measured_kib"] = measured["bp"]["step_cost"] / 1024
    out.append(step)
    return out


def plot(report: MemoryReport, path: str, measured: dict[str, dict[str, Any]] | None = None, title: str = "") -> None:
    """Grouped bars per layer of the same quantity for both methods (bytes live while the layer trains,
    above the model and its optimizer state), then the step cost; measured bars where measured.
    Needs matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise RuntimeError("--plot needs matplotlib: pip install -e \".[plot]\"") from e
    n = len(report.local)
    labels = [f"L{i + 1}" for i in range(n)] + ["step"]
    mib = 1024 * 1024
    series: dict[str, list[float]] = {
        "local, accounted": [v / mib for v in report.local_live] + [report.local_step / mib],
        "backprop, accounted": [v / mib for v in report.bp_live] + [report.bp_step / mib]}
    if measured and "local" in measured:
        lm = measured["local"]
        per = [math.nan if v is None else v / mib for v in lm["layers"]] + [math.nan] * (n - len(lm["layers"]))
        series["local, measured"] = per[:n] + [lm["step_cost"] / mib]
    if measured and "bp" in measured:  # one backward pass: measured as a whole step only
        series["backprop, measured"] = [math.nan] * n + [measured["bp"]["step_cost"] / mib]
    fig, ax = plt.subplots(figsize=(1.2 * (n + 1) + 3, 4.5))
    width = 0.8 / len(series)
    for k, (name, vals) in enumerate(series.items()):
        ax.bar([i + (k - (len(series) - 1) / 2) * width for i in range(n + 1)], vals, width, label=name)
    ax.set_xticks(range(n + 1), labels)
    ax.set_ylabel("MiB above the model and its optimizer state")
    ax.set_title((title + "\n" if title else "") + f"schedule {report.schedule}, {report.step}, batch "
                 f"{report.batch_size}, {report.dtype}, optimizer state {report.optim_state_dtype}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
