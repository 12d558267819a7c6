"""The CLIP image processor (torch + PIL, no torchvision) and 1-fps frame sampling.

LLaMA-VID (and LLaVA) preprocess every image and every video frame with transformers'
``CLIPImageProcessor`` read from ``clip-patch14-224`` / ``-336``: resize the SHORTEST side to
``size`` with PIL bicubic (the other side ``int(size * long / short)``), center crop ``size`` x
``size`` (top/left offsets ``(h - size) // 2``), ``x / 255`` (computed in float64, stored as
float32), then ``(x - mean) / std`` with OpenAI CLIP's mean and std. :class:`CLIPImageProcessor`
does the same with PIL and torch.

``expand2square``: LLaVA's ``image_aspect_ratio: pad``: the image is pasted centred on a square
canvas of its longer side, filled with the mean colour ``tuple(int(m * 255) for m in mean)`` =
(122, 116, 104).

:func:`fps_indices`: LLaMA-VID's video sampling: ``step = round(avg_fps / fps)``, frames
``0, step, 2 * step, ...`` to the end, every sampled frame kept (no cap).
"""

from __future__ import annotations

from typing import Any, List, Sequence, Tuple

import numpy as np
import torch

CLIP_MEAN: Tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: Tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


def fps_indices(num_frames: int, avg_fps: float, fps: float = 1.0) -> List[int]:
    """Frame indices of LLaMA-VID's sampling: every ``round(avg_fps / fps)``-th frame from 0.

    A stream whose rate rounds to 0 frames per step (avg_fps < fps / 2) keeps every frame.
    """
    step = max(1, int(round(avg_fps / fps))) if avg_fps > 0 else 1
    return list(range(0, int(num_frames), step))


def expand2square(image: Any, background: Sequence[int]) -> Any:
    """A PIL image padded to a square of its longer side, centred, filled with ``background``."""
    from PIL import Image

    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), tuple(int(c) for c in background))
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


class CLIPImageProcessor:
    """Resize (shortest side, bicubic) -> center crop -> /255 -> normalize.

    ``__call__(images)``: a PIL image, or a uint8 array (H, W, 3) / (T, H, W, 3) -> float32
    tensor (3, S, S) for one image or (T, 3, S, S) for frames.
    """

    def __init__(self, size: int = 224, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> None:
        self.size = int(size)
        self.image_mean = tuple(float(m) for m in mean)
        self.image_std = tuple(float(s) for s in std)

    @property
    def background(self) -> Tuple[int, int, int]:
        """The padding colour of ``image_aspect_ratio: pad``."""
        return tuple(int(m * 255) for m in self.image_mean)  # type: ignore[return-value]

    def _one(self, image: Any) -> torch.Tensor:
        from PIL import Image

        if not isinstance(image, Image.Image):
            image = Image.fromarray(np.asarray(image, dtype=np.uint8))
        if image.mode != "RGB":
            image = image.convert("RGB")
        width, height = image.size
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.size, int(self.size * long / short)
        new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
        if (new_w, new_h) != (width, height):
            image = image.resize((new_w, new_h), Image.BICUBIC)
        top, left = (new_h - self.size) // 2, (new_w - self.size) // 2
        image = image.crop((left, top, left + self.size, top + self.size))
        x = (np.asarray(image, dtype=np.float64) * (1 / 255)).astype(np.float32)
        mean = np.asarray(self.image_mean, dtype=np.float32)
        std = np.asarray(self.image_std, dtype=np.float32)
        x = (x - mean) / std
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))

    def __call__(self, images: Any) -> torch.Tensor:
        if isinstance(images, np.ndarray) and images.ndim == 4:
            return torch.stack([self._one(f) for f in images])
        if isinstance(images, (list, tuple)):
            return torch.stack([self._one(f) for f in images])
        return self._one(images)
