"""Dynamic Dual-Adapter: exact gamma blend, fusing, trainability, adapter files, exact blending."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors import safe_open

from deblurcli.errors import WeightsError
from deblurcli.models import adapters as ad
from deblurcli.models.osdd import randomize_lora


def tiny_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(16, 32),
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4,
                                use_linear_projection=True).eval()


REAL_SPEC = ad.LoraSpec(rank=2, alpha=2.0)
SYNTH_SPEC = ad.LoraSpec(rank=3, alpha=6.0)


def dual_unet(seed: int = 0, real=REAL_SPEC, synthetic=SYNTH_SPEC) -> UNet2DConditionModel:
    unet = tiny_unet(seed)
    ad.add_dual_adapters(unet, real, synthetic)
    randomize_lora(unet, torch.Generator().manual_seed(seed + 1), std=0.1)
    return unet


def inputs(seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([999, 999]),
            torch.randn(2, 3, 16, generator=g))


@torch.no_grad()
def run(unet, x=None):
    z, t, c = x or inputs()
    return unet(z, t, encoder_hidden_states=c).sample


def test_targets_cover_attention_resnet_projection_and_ff_layers():
    unet = dual_unet()
    names = [n for n, _ in ad.lora_layers(unet)]
    for suffix in ("attn1.to_q", "attn2.to_k", "to_v", "to_out.0", "conv1", "conv2",
                   "conv_shortcut", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"):
        assert any(n.endswith(suffix) for n in names), suffix
    assert ad.adapter_names(unet) == ["real", "synthetic"]


@torch.no_grad()
def test_every_layer_computes_the_gamma_blend_exactly():
    unet = dual_unet()
    ad.set_gamma(unet, 0.3)
    _name, layer = next((n, m) for n, m in ad.lora_layers(unet) if n.endswith("attn1.to_q"))
    x = torch.randn(5, layer.in_features)
    w = layer.get_base_layer().weight
    d_real = (2.0 / 2) * layer.lora_B["real"].weight @ layer.lora_A["real"].weight
    d_syn = (6.0 / 3) * layer.lora_B["synthetic"].weight @ layer.lora_A["synthetic"].weight
    expected = x @ w.T + 0.3 * x @ d_real.T + 0.7 * x @ d_syn.T
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=1e-5)


def test_gamma_one_and_zero_equal_single_adapters():
    unet = dual_unet()
    ad.set_adapter_weights(unet, {"real": 1.0})
    real_only = run(unet)
    ad.set_adapter_weights(unet, {"synthetic": 1.0})
    synth_only = run(unet)
    assert (real_only - synth_only).abs().max() > 1e-3  # the adapters do differ
    ad.set_gamma(unet, 1.0)
    torch.testing.assert_close(run(unet), real_only, atol=1e-6, rtol=0)
    ad.set_gamma(unet, 0.0)
    torch.testing.assert_close(run(unet), synth_only, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="between 0 and 1"):
        ad.set_gamma(unet, 1.2)


def test_fused_equals_unfused_and_removes_lora_layers():
    unet = dual_unet()
    ad.set_gamma(unet, 0.4)
    unfused = run(unet)
    ad.fuse_adapters(unet, 0.4)
    assert list(ad.lora_layers(unet)) == []
    assert not any("lora" in k or "base_layer" in k for k in unet.state_dict())
    torch.testing.assert_close(run(unet), unfused, atol=1e-5, rtol=1e-5)


def test_set_trainable_adapter_and_gamma_keep_requires_grad():
    unet = dual_unet()

    def trainable():
        return {n.split(".lora_")[1].split(".")[1] if ".lora_" in n else "base"
                for n, p in unet.named_parameters() if p.requires_grad}

    ad.set_trainable_adapter(unet, "synthetic")
    assert trainable() == {"synthetic"}
    ad.set_gamma(unet, 0.2)  # peft/diffusers would re-enable 'real' here
    assert trainable() == {"synthetic"}
    z, t, c = inputs()
    unet(z, t, encoder_hidden_states=c).sample.square().mean().backward()
    grads = {n for n, p in unet.named_parameters() if p.grad is not None}
    assert grads and all(".synthetic." in n for n in grads)
    ad.set_trainable_adapter(unet, None)
    assert trainable() == set()
    with pytest.raises(WeightsError):
        ad.set_trainable_adapter(unet, "nope")


def test_adapter_file_round_trip(tmp_path):
    unet = dual_unet()
    state = ad.adapter_state_dict(unet, "real")
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) and ".real." not in k
               for k in state)
    path = tmp_path / "lora_real.safetensors"
    ad.save_adapter_file(path, state, REAL_SPEC)
    with safe_open(str(path), "pt") as f:
        assert json.loads(f.metadata()["lora_spec"])["rank"] == 2
    spec, loaded = ad.load_adapter_file(path)
    assert spec == REAL_SPEC
    other = tiny_unet()
    ad.add_adapter(other, "real", spec)
    ad.load_adapter_state_dict(other, "real", loaded)
    ad.set_adapter_weights(unet, {"real": 1.0})
    torch.testing.assert_close(run(other), run(unet))
    bad = dict(loaded)
    key = next(iter(bad))
    bad[key] = torch.zeros(7, 7)
    with pytest.raises(WeightsError, match="has shape"):
        ad.load_adapter_state_dict(other, "real", bad, source="lora_real.safetensors")
    bad.pop(key)
    with pytest.raises(WeightsError, match="missing"):
        ad.load_adapter_state_dict(other, "real", bad)


@pytest.mark.parametrize("real_targets", [ad.DEFAULT_TARGETS, ("to_q", "to_v", "conv1")])
def test_blended_adapter_equals_runtime_blend(real_targets):
    real_spec = ad.LoraSpec(rank=2, alpha=1.0, target_modules=real_targets)
    unet = dual_unet(real=real_spec)
    gamma = 0.35
    ad.set_gamma(unet, gamma)
    runtime = run(unet)
    spec, state = ad.blend_adapter_states(ad.adapter_state_dict(unet, "real"), real_spec,
                                          ad.adapter_state_dict(unet, "synthetic"), SYNTH_SPEC,
                                          gamma)
    ranks = {v.shape[0] for k, v in state.items() if k.endswith(".lora_A.weight")}
    assert ranks == ({5} if real_targets == ad.DEFAULT_TARGETS else {3, 5})
    assert spec.alpha == spec.rank  # the blend's own scaling is 1
    other = tiny_unet()
    ad.add_adapter(other, "blend", spec)
    ad.load_adapter_state_dict(other, "blend", state)
    torch.testing.assert_close(run(other), runtime, atol=1e-5, rtol=1e-5)


def test_blend_files(tmp_path):
    unet = dual_unet()
    ad.save_adapter_file(tmp_path / "r.safetensors", ad.adapter_state_dict(unet, "real"), REAL_SPEC)
    ad.save_adapter_file(tmp_path / "s.safetensors", ad.adapter_state_dict(unet, "synthetic"),
                         SYNTH_SPEC)
    spec = ad.blend_adapter_files(tmp_path / "r.safetensors", tmp_path / "s.safetensors", 1.0,
                                  tmp_path / "b.safetensors")
    ad.set_gamma(unet, 1.0)
    other = tiny_unet()
    spec2, state = ad.load_adapter_file(tmp_path / "b.safetensors")
    assert spec2 == spec
    ad.add_adapter(other, "blend", spec2)
    ad.load_adapter_state_dict(other, "blend", state)
    torch.testing.assert_close(run(other), run(unet), atol=1e-5, rtol=1e-5)
    with pytest.raises(WeightsError, match="missing weights file"):
        ad.load_adapter_file(tmp_path / "none.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsError, match="junk.safetensors"):
        ad.load_adapter_file(tmp_path / "junk.safetensors")


def test_lora_spec_from_dict_rejects_unknown_keys():
    from deblurcli.models.adapters import LoraSpec

    spec = LoraSpec(rank=3, alpha=6.0, rank_pattern={"to_q": 2})
    assert LoraSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="unknown LoRA settings.*dropout"):
        LoraSpec.from_dict({**spec.to_dict(), "dropout": 0.1})


def test_presets_give_both_adapters_the_same_spec():
    from deblurcli.models.adapters import ADAPTER_NAMES, LoraSpec, dual_lora
    from deblurcli.models.presets import compact_config, sd21_config

    assert dual_lora(4) == {name: LoraSpec(rank=4, alpha=4.0) for name in ADAPTER_NAMES}
    assert dual_lora(4, alpha=8)["synthetic"].alpha == 8.0
    assert compact_config().lora == dual_lora(8)
    assert sd21_config(lora_rank=2).lora == dual_lora(2)
