"""Synthetic data and greedy evaluation of the tiny LLaMA-VID recipes (CPU).

    python scripts/llama_vid_synthetic.py data --out data/llama_vid_synth
    python train.py --cfg-path train_configs/llama_vid_tiny_synthetic.yaml        # stage 2: short clips
    python train.py --cfg-path train_configs/llama_vid_tiny_synthetic_long.yaml   # stage 3: long videos
    python scripts/llama_vid_synthetic.py eval --cfg-path eval_configs/llama_vid_tiny.yaml \\
        --ckpt output/llama_vid_tiny_synthetic_long/checkpoint_0.pth --data data/llama_vid_synth

``data`` writes, under ``--out``:

* ``eva_tiny.pth``: the tiny EVA ViT (random, seeded) every step uses, as a real run uses
  ``eva_vit_g.pth`` (the recipes point ``model.vision_tower`` at it). Its dimensions are the
  ``tiny_synth`` preset's (4-px patches, 128 wide); its Linear and patch-embedding weights are
  drawn with std ``--eva-init-std`` (0.1) and its outputs scaled by ``--eva-scale`` (10), so
  that the shape survives the content token's mean pooling: with EVA's own init (0.02, features
  nearly linear in the pixels, and tiny differences between images) a linear probe on the
  mean-pooled patch tokens of still shapes finds the shape in 64 % (8-px patches) or 84 % (4-px)
  of the images, with this one in 100 % (the colour: 100 % in all);
* ``clips/*.mp4`` (``--num-clips``, 3060; the first ``--num-test-clips``, 60, held out): one
  coloured shape moving (videollm.synthetic), 32 px, 4 fps, 1 to 4 s long, so 1-fps sampling
  gives 1 to 4 frames (2 to 8 visual tokens); ``short_train.json`` / ``short_test.json``:
  LLaMA-VID JSON with ``--short-turns`` (3) turns asking the colour, the shape and the length in
  seconds, in random order (each later turn's tokens are conditioned on its own question);
  ``--short-kinds`` adds ``match`` ("Is there a <color> <shape>?" -> yes / no, half of each);
* ``long/train/*.pkl`` (``--num-long``, 400): "long videos" as feature files: ``--parts`` parts
  (4) of ``--part-seconds`` s (15: a 60-s movie, 60 frames at 1 fps, 120 visual tokens), each
  part one static shape of its own colour (``--repeat-colors``: distinct colour/shape pairs only), with the subtitle "part <n>" on every
  second of it (``--subtitles start``: only at its start); questions (``--long-kinds``) "What is
  shown in part <n>?" -> "a <color> <shape>", "In which part is the <color> <shape>?" -> "part
  <n>" (and, if asked for, "What is shown first/last?"); ``long_train.json`` (plus
  ``--short-in-long``, 200, short-clip conversations, so that stage 3 keeps the short skills).
  ``--part-seconds A-B`` draws each part's length from A..B s (so that a part's place in the
  token sequence no longer tells which part it is), ``--digits`` names the parts "part 1" ...
  (one token each for the tiny tokenizer), ``--long-turns N`` asks N questions about different
  parts in one conversation (needs ``model.movie_multi_turn: true``);
* ``long/test/*.mp4`` + ``.srt`` (``--num-test-long``, 12): held-out long videos as video files with subtitles, turned into
  feature files by ``python -m videollm.features llama-vid`` in ``eval`` (the demo's path), with
  ``long_test.json`` holding the questions.

``eval`` answers every held-out question greedily through :class:`videollm.chat.Chat`
(``llamavid_vicuna_v1``, the training system prompt) and prints exact-match accuracies as JSON
(for "a <color> <shape>" answers also each word's, and the most frequent answers of each kind).
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
SIZE = 32
TINY = ROOT / "videollm/configs/models/llama_vid_tiny_synth.yaml"


SHORT_KINDS = ("color", "shape", "length", "match")


def _match_question(rng: random.Random, spec: ClipSpec):
    """"Is there a <color> <shape>?": half of the time the clip's own pair (yes), otherwise a pair
    that differs in its colour, its shape or both (no)."""
    if rng.random() < 0.5:
        return f"Is there a {spec.color} {spec.shape}?", "yes"
    pairs = [(c, s) for c in COLORS for s in SHAPES if (c, s) != (spec.color, spec.shape)]
    color, shape = rng.choice(pairs)
    return f"Is there a {color} {shape}?", "no"


def _short_qa(rng: random.Random, spec: ClipSpec, seconds: int, turns: int = 3, kinds=SHORT_KINDS[:3]):
    """``turns`` of the questions of ``kinds`` (colour, shape, length; ``match``: "Is there a <color>
    <shape>?" -> yes / no), in random order."""
    qa = {"color": ("What color is the shape?", spec.color), "shape": ("What shape is moving?", spec.shape),
          "length": ("How many seconds long is the video?", f"{NUMBERS[seconds - 1]} seconds")}
    qa = [qa[k] if k != "match" else _match_question(rng, spec) for k in kinds]
    rng.shuffle(qa)
    conv = []
    for k, (q, a) in enumerate(qa[:turns]):
        conv += [{"from": "human", "value": q + ("\n<image>" if k == 0 else "")}, {"from": "gpt", "value": a}]
    return conv


def _parts(rng: random.Random, n: int, distinct_colors: bool = True):
    """``n`` distinct (colour, shape) pairs; ``distinct_colors`` (n <= 4): a different colour each."""
    if distinct_colors and n <= len(COLORS):
        return [(c, rng.choice(SHAPES)) for c in rng.sample(list(COLORS), n)]
    pairs = [(c, s) for c in COLORS for s in SHAPES]
    return rng.sample(pairs, n)


def _long_frames(parts, seed: int, seconds) -> np.ndarray:
    """One frame a second: part k's still shape for ``seconds[k]`` seconds."""
    frames = []
    for k, (color, shape) in enumerate(parts):
        img = render_image(ImageSpec(f"p{k}", shape, color, seed=seed * 100 + k), size=SIZE)
        frames += [img] * seconds[k]
    return np.stack(frames)


def _part_name(k: int, digits: bool = False) -> str:
    """Part ``k``'s name (0-based): "part one" ... or, ``digits``, "part 1" ... (a single token for the
    tiny tokenizer, which spells "one" ... "eight" in two or three pieces, "two" and "three" both
    starting with "t")."""
    return f"part {k + 1}" if digits else f"part {NUMBERS[k]}"


def _subtitles(parts, seconds, every_second: bool = True, digits: bool = False):
    """A running "part <n>" caption on every second of each part (each frame's own subtitle), or
    (not ``every_second``) one at the start of each part; part k lasts ``seconds[k]`` seconds."""
    starts = np.cumsum([0] + list(seconds)).tolist()
    if every_second:
        return [{"start_time": float(t), "end_time": t + 0.5, "text": _part_name(k, digits)}
                for k in range(len(parts)) for t in range(starts[k], starts[k + 1])]
    return [{"start_time": starts[k] + 0.0, "end_time": starts[k] + 2.0, "text": _part_name(k, digits)}
            for k in range(len(parts))]


def _part_seconds(spec: str):
    """``--part-seconds``: ``"15"`` (every part 15 s) or ``"8-22"`` (each part drawn from 8..22 s)."""
    try:
        lo, _, hi = spec.partition("-")
        lo, hi = int(lo), int(hi or lo)
    except ValueError:
        raise SystemExit(f"--part-seconds {spec!r}: expected N or A-B (seconds)") from None
    if not 1 <= lo <= hi:
        raise SystemExit(f"--part-seconds {spec!r}: expected 1 <= A <= B")
    return lo, hi


def seeded_eva(vit_dims: dict, std: float, scale: float = 1.0):
    """The toy's frozen EVA: EVA's init with Linear and patch-embedding weights of std ``std``
    (trunc-normal at 2 std, zero biases, then EVA's 1/sqrt(2 i) on each block's proj and fc2),
    and every output scaled by ``scale``: the patch embedding, position embedding, CLS token and
    each block's proj / fc2 are multiplied by it, which (the blocks' LayerNorms being
    scale-invariant, up to their eps) multiplies the residual stream, so the features."""
    import math

    from torch import nn

    from videollm.models.eva_vit import create_eva_vit_g

    vit = create_eva_vit_g(img_size=SIZE, precision="fp32", **vit_dims).eval()
    with torch.no_grad():
        for module in vit.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(module.weight, std=std, a=-2 * std, b=2 * std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for i, block in enumerate(vit.blocks, start=1):
            for linear in (block.attn.proj, block.mlp.fc2):
                linear.weight.mul_(scale / math.sqrt(2.0 * i))
        for tensor in (vit.patch_embed.proj.weight, vit.pos_embed, vit.cls_token):
            tensor.mul_(scale)
    return vit


LONG_KINDS = ("what_is_in_part_n", "which_part_has_x", "first", "last")


def _long_questions(parts, kinds=LONG_KINDS, digits: bool = False):
    """The questions of ``kinds`` about one long video: (question, answer, kind)."""
    qs = [(f"What is shown in {_part_name(k, digits)}?", f"a {c} {s}", "what_is_in_part_n") for k, (c, s) in enumerate(parts)]
    qs += [(f"In which part is the {c} {s}?", _part_name(k, digits), "which_part_has_x") for k, (c, s) in enumerate(parts)]
    qs += [("What is shown first?", "a {} {}".format(*parts[0]), "first"), ("What is shown last?", "a {} {}".format(*parts[-1]), "last")]
    return [q for q in qs if q[2] in kinds]


def _long_conversation(rng: random.Random, parts, video: str, kinds=LONG_KINDS, digits: bool = False, turns: int = 1):
    """One training conversation about a movie: ``turns`` questions about different parts (so that
    no answer can be read off an earlier turn), the movie prompt in the first, whose text also
    conditions the context tokens."""
    qs = _long_questions(parts, kinds, digits)
    if turns <= 1:
        picked = [rng.choice(qs)]
    else:
        names = {_part_name(k, digits): k for k in range(len(parts))}
        names.update({"a {} {}".format(*pair): k for k, pair in enumerate(parts)})
        picked, used = [], set()
        for q in rng.sample(qs, len(qs)):
            if names[q[1]] not in used:
                picked.append(q)
                used.add(names[q[1]])
                if len(picked) == turns:
                    break
    conv = []
    for k, (q, a, _) in enumerate(picked):
        conv += [{"from": "human", "value": (MOVIE_START + "<image>" + MOVIE_END + "\n" if k == 0 else "") + q},
                 {"from": "gpt", "value": a}]
    return {"video": video, "conversations": conv}


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
    from videollm.processors.clip_image import CLIPImageProcessor

    kinds = args.short_kinds.split(",")
    if not set(kinds) <= set(SHORT_KINDS) or len(kinds) < args.short_turns:
        raise SystemExit(f"--short-kinds {args.short_kinds!r}: at least --short-turns ({args.short_turns}) of {','.join(SHORT_KINDS)}")
    part_seconds = _part_seconds(args.part_seconds)
    out = Path(args.out)
    (out / "clips").mkdir(parents=True, exist_ok=True)
    (out / "long/train").mkdir(parents=True, exist_ok=True)
    (out / "long/test").mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    tiny = OmegaConf.to_container(OmegaConf.load(TINY))["model"]
    vit = seeded_eva(tiny["vit"], args.eva_init_std, args.eva_scale)
    torch.save(vit.state_dict(), out / "eva_tiny.pth")

    short = {"train": [], "test": []}
    for i in range(args.num_clips):
        spec = ClipSpec(f"c{i}", rng.choice(SHAPES), rng.choice(list(COLORS)), rng.choice(DIRECTIONS),
                        rng.choice(["slow", "fast"]), seed=i)
        seconds = rng.randint(1, 4)
        write_clip(out / "clips" / f"{i:05d}.mp4", spec, width=SIZE, height=SIZE, fps=4, duration=seconds)
        split = "test" if i < args.num_test_clips else "train"
        short[split].append({"id": f"c{i}", "video": f"clips/{i:05d}.mp4", "conversations": _short_qa(rng, spec, seconds, args.short_turns, kinds),
                             "color": spec.color, "shape": spec.shape, "seconds": seconds})
    for split, items in short.items():
        (out / f"short_{split}.json").write_text(json.dumps(items, indent=0))

    proc = CLIPImageProcessor(SIZE)
    long_train, long_test = [], []
    for i in range(args.num_long + args.num_test_long):
        parts = _parts(rng, args.parts, not args.repeat_colors)
        # fixed lengths draw nothing, so that the default data stay what they were
        seconds = [rng.randint(*part_seconds) if part_seconds[0] < part_seconds[1] else part_seconds[0] for _ in parts]
        frames = _long_frames(parts, i, seconds)
        subs = _subtitles(parts, seconds, args.subtitles == "every-second", args.digits)
        if i < args.num_long:
            with torch.no_grad():
                feats = vit(proc(frames).half().float()).numpy().astype(np.float16)
            inputs = interleave_subtitles(subs, [float(t) for t in range(len(frames))])
            write_feature_file(out / "long/train" / f"{i:05d}.pkl", feats, inputs)
            for _ in range(args.questions_per_long):
                long_train.append({"id": f"l{i}", **_long_conversation(rng, parts, f"long/train/{i:05d}.pkl",
                                                                       args.long_kinds.split(","), args.digits, args.long_turns)})
        else:
            name = f"{i:05d}"
            _write_mp4(out / "long/test" / f"{name}.mp4", frames)
            (out / "long/test" / f"{name}.srt").write_text(_srt(subs))
            long_test.append({"video": f"long/test/{name}.mp4", "qa": _long_questions(parts, args.long_kinds.split(","), args.digits), "frames": len(frames), "part_seconds": seconds})
    long_train += rng.sample(short["train"], min(args.short_in_long, len(short["train"])))
    rng.shuffle(long_train)
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
        hits = {}
        per_kind = {}
        for item in items:
            conv, imgs = template.new_conversation(), []
            chat.upload_video_without_audio(str(data / item["video"]), conv, imgs)
            for turn in range(0, len(item["conversations"]), 2):
                k = f"turn{turn // 2 + 1}"
                q = item["conversations"][turn]["value"].replace("\n<image>", "")
                truth = item["conversations"][turn + 1]["value"]
                chat.ask(q, conv)
                answer, _ = chat.answer(conv, imgs, max_new_tokens=8)
                ok = _match(answer, truth)
                hits[k] = hits.get(k, 0) + ok
                kind = {"many": "length", "there": "match"}.get(q.split()[1], q.split()[1])
                per_kind.setdefault(kind, [0, 0])
                per_kind[kind][0] += ok
                per_kind[kind][1] += 1
        n = len(items)
        results["short"] = {"clips": n, **{f"{k}_accuracy": v / n for k, v in hits.items()},
                            "by_question": {k: v[0] / v[1] for k, v in per_kind.items()}}
    if not args.skip_long:
        items = json.loads((data / "long_test.json").read_text())
        feat_dir = data / "long/test_features"
        cfg_tiny = str(args.model_config)
        correct, partial, answers = {}, {}, {}
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
                if truth.startswith("a "):  # "a <color> <shape>": each word on its own
                    words = answer.strip().rstrip(".").lower().split()
                    for slot, name in ((1, "color"), (2, "shape")):
                        part = partial.setdefault(f"{kind}_{name}", [0, 0])
                        part[0] += len(words) > slot and words[slot] == truth.split()[slot]
                        part[1] += 1
                answers.setdefault(kind, {}).setdefault(answer.strip(), 0)
                answers[kind][answer.strip()] += 1
        results["long"] = {"videos": len(items), "frames_per_video": sorted({item.get("frames") for item in items}),
                           **{k: v[0] / v[1] for k, v in correct.items()},
                           "words": {k: v[0] / v[1] for k, v in partial.items()},
                           "questions": sum(v[1] for v in correct.values()),
                           "most_frequent_answers": {k: sorted(v.items(), key=lambda x: -x[1])[:3] for k, v in answers.items()}}
    print(json.dumps(results, indent=1))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("data")
    d.add_argument("--out", default="data/llama_vid_synth")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--num-clips", type=int, default=3060)
    d.add_argument("--num-test-clips", type=int, default=60)
    d.add_argument("--short-turns", type=int, default=3, choices=(1, 2, 3, 4), help="questions per short clip")
    d.add_argument("--short-kinds", default="color,shape,length",
                   help=f"comma-separated short-clip question kinds, of {','.join(SHORT_KINDS)}")
    d.add_argument("--num-long", type=int, default=400)
    d.add_argument("--num-test-long", type=int, default=12)
    d.add_argument("--questions-per-long", type=int, default=8)
    d.add_argument("--parts", type=int, default=4, help="parts (shapes in sequence) of a long video")
    d.add_argument("--part-seconds", default="15",
                   help="seconds (frames at 1 fps) of each part: N, or A-B (each part's length drawn from A..B)")
    d.add_argument("--repeat-colors", action="store_true",
                   help="parts may share a colour (default: each part its own colour, when --parts <= 4)")
    d.add_argument("--subtitles", choices=("every-second", "start"), default="every-second",
                   help="'part <n>' on every second of its part, or only at its start")
    d.add_argument("--long-turns", type=int, default=1,
                   help="questions (turns) per long-video conversation: each answer is a training target, the movie is read once")
    d.add_argument("--digits", action="store_true", help="parts named 'part 1' ... instead of 'part one' ...")
    d.add_argument("--short-in-long", type=int, default=200, help="short-clip conversations mixed into long_train.json")
    d.add_argument("--long-kinds", default="what_is_in_part_n,which_part_has_x",
                   help=f"comma-separated long-video question kinds, of {','.join(LONG_KINDS)}")
    d.add_argument("--eva-init-std", type=float, default=0.1, help="std of the random EVA's weights")
    d.add_argument("--eva-scale", type=float, default=10.0, help="factor on the random EVA's outputs (its init)")
    e = sub.add_parser("eval")
    e.add_argument("--cfg-path", default="eval_configs/llama_vid_tiny.yaml")
    e.add_argument("--ckpt", required=True)
    e.add_argument("--data", default="data/llama_vid_synth")
    e.add_argument("--options", nargs="*")
    e.add_argument("--model-config", default=str(TINY), help="model YAML whose EVA dimensions the features command uses")
    e.add_argument("--skip-short", action="store_true")
    e.add_argument("--skip-long", action="store_true")
    args = parser.parse_args(argv)
    return cmd_data(args) if args.cmd == "data" else cmd_eval(args)


if __name__ == "__main__":
    sys.exit(main())
