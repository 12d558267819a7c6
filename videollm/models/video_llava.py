"""Video-LLaVA (PKU-YuanGroup, "Learning United Visual Representation by Alignment Before
Projection") through transformers' own ``VideoLlavaForConditionalGeneration``.

Registered as ``video_llava``. The network is transformers' class, not a re-implementation: two
CLIP ViT-L/14-224 towers (``image_tower``, ``video_tower``, separate weights), one shared
two-layer GELU projector (``multi_modal_projector.linear_1/linear_2``, 1024 -> 4096 -> 4096) and a
LLaMA/Vicuna-7B decoder. What this file adds is the contract of
:class:`videollm.models.base.VideoLLM` around it: our own input processing (no torchvision),
the prompt formats, the model-owned batch processor, freeze plans, LoRA and 8/4-bit loading.

Forward pass (shapes at full size; the tiny preset is 32 px, patch 8)::

    image (3, 224, 224) -> image_tower, hidden_states[-2]            (1, 1+256, 1024)
        drop CLS ("default" strategy)                                (1, 256, 1024)
    video (3, T=8, 224, 224) -> frames (T, 3, 224, 224) -> video_tower,
        hidden_states[-2], CLS KEPT                                  (T, 257, 1024)
        -> flattened frame-major                                     (T*257 = 2056, 1024)
    either -> multi_modal_projector (linear_1, GELU, linear_2)       (n, 4096)
    text ids with one <image>/<video> id per medium (or the processor's expanded runs)
        -> segments (text ids | medium embeddings) -> merge_segments (the one merge path)
        -> inputs_embeds (B, L, 4096), attention_mask, labels
        -> the VLM's decoder and lm_head (transformers' forward with inputs_embeds) -> logits

``encode_media`` calls transformers' own ``get_image_features`` / ``get_video_features``, so the
features are the ones transformers computes; the tests check our whole path against
``VideoLlavaForConditionalGeneration(input_ids, pixel_values, pixel_values_videos)`` itself.

Where the LLM is (``llm_attr``): the attribute ``video_llava`` holds the WHOLE transformers
model. transformers 5 splits the language model into a ``LlamaModel`` inside ``model`` and the
``lm_head`` outside it, so there is no inner causal LM to hand over; the VLM is itself a causal
LM with ``generate(inputs_embeds=...)``, ``get_input_embeddings`` and ``from_pretrained(...,
quantization_config=...)``, which is all the contract asks of ``language_model``. LoRA wraps the
whole VLM with PEFT and targets only the decoder's linear layers by a regular expression
(:data:`LLM_LINEAR_REGEX`: q/k/v/o and gate/up/down projections of ``language_model.layers``,
the original's ``find_all_linear_names``, which skips the towers, the projector and lm_head);
8/4-bit loading quantises only the decoder (``llm_int8_skip_modules``: towers, projector,
lm_head), as the original loads its towers unquantised.

State-dict names: ours are ``video_llava.`` + transformers 5's names (``model.image_tower.*``,
``model.video_tower.*``, ``model.multi_modal_projector.linear_{1,2}.*``,
``model.language_model.*``, ``lm_head.weight``). Model folders load through transformers'
``from_pretrained`` in both layouts: the one transformers 5 writes, and the published
``LanguageBind/Video-LLaVA-7B-hf`` layout (``language_model.model.*``,
``language_model.lm_head.weight``, ``image_tower.vision_model.*``, ``video_tower.vision_model.*``,
``multi_modal_projector.linear_{1,2}.*``; vocabulary 32064 with ``<image>`` 32000, ``<video>``
32001, ``<pad>`` 32002). A bare state dict in any of the three namings loads through
:meth:`VideoLLaVA.load_weights` (:data:`KEY_RENAMES`). :meth:`VideoLLaVA.save_pretrained` writes
a folder transformers loads (tokenizer included; LoRA merged first if present).

Input processing (:func:`clip_preprocess`, :func:`linspace_indices`): 8 frames at
``np.linspace(0, n - 1, 8)`` (the original's ``LanguageBindVideoProcessor``), each frame resized
so its shortest side is 224 (PIL bicubic), centre-cropped to 224, scaled to 0..1 and normalised
with OpenAI CLIP's mean/std: what transformers' ``CLIPImageProcessor`` / ``VideoLlavaImageProcessor``
do (tested against them). The original applies ``RandomHorizontalFlip(p=0.5)`` even at
inference; here that is ``model.random_flip`` (off by default). The processor's placeholder
expansion (:meth:`VideoLLaVAProcessor.expand`: one ``<image>`` -> 256 ids, one ``<video>`` ->
257 x frames) gives the ids transformers' processor gives.
"""

from __future__ import annotations

import logging
import os
import random
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from videollm.conversation import Conversation, SeparatorStyle
from videollm.datasets.bad_samples import BadInput
from videollm.errors import ConfigError, PromptError
from videollm.models.base import FreezePlan, Media, VideoLLM, WeightSource
from videollm.models.merge import IGNORE_INDEX, MergedInputs, Segment, merge_segments
from videollm.processors.transforms import CLIP_MEAN, CLIP_STD
from videollm.registry import registry
from videollm.templates import ChatTemplate, TEMPLATES, register_template

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<video>"
PAD_TOKEN = "<pad>"
# The decoder's linear layers (the original's find_all_linear_names: not the towers, the projector, lm_head).
LLM_LINEAR_REGEX = r".*language_model\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))"
# Bare state dicts: the -hf legacy names and transformers 5's names -> ours.
KEY_RENAMES: Tuple[Tuple[str, str], ...] = (
    (r"^language_model\.lm_head\.", "video_llava.lm_head."),
    (r"^language_model\.model\.", "video_llava.model.language_model."),
    (r"^(image|video)_tower\.vision_model\.", r"video_llava.model.\1_tower."),
    (r"^(image|video)_tower\.", r"video_llava.model.\1_tower."),
    (r"^multi_modal_projector\.", "video_llava.model.multi_modal_projector."),
    (r"^model\.", "video_llava.model."),
    (r"^lm_head\.", "video_llava.lm_head."),
)
SKIP_QUANTIZATION = ["model.image_tower", "model.video_tower", "model.multi_modal_projector", "lm_head"]  # matched from the start

# ---------------------------------------------------------------------------------------------
# Prompt formats
# ---------------------------------------------------------------------------------------------

# transformers' documented format: "USER: <video>\n{question} ASSISTANT:", turns joined by " ".
HF_CONVERSATION = Conversation(system="", roles=("USER", "ASSISTANT"), sep_style=SeparatorStyle.TWO, sep=" ",
                               sep2=" ", template="video_llava")
# LLaVA-1.5's conv_vicuna_v1 (what `--version v1` of the training scripts selects) and
# conv_llava_v1 (the original CLI's conv_mode): the same format, two system texts.
VICUNA_V1_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                    "The assistant gives helpful, detailed, and polite answers to the user's questions.")
LLAVA_V1_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                   "The assistant gives helpful, detailed, and polite answers to the human's questions.")
_MEDIA = {"video": VIDEO_TOKEN, "image": IMAGE_TOKEN}


def _register_templates() -> None:
    protos = {
        "video_llava": HF_CONVERSATION,
        "vicuna_v1": Conversation(system=VICUNA_V1_SYSTEM, roles=("USER", "ASSISTANT"), sep_style=SeparatorStyle.TWO,
                                  sep=" ", sep2="</s>", template="vicuna_v1"),
        "llava_v1": Conversation(system=LLAVA_V1_SYSTEM, roles=("USER", "ASSISTANT"), sep_style=SeparatorStyle.TWO,
                                 sep=" ", sep2="</s>", template="llava_v1"),
    }
    for name, conv in protos.items():
        if name in TEMPLATES:
            continue
        register_template(ChatTemplate(
            name=name, conversation=conv, training_conversation=conv, placeholder=IMAGE_TOKEN,
            media_messages=dict(_MEDIA), media_system={}, media_markers=(VIDEO_TOKEN, IMAGE_TOKEN),
            question_join="\n", stop="</s>", stop_on_eos=True,
        ))


_register_templates()
TRAIN_TEMPLATES = ("vicuna_v1", "llava_v1", "video_llava")


# ---------------------------------------------------------------------------------------------
# Media processing (no torchvision)
# ---------------------------------------------------------------------------------------------


def linspace_indices(num_frames: int, n: int = 8) -> List[int]:
    """The original's frame choice: ``np.linspace(0, num_frames - 1, n, dtype=int)``."""
    if num_frames <= 0:
        raise ValueError(f"linspace_indices: num_frames={num_frames} must be positive")
    return np.linspace(0, num_frames - 1, n, dtype=int).tolist()


def clip_preprocess(frames: Any, size: int = 224, crop: Optional[int] = None, *, flip: bool = False,
                    mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> torch.Tensor:
    """uint8 RGB frames ``(N, H, W, 3)`` (array/tensor) or PIL images -> ``(N, 3, crop, crop)`` float32.

    Shortest side to ``size`` with PIL bicubic (long side ``int(size * long / short)``), centre crop
    ``crop`` (default ``size``; offsets ``(h - crop) // 2``), /255, CLIP mean/std: the steps of
    transformers' CLIP image processor. ``flip`` mirrors every frame left-right (the original's
    inference-time RandomHorizontalFlip, when it fires).
    """
    from PIL import Image

    crop = size if crop is None else crop
    if isinstance(frames, Image.Image):
        frames = [frames]
    if isinstance(frames, torch.Tensor):
        frames = frames.cpu().numpy()
    out = []
    for frame in frames:
        img = frame if isinstance(frame, Image.Image) else Image.fromarray(np.asarray(frame, dtype=np.uint8))
        img = img.convert("RGB")
        w, h = img.size
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = size, int(size * long / short)
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        if (new_w, new_h) != (w, h):
            img = img.resize((new_w, new_h), resample=Image.BICUBIC)
        arr = np.asarray(img, dtype=np.uint8)
        if crop > new_h or crop > new_w:
            raise PromptError(f"clip_preprocess: frame {new_w}x{new_h} is smaller than the crop {crop}")
        top, left = (new_h - crop) // 2, (new_w - crop) // 2
        out.append(arr[top:top + crop, left:left + crop])
    x = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 255.0
    if flip:
        x = x.flip(-1)
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - m) / s


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


@dataclass
class VideoLLaVAConfig:
    """Every key of ``model:`` for ``arch: video_llava``."""

    arch: str = "video_llava"
    model_type: str = "7b"
    # weights: a transformers folder (either layout); empty -> random weights from hf_config
    model_path: str = ""
    hf_config: Dict[str, Any] = field(default_factory=dict)  # VideoLlavaConfig kwargs (vision_config, text_config, ...)
    tokenizer: Optional[str] = None  # folder (default: model_path); "tiny": the built-in tokenizer + the 3 added tokens
    dtype: str = "fp16"
    attn_implementation: Optional[str] = None  # "sdpa", "eager", "flash_attention_2"
    low_resource: bool = False  # 8-bit decoder (bitsandbytes), the original CLI's --load-8bit
    load_in_4bit: bool = False  # NF4 decoder, --load-4bit
    device_8bit: int = 0
    device_map: Optional[str] = None
    ckpt: str = ""  # a training checkpoint (.pth, the ``model`` entry of train.py) loaded after the weights
    strict_load: bool = True
    # training: what trains (see freeze_plan)
    tune_mm_mlp_adapter: bool = False  # stage 1: only the projector
    freeze_llm: bool = False
    freeze_towers: bool = True  # the LanguageBind towers are always frozen in the original
    lora: Dict[str, Any] = field(default_factory=dict)  # {r, alpha, dropout, target_modules}; target default LLM_LINEAR_REGEX
    # the projector's lr as a multiple of run.init_lr (the original LoRA recipe: --mm_projector_lr 2e-5
    # at --learning_rate 2e-4, i.e. 0.1); applied by the optimizer's per-group lr_scale
    mm_projector_lr_scale: float = 1.0
    llm_grad_checkpointing: bool = False
    conv_template: str = "vicuna_v1"  # training prompts: vicuna_v1 (`--version v1`), llava_v1, video_llava
    chat_template: str = "video_llava"  # the chat's default: transformers' documented format
    max_length: int = 2048  # model_max_length: longer merged samples are cut (the original's truncation)
    # media
    num_frames: int = 8
    image_size: int = 0  # processing size; 0 = the vision tower's image_size
    random_flip: bool = False  # the original's inference-time RandomHorizontalFlip(p=0.5)


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


def tiny_tokenizer_dir() -> Path:
    """The built-in tiny SentencePiece tokenizer as a LLaMA folder with ``<image>``, ``<video>``,
    ``<pad>`` added in that order (ids 512, 513, 514), written once per process."""
    global _TINY_DIR
    if _TINY_DIR is None or not (_TINY_DIR / "tokenizer_config.json").is_file():
        import transformers

        from videollm.testing import write_llama_auto_tokenizer

        out = Path(tempfile.mkdtemp(prefix="videollava_tiny_tok_"))
        write_llama_auto_tokenizer(out)
        tok = transformers.AutoTokenizer.from_pretrained(str(out))
        add_video_llava_tokens(tok)
        tok.save_pretrained(str(out))
        _TINY_DIR = out
    return _TINY_DIR


_TINY_DIR: Optional[Path] = None


def add_video_llava_tokens(tok) -> None:
    """Add ``<image>``, ``<video>`` (special) and ``<pad>`` as the -hf conversion did; left padding."""
    vocab = tok.get_vocab()
    for t in (IMAGE_TOKEN, VIDEO_TOKEN):
        if t not in vocab:
            tok.add_tokens([t], special_tokens=True)
    if PAD_TOKEN not in tok.get_vocab():
        tok.add_special_tokens({"pad_token": PAD_TOKEN})
    elif tok.pad_token is None:
        tok.pad_token = PAD_TOKEN
    tok.padding_side = "left"


def load_tokenizer(path: Optional[str]):
    """The tokenizer as transformers' processor loads it (``AutoTokenizer``, the folder's own
    settings); the three tokens are added when the folder lacks them."""
    import transformers

    if path in (None, "", "tiny"):
        path = str(tiny_tokenizer_dir())
    folder = Path(path)
    if not folder.is_dir():
        raise ConfigError(f"model.tokenizer: {folder} does not exist (a tokenizer folder, or 'tiny')")
    try:
        tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"model.tokenizer: cannot load a tokenizer from {folder}: {exc}") from exc
    add_video_llava_tokens(tok)
    return tok


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


@registry.register_model("video_llava")
class VideoLLaVA(VideoLLM):
    """Video-LLaVA: transformers' ``VideoLlavaForConditionalGeneration`` behind the contract."""

    arch = "video_llava"
    config_schema = VideoLLaVAConfig
    llm_attr = "video_llava"
    media_placeholder = IMAGE_TOKEN
    token_count = "per_frame"
    tolerated_unexpected = (r"rotary_emb\.inv_freq",)
    weight_keys = {"model_path": "a Video-LLaVA transformers folder (e.g. Video-LLaVA-7B-hf)",
                   "ckpt": "a training checkpoint (.pth)"}
    PRETRAINED_MODEL_CONFIG_DICT = {
        "7b": "configs/models/video_llava_7b.yaml",
        "tiny": "configs/models/video_llava_tiny.yaml",
    }

    def __init__(self, cfg: VideoLLaVAConfig) -> None:
        super().__init__()
        self.cfg = cfg
        if cfg.conv_template not in TRAIN_TEMPLATES:
            raise ConfigError(f"model.conv_template: {cfg.conv_template!r}; choose one of {TRAIN_TEMPLATES}")
        if cfg.chat_template not in TEMPLATES:
            raise ConfigError(f"model.chat_template: {cfg.chat_template!r} is not a registered chat template")
        if cfg.dtype not in DTYPES:
            raise ConfigError(f"model.dtype: {cfg.dtype!r}; choose one of {sorted(DTYPES)}")
        if cfg.num_frames < 1:
            raise ConfigError(f"model.num_frames: {cfg.num_frames} must be >= 1")
        self.default_template = cfg.chat_template
        self._tokenizer = load_tokenizer(cfg.tokenizer if cfg.tokenizer is not None else cfg.model_path)
        self.video_llava = self._build(cfg)
        hf_cfg = self.hf.config
        self.image_token_id = int(hf_cfg.image_token_index)
        self.video_token_id = int(hf_cfg.video_token_index)
        for tok_name, want in ((IMAGE_TOKEN, self.image_token_id), (VIDEO_TOKEN, self.video_token_id)):
            got = self._tokenizer.convert_tokens_to_ids(tok_name)
            if got != want:
                raise ConfigError(f"model.tokenizer: {tok_name} is id {got} but the model's config says {want}; "
                                  "tokenizer and weights do not belong together")
        vision = hf_cfg.vision_config
        self.image_size = int(cfg.image_size or vision.image_size)
        self.patches = (int(vision.image_size) // int(vision.patch_size)) ** 2
        if cfg.lora:
            from videollm.models.lora import LoRAConfig, apply_lora

            values = dict(cfg.lora)
            values.setdefault("target_modules", LLM_LINEAR_REGEX)
            apply_lora(self, self.llm_attr, LoRAConfig.from_dict(values))
        if cfg.ckpt:
            from videollm.checkpoint import load_model_state

            self.load_weights(load_model_state(cfg.ckpt), WeightSource(cfg.ckpt, provides=(), strict=cfg.strict_load))
        self.apply_freeze_plan()
        if cfg.llm_grad_checkpointing:
            from videollm.models.llm import enable_gradient_checkpointing

            enable_gradient_checkpointing(self.hf)

    # ------------------------------------------------------------------ building
    @staticmethod
    def _build(cfg: VideoLLaVAConfig) -> nn.Module:
        import transformers

        dtype = DTYPES[cfg.dtype]
        extra: Dict[str, Any] = {}
        if cfg.attn_implementation:
            extra["attn_implementation"] = cfg.attn_implementation
        if cfg.model_path:
            folder = Path(cfg.model_path)
            if not (folder / "config.json").is_file():
                raise ConfigError(f"model.model_path: {folder} is not a transformers model folder (no config.json)")
            from videollm.models.llm import _cuda_target, _require_bitsandbytes, quantization_config

            kwargs: Dict[str, Any] = {"dtype": dtype, **extra}
            on_cuda = _cuda_target(cfg.device_map, cfg.device_8bit)
            quant = quantization_config(load_in_8bit=cfg.low_resource, load_in_4bit=cfg.load_in_4bit, dtype=dtype,
                                        on_cuda=on_cuda)
            if quant is not None:
                _require_bitsandbytes("model.low_resource/load_in_4bit")
                quant.llm_int8_skip_modules = list(SKIP_QUANTIZATION)
                kwargs["quantization_config"] = quant
                kwargs["device_map"] = {"": cfg.device_8bit if on_cuda else "cpu"}
            if cfg.device_map:
                kwargs["device_map"] = cfg.device_map
            try:
                return transformers.VideoLlavaForConditionalGeneration.from_pretrained(str(folder), **kwargs)
            except (OSError, ValueError, KeyError) as exc:
                raise ConfigError(f"model.model_path: cannot load Video-LLaVA from {folder}: {exc}") from exc
        if not cfg.hf_config:
            raise ConfigError("model.model_path: empty; give a Video-LLaVA folder, or hf_config for random weights")
        if cfg.low_resource or cfg.load_in_4bit:
            logger.warning("model: random weights: 8-bit/4-bit loading applies only to a model folder")
        try:
            hf_cfg = transformers.VideoLlavaConfig(**dict(cfg.hf_config))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"model.hf_config: {exc}") from exc
        if cfg.attn_implementation:
            hf_cfg._attn_implementation = cfg.attn_implementation
        return transformers.VideoLlavaForConditionalGeneration(hf_cfg).to(dtype)

    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def hf(self) -> nn.Module:
        """The plain ``VideoLlavaForConditionalGeneration`` (under PEFT's wrapper when LoRA is on)."""
        from videollm.models.lora import is_lora

        m = self.video_llava
        return m.get_base_model() if is_lora(m) else m

    @property
    def device(self) -> torch.device:
        return self.hf.model.multi_modal_projector.linear_1.weight.device

    def llm_is_placed(self) -> bool:
        return bool(self.cfg.low_resource or self.cfg.load_in_4bit or self.cfg.device_map) or super().llm_is_placed()

    # ------------------------------------------------------------------ freezing
    def _prefix(self, module: nn.Module) -> str:
        for name, mod in self.named_modules():
            if mod is module:
                return name + "."
        raise RuntimeError("module not found")

    def freeze_plan(self) -> FreezePlan:
        """What trains, in one place (the original's stages as flags):

        * stage 1 (``tune_mm_mlp_adapter``): only ``multi_modal_projector``;
        * stage 2: the projector and the whole decoder + lm_head (``freeze_llm: false``);
        * LoRA (``lora`` set): the projector and the LoRA matrices;
        * the towers are frozen unless ``freeze_towers: false``.
        """
        cfg = self.cfg
        inner = self.hf.model
        plan = FreezePlan()
        plan.add("", not (cfg.freeze_llm or cfg.tune_mm_mlp_adapter or bool(cfg.lora)), "the decoder and lm_head")
        plan.add([self._prefix(inner.image_tower), self._prefix(inner.video_tower)],
                 not cfg.freeze_towers and not cfg.tune_mm_mlp_adapter, "freeze_towers")
        plan.add(self._prefix(inner.multi_modal_projector), True, "the projector always trains")
        if cfg.lora:
            plan.add([n for n, _ in self.named_parameters() if ".lora_" in n or ".modules_to_save." in n], True,
                     "LoRA adapters (and lora.modules_to_save) train")
        return plan

    def apply_freeze_plan(self) -> Dict[str, int]:
        """As the contract's; 8/4-bit weights (integer storage) stay frozen whatever the plan says."""
        plan = self.freeze_plan()
        counts = {"trainable": 0, "frozen": 0}
        for name, p in self.named_parameters():
            p.requires_grad = plan.trainable(name) and (p.is_floating_point() or p.is_complex())
            counts["trainable" if p.requires_grad else "frozen"] += p.numel()
        logger.info("video_llava freeze plan: %s trainable, %s frozen parameters", f"{counts['trainable']:,}",
                    f"{counts['frozen']:,}")
        return counts

    def lr_scales(self) -> Dict[str, float]:
        """Parameter-name prefix -> lr multiplier of run.init_lr (``mm_projector_lr_scale``); the
        optimizer puts those parameters in groups of their own (``videollm.runners.optim``)."""
        scale = float(self.cfg.mm_projector_lr_scale)
        if scale == 1.0:
            return {}
        return {self._prefix(self.hf.model.multi_modal_projector): scale}

    # ------------------------------------------------------------------ media
    def num_media_tokens(self, medium: Media) -> int:
        if medium.kind == "image":
            return self.patches
        if medium.kind == "video":
            return (self.patches + 1) * int(medium.data.shape[1])
        raise PromptError(f"Video-LLaVA cannot take media of kind {medium.kind!r} (images and videos only)")

    def encode_media(self, media: Sequence[Media], text: Optional[str] = None) -> List[torch.Tensor]:
        """Images (3, S, S) -> (S/p)^2 tokens; videos (3, T, S, S) -> T * ((S/p)^2 + 1) tokens; each
        (n_i, H_llm). Images and videos are encoded in one tower call per kind (transformers'
        ``get_image_features`` / ``get_video_features``). ``text`` is not used."""
        hf = self.hf
        device, dtype = self.device, hf.model.image_tower.embeddings.patch_embedding.weight.dtype
        out: List[Optional[torch.Tensor]] = [None] * len(media)
        images = [i for i, m in enumerate(media) if m.kind == "image"]
        videos = [i for i, m in enumerate(media) if m.kind == "video"]
        other = [m.kind for m in media if m.kind not in ("image", "video")]
        if other:
            raise PromptError(f"Video-LLaVA cannot encode media of kind {other[0]!r} (images and videos only)")
        with self.maybe_autocast(device):
            if images:
                pixels = torch.stack([media[i].data for i in images]).to(device, dtype)  # (N, 3, S, S)
                feats = hf.model.get_image_features(pixel_values=pixels, return_dict=True).pooler_output
                for j, i in enumerate(images):
                    out[i] = feats[j]
            by_frames: Dict[int, List[int]] = {}
            for i in videos:
                by_frames.setdefault(int(media[i].data.shape[1]), []).append(i)
            for frames, idx in by_frames.items():
                clips = torch.stack([media[i].data.permute(1, 0, 2, 3) for i in idx]).to(device, dtype)  # (B, T, 3, S, S)
                feats = hf.model.get_video_features(pixel_values_videos=clips, return_dict=True).pooler_output
                feats = feats.reshape(len(idx), frames * feats.shape[1], feats.shape[-1])  # frame-major
                for j, i in enumerate(idx):
                    out[i] = feats[j]
        return [o for o in out]  # type: ignore[misc]

    def load_media(self, source: Any, kind: str, *, timeout: Optional[float] = 30.0, n_frms: Optional[int] = None,
                   flip: Optional[bool] = None, **options: Any) -> Media:
        """A video file -> ``num_frames`` frames at linspace(0, n-1, T), :func:`clip_preprocess`ed,
        ``(3, T, S, S)``; an image (path or PIL) -> ``(3, S, S)``. ``flip``: the original's random
        horizontal flip (default ``model.random_flip``; drawn with p=0.5 per medium when on)."""
        options.pop("vis_processor", None)
        options.pop("image_processor", None)
        do_flip = self.cfg.random_flip if flip is None else flip
        fire = bool(do_flip) and random.random() < 0.5
        if kind == "video":
            frames = read_video_frames(source, int(n_frms or self.cfg.num_frames), timeout=timeout, **options)
            data = clip_preprocess(frames, self.image_size, flip=fire).permute(1, 0, 2, 3)
            return Media("video", data, {"path": str(source), "msg": ""})
        if kind == "image":
            from videollm.processors.image_processors import load_image

            data = clip_preprocess(load_image(source), self.image_size, flip=fire)[0]
            return Media("image", data, {"path": str(source)})
        raise PromptError(f"Video-LLaVA has no loader for media of kind {kind!r} (images and videos only)")

    # ------------------------------------------------------------------ prompts -> segments
    def prompt_segments(self, prompt: str, media_embeds: Sequence[torch.Tensor]) -> List[Segment]:
        """A chat prompt with one ``<image>``/``<video>`` per medium -> segments, tokenised as a
        whole as transformers' processor does (the placeholders are special tokens, so the text
        around them keeps its joint tokenisation)."""
        ids = self.tokenizer(prompt, return_tensors="pt")["input_ids"][0]
        n = int(((ids == self.image_token_id) | (ids == self.video_token_id)).sum())
        if n != len(media_embeds):
            raise PromptError(f"the prompt has {n} {IMAGE_TOKEN}/{VIDEO_TOKEN} placeholders but {len(media_embeds)} "
                              "media were given; each medium needs exactly one placeholder")
        return self.segments(ids, list(media_embeds))

    def segments(self, ids: torch.Tensor, media_embeds: Sequence[torch.Tensor], *, mask: Optional[torch.Tensor] = None,
                 labels: Optional[torch.Tensor] = None, where: str = "sample") -> List[Segment]:
        """Token ids (L,) -> segments: media placeholders in order, each either ONE id (expanded to
        the medium's n tokens) or a run of n ids (transformers' expanded form, replaced position
        for position); adjacent media are allowed. Placeholder ids are never embedded."""
        is_ph = ((ids == self.image_token_id) | (ids == self.video_token_id)).tolist()
        mask = torch.ones_like(ids) if mask is None else mask
        labels = torch.full_like(ids, IGNORE_INDEX) if labels is None else labels
        out: List[Segment] = []
        pos, cursor, L = 0, 0, len(is_ph)
        for k, emb in enumerate(media_embeds):
            while pos < L and not is_ph[pos]:
                pos += 1
            if pos >= L:
                raise PromptError(f"{where}: {k} media placeholders in the ids but {len(media_embeds)} media")
            if pos > cursor:
                out.append(Segment(ids=ids[cursor:pos], mask=mask[cursor:pos], labels=labels[cursor:pos]))
            n = int(emb.shape[0])
            avail = 0
            while pos + avail < L and is_ph[pos + avail] and avail < n:
                avail += 1
            if n > 1 and avail == n:  # the expanded form: n placeholder ids stand for the n tokens
                out.append(Segment(embeds=emb, mask=mask[pos:pos + n], labels=labels[pos:pos + n]))
                pos += n
            else:  # one id per medium
                out.append(Segment(embeds=emb))
                pos += 1
            cursor = pos
        if any(is_ph[pos:]):
            raise PromptError(f"{where}: more media placeholders in the ids than the {len(media_embeds)} media given")
        if cursor < L:
            out.append(Segment(ids=ids[cursor:], mask=mask[cursor:], labels=labels[cursor:]))
        return out

    def _merge(self, rows: Sequence[Sequence[Segment]], padding_side: str) -> MergedInputs:
        return merge_segments(rows, self.embed_tokens, dtype=self.llm_dtype, device=self.device,
                              padding_side=padding_side, pad_token_id=self.tokenizer.pad_token_id)

    def build_inputs(self, input_ids: Sequence[torch.Tensor], media: Sequence[Sequence[Media]], *,
                     labels: Optional[Sequence[torch.Tensor]] = None, padding_side: str = "right") -> MergedInputs:
        """Per sample: ids (L_i,) and its media -> merged, padded (inputs_embeds, mask, labels),
        cut to ``model.max_length``. All media of the batch are encoded together."""
        flat = [m for ms in media for m in ms]
        embeds = self.encode_media(flat) if flat else []
        rows, k = [], 0
        for i, ids in enumerate(input_ids):
            n = len(media[i])
            lab = labels[i] if labels is not None else None
            rows.append(self.segments(ids, embeds[k:k + n], labels=lab, where=f"sample {i}"))
            k += n
        merged = self._merge(rows, padding_side)
        limit = int(self.cfg.max_length)
        if merged.inputs_embeds.shape[1] > limit:
            if padding_side == "right":
                merged = MergedInputs(merged.inputs_embeds[:, :limit], merged.attention_mask[:, :limit],
                                      merged.labels[:, :limit])
            else:
                raise PromptError(f"prompt of {merged.inputs_embeds.shape[1]} positions exceeds model.max_length {limit}")
        return merged

    # ------------------------------------------------------------------ training
    def batch_processor(self) -> "VideoLLaVAProcessor":
        if getattr(self, "_processor", None) is None:
            self._processor = VideoLLaVAProcessor(
                self.cfg.tokenizer if self.cfg.tokenizer is not None else self.cfg.model_path,
                self.cfg.conv_template, self.image_size, self.cfg.num_frames)
        return self._processor

    def prepare_batch(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        return self.batch_processor()(batch)

    def forward(self, samples: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        """Training loss. ``samples``: the processor's batch {input_ids: [L_i], labels: [L_i],
        media: [[Media]]} (or a dataset batch, processed here). Returns {"loss", "num_tokens", "seq_len"}."""
        if "input_ids" not in samples:
            samples = self.prepare_batch(samples)
        merged = self.build_inputs(samples["input_ids"], samples["media"], labels=samples["labels"])
        with self.maybe_autocast(merged.inputs_embeds.device):
            out = self.video_llava(inputs_embeds=merged.inputs_embeds, attention_mask=merged.attention_mask,
                                   labels=merged.labels, return_dict=True)
        num_tokens = (merged.labels[:, 1:] != IGNORE_INDEX).sum()
        return {"loss": out.loss, "num_tokens": num_tokens, "seq_len": merged.labels.shape[1]}

    def logits(self, input_ids: Sequence[torch.Tensor], media: Sequence[Sequence[Media]],
               padding_side: str = "left") -> Tuple[torch.Tensor, torch.Tensor]:
        """(logits (B, L, V), attention_mask (B, L)) of prompts through our merge path (tests, scoring)."""
        merged = self.build_inputs(input_ids, media, padding_side=padding_side)
        with torch.no_grad(), self.maybe_autocast(merged.inputs_embeds.device):
            out = self.video_llava(inputs_embeds=merged.inputs_embeds, attention_mask=merged.attention_mask,
                                   return_dict=True)
        return out.logits, merged.attention_mask

    # ------------------------------------------------------------------ generation
    def generation_inputs(self, batch: Dict[str, Any]) -> Tuple[torch.Tensor, torch.Tensor]:
        """A batch of (video or image) media -> the prompt "USER: <video>\\n{question} ASSISTANT:"
        (``batch["question"]``, default a captioning request), left-padded."""
        if "media" in batch:
            media = batch["media"]
        else:
            x = batch["image"]
            media = [[Media("video" if t.dim() == 4 else "image", t)] for t in x]
        questions = batch.get("question") or ["Describe the video briefly."] * len(media)
        ids = []
        for ms, q in zip(media, questions):
            marks = "".join(_MEDIA[m.kind] for m in ms)
            ids.append(self.tokenizer(f"USER: {marks}\n{q} ASSISTANT:", return_tensors="pt")["input_ids"][0])
        merged = self.build_inputs(ids, media, padding_side="left")
        return merged.inputs_embeds, merged.attention_mask

    def decode_caption(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True).strip()

    # ------------------------------------------------------------------ weights
    def load_weights(self, state: Dict[str, torch.Tensor], source: WeightSource | str, *,
                     strict: Optional[bool] = None) -> Tuple[List[str], List[str]]:
        """As the contract's, accepting our names, transformers 5's and the -hf legacy ones; keys of
        a LoRA-wrapped model are matched under PEFT's names."""
        if isinstance(source, str):
            source = WeightSource(source)
        own = set(self.state_dict())
        renamed: Dict[str, torch.Tensor] = {}
        peft = f"{self.llm_attr}.base_model.model."
        for key, value in state.items():
            if not key.startswith(self.llm_attr + "."):
                for pat, rep in KEY_RENAMES:
                    new = re.sub(pat, rep, key)
                    if new != key:
                        key = new
                        break
            if key not in own and key.startswith(self.llm_attr + ".") and not key.startswith(peft):
                alt = peft + key[len(self.llm_attr) + 1:]
                if alt in own:
                    key = alt
                else:
                    base = re.sub(r"\.(weight|bias)$", r".base_layer.\1", alt)
                    key = base if base in own else key
            renamed[key] = value
        return super().load_weights(renamed, source, strict=strict)

    def save_pretrained(self, out_dir: str | os.PathLike) -> Path:
        """A transformers folder (config, safetensors, tokenizer) that
        ``VideoLlavaForConditionalGeneration.from_pretrained`` loads; a LoRA adapter is merged
        into a copy of the weights first (the model here keeps its adapter)."""
        import copy

        from videollm.models.lora import is_lora

        out = Path(out_dir)
        m = self.video_llava
        if is_lora(m):
            if self.llm_is_placed():
                raise ConfigError("save_pretrained: an 8/4-bit model cannot be merged; rebuild it in 16/32 bits")
            m = copy.deepcopy(m).merge_and_unload()
        m.save_pretrained(str(out), safe_serialization=True)
        self.tokenizer.save_pretrained(str(out))
        from videollm.templates import write_chat_template

        write_chat_template(out, self.default_template)  # apply_chat_template renders our prompt
        return out

    @classmethod
    def from_config(cls, cfg) -> "VideoLLaVA":
        return super().from_config(cfg)


def read_video_frames(path: Any, n: int = 8, *, timeout: Optional[float] = 30.0, max_pixels: Optional[int] = None,
                      **options: Any) -> np.ndarray:
    """``n`` uint8 RGB frames ``(n, H, W, 3)`` at ``linspace(0, num_frames - 1, n)`` (frames repeat
    when the clip is shorter), decoded at the source size. Errors name the file."""
    from videollm.processors.video_loader import DEFAULT_MAX_PIXELS, decode_video

    decoded = decode_video(path, n_frms=n, sampling="linspace", timeout=timeout,
                           max_pixels=DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels, **options)
    frames = decoded.frames
    if len(frames) < n:  # a clip shorter than n frames: the original's linspace repeats frames
        pick = np.linspace(0, len(frames) - 1, n, dtype=int)
        frames = frames[pick]
    return frames


# ---------------------------------------------------------------------------------------------
# The model-owned batch processor
# ---------------------------------------------------------------------------------------------


class VideoLLaVAProcessor:
    """Dataset conversations and media -> ids, labels and processed media (runs in loader workers).

    Input batch (from model-agnostic datasets such as ``llava_json``): ``conversations``
    (``[{"from": "human"|"gpt", "value"}]`` with ``<image>``/``<video>`` marking each medium),
    ``media`` (per sample a list of ``{"kind": "image"|"video", "frames": uint8 (T, H, W, 3)}``)
    and ``paths``. The prompt is the training template's (LLaVA-1.5 v1: ``system + " " + "USER:
    {q} ASSISTANT: {a}</s>USER: ..."``), tokenised as a whole with the placeholders as special
    tokens (one id per medium, expanded by the model); labels: only the assistant turns and
    their ``</s>`` (LLaVA-1.5's masking), found from the tokenizer's character offsets. A
    medium's frames become :func:`clip_preprocess` pixels ((3, S, S) images, (3, T, S, S)
    videos at linspace(0, n-1, T)). A sample whose placeholders and media disagree is dropped
    as a ``bad_annotation`` in ``bad_samples``.
    """

    def __init__(self, tokenizer_path: Optional[str], template: str, image_size: int, num_frames: int) -> None:
        self.tokenizer_path = tokenizer_path
        self.template = template
        self.image_size = int(image_size)
        self.num_frames = int(num_frames)
        self._tok = None

    @property
    def tokenizer(self):
        if self._tok is None:
            self._tok = load_tokenizer(self.tokenizer_path)
        return self._tok

    def __getstate__(self) -> Dict[str, Any]:
        state = dict(self.__dict__)
        state["_tok"] = None
        return state

    def prompt(self, turns: Sequence[Dict[str, str]]) -> Tuple[str, List[Tuple[int, int]]]:
        """The conversation as one training string and the character spans that are supervised."""
        conv = TEMPLATES[self.template].new_conversation(training=True)
        seps = [conv.sep, conv.sep2 or conv.sep]
        text = conv.system + seps[0] if conv.system else ""
        spans: List[Tuple[int, int]] = []
        roles = {"human": conv.roles[0], "user": conv.roles[0], "gpt": conv.roles[1], "assistant": conv.roles[1]}
        for i, turn in enumerate(turns):
            role = roles.get(str(turn.get("from", "")).lower())
            if role is None:
                raise BadInput("bad_annotation", f"turn {i}: unknown speaker {turn.get('from')!r}")
            value = str(turn["value"])
            if role == conv.roles[1]:
                text += f"{role}: "
                start = len(text)
                text += value
                sep = seps[i % 2]
                spans.append((start, len(text) + len(sep) if sep.strip() else len(text)))  # answer + "</s>"
                text += sep
            else:
                text += f"{role}: {value}{seps[i % 2]}"
        return text, spans

    def tokenize(self, turns: Sequence[Dict[str, str]]) -> Tuple[torch.Tensor, torch.Tensor]:
        tok = self.tokenizer
        text, spans = self.prompt(turns)
        enc = tok(text, return_offsets_mapping=True)
        ids = torch.tensor(enc["input_ids"], dtype=torch.long)
        labels = torch.full_like(ids, IGNORE_INDEX)
        for j, (s, e) in enumerate(enc["offset_mapping"]):
            if e > s and any(s < b and e > a for a, b in spans):
                labels[j] = ids[j]
        return ids, labels

    def media(self, items: Sequence[Dict[str, Any]]) -> List[Media]:
        out = []
        for item in items:
            kind, frames = item["kind"], item["frames"]
            if kind == "image":
                out.append(Media("image", clip_preprocess(frames[:1] if len(frames) > 1 else frames, self.image_size)[0]))
            elif kind == "video":
                if len(frames) != self.num_frames:
                    frames = frames[linspace_indices(len(frames), self.num_frames)]
                out.append(Media("video", clip_preprocess(frames, self.image_size).permute(1, 0, 2, 3)))
            else:
                raise BadInput("bad_annotation", f"media kind {kind!r}: Video-LLaVA takes images and videos")
        return out

    def __call__(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        if "conversations" not in batch or "input_ids" in batch:
            return batch
        convs = batch["conversations"]
        paths = batch.get("paths") or [f"<sample {i}>" for i in range(len(convs))]
        tok = self.tokenizer
        ph = {tok.convert_tokens_to_ids(IMAGE_TOKEN): "image", tok.convert_tokens_to_ids(VIDEO_TOKEN): "video"}
        ids_out, labels_out, media_out, bad = [], [], [], list(batch.get("bad_samples", []))
        for i, turns in enumerate(convs):
            try:
                ids, labels = self.tokenize(turns)
                kinds = [ph[int(t)] for t in ids if int(t) in ph]
                items = batch["media"][i]
                if kinds != [m["kind"] for m in items]:
                    raise BadInput("bad_annotation", f"placeholders {kinds} but media {[m['kind'] for m in items]}")
                media = self.media(items)
            except BadInput as exc:
                logger.warning("%s: %s (%s)", paths[i], exc.reason, exc.detail)
                bad.append((paths[i], exc.reason))
                continue
            ids_out.append(ids)
            labels_out.append(labels)
            media_out.append(media)
        return {"input_ids": ids_out, "labels": labels_out, "media": media_out, "paths": paths,
                "bad_samples": bad, "num_samples": len(ids_out)}

    def expand(self, ids: torch.Tensor, media: Sequence[Media], patches: int) -> torch.Tensor:
        """transformers' processor form: each ``<image>`` id -> ``patches`` ids, each ``<video>`` id
        -> ``(patches + 1) * T`` ids (the CLS of every frame is kept)."""
        tok = self.tokenizer
        img, vid = tok.convert_tokens_to_ids(IMAGE_TOKEN), tok.convert_tokens_to_ids(VIDEO_TOKEN)
        out, k = [], 0
        for t in ids.tolist():
            if t == img:
                out += [img] * patches
                k += 1
            elif t == vid:
                out += [vid] * ((patches + 1) * int(media[k].data.shape[1]))
                k += 1
            else:
                out.append(t)
        return torch.tensor(out, dtype=torch.long)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python scripts/video_llava_export.py export --cfg-path CFG --out DIR``: the model of a
    config (its ``model.ckpt`` training checkpoint loaded, a LoRA adapter merged) as a transformers
    folder that ``VideoLlavaForConditionalGeneration.from_pretrained`` loads."""
    import argparse

    from videollm.config import add_common_args, load_config

    parser = argparse.ArgumentParser(prog="scripts/video_llava_export.py", description=main.__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    exp = sub.add_parser("export", help="write a transformers folder")
    add_common_args(exp)
    exp.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    from videollm.chat import resolve_checkpoint_pattern

    cfg = load_config(args.cfg_path, args.options)
    if cfg.model.get("ckpt"):
        cfg.model.ckpt, _ = resolve_checkpoint_pattern(str(cfg.model.ckpt))
    model = VideoLLaVA.from_config(cfg.model)
    out = model.save_pretrained(args.out)
    print(f"wrote {out} (load with VideoLlavaForConditionalGeneration.from_pretrained)")
    return 0
