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


# ----------------------------------------------------------------------------------------------
# Jinja chat templates for transformers users (tokenizer.apply_chat_template)
# ----------------------------------------------------------------------------------------------
# The prompt of a conversation given as ``messages = [{"role": "system"|"user"|"assistant",
# "content"}]`` is what the chat builds: ``new_conversation()`` (a leading system message replaces
# the template's system text), one ``append_message`` per message (user -> roles[0], assistant ->
# roles[1]), ``add_generation_prompt`` appends the open assistant turn, then ``get_prompt()``.
# Media placeholders are the caller's: put the model's placeholder string in the content.

_PRELUDE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}{%- set msgs = messages[1:] -%}"
    "{%- else -%}{%- set system = SYSTEM -%}{%- set msgs = messages -%}{%- endif -%}"
)
_ROLE = "{%- set role = R0 if m['role'] == 'user' else R1 -%}"


def _lit(text: str) -> str:
    """A Jinja string literal of ``text`` (JSON escapes are Jinja escapes)."""
    import json

    return json.dumps(text)


def _body(conv: Conversation) -> str:
    style = conv.sep_style
    if hasattr(conv, "seps") and hasattr(conv, "answer_prompt"):
        # Roles carry their punctuation, one separator per role, the open assistant turn is
        # role + answer_prompt, and a conversation ending on a user turn opens the assistant's.
        return (
            "{%- if system != '' -%}{{ system + S0 }}{%- endif -%}"
            "{%- set n = msgs|length + (1 if add_generation_prompt else 0) -%}"
            "{%- for m in msgs -%}" + _ROLE +
            "{%- set last = loop.index == n -%}"
            "{{ role + (m['content'] or '') + (S0 if role == R0 else S1) }}"
            "{%- if last and role != R1 -%}{{ R1 }}{%- endif -%}"
            "{%- endfor -%}"
            "{%- if add_generation_prompt -%}{{ R1 + ANSWER }}{%- endif -%}"
        )
    if style == SeparatorStyle.SINGLE:
        return (
            "{{ system + S0 }}"
            "{%- for m in msgs -%}" + _ROLE +
            "{%- if m['content'] -%}{{ role + ': ' + m['content'] + S0 }}{%- else -%}{{ role + ':' }}{%- endif -%}"
            "{%- endfor -%}"
            "{%- if add_generation_prompt -%}{{ R1 + ':' }}{%- endif -%}"
        )
    if style == SeparatorStyle.TWO:
        return (
            "{%- if system -%}{{ system + S0 }}{%- endif -%}"
            "{%- for m in msgs -%}" + _ROLE +
            "{%- if m['content'] -%}{{ role + ': ' + m['content'] + (S0 if loop.index0 % 2 == 0 else S1) }}"
            "{%- else -%}{{ role + ':' }}{%- endif -%}"
            "{%- endfor -%}"
            "{%- if add_generation_prompt -%}{{ R1 + ':' }}{%- endif -%}"
        )
    if style == SeparatorStyle.PLAIN:
        return (
            "{{ system }}"
            "{%- for m in msgs -%}"
            "{%- if m['content'] -%}{{ m['content'] + (S0 if loop.index0 % 2 == 0 else S1) }}{%- endif -%}"
            "{%- endfor -%}"
        )
    if style == SeparatorStyle.CHATML:
        return (
            "{%- if system -%}{{ system + S0 }}{%- endif -%}"
            "{%- for m in msgs -%}" + _ROLE +
            "{%- if m['content'] -%}{{ role + m['content'] + S0 }}{%- else -%}{{ role }}{%- endif -%}"
            "{%- endfor -%}"
            "{%- if add_generation_prompt -%}{{ R1 }}{%- endif -%}"
        )
    if style == SeparatorStyle.LLAMA_2:
        # get_prompt's lstrip(sep) removes the sep before the first "[INST]" only.
        return (
            "{%- for m in msgs -%}"
            "{%- if m['content'] -%}"
            "{%- set text = ('<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + m['content']) if loop.first else m['content'] -%}"
            "{%- if loop.index0 % 2 == 0 -%}{{ ('' if loop.first else S0) + '[INST] ' + text + ' [/INST]' }}"
            "{%- else -%}{{ ' ' + text + ' ' + S1 }}{%- endif -%}"
            "{%- endif -%}"
            "{%- endfor -%}"
        )
    raise ConfigError(f"separator style {style}: no Jinja form")


def chat_template_jinja(template_name: str) -> str:
    """The Jinja ``chat_template`` (transformers' ``apply_chat_template``) that renders exactly the
    prompt :class:`Conversation.get_prompt` builds for template ``template_name`` at inference
    (see the comment above for the message mapping). Raises ConfigError for an unknown template or
    a conversation class whose prompt rules have no Jinja form here."""
    conv = get_template(template_name).new_conversation()
    if type(conv).get_prompt is not Conversation.get_prompt and not (hasattr(conv, "seps") and hasattr(conv, "answer_prompt")):
        raise ConfigError(f"chat template {template_name!r}: {type(conv).__name__} builds its own prompt; "
                          "no Jinja form is known for it")
    seps = (conv.sep, conv.sep2 or conv.sep)
    if hasattr(conv, "seps"):
        seps = tuple(conv.seps)
    if conv.sep_style == SeparatorStyle.LLAMA_2:
        seps = (conv.sep, conv.sep2 or "")
    values = {"SYSTEM": conv.system, "R0": conv.roles[0], "R1": conv.roles[1], "S0": seps[0], "S1": seps[1],
              "ANSWER": getattr(conv, "answer_prompt", "") or ""}
    head = "".join("{%- set " + k + " = " + _lit(v) + " -%}" for k, v in values.items())
    return head + _PRELUDE + _body(conv)


def prompt_of_messages(template_name: str, messages: Sequence[Dict[str, str]], add_generation_prompt: bool) -> str:
    """The prompt our conversation objects build for ``messages`` (what the Jinja form must render)."""
    conv = get_template(template_name).new_conversation()
    msgs = list(messages)
    if msgs and msgs[0]["role"] == "system":
        conv.system = msgs[0]["content"]
        msgs = msgs[1:]
    for m in msgs:
        conv.append_message(conv.roles[0] if m["role"] == "user" else conv.roles[1], m["content"])
    if add_generation_prompt:
        conv.append_message(conv.roles[1], None)
    return conv.get_prompt()


def write_chat_template(folder, template_name: str) -> str:
    """Give the tokenizer saved in ``folder`` the Jinja form of ``template_name``: written as
    ``chat_template.jinja`` (what transformers reads) and as ``chat_template`` in
    ``tokenizer_config.json`` (created when absent). Returns the template text."""
    import json
    from pathlib import Path

    folder = Path(folder)
    text = chat_template_jinja(template_name)
    (folder / "chat_template.jinja").write_text(text, encoding="utf-8")
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
    cfg["chat_template"] = text
    cfg.setdefault("videollm_template", template_name)
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False), encoding="utf-8")
    return text
