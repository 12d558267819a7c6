"""Chat API on tiny random-weight models: prompts, audio order, streaming, batching, errors."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from videollm.chat import (
    AUDIO_VIDEO_MESSAGE,
    CONTEXT_WARNING,
    IMAGE_SYSTEM,
    Chat,
    StopOnText,
    ChatMedia,
    new_conversation,
    postprocess_text,
    resolve_checkpoint_pattern,
)
from videollm.errors import ImageDecodeError, VideoDecodeError, VideoLLMError
from videollm.models.video_llama import template_for_model_type

TINY_YAML = Path(__file__).resolve().parents[1] / "videollm" / "configs" / "models" / "video_llama_tiny.yaml"
# The original's string, with the runs of spaces its backslash continuation left in it.
ORIGINAL_AV_MESSAGE = (
    "Close your eyes, open your ears and you imagine only based on the sound that: <ImageHere>.                 "
    "Close your ears, open your eyes and you see that <Video><ImageHere></Video>.                  "
    "Now answer my question based on what you have just seen and heard."
)
# 16 frames at 8 fps, 8 sampled uniformly: frames 0, 2, ..., 14.
CLIP_MSG = "The video contains 8 frames sampled at 0.0, 0.2, 0.5, 0.8, 1.0, 1.2, 1.5, 1.8 seconds. "


def _tiny_model(audio: bool):
    from videollm.models.video_llama import VideoLLAMA

    cfg = OmegaConf.load(TINY_YAML).model
    cfg.equip_audio_branch = audio
    torch.manual_seed(0)
    return VideoLLAMA.from_config(cfg).eval()


@pytest.fixture(scope="module")
def chat() -> Chat:
    return Chat(_tiny_model(audio=True))


@pytest.fixture(scope="module")
def media(synthetic_root: Path):
    manifest = json.loads((synthetic_root / "manifest.json").read_text())
    with_audio = next(v for v in manifest["videos"] if v["has_audio"] and v["num_frames"] == 16)
    silent = next(v for v in manifest["videos"] if not v["has_audio"] and v["num_frames"] == 16)
    return {
        "audio_clip": str(synthetic_root / with_audio["path"]),
        "silent_clip": str(synthetic_root / silent["path"]),
        "clips": [str(synthetic_root / v["path"]) for v in manifest["videos"][:4]],
        "image": str(synthetic_root / manifest["images"][0]["path"]),
        "broken": synthetic_root / "broken",
    }


def _video_conv(chat: Chat, path: str, question: str, model_type: str = "vicuna"):
    conv, imgs = new_conversation(model_type, "video"), []
    chat.upload_video_without_audio(path, conv, imgs)
    chat.ask(question, conv)
    return conv, imgs


# ------------------------------------------------------------------ prompt assembly


def test_audio_video_message_is_the_originals_exact_string():
    assert AUDIO_VIDEO_MESSAGE == ORIGINAL_AV_MESSAGE
    assert "<ImageHere>." + " " * 17 + "Close" in AUDIO_VIDEO_MESSAGE
    assert "</Video>." + " " * 18 + "Now" in AUDIO_VIDEO_MESSAGE


def test_video_prompt_exact(chat, media):
    conv, imgs = _video_conv(chat, media["silent_clip"], "What moves?")
    chat.prepare(conv, imgs, max_new_tokens=10)
    assert conv.get_prompt() == "###Human: <Video><ImageHere></Video> " + CLIP_MSG + " What moves?###Assistant:"
    # encoded lazily (at answer time), once: Video-LLaMA's tokens do not depend on the question
    assert len(imgs) == 1 and isinstance(imgs[0], ChatMedia) and imgs[0].shape == (1, 8, 64)
    cached = imgs[0].embeds
    chat.media_embeddings(conv, imgs)
    assert imgs[0].embeds is cached


def test_image_prompts_exact(chat, media):
    conv, imgs = new_conversation("vicuna", "image"), []
    assert chat.upload_img(media["image"], conv, imgs) == "Received."
    chat.ask("What shape?", conv)
    assert conv.get_prompt() == IMAGE_SYSTEM + "###Human: <Image><ImageHere></Image>  What shape?###"
    conv2, imgs2 = new_conversation("llama_v2", "image"), []
    chat.upload_img(media["image"], conv2, imgs2)
    chat.ask("What shape?", conv2)
    conv2.append_message(conv2.roles[1], None)
    assert conv2.get_prompt() == (
        f"[INST] <<SYS>>\n{IMAGE_SYSTEM}\n<</SYS>>\n\n<Image><ImageHere></Image>  What shape? [/INST]"
    )
    # a PIL image and a tensor give the same embeddings as the path
    from PIL import Image

    conv3, imgs3 = new_conversation("vicuna", "image"), []
    chat.upload_img(Image.open(media["image"]), conv3, imgs3)
    pixels = chat.model.load_media(media["image"], "image").data
    chat.upload_img(pixels, conv3, imgs3)
    chat.upload_img(pixels.unsqueeze(0).unsqueeze(2), conv3, imgs3)
    ref = chat.media_embeddings(conv, imgs)[0]
    for got in chat.media_embeddings(conv3, imgs3):
        torch.testing.assert_close(got, ref)


def test_audio_video_prompt_audio_first(chat, media):
    conv, imgs = new_conversation("vicuna", "video"), []
    conv.system = "something"
    assert chat.upload_video(media["audio_clip"], conv, imgs, with_audio=True) == "Received."
    assert conv.system == ""
    chat.ask("What do you hear?", conv)
    embs = chat.prepare(conv, imgs, max_new_tokens=10)
    assert conv.get_prompt() == "###Human: " + ORIGINAL_AV_MESSAGE + " What do you hear?###Assistant:"
    # audio embeddings first, then the video's
    with torch.no_grad():
        audio_emb, _ = chat.model.encode_audioQformer(chat.model.load_media(media["audio_clip"], "audio").data.unsqueeze(0))
        video = chat.model.load_media(media["audio_clip"], "video").data.unsqueeze(0)
        video_emb, _ = chat.model.encode_videoQformer_visual(video)
    assert [e.media.kind for e in imgs] == ["audio", "video"]
    torch.testing.assert_close(imgs[0].embeds, audio_emb)
    torch.testing.assert_close(imgs[1].embeds, video_emb)
    # interleaving: [BOS + seg0] [audio] [seg1, no BOS] [video] [seg2, no BOS]
    tok = chat.model.llama_tokenizer
    segs = conv.get_prompt().split("<ImageHere>")
    ids = [tok(s, add_special_tokens=i == 0)["input_ids"] for i, s in enumerate(segs)]
    assert ids[0][0] == tok.bos_token_id and tok.bos_token_id not in ids[1] + ids[2]
    n0, n1 = len(ids[0]), len(ids[1])
    assert embs.shape == (1, n0 + 8 + n1 + 8 + len(ids[2]), 64)
    torch.testing.assert_close(embs[:, n0 : n0 + 8], audio_emb)
    torch.testing.assert_close(embs[:, n0 + 8 + n1 : n0 + 16 + n1], video_emb)
    torch.testing.assert_close(embs[:, :n0], chat.model.embed_tokens(torch.tensor([ids[0]])))


def test_no_audio_track_falls_back_with_visible_notice(chat, media, caplog):
    conv, imgs, notices = new_conversation("vicuna", "video"), [], []
    with caplog.at_level(logging.WARNING, logger="videollm.chat"):
        reply = chat.upload_video(media["silent_clip"], conv, imgs, with_audio=True, notices=notices)
    assert media["silent_clip"] in reply and "no audio track" in reply
    assert notices == [reply] and reply in chat.notices and reply in caplog.text
    assert len(imgs) == 1 and conv.messages[-1][1] == "<Video><ImageHere></Video> " + CLIP_MSG


def test_model_without_audio_branch_falls_back_with_notice(media):
    chat_vl = Chat(_tiny_model(audio=False))
    conv, imgs = new_conversation("vicuna", "video"), []
    reply = chat_vl.upload_video(media["audio_clip"], conv, imgs, with_audio=True)
    assert "no audio branch" in reply and len(imgs) == 1
    assert chat_vl.pop_notices() == [reply] and chat_vl.notices == []


# ------------------------------------------------------------------ answering


def test_multi_turn_history_and_reset(chat, media):
    conv, imgs = _video_conv(chat, media["silent_clip"], "First?")
    a1, ids1 = chat.answer(conv, imgs, max_new_tokens=6, do_sample=False)
    assert ids1.ndim == 1 and 0 < len(ids1) <= 6
    chat.ask("Second?", conv)
    a2, _ = chat.answer(conv, imgs, max_new_tokens=6, do_sample=False)
    assert conv.messages[1][1] == a1 and conv.messages[3][1] == a2
    assert conv.messages[2] == ["Human", "Second?"]  # a new turn, not appended to the video turn
    assert conv.get_prompt().endswith(f"###Assistant: {a1}###Human: Second?###Assistant: {a2}###")
    # sampling works and gives text
    chat.ask("Third?", conv)
    text, _ = chat.answer(conv, imgs, max_new_tokens=4, do_sample=True, temperature=0.7, top_p=0.9)
    assert isinstance(text, str) and conv.messages[-1][1] == text
    chat.reset(conv, imgs)
    assert conv.messages == [] and imgs == []


@pytest.mark.parametrize("model_type", ["vicuna", "llama_v2"])
def test_stream_equals_greedy_answer(chat, media, model_type):
    conv, imgs = _video_conv(chat, media["clips"][1], "Describe it.", model_type)
    conv_stream = conv.copy()
    text, _ = chat.answer(conv, imgs, max_new_tokens=24, do_sample=False)
    pieces = list(chat.stream_answer(conv_stream, imgs, max_new_tokens=24, do_sample=False))
    assert len(pieces) > 1  # it really streams
    assert "".join(pieces) == text == conv_stream.messages[-1][1]


def test_context_cut_warns_and_truncates(chat, media, caplog):
    conv, imgs = _video_conv(chat, media["silent_clip"], "Why?")
    full = chat.prepare(conv.copy(), imgs, max_new_tokens=5, max_length=2000)
    notices = []
    with caplog.at_level(logging.WARNING, logger="videollm.chat"):
        cut = chat.prepare(conv.copy(), imgs, max_new_tokens=5, max_length=30, notices=notices)
    assert cut.shape[1] == 25 < full.shape[1]
    torch.testing.assert_close(cut, full[:, -25:])
    assert len(notices) == 1 and CONTEXT_WARNING in notices[0] and CONTEXT_WARNING in caplog.text
    text, _ = chat.answer(conv, imgs, max_new_tokens=5, max_length=30, do_sample=False, notices=notices)
    assert len(notices) == 2 and isinstance(text, str)


def test_stop_string_ends_generation(chat, media):
    """A model that always emits "#" stops after three tokens ("###"), whatever its vocabulary."""
    model = chat.model
    head = model.llama_model.lm_head
    forced = torch.nn.Linear(64, head.out_features, bias=True)
    with torch.no_grad():
        forced.weight.zero_()
        forced.bias.fill_(-10.0)
        forced.bias[model.llama_tokenizer.sp.piece_to_id("#")] = 10.0
    model.llama_model.lm_head = forced
    try:
        conv, imgs = _video_conv(chat, media["silent_clip"], "Stop?")
        text, ids = chat.answer(conv, imgs, max_new_tokens=20, do_sample=False)
        assert len(ids) == 3 and text == ""
        pieces = list(chat.stream_answer(*_video_conv(chat, media["silent_clip"], "Stop?"), max_new_tokens=20, do_sample=False))
        assert pieces == []
    finally:
        model.llama_model.lm_head = head


def test_stop_criterion_and_postprocessing(chat):
    tok = chat.model.llama_tokenizer
    stop = StopOnText(tok, ["###"])
    rows = [tok.encode("hello there", add_special_tokens=False), tok.encode("hi ###", add_special_tokens=False)]
    width = max(map(len, rows))
    batch = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    assert stop(batch).tolist() == [False, True]
    vicuna, llama = new_conversation("vicuna"), new_conversation("llama_v2")
    assert postprocess_text(" a dog ###Human: more", vicuna) == "a dog"
    assert postprocess_text("x Assistant: the answer ###", vicuna) == "the answer"
    assert postprocess_text(" ASSISTANT: yes </s><s>[INST]", llama) == "yes"
    assert template_for_model_type("llama2_7b") == "llama_v2" and template_for_model_type("vicuna7b") == "vicuna"


def test_answer_keeps_every_generated_token(chat, media, monkeypatch):
    # generate(inputs_embeds=...) returns only new tokens: a first token 0 or 1 is a real token
    conv, imgs = _video_conv(chat, media["silent_clip"], "What moves?")
    tok = chat.model.llama_tokenizer
    words = tok.encode("a dog", add_special_tokens=False)
    monkeypatch.setattr(chat.model, "generate", lambda **kw: torch.tensor([[0, 1] + words]))
    text, ids = chat.answer(conv, imgs, max_new_tokens=5)
    assert ids.tolist() == [0, 1] + words and text.endswith("a dog")


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("name", ["zero_byte.mp4", "truncated.mp4", "text.mp4", "audio_only.mp4", "missing.mp4"])
def test_bad_video_raises_error_naming_file(chat, media, name):
    path = str(media["broken"] / name)
    for with_audio in (False, True):
        conv, imgs = new_conversation("vicuna"), []
        with pytest.raises(VideoDecodeError) as info:
            chat.upload_video(path, conv, imgs, with_audio=with_audio)
        assert path in str(info.value)
        assert imgs == [] and conv.messages == []


def test_bad_image_raises_error_naming_file(chat, media):
    for path in (str(media["broken"] / "corrupt.jpg"), str(media["broken"] / "text.mp4")):
        with pytest.raises(ImageDecodeError) as info:
            chat.upload_img(path, new_conversation("vicuna", "image"), [])
        assert path in str(info.value)
        assert isinstance(info.value, VideoLLMError)


# ------------------------------------------------------------------ batching and entry points


def test_batched_greedy_equals_one_by_one(chat, media):
    questions = ["What?", "Describe the motion of the shape in as much detail as you can.", "Colour?"]
    convs = [_video_conv(chat, clip, q) for clip, q in zip(media["clips"], questions)]
    singles = [chat.answer(c.copy(), imgs, max_new_tokens=12, do_sample=False)[0] for c, imgs in convs]
    batched = chat.answer_batch([c.copy() for c, _ in convs], [imgs for _, imgs in convs], max_new_tokens=12)
    assert [t for t, _ in batched] == singles
    assert len({len(chat.get_context_emb(c, i)[0]) for c, i in convs}) == 3  # really different lengths


def test_infer_jsonl_batches_and_reports_bad_lines(chat, media, tmp_path, monkeypatch):
    from videollm import infer

    clips = media["clips"]
    lines = [
        json.dumps({"id": "a", "video": clips[0], "question": "What?"}),
        "{not json",
        json.dumps({"video": str(media["broken"] / "text.mp4"), "question": "Q"}),
        json.dumps({"image": media["image"], "question": "Shape?"}),
        json.dumps({"video": clips[1], "image": media["image"], "question": "Both?"}),
        json.dumps({"video": clips[2], "question": "Longer question about the clip?"}),
    ]
    src = tmp_path / "questions.jsonl"
    src.write_text("\n".join(lines) + "\n")
    monkeypatch.setattr(infer, "build_chat_from_args", lambda args: (chat, "vicuna", ["a startup notice"]))
    out = tmp_path / "answers.jsonl"
    err = io.StringIO()
    assert infer.main(["--cfg-path", "unused.yaml", "--input", str(src), "--output", str(out),
                       "--batch-size", "2", "--max-new-tokens", "8"], err=err) == 3  # exit status: lines that failed
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 6
    assert records[0]["id"] == "a" and records[0]["video"] == clips[0] and "answer" in records[0]
    assert "not valid JSON" in records[1]["error"]
    assert "text.mp4" in records[2]["error"] and "answer" not in records[2]
    assert records[3]["image"] == media["image"] and "answer" in records[3]
    assert "exactly one" in records[4]["error"]
    # batched (size 2, left-padded) answers equal one-by-one greedy answers
    for rec, (clip_or_img, q, kind) in zip([records[0], records[3], records[5]],
                                           [(clips[0], "What?", "video"), (media["image"], "Shape?", "image"),
                                            (clips[2], "Longer question about the clip?", "video")]):
        conv, imgs = new_conversation("vicuna", kind), []
        (chat.upload_video_without_audio if kind == "video" else chat.upload_img)(clip_or_img, conv, imgs)
        chat.ask(q, conv)
        assert rec["answer"] == chat.answer(conv, imgs, max_new_tokens=8, do_sample=False)[0]
    assert "a startup notice" in err.getvalue() and "6 lines (3 errors)" in err.getvalue()


def test_cli_non_interactive_and_interactive(chat, media, monkeypatch):
    from videollm import cli

    monkeypatch.setattr(cli, "build_chat_from_args", lambda args: (chat, "vicuna", []))
    out, err = io.StringIO(), io.StringIO()
    rc = cli.main(["--cfg-path", "x.yaml", "--video", media["silent_clip"], "--audio", "--greedy",
                   "--max-new-tokens", "6", "-q", "One?", "-q", "Two?"], out=out, err=err)
    assert rc == 0
    text = out.getvalue()
    assert text.startswith("Q: One?\nA: ") and "\nQ: Two?\nA: " in text
    assert "no audio track" in err.getvalue()
    out = io.StringIO()
    rc = cli.main(["--cfg-path", "x.yaml", "--image", media["image"], "--greedy", "--max-new-tokens", "4"],
                  out=out, err=io.StringIO(), stdin=io.StringIO("Hi?\n/reset\nAgain?\n/quit\n"))
    assert rc == 0 and out.getvalue().count("Assistant: ") == 2 and "(new conversation)" in out.getvalue()
    err = io.StringIO()
    rc = cli.main(["--cfg-path", "x.yaml", "--video", str(media["broken"] / "truncated.mp4"), "-q", "?"],
                  out=io.StringIO(), err=err)
    assert rc == 2 and "truncated.mp4" in err.getvalue() and "Traceback" not in err.getvalue()


def test_checkpoint_glob_resolves_to_latest(tmp_path):
    for n in (2, 10, 9):
        (tmp_path / f"checkpoint_{n}.pth").write_bytes(b"x")
    path, notice = resolve_checkpoint_pattern(str(tmp_path / "checkpoint_*.pth"))
    assert path == str(tmp_path / "checkpoint_10.pth") and "latest of 3" in notice
    path, notice = resolve_checkpoint_pattern(str(tmp_path / "none_*.pth"))
    assert path == "" and "RANDOM" in notice
    assert resolve_checkpoint_pattern("plain/file.pth") == ("plain/file.pth", None)


def test_build_chat_from_tiny_eval_config(tmp_path):
    """eval_configs/tiny.yaml through load_config; the checkpoint glob falls back to random weights."""
    import argparse

    from videollm.chat import add_model_args, build_chat_from_args

    parser = argparse.ArgumentParser()
    add_model_args(parser)
    args = parser.parse_args(["--cfg-path", str(Path(__file__).resolve().parents[1] / "eval_configs" / "tiny.yaml"),
                              "--cpu", "--ckpt", str(tmp_path / "checkpoint_*.pth")])
    chat, model_type, notices = build_chat_from_args(args)
    assert model_type == "vicuna" and chat.model.cfg.ckpt == ""
    assert any("RANDOM" in n for n in notices)
    assert chat.media_options["vis_processor"].image_size == 32 and chat.model.cfg.image_size == 32
