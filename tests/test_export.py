"""``deblurcli export RUN -o MODEL``: a model folder from a finished or running train-diffusion run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from deblurcli.cli.app import app
from deblurcli.modelfolder import load_model_folder, read_discriminator
from deblurcli.train.config import DiffusionTrainConfig
from deblurcli.train.diffusion import train_diffusion


@pytest.fixture(scope="module")
def run(pairs: Path, tmp_path_factory) -> Path:
    """A finished two-step run (tiny preset, the whole UNet, GAN on) with a checkpoint at each
    step."""
    out = tmp_path_factory.mktemp("export") / "run"
    train_diffusion(DiffusionTrainConfig(
        data=str(pairs), output=str(out), max_steps=2, preset="tiny", full=True, crop=32,
        batch_size=2,
        cpu=True, perceptual="none", lr=1e-2, gan_start=0, checkpoint_every=1,
        keep_checkpoints=0, validate_every=100))
    return out


def _export(*args: str):
    return CliRunner().invoke(app, ["export", *map(str, args)])


def _states(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    model = load_model_folder(folder, fuse=False, gamma=0.5)
    return {"unet": model.unet.state_dict(), "evae": model.evae.state_dict(),
            "prompt": {"p": model.denoiser.prompt_embeds.detach()}}


def _same(a: dict, b: dict) -> bool:
    return all(a[part].keys() == b[part].keys() and
               all(torch.equal(a[part][k], b[part][k]) for k in a[part]) for part in a)


def _size(folder: Path) -> int:
    """Bytes of the weight files (configs and checksums aside)."""
    return sum(p.stat().st_size for p in folder.rglob("*.safetensors"))


def test_a_finished_run_exports_its_model_for_inference(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "model"
    result = _export(run, "-o", out)
    assert result.exit_code == 0, result.output
    assert f"from {run / 'model'} (step 2)" in result.stdout
    model = load_model_folder(out, gamma=0.7)
    assert model.evae.encoder_sharp is None and read_discriminator(out) is None
    reference = load_model_folder(run / "model", gamma=0.7)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(model.latent_step(x)[1], reference.latent_step(x)[1],
                                   atol=2e-2, rtol=2e-2)  # float16 storage
    kept = tmp_path / "kept"
    assert _export(run, "-o", kept, "--keep-training-state").exit_code == 0
    assert _same(_states(kept), _states(run / "model"))  # float32: the same weights
    assert read_discriminator(kept).keys() == read_discriminator(run / "model").keys()
    assert _size(out) < 0.6 * _size(kept)


def test_a_checkpoint_exports_the_model_the_run_held_at_that_step(run: Path,
                                                                   tmp_path: Path) -> None:
    from deblurcli.train.export import export_run

    last = export_run(run, tmp_path / "step2", checkpoint="2", keep_training_state=True)
    assert last.is_checkpoint and last.step == 2
    assert _same(_states(tmp_path / "step2"), _states(run / "model"))
    for name, value in read_discriminator(run / "model").items():
        assert torch.equal(read_discriminator(tmp_path / "step2")[name], value), name
    first = export_run(run, tmp_path / "step1", checkpoint="1", storage_dtype=torch.float32)
    assert first.step == 1
    assert not _same(_states(tmp_path / "step1"), _states(run / "model"))


def test_while_a_run_trains_the_newest_checkpoint_is_exported(run: Path, tmp_path: Path) -> None:
    running = tmp_path / "running"
    shutil.copytree(run, running, ignore=shutil.ignore_patterns("model"))
    result = _export(running, "-o", tmp_path / "mid")
    assert result.exit_code == 0, result.output
    assert "step-000000002 (step 2)" in result.stdout
    assert load_model_folder(tmp_path / "mid").evae.encoder_sharp is None
    for bad, words in ((["--checkpoint", "7"], "no checkpoint of step 7"),
                       (["--checkpoint", "soon"], "not 'latest', a step number"),
                       # another run's checkpoint: the folder would name this run
                       (["--checkpoint", run / "checkpoints" / "step-000000002"],
                        f"is not a checkpoint of {running}")):
        result = _export(running, "-o", tmp_path / "bad", *bad)
        assert result.exit_code == 1 and words in result.stderr, result.output


def test_export_never_overwrites_by_surprise_nor_leaves_half_a_folder(run: Path, tmp_path: Path,
                                                                       monkeypatch) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    # --force replaced (deleted) any folder: it replaces a model folder, never a user's own,
    # and is not suggested for one
    for force in ([], ["--force"]):
        result = _export(run, "-o", out, *force)
        assert result.exit_code == 1 and "not a deblurcli model folder" in result.stderr
        assert "--force" not in result.stderr
        assert [p.name for p in out.iterdir()] == ["notes.txt"]
    out = tmp_path / "model"
    assert _export(run, "-o", out).exit_code == 0
    result = _export(run, "-o", out)
    assert result.exit_code == 1 and "--force" in result.stderr
    (out / "notes.txt").write_text("of the earlier export: replaced with it")
    assert _export(run, "-o", out, "--force").exit_code == 0
    assert not (out / "notes.txt").exists() and load_model_folder(out) is not None

    def crash(folder, *args, **kwargs):
        (Path(folder) / "config.json").write_text("{}")
        raise OSError("disk full")

    monkeypatch.setattr("deblurcli.modelfolder.save_model_folder", crash)
    result = _export(run, "-o", tmp_path / "new", "--checkpoint", "latest")
    assert result.exit_code == 1 and "disk full" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "out"]  # none half-written
    assert _export(run, "-o", run.parent, "--force").exit_code == 1  # never over the run


def test_export_never_writes_over_what_it_reads(run: Path, tmp_path: Path) -> None:
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    assert Path("model/training.json") in before
    for out, words in ((run / "model", "is inside the run"),
                       (run / "exports" / "m", "is inside the run"),
                       (run.parent, "holds the run")):
        result = _export(run, "-o", out, "--force")
        assert result.exit_code == 1 and words in result.stderr, result.output
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before

    # a checkpoint folder given by path, and the model a checkpoint is rebuilt from
    step = tmp_path / "saved" / "step-000000002"
    shutil.copytree(run / "checkpoints" / "step-000000002", step)
    result = _export(run, "-o", step.parent, "--checkpoint", step, "--force")
    assert result.exit_code == 1 and "holds the exported state" in result.stderr, result.output
    evae = tmp_path / "evae"
    evae.mkdir()
    config = json.loads((step / "config.json").read_text())
    (step / "config.json").write_text(json.dumps({**config, "evae": str(evae)}))
    result = _export(run, "-o", evae, "--checkpoint", step, "--force")
    assert result.exit_code == 1 and "is the run's --evae" in result.stderr, result.output


def test_export_takes_only_train_diffusion_runs(tmp_path: Path) -> None:
    vae = tmp_path / "vae"
    vae.mkdir()
    (vae / "config.json").write_text(json.dumps({"kind": "VaeTrainConfig"}))
    result = _export(vae, "-o", tmp_path / "m")
    assert result.exit_code == 1 and "train-vae run" in result.stderr
    result = _export(tmp_path / "nowhere", "-o", tmp_path / "m")
    assert result.exit_code == 1 and "nowhere: no such folder" in result.stderr
    result = _export(vae / "config.json", "-o", tmp_path / "m")
    assert result.exit_code == 1 and "config.json is a file" in result.stderr
    (vae / "config.json").unlink()
    result = _export(vae, "-o", tmp_path / "m")
    assert result.exit_code == 1 and "not a train-diffusion output folder" in result.stderr
    assert not (tmp_path / "m").exists()


def test_a_checkpoint_is_never_rebuilt_around_a_changed_init_folder(run: Path, pairs: Path,
                                                                     tmp_path: Path) -> None:
    """A checkpoint holds only what its run trains; the rest comes from the run's --init.
    Retrained in place since, that folder made export and --resume rebuild the model around
    the new base without a word."""
    base = tmp_path / "base"
    shutil.copytree(run / "model", base)
    child = tmp_path / "child"
    train_diffusion(DiffusionTrainConfig(
        data=str(pairs), output=str(child), init=str(base), adapter="real", max_steps=1,
        crop=32, batch_size=2, cpu=True, perceptual="none", checkpoint_every=1,
        validate_every=100))
    assert _export(child, "-o", tmp_path / "a", "--checkpoint", "1").exit_code == 0
    assert _export(run, "-o", base, "--checkpoint", "1", "--force").exit_code == 0  # changed
    result = _export(child, "-o", tmp_path / "b", "--checkpoint", "1")
    assert result.exit_code == 1, result.output
    assert f"--init {base} no longer holds the weights this run was trained with" in " ".join(
        result.stderr.split())
    resumed = CliRunner().invoke(app, ["train-diffusion", "--resume", "latest", "-o", str(child),
                                       "--max-steps", "2"])
    assert resumed.exit_code == 1 and "no longer holds the weights" in resumed.stderr
    assert not (tmp_path / "b").exists()

    # only the values of what the checkpoint does not hold count: the folder written again
    # with the same weights, even with the child's own trained adapter, passes
    shutil.rmtree(base)
    shutil.copytree(run / "model", base)
    refused = _export(child, "-o", base, "--keep-training-state", "--force")  # its own --init
    assert refused.exit_code == 1 and "is the run's --init" in refused.stderr, refused.output
    assert _export(child, "-o", tmp_path / "x", "--keep-training-state").exit_code == 0
    shutil.rmtree(base)
    shutil.copytree(tmp_path / "x", base)
    assert _export(child, "-o", tmp_path / "c", "--checkpoint", "1").exit_code == 0


def test_training_from_an_inference_export_says_what_it_lacks(run: Path, pairs: Path,
                                                              tmp_path: Path) -> None:
    """An export for inference has no E2 and no discriminator: a run started from it took
    E1's latent as the latent target and a new discriminator without a word."""
    def train(init: Path, out: str):
        return CliRunner().invoke(app, [
            "train-diffusion", "--data", str(pairs), "--init", str(init), "--adapter", "real",
            "--cpu", "--crop", "32", "--batch-size", "2", "--perceptual", "none",
            "--max-steps", "1", "--validate-every", "100", "-q", "-o", str(tmp_path / out)])

    assert _export(run, "-o", tmp_path / "inference").exit_code == 0
    result = train(tmp_path / "inference", "a")
    assert result.exit_code == 0, result.output
    text = " ".join(result.stderr.split())
    assert "has no sharp encoder E2" in text and "no latent discriminator" in text
    assert "--keep-training-state" in text
    from deblurcli.train.diffusion import missing_training_state

    with_evae = missing_training_state(DiffusionTrainConfig(  # --evae brings its own E2
        init=str(tmp_path / "inference"), evae=str(run / "model"), adapter="real"))
    assert "discriminator" in with_evae and "E2" not in with_evae
    assert _export(run, "-o", tmp_path / "full", "--keep-training-state").exit_code == 0
    result = train(tmp_path / "full", "b")
    assert result.exit_code == 0 and "warning" not in result.stderr, result.output
    # a fused folder holds no adapters to train: that one line, without the note first
    fused = CliRunner().invoke(app, ["blend", "--fuse", "-w", str(tmp_path / "inference"),
                                     "--gamma", "0.5", "-o", str(tmp_path / "fused")])
    assert fused.exit_code == 0, fused.output
    result = train(tmp_path / "fused", "c")
    assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "needs an unfused model folder" in result.stderr


def test_a_checkpoint_is_named_in_its_run_or_set_aside_by_a_resume(run: Path,
                                                                    tmp_path: Path) -> None:
    """`--checkpoint step-N` was looked for in the working directory; a checkpoint a resume had
    set aside under RUN/superseded/ could not be exported at all (the suggested command failed)."""
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    result = _export(copy, "-o", tmp_path / "named", "--checkpoint", "step-000000001")
    assert result.exit_code == 0, result.output
    aside = copy / "superseded" / "resumed-at-000000001" / "checkpoints"
    aside.mkdir(parents=True)
    shutil.move(str(copy / "checkpoints" / "step-000000002"), str(aside))
    result = _export(copy, "-o", tmp_path / "aside", "--checkpoint", aside / "step-000000002")
    assert result.exit_code == 0, result.output
    assert "step-000000002 (step 2)" in result.stdout
    result = _export(run, "-o", tmp_path / "bad", "--checkpoint", aside / "step-000000002")
    assert result.exit_code == 1
    assert f"export it from its own run: deblurcli export {copy.resolve()} --checkpoint " \
        f"{aside / 'step-000000002'}" in " ".join(result.stderr.split())


def test_a_checkpoint_pruned_while_it_is_read_gives_way_to_the_newer_one(
        run: Path, tmp_path: Path, monkeypatch) -> None:
    """A run still training with --keep-checkpoints 1 saves step 2, then removes step 1, which
    export may be reading at that moment."""
    from deblurcli.train import export

    running = tmp_path / "running"
    shutil.copytree(run, running, ignore=shutil.ignore_patterns("model", "step-000000002"))
    real = export.checkpoint_model

    def pruned_meanwhile(path):
        if (running / "checkpoints" / "step-000000001").is_dir():  # the run goes on
            shutil.copytree(run / "checkpoints" / "step-000000002",
                            running / "checkpoints" / "step-000000002")
            shutil.rmtree(running / "checkpoints" / "step-000000001")
        return real(path)

    monkeypatch.setattr(export, "checkpoint_model", pruned_meanwhile)
    state = export.export_run(running, tmp_path / "latest", keep_training_state=True)
    assert state.step == 2
    assert _same(_states(tmp_path / "latest"), _states(run / "model"))  # step 2's weights

    shutil.rmtree(running)  # a step named on the command line is not swapped for another
    shutil.copytree(run, running, ignore=shutil.ignore_patterns("model", "step-000000002"))
    result = _export(running, "-o", tmp_path / "named", "--checkpoint", "1")
    assert result.exit_code == 1
    assert "was removed while export read it" in result.stderr, result.output
    assert not (tmp_path / "named").exists()


def test_a_model_replaced_while_it_is_read_is_read_again_and_a_damaged_one_says_so(
        run: Path, tmp_path: Path, monkeypatch) -> None:
    from deblurcli import modelfolder
    from deblurcli.errors import WeightsError
    from deblurcli.train import export

    running = tmp_path / "running"
    shutil.copytree(run, running)
    real = modelfolder.export_model_folder
    calls = []

    def replaced_meanwhile(src, *args, **kwargs):  # the run ends: RUN/model is put anew
        calls.append(src)
        if len(calls) == 1:
            fresh = running / ".model.new"
            shutil.copytree(running / "model", fresh)
            shutil.rmtree(running / "model")
            fresh.rename(running / "model")
            raise FileNotFoundError(2, "No such file or directory", str(src / "unet"))
        return real(src, *args, **kwargs)

    monkeypatch.setattr(modelfolder, "export_model_folder", replaced_meanwhile)
    state = export.export_run(running, tmp_path / "out")
    assert len(calls) == 2 and not state.is_checkpoint and (tmp_path / "out").is_dir()

    monkeypatch.setattr(modelfolder, "export_model_folder", real)
    (running / "model" / "model_index.json").unlink()  # damaged, not replaced: its own error
    (running / "checkpoints").rename(tmp_path / "aside")
    with pytest.raises(WeightsError, match="missing model_index.json"):
        export.export_run(running, tmp_path / "out2")
