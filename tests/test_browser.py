"""The demo in a real headless Chromium: open the page, upload a clip, ask, see an answer.

Needs the system package ``chromium`` (``/usr/bin/chromium``) and the Python package
``playwright`` (its own browser downloads are NOT used).
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

TINY_YAML = Path(__file__).resolve().parents[1] / "videollm" / "configs" / "models" / "video_llama_tiny.yaml"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_browser_upload_ask_answer(synthetic_root, tmp_path):
    from playwright.sync_api import sync_playwright

    from videollm.chat import Chat
    from videollm.demo_app import DemoOptions, build_demo, launch
    from videollm.models.video_llama import VideoLLAMA

    cfg = OmegaConf.load(TINY_YAML).model
    torch.manual_seed(0)
    chat = Chat(VideoLLAMA.from_config(cfg).eval())
    demo = build_demo(chat, DemoOptions(max_new_tokens=16, examples_dir=str(tmp_path / "examples")))
    _, url, _ = launch(demo, port=_free_port(), block=False)
    manifest = json.loads((synthetic_root / "manifest.json").read_text())
    clip = str(synthetic_root / next(v for v in manifest["videos"] if not v["has_audio"])["path"])
    question = "What is moving in the video?"
    try:
        with sync_playwright() as p:
            context = p.chromium.launch_persistent_context(
                str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
                viewport={"width": 1280, "height": 1000},
            )
            try:
                page = context.new_page()
                page.goto(url, wait_until="domcontentloaded", timeout=60_000)
                page.wait_for_selector("#upload_button", timeout=60_000)
                page.set_input_files("#video_input input[type=file]", clip)
                page.wait_for_selector("#video_input video", timeout=30_000)  # the upload finished
                page.click("#upload_button")
                chatbot = page.locator("#chatbot")
                chatbot.get_by_text("Received the video").wait_for(timeout=30_000)
                textbox = page.locator("#text_input textarea")
                textbox.wait_for(state="visible")
                page.wait_for_function("() => !document.querySelector('#text_input textarea').disabled", timeout=10_000)
                textbox.fill(question)
                textbox.press("Enter")
                chatbot.get_by_text(question).wait_for(timeout=30_000)
                # the answer: a bot message after the question, non-empty, once generation is over
                page.wait_for_function(
                    """(q) => {
                        const root = document.querySelector('#chatbot');
                        const text = root ? root.innerText : '';
                        const i = text.lastIndexOf(q);
                        return i >= 0 && text.slice(i + q.length).trim().length > 0
                            && !root.querySelector('.generating, .pending');
                    }""",
                    arg=question, timeout=60_000,
                )
                page.wait_for_timeout(500)
                after = page.locator("#chatbot").inner_text().split(question)[-1].strip()
                shot = tmp_path / "demo.png"
                page.screenshot(path=str(shot), full_page=True)
            finally:
                context.close()
    finally:
        demo.close()
    assert after and "Received the video" not in after
    assert shot.is_file() and shot.stat().st_size > 10_000
