"""colorfix: Gaussian low-pass equal to scipy's, and the low-frequency swap it performs."""

from __future__ import annotations

import numpy as np
import pytest

from deblurcli.colorfix import axis_kernel, color_fix, gaussian_kernel1d, lowpass


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((h, w, 3), dtype=np.float32)


@pytest.mark.parametrize("shape,sigma", [((31, 47), 2.0), ((12, 9), 4.0), ((64, 40), 0.7),
                                         # kernels wider than the image: folded onto it
                                         ((7, 13), 3.0), ((7, 13), 13.0), ((1, 5), 3.0),
                                         ((20, 3), 2.9), ((5, 9), 9.0)])
def test_lowpass_equals_scipy_gaussian_filter(shape, sigma):
    ndimage = pytest.importorskip("scipy.ndimage")
    image = _image(*shape)
    expected = ndimage.gaussian_filter(image.astype(np.float64), (sigma, sigma, 0),
                                       mode="reflect", truncate=4.0)
    got = lowpass(image, sigma)
    assert got.dtype == np.float32 and got.shape == image.shape
    np.testing.assert_allclose(got, expected, atol=2e-6)


def test_a_sigma_far_wider_than_the_image_costs_no_more_than_its_mean():
    """--color-fix 200 took 25 s on a 7x13 photo (the kernel and padding grew with sigma), and
    1e9 ran out of memory."""
    image = _image(7, 13)
    for sigma in (200.0, 1e9):
        got = lowpass(image, sigma)
        np.testing.assert_allclose(got, np.broadcast_to(image.mean(axis=(0, 1)), image.shape),
                                   atol=1e-6)
    assert len(axis_kernel(1e9, 13)) == 27 and len(axis_kernel(2.0, 13)) == 17


def test_kernel_is_normalised_and_symmetric():
    k = gaussian_kernel1d(2.5)
    assert len(k) == 21 and k.sum() == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_array_equal(k, k[::-1])
    with pytest.raises(ValueError):
        gaussian_kernel1d(0.0)


def test_color_fix_swaps_low_frequencies_and_leaves_inputs_alone():
    source = _image(48, 64, seed=1)
    output = np.clip(source * 0.8 + 0.15, 0, 1)  # a colour/contrast drift of the model
    before = output.copy()
    fixed = color_fix(output, source, 3.0)
    np.testing.assert_array_equal(output, before)  # not modified in place
    inner = (slice(12, -12), slice(12, -12))
    drift = np.abs(lowpass(output, 3.0) - lowpass(source, 3.0))[inner].mean()
    left = np.abs(lowpass(fixed, 3.0) - lowpass(source, 3.0))[inner].mean()
    assert left < drift / 20
    # the same image is left as it is
    np.testing.assert_allclose(color_fix(source, source, 3.0), source, atol=1e-6)
    assert fixed.min() >= 0.0 and fixed.max() <= 1.0


def test_color_fix_rejects_bad_arguments():
    with pytest.raises(ValueError, match="shape"):
        color_fix(_image(8, 8), _image(8, 9), 2.0)
    for sigma in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="sigma"):
            color_fix(_image(8, 8), _image(8, 8), sigma)


def test_lowpass_filters_any_number_of_channels():
    ndimage = pytest.importorskip("scipy.ndimage")
    image = np.random.default_rng(5).random((16, 20, 5), dtype=np.float32)
    expected = ndimage.gaussian_filter(image.astype(np.float64), (1.5, 1.5, 0), mode="reflect",
                                       truncate=4.0)
    np.testing.assert_allclose(lowpass(image, 1.5), expected, atol=2e-6)
