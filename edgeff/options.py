"""The options of a training run, declared once for both command lines (standard library only).

``edgeff train`` (typer, ``cli/train.py``) and ``edgeff-edge train`` (argparse, ``cli/edge.py``) build their
``train`` options from ``TRAIN``: the same names, types, defaults and help in both, each option present in the
runtimes its ``where`` names. ``check_choices`` refuses a value outside an option's choices in one line, for
both. Adding an option means one ``Opt`` here and, for an option of the run itself, a field of
``edgeff.spec.RunOptions`` (the one specification both runtimes build a run from) read in ``edgeff.spec.recipe``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeff.errors import InputError
from edgeff.images import DEFAULT_MAX_PIXELS

BOTH, TORCH, EDGE = frozenset({"torch", "edge"}), frozenset({"torch"}), frozenset({"edge"})


@dataclass(frozen=True)
class Opt:
    """One command-line option.

    ``type`` is int, float, str, Path or bool. A bool option is a switch: ``--NAME`` only (``default`` False,
    ``negatable`` False) or ``--NAME/--no-NAME`` (``negatable``; ``default`` True, False or None = the
    preset's). ``flag`` replaces the option's spelling (``--out`` for ``out_path``). ``choices`` are checked by
    ``check_choices``."""

    name: str
    type: type
    default: Any
    help: str
    where: frozenset[str] = BOTH
    flag: str | None = None
    negatable: bool = False
    off: str | None = None  # a negatable switch's "off" spelling [default: --no-NAME]
    choices: tuple[str, ...] = ()

    @property
    def spelling(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    @property
    def off_spelling(self) -> str:
        return self.off or "--no-" + self.spelling[2:]

    @property
    def optional(self) -> bool:
        """Whether the option's value may be None (its default: the preset's)."""
        return self.default is None


TRAIN: tuple[Opt, ...] = (
    Opt("preset", str, "symba-mlp", "named configuration; see `edgeff presets` (`edgeff-edge presets`)"),
    Opt("data", str, "builtin", "builtin, mnist, fashion-mnist, cifar10, cifar10-exact, or (torch) a folder of your "
        "own images with one sub-folder per class"),
    Opt("data_dir", Path, None, "folder holding MNIST/raw, FashionMNIST/raw or CIFAR10"),
    Opt("cache_dir", Path, None, "where .gz data files are unpacked once, to be read from disk batch by batch "
        "(edgeff-edge; edgeff train --lazy) [default: ~/.cache/edgeff]"),
    Opt("epochs", int, None, "passes over the training set [default: the preset's]"),
    Opt("samples", int, None, "use only this many (shuffled) training samples per pass"),
    Opt("batch_size", int, None, "samples per step, 1 for pure streaming [default: the preset's]"),
    Opt("lr", float, None, "learning rate [default: the preset's]"),
    Opt("schedule", str, None, "layer schedule: all, greedy or (torch) olu [default: the preset's]",
        choices=("all", "greedy", "olu")),
    Opt("seed", int, None, "random seed (weights, negatives, data order) [default: the preset's, 0]"),
    Opt("device", str, "auto", "auto, cpu, cuda or cuda:N", where=TORCH),
    Opt("backprop", bool, False, "train the end-to-end backprop baseline on the same architecture", where=TORCH),
    Opt("out_path", Path, None, "model file to write [default: runs/PRESET.pt; edgeff-edge: runs/PRESET.npz]",
        flag="--out"),
    Opt("resume", bool, False, "continue from --out if it exists"),
    Opt("progress", bool, True, "show a progress bar", negatable=True),
    Opt("optim_state", str, "float32", "optimizer state dtype between steps: float32, bfloat16 or float16",
        where=TORCH, choices=("float32", "bfloat16", "float16")),
    Opt("lazy", bool, False, "read the IDX sets (mnist, fashion-mnist) from disk batch by batch, in the same "
        "shuffled order (no data set in RAM; unpacked once into --cache-dir), as edgeff-edge always does",
        where=TORCH),
    Opt("frugal", bool, True, "goodness presets, all/greedy: one layer at a time in chunks of --chunk pairs (the "
        "whole-batch update, a fraction of its memory); --whole-batch: the whole batch at once", where=TORCH,
        negatable=True, off="--whole-batch"),
    Opt("chunk", int, None, "frugal step: positive/negative pairs per chunk (0: the whole batch) [default: the "
        "preset's, 64 for most]", where=TORCH),
    Opt("memory_report", bool, False, "measure per-layer memory on real batches after training", where=TORCH),
    Opt("views", int, None, "contrastive/backprop: 1 (one-forward) or 2 augmented views per batch [default: the "
        "preset's]"),
    Opt("crop_padding", int, None, "random-crop augmentation: border pixels to pad and crop back, 0 = off "
        "[default: the preset's]", where=TORCH),
    Opt("hflip", bool, None, "random horizontal flips (not for digits) [default: the preset's]", where=TORCH,
        negatable=True),
    Opt("lr_epochs", int, None, "epochs the lr decay is planned over [default: --epochs]; plan longer to resume "
        "a run further later", where=TORCH),
    Opt("window", int, None, "each step also learns the N samples just before it (a sliding window over the "
        "stream; 0 = off) [default: the preset's; at --batch-size 1 its stream recipe's]"),
    Opt("predictor", str, None, "goodness presets: goodness (one pass per label), head (torch: a softmax on "
        "neutral-label features) or lda (a closed-form readout on them) [default: the preset's]",
        choices=("goodness", "head", "lda")),
    Opt("eval_layers", str, None, "the layers the predictor reads: all, all-but-first, last or last:K [default: "
        "the preset's]"),
    Opt("shrinkage", float, None, "lda predictor (and slda-conv): the covariance's ridge, a share of its mean "
        "variance [default: the preset's, 0.01]"),
    Opt("readout_size", int, None, "lda predictor: conv maps larger than N×N are average-pooled to about N×N "
        "before the readout (0 = as they are) [default: the preset's]"),
    Opt("checkpoint_every", int, None, "also save the checkpoint every N samples [default: about every 5 minutes "
        "of training; 0 = only at the end]", where=TORCH),
    Opt("pipeline", bool, False, "a layer pipeline across the ranks of `torchrun --nproc-per-node N -m "
        "edgeff.cli.app train ...`", where=TORCH),
    Opt("pipeline_mode", str, "overlap", "pipeline: overlap (rank 0 runs a step ahead) or lockstep", where=TORCH,
        choices=("overlap", "lockstep")),
    Opt("pipeline_split", str, None, "pipeline: layers per rank, e.g. 2,2 [default: balanced by measured cost]",
        where=TORCH),
    Opt("max_pixels", int, DEFAULT_MAX_PIXELS, "image files: the largest width x height read (a larger image is refused "
        "before it is decoded)", where=TORCH),
)


def options(runtime: str, table: tuple[Opt, ...] = TRAIN) -> tuple[Opt, ...]:
    """The options of ``table`` that ``runtime`` ("torch" or "edge") takes, in order."""
    return tuple(o for o in table if runtime in o.where)


def check_choices(values: dict[str, Any], runtime: str, table: tuple[Opt, ...] = TRAIN) -> None:
    """``InputError`` in one line for a value outside its option's choices (None: the preset's, allowed)."""
    for o in options(runtime, table):
        v = values.get(o.name)
        if o.choices and v is not None and v not in o.choices:
            raise InputError(f"unknown {o.name.replace('_', ' ')} {v!r}; choose one of {', '.join(o.choices)}")


__all__ = ["BOTH", "EDGE", "TORCH", "TRAIN", "Opt", "check_choices", "options"]
