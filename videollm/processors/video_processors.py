"""Video processors: a video file in, a normalised clip ``(3, T, size, size)`` out.

``alpro_video_train`` and ``alpro_video_eval`` keep the original Video-LLaMA names and
behaviour (facts from its ``video_processor.py``):

* train: ``load_video(headtail)`` resized by the decoder to ``(size, size)``, then one random
  resized crop for the whole clip (area scale ``(min_scale, max_scale)``, ratio 3/4..4/3,
  bicubic via ``interpolate``), to ``(T, H, W, C)``, cast to uint8 **without clamping**
  (bicubic overshoot wraps around: the original's quirk), /255 back to ``(C, T, H, W)``, CLIP
  normalisation. No flip, no RandAugment.
* eval: ``load_video(uniform)`` resized by the decoder, uint8 cast, /255, CLIP normalisation;
  no crop.

Both expose ``transform(clip)`` for a clip already loaded as ``(3, T, H, W)`` float in 0..255
(the Chat API calls ``vis_processor.transform(video)``); ``__call__`` takes a path (or such a
tensor). Our additions, off by default in the sense that the defaults reproduce the original:
``sampling``, ``backend`` and ``timeout`` config keys passed to :func:`load_video`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional, Union

import torch
from omegaconf import DictConfig

from videollm.processors.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    BaseProcessor,
    config_values,
    cthw_to_thwc,
    normalize_video,
    random_resized_crop_video,
    to_uint8,
    uint8_thwc_to_float_cthw,
)
from videollm.processors.video_loader import DEFAULT_TIMEOUT_S, MAX_INT, load_video
from videollm.registry import registry

VideoInput = Union[str, "os.PathLike[str]", torch.Tensor]


@dataclass
class AlproVideoTrainConfig:
    """Keys of ``vis_processor.train`` for ``alpro_video_train`` (defaults: the original's from_config)."""

    name: str = "alpro_video_train"
    image_size: int = 256
    n_frms: int = MAX_INT
    mean: Optional[List[float]] = None
    std: Optional[List[float]] = None
    min_scale: float = 0.5
    max_scale: float = 1.0
    sampling: str = "headtail"
    backend: str = "auto"
    timeout: Optional[float] = DEFAULT_TIMEOUT_S


@dataclass
class AlproVideoEvalConfig:
    """Keys of ``vis_processor.eval`` for ``alpro_video_eval`` (defaults: the original's from_config)."""

    name: str = "alpro_video_eval"
    image_size: int = 256
    n_frms: int = MAX_INT
    mean: Optional[List[float]] = None
    std: Optional[List[float]] = None
    sampling: str = "uniform"
    backend: str = "auto"
    timeout: Optional[float] = DEFAULT_TIMEOUT_S


class _AlproVideoBase(BaseProcessor):
    def __init__(
        self,
        image_size: int,
        n_frms: int,
        mean: Optional[List[float]],
        std: Optional[List[float]],
        sampling: str,
        backend: str,
        timeout: Optional[float],
    ) -> None:
        self.image_size = int(image_size)
        self.n_frms = int(n_frms)
        self.mean = tuple(mean) if mean is not None else CLIP_MEAN
        self.std = tuple(std) if std is not None else CLIP_STD
        self.sampling = sampling
        self.backend = backend
        self.timeout = timeout

    def load(self, video_path: Union[str, "os.PathLike[str]"], generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Decode ``(3, T, size, size)`` float 0..255 with this processor's sampling."""
        return load_video(
            video_path, n_frms=self.n_frms, height=self.image_size, width=self.image_size,
            sampling=self.sampling, backend=self.backend, timeout=self.timeout, rng=generator,
        )

    def transform(self, clip: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, item: VideoInput, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """A path (decoded here) or a ``(3, T, H, W)`` 0..255 clip -> normalised ``(3, T, s, s)``."""
        clip = item if isinstance(item, torch.Tensor) else self.load(item, generator)
        return self.transform(clip, generator)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(image_size={self.image_size}, n_frms={self.n_frms}, sampling={self.sampling!r})"


@registry.register_processor("alpro_video_train")
class AlproVideoTrainProcessor(_AlproVideoBase):
    """Training clips: head/tail sampling, random resized crop, uint8 cast, CLIP normalisation."""

    config_schema = AlproVideoTrainConfig

    def __init__(
        self,
        image_size: int = 256,
        n_frms: int = MAX_INT,
        mean: Optional[List[float]] = None,
        std: Optional[List[float]] = None,
        min_scale: float = 0.5,
        max_scale: float = 1.0,
        sampling: str = "headtail",
        backend: str = "auto",
        timeout: Optional[float] = DEFAULT_TIMEOUT_S,
    ) -> None:
        super().__init__(image_size, n_frms, mean, std, sampling, backend, timeout)
        self.scale = (float(min_scale), float(max_scale))
        self.ratio = (3.0 / 4.0, 4.0 / 3.0)

    def transform(self, clip: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """``(3, T, H, W)`` float 0..255 -> ``(3, T, size, size)`` normalised float."""
        x = random_resized_crop_video(clip.float(), self.image_size, self.scale, self.ratio, "bicubic", generator)
        x = to_uint8(cthw_to_thwc(x))  # no clamp: the original's quirk
        return normalize_video(uint8_thwc_to_float_cthw(x), self.mean, self.std)

    @classmethod
    def from_config(cls, cfg: Optional[DictConfig] = None) -> "AlproVideoTrainProcessor":
        return cls(**config_values(cls, cfg))


@registry.register_processor("alpro_video_eval")
class AlproVideoEvalProcessor(_AlproVideoBase):
    """Evaluation and chat clips: uniform sampling, decoder resize, CLIP normalisation."""

    config_schema = AlproVideoEvalConfig

    def __init__(
        self,
        image_size: int = 256,
        n_frms: int = MAX_INT,
        mean: Optional[List[float]] = None,
        std: Optional[List[float]] = None,
        sampling: str = "uniform",
        backend: str = "auto",
        timeout: Optional[float] = DEFAULT_TIMEOUT_S,
    ) -> None:
        super().__init__(image_size, n_frms, mean, std, sampling, backend, timeout)

    def transform(self, clip: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """``(3, T, H, W)`` float 0..255 -> ``(3, T, H, W)`` normalised float (no resize here)."""
        x = cthw_to_thwc(to_uint8(clip))
        return normalize_video(uint8_thwc_to_float_cthw(x), self.mean, self.std)

    @classmethod
    def from_config(cls, cfg: Optional[DictConfig] = None) -> "AlproVideoEvalProcessor":
        return cls(**config_values(cls, cfg))
