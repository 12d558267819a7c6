"""Video-LLaMA: frozen EVA ViT + BLIP-2 Q-Former per frame, a video Q-Former, and an LLM.

Registered as ``video_llama``. Built from an OmegaConf node by
``registry.get_model_class("video_llama").from_config(cfg)``; every key is listed in
:class:`VideoLLAMAConfig` and the named presets live in ``videollm/configs/models/``.

The state-dict key names are the original's, because the released checkpoints load by name:
``visual_encoder``, ``ln_vision``, ``Qformer``, ``query_tokens``, ``llama_model``, ``llama_proj``,
``video_frame_position_embedding``, ``video_Qformer``, ``video_query_tokens`` and, for the audio
branch, ``audio_encoder``, ``audio_Qformer``, ``audio_query_tokens``, ``audio_position_embedding``,
``audio_llama_proj``. We would have chosen other names; we keep these.

Vision-language forward (``encode_videoQformer_visual``)::

    video (B, 3, T, H, W) -> per frame: ln_vision(visual_encoder(x))  (B*T, 1+N, D_vit)
      -> Qformer(query_tokens)                                        (B*T, Q, H)
      + video_frame_position_embedding(t) on every query of frame t   (B, T, Q, H)
      -> flatten frame-major                                          (B, T*Q, H)
      -> video_Qformer(video_query_tokens)                            (B, Qv, H)
      -> llama_proj                                                   (B, Qv, H_llm)

Training has two paths, as the original: the caption path ([BOS] + [prompt-wrapped visual
tokens] + caption + end_sym, loss on the caption) and the instruction path (``conv_type ==
"multi"``: conversations that the model's own processor (:class:`VideoLLaMAProcessor`, applied
to every batch by the runner through ``prepare_batch``) tokenises with the original's rules, and
whose ``<ImageHere>`` runs are replaced by the visual tokens). Both go through the one merge path
(:mod:`videollm.models.merge`). ``train_flag`` (0 = video branch trains, 1 = audio branch trains
on frames through ImageBind's vision tower, 3 = inference) follows the two freeze flags of the
original; what trains is the model's :meth:`freeze_plan`.

The model implements the contract of :class:`videollm.models.base.VideoLLM`; nothing outside
this file uses its own attribute names.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from videollm.datasets.bad_samples import BadInput
from videollm.errors import CheckpointError, ConfigError, PromptError
from videollm.models.base import FEATURES_KEY, Media, FreezePlan, VideoLLM, WeightSource
from videollm.models.eva_vit import FP32LayerNorm, convert_weights_to_fp16, create_eva_vit_g, load_eva_vit_weights
from videollm.models.merge import MergedInputs, Segment, merge_segments, segments_from_ids, segments_from_prompt
from videollm.models.qformer import build_qformer
from videollm.registry import registry
from videollm.tokenizer import IMAGE_PATCH_TOKEN, load_dataset_tokenizer, load_model_tokenizer

logger = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parents[1]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Buffers that old checkpoints carry but this model does not have (persistent in the original's
# LLaMA copy / ImageBind): tolerated when loading.
TOLERATED_UNEXPECTED = ("rotary_emb.inv_freq", "modality_preprocessors.text.mask", "log_logit_scale")
CHAT_TEMPLATES = ("vicuna", "llama_v2")
VIDEO_BRANCH = ("video_Qformer.", "video_query_tokens", "video_frame_position_embedding.", "llama_proj.")
AUDIO_BRANCH = ("audio_Qformer.", "audio_query_tokens", "audio_position_embedding.", "audio_llama_proj.")


@dataclass
class VideoLLAMAConfig:
    """Every key of ``model:`` for ``arch: video_llama`` (the original's names first)."""

    arch: str = "video_llama"
    model_type: str = "pretrain_vicuna"
    # vision encoder
    vit_model: str = "eva_clip_g"
    vit_ckpt: str = ""  # path of eva_vit_g.pth (the original downloaded it from a URL)
    image_size: int = 224
    drop_path_rate: float = 0.0
    use_grad_checkpoint: bool = False
    vit_precision: str = "fp16"
    freeze_vit: bool = True
    vit: Dict[str, Any] = field(default_factory=dict)  # dimension overrides (embed_dim, depth, ...)
    vit_on_cpu: bool = False
    # image Q-Former
    q_former_model: str = ""  # path of blip2_pretrained_flant5xxl.pth
    freeze_qformer: bool = True
    num_query_token: int = 32
    qformer: Dict[str, Any] = field(default_factory=dict)  # QFormerConfig overrides
    # LLM
    llama_model: str = ""  # HF folder; empty -> random weights from llm_config
    llm_config: Dict[str, Any] = field(default_factory=dict)  # transformers config kwargs (model_type, ...)
    llm_dtype: str = "bf16"
    tokenizer: Optional[str] = None  # defaults to llama_model; "tiny" = the built-in one
    freeze_llm: bool = True
    llm_grad_checkpointing: bool = False
    low_resource: bool = False  # 8-bit LLM (bitsandbytes), as the original
    load_in_4bit: bool = False
    device_8bit: int = 0
    device_map: Optional[str] = None  # e.g. "auto" to shard the LLM over GPUs
    # prompts (caption path)
    prompt_path: str = ""
    prompt_template: str = ""
    max_txt_len: int = 32
    end_sym: str = "\n"
    # video branch
    frozen_llama_proj: bool = True
    frozen_video_Qformer: bool = True
    llama_proj_model: str = ""
    fusion_header_type: str = "seqTransf"  # read but unused, as in the original
    max_frame_pos: int = 32
    fusion_head_layers: int = 2  # read but unused, as in the original
    num_video_query_token: int = 32
    video_qformer: Dict[str, Any] = field(default_factory=dict)
    # audio branch
    equip_audio_branch: bool = False
    frozen_audio_Qformer: bool = True
    num_audio_query_token: int = 8
    imagebind_ckpt_path: str = ""  # a directory holding imagebind_huge.pth (original semantics)
    imagebind: Dict[str, Any] = field(default_factory=dict)  # ImageBindConfig overrides
    audio_qformer: Dict[str, Any] = field(default_factory=dict)
    # checkpoints
    ckpt: str = ""
    ckpt_2: str = ""
    strict_load: bool = True
    # prompt format: "vicuna" or "llama_v2"; empty = from model_type (names with llama2 -> llama_v2)
    conv_template: str = ""
    tokenizer_kind: str = "llama_exact"  # the 4.28-rule LLaMA tokenizer the original was trained with
    # LoRA on the LLM through PEFT: {r, alpha, dropout, target_modules}; empty = none
    lora: Dict[str, Any] = field(default_factory=dict)
    # corrected behaviours (off by default: released checkpoints were trained without them)
    fix_label_mask: bool = False
    # "original": instruction data written as the original's datasets write it ("\n" after each
    # turn, system "\n\n"), which differs from the chat's prompt; "chat": written exactly as the
    # chat writes its prompt (template, system text per medium, separators), answers supervised
    train_prompt_format: str = "original"
    # the original's default YAML carries a preprocess block (used by builders, not the model)
    preprocess: Dict[str, Any] = field(default_factory=dict)


def _set_trainable(module: nn.Module | nn.Parameter, trainable: bool) -> None:
    params = [module] if isinstance(module, nn.Parameter) else list(module.parameters())
    for p in params:
        p.requires_grad = trainable


def _matches(key: str, prefixes: Sequence[str]) -> bool:
    return any(key.startswith(p) for p in prefixes)


def template_for_model_type(model_type: str) -> str:
    """Chat template of a model preset name: anything naming llama-2 -> llama_v2, else vicuna."""
    name = (model_type or "").lower().replace("-", "_")
    return "llama_v2" if ("llama_v2" in name or "llama2" in name) else "vicuna"


@registry.register_model("video_llama")
class VideoLLAMA(VideoLLM):
    """The Video-LLaMA model (vision-language branch, plus the audio branch when equipped)."""

    arch = "video_llama"
    config_schema = VideoLLAMAConfig
    llm_attr = "llama_model"
    media_placeholder = IMAGE_PATCH_TOKEN
    token_count = "fixed"
    tolerated_unexpected = TOLERATED_UNEXPECTED
    weight_keys = {
        "llama_model": "a Hugging Face LLaMA/Vicuna folder",
        "vit_ckpt": "eva_vit_g.pth",
        "q_former_model": "blip2_pretrained_flant5xxl.pth",
        "ckpt": "the Video-LLaMA vision-language checkpoint (.pth)",
    }
    PRETRAINED_MODEL_CONFIG_DICT = {
        "pretrain_vicuna": "configs/models/video_llama.yaml",
        "pretrain_llama_v2": "configs/models/video_llama.yaml",
        "vicuna7b": "configs/models/video_llama_vicuna7b.yaml",
        "vicuna13b": "configs/models/video_llama_vicuna13b.yaml",
        "llama2_7b": "configs/models/video_llama_llama2_7b.yaml",
        "llama2_13b": "configs/models/video_llama_llama2_13b.yaml",
        "tiny": "configs/models/video_llama_tiny.yaml",
    }

    def __init__(self, cfg: VideoLLAMAConfig) -> None:
        super().__init__()
        self.cfg = cfg
        if cfg.vit_model != "eva_clip_g":
            raise ConfigError(f"model.vit_model: '{cfg.vit_model}' is not supported; use eva_clip_g")

        self._check_weight_paths(cfg)
        self.default_template = cfg.conv_template or template_for_model_type(cfg.model_type)
        if self.default_template not in CHAT_TEMPLATES:
            raise ConfigError(f"model.conv_template: {self.default_template!r} unknown; choose one of {CHAT_TEMPLATES}")
        if cfg.tokenizer_kind != "llama_exact":
            raise ConfigError(f"model.tokenizer_kind: {cfg.tokenizer_kind!r}; Video-LLaMA uses 'llama_exact' "
                              "(the 4.28 slow-tokenizer rules it was trained with)")
        # Tokenizer: pad := unk if none, <ImageHere> and <AudioHere> added; the LLM is NOT resized.
        self.llama_tokenizer = load_model_tokenizer(cfg.tokenizer if cfg.tokenizer is not None else cfg.llama_model)
        self.IMAGE_PATCH_TOKEN_ID = self.llama_tokenizer.convert_tokens_to_ids(IMAGE_PATCH_TOKEN)

        # Frozen per-frame encoder: EVA ViT, ln_vision, BLIP-2 Q-Former.
        self.visual_encoder = create_eva_vit_g(
            img_size=cfg.image_size,
            drop_path_rate=cfg.drop_path_rate,
            use_checkpoint=cfg.use_grad_checkpoint,
            precision="fp32",  # converted below, after weights are loaded
            **cfg.vit,
        )
        self.ln_vision = FP32LayerNorm(self.visual_encoder.num_features)
        self.Qformer, self.query_tokens = build_qformer(
            cfg.num_query_token, self.visual_encoder.num_features, **cfg.qformer
        )
        qformer_hidden = self.Qformer.config.hidden_size

        # LLM (any transformers causal LM).
        self.llama_model = self._build_llm(cfg)
        llm_hidden = self.llama_model.config.hidden_size
        self.llama_proj = nn.Linear(qformer_hidden, llm_hidden)

        # Video branch.
        self.video_frame_position_embedding = nn.Embedding(cfg.max_frame_pos, qformer_hidden)
        self.num_video_query_token = cfg.num_video_query_token
        self.video_Qformer, self.video_query_tokens = self._build_branch_qformer(
            cfg, cfg.num_video_query_token, qformer_hidden, qformer_hidden, cfg.video_qformer
        )

        # Audio branch (ImageBind audio + vision towers, audio Q-Former).
        self.equip_audio_branch = cfg.equip_audio_branch
        if cfg.equip_audio_branch:
            self._build_audio_branch(cfg, qformer_hidden, llm_hidden)

        self.train_flag = self._train_flag(cfg)
        self.max_txt_len = cfg.max_txt_len
        self.end_sym = cfg.end_sym
        self.prompt_list = self._load_prompts(cfg.prompt_path, cfg.prompt_template)

        if cfg.lora:
            from videollm.models.lora import LoRAConfig, apply_lora

            apply_lora(self, self.llm_attr, LoRAConfig(**cfg.lora))
        self._load_checkpoints(cfg)
        if cfg.vit_precision == "fp16":
            convert_weights_to_fp16(self.visual_encoder)
        elif cfg.vit_precision != "fp32":
            raise ConfigError(f"model.vit_precision: '{cfg.vit_precision}' is not supported; use fp16 or fp32")
        self._apply_freezing(cfg)

    @property
    def tokenizer(self):
        return self.llama_tokenizer

    # What each weight key of the config is, as published (names of the released files).
    WEIGHT_FILES = {
        "llama_model": "the LLM folder (Hugging Face LLaMA / Vicuna / LLaMA-2-Chat; Vicuna v0 after apply_delta.py)",
        "tokenizer": "the tokenizer folder (tokenizer.model)",
        "vit_ckpt": "EVA ViT-g weights, eva_vit_g.pth",
        "q_former_model": "BLIP-2 Q-Former weights, blip2_pretrained_flant5xxl.pth",
        "llama_proj_model": "MiniGPT-4 projection, pretrained_minigpt4.pth",
        "ckpt": "Video-LLaMA vision-language checkpoint (e.g. finetune-vicuna7b-v2.pth)",
        "ckpt_2": "Video-LLaMA audio-language checkpoint (e.g. finetune_vicuna7b_audiobranch.pth)",
        "imagebind_ckpt_path": "the folder holding imagebind_huge.pth",
    }

    @classmethod
    def _check_weight_paths(cls, cfg: VideoLLAMAConfig) -> None:
        """Every configured weight path that does not exist, in ONE error (not the first only)."""
        missing = []
        for key, what in cls.WEIGHT_FILES.items():
            value = getattr(cfg, key, None)
            if key == "tokenizer" and value in (None, "", "tiny"):
                continue
            if key == "imagebind_ckpt_path" and not cfg.equip_audio_branch:
                continue
            if value and not Path(str(value)).exists():
                missing.append(f"  model.{key}: {value}  ({what})")
        if missing:
            raise ConfigError("these weight files/folders do not exist:\n" + "\n".join(missing) +
                              "\nsee README 'Use the released models' for where each file comes from")

    @property
    def ddp_find_unused_parameters(self) -> bool:  # both branches trainable, one used per batch
        return self.train_flag == 2

    # ------------------------------------------------------------------ construction helpers
    @staticmethod
    def _build_llm(cfg: VideoLLAMAConfig) -> nn.Module:
        """Any transformers causal LM (the LLM factory): a local folder, or random weights from
        ``llm_config``; 8-bit (``low_resource``) or 4-bit through bitsandbytes, on CUDA or CPU."""
        from videollm.models.llm import build_language_model

        if not cfg.llama_model and not cfg.llm_config:
            raise ConfigError("model.llama_model: empty; give a LLaMA folder, or llm_config for random weights")
        return build_language_model(
            cfg.llama_model, config=cfg.llm_config or None, dtype=cfg.llm_dtype,
            load_in_8bit=cfg.low_resource and not cfg.load_in_4bit, load_in_4bit=cfg.load_in_4bit,
            device_map=cfg.device_map, device_8bit=cfg.device_8bit, key="model.llama_model",
        )

    def _build_audio_branch(self, cfg: VideoLLAMAConfig, qformer_hidden: int, llm_hidden: int) -> None:
        from videollm.models.imagebind import ImageBindModel, imagebind_huge_config

        ib_cfg = imagebind_huge_config()
        for key, value in cfg.imagebind.items():
            if not hasattr(ib_cfg, key):
                from videollm.errors import closest

                raise ConfigError(f"model.imagebind.{key}: unknown key{closest(key, vars(ib_cfg))}")
            setattr(ib_cfg, key, value)
        self.audio_encoder = ImageBindModel(ib_cfg)
        if cfg.imagebind_ckpt_path:
            from videollm.models.imagebind import load_imagebind_weights

            # A directory holding imagebind_huge.pth (the original's semantics) or the file itself.
            # Only the vision and audio towers are built; the other modalities' keys are skipped.
            summary = load_imagebind_weights(self.audio_encoder, cfg.imagebind_ckpt_path, strict=cfg.strict_load)
            logger.info("ImageBind: %s", summary)
        self.audio_hidden_size = ib_cfg.out_embed_dim
        self.num_audio_query_token = cfg.num_audio_query_token
        self.audio_Qformer, self.audio_query_tokens = self._build_branch_qformer(
            cfg, cfg.num_audio_query_token, self.audio_hidden_size, qformer_hidden, cfg.audio_qformer
        )
        self.audio_llama_proj = nn.Linear(qformer_hidden, llm_hidden)
        # 8 rows, hard-coded in the original: at most 8 audio clips (or frames when training).
        self.audio_position_embedding = nn.Embedding(8, self.audio_hidden_size)

    @staticmethod
    def _build_branch_qformer(cfg: VideoLLAMAConfig, num_query: int, encoder_width: int, hidden: int, own: Dict[str, Any]):
        """A video/audio Q-Former as the original's ``init_video_Qformer``: 2 layers, cross-attention
        in both, ``hidden`` wide like the image Q-Former, whose heads and FFN size it inherits
        unless ``own`` (the branch's overrides) says otherwise."""
        overrides = {"hidden_size": hidden, **own}
        for key in ("num_attention_heads", "intermediate_size"):
            if key in cfg.qformer and key not in own:
                overrides[key] = cfg.qformer[key]
        return build_qformer(
            num_query,
            encoder_width,
            num_hidden_layers=overrides.pop("num_hidden_layers", 2),
            cross_attention_freq=overrides.pop("cross_attention_freq", 1),
            **overrides,
        )

    @staticmethod
    def _train_flag(cfg: VideoLLAMAConfig) -> int:
        video, audio = not cfg.frozen_video_Qformer, not cfg.frozen_audio_Qformer
        if video and not audio:
            return 0
        if audio and not video:
            return 1
        if video and audio:
            return 2
        return 3

    @staticmethod
    def _load_prompts(prompt_path: str, template: str) -> List[str]:
        if not prompt_path:
            return []
        path = Path(prompt_path)
        if not path.is_absolute() and not path.is_file():
            path = PACKAGE_DIR / prompt_path
        if not path.is_file():
            raise ConfigError(f"model.prompt_path: {prompt_path} not found")
        raw = path.read_text().splitlines()
        prompts = [template.format(p) for p in raw if IMAGE_PATCH_TOKEN in p]
        if not prompts:
            raise ConfigError(f"model.prompt_path: {prompt_path} has no line containing {IMAGE_PATCH_TOKEN}")
        return prompts

    def freeze_plan(self) -> FreezePlan:
        """The one place that decides what trains (the original's freeze flags, as data)."""
        cfg = self.cfg
        plan = FreezePlan()
        plan.add(("visual_encoder.", "ln_vision."), not cfg.freeze_vit, "freeze_vit")
        plan.add(("Qformer.", "query_tokens"), not cfg.freeze_qformer, "freeze_qformer")
        plan.add("llama_model.", not cfg.freeze_llm, "freeze_llm")
        plan.add("llama_proj.", not cfg.frozen_llama_proj, "frozen_llama_proj")
        plan.add(("video_Qformer.", "video_frame_position_embedding.", "video_query_tokens"),
                 not cfg.frozen_video_Qformer, "frozen_video_Qformer")
        if self.equip_audio_branch:
            plan.add("audio_encoder.", False, "ImageBind is always frozen")
            plan.add(("audio_Qformer.", "audio_query_tokens", "audio_llama_proj.", "audio_position_embedding."),
                     not cfg.frozen_audio_Qformer, "frozen_audio_Qformer")
        if cfg.lora:  # inside the (frozen) LLM only the adapters train
            plan.add_pattern(r"\.lora_|\.modules_to_save\.", True, "model.lora")
        return plan

    def _apply_freezing(self, cfg: VideoLLAMAConfig) -> None:
        self.freeze_plan().apply(self)
        if cfg.llm_grad_checkpointing:
            from videollm.models.llm import enable_gradient_checkpointing

            enable_gradient_checkpointing(self.llama_model)
        self.train(self.training)

    def _frozen_eval_modules(self) -> List[nn.Module]:
        """Modules kept in eval mode whatever ``train()`` says (the original's ``disabled_train``)."""
        mods: List[nn.Module] = []
        if self.cfg.freeze_vit:
            mods += [self.visual_encoder, self.ln_vision]
        if self.cfg.freeze_qformer:
            mods.append(self.Qformer)
        return mods

    def train(self, mode: bool = True) -> "VideoLLAMA":
        super().train(mode)
        for m in self._frozen_eval_modules():
            m.eval()
        return self

    # ------------------------------------------------------------------ checkpoints
    def _load_checkpoints(self, cfg: VideoLLAMAConfig) -> None:
        from videollm.checkpoint import load_model_state

        if cfg.vit_ckpt:
            result = load_eva_vit_weights(self.visual_encoder, cfg.vit_ckpt)
            if result.missing_keys and cfg.strict_load:
                raise CheckpointError(
                    f"{cfg.vit_ckpt}: missing {len(result.missing_keys)} ViT keys, e.g. {result.missing_keys[:3]}"
                )
        sources = []
        if cfg.q_former_model:
            sources.append(WeightSource(cfg.q_former_model, provides=("Qformer.", "query_tokens", "ln_vision."),
                                        ignore_others=True))
        if cfg.llama_proj_model:
            sources.append(WeightSource(cfg.llama_proj_model, provides=("llama_proj.",), ignore_others=True))
        if cfg.ckpt:
            sources.append(WeightSource(cfg.ckpt, provides=VIDEO_BRANCH))
        if cfg.ckpt_2:
            sources.append(WeightSource(cfg.ckpt_2, provides=AUDIO_BRANCH))
        for src in sources:
            self.load_weights(load_model_state(src.path), src)

    def load_branch(self, state: Dict[str, torch.Tensor], *, source: str, provides: Sequence[str],
                    ignore_others: bool = False, strict: Optional[bool] = None) -> Tuple[List[str], List[str]]:
        """Load a partial state dict (the original's ``load_state_dict(strict=False)``), checked;
        see :meth:`VideoLLM.load_weights`. Returns (missing, unexpected)."""
        src = WeightSource(source, provides=tuple(provides), ignore_others=ignore_others, strict=strict)
        return self.load_weights(state, src, strict=strict)

    # ------------------------------------------------------------------ encoders
    @property
    def device(self) -> torch.device:
        return self.llama_proj.weight.device

    def llm_is_placed(self) -> bool:
        return bool(self.cfg.low_resource or self.cfg.load_in_4bit or self.cfg.device_map) or super().llm_is_placed()

    def place(self, device: torch.device) -> None:
        """As the contract's, and with ``vit_on_cpu`` the ViT and ``ln_vision`` stay on the CPU in fp32."""
        super().place(device)
        if self.cfg.vit_on_cpu:
            self.visual_encoder.to("cpu", torch.float32)
            self.ln_vision.to("cpu", torch.float32)

    def encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """Per-frame image Q-Former: (N, 3, H, W) -> (N, Q, H_q)."""
        device = frames.device
        if self.cfg.vit_on_cpu:
            frames = frames.to("cpu", torch.float32)
        image_embeds = self.ln_vision(self.visual_encoder(frames)).to(device)
        query_tokens = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        return self.Qformer.bert(
            query_embeds=query_tokens,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=device),
        )

    def encode_videoQformer_visual(self, image: torch.Tensor, features: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        """Video (B, 3, T, H, W) -> LLM inputs (B, num_video_query_token, H_llm) and mask (B, Qv).
        ``features``: ``image`` is the frozen front's output (B, T, Q, H) (:meth:`frozen_front`)."""
        device = image.device
        batch, frames = image.shape[:2] if features else (image.shape[0], image.shape[2])
        if frames > self.video_frame_position_embedding.num_embeddings:
            raise PromptError(
                f"video has {frames} frames but max_frame_pos is "
                f"{self.video_frame_position_embedding.num_embeddings}; sample fewer frames"
            )
        with self.maybe_autocast(device):
            if features:
                q_hidden = image.reshape(batch * frames, *image.shape[2:])
            else:
                x = image.permute(0, 2, 1, 3, 4).reshape(batch * frames, -1, image.shape[3], image.shape[4])
                q_hidden = self.encode_frames(x)  # (B*T, Q, H)
            positions = torch.arange(frames, dtype=torch.long, device=device).unsqueeze(0).expand(batch, -1)
            frame_pos = self.video_frame_position_embedding(positions).unsqueeze(-2)  # (B, T, 1, H)
            frame_hidden = q_hidden.reshape(batch, frames, q_hidden.shape[1], q_hidden.shape[2]) + frame_pos
            frame_hidden = frame_hidden.reshape(batch, frames * q_hidden.shape[1], q_hidden.shape[2])
            frame_atts = torch.ones(frame_hidden.shape[:-1], dtype=torch.long, device=device)
            video_query = self.video_query_tokens.expand(batch, -1, -1)
            video_hidden = self.video_Qformer.bert(
                query_embeds=video_query, encoder_hidden_states=frame_hidden, encoder_attention_mask=frame_atts
            )
            inputs_llama = self.llama_proj(video_hidden)
        atts_llama = torch.ones(inputs_llama.shape[:-1], dtype=torch.long, device=device)
        return inputs_llama, atts_llama

    def encode_audioQformer(self, audio: torch.Tensor, modality_type: str = "audio") -> Tuple[torch.Tensor, torch.Tensor]:
        """Audio (B, S, 1, mel, frames) or frames (B, T, 3, H, W) -> (B, num_audio_query_token, H_llm).

        With ``modality_type="vision"`` the frames go through ImageBind's vision tower (how the
        original trains the audio branch); with ``"audio"`` the clips go through the audio tower.
        """
        if not self.equip_audio_branch:
            raise ConfigError("model.equip_audio_branch is false: this model has no audio branch")
        device = audio.device
        batch, steps = audio.shape[:2]
        if steps > self.audio_position_embedding.num_embeddings:
            raise PromptError(f"{steps} audio clips/frames given; the audio branch takes at most 8")
        with self.maybe_autocast(device):
            _, final = self.audio_encoder.get_audio_feature(audio, modality_type)  # (B, S, 1024)
            positions = torch.arange(steps, dtype=torch.long, device=device).unsqueeze(0).expand(batch, -1)
            final = final + self.audio_position_embedding(positions)
            atts = torch.ones(final.shape[:-1], dtype=torch.long, device=device)
            query = self.audio_query_tokens.expand(final.shape[0], -1, -1)
            hidden = self.audio_Qformer.bert(query_embeds=query, encoder_hidden_states=final, encoder_attention_mask=atts)
            inputs_llama = self.audio_llama_proj(hidden)
        return inputs_llama, torch.ones(inputs_llama.shape[:-1], dtype=torch.long, device=device)

    def encode_visual_for_training(self, image: torch.Tensor, features: bool = False) -> Tuple[torch.Tensor, torch.Tensor, int]:
        """The branch chosen by ``train_flag``: returns (embeds, mask, number of tokens).
        ``features``: ``image`` holds the frozen front's outputs (B, T, Q, H)."""
        if features:
            if self.train_flag == 1:
                raise ConfigError("cached features feed the video branch; train_flag 1 (frozen_video_Qformer true, "
                                  "frozen_audio_Qformer false) trains the audio branch on frames: use the raw data")
            embeds, atts = self.encode_videoQformer_visual(image, features=True)
            return embeds, atts, self.num_video_query_token
        if image.dim() == 4:  # images are one-frame videos
            image = image.unsqueeze(2)
        if self.train_flag == 1:
            embeds, atts = self.encode_audioQformer(image.permute(0, 2, 1, 3, 4), modality_type="vision")
            return embeds, atts, self.num_audio_query_token
        embeds, atts = self.encode_videoQformer_visual(image)
        return embeds, atts, self.num_video_query_token

    # ------------------------------------------------------------------ the contract: media
    def num_media_tokens(self, medium: Media) -> int:
        return self.num_audio_query_token if medium.kind == "audio" else self.num_video_query_token

    def encode_media(self, media: Sequence[Media], text: Optional[str] = None) -> List[torch.Tensor]:
        """Video (3, T, H, W) / image (3, H, W) / audio (S, 1, mel, frames) -> (Qv or Qa, H_llm) each.
        The text is not used: Video-LLaMA's visual tokens do not depend on the question."""
        out: List[torch.Tensor] = []
        for m in media:
            data = m.data.to(self.device) if isinstance(m.data, torch.Tensor) else m.data
            if m.kind == "audio":
                emb, _ = self.encode_audioQformer(data.unsqueeze(0), modality_type="audio")
            elif m.kind == "video":
                emb, _ = self.encode_videoQformer_visual(data.unsqueeze(0))
            elif m.kind == "image":
                emb, _ = self.encode_videoQformer_visual(data.unsqueeze(0).unsqueeze(2))
            elif m.kind == "features":  # frozen_front's output (T, Q, H)
                emb, _ = self.encode_videoQformer_visual(data.unsqueeze(0), features=True)
            else:
                raise PromptError(f"Video-LLaMA cannot encode media of kind {m.kind!r}")
            out.append(emb[0])
        return out

    # The frozen front a feature cache stores: ViT + ln_vision + image Q-Former, per frame.
    frozen_front_prefixes = ("visual_encoder.", "ln_vision.", "Qformer.", "query_tokens")

    @torch.no_grad()
    def frozen_front(self, media: Sequence[Media]) -> List[torch.Tensor]:
        """Video (3, T, H, W) / image (3, H, W, one frame) -> the image Q-Former's output per frame
        (T, Q, H_q), what :meth:`encode_videoQformer_visual` adds the frame positions to."""
        out: List[torch.Tensor] = []
        for m in media:
            if m.kind not in ("video", "image"):
                raise PromptError(f"Video-LLaMA's frozen front takes video or image media, not {m.kind!r}")
            data = m.data.to(self.device)
            frames = data.unsqueeze(1) if m.kind == "image" else data  # (3, T, H, W)
            with self.maybe_autocast(self.device):
                out.append(self.encode_frames(frames.permute(1, 0, 2, 3)))
        return out

    def frozen_fingerprint(self) -> Dict[str, Any]:
        cfg = self.cfg
        return {"arch": self.arch, "weights": self.weights_fingerprint(self.frozen_front_prefixes),
                "image_size": int(cfg.image_size), "vit_precision": cfg.vit_precision,
                "num_query_token": int(cfg.num_query_token), "vit": dict(cfg.vit), "qformer": dict(cfg.qformer)}

    def load_media(self, source: Any, kind: str, *, timeout: Optional[float] = 30.0, n_frms: int = 8,
                   vis_processor: Any = None, image_processor: Any = None, isolate: bool = True,
                   **options: Any) -> Media:
        """The original chat's media processing: 8 frames (``n_frms``), uniform, resized by the
        decoder to the model's image size then ``alpro_video_eval``; images ``blip2_image_eval``;
        audio: 8 clips of ImageBind's Kaldi fbank. Errors name the file. ``isolate``: decode
        video and audio in a child process that the timeout really stops (untrusted uploads)."""
        from omegaconf import OmegaConf

        size = int(self.cfg.image_size)
        if kind == "video":
            from videollm.processors.video_loader import load_video

            if vis_processor is None:
                vis_processor = registry.get_processor_class("alpro_video_eval").from_config(
                    OmegaConf.create({"image_size": size, "n_frms": n_frms}))
            # options: sampling (default the original's uniform), fps, max_frames, clip (segment seconds)
            video, msg = load_video(source, n_frms=n_frms, height=size, width=size, sampling=options.pop("sampling", "uniform"),
                                    return_msg=True, timeout=timeout, isolate=isolate, **options)
            return Media("video", vis_processor.transform(video), {"path": str(source), "msg": msg})
        if kind == "image":
            from videollm.processors.image_processors import load_image

            if image_processor is None:
                # The original builds Blip2ImageEvalProcessor() with its default 224 whatever the
                # config says (quirk A4); the model's image size is the same for released models.
                image_processor = registry.get_processor_class("blip2_image_eval").from_config(
                    OmegaConf.create({"image_size": size}))
            return Media("image", image_processor(load_image(source, **options)), {"path": str(source)})
        if kind == "audio":
            from videollm.errors import AudioDecodeError, VideoDecodeError
            from videollm.processors.audio import load_and_transform_audio
            from videollm.processors.video_loader import run_isolated, run_with_timeout

            try:
                if isolate:  # numpy crosses the process boundary by value (a tensor would go by shared fd)
                    audio = torch.from_numpy(run_isolated(_audio_array, str(source), timeout=timeout, what=str(source)))
                else:
                    audio = run_with_timeout(lambda: load_and_transform_audio(source, clips_per_video=8), timeout,
                                             str(source))
            except VideoDecodeError as exc:  # the timeout helper's error type
                if isinstance(exc, AudioDecodeError):
                    raise
                raise AudioDecodeError(str(exc).replace("decoding", "audio decoding")) from None
            return Media("audio", audio, {"path": str(source)})
        raise PromptError(f"Video-LLaMA has no loader for media of kind {kind!r}")

    @property
    def has_audio(self) -> bool:
        return bool(self.equip_audio_branch)

    # ------------------------------------------------------------------ the contract: processor
    def batch_processor(self) -> "VideoLLaMAProcessor":
        if getattr(self, "_processor", None) is None:
            tok = self.cfg.tokenizer if self.cfg.tokenizer is not None else self.cfg.llama_model
            if self.cfg.train_prompt_format not in ("original", "chat"):
                raise ConfigError(f"model.train_prompt_format: {self.cfg.train_prompt_format!r}; use original or chat")
            self._processor = VideoLLaMAProcessor(tok, self.num_video_query_token, self.default_template,
                                                  self.cfg.fix_label_mask, self.cfg.train_prompt_format)
        return self._processor

    def prepare_batch(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        return self.batch_processor()(batch)

    def check_dataset(self, name: str, declared: Dict[str, Any]) -> None:
        """The original's dataset YAML repeats model facts; they must agree with this model."""
        n = declared.get("num_video_query_token")
        if n is not None and int(n) != self.num_video_query_token:
            raise ConfigError(f"datasets.{name}.num_video_query_token: {n}, but the model has "
                              f"num_video_query_token {self.num_video_query_token}; they must agree")
        template = declared.get("model_type")
        if template is not None and template != self.default_template:
            raise ConfigError(f"datasets.{name}.model_type: {template!r}, but the model's prompt template is "
                              f"{self.default_template!r} (model.conv_template / model.model_type); they must agree")

    # ------------------------------------------------------------------ training forward
    def _text_segment(self, text: str) -> Segment:
        ids = self.llama_tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
        return Segment(ids=ids.long())

    def _wrap_segments(self, img_embeds: torch.Tensor, prompt: str) -> List[List[Segment]]:
        """[p_before | visual | p_after] per sample, p_before/p_after tokenised without BOS."""
        if not prompt:
            return [[Segment(embeds=e)] for e in img_embeds]
        p_before, p_after = prompt.split(IMAGE_PATCH_TOKEN)
        before, after = self._text_segment(p_before), self._text_segment(p_after)
        return [[before, Segment(embeds=e), after] for e in img_embeds]

    def _merge(self, samples: Sequence[Sequence[Segment]], padding_side: str = "right",
               pad_token_id: Optional[int] = None) -> MergedInputs:
        return merge_segments(samples, self.embed_tokens, dtype=self.llm_dtype, device=self.device,
                              padding_side=padding_side, pad_token_id=pad_token_id)

    def caption_inputs(self, samples: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        """The caption path's LLM inputs: [BOS] + wrapped visual tokens + caption + end_sym."""
        image = samples["image"]
        img_embeds, _, _ = self.encode_visual_for_training(image, bool(samples.get(FEATURES_KEY)))
        # One prompt for the whole batch, drawn with Python's random (the original's rule).
        prompt = random.choice(self.prompt_list) if self.prompt_list else ""
        wrapped = self._wrap_segments(img_embeds, prompt)
        self.llama_tokenizer.padding_side = "right"
        text = [t + self.end_sym for t in samples["text_input"]]
        tokens = self.llama_tokenizer(
            text, return_tensors="pt", padding="longest", truncation=True, max_length=self.max_txt_len, add_special_tokens=False
        )
        ids, mask = tokens["input_ids"], tokens["attention_mask"]
        targets = ids.masked_fill(ids == self.llama_tokenizer.pad_token_id, -100)
        bos = Segment(ids=torch.tensor([self.llama_tokenizer.bos_token_id]))
        rows = [[bos, *w, Segment(ids=ids[i], mask=mask[i], labels=targets[i])] for i, w in enumerate(wrapped)]
        merged = self._merge(rows, pad_token_id=self.llama_tokenizer.pad_token_id)
        return merged._asdict()

    def instruct_inputs(self, samples: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        """The instruction path: each sample's run of ``<ImageHere>`` ids becomes its visual tokens."""
        image = samples["images"]
        input_ids = samples["input_ids"]
        img_embeds, _, num_patch_tokens = self.encode_visual_for_training(image, bool(samples.get(FEATURES_KEY)))
        rows = []
        for i, cur_ids in enumerate(input_ids):
            positions = torch.where(cur_ids == self.IMAGE_PATCH_TOKEN_ID)[0]
            if len(positions) != num_patch_tokens:
                raise PromptError(
                    f"sample {i}: {len(positions)} {IMAGE_PATCH_TOKEN} tokens, expected {num_patch_tokens} "
                    "(num_video_query_token of the dataset and the model must agree)"
                )
            start = int(positions[0])
            if not torch.equal(positions, torch.arange(start, start + num_patch_tokens, device=positions.device)):
                raise PromptError(f"sample {i}: the {IMAGE_PATCH_TOKEN} tokens must be consecutive")
            rows.append(segments_from_ids(cur_ids, self.IMAGE_PATCH_TOKEN_ID, [img_embeds[i]],
                                          attention_mask=samples["attention_mask"][i], labels=samples["labels"][i],
                                          where=f"sample {i}"))
        merged = self._merge(rows, pad_token_id=self.llama_tokenizer.pad_token_id)
        return {"inputs_embeds": merged.inputs_embeds, "attention_mask": samples["attention_mask"],
                "labels": samples["labels"]}

    def forward(self, samples: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        """Training/eval loss. ``samples``: caption batch {image, text_input} or instruction batch
        {images, input_ids, labels, attention_mask, conv_type="multi"} (``prepare_batch`` makes the
        latter from the datasets' conversations). Returns {"loss", "num_tokens", "seq_len"}."""
        if samples.get("conv_type") == "multi":
            if self.train_flag == 2:
                raise ConfigError("training both branches at once is not supported on instruction data (train_flag 2)")
            if "input_ids" not in samples:
                samples = self.prepare_batch(samples)
            inputs = self.instruct_inputs(samples)
        else:
            inputs = self.caption_inputs(samples)
        with self.maybe_autocast(inputs["inputs_embeds"].device):
            outputs = self.llama_model(
                inputs_embeds=inputs["inputs_embeds"],
                attention_mask=inputs["attention_mask"],
                labels=inputs["labels"],
                return_dict=True,
            )
        num_tokens = (inputs["labels"][:, 1:] != -100).sum()
        return {"loss": outputs.loss, "num_tokens": num_tokens, "seq_len": inputs["labels"].shape[1]}

    # ------------------------------------------------------------------ generation
    def generation_inputs(self, batch: Dict[str, Any]) -> Tuple[torch.Tensor, torch.Tensor]:
        """The caption path's prompt for evaluation: [BOS] + wrapped visual tokens of ``batch["image"]``
        ((B, 3, T, H, W); images (B, 3, H, W) are one-frame videos) -> (inputs_embeds, mask)."""
        video = batch["image"].to(self.device)
        features = bool(batch.get(FEATURES_KEY))
        if video.dim() == 4 and not features:
            video = video.unsqueeze(2)
        embeds, _ = self.encode_videoQformer_visual(video, features)
        bos = Segment(ids=torch.tensor([self.llama_tokenizer.bos_token_id]))
        wrapped = self._wrap_segments(embeds, self.prompt_list[0] if self.prompt_list else "")
        merged = self._merge([[bos, *w] for w in wrapped], padding_side="left")
        return merged.inputs_embeds, merged.attention_mask

    def decode_caption(self, ids: Sequence[int]) -> str:
        """A generated caption, cut at ``end_sym``."""
        text = self.llama_tokenizer.decode(list(ids), skip_special_tokens=True)
        return text.split(self.end_sym or "\n")[0].strip()

    # ------------------------------------------------------------------ config
    @classmethod
    def from_config(cls, cfg) -> "VideoLLAMA":
        """Build from an OmegaConf node (or dict); unknown keys raise ConfigError."""
        return super().from_config(cfg)


def _audio_array(path: str):
    """ImageBind audio input of ``path`` as a numpy array (run in a child process by ``load_media``)."""
    from videollm.processors.audio import load_and_transform_audio

    return load_and_transform_audio(path, clips_per_video=8).numpy()


class VideoLLaMAProcessor:
    """Video-LLaMA's own processor: dataset conversations -> token ids and labels.

    Datasets emit ``conversations`` (``[{"from": "human"|"gpt", "value"}]``, the medium marked by
    ``<image>`` (LLaVA data) or ``<video>`` (VideoChat data: the first question)) and ``media_msgs``
    (the frame-time sentence, "" for ``*_cn`` data). This expands the marker to the original's
    ``<Image>``/``<Video>`` + N x ``<ImageHere>`` form (with the sentence after ``</Video> ``),
    tokenises with the original's rules (the dataset-side tokenizer: pad := unk, only
    ``<ImageHere>`` added; 512-token cut; the vicuna / llama_v2 label masks, corrected only when
    ``fix_label_mask``) and right-pads. A sample whose ids do not hold exactly N consecutive
    ``<ImageHere>`` ids (no marker, several, or cut at 512 tokens) is dropped and reported as a
    ``bad_annotation`` in ``bad_samples``. Picklable (it runs in DataLoader workers).
    """

    def __init__(self, tokenizer_path: Optional[str], num_tokens: int, template: str, fix_label_mask: bool,
                 prompt_format: str = "original") -> None:
        self.tokenizer_path = tokenizer_path
        self.num_tokens = num_tokens
        self.template = template
        self.fix_label_mask = fix_label_mask
        self.prompt_format = prompt_format
        self._tok = None

    @property
    def tokenizer(self):
        if self._tok is None:
            self._tok = load_dataset_tokenizer(self.tokenizer_path)
        return self._tok

    def __getstate__(self) -> Dict[str, Any]:
        state = dict(self.__dict__)
        state["_tok"] = None
        return state

    def expand(self, turns: Sequence[Dict[str, str]], msg: str) -> List[Dict[str, str]]:
        from videollm.conversation import expand_image_placeholders

        video = "<Video>" + IMAGE_PATCH_TOKEN * self.num_tokens + "</Video> " + msg
        out = expand_image_placeholders(list(turns), self.num_tokens)
        for turn in out:
            turn["value"] = turn["value"].replace("<video>", video)
        return out

    def tokenize(self, turns: Sequence[Dict[str, str]], msg: str = "", fix_label_mask: Optional[bool] = None):
        from videollm.conversation import tokenize_instruct

        fix = self.fix_label_mask or bool(fix_label_mask)
        if self.prompt_format == "chat":
            input_ids, labels = self.tokenize_as_chat(self.expand(turns, msg))
        else:
            input_ids, labels = tokenize_instruct(self.expand(turns, msg), self.tokenizer, self.template, fix)
        patch_id = self.tokenizer.convert_tokens_to_ids(IMAGE_PATCH_TOKEN)
        pos = (input_ids == patch_id).nonzero().flatten()
        n = self.num_tokens
        if len(pos) != n or (n > 0 and int(pos[-1] - pos[0]) != n - 1):
            raise BadInput("bad_annotation",
                           f"{len(pos)} <ImageHere> ids after tokenisation (need {n} consecutive; "
                           "missing <image>, several images, or cut at 512 tokens?)")
        return input_ids, labels

    def tokenize_as_chat(self, turns: Sequence[Dict[str, str]]):
        """``train_prompt_format: chat``: the conversation as the chat's prompt (the template's
        inference form, the system text the chat sets for the medium), with BOS; the answers and
        their end marks are supervised, everything else is -100 (the 512-token cut applies)."""
        from videollm.conversation import INSTRUCT_MAX_LEN
        from videollm.templates import get_template

        template = get_template(self.template)
        kind = "image" if turns and "<Image>" in turns[0]["value"] else "video"
        conv = template.new_conversation(kind)
        tok = self.tokenizer

        def n(text: str) -> int:
            return len(tok(text, truncation=True, max_length=INSTRUCT_MAX_LEN)["input_ids"])

        spans = []
        for turn in turns:
            role = conv.roles[0] if turn["from"].lower() == "human" else conv.roles[1]
            if role == conv.roles[1]:
                conv.append_message(role, None)
                start = n(conv.get_prompt())
                conv.messages[-1][1] = turn["value"]
                spans.append((start, n(conv.get_prompt())))
            else:
                conv.append_message(role, turn["value"])
        ids = tok(conv.get_prompt(), truncation=True, max_length=INSTRUCT_MAX_LEN)["input_ids"]
        input_ids = torch.tensor(ids, dtype=torch.long)
        labels = torch.full_like(input_ids, -100)
        for start, end in spans:
            labels[start:end] = input_ids[start:end]
        return input_ids, labels

    def __call__(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        from videollm.conversation import collate_instruct

        if "conversations" not in batch or "input_ids" in batch:
            return batch
        convs = batch["conversations"]
        msgs = batch.get("media_msgs") or [""] * len(convs)
        fixes = batch.get("fix_label_mask") or [None] * len(convs)
        paths = batch.get("paths") or [f"<sample {i}>" for i in range(len(convs))]
        good, bad = [], list(batch.get("bad_samples", []))
        for i, (turns, msg, fix) in enumerate(zip(convs, msgs, fixes)):
            try:
                ids, labels = self.tokenize(turns, msg, fix)
            except BadInput as exc:
                logger.warning("%s: %s (%s)", paths[i], exc.reason, exc.detail)
                bad.append((paths[i], exc.reason))
                continue
            good.append((i, {"input_ids": ids, "labels": labels, "image": batch["images"][i]}))
        if not good:
            return {"bad_samples": bad, "num_samples": 0}
        out = collate_instruct([s for _, s in good], self.tokenizer.pad_token_id)
        out["bad_samples"] = bad
        out["num_samples"] = len(good)
        if batch.get(FEATURES_KEY):
            out[FEATURES_KEY] = True
        return out
