from dataclasses import replace

import pytest
import torch

from edgeff import LayerSpec, Learner, ModelConfig, TrainConfig
from edgeff.memory import account, measure
from edgeff.presets import PRESETS

F32 = 4
TINY = ModelConfig(layers=(LayerSpec("linear", 3),), input_shape=(1, 2, 2), num_classes=2, label="overlay")


def test_hand_checkable_linear_4_to_3_with_adam() -> None:
    r = account(TINY, TrainConfig(optimizer="adam"), batch_size=5)
    (m,) = r.local
    assert m.params == 15 * F32  # 4x3 weights + 3 biases
    assert m.grads == 15 * F32
    assert m.optimizer == 30 * F32  # two Adam moments
    assert m.input == 10 * 4 * F32  # 5 positives + 5 negatives, 4 values each
    assert m.output == 10 * 3 * F32
    assert m.saved == 10 * 3 * F32  # ReLU keeps its output (which goodness squares); the input is not extra
    sgd = account(TINY, TrainConfig(optimizer="sgd"), batch_size=5)
    assert sgd.local[0].optimizer == 15 * F32  # one momentum buffer
    half = account(TINY, TrainConfig(optim_state_dtype="bfloat16"), batch_size=5)
    assert half.local[0].optimizer == 30 * 2
    # backprop: the same layer without a label input, plus a 3 -> 2 linear head
    assert r.bp[0].params == 15 * F32 and r.bp[0].input == 5 * 4 * F32
    assert r.bp[1].params == (3 * 2 + 2) * F32


def test_schedules_keep_the_optimizer_state_they_should() -> None:
    p = PRESETS["trifecta-cnn"]
    full = account(p.model, replace(p.train, schedule="all"), 8)
    greedy = account(p.model, replace(p.train, schedule="greedy"), 8)
    params = sum(m.params for m in full.local)
    assert full.local_resident - params == sum(m.optimizer for m in full.local)
    assert greedy.local_resident - params == max(m.optimizer for m in greedy.local)
    assert greedy.physical_limit == greedy.local_peak <= full.local_peak


def test_accounting_grows_linearly_with_the_batch() -> None:
    p = PRESETS["symba-mlp"]
    a, b = account(p.model, p.train, 10), account(p.model, p.train, 20)
    for la, lb in zip(a.local, b.local, strict=True):
        assert lb.saved == 2 * la.saved and lb.output == 2 * la.output and lb.params == la.params
    with pytest.raises(ValueError, match="batch size"):
        account(p.model, p.train, 0)


def test_measured_step_cost_grows_with_batch_and_matches_the_accounting() -> None:
    model = ModelConfig(layers=(LayerSpec("conv", 8, norm="batch"), LayerSpec("conv", 8, norm="batch", pool=2)),
                        label="channel")
    tc = TrainConfig(device="cpu", chunk=16)
    small, big = measure(model, tc, 2, steps=2), measure(model, tc, 128, steps=2)
    assert big["local"]["step_cost"] > 4 * max(small["local"]["step_cost"], 1)
    assert big["bp"]["step_cost"] > small["bp"]["step_cost"]
    assert len(big["local"]["layers"]) == 2 and "VmHWM" in big["local"]["method"]
    assert big["bp"]["kept_between_steps"] > 0  # backprop keeps its gradients from one step to the next
    # measured within 15% of accounted, both methods, at a batch where it is not noise
    acc = account(model, tc, 128)
    for method, accounted in (("local", acc.local_step), ("bp", acc.bp_step)):
        assert 0.85 * accounted <= big[method]["step_cost"] <= 1.15 * accounted, (method, big[method], accounted)
    assert not big["local"]["dynamo_imported"]  # the optimizers import nothing heavy


def test_frugal_optimizer_state_is_held_in_bfloat16_and_still_learns(mnist_small) -> None:
    p = PRESETS["symba-mlp"]
    accs = {}
    for dtype in ("float32", "bfloat16"):
        learner = Learner(p.model, replace(p.train, device="cpu", optim_state_dtype=dtype))
        for x, y in mnist_small.train_batches(100, limit=2000):
            learner.learn_many(x, y)
        states = [v for layer in learner.net.local_layers for st in layer.opt.state.values()  # type: ignore[union-attr]
                  for k, v in st.items() if k != "step"]
        assert states and all(v.dtype == getattr(torch, dtype) for v in states)
        x, y = next(mnist_small.test_batches(1000))
        accs[dtype] = (learner.predict_many(x) == y).float().mean().item()
    assert accs["bfloat16"] > 0.35  # chance is 0.1
    assert accs["bfloat16"] > accs["float32"] - 0.05


def test_cli_memory_table_and_plot(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from edgeff.cli.app import app
    from typer.testing import CliRunner

    runner = CliRunner()
    res = runner.invoke(app, ["memory", "trifecta-cnn", "--batch-size", "4"])
    assert res.exit_code == 0, res.output
    assert "step (olu, olu pairs), accounted:" in res.output and "layer-local" in res.output
    assert "greedy limit" in res.output and all(len(line) <= 80 for line in res.output.splitlines()[-3:])
    res = runner.invoke(app, ["memory", "nope"])
    assert res.exit_code == 2 and "unknown preset" in res.output
    pytest.importorskip("matplotlib")
    res = runner.invoke(app, ["memory", "symba-mlp", "--batch-size", "2", "--plot", str(tmp_path / "m.png")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "m.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_train_memory_report_measures_real_batches(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from edgeff.cli.app import app
    from typer.testing import CliRunner

    res = CliRunner().invoke(app, ["train", "--samples", "300", "--epochs", "1", "--batch-size", "50", "--no-progress",
                                   "--device", "cpu", "--memory-report", "--out", str(tmp_path / "m.pt")])
    assert res.exit_code == 0, res.output
    assert "memory of a step on real builtin batches of 50" in res.output and "measured (" in res.output
    assert "VmHWM" in res.output
