"""Synthetic event-boundary data in the Kinetic-GEBC layout, for the tiny LLMVA-GEBC recipe and tests.

Each clip shows one shape (circle, square, triangle) on the dark background of
:mod:`videollm.synthetic`, starting at the centre and moving one way. At one or two known times
(the event boundaries) its state changes: either its colour ("Change of Color") or its
direction of motion ("Change of Direction"). Every boundary gets the three GEBC captions::

    subject        "the circle"
    status_before  "the red circle is moving left"
    status_after   "the red circle is moving up"

with ``timestamp`` the change time and ``prev_timestamp`` / ``next_timestamp`` the neighbouring
boundaries (or 0 and the duration), so with two boundaries per clip only the boundary's
reference point tells which state is "before". Written by :func:`generate` under ``out``::

    videos/<id>.mp4                    H.264, 64x64, 8 fps, 4 s (ids: 11 characters, "syn00000000")
    annotations/{train,val,test}.json  GEBC annotation dicts (test without captions)
    annotations/video_info.json        {id: duration}
    features/pixels/<id>.pkl           the "other" feature: per frame, the frame average-pooled
                                       to 4x4 RGB in [0, 1] -> (32, 48) float32 (a stand-in for CLIP)

The Q-Former token features are then extracted from the videos with ``python -m
videollm.features gebc-qformer`` (the recipe ``train_configs/llmva_gebc_tiny_synthetic.yaml``
gives the commands). Deterministic for a seed.
"""

from __future__ import annotations

import argparse
import json
import pickle
import random
import sys
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from videollm.synthetic import BACKGROUND, COLORS, DIRECTIONS, SHAPES, shape_mask, shape_size

DIRECTION_XY = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
LABELS = ("Change of Color", "Change of Direction")
POOL = 4  # pixels feature: POOL x POOL x 3


@dataclass
class Segment:
    start: float
    color: str
    direction: str


@dataclass
class BoundaryClip:
    vid: str
    shape: str
    segments: List[Segment]
    labels: List[str] = field(default_factory=list)  # one per boundary (len(segments) - 1)
    duration: float = 4.0

    def state(self, t: float) -> Segment:
        cur = self.segments[0]
        for seg in self.segments:
            if seg.start <= t:
                cur = seg
        return cur

    def caption(self, seg: Segment) -> str:
        return f"the {seg.color} {self.shape} is moving {seg.direction}"

    def boundaries(self) -> List[Dict[str, object]]:
        times = [s.start for s in self.segments[1:]]
        out = []
        for k, t in enumerate(times):
            before, after = self.segments[k], self.segments[k + 1]
            out.append({
                "boundary_id": f"{self.vid}_{k}",
                "timestamp": round(t, 3),
                "prev_timestamp": round(times[k - 1], 3) if k > 0 else 0,
                "next_timestamp": round(times[k + 1], 3) if k + 1 < len(times) else self.duration,
                "label": self.labels[k],
                "subject": f"the {self.shape}",
                "status_before": self.caption(before),
                "status_after": self.caption(after),
            })
        return out


def draw_clip(rng: random.Random, vid: str, duration: float = 4.0) -> BoundaryClip:
    """A random clip: shape, start state, 1 or 2 boundaries at least 1 s apart, each a colour or a direction change."""
    shape = rng.choice(SHAPES)
    seg = Segment(0.0, rng.choice(tuple(COLORS)), rng.choice(DIRECTIONS))
    n = rng.choice((1, 2))
    if n == 1:
        times = [round(rng.uniform(1.2, duration - 1.2), 2)]
    else:
        t1 = round(rng.uniform(0.9, 1.7), 2)
        times = [t1, round(rng.uniform(t1 + 1.0, duration - 0.9), 2)]
    segments, labels = [seg], []
    for t in times:
        label = rng.choice(LABELS)
        cur = segments[-1]
        if label == "Change of Color":
            new = Segment(t, rng.choice([c for c in COLORS if c != cur.color]), cur.direction)
        else:
            new = Segment(t, cur.color, rng.choice([d for d in DIRECTIONS if d != cur.direction]))
        segments.append(new)
        labels.append(label)
    return BoundaryClip(vid, shape, segments, labels, duration)


def render(clip: BoundaryClip, *, size: int = 64, fps: float = 8.0) -> np.ndarray:
    """Frames (T, size, size, 3) uint8: the shape starts centred, moves at 6 px/s (in a 64 px frame)."""
    n = int(round(clip.duration * fps))
    side = shape_size(size, size)
    speed = 6.0 * size / 64.0
    frames = np.empty((n, size, size, 3), dtype=np.uint8)
    frames[:] = BACKGROUND
    x = y = (size - side) / 2.0
    masks = {s: shape_mask(s, side) for s in SHAPES}
    for i in range(n):
        t = i / fps
        state = clip.state(t)
        if i > 0:
            dx, dy = DIRECTION_XY[clip.state((i - 1) / fps).direction]
            x = min(max(x + dx * speed / fps, 0.0), size - side)
            y = min(max(y + dy * speed / fps, 0.0), size - side)
        xi, yi = int(round(x)), int(round(y))
        region = frames[i, yi : yi + side, xi : xi + side]
        region[masks[clip.shape]] = COLORS[state.color]
    return frames


def pixel_features(frames: np.ndarray) -> np.ndarray:
    """(T, S, S, 3) uint8 -> (T, POOL*POOL*3) float32: average pooling to POOL x POOL, in [0, 1]."""
    t, s = frames.shape[:2]
    k = s // POOL
    pooled = frames[:, : k * POOL, : k * POOL].reshape(t, POOL, k, POOL, k, 3).mean(axis=(2, 4)) / 255.0
    return pooled.reshape(t, -1).astype(np.float32)


def write_mp4(path: Path, frames: np.ndarray, fps: float = 8.0) -> None:
    import av

    rate = Fraction(fps).limit_denominator(1001)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        cc = stream.codec_context
        cc.thread_count = 1
        cc.gop_size = 8
        cc.time_base = 1 / rate
        cc.options = {"preset": "ultrafast", "crf": "18", "x264-params": "scenecut=0"}
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


def generate(out: str, num_videos: int = 240, seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.05,
             size: int = 64, fps: float = 8.0, duration: float = 4.0) -> Dict[str, int]:
    """Write the layout of the module doc; returns {split: number of boundaries}."""
    rng = random.Random(seed)
    root = Path(out)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "features" / "pixels").mkdir(parents=True, exist_ok=True)
    splits: Dict[str, Dict[str, list]] = {"train": {}, "val": {}, "test": {}}
    info: Dict[str, float] = {}
    n_val = max(1, int(round(num_videos * val_fraction)))
    n_test = max(1, int(round(num_videos * test_fraction)))
    for i in range(num_videos):
        vid = f"syn{i:08d}"
        clip = draw_clip(rng, vid, duration)
        frames = render(clip, size=size, fps=fps)
        write_mp4(root / "videos" / f"{vid}.mp4", frames, fps)
        with open(root / "features" / "pixels" / f"{vid}.pkl", "wb") as f:
            pickle.dump(pixel_features(frames), f)
        split = "val" if i < n_val else "test" if i < n_val + n_test else "train"
        bounds = clip.boundaries()
        if split == "test":
            bounds = [{k: b[k] for k in ("boundary_id", "timestamp", "prev_timestamp", "next_timestamp", "label")}
                      for b in bounds]
        splits[split][vid] = bounds
        info[vid] = duration
    for split, data in splits.items():
        (root / "annotations" / f"{split}.json").write_text(json.dumps(data, indent=1) + "\n")
    (root / "annotations" / "video_info.json").write_text(json.dumps(info, indent=1) + "\n")
    return {s: sum(len(v) for v in d.values()) for s, d in splits.items()}


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m videollm.gebc_synthetic", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--num-videos", type=int, default=240)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    counts = generate(args.out, args.num_videos, args.seed)
    print(f"boundaries per split: {counts} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
