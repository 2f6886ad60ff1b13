import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from edgeff.cli.app import app
from typer.testing import CliRunner

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
    assert "layer 2 goodness alone" in res.output
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
    ],
)
def test_user_errors_give_one_clear_message(args: list[str], message: str) -> None:
    res = runner.invoke(app, args)
    assert res.exit_code == 2
    assert message in " ".join(res.output.split()), res.output
    assert "Traceback" not in res.output


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
