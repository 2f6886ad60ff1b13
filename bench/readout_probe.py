"""What a preset's local training adds to its closed-form readout: the lda readout of its recipe solved on the
untrained body (its initial weights, seed 0) next to the same readout on trained bodies (models kept by
``bench/accuracy.py --keep``), each with and without the training set's mirror images in its statistics.

    python bench/readout_probe.py --data-dir ../shared/data --preset trifecta-cnn --data cifar10 \\
        --models runs/keep/trifecta-cnn_cifar10.pt

Each row: the body (``untrained`` or the kept file's job and epochs), the readout (layers, pooled size, shrinkage,
mirror), its feature count, full test-set accuracy and the CPU seconds of the solve. Writes
``results/readout_probe.json`` (a rerun of a body and readout replaces its row).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from _common import merge_records, table

from edgeff import evaluate, get_preset, make_learner
from edgeff.checkpoint import load
from edgeff.data import load_data
from edgeff.presets import for_data
from edgeff.readout import LdaPredictor


def _readout(learner: Any) -> LdaPredictor:
    pred = getattr(learner, "predictor", None)
    if not isinstance(pred, LdaPredictor):
        raise SystemExit(f"{learner.kind} learner has no lda predictor (its recipe's predictor: {pred})")
    return pred


def probe(learner: Any, body: str, epochs: int, data: Any, preset: str) -> list[dict[str, Any]]:
    rows = []
    readout = _readout(learner)
    tc = learner.train_cfg
    for mirror in (False, True):
        readout.mirror = mirror
        c0 = time.process_time()
        learner.solve_readout(data.train_batches(500, seed=0))
        acc = evaluate(learner, data.test_batches(1000)).accuracy
        rows.append({"preset": preset, "dataset": data.name, "body": body, "body_epochs": epochs,
                     "eval_layers": tc.eval_layers, "readout_size": tc.readout_size,
                     "shrinkage": learner.model_cfg.shrinkage, "mirror": mirror, "features": readout.stats.dim,
                     "test_acc": acc, "cpu_seconds": round(time.process_time() - c0, 1)})
        print(f"  {body} ({epochs} epochs), mirror {mirror}: {acc:.4f}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, required=True)
    ap.add_argument("--preset", default="trifecta-cnn")
    ap.add_argument("--data", default="cifar10")
    ap.add_argument("--models", default="", help="comma-separated checkpoints of trained bodies (bench/accuracy.py --keep)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = load_data(args.data, args.data_dir)
    p = for_data(get_preset(args.preset), args.data)
    untrained = make_learner(p, input_shape=data.input_shape, num_classes=len(data.classes),
                             train=replace(p.train, device="cpu", seed=0))
    records = probe(untrained, "untrained", 0, data, args.preset)
    for path in filter(None, args.models.split(",")):
        learner, meta = load(path, device="cpu")
        records += probe(learner, str(meta.get("job", Path(path).stem)), learner.train_cfg.epochs, data, args.preset)
    merge_records("readout_probe", records, ("preset", "dataset", "body", "mirror"))
    print(table(records, ["preset", "dataset", "body", "body_epochs", "mirror", "features", "test_acc", "cpu_seconds"]))


if __name__ == "__main__":
    main()
