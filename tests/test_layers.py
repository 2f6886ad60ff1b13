import pytest
import torch

from edgeff.layers import LayerSpec, LengthNorm, RunningBatchNorm, make_block, out_shape


def test_length_norm_gives_unit_rms() -> None:
    x = torch.randn(5, 7, generator=torch.Generator().manual_seed(0)) * 10
    y = LengthNorm()(x)
    assert torch.allclose(y.pow(2).mean(1), torch.ones(5), atol=1e-5)
    assert torch.allclose(torch.nn.functional.normalize(x, dim=1), torch.nn.functional.normalize(y, dim=1), atol=1e-6)


@pytest.mark.parametrize("spatial", [False, True])
def test_running_batchnorm_trains_at_batch_size_one(spatial: bool) -> None:
    bn = RunningBatchNorm(3, spatial=spatial, momentum=0.5, min_batch=8)
    bn.train()
    shape = (1, 3, 4, 4) if spatial else (1, 3)
    x = torch.full(shape, 2.0) + torch.arange(3.0).view(1, 3, *([1, 1] if spatial else []))
    y = bn(x)
    assert torch.isfinite(y).all()
    # the running mean moved halfway to the sample mean (momentum 0.5), before being used
    assert torch.allclose(bn.running_mean, torch.tensor([1.0, 1.5, 2.0]))
    bn.eval()
    assert torch.allclose(bn(x), y)  # a too-small batch is normalised with the running statistics
    # and the gradient flows to the input and to the affine parameters
    bn.train()
    x.requires_grad_(True)
    bn(x).sum().backward()
    assert x.grad is not None and bn.weight.grad is not None


def test_running_batchnorm_uses_batch_statistics_for_large_batches() -> None:
    bn = RunningBatchNorm(4, spatial=False, min_batch=8)
    x = torch.randn(32, 4, generator=torch.Generator().manual_seed(1)) * 3 + 5
    y = bn.train()(x)
    assert torch.allclose(y.mean(0), torch.zeros(4), atol=1e-5)
    assert torch.allclose(y.var(0, unbiased=False), torch.ones(4), atol=1e-3)
    always = RunningBatchNorm(4, spatial=False, min_batch=8, always_running=True)
    y2 = always.train()(x)
    assert not torch.allclose(y2.mean(0), torch.zeros(4), atol=1e-2)  # running stats, not batch stats


def test_conv_block_shapes_and_order() -> None:
    spec = LayerSpec("conv", 8, norm="batch", pool=2)
    block = make_block(spec, (2, 28, 28), torch.Generator().manual_seed(0))
    names = [type(m).__name__ for m in block]
    assert names == ["RunningBatchNorm", "Conv2d", "ReLU", "MaxPool2d"]
    assert block(torch.randn(3, 2, 28, 28)).shape == (3, 8, 14, 14)
    assert out_shape(spec, (2, 28, 28)) == (8, 14, 14)


def test_unknown_norm_and_kind() -> None:
    g = torch.Generator()
    with pytest.raises(ValueError, match="normalisation"):
        make_block(LayerSpec("linear", 4, norm="group"), (1, 2, 2), g)
    with pytest.raises(ValueError, match="layer kind"):
        make_block(LayerSpec("rnn", 4), (1, 2, 2), g)
    with pytest.raises(ValueError, match="cannot follow"):
        make_block(LayerSpec("conv", 4), (10,), g)
