"""The chat API: upload a video, an image or a video with its sound, ask, answer (streamed or not).

:class:`Chat` works with any registered model through the model contract
(:class:`videollm.models.base.VideoLLM`) and builds every prompt from the conversation's chat
template (:mod:`videollm.templates`). For Video-LLaMA it reproduces the operations and prompt
strings of the original chat (``conversation_video.py``):

* ``upload_video_without_audio``: 8 frames, uniform sampling, resized by the decoder to the
  model's image size; user message ``"<Video><ImageHere></Video> " + msg`` where msg is the
  loader's "The video contains ... seconds. " sentence (it ends with a space, and ``ask`` joins
  with another one: the double space of the original's prompts, quirk T5).
* ``upload_video`` (audio + video): the audio embeddings go FIRST, then the video embeddings; the
  system text becomes ""; the user message is :data:`AUDIO_VIDEO_MESSAGE`, whose runs of 17 and
  18 spaces come from a backslash-newline continuation inside the original's string literal
  (quirk T5). The timestamp sentence is not used in that case.
* ``upload_img``: message ``"<Image><ImageHere></Image> "``.
* ``ask``: appends the question to the last user message when it holds the template's media
  marker (``</Video>`` or ``</Image>``), otherwise starts a new user turn.
* ``answer``: the prompt is split on the model's placeholder; only the first piece gets BOS;
  pieces and media embeddings are interleaved (the one merge path, :mod:`videollm.models.merge`);
  the context is cut from the left to ``max_length`` minus ``max_new_tokens``; generation stops
  on the template's stop string ("###" for vicuna, "</s>" or EOS for llama_v2); the text is cut
  at the stop string and kept after the last "<assistant role>:", then stripped.

Media are stored per conversation (in the ``img_list`` the caller keeps, as :class:`ChatMedia`
entries) and encoded when an answer is generated, not at upload, so that models whose visual
tokens depend on the question (``model.text_conditioned``) re-encode for every question; the
others encode once and reuse the embedding.

Differences from the original, each visible:

* Falling back from audio+video to video only (no audio track, undecodable audio, or a model
  without the audio branch) produces a notice (logged as a warning, returned by the upload and
  added to ``notices``); the original printed "no audio is found" to stdout.
* Cutting the context produces a notice too (the original printed a warning).
* The stop check is a string check on the decoded tail of each sequence, so it works with any
  vocabulary; the original compared LLaMA ids (835; 2277 29937) that mean nothing elsewhere.
* One decoding default for the chat, the demo, the CLI and batch inference
  (:class:`GenerationSettings`: greedy, ``do_sample=False``; the original always sampled);
  sampling is one switch away.
* Only the tokens ``generate`` added are removed from its output: with transformers 5,
  ``generate(inputs_embeds=...)`` returns only new tokens, so nothing is stripped (the original
  dropped a leading 0 and 1, which can be a real first token).
* Batched generation (:meth:`Chat.answer_batch`) with left padding, and streaming
  (:meth:`Chat.stream_answer`).
* Video and image sizes follow the model's own processing (224 for the released Video-LLaMA
  models, as the original's hard-coded 224), so the tiny test models work.
* Bad files raise :class:`~videollm.errors.VideoLLMError` subclasses naming the file.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
import queue
import re
import threading
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from videollm.conversation import Conversation
from videollm.errors import AudioDecodeError, ConfigError, PromptError, VideoDecodeError
from videollm.models.base import Media
from videollm.models.merge import merge_segments, segments_from_prompt
from videollm.templates import (  # noqa: F401 - re-exported: the original's strings live there
    AUDIO_VIDEO_MESSAGE,
    IMAGE_MESSAGE,
    IMAGE_SYSTEM,
    VIDEO_MESSAGE_PREFIX,
    ChatTemplate,
    get_template,
    template_of,
)

logger = logging.getLogger(__name__)

CONTEXT_WARNING = (
    "Warning: The number of tokens in current conversation exceeds the max length. "
    "The model will not see the contexts outside the range."
)

ImageInput = Union[str, "os.PathLike[str]", Any, torch.Tensor]


@dataclasses.dataclass
class GenerationSettings:
    """The one generation configuration of the chat, the demo, the CLI and batch inference.

    Greedy by default (``do_sample=False``): answers are reproducible, and the README's quoted
    answers are greedy; ``do_sample=True`` samples with ``temperature`` and ``top_p``.
    """

    max_new_tokens: int = 300
    num_beams: int = 1
    min_length: int = 1
    top_p: float = 0.9
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0
    temperature: float = 1.0
    max_length: int = 2000
    do_sample: bool = False

    def replace(self, **overrides: Any) -> "GenerationSettings":
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ConfigError(f"unknown generation setting(s) {unknown}; known: "
                              f"{[f.name for f in dataclasses.fields(self)]}")
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})


@dataclasses.dataclass
class ChatMedia:
    """One uploaded medium of a conversation, with its embedding once computed (when the
    model's encoding does not depend on the question)."""

    media: Media
    embeds: Optional[torch.Tensor] = None
    message: str = ""  # the text the upload put into the user message (removed from the question)

    @property
    def shape(self) -> Tuple[int, ...]:  # the embedding's (1, n, H), once encoded
        return tuple(self.embeds.shape) if self.embeds is not None else ()


def new_conversation(model_type: str = "vicuna", media: str = "video") -> Conversation:
    """A fresh conversation of the chat template ``model_type`` for ``media``.

    For Video-LLaMA's templates ``media="image"`` sets :data:`IMAGE_SYSTEM` and ``"video"`` an
    empty system (the original audio-video demo does this for both templates, overriding
    llama_v2's default system).
    """
    if media not in ("video", "image"):
        raise ConfigError(f"media={media!r}: expected 'video' or 'image'")
    try:
        template = get_template(model_type)
    except ConfigError:
        raise ConfigError(f"--model_type {model_type!r}: unknown chat template") from None
    return template.new_conversation(media)


def stop_text_for(conv: Conversation) -> str:
    """The string that ends an answer ("###" for vicuna, "</s>" for llama_v2)."""
    return template_of(conv).stop


def postprocess_text(text: str, conv: Conversation) -> str:
    """Cut at the stop string, keep what follows the last "<assistant role>:", strip."""
    text = text.split(stop_text_for(conv))[0]
    return text.split(conv.roles[1] + ":")[-1].strip()


class StopOnText:
    """Stopping criterion: a row is done once its decoded tail contains a stop string.

    Works with any tokenizer (no hard-coded ids). ``input_ids`` are the generated ids (the
    model is driven with ``inputs_embeds``); only the last ``window`` ids are decoded per step.
    Returns a bool per row, so batched generation stops each row on its own.
    """

    def __init__(self, tokenizer, stops: Sequence[str], window: int = 8, cancel: Optional[threading.Event] = None):
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.window = window
        self.cancel = cancel

    def __call__(self, input_ids: torch.LongTensor, scores: Any = None, **kwargs) -> torch.BoolTensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        if self.cancel is not None and self.cancel.is_set():
            return ~done
        for row in range(input_ids.shape[0]):
            tail = self.tokenizer.decode(input_ids[row, -self.window :].tolist())
            done[row] = any(s in tail for s in self.stops)
        return done


class _IdQueueStreamer:
    """Receives the ids ``generate`` produces and hands them to another thread through a queue."""

    def __init__(self) -> None:
        self.queue: "queue.Queue[Optional[List[int]]]" = queue.Queue()
        self._first = True

    def put(self, value: torch.Tensor) -> None:
        if self._first:  # the prompt (empty: we generate from inputs_embeds)
            self._first = False
            return
        self.queue.put(value.reshape(-1).tolist())

    def end(self) -> None:
        self.queue.put(None)


class Chat:
    """Chat with any registered model about one video, image, or video with sound.

    Args:
        model: a :class:`~videollm.models.base.VideoLLM` (in eval mode, placed on ``device``).
        vis_processor / image_processor / n_frms: overrides of the model's own chat media
            processing (passed to ``model.load_media``; None: the model's defaults).
        media_options: more keyword options for ``model.load_media``, e.g. frame sampling at
            inference ``{"sampling": "fps", "fps": 2.0, "max_frames": 32}`` (Video-LLaMA passes
            them to :func:`~videollm.processors.video_loader.load_video`).
        device: where the inputs go (the model must already be there).
        timeout: seconds before a decode is abandoned (video and audio).
        generation: the default :class:`GenerationSettings` of every answer.

    Every notice (audio fallback, context cut) is logged as a warning, appended to
    ``self.notices`` and to the ``notices`` list a call is given, if any.
    """

    def __init__(
        self,
        model,
        vis_processor=None,
        device: Union[str, torch.device] = "cpu",
        image_processor=None,
        n_frms: Optional[int] = None,
        timeout: Optional[float] = 30.0,
        generation: Optional[GenerationSettings] = None,
        media_options: Optional[Dict[str, Any]] = None,
    ) -> None:
        self.model = model
        self.device = torch.device(device)
        self.media_options: Dict[str, Any] = dict(media_options or {})
        if vis_processor is not None:
            self.media_options["vis_processor"] = vis_processor
        if image_processor is not None:
            self.media_options["image_processor"] = image_processor
        if n_frms is not None:
            self.media_options["n_frms"] = int(n_frms)
        self.n_frms = n_frms
        self.timeout = timeout
        self.generation = generation or GenerationSettings()
        self.notices: List[str] = []

    @property
    def tokenizer(self):
        return self.model.tokenizer

    # ------------------------------------------------------------------ notices
    def _notice(self, text: str, notices: Optional[List[str]]) -> str:
        logger.warning("%s", text)
        self.notices.append(text)
        if notices is not None:
            notices.append(text)
        return text

    def pop_notices(self) -> List[str]:
        """Return and clear the notices recorded so far."""
        out, self.notices = self.notices, []
        return out

    # ------------------------------------------------------------------ media
    def _load(self, source: Any, kind: str) -> Media:
        if kind in ("video", "audio") and not isinstance(source, (str, os.PathLike)):
            raise VideoDecodeError(f"expected a {kind} file path, got {type(source).__name__}")
        return self.model.load_media(source, kind, timeout=self.timeout, **self.media_options)

    def _add(self, conv: Conversation, img_list: List[Any], media: Sequence[Media], kind: str, msg: str = "") -> None:
        template = template_of(conv)
        message = template.media_message(kind, msg)
        for m in media:
            img_list.append(ChatMedia(m, message=message))
        system = template.media_system.get(kind)
        if system is not None and kind == "audio_video":
            conv.system = system
        conv.append_message(conv.roles[0], message)

    def upload_video(
        self,
        video_path: Union[str, "os.PathLike[str]"],
        conv: Conversation,
        img_list: List[Any],
        with_audio: bool = True,
        notices: Optional[List[str]] = None,
    ) -> str:
        """Video with its sound (audio embeddings first). Falls back to video only, with a notice.

        Returns "Received." or, after a fallback, the notice text.
        """
        if not with_audio:
            return self.upload_video_without_audio(video_path, conv, img_list)
        name = os.fspath(video_path) if isinstance(video_path, (str, os.PathLike)) else repr(video_path)
        if not getattr(self.model, "has_audio", False):
            reason = "the model has no audio branch"
            self.upload_video_without_audio(video_path, conv, img_list)
            return self._notice(f"{name}: audio ignored, answering from the frames only: {reason}.", notices)
        video = self._load(video_path, "video")  # decode errors propagate: nothing to fall back to
        try:
            audio = self._load(video_path, "audio")
        except AudioDecodeError as exc:
            from videollm.processors.audio import NoAudioStreamError

            reason = "the video has no audio track" if isinstance(exc, NoAudioStreamError) else f"the audio cannot be read ({exc})"
            self._add(conv, img_list, [video], "video", video.meta.get("msg", ""))
            return self._notice(f"{name}: {reason}; answering from the frames only.", notices)
        self._add(conv, img_list, [audio, video], "audio_video")
        return "Received."

    def upload_video_without_audio(
        self, video_path: Union[str, "os.PathLike[str]"], conv: Conversation, img_list: List[Any]
    ) -> str:
        """Video frames only; Video-LLaMA's message ``"<Video><ImageHere></Video> " + msg``."""
        video = self._load(video_path, "video")
        # a model may turn a file into another kind (LLaMA-VID: a feature file -> "features")
        self._add(conv, img_list, [video], video.kind, video.meta.get("msg", ""))
        return "Received."

    def upload_img(self, image: ImageInput, conv: Conversation, img_list: List[Any]) -> str:
        """Image path, PIL image, or normalised tensor (3, H, W) / (1, 3, H, W) / (1, 3, 1, H, W)."""
        from PIL import Image

        from videollm.errors import ImageDecodeError

        if isinstance(image, (str, os.PathLike, Image.Image)):
            medium = self._load(image, "image")  # ImageDecodeError names the file
        elif isinstance(image, torch.Tensor):
            pixels = image
            while pixels.dim() > 3 and pixels.shape[0] == 1:
                pixels = pixels[0]
            if pixels.dim() == 4 and pixels.shape[1] == 1:  # (3, 1, H, W): a one-frame video
                pixels = pixels[:, 0]
            if pixels.dim() != 3:
                raise ImageDecodeError(f"image tensor of shape {tuple(image.shape)}: expected (3, H, W) or (1, 3, H, W)")
            medium = Media("image", pixels)
        else:
            raise ImageDecodeError(f"expected an image path, a PIL image or a tensor, got {type(image).__name__}")
        self._add(conv, img_list, [medium], "image")
        return "Received."

    # ------------------------------------------------------------------ conversation
    def ask(self, text: str, conv: Conversation) -> None:
        template = template_of(conv)
        last = conv.messages[-1] if conv.messages else None
        if (last is not None and last[0] == conv.roles[0] and last[1]
                and any(marker in last[1] for marker in template.media_markers)):
            last[1] = template.question_join.join([last[1], text])
        elif template.media_in_latest_turn and any(m[1] and template.placeholder in m[1] for m in conv.messages):
            # the media move to the newest question (models that condition them on it)
            media_msg = ""
            for m in conv.messages:
                if m[0] == conv.roles[0] and m[1] and template.placeholder in m[1]:
                    for kind_msg in template.media_messages.values():
                        if kind_msg and kind_msg.replace("{msg}", "") in m[1]:
                            media_msg = kind_msg.replace("{msg}", "")
                            m[1] = m[1].replace(media_msg, "", 1)
                            break
            conv.append_message(conv.roles[0], media_msg + text)
        else:
            conv.append_message(conv.roles[0], text)

    @staticmethod
    def reset(conv: Conversation, img_list: List[Any]) -> None:
        """Forget the messages and the media (a new chat starts with a new upload)."""
        conv.messages = []
        img_list.clear()

    @staticmethod
    def _question(conv: Conversation, template: ChatTemplate, img_list: Sequence[Any] = ()) -> str:
        """The latest user text without placeholders and media markup (for text-conditioned encoders)."""
        for role, message in reversed(conv.messages):
            if role == conv.roles[0] and message:
                text = message
                for entry in img_list:  # the exact upload messages first (they may hold a {msg})
                    if isinstance(entry, ChatMedia) and entry.message:
                        text = text.replace(entry.message, "")
                for kind_msg in template.media_messages.values():
                    text = text.replace(kind_msg.replace("{msg}", ""), "")
                return text.replace(template.placeholder, "").replace("\n", " ").strip()
        return ""

    def media_embeddings(self, conv: Conversation, img_list: Sequence[Any]) -> List[torch.Tensor]:
        """Each medium's (n_i, H_llm) embedding, encoded now (cached unless text-conditioned)."""
        template = template_of(conv)
        conditioned = bool(getattr(self.model, "text_conditioned", False))
        question = self._question(conv, template, img_list) if conditioned else None
        out: List[torch.Tensor] = []
        for entry in img_list:
            if isinstance(entry, torch.Tensor):  # an embedding given directly: (1, n, H) or (n, H)
                out.append(entry.reshape(-1, entry.shape[-1]))
                continue
            if entry.embeds is None or conditioned:
                with torch.no_grad():
                    emb = self.model.encode_media([entry.media], text=question)[0]
                if not conditioned:
                    entry.embeds = emb.unsqueeze(0)
                out.append(emb)
            else:
                out.append(entry.embeds[0])
        return out

    def get_context_emb(self, conv: Conversation, img_list: Sequence[Any]) -> torch.Tensor:
        """Prompt -> embeddings (1, L, H_llm): text pieces (BOS on the first only) and media tokens."""
        segments = self._segments(conv, img_list)
        merged = merge_segments([segments], self.model.embed_tokens, dtype=self.model.llm_dtype,
                                device=self.device, padding_side="left")
        return merged.inputs_embeds

    def _segments(self, conv: Conversation, img_list: Sequence[Any]):
        prompt = conv.get_prompt()
        custom = getattr(self.model, "prompt_segments", None)
        if custom is not None:  # a model that tokenises the whole prompt itself (LLaVA-style placeholders)
            return custom(prompt, self.media_embeddings(conv, img_list))
        placeholder = self.model.media_placeholder
        n = prompt.count(placeholder)
        # a medium may stand for several placeholders (meta "placeholders": a long video's one per
        # visual token); its embedding is split evenly over them
        slots = [int(e.media.meta.get("placeholders", 1)) if isinstance(e, ChatMedia) else 1 for e in img_list]
        if n != sum(slots):
            raise PromptError(
                f"the prompt has {n} {placeholder} placeholders but {len(img_list)} visual "
                "inputs were uploaded; upload once per conversation"
            )
        pieces: List[torch.Tensor] = []
        for emb, k in zip(self.media_embeddings(conv, img_list), slots):
            pieces.extend(torch.tensor_split(emb, k) if k > 1 else [emb])
        return segments_from_prompt(self.tokenizer, prompt, placeholder, pieces)

    def prepare(
        self,
        conv: Conversation,
        img_list: Sequence[Any],
        max_new_tokens: int = 300,
        max_length: int = 2000,
        notices: Optional[List[str]] = None,
    ) -> torch.Tensor:
        """Add the empty assistant turn and return the prompt embeddings (1, L', H), cut to fit.

        If L + max_new_tokens > max_length, only the last ``max_length - max_new_tokens``
        positions are kept, with a notice.
        """
        if max_new_tokens >= max_length:
            raise ConfigError(f"max_new_tokens={max_new_tokens} must be smaller than max_length={max_length}")
        conv.append_message(conv.roles[1], None)
        try:
            embs = self.get_context_emb(conv, img_list)
        except Exception:
            conv.messages.pop()
            raise
        excess = embs.shape[1] + max_new_tokens - max_length
        if excess > 0:
            self._notice(
                f"{CONTEXT_WARNING} ({embs.shape[1]} prompt positions + {max_new_tokens} new tokens > "
                f"max_length {max_length}: the first {excess} positions are cut.)",
                notices,
            )
            embs = embs[:, excess:]
        return embs

    def generation_kwargs(self, conv: Conversation, gen: GenerationSettings,
                          cancel: Optional[threading.Event] = None) -> Dict[str, Any]:
        """``generate`` keyword arguments for ``gen`` with the template's stop rule."""
        from transformers import StoppingCriteriaList

        template = template_of(conv)
        tok = self.tokenizer
        stops = [template.stop]
        if template.stop_on_eos and tok.eos_token:
            stops.append(tok.eos_token)
        kwargs: Dict[str, Any] = {
            "max_new_tokens": gen.max_new_tokens,
            "num_beams": gen.num_beams,
            "do_sample": gen.do_sample,
            "min_length": gen.min_length,
            "repetition_penalty": gen.repetition_penalty,
            "stopping_criteria": StoppingCriteriaList([StopOnText(tok, stops, cancel=cancel)]),
            "eos_token_id": tok.eos_token_id,
        }
        if gen.do_sample:  # passing these to greedy search only makes transformers warn
            kwargs.update(top_p=gen.top_p, temperature=gen.temperature)
        else:
            kwargs.update(top_p=None, temperature=None, top_k=None)
        if gen.num_beams > 1:
            kwargs["length_penalty"] = gen.length_penalty
        return kwargs

    def _finish(self, ids: Sequence[int], conv: Conversation) -> Tuple[str, np.ndarray]:
        ids = [int(i) for i in ids]
        text = postprocess_text(self.tokenizer.decode(ids), conv)
        conv.messages[-1][1] = text
        return text, np.asarray(ids, dtype=np.int64)

    def _settings(self, gen: Optional[GenerationSettings], overrides: Dict[str, Any]) -> GenerationSettings:
        return (gen or self.generation).replace(**overrides)

    def answer(self, conv: Conversation, img_list: Sequence[Any], gen: Optional[GenerationSettings] = None,
               notices: Optional[List[str]] = None, **overrides: Any) -> Tuple[str, np.ndarray]:
        """Generate the assistant's reply; returns (text, token ids) and stores the text in ``conv``.
        ``overrides``: fields of :class:`GenerationSettings` (``max_new_tokens=...``, ``do_sample=...``)."""
        settings = self._settings(gen, overrides)
        embs = self.prepare(conv, img_list, settings.max_new_tokens, settings.max_length, notices)
        out = self.model.generate(inputs_embeds=embs, **self.generation_kwargs(conv, settings))
        return self._finish(out[0].tolist(), conv)

    def stream_answer(self, conv: Conversation, img_list: Sequence[Any], gen: Optional[GenerationSettings] = None,
                      notices: Optional[List[str]] = None, **overrides: Any) -> Iterator[str]:
        """Like :meth:`answer`, but yields the reply in text increments as tokens arrive.

        The increments concatenate to the text :meth:`answer` would return for the same tokens
        (text that may still turn into the stop string, trailing spaces and half-decoded
        characters are held back until they are settled). Generation runs in a worker thread;
        closing the generator early cancels it. Beam search cannot stream: with ``num_beams > 1``
        the whole answer comes as one increment. The final text is stored in ``conv``.
        """
        settings = self._settings(gen, overrides)
        if settings.num_beams > 1:
            text, _ = self.answer(conv, img_list, settings, notices)
            if text:
                yield text
            return
        embs = self.prepare(conv, img_list, settings.max_new_tokens, settings.max_length, notices)
        cancel = threading.Event()
        kwargs = self.generation_kwargs(conv, settings, cancel=cancel)
        streamer = _IdQueueStreamer()
        failure: Dict[str, BaseException] = {}

        def work() -> None:
            try:
                self.model.generate(inputs_embeds=embs, streamer=streamer, **kwargs)
            except BaseException as exc:  # re-raised in the consumer
                failure["error"] = exc
                streamer.queue.put(None)

        worker = threading.Thread(target=work, name="videollm-generate", daemon=True)
        worker.start()
        ids: List[int] = []
        emitted = ""
        diverged = False
        stop = stop_text_for(conv)
        marker = conv.roles[1] + ":"
        tok = self.tokenizer
        try:
            while True:
                chunk = streamer.queue.get()
                if chunk is None:
                    break
                ids.extend(chunk)
                if diverged:
                    continue
                visible = _settled_text(tok.decode(ids), stop, marker)
                if visible.startswith(emitted):
                    if len(visible) > len(emitted):
                        yield visible[len(emitted):]
                        emitted = visible
                else:
                    diverged = True
            worker.join()
            if "error" in failure:
                raise failure["error"]
            text, _ = self._finish(ids, conv)
            if text.startswith(emitted):
                if len(text) > len(emitted):
                    yield text[len(emitted):]
            else:  # e.g. the model wrote "Assistant:" mid-answer: the original keeps what follows
                logger.warning("streamed text %r differs from the final answer %r (role marker in the reply)", emitted, text)
        finally:
            cancel.set()

    def answer_batch(self, convs: Sequence[Conversation], img_lists: Sequence[Sequence[Any]],
                     gen: Optional[GenerationSettings] = None, notices: Optional[List[str]] = None,
                     **overrides: Any) -> List[Tuple[str, np.ndarray]]:
        """Answer several conversations in one ``generate`` call.

        Prompts are LEFT-padded (zero embeddings, attention mask 0), so every row's last prompt
        position is the last column; position ids follow the mask. All conversations must use
        the same template (one stop string).
        """
        if not convs:
            return []
        if len({template_of(c).name for c in convs}) > 1:
            raise ConfigError("answer_batch: all conversations must use the same template")
        settings = self._settings(gen, overrides)
        if settings.max_new_tokens >= settings.max_length:
            raise ConfigError(f"max_new_tokens={settings.max_new_tokens} must be smaller than "
                              f"max_length={settings.max_length}")
        rows = []
        for conv, imgs in zip(convs, img_lists):
            conv.append_message(conv.roles[1], None)
            try:
                rows.append(self._segments(conv, imgs))
            except Exception:
                conv.messages.pop()
                raise
        merged = merge_segments(rows, self.model.embed_tokens, dtype=self.model.llm_dtype, device=self.device,
                                padding_side="left")
        embs, mask = merged.inputs_embeds, merged.attention_mask
        excess = embs.shape[1] + settings.max_new_tokens - settings.max_length
        if excess > 0:
            self._notice(f"{CONTEXT_WARNING} (the longest prompt is cut by {excess} positions)", notices)
            embs, mask = embs[:, excess:], mask[:, excess:]
        out = self.model.generate(inputs_embeds=embs, attention_mask=mask, **self.generation_kwargs(convs[0], settings))
        return [self._finish(row.tolist(), conv) for row, conv in zip(out, convs)]


def _settled_text(decoded: str, stop: str, marker: str) -> str:
    """The part of a partial reply that can no longer change: the streaming view of postprocess_text."""
    cut = decoded.split(stop)[0]
    if stop in decoded:
        return cut.split(marker)[-1].strip()
    text = cut.split(marker)[-1].lstrip()
    text = text.rstrip("\ufffd")  # a multi-byte character still being decoded
    hold = 0
    for pattern in (stop, marker):  # a tail that may still become the stop string or the role marker
        for k in range(min(len(pattern) - 1, len(text)), 0, -1):
            if text.endswith(pattern[:k]):
                hold = max(hold, k)
                break
    text = text[: len(text) - hold]
    return text.rstrip()


# ---------------------------------------------------------------------------------------------
# Building a Chat from an eval config (shared by demo.py, ``videollm.cli`` and ``videollm.infer``)


_CKPT_NUMBER = re.compile(r"(\d+)(?=\.[^.]+$)")


def resolve_checkpoint_pattern(pattern: str) -> Tuple[str, Optional[str]]:
    """Resolve a ``model.ckpt`` value holding a glob (``*``, ``?``, ``[``) to its LATEST match.

    "Latest" is the largest number before the extension (``checkpoint_12.pth`` beats
    ``checkpoint_9.pth``), then the newest modification time. Returns ``(path, notice)``:
    a plain path comes back unchanged with no notice; a pattern with no match gives ``""``
    (no checkpoint: random weights for what it would have provided) and a notice saying so.
    """
    if not pattern or not any(ch in pattern for ch in "*?["):
        return pattern, None
    matches = [p for p in glob.glob(os.path.expanduser(pattern)) if os.path.isfile(p)]
    if not matches:
        return "", (
            f"model.ckpt: no checkpoint matches {pattern!r}; the trained parts keep their RANDOM "
            "initial weights (train first, e.g. `python train.py --cfg-path train_configs/tiny_synthetic.yaml`)"
        )

    def key(path: str) -> Tuple[int, float]:
        m = _CKPT_NUMBER.search(os.path.basename(path))
        return (int(m.group(1)) if m else -1, os.path.getmtime(path))

    best = max(matches, key=key)
    return best, f"model.ckpt: using {best} (latest of {len(matches)} matching {pattern!r})"


def add_model_args(parser) -> None:
    """Flags shared by the chat entry points: config, template, device and memory options."""
    from videollm.config import add_common_args

    add_common_args(parser)
    parser.add_argument("--model_type", "--model-type", dest="model_type", default=None,
                        help="chat template (e.g. vicuna, llama_v2); default: the model's own")
    parser.add_argument("--gpu-id", type=int, default=None, help="CUDA device index (default: 0 if CUDA is available, else CPU)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even if CUDA is available")
    parser.add_argument("--ckpt", default=None,
                        help="override model.ckpt (a file, or a glob such as 'output/run/checkpoint_*.pth': the latest match)")
    mem = parser.add_argument_group("memory (see docs/memory.md)")
    mem.add_argument("--low-resource", action="store_true", help="load the LLM in 8 bits (model.low_resource, bitsandbytes)")
    mem.add_argument("--load-in-4bit", action="store_true", help="load the LLM in 4 bits (model.load_in_4bit, bitsandbytes)")
    mem.add_argument("--device-map", default=None, help="model.device_map for the LLM, e.g. 'auto' to spread it over GPUs")
    mem.add_argument("--vit-on-cpu", action="store_true", help="keep the vision encoder on the CPU in fp32 (model.vit_on_cpu)")
    frames = parser.add_argument_group("frame sampling of uploaded videos (default: the model's own)")
    frames.add_argument("--sampling", default=None, help="uniform, middle, linspace, keyframe or fps (with --fps)")
    frames.add_argument("--fps", type=float, default=None, help="frames per second for --sampling fps")
    frames.add_argument("--max-frames", type=int, default=None, help="cap on the frames of --sampling fps")


def add_generation_args(parser, greedy_default: bool = True) -> None:
    """The generation flags of every entry point (CLI, batch inference, demo, server), with the
    defaults of :class:`GenerationSettings` (greedy; ``--sample`` samples). ``greedy_default`` is
    accepted for older callers and ignored: there is one decoding default."""
    d = GenerationSettings()
    gen = parser.add_argument_group("generation (greedy by default)")
    gen.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help=f"(default {d.max_new_tokens})")
    gen.add_argument("--max-length", type=int, default=d.max_length,
                     help=f"context limit: prompt + new tokens (default {d.max_length})")
    gen.add_argument("--num-beams", type=int, default=d.num_beams, help=f"(default {d.num_beams})")
    gen.add_argument("--temperature", type=float, default=d.temperature, help=f"with --sample (default {d.temperature})")
    gen.add_argument("--top-p", type=float, default=d.top_p, help=f"with --sample (default {d.top_p})")
    gen.add_argument("--sample", dest="do_sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--greedy", dest="do_sample", action="store_false", help="greedy decoding (the default)")
    parser.set_defaults(do_sample=d.do_sample)


def generation_from_args(args) -> GenerationSettings:
    return GenerationSettings(max_new_tokens=args.max_new_tokens, max_length=args.max_length, num_beams=args.num_beams,
                              temperature=args.temperature, top_p=args.top_p, do_sample=bool(args.do_sample))


def _device_from_args(args) -> torch.device:
    if getattr(args, "cpu", False):
        return torch.device("cpu")
    gpu = getattr(args, "gpu_id", None)
    if torch.cuda.is_available():
        return torch.device(f"cuda:{gpu or 0}")
    if gpu is not None:
        logger.warning("--gpu-id %s given but CUDA is not available: running on the CPU", gpu)
    return torch.device("cpu")


def _schema_keys(model_cls) -> set:
    schema = getattr(model_cls, "config_schema", None)
    return {f.name for f in dataclasses.fields(schema)} if schema is not None else set()


def build_chat_from_args(args) -> Tuple["Chat", str, List[str]]:
    """Eval config -> model -> :class:`Chat`. Returns (chat, template name, startup notices).

    Steps: ``load_config(--cfg-path, --options)``; the command-line memory flags set the model's
    ``low_resource`` / ``load_in_4bit`` / ``device_map`` / ``vit_on_cpu`` / ``device_8bit`` keys
    (a flag the model has no key for is an error); a glob in ``model.ckpt`` (or ``--ckpt``) is
    resolved to the latest match; ``from_config(cfg.model)`` of the registered ``arch``; the video
    processor is the one named by ``datasets.webvid.vis_processor.train`` when the config has it
    (as the original demo reads it), else the model's own chat processing.
    """
    from omegaconf import OmegaConf

    from videollm.config import load_config
    from videollm.registry import registry

    notices: List[str] = []
    cfg = load_config(args.cfg_path, args.options)
    model_cfg = cfg.model
    device = _device_from_args(args)
    model_cls = registry.get_model_class(str(model_cfg.arch))
    keys = _schema_keys(model_cls)
    if args.ckpt is not None:
        model_cfg.ckpt = args.ckpt
    for flag, key in (("low_resource", "low_resource"), ("load_in_4bit", "load_in_4bit"), ("vit_on_cpu", "vit_on_cpu")):
        if getattr(args, flag, False):
            if key not in keys:
                raise ConfigError(f"--{flag.replace('_', '-')}: model arch {model_cfg.arch!r} has no model.{key} option")
            model_cfg[key] = True
    if getattr(args, "device_map", None):
        model_cfg.device_map = args.device_map
    if device.type == "cuda" and "device_8bit" in keys:
        model_cfg.device_8bit = device.index or 0
    for key in ("ckpt", "ckpt_2"):
        if key not in keys:
            continue
        resolved, notice = resolve_checkpoint_pattern(str(model_cfg.get(key) or ""))
        model_cfg[key] = resolved
        if notice and not resolved:  # no match: the user must know; a match is only logged
            notices.append(notice)
            logger.warning("%s", notice)
        elif notice:
            logger.info("%s", notice)
    weight_keys = list(getattr(model_cls, "weight_keys", {}) or {})
    if weight_keys and not any(model_cfg.get(k) for k in weight_keys):
        notice = "no weights were given (" + ", ".join(f"model.{k}" for k in weight_keys) + \
            "): this model has RANDOM weights and answers gibberish (a smoke test)."
        notices.append(notice)
        logger.warning("%s", notice)

    model = model_cls.from_config(model_cfg)
    model.place(device)
    model.eval()

    vis_processor = None
    n_frms = None
    proc_cfg = OmegaConf.select(cfg, "datasets.webvid.vis_processor.train")
    if proc_cfg is not None:
        vis_processor = registry.get_processor_class(str(proc_cfg.name)).from_config(proc_cfg)
        n_frms = int(proc_cfg.get("n_frms", 8))  # a model trained on fewer frames is asked with as many
    media_options = {k: getattr(args, k) for k in ("sampling", "fps", "max_frames") if getattr(args, k, None) is not None}
    chat = Chat(model, vis_processor, device=device, n_frms=n_frms, media_options=media_options)
    template = args.model_type or model.default_template
    get_template(template)  # an unknown name fails here, naming the registered ones
    return chat, template, notices


__all__ = [
    "AUDIO_VIDEO_MESSAGE",
    "CONTEXT_WARNING",
    "Chat",
    "ChatMedia",
    "GenerationSettings",
    "add_generation_args",
    "add_model_args",
    "generation_from_args",
    "build_chat_from_args",
    "resolve_checkpoint_pattern",
    "IMAGE_MESSAGE",
    "IMAGE_SYSTEM",
    "StopOnText",
    "VIDEO_MESSAGE_PREFIX",
    "new_conversation",
    "postprocess_text",
]
