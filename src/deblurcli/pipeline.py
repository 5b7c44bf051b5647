"""DeblurPipeline: one image array in, one deblurred image array of the same size out.

The eVAE decoder needs the skip features of the *same* tile, so tiling happens in pixel space
around the whole encode -> one-step UNet -> decode chain (the ``model`` callable). Memory is bounded
by the tile and the batch size, not by the image: outputs are accumulated into preallocated
float32 numpy buffers and only one batch of tiles exists as tensors at a time.

The model is a torch callable (tensors in, tensors out) or an *array model*, whose attribute
``takes_arrays`` is true: numpy arrays in and out, as the ONNX Runtime back-end
(:class:`deblurcli.onnx_backend.OnnxModel`) is. With an array model nothing here imports torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from deblurcli import colorfix
from deblurcli.errors import DeblurcliError
from deblurcli.progress import ProgressFn, report
from deblurcli.tiles import DEFAULT_OVERLAP, DEFAULT_TILE, TilePlan, pad_to_multiple, plan_tiles

if TYPE_CHECKING:
    import torch

ModelFn = Callable[[Any], Any]  # (B, 3, h, w) in [-1, 1] -> the same: tensors, or numpy arrays


class NonFiniteOutputError(DeblurcliError):
    """The model returned NaN or infinite values (typically fp16 overflow in the VAE)."""


def _non_finite_advice(model: ModelFn, dtype) -> str:
    """What to say when ``model`` (its input cast to ``dtype``) returns NaN/inf: half-precision
    overflow, the usual cause, only when some of it runs in half precision."""
    kinds = {str(dtype).rsplit(".", 1)[-1]} if dtype is not None else set()
    parameters = getattr(model, "parameters", None)
    if callable(parameters):
        kinds |= {str(p.dtype).rsplit(".", 1)[-1] for p in parameters()}
    if "float16" in kinds:
        return ("the network produced NaN/inf values (half-precision overflow); use --vae-fp32, "
                "--dtype bf16 or --fp32")
    if "bfloat16" in kinds:
        return "the network produced NaN/inf values in bfloat16; use --fp32"
    return ("the network produced NaN/inf values in float32: the model itself is faulty (its "
            "weights hold or make NaN/inf)")


def default_batch_size(device: torch.device | str) -> int:
    """Tiles per network call when the user gives none: 1 on the CPU (single tiles measured 1.19x
    faster than batches of 4 there, docs/performance.md), 4 on accelerators."""
    kind = getattr(device, "type", None) or str(device).split(":")[0]
    return 1 if kind == "cpu" else 4


def prepare_model(model: torch.nn.Module, *, channels_last: bool = True,
                  compile: bool = False) -> ModelFn:
    """Ready a loaded model for fast inference; returns the callable for :class:`DeblurPipeline`.

    * its parameters stop requiring gradients (no autograd bookkeeping);
    * ``channels_last``: weights in NHWC memory format, which oneDNN (CPU) and cuDNN (GPU,
      tensor cores) convolutions run fastest; pair it with ``DeblurPipeline(channels_last=True)``;
    * ``compile``: wrap the model in ``torch.compile`` (static shapes: each tile-batch shape is
      compiled once, so the first image is much slower and later ones may be faster; on a CPU
      it needs a C++ compiler).

    The model is changed in place (``requires_grad``, memory format).
    """
    import torch

    model.requires_grad_(False)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if compile:
        return torch.compile(model, dynamic=False)
    return model


_SCALES = ("divide 8-bit values by 255 and 16-bit ones by 65535; deblurcli.images.read_image "
           "returns floats in [0, 1]")


class DeblurPipeline:
    """Run a model over an image in overlapping, smoothly blended tiles.

    Steps of :meth:`__call__`:

    1. **pad** the ``(H, W, 3)`` image at the bottom/right to multiples of 8 (reflection);
    2. **plan tiles**: equal-size tiles (multiples of 8), evenly spaced, last one flush with the
       border, each with a separable raised-cosine blending window (see :mod:`deblurcli.tiles`);
    3. per batch of ``batch_size`` tiles: **to tensor** ``(B, 3, h, w)`` in ``[-1, 1]`` on
       ``device``/``dtype`` -> **model** -> **back** to float32 numpy in ``[0, 1]``;
    4. **blend** each tile, multiplied by its window, into float32 output and weight accumulators;
    5. **normalise** by the accumulated weight, **crop** to ``H x W`` and **clip** to ``[0, 1]``;
    6. optionally **colour-fix** the whole image: take its lowest frequencies (Gaussian
       ``color_fix`` px) from the input (:mod:`deblurcli.colorfix`).

    Args:
        model: any callable mapping ``(B, 3, h, w)`` in ``[-1, 1]`` to the same shape (an
            :class:`~deblurcli.models.osdd.OSDDModel`, or a plain function in tests); an array
            model (``model.takes_arrays`` true) gets and returns C-contiguous float32 numpy
            arrays instead of tensors, and ignores ``device``, ``dtype`` and ``channels_last``.
        device: where input tensors are sent (the model must already live there): a
            ``torch.device`` or a name as ``--device`` takes it (``"auto"``, ``"cuda:1"``, ...).
        dtype: dtype of the input tensors (the dtype of the model's first layer, i.e. of the VAE;
            default: the model's ``vae_dtype``, float32 for a model without one): a
            ``torch.dtype`` or its name (``"fp16"``, ``"bf16"``, ...).
        tile: tile side in pixels (rounded up to a multiple of 8); 0 = the whole image at once.
        overlap: pixels shared by neighbouring tiles (the blending band).
        batch_size: tiles per model call.
        channels_last: give the model NHWC-strided input tensors (the layout the image already
            has, so no copy; see :func:`prepare_model`); ``False`` gives contiguous NCHW tensors.
        color_fix: Gaussian sigma in pixels for step 6; 0 turns the colour fix off.
    """

    def __init__(self, model: ModelFn, *, device: str | torch.device = "cpu",
                 dtype: torch.dtype | None = None, tile: int = DEFAULT_TILE,
                 overlap: int = DEFAULT_OVERLAP,
                 batch_size: int = 4, channels_last: bool = True,
                 color_fix: float = 0.0) -> None:
        if tile < 0:
            raise ValueError("tile must be >= 0 (0 = whole image)")
        if overlap < 0:
            raise ValueError("overlap must be >= 0")
        if tile and overlap >= tile:
            raise ValueError(f"overlap ({overlap}) must be smaller than the tile ({tile})")
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if not (math.isfinite(color_fix) and color_fix >= 0):
            raise ValueError(f"color_fix must be >= 0 (0 = off), got {color_fix}")
        self.model = model
        self.takes_arrays = bool(getattr(model, "takes_arrays", False))
        self.tile = tile
        self.overlap = overlap
        self.batch_size = batch_size
        self.color_fix = color_fix
        if self.takes_arrays:
            self.device, self.dtype, self.memory_format = "cpu", None, None
            return
        import torch

        from deblurcli.device import torch_device, torch_dtype

        self.device = torch_device(device)
        if dtype is None:  # a half-precision UNet behind a float32 eVAE takes float32
            dtype = getattr(model, "vae_dtype", torch.float32)
        self.dtype = torch_dtype(dtype)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def plan(self, height: int, width: int) -> TilePlan:
        """The tile plan used for an image of ``height`` x ``width`` pixels (after padding)."""
        padded_h, padded_w = -(-height // 8) * 8, -(-width // 8) * 8
        return plan_tiles(padded_h, padded_w, self.tile, self.overlap)

    def __call__(self, pixels: np.ndarray, progress: Optional[ProgressFn] = None) -> np.ndarray:
        """Deblur a float32 ``(H, W, 3)`` RGB image in ``[0, 1]``; returns the same shape/dtype.

        Emits ``"tiles"`` progress events (done/total tiles of this image). Raises
        :class:`NonFiniteOutputError` if the model returns NaN or infinite values.
        """
        if not isinstance(pixels, np.ndarray):  # a torch tensor: numpy's "Cannot interpret"
            raise TypeError(f"expected a numpy (H, W, 3) array, got {type(pixels).__name__} "
                            "(a (B, 3, H, W) tensor in [-1, 1] is OSDDPipeline's input)")
        if pixels.ndim != 3 or pixels.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) array, got shape {pixels.shape}")
        if not pixels.size:
            raise ValueError(f"the image is empty (shape {pixels.shape})")
        if not np.issubdtype(pixels.dtype, np.floating):
            raise ValueError(f"expected float values in [0, 1], got {pixels.dtype} ({_SCALES})")
        if not np.isfinite(pixels).all():
            raise ValueError("the image holds NaN or infinite values")
        top = float(pixels.max(initial=0.0))
        if top > 1.5:  # 0..255 or 0..65535 floats: the model would see a white image
            raise ValueError(f"expected float values in [0, 1], got values up to {top:g} "
                             f"({_SCALES})")
        height, width = pixels.shape[:2]
        # 1. pad
        padded = pad_to_multiple(np.asarray(pixels, dtype=np.float32))
        # 2. plan tiles
        plan = plan_tiles(padded.shape[0], padded.shape[1], self.tile, self.overlap)
        th, tw = plan.tile_h, plan.tile_w
        out = np.zeros((plan.height, plan.width, 3), dtype=np.float32)
        weight = np.zeros((plan.height, plan.width), dtype=np.float32)
        total = len(plan.tiles)
        report(progress, "tiles", 0, total)
        # one host buffer for the tiles of a batch, reused by every batch
        batch_buf = np.empty((min(self.batch_size, total), th, tw, 3), dtype=np.float32)
        for first in range(0, total, self.batch_size):
            group = plan.tiles[first:first + self.batch_size]
            # 3. [-1, 1] -> model -> [0, 1]
            batch = batch_buf[:len(group)]
            for i, t in enumerate(group):
                batch[i] = padded[t.y:t.y + th, t.x:t.x + tw]
            batch *= 2.0
            batch -= 1.0
            result = self._run_arrays(batch) if self.takes_arrays else self._run_tensors(batch)
            if not np.isfinite(result).all():
                raise NonFiniteOutputError(_non_finite_advice(self.model, self.dtype))
            # 4. blend into the accumulators
            for t, tile_out in zip(group, result, strict=True):
                win = t.window()
                tile_out *= win[:, :, None]  # in place: no per-tile temporary
                out[t.y:t.y + th, t.x:t.x + tw] += tile_out
                weight[t.y:t.y + th, t.x:t.x + tw] += win
            report(progress, "tiles", first + len(group), total)
        # 5. normalise, crop, clip
        out = out[:height, :width]
        out /= weight[:height, :width, None]
        np.clip(out, 0.0, 1.0, out=out)
        # 6. colour fix
        if self.color_fix > 0:
            return colorfix.color_fix(out, pixels, self.color_fix)
        return np.ascontiguousarray(out)

    def _run_tensors(self, batch: np.ndarray) -> np.ndarray:
        """Step 3 with a torch model: ``(B, h, w, 3)`` in ``[-1, 1]`` -> ``(B, h, w, 3)`` float32
        numpy in ``[0, 1]`` (a new array)."""
        import torch

        with torch.inference_mode():
            # (B, h, w, 3) memory seen as (B, 3, h, w): already channels_last
            x = torch.from_numpy(batch).to(self.device).permute(0, 3, 1, 2)
            x = x.to(self.dtype).contiguous(memory_format=self.memory_format)
            y = self.model(x)
            _check_shape(tuple(y.shape), tuple(x.shape))
            return y.float().add(1.0).mul_(0.5).permute(0, 2, 3, 1).cpu().numpy()

    def _run_arrays(self, batch: np.ndarray) -> np.ndarray:
        """Step 3 with an array model (numpy in and out, no torch)."""
        x = np.ascontiguousarray(batch.transpose(0, 3, 1, 2))
        y = np.asarray(self.model(x), dtype=np.float32)
        _check_shape(y.shape, x.shape)
        y += 1.0
        y *= 0.5
        return y.transpose(0, 2, 3, 1)


def _check_shape(got: tuple, expected: tuple) -> None:
    if tuple(got) != tuple(expected):
        raise RuntimeError(f"model returned shape {tuple(got)} for input {tuple(expected)}")
