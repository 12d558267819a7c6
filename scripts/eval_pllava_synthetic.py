"""Greedy accuracy of a tiny PLLaVA on held-out synthetic clips, through the Chat API.

    python -m videollm.synthetic --out data/synthetic --seed 0 --num-videos 480
    python scripts/eval_pllava_synthetic.py --ckpt output/pllava_tiny_synthetic/checkpoint_0.pth \
        --data data/synthetic [--out output/pllava_tiny_synthetic/eval_results.json]

For every test clip of the manifest (decoded from its H.264 file with the model's own inference
processing) the demo's questions are asked in batches (``Chat.answer_batch``, greedy): "What is
moving in the video?" as the first question (colour, shape and direction parsed from the answer),
then "Which direction is the shape moving?" as the follow-up in the same conversation, and the
same direction question as a first question (a phrasing the tiny training data never opens with).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

Q_WHAT = "What is moving in the video?"
Q_DIRECTION = "Which direction is the shape moving?"


def first_word(text: str, vocab) -> str:
    found = [(m.start(), w) for w in vocab for m in [re.search(rf"\b{w}\b", text.lower())] if m]
    return min(found)[1] if found else ""


def main(argv=None) -> int:
    import torch

    from videollm.chat import Chat, new_conversation
    from videollm.config import load_config
    from videollm.registry import registry
    import videollm.models  # noqa: F401

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cfg-path", default=str(REPO / "train_configs/pllava_tiny_synthetic.yaml"))
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--data", default=str(REPO / "data/synthetic"))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--limit", type=int, default=0)
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    cfg = load_config(args.cfg_path, [f"model.ckpt={args.ckpt}"])
    model = registry.get_model_class("pllava").from_config(cfg.model).eval()
    chat = Chat(model, device="cpu")
    template = model.default_template
    manifest = json.loads((Path(args.data) / "manifest.json").read_text())
    vocab = manifest["vocab"]
    clips = [v for v in manifest["videos"] if v["split"] == "test"]
    if args.limit:
        clips = clips[: args.limit]
    hits = {"color": 0, "shape": 0, "direction": 0, "exact": 0, "followup_direction": 0, "first_direction": 0}
    examples = []
    t0 = time.perf_counter()
    for start in range(0, len(clips), args.batch):
        part = clips[start:start + args.batch]
        convs, imgs, convs2, imgs2 = [], [], [], []
        for clip in part:
            path = str(Path(args.data) / clip["path"])
            for cs, ims in ((convs, imgs), (convs2, imgs2)):
                conv, img_list = new_conversation(template, "video"), []
                chat.upload_video_without_audio(path, conv, img_list)
                cs.append(conv)
                ims.append(img_list)
        for conv in convs:
            chat.ask(Q_WHAT, conv)
        answers = [a for a, _ in chat.answer_batch(convs, imgs, max_new_tokens=20)]
        for conv in convs:
            chat.ask(Q_DIRECTION, conv)
        followups = [a for a, _ in chat.answer_batch(convs, imgs, max_new_tokens=12)]
        for conv in convs2:
            chat.ask(Q_DIRECTION, conv)
        firsts = [a for a, _ in chat.answer_batch(convs2, imgs2, max_new_tokens=12)]
        for clip, a, f, g in zip(part, answers, followups, firsts):
            truth = f"A {clip['color']} {clip['shape']} is moving {clip['direction']}."
            hits["color"] += first_word(a, vocab["color"]) == clip["color"]
            hits["shape"] += first_word(a, vocab["shape"]) == clip["shape"]
            hits["direction"] += first_word(a, vocab["direction"]) == clip["direction"]
            hits["exact"] += a.strip() == truth
            hits["followup_direction"] += first_word(f, vocab["direction"]) == clip["direction"]
            hits["first_direction"] += first_word(g, vocab["direction"]) == clip["direction"]
            if len(examples) < 6:
                examples.append({"clip": clip["path"], "truth": truth, Q_WHAT: a, "follow-up " + Q_DIRECTION: f,
                                 "first " + Q_DIRECTION: g})
    n = len(clips)
    result = {"clips": n, "seconds": round(time.perf_counter() - t0, 1),
              "accuracy": {k: round(100.0 * v / max(n, 1), 1) for k, v in hits.items()}, "examples": examples}
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
