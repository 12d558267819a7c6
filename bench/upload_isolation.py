"""Does one slow upload delay the other users of the demo? Before and after isolating decodes.

    python bench/upload_isolation.py [--timeout 2] [--users 3] [--hostile-frames 750] [--hostile-size 3840x2160]

The demo (tiny random-weight model, served on 127.0.0.1, driven through gradio_client) gets a
HOSTILE upload: a 3840x2160 H.264 clip (just within the pixel limit) with a single key frame, so
sampling 8 frames decodes nearly all of them (seconds of CPU) and runs into the chat's timeout. Half a second
later ``--users`` other users each upload a small normal clip. Measured, for each setting:

* the other users' upload latency (s) alone and while the hostile upload runs;
* when the hostile user gets its "timed out" answer;
* the CPU seconds this server process burns in the 3 s AFTER every answer was sent: the work
  of an abandoned decode thread that nobody waits for any more.

Settings: ``before``: uploads one at a time (gradio concurrency 1) and decodes in a thread
(the state before issue 20); ``after``: ``upload_concurrency`` 4 and ``load_video(isolate=True)``
(a child process, killed at the timeout). The decode setting is forced here by wrapping
``videollm.processors.video_loader.load_video``, whatever the chat passes.
"""

from __future__ import annotations

import argparse
import functools
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write_hostile(path: Path, frames: int, width: int = 1920, height: int = 1080, fps: int = 25) -> Path:
    """Noise texture scrolling, one key frame for the whole clip (keyint = frames)."""
    import av
    import numpy as np

    rng = np.random.default_rng(0)
    texture = rng.integers(0, 256, (height, width + 2 * frames, 3), dtype=np.uint8)
    tmp = path.with_suffix(".tmp.mp4")
    with av.open(str(tmp), "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = width, height, "yuv420p"
        s.codec_context.options = {"preset": "ultrafast", "crf": "30",
                                   "x264-params": f"keyint={frames}:min-keyint={frames}:scenecut=0"}
        for i in range(frames):
            f = av.VideoFrame.from_ndarray(np.ascontiguousarray(texture[:, 2 * i : 2 * i + width]), format="rgb24")
            f.pts = i
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)
    tmp.replace(path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def text_of(message) -> str:
    content = message["content"]
    if isinstance(content, list):
        return " ".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content if isinstance(content, str) else ""


def wait_for_abandoned() -> float:
    """Wait until no abandoned decode thread (run_with_timeout's) runs; returns when that was."""
    while any(t.name.startswith("video-decode:") for t in threading.enumerate()):
        time.sleep(0.02)
    return time.perf_counter()


def run_setting(name: str, chat, clip: Path, hostile: Path, users: int, isolate: bool, concurrency: int,
                examples: Path) -> dict:
    from gradio_client import Client, handle_file

    from videollm.demo_app import DemoOptions, build_demo, launch
    from videollm.processors import video_loader

    original = video_loader.load_video

    @functools.wraps(original)
    def forced(*args, **kwargs):
        kwargs["isolate"] = isolate
        return original(*args, **kwargs)

    video_loader.load_video = forced
    demo = build_demo(chat, DemoOptions(max_new_tokens=8, examples_dir=str(examples), upload_concurrency=concurrency))
    _, url, _ = launch(demo, port=free_port(), block=False)
    try:
        clients = [Client(url, verbose=False) for _ in range(users + 1)]

        def upload(client, path: Path, out: dict, key) -> None:
            t0 = time.perf_counter()
            chatbot, *_ = client.predict(handle_file(str(path)), None, False, api_name="/upload")
            out[key] = (time.perf_counter() - t0, text_of(chatbot[-1]))

        def users_upload(out: dict) -> None:
            threads = [threading.Thread(target=upload, args=(clients[i + 1], clip, out, i)) for i in range(users)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()

        upload(clients[1], clip, {}, 0)  # warm-up (first decode, first encode)
        alone: dict = {}
        users_upload(alone)
        # A: the users upload 0.5 s after the hostile user (queueing behind it?)
        contended: dict = {}
        hostile_thread = threading.Thread(target=upload, args=(clients[0], hostile, contended, "hostile"))
        hostile_thread.start()
        time.sleep(0.5)
        users_upload(contended)
        hostile_thread.join()
        wait_for_abandoned()
        # B: the hostile user uploads again; right after its timeout answer the users upload
        # (is the abandoned work still eating the CPU?)
        again: dict = {}
        upload(clients[0], hostile, again, "hostile")
        cpu0, t0 = time.process_time(), time.perf_counter()
        ended = {}
        watcher = threading.Thread(target=lambda: ended.setdefault("t", wait_for_abandoned()))
        watcher.start()
        after_timeout: dict = {}
        users_upload(after_timeout)
        watcher.join()
        leftover = ended["t"] - t0
        cpu_after = time.process_time() - cpu0
    finally:
        demo.upload_cache.stop()
        demo.close(verbose=False)
        video_loader.load_video = original
    lat_b = [after_timeout[i][0] for i in range(users)]
    lat_alone = [alone[i][0] for i in range(users)]
    lat_cont = [contended[i][0] for i in range(users)]
    ok = all("Received" in contended[i][1] for i in range(users))
    ok = ok and all("Received" in after_timeout[i][1] for i in range(users))
    return {
        "setting": name, "alone_med": statistics.median(lat_alone), "cont_med": statistics.median(lat_cont),
        "cont_max": max(lat_cont), "b_med": statistics.median(lat_b), "b_max": max(lat_b), "users_ok": ok,
        "hostile_s": contended["hostile"][0], "hostile_msg": contended["hostile"][1],
        "leftover_s": leftover, "cpu_after_s": cpu_after,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=2.0, help="the chat's decode timeout (s)")
    parser.add_argument("--users", type=int, default=3, help="other users uploading during the hostile upload")
    parser.add_argument("--hostile-frames", type=int, default=750, help="frames of the single-key-frame clip")
    parser.add_argument("--hostile-size", default="3840x2160", help="its WxH (3840x2160: just at the pixel limit)")
    parser.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "videollm_bench_upload"))
    args = parser.parse_args()

    import torch
    from omegaconf import OmegaConf

    from videollm.chat import Chat
    from videollm.models.video_llama import VideoLLAMA
    from videollm.processors import video_loader
    from videollm.synthetic import ClipSpec, write_clip

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("GRADIO_TEMP_DIR", str(work / "gradio"))
    width, height = (int(v) for v in args.hostile_size.lower().split("x"))
    hostile = work / f"hostile_{width}x{height}_{args.hostile_frames}f.mp4"
    if not hostile.is_file():
        t0 = time.perf_counter()
        write_hostile(hostile, args.hostile_frames, width, height)
        print(f"wrote {hostile} ({hostile.stat().st_size / 2**20:.1f} MB) in {time.perf_counter() - t0:.0f} s")
    clip = work / "normal.mp4"
    if not clip.is_file():
        write_clip(clip, ClipSpec("n", "circle", "red", "left", "slow"), duration=2.0)
    video_loader.load_video(clip, 8, 224, 224)  # backend probing and imports, once
    t0 = time.perf_counter()
    video_loader.load_video(hostile, 8, 224, 224, timeout=None)
    print(f"hostile clip: decoding its 8 frames takes {time.perf_counter() - t0:.1f} s (decode timeout "
          f"{args.timeout:g} s)")

    cfg = OmegaConf.load(ROOT / "videollm" / "configs" / "models" / "video_llama_tiny.yaml").model
    torch.manual_seed(0)
    chat = Chat(VideoLLAMA.from_config(cfg).eval(), timeout=args.timeout)
    rows = [run_setting(name, chat, clip, hostile, args.users, isolate=iso, concurrency=conc, examples=work / "ex")
            for name, iso, conc in (("before", False, 1), ("after", True, 4))]
    print(f"\n{args.users} users upload a 2-s clip: alone; (A) 0.5 s after a hostile upload starts; (B) right "
          f"after the hostile upload's timeout answer. Decode timeout {args.timeout:g} s; {os.cpu_count()} CPU cores.")
    print(f"{'setting':8} {'alone':>6} {'A med/max':>12} {'hostile told':>13} {'B med/max':>12} "
          f"{'abandoned work':>15} {'server CPU in B':>16}  all users ok  (seconds)")
    for r in rows:
        print(f"{r['setting']:8} {r['alone_med']:6.2f} {r['cont_med']:5.2f} /{r['cont_max']:5.2f} {r['hostile_s']:13.2f} "
              f"{r['b_med']:5.2f} /{r['b_max']:5.2f} {r['leftover_s']:15.2f} {r['cpu_after_s']:16.2f}  {r['users_ok']}")
    for r in rows:
        print(f"{r['setting']}: hostile user was told: {r['hostile_msg'][:160]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
