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
* :class:`BadSampleTracker` counts good and bad samples per epoch and over the whole run, by
  reason, and :meth:`BadSampleTracker.check` raises :class:`~videollm.errors.DataError` only when
  the data is *confidently* worse than ``run.max_bad_sample_fraction``: counted over the run (not
  per epoch), at least :data:`MIN_BAD_TO_ABORT` bad samples, and the lower one-sided 99.95 %
  Wilson bound of the bad fraction above the limit. Small-sample noise (3 bad clips in the first
  14 at 5 % bad data) does not stop a healthy run; 50 % bad data stops it within a few batches.

Annotation entries (CSV rows, JSON records, shard metadata) are checked field by field
(:func:`field_of`, :func:`text_field`, :func:`check_conversations`, :func:`check_qa`): a missing
key, a wrong type, ``None`` or an empty caption is a ``bad_annotation`` marker named after the
entry (``part.csv:17``, ``anno.json#42``), never a ``TypeError`` in the middle of a run. Media paths
built from annotations must stay inside the dataset's root (:func:`resolve_under`; ``../`` and
absolute paths are ``outside_root`` unless the dataset sets ``allow_outside_root: true``).

Reason codes (:data:`REASONS`):

================== ==========================================================================
missing            no such file (or a broken symbolic link)
not_a_file         a directory, a named pipe (FIFO), a device or a socket
empty              the file has 0 bytes
not_a_video        no known container signature and it cannot be opened (e.g. a text file)
corrupt            a container is recognised but cannot be opened or decoded (e.g. truncated)
no_video_stream    the container holds no video stream (e.g. audio only)
too_few_frames     fewer frames than ``n_frms`` (training needs exactly ``n_frms``; a one-frame
                   clip is the extreme case)
too_large          width x height above ``max_pixels`` (checked from the header, before decoding)
decode_timeout     decoding took longer than the loader's timeout
corrupt_image      an image that PIL cannot identify or decode
bad_annotation     an annotation entry that does not fit the format (missing key, wrong type, None,
                   empty or non-string caption, short CSV row)
outside_root       a media path from an annotation that leaves the dataset's root (``../``,
                   absolute path); allowed with the dataset option ``allow_outside_root: true``
corrupt_shard      a tar shard that cannot be read (truncated or not a tar); the samples
                   before the damage are kept
unexpected_error   any other exception; logged with its traceback
================== ==========================================================================
"""

from __future__ import annotations

import logging
import math
import os
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch

from videollm.errors import DataError, ImageDecodeError, VideoDecodeError
from videollm.file_checks import describe_path

logger = logging.getLogger(__name__)

REASONS = (
    "missing",
    "not_a_file",
    "empty",
    "not_a_video",
    "corrupt",
    "no_video_stream",
    "too_few_frames",
    "too_large",
    "decode_timeout",
    "corrupt_image",
    "bad_annotation",
    "outside_root",
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


def field_of(entry: Any, key: str, kind: Union[type, Tuple[type, ...]] = object) -> Any:
    """``entry[key]`` of an annotation entry; BadInput ``bad_annotation`` if absent, None or mistyped."""
    if not isinstance(entry, dict):
        raise BadInput("bad_annotation", f"annotation entry is a {type(entry).__name__}, not a mapping: {str(entry)[:200]}")
    if key not in entry:
        raise BadInput("bad_annotation", f"annotation entry has no '{key}': {str(entry)[:200]}")
    value = entry[key]
    if value is None:
        raise BadInput("bad_annotation", f"'{key}' is null")
    kinds = kind if isinstance(kind, tuple) else (kind,)
    # bool is an int to Python, never a valid id, path or caption here
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise BadInput("bad_annotation", f"'{key}' should be a {names}, got {type(value).__name__}: {str(value)[:80]}")
    return value



def path_list(entry: Dict[str, Any], key: str) -> List[str]:
    """``entry[key]`` as a list of paths: absent -> [], a string -> [it], a list of strings; anything
    else is a ``bad_annotation``."""
    value = entry.get(key)
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise BadInput("bad_annotation", f"'{key}' must be a path or a list of paths, not {type(value).__name__}")

def text_field(entry: Any, key: str) -> str:
    """A non-empty string field (caption, question, answer); BadInput ``bad_annotation`` otherwise."""
    value = field_of(entry, key, str)
    if not value.strip():
        raise BadInput("bad_annotation", f"'{key}' is empty")
    if any(0xD800 <= ord(c) <= 0xDFFF for c in value):  # undecodable bytes kept by surrogateescape
        raise BadInput("bad_annotation", f"'{key}' is not valid UTF-8 text")
    return value


def name_field(entry: Any, key: str) -> str:
    """An id or relative path (a string, or an int as in some COCO-style ids) as a non-empty string."""
    value = field_of(entry, key, (str, int))
    text = str(value)
    if not text.strip() or "\x00" in text:
        raise BadInput("bad_annotation", f"'{key}' is empty or holds a NUL byte")
    return text


def check_conversations(convs: Any) -> List[Dict[str, str]]:
    """LLaVA-style ``[{"from": str, "value": str}, ...]``, non-empty. Only what would otherwise
    crash tokenisation is refused: entries the original trains on are kept as they are."""
    if not isinstance(convs, list) or not convs:
        raise BadInput("bad_annotation", "'conversations' must be a non-empty list of {from, value}")
    for i, turn in enumerate(convs):
        if not isinstance(turn, dict):
            raise BadInput("bad_annotation", f"conversations[{i}] is a {type(turn).__name__}, not {{from, value}}")
        for key in ("from", "value"):
            if not isinstance(turn.get(key), str):
                raise BadInput("bad_annotation", f"conversations[{i}].{key} should be a string, got "
                                                 f"{type(turn.get(key)).__name__}" + ("" if key in turn else " (missing)"))
    return convs


def check_qa(qa: Any) -> List[Dict[str, str]]:
    """VideoChat-style ``[{"q": str, "a": str}, ...]``, non-empty (refused otherwise, as above)."""
    if not isinstance(qa, list) or not qa:
        raise BadInput("bad_annotation", "'QA' must be a non-empty list of {q, a}")
    for i, pair in enumerate(qa):
        if not isinstance(pair, dict):
            raise BadInput("bad_annotation", f"QA[{i}] is a {type(pair).__name__}, not {{q, a}}")
        for key in ("q", "a"):
            if not isinstance(pair.get(key), str):
                raise BadInput("bad_annotation", f"QA[{i}].{key} should be a string, got "
                                                 f"{type(pair.get(key)).__name__}" + ("" if key in pair else " (missing)"))
    return qa


def resolve_under(root: str, *parts: str, allow_outside: bool = False) -> str:
    """``os.path.join(root, *parts)``; BadInput ``outside_root`` if the annotation's parts leave ``root``.

    The check is lexical (``..`` and absolute parts), so symbolic links placed inside the root by
    whoever set the data up are followed as usual; an annotation alone cannot point elsewhere.
    """
    path = os.path.join(root, *parts)
    if allow_outside:
        return path
    for part in parts:
        if os.path.isabs(part):
            raise BadInput("outside_root", f"absolute path '{part}' in the annotation; media paths must be relative "
                                           "to the dataset root (set allow_outside_root: true to allow this)")
    base = os.path.normpath(root)
    full = os.path.normpath(path)
    if full != base and not full.startswith(base.rstrip(os.sep) + os.sep):
        raise BadInput("outside_root", f"'{os.path.join(*parts)}' leaves the dataset root {root} "
                                       "(set allow_outside_root: true to allow this)")
    return path


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
    """Raise BadInput for a missing, non-regular or empty file (see
    :func:`videollm.file_checks.describe_path`: a broken link, a FIFO or a device is named as such)."""
    problem = describe_path(path)
    if problem is not None:
        raise BadInput(*problem)


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
    if "no such file" in text or "broken symbolic link" in text:
        return "missing"
    if "not a regular file" in text or "is a directory" in text:
        return "not_a_file"
    if "empty file" in text:
        return "empty"
    if "elementary stream" in text:
        return "not_a_video"
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


# Abort rule of BadSampleTracker.check: at least this many bad samples over the run, and the lower
# one-sided confidence bound of the bad fraction above the limit. z = 3.29 is the 99.95 % one-sided
# normal quantile: with checks at every log step a healthy run (true fraction at or below the limit)
# practically never trips it, while 50 % bad data at a 10 % limit trips it after about 20 samples.
MIN_BAD_TO_ABORT = 5
ABORT_CONFIDENCE_Z = 3.29


def wilson_lower_bound(bad: int, seen: int, z: float = ABORT_CONFIDENCE_Z) -> float:
    """Lower end of the Wilson score interval of the fraction ``bad / seen`` (0 when nothing was seen).

    Wilson, "Probable inference, the law of succession, and statistical inference", JASA 1927;
    unlike the normal interval it stays inside [0, 1] and is sound for small counts.
    """
    if seen <= 0:
        return 0.0
    p = bad / seen
    denom = 1.0 + z * z / seen
    centre = p + z * z / (2 * seen)
    margin = z * math.sqrt(p * (1 - p) / seen + z * z / (4 * seen * seen))
    return max(0.0, (centre - margin) / denom)


class BadSampleTracker:
    """Counts good and bad samples, per epoch and over the run, by reason; raises when too many are bad.

    Feed it every batch (``update(batch)``); call ``new_epoch()`` at epoch boundaries and
    ``check()`` whenever the runner wants the limit enforced (e.g. every log step).

    The limit is judged on the counts of the whole run (they survive ``new_epoch`` and resumes),
    never on one epoch alone, and only when the evidence is strong (see :data:`MIN_BAD_TO_ABORT`,
    :func:`wilson_lower_bound`): ``check`` raises once at least ``min_bad`` samples were bad, at
    least ``min_samples`` were seen, and the lower confidence bound of the bad fraction exceeds
    ``max_fraction``. The old rule (the plain fraction of the epoch, from 20 samples on) stopped
    about one healthy epoch in twenty at 5 % bad data by chance.

    Attributes: ``good``, ``counts`` (by reason), ``bad``, ``seen``, ``fraction`` for the current
    epoch; ``total_good``, ``totals``, ``total_bad``, ``total_seen``, ``total_fraction`` for the
    run. The tracker logs the run's counts by reason when the first bad sample arrives and each
    time the run's bad count doubles; :meth:`summary` (logged by the runner after every epoch,
    so also at the end of the run) and :meth:`report` give them too.
    """

    def __init__(self, max_fraction: Optional[float] = None, min_samples: int = 0, examples: int = 3,
                 min_bad: int = MIN_BAD_TO_ABORT, confidence_z: float = ABORT_CONFIDENCE_Z) -> None:
        self.max_fraction = max_fraction
        self.min_samples = min_samples
        self.examples = examples
        self.min_bad = max(1, int(min_bad))
        self.confidence_z = float(confidence_z)
        self.epoch = 0
        self._reset()
        self.totals: Counter = Counter()  # over all epochs, per reason
        self.total_good = 0
        self.total_paths: Dict[str, List[str]] = defaultdict(list)
        self._next_report = 1  # log the run's counts when total_bad reaches this (then doubles)

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
            for examples in (self.paths[reason], self.total_paths[reason]):
                if len(examples) < self.examples and path not in examples:
                    examples.append(path)
        if self.total_bad >= self._next_report:
            logger.warning("bad samples so far: %s", self._describe(self.totals, self.total_paths, self.total_bad,
                                                                     self.total_seen, "run"))
            while self._next_report <= self.total_bad:
                self._next_report *= 2

    @property
    def bad(self) -> int:
        return sum(self.counts.values())

    @property
    def seen(self) -> int:
        return self.good + self.bad

    @property
    def fraction(self) -> float:
        return self.bad / self.seen if self.seen else 0.0

    @property
    def total_bad(self) -> int:
        return sum(self.totals.values())

    @property
    def total_seen(self) -> int:
        return self.total_good + self.total_bad

    @property
    def total_fraction(self) -> float:
        return self.total_bad / self.total_seen if self.total_seen else 0.0

    def new_epoch(self) -> None:
        self.epoch += 1
        self._reset()

    @staticmethod
    def _describe(counts: Counter, paths: Dict[str, List[str]], bad: int, seen: int, head: str) -> str:
        text = f"{head}: {bad} of {seen} samples bad ({100 * bad / seen if seen else 0.0:.1f}%)"
        if not counts:
            return text
        parts = [f"{r} {n} (e.g. {', '.join(paths[r])})" for r, n in sorted(counts.items())]
        return text + ": " + "; ".join(parts)

    def summary(self) -> str:
        """``epoch 0: 2 of 40 samples bad (5.0%): missing 1 (e.g. a.mp4); empty 1 (e.g. b.mp4)``,
        followed by the run's totals when the run is longer than this epoch."""
        text = self._describe(self.counts, self.paths, self.bad, self.seen, f"epoch {self.epoch}")
        if self.total_seen != self.seen:
            text += " | " + self._describe(self.totals, self.total_paths, self.total_bad, self.total_seen, "run")
        return text

    def report(self) -> Dict[str, Any]:
        """The run's counts as plain data (for a run summary or a JSON file)."""
        return {"bad": self.total_bad, "seen": self.total_seen, "fraction": self.total_fraction,
                "by_reason": dict(sorted(self.totals.items())),
                "examples": {k: list(v) for k, v in sorted(self.total_paths.items())}}

    def lower_bound(self) -> float:
        """Lower confidence bound of the run's bad fraction (see :func:`wilson_lower_bound`)."""
        return wilson_lower_bound(self.total_bad, self.total_seen, self.confidence_z)

    def check(self, max_fraction: Optional[float] = None) -> None:
        """Raise DataError if the run's bad fraction is confidently above ``max_fraction``."""
        limit = self.max_fraction if max_fraction is None else max_fraction
        if limit is None or self.total_seen < max(self.min_samples, 1) or self.total_bad < self.min_bad:
            return
        low = self.lower_bound()
        if low > limit:
            raise DataError(
                f"too many bad samples: {self._describe(self.totals, self.total_paths, self.total_bad, self.total_seen, 'run')}"
                f"; the limit is {100 * limit:.1f}% (run.max_bad_sample_fraction) and the bad fraction is at least "
                f"{100 * low:.1f}% with 99.95% confidence. Fix or remove the files named above."
            )

    def state_dict(self) -> Dict[str, Any]:
        return {"epoch": self.epoch, "good": self.good, "counts": dict(self.counts),
                "paths": {k: list(v) for k, v in self.paths.items()}, "totals": dict(self.totals),
                "total_good": self.total_good, "total_paths": {k: list(v) for k, v in self.total_paths.items()},
                "next_report": self._next_report}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.good = int(state["good"])
        self.counts = Counter(state["counts"])
        self.paths = defaultdict(list, {k: list(v) for k, v in state["paths"].items()})
        self.totals = Counter(state["totals"])
        self.total_good = int(state["total_good"])
        # resume files written before these existed: examples from the epoch, report schedule anew
        self.total_paths = defaultdict(list, {k: list(v) for k, v in state.get("total_paths", state["paths"]).items()})
        self._next_report = int(state.get("next_report", 1))
        while self._next_report <= self.total_bad:
            self._next_report *= 2
