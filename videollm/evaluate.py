"""Evaluate any registered model on a published video benchmark.

    python -m videollm.evaluate --cfg-path eval_configs/tiny.yaml --benchmark mvbench --data-root /data/MVBench \\
        [--limit N] [--batch-size B] [--output DIR] [--prompt-style pllava|videomme|letter|question]
    torchrun --nproc_per_node=8 -m videollm.evaluate ...           # sharded; rank 0 gathers and scores
    python -m videollm.evaluate ... --benchmark msvd_qa --judge-url http://127.0.0.1:8000/v1 --judge-model gpt-3.5-turbo

Benchmarks and their file layouts: :mod:`videollm.benchmarks`. The model is built from the
eval config exactly as the chat builds it (:func:`videollm.chat.build_chat_from_args`) and
every question is a one-turn conversation of the model's chat template, answered in batches
with left padding (:meth:`videollm.chat.Chat.answer_batch`); nothing here knows the model.
Multiple-choice prompts may end with an answer cue after the assistant role (MVBench's
``"Best option:("``); those prompts go through the same merge path
(:func:`videollm.models.merge.merge_segments`) and ``model.generate``.

Outputs in ``--output`` (default ``output/eval/<benchmark>``):

* ``parts/rank<R>.jsonl``: each rank's records, appended and fsync'ed per batch as produced;
* ``predictions.jsonl``: every sample's record in benchmark order (rank 0, at the end): id,
  category, video, prompt, options, reference, raw prediction, parsed answer, correct (and the
  judge's verdict with its messages and raw reply for open-ended QA when a judge is named);
* ``summary.json``, ``results.md`` (markdown tables), ``accuracy.png`` (per-category bars).

A rerun with the same ``--output`` resumes: samples with a record are skipped (errors are
retried); judged answers are not judged again (``judge.jsonl``). ``--overwrite`` starts over.
Under ``torchrun`` the pending samples are split by rank (``pending[rank::world]``), so a
sharded run produces the same records as a single process.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, TextIO, Tuple, Union

import torch

from videollm.benchmarks import Benchmark, Sample, benchmark_names, extract_option, load_benchmark
from videollm.benchmarks.base import PromptStyle
from videollm.benchmarks.metrics import caption_scores, open_match, summarize, write_outputs
from videollm.chat import Chat, GenerationSettings, new_conversation, postprocess_text
from videollm.errors import ConfigError, DataError, VideoLLMError

logger = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = {"mc": 32, "open": 48, "caption": 64}
RUN_FILE = "run.json"


# --------------------------------------------------------------------------------------------- generation


def _media_embeddings(chat: Chat, conv, img_list) -> List[torch.Tensor]:
    return chat.media_embeddings(conv, img_list)


def generate_replies(chat: Chat, convs: Sequence[Any], img_lists: Sequence[Sequence[Any]], settings: GenerationSettings,
                     cue: str = "") -> List[Tuple[str, str]]:
    """Answer prepared one-turn conversations in ONE ``generate`` call; returns (prompt, reply) each.

    Without a ``cue`` this is :meth:`Chat.answer_batch`. With one, the prompt after the empty
    assistant turn is followed by ``" " + cue`` (PLLaVA's ``"Best option:("``) and the reply
    continues it; the prompt goes through the one merge path, left-padded, as in ``answer_batch``.
    """
    from videollm.models.merge import merge_segments, segments_from_prompt
    from videollm.errors import PromptError

    prompts = []
    for conv in convs:
        conv.append_message(conv.roles[1], None)
        prompts.append(conv.get_prompt() + (" " + cue if cue else ""))
        conv.messages.pop()
    if not cue:
        answers = chat.answer_batch(list(convs), list(img_lists), settings)
        return [(p, text) for p, (text, _) in zip(prompts, answers)]
    model = chat.model
    rows = []
    for prompt, conv, imgs in zip(prompts, convs, img_lists):
        n = prompt.count(model.media_placeholder)
        if n != len(imgs):
            raise PromptError(f"the prompt has {n} {model.media_placeholder} placeholders but {len(imgs)} media")
        rows.append(segments_from_prompt(chat.tokenizer, prompt, model.media_placeholder, _media_embeddings(chat, conv, imgs)))
    merged = merge_segments(rows, model.embed_tokens, dtype=model.llm_dtype, device=chat.device, padding_side="left")
    embs, mask = merged.inputs_embeds, merged.attention_mask
    excess = embs.shape[1] + settings.max_new_tokens - settings.max_length
    if excess > 0:
        embs, mask = embs[:, excess:], mask[:, excess:]
    out = model.generate(inputs_embeds=embs, attention_mask=mask, **chat.generation_kwargs(convs[0], settings))
    replies = []
    for ids, conv in zip(out, convs):
        conv.append_message(conv.roles[1], None)
        replies.append(postprocess_text(chat.tokenizer.decode([int(i) for i in ids]), conv))
        conv.messages.pop()
    return list(zip(prompts, replies))


def ask_batch(chat: Chat, template: str, videos: Sequence[str], texts: Sequence[str], settings: GenerationSettings,
              system: Optional[str] = None, cue: str = "") -> List[Union[Tuple[str, str], BaseException]]:
    """Upload each video into a fresh conversation, ask its text, answer all in one batch.

    Returns per item (prompt, reply), or the exception that item raised (a missing or broken
    video, a failed generation); a failing batch is retried item by item so one bad item does
    not fail the others. Shared by the evaluator and the lmms-eval plugin.
    """
    results: List[Union[Tuple[str, str], BaseException, None]] = [None] * len(videos)
    ready: List[Tuple[int, Any, List[Any]]] = []
    for i, (video, text) in enumerate(zip(videos, texts)):
        try:
            if not os.path.exists(video):
                raise DataError(f"{video}: video not found")
            conv = new_conversation(template, "video")
            if system is not None:
                conv.system = system
            img_list: List[Any] = []
            chat.upload_video_without_audio(video, conv, img_list)
            chat.ask(text, conv)
            ready.append((i, conv, img_list))
        except Exception as exc:  # noqa: BLE001 - one sample must not end the run
            results[i] = exc
    groups = [ready] if ready else []
    while groups:
        group = groups.pop(0)
        try:
            answers = generate_replies(chat, [c for _, c, _ in group], [m for _, _, m in group], settings, cue)
            for (i, _, _), pair in zip(group, answers):
                results[i] = pair
        except Exception as exc:  # noqa: BLE001
            if len(group) > 1:
                logger.warning("a batch of %d failed (%s: %s); retrying its items one by one", len(group),
                               type(exc).__name__, exc)
                groups = [[item] for item in group] + groups
                continue
            results[group[0][0]] = exc
    return results  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------- records


def score_record(bench: Benchmark, sample: Sample, reply: str, *, fallback: Optional[str] = "random") -> Dict[str, Any]:
    """The judge-free scores of one reply (mc: parsed letter and correct; open: exact/contains)."""
    if bench.kind == "mc":
        choice = extract_option(reply, sample.options, prefix=bench.reply_prefix(), fallback=fallback, key=sample.id)
        return {"parsed": choice.letter, "parse": choice.how, "correct": choice.letter == sample.answer}
    if bench.kind == "open":
        m = open_match(reply, sample.answer)
        return {"parsed": reply, "exact": m["exact"], "contains": m["contains"], "correct": m["contains"]}
    return {"parsed": reply}


def make_record(bench: Benchmark, sample: Sample, prompt: Optional[str], reply: Optional[str],
                error: Optional[BaseException] = None, fallback: Optional[str] = "random") -> Dict[str, Any]:
    rec: Dict[str, Any] = {"id": sample.id, "benchmark": bench.name, "category": sample.category,
                           "video": sample.video, "question": sample.question}
    if sample.options:
        rec["options"] = list(sample.options)
    if bench.kind == "caption":
        rec["references"] = list(sample.references)
    else:
        rec["reference"] = sample.answer
    if sample.extra:
        rec["extra"] = {k: v for k, v in sample.extra.items() if k != "subtitles"}
    if error is not None:
        rec["error"] = f"{type(error).__name__}: {error}"
        return rec
    rec["prompt"] = prompt
    rec["prediction"] = reply
    rec.update(score_record(bench, sample, reply or "", fallback=fallback))
    return rec


def read_records(paths: Sequence[Path]) -> Dict[str, Dict[str, Any]]:
    """Answered records (no ``error``) of earlier runs by id; torn or foreign lines are skipped."""
    out: Dict[str, Dict[str, Any]] = {}
    for path in paths:
        if not path.is_file():
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(rec, dict) and "id" in rec and "error" not in rec and "prediction" in rec:
                    out[str(rec["id"])] = rec
    return out


def _append(path: Path, records: Sequence[Dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _write_atomic(path: Path, records: Sequence[Dict[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------- the run


@dataclasses.dataclass
class EvalOptions:
    batch_size: int = 8
    limit: Optional[int] = None
    generation: Optional[GenerationSettings] = None
    fallback: Optional[str] = "random"
    progress: bool = True
    overwrite: bool = False
    judge: Any = None  # a videollm.benchmarks.judge.JudgeClient
    judge_workers: int = 4
    meta: Dict[str, Any] = dataclasses.field(default_factory=dict)


def _run_identity(bench: Benchmark, opts: EvalOptions) -> Dict[str, Any]:
    return {"benchmark": bench.name, "prompt_style": bench.prompt.style, "data_root": bench.root,
            "cfg_path": opts.meta.get("cfg_path"), "ckpt": opts.meta.get("ckpt")}


def _check_resume(out_dir: Path, identity: Dict[str, Any], overwrite: bool, main: bool) -> None:
    run_file = out_dir / RUN_FILE
    if overwrite and main:
        for p in [out_dir / "predictions.jsonl", out_dir / "judge.jsonl", *sorted((out_dir / "parts").glob("*.jsonl"))]:
            if p.exists():
                p.unlink()
    elif run_file.is_file():
        try:
            old = json.loads(run_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            old = {}
        diff = {k: (old.get(k), v) for k, v in identity.items() if k in old and old.get(k) != v}
        if diff:
            raise ConfigError(f"--output {out_dir} holds a run with other settings {diff} (was, now); "
                              "use another --output or --overwrite")
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        run_file.write_text(json.dumps(identity, indent=1) + "\n", encoding="utf-8")


def evaluate(chat: Chat, template: str, bench: Benchmark, out_dir: Union[str, Path],
             opts: Optional[EvalOptions] = None) -> Optional[Dict[str, Any]]:
    """Run ``bench``; returns the summary on rank 0 (None on the other ranks)."""
    from videollm import dist

    opts = opts or EvalOptions()
    out_dir = Path(out_dir)
    rank, world = dist.get_rank(), dist.get_world_size()
    main = rank == 0
    gen = opts.generation or GenerationSettings(max_new_tokens=DEFAULT_MAX_NEW_TOKENS[bench.kind])
    samples = bench.samples[: opts.limit] if opts.limit else list(bench.samples)
    identity = _run_identity(bench, opts)
    if main:
        _check_resume(out_dir, identity, opts.overwrite, True)
    dist.barrier()
    if not main:
        _check_resume(out_dir, identity, False, False)
    parts = out_dir / "parts"
    previous = read_records([out_dir / "predictions.jsonl", *sorted(parts.glob("*.jsonl"))])
    dist.barrier()  # every rank has read the same files before any rank appends to them
    pending = [s for s in samples if s.id not in previous]
    mine = pending[rank::world]
    if main:
        logger.info("%s: %d samples, %d answered before, %d to run on %d rank(s)", bench.name, len(samples),
                    len(samples) - len(pending), len(pending), world)
    t0 = time.perf_counter()
    new: List[Dict[str, Any]] = []
    part_file = parts / f"rank{rank}.jsonl"
    from tqdm import tqdm

    bar = tqdm(total=len(mine), desc=f"{bench.name} [rank {rank}]" if world > 1 else bench.name, unit="q",
               disable=not opts.progress or (not main and world > 1), file=sys.stderr, dynamic_ncols=True)
    system, cue = bench.system_text(), bench.answer_cue()
    step = max(1, int(opts.batch_size))
    for start in range(0, len(mine), step):
        chunk = mine[start:start + step]
        results = ask_batch(chat, template, [s.video for s in chunk], [bench.user_text(s) for s in chunk], gen,
                            system=system, cue=cue)
        records = []
        for sample, res in zip(chunk, results):
            if isinstance(res, BaseException):
                if not isinstance(res, VideoLLMError):
                    logger.warning("%s: %s: %s", sample.id, type(res).__name__, res)
                records.append(make_record(bench, sample, None, None, error=res))
            else:
                records.append(make_record(bench, sample, res[0], res[1], fallback=opts.fallback))
        _append(part_file, records)
        new.extend(records)
        bar.update(len(chunk))
    bar.close()
    elapsed = time.perf_counter() - t0
    gathered = dist.all_gather_object(new)
    if not main:
        dist.barrier()
        return None
    by_id = dict(previous)
    errors: Dict[str, Dict[str, Any]] = {}
    for recs in gathered:
        for rec in recs:
            (errors if "error" in rec else by_id)[rec["id"]] = rec
    final = [by_id.get(s.id) or errors.get(s.id) or make_record(bench, s, None, None, error=DataError("not run"))
             for s in samples]
    if bench.kind == "open" and opts.judge is not None:
        _judge_all(final, out_dir, opts)
    _write_atomic(out_dir / "predictions.jsonl", final)
    for p in parts.glob("*.jsonl"):  # merged: the parts are no longer needed for resuming
        p.unlink()
    summary = summarize(final, bench.kind, bench.category_fields, total=len(samples))
    if bench.kind == "caption":
        summary.update(caption_scores(final))
    summary.update({
        "benchmark": bench.name, "prompt_style": bench.prompt.style, "template": template, "world_size": world,
        "generation": dataclasses.asdict(gen), "seconds_this_run": round(elapsed, 2), "run_this_time": len(pending),
        "fallback": opts.fallback if bench.kind == "mc" else None, **identity, **opts.meta,
    })
    if bench.kind == "open" and opts.judge is not None:
        from videollm.benchmarks.judge import SYSTEM_PROMPT, USER_PROMPT

        summary["judge"] = {"url": opts.judge.url, "model": opts.judge.model, "system_prompt": SYSTEM_PROMPT,
                            "user_prompt": USER_PROMPT, "protocol": "Video-ChatGPT (yes/no + score 0-5)"}
    write_outputs(summary, out_dir)
    dist.barrier()
    return summary


def _judge_all(records: List[Dict[str, Any]], out_dir: Path, opts: EvalOptions) -> None:
    """Judge every answered open record not judged before (``judge.jsonl`` is the resume log)."""
    log = out_dir / "judge.jsonl"
    done: Dict[str, Dict[str, Any]] = {}
    if log.is_file():
        for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict) and "id" in obj and isinstance(obj.get("judge"), dict):
                done[str(obj["id"])] = obj["judge"]
    todo = [r for r in records if "error" not in r and r["id"] not in done]

    def one(rec: Dict[str, Any]) -> Tuple[str, Dict[str, Any]]:
        return rec["id"], opts.judge.judge(rec["question"], rec["reference"], rec["prediction"] or "").to_json()

    from tqdm import tqdm

    with ThreadPoolExecutor(max_workers=max(1, int(opts.judge_workers))) as pool:
        for rid, verdict in tqdm(pool.map(one, todo), total=len(todo), desc="judge", disable=not opts.progress,
                                 file=sys.stderr):
            done[rid] = verdict
            _append(log, [{"id": rid, "judge": verdict}])
    for rec in records:
        if rec["id"] in done:
            rec["judge"] = done[rec["id"]]


# --------------------------------------------------------------------------------------------- CLI


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    from videollm.chat import add_generation_args, add_model_args

    parser = argparse.ArgumentParser(prog="python -m videollm.evaluate", description=__doc__.split("\n")[0])
    add_model_args(parser)
    parser.add_argument("--benchmark", required=True, help=f"one of: {', '.join(benchmark_names())}")
    parser.add_argument("--data-root", required=True, help="the folder the benchmark's files are in")
    parser.add_argument("--limit", type=int, default=None, help="only the first N samples")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--output", default=None, help="output folder (default output/eval/<benchmark>); reruns resume")
    parser.add_argument("--overwrite", action="store_true", help="start over instead of resuming --output")
    parser.add_argument("--prompt-style", default=None, choices=PromptStyle.STYLES,
                        help="how questions are asked (default: the benchmark's own, e.g. pllava for mvbench)")
    parser.add_argument("--no-fallback", action="store_true",
                        help="multiple choice: an unparsable reply is wrong (default: a reproducible random option)")
    parser.add_argument("--judge-url", default=None, help="OpenAI-compatible endpoint for open-ended QA, e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--judge-model", default="gpt-3.5-turbo")
    parser.add_argument("--judge-api-key", default=None, help="default: $OPENAI_API_KEY")
    parser.add_argument("--judge-workers", type=int, default=4)
    parser.add_argument("--judge-timeout", type=float, default=60.0)
    parser.add_argument("--no-progress", action="store_true")
    add_generation_args(parser)
    parser.set_defaults(max_new_tokens=None)
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    from videollm import dist

    try:
        info = dist.init_distributed("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
        if info.device.type == "cuda":
            args.gpu_id = info.local_rank
        bench = load_benchmark(args.benchmark, args.data_root, prompt_style=args.prompt_style)
        from videollm.chat import build_chat_from_args

        chat, template, notices = build_chat_from_args(args)
        for notice in notices:
            if info.is_main:
                print(f"notice: {notice}", file=err)
        gen = GenerationSettings(
            max_new_tokens=args.max_new_tokens or DEFAULT_MAX_NEW_TOKENS[bench.kind], max_length=args.max_length,
            num_beams=args.num_beams, temperature=args.temperature, top_p=args.top_p, do_sample=bool(args.do_sample))
        judge = None
        if args.judge_url:
            from videollm.benchmarks.judge import JudgeClient

            judge = JudgeClient(args.judge_url, args.judge_model, args.judge_api_key or os.environ.get("OPENAI_API_KEY"),
                                timeout=args.judge_timeout)
        out_dir = Path(args.output or os.path.join("output", "eval", bench.name))
        opts = EvalOptions(batch_size=args.batch_size, limit=args.limit, generation=gen,
                           fallback=None if args.no_fallback else "random", progress=not args.no_progress,
                           overwrite=args.overwrite, judge=judge, judge_workers=args.judge_workers,
                           meta={"cfg_path": args.cfg_path, "ckpt": str(getattr(chat.model.cfg, "ckpt", "") or "")})
        summary = evaluate(chat, template, bench, out_dir, opts)
    except VideoLLMError as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=err)
        return 2
    finally:
        dist.cleanup()
    if summary is not None:
        print((out_dir / "results.md").read_text(encoding="utf-8"), file=out)
        print(f"wrote {out_dir}/predictions.jsonl, summary.json, results.md"
              + (", accuracy.png" if "chart" in summary.get("outputs", {}) else ""), file=out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
