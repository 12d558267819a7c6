"""Kinetic-GEBC boundary captioning on precomputed features (builder ``gebc``, as the original's).

Annotation JSON (the original's ``data/annotations/*.json``): a dict keyed by the 11-character
YouTube id, each value a list of boundaries ``{"boundary_id": "<vid>_<k>", "timestamp",
"prev_timestamp", "next_timestamp", "label", "subject", "status_before", "status_after"}`` (the
test file carries no captions). ``video_info.json`` maps video id -> duration (seconds); videos
missing there are skipped and counted, as the original skips them.

Every boundary becomes THREE samples, one per caption type (subject, status_before,
status_after), in that order. A sample::

    image_query_tokens (T, Qi, H)    <q_former_feature_folder>/<boundary_id[:11]>.npy
    other_features_list [(t_a, d_a)] <other_feature_folders[a]>/<boundary_id[:11]>.pkl, per name
    reference_points (2,) float64    [timestamp / duration, (next - prev) / duration]
    prompt, text_input (train), caption_type, boundary_id

Features are keyed by video, so all boundaries of a video share them. Feature files: ``.npy``
(loaded with ``allow_pickle=False``) of shape (T, Qi, q_former_dim) for the Q-Former tokens
(``python -m videollm.features gebc-qformer`` writes them); ``.pkl`` holding a 2-D NumPy array
(t, d) (or a nested list of floats) for every other feature, d as ``feature_dims`` says
(defaults: the original's intern_video 768, omni 1536, clip 768). Pickles are read with an
unpickler that admits NumPy arrays only. A missing, empty, unreadable or mis-shaped file makes
the sample a named, counted bad sample (``missing`` / ``empty`` / ``corrupt``), skipped like a
bad video.

The collater resamples each other feature to ``max_seq_len`` positions with the original's
nearest interpolation (scipy ``interp1d(kind="nearest")`` at ``i * (t - 1) / (max_seq_len - 1)``,
half-way points rounding down; a single row is repeated) and concatenates them along the
feature axis: ``other_features_list`` (B, max_seq_len, 1, sum d).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from videollm.datasets.bad_samples import BadInput, check_file, field_of, guarded, name_field, split_bad, empty_batch
from videollm.datasets.base import BaseDatasetBuilder, BuildInfo, DatasetConfig
from videollm.errors import ConfigError, DataError
from videollm.registry import registry

logger = logging.getLogger(__name__)

CAPTION_TYPES = ("subject", "status_before", "status_after")
PROMPT_SUFFIX = {
    "subject": "The subject is",
    "status_before": "Status before change is",
    "status_after": "Status after change is",
}


def build_prompt(boundary_type: str, caption_type: str) -> str:
    """The original's ``build_prompt``: "This video describes the {label lower}." and, with NO
    space, the caption type's phrase (any type but subject / status_before reads as status_after)."""
    prompt = "This video describes the {}.".format(boundary_type.lower())
    return prompt + PROMPT_SUFFIX.get(caption_type, PROMPT_SUFFIX["status_after"])


# The original's get_feats: feature type -> last dimension.
DEFAULT_FEATURE_DIMS = {"q_former_tokens": 768, "intern_video": 768, "omni": 1536, "clip": 768}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Admits what a pickled NumPy array needs, nothing else (no code runs from a feature file)."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"), ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a feature file (NumPy arrays only)")


def read_feature(path: str) -> np.ndarray:
    """A feature file as an array; BadInput (missing / empty / corrupt) naming the problem."""
    check_file(path)
    try:
        if path.endswith(".npy"):
            feats = np.load(path, allow_pickle=False)
        else:
            with open(path, "rb") as f:
                feats = np.asarray(_NumpyOnlyUnpickler(f).load(), dtype=None)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is a bad sample
        raise BadInput("corrupt", f"cannot read features: {type(exc).__name__}: {exc}") from None
    if feats.dtype == object or not np.issubdtype(feats.dtype, np.number):
        raise BadInput("corrupt", f"features of dtype {feats.dtype}; expected numbers")
    return feats


def resize_feature(data: np.ndarray, new_size: int) -> np.ndarray:
    """(t, d) -> (new_size, d) by the original's nearest interpolation (see the module doc)."""
    n = len(data)
    if n == 1:
        return np.stack([np.reshape(data, [-1])] * new_size)
    x_new = np.array([i * float(n - 1) / (new_size - 1) for i in range(new_size)])
    bounds = (np.arange(n - 1) + np.arange(1, n)) / 2.0  # mid-points; side="left" rounds halves down
    idx = np.clip(np.searchsorted(bounds, x_new, side="left"), 0, n - 1)
    return data[idx]


class GEBCDataset(Dataset):
    """One Kinetic-GEBC split: three samples per boundary (see the module doc)."""

    def __init__(self, annotation_path: str, video_info_path: str, q_former_feature_folder: str,
                 other_feature_names: Sequence[str], other_feature_folders: Sequence[str], max_seq_len: int,
                 *, with_captions: bool = True, feature_dims: Optional[Dict[str, int]] = None,
                 q_former_dim: Optional[int] = None) -> None:
        if len(other_feature_names) != len(other_feature_folders):
            raise ConfigError(f"datasets.gebc.build_info: {len(other_feature_names)} other_feature_names but "
                              f"{len(other_feature_folders)} other_feature_folders; they pair up one to one")
        if max_seq_len < 2:
            raise ConfigError(f"datasets.gebc.build_info.max_seq_len: {max_seq_len}; must be >= 2")
        self.dims = {**DEFAULT_FEATURE_DIMS, **(feature_dims or {})}
        if q_former_dim is not None:
            self.dims["q_former_tokens"] = int(q_former_dim)
        for name in other_feature_names:
            if name not in self.dims:
                raise ConfigError(f"datasets.gebc.build_info.other_feature_names: '{name}' has no known dimension; "
                                  f"known: {sorted(self.dims)} (add it to build_info.feature_dims)")
        self.q_former_feature_folder = q_former_feature_folder
        self.other_feature_names = list(other_feature_names)
        self.other_feature_folders = list(other_feature_folders)
        self.max_seq_len = int(max_seq_len)
        self.with_captions = with_captions
        self.annotation_path = annotation_path
        self.video_info = self._read_json(video_info_path, "video_info_path")
        self.raw = self._read_json(annotation_path, "annotation_path")
        if not isinstance(self.raw, dict):
            raise DataError(f"{annotation_path}: expected a dict keyed by video id, got a {type(self.raw).__name__}")
        self.annotation: List[Dict[str, Any]] = []
        self.skipped: Dict[str, int] = {"video_not_in_video_info": 0, "bad_annotation": 0}
        self._load_annotations()

    @staticmethod
    def _read_json(path: str, key: str) -> Any:
        if not os.path.isfile(path):
            raise DataError(f"datasets.gebc.build_info.{key}: {path} not found")
        try:
            with open(path, "r", encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError) as exc:
            raise DataError(f"{path}: not valid JSON ({exc})") from None

    def _load_annotations(self) -> None:
        for key, boundaries in self.raw.items():
            if key not in self.video_info:
                logger.warning("%s: video %s is not in video_info; skipped", self.annotation_path, key)
                self.skipped["video_not_in_video_info"] += 1
                continue
            duration = float(self.video_info[key])
            for entry in boundaries if isinstance(boundaries, list) else [boundaries]:
                try:
                    bid = name_field(entry, "boundary_id")
                    timestamp = float(field_of(entry, "timestamp", (int, float)))
                    span = float(field_of(entry, "next_timestamp", (int, float))) - float(
                        field_of(entry, "prev_timestamp", (int, float)))
                    label = field_of(entry, "label", str)
                    caps = {t: field_of(entry, t, str) for t in CAPTION_TYPES} if self.with_captions else {}
                    if duration <= 0:
                        raise BadInput("bad_annotation", f"video {key} has duration {duration}")
                except BadInput as exc:
                    logger.warning("%s: video %s: bad boundary skipped (%s)", self.annotation_path, key, exc.detail)
                    self.skipped["bad_annotation"] += 1
                    continue
                for ctype in CAPTION_TYPES:
                    item = {"boundary_id": bid, "timestamp": timestamp, "label": label, "duration": duration,
                            "boundary_duration": span, "type": ctype}
                    if self.with_captions:
                        item["caption"] = caps[ctype]
                    self.annotation.append(item)

    def __len__(self) -> int:
        return len(self.annotation)

    def ground_truth(self) -> Dict[str, Dict[str, List[str]]]:
        """The original's ``split_gt``: {caption type: {boundary_id: [caption]}} over the whole file."""
        gt: Dict[str, Dict[str, List[str]]] = {t: {} for t in CAPTION_TYPES}
        for boundaries in self.raw.values():
            for b in boundaries if isinstance(boundaries, list) else [boundaries]:
                if isinstance(b, dict) and all(t in b for t in CAPTION_TYPES) and "boundary_id" in b:
                    for t in CAPTION_TYPES:
                        gt[t][str(b["boundary_id"])] = [b[t]]
        return gt

    def boundary_ids(self) -> List[str]:
        return [str(b["boundary_id"]) for bs in self.raw.values() for b in (bs if isinstance(bs, list) else [bs])
                if isinstance(b, dict) and "boundary_id" in b]

    def _feature(self, folder: str, kind: str, vid: str, ext: str) -> np.ndarray:
        path = os.path.join(folder, vid + ext)
        try:
            feats = read_feature(path)
        except BadInput as exc:
            raise BadInput(exc.reason, f"{kind} features {path}: {exc.detail}") from None
        want_ndim = 3 if kind == "q_former_tokens" else 2
        if feats.ndim != want_ndim or feats.shape[-1] != self.dims[kind] or feats.shape[0] < 1:
            layout = "(frames, queries, %d)" if want_ndim == 3 else "(time, %d)"
            raise BadInput("corrupt", f"{kind} features {path}: shape {tuple(feats.shape)}, expected "
                                      f"{layout % self.dims[kind]}")
        return feats

    def _load(self, item: Dict[str, Any]) -> Dict[str, Any]:
        vid = item["boundary_id"][0:11]
        tokens = torch.from_numpy(self._feature(self.q_former_feature_folder, "q_former_tokens", vid, ".npy"))
        others = [self._feature(folder, name, vid, ".pkl")
                  for name, folder in zip(self.other_feature_names, self.other_feature_folders)]
        ref = torch.from_numpy(np.array([item["timestamp"] / item["duration"],
                                         item["boundary_duration"] / item["duration"]]))
        sample = {"image_query_tokens": tokens, "other_features_list": others, "reference_points": ref,
                  "prompt": build_prompt(item["label"], item["type"]), "boundary_id": item["boundary_id"],
                  "caption_type": item["type"]}
        if self.with_captions:
            sample["text_input"] = item["caption"]
        return sample

    def __getitem__(self, index: int) -> Any:
        item = self.annotation[index]
        return guarded(f"{item['boundary_id']} ({item['type']})", lambda: self._load(item))

    def collater(self, samples: Sequence[Any]) -> Dict[str, Any]:
        good, bad = split_bad(samples)
        if not good:
            return empty_batch(bad)
        frames = {tuple(s["image_query_tokens"].shape) for s in good}
        if len(frames) > 1:
            raise DataError("gebc: Q-Former token features of different shapes in one batch "
                            f"({sorted(frames)}, boundaries {[s['boundary_id'] for s in good]}); extract every "
                            "video with the same number of frames")
        rows = []
        for s in good:
            parts = [torch.from_numpy(np.ascontiguousarray(resize_feature(f, self.max_seq_len))).unsqueeze(1)
                     for f in s["other_features_list"]]
            rows.append(torch.cat(parts, dim=-1) if parts else torch.zeros(self.max_seq_len, 1, 0))
        batch: Dict[str, Any] = {
            "image_query_tokens": torch.stack([s["image_query_tokens"] for s in good]),
            "other_features_list": torch.stack(rows),
            "reference_points": torch.stack([s["reference_points"] for s in good]),
            "prompt": [s["prompt"] for s in good],
            "boundary_id": [s["boundary_id"] for s in good],
            "caption_type": [s["caption_type"] for s in good],
            "bad_samples": bad,
            "num_samples": len(good),
        }
        if self.with_captions:
            batch["text_input"] = [s["text_input"] for s in good]
        return batch


@dataclass
class GEBCSplit:
    annotation_path: str = ""


@dataclass
class GEBCBuildInfo(BuildInfo):
    video_info_path: str = ""
    q_former_feature_folder: str = ""
    other_feature_names: List[str] = field(default_factory=list)
    other_feature_folders: List[str] = field(default_factory=list)
    max_seq_len: int = 96
    annotations: Dict[str, Any] = field(default_factory=dict)  # {split: {annotation_path: ...}}
    feature_dims: Dict[str, int] = field(default_factory=dict)  # extra/overridden feature dimensions
    q_former_dim: Optional[int] = None  # last dimension of the .npy tokens (768 for BLIP-2)
    # splits whose annotation carries captions (the test file has none)
    caption_splits: List[str] = field(default_factory=lambda: ["train", "val"])


@dataclass
class GEBCConfig(DatasetConfig):
    data_type: str = "features"
    build_info: GEBCBuildInfo = field(default_factory=GEBCBuildInfo)


@registry.register_builder("gebc")
class GEBCBuilder(BaseDatasetBuilder):
    """Splits ``train`` / ``val`` / ``test`` of Kinetic-GEBC, each present when its
    ``build_info.annotations.<split>.annotation_path`` is set."""

    name = "gebc"
    DATASET_CONFIG_DICT = {"default": "configs/datasets/gebc/defaults.yaml"}
    config_schema = GEBCConfig

    def build(self) -> Dict[str, Dataset]:
        info = self.config.build_info
        self.require_build_info("video_info_path")
        self.require_build_info("q_former_feature_folder")
        out: Dict[str, Dataset] = {}
        for split, node in (info.annotations or {}).items():
            if split not in ("train", "val", "test"):
                raise ConfigError(f"datasets.gebc.build_info.annotations.{split}: unknown split; use train, val, test")
            path = (node or {}).get("annotation_path") if isinstance(node, dict) else None
            if not path:
                continue
            out[split] = GEBCDataset(
                path, info.video_info_path, info.q_former_feature_folder, info.other_feature_names,
                info.other_feature_folders, info.max_seq_len, with_captions=split in info.caption_splits,
                feature_dims=info.feature_dims, q_former_dim=info.q_former_dim,
            )
        if not out:
            raise ConfigError("datasets.gebc.build_info.annotations: no split has an annotation_path")
        return out
