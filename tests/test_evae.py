"""EVAE: loading an SD-style VAE, exact equivalence at init, skips, two encoders, save/load."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL

from deblurcli.errors import WeightsError
from deblurcli.models.evae import EVAE


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=(8, 8, 16, 16),
                         down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4,
                         norm_num_groups=4, layers_per_block=1).eval()


def images(n: int = 2, size: int = 32, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


@torch.no_grad()
def test_evae_from_vae_reproduces_the_vae():
    vae = tiny_vae()
    evae = EVAE.from_vae(vae).eval()
    x = images()
    z, skips = evae.encode(x)
    mean = vae.encode(x).latent_dist.mean
    assert torch.equal(z, mean * vae.config.scaling_factor)
    assert [s.shape[-1] for s in skips] == [32, 16, 8, 4]
    assert all(torch.count_nonzero(s) == 0 for s in skips)
    expected = vae.decode(mean).sample
    out = evae.decode(z, skips)
    # only difference: z / scaling_factor * scaling_factor rounding
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    assert torch.equal(evae.encode_sharp(x), z)  # E2 starts as a copy of E1


@torch.no_grad()
def test_from_vae_accepts_a_stable_diffusion_folder(tmp_path):
    vae = tiny_vae()
    vae.save_pretrained(tmp_path / "sd" / "vae")
    evae = EVAE.from_vae(tmp_path / "sd").eval()
    x = images(1)
    torch.testing.assert_close(evae(x), vae.decode(vae.encode(x).latent_dist.mean).sample,
                               atol=1e-5, rtol=0)
    with pytest.raises(WeightsError, match="VAE source not found"):
        EVAE.from_vae(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="no diffusers VAE"):
        EVAE.from_vae(tmp_path / "empty")


@torch.no_grad()
def test_use_skips_false_is_the_plain_vae():
    vae = tiny_vae()
    evae = EVAE.from_vae(vae, use_skips=False, sharp_encoder=False).eval()
    assert not any(k.startswith(("skip_", "encoder_sharp")) for k in evae.state_dict())
    x = images(1)
    z, skips = evae.encode(x)
    assert skips == ()
    torch.testing.assert_close(evae.decode(z, skips),
                               vae.decode(vae.encode(x).latent_dist.mean).sample,
                               atol=1e-5, rtol=0)
    with pytest.raises(WeightsError, match="no sharp encoder"):
        evae.encode_sharp(x)


def test_gradients_reach_the_skip_path_and_skips_become_live():
    evae = EVAE.from_vae(tiny_vae())
    x = images(1)
    loss = evae(x).square().mean()
    loss.backward()
    for block in evae.skip_blocks:
        assert block[2].weight.grad.abs().sum() > 0  # zero-init last conv still learns
    # one optimiser step on the skip path makes the skips change the output
    with torch.no_grad():
        before = evae(x)
        for block in evae.skip_blocks:
            block[2].weight -= 0.1 * block[2].weight.grad.sign()
        after = evae(x)
    assert (after - before).abs().max() > 1e-4


@torch.no_grad()
def test_save_pretrained_round_trip(tmp_path):
    evae = EVAE.from_vae(tiny_vae())
    for block in evae.skip_blocks:  # make the skips non-trivial
        block[2].weight.normal_(0, 0.1)
    evae.eval().save_pretrained(tmp_path / "evae")
    loaded = EVAE.from_pretrained(tmp_path / "evae").eval()
    assert loaded.config.use_skips and loaded.config.sharp_encoder
    x = images(1)
    assert torch.equal(loaded(x), evae(x))


def test_gradient_checkpointing_gives_the_same_result(monkeypatch):
    import torch.utils.checkpoint as ckpt

    evae = EVAE.from_vae(tiny_vae())
    x = images(1)
    with torch.no_grad():
        ref = evae(x)
    evae.enable_gradient_checkpointing()
    calls = []
    original = ckpt.checkpoint
    monkeypatch.setattr(ckpt, "checkpoint", lambda *a, **k: calls.append(1) or original(*a, **k))
    out = evae(x)
    assert calls, "gradient checkpointing was not used"
    torch.testing.assert_close(out.detach(), ref)


def test_decode_checks_the_number_of_skips():
    evae = EVAE.from_vae(tiny_vae())
    z, skips = evae.encode(images(1))
    with pytest.raises(ValueError, match="skip tensors"):
        evae.decode(z, skips[:2])


def test_encode_skips_equals_the_skips_of_encode():
    evae = EVAE.from_vae(tiny_vae())
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # skip blocks start at zero; give them values so equality means something
        for p in evae.skip_blocks.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    x = images(2)
    _, skips = evae.encode(x)
    assert all(s.abs().max() > 0 for s in skips)
    alone = evae.encode_skips(x)
    assert len(alone) == len(skips) > 0
    for a, b in zip(alone, skips, strict=True):
        assert torch.equal(a, b)


def _image_skip_evae(use_skips: bool = True) -> EVAE:
    torch.manual_seed(0)
    return EVAE(block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4,
                use_skips=use_skips, image_skip=True).eval()


@pytest.mark.parametrize("use_skips", [True, False])
def test_image_skip_starts_as_the_identity_and_learns_a_correction(use_skips):
    evae = _image_skip_evae(use_skips)
    x = images(2)
    z, skips = evae.encode(x)
    assert len(skips) == evae.num_skips == (5 if use_skips else 1)
    assert torch.equal(skips[-1], x)
    with torch.no_grad():
        assert torch.equal(evae.decode(z, skips), x)  # the output conv starts at zero
        evae.decoder.conv_out.bias.fill_(0.25)
        torch.testing.assert_close(evae.decode(z, skips), x + 0.25)
    assert torch.equal(evae.encode_skips(x)[-1], x)
    with pytest.raises(ValueError, match="skip tensors"):
        evae.decode(z, skips[:-1])


def test_image_skip_is_saved_in_the_config(tmp_path):
    evae = _image_skip_evae()
    with torch.no_grad():
        evae.decoder.conv_out.weight.normal_()
    evae.save_pretrained(tmp_path, safe_serialization=True)
    loaded = EVAE.from_pretrained(tmp_path)
    assert loaded.config.image_skip
    assert torch.equal(loaded.decoder.conv_out.weight, evae.decoder.conv_out.weight)
    x = images(1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), evae(x))


def test_live_skip_init_opens_the_skip_path_at_once():
    x = images(1)
    for live in (False, True):
        evae = _image_skip_evae()
        evae.init_skip_weights(torch.Generator().manual_seed(0), live=live)
        with torch.no_grad():
            skips = evae.encode(x)[1][:-1]
        assert all(bool(s.abs().max() > 0) == live for s in skips)  # zero-init convs: skips are 0
        fusion = evae.skip_fusions[0].weight
        dec_ch = evae.skip_fusions[0].out_channels
        assert not fusion[:, :dec_ch].any()  # the decoder's own path stays the identity
        assert fusion[:, dec_ch:].std() > (0.1 if live else 0) and fusion[:, dec_ch:].std() < 0.5
