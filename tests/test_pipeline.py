"""DeblurPipeline: tiled == untiled, seamless, exact geometry, determinism, bounded batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from deblurcli.pipeline import DeblurPipeline, NonFiniteOutputError


def identity(x: torch.Tensor) -> torch.Tensor:
    return x.clone()


def pointwise(x: torch.Tensor) -> torch.Tensor:
    return torch.tanh(1.5 * x) * 0.9 - 0.05


def make_conv(seed: int = 0, pad_mode: str = "reflect"):
    """A fixed 3x3 RGB->RGB conv (receptive field radius 1), normalised to keep flat images flat."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.rand(3, 3, 3, 3, generator=gen)
    weight = weight / weight.sum(dim=(1, 2, 3), keepdim=True)  # each output: weighted mean

    def conv(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(x, (1, 1, 1, 1), mode=pad_mode), weight.to(x.dtype))

    return conv


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((h, w, 3), dtype=np.float32)


@pytest.mark.parametrize("shape,tile,overlap", [
    ((37, 53), 16, 8), ((1, 9), 16, 8), ((9, 1), 8, 0), ((64, 64), 24, 16), ((20, 30), 512, 64),
    ((33, 17), 0, 64),
])
def test_identity_model_returns_the_input_with_exact_geometry(shape, tile, overlap):
    img = _image(*shape)
    out = DeblurPipeline(identity, tile=tile, overlap=overlap, batch_size=3)(img)
    assert out.shape == img.shape and out.dtype == np.float32
    np.testing.assert_allclose(out, img, rtol=0, atol=1e-6)


def test_pointwise_model_tiled_equals_untiled():
    img = _image(45, 70, seed=1)
    whole = DeblurPipeline(pointwise, tile=0)(img)
    tiled = DeblurPipeline(pointwise, tile=16, overlap=8, batch_size=2)(img)
    np.testing.assert_allclose(tiled, whole, rtol=0, atol=1e-6)


def test_conv_model_tiled_close_to_untiled():
    """A 3x3 conv sees reflected tile borders instead of the neighbours' pixels. Those wrong
    border pixels only get the small tail weight of the blending ramp, so the tiled result stays
    within 2e-3 of the untiled one (measured: 5.1e-4 max) and equals it (1e-6) outside the
    blending bands, i.e. for most pixels."""
    img = _image(64, 80, seed=2)
    conv = make_conv()
    whole = DeblurPipeline(conv, tile=0)(img)
    tiled = DeblurPipeline(conv, tile=32, overlap=16, batch_size=4)(img)
    diff = np.abs(tiled - whole)
    assert diff.max() < 2e-3
    assert np.median(diff) < 1e-6


def test_flat_image_stays_flat_no_seams():
    img = np.full((70, 90, 3), 0.4, dtype=np.float32)
    out = DeblurPipeline(make_conv(), tile=32, overlap=16)(img)
    np.testing.assert_allclose(out, 0.4, rtol=0, atol=1e-6)


def test_output_is_clipped_to_unit_range():
    out = DeblurPipeline(lambda x: x * 3.0, tile=16, overlap=8)(_image(20, 20))
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert out.min() == 0.0 and out.max() == 1.0


def test_deterministic_bytes_on_cpu():
    img = _image(40, 56, seed=3)
    conv = make_conv(seed=5)
    a = DeblurPipeline(conv, tile=24, overlap=8, batch_size=2)(img)
    b = DeblurPipeline(conv, tile=24, overlap=8, batch_size=2)(img)
    assert a.tobytes() == b.tobytes()


def test_batches_are_bounded_stackable_and_under_inference_mode():
    seen = []

    def spy(x: torch.Tensor) -> torch.Tensor:
        seen.append((tuple(x.shape), x.dtype, torch.is_inference_mode_enabled(),
                     float(x.min()), float(x.max())))
        return x

    img = _image(50, 70)
    pipe = DeblurPipeline(spy, tile=24, overlap=8, batch_size=3)
    pipe(img)
    n_tiles = len(pipe.plan(50, 70).tiles)
    assert sum(s[0][0] for s in seen) == n_tiles
    for shape, dtype, inference, lo, hi in seen:
        assert shape[0] <= 3 and shape[1:] == (3, 24, 24)
        assert dtype == torch.float32 and inference
        assert -1.0 <= lo and hi <= 1.0  # model input in [-1, 1]
    assert min(s[3] for s in seen) < -0.9 and max(s[4] for s in seen) > 0.9


def test_input_dtype_is_passed_to_the_model():
    dtypes = []

    def spy(x):
        dtypes.append(x.dtype)
        return x

    out = DeblurPipeline(spy, dtype=torch.bfloat16, tile=0)(_image(16, 16))
    assert dtypes == [torch.bfloat16]
    np.testing.assert_allclose(out, _image(16, 16), atol=1e-2)


def test_the_input_dtype_defaults_to_the_models_evae_dtype():
    """It defaulted to float32 whatever the model, so the README's example passed the UNet's
    dtype, which rounds the input to half precision before a float32 eVAE."""
    class Model:
        vae_dtype = torch.bfloat16

        def __call__(self, x):
            dtypes.append(x.dtype)
            return x

    dtypes = []
    DeblurPipeline(Model(), tile=0)(_image(16, 16))
    DeblurPipeline(Model(), tile=0, dtype="fp32")(_image(16, 16))  # given: it wins
    DeblurPipeline(lambda x: dtypes.append(x.dtype) or x, tile=0)(_image(16, 16))
    assert dtypes == [torch.bfloat16, torch.float32, torch.float32]


def test_progress_reports_tiles():
    events = []
    pipe = DeblurPipeline(identity, tile=16, overlap=8, batch_size=4)
    pipe(_image(40, 40), progress=events.append)
    assert {e.stage for e in events} == {"tiles"}
    total = len(pipe.plan(40, 40).tiles)
    assert events[0].done == 0 and events[-1].done == total == events[-1].total
    assert [e.done for e in events] == sorted(e.done for e in events)


def test_nan_output_is_a_clear_error_that_blames_half_precision_only_when_it_ran():
    import torch

    class Half(torch.nn.Module):
        def __init__(self, dtype) -> None:
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones((), dtype=dtype))

        def forward(self, x):
            return (x / 0.0).float()

    with pytest.raises(NonFiniteOutputError, match="faulty"):  # float32: not an overflow
        DeblurPipeline(lambda x: x / 0.0, tile=0)(_image(8, 8))
    with pytest.raises(NonFiniteOutputError, match="overflow.*--vae-fp32"):
        DeblurPipeline(Half(torch.float16), tile=0)(_image(8, 8))
    with pytest.raises(NonFiniteOutputError, match="in bfloat16; use --fp32"):
        DeblurPipeline(Half(torch.float32), tile=0, dtype=torch.bfloat16)(_image(8, 8))


def test_bad_arguments_and_bad_model_output():
    with pytest.raises(ValueError):
        DeblurPipeline(identity, tile=16, overlap=16)
    with pytest.raises(ValueError):
        DeblurPipeline(identity, batch_size=0)
    with pytest.raises(ValueError):
        DeblurPipeline(identity)(np.zeros((8, 8), np.float32))
    with pytest.raises(RuntimeError, match="shape"):
        DeblurPipeline(lambda x: x[:, :, :4], tile=0)(_image(8, 8))


def test_color_fix_removes_a_colour_cast_and_keeps_the_models_detail():
    from deblurcli.colorfix import lowpass

    image = _image(40, 56) * 0.6 + 0.2
    cast = DeblurPipeline(lambda x: x + 0.2, tile=16, overlap=8)  # +0.1 in [0, 1] units
    assert np.abs(cast(image) - image).mean() == pytest.approx(0.1, abs=1e-5)
    fixed = DeblurPipeline(lambda x: x + 0.2, tile=16, overlap=8, color_fix=3.0)(image)
    assert np.abs(fixed - image).max() < 1e-5  # a uniform shift is all low frequency
    # a sharpening model: the fix keeps its high frequencies and the input's low ones
    sharpen = make_conv(1)
    plain = DeblurPipeline(lambda x: 2 * x - sharpen(x), tile=0)(image)
    fixed = DeblurPipeline(lambda x: 2 * x - sharpen(x), tile=0, color_fix=4.0)(image)
    high = plain - lowpass(plain, 4.0)
    assert np.abs((fixed - lowpass(fixed, 4.0)) - high)[8:-8, 8:-8].max() < 0.05
    assert np.abs(lowpass(fixed, 4.0) - lowpass(image, 4.0))[8:-8, 8:-8].max() < 0.05
    for bad in (-1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="color_fix"):
            DeblurPipeline(identity, color_fix=bad)


class ArrayConv:
    """The 3x3 conv of :func:`make_conv` as an array model: numpy arrays in and out."""

    takes_arrays = True

    def __init__(self) -> None:
        self.conv, self.seen = make_conv(seed=3), []

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.seen.append((type(x), x.dtype, x.shape, x.flags["C_CONTIGUOUS"]))
        return self.conv(torch.from_numpy(x)).numpy()


def test_an_array_model_gets_numpy_and_gives_the_tensor_models_result():
    img = _image(50, 70, seed=4)
    model = ArrayConv()
    arrays = DeblurPipeline(model, tile=24, overlap=8, batch_size=2, channels_last=True)(img)
    tensors = DeblurPipeline(model.conv, tile=24, overlap=8, batch_size=2,
                             channels_last=False)(img)
    assert arrays.shape == img.shape and arrays.dtype == np.float32
    np.testing.assert_allclose(arrays, tensors, rtol=0, atol=1e-6)
    assert {seen[:2] for seen in model.seen} == {(np.ndarray, np.dtype(np.float32))}
    assert all(seen[3] and seen[2][1] == 3 for seen in model.seen)  # (B, 3, h, w), C order


def test_integer_or_non_finite_input_is_refused_with_what_to_do():
    """A uint8 photo ran silently as values in [0, 255]; a NaN pixel was blamed on half
    precision."""
    pipe = DeblurPipeline(identity, tile=16, overlap=8)
    with pytest.raises(ValueError, match="expected float values in \\[0, 1\\], got uint8"):
        pipe((_image(8, 8) * 255).astype(np.uint8))
    broken = _image(8, 8)
    broken[3, 3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        pipe(broken)
    assert pipe(_image(8, 8).astype(np.float64)).dtype == np.float32
    # 16-bit values were told to be divided by 255; floats of 0..255 (the usual slip with
    # np.asarray(Image.open(...), dtype=np.float32)) ran as a white image
    with pytest.raises(ValueError, match="16-bit ones by 65535"):
        pipe((_image(8, 8) * 65535).astype(np.uint16))
    with pytest.raises(ValueError, match="got values up to 255 .*divide 8-bit values by 255"):
        pipe(np.full((8, 8, 3), 255.0, np.float32))


def test_a_tensor_or_an_empty_image_is_refused_in_the_callers_terms():
    """A torch tensor failed inside numpy ('Cannot interpret torch.float32 as a data type'); an
    empty image spoke of a padded size 0x8 the caller never gave."""
    pipe = DeblurPipeline(identity, tile=16, overlap=8)
    with pytest.raises(TypeError, match="expected a numpy \\(H, W, 3\\) array, got Tensor"):
        pipe(torch.rand(8, 8, 3))
    with pytest.raises(ValueError, match="the image is empty \\(shape \\(0, 5, 3\\)\\)"):
        pipe(np.zeros((0, 5, 3), np.float32))
