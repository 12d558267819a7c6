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
"multi"``: dataset-tokenised conversations whose ``<ImageHere>`` runs are replaced by the visual
tokens). ``train_flag`` (0 = video branch trains, 1 = audio branch trains on frames through
ImageBind's vision tower, 3 = inference) follows the two freeze flags of the original.
"""

from __future__ import annotations

import contextlib
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from videollm.errors import CheckpointError, ConfigError, PromptError
from videollm.models.eva_vit import FP32LayerNorm, convert_weights_to_fp16, create_eva_vit_g, load_eva_vit_weights
from videollm.models.qformer import build_qformer
from videollm.registry import registry
from videollm.tokenizer import IMAGE_PATCH_TOKEN, load_model_tokenizer

logger = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parents[1]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Buffers that old checkpoints carry but this model does not have (persistent in the original's
# LLaMA copy / ImageBind): tolerated when loading.
TOLERATED_UNEXPECTED = ("rotary_emb.inv_freq", "modality_preprocessors.text.mask", "log_logit_scale")
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
    # corrected behaviours (off by default: released checkpoints were trained without them)
    fix_label_mask: bool = False
    # the original's default YAML carries a preprocess block (used by builders, not the model)
    preprocess: Dict[str, Any] = field(default_factory=dict)


def _set_trainable(module: nn.Module | nn.Parameter, trainable: bool) -> None:
    params = [module] if isinstance(module, nn.Parameter) else list(module.parameters())
    for p in params:
        p.requires_grad = trainable


def _matches(key: str, prefixes: Sequence[str]) -> bool:
    return any(key.startswith(p) for p in prefixes)


@registry.register_model("video_llama")
class VideoLLAMA(nn.Module):
    """The Video-LLaMA model (vision-language branch, plus the audio branch when equipped)."""

    config_schema = VideoLLAMAConfig
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

        # Tokenizer: pad := unk if none, <ImageHere> and <AudioHere> added; the LLM is NOT resized.
        self.llama_tokenizer = load_model_tokenizer(cfg.tokenizer if cfg.tokenizer is not None else cfg.llama_model)
        self.IMAGE_PATCH_TOKEN_ID = self.llama_tokenizer.convert_tokens_to_ids(IMAGE_PATCH_TOKEN)
        self.AUDIO_PATCH_TOKEN_ID = self.llama_tokenizer.convert_tokens_to_ids("<AudioHere>")

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

        self._load_checkpoints(cfg)
        if cfg.vit_precision == "fp16":
            convert_weights_to_fp16(self.visual_encoder)
        elif cfg.vit_precision != "fp32":
            raise ConfigError(f"model.vit_precision: '{cfg.vit_precision}' is not supported; use fp16 or fp32")
        self._apply_freezing(cfg)

    # ------------------------------------------------------------------ construction helpers
    @staticmethod
    def _build_llm(cfg: VideoLLAMAConfig) -> nn.Module:
        import transformers

        if cfg.llm_dtype not in DTYPES:
            raise ConfigError(f"model.llm_dtype: '{cfg.llm_dtype}' unknown; choose one of {sorted(DTYPES)}")
        dtype = DTYPES[cfg.llm_dtype]
        if cfg.llama_model:
            path = Path(cfg.llama_model)
            if not (path / "config.json").is_file():
                raise ConfigError(
                    f"model.llama_model: {path} is not a Hugging Face model folder (no config.json); "
                    "for Vicuna v0 apply the delta first with apply_delta.py"
                )
            kwargs: Dict[str, Any] = {"dtype": dtype}
            if cfg.low_resource or cfg.load_in_4bit:
                kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
                    load_in_8bit=cfg.low_resource and not cfg.load_in_4bit,
                    load_in_4bit=cfg.load_in_4bit,
                    bnb_4bit_compute_dtype=torch.float16,
                )
                kwargs["device_map"] = {"": cfg.device_8bit}
            if cfg.device_map:
                kwargs["device_map"] = cfg.device_map
            return transformers.AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
        if not cfg.llm_config:
            raise ConfigError("model.llama_model: empty; give a LLaMA folder, or llm_config for random weights")
        llm_kwargs = dict(cfg.llm_config)
        model_type = llm_kwargs.pop("model_type", "llama")
        config = transformers.AutoConfig.for_model(model_type, **llm_kwargs)
        return transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)

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

    def _apply_freezing(self, cfg: VideoLLAMAConfig) -> None:
        """The one place that decides what trains (the original's freeze flags)."""
        _set_trainable(self.visual_encoder, not cfg.freeze_vit)
        _set_trainable(self.ln_vision, not cfg.freeze_vit)
        _set_trainable(self.Qformer, not cfg.freeze_qformer)
        _set_trainable(self.query_tokens, not cfg.freeze_qformer)
        _set_trainable(self.llama_model, not cfg.freeze_llm)
        _set_trainable(self.llama_proj, not cfg.frozen_llama_proj)
        video = not cfg.frozen_video_Qformer
        for part in (self.video_Qformer, self.video_frame_position_embedding, self.video_query_tokens):
            _set_trainable(part, video)
        if self.equip_audio_branch:
            _set_trainable(self.audio_encoder, False)
            audio = not cfg.frozen_audio_Qformer
            for part in (self.audio_Qformer, self.audio_query_tokens, self.audio_llama_proj, self.audio_position_embedding):
                _set_trainable(part, audio)
        if cfg.llm_grad_checkpointing and hasattr(self.llama_model, "gradient_checkpointing_enable"):
            self.llama_model.gradient_checkpointing_enable()
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
        if cfg.q_former_model:
            state = load_model_state(cfg.q_former_model)
            wanted = ("Qformer.", "query_tokens", "ln_vision.")
            self.load_branch(state, source=cfg.q_former_model, provides=wanted, ignore_others=True)
        if cfg.llama_proj_model:
            state = load_model_state(cfg.llama_proj_model)
            self.load_branch(state, source=cfg.llama_proj_model, provides=("llama_proj.",), ignore_others=True)
        if cfg.ckpt:
            self.load_branch(load_model_state(cfg.ckpt), source=cfg.ckpt, provides=VIDEO_BRANCH)
        if cfg.ckpt_2:
            self.load_branch(load_model_state(cfg.ckpt_2), source=cfg.ckpt_2, provides=AUDIO_BRANCH)

    def load_branch(
        self,
        state: Dict[str, torch.Tensor],
        *,
        source: str,
        provides: Sequence[str],
        ignore_others: bool = False,
        strict: Optional[bool] = None,
    ) -> Tuple[List[str], List[str]]:
        """Load a partial state dict (the original's ``load_state_dict(strict=False)``), checked.

        ``provides``: key prefixes the file must supply (e.g. the video branch for ``ckpt``);
        any of the model's keys under them that the file lacks is an error when strict.
        Keys the model does not have are an error too, except buffers old checkpoints carry
        (rotary ``inv_freq``, ImageBind's text mask and logit scales), or any key when
        ``ignore_others`` (e.g. the BLIP-2 file's text-side weights). Returns (missing, unexpected).
        """
        from videollm.checkpoint import report_load

        strict = self.cfg.strict_load if strict is None else strict
        own = self.state_dict()
        if ignore_others:  # e.g. BLIP-2's text-side Q-Former weights, which this model deletes
            state = {k: v for k, v in state.items() if _matches(k, provides) and k in own}
        for key, value in state.items():
            if key in own and tuple(own[key].shape) != tuple(value.shape):
                raise CheckpointError(
                    f"{source}: {key} has shape {tuple(value.shape)} but the model expects "
                    f"{tuple(own[key].shape)}; is the checkpoint for another LLM size or config?"
                )
        result = self.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if _matches(k, provides)]
        unexpected = list(result.unexpected_keys)
        report_load(
            missing,
            unexpected,
            expected_missing_prefixes=(),
            expected_unexpected_patterns=TOLERATED_UNEXPECTED,
            strict=strict,
            source=source,
        )
        return missing, unexpected

    # ------------------------------------------------------------------ encoders
    def maybe_autocast(self, device: torch.device):
        """fp16 autocast on CUDA, as the original (``run.amp_dtype`` may ask for bf16); none on CPU."""
        if device.type == "cuda":
            dtype = getattr(self, "autocast_dtype", torch.float16)
            return torch.autocast("cuda", dtype=dtype)
        return contextlib.nullcontext()

    @property
    def device(self) -> torch.device:
        return self.llama_proj.weight.device

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.llama_model.get_input_embeddings()(ids)

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

    def encode_videoQformer_visual(self, image: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Video (B, 3, T, H, W) -> LLM inputs (B, num_video_query_token, H_llm) and mask (B, Qv)."""
        device = image.device
        batch, _, frames, height, width = image.shape
        if frames > self.video_frame_position_embedding.num_embeddings:
            raise PromptError(
                f"video has {frames} frames but max_frame_pos is "
                f"{self.video_frame_position_embedding.num_embeddings}; sample fewer frames"
            )
        x = image.permute(0, 2, 1, 3, 4).reshape(batch * frames, -1, height, width)
        with self.maybe_autocast(device):
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

    def encode_visual_for_training(self, image: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, int]:
        """The branch chosen by ``train_flag``: returns (embeds, mask, number of tokens)."""
        if image.dim() == 4:  # images are one-frame videos
            image = image.unsqueeze(2)
        if self.train_flag == 1:
            embeds, atts = self.encode_audioQformer(image.permute(0, 2, 1, 3, 4), modality_type="vision")
            return embeds, atts, self.num_audio_query_token
        embeds, atts = self.encode_videoQformer_visual(image)
        return embeds, atts, self.num_video_query_token

    # ------------------------------------------------------------------ training forward
    def prompt_wrap(self, img_embeds: torch.Tensor, atts_img: torch.Tensor, prompt: str):
        """[p_before | visual | p_after], p_before/p_after tokenised without BOS."""
        if not prompt:
            return img_embeds, atts_img
        batch = img_embeds.shape[0]
        p_before, p_after = prompt.split(IMAGE_PATCH_TOKEN)
        device = img_embeds.device
        before = self.llama_tokenizer(p_before, return_tensors="pt", add_special_tokens=False)["input_ids"].to(device)
        after = self.llama_tokenizer(p_after, return_tensors="pt", add_special_tokens=False)["input_ids"].to(device)
        wrapped = torch.cat(
            [self.embed_tokens(before).expand(batch, -1, -1), img_embeds, self.embed_tokens(after).expand(batch, -1, -1)],
            dim=1,
        )
        return wrapped, atts_img[:, :1].expand(-1, wrapped.shape[1])

    def caption_inputs(self, samples: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        """The caption path's LLM inputs: inputs_embeds, attention_mask, labels."""
        image = samples["image"]
        img_embeds, atts_img, _ = self.encode_visual_for_training(image)
        if self.prompt_list:
            # One prompt for the whole batch, drawn with Python's random (the original's rule).
            img_embeds, atts_img = self.prompt_wrap(img_embeds, atts_img, random.choice(self.prompt_list))
        self.llama_tokenizer.padding_side = "right"
        text = [t + self.end_sym for t in samples["text_input"]]
        tokens = self.llama_tokenizer(
            text, return_tensors="pt", padding="longest", truncation=True, max_length=self.max_txt_len, add_special_tokens=False
        )
        ids, mask = tokens["input_ids"].to(image.device), tokens["attention_mask"].to(image.device)
        targets = ids.masked_fill(ids == self.llama_tokenizer.pad_token_id, -100)
        empty = torch.full((atts_img.shape[0], atts_img.shape[1] + 1), -100, dtype=torch.long, device=image.device)
        targets = torch.cat([empty, targets], dim=1)
        bos = torch.full((img_embeds.shape[0], 1), self.llama_tokenizer.bos_token_id, dtype=torch.long, device=image.device)
        inputs_embeds = torch.cat([self.embed_tokens(bos), img_embeds.to(self._llm_dtype()), self.embed_tokens(ids)], dim=1)
        attention_mask = torch.cat([atts_img[:, :1], atts_img, mask], dim=1)
        return {"inputs_embeds": inputs_embeds, "attention_mask": attention_mask, "labels": targets}

    def instruct_inputs(self, samples: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        """The instruction path: replace each sample's run of ``<ImageHere>`` ids by its visual tokens."""
        image = samples["images"]
        input_ids = samples["input_ids"]
        img_embeds, _, num_patch_tokens = self.encode_visual_for_training(image)
        temp_ids = input_ids.clone()
        temp_ids[temp_ids == self.IMAGE_PATCH_TOKEN_ID] = 0  # out of the LLM vocabulary: id 0 first
        embeds = self.embed_tokens(temp_ids)
        new_embeds = []
        for i, (cur_ids, cur_embeds) in enumerate(zip(input_ids, embeds)):
            positions = torch.where(cur_ids == self.IMAGE_PATCH_TOKEN_ID)[0]
            if len(positions) != num_patch_tokens:
                raise PromptError(
                    f"sample {i}: {len(positions)} {IMAGE_PATCH_TOKEN} tokens, expected {num_patch_tokens} "
                    "(num_video_query_token of the dataset and the model must agree)"
                )
            start = int(positions[0])
            if not torch.equal(positions, torch.arange(start, start + num_patch_tokens, device=positions.device)):
                raise PromptError(f"sample {i}: the {IMAGE_PATCH_TOKEN} tokens must be consecutive")
            new_embeds.append(
                torch.cat([cur_embeds[:start], img_embeds[i].to(cur_embeds.dtype), cur_embeds[start + num_patch_tokens :]])
            )
        return {
            "inputs_embeds": torch.stack(new_embeds),
            "attention_mask": samples["attention_mask"],
            "labels": samples["labels"],
        }

    def _llm_dtype(self) -> torch.dtype:
        return self.llama_model.get_input_embeddings().weight.dtype

    def forward(self, samples: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        """Training/eval loss. ``samples``: caption batch {image, text_input} or
        instruction batch {images, input_ids, labels, attention_mask, conv_type="multi"}.
        Returns {"loss", "num_tokens" (supervised tokens)}."""
        if samples.get("conv_type") == "multi":
            if self.train_flag == 2:
                raise ConfigError("training both branches at once is not supported on instruction data (train_flag 2)")
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
    @torch.no_grad()
    def generate(self, inputs_embeds: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, **kwargs) -> torch.Tensor:
        """Generate from prompt embeddings (B, L, H_llm); returns the NEW token ids (B, n)."""
        if attention_mask is None:
            attention_mask = torch.ones(inputs_embeds.shape[:2], dtype=torch.long, device=inputs_embeds.device)
        kwargs.setdefault("pad_token_id", self.llama_tokenizer.pad_token_id)
        with self.maybe_autocast(inputs_embeds.device):
            out = self.llama_model.generate(
                inputs_embeds=inputs_embeds.to(self._llm_dtype()), attention_mask=attention_mask, **kwargs
            )
        return out

    # ------------------------------------------------------------------ config
    @classmethod
    def from_config(cls, cfg) -> "VideoLLAMA":
        """Build from an OmegaConf node (or dict); unknown keys raise ConfigError."""
        from omegaconf import OmegaConf

        from videollm.config import validate_mapping, with_defaults

        values = OmegaConf.to_container(cfg, resolve=True) if not isinstance(cfg, dict) else dict(cfg)
        validate_mapping(values, VideoLLAMAConfig, "model")
        return cls(VideoLLAMAConfig(**with_defaults(values, VideoLLAMAConfig)))

    def trainable_state_dict(self) -> Dict[str, torch.Tensor]:
        """The original's checkpoint ``model`` entry: trainable parameters plus ALL buffers."""
        frozen = {n for n, p in self.named_parameters() if not p.requires_grad}
        return {k: v for k, v in self.state_dict().items() if k not in frozen}
