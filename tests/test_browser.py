"""The demo in a real headless Chromium, with the quick start's trained tiny model.

Needs the system package ``chromium`` (``/usr/bin/chromium``) and the Python package
``playwright`` (its own browser downloads are NOT used).

The model is ``tests/assets/tiny_chat_model.pth``: the stage-2 checkpoint that ``make train-tiny``
writes (``output/tiny_synthetic_chat/checkpoint_0.pth``, every weight included), copied by ``make
tiny-asset``. With it the page must carry a three-turn conversation whose greedy answers name the
right colour, shape and direction, and the page itself must behave: one bubble per message, the
button says a chat is running, the Image box keeps its size, an image dropped on the Video box is
moved, and no technical notice reaches the chat. Screenshots are written to the test's tmp folder.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

ROOT = Path(__file__).resolve().parents[1]
EVAL_CFG = ROOT / "eval_configs" / "tiny.yaml"
MODEL_ASSET = ROOT / "tests" / "assets" / "tiny_chat_model.pth"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
# what the three turns ask, and which attribute each answer must name
TURNS = [("What color is the shape?", "color"), ("Which direction is the shape moving?", "direction"),
         ("What shape is it?", "shape")]
# the demo's own example media (videollm.demo_app.ensure_examples) and what they show
CLIP = ("red_circle_right_with_sound.mp4", {"color": "red", "shape": "circle", "direction": "right"})
IMAGE = ("yellow_triangle.jpg", {"color": "yellow", "shape": "triangle"})

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """A Chromium page on the demo of the trained tiny model (one server for the module)."""
    from playwright.sync_api import sync_playwright

    from videollm.chat import build_chat_from_args
    from videollm.demo_app import DemoOptions, build_demo, launch, parse_args

    tmp = tmp_path_factory.mktemp("browser")
    # as `python demo.py --cfg-path eval_configs/tiny.yaml` builds it (4 frames, the eval processor)
    chat, template, notices = build_chat_from_args(parse_args(["--cfg-path", str(EVAL_CFG), "--ckpt", str(MODEL_ASSET)]))
    assert template == "vicuna" and notices == []
    demo = build_demo(chat, DemoOptions(model_type=template, max_new_tokens=16, examples_dir=str(tmp / "examples")))
    _, url, _ = launch(demo, port=_free_port(), block=False)
    try:
        with sync_playwright() as p:
            context = p.chromium.launch_persistent_context(
                str(tmp / "profile"), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
                viewport={"width": 1280, "height": 1100},
            )
            try:
                page = context.new_page()
                page.url_root = url
                page.examples = tmp / "examples"
                yield page
            finally:
                context.close()
    finally:
        demo.close()


def _open(page) -> None:
    page.goto(page.url_root, wait_until="domcontentloaded", timeout=60_000)
    page.wait_for_selector("#upload_button", timeout=60_000)


def _bubbles(page):
    """(role, text) of every chat bubble on the page, in order."""
    return page.evaluate(
        """() => Array.from(document.querySelectorAll('#chatbot .message-row')).map(row => [
               row.classList.contains('user-row') ? 'user' : 'bot', row.innerText.trim()])"""
    )


def _start_chat(page, selector: str, path: str) -> None:
    page.set_input_files(f"{selector} input[type=file]", path)
    page.wait_for_selector(f"{selector} img, {selector} video", timeout=30_000)  # the upload finished
    page.click("#upload_button")
    page.locator("#chatbot").get_by_text("Received the").wait_for(timeout=30_000)
    page.wait_for_function("() => !document.querySelector('#text_input textarea').disabled", timeout=10_000)


def _ask(page, question: str) -> str:
    """Ask ``question`` and return the text of the bot bubble that answers it."""
    before = len(_bubbles(page))
    textbox = page.locator("#text_input textarea")
    textbox.fill(question)
    textbox.press("Enter")
    page.wait_for_function(
        """(n) => {
            const root = document.querySelector('#chatbot');
            const rows = root.querySelectorAll('.message-row');
            return rows.length >= n + 2 && rows[rows.length - 1].innerText.trim().length > 0
                && !root.querySelector('.generating, .pending')
                && !document.querySelector('#text_input textarea').disabled;
        }""",
        arg=before, timeout=60_000,
    )
    page.wait_for_timeout(300)  # the last streamed piece
    bubbles = _bubbles(page)
    assert bubbles[before] == ["user", question], bubbles[before:]
    assert len(bubbles) == before + 2, f"one bubble per message, got {bubbles[before:]}"
    return bubbles[-1][1]


def test_three_turn_conversation_names_colour_shape_and_direction(page, tmp_path):
    from videollm.demo_app import UPLOAD_FIRST, UPLOADED_LABEL
    from videollm.evaluation import parse_attributes

    name, truth = CLIP
    _open(page)
    textbox = page.locator("#text_input textarea")
    assert textbox.get_attribute("placeholder") == UPLOAD_FIRST
    assert not [b for b in _bubbles(page) if "Notice" in b[1]], "a technical notice reached the chat"
    _start_chat(page, "#video_input", str(page.examples / name))
    button = page.locator("#upload_button")
    assert button.inner_text().strip() == UPLOADED_LABEL and button.is_disabled()
    answers = []
    for question, attr in TURNS:
        answer = _ask(page, question)
        answers.append(answer)
        assert parse_attributes(answer)[attr] == truth[attr], (question, answer)
    page.screenshot(path=str(tmp_path / "three_turns.png"), full_page=True)
    bubbles = _bubbles(page)
    # the clip, "Received the video", then a question and its answer per turn: nothing merged, nothing else
    assert [role for role, _ in bubbles] == ["user", "bot"] + ["user", "bot"] * len(TURNS), bubbles
    assert not [b for b in bubbles if "Notice" in b[1]]
    assert (tmp_path / "three_turns.png").stat().st_size > 10_000


def test_image_dropped_on_video_is_moved_and_the_image_box_keeps_its_size(page, tmp_path):
    from videollm.demo_app import IMAGE_ON_VIDEO
    from videollm.evaluation import parse_attributes

    name, truth = IMAGE
    image = page.examples / name
    _open(page)
    empty_height = page.locator("#image_input").bounding_box()["height"]
    page.set_input_files("#video_input input[type=file]", str(image))
    # moved to the Image box, and said so under the boxes (the browser never sends it to the Video box)
    page.wait_for_selector("#image_input img", timeout=30_000)
    assert page.locator("#media_hint").inner_text().strip() == IMAGE_ON_VIDEO
    assert page.locator("#video_input video").count() == 0
    page.wait_for_timeout(300)
    page.screenshot(path=str(tmp_path / "image_moved.png"), full_page=True)
    # the box with the image in it is as tall as the empty one (not a thin strip)
    assert page.locator("#image_input").bounding_box()["height"] >= 0.9 * empty_height >= 150
    assert page.locator("#image_input img").bounding_box()["height"] >= 100
    page.click("#upload_button")
    page.locator("#chatbot").get_by_text("Received the image").wait_for(timeout=30_000)
    page.wait_for_function("() => !document.querySelector('#text_input textarea').disabled", timeout=10_000)
    first = _ask(page, "What color is the shape?")
    second = _ask(page, "What shape is in the image?")
    page.screenshot(path=str(tmp_path / "image_chat.png"), full_page=True)
    assert parse_attributes(first)["color"] == truth["color"], first
    assert parse_attributes(second)["shape"] == truth["shape"], second


def test_nothing_uploaded_and_a_corrupt_image_get_one_message_each(page, tmp_path):
    from videollm.demo_app import UPLOAD_FIRST

    _open(page)
    page.click("#upload_button")
    page.locator("#chatbot").get_by_text(UPLOAD_FIRST).wait_for(timeout=30_000)
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8)
    page.set_input_files("#image_input input[type=file]", str(corrupt))
    page.wait_for_timeout(1000)
    page.click("#upload_button")
    page.wait_for_function(
        "() => document.querySelector('#chatbot').innerText.includes('corrupt.jpg')", timeout=30_000)
    page.wait_for_timeout(500)
    page.screenshot(path=str(tmp_path / "corrupt_image.png"), full_page=True)
    bubbles = _bubbles(page)
    assert [role for role, _ in bubbles] == ["bot", "bot"], bubbles  # one message per state, nothing else
    assert bubbles[0][1] == UPLOAD_FIRST
    assert "corrupt.jpg" in bubbles[1][1] and "Traceback" not in bubbles[1][1]
    # the refused file is cleared from the Image box (no broken-image icon left behind), the chat not started
    assert page.locator("#image_input img").count() == 0
    assert page.locator("#upload_button").is_enabled()
    assert page.locator("#text_input textarea").is_disabled()
