"""EVAE: a Stable Diffusion AutoencoderKL with encoder->decoder skip connections and two encoders.

Built from the same diffusers pieces as ``AutoencoderKL`` (``Encoder`` / ``Decoder``, whose down/up
blocks come from ``get_down_block`` / ``get_up_block`` and ``UNetMidBlock2D``), under the same
parameter names (``encoder.*``, ``quant_conv.*``, ``decoder.*``, ``post_quant_conv.*``), so an SD
VAE's state dict loads directly (:meth:`EVAE.from_vae`).

Skip design (one skip per encoder resolution, ``i = 0 .. L-1``):

* the encoder feature ``f_i`` -- output of the last layer of down block ``i`` *before* its
  downsampler -- goes through a skip block ``conv3x3 -> SiLU -> conv3x3`` whose last conv starts at
  zero, giving ``s_i``;
* at the start of the decoder's up block at the same resolution (up block ``L-1-i``), the decoder
  feature ``h`` is replaced by ``h + F_i(cat[h, s_i])``, a 1x1 fusion conv on the concatenation.
  This is the concatenation + 1x1 fusion written residually: with ``W = [I | 0] + W_F`` it equals
  the plain fusion conv initialised to ``[identity | small random]``. ``W_F`` starts as
  ``[0 | N(0, 0.02)]``.

Hence at initialisation ``s_i = 0`` and the fusion returns ``h`` exactly (even under TF32), so an
eVAE made from a VAE reproduces it; the random ``s``-half of the fusion makes the gradient reach the
skip block's last conv from the first step (zero-initialising both would deadlock). The VAE's own
layers (GroupNorms included) see the same channel counts as before. ``use_skips=False`` builds the
plain VAE (the ablation baseline).

Encoders: ``encoder`` (E1, blurry input, also yields the skips) and ``encoder_sharp`` (E2, sharp
input, training only; ``sharp_encoder=False`` leaves it out). Latents are the posterior mean times
``scaling_factor`` (minus ``shift_factor`` first, when the VAE has one): deterministic.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import Decoder, Encoder
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor, nn

#: AutoencoderKL config keys that EVAE shares.
VAE_CONFIG_KEYS = (
    "in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
    "layers_per_block", "act_fn", "latent_channels", "norm_num_groups", "sample_size",
    "scaling_factor", "shift_factor", "use_quant_conv", "use_post_quant_conv",
    "mid_block_add_attention",
)
SKIP_FUSION_INIT_STD = 0.02


class SkipBlock(nn.Sequential):
    """``conv3x3 -> SiLU -> conv3x3``; the last conv is zero-initialised."""

    def __init__(self, channels: int) -> None:
        super().__init__(nn.Conv2d(channels, channels, 3, padding=1), nn.SiLU(),
                         nn.Conv2d(channels, channels, 3, padding=1))


def _down_block_features(block: nn.Module, h: Tensor) -> tuple[Tensor, Tensor]:
    """Run one encoder down block; return (feature before downsampling, block output)."""
    attentions = getattr(block, "attentions", None)
    for k, resnet in enumerate(block.resnets):
        h = resnet(h, temb=None)
        if attentions is not None:
            h = attentions[k](h)
    feature = h
    if getattr(block, "downsamplers", None) is not None:
        for down in block.downsamplers:
            h = down(h)
    return feature, h


class EVAE(ModelMixin, ConfigMixin):
    """Enhanced VAE: AutoencoderKL layers + zero-initialised skip connections + a sharp encoder.

    Public API (no hidden state): :meth:`encode` ``x -> (z, skips)``, :meth:`encode_sharp`
    ``x -> z``, :meth:`decode` ``(z, skips) -> x``. Images are ``(B, 3, H, W)`` in ``[-1, 1]``.
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",) * 4,
        up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",) * 4,
        block_out_channels: tuple[int, ...] = (128, 256, 512, 512),
        layers_per_block: int = 2,
        act_fn: str = "silu",
        latent_channels: int = 4,
        norm_num_groups: int = 32,
        sample_size: int = 768,
        scaling_factor: float = 0.18215,
        shift_factor: float | None = None,
        use_quant_conv: bool = True,
        use_post_quant_conv: bool = True,
        mid_block_add_attention: bool = True,
        use_skips: bool = True,
        sharp_encoder: bool = True,
        image_skip: bool = False,
    ) -> None:
        super().__init__()
        enc_kwargs = dict(
            in_channels=in_channels, out_channels=latent_channels,
            down_block_types=tuple(down_block_types), block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block, act_fn=act_fn, norm_num_groups=norm_num_groups,
            double_z=True, mid_block_add_attention=mid_block_add_attention,
        )
        self.encoder = Encoder(**enc_kwargs)
        self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1) \
            if use_quant_conv else None
        self.decoder = Decoder(
            in_channels=latent_channels, out_channels=out_channels,
            up_block_types=tuple(up_block_types), block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block, norm_num_groups=norm_num_groups, act_fn=act_fn,
            mid_block_add_attention=mid_block_add_attention,
        )
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1) \
            if use_post_quant_conv else None
        if sharp_encoder:
            self.encoder_sharp = Encoder(**enc_kwargs)
            self.quant_conv_sharp = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1) \
                if use_quant_conv else None
        else:
            self.encoder_sharp = None
            self.quant_conv_sharp = None
        levels = len(block_out_channels)
        if use_skips:
            self.skip_blocks = nn.ModuleList(SkipBlock(c) for c in block_out_channels)
            rev = list(reversed(block_out_channels))
            fusions = []
            for level in range(levels):
                j = levels - 1 - level  # decoder up block at the same resolution
                dec_ch = rev[max(j - 1, 0)]
                fusions.append(nn.Conv2d(dec_ch + block_out_channels[level], dec_ch, 1))
            self.skip_fusions = nn.ModuleList(fusions)
        else:
            self.skip_blocks = None
            self.skip_fusions = None
        self.init_skip_weights()
        self.gradient_checkpointing = False

    # ------------------------------------------------------------------ construction
    @torch.no_grad()
    def init_skip_weights(self, generator: torch.Generator | None = None, *,
                          live: bool = False) -> None:
        """(Re)initialise the skip path so that it is an exact no-op: see the module docstring.

        With ``image_skip`` the decoder's output conv starts at zero, so the eVAE starts as the
        identity on its input image.

        ``live=True`` is for eVAEs trained from scratch: the skip blocks' last convs and the
        skip half of each fusion get ordinary random weights instead of zero / 0.02-scale ones.
        The exact no-op start protects a *pretrained* decoder; on a random one it puts two
        near-zero gates in series on the skip path (three with ``image_skip``), and the product
        of their gradients kept a first from-scratch eVAE at the identity for 1,000 steps.
        """
        if self.decoder.conv_out.weight.is_meta:  # built on the meta device: weights come later
            return
        if self.config.image_skip:
            self.decoder.conv_out.weight.zero_()
            self.decoder.conv_out.bias.zero_()
        if self.skip_blocks is None:
            return
        for block, fusion in zip(self.skip_blocks, self.skip_fusions, strict=True):
            first, last = block[0], block[2]
            fan_in = first.weight[0].numel()
            bound = 1.0 / fan_in**0.5
            uniform = torch.rand(first.weight.shape, generator=generator)
            first.weight.copy_(uniform * 2 * bound - bound)
            first.bias.zero_()
            if live:
                uniform = torch.rand(last.weight.shape, generator=generator)
                last.weight.copy_(uniform * 2 * bound - bound)
            else:
                last.weight.zero_()
            last.bias.zero_()
            dec_ch = fusion.out_channels
            weight = torch.zeros(fusion.weight.shape)
            std = 1.0 / fusion.weight[0].numel() ** 0.5 if live else SKIP_FUSION_INIT_STD
            weight[:, dec_ch:] = std * torch.randn(weight[:, dec_ch:].shape, generator=generator)
            fusion.weight.copy_(weight)
            fusion.bias.zero_()

    @classmethod
    def vae_config(cls, vae_config: Any) -> dict[str, Any]:
        """The EVAE config keys taken from an ``AutoencoderKL`` config (dict or FrozenDict)."""
        cfg = dict(vae_config)
        out = {k: cfg[k] for k in VAE_CONFIG_KEYS if k in cfg}
        for key in ("down_block_types", "up_block_types", "block_out_channels"):
            if key in out:
                out[key] = tuple(out[key])
        return out

    @classmethod
    def from_vae(cls, vae_or_path: nn.Module | str | Path, *, use_skips: bool = True,
                 sharp_encoder: bool = True, generator: torch.Generator | None = None) -> EVAE:
        """Build an eVAE from an ``AutoencoderKL`` (object, diffusers VAE folder, or SD folder).

        The VAE's weights are copied under the same names; E2 starts as a copy of E1; the skips
        start as exact no-ops, so ``decode(*encode(x))`` equals the VAE's mean reconstruction.
        Raises :class:`deblurcli.errors.WeightsError` if a path does not hold a loadable VAE.
        """
        vae = _load_vae(vae_or_path) if isinstance(vae_or_path, (str, Path)) else vae_or_path
        model = cls(**cls.vae_config(vae.config), use_skips=use_skips, sharp_encoder=sharp_encoder)
        if use_skips:
            model.init_skip_weights(generator)
        state = vae.state_dict()
        if sharp_encoder:
            for key, value in list(state.items()):
                if key.startswith("encoder."):
                    state["encoder_sharp." + key[len("encoder."):]] = value
                elif key.startswith("quant_conv."):
                    state["quant_conv_sharp." + key[len("quant_conv."):]] = value
        missing, unexpected = model.load_state_dict(state, strict=False)
        bad = [k for k in missing if not k.startswith(("skip_blocks.", "skip_fusions."))]
        if bad or unexpected:
            from deblurcli.errors import WeightsError

            raise WeightsError(f"the VAE does not match the eVAE layout (missing {bad[:3]}, "
                               f"unexpected {list(unexpected)[:3]})")
        dtype = next(vae.parameters()).dtype
        return model if dtype == torch.float32 else model.to(dtype=dtype)

    # ------------------------------------------------------------------ running
    @property
    def num_levels(self) -> int:
        """Number of encoder resolutions (= number of skips when ``use_skips``)."""
        return len(self.config.block_out_channels)

    @property
    def num_skips(self) -> int:
        """Length of the ``skips`` tuple :meth:`encode` returns and :meth:`decode` expects."""
        return (self.num_levels if self.skip_blocks is not None else 0) + int(self.config.image_skip)

    def _ckpt(self, module: nn.Module, *args: Tensor) -> Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)
        return module(*args)

    def _down(self, encoder: nn.Module, x: Tensor, collect: bool) -> tuple[Tensor, list[Tensor]]:
        """The encoder up to its mid block: (features after the last down block, skip features)."""
        h = encoder.conv_in(x)
        features: list[Tensor] = []
        for block in encoder.down_blocks:
            if collect:
                feature, h = _down_block_features(block, h)
                features.append(feature)
            else:
                h = self._ckpt(block, h)
        return h, features

    def _run_encoder(self, encoder: nn.Module, quant: nn.Module | None, x: Tensor,
                     collect: bool) -> tuple[Tensor, list[Tensor]]:
        h, features = self._down(encoder, x, collect)
        # the mid block checkpoints its own resnets once enable_gradient_checkpointing() set it
        h = encoder.mid_block(h)
        h = encoder.conv_out(encoder.conv_act(encoder.conv_norm_out(h)))
        if quant is not None:
            h = quant(h)
        mean = h[:, : self.config.latent_channels]
        if self.config.shift_factor is not None:
            mean = mean - self.config.shift_factor
        return mean * self.config.scaling_factor, features

    def encode(self, x: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        """E1: blurry image ``x`` in ``[-1, 1]`` -> (scaled latent ``z``, skip tensors).

        ``skips`` holds one tensor per encoder resolution (finest first); it is empty when the
        model was built with ``use_skips=False``.
        """
        z, features = self._run_encoder(self.encoder, self.quant_conv, x,
                                        collect=self.skip_blocks is not None)
        return z, self._skips(x, features)

    def _skips(self, x: Tensor, features: list[Tensor]) -> tuple[Tensor, ...]:
        skips: tuple[Tensor, ...] = ()
        if self.skip_blocks is not None:
            pairs = zip(self.skip_blocks, features, strict=True)
            skips = tuple(self._ckpt(block, f) for block, f in pairs)
        if self.config.image_skip:
            skips = (*skips, x)
        return skips

    def encode_skips(self, x: Tensor) -> tuple[Tensor, ...]:
        """E1's skip tensors alone, without its latent head (stage-1 training needs only these)."""
        features: list[Tensor] = []
        if self.skip_blocks is not None:
            _, features = self._down(self.encoder, x, collect=True)
        return self._skips(x, features)

    def encode_sharp(self, x: Tensor) -> Tensor:
        """E2: sharp image ``x`` in ``[-1, 1]`` -> scaled latent (training target)."""
        if self.encoder_sharp is None:
            from deblurcli.errors import WeightsError

            raise WeightsError("this eVAE has no sharp encoder (E2); "
                               "it was saved for inference only")
        z, _ = self._run_encoder(self.encoder_sharp, self.quant_conv_sharp, x, collect=False)
        return z

    def decode(self, z: Tensor, skips: tuple[Tensor, ...] = ()) -> Tensor:
        """Scaled latent ``z`` (+ the ``skips`` from :meth:`encode`) -> image in ``[-1, 1]``
        (unclamped)."""
        z = z / self.config.scaling_factor
        if self.config.shift_factor is not None:
            z = z + self.config.shift_factor
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        dec = self.decoder
        h = dec.conv_in(z)
        h = dec.mid_block(h)  # checkpoints itself, like the encoder's
        levels = self.num_levels
        use_skips = self.skip_fusions is not None
        if len(skips) != self.num_skips:
            raise ValueError(f"decode expects {self.num_skips} skip tensors, got {len(skips)}")
        for j, block in enumerate(dec.up_blocks):
            if use_skips:
                level = levels - 1 - j
                s = skips[level].to(h.dtype)
                h = h + self.skip_fusions[level](torch.cat([h, s], dim=1))
            h = self._ckpt(block, h)
        h = dec.conv_out(dec.conv_act(dec.conv_norm_out(h)))
        if self.config.image_skip:  # the decoder predicts a correction of the input image
            h = h + skips[-1].to(h.dtype)
        return h

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruct ``x`` through E1, the skips and the decoder."""
        z, skips = self.encode(x)
        return self.decode(z, skips)


def _load_vae(source: str | Path) -> nn.Module:
    """An ``AutoencoderKL`` from a VAE folder, an SD folder (``vae/``) or a cached hub id."""
    from diffusers import AutoencoderKL

    from deblurcli.models.pretrained import load_part

    return load_part(AutoencoderKL, source, "vae", "VAE")
