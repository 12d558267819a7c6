"""LLaMA-VID's long-video feature files: reading, writing, subtitles and the movie prompt.

A feature file (``.pkl``, the layout of LLaMA-VID's ``extract_video_features_subtitles.py`` and
``extract_movienet_features.py``) is a pickled dict:

* ``feats``: float16 array (N_frames, 1 + P, D) of EVA ViT-g outputs per frame (CLS included:
  (N, 257, 1408) at 224 px), frames sampled at 1 fps;
* ``inputs``: a string made of, for each frame, ``<image>`` followed by that frame's subtitle
  lines joined by spaces (:func:`interleave_subtitles`).

Reading never runs pickled code: :class:`_NumpyUnpickler` allows only the numpy globals that an
array needs, and a file that references anything else is refused with the names it needs.

The movie prompt of ``run_llamavid_movie.py``: :data:`MOVIE_START` + ``inputs`` (each ``<image>``
repeated ``video_token`` times) + :data:`MOVIE_END` + ``"\\n"`` + question; the Q-Former prompt is
the question alone.
"""

from __future__ import annotations

import datetime
import io
import os
import pickle
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

from videollm.errors import DataError

IMAGE_TOKEN = "<image>"
MOVIE_START = "Below is a movie. Memorize the content and answer my question after watching this movie."
MOVIE_END = "Now the movie end."

# numpy globals an ndarray pickle needs (numpy 1.x and 2.x module names).
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _NumpyUnpickler(pickle.Unpickler):
    """Unpickles dicts, strings, numbers and numpy arrays only."""

    def __init__(self, file: Any, path: str) -> None:
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise DataError(f"{self.path}: refused: the feature file needs {module}.{name} to unpickle, which could "
                        "run arbitrary code (a feature file holds only a numpy array and a string)")


def read_feature_file(path: str | os.PathLike) -> Tuple[np.ndarray, str]:
    """``(feats (N, T, D) float16, inputs)`` of a feature file; errors name the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"{path}: feature file not found")
    try:
        with open(path, "rb") as f:
            obj = _NumpyUnpickler(io.BufferedReader(f), path).load()
    except DataError:
        raise
    except Exception as exc:  # truncated or not a pickle: many exception types
        raise DataError(f"{path}: not a readable feature file ({type(exc).__name__}: {exc})") from None
    if not isinstance(obj, dict) or "feats" not in obj or "inputs" not in obj:
        keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise DataError(f"{path}: a feature file is a dict with 'feats' and 'inputs'; found {keys}")
    feats, inputs = obj["feats"], obj["inputs"]
    if not isinstance(feats, np.ndarray) or feats.ndim != 3:
        raise DataError(f"{path}: 'feats' must be an array (frames, tokens, width), got "
                        f"{getattr(feats, 'shape', type(feats).__name__)}")
    if not isinstance(inputs, str):
        raise DataError(f"{path}: 'inputs' must be a string, got {type(inputs).__name__}")
    n = inputs.count(IMAGE_TOKEN)
    if n != feats.shape[0]:
        raise DataError(f"{path}: 'inputs' holds {n} {IMAGE_TOKEN} but 'feats' has {feats.shape[0]} frames; "
                        "they must agree (one <image> per frame)")
    return feats, inputs


def write_feature_file(path: str | os.PathLike, feats: np.ndarray, inputs: str) -> None:
    """Write ``{"feats": float16 (N, T, D), "inputs": str}`` atomically, as the original's pickle."""
    from videollm.checkpoint import atomic_path

    feats = np.asarray(feats).astype(np.float16)
    if feats.ndim != 3 or inputs.count(IMAGE_TOKEN) != feats.shape[0]:
        raise DataError(f"{os.fspath(path)}: feats {feats.shape} and {inputs.count(IMAGE_TOKEN)} {IMAGE_TOKEN} in "
                        "inputs do not describe the same frames")
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            pickle.dump({"feats": feats, "inputs": inputs}, f)


def _seconds(stamp: str, path: str) -> float:
    try:
        t = datetime.datetime.strptime(stamp.strip(), "%H:%M:%S,%f")
    except ValueError:
        raise DataError(f"{path}: subtitle time {stamp.strip()!r} is not HH:MM:SS,mmm") from None
    return (t - datetime.datetime(1900, 1, 1)).total_seconds()


def parse_srt(path: str | os.PathLike) -> List[Dict[str, Any]]:
    """Subtitles of an ``.srt`` file as ``[{"start_time", "end_time", "text"}]`` (seconds).

    The rules of ``extract_movienet_features.py``: NUL characters and ``...`` removed, blank lines
    skipped, a line of digits closes the previous entry, ``A --> B`` sets its times, other lines
    join its text with spaces; entries without text or times are dropped.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"{path}: subtitle file not found")
    with open(path, "r", encoding="utf-8", errors="ignore") as f:
        lines = f.readlines()
    subtitles: List[Dict[str, Any]] = []
    current: Dict[str, Any] = {}

    def complete(s: Dict[str, Any]) -> bool:
        return all(s.get(k) is not None for k in ("text", "start_time", "end_time"))

    for line in lines:
        line = line.replace("\x00", "").strip().replace("...", "").strip()
        if not line:
            continue
        if line.isdigit():
            if complete(current):
                subtitles.append(current)
                current = {}
        elif " --> " in line:
            start, end = line.split(" --> ")[:2]
            current["start_time"] = _seconds(start, path)
            current["end_time"] = _seconds(end, path)
        else:
            current["text"] = current["text"] + " " + line if current.get("text") else line
    if complete(current):
        subtitles.append(current)
    return subtitles


def interleave_subtitles(subtitles: Sequence[Dict[str, Any]], frame_times: Sequence[float]) -> str:
    """``<image>`` per frame, each followed by its subtitles joined by spaces.

    A subtitle goes to the last frame before its end time, as the original's
    ``load_video_input``; one that ends before the first frame lands on the LAST frame (the
    original's index -1, kept).
    """
    point = 0
    texts: List[List[str]] = [[] for _ in frame_times]
    if not texts:
        return ""
    for item in subtitles:
        while point < len(frame_times) and frame_times[point] < item["end_time"]:
            point += 1
        texts[point - 1].append(item["text"])
    return "".join(IMAGE_TOKEN + " ".join(t) for t in texts)


def expand_image_tokens(inputs: str, video_token: int) -> str:
    """Each ``<image>`` repeated ``video_token`` times (one placeholder per visual token)."""
    return inputs.replace(IMAGE_TOKEN, IMAGE_TOKEN * int(video_token))


def movie_block(inputs: str, video_token: int = 2) -> str:
    """The movie part of ``run_llamavid_movie.py``'s user message (the question follows after ``\\n``)."""
    return MOVIE_START + expand_image_tokens(inputs, video_token) + MOVIE_END + "\n"


def extract_feature_file(video: str, out_path: str, vit: Any, image_size: int, *, srt: str | None = None,
                         fps: float = 1.0, batch: int = 48, device: str = "cpu", timeout: float | None = 600.0) -> Dict[str, Any]:
    """Write the feature file of ``video`` (``extract_video_features_subtitles.py`` with a
    user-given ``.srt`` instead of Whisper): frames at ``fps`` (step ``round(avg_fps / fps)``),
    the CLIP processor, pixels rounded to fp16 as the original's ``.half()``, EVA ViT-g ``vit``
    (batches of ``batch`` frames), outputs stored as float16 (N, 1 + P, D); ``inputs`` from the
    subtitles (none: ``<image>`` per frame). Returns a summary dict."""
    import torch

    from videollm.models.llama_vid import load_video_fps
    from videollm.processors.clip_image import CLIPImageProcessor

    frames, times = load_video_fps(video, fps, timeout=timeout)
    pixels = CLIPImageProcessor(image_size)(frames).half()
    dtype = next(vit.parameters()).dtype
    outs = []
    with torch.no_grad():
        for i in range(0, len(pixels), batch):
            outs.append(vit(pixels[i: i + batch].to(device, dtype)).float().cpu())
    feats = torch.cat(outs).numpy().astype(np.float16)
    subs = parse_srt(srt) if srt else []
    inputs = interleave_subtitles(subs, times)
    write_feature_file(out_path, feats, inputs)
    return {"frames": int(feats.shape[0]), "shape": list(feats.shape), "subtitles": len(subs), "path": str(out_path)}
