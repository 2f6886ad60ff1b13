import math

import pytest
import torch

from edgeff.losses import LOSSES, ff_loss, get_loss, goodness, symba_loss


def test_goodness_is_mean_of_squares() -> None:
    assert goodness(torch.tensor([[1.0, 1.0]])).item() == 1.0
    assert goodness(torch.tensor([[3.0, 0.0, 0.0, 1.0]])).item() == pytest.approx(2.5)
    # image-shaped activations: mean over every feature of a sample
    h = torch.ones(2, 3, 4, 4) * torch.tensor([1.0, 2.0]).view(2, 1, 1, 1)
    assert goodness(h).tolist() == [1.0, 4.0]


def test_channels_last_goodness_has_autograd_gradient_in_the_activations_layout() -> None:
    """Conv activations in channels-last take their own backward: the same value and gradient as autograd's
    formula on the same numbers (float64 gradcheck too), laid out as the activations are."""
    h0 = torch.randn(6, 5, 7, 7, dtype=torch.float64)
    h = h0.contiguous(memory_format=torch.channels_last).requires_grad_()
    ref = h0.clone().requires_grad_()
    w = torch.randn(6, dtype=torch.float64)
    (goodness(h) * w).sum().backward()
    (ref.pow(2).flatten(1).mean(1) * w).sum().backward()
    assert h.grad is not None and ref.grad is not None
    assert h.grad.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(h.grad, ref.grad)
    torch.testing.assert_close(goodness(h), goodness(ref))
    assert torch.autograd.gradcheck(goodness, (h,))


def test_ff_loss_hand_computed() -> None:
    g = torch.tensor([2.0])
    assert ff_loss(g, g, threshold=2.0).item() == pytest.approx(2 * math.log(2))  # ln 2 per term
    gp, gn = torch.tensor([3.0]), torch.tensor([0.0])
    want = math.log1p(math.exp(2 - 3)) + math.log1p(math.exp(0 - 2))
    assert ff_loss(gp, gn, threshold=2.0).item() == pytest.approx(want)


def test_symba_loss_hand_computed() -> None:
    g = torch.tensor([1.5])
    assert symba_loss(g, g).item() == pytest.approx(math.log(2))
    assert symba_loss(torch.tensor([1.0]), torch.tensor([0.5]), alpha=4.0).item() == pytest.approx(
        math.log1p(math.exp(-2.0))
    )


def test_symba_loss_is_safe_for_large_separations() -> None:
    gp = torch.tensor([0.0, 1e4], requires_grad=True)
    gn = torch.tensor([1e4, 0.0])
    loss = symba_loss(gp, gn)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() == pytest.approx(4e4 / 2)
    assert torch.isfinite(gp.grad).all()  # type: ignore[arg-type]
    assert gp.grad[0].item() == pytest.approx(-2.0)  # -alpha / batch


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_loss_falls_as_positive_goodness_rises(name: str) -> None:
    fn = get_loss(name)
    gn = torch.tensor([1.0])
    values = [fn(torch.tensor([g]), gn).item() for g in (0.5, 1.0, 2.0, 4.0)]
    assert values == sorted(values, reverse=True)
    rising_neg = [fn(torch.tensor([2.0]), torch.tensor([g])).item() for g in (0.5, 1.0, 2.0, 4.0)]
    assert rising_neg == sorted(rising_neg)


def test_unknown_loss() -> None:
    with pytest.raises(ValueError, match="unknown loss"):
        get_loss("hinge")
