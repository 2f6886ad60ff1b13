import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from edgeff.cli.app import app
from edgeff.exporters.onnx import OnnxPredictor, export_layers, export_onnx, parity, quantize_onnx
from typer.testing import CliRunner

from edgeff import Learner, get_preset, make_learner
from edgeff.checkpoint import load, save
from edgeff.errors import InputError
from edgeff.presets import PRESETS, with_changes
from edgeff.trainer import train_epochs

EXPORTABLE = [n for n in PRESETS if not n.endswith("-paper") and n != "cff-vit"]  # cff-vit: CIFAR-shaped, below


def _trained(name: str, mnist_small, **train_kw):  # type: ignore[no-untyped-def]
    p = PRESETS[name]
    learner = make_learner(name, train=replace(p.train, device="cpu", **train_kw))
    train_epochs(learner, mnist_small, epochs=1, batch_size=50, limit=600)
    learner.ready_to_predict(lambda: mnist_small.train_batches(500, limit=600))  # a plan not complete yet (lda)
    return learner


@pytest.mark.parametrize("name", [*EXPORTABLE, "symba-mlp+head", "symba-mlp+lda"])
def test_onnxruntime_matches_torch_on_real_images(name: str, mnist_small, tmp_path: Path) -> None:
    base, _, predictor = name.partition("+")
    learner = _trained(base, mnist_small, **({"predictor": predictor, "epochs": 1} if predictor else {}))
    path = export_onnx(learner, tmp_path / "m.onnx", meta={"preset": base, "dataset": "builtin"})
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert model.opset_import[0].version >= 17
    props = {p.key: p.value for p in model.metadata_props}
    assert props["preset"] == base and json.loads(props["input_shape"]) == [1, 28, 28]
    x, _ = next(mnist_small.test_batches(300))
    pred = OnnxPredictor(path)
    pr = parity(learner, pred, x)
    scores = learner.scores(x)
    scale = max(1.0, float(scores.abs().max()))
    assert pr["max_abs_diff"] <= 1e-4 * scale
    assert pr["max_rel_diff"] == pytest.approx(pr["max_abs_diff"] / float(scores.abs().max()), rel=1e-3)
    # the same label for every image, except a tie: torch's two best scores within the score tolerance
    # (ff-mlp on the builtin set has one image whose two best goodness sums are one float32 step apart)
    top2 = scores.topk(2, dim=1).values
    differ = learner.predict_many(x).numpy() != pred.predict_many(x)
    assert ((top2[:, 0] - top2[:, 1]).numpy()[differ] <= 1e-4 * scale).all()
    assert pr["agreement"] >= 1 - 1 / 100
    assert pred.predict_one(x[0]) == learner.predict_one(x[0])
    assert (pred.predict_many(x[:7]) == learner.predict_many(x[:7]).numpy()).all()  # any batch size


def test_goodness_layer_selection_is_exported(mnist_small, tmp_path: Path) -> None:
    learner = _trained("trifecta-cnn", mnist_small)
    x, _ = next(mnist_small.test_batches(100))
    path = export_onnx(learner, tmp_path / "m.onnx", layers="last:3")
    learner.net.eval()
    want = learner.net.label_goodness(x)[..., 3:].sum(-1).numpy()
    assert np.allclose(OnnxPredictor(path).scores(x.numpy()), want, atol=1e-4)


def test_per_layer_files_chain_to_the_torch_features(mnist_small, tmp_path: Path) -> None:
    import onnxruntime as ort

    learner = _trained("trifecta-cnn", mnist_small)
    assert isinstance(learner, Learner)
    manifest = json.loads(export_layers(learner, tmp_path / "layers").read_text())
    assert len(manifest["layers"]) == 6
    x, y = next(mnist_small.test_batches(20))
    learner.net.eval()
    z = learner.net.encoder(x, y)
    feats = learner.net.features(z)
    h = z.detach().numpy()
    for entry, want in zip(manifest["layers"], feats, strict=True):
        sess = ort.InferenceSession(str(tmp_path / "layers" / entry["file"]), providers=["CPUExecutionProvider"])
        h, g = sess.run(["h", "g"], {"x": h})
        assert np.allclose(h, want.numpy(), atol=1e-4)
        assert np.allclose(g, want.pow(2).flatten(1).mean(1).numpy(), atol=1e-4)
    codes = np.load(tmp_path / "layers" / manifest["label_codes"])
    assert codes.shape == (10, 1, 28, 28)


def test_int8_static_and_dynamic(mnist_small, tmp_path: Path) -> None:
    learner = _trained("symba-mlp", mnist_small)
    fp32 = export_onnx(learner, tmp_path / "m.onnx")
    cal = [x.numpy() for x, _ in mnist_small.train_batches(50, limit=200)]
    x, _ = next(mnist_small.test_batches(300))
    ref = OnnxPredictor(fp32).predict_many(x)
    for mode in ("static", "dynamic"):
        q = quantize_onnx(fp32, tmp_path / f"{mode}.onnx", mode=mode, calibration=cal)
        assert q.stat().st_size < 0.3 * fp32.stat().st_size
        qp = OnnxPredictor(q)
        assert qp.meta["quantization"] == mode and qp.meta["input_shape"] == "[1, 28, 28]"
        assert (qp.predict_many(x) == ref).mean() > 0.95
    with pytest.raises(InputError, match="calibration"):
        quantize_onnx(fp32, tmp_path / "x.onnx", mode="static")


def test_exported_file_runs_with_onnxruntime_and_numpy_alone(mnist_small, tmp_path: Path) -> None:
    learner = _trained("trifecta-cnn", mnist_small)
    path = export_onnx(learner, tmp_path / "m.onnx")
    x, _ = next(mnist_small.test_batches(64))
    np.save(tmp_path / "x.npy", x.numpy())
    want = learner.predict_many(x).numpy()
    script = (
        "import sys, numpy as np, onnxruntime as ort\n"
        f"s = ort.InferenceSession({str(path)!r}, providers=['CPUExecutionProvider'])\n"
        f"x = np.load({str(tmp_path / 'x.npy')!r})\n"
        "scores, label = s.run(None, {'x': x})\n"
        "assert 'torch' not in sys.modules\n"
        "print(' '.join(map(str, label.tolist())))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert [int(v) for v in proc.stdout.split()] == want.tolist()


def test_onnx_predictor_rejects_bad_inputs(mnist_small, tmp_path: Path) -> None:
    learner = _trained("symba-mlp", mnist_small)
    pred = OnnxPredictor(export_onnx(learner, tmp_path / "m.onnx"))
    x = next(mnist_small.test_batches(4))[0].numpy()
    nan = x.copy()
    nan[0, 0, 0, 0] = np.nan
    for bad, msg in [(x[:, :, :20], "shape"), (x.astype(np.uint8), "float"), (nan, "NaN"),
                     (x[0, 0], "shape"), ("an image", "numpy array")]:
        with pytest.raises(InputError, match=msg):
            pred.predict_many(bad)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="one sample"):
        pred.predict_one(x)
    with pytest.raises(InputError, match="does not exist"):
        OnnxPredictor(tmp_path / "missing.onnx")


def test_cli_export_and_onnx_eval(mnist_small, tmp_path: Path) -> None:
    learner = _trained("symba-mlp", mnist_small)
    save(learner, tmp_path / "m.pt", meta={"dataset": "builtin", "preset": "symba-mlp"})
    runner = CliRunner()
    res = runner.invoke(app, ["export", str(tmp_path / "m.pt"), "--out", str(tmp_path / "m.onnx"), "--int8", "dynamic"])
    assert res.exit_code == 0, res.output
    assert "same label 100.00%" in res.output and "int8-dynamic" in res.output
    torch_res = runner.invoke(app, ["eval", str(tmp_path / "m.pt"), "--json"])
    onnx_res = runner.invoke(app, ["eval", str(tmp_path / "m.onnx"), "--backend", "onnx", "--json"])
    assert json.loads(torch_res.output)["accuracy"] == json.loads(onnx_res.output)["accuracy"]
    res = runner.invoke(app, ["export", str(tmp_path / "m.pt"), "--per-layer", "--out", str(tmp_path / "layers")])
    assert res.exit_code == 0 and (tmp_path / "layers" / "manifest.json").is_file()


def test_exported_scores_are_float32_with_dynamic_batch(mnist_small, tmp_path: Path) -> None:
    learner = _trained("bp-cnn", mnist_small)
    pred = OnnxPredictor(export_onnx(learner, tmp_path / "m.onnx"))
    for b in (1, 3, 65):
        s = pred.scores(torch.zeros(b, 1, 28, 28))
        assert s.shape == (b, 10) and s.dtype == np.float32


def test_vit_exports_with_parity(mnist_small, tmp_path: Path) -> None:
    learner = make_learner("cff-vit", input_shape=(1, 28, 28), train=replace(PRESETS["cff-vit"].train, device="cpu"))
    train_epochs(learner, mnist_small, epochs=1, batch_size=50, limit=200)
    path = export_onnx(learner, tmp_path / "vit.onnx")
    x, _ = next(mnist_small.test_batches(64))
    res = parity(learner, OnnxPredictor(path), x)
    assert res["agreement"] == 1.0 and res["max_abs_diff"] < 1e-4


def test_vit_lda_readout_exports_and_resumes(mnist_small, tmp_path: Path) -> None:
    """CFF's lda predictor (cff-vit's CIFAR-10 recipe): solved at the end of the plan on the tokens pooled over
    their patch grid; onnxruntime gives the torch scores, and a checkpoint predicts as the learner did."""
    p = with_changes(get_preset("cff-vit"), {"predictor": "lda", "eval_layers": "last:2", "readout_size": 3,
                                             "shrinkage": 0.03})
    learner = make_learner(p, input_shape=(1, 28, 28), train=replace(p.train, device="cpu", epochs=1))
    assert learner.head_opt is None and learner.net.readout is not None
    assert learner.net.readout.stats.dim == 2 * 128 * 2 * 2  # two layers' 7x7 tokens pooled to 2x2
    train_epochs(learner, mnist_small, epochs=1, batch_size=50, limit=200)
    x, _ = next(mnist_small.test_batches(64))
    res = parity(learner, OnnxPredictor(export_onnx(learner, tmp_path / "vit.onnx")), x)
    scale = max(1.0, float(learner.scores(x).abs().max()))  # lda scores run to the hundreds
    assert res["agreement"] == 1.0 and res["max_abs_diff"] <= 1e-4 * scale
    back, _ = load(save(learner, tmp_path / "v.pt"))
    assert torch.equal(back.scores(x), learner.scores(x))
    with pytest.raises(InputError, match="does not use predictor='lda'"):
        make_learner(with_changes(get_preset("cfl-mlp"), {"predictor": "lda"}))
