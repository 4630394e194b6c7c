"""Specialist networks: the V-Net of the semi-supervised literature, plus MONAI networks by name."""

from __future__ import annotations

import torch
from torch import nn

from fmabs_core.training.config import NetConfig


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm3d(channels)
    if kind == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown normalisation '{kind}' (batch, instance, none)")


class _ConvStack(nn.Sequential):
    """``stages`` x (3x3x3 conv, norm, ReLU) at constant width."""

    def __init__(self, stages: int, cin: int, cout: int, norm: str):
        layers: list[nn.Module] = []
        for i in range(stages):
            layers += [nn.Conv3d(cin if i == 0 else cout, cout, 3, padding=1), _norm(norm, cout), nn.ReLU(inplace=True)]
        super().__init__(*layers)


class _Down(nn.Sequential):
    def __init__(self, cin: int, cout: int, norm: str):
        super().__init__(nn.Conv3d(cin, cout, 2, stride=2), _norm(norm, cout), nn.ReLU(inplace=True))


class _Up(nn.Sequential):
    def __init__(self, cin: int, cout: int, norm: str):
        super().__init__(nn.ConvTranspose3d(cin, cout, 2, stride=2), _norm(norm, cout), nn.ReLU(inplace=True))


class VNet(nn.Module):
    """V-Net as used by UA-MT, SSL4MIS and FM-ABS: 4 down/up levels, additive skips.

    With 16 base filters and two classes it has about 9.45 M parameters. Spatial sizes must be
    divisible by 16 (the engine pads crops and sliding windows accordingly).
    """

    divisor = 16

    def __init__(self, in_channels: int = 1, out_channels: int = 2, base: int = 16, norm: str = "batch",
                 dropout: float = 0.5):
        super().__init__()
        n = base
        self.enc1 = _ConvStack(1, in_channels, n, norm)
        self.down1 = _Down(n, 2 * n, norm)
        self.enc2 = _ConvStack(2, 2 * n, 2 * n, norm)
        self.down2 = _Down(2 * n, 4 * n, norm)
        self.enc3 = _ConvStack(3, 4 * n, 4 * n, norm)
        self.down3 = _Down(4 * n, 8 * n, norm)
        self.enc4 = _ConvStack(3, 8 * n, 8 * n, norm)
        self.down4 = _Down(8 * n, 16 * n, norm)
        self.bottom = _ConvStack(3, 16 * n, 16 * n, norm)
        self.up4 = _Up(16 * n, 8 * n, norm)
        self.dec4 = _ConvStack(3, 8 * n, 8 * n, norm)
        self.up3 = _Up(8 * n, 4 * n, norm)
        self.dec3 = _ConvStack(3, 4 * n, 4 * n, norm)
        self.up2 = _Up(4 * n, 2 * n, norm)
        self.dec2 = _ConvStack(2, 2 * n, 2 * n, norm)
        self.up1 = _Up(2 * n, n, norm)
        self.dec1 = _ConvStack(1, n, n, norm)
        self.dropout = nn.Dropout3d(dropout) if dropout > 0 else nn.Identity()
        self.head = nn.Conv3d(n, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.enc1(x)
        x2 = self.enc2(self.down1(x1))
        x3 = self.enc3(self.down2(x2))
        x4 = self.enc4(self.down3(x3))
        x5 = self.dropout(self.bottom(self.down4(x4)))
        y = self.dec4(self.up4(x5) + x4)
        y = self.dec3(self.up3(y) + x3)
        y = self.dec2(self.up2(y) + x2)
        y = self.dec1(self.up1(y) + x1)
        return self.head(self.dropout(y))


def build_network(cfg: NetConfig) -> nn.Module:
    """Build a specialist by name: ``vnet`` (default), or MONAI's ``unet``, ``segresnet``, ``basicunet``."""
    name = cfg.name.lower()
    w = cfg.width
    if name == "vnet":
        return VNet(cfg.in_channels, cfg.out_channels, w, cfg.norm, cfg.dropout)
    from monai import networks

    if name == "unet":
        return networks.nets.UNet(
            spatial_dims=3, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
            channels=(w, 2 * w, 4 * w, 8 * w, 16 * w), strides=(2, 2, 2, 2), num_res_units=2,
            norm=cfg.norm if cfg.norm != "none" else None, dropout=cfg.dropout,
        )
    if name == "segresnet":
        return networks.nets.SegResNet(
            spatial_dims=3, in_channels=cfg.in_channels, out_channels=cfg.out_channels, init_filters=w,
            dropout_prob=cfg.dropout or None,
        )
    if name == "basicunet":
        return networks.nets.BasicUNet(
            spatial_dims=3, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
            features=(w, w, 2 * w, 4 * w, 8 * w, w), dropout=cfg.dropout,
        )
    raise ValueError(f"unknown network '{cfg.name}' (vnet, unet, segresnet, basicunet)")


def size_divisor(cfg: NetConfig) -> int:
    return {"vnet": 16, "unet": 16, "segresnet": 8, "basicunet": 16}.get(cfg.name.lower(), 16)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
