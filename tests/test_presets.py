"""A preset's defaults are its measured recipe: `edgeff train --preset P --data D` trains exactly what the bench row
for P on D (bench/results/accuracy.json, the figure the docs print) was measured with."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from edgeff.presets import PRESETS, for_data, stream_preset, stream_train

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results" / "accuracy.json"
FIELDS = ("lr", "lr_final", "lr_hold", "batch_size", "schedule", "views", "crop_padding", "hflip", "window",
          "predictor", "eval_layers", "readout_size", "readout_window", "readout_memory")


def _default_rows() -> list[dict]:
    """The rows measured with a preset's recipe (job PRESET:DATA or stream:PRESET:DATA; PRESET:DATA:VARIANT rows
    are screens), except those marked superseded (a recipe since changed, not rerun: the mark says which)."""
    rows = json.loads(RESULTS.read_text())
    return [r for r in rows if r["job"] in (f"{r['preset']}:{r['dataset']}", f"stream:{r['preset']}:{r['dataset']}")
            and "superseded" not in r]


@pytest.mark.parametrize("row", _default_rows(), ids=lambda r: f"{r['job']}-{r['test_acc']}")
def test_each_measured_row_is_its_presets_recipe(row: dict) -> None:
    p = for_data(PRESETS[row["preset"]], row["dataset"])
    train = p.train
    if row["mode"] == "stream":
        p = stream_preset(p, 1)
        train = stream_train(p, replace(train, batch_size=1, epochs=1))
    want = {f: getattr(train, f) for f in FIELDS}
    want["shrinkage"] = p.model.shrinkage if train.predictor == "lda" else None
    got = {f: row[f] for f in (*FIELDS, "shrinkage") if row.get(f) is not None}  # older rows lack some fields
    if got.get("predictor") == "lda" and row.get("readout_size") is None:
        got["readout_size"] = 0  # rows from before the field read maps as they were
    assert got == {f: want[f] for f in got}, "the row was measured with another recipe than the preset's default"
    assert row["epochs"] <= train.epochs  # a CPU budget may stop a run before its plan ends
    if "epochs_planned" in row:
        assert row["epochs_planned"] == train.epochs


def test_every_preset_recipe_names_a_data_set_and_real_fields() -> None:
    from edgeff.edge.data import DATASETS

    for p in PRESETS.values():
        for data, changes in p.recipes.items():
            assert data in DATASETS, (p.name, data)
            for_data(p, data)  # every field is a TrainConfig or ModelConfig field (replace raises otherwise)
            assert changes


def test_another_predictor_than_the_recipes_lda_needs_no_other_flag(tmp_path: Path) -> None:
    """trifecta-cnn's recipe predicts by an lda readout (readout_size 7, shrinkage 0.003): `--predictor goodness`
    alone trains (the readout's settings go back to their defaults instead of being refused as unread), in
    both runtimes; `--shrinkage` with it is still refused."""
    from edgeff.edge.run import train_run
    from edgeff.errors import InputError
    from edgeff.run import Run, RunOptions

    run = Run(RunOptions(preset="trifecta-cnn", predictor="goodness", samples=20, epochs=1, device="cpu",
                         out=tmp_path / "g.pt"))
    assert run.learner.train_cfg.readout_size == 0 and run.learner.model_cfg.shrinkage == 1e-2
    assert Run(RunOptions(preset="trifecta-cnn", samples=20, epochs=1, device="cpu",
                          out=tmp_path / "l.pt")).learner.model_cfg.shrinkage == 3e-3
    res = train_run(preset="trifecta-cnn", data="builtin", out=tmp_path / "g.npz", epochs=1, samples=16, batch_size=8,
                    predictor="goodness", schedule="all")  # the edge runtime has no olu
    assert res.learner.train_cfg.readout_size == 0 and res.learner.model_cfg.shrinkage == 1e-2
    with pytest.raises(InputError, match="shrinkage"):
        Run(RunOptions(preset="trifecta-cnn", predictor="goodness", shrinkage=0.1, samples=20, epochs=1,
                       device="cpu", out=tmp_path / "s.pt"))
