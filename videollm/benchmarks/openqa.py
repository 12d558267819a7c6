"""Open-ended video QA in their published layouts: MSVD-QA, MSRVTT-QA, ActivityNet-QA, TGIF-QA.

Scored two ways (:mod:`videollm.benchmarks.metrics`, :mod:`videollm.benchmarks.judge`): a
judge-free exact / contains match, always; and, with ``--judge-url``, the Video-ChatGPT protocol
(an LLM says yes/no and a 0-5 score).
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Dict, List

from videollm.benchmarks.base import (
    Benchmark,
    PromptStyle,
    Sample,
    find_video,
    need,
    read_json_or_jsonl,
    register_benchmark,
)
from videollm.errors import DataError

logger = logging.getLogger(__name__)


def question_word(question: str) -> str:
    """MSVD-QA / MSRVTT-QA report accuracy per question word (what, who, how, when, where)."""
    words = question.strip().lower().split()
    return words[0] if words and words[0] in ("what", "who", "how", "when", "where", "which", "why") else "other"


def _msvd_mapping(root: Path) -> Dict[str, str]:
    """youtube_mapping.txt: lines ``<youtube clip name> vid<N>`` -> {"vid<N>": clip name}."""
    path = root / "youtube_mapping.txt"
    if not path.is_file():
        return {}
    out: Dict[str, str] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2:
            raise DataError(f"{path}:{n}: expected '<clip name> vid<N>', got {line!r}")
        out[parts[1]] = parts[0]
    return out


@register_benchmark("msvd_qa", "MSVD-QA: test_qa.json + youtube_mapping.txt + YouTubeClips/")
def load_msvd_qa(root: Path, split: str = "test") -> Benchmark:
    """MSVD-QA: ``<split>_qa.json`` ``[{"answer", "id", "question", "video_id"}]`` (``video_id``
    an integer N), ``youtube_mapping.txt`` (``<clip name> vid<N>``), clips
    ``YouTubeClips/<clip name>.avi`` (any video extension; ``videos/`` also looked in)."""
    path = root / f"{split}_qa.json"
    mapping = _msvd_mapping(root)
    video_dir = next((root / d for d in ("YouTubeClips", "videos") if (root / d).is_dir()), root / "YouTubeClips")
    samples: List[Sample] = []
    for i, e in enumerate(read_json_or_jsonl(path, "MSVD-QA questions")):
        need(e, ("answer", "id", "question", "video_id"), f"{path}: entry {i}")
        vid = f"vid{e['video_id']}"
        if mapping and vid not in mapping:
            raise DataError(f"{path}: entry {i}: {vid} not in youtube_mapping.txt")
        video = find_video(video_dir, mapping.get(vid, vid))
        samples.append(Sample(id=str(e["id"]), video=str(video), question=str(e["question"]).strip(),
                              answer=str(e["answer"]).strip(), category=question_word(str(e["question"]))))
    return Benchmark("msvd_qa", "open", samples, PromptStyle("open"), str(root), ("category",))


@register_benchmark("msrvtt_qa", "MSRVTT-QA: test_qa.json + videos/video<N>.mp4")
def load_msrvtt_qa(root: Path, split: str = "test") -> Benchmark:
    """MSRVTT-QA: ``<split>_qa.json`` ``[{"answer", "category_id", "id", "question",
    "video_id"}]``, clips ``videos/video<video_id>.mp4`` (``TestVideo/`` or ``videos/all/`` also)."""
    path = root / f"{split}_qa.json"
    video_dir = next((root / d for d in ("videos/all", "videos", "TestVideo") if (root / d).is_dir()), root / "videos")
    samples: List[Sample] = []
    for i, e in enumerate(read_json_or_jsonl(path, "MSRVTT-QA questions")):
        need(e, ("answer", "id", "question", "video_id"), f"{path}: entry {i}")
        vid = str(e["video_id"])
        vid = vid if vid.startswith("video") else f"video{vid}"
        samples.append(Sample(id=str(e["id"]), video=str(find_video(video_dir, vid)), question=str(e["question"]).strip(),
                              answer=str(e["answer"]).strip(), category=question_word(str(e["question"])),
                              extra={"category_id": e.get("category_id")}))
    return Benchmark("msrvtt_qa", "open", samples, PromptStyle("open"), str(root), ("category",))


ACTIVITYNET_TYPES = {0: "motion", 1: "spatial", 2: "temporal", 3: "yes_no", 4: "color", 5: "object",
                     6: "location", 7: "number", 8: "other"}


@register_benchmark("activitynet_qa", "ActivityNet-QA: test_q.json + test_a.json + videos/v_<name>.mp4")
def load_activitynet_qa(root: Path, split: str = "test") -> Benchmark:
    """ActivityNet-QA: ``<split>_q.json`` ``[{"video_name", "question", "question_id"}]`` and
    ``<split>_a.json`` ``[{"answer", "type", "question_id"}]`` (type 0 motion, 1 spatial, 2
    temporal, 3-8 free: yes/no, color, object, location, number, other); clips
    ``videos/v_<video_name>.mp4`` (or ``<video_name>.*``; ``all_test/`` also looked in)."""
    q_path, a_path = root / f"{split}_q.json", root / f"{split}_a.json"
    questions = read_json_or_jsonl(q_path, "ActivityNet-QA questions")
    answers = {}
    for i, a in enumerate(read_json_or_jsonl(a_path, "ActivityNet-QA answers")):
        need(a, ("answer", "question_id"), f"{a_path}: entry {i}")
        answers[str(a["question_id"])] = a
    video_dir = next((root / d for d in ("videos", "all_test") if (root / d).is_dir()), root / "videos")
    samples: List[Sample] = []
    for i, q in enumerate(questions):
        need(q, ("video_name", "question", "question_id"), f"{q_path}: entry {i}")
        qid = str(q["question_id"])
        if qid not in answers:
            raise DataError(f"{q_path}: entry {i}: question {qid} has no answer in {a_path}")
        name = str(q["video_name"])
        video = find_video(video_dir, "v_" + name)
        if not video.exists():
            video = find_video(video_dir, name)
        a = answers[qid]
        samples.append(Sample(id=qid, video=str(video), question=str(q["question"]).strip(),
                              answer=str(a["answer"]).strip(),
                              category=ACTIVITYNET_TYPES.get(int(a.get("type", 8)), "other")))
    return Benchmark("activitynet_qa", "open", samples, PromptStyle("open"), str(root), ("category",))


TGIF_FRAMEQA_TYPES = {"0": "object", "1": "number", "2": "color", "3": "location"}


@register_benchmark("tgif_qa", "TGIF-QA FrameQA: Test_frameqa_question.csv + gifs/<gif_name>.gif")
def load_tgif_qa(root: Path) -> Benchmark:
    """TGIF-QA FrameQA: ``Test_frameqa_question.csv``, TAB-separated with columns ``gif_name,
    question, answer, type, vid_id, key`` (type 0 object, 1 number, 2 color, 3 location), GIFs
    ``gifs/<gif_name>.gif``."""
    path = root / "Test_frameqa_question.csv"
    if not path.is_file():
        raise DataError(f"{path}: not found (TGIF-QA FrameQA test questions)")
    samples: List[Sample] = []
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        missing = [c for c in ("gif_name", "question", "answer") if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{path}: missing column(s) {missing} (a TAB-separated file; has {reader.fieldnames})")
        for n, row in enumerate(reader, start=2):
            key = row.get("key") or row.get("vid_id") or str(n)
            samples.append(Sample(id=f"{row['gif_name']}_{key}_{n}", video=str(find_video(root / "gifs", row["gif_name"])),
                                  question=row["question"].strip(), answer=row["answer"].strip(),
                                  category=TGIF_FRAMEQA_TYPES.get(str(row.get("type", "")).strip(), "other")))
    return Benchmark("tgif_qa", "open", samples, PromptStyle("open"), str(root), ("category",))


__all__ = ["load_activitynet_qa", "load_msrvtt_qa", "load_msvd_qa", "load_tgif_qa", "question_word"]
