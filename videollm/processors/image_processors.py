"""Image processors: a PIL image (or an image file) in, a normalised ``(3, size, size)`` out.

``blip2_image_train`` and ``blip2_image_eval`` keep the original Video-LLaMA names and
behaviour (facts from its ``blip_processors.py``, which builds them from torchvision):

* train: random resized crop (area scale ``(min_scale, max_scale)``, ratio 3/4..4/3) resized to
  ``(size, size)`` with PIL bicubic, to a [0, 1] tensor, CLIP normalisation;
* eval: PIL bicubic resize straight to ``(size, size)`` (no aspect preservation, no crop,
  quirk A4), to a [0, 1] tensor, CLIP normalisation.

Images are later treated as 1-frame videos by the model; that is not done here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, List, Optional, Union

import torch
from omegaconf import DictConfig

from videollm.errors import ImageDecodeError
from videollm.processors.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    BaseProcessor,
    config_values,
    normalize_image,
    pil_resized_crop,
    pil_to_tensor,
    random_resized_crop_params,
)
from videollm.registry import registry

# The pixel limit of chat, demo and batch inference: the one training uses
# (videollm.datasets.bad_samples.DEFAULT_MAX_PIXELS, 3840 x 2160; a test keeps them equal).
# Not imported from there: processors sit below datasets in the import graph.
DEFAULT_MAX_PIXELS = 3840 * 2160

ImageInput = Union[str, "os.PathLike[str]", Any]  # a path or a PIL.Image.Image


def load_image(item: ImageInput, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS) -> Any:
    """A PIL image as RGB; paths are opened (ImageDecodeError naming the file on failure).

    ``max_pixels``: a file whose header declares more than ``width * height`` pixels is refused
    BEFORE its pixels are decoded (the limit training uses, :data:`DEFAULT_MAX_PIXELS`; None:
    no limit of ours, PIL's own decompression-bomb limit still applies and is reported the same
    way). Images given as PIL objects are already decoded and are not checked.
    """
    from PIL import Image, UnidentifiedImageError

    if isinstance(item, Image.Image):
        return item if item.mode == "RGB" else item.convert("RGB")
    if isinstance(item, (str, os.PathLike)):
        path = os.fspath(item)
        if not os.path.isfile(path):
            raise ImageDecodeError(f"{path}: no such file")
        try:
            img = Image.open(path)  # reads the header only
        except Image.DecompressionBombError as exc:
            # PIL refuses > 2 * Image.MAX_IMAGE_PIXELS at open(); its message gives the size.
            raise ImageDecodeError(f"{path}: image too large to decode ({exc})") from None
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise ImageDecodeError(f"{path}: not a readable image ({type(exc).__name__}: {exc})") from exc
        try:
            width, height = img.size
            if max_pixels is not None and width * height > max_pixels:
                raise ImageDecodeError(
                    f"{path}: image too large: {width}x{height} = {width * height} pixels, more than the "
                    f"{max_pixels} allowed (max_pixels)"
                )
            try:
                return img.convert("RGB")  # decodes the pixels
            except Image.DecompressionBombError as exc:
                raise ImageDecodeError(f"{path}: image too large to decode ({exc})") from None
            except (OSError, ValueError, SyntaxError, EOFError) as exc:  # truncated / corrupt data
                raise ImageDecodeError(f"{path}: not a readable image ({type(exc).__name__}: {exc})") from exc
        finally:
            img.close()
    raise ImageDecodeError(f"expected a PIL image or an image path, got {type(item).__name__}")


@dataclass
class Blip2ImageTrainConfig:
    """Keys of ``vis_processor.train`` for ``blip2_image_train``."""

    name: str = "blip2_image_train"
    image_size: int = 224
    mean: Optional[List[float]] = None
    std: Optional[List[float]] = None
    min_scale: float = 0.5
    max_scale: float = 1.0


@dataclass
class Blip2ImageEvalConfig:
    """Keys of ``vis_processor.eval`` for ``blip2_image_eval``."""

    name: str = "blip2_image_eval"
    image_size: int = 224
    mean: Optional[List[float]] = None
    std: Optional[List[float]] = None


class _Blip2ImageBase(BaseProcessor):
    def __init__(self, image_size: int, mean: Optional[List[float]], std: Optional[List[float]]) -> None:
        self.image_size = int(image_size)
        self.mean = tuple(mean) if mean is not None else CLIP_MEAN
        self.std = tuple(std) if std is not None else CLIP_STD

    def transform(self, image: Any, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, item: ImageInput, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """A PIL image or an image path -> ``(3, size, size)`` normalised float."""
        return self.transform(load_image(item), generator)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(image_size={self.image_size})"


@registry.register_processor("blip2_image_train")
class Blip2ImageTrainProcessor(_Blip2ImageBase):
    """Training images: random resized crop with PIL bicubic, CLIP normalisation."""

    config_schema = Blip2ImageTrainConfig

    def __init__(
        self,
        image_size: int = 224,
        mean: Optional[List[float]] = None,
        std: Optional[List[float]] = None,
        min_scale: float = 0.5,
        max_scale: float = 1.0,
    ) -> None:
        super().__init__(image_size, mean, std)
        self.scale = (float(min_scale), float(max_scale))
        self.ratio = (3.0 / 4.0, 4.0 / 3.0)

    def transform(self, image: Any, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """PIL RGB image -> ``(3, size, size)``."""
        top, left, h, w = random_resized_crop_params(image.height, image.width, self.scale, self.ratio, generator)
        crop = pil_resized_crop(image, top, left, h, w, (self.image_size, self.image_size))
        return normalize_image(pil_to_tensor(crop), self.mean, self.std)

    @classmethod
    def from_config(cls, cfg: Optional[DictConfig] = None) -> "Blip2ImageTrainProcessor":
        return cls(**config_values(cls, cfg))


@registry.register_processor("blip2_image_eval")
class Blip2ImageEvalProcessor(_Blip2ImageBase):
    """Evaluation and chat images: PIL bicubic squash to ``(size, size)``, CLIP normalisation."""

    config_schema = Blip2ImageEvalConfig

    def __init__(self, image_size: int = 224, mean: Optional[List[float]] = None, std: Optional[List[float]] = None) -> None:
        super().__init__(image_size, mean, std)

    def transform(self, image: Any, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """PIL RGB image -> ``(3, size, size)`` (deterministic)."""
        from PIL import Image

        resized = image.resize((self.image_size, self.image_size), Image.BICUBIC)
        return normalize_image(pil_to_tensor(resized), self.mean, self.std)

    @classmethod
    def from_config(cls, cfg: Optional[DictConfig] = None) -> "Blip2ImageEvalProcessor":
        return cls(**config_values(cls, cfg))
