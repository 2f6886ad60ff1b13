"""A layer pipeline on torch.distributed: each rank trains its own block of layers.

Layer-local training sends nothing backwards, so layers can live on different hosts and only activations
flow forward. Under ``torchrun --nproc-per-node N`` (or ``--nnodes``/``--rdzv-endpoint`` across hosts), rank
0 reads the stream, draws the negatives, encodes the labels and trains the first block with the frugal
step; it sends the block's detached outputs (positives, negatives) and the step's header (rows, step,
learning rate) to rank 1 with point-to-point ``isend``/``recv`` (gloo on CPUs, NCCL on GPUs); each rank
trains its block with its own optimizers and passes its outputs on.

**Semantics.** A local layer's input is the previous layer's output computed *before* that layer's step
(``Learner.learn_many`` does the same in one process), so the pipeline computes exactly the single-process
updates: in ``lockstep`` mode (every rank finishes step t before rank 0 starts t+1) and in ``overlap`` mode
(rank 0 runs up to one step ahead, its sends in flight while it trains the next batch) alike — rank k's
input for step t was computed by rank k-1's weights at the start of step t, never staler. The
goodness family (FF, SymBa, Trifecta under ``--schedule all``) runs in the pipeline; the contrastive
presets share a label dictionary across layers and backprop sends gradients back, so both are refused.

**Checkpoints.** Every ``checkpoint_every`` steps all ranks meet at a barrier, each writes its own file
(``OUT.rankK.{0,1}.pt``, alternating slots, atomic), meets the others again and commits the save in its
``OUT.rankK.json``; a restarted run (``torchrun --max-restarts``) resumes every rank from the newest save all
ranks committed, split as it was saved (a rank's save holds only its own block's training). At the end the ranks send their blocks to rank 0, which writes one ordinary checkpoint
``OUT`` (``edgeff eval`` reads it). Each rank builds the whole net from the preset's seed and trains (and
keeps optimizer state for) its block only.

**Prediction.** Goodness needs every layer's goodness for every label: rank 0 encodes the test batch once
per label, each rank runs its block and returns its layers' goodness to rank 0, which sums the chosen
layers and takes the arg-max (``evaluate``).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from edgeff.config import select_layers
from edgeff.errors import InputError
from edgeff.labelled import PairSource, TensorPairs
from edgeff.loop import planned_batches
from edgeff.losses import goodness

MODES = ("overlap", "lockstep")


@dataclass(frozen=True)
class PipelineResult:
    """What rank 0 reports after a pipeline run."""

    samples: int
    seconds: float
    samples_per_s: float
    test_acc: float | None
    split: tuple[tuple[int, int], ...]
    merged: Path | None


def rank_file(out: Path, rank: int, slot: int) -> Path:
    """Rank ``rank``'s checkpoint in one of two slots (saves alternate, so the last committed one survives a
    crash in the middle of the next)."""
    return out.with_name(f"{out.stem}.rank{rank}.{slot}{out.suffix}")


def _marker(out: Path, rank: int) -> Path:
    return out.with_name(f"{out.stem}.rank{rank}.json")


def _committed(out: Path, rank: int) -> list[list[int]]:
    """This rank's last two committed saves, newest first: [[step, slot], ...]."""
    import json

    try:
        return [list(map(int, e)) for e in json.loads(_marker(out, rank).read_text())["committed"]]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def balanced_split(costs: list[float], ranks: int) -> list[tuple[int, int]]:
    """Contiguous blocks of layers, one per rank, minimising the slowest block's total cost (exhaustive over
    the cut points: a net has a handful of layers)."""
    n = len(costs)
    if not 1 <= ranks <= n:
        raise InputError(f"{ranks} ranks cannot each train a block of a {n}-layer net; use at most {n}")
    best: tuple[float, list[tuple[int, int]]] | None = None

    def cuts(start: int, left: int) -> list[list[int]]:
        if left == 1:
            return [[n]]
        return [[c, *rest] for c in range(start + 1, n - left + 2) for rest in cuts(c, left - 1)]

    for ends in cuts(0, ranks):
        blocks = list(zip([0, *ends[:-1]], ends, strict=True))
        worst = max(sum(costs[a:b]) for a, b in blocks)
        if best is None or worst < best[0]:
            best = (worst, blocks)
    assert best is not None
    return best[1]


def _spell(blocks: list[tuple[int, int]]) -> str:
    """A split as ``--pipeline-split`` takes it: each rank's layer count, comma-separated."""
    return ",".join(str(b - a) for a, b in blocks)


def parse_split(text: str, n_layers: int, ranks: int) -> list[tuple[int, int]]:
    """``"2,2"`` (layers per rank) -> [(0, 2), (2, 4)]."""
    try:
        sizes = [int(v) for v in text.split(",")]
    except ValueError:
        raise InputError(f"--pipeline-split takes layers per rank, e.g. 2,2; got {text!r}") from None
    if len(sizes) != ranks or sum(sizes) != n_layers or min(sizes) < 1:
        raise InputError(f"--pipeline-split {text} must give each of the {ranks} ranks at least one layer, "
                         f"{n_layers} in all")
    ends = [sum(sizes[: i + 1]) for i in range(ranks)]
    return list(zip([0, *ends[:-1]], ends, strict=True))


def measure_costs(learner: Any, x: torch.Tensor, y: torch.Tensor) -> list[float]:
    """Seconds of one frugal step of each layer on a batch (after a warm-up), rank 0's encoding counted in
    layer 1's: the balance of a split. The learner's state is restored afterwards."""
    import copy

    probe = copy.deepcopy(learner)
    costs: list[float] = []
    for _ in range(2):  # the first pass warms up (optimizer state, allocations)
        t0 = time.perf_counter()
        src: PairSource = probe.encode_batch(x, y)
        costs = [time.perf_counter() - t0]  # rank 0 also encodes: counted with layer 1
        for i in range(len(probe.net.layers)):
            t0 = time.perf_counter()
            _, hp, hn = probe.learn_block(src, i, i + 1)
            src = TensorPairs(hp, hn)
            costs.append(time.perf_counter() - t0)
        costs = [costs[0] + costs[1], *costs[2:]]
    return costs


class _Link:
    """Point-to-point transfers of one step's tensors between neighbouring ranks."""

    def __init__(self, overlap: bool) -> None:
        self.overlap = overlap
        self.pending: list[Any] = []

    def send(self, header: torch.Tensor, tensors: list[torch.Tensor], dst: int) -> None:
        for w in self.pending:  # at most one step in flight: the previous sends have landed
            w.wait()
        self.pending = []
        if self.overlap:
            self.pending = [dist.isend(header, dst)] + [dist.isend(t.contiguous(), dst) for t in tensors]
        else:
            dist.send(header, dst)
            for t in tensors:
                dist.send(t.contiguous(), dst)

    def flush(self) -> None:
        for w in self.pending:
            w.wait()
        self.pending = []

    @staticmethod
    def recv_header(src: int) -> torch.Tensor:
        header = torch.zeros(3, dtype=torch.float64)
        dist.recv(header, src)
        return header

    @staticmethod
    def recv(shape: tuple[int, ...], src: int) -> torch.Tensor:
        t = torch.empty(shape)
        dist.recv(t, src)
        return t


def _init_group() -> None:
    """gloo (CPU tensors) on the rendezvous torchrun set up. Keys are prefixed with the restart count: after
    ``torchrun --max-restarts`` restarts the workers, a new round must not read the dead round's addresses."""
    from datetime import timedelta

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                          timeout=timedelta(seconds=120)) if "TORCHELASTIC_RUN_ID" in os.environ else None
    if store is None:  # a plain launch: let env:// host the store
        dist.init_process_group("gloo", rank=rank, world_size=world)
        return
    dist.init_process_group("gloo", store=dist.PrefixStore(f"edgeff-pipeline/{restart}/", store), rank=rank,
                            world_size=world)


def _check(learner: Any) -> None:
    if not learner.supports("pipeline"):  # the goodness family only
        raise InputError("the layer pipeline trains goodness presets (ff-mlp, symba-mlp, symba-mlp4, trifecta-cnn); "
                         "backprop sends gradients back through every layer and the contrastive presets share a "
                         "label dictionary across layers")
    if learner.train_cfg.schedule != "all":
        raise InputError(f"the layer pipeline trains every layer every step: use --schedule all, not "
                         f"{learner.train_cfg.schedule}")
    if learner.predictor.kind != "goodness":
        raise InputError("the layer pipeline predicts by goodness; the head predictor is not supported")
    if learner.train_cfg.window:
        raise InputError("the layer pipeline streams each sample once: --window is not supported with --pipeline")


def run(preset: str, data_name: str = "builtin", data_dir: Path | None = None, *, epochs: int | None = None,
        batch_size: int | None = None, samples: int | None = None, out: Path | None = None, seed: int = 0,
        mode: str = "overlap", split: str | None = None, checkpoint_every: int = 200, resume: bool = False,
        evaluate_after: bool = True, train_overrides: dict[str, Any] | None = None,
        on_step: Any = None) -> PipelineResult | None:
    """Train ``preset`` as a layer pipeline on every rank of the initialised process group (call it on each
    rank; ``torchrun`` sets the group up). Returns the result on rank 0, None elsewhere."""
    from edgeff import checkpoint
    from edgeff.data import load_data
    from edgeff.presets import for_data, get_preset, make_learner
    from edgeff.spec import RunOptions, check_options, recipe

    if mode not in MODES:
        raise InputError(f"unknown pipeline mode {mode!r}; choose {' or '.join(MODES)}")
    if not dist.is_initialized():
        _init_group()
    rank, world = dist.get_rank(), dist.get_world_size()
    out = Path(out) if out is not None else Path("runs") / f"{preset}.pipeline.pt"
    # the run's specification, as edgeff train builds it (edgeff.spec); the pipeline takes no window (a batch-1
    # run's stream recipe would add one)
    spec = RunOptions(preset=preset, data=data_name, data_dir=data_dir, epochs=epochs, batch_size=batch_size,
                      samples=samples, seed=seed, device="cpu", **{"window": 0, **(train_overrides or {})})
    check_options(spec, out, "torch")
    r = recipe(for_data(get_preset(preset), data_name), spec, "torch")
    p, tc = r.preset, r.train
    ds = load_data(data_name, data_dir)
    n_epochs = epochs if epochs is not None else tc.epochs
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    committed = _committed(out, rank) if (resume or restarted) else []
    # every rank resumes from the newest save that every rank committed (a crash between a save's two
    # barriers leaves some ranks one save ahead; their previous slot still holds the common one)
    at = torch.tensor([committed[0][0] if committed else 0], dtype=torch.int64)
    dist.all_reduce(at, op=dist.ReduceOp.MIN)
    target = int(at[0])
    slot = next((sl for st, sl in committed if st == target), None)
    if target > 0 and slot is None:
        raise InputError(f"rank {rank} has no save of step {target} beside {out}; delete the rank files to start over")
    learner: Any  # a goodness Learner (``_check``): its block step and layer-1 encoding are used below
    saved_blocks: list[tuple[int, int]] | None = None
    if target > 0:
        learner, saved = checkpoint.load(rank_file(out, rank, slot), device="cpu")  # type: ignore[arg-type]
        committed = [e for e in committed if e[0] <= target]
        saved_blocks = [(int(a), int(b)) for a, b in saved["pipeline"]["blocks"]]
        if len(saved_blocks) != world:
            raise InputError(f"the saved run at {out} was split over {len(saved_blocks)} ranks, not {world}; resume it "
                             "with as many ranks, or delete the rank files to start over")
    else:
        learner = make_learner(p, input_shape=ds.input_shape, num_classes=len(ds.classes), train=tc)
        committed = []
    _check(learner)
    n_layers = len(learner.net.layers)
    # the split: a resumed run keeps its saved split (each rank's save holds only its own block's training;
    # a fresh measurement may split differently); else given, or balanced by the layers' measured cost (rank 0
    # measures, everyone receives it)
    if saved_blocks is not None:
        if split is not None and parse_split(split, n_layers, world) != saved_blocks:
            raise InputError(f"the saved run at {out} was split {_spell(saved_blocks)}, not {split!r}: a resumed "
                             "run keeps its split (leave --pipeline-split out)")
        blocks = saved_blocks
    elif split is not None:
        blocks = parse_split(split, n_layers, world)
    else:
        costs = torch.zeros(n_layers, dtype=torch.float64)
        if rank == 0:
            x0, y0 = next(iter(ds.train_batches(tc.batch_size, seed=seed)))
            costs = torch.tensor(measure_costs(learner, x0, y0), dtype=torch.float64)
        dist.broadcast(costs, 0)
        blocks = balanced_split(costs.tolist(), world)
    start, stop = blocks[rank]
    link = _Link(mode == "overlap")
    meta = {"dataset": ds.name, "classes": list(ds.classes), "mean": list(ds.mean), "std": list(ds.std),
            "preset": preset, "pipeline": {"rank": rank, "ranks": world, "blocks": blocks, "mode": mode}}

    def sync_save() -> None:
        """A two-phase save: every rank writes the free slot, meets the others, then commits it."""
        import json

        from edgeff.files import atomic_write

        link.flush()
        dist.barrier()  # every rank has finished the same step
        free = 1 - committed[0][1] if committed else 0
        checkpoint.save(learner, rank_file(out, rank, free), meta=meta)
        dist.barrier()  # every rank has written it
        committed[:] = [[learner.step, free], *committed[:1]]
        text = json.dumps({"committed": committed}).encode()
        atomic_write(_marker(out, rank), lambda f: f.write(text))

    t0 = time.perf_counter()
    first_seen = learner.samples_seen
    if rank == 0:
        stream = planned_batches(learner.train_cfg, learner.samples_seen, ds, epochs=n_epochs,
                                 batch_size=tc.batch_size, seed=seed, limit=samples)
    while True:
        if rank == 0:
            item = next(stream, None)
            if item is None:
                header = torch.tensor([0.0, learner.step, 0.0], dtype=torch.float64)
                if world > 1:
                    link.send(header, [], 1)
                break
            x, y, lr, _ = item
            src = learner.encode_batch(x, y)
            header = torch.tensor([src.b, learner.step, -1.0 if lr is None else lr], dtype=torch.float64)
        else:
            header = link.recv_header(rank - 1)
            if header[0] == 0:
                if rank < world - 1:
                    link.send(header, [], rank + 1)
                break
            rows = int(header[0])
            shape = learner.net.encoder.out_shape() if start == 0 else learner.net.shapes[start - 1]
            hp = link.recv((rows, *shape), rank - 1)
            hn = link.recv((rows, *shape), rank - 1)
            src = TensorPairs(hp, hn)
        if header[2] >= 0:
            for layer in learner.net.local_layers[start:stop]:
                layer.set_lr(float(header[2]))
        metrics, hp, hn = learner.learn_block(src, start, stop)
        if rank < world - 1:
            link.send(header, [hp, hn], rank + 1)
        learner.step += 1
        learner.samples_seen += int(header[0])
        if on_step is not None and rank == 0:
            on_step(metrics, int(header[0]))
        if mode == "lockstep":
            link.flush()
            dist.barrier()
        if checkpoint_every and learner.step % checkpoint_every == 0:
            sync_save()
    link.flush()
    seconds = time.perf_counter() - t0
    if not committed or committed[0][0] != learner.step:  # the last step may just have been saved
        sync_save()
    merged = gather_merge(learner, blocks, out, meta)
    acc = evaluate(learner, ds, blocks) if evaluate_after else None
    dist.barrier()
    if rank != 0:
        return None
    done = learner.samples_seen - first_seen
    return PipelineResult(done, seconds, done / max(seconds, 1e-9), acc, tuple(blocks), merged)


def gather_merge(learner: Any, blocks: list[tuple[int, int]], out: Path, meta: dict[str, Any]) -> Path | None:
    """One ordinary checkpoint at ``out`` (written by rank 0): every rank sends its block of layers (weights, BN
    statistics, optimizer state) over the process group — no shared file system needed."""
    from edgeff import checkpoint

    rank, world = dist.get_rank(), dist.get_world_size()
    start, stop = blocks[rank]
    mine = {i: (learner.net.local_layers[i].state_dict(),
                None if learner.net.local_layers[i].opt is None else learner.net.local_layers[i].opt.state_dict(),
                learner.net.local_layers[i].lr) for i in range(start, stop)}
    parts: list[Any] = [None] * world if rank == 0 else []
    dist.gather_object(mine, parts if rank == 0 else None, dst=0)
    if rank != 0:
        return None
    import copy

    merged = copy.deepcopy(learner)
    for part in parts[1:]:
        for i, (state, opt, lr) in part.items():
            layer = merged.net.local_layers[i]
            layer.load_state_dict(state)
            if opt is not None:
                layer.ensure_optimizer().load_state_dict(opt)
            layer.set_lr(lr)
    return checkpoint.save(merged, out, meta={k: v for k, v in meta.items() if k != "pipeline"})


def evaluate(learner: Any, ds: Any, blocks: list[tuple[int, int]], *, batch: int = 200,
             limit: int | None = None) -> float | None:
    """Distributed goodness prediction over the test set (every rank calls it); rank 0 returns the accuracy."""
    rank, world = dist.get_rank(), dist.get_world_size()
    start, stop = blocks[rank]
    net = learner.net
    net.eval()
    k = net.num_classes
    idx = select_layers(learner.predictor.layers, len(net.layers))
    correct = total = 0
    batches = iter(ds.test_batches(batch, limit=limit)) if rank == 0 else None
    with torch.no_grad():
        while True:
            if rank == 0:
                item = next(batches, None)  # type: ignore[arg-type]
                rows = 0 if item is None else item[0].shape[0] * k
                header = torch.tensor([rows, 0, 0], dtype=torch.float64)
                if world > 1:
                    dist.send(header, 1)
                if item is None:
                    break
                x, y = item
                labels = torch.arange(k).repeat(x.shape[0])
                h = net.encoder(x.repeat_interleave(k, dim=0), labels)  # (B*K, C', H, W)
            else:
                header = _Link.recv_header(rank - 1)
                if rank < world - 1:
                    dist.send(header, rank + 1)
                if header[0] == 0:
                    break
                rows = int(header[0])
                h = _Link.recv((rows, *net.shapes[start - 1]), rank - 1)
            gs = []
            for layer in net.local_layers[start:stop]:
                h = layer(h)
                gs.append(goodness(h))
            if rank < world - 1:
                dist.send(h.contiguous(), rank + 1)
            g = torch.stack(gs, dim=-1)  # (rows, block layers)
            if rank != 0:
                dist.send(g.contiguous(), 0)
                continue
            parts = [g]
            for r in range(1, world):
                a, b = blocks[r]
                part = torch.empty(rows, b - a)
                dist.recv(part, r)
                parts.append(part)
            scores = torch.cat(parts, dim=-1).view(-1, k, len(net.layers))[..., idx].sum(-1)  # (B, K)
            correct += int((scores.argmax(1) == torch.as_tensor(y)).sum())
            total += len(y)
    return correct / total if rank == 0 and total else None
