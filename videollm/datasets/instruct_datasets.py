"""Instruction datasets: LLaVA-Instruct-150K (images) and VideoChat-11K (videos).

* ``llava_instruct``: ``build_info.anno_dir`` is the json file (a list of ``{"id", "image",
  "conversations": [{"from", "value"}]}``); image path = ``videos_dir/image_prefix + image``
  (``image_prefix``: default ``"COCO_train2014_"``, the original's hard-coded prefix; ``""`` for
  files named as in the annotation);
  every ``<image>`` becomes ``<Image>`` + N x ``<ImageHere>`` + ``</Image>``.
* ``webvid_instruct`` (and ``webvid_instruct_zh``, the same class): ``anno_dir`` is the json
  file (a list of ``{"video": relative path, "QA": [{"q", "a"}, ...]}``); video at
  ``videos_dir/video``; ``n_frms`` frames sampled ``uniform`` with the timestamp message, then the
  **train** transform of the video processor (the original builds ``AlproVideoTrainProcessor(224,
  8).transform`` and ignores the config; here the transform, ``n_frms`` and ``image_size`` come
  from ``vis_processor.train``, whose default YAML is exactly that processor); the first question
  is prefixed with ``<Video>`` + N x ``<ImageHere>`` + ``</Video> `` + msg, and msg is dropped when
  ``'cn' in data_type``.

The datasets do not tokenise: they emit the media and the conversation, the medium marked by
``<image>`` (LLaVA) or ``<video>`` (VideoChat: before the first question, with the frame-time
sentence in ``media_msg``), and the model's own processor (``model.prepare_batch``, applied by
the runner to every batch) turns them into ids and labels with the model's prompt rules; for
Video-LLaMA that is :class:`videollm.models.video_llama.VideoLLaMAProcessor`, which reproduces
the original's tokenisation exactly (a sample without exactly N consecutive ``<ImageHere>`` ids
is a ``bad_annotation`` there). The model facts the original's YAML repeats
(``num_video_query_token``, ``tokenizer_name``, ``model_type``) stay accepted and are checked
against the model by the runner (``model_facts``); ``fix_label_mask`` asks the processor for the
corrected mask.

Samples: ``{"image": (3, H, W) | (3, T, H, W), "conversations": [{"from", "value"}], "media_msg",
"path"}``; batches from ``collater``: ``images``, ``conversations``, ``media_msgs``,
``fix_label_mask``, ``paths``, ``conv_type="multi"``, ``bad_samples``, ``num_samples``.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch.utils.data import Dataset

from videollm.conversation import videochat_turns
from videollm.datasets.bad_samples import (
    DEFAULT_MAX_PIXELS,
    BadInput,
    check_conversations,
    check_qa,
    empty_batch,
    field_of,
    guarded,
    load_image_sample,
    load_video_sample,
    resolve_under,
    split_bad,
)
from videollm.datasets.base import BaseDatasetBuilder, BuildInfo, DatasetConfig
from videollm.errors import ConfigError, DataError, PromptError
from videollm.registry import registry

logger = logging.getLogger(__name__)

MODEL_TYPES = ("vicuna", "llama_v2")


def read_json_list(path: str, what: str) -> List[Any]:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{path}: {what} annotation file not found (build_info.anno_dir)")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise DataError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of samples, got {type(data).__name__}")
    return data


class InstructTokenizing:
    """What the instruction datasets share: the model facts their YAML declares (checked against
    the model by the runner) and the collation of conversation samples (tokenised by the model)."""

    def __init__(self, tokenizer_name: str, num_video_query_token: int, model_type: str,
                 fix_label_mask: bool) -> None:
        if model_type not in MODEL_TYPES:
            raise ConfigError(f"model_type '{model_type}': unknown; choose one of {MODEL_TYPES}")
        self.num_video_query_token = num_video_query_token
        self.model_type = model_type
        self.fix_label_mask = fix_label_mask
        self.model_facts = {"num_video_query_token": num_video_query_token, "model_type": model_type,
                            "tokenizer_name": tokenizer_name}

    @staticmethod
    def conversation_sample(turns: List[Dict[str, str]], msg: str = "") -> Dict[str, Any]:
        return {"conversations": turns, "media_msg": msg}

    def collater(self, samples: Sequence[Any]) -> Dict[str, Any]:
        return collate_conversations(samples, self.fix_label_mask)


def collate_conversations(samples: Sequence[Any], fix_label_mask: bool = False) -> Dict[str, Any]:
    """Conversation samples -> one batch (media stacked; conversations for the model to tokenise)."""
    good, bad = split_bad(samples)
    if not good:
        return empty_batch(bad)
    images = [s["image"] for s in good]
    if not all(x.shape == images[0].shape for x in images):
        raise PromptError("instruction batch mixes visual inputs of different shapes; batch them apart")
    return {
        "images": torch.stack(images),
        "conversations": [s["conversations"] for s in good],
        "media_msgs": [s.get("media_msg", "") for s in good],
        "fix_label_mask": [fix_label_mask] * len(good),
        "paths": [s.get("path", "") for s in good],
        "conv_type": "multi",
        "bad_samples": bad,
        "num_samples": len(good),
    }


class LlavaInstructDataset(InstructTokenizing, Dataset):
    """LLaVA-Instruct conversations over COCO train2014 images."""

    def __init__(self, vis_processor: Any, vis_root: str, ann_path: str, num_video_query_token: int = 32,
                 tokenizer_name: str = "tiny", model_type: str = "vicuna", fix_label_mask: bool = False,
                 max_pixels: Optional[int] = DEFAULT_MAX_PIXELS, allow_outside_root: bool = False,
                 image_prefix: str = "COCO_train2014_") -> None:
        super().__init__(tokenizer_name, num_video_query_token, model_type, fix_label_mask)
        self.vis_processor = vis_processor
        self.image_prefix = image_prefix
        self.vis_root = vis_root
        self.ann_path = str(ann_path)
        self.annotation = read_json_list(ann_path, "LLaVA-Instruct")
        self.max_pixels = max_pixels
        self.allow_outside_root = allow_outside_root

    def __len__(self) -> int:
        return len(self.annotation)

    def image_path(self, sample: Dict[str, Any]) -> str:
        return resolve_under(self.vis_root, self.image_prefix + str(field_of(sample, "image", str)),
                             allow_outside=self.allow_outside_root)

    def __getitem__(self, index: int) -> Any:
        sample = self.annotation[index]
        try:
            path = self.image_path(sample)
        except BadInput:
            path = f"{self.ann_path}#{index}"

        def load() -> Dict[str, Any]:
            self.image_path(sample)  # re-raise bad_annotation / outside_root
            convs = check_conversations(field_of(sample, "conversations", list))
            out = self.conversation_sample(convs)
            out["path"] = path
            out["image"] = load_image_sample(path, self.vis_processor, self.max_pixels)
            return out

        return guarded(path, load)


def instruct_frames(vis_processor: Any) -> int:
    """Frames per instruction video: the processor's ``n_frms``, or the original's fixed 8 when
    the processor takes "all frames" (``n_frms`` unset = sys.maxsize)."""
    n = int(getattr(vis_processor, "n_frms", 8) or 8)
    return 8 if n >= sys.maxsize else n


def load_instruct_video(path: str, vis_processor: Any):
    """``(frames (3, T, s, s) 0..255, msg)``: the instruction data's uniform sampling with the
    timestamp message, at the processor's ``n_frms``/``image_size``, backend and timeout."""
    from videollm.processors.video_loader import DEFAULT_TIMEOUT_S, load_video

    size = int(getattr(vis_processor, "image_size", 224))
    return load_video(path, n_frms=instruct_frames(vis_processor), height=size, width=size,
                      sampling="uniform", return_msg=True, backend=getattr(vis_processor, "backend", "auto"),
                      timeout=getattr(vis_processor, "timeout", DEFAULT_TIMEOUT_S))


class VideoInstructDataset(InstructTokenizing, Dataset):
    """VideoChat-style video instructions (``{"video", "QA"}`` entries)."""

    def __init__(self, vis_processor: Any, vis_root: str, ann_path: str, num_video_query_token: int = 32,
                 tokenizer_name: str = "tiny", data_type: str = "video", model_type: str = "vicuna",
                 fix_label_mask: bool = False, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
                 allow_outside_root: bool = False) -> None:
        """``vis_processor``: a video processor; its ``transform``, ``n_frms``, ``image_size`` and
        (when present) ``backend``/``timeout`` are used, its own frame sampling is not."""
        super().__init__(tokenizer_name, num_video_query_token, model_type, fix_label_mask)
        self.vis_processor = vis_processor
        self.vis_root = vis_root
        self.ann_path = str(ann_path)
        self.annotation = read_json_list(ann_path, "VideoChat")
        self.allow_outside_root = allow_outside_root
        self.n_frms = instruct_frames(vis_processor)
        self.image_size = int(getattr(vis_processor, "image_size", 224))
        self.data_type = data_type
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.annotation)

    def _decode(self, path: str):
        return load_instruct_video(path, self.vis_processor)

    def __getitem__(self, index: int) -> Any:
        sample = self.annotation[index]

        def video_path() -> str:
            return resolve_under(self.vis_root, field_of(sample, "video", str), allow_outside=self.allow_outside_root)

        try:
            path = video_path()
        except BadInput:
            path = f"{self.ann_path}#{index}"

        def load() -> Dict[str, Any]:
            video_path()  # re-raise bad_annotation / outside_root
            qa = check_qa(field_of(sample, "QA", list))
            frames, msg = load_video_sample(path, self._decode, self.n_frms, self.max_pixels)
            if "cn" in self.data_type:
                msg = ""
            out = self.conversation_sample(videochat_turns(qa), msg)
            out["path"] = path
            out["image"] = self.vis_processor.transform(frames)
            return out

        return guarded(path, load)


# ----------------------------------------------------------------------------------------
# Builders
# ----------------------------------------------------------------------------------------


@dataclass
class InstructBuildInfo(BuildInfo):
    anno_dir: str = ""
    videos_dir: str = ""


@dataclass
class InstructConfig(DatasetConfig):
    data_type: str = "video"
    num_video_query_token: int = 32
    tokenizer_name: str = "tiny"
    model_type: str = "vicuna"
    fix_label_mask: bool = False
    image_prefix: str = "COCO_train2014_"  # llava_instruct: prepended to every image name (the original's)
    build_info: InstructBuildInfo = field(default_factory=InstructBuildInfo)


def check_model_type(name: str, model_type: str) -> None:
    if model_type not in MODEL_TYPES:
        raise ConfigError(f"datasets.{name}.model_type: '{model_type}' is unknown; choose one of {MODEL_TYPES}")


@registry.register_builder("llava_instruct")
class LlavaInstructBuilder(BaseDatasetBuilder):
    name = "llava_instruct"
    DATASET_CONFIG_DICT = {"default": "configs/datasets/instruct/llava_instruct.yaml"}
    config_schema = InstructConfig

    def build(self) -> Dict[str, Dataset]:
        c = self.config
        check_model_type(self.name, c.model_type)
        return {"train": LlavaInstructDataset(
            self.require_vis_processor("train"), self.require_build_info("videos_dir"),
            self.require_build_info("anno_dir"), c.num_video_query_token, c.tokenizer_name, c.model_type,
            c.fix_label_mask, c.max_pixels, c.allow_outside_root, image_prefix=c.image_prefix)}


@registry.register_builder("webvid_instruct")
class WebvidInstructBuilder(BaseDatasetBuilder):
    name = "webvid_instruct"
    DATASET_CONFIG_DICT = {"default": "configs/datasets/instruct/webvid_instruct.yaml"}
    config_schema = InstructConfig

    def build(self) -> Dict[str, Dataset]:
        c = self.config
        check_model_type(self.name, c.model_type)
        proc = self.require_vis_processor("train")
        if getattr(proc, "transform", None) is None or getattr(proc, "n_frms", None) is None:
            raise ConfigError(
                f"datasets.{self.name}.vis_processor.train: '{c.vis_processor['train'].get('name')}' is not a "
                "video processor with .transform and n_frms; use alpro_video_train"
            )
        return {"train": VideoInstructDataset(
            proc, self.require_build_info("videos_dir"), self.require_build_info("anno_dir"),
            num_video_query_token=c.num_video_query_token, tokenizer_name=c.tokenizer_name,
            data_type=c.data_type, model_type=c.model_type, fix_label_mask=c.fix_label_mask,
            max_pixels=c.max_pixels, allow_outside_root=c.allow_outside_root)}


@registry.register_builder("webvid_instruct_zh")
class WebvidInstructZhBuilder(WebvidInstructBuilder):
    """The original registers the same dataset class under this name for Chinese data."""

    name = "webvid_instruct_zh"
    DATASET_CONFIG_DICT = {"default": "configs/datasets/instruct/webvid_instruct_zh.yaml"}
