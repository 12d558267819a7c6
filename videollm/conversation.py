"""Conversation templates and the instruction-data tokenisation of Video-LLaMA.

Two template families exist, chosen by ``model_type``:

* ``vicuna``: roles ("Human", "Assistant"), separator "###". At inference (the Chat) the prompt
  is ``system + "###" + "Human: msg###" + ... + "Assistant:"``. In training data each turn is
  ``"###Role: value\\n"`` after a ``system + "\\n\\n"`` header, with a final ``"###"``.
* ``llama_v2``: ``[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{q1} [/INST] {a1} </s><s>[INST] ...``.

The label masks reproduce the original exactly by default, including its off-by-a-few
boundaries (``_mask_targets`` with its ``+2`` and separately tokenised turn lengths; the llama-2
``instruction_len - 2`` rule). ``fix_label_mask=True`` selects a corrected mask (answers and their
terminators only, computed on the joint tokenisation); it is an explicit option only, because
released checkpoints were trained with the original masks.
"""

from __future__ import annotations

import copy
import dataclasses
from enum import Enum
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from videollm.errors import ConfigError, PromptError

IGNORE_INDEX = -100
from videollm.tokenizer import IMAGE_PATCH_TOKEN  # noqa: E402 - one definition
DEFAULT_IMAGE_TOKEN = "<image>"
INSTRUCT_MAX_LEN = 512  # the original datasets truncate instruction samples at 512 tokens


class SeparatorStyle(Enum):
    SINGLE = "single"  # Video-LLaMA vicuna: system###Role: msg###...Role:
    LLAMA_2 = "llama_2"  # [INST] <<SYS>> ... [/INST] answer </s><s>[INST] ...
    TWO = "two"  # LLaVA v1 / Vicuna v1.1: system Role: msg sep Role: msg sep2 ... (sep, sep2 alternate)
    PLAIN = "plain"  # messages only, each followed by sep / sep2 alternately (LLaVA "plain")
    CHATML = "chatml"  # system sep role msg sep ... (roles carry their "<|im_start|>name\n" prefix)


@dataclasses.dataclass
class Conversation:
    """A conversation: a system text, two roles and the messages so far."""

    system: str
    roles: Tuple[str, str]
    messages: List[List[Optional[str]]] = dataclasses.field(default_factory=list)
    sep_style: SeparatorStyle = SeparatorStyle.SINGLE
    sep: str = "###"
    sep2: Optional[str] = None
    template: str = ""  # the registered template this conversation follows (videollm.templates)

    def get_prompt(self) -> str:
        if self.sep_style == SeparatorStyle.TWO:
            seps = [self.sep, self.sep2 or self.sep]
            ret = self.system + seps[0] if self.system else ""  # no system: the prompt starts with the role
            for i, (role, message) in enumerate(self.messages):
                ret += f"{role}: {message}{seps[i % 2]}" if message else f"{role}:"
            return ret
        if self.sep_style == SeparatorStyle.PLAIN:
            seps = [self.sep, self.sep2 or self.sep]
            ret = self.system
            for i, (_, message) in enumerate(self.messages):
                ret += f"{message}{seps[i % 2]}" if message else ""
            return ret
        if self.sep_style == SeparatorStyle.CHATML:
            ret = self.system + self.sep if self.system else ""
            for role, message in self.messages:
                ret += f"{role}{message}{self.sep}" if message else role
            return ret
        if self.sep_style == SeparatorStyle.SINGLE:
            ret = self.system + self.sep
            for role, message in self.messages:
                ret += f"{role}: {message}{self.sep}" if message else f"{role}:"
            return ret
        # LLAMA_2
        ret = ""
        for i, (role, message) in enumerate(self.messages):
            if i == 0 and (not message or role != self.roles[0]):
                raise PromptError("a llama_v2 conversation must start with a non-empty user message")
            if not message:
                continue
            if i == 0:
                message = f"<<SYS>>\n{self.system}\n<</SYS>>\n\n" + message
            if i % 2 == 0:
                ret += self.sep + f"[INST] {message} [/INST]"
            else:
                ret += " " + message + " " + self.sep2
        # The original calls str.lstrip(sep): it strips the CHARACTERS '<', 's', '>' from the
        # left, not the prefix "<s>". Kept as is ("[INST]" starts with '[' so only "<s>" goes).
        return ret.lstrip(self.sep)

    def append_message(self, role: str, message: Optional[str]) -> None:
        self.messages.append([role, message])

    def copy(self) -> "Conversation":
        return dataclasses.replace(self, messages=[list(m) for m in self.messages])



LLAMA2_CHAT_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual "
    "content that the user provides, and assist the user with a variety of tasks using natural "
    "language."
)

# Chat templates (the original's ``default_conversation`` and ``conv_llava_llama_2``).
CONV_TEMPLATES: Dict[str, Conversation] = {
    "vicuna": Conversation(system="", roles=("Human", "Assistant"), sep_style=SeparatorStyle.SINGLE, sep="###",
                           template="vicuna"),
    "llama_v2": Conversation(
        system=LLAMA2_CHAT_SYSTEM,
        roles=("USER", "ASSISTANT"),
        sep_style=SeparatorStyle.LLAMA_2,
        sep="<s>",
        sep2="</s>",
        template="llama_v2",
    ),
}

# Training-data templates (the datasets' ``video_conversation`` / ``llama_v2_video_conversation``).
TRAIN_TEMPLATES: Dict[str, Conversation] = {
    "vicuna": Conversation(system="", roles=("Human", "Assistant"), sep_style=SeparatorStyle.SINGLE, sep="###"),
    "llama_v2": Conversation(
        system=" ", roles=("USER", "ASSISTANT"), sep_style=SeparatorStyle.LLAMA_2, sep="<s>", sep2="</s>"
    ),
}


def get_conv_template(name: str, training: bool = False) -> Conversation:
    """A fresh conversation of template ``name`` (Video-LLaMA's, or any registered in
    :mod:`videollm.templates`)."""
    table = TRAIN_TEMPLATES if training else CONV_TEMPLATES
    if name not in table:
        from videollm.templates import TEMPLATES

        if name in TEMPLATES:
            return TEMPLATES[name].new_conversation(training=training)
        raise ConfigError(f"model_type '{name}': unknown conversation template; choose one of {sorted(table)}")
    return table[name].copy()


# ---------------------------------------------------------------------------------------------
# Placeholder expansion


def expand_image_placeholders(conversations: List[Dict[str, str]], num_tokens: int) -> List[Dict[str, str]]:
    """LLaVA data: every ``<image>`` becomes ``<Image>`` + N x ``<ImageHere>`` + ``</Image>``."""
    out = copy.deepcopy(conversations)
    replace = "<Image>" + IMAGE_PATCH_TOKEN * num_tokens + "</Image>"
    for turn in out:
        turn["value"] = turn["value"].replace(DEFAULT_IMAGE_TOKEN, replace)
    return out


def videochat_to_turns(qa: Sequence[Dict[str, str]], num_tokens: int, msg: str = "") -> List[Dict[str, str]]:
    """VideoChat ``QA`` pairs -> human/gpt turns, the first question prefixed with the video.

    The prefix is ``<Video>`` + N x ``<ImageHere>`` + ``</Video> `` + msg (msg, the frame-time
    sentence from ``load_video``, ends with a space).
    """
    if not qa:
        raise PromptError("a VideoChat sample needs at least one QA pair")
    turns: List[Dict[str, str]] = []
    for i, pair in enumerate(qa):
        q = pair["q"]
        if i == 0:
            q = "<Video>" + IMAGE_PATCH_TOKEN * num_tokens + "</Video> " + msg + q
        turns.append({"from": "human", "value": q})
        turns.append({"from": "gpt", "value": pair["a"]})
    return turns


def videochat_turns(qa: Sequence[Dict[str, str]]) -> List[Dict[str, str]]:
    """VideoChat ``QA`` pairs -> human/gpt turns, the first question prefixed with the ``<video>``
    marker (the model's processor expands it; Video-LLaMA's gives :func:`videochat_to_turns`)."""
    if not qa:
        raise PromptError("a VideoChat sample needs at least one QA pair")
    turns: List[Dict[str, str]] = []
    for i, pair in enumerate(qa):
        turns.append({"from": "human", "value": ("<video>" if i == 0 else "") + pair["q"]})
        turns.append({"from": "gpt", "value": pair["a"]})
    return turns


# ---------------------------------------------------------------------------------------------
# Tokenisation with labels


def _n_tokens(tokenizer, text: str) -> int:
    """Non-pad token count of ``text`` tokenised alone with BOS, truncated at 512 (original rule)."""
    ids = tokenizer(text, truncation=True, max_length=INSTRUCT_MAX_LEN)["input_ids"]
    return sum(1 for i in ids if i != tokenizer.pad_token_id)


def tokenize_vicuna(turns: List[Dict[str, str]], tokenizer, fix_label_mask: bool = False):
    """Vicuna-format instruction sample -> (input_ids, labels), 1-D LongTensors."""
    conv = TRAIN_TEMPLATES["vicuna"]
    header = f"{conv.system}\n\n"
    values = []
    for turn in turns:
        role = {"human": conv.roles[0], "gpt": conv.roles[1]}.get(turn["from"].lower(), "unknown")
        values.append("###" + role + ": " + turn["value"] + "\n")
    text = header + "".join(values) + "###"
    ids = tokenizer(text, truncation=True, max_length=INSTRUCT_MAX_LEN)["input_ids"]
    input_ids = torch.tensor(ids, dtype=torch.long)
    labels = input_ids.clone()
    if fix_label_mask:
        # Corrected option: supervise each answer (after "###Assistant:") and the final "###".
        def n(t: str) -> int:
            return len(tokenizer(t, truncation=True, max_length=INSTRUCT_MAX_LEN)["input_ids"])

        labels[:] = IGNORE_INDEX
        prefix = header
        for turn, value in zip(turns, values):
            if turn["from"].lower() == "gpt":
                start, end = n(prefix + value.split(": ", 1)[0] + ":"), n(prefix + value)
                labels[start:end] = input_ids[start:end]
            prefix += value
        labels[n(prefix):] = input_ids[n(prefix):]
        return input_ids, labels
    # The original's _mask_targets: lengths of separately tokenised pieces (each with its own
    # BOS and leading "▁"), human turns masked from cursor+2.
    cur = _n_tokens(tokenizer, header)
    labels[:cur] = IGNORE_INDEX
    for turn, value in zip(turns, values):
        n = _n_tokens(tokenizer, value)
        if turn["from"].lower() == "human":
            labels[cur + 2 : cur + n] = IGNORE_INDEX
        cur += n
    return input_ids, labels


def tokenize_llama_v2(turns: List[Dict[str, str]], tokenizer, fix_label_mask: bool = False):
    """LLaMA-2-format instruction sample -> (input_ids, labels), 1-D LongTensors."""
    conv = get_conv_template("llama_v2", training=True)
    roles = {"human": conv.roles[0], "gpt": conv.roles[1]}
    if roles.get(turns[0]["from"].lower()) != conv.roles[0]:
        turns = turns[1:]  # the original drops a leading non-human turn
    for j, turn in enumerate(turns):
        role = roles.get(turn["from"].lower())
        if role != conv.roles[j % 2]:
            raise PromptError(f"turn {j}: expected a '{conv.roles[j % 2]}' turn, got '{turn['from']}'")
        conv.append_message(role, turn["value"])
    text = conv.get_prompt()
    ids = tokenizer(text, truncation=True, max_length=INSTRUCT_MAX_LEN)["input_ids"]
    input_ids = torch.tensor(ids, dtype=torch.long)
    labels = input_ids.clone()
    sep = "[/INST] "
    cur = 1
    labels[:cur] = IGNORE_INDEX
    for rou in text.split(conv.sep2):
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        parts[0] += sep
        round_len = len(tokenizer(rou)["input_ids"])
        # "- 2": the BOS and the "▁" the tokenizer gives the trailing space (the original's rule).
        instruction_len = len(tokenizer(parts[0])["input_ids"]) - 2
        if fix_label_mask:
            instruction_len = len(tokenizer(parts[0].rstrip())["input_ids"]) - 1
        labels[cur : cur + instruction_len] = IGNORE_INDEX
        cur += round_len
    labels[cur:] = IGNORE_INDEX
    return input_ids, labels


def tokenize_instruct(turns, tokenizer, model_type: str, fix_label_mask: bool = False):
    if model_type == "vicuna":
        return tokenize_vicuna(turns, tokenizer, fix_label_mask)
    if model_type == "llama_v2":
        return tokenize_llama_v2(turns, tokenizer, fix_label_mask)
    raise ConfigError(f"model_type '{model_type}': unknown; choose vicuna or llama_v2")


def collate_instruct(samples: Sequence[Dict], pad_token_id: int) -> Dict:
    """Right-pad ``input_ids`` (pad id) and ``labels`` (-100); ``attention_mask = ids != pad``."""
    input_ids = torch.nn.utils.rnn.pad_sequence([s["input_ids"] for s in samples], batch_first=True, padding_value=pad_token_id)
    labels = torch.nn.utils.rnn.pad_sequence([s["labels"] for s in samples], batch_first=True, padding_value=IGNORE_INDEX)
    batch = {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": input_ids.ne(pad_token_id),
        "conv_type": "multi",
    }
    images = [s["image"] for s in samples]
    if all(x.shape == images[0].shape for x in images):
        batch["images"] = torch.stack(images)
    else:
        raise PromptError("instruction batch mixes visual inputs of different shapes; batch them apart")
    return batch
