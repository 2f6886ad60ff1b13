"""One fresh process of the process-memory benchmark (``memory.py --process``): train a preset for one
pass over a data set in one runtime, evaluate on the full test set, print one JSON line.

    python bench/_process.py '{"runtime": "numpy", "method": "local", "preset": "symba-mlp", ...}'

The data are streamed from disk by ``edgeff.edge.data`` for every runtime (the same batches in the
same order; no data set in RAM), so the processes differ only in the learner and its runtime. The
numpy runtime never imports torch (checked: the line says ``torch_imported``). Peak memory is read by
the parent from the kernel (``wait4``'s ``ru_maxrss``); VmHWM is printed here as a cross-check.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from dataclasses import replace


def vm_hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    job = json.loads(sys.argv[1])
    from edgeff.edge.data import load_edge_data
    from edgeff.loop import train_epochs
    from edgeff.presets import get_preset

    data = load_edge_data(job["dataset"], job.get("data_dir"), cache_dir=job.get("cache_dir"))
    p = get_preset(job["preset"])
    train = replace(p.train, device="cpu", **job.get("train", {}))
    if job["runtime"] == "numpy":
        from edgeff.edge import make_edge_learner

        learner = make_edge_learner(p, input_shape=data.input_shape, num_classes=len(data.classes), train=train)
    else:
        import torch

        torch.set_num_threads(1)
        from edgeff.presets import make_learner

        learner = make_learner(p, input_shape=data.input_shape, num_classes=len(data.classes), train=train,
                               backprop=job["method"] == "bp")
    rss_ready = vm_hwm()
    t0 = time.perf_counter()
    c0 = time.process_time()
    train_epochs(learner, data, epochs=job.get("epochs", 1), batch_size=job["batch_size"], seed=job.get("seed", 0),
                 limit=job.get("limit"))
    train_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
    samples = learner.samples_seen
    correct = n = 0
    for x, y in data.test_batches(200, limit=job.get("test_limit")):
        pred = learner.predict_many(x)
        correct += int((pred.numpy() if hasattr(pred, "numpy") else pred).__eq__(y).sum())
        n += len(y)
    print(json.dumps({"samples": samples, "train_s": round(train_s, 2), "cpu_s": round(cpu_s, 2),
                      "samples_per_s": round(samples / train_s, 2), "test_acc": round(correct / n, 4), "test_n": n,
                      "vm_hwm": vm_hwm(), "rss_before_training": rss_ready,
                      "ru_maxrss_self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "torch_imported": "torch" in sys.modules}))


if __name__ == "__main__":
    main()
