"""Instruction-data tokenisation and label masks reproduce the original's rules."""

import torch

from videollm.conversation import (
    IGNORE_INDEX,
    collate_instruct,
    expand_image_placeholders,
    get_conv_template,
    tokenize_llama_v2,
    tokenize_vicuna,
    videochat_to_turns,
)
from videollm.tokenizer import load_dataset_tokenizer

TOK = load_dataset_tokenizer("tiny")
QA = [{"q": "What is moving?", "a": "A red circle."}, {"q": "Where?", "a": "To the left."}]


def n_tok(text):
    """Non-pad length of text tokenised alone with BOS (the original's _tokenize_fn)."""
    return sum(1 for i in TOK(text)["input_ids"] if i != TOK.pad_token_id)


def test_video_prefix_and_turns():
    turns = videochat_to_turns(QA, 3, "The video contains 8 frames sampled at 0.0 seconds. ")
    assert turns[0] == {
        "from": "human",
        "value": "<Video><ImageHere><ImageHere><ImageHere></Video> The video contains 8 frames sampled at 0.0 seconds. What is moving?",
    }
    assert [t["from"] for t in turns] == ["human", "gpt", "human", "gpt"]


def test_image_placeholder_expansion_keeps_llava_newline():
    turns = expand_image_placeholders([{"from": "human", "value": "<image>\nWhat?"}], 2)
    assert turns[0]["value"] == "<Image><ImageHere><ImageHere></Image>\nWhat?"


def test_vicuna_mask_is_the_originals_misaligned_mask():
    turns = videochat_to_turns(QA, 4)
    ids, labels = tokenize_vicuna(turns, TOK)
    text = "\n\n" + "".join(
        "###" + ("Human" if t["from"] == "human" else "Assistant") + ": " + t["value"] + "\n" for t in turns
    ) + "###"
    assert ids.tolist() == TOK(text)["input_ids"]
    # Walk the original's rule by hand: header masked, human turns masked from cursor + 2.
    expected = ids.clone()
    cur = n_tok("\n\n")
    expected[:cur] = IGNORE_INDEX
    for t in turns:
        seg = "###" + ("Human" if t["from"] == "human" else "Assistant") + ": " + t["value"] + "\n"
        if t["from"] == "human":
            expected[cur + 2 : cur + n_tok(seg)] = IGNORE_INDEX
        cur += n_tok(seg)
    assert labels.tolist() == expected.tolist()
    supervised = TOK.decode([i for i, l in zip(ids.tolist(), labels.tolist()) if l != IGNORE_INDEX])
    assert "red circle" in supervised and "What is moving" not in supervised
    assert ids[-1] != IGNORE_INDEX and labels[-1] == ids[-1]  # the trailing "###" is supervised


def test_vicuna_corrected_mask_is_an_explicit_option():
    turns = videochat_to_turns(QA, 4)
    ids, labels = tokenize_vicuna(turns, TOK, fix_label_mask=True)
    _, original = tokenize_vicuna(turns, TOK)
    assert not torch.equal(labels, original)
    supervised = TOK.decode([i for i, l in zip(ids.tolist(), labels.tolist()) if l != IGNORE_INDEX])
    assert "Human" not in supervised and "red circle" in supervised and "left" in supervised


def test_llama_v2_prompt_string_and_mask():
    turns = videochat_to_turns(QA, 2)
    conv = get_conv_template("llama_v2", training=True)
    for t in turns:
        conv.append_message(conv.roles[0] if t["from"] == "human" else conv.roles[1], t["value"])
    prompt = conv.get_prompt()
    assert prompt == (
        "[INST] <<SYS>>\n \n<</SYS>>\n\n<Video><ImageHere><ImageHere></Video> What is moving? [/INST] A red circle. </s>"
        "<s>[INST] Where? [/INST] To the left. </s>"
    )
    ids, labels = tokenize_llama_v2(turns, TOK)
    assert ids.tolist() == TOK(prompt)["input_ids"]
    assert labels[0] == IGNORE_INDEX
    eos_positions = (ids == TOK.eos_token_id).nonzero()[:, 0].tolist()
    assert len(eos_positions) == 2 and all(labels[p] == TOK.eos_token_id for p in eos_positions)
    supervised = TOK.decode([i for i, l in zip(ids.tolist(), labels.tolist()) if l != IGNORE_INDEX], skip_special_tokens=True)
    assert "red circle" in supervised and "left" in supervised and "Where" not in supervised


def test_truncation_at_512_and_collate_padding():
    long = [{"q": "word " * 600, "a": "A red circle."}]
    ids, labels = tokenize_vicuna(videochat_to_turns(long, 2), TOK)
    assert len(ids) == 512 and len(labels) == 512
    a = tokenize_vicuna(videochat_to_turns(QA[:1], 2), TOK)
    b = tokenize_vicuna(videochat_to_turns(QA, 2), TOK)
    batch = collate_instruct(
        [{"input_ids": a[0], "labels": a[1], "image": torch.zeros(3, 2, 4, 4)}, {"input_ids": b[0], "labels": b[1], "image": torch.zeros(3, 2, 4, 4)}],
        TOK.pad_token_id,
    )
    n = len(a[0])
    assert batch["conv_type"] == "multi" and batch["images"].shape == (2, 3, 2, 4, 4)
    assert (batch["input_ids"][0, n:] == 0).all() and (batch["labels"][0, n:] == IGNORE_INDEX).all()
    assert batch["attention_mask"][0].sum() == n


def test_chat_templates():
    conv = get_conv_template("vicuna")
    conv.append_message("Human", "<Video><ImageHere></Video> hi")
    conv.append_message("Assistant", None)
    assert conv.get_prompt() == "###Human: <Video><ImageHere></Video> hi###Assistant:"
    conv = get_conv_template("llama_v2")
    conv.append_message("USER", "hi")
    conv.append_message("ASSISTANT", None)
    assert conv.get_prompt().startswith("[INST] <<SYS>>\nYou are a helpful language and vision assistant.")
    assert conv.get_prompt().endswith("\n<</SYS>>\n\nhi [/INST]")
