"""Training losses: Sobel edges, GAN losses, perceptual back-ends and their weight checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from deblurcli.errors import WeightsError
from deblurcli.train import losses


def test_sobel_magnitude_edges() -> None:
    flat = torch.zeros(1, 3, 8, 8)
    out = losses.sobel_magnitude(flat)
    assert out.shape == (1, 3, 8, 8)
    assert torch.allclose(out, torch.full_like(out, -1.0))  # no gradient anywhere -> 0 -> -1
    step = torch.full((1, 3, 8, 8), -1.0)
    step[..., 4:] = 1.0  # black | white vertical edge
    out = losses.sobel_magnitude(step)
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 0], out[:, 2])
    mag = (out[0, 0] + 1) / 2
    assert mag[:, 3:5].min() > 0.9 and mag[:, :2].max() < 1e-4 and mag[:, 6:].max() < 1e-4


def test_gan_losses_match_formulas() -> None:
    real = torch.tensor([2.0, -1.0])
    fake = torch.tensor([0.5, -3.0])
    sig = torch.sigmoid
    expected_d = (-torch.log(sig(real))).mean() + (-torch.log(1 - sig(fake))).mean()
    assert torch.allclose(losses.discriminator_loss(real, fake), expected_d, atol=1e-6)
    assert torch.allclose(losses.generator_loss(fake), (-torch.log(sig(fake))).mean(), atol=1e-6)


def test_none_backend_is_zero() -> None:
    metric = losses.build_perceptual("none")
    a = torch.rand(1, 3, 16, 16) * 2 - 1
    assert metric(a, -a).item() == 0.0 and losses.edge_aware(metric, a, -a).item() == 0.0


def test_missing_pyiqa_weights_name_the_file(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(WeightsError, match=r"DISTS_weights-f5e65c96\.pth") as info:
        losses.build_perceptual("dists")
    assert str(tmp_path) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(WeightsError, match="LPIPS_v0.1_alex"):
        losses.build_perceptual("lpips")
    assert losses.build_perceptual("dists", fallback="none").name == "none"
    assert not list(tmp_path.rglob("*.pth"))  # nothing was downloaded


def test_stlpips_offline_with_packaged_weights() -> None:
    metric = losses.build_perceptual("dists", fallback="stlpips")
    assert metric.name == ("dists" if losses.perceptual_available("dists")[0] else "stlpips")
    metric = losses.build_perceptual("stlpips")
    packaged = torch.load(losses.stlpips_weight_file(), map_location="cpu", weights_only=True)
    assert torch.equal(metric.net.lin0.model[1].weight, packaged["lin0.model.1.weight"])
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(1, 3, 32, 32, generator=gen) * 2 - 1
    b = (a + 0.3 * torch.randn(1, 3, 32, 32, generator=gen)).clamp(-1, 1)
    assert metric(a, a).item() == pytest.approx(0.0, abs=1e-6)
    pred = b.clone().requires_grad_(True)
    loss = losses.edge_aware(metric, pred, a)
    assert loss.item() > metric(b, a).item() > 0
    loss.backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in metric.net.parameters())


def test_crops_too_small_for_the_perceptual_loss_are_refused_before_the_run(tmp_path) -> None:
    """--crop 16 (its help allows 8) stopped at the first step with torch's "Padding size
    should be less than the corresponding input dimension", leaving a run folder behind; empty
    or negative progressive sizes stopped with an IndexError or a numpy error."""
    from deblurcli.errors import DeblurcliError
    from deblurcli.train.config import DiffusionTrainConfig
    from deblurcli.train.diffusion import train_diffusion

    metric = losses.build_perceptual("stlpips")
    with pytest.raises(DeblurcliError, match="crops of 16x16 pixels are too small for "
                                             "--perceptual stlpips; give a larger --crop or "
                                             "--perceptual none"):
        losses.check_perceptual_size(metric, 16)
    losses.check_perceptual_size(metric, 24)
    losses.check_perceptual_size(losses.build_perceptual("none"), 8)
    for sizes in ([], [-8], [0], [64, 12]):
        with pytest.raises(DeblurcliError, match="progressive sizes must be positive multiples"):
            train_diffusion(DiffusionTrainConfig(data=str(tmp_path), output=str(tmp_path / "r"),
                                                 progressive=True, progressive_sizes=sizes))
