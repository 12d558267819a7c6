"""The Gradio demo, launched in-process on 127.0.0.1 and driven through gradio_client."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

TINY_YAML = Path(__file__).resolve().parents[1] / "videollm" / "configs" / "models" / "video_llama_tiny.yaml"
MAX_SECONDS = 3.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def text_of(message) -> str:
    content = message["content"]
    if isinstance(content, list):
        return " ".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content if isinstance(content, str) else ""


CACHE_MB = 1.0


@pytest.fixture(scope="module")
def server(synthetic_root, tmp_path_factory):
    from videollm.chat import Chat
    from videollm.demo_app import DemoOptions, build_demo, launch
    from videollm.models.video_llama import VideoLLAMA
    from videollm.synthetic import ClipSpec, write_clip

    cfg = OmegaConf.load(TINY_YAML).model
    cfg.equip_audio_branch = True
    torch.manual_seed(0)
    chat = Chat(VideoLLAMA.from_config(cfg).eval())
    media = tmp_path_factory.mktemp("demo_media")
    long_clip = media / "long.mp4"
    write_clip(long_clip, ClipSpec("long", "circle", "red", "left", "slow"), duration=4.0)
    big = media / "big.mp4"
    big.write_bytes(os.urandom(300 * 1024))
    # A browser-style WebM (no duration anywhere), longer than the limit.
    from test_upload_safety import write_frames

    live = write_frames(media / "recorded.webm", 64, 64, frames=125, codec="libvpx", fmt="webm", options={"live": "1"})
    # gradio's cache folder of this app alone (the CLI does the same): pruning is measured on it
    uploads = tmp_path_factory.mktemp("gradio_uploads")
    saved_env = os.environ.get("GRADIO_TEMP_DIR")
    os.environ["GRADIO_TEMP_DIR"] = str(uploads)
    opts = DemoOptions(max_upload_mb=0.25, max_video_seconds=MAX_SECONDS, max_new_tokens=16,
                       examples_dir=str(media / "examples"), startup_notices=("random weights",),
                       max_cache_mb=CACHE_MB, cache_check_s=0.5, upload_concurrency=4)
    demo = build_demo(chat, opts)
    port = free_port()
    _, url, _ = launch(demo, port=port, block=False, max_upload_mb=opts.max_upload_mb)
    assert url.startswith(f"http://127.0.0.1:{port}")
    manifest = json.loads((synthetic_root / "manifest.json").read_text())
    files = {
        "audio_clip": str(synthetic_root / next(v for v in manifest["videos"] if v["has_audio"])["path"]),
        "silent_clip": str(synthetic_root / next(v for v in manifest["videos"] if not v["has_audio"])["path"]),
        "image": str(synthetic_root / manifest["images"][0]["path"]),
        "long": str(long_clip),
        "big": str(big),
        "live_webm": str(live),
        "examples": media / "examples",
        "uploads": uploads,
    }
    try:
        yield url, files, synthetic_root / "broken"
    finally:
        demo.upload_cache.stop()
        demo.close()
        if saved_env is None:
            os.environ.pop("GRADIO_TEMP_DIR", None)
        else:
            os.environ["GRADIO_TEMP_DIR"] = saved_env


@pytest.fixture()
def client(server):
    from gradio_client import Client

    return Client(server[0], verbose=False)


def upload(client, video=None, image=None, audio=False):
    from gradio_client import handle_file

    return client.predict(handle_file(video) if video else None, handle_file(image) if image else None, audio,
                          api_name="/upload")


def test_upload_ask_streamed_answer_restart(server, client):
    _, files, _ = server
    chatbot, *_ = upload(client, video=files["audio_clip"], audio=True)
    assert "Received the video and its sound" in text_of(chatbot[-1])
    _, chatbot = client.predict("What is moving?", api_name="/ask")
    assert text_of(chatbot[-1]) == "What is moving?"
    job = client.submit(1, 1.0, api_name="/answer")
    updates = list(job)  # /answer has one visible output: the chatbot
    final = job.outputs()[-1]
    assert len(updates) > 2  # streamed: several partial chatbots
    answer = text_of(final[-1])
    assert final[-1]["role"] == "assistant" and answer and answer != "(empty answer)"
    partial = [text_of(u[-1]) for u in updates if u[-1]["role"] == "assistant"]
    assert any(p and p != answer and answer.startswith(p) for p in partial)
    # a second turn in the same conversation
    client.predict("And then?", api_name="/ask")
    final2 = client.predict(1, 0.7, api_name="/answer")
    assert final2[-1]["role"] == "assistant" and final2[-3]["role"] == "assistant"
    chatbot, *_ = client.predict(api_name="/restart")
    assert chatbot == []
    # after a restart, asking without an upload gets a message, not an error
    client.predict("Hello?", api_name="/ask")
    assert "upload" in text_of(client.predict(1, 1.0, api_name="/answer")[-1]).lower()


def test_image_upload_and_answer(server, client):
    _, files, _ = server
    chatbot, *_ = upload(client, image=files["image"])
    assert "Received the image" in text_of(chatbot[-1])
    client.predict("What shape?", api_name="/ask")
    final = client.predict(2, 1.0, api_name="/answer")  # beam search: answered in one piece
    assert final[-1]["role"] == "assistant" and text_of(final[-1])


def test_no_audio_track_with_audio_on_is_a_notice_and_chat_goes_on(server, client):
    _, files, _ = server
    chatbot, *_ = upload(client, video=files["silent_clip"], audio=True)
    texts = [text_of(m) for m in chatbot]
    assert any("no audio track" in t and "frames only" in t for t in texts)
    assert all("/tmp/gradio" not in t for t in texts)  # the file's own name, not gradio's temp path
    client.predict("What?", api_name="/ask")
    assert text_of(client.predict(1, 1.0, api_name="/answer")[-1])


@pytest.mark.parametrize(
    "kind, name, expected",
    [
        ("video", "text.mp4", "cannot use this file"),
        ("video", "truncated.mp4", "cannot use this file"),
        ("video", "zero_byte.mp4", "empty file"),
        ("video", "audio_only.mp4", "no video stream"),
        ("image", "corrupt.jpg", "cannot use this file"),
    ],
)
def test_bad_uploads_get_a_chat_message(server, client, kind, name, expected):
    _, _, broken = server
    path = str(broken / name)
    chatbot, _video, _image, _text = upload(client, **{kind: path})
    message = text_of(chatbot[-1])
    assert chatbot[-1]["role"] == "assistant" and expected in message and name in message
    # the chat stays closed: a question gets the upload hint
    client.predict("Anything?", api_name="/ask")
    assert "upload" in text_of(client.predict(1, 1.0, api_name="/answer")[-1]).lower()


def test_limits_and_input_rules_get_chat_messages(server, client):
    _, files, _ = server
    assert "longer than the 3 s limit" in text_of(upload(client, video=files["long"])[0][-1])
    assert "MB limit" in text_of(upload(client, video=files["big"])[0][-1])
    assert "only one input is supported" in text_of(upload(client, video=files["silent_clip"], image=files["image"])[0][-1])
    assert "upload a video or an image first" in text_of(upload(client)[0][-1]).lower()


def test_examples_are_generated(server):
    _, files, _ = server
    names = sorted(p.name for p in files["examples"].iterdir())
    assert names == ["blue_square_up.mp4", "generator.json", "red_circle_right_with_sound.mp4", "yellow_triangle.jpg"]
    import av

    with av.open(str(files["examples"] / "red_circle_right_with_sound.mp4")) as c:
        assert c.streams.video and c.streams.audio


def test_demo_cli_flags_parse():
    from videollm.demo_app import parse_args

    args = parse_args(["--cfg-path", "eval_configs/tiny.yaml", "--model_type", "llama_v2", "--gpu-id", "1",
                       "--port", "7000", "--max-upload-mb", "5", "--max-video-seconds", "30",
                       "--low-resource", "--device-map", "auto", "--vit-on-cpu", "--load-in-4bit"])
    assert (args.model_type, args.gpu_id, args.port, args.host, args.share) == ("llama_v2", 1, 7000, None, False)
    assert args.low_resource and args.load_in_4bit and args.vit_on_cpu and args.device_map == "auto"


def test_example_media_are_regenerated_when_the_generator_changes(tmp_path, monkeypatch):
    from videollm import synthetic
    from videollm.demo_app import ensure_examples

    first = ensure_examples(tmp_path)
    clip = first["blue_square_up.mp4"]
    before = clip.read_bytes()
    clip.write_bytes(b"stale")  # a file from an older generator...
    ensure_examples(tmp_path)
    assert clip.read_bytes() == b"stale"  # ...is kept while the generator is unchanged
    monkeypatch.setitem(synthetic.SPEEDS, "fast", synthetic.SPEEDS["fast"] * 0.9)
    ensure_examples(tmp_path)
    assert clip.read_bytes() not in (b"stale", before)  # rewritten with the new motion


# ------------------------------------------------------------------ issue 20: uploads (points 6, 7, 8)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def test_upload_cache_stays_bounded(server):
    """Uploads straight to gradio's route (as a script filling the disk would send them),
    each under the size limit: the app's files are pruned back under --max-cache-mb."""
    import httpx

    url, files, _ = server
    folder = files["uploads"]
    names = []
    for i in range(12):  # 12 x 200 KB = 2.4 MB into a 1 MB cache
        r = httpx.post(url.rstrip("/") + "/gradio_api/upload",
                       files={"files": (f"junk{i}.mp4", os.urandom(200 * 1024), "video/mp4")}, timeout=30)
        r.raise_for_status()
        names.extend(r.json())
    time.sleep(1.5)  # three pruning intervals
    examples = {p.name for p in files["examples"].iterdir()}  # copies gradio keeps on purpose
    kept_by_gradio = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and p.name in examples)
    assert folder_bytes(folder) - kept_by_gradio <= CACHE_MB * 2**20
    kept = [n for n in names if os.path.exists(n)]
    assert kept and len(kept) < len(names)
    assert kept == names[-len(kept):]  # the oldest went first
    # a refused upload is deleted at once
    chatbot, *_ = upload(_client(url), video=files["big"])
    assert "MB limit" in text_of(chatbot[-1])
    assert not [p for p in folder.rglob("big.mp4")]


def _client(url):
    from gradio_client import Client

    return Client(url, verbose=False)


def test_length_limit_holds_for_a_webm_without_duration(server, client):
    _, files, _ = server
    chatbot, *_ = upload(client, video=files["live_webm"])  # 5 s, declared nowhere
    message = text_of(chatbot[-1])
    assert "longer than the 3 s limit" in message and "declares no duration" in message and "recorded.webm" in message


def test_a_slow_upload_does_not_hold_up_another_user(server, monkeypatch):
    """One user's upload hangs in its probe (until released, at most 30 s); another user's
    upload, sent after it, is answered while the first still hangs (uploads were handled one
    at a time before: the second would have waited the full 30 s)."""
    import threading

    from gradio_client import handle_file

    from videollm import demo_app

    url, files, _ = server
    real = demo_app._video_duration
    release = threading.Event()

    def hangs_for_long_clip(path, opts):
        if os.path.basename(path) == "long.mp4":
            release.wait(30.0)
        return real(path, opts)

    monkeypatch.setattr(demo_app, "_video_duration", hangs_for_long_clip)
    slow_client, fast_client = _client(url), _client(url)
    slow = slow_client.submit(handle_file(files["long"]), None, False, api_name="/upload")
    time.sleep(0.5)
    t0 = time.monotonic()
    try:
        chatbot, *_ = upload(fast_client, video=files["silent_clip"])
        fast_s = time.monotonic() - t0
        hung = not slow.done()
    finally:
        release.set()
    assert "Received the video" in text_of(chatbot[-1])
    assert hung and fast_s < 25.0
    assert "longer than the 3 s limit" in text_of(slow.result()[0][-1])


def test_a_decompression_bomb_image_gets_a_chat_message(server, client, tmp_path):
    from test_upload_safety import png_header_only

    bomb = png_header_only(tmp_path / "bomb.png", 16000, 16000)  # 256 Mpx declared, 100 bytes on disk
    chatbot, *_ = upload(client, image=str(bomb))
    message = text_of(chatbot[-1])
    assert "cannot use this file" in message and "bomb.png" in message and "too large" in message
