"""Deterministic synthetic media for tests, tiny training runs and benchmarks.

Every clip shows ONE coloured shape moving over a plain dark background; every still image
shows one coloured shape. The attributes are drawn from small closed vocabularies so that a
tiny model can learn to name them and an evaluator can parse them back out of generated text:

========== ===============================================
attribute  values
========== ===============================================
shape      circle, square, triangle
color      red, green, blue, yellow
direction  left, right, up, down        (clips only)
speed      slow, fast                   (clips only)
tone       low (220 Hz), high (880 Hz)  (clips with audio)
========== ===============================================

About half of the clips carry an AAC track (a sine tone at 16 or 44.1 kHz); the others have no
audio stream at all. Clips are H.264 (libx264, yuv420p) in MP4, encoded single-threaded so the
same seed gives byte-identical files.

Motion: the shape moves along one axis at a constant speed (``slow`` = 0.24, ``fast`` = 0.32 frame
lengths per second, each jittered by up to 8 %: fast enough that 4 frames of a 32-px clip show the
shape many pixels apart, which a tiny model needs to learn direction; see docs/tiny_training.md).
When the whole trip fits inside the frame (the default 2-second clips) the start is chosen so that
the shape never leaves the frame; otherwise it wraps around: it leaves on one side and re-enters
from the other, never reversing direction.

Layout written by :func:`generate` under ``out_dir``::

    out_dir/
      videos/<page_dir>/<videoid>.mp4     every clip (page_dir "000", "001", ...; videoid "1000", ...)
      webvid/train/part_0.csv, part_1.csv WebVid CSVs, header videoid,contentUrl,duration,page_dir,name
      webvid/test/part_0.csv              held-out clips; each attribute combination also occurs in train
      cc_sbu_align/filter_cap.json        {"annotations": [{"image_id": ..., "caption": ...}]}
      cc_sbu_align/image/<image_id>.jpg
      llava/llava_instruct.json           [{"id", "image": "<12 digits>.jpg", "conversations": [...]}]
      llava/train2014/COCO_train2014_<12 digits>.jpg
      videochat/videochat_instruct.json   [{"video": "<page_dir>/<videoid>.mp4", "QA": [{"i", "q", "a"}]}]
                                          (train clips only; paths relative to videos/)
      broken/zero_byte.mp4                0 bytes
      broken/truncated.mp4                a valid clip cut to 40 % of its bytes (the moov atom is lost)
      broken/text.mp4                     a text file named .mp4
      broken/audio_only.mp4               AAC only, no video stream
      broken/one_frame.mp4                a valid H.264 clip of exactly one frame
      broken/corrupt.jpg                  a JPEG marker then random bytes, named .jpg
      manifest.json                       every clip and image with attributes, caption, split and
                                          path (relative to out_dir), plus the broken files

Use from Python (``generate(out_dir, seed=0)``) or the command line::

    python -m videollm.synthetic --out /tmp/synth --seed 0 --num-videos 24 --num-images 12
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from videollm.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

SHAPES: Tuple[str, ...] = ("circle", "square", "triangle")
# RGB of each colour name; chosen far apart so that they survive yuv420p and JPEG.
COLORS: Dict[str, Tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 70),
    "blue": (40, 90, 240),
    "yellow": (235, 215, 40),
}
DIRECTIONS: Tuple[str, ...] = ("left", "right", "up", "down")
# Unit step (dx, dy) in image coordinates (y grows downwards).
DIRECTION_VECTORS: Dict[str, Tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
# Speed in frame lengths (width for left/right, height for up/down) per second.
SPEEDS: Dict[str, float] = {"slow": 0.24, "fast": 0.32}
SPEED_JITTER = 0.08
TONES: Dict[str, float] = {"low": 220.0, "high": 880.0}
SAMPLE_RATES: Tuple[int, ...] = (16000, 44100)
BACKGROUND: Tuple[int, int, int] = (16, 16, 16)
SHAPE_FRACTION = 0.34  # side of the shape's bounding box / shorter side of the frame
TONE_AMPLITUDE = 0.3
CLIPS_PER_PAGE = 16
FIRST_VIDEOID = 1000
FIRST_LLAVA_ID = 100000
WEBVID_HEADER = ("videoid", "contentUrl", "duration", "page_dir", "name")


def _check(value: Optional[str], allowed: Sequence[str], what: str, name: str) -> None:
    if value not in allowed:
        raise DataError(f"{name}: {what}={value!r} is not one of {list(allowed)}")


@dataclass
class ClipSpec:
    """What one synthetic clip shows and sounds like.

    ``seed`` fixes the parts that are not attributes: start position and speed jitter. ``tone``
    and ``sample_rate`` only matter when ``has_audio`` is true.
    """

    name: str
    shape: str
    color: str
    direction: str
    speed: str
    has_audio: bool = False
    tone: Optional[str] = None
    sample_rate: int = 16000
    seed: int = 0

    def __post_init__(self) -> None:
        _check(self.shape, SHAPES, "shape", self.name)
        _check(self.color, tuple(COLORS), "color", self.name)
        _check(self.direction, DIRECTIONS, "direction", self.name)
        _check(self.speed, tuple(SPEEDS), "speed", self.name)
        if self.has_audio:
            _check(self.tone, tuple(TONES), "tone", self.name)
            if self.sample_rate <= 2 * TONES[self.tone]:
                raise DataError(f"{self.name}: sample_rate={self.sample_rate} is too low for a {self.tone} tone")
        elif self.tone is not None:
            raise DataError(f"{self.name}: tone={self.tone!r} given but has_audio is False")


@dataclass
class ImageSpec:
    """What one synthetic still image shows; ``seed`` fixes the shape's position."""

    name: str
    shape: str
    color: str
    seed: int = 0

    def __post_init__(self) -> None:
        _check(self.shape, SHAPES, "shape", self.name)
        _check(self.color, tuple(COLORS), "color", self.name)


def caption_for(spec: Union[ClipSpec, ImageSpec]) -> str:
    """The caption: ``"a red circle moving left"`` for a clip, ``"a red circle"`` for an image."""
    if isinstance(spec, ClipSpec):
        return f"a {spec.color} {spec.shape} moving {spec.direction}"
    return f"a {spec.color} {spec.shape}"


# --------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------


def shape_size(width: int, height: int) -> int:
    """Side in pixels of the shape's square bounding box for a ``width`` x ``height`` frame."""
    return max(3, int(round(min(width, height) * SHAPE_FRACTION)))


def shape_mask(shape: str, size: int) -> np.ndarray:
    """Boolean mask ``(size, size)`` of a shape filling its bounding box (triangle points up)."""
    _check(shape, SHAPES, "shape", "shape_mask")
    c = (np.arange(size) + 0.5) / size  # pixel centres in [0, 1]
    y, x = np.meshgrid(c, c, indexing="ij")
    if shape == "square":
        return np.ones((size, size), dtype=bool)
    if shape == "circle":
        return (x - 0.5) ** 2 + (y - 0.5) ** 2 <= 0.25
    # Isosceles triangle: apex at top centre, base along the bottom edge.
    return np.abs(x - 0.5) <= 0.5 * y


def _paste(frame: np.ndarray, mask: np.ndarray, color: Tuple[int, int, int], x: int, y: int) -> None:
    """Paint ``mask`` with ``color`` onto ``frame`` (H, W, 3) at top-left ``(x, y)``, clipped."""
    h, w = frame.shape[:2]
    s = mask.shape[0]
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + s, w), min(y + s, h)
    if x0 >= x1 or y0 >= y1:
        return
    region = frame[y0:y1, x0:x1]
    region[mask[y0 - y : y1 - y, x0 - x : x1 - x]] = color


def _trajectory(spec: ClipSpec, width: int, height: int, fps: float, num_frames: int, seed: int) -> np.ndarray:
    """Top-left corner ``(num_frames, 2)`` int (x, y) of the shape in every frame."""
    rng = random.Random(seed)
    size = shape_size(width, height)
    dx, dy = DIRECTION_VECTORS[spec.direction]
    horizontal = dx != 0
    length, cross = (width, height) if horizontal else (height, width)
    sign = dx if horizontal else dy
    velocity = SPEEDS[spec.speed] * (1.0 + rng.uniform(-SPEED_JITTER, SPEED_JITTER)) * length  # px/s
    travel = velocity * max(num_frames - 1, 0) / fps
    room = length - size
    if travel <= room:  # the whole trip fits: start so that the shape never leaves the frame
        start = rng.uniform(0, room - travel) if sign > 0 else rng.uniform(travel, room)
    else:
        start = rng.uniform(0, room)
    across = rng.uniform(0, cross - size)
    t = np.arange(num_frames) / fps
    along = start + sign * velocity * t
    # Wrap through the off-screen band [-size, 0): leave on one side, come back on the other.
    along = np.mod(along + size, length + size) - size
    along = np.round(along).astype(int)
    across_col = np.full(num_frames, int(round(across)))
    return np.stack([along, across_col], 1) if horizontal else np.stack([across_col, along], 1)


def render_frames(spec: ClipSpec, *, width: int, height: int, fps: float, num_frames: int, seed: int):
    """Yield ``num_frames`` RGB frames ``(height, width, 3)`` uint8 of the clip ``spec``."""
    mask = shape_mask(spec.shape, shape_size(width, height))
    color = COLORS[spec.color]
    background = np.empty((height, width, 3), dtype=np.uint8)
    background[:] = BACKGROUND
    for x, y in _trajectory(spec, width, height, fps, num_frames, seed):
        frame = background.copy()
        _paste(frame, mask, color, int(x), int(y))
        yield frame


def render_image(spec: ImageSpec, *, size: Union[int, Tuple[int, int]] = 64, seed: Optional[int] = None) -> np.ndarray:
    """RGB image ``(height, width, 3)`` uint8 of ``spec`` at a position drawn from ``seed``."""
    width, height = (size, size) if isinstance(size, int) else size
    rng = random.Random(spec.seed if seed is None else seed)
    s = shape_size(width, height)
    frame = np.empty((height, width, 3), dtype=np.uint8)
    frame[:] = BACKGROUND
    _paste(frame, shape_mask(spec.shape, s), COLORS[spec.color], rng.randint(0, width - s), rng.randint(0, height - s))
    return frame


def tone_samples(tone: str, sample_rate: int, duration: float) -> np.ndarray:
    """Mono sine ``(num_samples,)`` float32 at the pitch of ``tone``."""
    n = int(round(duration * sample_rate))
    t = np.arange(n, dtype=np.float64) / sample_rate
    return (TONE_AMPLITUDE * np.sin(2 * math.pi * TONES[tone] * t)).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------


def _add_audio_stream(container, sample_rate: int):
    stream = container.add_stream("aac", rate=sample_rate)
    stream.codec_context.layout = "mono"
    stream.codec_context.thread_count = 1
    return stream


def _encode_audio(container, stream, samples: np.ndarray, sample_rate: int) -> None:
    import av

    chunk = 1024  # AAC frame size
    for start in range(0, len(samples), chunk):
        piece = samples[start : start + chunk]
        frame = av.AudioFrame.from_ndarray(piece[None, :], format="fltp", layout="mono")
        frame.sample_rate = sample_rate
        frame.pts = start
        frame.time_base = Fraction(1, sample_rate)
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode(None):
        container.mux(packet)


def write_clip(
    path: Union[str, Path],
    spec: ClipSpec,
    *,
    width: int = 64,
    height: int = 64,
    fps: float = 8,
    duration: float = 2.0,
    gop: int = 12,
    seed: Optional[int] = None,
    crf: Optional[int] = 23,
    bitrate: Optional[int] = None,
    preset: str = "ultrafast",
    threads: int = 1,
    num_frames: Optional[int] = None,
) -> int:
    """Encode ``spec`` as an H.264 (yuv420p) MP4 at ``path``, with an AAC tone if ``spec.has_audio``.

    ``gop`` is the keyframe interval in frames (scene-cut keyframes are off, so ``gop=250`` gives
    exactly one keyframe per 250 frames). ``bitrate`` (bits/s), when given, replaces ``crf``.
    ``seed`` (default ``spec.seed``) fixes start position and speed jitter. ``num_frames``
    (default ``round(duration * fps)``) overrides the duration. ``threads=1`` keeps the bytes
    deterministic; more threads are faster for big benchmark clips. Returns the frame count.
    """
    import av

    path = Path(path)
    if width <= 0 or height <= 0 or width % 2 or height % 2:
        raise ConfigError(f"{path}: width={width}, height={height}: H.264 yuv420p needs positive even sizes")
    if fps <= 0 or gop <= 0:
        raise ConfigError(f"{path}: fps={fps} and gop={gop} must be positive")
    n = int(round(duration * fps)) if num_frames is None else int(num_frames)
    if n < 1:
        raise ConfigError(f"{path}: duration={duration} at fps={fps} gives no frame; make it longer")
    seed = spec.seed if seed is None else seed
    rate = Fraction(fps).limit_denominator(1001)
    path.parent.mkdir(parents=True, exist_ok=True)

    with av.open(str(path), mode="w", format="mp4") as container:
        video = container.add_stream("libx264", rate=rate)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        cc = video.codec_context
        cc.gop_size = gop
        cc.thread_count = threads
        cc.time_base = 1 / rate
        options = {"preset": preset, "x264-params": "scenecut=0"}
        if bitrate is not None:
            cc.bit_rate = int(bitrate)
        elif crf is not None:
            options["crf"] = str(crf)
        cc.options = options
        audio = _add_audio_stream(container, spec.sample_rate) if spec.has_audio else None

        frames = render_frames(spec, width=width, height=height, fps=float(rate), num_frames=n, seed=seed)
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = i
            for packet in video.encode(frame):
                container.mux(packet)
        for packet in video.encode(None):
            container.mux(packet)
        if audio is not None:
            samples = tone_samples(spec.tone, spec.sample_rate, n / float(rate))
            _encode_audio(container, audio, samples, spec.sample_rate)
    return n


def write_audio_only(
    path: Union[str, Path], *, tone: str = "low", sample_rate: int = 16000, duration: float = 1.0
) -> None:
    """Write an MP4 with a single AAC stream (a sine ``tone``) and no video stream."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = _add_audio_stream(container, sample_rate)
        _encode_audio(container, stream, tone_samples(tone, sample_rate, duration), sample_rate)


def write_image(
    path: Union[str, Path],
    spec: ImageSpec,
    *,
    size: Union[int, Tuple[int, int]] = 64,
    seed: Optional[int] = None,
    quality: int = 92,
) -> None:
    """Write ``spec`` as a JPEG; ``size`` is a side or ``(width, height)``; ``seed`` as in :func:`render_image`."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(render_image(spec, size=size, seed=seed)).save(path, format="JPEG", quality=quality)


# --------------------------------------------------------------------------------------------
# Data set
# --------------------------------------------------------------------------------------------


def _balanced(rng: random.Random, values: Sequence[Any], n: int) -> List[Any]:
    """``n`` values covering ``values`` as evenly as possible, shuffled."""
    out = [values[i % len(values)] for i in range(n)]
    rng.shuffle(out)
    return out


def _clip_specs(rng: random.Random, num_videos: int, test_fraction: float) -> List[Tuple[ClipSpec, str]]:
    """Train specs with balanced attributes, then test specs copying train attribute combinations."""
    if num_videos < 1:
        raise ConfigError(f"num_videos={num_videos}: need at least one clip")
    if not 0.0 <= test_fraction < 1.0:
        raise ConfigError(f"test_fraction={test_fraction}: must be in [0, 1)")
    num_test = int(round(num_videos * test_fraction))
    num_test = min(num_test, num_videos - 1)
    num_train = num_videos - num_test
    shapes, colors = _balanced(rng, SHAPES, num_train), _balanced(rng, tuple(COLORS), num_train)
    directions, speeds = _balanced(rng, DIRECTIONS, num_train), _balanced(rng, tuple(SPEEDS), num_train)
    audio, tones = _balanced(rng, (True, False), num_train), _balanced(rng, tuple(TONES), num_train)
    rates = _balanced(rng, SAMPLE_RATES, num_train)
    attrs = []
    for i in range(num_train):
        attrs.append(
            dict(shape=shapes[i], color=colors[i], direction=directions[i], speed=speeds[i], has_audio=audio[i],
                 tone=tones[i] if audio[i] else None, sample_rate=rates[i])
        )
    # Test clips reuse train combinations (we test recognition, not compositional generalisation);
    # only the per-clip seed (start position, speed jitter) is new.
    if num_test <= num_train:
        test_attrs = [attrs[i] for i in rng.sample(range(num_train), num_test)]
    else:
        test_attrs = [attrs[rng.randrange(num_train)] for _ in range(num_test)]
    out = []
    for i, (a, split) in enumerate([(a, "train") for a in attrs] + [(a, "test") for a in test_attrs]):
        out.append((ClipSpec(name=str(FIRST_VIDEOID + i), seed=rng.randrange(2**31), **a), split))
    return out


def _image_specs(rng: random.Random, n: int, prefix: str) -> List[ImageSpec]:
    shapes, colors = _balanced(rng, SHAPES, n), _balanced(rng, tuple(COLORS), n)
    return [
        ImageSpec(name=f"{prefix}{i:06d}", shape=shapes[i], color=colors[i], seed=rng.randrange(2**31))
        for i in range(n)
    ]


def _webvid_duration(seconds: float) -> str:
    s = int(math.ceil(seconds))
    return f"PT{s // 3600:02d}H{s // 60 % 60:02d}M{s % 60:02d}S"  # WebVid's ISO-8601 style


def _write_csv(path: Path, rows: List[Dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=WEBVID_HEADER, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    path.write_bytes(buf.getvalue().encode("utf-8"))


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes((json.dumps(obj, indent=1, sort_keys=True) + "\n").encode("utf-8"))


def _videochat_qa(rng: random.Random, spec: ClipSpec) -> List[Dict[str, str]]:
    color_shape = f"{spec.color} {spec.shape}"
    pool = [
        ("Which direction is the shape moving?", f"It is moving {spec.direction}."),
        ("What color is the moving shape?", f"It is {spec.color}."),
        ("What shape is moving in the video?", f"A {spec.shape}."),
        ("How fast is the shape moving?", f"It is moving {'slowly' if spec.speed == 'slow' else 'fast'}."),
    ]
    qa = [("What is moving in the video?", f"A {color_shape} is moving {spec.direction}.")]
    qa += rng.sample(pool, rng.randint(0, 2))
    return [{"i": "", "q": q, "a": a} for q, a in qa]


def _llava_conversation(rng: random.Random, spec: ImageSpec) -> List[Dict[str, str]]:
    turns = [("What shape is in the image?", f"It is a {spec.color} {spec.shape}.")]
    extra = [
        ("What color is the shape?", f"It is {spec.color}."),
        ("Describe the image briefly.", f"A {spec.color} {spec.shape} on a dark background."),
    ]
    turns += rng.sample(extra, rng.randint(0, 2))
    conv = []
    for j, (q, a) in enumerate(turns):
        conv.append({"from": "human", "value": ("<image>\n" + q) if j == 0 else q})
        conv.append({"from": "gpt", "value": a})
    return conv


def generate(
    out_dir: Union[str, Path],
    *,
    seed: int = 0,
    num_videos: int = 24,
    num_images: int = 12,
    width: int = 64,
    height: int = 64,
    fps: float = 8,
    duration: float = 2.0,
    gop: int = 12,
    image_size: Optional[int] = None,
    test_fraction: float = 0.25,
    broken: bool = True,
) -> Dict[str, Any]:
    """Write the whole synthetic data set (layout in the module docstring); return the manifest.

    ``num_images`` images go to ``cc_sbu_align`` and another ``num_images`` to ``llava``;
    ``image_size`` defaults to ``width``. The same arguments give byte-identical files.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    image_size = width if image_size is None else image_size
    t0 = time.perf_counter()

    # Videos + WebVid CSVs.
    videos, train_rows, test_rows, videochat = [], [], [], []
    for i, (spec, split) in enumerate(_clip_specs(rng, num_videos, test_fraction)):
        page_dir = f"{i // CLIPS_PER_PAGE:03d}"
        rel = f"videos/{page_dir}/{spec.name}.mp4"
        n = write_clip(out / rel, spec, width=width, height=height, fps=fps, duration=duration, gop=gop)
        caption = caption_for(spec)
        entry = asdict(spec)
        entry.update(videoid=spec.name, page_dir=page_dir, path=rel, split=split, caption=caption,
                     tone_hz=TONES[spec.tone] if spec.has_audio else None, num_frames=n, width=width,
                     height=height, fps=fps, duration=n / fps)
        if not spec.has_audio:
            entry["sample_rate"] = None
        videos.append(entry)
        row = {"videoid": spec.name, "contentUrl": f"https://example.invalid/synthetic/{spec.name}.mp4",
               "duration": _webvid_duration(n / fps), "page_dir": page_dir, "name": caption}
        (train_rows if split == "train" else test_rows).append(row)
        if split == "train":  # VideoChat instructions only on train clips
            videochat.append({"video": f"{page_dir}/{spec.name}.mp4", "QA": _videochat_qa(rng, spec)})
    half = (len(train_rows) + 1) // 2
    _write_csv(out / "webvid/train/part_0.csv", train_rows[:half])
    _write_csv(out / "webvid/train/part_1.csv", train_rows[half:])
    _write_csv(out / "webvid/test/part_0.csv", test_rows)

    _write_json(out / "videochat/videochat_instruct.json", videochat)

    # Images: cc_sbu_align captions and LLaVA conversations.
    images, annotations, llava = [], [], []
    for spec in _image_specs(rng, num_images, "synth_"):
        rel = f"cc_sbu_align/image/{spec.name}.jpg"
        write_image(out / rel, spec, size=image_size)
        annotations.append({"image_id": spec.name, "caption": caption_for(spec)})
        images.append({**asdict(spec), "dataset": "cc_sbu_align", "path": rel, "split": "train",
                       "caption": caption_for(spec), "has_audio": False})
    for i, spec in enumerate(_image_specs(rng, num_images, "")):
        spec.name = f"{FIRST_LLAVA_ID + i:012d}"
        rel = f"llava/train2014/COCO_train2014_{spec.name}.jpg"
        write_image(out / rel, spec, size=image_size)
        llava.append({"id": spec.name, "image": f"{spec.name}.jpg", "conversations": _llava_conversation(rng, spec)})
        images.append({**asdict(spec), "dataset": "llava", "path": rel, "split": "train",
                       "caption": caption_for(spec), "has_audio": False})
    _write_json(out / "cc_sbu_align/filter_cap.json", {"annotations": annotations})
    _write_json(out / "llava/llava_instruct.json", llava)

    broken_files = _write_broken(out / "broken", rng, width=width, height=height, fps=fps, gop=gop) if broken else []

    manifest = {
        "seed": seed,
        "params": {"num_videos": num_videos, "num_images": num_images, "width": width, "height": height,
                   "fps": fps, "duration": duration, "gop": gop, "image_size": image_size,
                   "test_fraction": test_fraction},
        "vocab": {"shape": list(SHAPES), "color": list(COLORS), "direction": list(DIRECTIONS),
                  "speed": list(SPEEDS), "tone": TONES},
        "annotations": {"webvid_train": "webvid/train", "webvid_test": "webvid/test", "videos_dir": "videos",
                        "cc_sbu_align": "cc_sbu_align", "llava": "llava/llava_instruct.json",
                        "llava_images": "llava/train2014", "videochat": "videochat/videochat_instruct.json"},
        "videos": videos,
        "images": images,
        "broken": broken_files,
    }
    _write_json(out / "manifest.json", manifest)
    logger.info("synthetic data set: %d clips, %d images in %s (%.1f s)", len(videos), len(images), out,
                time.perf_counter() - t0)
    return manifest


def _write_broken(
    root: Path, rng: random.Random, *, width: int, height: int, fps: float, gop: int
) -> List[Dict[str, str]]:
    """The deliberately bad files a loader must survive; returns their manifest entries."""
    root.mkdir(parents=True, exist_ok=True)
    seed = rng.randrange(2**31)
    spec = ClipSpec(name="broken", shape="square", color="red", direction="right", speed="slow", seed=seed)
    entries = []

    (root / "zero_byte.mp4").write_bytes(b"")
    entries.append(("zero_byte.mp4", "zero_byte", "empty file"))

    write_clip(root / "truncated.mp4", spec, width=width, height=height, fps=fps, duration=4.0, gop=gop)
    data = (root / "truncated.mp4").read_bytes()
    (root / "truncated.mp4").write_bytes(data[: int(len(data) * 0.4)])
    entries.append(("truncated.mp4", "truncated", f"valid clip cut to 40% of its {len(data)} bytes"))

    (root / "text.mp4").write_bytes(b"This is a text file, not a video.\n" * 4)
    entries.append(("text.mp4", "text", "text file named .mp4"))

    write_audio_only(root / "audio_only.mp4", tone="low", sample_rate=16000, duration=1.0)
    entries.append(("audio_only.mp4", "audio_only", "AAC stream only, no video stream"))

    write_clip(root / "one_frame.mp4", spec, width=width, height=height, fps=fps, num_frames=1, gop=gop)
    entries.append(("one_frame.mp4", "one_frame", "valid H.264 clip with exactly one frame"))

    # A JPEG start-of-image marker followed by noise: identified as JPEG, fails to decode.
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(rng.randrange(256) for _ in range(508)))
    entries.append(("corrupt.jpg", "corrupt_image", "JPEG marker followed by random bytes"))
    return [{"path": f"broken/{name}", "kind": kind, "description": desc} for name, kind, desc in entries]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m videollm.synthetic", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-videos", type=int, default=24)
    parser.add_argument("--num-images", type=int, default=12)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--fps", type=float, default=8)
    parser.add_argument("--duration", type=float, default=2.0, help="seconds per clip")
    parser.add_argument("--gop", type=int, default=12, help="keyframe interval in frames")
    parser.add_argument("--test-fraction", type=float, default=0.25)
    parser.add_argument("--no-broken", action="store_true", help="skip the broken/ files")
    args = parser.parse_args(argv)
    fps = int(args.fps) if float(args.fps).is_integer() else args.fps
    t0 = time.perf_counter()
    m = generate(args.out, seed=args.seed, num_videos=args.num_videos, num_images=args.num_images, width=args.width,
                 height=args.height, fps=fps, duration=args.duration, gop=args.gop,
                 test_fraction=args.test_fraction, broken=not args.no_broken)
    n_test = sum(v["split"] == "test" for v in m["videos"])
    n_audio = sum(v["has_audio"] for v in m["videos"])
    print(f"wrote {len(m['videos'])} clips ({len(m['videos']) - n_test} train, {n_test} test, {n_audio} with audio), "
          f"{len(m['images'])} images, {len(m['broken'])} broken files to {args.out} "
          f"in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
