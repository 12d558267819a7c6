"""Batch inference: questions about videos/images from a JSONL file, answers to another.

    python -m videollm.infer --cfg-path eval_configs/tiny.yaml --input questions.jsonl --output answers.jsonl --batch-size 8

Input lines: ``{"video": PATH, "question": Q}`` or ``{"image": PATH, "question": Q}``, optionally
``"id"`` (copied to the output) and ``"audio": true`` (use the video's sound; or ``--audio`` for
all). Relative paths are resolved against ``--media-root`` (default: the input file's folder).
Output: one line per input line: ``{"line", "video"|"image", "question", "answer"}`` (plus
``"id"`` and ``"notices"`` when there are any), or ``{..., "error": "..."}`` for a line that
could not be answered (bad JSON, missing file, undecodable or too large media, a failed
generation, ...); the run goes on.

Nothing is lost when a run dies (a kill, a crash, a full disk):

* each batch's lines are appended to the output as soon as they are produced (flushed and
  fsync'ed), in input order within a run;
* a rerun with the same ``--output`` **resumes**: requests already answered there are skipped
  (matched by ``"id"``, or by line number, media and question for lines without an id); lines
  that failed are tried again, and their old error lines and any half-written last line are
  dropped first (the file is rewritten atomically). ``--overwrite`` starts from scratch;
* exit status: 0 when every line was answered, else the number of lines of this run that
  failed (capped at 100); 101 when the run could not start (unreadable input, bad config,
  bad arguments).

Media go through the chat's loaders, so the same limits hold as in the chat and the demo:
the pixel cap of training (:data:`videollm.processors.image_processors.DEFAULT_MAX_PIXELS`,
checked before decoding) and the decode timeout.

Each line is a one-turn conversation built exactly as the chat builds it; a batch is generated
in one call with LEFT-padded prompt embeddings (:meth:`videollm.chat.Chat.answer_batch`).
Decoding is greedy by default (``--sample`` to sample), so batched answers equal one-by-one
answers. When a batch's generation fails, its rows are retried one by one, so one bad row
does not fail the others.
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


def request_key(number: int, req: Dict[str, Any]) -> str:
    """What identifies a request across runs: its ``id``, else its line, media and question."""
    if req.get("id") is not None:
        return "id:" + json.dumps(req["id"], sort_keys=True, ensure_ascii=False)
    media = req.get("video") or req.get("image")
    return "line:" + json.dumps([number, media, req.get("question")], ensure_ascii=False)


def _record_key(record: Dict[str, Any]) -> Optional[str]:
    if record.get("id") is not None:
        return request_key(0, record)
    if isinstance(record.get("line"), int):
        return request_key(record["line"], record)
    return None


def load_answered(path: os.PathLike | str) -> Tuple[List[Dict[str, Any]], int]:
    """The answered records of an earlier run's output, and how many lines were dropped.

    Dropped: error records (to be retried), lines that are not JSON objects (e.g. the
    half-written last line of a killed run) and records that cannot be matched to a request.
    """
    kept: List[Dict[str, Any]] = []
    dropped = 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                dropped += 1
                continue
            if isinstance(record, dict) and "answer" in record and "error" not in record and _record_key(record):
                kept.append(record)
            else:
                dropped += 1
    return kept, dropped


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def iter_answer_batches(
    chat: Chat,
    requests: Sequence[Tuple[int, Dict[str, Any]]],
    model_type: str,
    media_root: Path,
    batch_size: int = 8,
    audio: bool = False,
    source: str = "input",
    **gen: Any,
) -> Iterator[List[Dict[str, Any]]]:
    """Answer ``requests`` in batches; yields each batch's output records, in order, as soon
    as they exist. Every failure becomes an ``"error"`` field; only interrupts propagate."""
    for start in range(0, len(requests), max(1, batch_size)):
        chunk = requests[start : start + batch_size]
        records: List[Dict[str, Any]] = []
        ready: List[Tuple[int, Any, List]] = []  # (index in records, conv, img_list)
        for number, req in chunk:
            where = f"{source}:{number}"
            record: Dict[str, Any] = {"line": number}
            record.update({k: req[k] for k in ("id", "video", "image", "question") if k in req})
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
                record["error"] = _error_text(exc)
            except Exception as exc:  # noqa: BLE001 - one input must not end the run
                logger.exception("%s: unexpected failure", where)
                record["error"] = _error_text(exc)
        groups = [ready] if ready else []
        while groups:
            group = groups.pop(0)
            notices = []
            try:
                answers = chat.answer_batch([c for _, c, _ in group], [i for _, _, i in group], notices=notices, **gen)
                for (idx, _, _), (text, _) in zip(group, answers):
                    records[idx]["answer"] = text
            except Exception as exc:  # noqa: BLE001
                if len(group) > 1:  # find the row that fails: the others still get answers
                    logger.warning("batch at %s:%d failed (%s); retrying its rows one by one",
                                   source, records[group[0][0]]["line"], _error_text(exc))
                    groups = [[row] for row in group] + groups
                    continue
                if not isinstance(exc, VideoLLMError):
                    logger.exception("%s:%d: generation failed", source, records[group[0][0]]["line"])
                records[group[0][0]]["error"] = _error_text(exc)
            if notices:  # context cuts: which row is not known here, so every row of the batch says so
                for idx, _, _ in group:
                    records[idx].setdefault("notices", []).extend(notices)
        yield records


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
    for records in iter_answer_batches(chat, requests, model_type, media_root, batch_size, audio, source, **gen):
        results.extend(records)
    return results


EXIT_FATAL = 101  # the run could not start; 1..100 = lines that failed (100: 100 or more)
MAX_EXIT_FAILURES = 100


class _ArgumentParser(argparse.ArgumentParser):
    """Bad arguments exit with :data:`EXIT_FATAL` (argparse's 2 would read as "2 lines failed")."""

    def error(self, message: str):  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(EXIT_FATAL, f"{self.prog}: error: {message}\n")


def _write_atomic(path: Path, records: Sequence[Dict[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = _ArgumentParser(prog="python -m videollm.infer", description="Batch question answering over videos/images")
    add_model_args(parser)
    parser.add_argument("--input", required=True, help="questions, JSONL")
    parser.add_argument("--output", required=True,
                        help="answers, JSONL; appended as they come; an existing file is resumed (see --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="start from scratch instead of resuming --output")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--media-root", default=None, help="folder for relative media paths (default: the input's folder)")
    parser.add_argument("--audio", action="store_true", help="use each video's sound (lines may override with \"audio\")")
    add_generation_args(parser, greedy_default=True)
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None, err: TextIO = sys.stderr) -> int:
    """Run; returns the exit status (0: all answered, N: N lines failed (<= 100), 101: no run)."""
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        requests = list(read_requests(args.input))
    except OSError as exc:
        print(f"error: {args.input}: cannot read ({exc.strerror or exc})", file=err)
        return EXIT_FATAL
    out = Path(args.output)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        done: List[Dict[str, Any]] = []
        if out.exists() and not args.overwrite:
            done, dropped = load_answered(out)
            if done or dropped:
                _write_atomic(out, done)  # drop old errors and a half-written last line
                print(f"resuming {out}: {len(done)} answered line(s) kept"
                      + (f", {dropped} failed or unreadable line(s) to redo" if dropped else ""), file=err)
        else:
            _write_atomic(out, [])
    except OSError as exc:
        print(f"error: {out}: cannot write ({exc.strerror or exc})", file=err)
        return EXIT_FATAL
    answered = {_record_key(r) for r in done}
    todo = [(n, req) for n, req in requests if "error" in req or request_key(n, req) not in answered]
    if not todo:
        print(f"{out}: all {len(requests)} lines already answered", file=err)
        return 0
    try:
        chat, model_type, notices = build_chat_from_args(args)
    except VideoLLMError as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=err)
        return EXIT_FATAL
    for notice in notices:
        print(f"notice: {notice}", file=err)
    media_root = Path(args.media_root) if args.media_root else Path(args.input).resolve().parent
    t0 = time.perf_counter()
    lines = errors = 0
    try:
        with open(out, "a", encoding="utf-8") as f:
            for records in iter_answer_batches(chat, todo, model_type, media_root, batch_size=args.batch_size,
                                               audio=args.audio, source=str(args.input), **generation_kwargs(args)):
                for record in records:
                    f.write(json.dumps(record, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())  # a kill or a power cut loses at most the batch being generated
                lines += len(records)
                errors += sum("error" in r for r in records)
    except OSError as exc:
        print(f"error: {out}: cannot write ({exc.strerror or exc}); {lines} line(s) written, "
              "rerun to resume", file=err)
        return EXIT_FATAL
    skipped = len(requests) - len(todo)
    print(f"{lines} lines ({errors} errors) in {time.perf_counter() - t0:.1f} s -> {out}"
          + (f" ({skipped} answered earlier)" if skipped else ""), file=err)
    return min(errors, MAX_EXIT_FAILURES)


if __name__ == "__main__":
    raise SystemExit(main())
