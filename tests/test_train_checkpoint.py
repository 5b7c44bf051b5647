"""Checkpoints (safetensors + JSON), RNG state and configuration files."""

from __future__ import annotations

import json
import math

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from deblurcli.errors import DeblurcliError
from deblurcli.train import checkpoint as ckpt
from deblurcli.train import config as cfg


def _opt_step(model, opt) -> None:
    loss = model(torch.ones(2, 3)).pow(2).sum()
    opt.zero_grad()
    loss.backward()
    opt.step()


def test_optimizer_state_roundtrip() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    for _ in range(3):
        _opt_step(model, opt)
    tensors, meta = ckpt.optimizer_state_to_tensors(opt.state_dict())
    tensors = {k: v.clone() for k, v in tensors.items()}  # as if read back from the file
    twin = torch.nn.Linear(3, 2)
    twin.load_state_dict(model.state_dict())
    opt2 = torch.optim.AdamW(twin.parameters(), lr=0.5)
    opt2.load_state_dict(ckpt.optimizer_state_from_tensors(tensors, meta))
    assert opt2.param_groups[0]["lr"] == 0.1
    _opt_step(model, opt)
    _opt_step(twin, opt2)
    assert torch.equal(model.weight, twin.weight)


def test_rng_state_roundtrip() -> None:
    tensors, meta = ckpt.capture_rng_state()
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    ckpt.restore_rng_state(tensors, meta)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


def test_save_load_prune_and_resume(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    model.bias.requires_grad_(False)
    opt = torch.optim.AdamW([model.weight], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    for step in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, step, weights={"m": ckpt.trainable_state(model)},
                             optimizers={"m": opt}, schedulers={"m": sched},
                             config={"lr": 0.1}, keep=2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2, 3]
    latest = ckpt.resolve_resume("latest", tmp_path)
    state = ckpt.load_checkpoint(latest)
    assert state.step == 3 and set(state.weights["m"]) == {"weight"}
    assert not list(tmp_path.rglob("*.bin")) and not list(tmp_path.rglob("*.pt*"))
    with torch.no_grad():
        model.weight.zero_()
    ckpt.load_trainable_state(model, state.weights["m"])
    assert torch.equal(model.weight, state.weights["m"]["weight"])
    with pytest.raises(DeblurcliError, match="does not match"):
        ckpt.load_trainable_state(torch.nn.Linear(4, 2), state.weights["m"])
    with pytest.raises(DeblurcliError, match="no checkpoint"):
        ckpt.resolve_resume("latest", tmp_path / "empty")
    assert ckpt.resolve_resume("auto", tmp_path / "empty") is None


def test_config_layers(tmp_path: Path) -> None:
    toml = tmp_path / "run.toml"
    toml.write_text('lr = 0.001\nmax-steps = 50\n[data]\ncrop = 64\n')
    config = cfg.resolve_config(cfg.VaeTrainConfig, str(toml), {"max_steps": 7, "lr": None,
                                                                "output": str(tmp_path / "o")})
    assert (config.lr, config.max_steps, config.crop) == (0.001, 7, 64)
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("adapter: real\nlambda2: 0.5\n")
    config = cfg.resolve_config(cfg.DiffusionTrainConfig, str(yaml_file), {})
    assert (config.adapter, config.lambda2) == ("real", 0.5)
    bad = tmp_path / "bad.toml"
    bad.write_text("learning_rate = 1\n")
    with pytest.raises(DeblurcliError, match="unknown setting 'learning_rate'"):
        cfg.resolve_config(cfg.VaeTrainConfig, str(bad), {})
    with pytest.raises(DeblurcliError, match="config file not found"):
        cfg.read_config_file(tmp_path / "missing.toml")


@pytest.mark.parametrize("line,message", [
    ('augment = "false"', "augment must be true or false, got 'false'"),
    ('max-steps = "2"', "max-steps must be a whole number, got '2'"),
    ("max-steps = 2.5", "max-steps must be a whole number, got 2.5"),
    ("lr = true", "lr must be a number, got True"),
    ("output = 5", "output must be a string, got 5"),
    ('progressive-sizes = [64, "x"]', "progressive-sizes must be a whole number, got 'x'"),
])
def test_config_values_of_the_wrong_type_are_one_line(tmp_path: Path, line, message) -> None:
    """A quoted "false" used to switch a setting on, a quoted number to fail deep in training."""
    toml = tmp_path / "run.toml"
    toml.write_text(line + "\n")
    with pytest.raises(DeblurcliError, match=f"invalid setting in the config file: {message}"):
        cfg.resolve_config(cfg.DiffusionTrainConfig, str(toml), {})


def test_yaml_exponents_are_numbers(tmp_path: Path) -> None:
    """PyYAML (YAML 1.1) reads `lr: 1e-4` as the string '1e-4'."""
    pytest.importorskip("yaml")
    run = tmp_path / "run.yaml"
    run.write_text("lr: 1e-4\nlambda2: 5e-3\n")
    config = cfg.resolve_config(cfg.DiffusionTrainConfig, str(run), {})
    assert (config.lr, config.lambda2) == (1e-4, 5e-3)
    run.write_text("lr: fast\n")
    with pytest.raises(DeblurcliError, match="lr must be a number, got 'fast'"):
        cfg.resolve_config(cfg.DiffusionTrainConfig, str(run), {})


def test_config_numbers_and_lists_of_the_right_type_pass(tmp_path: Path) -> None:
    toml = tmp_path / "run.toml"
    toml.write_text("lr = 1\naugment = false\nprogressive-sizes = [64, 96]\nlora-rank = 8\n")
    config = cfg.resolve_config(cfg.DiffusionTrainConfig, str(toml), {})
    assert (config.lr, config.augment, config.progressive_sizes, config.lora_rank) == \
        (1.0, False, [64, 96], 8)
    assert isinstance(config.lr, float)


def test_what_shapes_the_model_cannot_change_on_resume(tmp_path: Path) -> None:
    """--lora-rank 8 on a resumed rank-2 run was written into its config.json while the
    weights stayed rank 2."""
    step = tmp_path / "checkpoints" / "step-000000002"
    step.mkdir(parents=True)
    (step / "state.json").write_text("{}")
    saved = cfg.config_to_dict(cfg.DiffusionTrainConfig(output=str(tmp_path), lora_rank=2,
                                                        preset="tiny", adapter="real"))
    (step / "config.json").write_text(json.dumps(saved))
    with pytest.raises(DeblurcliError, match="--lora-rank cannot change when a run resumes "
                                             "\\(it was 2"):
        cfg.resolve_config(cfg.DiffusionTrainConfig, None,
                           {"resume": str(step), "output": str(tmp_path), "lora_rank": 8})
    same = cfg.resolve_config(cfg.DiffusionTrainConfig, None,  # the same value, or a new length
                              {"resume": str(step), "lora_rank": 2, "max_steps": 9,
                               "output": str(tmp_path)})
    assert (same.lora_rank, same.adapter, same.max_steps) == (2, "real", 9)
    # a value the run never had is said so, not as "None"
    (step / "config.json").write_text(json.dumps({**saved, "lora_rank": None}))
    with pytest.raises(DeblurcliError, match="\\(it was not given, the checkpoint's model"):
        cfg.resolve_config(cfg.DiffusionTrainConfig, None,
                           {"resume": str(step), "output": str(tmp_path), "lora_rank": 8})
    # a run from --init: its advice was "start a new run with --init", which refuses the rank too
    (step / "config.json").write_text(json.dumps({**saved, "lora_rank": None, "init": "m"}))
    with pytest.raises(DeblurcliError, match="its adapters come from --init m; leave --lora-rank "
                                             "out$"):
        cfg.resolve_config(cfg.DiffusionTrainConfig, None,
                           {"resume": str(step), "output": str(tmp_path), "lora_rank": 8})
    # a switch is named as typed: --lora against a --full run (it said "--full ... was True")
    (step / "config.json").write_text(json.dumps({**saved, "full": True}))
    with pytest.raises(DeblurcliError, match="^--lora cannot change when a run resumes \\(it was "
                                             "--full, .*; leave --lora out"):
        cfg.resolve_config(cfg.DiffusionTrainConfig, None,
                           {"resume": str(step), "output": str(tmp_path), "full": False})
    # train-vae has no --init to start a new run with
    (step / "config.json").write_text(json.dumps(cfg.config_to_dict(cfg.VaeTrainConfig(
        output=str(tmp_path), preset="tiny"))))
    with pytest.raises(DeblurcliError, match="start a new run in a new folder$"):
        cfg.resolve_config(cfg.VaeTrainConfig, None,
                           {"resume": str(step), "output": str(tmp_path), "preset": "compact"})


def test_checkpoint_files_and_folder_are_flushed_to_disk(tmp_path: Path, monkeypatch) -> None:
    """Every file of a checkpoint is fsync-ed before it takes its name, and the checkpoints
    folder after the new step folder takes its own (issue 20: durable checkpoints)."""
    import os

    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc to name file descriptors")
    flushed: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        flushed.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1)
    monkeypatch.setattr(os, "fsync", fsync)
    final = ckpt.save_checkpoint(tmp_path, 1, weights={"m": ckpt.trainable_state(model)},
                                 optimizers={"m": opt}, schedulers={"m": sched}, config={})
    names = {Path(p).name for p in flushed}
    for written in final.iterdir():
        assert any(name.startswith(f".{written.name}.") for name in names), written.name
    assert flushed[-1] == str(final.parent.resolve())


def test_a_run_writes_only_into_a_new_empty_or_run_folder(tmp_path: Path) -> None:
    """A run writes config.json, model/, validation/ ... into --output: a user's folder (or the
    model folder given to --init) had its config.json replaced and a run mixed in."""
    from deblurcli.train.engine import prepare_output

    def prepare(folder: Path) -> None:
        prepare_output(cfg.VaeTrainConfig(data="pairs", output=str(folder)))

    mine = tmp_path / "project"
    mine.mkdir()
    (mine / "config.json").write_text('{"theme": "dark", "max_steps": 9}')  # (a --config file)
    (mine / "notes.txt").write_text("x")
    with pytest.raises(DeblurcliError, match=r"holds files that are not a training run's "
                                             r"\(config.json, notes.txt\); give a new or empty"):
        prepare(mine)
    assert (mine / "config.json").read_text() == '{"theme": "dark", "max_steps": 9}'
    model = tmp_path / "model"
    (model / "unet").mkdir(parents=True)
    (model / "model_index.json").write_text("{}")
    with pytest.raises(DeblurcliError, match=r"\(model_index.json, unet\)"):
        prepare(model)
    # a new, an empty (hidden files aside) and a just-started run's folder are fine
    prepare(tmp_path / "new")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".DS_Store").write_bytes(b"")
    prepare(tmp_path / "empty")
    started = tmp_path / "started"
    (started / "tensorboard").mkdir(parents=True)
    (started / "config.json").write_text('{"kind": "VaeTrainConfig", "max_steps": 5}')
    prepare(started)
    (tmp_path / "volume" / "lost+found").mkdir(parents=True)  # a fresh file system's root
    prepare(tmp_path / "volume")


@pytest.mark.parametrize("values,message", [
    ({"lr": math.inf}, "lr must be a finite number"),   # it trained to NaN and ended with exit 0
    ({"lr": math.nan}, "lr must be a finite number"),   # torch's "Invalid learning rate: nan"
    ({"lambda1": math.inf}, "lambda1 must be a finite number"),
    ({"disc_lr": math.inf}, "disc_lr must be a finite number"),
    ({"max_grad_norm": math.nan}, "max_grad_norm must be a finite number"),  # clipping was off
    ({"max_grad_norm": -1.0}, "max_grad_norm must be >= 0"),
    ({"lambda2": -0.5}, "lambda2 must be >= 0"),
    ({"alpha": -1.0}, "alpha must be >= 0"),  # (train-vae's perceptual weight)
    ({"disc_lr": 0.0}, "disc_lr must be > 0"),
])
def test_settings_a_run_cannot_train_with_are_refused(values, message) -> None:
    from deblurcli.train.config import validate_common

    with pytest.raises(DeblurcliError, match=f"invalid setting: {message}"):
        kind = cfg.VaeTrainConfig if "alpha" in values else cfg.DiffusionTrainConfig
        validate_common(kind(data="pairs", output="run", **values))
    validate_common(cfg.DiffusionTrainConfig(data="pairs", output="run", max_grad_norm=0.0))
