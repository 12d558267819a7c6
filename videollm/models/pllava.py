"""PLLaVA: a LLaVA-NeXT image model extended to video by pooling (arXiv 2404.16994), arch ``pllava``.

Re-implemented from the facts of magic-research/PLLaVA (``models/pllava/``, ``tasks/train/``,
``tasks/eval/``); quirks are reproduced by default and listed where they live.

State-dict names are the released checkpoints' (``ermu2001/pllava-{7b,13b,34b}``) and part of the
public interface::

    vision_tower.vision_model.*                      transformers CLIPVisionModel (ViT-L/14-336)
    multi_modal_projector.linear_1.{weight,bias}     (H_llm, D_vis)
    multi_modal_projector.linear_2.{weight,bias}     (H_llm, H_llm)
    language_model.base_model.model.model.layers.N.self_attn.q_proj.base_layer.weight   (PEFT-wrapped
    language_model.base_model.model.model.layers.N.self_attn.q_proj.lora_A.default.weight (r, H)
    language_model.base_model.model.model.layers.N.self_attn.q_proj.lora_B.default.weight (H, r)
    language_model.base_model.model.lm_head.weight ...                                      LLM)

(``language_model.model.*`` / ``language_model.lm_head.*`` without LoRA.) LLaVA-NeXT base folders
(``llava-hf/llava-v1.6-*``) load too: their plain names, and the ``model.language_model.*`` /
``model.vision_tower.*`` / ``lm_head.*`` layout of newer transformers saves, are mapped onto
these; their ``image_newline`` is not used by PLLaVA and is skipped.

Forward (``PllavaForConditionalGeneration.forward``)::

    frames (B, T, 3, 336, 336), T <= num_frames
      image: repeated to num_frames; video with T < num_frames: repeat_interleave(num_frames // T + 1)[:num_frames]
      -> vision_tower, hidden_states[vision_feature_layer = -2], CLS dropped   (B*T, 576, D_vis)
      -> multi_modal_projector: linear_1, GELU, linear_2 (per frame, FIRST)      (B*T, 576, H_llm)
      -> [B, H_llm, T, 24, 24] -> AdaptiveAvgPool3d(pooling_shape)               (B, H_llm, T', h', w')
      -> flattened frame-major                                                  (B, T'*h'*w', H_llm)
    one <image> token of the prompt expands into the T'*h'*w' tokens (the merge path), the <image>
    ids are never embedded; loss: shifted cross-entropy over the positions whose attention mask is 1.

Released models: 16 frames, ``pooling_shape`` 16-12-12 (2304 tokens per video). ``num_frames`` and
``pooling_shape`` (a list or ``"16-12-12"``) override the folder's config at load, as the
original's ``--num_frames`` / ``--pooling_shape`` do.

LoRA (``peft``, through :mod:`videollm.models.lora`): r 128, alpha 32, dropout 0.05 on
``q_proj``/``v_proj`` in training. **Inference alpha** (``lora_alpha_inference``, 4 in the released
presets): the original's demo and evaluation build the adapter with ``lora_alpha=4`` although it was
trained with 32, so the LoRA delta is scaled by 4/128 instead of 32/128 - a blend of the video-tuned
and the original image-LLM weights the paper calls "post optimization" (VCG peaks near alpha 4,
MVBench near 20). ``null`` keeps the trained alpha.

Checkpoints (:meth:`PLLaVA.load_checkpoints`, one summary per source; missing or unexpected keys
are errors with ``strict_load``, and nothing is silently newly initialised: a key that no source
provides is an error, except a fresh LoRA adapter at the start of training, which is logged):

* ``model_dir``: a folder with ``config.json`` (PLLaVA or LLaVA-NeXT), sharded ``model-*.safetensors``
  + index or one ``model.safetensors``, and the tokenizer files.
* ``weight_dir``: weights on top, as the original's ``load_pllava``: all ``model-0*`` shards (a full
  released model) or, without shards, ``model.safetensors`` holding LoRA + projector only.
* ``ckpt``: a videollm training checkpoint (``.pth``, trainable keys).

:func:`save_pllava_folder` writes our own models in the released layout.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from videollm.conversation import Conversation, SeparatorStyle
from videollm.errors import CheckpointError, ConfigError, PromptError
from videollm.models.base import FreezePlan, Media, VideoLLM
from videollm.models.merge import IGNORE_INDEX, MergedInputs, merge_segments, segments_from_ids
from videollm.processors import pllava_processors as pp
from videollm.runners import lr_sched_floor  # noqa: F401 - registers the recipes' warmup_cosine_floor_lr
from videollm.registry import registry
from videollm.templates import TEMPLATES, ChatTemplate, register_template

logger = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Keys released/base folders carry that PLLaVA does not use.
TOLERATED_UNEXPECTED = (r"^image_newline$", r"rotary_emb\.inv_freq$", r"position_ids$")
LORA_DEFAULTS = {"r": 128, "alpha": 32, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"]}
# CLIP ViT-L/14-336 of LLaVA-1.6 (PllavaConfig's default vision_config).
CLIP_L14_336 = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
                "patch_size": 14, "image_size": 336, "projection_dim": 768}


# ----------------------------------------------------------------------------------------------
# Prompt templates (tasks/eval/eval_utils.py)
# ----------------------------------------------------------------------------------------------


@dataclass
class PllavaConversation(Conversation):
    """The original's ``Conversation.get_prompt``: ``system + sep[user]`` (if any system), then
    ``role + message + sep[role]`` per message; the open assistant turn is ``role + answer_prompt``.
    Roles carry their own punctuation (``"USER:"``, ``"<|im_start|>user\\n"``)."""

    seps: Tuple[str, str] = (" ", "</s>")
    answer_prompt: str = ""
    pre_query_prompt: Optional[str] = None
    post_query_prompt: Optional[str] = None

    def get_prompt(self) -> str:
        sep = dict(zip(self.roles, self.seps))
        ret = self.system + sep[self.roles[0]] if self.system != "" else ""
        for i, (role, message) in enumerate(self.messages):
            last = i + 1 == len(self.messages)
            if role == self.roles[1] and not message and last:
                ret += role + self.answer_prompt
            elif last and role != self.roles[1]:
                ret += role + (message or "") + sep[role] + self.roles[1]
            else:
                ret += role + (message or "") + sep[role]
        return ret

    def format_query(self, question: str) -> str:
        """``user_query``'s pre/post query prompts around a question (evaluation templates)."""
        if self.post_query_prompt is not None:
            question = f"{question} {self.post_query_prompt}"
        if self.pre_query_prompt is not None:
            question = f"{self.pre_query_prompt} {question}"
        return question


VCG_SYSTEM = (
    "You are Video-ChatGPT, a large vision-language assistant. "
    "You are able to understand the video content that the user provides, and assist the user with a variety of tasks using natural language."
    "Follow the instructions carefully and explain your answers in detail based on the provided video."
)
MVBENCH_SYSTEM = (
    "Carefully watch the video and pay attention to the cause and sequence of events, the detail and movement of "
    "objects, and the action and pose of persons. Based on your observations, select the best option that "
    "accurately addresses the question.\n"
)
VIDEOQA_PRE_QUERY = (
    "The input consists of a sequence of key frames from a video. Answer the question concisely first and followed "
    "by significant events, characters, or objects that appear throughout the frames. Question:"
)
RECAPTION_SYSTEM = """You are a powerful Video Magic ChatBot, a large vision-language assistant. 
You are able to understand the video content that the user provides and assist the user in a video recaptioning task.
The user will provide you with the video and maybe some extra noisy information to help you out. Make use of the information in a proper way to be competent for the recaption job
### INSTRUCTIONS:
1. Follow the user's instruction.
2. Be critical yet believe in yourself.
"""
# The demo's editable system text (pllava_demo.py), set on every question.
DEMO_SYSTEM = """You are a powerful Video Magic ChatBot, a large vision-language assistant. 
You are able to understand the video content that the user provides and assist the user in a video-language related task.
The user might provide you with the video and maybe some extra noisy information to help you out or ask you a question. Make use of the information in a proper way to be competent for the job.
### INSTRUCTIONS:
1. Follow the user's instruction.
2. Be critical yet believe in yourself.
"""
VICUNA_ROLES = ("USER: ", "ASSISTANT:")  # the evaluation templates' user role has a space
CHATML_ROLES = ("<|im_start|>user\n", "<|im_start|>assistant\n")
CHATML_SEP = "<|im_end|>\n"
MVBENCH_QUESTION_SUFFIX = "\nOnly give the best option."


def _register(name: str, system: str, roles: Tuple[str, str], seps: Tuple[str, str], mm_alone: bool,
              mm_token: str, stop: str, *, answer_prompt: str = "", pre: Optional[str] = None,
              post: Optional[str] = None, media_system: Optional[str] = None) -> None:
    """One template. MM_ALONE: the medium is its own user message ``mm_token``; MM_INTERLEAF: the
    question joins the medium's message (``mm_str + " " + question``); the demo's upload adds
    ``"<image> "`` as its own message, as ``user_query("", is_mm=True)`` does."""
    if name in TEMPLATES:
        return
    conv = PllavaConversation(system=system, roles=roles, sep_style=SeparatorStyle.CHATML, sep=seps[0], sep2=seps[1],
                              template=name, seps=seps, answer_prompt=answer_prompt, pre_query_prompt=pre,
                              post_query_prompt=post)
    interleaf_with_question = not mm_alone and name != "plain"
    message = mm_token if mm_alone or interleaf_with_question else mm_token + " "
    register_template(ChatTemplate(
        name=name, conversation=conv, placeholder=IMAGE_TOKEN,
        media_messages={"video": message, "image": message},
        media_system={"video": media_system, "image": media_system} if media_system is not None else {},
        media_markers=(mm_token,) if interleaf_with_question else (),
        question_join=" " if interleaf_with_question else "",
        stop=stop, stop_on_eos=True,
    ))


_V = (" ", "</s>")
_C = (CHATML_SEP, CHATML_SEP)
_register("plain", "", ("USER:", "ASSISTANT:"), _V, False, IMAGE_TOKEN, "</s>", media_system=DEMO_SYSTEM)
_register("eval_vcgbench", VCG_SYSTEM, VICUNA_ROLES, _V, True, IMAGE_TOKEN + "\n", "</s>")
_register("eval_vcg_llavanext", VCG_SYSTEM, CHATML_ROLES, _C, True, IMAGE_TOKEN + "\n", "<|im_end|>")
_register("eval_mvbench", MVBENCH_SYSTEM, VICUNA_ROLES, _V, True, IMAGE_TOKEN + "\n", "</s>",
          answer_prompt="Best option:(")
_register("eval_mvbench_llavanext", VCG_SYSTEM, CHATML_ROLES, _C, True, IMAGE_TOKEN + "\n", "<|im_end|>",
          answer_prompt="Best option:(")
_register("eval_videoqabench", "", VICUNA_ROLES, _V, False, IMAGE_TOKEN + "\n", "</s>",
          answer_prompt="\nAnswer: In the video,", pre=VIDEOQA_PRE_QUERY, post="\n")
_register("eval_videoqa_llavanext", "<|im_start|>system\nAnswer the question.", CHATML_ROLES, _C, False,
          IMAGE_TOKEN + "\n", "<|im_end|>", answer_prompt="\nAnswer: In the video,", pre=VIDEOQA_PRE_QUERY, post="\n")
_register("eval_recaption", RECAPTION_SYSTEM, VICUNA_ROLES, _V, True, IMAGE_TOKEN + "\n", "</s>")
_register("eval_recaption_llavanext", RECAPTION_SYSTEM, CHATML_ROLES, _C, True, IMAGE_TOKEN + "\n", "<|im_end|>")
# The instruction-tuning prompt of the VideoChat2-IT path (both turns end with </s>): what a model
# trained by this code saw; the tiny models chat with it.
if "pllava_it" not in TEMPLATES:
    register_template(ChatTemplate(
        name="pllava_it",
        conversation=PllavaConversation(system="", roles=("USER:", "ASSISTANT:"), sep_style=SeparatorStyle.CHATML,
                                        sep="</s>", sep2="</s>", template="pllava_it", seps=("</s>", "</s>")),
        placeholder=IMAGE_TOKEN, media_messages={"video": IMAGE_TOKEN + "\n", "image": IMAGE_TOKEN + "\n"},
        media_markers=(IMAGE_TOKEN + "\n",), question_join="", stop="</s>", stop_on_eos=True,
    ))
PLLAVA_TEMPLATES = ("plain", "pllava_it", "eval_vcgbench", "eval_vcg_llavanext", "eval_mvbench",
                    "eval_mvbench_llavanext", "eval_videoqabench", "eval_videoqa_llavanext", "eval_recaption",
                    "eval_recaption_llavanext")


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------


@dataclass
class PLLaVAConfig:
    """Every key of ``model:`` for ``arch: pllava``."""

    arch: str = "pllava"
    model_type: str = ""  # preset name (informational)
    # weights (see the module docstring)
    model_dir: str = ""
    weight_dir: str = ""
    ckpt: str = ""
    strict_load: bool = True
    # dimensions when no model_dir config.json gives them (transformers config kwargs)
    vision_config: Dict[str, Any] = field(default_factory=dict)  # CLIPVisionConfig
    llm_config: Dict[str, Any] = field(default_factory=dict)  # {"model_type": "llama", ...}
    vision_feature_layer: int = -2
    vision_feature_select_strategy: str = "default"
    projector_hidden_act: str = "gelu"
    # pooling (overridable at load, as the original's CLI)
    num_frames: Optional[int] = None  # default: the folder's config, else 16
    pooling_shape: Any = None  # [T', h', w'] or "T-h-w"; default: the folder's config, else 16-12-12
    use_pooling: bool = True
    # tokens
    tokenizer: Optional[str] = None  # default: model_dir; "tiny": the built-in tiny LLaMA tokenizer
    tokenizer_kind: str = "auto"
    image_token_index: Optional[int] = None  # default: the tokenizer's id of <image>
    llm_dtype: str = "bf16"
    # training
    use_lora: bool = True
    lora: Dict[str, Any] = field(default_factory=lambda: dict(LORA_DEFAULTS))
    lora_alpha_inference: Optional[float] = None
    freeze_vision_tower: bool = True
    freeze_llm: bool = True
    freeze_projector: bool = False
    grad_checkpointing: bool = False
    # the batch processor (VideoChat2-IT prompt, tasks/train/config_pllava_nframe.py "preprocess")
    max_txt_l: int = 512
    pad_to_max_length: bool = True  # the original pads every sample to max_txt_l by hand
    system: str = ""
    roles: List[str] = field(default_factory=lambda: ["USER:", "ASSISTANT:"])
    end_signal: List[str] = field(default_factory=lambda: [" ", "</s>"])
    begin_signal: str = ""
    conv_template: str = "plain"  # the chat template (see PLLAVA_TEMPLATES)
    caption_question: str = "Describe the video."  # the question of caption-style evaluation (generation_inputs)


def parse_pooling_shape(value: Any, key: str = "model.pooling_shape") -> Tuple[int, int, int]:
    """``"16-12-12"``, ``[16, 12, 12]`` or ``(16, 12, 12)`` -> a tuple of three positive ints."""
    if isinstance(value, str):
        parts = re.split(r"[-x, ]+", value.strip("()[] "))
    else:
        parts = list(value)
    try:
        shape = tuple(int(p) for p in parts)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: {value!r}; expected three integers such as 16-12-12") from None
    if len(shape) != 3 or min(shape) < 1:
        raise ConfigError(f"{key}: {value!r}; expected three positive integers (frames-height-width) such as 16-12-12")
    return shape  # type: ignore[return-value]


def read_folder_config(folder: Union[str, Path], key: str = "model.model_dir") -> Dict[str, Any]:
    """``config.json`` of a PLLaVA / LLaVA-NeXT folder (a ConfigError naming the folder otherwise)."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{key}: {folder} has no config.json (give a PLLaVA or llava-hf LLaVA-NeXT folder)")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{key}: {path}: not valid JSON ({exc})") from None
    if not isinstance(cfg.get("text_config"), dict) or not isinstance(cfg.get("vision_config", {}), dict):
        raise ConfigError(f"{key}: {path}: no text_config; is this a PLLaVA / LLaVA-NeXT folder?")
    return cfg


_HF_DROP = ("_name_or_path", "architectures", "torch_dtype", "dtype", "transformers_version", "auto_map")


def _clean(cfg: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in cfg.items() if k not in _HF_DROP}


# ----------------------------------------------------------------------------------------------
# The projector
# ----------------------------------------------------------------------------------------------


class PllavaMultiModalProjector(nn.Module):
    """``linear_1`` -> act -> ``linear_2`` per frame, then a parameter-free ``AdaptiveAvgPool3d``.

    ``forward(features (B, T, P, D_vis), frame_shape (h, w))`` -> ``(B, T'*h'*w', H_llm)``;
    ``T`` must equal ``num_frames`` (the model repeats frames before calling it).
    """

    def __init__(self, vision_hidden: int, text_hidden: int, act: str, pooling_shape: Tuple[int, int, int],
                 use_pooling: bool = True) -> None:
        super().__init__()
        from transformers.activations import ACT2FN

        self.linear_1 = nn.Linear(vision_hidden, text_hidden, bias=True)
        self.act = ACT2FN[act]
        self.linear_2 = nn.Linear(text_hidden, text_hidden, bias=True)
        self.use_pooling = use_pooling
        self.pooling = nn.AdaptiveAvgPool3d(pooling_shape)

    def forward(self, features: torch.Tensor, frame_shape: Tuple[int, int]) -> torch.Tensor:
        b, t, p, _ = features.shape
        h, w = frame_shape
        if h * w != p:
            raise PromptError(f"PLLaVA projector: {p} patch tokens per frame, expected {h}x{w}")
        x = self.linear_2(self.act(self.linear_1(features)))  # (B, T, P, H)
        if not self.use_pooling:
            return x.reshape(b, t * p, -1)
        x = x.reshape(b, t, h, w, -1).permute(0, 4, 1, 2, 3)  # (B, H, T, h, w)
        x = self.pooling(x)  # (B, H, T', h', w')
        return x.flatten(2).transpose(1, 2)  # (B, T'*h'*w', H)


def repeat_frames(frames: torch.Tensor, kind: str, num_frames: int, use_pooling: bool = True) -> torch.Tensor:
    """``(T, ...)`` -> ``(num_frames, ...)``: an image is repeated ``num_frames`` times; a video with
    fewer frames is repeat-interleaved ``num_frames // T + 1`` times and cut (the original's rule:
    4 frames to 16 gives 5, 5, 5, 1 copies)."""
    if kind == "image":
        frames = frames.repeat(num_frames, *([1] * (frames.dim() - 1)))
    t = frames.shape[0]
    if t < num_frames and use_pooling:
        frames = frames.repeat_interleave(int(num_frames / t) + 1, dim=0)[:num_frames]
    elif t > num_frames:
        raise PromptError(f"PLLaVA: a video of {t} frames but model.num_frames is {num_frames}; "
                          "sample at most num_frames frames")
    return frames


# ----------------------------------------------------------------------------------------------
# The batch processor (tasks/train/train_pllava_nframe_accel.py: preprocess)
# ----------------------------------------------------------------------------------------------


def split_and_record_separators(text: str, separators: Sequence[str]) -> List[str]:
    """Split ``text`` on each separator in turn, keeping the separators as their own pieces."""
    texts = [text]
    for sep in separators:
        new: List[str] = []
        for t in texts:
            if sep not in t:
                new.append(t)
                continue
            parts = t.split(sep)
            for part in parts[:-1]:
                new.extend([part, sep])
            new.append(parts[-1])
        texts = new
    return texts


_MARKER = re.compile(r"<(?:video|image)>\n?")


class PllavaBatchProcessor:
    """Dataset conversations -> ``input_ids`` / ``labels`` / ``attention_mask`` with PLLaVA's rules.

    The prompt (``ITImgTrainDataset.process_qa`` with the scripts' ``mm_alone=False``): ``system``,
    the optional instruction ``i`` + ``end_signal[0]``, then per pair ``begin + "USER:" + q +
    end_signal[1]`` and ``begin + "ASSISTANT:" + a + end_signal[1]`` (both turns end with
    ``</s>``); the first question starts with ``<image>\\n`` (the dataset's ``<Video></Video>``
    rewritten). Labels: the text is split on the role strings; the first piece, the role strings
    and the user pieces are -100, the text after ``ASSISTANT:`` is supervised; each piece is
    tokenised alone, BOS only on the first. Cut at ``max_txt_l`` and padded to it by hand
    (``pad_to_max_length``; otherwise to the longest of the batch). A sample without exactly one
    ``<image>`` id left is dropped as ``bad_annotation``. Picklable (runs in loader workers).
    """

    def __init__(self, tokenizer_kind: str, tokenizer_path: Optional[str], *, max_txt_l: int = 512,
                 pad_to_max_length: bool = True, system: str = "", roles: Sequence[str] = ("USER:", "ASSISTANT:"),
                 end_signal: Sequence[str] = (" ", "</s>"), begin_signal: str = "", tokenizer: Any = None,
                 image_token_index: Optional[int] = None) -> None:
        self.tokenizer_kind, self.tokenizer_path = tokenizer_kind, tokenizer_path
        self.image_token_index = image_token_index
        self.max_txt_l, self.pad_to_max_length = int(max_txt_l), bool(pad_to_max_length)
        self.system, self.roles = system, tuple(roles)
        self.end_signal, self.begin_signal = tuple(end_signal), begin_signal
        self._tok = tokenizer

    @property
    def tokenizer(self):
        if self._tok is None:
            self._tok = build_pllava_tokenizer(self.tokenizer_kind, self.tokenizer_path)
        return self._tok

    def __getstate__(self) -> Dict[str, Any]:
        state = dict(self.__dict__)
        state["_tok"] = None
        return state

    def prompt(self, turns: Sequence[Dict[str, str]], instruction: str = "") -> str:
        text = self.system
        if instruction:
            text += instruction + self.end_signal[0]
        first = True
        for turn in turns:
            value = turn["value"]
            if turn["from"].lower() in ("human", "user"):
                if first and not _MARKER.search(value):
                    value = IMAGE_TOKEN + "\n" + value
                value = _MARKER.sub(IMAGE_TOKEN + "\n", value)
                first = False
                if value:
                    text += self.begin_signal + self.roles[0] + value + self.end_signal[1]
            else:
                text += self.begin_signal + self.roles[1] + value + self.end_signal[1]
        return text

    def tokenize(self, text: str) -> Tuple[List[int], List[int]]:
        tok = self.tokenizer
        ids: List[int] = []
        labels: List[int] = []
        ignore = True
        for i, seg in enumerate(split_and_record_separators(text, self.roles)):
            if seg == self.roles[1]:
                ignore = False
            elif i == 0 or seg in self.roles:
                ignore = True
            current = True if seg in self.roles else ignore
            piece = tok.encode(seg, add_special_tokens=(i == 0))
            ids += piece
            labels += [IGNORE_INDEX] * len(piece) if current else piece
        return ids[: self.max_txt_l], labels[: self.max_txt_l]

    def __call__(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        if "conversations" not in batch or "input_ids" in batch:
            return batch
        tok = self.tokenizer
        image_id = self.image_token_index if self.image_token_index is not None else tok.convert_tokens_to_ids(IMAGE_TOKEN)
        convs = batch["conversations"]
        instructions = batch.get("instructions") or [""] * len(convs)
        paths = batch.get("paths") or [f"<sample {i}>" for i in range(len(convs))]
        kinds = batch.get("media_kinds") or ["video"] * len(convs)
        bad = list(batch.get("bad_samples", []))
        rows: List[Tuple[int, List[int], List[int]]] = []
        for i, (turns, instr) in enumerate(zip(convs, instructions)):
            ids, labels = self.tokenize(self.prompt(turns, instr or ""))
            if ids.count(image_id) != 1:
                logger.warning("%s: bad_annotation (%d <image> ids after tokenisation; need 1)", paths[i],
                               ids.count(image_id))
                bad.append((paths[i], "bad_annotation"))
                continue
            rows.append((i, ids, labels))
        if not rows:
            return {"bad_samples": bad, "num_samples": 0}
        length = self.max_txt_l if self.pad_to_max_length else max(len(r[1]) for r in rows)
        pad = tok.pad_token_id
        input_ids = torch.tensor([r[1] + [pad] * (length - len(r[1])) for r in rows])
        labels = torch.tensor([r[2] + [IGNORE_INDEX] * (length - len(r[2])) for r in rows])
        mask = torch.tensor([[1] * len(r[1]) + [0] * (length - len(r[1])) for r in rows])
        images = batch["media"] if "media" in batch else batch["images"]
        keep = [r[0] for r in rows]
        media = [images[i] for i in keep]
        return {"input_ids": input_ids, "labels": labels, "attention_mask": mask, "media": media,
                "media_kinds": [kinds[i] for i in keep], "conv_type": "multi", "bad_samples": bad,
                "num_samples": len(rows)}


def build_pllava_tokenizer(kind: str, path: Optional[str]):
    """The model's tokenizer with ``<image>`` (added when the folder lacks it)."""
    from videollm.models.llm import build_tokenizer

    if kind == "llama_exact":
        return build_tokenizer("llama_exact", path, added_tokens=[IMAGE_TOKEN])
    tok = build_tokenizer(kind, path, key="model.tokenizer", added_tokens=[IMAGE_TOKEN])
    return tok


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------


def _is_lora_key(key: str) -> bool:
    return ".lora_" in key


class ClipVisionTower(nn.Module):
    """transformers' ``CLIPVisionModel`` under the attribute ``vision_model``, so that the keys are the
    released ``vision_tower.vision_model.*`` (transformers 5 dropped that level inside the class)."""

    def __init__(self, config) -> None:
        super().__init__()
        from transformers import CLIPVisionModel

        self.vision_model = CLIPVisionModel(config)

    @property
    def config(self):
        return self.vision_model.config

    def forward(self, pixel_values: torch.Tensor, **kwargs: Any):
        return self.vision_model(pixel_values, **kwargs)


@registry.register_model("pllava")
class PLLaVA(VideoLLM):
    """CLIP tower -> projector MLP -> 3-D average pooling -> LLM (see the module docstring)."""

    arch = "pllava"
    config_schema = PLLaVAConfig
    llm_attr = "language_model"
    media_placeholder = IMAGE_TOKEN
    token_count = "fixed"
    tolerated_unexpected = TOLERATED_UNEXPECTED
    weight_keys = {"model_dir": "a PLLaVA or llava-hf LLaVA-NeXT folder", "weight_dir": "PLLaVA weights",
                   "ckpt": "a videollm training checkpoint"}
    PRETRAINED_MODEL_CONFIG_DICT = {
        "tiny": "configs/models/pllava_tiny.yaml",
        "7b": "configs/models/pllava_7b.yaml",
        "13b": "configs/models/pllava_13b.yaml",
        "34b": "configs/models/pllava_34b.yaml",
    }

    def __init__(self, cfg: PLLaVAConfig) -> None:
        super().__init__()
        from transformers import CLIPVisionConfig

        from videollm.models.llm import build_language_model

        self.cfg = cfg
        if cfg.vision_feature_select_strategy != "default":
            raise ConfigError(f"model.vision_feature_select_strategy: {cfg.vision_feature_select_strategy!r}; "
                              "PLLaVA implements only 'default' (CLS dropped), as the original")
        if cfg.conv_template not in TEMPLATES:
            raise ConfigError(f"model.conv_template: {cfg.conv_template!r} unknown; PLLaVA's: {', '.join(PLLAVA_TEMPLATES)}")
        if cfg.llm_dtype not in DTYPES:
            raise ConfigError(f"model.llm_dtype: {cfg.llm_dtype!r}; choose one of {sorted(DTYPES)}")
        if len(cfg.roles) != 2 or len(cfg.end_signal) != 2:
            raise ConfigError("model.roles and model.end_signal: two entries each (user, assistant)")
        self.default_template = cfg.conv_template
        folder = read_folder_config(cfg.model_dir) if cfg.model_dir else {}
        # a folder's own config.json wins over the preset's dimensions (a 13B folder under a 7B preset is a 13B model)
        vision = {**CLIP_L14_336, **cfg.vision_config, **_clean(folder.get("vision_config") or {})}
        vision.pop("model_type", None)
        text = {**cfg.llm_config, **_clean(folder.get("text_config") or {})}
        if not text:
            raise ConfigError("model.llm_config: empty and no model_dir; give the LLM's config (model_type, sizes)")
        self.num_frames = int(cfg.num_frames or folder.get("num_frames") or 16)
        self.pooling_shape = parse_pooling_shape(cfg.pooling_shape or folder.get("pooling_shape") or (16, 12, 12))
        if self.num_frames < 1:
            raise ConfigError(f"model.num_frames: {self.num_frames}; must be >= 1")

        tok_path = cfg.tokenizer if cfg.tokenizer is not None else (cfg.model_dir or None)
        self._tokenizer = build_pllava_tokenizer(cfg.tokenizer_kind, tok_path)
        self.image_token_index = (int(cfg.image_token_index) if cfg.image_token_index is not None
                                  else self._tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
        if self._tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) != self.image_token_index:
            logger.warning("model.image_token_index %d differs from the tokenizer's <image> id %d: prompts must then "
                           "carry the id %d themselves", self.image_token_index,
                           self._tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), self.image_token_index)
        if self._tokenizer.pad_token_id is None:
            raise ConfigError("model.tokenizer: no pad token (the original requires pad_token_id)")

        # vision_tower: transformers' CLIP ViT; features from hidden_states[vision_feature_layer].
        vcfg = CLIPVisionConfig(**vision)
        self.vision_tower = ClipVisionTower(vcfg)
        self.frame_shape = (vcfg.image_size // vcfg.patch_size,) * 2
        self.image_size = int(vcfg.image_size)
        # language_model: any causal LM through the factory (random weights; loaded below).
        self.language_model = build_language_model("", config=text, dtype="fp32", key="model.llm_config",
                                                   grad_checkpointing=cfg.grad_checkpointing)
        if self.image_token_index >= self.language_model.get_input_embeddings().num_embeddings:
            raise ConfigError(f"model: the <image> id {self.image_token_index} is outside the LLM vocabulary "
                              f"({self.language_model.get_input_embeddings().num_embeddings}); enlarge llm_config.vocab_size")
        hidden = self.language_model.config.hidden_size
        self.multi_modal_projector = PllavaMultiModalProjector(vcfg.hidden_size, hidden, cfg.projector_hidden_act,
                                                               self.pooling_shape, cfg.use_pooling)
        if cfg.use_lora:
            from videollm.models.lora import LoRAConfig, apply_lora

            self.lora_config = LoRAConfig.from_dict({**LORA_DEFAULTS, **cfg.lora})
            apply_lora(self, self.llm_attr, self.lora_config)
        self.to(DTYPES[cfg.llm_dtype])
        self.load_checkpoints()
        if cfg.lora_alpha_inference is not None:
            self.set_lora_alpha(float(cfg.lora_alpha_inference))
        self.apply_freeze_plan()
        self._processor: Optional[PllavaBatchProcessor] = None

    @property
    def tokenizer(self):
        return self._tokenizer

    # ------------------------------------------------------------------ LoRA
    def set_lora_alpha(self, alpha: float) -> None:
        """Scale the LoRA delta by ``alpha / r`` from now on (the inference "post optimization")."""
        if not self.cfg.use_lora:
            raise ConfigError("model.lora_alpha_inference: the model has no LoRA (model.use_lora is false)")
        from videollm.models.lora import set_lora_alpha

        n = set_lora_alpha(self, alpha)
        logger.info("PLLaVA LoRA alpha %s on %d layers (scaling %g, trained with alpha %s)", alpha, n,
                    alpha / float(self.lora_config.r), self.lora_config.alpha)

    # ------------------------------------------------------------------ freezing
    def freeze_plan(self) -> FreezePlan:
        c = self.cfg
        plan = (FreezePlan()
                .add("vision_tower.", not c.freeze_vision_tower, "model.freeze_vision_tower")
                .add("multi_modal_projector.", not c.freeze_projector, "model.freeze_projector")
                .add("language_model.", not c.freeze_llm, "model.freeze_llm"))
        if c.use_lora:
            plan.add_pattern(r"\.lora_", True, "LoRA adapter (model.lora)")
        return plan

    # ------------------------------------------------------------------ media
    def num_media_tokens(self, medium: Media) -> int:
        if not self.cfg.use_pooling:
            return self.num_frames * self.frame_shape[0] * self.frame_shape[1]
        t, h, w = self.pooling_shape
        return t * h * w

    def vision_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(N, 3, S, S)`` frames -> ``(N, P, D_vis)``: hidden state ``vision_feature_layer``, CLS dropped."""
        dtype = self.vision_tower.vision_model.embeddings.patch_embedding.weight.dtype
        out = self.vision_tower(pixels.to(self.device, dtype), output_hidden_states=True)
        return out.hidden_states[self.cfg.vision_feature_layer][:, 1:]

    def encode_pixels(self, clips: Sequence[torch.Tensor], kinds: Sequence[str]) -> torch.Tensor:
        """Clips ``(3, T, S, S)`` (videos) or ``(3, S, S)`` (images) -> ``(B, T'*h'*w', H_llm)``."""
        frames = []
        for clip, kind in zip(clips, kinds):
            if kind == "image":
                x = clip.unsqueeze(0) if clip.dim() == 3 else clip.permute(1, 0, 2, 3)[:1]
            elif kind == "video":
                if clip.dim() != 4:
                    raise PromptError(f"PLLaVA: a video must be (3, T, H, W), got {tuple(clip.shape)}")
                x = clip.permute(1, 0, 2, 3)  # (T, 3, S, S)
            else:
                raise PromptError(f"PLLaVA cannot encode media of kind {kind!r} (video and image only)")
            frames.append(repeat_frames(x, kind, self.num_frames, self.cfg.use_pooling))
        pixels = torch.cat(frames)  # (B*T, 3, S, S)
        feats = self.vision_features(pixels)
        feats = feats.reshape(len(frames), self.num_frames, feats.shape[1], feats.shape[2])
        proj_dtype = self.multi_modal_projector.linear_1.weight.dtype
        return self.multi_modal_projector(feats.to(proj_dtype), self.frame_shape)

    def encode_media(self, media: Sequence[Media], text: Optional[str] = None) -> List[torch.Tensor]:
        if not media:
            return []
        with self.maybe_autocast():
            out = self.encode_pixels([m.data for m in media], [m.kind for m in media])
        return list(out)

    def load_media(self, source: Any, kind: str, *, timeout: Optional[float] = 30.0, n_frms: Optional[int] = None,
                   vis_processor: Any = None, image_processor: Any = None, isolate: bool = True,
                   **options: Any) -> Media:
        """The original's inference processing: ``num_frames`` frames from the middle of as many
        segments, PllavaProcessor's resize, CLIP resize/crop/normalise. Images: the same rules on
        one frame (repeated to ``num_frames`` in the projector). ``isolate``: videos are decoded in a
        child process killed at ``timeout`` (chat uploads are untrusted), as Video-LLaMA's."""
        import numpy as np

        proc = vis_processor or pp.PllavaVideoEvalProcessor(image_size=self.image_size,
                                                             n_frms=int(n_frms or self.num_frames), timeout=timeout)
        if kind == "video":
            frames, indices, fps = proc.load(source, isolate=isolate)
            msg = pp_message(indices, fps)
            return Media("video", proc.transform(frames), {"path": str(source), "msg": msg})
        if kind == "image":
            from PIL import Image

            from videollm.processors.image_processors import load_image

            img = source if isinstance(source, Image.Image) else load_image(source)
            array = np.asarray(img.convert("RGB"))
            return Media("image", proc.transform_image(array), {"path": str(getattr(source, "filename", source))})
        raise PromptError(f"PLLaVA has no loader for media of kind {kind!r}")

    # ------------------------------------------------------------------ training
    def batch_processor(self) -> PllavaBatchProcessor:
        if self._processor is None:
            c = self.cfg
            tok_path = c.tokenizer if c.tokenizer is not None else (c.model_dir or None)
            self._processor = PllavaBatchProcessor(
                c.tokenizer_kind, tok_path, max_txt_l=c.max_txt_l, pad_to_max_length=c.pad_to_max_length,
                system=c.system, roles=c.roles, end_signal=c.end_signal, begin_signal=c.begin_signal,
                tokenizer=self._tokenizer, image_token_index=self.image_token_index)
        return self._processor

    def _merge(self, rows, padding_side: str = "right") -> MergedInputs:
        return merge_segments(rows, self.embed_tokens, dtype=self.llm_dtype, device=self.device,
                              padding_side=padding_side, pad_token_id=self._tokenizer.pad_token_id)

    def training_inputs(self, batch: Dict[str, Any]) -> MergedInputs:
        """Ids with one ``<image>`` each + media -> merged ``inputs_embeds`` (B, L', H), mask, labels."""
        media = batch.get("media")
        if media is None:  # a stacked tensor of the datasets' collaters
            images = batch["images"]
            kind = "video" if images.dim() == 5 else "image"
            media, kinds = list(images), [kind] * images.shape[0]
        else:
            kinds = batch.get("media_kinds") or ["video"] * len(media)
        with self.maybe_autocast():
            embeds = self.encode_pixels(media, kinds)
        rows = [segments_from_ids(ids, self.image_token_index, [embeds[i]], attention_mask=batch["attention_mask"][i],
                                  labels=batch["labels"][i], where=f"sample {i}")
                for i, ids in enumerate(batch["input_ids"])]
        return self._merge(rows)

    def forward(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        """``batch``: conversations + media (processed here by :meth:`prepare_batch` if needed) or
        ``input_ids``/``labels``/``attention_mask`` + ``media``. Returns {"loss", "num_tokens", "seq_len"}.

        Loss as the original: shifted cross-entropy over the positions whose (shifted) attention
        mask is 1, averaged over their non-ignored labels."""
        batch = self.prepare_batch(batch)
        merged = self.training_inputs(batch)
        mask = merged.attention_mask
        position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        with self.maybe_autocast():
            logits = self.language_model(inputs_embeds=merged.inputs_embeds, attention_mask=mask,
                                         position_ids=position_ids, use_cache=False).logits
        keep = mask[:, 1:] != 0
        shift_logits = logits[:, :-1][keep].float()
        shift_labels = merged.labels[:, 1:][keep]
        loss = F.cross_entropy(shift_logits, shift_labels.to(shift_logits.device), ignore_index=IGNORE_INDEX)
        return {"loss": loss, "num_tokens": (shift_labels != IGNORE_INDEX).sum(), "seq_len": merged.labels.shape[1]}

    # ------------------------------------------------------------------ evaluation
    def prompt_segments(self, prompt: str, media_embeds: Sequence[torch.Tensor]):
        """A chat prompt -> segments as PllavaProcessor tokenises it: the WHOLE prompt at once (BOS
        added, ``<image>`` a special token inside it), then each ``<image>`` id replaced by its
        medium's tokens. (Tokenising the pieces between placeholders apart gives other ids after
        the placeholder with SentencePiece tokenizers.) Used by the Chat for every prompt."""
        ids = self._tokenizer(prompt, return_tensors="pt")["input_ids"][0].long()
        return segments_from_ids(ids, self.image_token_index, list(media_embeds), where="prompt")

    def generation_inputs(self, batch: Dict[str, Any]):
        """Caption-style evaluation prompt: the chat template's question-less prompt per clip."""
        template = TEMPLATES[self.default_template]
        images = batch["image"]
        kind = "video" if images.dim() == 5 else "image"
        embeds = self.encode_media([Media(kind, x) for x in images])
        conv = template.new_conversation(kind)
        conv.append_message(conv.roles[0], template.media_message(kind) + self.cfg.caption_question)
        conv.append_message(conv.roles[1], None)
        prompt = conv.get_prompt()
        rows = [self.prompt_segments(prompt, [e]) for e in embeds]
        merged = self._merge(rows, padding_side="left")
        return merged.inputs_embeds, merged.attention_mask

    # ------------------------------------------------------------------ weights
    def own_key(self, key: str, own: Set[str]) -> str:
        """A checkpoint key -> this model's name for it (plain, PEFT-wrapped, new-transformers layout)."""
        for pat, rep in ((r"^model\.language_model\.", "language_model.model."), (r"^model\.vision_tower\.", "vision_tower."),
                         (r"^model\.multi_modal_projector\.", "multi_modal_projector."), (r"^lm_head\.", "language_model.lm_head."),
                         (r"^model\.image_newline$", "image_newline")):
            key = re.sub(pat, rep, key)
        if key in own:
            return key
        peft = "language_model.base_model.model."
        if key.startswith("language_model.") and not key.startswith(peft):
            cand = peft + key[len("language_model."):]
            if cand in own:
                return cand
            cand2 = re.sub(r"\.(weight|bias)$", r".base_layer.\1", cand)
            if cand2 in own:
                return cand2
        if key.startswith(peft) and not self.cfg.use_lora:
            from videollm.models.lora import plain_key

            plain = plain_key(key, "language_model")
            if plain is None:
                raise CheckpointError(f"{key}: the checkpoint holds a LoRA adapter but model.use_lora is false")
            return plain
        return key

    def load_state(self, state: Dict[str, torch.Tensor], source: str, provides: Sequence[str],
                   need_lora: bool = False) -> Set[str]:
        """Load ``state`` (any supported naming); returns the model keys it set. Keys under
        ``provides`` that the file lacks (LoRA ones only when ``need_lora``) and keys the model
        lacks are reported and, with ``strict_load``, errors; shapes must match."""
        from videollm.checkpoint import report_load

        own_state = self.state_dict()
        own = set(own_state)
        mapped = {}
        for key, value in state.items():
            mapped[self.own_key(key, own)] = value
        for key, value in mapped.items():
            if key in own and tuple(own_state[key].shape) != tuple(value.shape):
                raise CheckpointError(f"{source}: {key} has shape {tuple(value.shape)} but the model expects "
                                      f"{tuple(own_state[key].shape)} (another model size, LoRA rank or config?)")
        result = self.load_state_dict(mapped, strict=False)
        missing = [k for k in result.missing_keys
                   if (_is_lora_key(k) and need_lora) or (not _is_lora_key(k) and any(k.startswith(p) for p in provides))]
        unexpected = list(result.unexpected_keys)
        report_load(missing, unexpected, expected_unexpected_patterns=TOLERATED_UNEXPECTED,
                    strict=bool(self.cfg.strict_load), source=source)
        return {k for k in mapped if k in own}

    def load_checkpoints(self) -> None:
        """model_dir, then weight_dir, then ckpt (see the module docstring); then the check that
        every weight came from somewhere."""
        from videollm.checkpoint import load_model_state

        c = self.cfg
        loaded: Set[str] = set()
        sources = []
        if c.model_dir:
            files = weight_files(c.model_dir, full=True, key="model.model_dir")
            if files:
                loaded |= self.load_state(_read_safetensors(files), c.model_dir, provides=("",))
                sources.append(c.model_dir)
            else:
                logger.info("model.model_dir %s: config and tokenizer only (no weight files)", c.model_dir)
        if c.weight_dir:
            files = weight_files(c.weight_dir, full=None, key="model.weight_dir")
            full = any(Path(f).name.startswith("model-0") for f in files)
            state = _read_safetensors(files)
            if "model" in state and not isinstance(state["model"], torch.Tensor):  # pragma: no cover
                state = state["model"]
            provides = ("",) if full else ("multi_modal_projector.",)
            loaded |= self.load_state(state, c.weight_dir, provides=provides, need_lora=c.use_lora)
            sources.append(c.weight_dir)
        if c.ckpt:
            loaded |= self.load_state(load_model_state(c.ckpt), c.ckpt, provides=("multi_modal_projector.",),
                                      need_lora=c.use_lora)
            sources.append(c.ckpt)
        if not sources:
            return
        never = sorted(set(self.state_dict()) - loaded)
        lora = [k for k in never if _is_lora_key(k)]
        others = [k for k in never if not _is_lora_key(k)]
        if others:
            msg = (f"{len(others)} weights were given by none of {sources} and would keep their random "
                   f"initialisation, e.g. {others[:4]}")
            if c.strict_load:
                raise CheckpointError(msg + "; give the missing weights (model_dir / weight_dir / ckpt) or set "
                                      "model.strict_load false")
            logger.warning("%s", msg)
        if lora:
            if c.lora_alpha_inference is not None:
                raise CheckpointError(f"model.lora_alpha_inference is set but no source holds the LoRA adapter "
                                      f"({len(lora)} tensors, e.g. {lora[0]}); give weight_dir or ckpt")
            logger.info("LoRA adapter initialised fresh (%d tensors; lora_B = 0, so the model equals its base "
                        "until trained)", len(lora))

    @classmethod
    def from_config(cls, cfg: Any) -> "PLLaVA":
        return super().from_config(cfg)


def pp_message(indices: Sequence[int], fps: float) -> str:
    """The frame-time sentence (the original builds it in ``ChatPllava.load_video`` but does not use it)."""
    if fps <= 0:
        return ""
    sec = ", ".join(str(round(f / fps, 1)) for f in indices)
    return f"The video contains {len(indices)} frames sampled at {sec} seconds."


# ----------------------------------------------------------------------------------------------
# Folders in the released layout
# ----------------------------------------------------------------------------------------------


def weight_files(folder: Union[str, Path], *, full: Optional[bool], key: str) -> List[Path]:
    """The safetensors of a folder as ``load_pllava`` picks them: every ``model-0*`` shard if there
    are any, else ``model.safetensors`` (``full=True``: any ``*.safetensors``; ``None``: one of them)."""
    path = Path(folder)
    if not path.is_dir():
        raise ConfigError(f"{key}: {path} is not a folder")
    shards = sorted(p for p in path.glob("model-0*.safetensors"))
    if shards:
        return shards
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    if full is None:
        raise CheckpointError(f"{key}: {path} holds neither model-0*.safetensors shards nor model.safetensors")
    if (path / "pytorch_model.bin").exists() or list(path.glob("pytorch_model-*.bin")):
        raise CheckpointError(f"{key}: {path} holds .bin weights; convert them to safetensors first "
                              "(python -m videollm.convert to-safetensors)")
    return []


def _read_safetensors(files: Sequence[Path]) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: Dict[str, torch.Tensor] = {}
    for f in files:
        try:
            state.update(load_file(str(f)))
        except Exception as exc:
            raise CheckpointError(f"{f}: cannot read safetensors ({exc})") from None
    return state


def save_pllava_folder(model: PLLaVA, out_dir: Union[str, Path], *, full: bool = True,
                       max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write ``model`` as the released folders are laid out: ``config.json`` (PLLaVA fields),
    tokenizer files and either sharded ``model-0000i-of-0000N.safetensors`` + index with every
    weight under its PEFT-wrapped name (``full``), or one ``model.safetensors`` holding only the
    LoRA and projector tensors (what the original's non-DeepSpeed training saves)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if not full:
        state = {k: v for k, v in state.items() if "lora_" in k or "multi_modal_projector" in k}
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        shards: List[Dict[str, torch.Tensor]] = [{}]
        size = 0
        for k, v in state.items():
            n = v.numel() * v.element_size()
            if size and size + n > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][k] = v
            size += n
        index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())}, "weight_map": {}}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            index["weight_map"].update({k: name for k in shard})
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    vision = model.vision_tower.config.to_dict()
    text = model.language_model.config.to_dict() if not hasattr(model.language_model, "get_base_model") \
        else model.language_model.get_base_model().config.to_dict()
    keep_v = {k: vision[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                     "patch_size", "image_size", "projection_dim", "hidden_act", "layer_norm_eps",
                                     "num_channels") if k in vision}
    keep_v["model_type"] = "clip_vision_model"
    keep_t = {k: v for k, v in text.items() if isinstance(v, (int, float, str, bool, type(None), list, dict))
              and k not in ("architectures", "_name_or_path", "transformers_version", "dtype", "torch_dtype", "id2label",
                            "label2id", "auto_map")}
    cfg = {"architectures": ["PllavaForConditionalGeneration"], "model_type": "llava",
           "vision_config": keep_v, "text_config": keep_t, "image_token_index": model.image_token_index,
           "pad_token_id": model.tokenizer.pad_token_id, "num_frames": model.num_frames,
           "pooling_shape": list(model.pooling_shape), "frame_shape": list(model.frame_shape),
           "vision_feature_layer": model.cfg.vision_feature_layer, "vision_feature_select_strategy": "default",
           "projector_hidden_act": model.cfg.projector_hidden_act, "pooling_method": "avg",
           "use_pooling": model.cfg.use_pooling, "ignore_index": IGNORE_INDEX,
           "vocab_size": int(keep_t.get("vocab_size", 0))}
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    try:
        model.tokenizer.save_pretrained(str(out))
    except Exception as exc:  # the built-in tiny tokenizer may not serialise as a folder
        logger.warning("%s: tokenizer not saved (%s)", out, exc)
    return out


__all__ = ["PLLaVA", "PLLaVAConfig", "PllavaBatchProcessor", "PllavaConversation", "PllavaMultiModalProjector",
           "parse_pooling_shape", "repeat_frames", "save_pllava_folder", "split_and_record_separators"]
