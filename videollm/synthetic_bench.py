"""An offline video benchmark from held-out synthetic clips, in the MVBench and MSVD-QA layouts.

    python -m videollm.synthetic_bench --out data/synthetic_bench --num-clips 48
    python -m videollm.evaluate --cfg-path eval_configs/tiny.yaml --benchmark mvbench \\
        --data-root data/synthetic_bench/mvbench --prompt-style question
    python -m videollm.evaluate --cfg-path eval_configs/tiny.yaml --benchmark msvd_qa --data-root data/synthetic_bench/msvd_qa

Every clip (one coloured shape moving one way, :mod:`videollm.synthetic`) gets three questions:
its colour, its shape and its direction, phrased as the tiny model's instruction data phrases
them. The clips are held out: their trajectory seeds lie in ``[2**31, 2**32)``, a range neither
the on-the-fly training clips (``synthetic_clips``: seeds below ``2**30``) nor ``python -m
videollm.synthetic`` (below ``2**31``) draw from; attributes are balanced over the clips.

Layout under ``--out``::

    mvbench/tasks.json                    {task: [json file, video folder, "video", false]}
    mvbench/json/object_color.json        [{"video", "question", "candidates", "answer"}] (MVBench fields)
    mvbench/json/object_shape.json
    mvbench/json/moving_direction.json
    mvbench/video/synthetic/<name>.mp4
    msvd_qa/test_qa.json                  [{"answer", "id", "question", "video_id"}] (MSVD-QA fields)
    msvd_qa/youtube_mapping.txt           "<clip name> vid<N>" lines
    msvd_qa/YouTubeClips/<name>.mp4
    manifest.json                         every clip's attributes and seed

Chance on the multiple-choice part: (1/4 colour + 1/3 shape + 1/4 direction) / 3 = 27.8%.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from videollm import synthetic
from videollm.errors import ConfigError

SEED_BASE = 2 ** 31  # above every seed the training data draws (see the module docstring)
QUESTIONS: Tuple[Tuple[str, str, str, str], ...] = (
    # (MVBench task, json file, attribute, question): the tiny model's instruction phrasings
    ("Object Color", "object_color.json", "color", "What color is the moving shape?"),
    ("Object Shape", "object_shape.json", "shape", "What shape is moving in the video?"),
    ("Moving Direction", "moving_direction.json", "direction", "Which direction is the shape moving?"),
)
VOCAB: Dict[str, Sequence[str]] = {"color": tuple(synthetic.COLORS), "shape": synthetic.SHAPES,
                                   "direction": synthetic.DIRECTIONS}
CHANCE = 100.0 * sum(1.0 / len(VOCAB[a]) for _, _, a, _ in QUESTIONS) / len(QUESTIONS)


def held_out_specs(num_clips: int, seed: int = 0) -> List[synthetic.ClipSpec]:
    """``num_clips`` clips with balanced colour, shape, direction and speed, held-out seeds."""
    if num_clips < 1:
        raise ConfigError(f"--num-clips {num_clips}: need at least one clip")
    rng = random.Random(f"videollm-synthetic-bench-{seed}")

    def balanced(values: Sequence[Any]) -> List[Any]:
        out = [values[i % len(values)] for i in range(num_clips)]
        rng.shuffle(out)
        return out

    colors, shapes = balanced(tuple(synthetic.COLORS)), balanced(synthetic.SHAPES)
    directions, speeds = balanced(synthetic.DIRECTIONS), balanced(tuple(synthetic.SPEEDS))
    return [synthetic.ClipSpec(name=f"bench_{i:04d}", shape=shapes[i], color=colors[i], direction=directions[i],
                               speed=speeds[i], seed=SEED_BASE + rng.randrange(2 ** 31))
            for i in range(num_clips)]


def _dump(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1) + "\n", encoding="utf-8")


def write_benchmark(out_dir: Union[str, Path], *, num_clips: int = 48, seed: int = 0, width: int = 64,
                    height: int = 64, fps: float = 8, duration: float = 2.0) -> Dict[str, Any]:
    """Write the offline benchmark (layout in the module docstring); returns the manifest.

    The clip size, rate and length default to those of the tiny model's training clips.
    """
    out = Path(out_dir)
    rng = random.Random(f"videollm-synthetic-bench-options-{seed}")
    specs = held_out_specs(num_clips, seed)
    mv_video = out / "mvbench" / "video" / "synthetic"
    msvd_video = out / "msvd_qa" / "YouTubeClips"
    mv_video.mkdir(parents=True, exist_ok=True)
    msvd_video.mkdir(parents=True, exist_ok=True)
    per_task: Dict[str, List[Dict[str, Any]]] = {q[1]: [] for q in QUESTIONS}
    msvd: List[Dict[str, Any]] = []
    mapping: List[str] = []
    clips = []
    for n, spec in enumerate(specs):
        path = mv_video / f"{spec.name}.mp4"
        synthetic.write_clip(path, spec, width=width, height=height, fps=fps, duration=duration)
        shutil.copyfile(path, msvd_video / f"{spec.name}.mp4")
        mapping.append(f"{spec.name} vid{n + 1}")
        clips.append({**asdict(spec), "caption": synthetic.caption_for(spec), "video": f"synthetic/{spec.name}.mp4"})
        for _, json_name, attr, question in QUESTIONS:
            answer = getattr(spec, attr)
            cands = list(VOCAB[attr])
            rng.shuffle(cands)
            per_task[json_name].append({"video": f"{spec.name}.mp4", "question": question, "candidates": cands,
                                        "answer": answer})
            msvd.append({"answer": answer, "id": len(msvd), "question": question, "video_id": n + 1})
    _dump(out / "mvbench" / "tasks.json", {task: [json_name, "synthetic/", "video", False] for task, json_name, _, _ in QUESTIONS})
    for json_name, entries in per_task.items():
        _dump(out / "mvbench" / "json" / json_name, entries)
    _dump(out / "msvd_qa" / "test_qa.json", msvd)
    (out / "msvd_qa" / "youtube_mapping.txt").write_text("\n".join(mapping) + "\n", encoding="utf-8")
    manifest = {"seed": seed, "seed_base": SEED_BASE, "num_clips": num_clips, "chance_mc": round(CHANCE, 2),
                "params": {"width": width, "height": height, "fps": fps, "duration": duration}, "clips": clips}
    _dump(out / "manifest.json", manifest)
    return manifest


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m videollm.synthetic_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--num-clips", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lmms-eval-task", action="store_true",
                        help="also write an lmms-eval task folder (lmms_eval_task/) for the multiple-choice part")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    try:
        m = write_benchmark(args.out, num_clips=args.num_clips, seed=args.seed)
        if args.lmms_eval_task:
            from videollm.integrations.lmms_eval import write_task

            write_task(Path(args.out) / "lmms_eval_task", Path(args.out) / "mvbench", benchmark="mvbench",
                       prompt_style="question")
    except ConfigError as exc:
        print(f"error: {exc}")
        return 2
    print(f"wrote {m['num_clips']} clips, {3 * m['num_clips']} questions in the MVBench and MSVD-QA layouts to "
          f"{args.out} in {time.perf_counter() - t0:.1f} s (multiple-choice chance {m['chance_mc']}%)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
