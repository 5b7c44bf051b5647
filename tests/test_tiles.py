"""Tile geometry, padding and blending windows (pure numpy, no model)."""

from __future__ import annotations

import numpy as np
import pytest

from deblurcli.tiles import (
    axis_windows,
    pad_to_multiple,
    fit_tile,
    plan_tiles,
    ramp_width,
    round_up,
    tile_starts,
    weight_sum,
)


@pytest.mark.parametrize("n,expected", [(1, 8), (8, 8), (9, 16), (37, 40), (53, 56)])
def test_round_up(n, expected):
    assert round_up(n) == expected


@pytest.mark.parametrize("shape", [(37, 53), (1, 9), (9, 1), (1, 1), (3, 17), (16, 8)])
def test_pad_to_multiple_geometry_and_content(shape):
    rng = np.random.default_rng(0)
    img = rng.random((*shape, 3), dtype=np.float32)
    padded = pad_to_multiple(img)
    assert padded.shape == (round_up(shape[0]), round_up(shape[1]), 3)
    np.testing.assert_array_equal(padded[: shape[0], : shape[1]], img)


def test_pad_reflects_without_repeating_the_edge():
    img = np.arange(37 * 5 * 3, dtype=np.float32).reshape(37, 5, 3)
    padded = pad_to_multiple(img)
    np.testing.assert_array_equal(padded[37, :5], img[35])  # reflection about row 36
    np.testing.assert_array_equal(padded[38, :5], img[34])
    np.testing.assert_array_equal(padded[:37, 5], img[:, 3])


def test_pad_falls_back_for_one_pixel_sides():
    img = np.full((1, 9, 3), 0.25, dtype=np.float32)
    img[0, 8] = 0.75
    padded = pad_to_multiple(img)
    assert padded.shape == (8, 16, 3)
    np.testing.assert_array_equal(padded[7], padded[0])  # 1-px side replicated


def test_pad_is_a_no_op_for_multiples_of_8():
    img = np.zeros((16, 24, 3), np.float32)
    assert pad_to_multiple(img) is img


@pytest.mark.parametrize("length,tile,overlap", [
    (512, 64, 16), (1000, 256, 64), (6000, 512, 64), (48, 16, 8), (64, 16, 0), (520, 512, 64),
    (400, 64, 56),
])
def test_tile_starts_cover_evenly_and_flush(length, tile, overlap):
    starts = tile_starts(length, tile, overlap)
    assert starts[0] == 0 and starts[-1] == length - tile
    assert all(s % 8 == 0 for s in starts)
    strides = np.diff(starts)
    assert (strides > 0).all()
    assert (tile - strides >= overlap).all()  # overlap is at least what was asked
    assert strides.max() - strides.min() <= 8  # evenly spaced up to the 8-px snapping


def test_tile_starts_single_tile_and_errors():
    assert tile_starts(64, 64, 16) == [0]
    with pytest.raises(ValueError):
        tile_starts(64, 128, 0)  # tile larger than the length
    with pytest.raises(ValueError):
        tile_starts(64, 16, 12)  # overlap > tile - 8
    with pytest.raises(ValueError):
        tile_starts(60, 16, 0)  # not a multiple of 8


@pytest.mark.parametrize("height,width,tile,overlap", [
    (40, 56, 16, 8), (64, 64, 32, 16), (96, 48, 24, 16), (200, 136, 64, 48), (88, 8, 16, 0),
    (16, 16, 64, 8), (48, 40, 0, 8), (256, 256, 64, 56),
])
def test_blend_weights_sum_to_one_everywhere(height, width, tile, overlap):
    plan = plan_tiles(height, width, tile, overlap)
    total = weight_sum(plan)
    assert total.shape == (height, width)
    np.testing.assert_allclose(total, 1.0, rtol=0, atol=1e-12)


def test_windows_are_smooth_complementary_ramps():
    starts = tile_starts(112, 48, 16)
    windows = axis_windows(starts, 48)
    r = ramp_width(starts, 48)
    assert r >= 16
    for w in windows:
        assert ((w >= 0) & (w <= 1)).all()
        assert np.abs(np.diff(w)).max() <= np.pi / (2 * r) + 1e-12  # no jump: a ramp of width r
    assert windows[0][0] == 1.0 and windows[-1][-1] == 1.0  # borders owned by one tile


def test_plan_tiles_whole_image_and_tile_larger_than_image():
    whole = plan_tiles(40, 56, 0, 8)
    assert len(whole.tiles) == 1 and (whole.tile_h, whole.tile_w) == (40, 56)
    big = plan_tiles(16, 24, 512, 64)
    assert len(big.tiles) == 1 and (big.tile_h, big.tile_w) == (16, 24)
    mixed = plan_tiles(16, 200, 64, 16)  # short side: one full-height tile per column
    assert mixed.tile_h == 16 and mixed.tile_w == 64 and len(mixed.tiles) >= 4
    rounded = plan_tiles(64, 64, 20, 8)  # tile rounded up to a multiple of 8
    assert rounded.tile_h == 24


def test_every_tile_has_the_same_size_and_stays_inside():
    plan = plan_tiles(136, 200, 48, 16)
    for t in plan.tiles:
        assert 0 <= t.y <= plan.height - plan.tile_h and 0 <= t.x <= plan.width - plan.tile_w
        assert t.window().shape == (plan.tile_h, plan.tile_w)
        assert t.window().dtype == np.float32


@pytest.mark.parametrize("length,tile,overlap", [
    (720, 448, 32), (1280, 448, 32), (3000, 448, 32), (4000, 512, 64), (64, 24, 8), (200, 64, 16),
    (448, 448, 32), (456, 448, 32), (96, 48, 40),
])
def test_fit_tile_keeps_the_tile_count_with_the_smallest_side(length, tile, overlap):
    side = fit_tile(length, tile, overlap)
    full = len(tile_starts(length, tile, min(overlap, tile - 8)))
    assert side % 8 == 0 and side <= tile
    starts = tile_starts(length, side, min(overlap, side - 8))
    assert len(starts) == full
    if side > 8:  # one step smaller needs more tiles
        assert len(tile_starts(length, side - 8, min(overlap, side - 16))) > full


def test_plan_tiles_fits_1280x720_in_six_tiles_of_376x448():
    plan = plan_tiles(720, 1280, 448, 32)
    assert (len(plan.tiles), plan.tile_h, plan.tile_w) == (6, 376, 448)
    assert fit_tile(720, 1024, 32) == 720  # one tile: the whole side
