import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from edgeff.cli.app import app
from typer.testing import CliRunner

from edgeff import checkpoint

runner = CliRunner()


def _accuracy(output: str) -> float:
    m = re.search(r"test accuracy ([\d.]+)%", output)
    assert m, output
    return float(m.group(1)) / 100


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "model.pt"
    res = runner.invoke(app, ["train", "--samples", "3000", "--epochs", "2", "--batch-size", "50", "--device", "cpu",
                              "--out", str(path), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert _accuracy(res.output) > 0.6  # real MNIST, chance is 0.1
    return path


def test_train_then_eval_on_builtin_data(trained: Path) -> None:
    res = runner.invoke(app, ["eval", str(trained), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert _accuracy(res.output) > 0.6
    assert "layer 2 alone" in res.output
    res = runner.invoke(app, ["eval", str(trained), "--layers", "last", "--limit", "200", "--json"])
    assert res.exit_code == 0 and '"n": 200' in res.output


def test_backprop_baseline_and_resume(tmp_path: Path) -> None:
    path = tmp_path / "bp.pt"
    args = ["train", "--preset", "trifecta-cnn", "--backprop", "--samples", "1000", "--batch-size", "25", "--epochs", "1",
            "--device", "cpu",
            "--out", str(path), "--no-progress"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert _accuracy(res.output) > 0.3
    args[args.index("--epochs") + 1] = "2"
    res = runner.invoke(app, [*args, "--resume"])
    assert res.exit_code == 0 and "resuming" in res.output, res.output
    assert torch.load(path, weights_only=True)["samples_seen"] == 2000


def test_train_with_the_lda_predictor_then_export(tmp_path: Path) -> None:
    path = tmp_path / "lda.pt"
    res = runner.invoke(app, ["train", "--preset", "symba-mlp", "--predictor", "lda", "--samples", "1000", "--epochs",
                              "1", "--batch-size", "50", "--device", "cpu", "--out", str(path), "--no-progress"])
    assert res.exit_code == 0, res.output
    acc = _accuracy(res.output)
    assert acc > 0.8
    res = runner.invoke(app, ["export", str(path), "--out", str(tmp_path / "lda.onnx")])
    assert res.exit_code == 0, res.output
    rel = re.search(r"\(([0-9.e+-]+) of the largest score\)", res.output)
    assert rel is not None and float(rel.group(1)) < 1e-5, res.output  # float32 rounding, whatever the scale
    res = runner.invoke(app, ["eval", str(tmp_path / "lda.onnx"), "--json"])
    assert res.exit_code == 0, res.output
    assert abs(json.loads(res.output)["accuracy"] - acc) <= 0.002  # onnxruntime on the solved readout


def test_eval_layers_choose_what_the_lda_readout_reads(tmp_path: Path) -> None:
    from edgeff import checkpoint

    accs = {}
    for layers in ("last", "all"):
        path = tmp_path / f"{layers}.pt"
        res = runner.invoke(app, ["train", "--preset", "symba-mlp", "--predictor", "lda", "--eval-layers", layers,
                                  "--samples", "500", "--epochs", "1", "--batch-size", "50", "--device", "cpu",
                                  "--out", str(path), "--no-progress"])
        assert res.exit_code == 0, res.output
        learner, _ = checkpoint.load(path, device="cpu")
        assert learner.train_cfg.eval_layers == layers
        assert learner.predictor.idx == ([1] if layers == "last" else [0, 1])
        accs[layers] = _accuracy(res.output)
    assert min(accs.values()) > 0.7  # both readouts learned (which layers each reads: the idx above)


def test_train_with_two_augmented_views(tmp_path: Path) -> None:
    path = tmp_path / "cff.pt"
    res = runner.invoke(app, ["train", "--preset", "cff-mlp", "--samples", "1000", "--epochs", "2", "--batch-size", "50",
                              "--views", "2", "--crop-padding", "1", "--device", "cpu", "--out", str(path),
                              "--no-progress"])
    assert res.exit_code == 0, res.output
    assert _accuracy(res.output) > 0.5  # 0.69 here (τ = 0.07 starts slowly: 0.33 after one epoch)
    saved = torch.load(path, weights_only=True)
    assert saved["samples_seen"] == 2000  # two views of a sample count once


def test_batch_one_streams_with_the_recipe_unless_told_otherwise(tmp_path: Path) -> None:
    """--batch-size 1 gets the stream recipe (lr 1e-4 constant, window 8), says so, and resumes with it;
    what the user sets wins."""
    from edgeff import checkpoint

    path = tmp_path / "s.pt"
    args = ["train", "--preset", "cfl-mlp", "--samples", "60", "--epochs", "1", "--batch-size", "1", "--device", "cpu",
            "--out", str(path), "--no-progress"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "streaming at batch 1: lr 0.0001 constant, window 8" in res.output
    learner, _ = checkpoint.load(path)
    tc = learner.train_cfg
    assert (tc.lr, tc.lr_final, tc.window, tc.views, tc.crop_padding) == (1e-4, None, 8, 1, 0)
    assert learner.samples_seen == 60 and learner.step == 60
    res = runner.invoke(app, [*args[:-3], "--out", str(tmp_path / "t.pt"), "--window", "0", "--lr", "3e-4",
                              "--no-progress"])
    assert res.exit_code == 0 and "lr 0.0003 constant, no window" in res.output, res.output
    res = runner.invoke(app, [*args, "--window", "-2"])
    assert res.exit_code != 0 and "--window must be 0" in res.output


def test_stream_line_names_every_way_the_readout_is_solved(tmp_path: Path) -> None:
    """An lda readout that follows the stream and also keeps a window is re-solved from the window when the pass
    is complete: the stream line says both (learner API settings the CLI has no flags for)."""
    from dataclasses import replace

    from edgeff.run import Run, RunOptions

    run = Run(RunOptions(preset="ff-mlp", samples=10, epochs=1, batch_size=1, device="cpu", out=tmp_path / "r.pt"))
    tc = run.learner.train_cfg
    run.learner.train_cfg = replace(tc, readout_memory=500, readout_window=0)
    assert (run.stream_note() or "").endswith("; its lda readout follows the stream")
    run.learner.train_cfg = replace(tc, readout_memory=500, readout_window=300)
    assert (run.stream_note() or "").endswith("; its lda readout follows the stream and is solved when the pass "
                                              "is complete, from the last 300 samples, kept in memory")
    run.learner.train_cfg = replace(tc, readout_memory=0, readout_window=0)
    assert (run.stream_note() or "").endswith("; its lda readout is solved when the pass is complete, from one "
                                              "more pass over the data")


def test_a_stream_saved_before_its_plan_is_complete_evaluates_from_its_window(tmp_path: Path) -> None:
    """ff-mlp streams at batch 1 with an lda readout solved from a window when its plan is complete; a checkpoint
    saved before that (one of two planned epochs) is evaluated by `edgeff eval` from the samples its window holds,
    which it says, at the accuracy `solve_readout()` gives the same checkpoint through the library."""
    from edgeff import evaluate
    from edgeff.data import load_data
    from edgeff.errors import UnsupportedError

    path = tmp_path / "s.pt"
    res = runner.invoke(app, ["train", "--preset", "ff-mlp", "--samples", "120", "--epochs", "1", "--lr-epochs", "2",
                              "--batch-size", "1", "--device", "cpu", "--out", str(path), "--no-progress"])
    assert res.exit_code == 0 and "solved it from the 120 samples its window holds" in res.output, res.output
    res = runner.invoke(app, ["eval", str(path), "--device", "cpu", "--no-progress", "--limit", "300", "--json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.output)["accuracy"]
    res = runner.invoke(app, ["eval", str(path), "--device", "cpu", "--no-progress", "--limit", "300"])
    assert "solved it from the 120 samples its window holds" in res.output, res.output
    learner, _ = checkpoint.load(path)
    with pytest.raises(UnsupportedError, match="has not been solved yet"):  # saved unsolved, to resume
        learner.predict_many(torch.zeros(1, 1, 28, 28))
    learner.solve_readout()
    assert got == evaluate(learner, load_data("builtin").test_batches(500, limit=300)).accuracy


def test_shrinkage_sets_a_new_models_lda_readout(tmp_path: Path) -> None:
    """--shrinkage reaches the lda readout a new model solves, is refused where nothing reads it and on a resumed
    run, and changes the readout it solves."""
    base = ["train", "--preset", "symba-mlp", "--samples", "200", "--epochs", "1", "--device", "cpu", "--no-progress"]
    scores = {}
    for shr in ("0.5", None):
        path = tmp_path / f"m{shr}.pt"
        res = runner.invoke(app, [*base, "--predictor", "lda", "--out", str(path), *(["--shrinkage", shr] if shr else [])])
        assert res.exit_code == 0, res.output
        learner, _ = checkpoint.load(path)
        assert learner.model_cfg.shrinkage == (0.5 if shr else 0.01) == learner.predictor.shrinkage  # type: ignore[attr-defined]
        scores[shr] = learner.scores(torch.zeros(2, 1, 28, 28))
    assert not torch.allclose(scores["0.5"], scores[None])
    res = runner.invoke(app, [*base, "--shrinkage", "0.5", "--out", str(tmp_path / "g.pt")])
    assert res.exit_code != 0 and "the goodness predictor does not use it (add --predictor lda)" in res.output, res.output
    res = runner.invoke(app, [*base, "--predictor", "lda", "--shrinkage", "0.1", "--out", str(tmp_path / "m0.5.pt"),
                              "--resume"])
    assert res.exit_code != 0 and "a resumed run keeps" in res.output, res.output


def test_readout_size_pools_the_lda_readouts_conv_maps(tmp_path: Path) -> None:
    """--readout-size reaches a conv model's lda readout (layer 3's 14x14 maps read as 7x7) and is refused, in one
    line, where nothing reads it."""
    base = ["train", "--preset", "trifecta-cnn", "--schedule", "all", "--samples", "40", "--batch-size", "20",
            "--epochs", "1", "--device", "cpu", "--no-progress"]
    # size 0 reads the maps as they are: on layers 5-6 (7x7, 3x3) to keep the solve small (layers 3-6 unpooled
    # are 11,552 features, a 1 GB Gram matrix and most of this test's time)
    for size, layers, dim in (("7", "last:4", 1568 + 1568 + 3136 + 576), ("0", "last:2", 3136 + 576)):
        path = tmp_path / f"s{size}.pt"
        res = runner.invoke(app, [*base, "--predictor", "lda", "--readout-size", size, "--eval-layers", layers,
                                  "--out", str(path)])
        assert res.exit_code == 0, res.output
        learner, _ = checkpoint.load(path)
        assert learner.train_cfg.readout_size == int(size) and learner.predictor.stats.dim == dim  # type: ignore[attr-defined]
    res = runner.invoke(app, [*base, "--predictor", "goodness", "--readout-size", "7", "--out", str(tmp_path / "g.pt")])
    assert res.exit_code != 0 and "does not use readout_size=7" in res.output, res.output


def test_batch_one_streams_with_the_recipes_model(tmp_path: Path) -> None:
    """ff-mlp's stream recipe changes its model (no peer normalisation, a plain ReLU): a new model at batch 1
    takes it and says so, a batch of 10 keeps the preset's, and a resumed stream keeps the model it has."""
    from edgeff import checkpoint

    runs = {}
    for b in ("1", "10"):
        path = tmp_path / f"b{b}.pt"
        args = ["train", "--preset", "ff-mlp", "--samples", "30", "--epochs", "1", "--batch-size", b, "--device",
                "cpu", "--out", str(path), "--no-progress"]
        res = runner.invoke(app, args)
        assert res.exit_code == 0, res.output
        runs[b] = (res.output, checkpoint.load(path)[0].model_cfg)
    out, model = runs["1"]
    assert "the preset's model streams with peer_norm=0.0, relu_grad=zero" in out, out
    assert (model.peer_norm, model.relu_grad) == (0.0, "zero")
    assert "its lda readout is solved when the pass is complete, from the last 10000 samples, kept in memory" in out
    assert int(checkpoint.load(tmp_path / "b1.pt")[0].predictor.window_seen) == 30  # type: ignore[attr-defined]
    assert (runs["10"][1].peer_norm, runs["10"][1].relu_grad) == (0.06, "pass")
    assert "streams with" not in runs["10"][0]
    res = runner.invoke(app, ["train", "--preset", "ff-mlp", "--samples", "30", "--epochs", "2", "--batch-size", "1",
                              "--device", "cpu", "--out", str(tmp_path / "b1.pt"), "--resume", "--no-progress"])
    assert res.exit_code == 0 and "resuming" in res.output, res.output
    resumed = checkpoint.load(tmp_path / "b1.pt")[0]
    assert resumed.samples_seen == 60 and resumed.model_cfg.peer_norm == 0.0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--preset", "nope"], "unknown preset 'nope'"),
        (["train", "--data", "mnist", "--data-dir", "/nonexistent/dir"], "does not exist"),
        (["train", "--data", "fashion-mnist", "--data-dir", "."], "FashionMNIST/raw"),
        (["train", "--data", "mnist"], "needs --data-dir"),
        (["train", "--batch-size", "0"], "--batch-size must be at least 1"),
        (["train", "--epochs", "0"], "--epochs must be at least 1"),
        (["eval", "missing.pt"], "does not exist"),
        (["train", "--preset", "cff-mlp", "--views", "3"], "views must be 1 (one-forward) or 2"),
        (["train", "--preset", "symba-mlp", "--views", "2"], "a goodness learner does not use views=2"),
        (["train", "--predictor", "softmax"], "unknown predictor 'softmax'; choose one of goodness, head, lda"),
        (["train", "--preset", "cfl-mlp", "--predictor", "lda"], "does not use predictor='lda'"),
        (["train", "--eval-layers", "first"], "unknown layer selection 'first'; use all, all-but-first, last or last:K"),
        (["train", "--eval-layers", "last:0"], "bad layer selection 'last:0': use last:K with K >= 1"),
        (["train", "--eval-layers", "last:3"], "last:3 asks for 3 layers but the model has 2; use last:2 or all"),
        # each of these raised a traceback (or silently did the wrong thing) before
        (["train", "--lr", "nan"], "--lr must be a positive finite number"),
        (["train", "--lr", "inf"], "--lr must be a positive finite number"),
        (["train", "--lr", "-1"], "--lr must be a positive finite number"),
        (["train", "--device", "tpu"], "unknown device 'tpu'"),
        (["train", "--out", "/"], "is a folder"),
        (["train", "--out", "/proc/nonexistent/m.pt"], "cannot create the folder"),
        (["train", "--samples", "-3"], "--samples must be at least 1"),
        (["device", "stream", "--port", "/dev/null", "--samples", "-5"], "--samples must be at least 1"),
    ],
)
def test_user_errors_give_one_clear_message(args: list[str], message: str) -> None:
    res = runner.invoke(app, args)
    assert res.exit_code == 2
    assert message in " ".join(res.output.split()), res.output
    assert "Traceback" not in res.output


def test_bad_files_and_layer_choices_give_one_clear_message(tmp_path: Path, trained: Path) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a protobuf")
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    foreign = tmp_path / "foreign.onnx"
    onnx.save(helper.make_model(graph), str(foreign))
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(b"not a png")
    np.save(tmp_path / "obj.npy", np.array([object()]), allow_pickle=True)
    for args, message in [
        (["eval", str(junk), "--backend", "onnx"], "not a readable ONNX file"),
        (["eval", str(foreign), "--backend", "onnx"], "not one `edgeff export` wrote"),
        (["eval", str(trained), "--layers", "last:7"], "asks for 7 layers but the model has 2"),
        (["add-class", str(trained), "--name", "cup", "--data", str(tmp_path / "imgs"), "--out", str(tmp_path / "o.pt")],
         "cannot read the image"),
        (["add-class", str(trained), "--name", "cup", "--data", str(tmp_path / "obj.npy"), "--out",
          str(tmp_path / "o.pt")], "cannot read pixels"),
    ]:
        res = runner.invoke(app, args)
        assert res.exit_code == 2 and message in " ".join(res.output.split()), res.output
        assert "Traceback" not in res.output


def test_add_class_leaves_its_input_untouched_unless_in_place(tmp_path: Path, trained: Path) -> None:
    model = tmp_path / "model.pt"
    model.write_bytes(trained.read_bytes())
    before = model.read_bytes()
    res = runner.invoke(app, ["add-class", str(model), "--name", "cup"])
    assert res.exit_code == 0, res.output
    assert model.read_bytes() == before and (tmp_path / "model-cup.pt").is_file()
    res = runner.invoke(app, ["add-class", str(model), "--name", "mug", "--in-place", "--out", str(tmp_path / "x.pt")])
    assert res.exit_code == 2 and model.read_bytes() == before  # both: refused before anything is written
    res = runner.invoke(app, ["add-class", str(model), "--name", "mug", "--in-place"])
    assert res.exit_code == 0 and model.read_bytes() != before


def test_predict_names_the_class_of_each_image(tmp_path: Path, trained: Path) -> None:
    from edgeff.exporters.onnx import export_onnx
    from PIL import Image

    from edgeff.data import load_data

    ds = load_data("builtin")
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(ds.x_test[i, 0]).save(folder / f"img{i}.png")
    learner, meta = checkpoint.load(trained)
    want = learner.predict_many(ds.normalise(ds.x_test[:4])).tolist()
    onnx_path = export_onnx(learner, tmp_path / "m.onnx", meta=meta)
    for model in (trained, onnx_path):  # a checkpoint and its ONNX export agree with the learner
        res = runner.invoke(app, ["predict", str(model), str(folder), "--json"])
        assert res.exit_code == 0, res.output
        preds = json.loads(res.output)
        assert [p["index"] for p in preds] == want and [Path(p["item"]).name for p in preds] == [
            f"img{i}.png" for i in range(4)]
    res = runner.invoke(app, ["predict", str(trained), str(folder / "img0.png")])
    assert res.exit_code == 0 and res.output.startswith(f"img0.png: {learner.class_names[want[0]]}"), res.output
    res = runner.invoke(app, ["predict", str(trained), str(tmp_path / "nothing")])
    assert res.exit_code == 2 and "neither" in res.output


def test_error_text_keeps_its_brackets(monkeypatch: pytest.MonkeyPatch) -> None:
    import edgeff.memory

    def no_matplotlib(*args: object, **kwargs: object) -> None:
        raise RuntimeError("--plot needs matplotlib: pip install -e \".[plot]\"")

    monkeypatch.setattr(edgeff.memory, "plot", no_matplotlib)
    res = runner.invoke(app, ["memory", "symba-mlp", "--plot", "x.png"])
    assert res.exit_code == 2 and '".[plot]"' in res.output, res.output  # rich markup would eat "[plot]"


def test_train_on_a_folder_of_ones_own_images(tmp_path: Path) -> None:
    from PIL import Image

    from edgeff.data import load_data

    ds = load_data("builtin")
    root = tmp_path / "mine"
    for digit, name in ((0, "zero"), (1, "one"), (7, "seven")):
        (root / name).mkdir(parents=True)
        for i, img in enumerate(ds.x_train[ds.y_train == digit][:40, 0]):
            Image.fromarray(img).resize((40, 40)).save(root / name / f"{i:03d}.png")  # resized back to 28x28
    out_path = tmp_path / "mine.pt"
    res = runner.invoke(app, ["train", "--preset", "symba-mlp", "--data", str(root), "--epochs", "3", "--out",
                              str(out_path), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "96 samples" in res.output and _accuracy(res.output) > 0.6  # 3 classes, 8 test images each
    learner, meta = checkpoint.load(out_path)
    assert learner.class_names == ("one", "seven", "zero") and meta["classes"] == ["one", "seven", "zero"]
    res = runner.invoke(app, ["eval", str(out_path), "--json", "--no-progress"])  # the folder is remembered
    assert res.exit_code == 0 and json.loads(res.output)["n"] == 24, res.output
    res = runner.invoke(app, ["predict", str(out_path), str(root / "seven" / "004.png")])
    assert res.exit_code == 0 and res.output.startswith("004.png: "), res.output
    (root / "one" / "broken.png").write_bytes(b"not an image")
    res = runner.invoke(app, ["train", "--data", str(root), "--out", str(tmp_path / "b.pt")])
    assert res.exit_code == 2 and "cannot read the image" in res.output and "broken.png" in res.output


def test_learn_continues_from_a_checkpoint_with_its_replay_buffer(tmp_path: Path) -> None:
    from PIL import Image

    from edgeff.data import load_data

    ds = load_data("builtin")

    def folder(name: str, digits: tuple[int, ...], n: int) -> Path:
        root = tmp_path / name
        for d in digits:
            (root / str(d)).mkdir(parents=True)
            for i, img in enumerate(ds.x_train[ds.y_train == d][:n, 0]):
                Image.fromarray(img).save(root / str(d) / f"{i:03d}.png")
        return root

    first, second = folder("first", (0, 1, 2), 30), folder("second", (2, 3), 30)
    base = tmp_path / "base.pt"
    res = runner.invoke(app, ["train", "--preset", "cfl-mlp-stream", "--data", str(first), "--epochs", "2",
                              "--out", str(base), "--no-progress"])
    assert res.exit_code == 0, res.output
    before = base.read_bytes()
    res = runner.invoke(app, ["learn", str(base), "--data", str(second), "--buffer", "40", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "new classes: 3" in res.output and "old classes " in res.output and "40 samples" in res.output
    assert base.read_bytes() == before  # written beside it, not over it
    learned = tmp_path / "base-learned.pt"
    learner, meta = checkpoint.load(learned)
    assert learner.class_names == ("0", "1", "2", "3") and meta["replay"]["size"] == 40
    # the next session replays the saved buffer (no --buffer): it round-trips through the checkpoint
    res = runner.invoke(app, ["learn", str(learned), "--data", str(second), "--in-place", "--no-progress"])
    assert res.exit_code == 0 and "new classes: none" in res.output and "40 samples" in res.output, res.output
    _, meta2 = checkpoint.load(learned)
    assert meta2["replay"]["seen"] == meta["replay"]["seen"] + 48  # 2 classes x 24 training images


def test_version_threads_and_a_legend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edgeff.cli.app import THREAD_VARS

    from edgeff import __version__

    for var in THREAD_VARS:  # --threads sets them for the process: restored (to absent) after this test
        monkeypatch.setenv(var, os.environ.get(var, "0"))
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # nor may it change the suite's threads

    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and __version__ in res.output
    res = runner.invoke(app, ["--threads", "0", "presets"])
    assert res.exit_code == 2 and "--threads must be at least 1" in res.output
    res = runner.invoke(app, ["--threads", "1", "train", "--preset", "cfl-mlp-stream", "--samples", "50", "--epochs",
                              "1", "--out", str(tmp_path / "c.pt")])
    assert res.exit_code == 0, res.output
    assert "Lk loss/norm" in res.output  # the contrastive family's live metrics, explained
    assert all(len(line) <= 80 for line in res.output.splitlines()), res.output


def test_resume_refuses_another_presets_checkpoint(tmp_path: Path, trained: Path) -> None:
    copy = tmp_path / "m.pt"
    shutil.copy(trained, copy)
    res = runner.invoke(app, ["train", "--preset", "ff-mlp", "--resume", "--out", str(copy), "--samples", "100",
                              "--no-progress"])
    assert res.exit_code == 2 and "holds a symba-mlp model, not ff-mlp" in " ".join(res.output.split())
    assert copy.read_bytes() == trained.read_bytes()


def test_resuming_with_more_epochs_equals_the_longer_run(tmp_path: Path) -> None:
    """Before: `--epochs 1` then `--epochs 3 --resume` ended the lr decay at epoch 1 (87.60% vs 88.00%). The
    decay follows the planned run (--lr-epochs), so the resumed run is the uninterrupted one, bit for bit."""
    common = ["train", "--samples", "300", "--batch-size", "50", "--device", "cpu", "--no-progress", "--lr-epochs", "3"]
    straight, part = tmp_path / "straight.pt", tmp_path / "part.pt"
    assert runner.invoke(app, [*common, "--epochs", "3", "--out", str(straight)]).exit_code == 0
    assert runner.invoke(app, [*common, "--epochs", "1", "--out", str(part)]).exit_code == 0
    res = runner.invoke(app, [*common[:-2], "--epochs", "3", "--out", str(part), "--resume"])
    assert res.exit_code == 0 and "planned over 3 epochs" in res.output, res.output
    a, b = torch.load(straight, weights_only=True), torch.load(part, weights_only=True)
    assert all(torch.equal(a["net"][k], b["net"][k]) for k in a["net"])


def test_periodic_checkpoints_survive_a_kill(tmp_path: Path) -> None:
    """`--checkpoint-every N` saves while training: a run killed mid-way resumes from its last save. A temp
    file a killed save left beside the checkpoint is removed by the next save."""
    path = tmp_path / "m.pt"
    stale = tmp_path / ".m.pt.999999999.tmpxyz"  # a writer pid that cannot exist
    stale.write_bytes(b"half a checkpoint")
    cmd = [sys.executable, "-m", "edgeff.cli.app", "train", "--samples", "3000", "--epochs", "20", "--batch-size", "10",
           "--device", "cpu", "--no-progress", "--out", str(path), "--checkpoint-every", "200"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (path.exists() and torch.load(path, weights_only=True)["samples_seen"] >= 400):
            time.sleep(0.2)
    finally:
        proc.kill()
        proc.wait()
    seen = torch.load(path, weights_only=True)["samples_seen"]
    assert seen >= 400 and seen % 10 == 0 and not stale.exists()
    res = runner.invoke(app, ["train", "--samples", "3000", "--epochs", "1", "--batch-size", "10", "--device", "cpu",
                              "--no-progress", "--out", str(path), "--resume"])
    assert res.exit_code == 0 and f"resuming {path} at {seen} samples" in " ".join(res.output.split()), res.output


def test_corrupt_and_incompatible_checkpoints(tmp_path: Path, trained: Path) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00garbage")
    res = runner.invoke(app, ["eval", str(bad)])
    assert res.exit_code == 2 and "corrupt" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["eval", str(trained), "--data", "cifar10-exact", "--data-dir", str(tmp_path)])
    assert res.exit_code == 2 and "CIFAR10" in res.output


def test_presets_lists_every_paper() -> None:
    res = runner.invoke(app, ["presets"])
    assert res.exit_code == 0
    for name in ("ff-mlp", "symba-mlp", "trifecta-cnn", "bp-mlp", "bp-cnn"):
        assert name in res.output


def test_console_script_runs(tmp_path: Path) -> None:
    exe = shutil.which("edgeff") or str(Path(sys.executable).parent / "edgeff")
    proc = subprocess.run([exe, "train", "--samples", "400", "--epochs", "1", "--device", "cpu", "--no-progress",
                           "--out", str(tmp_path / "m.pt")], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "test accuracy" in proc.stdout and (tmp_path / "m.pt").is_file()
    proc = subprocess.run([exe, "train", "--preset", "nope"], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2 and "unknown preset" in proc.stderr and "Traceback" not in proc.stderr


@pytest.fixture
def sim_port(tmp_path: Path):  # type: ignore[no-untyped-def]
    """`edgeff device-sim` as a real subprocess of the console script, on a pty."""
    exe = shutil.which("edgeff") or str(Path(sys.executable).with_name("edgeff"))
    proc = subprocess.Popen([exe, "device-sim", "--budget", "8MiB", "--state-dir", str(tmp_path / "dev")],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("port: "), line
    yield line.split("port: ", 1)[1].strip()
    proc.kill()
    proc.wait()


def test_cli_device_load_stream_eval_info(sim_port: str, trained: Path, tmp_path: Path) -> None:
    res = runner.invoke(app, ["device", "info", "--port", sim_port])
    assert res.exit_code == 0, res.output
    assert "no model loaded" in res.output and "8192.0 KiB" in res.output
    res = runner.invoke(app, ["device", "load", "--port", sim_port, "--preset", "device-embed", "--layers", "64,64"])
    assert res.exit_code == 0, res.output
    assert "loaded fresh device-embed model [64, 64]" in res.output
    res = runner.invoke(app, ["device", "stream", "--port", sim_port, "--samples", "1500", "--batch-size", "10"])
    assert res.exit_code == 0, res.output
    assert "1500 samples" in res.output and "device memory peak" in res.output
    res = runner.invoke(app, ["device", "eval", "--port", sim_port, "--limit", "500"])
    assert res.exit_code == 0, res.output
    m = re.search(r"device accuracy ([\d.]+)%", res.output)
    assert m and float(m.group(1)) > 50  # one pass over 1,500 real images, chance is 10%
    res = runner.invoke(app, ["device", "info", "--port", sim_port])
    assert res.exit_code == 0 and "samples seen 1500" in res.output, res.output
    # online class addition on the device, from an array of real images
    from edgeff.data import load_data

    ds = load_data("builtin")
    np.save(tmp_path / "sevens.npy", ds.x_test[ds.y_test == 7][:10])
    res = runner.invoke(app, ["device", "add-class", "--port", sim_port, "--name", "seven-b", "--data",
                              str(tmp_path / "sevens.npy")])
    assert res.exit_code == 0 and "as index 10" in res.output, res.output
    res = runner.invoke(app, ["device", "add-class", "--port", sim_port, "--name", "seven-b"])
    assert res.exit_code == 2 and "already exists" in res.output, res.output
    # a trained symba-mlp checkpoint becomes an edge model on the way; at 2x1000 with Adam it does not fit in 8 MiB,
    # which the device says in one line before the upload
    res = runner.invoke(app, ["device", "load", "--port", sim_port, "--checkpoint", str(trained)])
    assert res.exit_code == 2 and "over by" in res.output and "Traceback" not in res.output, res.output


def test_cli_device_errors(sim_port: str) -> None:
    res = runner.invoke(app, ["device", "eval", "--port", sim_port, "--limit", "10"])
    assert res.exit_code == 2 and "no model loaded" in res.output
    res = runner.invoke(app, ["device", "info", "--port", "/nonexistent/tty"])
    assert res.exit_code == 2 and "error" in res.output
