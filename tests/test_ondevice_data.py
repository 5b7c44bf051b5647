"""The accelerator data path (pairs made on the device) and time-boxed runs, on the CPU."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from deblurcli.synth.blur import NO_NOISE, BlurParams, blur_region
from deblurcli.synth.frames import average_frames
from deblurcli.train import ondevice as od
from deblurcli.train.batchplan import PlanSettings, Shapes, plan_batch


def _u8(rng, shape) -> np.ndarray:
    return (np.round(rng.random(shape) * 255) / 255).astype(np.float32)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    big, small = _u8(rng, (90, 120, 3)), _u8(rng, (30, 26, 3))  # small: smaller than the crop
    frames = _u8(rng, (15, 40, 50, 3))
    photos = [od.to_device_uint8(big, "cpu"), od.to_device_uint8(small, "cpu")]
    clips = [torch.stack([od.to_device_uint8(f, "cpu") for f in frames])]
    return big, small, frames, photos, clips


def test_device_pairs_match_the_synth_and_frame_averaging_code(data) -> None:
    big, small, frames, photos, clips = data
    shapes = Shapes(photos=((90, 120), (30, 26)), clips=((15, 40, 50),))
    settings = PlanSettings(batch_size=24, crop=32, real_fraction=0.4, augment=False,
                            blur=BlurParams(noise=NO_NOISE))
    plan = plan_batch(3, 7, shapes, settings)
    assert {s.real for s in plan.samples} == {True, False}
    blur, sharp = od.realise(plan, photos, clips)
    assert blur.shape == sharp.shape == (24, 3, 32, 32)
    for j, s in enumerate(plan.samples):
        if s.real:
            window = [f[s.top:s.top + 32, s.left:s.left + 32]
                      for f in frames[s.start:s.start + s.length]]
            want_blur, want_sharp = average_frames(window)
        else:
            photo = big if s.source == 0 else small
            want_blur = blur_region(photo, (s.left, s.top, 32, 32), s.kernel)
            padded = np.pad(photo, ((0, max(0, 32 - photo.shape[0])),
                                    (0, max(0, 32 - photo.shape[1])), (0, 0)), mode="reflect")
            want_sharp = padded[s.top:s.top + 32, s.left:s.left + 32]
        np.testing.assert_allclose(blur[j].permute(1, 2, 0).numpy(), want_blur, atol=2e-5)
        np.testing.assert_allclose(sharp[j].permute(1, 2, 0).numpy(), want_sharp, atol=1e-6)


def test_noise_follows_the_plan(data) -> None:
    _, _, _, photos, clips = data
    shapes = Shapes(photos=((90, 120), (30, 26)))
    settings = PlanSettings(batch_size=16, crop=32, augment=False)
    plan = plan_batch(0, 1, shapes, settings)
    noisy, _ = od.realise(plan, photos, [])
    for s in plan.samples:
        s.poisson_peak = s.gaussian_sigma = 0.0
    clean, _ = od.realise(plan, photos, [])
    for j, s in enumerate(plan_batch(0, 1, shapes, settings).samples):
        diff = (noisy[j] - clean[j]).abs().mean().item()
        assert (diff > 1e-4) == (s.poisson_peak > 0 or s.gaussian_sigma > 2e-4)


def test_batches_are_a_pure_function_of_seed_and_position(data) -> None:
    _, _, _, photos, clips = data
    settings = PlanSettings(batch_size=4, crop=24, real_fraction=0.5)
    source = od.DeviceBatchSource(photos, clips, settings=settings, seed=5)
    stream = source.stream()
    first = [next(stream) for _ in range(3)]
    resumed = next(source.stream(start_batch=2))
    assert torch.equal(first[2]["blur"], resumed["blur"])
    assert torch.equal(first[2]["sharp"], resumed["sharp"])
    assert first[2]["blur"].min() >= -1 and first[2]["blur"].max() <= 1
    other_rank = next(source.stream(start_batch=2, rank=1, world=2))
    assert not torch.equal(other_rank["blur"], resumed["blur"])


def test_worker_processes_draw_the_same_batches(data) -> None:
    _, _, _, photos, clips = data
    settings = PlanSettings(batch_size=3, crop=16)
    inline = od.DeviceBatchSource(photos, clips, settings=settings, seed=1)
    pooled = od.DeviceBatchSource(photos, clips, settings=settings, seed=1, workers=1)
    a, b = inline.stream(start_batch=4), pooled.stream(start_batch=4)
    for _ in range(2):
        x, y = next(a), next(b)
        assert torch.equal(x["blur"], y["blur"]) and torch.equal(x["sharp"], y["sharp"])
    b.close()


def test_real_fraction_mixes_the_sources() -> None:
    shapes = Shapes(photos=((64, 64),), clips=((20, 64, 64),))
    kinds = [s.real for i in range(20)
             for s in plan_batch(0, i, shapes, PlanSettings(batch_size=10, crop=16,
                                                            real_fraction=0.3)).samples]
    assert 0.2 < np.mean(kinds) < 0.4
    only_photos = plan_batch(0, 0, Shapes(photos=((64, 64),)), PlanSettings(batch_size=8, crop=16))
    assert not any(s.real for s in only_photos.samples)
    with pytest.raises(ValueError, match="shorter than"):
        plan_batch(0, 0, Shapes(photos=(), clips=((5, 64, 64),)), PlanSettings(8, 16))


def test_step_budget_plans_the_steps_that_fit(monkeypatch) -> None:
    from deblurcli.train import engine

    clock = [100.0]
    monkeypatch.setattr(engine.time, "perf_counter", lambda: clock[0])
    budget = engine.StepBudget(100.0, start_step=0, skip=2, calibrate=10, reserve=0.05)
    plans = {}
    for step in range(1, 20):
        clock[0] += 1.0 if step <= 2 else 0.5  # the slower start-up steps are not timed
        plans[step] = budget.plan(step)
    # ten steps are timed at step 12 (t = 107 s, past 5 % of the budget): 0.5 s a step and
    # 100 - 7 - 5 s left give 176 more steps; the plan is given once
    assert [s for s, v in plans.items() if v is not None] == [12]
    assert plans[12] == 12 + 176
    assert not budget.expired()
    clock[0] = 200.0
    assert budget.expired()

    slow = engine.StepBudget(100.0, start_step=0, skip=2, calibrate=10)
    clock[0] = 0.0
    slow.began, slow.deadline = 0.0, 100.0
    for step in range(1, 4):  # 6 s a step: a tenth of the budget passes before 10 are timed
        clock[0] += 6.0
        planned = slow.plan(step)
    assert planned == 3 + int((100 - 18 - 5) / 6)


def test_step_budget_plans_again_when_the_steps_change_speed(monkeypatch) -> None:
    from deblurcli.train import engine

    clock = [0.0]
    monkeypatch.setattr(engine.time, "perf_counter", lambda: clock[0])
    budget = engine.StepBudget(100.0, start_step=0, skip=2, calibrate=10, reserve=0.05)
    plans, step = {}, 0
    while clock[0] < 60.0:  # 0.5 s a step, then 1 s a step from 20 s on (crops that grew)
        step += 1
        clock[0] += 0.5 if clock[0] < 20.0 else 1.0
        plans[step] = budget.plan(step)
    given = {s: v for s, v in plans.items() if v is not None}
    first, *later = given.items()
    assert first == (12, 12 + int((100 - 6 - 5) / 0.5))
    # at 25 s the steps since the first plan (0.5 s, then 1 s) move the end earlier; at 50 s
    # the 1 s steps alone give the end the clock allows
    assert [s for s, _ in later] == [45, 70]
    assert later[0][1] < first[1]
    assert later[1][1] == 70 + int(100 - 50 - 5)

    steady = engine.StepBudget(100.0, start_step=0, skip=2, calibrate=10)
    clock[0], steady.began, steady.deadline = 0.0, 0.0, 100.0
    given = []
    for step in range(1, 190):  # the same speed throughout: planned once
        clock[0] += 0.5
        if steady.plan(step) is not None:
            given.append(step)
    assert given == [12]
    assert steady.planned == 12 + int((100 - 6 - 5) / 0.5)


@pytest.fixture(scope="module")
def photo_and_frame_folders(tmp_path_factory):
    from deblurcli.images import write_image

    rng = np.random.default_rng(1)
    root = tmp_path_factory.mktemp("ondevice")
    for i in range(3):
        write_image(root / "photos" / f"p{i}.png", _u8(rng, (40 + 8 * i, 48, 3)))
    base = _u8(rng, (40, 60, 3))
    for t in range(9):  # a slow pan: consecutive frames
        write_image(root / "frames" / "clip" / f"{t:03d}.png", np.roll(base, t, axis=1)[:, :48])
    return root / "photos", root / "frames"


def test_a_time_boxed_device_data_run_writes_its_model(photo_and_frame_folders, tmp_path) -> None:
    import csv

    from deblurcli.modelfolder import load_model_folder
    from deblurcli.train.config import DiffusionTrainConfig
    from deblurcli.train.diffusion import train_diffusion

    photos, frames = photo_and_frame_folders
    config = DiffusionTrainConfig(
        sharp_photos=str(photos), frames=str(frames), real_fraction=0.5, device_data=True,
        preset="tiny", full=True, crop=16, batch_size=2, val_count=1, val_size=16, cpu=True,
        perceptual="none", lambda2=0.0, lr=1e-3, lr_schedule="cosine", max_steps=1_000_000,
        time_budget=3.0, checkpoint_every=1_000_000, validate_every=1_000_000, log_every=1,
        output=str(tmp_path / "run"))
    result = train_diffusion(config)
    # it stops by itself (max_steps is out of reach) soon after its 3 s, however slow the steps
    assert not result.interrupted and 1 <= result.step < 1_000_000
    assert result.seconds < 3.0 + 30.0
    assert load_model_folder(result.model_folder, fuse=True) is not None
    assert (tmp_path / "run" / "checkpoints").is_dir()
    with (tmp_path / "run" / "train_log.csv").open() as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("lr")]
    assert int(rows[-1]["step"]) == result.step
    if not result.out_of_time:  # it ended at the step it planned: its cosine's last rate
        last = result.step
        assert float(rows[-1]["lr"]) == pytest.approx(
            1e-3 * 0.5 * (1 + math.cos(math.pi * (last - 1) / last)))


def test_host_data_mixes_frames_into_another_source(photo_and_frame_folders) -> None:
    from deblurcli.train import data as dt
    from deblurcli.train.config import DiffusionTrainConfig
    from deblurcli.train.engine import build_data

    photos, frames = photo_and_frame_folders
    config = DiffusionTrainConfig(sharp_photos=str(photos), frames=str(frames),
                                  frames_per_blur=3, real_fraction=0.5, crop=16, val_count=1)
    bundle = build_data(config)
    assert isinstance(bundle.train, dt.MixedDataset) and len(bundle.val) == 1
    assert len(bundle.train.real) == 3 and len(bundle.train.main) == 2
    shapes = {tuple(bundle.train[p]["blur"].shape) for p in range(6)}
    assert shapes == {(3, 16, 16)}
    with pytest.raises(Exception, match="one data source"):
        dt.discover(data="x", sharp_photos="y")


def test_frames_under_a_hidden_folder_are_found(tmp_path) -> None:
    from deblurcli.images import write_image
    from deblurcli.train import data as dt

    clip = tmp_path / ".pack" / "frames" / "CLIP"
    for t in range(7):
        write_image(clip / f"{t:03d}.png", np.full((8, 8, 3), t / 10, np.float32))
    write_image(clip / ".hidden" / "x.png", np.zeros((8, 8, 3), np.float32))
    assert [len(c) for c in dt.frame_clips(tmp_path / ".pack" / "frames")] == [7]
    assert len(dt.frame_items(tmp_path / ".pack" / "frames", 7)) == 1


def test_device_clips_leave_out_the_validation_windows(tmp_path) -> None:
    """Frames alone with --val-count: the held-out windows' frames were trained on, since the
    device path loaded whole clips."""
    from deblurcli.images import write_image
    from deblurcli.train import data as dt
    from deblurcli.train.config import DiffusionTrainConfig
    from deblurcli.train.engine import build_data

    for t in range(30):  # frame t is all t/40: its mean tells which it is
        write_image(tmp_path / "clip" / f"{t:03d}.png", np.full((24, 24, 3), t / 40, np.float32))
    config = DiffusionTrainConfig(frames=str(tmp_path), frames_per_blur=3, crop=16,
                                  val_count=2, device_data=True, seed=3)
    bundle = build_data(config)
    held = {round(float(dt._read(p).mean()) * 40) for item in bundle.val.items
            for p in item.frames}
    trained = [round(float(f.float().mean()) / 255 * 40) for clip in bundle.train.clips
               for f in clip]
    assert len(held) == 6 and not held & set(trained)
    assert len(trained) == len(set(trained)) and len(trained) >= 30 - 6 - 2 * 6


def test_frames_too_few_for_one_window_are_an_error_not_dropped(photo_and_frame_folders) -> None:
    """Beside --sharp-photos, a --frames folder that made no window was left out unsaid (a run
    with no real blur at all); alone, it said the folder held no images."""
    from deblurcli.errors import DatasetError
    from deblurcli.train.config import DiffusionTrainConfig
    from deblurcli.train.engine import build_data

    photos, frames = photo_and_frame_folders
    for sources in ({"sharp_photos": str(photos), "frames": str(frames)},
                    {"frames": str(frames)}):
        config = DiffusionTrainConfig(frames_per_blur=11, crop=16, **sources)
        with pytest.raises(DatasetError, match="has 11 frames for one blurred image \\(the "
                                               "longest has 9\\); lower --frames-per-blur"):
            build_data(config)
