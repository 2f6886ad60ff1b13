"""Render every results table in README.md and docs/*.md from bench/results/*.json (and the preset registry).

A page holds a generated table between two markers; everything between them is this script's output:

    <!-- table: accuracy-cifar10 -->
    ...
    <!-- /table -->

    python tools/docs.py           # rewrite the tables in place
    python tools/docs.py --check   # exit 1 and name the tables that differ from what the JSON renders

``tests/test_docs.py`` runs the check, so a committed table never drifts from its record.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"(<!-- table: ([\w-]+) -->\n)(.*?)(<!-- /table -->)", re.DOTALL)
MiB = 2**20
DATA = {"mnist": "MNIST", "fashion-mnist": "Fashion-MNIST", "cifar10": "CIFAR-10 subset"}


def records(name: str) -> list[dict[str, Any]]:
    return json.loads((RESULTS / f"{name}.json").read_text())


def pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.2f}%"


def md(header: list[str], rows: list[list[str]], source: str) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + f"\n\n<sub>Source: `{source}`.</sub>\n"


# --- accuracy ---------------------------------------------------------------------------------------------

def _current(r: dict[str, Any]) -> bool:
    return not r.get("superseded") and r.get("job", "").count(":") == 1 and r.get("mode") == "epochs"


def _views(r: dict[str, Any]) -> str:
    if r.get("views", 1) == 1:
        if r.get("crop_padding"):
            return f"1 (crop {r['crop_padding']}{', flip' if r.get('hflip') else ''})"
        return "1" + (" (mirrored)" if r.get("hflip") else "")
    return f"2 (crop {r.get('crop_padding', 0)}{', flip' if r.get('hflip') else ''})"


def _cpu(r: dict[str, Any], key: str) -> str:
    v = r.get(key)
    return "—" if v is None else f"{v:.0f}"


def accuracy_table(dataset: str) -> str:
    recs = [r for r in records("accuracy") if r.get("dataset") == dataset and r.get("mode") == "epochs"]
    recs.sort(key=lambda r: (not _current(r), -(r.get("test_acc") or 0)))
    rows = []
    for r in recs:
        what = r["preset"]
        if r["job"].count(":") == 2:
            what += f" (screen {r['job'].split(':', 2)[2]})"
        elif r.get("superseded"):
            what += " (superseded)"
        rows.append([what, _views(r), str(r["batch_size"]), str(r["epochs"]), _cpu(r, "cpu_seconds"), pct(r["test_acc"]),
                     _cpu(r, "bp_cpu_seconds"), pct(r["bp_test_acc"]), f"{r['ratio']:.3f}"])
    return md(["preset", "views", "batch", "epochs", "local CPU s", "local acc", "BP CPU s", "BP acc", "ratio"], rows,
              f"python bench/accuracy.py --data-dir ../shared/data --threads 1 --jobs PRESET:{dataset}")


def readout_probe_table() -> str:
    rows = [[r["preset"], r["body"] + (f" ({r['body_epochs']} epochs)" if r["body_epochs"] else ""),
             f"{r['eval_layers']}, size {r['readout_size']}, shrinkage {r['shrinkage']:g}", str(r["features"]),
             "yes" if r["mirror"] else "no", pct(r["test_acc"])] for r in records("readout_probe")]
    return md(["preset", "body", "lda readout", "features", "mirror images", "test acc"], rows,
              "python bench/readout_probe.py --data-dir ../shared/data --preset trifecta-cnn --data cifar10 "
              "--models KEPT.pt")


def stream_table() -> str:
    recs = [r for r in records("accuracy") if r.get("mode") == "stream"]
    recs.sort(key=lambda r: (bool(r.get("superseded")), r["dataset"], -(r["test_acc"] or 0)))
    rows = [[r["preset"] + (" (superseded)" if r.get("superseded") else ""), DATA[r["dataset"]], str(r.get("window", 0)),
             r.get("predictor", "goodness"), pct(r["test_acc"]), pct(r["bp_test_acc"]), f"{r['ratio']:.3f}"]
            for r in recs]
    return md(["preset", "data", "window", "predictor", "local acc", "BP acc", "ratio"], rows,
              "python bench/accuracy.py --data-dir ../shared/data --threads 1 --jobs stream:PRESET:DATA")


def results_table() -> str:
    """README: the best current local row per data set beside its backprop twin (same run), and how many presets
    come within 5% of their twins."""
    rows = []
    for ds, label in DATA.items():
        recs = [r for r in records("accuracy") if r.get("dataset") == ds and _current(r)]
        best = max(recs, key=lambda r: r["test_acc"])
        close = sum(r["ratio"] >= 0.95 for r in recs)
        rows.append([label, best["preset"], pct(best["test_acc"]), pct(best["bp_test_acc"]), f"{best['ratio']:.3f}",
                     f"{close} of {len(recs)}"])
    return md(["data", "best local preset", "its accuracy", "its backprop twin", "ratio",
               "presets ≥ 0.95× their twin"], rows, "python bench/accuracy.py --data-dir ../shared/data --threads 1")


def memory_summary() -> str:
    """README: memory against backprop, a training step by depth and a whole edge process."""
    step = {(r["depth"], r["method"]): r for r in records("memory_depth")}
    rows = []
    for depth in sorted({d for d, _ in step}):
        local, bp = step[(depth, "local")], step[(depth, "bp")]
        rows.append([f"training step, {depth} conv layers (batch 256)", f"{local['step_cost'] / MiB:.1f} MiB",
                     f"{bp['step_cost'] / MiB:.1f} MiB", f"{local['step_cost'] / bp['step_cost']:.3f}"])
    cli = [r for r in records("memory") if r.get("kind") == "cli" and r["command"] == "train"]
    for preset, b in sorted({(r["preset"], r["batch_size"]) for r in cli}):
        edge = next(r for r in cli if (r["preset"], r["batch_size"], r["runtime"]) == (preset, b, "numpy"))
        torch = next(r for r in cli if (r["preset"], r["batch_size"], r["runtime"]) == (preset, b, "torch"))
        rows.append([f"`edgeff-edge train` vs `edgeff train`, {preset} batch {b}", f"{edge['peak_rss'] / MiB:.0f} MiB",
                     f"{torch['peak_rss'] / MiB:.0f} MiB (torch, local)", f"{edge['peak_rss'] / torch['peak_rss']:.3f}"])
    return md(["what", "edgeff", "backprop / torch", "ratio"], rows,
              "python bench/memory.py (steps); python bench/memory.py --cli --data-dir ../shared/data (processes)")


# --- memory -----------------------------------------------------------------------------------------------

def cli_table() -> str:
    recs = [r for r in records("memory") if r.get("kind") == "cli"]
    order = ["train", "eval", "resume", "convert"]
    recs.sort(key=lambda r: (r["preset"], r["batch_size"], r["runtime"] != "numpy", order.index(r["command"])))
    rows = []
    for r in recs:
        prog = "edgeff-edge" if r["runtime"] == "numpy" else "edgeff"
        speed = "—" if r.get("samples_per_s") is None else f"{r['samples_per_s']:.0f}"
        ratio = "—" if r.get("samples_per_s_over_torch") is None else f"{r['samples_per_s_over_torch']:.2f}"
        rows.append([r["preset"], str(r["batch_size"]), f"`{prog} {r['command']}`", f"{r['peak_rss'] / MiB:.1f}",
                     f"{r['floor'] / MiB:.1f}", f"{r['peak_over_floor']:.2f}", speed, ratio, pct(r.get("test_acc"))])
    return md(["preset", "batch", "command", "peak RSS MiB", "floor MiB", "/ floor", "samples/s", "/ torch", "test acc"],
              rows, "python bench/memory.py --cli --data-dir ../shared/data")


def process_table() -> str:
    recs = [r for r in records("memory") if r.get("kind") == "process"]
    order = {("numpy", "local"): 0, ("torch", "local"): 1, ("torch", "bp"): 2}
    name = {("numpy", "local"): "numpy edge, local", ("torch", "local"): "torch, local", ("torch", "bp"): "torch, backprop"}
    recs.sort(key=lambda r: (r["preset"], r["batch_size"], order[(r["runtime"], r["method"])]))
    rows = [[r["preset"], str(r["batch_size"]), f"{r['samples']:,}", name[(r["runtime"], r["method"])],
             f"{r['peak_rss'] / MiB:.1f}", f"{r.get('peak_over_bp', 0):.3f}", f"{r['samples_per_s']:.1f}",
             f"{r.get('samples_per_s_over_torch_local', 0):.2f}", pct(r["test_acc"])] for r in recs]
    return md(["preset", "batch", "samples", "runtime", "peak RSS MiB", "/ torch BP", "samples/s", "/ torch local",
               "test acc"], rows, "python bench/memory.py --process --data-dir ../shared/data")


def step_table() -> str:
    recs = [r for r in records("memory") if r.get("kind") == "step"] + records("memory_depth")
    seen, unique = set(), []
    for r in recs:
        key = (r["model"], r["batch_size"], r["method"], r["schedule"], r["step"])
        if key not in seen:
            seen.add(key)
            unique.append(r)
    order = ["olu pairs", "whole batch"]
    unique.sort(key=lambda r: (r["model"].startswith("conv32x"), r["depth"], r["model"], r["method"] == "bp",
                               order.index(r["step"]) if r["step"] in order else 2, r["schedule"]))
    rows = []
    for r in unique:
        bp = r["method"] == "bp"
        rows.append([r["model"], str(r["batch_size"]), "backprop" if bp else "local", "—" if bp else r["schedule"],
                     "—" if bp else r["step"], f"{r['step_cost'] / MiB:.1f} ({r['step_cost_accounted'] / MiB:.1f})",
                     f"{r['step_cost_over_bp']:.3f}", f"{r['peak_rss'] / MiB:.1f}", f"{r['peak_rss_over_bp']:.3f}"])
    return md(["model", "batch", "method", "schedule", "step", "step cost MiB (accounted)", "/ backprop",
               "process peak MiB", "/ backprop"], rows, "python bench/memory.py")


# --- continual --------------------------------------------------------------------------------------------

def split_table() -> str:
    recs = [r for r in records("continual") if r["scenario"] == "split"]
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in recs:
        groups.setdefault((r["dataset"], r["learner"], r["preset"], r["buffer"], r["buffer_policy"]), []).append(r)
    rows = []
    for (ds, learner, preset, buffer, policy), rs in sorted(groups.items(), key=lambda kv: (list(DATA).index(kv[0][0]),
                                                            -sum(r["avg_acc"] for r in kv[1]) / len(kv[1]))):
        rs.sort(key=lambda r: r["seed"])
        mean = sum(r["avg_acc"] for r in rs) / len(rs)
        forget = sum(r["forgetting"] for r in rs) / len(rs)
        rows.append([DATA[ds], preset, learner, f"{buffer} ({policy})" if buffer else "0",
                     " / ".join(pct(r["avg_acc"]) for r in rs), pct(mean), f"{100 * forget:.1f} pt"])
    return md(["data", "preset", "learner", "stored samples", "seeds", "mean", "forgetting"], rows,
              "python bench/continual.py --data-dir ../shared/data --preset P --jobs split:DATA:LEARNER --seeds 0,1,2")


def add_table() -> str:
    recs = [r for r in records("continual") if r["scenario"] == "add"]
    groups: dict[tuple[Any, ...], dict[int, list[dict[str, Any]]]] = {}
    for r in recs:
        groups.setdefault((r["dataset"], r["preset"], r["learner"], r["buffer_policy"]), {}).setdefault(r["k"], []).append(r)
    rows = []
    for (ds, preset, learner, policy), by_k in sorted(groups.items()):
        cells = []
        for k in (5, 20, 50):
            rs = by_k.get(k, [])
            if not rs:
                cells.append("—")
                continue
            recall = sum(r["new_recall"] for r in rs) / len(rs)
            drop = sum(r["old_drop_pt"] for r in rs) / len(rs)
            cells.append(f"{pct(recall)} / {drop:.2f} pt")
        n = max(len(v) for v in by_k.values())
        rows.append([DATA[ds], preset, learner, policy, str(n), *cells])
    return md(["data", "preset", "learner", "buffer", "seeds", "k = 5", "k = 20", "k = 50"], rows,
              "python bench/continual.py --data-dir ../shared/data --preset P --jobs add:DATA:LEARNER")


# --- device, export, pipeline -----------------------------------------------------------------------------

def device_table() -> str:
    recs = [r for r in records("device") if r.get("kind") == "e2e"]
    rows = [[r["rule"], r["widths"], f"{r['train_samples']:,} / {r['test_samples']:,}", pct(r["device_test_acc"]),
             pct(r["inproc_test_acc"]), f"{100 * r['agreement']:.0f}%", f"{r['peak_over_plan']:.2f}",
             f"{r['max_peak_over_budget']:.2f}"] for r in recs]
    faults = next(r for r in records("device") if r.get("kind") == "faults")
    out = md(["preset", "layers", "train / test samples", "device acc", "in-process acc", "agreement",
              "stream peak / plan (above idle)",
              "peak / budget"], rows, "python bench/device.py --data-dir ../shared/data")
    return out + (f"\nFaults at {100 * faults['fault_rate']:.0f}% in both directions: {faults['samples_sent']:,} samples "
                  f"sent, {faults['device_samples']:,} applied, {faults['lost']} lost, {faults['double_applied']} applied "
                  f"twice, {faults['injected']:,} faults injected, {faults['retransmits']:,} retransmissions, weights "
                  f"max |diff| {faults['weights_max_abs_diff']}.\n")


def edge_device_table() -> str:
    recs = sorted((r for r in records("device") if r.get("kind") == "edge_on_device"),
                  key=lambda r: (r["preset"], -r["budget"]))
    rows = []
    for r in recs:
        if r["accepted"]:
            rows.append([r["preset"], f"{r['budget'] / MiB:.0f} MiB", "yes", f"{r['planned'] / MiB:.1f}",
                         f"{r['peak'] / MiB:.1f}", f"{r['peak_over_plan']:.2f} ({r['worst_phase']})",
                         f"{r['peak_over_budget']:.2f}", pct(r["test_acc"])])
        else:
            rows.append([r["preset"], f"{r['budget'] / MiB:.0f} MiB", "refused at load", "—", "—", "—", "—", "—"])
    return md(["preset", "budget", "accepted", "largest plan MiB", "peak MiB", "peak / plan (worst phase)",
               "peak / budget", f"test acc ({recs[0]['test_samples'] if recs else 0} images)"], rows,
              "python bench/device.py --edge-only --data-dir ../shared/data")


def hostile_table() -> str:
    r = next(r for r in records("device") if r.get("kind") == "hostile")
    kinds = sorted(k[len("frames_"):] for k in r if k.startswith("frames_"))
    refused = sum(r[f"refused_{k}"] for k in kinds)
    rows = [[f"{r['frames']:,}", ", ".join(kinds), str(r["crashes"]), str(r["accepted_invalid"]), str(r["hello_failures"]),
             f"{refused:,}", f"{r['loaded_rss'] / MiB:.1f} / {r['baseline_rss'] / MiB:.1f} / {r['max_rss'] / MiB:.1f}",
             f"{r['max_rss_over_baseline_plus_budget']:.3f}", f"{r['wait_behind_trickler_s']:.1f} / {r['wait_behind_chatty_s']:.1f}"]]
    return md(["frames", "kinds", "crashes", "ACKs to invalid frames", "HELLO failures", "refused",
               "device RSS MiB: loaded / normal peak / peak", "peak / (normal peak + budget)",
               "second client waits s (trickler / chatty)"], rows, "python bench/hostile.py --frames 100000")


def latency_table() -> str:
    recs = records("latency")
    rows = []
    for p in [r for r in recs if r["kind"] == "parity"]:
        lat = next((r for r in recs if r["kind"] == "latency" and r["preset"] == p["preset"] and r["batch_size"] == 1), {})
        q = next((r for r in recs if r["kind"] == "int8" and r["preset"] == p["preset"] and r.get("mode") == "static"), {})
        rows.append([p["preset"], f"{100 * p['agreement']:.2f}%", f"{p['max_abs_diff']:.1e}",
                     f"{lat.get('ratio_fp32', 0):.2f}" if lat else "—",
                     f"{q.get('size_ratio', 0):.2f}" if q else "—",
                     f"{q.get('acc_delta_pt', 0):+.2f} pt" if q else "—"])
    return md(["preset", "onnxruntime = torch (predictions)", "max |score diff|", "ort / torch time, batch 1",
               "int8 static size / fp32", "int8 accuracy change"], rows,
              "python bench/latency.py --data-dir ../shared/data")


def pipeline_table() -> str:
    rows = [[r["mode"], str(r["ranks"]) + " × " + str(r["threads"]), f"{r['samples_per_s']:.1f}", f"{r['speedup']:.2f}",
             pct(r["test_acc"]), f"{r['acc_delta_pt']:.2f}"] for r in records("pipeline")]
    return md(["run", "ranks × threads", "samples/s", "speedup", "test accuracy", "Δ pt"], rows,
              "python bench/pipeline.py --data-dir ../shared/data")


# --- presets ----------------------------------------------------------------------------------------------

def _best_rows(preset: str) -> list[str]:
    out = []
    for r in records("accuracy"):
        if r.get("preset") == preset and r.get("job", "").count(":") == 1 and not r.get("superseded"):
            out.append(f"{DATA[r['dataset']]} {pct(r['test_acc'])} (backprop twin {pct(r['bp_test_acc'])})")
        if r.get("preset") == preset and r.get("mode") == "stream" and not r.get("superseded"):
            out.append(f"{DATA[r['dataset']]} one pass at batch 1: {pct(r['test_acc'])} (backprop "
                       f"{pct(r['bp_test_acc'])})")
    return sorted(out)


def presets_page() -> str:
    from dataclasses import fields

    from edgeff.config import LayerSpec, TrainConfig
    from edgeff.presets import PRESETS

    train_defaults = {f.name: f.default for f in fields(TrainConfig)}
    spec_defaults = {f.name: f.default for f in fields(LayerSpec)}
    parts = []
    for p in PRESETS.values():
        layers = ", ".join(
            f"{s.kind} {s.out}" + "".join(f" {k}={v}" for k, v in vars(s).items() if k not in ("kind", "out")
                                           and v != spec_defaults[k]) for s in p.model.layers)
        train = ", ".join(f"{k}={v}" for k, v in vars(p.train).items() if v != train_defaults[k] and k != "device")
        kind = "layer-local" if p.algorithm == "local" else "backprop"
        lines = [f"### `{p.name}`", "", f"*{p.paper}* ({kind}, loss `{p.model.loss}`, label `{p.model.label}`)", "", p.notes, "",
                 f"- layers: {layers}", f"- trains: {train}"]
        for data, recipe in p.recipes.items():
            lines.append(f"- on {DATA.get(data, data)}: " + ", ".join(f"{k}={v}" for k, v in recipe.items()))
        if p.stream or p.stream_model:
            lines.append("- at batch 1: " + ", ".join(f"{k}={v}" for k, v in {**p.stream, **p.stream_model}.items()))
        if p.backprop:
            lines.append("- its backprop twin: " + ", ".join(f"{k}={v}" for k, v in p.backprop.items()))
        measured = _best_rows(p.name)
        lines.append("- measured: " + ("; ".join(measured) if measured else "no benchmark row"))
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + ("\n\n<sub>Source: `edgeff.presets.PRESETS`; measured figures from "
                                 "`bench/results/accuracy.json`.</sub>\n")


TABLES: dict[str, Callable[[], str]] = {
    "results": results_table,
    "memory-summary": memory_summary,
    "accuracy-mnist": lambda: accuracy_table("mnist"),
    "accuracy-fashion-mnist": lambda: accuracy_table("fashion-mnist"),
    "accuracy-cifar10": lambda: accuracy_table("cifar10"),
    "stream": stream_table,
    "readout-probe": readout_probe_table,
    "cli": cli_table,
    "process": process_table,
    "step": step_table,
    "split": split_table,
    "add": add_table,
    "device": device_table,
    "hostile": hostile_table,
    "edge-device": edge_device_table,
    "latency": latency_table,
    "pipeline": pipeline_table,
    "presets": presets_page,
}


def render(text: str) -> str:
    def fill(m: re.Match[str]) -> str:
        name = m.group(2)
        if name not in TABLES:
            raise KeyError(f"unknown table {name!r} (known: {', '.join(TABLES)})")
        return m.group(1) + TABLES[name]() + m.group(4)

    return BLOCK.sub(fill, text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 if a table differs from the JSON")
    args = ap.parse_args()
    stale = []
    for page in PAGES:
        text = page.read_text()
        new = render(text)
        if new != text:
            stale.append(page.relative_to(ROOT))
            if not args.check:
                page.write_text(new)
    verb = "differ from bench/results" if args.check else "rewritten"
    print(f"{len(stale)} page(s) {verb}" + (": " + ", ".join(map(str, stale)) if stale else ""))
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
