"""The Gradio demo with prepared LLaMA-VID feature files (.pkl): accepted by LLaMA-VID, refused safely otherwise.

The demo's own event handlers are called (``demo.fns``), without a server: the upload handler
with a feature file written by ``python -m videollm.features llama-vid``, then a question and
its streamed answer; a pickle that would run code, a too-big file and a ``.pkl`` given to the
tiny Video-LLaMA each get a chat message and the file is deleted.
"""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llama_vid_helpers import build_tiny, write_bert_vocab  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def handler(demo, api_name: str):
    return next(f.fn for f in demo.fns.values() if f.api_name == api_name)


def last_text(chatbot) -> str:
    content = chatbot[-1]["content"]
    return content if isinstance(content, str) else str(content)


class _RunsCode:
    """Unpickling this calls os.mkdir(marker): what a malicious "feature file" would do."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """A 4-s clip + .srt turned into a feature file by the features command (tiny random EVA)."""
    from videollm import features
    from videollm.synthetic import ClipSpec, write_clip

    folder = tmp_path_factory.mktemp("llama_vid_demo")
    write_clip(folder / "movie.mp4", ClipSpec("m", "square", "green", "up", "slow"), width=32, height=32, fps=4,
               duration=4)
    (folder / "movie.srt").write_text("1\n00:00:00,000 --> 00:00:01,500\npart one\n")
    assert features.main(["llama-vid", "--video", str(folder / "movie.mp4"), "--out", str(folder / "feats"),
                          "--model-config", str(ROOT / "videollm/configs/models/llama_vid_tiny.yaml"),
                          "--device", "cpu"]) == 0
    return folder


def copy_of(path: Path, folder: Path, name: str) -> str:
    """The handler deletes refused uploads: each test hands it its own copy (as gradio's cache)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / name
    out.write_bytes(Path(path).read_bytes())
    return str(out)


@pytest.fixture(scope="module")
def llama_vid_demo(tmp_path_factory, media):
    from videollm.chat import Chat
    from videollm.demo_app import DemoOptions, build_demo

    model = build_tiny(write_bert_vocab(tmp_path_factory.mktemp("bert")))
    opts = DemoOptions(model_type="llamavid_vicuna_v1", max_upload_mb=0.5, max_new_tokens=4,
                       examples_dir=str(media / "examples"))
    demo = build_demo(Chat(model), opts)
    yield demo
    demo.upload_cache.stop()


def test_feature_file_from_the_features_command_starts_a_chat(llama_vid_demo, media, tmp_path):
    from videollm.long_video import MOVIE_START

    upload = handler(llama_vid_demo, "upload")
    pkl = copy_of(media / "feats" / "movie.pkl", tmp_path, "movie.pkl")
    chatbot, _, _, _, text_input, _, conv, imgs = upload(None, None, [], False, pkl)
    assert "Received the feature file" in last_text(chatbot), chatbot
    assert chatbot[-2] == {"role": "user", "content": "Feature file movie.pkl (4 frames)"}
    assert text_input["interactive"] is True and conv is not None
    assert imgs[0].media.kind == "features" and tuple(imgs[0].media.data.shape) == (4, 16, 64)
    # the subtitle ends at 1.5 s: after frame 1 (frames at 0, 1, 2, 3 s); 2 placeholders per frame
    assert conv.messages[0][1].startswith(MOVIE_START + "<image>" * 4 + "part one" + "<image>" * 4 + "Now the movie end.")
    # ask and answer through the demo's handlers (tokens conditioned on the question)
    _, chatbot, history, conv = handler(llama_vid_demo, "ask")("What is in part one?", chatbot, conv)
    *_, (chatbot, _, conv, _) = list(handler(llama_vid_demo, "answer")(history, conv, imgs, 1, 1.0, False))
    assert chatbot[-1]["role"] == "assistant" and not last_text(chatbot).startswith("Sorry")
    assert conv.messages[-1][1] is not None and os.path.isfile(pkl)


def test_a_pkl_in_the_video_box_is_read_as_a_feature_file(llama_vid_demo, media, tmp_path):
    upload = handler(llama_vid_demo, "upload")
    pkl = copy_of(media / "feats" / "movie.pkl", tmp_path, "movie.pkl")
    chatbot, *_, conv, imgs = upload(pkl, None, [], True)
    assert "Received the feature file" in last_text(chatbot) and imgs[0].media.kind == "features"


def test_a_malicious_pickle_is_refused_without_running(llama_vid_demo, tmp_path):
    marker = tmp_path / "code_ran"
    bad = tmp_path / "uploads" / "evil.pkl"
    bad.parent.mkdir()
    bad.write_bytes(pickle.dumps({"feats": _RunsCode(str(marker)), "inputs": "<image>"}))
    chatbot, *_, conv, imgs = handler(llama_vid_demo, "upload")(None, None, [], False, str(bad))
    text = last_text(chatbot)
    assert text.startswith("Sorry, I cannot use this file") and "evil.pkl: refused" in text and "mkdir" in text, text
    assert conv is None and imgs is None and not marker.exists()
    assert not bad.exists()  # a refused upload is deleted at once


def test_feature_file_limits_and_one_input(llama_vid_demo, media, tmp_path):
    upload = handler(llama_vid_demo, "upload")
    (tmp_path / "b").mkdir()
    (tmp_path / "j").mkdir()
    big = tmp_path / "b" / "big.pkl"  # gradio puts each upload in a folder of its own (deleted with it)
    big.write_bytes(os.urandom(600 * 1024))  # over the 0.5 MB limit
    chatbot, *_ = upload(None, None, [], False, str(big))
    assert "MB limit (--max-upload-mb)" in last_text(chatbot) and not big.exists()
    junk = tmp_path / "j" / "junk.pkl"
    junk.write_bytes(b"not a pickle at all")
    chatbot, *_, conv, _ = upload(None, None, [], False, str(junk))
    assert "junk.pkl: not a readable feature file" in last_text(chatbot) and conv is None
    pkl = copy_of(media / "feats" / "movie.pkl", tmp_path, "movie.pkl")
    chatbot, *_ = upload(str(media / "movie.mp4"), None, [], False, pkl)
    assert "only one input is supported" in last_text(chatbot)


def test_a_pkl_on_video_llama_gets_a_message(tmp_path, media):
    from videollm.chat import Chat
    from videollm.demo_app import DemoOptions, build_demo
    from videollm.models.video_llama import VideoLLAMA

    torch.manual_seed(0)
    model = VideoLLAMA.from_config(OmegaConf.load(ROOT / "videollm/configs/models/video_llama_tiny.yaml").model)
    demo = build_demo(Chat(model.eval()), DemoOptions(max_new_tokens=2, examples_dir=str(media / "examples")))
    try:
        upload = handler(demo, "upload")
        for args in ((copy_of(media / "feats" / "movie.pkl", tmp_path / "a", "movie.pkl"), None, [], False),
                     (None, None, [], False, copy_of(media / "feats" / "movie.pkl", tmp_path / "b", "movie.pkl"))):
            chatbot, *_, conv, imgs = upload(*args)
            text = last_text(chatbot)
            assert "movie.pkl: this is a prepared feature file (.pkl)" in text and "cannot read" in text, text
            assert conv is None and imgs is None
    finally:
        demo.upload_cache.stop()
