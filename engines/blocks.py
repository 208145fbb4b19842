"""The two blocks the method adds to the student: SimAM and SSPCAB (written from the papers)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SimAM(nn.Module):
    """Parameter-free attention (Yang et al., ICML 2021).

    Per neuron: e = (x - mu)^2 / (4 (var + lambda)) + 0.5, with mu and var taken over the
    spatial positions of its channel (var divides by H*W - 1); output x * sigmoid(e).
    """

    def __init__(self, lam: float = 1e-4):
        super().__init__()
        self.lam = float(lam)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # statistics in fp32 even in an fp16 graph: the sum of squares over a 64x64 map overflows fp16
        xf = x.float()
        n = x.shape[-2] * x.shape[-1] - 1
        d = xf - xf.mean(dim=(-2, -1), keepdim=True)
        d = d * d
        var = d.sum(dim=(-2, -1), keepdim=True) / max(n, 1)
        # the division happens on the (N, C, 1, 1) statistics, the full map only sees a multiply
        inv = 0.25 / (var + self.lam)
        return (xf * torch.sigmoid(d * inv + 0.5)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"lambda={self.lam}"


class SqueezeExcitation(nn.Module):
    def __init__(self, channels: int, reduction: int = 8):
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean(dim=(-2, -1))))))
        return x * w[:, :, None, None]


class SSPCAB(nn.Module):
    """Self-supervised predictive convolutional attentive block (Ristea et al., CVPR 2022).

    Four k x k convolutions sit on the corners of a (2k + 2d + 1)^2 window whose centre (everything
    within distance d of the output position) is masked out; their sum goes through ReLU and
    squeeze-excitation. The block is trained to reconstruct its own input: ``reconstruction_loss``
    is the MSE between output and input. Output shape = input shape.
    """

    def __init__(self, channels: int, k: int = 1, d: int = 1, reduction: int = 8):
        super().__init__()
        if k < 1 or d < 0:
            msg = f"SSPCAB needs k >= 1 and d >= 0, got k={k}, d={d}"
            raise ValueError(msg)
        self.k, self.d = k, d
        self.pad = k + d
        self.corners = nn.ModuleList(nn.Conv2d(channels, channels, k) for _ in range(4))
        self.se = SqueezeExcitation(channels, reduction)

    def masked_conv(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of the four corner convolutions (the centre of the window is never seen)."""
        h, w = x.shape[-2:]
        k, p = self.k, self.pad
        xp = F.pad(x, [p, p, p, p])
        far = k + 2 * self.d + 1  # offset of the bottom/right corner kernels in the padded map
        rows = (0, 0, far, far)
        cols = (0, far, 0, far)
        out = 0
        for conv, r, c in zip(self.corners, rows, cols, strict=True):
            out = out + conv(xp[:, :, r : r + h + k - 1, c : c + w + k - 1])
        return out

    def fused_conv(self) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """The four corner convolutions as one: (weight, bias, dilation, padding) for ``F.conv2d``.

        k = 1: a 2x2 kernel dilated to the corners' distance (4 multiply-adds per output, as before).
        k > 1: one (2k + 2d + 1)^2 kernel whose masked centre and edges are zero.
        Exact: the same products summed in another order.
        """
        k, p = self.k, self.pad
        far = k + 2 * self.d + 1
        w0 = self.corners[0].weight
        bias = sum(c.bias for c in self.corners)
        if k == 1:
            w = torch.cat([c.weight for c in self.corners], dim=-1)  # (C, C, 1, 4): TL, TR, BL, BR
            return w.view(*w.shape[:2], 2, 2), bias, far, p
        size = far + k
        w = w0.new_zeros(*w0.shape[:2], size, size)
        for conv, r, c in zip(self.corners, (0, 0, far, far), (0, far, 0, far), strict=True):
            w[:, :, r : r + k, c : c + k] = conv.weight
        return w, bias, 1, p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            h = self.masked_conv(x)
        else:  # inference (and the exported graph): one convolution instead of 4 slices + 4 convs + 3 adds
            w, b, dil, pad = self.fused_conv()
            h = F.conv2d(x, w, b, padding=pad, dilation=dil)
        return self.se(F.relu(h))

    def frozen(self) -> FrozenSSPCAB:
        """An inference-only copy whose fused convolution is stored, not computed from the corners."""
        return FrozenSSPCAB(self)

    @staticmethod
    def reconstruction_loss(output: torch.Tensor, inp: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(output, inp)

    def extra_repr(self) -> str:
        return f"k={self.k}, d={self.d}"


class FrozenSSPCAB(nn.Module):
    """SSPCAB for export: the fused kernel and bias are buffers, so the exported graph holds them as
    initializers (no Concat/Reshape/Add computing a convolution's weights, which TensorRT's ONNX
    parser wants as constants). Same output as ``SSPCAB`` in eval mode."""

    def __init__(self, block: SSPCAB):
        super().__init__()
        with torch.no_grad():
            w, b, self.dilation, self.padding = block.fused_conv()
        self.register_buffer("weight", w.detach().clone())
        self.register_buffer("bias", b.detach().clone())
        self.se = block.se

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.conv2d(x, self.weight, self.bias, padding=self.padding, dilation=self.dilation)
        return self.se(F.relu(h))
