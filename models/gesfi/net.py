"""The GesFi networks (torch): a small CNN for (3, 32, 32) Doppler images and the adversarial parts.

GesFiNet (what gets exported and split by the planner)
    features: 3 x [conv3x3 -> batch norm -> ReLU -> max-pool 2]  (16, 32, 64 channels at width 16)
              -> flatten (64 x 4 x 4) -> linear -> ReLU          (feat_dim)
    classifier: linear feat_dim -> n_classes
About 0.15 M parameters and 3 MFLOPs at width 16: real time on a Jetson by a wide margin.

arch="offload" (a workload where splitting pays, as in the COACH paper): a cheap stem that downsamples
fast to a compact tensor, then the heavy blocks:
    stem: conv3x3 -> BN -> ReLU -> max-pool 2 (width), conv3x3 -> BN -> ReLU -> max-pool 2 (2 x width)
          -> (2 x width, H/4, W/4): 2048 elements at width 16 on 32 x 32 (less than the input's 3072)
    body: depth x [conv3x3 -> BN -> ReLU] at body_width channels, H/4 x W/4 -> max-pool 2
          -> flatten -> linear -> ReLU (feat_dim)
At width 16, depth 6, body_width 384: about 7.5 M parameters (the stem 5 K, the final linear 0.8 M)
and 0.4 G multiply-adds; about 6 ms at batch 1 on one core of the development machine (onnxruntime), i.e. tens
of ms on a Jetson-class CPU, while the stem's output is cheap to send quantized.

Training-only parts: a gradient reversal layer, an MLP discriminator (domain or gesture), and the
reconstruction decoder used to learn GesFi's domain feature.
"""

from __future__ import annotations

import torch
from torch import nn


def conv_bn_relu(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


def conv_block(c_in: int, c_out: int) -> nn.Sequential:
    """conv_bn_relu then max-pool 2, as one flat Sequential (layer indices 0-3, as saved weights expect)."""
    return nn.Sequential(*conv_bn_relu(c_in, c_out), nn.MaxPool2d(2))


ARCHS = ("compact", "offload")


def check_arch(arch: str, depth: int, body_width: int) -> None:
    """ValueError unless (arch, depth, body_width) describe a network Features can build."""
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    if arch == "offload" and (depth < 1 or body_width < 1):
        raise ValueError(f"depth and body_width must be >= 1, got {depth}, {body_width}")


class Features(nn.Module):
    """CNN feature extractor: (N, C, H, W) -> (N, feat_dim). arch: "compact" (default) or "offload"."""

    def __init__(self, in_ch: int = 3, width: int = 16, feat_dim: int = 128, image_hw: tuple[int, int] = (32, 32),
                 arch: str = "compact", depth: int = 6, body_width: int = 384):
        super().__init__()
        check_arch(arch, depth, body_width)
        if arch == "compact":
            self.conv = nn.Sequential(conv_block(in_ch, width), conv_block(width, 2 * width),
                                      conv_block(2 * width, 4 * width))
            flat = 4 * width * (image_hw[0] // 8) * (image_hw[1] // 8)
        else:
            body = [conv_bn_relu(2 * width, body_width)] + [conv_bn_relu(body_width, body_width) for _ in range(depth - 1)]
            self.conv = nn.Sequential(conv_block(in_ch, width), conv_block(width, 2 * width), *body, nn.MaxPool2d(2))
            flat = body_width * (image_hw[0] // 8) * (image_hw[1] // 8)
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(flat, feat_dim), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x))


class GesFiNet(nn.Module):
    """Gesture classifier: features + linear head. forward(image) -> logits."""

    def __init__(self, n_classes: int = 6, in_ch: int = 3, width: int = 16, feat_dim: int = 128,
                 image_hw: tuple[int, int] = (32, 32), arch: str = "compact", depth: int = 6,
                 body_width: int = 384):
        super().__init__()
        self.features = Features(in_ch, width, feat_dim, image_hw, arch, depth, body_width)
        self.classifier = nn.Linear(feat_dim, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, lam: float) -> torch.Tensor:
        ctx.lam = lam
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.lam * grad, None


def grad_reverse(x: torch.Tensor, lam: float) -> torch.Tensor:
    """Identity forwards; multiplies the gradient by -lam backwards."""
    return _GradReverse.apply(x, lam)


class Discriminator(nn.Module):
    """MLP that predicts a label (a domain, or the gesture) from a feature."""

    def __init__(self, in_dim: int, n_out: int, hidden: int = 64):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, n_out),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class Decoder(nn.Module):
    """(domain feature, gesture one-hot) -> the image at half resolution, (N, C, H/2, W/2) in [0, 1].

    Given the gesture for free, the decoder needs from the domain feature only what the gesture does
    not explain: how this domain renders it. That, with the gesture discriminator behind gradient
    reversal, makes the feature a domain feature.
    """

    def __init__(self, z_dim: int, n_classes: int, out_shape: tuple[int, int, int], hidden: int = 256):
        super().__init__()
        self.out_shape = out_shape
        n_out = out_shape[0] * out_shape[1] * out_shape[2]
        self.net = nn.Sequential(nn.Linear(z_dim + n_classes, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, n_out))

    def forward(self, z: torch.Tensor, y_onehot: torch.Tensor) -> torch.Tensor:
        out = self.net(torch.cat([z, y_onehot], dim=1))
        return torch.sigmoid(out).view(-1, *self.out_shape)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
