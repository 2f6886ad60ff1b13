"""The train options are declared once (edgeff.options.TRAIN): `edgeff train` (typer) and `edgeff-edge train`
(argparse) take exactly the declared options of their runtime, spelled, typed and defaulted alike, and parse
the same command line to the same values; the edge commands load neither typer, rich nor pydantic."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import typer

from edgeff.options import TRAIN, check_choices, options


def _torch_train():  # type: ignore[no-untyped-def]
    from edgeff.cli.app import app

    group = typer.main.get_command(app)
    return group.commands["train"]  # type: ignore[attr-defined, no-any-return]


def _edge_train():  # type: ignore[no-untyped-def]
    from edgeff.cli.edge import parser

    sub = next(a for a in parser()._actions if a.dest == "command")
    return sub.choices["train"]


def test_each_cli_takes_exactly_its_declared_options_with_one_spelling_type_and_default():
    params = {p.name: p for p in _torch_train().params}
    assert set(params) == {o.name for o in options("torch")}
    for o in options("torch"):
        p = params[o.name]
        assert o.spelling in p.opts, (o.name, p.opts)
        assert p.default == o.default, (o.name, p.default, o.default)
        assert p.type_descriptor.annotation is o.type, (o.name, p.type_descriptor)
        if o.negatable:
            assert o.off_spelling in p.secondary_opts, (o.name, p.secondary_opts)
    actions = {}
    for a in _edge_train()._actions:
        if a.dest != "help":
            actions.setdefault(a.dest, []).append(a)
    assert set(actions) == {o.name for o in options("edge")}
    for o in options("edge"):
        spellings = {s for a in actions[o.name] for s in a.option_strings}
        assert spellings == ({o.spelling, o.off_spelling} if o.negatable else {o.spelling}), (o.name, spellings)
        a = actions[o.name][0]
        assert a.default == o.default, (o.name, a.default, o.default)
        assert (a.type or bool) is o.type or (o.type is bool and a.type is None), (o.name, a.type)
    shared = {o.name for o in options("torch")} & {o.name for o in options("edge")}
    assert {"preset", "data", "data_dir", "epochs", "samples", "batch_size", "lr", "schedule", "seed", "out_path",
            "resume", "progress", "views", "window", "predictor", "eval_layers", "shrinkage", "readout_size"} <= shared


def test_both_clis_parse_a_command_line_to_the_same_values():
    argv = ["--preset", "cfl-mlp", "--data", "mnist", "--data-dir", "d", "--epochs", "3", "--samples", "70",
            "--batch-size", "7", "--lr", "0.25", "--schedule", "greedy", "--seed", "5", "--out", "m.x", "--resume",
            "--no-progress", "--views", "2", "--window", "4", "--predictor", "lda", "--eval-layers", "last:2",
            "--shrinkage", "0.5", "--readout-size", "3"]
    torch_values = _torch_train().make_context("train", list(argv)).params
    edge_values = vars(_edge_train().parse_args(list(argv)))
    for name in {o.name for o in options("edge")} & {o.name for o in options("torch")}:
        assert torch_values[name] == edge_values[name], (name, torch_values[name], edge_values[name])
    assert edge_values["seed"] == 5 and edge_values["progress"] is False and edge_values["out_path"] == Path("m.x")
    defaults = _torch_train().make_context("train", []).params
    assert all(defaults[o.name] == o.default for o in options("torch"))


def test_a_value_outside_an_options_choices_is_refused_in_one_line_by_both(edge_cli):  # type: ignore[no-untyped-def]
    from edgeff.errors import InputError

    with pytest.raises(InputError, match="unknown predictor 'softmax'; choose one of goodness, head, lda"):
        check_choices({"predictor": "softmax"}, "edge")
    res = edge_cli(["train", "--predictor", "softmax"])
    assert res.exit_code == 2 and res.output.strip().splitlines() == [
        "error: unknown predictor 'softmax'; choose one of goodness, head, lda"]
    res = edge_cli(["train", "--epochs", "three"])
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1 and "invalid int value" in res.output
    assert all(o.choices == () or o.default is None or o.default in o.choices for o in TRAIN)


def test_the_edge_commands_load_no_typer_rich_pydantic_or_torch(tmp_path):
    code = ("import sys; from edgeff.cli.edge import main; "
            f"assert main(['train', '--samples', '64', '--epochs', '1', '--batch-size', '32', '--out', "
            f"{str(tmp_path / 'm.npz')!r}]) == 0; "
            f"assert main(['eval', {str(tmp_path / 'm.npz')!r}, '--limit', '50']) == 0; "
            "heavy = {'typer', 'rich', 'pydantic', 'click', 'torch', 'onnxruntime'} & {m.split('.')[0] for m in "
            "sys.modules}; assert not heavy, heavy")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr
    assert "test accuracy" in res.stdout


@pytest.mark.parametrize("argv", [
    ["--preset", "cfl-mlp", "--batch-size", "1"],  # the stream recipe: lr, window, model changes
    ["--preset", "symba-mlp", "--batch-size", "16", "--predictor", "lda", "--shrinkage", "0.5", "--seed", "3"],
    ["--preset", "trifecta-cnn", "--batch-size", "8", "--predictor", "goodness", "--schedule", "all"],  # lda's dropped
    ["--preset", "slda-conv", "--batch-size", "1", "--shrinkage", "0.02"],
])
def test_both_runtimes_build_a_new_run_from_one_specification(argv, tmp_path):  # type: ignore[no-untyped-def]
    """`edgeff train` and `edgeff-edge train` build the run a command line asks for through one specification
    (edgeff.spec): the learners they build have the same model and train configs (torch's device, optimizer
    state and frugal step aside)."""
    from dataclasses import replace

    from edgeff.edge.run import train_run
    from edgeff.run import Run
    from edgeff.spec import RunOptions

    argv = [*argv, "--samples", "8", "--epochs", "1"]
    t = _torch_train().make_context("train", [*argv, "--out", str(tmp_path / "t.pt"), "--device", "cpu"]).params
    e = vars(_edge_train().parse_args([*argv, "--out", str(tmp_path / "e.npz")]))
    torch_run = Run(RunOptions(**{o.name: t[o.name] for o in options("torch") if o.name in RunOptions.__dataclass_fields__},
                               out=t["out_path"]))
    edge = train_run(RunOptions(**{o.name: e[o.name] for o in options("edge") if o.name in RunOptions.__dataclass_fields__},
                                out=e["out_path"])).learner
    tl = torch_run.learner
    assert edge.model_cfg == tl.model_cfg
    assert edge.train_cfg == replace(tl.train_cfg, device="auto", optim_state_dtype="float32", frugal=True)
