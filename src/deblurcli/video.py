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
* **colours**: the colour tags (matrix, range, primaries, transfer) and the matrix frames are
  converted with, but where readers of the output will take BT.601 (:func:`written_colour`);
* **audio**: every audio stream is copied packet for packet (remuxed, not re-encoded);
* **tags** of the container (title, creation time, ...) and of the streams (language, ...).

The output is written to a hidden temporary file next to the target and renamed at the end
(:func:`deblurcli.images.atomic_write`), so an interrupted or failed run leaves no half-written
video under the final name.

Several processes can share one video: :func:`plan_spans` splits its frames into contiguous
spans (by timestamp, so that each process seeks to its own; by frame number when timestamps are
missing or repeated), :func:`deblur_segment` deblurs one span into a hidden segment file with the
same encoder and options, and :func:`join_segments` copies the segments' packets in order (no
re-encoding), with continuous timestamps, and the source's audio into the final file.

PyAV (``pip install 'deblurcli[video]'``) is imported only when a video is read or written;
without it the error says how to install it. Nothing here prints.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import heapq
import io
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Optional

import numpy as np

from deblurcli.errors import DeblurcliError, ImageReadError
from deblurcli.images import DEFAULT_MAX_PIXELS, atomic_write, cut_name, open_regular
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
# (x265 prints its settings on stderr unless told to keep to errors; SVT-AV1: see _transcode)
_CRF_CODECS = {"libx264": {}, "libx264rgb": {}, "libx265": {"x265-params": "log-level=error"},
               "libvpx-vp9": {"b": "0"}, "libvpx": {"b": "0"}, "libsvtav1": {}}
_CRF_MAX = {"libvpx-vp9": 63, "libvpx": 63, "libsvtav1": 63}
_CRF_MIN = {"libvpx": 4}  # VP8 refuses a lower one (as "Invalid argument", frame after frame)
# encoders without a rate factor that take a fixed quantiser instead (FFmpeg's default for them
# is a 200 kb/s bit rate, far below --crf 18's quality)
_QSCALE_CODECS = ("mpeg4", "mjpeg")


#: decoding threads: within a frame only. With frames decoded in parallel ("AUTO", "FRAME") a
#: damaged packet near the end was dropped without an error (frames lost, the video counted as
#: done) and one elsewhere was reported two frames late; the decoder's time is small next to
#: the model's
DECODE_THREADS = "SLICE"


def quantiser(crf: int) -> int:
    """The fixed quantiser (2..31, lower is better) MPEG-4 Part 2 and MJPEG get for ``--crf``:
    crf / 6, so 18 gives 3, close to x264's quality at 18."""
    return min(31, max(2, round(crf / 6)))


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
    """Whether this PyAV build can encode video with the codec ``name`` (an audio or subtitle
    encoder such as ``aac`` does not count)."""
    av = import_av()
    try:
        codec = av.codec.Codec(name, "w")
        return bool(codec.is_encoder) and codec.type == "video"
    except Exception:  # noqa: BLE001 - PyAV raises several types for an unknown codec
        return False


def encoder_name(codec: str) -> str:
    """The encoder FFmpeg writes ``codec`` with: a codec's own name (``h264``, ``hevc``, ``vp9``,
    ``vp8``, ``av1``) stands for its preferred encoder (``libx264``, ...), whose name the
    settings here are keyed on (--crf and its range, quiet logs, colour rules); under the short
    name they were passed over. Any other name is itself."""
    av = import_av()
    try:
        return av.codec.Codec(codec, "w").name
    except Exception:  # noqa: BLE001 - PyAV raises several types for an unknown codec
        return codec


def choose_codec(codec: str, suffix: str) -> str:
    """The encoder for ``--codec`` (``auto``: libx264 if this PyAV build has it, else the next
    available of libx265, libvpx-vp9, mpeg4; for ``.webm``: VP9, AV1, VP8); a codec's own name
    (``h264``) gives its encoder's (:func:`encoder_name`).

    Raises:
        DeblurcliError: PyAV is missing, or no such encoder is available.
    """
    if codec != "auto":
        if not has_encoder(codec):
            raise DeblurcliError(f"this PyAV build has no video encoder {codec!r}; leave --codec "
                                 "at auto or pick one of: " + ", ".join(available_codecs()))
        return encoder_name(codec)
    for name in (_AUTO_WEBM if suffix.lower() == ".webm" else _AUTO_CODECS):
        if has_encoder(name):
            return name
    raise DeblurcliError("this PyAV build has no suitable video encoder; use --codec NAME")


def check_container(codec_name: str, suffix: str) -> None:
    """Raise :class:`DeblurcliError` when the container of ``suffix`` (``.webm``, ...) cannot
    hold video of the encoder ``codec_name`` (x264 in WebM, x265 in AVI)."""
    muxer = _MUXER.get(suffix.lower())
    if muxer is None or codec_name in _held(muxer):
        return
    fits = [name for name in available_codecs() if name in _held(muxer)]
    raise DeblurcliError(f"a {suffix.lower()} file cannot hold {codec_name} video; leave --codec "
                         f"at auto or pick one of: {', '.join(fits)}")


#: codecs FFmpeg lists for a muxer but does not write there: its MOV muxer takes VP8, VP9 and
#: AV1 in MP4 mode only ("Invalid argument", "Not yet implemented")
_NOT_WRITTEN = {"mov": frozenset({"libvpx-vp9", "libvpx", "libsvtav1", "libaom-av1", "librav1e",
                                  "libdav1d", "vp8", "vp9", "av1"})}


@functools.cache
def _held(muxer: str) -> frozenset[str]:
    """The codecs (and encoders) FFmpeg's ``muxer`` can store."""
    av = import_av()
    with av.open(io.BytesIO(), "w", format=muxer) as container:
        return frozenset(container.supported_codecs) - _NOT_WRITTEN.get(muxer, frozenset())


def available_codecs() -> list[str]:
    """The encoders among the usual video codecs that this PyAV build has."""
    names = ("libx264", "libx265", "libvpx-vp9", "libvpx", "libsvtav1", "mpeg4", "mjpeg", "ffv1")
    return [n for n in names if has_encoder(n)]


def check_crf(codec: str, crf: int) -> None:
    """``crf`` must be in 0..51 (x264/x265), 0..63 (VP9, AV1) or 4..63 (VP8); raises
    ``ValueError``.
    Encoders without a constant rate factor pass any value: MPEG-4 Part 2 and MJPEG take it as
    a quantiser (:func:`quantiser`), lossless ones (ffv1) ignore it."""
    codec = encoder_name(codec)
    if codec not in _CRF_CODECS:
        return
    low, top = _CRF_MIN.get(codec, 0), _CRF_MAX.get(codec, 51)
    if not low <= crf <= top:
        raise ValueError(f"--crf must be in {low}..{top} for {codec}, got {crf}")


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
        steady: whether the frames are evenly spaced, as far as the header tells (the average
            rate is the stream's base rate; a phone's variable-rate video has them differ).
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
    steady: bool = True


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


def main_video(container: Any) -> Any:
    """The video stream that is deblurred: the largest frames (then the most of them), as
    FFmpeg's command picks, leaving out a cover picture (an attached picture is a video stream
    of one frame, and may come first)."""
    from av.stream import Disposition

    streams = list(container.streams.video)
    moving = [s for s in streams if not s.disposition & Disposition.attached_pic] or streams
    return max(moving, key=lambda s: ((s.codec_context.width or 0) * (s.codec_context.height or 0),
                                      int(s.frames or 0), -streams.index(s)))


@contextlib.contextmanager
def _video_stream(path: Path) -> Iterator[tuple[Any, Any]]:
    """``(container, main video stream)`` of a regular file opened for reading; FFmpeg's errors
    (raised here or in the caller's block) become one-line :class:`ImageReadError`."""
    av = import_av()
    try:
        with open_regular(path) as fh, av.open(fh, "r") as container:
            name = container.format.name
            if name == "image2" or name.endswith("_pipe"):  # FFmpeg's image readers
                kind = f"a {name.removesuffix('_pipe').upper()}" if name != "image2" else "an"
                raise ImageReadError(f"cannot read {path}: it is {kind} image, not a video "
                                     "(give it its own suffix)")
            if not container.streams.video:
                raise ImageReadError(f"cannot read {path}: no video stream")
            yield container, main_video(container)
    except av.error.FFmpegError as exc:
        raise ImageReadError(f"cannot read {path}: {_one_line(exc)}") from None


def probe_video(path: Path) -> VideoInfo:
    """Read a video's header and first frame.

    Raises:
        ImageReadError: not a regular file, no video stream, or FFmpeg cannot read it.
    """
    path = Path(path)
    av = import_av()
    with _video_stream(path) as (container, stream):
        ctx = stream.codec_context
        stream.thread_type = DECODE_THREADS
        try:
            first = next(container.decode(stream), None)
        except av.error.FFmpegError as exc:  # not the container's header: its first frame
            raise ImageReadError(f"cannot read {path}: damaged video data before its first "
                                 f"frame ({_one_line(exc)})") from None
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
                         audio_streams=len(container.streams.audio),
                         steady=not (stream.average_rate and stream.base_rate)
                         or stream.average_rate == stream.base_rate)


#: top-level boxes of MP4 and QuickTime files: a box of another type after them is bytes a tool
#: appended (a log, a caption), not part of the container
_TOP_BOXES = frozenset({b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"uuid", b"moof",
                        b"mfra", b"sidx", b"ssix", b"styp", b"meta", b"pdin", b"prft", b"emsg",
                        b"pnot", b"PICT", b"junk", b"udta"})


def declared_size(path: Path) -> Optional[int]:
    """The size in bytes a video file's container states for itself: Matroska's and WebM's
    segment size, the end of the last top-level box of MP4 and MOV, the RIFF chunks of AVI; None
    where it states none (a live recording's unknown size, a box running to the end)."""
    with open_regular(path) as fh:
        fd, total = fh.fileno(), os.fstat(fh.fileno()).st_size
        head = os.pread(fd, 12, 0)
        if head[:4] == b"\x1a\x45\xdf\xa3":  # EBML: its header, then the Segment
            fh.seek(4)
            size = _ebml_size(fh)
            if size is None:
                return None
            fh.seek(size, 1)
            if fh.read(4) != b"\x18\x53\x80\x67":
                return None
            size = _ebml_size(fh)
            return None if size is None else fh.tell() + size
        riff = head[:4] == b"RIFF"
        if not riff and head[4:8] not in _TOP_BOXES:
            return None
        end = 0
        while end < total:  # top-level boxes / RIFF chunks, each sized in its header
            header = os.pread(fd, 16, end)  # unbuffered: a long fragmented file has many
            if len(header) < 8:
                return None
            if header[:4] != b"RIFF" if riff else header[4:8] not in _TOP_BOXES:
                return end  # bytes after the last chunk or box: not the container's
            if riff:
                size = 8 + int.from_bytes(header[4:8], "little")
                size += size % 2  # chunks are word-aligned
            else:
                size = int.from_bytes(header[:4], "big")
                if size == 1 and len(header) == 16:
                    size = int.from_bytes(header[8:16], "big")
                elif size == 0:  # to the end of the file
                    return None
                if size < 8:
                    return None
            end += size
        return end


def _ebml_size(fh: Any) -> Optional[int]:
    """An EBML element's size (a variable-length integer) read from ``fh``; None for the
    "unknown" size."""
    first = fh.read(1)
    if not first or first[0] == 0:
        return None
    length = 9 - first[0].bit_length()
    rest = fh.read(length - 1)
    value = first[0] & (0xFF >> length)
    for byte in rest:
        value = value << 8 | byte
    return None if value == (1 << (7 * length)) - 1 else value


def check_whole(path: Path) -> None:
    """Raise :class:`ImageReadError` when ``path`` is shorter than its container states: cut
    off by an interrupted copy or download, it decodes without an error up to the cut."""
    try:
        stated = declared_size(path)
    except (OSError, ImageReadError):
        return  # unreadable here: FFmpeg's own error says why
    size = os.stat(path).st_size
    if stated is not None and size < stated:
        raise ImageReadError(f"cannot read {path}: the file ends at {size:,} bytes of the "
                             f"{stated:,} its container states (truncated: an interrupted copy "
                             "or download?)")


def _local(path: Path) -> str:
    """``path`` as FFmpeg must be given a file: absolute, as it reads a relative name with a
    colon (``.a:b.mp4.segment0000.part``, ``res:1/x.mp4``) as a URL of some protocol."""
    return os.path.abspath(path)


def _one_line(exc: BaseException) -> str:
    """The exception as one line; for FFmpeg's errors only their message (PyAV's text adds
    the error number and the name it gave the open file)."""
    text = str(exc)
    strerror = getattr(exc, "strerror", None)
    if strerror and type(exc).__module__.startswith("av"):
        text = strerror
    return " ".join(text.split()) or type(exc).__name__


def deblur_video(source: Path, target: Path, deblur: DeblurFn, *, codec: str = "auto",
                 crf: int = DEFAULT_CRF, max_pixels: int = DEFAULT_MAX_PIXELS,
                 progress: Optional[ProgressFn] = None,
                 before_replace: Optional[Callable[[Path], None]] = None,
                 tags: bool = True) -> int:
    """Deblur every frame of the video ``source`` into ``target`` (same container); returns the
    number of frames written. See the module docstring for what is kept; ``tags=False`` leaves
    out the tags of the container and its streams (title, creation time, location, ...).

    Emits ``"frames"`` progress events (done / the count the container declares, or None); the
    ``deblur`` function gets ``progress`` too (its ``"tiles"`` events).

    Raises:
        DeblurcliError: PyAV is missing, the encoder is not available, or encoding fails.
        ImageReadError: the video cannot be read, or a frame exceeds ``max_pixels``.
    """
    source, target = Path(source), Path(target)
    av, muxer, codec_name, info = _prepare(source, target, codec, crf, max_pixels)
    written = [0]

    def write(tmp: Path) -> None:
        written[0] = _transcode(av, source, tmp, muxer, codec_name, crf, info, deblur,
                                progress, tags=tags)[0]
        if written[0] == 0:
            raise ImageReadError(f"cannot read {source}: no video frame could be decoded")

    try:
        atomic_write(target, write, before_replace=before_replace)
    except av.error.FFmpegError as exc:  # a damaged frame or packet, an encoder that refuses
        raise DeblurcliError(f"cannot deblur {source} into {target}: {_one_line(exc)}") from None
    return written[0]


# --------------------------------------------------------------------------------------------
# one video, many processes: each deblurs a contiguous part into a segment file, one joins them


def frame_ranges(n_frames: int, parts: int) -> list[tuple[int, int]]:
    """Split frames ``0 .. n_frames - 1`` into ``parts`` contiguous ranges ``[start, stop)``:
    part ``i`` is ``[i * n_frames // parts, (i + 1) * n_frames // parts)`` (sizes differ by at
    most one; some are empty when there are fewer frames than parts)."""
    if parts < 1 or n_frames < 0:
        raise ValueError(f"need parts >= 1 and n_frames >= 0, got {parts} and {n_frames}")
    return [(i * n_frames // parts, (i + 1) * n_frames // parts) for i in range(parts)]


@dataclass(frozen=True)
class FrameSpan:
    """The frames ``[start, stop)`` of a video in presentation order (``stop`` None: to the end,
    whatever the container declared).

    ``frames`` is the number of video packets found in the span (what a seek must deliver).
    When every video packet has its own timestamp (``origin`` is not None) the same frames are
    also those with ``lo <= pts < hi`` (None: unbounded), so that a process can seek to them;
    ``origin`` is then the video's first timestamp. Otherwise frames are counted from the start.
    """

    start: int
    stop: Optional[int]
    lo: Optional[int] = None
    hi: Optional[int] = None
    origin: Optional[int] = None
    frames: Optional[int] = None


def frame_spans(timestamps: list[Optional[int]], parts: int) -> list[FrameSpan]:
    """One :class:`FrameSpan` per part (:func:`frame_ranges` of ``len(timestamps)`` frames), from
    the presentation timestamps of a video's packets (in any order); by timestamp when they are
    all known and distinct, else by frame number. The last span runs to the end of the video."""
    n = len(timestamps)
    last = [(start, stop if i < parts - 1 else None)
            for i, (start, stop) in enumerate(frame_ranges(n, parts))]
    if not timestamps or None in timestamps or len(set(timestamps)) < n:
        return [FrameSpan(start, stop, frames=(n if stop is None else stop) - start)
                for start, stop in last]
    pts = sorted(timestamps)  # type: ignore[type-var]  # no None here

    def at(i: Optional[int]) -> Optional[int]:
        return None if i is None else (pts[i] if i < len(pts) else pts[-1] + 1)

    return [FrameSpan(start, stop, lo=at(start) if start else None, hi=at(stop), origin=pts[0],
                      frames=(n if stop is None else stop) - start) for start, stop in last]


def plan_spans(path: Path, parts: int) -> list[FrameSpan]:
    """Split the video ``path`` into ``parts`` spans of frames (:func:`frame_spans` of its video
    packets' timestamps, read without decoding).

    Raises:
        ImageReadError: the file cannot be read, is truncated (:func:`check_whole`), has no video
            stream or no video packet.
    """
    path = Path(path)
    check_whole(path)  # as one process says it, before its packets fail to be read
    with _video_stream(path) as (container, stream):
        timestamps = [packet.pts for packet in container.demux(stream)
                      if packet.size and not packet.is_discard]
        if _timed_by_index(container):  # by frame number: timestamps are FFmpeg's guesses
            timestamps = [None] * len(timestamps)
    if not timestamps:
        raise ImageReadError(f"cannot read {path}: no video frame could be decoded")
    return frame_spans(timestamps, parts)


@dataclass(frozen=True)
class Segment:
    """One part of a video, deblurred into its own file by :func:`deblur_segment`.

    Attributes:
        path: the segment file, or None when the span held no frame (nothing was written).
        start: number of the span's first frame in the video.
        frames: frames written.
        shift: ticks of ``time_base`` taken off the frames' timestamps (the file starts like the
            whole video); :func:`join_segments` adds them back.
        origin: the timestamp its first frame was written with (the video's first).
        time_base: the source video stream's time base.
    """

    path: Optional[Path]
    start: int
    frames: int
    shift: int = 0
    origin: int = 0
    time_base: Fraction = Fraction(1)


def segment_path(target: Path, index: int) -> Path:
    """The hidden temporary file that holds part ``index`` of the video ``target``."""
    target = Path(target)
    return target.with_name(f".{cut_name(target.name, 237)}.segment{index:04d}.part")


def deblur_segment(source: Path, target: Path, deblur: DeblurFn, index: int, span: FrameSpan, *,
                   codec: str = "auto", crf: int = DEFAULT_CRF,
                   max_pixels: int = DEFAULT_MAX_PIXELS,
                   progress: Optional[ProgressFn] = None) -> Segment:
    """Deblur the frames ``span`` of ``source`` into the segment file ``index`` of ``target``
    (:func:`segment_path`; the encoder and options of :func:`deblur_video`, no audio), written
    atomically. The decoder seeks to the keyframe before the span when the span is given by
    timestamps, and decodes from the start when that missed a frame.

    Raises:
        DeblurcliError, ImageReadError: as :func:`deblur_video`.
    """
    source, target = Path(source), Path(target)
    if span.stop is not None and span.stop <= span.start:
        return Segment(None, span.start, 0)
    av, muxer, codec_name, info = _prepare(source, target, codec, crf, max_pixels)
    written = [0, 0, 0]

    def write(tmp: Path) -> None:
        args = (av, source, tmp, muxer, codec_name, crf, info, deblur, progress, span)
        try:
            written[:] = _transcode(*args, seek=span.start > 0)
        except _SeekMissed:
            written[:] = _transcode(*args, seek=False)
        if written[0] == 0:
            raise _EmptySpan()  # the video has fewer frames than its container declared

    path = segment_path(target, index)
    try:
        atomic_write(path, write)
    except _EmptySpan:
        return Segment(None, span.start, 0)
    except av.error.FFmpegError as exc:
        raise DeblurcliError(f"cannot deblur {source} into {target}: {_one_line(exc)}") from None
    return Segment(path, span.start, *written, time_base=info.time_base)


def join_segments(source: Path, segments: list[Segment], target: Path, *,
                  before_replace: Optional[Callable[[Path], None]] = None,
                  tags: bool = True) -> int:
    """Join the segment files of ``target`` in frame order into ``target`` (written atomically):
    their packets are copied (no re-encoding) with each segment's timestamps moved back by its
    ``shift`` and the decoding timestamps kept increasing across the joins, and the audio
    streams are copied from ``source`` as :func:`deblur_video` does. Returns the number of
    frames. The segment files are left in place.

    Raises:
        DeblurcliError: a segment file is missing or was encoded differently, or FFmpeg fails.
    """
    av = import_av()
    source, target = Path(source), Path(target)
    parts = sorted((s for s in segments if s.frames), key=lambda s: s.start)
    if not parts:
        raise ImageReadError(f"cannot read {source}: no video frame could be decoded")
    for part in parts:
        if part.path is None or not part.path.is_file():
            raise DeblurcliError(f"cannot join the parts of {target}: {part.path} is missing (all "
                                 "processes must write to one shared OUTPUT folder)")

    def write(tmp: Path) -> None:
        _join(av, source, parts, tmp, _MUXER[target.suffix.lower()], target, tags)

    try:
        atomic_write(target, write, before_replace=before_replace)
    except av.error.FFmpegError as exc:
        raise DeblurcliError(f"cannot join the parts of {target}: {_one_line(exc)}") from None
    return sum(part.frames for part in parts)


def _join(av: Any, source: Path, parts: list[Segment], tmp: Path, muxer: str,
          target: Path, tags: bool = True) -> None:
    with contextlib.ExitStack() as stack:
        first = stack.enter_context(av.open(_local(parts[0].path), "r"))
        inp = stack.enter_context(av.open(stack.enter_context(open_regular(source)), "r"))
        out = stack.enter_context(av.open(_local(tmp), "w", format=muxer,
                                          options=_muxer_options(muxer, inp, tags)))
        template = first.streams.video[0]
        # opaque: the template's codec is a decoder (dav1d for AV1); the display matrix comes too
        vout = out.add_stream_from_template(template, opaque=True)
        vout.time_base = template.time_base
        vin = main_video(inp)
        vout.codec_context.framerate = vin.average_rate or vin.guessed_rate or Fraction(30)
        audio = {a: out.add_stream_from_template(a) for a in inp.streams.audio}
        if tags:
            _copy_tags(inp, out, vout, audio)
        video = _segment_packets(av, parts, template, vout, target)
        sound = (p for p in inp.demux(*audio) if p.dts is not None) if audio else iter(())
        # interleaved by decoding time, as a muxer expects
        for packet in heapq.merge(video, sound, key=lambda p: p.dts * p.time_base):
            if packet.stream is not vout:
                packet.stream = audio[packet.stream]
            out.mux(packet)


#: tags the muxer writes itself, or that describe the input's encoding or rotation (written as
#: a display matrix); MKVToolNix's statistics tags (_STATISTICS_...) are left out as well
_OWN_TAGS = frozenset({"major_brand", "minor_version", "compatible_brands", "encoder",
                       "duration", "number_of_frames", "number_of_bytes", "bps", "rotate",
                       "alpha_mode"})


def _tags(metadata: Any) -> dict[str, str]:
    """The tags of a container or stream that the output carries too (Matroska's statistics
    tags also come with a language: ``DURATION-eng``)."""
    return {key: value for key, value in dict(metadata).items()
            if key.lower().split("-")[0] not in _OWN_TAGS
            and not key.lower().startswith("_statistics")}


def _copy_tags(inp: Any, out: Any, vout: Any, audio: dict) -> None:
    """The input's container tags (title, creation time, location, ...) and those of its video
    and audio streams (language, title, handler) onto the output, as FFmpeg's command copies
    them; the muxer writes those its container has a place for."""
    out.metadata.update(_tags(inp.metadata))
    vout.metadata.update(_tags(main_video(inp).metadata))
    for source, stream in audio.items():
        stream.metadata.update(_tags(source.metadata))


def _muxer_options(muxer: str, inp: Any, tags: bool) -> dict[str, str]:
    """The output's muxer options: MP4 and QuickTime files keep the input's reverse-DNS tags
    (a phone's ``com.apple.quicktime.make``, ``.location.ISO6709``, ...) only in ``mdta``
    boxes, written only when asked for (and only then: iTunes-style boxes are what other
    readers of MP4 titles look for)."""
    if tags and muxer in ("mp4", "mov") and any("." in key for key in _tags(inp.metadata)):
        return {"movflags": "use_metadata_tags"}
    return {}


def _stream_params(stream: Any) -> tuple:
    """What must be equal for the packets of two streams to be joined into one."""
    ctx = stream.codec_context
    return (ctx.name, ctx.width, ctx.height, ctx.format and ctx.format.name,
            bytes(ctx.extradata or b""), Fraction(stream.time_base))


def _segment_packets(av: Any, parts: list[Segment], template: Any, vout: Any,
                     target: Path) -> Iterator:
    """The video packets of every segment in order, for ``vout``, with continuous timestamps."""
    params = _stream_params(template)
    last: Optional[int] = None  # the last decoding timestamp handed out
    for part in parts:
        with av.open(_local(part.path), "r") as seg:
            stream = seg.streams.video[0]
            if _stream_params(stream) != params:
                raise DeblurcliError(f"cannot join the parts of {target}: they were encoded with "
                                     "different settings (were all processes running the same "
                                     "FFmpeg?)")
            # where the muxer put the segment's first frame, and where it puts it in the video
            tb = Fraction(stream.time_base)
            offset = _rescale(part.origin + part.shift, part.time_base, tb) - \
                _rescale(part.origin, part.time_base, tb)
            pending: list = []  # packets whose decoding timestamp is not known yet
            for packet in seg.demux(stream):
                if not packet.size:
                    continue
                if packet.pts is None:
                    raise DeblurcliError(f"cannot join the parts of {target}: a packet of "
                                         f"{part.path.name} has no timestamp")
                packet.stream = vout
                pending.append(packet)
                if packet.dts is not None:
                    last = yield from _release(pending, offset, last, target)
            last = yield from _release(pending, offset, last, target)


def _release(pending: list, offset: int, last: Optional[int], target: Path):
    """Yield the ``pending`` packets with their timestamps moved by ``offset`` and decoding
    timestamps from :func:`continuous_dts`; returns the last one."""
    if not pending:
        return last
    pts = [p.pts + offset for p in pending]
    dts = [None if p.dts is None else p.dts + offset for p in pending]
    try:
        fixed = continuous_dts(pts, dts, last)
    except ValueError as exc:
        raise DeblurcliError(f"cannot join the parts of {target}: {exc}") from None
    for packet, p, d in zip(pending, pts, fixed, strict=True):
        packet.pts, packet.dts = p, d
        yield packet
    pending.clear()
    return fixed[-1]


def _rescale(value: int, source: Fraction, target: Fraction) -> int:
    """``value`` ticks of ``source`` in ticks of ``target``, rounded as FFmpeg does (half away
    from zero)."""
    exact = Fraction(value) * source / target
    return int(math.copysign(math.floor(abs(exact) + Fraction(1, 2)), exact))


def continuous_dts(pts: list[int], dts: list[Optional[int]], after: Optional[int]) -> list[int]:
    """Decoding timestamps for consecutive packets: each one's own (``dts``) where known, those
    missing (Matroska stores none for the first packets of a file) just below the next known
    one, all raised where needed to stay strictly above ``after`` (the previous packet's) and
    increasing.

    Raises:
        ValueError: a decoding timestamp would then come after its packet's ``pts``.
    """
    known = next((d for d in reversed(dts) if d is not None), None)
    fixed: list[int] = []
    n = len(pts)
    for i, (p, d) in enumerate(zip(pts, dts, strict=True)):
        if d is None:
            d = known - (n - 1 - i) if known is not None else min(pts) - (n - i)
        if after is not None and d <= after:
            d = after + 1
        if d > p:
            raise ValueError(f"decoding timestamp {d} after presentation timestamp {p}")
        fixed.append(d)
        after = d
    return fixed


def _prepare(source: Path, target: Path, codec: str, crf: int,
             max_pixels: int) -> tuple[Any, str, str, VideoInfo]:
    """``(av, muxer, encoder, info)`` for deblurring ``source`` into ``target``'s container, once
    the encoder, ``crf`` and the frame size are known to be usable."""
    av = import_av()
    source, target = Path(source), Path(target)
    muxer = _MUXER.get(target.suffix.lower())
    if muxer is None:
        raise DeblurcliError(f"cannot write {target}: unknown video container "
                             f"{target.suffix!r} (use one of {', '.join(sorted(_MUXER))})")
    codec_name = choose_codec(codec, target.suffix)
    check_container(codec_name, target.suffix)
    try:
        check_crf(codec_name, crf)
    except ValueError as exc:
        raise DeblurcliError(str(exc)) from None
    check_whole(source)
    info = probe_video(source)
    pixels = info.width * info.height
    if pixels > max_pixels:
        raise ImageReadError(f"cannot read {source}: frames of {info.width}x{info.height} are "
                             f"{pixels:,} pixels, more than the limit of {max_pixels:,} (raise "
                             "it with --max-pixels if the file is trusted)")
    pixel_format(codec_name, info.width, info.height, target.suffix)  # none: it fails here
    check_audio(source, target)
    return av, muxer, codec_name, info


def _holds_audio(av: Any, muxer: str, source: Path) -> bool:
    """Whether a ``muxer`` file can take copies of ``source``'s audio streams: a file in
    memory gets them, its header and a packet of each (some refusals come only then: Opus in
    QuickTime at the header, PCM in MP4 at its first packet)."""
    try:
        with open_regular(source) as fh, av.open(fh, "r") as inp, \
                av.open(io.BytesIO(), "w", format=muxer) as out:
            copies = {stream: out.add_stream_from_template(stream) for stream in inp.streams.audio}
            out.start_encoding()
            for number, packet in enumerate(inp.demux(*copies)):
                if number > 50_000:  # an audio stream without packets: not the whole file
                    break
                if packet.dts is None or packet.stream not in copies:
                    continue
                stream = packet.stream
                packet.stream = copies.pop(stream)
                out.mux(packet)
                if not copies:
                    break
    except (ValueError, av.error.FFmpegError):  # "'webm' format does not support 'aac' codec"
        return False
    return True


def check_audio(source: Path, target: Path) -> None:
    """Raise :class:`DeblurcliError` when ``target``'s container cannot hold copies of
    ``source``'s audio streams (AAC in a Matroska file named ``.webm``, A-law in a QuickTime
    file named ``.mp4``); the message names the suffixes whose containers can."""
    av = import_av()
    source, target = Path(source), Path(target)
    with open_regular(source) as fh, av.open(fh, "r") as inp:
        codecs = ", ".join(sorted({s.codec_context.name for s in inp.streams.audio}))
    if not codecs or _holds_audio(av, _MUXER[target.suffix.lower()], source):
        return
    fits = sorted(suffix for suffix, muxer in _MUXER.items()
                  if muxer != "avi" and _holds_audio(av, muxer, source))
    hint = f"; rename it to {' or '.join(fits)}" if fits else ""
    raise DeblurcliError(f"cannot deblur {source}: its {codecs} audio cannot be copied into a "
                         f"{target.suffix.lower()} file{hint}")


@contextlib.contextmanager
def _quiet_encoder(codec_name: str) -> Iterator[None]:
    """SVT-AV1 takes its log level from the environment only: errors alone while it encodes
    (``SVT_LOG`` put back afterwards; a value the user set is kept)."""
    if codec_name != "libsvtav1" or "SVT_LOG" in os.environ:
        yield
        return
    os.environ["SVT_LOG"] = "1"
    try:
        yield
    finally:
        os.environ.pop("SVT_LOG", None)


def _transcode(av: Any, source: Path, tmp: Path, muxer: str, codec_name: str, crf: int,
               info: VideoInfo, deblur: DeblurFn, progress: Optional[ProgressFn],
               span: Optional[FrameSpan] = None, seek: bool = False,
               tags: bool = True) -> tuple[int, int, int]:
    """:func:`_encode` with the encoder's own log kept to errors."""
    with _quiet_encoder(codec_name):
        return _encode(av, source, tmp, muxer, codec_name, crf, info, deblur, progress, span,
                       seek, tags)


def _encode(av: Any, source: Path, tmp: Path, muxer: str, codec_name: str, crf: int,
            info: VideoInfo, deblur: DeblurFn, progress: Optional[ProgressFn],
            span: Optional[FrameSpan] = None, seek: bool = False,
            tags: bool = True) -> tuple[int, int, int]:
    """Deblur the frames of ``span`` (all of them, with the audio, when None) into ``tmp``;
    returns ``(frames written, shift, origin)``: the time-base ticks taken off their timestamps
    so that the first written frame has the video's first timestamp, ``origin`` (``shift`` is 0
    for the whole video). ``seek``: jump to the keyframe before a span given by timestamps;
    raises :class:`_SeekMissed` unless decoding then starts on a key frame at or before the span
    and delivers every frame of it."""
    # Matroska and WebM declare no frame count: the duration times the rate tells about how
    # many (the bar then ends at the count decoded)
    estimated = not info.frames and bool(info.duration and info.rate)
    total = info.frames or (round(info.duration * info.rate) if estimated else None)
    if span is not None:
        estimated = False
        total = (span.stop if span.stop is not None else (info.frames or None))
        total = None if total is None else max(0, total - span.start)
    with open_regular(source) as fh, av.open(fh, "r") as inp, \
            av.open(_local(tmp), "w", format=muxer,
                    options=_muxer_options(muxer, inp, tags and span is None)) as out:
        vin = main_video(inp)
        vin.thread_type = DECODE_THREADS
        ctx_in = vin.codec_context
        pix_fmt = pixel_format(codec_name, info.width, info.height)
        options = {}
        if codec_name in _CRF_CODECS:
            options = {"crf": str(crf), **_CRF_CODECS[codec_name]}
        elif codec_name in _QSCALE_CODECS:
            q = str(quantiser(crf))
            options = {"flags": "+qscale", "qmin": q, "qmax": q}
        if muxer == "avi" or muxer in ("mp4", "mov") and not info.steady or \
                codec_name == "libx265" and total is not None and total < 3:
            # AVI stores no presentation times: frames reordered for B-frames come out in
            # decoding order, their times shifted. MP4 and QuickTime time each frame by its
            # decoding time: with B-frames, those of uneven frames (decoding times are the
            # presentation times in order, shifted) made the track shorter than the video.
            # x265 with B-frames gives the first packet of a 1- or 2-frame stream a garbage
            # decoding time now and then (1 run in 4 to 8)
            options["bf"] = "0"
            if codec_name == "libx265":
                options["x265-params"] += ":bframes=0"
        vout = out.add_stream(codec_name, rate=info.rate or Fraction(30), options=options)
        vout.width, vout.height, vout.pix_fmt = info.width, info.height, pix_fmt
        vout.time_base = info.time_base
        vout.codec_context.time_base = info.time_base
        if ctx_in.sample_aspect_ratio:
            vout.codec_context.sample_aspect_ratio = ctx_in.sample_aspect_ratio
        colour = written_colour(codec_name, muxer, pix_fmt)
        exact = _exact(av)
        for name in ("colorspace", "color_range", "color_primaries", "color_trc"):
            value = getattr(ctx_in, name, None)
            if name in ("colorspace", "color_range"):
                if colour is None:  # RGB frames: no matrix (a YUV one would be applied)
                    continue
                value = colour[name == "color_range"] or value
            if value:
                setattr(vout.codec_context, name, value)
        if info.display_matrix is not None or info.rotation:
            if info.display_matrix is None or not hasattr(vout, "set_display_matrix"):
                raise DeblurcliError(f"cannot keep the rotation of {source}: that needs PyAV >= "
                                     f"17.1 (pip install 'deblurcli[video]'); this is PyAV "
                                     f"{av.__version__}")
            vout.set_display_matrix(info.display_matrix)
        # a part of the video (span) carries no audio: join_segments copies it from the source
        audio = {} if span is not None else \
            {a: out.add_stream_from_template(a) for a in inp.streams.audio}
        if span is None and tags:
            _copy_tags(inp, out, vout, audio)
        seeked = seek and span is not None and span.lo is not None
        if seeked:
            try:
                inp.seek(span.lo, stream=vin)
            except av.error.FFmpegError:
                raise _SeekMissed() from None
        report(progress, "frames", 0, total)
        done, index, last_pts, shift = 0, 0, None, 0
        origin = None if span is None else span.origin
        step = _pts_step(info)
        by_index = _timed_by_index(inp)
        slots: collections.deque[int] = collections.deque()  # see _timed_by_index
        keyed = False
        durations: dict[int, int] = {}  # pts -> duration of the frames handed to the encoder
        for packet in inp.demux(vin, *audio):
            if packet.stream.type == "audio":
                if packet.dts is None:  # the demuxer's final empty packet
                    continue
                packet.stream = audio[packet.stream]
                out.mux(packet)
                continue
            keyed = keyed or packet.is_keyframe
            if by_index and keyed and packet.dts is not None and packet.size:
                # the frame's place (a dropped one's is skipped); packets before the first key
                # frame decode to nothing, so they take none
                slots.append(packet.dts)
            try:
                frames = packet.decode()
            except av.error.FFmpegError as exc:  # say where: a long video is worth looking at
                at = "" if packet.pts is None or not packet.time_base else \
                    f" at {float(packet.pts * packet.time_base):.2f} s"
                raise ImageReadError(f"cannot read {source}: damaged video data{at}, after "
                                     f"{index} decoded frame(s) ({_one_line(exc)})") from None
            for frame in frames:
                if seeked and index == 0 and not (frame.key_frame and frame.pts is not None
                                                  and frame.pts <= span.lo):
                    raise _SeekMissed()  # e.g. intra refresh: no clean start at that keyframe
                if by_index:
                    pts = slots.popleft() if slots else index * step
                else:
                    pts = frame.pts if frame.pts is not None else index * step
                if last_pts is not None and pts <= last_pts:
                    pts = last_pts + 1  # the encoder needs increasing timestamps
                last_pts = pts
                origin = pts if origin is None else origin
                where = _where(span, index, pts)
                index += 1
                if where < 0:
                    continue  # before the span: decoded, not deblurred
                if where > 0:
                    break
                if done == 0:
                    if seeked and pts != span.lo:
                        raise _SeekMissed()
                    shift = pts - origin
                if (frame.width, frame.height) != (info.width, info.height):
                    number = done + (span.start if span is not None else 0)
                    raise ImageReadError(f"cannot read {source}: the frame size changes from "
                                         f"{info.width}x{info.height} to {frame.width}x"
                                         f"{frame.height} at frame {number} (not supported)")
                rgb = frame.to_ndarray(format="rgb24", interpolation=exact)
                result = deblur(rgb.astype(np.float32) / 255.0, progress)
                quantised = np.clip(np.rint(result * 255.0), 0, 255).astype(np.uint8)
                new = av.VideoFrame.from_ndarray(quantised, format="rgb24")
                if colour is not None:  # the matrix and range the output's readers will use
                    matrix, levels = colour
                    new.colorspace = matrix or frame.colorspace
                    new.color_range = levels or frame.color_range
                new = new.reformat(format=pix_fmt, interpolation=exact)
                new.pts, new.time_base = pts - shift, info.time_base
                if frame.duration:
                    durations[new.pts] = frame.duration
                out.mux(_timed(_encoded(av, vout, new, source, pix_fmt, first=done == 0),
                               durations))
                done += 1
                report(progress, "frames", done, total)
            else:
                continue
            break  # past the span
        out.mux(_timed(_encoded(av, vout, None, source, pix_fmt), durations))
        if estimated and done != total:
            report(progress, "frames", done, done)
    if seeked and done != span.frames:  # a frame of the span was not decoded after the seek
        raise _SeekMissed()
    return done, shift, origin or 0


#: pixel formats for frames of even sizes, and of an odd width or height (4:2:0 and 4:2:2 halve
#: the chroma of a side), best first; the first one an encoder takes is used
_EVEN_FORMATS = ("yuv420p", "yuv422p", "yuv444p", "yuv422p10le", "yuv444p10le", "yuv420p10le",
                 "gbrp", "bgr0", "rgb24", "bgr24")
_ODD_FORMATS = ("yuv444p", "yuv444p10le", "gbrp", "bgr0", "rgb24", "bgr24")


def pixel_format(codec_name: str, width: int, height: int, suffix: str = "") -> str:
    """The pixel format frames of ``width`` x ``height`` are encoded in with ``codec_name``:
    4:2:0 where the encoder takes it and both sides are even, else 4:4:4 (or the encoder's
    closest); MJPEG's full-range formats; MPEG-4 Part 2 always 4:2:0 (it pads odd sizes).

    Raises:
        DeblurcliError: the encoder takes no format for this size (SVT-AV1 and VP8 only
            4:2:0, which needs even sizes); it names the encoders that can, in a ``suffix``
            file.
    """
    chosen = _pixel_format(codec_name, width, height)
    if chosen is not None:
        return chosen
    muxer = _MUXER.get(suffix.lower())
    others = [name for name in available_codecs() if name != codec_name
              and (muxer is None or name in _held(muxer))
              and _pixel_format(name, width, height) is not None]
    hint = f"pick one of: {', '.join(others)}" if others else "pick another --codec"
    raise DeblurcliError(f"{codec_name} cannot encode frames of {width}x{height} (it needs even "
                         f"sizes); {hint}")


def _pixel_format(codec_name: str, width: int, height: int) -> Optional[str]:
    if codec_name == "mpeg4":
        return "yuv420p"
    av = import_av()
    formats = {f.name for f in (av.codec.Codec(codec_name, "w").video_formats or ())}
    even = width % 2 == 0 and height % 2 == 0
    wanted = _EVEN_FORMATS if even else _ODD_FORMATS
    if codec_name == "mjpeg":
        wanted = tuple(name.replace("yuv", "yuvj") for name in wanted[:3])
    return next((name for name in wanted if name in formats or not formats), None)


# FFmpeg's colour spaces and ranges (AVColorSpace, AVColorRange) named here
_BT601, _MPEG_RANGE, _JPEG_RANGE = 5, 1, 2
_RGB_FORMATS = frozenset({"gbrp", "bgr0", "rgb24", "bgr24", "rgba", "bgra"})
# encoders whose bitstream records the colour matrix and range, wherever they are stored
_TAGGED_BITSTREAMS = frozenset({"libx264", "libx265", "libvpx-vp9", "libsvtav1"})


def written_colour(codec_name: str, muxer: str, pix_fmt: str) -> Optional[tuple[int, int]]:
    """``(matrix, range)`` that readers of the output will convert its frames with (0: the
    input's, which the output then records), or ``None`` for RGB frames (no matrix).

    Some outputs cannot record the input's matrix: readers take MJPEG as BT.601 full range and
    VP8 as BT.601, and an AVI file stores no colour tags, so that MPEG-4 Part 2 or FFV1 in it
    are read as BT.601 too. Converting BT.709 frames with their own matrix there shifted their
    colours; they are converted with the one they will be read with instead."""
    if pix_fmt in _RGB_FORMATS:
        return None
    if codec_name == "mjpeg":
        return _BT601, _JPEG_RANGE
    if codec_name == "libvpx" or muxer == "avi" and codec_name not in _TAGGED_BITSTREAMS:
        return _BT601, _MPEG_RANGE
    return 0, 0


def _exact(av: Any) -> Any:
    """swscale flags for RGB <-> YUV without a bias: its default rounding and chroma handling
    made every pass darker (a solid (199, 39, 90) came back as (197, 37, 88))."""
    flags = av.video.reformatter.Interpolation
    return flags.BILINEAR | flags.ACCURATE_RND | flags.FULL_CHR_H_INT | flags.FULL_CHR_H_INP


def _encoded(av: Any, stream: Any, frame: Any, source: Path, pix_fmt: str,
             first: bool = False) -> list:
    """``stream.encode(frame)``; an encoder's failure (FFmpeg says only "Invalid argument")
    named, with the frames it was given; on the ``first`` frame, an encoder that refuses them."""
    try:
        return stream.encode(frame)
    except av.error.FFmpegError as exc:
        ctx = stream.codec_context
        what = f"the {ctx.name} encoder " + (
            f"refused its {ctx.width}x{ctx.height} {pix_fmt} frames" if first else
            f"failed on its {ctx.width}x{ctx.height} {pix_fmt} frames")
        advice = "; pick another --codec" if first else ""
        raise DeblurcliError(f"cannot deblur {source}: {what} ({_one_line(exc)}){advice}") \
            from None


def _timed(packets: list, durations: dict[int, int]) -> list:
    """The encoder's ``packets``, each with the duration of the input frame it holds (the
    encoder leaves it 0, and an MP4 or QuickTime muxer then guesses the last frame's: a
    variable-rate video came out longer or shorter)."""
    for packet in packets:
        duration = durations.pop(packet.pts, None)
        if duration:
            packet.duration = duration
    return packets


def _where(span: Optional[FrameSpan], index: int, pts: int) -> int:
    """-1, 0 or 1: the frame ``index`` with timestamp ``pts`` lies before, in or after ``span``."""
    if span is None:
        return 0
    if span.origin is None:  # by frame number
        start, stop = span.start, span.stop
        return -1 if index < start else (1 if stop is not None and index >= stop else 0)
    return -1 if span.lo is not None and pts < span.lo else \
        (1 if span.hi is not None and pts >= span.hi else 0)


class _SeekMissed(Exception):
    """Seeking to a span's first frame landed after it (or failed): decode from the start."""


class _EmptySpan(Exception):
    """No frame of the video lies in the span: no segment file."""


def _timed_by_index(container: Any) -> bool:
    """Whether a video's frames are timed by their place, not by timestamps: AVI stores none,
    only the frame rate and a place per frame, skipped for a dropped one (FFmpeg guesses times
    from the decoding order: one frame late for H.264, out of order with B-frames). The k-th
    frame decoded then takes the k-th place (decoding time) of a packet that holds one."""
    return "avi" in container.format.name.split(",")


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
    """Decode ``path``'s main video stream (:func:`main_video`): ``(index, float32 (H, W, 3)
    RGB in [0, 1])`` for each frame in presentation order, one at a time (as stored: the
    display rotation is not applied).

    Raises:
        ImageReadError: the file cannot be read or a packet cannot be decoded.
    """
    path = Path(path)
    with _video_stream(path) as (container, stream):
        stream.thread_type = DECODE_THREADS
        exact = _exact(import_av())
        for index, frame in enumerate(container.decode(stream)):
            rgb = frame.to_ndarray(format="rgb24", interpolation=exact)
            yield index, rgb.astype(np.float32) / 255.0
