import pytest
import torch

from engines.blocks import SSPCAB, SimAM


def test_simam_has_no_parameters_and_keeps_shape():
    m = SimAM()
    assert sum(p.numel() for p in m.parameters()) == 0
    x = torch.randn(2, 5, 7, 9)
    assert m(x).shape == x.shape


def test_simam_matches_hand_computed_energy():
    x = torch.tensor([[[[1.0, 2.0], [3.0, 6.0]]]])
    mu = 3.0
    d = torch.tensor([4.0, 1.0, 0.0, 9.0])
    var = d.sum() / 3  # n = H*W - 1
    e = d / (4 * (var + 1e-4)) + 0.5
    expected = torch.tensor([1.0, 2.0, 3.0, 6.0]) * torch.sigmoid(e)
    assert mu == x.mean().item()
    torch.testing.assert_close(SimAM(1e-4)(x).flatten(), expected)


def test_simam_passes_gradients():
    x = torch.randn(1, 3, 4, 4, requires_grad=True)
    SimAM()(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_sspcab_shape_params_and_gradients():
    torch.manual_seed(0)  # with few channels SE's few hidden ReLU units can all be dead for one input
    block = SSPCAB(64, k=1, d=1)
    x = torch.randn(2, 64, 12, 10, requires_grad=True)
    y = block(x)
    assert y.shape == x.shape
    loss = SSPCAB.reconstruction_loss(y, x)
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for name, p in block.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # four 1x1 corner convs (64*64 + 64 each) + SE (64->8->64)
    assert sum(p.numel() for p in block.parameters()) == 4 * (64 * 64 + 64) + (64 * 8 + 8) + (8 * 64 + 64)


@pytest.mark.parametrize(("k", "d"), [(1, 1), (2, 1), (1, 0), (3, 2)])
def test_sspcab_never_sees_the_masked_centre(k, d):
    """The masked convolution at (i, j) depends on exactly the four k x k corners of its window."""
    torch.manual_seed(0)
    block = SSPCAB(2, k=k, d=d)
    size = 2 * (k + d) + 5
    x = torch.randn(1, 2, size, size, requires_grad=True)
    c = size // 2
    block.masked_conv(x)[0, 0, c, c].backward()
    seen = (x.grad[0].abs().sum(0) > 0).nonzero().tolist()
    r = k + d
    expected = {
        (c + dy, c + dx)
        for dy in [*range(-r, -d), *range(d + 1, r + 1)]
        for dx in [*range(-r, -d), *range(d + 1, r + 1)]
    }
    assert {tuple(p) for p in seen} == expected
    assert len(expected) == 4 * k * k


def test_sspcab_rejects_bad_hyperparameters():
    with pytest.raises(ValueError, match="k >= 1"):
        SSPCAB(4, k=0, d=1)


@pytest.mark.parametrize(("k", "d"), [(1, 1), (2, 1), (1, 0), (3, 2)])
def test_sspcab_fused_inference_conv_equals_the_four_corner_convs(k, d):
    """Inference (and the exported graph) runs the corners as one convolution: same output, same mask."""
    torch.manual_seed(1)
    block = SSPCAB(6, k=k, d=d)
    x = torch.randn(2, 6, 11, 13)
    w, b, dil, pad = block.fused_conv()
    fused = torch.nn.functional.conv2d(x, w, b, padding=pad, dilation=dil)
    torch.testing.assert_close(fused, block.masked_conv(x), rtol=1e-5, atol=1e-5)
    block.train()
    trained_path = block(x)
    block.eval()
    torch.testing.assert_close(block(x), trained_path, rtol=1e-5, atol=1e-5)
    # the export's frozen copy stores that kernel and gives the same output
    frozen = block.frozen()
    assert {n for n, _ in frozen.named_buffers()} == {"weight", "bias"}
    torch.testing.assert_close(frozen(x), trained_path, rtol=1e-5, atol=1e-5)
    # the fused kernel has no weight on the masked centre either
    size = 2 * (k + d) + 5
    xg = torch.randn(1, 6, size, size, requires_grad=True)
    c = size // 2
    torch.nn.functional.conv2d(xg, w.detach(), b.detach(), padding=pad, dilation=dil)[0, 0, c, c].backward()
    seen = (xg.grad[0].abs().sum(0) > 0).nonzero()
    assert len(seen) == 4 * k * k
    assert ((seen - c).abs().max(dim=1).values > d).all()
