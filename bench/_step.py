"""One fresh process of the step-cost benchmark (``memory.py --step``): a warm-up step, then the peak RSS
over 4 more steps above the RSS before them (VmHWM after clearing it through /proc/self/clear_refs),
with glibc returning freed memory at once (the parent sets MALLOC_* in the environment).

    python bench/_step.py '{"preset": "trifecta-cnn", "method": "local", "batch_size": 256, "train": {...}}'
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace


def status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    job = json.loads(sys.argv[1])
    import torch

    torch.set_num_threads(1)
    from edgeff.presets import get_preset, make_learner

    p = get_preset(job["preset"])
    train = replace(p.train, device="cpu", **job.get("train", {}))
    learner = make_learner(p, train=train, backprop=job["method"] == "bp")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(job["batch_size"], *p.model.input_shape, generator=g)
    y = torch.randint(0, p.model.num_classes, (job["batch_size"],), generator=g)
    learner.learn_many(x, y)  # warm-up: optimizer state and lazy imports
    before = status("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    for _ in range(4):
        learner.learn_many(x, y)
    print(json.dumps({"step_cost": status("VmHWM:") - before, "rss_before": before}))


if __name__ == "__main__":
    main()
