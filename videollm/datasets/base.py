"""The dataset builder base class (LAVIS design) and what every dataset shares.

A builder is a registered class (``@registry.register_builder(name)``) with

* ``DATASET_CONFIG_DICT``: ``{"default": "configs/datasets/<name>/....yaml"}`` (relative to the
  package dir; the YAML's root is ``datasets: {<name>: {...}}``);
* ``config_schema``: a dataclass of every accepted key (a :class:`DatasetConfig` subclass whose
  ``build_info`` is the builder's own nested dataclass, so unknown ``build_info`` keys are
  rejected);
* ``from_config(cfg)`` -> builder, ``build_datasets()`` -> ``{"train": Dataset, ...}``.

Processors come from the config nodes ``vis_processor: {train: {name: ..., ...}, eval: {...}}``
and ``text_processor`` through the registry, as in the original.

Every dataset here returns either a sample dict or a
:class:`~videollm.datasets.bad_samples.BadSample` marker, and has a ``collater(samples)`` that
drops markers and reports them (``bad_samples``, ``num_samples``; see ``bad_samples.py``).
Caption samples are ``{"image": (3, T, H, W) or (3, H, W) float, "text_input": str, "type":
"video" | "image"}`` and collate with torch's default collate; instruction samples are
``{"image", "input_ids", "labels"}`` and collate with :func:`videollm.conversation.collate_instruct`.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Dataset
from torch.utils.data.dataloader import default_collate

from videollm.config import PACKAGE_DIR, validate_mapping, with_defaults
from videollm.datasets.bad_samples import DEFAULT_MAX_PIXELS, empty_batch, split_bad
from videollm.errors import ConfigError
from videollm.registry import registry

logger = logging.getLogger(__name__)


@dataclass
class BuildInfo:
    """``build_info`` keys; each builder subclasses this with its own keys."""


@dataclass
class DatasetConfig:
    """Keys every dataset entry accepts; builders subclass it and retype ``build_info``.

    ``sample_ratio``: weight of this dataset when mixing (one dataset per batch, chosen with
    probability proportional to it). ``max_pixels``: frames or images with more pixels are
    refused from their header (None: no limit). ``allow_outside_root``: media paths in the
    annotations may leave the dataset's root (``../``, absolute paths); off by default, such
    entries are counted ``outside_root`` bad samples. ``feature_cache``: a folder written by
    ``python -m videollm.features cache``; the dataset then yields the model's frozen-front
    outputs from it instead of decoding (see :mod:`videollm.feature_cache`).
    """

    data_type: str = "video"
    type: str = "default"
    sample_ratio: float = 1
    vis_processor: Dict[str, Any] = field(default_factory=dict)
    text_processor: Dict[str, Any] = field(default_factory=dict)
    max_pixels: Optional[int] = DEFAULT_MAX_PIXELS
    allow_outside_root: bool = False
    feature_cache: str = ""
    build_info: BuildInfo = field(default_factory=BuildInfo)


def _to_plain(cfg: Any) -> Dict[str, Any]:
    if cfg is None:
        return {}
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    return dict(cfg)


def _instantiate(schema: type, values: Dict[str, Any]) -> Any:
    """A schema dataclass instance from validated ``values`` (nested dataclasses included)."""
    import typing

    hints = typing.get_type_hints(schema)
    full = with_defaults(values, schema)
    for key, value in full.items():
        tp = hints.get(key)
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            full[key] = _instantiate(tp, value)
    return schema(**full)


class BaseDatasetBuilder:
    """Builds the splits of one dataset from its config entry."""

    name: str = ""
    DATASET_CONFIG_DICT: Dict[str, str] = {}
    config_schema: type = DatasetConfig

    def __init__(self, cfg: Any) -> None:
        """``cfg``: a validated :attr:`config_schema` instance (use :meth:`from_config`)."""
        self.config = cfg
        self.vis_processors: Dict[str, Any] = {}
        self.text_processors: Dict[str, Any] = {}

    @classmethod
    def default_config(cls, type_: str = "default") -> DictConfig:
        """The builder's default YAML entry (``datasets.<name>``)."""
        if type_ not in cls.DATASET_CONFIG_DICT:
            raise ConfigError(f"datasets.{cls.name}.type: unknown '{type_}'; known: {sorted(cls.DATASET_CONFIG_DICT)}")
        path = PACKAGE_DIR / cls.DATASET_CONFIG_DICT[type_]
        node = OmegaConf.load(path)
        return node.datasets[cls.name]

    @classmethod
    def from_config(cls, cfg: Optional[DictConfig] = None, merge_defaults: bool = False) -> "BaseDatasetBuilder":
        """Validate ``cfg`` (the ``datasets.<name>`` node; None: the default YAML) and build.

        ``merge_defaults=True`` merges ``cfg`` over the default YAML first (what
        :func:`videollm.config.load_config` has already done for a full config).
        """
        if cfg is None or merge_defaults:
            type_ = str((cfg or {}).get("type", "default")) if cfg is not None else "default"
            base = cls.default_config(type_)
            cfg = OmegaConf.merge(base, cfg) if cfg is not None else base
        values = _to_plain(cfg)
        validate_mapping(values, cls.config_schema, f"datasets.{cls.name}")
        return cls(_instantiate(cls.config_schema, values))

    # ------------------------------------------------------------------ processors
    @staticmethod
    def _build_processor(node: Optional[Dict[str, Any]], key: str) -> Any:
        if not node:
            return None
        if "name" not in node:
            raise ConfigError(f"{key}: a processor needs a 'name' (e.g. alpro_video_train)")
        proc_cls = registry.get_processor_class(str(node["name"]))
        return proc_cls.from_config(OmegaConf.create(node))

    def build_processors(self) -> None:
        prefix = f"datasets.{self.name}"
        for split in ("train", "eval"):
            self.vis_processors[split] = self._build_processor(
                (self.config.vis_processor or {}).get(split), f"{prefix}.vis_processor.{split}")
            self.text_processors[split] = self._build_processor(
                (self.config.text_processor or {}).get(split), f"{prefix}.text_processor.{split}")

    def require_vis_processor(self, split: str = "train") -> Any:
        proc = self.vis_processors.get(split)
        if proc is None:
            raise ConfigError(
                f"datasets.{self.name}.vis_processor.{split}: not set; this dataset needs one "
                "(see the default YAML under videollm/configs/datasets/)"
            )
        return proc

    def require_build_info(self, key: str) -> Any:
        value = getattr(self.config.build_info, key, None)
        if value in (None, ""):
            raise ConfigError(f"datasets.{self.name}.build_info.{key}: not set")
        return value

    # ------------------------------------------------------------------ datasets
    def build_datasets(self) -> Dict[str, Dataset]:
        """``{"train": Dataset}`` (plus optional eval splits where a builder supports them)."""
        self.build_processors()
        return self.build()

    def build(self) -> Dict[str, Dataset]:  # pragma: no cover - abstract
        raise NotImplementedError


def collate_caption(samples: Sequence[Any]) -> Dict[str, Any]:
    """Default collate of the good caption samples plus ``bad_samples``/``num_samples``."""
    good, bad = split_bad(samples)
    if not good:
        return empty_batch(bad)
    batch = default_collate(good)
    batch["bad_samples"] = bad
    batch["num_samples"] = len(good)
    return batch


class CaptionDatasetMixin:
    """``collater`` of the caption datasets."""

    def collater(self, samples: Sequence[Any]) -> Dict[str, Any]:
        return collate_caption(samples)


def _describe_size(dataset: Any) -> str:
    """"360 samples", "rendered on the fly (1,000,000 per epoch)" or "a stream" for the log."""
    if not hasattr(dataset, "__len__"):
        return "a stream"
    n = len(dataset)
    if type(dataset).__name__.startswith("Synthetic"):
        return f"rendered on the fly ({n:,} per epoch)"
    return f"{n:,} samples"


def build_datasets_from_config(datasets_cfg: DictConfig) -> Dict[str, Dict[str, Dataset]]:
    """Every dataset of an assembled ``datasets:`` section: ``{name: {split: Dataset}}``."""
    out: Dict[str, Dict[str, Dataset]] = {}
    for name in datasets_cfg:
        builder_cls = registry.get_builder_class(str(name))
        builder = builder_cls.from_config(datasets_cfg[name])
        out[str(name)] = builder.build_datasets()
        if getattr(builder.config, "feature_cache", ""):
            from videollm.feature_cache import wrap_cached

            out[str(name)] = wrap_cached(str(name), out[str(name)], datasets_cfg[name], builder.config.feature_cache)
        logger.info("dataset %s: %s", name, ", ".join(f"{s}: {_describe_size(d)}" for s, d in out[str(name)].items()))
    return out


def sample_ratios_from_config(datasets_cfg: DictConfig) -> Dict[str, float]:
    """``{name: sample_ratio}`` (default 1 each: uniform mixing, the original's stage-2 setting)."""
    return {str(n): float((datasets_cfg[n] or {}).get("sample_ratio", 1)) for n in datasets_cfg}


def derive_seed(*keys: int) -> int:
    """A 32-bit seed mixed from integer ``keys`` (e.g. base seed, epoch, sample index)."""
    import numpy as np

    return int(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in keys]).generate_state(1)[0])


def run_seeded(seed: int, fn: Callable[[], Any]) -> Any:
    """Run ``fn()`` with Python's, NumPy's and torch's CPU RNGs seeded to ``seed``, then restore them.

    Makes a sample's random augmentation (crop boxes, ``headtail`` frames) a function of its
    seed alone, whatever worker or process loads it; restoring keeps the caller's RNG streams
    (e.g. the model's dropout when ``num_workers=0``) untouched.
    """
    import random

    import numpy as np
    import torch

    py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed)
    torch.default_generator.manual_seed(seed)  # CPU only: CUDA RNGs stay untouched
    try:
        return fn()
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)


def dist_info() -> "tuple[int, int]":
    """(rank, world_size) of torch.distributed, or (0, 1) when it is not initialised."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
