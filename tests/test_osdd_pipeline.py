"""OSDDPipeline: a diffusers DiffusionPipeline whose γ-blend and fuse are diffusers' own calls,
with the outputs of deblurcli 0.1's hand-written blend (``data/gamma_reference.safetensors``,
computed by that implementation before it was replaced)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deblurcli.models.osdd import build_osdd, tiny_osdd_config
from deblurcli.models.osdd_pipeline import OSDDPipeline

REFERENCE = Path(__file__).parent / "data" / "gamma_reference.safetensors"


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    return load_file(str(REFERENCE))


def reference_pipeline(reference) -> OSDDPipeline:
    model = build_osdd(tiny_osdd_config(lora_rank=2), seed=0)
    model.load_state_dict({k[len("model."):]: v.float() for k, v in reference.items()
                           if k.startswith("model.")})
    return OSDDPipeline.from_model(model)


@torch.no_grad()
def test_live_gamma_blend_matches_the_previous_implementation(reference):
    pipe = reference_pipeline(reference)
    for gamma in (0.0, 0.3, 0.7, 1.0):
        pipe.set_gamma(gamma)
        torch.testing.assert_close(pipe(reference["input"]), reference[f"output.live_{gamma}"],
                                   atol=1e-5, rtol=0)


@torch.no_grad()
def test_saved_loaded_and_fused_outputs_match_the_previous_implementation(reference, tmp_path):
    reference_pipeline(reference).save_pretrained(tmp_path / "m")
    for gamma in (0.3, 0.7):
        live = OSDDPipeline.from_pretrained(tmp_path / "m", gamma=gamma)
        torch.testing.assert_close(live(reference["input"]), reference[f"output.live_{gamma}"],
                                   atol=1e-5, rtol=0)
        live.fuse(gamma)  # diffusers' fuse_lora + unload_lora
        assert live.model.fused_gamma == gamma and not hasattr(live.unet, "peft_config")
        torch.testing.assert_close(live(reference["input"]), reference[f"output.fused_{gamma}"],
                                   atol=1e-5, rtol=0)
        fast = OSDDPipeline.from_pretrained(tmp_path / "m", gamma=gamma, fuse=True)  # no peft
        torch.testing.assert_close(fast(reference["input"]), reference[f"output.fused_{gamma}"],
                                   atol=1e-5, rtol=0)


def test_pipeline_components_and_round_trip(tiny_osdd, tmp_path):
    pipe = OSDDPipeline.from_model(tiny_osdd(seed=0))
    assert sorted(pipe.components) == ["evae", "prompt", "unet"]
    pipe.save_pretrained(tmp_path / "m", storage_dtype=torch.float16)
    again = OSDDPipeline.from_pretrained(tmp_path / "m", gamma=0.5, torch_dtype=torch.float32)
    assert again.gamma == 0.5 and again.model.unet_dtype == torch.float32
    assert again.prompt.config.timestep == pipe.prompt.config.timestep == 999
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    pipe.set_gamma(0.5)
    torch.testing.assert_close(again(x), pipe(x), atol=2e-2, rtol=0)


@torch.no_grad()
def test_a_pipeline_made_of_its_components_keeps_the_adapters(reference, tmp_path):
    """OSDDPipeline(**pipe.components) saw no adapters: no γ to set, and save_pretrained wrote
    the UNet without its LoRA files (the reloaded model 0.45 off)."""
    pipe = reference_pipeline(reference)
    again = OSDDPipeline(**pipe.components)
    for name, spec in pipe.model.lora_specs.items():  # (peft keeps the targets as a set)
        got = again.model.lora_specs[name]
        assert (got.rank, got.alpha, set(got.target_modules)) == \
            (spec.rank, spec.alpha, set(spec.target_modules))
    again.set_gamma(0.3)
    torch.testing.assert_close(again(reference["input"]), reference["output.live_0.3"],
                               atol=1e-5, rtol=0)
    again.save_pretrained(tmp_path / "m")
    loaded = OSDDPipeline.from_pretrained(tmp_path / "m", gamma=0.3)
    torch.testing.assert_close(loaded(reference["input"]), reference["output.live_0.3"],
                               atol=1e-5, rtol=0)


def test_a_numpy_or_an_integer_input_is_refused(tiny_osdd):
    """A numpy image failed with "'numpy.ndarray' object has no attribute 'to'"; a uint8
    tensor of 0..255 came back as a uint8 tensor of 0s and 1s, without a word."""
    import numpy as np

    from deblurcli.models.adapters import check_gamma

    pipe = OSDDPipeline.from_model(tiny_osdd(seed=0))
    with pytest.raises(TypeError, match="expected a \\(B, 3, H, W\\) tensor in \\[-1, 1\\], got "
                                        "ndarray"):
        pipe(np.zeros((1, 3, 16, 16), np.float32))
    with pytest.raises(ValueError, match="expected float values in \\[-1, 1\\], got torch.uint8"):
        pipe(torch.full((1, 3, 16, 16), 200, dtype=torch.uint8))
    with pytest.raises(ValueError, match="gamma must be a number between 0 and 1, got None"):
        check_gamma(None)


def test_from_pretrained_passes_the_loaders_notes_on(tiny_model_folder, tmp_path):
    """model.md says a fused folder ignores another gamma with a note; from_pretrained had no
    way to receive it."""
    from deblurcli.modelfolder import fuse_model_folder

    fuse_model_folder(tiny_model_folder, tmp_path / "fused", 0.25)
    notes = []
    OSDDPipeline.from_pretrained(tmp_path / "fused", gamma=0.9, warn=notes.append)
    assert len(notes) == 1 and "gamma=0.25" in notes[0]
