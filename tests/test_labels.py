import torch

from edgeff.labels import ChannelEncoder, ICPEncoder, OverlayEncoder


def test_overlay_writes_one_hot_on_first_values_only(real_batch) -> None:
    x, y = real_batch
    before = x.clone()
    z = OverlayEncoder(10, (1, 28, 28))(x, y)
    assert torch.equal(x, before)  # the caller's tensor is untouched
    flat = z.flatten(1)
    assert torch.equal(flat[:, :10], torch.nn.functional.one_hot(y, 10).float())
    assert torch.equal(flat[:, 10:], x.flatten(1)[:, 10:])


def test_icp_patterns_are_sparse_fixed_and_concatenated(real_batch) -> None:
    x, y = real_batch
    enc = ICPEncoder(10, (1, 28, 28), torch.Generator().manual_seed(0), rate=0.1)
    z = enc(x, y)
    assert z.shape == (64, 2, 28, 28)
    assert torch.equal(z[:, :1], x)  # no pixel is covered
    rate = enc.patterns.mean().item()
    assert 0.08 < rate < 0.12
    assert torch.equal(z[:, 1], enc.patterns[y, 0])
    assert len({tuple(p.flatten().tolist()) for p in enc.patterns}) == 10  # one distinct pattern per class
    assert torch.allclose(enc.neutral(x)[:, 1], enc.patterns.mean(0)[0].expand(64, 28, 28))


def test_label_channel_is_one_hot_times_matrix(real_batch) -> None:
    x, y = real_batch
    enc = ChannelEncoder(10, (1, 28, 28), torch.Generator().manual_seed(0), learned=True)
    z = enc(x, y)
    assert z.shape == (64, 2, 28, 28)
    assert torch.allclose(z[:, 1].reshape(64, -1), enc.matrix[y])
    assert isinstance(enc.matrix, torch.nn.Parameter)
    fixed = ChannelEncoder(10, (1, 28, 28), torch.Generator().manual_seed(0), learned=False)
    assert not isinstance(fixed.matrix, torch.nn.Parameter)
