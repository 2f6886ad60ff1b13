"""The commands users run, measured from outside (``memory.py --cli``): each ``edgeff-edge`` and ``edgeff``
command is a fresh process under ``/usr/bin/time`` (its maximum resident set size from the kernel; ``time``
itself is a small C process, so the figure is the command's own), 1 thread. The floor of a runtime is a
bare ``python -c "import numpy"`` (``import torch`` for the torch runtime) process measured in the same run,
plus the model's state (the saved file's members, uncompressed). Samples per second come from the
command's own ``trained in X s (N samples/s)`` line, so start-up and evaluation are left out of it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

MiB = 1024 * 1024
BIN = Path(sys.executable).parent
# the commands run as after an install: with their modules' bytecode cached (pip compiles it at install, Python
# on first import). With PYTHONDONTWRITEBYTECODE set and no cache, every process compiles each edgeff module from
# source (1-2 MiB of peak RSS and ~0.3 s that an installed package never pays, while numpy's bytecode is cached)
ENV = {**{k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}, "OMP_NUM_THREADS": "1",
       "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MALLOC_TRIM_THRESHOLD_": "0"}


def compile_package() -> None:
    """Cache edgeff's bytecode (what ``pip install`` does for an installed package)."""
    import edgeff

    subprocess.run([sys.executable, "-m", "compileall", "-q", str(Path(edgeff.__file__).parent)], env=ENV,
                   check=True, capture_output=True)


def measure(argv: list[str], cwd: Path) -> dict[str, Any]:
    """Run ``argv`` under /usr/bin/time; its peak RSS (bytes), wall seconds and output."""
    time_bin = shutil.which("time") or "/usr/bin/time"
    with tempfile.NamedTemporaryFile("r", suffix=".time") as tf:
        res = subprocess.run([time_bin, "-o", tf.name, "-f", "%M %e", *argv], cwd=cwd, env=ENV, capture_output=True,
                             text=True, timeout=3600, check=False)
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
        kib, wall = Path(tf.name).read_text().split()[-2:]
    text = res.stdout + res.stderr
    rate = re.search(r"trained in [\d.]+s \(([\d.]+) samples/s\)", text)
    acc = re.search(r"test accuracy ([\d.]+)%", text)
    return {"peak_rss": int(kib) * 1024, "wall_s": float(wall), "samples_per_s": float(rate.group(1)) if rate else None,
            "test_acc": round(float(acc.group(1)) / 100, 4) if acc else None}


def state_bytes(path: Path) -> int:
    """A model file's state, uncompressed: an .npz's members (a .pt is a zip too)."""
    with zipfile.ZipFile(path) as z:
        return sum(i.file_size for i in z.infolist())


def bare(module: str, cwd: Path) -> int:
    return measure([sys.executable, "-c", f"import {module}"], cwd)["peak_rss"]


def rows(presets: list[str], batches: list[int], data: str, data_dir: str, samples: dict[int, int]) -> list[dict[str, Any]]:
    """Every command for each preset and batch size, edge and torch train runs interleaved (same arguments)."""
    records: list[dict[str, Any]] = []
    compile_package()
    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(tmp)
        floors = {"numpy": bare("numpy", cwd), "torch": bare("torch", cwd)}
        for preset in presets:
            for b in batches:
                n = samples[b]
                def common(epochs: int, preset: str = preset, b: int = b, n: int = n) -> list[str]:
                    return ["--preset", preset, "--data", data, "--data-dir", data_dir, "--batch-size", str(b),
                            "--samples", str(n), "--epochs", str(epochs), "--no-progress"]

                npz, pt = cwd / f"{preset}-{b}.npz", cwd / f"{preset}-{b}.pt"
                runs = [
                    ("numpy", "train", [str(BIN / "edgeff-edge"), "train", *common(1), "--out", str(npz)], npz),
                    ("torch", "train", [str(BIN / "edgeff"), "train", *common(1), "--out", str(pt)], pt),
                    ("numpy", "eval", [str(BIN / "edgeff-edge"), "eval", str(npz), "--data", data, "--data-dir",
                                       data_dir], npz),
                    ("torch", "eval", [str(BIN / "edgeff"), "eval", str(pt), "--data", data, "--data-dir", data_dir,
                                       "--no-progress"], pt),
                    ("numpy", "resume", [str(BIN / "edgeff-edge"), "train", *common(2), "--out", str(npz), "--resume"],
                     npz),
                    ("numpy", "convert", [str(BIN / "edgeff-edge"), "convert", str(pt), str(cwd / "converted.npz")], pt),
                ]
                for runtime, command, argv, model in runs:
                    m = measure(argv, cwd)
                    floor = floors["torch" if command == "convert" or runtime == "torch" else "numpy"] + state_bytes(model)
                    records.append({"kind": "cli", "runtime": runtime, "command": command, "preset": preset,
                                    "dataset": data, "batch_size": b, "samples": n, "threads": 1,
                                    "peak_rss": m["peak_rss"], "floor": floor,
                                    "peak_over_floor": round(m["peak_rss"] / floor, 3),
                                    "samples_per_s": m["samples_per_s"], "test_acc": m["test_acc"],
                                    "wall_s": m["wall_s"]})
                    print(f"{preset} b{b} {runtime:5} {command:7} peak {m['peak_rss'] / MiB:6.1f} MiB, floor "
                          f"{floor / MiB:6.1f} MiB ({m['peak_rss'] / floor:.2f}x), {m['samples_per_s']} samples/s, "
                          f"acc {m['test_acc']}", flush=True)
                edge_train = records[-6]["samples_per_s"]
                torch_train = records[-5]["samples_per_s"]
                if edge_train and torch_train:
                    for r in records[-6:]:
                        if r["command"] == "train":
                            r["samples_per_s_over_torch"] = round(r["samples_per_s"] / torch_train, 3)
    return records
