"""Tests of videollm.synthetic: the decoded media really show (and sound like) what the annotations say."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import av
import decord
import numpy as np
import pytest
from PIL import Image

from videollm.errors import ConfigError, DataError
from videollm.synthetic import (
    BACKGROUND,
    COLORS,
    DIRECTION_VECTORS,
    SHAPES,
    TONES,
    WEBVID_HEADER,
    ClipSpec,
    ImageSpec,
    caption_for,
    generate,
    write_clip,
    write_image,
)

ANNOTATION_FILES = (
    "manifest.json",
    "webvid/train/part_0.csv",
    "webvid/train/part_1.csv",
    "webvid/test/part_0.csv",
    "cc_sbu_align/filter_cap.json",
    "llava/llava_instruct.json",
    "videochat/videochat_instruct.json",
)


# ---------------------------------------------------------------------------- helpers


def pyav_frames(path: Path) -> np.ndarray:
    """All frames ``(T, H, W, 3)`` uint8 decoded by PyAV."""
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def decord_frames(path: Path) -> np.ndarray:
    """All frames ``(T, H, W, 3)`` uint8 decoded by decord (whatever bridge another test set)."""
    vr = decord.VideoReader(str(path))
    batch = vr.get_batch(list(range(len(vr))))
    return batch.asnumpy() if hasattr(batch, "asnumpy") else np.asarray(batch)


def pyav_audio(path: Path):
    """``(samples (N,) float32 of channel 0, sample_rate)`` decoded by PyAV."""
    with av.open(str(path)) as container:
        rate = container.streams.audio[0].rate
        chunks = [f.to_ndarray().reshape(f.to_ndarray().shape[0], -1)[0] for f in container.decode(audio=0)]
    return np.concatenate(chunks).astype(np.float32), rate


def foreground(frame: np.ndarray) -> np.ndarray:
    """Boolean ``(H, W)``: pixels clearly different from the background."""
    return np.abs(frame.astype(np.int32) - np.array(BACKGROUND)).sum(-1) > 120


def nearest_color(frame: np.ndarray, mask: np.ndarray) -> str:
    mean = frame[mask].astype(np.float64).mean(0)
    return min(COLORS, key=lambda c: float(np.sum((mean - np.array(COLORS[c])) ** 2)))


def centroid(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return np.array([xs.mean(), ys.mean()])


def shape_of(mask: np.ndarray) -> str:
    """Classify by how much of its bounding box the shape fills (square 1, circle pi/4, triangle 1/2)."""
    ys, xs = np.nonzero(mask)
    fill = mask.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    return "square" if fill > 0.9 else "circle" if fill > 0.65 else "triangle"


def dominant_hz(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.argmax(spectrum) * rate / len(samples))


@pytest.fixture(scope="module")
def manifest(synthetic_root: Path) -> dict:
    return json.loads((synthetic_root / "manifest.json").read_text())


def read_csv_dir(directory: Path):
    rows = []
    files = sorted(directory.glob("*.csv"))
    for f in files:
        with f.open(newline="") as fh:
            reader = csv.DictReader(fh)
            assert tuple(reader.fieldnames) == WEBVID_HEADER, f
            rows.extend(reader)
    return files, rows


# ---------------------------------------------------------------------------- determinism


def test_same_seed_gives_identical_files_and_frames(synthetic_root: Path, tmp_path: Path, manifest: dict):
    again = tmp_path / "again"
    generate(again, seed=0)
    for rel in ANNOTATION_FILES:
        assert (again / rel).read_bytes() == (synthetic_root / rel).read_bytes(), rel
    for v in manifest["videos"]:
        np.testing.assert_array_equal(pyav_frames(again / v["path"]), pyav_frames(synthetic_root / v["path"]))
    for im in manifest["images"]:
        assert (again / im["path"]).read_bytes() == (synthetic_root / im["path"]).read_bytes()


def test_other_seed_differs(synthetic_root: Path, tmp_path: Path, manifest: dict):
    other = tmp_path / "other"
    m1 = generate(other, seed=1, broken=False)
    assert (other / "manifest.json").read_bytes() != (synthetic_root / "manifest.json").read_bytes()
    assert (other / "webvid/train/part_0.csv").read_bytes() != (synthetic_root / "webvid/train/part_0.csv").read_bytes()
    differing = sum(
        not np.array_equal(pyav_frames(other / a["path"]), pyav_frames(synthetic_root / b["path"]))
        for a, b in zip(m1["videos"], manifest["videos"])
    )
    assert differing >= len(manifest["videos"]) // 2
    assert not (other / "broken").exists()


# ---------------------------------------------------------------------------- clips


def test_defaults_cover_every_attribute(manifest: dict):
    videos = manifest["videos"]
    assert len(videos) == 24 and len(manifest["images"]) == 24
    train = [v for v in videos if v["split"] == "train"]
    vocab = {"shape": SHAPES, "color": COLORS, "direction": DIRECTION_VECTORS, "speed": ("slow", "fast")}
    for key, values in vocab.items():
        assert {v[key] for v in train} == set(values), key
    assert 0.3 <= np.mean([v["has_audio"] for v in videos]) <= 0.7
    audio = [v for v in videos if v["has_audio"]]
    assert {v["tone"] for v in audio} == set(TONES)
    assert {v["sample_rate"] for v in audio} == {16000, 44100}


def test_every_clip_decodes_with_pyav_and_decord(synthetic_root: Path, manifest: dict):
    for v in manifest["videos"]:
        path = synthetic_root / v["path"]
        assert v["num_frames"] == 16
        a, d = pyav_frames(path), decord_frames(path)
        assert a.shape == d.shape == (16, 64, 64, 3), v["path"]
        assert np.abs(a.astype(int) - d.astype(int)).mean() < 3.0  # same picture from both decoders
        with av.open(str(path)) as c:
            s = c.streams.video[0]
            assert (s.codec_context.name, s.codec_context.pix_fmt) == ("h264", "yuv420p")
            assert float(s.average_rate) == 8


def test_audio_present_exactly_where_manifest_says_with_right_pitch(synthetic_root: Path, manifest: dict):
    for v in manifest["videos"]:
        path = synthetic_root / v["path"]
        with av.open(str(path)) as c:
            kinds = sorted(s.type for s in c.streams)
        assert kinds == (["audio", "video"] if v["has_audio"] else ["video"]), v["path"]
        if v["has_audio"]:
            samples, rate = pyav_audio(path)
            assert rate == v["sample_rate"]
            assert len(samples) >= 0.95 * v["duration"] * rate
            assert abs(dominant_hz(samples, rate) - TONES[v["tone"]]) < 5.0, v["path"]
            assert v["tone_hz"] == TONES[v["tone"]]


def test_clip_pixels_match_caption(synthetic_root: Path, manifest: dict):
    for v in manifest["videos"]:
        frames = pyav_frames(synthetic_root / v["path"])
        first, last = foreground(frames[0]), foreground(frames[-1])
        # Big enough to see: at least ~1/20 of the frame (the bounding box side is ~1/3).
        assert first.sum() > 64 * 64 / 20, v["path"]
        assert nearest_color(frames[0], first) == v["color"], v["path"]
        assert shape_of(first) == v["shape"], v["path"]
        assert v["caption"] == f"a {v['color']} {v['shape']} moving {v['direction']}"
        # Default clips fit their whole trip inside the frame, so first -> last shows the direction.
        move = centroid(last) - centroid(first)
        expected = np.array(DIRECTION_VECTORS[v["direction"]])
        along = float(move @ expected)
        assert along > 8 and abs(float(move @ expected[::-1])) < 1.5, (v["path"], move)
        # slow travels ~29 px in 15 frames at 64 px (26.5-31 with jitter), fast ~38 px (35-41.5).
        assert (along > 33) == (v["speed"] == "fast"), (v["path"], along)


def test_wrap_around_keeps_direction_and_long_gop(tmp_path: Path):
    spec = ClipSpec(name="w", shape="square", color="green", direction="left", speed="fast", seed=5)
    path = tmp_path / "wrap.mp4"
    n = write_clip(path, spec, width=64, height=48, fps=10, duration=30, gop=250)
    assert n == 300
    with av.open(str(path)) as c:
        keyframes = [i for i, p in enumerate(c.demux(video=0)) if p.size and p.is_keyframe]
    assert keyframes == [0, 250]
    frames = pyav_frames(path)
    assert frames.shape == (300, 48, 64, 3)
    masks = [foreground(f) for f in frames]
    full = max(m.sum() for m in masks)
    # x of the centroid in every frame where the whole shape is visible, then its steps.
    xs = np.array([centroid(m)[0] for m in masks if m.sum() > 0.95 * full])
    steps = np.diff(xs)
    assert len(xs) > 150  # fully visible in (64 - 16) of every (64 + 16) px of travel
    assert np.median(steps) < -1.0  # moving left, ~2 px per frame
    assert (steps > 10).sum() >= 1  # it wrapped: re-entered on the right at least once
    assert (steps > 1).sum() <= 10  # but never walked back right


def test_write_clip_hd_size_and_rejects_odd_sizes(tmp_path: Path):
    spec = ClipSpec(name="hd", shape="circle", color="blue", direction="down", speed="slow", has_audio=True,
                    tone="high", sample_rate=44100)
    path = tmp_path / "hd.mp4"
    write_clip(path, spec, width=1280, height=720, fps=30, duration=1, gop=300, crf=None, bitrate=2_000_000)
    frames = decord_frames(path)
    assert frames.shape == (30, 720, 1280, 3)
    assert nearest_color(frames[5], foreground(frames[5])) == "blue"
    with pytest.raises(ConfigError, match="odd.mp4.*even"):
        write_clip(tmp_path / "odd.mp4", spec, width=63, height=64)


def test_specs_validate_attributes():
    with pytest.raises(DataError, match="x1: color='purple'"):
        ClipSpec(name="x1", shape="circle", color="purple", direction="left", speed="slow")
    with pytest.raises(DataError, match="tone"):
        ClipSpec(name="x2", shape="circle", color="red", direction="left", speed="slow", has_audio=True, tone="mid")
    with pytest.raises(DataError, match="shape"):
        ImageSpec(name="x3", shape="hexagon", color="red")
    assert caption_for(ImageSpec(name="i", shape="square", color="yellow")) == "a yellow square"


# ---------------------------------------------------------------------------- images


def test_images_match_caption(synthetic_root: Path, manifest: dict, tmp_path: Path):
    for im in manifest["images"]:
        rgb = np.asarray(Image.open(synthetic_root / im["path"]).convert("RGB"))
        assert rgb.shape == (64, 64, 3)
        mask = foreground(rgb)
        assert nearest_color(rgb, mask) == im["color"], im["path"]
        assert shape_of(mask) == im["shape"], im["path"]
        assert im["caption"] == f"a {im['color']} {im['shape']}"
    # Position varies with the seed.
    spec = ImageSpec(name="p", shape="circle", color="red")
    centres = set()
    for seed in range(4):
        write_image(tmp_path / f"{seed}.jpg", spec, size=(96, 64), seed=seed)
        rgb = np.asarray(Image.open(tmp_path / f"{seed}.jpg").convert("RGB"))
        assert rgb.shape == (64, 96, 3)
        centres.add(tuple(np.round(centroid(foreground(rgb)))))
    assert len(centres) >= 3


# ---------------------------------------------------------------------------- annotations


def test_webvid_csvs(synthetic_root: Path, manifest: dict):
    by_id = {v["videoid"]: v for v in manifest["videos"]}
    train_files, train = read_csv_dir(synthetic_root / "webvid/train")
    test_files, test = read_csv_dir(synthetic_root / "webvid/test")
    assert len(train_files) == 2 and len(test_files) == 1
    assert len(train) == 18 and len(test) == 6
    for row, split in [(r, "train") for r in train] + [(r, "test") for r in test]:
        assert row["videoid"].isdigit()
        v = by_id[row["videoid"]]
        assert (v["split"], v["caption"], v["page_dir"]) == (split, row["name"], row["page_dir"])
        assert (synthetic_root / "videos" / row["page_dir"] / f"{row['videoid']}.mp4").is_file()
        assert row["duration"].startswith("PT")
    assert not {r["videoid"] for r in train} & {r["videoid"] for r in test}
    combo = lambda v: (v["shape"], v["color"], v["direction"], v["speed"])  # noqa: E731
    train_combos = {combo(by_id[r["videoid"]]) for r in train}
    test_videos = [by_id[r["videoid"]] for r in test]
    assert all(combo(v) in train_combos for v in test_videos)
    # Same combination, different clip: frames differ from every train clip of that combination.
    for v in test_videos:
        twin = next(by_id[r["videoid"]] for r in train if combo(by_id[r["videoid"]]) == combo(v))
        assert v["seed"] != twin["seed"]
        assert not np.array_equal(pyav_frames(synthetic_root / v["path"]), pyav_frames(synthetic_root / twin["path"]))


def test_cc_sbu_align_and_llava(synthetic_root: Path, manifest: dict):
    cap = json.loads((synthetic_root / "cc_sbu_align/filter_cap.json").read_text())
    images = {im["name"]: im for im in manifest["images"]}
    assert len(cap["annotations"]) == 12
    for a in cap["annotations"]:
        assert set(a) == {"image_id", "caption"}
        assert (synthetic_root / "cc_sbu_align/image" / f"{a['image_id']}.jpg").is_file()
        assert a["caption"] == images[a["image_id"]]["caption"]

    llava = json.loads((synthetic_root / "llava/llava_instruct.json").read_text())
    assert len(llava) == 12
    for item in llava:
        assert set(item) == {"id", "image", "conversations"}
        assert len(item["image"]) == len("000000000000.jpg") and item["image"][:12].isdigit()
        assert (synthetic_root / "llava/train2014" / f"COCO_train2014_{item['image']}").is_file()
        im = images[item["id"]]
        conv = item["conversations"]
        assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2) and len(conv) >= 2
        assert conv[0]["value"].startswith("<image>\n")
        assert sum("<image>" in t["value"] for t in conv) == 1
        for t in conv[1::2]:
            assert im["color"] in t["value"]
        assert f"{im['color']} {im['shape']}" in conv[1]["value"]


def test_videochat_instruct(synthetic_root: Path, manifest: dict):
    by_path = {f"{v['page_dir']}/{v['videoid']}.mp4": v for v in manifest["videos"]}
    items = json.loads((synthetic_root / "videochat/videochat_instruct.json").read_text())
    assert len(items) == 18
    words = {"shape": SHAPES, "color": tuple(COLORS), "direction": tuple(DIRECTION_VECTORS)}
    for item in items:
        assert set(item) == {"video", "QA"}
        assert (synthetic_root / "videos" / item["video"]).is_file()
        v = by_path[item["video"]]
        assert v["split"] == "train"
        assert 1 <= len(item["QA"]) <= 3
        assert item["QA"][0]["a"] == f"A {v['color']} {v['shape']} is moving {v['direction']}."
        for qa in item["QA"]:
            assert set(qa) == {"i", "q", "a"} and qa["q"].endswith("?")
            for key, vocab in words.items():  # any attribute word an answer names is the true one
                named = {w for w in vocab if w in qa["a"].lower().replace(".", " ").split()}
                assert named <= {v[key]}, (item["video"], qa)


def test_manifest_paths_exist(synthetic_root: Path, manifest: dict):
    for entry in manifest["videos"] + manifest["images"] + manifest["broken"]:
        assert (synthetic_root / entry["path"]).is_file(), entry["path"]
    assert {b["kind"] for b in manifest["broken"]} == {
        "zero_byte", "truncated", "text", "audio_only", "one_frame", "corrupt_image"}


# ---------------------------------------------------------------------------- broken files


def test_broken_files_are_what_they_claim(synthetic_root: Path):
    b = synthetic_root / "broken"
    assert (b / "zero_byte.mp4").stat().st_size == 0
    with pytest.raises(av.error.FFmpegError):
        with av.open(str(b / "text.mp4")) as c:
            list(c.decode(video=0))
    try:
        got = len(pyav_frames(b / "truncated.mp4"))
    except (av.error.FFmpegError, ValueError):
        got = 0
    assert got < 32  # the full clip would have 4 s x 8 fps frames
    assert (b / "truncated.mp4").stat().st_size > 0
    with av.open(str(b / "audio_only.mp4")) as c:
        assert [s.type for s in c.streams] == ["audio"]
    samples, rate = pyav_audio(b / "audio_only.mp4")
    assert abs(dominant_hz(samples, rate) - TONES["low"]) < 5
    assert len(pyav_frames(b / "one_frame.mp4")) == 1
    assert len(decord.VideoReader(str(b / "one_frame.mp4"))) == 1
    assert (b / "corrupt.jpg").read_bytes()[:2] == b"\xff\xd8"
    with pytest.raises(OSError):  # PIL's UnidentifiedImageError or "broken data stream"
        Image.open(b / "corrupt.jpg").load()


# ---------------------------------------------------------------------------- CLI


def test_cli(tmp_path: Path):
    out = tmp_path / "cli"
    proc = subprocess.run(
        [sys.executable, "-m", "videollm.synthetic", "--out", str(out), "--seed", "3", "--num-videos", "5",
         "--num-images", "2", "--width", "48", "--height", "32", "--fps", "6", "--duration", "1.5"],
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and "5 clips" in lines[0] and str(out) in lines[0]
    m = json.loads((out / "manifest.json").read_text())
    assert len(m["videos"]) == 5 and len(m["images"]) == 4
    assert pyav_frames(out / m["videos"][0]["path"]).shape == (9, 32, 48, 3)
    bad = subprocess.run([sys.executable, "-m", "videollm.synthetic"], capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parents[1])
    assert bad.returncode != 0 and "--out" in bad.stderr
