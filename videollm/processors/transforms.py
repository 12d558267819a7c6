"""Building blocks of the processors: video and image transforms in plain torch and PIL.

Written for this project without torchvision; they reproduce the behaviour of the transforms
the original Video-LLaMA builds from torchvision (facts from its ``processors`` package):

* :func:`random_resized_crop_params` is torchvision's ``RandomResizedCrop.get_params``
  algorithm (10 attempts with a uniform area scale and a log-uniform aspect ratio, then a
  centre-crop fallback) and draws from torch's RNG in the same order, so with the same seed it
  picks the same boxes;
* video tensors are ``(channels, frames, height, width)`` = ``(C, T, H, W)``; resizing a video
  is ``torch.nn.functional.interpolate`` over the last two axes (C plays the batch, T the
  channels), ``align_corners=False``, no antialiasing;
* :func:`to_uint8` casts WITHOUT clamping, like the original ``ToUint8``: bicubic overshoot
  below 0 or above 255 wraps around instead of saturating (a quirk kept on purpose).

Also here: :class:`BaseProcessor`, the base class of every registered processor.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

# CLIP's normalisation, used by every image and video processor of the original.
CLIP_MEAN: Tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: Tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


class BaseProcessor:
    """A callable that turns one raw item (a path, an image, a caption) into model input.

    Subclasses set ``config_schema`` (a dataclass of accepted config keys with defaults) and
    implement ``__call__``; :meth:`from_config` builds one from an OmegaConf node.
    """

    config_schema: Any = None

    def __call__(self, item: Any) -> Any:
        return item

    @classmethod
    def from_config(cls, cfg: Optional[DictConfig] = None) -> "BaseProcessor":
        return cls()

    def build(self, **kwargs: Any) -> "BaseProcessor":
        """Another processor of the same class from keyword options."""
        return self.from_config(OmegaConf.create(kwargs))


def config_values(cls: type, cfg: Optional[DictConfig]) -> dict:
    """``cfg`` completed with ``cls.config_schema``'s defaults, minus ``name`` (a plain dict)."""
    import dataclasses

    given = OmegaConf.to_container(cfg, resolve=True) if cfg is not None else {}
    out = {}
    for f in dataclasses.fields(cls.config_schema):
        if f.name == "name":
            continue
        if f.name in given:
            out[f.name] = given[f.name]
        elif f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        else:
            out[f.name] = f.default_factory()  # type: ignore[misc]
    return out


# ----------------------------------------------------------------------------------------
# Crop boxes
# ----------------------------------------------------------------------------------------


def random_resized_crop_params(
    height: int,
    width: int,
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0),
    generator: Optional[torch.Generator] = None,
) -> Tuple[int, int, int, int]:
    """A random crop box ``(top, left, crop_height, crop_width)`` inside ``height x width``.

    Up to 10 attempts: area fraction ~ U(scale), aspect ratio w/h ~ exp(U(log ratio)); the
    first box that fits is placed uniformly at random. Otherwise: the largest centred box whose
    aspect ratio is clamped into ``ratio``.
    """
    area = height * width
    log_lo, log_hi = torch.log(torch.tensor([float(ratio[0]), float(ratio[1])])).tolist()
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        # exp in float32, as torchvision computes it (rounding of w/h depends on it)
        aspect = torch.exp(torch.empty(1).uniform_(log_lo, log_hi, generator=generator)).item()
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,), generator=generator).item())
            left = int(torch.randint(0, width - w + 1, size=(1,), generator=generator).item())
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


# ----------------------------------------------------------------------------------------
# Video tensors (C, T, H, W)
# ----------------------------------------------------------------------------------------


def _check_video(clip: torch.Tensor, what: str) -> None:
    if not isinstance(clip, torch.Tensor) or clip.dim() != 4:
        shape = tuple(clip.shape) if isinstance(clip, torch.Tensor) else type(clip).__name__
        raise ValueError(f"{what}: expected a video tensor (C, T, H, W), got {shape}")


def resized_crop_video(
    clip: torch.Tensor, top: int, left: int, h: int, w: int, size: Tuple[int, int], mode: str = "bicubic"
) -> torch.Tensor:
    """Crop ``(C, T, H, W)`` to the box, then resize it to ``size = (out_h, out_w)`` (float)."""
    _check_video(clip, "resized_crop_video")
    crop = clip[..., top : top + h, left : left + w]
    return F.interpolate(crop, size=tuple(size), mode=mode, align_corners=False)


def random_resized_crop_video(
    clip: torch.Tensor,
    size: int,
    scale: Sequence[float] = (0.5, 1.0),
    ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0),
    mode: str = "bicubic",
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """One random box for all frames of ``(C, T, H, W)``, resized to ``(size, size)``."""
    _check_video(clip, "random_resized_crop_video")
    top, left, h, w = random_resized_crop_params(clip.shape[-2], clip.shape[-1], scale, ratio, generator)
    return resized_crop_video(clip, top, left, h, w, (size, size), mode)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Cast to uint8 WITHOUT clamping (the original's ``ToUint8``; out-of-range values wrap)."""
    return x.to(torch.uint8)


def cthw_to_thwc(clip: torch.Tensor) -> torch.Tensor:
    """``(C, T, H, W)`` -> ``(T, H, W, C)``."""
    return clip.permute(1, 2, 3, 0)


def uint8_thwc_to_float_cthw(clip: torch.Tensor) -> torch.Tensor:
    """uint8 ``(T, H, W, C)`` -> float ``(C, T, H, W)`` in [0, 1] (the original ``ToTensorVideo``)."""
    if clip.dtype != torch.uint8:
        raise TypeError(f"expected a uint8 video (T, H, W, C), got dtype {clip.dtype}")
    return clip.float().permute(3, 0, 1, 2) / 255.0


def normalize_video(clip: torch.Tensor, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> torch.Tensor:
    """``(clip - mean) / std`` per channel of ``(C, T, H, W)`` (returns a new tensor)."""
    _check_video(clip, "normalize_video")
    m = torch.as_tensor(mean, dtype=clip.dtype, device=clip.device)[:, None, None, None]
    s = torch.as_tensor(std, dtype=clip.dtype, device=clip.device)[:, None, None, None]
    return (clip - m) / s


# ----------------------------------------------------------------------------------------
# PIL images
# ----------------------------------------------------------------------------------------


def pil_resized_crop(image: Any, top: int, left: int, h: int, w: int, size: Tuple[int, int]) -> Any:
    """Crop a PIL image to the box, then resize to ``size = (out_h, out_w)`` with PIL bicubic."""
    from PIL import Image

    return image.crop((left, top, left + w, top + h)).resize((size[1], size[0]), Image.BICUBIC)


def pil_to_tensor(image: Any) -> torch.Tensor:
    """PIL RGB image -> float tensor ``(3, H, W)`` in [0, 1] (torchvision's ``ToTensor``)."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    arr = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(255)


def normalize_image(x: torch.Tensor, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> torch.Tensor:
    """``(x - mean) / std`` per channel of ``(C, H, W)``."""
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device)[:, None, None]
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device)[:, None, None]
    return (x - m) / s
