"""Video files in, video files out: decode, deblur each frame, encode, copy the audio.

:func:`deblur_video` streams a video through any per-frame ``deblur`` function (the same
:class:`~deblurcli.pipeline.DeblurPipeline` the photo path uses): frames are decoded one at a
time, deblurred and handed to the encoder, so only the decoder's and the encoder's own queues of
frames are in memory, whatever the length of the video. What is kept:

* **every frame, with its own timestamp**: the output stream uses the input's time base and each
  frame keeps its presentation time, so constant and variable frame rates, the frame count and
  the duration are those of the input;
* **size** (odd sizes too: 4:4:4 chroma then, as 4:2:0 needs even sizes) and the sample aspect
  ratio;
* **rotation**: the input's display matrix (phones store portrait video as rotated landscape) is
  written to the output stream, and the frames are processed as stored;
* **colour tags** (matrix, range, primaries, transfer) and the colour matrix used to convert;
* **audio**: every audio stream is copied packet for packet (remuxed, not re-encoded).

The output is written to a hidden temporary file next to the target and renamed at the end
(:func:`deblurcli.images.atomic_write`), so an interrupted or failed run leaves no half-written
video under the final name. PyAV (``pip install 'deblurcli[video]'``) is imported only when a
video is read or written; without it the error says how to install it. Nothing here prints.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Optional

import numpy as np

from deblurcli.errors import DeblurcliError, ImageReadError
from deblurcli.images import DEFAULT_MAX_PIXELS, atomic_write, open_regular
from deblurcli.progress import ProgressFn, report

VIDEO_SUFFIXES: frozenset[str] = frozenset({".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi"})
"""File suffixes read as videos by ``deblur`` (output keeps the input's container)."""

INSTALL_HINT = "video files need PyAV: pip install 'deblurcli[video]'"
DEFAULT_CRF = 18
"""x264/x265/VP9/AV1 constant rate factor: 18 is close to visually lossless for x264."""

# FFmpeg muxer for each suffix (the temporary file's name ends in .part, so it is given explicitly)
_MUXER = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska", ".webm": "webm",
          ".avi": "avi"}
# codecs tried for --codec auto, best first; WebM holds only VP8/VP9/AV1
_AUTO_CODECS = ("libx264", "libx265", "libvpx-vp9", "mpeg4")
_AUTO_WEBM = ("libvpx-vp9", "libsvtav1", "libvpx")
# encoders that take a constant rate factor, and the extra options each needs for it
_CRF_CODECS = {"libx264": {}, "libx264rgb": {}, "libx265": {}, "libvpx-vp9": {"b": "0"},
               "libvpx": {"b": "0"}, "libsvtav1": {}}
_CRF_MAX = {"libvpx-vp9": 63, "libvpx": 63, "libsvtav1": 63}

DeblurFn = Callable[[np.ndarray, Optional[ProgressFn]], np.ndarray]


def is_video(path: Path) -> bool:
    """Whether ``path`` is read as a video (by its suffix)."""
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def import_av() -> Any:
    """Import PyAV, or raise :class:`DeblurcliError` with the install command."""
    try:
        import av
    except ImportError:
        raise DeblurcliError(INSTALL_HINT) from None
    return av


def has_encoder(name: str) -> bool:
    """Whether this PyAV build can encode with the codec ``name``."""
    av = import_av()
    try:
        return bool(av.codec.Codec(name, "w").is_encoder)
    except Exception:  # noqa: BLE001 - PyAV raises several types for an unknown codec
        return False


def choose_codec(codec: str, suffix: str) -> str:
    """The encoder for ``--codec`` (``auto``: libx264 if this PyAV build has it, else the next
    available of libx265, libvpx-vp9, mpeg4; for ``.webm``: VP9, AV1, VP8).

    Raises:
        DeblurcliError: PyAV is missing, or no such encoder is available.
    """
    if codec != "auto":
        if not has_encoder(codec):
            raise DeblurcliError(f"this PyAV build has no {codec!r} encoder; leave --codec at auto "
                                 "or pick one of: " + ", ".join(available_codecs()))
        return codec
    for name in (_AUTO_WEBM if suffix.lower() == ".webm" else _AUTO_CODECS):
        if has_encoder(name):
            return name
    raise DeblurcliError("this PyAV build has no suitable video encoder; use --codec NAME")


def available_codecs() -> list[str]:
    """The encoders among the usual video codecs that this PyAV build has."""
    names = ("libx264", "libx265", "libvpx-vp9", "libvpx", "libsvtav1", "mpeg4", "mjpeg", "ffv1")
    return [n for n in names if has_encoder(n)]


def check_crf(codec: str, crf: int) -> None:
    """``crf`` must be in 0..51 (x264/x265) or 0..63 (VP9, AV1); raises ``ValueError``."""
    top = _CRF_MAX.get(codec, 51)
    if not 0 <= crf <= top:
        raise ValueError(f"--crf must be in 0..{top} for {codec}, got {crf}")


@dataclass(frozen=True)
class VideoInfo:
    """What :func:`probe_video` found in a video file.

    Attributes:
        width, height: frame size as stored (before the display rotation).
        frames: number of video frames the container declares (0 if unknown).
        rate: average frame rate (frames per second), or None when unknown.
        time_base: the video stream's time base.
        duration: seconds, or None.
        rotation: counter-clockwise display rotation in degrees (0 when none).
        display_matrix: the nine integers of FFmpeg's display matrix, or None.
        audio_streams: number of audio streams.
    """

    width: int
    height: int
    frames: int
    rate: Optional[Fraction]
    time_base: Fraction
    duration: Optional[float]
    rotation: int
    display_matrix: Optional[tuple[int, ...]]
    audio_streams: int


def _display_matrix(frame: Any) -> Optional[tuple[int, ...]]:
    """The display matrix a decoded frame carries (FFmpeg copies the stream's onto frames)."""
    try:
        data = frame.side_data.get("DISPLAYMATRIX")
    except Exception:  # noqa: BLE001 - older PyAV: no such side data API
        data = None
    if data is None:
        return None
    values = np.frombuffer(bytes(data), dtype="<i4")
    return tuple(int(v) for v in values[:9]) if values.size >= 9 else None


@contextlib.contextmanager
def _video_stream(path: Path) -> Iterator[tuple[Any, Any]]:
    """``(container, first video stream)`` of a regular file opened for reading; FFmpeg's errors
    (raised here or in the caller's block) become one-line :class:`ImageReadError`."""
    av = import_av()
    try:
        with open_regular(path) as fh, av.open(fh, "r") as container:
            if not container.streams.video:
                raise ImageReadError(f"cannot read {path}: no video stream")
            yield container, container.streams.video[0]
    except av.error.FFmpegError as exc:
        raise ImageReadError(f"cannot read {path}: {_one_line(exc)}") from None


def probe_video(path: Path) -> VideoInfo:
    """Read a video's header and first frame.

    Raises:
        ImageReadError: not a regular file, no video stream, or FFmpeg cannot read it.
    """
    path = Path(path)
    with _video_stream(path) as (container, stream):
        ctx = stream.codec_context
        first = next(container.decode(stream), None)
        if first is None:
            raise ImageReadError(f"cannot read {path}: no video frame could be decoded")
        rate = stream.average_rate or stream.guessed_rate
        duration = (float(stream.duration * stream.time_base) if stream.duration
                    else (container.duration / 1e6 if container.duration else None))
        return VideoInfo(width=first.width or ctx.width, height=first.height or ctx.height,
                         frames=int(stream.frames or 0),
                         rate=Fraction(rate) if rate else None,
                         time_base=Fraction(stream.time_base),
                         duration=duration,
                         rotation=int(getattr(first, "rotation", 0) or 0),
                         display_matrix=_display_matrix(first),
                         audio_streams=len(container.streams.audio))


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def deblur_video(source: Path, target: Path, deblur: DeblurFn, *, codec: str = "auto",
                 crf: int = DEFAULT_CRF, max_pixels: int = DEFAULT_MAX_PIXELS,
                 progress: Optional[ProgressFn] = None,
                 before_replace: Optional[Callable[[Path], None]] = None) -> int:
    """Deblur every frame of the video ``source`` into ``target`` (same container); returns the
    number of frames written. See the module docstring for what is kept.

    Emits ``"frames"`` progress events (done / the count the container declares, or None); the
    ``deblur`` function gets ``progress`` too (its ``"tiles"`` events).

    Raises:
        DeblurcliError: PyAV is missing, the encoder is not available, or encoding fails.
        ImageReadError: the video cannot be read, or a frame exceeds ``max_pixels``.
    """
    av = import_av()
    source, target = Path(source), Path(target)
    muxer = _MUXER.get(target.suffix.lower())
    if muxer is None:
        raise DeblurcliError(f"cannot write {target}: unknown video container "
                             f"{target.suffix!r} (use one of {', '.join(sorted(_MUXER))})")
    codec_name = choose_codec(codec, target.suffix)
    if codec_name in _CRF_CODECS:
        try:
            check_crf(codec_name, crf)
        except ValueError as exc:
            raise DeblurcliError(str(exc)) from None
    info = probe_video(source)
    pixels = info.width * info.height
    if pixels > max_pixels:
        raise ImageReadError(f"cannot read {source}: frames of {info.width}x{info.height} are "
                             f"{pixels:,} pixels, more than the limit of {max_pixels:,} (raise "
                             "it with --max-pixels if the file is trusted)")
    written = [0]

    def write(tmp: Path) -> None:
        written[0] = _transcode(av, source, tmp, muxer, codec_name, crf, info, deblur, progress)

    try:
        atomic_write(target, write, before_replace=before_replace)
    except av.error.FFmpegError as exc:  # a damaged frame or packet, an encoder that refuses
        raise DeblurcliError(f"cannot deblur {source} into {target}: {_one_line(exc)}") from None
    return written[0]


def _transcode(av: Any, source: Path, tmp: Path, muxer: str, codec_name: str, crf: int,
               info: VideoInfo, deblur: DeblurFn, progress: Optional[ProgressFn]) -> int:
    total = info.frames or None
    with open_regular(source) as fh, av.open(fh, "r") as inp, \
            av.open(str(tmp), "w", format=muxer) as out:
        vin = inp.streams.video[0]
        vin.thread_type = "AUTO"
        ctx_in = vin.codec_context
        even = info.width % 2 == 0 and info.height % 2 == 0
        pix_fmt = "yuv420p" if even else "yuv444p"
        if codec_name in ("mpeg4", "mjpeg"):
            pix_fmt = "yuv420p" if codec_name == "mpeg4" else "yuvj420p"
        options = {}
        if codec_name in _CRF_CODECS:
            options = {"crf": str(crf), **_CRF_CODECS[codec_name]}
        vout = out.add_stream(codec_name, rate=info.rate or Fraction(30), options=options)
        vout.width, vout.height, vout.pix_fmt = info.width, info.height, pix_fmt
        vout.time_base = info.time_base
        vout.codec_context.time_base = info.time_base
        if ctx_in.sample_aspect_ratio:
            vout.codec_context.sample_aspect_ratio = ctx_in.sample_aspect_ratio
        for name in ("colorspace", "color_range", "color_primaries", "color_trc"):
            value = getattr(ctx_in, name, None)
            if value:
                setattr(vout.codec_context, name, value)
        if info.display_matrix is not None or info.rotation:
            if info.display_matrix is None or not hasattr(vout, "set_display_matrix"):
                raise DeblurcliError(f"cannot keep the rotation of {source}: that needs PyAV >= "
                                     f"17.1 (pip install 'deblurcli[video]'); this is PyAV "
                                     f"{av.__version__}")
            vout.set_display_matrix(info.display_matrix)
        audio = {a: out.add_stream_from_template(a) for a in inp.streams.audio}
        report(progress, "frames", 0, total)
        done, last_pts = 0, None
        step = _pts_step(info)
        for packet in inp.demux(vin, *audio):
            if packet.stream.type == "audio":
                if packet.dts is None:  # the demuxer's final empty packet
                    continue
                packet.stream = audio[packet.stream]
                out.mux(packet)
                continue
            for frame in packet.decode():
                if (frame.width, frame.height) != (info.width, info.height):
                    raise ImageReadError(f"cannot read {source}: the frame size changes from "
                                         f"{info.width}x{info.height} to {frame.width}x"
                                         f"{frame.height} at frame {done} (not supported)")
                pts = frame.pts if frame.pts is not None else (done * step)
                if last_pts is not None and pts <= last_pts:
                    pts = last_pts + 1  # the encoder needs increasing timestamps
                last_pts = pts
                rgb = frame.to_ndarray(format="rgb24")
                result = deblur(rgb.astype(np.float32) / 255.0, progress)
                quantised = np.clip(np.rint(result * 255.0), 0, 255).astype(np.uint8)
                new = av.VideoFrame.from_ndarray(quantised, format="rgb24")
                if frame.colorspace:
                    new.colorspace = frame.colorspace
                if frame.color_range:
                    new.color_range = frame.color_range
                new = new.reformat(format=pix_fmt)
                new.pts, new.time_base = pts, info.time_base
                out.mux(vout.encode(new))
                done += 1
                report(progress, "frames", done, total)
        out.mux(vout.encode(None))
    if done == 0:
        raise ImageReadError(f"cannot read {source}: no video frame could be decoded")
    return done


def _pts_step(info: VideoInfo) -> int:
    """Time-base ticks per frame, for frames without a timestamp."""
    if not info.rate:
        return 1
    return max(1, round(1 / (info.rate * info.time_base)))


def count_frames(path: Path) -> int:
    """Number of video frames in ``path``: the count the container declares, or else the number
    of video packets (read without decoding).

    Raises:
        ImageReadError: the file cannot be read or has no video stream.
    """
    path = Path(path)
    with _video_stream(path) as (container, stream):
        if stream.frames:
            return int(stream.frames)
        return sum(1 for packet in container.demux(stream) if packet.size)


def iter_frames(path: Path) -> Iterator[tuple[int, np.ndarray]]:
    """Decode ``path``'s first video stream: ``(index, float32 (H, W, 3) RGB in [0, 1])`` for
    each frame in presentation order, one at a time (as stored: the display rotation is not
    applied).

    Raises:
        ImageReadError: the file cannot be read or a packet cannot be decoded.
    """
    path = Path(path)
    with _video_stream(path) as (container, stream):
        stream.thread_type = "AUTO"
        for index, frame in enumerate(container.decode(stream)):
            yield index, frame.to_ndarray(format="rgb24").astype(np.float32) / 255.0
