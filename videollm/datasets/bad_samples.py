"""Bad input: detect it, name it, drop it, count it. Never hide it, never let it stop a run.

The original Video-LLaMA datasets wrap ``__getitem__`` in a bare ``except`` and silently retry a
*random* other index up to 10 times. That hides broken files, changes the data distribution and
makes runs irreproducible. Here instead:

* the media loaders (:func:`load_video_sample`, :func:`load_image_sample`) return either the
  processed tensor or a :class:`BadSample` marker naming the file and a short reason code, after
  logging ONE warning (per file and process: a file that is bad every epoch warns once);
* the collaters (:func:`split_bad`, :func:`empty_batch`) drop markers and report them in the
  batch as ``batch["bad_samples"] = [(path, reason), ...]`` (an empty list when none), so the
  counts survive DataLoader worker processes; every batch also carries ``num_samples`` (the good
  samples in it). A batch whose samples were all bad is the *empty batch*
  ``{"bad_samples": [...], "num_samples": 0}`` (:func:`is_empty_batch`); the mixing loader skips
  such batches and carries their reports into the next batch it returns;
* :class:`BadSampleTracker` counts good and bad samples per epoch and reason, and
  :meth:`BadSampleTracker.check` raises :class:`~videollm.errors.DataError` once the bad fraction
  exceeds the configured maximum (``run.max_bad_sample_fraction``).

Reason codes (:data:`REASONS`):

================== ==========================================================================
missing            no such file
empty              the file has 0 bytes
not_a_video        no known container signature and it cannot be opened (e.g. a text file)
corrupt            a container is recognised but cannot be opened or decoded (e.g. truncated)
no_video_stream    the container holds no video stream (e.g. audio only)
too_few_frames     fewer frames than ``n_frms`` (training needs exactly ``n_frms``; a one-frame
                   clip is the extreme case)
too_large          width x height above ``max_pixels`` (checked from the header, before decoding)
decode_timeout     decoding took longer than the loader's timeout
corrupt_image      an image that PIL cannot identify or decode
bad_annotation     an annotation entry that does not fit the format (e.g. a missing key)
corrupt_shard      a tar shard that cannot be read (truncated or not a tar); the samples
                   before the damage are kept
unexpected_error   any other exception; logged with its traceback
================== ==========================================================================
"""

from __future__ import annotations

import logging
import os
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch

from videollm.errors import DataError, ImageDecodeError, VideoDecodeError

logger = logging.getLogger(__name__)

REASONS = (
    "missing",
    "empty",
    "not_a_video",
    "corrupt",
    "no_video_stream",
    "too_few_frames",
    "too_large",
    "decode_timeout",
    "corrupt_image",
    "bad_annotation",
    "corrupt_shard",
    "unexpected_error",
)

# 3840 x 2160 (4K UHD): larger frames are refused before decoding unless configured otherwise.
DEFAULT_MAX_PIXELS = 3840 * 2160


@dataclass(frozen=True)
class BadSample:
    """Marker returned by a dataset instead of a sample: ``path`` (file or ``shard#key``),
    ``reason`` (one of :data:`REASONS`) and a human ``detail``."""

    path: str
    reason: str
    detail: str = ""

    def as_pair(self) -> Tuple[str, str]:
        return (self.path, self.reason)


class BadInput(Exception):
    """Raised inside the loaders to short-cut to a :class:`BadSample`; never leaves this package."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


_warned: set = set()


def report_bad(path: str, reason: str, detail: str = "", exc_info: bool = False) -> BadSample:
    """Log one warning for ``path`` (once per file and process) and return its marker."""
    if path not in _warned:
        _warned.add(path)
        logger.warning("bad sample skipped: %s: %s%s", path, reason, f" ({detail})" if detail else "",
                       exc_info=exc_info)
    else:
        logger.debug("bad sample skipped again: %s: %s", path, reason)
    return BadSample(str(path), reason, detail)


def field_of(entry: Any, key: str, kind: type = object) -> Any:
    """``entry[key]`` of an annotation entry; BadInput ``bad_annotation`` if absent or mistyped."""
    if not isinstance(entry, dict) or key not in entry:
        raise BadInput("bad_annotation", f"annotation entry has no '{key}': {str(entry)[:200]}")
    value = entry[key]
    if not isinstance(value, kind):
        raise BadInput("bad_annotation", f"'{key}' should be a {kind.__name__}, got {type(value).__name__}")
    return value


def guarded(path: str, fn: Callable[[], Any]) -> Any:
    """Run ``fn()``; turn :class:`BadInput` and unexpected exceptions into a :class:`BadSample`."""
    try:
        return fn()
    except BadInput as exc:
        return report_bad(path, exc.reason, exc.detail)
    except Exception as exc:  # noqa: BLE001 - a bad file must never take the run down
        return report_bad(path, "unexpected_error", f"{type(exc).__name__}: {exc}", exc_info=True)


# ----------------------------------------------------------------------------------------
# Video
# ----------------------------------------------------------------------------------------

# Leading bytes of the containers we recognise (offset, signature).
_CONTAINER_SIGNATURES = (
    (4, b"ftyp"),  # MP4 / MOV / 3GP
    (4, b"moov"),
    (4, b"mdat"),
    (4, b"free"),
    (4, b"wide"),
    (4, b"skip"),
    (0, b"\x1a\x45\xdf\xa3"),  # Matroska / WebM
    (0, b"RIFF"),  # AVI
    (0, b"FLV"),
    (0, b"OggS"),
    (0, b"\x00\x00\x01\xba"),  # MPEG-PS
    (0, b"\x47"),  # MPEG-TS sync byte
)


def _has_container_signature(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(12)
    return any(head[off : off + len(sig)] == sig for off, sig in _CONTAINER_SIGNATURES)


def check_file(path: str) -> None:
    """Raise BadInput for a missing, non-regular or empty file."""
    if not os.path.exists(path):
        raise BadInput("missing", "no such file")
    if not os.path.isfile(path):
        raise BadInput("missing", "not a regular file")
    if os.path.getsize(path) == 0:
        raise BadInput("empty", "0 bytes")


def probe_video(path: str, n_frms: Optional[int] = None, max_pixels: Optional[int] = None) -> Dict[str, Any]:
    """Read the container header only (no decoding) and refuse what cannot make a good sample.

    Returns ``{"width", "height", "frames"}`` (``frames`` 0 when the header does not say).
    Raises BadInput: ``not_a_video``/``corrupt`` (cannot be opened), ``no_video_stream``,
    ``too_large`` (``width * height > max_pixels``), ``too_few_frames`` (the header declares
    fewer than ``n_frms`` frames). Without PyAV nothing is checked here.
    """
    try:
        import av
    except Exception:  # pragma: no cover - PyAV is a dependency; decoding still checks
        return {"width": 0, "height": 0, "frames": 0}
    try:
        container = av.open(path, metadata_errors="ignore")
    except Exception as exc:  # noqa: BLE001 - any open failure means an unusable file
        why = f"{type(exc).__name__}: {str(exc).strip()[:200]}"
        if _has_container_signature(path):
            raise BadInput("corrupt", f"container header found but it cannot be opened (truncated?): {why}") from None
        raise BadInput("not_a_video", f"not a recognised video file: {why}") from None
    try:
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams})
            raise BadInput("no_video_stream", f"no video stream (streams: {', '.join(kinds) or 'none'})")
        stream = container.streams.video[0]
        width, height = int(stream.codec_context.width or 0), int(stream.codec_context.height or 0)
        frames = int(stream.frames or 0)
    finally:
        container.close()
    if max_pixels is not None and width * height > max_pixels:
        raise BadInput("too_large", f"{width}x{height} = {width * height} pixels > max_pixels {max_pixels}")
    if n_frms is not None and 0 < frames < n_frms:
        raise BadInput("too_few_frames", f"{frames} frame(s) < n_frms {n_frms}")
    return {"width": width, "height": height, "frames": frames}


def _decode_error_reason(exc: VideoDecodeError) -> str:
    text = str(exc).lower()
    if "timed out" in text:
        return "decode_timeout"
    if "no video stream" in text:
        return "no_video_stream"
    if "no such file" in text:
        return "missing"
    if "empty file" in text:
        return "empty"
    return "corrupt"


def load_video_sample(
    path: str,
    decode: Callable[[str], Any],
    n_frms: Optional[int],
    max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
) -> Any:
    """Check ``path``, then ``decode(path)``; raise BadInput for every kind of bad video.

    ``decode`` returns frames ``(3, T, H, W)`` or ``(frames, msg)``; ``T < n_frms`` is
    ``too_few_frames`` (training needs exactly ``n_frms`` frames, as in the original).
    """
    check_file(path)
    probe_video(path, n_frms=n_frms, max_pixels=max_pixels)
    try:
        out = decode(path)
    except VideoDecodeError as exc:
        raise BadInput(_decode_error_reason(exc), str(exc)) from None
    frames = out[0] if isinstance(out, tuple) else out
    if not isinstance(frames, torch.Tensor) or frames.dim() != 4:
        raise BadInput("unexpected_error", f"decoder returned {type(frames).__name__} instead of (3, T, H, W)")
    if n_frms is not None and frames.shape[1] < n_frms:
        raise BadInput("too_few_frames", f"{frames.shape[1]} frame(s) < n_frms {n_frms}")
    return out


# ----------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------


def open_image(source: Union[str, bytes], max_pixels: Optional[int] = DEFAULT_MAX_PIXELS):
    """Open an image file (path) or encoded bytes as an RGB PIL image; raise BadInput if bad.

    The pixel limit is checked from the header, before the pixels are decoded.
    """
    import io

    from PIL import Image, UnidentifiedImageError

    if isinstance(source, (str, os.PathLike)):
        check_file(str(source))
        fp: Any = str(source)
    else:
        if len(source) == 0:
            raise BadInput("empty", "0 bytes")
        fp = io.BytesIO(source)
    try:
        img = Image.open(fp)
    except Image.DecompressionBombError as exc:
        raise BadInput("too_large", str(exc)) from None
    except (UnidentifiedImageError, OSError, ValueError, ImageDecodeError) as exc:
        raise BadInput("corrupt_image", f"cannot identify or open the image: {exc}") from None
    try:
        w, h = img.size
        if max_pixels is not None and w * h > max_pixels:
            raise BadInput("too_large", f"{w}x{h} = {w * h} pixels > max_pixels {max_pixels}")
        try:
            return img.convert("RGB")  # decodes the pixels
        except Exception as exc:  # noqa: BLE001 - truncated/corrupt data surfaces here
            raise BadInput("corrupt_image", f"cannot decode the image ({type(exc).__name__}: {exc})") from None
    finally:
        if isinstance(fp, str):
            img.close()


def load_image_sample(
    source: Union[str, bytes], process: Callable[[Any], torch.Tensor], max_pixels: Optional[int] = DEFAULT_MAX_PIXELS
) -> torch.Tensor:
    """Open (see :func:`open_image`) and apply ``process`` to the PIL image."""
    return process(open_image(source, max_pixels))


# ----------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------


def split_bad(samples: Sequence[Any]) -> Tuple[List[Any], List[Tuple[str, str]]]:
    """``samples`` -> (good samples, [(path, reason), ...] of the markers and ``None`` entries)."""
    good, bad = [], []
    for s in samples:
        if isinstance(s, BadSample):
            bad.append(s.as_pair())
        elif s is None:
            bad.append(("<unknown>", "unexpected_error"))
        else:
            good.append(s)
    return good, bad


def empty_batch(bad: List[Tuple[str, str]]) -> Dict[str, Any]:
    """The batch returned when every sample was bad."""
    return {"bad_samples": list(bad), "num_samples": 0}


def is_empty_batch(batch: Dict[str, Any]) -> bool:
    return batch.get("num_samples", 1) == 0


# ----------------------------------------------------------------------------------------
# Tracker
# ----------------------------------------------------------------------------------------


class BadSampleTracker:
    """Per-epoch counts of good and bad samples, by reason; raises when too many are bad.

    Feed it every batch (``update(batch)``); call ``new_epoch()`` at epoch boundaries and
    ``check()`` whenever the runner wants the limit enforced (e.g. every log step). ``check``
    waits until ``min_samples`` samples were seen in the epoch, so that one bad file in the first
    batch does not end a run.
    """

    def __init__(self, max_fraction: Optional[float] = None, min_samples: int = 0, examples: int = 3) -> None:
        self.max_fraction = max_fraction
        self.min_samples = min_samples
        self.examples = examples
        self.epoch = 0
        self._reset()
        self.totals: Counter = Counter()  # over all epochs, per reason
        self.total_good = 0

    def _reset(self) -> None:
        self.good = 0
        self.counts: Counter = Counter()
        self.paths: Dict[str, List[str]] = defaultdict(list)

    def update(self, batch: Dict[str, Any]) -> None:
        """Count one collated batch (its ``num_samples`` and ``bad_samples``)."""
        self.add(int(batch.get("num_samples", 0)), batch.get("bad_samples", ()))

    def add(self, good: int, bad: Iterable[Tuple[str, str]] = ()) -> None:
        self.good += good
        self.total_good += good
        for path, reason in bad:
            self.counts[reason] += 1
            self.totals[reason] += 1
            if len(self.paths[reason]) < self.examples and path not in self.paths[reason]:
                self.paths[reason].append(path)

    @property
    def bad(self) -> int:
        return sum(self.counts.values())

    @property
    def seen(self) -> int:
        return self.good + self.bad

    @property
    def fraction(self) -> float:
        return self.bad / self.seen if self.seen else 0.0

    def new_epoch(self) -> None:
        self.epoch += 1
        self._reset()

    def summary(self) -> str:
        """One line, e.g. ``epoch 0: 2 of 40 samples bad (5.0%): missing 1 (a.mp4), empty 1 (b.mp4)``."""
        head = f"epoch {self.epoch}: {self.bad} of {self.seen} samples bad ({100 * self.fraction:.1f}%)"
        if not self.counts:
            return head
        parts = [f"{r} {n} (e.g. {', '.join(self.paths[r])})" for r, n in sorted(self.counts.items())]
        return head + ": " + "; ".join(parts)

    def check(self, max_fraction: Optional[float] = None) -> None:
        """Raise DataError if the bad fraction of this epoch exceeds ``max_fraction``."""
        limit = self.max_fraction if max_fraction is None else max_fraction
        if limit is None or self.seen < max(self.min_samples, 1):
            return
        if self.fraction > limit:
            raise DataError(
                f"too many bad samples: {self.summary()}; the limit is {100 * limit:.1f}% "
                "(run.max_bad_sample_fraction). Fix or remove the files named above."
            )

    def state_dict(self) -> Dict[str, Any]:
        return {"epoch": self.epoch, "good": self.good, "counts": dict(self.counts),
                "paths": {k: list(v) for k, v in self.paths.items()}, "totals": dict(self.totals),
                "total_good": self.total_good}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.good = int(state["good"])
        self.counts = Counter(state["counts"])
        self.paths = defaultdict(list, {k: list(v) for k, v in state["paths"].items()})
        self.totals = Counter(state["totals"])
        self.total_good = int(state["total_good"])
