"""The chat API: upload a video, an image or a video with its sound, ask, answer (streamed or not).

:class:`Chat` reproduces the operations and prompt strings of the original Video-LLaMA chat
(``conversation_video.py``) on top of :class:`~videollm.models.video_llama.VideoLLAMA`:

* ``upload_video_without_audio``: 8 frames, uniform sampling, resized by the decoder to the
  model's image size; user message ``"<Video><ImageHere></Video> " + msg`` where msg is the
  loader's "The video contains ... seconds. " sentence (it ends with a space, and ``ask`` joins
  with another one: the double space of the original's prompts, quirk T5).
* ``upload_video`` (audio + video): the audio embeddings go FIRST in ``img_list``, then the video
  embeddings; the system text becomes ""; the user message is :data:`AUDIO_VIDEO_MESSAGE`, whose
  runs of 17 and 18 spaces come from a backslash-newline continuation inside the original's
  string literal (quirk T5). The timestamp sentence is not used in that case.
* ``upload_img``: message ``"<Image><ImageHere></Image> "``.
* ``ask``: appends the question to the last user message when it holds ``</Video>`` or
  ``</Image>``, otherwise starts a new user turn.
* ``answer``: the prompt is split on ``<ImageHere>``; only the first piece gets BOS; pieces and
  visual embeddings are interleaved; the context is cut from the left to ``max_length`` minus
  ``max_new_tokens``; generation stops on "###" (vicuna) or EOS (llama_v2); the text is cut at the
  stop string and kept after the last "Assistant:" / "ASSISTANT:", then stripped.

Differences from the original, each visible:

* Falling back from audio+video to video only (no audio track, undecodable audio, or a model
  without the audio branch) produces a notice (logged as a warning, returned by the upload and
  added to ``notices``); the original printed "no audio is found" to stdout.
* Cutting the context produces a notice too (the original printed a warning).
* The stop check is a string check on the decoded tail of each sequence, so it works with any
  vocabulary; the original compared LLaMA ids (835; 2277 29937) that mean nothing elsewhere.
* ``do_sample`` is a parameter (default True, as the original, which always sampled).
* Batched generation (:meth:`Chat.answer_batch`) with left padding, and streaming
  (:meth:`Chat.stream_answer`).
* Video and image sizes follow the model's ``image_size`` (224 for the released models, as the
  original's hard-coded 224), so the tiny test models work.
* Bad files raise :class:`~videollm.errors.VideoLLMError` subclasses naming the file.
"""

from __future__ import annotations

import glob
import logging
import os
import queue
import re
import threading
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from videollm.conversation import Conversation, SeparatorStyle, get_conv_template
from videollm.errors import AudioDecodeError, ConfigError, PromptError, VideoDecodeError

logger = logging.getLogger(__name__)

IMAGE_PLACEHOLDER = "<ImageHere>"
# The original's audio+video user message. Its source line ends in "\" inside the string literal,
# so the newline disappears and the next line's 16 spaces of indentation join the text: 1 + 16
# spaces after the first sentence and 2 + 16 after the second.
AUDIO_VIDEO_MESSAGE = (
    "Close your eyes, open your ears and you imagine only based on the sound that: <ImageHere>."
    + " " * 17
    + "Close your ears, open your eyes and you see that <Video><ImageHere></Video>."
    + " " * 18
    + "Now answer my question based on what you have just seen and heard."
)
VIDEO_MESSAGE_PREFIX = "<Video><ImageHere></Video> "
IMAGE_MESSAGE = "<Image><ImageHere></Image> "
# System texts the original demo sets: images get this sentence, videos an empty system.
IMAGE_SYSTEM = (
    "You are able to understand the visual content that the user provides. "
    "Follow the instructions carefully and explain your answers in detail."
)
CONTEXT_WARNING = (
    "Warning: The number of tokens in current conversation exceeds the max length. "
    "The model will not see the contexts outside the range."
)
MODEL_TYPES = ("vicuna", "llama_v2")

ImageInput = Union[str, "os.PathLike[str]", Any, torch.Tensor]


def model_type_from_config(model_type: Optional[str]) -> str:
    """Chat template for a model preset name: anything naming llama-2 -> llama_v2, else vicuna."""
    name = (model_type or "").lower().replace("-", "_")
    return "llama_v2" if ("llama_v2" in name or "llama2" in name) else "vicuna"


def new_conversation(model_type: str = "vicuna", media: str = "video") -> Conversation:
    """A fresh conversation as the original demo starts it.

    ``media="image"`` sets :data:`IMAGE_SYSTEM`; ``"video"`` sets an empty system (the original
    audio-video demo does this for both templates, overriding llama_v2's default system).
    """
    if model_type not in MODEL_TYPES:
        raise ConfigError(f"--model_type {model_type!r}: unknown; choose one of {', '.join(MODEL_TYPES)}")
    conv = get_conv_template(model_type)
    if media == "image":
        conv.system = IMAGE_SYSTEM
    elif media == "video":
        conv.system = ""
    else:
        raise ConfigError(f"media={media!r}: expected 'video' or 'image'")
    return conv


def stop_text_for(conv: Conversation) -> str:
    """The string that ends an answer: "###" (vicuna) or "</s>" (llama_v2)."""
    return conv.sep if conv.sep_style == SeparatorStyle.SINGLE else (conv.sep2 or "</s>")


def postprocess_ids(ids: Sequence[int]) -> List[int]:
    """Drop a leading 0 (unk) and then a leading 1 (BOS), as the original does (quirk T6)."""
    out = [int(i) for i in ids]
    if out and out[0] == 0:
        out = out[1:]
    if out and out[0] == 1:
        out = out[1:]
    return out


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
    """Chat with a Video-LLaMA model about one video, image, or video with sound.

    Args:
        model: a :class:`~videollm.models.video_llama.VideoLLAMA` (in eval mode).
        vis_processor: video processor with ``transform((3, T, H, W) 0..255) -> normalised``
            (``alpro_video_eval``); None builds one at the model's image size.
        device: where the inputs go (the model must already be there).
        image_processor: PIL image -> (3, s, s) (``blip2_image_eval``); None builds one at the
            model's image size.
        n_frms: frames sampled per video (8, as the original).
        timeout: seconds before a decode is abandoned (video and audio).

    Every notice (audio fallback, context cut) is logged as a warning, appended to
    ``self.notices`` and to the ``notices`` list a call is given, if any.
    """

    def __init__(
        self,
        model,
        vis_processor=None,
        device: Union[str, torch.device] = "cpu",
        image_processor=None,
        n_frms: int = 8,
        timeout: Optional[float] = 30.0,
    ) -> None:
        from omegaconf import OmegaConf

        from videollm.registry import registry

        self.model = model
        self.device = torch.device(device)
        self.image_size = int(getattr(model.cfg, "image_size", 224))
        if vis_processor is None:
            vis_processor = registry.get_processor_class("alpro_video_eval").from_config(
                OmegaConf.create({"image_size": self.image_size, "n_frms": n_frms})
            )
        if image_processor is None:
            # The original builds Blip2ImageEvalProcessor() with its default 224 whatever the
            # config says (quirk A4); the model's image size is the same for released models.
            image_processor = registry.get_processor_class("blip2_image_eval").from_config(OmegaConf.create({"image_size": self.image_size}))
        self.vis_processor = vis_processor
        self.image_vis_processor = image_processor
        self.n_frms = n_frms
        self.timeout = timeout
        self.notices: List[str] = []

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
    def _load_video(self, video_path: Union[str, "os.PathLike[str]"]) -> Tuple[torch.Tensor, str]:
        """File -> normalised (1, 3, T, s, s) on the device, and the timestamp sentence."""
        from videollm.processors.video_loader import load_video

        if not isinstance(video_path, (str, os.PathLike)):
            raise VideoDecodeError(f"expected a video file path, got {type(video_path).__name__}")
        video, msg = load_video(
            video_path, n_frms=self.n_frms, height=self.image_size, width=self.image_size,
            sampling="uniform", return_msg=True, timeout=self.timeout,
        )
        video = self.vis_processor.transform(video)
        return video.unsqueeze(0).to(self.device), msg

    def _load_audio(self, path: Union[str, "os.PathLike[str]"]) -> torch.Tensor:
        """File -> ImageBind audio input (1, 8, 1, 128, 204); AudioDecodeError names the file."""
        from videollm.processors.audio import load_and_transform_audio
        from videollm.processors.video_loader import run_with_timeout

        try:
            audio = run_with_timeout(lambda: load_and_transform_audio(path, clips_per_video=8), self.timeout, os.fspath(path))
        except AudioDecodeError:
            raise
        except VideoDecodeError as exc:  # the timeout helper's error type
            raise AudioDecodeError(str(exc).replace("decoding", "audio decoding")) from None
        return audio.unsqueeze(0).to(self.device)

    def upload_video(
        self,
        video_path: Union[str, "os.PathLike[str]"],
        conv: Conversation,
        img_list: List[torch.Tensor],
        with_audio: bool = True,
        notices: Optional[List[str]] = None,
    ) -> str:
        """Video with its sound (audio embeddings first). Falls back to video only, with a notice.

        Returns "Received." or, after a fallback, the notice text.
        """
        if not with_audio:
            return self.upload_video_without_audio(video_path, conv, img_list)
        name = os.fspath(video_path) if isinstance(video_path, (str, os.PathLike)) else repr(video_path)
        if not getattr(self.model, "equip_audio_branch", False):
            reason = "the model has no audio branch (model.equip_audio_branch is false)"
            self.upload_video_without_audio(video_path, conv, img_list)
            return self._notice(f"{name}: audio ignored, answering from the frames only: {reason}.", notices)
        video, msg = self._load_video(video_path)  # decode errors propagate: nothing to fall back to
        try:
            audio = self._load_audio(video_path)
        except AudioDecodeError as exc:
            from videollm.processors.audio import NoAudioStreamError

            reason = "the video has no audio track" if isinstance(exc, NoAudioStreamError) else f"the audio cannot be read ({exc})"
            self._append_video(video, msg, conv, img_list)
            return self._notice(f"{name}: {reason}; answering from the frames only.", notices)
        with torch.no_grad():
            audio_emb, _ = self.model.encode_audioQformer(audio, modality_type="audio")
            video_emb, _ = self.model.encode_videoQformer_visual(video)
        img_list.append(audio_emb)
        img_list.append(video_emb)
        conv.system = ""
        conv.append_message(conv.roles[0], AUDIO_VIDEO_MESSAGE)
        return "Received."

    def _append_video(self, video: torch.Tensor, msg: str, conv: Conversation, img_list: List[torch.Tensor]) -> None:
        with torch.no_grad():
            video_emb, _ = self.model.encode_videoQformer_visual(video)
        img_list.append(video_emb)
        conv.append_message(conv.roles[0], VIDEO_MESSAGE_PREFIX + msg)

    def upload_video_without_audio(
        self, video_path: Union[str, "os.PathLike[str]"], conv: Conversation, img_list: List[torch.Tensor]
    ) -> str:
        """Video frames only; message ``"<Video><ImageHere></Video> " + msg``."""
        video, msg = self._load_video(video_path)
        self._append_video(video, msg, conv, img_list)
        return "Received."

    def upload_img(self, image: ImageInput, conv: Conversation, img_list: List[torch.Tensor]) -> str:
        """Image path, PIL image, or tensor (3, H, W) / (1, 3, H, W) / (1, 3, 1, H, W), normalised."""
        from PIL import Image

        from videollm.errors import ImageDecodeError
        from videollm.processors.image_processors import load_image

        if isinstance(image, (str, os.PathLike, Image.Image)):
            pixels = self.image_vis_processor(load_image(image))  # ImageDecodeError names the file
            pixels = pixels.unsqueeze(0).unsqueeze(2)
        elif isinstance(image, torch.Tensor):
            pixels = image
            if pixels.dim() == 3:
                pixels = pixels.unsqueeze(0)
            if pixels.dim() == 4:
                pixels = pixels.unsqueeze(2)
            if pixels.dim() != 5:
                raise ImageDecodeError(f"image tensor of shape {tuple(image.shape)}: expected (3, H, W) or (1, 3, H, W)")
        else:
            raise ImageDecodeError(f"expected an image path, a PIL image or a tensor, got {type(image).__name__}")
        with torch.no_grad():
            image_emb, _ = self.model.encode_videoQformer_visual(pixels.to(self.device))
        img_list.append(image_emb)
        conv.append_message(conv.roles[0], IMAGE_MESSAGE)
        return "Received."

    # ------------------------------------------------------------------ conversation
    def ask(self, text: str, conv: Conversation) -> None:
        last = conv.messages[-1] if conv.messages else None
        if last is not None and last[0] == conv.roles[0] and last[1] and ("</Video>" in last[1] or "</Image>" in last[1]):
            last[1] = " ".join([last[1], text])
        else:
            conv.append_message(conv.roles[0], text)

    @staticmethod
    def reset(conv: Conversation, img_list: List[torch.Tensor]) -> None:
        """Forget the messages and the visual inputs (a new chat starts with a new upload)."""
        conv.messages = []
        img_list.clear()

    def get_context_emb(self, conv: Conversation, img_list: Sequence[torch.Tensor]) -> torch.Tensor:
        """Prompt -> embeddings (1, L, H_llm): text pieces (BOS on the first only) and visual tokens."""
        prompt = conv.get_prompt()
        segs = prompt.split(IMAGE_PLACEHOLDER)
        if len(segs) != len(img_list) + 1:
            raise PromptError(
                f"the prompt has {len(segs) - 1} {IMAGE_PLACEHOLDER} placeholders but {len(img_list)} visual "
                "inputs were uploaded; upload once per conversation"
            )
        tok = self.model.llama_tokenizer
        embs: List[torch.Tensor] = []
        dtype = self.model.llama_model.get_input_embeddings().weight.dtype
        for i, seg in enumerate(segs):
            ids = tok(seg, return_tensors="pt", add_special_tokens=i == 0)["input_ids"].to(self.device)
            embs.append(self.model.embed_tokens(ids))
            if i < len(img_list):
                embs.append(img_list[i].to(self.device, dtype))
        return torch.cat(embs, dim=1)

    def prepare(
        self,
        conv: Conversation,
        img_list: Sequence[torch.Tensor],
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
        embs = self.get_context_emb(conv, img_list)
        excess = embs.shape[1] + max_new_tokens - max_length
        if excess > 0:
            self._notice(
                f"{CONTEXT_WARNING} ({embs.shape[1]} prompt positions + {max_new_tokens} new tokens > "
                f"max_length {max_length}: the first {excess} positions are cut.)",
                notices,
            )
            embs = embs[:, excess:]
        return embs

    def _generation_kwargs(
        self, conv: Conversation, max_new_tokens: int, num_beams: int, min_length: int, top_p: float,
        repetition_penalty: float, length_penalty: float, temperature: float, do_sample: bool,
        cancel: Optional[threading.Event] = None,
    ) -> Dict[str, Any]:
        from transformers import StoppingCriteriaList

        stops = [stop_text_for(conv)]
        if conv.sep_style == SeparatorStyle.LLAMA_2:
            stops.append(self.model.llama_tokenizer.eos_token)
        kwargs: Dict[str, Any] = {
            "max_new_tokens": max_new_tokens,
            "num_beams": num_beams,
            "do_sample": do_sample,
            "min_length": min_length,
            "repetition_penalty": repetition_penalty,
            "stopping_criteria": StoppingCriteriaList([StopOnText(self.model.llama_tokenizer, stops, cancel=cancel)]),
            "eos_token_id": self.model.llama_tokenizer.eos_token_id,
        }
        if do_sample:  # passing these to greedy search only makes transformers warn
            kwargs.update(top_p=top_p, temperature=temperature)
        else:
            kwargs.update(top_p=None, temperature=None, top_k=None)
        if num_beams > 1:
            kwargs["length_penalty"] = length_penalty
        return kwargs

    def _finish(self, ids: Sequence[int], conv: Conversation) -> Tuple[str, np.ndarray]:
        ids = postprocess_ids(ids)
        text = postprocess_text(self.model.llama_tokenizer.decode(ids), conv)
        conv.messages[-1][1] = text
        return text, np.asarray(ids, dtype=np.int64)

    def answer(
        self,
        conv: Conversation,
        img_list: Sequence[torch.Tensor],
        max_new_tokens: int = 300,
        num_beams: int = 1,
        min_length: int = 1,
        top_p: float = 0.9,
        repetition_penalty: float = 1.0,
        length_penalty: float = 1,
        temperature: float = 1.0,
        max_length: int = 2000,
        do_sample: bool = True,
        notices: Optional[List[str]] = None,
    ) -> Tuple[str, np.ndarray]:
        """Generate the assistant's reply; returns (text, token ids) and stores the text in ``conv``."""
        embs = self.prepare(conv, img_list, max_new_tokens, max_length, notices)
        kwargs = self._generation_kwargs(conv, max_new_tokens, num_beams, min_length, top_p, repetition_penalty,
                                         length_penalty, temperature, do_sample)
        out = self.model.generate(inputs_embeds=embs, **kwargs)
        return self._finish(out[0].tolist(), conv)

    def stream_answer(
        self,
        conv: Conversation,
        img_list: Sequence[torch.Tensor],
        max_new_tokens: int = 300,
        num_beams: int = 1,
        min_length: int = 1,
        top_p: float = 0.9,
        repetition_penalty: float = 1.0,
        length_penalty: float = 1,
        temperature: float = 1.0,
        max_length: int = 2000,
        do_sample: bool = True,
        notices: Optional[List[str]] = None,
    ) -> Iterator[str]:
        """Like :meth:`answer`, but yields the reply in text increments as tokens arrive.

        The increments concatenate to the text :meth:`answer` would return for the same tokens
        (text that may still turn into the stop string, trailing spaces and half-decoded
        characters are held back until they are settled). Generation runs in a worker thread;
        closing the generator early cancels it. Beam search cannot stream: with ``num_beams > 1``
        the whole answer comes as one increment. The final text is stored in ``conv``.
        """
        if num_beams > 1:
            text, _ = self.answer(conv, img_list, max_new_tokens, num_beams, min_length, top_p, repetition_penalty,
                                  length_penalty, temperature, max_length, do_sample, notices)
            if text:
                yield text
            return
        embs = self.prepare(conv, img_list, max_new_tokens, max_length, notices)
        cancel = threading.Event()
        kwargs = self._generation_kwargs(conv, max_new_tokens, num_beams, min_length, top_p, repetition_penalty,
                                         length_penalty, temperature, do_sample, cancel=cancel)
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
        tok = self.model.llama_tokenizer
        try:
            while True:
                chunk = streamer.queue.get()
                if chunk is None:
                    break
                ids.extend(chunk)
                if diverged:
                    continue
                visible = _settled_text(tok.decode(postprocess_ids(ids)), stop, marker)
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

    def answer_batch(
        self,
        convs: Sequence[Conversation],
        img_lists: Sequence[Sequence[torch.Tensor]],
        max_new_tokens: int = 300,
        num_beams: int = 1,
        min_length: int = 1,
        top_p: float = 0.9,
        repetition_penalty: float = 1.0,
        length_penalty: float = 1,
        temperature: float = 1.0,
        max_length: int = 2000,
        do_sample: bool = False,
        notices: Optional[List[str]] = None,
    ) -> List[Tuple[str, np.ndarray]]:
        """Answer several conversations in one ``generate`` call (greedy by default).

        Prompts are LEFT-padded (zero embeddings, attention mask 0), so every row's last prompt
        position is the last column; position ids follow the mask. All conversations must use
        the same template (one stop string).
        """
        if not convs:
            return []
        if len({(c.sep_style, c.sep, c.sep2) for c in convs}) > 1:
            raise ConfigError("answer_batch: all conversations must use the same template")
        embs = [self.prepare(c, imgs, max_new_tokens, max_length, notices)[0] for c, imgs in zip(convs, img_lists)]
        longest = max(e.shape[0] for e in embs)
        hidden = embs[0].shape[-1]
        batch = embs[0].new_zeros(len(embs), longest, hidden)
        mask = torch.zeros(len(embs), longest, dtype=torch.long, device=batch.device)
        for i, e in enumerate(embs):
            batch[i, longest - e.shape[0]:] = e
            mask[i, longest - e.shape[0]:] = 1
        kwargs = self._generation_kwargs(convs[0], max_new_tokens, num_beams, min_length, top_p, repetition_penalty,
                                         length_penalty, temperature, do_sample)
        out = self.model.generate(inputs_embeds=batch, attention_mask=mask, **kwargs)
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
    parser.add_argument("--model_type", "--model-type", dest="model_type", choices=MODEL_TYPES, default=None,
                        help="chat template; default: llama_v2 if model.model_type names llama-2, else vicuna")
    parser.add_argument("--gpu-id", type=int, default=None, help="CUDA device index (default: 0 if CUDA is available, else CPU)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even if CUDA is available")
    parser.add_argument("--ckpt", default=None,
                        help="override model.ckpt (a file, or a glob such as 'output/run/checkpoint_*.pth': the latest match)")
    mem = parser.add_argument_group("memory (see docs/memory.md)")
    mem.add_argument("--low-resource", action="store_true", help="load the LLM in 8 bits (model.low_resource, bitsandbytes)")
    mem.add_argument("--load-in-4bit", action="store_true", help="load the LLM in 4 bits (model.load_in_4bit, bitsandbytes)")
    mem.add_argument("--device-map", default=None, help="model.device_map for the LLM, e.g. 'auto' to spread it over GPUs")
    mem.add_argument("--vit-on-cpu", action="store_true", help="keep the EVA ViT on the CPU in fp32 (model.vit_on_cpu)")


def _device_from_args(args) -> torch.device:
    if getattr(args, "cpu", False):
        return torch.device("cpu")
    gpu = getattr(args, "gpu_id", None)
    if torch.cuda.is_available():
        return torch.device(f"cuda:{gpu or 0}")
    if gpu is not None:
        logger.warning("--gpu-id %s given but CUDA is not available: running on the CPU", gpu)
    return torch.device("cpu")


def build_chat_from_args(args) -> Tuple["Chat", str, List[str]]:
    """Eval config -> model -> :class:`Chat`. Returns (chat, model_type, startup notices).

    Steps: ``load_config(--cfg-path, --options)``; the command-line memory flags set
    ``model.low_resource`` / ``load_in_4bit`` / ``device_map`` / ``vit_on_cpu`` /
    ``device_8bit``; a glob in ``model.ckpt`` (or ``--ckpt``) is resolved to the latest match;
    ``VideoLLAMA.from_config(cfg.model)``; the video processor is the one named by
    ``datasets.webvid.vis_processor.train`` (as the original demo reads it), or
    ``alpro_video_eval`` at the model's image size.
    """
    from omegaconf import OmegaConf

    from videollm.config import load_config
    from videollm.registry import registry

    notices: List[str] = []
    cfg = load_config(args.cfg_path, args.options)
    model_cfg = cfg.model
    device = _device_from_args(args)
    if args.ckpt is not None:
        model_cfg.ckpt = args.ckpt
    for flag, key in (("low_resource", "low_resource"), ("load_in_4bit", "load_in_4bit"), ("vit_on_cpu", "vit_on_cpu")):
        if getattr(args, flag, False):
            model_cfg[key] = True
    if getattr(args, "device_map", None):
        model_cfg.device_map = args.device_map
    if device.type == "cuda":
        model_cfg.device_8bit = device.index or 0
    if (model_cfg.get("low_resource") or model_cfg.get("load_in_4bit")) and device.type != "cuda":
        raise ConfigError("--low-resource / --load-in-4bit need a CUDA GPU (bitsandbytes); drop them on the CPU")
    for key in ("ckpt", "ckpt_2"):
        resolved, notice = resolve_checkpoint_pattern(str(model_cfg.get(key) or ""))
        model_cfg[key] = resolved
        if notice:
            notices.append(notice)
            logger.warning("%s", notice)
    if not model_cfg.get("llama_model") and not model_cfg.get("ckpt"):
        notice = "no LLM weights and no checkpoint: this model has RANDOM weights and answers gibberish (a smoke test)."
        notices.append(notice)
        logger.warning("%s", notice)

    model_cls = registry.get_model_class(str(model_cfg.arch))
    model = model_cls.from_config(model_cfg)
    place_model(model, device)
    model.eval()

    vis_processor = None
    n_frms = 8  # the original's chat samples 8 frames
    proc_cfg = OmegaConf.select(cfg, "datasets.webvid.vis_processor.train")
    if proc_cfg is not None:
        vis_processor = registry.get_processor_class(str(proc_cfg.name)).from_config(proc_cfg)
        n_frms = int(proc_cfg.get("n_frms", n_frms))  # a model trained on fewer frames is asked with as many
    chat = Chat(model, vis_processor, device=device, n_frms=n_frms)
    model_type = args.model_type or model_type_from_config(str(model_cfg.get("model_type", "")))
    return chat, model_type, notices


def place_model(model, device: torch.device) -> None:
    """Move the model to ``device``; an LLM already placed by bitsandbytes or a device map stays put,
    and with ``vit_on_cpu`` the ViT and ``ln_vision`` stay on the CPU in fp32."""
    cfg = model.cfg
    llm_placed = bool(cfg.low_resource or cfg.load_in_4bit or cfg.device_map)
    for name, child in model.named_children():
        if name == "llama_model" and llm_placed:
            continue
        if name in ("visual_encoder", "ln_vision") and cfg.vit_on_cpu:
            child.to("cpu", torch.float32)
            continue
        child.to(device)
    for name, param in model.named_parameters(recurse=False):  # query tokens
        param.data = param.data.to(device)


__all__ = [
    "AUDIO_VIDEO_MESSAGE",
    "CONTEXT_WARNING",
    "Chat",
    "add_model_args",
    "build_chat_from_args",
    "place_model",
    "resolve_checkpoint_pattern",
    "IMAGE_MESSAGE",
    "IMAGE_SYSTEM",
    "MODEL_TYPES",
    "StopOnText",
    "VIDEO_MESSAGE_PREFIX",
    "model_type_from_config",
    "new_conversation",
    "postprocess_ids",
    "postprocess_text",
]
