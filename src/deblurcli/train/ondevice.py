"""Training pairs made on the accelerator, so that no step waits for disk or CPU decoding.

The sharp photos and the clips of consecutive video frames are decoded once and kept in device
memory as ``uint8``. Every micro-batch is then made on the device from a :class:`BatchPlan`
(:mod:`deblurcli.train.batchplan`, drawn on the CPU, optionally ahead of time in worker
processes):

* **synthetic** samples: a crop of a photo plus the margin its kernel needs (the photo's real
  neighbouring pixels, reflected past its edge), decoded to linear light, convolved with a fresh
  camera-shake kernel by FFT ("valid" convolution, so sharp and blurry stay aligned), Poisson shot
  noise in linear light and Gaussian noise in sRGB -- the same model as ``deblurcli synth``
  (:mod:`deblurcli.synth.blur`; its optional JPEG step is not applied here);
* **real** samples: an odd window of 7-13 consecutive frames averaged in linear light, the middle
  frame being the target (:mod:`deblurcli.synth.frames`).

:class:`DeviceBatchSource` yields the same ``{"blur", "sharp", "position"}`` batches as the
file-based loader, in ``[-1, 1]``, already on the device.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from deblurcli.train.batchplan import BatchPlan, PlanSettings, Shapes, plan_batch, stack_kernels


def srgb_to_linear(x: torch.Tensor) -> torch.Tensor:
    """sRGB values in ``[0, 1]`` -> linear light (IEC 61966-2-1), as ``synth.blur`` does."""
    return torch.where(x <= 0.04045, x / 12.92,
                       ((x.clamp(min=0.04045) + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(y: torch.Tensor) -> torch.Tensor:
    """Linear light -> sRGB values (clipped to ``[0, 1]`` first)."""
    y = y.clamp(0.0, 1.0)
    return torch.where(y <= 0.0031308, y * 12.92,
                       1.055 * y.clamp(min=0.0031308) ** (1.0 / 2.4) - 0.055)


def reflect_index(start: int, count: int, size: int, device) -> torch.Tensor:
    """Indices ``start … start + count − 1`` folded into ``0 … size − 1`` by reflection without
    repeating the edge (numpy's ``mode="reflect"``), repeatedly if needed."""
    idx = torch.arange(start, start + count, device=device)
    if size == 1:
        return torch.zeros_like(idx)
    period = 2 * size - 2
    idx = torch.remainder(idx, period)
    return torch.where(idx >= size, period - idx, idx)


def blur_valid(regions: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """'Valid' FFT convolution of ``(B, C, c + K − 1, c + K − 1)`` regions with ``(B, K, K)``
    kernels -> ``(B, C, c, c)``, the batched form of ``synth.blur.convolve_valid``."""
    n, k = regions.shape[-1], kernels.shape[-1]
    spec = torch.fft.rfft2(regions.float(), s=(n, n))
    spec = spec * torch.fft.rfft2(kernels.float(), s=(n, n))[:, None]
    full = torch.fft.irfft2(spec, s=(n, n))
    return full[..., k - 1:n, k - 1:n]


def _augment(x: torch.Tensor, hflip: bool, vflip: bool, turns: int) -> torch.Tensor:
    if hflip:
        x = x.flip(-1)
    if vflip:
        x = x.flip(-2)
    return torch.rot90(x, turns, dims=(-2, -1)) if turns else x


def realise(plan: BatchPlan, photos: Sequence[torch.Tensor], clips: Sequence[torch.Tensor]) \
        -> tuple[torch.Tensor, torch.Tensor]:
    """Make the ``(blurry, sharp)`` pair of a plan from ``uint8`` ``(3, H, W)`` photos and
    ``(T, 3, H, W)`` clips on one device; both ``(B, 3, c, c)`` float32 sRGB in ``[0, 1]``."""
    device = (photos[0] if photos else clips[0]).device
    c = plan.crop
    blurs: list[torch.Tensor | None] = [None] * len(plan.samples)
    sharps: list[torch.Tensor | None] = [None] * len(plan.samples)
    synthetic = [j for j, s in enumerate(plan.samples) if not s.real]
    generator = torch.Generator(device=device).manual_seed(plan.noise_seed)
    if synthetic:
        kernels = torch.from_numpy(stack_kernels([plan.samples[j].kernel for j in synthetic]))
        kernels = kernels.to(device, non_blocking=True)
        r = kernels.shape[-1] // 2
        regions = []
        for j in synthetic:
            s = plan.samples[j]
            photo = photos[s.source]
            rows = reflect_index(s.top - r, c + 2 * r, photo.shape[1], device)
            cols = reflect_index(s.left - r, c + 2 * r, photo.shape[2], device)
            regions.append(photo[:, rows][:, :, cols])
        region = torch.stack(regions).float() / 255.0
        sharp = region[..., r:r + c, r:r + c]
        blurred = blur_valid(srgb_to_linear(region), kernels).clamp(0.0, 1.0)
        peaks = torch.tensor([plan.samples[j].poisson_peak for j in synthetic], device=device)
        shot = peaks > 0
        if bool(shot.any()):
            scale = peaks.clamp(min=1.0).view(-1, 1, 1, 1)
            noisy = torch.poisson(blurred * scale, generator=generator) / scale
            blurred = torch.where(shot.view(-1, 1, 1, 1), noisy, blurred)
        blurred = linear_to_srgb(blurred)
        sigmas = torch.tensor([plan.samples[j].gaussian_sigma for j in synthetic],
                              device=device).view(-1, 1, 1, 1)
        noise = torch.randn(blurred.shape, generator=generator, device=device)
        blurred = (blurred + sigmas * noise).clamp(0.0, 1.0)
        for i, j in enumerate(synthetic):
            blurs[j], sharps[j] = blurred[i], sharp[i]
    for j, s in enumerate(plan.samples):
        if not s.real:
            continue
        clip = clips[s.source]
        rows = reflect_index(s.top, c, clip.shape[2], device)
        cols = reflect_index(s.left, c, clip.shape[3], device)
        window = clip[s.start:s.start + s.length][:, :, rows][:, :, :, cols].float() / 255.0
        blurs[j] = linear_to_srgb(srgb_to_linear(window).mean(dim=0))
        sharps[j] = window[s.length // 2]
    pairs = [(_augment(b, s.hflip, s.vflip, s.turns), _augment(t, s.hflip, s.vflip, s.turns))
             for b, t, s in zip(blurs, sharps, plan.samples, strict=True)]
    return (torch.stack([b for b, _ in pairs]).contiguous(),
            torch.stack([t for _, t in pairs]).contiguous())


def to_device_uint8(pixels: np.ndarray, device) -> torch.Tensor:
    """``(H, W, 3)`` float in ``[0, 1]`` -> ``(3, H, W)`` uint8 on ``device``."""
    arr = np.rint(np.clip(pixels, 0.0, 1.0) * 255.0).astype(np.uint8)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))).to(device)


class DeviceBatchSource:
    """Endless training batches made on ``device`` (see the module docstring).

    Args:
        photos: ``uint8`` ``(3, H, W)`` tensors (sharp photos) on the device.
        clips: ``uint8`` ``(T, 3, H, W)`` tensors (consecutive frames) on the device.
        settings: batch size, crop, real fraction, kernel and noise ranges.
        seed: the run's seed; batch ``k`` of process ``rank`` is plan ``k · world + rank``.
        workers: processes drawing plans (kernels) ahead of the device; 0 draws them inline.
        schedule: optional ``CropSchedule`` (progressive crop sizes by step).
    """

    def __init__(self, photos: Sequence[torch.Tensor], clips: Sequence[torch.Tensor], *,
                 settings: PlanSettings, seed: int, workers: int = 0, schedule=None,
                 grad_accum: int = 1) -> None:
        if not photos and not clips:
            raise ValueError("no photos and no clips for the device data path")
        self.photos = list(photos)
        self.clips = list(clips)
        self.settings = settings
        self.seed = seed
        self.workers = workers
        self.schedule = schedule
        self.grad_accum = grad_accum
        self.shapes = Shapes(photos=tuple((int(p.shape[1]), int(p.shape[2])) for p in photos),
                             clips=tuple((int(c.shape[0]), int(c.shape[2]), int(c.shape[3]))
                                         for c in clips))

    def __len__(self) -> int:
        return len(self.photos) + len(self.clips)

    def _crop_for(self, batch_number: int) -> int:
        if self.schedule is None:
            return self.settings.crop
        return self.schedule.size_at_step(batch_number // max(self.grad_accum, 1))

    def plan(self, batch_number: int, rank: int = 0, world: int = 1) -> BatchPlan:
        """The plan of micro-batch ``batch_number`` of process ``rank``."""
        return plan_batch(self.seed, batch_number * world + rank, self.shapes, self.settings,
                          crop=self._crop_for(batch_number))

    def batch(self, plan: BatchPlan) -> dict:
        """The training batch of ``plan``, in ``[-1, 1]`` on the device."""
        blur, sharp = realise(plan, self.photos, self.clips)
        size = len(plan.samples)
        position = torch.arange(plan.index * size, (plan.index + 1) * size)
        return {"blur": blur * 2.0 - 1.0, "sharp": sharp * 2.0 - 1.0, "position": position}

    def stream(self, *, start_batch: int = 0, rank: int = 0, world: int = 1,
               depth: int = 0) -> Iterator[dict]:
        """Batches ``start_batch, start_batch + 1, …`` of process ``rank``; with ``workers`` > 0
        the next ``depth`` (default ``2 × workers``) plans are drawn in worker processes."""
        k = start_batch
        if self.workers <= 0:
            while True:
                yield self.batch(self.plan(k, rank, world))
                k += 1
        depth = depth or 2 * self.workers
        context = multiprocessing.get_context("spawn")  # never fork a process that holds CUDA
        with cf.ProcessPoolExecutor(self.workers, mp_context=context) as pool:
            pending: dict[int, cf.Future] = {}
            while True:
                for ahead in range(k, k + depth):
                    if ahead not in pending:
                        pending[ahead] = pool.submit(
                            plan_batch, self.seed, ahead * world + rank, self.shapes,
                            self.settings, self._crop_for(ahead))
                yield self.batch(pending.pop(k).result())
                k += 1


_DECODED: dict[tuple, object] = {}


def _decode(paths: Sequence, device, threads: int) -> list[torch.Tensor]:
    from deblurcli.images import read_image

    with cf.ThreadPoolExecutor(max(1, threads)) as pool:
        return list(pool.map(lambda p: to_device_uint8(read_image(p).pixels, device), paths))


def load_photos(paths: Sequence, device, threads: int = 8) -> list[torch.Tensor]:
    """Decode image files into ``uint8`` ``(3, H, W)`` tensors on ``device`` (threads decode in
    parallel). Kept for the life of the process, so the stages of one run decode once."""
    key = ("photos", tuple(str(p) for p in paths), str(device))
    if key not in _DECODED:
        _DECODED[key] = _decode(paths, device, threads)
    return _DECODED[key]


def load_clip(paths: Sequence, device, threads: int = 8) -> torch.Tensor:
    """Decode consecutive frames into one ``uint8`` ``(T, 3, H, W)`` tensor (kept, as above).

    Raises:
        DatasetError: the frames differ in size.
    """
    from deblurcli.errors import DatasetError

    key = ("clip", tuple(str(p) for p in paths), str(device))
    if key not in _DECODED:
        frames = _decode(paths, device, threads)
        if len({tuple(f.shape) for f in frames}) > 1:
            raise DatasetError(f"the frames of {Path(paths[0]).parent} differ in size")
        _DECODED[key] = torch.stack(frames)
    return _DECODED[key]


def _pieces(frames: Sequence, held: set) -> list[list]:
    """The runs of consecutive ``frames`` not in ``held``."""
    pieces: list[list] = [[]]
    for frame in frames:
        if frame in held:
            pieces.append([])
        else:
            pieces[-1].append(frame)
    return [piece for piece in pieces if piece]


def source_from_items(items: Sequence, config, *, device, schedule=None,
                      held_out: Sequence = ()) -> DeviceBatchSource:
    """The :class:`DeviceBatchSource` of a run: its ``--sharp-photos`` items (validation items
    already removed) and every clip of ``--frames`` less the frames of the ``held_out`` frame
    windows (validation): a clip is cut there, and a piece shorter than the smallest window
    is left out.

    Raises:
        DatasetError: stored pairs (they are not made on the device) or clips shorter than the
            smallest frame window.
    """
    import os

    from deblurcli.errors import DatasetError
    from deblurcli.train import data as dt

    stored = [it for it in items if isinstance(it, dt.PairItem)]
    if stored:
        raise DatasetError("--device-data makes pairs from --sharp-photos and --frames; stored "
                           "pairs (--data, --blur/--sharp) are read from disk: drop --device-data")
    settings = PlanSettings(batch_size=config.batch_size, crop=config.crop,
                            real_fraction=config.real_fraction, augment=config.augment)
    threads = min(16, os.cpu_count() or 1)
    photos = load_photos([it.sharp for it in items if isinstance(it, dt.SharpItem)], device,
                         threads)
    held = {path for item in held_out if isinstance(item, dt.FramesItem) for path in item.frames}
    clips = []
    for frames in (dt.frame_clips(config.frames) if config.frames else []):
        if len(frames) < settings.window[0]:
            raise DatasetError(f"{frames[0].parent} has {len(frames)} frame(s); a real-blur "
                               f"window needs at least {settings.window[0]}")
        for piece in _pieces(frames, held):
            if len(piece) >= settings.window[0]:
                clips.append(load_clip(piece, device, threads))
    if not photos and not clips:
        raise DatasetError(f"the validation windows (--val-count) leave no clip of at least "
                           f"{settings.window[0]} frames to train on; hold out fewer, or give "
                           "--val-data")
    return DeviceBatchSource(photos, clips, settings=settings, seed=config.seed,
                             workers=config.workers, schedule=schedule,
                             grad_accum=config.grad_accum)
