"""Caption datasets: WebVid (video) and cc_sbu_align (image), in the original's file layouts.

* ``webvid``: every ``*.csv`` in ``build_info.anno_dir`` (columns ``videoid``, ``name`` = the
  caption, ``page_dir``; read as strings, so page dirs like ``000`` keep their zeros), video at
  ``videos_dir/page_dir/videoid.mp4``, caption = ``text_processor(name.strip())``
  (``blip_caption``). An optional ``build_info.val_anno_dir`` adds a ``val`` split built with the
  eval processors.
* ``cc_sbu_align``: ``build_info.storage`` holds ``filter_cap.json`` (``{"annotations":
  [{"image_id", "caption"}]}``) and ``image/<image_id>.jpg``; the caption is used raw (the
  original applies no text processor here).

Samples: ``{"image": (3, T, H, W) | (3, H, W) float, "text_input": str, "type": "video"|"image"}``.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from torch.utils.data import Dataset

from videollm.datasets.bad_samples import (
    DEFAULT_MAX_PIXELS,
    BadInput,
    guarded,
    load_image_sample,
    load_video_sample,
)
from videollm.datasets.base import BaseDatasetBuilder, BuildInfo, CaptionDatasetMixin, DatasetConfig
from videollm.errors import DataError
from videollm.registry import registry

logger = logging.getLogger(__name__)

WEBVID_COLUMNS = ("videoid", "name", "page_dir")


def required_frames(vis_processor: Any) -> Optional[int]:
    """The processor's ``n_frms`` (None when it takes every frame, i.e. ``n_frms`` = sys.maxsize)."""
    n = getattr(vis_processor, "n_frms", None)
    return None if n is None or n >= sys.maxsize else int(n)


def read_webvid_annotations(anno_dir: str) -> List[Dict[str, str]]:
    """Rows ``{"videoid", "name", "page_dir"}`` of every ``*.csv`` in ``anno_dir`` (sorted by name)."""
    root = Path(anno_dir)
    if not root.is_dir():
        raise DataError(f"{anno_dir}: WebVid annotation directory not found (build_info.anno_dir)")
    files = sorted(p for p in root.iterdir() if p.suffix == ".csv")
    if not files:
        others = sorted(p.name for p in root.iterdir())[:5]
        raise DataError(
            f"{anno_dir}: no *.csv file (found {others}); WebVid annotations must be comma-separated "
            ".csv files with columns videoid,name,page_dir (convert .tsv files first)"
        )
    rows: List[Dict[str, str]] = []
    for path in files:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = [c for c in WEBVID_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise DataError(f"{path}: missing column(s) {missing}; have {reader.fieldnames}")
            for row in reader:
                rows.append({c: row[c] for c in WEBVID_COLUMNS})
    return rows


class WebvidDataset(CaptionDatasetMixin, Dataset):
    """WebVid clips with captions; ``__getitem__`` -> sample dict or BadSample."""

    def __init__(self, vis_processor: Any, text_processor: Any, videos_dir: str, anno_dir: str,
                 max_pixels: Optional[int] = DEFAULT_MAX_PIXELS) -> None:
        self.vis_processor = vis_processor
        self.text_processor = text_processor
        self.videos_dir = videos_dir
        self.annotation = read_webvid_annotations(anno_dir)
        self.max_pixels = max_pixels
        self.n_frms = required_frames(vis_processor)

    def __len__(self) -> int:
        return len(self.annotation)

    def video_path(self, row: Dict[str, str]) -> str:
        return os.path.join(self.videos_dir, row["page_dir"], f"{row['videoid']}.mp4")

    def __getitem__(self, index: int) -> Any:
        row = self.annotation[index]
        path = self.video_path(row)

        def load() -> Dict[str, Any]:
            caption = (row.get("name") or "").strip()
            if not caption:
                raise BadInput("bad_annotation", "empty caption")
            video = load_video_sample(path, self.vis_processor, self.n_frms, self.max_pixels)
            text = self.text_processor(caption) if self.text_processor is not None else caption
            return {"image": video, "text_input": text, "type": "video"}

        return guarded(path, load)


class CCSBUAlignDataset(CaptionDatasetMixin, Dataset):
    """Image-caption pairs of ``filter_cap.json`` + ``image/<image_id>.jpg`` (raw captions)."""

    def __init__(self, vis_processor: Any, storage: str, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
                 text_processor: Any = None) -> None:
        self.vis_processor = vis_processor
        self.text_processor = text_processor  # None in the original recipe (raw captions)
        self.vis_root = os.path.join(storage, "image")
        ann_path = Path(storage) / "filter_cap.json"
        if not ann_path.is_file():
            raise DataError(f"{ann_path}: not found (build_info.storage must hold filter_cap.json and image/)")
        try:
            data = json.loads(ann_path.read_text(encoding="utf-8"))
            self.annotation = list(data["annotations"])
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{ann_path}: expected {{\"annotations\": [{{\"image_id\", \"caption\"}}]}}: {exc}") from None
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.annotation)

    def __getitem__(self, index: int) -> Any:
        ann = self.annotation[index]
        image_id = ann.get("image_id") if isinstance(ann, dict) else None
        path = os.path.join(self.vis_root, f"{image_id}.jpg")

        def load() -> Dict[str, Any]:
            if image_id is None or not isinstance(ann.get("caption"), str):
                raise BadInput("bad_annotation", f"entry {index} needs image_id and caption: {str(ann)[:200]}")
            image = load_image_sample(path, self.vis_processor, self.max_pixels)
            caption = ann["caption"]
            if self.text_processor is not None:
                caption = self.text_processor(caption)
            return {"image": image, "text_input": caption, "type": "image"}

        return guarded(path, load)


# ----------------------------------------------------------------------------------------
# Builders
# ----------------------------------------------------------------------------------------


@dataclass
class WebvidBuildInfo(BuildInfo):
    anno_dir: str = ""
    videos_dir: str = ""
    val_anno_dir: Optional[str] = None


@dataclass
class WebvidConfig(DatasetConfig):
    data_type: str = "video"
    build_info: WebvidBuildInfo = field(default_factory=WebvidBuildInfo)


@registry.register_builder("webvid")
class WebvidBuilder(BaseDatasetBuilder):
    name = "webvid"
    DATASET_CONFIG_DICT = {"default": "configs/datasets/webvid/defaults.yaml"}
    config_schema = WebvidConfig

    def build(self) -> Dict[str, Dataset]:
        info = self.config.build_info
        videos_dir = self.require_build_info("videos_dir")
        out: Dict[str, Dataset] = {
            "train": WebvidDataset(self.require_vis_processor("train"), self.text_processors.get("train"),
                                   videos_dir, self.require_build_info("anno_dir"), self.config.max_pixels)
        }
        if info.val_anno_dir:
            out["val"] = WebvidDataset(self.require_vis_processor("eval"), self.text_processors.get("eval"),
                                       videos_dir, info.val_anno_dir, self.config.max_pixels)
        return out


@dataclass
class CCSBUAlignBuildInfo(BuildInfo):
    storage: str = ""


@dataclass
class CCSBUAlignConfig(DatasetConfig):
    data_type: str = "images"
    build_info: CCSBUAlignBuildInfo = field(default_factory=CCSBUAlignBuildInfo)


@registry.register_builder("cc_sbu_align")
class CCSBUAlignBuilder(BaseDatasetBuilder):
    name = "cc_sbu_align"
    DATASET_CONFIG_DICT = {"default": "configs/datasets/cc_sbu/align.yaml"}
    config_schema = CCSBUAlignConfig

    def build(self) -> Dict[str, Dataset]:
        storage = self.require_build_info("storage")
        if not os.path.isdir(storage):
            raise DataError(f"{storage}: cc_sbu_align storage directory not found (build_info.storage)")
        # Like the original, no text processor is applied to these captions even if configured.
        if self.config.text_processor:
            logger.info("datasets.cc_sbu_align: text_processor is ignored (captions are used raw, as in the original)")
        return {"train": CCSBUAlignDataset(self.require_vis_processor("train"), storage, self.config.max_pixels)}
