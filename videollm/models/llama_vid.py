"""LLaMA-VID: every frame becomes a context token (conditioned on the question) and content tokens.

Registered as ``llama_vid`` (``registry.get_model_class("llama_vid").from_config(cfg)``; every
key is in :class:`LLaMAVIDConfig`; presets in ``videollm/configs/models/llama_vid_*.yaml``).
Facts from dvlab-research/LLaMA-VID (``llamavid/model/llamavid_arch.py``, ``train/train.py``,
``serve/cli.py``, ``serve/run_llamavid_movie.py``). Prompt templates registered here: ``imgsp_v1``,
``plain_guided``, ``llamavid_vicuna_v1``, ``llamavid_llava_v1`` (the original's ``vicuna_v1`` and
``llava_v1``).

Forward, per frame (or image) and per instruction (``vlm_attention`` / ``token_generation``)::

    pixels (F, 3, S, S) -> EVA ViT-g, frozen            -> V0 (F, 1+P, 1408)   CLS included
    (long video: V0 = the feature file's feats[:, 1:]     (F, P, 1408))
    instruction -> BERT tokenizer ([CLS] .. [SEP], left truncation at 256)  ids (L,)
    vlm_att_encoder.bert([vlm_att_query (32) ; ids], cross-attention to vlm_att_ln(V0))
       -> first 32 outputs -> vlm_att_projector                -> Q (F, 32, 1408)
    V = V0 without CLS (mm_vision_select_feature "patch")     (F, P, 1408)
    context: softmax(Q vlm_att_key_projector(V)^T / sqrt(1408)) V  (F, 32, 1408)
             -> mean over the 32 queries -> vlm_att_val_projector   (F, 1, H_llm)
    content: compress_type "mean" -> mean over P (F, 1, 1408); "grid:N" -> avg_pool2d to N x N;
             none -> all P; then mm_projector (mlp2x_gelu)         (F, C, H_llm)
    tokens = [context ; content] per frame, frames in order        (F * (1 + C), H_llm)

Tokens per medium: a video 2 per frame (mean), 1 + N^2 per frame (grid:N); an image 1 + 256
(224 px) or 1 + 576 (336 px). A short video's tokens replace the single ``<image>`` of its turn;
a long video's (feature file) prompt holds ``video_token`` ``<image>`` per frame, and the
tokens fill them in order; its Q-Former and attention run in chunks of 64 frames.

Text conditioning: in training the k-th ``<image>`` of a sample gets the tokens computed with
the k-th human turn's text (``<image>`` and newlines removed); ``imgsp_v1`` puts an ``<image>``
into every later human turn (start or end, at random). In chat the tokens are recomputed for
every question and sit in the latest user turn (``media_in_latest_turn``), as the original CLI.

State-dict names. The released checkpoints are a ``LlamaForCausalLM`` subclass whose inner
``model`` also holds the vision modules: ``model.embed_tokens``, ``model.layers.N.*``,
``model.norm``, ``lm_head`` and ``model.mm_projector.{0,2}``, ``model.vlm_att_encoder.bert.*``,
``model.vlm_att_query``, ``model.vlm_att_ln``, ``model.vlm_att_{projector,key_projector,
val_projector}`` (and possibly ``model.vision_tower.vision_tower.*``, ignored: EVA comes from
``mm_vision_tower``). The contract needs the transformers causal LM under one attribute
(``llm_attr``: LoRA, 8/4-bit, device maps and ``generate`` work on it), so the design is:

* ``self.model`` (:class:`LLaMAVIDVision`) holds the vision modules under exactly the released
  names, so ``model.mm_projector.*``, ``model.vlm_att_*`` and ``model.vision_tower.vision_tower.*``
  are our keys verbatim;
* ``self.llm`` is the plain ``LlamaForCausalLM``: its keys are ``llm.model.*`` / ``llm.lm_head.*``,
  and :data:`RELEASED_LLM_RENAME` maps the released ``model.{embed_tokens,layers,norm}`` and
  ``lm_head`` onto them (two prefix rules, :func:`to_released_key` is the inverse). Released
  folders load unchanged through a :class:`~videollm.models.base.WeightSource` with these rules;
  the LLM part of a folder goes through ``LlamaForCausalLM.from_pretrained`` (shards, index,
  safetensors, quantisation and device maps), the vision part is read from the shards that
  hold it (the index tells which, as the original's loader).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from videollm.conversation import Conversation, SeparatorStyle
from videollm.datasets.bad_samples import BadInput
from videollm.errors import CheckpointError, ConfigError, PromptError
from videollm.models.base import DTYPES, FreezePlan, Media, VideoLLM, WeightSource
from videollm.models.eva_vit import create_eva_vit_g, load_eva_vit_weights
from videollm.models.merge import IGNORE_INDEX, MergedInputs, Segment, merge_segments, segments_from_ids
from videollm.models.qformer import build_qformer
from videollm.registry import registry
from videollm.templates import ChatTemplate, register_template, TEMPLATES

logger = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
IMAGE_TOKEN_INDEX = -200  # the original's placeholder id in token ids (never embedded)
EVA_WIDTH = 1408
TINY_BERT_DIR = Path(__file__).resolve().parents[1] / "assets" / "tiny_bert"  # a toy WordPiece vocabulary
# Released layout <-> ours: only the LLM moves (the vision modules keep the released names).
RELEASED_LLM_RENAME: Tuple[Tuple[str, str], ...] = (
    (r"^model\.(embed_tokens|layers|norm|rotary_emb)\.", r"llm.model.\1."),
    (r"^lm_head\.", "llm.lm_head."),
)
VISION_PREFIXES = ("model.mm_projector.", "model.vlm_att_")
# What stage 1 saves as mm_projector.bin (names holding these words, as the original's
# get_mm_adapter_state: every parameter, frozen ones included).
ADAPTER_WORDS = ("mm_projector", "vision_resampler", "vlm_att")
# InstructBLIP's trimmed Q-Former (.pth "model" entry) -> stage-1 initialisation.
INSTRUCTBLIP_RENAME: Tuple[Tuple[str, str], ...] = (
    (r"^Qformer\.bert\.", "model.vlm_att_encoder.bert."),
    (r"^ln_vision\.", "model.vlm_att_ln."),
    (r"^query_tokens$", "model.vlm_att_query"),
)
TRAIN_TEMPLATES = ("imgsp_v1", "plain_guided")
STAGES = (0, 1, 2, 3)

# ------------------------------------------------------------------ prompt templates
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
LLAVA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                "The assistant gives helpful, detailed, and polite answers to the human's questions.")
_MEDIA = {"video": IMAGE_TOKEN + "\n", "image": IMAGE_TOKEN + "\n", "features": "{msg}"}


def _two(system: str, name: str) -> Conversation:
    return Conversation(system=system, roles=("USER", "ASSISTANT"), sep_style=SeparatorStyle.TWO, sep=" ",
                        sep2="</s>", template=name)


def _register_templates() -> None:
    """``imgsp_v1`` (training, stages 2-3), ``llamavid_vicuna_v1`` (the original's ``vicuna_v1``,
    evaluation), ``llamavid_llava_v1`` (its ``llava_v1``, the CLI's choice for "vid" models),
    ``plain_guided`` (stage 1): the original's conversation objects (``vicuna_v1``/``llava_v1``
    are prefixed: Video-LLaVA registers those names with its own media messages).
    The media message is ``<image>\\n`` before the question (``question_join`` ""), a feature
    file's is the movie block; the media move to the newest question."""
    for name, system in (("imgsp_v1", VICUNA_SYSTEM), ("llamavid_vicuna_v1", VICUNA_SYSTEM),
                         ("llamavid_llava_v1", LLAVA_SYSTEM)):
        if name not in TEMPLATES:
            register_template(ChatTemplate(
                name=name, conversation=_two(system, name), training_conversation=_two(system, name),
                placeholder=IMAGE_TOKEN, media_messages=dict(_MEDIA), media_markers=(IMAGE_TOKEN,),
                question_join="", stop="</s>", stop_on_eos=True, media_in_latest_turn=True))
    if "plain_guided" not in TEMPLATES:
        plain = Conversation(system="", roles=("", ""), sep_style=SeparatorStyle.PLAIN, sep="\n",
                             template="plain_guided")
        register_template(ChatTemplate(
            name="plain_guided", conversation=plain, training_conversation=plain, placeholder=IMAGE_TOKEN,
            media_messages={"video": IMAGE_TOKEN, "image": IMAGE_TOKEN}, media_markers=(IMAGE_TOKEN,),
            question_join="", stop="\n", stop_on_eos=True))


_register_templates()


# ------------------------------------------------------------------ config
@dataclass
class LLaMAVIDConfig:
    """Every key of ``model:`` for ``arch: llama_vid``. Keys left ``None`` take the value of the
    released folder's ``config.json`` (``model_path``), else the default in brackets."""

    arch: str = "llama_vid"
    model_type: str = ""  # a preset name (PRETRAINED_MODEL_CONFIG_DICT)
    # weights
    model_path: str = ""  # a released LLaMA-VID folder (config.json, pytorch_model-*.bin + index, tokenizer)
    llm_path: str = ""  # a base Vicuna folder (training from stage 1)
    llm_config: Dict[str, Any] = field(default_factory=dict)  # transformers kwargs: random LLM (tests)
    vision_tower: Optional[str] = None  # eva_vit_g.pth; overrides the released mm_vision_tower ("": random)
    pretrain_qformer: str = ""  # instruct_blip_vicuna{7,13}b_trimmed.pth (stage-1 init)
    pretrain_mm_mlp_adapter: str = ""  # stage 1's mm_projector.bin (stage-2 init)
    ckpt: str = ""  # a checkpoint of this framework's runner (.pth "model" entry)
    strict_load: bool = True
    # tokenizers
    tokenizer: Optional[str] = None  # LLaMA tokenizer folder ("tiny": the built-in one); default: the weights' folder
    bert_tokenizer: str = ""  # folder with bert-base-uncased's vocab.txt ("tiny": the built-in toy vocabulary)
    bert_max_length: int = 256
    # architecture (released config fields)
    image_size: Optional[int] = None  # [224]; 336 for the released image models
    compress_type: Optional[str] = None  # "mean" | "grid:N" | "none" [none]
    num_query: Optional[int] = None  # [32]
    bert_type: Optional[str] = None  # [qformer_pretrain]
    mm_projector_type: Optional[str] = None  # [mlp2x_gelu]
    mm_vision_select_feature: Optional[str] = None  # [patch]: CLS dropped for context/content
    image_aspect_ratio: Optional[str] = None  # [pad] (training images)
    vit: Dict[str, Any] = field(default_factory=dict)  # EVA overrides (tiny tests: embed_dim, depth, ...)
    qformer: Dict[str, Any] = field(default_factory=dict)  # BERT overrides (hidden_size, num_hidden_layers, ...)
    vit_precision: str = "fp16"  # the tower is cast whole, as the original (pos_embed rounded too)
    # LLM
    llm_dtype: str = "fp16"
    model_max_length: int = 2048  # > the LLM's context -> linear RoPE scaling (ceil ratio), as train.py
    # The original cuts the ids at model_max_length before the media tokens go in, so a sample may
    # grow past it; True also cuts the sequence after they go in (later LLaVA's rule, an option).
    cut_after_media: bool = False
    rope_scaling: Optional[Dict[str, Any]] = None  # explicit {"type": "linear", "factor": 16}
    low_resource: bool = False
    load_in_4bit: bool = False
    device_8bit: int = 0
    device_map: Optional[str] = None
    llm_grad_checkpointing: bool = False
    lora: Dict[str, Any] = field(default_factory=dict)
    # media
    video_fps: int = 1
    video_token: int = 2  # <image> per frame in feature-file prompts (= tokens per frame)
    frame_chunk: int = 64  # long-video chunk (frames) of the Q-Former and the attention
    # A feature-file conversation of several questions: the original gives every later human turn an
    # <image> (as for a video) that a feature file has no tokens for (its embedding assignment then
    # fails), so by default such a sample is refused (skipped and counted); True keeps the later turns
    # text only, the movie's tokens once, in the first turn (a corrected behaviour, an option).
    movie_multi_turn: bool = False
    long_video: bool = False  # chat: a video file is turned into features + movie prompt (stage-3 models)
    # training
    stage: int = 0  # 1, 2, 3: the freeze plan of that stage; 0: inference (all frozen)
    conv_template: str = "imgsp_v1"  # training prompt format: imgsp_v1 | plain_guided
    chat_template: str = "llamavid_llava_v1"  # the chat's default (the original CLI's llava_v1)


def to_released_key(key: str) -> str:
    """Our state-dict key -> the released checkpoint's (``llm.model.X`` -> ``model.X``, ``llm.lm_head`` -> ``lm_head``)."""
    if key.startswith("llm.model."):
        return key[len("llm."):]
    if key.startswith("llm.lm_head."):
        return key[len("llm."):]
    return key


def from_released_key(key: str) -> str:
    for pat, rep in RELEASED_LLM_RENAME:
        key = re.sub(pat, rep, key)
    return key


def read_released_config(folder: str) -> Dict[str, Any]:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ConfigError(f"model.model_path: {folder} has no config.json (is it a LLaMA-VID folder?)")
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise ConfigError(f"model.model_path: {path} is not valid json ({exc})") from None


def image_size_of(processor_name: Optional[str]) -> Optional[int]:
    """``./llamavid/processor/clip-patch14-336`` -> 336."""
    m = re.search(r"(\d+)/?$", str(processor_name or ""))
    return int(m.group(1)) if m else None


def load_bert_tokenizer(path: str, key: str = "model.bert_tokenizer"):
    """bert-base-uncased's WordPiece tokenizer with ``[DEC]`` added as BOS, left truncation."""
    import transformers

    if not path:
        raise ConfigError(f"{key}: empty; give a folder holding bert-base-uncased's vocab.txt "
                          "(the Q-Former's instruction tokenizer)")
    folder = TINY_BERT_DIR if path == "tiny" else Path(path)
    if folder.is_file() and folder.name == "vocab.txt":
        folder = folder.parent
    if not (folder / "vocab.txt").is_file():
        raise ConfigError(f"{key}: {path} holds no vocab.txt (bert-base-uncased's WordPiece vocabulary)")
    tok = transformers.BertTokenizer.from_pretrained(str(folder), truncation_side="left", do_lower_case=True)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    return tok


def tokenizer_image_token(prompt: str, tokenizer, image_token_index: int = IMAGE_TOKEN_INDEX) -> List[int]:
    """LLaVA's rule: split at ``<image>``, tokenise each piece on its own, BOS only on the first,
    ``image_token_index`` between pieces."""
    chunks = [tokenizer(chunk)["input_ids"] for chunk in prompt.split(IMAGE_TOKEN)]
    ids: List[int] = []
    offset = 0
    if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        ids.append(chunks[0][0])
    for i, chunk in enumerate(chunks):
        if i > 0:
            ids.append(image_token_index)
        ids.extend(chunk[offset:])
    return ids


def content_tokens(compress_type: Optional[str], num_patches: int) -> int:
    """Content tokens of one frame with ``num_patches`` patch tokens."""
    if not compress_type or compress_type == "none":
        return num_patches
    if compress_type == "mean":
        return 1
    if compress_type.startswith("grid:"):
        side = int(math.isqrt(num_patches))
        grid = int(compress_type.split("grid:")[-1])
        return (side // (side // grid)) ** 2
    raise ConfigError(f"model.compress_type: {compress_type!r}; use mean, grid:N or none")


# ------------------------------------------------------------------ modules
class EVATower(nn.Module):
    """The original's ``EVAVisionTowerLavis``: the ViT under ``vision_tower`` (key ``model.vision_tower.vision_tower.*``)."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.vision_tower = vit

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(F, 3, S, S) -> (F, 1 + P, D) in the dtype of ``images`` (the tower runs in its own)."""
        dtype = self.vision_tower.cls_token.dtype
        return self.vision_tower(images.to(dtype)).to(images.dtype)


class LLaMAVIDVision(nn.Module):
    """The vision modules under the released names (the checkpoint's ``model.`` minus the LLM)."""

    def __init__(self, vit: nn.Module, vision_width: int, llm_hidden: int, num_query: int, projector_type: str,
                 qformer_overrides: Dict[str, Any]) -> None:
        super().__init__()
        self.vision_tower = EVATower(vit)
        self.mm_projector = build_projector(projector_type, vision_width, llm_hidden)
        overrides = {"vocab_size": 30523, **qformer_overrides, "with_text": True}
        self.vlm_att_encoder, self.vlm_att_query = build_qformer(num_query, vision_width, **overrides)
        self.vlm_att_encoder.cls = None  # the original deletes the LM head
        qhidden = self.vlm_att_encoder.config.hidden_size
        self.vlm_att_ln = nn.LayerNorm(vision_width)
        self.vlm_att_projector = nn.Linear(qhidden, vision_width)
        self.vlm_att_key_projector = nn.Linear(vision_width, vision_width)
        self.vlm_att_val_projector = nn.Linear(vision_width, llm_hidden)


def build_projector(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    """``linear`` or ``mlpNx_gelu`` (LLaVA's projector builder: keys ``0``, ``2``, ...)."""
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    m = re.match(r"^mlp(\d+)x_gelu$", kind or "")
    if not m:
        raise ConfigError(f"model.mm_projector_type: {kind!r}; use linear or mlp2x_gelu")
    layers: List[nn.Module] = [nn.Linear(in_dim, out_dim)]
    for _ in range(1, int(m.group(1))):
        layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
    return nn.Sequential(*layers)


@registry.register_model("llama_vid")
class LLaMAVID(VideoLLM):
    """LLaMA-VID (short video, image and long-video models; see the module docstring)."""

    arch = "llama_vid"
    config_schema = LLaMAVIDConfig
    llm_attr = "llm"
    media_placeholder = IMAGE_TOKEN
    text_conditioned = True
    token_count = "per_frame"
    reads_feature_files = True  # load_media takes a .pkl (long_video.read_feature_file)
    tolerated_unexpected = (r"rotary_emb\.inv_freq",)
    PRETRAINED_MODEL_CONFIG_DICT = {
        "tiny": "configs/models/llama_vid_tiny.yaml",
        "tiny_synth": "configs/models/llama_vid_tiny_synth.yaml",
        "vicuna7b_video": "configs/models/llama_vid_vicuna7b_video.yaml",
        "vicuna13b_video": "configs/models/llama_vid_vicuna13b_video.yaml",
        "vicuna7b_image336": "configs/models/llama_vid_vicuna7b_image336.yaml",
        "vicuna13b_image336": "configs/models/llama_vid_vicuna13b_image336.yaml",
        "vicuna7b_longvideo": "configs/models/llama_vid_vicuna7b_longvideo.yaml",
    }
    DEFAULT_MODEL_TYPE = "vicuna7b_video"
    weight_keys = {
        "model_path": "a released LLaMA-VID folder",
        "llm_path": "a Vicuna folder",
        "ckpt": "a LLaMA-VID training checkpoint of this framework",
    }

    def __init__(self, cfg: LLaMAVIDConfig) -> None:
        super().__init__()
        self.cfg = cfg
        released = read_released_config(cfg.model_path) if cfg.model_path else {}
        self.released_config = released

        def pick(key: str, default: Any, released_key: Optional[str] = None) -> Any:
            value = getattr(cfg, key)
            if value is not None:
                return value
            value = released.get(released_key or key)
            return default if value is None else value

        self.image_size = int(pick("image_size", image_size_of(released.get("image_processor")) or 224))
        self.compress_type = pick("compress_type", None)
        if self.compress_type == "none":
            self.compress_type = None
        self.num_query = int(pick("num_query", 32))
        self.bert_type = str(pick("bert_type", "qformer_pretrain"))
        if "qformer_pretrain" not in self.bert_type:
            raise ConfigError(f"model.bert_type: {self.bert_type!r}; only the qformer_pretrain types of the "
                              "released models are implemented")
        self.select_feature = str(pick("mm_vision_select_feature", "patch"))
        self.image_aspect_ratio = str(pick("image_aspect_ratio", "pad"))
        projector_type = str(pick("mm_projector_type", "mlp2x_gelu"))
        if cfg.stage not in STAGES:
            raise ConfigError(f"model.stage: {cfg.stage}; choose 0 (inference), 1, 2 or 3")
        if cfg.conv_template not in TRAIN_TEMPLATES:
            raise ConfigError(f"model.conv_template: {cfg.conv_template!r}; choose one of {TRAIN_TEMPLATES}")
        self.default_template = cfg.chat_template
        if cfg.chat_template not in TEMPLATES:
            raise ConfigError(f"model.chat_template: {cfg.chat_template!r} unknown; registered: {sorted(TEMPLATES)}")

        self.llm = self._build_llm(cfg, released)
        self._tokenizer = self._build_tokenizer(cfg)
        self.bert_tokenizer = load_bert_tokenizer(cfg.bert_tokenizer)
        llm_hidden = self.llm.config.hidden_size
        vit = create_eva_vit_g(img_size=self.image_size, precision="fp32", **cfg.vit)
        self.model = LLaMAVIDVision(vit, vit.num_features, llm_hidden, self.num_query, projector_type, cfg.qformer)
        if len(self.bert_tokenizer) > self.model.vlm_att_encoder.config.vocab_size:
            raise ConfigError(f"model.bert_tokenizer: {len(self.bert_tokenizer)} tokens but the Q-Former has "
                              f"{self.model.vlm_att_encoder.config.vocab_size} word embeddings (model.qformer.vocab_size)")
        self.patches = vit.patch_embed.num_patches
        self.tokens_per_frame = 1 + content_tokens(self.compress_type, self.patches)

        if cfg.lora:
            from videollm.models.lora import LoRAConfig, apply_lora

            apply_lora(self, self.llm_attr, LoRAConfig(**cfg.lora))
        if not self._on_meta():
            self._load_weights(cfg, released)
        self._cast(cfg)
        self.apply_freeze_plan()

    # ------------------------------------------------------------------ construction
    def _on_meta(self) -> bool:
        return self.model.vlm_att_query.device.type == "meta"

    @staticmethod
    def _llm_kwargs(cfg: LLaMAVIDConfig) -> Dict[str, Any]:
        return dict(dtype=cfg.llm_dtype, load_in_8bit=cfg.low_resource, load_in_4bit=cfg.load_in_4bit,
                    device_map=cfg.device_map, device_8bit=cfg.device_8bit, grad_checkpointing=cfg.llm_grad_checkpointing)

    def _build_llm(self, cfg: LLaMAVIDConfig, released: Dict[str, Any]) -> nn.Module:
        import transformers

        from videollm.models.llm import build_language_model, enable_gradient_checkpointing, quantization_config

        if cfg.llm_dtype not in DTYPES:
            raise ConfigError(f"model.llm_dtype: {cfg.llm_dtype!r}; choose one of {sorted(DTYPES)}")
        if cfg.model_path:
            # The released config.json says model_type "llava" (LLaMA-VID's own class; transformers'
            # built-in "llava" is another model), so the LLaMA config is built from its fields.
            fields = {k: v for k, v in released.items() if k not in ("model_type", "architectures", "auto_map")}
            llama_cfg = transformers.LlamaConfig(**fields)
            self._apply_rope_scaling(llama_cfg, cfg)
            kwargs: Dict[str, Any] = {"config": llama_cfg, "dtype": DTYPES[cfg.llm_dtype]}
            quant = quantization_config(load_in_8bit=cfg.low_resource, load_in_4bit=cfg.load_in_4bit,
                                        dtype=DTYPES[cfg.llm_dtype], on_cuda=torch.cuda.is_available())
            if quant is not None:
                kwargs["quantization_config"] = quant
                kwargs["device_map"] = {"": cfg.device_8bit if torch.cuda.is_available() else "cpu"}
            if cfg.device_map:
                kwargs["device_map"] = cfg.device_map
            # The folder's vision keys are "unexpected" to LlamaForCausalLM: they are loaded below,
            # so transformers' per-key report is silenced (real problems still raise).
            verbosity = transformers.logging.get_verbosity()
            transformers.logging.set_verbosity_error()
            try:
                llm = transformers.LlamaForCausalLM.from_pretrained(cfg.model_path, **kwargs)
            except (OSError, ValueError, KeyError) as exc:
                raise ConfigError(f"model.model_path: cannot load the LLaMA weights of {cfg.model_path}: {exc}") from None
            finally:
                transformers.logging.set_verbosity(verbosity)
            if cfg.llm_grad_checkpointing:
                enable_gradient_checkpointing(llm)
            return llm
        if cfg.llm_path:
            llm = build_language_model(cfg.llm_path, **self._llm_kwargs(cfg), key="model.llm_path")
            if self._apply_rope_scaling(llm.config, cfg):
                llm.model.rotary_emb = type(llm.model.rotary_emb)(config=llm.config)
            return llm
        config = dict(cfg.llm_config)
        if not config:
            raise ConfigError("model: give model_path (a LLaMA-VID folder), llm_path (a Vicuna folder) or llm_config")
        probe = transformers.LlamaConfig(**{k: v for k, v in config.items() if k != "model_type"})
        if self._apply_rope_scaling(probe, cfg):
            config.pop("rope_scaling", None)
            config["rope_parameters"] = probe.rope_parameters
        return build_language_model("", config=config, **self._llm_kwargs(cfg), key="model.llm_config")

    @staticmethod
    def _apply_rope_scaling(llama_cfg: Any, cfg: LLaMAVIDConfig) -> bool:
        """train.py's rule: linear scaling by ceil(model_max_length / context) when longer.
        Written as transformers 5's ``rope_parameters`` (with the config's rope_theta)."""
        current = dict(getattr(llama_cfg, "rope_parameters", None) or getattr(llama_cfg, "rope_scaling", None) or {})
        theta = current.get("rope_theta", getattr(llama_cfg, "rope_theta", 10000.0))
        if cfg.rope_scaling:
            wanted = dict(cfg.rope_scaling)
        else:
            factor = float(current.get("factor", 1) or 1)
            context = int(getattr(llama_cfg, "max_position_embeddings", 0)) * factor
            if not context or cfg.model_max_length <= context:
                return False
            wanted = {"type": "linear", "factor": float(math.ceil(cfg.model_max_length / context))}
        params = {"rope_type": wanted.get("rope_type", wanted.get("type", "linear")),
                  "factor": float(wanted["factor"]), "rope_theta": theta}
        if hasattr(llama_cfg, "rope_parameters"):
            llama_cfg.rope_parameters = params
        else:
            llama_cfg.rope_scaling = params
        return True

    @staticmethod
    def _build_tokenizer(cfg: LLaMAVIDConfig):
        from videollm.tokenizer import load_tokenizer

        path = cfg.tokenizer if cfg.tokenizer is not None else (cfg.model_path or cfg.llm_path)
        tok = load_tokenizer(path or None)
        tok.set_pad_token(tok.unk_token)  # train.py for v1 templates: pad := unk
        return tok

    @property
    def tokenizer(self):
        return self._tokenizer

    def vision_tower_path(self) -> str:
        """Where EVA comes from: ``model.vision_tower``, else the released ``mm_vision_tower``."""
        if self.cfg.vision_tower is not None:
            return self.cfg.vision_tower
        return str(self.released_config.get("mm_vision_tower") or "")

    def _load_weights(self, cfg: LLaMAVIDConfig, released: Dict[str, Any]) -> None:
        from videollm.checkpoint import load_model_state

        if cfg.pretrain_qformer:
            self.load_weights(load_model_state(cfg.pretrain_qformer), WeightSource(
                cfg.pretrain_qformer, provides=("model.vlm_att_encoder.", "model.vlm_att_ln.", "model.vlm_att_query"),
                ignore_others=True, rename=INSTRUCTBLIP_RENAME))
        pos_key = "model.vlm_att_encoder.bert.embeddings.position_ids"
        pos_ids = self.model.vlm_att_encoder.bert.embeddings.position_ids

        def with_position_ids(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
            # parameter-only files lack this buffer; the original adds the model's own
            state.setdefault(pos_key, pos_ids)
            return state

        if cfg.model_path:
            state = with_position_ids(read_released_weights(cfg.model_path, VISION_PREFIXES))
            self.load_weights(state, WeightSource(cfg.model_path, provides=VISION_PREFIXES, rename=RELEASED_LLM_RENAME,
                                                  drop=("model.vision_tower.",)))
        if cfg.pretrain_mm_mlp_adapter:
            self.load_weights(with_position_ids(load_model_state(cfg.pretrain_mm_mlp_adapter)), WeightSource(
                cfg.pretrain_mm_mlp_adapter, provides=VISION_PREFIXES, rename=RELEASED_LLM_RENAME))
        if cfg.ckpt:
            self.load_weights(load_model_state(cfg.ckpt), WeightSource(cfg.ckpt, provides=()))
        eva = self.vision_tower_path()
        if eva:
            if not os.path.isfile(eva):
                origin = ("model.vision_tower" if cfg.vision_tower is not None
                          else f"mm_vision_tower in {cfg.model_path}/config.json")
                raise ConfigError(f"EVA ViT-g weights not found: {eva} (from {origin}); download eva_vit_g.pth "
                                  "and set model.vision_tower: /path/to/eva_vit_g.pth (this key overrides the "
                                  "released config's relative path)")
            load_eva_vit_weights(self.model.vision_tower.vision_tower, eva)
        elif cfg.model_path:
            raise ConfigError(f"{cfg.model_path}/config.json names no mm_vision_tower; set model.vision_tower")
        else:
            logger.warning("model.vision_tower is empty: EVA ViT has RANDOM weights (tests and toy runs only)")

    def _cast(self, cfg: LLaMAVIDConfig) -> None:
        """The tower in ``vit_precision`` (cast whole: the interpolated pos_embed is rounded too),
        the other vision modules in the LLM's dtype (the original's for_eval cast)."""
        if cfg.vit_precision not in DTYPES:
            raise ConfigError(f"model.vit_precision: {cfg.vit_precision!r}; choose one of {sorted(DTYPES)}")
        dtype = self.llm_dtype if not self.llm_is_placed() else DTYPES[cfg.llm_dtype]
        for name, child in self.model.named_children():
            if name != "vision_tower":
                child.to(dtype)
        self.model.vlm_att_query.data = self.model.vlm_att_query.data.to(dtype)
        self.model.vision_tower.to(DTYPES[cfg.vit_precision])

    # ------------------------------------------------------------------ freezing
    def freeze_plan(self) -> FreezePlan:
        """Stage 1: projectors only (``mm_projector`` and the three ``vlm_att`` projections);
        stage 2: everything but EVA; stage 3: the LLM and ``mm_projector``; 0: nothing."""
        plan = FreezePlan().add("", False, "frozen unless a stage trains it")
        if self.cfg.stage == 1:
            plan.add(("model.mm_projector.", "model.vlm_att_projector.", "model.vlm_att_key_projector.",
                      "model.vlm_att_val_projector."), True, "stage 1 (tune_mm_mlp_adapter, bert_type *_freeze)")
        elif self.cfg.stage == 2:
            plan.add("", True, "stage 2: full fine-tune").add("model.vision_tower.", False, "EVA is always frozen")
        elif self.cfg.stage == 3:
            plan.add(("llm.", "model.mm_projector."), True, "stage 3 (bert_type qformer_pretrain_freeze_all)")
        return plan

    # ------------------------------------------------------------------ visual tokens
    def encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """EVA ViT-g: pixels (F, 3, S, S) -> (F, 1 + P, D_vit)."""
        with self.maybe_autocast(frames.device):
            return self.model.vision_tower(frames.to(self.device))

    def bert_inputs(self, prompts: Sequence[str]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Instructions -> BERT ids and mask (P, L): [CLS] text [SEP], padded to the longest,
        truncated from the LEFT at ``bert_max_length``."""
        tok = self.bert_tokenizer(list(prompts), padding="longest", truncation=True,
                                  max_length=self.cfg.bert_max_length, return_tensors="pt")
        return tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device)

    def vlm_attention(self, feats: torch.Tensor, prompts: Sequence[str], long_video: bool = False) -> torch.Tensor:
        """One medium's visual tokens for each prompt.

        feats: (F, N, D_vit) EVA outputs of its F frames (N = 1 + P with CLS; long video: P).
        Returns (len(prompts), F * tokens_per_frame, H_llm): prompt p's [context ; content] of
        every frame, frames in order. A long video runs in chunks of ``frame_chunk`` frames, each
        moved to the device on its own (the original chunks the Q-Former and the attention; every
        operation is per frame, so the tokens are the same and only one chunk's features and
        activations are held at a time, see docs/llama_vid_memory.md).
        """
        ids, mask = self.bert_inputs(prompts)
        if not long_video:
            return self._frame_tokens(feats, ids, mask)
        chunk = self.cfg.frame_chunk
        return torch.cat([self._frame_tokens(feats[lo: lo + chunk], ids, mask) for lo in range(0, feats.shape[0], chunk)],
                         dim=1)

    def _frame_tokens(self, feats: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """feats (F, N, D) and BERT ids/mask (P, L) -> (P, F * (1 + C), H_llm)."""
        m = self.model
        n_prompts, n_frames = ids.shape[0], feats.shape[0]
        feats = feats.to(self.device, m.vlm_att_key_projector.weight.dtype)
        img = feats[None].expand(n_prompts, -1, -1, -1).flatten(0, 1)  # (P*F, N, D)
        ids = ids[:, None].expand(-1, n_frames, -1).flatten(0, 1)  # (P*F, L)
        mask = mask[:, None].expand(-1, n_frames, -1).flatten(0, 1)
        bert_feat = img  # the Q-Former sees CLS too
        if self.select_feature == "patch" and img.shape[1] % 2 == 1:
            img = img[:, 1:]
        query = m.vlm_att_query.expand(img.shape[0], -1, -1)
        query_mask = torch.cat([torch.ones(query.shape[:2], dtype=mask.dtype, device=mask.device), mask], dim=1)
        out = m.vlm_att_encoder.bert(query_embeds=query, input_ids=ids, attention_mask=query_mask,
                                     encoder_hidden_states=m.vlm_att_ln(bert_feat))
        text_q = m.vlm_att_projector(out[:, : query.shape[1]])  # (P*F, Q, D)
        tokens = self.token_generation(text_q, img)  # (P*F, T, H)
        return tokens.reshape(n_prompts, n_frames * tokens.shape[1], tokens.shape[-1])

    def token_generation(self, text_q: torch.Tensor, vis: torch.Tensor) -> torch.Tensor:
        """text_q (B, Q, D), vis (B, P, D) -> [context (1) ; content (C)] (B, 1 + C, H_llm)."""
        m = self.model
        scores = text_q @ m.vlm_att_key_projector(vis).transpose(-1, -2) / (vis.shape[-1] ** 0.5)
        ctx = (scores.softmax(-1) @ vis).mean(1)
        ctx = m.vlm_att_val_projector(ctx[:, None])
        if self.compress_type and self.compress_type.startswith("grid:"):
            grid = int(self.compress_type.split("grid:")[-1])
            side = int(vis.shape[1] ** 0.5)
            if grid <= 1:
                raise ConfigError(f"model.compress_type: grid size must be > 1, got {grid}")
            stride = side // grid
            pooled = F.avg_pool2d(vis.reshape(vis.shape[0], side, side, -1).permute(0, 3, 1, 2),
                                  kernel_size=stride, stride=stride, padding=0)
            vis = pooled.permute(0, 2, 3, 1).flatten(1, 2)
        elif self.compress_type == "mean":
            vis = vis.mean(dim=1, keepdim=True)
        return torch.cat([ctx, m.mm_projector(vis)], dim=1)

    def medium_features(self, medium: Media) -> Tuple[torch.Tensor, bool]:
        """(F, N, D_vit) features of a medium and whether it is a long video (feature file)."""
        if medium.kind == "image":
            return self.encode_frames(medium.data.unsqueeze(0)), False
        if medium.kind == "video":
            return self.encode_frames(medium.data.permute(1, 0, 2, 3)), False
        if medium.kind == "features":
            return medium.data, True
        raise PromptError(f"LLaMA-VID cannot encode media of kind {medium.kind!r}")

    def encode_media(self, media: Sequence[Media], text: Optional[str] = None) -> List[torch.Tensor]:
        """Each medium's (n_i, H_llm) tokens conditioned on ``text`` (the question; None: "")."""
        out = []
        for medium in media:
            feats, long_video = self.medium_features(medium)
            out.append(self.vlm_attention(feats, [text or ""], long_video)[0])
        return out

    def num_media_tokens(self, medium: Media) -> int:
        if medium.kind == "image":
            return self.tokens_per_frame
        if medium.kind == "video":
            return int(medium.data.shape[1]) * self.tokens_per_frame
        if medium.kind == "features":
            return int(medium.data.shape[0]) * self.tokens_per_frame
        raise PromptError(f"LLaMA-VID has no token count for media of kind {medium.kind!r}")

    # ------------------------------------------------------------------ media loading
    def image_processor(self):
        from videollm.processors.clip_image import CLIPImageProcessor

        return CLIPImageProcessor(self.image_size)

    def load_media(self, source: Any, kind: str, *, timeout: Optional[float] = 30.0, pad: bool = False,
                   subtitles: Optional[str] = None, **options: Any) -> Media:
        """Chat media: a video at ``video_fps`` (every sampled frame; a ``.pkl`` is a feature
        file; with ``long_video`` a video becomes features + the movie prompt, subtitles from
        ``subtitles`` or a ``.srt`` next to it), an image through the CLIP processor (``pad``:
        square with the mean colour, as training)."""
        for unused in ("n_frms", "vis_processor", "image_processor"):
            options.pop(unused, None)
        if kind in ("video", "features") and str(source).endswith(".pkl"):
            return load_feature_media(source, self.cfg.video_token)
        if kind == "video":
            frames, times = load_video_fps(source, self.cfg.video_fps, timeout=timeout)
            pixels = self.image_processor()(frames)  # (T, 3, S, S)
            if self.cfg.long_video:
                return self.features_medium(pixels, times, subtitles or _srt_next_to(str(source)), str(source))
            return Media("video", pixels.permute(1, 0, 2, 3), {"path": str(source), "msg": ""})
        if kind == "image":
            from videollm.processors.clip_image import expand2square
            from videollm.processors.image_processors import load_image

            proc = self.image_processor()
            image = load_image(source)
            if pad:
                image = expand2square(image, proc.background)
            return Media("image", proc(image), {"path": str(source)})
        raise PromptError(f"LLaMA-VID has no loader for media of kind {kind!r}")

    @torch.no_grad()
    def extract_features(self, pixels: torch.Tensor, batch: int = 48) -> torch.Tensor:
        """EVA outputs of processed frames (T, 3, S, S) -> (T, 1 + P, D) float16 (the file format)."""
        outs = [self.encode_frames(pixels[i: i + batch]).float().cpu() for i in range(0, len(pixels), batch)]
        return torch.cat(outs).half()

    def features_medium(self, pixels: torch.Tensor, times: Sequence[float], srt: Optional[str], path: str) -> Media:
        from videollm.long_video import interleave_subtitles, parse_srt

        subs = parse_srt(srt) if srt else []
        inputs = interleave_subtitles(subs, times)
        feats = self.extract_features(pixels)
        return feature_medium(feats.numpy(), inputs, self.cfg.video_token, path)

    # ------------------------------------------------------------------ training
    def batch_processor(self) -> "LLaMAVIDProcessor":
        if getattr(self, "_processor", None) is None:
            path = self.cfg.tokenizer if self.cfg.tokenizer is not None else (self.cfg.model_path or self.cfg.llm_path)
            self._processor = LLaMAVIDProcessor(path or None, self.cfg.conv_template, self.cfg.model_max_length,
                                                self.cfg.video_token, movie_multi_turn=self.cfg.movie_multi_turn)
        return self._processor

    def prepare_batch(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        return self.batch_processor()(batch)

    def sample_segments(self, ids: torch.Tensor, labels: torch.Tensor, medium: Optional[Media],
                        prompts: Sequence[str], where: str) -> List[Segment]:
        """One sample's segments: the k-th ``<image>`` gets the tokens of the k-th prompt; a feature
        file's tokens fill its ``<image>`` runs in order."""
        n_images = int((ids == IMAGE_TOKEN_INDEX).sum())
        labels = labels.masked_fill(ids == IMAGE_TOKEN_INDEX, IGNORE_INDEX)
        if medium is None or n_images == 0:
            keep = ids != IMAGE_TOKEN_INDEX
            return [Segment(ids=ids[keep], labels=labels[keep])]
        feats, long_video = self.medium_features(medium)
        if long_video:
            tokens = self.vlm_attention(feats, list(prompts[:1]) or [""], True)[0]
            runs = _run_lengths(ids == IMAGE_TOKEN_INDEX)
            if sum(runs) != tokens.shape[0]:
                raise PromptError(f"{where}: {sum(runs)} <image> ids for {tokens.shape[0]} visual tokens "
                                  "(video_token and the model's tokens per frame must agree)")
            parts = list(torch.split(tokens, runs))
        else:
            if n_images > len(prompts):
                raise PromptError(f"{where}: {n_images} <image> but {len(prompts)} Q-Former prompts")
            parts = list(self.vlm_attention(feats, list(prompts[:n_images]))[:n_images])
        return segments_from_ids(ids, IMAGE_TOKEN_INDEX, parts, labels=labels, where=where)

    def forward(self, batch: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        """Loss of a processed batch {input_ids (B, L), labels (B, L), media [Media|None], prompts
        [[str]]} (``prepare_batch`` makes it from dataset conversations). Returns {"loss", "num_tokens"}."""
        if "input_ids" not in batch:
            batch = self.prepare_batch(batch)
        rows = []
        for i in range(len(batch["media"])):
            n = int(batch["lengths"][i])
            rows.append(self.sample_segments(batch["input_ids"][i, :n], batch["labels"][i, :n], batch["media"][i],
                                             batch["prompts"][i], f"sample {i}"))
        merged = self._merge(rows)
        embeds, mask, labels = merged
        if self.cfg.cut_after_media and embeds.shape[1] > self.cfg.model_max_length:
            embeds, mask, labels = (t[:, : self.cfg.model_max_length] for t in (embeds, mask, labels))
        with self.maybe_autocast(embeds.device):
            out = self.llm(inputs_embeds=embeds, attention_mask=mask, labels=labels, return_dict=True)
        return {"loss": out.loss, "num_tokens": (labels[:, 1:] != IGNORE_INDEX).sum(), "seq_len": labels.shape[1]}

    def _merge(self, rows: Sequence[Sequence[Segment]], padding_side: str = "right") -> MergedInputs:
        return merge_segments(rows, self.embed_tokens, dtype=self.llm_dtype, device=self.device,
                              padding_side=padding_side, pad_token_id=None)

    # ------------------------------------------------------------------ generation
    def generation_inputs(self, batch: Dict[str, Any]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Prompt embeddings of {media [Media], questions [str]}: the eval scripts' ``vicuna_v1`` prompt
        "<image>\\n" + question, tokens conditioned on the question, left-padded."""
        from videollm.long_video import movie_block
        from videollm.models.merge import segments_from_prompt
        from videollm.templates import get_template

        template = get_template("llamavid_vicuna_v1")
        rows = []
        for medium, question in zip(batch["media"], batch["questions"]):
            conv = template.new_conversation()
            if medium.kind == "features":
                head = movie_block(medium.meta["inputs"], self.cfg.video_token)
            else:
                head = IMAGE_TOKEN + "\n"
            conv.append_message(conv.roles[0], head + question)
            conv.append_message(conv.roles[1], None)
            emb = self.encode_media([medium], question)[0]
            slots = int(medium.meta.get("placeholders", 1))
            rows.append(segments_from_prompt(self.tokenizer, conv.get_prompt(), IMAGE_TOKEN,
                                             list(torch.tensor_split(emb, slots)) if slots > 1 else [emb]))
        merged = self._merge(rows, padding_side="left")
        return merged.inputs_embeds, merged.attention_mask

    def decode_caption(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True).split("</s>")[0].strip()

    # ------------------------------------------------------------------ export
    def released_state_dict(self) -> Dict[str, torch.Tensor]:
        """Our state dict under the released names (EVA left out, as the released folders)."""
        return {to_released_key(k): v for k, v in self.state_dict().items() if not k.startswith("model.vision_tower.")}

    def adapter_state_dict(self) -> Dict[str, torch.Tensor]:
        """What stage 1 saves as ``mm_projector.bin``: every parameter whose name holds
        mm_projector / vision_resampler / vlm_att, released names."""
        return {to_released_key(k): p.detach().cpu() for k, p in self.named_parameters()
                if any(w in k for w in ADAPTER_WORDS)}


def _run_lengths(flags: torch.Tensor) -> List[int]:
    runs, count = [], 0
    for f in flags.tolist():
        if f:
            count += 1
        elif count:
            runs.append(count)
            count = 0
    if count:
        runs.append(count)
    return runs


def _srt_next_to(path: str) -> Optional[str]:
    srt = os.path.splitext(path)[0] + ".srt"
    return srt if os.path.isfile(srt) else None


def read_released_weights(folder: str, prefixes: Sequence[str]) -> Dict[str, torch.Tensor]:
    """The tensors of a released folder whose names start with ``prefixes``, reading only the
    files that hold them: an index json (``pytorch_model.bin.index.json`` /
    ``model.safetensors.index.json``) names them, as the original's loader; else the single file."""
    from videollm.checkpoint import HF_LAYOUTS, load_model_state

    root = Path(folder)
    for index_name, single in HF_LAYOUTS:
        index = root / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{index}: malformed index json ({exc})") from None
            files = sorted({f for k, f in weight_map.items() if k.startswith(tuple(prefixes))})
            if not files:
                raise CheckpointError(f"{index}: no {', '.join(prefixes)} weights listed; is this a LLaMA-VID folder "
                                      "(not a plain Vicuna)?")
            state: Dict[str, torch.Tensor] = {}
            for name in files:
                if not (root / name).is_file():
                    raise CheckpointError(f"{index}: lists {name}, which is missing from {folder}")
                state.update({k: v for k, v in load_model_state(root / name).items() if k.startswith(tuple(prefixes))})
            return state
        if (root / single).is_file():
            return {k: v for k, v in load_model_state(root / single).items() if k.startswith(tuple(prefixes))}
    raise CheckpointError(f"{folder}: no weights (pytorch_model-*.bin + index, pytorch_model.bin, or safetensors)")


def feature_medium(feats: Any, inputs: str, video_token: int, path: str = "") -> Media:
    """A feature file's content as a chat/training medium: (N, P, D) features (CLS dropped, as
    the original's loaders), the raw ``inputs`` and, for the chat, the movie block with one
    placeholder per visual token."""
    import numpy as np

    from videollm.long_video import movie_block

    data = torch.from_numpy(np.ascontiguousarray(np.asarray(feats)[:, 1:]))
    return Media("features", data, {"path": path, "inputs": inputs, "msg": movie_block(inputs, video_token),
                                    "placeholders": int(feats.shape[0]) * int(video_token)})


def load_feature_media(path: Any, video_token: int = 2) -> Media:
    from videollm.long_video import read_feature_file

    feats, inputs = read_feature_file(path)
    return feature_medium(feats, inputs, video_token, str(path))


def load_video_fps(path: Any, fps: float = 1.0, *, timeout: Optional[float] = 30.0):
    """Frames at ``fps`` (step ``round(avg_fps / fps)``, all kept): uint8 (T, H, W, 3) and their times (s)."""
    from videollm.errors import VideoDecodeError
    from videollm.processors.clip_image import fps_indices
    from videollm.processors.video_loader import get_backend, run_with_timeout

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise VideoDecodeError(f"{path}: no such file")

    def work():
        reader = get_backend("auto").open(path)
        try:
            idx = fps_indices(reader.num_frames, reader.fps, fps)
            if not idx:
                raise VideoDecodeError(f"{path}: no frames")
            frames = reader.get_frames(idx)
            return frames, [i / reader.fps for i in idx] if reader.fps else [float(i) for i in range(len(idx))]
        finally:
            reader.close()

    try:
        return run_with_timeout(work, timeout, path)
    except VideoDecodeError:
        raise
    except Exception as exc:  # decoder libraries raise many types
        raise VideoDecodeError(f"{path}: cannot decode ({type(exc).__name__}: {exc})") from None


# ------------------------------------------------------------------ the batch processor
class LLaMAVIDProcessor:
    """LLaMA-VID's data rules: dataset conversations -> ids, labels and Q-Former prompts.

    Input batch: ``media`` ([Media | None]), ``conversations`` ([[{"from", "value"}]]), ``paths``.
    ``imgsp_v1`` (``preprocess_multimodal`` + ``preprocess_imgsp_v1``): the ``<image>`` of a turn
    moves to its start as ``<image>\\n``; one Q-Former prompt per human turn (its text without
    ``<image>`` and newlines); every later human turn without ``<image>`` gets one at its start
    or end (``random.randint(0, 1)``); the conversation in the v1 format, tokenised with
    :func:`tokenizer_image_token` (text-only: plainly, cut at ``model_max_length``); labels: BOS
    and everything up to "ASSISTANT: " of each round masked (the ``- 2`` rule); a length mismatch
    masks the whole sample. A feature file: its ``inputs`` (``...`` removed, each ``<image>`` x
    ``video_token``) replace the ``<image>`` of the turn, whose text alone is the prompt.
    ``plain_guided`` (stage 1): text ``<image>`` + caption + ``\\n``, the first two ids masked,
    the instruction is the Q-Former prompt. Output: ``input_ids``/``labels`` (B, L) right-padded
    (pad = unk; labels -100) and cut at ``model_max_length``, ``attention_mask`` (ids != pad, the
    original's rule), ``lengths``, ``media``, ``prompts``. Picklable (runs in loader workers).
    """

    def __init__(self, tokenizer_path: Optional[str], template: str, model_max_length: int, video_token: int,
                 movie_multi_turn: bool = False) -> None:
        self.tokenizer_path = tokenizer_path
        self.template = template
        self.model_max_length = model_max_length
        self.video_token = video_token
        self.movie_multi_turn = movie_multi_turn
        self._tok = None

    @property
    def tokenizer(self):
        if self._tok is None:
            from videollm.tokenizer import load_tokenizer

            self._tok = load_tokenizer(self.tokenizer_path)
            self._tok.set_pad_token(self._tok.unk_token)
        return self._tok

    def __getstate__(self) -> Dict[str, Any]:
        state = dict(self.__dict__)
        state["_tok"] = None
        return state

    # -- the original's preprocessing
    @staticmethod
    def move_image_tokens(turns: Sequence[Dict[str, str]]) -> List[Dict[str, str]]:
        out = []
        for turn in turns:
            value = turn["value"]
            if IMAGE_TOKEN in value:
                value = (IMAGE_TOKEN + "\n" + value.replace(IMAGE_TOKEN, "").strip()).strip()
            out.append({"from": turn["from"], "value": value})
        return out

    def movie_turns(self, turns: Sequence[Dict[str, str]], inputs: str) -> Tuple[List[Dict[str, str]], str]:
        from videollm.long_video import expand_image_tokens

        video = expand_image_tokens(inputs.replace("...", ""), self.video_token)
        out, prompt = [], ""
        for turn in turns:
            value = turn["value"]
            if IMAGE_TOKEN in value:
                prompt = value.replace(IMAGE_TOKEN, "").strip()
            out.append({"from": turn["from"], "value": value.replace(IMAGE_TOKEN, video)})
        return out, prompt

    def imgsp_v1(self, turns: Sequence[Dict[str, str]], has_image: bool,
                 later_images: bool = True) -> Tuple[List[int], List[int], List[str]]:
        from videollm.templates import get_template

        conv = get_template("imgsp_v1").new_conversation(training=True)
        roles = {"human": conv.roles[0], "gpt": conv.roles[1]}
        if turns and roles.get(turns[0]["from"]) != conv.roles[0]:
            turns = turns[1:]
        prompts: List[str] = []
        img_in_text = False
        for j, turn in enumerate(turns):
            role = roles.get(turn["from"])
            if role != conv.roles[j % 2]:
                raise BadInput("bad_annotation", f"turn {j} is from {turn['from']!r}; turns must alternate human/gpt")
            value = turn["value"]
            if role == conv.roles[0]:
                prompts.append(value.replace(IMAGE_TOKEN, "").replace("\n", ""))
            if IMAGE_TOKEN in value:
                img_in_text = True
            if later_images and role == conv.roles[0] and img_in_text and IMAGE_TOKEN not in value:
                value = IMAGE_TOKEN + "\n" + value if random.randint(0, 1) == 0 else value + "\n" + IMAGE_TOKEN
            conv.append_message(role, value)
        text = conv.get_prompt()
        tok = self.tokenizer

        def count(s: str) -> int:
            return len(tokenizer_image_token(s, tok)) if has_image else len(tok(s)["input_ids"])

        if has_image:
            ids = tokenizer_image_token(text, tok)
        else:
            ids = tok(text)["input_ids"][: self.model_max_length]
        labels = list(ids)
        total = sum(1 for i in ids if i != tok.pad_token_id)
        sep = conv.sep + conv.roles[1] + ": "
        cur = 1
        labels[:1] = [IGNORE_INDEX]
        for rou in text.split(conv.sep2):
            if rou == "":
                break
            parts = rou.split(sep)
            if len(parts) != 2:
                break
            parts[0] += sep
            round_len = count(rou)
            instruction_len = count(parts[0]) - 2
            labels[cur: cur + instruction_len] = [IGNORE_INDEX] * len(labels[cur: cur + instruction_len])
            cur += round_len
        labels[cur:] = [IGNORE_INDEX] * len(labels[cur:])
        if cur < self.model_max_length and cur != total:
            logger.warning("tokenization mismatch: %d vs. %d (sample ignored)", cur, total)
            labels = [IGNORE_INDEX] * len(labels)
        return ids, labels, prompts

    def plain_guided(self, turns: Sequence[Dict[str, str]]) -> Tuple[List[int], List[int], List[str]]:
        if len(turns) != 2 or IMAGE_TOKEN not in turns[0]["value"]:
            raise BadInput("bad_annotation", "plain_guided needs two turns, the first holding <image>")
        prompt = turns[0]["value"].replace(IMAGE_TOKEN, "").replace("\n", "")
        ids = tokenizer_image_token(IMAGE_TOKEN + turns[1]["value"] + "\n", self.tokenizer)
        masked = len(tokenizer_image_token(IMAGE_TOKEN, self.tokenizer))
        labels = [IGNORE_INDEX] * masked + ids[masked:]
        return ids, labels, [prompt]

    def tokenize(self, turns: Sequence[Dict[str, str]], medium: Optional[Media]) -> Tuple[List[int], List[int], List[str]]:
        turns = [dict(t) for t in turns]
        if medium is not None and medium.kind == "features":
            questions = sum(1 for t in turns if t.get("from") == "human")
            if questions > 1 and not self.movie_multi_turn:
                raise BadInput("bad_annotation", f"a feature-file conversation of {questions} questions: the original "
                               "gives each later question an <image> the movie has no tokens for; set "
                               "model.movie_multi_turn: true to keep later questions text only")
            turns, prompt = self.movie_turns(turns, medium.meta.get("inputs", ""))
            ids, labels, _ = self.imgsp_v1(turns, True, later_images=False)
            return ids, labels, [prompt]
        if medium is not None:
            turns = self.move_image_tokens(turns)
        if self.template == "plain_guided":
            return self.plain_guided(turns)
        return self.imgsp_v1(turns, medium is not None)

    def __call__(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        if "input_ids" in batch or "conversations" not in batch:
            return batch
        convs = batch["conversations"]
        media = batch.get("media") or [None] * len(convs)
        paths = batch.get("paths") or [f"<sample {i}>" for i in range(len(convs))]
        rows, bad = [], list(batch.get("bad_samples", []))
        for i, (turns, medium) in enumerate(zip(convs, media)):
            try:
                ids, labels, prompts = self.tokenize(turns, medium)
            except BadInput as exc:
                logger.warning("%s: %s (%s)", paths[i], exc.reason, exc.detail)
                bad.append((paths[i], exc.reason))
                continue
            rows.append((ids, labels, prompts, medium))
        if not rows:
            return {"bad_samples": bad, "num_samples": 0}
        pad = self.tokenizer.pad_token_id
        longest = min(max(len(r[0]) for r in rows), self.model_max_length)
        ids_t = torch.full((len(rows), longest), pad, dtype=torch.long)
        lab_t = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)
        lengths = []
        for i, (ids, labels, _, _) in enumerate(rows):
            n = min(len(ids), longest)
            ids_t[i, :n] = torch.tensor(ids[:n], dtype=torch.long)
            lab_t[i, :n] = torch.tensor(labels[:n], dtype=torch.long)
            lengths.append(n)
        return {"input_ids": ids_t, "labels": lab_t, "attention_mask": ids_t.ne(pad), "lengths": lengths,
                "media": [r[3] for r in rows], "prompts": [r[2] for r in rows], "bad_samples": bad,
                "num_samples": len(rows)}
