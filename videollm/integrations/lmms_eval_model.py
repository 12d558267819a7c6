"""The lmms-eval model class of videollm (imported by lmms-eval only; see :mod:`.lmms_eval`).

``--model_args`` (``key=value,...``): ``cfg_path`` (an eval config, required), ``ckpt`` (a
file or glob replacing ``model.ckpt``), ``model_type`` (chat template; default the model's),
``device`` ("cpu", "cuda",
"cuda:1"; default CUDA when available), ``options`` (config overrides separated by spaces or
semicolons, as ``--options``), ``max_new_tokens`` (a cap over the task's). lmms-eval's own
``--batch_size`` sets how many questions go into one ``generate`` call (default 1).

``generate_until`` answers each request as a one-turn conversation about its video(s) with the
task's text as the question; ``generate_until_multi_round`` keeps one conversation per document
and asks each round's text as a new user turn (the task's ``doc_to_text`` says when to stop).
Generation is greedy unless the task asks for ``temperature > 0``; the reply is cut at the
task's ``until`` strings. ``loglikelihood`` is not offered (generative models only).
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from tqdm import tqdm

from videollm.chat import GenerationSettings, build_chat_from_args, new_conversation
from videollm.errors import ConfigError

logger = logging.getLogger(__name__)


def _truthy(value: Any) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "on")


def settings_from_gen_kwargs(gen_kwargs: Dict[str, Any], cap: Optional[int] = None) -> Tuple[GenerationSettings, List[str]]:
    """lmms-eval generation kwargs -> (GenerationSettings, stop strings)."""
    g = dict(gen_kwargs or {})
    until = g.pop("until", None) or []
    until = [until] if isinstance(until, str) else [u for u in until if u]
    max_new = int(g.get("max_new_tokens") or g.get("max_gen_toks") or 128)
    if cap:
        max_new = min(max_new, int(cap))
    temperature = float(g.get("temperature") or 0.0)
    sample = _truthy(g.get("do_sample", False)) or temperature > 0
    s = GenerationSettings(max_new_tokens=max_new, num_beams=int(g.get("num_beams") or 1),
                           top_p=float(g.get("top_p") or 0.9) if sample else 0.9,
                           temperature=temperature if sample and temperature > 0 else 1.0, do_sample=sample)
    return s, until


def cut_at(text: str, until: Sequence[str]) -> str:
    for stop in until:
        if stop and stop in text:
            text = text.split(stop)[0]
    return text


class VideoLLMEval(lmms):
    """Any registered videollm model, through the Chat API, as an lmms-eval "simple" model."""

    is_simple = True

    def __init__(self, cfg_path: str, ckpt: Optional[str] = None, model_type: Optional[str] = None,
                 batch_size: int | str = 1, device: Optional[str] = None, options: Optional[str] = None,
                 max_new_tokens: Optional[int | str] = None, **kwargs: Any) -> None:
        super().__init__()
        if kwargs:
            logger.warning("videollm model: ignoring unknown model_args %s", sorted(kwargs))
        if not cfg_path:
            raise ConfigError("--model_args cfg_path=... is required (an eval config, e.g. eval_configs/tiny.yaml)")
        self._rank = int(os.environ.get("RANK", 0) or 0)
        self._world_size = int(os.environ.get("WORLD_SIZE", 1) or 1)
        dev = str(device or "")
        gpu_id = None
        if dev.startswith("cuda"):
            gpu_id = int(dev.split(":")[1]) if ":" in dev else int(os.environ.get("LOCAL_RANK", 0) or 0)
        args = argparse.Namespace(
            cfg_path=cfg_path, options=[o for o in str(options or "").replace(";", " ").split() if o] or None,
            model_type=model_type, gpu_id=gpu_id, cpu=dev == "cpu", ckpt=ckpt, low_resource=False, load_in_4bit=False,
            device_map=None, vit_on_cpu=False)
        self.chat, self.template, notices = build_chat_from_args(args)
        for notice in notices:
            logger.warning("%s", notice)
        self.batch_size_per_gpu = max(1, int(batch_size))
        self.max_new_tokens_cap = int(max_new_tokens) if max_new_tokens else None

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    # ------------------------------------------------------------------ lmms API
    def loglikelihood(self, requests: List[Instance]) -> List[Tuple[float, bool]]:
        raise NotImplementedError("the videollm lmms-eval model is generative: use generate_until tasks")

    def _visuals(self, doc_to_visual, task: str, split: str, doc_id: int) -> List[str]:
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) or []
        paths = [v for v in visuals if isinstance(v, str)]
        if len(paths) != len(visuals):
            raise ConfigError(f"task {task}: doc {doc_id}: the videollm model takes video file paths from doc_to_visual")
        return paths

    def generate_until(self, requests: List[Instance]) -> List[str]:
        from videollm.evaluate import ask_batch

        out: List[Optional[str]] = [None] * len(requests)
        groups: Dict[str, List[int]] = {}
        for i, req in enumerate(requests):  # batch requests that share generation settings
            groups.setdefault(repr(sorted((req.args[1] or {}).items())), []).append(i)
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="videollm")
        for idxs in groups.values():
            settings, until = settings_from_gen_kwargs(requests[idxs[0]].args[1], self.max_new_tokens_cap)
            for start in range(0, len(idxs), self.batch_size):
                chunk = idxs[start:start + self.batch_size]
                videos, texts = [], []
                for i in chunk:
                    context, _, doc_to_visual, doc_id, task, split = requests[i].args
                    paths = self._visuals(doc_to_visual, task, split, doc_id)
                    if len(paths) != 1:
                        raise ConfigError(f"task {task}: doc {doc_id}: expected one video, got {len(paths)} visuals")
                    videos.append(paths[0])
                    texts.append(context)
                for i, res in zip(chunk, ask_batch(self.chat, self.template, videos, texts, settings)):
                    if isinstance(res, BaseException):
                        logger.error("request %d (%s): %s: %s", i, videos[chunk.index(i)], type(res).__name__, res)
                        out[i] = ""
                    else:
                        out[i] = cut_at(res[1], until)
                    self.cache_hook.add_partial("generate_until", (requests[i].args[0], requests[i].args[1]), out[i])
                bar.update(len(chunk))
        bar.close()
        return [o or "" for o in out]

    def generate_until_multi_round(self, requests: List[Instance]) -> List[Tuple[str, ...]]:
        """One conversation per document; round r > 0 asks what ``doc_to_text(doc, previous_output=...,
        round_idx=r, previous_round_info=...)`` returns, until it signals the end."""
        results: List[Tuple[str, ...]] = []
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="videollm multi-round")
        for start in range(0, len(requests), self.batch_size):
            chunk = requests[start:start + self.batch_size]
            settings, until = settings_from_gen_kwargs(chunk[0].args[1], self.max_new_tokens_cap)
            convs, medias, docs, text_fns = [], [], [], []
            for req in chunk:
                context, _, doc_to_visual, doc_to_text, doc_id, task, split = req.args
                paths = self._visuals(doc_to_visual, task, split, doc_id)
                conv = new_conversation(self.template, "video")
                img_list: List[Any] = []
                for p in paths:
                    self.chat.upload_video_without_audio(p, conv, img_list)
                self.chat.ask(context, conv)
                convs.append(conv)
                medias.append(img_list)
                docs.append(self.task_dict[task][split][doc_id])
                text_fns.append(doc_to_text)
            rounds: List[List[str]] = [[] for _ in chunk]
            infos: List[Any] = [None] * len(chunk)
            active = list(range(len(chunk)))
            round_idx = 0
            while active:
                if round_idx > 0:
                    still = []
                    for k in active:
                        _, context, terminal, _, info = text_fns[k](docs[k], previous_output=list(rounds[k]),
                                                                   round_idx=round_idx, previous_round_info=infos[k])
                        infos[k] = info
                        if not terminal:
                            self.chat.ask(context, convs[k])
                            still.append(k)
                    active = still
                    if not active:
                        break
                answers = self.chat.answer_batch([convs[k] for k in active], [medias[k] for k in active], settings)
                for k, (text, _) in zip(active, answers):
                    rounds[k].append(cut_at(text, until))
                round_idx += 1
            for req, r in zip(chunk, rounds):
                results.append(tuple(r))
                self.cache_hook.add_partial("generate_until_multi_round", (req.args[0], req.args[1]), list(r))
            bar.update(len(chunk))
        bar.close()
        return results
