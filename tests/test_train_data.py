"""Training data: layouts, early validation, seeded aligned augmentation, resumable order."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from deblurcli.errors import DatasetError
from deblurcli.images import write_image
from deblurcli.train import data as dt


def _img(seed: int, h: int = 24, w: int = 24) -> np.ndarray:
    return np.random.default_rng(seed).random((h, w, 3), dtype=np.float32)


def _pair(folder: Path, name: str, seed: int, size=(24, 24), sharp_size=None) -> None:
    write_image(folder / "blur" / name, _img(seed, *size))
    write_image(folder / "sharp" / name, _img(seed + 100, *(sharp_size or size)))


def test_gopro_layout(tmp_path: Path) -> None:
    for seq in ("GOPR0001", "GOPR0002"):
        for i in range(2):
            _pair(tmp_path / "train" / seq, f"{i:06d}.png", i)
    assert dt.detect_layout(tmp_path) == "gopro"
    items, problems = dt.discover(data=str(tmp_path))
    assert problems == [] and len(items) == 4
    assert all(isinstance(it, dt.PairItem) and it.blur.parent.name == "blur" for it in items)
    dt.validate_items(items, problems)


def test_realblur_list_and_missing_file(tmp_path: Path) -> None:
    _pair(tmp_path / "scene1", "1.png", 0)
    (tmp_path / "list.txt").write_text("scene1/sharp/1.png scene1/blur/1.png\n"
                                       "scene1/sharp/2.png scene1/blur/2.png\n")
    assert dt.detect_layout(tmp_path / "list.txt") == "realblur"
    items, problems = dt.discover(data=str(tmp_path / "list.txt"))
    assert len(items) == 1 and items[0].sharp.name == "1.png"
    assert items[0].blur.parent.name == "blur"
    assert len(problems) == 1 and "list.txt:2" in problems[0]
    with pytest.raises(DatasetError, match="1 problem"):
        dt.validate_items(items, problems)


def test_synth_layout_and_folder_pairs(tmp_path: Path) -> None:
    _pair(tmp_path, "a.png", 1)
    _pair(tmp_path, "sub/b.png", 2)
    assert dt.detect_layout(tmp_path) == "synth"
    items, problems = dt.discover(data=str(tmp_path))
    assert len(items) == 2 and not problems
    items2, _ = dt.discover(blur=str(tmp_path / "blur"), sharp=str(tmp_path / "sharp"))
    assert items2 == items


def test_two_images_of_one_name_are_no_pairs(tmp_path: Path) -> None:
    """b/d.png and b/d.jpg both paired with s/d.png, and s/c.jpg was left out, unsaid."""
    for rel, seed in (("blur/z/d.png", 1), ("blur/z/d.jpg", 2), ("sharp/z/d.png", 3),
                      ("blur/y/c.png", 4), ("sharp/y/c.png", 5), ("sharp/y/c.jpg", 6),
                      ("blur/x/e.jpg", 7), ("sharp/x/e.png", 8)):
        write_image(tmp_path / rel, _img(seed))
    pairs, problems = dt.pair_folders(tmp_path / "blur", tmp_path / "sharp")
    assert sorted((p.blur.name, p.sharp.name) for p in pairs) == \
        [("c.png", "c.png"), ("d.png", "d.png"), ("e.jpg", "e.png")]  # the same name first
    assert len(problems) == 2
    assert "d.jpg: its sharp partner" in problems[0] and "already the partner of" in problems[0]
    assert "c.jpg: unused" in problems[1]


def test_validation_lists_first_five_offenders(tmp_path: Path) -> None:
    for i in range(7):
        write_image(tmp_path / "blur" / f"x{i}.png", _img(i))
    write_image(tmp_path / "sharp" / "x0.png", _img(0))
    _pair(tmp_path, "big.png", 9, size=(24, 24), sharp_size=(24, 32))
    items, problems = dt.pair_folders(tmp_path / "blur", tmp_path / "sharp")
    with pytest.raises(DatasetError) as info:
        dt.validate_items(items, problems)
    message = str(info.value)
    assert "\n" not in message and "7 problem(s)" in message and "(+2 more)" in message
    assert message.count("no sharp partner") == 5
    # a size mismatch alone is reported too
    with pytest.raises(DatasetError, match="size mismatch"):
        dt.validate_items([it for it in items if it.blur.name == "big.png"])


def test_no_source_or_two_sources() -> None:
    with pytest.raises(DatasetError, match="no training data"):
        dt.discover()
    with pytest.raises(DatasetError, match="one data source"):
        dt.discover(data="x", sharp_photos="y")


def test_augment_is_aligned_and_seeded() -> None:
    img = _img(3, 40, 48)
    a1, b1 = dt.augment_pair(img, img.copy(), np.random.default_rng(5), 16)
    a2, _ = dt.augment_pair(img, img.copy(), np.random.default_rng(5), 16)
    assert a1.shape == (16, 16, 3)
    np.testing.assert_array_equal(a1, b1)  # same transform on both images
    np.testing.assert_array_equal(a1, a2)  # same seed, same result
    seen = {dt.augment_pair(img, img, np.random.default_rng(s), 16)[0].tobytes() for s in range(8)}
    assert len(seen) > 4
    small, _ = dt.augment_pair(_img(1, 10, 12), _img(1, 10, 12), np.random.default_rng(0), 16)
    assert small.shape == (16, 16, 3)  # reflect-padded


def test_dataset_positions_are_deterministic_epochs(tmp_path: Path) -> None:
    for i in range(5):
        _pair(tmp_path, f"{i}.png", i)
    items, _ = dt.discover(data=str(tmp_path))
    ds = dt.PairedDataset(items, crop=16, seed=3)
    assert sorted(ds.index_at(p) for p in range(5)) == list(range(5))  # one epoch = each once
    assert sorted(ds.index_at(p) for p in range(5, 10)) == list(range(5))
    a, b = ds[7], dt.PairedDataset(items, crop=16, seed=3)[7]
    assert a["blur"].shape == (3, 16, 16)
    assert a["blur"].min() >= -1 and a["blur"].max() <= 1
    assert (a["blur"] == b["blur"]).all() and (a["sharp"] == b["sharp"]).all()
    sched = dt.CropSchedule((8, 16), steps_each=2, samples_per_step=3)
    assert [sched.size_at(p) for p in (0, 5, 6, 100)] == [8, 8, 16, 16]


def test_stream_sampler_resumes_and_shards() -> None:
    full = iter(dt.StreamBatchSampler(2))
    first = [next(full) for _ in range(5)]
    resumed = iter(dt.StreamBatchSampler(2, start_batch=3))
    assert [next(resumed) for _ in range(2)] == first[3:5]
    r0 = iter(dt.StreamBatchSampler(2, rank=0, world=2))
    r1 = iter(dt.StreamBatchSampler(2, rank=1, world=2))
    batches = [next(r0), next(r1), next(r0), next(r1)]
    assert sorted(p for b in batches for p in b) == list(range(8))


def test_on_the_fly_sources(tmp_path: Path) -> None:
    import skimage.data

    photo = skimage.data.astronaut()[100:164, 180:244].astype(np.float32) / 255
    write_image(tmp_path / "photos" / "a.png", photo)
    items, _ = dt.discover(sharp_photos=str(tmp_path / "photos"))
    sample = dt.PairedDataset(items, crop=32, seed=0, augment=False)[0]
    assert sample["blur"].shape == (3, 32, 32)
    assert float((sample["blur"] - sample["sharp"]).abs().mean()) > 1e-3
    for i in range(6):  # frames: one clip folder, 2 windows of 3
        write_image(tmp_path / "frames" / "clip" / f"{i:03d}.png", np.roll(photo, 2 * i, axis=1))
    items, _ = dt.discover(frames=str(tmp_path / "frames"), frames_per_blur=3)
    assert len(items) == 2 and len(items[0].frames) == 3
    blur, sharp = dt.load_item(items[0], np.random.default_rng(0))
    np.testing.assert_allclose(sharp, np.roll(photo, 2, axis=1), atol=1 / 255)
    assert np.abs(blur - sharp).mean() > 1e-3


def test_a_folder_of_pairs_is_no_folder_of_sharp_photos(pairs: Path) -> None:
    """--sharp-photos pairs/ trained on every image below it, the blurred ones as sharp
    targets, without a word."""
    with pytest.raises(dt.DatasetError, match="holds pairs of blurred and sharp images \\(a "
                                              "synth layout\\): give them as --data"):
        dt.discover(sharp_photos=str(pairs))
    assert dt.discover(sharp_photos=str(pairs / "sharp"))[0]  # its sharp half is fine


def test_pairs_deeper_down_are_no_sharp_photos_nor_frames(tmp_path: Path) -> None:
    """Only the top of a folder was looked at: a data folder holding a synth output or a GoPro
    tree one level further down was trained on whole, its blurred images as sharp ones, and
    --frames averaged GoPro's already blurred frames."""
    for seq in ("GOPR0001", "GOPR0002"):
        for i in range(3):
            _pair(tmp_path / "data" / "gopro" / "train" / seq, f"{i:06d}.png", i)
    write_image(tmp_path / "data" / "photos" / "a.png", _img(9))
    with pytest.raises(DatasetError, match="holds blurred images .*GOPR0001/blur"):
        dt.discover(sharp_photos=str(tmp_path / "data"))
    for frames in (tmp_path / "data", tmp_path / "data" / "gopro"):
        with pytest.raises(DatasetError, match="--frames .* holds pairs of blurred and sharp"):
            dt.discover(frames=str(frames), frames_per_blur=3)
        with pytest.raises(DatasetError, match="holds pairs"):
            dt.frame_clips(frames)
    assert len(dt.discover(sharp_photos=str(tmp_path / "data" / "photos"))[0]) == 1


def test_validation_holds_out_every_pair_made_from_its_photo(tmp_path: Path) -> None:
    """synth makes several pairs of one photo (overlapping crops, --per-crop kernels of one
    crop): holding out one of them left its twins, the same sharp pixels, in training."""
    import json

    from deblurcli.synth.blur import BlurParams
    from deblurcli.synth.build import SynthConfig, run_synth

    for name, seed in (("a", 1), ("b", 2), ("c", 3)):
        write_image(tmp_path / "src" / f"{name}.png", _img(seed, 48, 48))
    run_synth(SynthConfig(out=tmp_path / "out", src=tmp_path / "src", crop=32, stride=16,
                          per_crop=2, seed=0, blur=BlurParams(max_kernel=9), workers=1))
    sources = {json.loads(line)["name"]: json.loads(line)["source"]
               for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()}
    for items, _ in (dt.discover(data=str(tmp_path / "out")),
                     dt.discover(blur=str(tmp_path / "out" / "blur"),
                                 sharp=str(tmp_path / "out" / "sharp"))):
        assert len(items) == 3 * 4 * 2
        train, val = dt.split_validation(items, 2, seed=0)
        held = {sources[item.blur.stem] for item in val}
        assert len(val) == 2 and len(held) == 2
        assert not held & {sources[item.blur.stem] for item in train}
        assert len(train) == 8  # the third photo's pairs
        with pytest.raises(DatasetError, match="every one of the 3 photo"):
            dt.split_validation(items, 3, seed=0)
    for i in range(21):  # frame windows of one clip: apart, each its own frames
        write_image(tmp_path / "frames" / f"{i:03d}.png", _img(i, 24, 24))
    run_synth(SynthConfig(out=tmp_path / "fw", frames=tmp_path / "frames", crop=None,
                          frame_range=(7, 7), seed=0, workers=1))
    windows, _ = dt.discover(data=str(tmp_path / "fw"))
    assert len(windows) == 3 and {w.group for w in windows} == {None}
    assert len(dt.split_validation(windows, 1, seed=0)[0]) == 2
    plain = [dt.PairItem(Path(f"{i}.png"), Path(f"{i}.png")) for i in range(5)]
    train, val = dt.split_validation(plain, 2, seed=0)  # pairs of their own: one each
    assert len(train) == 3 and len(val) == 2


def test_a_missing_validation_set_names_its_flag(pairs: Path, tmp_path: Path) -> None:
    """"dataset nope does not exist" did not say which of the run's paths it was."""
    from deblurcli.train import engine
    from deblurcli.train.config import DiffusionTrainConfig

    config = DiffusionTrainConfig(data=str(pairs), val_data=str(tmp_path / "nope"), cpu=True)
    with pytest.raises(dt.DatasetError, match="^--val-data: dataset .*nope does not exist"):
        engine.build_data(config, world=1)


def test_a_sharp_photo_is_blurred_only_around_its_crop(tmp_path: Path, monkeypatch) -> None:
    """The whole photo was blurred for each crop (0.90 s a 256 px crop of a 2000x1500 photo,
    0.18 s now); the window blurred alone must equal that window of the blurred photo."""
    import skimage.data

    from deblurcli.synth import blur as sb

    photo = skimage.data.astronaut()[:200, :240].astype(np.float32) / 255
    write_image(tmp_path / "p.png", photo)
    kernel = np.zeros((9, 9), np.float32)
    kernel[4, 1:8] = 1 / 7  # a horizontal streak
    monkeypatch.setattr(sb, "sample_kernel", lambda rng, params: (kernel, {}))
    monkeypatch.setattr(sb, "degrade", lambda pixels, rng, noise: (pixels, {}))
    whole = sb.blur_image(dt._read(tmp_path / "p.png"), kernel)
    rng = np.random.default_rng(5)
    blur, sharp = dt.blurred_crop(dt.SharpItem(tmp_path / "p.png"), rng, 64)
    again = np.random.default_rng(5)
    top, left = int(again.integers(0, 200 - 64 + 1)), int(again.integers(0, 240 - 64 + 1))
    np.testing.assert_allclose(sharp, dt._read(tmp_path / "p.png")[top:top + 64, left:left + 64])
    np.testing.assert_allclose(blur, whole[top:top + 64, left:left + 64], atol=1e-5)
    val = dt.ValidationDataset([dt.SharpItem(tmp_path / "p.png")], size=96, seed=0)[0]
    np.testing.assert_allclose((val["sharp"].numpy().transpose(1, 2, 0) + 1) / 2,
                               dt.center_crop(dt._read(tmp_path / "p.png"), 96), atol=1e-6)
    np.testing.assert_allclose((val["blur"].numpy().transpose(1, 2, 0) + 1) / 2,
                               dt.center_crop(whole, 96), atol=1e-5)
    small = dt.PairedDataset([dt.SharpItem(tmp_path / "p.png")], crop=256, seed=0)[3]
    assert small["blur"].shape == small["sharp"].shape == (3, 256, 256)  # padded up to a crop


def test_what_training_cannot_read_in_its_folders_is_said(tmp_path: Path) -> None:
    """Links to folders (not followed) and broken links were left out of --sharp-photos and of
    pairs without a word; a --frames folder with no frame image beside --data was dropped;
    x.png pairs with x.PNG as y.PNG with y.png; a file that is no list file was a
    UnicodeDecodeError."""
    photos = tmp_path / "photos"
    write_image(photos / "real" / "p0.png", _img(0))
    write_image(tmp_path / "elsewhere" / "p1.png", _img(1))
    (photos / "linked").symlink_to(tmp_path / "elsewhere")
    (photos / "real" / "broken.png").symlink_to(tmp_path / "gone.png")
    items, problems = dt.discover(sharp_photos=str(photos))
    assert len(items) == 1
    assert any("linked: a link to a folder, not followed" in p for p in problems), problems
    assert any("broken.png" in p for p in problems), problems
    with pytest.raises(DatasetError, match="2 problem"):
        dt.validate_items(items, problems)

    _pair(tmp_path / "pairs", "a.png", 0)
    (tmp_path / "clips" / "c1").mkdir(parents=True)
    (tmp_path / "clips" / "c1" / "clip.mp4").write_bytes(b"")
    with pytest.raises(DatasetError, match="holds no frame images .*synth --frames"):
        dt.discover(data=str(tmp_path / "pairs"), frames=str(tmp_path / "clips"))

    case = tmp_path / "case"
    write_image(case / "b" / "x.png", _img(2))
    write_image(case / "s" / "x.PNG", _img(3))
    write_image(case / "b" / "y.PNG", _img(4))
    write_image(case / "s" / "y.png", _img(5))
    items, problems = dt.pair_folders(case / "b", case / "s")
    assert not problems and sorted((i.blur.name, i.sharp.name) for i in items) == \
        [("x.png", "x.PNG"), ("y.PNG", "y.png")]

    with pytest.raises(DatasetError, match="is not a RealBlur list file"):
        dt.discover(data=str(tmp_path / "pairs" / "blur" / "a.png"))


def test_a_run_folder_inside_a_data_folder_is_not_read_as_data(tmp_path: Path) -> None:
    """-o photos/run3: the next run trained on run3's validation sheets as sharp photos, and a
    resumed run on its own (the data it saw changed under it)."""
    from deblurcli.train.config import VaeTrainConfig
    from deblurcli.train.engine import build_data

    photos = tmp_path / "photos"
    for i in range(3):
        write_image(photos / f"p{i}.png", _img(i, 64, 64))
    earlier = photos / "run3"  # another run's folder, below the photos
    write_image(earlier / "validation" / "step-000000002.png", _img(7, 64, 64))
    (earlier / "train_log.csv").write_text("step\n")
    this = photos / "run4"  # this run's own, resumed
    write_image(this / "validation" / "step-000000001.png", _img(8, 64, 64))
    write_image(photos / "trips" / "p3.png", _img(3, 64, 64))  # a folder of photos stays
    config = VaeTrainConfig(sharp_photos=str(photos), output=str(this), val_count=0, crop=32)
    kept = sorted(item.sharp.relative_to(photos).as_posix()
                  for item in build_data(config).train.items)
    assert kept == ["p0.png", "p1.png", "p2.png", "trips/p3.png"]
    # photos kept inside the run's own folder are data all the same
    inside = VaeTrainConfig(sharp_photos=str(photos / "trips"), output=str(photos), val_count=0,
                            crop=32)
    assert len(build_data(inside).train.items) == 1
