"""Video captioning benchmarks: MSR-VTT and MSVD captions, scored with BLEU-4, ROUGE-L and CIDEr."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Dict, List

from videollm.benchmarks.base import (
    Benchmark,
    PromptStyle,
    Sample,
    find_video,
    need,
    read_json,
    read_json_or_jsonl,
    register_benchmark,
)
from videollm.errors import DataError


@register_benchmark("msrvtt_caption", "MSR-VTT captions: test_videodatainfo.json + videos/<video_id>.mp4")
def load_msrvtt_caption(root: Path, split: str = "test", annotation: str = "test_videodatainfo.json") -> Benchmark:
    """MSR-VTT: ``test_videodatainfo.json`` ``{"videos": [{"video_id": "video7010", "split",
    ...}], "sentences": [{"caption", "video_id", "sen_id"}]}``, clips ``videos/<video_id>.mp4``
    (``TestVideo/`` also looked in)."""
    path = root / annotation
    data = read_json(path, "MSR-VTT annotations")
    if not isinstance(data, dict) or "videos" not in data or "sentences" not in data:
        raise DataError(f"{path}: expected {{'videos': [...], 'sentences': [...]}}")
    refs: Dict[str, List[str]] = defaultdict(list)
    for i, s in enumerate(data["sentences"]):
        need(s, ("caption", "video_id"), f"{path}: sentences[{i}]")
        refs[str(s["video_id"])].append(str(s["caption"]).strip())
    video_dir = next((root / d for d in ("videos", "TestVideo", "videos/all") if (root / d).is_dir()), root / "videos")
    samples: List[Sample] = []
    for i, v in enumerate(data["videos"]):
        need(v, ("video_id",), f"{path}: videos[{i}]")
        if split and v.get("split", split) != split:
            continue
        vid = str(v["video_id"])
        if not refs.get(vid):
            raise DataError(f"{path}: video {vid} has no caption in 'sentences'")
        samples.append(Sample(id=vid, video=str(find_video(video_dir, vid)), references=refs[vid]))
    return Benchmark("msrvtt_caption", "caption", samples, PromptStyle("caption"), str(root), ("category",))


@register_benchmark("caption_jsonl", "Any captioning set as JSON lines {video, captions}")
def load_caption_jsonl(root: Path, annotation: str = "captions.jsonl") -> Benchmark:
    """A plain caption set: ``captions.jsonl`` lines ``{"id"?, "video": path relative to the
    root, "captions": [references]}`` (e.g. MSVD's captions converted once)."""
    path = root / annotation
    samples: List[Sample] = []
    for i, e in enumerate(read_json_or_jsonl(path, "caption annotations")):
        need(e, ("video", "captions"), f"{path}: entry {i}")
        caps = [str(c) for c in e["captions"]] if isinstance(e["captions"], list) else [str(e["captions"])]
        samples.append(Sample(id=str(e.get("id", e["video"])), video=str(find_video(root, str(e["video"]))), references=caps))
    return Benchmark("caption_jsonl", "caption", samples, PromptStyle("caption"), str(root), ("category",))


__all__ = ["load_caption_jsonl", "load_msrvtt_caption"]
