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
        d = (xf - xf.mean(dim=(-2, -1), keepdim=True)).pow(2)
        var = d.sum(dim=(-2, -1), keepdim=True) / max(n, 1)
        e = d / (4.0 * (var + self.lam)) + 0.5
        return (xf * torch.sigmoid(e)).to(x.dtype)

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.se(F.relu(self.masked_conv(x)))

    @staticmethod
    def reconstruction_loss(output: torch.Tensor, inp: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(output, inp)

    def extra_repr(self) -> str:
        return f"k={self.k}, d={self.d}"
