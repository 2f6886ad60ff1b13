"""The lean optimizers against torch.optim: the same updates bit for bit, torch's state_dict layout, and
no torch._dynamo import (torch.optim's constructor pulls in ~150 MB)."""

import subprocess
import sys

import pytest
import torch

from edgeff.layers import make_optimizer
from edgeff.optim import BLOCK

TORCH = {"adam": lambda p, lr: torch.optim.Adam(p, lr=lr, fused=True),
         "adamw": lambda p, lr: torch.optim.AdamW(p, lr=lr, fused=True),
         "sgd": lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9, fused=True)}


def _params(g: torch.Generator) -> list[torch.nn.Parameter]:
    # one tensor spans several blocks, one is smaller than a block
    return [torch.nn.Parameter(torch.randn(3 * BLOCK // 100 + 7, 100, generator=g)),
            torch.nn.Parameter(torch.randn(5, generator=g))]


@pytest.mark.parametrize("kind", ["adam", "adamw", "sgd"])
def test_same_updates_as_torch_optim_bit_for_bit(kind: str) -> None:
    g = torch.Generator().manual_seed(0)
    ref = _params(g)
    ours = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    a, b = TORCH[kind](ref, 1e-2), make_optimizer(ours, kind, 1e-2)
    for step in range(4):
        for p, q in zip(ref, ours, strict=True):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        if step == 2:  # a learning-rate change reaches both
            a.param_groups[0]["lr"] = b.param_groups[0]["lr"] = 3e-3
        a.step()
        b.step()
    for p, q in zip(ref, ours, strict=True):
        assert torch.equal(p, q)
    # torch's state_dict loads into ours and continues identically
    c_params = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    c = make_optimizer(c_params, kind, 1.0)
    c.load_state_dict(a.state_dict())
    assert c.param_groups[0]["lr"] == 3e-3
    for p, q in zip(ref, c_params, strict=True):
        p.grad = torch.ones_like(p)
        q.grad = torch.ones_like(q)
    a.step()
    c.step()
    for p, q in zip(ref, c_params, strict=True):
        assert torch.equal(p, q)
    b.zero_grad()
    assert all(p.grad is None for p in ours)


def test_training_imports_no_dynamo() -> None:
    code = ("import sys, torch\nfrom edgeff.presets import make_learner\n"
            "l = make_learner('trifecta-cnn')\nl.learn_many(torch.randn(4, 1, 28, 28), [0, 1, 2, 3])\n"
            "b = make_learner('trifecta-cnn', backprop=True)\nb.learn_many(torch.randn(4, 1, 28, 28), [0, 1, 2, 3])\n"
            "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("preset", ["symba-mlp", "cfl-mlp", "ffcl-mirror", "cff-mlp"])
def test_every_local_family_holds_its_optimizer_state_in_the_asked_dtype(preset: str) -> None:
    """--optim-state bfloat16 reached every family (the mirror learner dropped it before)."""
    from dataclasses import replace

    from edgeff.presets import PRESETS, make_learner

    p = PRESETS[preset]
    learner = make_learner(p, train=replace(p.train, optim_state_dtype="bfloat16", device="cpu", views=1,
                                            crop_padding=0))
    learner.learn_many(torch.randn(4, 1, 28, 28), [0, 1, 2, 3])
    layers = [la for m in getattr(learner, "mirrors", [learner.net]) for la in m.local_layers]
    states = [v for la in layers if la.opt is not None for st in la.opt.state.values() for k, v in st.items()
              if k != "step"]
    assert states and all(v.dtype == torch.bfloat16 for v in states)
