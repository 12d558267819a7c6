"""Multiple-choice benchmarks in their published layouts: MVBench, Video-MME, EgoSchema, NExT-QA.

Each loader names the files it reads (the formats' own field names) in its docstring. Paths are
the user's: ``--data-root`` is the folder the benchmark was unpacked into.
"""

from __future__ import annotations

import csv
import logging
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

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
from videollm.benchmarks.options import LETTERS, letter
from videollm.errors import DataError

logger = logging.getLogger(__name__)

# MVBench's 20 tasks: task -> (json file under json/, video folder under video/, data type, has
# start/end bounds), as in OpenGVLab's mvbench.ipynb ``data_list``.
MVBENCH_TASKS: Dict[str, Tuple[str, str, str, bool]] = {
    "Action Sequence": ("action_sequence.json", "star/Charades_v1_480/", "video", True),
    "Action Prediction": ("action_prediction.json", "star/Charades_v1_480/", "video", True),
    "Action Antonym": ("action_antonym.json", "ssv2_video/", "video", False),
    "Fine-grained Action": ("fine_grained_action.json", "Moments_in_Time_Raw/videos/", "video", False),
    "Unexpected Action": ("unexpected_action.json", "FunQA_test/test/", "video", False),
    "Object Existence": ("object_existence.json", "clevrer/video_validation/", "video", False),
    "Object Interaction": ("object_interaction.json", "star/Charades_v1_480/", "video", True),
    "Object Shuffle": ("object_shuffle.json", "perception/videos/", "video", False),
    "Moving Direction": ("moving_direction.json", "clevrer/video_validation/", "video", False),
    "Action Localization": ("action_localization.json", "sta/sta_video/", "video", True),
    "Scene Transition": ("scene_transition.json", "scene_qa/video/", "video", False),
    "Action Count": ("action_count.json", "perception/videos/", "video", False),
    "Moving Count": ("moving_count.json", "clevrer/video_validation/", "video", False),
    "Moving Attribute": ("moving_attribute.json", "clevrer/video_validation/", "video", False),
    "State Change": ("state_change.json", "perception/videos/", "video", False),
    "Fine-grained Pose": ("fine_grained_pose.json", "nturgbd/", "video", False),
    "Character Order": ("character_order.json", "perception/videos/", "video", False),
    "Egocentric Navigation": ("egocentric_navigation.json", "vlnqa/", "video", False),
    "Episodic Reasoning": ("episodic_reasoning.json", "tvqa/frames_fps3_hq/", "frame", True),
    "Counterfactual Inference": ("counterfactual_inference.json", "clevrer/video_validation/", "video", False),
}
TASKS_FILE = "tasks.json"  # optional: {task: [json file, video folder, data type, bound]} replacing the table


@register_benchmark("mvbench", "MVBench: 20 temporal tasks, json/<task>.json + video/<source>/ (PLLaVA prompting)")
def load_mvbench(root: Path, tasks: Optional[Sequence[str]] = None) -> Benchmark:
    """MVBench (OpenGVLab/MVBench): ``json/<task>.json`` lists of ``{"video", "question",
    "candidates", "answer"}`` (the answer is the correct candidate's TEXT; tasks with bounds add
    ``"start"``/``"end"`` seconds), videos under ``video/<source folder>/``. A ``tasks.json`` in the
    root replaces the 20-task table (same tuple layout) -- the offline benchmark uses one.

    The segment bounds are recorded in each sample's ``extra`` but not applied: the model
    contract's ``load_media`` samples the whole clip.
    """
    table = MVBENCH_TASKS
    if (root / TASKS_FILE).is_file():
        raw = read_json(root / TASKS_FILE, "MVBench task table")
        if not isinstance(raw, dict) or not all(isinstance(v, list) and len(v) == 4 for v in raw.values()):
            raise DataError(f"{root / TASKS_FILE}: expected {{task: [json file, video folder, data type, bound]}}")
        table = {k: (str(v[0]), str(v[1]), str(v[2]), bool(v[3])) for k, v in raw.items()}
    wanted = list(tasks) if tasks else list(table)
    unknown = [t for t in wanted if t not in table]
    if unknown:
        raise DataError(f"mvbench: unknown task(s) {unknown}; known: {list(table)}")
    samples: List[Sample] = []
    present = 0
    for task in wanted:
        json_name, prefix, data_type, bound = table[task]
        path = root / "json" / json_name
        if not path.is_file():
            logger.warning("mvbench: %s not found: task %r skipped", path, task)
            continue
        present += 1
        for i, entry in enumerate(read_json_or_jsonl(path, f"MVBench task {task}")):
            where = f"{path}: entry {i}"
            need(entry, ("video", "question", "candidates", "answer"), where)
            cands = [str(c) for c in entry["candidates"]]
            if str(entry["answer"]) not in cands:
                raise DataError(f"{where}: answer {entry['answer']!r} is not one of the candidates {cands}")
            if len(cands) > len(LETTERS):
                raise DataError(f"{where}: {len(cands)} candidates; at most {len(LETTERS)}")
            extra: Dict[str, Any] = {"data_type": data_type}
            if bound and "start" in entry and "end" in entry:
                extra["bound"] = [entry["start"], entry["end"]]
            samples.append(Sample(
                id=f"{task}/{i}", video=str(root / "video" / prefix / str(entry["video"])),
                question=str(entry["question"]).strip(), options=cands,
                answer=letter(cands.index(str(entry["answer"]))), category=task, extra=extra))
    if not present:
        raise DataError(f"mvbench: none of the task files found under {root / 'json'} (expected e.g. "
                        f"{next(iter(table.values()))[0]})")
    return Benchmark("mvbench", "mc", samples, PromptStyle("pllava"), str(root), ("category",))


# --------------------------------------------------------------------------------------------- Video-MME


def parse_srt(text: str) -> List[str]:
    """The text lines of an SRT file (indices, timings and markup dropped), in order."""
    lines: List[str] = []
    for block in re.split(r"\n\s*\n", text.replace("\r\n", "\n").replace("\r", "\n")):
        rows = [r.strip() for r in block.strip().split("\n") if r.strip()]
        rows = [r for r in rows if not r.isdigit() and "-->" not in r]
        if rows:
            lines.append(re.sub(r"<[^>]+>", "", " ".join(rows)).strip())
    return lines


_VIDEOMME_ANNOTATIONS = ("videomme/test-00000-of-00001.parquet", "videomme.json", "videomme.jsonl", "Video-MME.json")


def _videomme_rows(path: Path) -> List[Dict[str, Any]]:
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow), or give the JSON "
                            "release (videomme.json)") from None
        return pq.read_table(path).to_pylist()
    data = read_json_or_jsonl(path, "Video-MME annotations")
    rows: List[Dict[str, Any]] = []
    for i, entry in enumerate(data):
        if isinstance(entry, dict) and "questions" in entry:  # the grouped release: one entry per video
            need(entry, ("video_id", "duration", "questions"), f"{path}: entry {i}")
            for q in entry["questions"]:
                rows.append({**{k: v for k, v in entry.items() if k != "questions"}, **q})
        else:
            rows.append(entry)
    return rows


def _load_videomme(root: Path, subtitles: bool, annotation: Optional[str]) -> Benchmark:
    candidates = [annotation] if annotation else list(_VIDEOMME_ANNOTATIONS)
    path = next((root / c for c in candidates if (root / c).is_file()), None)
    if path is None:
        raise DataError(f"videomme: no annotation file under {root} (looked for {candidates})")
    video_dir = root / "data" if (root / "data").is_dir() else root / "videos"
    samples: List[Sample] = []
    subs_cache: Dict[str, str] = {}
    for i, row in enumerate(_videomme_rows(path)):
        where = f"{path}: row {i}"
        need(row, ("question_id", "question", "options", "answer", "duration"), where)
        vid = str(row.get("videoID") or row.get("video_id"))
        options = [re.sub(r"^\s*\(?[A-Z][.)]\s*", "", str(o)) for o in row["options"]]
        ans = str(row["answer"]).strip().upper()
        if ans not in LETTERS[:len(options)]:
            raise DataError(f"{where}: answer {row['answer']!r} is not a letter of its {len(options)} options")
        extra: Dict[str, Any] = {k: row[k] for k in ("duration", "domain", "sub_category", "task_type") if k in row}
        if subtitles:
            if vid not in subs_cache:
                srt = root / "subtitle" / f"{vid}.srt"
                subs_cache[vid] = "\n".join(parse_srt(srt.read_text(encoding="utf-8", errors="replace"))) if srt.is_file() else ""
            extra["subtitles"] = subs_cache[vid]
        samples.append(Sample(id=str(row["question_id"]), video=str(find_video(video_dir, vid)),
                              question=str(row["question"]).strip(), options=options, answer=ans,
                              category=str(row["duration"]), extra=extra))
    name = "videomme_subtitles" if subtitles else "videomme"
    return Benchmark(name, "mc", samples, PromptStyle("videomme"), str(root), ("duration", "domain", "task_type"))


@register_benchmark("videomme", "Video-MME without subtitles: videomme/test-*.parquet (or the JSON release) + data/<videoID>.mp4")
def load_videomme(root: Path, annotation: Optional[str] = None) -> Benchmark:
    """Video-MME (lmms-lab/Video-MME): rows ``{"video_id", "duration", "domain", "sub_category",
    "videoID", "question_id", "task_type", "question", "options": ["A. ...", ...], "answer": "A"}``
    from ``videomme/test-00000-of-00001.parquet``, or the grouped JSON release (one entry per
    video with a ``"questions"`` list); videos ``data/<videoID>.mp4``."""
    return _load_videomme(root, False, annotation)


@register_benchmark("videomme_subtitles", "Video-MME with subtitles (subtitle/<videoID>.srt)")
def load_videomme_subtitles(root: Path, annotation: Optional[str] = None) -> Benchmark:
    """As ``videomme``, with the text of ``subtitle/<videoID>.srt`` in the prompt (all of it: the
    official protocol keeps the lines at the sampled frames, which the harness does not know)."""
    return _load_videomme(root, True, annotation)


# --------------------------------------------------------------------------------------------- EgoSchema


@register_benchmark("egoschema", "EgoSchema: questions.json + subset_answers.json + videos/<q_uid>.mp4")
def load_egoschema(root: Path, answers: str = "subset_answers.json") -> Benchmark:
    """EgoSchema: ``questions.json`` ``[{"q_uid", "google_drive_id", "question", "option 0", ...,
    "option 4"}]``, ``subset_answers.json`` ``{q_uid: index}`` (the public 500-question subset;
    questions without an answer are left out), videos ``videos/<q_uid>.mp4`` (or ``good_clips_git/``)."""
    questions = read_json_or_jsonl(root / "questions.json", "EgoSchema questions")
    truth = read_json(root / answers, "EgoSchema answers")
    if not isinstance(truth, dict):
        raise DataError(f"{root / answers}: expected {{q_uid: answer index}}")
    video_dir = next((root / d for d in ("videos", "good_clips_git") if (root / d).is_dir()), root / "videos")
    samples: List[Sample] = []
    for i, q in enumerate(questions):
        where = f"{root / 'questions.json'}: entry {i}"
        need(q, ("q_uid", "question"), where)
        if q["q_uid"] not in truth:
            continue
        options = [str(q[f"option {k}"]) for k in range(10) if f"option {k}" in q]
        if len(options) < 2:
            raise DataError(f"{where}: expected fields 'option 0' ... 'option 4'")
        ans = int(truth[q["q_uid"]])
        if not 0 <= ans < len(options):
            raise DataError(f"{root / answers}: {q['q_uid']}: answer {ans} out of range for {len(options)} options")
        samples.append(Sample(id=str(q["q_uid"]), video=str(find_video(video_dir, str(q["q_uid"]))),
                              question=str(q["question"]).strip(), options=options, answer=letter(ans)))
    if not samples:
        raise DataError(f"egoschema: no question of {root / 'questions.json'} has an answer in {root / answers}")
    return Benchmark("egoschema", "mc", samples, PromptStyle("pllava"), str(root), ("category",))


# --------------------------------------------------------------------------------------------- NExT-QA

NEXTQA_GROUPS = {"C": "causal", "T": "temporal", "D": "descriptive"}


@register_benchmark("nextqa", "NExT-QA multiple choice: val.csv / test.csv + map_vid_vidorID.json + NExTVideo/")
def load_nextqa(root: Path, split: str = "val") -> Benchmark:
    """NExT-QA (MC): ``<split>.csv`` with columns ``video, frame_count, width, height, question,
    answer, qid, type, a0, a1, a2, a3, a4`` (``answer`` is the correct option's index; ``type``
    CW/CH causal, TN/TC/TP temporal, DC/DL/DO descriptive), ``map_vid_vidorID.json`` mapping the
    video id to ``<folder>/<vidor id>`` under ``NExTVideo/`` (without the map: ``videos/<video>.mp4``)."""
    path = root / f"{split}.csv"
    if not path.is_file():
        raise DataError(f"{path}: not found (NExT-QA {split} split)")
    mapping = read_json(root / "map_vid_vidorID.json", "NExT-QA video map") if (root / "map_vid_vidorID.json").is_file() else None
    samples: List[Sample] = []
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        cols = ["video", "question", "answer", "qid", "type", "a0", "a1", "a2", "a3", "a4"]
        missing = [c for c in cols if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{path}: missing column(s) {missing} (has {reader.fieldnames})")
        for n, row in enumerate(reader, start=2):
            vid = str(row["video"])
            try:
                ans = int(row["answer"])
            except ValueError:
                raise DataError(f"{path}:{n}: answer {row['answer']!r} is not an option index") from None
            options = [row[f"a{k}"] for k in range(5)]
            if not 0 <= ans < 5:
                raise DataError(f"{path}:{n}: answer {ans} out of range 0-4")
            if mapping is not None:
                if vid not in mapping:
                    raise DataError(f"{path}:{n}: video {vid} not in map_vid_vidorID.json")
                video = find_video(root / "NExTVideo", str(mapping[vid]))
            else:
                video = find_video(root / "videos", vid)
            qtype = str(row["type"]).strip()
            question = str(row["question"]).strip()
            question = question if question.endswith("?") else question + "?"  # NExT-QA stores them without
            samples.append(Sample(id=f"{vid}_{row['qid']}", video=str(video), question=question, options=options, answer=letter(ans), category=qtype,
                                  extra={"type": qtype, "group": NEXTQA_GROUPS.get(qtype[:1], "other")}))
    return Benchmark("nextqa", "mc", samples, PromptStyle("pllava"), str(root), ("type", "group"))


__all__ = ["MVBENCH_TASKS", "load_egoschema", "load_mvbench", "load_nextqa", "load_videomme", "parse_srt"]
