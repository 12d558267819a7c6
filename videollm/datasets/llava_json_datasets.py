"""LLaVA-style JSON instruction data with images and videos (builder ``llava_json``).

The format of LLaVA-1.5 and Video-LLaVA (``llava_image_tune_.json``, ``videochatgpt_tune_.json``,
``nlp_tune.json``): a JSON list of entries ::

    {"id": "...", "image": "coco/train2017/000000033471.jpg",          # or a list of paths
     "video": "videochatgpt/v_k_ZXmr8pmrs.mp4",                        # or a list; either or none
     "conversations": [{"from": "human", "value": "<video>\\nWhat is the man doing?"},
                       {"from": "gpt", "value": "He is ..."}, ...]}

Each ``<image>`` / ``<video>`` in the conversation takes the next path of the entry's ``image``
/ ``video`` list, in the order the placeholders appear; an entry without either is text only.
Images are read at ``build_info.image_dir``, videos at ``build_info.video_dir`` (paths must stay
inside them unless ``allow_outside_root``).

Model-agnostic: the dataset decodes and emits the media and the conversation, nothing else (no
resizing, normalisation or tokenisation: that is the model's batch processor). Videos give
``n_frms`` frames picked by ``sampling`` (default ``linspace``: ``np.linspace(0, n - 1, n_frms)``)
at the source size.

Samples: ``{"media": [{"kind": "image"|"video", "frames": uint8 (T, H, W, 3)}], "conversations":
[{"from", "value"}], "path"}`` (images are one frame). Batches (``collater``): ``media``,
``conversations``, ``paths`` as lists, ``conv_type="multi"``, ``bad_samples``, ``num_samples``.
A bad entry or file becomes a counted, named bad sample.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from videollm.datasets.bad_samples import (
    path_list,
    DEFAULT_MAX_PIXELS,
    BadInput,
    check_conversations,
    empty_batch,
    guarded,
    load_video_sample,
    open_image,
    resolve_under,
    split_bad,
)
from videollm.datasets.base import BaseDatasetBuilder, BuildInfo, DatasetConfig
from videollm.datasets.instruct_datasets import read_json_list
from videollm.errors import ConfigError
from videollm.registry import registry

PLACEHOLDERS = re.compile(r"<image>|<video>")


class LlavaJsonDataset(Dataset):
    """Entries of a LLaVA-style JSON list -> media frames + conversations (see the module doc)."""

    def __init__(self, ann_path: "str | Sequence[str]", image_dir: str = "", video_dir: str = "", *, n_frms: int = 8,
                 sampling: str = "linspace", max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
                 allow_outside_root: bool = False, timeout: Optional[float] = 30.0) -> None:
        paths = [ann_path] if isinstance(ann_path, str) else list(ann_path)
        self.ann_path = ",".join(str(p) for p in paths)
        # entries of several files are concatenated (Video-LLaVA's stage 2: images + videos + text)
        self.annotation = [e for p in paths for e in read_json_list(str(p), "LLaVA JSON")]
        self.image_dir, self.video_dir = image_dir, video_dir
        self.n_frms, self.sampling = int(n_frms), sampling
        self.max_pixels, self.allow_outside_root, self.timeout = max_pixels, allow_outside_root, timeout

    def __len__(self) -> int:
        return len(self.annotation)

    def _video(self, path: str) -> torch.Tensor:
        from videollm.processors.video_loader import load_video

        def decode(p: str) -> torch.Tensor:
            return load_video(p, n_frms=self.n_frms, sampling=self.sampling, timeout=self.timeout,
                              max_pixels=self.max_pixels)

        frames = load_video_sample(path, decode, self.n_frms, self.max_pixels)  # (3, T, H, W) 0..255
        return frames.permute(1, 2, 3, 0).round().clamp_(0, 255).to(torch.uint8)

    def _image(self, path: str) -> torch.Tensor:
        img = open_image(path, self.max_pixels)
        return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.uint8).copy()).unsqueeze(0)

    def __getitem__(self, index: int) -> Any:
        entry = self.annotation[index]
        where = f"{self.ann_path}#{index}"

        def load() -> Dict[str, Any]:
            if not isinstance(entry, dict):
                raise BadInput("bad_annotation", f"entry is a {type(entry).__name__}, not a mapping")
            convs = check_conversations(entry.get("conversations"))
            queue = {"image": path_list(entry, "image"), "video": path_list(entry, "video")}
            roots = {"image": self.image_dir, "video": self.video_dir}
            media = []
            for turn in convs:
                for mark in PLACEHOLDERS.findall(str(turn["value"])):
                    kind = mark[1:-1]
                    if not queue[kind]:
                        raise BadInput("bad_annotation", f"more {mark} placeholders than '{kind}' paths")
                    path = resolve_under(roots[kind], queue[kind].pop(0), allow_outside=self.allow_outside_root)
                    frames = self._video(path) if kind == "video" else self._image(path)
                    media.append({"kind": kind, "frames": frames, "path": path})
            left = [k for k, v in queue.items() if v]
            if left:
                raise BadInput("bad_annotation", f"'{left[0]}' paths without a <{left[0]}> placeholder")
            return {"media": media, "conversations": convs, "path": media[0]["path"] if media else where}

        return guarded(where, load)

    def collater(self, samples: Sequence[Any]) -> Dict[str, Any]:
        good, bad = split_bad(samples)
        if not good:
            return empty_batch(bad)
        return {
            "media": [s["media"] for s in good],
            "conversations": [s["conversations"] for s in good],
            "paths": [s["path"] for s in good],
            "conv_type": "multi",
            "bad_samples": bad,
            "num_samples": len(good),
        }


@dataclass
class LlavaJsonBuildInfo(BuildInfo):
    anno_path: str = ""
    extra_anno_paths: List[str] = field(default_factory=list)  # more JSON files, concatenated
    image_dir: str = ""
    video_dir: str = ""
    n_frms: int = 8
    sampling: str = "linspace"
    timeout: Optional[float] = 30.0


@dataclass
class LlavaJsonConfig(DatasetConfig):
    data_type: str = "mixed"
    build_info: LlavaJsonBuildInfo = field(default_factory=LlavaJsonBuildInfo)


@registry.register_builder("llava_json")
class LlavaJsonBuilder(BaseDatasetBuilder):
    name = "llava_json"
    DATASET_CONFIG_DICT = {"default": "configs/datasets/llava_json/defaults.yaml"}
    config_schema = LlavaJsonConfig

    def build(self) -> Dict[str, Dataset]:
        info = self.config.build_info
        if not info.anno_path:
            raise ConfigError("datasets.llava_json.build_info.anno_path: empty; give the JSON list of entries")
        if info.n_frms < 1:
            raise ConfigError(f"datasets.llava_json.build_info.n_frms: {info.n_frms} must be >= 1")
        return {"train": LlavaJsonDataset([info.anno_path, *info.extra_anno_paths], info.image_dir, info.video_dir, n_frms=info.n_frms,
                                          sampling=info.sampling, max_pixels=self.config.max_pixels,
                                          allow_outside_root=self.config.allow_outside_root, timeout=info.timeout)}
