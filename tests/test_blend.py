"""`deblurcli blend`: exact adapter blend files and fused model folders, end to end."""

from __future__ import annotations

import torch
from typer.testing import CliRunner

from deblurcli.cli.app import app
from deblurcli.modelfolder import RECORD_KEY, load_model_folder, read_model_index
from deblurcli.models import adapters as ad

runner = CliRunner()


def image(size: int = 32) -> torch.Tensor:
    return torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(5)) * 2 - 1


@torch.no_grad()
def test_blend_files_equal_runtime_blend(tiny_model_folder, tmp_path):
    out = tmp_path / "blend.safetensors"
    result = runner.invoke(app, ["blend", str(tiny_model_folder / "lora_real.safetensors"),
                                 str(tiny_model_folder / "lora_synthetic.safetensors"),
                                 "--gamma", "0.3", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "rank 4" in result.stdout
    runtime = load_model_folder(tiny_model_folder, gamma=0.3, fuse=False)
    x = image()
    expected = runtime(x)
    # the blend file as the only adapter of the same model
    model = load_model_folder(tiny_model_folder, gamma=0.3, fuse=False)
    model.unet.load_lora_adapter(str(out), adapter_name="blend", prefix=None)
    ad.set_adapter_weights(model.unet, {"blend": 1.0})
    assert (model(x) - expected).abs().max() < 1e-4
    spec = ad.read_lora_file(out)[0]
    # the same from --weights DIR
    out2 = tmp_path / "blend2.safetensors"
    result = runner.invoke(app, ["blend", "--weights", str(tiny_model_folder), "--gamma", "0.3",
                                 "-o", str(out2)])
    assert result.exit_code == 0, result.output
    assert out2.read_bytes() != b"" and ad.read_lora_file(out2)[0] == spec


@torch.no_grad()
def test_blend_fuse_writes_a_fused_model_folder(tiny_model_folder, tmp_path):
    out = tmp_path / "fused"
    result = runner.invoke(app, ["blend", "--fuse", "--weights", str(tiny_model_folder),
                                 "--gamma", "0.6", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert read_model_index(out)[RECORD_KEY]["fused_gamma"] == 0.6
    x = image()
    runtime = load_model_folder(tiny_model_folder, gamma=0.6, fuse=False)(x)
    assert (load_model_folder(out, gamma=0.1)(x) - runtime).abs().max() < 1e-4


def test_bad_gamma_and_usage_exit_2(tiny_model_folder, tmp_path):
    real = str(tiny_model_folder / "lora_real.safetensors")
    synth = str(tiny_model_folder / "lora_synthetic.safetensors")
    for gamma in ("1.5", "-0.1", "nan"):
        result = runner.invoke(app, ["blend", real, synth, "--gamma", gamma,
                                     "-o", str(tmp_path / "o.safetensors")])
        assert result.exit_code == 2, (gamma, result.output)
    result = runner.invoke(app, ["blend", real, "--gamma", "0.5", "-o", str(tmp_path / "o")])
    assert result.exit_code == 2
    result = runner.invoke(app, ["blend", "--fuse", real, "--gamma", "0.5",
                                 "-o", str(tmp_path / "o")])
    assert result.exit_code == 2


def test_missing_inputs_exit_1_with_one_line(tmp_path):
    result = runner.invoke(app, ["blend", str(tmp_path / "a.safetensors"),
                                 str(tmp_path / "b.safetensors"), "--gamma", "0.5",
                                 "-o", str(tmp_path / "o.safetensors")])
    assert result.exit_code == 1
    assert "missing weights file" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["blend", "--fuse", "--weights", str(tmp_path / "nope"),
                                 "--gamma", "0.5", "-o", str(tmp_path / "out")])
    assert result.exit_code == 1 and "model folder not found" in result.output


def test_an_input_adapter_is_never_the_output(tiny_model_folder, tmp_path):
    real = tiny_model_folder / "lora_real.safetensors"
    synth = tiny_model_folder / "lora_synthetic.safetensors"
    link = tmp_path / "link.safetensors"
    link.hardlink_to(synth)
    before = {p: p.read_bytes() for p in (real, synth)}
    for args, said in ((["--weights", str(tiny_model_folder), "-o", str(real)], "a file of"),
                       ([str(real), str(synth), "-o", str(synth), "--force"], "one of the"),
                       ([str(real), str(synth), "-o", str(link), "--force"], "one of the")):
        result = runner.invoke(app, ["blend", "--gamma", "0.5", *args])
        assert result.exit_code == 1, result.output
        assert said in result.output
    assert {p: p.read_bytes() for p in (real, synth)} == before


def test_an_existing_output_is_replaced_only_with_force(tiny_model_folder, tmp_path):
    out = tmp_path / "blend.safetensors"
    out.write_bytes(b"mine")
    args = ["blend", "--weights", str(tiny_model_folder), "--gamma", "0.5", "-o", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 1 and "--force" in result.output  # as export: not a usage error
    assert out.read_bytes() == b"mine"
    # --force replaces a blend only: it turned a photo, a model's adapter, a checkpoint's
    # weights into a blend file
    other = tmp_path / "other" / "lora_real.safetensors"
    other.parent.mkdir()
    other.write_bytes((tiny_model_folder / "lora_real.safetensors").read_bytes())
    for taken in (out, other):
        result = runner.invoke(app, [*args[:-1], str(taken), "--force"])
        assert result.exit_code == 1 and "is not a blend file" in result.output, result.output
    assert out.read_bytes() == b"mine"
    out.unlink()
    assert runner.invoke(app, args).exit_code == 0
    assert runner.invoke(app, [*args[:4], "0.7", *args[5:], "--force"]).exit_code == 0
    spec, _, metadata = ad.read_lora_file(out)
    assert spec.rank == 4 and '"gamma": 0.7' in metadata[ad.BLEND_METADATA_KEY]  # the new one
    fused = tmp_path / "fused"
    args = ["blend", "--fuse", "--weights", str(tiny_model_folder), "--gamma", "0.5"]
    assert runner.invoke(app, [*args, "-o", str(fused)]).exit_code == 0
    result = runner.invoke(app, [*args, "-o", str(fused)])
    assert result.exit_code == 1 and "--force" in result.output
    assert runner.invoke(app, [*args, "-o", str(fused), "--force"]).exit_code == 0
    result = runner.invoke(app, ["blend", "--weights", str(tiny_model_folder), "--gamma", "0.5",
                                 "-o", str(fused)])  # a folder where a file is asked for
    assert result.exit_code == 1 and "is a folder" in result.output, result.output
    for inside in (tiny_model_folder / "g0.5", tiny_model_folder.parent):
        result = runner.invoke(app, [*args, "-o", str(inside), "--force"])
        assert result.exit_code == 1 and "outside" in result.output, result.output
    # a blend file written over a file of the model it is made from made that model unusable
    before = {p: p.read_bytes() for p in tiny_model_folder.rglob("*") if p.is_file()}
    for inside in ("checksums.sha256", "unet/config.json", "model_index.json"):
        result = runner.invoke(app, ["blend", "--weights", str(tiny_model_folder), "--gamma",
                                     "0.5", "-o", str(tiny_model_folder / inside), "--force"])
        assert result.exit_code == 1 and "is a file of" in result.output, inside
    assert {p: p.read_bytes() for p in tiny_model_folder.rglob("*") if p.is_file()} == before
    # a new file beside them is no harm (a folder of just the two adapters, say)
    result = runner.invoke(app, ["blend", "--weights", str(tiny_model_folder), "--gamma", "0.5",
                                 "-o", str(tiny_model_folder / "blend-0.5.safetensors")])
    assert result.exit_code == 0, result.output


def test_blend_from_a_folder_checks_it_as_a_run_does(tiny_model_folder, tmp_path):
    """--weights DIR took the adapter files unchecked: a blend of a damaged adapter went on to
    pass every later check; a fused folder was reported as a missing file."""
    real = tiny_model_folder / "lora_real.safetensors"
    data = bytearray(real.read_bytes())
    data[-1] ^= 0xFF
    real.write_bytes(bytes(data))
    result = runner.invoke(app, ["blend", "--weights", str(tiny_model_folder), "--gamma", "0.5",
                                 "-o", str(tmp_path / "b.safetensors")])
    assert result.exit_code == 1 and not (tmp_path / "b.safetensors").exists()
    assert result.output.strip() == \
        f"error: lora_real.safetensors in {tiny_model_folder} is corrupt (sha256 checksum mismatch)"
    data[-1] ^= 0xFF
    real.write_bytes(bytes(data))
    fused = tmp_path / "fused"
    assert runner.invoke(app, ["blend", "--fuse", "--weights", str(tiny_model_folder), "--gamma",
                               "0.3", "-o", str(fused)]).exit_code == 0
    result = runner.invoke(app, ["blend", "--weights", str(fused), "--gamma", "0.5",
                                 "-o", str(tmp_path / "c.safetensors")])
    assert result.exit_code == 1
    assert result.output.strip() == f"error: {fused} has its adapters fused already (gamma=0.3); " \
        "blend an unfused folder"


def test_a_blend_is_not_blended_again_nor_an_adapter_with_itself(tiny_model_folder, tmp_path):
    real = tiny_model_folder / "lora_real.safetensors"
    synth = tiny_model_folder / "lora_synthetic.safetensors"
    first = tmp_path / "b03.safetensors"
    assert runner.invoke(app, ["blend", str(real), str(synth), "--gamma", "0.3",
                               "-o", str(first)]).exit_code == 0
    again = runner.invoke(app, ["blend", str(first), str(synth), "--gamma", "0.5",
                                "-o", str(tmp_path / "b05.safetensors")])
    assert again.exit_code == 1 and "b03.safetensors is already a blend" in again.output
    same = runner.invoke(app, ["blend", str(real), str(real), "--gamma", "0.5",
                               "-o", str(tmp_path / "same.safetensors")])
    assert same.exit_code == 2 and "given as both adapters" in same.output
    assert not list(tmp_path.glob("b05*")) and not list(tmp_path.glob("same*"))
