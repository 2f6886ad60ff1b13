"""One specification of a training run for both runtimes (standard library only: no torch, no numpy).

``RunOptions`` is what a user chooses (``None``: the preset's value); ``edgeff train`` and ``edgeff-edge train``
fill it from the options they parse (``edgeff.options.TRAIN``, declared once), ``check_options`` refuses every
mistake in one line before any work, and ``recipe`` turns a preset and the options into the model and train
configs the run builds: the preset's recipe for the data set, the user's choices, the stream recipe at batch 1,
an lda readout's settings dropped under another predictor, the lr plan's horizon, the readout's ridge.
``edgeff.run.Run`` (torch) and ``edgeff.edge.run.train_run`` (numpy) build their learner from it and train through
the one loop (``edgeff.loop``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from edgeff.config import TrainConfig, select_layers
from edgeff.errors import InputError
from edgeff.families import family_for
from edgeff.options import check_choices, options
from edgeff.presets import Preset, stream_preset, stream_train, twin_train, without_unread_lda


@dataclass(frozen=True)
class RunOptions:
    """What a user chooses for a run; ``None`` means the preset's value. Each field is an option of
    ``edgeff.options.TRAIN`` (``out`` is ``--out``); a runtime reads the options it declares."""

    preset: str = "symba-mlp"
    data: str = "builtin"  # a data set's name, or a folder with one sub-folder of images per class
    data_dir: Path | None = None
    epochs: int | None = None
    samples: int | None = None  # training samples per pass
    batch_size: int | None = None
    lr: float | None = None
    schedule: str | None = None
    seed: int | None = None  # the preset's (0 for every preset)
    device: str = "auto"
    backprop: bool = False
    out: Path | None = None  # default runs/PRESET.pt (edgeff-edge: runs/PRESET.npz)
    resume: bool = False
    optim_state: str = "float32"
    lazy: bool = False  # IDX files read from disk batch by batch (unpacked once into cache_dir), same order
    cache_dir: Path | None = None  # where .gz files are unpacked [default: ~/.cache/edgeff]
    frugal: bool = True
    chunk: int | None = None  # frugal step: pairs per chunk [default: the preset's]
    views: int | None = None
    crop_padding: int | None = None
    hflip: bool | None = None
    lr_epochs: int | None = None  # the lr decay's horizon
    window: int | None = None  # stream window (TrainConfig.window) [default: the preset's, its stream recipe's at batch 1]
    predictor: str | None = None  # goodness family: goodness, head or lda (TrainConfig.predictor)
    eval_layers: str | None = None  # the layers the predictor reads (TrainConfig.eval_layers)
    shrinkage: float | None = None  # an lda readout's ridge (ModelConfig.shrinkage) [default: the preset's]
    readout_size: int | None = None  # an lda readout's conv maps pooled to about N×N (TrainConfig.readout_size)
    checkpoint_every: int | None = None  # samples; None: every CHECKPOINT_SECONDS; 0: only at the end


# RunOptions fields that become TrainConfig fields of the same name when the user sets them
TRAIN_CHOICES = ("batch_size", "lr", "schedule", "views", "crop_padding", "hflip", "window", "predictor",
                 "eval_layers", "readout_size", "chunk")


def check_options(o: RunOptions, path: Path, runtime: str) -> None:
    """Every option mistake ``runtime`` ("torch" or "edge") can find before any work (``InputError``, one line)."""
    check_choices({**vars(o), "out_path": o.out}, runtime)
    if o.lr is not None and not (math.isfinite(o.lr) and o.lr > 0):
        raise InputError(f"--lr must be a positive finite number, got {o.lr}")
    for opt, v in (("--epochs", o.epochs), ("--lr-epochs", o.lr_epochs), ("--samples", o.samples),
                   ("--batch-size", o.batch_size)):
        if v is not None and v < 1:
            raise InputError(f"{opt} must be at least 1, got {v}")
    if o.checkpoint_every is not None and o.checkpoint_every < 0:
        raise InputError(f"--checkpoint-every must be 0 (only at the end) or a number of samples, got {o.checkpoint_every}")
    if o.window is not None and o.window < 0:
        raise InputError(f"--window must be 0 (off) or a number of samples, got {o.window}")
    if o.chunk is not None and o.chunk < 0:
        raise InputError(f"--chunk must be 0 (the whole batch) or a number of pairs, got {o.chunk}")
    if o.shrinkage is not None and not (math.isfinite(o.shrinkage) and o.shrinkage >= 0):
        raise InputError(f"--shrinkage must be a finite number >= 0, got {o.shrinkage}")
    if o.shrinkage is not None and o.resume and path.is_file():
        raise InputError("--shrinkage sets a new model's readout; a resumed run keeps the one it was saved with")


@dataclass(frozen=True)
class Recipe:
    """What a new run builds: the preset (its model as this run trains it) and the train config."""

    preset: Preset
    train: TrainConfig
    model_changes: dict[str, Any]  # the stream recipe's changes to the preset's model (batch 1), for people


def chosen(o: RunOptions, runtime: str) -> dict[str, Any]:
    """The TrainConfig fields the user set among those ``runtime`` takes."""
    taken = {opt.name for opt in options(runtime)}
    picked = {k: getattr(o, k) for k in TRAIN_CHOICES if k in taken and getattr(o, k) is not None}
    if runtime == "edge" and o.views == 1:  # the numpy runtime crops only to make a second view
        picked["crop_padding"] = 0
    return picked


def train_config(p: Preset, o: RunOptions, runtime: str = "torch") -> TrainConfig:
    """``p``'s train config (its recipe for the data set already applied) with the user's choices; ``epochs``
    is the planned run (the lr horizon)."""
    picked = chosen(o, runtime)
    fixed: dict[str, Any] = {"seed": p.train.seed if o.seed is None else o.seed}
    if runtime == "torch":
        fixed.update(device=o.device, optim_state_dtype=o.optim_state, frugal=o.frugal)
    tc = replace(p.train, **fixed, **picked)
    tc = stream_train(p, tc, picked)  # batch 1: the stream recipe where the user chose nothing
    _, tc = without_unread_lda(p, tc, picked)  # another predictor than the recipe's lda readout
    if o.backprop:
        tc = twin_train(p, tc, picked)  # the backprop twin's own recipe where the preset has one
    return replace(tc, epochs=o.lr_epochs or (o.epochs or tc.epochs))


def recipe(p: Preset, o: RunOptions, runtime: str = "torch") -> Recipe:
    """A new run of ``p`` (its recipe for the data set already applied, ``presets.for_data``) as ``o`` asks, in
    ``runtime``: the train config (``train_config``) and the model: at batch 1 the stream recipe's, an lda
    readout's ridge back at its default under another predictor unless given, and ``o.shrinkage`` (refused by
    the family's declaration where nothing reads it)."""
    tc = train_config(p, o, runtime)
    streaming = stream_preset(p, tc.batch_size)  # batch 1: the stream recipe's model
    changes = {} if streaming is p else dict(p.stream_model)
    q, _ = without_unread_lda(streaming, tc, ["shrinkage"] if o.shrinkage is not None else [])
    family = family_for(q.model, backprop=o.backprop)
    if "eval_layers" in family.train_read(q.model, tc):  # a layer the model lacks: refused before any work
        select_layers(tc.eval_layers, len(q.model.layers))
    if o.shrinkage is not None:
        q = replace(q, model=replace(q.model, shrinkage=o.shrinkage))
        if "shrinkage" not in family.reads(q.model, tc)[1] and "predictor" in family.train_read(q.model, tc):
            raise InputError(f"--shrinkage is the lda readout's ridge; the {tc.predictor} predictor does not use it "
                             "(add --predictor lda)")
    return Recipe(q, tc, changes)


__all__ = ["TRAIN_CHOICES", "Recipe", "RunOptions", "check_options", "chosen", "recipe", "train_config"]
