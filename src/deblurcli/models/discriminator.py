"""Latent discriminator for stage-2 training (paper Sec. 3.2).

It looks at Stable-Diffusion latents (``(B, 4, h, w)``) and tells a predicted sharp latent
``ẑ_h`` from the eVAE's encoding of a real sharp image ``z_h = E2(x_sharp)``. The network is one
UNet down block (diffusers ``get_down_block``) followed by global average pooling and a small MLP.
It returns *logits*; the losses (``train.losses``) apply ``BCEWithLogits``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class DiscriminatorConfig:
    """Shape of a :class:`LatentDiscriminator`.

    Attributes:
        in_channels: latent channels (4 for the SD VAE).
        channels: width after the input convolution.
        block_out_channels: width of the UNet down block's output.
        layers_per_block: ResNet layers inside the down block.
        norm_groups: GroupNorm groups (must divide both widths).
        mlp_hidden: hidden width of the MLP head.
    """

    in_channels: int = 4
    channels: int = 64
    block_out_channels: int = 128
    layers_per_block: int = 2
    norm_groups: int = 32
    mlp_hidden: int = 256

    def to_dict(self) -> dict:
        """JSON-ready dictionary."""
        return asdict(self)


class LatentDiscriminator(nn.Module):
    """UNet down block + MLP on latents; ``forward(z) -> logits`` of shape ``(B,)``."""

    def __init__(self, config: DiscriminatorConfig | None = None) -> None:
        super().__init__()
        from diffusers.models.unets.unet_2d_blocks import get_down_block

        self.config = config or DiscriminatorConfig()
        cfg = self.config
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.channels, kernel_size=3, padding=1)
        self.down = get_down_block(
            "DownBlock2D",
            num_layers=cfg.layers_per_block,
            in_channels=cfg.channels,
            out_channels=cfg.block_out_channels,
            temb_channels=None,
            add_downsample=True,
            resnet_eps=1e-6,
            resnet_act_fn="silu",
            resnet_groups=cfg.norm_groups,
            downsample_padding=1,
            attention_head_dim=8,  # unused by DownBlock2D; given to silence a diffusers warning
        )
        self.norm = nn.GroupNorm(cfg.norm_groups, cfg.block_out_channels, eps=1e-6)
        self.head = nn.Sequential(
            nn.Linear(cfg.block_out_channels, cfg.mlp_hidden),
            nn.SiLU(),
            nn.Linear(cfg.mlp_hidden, 1),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Return one real-vs-fake logit per latent in the batch."""
        h = self.conv_in(z)
        h, _ = self.down(h)
        h = nn.functional.silu(self.norm(h))
        h = h.mean(dim=(2, 3))
        return self.head(h).squeeze(1)
