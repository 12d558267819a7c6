"""What a benchmark is for the harness: samples, their prompts, and the registry of loaders.

A loader reads a benchmark in its PUBLISHED file layout under a folder the user names (nothing
is downloaded) and returns a :class:`Benchmark`: a kind (``"mc"`` multiple choice, ``"open"``
open-ended QA, ``"caption"``), and :class:`Sample` s in file order, each with a stable ``id``
(resuming and sharding key on it), the video path, the question, the options (mc), the
reference(s) and a category for the per-category scores.

How a sample becomes a prompt is the benchmark's :class:`PromptStyle`: an optional system text,
the user text (:meth:`Benchmark.user_text`), and an optional answer cue the reply continues
(MVBench's ``"Best option:("`` as PLLaVA and the MVBench notebook prompt it).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from videollm.benchmarks.options import letter
from videollm.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

KINDS = ("mc", "open", "caption")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".gif", ".m4v")

# MVBench's system prompt and answer cue (OpenGVLab's mvbench.ipynb; PLLaVA prompts the same way).
MVBENCH_SYSTEM = (
    "Carefully watch the video and pay attention to the cause and sequence of events, "
    "the detail and movement of objects, and the action and pose of persons. "
    "Based on your observations, select the best option that accurately addresses the question."
)
BEST_OPTION_CUE = "Best option:("
# Video-MME's prompt (its paper's appendix and the lmms-eval task): the options carry "A. " prefixes.
VIDEOMME_INSTRUCTION = (
    "Select the best answer to the following multiple-choice question based on the video. "
    "Respond with only the letter (A, B, C, or D) of the correct option."
)
VIDEOMME_CUE_TEXT = "The best answer is:"
VIDEOMME_SUBTITLES = "This video's subtitles are listed below:"
LETTER_INSTRUCTION = "Answer with the option's letter from the given choices directly."


@dataclass
class Sample:
    """One question (or one clip to caption).

    ``answer``: the correct option's LETTER (mc), the reference answer (open); ``references``:
    the reference captions (caption). ``extra``: what the prompt or the scores need besides
    (e.g. Video-MME's duration and subtitles, MVBench's segment bounds).
    """

    id: str
    video: str
    question: str = ""
    options: List[str] = field(default_factory=list)
    answer: str = ""
    references: List[str] = field(default_factory=list)
    category: str = "all"
    extra: Dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> Dict[str, Any]:
        return {"id": self.id, "video": self.video, "question": self.question, "options": list(self.options),
                "answer": self.answer, "references": list(self.references), "category": self.category,
                "extra": dict(self.extra)}


@dataclass
class PromptStyle:
    """How a sample is asked. ``style``:

    * ``"pllava"``: ``"Question: ...\\nOptions:\\n(A) ...\\n(B) ..."``, MVBench's system text and
      the ``"Best option:("`` cue (the reply continues after the parenthesis);
    * ``"videomme"``: Video-MME's instruction, subtitles when asked for, options as ``"A. ..."``,
      ``"The best answer is:"``;
    * ``"letter"``: the question, the ``(A) ...`` options and "Answer with the option's letter ...";
    * ``"question"``: the question alone, the reply matched to the options by their text (for
      models that never learnt to pick letters, e.g. the tiny model of the quick start);
    * ``"open"`` / ``"caption"``: the question (or ``caption_prompt``) as it is.
    """

    style: str = "question"
    caption_prompt: str = "Describe the video in detail."

    STYLES = ("pllava", "videomme", "letter", "question", "open", "caption")

    def __post_init__(self) -> None:
        if self.style not in self.STYLES:
            raise ConfigError(f"--prompt-style {self.style!r}: expected one of {list(self.STYLES)}")


def options_block(options: Sequence[str]) -> str:
    return "\n".join(f"({letter(i)}) {o}" for i, o in enumerate(options))


@dataclass
class Benchmark:
    """A loaded benchmark: its samples and how they are asked and scored."""

    name: str
    kind: str
    samples: List[Sample]
    prompt: PromptStyle = field(default_factory=PromptStyle)
    root: str = ""
    # the category levels reported (Video-MME: duration, domain, task type; NExT-QA: type groups)
    category_fields: Sequence[str] = ()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"benchmark {self.name}: kind {self.kind!r} not in {KINDS}")
        seen: Dict[str, int] = {}
        for i, s in enumerate(self.samples):
            if s.id in seen:
                raise DataError(f"benchmark {self.name}: sample id {s.id!r} occurs twice (entries {seen[s.id]} and {i})")
            seen[s.id] = i

    # ------------------------------------------------------------------ prompts
    def system_text(self) -> Optional[str]:
        """The system text to set (None: the chat template's own)."""
        return MVBENCH_SYSTEM if self.prompt.style == "pllava" else None

    def answer_cue(self) -> str:
        """Text the prompt ends with, after the assistant role; the reply continues it."""
        return BEST_OPTION_CUE if self.prompt.style == "pllava" else ""

    def reply_prefix(self) -> str:
        """What of the cue the parser puts back before the reply ("(" of "Best option:(")."""
        return "(" if self.prompt.style == "pllava" else ""

    def user_text(self, sample: Sample) -> str:
        """The question as the user asks it (the media message goes before it)."""
        style = self.prompt.style
        if self.kind == "caption":
            return sample.question or self.prompt.caption_prompt
        if self.kind == "open" or style in ("open", "question"):
            return sample.question
        if style == "pllava":
            return f"Question: {sample.question}\nOptions:\n{options_block(sample.options)}"
        if style == "letter":
            return f"{sample.question}\n{options_block(sample.options)}\n{LETTER_INSTRUCTION}"
        # videomme
        parts = []
        subs = sample.extra.get("subtitles")
        if subs:
            parts.append(f"{VIDEOMME_SUBTITLES}\n{subs}")
        parts.append(VIDEOMME_INSTRUCTION)
        parts.append(sample.question)
        parts.append("\n".join(f"{letter(i)}. {o}" for i, o in enumerate(sample.options)))
        parts.append(VIDEOMME_CUE_TEXT)
        return "\n".join(parts)


# ---------------------------------------------------------------------------------------------
# registry

LoaderFn = Callable[..., Benchmark]
LOADERS: Dict[str, LoaderFn] = {}
DESCRIPTIONS: Dict[str, str] = {}


def register_benchmark(name: str, description: str = "") -> Callable[[LoaderFn], LoaderFn]:
    def wrap(fn: LoaderFn) -> LoaderFn:
        if name in LOADERS:
            raise ConfigError(f"benchmark {name!r} is already registered")
        LOADERS[name] = fn
        DESCRIPTIONS[name] = description or (fn.__doc__ or "").strip().split("\n")[0]
        return fn
    return wrap


def benchmark_names() -> List[str]:
    return sorted(LOADERS)


def load_benchmark(name: str, data_root: os.PathLike | str, *, prompt_style: Optional[str] = None,
                   **options: Any) -> Benchmark:
    """Load benchmark ``name`` from ``data_root``; ``prompt_style`` overrides the default style."""
    from difflib import get_close_matches

    if name not in LOADERS:
        close = get_close_matches(name, LOADERS, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"--benchmark {name!r}: unknown{hint}; known: {', '.join(benchmark_names())}")
    root = Path(data_root)
    if not root.exists():
        raise DataError(f"--data-root {root}: no such folder")
    bench = LOADERS[name](root, **options)
    if prompt_style is not None:
        bench.prompt = PromptStyle(prompt_style, bench.prompt.caption_prompt)
    return bench


# ---------------------------------------------------------------------------------------------
# file helpers shared by the loaders


def read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise DataError(f"{path}: not found ({what})")
    try:
        with open(path, encoding="utf-8-sig") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None


def read_json_or_jsonl(path: Path, what: str) -> List[Any]:
    if path.suffix == ".jsonl":
        if not path.is_file():
            raise DataError(f"{path}: not found ({what})")
        out = []
        with open(path, encoding="utf-8-sig") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        out.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise DataError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
        return out
    data = read_json(path, what)
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of entries ({what})")
    return data


def need(entry: Any, keys: Sequence[str], where: str) -> None:
    if not isinstance(entry, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(entry).__name__}")
    missing = [k for k in keys if k not in entry]
    if missing:
        raise DataError(f"{where}: missing field(s) {missing} (has {sorted(entry)})")


def find_video(folder: Path, stem: str) -> Path:
    """``folder/stem`` as given if it exists, else with the first video extension that exists
    (MSVD's clips are .avi, re-encoded copies often .mp4); the .mp4 path when none does."""
    direct = folder / stem
    if direct.suffix.lower() in VIDEO_EXTENSIONS and direct.exists():
        return direct
    for ext in VIDEO_EXTENSIONS:
        cand = folder / f"{stem}{ext}"
        if cand.exists():
            return cand
    return direct if direct.suffix.lower() in VIDEO_EXTENSIONS else folder / f"{stem}.mp4"


__all__ = [
    "BEST_OPTION_CUE", "Benchmark", "KINDS", "LOADERS", "MVBENCH_SYSTEM", "PromptStyle", "Sample",
    "benchmark_names", "find_video", "load_benchmark", "need", "read_json", "read_json_or_jsonl",
    "register_benchmark",
]
