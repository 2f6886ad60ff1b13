"""One fresh process of the step-cost benchmark (``memory.py --step``), glibc returning freed memory at
once (the parent sets the environment, ``edgeff.memory.MEASURE_ENV``): build the learner, then
``edgeff.memory.measure_step`` (a warm-up step; every gradient dropped; the peak over 4 steps above the
model and its optimizer state, per layer and whole), then the accounted figures of the same step.

    python bench/_step.py '{"preset": "trifecta-cnn", "method": "local", "batch_size": 256, "train": {...},
                            "depth": 12, "block": {"kind": "conv", "out": 32, "norm": "batch"}}'
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace


def main() -> None:
    job = json.loads(sys.argv[1])
    import torch

    torch.set_num_threads(1)
    from edgeff.config import LayerSpec
    from edgeff.memory import account, measure_step
    from edgeff.presets import get_preset, make_learner

    p = get_preset(job["preset"])
    if "depth" in job and "block" in job:  # one block repeated: the depth figure's nets
        p = replace(p, model=replace(p.model, layers=(LayerSpec(**job["block"]),) * int(job["depth"])))
    train = replace(p.train, device="cpu", **job.get("train", {}))
    steps = 4
    if train.schedule == "greedy" and job["method"] == "local":  # a new layer active at every step: each is measured
        train = replace(train, greedy_steps=1)
        steps = len(p.model.layers) - 1  # the warm-up step trains layer 1, the measured steps layers 2..L
    learner = make_learner(p, train=train, backprop=job["method"] == "bp")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(job["batch_size"], *p.model.input_shape, generator=g)
    y = torch.randint(0, p.model.num_classes, (job["batch_size"],), generator=g)
    out = measure_step(learner, [(x, y)] * (steps + 1))
    out["dynamo_imported"] = "torch._dynamo" in sys.modules
    report = account(p.model, train, job["batch_size"])
    out["step_cost_accounted"] = report.bp_step if job["method"] == "bp" else report.local_step
    out["step"] = "backprop" if job["method"] == "bp" else report.step
    out["layers_accounted"] = list(report.bp_live if job["method"] == "bp" else report.local_live)
    out["depth"] = len(p.model.layers)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
