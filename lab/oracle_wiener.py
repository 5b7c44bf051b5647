"""Reference ceilings for a synthetic test set: how much can simple deconvolution recover?

For a folder written by ``deblurcli synth`` (``blur/``, ``sharp/``, ``kernels/``) it prints the
mean PSNR (dB) of

* the blurry input;
* **non-blind Wiener deconvolution with the true kernel** -- the oracle: it is *given* each
  image's kernel, which a deblurring model must infer. It inverts the blur where it was applied
  (linear light, reflect-padded borders), ``X = conj(K)·Y / (|K|² + nsr)``, at each of the
  ``--nsr`` noise-to-signal ratios, and reports the best fixed ratio over the set and the best
  ratio chosen per image (a second oracle);
* **one global linear filter** (least squares, ``(2R+1)²`` taps, shared by all images and
  channels), fitted on the even-numbered pairs and scored on the odd ones: the most a
  kernel-agnostic sharpening filter can give.

Together they calibrate a quality bar: a blind model that must beat the input by B dB needs a
gain comparable to these oracles'.

Usage: python lab/oracle_wiener.py SYNTH_DIR [--nsr 1e-4,...,1e-1] [--radius 5]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from deblurcli.evaluation.metrics import psnr


def wiener(blurry_linear: np.ndarray, kernel: np.ndarray, nsr: float) -> np.ndarray:
    """Non-blind Wiener deconvolution of an ``(H, W, C)`` linear-light image by ``kernel``
    (odd sides, sums to 1); returns ``(H, W, C)``.

    The image is mirrored by half its size on every side (``symmetric`` padding), so that the
    FFT's periodic extension has no jump at the wrap-around: a jump there rings across the
    whole image once ``1/nsr`` amplifies it."""
    k = np.asarray(kernel, np.float64)
    k = k / k.sum()
    h, w = blurry_linear.shape[:2]
    ph, pw = max(h // 2, k.shape[0]), max(w // 2, k.shape[1])
    padded = np.pad(blurry_linear, ((ph, ph), (pw, pw), (0, 0)), mode="symmetric")
    shape = padded.shape[:2]
    psf = np.zeros(shape)
    psf[: k.shape[0], : k.shape[1]] = k
    psf = np.roll(psf, (-(k.shape[0] // 2), -(k.shape[1] // 2)), axis=(0, 1))  # centre at (0, 0)
    otf = np.fft.rfft2(psf)
    gain = np.conj(otf) / (np.abs(otf) ** 2 + nsr)
    out = np.fft.irfft2(np.fft.rfft2(padded, axes=(0, 1)) * gain[..., None], s=shape, axes=(0, 1))
    return out[ph : ph + h, pw : pw + w]


def fit_linear_filter(pairs: list[tuple[np.ndarray, np.ndarray]], radius: int,
                      samples: int = 4000, seed: int = 0) -> np.ndarray:
    """Least-squares ``(2r+1)²`` filter ``f`` with ``blur + f * blur ≈ sharp`` (sRGB, all
    channels), from ``samples`` random pixels per image and channel."""
    from numpy.lib.stride_tricks import sliding_window_view

    side = 2 * radius + 1
    rng = np.random.default_rng(seed)
    rows, targets = [], []
    for blur, sharp in pairs:
        h, w = blur.shape[:2]
        for c in range(blur.shape[2]):
            windows = sliding_window_view(np.pad(blur[..., c], radius, mode="reflect"),
                                          (side, side))
            ys, xs = rng.integers(0, h, samples), rng.integers(0, w, samples)
            rows.append(windows[ys, xs].reshape(samples, -1))
            targets.append(sharp[ys, xs, c] - blur[ys, xs, c])
    a, b = np.concatenate(rows).astype(np.float64), np.concatenate(targets).astype(np.float64)
    gram = a.T @ a + 1e-3 * np.eye(a.shape[1])
    return np.linalg.solve(gram, a.T @ b).reshape(side, side)


def apply_linear_filter(blur: np.ndarray, filt: np.ndarray) -> np.ndarray:
    """``clip(blur + filt ⋆ blur)`` per channel (correlation, reflect borders)."""
    from scipy.ndimage import correlate

    out = np.stack([blur[..., c] + correlate(blur[..., c], filt, mode="reflect")
                    for c in range(blur.shape[2])], axis=-1)
    return np.clip(out, 0.0, 1.0)


def load_set(root: Path) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """``(name, blurry, sharp, kernel)`` for every pair of a synth folder, sorted by name."""
    from deblurcli.images import read_image

    items = []
    for blur_path in sorted((root / "blur").glob("*.png")):
        name = blur_path.stem
        kernel_path = root / "kernels" / f"{name}.npy"
        if not kernel_path.is_file():
            raise SystemExit(f"{kernel_path}: missing (needs a folder made by `deblurcli synth`)")
        items.append((name, read_image(blur_path).pixels[..., :3],
                      read_image(root / "sharp" / blur_path.name).pixels[..., :3],
                      np.load(kernel_path, allow_pickle=False)))
    if not items:
        raise SystemExit(f"{root}/blur: no PNG pairs")
    return items


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("synth_dir", type=Path)
    ap.add_argument("--nsr", default="1e-4,3e-4,1e-3,3e-3,1e-2,3e-2,1e-1",
                    help="Wiener noise-to-signal ratios to try (comma-separated)")
    ap.add_argument("--radius", type=int, default=5, help="global filter radius R (taps 2R+1)")
    args = ap.parse_args()
    from deblurcli.synth.blur import linear_to_srgb, srgb_to_linear

    items = load_set(args.synth_dir)
    ratios = [float(v) for v in args.nsr.split(",")]
    inputs, table = [], np.zeros((len(items), len(ratios)))
    for i, (_, blur, sharp, kernel) in enumerate(items):
        inputs.append(psnr(blur, sharp))
        lin = srgb_to_linear(blur)
        for j, nsr in enumerate(ratios):
            table[i, j] = psnr(linear_to_srgb(np.clip(wiener(lin, kernel, nsr), 0, 1)), sharp)
    best_fixed = int(np.argmax(table.mean(axis=0)))
    print(f"pairs: {len(items)}")
    print(f"blurry input:                          {np.mean(inputs):6.2f} dB")
    print(f"Wiener, true kernel, nsr={ratios[best_fixed]:g}:          "
          f"{table[:, best_fixed].mean():6.2f} dB  ({table[:, best_fixed].mean() - np.mean(inputs):+.2f})")
    print(f"Wiener, true kernel, best nsr per image: {table.max(axis=1).mean():6.2f} dB  "
          f"({table.max(axis=1).mean() - np.mean(inputs):+.2f})")
    if len(items) >= 2:
        fit = [(b, s) for k, (_, b, s, _) in enumerate(items) if k % 2 == 0]
        test = [(b, s) for k, (_, b, s, _) in enumerate(items) if k % 2 == 1]
        filt = fit_linear_filter(fit, args.radius)
        before = np.mean([psnr(b, s) for b, s in test])
        after = np.mean([psnr(apply_linear_filter(b, filt), s) for b, s in test])
        print(f"one global {2 * args.radius + 1}x{2 * args.radius + 1} filter (odd pairs):     "
              f"{after:6.2f} dB  ({after - before:+.2f} over their input {before:.2f})")


if __name__ == "__main__":
    main()
