"""The tiny LLaMA-VID recipes' synthetic data (scripts/llama_vid_synthetic.py): the toy EVA's init and the files."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import llama_vid_synthetic as synth  # noqa: E402

DIMS = {"patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 4, "mlp_hidden": 64}


def test_seeded_eva_scale_multiplies_the_features():
    x = torch.randn(3, 3, 32, 32)
    torch.manual_seed(0)
    plain = synth.seeded_eva(DIMS, 0.1, 1.0)
    torch.manual_seed(0)
    scaled = synth.seeded_eva(DIMS, 0.1, 10.0)
    with torch.no_grad():
        a, b = plain(x), scaled(x)
    assert a.shape == (3, 1 + 64, 32)
    # the blocks' LayerNorms are scale-invariant up to their eps (1e-6), which the small CLS token feels
    torch.testing.assert_close(b[:, 1:], 10.0 * a[:, 1:], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(b[:, :1], 10.0 * a[:, :1], rtol=3e-2, atol=3e-3)
    linear = [m.weight.detach() for m in plain.modules() if isinstance(m, torch.nn.Linear)]
    assert 0.06 < float(torch.cat([w.flatten() for w in linear]).std()) < 0.1  # std 0.1, /sqrt(2i) on proj, fc2


def test_data_command_writes_clips_movies_and_questions(tmp_path):
    out = tmp_path / "synth"
    assert synth.main(["data", "--out", str(out), "--num-clips", "3", "--num-test-clips", "1", "--num-long", "1",
                       "--num-test-long", "1", "--questions-per-long", "3", "--short-in-long", "1",
                       "--parts", "4", "--part-seconds", "3"]) == 0
    from videollm.long_video import parse_srt, read_feature_file

    short = json.loads((out / "short_train.json").read_text())
    assert len(short) == 2 and all(len(item["conversations"]) == 6 for item in short)  # three turns
    asked = [turn["value"].split("\n")[0] for turn in short[0]["conversations"][::2]]
    assert sorted(asked) == sorted(["What color is the shape?", "What shape is moving?",
                                    "How many seconds long is the video?"])
    feats, inputs = read_feature_file(out / "long/train/00000.pkl")
    tiny = synth.TINY.read_text()
    assert "patch_size: 4, embed_dim: 128" in tiny and feats.shape == (12, 65, 128) and feats.dtype == np.float16
    assert inputs.count("<image>part one") == 3 and inputs.endswith("<image>part four")  # a caption every second
    long_train = json.loads((out / "long_train.json").read_text())
    assert len(long_train) == 4 and sum(item["video"].endswith(".mp4") for item in long_train) == 1
    test = json.loads((out / "long_test.json").read_text())[0]
    assert test["frames"] == 12 and {kind for _, _, kind in test["qa"]} == {"what_is_in_part_n", "which_part_has_x"}
    colors = [truth.split()[1] for _, truth, kind in test["qa"] if kind == "what_is_in_part_n"]
    assert len(set(colors)) == 4  # each part its own colour
    subs = parse_srt(out / test["video"].replace(".mp4", ".srt"))
    assert len(subs) == 12 and subs[3]["text"] == "part two"


def test_match_questions_are_yes_for_the_clips_own_pair_and_no_otherwise():
    import random

    from videollm.synthetic import COLORS, SHAPES, ClipSpec

    rng = random.Random(0)
    spec = ClipSpec("c", "circle", "red", "left", "slow", seed=0)
    answers = {}
    for _ in range(200):
        q, a = synth._match_question(rng, spec)
        color, shape = q[len("Is there a "):-1].split()
        assert color in COLORS and shape in SHAPES
        assert a == ("yes" if (color, shape) == ("red", "circle") else "no")
        answers[a] = answers.get(a, 0) + 1
    assert 70 < answers["yes"] < 130  # about half
    conv = synth._short_qa(rng, spec, 2, turns=4, kinds=synth.SHORT_KINDS)
    assert len(conv) == 8 and conv[0]["value"].endswith("\n<image>")
    assert sum(turn["value"].startswith("Is there a ") for turn in conv[::2]) == 1


def test_data_command_refuses_unknown_short_kinds(tmp_path):
    import pytest

    with pytest.raises(SystemExit, match="--short-kinds"):
        synth.main(["data", "--out", str(tmp_path), "--short-kinds", "color,size,length"])


def test_part_seconds_range_draws_each_parts_length_and_the_subtitles_follow(tmp_path):
    out = tmp_path / "synth"
    assert synth.main(["data", "--out", str(out), "--num-clips", "1", "--num-test-clips", "1", "--num-long", "1",
                       "--num-test-long", "2", "--questions-per-long", "1", "--short-in-long", "0",
                       "--parts", "6", "--part-seconds", "1-4"]) == 0
    from videollm.long_video import parse_srt, read_feature_file

    for item in json.loads((out / "long_test.json").read_text()):
        seconds = item["part_seconds"]
        assert len(seconds) == 6 and all(1 <= s <= 4 for s in seconds) and item["frames"] == sum(seconds)
        subs = parse_srt(out / item["video"].replace(".mp4", ".srt"))
        assert [s["text"] for s in subs] == [f"part {synth.NUMBERS[k]}" for k in range(6) for _ in range(seconds[k])]
        pairs = [truth for _, truth, kind in item["qa"] if kind == "what_is_in_part_n"]
        assert len(set(pairs)) == 6  # six parts: colours repeat, colour-shape pairs do not
    feats, inputs = read_feature_file(out / "long/train/00000.pkl")
    assert inputs.count("<image>") == feats.shape[0] and 6 <= feats.shape[0] <= 24
    import pytest

    for bad in ("0-3", "5-2", "ten"):
        with pytest.raises(SystemExit, match="--part-seconds"):
            synth.main(["data", "--out", str(tmp_path / "x"), "--part-seconds", bad])


def test_digit_part_names_in_questions_answers_and_subtitles():
    parts = [("red", "circle"), ("blue", "square")]
    qa = synth._long_questions(parts, digits=True)
    assert ("What is shown in part 2?", "a blue square", "what_is_in_part_n") in qa
    assert ("In which part is the red circle?", "part 1", "which_part_has_x") in qa
    subs = synth._subtitles(parts, [1, 2], digits=True)
    assert [s["text"] for s in subs] == ["part 1", "part 2", "part 2"] and subs[2]["start_time"] == 2.0
    assert [s["text"] for s in synth._subtitles(parts, [1, 2])] == ["part one", "part two", "part two"]
    from videollm.tokenizer import load_tokenizer

    tok = load_tokenizer("tiny")  # the reason for the option: each digit is one token of its own
    ids = {name: tok(name, add_special_tokens=False)["input_ids"] for name in ("part 2", "part 3", "part two", "part three")}
    assert ids["part 2"][:-1] == ids["part 3"][:-1] and ids["part 2"][-1] != ids["part 3"][-1]
    assert tok.decode(ids["part 2"][-1:]).strip() == "2"
    # while "two" and "three" are spelt in pieces that start alike
    n = len(ids["part 2"]) - 2  # after "part"
    assert ids["part two"][n] == ids["part three"][n] and len(ids["part three"]) > len(ids["part 3"])


def test_multi_turn_movie_conversations_ask_each_part_once():
    import random

    from videollm.long_video import MOVIE_START

    parts = [("red", "circle"), ("blue", "square"), ("green", "triangle"), ("red", "square")]
    rng = random.Random(1)
    for _ in range(20):
        item = synth._long_conversation(rng, parts, "m.pkl", synth.LONG_KINDS, digits=True, turns=3)
        turns = item["conversations"]
        assert len(turns) == 6 and turns[0]["value"].startswith(MOVIE_START + "<image>")
        assert all("<image>" not in t["value"] for t in turns[1:])
        subjects = []
        for q, a in zip(turns[::2], turns[1::2]):
            text = q["value"].split("\n")[-1]
            if text.startswith("In which part"):
                assert a["value"] == f"part {parts.index(tuple(text[len('In which part is the '):-1].split())) + 1}"
                subjects.append(int(a["value"].split()[1]) - 1)
            elif text in ("What is shown first?", "What is shown last?"):
                subjects.append(0 if "first" in text else 3)
            else:
                subjects.append(int(text.split()[-1].rstrip("?")) - 1)
                assert a["value"] == "a {} {}".format(*parts[subjects[-1]])
        assert len(set(subjects)) == 3  # no part asked twice: no answer to copy from an earlier turn
    one = synth._long_conversation(rng, parts, "m.pkl", turns=1)["conversations"]
    assert len(one) == 2
