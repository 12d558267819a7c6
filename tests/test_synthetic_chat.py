"""The tiny chat recipe's data (conversations about rendered clips and stills) and its evaluation."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from omegaconf import OmegaConf

from videollm.datasets.synthetic_datasets import IMAGE_QUESTIONS, VIDEO_QUESTIONS, synthetic_answer
from videollm.evaluation import parse_attributes
from videollm.models.video_llama import VideoLLaMAProcessor
from videollm.registry import registry
from videollm.tiny_chat_eval import answer_is_right, markdown, summarize


def build(name, **cfg):
    return registry.get_builder_class(name).from_config(OmegaConf.create(cfg) if cfg else None).build_datasets()["train"]


def test_conversations_cover_every_type_in_every_turn_and_match_the_chat_prompt():
    ds = build("synthetic_chat")
    first, later = Counter(), Counter()
    for i in range(200):
        s = ds[i]
        turns = s["conversations"]
        assert turns[0]["value"].startswith("<video> ") and len(turns) in (2, 4, 6)
        asked = []
        for j in range(0, len(turns), 2):
            q = turns[j]["value"].replace("<video> ", "")
            qtype = next(t for t, qs in VIDEO_QUESTIONS.items() if q in qs)
            asked.append(qtype)
            (first if j == 0 else later)[qtype] += 1
        assert len(set(asked)) == len(asked)  # no type twice in one conversation
    assert set(first) == set(later) == set(VIDEO_QUESTIONS)
    # the same index gives the same sample; the frame-time sentence is the loader's
    a, b = ds[7], ds[7]
    assert a["conversations"] == b["conversations"] and torch.equal(a["image"], b["image"])
    assert a["media_msg"] == "The video contains 4 frames sampled at 0.0, 0.5, 1.0, 1.5 seconds. "
    batch = VideoLLaMAProcessor("tiny", 8, "vicuna", True)(ds.collater([ds[i] for i in range(4)]))
    text = VideoLLaMAProcessor("tiny", 8, "vicuna", True).tokenizer.decode(batch["input_ids"][0].tolist())
    assert "</Video> The video contains 4 frames sampled at" in text and "seconds.  " in text  # the chat's double space


def test_image_conversations_and_answers():
    ds = build("synthetic_chat_images")
    s = ds[3]
    assert s["image"].shape == (3, 32, 32) and s["conversations"][0]["value"].startswith("<image>  ")
    for i in range(50):
        for j in range(0, len(ds[i]["conversations"]), 2):
            q = ds[i]["conversations"][j]["value"].replace("<image>  ", "")
            assert any(q in qs for qs in IMAGE_QUESTIONS.values())
    assert synthetic_answer("video", "what", "circle", "red", "left") == "A red circle is moving left."
    assert parse_attributes(synthetic_answer("image", "shape", "square", "blue"))["shape"] == "square"


def test_scoring_of_answers():
    truth = {"shape": "circle", "color": "red", "direction": "left"}
    assert answer_is_right("what", "A red circle is moving left.", truth, "video")
    assert not answer_is_right("what", "A red circle is moving right.", truth, "video")
    assert answer_is_right("what", "A red circle.", truth, "image")
    assert answer_is_right("direction", "It is moving left.", truth, "video")
    assert not answer_is_right("color", "It is blue.", truth, "video")
    records = [{"kind": "video", "type": "color", "turn": 1, "correct": True},
               {"kind": "video", "type": "color", "turn": 2, "correct": False},
               {"kind": "video", "type": "color", "turn": 3, "correct": True}]
    s = summarize(records)["video"]["color"]
    assert s["first"] == 1.0 and s["later"] == 0.5 and s["n"] == 3
    assert "| video | color | 100.0% | 50.0% | 3 |" in markdown(summarize(records))


def test_chat_prompt_format_tokenises_the_chats_own_prompt():
    """train_prompt_format: chat writes a conversation exactly as the chat prompts: same ids."""
    from videollm.chat import Chat, new_conversation
    from videollm.models.merge import Segment  # noqa: F401
    from videollm.templates import get_template

    proc = VideoLLaMAProcessor("tiny", 8, "vicuna", True, "chat")
    turns = [{"from": "human", "value": "<image>  What shape is it?"}, {"from": "gpt", "value": "It is a circle."},
             {"from": "human", "value": "What color is the shape?"}, {"from": "gpt", "value": "It is red."}]
    ids, labels = proc.tokenize(turns)
    tok = proc.tokenizer
    conv = new_conversation("vicuna", "image")
    conv.append_message(conv.roles[0], get_template("vicuna").media_message("image") + " What shape is it?")
    conv.append_message(conv.roles[1], "It is a circle.")
    conv.append_message(conv.roles[0], "What color is the shape?")
    conv.append_message(conv.roles[1], "It is red.")
    want = tok(conv.get_prompt().replace("<ImageHere>", "<ImageHere>" * 8))["input_ids"]
    assert ids.tolist() == want
    supervised = tok.decode([i for i, l in zip(ids.tolist(), labels.tolist()) if l != -100])
    assert supervised.replace(" ", "") == "Itisacircle.###Itisred.###"
    assert labels[0] == -100 and Chat is not None


class _RecordingChat:
    """Just enough of the Chat API for run_conversations: answers every question blankly."""

    def upload_video_without_audio(self, path, conv, media):
        media.append(path)

    def upload_img(self, path, conv, media):
        media.append(path)

    def ask(self, text, conv):
        conv.append_message(conv.roles[0], text)

    def answer_batch(self, convs, media_lists, max_new_tokens=16):
        for conv in convs:
            conv.append_message(conv.roles[1], "nothing")
        return [("nothing", None) for _ in convs]


@pytest.mark.parametrize("kind", ["video", "image"])
def test_held_out_conversations_ask_every_phrasing_first_and_later(kind):
    from videollm.datasets.synthetic_datasets import IMAGE_QUESTIONS, VIDEO_QUESTIONS
    from videollm.tiny_chat_eval import run_conversations

    table = VIDEO_QUESTIONS if kind == "video" else IMAGE_QUESTIONS
    items = [{"path": f"{kind}_{i}", "shape": "circle", "color": "red", "direction": "up"} for i in range(36)]
    records = run_conversations(_RecordingChat(), items, kind, "vicuna", batch_size=8)
    assert len(records) == len(items) * len(table)
    for qtype, phrasings in table.items():
        for first in (True, False):
            asked = {r["question"] for r in records if r["type"] == qtype and (r["turn"] == 1) == first}
            assert asked == set(phrasings), (qtype, first, asked)
    for item in items:  # one conversation per item: every type once
        assert sorted(r["type"] for r in records if r["item"] == item["path"]) == sorted(table)
