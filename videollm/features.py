"""Feature extraction for models that train on precomputed features (``python -m videollm.features``).

Subcommands (argparse sub-parsers; add one with :func:`add_subcommand`):

``gebc-qformer``: the BLIP-2 Q-Former tokens LLMVA-GEBC trains on, as the original's
``feature_extraction.py`` (``train_configs/blip2_feature_extract.yaml``): every video of
``--videos`` (a folder; files directly inside it) is decoded to ``--n-frms`` uniformly sampled
frames resized straight to ``--image-size`` square (no aspect kept; the ``alpro_video_eval``
processing: uint8, OpenAI CLIP mean/std), each frame goes through EVA ViT-g, ``ln_vision`` and
the frozen BLIP-2 Q-Former (32 queries), and the last hidden state is saved::

    <out>/<video id>.npy     float32 (T, 32, 768)  T = min(n_frms, frames in the video)
    <out>/manifest.json      {"encoder", "n_frms", "image_size", "videos": {id: [T, Q, H]}, "failed": {id: why}}

The video id is the file name's first ``--id-chars`` characters (11, the YouTube id, as the
original's ``video_name[0:11]``; 0 = the whole stem), which is what the ``gebc`` dataset looks up
(``boundary_id[:11]``). Weights: ``--vit-ckpt eva_vit_g.pth`` and ``--q-former-model
blip2_pretrained_flant5xxl.pth`` (local files). ``--encoder-config`` takes the dimensions from a
model YAML's ``model:`` section (``vit``, ``qformer``, ``num_query_token``, ``image_size``;
e.g. ``videollm/configs/models/video_llama_tiny.yaml`` for the tiny random encoder of the tests,
seeded by ``--seed``). Videos that cannot be decoded are named in the log and the manifest and
skipped; the exit status is 1 when any failed.

``llama-vid``: LLaMA-VID's long-video feature files (``extract_video_features_subtitles.py``, with a
user-given ``.srt`` instead of Whisper): ``<out>/<stem>.pkl`` = ``{"feats": float16 (N, 257, 1408)
EVA ViT-g outputs at 1 fps, "inputs": "<image>" + that frame's subtitles, per frame}`` (see
:mod:`videollm.long_video`). ``--vision-tower eva_vit_g.pth``; ``--model-config`` takes
``image_size``/``vit`` from a ``llama_vid`` model YAML (the tiny one for tests).

``cache``: the frozen-encoder feature cache of a recipe (``--cfg-path train_configs/X.yaml --out
DIR``): the configured model's frozen front over every dataset of the recipe, in safetensors
shards with an index, resumable, sharded over torchrun ranks; see :mod:`videollm.feature_cache`.

The "other" features of LLMVA-GEBC (InternVideo, Omnivore, CLIP) come from their own
extractors; the ``gebc`` dataset reads them as ``<folder>/<video id>.pkl`` holding a NumPy array
(t, d).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from videollm.errors import CheckpointError, ConfigError, VideoLLMError

logger = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".flv", ".mpg", ".mpeg", ".ts")

_SUBCOMMANDS: Dict[str, Any] = {}


def add_subcommand(name: str, aliases: Sequence[str] = ()):
    """Decorator registering a subcommand: ``fn(parser)`` adds its arguments and sets
    ``parser.set_defaults(func=run)`` where ``run(args) -> exit status``."""

    def wrap(fn: Callable[[argparse.ArgumentParser], None]):
        _SUBCOMMANDS[name] = (fn, tuple(aliases))
        return fn

    return wrap


class BLIP2FrameEncoder(nn.Module):
    """EVA ViT-g + ``ln_vision`` + BLIP-2 Q-Former, with BLIP-2's key names (``visual_encoder``,
    ``ln_vision``, ``Qformer``, ``query_tokens``) so ``blip2_pretrained_flant5xxl.pth`` loads by name.

    ``forward(frames (N, 3, S, S)) -> (N, Q, H)`` (the Q-Former's last hidden state)."""

    def __init__(self, image_size: int = 224, num_query_token: int = 32, vit: Optional[Dict[str, Any]] = None,
                 qformer: Optional[Dict[str, Any]] = None) -> None:
        super().__init__()
        from videollm.models.eva_vit import FP32LayerNorm, create_eva_vit_g
        from videollm.models.qformer import build_qformer

        self.visual_encoder = create_eva_vit_g(img_size=image_size, drop_path_rate=0.0, use_checkpoint=False,
                                               precision="fp32", **(vit or {}))
        self.ln_vision = FP32LayerNorm(self.visual_encoder.num_features)
        self.Qformer, self.query_tokens = build_qformer(num_query_token, self.visual_encoder.num_features,
                                                        **(qformer or {}))
        self.image_size = image_size

    def load(self, vit_ckpt: str = "", q_former_model: str = "") -> None:
        from videollm.checkpoint import load_model_state
        from videollm.models.eva_vit import load_eva_vit_weights

        if vit_ckpt:
            result = load_eva_vit_weights(self.visual_encoder, vit_ckpt)
            if result.missing_keys:
                raise CheckpointError(f"{vit_ckpt}: missing {len(result.missing_keys)} ViT keys, e.g. {result.missing_keys[:3]}")
        if q_former_model:
            state = load_model_state(q_former_model)
            own = self.state_dict()
            prefixes = ("Qformer.", "query_tokens", "ln_vision.")
            wanted = {k: v for k, v in state.items() if k.startswith(prefixes) and k in own}
            for k, v in wanted.items():
                if tuple(v.shape) != tuple(own[k].shape):
                    raise CheckpointError(f"{q_former_model}: {k} has shape {tuple(v.shape)}, the encoder "
                                          f"expects {tuple(own[k].shape)}")
            missing = [k for k in own if k.startswith(prefixes) and k not in wanted]
            if missing:
                raise CheckpointError(f"{q_former_model}: missing {len(missing)} Q-Former keys, e.g. {missing[:3]}")
            self.load_state_dict(wanted, strict=False)

    @torch.no_grad()
    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        embeds = self.ln_vision(self.visual_encoder(frames))
        atts = torch.ones(embeds.shape[:-1], dtype=torch.long, device=embeds.device)
        query = self.query_tokens.expand(embeds.shape[0], -1, -1)
        return self.Qformer.bert(query_embeds=query, encoder_hidden_states=embeds, encoder_attention_mask=atts)


def encoder_from_config(path: Optional[str], image_size: Optional[int]) -> BLIP2FrameEncoder:
    """The full EVA ViT-g / BLIP-2 encoder, or the dimensions of a model YAML's ``model:`` section."""
    opts: Dict[str, Any] = {}
    if path:
        from omegaconf import OmegaConf

        if not os.path.isfile(path):
            raise ConfigError(f"--encoder-config: {path} not found")
        node = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
        node = node.get("model", node)
        opts = {"vit": node.get("vit") or {}, "qformer": node.get("qformer") or {},
                "num_query_token": int(node.get("num_query_token", 32)),
                "image_size": int(node.get("image_size", 224))}
    if image_size:
        opts["image_size"] = int(image_size)
    return BLIP2FrameEncoder(**opts)


def list_videos(folder: str) -> List[Path]:
    root = Path(folder)
    if not root.is_dir():
        raise ConfigError(f"--videos: {folder} is not a folder")
    return sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS)


def video_id(path: Path, id_chars: int) -> str:
    return path.name[:id_chars] if id_chars > 0 else path.stem


def extract_gebc_qformer(videos: Sequence[Path], out_dir: str, encoder: BLIP2FrameEncoder, *, n_frms: int = 12,
                         id_chars: int = 11, device: str = "cpu", timeout: float = 60.0,
                         skip_existing: bool = False) -> Dict[str, Any]:
    """Write ``<out_dir>/<id>.npy`` (T, Q, H) float32 for each video; returns the manifest."""
    from omegaconf import OmegaConf

    from videollm.processors.video_loader import load_video
    from videollm.registry import registry
    import videollm.processors  # noqa: F401  (registers alpro_video_eval)

    size = int(encoder.image_size)
    proc = registry.get_processor_class("alpro_video_eval").from_config(
        OmegaConf.create({"image_size": size, "n_frms": n_frms}))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    encoder.eval().to(device)
    manifest: Dict[str, Any] = {"encoder": "eva_vit_g + blip2 q-former", "n_frms": n_frms, "image_size": size,
                                "videos": {}, "failed": {}}
    seen: Dict[str, str] = {}
    try:
        from tqdm.auto import tqdm
        it = tqdm(videos, desc="gebc-qformer", unit="video")
    except ImportError:  # pragma: no cover
        it = videos
    for path in it:
        vid = video_id(path, id_chars)
        if vid in seen:
            manifest["failed"][str(path)] = f"video id {vid} also from {seen[vid]}; ids must be unique"
            logger.error("%s: video id %s already taken by %s; skipped", path, vid, seen[vid])
            continue
        seen[vid] = str(path)
        target = out / f"{vid}.npy"
        if skip_existing and target.is_file():
            manifest["videos"][vid] = list(np.load(target, mmap_mode="r").shape)
            continue
        try:
            frames = load_video(path, n_frms=n_frms, height=size, width=size, sampling="uniform", timeout=timeout)
        except VideoLLMError as exc:
            manifest["failed"][vid] = str(exc)
            logger.error("%s: %s; skipped", path, exc)
            continue
        clip = proc.transform(frames)  # (3, T, S, S)
        tokens = encoder(clip.permute(1, 0, 2, 3).to(device))  # (T, Q, H)
        arr = tokens.float().cpu().numpy().astype(np.float32)
        tmp = out / f".{vid}.npy.tmp"
        with open(tmp, "wb") as f:
            np.save(f, arr)
        os.replace(tmp, target)
        manifest["videos"][vid] = list(arr.shape)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


@add_subcommand("gebc-qformer", aliases=("gebc",))
def _gebc_qformer_parser(p: argparse.ArgumentParser) -> None:
    """BLIP-2 Q-Former tokens of videos for LLMVA-GEBC (<out>/<video id>.npy, (T, 32, 768))."""
    p.add_argument("--videos", required=True, help="folder of videos (files directly inside it)")
    p.add_argument("--out", required=True, help="output folder of <video id>.npy")
    p.add_argument("--n-frms", type=int, default=12, help="frames per video (the training folder of the original: 12)")
    p.add_argument("--image-size", type=int, default=None, help="frame size (default 224, or the encoder config's)")
    p.add_argument("--vit-ckpt", default="", help="eva_vit_g.pth")
    p.add_argument("--q-former-model", default="", help="blip2_pretrained_flant5xxl.pth")
    p.add_argument("--encoder-config", default=None, help="a model YAML giving vit/qformer dimensions (tiny encoders)")
    p.add_argument("--seed", type=int, default=0, help="seed of randomly initialised parts (no weights given)")
    p.add_argument("--id-chars", type=int, default=11, help="video id = first N characters of the file name (0: stem)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per video decode")
    p.add_argument("--skip-existing", action="store_true")
    p.set_defaults(func=_run_gebc_qformer)


def _run_gebc_qformer(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    encoder = encoder_from_config(args.encoder_config, args.image_size)
    if not args.vit_ckpt or not args.q_former_model:
        logger.warning("no --vit-ckpt/--q-former-model: the encoder's missing parts are RANDOM (seed %d); "
                       "fine for tests, not for real features", args.seed)
    encoder.load(args.vit_ckpt, args.q_former_model)
    videos = list_videos(args.videos)
    if not videos:
        raise ConfigError(f"--videos: no video files ({', '.join(VIDEO_EXTENSIONS)}) in {args.videos}")
    manifest = extract_gebc_qformer(videos, args.out, encoder, n_frms=args.n_frms, id_chars=args.id_chars,
                                    device=args.device, timeout=args.timeout, skip_existing=args.skip_existing)
    print(f"{len(manifest['videos'])} videos -> {args.out} ({len(manifest['failed'])} failed)")
    return 1 if manifest["failed"] else 0


@add_subcommand("llama-vid", aliases=("llamavid",))
def _llama_vid_parser(p: argparse.ArgumentParser) -> None:
    """LLaMA-VID long-video feature files (<out>/<stem>.pkl: EVA feats (N, 257, 1408) fp16 at 1 fps + subtitle text)."""
    p.add_argument("--video", required=True, help="a video file, or a folder of videos")
    p.add_argument("--out", required=True, help="output folder of <stem>.pkl")
    p.add_argument("--srt", default=None, help="subtitles of a single --video (default: <video stem>.srt next to it)")
    p.add_argument("--fps", type=float, default=1.0, help="frames per second sampled (step round(avg_fps / fps))")
    p.add_argument("--vision-tower", default="", help="eva_vit_g.pth (empty: RANDOM weights, for tests)")
    p.add_argument("--model-config", default=None, help="a llama_vid model YAML giving image_size and vit dimensions")
    p.add_argument("--image-size", type=int, default=None, help="frame size (default 224, or the config's)")
    p.add_argument("--batch", type=int, default=48, help="frames per EVA batch (the original's infer_batch)")
    p.add_argument("--seed", type=int, default=0, help="seed of a random EVA (no --vision-tower)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per video decode")
    p.set_defaults(func=_run_llama_vid)


def _run_llama_vid(args: argparse.Namespace) -> int:
    from omegaconf import OmegaConf

    from videollm.long_video import extract_feature_file
    from videollm.models.eva_vit import create_eva_vit_g, load_eva_vit_weights

    model_cfg = OmegaConf.to_container(OmegaConf.load(args.model_config))["model"] if args.model_config else {}
    size = int(args.image_size or model_cfg.get("image_size") or 224)
    torch.manual_seed(args.seed)
    vit = create_eva_vit_g(img_size=size, precision="fp32", **(model_cfg.get("vit") or {}))
    if args.vision_tower:
        load_eva_vit_weights(vit, args.vision_tower)
    else:
        logger.warning("no --vision-tower: EVA has RANDOM weights (seed %d); fine for tests, not for real features",
                       args.seed)
    vit.to(args.device).eval()
    videos = list_videos(args.video) if os.path.isdir(args.video) else [Path(args.video)]
    if not videos:
        raise ConfigError(f"--video: no video files ({', '.join(VIDEO_EXTENSIONS)}) in {args.video}")
    failed = 0
    for video in videos:
        srt = args.srt if args.srt and len(videos) == 1 else None
        if srt is None and video.with_suffix(".srt").is_file():
            srt = str(video.with_suffix(".srt"))
        try:
            info = extract_feature_file(str(video), os.path.join(args.out, video.stem + ".pkl"), vit, size, srt=srt,
                                        fps=args.fps, batch=args.batch, device=args.device, timeout=args.timeout)
        except VideoLLMError as exc:
            logger.error("%s: %s", video, exc)
            failed += 1
            continue
        print(f"{video} -> {info['path']}: {info['frames']} frames {info['shape']}, {info['subtitles']} subtitles")
    return 1 if failed else 0


@add_subcommand("cache")
def _cache_parser(p: argparse.ArgumentParser) -> None:
    """Frozen-encoder feature cache of a recipe's datasets (see videollm.feature_cache)."""
    from videollm.feature_cache import add_cache_arguments

    add_cache_arguments(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m videollm.features", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (fn, aliases) in _SUBCOMMANDS.items():
        fn(sub.add_parser(name, aliases=list(aliases), help=(fn.__doc__ or "").strip().split("\n")[0] or name))
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except VideoLLMError as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
