"""Loading a model folder fused (the ``deblur`` default) merges the adapters without peft, with
exactly the arithmetic of the peft path (add, load, merge_and_unload): same weights, bit for bit."""

from __future__ import annotations

import pytest
import torch

import deblurcli.modelfolder as mf
from deblurcli.errors import WeightsError
from deblurcli.models import adapters as ad
from deblurcli.models.presets import preset_config


def _via_peft(monkeypatch, *args, **kwargs):
    with monkeypatch.context() as m:
        m.setattr(mf, "_merge_without_peft", lambda *a, **k: None)
        return mf.load_model_folder(*args, **kwargs)


def _assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("gamma", [0.0, 0.3, 1.0])
def test_fused_load_equals_the_peft_merge(tiny_model_folder, monkeypatch, gamma):
    fast = mf.load_model_folder(tiny_model_folder, gamma=gamma)
    slow = _via_peft(monkeypatch, tiny_model_folder, gamma=gamma)
    assert fast.fused_gamma == slow.fused_gamma == gamma and fast.gamma == slow.gamma
    assert fast.lora_specs == slow.lora_specs == {}
    assert not list(ad.lora_layers(fast.unet))
    _assert_same_weights(fast, slow)
    base = mf.load_model_folder(tiny_model_folder, gamma=gamma, fuse=False)
    assert list(ad.lora_layers(base.unet))  # --no-fuse still runs live peft adapters


def test_fused_load_of_a_compact_model_with_fp16_storage(tmp_path, monkeypatch):
    """The compact preset's layers (3x3 and 1x1 convolutions, linear projections), rank
    patterns and half-precision files."""
    from deblurcli.models.osdd import build_osdd

    config = preset_config("compact")
    spec = ad.LoraSpec(rank=4, alpha=8.0, rank_pattern={"conv1": 2}, alpha_pattern={"to_q": 3.0})
    config.lora = {ad.REAL: spec, ad.SYNTHETIC: ad.LoraSpec(rank=3, alpha=3.0)}
    model = build_osdd(config, seed=1, randomize_adapters=True)
    mf.save_model_folder(tmp_path / "m", model, storage_dtype=torch.float16)
    _assert_same_weights(mf.load_model_folder(tmp_path / "m", gamma=0.6),
                         _via_peft(monkeypatch, tmp_path / "m", gamma=0.6))


def test_adapter_file_load_equals_the_peft_merge(tiny_model_folder, tmp_path, monkeypatch):
    blend = tmp_path / "blend.safetensors"
    ad.blend_adapter_files(tiny_model_folder / "lora_real.safetensors",
                           tiny_model_folder / "lora_synthetic.safetensors", 0.4, blend)
    notes: list[str] = []
    fast = mf.load_model_folder(tiny_model_folder, gamma=0.9, lora=blend, warn=notes.append)
    slow = _via_peft(monkeypatch, tiny_model_folder, gamma=0.9, lora=blend, warn=notes.append)
    assert fast.fused_gamma == slow.fused_gamma == 0.4 and fast.gamma == slow.gamma == 0.4
    assert len(notes) == 2 and notes[0] == notes[1] and "0.4" in notes[0]
    _assert_same_weights(fast, slow)


def test_an_adapter_that_does_not_fit_gives_the_same_error(tiny_model_folder, monkeypatch):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = tiny_model_folder / "lora_synthetic.safetensors"

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    state = load_file(str(path))
    key = sorted(k for k in state if k.endswith("lora_A.weight"))[0]
    state[key] = torch.zeros(7, *state[key].shape[1:])
    save_file(state, str(path), metadata=metadata)
    messages = []
    for load in (mf.load_model_folder, lambda *a, **k: _via_peft(monkeypatch, *a, **k)):
        with pytest.raises(WeightsError) as info:
            load(tiny_model_folder, gamma=0.5, verify=False)
        messages.append(str(info.value))
    assert messages[0] == messages[1] and "lora_synthetic.safetensors" in messages[0]
