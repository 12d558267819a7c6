"""An OpenAI-compatible HTTP server for any registered model (FastAPI + uvicorn).

    python -m videollm.serve --cfg-path eval_configs/tiny.yaml --media-root data/synthetic
    python -m videollm.serve --cfg-path FILE --host 0.0.0.0 --port 8000 --api-key KEY   # exposed

Endpoints: ``GET /v1/models``, ``GET /v1/models/{id}``, ``POST /v1/chat/completions`` and an
unauthenticated ``GET /health`` (status and batching counters). The model is built from an eval
config exactly as the CLI and the demo build it (:func:`videollm.chat.build_chat_from_args`), and
every answer goes through the Chat API, so prompts follow the model's chat template
(:mod:`videollm.templates`) and media its own loaders.

Requests (the OpenAI chat-completions format):

* ``messages``: ``system`` / ``developer`` texts become the conversation's system text (joined
  by newlines; without one, the template's own system for the first medium's kind is used);
  ``user`` and ``assistant`` turns map onto the template's two roles, consecutive turns of one
  role are joined into one, and the last message must be the user's. A user message's
  ``content`` is a string or a list of parts: ``{"type": "text", "text"}``, ``{"type":
  "image_url", "image_url": {"url"}}`` and ``{"type": "video_url", "video_url": {"url"}}``.
  The media of a message come first, then its text (the template's order: Video-LLaMA's
  ``<Video><ImageHere></Video> ... question``).
* Media URLs: ``file:///absolute/path`` under ``--media-root`` (refused when no root is given;
  symbolic links are resolved before the check), or ``data:<mime>;base64,...`` (decoded to a
  temporary file, at most ``--max-media-mb`` each, deleted after the request). Any other scheme
  (``http``, ``https``, a bare path, ...) is refused with a clear error; the server never fetches
  anything from the network.
* ``max_tokens`` (or ``max_completion_tokens``), ``temperature`` (absent or 0: greedy, the
  project's default; > 0 samples), ``top_p`` (used when sampling), ``stop`` (a string or up to 4),
  ``stream`` (server-sent events in OpenAI's ``chat.completion.chunk`` format, ending with
  ``data: [DONE]``; ``stream_options.include_usage`` adds a usage chunk), ``n`` (1 only).
  Unknown fields are ignored, as OpenAI-compatible servers commonly do.

Batching: one worker thread owns the model. Non-streaming requests that use the same template
and sampling settings are grouped: the worker waits up to ``--batch-wait-ms`` for more after the
first (or until ``--max-batch-size``), longer (up to ``--arrival-wait-ms``) while other requests
are still having their media decoded (a burst of clients), and answers the group with one
:meth:`~videollm.chat.Chat.answer_batch` call (left-padded); requests that arrive while a batch
generates form the next group. Each row keeps its own ``max_tokens`` (the group generates the
longest and the others are cut to their own count, which greedy decoding makes identical to a
shorter run). When a group fails, its rows are retried one by one, so one bad row does not fail
the others. Streaming requests are answered one at a time by the same worker
(:meth:`~videollm.chat.Chat.stream_answer`); a client that disconnects cancels its generation.
Media files are decoded in the request handlers (``--prepare-workers`` at a time, default the
CPU cores) before the request is queued; media embeddings are computed by the worker at answer
time (the Chat's lazy encoding). Keep this module's top-level imports to the standard library:
each decode runs in a child process that re-imports the main module (multiprocessing's
forkserver), so a heavy import here is paid per clip (FastAPI cost ~1 s per decode on a busy
2-core machine).

``stop`` strings cut the answer (and end a stream at once); a batched generation does not end
early on them (it stops on the template's stop string, EOS or ``max_tokens``). ``usage`` counts
the prompt's text tokens plus the media tokens, and the generated tokens (a streamed answer's
text re-tokenised, which can differ by a token or two).

Safety: the server binds to 127.0.0.1 by default; binding to any other address needs an API key
(``--api-key`` or the ``VIDEOLLM_API_KEY`` environment variable), then checked on every
``/v1`` request (``Authorization: Bearer KEY``, constant-time comparison). There is no TLS: put
a reverse proxy in front of an exposed server. Request bodies over ``--max-body-mb`` are refused
(413) before they are read in full. Every bad request is answered with an OpenAI-style error
object ``{"error": {"message", "type", "param", "code"}}`` and its HTTP status (400 invalid
request, 401 API key, 403 file outside the media root, 404 unknown model or URL, 405 method,
413 body too large, 503 queue full or shutting down, 504 timeout, 500 unexpected failure).
"""

import argparse
import asyncio
import base64
import binascii
import concurrent.futures
import dataclasses
import hmac
import ipaddress
import json
import logging
import os
import queue
import shutil
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections import deque
from typing import TYPE_CHECKING, Any, AsyncIterator, Deque, Dict, List, Optional, Sequence, Tuple
from urllib.parse import unquote, urlparse

if TYPE_CHECKING:  # the heavy imports (torch) happen when a server is built, not for --help
    from videollm.chat import Chat, GenerationSettings
    from videollm.conversation import Conversation

logger = logging.getLogger(__name__)

MB = 1024 * 1024
MEDIA_PARTS = {"image_url": "image", "video_url": "video"}
SYSTEM_ROLES = ("system", "developer")
_MIME_SUFFIX = {
    "video/mp4": ".mp4", "video/webm": ".webm", "video/quicktime": ".mov", "video/x-matroska": ".mkv",
    "video/x-msvideo": ".avi", "video/mpeg": ".mpg", "image/jpeg": ".jpg", "image/jpg": ".jpg",
    "image/png": ".png", "image/webp": ".webp", "image/gif": ".gif", "image/bmp": ".bmp",
}


# ---------------------------------------------------------------------------------------------
# Settings and errors


@dataclasses.dataclass
class ServeConfig:
    """Limits and options of one server (the command-line flags of ``python -m videollm.serve``)."""

    model_name: str = "videollm"
    template: str = "vicuna"
    media_root: Optional[str] = None  # file:// URLs must point under it; None: file URLs refused
    api_key: Optional[str] = None
    max_body_bytes: int = 64 * MB
    max_media_bytes: int = 32 * MB  # one decoded data: URL
    max_media: int = 8  # media parts per request
    max_batch_size: int = 16
    batch_wait_ms: float = 5.0  # always waited for more after a group's first request
    # waited longer while other requests are still having their media decoded (they are coming)
    arrival_wait_ms: float = 1000.0
    max_queue: int = 256
    max_length: int = 2000  # context: prompt + new tokens (capped by the LLM's positions)
    default_max_tokens: int = 256
    max_tokens_limit: int = 1024
    request_timeout: float = 300.0
    # media decodes at once: more than the cores only slows each decode and the generation down
    prepare_workers: int = dataclasses.field(default_factory=lambda: max(1, min(4, os.cpu_count() or 1)))
    audio: bool = False  # use a video's sound (models with an audio branch)


class OpenAIError(Exception):
    """A request that cannot be served: its HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> Dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _invalid(message: str, param: Optional[str] = None, code: Optional[str] = None) -> OpenAIError:
    return OpenAIError(400, message, "invalid_request_error", param, code)


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and "localhost"; any other address or name is "exposed"."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# ---------------------------------------------------------------------------------------------
# Parsing a request


@dataclasses.dataclass
class MediaRef:
    kind: str  # "video" or "image"
    url: str
    param: str  # where it is in the request, e.g. messages[0].content[1].video_url.url


@dataclasses.dataclass
class Turn:
    role: str  # "system", "user" or "assistant"
    text: str
    media: List[MediaRef] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class CompletionRequest:
    model: str
    turns: List[Turn]
    stream: bool = False
    include_usage: bool = False
    max_tokens: int = 256
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    stop: List[str] = dataclasses.field(default_factory=list)
    max_tokens_given: bool = False  # False: the server's default, shortened to fit the context

    @property
    def do_sample(self) -> bool:
        return self.temperature is not None and self.temperature > 0


def _number(body: Dict[str, Any], key: str, low: float, high: float, low_open: bool = False) -> Optional[float]:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _invalid(f"'{key}' must be a number, got {type(value).__name__}", key, "invalid_type")
    if value < low or (low_open and value == low) or value > high:
        bound = f"({low}" if low_open else f"[{low}"
        raise _invalid(f"'{key}'={value} is out of range {bound}, {high}]", key, "invalid_value")
    return float(value)


def _content(content: Any, where: str, role: str) -> Tuple[str, List[MediaRef]]:
    """A message's content (a string, or a list of text / image_url / video_url parts)."""
    if content is None:
        return "", []
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise _invalid(f"{where}.content must be a string or a list of parts", f"{where}.content", "invalid_type")
    texts: List[str] = []
    media: List[MediaRef] = []
    for j, part in enumerate(content):
        pwhere = f"{where}.content[{j}]"
        if not isinstance(part, dict):
            raise _invalid(f"{pwhere} must be an object with a 'type'", pwhere, "invalid_type")
        ptype = part.get("type")
        if ptype == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise _invalid(f"{pwhere}.text must be a string", f"{pwhere}.text", "invalid_type")
            texts.append(text)
        elif ptype in MEDIA_PARTS:
            if role != "user":
                raise _invalid(f"{pwhere}: {ptype} parts are only accepted in user messages", pwhere,
                               "invalid_value")
            ref = part.get(ptype)
            url = ref.get("url") if isinstance(ref, dict) else ref
            if not isinstance(url, str) or not url:
                raise _invalid(f"{pwhere}.{ptype}.url must be a non-empty string", f"{pwhere}.{ptype}.url",
                               "invalid_type")
            media.append(MediaRef(MEDIA_PARTS[ptype], url, f"{pwhere}.{ptype}.url"))
        else:
            raise _invalid(f"{pwhere}: unsupported content part type {ptype!r}; supported: text, image_url, "
                           "video_url", f"{pwhere}.type", "invalid_value")
    return "\n".join(texts), media


def parse_request(raw: bytes, cfg: ServeConfig) -> CompletionRequest:
    """The JSON body of ``/v1/chat/completions`` -> a checked :class:`CompletionRequest`.

    Raises :class:`OpenAIError` (400/404) naming the offending field."""
    try:
        body = json.loads(raw)
    except UnicodeDecodeError:
        raise _invalid("the request body is not UTF-8 text", None, "invalid_json") from None
    except json.JSONDecodeError as exc:
        raise _invalid(f"the request body is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})",
                       None, "invalid_json") from None
    except RecursionError:
        raise _invalid("the request body is nested too deeply", None, "invalid_json") from None
    if not isinstance(body, dict):
        raise _invalid("the request body must be a JSON object", None, "invalid_json")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _invalid("you must provide a model parameter", "model", "missing_required_parameter")
    if model != cfg.model_name:
        raise OpenAIError(404, f"The model '{model}' does not exist; this server serves '{cfg.model_name}'",
                          "invalid_request_error", "model", "model_not_found")
    n = body.get("n")
    if n is not None and n != 1:
        raise _invalid(f"'n'={n!r}: only n=1 is supported", "n", "invalid_value")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _invalid("'stream' must be true or false", "stream", "invalid_type")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise _invalid("'stream_options' must be an object", "stream_options", "invalid_type")

    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(key)
    if max_tokens is None:
        max_tokens = min(cfg.default_max_tokens, cfg.max_tokens_limit)
    elif isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
        raise _invalid(f"'{key}' must be an integer", key, "invalid_type")
    elif not 1 <= max_tokens <= cfg.max_tokens_limit:
        raise _invalid(f"'{key}'={max_tokens} is out of range [1, {cfg.max_tokens_limit}] (this server's limit)",
                       key, "invalid_value")
    temperature = _number(body, "temperature", 0.0, 2.0)
    top_p = _number(body, "top_p", 0.0, 1.0, low_open=True)
    stop = body.get("stop")
    if stop is None:
        stops: List[str] = []
    elif isinstance(stop, str):
        stops = [stop] if stop else []
    elif isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) and s for s in stop):
        stops = list(stop)
    else:
        raise _invalid("'stop' must be a string or a list of at most 4 non-empty strings", "stop", "invalid_value")

    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _invalid("'messages' must be a non-empty list", "messages", "invalid_value")
    turns: List[Turn] = []
    n_media = 0
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _invalid(f"{where} must be an object with 'role' and 'content'", where, "invalid_type")
        role = message.get("role")
        if role not in ("system", "developer", "user", "assistant"):
            raise _invalid(f"{where}.role={role!r}: expected system, user or assistant", f"{where}.role",
                           "invalid_value")
        role = "system" if role in SYSTEM_ROLES else role
        text, media = _content(message.get("content"), where, role)
        if role == "assistant" and not text.strip():
            raise _invalid(f"{where}: an assistant message needs text content", f"{where}.content", "invalid_value")
        n_media += len(media)
        turns.append(Turn(role, text, media))
    if n_media > cfg.max_media:
        raise _invalid(f"the request has {n_media} media parts; this server accepts at most {cfg.max_media}",
                       "messages", "too_many_media")
    dialogue = [t for t in turns if t.role != "system"]
    if not dialogue or dialogue[0].role != "user":
        raise _invalid("the first message after the system messages must be a user message", "messages",
                       "invalid_value")
    if dialogue[-1].role != "user":
        raise _invalid("the last message must be a user message (the server writes the assistant's reply)",
                       "messages", "invalid_value")
    if not any(t.text.strip() or t.media for t in dialogue if t.role == "user"):
        raise _invalid("the user messages are empty", "messages", "invalid_value")
    return CompletionRequest(model, turns, stream, bool(options.get("include_usage")), int(max_tokens),
                             temperature, top_p, stops, max_tokens_given=body.get(key) is not None)


# ---------------------------------------------------------------------------------------------
# Media URLs


class MediaFiles:
    """Resolves media URLs of one request to local files; temporary files go with :meth:`close`."""

    def __init__(self, cfg: ServeConfig) -> None:
        self.cfg = cfg
        self._tmp: Optional[str] = None

    def close(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def resolve(self, ref: MediaRef) -> str:
        url = ref.url.strip()
        scheme = url.split(":", 1)[0].lower() if ":" in url else ""
        if scheme == "data":
            return self._data(url, ref)
        if scheme == "file":
            return self._file(url, ref)
        shown = url if len(url) <= 80 else url[:77] + "..."
        what = f"URL scheme {scheme!r}" if scheme and "/" not in scheme else "a URL without a scheme"
        raise _invalid(f"{ref.param}: {shown!r}: {what} is not supported; this server reads file:// URLs under "
                       "its media root and data: URLs (base64), and fetches nothing from the network",
                       ref.param, "unsupported_url_scheme")

    def _file(self, url: str, ref: MediaRef) -> str:
        parsed = urlparse(url)
        if parsed.netloc not in ("", "localhost"):
            raise _invalid(f"{ref.param}: {url!r}: file URLs must be file:///absolute/path (host "
                           f"{parsed.netloc!r} given)", ref.param, "invalid_url")
        path = unquote(parsed.path)
        if self.cfg.media_root is None:
            raise OpenAIError(403, f"{ref.param}: {url!r}: file:// URLs are disabled on this server (start it "
                              "with --media-root DIR to allow files under DIR)", "permission_error", ref.param,
                              "file_urls_disabled")
        root = os.path.realpath(self.cfg.media_root)
        real = os.path.realpath(path)
        if not os.path.isabs(path) or os.path.commonpath([real, root]) != root:
            raise OpenAIError(403, f"{ref.param}: {path}: outside the media root {self.cfg.media_root}",
                              "permission_error", ref.param, "media_outside_root")
        if not os.path.exists(real):
            raise _invalid(f"{ref.param}: {path}: no such file", ref.param, "media_not_found")
        if not os.path.isfile(real):
            raise _invalid(f"{ref.param}: {path}: not a regular file", ref.param, "invalid_media")
        return real

    def _data(self, url: str, ref: MediaRef) -> str:
        header, sep, payload = url.partition(",")
        if not sep:
            raise _invalid(f"{ref.param}: a data: URL needs a ',' before its data", ref.param, "invalid_url")
        fields = header[5:].split(";")
        mime = fields[0].strip().lower()
        if "base64" not in [f.strip().lower() for f in fields[1:]]:
            raise _invalid(f"{ref.param}: data: URLs must be base64 (data:{mime or 'MIME'};base64,...)", ref.param,
                           "invalid_url")
        limit = self.cfg.max_media_bytes
        if len(payload) * 3 // 4 > limit + 2:
            raise OpenAIError(413, f"{ref.param}: the data: URL holds about {len(payload) * 3 // 4 / MB:.1f} MiB; "
                              f"the limit is {limit / MB:.1f} MiB per medium", "invalid_request_error",
                              ref.param, "media_too_large")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise _invalid(f"{ref.param}: the data: URL is not valid base64", ref.param, "invalid_base64") from None
        if not data:
            raise _invalid(f"{ref.param}: the data: URL is empty", ref.param, "invalid_media")
        if self._tmp is None:
            self._tmp = tempfile.mkdtemp(prefix="videollm-serve-")
        suffix = _MIME_SUFFIX.get(mime, ".mp4" if ref.kind == "video" else ".img")
        path = os.path.join(self._tmp, f"{ref.param.replace('.', '_').replace('[', '').replace(']', '')}{suffix}")
        with open(path, "wb") as f:
            f.write(data)
        return path


# ---------------------------------------------------------------------------------------------
# OpenAI messages -> the model's conversation


def _join(a: str, b: str, sep: str = "\n") -> str:
    if not a:
        return b
    if not b:
        return a
    return a + b if a[-1].isspace() else a + sep + b


def build_conversation(chat: "Chat", template_name: str, turns: Sequence[Turn], files: MediaFiles,
                       with_audio: bool = False) -> Tuple["Conversation", List[Any]]:
    """Map the request's turns onto a conversation of the template, uploading media through the chat.

    Returns ``(conv, img_list)``, ready for ``chat.answer*``. Media errors propagate as
    :class:`~videollm.errors.VideoLLMError` naming the file (or :class:`OpenAIError` for URLs).
    """
    from videollm.templates import get_template, template_of

    template = get_template(template_name)
    first = next((m.kind for t in turns for m in t.media), None)
    conv = template.new_conversation(first) if first in template.media_messages or first in template.media_system \
        else template.new_conversation()
    systems = [t.text for t in turns if t.role == "system" and t.text.strip()]
    if systems:
        conv.system = "\n".join(systems)
    img_list: List[Any] = []
    user, assistant = conv.roles
    for turn in turns:
        if turn.role == "system":
            continue
        if turn.role == "assistant":
            if conv.messages and conv.messages[-1][0] == assistant:
                conv.messages[-1][1] = _join(conv.messages[-1][1] or "", turn.text)
            else:
                conv.append_message(assistant, turn.text)
            continue
        start = len(conv.messages)
        for ref in turn.media:
            path = files.resolve(ref)
            if ref.kind == "video":
                chat.upload_video(path, conv, img_list, with_audio=with_audio)
            else:
                chat.upload_img(path, conv, img_list)
        added = conv.messages[start:]
        if len(added) > 1:  # several media in one message: one user turn
            merged = ""
            for _, text in added:
                merged = _join(merged, text or "", " ")
            del conv.messages[start + 1:]
            conv.messages[start][1] = merged
        if start > 0 and len(conv.messages) > start and conv.messages[start - 1][0] == user:
            # consecutive user messages: one turn (the template alternates roles)
            prev = conv.messages.pop(start)
            conv.messages[start - 1][1] = _join(conv.messages[start - 1][1] or "", prev[1] or "", " ")
        if not turn.text.strip():
            continue
        last = conv.messages[-1] if conv.messages else None
        markers = template_of(conv).media_markers
        if (last is not None and last[0] == user and last[1]
                and not any(marker in last[1] for marker in markers)):
            last[1] = _join(last[1], turn.text)  # a second user text in a row
        else:
            chat.ask(turn.text, conv)
    return conv, img_list


def prompt_token_count(chat: "Chat", conv: "Conversation", img_list: Sequence[Any]) -> int:
    """Text tokens of the prompt (with the empty assistant turn) plus each medium's tokens."""
    try:
        probe = conv.copy()
        probe.append_message(probe.roles[1], None)
        pieces = probe.get_prompt().split(chat.model.media_placeholder)
        tok = chat.tokenizer
        n = 1 + sum(len(tok(p, add_special_tokens=False)["input_ids"]) for p in pieces if p)
        for entry in img_list:
            media = getattr(entry, "media", None)
            n += int(chat.model.num_media_tokens(media)) if media is not None else int(entry.shape[-2])
        return n
    except Exception:  # noqa: BLE001 - usage is informative; never fail a request over it
        logger.debug("prompt token count failed", exc_info=True)
        return 0


def _cut_at_stops(text: str, stops: Sequence[str]) -> Tuple[str, bool]:
    cuts = [text.find(s) for s in stops if s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of ``text`` that may still grow into a stop string."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return hold


# ---------------------------------------------------------------------------------------------
# The batching worker


@dataclasses.dataclass
class Job:
    """One prepared request waiting for the model."""

    request: CompletionRequest
    conv: Any
    img_list: List[Any]
    settings: "GenerationSettings"
    loop: Optional[asyncio.AbstractEventLoop] = None
    future: "concurrent.futures.Future[Dict[str, Any]]" = dataclasses.field(default_factory=concurrent.futures.Future)
    events: Optional["asyncio.Queue[Tuple[str, Any]]"] = None  # streaming: ("text", s) / ("end", info) / ("error", e)
    cancel: threading.Event = dataclasses.field(default_factory=threading.Event)
    prompt_tokens: int = 0

    def resolve(self, result: Any = None, error: Optional[BaseException] = None) -> None:
        """Set the non-streaming result once (a request that timed out has cancelled it)."""
        try:
            if self.future.done():
                return
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(result)
        except concurrent.futures.InvalidStateError:
            pass

    @property
    def key(self) -> Tuple[Any, ...]:
        """Requests with equal keys can share one generate call."""
        s = self.settings
        return (self.conv.template, s.do_sample, s.temperature if s.do_sample else None,
                s.top_p if s.do_sample else None, s.max_length)

    def emit(self, kind: str, value: Any) -> None:
        assert self.loop is not None and self.events is not None
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is closed: the server is gone
            self.cancel.set()


class Batcher:
    """Owns the model: takes prepared jobs from a queue and answers them, batching what it can."""

    def __init__(self, chat: "Chat", cfg: ServeConfig) -> None:
        self.chat = chat
        self.cfg = cfg
        self.queue: "queue.Queue[Job]" = queue.Queue(maxsize=max(1, cfg.max_queue))
        self._backlog: Deque[Job] = deque()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.stats: Dict[str, Any] = {"requests": 0, "batches": 0, "batched_rows": 0, "max_batch": 0, "streams": 0,
                                      "errors": 0, "generate_s": 0.0, "prepare_s": 0.0}
        self.recent_batches: Deque[int] = deque(maxlen=64)  # sizes of the latest batches
        self._stats_lock = threading.Lock()
        self._preparing = 0  # requests whose media are being decoded: they will join the queue soon

    def preparing(self, delta: int) -> None:
        with self._stats_lock:
            self._preparing += delta

    # ------------------------------------------------------------------ life
    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="videollm-serve-batcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        leftover = list(self._backlog)
        self._backlog.clear()
        while True:
            try:
                leftover.append(self.queue.get_nowait())
            except queue.Empty:
                break
        for job in leftover:
            self._fail(job, OpenAIError(503, "the server is shutting down", "server_error", None, "shutting_down"))

    def submit(self, job: Job) -> None:
        if self._stop.is_set():
            raise OpenAIError(503, "the server is shutting down", "server_error", None, "shutting_down")
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise OpenAIError(503, f"the server is busy ({self.cfg.max_queue} requests queued); retry later",
                              "server_error", None, "queue_full") from None

    # ------------------------------------------------------------------ loop
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                group = self._next_group()
            except Exception:  # noqa: BLE001 - the worker must not die
                logger.exception("batcher: selecting jobs failed")
                continue
            if not group:
                continue
            try:
                if group[0].request.stream:
                    self._answer_stream(group[0])
                else:
                    self._answer_group(group)
                self.chat.pop_notices()  # already logged; the chat's list must not grow forever
            except BaseException as exc:  # noqa: BLE001 - answered as a 500, the loop goes on
                logger.exception("batcher: unexpected failure")
                for job in group:
                    self._fail(job, exc)

    def _take(self, block_s: float) -> bool:
        """Move one queued job to the backlog (waiting up to ``block_s``); the backlog holds at
        most ``max_queue`` jobs, so under overload the queue fills and clients get 503s."""
        if len(self._backlog) >= max(1, self.cfg.max_queue):
            if block_s > 0:
                time.sleep(min(block_s, 0.005))
            return False
        try:
            self._backlog.append(self.queue.get(timeout=block_s) if block_s > 0 else self.queue.get_nowait())
            return True
        except queue.Empty:
            return False

    def _next_group(self) -> List[Job]:
        while self._backlog and self._backlog[0].cancel.is_set():  # timed out or disconnected while queued
            self._backlog.popleft()
        if not self._backlog and not self._take(0.1):
            return []
        head = self._backlog[0]
        if head.cancel.is_set():
            return []
        if head.request.stream:
            return [self._backlog.popleft()]
        start = time.monotonic()
        deadline = start + self.cfg.batch_wait_ms / 1000.0
        arrivals_deadline = start + max(self.cfg.batch_wait_ms, self.cfg.arrival_wait_ms) / 1000.0
        limit = max(1, self.cfg.max_batch_size)
        while True:
            while self._take(0):  # everything already waiting
                pass
            group = [j for j in self._backlog if not j.request.stream and not j.cancel.is_set() and j.key == head.key]
            now = time.monotonic()
            if len(group) >= limit or self._stop.is_set():
                break
            if now >= deadline:
                # past the short window: wait on only while requests are being prepared (a burst
                # of clients whose media are still decoding), and not past the arrival window
                if self._preparing <= 0 or now >= arrivals_deadline:
                    break
                self._take(min(0.005, arrivals_deadline - now))
                continue
            self._take(deadline - now)
        group = group[:limit]
        chosen = {id(j) for j in group}
        self._backlog = deque(j for j in self._backlog if id(j) not in chosen)
        return group

    # ------------------------------------------------------------------ answering
    def _count(self, **deltas: float) -> None:
        with self._stats_lock:
            for k, v in deltas.items():
                self.stats[k] += v

    def _fail(self, job: Job, exc: BaseException) -> None:
        self._count(errors=1)
        if job.request.stream and job.events is not None:
            job.emit("error", exc)
        else:
            job.resolve(error=exc)

    def _finish_info(self, job: Job, text: str, ids: Optional[Sequence[int]]) -> Dict[str, Any]:
        """Apply the row's own max_tokens and stop strings; finish reason and usage."""
        from videollm.chat import postprocess_text, stop_text_for

        tok = self.chat.tokenizer
        max_new = job.request.max_tokens
        finish = "stop"
        if ids is not None:
            ids = [int(i) for i in ids]
            if len(ids) > max_new:  # the group generated further than this row asked for
                ids = ids[:max_new]
                text = postprocess_text(tok.decode(ids), job.conv)
            decoded = tok.decode(ids)
            stopped = stop_text_for(job.conv) in decoded or (tok.eos_token_id is not None and tok.eos_token_id in ids)
            if not stopped and len(ids) >= max_new:
                finish = "length"
        text, cut = _cut_at_stops(text, job.request.stop)
        if ids is not None:  # the generated ids, without the padding of a row that ended early
            pad = tok.pad_token_id
            completion = len(ids)
            while completion > 0 and pad is not None and ids[completion - 1] == pad and finish == "stop":
                completion -= 1
        else:  # streamed: the answer's text re-tokenised
            completion = min(len(tok(text, add_special_tokens=False)["input_ids"]) if text else 0, max_new)
            if not cut and completion >= max_new:
                finish = "length"
        if cut:
            finish = "stop"
        prompt = job.prompt_tokens
        return {"text": text, "finish_reason": finish,
                "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                          "total_tokens": prompt + completion}}

    def _answer_group(self, group: List[Job]) -> None:
        self._count(requests=len(group), batches=1, batched_rows=len(group))
        with self._stats_lock:
            self.stats["max_batch"] = max(self.stats["max_batch"], len(group))
            self.recent_batches.append(len(group))
        t0 = time.perf_counter()
        settings = group[0].settings.replace(max_new_tokens=max(j.settings.max_new_tokens for j in group))
        pending = [group]
        while pending:
            rows = pending.pop(0)
            # the conversations are copied: a failed group leaves them as they were for the retry
            convs = [j.conv.copy() for j in rows]
            try:
                answers = self.chat.answer_batch(convs, [j.img_list for j in rows], settings)
            except Exception as exc:  # noqa: BLE001
                if len(rows) > 1:
                    logger.warning("a batch of %d failed (%s: %s); retrying its rows one by one",
                                   len(rows), type(exc).__name__, exc)
                    pending = [[j] for j in rows] + pending
                    continue
                self._fail(rows[0], exc)
                continue
            for job, (text, ids) in zip(rows, answers):
                job.resolve(self._finish_info(job, text, ids))
        self._count(generate_s=time.perf_counter() - t0)

    def _answer_stream(self, job: Job) -> None:
        self._count(requests=1, streams=1)
        stops = job.request.stop
        pieces = self.chat.stream_answer(job.conv, job.img_list, job.settings)
        text = emitted = ""
        cut = False
        try:
            for piece in pieces:
                if job.cancel.is_set() or self._stop.is_set():
                    return  # closing the generator cancels the generation
                text += piece
                if stops:
                    text, cut = _cut_at_stops(text, stops)
                    safe = text if cut else text[: len(text) - _held_back(text, stops)]
                else:
                    safe = text
                if len(safe) > len(emitted):
                    job.emit("text", safe[len(emitted):])
                    emitted = safe
                if cut:
                    break
        except Exception as exc:  # noqa: BLE001
            self._fail(job, exc)
            return
        finally:
            pieces.close()
        if len(text) > len(emitted):
            job.emit("text", text[len(emitted):])
        info = self._finish_info(job, text, None)
        if cut:
            info["finish_reason"] = "stop"
        job.emit("end", info)


# ---------------------------------------------------------------------------------------------
# The HTTP application


def _error_response(exc: OpenAIError):
    from fastapi.responses import JSONResponse

    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


def _from_exception(exc: BaseException) -> OpenAIError:
    """Map any failure to an OpenAI error: ours name the file or key (400), the rest are 500s."""
    from videollm.errors import AudioDecodeError, ImageDecodeError, VideoDecodeError, VideoLLMError

    if isinstance(exc, OpenAIError):
        return exc
    if isinstance(exc, (VideoDecodeError, ImageDecodeError, AudioDecodeError)):
        return _invalid(f"{type(exc).__name__}: {exc}", "messages", "invalid_media")
    if isinstance(exc, VideoLLMError):
        return _invalid(f"{type(exc).__name__}: {exc}", "messages", "invalid_request")
    return OpenAIError(500, f"the server failed to answer ({type(exc).__name__}); see the server log",
                       "server_error", None, "internal_error")


def create_app(chat: "Chat", cfg: ServeConfig):
    """The FastAPI application serving ``chat`` (its own batching worker starts with the app)."""
    from contextlib import asynccontextmanager

    # Imported here, not at the top: every decode child process re-imports the main module
    # (multiprocessing's forkserver), and FastAPI would cost each decode ~0.7 s.
    try:
        import anyio
        from fastapi import FastAPI, Request
    except ImportError:  # pragma: no cover - the "serve" extra is missing
        from videollm.errors import ConfigError

        raise ConfigError("videollm.serve needs FastAPI and uvicorn: pip install -e '.[serve]'") from None
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.background import BackgroundTask
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from videollm.templates import get_template

    get_template(cfg.template)  # an unknown template fails at startup, naming the registered ones
    llm_config = getattr(getattr(chat.model, "language_model", None), "config", None)
    positions = getattr(llm_config, "max_position_embeddings", None)
    max_length = min(cfg.max_length, int(positions)) if isinstance(positions, int) else cfg.max_length
    cfg = dataclasses.replace(cfg, max_tokens_limit=min(cfg.max_tokens_limit, max_length - 1))
    batcher = Batcher(chat, cfg)
    created = int(time.time())
    state: Dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(app):
        state["limiter"] = anyio.CapacityLimiter(max(1, cfg.prepare_workers))
        try:  # untrusted media decode in child processes: start their process server now, not on a request
            from videollm.processors.video_loader import warm_up_isolation

            logger.info("decoding process server ready in %.1f s", await anyio.to_thread.run_sync(warm_up_isolation))
        except Exception as exc:  # noqa: BLE001 - decodes still work, the first one just starts it
            logger.warning("could not start the decoding process server early: %s", exc)
        batcher.start()
        try:
            yield
        finally:
            batcher.stop()

    app = FastAPI(title="videollm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.batcher = batcher
    app.state.config = cfg

    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, exc: OpenAIError):
        return _error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            return _error_response(OpenAIError(404, f"Unknown request URL: {request.method} {request.url.path}",
                                               "invalid_request_error", None, "unknown_url"))
        if exc.status_code == 405:
            return _error_response(OpenAIError(405, f"{request.method} is not allowed on {request.url.path}",
                                               "invalid_request_error", None, "method_not_allowed"))
        return _error_response(OpenAIError(exc.status_code, str(exc.detail), "invalid_request_error"))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return _error_response(_invalid(f"invalid request: {exc.errors()}"))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        logger.exception("unexpected failure on %s %s", request.method, request.url.path)
        return _error_response(_from_exception(exc))

    def authorize(request: Request) -> None:
        if not cfg.api_key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if not header:
            raise OpenAIError(401, "You didn't provide an API key (Authorization: Bearer KEY)",
                              "invalid_request_error", None, "missing_api_key")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), cfg.api_key.encode()):
            raise OpenAIError(401, "Incorrect API key provided", "invalid_request_error", None, "invalid_api_key")

    def model_card() -> Dict[str, Any]:
        return {"id": cfg.model_name, "object": "model", "created": created, "owned_by": "videollm",
                "max_model_len": max_length}

    @app.get("/health")
    async def health():
        with batcher._stats_lock:
            stats = dict(batcher.stats, recent_batches=list(batcher.recent_batches))
        return {"status": "ok", "model": cfg.model_name, "queued": batcher.queue.qsize(), **stats}

    @app.get("/v1/models")
    async def list_models(request: Request):
        authorize(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request):
        authorize(request)
        if model_id != cfg.model_name:
            raise OpenAIError(404, f"The model '{model_id}' does not exist", "invalid_request_error", "model",
                              "model_not_found")
        return model_card()

    async def read_body(request: Request) -> bytes:
        limit = cfg.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                raise _invalid("the Content-Length header is not a number") from None
            if size > limit:
                raise OpenAIError(413, f"the request body has {size} bytes; the limit is {limit} bytes "
                                  f"({limit / MB:.1f} MiB)", "invalid_request_error", None, "request_too_large")
        chunks: List[bytes] = []
        total = 0
        async for piece in request.stream():
            total += len(piece)
            if total > limit:
                raise OpenAIError(413, f"the request body exceeds the limit of {limit} bytes ({limit / MB:.1f} MiB)",
                                  "invalid_request_error", None, "request_too_large")
            chunks.append(piece)
        return b"".join(chunks)

    def prepare(req: CompletionRequest, files: MediaFiles) -> Job:
        """In a worker thread: resolve and decode media, build the conversation and the settings."""
        t0 = time.perf_counter()
        conv, img_list = build_conversation(chat, cfg.template, req.turns, files, with_audio=cfg.audio)
        prompt_tokens = prompt_token_count(chat, conv, img_list)
        if prompt_tokens + req.max_tokens > max_length:
            room = max_length - prompt_tokens
            if req.max_tokens_given or room < 1:
                raise _invalid(f"this model's maximum context length is {max_length} tokens; the messages take "
                               f"{prompt_tokens} and {req.max_tokens} were requested for the completion; shorten "
                               "the messages or lower max_tokens", "messages", "context_length_exceeded")
            req = dataclasses.replace(req, max_tokens=room)
        overrides: Dict[str, Any] = {"max_new_tokens": req.max_tokens, "max_length": max_length,
                                     "do_sample": req.do_sample, "num_beams": 1}
        if req.do_sample:
            overrides["temperature"] = req.temperature
            if req.top_p is not None:
                overrides["top_p"] = req.top_p
        job = Job(req, conv, img_list, chat.generation.replace(**overrides), prompt_tokens=prompt_tokens)
        batcher._count(prepare_s=time.perf_counter() - t0)
        return job

    def chunk(cid: str, delta: Dict[str, Any], finish: Optional[str] = None, usage: Any = None,
              choices: bool = True) -> str:
        obj: Dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()),
                               "model": cfg.model_name,
                               "choices": [{"index": 0, "delta": delta, "finish_reason": finish}] if choices else []}
        if usage is not None:
            obj["usage"] = usage
        return "data: " + json.dumps(obj, ensure_ascii=False) + "\n\n"

    async def sse(job: Job, files: MediaFiles, cid: str) -> AsyncIterator[str]:
        assert job.events is not None
        try:
            yield chunk(cid, {"role": "assistant", "content": ""})
            while True:
                try:
                    kind, value = await asyncio.wait_for(job.events.get(), cfg.request_timeout)
                except asyncio.TimeoutError:
                    job.cancel.set()
                    err = OpenAIError(504, f"no progress in {cfg.request_timeout:.0f} s", "server_error", None,
                                      "timeout")
                    yield "data: " + json.dumps(err.body()) + "\n\n"
                    break
                if kind == "text":
                    yield chunk(cid, {"content": value})
                elif kind == "end":
                    yield chunk(cid, {}, value["finish_reason"])
                    if job.request.include_usage:
                        yield chunk(cid, {}, usage=value["usage"], choices=False)
                    break
                else:  # an error after the stream started: an error event, then [DONE]
                    if not isinstance(value, OpenAIError):
                        logger.error("stream %s failed: %s: %s", cid, type(value).__name__, value)
                    yield "data: " + json.dumps(_from_exception(value).body()) + "\n\n"
                    break
            yield "data: [DONE]\n\n"
        finally:  # also on a client disconnect: the worker stops generating
            job.cancel.set()
            files.close()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        req = parse_request(await read_body(request), cfg)
        files = MediaFiles(cfg)
        streaming = False
        batcher.preparing(+1)
        submitted = False
        try:
            try:
                job = await anyio.to_thread.run_sync(prepare, req, files, limiter=state["limiter"])
            except Exception as exc:  # noqa: BLE001
                raise _from_exception(exc) from None
            cid = f"chatcmpl-{uuid.uuid4().hex}"
            job.loop = asyncio.get_running_loop()
            if req.stream:
                job.events = asyncio.Queue()
                batcher.submit(job)
                batcher.preparing(-1)
                submitted = streaming = True
                def cleanup() -> None:  # also when the client left before the stream started
                    job.cancel.set()
                    files.close()

                return StreamingResponse(sse(job, files, cid), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                         background=BackgroundTask(cleanup))
            batcher.submit(job)
            batcher.preparing(-1)
            submitted = True
            try:
                info = await asyncio.wait_for(asyncio.wrap_future(job.future), cfg.request_timeout)
            except asyncio.TimeoutError:
                job.cancel.set()
                raise OpenAIError(504, f"no answer within {cfg.request_timeout:.0f} s", "server_error", None,
                                  "timeout") from None
            except Exception as exc:  # noqa: BLE001
                error = _from_exception(exc)
                if error.status >= 500:
                    logger.error("request %s failed: %s: %s", cid, type(exc).__name__, exc)
                raise error from None
            return JSONResponse({
                "id": cid, "object": "chat.completion", "created": int(time.time()), "model": cfg.model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": info["text"]},
                             "finish_reason": info["finish_reason"]}],
                "usage": info["usage"],
            })
        finally:
            if not submitted:
                batcher.preparing(-1)
            if not streaming:
                files.close()

    return app


# ---------------------------------------------------------------------------------------------
# Running a server


class ServerThread:
    """Run an app with uvicorn in a background thread (tests, benchmarks); a context manager.

    ``port=0`` picks a free port; ``url`` is the base URL once started. Leaving the context
    shuts the server down (open streams get ``graceful_s`` seconds) and joins the thread.
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                 graceful_s: float = 2.0, start_timeout: float = 180.0) -> None:
        self.app, self.host, self.port = app, host, port
        self.log_level, self.graceful_s, self.start_timeout = log_level, graceful_s, start_timeout
        self.server = None
        self.thread: Optional[threading.Thread] = None
        self.sock: Optional[socket.socket] = None
        self.url = ""

    def __enter__(self) -> "ServerThread":
        import uvicorn

        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((self.host, self.port))
        port = self.sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level=self.log_level, timeout_graceful_shutdown=int(self.graceful_s) or 1,
                                lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="videollm-serve-uvicorn", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise RuntimeError(f"the server on {self.host}:{port} did not start")
            time.sleep(0.01)
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.url = f"http://{host}:{port}"
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.server is not None:
            self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(self.graceful_s + 10)
        if self.sock is not None:
            self.sock.close()


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    from videollm.chat import add_model_args

    parser = argparse.ArgumentParser(prog="python -m videollm.serve",
                                     description="OpenAI-compatible chat-completions server for a videollm model")
    add_model_args(parser)
    net = parser.add_argument_group("network")
    net.add_argument("--host", default="127.0.0.1", help="bind address (default loopback; others need --api-key)")
    net.add_argument("--port", type=int, default=8000)
    net.add_argument("--api-key", default=os.environ.get("VIDEOLLM_API_KEY") or None,
                     help="required as 'Authorization: Bearer KEY' (default: $VIDEOLLM_API_KEY)")
    net.add_argument("--served-model-name", default=None, help="the model id clients send (default: the config's name)")
    net.add_argument("--seed", type=int, default=None,
                     help="seed torch before building the model (reproducible random-weight smoke tests, sampling)")
    net.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    lim = parser.add_argument_group("media and limits")
    d = ServeConfig()
    lim.add_argument("--media-root", default=None, help="allow file:// URLs under this folder (default: none allowed)")
    lim.add_argument("--audio", action="store_true", help="use a video's sound (models with an audio branch)")
    lim.add_argument("--max-body-mb", type=float, default=d.max_body_bytes / MB)
    lim.add_argument("--max-media-mb", type=float, default=d.max_media_bytes / MB, help="per data: URL")
    lim.add_argument("--max-media", type=int, default=d.max_media, help="media parts per request")
    lim.add_argument("--max-batch-size", type=int, default=d.max_batch_size, help="1 turns batching off")
    lim.add_argument("--batch-wait-ms", type=float, default=d.batch_wait_ms,
                     help="wait this long for more requests after a group's first")
    lim.add_argument("--arrival-wait-ms", type=float, default=d.arrival_wait_ms,
                     help="wait up to this long while other requests are still decoding their media")
    lim.add_argument("--max-queue", type=int, default=d.max_queue)
    lim.add_argument("--prepare-workers", type=int, default=d.prepare_workers,
                     help="requests whose media are decoded at once (default: the CPU cores, at most 4)")
    lim.add_argument("--max-length", type=int, default=d.max_length, help="context limit: prompt + new tokens")
    lim.add_argument("--default-max-tokens", type=int, default=d.default_max_tokens)
    lim.add_argument("--max-tokens-limit", type=int, default=d.max_tokens_limit)
    lim.add_argument("--request-timeout", type=float, default=d.request_timeout, help="seconds")
    args = parser.parse_args(argv)
    for name in ("max_body_mb", "max_media_mb", "max_media", "max_batch_size", "max_queue", "prepare_workers",
                 "max_length", "default_max_tokens", "max_tokens_limit", "request_timeout"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.batch_wait_ms < 0 or args.arrival_wait_ms < 0:
        parser.error("--batch-wait-ms and --arrival-wait-ms must be >= 0")
    if args.media_root is not None and not os.path.isdir(args.media_root):
        parser.error(f"--media-root {args.media_root}: not a folder")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), format="%(levelname)s %(name)s: %(message)s")
    if not is_loopback(args.host) and not args.api_key:
        print(f"error: --host {args.host} is not a loopback address: give an API key (--api-key KEY or "
              "VIDEOLLM_API_KEY) so that only your clients can use the model", file=sys.stderr)
        return 2
    from videollm.chat import build_chat_from_args
    from videollm.errors import VideoLLMError

    if args.seed is not None:
        import torch

        torch.manual_seed(args.seed)
    try:
        chat, template, notices = build_chat_from_args(args)
    except VideoLLMError as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    for notice in notices:
        print(f"notice: {notice}", file=sys.stderr)
    name = args.served_model_name or os.path.splitext(os.path.basename(args.cfg_path))[0]
    cfg = ServeConfig(
        model_name=name, template=template, media_root=args.media_root, api_key=args.api_key,
        max_body_bytes=int(args.max_body_mb * MB), max_media_bytes=int(args.max_media_mb * MB),
        max_media=args.max_media, max_batch_size=args.max_batch_size, batch_wait_ms=args.batch_wait_ms,
        arrival_wait_ms=args.arrival_wait_ms,
        max_queue=args.max_queue, prepare_workers=args.prepare_workers, max_length=args.max_length, default_max_tokens=args.default_max_tokens,
        max_tokens_limit=args.max_tokens_limit, request_timeout=args.request_timeout, audio=args.audio,
    )
    import uvicorn

    app = create_app(chat, cfg)
    if not is_loopback(args.host):
        print(f"notice: serving on {args.host}:{args.port} without TLS; use a reverse proxy for encryption",
              file=sys.stderr)
    print(f"serving model '{name}' (template {template}) on http://{args.host}:{args.port}/v1", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
