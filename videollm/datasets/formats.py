"""Common instruction-data formats for every model: ShareGPT / LLaMA-Factory, LLaVA JSON with
videos, VideoChat2-IT (builders ``sharegpt``, ``llava_video``, ``videochat2_it``).

Each format is a JSON list of records (``build_info.anno_path``), media paths relative to
``build_info.media_dir`` (``image_dir`` / ``video_dir`` override it per kind):

* ``sharegpt`` (LLaMA-Factory's ``formatting: sharegpt``)::

      {"messages": [{"role": "system", "content": "..."},           # optional
                    {"role": "user", "content": "<video>What happens?"},
                    {"role": "assistant", "content": "A cat jumps."}],
       "videos": ["clips/a.mp4"], "images": []}

  (LLaMA-Factory's other sharegpt spelling, ``"conversations": [{"from": "human"|"gpt",
  "value"}]`` with an optional ``"system"``, is read too.) The n-th ``<video>`` / ``<image>``
  tag of the conversation takes the n-th path of ``videos`` / ``images``.
* ``llava_video`` (LLaVA / Video-LLaVA JSON)::

      {"id": "v1", "video": "clips/a.mp4",                           # or "image"; a path or a list
       "conversations": [{"from": "human", "value": "<video>\\nWhat happens?"},
                         {"from": "gpt", "value": "A cat jumps."}]}

* ``videochat2_it`` (VideoChat2-IT, PLLaVA's training files)::

      {"video": "clips/a.mp4", "QA": [{"i": "instruction", "q": "question", "a": "answer"}],
       "start": 1.5, "end": 4.0}                                      # optional segment, seconds

  The first question gets the ``<video>`` (``<image>`` for an ``"image"`` record) marker, the
  first ``i`` becomes the sample's instruction; ``start``/``end`` select the segment sampled.

A record whose tags and media lists do not match, that names a missing file, a path outside
the root, or a medium that cannot be decoded is skipped: a counted, named bad sample
(:mod:`videollm.datasets.bad_samples`), as bad videos are elsewhere.

Frame sampling (``build_info``, per dataset): ``sampling`` (any of
:data:`videollm.processors.video_loader.SAMPLING_MODES`) with ``n_frms`` frames, or
``sampling: fps`` with ``fps`` frames per second capped at ``max_frames``; ``max_frame_pixels``
shrinks every frame (aspect kept) to at most that many pixels; ``image_size`` > 0 resizes
frames to a square at decode time. The clip is then given to the dataset's
``vis_processor.train`` (``.transform`` of a video processor such as ``alpro_video_train`` or
``pllava_video_train``; none: the frames stay 0..255 floats). Images are a one-frame clip through
the same transform.

What a sample looks like is ``media_form`` (how the model's batch processor takes media; the
dataset does not know the model):

* ``tensor`` (default): the project's conversation convention ``{"image": (3, H, W) | (3, T, H,
  W), "kind", "conversations": [{"from": "human"|"gpt", "value"}], "media_msg", "instruction",
  "path"}``: one medium per sample. Batches: ``images`` (stacked; ``media``, a list, when the
  shapes differ), ``media_kinds``, ``conversations``, ``media_msgs``, ``instructions``,
  ``paths``. For Video-LLaMA, PLLaVA and models like them.
* ``frames``: ``{"media": [{"kind", "frames": uint8 (T, H, W, 3), "path"}], "conversations",
  "path"}``: any number of media, unprocessed (the ``llava_json`` form, for Video-LLaVA).
* ``media``: ``{"media": Media | None, "conversations", "path"}`` with the processed tensor in a
  :class:`~videollm.models.base.Media` (the ``llama_vid_json`` form, for LLaMA-VID).

``video_marker`` renames ``<video>`` in the emitted text (LLaMA-VID's processor looks for
``<image>`` for every medium). See ``docs/bring_your_own_data.md``.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from videollm.datasets.bad_samples import (
    path_list,
    DEFAULT_MAX_PIXELS,
    BadInput,
    check_conversations,
    check_qa,
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

logger = logging.getLogger(__name__)

TAGS = re.compile(r"<image>|<video>")
MEDIA_FORMS = ("tensor", "frames", "media")
ROLES = {"user": "human", "human": "human", "assistant": "gpt", "gpt": "gpt", "system": "system",
         "observation": "human", "function": "gpt"}


@dataclass
class Record:
    """One record in the common shape: human/gpt turns, the media in tag order, extras."""

    conversations: List[Dict[str, str]]
    media: List[Tuple[str, str]]  # (kind, path relative to its root)
    instruction: str = ""
    clip: Optional[Tuple[float, float]] = None


# ------------------------------------------------------------------------------------ parsers


def match_tags(turns: Sequence[Dict[str, str]], videos: List[str], images: List[str]) -> List[Tuple[str, str]]:
    """The media in the order their tags appear; BadInput ``bad_annotation`` when the counts differ."""
    kinds = [m[1:-1] for t in turns for m in TAGS.findall(t["value"])]
    counts = {"video": kinds.count("video"), "image": kinds.count("image")}
    for kind, paths in (("video", videos), ("image", images)):
        if counts[kind] != len(paths):
            raise BadInput("bad_annotation", f"{counts[kind]} <{kind}> tag(s) but {len(paths)} {kind} path(s)")
    queues = {"video": list(videos), "image": list(images)}
    return [(k, queues[k].pop(0)) for k in kinds]


def parse_sharegpt(entry: Any) -> Record:
    if not isinstance(entry, dict):
        raise BadInput("bad_annotation", f"record is a {type(entry).__name__}, not a mapping")
    if "messages" in entry:
        msgs = entry["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise BadInput("bad_annotation", "'messages' must be a non-empty list of {role, content}")
        turns = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
                raise BadInput("bad_annotation", f"messages[{i}] must be {{role: user|assistant|system, content: str}}")
            turns.append({"from": ROLES[m["role"]], "value": m["content"]})
        system = entry.get("system", "")
    elif "conversations" in entry:
        turns = [{"from": ROLES.get(t["from"], t["from"]), "value": t["value"]}
                 for t in check_conversations(entry["conversations"])]
        system = entry.get("system", "")
    else:
        raise BadInput("bad_annotation", "record has neither 'messages' nor 'conversations'")
    if turns and turns[0]["from"] == "system":
        system, turns = turns[0]["value"], turns[1:]
    for i, t in enumerate(turns):
        want = "human" if i % 2 == 0 else "gpt"
        if t["from"] != want:
            raise BadInput("bad_annotation", f"turn {i} is from {t['from']!r}; turns must alternate user/assistant")
    if len(turns) < 2:
        raise BadInput("bad_annotation", "a record needs at least one user and one assistant turn")
    if not isinstance(system, str):
        raise BadInput("bad_annotation", "'system' must be a string")
    media = match_tags(turns, path_list(entry, "videos"), path_list(entry, "images"))
    return Record(turns, media, instruction=system)


def parse_llava(entry: Any) -> Record:
    if not isinstance(entry, dict):
        raise BadInput("bad_annotation", f"record is a {type(entry).__name__}, not a mapping")
    turns = check_conversations(entry.get("conversations"))
    return Record(list(turns), match_tags(turns, path_list(entry, "video"), path_list(entry, "image")))


def parse_videochat2(entry: Any) -> Record:
    from videollm.datasets.pllava_datasets import qa_turns

    if not isinstance(entry, dict):
        raise BadInput("bad_annotation", f"record is a {type(entry).__name__}, not a mapping")
    kind = "image" if "image" in entry and "video" not in entry else "video"
    path = entry.get(kind)
    if not isinstance(path, str) or not path:
        raise BadInput("bad_annotation", f"'{kind}' must be a path (the record has {sorted(entry)})")
    qa = check_qa(entry.get("QA"))
    clip = None
    if entry.get("start") is not None or entry.get("end") is not None:
        try:
            clip = (float(entry["start"]), float(entry["end"]))
        except (KeyError, TypeError, ValueError):
            raise BadInput("bad_annotation", f"start/end {entry.get('start')!r}/{entry.get('end')!r}: need two "
                                             "numbers of seconds") from None
        if not 0 <= clip[0] < clip[1]:
            raise BadInput("bad_annotation", f"segment start={clip[0]} end={clip[1]}: need 0 <= start < end")
    instruction = qa[0].get("i", "") or ""
    if not isinstance(instruction, str):
        raise BadInput("bad_annotation", "QA[0].i must be a string")
    return Record(qa_turns(qa, kind), [(kind, path)], instruction=instruction, clip=clip)


PARSERS: Dict[str, Callable[[Any], Record]] = {"sharegpt": parse_sharegpt, "llava_video": parse_llava,
                                               "videochat2_it": parse_videochat2}


# ------------------------------------------------------------------------------------ dataset
@dataclass
class FrameSampling:
    """How a dataset samples video frames (see the module docstring)."""

    n_frms: int = 8
    sampling: str = "uniform"
    fps: float = 1.0
    max_frames: Optional[int] = None
    max_frame_pixels: Optional[int] = None
    image_size: int = 0
    timeout: Optional[float] = 30.0
    backend: str = "auto"

    def check(self, where: str) -> None:
        from videollm.processors.video_loader import SAMPLING_MODES

        if self.sampling not in SAMPLING_MODES:
            raise ConfigError(f"{where}.sampling: {self.sampling!r}; use one of {SAMPLING_MODES}")
        if self.n_frms < 1:
            raise ConfigError(f"{where}.n_frms: {self.n_frms} must be >= 1")
        if self.sampling == "fps" and not self.fps > 0:
            raise ConfigError(f"{where}.fps: {self.fps} must be > 0")
        if self.max_frames is not None and self.max_frames < 1:
            raise ConfigError(f"{where}.max_frames: {self.max_frames} must be >= 1 or null")
        if self.max_frame_pixels is not None and self.max_frame_pixels < 1:
            raise ConfigError(f"{where}.max_frame_pixels: {self.max_frame_pixels} must be >= 1 or null")

    @property
    def required_frames(self) -> Optional[int]:
        """Frames a clip must give (None: any number, as ``fps`` sampling gives)."""
        return None if self.sampling == "fps" else self.n_frms


class FormatDataset(Dataset):
    """Records of one format -> samples in the configured ``media_form`` (see the module docstring)."""

    def __init__(self, fmt: str, ann_path: str, media_dir: str = "", *, image_dir: str = "", video_dir: str = "",
                 vis_processor: Any = None, frames: Optional[FrameSampling] = None, media_form: str = "tensor",
                 video_marker: str = "<video>", max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
                 allow_outside_root: bool = False) -> None:
        if fmt not in PARSERS:
            raise ConfigError(f"format {fmt!r}: unknown; use one of {sorted(PARSERS)}")
        if media_form not in MEDIA_FORMS:
            raise ConfigError(f"datasets.{fmt}.build_info.media_form: {media_form!r}; use one of {MEDIA_FORMS}")
        self.fmt, self.parse = fmt, PARSERS[fmt]
        self.ann_path = str(ann_path)
        self.annotation = read_json_list(ann_path, fmt)
        self.roots = {"image": image_dir or media_dir, "video": video_dir or media_dir}
        self.vis_processor = vis_processor
        self.frames = frames or FrameSampling()
        self.frames.check(f"datasets.{fmt}.build_info")
        self.media_form, self.video_marker = media_form, video_marker
        self.max_pixels, self.allow_outside_root = max_pixels, allow_outside_root

    def __len__(self) -> int:
        return len(self.annotation)

    # -- media
    def _transform(self, clip: torch.Tensor) -> torch.Tensor:
        transform = getattr(self.vis_processor, "transform", None)
        return transform(clip) if transform is not None else clip

    def load_video(self, path: str, clip: Optional[Tuple[float, float]] = None) -> Tuple[torch.Tensor, str]:
        """``(frames (3, T, H, W) float 0..255, frame-time sentence)`` with this dataset's sampling."""
        from videollm.processors.video_loader import cap_frame_pixels, load_video

        f = self.frames
        size = int(f.image_size) if f.image_size else -1

        def decode(p: str):
            return load_video(p, n_frms=f.n_frms, height=size, width=size, sampling=f.sampling, return_msg=True,
                              backend=f.backend, timeout=f.timeout, fps=f.fps, max_frames=f.max_frames,
                              max_pixels=self.max_pixels, clip=clip)

        video, msg = load_video_sample(path, decode, f.required_frames, self.max_pixels)
        return cap_frame_pixels(video, f.max_frame_pixels), msg

    def load_image(self, path: str) -> torch.Tensor:
        """``(3, 1, H, W)`` float 0..255 (a one-frame clip)."""
        from videollm.processors.video_loader import cap_frame_pixels

        img = open_image(path, self.max_pixels)
        if self.frames.image_size:
            img = img.resize((self.frames.image_size, self.frames.image_size))
        clip = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).unsqueeze(1).float()
        return cap_frame_pixels(clip, self.frames.max_frame_pixels)

    def _path(self, kind: str, rel: str) -> str:
        path = resolve_under(self.roots[kind], rel, allow_outside=self.allow_outside_root)
        if not os.path.exists(path):
            raise BadInput("missing", f"{kind} file {path} (named by the record) does not exist")
        return path

    # -- samples
    def __getitem__(self, index: int) -> Any:
        entry = self.annotation[index]
        where = f"{self.ann_path}#{index}"

        def load() -> Dict[str, Any]:
            rec = self.parse(entry)
            turns = rec.conversations
            if self.video_marker != "<video>":
                turns = [{"from": t["from"], "value": t["value"].replace("<video>", self.video_marker)} for t in turns]
            paths = [(kind, self._path(kind, rel)) for kind, rel in rec.media]
            if self.media_form == "frames":
                media = []
                for kind, path in paths:
                    clip = self.load_video(path, rec.clip)[0] if kind == "video" else self.load_image(path)
                    frames = clip.permute(1, 2, 3, 0).round().clamp_(0, 255).to(torch.uint8)  # (T, H, W, 3)
                    media.append({"kind": kind, "frames": frames, "path": path})
                return {"media": media, "conversations": turns, "instruction": rec.instruction,
                        "path": paths[0][1] if paths else where}
            if len(paths) != 1:
                raise BadInput("bad_annotation", f"{len(paths)} media in the record; media_form "
                                                 f"{self.media_form!r} takes exactly one (use media_form: frames)")
            kind, path = paths[0]
            if kind == "video":
                clip, msg = self.load_video(path, rec.clip)
                data = self._transform(clip)
            else:
                clip, msg = self.load_image(path), ""
                data = self._transform(clip)[:, 0]
            if self.media_form == "media":
                from videollm.models.base import Media

                return {"media": Media(kind, data, {"path": path, "msg": msg}), "conversations": turns,
                        "instruction": rec.instruction, "path": path}
            return {"image": data, "kind": kind, "conversations": turns, "media_msg": msg,
                    "instruction": rec.instruction, "path": path}

        return guarded(where, load)

    def collater(self, samples: Sequence[Any]) -> Dict[str, Any]:
        good, bad = split_bad(samples)
        if not good:
            return empty_batch(bad)
        out: Dict[str, Any] = {
            "conversations": [s["conversations"] for s in good],
            "instructions": [s.get("instruction", "") for s in good],
            "paths": [s["path"] for s in good],
            "conv_type": "multi",
            "bad_samples": bad,
            "num_samples": len(good),
        }
        if self.media_form != "tensor":
            out["media"] = [s["media"] for s in good]
            return out
        media = [s["image"] for s in good]
        if all(m.shape == media[0].shape for m in media):
            out["images"] = torch.stack(media)
        else:
            out["media"] = media
        out["media_kinds"] = [s["kind"] for s in good]
        out["media_msgs"] = [s.get("media_msg", "") for s in good]
        return out


# ------------------------------------------------------------------------------------ builders
@dataclass
class FormatBuildInfo(BuildInfo):
    anno_path: str = ""
    media_dir: str = ""
    image_dir: str = ""
    video_dir: str = ""
    media_form: str = "tensor"
    video_marker: str = "<video>"
    n_frms: int = 8
    sampling: str = "uniform"
    fps: float = 1.0
    max_frames: Optional[int] = None
    max_frame_pixels: Optional[int] = None
    image_size: int = 0
    timeout: Optional[float] = 30.0
    backend: str = "auto"


@dataclass
class FormatConfig(DatasetConfig):
    data_type: str = "video"
    build_info: FormatBuildInfo = field(default_factory=FormatBuildInfo)


class FormatBuilder(BaseDatasetBuilder):
    """One registered builder per format; ``vis_processor.train`` is optional."""

    fmt = ""
    config_schema = FormatConfig

    def build(self) -> Dict[str, Dataset]:
        info = self.config.build_info
        if not info.anno_path:
            raise ConfigError(f"datasets.{self.name}.build_info.anno_path: empty; give the JSON list of records")
        proc = None
        vp = self.config.vis_processor or {}
        if vp.get("train"):
            proc = self.require_vis_processor("train")
        frames = FrameSampling(n_frms=info.n_frms, sampling=info.sampling, fps=info.fps, max_frames=info.max_frames,
                               max_frame_pixels=info.max_frame_pixels, image_size=info.image_size,
                               timeout=info.timeout, backend=info.backend)
        return {"train": FormatDataset(self.fmt, info.anno_path, info.media_dir, image_dir=info.image_dir,
                                       video_dir=info.video_dir, vis_processor=proc, frames=frames,
                                       media_form=info.media_form, video_marker=info.video_marker,
                                       max_pixels=self.config.max_pixels,
                                       allow_outside_root=self.config.allow_outside_root)}


@registry.register_builder("sharegpt")
class ShareGPTBuilder(FormatBuilder):
    name = fmt = "sharegpt"
    DATASET_CONFIG_DICT = {"default": "configs/datasets/formats/sharegpt.yaml"}


@registry.register_builder("llava_video")
class LlavaVideoBuilder(FormatBuilder):
    name = fmt = "llava_video"
    DATASET_CONFIG_DICT = {"default": "configs/datasets/formats/llava_video.yaml"}


@registry.register_builder("videochat2_it")
class VideoChat2ITBuilder(FormatBuilder):
    name = fmt = "videochat2_it"
    DATASET_CONFIG_DICT = {"default": "configs/datasets/formats/videochat2_it.yaml"}
