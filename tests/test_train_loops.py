"""Both training stages on tiny models (CPU): outputs load, losses fall, resume is exact, the
CLI reports bad data in one line."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from deblurcli.errors import DeblurcliError
from deblurcli.train.config import DiffusionTrainConfig, VaeTrainConfig
from deblurcli.train.diffusion import train_diffusion
from deblurcli.train.vae import load_evae, train_vae

FAST = {"preset": "tiny", "crop": 32, "batch_size": 2, "val_size": 32, "cpu": True,
        "perceptual": "none", "checkpoint_every": 100, "validate_every": 100, "log_every": 1}


@pytest.fixture(scope="module")
def evae_run(pairs: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("evae") / "run"
    result = train_vae(VaeTrainConfig(data=str(pairs), output=str(out), max_steps=2, val_count=1,
                                      **FAST))
    assert result.step == 2 and not result.interrupted
    return out


def _batch(pairs: Path, side: str, size: int) -> torch.Tensor:
    """All ``pairs/side`` images, top-left ``size`` crops, as one [-1, 1] batch."""
    from deblurcli.images import read_image
    from deblurcli.train.data import to_tensor

    return torch.stack([to_tensor(read_image(p).pixels[:size, :size])
                        for p in sorted((pairs / side).iterdir())])


def _losses(run: Path, key: str = "loss") -> list[float]:
    with (run / "train_log.csv").open() as fh:
        return [float(r[key]) for r in csv.DictReader(fh) if r.get(key)]


def test_vae_stage_outputs(evae_run: Path) -> None:
    evae = load_evae(evae_run / "model")
    assert evae.skip_blocks is not None and evae.encoder_sharp is not None
    assert (evae_run / "model" / "training.json").is_file()
    assert list((evae_run / "validation").glob("step-*.png"))
    assert len(_losses(evae_run)) == 2
    assert len(_losses(evae_run, "val_psnr")) == 1  # validation at the last step, in the CSV
    with torch.no_grad():
        x = torch.zeros(1, 3, 32, 32)
        assert evae.decode(*evae.encode(x)).shape == x.shape


def test_vae_modes(pairs: Path, tmp_path: Path) -> None:
    run = tmp_path / "frozen"
    train_vae(VaeTrainConfig(data=str(pairs), output=str(run), max_steps=2, mode="freeze-e2",
                             lr=1e-3, **FAST))
    trained = load_evae(run / "model")
    from deblurcli.train.vae import build_evae

    start = build_evae(VaeTrainConfig(preset="tiny"))
    for (name, a), (_, b) in zip(start.encoder_sharp.named_parameters(),
                                 trained.encoder_sharp.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    assert not torch.equal(start.decoder.conv_out.weight, trained.decoder.conv_out.weight)
    run = tmp_path / "plain"
    train_vae(VaeTrainConfig(data=str(pairs), output=str(run), max_steps=1, mode="no-skips",
                             **FAST))
    assert load_evae(run / "model").skip_blocks is None


@pytest.fixture(scope="module")
def one_pair(pairs: Path, tmp_path_factory) -> Path:
    one = tmp_path_factory.mktemp("one")
    for sub in ("blur", "sharp"):
        (one / sub).mkdir(parents=True)
        shutil.copy(pairs / sub / "p1.png", one / sub / "p1.png")
    return one


def test_vae_overfits_one_batch(one_pair: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train_vae(VaeTrainConfig(data=str(one_pair), output=str(run), max_steps=30, lr=3e-3,
                             augment=False, **{**FAST, "batch_size": 1, "crop": 48}))
    losses = _losses(run)
    assert len(losses) == 30 and np.mean(losses[-5:]) < 0.6 * np.mean(losses[:3])


def test_diffusion_stage_writes_loadable_model_folder(pairs: Path, evae_run: Path,
                                                      tiny_model_folder: Path,
                                                      tmp_path: Path) -> None:
    from deblurcli.modelfolder import RECORD_KEY, load_model_folder, read_model_index

    run = tmp_path / "lora"
    result = train_diffusion(DiffusionTrainConfig(
        data=str(pairs), output=str(run), max_steps=2, evae=str(evae_run / "model"),
        init=str(tiny_model_folder), adapter="synthetic", val_count=1,
        **{**FAST, "perceptual": "stlpips", "lr": 1e-2}))
    assert result.model_folder == run / "model"
    assert set(read_model_index(run / "model")[RECORD_KEY]["adapters"]) == {"real", "synthetic"}
    model = load_model_folder(run / "model", gamma=0.3)
    with torch.no_grad():
        out = model(torch.zeros(1, 3, 32, 32))
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()
    from deblurcli.models.osdd_pipeline import OSDDPipeline

    pipe = OSDDPipeline.from_pretrained(run / "model", gamma=0.3, fuse=True)
    with torch.no_grad():
        assert torch.equal(pipe(torch.zeros(1, 3, 32, 32)), out)
    trained_skips = load_evae(evae_run / "model").skip_blocks[0][2].weight
    assert torch.equal(model.evae.skip_blocks[0][2].weight, trained_skips)  # eVAE stayed frozen
    from safetensors.torch import load_file

    def lora_b(folder: Path) -> dict:
        return {k: v for k, v in load_file(str(folder / "lora_synthetic.safetensors")).items()
                if "lora_B" in k or "lora_up" in k}

    before, after = lora_b(tiny_model_folder), lora_b(run / "model")
    assert before.keys() == after.keys() and before
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the adapter learned
    from deblurcli.cli.app import app

    result = CliRunner().invoke(app, ["deblur", str(pairs / "blur" / "p0.png"), str(tmp_path / "o"),
                                      "--weights", str(run / "model"), "--device", "cpu"])
    assert result.exit_code == 0, result.stderr
    assert len(list((tmp_path / "o").iterdir())) == 1


def test_diffusion_full_overfits(one_pair: Path, tmp_path: Path) -> None:
    run = tmp_path / "full"
    train_diffusion(DiffusionTrainConfig(data=str(one_pair), output=str(run), max_steps=20,
                                         lr=2e-3, full=True, lambda2=0.0, augment=False,
                                         **{**FAST, "batch_size": 1, "crop": 48}))
    losses = _losses(run, "l2")  # the frozen random decoder bounds how low it can go
    assert np.mean(losses[-5:]) < 0.75 * np.mean(losses[:3])


def test_progressive_sizes_with_accumulation(pairs: Path, tmp_path: Path, monkeypatch) -> None:
    seen: list[int] = []
    config = DiffusionTrainConfig(data=str(pairs), output=str(tmp_path / "p"), max_steps=2,
                                  grad_accum=2, progressive=True, progressive_sizes=[16, 24],
                                  progressive_steps=1, lambda2=0.0, full=True, **FAST)
    from deblurcli.train import diffusion

    original = diffusion.GeneratorStep.forward

    def spy(self, blur):
        seen.append(blur.shape[-1])
        return original(self, blur)

    monkeypatch.setattr(diffusion.GeneratorStep, "forward", spy)
    result = train_diffusion(config)
    assert result.step == 2 and seen == [16, 16, 24, 24]  # 2 micro-batches per step
    assert len(_losses(tmp_path / "p")) == 2


def test_interrupted_then_resumed_matches_uninterrupted(pairs: Path, tiny_model_folder: Path,
                                                        tmp_path: Path) -> None:
    from safetensors.torch import load_file

    common = dict(data=str(pairs), max_steps=4, lr=1e-3, adapter="synthetic",
                  init=str(tiny_model_folder),
                  **{**FAST, "checkpoint_every": 1})
    train_diffusion(DiffusionTrainConfig(output=str(tmp_path / "a"), **common))

    def stop_at_2(event) -> None:  # Ctrl-C during step 3: the run stops after step 2
        if event.done == 2:
            os.kill(os.getpid(), signal.SIGINT)

    b = tmp_path / "b"
    first = train_diffusion(DiffusionTrainConfig(output=str(b), **common), progress=stop_at_2)
    assert first.interrupted and first.step == 2 and first.model_folder is None
    from deblurcli.train.config import resolve_config

    config = resolve_config(DiffusionTrainConfig, None, {"resume": "latest", "output": str(b)})
    assert config.max_steps == 4 and config.adapter == "synthetic"
    second = train_diffusion(config)
    assert second.step == 4 and not second.interrupted
    for name in ("unet", "disc"):
        wa = load_file(str(tmp_path / "a" / "checkpoints" / "step-000000004" /
                           f"weights-{name}.safetensors"))
        wb = load_file(str(b / "checkpoints" / "step-000000004" / f"weights-{name}.safetensors"))
        assert wa.keys() == wb.keys() and wa
        for key in wa:
            assert torch.allclose(wa[key], wb[key], atol=1e-6), key


def test_resume_with_a_new_lr_uses_it(pairs: Path, tmp_path: Path) -> None:
    from deblurcli.train.config import resolve_config

    run = tmp_path / "r"
    train_vae(VaeTrainConfig(data=str(pairs), output=str(run), max_steps=2, lr=1e-3,
                             warmup_steps=4, **{**FAST, "checkpoint_every": 1}))
    config = resolve_config(VaeTrainConfig, None, {"resume": "latest", "output": str(run),
                                                   "max_steps": 4, "lr": 1e-4})
    train_vae(config)
    lrs = _losses(run, "lr")
    # each step's log has the rate its update used: the warm-up position is kept, the base
    # rate is new
    assert lrs[:2] == pytest.approx([1e-3 / 4, 2e-3 / 4])
    assert lrs[2:] == pytest.approx([3e-4 / 4, 1e-4])


def test_lr_factor_warms_up_then_holds_or_follows_a_cosine() -> None:
    from deblurcli.train.engine import lr_factor

    assert [lr_factor(s, warmup_steps=4) for s in range(6)] == [0.25, 0.5, 0.75, 1, 1, 1]
    cos = [lr_factor(s, warmup_steps=2, schedule="cosine", max_steps=6) for s in range(8)]
    assert cos[:2] == [0.5, 1.0]
    assert cos[2:] == pytest.approx([1.0, 0.8535534, 0.5, 0.1464466, 0.0, 0.0])
    with pytest.raises(ValueError):
        lr_factor(3, schedule="step")


def test_cosine_schedule_decays_the_logged_lr_across_a_resume(pairs: Path,
                                                              tmp_path: Path) -> None:
    from deblurcli.train.config import resolve_config

    run = tmp_path / "c"
    train_vae(VaeTrainConfig(data=str(pairs), output=str(run), max_steps=2, lr=1e-3,
                             lr_schedule="cosine", **{**FAST, "checkpoint_every": 1}))
    # the resumed run rebuilds the same schedule from the saved config
    config = resolve_config(VaeTrainConfig, None, {"resume": "latest", "output": str(run),
                                                   "max_steps": 4})
    train_vae(config)
    lrs = _losses(run, "lr")  # the rates the updates used: 2 steps of 2, then 2 more of 4
    assert lrs == pytest.approx([1e-3, 5e-4, 5e-4, 1e-3 * 0.5 * (1 + math.cos(0.75 * math.pi))])
    with pytest.raises(DeblurcliError, match="lr_schedule"):
        train_vae(VaeTrainConfig(data=str(pairs), output=str(tmp_path / "bad"),
                                 lr_schedule="linear", **FAST))


def test_init_carries_over_the_other_adapter(pairs: Path, tiny_model_folder: Path,
                                             tmp_path: Path) -> None:
    from safetensors.torch import load_file

    run = tmp_path / "real"
    train_diffusion(DiffusionTrainConfig(data=str(pairs), output=str(run), max_steps=2, lr=1e-2,
                                         init=str(tiny_model_folder), adapter="real",
                                         **{k: v for k, v in FAST.items() if k != "preset"}))
    for name, same in (("synthetic", True), ("real", False)):
        before = load_file(str(tiny_model_folder / f"lora_{name}.safetensors"))
        after = load_file(str(run / "model" / f"lora_{name}.safetensors"))
        assert before.keys() == after.keys()
        assert all(torch.equal(before[k], after[k]) for k in before) == same, name
    prompt = "prompt/diffusion_pytorch_model.safetensors"
    assert torch.equal(load_file(str(tiny_model_folder / prompt))["prompt_embeds"],
                       load_file(str(run / "model" / prompt))["prompt_embeds"])


def test_init_refuses_a_new_lora_rank(tiny_model_folder: Path, tmp_path: Path) -> None:
    """--init brings its adapters; a --lora-rank beside it was silently ignored."""
    from deblurcli.errors import DeblurcliError
    from deblurcli.train.diffusion import build_model

    config = DiffusionTrainConfig(output=str(tmp_path / "run"), init=str(tiny_model_folder),
                                  lora_rank=8)
    with pytest.raises(DeblurcliError, match="--lora-rank sets the rank of new adapters"):
        train_diffusion(config)
    assert not (tmp_path / "run").exists()
    # a run recorded before the check (its config holds the unused rank) still rebuilds, as
    # export and --resume do
    assert build_model(config).has_dual_adapters


def test_cli_reports_bad_dataset_in_one_line(pairs: Path, tmp_path: Path) -> None:
    from deblurcli.cli.app import app

    bad = tmp_path / "bad"
    shutil.copytree(pairs, bad)
    (bad / "sharp" / "p2.png").unlink()
    result = CliRunner().invoke(app, ["train-diffusion", "--data", str(bad), "--preset", "tiny",
                                      "--random-evae", "--cpu", "-o", str(tmp_path / "out")])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "p2.png" in lines[0] and "no sharp partner" in lines[0]
    assert not (tmp_path / "out").exists()
    result = CliRunner().invoke(app, ["train-vae", "--data", str(pairs), "--crop", "30"])
    assert result.exit_code == 2
    result = CliRunner().invoke(app, ["train-diffusion", "--frames", str(pairs),
                                      "--frames-per-blur", "4", "-o", str(tmp_path / "f")])
    assert result.exit_code == 2 and "must be odd, got 4" in result.output


def test_cli_train_vae_runs(pairs: Path, tmp_path: Path) -> None:
    from deblurcli.cli.app import app

    out = tmp_path / "cli"
    result = CliRunner().invoke(app, ["train-vae", "--blur", str(pairs / "blur"), "--sharp",
                                      str(pairs / "sharp"), "--preset", "tiny", "--cpu",
                                      "--perceptual", "none", "--crop", "32", "--batch-size", "1",
                                      "--max-steps", "1", "-o", str(out), "-q"])
    assert result.exit_code == 0, result.stderr
    assert f"model folder: {out / 'model'}" in result.stdout
    # --config file + flags, then --resume with a larger --max-steps
    toml = tmp_path / "run.toml"
    toml.write_text(f'blur = "{pairs / "blur"}"\nsharp = "{pairs / "sharp"}"\npreset = "tiny"\n'
                    'cpu = true\nperceptual = "none"\n[data]\ncrop = 32\nbatch-size = 1\n')
    out2 = tmp_path / "cli2"
    args = ["train-vae", "--config", str(toml), "-o", str(out2), "-q"]
    assert CliRunner().invoke(app, [*args, "--max-steps", "1"]).exit_code == 0
    result = CliRunner().invoke(app, [*args, "--max-steps", "2", "--resume", "latest"])
    assert result.exit_code == 0, result.stderr
    assert "step 2 (resumed at 1): 1 steps" in result.stdout
    assert '"crop": 32' in (out2 / "config.json").read_text()


def test_stages_from_a_diffusers_base_folder(pairs: Path, tmp_path: Path) -> None:
    """--base-model with a (tiny) Stable-Diffusion-style folder: unet/ + vae/."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from deblurcli.modelfolder import load_model_folder
    from deblurcli.models.osdd import tiny_osdd_config

    tiny = tiny_osdd_config()
    base = tmp_path / "sd"
    vae_keys = {k: v for k, v in tiny.evae.items() if k not in ("use_skips", "sharp_encoder")}
    torch.manual_seed(0)
    AutoencoderKL(**vae_keys).save_pretrained(base / "vae")
    UNet2DConditionModel(**tiny.unet).save_pretrained(base / "unet")
    fast = {k: v for k, v in FAST.items() if k != "preset"}
    train_vae(VaeTrainConfig(data=str(pairs), output=str(tmp_path / "e"), max_steps=1,
                             base_model=str(base), **fast))
    train_diffusion(DiffusionTrainConfig(data=str(pairs), output=str(tmp_path / "d"), max_steps=1,
                                         base_model=str(base), evae=str(tmp_path / "e" / "model"),
                                         lora_rank=2, grad_checkpointing=True, **fast))
    model = load_model_folder(tmp_path / "d" / "model")
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 3, 32, 32)


def test_latent_weight_trains_e1s_latent_head_toward_e2(pairs: Path, tmp_path: Path) -> None:
    from deblurcli.train.vae import build_evae

    cfg = {**FAST, "batch_size": 4, "augment": False}
    start = build_evae(VaeTrainConfig(preset="tiny"))
    runs = {}
    for weight in (0.0, 1.0):
        run = tmp_path / f"w{weight}"
        train_vae(VaeTrainConfig(data=str(pairs), output=str(run), max_steps=12, lr=3e-3,
                                 latent_weight=weight, **cfg))
        runs[weight] = run
    heads = {w: load_evae(r / "model").quant_conv.weight for w, r in runs.items()}
    assert torch.equal(heads[0.0], start.quant_conv.weight)  # without β, E1's head is unused
    assert not torch.equal(heads[1.0], start.quant_conv.weight)
    assert len(_losses(runs[1.0], "latent")) == 12
    assert max(_losses(runs[0.0], "latent")) == 0
    blur, sharp = _batch(pairs, "blur", 32), _batch(pairs, "sharp", 32)
    gaps = {}
    with torch.no_grad():
        for weight, run in runs.items():
            evae = load_evae(run / "model").eval()
            gaps[weight] = float(torch.mean((evae.encode(blur)[0] - evae.encode_sharp(sharp)) ** 2))
    assert gaps[1.0] < 0.75 * gaps[0.0], gaps  # E1's latents moved towards E2's


def test_blurry_decode_weight_trains_the_decoder_on_e1s_latent(pairs: Path,
                                                                tmp_path: Path) -> None:
    cfg = {**FAST, "batch_size": 4, "augment": False}
    runs = {}
    for weight in (0.0, 1.0):
        run = tmp_path / f"d{weight}"
        train_vae(VaeTrainConfig(data=str(pairs), output=str(run), max_steps=15, lr=3e-3,
                                 pixel_loss="l2", blurry_decode_weight=weight, **cfg))
        runs[weight] = run
    assert max(_losses(runs[0.0], "blurry_decode")) == 0
    logged = _losses(runs[1.0], "blurry_decode")
    assert len(logged) == 15 and min(logged) > 0
    blur, sharp = _batch(pairs, "blur", 48), _batch(pairs, "sharp", 48)
    errors = {}
    with torch.no_grad():
        for weight, run in runs.items():
            evae = load_evae(run / "model").eval()
            errors[weight] = float(torch.mean((evae.decode(*evae.encode(blur)) - sharp) ** 2))
    assert errors[1.0] < errors[0.0], errors  # the inference path (E1's latent) got better


def test_full_unet_from_a_preset_starts_at_eps_zero(tmp_path: Path) -> None:
    from deblurcli.train.diffusion import build_model

    model = build_model(DiffusionTrainConfig(preset="tiny", full=True))
    assert not model.unet.conv_out.weight.any() and not model.unet.conv_out.bias.any()
    with torch.no_grad():
        z = torch.randn(1, 4, 8, 8)
        torch.testing.assert_close(model.denoiser(z), z / model.denoiser.alpha_bar ** 0.5)


def test_cli_rejects_negative_loss_weights(tmp_path: Path) -> None:
    from deblurcli.cli.app import app

    result = CliRunner().invoke(app, ["train-vae", "--preset", "tiny", "--data", str(tmp_path),
                                      "--latent-weight", "-1", "-o", str(tmp_path / "o")])
    assert result.exit_code == 2 and "--latent-weight" in result.output
    result = CliRunner().invoke(app, ["train-vae", "--preset", "tiny", "--data", str(tmp_path),
                                      "--blurry-decode-weight", "-0.5", "-o", str(tmp_path / "o")])
    assert result.exit_code == 2 and "--blurry-decode-weight" in result.output


def test_pixel_loss_l2_is_the_mean_squared_error(pairs: Path, tmp_path: Path) -> None:
    run = tmp_path / "l2"
    train_vae(VaeTrainConfig(data=str(pairs), output=str(run), max_steps=2, pixel_loss="l2",
                             **FAST))
    l2, total = _losses(run, "l2"), _losses(run)
    assert len(l2) == 2 and l2 == total  # alpha * 0 perceptual, no latent term
    with pytest.raises(DeblurcliError, match="pixel loss"):
        train_vae(VaeTrainConfig(data=str(pairs), output=str(tmp_path / "x"), max_steps=1,
                                 pixel_loss="huber", **FAST))


def test_an_interrupt_inside_a_step_saves_no_torn_checkpoint(pairs: Path, tmp_path: Path,
                                                           monkeypatch) -> None:
    from safetensors.torch import load_file

    common = dict(data=str(pairs), max_steps=2, lr=1e-3, **{**FAST, "checkpoint_every": 2})
    train_vae(VaeTrainConfig(output=str(tmp_path / "ref"), **common))
    real_step = torch.optim.AdamW.step
    calls = []

    def step_then_interrupt(self, *args, **kwargs):  # a second Ctrl-C landing mid-step 3
        out = real_step(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", step_then_interrupt)
    result = train_vae(VaeTrainConfig(output=str(tmp_path / "run"),
                                      **{**common, "max_steps": 4}))
    assert result.interrupted and result.step == 2 and result.model_folder is None
    names = [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()]
    assert names == ["step-000000002"]
    ref = load_file(str(tmp_path / "ref" / "checkpoints" / "step-000000002" /
                        "weights-evae.safetensors"))
    got = load_file(str(tmp_path / "run" / "checkpoints" / "step-000000002" /
                        "weights-evae.safetensors"))
    assert ref.keys() == got.keys()
    for key in ref:  # not overwritten with the weights after the third update
        assert torch.equal(ref[key], got[key]), key


def test_diffusion_latent_weight_pulls_z_h_to_the_sharp_latent(one_pair: Path,
                                                                tmp_path: Path) -> None:
    from deblurcli.images import read_image
    from deblurcli.modelfolder import load_model_folder
    from deblurcli.train.data import to_tensor
    from deblurcli.train.diffusion import sharp_latent

    blur, sharp = (to_tensor(read_image(one_pair / s / "p1.png").pixels)[None]
                   for s in ("blur", "sharp"))
    cfg = {**FAST, "batch_size": 1, "crop": 48, "augment": False}
    gaps = {}
    for weight in (0.0, 1.0):
        run = tmp_path / f"w{weight}"
        train_diffusion(DiffusionTrainConfig(data=str(one_pair), output=str(run), max_steps=15,
                                             lr=3e-3, full=True, lambda2=0.0,
                                             latent_weight=weight, **cfg))
        assert len(_losses(run, "latent")) == 15
        model = load_model_folder(run / "model", gamma=1.0)
        assert model.evae.encoder_sharp is not None  # the frozen E2 that gave the target
        with torch.no_grad():
            z_h = model.latent_step(blur)[1]
            gaps[weight] = float(torch.mean((z_h - sharp_latent(model.evae, sharp)) ** 2))
    assert gaps[1.0] < 0.75 * gaps[0.0], gaps


def test_train_encoder_trains_e1_and_keeps_decoder_and_e2(evae_run: Path, pairs: Path,
                                                           tmp_path: Path) -> None:
    from deblurcli.modelfolder import load_model_folder

    start = load_evae(str(evae_run / "model")).state_dict()
    run = tmp_path / "e1"
    train_diffusion(DiffusionTrainConfig(data=str(pairs), output=str(run), max_steps=2, lr=1e-2,
                                         full=True, train_encoder=True, lambda2=0.0,
                                         latent_weight=1.0, evae=str(evae_run / "model"),
                                         **FAST))
    end = load_model_folder(run / "model", gamma=1.0).evae.state_dict()
    changed = {k for k in start if not torch.equal(start[k], end[k])}
    assert any(k.startswith("encoder.") for k in changed)
    assert any(k.startswith("skip_blocks.") for k in changed)
    assert not {k for k in changed
                if k.startswith(("decoder.", "post_quant_conv", "skip_fusions.",
                                 "encoder_sharp.", "quant_conv_sharp"))}
    with pytest.raises(DeblurcliError, match="--train-encoder needs --full"):
        train_diffusion(DiffusionTrainConfig(data=str(pairs), output=str(tmp_path / "lora"),
                                             max_steps=1, train_encoder=True,
                                             evae=str(evae_run / "model"), **FAST))


def test_latent_gan_matches_the_evaes_latent_channels(pairs: Path, tmp_path: Path) -> None:
    """The discriminator takes as many channels as the latent (16 in the compact preset)."""
    import dataclasses

    from deblurcli.modelfolder import save_model_folder
    from deblurcli.models.osdd import build_osdd, tiny_osdd_config

    base = tiny_osdd_config()
    config = dataclasses.replace(base, evae={**base.evae, "latent_channels": 8},
                                 unet={**base.unet, "in_channels": 8, "out_channels": 8})
    folder = tmp_path / "wide-latent"
    save_model_folder(folder, build_osdd(config, seed=0))
    run = tmp_path / "gan"
    train_diffusion(DiffusionTrainConfig(data=str(pairs), output=str(run), max_steps=2,
                                         init=str(folder), lambda2=1.0, gan_start=0, **FAST))
    assert all(v > 0 for v in _losses(run, "gan_d"))


def test_a_run_with_relative_paths_resumes_from_another_directory(pairs: Path, tmp_path: Path,
                                                                   monkeypatch) -> None:
    import json

    from deblurcli.train.config import resolve_config, with_absolute_paths

    monkeypatch.chdir(pairs.parent)
    run = pairs.parent / "relative-run"
    train_vae(VaeTrainConfig(blur=f"{pairs.name}/blur", sharp=f"{pairs.name}/sharp",
                             output=run.name, max_steps=1, **{**FAST, "checkpoint_every": 1}))
    saved = json.loads((run / "config.json").read_text())
    assert saved["blur"] == str(pairs / "blur") and saved["sharp"] == str(pairs / "sharp")
    assert saved["output"] == str(run)
    hub = with_absolute_paths({"base_model": "org/model", "init": None})
    assert hub == {"base_model": "org/model", "init": None}  # not a local path: kept
    monkeypatch.chdir(tmp_path)
    config = resolve_config(VaeTrainConfig, None, {"resume": "latest", "output": str(run),
                                                   "max_steps": 2})
    assert train_vae(config).step == 2


@pytest.mark.parametrize("mixed,fast_bf16,cpu,expected", [
    ("bf16", True, True, "bf16"),    # a CPU with AMX / AVX512-BF16: autocast in bf16
    ("bf16", False, True, "no"),     # elsewhere bf16 on the CPU is slow: float32
    ("fp16", True, True, "no"),      # fp16 never runs on the CPU
    ("no", True, True, "no"),
])
def test_effective_mixed_precision_on_the_cpu(monkeypatch, mixed, fast_bf16, cpu, expected):
    from deblurcli.train import engine

    monkeypatch.setattr("deblurcli.device.cpu_has_fast_bf16", lambda: fast_bf16)
    config = DiffusionTrainConfig(mixed_precision=mixed, cpu=cpu)
    assert engine.effective_mixed_precision(config) == expected


def test_a_second_run_in_one_process_may_change_mixed_precision(monkeypatch) -> None:
    """accelerate's process-wide state fixes mixed precision at the first Accelerator; a second
    training run in the same process (a notebook, fp32 eVAE then bf16 UNet) must still start."""
    from deblurcli.train import engine

    monkeypatch.setattr("deblurcli.device.cpu_has_fast_bf16", lambda: True)
    first = engine.make_accelerator(DiffusionTrainConfig(cpu=True, mixed_precision="no"))
    assert first.mixed_precision == "no"
    second = engine.make_accelerator(DiffusionTrainConfig(cpu=True, mixed_precision="bf16"))
    assert second.mixed_precision == "bf16"
    third = engine.make_accelerator(DiffusionTrainConfig(cpu=True, mixed_precision="no"))
    assert third.mixed_precision == "no"


def test_processes_launched_without_a_gpu_train_together_on_the_cpu(monkeypatch) -> None:
    """`accelerate launch --num_processes 2 -m deblurcli train-vae ...` on a machine without a
    GPU (and without --cpu): accelerate made each process a run of its own, two runs training
    on the whole stream and writing the same folder. (Checked for real with two launched
    processes; here accelerate's answer is stood in for.)"""
    import accelerate
    from accelerate.state import AcceleratorState

    from deblurcli.train import engine

    made = []

    class Accelerator:
        def __init__(self, *, cpu, **kwargs) -> None:
            made.append(cpu)
            self.cpu = cpu
            self.num_processes = 2 if cpu and os.environ.get("WORLD_SIZE") == "2" else 1
            self.device = torch.device("cpu")

    resets = []
    monkeypatch.setattr(accelerate, "Accelerator", Accelerator)
    monkeypatch.setattr(engine, "_forget_other_mixed_precision", lambda mixed: None)
    monkeypatch.setattr(AcceleratorState, "_reset_state",
                        lambda reset_partial_state=False: resets.append(reset_partial_state))
    for name, value in (("WORLD_SIZE", "2"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
        monkeypatch.setenv(name, value)  # as torchrun sets them
    assert engine.make_accelerator(DiffusionTrainConfig()).num_processes == 2
    assert made == [False, True] and resets == [True]
    made.clear()
    assert engine.make_accelerator(DiffusionTrainConfig(cpu=True)).num_processes == 2
    # started directly, a WORLD_SIZE left over in the shell: one process, as before
    monkeypatch.delenv("LOCAL_RANK")
    monkeypatch.delenv("MASTER_ADDR")
    assert engine.make_accelerator(DiffusionTrainConfig()).num_processes == 1
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert engine.make_accelerator(DiffusionTrainConfig()).num_processes == 1
    assert made == [True, False, False] and resets == [True]


def test_cpu_bf16_training_autocasts_the_forward_pass(pairs: Path, tmp_path: Path,
                                                      monkeypatch) -> None:
    """With bf16 granted on the CPU, the stage-2 forward runs in bfloat16 (UNet convolutions see
    bf16 inputs) while the weights and the saved model stay float32."""
    from deblurcli.modelfolder import load_model_folder
    from deblurcli.train import diffusion

    monkeypatch.setattr("deblurcli.device.cpu_has_fast_bf16", lambda: True)
    seen: list[torch.dtype] = []
    real_forward = diffusion.GeneratorStep.forward

    def spy(self, blur):
        pred, z_hat = real_forward(self, blur)
        seen.append(pred.dtype)
        return pred, z_hat

    monkeypatch.setattr(diffusion.GeneratorStep, "forward", spy)
    run = tmp_path / "bf16"
    result = train_diffusion(DiffusionTrainConfig(data=str(pairs), output=str(run), max_steps=2,
                                                  full=True, lambda2=0.0, val_count=1,
                                                  mixed_precision="bf16", **FAST))
    assert result.step == 2 and seen and all(d == torch.bfloat16 for d in seen)
    assert all(np.isfinite(_losses(run)))
    model = load_model_folder(run / "model")
    assert model.unet_dtype == torch.float32


def test_sigterm_to_the_process_group_saves_although_the_data_workers_died(
        pairs: Path, tmp_path: Path, monkeypatch) -> None:
    """Slurm and systemd send SIGTERM to every process of the job: the DataLoader workers die
    with it and the next batch raises; the run must still stop with a checkpoint."""
    from deblurcli.train import engine

    real_stream = engine.batch_stream

    def dying_stream(*args, **kwargs):
        batches = real_stream(*args, **kwargs)
        yield next(batches)
        yield next(batches)
        os.kill(os.getpid(), signal.SIGTERM)  # the job's signal reaches this process...
        raise RuntimeError("DataLoader worker (pid 1) is killed by signal: Terminated.")  # ...

    monkeypatch.setattr(engine, "batch_stream", dying_stream)
    previous = signal.signal(signal.SIGTERM, lambda *a: None)  # a CLI-like handler of its own
    try:
        result = train_vae(VaeTrainConfig(data=str(pairs), output=str(tmp_path / "r"),
                                          max_steps=50, **FAST))
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert result.interrupted and result.terminated and result.step == 2
    assert result.checkpoint is not None and result.checkpoint.name == "step-000000002"


def test_a_library_caller_without_a_handler_still_ends_on_sigterm() -> None:
    """Training keeps SIGTERM to stop cleanly, then hands it on: a sweep of runs in a plain
    Python process ends, as it would have without deblurcli."""
    code = ("import os, signal\n"
            "from deblurcli.train.engine import _InterruptFlag\n"
            "with _InterruptFlag() as flag:\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "print('saved', flush=True)\n"
            "flag.pass_on_sigterm()\n"
            "print('not reached')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == -signal.SIGTERM and proc.stdout == "saved\n", proc.stderr


def test_sigterm_stops_training_like_a_first_ctrl_c() -> None:
    """A batch scheduler's pre-emption (SIGTERM) ends the run after the step in progress, with a
    checkpoint, as the first Ctrl-C does; the handlers are put back afterwards."""
    from deblurcli.train.engine import _InterruptFlag

    before = signal.getsignal(signal.SIGTERM)
    with _InterruptFlag() as flag:
        os.kill(os.getpid(), signal.SIGTERM)
        assert flag.hit
        with pytest.raises(KeyboardInterrupt):  # a second signal stops at once
            os.kill(os.getpid(), signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) is before


def test_evae_is_found_in_a_run_folder_and_must_fit_the_preset(tiny_model_folder: Path,
                                                                tmp_path: Path) -> None:
    """--evae RUN (train-vae's -o) was refused although it holds RUN/model; a tiny eVAE under
    --preset compact failed in the first step with a raw channel error, after the run's folder
    was made."""
    import shutil

    from deblurcli.errors import DeblurcliError
    from deblurcli.train.diffusion import build_model
    from deblurcli.train.vae import load_evae

    run = tmp_path / "vae-run"
    shutil.copytree(tiny_model_folder / "evae", run / "model")
    (run / "config.json").write_text("{}")  # the run's training settings
    assert load_evae(run).config.latent_channels == load_evae(run / "model").config.latent_channels
    trained = tmp_path / "diffusion-run"  # a train-diffusion run: RUN/model/evae
    shutil.copytree(tiny_model_folder, trained / "model")
    assert load_evae(trained) is not None
    with pytest.raises(DeblurcliError, match="makes 4-channel latents but --preset compact "
                                             "takes 16"):
        build_model(DiffusionTrainConfig(output=str(tmp_path / "o"), preset="compact",
                                         full=True, evae=str(run)))
    assert not (tmp_path / "o").exists()


def test_val_count_that_leaves_nothing_to_train_on_is_refused() -> None:
    from deblurcli.errors import DatasetError
    from deblurcli.train.data import split_validation

    items = list(range(36))
    train, val = split_validation(items, 6, seed=0)
    assert len(train) == 30 and len(val) == 6 and sorted(train + val) == items
    with pytest.raises(DatasetError, match="--val-count 100 holds out every one of the 36"):
        split_validation(items, 100, seed=0)


def test_an_adapter_alone_is_not_trained_on_a_preset(pairs: Path, tmp_path: Path) -> None:
    """A preset's UNet starts with its output conv at zero: no gradient reached an adapter
    trained on it, and the run finished with the adapter still at zero, silently."""
    from deblurcli.errors import DeblurcliError

    with pytest.raises(DeblurcliError, match="--preset tiny builds an untrained UNet, and an "
                                             "adapter learns nothing on it: train the whole"):
        train_diffusion(DiffusionTrainConfig(data=str(pairs), output=str(tmp_path / "r"),
                                             max_steps=1, adapter="real", **FAST))
    assert not (tmp_path / "r").exists()


def test_a_new_run_into_a_finished_one_is_refused(pairs: Path, tmp_path: Path) -> None:
    """Without checkpoints left, a second run replaced the first one's model and log and mixed
    its validation images with the new ones, silently."""
    from deblurcli.errors import DeblurcliError

    run = tmp_path / "run"
    config = VaeTrainConfig(data=str(pairs), output=str(run), max_steps=1, **FAST)
    train_vae(config)
    shutil.rmtree(run / "checkpoints", ignore_errors=True)
    before = (run / "train_log.csv").read_bytes()
    with pytest.raises(DeblurcliError, match="already holds a run \\(model, train_log.csv\\)"):
        train_vae(config)
    assert (run / "train_log.csv").read_bytes() == before


def test_validation_scores_in_float32_under_bf16_autocast(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from skimage import data

    from deblurcli.evaluation.metrics import ssim
    from deblurcli.train.engine import _validate

    sharp = torch.from_numpy(data.astronaut()[:64, :64].astype(np.float32) / 255).permute(2, 0, 1)
    blurred = (sharp + torch.roll(sharp, 3, 2)) / 2
    val = [{"blur": blurred * 2 - 1, "sharp": sharp * 2 - 1}]
    stage = SimpleNamespace(trained=[], predict=lambda blur, sharp: blur)  # the input as output
    scores = _validate(stage, val, tmp_path, 1, torch.device("cpu"),
                       lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    assert scores["val_ssim"] == pytest.approx(ssim(blurred[None], sharp[None]), abs=1e-6)


def test_a_time_budget_retargets_every_process_to_the_end_they_agreed_on(
        pairs: Path, tmp_path: Path, monkeypatch) -> None:
    """Processes plan by their own clocks; the cosine each one follows must end at the step they
    all stop at, or their replicas drift apart. Here a second process (stood in for by the
    reduction) wants to stop after step 5 while this one has time for far more."""
    from deblurcli.train import engine

    real_make = engine.make_accelerator

    class TwoProcesses:
        def __init__(self, accelerator) -> None:
            self._accelerator = accelerator

        def __getattr__(self, name):
            return getattr(self._accelerator, name)

        num_processes = 2

        def reduce(self, tensor, reduction):
            if reduction == "sum":  # the interrupt flags: the other process has none
                return tensor
            assert reduction == "max"  # of minus the wanted last steps: the other's is 5
            return torch.maximum(tensor, torch.tensor(-5.0))

    monkeypatch.setattr(engine, "make_accelerator",
                        lambda *a, **k: TwoProcesses(real_make(*a, **k)))
    run = tmp_path / "budget"
    result = train_vae(VaeTrainConfig(data=str(pairs), output=str(run), max_steps=1000, lr=1e-3,
                                      lr_schedule="cosine", time_budget=3600.0, **FAST))
    assert result.step == 5
    lrs = _losses(run, "lr")  # agreed after the first step: from the third on, a cosine of 5
    assert lrs[2:] == pytest.approx([1e-3 * 0.5 * (1 + math.cos(math.pi * s / 5))
                                     for s in (2, 3, 4)])


def test_a_resumed_time_boxed_run_plans_from_the_speed_it_measured(pairs: Path,
                                                                   tmp_path: Path) -> None:
    """Its checkpoint records the seconds a step took: a resumed run plans its end from them
    at once, instead of following the --max-steps cosine (a jump back up the rate) until its
    own count, a twentieth of the budget later. Here the recorded speed gives 5 more steps;
    reaching them long before its time, the run counts its own speed there and goes on (to
    --max-steps 12), its cosine retargeted again."""
    from deblurcli.train.checkpoint import resolve_resume
    from deblurcli.train.config import resolve_config

    run = tmp_path / "boxed"
    train_vae(VaeTrainConfig(data=str(pairs), output=str(run), max_steps=3, lr=1e-3,
                             lr_schedule="cosine", **{**FAST, "checkpoint_every": 1}))
    state_file = resolve_resume("latest", run) / "state.json"
    state = json.loads(state_file.read_text())
    state["extra"] = {"seconds_per_step": 190.0}  # 0.95 x 1000 s / 190 s = 5 steps
    state_file.write_text(json.dumps(state))
    result = train_vae(resolve_config(VaeTrainConfig, None, {
        "resume": "latest", "output": str(run), "max_steps": 12, "time_budget": 1000.0}))
    assert result.step == 12 and not result.out_of_time
    lrs = _losses(run, "lr")  # the cosine ending at the guessed step 8, then at 12
    assert lrs[3:8] == pytest.approx([1e-3 * 0.5 * (1 + math.cos(math.pi * s / 8))
                                      for s in (3, 4, 5, 6, 7)])
    assert lrs[8:12] == pytest.approx([1e-3 * 0.5 * (1 + math.cos(math.pi * s / 12))
                                       for s in (8, 9, 10, 11)])
    saved = json.loads((resolve_resume("latest", run) / "state.json").read_text())
    assert 0 < saved["extra"]["seconds_per_step"] < 190.0  # its own count, saved for the next


def test_optimiser_settings_given_on_resume_win_over_the_checkpoints(pairs: Path,
                                                                     tmp_path: Path) -> None:
    from deblurcli.train.checkpoint import load_checkpoint, resolve_resume
    from deblurcli.train.config import resolve_config

    run = tmp_path / "wd"
    train_vae(VaeTrainConfig(data=str(pairs), output=str(run), max_steps=1, lr=1e-3,
                             weight_decay=0.0, **{**FAST, "checkpoint_every": 1}))
    train_vae(resolve_config(VaeTrainConfig, None, {"resume": "latest", "output": str(run),
                                                    "max_steps": 2, "weight_decay": 0.1}))
    state = load_checkpoint(resolve_resume("latest", run))
    assert state.step == 2
    assert state.optimizers["evae"]["param_groups"][0]["weight_decay"] == 0.1


def test_the_discriminators_cosine_runs_from_gan_start_to_the_end(pairs: Path,
                                                                  tiny_model_folder: Path,
                                                                  tmp_path: Path) -> None:
    from deblurcli.train.checkpoint import load_checkpoint, resolve_resume

    run = tmp_path / "gan"
    train_diffusion(DiffusionTrainConfig(
        data=str(pairs), output=str(run), max_steps=4, lr=1e-3, lr_schedule="cosine",
        init=str(tiny_model_folder), adapter="real", lambda2=0.1, gan_start=2,
        **{k: v for k, v in FAST.items() if k != "preset"}))
    state = load_checkpoint(resolve_resume("latest", run))
    assert state.step == 4
    for name in ("unet", "disc"):  # both rates reach the cosine's end with the run
        assert state.optimizers[name]["param_groups"][0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_a_resumed_runs_tensorboard_drops_the_abandoned_steps(tmp_path: Path,
                                                              monkeypatch) -> None:
    pytest.importorskip("tensorboard")
    import torch.utils.tensorboard as tb

    from deblurcli.train.engine import RunLog

    opened: list[dict] = []

    class Writer:
        def __init__(self, logdir, **kwargs) -> None:
            opened.append(kwargs)

    monkeypatch.setattr(tb, "SummaryWriter", Writer)
    RunLog(tmp_path, 0, enabled=True)
    RunLog(tmp_path, 40, enabled=True)  # resumed at step 40: 41 on are written again
    assert [kw.get("purge_step") for kw in opened] == [None, 41]


def test_a_runs_config_json_starts_a_new_run_with_its_settings(pairs: Path, evae_run: Path,
                                                               tmp_path: Path) -> None:
    from deblurcli.train.config import DiffusionTrainConfig, resolve_config

    saved = evae_run / "config.json"
    config = resolve_config(VaeTrainConfig, str(saved), {"output": str(tmp_path / "again")})
    assert config.max_steps == 2 and config.resume is None
    assert config.output == str(tmp_path / "again")
    with pytest.raises(DeblurcliError, match="holds the settings of a train-vae run, not a "
                                             "train-diffusion one"):
        resolve_config(DiffusionTrainConfig, str(saved), {"output": str(tmp_path / "d")})
    # a train-diffusion run records its frozen sources' digests, a table of its own
    diffusion = tmp_path / "diffusion"
    train_diffusion(DiffusionTrainConfig(data=str(pairs), output=str(diffusion), max_steps=1,
                                         evae=str(evae_run / "model"), full=True, lambda2=0.0,
                                         **FAST))
    assert "frozen_digests" in (diffusion / "config.json").read_text()
    again = resolve_config(DiffusionTrainConfig, str(diffusion / "config.json"),
                           {"output": str(tmp_path / "again2")})
    assert again.evae == str((evae_run / "model").resolve()) and again.full


def test_resuming_an_earlier_checkpoint_sets_the_later_states_aside(pairs: Path,
                                                                    tmp_path: Path) -> None:
    """A run resumed at step 2 after it had gone on to 4: the step-4 checkpoint and model were
    kept by pruning (the highest steps) and taken by --resume latest and export."""
    from deblurcli.cli.app import app
    from deblurcli.train.checkpoint import model_step, resolve_resume

    run = tmp_path / "run"
    train_vae(VaeTrainConfig(data=str(pairs), output=str(run), max_steps=4, lr=1e-3,
                             val_count=1, **{**FAST, "checkpoint_every": 2, "validate_every": 2}))
    result = CliRunner().invoke(app, [
        "train-vae", "--resume", str(run / "checkpoints" / "step-000000002"), "-o", str(run),
        "--max-steps", "3", "-q"])
    assert result.exit_code == 0, result.stderr
    kept = run / "superseded" / "resumed-at-000000002"
    assert " ".join(result.stderr.split()).startswith(
        f"resuming from {run / 'checkpoints' / 'step-000000002'} warning: resuming at step 2 "
        f"replaces what {run} went on to after it: 1 checkpoint(s), model/, 1 validation "
        f"sheet(s) of later steps move to {run / 'superseded'}")
    assert (kept / "checkpoints" / "step-000000004" / "state.json").is_file()
    assert model_step(kept / "model") == 4 and (kept / "validation" / "step-000000004.png").is_file()
    assert resolve_resume("latest", run).name == "step-000000003"
    assert model_step(run / "model") == 3


def test_a_nan_at_validation_is_logged_not_fatal(tmp_path: Path) -> None:
    """The sheet of a NaN output stopped the run (write_image refuses NaN), losing every step
    since the last checkpoint."""
    from types import SimpleNamespace

    from deblurcli.train.engine import _validate

    blur = torch.zeros(3, 16, 16)
    broken = blur.clone()[None]
    broken[0, 0, 3, 4] = float("nan")
    stage = SimpleNamespace(trained=[], predict=lambda b, s: broken)
    scores = _validate(stage, [{"blur": blur, "sharp": blur}], tmp_path, 7, torch.device("cpu"),
                       lambda: torch.autocast("cpu", enabled=False))
    assert math.isnan(scores["val_psnr"])
    assert (tmp_path / "validation" / "step-000000007.png").is_file()


def test_resuming_a_checkpoint_continues_the_run_that_holds_it(pairs: Path,
                                                               tmp_path: Path) -> None:
    """Without -o, a copied run's checkpoint resumed into the folder its config.json named:
    the original run's later states were set aside and its model replaced."""
    import shutil

    from deblurcli.train.checkpoint import model_step
    from deblurcli.train.config import resolve_config

    original = tmp_path / "original"
    train_vae(VaeTrainConfig(data=str(pairs), output=str(original), max_steps=2, lr=1e-3,
                             **{**FAST, "checkpoint_every": 1}))
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    config = resolve_config(VaeTrainConfig, None, {
        "resume": str(copy / "checkpoints" / "step-000000001"), "max_steps": 3})
    assert Path(config.output) == copy
    train_vae(config)
    assert model_step(original / "model") == 2 and not (original / "superseded").exists()
    assert model_step(copy / "model") == 3
    with pytest.raises(DeblurcliError, match="not inside a run folder; give -o RUN"):
        resolve_config(VaeTrainConfig, None, {
            "resume": str(copy / "superseded" / "resumed-at-000000001" / "checkpoints" /
                          "step-000000002")})


def test_sigterm_to_a_run_with_data_workers_stops_it_with_a_checkpoint(pairs: Path,
                                                                       tmp_path: Path) -> None:
    """`timeout`/Slurm signal the whole process group: the DataLoader workers died of it and
    torch raised that inside the step; the run ended with exit 1 and no checkpoint."""
    import time

    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "deblurcli", "train-vae", "--data", str(pairs), "--preset", "tiny",
         "--cpu", "--crop", "32", "--batch-size", "2", "--perceptual", "none", "--workers", "1",
         "--max-steps", "100000", "--log-every", "1", "-o", str(run), "-q"],
        start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        log = run / "train_log.csv"
        if log.is_file() and len(log.read_text().splitlines()) > 3:
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert list((run / "checkpoints").glob("step-*")), err


def test_a_second_signal_says_no_checkpoint_was_written(pairs: Path, tmp_path: Path,
                                                        monkeypatch) -> None:
    """It said 'checkpoint saved to None' (or named the last periodic one as if just saved)."""
    from deblurcli.cli.app import app

    real_step, calls = torch.optim.AdamW.step, []

    def interrupt_at(n):
        def step(self, *args, **kwargs):
            calls.append(1)
            if len(calls) == n:
                raise KeyboardInterrupt  # a second Ctrl-C landing mid-step
            return real_step(self, *args, **kwargs)
        return step

    args = ["train-vae", "--data", str(pairs), "--preset", "tiny", "--cpu", "--crop", "32",
            "--batch-size", "2", "--perceptual", "none", "--max-steps", "5",
            "--checkpoint-every", "1", "-q"]
    monkeypatch.setattr(torch.optim.AdamW, "step", interrupt_at(1))
    result = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "a")])
    assert result.exit_code == 130
    assert "interrupted at once after step 0 (a second signal), before any checkpoint: nothing " \
        "to resume" in " ".join(result.stderr.split())
    calls.clear()
    monkeypatch.setattr(torch.optim.AdamW, "step", interrupt_at(3))
    result = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "b")])
    assert result.exit_code == 130
    last = tmp_path / "b" / "checkpoints" / "step-000000002"
    assert f"interrupted at once after step 2 (a second signal), without a checkpoint; the last " \
        f"one is {last}; continue with: --resume latest -o {tmp_path / 'b'}" in \
        " ".join(result.stderr.split())


def _damaged_copy(pairs: Path, folder: Path, rel: str) -> tuple[Path, bytes]:
    """A copy of ``pairs`` in ``folder`` with the file ``rel`` cut short past its header (read
    at a step, not by the check before the first); returns it and its intact bytes."""
    import shutil

    shutil.copytree(pairs, folder)
    damaged = folder / rel
    intact = damaged.read_bytes()
    damaged.write_bytes(intact[:300])  # the header still reads
    return damaged, intact


def test_an_unreadable_training_image_keeps_the_steps_done(pairs: Path, tmp_path: Path) -> None:
    """A file damaged past its header (checked before the first step) stopped the run with
    every step since the last checkpoint lost, and, from a data worker, with torch's whole
    worker traceback as the error line."""
    from deblurcli.cli.app import app

    data = tmp_path / "pairs"
    damaged, intact = _damaged_copy(pairs, data, "blur/p1.png")
    run = tmp_path / "run"
    args = ["train-vae", "--data", str(data), "--preset", "tiny", "--cpu", "--crop", "32",
            "--batch-size", "1", "--perceptual", "none", "--workers", "1",
            "--checkpoint-every", "1000", "-o", str(run), "-q"]
    result = CliRunner().invoke(app, [*args, "--max-steps", "200"])
    assert result.exit_code == 1
    line = result.stderr.strip()
    assert "\n" not in line and "Traceback" not in line, line
    assert line.startswith(f"error: cannot read {damaged}: corrupt or unsupported PNG")
    assert line.endswith(f"step(s) are saved: fix it, then continue with --resume latest -o {run}")
    done = int(line.split("the run's ")[1].split(" step(s)")[0])
    damaged.write_bytes(intact)
    resumed = CliRunner().invoke(app, ["train-vae", "--resume", "latest", "-o", str(run),
                                       "--max-steps", str(done + 2), "-q"])
    assert resumed.exit_code == 0, resumed.output
    assert json.loads((run / "model" / "training.json").read_text())["steps"] == done + 2


def test_an_unreadable_validation_image_keeps_the_steps_done(pairs: Path, tmp_path: Path) -> None:
    """Validation runs before the checkpoint of its step: a damaged --val-data image lost
    every step since the last checkpoint, the final model too."""
    from deblurcli.cli.app import app

    val = tmp_path / "val"
    damaged, intact = _damaged_copy(pairs, val, "sharp/p1.png")
    run = tmp_path / "run"
    result = CliRunner().invoke(app, [
        "train-vae", "--data", str(pairs), "--val-data", str(val), "--preset", "tiny", "--cpu",
        "--crop", "32", "--batch-size", "1", "--perceptual", "none", "--workers", "0",
        "--validate-every", "2", "--checkpoint-every", "1000", "--max-steps", "2", "-o",
        str(run), "-q"])
    assert result.exit_code == 1
    line = " ".join(result.stderr.split())
    assert f"cannot read {damaged}" in line and "2 step(s) are saved" in line, line
    assert (run / "checkpoints").is_dir() and any((run / "checkpoints").iterdir())
    # resumed at that last step, the model is validated before it is written (it was written
    # unvalidated, the image mended or not)
    resume = ["train-vae", "--resume", "latest", "-o", str(run), "--max-steps", "2", "-q"]
    again = CliRunner().invoke(app, resume)
    assert again.exit_code == 1 and f"cannot read {damaged}" in again.stderr
    assert not (run / "model").exists()
    damaged.write_bytes(intact)
    again = CliRunner().invoke(app, resume)
    assert again.exit_code == 0, again.output
    assert (run / "model").is_dir()
    rows = (run / "train_log.csv").read_text()
    again = CliRunner().invoke(app, resume)  # finished: not validated (nor logged) once more
    assert again.exit_code == 0 and (run / "train_log.csv").read_text() == rows


def _as_main_of_two(monkeypatch, other) -> None:
    """Runs train as the main process of two, the other stood in for by the reductions: to a
    "sum" it adds ``other(n)`` (``n``: the reduction's number, from 0)."""
    from deblurcli.train import engine

    real_make, calls = engine.make_accelerator, []

    class MainOfTwo:
        num_processes = 2

        def __init__(self, accelerator) -> None:
            self._accelerator = accelerator

        def __getattr__(self, name):
            return getattr(self._accelerator, name)

        def reduce(self, tensor, reduction):
            calls.append(reduction)
            return tensor + other(len(calls) - 1) if reduction == "sum" else tensor

    monkeypatch.setattr(engine, "make_accelerator",
                        lambda *a, **k: MainOfTwo(real_make(*a, **k)))


def test_with_many_processes_a_damaged_validation_image_keeps_the_steps_done(
        pairs: Path, tmp_path: Path, monkeypatch) -> None:
    """Under accelerate launch the main process raised at once, without a checkpoint, and the
    others waited for it at a barrier until the launcher tore them down."""
    from deblurcli.errors import DeblurcliError

    _as_main_of_two(monkeypatch, lambda n: 0.0)
    val = tmp_path / "val"
    damaged, _ = _damaged_copy(pairs, val, "sharp/p1.png")
    run = tmp_path / "run"
    config = VaeTrainConfig(data=str(pairs), val_data=str(val), output=str(run), max_steps=2,
                            **{**FAST, "validate_every": 2})
    with pytest.raises(DeblurcliError, match=f"cannot read {damaged}.*the run's 2 step"):
        train_vae(config)
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-000000002"]


def test_with_many_processes_a_batch_another_cannot_load_stops_all_with_the_steps_kept(
        pairs: Path, tmp_path: Path, monkeypatch) -> None:
    """A process whose batch failed raised alone; the others went on into the step and waited
    for it in the gradients' all-reduce. Here the other process fails at the third step
    (each step reduces three flags: the batches loaded, a finite loss, a signal)."""
    from deblurcli.errors import DeblurcliError

    _as_main_of_two(monkeypatch, lambda n: float(n == 6))
    run = tmp_path / "run"
    config = VaeTrainConfig(data=str(pairs), output=str(run), max_steps=5, **FAST)
    with pytest.raises(DeblurcliError, match="another process could not load its next batch "
                                             r"\(its error line says why\); the run's 2 step"):
        train_vae(config)
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-000000002"]


def test_a_diverged_run_stops_before_saving_and_says_where_to_go_on(pairs: Path,
                                                                    tmp_path: Path) -> None:
    """--lr 1e30: loss=nan from the second step on, yet the run wrote its checkpoints and a
    model of NaN (pruning the good checkpoints) and ended with exit 0."""
    from deblurcli.errors import DeblurcliError

    run = tmp_path / "run"
    config = VaeTrainConfig(data=str(pairs), output=str(run), max_steps=6, lr=1e30,
                            **{**FAST, "checkpoint_every": 1})
    with pytest.raises(DeblurcliError, match=r"the run diverged at step \d+ \(loss=(nan|inf)\); "
                                             r"nothing of this step is saved; ") as stopped:
        train_vae(config)
    step = int(str(stopped.value).split("step ")[1].split(" ")[0])
    kept = sorted(int(p.name.split("-")[1]) for p in (run / "checkpoints").iterdir())
    assert kept and kept[-1] == step - 1 and not (run / "model").exists()
    # the newest checkpoint holds the weights that diverged: never the advice (it looped)
    message = str(stopped.value)
    if len(kept) > 1:
        assert f"--resume {run / 'checkpoints' / f'step-{kept[0]:09d}'} --lr" in message
    assert f"step-{kept[-1]:09d}" not in message and "in a new -o folder" in message


def test_a_small_crop_trains_when_the_perceptual_term_is_off(pairs: Path, tmp_path: Path) -> None:
    """The crop-size check for ST-LPIPS refused --crop 16 --alpha 0, which does not use it."""
    config = VaeTrainConfig(data=str(pairs), output=str(tmp_path / "r"), max_steps=1,
                            alpha=0.0, **{**FAST, "crop": 16, "perceptual": "stlpips"})
    assert train_vae(config).model_folder is not None
