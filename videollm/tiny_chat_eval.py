"""Does the tiny chat model answer what it was taught, in any turn? (held-out clips and images)

    python -m videollm.tiny_chat_eval --cfg-path eval_configs/tiny.yaml --data data/synthetic \
        --out output/tiny_chat_eval.json

Every held-out clip of ``python -m videollm.synthetic`` (``webvid/test``: H.264 files decoded as a
user's upload is) gets one conversation asking all four question types (what is moving, colour,
shape, direction) and every held-out still image (written here as PNG files from seeds the
training never drew) one asking the three image types (what is in it, colour, shape). The order
of the types and the phrasing rotate from clip to clip, so that every type is asked first and in
later turns equally often. Answers are greedy (the one decoding default), generated in batches
through the Chat API (``Chat.answer_batch``, left padding: equal to one-by-one answers), and
scored by the attribute words they name (:func:`videollm.evaluation.parse_attributes`): a "what"
answer must name every attribute right. The result: accuracy per medium, question type and turn
(first, later), in JSON and as a markdown table.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import random
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from videollm.datasets.synthetic_datasets import IMAGE_QUESTIONS, VIDEO_QUESTIONS
from videollm.evaluation import parse_attributes
from videollm.errors import VideoLLMError

logger = logging.getLogger(__name__)

EVAL_IMAGE_SEED = 9_000_000  # far from the training renders' seeds


def _held_out_clips(data: Path) -> List[Dict[str, str]]:
    manifest = json.loads((data / "manifest.json").read_text())
    test_names = set()
    for part in sorted((data / "webvid" / "test").glob("*.csv")):
        with part.open(newline="") as f:
            test_names.update(row["videoid"] for row in csv.DictReader(f))
    clips = [v for v in manifest["videos"] if Path(v["path"]).stem in test_names]
    if not clips:
        raise VideoLLMError(f"{data}: no held-out clips (webvid/test) in manifest.json; run python -m videollm.synthetic")
    return [{"path": str(data / v["path"]), "shape": v["shape"], "color": v["color"], "direction": v["direction"]}
            for v in clips]


def _held_out_images(out_dir: Path, n: int) -> List[Dict[str, str]]:
    from PIL import Image

    from videollm import synthetic

    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(EVAL_IMAGE_SEED)
    images = []
    for i in range(n):
        spec = synthetic.ImageSpec(name=f"eval_image_{i}", shape=synthetic.SHAPES[i % len(synthetic.SHAPES)],
                                   color=tuple(synthetic.COLORS)[(i // len(synthetic.SHAPES)) % len(synthetic.COLORS)],
                                   seed=rng.randrange(1 << 30))
        path = out_dir / f"{spec.name}.png"
        Image.fromarray(synthetic.render_image(spec, size=64)).save(path)
        images.append({"path": str(path), "shape": spec.shape, "color": spec.color})
    return images


def answer_is_right(question_type: str, answer: str, truth: Dict[str, str], kind: str) -> bool:
    got = parse_attributes(answer)
    if question_type == "what":
        attrs = ("shape", "color", "direction") if kind == "video" else ("shape", "color")
        return all(got[a] == truth[a] for a in attrs)
    return got[question_type] == truth[question_type]


def run_conversations(chat, items: Sequence[Dict[str, str]], kind: str, template: str, batch_size: int = 16,
                      max_new_tokens: int = 16) -> List[Dict[str, Any]]:
    """One conversation per item asking every question type of ``kind``; returns one record per answer."""
    from videollm.chat import new_conversation

    table = VIDEO_QUESTIONS if kind == "video" else IMAGE_QUESTIONS
    types = sorted(table)
    records: List[Dict[str, Any]] = []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        states = []
        for k, item in enumerate(chunk):
            n = start + k
            order = types[n % len(types):] + types[:n % len(types)]  # each type first equally often
            conv, media = new_conversation(template, kind), []
            if kind == "video":
                chat.upload_video_without_audio(item["path"], conv, media)
            else:
                chat.upload_img(item["path"], conv, media)
            states.append((item, order, conv, media, n))
        for turn in range(len(types)):
            questions = []
            for item, order, conv, media, n in states:
                qtype = order[turn]
                # every phrasing of every type in every turn position, for images (3 types) too
                questions.append(table[qtype][(n // len(types) + turn) % len(table[qtype])])
                chat.ask(questions[-1], conv)
            answers = chat.answer_batch([s[2] for s in states], [s[3] for s in states], max_new_tokens=max_new_tokens)
            for (item, order, conv, media, n), question, (text, _) in zip(states, questions, answers):
                qtype = order[turn]
                records.append({"kind": kind, "item": item["path"], "turn": turn + 1, "type": qtype,
                                "question": question, "answer": text,
                                "correct": answer_is_right(qtype, text, item, kind)})
    return records


def summarize(records: Sequence[Dict[str, Any]]) -> Dict[str, Dict[str, Dict[str, float]]]:
    """{kind: {type: {"first": acc, "later": acc, "all": acc, "n": count}}}"""
    out: Dict[str, Dict[str, Dict[str, float]]] = {}
    for kind in sorted({r["kind"] for r in records}):
        out[kind] = {}
        for qtype in sorted({r["type"] for r in records if r["kind"] == kind}):
            rows = [r for r in records if r["kind"] == kind and r["type"] == qtype]
            first = [r["correct"] for r in rows if r["turn"] == 1]
            later = [r["correct"] for r in rows if r["turn"] > 1]
            out[kind][qtype] = {"first": sum(first) / max(1, len(first)), "later": sum(later) / max(1, len(later)),
                                "all": sum(r["correct"] for r in rows) / len(rows), "n": len(rows)}
    return out


def markdown(summary: Dict[str, Dict[str, Dict[str, float]]]) -> str:
    lines = ["| medium | question type | first turn | later turns | answers |", "|---|---|---:|---:|---:|"]
    for kind, types in summary.items():
        for qtype, s in types.items():
            lines.append(f"| {kind} | {qtype} | {100 * s['first']:.1f}% | {100 * s['later']:.1f}% | {int(s['n'])} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    import torch

    from videollm.chat import add_model_args, build_chat_from_args

    parser = argparse.ArgumentParser(prog="python -m videollm.tiny_chat_eval", description=__doc__.split("\n")[0])
    add_model_args(parser)
    parser.add_argument("--data", default="data/synthetic", help="folder written by python -m videollm.synthetic")
    parser.add_argument("--out", default="output/tiny_chat_eval.json", help="result JSON (a .md table beside it)")
    parser.add_argument("--images", type=int, default=120, help="held-out still images to write and ask about")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.manual_seed(0)
    try:
        chat, template, _ = build_chat_from_args(args)
        out = Path(args.out)
        records = run_conversations(chat, _held_out_clips(Path(args.data)), "video", template, args.batch_size)
        images = _held_out_images(out.parent / (out.stem + "_images"), args.images)
        records += run_conversations(chat, images, "image", template, args.batch_size)
    except VideoLLMError as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    summary = summarize(records)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"summary": summary, "records": records}, indent=1) + "\n")
    table = markdown(summary)
    out.with_suffix(".md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
