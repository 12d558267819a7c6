"""Prompting as data: the registry of chat templates every model's prompts come from.

A :class:`ChatTemplate` says how a conversation is written (a :class:`Conversation` prototype:
system text, roles, separator style), how an uploaded medium becomes a user message
(``media_messages``, with the model's placeholder string and the video's frame-time sentence
``{msg}``), what system text each kind of medium sets, how the question joins the media
message, where an answer stops, and whether the media move to the latest user turn (models whose
visual tokens depend on the question). The chat, batch inference, the evaluation harness and the
server build every prompt through it; a model names its default with ``default_template``.

Video-LLaMA's two templates (``vicuna``, ``llama_v2``) are registered here with the original's
exact strings (see ``videollm/chat.py`` for the quirks they keep). Other systems register
theirs next to their model (``register_template``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Dict, Optional, Sequence, Tuple

from videollm.conversation import CONV_TEMPLATES, TRAIN_TEMPLATES, Conversation, SeparatorStyle
from videollm.errors import ConfigError
from videollm.tokenizer import IMAGE_PATCH_TOKEN

# The original Video-LLaMA audio+video user message. Its source line ends in "\" inside the
# string literal, so the newline disappears and the next line's 16 spaces of indentation join the
# text: 1 + 16 spaces after the first sentence and 2 + 16 after the second.
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


@dataclass
class ChatTemplate:
    """How one model family writes its prompts (see the module docstring)."""

    name: str
    conversation: Conversation
    training_conversation: Optional[Conversation] = None
    placeholder: str = "<image>"
    # kind ("video", "image", "audio_video") -> the user message an upload adds; "{msg}" is the
    # video's frame-time sentence ("" where the loader gives none)
    media_messages: Dict[str, str] = field(default_factory=dict)
    # kind -> system text for a conversation about that kind (None: the template's own)
    media_system: Dict[str, Optional[str]] = field(default_factory=dict)
    # a user message holding one of these markers takes the next question into itself
    media_markers: Tuple[str, ...] = ()
    question_join: str = " "
    stop: str = "</s>"
    stop_on_eos: bool = True
    media_in_latest_turn: bool = False

    def new_conversation(self, media: Optional[str] = None, training: bool = False) -> Conversation:
        proto = self.training_conversation if training and self.training_conversation is not None else self.conversation
        conv = proto.copy()
        conv.template = self.name
        if media is not None:
            if media not in self.media_messages and media not in self.media_system:
                raise ConfigError(f"template {self.name}: no message for media kind {media!r}; "
                                  f"known: {sorted(self.media_messages)}")
            system = self.media_system.get(media)
            if system is not None:
                conv.system = system
        return conv

    def media_message(self, kind: str, msg: str = "") -> str:
        if kind not in self.media_messages:
            raise ConfigError(f"template {self.name}: media kind {kind!r} is not supported; "
                              f"known: {sorted(self.media_messages)}")
        return self.media_messages[kind].replace("{msg}", msg)


TEMPLATES: Dict[str, ChatTemplate] = {}


def register_template(template: ChatTemplate, *, replace_existing: bool = False) -> ChatTemplate:
    if template.name in TEMPLATES and not replace_existing:
        raise ConfigError(f"chat template {template.name!r} is already registered")
    TEMPLATES[template.name] = template
    return template


def get_template(name: str) -> ChatTemplate:
    if name not in TEMPLATES:
        raise ConfigError(f"chat template {name!r}: unknown; registered: {', '.join(sorted(TEMPLATES))}")
    return TEMPLATES[name]


def template_names() -> Sequence[str]:
    return sorted(TEMPLATES)


def template_of(conv: Conversation) -> ChatTemplate:
    """The template a conversation follows (Video-LLaMA's are recognised by their style too)."""
    if conv.template:
        return get_template(conv.template)
    return get_template("llama_v2" if conv.sep_style == SeparatorStyle.LLAMA_2 else "vicuna")


_VIDEO_LLAMA_MEDIA = {
    "video": VIDEO_MESSAGE_PREFIX + "{msg}",
    "image": IMAGE_MESSAGE,
    "audio_video": AUDIO_VIDEO_MESSAGE,
}
_VIDEO_LLAMA_SYSTEM = {"video": "", "image": IMAGE_SYSTEM, "audio_video": ""}

register_template(ChatTemplate(
    name="vicuna", conversation=CONV_TEMPLATES["vicuna"], training_conversation=TRAIN_TEMPLATES["vicuna"],
    placeholder=IMAGE_PATCH_TOKEN, media_messages=dict(_VIDEO_LLAMA_MEDIA), media_system=dict(_VIDEO_LLAMA_SYSTEM),
    media_markers=("</Video>", "</Image>"), question_join=" ", stop="###", stop_on_eos=False,
))
register_template(ChatTemplate(
    name="llama_v2", conversation=CONV_TEMPLATES["llama_v2"],
    training_conversation=replace(TRAIN_TEMPLATES["llama_v2"], template="llama_v2"),
    placeholder=IMAGE_PATCH_TOKEN, media_messages=dict(_VIDEO_LLAMA_MEDIA), media_system=dict(_VIDEO_LLAMA_SYSTEM),
    media_markers=("</Video>", "</Image>"), question_join=" ", stop="</s>", stop_on_eos=True,
))
