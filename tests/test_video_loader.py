"""Tests of videollm.processors.video_loader: backends, sampling, messages, timeouts, errors."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path
from typing import List, Sequence

import av
import numpy as np
import pytest
import torch

from videollm.errors import ConfigError, VideoDecodeError
from videollm.processors import video_loader as vl
from videollm.processors.video_loader import (
    VideoBackend,
    VideoReader,
    decode_video,
    load_video,
    sample_indices,
    uniform_indices,
)

BACKENDS = ("pyav", "decord", "torchcodec")
USABLE = vl.available_backends()
FPS = 25


def write_test_clip(path: Path, num_frames: int, *, width: int = 160, height: int = 120, gop: int = 12,
                    faststart: bool = False) -> Path:
    """H.264 with B-frames (preset veryfast) showing a textured, moving pattern."""
    rng = np.random.default_rng(num_frames)
    texture = rng.integers(0, 256, (height, 2 * width, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:height, 0:width]
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", format="mp4", options=options) as c:
        s = c.add_stream("libx264", rate=FPS)
        s.width, s.height, s.pix_fmt = width, height, "yuv420p"
        s.codec_context.gop_size = gop
        s.codec_context.thread_count = 1
        s.codec_context.options = {"preset": "veryfast", "crf": "20", "x264-params": "scenecut=0"}
        for i in range(num_frames):
            img = texture[:, 2 * i % width : 2 * i % width + width].copy()
            img[((yy // 10 + xx // 10 + i) % 2 == 0)] //= 2  # moving checker on top
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts = i
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)
    return path


def key_frames_by_packet_flags(path: Path) -> List[int]:
    """Presentation indices of the packets flagged as key frames, read independently with PyAV."""
    with av.open(str(path)) as c:
        pk = [(p.pts, p.is_keyframe) for p in c.demux(c.streams.video[0]) if p.size]
    order = sorted(pts for pts, _ in pk)
    return sorted(order.index(pts) for pts, key in pk if key)


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("clips")
    out = {
        "main": write_test_clip(root / "main.mp4", 50),
        "long_gop": write_test_clip(root / "long_gop.mp4", 120, width=96, height=64, gop=40),
        "faststart": write_test_clip(root / "faststart.mp4", 50, faststart=True),
    }
    data = out["faststart"].read_bytes()
    (root / "fs_truncated.mp4").write_bytes(data[: len(data) // 2])  # moov kept, media cut
    (root / "fs_nodata.mp4").write_bytes(data[: data.find(b"mdat") + 4])  # moov kept, no frames
    out["fs_truncated"] = root / "fs_truncated.mp4"
    out["fs_nodata"] = root / "fs_nodata.mp4"
    (root / "a_directory.mp4").mkdir()
    out["directory"] = root / "a_directory.mp4"
    return out


@pytest.fixture(scope="module")
def reference_frames(clips: dict) -> np.ndarray:
    """Every frame of the main clip, decoded sequentially by plain PyAV: (50, 120, 160, 3)."""
    with av.open(str(clips["main"])) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


# ----------------------------------------------------------------------------------------
# Backends and pixels
# ----------------------------------------------------------------------------------------


def test_pyav_and_decord_are_usable_here() -> None:
    assert "pyav" in USABLE and "decord" in USABLE


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_full_resolution_is_bit_exact(backend: str, clips: dict, reference_frames: np.ndarray) -> None:
    status = vl.backend_status()[backend]
    if status is not None:  # an unusable backend must say why and refuse clearly
        assert len(status) > 10
        with pytest.raises(VideoDecodeError, match=backend):
            load_video(clips["main"], backend=backend)
        return
    d = decode_video(clips["main"], 50, backend=backend)
    assert d.indices == list(range(50)) and d.num_frames == 50 and d.fps == FPS
    np.testing.assert_array_equal(d.frames, reference_frames)
    # Sparse, out-of-GOP access (seeks backwards and forwards) gives the same pixels.
    d = decode_video(clips["main"], 7, sampling="middle", backend=backend)
    np.testing.assert_array_equal(d.frames, reference_frames[d.indices])


@pytest.mark.parametrize("size", [(48, 64), (224, 224), (100, 160), (30, -1), (240, 90)])
def test_pyav_resize_matches_decord_bit_exactly(size: tuple, clips: dict) -> None:
    h, w = size
    ours = load_video(clips["main"], 50, h, w, backend="pyav")
    ref = load_video(clips["main"], 50, h, w, backend="decord")
    assert ours.shape == ref.shape == (3, 50, h, w if w > 0 else 160)
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("width", [100, 224])
def test_width_only_resize_matches_decord_but_the_last_row(width: int, clips: dict) -> None:
    # Known limit: with the height unchanged, PyAV's FFmpeg 8 swscale and decord's bundled
    # FFmpeg 4.1 swscale differ; our chroma-position fix leaves only the last row different.
    ours = load_video(clips["main"], 8, 120, width, backend="pyav")
    ref = load_video(clips["main"], 8, 120, width, backend="decord")
    assert ours.shape == ref.shape == (3, 8, 120, width)
    assert torch.equal(ours[:, :, :-1], ref[:, :, :-1])
    assert (ours - ref).abs().mean() < 0.2


def test_torchcodec_resize_is_close_but_auto_skips_it(clips: dict) -> None:
    assert vl.TorchCodecBackend.exact_resize is False
    assert vl.get_backend("auto", resize=True).name != "torchcodec"
    if "torchcodec" in USABLE:
        tc = load_video(clips["main"], 8, 224, 224, backend="torchcodec")
        ref = load_video(clips["main"], 8, 224, 224, backend="decord")
        assert tc.shape == ref.shape
        assert 0 < (tc - ref).abs().mean() < 8  # a few grey levels on this noisy texture


def test_load_video_output_and_short_video(clips: dict) -> None:
    x = load_video(clips["main"], 8, 224, 224)
    assert x.shape == (3, 8, 224, 224) and x.dtype == torch.float32
    assert 0 <= x.min() and x.max() <= 255 and torch.equal(x, x.round())
    # fewer frames than asked: n_frms = min(n_frms, vlen), all frames returned in order
    y = load_video(clips["main"], 100)
    assert y.shape[1] == 50


# ----------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("vlen,n", [(50, 8), (100, 8), (9, 8), (8, 8), (1000, 32), (17, 7), (31, 29), (3, 1)])
def test_uniform_is_the_original_formula(vlen: int, n: int) -> None:
    expected = np.arange(0, vlen, vlen / n).astype(int).tolist()
    assert uniform_indices(vlen, n) == expected == sample_indices(vlen, n, "uniform")
    assert expected[0] == 0
    if (vlen, n) == (17, 7):  # the float quirk kept on purpose: n + 1 indices
        assert len(expected) == 8


def test_headtail_reproduces_the_original_draws_with_the_global_rng() -> None:
    random.seed(123)
    got = sample_indices(50, 8, "headtail")
    random.seed(123)
    head = sorted(random.sample(range(25), 4))
    tail = sorted(random.sample(range(25, 50), 4))
    assert got == head + tail
    assert all(i < 25 for i in got[:4]) and all(25 <= i < 50 for i in got[4:])
    assert len(sample_indices(50, 7, "headtail")) == 6  # odd n loses one frame, as in the original


def test_random_modes_follow_the_rng_passed() -> None:
    for mode in ("headtail", "rand"):
        a = sample_indices(200, 8, mode, rng=torch.Generator().manual_seed(5))
        b = sample_indices(200, 8, mode, rng=torch.Generator().manual_seed(5))
        c = sample_indices(200, 8, mode, rng=random.Random(5))
        d = sample_indices(200, 8, mode, rng=random.Random(5))
        assert a == b and c == d and len(a) == len(c) == 8
        draws = {tuple(sample_indices(200, 8, mode, rng=random.Random(s))) for s in range(10)}
        assert len(draws) > 5


def test_rand_and_middle_take_one_frame_per_segment() -> None:
    edges = [0, 12, 25, 37, 50]
    for _ in range(20):
        r = sample_indices(50, 4, "rand", rng=random.Random(_))
        assert all(edges[k] <= r[k] < edges[k + 1] for k in range(4))
    assert sample_indices(50, 4, "middle") == [6, 18, 31, 43]
    assert sample_indices(3, 3, "middle") == [0, 1, 2]


def test_fps_sampling_and_max_frames() -> None:
    assert sample_indices(250, 8, "fps", native_fps=25, fps=1) == list(range(0, 250, 25))
    half = sample_indices(250, 8, "fps", native_fps=25, fps=2)
    assert half[:3] == [0, 12, 25] and len(half) == 20
    capped = sample_indices(250, 8, "fps", native_fps=25, fps=1, max_frames=4)
    assert capped == [0, 75, 150, 225]
    with pytest.raises(ValueError, match="fps"):
        sample_indices(250, 8, "fps", native_fps=0, fps=1)


def test_keyframe_sampling_picks_nearest_key_frames() -> None:
    assert vl.nearest_key_frames([0, 15, 20, 29, 31, 119], [0, 40, 80]) == [0, 0, 0, 40, 40, 80]
    assert vl.nearest_key_frames([20, 60], [0, 40, 80]) == [0, 40]  # ties go to the earlier one
    assert sample_indices(120, 4, "keyframe", key_frames=[0, 40, 80]) == [0, 40, 40, 80]  # from [0, 30, 60, 90]


def test_unknown_sampling_and_backend_are_config_errors(clips: dict) -> None:
    with pytest.raises(ConfigError, match="uniform"):
        load_video(clips["main"], sampling="unifrom")
    with pytest.raises(ConfigError, match="did you mean pyav"):
        load_video(clips["main"], backend="pyv")


def test_msg_string_is_the_original(clips: dict) -> None:
    frames, msg = load_video(clips["main"], 4, 64, 64, return_msg=True)
    # indices [0, 12, 25, 37] at 25 fps
    assert msg == "The video contains 4 frames sampled at 0.0, 0.5, 1.0, 1.5 seconds. "
    assert frames.shape == (3, 4, 64, 64)
    assert vl.video_message([0, 3], 30.0) == "The video contains 2 frames sampled at 0.0, 0.1 seconds. "


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in USABLE])
def test_every_sampling_mode_through_load_video(backend: str, clips: dict) -> None:
    path = clips["long_gop"]
    for mode in vl.SAMPLING_MODES:
        d = decode_video(path, 6, 32, 64, sampling=mode, backend=backend, rng=random.Random(0), fps=2, max_frames=5)
        n = 5 if mode == "fps" else 6
        assert d.frames.shape == (n, 32, 64, 3), mode
        assert all(0 <= i < 120 for i in d.indices) and len(d.indices) == n


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in USABLE])
def test_keyframe_mode_returns_key_frames(backend: str, clips: dict) -> None:
    path = clips["long_gop"]
    keys = key_frames_by_packet_flags(path)
    assert keys == [0, 40, 80]
    d = decode_video(path, 8, sampling="keyframe", backend=backend)
    assert set(d.indices) <= set(keys) and d.indices == sample_indices(120, 8, "keyframe", key_frames=keys)
    full = decode_video(path, 120, backend="pyav").frames
    np.testing.assert_array_equal(d.frames, full[d.indices])


def test_pyav_keyframe_mode_decodes_only_key_frames(clips: dict) -> None:
    reader = vl.PyAVBackend().open(str(clips["long_gop"]), 32, 48)
    try:
        assert reader.key_frame_indices() == [0, 40, 80]
        frames = reader.get_key_frames([0, 40, 80])
        assert frames.shape == (3, 32, 48, 3)
        assert reader.frames_decoded == 3  # one decoded frame per key frame, nothing in between
        reader.get_frames([79])  # ordinary access decodes the GOP up to the frame
        assert reader.frames_decoded >= 3 + 40
    finally:
        reader.close()


# ----------------------------------------------------------------------------------------
# Timeouts
# ----------------------------------------------------------------------------------------


class _HangingBackend(VideoBackend):
    """A backend whose open() blocks until released (stands for a decoder that hangs)."""

    name = "test_hanging"

    def __init__(self, release: threading.Event) -> None:
        self.release = release

    @classmethod
    def unavailable_reason(cls):
        return None

    def open(self, path: str, height: int = -1, width: int = -1, threads: int = 0) -> VideoReader:
        self.release.wait(10)
        raise RuntimeError("released")


class _FakeReader(VideoReader):
    def __init__(self, n: int) -> None:
        self.num_frames, self.fps = n, 10.0

    def key_frame_indices(self) -> List[int]:
        return [0]

    def get_frames(self, indices: Sequence[int]) -> np.ndarray:
        return np.zeros((len(indices), 4, 4, 3), np.uint8)


class _FakeBackend(VideoBackend):
    name = "test_fake"

    def __init__(self, n: int, delay: float = 0.0) -> None:
        self.n, self.delay = n, delay

    @classmethod
    def unavailable_reason(cls):
        return None

    def open(self, path: str, height: int = -1, width: int = -1, threads: int = 0) -> VideoReader:
        time.sleep(self.delay)
        return _FakeReader(self.n)


def test_hanging_decode_times_out_with_the_file_name(clips: dict) -> None:
    release = threading.Event()
    try:
        t = time.perf_counter()
        with pytest.raises(VideoDecodeError, match=r"main\.mp4: decoding timed out after 0\.3 s"):
            load_video(clips["main"], backend=_HangingBackend(release), timeout=0.3)
        assert time.perf_counter() - t < 3
    finally:
        release.set()  # let the abandoned worker thread finish


def test_slow_but_in_time_decode_and_no_timeout(clips: dict) -> None:
    x = load_video(clips["main"], 3, backend=_FakeBackend(30, delay=0.05), timeout=2.0)
    assert x.shape == (3, 3, 4, 4)
    x = load_video(clips["main"], 3, backend=_FakeBackend(30), timeout=None)
    assert x.shape == (3, 3, 4, 4)


def test_errors_inside_the_worker_reach_the_caller() -> None:
    with pytest.raises(KeyError):
        vl.run_with_timeout(lambda: {}["x"], 1.0, "what")
    assert vl.run_with_timeout(lambda: 7, 1.0, "what") == 7


# ----------------------------------------------------------------------------------------
# Broken files
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in USABLE])
@pytest.mark.parametrize(
    "kind,reason",
    [
        ("zero_byte", "empty file (0 bytes)"),
        ("truncated", "not a readable video file"),
        ("text", "not a readable video file"),
        ("audio_only", "no video stream (is it an audio file?)"),
        ("missing", "no such file"),
        ("directory", "is a directory"),
        ("fs_truncated", "truncated"),
        ("fs_nodata", "truncated"),
    ],
)
def test_broken_files_raise_video_decode_error(kind: str, reason: str, backend: str, clips: dict,
                                               synthetic_root: Path) -> None:
    paths = {k: synthetic_root / "broken" / f"{k}.mp4" for k in ("zero_byte", "truncated", "text", "audio_only")}
    paths.update(missing=synthetic_root / "broken" / "missing.mp4", **{k: clips[k] for k in ("directory", "fs_truncated", "fs_nodata")})
    path = paths[kind]
    with pytest.raises(VideoDecodeError) as info:
        load_video(path, 8, 224, 224, backend=backend)
    msg = str(info.value)
    assert msg.startswith(f"{path}: ")
    assert reason in msg, msg


def test_zero_frames_and_one_frame(clips: dict, synthetic_root: Path) -> None:
    with pytest.raises(VideoDecodeError, match="main.mp4: the video stream has no frames"):
        load_video(clips["main"], backend=_FakeBackend(0))
    one = load_video(synthetic_root / "broken" / "one_frame.mp4", 8)
    assert one.shape[:2] == (3, 1)  # a short video returns what it has
    with pytest.raises(VideoDecodeError, match="one_frame.mp4: sampling='headtail' picks no frame"):
        load_video(synthetic_root / "broken" / "one_frame.mp4", 8, sampling="headtail")


def test_unusable_backend_is_reported_and_skipped_by_auto(monkeypatch: pytest.MonkeyPatch, clips: dict) -> None:
    monkeypatch.setitem(vl._UNAVAILABLE, "pyav", "PyAV does not import (test); pip install av")
    with pytest.raises(VideoDecodeError, match="'pyav' is not usable here: PyAV does not import"):
        load_video(clips["main"], backend="pyav")
    assert vl.get_backend("auto").name == "decord"
    monkeypatch.setattr(vl, "AUTO_ORDER", ("pyav",))
    with pytest.raises(VideoDecodeError, match="no usable video backend"):
        vl.get_backend("auto")


class _ThreadsSpy(_FakeBackend):
    """Returns a 'video' whose pixel values are the decoder thread count it was opened with."""

    def open(self, path: str, height: int = -1, width: int = -1, threads: int = 0) -> VideoReader:
        reader = _FakeReader(self.n)
        reader.get_frames = lambda idx: np.full((len(idx), 1, 1, 3), threads, np.uint8)  # type: ignore[method-assign]
        return reader


class _SpyDataset(torch.utils.data.Dataset):
    def __init__(self, path: Path) -> None:
        self.path = path

    def __len__(self) -> int:
        return 1

    def __getitem__(self, i: int) -> int:
        # A plain int crosses the process boundary without shared-memory file descriptors.
        return int(load_video(self.path, 2, backend=_ThreadsSpy(4)).max().item())


def test_decoder_threads_default_to_one_inside_dataloader_workers(clips: dict) -> None:
    assert load_video(clips["main"], 2, backend=_ThreadsSpy(4)).max().item() == 0  # main process: library default
    loader = torch.utils.data.DataLoader(_SpyDataset(clips["main"]), batch_size=None, num_workers=1,
                                         multiprocessing_context="fork", timeout=60)
    assert list(loader) == [1]

