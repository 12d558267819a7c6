"""The tiny Video-LLaVA recipe on synthetic clips: prepare the data, then measure the trained model.

    python scripts/video_llava_synthetic.py prepare --out data/synthetic_video_llava
    python train.py --cfg-path train_configs/video_llava_tiny_lora.yaml
    python scripts/video_llava_synthetic.py eval --cfg-path eval_configs/video_llava_tiny.yaml \
        --data data/synthetic_video_llava --out output/video_llava_tiny_lora/eval_results.json

``prepare`` writes clips with ``videollm.synthetic.generate`` and turns their VideoChat-style
questions into the LLaVA JSON format (``llava/video_llava_train.json``: ``{"video",
"conversations"}`` with ``<video>`` before the first question), read by the ``llava_json``
builder. ``eval`` asks every held-out (test split) clip the demo's question "What is moving in
the video?" through the Chat API (greedy) and reports how often the answer names the clip's
colour, shape and direction, and how often it is the exact expected sentence; then "Which
direction is the shape moving?" as the follow-up question (``direction_followup``, how the
training data asks it) and as the first question of a fresh chat (``direction_question``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

QUESTION = "What is moving in the video?"
DIRECTION_QUESTION = "Which direction is the shape moving?"


def prepare(args: argparse.Namespace) -> int:
    from videollm import synthetic

    out = Path(args.out)
    t0 = time.time()
    manifest = synthetic.generate(out, seed=args.seed, num_videos=args.num_videos, num_images=4, broken=False)
    chat = json.loads((out / "videochat/videochat_instruct.json").read_text())
    entries = []
    for item in chat:
        conv = []
        for j, qa in enumerate(item["QA"]):
            conv.append({"from": "human", "value": ("<video>\n" + qa["q"]) if j == 0 else qa["q"]})
            conv.append({"from": "gpt", "value": qa["a"]})
        entries.append({"id": item["video"], "video": item["video"], "conversations": conv})
    (out / "llava").mkdir(parents=True, exist_ok=True)
    (out / "llava/video_llava_train.json").write_text(json.dumps(entries, indent=1))
    test = [v for v in manifest["videos"] if v["split"] == "test"]
    print(f"{len(entries)} training conversations, {len(test)} held-out clips in {out} ({time.time() - t0:.1f} s)")
    return 0


def evaluate(args: argparse.Namespace) -> int:
    from videollm import synthetic
    from videollm.chat import build_chat_from_args
    from videollm.templates import get_template

    chat, template, notices = build_chat_from_args(args)
    for n in notices:
        print("notice:", n)
    data = Path(args.data)
    manifest = json.loads((data / "manifest.json").read_text())
    test = [v for v in manifest["videos"] if v["split"] == "test"][: args.limit or None]
    hits = {"color": 0, "shape": 0, "direction": 0, "exact": 0, "direction_followup": 0, "direction_question": 0}
    examples = []
    t0 = time.time()
    for v in test:
        conv = get_template(template).new_conversation()
        imgs: list = []
        chat.upload_video_without_audio(str(data / v["path"]), conv, imgs)
        chat.ask(QUESTION, conv)
        text, _ = chat.answer(conv, imgs, max_new_tokens=16)
        words = text.lower().replace(".", " ").split()
        hits["color"] += v["color"] in words
        hits["shape"] += v["shape"] in words
        hits["direction"] += v["direction"] in words
        expected = f"A {v['color']} {v['shape']} is moving {v['direction']}."
        hits["exact"] += text.strip() == expected
        chat.ask(DIRECTION_QUESTION, conv)  # the demo's second question as a follow-up (as in training)
        follow, _ = chat.answer(conv, imgs, max_new_tokens=16)
        hits["direction_followup"] += v["direction"] in follow.lower().replace(".", " ").split()
        conv = get_template(template).new_conversation()  # ... and as the first question of a chat
        imgs = []
        chat.upload_video_without_audio(str(data / v["path"]), conv, imgs)
        chat.ask(DIRECTION_QUESTION, conv)
        text2, _ = chat.answer(conv, imgs, max_new_tokens=16)
        hits["direction_question"] += v["direction"] in text2.lower().replace(".", " ").split()
        if len(examples) < 6:
            examples.append({"clip": v["path"], "expected": expected, "answer": text, "followup": follow,
                             "direction_first": text2})
    n = max(len(test), 1)
    result = {"clips": len(test), "question": QUESTION, "greedy": True,
              "accuracy": {k: round(100.0 * h / n, 1) for k, h in hits.items()},
              "chance": {"color": round(100 / len(synthetic.COLORS), 1), "shape": round(100 / len(synthetic.SHAPES), 1),
                         "direction": round(100 / len(synthetic.DIRECTIONS), 1)},
              "seconds": round(time.time() - t0, 1), "examples": examples}
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--out", default="data/synthetic_video_llava")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-videos", type=int, default=480)
    e = sub.add_parser("eval")
    from videollm.chat import add_model_args

    add_model_args(e)
    e.add_argument("--data", default="data/synthetic_video_llava")
    e.add_argument("--out", default="")
    e.add_argument("--limit", type=int, default=0)
    args = parser.parse_args(argv)
    return prepare(args) if args.cmd == "prepare" else evaluate(args)


if __name__ == "__main__":
    sys.exit(main())
