"""Benchmark: stage-1 training samples/s from 720p H.264 files vs from the frozen-encoder feature cache.

One run, one tiny Video-LLaMA (``video_llama_tiny``: random weights, 32 px frames; the recipe is
``train_configs/tiny_stage1.yaml`` with ``alpro_video_eval`` processing and ``--n-frms`` uniform
frames), on WebVid-layout clips generated like ``bench/video_loading.py``'s (a panning random
texture, libx264 veryfast CRF 23, 25 fps, ``--gop`` key-frame interval, 1280x720). It prints:

* the cache build time (decoding + the frozen front, ``videollm.feature_cache.build_cache``),
  the cache size per clip;
* training samples/s of the same loop (the project's loader ``build_train_loader`` with the
  model's batch processor, ``--num-workers`` workers, forward, backward, AdamW step) reading the
  files and reading the cache, each after ``--warmup`` steps, and their ratio (target >= 10x).

What is measured on the file side is mostly decoding (the tiny model's step is milliseconds);
on the cache side, reading safetensors shards plus the tiny model's step. At full size the
cache also removes the ViT-g + Q-Former forward (a large share of a stage-1 step on a GPU).

Usage (about 2-4 minutes on 2 cores, clip encoding included; clips are kept under --clip-dir)::

    .venv/bin/python bench/feature_cache.py
    .venv/bin/python bench/feature_cache.py --num-clips 8 --file-steps 4 --quick
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402


def make_clips(args: argparse.Namespace) -> Path:
    """``<clip-dir>/videos/000/<id>.mp4`` and ``<clip-dir>/anno/part_0.csv`` (WebVid layout)."""
    import numpy as np

    from video_loading import write_textured_clip

    root = Path(args.clip_dir)
    videos = root / "videos" / "000"
    videos.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    rows = []
    t0, made = time.perf_counter(), 0
    for i in range(args.num_clips):
        sec = round(float(rng.uniform(args.min_seconds, args.max_seconds)), 1)
        vid = f"{args.width}x{args.height}_{args.fps}fps_gop{args.gop}_{sec:.1f}s_{args.seed}_{i}"
        path = videos / f"{vid}.mp4"
        if not path.exists():
            write_textured_clip(path, sec, fps=args.fps, width=args.width, height=args.height, gop=args.gop,
                                seed=args.seed * 1000 + i)
            made += 1
        rows.append({"videoid": vid, "contentUrl": "", "duration": f"PT{int(sec)}S", "page_dir": "000",
                     "name": f"a panning texture number {i}"})
    anno = root / f"anno_{args.num_clips}_{args.seed}_{args.min_seconds}_{args.max_seconds}"
    anno.mkdir(exist_ok=True)
    with open(anno / "part_0.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    if made:
        print(f"encoded {made} clip(s) in {time.perf_counter() - t0:.1f} s")
    return anno


def recipe(args: argparse.Namespace, anno: Path, cache: Optional[Path] = None):
    from videollm.config import load_config

    opts = [f"datasets.webvid.build_info.anno_dir={anno}",
            f"datasets.webvid.build_info.videos_dir={Path(args.clip_dir) / 'videos'}",
            "datasets.webvid.vis_processor.train.name=alpro_video_eval",
            f"datasets.webvid.vis_processor.train.n_frms={args.n_frms}",
            f"datasets.webvid.vis_processor.eval.n_frms={args.n_frms}",
            f"run.num_workers={args.num_workers}", f"run.batch_size_train={args.batch_size}"]
    if cache is not None:
        opts.append(f"datasets.webvid.feature_cache={cache}")
    return load_config(HERE.parent / "train_configs/tiny_stage1.yaml", opts)


def train_rate(model: Any, datasets: Dict[str, Any], args: argparse.Namespace, steps: int) -> Dict[str, float]:
    """Samples/s of ``steps`` training steps after ``args.warmup`` (loader workers started)."""
    from videollm.datasets import build_train_loader

    loader = build_train_loader({"webvid": datasets["webvid"]["train"]}, batch_size=args.batch_size,
                                num_workers=args.num_workers, seed=42, batch_processor=model.batch_processor())
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    it = iter(loader)
    samples, t0 = 0, None
    for step in range(args.warmup + steps):
        if step == args.warmup:
            t0 = time.perf_counter()
        batch = next(it)
        loss = model(batch)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step >= args.warmup:
            samples += int(batch.get("num_samples", args.batch_size))
    seconds = time.perf_counter() - t0
    return {"samples": samples, "seconds": seconds, "samples_per_s": samples / seconds}


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--num-clips", type=int, default=24)
    ap.add_argument("--min-seconds", type=float, default=4.0)
    ap.add_argument("--max-seconds", type=float, default=12.0)
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=720)
    ap.add_argument("--fps", type=int, default=25)
    ap.add_argument("--gop", type=int, default=250, help="key frame interval in frames (250 = 10 s)")
    ap.add_argument("--n-frms", type=int, default=8, help="frames per clip (stage 1: 8)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--num-workers", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--file-steps", type=int, default=12, help="measured steps reading the files")
    ap.add_argument("--cache-steps", type=int, default=120, help="measured steps reading the cache")
    ap.add_argument("--clip-dir", default=str(HERE / "results" / "feature_cache_clips"))
    ap.add_argument("--cache-dir", default=None, help="where to build the cache (default: a temporary folder)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the results to this JSON file")
    ap.add_argument("--quick", action="store_true", help="8 clips of 2-4 s, few steps (a smoke run)")
    args = ap.parse_args(argv)
    if args.quick:
        args.num_clips, args.min_seconds, args.max_seconds = 8, 2.0, 4.0
        args.file_steps, args.cache_steps = 4, 40

    from videollm.feature_cache import build_cache, cache_size
    from videollm.registry import import_all
    from videollm.tasks import setup_task

    import_all()
    anno = make_clips(args)
    cfg = recipe(args, anno)
    torch.manual_seed(0)
    task = setup_task(cfg)
    raw = task.build_datasets(cfg)
    model = task.build_model(cfg)
    tmp = None
    if args.cache_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="feature_cache_bench_")
        cache = Path(tmp.name) / "cache"
    else:
        cache = Path(args.cache_dir)
    t0 = time.perf_counter()
    counts = build_cache(cfg, cache, shard_size=16, batch_size=args.batch_size, num_workers=args.num_workers,
                         model=model, datasets=raw, progress=False)
    build_s = time.perf_counter() - t0
    size = cache_size(cache)
    cached = task.build_datasets(recipe(args, anno, cache))

    files = train_rate(model, raw, args, args.file_steps)
    from_cache = train_rate(model, cached, args, args.cache_steps)
    ratio = from_cache["samples_per_s"] / files["samples_per_s"]
    n = counts["samples"]
    result = {
        "machine": f"{os.cpu_count()} CPU cores (shared), torch {torch.__version__}, {torch.get_num_threads()} threads",
        "clips": n, "clip": f"{args.width}x{args.height} H.264 {args.fps} fps gop {args.gop}, "
                            f"{args.min_seconds}-{args.max_seconds} s", "frames_per_clip": args.n_frms,
        "batch_size": args.batch_size, "num_workers": args.num_workers,
        "cache_build_s": build_s, "cache_build_clips_per_s": n / build_s,
        "cache_bytes_per_clip": size / max(1, n - counts["bad"]),
        "files_samples_per_s": files["samples_per_s"], "cache_samples_per_s": from_cache["samples_per_s"],
        "speedup": ratio,
    }
    print(f"machine: {result['machine']}")
    print(f"clips: {n} x {result['clip']}, {args.n_frms} frames each, tiny Video-LLaMA (32 px), batch "
          f"{args.batch_size}, {args.num_workers} loader workers")
    print(f"cache build: {build_s:.1f} s ({n / build_s:.2f} clips/s), {size / max(1, n):,.0f} bytes per clip "
          f"({size / 1e6:.2f} MB in all)")
    print(f"{'source':<8} {'samples':>8} {'seconds':>8} {'samples/s':>10}")
    for name, r in (("files", files), ("cache", from_cache)):
        print(f"{name:<8} {r['samples']:>8} {r['seconds']:>8.1f} {r['samples_per_s']:>10.1f}")
    print(f"speedup: {ratio:.1f}x (target >= 10x): {'OK' if ratio >= 10 else 'BELOW TARGET'}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
