"""Datasets, their builders and the training loader; importing this package registers the builders.

Builders (``registry.get_builder_class(name).from_config(cfg).build_datasets()``):

* ``webvid``, ``cc_sbu_align``: caption data in the original's file layouts
  (:mod:`~videollm.datasets.caption_datasets`);
* ``llava_instruct``, ``webvid_instruct`` (+ ``webvid_instruct_zh``): instruction data
  (:mod:`~videollm.datasets.instruct_datasets`);
* ``cc_sbu``, ``laion``, ``video_shards``: webdataset tar shards
  (:mod:`~videollm.datasets.shard_datasets`; shards written by ``python -m videollm.datasets.shards``,
  or :func:`videollm.datasets.shards.write_shards`, not imported here so that ``-m`` runs cleanly);
* ``synthetic_clips``: clips rendered on the fly for the tiny recipes
  (:mod:`~videollm.datasets.synthetic_datasets`);
* ``sharegpt``, ``llava_video``, ``videochat2_it``: common instruction-data formats for every
  model (:mod:`~videollm.datasets.formats`, ``docs/bring_your_own_data.md``).

Bad files become named, counted markers (:mod:`~videollm.datasets.bad_samples`), and
:func:`~videollm.datasets.mixing.build_train_loader` mixes datasets one per batch by
``sample_ratio``, deterministically and resumably (:mod:`~videollm.datasets.mixing`).
"""

from videollm.datasets.bad_samples import (
    REASONS,
    BadSample,
    BadSampleTracker,
    is_empty_batch,
    probe_video,
)
from videollm.datasets.base import (
    BaseDatasetBuilder,
    DatasetConfig,
    build_datasets_from_config,
    collate_caption,
    sample_ratios_from_config,
)
from videollm.datasets.caption_datasets import CCSBUAlignBuilder, CCSBUAlignDataset, WebvidBuilder, WebvidDataset
from videollm.datasets.instruct_datasets import (
    LlavaInstructBuilder,
    LlavaInstructDataset,
    VideoInstructDataset,
    WebvidInstructBuilder,
    WebvidInstructZhBuilder,
)
from videollm.datasets.mixing import MixedLoader, build_train_loader
from videollm.datasets.shard_datasets import CCSBUBuilder, LaionBuilder, ShardDataset, VideoShardBuilder
from videollm.datasets.synthetic_datasets import SyntheticClipDataset, SyntheticClipsBuilder
from videollm.datasets.pllava_datasets import SyntheticVideoChatBuilder, VideoChat2InstructBuilder  # noqa: F401
from videollm.datasets.llava_json_datasets import LlavaJsonBuilder, LlavaJsonDataset  # noqa: F401
from videollm.datasets.llmva_gebc_datasets import GEBCBuilder, GEBCDataset  # noqa: F401
from videollm.datasets.llama_vid_datasets import LLaMAVIDJsonBuilder, LLaMAVIDJsonDataset  # noqa: F401
from videollm.datasets.formats import LlavaVideoBuilder, ShareGPTBuilder, VideoChat2ITBuilder  # noqa: F401

__all__ = [
    "REASONS",
    "BadSample",
    "BadSampleTracker",
    "BaseDatasetBuilder",
    "CCSBUAlignBuilder",
    "CCSBUAlignDataset",
    "CCSBUBuilder",
    "DatasetConfig",
    "LaionBuilder",
    "LlavaInstructBuilder",
    "LlavaInstructDataset",
    "MixedLoader",
    "ShardDataset",
    "SyntheticClipDataset",
    "SyntheticClipsBuilder",
    "VideoInstructDataset",
    "VideoShardBuilder",
    "WebvidBuilder",
    "WebvidDataset",
    "WebvidInstructBuilder",
    "WebvidInstructZhBuilder",
    "build_datasets_from_config",
    "build_train_loader",
    "collate_caption",
    "is_empty_batch",
    "probe_video",
    "sample_ratios_from_config",
]
