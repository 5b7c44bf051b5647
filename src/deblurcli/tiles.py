"""Tile planning, smooth blending windows and padding to multiples of 8 (pure numpy functions).

Geometry: the image is padded at the bottom/right to a multiple of 8, then covered by a grid of
equally sized tiles (each side a multiple of 8, so a batch of tiles stacks into one tensor). The
requested tile side is a maximum: along each axis the tiles are shrunk to the smallest side that
covers the image with as many tiles as the maximum needs (1280x720 at 448/32: 6 tiles of 376x448
instead of 6 of 448x448, 16 % fewer pixels to run). Tile starts are evenly spaced, snapped to
multiples of 8 (so every tile's latent grid lines up with its neighbours'), the first tile starts
at 0 and the last one ends flush with the border.

Blending: each tile gets a separable window ``wy(y) * wx(x)``. Along an axis, in the middle of the
band two neighbouring tiles share, one tile's window falls as a raised cosine (``cos²``) while the
other's rises as the complementary ``sin²``; elsewhere a window is 1 (the tile owns the pixel) or 0
(its neighbour does). The windows of an axis therefore sum to exactly 1 everywhere, and so do the
2-D products, so there is no seam and no tile-shaped brightness ripple. (The pipeline still divides
by the accumulated weight, which makes float rounding irrelevant.)
"""

from __future__ import annotations

import math
from itertools import pairwise
from dataclasses import dataclass

import numpy as np

MULTIPLE = 8

#: Default largest tile side and overlap of ``deblur``/``eval`` and :class:`DeblurPipeline`.
#: Fitted (:func:`fit_tile`), 448/32 covers 1280x720 with 6 tiles of 376x448, 1.10x its pixels.
#: Chosen before tiles were fitted, as full squares: 448/32 (1.31x) against 512/64 (1.71x) ran
#: 1.46x faster on the 2-core CPU and, on a trained compact model, moved the output about as much,
#: with no peaks at the tile bands and no loss against the ground truth (docs/performance.md,
#: "Tile settings and quality").
DEFAULT_TILE = 448
DEFAULT_OVERLAP = 32


def round_up(n: int, multiple: int = MULTIPLE) -> int:
    """Smallest multiple of ``multiple`` that is ``>= n``."""
    return -(-n // multiple) * multiple


def pad_to_multiple(pixels: np.ndarray, multiple: int = MULTIPLE) -> np.ndarray:
    """Pad an ``(H, W, C)`` array at the bottom and right to multiples of ``multiple``.

    Uses reflection (no repeated edge row) when the side is longer than the padding, otherwise
    symmetric padding (mirror including the edge, repeated as often as needed; a 1-pixel side is
    simply replicated). Returns the input itself when no padding is needed.
    """
    h, w = pixels.shape[:2]
    ph, pw = round_up(h, multiple) - h, round_up(w, multiple) - w
    out = pixels
    for axis, pad, size in ((0, ph, h), (1, pw, w)):
        if pad == 0:
            continue
        widths = [(0, 0)] * out.ndim
        widths[axis] = (0, pad)
        mode = "reflect" if size > pad else "symmetric"
        out = np.pad(out, widths, mode=mode)
    return out


def tile_starts(length: int, tile: int, overlap: int, multiple: int = MULTIPLE) -> list[int]:
    """Start offsets of tiles of size ``tile`` covering ``[0, length)`` along one axis.

    ``length`` and ``tile`` must be multiples of ``multiple`` with ``tile <= length`` and
    ``0 <= overlap <= tile - multiple``. Starts are evenly spaced, snapped to ``multiple``, begin
    at 0 and end at ``length - tile``; consecutive tiles overlap by at least ``overlap`` pixels
    (up to the snapping to ``multiple`` the overlap is spread evenly).
    """
    if tile <= 0 or length <= 0 or tile % multiple or length % multiple:
        raise ValueError(f"length {length} and tile {tile} must be positive multiples of "
                         f"{multiple}")
    if tile > length:
        raise ValueError(f"tile {tile} is larger than the length {length}")
    if not 0 <= overlap <= tile - multiple:
        raise ValueError(f"overlap {overlap} must be >= 0 and at most the tile {tile} "
                         f"minus {multiple}")
    if tile == length:
        return [0]
    span = length - tile
    max_stride = (tile - overlap) // multiple * multiple
    count = max(2, math.ceil(span / max_stride) + 1)
    while True:  # ends at the latest when every stride is `multiple`
        starts = [int(round(i * span / (count - 1) / multiple)) * multiple for i in range(count)]
        if max(b - a for a, b in pairwise(starts)) <= max_stride:
            return starts
        count += 1


def fit_tile(length: int, tile: int, overlap: int, multiple: int = MULTIPLE) -> int:
    """The tile side to use along an axis of ``length`` px for tiles of at most ``tile`` px.

    Tiles of the full ``tile`` side usually overshoot: 720 px in 448 px tiles overlapping by 32
    takes 2 tiles that share 176 px. This returns the smallest side (a multiple of ``multiple``,
    at most ``tile``) whose :func:`tile_starts` needs no more tiles than ``tile`` itself does, so
    neighbours share about ``overlap`` px (376 px for that axis): fewer pixels to run, and the
    same number of tiles. Sides and overlap as in :func:`tile_starts` (``overlap`` is clamped to
    ``side - multiple``); a ``tile`` of at least ``length`` gives ``length``.
    """
    if tile >= length:
        return length
    count = len(tile_starts(length, tile, min(overlap, tile - multiple), multiple))
    side = max(multiple, round_up(-(-(length + (count - 1) * overlap) // count), multiple))
    while side < tile and len(tile_starts(length, side, min(overlap, side - multiple),
                                          multiple)) > count:
        side += multiple
    return min(side, tile)


def ramp_width(starts: list[int], tile: int) -> int:
    """Width of the blending ramps along an axis: the narrowest band shared by two neighbouring
    tiles, but no wider than the smallest stride (so two ramps never meet). 0 for one tile."""
    if len(starts) < 2:
        return 0
    strides = [b - a for a, b in pairwise(starts)]
    return max(0, min(tile - max(strides), min(strides)))


def axis_windows(starts: list[int], tile: int) -> list[np.ndarray]:
    """One 1-D blending window (float64, length ``tile``) per tile along an axis.

    Between tiles ``i`` and ``i+1`` a ramp of :func:`ramp_width` pixels sits centred in the band
    they share: tile ``i`` falls as ``cos²`` while tile ``i+1`` rises as ``sin²`` of the same
    argument (sampled at pixel centres). Before its rising ramp and after its falling ramp a
    tile's window is 0, between them 1, so the windows of an axis sum to exactly 1 everywhere
    (up to float rounding of ``sin² + cos²``) and every pixel gets a total weight of 1.
    """
    r = ramp_width(starts, tile)
    t = (np.arange(r) + 0.5) / max(r, 1)
    fall = np.cos(0.5 * np.pi * t) ** 2
    rise = 1.0 - fall
    windows = []
    for i, start in enumerate(starts):
        w = np.ones(tile, dtype=np.float64)
        if i > 0:  # ramp shared with the previous tile, in this tile's coordinates
            band = starts[i - 1] + tile - start
            a = (band - r) // 2
            w[:a] = 0.0
            w[a:a + r] = rise
        if i + 1 < len(starts):  # ramp shared with the next tile
            band = start + tile - starts[i + 1]
            a = starts[i + 1] - start + (band - r) // 2
            w[a:a + r] = fall
            w[a + r:] = 0.0
        windows.append(w)
    return windows


@dataclass(frozen=True)
class Tile:
    """One tile: its top-left corner in the padded image and its separable blending window."""

    y: int
    x: int
    wy: np.ndarray
    wx: np.ndarray

    def window(self) -> np.ndarray:
        """The 2-D float32 window ``wy[:, None] * wx[None, :]``."""
        return np.outer(self.wy, self.wx).astype(np.float32)


@dataclass(frozen=True)
class TilePlan:
    """All tiles covering a padded image of ``height`` x ``width`` pixels."""

    height: int
    width: int
    tile_h: int
    tile_w: int
    tiles: tuple[Tile, ...]


def plan_tiles(height: int, width: int, tile: int, overlap: int,
               multiple: int = MULTIPLE) -> TilePlan:
    """Plan the tile grid for a padded image (sides multiples of ``multiple``).

    ``tile=0`` (or a tile at least as large as the image) gives a single tile per axis covering
    it. ``tile`` is rounded up to a multiple of ``multiple`` and is the largest side: each axis
    gets the smallest side that needs no more tiles (:func:`fit_tile`). ``overlap`` is clamped to
    ``tile - multiple`` (tile starts sit on multiples of ``multiple``).
    """
    if height % multiple or width % multiple or height <= 0 or width <= 0:
        raise ValueError(f"padded size {height}x{width} must be positive multiples of {multiple}")
    if tile < 0 or overlap < 0:
        raise ValueError("tile and overlap must be >= 0")
    size = round_up(tile, multiple) if tile else max(height, width)
    tile_h, tile_w = fit_tile(height, size, overlap, multiple), fit_tile(width, size, overlap,
                                                                           multiple)
    ys = tile_starts(height, tile_h, min(overlap, tile_h - multiple), multiple)
    xs = tile_starts(width, tile_w, min(overlap, tile_w - multiple), multiple)
    wys, wxs = axis_windows(ys, tile_h), axis_windows(xs, tile_w)
    tiles = tuple(Tile(y, x, wy, wx) for y, wy in zip(ys, wys, strict=True)
                  for x, wx in zip(xs, wxs, strict=True))
    return TilePlan(height, width, tile_h, tile_w, tiles)


def weight_sum(plan: TilePlan) -> np.ndarray:
    """Sum of all tiles' windows over the padded image (float64); 1 everywhere by construction."""
    total = np.zeros((plan.height, plan.width), dtype=np.float64)
    for t in plan.tiles:
        total[t.y:t.y + plan.tile_h, t.x:t.x + plan.tile_w] += np.outer(t.wy, t.wx)
    return total
