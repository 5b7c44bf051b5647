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
    ad.add_adapter(unet, ad.REAL, real)
    ad.add_adapter(unet, ad.SYNTHETIC, synthetic)
    ad.set_gamma(unet, 0.5)
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


def load_blend(unet, spec, state, name="blend"):
    """diffusers' own loader for a LoRA state dict + its config."""
    unet.load_lora_adapter(dict(state), adapter_name=name, prefix=None,
                           metadata=json.loads(ad.lora_metadata(spec)))


def test_adapter_files_are_diffusers_lora_files(tmp_path):
    unet = dual_unet()
    state = ad.adapter_state_dict(unet, "real")
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) and ".real." not in k
               for k in state)
    unet.save_lora_adapter(tmp_path, adapter_name="real", weight_name="stock.safetensors")
    ad.write_lora_file(tmp_path / "ours.safetensors", state, unet.peft_config["real"].to_dict())
    for name in ("stock", "ours"):
        spec, loaded, metadata = ad.read_lora_file(tmp_path / f"{name}.safetensors")
        assert (spec.rank, spec.alpha, set(spec.target_modules)) == \
            (REAL_SPEC.rank, REAL_SPEC.alpha, set(REAL_SPEC.target_modules))
        assert loaded.keys() == state.keys()
        other = tiny_unet()
        other.load_lora_adapter(str(tmp_path), weight_name=f"{name}.safetensors",
                                adapter_name="real", prefix=None)
        ad.set_adapter_weights(unet, {"real": 1.0})
        torch.testing.assert_close(run(other), run(unet))
    with safe_open(str(tmp_path / "ours.safetensors"), "pt") as f:
        ours = f.metadata()
    with safe_open(str(tmp_path / "stock.safetensors"), "pt") as f:
        stock = json.loads(f.metadata()[ad.LORA_METADATA_KEY])
    ours = json.loads(ours[ad.LORA_METADATA_KEY])
    assert set(stock.pop("target_modules")) == set(ours.pop("target_modules"))  # a set in peft
    assert stock == ours
    with pytest.raises(WeightsError, match="missing weights file"):
        ad.read_lora_file(tmp_path / "none.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsError, match="junk.safetensors"):
        ad.read_lora_file(tmp_path / "junk.safetensors")


def test_the_metadata_key_is_diffusers_own():
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY

    assert ad.LORA_METADATA_KEY == LORA_ADAPTER_METADATA_KEY


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
    load_blend(other, spec, state)
    torch.testing.assert_close(run(other), runtime, atol=1e-5, rtol=1e-5)


def test_blend_files(tmp_path):
    unet = dual_unet()
    unet.save_lora_adapter(tmp_path, adapter_name="real", weight_name="r.safetensors")
    unet.save_lora_adapter(tmp_path, adapter_name="synthetic", weight_name="s.safetensors")
    spec = ad.blend_adapter_files(tmp_path / "r.safetensors", tmp_path / "s.safetensors", 1.0,
                                  tmp_path / "b.safetensors")
    ad.set_gamma(unet, 1.0)
    spec2, _, metadata = ad.read_lora_file(tmp_path / "b.safetensors")
    assert spec2.rank == spec.rank and ad.blend_gamma(metadata, "b") == 1.0
    other = tiny_unet()  # stock diffusers loads the blend file
    other.load_lora_adapter(str(tmp_path / "b.safetensors"), adapter_name="blend", prefix=None)
    torch.testing.assert_close(run(other), run(unet), atol=1e-5, rtol=1e-5)
    with pytest.raises(WeightsError, match="records no gamma"):
        ad.blend_gamma(ad.read_lora_file(tmp_path / "r.safetensors")[2], "r.safetensors")


def test_presets_give_both_adapters_the_same_spec():
    from deblurcli.models.adapters import ADAPTER_NAMES, LoraSpec, dual_lora
    from deblurcli.models.presets import compact_config, sd21_config

    assert dual_lora(4) == {name: LoraSpec(rank=4, alpha=4.0) for name in ADAPTER_NAMES}
    assert dual_lora(4, alpha=8)["synthetic"].alpha == 8.0
    assert compact_config().lora == dual_lora(8)
    assert sd21_config(lora_rank=2).lora == dual_lora(2)
