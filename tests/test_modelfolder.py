"""Model folder: a diffusers pipeline folder; round trips, fp16 storage, fused folders, atomic
replacement, hub ids from the cache, and clear WeightsErrors."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest
import torch

from deblurcli.errors import WeightsError
from deblurcli.modelfolder import (
    CHECKSUM_FILE,
    INDEX_FILE,
    NO_DEFAULT_MODEL,
    RECORD_KEY,
    default_weights_dir,
    export_model_folder,
    fuse_model_folder,
    load_model_folder,
    read_model_index,
    save_model_folder,
)


def image(size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def record(folder: Path) -> dict:
    return read_model_index(folder)[RECORD_KEY]


def rewrite_checksums(folder: Path) -> None:
    lines = []
    for line in (folder / CHECKSUM_FILE).read_text().splitlines():
        name = line.split("  ", 1)[1]
        lines.append(f"{hashlib.sha256((folder / name).read_bytes()).hexdigest()}  {name}\n")
    (folder / CHECKSUM_FILE).write_text("".join(lines))


@torch.no_grad()
def test_round_trip_unfused_and_fused(tiny_osdd, tiny_model_folder):
    model = tiny_osdd(seed=0)
    x = image()
    model.set_gamma(0.3)
    expected = model(x)
    unfused = load_model_folder(tiny_model_folder, gamma=0.3, fuse=False)
    assert not unfused.training and unfused.fused_gamma is None
    torch.testing.assert_close(unfused(x), expected, atol=1e-5, rtol=0)
    unfused.set_gamma(0.8)  # gamma stays adjustable when unfused
    model.set_gamma(0.8)
    torch.testing.assert_close(unfused(x), model(x), atol=1e-5, rtol=0)
    fused = load_model_folder(tiny_model_folder, gamma=0.3)
    assert fused.fused_gamma == 0.3 and fused.lora_specs == {}
    torch.testing.assert_close(fused(x), expected, atol=1e-4, rtol=0)


def test_folder_is_a_diffusers_pipeline_folder(tiny_model_folder):
    names = sorted(p.relative_to(tiny_model_folder).as_posix()
                   for p in tiny_model_folder.rglob("*") if p.is_file())
    assert names == ["checksums.sha256", "evae/config.json",
                     "evae/diffusion_pytorch_model.safetensors", "lora_real.safetensors",
                     "lora_synthetic.safetensors", "model_index.json", "prompt/config.json",
                     "prompt/diffusion_pytorch_model.safetensors", "unet/config.json",
                     "unet/diffusion_pytorch_model.safetensors"]
    for line in (tiny_model_folder / CHECKSUM_FILE).read_text().splitlines():
        digest, name = line.split("  ")
        assert hashlib.sha256((tiny_model_folder / name).read_bytes()).hexdigest() == digest
    index = json.loads((tiny_model_folder / INDEX_FILE).read_text())
    assert index["_class_name"] == "OSDDPipeline"
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    rec = index[RECORD_KEY]
    assert rec["storage_dtype"] == "float32" and rec["fused_gamma"] is None
    assert rec["adapters"] == {"real": "lora_real.safetensors",
                               "synthetic": "lora_synthetic.safetensors"}
    assert {"deblurcli", "torch", "diffusers", "peft"} <= set(rec["versions"])
    prompt = json.loads((tiny_model_folder / "prompt" / "config.json").read_text())
    assert prompt["timestep"] == 999 and prompt["num_tokens"] == 4


@torch.no_grad()
def test_stock_diffusers_loads_the_unet_and_both_adapters(tiny_osdd, tiny_model_folder):
    """The unet/ folder and the LoRA files need nothing of deblurcli: diffusers' own calls."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_model_folder, subfolder="unet")
    for name in ("real", "synthetic"):
        unet.load_lora_adapter(str(tiny_model_folder), weight_name=f"lora_{name}.safetensors",
                               adapter_name=name, prefix=None)
    unet.set_adapters(["real", "synthetic"], [0.4, 0.6])
    model = tiny_osdd(seed=0)
    model.set_gamma(0.4)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([999])
    prompt = model.denoiser.prompt_embeds
    torch.testing.assert_close(unet(z, t, encoder_hidden_states=prompt).sample,
                               model.unet(z, t, encoder_hidden_states=prompt).sample,
                               atol=1e-5, rtol=0)


@torch.no_grad()
def test_fp16_storage_and_mixed_run_dtypes(tiny_osdd, tmp_path):
    model = tiny_osdd(seed=1)
    save_model_folder(tmp_path / "m", model, storage_dtype=torch.float16,
                      include_sharp_encoder=False)
    assert record(tmp_path / "m")["storage_dtype"] == "float16"
    assert json.loads((tmp_path / "m" / "evae" / "config.json").read_text())["sharp_encoder"] \
        is False
    loaded = load_model_folder(tmp_path / "m", gamma=0.5, dtype=torch.bfloat16,
                               vae_dtype=torch.float32)
    assert loaded.unet_dtype == torch.bfloat16 and loaded.vae_dtype == torch.float32
    assert loaded.evae.encoder_sharp is None
    x = image()
    out = loaded(x)
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert float(out.abs().max()) <= 1.0
    model.set_gamma(0.5)
    assert (out - model(x)).abs().mean() < 0.05


def test_corrupt_file_is_reported(tiny_model_folder):
    path = tiny_model_folder / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match=r"unet/diffusion_pytorch_model\.safetensors .*corrupt"):
        load_model_folder(tiny_model_folder)


def test_missing_file_is_reported(tiny_model_folder):
    (tiny_model_folder / "lora_synthetic.safetensors").unlink()
    with pytest.raises(WeightsError, match=r"missing file lora_synthetic\.safetensors"):
        load_model_folder(tiny_model_folder)
    (tiny_model_folder / "checksums.sha256").unlink()
    with pytest.raises(WeightsError, match=r"missing file checksums\.sha256"):
        load_model_folder(tiny_model_folder)
    with pytest.raises(WeightsError, match=r"missing file lora_synthetic\.safetensors"):
        load_model_folder(tiny_model_folder, verify=False)


def test_shape_mismatch_is_reported(tiny_model_folder):
    path = tiny_model_folder / "evae" / "config.json"
    config = json.loads(path.read_text())
    config["latent_channels"] = 8  # same keys, other shapes
    path.write_text(json.dumps(config))
    rewrite_checksums(tiny_model_folder)
    with pytest.raises(WeightsError, match=r"cannot load evae/"):
        load_model_folder(tiny_model_folder)


def test_prompt_that_does_not_fit_the_unet_is_reported(tiny_model_folder):
    path = tiny_model_folder / "prompt" / "config.json"
    config = json.loads(path.read_text())
    config["embed_dim"] = 8
    path.write_text(json.dumps(config))
    rewrite_checksums(tiny_model_folder)
    with pytest.raises(WeightsError, match=r"prompt"):
        load_model_folder(tiny_model_folder)


def test_not_a_model_folder(tmp_path):
    with pytest.raises(WeightsError, match="model folder not found"):
        load_model_folder(tmp_path / "absent")
    with pytest.raises(WeightsError, match="missing model_index.json"):
        load_model_folder(tmp_path)
    (tmp_path / INDEX_FILE).write_text("{not json")
    with pytest.raises(WeightsError, match="not valid JSON"):
        load_model_folder(tmp_path)
    (tmp_path / INDEX_FILE).write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(WeightsError, match="not an OSDDPipeline"):
        load_model_folder(tmp_path)
    (tmp_path / INDEX_FILE).write_text(json.dumps({"_class_name": "OSDDPipeline",
                                                   RECORD_KEY: {"format_version": 99}}))
    with pytest.raises(WeightsError, match="upgrade deblurcli"):
        load_model_folder(tmp_path)
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text("{}")
    (old / "evae.safetensors").write_bytes(b"")
    with pytest.raises(WeightsError, match="early development version of deblurcli"):
        load_model_folder(old)


def test_default_weights_dir_says_no_model_installed():
    folder = default_weights_dir()
    assert folder.name == "weights" and folder.parent.name == "deblurcli"
    if not (folder / INDEX_FILE).is_file():
        with pytest.raises(WeightsError) as info:
            load_model_folder(folder)
        assert str(info.value) == NO_DEFAULT_MODEL


@torch.no_grad()
def test_fuse_model_folder_ignores_gamma_with_a_note(tiny_osdd, tiny_model_folder, tmp_path):
    fuse_model_folder(tiny_model_folder, tmp_path / "fused", 0.25)
    rec = record(tmp_path / "fused")
    assert rec["fused_gamma"] == 0.25 and rec["adapters"] == {}
    assert not (tmp_path / "fused" / "lora_real.safetensors").exists()
    notes: list[str] = []
    fused = load_model_folder(tmp_path / "fused", gamma=0.9, warn=notes.append)
    assert len(notes) == 1 and "gamma=0.25" in notes[0]
    model = tiny_osdd(seed=0)
    model.set_gamma(0.25)
    x = image()
    torch.testing.assert_close(fused(x), model(x), atol=1e-4, rtol=0)
    with pytest.raises(WeightsError, match="already fused"):
        fused.set_gamma(0.5)
    with pytest.raises(WeightsError, match="already fused"):
        fuse_model_folder(tmp_path / "fused", tmp_path / "again", 0.5)


def test_export_keeps_adapters_drops_e2_and_halves_storage(tiny_model_folder, tmp_path):
    out = tmp_path / "exported"
    export_model_folder(tiny_model_folder, out, extra={"note": "test"})
    rec = record(out)
    assert rec["storage_dtype"] == "float16" and rec["extra"]["note"] == "test"
    assert set(rec["adapters"]) == {"real", "synthetic"}
    weights = "evae/diffusion_pytorch_model.safetensors"
    assert (out / weights).stat().st_size < (tiny_model_folder / weights).stat().st_size / 2
    x = image()
    for gamma in (0.0, 1.0):
        a = load_model_folder(tiny_model_folder, gamma=gamma)(x)
        b = load_model_folder(out, gamma=gamma)(x)
        assert torch.allclose(a, b, atol=2e-2), (a - b).abs().max()


def test_saving_replaces_a_model_folder_whole_and_refuses_other_folders(tiny_osdd, tmp_path):
    out = tmp_path / "m"
    save_model_folder(out, tiny_osdd(seed=0), discriminator={"w": torch.ones(2)})
    assert (out / "training" / "discriminator.safetensors").is_file()
    save_model_folder(out, tiny_osdd(seed=0))  # a new save: no file of the old one is left
    assert not (out / "training").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary folder left
    other = tmp_path / "photos"
    other.mkdir()
    (other / "a.jpg").write_bytes(b"x")
    with pytest.raises(WeightsError, match="not a deblurcli model folder"):
        save_model_folder(other, tiny_osdd(seed=0))
    assert sorted(p.name for p in other.iterdir()) == ["a.jpg"]
    # folders that merely look like models: a project with a config.json, another pipeline
    (other / "config.json").write_text("{}")
    sd = tmp_path / "sd"
    sd.mkdir()
    (sd / INDEX_FILE).write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    for folder in (other, sd):
        with pytest.raises(WeightsError, match="not a deblurcli model folder"):
            save_model_folder(folder, tiny_osdd(seed=0))
    assert sorted(p.name for p in other.iterdir()) == ["a.jpg", "config.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "photos", "sd"]


def test_the_library_never_writes_a_copy_over_the_folder_it_is_made_from(tiny_model_folder,
                                                                         tmp_path):
    """fuse_model_folder(m, m), export_model_folder(m, m) and a blend written over one of its
    adapters replaced the model (adapters, E2 and training state lost; or a checksum
    mismatch) without a word; the CLI refused them."""
    from deblurcli.models.adapters import blend_adapter_files

    before = {p: p.read_bytes() for p in tiny_model_folder.rglob("*") if p.is_file()}
    for out in (tiny_model_folder, tiny_model_folder / "inside", tmp_path):
        with pytest.raises(WeightsError, match="the output folder must be outside"):
            fuse_model_folder(tiny_model_folder, out, 0.7)
        with pytest.raises(WeightsError, match="the output folder must be outside"):
            export_model_folder(tiny_model_folder, out)
    real = tiny_model_folder / "lora_real.safetensors"
    synthetic = tiny_model_folder / "lora_synthetic.safetensors"
    link = tmp_path / "link.safetensors"
    link.symlink_to(synthetic)
    for out in (real, synthetic, link):
        with pytest.raises(WeightsError, match="is one of the adapters being blended"):
            blend_adapter_files(real, synthetic, 0.5, out)
    assert {p: p.read_bytes() for p in tiny_model_folder.rglob("*") if p.is_file()} == before
    blend_adapter_files(real, synthetic, 0.5, tmp_path / "blend.safetensors")  # elsewhere: yes


def test_threads_saving_one_folder_at_once_leave_a_whole_model(tiny_osdd, tmp_path):
    """They shared one temporary folder (named by the process): each removed or moved the
    others' files, and a folder lacking evae/config.json could land in place."""
    from concurrent.futures import ThreadPoolExecutor

    model, out = tiny_osdd(seed=0), tmp_path / "m"
    for _ in range(3):
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda _: save_model_folder(out, model), range(4)))
        load_model_folder(out, gamma=0.5)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # nothing left beside it


def test_a_storage_dtype_may_be_named(tiny_osdd, tmp_path):
    """storage_dtype="fp16" failed with torch's 'Invalid device string: fp16'."""
    save_model_folder(tmp_path / "m", tiny_osdd(seed=0), storage_dtype="fp16")
    assert record(tmp_path / "m")["storage_dtype"] == "float16"
    with pytest.raises(ValueError, match="unknown dtype 'half-ish'"):
        save_model_folder(tmp_path / "n", tiny_osdd(seed=0), storage_dtype="half-ish")
    with pytest.raises(ValueError, match="unsupported storage dtype"):
        save_model_folder(tmp_path / "n", tiny_osdd(seed=0), storage_dtype=torch.int8)
    assert not (tmp_path / "n").exists()


def test_model_folder_files_get_normal_permissions(tiny_model_folder, tmp_path):
    old = os.umask(0o022)
    try:
        export_model_folder(tiny_model_folder, tmp_path / "m", include_sharp_encoder=True)
    finally:
        os.umask(old)
    paths = [tmp_path / "m", *(tmp_path / "m").rglob("*")]
    modes = {p.relative_to(tmp_path).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in paths}
    wrong = {name: oct(mode) for name, mode in modes.items()
             if mode != (0o755 if (tmp_path / name).is_dir() else 0o644)}
    assert len(modes) > 10 and not wrong, wrong


def test_a_hub_id_is_read_from_the_local_cache(tiny_model_folder, tmp_path, monkeypatch):
    """``--weights user/model`` resolves through the Hugging Face cache; offline, a model that
    is not cached is one clear error, not a download."""
    import shutil

    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--someone--osdd"
    shutil.copytree(tiny_model_folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    model = load_model_folder("someone/osdd", gamma=0.3)
    assert model.fused_gamma == 0.3
    with pytest.raises(WeightsError, match="not in the Hugging Face cache.*offline"):
        load_model_folder("someone/absent")


def test_a_checksum_file_must_list_the_index_and_every_component(tiny_model_folder):
    (tiny_model_folder / CHECKSUM_FILE).write_text("")
    with pytest.raises(WeightsError, match="does not list model_index.json"):
        load_model_folder(tiny_model_folder)


def test_a_checksum_file_must_list_every_file_a_run_reads(tiny_model_folder):
    """Adapters and configs copied in by hand, unlisted, were loaded unchecked, and the ONNX
    export cached under the list's hash ran on with the earlier ones."""
    listed = (tiny_model_folder / CHECKSUM_FILE).read_text().splitlines(keepends=True)
    for dropped in ("lora_real.safetensors", "prompt/config.json"):
        (tiny_model_folder / CHECKSUM_FILE).write_text(
            "".join(line for line in listed if not line.rstrip().endswith(f"  {dropped}")))
        with pytest.raises(WeightsError, match=f"does not list {dropped}"):
            load_model_folder(tiny_model_folder)


def test_a_mistyped_local_path_is_not_sent_to_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(WeightsError, match="model folder not found: runs/model"):
        load_model_folder("runs/model")


def test_the_library_takes_device_names_as_the_cli_does(tiny_model_folder):
    """device="auto" (the CLI's default) failed with a raw torch error in load_model_folder and
    DeblurPipeline; "cuda" on a machine without one gave torch's driver message."""
    import torch

    from deblurcli.device import resolve_device
    from deblurcli.errors import DeblurcliError
    from deblurcli.pipeline import DeblurPipeline

    model = load_model_folder(tiny_model_folder, device="auto")
    assert DeblurPipeline(model, device="auto").device == resolve_device("auto")
    # other names torch reads stay torch's
    assert DeblurPipeline(model, device="cpu:0").device == torch.device("cpu:0")
    assert DeblurPipeline(model, device="meta").device.type == "meta"
    if not torch.cuda.is_available():
        with pytest.raises(DeblurcliError, match="device 'cuda' is not available"):
            DeblurPipeline(model, device="cuda")
        with pytest.raises(DeblurcliError, match="device 'cuda' is not available"):
            load_model_folder(tiny_model_folder, device="cuda")


def test_a_training_run_given_as_a_model_folder_names_its_model(tiny_model_folder, tmp_path):
    """deblur/eval/blend --weights RUN and train-diffusion --init RUN said only "not a deblurcli
    model folder (missing model_index.json)" or "missing weights file"."""
    import shutil

    from typer.testing import CliRunner

    from deblurcli.cli.app import app

    import numpy as np

    from deblurcli.images import write_image

    run = tmp_path / "run"
    shutil.copytree(tiny_model_folder, run / "model")
    write_image(tmp_path / "photo.png", np.zeros((8, 8, 3), np.float32))
    words = f"{run} is a training run, not a model folder: its model is {run / 'model'}"
    for args in (["deblur", str(tmp_path / "photo.png"), str(tmp_path / "o"), "-w", str(run)],
                 ["blend", "-w", str(run), "--gamma", "0.5", "-o", str(tmp_path / "b.safetensors")]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 1 and words in " ".join(result.output.split()), args
    with pytest.raises(WeightsError, match="is a training run"):
        load_model_folder(run)
    # a folder of the two adapter files alone still blends
    adapters = tmp_path / "adapters"
    adapters.mkdir()
    for name in ("lora_real.safetensors", "lora_synthetic.safetensors"):
        shutil.copyfile(tiny_model_folder / name, adapters / name)
    result = CliRunner().invoke(app, ["blend", "-w", str(adapters), "--gamma", "0.5", "-o",
                                      str(tmp_path / "b.safetensors")])
    assert result.exit_code == 0, result.output


def _relist(folder: Path) -> None:
    """Checksums of every file of ``folder`` again (as a model that was changed on purpose)."""
    from deblurcli.modelindex import sha256_file

    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                   if p.is_file() and p.name != CHECKSUM_FILE)
    (folder / CHECKSUM_FILE).write_text(
        "".join(f"{sha256_file(folder / n)}  {n}\n" for n in names))


def test_an_unlisted_weights_index_is_refused(tiny_model_folder):
    """diffusers prefers a sharded index over the weights file: one copied in, pointing at an
    unlisted shard, ran in place of the checked weights."""
    from safetensors.torch import load_file, save_file

    unet = tiny_model_folder / "unet"
    tensors = {k: v * 0 for k, v in load_file(unet / "diffusion_pytorch_model.safetensors").items()}
    save_file(tensors, unet / "other-00001-of-00001.safetensors")
    (unet / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: "other-00001-of-00001.safetensors" for k in tensors}}))
    with pytest.raises(WeightsError, match="does not list unet/diffusion_pytorch_model"
                                           r"\.safetensors\.index\.json"):
        load_model_folder(tiny_model_folder)
    _relist(tiny_model_folder)  # listed, its shard must be too, and is then what runs
    listed = (tiny_model_folder / CHECKSUM_FILE).read_text()
    (tiny_model_folder / CHECKSUM_FILE).write_text("".join(
        line + "\n" for line in listed.splitlines() if "other-00001" not in line))
    with pytest.raises(WeightsError, match="does not list unet/other-00001-of-00001"):
        load_model_folder(tiny_model_folder)
    (unet / "diffusion_pytorch_model.safetensors.index.json").unlink()
    (unet / "other-00001-of-00001.safetensors").unlink()
    # files diffusers never reads may lie there: a .bin beside the safetensors (use_safetensors),
    # a Jupyter checkpoint, macOS's AppleDouble files
    (unet / "diffusion_pytorch_model.bin").write_bytes(b"junk")
    (unet / ".ipynb_checkpoints").mkdir()
    (unet / ".ipynb_checkpoints" / "config-checkpoint.json").write_text("{}")
    (unet / "._diffusion_pytorch_model.safetensors").write_bytes(b"\0\5\26\7")
    (unet / "._diffusion_pytorch_model.safetensors.index.json").write_bytes(b"\0\5\26\7")
    _relist(tiny_model_folder)
    for junk in ("diffusion_pytorch_model.bin", "._diffusion_pytorch_model.safetensors",
                 "._diffusion_pytorch_model.safetensors.index.json"):
        listed = (tiny_model_folder / CHECKSUM_FILE).read_text()
        (tiny_model_folder / CHECKSUM_FILE).write_text("".join(
            line + "\n" for line in listed.splitlines() if not line.endswith(junk)))
    assert load_model_folder(tiny_model_folder) is not None


@pytest.mark.parametrize("component", ["unet", "prompt"])
def test_a_weights_file_lacking_a_tensor_is_one_line_naming_it(tiny_model_folder, component,
                                                               capsys):
    """diffusers warned "You should probably TRAIN", left the tensor unset, and the run failed
    later blaming the ONNX export."""
    from safetensors.torch import load_file, save_file

    path = tiny_model_folder / component / "diffusion_pytorch_model.safetensors"
    tensors = load_file(path)
    dropped = sorted(tensors)[0]
    kept = tensors.pop(dropped)
    save_file(tensors, path)
    _relist(tiny_model_folder)
    with pytest.raises(WeightsError, match=f"{component}/ of .* lacks 1 tensor.*{dropped}"):
        load_model_folder(tiny_model_folder)
    captured = capsys.readouterr()
    assert "TRAIN" not in captured.out + captured.err
    save_file({**tensors, dropped: kept, "extra.weight": torch.zeros(2)}, path)
    _relist(tiny_model_folder)  # a tensor its config has no place for: another network's
    with pytest.raises(WeightsError, match=f"{component}/ of .* has 1 tensor.*no place for: "
                                           "extra.weight"):
        load_model_folder(tiny_model_folder)


def test_checksum_files_as_sha256sum_writes_them_in_either_mode(tiny_model_folder):
    """``sha256sum -b`` writes "HASH *NAME": refused as malformed; a file that is not text gave
    a UnicodeDecodeError naming no file."""
    path = tiny_model_folder / CHECKSUM_FILE
    text = path.read_text()
    path.write_text(text.replace("  ", " *"))
    assert load_model_folder(tiny_model_folder) is not None
    path.write_bytes(b"\xff\xfe x\n")
    with pytest.raises(WeightsError, match="checksums.sha256 in .* is not a text file"):
        load_model_folder(tiny_model_folder)
    path.write_text(text.replace("  ", " ", 1))
    with pytest.raises(WeightsError, match="malformed at line 1"):
        load_model_folder(tiny_model_folder)


def test_a_file_given_as_the_model_folder_says_so(tiny_model_folder):
    with pytest.raises(WeightsError, match="is a file, not a model folder .*--lora"):
        load_model_folder(tiny_model_folder / "lora_real.safetensors")


def test_a_cut_short_hub_fetch_is_fetched_again_or_said(tiny_model_folder, tmp_path,
                                                       monkeypatch):
    """A first download cut short left a snapshot without its weights: it was read as the
    model ("missing file ..."), never fetched again, with no fetch command given."""
    import shutil

    import huggingface_hub

    from deblurcli.modelindex import resolve_model

    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--someone--osdd"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(tiny_model_folder, snapshot)
    (snapshot / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsError, match="lacks unet/diffusion_pytorch_model.safetensors in "
                                           "the Hugging Face cache .*offline.*download"):
        resolve_model("someone/osdd")
    fetched = []

    def download(repo_id, **kwargs):  # the network: restores the file
        fetched.append(kwargs)
        if not kwargs.get("local_files_only"):
            shutil.copy(tiny_model_folder / "unet" / "diffusion_pytorch_model.safetensors",
                        snapshot / "unet" / "diffusion_pytorch_model.safetensors")
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert resolve_model("someone/osdd") == snapshot
    assert [bool(k.get("local_files_only")) for k in fetched] == [True, False]
    fetched.clear()
    assert resolve_model("someone/osdd") == snapshot and len(fetched) == 1  # whole: no fetch


def test_weights_of_an_older_diffusers_layout_load_as_diffusers_renames_them(tiny_model_folder):
    """diffusers renames a VAE's old attention names (query, key, value, proj_attn) on load: a
    check of the file's names against the model's refused such folders."""
    from safetensors.torch import load_file, save_file

    path = tiny_model_folder / "evae" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(path)
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed = {}
    for key, value in tensors.items():
        for new, former in old.items():
            if ".attentions.0." in key and f".{new}." in key:
                key = key.replace(f".{new}.", f".{former}.")
        renamed[key] = value
    assert renamed.keys() != tensors.keys()
    save_file(renamed, path)
    _relist(tiny_model_folder)
    loaded = load_model_folder(tiny_model_folder, gamma=0.7)
    state = loaded.evae.state_dict()
    assert all(torch.equal(state[k], v) for k, v in tensors.items() if k in state)


def test_a_malformed_checksum_file_in_the_hub_cache_is_reported_not_fetched(tiny_model_folder,
                                                                            tmp_path,
                                                                            monkeypatch):
    import shutil

    import huggingface_hub.constants as hc

    from deblurcli.modelindex import resolve_model

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--osdd"
    shutil.copytree(tiny_model_folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit / CHECKSUM_FILE).write_text("not a checksum\n")
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = resolve_model("someone/osdd")  # not "lacks checksums.sha256 ... fetch it"
    with pytest.raises(WeightsError, match="malformed at line 1"):
        load_model_folder(folder)


def test_a_hub_id_that_cannot_be_fetched_says_it_may_be_a_mistyped_folder(tmp_path,
                                                                         monkeypatch):
    """`-w ./mdl/typo` reaches the loader as mdl/typo, a hub id: the line was huggingface_hub's
    message cut off mid-word ("... cannot find the appropriate snapsh")."""
    import huggingface_hub
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError)

    from deblurcli.modelindex import resolve_model

    class NotOnTheHub(RepositoryNotFoundError):  # (its own needs an HTTP response)
        def __init__(self) -> None:
            Exception.__init__(self, "404 Client Error")

    class Gated(GatedRepoError):  # a RepositoryNotFoundError too: its words are kept
        def __init__(self) -> None:
            Exception.__init__(self, "Access to model mdl/typo is restricted. You must have "
                                     "access to it and be authenticated to access it.")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    for error, words in (
            (LocalEntryNotFoundError("An error happened while trying to locate the files " * 9),
             "mdl/typo is no model folder here, nor in the Hugging Face cache, and it cannot be "
             "fetched from the hub now \\(no network, or the hub did not answer; if it is meant "
             "to be a model folder, check its path\\)$"),
            (NotOnTheHub(), "mdl/typo is no model folder here, nor a model on the Hugging Face "
                            "hub that this machine may read \\(a private one needs `hf auth "
                            "login`; if it is meant"),
            (Gated(), "cannot fetch model mdl/typo: Access to model mdl/typo is restricted"),
            (OSError("word " * 60), "cannot fetch model mdl/typo: (word ){32}…$")):

        def download(repo_id, error=error, **kwargs):
            raise error

        monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
        with pytest.raises(WeightsError, match=words):
            resolve_model("mdl/typo")
