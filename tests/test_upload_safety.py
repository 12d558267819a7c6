"""Untrusted media (chat, demo, batch inference): pixel caps, durations without metadata, decodes
in a killable process (issue 20, points 5, 7 and 8)."""

from __future__ import annotations

import os
import struct
import time
import zlib
from pathlib import Path

import av
import numpy as np
import pytest

from videollm.errors import ImageDecodeError, VideoDecodeError
from videollm.processors import video_loader as vl
from videollm.processors.image_processors import DEFAULT_MAX_PIXELS, load_image


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG that DECLARES width x height (8-bit grey) with one tiny IDAT: a few hundred bytes
    on disk, a decompression bomb for anything that decodes it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (width + 1) * 4)  # 4 rows of the image; the rest is missing
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def write_frames(path: Path, width: int, height: int, frames: int = 1, codec: str = "mjpeg", fmt: str = "avi",
                 options=None, fps: int = 25) -> Path:
    pix = "yuvj420p" if codec == "mjpeg" else "yuv420p"
    with av.open(str(path), "w", format=fmt, options=options or {}) as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = width, height, pix
        for i in range(frames):
            f = av.VideoFrame.from_ndarray(np.full((height, width, 3), (i * 9) % 255, np.uint8), format="rgb24")
            f.pts = i
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)
    return path


def test_upload_pixel_limit_is_the_training_limit():
    from videollm.datasets.bad_samples import DEFAULT_MAX_PIXELS as TRAINING

    assert DEFAULT_MAX_PIXELS == TRAINING == vl.DEFAULT_MAX_PIXELS


# ------------------------------------------------------------------ images (point 5)


def test_decompression_bomb_image_is_an_image_decode_error(tmp_path):
    bomb = png_header_only(tmp_path / "bomb.png", 16000, 16000)  # 256 Mpx: PIL's own bomb limit
    assert bomb.stat().st_size < 1000
    with pytest.raises(ImageDecodeError, match=r"bomb\.png: image too large"):
        load_image(bomb)
    with pytest.raises(ImageDecodeError, match=r"bomb\.png"):
        load_image(bomb, max_pixels=None)  # PIL's limit still applies, reported the same way


def test_image_above_the_pixel_cap_is_refused_before_decoding(tmp_path):
    big = png_header_only(tmp_path / "big.png", 4000, 2100)  # 8.4 Mpx > 3840x2160, < PIL's limit
    t0 = time.perf_counter()
    with pytest.raises(ImageDecodeError, match=r"big\.png: image too large: 4000x2100 = 8400000 pixels"):
        load_image(big)
    assert time.perf_counter() - t0 < 0.5  # header only: decoding 8.4 Mpx would be slower
    assert load_image(big, max_pixels=4000 * 2100).size == (4000, 2100)  # at the limit it is decoded


# ------------------------------------------------------------------ videos (point 5)


def test_video_above_the_pixel_cap_is_refused_before_decoding(tmp_path):
    big = write_frames(tmp_path / "big.avi", 3840, 2176)  # 8.36 Mpx, one MJPEG frame
    with pytest.raises(VideoDecodeError, match=r"big\.avi: video too large: 3840x2176 = 8355840 pixels"):
        vl.load_video(big, n_frms=1)  # the default is the training limit
    with pytest.raises(VideoDecodeError, match="too large"):
        vl.load_video(big, n_frms=1, isolate=True)
    assert vl.load_video(big, n_frms=1, height=32, width=32, max_pixels=None).shape == (3, 1, 32, 32)


# ------------------------------------------------------------------ duration without metadata (point 7)


def test_duration_of_a_webm_without_duration_is_counted(tmp_path):
    live = write_frames(tmp_path / "live.webm", 64, 64, frames=100, codec="libvpx", fmt="webm", options={"live": "1"})
    with av.open(str(live)) as c:  # what a browser's MediaRecorder writes: no duration anywhere
        assert c.duration is None and c.streams.video[0].duration is None
    d = vl.video_duration(live)
    assert (d.source, d.complete, d.packets) == ("packets", True, 100) and d.seconds == pytest.approx(4.0)
    early = vl.video_duration(live, stop_after=1.0)  # enough to refuse a 1-s limit: stop counting
    assert not early.complete and 1.0 < early.seconds < 1.2 and early.packets < 30
    capped = vl.video_duration(live, max_packets=10)
    assert not capped.complete and capped.packets == 10
    normal = write_frames(tmp_path / "normal.webm", 64, 64, frames=50, codec="libvpx", fmt="webm")
    assert vl.video_duration(normal).source in ("stream", "container")
    assert vl.video_duration(normal).seconds == pytest.approx(2.0, abs=0.05)
    (tmp_path / "zeros.mp4").write_bytes(bytes(10))
    with pytest.raises(VideoDecodeError, match=r"zeros\.mp4: not a readable video"):
        vl.video_duration(tmp_path / "zeros.mp4")


# ------------------------------------------------------------------ killable decodes (point 8)


def _heartbeat(path: str, seconds: float) -> str:
    """Append a line every 20 ms for ``seconds``: shows whether abandoned work goes on."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        with open(path, "a") as f:
            f.write("x\n")
        time.sleep(0.02)
    return "done"


def _beats(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_timed_out_work_is_killed_in_a_process_but_goes_on_in_a_thread(tmp_path):
    vl.warm_up_isolation()
    thread_log, proc_log = tmp_path / "thread.log", tmp_path / "proc.log"
    with pytest.raises(VideoDecodeError, match="timed out after 0.3 s"):
        vl.run_with_timeout(lambda: _heartbeat(str(thread_log), 5.0), 0.3, "thread")
    t0 = time.monotonic()
    with pytest.raises(VideoDecodeError, match="timed out after 0.3 s"):
        vl.run_isolated(_heartbeat, str(proc_log), 30.0, timeout=0.3, what="proc")
    assert time.monotonic() - t0 < 2.0
    after_kill = _beats(proc_log)
    thread_then = _beats(thread_log)
    time.sleep(0.4)
    assert _beats(proc_log) == after_kill  # the killed process writes nothing more
    assert _beats(thread_log) > thread_then  # the abandoned thread still works (the old behaviour)
    assert vl.run_isolated(_heartbeat, str(tmp_path / "ok.log"), 0.05, timeout=10, what="ok") == "done"


def test_a_crashing_decoder_process_is_a_named_error(tmp_path):
    with pytest.raises(VideoDecodeError, match=r"crash\.mp4: the decoding process died .*SIGABRT"):
        vl.run_isolated(os.abort, timeout=10, what=str(tmp_path / "crash.mp4"))


class _HangingBackend(vl.VideoBackend):
    """A decoder that never returns (registered under a test-only name)."""

    module = "time"

    def open(self, path, height=-1, width=-1, threads=0):
        time.sleep(3600)


vl.register_backend("test_hang")(_HangingBackend)


def test_isolated_load_video_equals_inline_and_kills_a_hanging_decode(tmp_path):
    from videollm.synthetic import ClipSpec, write_clip

    clip = tmp_path / "clip.mp4"
    write_clip(clip, ClipSpec("c", "circle", "red", "left", "slow"), duration=2.0)
    inline, msg = vl.load_video(clip, 8, 32, 32, return_msg=True)
    isolated, msg2 = vl.load_video(clip, 8, 32, 32, return_msg=True, isolate=True)
    assert msg == msg2 and np.array_equal(inline.numpy(), isolated.numpy())
    with pytest.raises(VideoDecodeError, match="no such file"):
        vl.load_video(tmp_path / "missing.mp4", isolate=True)
    t0 = time.monotonic()
    with pytest.raises(VideoDecodeError, match=r"clip\.mp4: decoding timed out after 0.5 s"):
        vl.load_video(clip, backend="test_hang", timeout=0.5, isolate=True)
    assert time.monotonic() - t0 < 2.5
