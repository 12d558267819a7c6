"""Batch inference: questions about videos/images from a JSONL file, answers to another.

    python -m videollm.infer --cfg-path eval_configs/tiny.yaml --input questions.jsonl --output answers.jsonl --batch-size 8

Input lines: ``{"video": PATH, "question": Q}`` or ``{"image": PATH, "question": Q}``, optionally
``"id"`` (copied to the output) and ``"audio": true`` (use the video's sound; or ``--audio`` for
all). Relative paths are resolved against ``--media-root`` (default: the input file's folder).
Output: one line per input line, in order: ``{"video"|"image", "question", "answer"}`` (plus
``"id"`` and ``"notices"`` when there are any), or ``{..., "error": "..."}`` for a line that
could not be answered (bad JSON, missing file, undecodable media, ...); the run goes on.

Each line is a one-turn conversation built exactly as the chat builds it; a batch is generated
in one call with LEFT-padded prompt embeddings (:meth:`videollm.chat.Chat.answer_batch`).
Decoding is greedy by default (``--sample`` to sample), so batched answers equal one-by-one
answers.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, TextIO, Tuple

from videollm.chat import Chat, add_model_args, build_chat_from_args, new_conversation
from videollm.cli import add_generation_args, generation_kwargs
from videollm.errors import DataError, VideoLLMError

logger = logging.getLogger(__name__)


def read_requests(path: os.PathLike | str) -> Iterator[Tuple[int, Dict[str, Any]]]:
    """Yield (line number, request); a malformed line yields a request holding an ``error``."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                yield number, {"error": f"{path}:{number}: not valid JSON ({exc.msg})"}
                continue
            if not isinstance(obj, dict):
                yield number, {"error": f"{path}:{number}: expected a JSON object"}
                continue
            yield number, obj


def _check_request(req: Dict[str, Any], where: str) -> Tuple[str, str, str]:
    """-> (kind, path, question) or DataError naming the line."""
    kinds = [k for k in ("video", "image") if req.get(k)]
    if len(kinds) != 1:
        raise DataError(f"{where}: give exactly one of 'video' or 'image'")
    question = req.get("question")
    if not isinstance(question, str) or not question.strip():
        raise DataError(f"{where}: 'question' must be a non-empty string")
    return kinds[0], str(req[kinds[0]]), question


def answer_requests(
    chat: Chat,
    requests: Sequence[Tuple[int, Dict[str, Any]]],
    model_type: str,
    media_root: Path,
    batch_size: int = 8,
    audio: bool = False,
    source: str = "input",
    **gen: Any,
) -> List[Dict[str, Any]]:
    """Answer ``requests`` in batches; returns one output record per request, in order."""
    results: List[Dict[str, Any]] = []
    for start in range(0, len(requests), max(1, batch_size)):
        chunk = requests[start : start + batch_size]
        records: List[Dict[str, Any]] = []
        ready: List[Tuple[int, Any, List]] = []  # (index in records, conv, img_list)
        for number, req in chunk:
            where = f"{source}:{number}"
            record: Dict[str, Any] = {k: req[k] for k in ("id", "video", "image", "question") if k in req}
            records.append(record)
            if "error" in req:
                record["error"] = req["error"]
                continue
            try:
                kind, rel, question = _check_request(req, where)
                path = rel if os.path.isabs(rel) else str(media_root / rel)
                conv = new_conversation(model_type, kind)
                img_list: List = []
                notices: List[str] = []
                if kind == "video":
                    chat.upload_video(path, conv, img_list, with_audio=bool(req.get("audio", audio)), notices=notices)
                else:
                    chat.upload_img(path, conv, img_list)
                chat.ask(question, conv)
                if notices:
                    record["notices"] = notices
                ready.append((len(records) - 1, conv, img_list))
            except VideoLLMError as exc:
                record["error"] = f"{type(exc).__name__}: {exc}"
        if ready:
            notices: List[str] = []
            try:
                answers = chat.answer_batch([c for _, c, _ in ready], [i for _, _, i in ready], notices=notices, **gen)
                for (idx, _, _), (text, _) in zip(ready, answers):
                    records[idx]["answer"] = text
            except VideoLLMError as exc:
                for idx, _, _ in ready:
                    records[idx]["error"] = f"{type(exc).__name__}: {exc}"
            if notices:  # context cuts: which row is not known here, so every row of the batch says so
                for idx, _, _ in ready:
                    records[idx].setdefault("notices", []).extend(notices)
        results.extend(records)
    return results


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m videollm.infer", description="Batch question answering over videos/images")
    add_model_args(parser)
    parser.add_argument("--input", required=True, help="questions, JSONL")
    parser.add_argument("--output", required=True, help="answers, JSONL (overwritten)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--media-root", default=None, help="folder for relative media paths (default: the input's folder)")
    parser.add_argument("--audio", action="store_true", help="use each video's sound (lines may override with \"audio\")")
    add_generation_args(parser, greedy_default=True)
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None, err: TextIO = sys.stderr) -> int:
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        requests = list(read_requests(args.input))
    except OSError as exc:
        print(f"error: {args.input}: cannot read ({exc.strerror or exc})", file=err)
        return 2
    try:
        chat, model_type, notices = build_chat_from_args(args)
    except VideoLLMError as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=err)
        return 2
    for notice in notices:
        print(f"notice: {notice}", file=err)
    media_root = Path(args.media_root) if args.media_root else Path(args.input).resolve().parent
    t0 = time.perf_counter()
    results = answer_requests(chat, requests, model_type, media_root, batch_size=args.batch_size, audio=args.audio,
                              source=str(args.input), **generation_kwargs(args))
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        for record in results:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    errors = sum("error" in r for r in results)
    print(f"{len(results)} lines ({errors} errors) in {time.perf_counter() - t0:.1f} s -> {out}", file=err)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
