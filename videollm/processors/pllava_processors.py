"""PLLaVA's media processing: frame sampling, PllavaProcessor's resize rules, the CLIP image
processor and the training transform of the original's 7B/13B scripts (torch + PIL, no torchvision).

Facts reproduced (magic-research/PLLaVA):

* **Chat / demo / eval sampling** (``ChatPllava.get_index``, ``EvalDataset.get_index``): 16 frames,
  the middle of each of 16 equal segments of ``vlen - 1`` frames:
  ``int(seg / 2) + int(round(seg * k))`` with ``seg = (vlen - 1) / n`` (:func:`chat_frame_indices`).
* **Training sampling** (``dataset/video_utils.get_frame_indices``): ``linspace(0, vlen, n + 1)``
  interval edges, segment ``k`` = ``[edge_k, edge_{k+1} - 1]``; ``rand`` draws
  ``random.choice(range(a, b))`` (so the segment's last frame is never drawn) and falls back to
  sorted ``permutation(vlen)[:n]`` when a segment is empty; ``middle`` takes ``(a + b) // 2``;
  short videos are padded with their last index (:func:`dataset_frame_indices`).
* **PllavaProcessor.resize_crop_longshort** (:func:`resize_crop_longshort`): one output size for
  a batch of videos: short side = the largest short side, capped so that the long side stays within
  640 at the aspect ratio of the squarest video, and at least the CLIP resolution; every frame is
  resized (PIL bicubic) to that short side, then the long side is sliced to the common length.
  Quirk kept: the slice starts at ``((long - target) // 2) // 2`` (the overhead is halved twice), so
  it is not centred.
* **CLIPImageProcessor** (:func:`clip_preprocess`): resize the shortest edge to 336 (bicubic, PIL),
  centre crop 336, ``/255``, OpenAI CLIP mean/std.
* **Training transform** of the 7B/13B scripts (``clip_transform=False``;
  :class:`PllavaVideoTrainProcessor`): RandomResizedCrop(336, scale 0.5-1, bicubic) with one box for
  all frames, a horizontal flip of the whole clip with probability 0.5, ``/255`` and **ImageNet**
  mean/std (the dataset picks them because ``vision_encoder.name = "vit_l14"`` matches its ``vit``
  branch). ``normalize: clip`` switches to the CLIP statistics the tower was trained with.

Clips are ``(3, T, H, W)`` float tensors in 0..255 in and ``(3, T, S, S)`` normalised floats out.
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from omegaconf import DictConfig

from videollm.errors import ConfigError, VideoDecodeError
from videollm.processors.transforms import config_values, random_resized_crop_video
from videollm.registry import registry

logger = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMALIZATIONS = {"clip": (CLIP_MEAN, CLIP_STD), "imagenet": (IMAGENET_MEAN, IMAGENET_STD)}
LONG_SIDE_CAP = 640  # resize_crop_longshort's hard-coded cap of the long side
SAMPLINGS = ("chat_middle", "rand", "middle")


# ----------------------------------------------------------------------------------------------
# Frame indices
# ----------------------------------------------------------------------------------------------


def chat_frame_indices(vlen: int, n: int) -> List[int]:
    """The demo's and evaluation's sampling: the middle of each of ``n`` segments (may repeat)."""
    seg = float(vlen - 1) / n
    start = int(seg / 2)
    return [start + int(np.round(seg * k)) for k in range(n)]


def dataset_frame_indices(vlen: int, n: int, sample: str = "rand", rng: Optional[random.Random] = None) -> List[int]:
    """The training datasets' ``rand`` / ``middle`` sampling (``get_frame_indices``), ``n`` indices."""
    acc = min(n, vlen)
    edges = np.linspace(start=0, stop=vlen, num=acc + 1).astype(int)
    ranges = [(int(edges[i]), int(edges[i + 1]) - 1) for i in range(acc)]
    if sample == "rand":
        r = rng or random
        try:
            indices = [r.choice(range(a, b)) for a, b in ranges]
        except IndexError:  # an empty segment: the original's fallback
            indices = sorted(np.random.permutation(vlen)[:acc].tolist())
    elif sample == "middle":
        indices = [(a + b) // 2 for a, b in ranges]
    else:
        raise ConfigError(f"PLLaVA dataset sampling {sample!r}: use 'rand' or 'middle'")
    if len(indices) < n:  # padded with the last frame
        indices = indices + [indices[-1]] * (n - len(indices))
    return indices


def frame_indices(vlen: int, n: int, sampling: str, rng: Optional[random.Random] = None) -> List[int]:
    if sampling == "chat_middle":
        return chat_frame_indices(vlen, n)
    if sampling in ("rand", "middle"):
        return dataset_frame_indices(vlen, n, sampling, rng)
    raise ConfigError(f"PLLaVA sampling {sampling!r}: unknown; use one of {SAMPLINGS}")


def load_frames(path: Union[str, os.PathLike], n: int, sampling: str = "chat_middle", *, backend: str = "auto",
                timeout: Optional[float] = 30.0, rng: Optional[random.Random] = None,
                clip: Optional[Tuple[float, float]] = None) -> Tuple[np.ndarray, List[int], float]:
    """Decode ``n`` frames at full resolution: uint8 ``(n, H, W, 3)``, the indices, the fps.

    ``clip``: ``(start, end)`` seconds; frames are sampled in ``[round(start * fps), round(end * fps)]``
    only (the records' optional ``start``/``end``).

    Uses the project's decoder backends (:mod:`videollm.processors.video_loader`); a file that
    cannot be read raises :class:`VideoDecodeError` naming it.
    """
    from videollm.processors.video_loader import get_backend, run_with_timeout

    name = os.fspath(path)
    if not os.path.isfile(name):
        raise VideoDecodeError(f"{name}: no such file")

    def work() -> Tuple[np.ndarray, List[int], float]:
        impl = get_backend(backend, resize=False)
        try:
            reader = impl.open(name, height=-1, width=-1, threads=0)
        except VideoDecodeError:
            raise
        except Exception as exc:
            raise VideoDecodeError(f"{name}: cannot open the video ({exc}) [backend {impl.name}]") from exc
        try:
            vlen = reader.num_frames
            if vlen <= 0:
                raise VideoDecodeError(f"{name}: the video stream has no frames")
            first = 0
            if clip is not None:
                first = max(0, min(int(round(clip[0] * reader.fps)), vlen - 1))
                last = max(first + 1, min(int(round(clip[1] * reader.fps)), vlen))
                vlen = last - first
            indices = [first + i for i in frame_indices(vlen, n, sampling, rng)]
            unique = sorted(set(indices))
            try:
                frames = reader.get_frames(unique)
            except VideoDecodeError:
                raise
            except Exception as exc:
                raise VideoDecodeError(f"{name}: decoding frames failed: {exc} [backend {impl.name}]") from exc
            pos = {idx: i for i, idx in enumerate(unique)}
            return np.asarray(frames)[[pos[i] for i in indices]], indices, float(reader.fps)
        finally:
            try:
                reader.close()
            except Exception:
                pass

    return run_with_timeout(work, timeout, name)


def _load_frames_child(path: str, n: int, sampling: str, backend: str) -> Tuple[np.ndarray, List[int], float]:
    """:func:`load_frames` in a child process (the parent enforces the timeout by killing it)."""
    return load_frames(path, n, sampling, backend=backend, timeout=None)


# ----------------------------------------------------------------------------------------------
# PllavaProcessor + CLIPImageProcessor
# ----------------------------------------------------------------------------------------------


def resize_output_size(height: int, width: int, size: int, max_size: Optional[int] = None) -> Tuple[int, int]:
    """transformers' ``get_resize_output_image_size`` for an int size without square default: (h, w)."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    if max_size is not None and new_long > max_size:
        new_short, new_long = int(max_size * new_short / new_long), max_size
    return (new_long, new_short) if width <= height else (new_short, new_long)


def _pil_resize(frame: np.ndarray, hw: Tuple[int, int]) -> np.ndarray:
    from PIL import Image

    if tuple(frame.shape[:2]) == tuple(hw):
        return frame
    return np.asarray(Image.fromarray(frame).resize((hw[1], hw[0]), resample=Image.BICUBIC))


def resize_crop_longshort(videos: Sequence[np.ndarray], clip_resolution: int = 336,
                          long_side_cap: int = LONG_SIDE_CAP) -> List[np.ndarray]:
    """PllavaProcessor's common size for a batch: uint8 ``(T, H, W, 3)`` videos -> same-size videos."""
    sizes = [tuple(v.shape[1:3]) for v in videos]
    rates = [max(s) / min(s) for s in sizes]
    min_rate = min(rates)
    out_size = sizes[rates.index(min_rate)]
    out_short = max(min(s) for s in sizes)
    longest = min(long_side_cap, max(max(s) for s in sizes))
    out_short = min(out_short, int(longest / min_rate))
    out_short = max(out_short, clip_resolution)
    if out_size[0] > out_size[1]:
        out_size = (int(out_short * min_rate), out_short)
    else:
        out_size = (out_short, int(out_short * min_rate))
    out = []
    for video in videos:
        h, w = video.shape[1:3]
        hw = resize_output_size(h, w, out_short, max_size=9999)
        if min(hw) < clip_resolution:
            hw = resize_output_size(h, w, out_short)
        frames = np.stack([_pil_resize(f, hw) for f in video])
        overhead = (max(hw) - max(out_size)) // 2
        start = overhead // 2  # the original halves the overhead twice (not centred)
        end = start + max(out_size)
        frames = frames[:, start:end] if hw[0] > hw[1] else frames[:, :, start:end]
        out.append(frames)
    return out


def clip_preprocess(frames: np.ndarray, size: int = 336, crop: Optional[int] = None,
                    mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> torch.Tensor:
    """CLIPImageProcessor: uint8 ``(T, H, W, 3)`` -> float ``(T, 3, crop, crop)``."""
    crop = size if crop is None else crop
    out = []
    for f in frames:
        f = _pil_resize(f, resize_output_size(f.shape[0], f.shape[1], size))
        top, left = (f.shape[0] - crop) // 2, (f.shape[1] - crop) // 2
        if top < 0 or left < 0:  # transformers pads a too-small image; never reached after the resize
            raise ValueError(f"clip_preprocess: frame {f.shape[:2]} smaller than the crop {crop}")
        out.append(f[top:top + crop, left:left + crop])
    x = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() * (1 / 255)
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return (x - m) / s


def to_uint8_thwc(clip: torch.Tensor) -> np.ndarray:
    """``(3, T, H, W)`` 0..255 float -> uint8 ``(T, H, W, 3)``."""
    return clip.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 3, 0).contiguous().numpy()


# ----------------------------------------------------------------------------------------------
# Registered processors
# ----------------------------------------------------------------------------------------------


@dataclass
class PllavaVideoEvalConfig:
    name: str = "pllava_video_eval"
    image_size: int = 336
    n_frms: int = 16
    sampling: str = "chat_middle"
    long_side_cap: int = LONG_SIDE_CAP
    normalize: str = "clip"
    backend: str = "auto"
    timeout: Optional[float] = 30.0


@registry.register_processor("pllava_video_eval")
class PllavaVideoEvalProcessor:
    """Inference clips: PllavaProcessor's resize then CLIPImageProcessor (CLIP mean/std)."""

    config_schema = PllavaVideoEvalConfig

    def __init__(self, image_size: int = 336, n_frms: int = 16, sampling: str = "chat_middle",
                 long_side_cap: int = LONG_SIDE_CAP, normalize: str = "clip", backend: str = "auto",
                 timeout: Optional[float] = 30.0) -> None:
        if normalize not in NORMALIZATIONS:
            raise ConfigError(f"pllava_video_eval.normalize: {normalize!r}; use one of {sorted(NORMALIZATIONS)}")
        frame_indices(16, 4, sampling)  # validates the name
        self.image_size, self.n_frms, self.sampling = int(image_size), int(n_frms), sampling
        self.long_side_cap = int(long_side_cap)
        self.mean, self.std = NORMALIZATIONS[normalize]
        self.backend, self.timeout = backend, timeout

    def transform_batch(self, clips: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """Several ``(3, T, H, W)`` 0..255 clips -> ``(3, T, S, S)`` each, sized together."""
        videos = resize_crop_longshort([to_uint8_thwc(c) for c in clips], self.image_size, self.long_side_cap)
        return [clip_preprocess(v, self.image_size, self.image_size, self.mean, self.std).permute(1, 0, 2, 3)
                for v in videos]

    def transform(self, clip: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        return self.transform_batch([clip])[0]

    def transform_image(self, image: np.ndarray) -> torch.Tensor:
        """uint8 ``(H, W, 3)`` -> ``(3, S, S)`` (a one-frame video through the same rules)."""
        video = resize_crop_longshort([image[None]], self.image_size, self.long_side_cap)[0]
        return clip_preprocess(video, self.image_size, self.image_size, self.mean, self.std)[0]

    def load(self, path: Union[str, os.PathLike], rng: Optional[random.Random] = None,
             isolate: bool = False) -> Tuple[torch.Tensor, List[int], float]:
        """A video file -> ``(3, T, H, W)`` 0..255 frames (full resolution), indices, fps.
        ``isolate``: decode in a child process killed at the timeout (untrusted uploads)."""
        if isolate:
            from videollm.processors.video_loader import run_isolated

            frames, indices, fps = run_isolated(_load_frames_child, os.fspath(path), self.n_frms, self.sampling,
                                                self.backend, timeout=self.timeout, what=os.fspath(path))
        else:
            frames, indices, fps = load_frames(path, self.n_frms, self.sampling, backend=self.backend,
                                               timeout=self.timeout, rng=rng)
        return torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2).float(), indices, fps

    def __call__(self, item: Any) -> torch.Tensor:
        clip = item if isinstance(item, torch.Tensor) else self.load(item)[0]
        return self.transform(clip)

    @classmethod
    def from_config(cls, cfg: Optional[DictConfig] = None) -> "PllavaVideoEvalProcessor":
        return cls(**config_values(cls, cfg))


@dataclass
class PllavaVideoTrainConfig:
    name: str = "pllava_video_train"
    image_size: int = 336
    n_frms: int = 16
    sampling: str = "rand"
    min_scale: float = 0.5
    max_scale: float = 1.0
    hflip: bool = True
    normalize: str = "imagenet"  # the 7B/13B scripts' quirk; "clip" = the tower's own statistics
    backend: str = "auto"
    timeout: Optional[float] = 30.0


@registry.register_processor("pllava_video_train")
class PllavaVideoTrainProcessor:
    """Training clips of the 7B/13B scripts: random resized crop, flip, ImageNet mean/std."""

    config_schema = PllavaVideoTrainConfig

    def __init__(self, image_size: int = 336, n_frms: int = 16, sampling: str = "rand", min_scale: float = 0.5,
                 max_scale: float = 1.0, hflip: bool = True, normalize: str = "imagenet", backend: str = "auto",
                 timeout: Optional[float] = 30.0) -> None:
        if normalize not in NORMALIZATIONS:
            raise ConfigError(f"pllava_video_train.normalize: {normalize!r}; use one of {sorted(NORMALIZATIONS)}")
        frame_indices(16, 4, sampling)
        self.image_size, self.n_frms, self.sampling = int(image_size), int(n_frms), sampling
        self.scale = (float(min_scale), float(max_scale))
        self.ratio = (3.0 / 4.0, 4.0 / 3.0)
        self.hflip = bool(hflip)
        self.mean, self.std = NORMALIZATIONS[normalize]
        self.backend, self.timeout = backend, timeout

    def transform(self, clip: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """``(3, T, H, W)`` 0..255 -> ``(3, T, S, S)``: crop (uint8 result, as torchvision on uint8
        tensors), flip, ``/255``, normalise."""
        x = random_resized_crop_video(clip.float(), self.image_size, self.scale, self.ratio, "bicubic", generator)
        x = x.round().clamp(0, 255)
        flip = torch.rand(1, generator=generator).item() < 0.5
        if self.hflip and flip:
            x = x.flip(-1)
        x = x / 255.0
        m = torch.tensor(self.mean).view(3, 1, 1, 1)
        s = torch.tensor(self.std).view(3, 1, 1, 1)
        return (x - m) / s

    def load(self, path: Union[str, os.PathLike], rng: Optional[random.Random] = None) -> Tuple[torch.Tensor, List[int], float]:
        frames, indices, fps = load_frames(path, self.n_frms, self.sampling, backend=self.backend,
                                           timeout=self.timeout, rng=rng)
        return torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2).float(), indices, fps

    def __call__(self, item: Any) -> torch.Tensor:
        clip = item if isinstance(item, torch.Tensor) else self.load(item)[0]
        return self.transform(clip)

    @classmethod
    def from_config(cls, cfg: Optional[DictConfig] = None) -> "PllavaVideoTrainProcessor":
        return cls(**config_values(cls, cfg))
