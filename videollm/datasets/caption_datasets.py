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
    BadSample,
    guarded,
    load_image_sample,
    load_video_sample,
    name_field,
    resolve_under,
    text_field,
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


def read_webvid_annotations(anno_dir: str) -> List[Dict[str, Any]]:
    """Rows ``{"videoid", "name", "page_dir", "__where__": "part.csv:LINE"}`` of every ``*.csv`` in
    ``anno_dir`` (sorted by name).

    Rows are kept as read, malformed ones included: a short row has ``None`` fields, a row with
    more fields than the header (an unquoted comma in a caption) gets ``"__error__"``, and so does
    a row the csv module cannot parse (a field over the size limit). The dataset turns each of them
    into a counted ``bad_annotation`` marker named by ``__where__`` when it is drawn, like a bad
    video; a file without the needed columns is refused at once.
    """
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
    rows: List[Dict[str, Any]] = []
    for path in files:
        malformed = 0
        # surrogateescape: a row with bytes that are not UTF-8 is refused alone (text_field), not the file
        with path.open(newline="", encoding="utf-8-sig", errors="surrogateescape") as f:  # -sig: Excel's BOM
            reader = csv.DictReader(f)
            try:
                fieldnames = reader.fieldnames or []
            except csv.Error as exc:
                raise DataError(f"{path}: cannot read the CSV header: {exc}") from None
            missing = [c for c in WEBVID_COLUMNS if c not in fieldnames]
            if missing:
                raise DataError(f"{path}: missing column(s) {missing}; have {reader.fieldnames}")
            while True:
                start = reader.line_num + 1
                try:
                    row = next(reader)
                except StopIteration:
                    break
                except csv.Error as exc:
                    rows.append({c: None for c in WEBVID_COLUMNS} | {"__where__": f"{path}:{start}",
                                                                     "__error__": f"unreadable CSV row: {exc}"})
                    malformed += 1
                    continue
                entry: Dict[str, Any] = {c: row[c] for c in WEBVID_COLUMNS}
                entry["__where__"] = f"{path}:{start}"
                if row.get(None):  # DictReader's restkey: fields beyond the header
                    entry["__error__"] = (f"{len(fieldnames) + len(row[None])} fields, the header has "
                                          f"{len(fieldnames)} (an unquoted comma in the caption?)")
                if "__error__" in entry or any(entry[c] is None for c in WEBVID_COLUMNS):
                    malformed += 1
                rows.append(entry)
        if malformed:
            logger.warning("%s: %d malformed row(s); they are skipped and counted as bad samples", path, malformed)
    return rows


class WebvidDataset(CaptionDatasetMixin, Dataset):
    """WebVid clips with captions; ``__getitem__`` -> sample dict or BadSample.

    Every row is checked inside the bad-sample guard: a short row, a missing or empty caption,
    a page_dir or videoid that is empty or leaves ``videos_dir`` (``../``, absolute; unless
    ``allow_outside_root``) gives a named ``bad_annotation`` / ``outside_root`` marker.
    """

    def __init__(self, vis_processor: Any, text_processor: Any, videos_dir: str, anno_dir: str,
                 max_pixels: Optional[int] = DEFAULT_MAX_PIXELS, allow_outside_root: bool = False) -> None:
        self.vis_processor = vis_processor
        self.text_processor = text_processor
        self.videos_dir = videos_dir
        self.annotation = read_webvid_annotations(anno_dir)
        self.max_pixels = max_pixels
        self.allow_outside_root = allow_outside_root
        self.n_frms = required_frames(vis_processor)

    def __len__(self) -> int:
        return len(self.annotation)

    def video_path(self, row: Dict[str, Any]) -> str:
        """``videos_dir/page_dir/videoid.mp4``; BadInput for a malformed row or a path outside the root."""
        if "__error__" in row:
            raise BadInput("bad_annotation", row["__error__"])
        page_dir, videoid = name_field(row, "page_dir"), name_field(row, "videoid")
        return resolve_under(self.videos_dir, page_dir, f"{videoid}.mp4", allow_outside=self.allow_outside_root)

    def __getitem__(self, index: int) -> Any:
        row = self.annotation[index]
        where = str(row.get("__where__", f"<webvid row {index}>")) if isinstance(row, dict) else f"<webvid row {index}>"
        # the row first (named by file and line), then the video (named by its path)
        entry = guarded(where, lambda: (self.video_path(row), text_field(row, "name").strip()))
        if isinstance(entry, BadSample):
            return entry
        path, caption = entry

        def load() -> Dict[str, Any]:
            video = load_video_sample(path, self.vis_processor, self.n_frms, self.max_pixels)
            text = self.text_processor(caption) if self.text_processor is not None else caption
            return {"image": video, "text_input": text, "type": "video"}

        return guarded(path, load)


class CCSBUAlignDataset(CaptionDatasetMixin, Dataset):
    """Image-caption pairs of ``filter_cap.json`` + ``image/<image_id>.jpg`` (raw captions).

    An entry without a string or integer ``image_id`` or without a non-empty string ``caption``
    is a ``bad_annotation`` marker named ``filter_cap.json#<index>``.
    """

    def __init__(self, vis_processor: Any, storage: str, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
                 text_processor: Any = None, allow_outside_root: bool = False) -> None:
        self.vis_processor = vis_processor
        self.text_processor = text_processor  # None in the original recipe (raw captions)
        self.vis_root = os.path.join(storage, "image")
        ann_path = Path(storage) / "filter_cap.json"
        if not ann_path.is_file():
            raise DataError(f"{ann_path}: not found (build_info.storage must hold filter_cap.json and image/)")
        try:
            data = json.loads(ann_path.read_text(encoding="utf-8"))
            annotations = data["annotations"]
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{ann_path}: expected {{\"annotations\": [{{\"image_id\", \"caption\"}}]}}: {exc}") from None
        if not isinstance(annotations, list):
            raise DataError(f"{ann_path}: 'annotations' should be a list, got {type(annotations).__name__}")
        self.annotation = annotations
        self.ann_path = str(ann_path)
        self.max_pixels = max_pixels
        self.allow_outside_root = allow_outside_root

    def __len__(self) -> int:
        return len(self.annotation)

    def image_path(self, ann: Any) -> str:
        image_id = name_field(ann, "image_id")
        return resolve_under(self.vis_root, f"{image_id}.jpg", allow_outside=self.allow_outside_root)

    def __getitem__(self, index: int) -> Any:
        ann = self.annotation[index]
        # the entry first (named filter_cap.json#index), then the image (named by its path)
        entry = guarded(f"{self.ann_path}#{index}", lambda: (self.image_path(ann), text_field(ann, "caption")))
        if isinstance(entry, BadSample):
            return entry
        path, caption = entry

        def load() -> Dict[str, Any]:
            image = load_image_sample(path, self.vis_processor, self.max_pixels)
            text = self.text_processor(caption) if self.text_processor is not None else caption
            return {"image": image, "text_input": text, "type": "image"}

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
                                   videos_dir, self.require_build_info("anno_dir"), self.config.max_pixels,
                                   self.config.allow_outside_root)
        }
        if info.val_anno_dir:
            out["val"] = WebvidDataset(self.require_vis_processor("eval"), self.text_processors.get("eval"),
                                       videos_dir, info.val_anno_dir, self.config.max_pixels,
                                       self.config.allow_outside_root)
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
        return {"train": CCSBUAlignDataset(self.require_vis_processor("train"), storage, self.config.max_pixels,
                                           allow_outside_root=self.config.allow_outside_root)}
