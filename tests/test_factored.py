"""Linear weight gradients kept as factors (edgeff.factored) step exactly as the dense gradient does."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edgeff import factored
from edgeff.optim import LeanOptimizer


def _pair(kind: str, rows: int, seed: int = 0) -> tuple[nn.Linear, nn.Linear, torch.Tensor]:
    torch.manual_seed(seed)
    a = nn.Linear(300, 200)
    b = nn.Linear(300, 200)
    b.load_state_dict(a.state_dict())
    return a, b, torch.randn(rows, 300)


@pytest.mark.parametrize("kind", ["adam", "adamw", "sgd"])
@pytest.mark.parametrize("rows", [1, 8])
def test_factored_step_equals_the_dense_step(kind: str, rows: int) -> None:
    dense, fact, x = _pair(kind, rows)
    od, of = LeanOptimizer(dense.parameters(), kind, 1e-2), LeanOptimizer(fact.parameters(), kind, 1e-2)
    for step in range(3):
        xs = x + step
        for chunk in (xs[: rows // 2 or 1], xs[rows // 2 or 1 :]):  # two backward passes, as the frugal chunks
            if len(chunk):
                dense(chunk).pow(2).mean().backward()
        od.step()
        od.zero_grad()
        with factored.recording(fact, rows) as sinks:
            for chunk in (xs[: rows // 2 or 1], xs[rows // 2 or 1 :]):
                if len(chunk):
                    fact(chunk).pow(2).mean().backward()
        assert fact.weight.grad is None and set(sinks) == {fact.weight}  # never materialised whole
        of.step(sinks)
        of.zero_grad()
    if rows == 1:  # outer products: the same products, bit for bit
        assert torch.equal(dense.weight, fact.weight) and torch.equal(dense.bias, fact.bias)
    torch.testing.assert_close(fact.weight, dense.weight, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(fact.bias, dense.bias, rtol=1e-6, atol=1e-7)
    for name, v in od.state_dict()["state"][0].items():  # the weight's moments / momentum follow too
        torch.testing.assert_close(of.state_dict()["state"][0][name], v, rtol=1e-6, atol=1e-7)


def test_only_layers_whose_factors_are_smaller_are_recorded() -> None:
    small = nn.Linear(4, 3)  # 2 rows x (4 + 3) values > 12 weights: keeps its dense gradient
    assert not factored.pays(small, 2) and factored.pays(nn.Linear(300, 200), 8)
    with factored.recording(small, 2) as sinks:
        small(torch.randn(2, 4)).sum().backward()
    assert sinks == {} and small.weight.grad is not None
    assert small.forward.__func__ is nn.Linear.forward  # type: ignore[attr-defined]  # the patch is undone


def test_factors_beyond_the_plan_fall_back_to_a_dense_gradient() -> None:
    lin = nn.Linear(50, 40)
    sink = factored.Factors(lin.weight)
    g, x = torch.randn(30, 40), torch.randn(30, 50)
    sink.add(g[:20], x[:20])
    sink.add(g[20:], x[20:])  # 30 x 90 values > 2000 weights: collapsed
    assert sink.dense is not None and not sink.parts
    torch.testing.assert_close(sink.rows(0, 40), g.t() @ x, rtol=1e-5, atol=1e-5)
