"""Blur synthesis: trajectories, kernels, linear-light convolution, alignment, noise, frame averaging."""

from __future__ import annotations

import numpy as np
import pytest
from skimage import data

from deblurcli.synth import (
    NO_NOISE,
    BlurParams,
    TrajectoryParams,
    average_frames,
    blur_image,
    blur_region,
    degrade,
    frame_windows,
    kernel_centroid,
    kernel_from_trajectory,
    linear_to_srgb,
    make_trajectory,
    random_blur_pair,
    sample_kernel,
    sample_seed,
    srgb_to_linear,
)
from deblurcli.synth.blur import NoiseRanges


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return (data.astronaut()[100:164, 180:244] / 255.0).astype(np.float32)


def test_kernels_are_normalised_non_negative_and_centred():
    for i in range(20):
        k, meta = sample_kernel(np.random.default_rng(i))
        assert k.dtype == np.float32 and k.ndim == 2
        assert k.shape[0] == k.shape[1] and k.shape[0] % 2 == 1 and k.shape[0] <= 65
        assert (k >= 0).all()
        assert abs(float(k.sum(dtype=np.float64)) - 1.0) < 1e-5
        cy, cx = kernel_centroid(k)
        assert abs(cy) < 1e-3 and abs(cx) < 1e-3
        assert meta["size"] == k.shape[0]


def test_same_seed_same_kernel_different_seed_differs():
    a, ma = sample_kernel(np.random.default_rng(42))
    b, mb = sample_kernel(np.random.default_rng(42))
    c, _ = sample_kernel(np.random.default_rng(43))
    np.testing.assert_array_equal(a, b)
    assert ma == mb
    assert a.shape != c.shape or not np.array_equal(a, c)


def test_trajectory_has_constant_speed_and_requested_length():
    p = TrajectoryParams(
        length=30.0,
        samples=400,
        anxiety=0.1,
        centripetal=0.5,
        shake=8.0,
        reversal_prob=0.2,
        angle=0.3,
    )
    x = make_trajectory(p, np.random.default_rng(0))
    steps = np.abs(np.diff(x))
    np.testing.assert_allclose(steps, 30.0 / 399, rtol=1e-9)
    straight = make_trajectory(
        TrajectoryParams(20.0, 100, 0.0, 0.5, 8.0, 0.2, 0.0), np.random.default_rng(0)
    )
    np.testing.assert_allclose(straight.real, np.linspace(0, 20, 100), atol=1e-9)
    np.testing.assert_allclose(straight.imag, 0, atol=1e-9)


def test_horizontal_line_kernel_and_exposure_and_size_bound():
    line = np.linspace(0, 10, 101).astype(np.complex128)
    k, _ = kernel_from_trajectory(line)
    assert k.shape == (13, 13) and np.count_nonzero(k.sum(axis=1)) == 1  # one row only
    half, _ = kernel_from_trajectory(line, exposure=0.5)
    assert np.count_nonzero(half) < np.count_nonzero(k)
    long_line = np.linspace(0, 200, 201).astype(np.complex128)
    big, bmeta = kernel_from_trajectory(long_line, max_size=21)
    assert big.shape == (21, 21) and bmeta["scale"] < 1
    dot, _ = kernel_from_trajectory(np.zeros(5, np.complex128))
    assert dot.shape == (1, 1) and dot[0, 0] == 1


def test_delta_kernel_returns_input_exactly(photo):
    delta = np.zeros((5, 5), np.float32)
    delta[2, 2] = 1
    np.testing.assert_array_equal(blur_image(photo, delta), photo)
    # the convolution path itself is also (numerically) an identity for a delta
    almost = delta.copy()
    almost[0, 0] = 1e-12
    np.testing.assert_allclose(blur_image(photo, almost / almost.sum()), photo, atol=2e-5)


def test_fft_convolution_matches_direct_sum():
    from scipy.signal import convolve2d

    from deblurcli.synth.blur import convolve_valid

    rng = np.random.default_rng(0)
    region = rng.random((23, 30, 2)).astype(np.float32)
    k = rng.random((5, 7)).astype(np.float32)
    got = convolve_valid(region, k)
    for c in range(2):
        np.testing.assert_allclose(
            got[..., c], convolve2d(region[..., c], k, mode="valid"), rtol=1e-4, atol=1e-5
        )


def test_srgb_linear_round_trip():
    x = np.linspace(0, 1, 1001, dtype=np.float32)
    np.testing.assert_allclose(linear_to_srgb(srgb_to_linear(x)), x, atol=2e-6)


def _high_freq_energy(img: np.ndarray) -> float:
    g = img.mean(axis=2)
    return float((np.diff(g, axis=0) ** 2).sum() + (np.diff(g, axis=1) ** 2).sum())


def test_blur_lowers_high_frequency_energy(photo):
    params = BlurParams(noise=NO_NOISE)
    for seed in range(3):
        blurred, k, _ = random_blur_pair(photo, np.random.default_rng(seed), params)
        assert blurred.shape == photo.shape and blurred.dtype == np.float32
        assert 0.0 <= blurred.min() and blurred.max() <= 1.0
        if k.shape[0] > 1:
            assert _high_freq_energy(blurred) < 0.8 * _high_freq_energy(photo)


def test_symmetric_kernel_does_not_shift_content():
    img = np.zeros((64, 64, 3), np.float32)
    img[20:28, 36:44] = 1.0  # off-centre square
    k = np.zeros((9, 9), np.float32)
    k[4, :] = 1.0  # horizontal box blur, centred
    k /= k.sum()
    blurred = blur_image(img, k)

    def centroid(a):
        w = srgb_to_linear(a).mean(axis=2)
        ys, xs = np.indices(w.shape)
        return (ys * w).sum() / w.sum(), (xs * w).sum() / w.sum()

    cy0, cx0 = centroid(img)
    cy1, cx1 = centroid(blurred)
    assert abs(cy0 - cy1) < 1e-3 and abs(cx0 - cx1) < 1e-3
    assert blurred[24, 30:50, 0].max() < 1.0  # but it did blur horizontally


def test_borders_are_not_darkened():
    flat = np.full((32, 32, 3), 0.6, np.float32)
    k, _ = sample_kernel(np.random.default_rng(5), BlurParams())
    np.testing.assert_allclose(blur_image(flat, k), flat, atol=1e-4)


def test_region_uses_real_neighbours(photo):
    k, _ = sample_kernel(np.random.default_rng(1))
    whole = blur_image(photo, k)
    part = blur_region(photo, (16, 16, 32, 32), k)
    np.testing.assert_allclose(part, whole[16:48, 16:48], atol=1e-5)
    fast = blur_region(photo, (16, 16, 32, 32), k, linear=srgb_to_linear(photo))
    np.testing.assert_array_equal(fast, part)


def test_degrade_clips_and_is_seeded(photo):
    noisy = NoiseRanges(
        gaussian_prob=1.0, gaussian_sigma=(0.2, 0.2), poisson_prob=1.0, jpeg_prob=1.0
    )
    a, meta = degrade(photo, np.random.default_rng(3), noisy)
    b, _ = degrade(photo, np.random.default_rng(3), noisy)
    np.testing.assert_array_equal(a, b)
    assert (
        a.min() >= 0
        and a.max() <= 1
        and {"gaussian_sigma", "poisson_peak", "jpeg_quality"} <= set(meta)
    )
    clean, meta0 = degrade(photo, np.random.default_rng(3), NO_NOISE)
    np.testing.assert_array_equal(clean, photo)
    assert meta0 == {}


def test_average_of_identical_frames_is_the_frame(photo):
    blurred, sharp = average_frames([photo] * 7)
    np.testing.assert_allclose(blurred, photo, atol=2e-6)
    np.testing.assert_array_equal(np.rint(blurred * 255), np.rint(photo * 255))
    np.testing.assert_array_equal(sharp, photo)


def test_average_is_in_linear_light():
    black, white = np.zeros((2, 2, 3), np.float32), np.ones((2, 2, 3), np.float32)
    blurred, sharp = average_frames([black, white, white])
    np.testing.assert_allclose(blurred, linear_to_srgb(np.full((2, 2, 3), 2 / 3)), atol=1e-6)
    np.testing.assert_array_equal(sharp, white)
    with pytest.raises(ValueError, match="odd number of frames"):  # no middle frame
        average_frames([black, white, white, white])


def test_frame_windows():
    wins = frame_windows(40, np.random.default_rng(0), n_range=(7, 13), step=13)
    assert [w.start for w in wins] == [0, 13, 26]
    assert all(w.length % 2 == 1 and 7 <= w.length <= 13 and w.start + w.length <= 40 for w in wins)
    assert wins[0].middle == wins[0].start + wins[0].length // 2
    assert frame_windows(5, np.random.default_rng(0), n_range=(7, 13)) == []
    again = frame_windows(40, np.random.default_rng(0), n_range=(7, 13), step=13)
    assert again == wins


def test_sample_seed_is_stable():
    assert sample_seed(0, "a/b.png", 3, 1) == sample_seed(0, "a/b.png", 3, 1)
    assert sample_seed(0, "a/b.png", 3, 1) != sample_seed(1, "a/b.png", 3, 1)
    assert sample_seed(0, "a/b.png", 3, 1) != sample_seed(0, "a/b.png", 3, 0)
    assert 0 <= sample_seed(7, "x") < 2**63
