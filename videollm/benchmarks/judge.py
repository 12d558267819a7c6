"""LLM judge of open-ended answers through any OpenAI-compatible endpoint (Video-ChatGPT protocol).

Video-ChatGPT's QA evaluation (its ``evaluate_activitynet_qa.py``, used for MSVD-QA, MSRVTT-QA,
ActivityNet-QA and TGIF-QA by Video-ChatGPT, Video-LLaVA, PLLaVA, ...) asks a chat model to
compare the predicted answer with the reference and to reply with a Python dict
``{'pred': 'yes'|'no', 'score': 0-5}``; accuracy is the share of "yes", the score the mean.
:data:`SYSTEM_PROMPT` and :data:`USER_PROMPT` are the protocol's prompt; every request's messages
and the judge's raw reply are recorded with the verdict.

The endpoint is any server speaking ``POST {base_url}/chat/completions`` (OpenAI, vLLM,
``llamafactory-cli api``, ``videollm.serve``); the client uses only the standard library, with a
timeout and bounded retries, so a dead judge ends the run with a clear error instead of hanging.
"""

from __future__ import annotations

import ast
import json
import logging
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from videollm.errors import VideoLLMError

logger = logging.getLogger(__name__)

SYSTEM_PROMPT = (
    "You are an intelligent chatbot designed for evaluating the correctness of generative outputs for "
    "question-answer pairs. Your task is to compare the predicted answer with the correct answer and determine "
    "if they match meaningfully. Here's how you can accomplish the task:"
    "------"
    "##INSTRUCTIONS: "
    "- Focus on the meaningful match between the predicted answer and the correct answer.\n"
    "- Consider synonyms or paraphrases as valid matches.\n"
    "- Evaluate the correctness of the prediction compared to the answer."
)
USER_PROMPT = (
    "Please evaluate the following video-based question-answer pair:\n\n"
    "Question: {question}\n"
    "Correct Answer: {answer}\n"
    "Predicted Answer: {prediction}\n\n"
    "Provide your evaluation only as a yes/no and score where the score is an integer value between 0 and 5, "
    "with 5 indicating the highest meaningful match. "
    "Please generate the response in the form of a Python dictionary string with keys 'pred' and 'score', "
    "where value of 'pred' is  a string of 'yes' or 'no' and value of 'score' is in INTEGER, not STRING."
    "DO NOT PROVIDE ANY OTHER OUTPUT TEXT OR EXPLANATION. Only provide the Python dictionary string. "
    "For example, your response should look like this: {{'pred': 'yes', 'score': 4.8}}."
)


class JudgeError(VideoLLMError):
    """The judge endpoint could not be reached or kept failing."""


@dataclass
class Verdict:
    pred: Optional[str]  # "yes" / "no"; None when the reply could not be read
    score: Optional[float]
    raw: str
    messages: List[Dict[str, str]] = field(default_factory=list)
    model: str = ""

    def to_json(self) -> Dict[str, Any]:
        return {"pred": self.pred, "score": self.score, "raw": self.raw, "model": self.model, "messages": self.messages}


def parse_verdict(reply: str) -> tuple:
    """``"{'pred': 'yes', 'score': 4}"`` (or JSON, or prose around it) -> ("yes", 4.0)."""
    text = reply or ""
    m = re.search(r"\{.*?\}", text, flags=re.DOTALL)
    if m:
        for parse in (ast.literal_eval, json.loads):
            try:
                obj = parse(m.group(0))
            except (ValueError, SyntaxError, TypeError):
                continue
            if isinstance(obj, dict):
                pred = str(obj.get("pred", "")).strip().lower()
                try:
                    score = float(obj.get("score")) if obj.get("score") is not None else None
                except (TypeError, ValueError):
                    score = None
                if pred in ("yes", "no"):
                    return pred, score
    pm = re.search(r"['\"]?pred['\"]?\s*[:=]\s*['\"]?(yes|no)", text, flags=re.IGNORECASE)
    sm = re.search(r"['\"]?score['\"]?\s*[:=]\s*['\"]?([0-9]+(?:\.[0-9]+)?)", text, flags=re.IGNORECASE)
    return (pm.group(1).lower() if pm else None), (float(sm.group(1)) if sm else None)


class JudgeClient:
    """Chat completions against ``base_url`` (e.g. ``http://127.0.0.1:8000/v1``)."""

    def __init__(self, base_url: str, model: str = "gpt-3.5-turbo", api_key: Optional[str] = None,
                 timeout: float = 60.0, retries: int = 3, backoff: float = 1.0, max_tokens: int = 64) -> None:
        if not re.match(r"^https?://", base_url or ""):
            raise JudgeError(f"--judge-url {base_url!r}: expected an http(s) URL such as http://127.0.0.1:8000/v1")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key = model, api_key
        self.timeout, self.retries, self.backoff, self.max_tokens = float(timeout), int(retries), float(backoff), int(max_tokens)

    def messages(self, question: str, answer: str, prediction: str) -> List[Dict[str, str]]:
        return [{"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": USER_PROMPT.format(question=question, answer=answer, prediction=prediction)}]

    def complete(self, messages: List[Dict[str, str]]) -> str:
        body = json.dumps({"model": self.model, "messages": messages, "temperature": 0,
                           "max_tokens": self.max_tokens}).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last = ""
        for attempt in range(self.retries + 1):
            req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    data = json.loads(resp.read().decode("utf-8"))
                return str(data["choices"][0]["message"]["content"])
            except urllib.error.HTTPError as exc:
                detail = exc.read().decode("utf-8", errors="replace")[:300]
                last = f"HTTP {exc.code}: {detail}"
                if exc.code in (400, 401, 403, 404, 422):  # not going to get better
                    break
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as exc:
                last = f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"
            except (KeyError, IndexError, TypeError, json.JSONDecodeError) as exc:
                last = f"unexpected reply ({type(exc).__name__}: {exc})"
            if attempt < self.retries:
                time.sleep(self.backoff * (2 ** attempt))
        raise JudgeError(f"judge {self.url} (model {self.model}): {last} after {self.retries + 1} attempt(s)")

    def judge(self, question: str, answer: str, prediction: str) -> Verdict:
        messages = self.messages(question, answer, prediction)
        raw = self.complete(messages)
        pred, score = parse_verdict(raw)
        if pred is None:
            logger.warning("judge reply not understood (counted as unjudged): %r", raw[:200])
        return Verdict(pred, score, raw, messages, self.model)


__all__ = ["JudgeClient", "JudgeError", "SYSTEM_PROMPT", "USER_PROMPT", "Verdict", "parse_verdict"]
