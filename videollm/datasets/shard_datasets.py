"""Datasets over webdataset tar shards: ``cc_sbu``, ``laion`` (image + caption, as registered
by the original) and ``video_shards`` (this project's: encoded videos or images + json captions or
instructions, written by :mod:`videollm.datasets.shards`).

``build_info.storage`` is a shard path, a brace pattern (``/data/cc-{00000..00099}.tar``), a glob,
or a list of those; every shard must exist when the dataset is built.

Iteration (differs from the original on purpose): the original streams ``ResampledShards``
(shards drawn with replacement, forever) through a 1000-sample shuffle buffer with unseeded
randomness. Here every pass ("epoch") reads each shard once, in an order shuffled from
``(seed, epoch)``, through a seeded shuffle buffer of ``shuffle_buffer`` samples (1000 as in the
original), so a pass is reproducible and the mixing loader can resume it. Shards are split over
distributed ranks and DataLoader workers (shard-level when there are at least as many shards as
readers, else sample-level: every reader scans all shards and keeps every n-th sample). Each
sample's random augmentation is seeded from ``(seed, epoch, reader, position)``.

Videos are decoded at load time from their bytes (written to a temporary file, in ``/dev/shm``
when it exists, because the decoders read files). Bad media, bad json and unreadable shards give
:class:`~videollm.datasets.bad_samples.BadSample` markers named ``shard.tar#key`` (or the shard),
like the file-based datasets.

``video_shards`` has ``format: caption`` (samples ``{"image", "text_input", "type"}``, the
caption is ``json["caption"]`` through the text processor) or ``format: instruct`` (videos with
``json["QA"]`` as VideoChat, images with ``json["conversations"]`` as LLaVA; same tokenisation as
the file-based instruction datasets).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import random
import tarfile
import tempfile
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union

from torch.utils.data import IterableDataset, get_worker_info

from videollm.datasets.bad_samples import (
    DEFAULT_MAX_PIXELS,
    BadInput,
    BadSample,
    check_conversations,
    check_qa,
    guarded,
    load_image_sample,
    load_video_sample,
    report_bad,
    text_field,
)
from videollm.datasets.base import (
    BaseDatasetBuilder,
    BuildInfo,
    DatasetConfig,
    collate_caption,
    derive_seed,
    dist_info,
    run_seeded,
)
from videollm.datasets.caption_datasets import required_frames
from videollm.errors import ConfigError, DataError
from videollm.registry import registry

logger = logging.getLogger(__name__)

FORMATS = ("caption", "instruct")
# Media entries a shard sample may hold (lower-case extensions); written by shards.py.
VIDEO_EXTS = ("mp4", "webm", "mkv", "avi", "mov")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def expand_shard_urls(storage: Union[str, Sequence[str]], key: str = "build_info.storage") -> List[str]:
    """Brace-expand and glob ``storage``; raise DataError naming missing shards."""
    from braceexpand import braceexpand

    patterns = [storage] if isinstance(storage, str) else list(storage)
    urls: List[str] = []
    missing: List[str] = []
    for pattern in patterns:
        for p in braceexpand(str(pattern)):
            if any(c in p for c in "*?["):
                found = sorted(glob.glob(p))
                if not found:
                    missing.append(p)
                urls.extend(found)
            elif os.path.isfile(p):
                urls.append(p)
            else:
                missing.append(p)
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise DataError(f"{key}: shard(s) not found: {', '.join(missing[:3])}{more}")
    if not urls:
        raise DataError(f"{key}: no shard matches {patterns}")
    return urls


def _split_key(name: str) -> "tuple[str, str]":
    """webdataset's rule: the key is the path up to the first dot of the file name."""
    directory, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return os.path.join(directory, stem), ext.lower()


def iter_tar_samples(shard: str) -> Iterator[Any]:
    """Samples ``{"__key__", "__url__", ext: bytes, ...}`` of one shard, in file order.

    A shard that cannot be read (truncated, not a tar) ends with a ``corrupt_shard`` marker; the
    complete samples before the damage are still yielded.
    """
    current: Optional[Dict[str, Any]] = None
    try:
        with open(shard, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tf:
            for member in tf:
                if not member.isfile():
                    continue
                key, ext = _split_key(member.name)
                if key.startswith("__") or not ext:
                    continue
                data = tf.extractfile(member).read()
                if current is None or current["__key__"] != key:
                    if current is not None:
                        yield current
                    current = {"__key__": key, "__url__": shard}
                current[ext] = data
    except (tarfile.TarError, OSError, EOFError) as exc:
        yield report_bad(shard, "corrupt_shard", f"unreadable tar: {type(exc).__name__}: {exc}")
        return
    if current is not None:
        yield current


class ShardDataset(IterableDataset):
    """Iterable over tar shards; yields processed samples or BadSample markers.

    Args:
        urls: shard files.
        vis_processor: image processor (called on a PIL image) or video processor (called on a
            path, with ``n_frms``); ``transform``/``n_frms``/``image_size`` are used for
            instruction videos.
        text_processor: applied to captions (None: raw).
        format: ``caption`` or ``instruct``.
        instruct: an :class:`~videollm.datasets.instruct_datasets.InstructTokenizing` for
            ``format="instruct"``.
        media: which media to accept: ``"image"``, ``"video"`` or ``"any"``.
    """

    def __init__(self, urls: Sequence[str], vis_processor: Any, text_processor: Any = None, *,
                 format: str = "caption", instruct: Any = None, media: str = "any", seed: int = 0,
                 shuffle: bool = True, shuffle_buffer: int = 1000, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
                 data_type: str = "video") -> None:
        super().__init__()
        if format not in FORMATS:
            raise ConfigError(f"format '{format}': unknown; choose one of {FORMATS}")
        if format == "instruct" and instruct is None:
            raise ConfigError("format 'instruct' needs the instruction tokenizer settings")
        self.urls = list(urls)
        self.vis_processor = vis_processor
        self.text_processor = text_processor
        self.format = format
        self.instruct = instruct
        if instruct is not None:
            self.model_facts = instruct.model_facts
        self.media = media
        self.seed = seed
        self.shuffle = shuffle
        self.shuffle_buffer = max(1, shuffle_buffer)
        self.max_pixels = max_pixels
        self.data_type = data_type
        self.epoch = 0
        self.n_frms = required_frames(vis_processor)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    # ------------------------------------------------------------------ iteration
    def _reader(self) -> "tuple[int, int]":
        rank, world = dist_info()
        info = get_worker_info()
        workers, wid = (info.num_workers, info.id) if info is not None else (1, 0)
        return rank * workers + wid, world * workers

    def _raw_stream(self, reader: int, readers: int) -> Iterator[Any]:
        shards = list(self.urls)
        if self.shuffle:
            random.Random(derive_seed(self.seed, self.epoch)).shuffle(shards)
        if len(shards) >= readers:
            for shard in shards[reader::readers]:
                yield from iter_tar_samples(shard)
            return
        n = 0
        for shard in shards:
            for raw in iter_tar_samples(shard):
                if isinstance(raw, BadSample):
                    if reader == 0:  # report a bad shard once, not once per reader
                        yield raw
                    continue
                if n % readers == reader:
                    yield raw
                n += 1

    def _shuffled(self, stream: Iterator[Any], rng: random.Random) -> Iterator[Any]:
        if not self.shuffle or self.shuffle_buffer <= 1:
            yield from stream
            return
        buf: List[Any] = []
        for item in stream:
            if len(buf) < self.shuffle_buffer:
                buf.append(item)
                continue
            j = rng.randrange(len(buf))
            buf[j], item = item, buf[j]
            yield item
        rng.shuffle(buf)
        yield from buf

    def __iter__(self) -> Iterator[Any]:
        reader, readers = self._reader()
        rng = random.Random(derive_seed(self.seed, self.epoch, reader, 1))
        for pos, raw in enumerate(self._shuffled(self._raw_stream(reader, readers), rng)):
            if isinstance(raw, BadSample):
                yield raw
                continue
            name = f"{raw['__url__']}#{raw['__key__']}"
            yield run_seeded(derive_seed(self.seed, self.epoch, reader, pos, 2),
                             lambda: guarded(name, lambda: self.decode(raw, name)))

    # ------------------------------------------------------------------ decoding
    def decode(self, raw: Dict[str, Any], name: str) -> Dict[str, Any]:
        """One raw tar sample -> a model sample; raises BadInput (turned into a marker)."""
        video_ext = next((e for e in VIDEO_EXTS if e in raw), None)
        image_ext = next((e for e in IMAGE_EXTS if e in raw), None)
        if self.media == "image":
            video_ext = None
        elif self.media == "video":
            image_ext = None
        if video_ext is None and image_ext is None:
            raise BadInput("bad_annotation", f"no {'' if self.media == 'any' else self.media + ' '}media file in the "
                                             f"sample (has {sorted(k for k in raw if not k.startswith('__'))})")
        meta = self._meta(raw)
        if video_ext is not None:
            return self._video_sample(raw[video_ext], video_ext, meta)
        return self._image_sample(raw[image_ext], meta)

    @staticmethod
    def _meta(raw: Dict[str, Any]) -> Dict[str, Any]:
        if "json" in raw:
            try:
                meta = json.loads(raw["json"].decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as exc:
                raise BadInput("bad_annotation", f"invalid json: {exc}") from None
            if not isinstance(meta, dict):
                raise BadInput("bad_annotation", "the json is not an object")
            return meta
        if "txt" in raw:
            return {"caption": raw["txt"].decode("utf-8", errors="replace")}
        raise BadInput("bad_annotation", "no json or txt entry")

    def _caption(self, meta: Dict[str, Any]) -> str:
        caption = text_field(meta, "caption")
        return self.text_processor(caption) if self.text_processor is not None else caption

    def _image_sample(self, data: bytes, meta: Dict[str, Any]) -> Dict[str, Any]:
        if self.format == "caption":
            caption = self._caption(meta)
            return {"image": load_image_sample(data, self.vis_processor, self.max_pixels), "text_input": caption,
                    "type": "image"}

        convs = check_conversations(meta.get("conversations"))
        out = self.instruct.conversation_sample(convs)
        out["image"] = load_image_sample(data, self.vis_processor, self.max_pixels)
        return out

    def _video_sample(self, data: bytes, ext: str, meta: Dict[str, Any]) -> Dict[str, Any]:
        tmp_dir = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
        with tempfile.NamedTemporaryFile(suffix="." + ext, dir=tmp_dir) as tmp:
            tmp.write(data)
            tmp.flush()
            if self.format == "caption":
                caption = self._caption(meta)
                video = load_video_sample(tmp.name, self.vis_processor, self.n_frms, self.max_pixels)
                return {"image": video, "text_input": caption, "type": "video"}
            return self._video_instruct(tmp.name, meta)

    def _video_instruct(self, path: str, meta: Dict[str, Any]) -> Dict[str, Any]:
        from videollm.conversation import videochat_turns
        from videollm.datasets.instruct_datasets import instruct_frames, load_instruct_video

        qa = check_qa(meta.get("QA"))
        n = instruct_frames(self.vis_processor)
        frames, msg = load_video_sample(path, lambda p: load_instruct_video(p, self.vis_processor), n, self.max_pixels)
        if "cn" in self.data_type:
            msg = ""
        out = self.instruct.conversation_sample(videochat_turns(qa), msg)
        out["image"] = self.vis_processor.transform(frames)
        return out

    def collater(self, samples: Sequence[Any]) -> Dict[str, Any]:
        if self.format == "instruct":
            return self.instruct.collater(samples)
        return collate_caption(samples)


# ----------------------------------------------------------------------------------------
# Builders
# ----------------------------------------------------------------------------------------


@dataclass
class ShardBuildInfo(BuildInfo):
    storage: Union[str, List[str]] = ""


@dataclass
class ImageShardConfig(DatasetConfig):
    data_type: str = "images"
    shuffle_buffer: int = 1000
    seed: int = 0
    build_info: ShardBuildInfo = field(default_factory=ShardBuildInfo)


class _ImageShardBuilder(BaseDatasetBuilder):
    config_schema = ImageShardConfig

    def build(self) -> Dict[str, Any]:
        c = self.config
        urls = expand_shard_urls(self.require_build_info("storage"), f"datasets.{self.name}.build_info.storage")
        return {"train": ShardDataset(urls, self.require_vis_processor("train"), self.text_processors.get("train"),
                                      format="caption", media="image", seed=c.seed, shuffle_buffer=c.shuffle_buffer,
                                      max_pixels=c.max_pixels, data_type=c.data_type)}


@registry.register_builder("cc_sbu")
class CCSBUBuilder(_ImageShardBuilder):
    name = "cc_sbu"
    DATASET_CONFIG_DICT = {"default": "configs/datasets/cc_sbu/defaults.yaml"}


@registry.register_builder("laion")
class LaionBuilder(_ImageShardBuilder):
    name = "laion"
    DATASET_CONFIG_DICT = {"default": "configs/datasets/laion/defaults.yaml"}


@dataclass
class VideoShardConfig(DatasetConfig):
    data_type: str = "video"
    format: str = "caption"
    shuffle_buffer: int = 1000
    seed: int = 0
    num_video_query_token: int = 32
    tokenizer_name: str = "tiny"
    model_type: str = "vicuna"
    fix_label_mask: bool = False
    build_info: ShardBuildInfo = field(default_factory=ShardBuildInfo)


@registry.register_builder("video_shards")
class VideoShardBuilder(BaseDatasetBuilder):
    name = "video_shards"
    DATASET_CONFIG_DICT = {"default": "configs/datasets/video_shards/defaults.yaml"}
    config_schema = VideoShardConfig

    def build(self) -> Dict[str, Any]:
        from videollm.datasets.instruct_datasets import InstructTokenizing, check_model_type

        c = self.config
        if c.format not in FORMATS:
            raise ConfigError(f"datasets.{self.name}.format: '{c.format}' is unknown; choose one of {FORMATS}")
        instruct = None
        if c.format == "instruct":
            check_model_type(self.name, c.model_type)
            instruct = InstructTokenizing(c.tokenizer_name, c.num_video_query_token, c.model_type, c.fix_label_mask)
        urls = expand_shard_urls(self.require_build_info("storage"), f"datasets.{self.name}.build_info.storage")
        return {"train": ShardDataset(urls, self.require_vis_processor("train"), self.text_processors.get("train"),
                                      format=c.format, instruct=instruct, seed=c.seed, shuffle_buffer=c.shuffle_buffer,
                                      max_pixels=c.max_pixels, data_type=c.data_type)}
