"""Synthetic data and greedy evaluation of the tiny LLaMA-VID recipes (CPU).

    python scripts/llama_vid_synthetic.py data --out data/llama_vid_synth
    python train.py --cfg-path train_configs/llama_vid_tiny_synthetic.yaml        # stage 2: short clips
    python train.py --cfg-path train_configs/llama_vid_tiny_synthetic_long.yaml   # stage 3: long videos
    python scripts/llama_vid_synthetic.py eval --cfg-path eval_configs/llama_vid_tiny.yaml \\
        --ckpt output/llama_vid_tiny_synthetic_long/checkpoint_0.pth --data data/llama_vid_synth

``data`` writes, under ``--out``:

* ``eva_tiny.pth``: the tiny EVA ViT (random, seeded) every step uses, as a real run uses
  ``eva_vit_g.pth`` (the recipes point ``model.vision_tower`` at it);
* ``clips/*.mp4``: one coloured shape moving (videollm.synthetic), 32 px, 4 fps, 1 to 4 s long, so
  1-fps sampling gives 1 to 4 frames (2 to 8 visual tokens); ``short_train.json`` /
  ``short_test.json``: LLaMA-VID JSON with two-turn conversations (the colour, the shape or the
  length in seconds, in random order: the second turn's tokens are conditioned on its own question);
* ``long/train/*.pkl``: "long videos" as feature files: 8 parts of 12 s (96 s, 96 frames at
  1 fps, 192 visual tokens), each part one static shape of a distinct colour/shape pair, with a
  subtitle "part <n>" at its start; questions "What is shown in part <n>?" -> "a <color> <shape>",
  "In which part is the <color> <shape>?" -> "part <n>", "What is shown first/last?";
  ``long_train.json``;
* ``long/test/*.mp4`` + ``.srt``: held-out long videos as video files with subtitles, turned into
  feature files by ``python -m videollm.features llama-vid`` in ``eval`` (the demo's path), with
  ``long_test.json`` holding the questions.

``eval`` answers every held-out question greedily through :class:`videollm.chat.Chat`
(``llamavid_vicuna_v1``, the training system prompt) and prints exact-match accuracies as JSON.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from videollm.long_video import MOVIE_END, MOVIE_START  # noqa: E402
from videollm.synthetic import COLORS, SHAPES, ClipSpec, DIRECTIONS, ImageSpec, render_image, write_clip  # noqa: E402

NUMBERS = ["one", "two", "three", "four", "five", "six", "seven", "eight"]
PARTS, PART_SECONDS, SIZE = 8, 12, 32
TINY = ROOT / "videollm/configs/models/llama_vid_tiny.yaml"


def _short_qa(rng: random.Random, spec: ClipSpec, seconds: int):
    qa = [("What color is the shape?", spec.color), ("What shape is moving?", spec.shape),
          ("How many seconds long is the video?", f"{NUMBERS[seconds - 1]} seconds")]
    rng.shuffle(qa)
    (q1, a1), (q2, a2) = qa[:2]
    return [{"from": "human", "value": q1 + "\n<image>"}, {"from": "gpt", "value": a1},
            {"from": "human", "value": q2}, {"from": "gpt", "value": a2}]


def _parts(rng: random.Random):
    pairs = [(c, s) for c in COLORS for s in SHAPES]
    return rng.sample(pairs, PARTS)


def _long_frames(parts, seed: int) -> np.ndarray:
    frames = []
    for k, (color, shape) in enumerate(parts):
        img = render_image(ImageSpec(f"p{k}", shape, color, seed=seed * 100 + k), size=SIZE)
        frames += [img] * PART_SECONDS
    return np.stack(frames)


def _subtitles(parts, every_second: bool = False):
    """A "part <n>" subtitle at the start of each part, or (``every_second``) a running caption on
    every second of it (each frame's own subtitle)."""
    if every_second:
        return [{"start_time": float(t), "end_time": t + 0.5, "text": f"part {NUMBERS[k]}"}
                for k in range(len(parts)) for t in range(k * PART_SECONDS, (k + 1) * PART_SECONDS)]
    return [{"start_time": k * PART_SECONDS + 0.0, "end_time": k * PART_SECONDS + 2.0, "text": f"part {NUMBERS[k]}"}
            for k in range(len(parts))]


def _long_questions(parts):
    """Every question about one long video: (question, answer, kind)."""
    qs = [(f"What is shown in part {NUMBERS[k]}?", f"a {c} {s}", "what_is_in_part_n") for k, (c, s) in enumerate(parts)]
    qs += [(f"In which part is the {c} {s}?", f"part {NUMBERS[k]}", "which_part_has_x") for k, (c, s) in enumerate(parts)]
    qs += [("What is shown first?", "a {} {}".format(*parts[0]), "first"), ("What is shown last?", "a {} {}".format(*parts[-1]), "last")]
    return qs


def _long_qa(rng: random.Random, parts):
    q, a, _ = rng.choice(_long_questions(parts))
    return q, a


def _srt(subs) -> str:
    def stamp(t: float) -> str:
        ms = int(round(t * 1000))
        return f"{ms // 3600000:02d}:{ms // 60000 % 60:02d}:{ms // 1000 % 60:02d},{ms % 1000:03d}"

    return "".join(f"{i + 1}\n{stamp(s['start_time'])} --> {stamp(s['end_time'])}\n{s['text']}\n\n" for i, s in enumerate(subs))


def _write_mp4(path: Path, frames: np.ndarray, fps: int = 2) -> None:
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"crf": "18", "preset": "ultrafast"}
        for image in frames:
            for image_fps in range(fps):  # each 1-s frame held for `fps` stream frames
                for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                    container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def cmd_data(args) -> int:
    from omegaconf import OmegaConf

    from videollm.long_video import interleave_subtitles, write_feature_file
    from videollm.models.eva_vit import create_eva_vit_g
    from videollm.processors.clip_image import CLIPImageProcessor

    out = Path(args.out)
    (out / "clips").mkdir(parents=True, exist_ok=True)
    (out / "long/train").mkdir(parents=True, exist_ok=True)
    (out / "long/test").mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    tiny = OmegaConf.to_container(OmegaConf.load(TINY))["model"]
    vit = create_eva_vit_g(img_size=SIZE, precision="fp32", **tiny["vit"]).eval()
    torch.save(vit.state_dict(), out / "eva_tiny.pth")

    short = {"train": [], "test": []}
    for i in range(args.num_clips):
        spec = ClipSpec(f"c{i}", rng.choice(SHAPES), rng.choice(list(COLORS)), rng.choice(DIRECTIONS),
                        rng.choice(["slow", "fast"]), seed=i)
        seconds = rng.randint(1, 4)
        write_clip(out / "clips" / f"{i:05d}.mp4", spec, width=SIZE, height=SIZE, fps=4, duration=seconds)
        split = "test" if i < args.num_test_clips else "train"
        short[split].append({"id": f"c{i}", "video": f"clips/{i:05d}.mp4", "conversations": _short_qa(rng, spec, seconds),
                             "color": spec.color, "shape": spec.shape, "seconds": seconds})
    for split, items in short.items():
        (out / f"short_{split}.json").write_text(json.dumps(items, indent=0))

    proc = CLIPImageProcessor(SIZE)
    long_train, long_test = [], []
    for i in range(args.num_long + args.num_test_long):
        parts = _parts(rng)
        frames = _long_frames(parts, i)
        subs = _subtitles(parts, args.subtitle_every_second)
        if i < args.num_long:
            with torch.no_grad():
                feats = vit(proc(frames).half().float()).numpy().astype(np.float16)
            inputs = interleave_subtitles(subs, [float(t) for t in range(len(frames))])
            write_feature_file(out / "long/train" / f"{i:05d}.pkl", feats, inputs)
            for _ in range(args.questions_per_long):
                q, a = _long_qa(rng, parts)
                long_train.append({"id": f"l{i}", "video": f"long/train/{i:05d}.pkl", "conversations": [
                    {"from": "human", "value": MOVIE_START + "<image>" + MOVIE_END + "\n" + q}, {"from": "gpt", "value": a}]})
        else:
            name = f"{i:05d}"
            _write_mp4(out / "long/test" / f"{name}.mp4", frames)
            (out / "long/test" / f"{name}.srt").write_text(_srt(subs))
            long_test.append({"video": f"long/test/{name}.mp4", "qa": _long_questions(parts)})
    (out / "long_train.json").write_text(json.dumps(long_train, indent=0))
    (out / "long_test.json").write_text(json.dumps(long_test, indent=0))
    print(f"{args.num_clips} clips ({len(short['train'])} train), {args.num_long} long train videos "
          f"({len(long_train)} questions), {args.num_test_long} long test videos -> {out}")
    return 0


def _build_chat(args):
    from omegaconf import OmegaConf

    from videollm.chat import Chat
    from videollm.config import load_config
    from videollm.registry import registry

    import videollm.models  # noqa: F401  (registers the models)

    cfg = load_config(args.cfg_path, [f"model.ckpt={args.ckpt}", f"model.vision_tower={Path(args.data) / 'eva_tiny.pth'}"]
                      + list(args.options or []))
    model = registry.get_model_class("llama_vid").from_config(cfg.model)
    model.eval()
    return Chat(model), OmegaConf.to_container(cfg.model)


def _match(answer: str, truth: str) -> bool:
    return answer.strip().rstrip(".").lower() == truth.lower()


def cmd_eval(args) -> int:
    from videollm import features
    from videollm.templates import get_template

    chat, _ = _build_chat(args)
    template = get_template("llamavid_vicuna_v1")
    data = Path(args.data)
    results = {}
    torch.set_grad_enabled(False)
    if not args.skip_short:
        items = json.loads((data / "short_test.json").read_text())
        hits = {"turn1": 0, "turn2": 0}
        per_kind = {}
        for item in items:
            conv, imgs = template.new_conversation(), []
            chat.upload_video_without_audio(str(data / item["video"]), conv, imgs)
            for turn, k in ((0, "turn1"), (2, "turn2")):
                q = item["conversations"][turn]["value"].replace("\n<image>", "")
                truth = item["conversations"][turn + 1]["value"]
                chat.ask(q, conv)
                answer, _ = chat.answer(conv, imgs, max_new_tokens=8)
                ok = _match(answer, truth)
                hits[k] += ok
                kind = q.split()[1]
                per_kind.setdefault(kind, [0, 0])
                per_kind[kind][0] += ok
                per_kind[kind][1] += 1
        n = len(items)
        results["short"] = {"clips": n, "turn1_accuracy": hits["turn1"] / n, "turn2_accuracy": hits["turn2"] / n,
                            "by_question": {k: v[0] / v[1] for k, v in per_kind.items()}}
    if not args.skip_long:
        items = json.loads((data / "long_test.json").read_text())
        feat_dir = data / "long/test_features"
        cfg_tiny = str(TINY)
        correct = {}
        for item in items:
            mp4 = data / item["video"]
            rc = features.main(["llama-vid", "--video", str(mp4), "--out", str(feat_dir), "--model-config", cfg_tiny,
                                "--vision-tower", str(data / "eva_tiny.pth"), "--device", "cpu"])
            if rc:
                raise SystemExit(f"feature extraction failed for {mp4}")
            pkl = feat_dir / (mp4.stem + ".pkl")
            for q, truth, kind in item["qa"]:
                conv, imgs = template.new_conversation(), []
                chat.upload_video_without_audio(str(pkl), conv, imgs)
                chat.ask(q, conv)
                answer, _ = chat.answer(conv, imgs, max_new_tokens=8)
                hit = correct.setdefault(kind, [0, 0])
                hit[0] += _match(answer, truth)
                hit[1] += 1
        results["long"] = {"videos": len(items), "frames_per_video": PARTS * PART_SECONDS,
                           **{k: v[0] / v[1] for k, v in correct.items()},
                           "questions": sum(v[1] for v in correct.values())}
    print(json.dumps(results, indent=1))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("data")
    d.add_argument("--out", default="data/llama_vid_synth")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--num-clips", type=int, default=600)
    d.add_argument("--num-test-clips", type=int, default=60)
    d.add_argument("--num-long", type=int, default=240)
    d.add_argument("--num-test-long", type=int, default=4)
    d.add_argument("--questions-per-long", type=int, default=8)
    d.add_argument("--subtitle-every-second", action="store_true", help="a running 'part <n>' caption on every frame")
    e = sub.add_parser("eval")
    e.add_argument("--cfg-path", default="eval_configs/llama_vid_tiny.yaml")
    e.add_argument("--ckpt", required=True)
    e.add_argument("--data", default="data/llama_vid_synth")
    e.add_argument("--options", nargs="*")
    e.add_argument("--skip-short", action="store_true")
    e.add_argument("--skip-long", action="store_true")
    args = parser.parse_args(argv)
    return cmd_data(args) if args.cmd == "data" else cmd_eval(args)


if __name__ == "__main__":
    sys.exit(main())
